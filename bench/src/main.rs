//! `sluice-bench`: the comparison behind `make bench`.
//!
//! Runs every scenario (direct, sluice's interception modes, HAProxy) one
//! after the other on the same topology and loads, then writes
//! `OUT/<date>-<host>/results.json`, SVG plots next to it, and `OUT/README.md`
//! with the tables. Exits non-zero when a scenario or load failed or a
//! connection bypassed an interceptor — after writing everything.

mod load;
mod machine;
mod plot;
mod procstat;
mod profile;
mod report;
mod run;
mod scenario;
mod sysload;
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use nix::sys::resource::{getrlimit, setrlimit, Resource};

use crate::machine::Machine;
use crate::profile::{LoadKind, Profile, ProfileName};
use crate::scenario::{Patience, Scenario, Tools};

#[derive(Debug, Parser)]
#[command(
    name = "sluice-bench",
    about = "Compare direct, sluice's modes and HAProxy"
)]
struct Cli {
    /// The sluice binary to benchmark.
    #[arg(long, default_value = "target/release/sluice")]
    sluice: PathBuf,
    /// Where README.md and the run's directory go.
    #[arg(long, default_value = "results")]
    out: PathBuf,
    /// How long and how big: smoke (seconds), quick (~4 min), default (~20 min).
    #[arg(long, env = "BENCH_PROFILE", value_enum, default_value = "default")]
    profile: ProfileName,
    /// Scenarios to run, comma-separated [default: all]: direct, redirect,
    /// tproxy, tproxy-splice, tproxy-sockmap, ebpf, ebpf-splice, ebpf-sockmap,
    /// haproxy, and the policy-size variants (CRR only) tproxy-excl1,
    /// tproxy-excl100, tproxy-excl1000, ebpf-excl1, ebpf-excl100,
    /// ebpf-excl1000. `direct` always runs (it is what the ratios compare with).
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<String>,
    /// Extra sluice scenario, NAME=ARGS for `sluice run ARGS` (repeatable),
    /// e.g. --scenario 'redirect-splice=--mode redirect --forward splice'.
    #[arg(long = "scenario")]
    custom: Vec<String>,
    /// Loads to run, comma-separated [default: all]: concurrency, rr, bulk, crr,
    /// exhaustion.
    #[arg(long, value_delimiter = ',', value_enum)]
    loads: Vec<LoadKind>,
    /// The HAProxy binary [default: haproxy from PATH or /usr/sbin]; when
    /// there is none, the haproxy scenario is reported as skipped.
    #[arg(long)]
    haproxy: Option<PathBuf>,
    /// Data-path threads of each interceptor [default: one per core].
    #[arg(long)]
    workers: Option<usize>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match bench(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("sluice-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Ok(false): the run completed, but something in it failed.
fn bench(cli: Cli) -> Result<bool> {
    let mut profile = Profile::new(cli.profile);
    if !cli.loads.is_empty() {
        profile.loads.retain(|l| cli.loads.contains(l));
    }
    let scenarios = select(&cli.scenarios, &cli.custom)?;
    if !cli.sluice.is_file() {
        bail!(
            "no sluice binary at {} (build it: cargo build --release -p sluice)",
            cli.sluice.display()
        );
    }
    let mut notes = Vec::new();
    let fd_limit = raise_fd_limit(profile.max_connections())?;
    // An interceptor holds two descriptors per connection, and so does this
    // process (client and workload ends).
    let fits = usize::try_from(fd_limit.saturating_sub(FD_MARGIN) / 2).unwrap_or(usize::MAX);
    if profile.hold.connections > fits {
        let note = format!(
            "The concurrency load holds {fits} connections instead of {}: the open-file limit \
             (RLIMIT_NOFILE) is {fd_limit} and cannot be raised here (no CAP_SYS_RESOURCE), and \
             the interceptor needs two descriptors per connection.",
            profile.hold.connections
        );
        eprintln!("sluice-bench: {note}");
        notes.push(note);
        profile.hold.connections = fits;
    }
    let haproxy = match cli.haproxy {
        Some(path) => path.is_file().then_some(path),
        None => scenario::find_program("haproxy"),
    };
    let machine = Machine::describe(haproxy.as_deref());
    let tools = Tools {
        sluice: std::fs::canonicalize(&cli.sluice)
            .with_context(|| format!("resolving {}", cli.sluice.display()))?,
        haproxy,
        workers: cli.workers.unwrap_or(machine.cores).max(1),
        max_connections: profile.max_connections() + 100,
        scratch: std::env::temp_dir(),
        patience: Patience::new(profile.wait_budget),
    };
    eprintln!(
        "sluice-bench: profile {}, {} scenarios ({}), {} cores, kernel {}",
        profile.name,
        scenarios.len(),
        scenarios
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        machine.cores,
        machine.kernel
    );
    let start = Instant::now();
    let conntrack_max = conntrack_max();
    let results = run::all(&scenarios, &tools, &profile);
    let run = report::Run {
        machine,
        profile,
        conntrack_max,
        fd_limit,
        notes,
        wait_budget_left_s: tools.patience.left().as_secs_f64(),
        elapsed_s: start.elapsed().as_secs_f64(),
        scenarios: results,
    };
    let run_dir = cli
        .out
        .join(format!("{}-{}", run.machine.day(), run.machine.hostname));
    report::write(&run, &cli.out, &run_dir)?;
    eprintln!(
        "sluice-bench: {:.0} s; wrote {} and {}",
        run.elapsed_s,
        cli.out.join("README.md").display(),
        run_dir.display()
    );
    let problems = run.problems();
    for p in &problems {
        eprintln!("sluice-bench: PROBLEM: {p}");
    }
    Ok(problems.is_empty())
}

/// The scenarios to run, `direct` first.
fn select(names: &[String], custom: &[String]) -> Result<Vec<Scenario>> {
    let builtin = Scenario::builtin();
    let mut chosen: Vec<Scenario> = if names.is_empty() {
        builtin.clone()
    } else {
        let mut chosen = Vec::new();
        for name in names {
            let Some(s) = builtin.iter().find(|s| &s.name == name) else {
                let known: Vec<_> = builtin.iter().map(|s| s.name.as_str()).collect();
                bail!("unknown scenario {name:?}; known: {}", known.join(", "));
            };
            chosen.push(s.clone());
        }
        chosen
    };
    for spec in custom {
        chosen.push(Scenario::parse_custom(spec)?);
    }
    chosen.retain(|s| !s.is_direct());
    chosen.insert(0, builtin[0].clone());
    let mut seen = std::collections::BTreeSet::new();
    for s in &chosen {
        if !seen.insert(&s.name) {
            bail!("scenario {:?} given twice", s.name);
        }
    }
    Ok(chosen)
}

/// Descriptors besides the connections: listeners, io_uring, pipes, logs.
const FD_MARGIN: u64 = 1024;

/// Raises RLIMIT_NOFILE for `connections` held connections and returns the
/// limit in force. Both ends of every held connection live in this process
/// (client and workload), and the interceptors, spawned later, inherit it.
/// Without CAP_SYS_RESOURCE only the soft limit can go up, to the hard one.
fn raise_fd_limit(connections: usize) -> Result<u64> {
    let wanted = connections as u64 * 2 + FD_MARGIN;
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit(RLIMIT_NOFILE)")?;
    if soft >= wanted {
        return Ok(soft);
    }
    if hard < wanted && setrlimit(Resource::RLIMIT_NOFILE, wanted, wanted).is_ok() {
        return Ok(wanted);
    }
    let soft = wanted.min(hard);
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard)
        .with_context(|| format!("raising RLIMIT_NOFILE to {soft}"))?;
    Ok(soft)
}

/// The table size a fresh namespace sees; read-only there (see README).
fn conntrack_max() -> Option<u64> {
    let ns = netlab::Netns::new("b-probe").ok()?;
    ns.sysctl_get("net.netfilter.nf_conntrack_max")
        .ok()?
        .parse()
        .ok()
}
