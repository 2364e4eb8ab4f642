//! How much of the machine other processes took during a load.
//!
//! The benchmark shares its cores with whatever else runs (a compiler, on a
//! developer's machine). Busy time from /proc/stat, minus the CPU time of our
//! own processes (this one: client and workload; the interceptor) and of
//! kernel threads (ksoftirqd and kworkers, which mostly do our packets'
//! work), is what others used. Short-lived processes are caught too, since
//! the machine-wide counters include them.

use std::fs;

use anyhow::{anyhow, Context, Result};
use serde::Serialize;

use crate::procstat;

/// Set in `flags` (field 9 of /proc/<pid>/stat) for kernel threads.
const PF_KTHREAD: u64 = 0x0020_0000;

#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    /// user + nice + system + irq + softirq, in ticks, all CPUs.
    busy: u64,
    /// Every category, in ticks, all CPUs.
    total: u64,
    steal: u64,
    ours: u64,
    kthreads: u64,
}

/// Shares of the whole machine (all cores) over an interval.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Interference {
    /// CPU used by processes other than ours and the kernel's threads.
    pub other_cpu: f64,
    /// Time the hypervisor ran someone else on our virtual CPUs.
    pub steal: f64,
}

/// Above these shares a load's figures are not trusted: repeated when the
/// profile allows, marked in the report either way.
pub const DISTURBED_OTHER: f64 = 0.05;
pub const DISTURBED_STEAL: f64 = 0.10;
/// Below these, an idle moment counts as quiet enough to start a load.
const QUIET_OTHER: f64 = 0.02;
const QUIET_STEAL: f64 = 0.03;

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
        format!(
            "other processes {:.0}%, steal {:.0}% of the machine",
            self.other_cpu * 100.0,
            self.steal * 100.0
        )
    }
}

impl Snapshot {
    pub fn take(ours: &[u32]) -> Result<Snapshot> {
        let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let (busy, total, steal) =
            parse_cpu_line(&stat).ok_or_else(|| anyhow!("/proc/stat: no cpu line"))?;
        let ours = ours
            .iter()
            .filter_map(|pid| procstat::cpu_ticks(*pid).ok())
            .sum();
        Ok(Snapshot {
            busy,
            total,
            steal,
            ours,
            kthreads: kernel_thread_ticks(),
        })
    }

    pub fn since(&self, before: &Snapshot) -> Interference {
        let total = self.total.saturating_sub(before.total);
        if total == 0 {
            return Interference::default();
        }
        let busy = self.busy.saturating_sub(before.busy);
        let ours = self.ours.saturating_sub(before.ours);
        let kthreads = self.kthreads.saturating_sub(before.kthreads);
        let other = busy.saturating_sub(ours + kthreads);
        Interference {
            other_cpu: other as f64 / total as f64,
            steal: self.steal.saturating_sub(before.steal) as f64 / total as f64,
        }
    }
}

/// `(busy, total, steal)` from the aggregate `cpu` line.
fn parse_cpu_line(stat: &str) -> Option<(u64, u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]; the
    // guest times are already inside user and nice. irq and softirq count as
    // busy: a process's own time includes the softirqs run on its behalf
    // (our packets, processed as we send them).
    let field = |i: usize| v.get(i).copied();
    let busy = field(0)? + field(1)? + field(2)? + field(5)? + field(6)?;
    let total = v.iter().take(8).sum();
    Some((busy, total, field(7)?))
}

fn kernel_thread_ticks() -> u64 {
    let Ok(entries) = fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            let (flags, ticks) = procstat::parse_flags_and_ticks(&stat)?;
            (flags & PF_KTHREAD != 0).then_some(ticks)
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_line() {
        let stat = "cpu  100 10 50 1000 5 0 7 3 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n";
        assert_eq!(parse_cpu_line(stat), Some((167, 1175, 3)));
    }

    #[test]
    fn measures_something_sane() {
        let before = Snapshot::take(&[std::process::id()]).unwrap();
        // Burn a little CPU of our own: it must not count as interference.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(300) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        let after = Snapshot::take(&[std::process::id()]).unwrap();
        let i = after.since(&before);
        assert!((0.0..=1.0).contains(&i.other_cpu) && (0.0..=1.0).contains(&i.steal));
    }
}
