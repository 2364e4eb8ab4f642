//! What /proc says about a process: CPU time and resident memory.

use std::fs;

use anyhow::{anyhow, Context, Result};
use nix::unistd::{sysconf, SysconfVar};

/// Seconds that the live threads of `pid` have spent on a CPU so far: the
/// sum of the first field of every /proc/<pid>/task/*/schedstat, the
/// scheduler's own nanosecond count (kept with or without CONFIG_SCHEDSTATS).
///
/// Why not utime + stime: those are sampled at each tick (4 ms here), and
/// the scheduler's clock is exact. Both leave out the time the hypervisor
/// gave our virtual CPU to another guest (steal), on a kernel with
/// CONFIG_PARAVIRT_TIME_ACCOUNTING, as KVM guests have: so this figure
/// stays put when neighbours take a quarter of the machine, where a rate or
/// the machine's busy time does not. A thread that has exited is missing
/// from the sum; sluice's threads live as long as the process.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let dir = format!("/proc/{pid}/task");
    let mut nanos = 0u64;
    for task in fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
        let path = task
            .with_context(|| format!("listing {dir}"))?
            .path()
            .join("schedstat");
        // A thread may exit between the listing and the read.
        let Ok(text) = fs::read_to_string(&path) else {
            continue;
        };
        nanos += parse_schedstat(&text)
            .ok_or_else(|| anyhow!("{}: unexpected format", path.display()))?;
    }
    Ok(nanos as f64 / 1e9)
}

/// The first of schedstat's three fields: nanoseconds on a CPU.
fn parse_schedstat(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

/// The unit of the CPU times in /proc (USER_HZ).
pub fn ticks_per_second() -> Result<u64> {
    let per_second = sysconf(SysconfVar::CLK_TCK)
        .context("sysconf(CLK_TCK)")?
        .ok_or_else(|| anyhow!("sysconf(CLK_TCK) has no value"))?;
    u64::try_from(per_second).context("CLK_TCK out of range")
}

/// `flags` (field 9) and utime + stime (fields 14 and 15). The command name
/// (field 2) may hold spaces and parentheses, so fields are counted after
/// its last ')'.
pub fn parse_flags_and_ticks(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().take(13).collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some((field(9)?, field(14)? + field(15)?))
}

/// VmRSS of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_rss(&status).ok_or_else(|| anyhow!("{path}: no VmRSS line"))
}

fn parse_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_command_names() {
        let stat = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 17 5 0 0 20 0 3 0 100 0 0";
        assert_eq!(parse_flags_and_ticks(stat), Some((4194560, 22)));
    }

    #[test]
    fn reads_our_own_process() {
        let me = std::process::id();
        let before = cpu_seconds(me).unwrap();
        let spin = std::time::Instant::now();
        while spin.elapsed() < std::time::Duration::from_millis(20) {}
        assert!(cpu_seconds(me).unwrap() > before);
        assert_eq!(parse_schedstat("86072671 6825927 176\n"), Some(86072671));
        assert!(rss_kib(me).unwrap() > 0);
        assert_eq!(parse_rss("Name:\tx\nVmRSS:\t  1234 kB\n"), Some(1234));
    }
}
