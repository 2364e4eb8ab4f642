//! Conntrack exhaustion: the pod namespace's conntrack table is filled until
//! only `free` entries are left, then `connections` connections are opened
//! through the scenario's interceptor, each proven with one echo and held
//! until every attempt has ended. The share that got through says which
//! modes keep working when a busy pod's table is full.
//!
//! The experiment the issue describes lowers `nf_conntrack_max` in the pod
//! namespace, but on this kernel that sysctl is read-only (0444) in every
//! namespace but the machine's own, which the benchmark must not change. The
//! kernel compares each namespace's own `nf_conntrack_count` with the global
//! `nf_conntrack_max`, though, so the same state is reached by filling the
//! pod namespace's table: `conntrack -R` (conntrack-tools, run inside the
//! namespace) loads fake ESTABLISHED entries marked ASSURED, which the kernel
//! never early-drops to make room, so they really hold their slots. They go
//! from 198.19.x.y to 198.18.255.254:7, addresses no topology uses; [`Fill`]
//! deletes exactly those when dropped, and they would go with the namespace
//! anyway.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use netlab::Netns;
use serde::Serialize;

use super::hold::Opening;
use super::Errors;

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Params {
    /// Entries left free in the pod namespace's conntrack table.
    pub free: u64,
    pub connections: usize,
    /// Handshakes in flight at once.
    pub parallel: usize,
}

/// A dropped SYN is sent again after 1 s and 3 s: 3 s gives each connection
/// its first SYN and one retransmission, and keeps a run in which most SYNs
/// are dropped to seconds. The echo that proves a connection is bounded by
/// [`super::IO_TIMEOUT`] as in the other loads.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Where the fake entries go; nothing in a topology uses this address.
const FAKE_DST: &str = "198.18.255.254";
const FAKE_DPORT: u16 = 7;
/// Far longer than any load: entries of the fill must not expire mid-load.
const FAKE_TIMEOUT_S: u32 = 600;
/// Filling costs about 20 µs and 300 bytes of kernel memory per entry; a
/// machine whose table is this much larger needs a different experiment.
const MOST_ENTRIES: u64 = 1 << 21;
/// `conntrack -R` of 260,000 entries takes about 5 s here.
const CONNTRACK_WITHIN: Duration = Duration::from_secs(120);
/// After closing: long enough for FINs to be exchanged through the proxy.
const SETTLE: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub params: Params,
    pub connect_timeout_s: f64,
    pub conntrack_max: u64,
    /// Entries the pod namespace held when the load began (closed
    /// connections of earlier loads), flushed before the fill.
    pub conntrack_found: u64,
    /// Fake entries the fill added.
    pub filled: u64,
    /// `nf_conntrack_max − nf_conntrack_count` once filled: the room the
    /// connections actually had.
    pub free: u64,
    pub attempted: usize,
    /// Connections established and proven with an echo.
    pub succeeded: usize,
    /// succeeded / attempted.
    pub share: f64,
    /// `nf_conntrack_count` once filled, before the first connection.
    pub conntrack_before: u64,
    /// With every connection that got through still open.
    pub conntrack_after: u64,
    /// Once the connections were closed and the fill removed.
    pub conntrack_cleaned: u64,
    pub errors: Errors,
    /// From the first connection attempt to the last attempt's end.
    pub elapsed_s: f64,
}

impl Report {
    pub fn summary(&self) -> String {
        let errors = if self.errors.total() == 0 {
            String::new()
        } else {
            format!(", failures {:?}", self.errors.0)
        };
        format!(
            "{}/{} got through ({:.1}%) with {} free conntrack entries, in {:.1} s; \
             conntrack {} → {} (max {}), {} after removing the fill{errors}",
            self.succeeded,
            self.attempted,
            self.share * 100.0,
            self.free,
            self.elapsed_s,
            self.conntrack_before,
            self.conntrack_after,
            self.conntrack_max,
            self.conntrack_cleaned,
        )
    }
}

impl crate::run::Figures for Report {
    fn error_count(&self) -> u64 {
        self.errors.total()
    }
    fn merge(&mut self, _: Self) -> Result<()> {
        bail!("the exhaustion load runs once; its counts do not merge")
    }
}

/// Runs the load against `target` (in `pod`, reached from `client`).
///
/// The pod's table is flushed first: entries of earlier loads' closed
/// connections (TIME_WAIT lasts 120 s in conntrack) would otherwise expire
/// during the load and give it more room than it was meant to have. Nothing
/// is open in a scenario between loads, so only that bookkeeping goes; the
/// load leaves the table as a fresh namespace has it, apart from its own
/// closed connections.
pub fn run(pod: &Netns, client: &Netns, target: SocketAddr, params: Params) -> Result<Report> {
    ensure!(params.connections > 0 && params.parallel > 0);
    let conntrack = program()?;
    let conntrack_found = count(pod)?;
    run_conntrack(pod, &conntrack, &["-F"], None)
        .context("flushing the pod namespace's conntrack table before the fill")?;
    let fill = Fill::leaving(pod, &conntrack, params.free)?;
    let conntrack_before = count(pod)?;
    let free = fill.max.saturating_sub(conntrack_before);
    let start = Instant::now();
    let (succeeded, errors, conntrack_after) = client.try_run(|| -> Result<_> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the client's tokio runtime")?;
        runtime.block_on(async {
            let mut streams = Vec::with_capacity(params.connections);
            let mut errors = Errors::default();
            let opening = Opening {
                target,
                indexes: 0..params.connections as u64,
                parallel: params.parallel,
                connect_timeout: CONNECT_TIMEOUT,
            };
            opening.run(&mut streams, &mut errors).await;
            let held = count(pod);
            let succeeded = streams.len();
            drop(streams);
            tokio::time::sleep(SETTLE).await;
            Ok((succeeded, errors, held?))
        })
    })??;
    let elapsed_s = start.elapsed().as_secs_f64();
    let max = fill.max;
    let filled = fill.added;
    fill.remove()?;
    Ok(Report {
        params,
        connect_timeout_s: CONNECT_TIMEOUT.as_secs_f64(),
        conntrack_max: max,
        conntrack_found,
        filled,
        free,
        attempted: params.connections,
        succeeded,
        share: succeeded as f64 / params.connections as f64,
        conntrack_before,
        conntrack_after,
        conntrack_cleaned: count(pod)?,
        errors,
        elapsed_s,
    })
}

/// Fake entries in one namespace's conntrack table; dropping the guard
/// deletes them (and only them).
pub struct Fill<'a> {
    ns: &'a Netns,
    conntrack: PathBuf,
    /// `nf_conntrack_max` as the namespace sees it.
    pub max: u64,
    pub added: u64,
    removed: bool,
}

impl<'a> Fill<'a> {
    /// Adds entries until `free` of `nf_conntrack_max` are left.
    pub fn leaving(ns: &'a Netns, conntrack: &Path, free: u64) -> Result<Fill<'a>> {
        let max = sysctl(ns, "nf_conntrack_max")?;
        let current = count(ns)?;
        let Some(added) = max.checked_sub(current).and_then(|n| n.checked_sub(free)) else {
            bail!(
                "the conntrack table of namespace {} has {} free entries (max {max}, count \
                 {current}), fewer than the {free} the load should leave; nothing was added",
                ns.name(),
                max.saturating_sub(current)
            );
        };
        ensure!(
            added <= MOST_ENTRIES,
            "filling the conntrack table of namespace {} would take {added} entries \
             (nf_conntrack_max is {max}); at most {MOST_ENTRIES} are added, to keep the \
             load's time and kernel memory bounded",
            ns.name()
        );
        // The guard exists before the first entry: a fill that fails half way
        // is still removed.
        let fill = Fill {
            ns,
            conntrack: conntrack.to_path_buf(),
            max,
            added,
            removed: false,
        };
        run_conntrack(ns, conntrack, &["-R", "/dev/stdin"], Some(&entries(added))).with_context(
            || {
                format!(
                    "filling the conntrack table of namespace {} with {added} entries \
                     (max {max}, count was {current})",
                    ns.name()
                )
            },
        )?;
        Ok(fill)
    }

    /// Deletes the fake entries, saying so when that fails.
    pub fn remove(mut self) -> Result<()> {
        self.removed = true;
        self.delete()
    }

    fn delete(&self) -> Result<()> {
        let port = FAKE_DPORT.to_string();
        let filter = ["-D", "-p", "tcp", "-d", FAKE_DST, "--dport", &port];
        // Exit status 1 means nothing was deleted, which is no failure (a
        // fill that failed before its first entry): what is left is listed.
        let _ = run_conntrack(self.ns, &self.conntrack, &filter, None);
        let left = run_conntrack(
            self.ns,
            &self.conntrack,
            &["-L", "-p", "tcp", "-d", FAKE_DST, "--dport", &port],
            None,
        );
        match left.map(|listed| listed.lines().count()) {
            Ok(0) => Ok(()),
            Ok(n) => bail!(
                "{n} fake conntrack entries are left in namespace {} after deleting them \
                 (they expire in {FAKE_TIMEOUT_S} s, and go with the namespace)",
                self.ns.name()
            ),
            Err(e) => Err(e.context(format!(
                "counting the fake conntrack entries left in namespace {}",
                self.ns.name()
            ))),
        }
    }
}

impl Drop for Fill<'_> {
    fn drop(&mut self) {
        if !self.removed {
            if let Err(e) = self.delete() {
                eprintln!("sluice-bench: {e:#}");
            }
        }
    }
}

/// `conntrack` command lines for `n` distinct entries: 65,536 sources times
/// as many source ports as needed.
fn entries(n: u64) -> Vec<u8> {
    let mut text = Vec::with_capacity(n as usize * 160);
    for i in 0..n {
        let _ = writeln!(
            text,
            "-I -p tcp -s 198.19.{}.{} -d {FAKE_DST} --sport {} --dport {FAKE_DPORT} \
             --state ESTABLISHED --status ASSURED,SEEN_REPLY --timeout {FAKE_TIMEOUT_S}",
            (i >> 8) & 0xff,
            i & 0xff,
            40_000 + (i >> 16),
        );
    }
    text
}

fn program() -> Result<PathBuf> {
    crate::scenario::find_program("conntrack").context(
        "the conntrack command (conntrack-tools) is not installed: apt-get install conntrack \
         (make deps installs it)",
    )
}

fn sysctl(ns: &Netns, name: &str) -> Result<u64> {
    let key = format!("net.netfilter.{name}");
    let value = ns.sysctl_get(&key).with_context(|| {
        format!("reading {key} (is the nf_conntrack module loaded? modprobe nf_conntrack)")
    })?;
    value
        .parse()
        .with_context(|| format!("{key} in namespace {} is {value:?}", ns.name()))
}

fn count(ns: &Netns) -> Result<u64> {
    sysctl(ns, "nf_conntrack_count")
}

/// Runs `conntrack ARGS` in `ns`, feeding it `input`; its stdout on success.
/// Output is not kept for `-D`, which prints every entry it deletes.
fn run_conntrack(
    ns: &Netns,
    program: &Path,
    args: &[&str],
    input: Option<&[u8]>,
) -> Result<String> {
    let line = format!("conntrack {}", args.join(" "));
    let keep_stdout = args.first() != Some(&"-D");
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(if keep_stdout {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(Stdio::piped());
    let mut child = ns
        .spawn(&mut command)
        .with_context(|| format!("running {line} in namespace {}", ns.name()))?;
    if let Some(input) = input {
        if let Some(mut stdin) = child.child_mut().stdin.take() {
            // A write error means conntrack stopped reading: its exit status
            // and message below say why.
            let _ = stdin.write_all(input);
        }
    }
    let output = child
        .wait_output(CONNTRACK_WITHIN)
        .with_context(|| format!("running {line} in namespace {}", ns.name()))?;
    if !output.status.success() {
        bail!(
            "{line} in namespace {} failed ({}): {}",
            ns.name(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::testing::Lab;

    /// A few entries of the namespace's own, which the fill must leave alone.
    fn own_entries(ns: &Netns, conntrack: &Path, n: u64) {
        let mut text = Vec::new();
        for i in 0..n {
            writeln!(
                text,
                "-I -p tcp -s 198.19.200.{i} -d 198.18.255.253 --sport 1000 --dport 80 \
                 --state ESTABLISHED --status ASSURED,SEEN_REPLY --timeout 600"
            )
            .unwrap();
        }
        run_conntrack(ns, conntrack, &["-R", "/dev/stdin"], Some(&text)).unwrap();
    }

    #[test]
    fn fill_leaves_what_was_asked_and_only_removes_its_own() {
        let ns = Netns::new("t-exh-fill").unwrap();
        let conntrack = program().unwrap();
        own_entries(&ns, &conntrack, 5);
        let before = count(&ns).unwrap();
        assert_eq!(before, 5);
        let max = sysctl(&ns, "nf_conntrack_max").unwrap();
        let fill = Fill::leaving(&ns, &conntrack, 100).unwrap();
        assert_eq!(fill.added, max - 5 - 100);
        assert_eq!(max - count(&ns).unwrap(), 100);
        // The table really is full past those 100: one more fill of 101 fails
        // and says so, adding nothing.
        let e = Fill::leaving(&ns, &conntrack, 101).err().unwrap();
        assert!(format!("{e:#}").contains("fewer than the 101"), "{e:#}");
        drop(fill);
        assert_eq!(count(&ns).unwrap(), before);
    }

    #[test]
    fn fill_that_fails_is_an_error_and_removed() {
        let ns = Netns::new("t-exh-fail").unwrap();
        // Not the conntrack CLI: the fill must fail, say what, and leave nothing.
        let e = Fill::leaving(&ns, Path::new("/bin/false"), 10)
            .err()
            .unwrap();
        assert!(
            format!("{e:#}").contains("filling the conntrack table"),
            "{e:#}"
        );
        assert_eq!(count(&ns).unwrap(), 0);
    }

    /// With nothing in the pod namespace using conntrack, a full table costs
    /// nothing; with a conntrack match in INPUT, only `free` connections fit.
    #[test]
    fn only_a_conntrack_user_runs_out() {
        let lab = Lab::new("t-exh", Duration::ZERO);
        let (pod, client) = (&lab.topology.pod, &lab.topology.client);
        let params = Params {
            free: 16,
            connections: 48,
            parallel: 48,
        };
        let report = run(pod, client, lab.target(), params).unwrap();
        assert_eq!(report.succeeded, 48, "{}", report.summary());
        assert_eq!(report.free, 16);
        assert_eq!(report.conntrack_after, report.conntrack_before);
        assert_eq!(report.conntrack_cleaned, 0, "{}", report.summary());

        let mut iptables = Command::new("iptables");
        iptables.args([
            "-A",
            "INPUT",
            "-p",
            "tcp",
            "-m",
            "conntrack",
            "--ctstate",
            "NEW,ESTABLISHED",
            "-j",
            "ACCEPT",
        ]);
        let out = pod.output(&mut iptables).unwrap();
        assert!(out.status.success(), "{out:?}");
        let report = run(pod, client, lab.target(), params).unwrap();
        eprintln!("with a conntrack match: {}", report.summary());
        // One entry per connection (no NAT, no second leg): at most 16 fit.
        assert!((1..=16).contains(&report.succeeded), "{}", report.summary());
        assert!(report.errors.total() >= 32, "{}", report.summary());
        assert!(report.conntrack_after >= report.conntrack_before);
        assert!(report.conntrack_cleaned <= 48, "{}", report.summary());
    }
}
