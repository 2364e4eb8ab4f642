//! The outputs of a run: `results.json` (every raw figure), the SVG plots
//! in the run's directory, and `README.md` in the output directory: a summary
//! of the modes × forwarders matrix, one table per load, each figure next to
//! its ratio to `direct` of the same run, and the policy-size figure.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::machine::Machine;
use crate::plot::{self, Series};
use crate::profile::{LoadKind, Profile};
use crate::run::{Loaded, ScenarioResult};
use crate::scenario::{Interceptor, IstioRules};

pub const RR_PLOT: &str = "rr-latency.svg";
pub const CONNTRACK_PLOT: &str = "conntrack.svg";
pub const RSS_PLOT: &str = "proxy-rss.svg";
pub const POLICY_PLOT: &str = "policy-size.svg";

#[derive(Debug, Serialize)]
pub struct Run {
    pub machine: Machine,
    pub profile: Profile,
    /// `nf_conntrack_max` as a fresh namespace sees it (read-only there).
    pub conntrack_max: Option<u64>,
    /// RLIMIT_NOFILE of this process and the interceptors.
    pub fd_limit: u64,
    /// Deviations from the profile, and why.
    pub notes: Vec<String>,
    /// What was left of the profile's waiting/repeating budget at the end.
    pub wait_budget_left_s: f64,
    /// `redis-server --version`, when the redis load ran.
    pub redis: Option<String>,
    pub elapsed_s: f64,
    pub scenarios: Vec<ScenarioResult>,
}

impl Run {
    fn direct(&self) -> Option<&ScenarioResult> {
        self.scenarios
            .iter()
            .find(|s| s.interceptor == Interceptor::None)
    }

    /// The scenarios of the modes × forwarders matrix (and `direct`,
    /// HAProxy, custom ones): all but the policy-size variants, which have
    /// their own section.
    fn matrix(&self) -> impl Iterator<Item = &ScenarioResult> {
        self.scenarios.iter().filter(|s| s.excluded_ports.is_none())
    }

    /// Problems that make the run a failure: a scenario that broke, a load
    /// that failed, a connection that bypassed an interceptor, a forwarder
    /// that fell back (its figures would be reported under the wrong name).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for s in &self.scenarios {
            if let Some(e) = &s.error {
                problems.push(format!("{}: {e}", s.name));
            }
            if let Some(in_use) = fell_back(s) {
                problems.push(format!(
                    "{}: asked for --forward {}, but sluice forwarded with {in_use} \
                     (see its log); its figures are not {}'s",
                    s.name,
                    s.forwarder.as_deref().unwrap_or("?"),
                    s.forwarder.as_deref().unwrap_or("?"),
                ));
            }
            let direct = s.interceptor == Interceptor::None;
            let mut check = |load: &str, error: &Option<String>, bypassed: Option<u64>| {
                if let Some(e) = error {
                    problems.push(format!("{} {load}: {e}", s.name));
                }
                if let Some(n) = bypassed.filter(|n| *n > 0) {
                    problems.push(format!(
                        "{} {load}: {n} connections reached the workload without the proxy",
                        s.name
                    ));
                }
            };
            let l = &s.loads;
            if let Some(x) = &l.concurrency {
                check("concurrency", &x.error, x.bypassed(direct));
            }
            if let Some(x) = &l.rr {
                check("rr", &x.error, x.bypassed(direct));
            }
            for x in &l.bulk {
                check("bulk", &x.error, x.bypassed(direct));
            }
            if let Some(x) = &l.crr {
                check("crr", &x.error, x.bypassed(direct));
            }
            let mut printed = Vec::new();
            for (i, x) in l.redis.iter().enumerate() {
                let params = self.profile.redis.get(i);
                let load = params.map_or("redis", crate::load::redis::Params::label);
                check(load, &x.error, x.bypassed(direct));
                // Problems redis-benchmark printed and went on past.
                let n = x.report.as_ref().map_or(0, |r| r.errors.total());
                if n > 0 {
                    printed.push(format!("{} {load}: {n} errors", s.name));
                }
            }
            if let Some(x) = &l.exhaustion {
                check("exhaustion", &x.error, x.bypassed(direct));
            }
            problems.extend(printed);
        }
        problems
    }
}

/// The forwarder sluice ran instead of the one asked for, if it differs.
fn fell_back(s: &ScenarioResult) -> Option<&str> {
    let in_use = s.forwarder_in_use.as_deref()?;
    (s.forwarder.as_deref() != Some(in_use)).then_some(in_use)
}

/// The scenario's name as every table shows it: flagged when its forwarder
/// fell back, so that no row claims figures of a forwarder that did not run.
fn name_cell(s: &ScenarioResult) -> String {
    match fell_back(s) {
        Some(in_use) => format!("{} **(ran {in_use}!)**", s.name),
        None => s.name.clone(),
    }
}

/// Writes `results.json` and the plots into `run_dir`, and `README.md`
/// into `out`, linking to the plots relative to `out`.
pub fn write(run: &Run, out: &Path, run_dir: &Path) -> Result<()> {
    std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let json = serde_json::to_string_pretty(run).context("serialising the results")?;
    let json_path = run_dir.join("results.json");
    std::fs::write(&json_path, json + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    let plots = write_plots(run, run_dir);
    let rel = run_dir
        .strip_prefix(out)
        .unwrap_or(run_dir)
        .to_string_lossy()
        .into_owned();
    let markdown = markdown(run, &rel, &plots);
    let md_path = out.join("README.md");
    std::fs::write(&md_path, markdown).with_context(|| format!("writing {}", md_path.display()))?;
    Ok(())
}

/// The plots that could be drawn (a plot with no data is left out, with a
/// note on stderr, rather than failing the run after all the measuring).
fn write_plots(run: &Run, dir: &Path) -> Vec<&'static str> {
    let mut drawn = Vec::new();
    let rr: Vec<Series> = run
        .matrix()
        .filter_map(|s| {
            let r = s.loads.rr.as_ref()?.report.as_ref()?;
            Some(Series {
                name: &s.name,
                points: r.curve.clone(),
            })
        })
        .collect();
    let title = format!(
        "RR latency, {} connections, {} requests/s, 64 B",
        run.profile.rr.connections, run.profile.rr.rate
    );
    if run.profile.runs(LoadKind::Rr) {
        match plot::latency_percentiles(&dir.join(RR_PLOT), &title, &rr) {
            Ok(()) => drawn.push(RR_PLOT),
            Err(e) => eprintln!("sluice-bench: no RR plot: {e:#}"),
        }
    }
    if run.profile.runs(LoadKind::Crr) && run.scenarios.iter().any(|s| s.excluded_ports.is_some()) {
        let series = policy_series(run);
        let title = format!(
            "CRR rate against policy size, {} clients",
            run.profile.crr.clients
        );
        match plot::lines_log_x(
            &dir.join(POLICY_PLOT),
            &title,
            ("ports given to --exclude-ports", "connections/s"),
            &series,
        ) {
            Ok(()) => drawn.push(POLICY_PLOT),
            Err(e) => eprintln!("sluice-bench: no policy-size plot: {e:#}"),
        }
    }
    if !run.profile.runs(LoadKind::Concurrency) {
        return drawn;
    }
    let samples = |f: fn(&crate::load::hold::Sample) -> Option<f64>| -> Vec<Series> {
        run.scenarios
            .iter()
            .filter_map(|s| {
                let h = s.loads.concurrency.as_ref()?.report.as_ref()?;
                let mut points: Vec<(f64, f64)> = h
                    .report
                    .samples
                    .iter()
                    .filter_map(|x| Some((x.open as f64, f(x)?)))
                    .collect();
                // Held samples repeat the last x; keep the ramp's shape.
                points.dedup_by(|a, b| a.0 == b.0);
                (!points.is_empty()).then_some(Series {
                    name: &s.name,
                    points,
                })
            })
            .collect()
    };
    let conntrack = samples(|x| x.conntrack.map(|c| c as f64));
    let title = "Pod conntrack entries while opening connections";
    match plot::lines(
        &dir.join(CONNTRACK_PLOT),
        title,
        (
            "open connections",
            "nf_conntrack_count in the pod namespace",
        ),
        &conntrack,
    ) {
        Ok(()) => drawn.push(CONNTRACK_PLOT),
        Err(e) => eprintln!("sluice-bench: no conntrack plot: {e:#}"),
    }
    let rss = samples(|x| x.proxy_rss_kib.map(|k| k as f64 / 1024.0));
    if !rss.is_empty() {
        match plot::lines(
            &dir.join(RSS_PLOT),
            "Interceptor memory while opening connections",
            ("open connections", "interceptor RSS (MiB)"),
            &rss,
        ) {
            Ok(()) => drawn.push(RSS_PLOT),
            Err(e) => eprintln!("sluice-bench: no RSS plot: {e:#}"),
        }
    }
    drawn
}

/// "7.0 s" or "3 rounds of 7.0 s".
fn rounds(run: &Run, per_round: std::time::Duration) -> String {
    match run.profile.rounds {
        0 | 1 => secs(per_round),
        n => format!("{n} rounds of {}", secs(per_round)),
    }
}

fn secs(d: std::time::Duration) -> String {
    let s = d.as_secs_f64();
    if s < 10.0 {
        format!("{s:.1} s")
    } else {
        format!("{s:.0} s")
    }
}

fn us(v: f64) -> String {
    if v < 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

/// `value / direct`, when both exist and direct is not zero.
fn ratio(value: Option<f64>, direct: Option<f64>) -> String {
    match (value, direct) {
        (Some(v), Some(d)) if d > 0.0 => format!("{:.2}×", v / d),
        _ => "—".into(),
    }
}

fn opt<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map_or("n/a".into(), f)
}

fn bypassed<T>(s: &ScenarioResult, l: &Loaded<T>) -> String {
    match l.bypassed(s.interceptor == Interceptor::None) {
        None => "—".into(),
        Some(0) => "0".into(),
        Some(n) => format!("**{n}**"),
    }
}

/// Other processes' and other guests' (steal) shares of the machine during
/// the load, bold when the load counts as disturbed.
fn others<T>(l: Option<&Loaded<T>>) -> String {
    let Some(l) = l else { return "—".into() };
    let worst = l.worst();
    let text = format!(
        "{:.0}% / {:.0}%",
        worst.other_cpu * 100.0,
        worst.steal * 100.0
    );
    let repeats = match l.repeats() {
        0 => String::new(),
        1 => " (1 repeat)".into(),
        n => format!(" ({n} repeats)"),
    };
    if worst.disturbed() {
        format!("**{text}**{repeats}")
    } else {
        format!("{text}{repeats}")
    }
}

/// The kept attempt's errors, and those of discarded attempts if any.
fn errors<T>(total: u64, l: Option<&Loaded<T>>) -> String {
    let mut text = if total == 0 {
        "0".into()
    } else {
        format!("**{total}**")
    };
    let discarded: u64 = l.map_or(0, Loaded::discarded_errors);
    if discarded > 0 {
        text += &format!(" (+**{discarded}** in discarded attempts)");
    }
    text
}

/// The row of a scenario with no figures for a load, saying why.
fn missing_row(s: &ScenarioResult, load_error: Option<&str>, columns: usize) -> String {
    let why = if let Some(skipped) = &s.skipped {
        format!("skipped: {skipped}")
    } else if let Some(e) = load_error {
        format!("failed: {}", e.lines().next().unwrap_or(e))
    } else if let Some(e) = &s.error {
        format!("not measured: {}", e.lines().next().unwrap_or(e))
    } else {
        "not measured".into()
    };
    let why = why.replace('|', "\\|");
    format!(
        "| {} | {why} |{}\n",
        name_cell(s),
        " |".repeat(columns.saturating_sub(2))
    )
}

fn markdown(run: &Run, rel: &str, plots: &[&str]) -> String {
    let m = &run.machine;
    let p = &run.profile;
    let direct = run.direct();
    let mut md = String::new();
    let _ = writeln!(md, "# sluice benchmark results\n");
    let _ = writeln!(
        md,
        "Written by `make bench` (`sluice-bench`); regenerated on every run. \
         Raw figures: [`{rel}/results.json`]({rel}/results.json).\n"
    );
    let _ = writeln!(md, "| | |\n| --- | --- |");
    let _ = writeln!(md, "| date (UTC) | {} |", m.date);
    let _ = writeln!(
        md,
        "| profile | `{}` ({:.0} s in all) |",
        p.name, run.elapsed_s
    );
    let _ = writeln!(md, "| host | {} |", m.hostname);
    let _ = writeln!(md, "| CPU | {}, {} cores |", m.cpu_model, m.cores);
    if let Some(gib) = m.memory_gib {
        let _ = writeln!(md, "| memory | {gib} GiB |");
    }
    let _ = writeln!(md, "| kernel | {} |", m.kernel);
    let dirty = if m.dirty {
        " (with uncommitted changes)"
    } else {
        ""
    };
    let _ = writeln!(md, "| commit | `{}`{dirty} |", m.commit);
    if let Some(h) = &m.haproxy {
        let _ = writeln!(md, "| HAProxy | {h} |");
    }
    let _ = writeln!(md, "| open-file limit | {} |", run.fd_limit);
    md.push('\n');
    for note in &run.notes {
        let _ = writeln!(md, "**Note:** {note}\n");
    }

    let _ = writeln!(md, "## Scenarios\n");
    let _ = writeln!(
        md,
        "Each scenario runs on a fresh pair of network namespaces, client ⇄ veth ⇄ pod. \
         The workload (a tokio echo/sink server, one thread) and the interceptor run in the \
         pod namespace, the load generators in the client namespace, all on the same {} cores. \
         Ratios compare with `direct` of this same run. All scenarios are set up first and \
         stay up; the timed loads (RR, bulk, CRR) then run in rounds in which the scenarios \
         take turns, each round starting with a different one, so that load from elsewhere \
         on the machine falls on every scenario alike; each scenario's rounds are merged \
         (histograms added, counts and times summed).\n",
        m.cores
    );
    let _ = writeln!(
        md,
        "| scenario | mode | forwarder | loads | interceptor |\n| --- | --- | --- | --- | --- |"
    );
    for s in &run.scenarios {
        let how = match (&s.proxy, &s.interceptor) {
            (Some(stopped), _) => format!("`{}`", stopped.command),
            (None, Interceptor::None) => "none: client → workload".into(),
            (None, Interceptor::Sluice { args }) => format!("`sluice run {}`", args.join(" ")),
            (None, Interceptor::Haproxy) => "HAProxy".into(),
            (None, Interceptor::Istio { .. }) => "sluice as Istio's mesh proxy".into(),
        };
        let how = match (&s.interceptor, &s.skipped) {
            (_, Some(why)) => format!("{how} — skipped: {why}"),
            (Interceptor::Haproxy, None) => format!(
                "{how}, behind `sluice rules install --mode tproxy --ports {}` with \
                 `tcp_fwmark_accept` turned back off (configuration below)",
                if run.profile.runs(LoadKind::Redis) {
                    "9080,6379"
                } else {
                    "9080"
                }
            ),
            (Interceptor::Istio { rules }, None) => format!(
                "{how}, behind {}",
                match rules {
                    IstioRules::Istio => "Istio's own `-m TPROXY` rules (bench/src/scenario.rs)",
                    IstioRules::Sluice => "`sluice istio-iptables` with the same arguments",
                }
            ),
            _ => how,
        };
        let forwarder = match (fell_back(s), s.forwarder.as_deref()) {
            (Some(in_use), asked) => format!(
                "**{in_use}** (asked for {}; fell back, see its log)",
                asked.unwrap_or("?")
            ),
            (None, asked) => asked.unwrap_or("—").to_string(),
        };
        let loads = match &s.only {
            None => "all".to_string(),
            Some(only) => only
                .iter()
                .map(|l| format!("{l:?}").to_lowercase())
                .collect::<Vec<_>>()
                .join(", "),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {forwarder} | {loads} | {how} |",
            s.name,
            s.mode.as_deref().unwrap_or("—"),
        );
    }
    md.push('\n');
    let _ = writeln!(
        md,
        "**forwarder** is what moves the bytes between the two sockets: `copy` (io_uring \
         through user-space buffers), `splice` (socket → pipe → socket in the kernel), \
         `sockmap` (an `sk_skb` verdict program redirects in the kernel). It is the one sluice \
         names in its ready line; where sockmap fell back to copy the row says so, in bold, \
         in every table, and the run fails.\n"
    );
    for s in &run.scenarios {
        if let Some(config) = s.proxy.as_ref().and_then(|p| p.config.as_ref()) {
            let _ = writeln!(md, "Configuration of `{}`:\n\n```\n{}```\n", s.name, config);
        }
    }
    let _ = writeln!(
        md,
        "**bypassed** counts connections that reached the workload without passing \
         through the interceptor: the workload counts a connection as the proxy's when it \
         comes from 127.0.0.6 (HAProxy, sluice's `--upstream-source bypass`) or when its \
         accepted socket carries sluice's mark, 1337 (sluice connects from the client's own \
         address by default; its upstream socket's mark passes to the workload's socket \
         through `tcp_fwmark_accept`, which its rules turn on); it must be 0 for every \
         interception mode. **errors** are failed \
         connections or exchanges, counted, never retried away.\n"
    );
    let _ = writeln!(
        md,
        "**others / steal**: the cores are shared, with other processes and, on a virtual \
         machine, with the host's other guests. \"others\" is the share of the whole machine \
         used during the load by processes other than the benchmark's own and the kernel's \
         threads (their CPU times in /proc/<pid>/stat, sampled every 250 ms); \"steal\" is \
         the time the hypervisor gave our virtual CPUs to someone else (/proc/stat). Above {:.0}% others or {:.0}% steal a load counts as \
         disturbed (bold): it is repeated after waiting for a quiet moment, up to {} attempts \
         and within {} of waiting and repeating per run ({} left at the end of this one); \
         the least disturbed attempt is kept (chosen by its disturbance, never by its figures). \
         The column shows the worst kept round, and how many attempts were discarded \
         (\"repeats\"); their errors are counted in the errors column, and bypasses are \
         counted over every attempt.\n",
        crate::sysload::DISTURBED_OTHER * 100.0,
        crate::sysload::DISTURBED_STEAL * 100.0,
        run.profile.attempts,
        secs(run.profile.wait_budget),
        secs(std::time::Duration::from_secs_f64(run.wait_budget_left_s)),
    );

    // A load left out with --loads has no section at all.
    let runs = |load| run.profile.runs(load);
    summary(&mut md, run, direct);
    if runs(LoadKind::Rr) {
        rr_table(&mut md, run, direct, rel, plots);
    }
    if runs(LoadKind::Crr) {
        crr_table(&mut md, run, direct);
    }
    if runs(LoadKind::Bulk) {
        bulk_table(&mut md, run, direct);
    }
    if runs(LoadKind::Redis) {
        redis_table(&mut md, run, direct);
    }
    if runs(LoadKind::Concurrency) {
        concurrency_table(&mut md, run, direct, rel, plots);
    }
    if runs(LoadKind::Exhaustion) {
        exhaustion(&mut md, run);
    }
    if runs(LoadKind::Crr) {
        policy_table(&mut md, run, direct, rel, plots);
    }
    logs(&mut md, run);
    md
}

/// One row per scenario of the matrix with the figures that tell modes and
/// forwarders apart; the sections below have every figure and its context.
fn summary(md: &mut String, run: &Run, direct: Option<&ScenarioResult>) {
    let p = &run.profile;
    let _ = writeln!(
        md,
        "## Summary: modes × forwarders
"
    );
    let first_bulk = p.bulk.first();
    let _ = writeln!(
        md,
        "The headline figure of each load, from the sections below, beside its ratio to \
         `direct`: RR p99 latency ({} requests/s), CRR connections per second ({} clients), \
         bulk throughput and the interceptor's CPU seconds per 10⁹ bytes ({} stream{}), and \
         the interceptor's memory per idle connection at {} open connections. — where a \
         load did not run. sockmap moves the bytes in the kernel (softirq and kworker \
         threads), which is not charged to sluice's process: its proxy CPU s/GB counts only \
         what sluice's own threads do. Machine CPU s/GB counts every busy CPU second of \
         the machine during the load (client, workload and kernel included), the same way \
         for every scenario: that is the figure to compare forwarders by.\n",
        p.rr.rate,
        p.crr.clients,
        first_bulk.map_or(0, |b| b.streams),
        if first_bulk.is_some_and(|b| b.streams == 1) {
            ""
        } else {
            "s"
        },
        p.hold.connections,
    );
    let _ = writeln!(
        md,
        "| scenario | mode | forwarder | RR p99 µs | vs direct | CRR conn/s | vs direct | bulk Gbit/s | vs direct | proxy CPU s/GB | machine CPU s/GB | vs direct | proxy RSS KiB/conn |"
    );
    let _ = writeln!(
        md,
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let rr = |s: &ScenarioResult| Some(s.loads.rr.as_ref()?.report.as_ref()?.latency.p99_us);
    let crr = |s: &ScenarioResult| Some(s.loads.crr.as_ref()?.report.as_ref()?.report.rate);
    fn bulk(s: &ScenarioResult) -> Option<&crate::run::BulkFigures> {
        s.loads.bulk.first()?.report.as_ref()
    }
    let rss = |s: &ScenarioResult| {
        s.loads
            .concurrency
            .as_ref()?
            .report
            .as_ref()?
            .proxy_rss_per_connection_kib
    };
    let dash = |v: Option<f64>, f: fn(f64) -> String| v.map_or("—".into(), f);
    for s in run.matrix() {
        if s.skipped.is_some() || (s.error.is_some() && s.proxy.is_none()) {
            md.push_str(&missing_row(s, None, 13));
            continue;
        }
        let (d_rr, d_crr, d_bulk, d_machine) = (
            direct.and_then(rr),
            direct.and_then(crr),
            direct.and_then(bulk).map(|b| b.report.gbit_per_s),
            direct.and_then(bulk).and_then(|b| b.machine_cpu_s_per_gb),
        );
        let machine = bulk(s).and_then(|b| b.machine_cpu_s_per_gb);
        let gbit = bulk(s).map(|b| b.report.gbit_per_s);
        let forwarder = match fell_back(s) {
            Some(in_use) => format!(
                "**{in_use}** (not {})",
                s.forwarder.as_deref().unwrap_or("?")
            ),
            None => s.forwarder.as_deref().unwrap_or("—").to_string(),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {forwarder} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            name_cell(s),
            s.mode.as_deref().unwrap_or("—"),
            dash(rr(s), us),
            if rr(s).is_some() {
                ratio(rr(s), d_rr)
            } else {
                "—".into()
            },
            dash(crr(s), |r| format!("{r:.0}")),
            if crr(s).is_some() {
                ratio(crr(s), d_crr)
            } else {
                "—".into()
            },
            dash(gbit, |g| format!("{g:.2}")),
            if gbit.is_some() {
                ratio(gbit, d_bulk)
            } else {
                "—".into()
            },
            dash(bulk(s).and_then(|b| b.proxy_cpu_s_per_gb), |c| format!(
                "{c:.3}"
            )),
            dash(machine, |c| format!("{c:.3}")),
            if machine.is_some() {
                ratio(machine, d_machine)
            } else {
                "—".into()
            },
            dash(rss(s), |k| format!("{k:.1}")),
        );
    }
    md.push('\n');
}

fn rr_table(
    md: &mut String,
    run: &Run,
    direct: Option<&ScenarioResult>,
    rel: &str,
    plots: &[&str],
) {
    let p = &run.profile.rr;
    let _ = writeln!(md, "## RR: request/response latency\n");
    let _ = writeln!(
        md,
        "{} persistent connections, {} requests/s in all, 64-byte request and echo, {}. \
         Latency is measured from each request's scheduled send time, so a stall is \
         charged to every request it delays (corrected for coordinated omission); \
         \"service p50\" is from the actual send, for reference. Proxy syscalls/req are \
         counted as for CRR (below), over an RR pass of its own after the timed rounds \
         ({}), per answered request: each request crosses the interceptor twice, once \
         each way.\n",
        p.connections,
        p.rate,
        rounds(run, p.duration),
        secs(p.duration.min(crate::run::SYSCALL_PASS)),
    );
    let _ = writeln!(
        md,
        "| scenario | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | p50 vs direct | p99 vs direct | p99.9 vs direct | service p50 µs | proxy syscalls/req | answered | errors | bypassed | others / steal |"
    );
    let _ = writeln!(
        md,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let d = direct.and_then(|s| s.loads.rr.as_ref()?.report.as_ref());
    for s in run.matrix() {
        let loaded = s.loads.rr.as_ref();
        let Some(r) = loaded.and_then(|l| l.report.as_ref()) else {
            md.push_str(&missing_row(s, loaded.and_then(|l| l.error.as_deref()), 15));
            continue;
        };
        let l = &r.latency;
        let dl = d.map(|d| d.latency);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {}/{} | {} | {} | {} |",
            name_cell(s),
            us(l.p50_us),
            us(l.p90_us),
            us(l.p99_us),
            us(l.p999_us),
            us(l.max_us),
            ratio(Some(l.p50_us), dl.map(|d| d.p50_us)),
            ratio(Some(l.p99_us), dl.map(|d| d.p99_us)),
            ratio(Some(l.p999_us), dl.map(|d| d.p999_us)),
            us(r.service.p50_us),
            syscalls_cell(s.loads.rr_syscalls.as_ref()),
            r.completed,
            r.scheduled,
            errors(r.errors.total(), loaded),
            loaded.map_or("—".into(), |x| bypassed(s, x)),
            others(loaded),
        );
    }
    if plots.contains(&RR_PLOT) {
        let _ = writeln!(md, "\n![RR latency by percentile]({rel}/{RR_PLOT})");
    }
    md.push('\n');
}

/// Syscalls per connection or request: — without an interceptor, n/a when
/// they could not be counted (the table's note says why).
fn syscalls_cell(counted: Option<&crate::perf::Syscalls>) -> String {
    match counted {
        None => "—".to_string(),
        Some(c) => c
            .per_connection
            .map_or("n/a".into(), |per| format!("{per:.1}")),
    }
}

fn crr_table(md: &mut String, run: &Run, direct: Option<&ScenarioResult>) {
    let p = &run.profile.crr;
    let _ = writeln!(md, "## CRR: connection rate\n");
    let _ = writeln!(
        md,
        "{} parallel clients, each in a loop: connect, 64-byte request, its echo, close \
         (the client closes first), for {}. Latency is connect to reply. Machine CPU µs/conn \
         is every busy CPU microsecond of the machine over the load (/proc/stat, as for bulk: \
         client, workload, interceptor and kernel) per completed connection; \"over direct\" \
         is that minus direct's, the CPU an intercepted connection costs on top. Proxy \
         syscalls/conn are the interceptor's syscalls (`perf stat -e raw_syscalls:sys_enter \
         -p <pid>`, every thread; an io_uring operation is not one, its `io_uring_enter` is) \
         over a CRR pass of its own after the timed rounds ({}), per completed connection: \
         the count's tracepoint costs a little on every syscall, so it never runs beside \
         the figures above.\n",
        p.clients,
        rounds(run, p.duration),
        secs(p.duration.min(crate::run::SYSCALL_PASS)),
    );
    let _ = writeln!(
        md,
        "| scenario | conn/s | vs direct | p50 µs | p99 µs | p99.9 µs | p99 vs direct | machine CPU µs/conn | over direct µs | proxy syscalls/conn | connections | errors | bypassed | conntrack after | others / steal |"
    );
    let _ = writeln!(
        md,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let d = direct.and_then(|s| s.loads.crr.as_ref()?.report.as_ref());
    for s in run.matrix() {
        let loaded = s.loads.crr.as_ref();
        let Some(f) = loaded.and_then(|l| l.report.as_ref()) else {
            md.push_str(&missing_row(s, loaded.and_then(|l| l.error.as_deref()), 15));
            continue;
        };
        let r = &f.report;
        let cpu = f.machine_cpu_us_per_conn;
        let over = cpu
            .zip(d.and_then(|d| d.machine_cpu_us_per_conn))
            .map(|(c, d)| c - d);
        let syscalls = syscalls_cell(s.loads.crr_syscalls.as_ref());
        let _ = writeln!(
            md,
            "| {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {syscalls} | {} | {} | {} | {} | {} |",
            name_cell(s),
            r.rate,
            ratio(Some(r.rate), d.map(|d| d.report.rate)),
            us(r.latency.p50_us),
            us(r.latency.p99_us),
            us(r.latency.p999_us),
            ratio(Some(r.latency.p99_us), d.map(|d| d.report.latency.p99_us)),
            opt(cpu, |c| format!("{c:.1}")),
            if s.interceptor == Interceptor::None {
                "—".to_string()
            } else {
                opt(over, |o| format!("{o:+.1}"))
            },
            r.completed,
            errors(r.errors.total(), loaded),
            loaded.map_or("—".into(), |x| bypassed(s, x)),
            opt(f.conntrack_after, |c| c.to_string()),
            others(loaded),
        );
    }
    let with_errors: Vec<String> = run
        .matrix()
        .filter_map(|s| {
            let r = &s.loads.crr.as_ref()?.report.as_ref()?.report;
            (r.errors.total() > 0).then(|| format!("{}: {:?}", s.name, r.errors.0))
        })
        .collect();
    if !with_errors.is_empty() {
        let _ = writeln!(md, "\nErrors by kind: {}.", with_errors.join("; "));
    }
    let uncounted: Vec<String> = run
        .matrix()
        .filter_map(|s| {
            let c = s
                .loads
                .crr_syscalls
                .as_ref()
                .or(s.loads.rr_syscalls.as_ref())?;
            let e = c.error.as_deref()?;
            Some(format!("{}: {}", s.name, e.lines().next().unwrap_or(e)))
        })
        .collect();
    if !uncounted.is_empty() {
        let _ = writeln!(md, "\nSyscalls not counted: {}.", uncounted.join("; "));
    }
    md.push('\n');
}

fn bulk_table(md: &mut String, run: &Run, direct: Option<&ScenarioResult>) {
    let duration = run
        .profile
        .bulk
        .first()
        .map_or("?".into(), |b| rounds(run, b.duration));
    let _ = writeln!(md, "## Bulk throughput\n");
    let _ = writeln!(
        md,
        "Each stream sends 128 KiB writes for {duration} to the workload's sink, \
         which counts and drops them; at the end the stream half-closes and checks the \
         sink's count against what it sent (a mismatch is an error). Gbit/s is payload \
         client → workload, including that final exchange. Proxy CPU is user + system \
         time of the interceptor process (all threads) over the load, from \
         `/proc/<pid>/stat`, per 10⁹ bytes moved. With sockmap the kernel moves the bytes \
         (softirq and kworker threads, not charged to sluice), so its figure is sluice's own \
         share only, not the cost of forwarding. Machine CPU is every busy CPU second of \
         the machine over the load (/proc/stat: user, system, irq, softirq; client, \
         workload and kernel threads included), per 10⁹ bytes: the fair cost to compare.\n"
    );
    let _ = writeln!(
        md,
        "| scenario | streams | Gbit/s | vs direct | proxy CPU s | proxy CPU s/GB | machine CPU s/GB | vs direct | errors | bypassed | others / steal |"
    );
    let _ = writeln!(
        md,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for (index, params) in run.profile.bulk.iter().enumerate() {
        let d = direct.and_then(|s| s.loads.bulk.get(index)?.report.as_ref());
        for s in run.matrix() {
            let loaded = s.loads.bulk.get(index);
            let Some(f) = loaded.and_then(|l| l.report.as_ref()) else {
                md.push_str(&missing_row(s, loaded.and_then(|l| l.error.as_deref()), 11));
                continue;
            };
            let _ = writeln!(
                md,
                "| {} | {} | {:.2} | {} | {} | {} | {} | {} | {} | {} | {} |",
                name_cell(s),
                params.streams,
                f.report.gbit_per_s,
                ratio(Some(f.report.gbit_per_s), d.map(|d| d.report.gbit_per_s)),
                opt(f.proxy_cpu_s, |c| format!("{c:.2}")),
                opt(f.proxy_cpu_s_per_gb, |c| format!("{c:.3}")),
                opt(f.machine_cpu_s_per_gb, |c| format!("{c:.3}")),
                ratio(
                    f.machine_cpu_s_per_gb,
                    d.and_then(|d| d.machine_cpu_s_per_gb)
                ),
                errors(f.report.errors.total(), loaded),
                loaded.map_or("—".into(), |x| bypassed(s, x)),
                others(loaded),
            );
        }
    }
    md.push('\n');
}

fn redis_table(md: &mut String, run: &Run, direct: Option<&ScenarioResult>) {
    let p = &run.profile.redis;
    let _ = writeln!(md, "## Redis: a real client\n");
    let runs: Vec<String> = p
        .iter()
        .map(|r| {
            format!(
                "{} (`-c {} -k {} -n {}`)",
                r.connections(),
                r.clients,
                u8::from(r.keepalive),
                r.requests
            )
        })
        .collect();
    let _ = writeln!(
        md,
        "{} (Debian's) in the pod namespace on port {port}, intercepted like 9080 (HAProxy: a backend \
         chosen by the original destination port), no persistence; `redis-benchmark -t {test} \
         --csv` in the client namespace against {pod}:{port}, connections {}; {}. Requests/s \
         and p50 are \
         redis-benchmark's own (p50: the median of the rounds'). redis-benchmark stops at its \
         first connection error: such a run is a failure, not a figure; a run that outlives \
         its {} is killed and failed too. Connections are those redis accepted (`INFO stats`); \
         which way they came is counted in the pod namespace, where a connection through an \
         interceptor is accepted twice (TCP `PassiveOpens`), one that bypassed it once. The \
         client's ephemeral ports span 1024-65535, as behind a NAT gateway or kube-proxy.\n",
        run.redis
            .as_deref()
            .map_or("redis-server".into(), |v| format!("redis-server {v}")),
        runs.join(" and "),
        match run.profile.rounds {
            0 | 1 => "once".to_string(),
            n => format!("{n} rounds, the scenarios taking turns"),
        },
        p.first()
            .map_or("deadline".into(), |r| format!("{} deadline", secs(r.limit))),
        port = crate::load::redis::PORT,
        test = crate::load::redis::TEST,
        pod = netlab::ClientPod::POD_V4,
    );
    let _ = writeln!(
        md,
        "| scenario | connections | requests/s | vs direct | p50 ms | p50 vs direct | requests | redis connections | errors | bypassed | others / steal |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (index, params) in p.iter().enumerate() {
        let d = direct.and_then(|s| s.loads.redis.get(index)?.report.as_ref());
        for s in run.matrix() {
            let loaded = s.loads.redis.get(index);
            let Some(r) = loaded.and_then(|l| l.report.as_ref()) else {
                let row = missing_row(s, loaded.and_then(|l| l.error.as_deref()), 11);
                // The same row, with the connections in front of why.
                let name = format!("| {} |", name_cell(s));
                let row = row.replacen(&name, &format!("{name} {} |", params.connections()), 1);
                md.push_str(&row);
                continue;
            };
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} |",
                name_cell(s),
                params.connections(),
                r.rps,
                ratio(Some(r.rps), d.map(|d| d.rps)),
                opt(r.p50_ms, |p| format!("{p:.3}")),
                ratio(r.p50_ms, d.and_then(|d| d.p50_ms)),
                r.requests,
                r.connections,
                errors(r.errors.total(), loaded),
                loaded.map_or("—".into(), |x| bypassed(s, x)),
                others(loaded),
            );
        }
    }
    let with_errors: Vec<String> = run
        .matrix()
        .flat_map(|s| {
            s.loads.redis.iter().filter_map(|l| {
                let r = l.report.as_ref()?;
                (r.errors.total() > 0)
                    .then(|| format!("{} {}: {:?}", s.name, r.params.label(), r.errors.0))
            })
        })
        .collect();
    if !with_errors.is_empty() {
        let _ = writeln!(md, "\nErrors by kind: {}.", with_errors.join("; "));
    }
    md.push('\n');
}

fn concurrency_table(
    md: &mut String,
    run: &Run,
    direct: Option<&ScenarioResult>,
    rel: &str,
    plots: &[&str],
) {
    let p = &run.profile.hold;
    let _ = writeln!(
        md,
        "## Concurrency: conntrack and memory at {} open connections\n",
        p.connections
    );
    let _ = writeln!(
        md,
        "{} connections opened in {} steps (each proven with one echo) and held, idle, for {}; \
         the pod namespace's `nf_conntrack_count` and the interceptor's VmRSS are sampled \
         before, after each step and while held. Per connection = (peak − before) / open: \
         \"proxy KiB/conn\" is the interceptor's memory per idle connection (its RSS: the \
         kernel's socket buffers and map entries are not in it). \
         This load runs first in each scenario, on an empty conntrack table.\n",
        p.connections,
        p.steps,
        secs(p.hold)
    );
    let _ = writeln!(
        md,
        "| scenario | open | conntrack before | conntrack peak | entries/conn | peak vs direct | proxy RSS before MiB | proxy RSS held MiB | proxy KiB/conn | errors | bypassed | others / steal |"
    );
    let _ = writeln!(
        md,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let d = direct.and_then(|s| s.loads.concurrency.as_ref()?.report.as_ref());
    let mib = |k: u64| format!("{:.1}", k as f64 / 1024.0);
    for s in run.matrix() {
        let loaded = s.loads.concurrency.as_ref();
        let Some(f) = loaded.and_then(|l| l.report.as_ref()) else {
            md.push_str(&missing_row(s, loaded.and_then(|l| l.error.as_deref()), 12));
            continue;
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            name_cell(s),
            f.report.opened,
            opt(f.conntrack_before, |c| c.to_string()),
            opt(f.conntrack_peak, |c| c.to_string()),
            opt(f.conntrack_per_connection, |c| format!("{c:.2}")),
            ratio(
                f.conntrack_peak.map(|c| c as f64),
                d.and_then(|d| d.conntrack_peak).map(|c| c as f64)
            ),
            opt(f.proxy_rss_before_kib, mib),
            opt(f.proxy_rss_held_kib, mib),
            opt(f.proxy_rss_per_connection_kib, |k| format!("{k:.1}")),
            errors(f.report.errors.total(), loaded),
            loaded.map_or("—".into(), |x| bypassed(s, x)),
            others(loaded),
        );
    }
    if d.and_then(|d| d.conntrack_peak) == Some(0) {
        let _ = writeln!(
            md,
            "\n`direct` creates no conntrack entry (nothing in its pod namespace uses \
             conntrack), so \"peak vs direct\" has no ratio."
        );
    }
    for plot in [CONNTRACK_PLOT, RSS_PLOT] {
        if plots.contains(&plot) {
            let _ = writeln!(md, "\n![{plot}]({rel}/{plot})");
        }
    }
    md.push('\n');
}

fn exhaustion(md: &mut String, run: &Run) {
    let p = &run.profile.exhaustion;
    let max = run
        .conntrack_max
        .map_or("nf_conntrack_max".into(), |m| m.to_string());
    let _ = writeln!(md, "## Conntrack exhaustion\n");
    let _ = writeln!(
        md,
        "The pod namespace's conntrack table is filled until {} of its {max} entries are \
         free, then {} connections are opened at once ({} handshakes in flight, connect \
         timeout {}: the first SYN and its retransmission after 1 s), each proven with one \
         echo and held until every attempt has ended. `nf_conntrack_max` cannot be lowered \
         instead: it is read-only in every namespace but the machine's own, which the \
         benchmark leaves alone; but the kernel compares each namespace's own count with it, \
         so `conntrack -R` inside the pod namespace fills the table with fake ESTABLISHED, \
         ASSURED entries (never dropped to make room), deleted afterwards. The table is \
         flushed first, so entries of earlier loads cannot expire mid-load. Conntrack counts \
         are the pod namespace's, once filled and with the connections held.\n",
        p.free,
        p.connections,
        p.parallel,
        secs(crate::load::exhaust::CONNECT_TIMEOUT),
    );
    let _ = writeln!(
        md,
        "| scenario | free entries | attempted | succeeded | share | conntrack before | conntrack held | failed | bypassed |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for s in run.matrix() {
        let loaded = s.loads.exhaustion.as_ref();
        let Some(r) = loaded.and_then(|l| l.report.as_ref()) else {
            md.push_str(&missing_row(s, loaded.and_then(|l| l.error.as_deref()), 9));
            continue;
        };
        let share = format!("{:.1}%", r.share * 100.0);
        let share = if r.succeeded < r.attempted {
            format!("**{share}**")
        } else {
            share
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {share} | {} | {} | {} | {} |",
            s.name,
            r.free,
            r.attempted,
            r.succeeded,
            r.conntrack_before,
            r.conntrack_after,
            r.errors.total(),
            loaded.map_or("—".into(), |x| bypassed(s, x)),
        );
    }
    let failures: Vec<String> = run
        .scenarios
        .iter()
        .filter_map(|s| {
            let r = s.loads.exhaustion.as_ref()?.report.as_ref()?;
            (r.errors.total() > 0).then(|| format!("{}: {:?}", s.name, r.errors.0))
        })
        .collect();
    if !failures.is_empty() {
        let _ = writeln!(md, "\nFailures by kind: {}.", failures.join("; "));
    }
    md.push('\n');
}

/// The CRR rate of each policy-size variant, by mode: `(excluded ports,
/// conn/s)`, sorted by size.
fn policy_series(run: &Run) -> Vec<Series<'_>> {
    let mut series: Vec<Series> = Vec::new();
    for s in &run.scenarios {
        let (Some(excluded), Some(mode)) = (s.excluded_ports, s.mode.as_deref()) else {
            continue;
        };
        let Some(f) = s.loads.crr.as_ref().and_then(|l| l.report.as_ref()) else {
            continue;
        };
        let point = (excluded as f64, f.report.rate);
        match series.iter_mut().find(|x| x.name == mode) {
            Some(x) => x.points.push(point),
            None => series.push(Series {
                name: mode,
                points: vec![point],
            }),
        }
    }
    for x in &mut series {
        x.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    series
}

fn policy_table(
    md: &mut String,
    run: &Run,
    direct: Option<&ScenarioResult>,
    rel: &str,
    plots: &[&str],
) {
    let variants: Vec<&ScenarioResult> = run
        .scenarios
        .iter()
        .filter(|s| s.excluded_ports.is_some())
        .collect();
    if variants.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "## Policy size: connection rate against excluded ports
"
    );
    let _ = writeln!(
        md,
        "How interception's cost grows with the policy: the CRR load alone ({} clients, {}, \
         in the same rounds as the scenarios above), through sluice started with \
         `--exclude-ports` listing N ports from 20000 up, none of which any load uses (sluice \
         adds its own port, 15006, to every list). tproxy renders each excluded port as its \
         own `RETURN` rule ahead of the `TPROXY` rule, so every new connection's SYN walks all \
         of them; ebpf looks the port up in a map (a bitmap), whatever its size. Each row is \
         the copy forwarder.\n",
        run.profile.crr.clients,
        rounds(run, run.profile.crr.duration),
    );
    let _ = writeln!(
        md,
        "| mode | excluded ports | conn/s | vs 1 excluded | vs direct | p50 µs | p99 µs | errors | bypassed | others / steal |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let rate = |s: &ScenarioResult| Some(s.loads.crr.as_ref()?.report.as_ref()?.report.rate);
    let d = direct.and_then(rate);
    let mut modes: Vec<&str> = Vec::new();
    for s in &variants {
        let mode = s.mode.as_deref().unwrap_or("?");
        if !modes.contains(&mode) {
            modes.push(mode);
        }
    }
    for mode in modes {
        let mut rows: Vec<&ScenarioResult> = variants
            .iter()
            .copied()
            .filter(|s| s.mode.as_deref().unwrap_or("?") == mode)
            .collect();
        rows.sort_by_key(|s| s.excluded_ports);
        let base = rows
            .iter()
            .find(|s| s.excluded_ports == Some(1))
            .and_then(|s| rate(s));
        for s in rows {
            let loaded = s.loads.crr.as_ref();
            let excluded = s.excluded_ports.unwrap_or(0);
            let Some(f) = loaded.and_then(|l| l.report.as_ref()) else {
                let why = missing_row(s, loaded.and_then(|l| l.error.as_deref()), 9);
                // The same row, with the mode and size in front of why.
                let why = why.replacen(&format!("| {} |", name_cell(s)), "", 1);
                let _ = write!(md, "| {mode} | {excluded} |{why}");
                continue;
            };
            let r = &f.report;
            let _ = writeln!(
                md,
                "| {mode} | {excluded} | {:.0} | {} | {} | {} | {} | {} | {} | {} |",
                r.rate,
                ratio(Some(r.rate), base),
                ratio(Some(r.rate), d),
                us(r.latency.p50_us),
                us(r.latency.p99_us),
                errors(r.errors.total(), loaded),
                loaded.map_or("—".into(), |x| bypassed(s, x)),
                others(loaded),
            );
        }
    }
    if plots.contains(&POLICY_PLOT) {
        let _ = writeln!(
            md,
            "\n![CRR rate against excluded ports]({rel}/{POLICY_PLOT})"
        );
    }
    md.push('\n');
}

fn logs(md: &mut String, run: &Run) {
    let _ = writeln!(md, "## Interceptor logs\n");
    let _ = writeln!(
        md,
        "| scenario | exit | forwarder in use | log lines | warnings | errors | first problem |"
    );
    let _ = writeln!(md, "|---|---|---|---:|---:|---:|---|");
    let quote = |l: &str| format!("`{}`", l.replace('|', "\\|").replace('`', "'"));
    let mut fallbacks = Vec::new();
    for s in &run.scenarios {
        let Some(p) = &s.proxy else { continue };
        let first = p
            .log
            .first_problems
            .first()
            .map_or(String::new(), |l| quote(l));
        let in_use = match (&s.interceptor, s.forwarder_in_use.as_deref()) {
            (Interceptor::Sluice { .. }, None) => "not said".to_string(),
            (_, None) => "—".to_string(),
            (_, Some(f)) if fell_back(s).is_some() => format!("**{f}**"),
            (_, Some(f)) => f.to_string(),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {in_use} | {} | {} | {} | {first} |",
            s.name, p.exit, p.log.lines, p.log.warnings, p.log.errors
        );
        if let Some(line) = p.log.fallbacks.first() {
            fallbacks.push(format!("`{}`: {}", s.name, quote(line)));
        }
    }
    if !fallbacks.is_empty() {
        let _ = writeln!(
            md,
            "\n**Forwarded with copy** (sluice says so once per process, so this is at \
             least one connection, maybe all): {}.",
            fallbacks.join("; ")
        );
    }
    md.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::Loads;

    fn scenario(forwarder: &str, in_use: Option<&str>) -> ScenarioResult {
        ScenarioResult {
            name: format!("tproxy-{forwarder}"),
            interceptor: Interceptor::Sluice { args: Vec::new() },
            mode: Some("tproxy".into()),
            forwarder: Some(forwarder.into()),
            forwarder_in_use: in_use.map(str::to_string),
            only: None,
            excluded_ports: None,
            skipped: None,
            error: None,
            loads: Loads::default(),
            proxy: None,
            elapsed_s: 0.0,
        }
    }

    #[test]
    fn a_fallback_is_flagged() {
        let fell = scenario("sockmap", Some("copy"));
        assert_eq!(fell_back(&fell), Some("copy"));
        assert_eq!(name_cell(&fell), "tproxy-sockmap **(ran copy!)**");
        let ran = scenario("sockmap", Some("sockmap"));
        assert_eq!((fell_back(&ran), name_cell(&ran)), (None, ran.name.clone()));
        // sluice never said (it died before ready): nothing to contradict.
        assert_eq!(fell_back(&scenario("sockmap", None)), None);
    }
}
