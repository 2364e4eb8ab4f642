//! The interceptor seen from outside with Linux's own tools: its syscalls
//! counted by `perf stat`, its CPU time sampled by `perf record`, its
//! syscalls by name from `strace -c` (`make profile` only).
//!
//! Each attaches to the interceptor's pid from the machine's own namespace:
//! the interceptor lives in the pod's network namespace, not in another pid
//! namespace. `perf stat -e raw_syscalls:sys_enter` counts every entry into
//! the kernel of every thread of the process, through a tracepoint that costs
//! little; io_uring operations are not syscalls, only the `io_uring_enter`
//! that submits or waits for them is. `strace` stops the process at every
//! syscall, so it runs only in `make profile`, never beside a figure.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::unistd::Pid;
use serde::Serialize;

const SYSCALL_EVENT: &str = "raw_syscalls:sys_enter";
/// The syscalls an event loop makes to wait or to wake another thread: how
/// many it makes per connection depends on how events happen to batch (how
/// busy the machine is, how the threads interleave), not on the code's
/// work. The others (socket, setsockopt, getsockname, close, ...) are the
/// same for every connection: their count per connection is exact.
const WAIT_SYSCALLS: [&str; 16] = [
    "io_uring_enter",
    "epoll_wait",
    "epoll_pwait",
    "epoll_pwait2",
    "futex",
    "futex_wait",
    "futex_wake",
    "futex_waitv",
    "poll",
    "ppoll",
    "select",
    "pselect6",
    "nanosleep",
    "clock_nanosleep",
    "sched_yield",
    "rt_sigtimedwait",
];
/// Where the kernel lists the syscall tracepoints perf can count.
const SYSCALL_TRACEPOINTS: &str = "/sys/kernel/tracing/events/syscalls";
/// perf and strace print nothing when they have attached, and a SIGINT
/// before they have set up ends them without a word: the load starts once
/// the kernel shows them attached, within this.
const ATTACH_WITHIN: Duration = Duration::from_secs(10);
/// perf writes its data and strace detaches within this of SIGINT.
const STOP_WITHIN: Duration = Duration::from_secs(30);

/// The syscalls of the interceptor over a load's pass of its own.
#[derive(Debug, Clone, Serialize)]
pub struct Syscalls {
    /// How they were counted (the command, without the pid).
    pub tool: String,
    /// What the load completed: connections (CRR), or requests (RR; then
    /// `per_connection` is per request).
    pub connections: u64,
    pub duration_s: f64,
    pub syscalls: Option<u64>,
    pub per_connection: Option<f64>,
    /// Of `syscalls`, those of [`WAIT_SYSCALLS`]; None when the kernel has
    /// no tracepoints to count them by.
    pub waits: Option<u64>,
    /// The others, per connection: exact, whatever the timing.
    pub work_per_connection: Option<f64>,
    /// Why there is no count.
    pub error: Option<String>,
}

/// A tool attached to a process until [`Attached::stop`]: SIGINT makes perf
/// and strace print their summary and detach. Dropped without stopping, it
/// is killed, so a failed load leaves no tracer behind.
struct Attached {
    child: Option<Child>,
    line: String,
}

/// What shows that a tool has attached to its target.
enum Attach {
    /// perf holds at least this many perf_event descriptors, and has
    /// stopped opening more. perf stat opens one per event and thread of
    /// its target before it enables them: a load started at its first
    /// descriptor could end before the last events count (a check's first
    /// count run, perf's first start, once had no wait count at all).
    PerfEvents { at_least: usize },
    /// Every thread of the target has a tracer.
    Traced { target: u32 },
}

impl Attach {
    /// `seen`: what the previous look found, for the looks that compare.
    fn done(&self, tool: u32, seen: &mut usize) -> bool {
        match self {
            Attach::PerfEvents { at_least } => {
                let open = std::fs::read_dir(format!("/proc/{tool}/fd")).map_or(0, |fds| {
                    fds.flatten()
                        .filter(|fd| {
                            std::fs::read_link(fd.path())
                                .is_ok_and(|target| target.to_string_lossy().contains("perf_event"))
                        })
                        .count()
                });
                let settled = open >= *at_least && open == *seen;
                *seen = open;
                settled
            }
            Attach::Traced { target } => std::fs::read_dir(format!("/proc/{target}/task"))
                .map(|tasks| {
                    tasks.flatten().all(|task| {
                        std::fs::read_to_string(task.path().join("status")).is_ok_and(|status| {
                            status
                                .lines()
                                .find_map(|l| l.strip_prefix("TracerPid:"))
                                .is_some_and(|pid| pid.trim() != "0")
                        })
                    })
                })
                .unwrap_or(false),
        }
    }
}

impl Attached {
    fn start(mut command: Command, attach: Attach) -> Result<Attached> {
        let line = format!("{command:?}");
        // This process blocks SIGINT in every thread for its signal thread
        // (main.rs), and a child inherits the mask: perf would never see
        // the SIGINT that stops it.
        // SAFETY: between fork and exec, only pthread_sigmask, which is
        // async-signal-safe and does not allocate.
        unsafe {
            command.pre_exec(|| {
                SigSet::all().thread_unblock()?;
                Ok(())
            });
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {line}"))?;
        let tool = child.id();
        let attached = Attached {
            child: Some(child),
            line,
        };
        let deadline = Instant::now() + ATTACH_WITHIN;
        let mut seen = 0;
        while !attach.done(tool, &mut seen) {
            if Instant::now() > deadline {
                bail!("{} did not attach within {ATTACH_WITHIN:?}", attached.line);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(attached)
    }

    /// Stops it and returns its stderr (where both tools write summaries;
    /// a few lines, well within a pipe's buffer while it exits).
    fn stop(mut self) -> Result<String> {
        let mut child = self.child.take().ok_or_else(|| anyhow!("stopped twice"))?;
        let pid = Pid::from_raw(i32::try_from(child.id()).context("pid out of range")?);
        kill(pid, Signal::SIGINT).with_context(|| format!("interrupting {}", self.line))?;
        let deadline = Instant::now() + STOP_WITHIN;
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{} did not stop within {STOP_WITHIN:?} of SIGINT",
                    self.line
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut stderr = String::new();
        if let Some(mut pipe) = child.stderr.take() {
            pipe.read_to_string(&mut stderr)
                .with_context(|| format!("reading what {} said", self.line))?;
        }
        // Interrupted, perf exits 0 and strace 0 or 130: a count is what
        // tells success, and the callers look for it.
        Ok(stderr)
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Counts the syscalls of `pid` while `load` runs; `load` returns the
/// connections it completed and its duration.
pub fn count_syscalls(
    perf: &Path,
    pid: u32,
    load: impl FnOnce() -> Result<(u64, f64)>,
) -> Syscalls {
    let tool = format!("perf stat -e {SYSCALL_EVENT} -p <pid>");
    let mut counted = Syscalls {
        tool,
        connections: 0,
        duration_s: 0.0,
        syscalls: None,
        per_connection: None,
        waits: None,
        work_per_connection: None,
        error: None,
    };
    let waits = wait_events();
    let outcome = (|| -> Result<()> {
        let mut command = Command::new(perf);
        let events = std::iter::once(SYSCALL_EVENT.to_string())
            .chain(waits.iter().cloned())
            .collect::<Vec<_>>()
            .join(",");
        command
            .args(["stat", "-x", ",", "-e", &events, "-p"])
            .arg(pid.to_string());
        let attached = Attached::start(
            command,
            Attach::PerfEvents {
                at_least: 1 + waits.len(),
            },
        )?;
        // Opened, then enabled all at once: a moment for the enabling.
        std::thread::sleep(Duration::from_millis(50));
        let (connections, duration_s) = load()?;
        counted.connections = connections;
        counted.duration_s = duration_s;
        let stderr = attached.stop()?;
        let n = parse_perf_count(&stderr, SYSCALL_EVENT)
            .ok_or_else(|| anyhow!("no {SYSCALL_EVENT} count from perf: {}", stderr.trim()))?;
        counted.syscalls = Some(n);
        counted.per_connection = (connections > 0).then(|| n as f64 / connections as f64);
        let wait_counts: Option<Vec<u64>> = waits
            .iter()
            .map(|event| parse_perf_count(&stderr, event))
            .collect();
        counted.waits = wait_counts
            .filter(|_| !waits.is_empty())
            .map(|c| c.iter().sum());
        counted.work_per_connection = work_per_connection(n, counted.waits, connections);
        Ok(())
    })();
    if let Err(e) = outcome {
        counted.error = Some(format!("{e:#}"));
    }
    counted
}

/// The tracepoints of [`WAIT_SYSCALLS`] this kernel has; empty when it has
/// no syscall tracepoints (then no wait is counted, and no work count made).
fn wait_events() -> Vec<String> {
    WAIT_SYSCALLS
        .iter()
        .filter(|name| {
            Path::new(SYSCALL_TRACEPOINTS)
                .join(format!("sys_enter_{name}"))
                .is_dir()
        })
        .map(|name| format!("syscalls:sys_enter_{name}"))
        .collect()
}

/// The syscalls that are not waits, per connection; None without a wait
/// count, without a connection, or when the counts disagree (more waits
/// than syscalls: the events were not counted over the same time).
fn work_per_connection(syscalls: u64, waits: Option<u64>, connections: u64) -> Option<f64> {
    let work = syscalls.checked_sub(waits?)?;
    (connections > 0).then(|| work as f64 / connections as f64)
}

/// The count of `event` in the output of `perf stat -x ,`:
/// `12345,,raw_syscalls:sys_enter,...`; None for `<not counted>` or
/// `<not supported>`, or no line of that event.
fn parse_perf_count(stderr: &str, event: &str) -> Option<u64> {
    stderr
        .lines()
        .map(|l| l.split(',').collect::<Vec<_>>())
        .find(|fields| fields.get(2).is_some_and(|f| f.trim() == event))?
        .first()?
        .trim()
        .parse()
        .ok()
}

/// `perf record` of `pid`'s CPU time, with call stacks, into `data`, while
/// `load` runs. The software clock (`cpu-clock`) works in virtual machines,
/// which rarely pass the hardware cycle counter through. DWARF unwinding:
/// release builds keep no frame pointers, and with `-g` alone every Rust
/// frame would be `[unknown]`.
pub fn record<T>(
    perf: &Path,
    pid: u32,
    data: &Path,
    load: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let mut command = Command::new(perf);
    command
        .args(["record", "-F", "499", "--call-graph", "dwarf,16384"])
        .args(["-e", "cpu-clock", "-o"])
        .arg(data)
        .arg("-p")
        .arg(pid.to_string());
    let attached = Attached::start(command, Attach::PerfEvents { at_least: 1 })?;
    let result = load()?;
    let stderr = attached.stop()?;
    if !data.is_file() {
        bail!("perf record wrote no {}: {}", data.display(), stderr.trim());
    }
    Ok(result)
}

/// One syscall in `strace -c`'s summary.
#[derive(Debug, Clone, PartialEq)]
pub struct Traced {
    pub name: String,
    pub calls: u64,
    pub errors: u64,
}

/// `strace -c -f` of `pid` while `load` runs: calls by syscall, most first.
pub fn strace_counts<T>(
    strace: &Path,
    pid: u32,
    load: impl FnOnce() -> Result<T>,
) -> Result<(T, Vec<Traced>)> {
    let mut command = Command::new(strace);
    command.args(["-c", "-f", "-p"]).arg(pid.to_string());
    let attached = Attached::start(command, Attach::Traced { target: pid })?;
    let result = load()?;
    let stderr = attached.stop()?;
    let mut calls = parse_strace_summary(&stderr);
    if calls.is_empty() {
        bail!("no summary from strace: {}", stderr.trim());
    }
    calls.sort_by_key(|c| std::cmp::Reverse(c.calls));
    Ok((result, calls))
}

/// The rows of `strace -c`: `% time  seconds  usecs/call  calls  [errors]
/// syscall`; the total line and headers are left out.
fn parse_strace_summary(text: &str) -> Vec<Traced> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let name = *fields.last()?;
            if name == "total" || fields.len() < 5 || fields[0].parse::<f64>().is_err() {
                return None;
            }
            let calls = fields.get(3)?.parse().ok()?;
            let errors = if fields.len() >= 6 {
                fields[4].parse().unwrap_or(0)
            } else {
                0
            };
            Some(Traced {
                name: name.to_string(),
                calls,
                errors,
            })
        })
        .collect()
}

/// `name` from PATH or the sbin directories, when installed.
pub fn tool(name: &str) -> Option<PathBuf> {
    crate::scenario::find_program(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perf_stat_csv() {
        let text = "123456,,raw_syscalls:sys_enter,2003817245,100.00,,\n\
                    300,,syscalls:sys_enter_futex_wait,2003817245,100.00,,\n\
                    4000,,syscalls:sys_enter_futex,2003817245,100.00,,\n";
        assert_eq!(parse_perf_count(text, SYSCALL_EVENT), Some(123456));
        // The exact event, not one whose name starts with it.
        assert_eq!(
            parse_perf_count(text, "syscalls:sys_enter_futex"),
            Some(4000)
        );
        assert_eq!(parse_perf_count(text, "syscalls:sys_enter_poll"), None);
        let none = "<not counted>,,raw_syscalls:sys_enter,0,100.00,,\n";
        assert_eq!(parse_perf_count(none, SYSCALL_EVENT), None);
    }

    #[test]
    fn work_is_what_is_not_waiting() {
        assert_eq!(work_per_connection(1650, Some(350), 100), Some(13.0));
        assert_eq!(work_per_connection(1650, None, 100), None);
        assert_eq!(work_per_connection(1650, Some(350), 0), None);
        // Waits counted over a longer time than the total: no figure.
        assert_eq!(work_per_connection(100, Some(350), 10), None);
    }

    #[test]
    fn strace_summary() {
        let text = "strace: Process 42 attached with 3 threads
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 61.20    0.104000          10     10000           io_uring_enter
 20.00    0.034000           3     10000      9000 accept4
  0.10    0.000100           1       100           close
------ ----------- ----------- --------- --------- ----------------
100.00    0.138100           6     20100      9000 total
";
        let rows = parse_strace_summary(text);
        assert_eq!(rows.len(), 3, "{rows:?}");
        assert_eq!(
            rows[1],
            Traced {
                name: "accept4".into(),
                calls: 10000,
                errors: 9000
            }
        );
        assert_eq!(rows[2].errors, 0);
    }

    #[test]
    fn counts_a_process_syscalls_when_perf_can() {
        let Some(perf) = tool("perf") else {
            eprintln!("perf is not installed: skipped");
            return;
        };
        let mut child = Command::new("sh")
            .args(["-c", "while :; do cat /dev/null; done"])
            .spawn()
            .unwrap();
        let counted = count_syscalls(&perf, child.id(), || {
            std::thread::sleep(Duration::from_millis(300));
            Ok((10, 0.3))
        });
        let _ = child.kill();
        let _ = child.wait();
        assert!(counted.error.is_none(), "{counted:?}");
        assert!(counted.syscalls.unwrap_or(0) > 10, "{counted:?}");
        assert!(counted.per_connection.unwrap_or(0.0) > 1.0, "{counted:?}");
    }
}
