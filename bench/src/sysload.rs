//! How much of the machine others took during a load.
//!
//! The benchmark shares its cores with whatever else runs (a compiler on a
//! developer's machine) and, on a virtual machine, with the host's other
//! guests. Two figures:
//!
//! - other processes: the CPU time of every process that is neither ours
//!   (this one: client and workload; the interceptor) nor a kernel thread,
//!   summed from /proc/<pid>/stat, sampled every [`EVERY`] so that processes
//!   that start and end during the load are caught (a process that lives
//!   less than that may be missed). Subtracting our time from /proc/stat's
//!   busy time does not work: that is sampled on timer ticks, and on this
//!   kind of machine it missed most of our own short bursts.
//! - steal: the time the hypervisor ran someone else on our virtual CPUs,
//!   from /proc/stat (kept exactly by the paravirtual steal clock).

use std::collections::HashMap;
use std::fs;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::procstat;

/// Set in `flags` (field 9 of /proc/<pid>/stat) for kernel threads.
const PF_KTHREAD: u64 = 0x0020_0000;
const EVERY: Duration = Duration::from_millis(250);

/// Above these shares a load's figures are not trusted: repeated when the
/// profile allows, marked in the report either way.
/// Steal is never zero on a shared host (a few percent while idle here) and
/// grows when the benchmark keeps both virtual CPUs busy, hence the higher
/// bar.
pub const DISTURBED_OTHER: f64 = 0.05;
pub const DISTURBED_STEAL: f64 = 0.15;
/// Below these, an idle moment counts as quiet enough to start a load.
const QUIET_OTHER: f64 = 0.02;
const QUIET_STEAL: f64 = 0.08;

/// Shares of the whole machine (all cores) over an interval.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Interference {
    pub other_cpu: f64,
    pub steal: f64,
    /// The other processes that used the most, `(command, CPU seconds)`.
    pub top: Vec<(String, f64)>,
}

impl Interference {
    pub fn disturbed(&self) -> bool {
        self.other_cpu > DISTURBED_OTHER || self.steal > DISTURBED_STEAL
    }

    pub fn quiet(&self) -> bool {
        self.other_cpu < QUIET_OTHER && self.steal < QUIET_STEAL
    }

    /// For choosing the least disturbed of several attempts.
    pub fn weight(&self) -> f64 {
        self.other_cpu + self.steal
    }

    pub fn describe(&self) -> String {
        let mut text = format!(
            "other processes {:.0}%, steal {:.0}% of the machine",
            self.other_cpu * 100.0,
            self.steal * 100.0
        );
        if !self.top.is_empty() {
            let top: Vec<String> = self
                .top
                .iter()
                .map(|(comm, s)| format!("{comm} {s:.1} s"))
                .collect();
            text += &format!(": {}", top.join(", "));
        }
        text
    }
}

/// Watches the machine from `start` to `stop`.
pub struct Monitor {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Interference>>,
}

impl Monitor {
    pub fn start(ours: Vec<u32>) -> Monitor {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("sysload".into())
            .spawn(move || watch(&ours, &flag))
            .ok();
        Monitor { stop, thread }
    }

    /// What others took since `start`; all zero if it could not be told.
    pub fn stop(mut self) -> Interference {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Watches for `window` and returns what others took.
pub fn sample(ours: Vec<u32>, window: Duration) -> Interference {
    let monitor = Monitor::start(ours);
    std::thread::sleep(window);
    monitor.stop()
}

fn watch(ours: &[u32], stop: &AtomicBool) -> Interference {
    let started = Instant::now();
    let cpu_before = read_cpu_line();
    // pid → (command, ticks at first sight, ticks last seen)
    let mut seen: HashMap<u32, (String, u64, u64)> = HashMap::new();
    let mut first = true;
    loop {
        let done = stop.load(Ordering::SeqCst);
        for (pid, comm, ticks) in other_processes(ours) {
            // A process first seen after the start began during the window:
            // all of its time counts.
            let entry = seen
                .entry(pid)
                .or_insert_with(|| (String::new(), if first { ticks } else { 0 }, ticks));
            // The latest name: a child caught between fork and exec still
            // bears its parent's.
            entry.0 = comm;
            entry.2 = ticks;
        }
        first = false;
        if done {
            break;
        }
        std::thread::sleep(EVERY);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let per_second = procstat::ticks_per_second().unwrap_or(100) as f64;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let capacity = elapsed * per_second * cores;
    let mut by_command: HashMap<String, u64> = HashMap::new();
    let mut other = 0;
    for (comm, at_start, last) in seen.into_values() {
        let used = last.saturating_sub(at_start);
        other += used;
        *by_command.entry(comm).or_default() += used;
    }
    let mut top: Vec<(String, f64)> = by_command
        .into_iter()
        .map(|(c, t)| (c, t as f64 / per_second))
        .filter(|(_, seconds)| *seconds >= 0.05)
        .collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1));
    top.truncate(3);
    let steal = match (cpu_before, read_cpu_line()) {
        (Some((steal0, total0)), Some((steal1, total1))) if total1 > total0 => {
            steal1.saturating_sub(steal0) as f64 / (total1 - total0) as f64
        }
        _ => 0.0,
    };
    Interference {
        other_cpu: if capacity > 0.0 {
            other as f64 / capacity
        } else {
            0.0
        },
        steal,
        top,
    }
}

/// `(pid, command, utime + stime)` of every process but ours, our children
/// (the loads' own tools and servers: redis-benchmark, redis-server, perf)
/// and the kernel's threads.
fn other_processes(ours: &[u32]) -> Vec<(u32, String, u64)> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| !ours.contains(pid))
        .filter_map(|pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let (flags, ticks) = procstat::parse_flags_and_ticks(&stat)?;
            let comm = stat.get(stat.find('(')? + 1..stat.rfind(')')?)?.to_string();
            // After the command: the state, then the parent's pid.
            let parent = stat[stat.rfind(')')? + 1..]
                .split_whitespace()
                .nth(1)?
                .parse::<u32>()
                .ok()?;
            (flags & PF_KTHREAD == 0 && !ours.contains(&parent)).then_some((pid, comm, ticks))
        })
        .collect()
}

/// CPU seconds the whole machine has spent busy so far: user, nice, system,
/// irq and softirq of every core from /proc/stat, so work the kernel does
/// outside any process (softirq, kworkers: sockmap's forwarding) counts too.
/// Idle, iowait and steal are not work done here.
pub fn machine_busy_seconds() -> Option<f64> {
    busy_ticks(&fs::read_to_string("/proc/stat").ok()?)
        .zip(procstat::ticks_per_second().ok())
        .map(|(busy, hz)| busy as f64 / hz as f64)
}

fn busy_ticks(stat: &str) -> Option<u64> {
    let v = cpu_fields(stat)?;
    Some([0, 1, 2, 5, 6].iter().filter_map(|&i| v.get(i)).sum())
}

/// The tick counts of /proc/stat's aggregate `cpu` line: user nice system
/// idle iowait irq softirq steal [guest guest_nice].
fn cpu_fields(stat: &str) -> Option<Vec<u64>> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    line.split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect()
}

/// `(steal, total)` ticks from /proc/stat's aggregate `cpu` line.
fn read_cpu_line() -> Option<(u64, u64)> {
    parse_cpu_line(&fs::read_to_string("/proc/stat").ok()?)
}

fn parse_cpu_line(stat: &str) -> Option<(u64, u64)> {
    let v = cpu_fields(stat)?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]; the
    // guest times are already inside user and nice.
    let steal = *v.get(7)?;
    Some((steal, v.iter().take(8).sum()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_ticks_leave_out_idle_iowait_and_steal() {
        let stat = "cpu  100 2 30 5000 40 5 6 70 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n";
        assert_eq!(busy_ticks(stat), Some(100 + 2 + 30 + 5 + 6));
        assert!(machine_busy_seconds().is_some_and(|s| s > 0.0));
    }

    #[test]
    fn cpu_line() {
        let stat = "cpu  100 10 50 1000 5 0 7 3 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n";
        assert_eq!(parse_cpu_line(stat), Some((3, 1175)));
    }

    #[test]
    fn another_process_is_seen_and_we_are_not() {
        let monitor = Monitor::start(vec![std::process::id()]);
        // Burn CPU in a grandchild (another process: neither ours nor our
        // child, which a load's own tools are) and in this process (ours).
        let mut child = std::process::Command::new("sh")
            .args([
                "-c",
                "(i=0; while [ $i -lt 1000000 ]; do i=$((i+1)); done) & wait",
            ])
            .spawn()
            .unwrap();
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(300) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        child.wait().unwrap();
        let i = monitor.stop();
        assert!(i.other_cpu > 0.0, "{i:?}");
        assert!(i.top.iter().any(|(c, _)| c == "sh"), "{i:?}");
        assert!(
            !i.top.iter().any(|(c, _)| c.starts_with("sluice_bench")),
            "{i:?}"
        );
        assert!((0.0..=1.0).contains(&i.steal));
    }
}
