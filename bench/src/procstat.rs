//! What /proc says about a process: CPU time and resident memory.

use std::fs;

use anyhow::{anyhow, Context, Result};
use nix::unistd::{sysconf, SysconfVar};

/// User + system CPU seconds of every thread of `pid` so far.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    Ok(cpu_ticks(pid)? as f64 / ticks_per_second()? as f64)
}

/// The unit of the CPU times in /proc (USER_HZ).
pub fn ticks_per_second() -> Result<u64> {
    let per_second = sysconf(SysconfVar::CLK_TCK)
        .context("sysconf(CLK_TCK)")?
        .ok_or_else(|| anyhow!("sysconf(CLK_TCK) has no value"))?;
    u64::try_from(per_second).context("CLK_TCK out of range")
}

/// User + system CPU time of every thread of `pid` so far, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_flags_and_ticks(&stat)
        .map(|(_, ticks)| ticks)
        .ok_or_else(|| anyhow!("{path}: unexpected format"))
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
        assert!(cpu_seconds(me).unwrap() >= 0.0);
        assert!(rss_kib(me).unwrap() > 0);
        assert_eq!(parse_rss("Name:\tx\nVmRSS:\t  1234 kB\n"), Some(1234));
    }
}
