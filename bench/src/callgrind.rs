//! The interceptor's user-space instructions per connection, counted by
//! valgrind's callgrind: the figure of its CPU work that no neighbour can
//! move. These VMs have no hardware counters (`perf stat -e instructions`:
//! not supported), and under a hypervisor that steals a quarter of the
//! machine in bursts a 14% slower CRR went unseen in 4 checks of 4 by the
//! time figures, and the interceptor's own CPU time per connection (the
//! scheduler's steal-free clock) moved by ±20% between runs of one binary.
//! callgrind runs the code on a synthetic CPU, so the same code path costs
//! the same count: 31.5-32.9k per connection over five passes of 300
//! connections of one sluice here.
//!
//! The interceptor is started under `valgrind --tool=callgrind
//! --instr-atstart=no` (50 times slower, so never beside a timed figure);
//! `callgrind_control` switches the counting on for the load only and dumps
//! the total. What it counts is user space: the kernel's share of a
//! connection is the syscall count's to watch (`perf.rs`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;

/// valgrind and its callgrind_control, when installed.
#[derive(Debug, Clone)]
pub struct Callgrind {
    valgrind: PathBuf,
    control: PathBuf,
}

/// The instructions of one load's pass.
#[derive(Debug, Clone, Serialize)]
pub struct Instructions {
    /// Connections the load completed.
    pub connections: u64,
    pub instructions: Option<u64>,
    pub per_connection: Option<f64>,
    /// Why there is no count.
    pub error: Option<String>,
}

impl Callgrind {
    pub fn find() -> Option<Callgrind> {
        Some(Callgrind {
            valgrind: crate::scenario::find_program("valgrind")?,
            control: crate::scenario::find_program("callgrind_control")?,
        })
    }

    /// The command line that runs a program under callgrind, counting
    /// nothing until [`Callgrind::count`] says so; dumps go to `out_dir`.
    pub fn prefix(&self, out_dir: &Path) -> Vec<String> {
        vec![
            self.valgrind.display().to_string(),
            "--tool=callgrind".into(),
            "--instr-atstart=no".into(),
            // Into an exec, as of a wrapper script that sets sluice's
            // environment (make bench-check-selftest's), but not into the
            // iptables tools sluice runs: they would only be slower.
            "--trace-children=yes".into(),
            "--trace-children-skip=*tables*".into(),
            format!(
                "--callgrind-out-file={}",
                out_dir.join("callgrind.out").display()
            ),
        ]
    }

    /// Counts the instructions of `pid` (started with [`Callgrind::prefix`]
    /// and `out_dir`) over `load`, which returns the connections it
    /// completed.
    pub fn count(
        &self,
        pid: u32,
        out_dir: &Path,
        load: impl FnOnce() -> Result<u64>,
    ) -> Instructions {
        let mut counted = Instructions {
            connections: 0,
            instructions: None,
            per_connection: None,
            error: None,
        };
        let outcome = (|| -> Result<()> {
            self.control(pid, &["-z"])?;
            self.control(pid, &["-i", "on"])?;
            let loaded = load();
            self.control(pid, &["-i", "off"])?;
            counted.connections = loaded?;
            self.control(pid, &["-d"])?;
            let total = last_dump_total(out_dir)?;
            counted.instructions = Some(total);
            counted.per_connection =
                (counted.connections > 0).then(|| total as f64 / counted.connections as f64);
            Ok(())
        })();
        if let Err(e) = outcome {
            counted.error = Some(format!("{e:#}"));
        }
        counted
    }

    fn control(&self, pid: u32, args: &[&str]) -> Result<()> {
        let out = Command::new(&self.control)
            .args(args)
            .arg(pid.to_string())
            .output()
            .with_context(|| format!("running {}", self.control.display()))?;
        if !out.status.success() {
            bail!(
                "callgrind_control {} {pid}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

/// The `totals:` of the newest dump (`callgrind.out.<n>`, n counting up).
fn last_dump_total(out_dir: &Path) -> Result<u64> {
    let mut newest: Option<(u32, PathBuf)> = None;
    for entry in fs::read_dir(out_dir).with_context(|| format!("listing {}", out_dir.display()))? {
        let path = entry?.path();
        let n = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("callgrind.out."))
            .and_then(|n| n.parse::<u32>().ok());
        if let Some(n) = n {
            if newest.as_ref().is_none_or(|(m, _)| n > *m) {
                newest = Some((n, path));
            }
        }
    }
    let (_, path) =
        newest.ok_or_else(|| anyhow!("callgrind wrote no dump in {}", out_dir.display()))?;
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    parse_total(&text).ok_or_else(|| anyhow!("{}: no totals line", path.display()))
}

/// The first event (Ir, instructions) of a dump's `totals:` line.
fn parse_total(dump: &str) -> Option<u64> {
    let line = dump.lines().find(|l| l.starts_with("totals:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_total_of_a_dump() {
        let dump = "version: 1\ncreator: callgrind-3.19.0\nevents: Ir\nsummary: 0\n\
                    fn=(1) main\n3 4\ntotals: 6305112\n";
        assert_eq!(parse_total(dump), Some(6305112));
        assert_eq!(parse_total("events: Ir\n"), None);
    }

    /// Runs a real program under callgrind: the count of a fixed loop is
    /// the same twice, whatever the machine is doing.
    #[test]
    fn counts_the_same_work_the_same() {
        let callgrind = Callgrind::find().expect("valgrind (make deps installs it)");
        let dir = std::env::temp_dir().join(format!("sl-callgrind-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let count = |rounds: &str| {
            let mut prefix = callgrind.prefix(&dir);
            let valgrind = prefix.remove(0);
            // A shell loop under callgrind: counting on for its whole life.
            let status = Command::new(valgrind)
                .args(prefix.iter().filter(|a| !a.starts_with("--instr-atstart")))
                .args([
                    "sh",
                    "-c",
                    &format!("i=0; while [ $i -lt {rounds} ]; do i=$((i+1)); done"),
                ])
                .output()
                .unwrap();
            assert!(
                status.status.success(),
                "{}",
                String::from_utf8_lossy(&status.stderr)
            );
            let text = fs::read_to_string(dir.join("callgrind.out")).unwrap();
            parse_total(&text).unwrap()
        };
        let (a, b, more) = (count("1000"), count("1000"), count("2000"));
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(a, b);
        assert!(more > a, "{more} after {a}");
    }
}
