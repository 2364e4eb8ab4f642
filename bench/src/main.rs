//! `sluice-bench`: the comparison behind `make bench`, and the regression
//! check behind `make bench-check`.
//!
//! Without a subcommand, runs every scenario (direct, sluice's interception
//! modes, HAProxy) one after the other on the same topology and loads, then
//! writes `OUT/<date>-<host>/results.json`, SVG plots next to it, and
//! `OUT/README.md` with the tables. Exits non-zero when a scenario or load
//! failed or a connection bypassed an interceptor — after writing
//! everything.
//!
//! `check` runs the baseline's profile and compares with the baseline;
//! `baseline` makes one from several runs (see `check.rs`). Their runs go
//! under `--work` (in target/), never over the committed results.

mod ab;
mod callgrind;
mod check;
mod load;
mod machine;
mod perf;
mod plot;
mod procstat;
mod profile;
mod report;
mod run;
mod scenario;
mod stats;
mod sysload;
mod workload;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::signal::{SigSet, Signal};

use crate::check::Baseline;
use crate::load::redis;
use crate::machine::Machine;
use crate::profile::{LoadKind, Profile, ProfileName};
use crate::scenario::{Interceptor, Patience, Scenario, Tools};

#[derive(Debug, Parser)]
#[command(
    name = "sluice-bench",
    about = "Compare direct, sluice's modes and HAProxy",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    bench: BenchArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the baseline's profile and compare with the baseline; exits
    /// non-zero on a regression, a missing figure, an error or a bypass.
    Check(CheckArgs),
    /// Write a baseline from several runs of the check profile.
    Baseline(BaselineArgs),
    /// `make profile`: one scenario under CRR, its interceptor recorded by
    /// `perf record` (for a flame graph) and its syscalls counted.
    Profile(ProfileArgs),
}

/// What every run needs: the binaries and the scenarios.
#[derive(Debug, Clone, Args)]
struct Setup {
    /// The sluice binary to benchmark.
    #[arg(long, default_value = "target/release/sluice")]
    sluice: PathBuf,
    /// Scenarios to run, comma-separated [default: all; for check and
    /// baseline, all but haproxy, the Istio captures and the policy-size
    /// variants]: direct, redirect, tproxy, tproxy-splice, tproxy-sockmap,
    /// tproxy-bypass (the connection to the workload from 127.0.0.6), ebpf,
    /// ebpf-splice, ebpf-sockmap, haproxy, istio-tproxy and istio-sluice
    /// (sluice as an Istio pod's mesh proxy behind Istio's own `-m TPROXY`
    /// rules, or behind `sluice istio-iptables`), and the policy-size
    /// variants (CRR only)
    /// tproxy-excl1, tproxy-excl100, tproxy-excl1000, ebpf-excl1,
    /// ebpf-excl100, ebpf-excl1000. `direct` always runs (it is what the
    /// ratios compare with).
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<String>,
    /// Extra sluice scenario, NAME=ARGS for `sluice run ARGS` (repeatable),
    /// e.g. --scenario 'redirect-splice=--mode redirect --forward splice'.
    #[arg(long = "scenario")]
    custom: Vec<String>,
    /// The HAProxy binary [default: haproxy from PATH or /usr/sbin]; when
    /// there is none, the haproxy scenario is reported as skipped.
    #[arg(long)]
    haproxy: Option<PathBuf>,
    /// Data-path threads of each interceptor [default: one per core].
    #[arg(long)]
    workers: Option<usize>,
}

#[derive(Debug, Args)]
struct BenchArgs {
    #[command(flatten)]
    setup: Setup,
    /// Where README.md and the run's directory go [default: results for
    /// the default profile, target/bench-PROFILE for the others: a short
    /// run must not replace the committed report].
    #[arg(long, env = "BENCH_OUT")]
    out: Option<PathBuf>,
    /// How long and how big: smoke (seconds), quick (~4 min), default (~20
    /// min), check (what `make bench-check` runs).
    #[arg(long, env = "BENCH_PROFILE", value_enum, default_value = "default")]
    profile: ProfileName,
    /// Loads to run, comma-separated [default: all]: concurrency, rr, bulk, crr,
    /// redis, exhaustion.
    #[arg(long, value_delimiter = ',', value_enum)]
    loads: Vec<LoadKind>,
}

#[derive(Debug, Args)]
struct CheckArgs {
    #[command(flatten)]
    setup: Setup,
    /// The committed baseline (`make bench-baseline` writes it).
    #[arg(long, default_value = "results/baseline.json")]
    baseline: PathBuf,
    /// Where the run's results.json and README.md go.
    #[arg(long, default_value = "target/bench-check")]
    work: PathBuf,
    /// Runs more, at most, to confirm a regression of figures with a
    /// tolerance: a figure fails only if every run is beyond it.
    #[arg(long, default_value_t = 2)]
    confirm: usize,
    /// The base build's sluice: judge head against it, the two run in turns
    /// on this machine (see ab.rs); without it, against --baseline.
    #[arg(long)]
    base_sluice: Option<PathBuf>,
    /// What the base build is (its commit), for the log.
    #[arg(long, default_value = "base")]
    base_name: String,
    /// Why there is no base build, for the log (`make bench-check` says).
    #[arg(long)]
    no_base: Option<String>,
    /// A/B: timed pairs (a run of each build) at least; 4 or more.
    #[arg(long, default_value_t = ab::MIN_PAIRS)]
    min_pairs: usize,
    /// A/B: timed pairs at most, while figures are undecided.
    #[arg(long, default_value_t = ab::MAX_PAIRS)]
    max_pairs: usize,
    /// A/B: minutes of timed pairs after which no further pair starts
    /// (the minimum always runs).
    #[arg(long, default_value_t = ab::BUDGET_MINUTES)]
    budget_minutes: f64,
}

#[derive(Debug, Args)]
struct BaselineArgs {
    #[command(flatten)]
    setup: Setup,
    /// How many runs: the spread between them sets the tolerances.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// The baseline to write.
    #[arg(long, default_value = "results/baseline.json")]
    out: PathBuf,
    /// The profile of the runs, which `check` then runs too (smoke is for
    /// trying the pipeline, not for a committed baseline).
    #[arg(long, value_enum, default_value = "check")]
    profile: ProfileName,
    /// Where each run's results.json and README.md go.
    #[arg(long, default_value = "target/bench-baseline")]
    work: PathBuf,
}

#[derive(Debug, Args)]
struct ProfileArgs {
    /// The sluice binary to profile.
    #[arg(long, default_value = "target/release/sluice")]
    sluice: PathBuf,
    /// The scenario: a built-in one with an interceptor (see `--scenarios`
    /// of the comparison), or NAME=ARGS for `sluice run ARGS`.
    #[arg(long, env = "PROFILE_SCENARIO", default_value = "tproxy")]
    scenario: String,
    /// Seconds of each CRR pass (recorded, counted, traced).
    #[arg(long, env = "PROFILE_SECONDS", default_value_t = 5.0)]
    seconds: f64,
    /// Parallel CRR clients (the default profile's).
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Where `<scenario>.perf.data` goes (large; not for committing).
    #[arg(long, default_value = "target/profile")]
    work: PathBuf,
    /// Where `<scenario>.txt`, the syscall counts, goes.
    #[arg(long, default_value = "results/profile")]
    out: PathBuf,
    /// The HAProxy binary, for the haproxy scenario.
    #[arg(long)]
    haproxy: Option<PathBuf>,
    /// Data-path threads of the interceptor [default: one per core].
    #[arg(long)]
    workers: Option<usize>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = clean_up_on_signal() {
        eprintln!("sluice-bench: {e:#}");
        return ExitCode::FAILURE;
    }
    let outcome = match cli.command {
        None => bench(cli.bench),
        Some(Command::Check(args)) => check(args),
        Some(Command::Baseline(args)) => baseline(args),
        Some(Command::Profile(args)) => profile(args),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("sluice-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// On SIGINT, SIGTERM or SIGHUP (Ctrl-C, CI's timeout, a closed terminal),
/// removes this run's namespaces and exits: the guards on the main thread
/// would never run, and the namespaces would stay until the next run's
/// stale sweep. The interceptors and workloads inside die with this process
/// (`PR_SET_PDEATHSIG`), and their rules and BPF links with their namespace.
///
/// The signals are blocked before any other thread exists, so every thread
/// inherits the mask and only the dedicated one takes them; spawned programs
/// start with an empty mask (std resets it), so sluice still gets its SIGTERM.
fn clean_up_on_signal() -> Result<()> {
    let mut signals = SigSet::empty();
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        signals.add(signal);
    }
    signals
        .thread_block()
        .context("blocking SIGINT, SIGTERM and SIGHUP for the signal thread")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let Ok(signal) = signals.wait() else {
                return;
            };
            eprintln!("sluice-bench: {signal}: removing this run's namespaces and stopping");
            netlab::remove_own_namespaces();
            std::process::exit(128 + signal as i32);
        })
        .context("starting the signal thread")?;
    Ok(())
}

/// `make bench`. Ok(false): the run completed, but something in it failed.
fn bench(args: BenchArgs) -> Result<bool> {
    let mut profile = Profile::new(args.profile);
    if !args.loads.is_empty() {
        profile.loads.retain(|l| args.loads.contains(l));
    }
    let scenarios = select(&args.setup.scenarios, &args.setup.custom)?;
    let out = args.out.unwrap_or_else(|| default_out(args.profile));
    let run = measure(&args.setup, profile, scenarios)?;
    let run_dir = out.join(format!("{}-{}", run.machine.day(), run.machine.hostname));
    report::write(&run, &out, &run_dir)?;
    eprintln!(
        "sluice-bench: {:.0} s; wrote {} and {}",
        run.elapsed_s,
        out.join("README.md").display(),
        run_dir.display()
    );
    let problems = run.problems();
    for p in &problems {
        eprintln!("sluice-bench: PROBLEM: {p}");
    }
    Ok(problems.is_empty())
}

/// Where `make bench` writes when not told: only the default profile's run
/// is the committed report; a short profile's goes under target/.
fn default_out(profile: ProfileName) -> PathBuf {
    match profile {
        ProfileName::Default => PathBuf::from("results"),
        other => PathBuf::from(format!("target/bench-{other}")),
    }
}

/// `make bench-check`: Ok(false) on a regression or a missing figure.
fn check(args: CheckArgs) -> Result<bool> {
    if let Some(base) = args.base_sluice.clone() {
        return ab_check(args, base);
    }
    if let Some(why) = &args.no_base {
        eprintln!("sluice-bench: NO A/B: {why}");
    }
    eprintln!(
        "sluice-bench: no base build to compare with: judging against the committed baseline \
         {} instead (another machine's and day's figures; see README)",
        args.baseline.display()
    );
    let text = match std::fs::read_to_string(&args.baseline) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "no baseline at {}: make one on this kind of machine with `make bench-baseline` \
             (five check runs) and commit it",
            args.baseline.display()
        ),
        Err(e) => {
            return Err(e).with_context(|| format!("reading {}", args.baseline.display()));
        }
    };
    let baseline: Baseline = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a baseline this sluice-bench reads; rewrite it with `make bench-baseline`",
            args.baseline.display()
        )
    })?;
    let here = Machine::describe(None);
    let b = &baseline.machine;
    eprintln!(
        "sluice-bench: baseline of {} runs, profile {}, commit {} on {} ({}, {} cores, {})",
        baseline.runs, baseline.profile, b.commit, b.hostname, b.cpu_model, b.cores, b.date
    );
    if (b.cpu_model.as_str(), b.cores) != (here.cpu_model.as_str(), here.cores) {
        eprintln!(
            "sluice-bench: NOTE: this machine ({}, {} cores) is not the baseline's; the ratios \
             travel, but the tolerances were set by the baseline machine's noise",
            here.cpu_model, here.cores
        );
    }
    let scenarios = select(&check_scenarios(&args.setup), &args.setup.custom)?;
    let start = Instant::now();
    let mut runs = Vec::new();
    let mut dirs = Vec::new();
    let comparison = loop {
        let run = measure(
            &args.setup,
            Profile::new(baseline.profile),
            scenarios.clone(),
        )?;
        let dir = args.work.join(format!("run-{}", runs.len() + 1));
        report::write(&run, &args.work, &dir)?;
        for p in run.problems() {
            eprintln!("sluice-bench: PROBLEM: {p}");
        }
        if let Some(note) = disturbance(&run) {
            eprintln!("sluice-bench: NOTE: {note}");
        }
        runs.push(check::figures(&run));
        dirs.push(dir.display().to_string());
        let comparison = check::compare(&baseline, &check::best_of(&runs));
        if !comparison.worth_confirming() || runs.len() > args.confirm {
            break comparison;
        }
        print!("{}", check::table(&comparison));
        println!(
            "bench-check: {} figures beyond tolerance in run {}; running again to tell a \
             regression from noise (each figure is then judged by its best run)",
            comparison.failures(),
            runs.len()
        );
    };
    print!("{}", check::table(&comparison));
    let what = format!(
        "{} figures, {} run{} in {:.0} s: {}",
        comparison.rows.len(),
        runs.len(),
        if runs.len() == 1 {
            ""
        } else {
            "s, each figure at its best"
        },
        start.elapsed().as_secs_f64(),
        dirs.join(", ")
    );
    if comparison.passed() {
        println!("bench-check: PASS ({what})");
    } else {
        println!(
            "bench-check: FAIL: {} regressed or missing ({what}). If the change is intended, \
             rewrite the baseline with `make bench-baseline` and commit it with the change.",
            comparison.failures()
        );
    }
    Ok(comparison.passed())
}

/// `make bench-check` with a base build: the A/B of `ab.rs`. Ok(false) on
/// a regression, a missing figure or a problem in a head run.
fn ab_check(args: CheckArgs, base: PathBuf) -> Result<bool> {
    if stats::moses_rank(args.min_pairs, args.min_pairs, ab::ALPHA) == 0 {
        bail!(
            "--min-pairs {}: too few runs for a 95% interval (4 at least)",
            args.min_pairs
        );
    }
    let plan = ab::Plan {
        min_pairs: args.min_pairs,
        max_pairs: args.max_pairs.max(args.min_pairs),
        budget: Duration::try_from_secs_f64(args.budget_minutes * 60.0)
            .context("--budget-minutes")?,
    };
    let scenarios = select(&check_scenarios(&args.setup), &args.setup.custom)?;
    let head = args.setup.clone();
    let base = Setup {
        sluice: base,
        ..args.setup.clone()
    };
    eprintln!(
        "sluice-bench: A/B: head {} against base {} ({}), in turns on this machine; \
         {}-{} timed pairs",
        head.sluice.display(),
        base.sluice.display(),
        args.base_name,
        plan.min_pairs,
        plan.max_pairs
    );
    let dir = args.work.join("ab");
    if dir.exists() {
        // Only this check's runs: a table must not mix in an earlier one's.
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    let mut index = 0;
    let mut head_problems = Vec::new();
    let mut base_problems = 0;
    let outcome = ab::run(&plan, |side, pass| {
        index += 1;
        eprintln!("sluice-bench: A/B run {index}: {side}, {pass}");
        let setup = match side {
            ab::Side::Base => &base,
            ab::Side::Head => &head,
        };
        let run = measure(setup, ab::profile(pass), scenarios.clone())?;
        let run_dir = dir.join(format!("{index:02}-{side}-{pass}"));
        report::write(&run, &run_dir, &run_dir)?;
        for p in run.problems() {
            eprintln!("sluice-bench: PROBLEM in {side} run {index}: {p}");
            match side {
                ab::Side::Head => head_problems.push(format!("run {index}: {p}")),
                ab::Side::Base => base_problems += 1,
            }
        }
        Ok(ab::figures(&run, pass))
    })?;
    print!("{}", ab::table(&outcome));
    let json = serde_json::to_string_pretty(&outcome).context("serialising the A/B")?;
    write_file(&dir.join("ab.json"), &(json + "\n"))?;
    let what = format!("{}; runs in {}", ab::summary(&outcome), dir.display());
    if base_problems > 0 {
        // A base that could not run a scenario (a flag it does not know yet)
        // leaves head's figures there without a reference: shown as new.
        println!(
            "bench-check: NOTE: the base runs had {base_problems} problems (PROBLEM lines \
             above); a figure base lacks is shown as new and not judged"
        );
    }
    let passed = outcome.passed() && head_problems.is_empty();
    if passed {
        println!("bench-check: PASS against {}: {what}", args.base_name);
        if outcome.undecided() > 0 {
            println!(
                "bench-check: {} time figures undecided: the machine was too noisy to tell a \
                 change of their threshold in them (their intervals are in the table)",
                outcome.undecided()
            );
        }
    } else {
        for p in &head_problems {
            println!("bench-check: head run problem: {p}");
        }
        println!(
            "bench-check: FAIL against {}: {} figures regressed or missing, {} head run \
             problems ({what})",
            args.base_name,
            outcome.failures(),
            head_problems.len()
        );
    }
    Ok(passed)
}

/// How much of the run other processes disturbed, when any did: a
/// regression seen then may be theirs.
fn disturbance(run: &report::Run) -> Option<String> {
    let mut all = 0;
    let mut disturbed = 0;
    let mut worst = 0.0f64;
    for s in &run.scenarios {
        let l = &s.loads;
        let rounds =
            l.rr.iter()
                .flat_map(|x| &x.rounds)
                .chain(l.bulk.iter().flat_map(|x| &x.rounds))
                .chain(l.crr.iter().flat_map(|x| &x.rounds))
                .chain(l.redis.iter().flat_map(|x| &x.rounds));
        for r in rounds {
            all += 1;
            if r.interference.disturbed() {
                disturbed += 1;
                worst = worst.max(r.interference.other_cpu.max(r.interference.steal));
            }
        }
    }
    (disturbed > 0).then(|| {
        format!(
            "{disturbed} of {all} timed load rounds ran while other processes or guests used \
             the machine (up to {:.0}% of it); their figures are less trustworthy",
            worst * 100.0
        )
    })
}

/// `make bench-baseline`: several check runs into one baseline.
fn baseline(args: BaselineArgs) -> Result<bool> {
    if args.runs == 0 {
        bail!("--runs must be at least 1 (5 or more for a baseline worth committing)");
    }
    let scenarios = select(&check_scenarios(&args.setup), &args.setup.custom)?;
    let mut runs = Vec::new();
    let mut machine = None;
    let start = Instant::now();
    for i in 1..=args.runs {
        eprintln!("sluice-bench: baseline run {i} of {}", args.runs);
        let run = measure(&args.setup, Profile::new(args.profile), scenarios.clone())?;
        let dir = args.work.join(format!("run-{i}"));
        report::write(&run, &args.work, &dir)?;
        let problems = run.problems();
        if !problems.is_empty() {
            bail!(
                "baseline run {i} had problems (see {}); a baseline needs a healthy run:\n  {}",
                dir.display(),
                problems.join("\n  ")
            );
        }
        eprintln!("sluice-bench: run {i}: {:.0} s", run.elapsed_s);
        runs.push(check::figures(&run));
        machine.get_or_insert(run.machine);
    }
    let machine = machine.context("no run")?;
    let baseline = Baseline::from_runs(&runs, machine, args.profile)?;
    let json = serde_json::to_string_pretty(&baseline).context("serialising the baseline")?;
    write_file(&args.out, &(json + "\n"))?;
    eprint!("{}", check::summary(&baseline));
    eprintln!(
        "sluice-bench: wrote {} from {} runs in {:.0} s",
        args.out.display(),
        args.runs,
        start.elapsed().as_secs_f64()
    );
    Ok(true)
}

/// `make profile`: Ok(false) when a pass had errors.
fn profile(args: ProfileArgs) -> Result<bool> {
    let perf = perf::tool("perf").context("perf is not installed (make profile installs it)")?;
    let strace = perf::tool("strace");
    let custom: Vec<String> = args
        .scenario
        .contains('=')
        .then(|| args.scenario.clone())
        .into_iter()
        .collect();
    let names: Vec<String> = custom
        .is_empty()
        .then(|| args.scenario.clone())
        .into_iter()
        .collect();
    let scenario = select(&names, &custom)?
        .into_iter()
        .find(|s| !s.is_direct())
        .context("direct has no interceptor to profile")?;
    let mut load = Profile::new(ProfileName::Default);
    // CRR alone: HAProxy's maxconn (and its descriptors) sized for it, not
    // for the concurrency load's ten thousand.
    load.loads = vec![LoadKind::Crr];
    load.crr.clients = args.clients.max(1);
    load.crr.duration = Duration::try_from_secs_f64(args.seconds).context("--seconds")?;
    raise_fd_limit(load.crr.clients)?;
    let setup = Setup {
        sluice: args.sluice,
        scenarios: Vec::new(),
        custom: Vec::new(),
        haproxy: args.haproxy,
        workers: args.workers,
    };
    let (tools, machine) = tools(&setup, &load)?;
    std::fs::create_dir_all(&args.work)
        .with_context(|| format!("creating {}", args.work.display()))?;
    let data = args.work.join(format!("{}.perf.data", scenario.name));
    let seen = run::profile(
        &scenario,
        &tools,
        load.crr,
        (&perf, strace.as_deref()),
        &data,
    )?;
    let text = profile_text(&scenario.name, &machine, &seen);
    print!("{text}");
    write_file(&args.out.join(format!("{}.txt", scenario.name)), &text)?;
    eprintln!("sluice-bench: perf record data in {}", data.display());
    let errors = seen.recorded.errors.total() + seen.syscalls.error.iter().count() as u64;
    Ok(errors == 0)
}

/// The syscall figures `make profile` prints and keeps beside the flame graph.
fn profile_text(name: &str, machine: &Machine, seen: &run::Profiled) -> String {
    use std::fmt::Write as _;
    let mut text = String::new();
    let r = &seen.recorded;
    let _ = writeln!(
        text,
        "# {name}: `{}`\n\n{} ({} cores), kernel {}, commit {}.\n",
        seen.command, machine.cpu_model, machine.cores, machine.kernel, machine.commit
    );
    let _ = writeln!(
        text,
        "Recorded (perf record -F 499 --call-graph dwarf -e cpu-clock): {} connections in {:.1} s, {:.0} conn/s, \
         {} errors.",
        r.completed,
        r.elapsed_s,
        r.rate,
        r.errors.total()
    );
    let s = &seen.syscalls;
    match (s.syscalls, s.per_connection, &s.error) {
        (Some(n), Some(per), _) => {
            let _ = writeln!(
                text,
                "Syscalls ({}): {n} over {} connections, {per:.1} per connection.",
                s.tool, s.connections
            );
        }
        (_, _, Some(e)) => {
            let _ = writeln!(text, "Syscalls ({}): not counted: {e}", s.tool);
        }
        _ => {
            let _ = writeln!(text, "Syscalls ({}): no connection completed.", s.tool);
        }
    }
    match &seen.traced {
        Ok((connections, calls)) => {
            let _ = writeln!(
                text,
                "\nBy syscall (strace -c -f, a pass of its own: strace slows the process, so \
                 these {connections} connections are not a rate):\n"
            );
            let _ = writeln!(text, "| syscall | calls | per connection | errors |");
            let _ = writeln!(text, "|---|---:|---:|---:|");
            let per = |n: u64| {
                if *connections == 0 {
                    "n/a".to_string()
                } else {
                    format!("{:.2}", n as f64 / *connections as f64)
                }
            };
            let total: u64 = calls.iter().map(|c| c.calls).sum();
            for c in calls {
                let _ = writeln!(
                    text,
                    "| {} | {} | {} | {} |",
                    c.name,
                    c.calls,
                    per(c.calls),
                    c.errors
                );
            }
            let _ = writeln!(text, "| total | {total} | {} | |", per(total));
        }
        Err(e) => {
            let _ = writeln!(text, "\nBy syscall: not traced: {e:#}");
        }
    }
    text
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The scenarios of check and baseline: those given, or `make bench`'s
/// default set without HAProxy and the policy-size variants. HAProxy
/// measures HAProxy, not sluice: a Debian update of it would fail sluice's
/// CI with no change here, and the TPROXY rules it runs behind are already
/// checked by the tproxy scenarios. The policy-size variants would add six
/// scenarios to every CI run for one figure that `make bench` reports.
fn check_scenarios(setup: &Setup) -> Vec<String> {
    if !setup.scenarios.is_empty() {
        return setup.scenarios.clone();
    }
    Scenario::builtin()
        .into_iter()
        // The existing proxy and the Istio captures compare; the check
        // guards sluice's own modes (its time budget is CI's).
        .filter(|s| {
            !matches!(
                s.interceptor,
                Interceptor::Haproxy | Interceptor::Istio { .. }
            ) && s.excluded_ports.is_none()
        })
        .map(|s| s.name)
        .collect()
}

/// Runs `scenarios` through the loads of `profile` and returns the run.
fn measure(setup: &Setup, mut profile: Profile, scenarios: Vec<Scenario>) -> Result<report::Run> {
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
    let (tools, machine) = tools(setup, &profile)?;
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
    Ok(report::Run {
        machine,
        profile,
        conntrack_max,
        fd_limit,
        notes,
        wait_budget_left_s: tools.patience.left().as_secs_f64(),
        redis: tools.redis.as_ref().and_then(|r| r.version.clone()),
        elapsed_s: start.elapsed().as_secs_f64(),
        scenarios: results,
    })
}

/// The programs the scenarios run, and the machine they run on.
fn tools(setup: &Setup, profile: &Profile) -> Result<(Tools, Machine)> {
    if !setup.sluice.is_file() {
        bail!(
            "no sluice binary at {} (build it: cargo build --release -p sluice)",
            setup.sluice.display()
        );
    }
    let haproxy = match &setup.haproxy {
        Some(path) => path.is_file().then(|| path.clone()),
        None => scenario::find_program("haproxy"),
    };
    let machine = Machine::describe(haproxy.as_deref());
    // Found before anything is measured: a run that would fail its redis
    // load at the end says so at once.
    let redis = profile
        .runs(LoadKind::Redis)
        .then(redis::Programs::find)
        .transpose()?;
    let tools = Tools {
        sluice: std::fs::canonicalize(&setup.sluice)
            .with_context(|| format!("resolving {}", setup.sluice.display()))?,
        haproxy,
        workers: setup.workers.unwrap_or(machine.cores).max(1),
        max_connections: profile.max_connections() + 100,
        perf: perf::tool("perf"),
        callgrind: callgrind::Callgrind::find(),
        scratch: std::env::temp_dir(),
        patience: Patience::new(profile.wait_budget),
        redis,
    };
    Ok((tools, machine))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_default_profile_writes_the_committed_report() {
        assert_eq!(default_out(ProfileName::Default), PathBuf::from("results"));
        for short in [ProfileName::Smoke, ProfileName::Quick, ProfileName::Check] {
            let out = default_out(short);
            assert!(out.starts_with("target"), "{short}: {}", out.display());
            assert!(out.to_string_lossy().ends_with(&short.to_string()));
        }
    }
}
