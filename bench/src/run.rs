//! One scenario: a fresh client ⇄ pod topology, the workload, the
//! interceptor, then every load in turn; everything is torn down at the end
//! (guards), also when a load fails or panics.
//!
//! Load order matters: the concurrency load runs first, on an empty
//! conntrack table, and CRR runs last, because its hundreds of thousands of
//! short connections leave TIME_WAIT entries (conntrack and sockets) behind.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use netlab::{ClientPod, Netns};
use serde::Serialize;

use crate::load::{bulk, crr, hold, rr, Errors};
use crate::profile::{LoadKind, Profile};
use crate::scenario::{Interceptor, Proxy, Scenario, Stopped, Tools, PORT};
use crate::sysload::{self, Interference, Monitor};
use crate::workload::{Peers, Workload};

#[derive(Debug, Serialize)]
pub struct ScenarioResult {
    pub name: String,
    pub interceptor: Interceptor,
    /// Why it did not run at all (e.g. HAProxy not installed).
    pub skipped: Option<String>,
    /// Why it stopped early (setup failed, the interceptor died).
    pub error: Option<String>,
    pub loads: Loads,
    pub proxy: Option<Stopped>,
    pub elapsed_s: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct Loads {
    pub concurrency: Option<Loaded<HoldFigures>>,
    pub rr: Option<Loaded<rr::Report>>,
    pub bulk: Vec<Loaded<BulkFigures>>,
    pub crr: Option<Loaded<CrrFigures>>,
}

/// A load's outcome: its figures, or why there are none, and which way the
/// workload's connections came during it.
#[derive(Debug, Serialize)]
pub struct Loaded<T> {
    pub report: Option<T>,
    pub error: Option<String>,
    pub peers: Peers,
    /// What other processes took of the machine during the attempt kept.
    pub interference: Interference,
    /// Which attempt this is (1, or more when earlier ones were disturbed).
    pub attempts: u32,
    /// The attempts not kept: how disturbed they were, how many errors.
    pub discarded: Vec<Discarded>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Discarded {
    pub interference: Interference,
    pub errors: u64,
}

impl Discarded {
    fn of<T: Figures>(l: &Loaded<T>) -> Discarded {
        Discarded {
            interference: l.interference.clone(),
            errors: l.report.as_ref().map_or(0, Figures::error_count),
        }
    }
}

/// What every load's figures can tell about themselves.
pub trait Figures {
    fn error_count(&self) -> u64;
}

impl Figures for rr::Report {
    fn error_count(&self) -> u64 {
        self.errors.total()
    }
}

impl Figures for HoldFigures {
    fn error_count(&self) -> u64 {
        self.report.errors.total()
    }
}

impl Figures for BulkFigures {
    fn error_count(&self) -> u64 {
        self.report.errors.total()
    }
}

impl Figures for CrrFigures {
    fn error_count(&self) -> u64 {
        self.report.errors.total()
    }
}

impl<T> Loaded<T> {
    /// Connections that reached the workload without the proxy; None for
    /// `direct`, where that is the point.
    pub fn bypassed(&self, direct: bool) -> Option<u64> {
        (!direct).then_some(self.peers.not_via_proxy)
    }
}

#[derive(Debug, Serialize)]
pub struct BulkFigures {
    #[serde(flatten)]
    pub report: bulk::Report,
    /// utime + stime of the interceptor over the load.
    pub proxy_cpu_s: Option<f64>,
    pub proxy_cpu_s_per_gb: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct HoldFigures {
    #[serde(flatten)]
    pub report: hold::Report,
    pub conntrack_before: Option<u64>,
    pub conntrack_peak: Option<u64>,
    /// (peak − before) / opened.
    pub conntrack_per_connection: Option<f64>,
    pub proxy_rss_before_kib: Option<u64>,
    pub proxy_rss_held_kib: Option<u64>,
    /// (held − before) / opened.
    pub proxy_rss_per_connection_kib: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct CrrFigures {
    #[serde(flatten)]
    pub report: crr::Report,
    /// The pod's conntrack count right after the load: entries of closed
    /// connections linger (TIME_WAIT is 120 s in conntrack).
    pub conntrack_after: Option<u64>,
}

pub fn scenario(scenario: &Scenario, tools: &Tools, profile: &Profile) -> ScenarioResult {
    let start = Instant::now();
    let mut result = ScenarioResult {
        name: scenario.name.clone(),
        interceptor: scenario.interceptor.clone(),
        skipped: None,
        error: None,
        loads: Loads::default(),
        proxy: None,
        elapsed_s: 0.0,
    };
    if scenario.interceptor == Interceptor::Haproxy && tools.haproxy.is_none() {
        let why = "haproxy is not installed (make bench-deps installs it)";
        progress(&scenario.name, "skipped", why);
        result.skipped = Some(why.into());
        return result;
    }
    if let Err(e) = run_loads(scenario, tools, profile, &mut result) {
        progress(&scenario.name, "FAILED", &format!("{e:#}"));
        result.error = Some(format!("{e:#}"));
    }
    result.elapsed_s = start.elapsed().as_secs_f64();
    result
}

fn run_loads(
    scenario: &Scenario,
    tools: &Tools,
    profile: &Profile,
    result: &mut ScenarioResult,
) -> Result<()> {
    let name = scenario.name.as_str();
    let topology =
        ClientPod::new(&format!("b-{}", short(name))).context("building client ⇄ pod")?;
    let (client, pod) = (&topology.client, &topology.pod);
    tune_client(client)?;
    let workload = Workload::start(
        pod,
        SocketAddr::from((ClientPod::POD_V4, PORT)),
        Duration::ZERO,
    )?;
    let target = workload.addr();
    let proxy = Proxy::start(scenario, tools, pod, client, &workload)?;
    let mut bench = Bench {
        name,
        client,
        pod,
        target,
        workload: &workload,
        proxy,
    };
    if let Some(proxy) = &bench.proxy {
        progress(name, "started", &proxy.command);
    }
    let outcome = bench.all(profile, &mut result.loads);
    // Stopped here, while the namespaces still exist, so sluice can remove
    // its rules and report how it ended.
    result.proxy = bench.proxy.take().map(|p| {
        let stopped = p.stop();
        if stopped.log.warnings + stopped.log.errors > 0 {
            progress(
                name,
                "log",
                &format!(
                    "{} warnings, {} errors; first: {}",
                    stopped.log.warnings,
                    stopped.log.errors,
                    stopped
                        .log
                        .first_problems
                        .first()
                        .map_or("", String::as_str)
                ),
            );
        }
        stopped
    });
    outcome
}

/// Namespace names are limited; the purpose keeps the scenario recognisable.
fn short(name: &str) -> String {
    name.chars().take(16).collect()
}

/// The client side must not be the limit: a wide ephemeral port range and
/// reuse of its own TIME_WAIT ports (CRR makes ~10,000 connections a second;
/// the default range of 28,000 ports would run dry within seconds). The pod
/// namespace, where the interceptor lives, keeps the kernel defaults.
fn tune_client(client: &Netns) -> Result<()> {
    client.sysctl_set("net.ipv4.ip_local_port_range", "1024 65535")?;
    client.sysctl_set("net.ipv4.tcp_tw_reuse", "1")?;
    Ok(())
}

struct Bench<'a> {
    name: &'a str,
    client: &'a Netns,
    pod: &'a Netns,
    target: SocketAddr,
    workload: &'a Workload,
    proxy: Option<Proxy>,
}

impl Bench<'_> {
    fn all(&mut self, profile: &Profile, loads: &mut Loads) -> Result<()> {
        if profile.runs(LoadKind::Concurrency) {
            let loaded = self.measure("concurrency", |b| b.hold(profile.hold), profile)?;
            self.say_hold(&loaded);
            loads.concurrency = Some(loaded);
        }
        if profile.runs(LoadKind::Rr) {
            let rr = |b: &Self| rr::run(b.client, b.target, profile.rr);
            let loaded = self.measure("rr", rr, profile)?;
            self.say_rr(&loaded);
            loads.rr = Some(loaded);
        }
        if profile.runs(LoadKind::Bulk) {
            for params in &profile.bulk {
                let load = format!("bulk x{}", params.streams);
                let loaded = self.measure(&load, |b| b.bulk(*params), profile)?;
                self.say_bulk(&loaded);
                loads.bulk.push(loaded);
            }
        }
        if profile.runs(LoadKind::Crr) {
            let loaded = self.measure("crr", |b| b.crr(profile.crr), profile)?;
            self.say_crr(&loaded);
            loads.crr = Some(loaded);
        }
        Ok(())
    }

    /// Runs one load; its failure is recorded and the scenario goes on,
    /// unless the interceptor has died (then nothing after it means anything).
    ///
    /// The cores are shared (other processes, and the hypervisor's other
    /// guests: steal). A disturbed load is repeated, up to the profile's
    /// attempts, after waiting for quiet; the attempt kept is the least
    /// disturbed one — chosen by the disturbance, never by its figures. A
    /// failed attempt ends the repeats and is what gets reported, and the
    /// bypass count covers every attempt, discarded ones too.
    fn measure<T: Figures>(
        &mut self,
        load: &str,
        f: impl Fn(&Self) -> Result<T>,
        profile: &Profile,
    ) -> Result<Loaded<T>> {
        let mut kept: Option<Loaded<T>> = None;
        let mut discarded = Vec::new();
        let mut peers = Peers::default();
        for attempt in 1..=profile.attempts.max(1) {
            self.wait_quiet(load, profile.quiet_wait);
            progress(self.name, load, "running");
            let before = self.workload.peers();
            let monitor = Monitor::start(self.our_pids());
            let outcome = f(self);
            let interference = monitor.stop();
            // Let the last accepts land before counting.
            std::thread::sleep(Duration::from_millis(50));
            peers = peers.plus(self.workload.peers().since(before));
            if let Some(proxy) = self.proxy.as_mut() {
                proxy
                    .check_alive()
                    .with_context(|| format!("after the {load} load"))?;
            }
            let this = match outcome {
                Ok(report) => Loaded {
                    report: Some(report),
                    error: None,
                    peers,
                    interference: interference.clone(),
                    attempts: attempt,
                    discarded: Vec::new(),
                },
                Err(e) => {
                    progress(self.name, load, &format!("FAILED: {e:#}"));
                    Loaded {
                        report: None,
                        error: Some(format!("{e:#}")),
                        peers,
                        interference: interference.clone(),
                        attempts: attempt,
                        discarded: Vec::new(),
                    }
                }
            };
            let failed = this.report.is_none();
            let better = kept
                .as_ref()
                .is_none_or(|k| interference.weight() < k.interference.weight());
            if failed || better {
                if let Some(old) = kept.replace(this) {
                    discarded.push(Discarded::of(&old));
                }
            } else {
                discarded.push(Discarded::of(&this));
            }
            if failed || !interference.disturbed() {
                break;
            }
            if attempt < profile.attempts {
                progress(
                    self.name,
                    load,
                    &format!("disturbed ({}); repeating", interference.describe()),
                );
            }
        }
        let mut loaded = kept.ok_or_else(|| anyhow::anyhow!("no attempt of {load} ran"))?;
        loaded.peers = peers;
        loaded.discarded = discarded;
        if loaded.interference.disturbed() {
            let what = format!(
                "kept despite disturbance ({})",
                loaded.interference.describe()
            );
            progress(self.name, load, &what);
        }
        Ok(loaded)
    }

    fn our_pids(&self) -> Vec<u32> {
        let mut pids = vec![std::process::id()];
        pids.extend(self.proxy.as_ref().and_then(Proxy::pid));
        pids
    }

    /// Waits, at most `limit`, until other processes leave the machine alone.
    fn wait_quiet(&self, load: &str, limit: Duration) {
        let start = Instant::now();
        let mut said = None::<Instant>;
        while start.elapsed() < limit {
            let idle = sysload::sample(self.our_pids(), Duration::from_secs(1));
            if idle.quiet() {
                return;
            }
            if said.is_none_or(|t| t.elapsed() >= Duration::from_secs(15)) {
                let what = format!(
                    "waiting for the machine to go quiet ({}; up to {:.0} s more)",
                    idle.describe(),
                    limit.saturating_sub(start.elapsed()).as_secs_f64()
                );
                progress(self.name, load, &what);
                said = Some(Instant::now());
            }
        }
    }

    fn conntrack(&self) -> Option<u64> {
        // Absent when conntrack is not loaded; then there is nothing to count.
        self.pod
            .sysctl_get("net.netfilter.nf_conntrack_count")
            .ok()
            .and_then(|v| v.parse().ok())
    }

    fn proxy_cpu(&self) -> Option<f64> {
        self.proxy.as_ref().and_then(|p| p.cpu_seconds().ok())
    }

    fn hold(&self, params: hold::Params) -> Result<HoldFigures> {
        let sampler = |open| hold::Sample {
            open,
            conntrack: self.conntrack(),
            proxy_rss_kib: self.proxy.as_ref().and_then(|p| p.rss_kib().ok()),
        };
        let report = hold::run(self.client, self.target, params, &sampler)?;
        let before = report.baseline().copied().unwrap_or_default();
        let conntrack_peak = report.held().filter_map(|s| s.conntrack).max();
        let rss_held = report.held().filter_map(|s| s.proxy_rss_kib).max();
        let per_connection = |held: Option<u64>, before: Option<u64>| {
            let (held, before) = (held?, before?);
            (report.opened > 0).then(|| (held as f64 - before as f64) / report.opened as f64)
        };
        Ok(HoldFigures {
            conntrack_before: before.conntrack,
            conntrack_peak,
            conntrack_per_connection: per_connection(conntrack_peak, before.conntrack),
            proxy_rss_before_kib: before.proxy_rss_kib,
            proxy_rss_held_kib: rss_held,
            proxy_rss_per_connection_kib: per_connection(rss_held, before.proxy_rss_kib),
            report,
        })
    }

    fn bulk(&self, params: bulk::Params) -> Result<BulkFigures> {
        let cpu_before = self.proxy_cpu();
        let report = bulk::run(self.client, self.target, params)?;
        let proxy_cpu_s = cpu_before.zip(self.proxy_cpu()).map(|(a, b)| b - a);
        let gb = report.bytes as f64 / 1e9;
        Ok(BulkFigures {
            proxy_cpu_s,
            proxy_cpu_s_per_gb: proxy_cpu_s.filter(|_| gb > 0.0).map(|cpu| cpu / gb),
            report,
        })
    }

    fn crr(&self, params: crr::Params) -> Result<CrrFigures> {
        let report = crr::run(self.client, self.target, params)?;
        Ok(CrrFigures {
            report,
            conntrack_after: self.conntrack(),
        })
    }

    fn bypass_note(&self, peers: Peers) -> String {
        if self.proxy.is_none() {
            String::new()
        } else if peers.not_via_proxy == 0 {
            ", bypassed 0".into()
        } else {
            format!(
                ", BYPASSED {} (connections that skipped the proxy)",
                peers.not_via_proxy
            )
        }
    }

    fn say_hold(&self, l: &Loaded<HoldFigures>) {
        let Some(f) = &l.report else { return };
        let opt = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{v:.2}"));
        let line = format!(
            "{} open (ramp {:.1} s), conntrack {} → {} ({} per conn), proxy RSS {} KiB per conn{}{}",
            f.report.opened,
            f.report.ramp_s,
            f.conntrack_before.map_or("n/a".into(), |v| v.to_string()),
            f.conntrack_peak.map_or("n/a".into(), |v| v.to_string()),
            opt(f.conntrack_per_connection),
            opt(f.proxy_rss_per_connection_kib),
            errors_note(&f.report.errors),
            self.bypass_note(l.peers),
        );
        progress(self.name, "concurrency", &line);
    }

    fn say_rr(&self, l: &Loaded<rr::Report>) {
        let Some(r) = &l.report else { return };
        let p = &r.latency;
        let line = format!(
            "{}/{} answered, p50 {:.1} p90 {:.1} p99 {:.1} p99.9 {:.1} max {:.1} µs{}{}",
            r.completed,
            r.scheduled,
            p.p50_us,
            p.p90_us,
            p.p99_us,
            p.p999_us,
            p.max_us,
            errors_note(&r.errors),
            self.bypass_note(l.peers),
        );
        progress(self.name, "rr", &line);
    }

    fn say_bulk(&self, l: &Loaded<BulkFigures>) {
        let Some(f) = &l.report else { return };
        let cpu = f
            .proxy_cpu_s_per_gb
            .map_or(String::new(), |c| format!(", proxy {c:.3} CPU s/GB"));
        let line = format!(
            "{:.2} Gbit/s{cpu}{}{}",
            f.report.gbit_per_s,
            errors_note(&f.report.errors),
            self.bypass_note(l.peers),
        );
        progress(
            self.name,
            &format!("bulk x{}", f.report.params.streams),
            &line,
        );
    }

    fn say_crr(&self, l: &Loaded<CrrFigures>) {
        let Some(f) = &l.report else { return };
        let r = &f.report;
        let line = format!(
            "{:.0} conn/s, p50 {:.1} p99 {:.1} µs{}{}",
            r.rate,
            r.latency.p50_us,
            r.latency.p99_us,
            errors_note(&r.errors),
            self.bypass_note(l.peers),
        );
        progress(self.name, "crr", &line);
    }
}

fn errors_note(errors: &Errors) -> String {
    match errors.total() {
        0 => String::new(),
        n => format!(", {n} ERRORS {:?}", errors.0),
    }
}

pub fn progress(scenario: &str, load: &str, what: &str) {
    eprintln!("[{scenario}] {load}: {what}");
}
