//! The run: every scenario gets a fresh client ⇄ pod topology, the workload
//! and its interceptor, set up one after the other and kept up until the end;
//! then the loads go through them. Everything is torn down at the end
//! (guards), also when a load fails or panics.
//!
//! Timed loads (RR, bulk, CRR) run in rounds, the scenarios taking turns
//! within each round and a different scenario starting each round. On a
//! shared machine, load from elsewhere comes and goes over minutes; in turns,
//! every scenario gets its share of good and bad moments instead of one
//! scenario getting all of a bad one, which would make its ratio to `direct`
//! say something about the neighbours rather than about the interceptor.
//! Idle interceptors cost nothing meanwhile (checked: 0 CPU ticks), and any
//! CPU they did use would show as interference.
//!
//! Load order matters: the concurrency load runs first, on an empty
//! conntrack table, and CRR runs last, because its hundreds of thousands of
//! short connections leave TIME_WAIT entries (conntrack and sockets) behind.
//! The exhaustion load comes after everything: it fills the pod's conntrack
//! table and flushes it.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use netlab::{ClientPod, Netns};
use serde::Serialize;

use crate::callgrind::Instructions;
use crate::load::{bulk, crr, exhaust, hold, redis, rr, Errors};
use crate::perf::{self, Syscalls, Traced};
use crate::profile::{LoadKind, Profile};
use crate::scenario::{
    forwarder_in_use, Interceptor, Patience, Proxy, Scenario, Stopped, Tools, PORT,
};
use crate::sysload::{self, Interference, Monitor};
use crate::workload::{Peers, Workload};

#[derive(Debug, Serialize)]
pub struct ScenarioResult {
    pub name: String,
    pub interceptor: Interceptor,
    /// The interception mode asked for (None for `direct`).
    pub mode: Option<String>,
    /// The forwarder asked for: copy, splice, sockmap, or haproxy.
    pub forwarder: Option<String>,
    /// The forwarder sluice said it runs (its ready line): differs from
    /// `forwarder` when sockmap fell back to copy. None for other
    /// interceptors, or when sluice never got ready.
    pub forwarder_in_use: Option<String>,
    /// The only loads this scenario runs (None: all of the profile's).
    pub only: Option<Vec<LoadKind>>,
    /// A policy-size variant: how many ports it gave `--exclude-ports`.
    pub excluded_ports: Option<usize>,
    /// Why it did not run at all (e.g. HAProxy not installed).
    pub skipped: Option<String>,
    /// Why it stopped early (setup failed, the interceptor died).
    pub error: Option<String>,
    pub loads: Loads,
    pub proxy: Option<Stopped>,
    /// Time spent in this scenario's loads.
    pub elapsed_s: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct Loads {
    pub concurrency: Option<Loaded<HoldFigures>>,
    pub rr: Option<Loaded<rr::Report>>,
    pub bulk: Vec<Loaded<BulkFigures>>,
    pub crr: Option<Loaded<CrrFigures>>,
    /// The interceptor's syscalls over a short CRR pass of their own, after
    /// the timed rounds: the counting is never beside a measured figure.
    pub crr_syscalls: Option<Syscalls>,
    /// The same over an RR pass, per request.
    pub rr_syscalls: Option<Syscalls>,
    /// sluice's user-space instructions over a CRR pass of one client,
    /// the last thing measured (`callgrind.rs`).
    #[serde(default)]
    pub crr_instructions: Option<Instructions>,
    /// redis-benchmark, one entry per run of the profile's `redis`.
    pub redis: Vec<Loaded<redis::Report>>,
    pub exhaustion: Option<Loaded<exhaust::Report>>,
}

/// A load's outcome over all its rounds: the merged figures, or why there
/// are none, and which way the workload's connections came.
#[derive(Debug, Serialize)]
pub struct Loaded<T> {
    pub report: Option<T>,
    pub error: Option<String>,
    /// Over every attempt of every round, discarded attempts included.
    pub peers: Peers,
    pub rounds: Vec<Round>,
}

/// One round of a load: how disturbed the kept attempt was, and the
/// attempts that were not kept.
#[derive(Debug, Clone, Serialize)]
pub struct Round {
    pub interference: Interference,
    /// Which attempt was kept (1, or more when earlier ones were disturbed).
    pub attempts: u32,
    pub discarded: Vec<Discarded>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Discarded {
    pub interference: Interference,
    pub errors: u64,
}

/// What every load's figures can do: tell their errors, absorb another round.
pub trait Figures: Sized {
    fn error_count(&self) -> u64;
    fn merge(&mut self, other: Self) -> Result<()>;
    /// Connections the load counted itself, for a server other than the
    /// echo workload (which counts its own).
    fn peers(&self) -> Option<Peers> {
        None
    }
}

impl Figures for redis::Report {
    fn error_count(&self) -> u64 {
        self.errors.total()
    }
    fn merge(&mut self, other: Self) -> Result<()> {
        redis::Report::merge(self, other);
        Ok(())
    }
    fn peers(&self) -> Option<Peers> {
        Some(self.peers)
    }
}

impl Figures for rr::Report {
    fn error_count(&self) -> u64 {
        self.errors.total()
    }
    fn merge(&mut self, other: Self) -> Result<()> {
        rr::Report::merge(self, other)
    }
}

impl Figures for HoldFigures {
    fn error_count(&self) -> u64 {
        self.report.errors.total()
    }
    fn merge(&mut self, _: Self) -> Result<()> {
        bail!("the concurrency load runs once; its samples do not merge")
    }
}

impl Figures for BulkFigures {
    fn error_count(&self) -> u64 {
        self.report.errors.total()
    }
    fn merge(&mut self, other: Self) -> Result<()> {
        self.report.merge(other.report);
        self.proxy_cpu_s = self.proxy_cpu_s.zip(other.proxy_cpu_s).map(|(a, b)| a + b);
        self.proxy_cpu_s_per_gb = cpu_per_gb(self.proxy_cpu_s, self.report.bytes);
        self.machine_cpu_s = self
            .machine_cpu_s
            .zip(other.machine_cpu_s)
            .map(|(a, b)| a + b);
        self.machine_cpu_s_per_gb = cpu_per_gb(self.machine_cpu_s, self.report.bytes);
        Ok(())
    }
}

impl Figures for CrrFigures {
    fn error_count(&self) -> u64 {
        self.report.errors.total()
    }
    fn merge(&mut self, other: Self) -> Result<()> {
        self.report.merge(other.report)?;
        self.conntrack_after = other.conntrack_after;
        self.machine_cpu_s = self
            .machine_cpu_s
            .zip(other.machine_cpu_s)
            .map(|(a, b)| a + b);
        self.machine_cpu_us_per_conn = cpu_per_connection(self.machine_cpu_s, &self.report);
        self.proxy_cpu_s = self.proxy_cpu_s.zip(other.proxy_cpu_s).map(|(a, b)| a + b);
        self.proxy_cpu_us_per_conn = cpu_per_connection(self.proxy_cpu_s, &self.report);
        Ok(())
    }
}

impl<T> Loaded<T> {
    /// Connections that reached the workload without the proxy; None for
    /// `direct`, where that is the point.
    pub fn bypassed(&self, direct: bool) -> Option<u64> {
        (!direct).then_some(self.peers.not_via_proxy)
    }

    /// The worst interference of any kept round.
    pub fn worst(&self) -> Interference {
        let mut worst = Interference::default();
        for r in &self.rounds {
            worst.other_cpu = worst.other_cpu.max(r.interference.other_cpu);
            worst.steal = worst.steal.max(r.interference.steal);
        }
        worst
    }

    pub fn repeats(&self) -> usize {
        self.rounds.iter().map(|r| r.discarded.len()).sum()
    }

    pub fn discarded_errors(&self) -> u64 {
        self.rounds
            .iter()
            .flat_map(|r| &r.discarded)
            .map(|d| d.errors)
            .sum()
    }
}

impl<T: Figures> Loaded<T> {
    /// Takes in the next round of the same load.
    fn absorb(&mut self, other: Loaded<T>) -> Result<()> {
        self.peers = self.peers.plus(other.peers);
        self.rounds.extend(other.rounds);
        if self.error.is_none() {
            self.error = other.error;
        }
        match (&mut self.report, other.report) {
            (Some(mine), Some(theirs)) => mine.merge(theirs)?,
            (mine @ None, theirs) => *mine = theirs,
            (Some(_), None) => {}
        }
        Ok(())
    }
}

#[derive(Debug, Serialize)]
pub struct BulkFigures {
    #[serde(flatten)]
    pub report: bulk::Report,
    /// utime + stime of the interceptor over the load.
    pub proxy_cpu_s: Option<f64>,
    pub proxy_cpu_s_per_gb: Option<f64>,
    /// Busy CPU time of the whole machine over the load: client, workload,
    /// interceptor and the kernel's own threads and softirqs. The one figure
    /// that is fair to sockmap, whose forwarding no process is charged for.
    pub machine_cpu_s: Option<f64>,
    pub machine_cpu_s_per_gb: Option<f64>,
}

fn cpu_per_gb(cpu_s: Option<f64>, bytes: u64) -> Option<f64> {
    let gb = bytes as f64 / 1e9;
    cpu_s.filter(|_| gb > 0.0).map(|cpu| cpu / gb)
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
    /// The pod's conntrack count right after the (last round of the) load:
    /// entries of closed connections linger (TIME_WAIT is 120 s in conntrack).
    pub conntrack_after: Option<u64>,
    /// Busy CPU time of the whole machine over the load, as for bulk: every
    /// connection costs the client, the kernel (twice the handshakes and
    /// teardowns through an interceptor), the interceptor and the workload.
    pub machine_cpu_s: Option<f64>,
    /// `machine_cpu_s` per completed connection, in microseconds.
    pub machine_cpu_us_per_conn: Option<f64>,
    /// The interceptor's own time on a CPU over the load (none for
    /// `direct`). It leaves out what the hypervisor steals, yet moved by
    /// ±13% between runs of one binary under neighbours (cache and memory
    /// contention), no better than the machine's: reported, not gated; the
    /// A/B gates the interceptor's work on its instruction count instead.
    #[serde(default)]
    pub proxy_cpu_s: Option<f64>,
    /// `proxy_cpu_s` per completed connection, in microseconds.
    #[serde(default)]
    pub proxy_cpu_us_per_conn: Option<f64>,
}

fn cpu_per_connection(cpu_s: Option<f64>, report: &crr::Report) -> Option<f64> {
    cpu_s
        .filter(|_| report.completed > 0)
        .map(|cpu| cpu * 1e6 / report.completed as f64)
}

/// Runs every scenario through every load of the profile.
pub fn all(scenarios: &[Scenario], tools: &Tools, profile: &Profile) -> Vec<ScenarioResult> {
    let mut results: Vec<ScenarioResult> = scenarios
        .iter()
        .map(|s| ScenarioResult {
            name: s.name.clone(),
            interceptor: s.interceptor.clone(),
            mode: s.mode(),
            forwarder: s.forwarder(),
            forwarder_in_use: None,
            only: s.only.clone(),
            excluded_ports: s.excluded_ports,
            skipped: None,
            error: None,
            loads: Loads::default(),
            proxy: None,
            elapsed_s: 0.0,
        })
        .collect();
    let mut lives = Vec::new();
    for (index, scenario) in scenarios.iter().enumerate() {
        if scenario.interceptor == Interceptor::Haproxy && tools.haproxy.is_none() {
            let why = "haproxy is not installed (make bench-deps installs it)";
            progress(&scenario.name, "skipped", why);
            results[index].skipped = Some(why.into());
            continue;
        }
        match Live::start(index, scenario, tools) {
            Ok(live) => {
                if let Some(in_use) = live.proxy.as_ref().and_then(Proxy::forwarder_in_use) {
                    if scenario.forwarder().is_some_and(|asked| asked != in_use) {
                        let what = format!(
                            "FELL BACK: asked for {}, sluice forwards with {in_use} (see its log)",
                            scenario.forwarder().unwrap_or_default()
                        );
                        progress(&scenario.name, "forwarder", &what);
                    }
                }
                lives.push(live);
            }
            Err(e) => {
                progress(&scenario.name, "FAILED", &format!("{e:#}"));
                results[index].error = Some(format!("{e:#}"));
            }
        }
    }

    if profile.runs(LoadKind::Concurrency) {
        // Untimed (counts and memory), so one pass, scenario by scenario.
        for live in lives.iter_mut().filter(|l| l.runs(LoadKind::Concurrency)) {
            let hold = |l: &Live| l.hold(profile.hold);
            match live.measure("concurrency", false, &hold, profile) {
                Ok(loaded) => {
                    live.say_hold("concurrency", &loaded);
                    results[live.index].loads.concurrency = Some(loaded);
                }
                Err(e) => live.died(&mut results, e),
            }
        }
    }
    if profile.runs(LoadKind::Rr) {
        let rr = |l: &Live| rr::run(l.client(), l.target, profile.rr);
        interleaved(
            &mut lives,
            &mut results,
            profile,
            (LoadKind::Rr, "rr"),
            rr,
            |l, label, x| l.say_rr(label, x),
            |loads, l| loads.rr = Some(l),
        );
    }
    if profile.runs(LoadKind::Bulk) {
        for params in &profile.bulk {
            let name = format!("bulk x{}", params.streams);
            let bulk = |l: &Live| l.bulk(*params);
            interleaved(
                &mut lives,
                &mut results,
                profile,
                (LoadKind::Bulk, &name),
                bulk,
                |l, label, x| l.say_bulk(label, x),
                |loads, l| loads.bulk.push(l),
            );
        }
    }
    if profile.runs(LoadKind::Crr) {
        let crr = |l: &Live| l.crr(profile.crr);
        interleaved(
            &mut lives,
            &mut results,
            profile,
            (LoadKind::Crr, "crr"),
            crr,
            |l, label, x| l.say_crr(label, x),
            |loads, l| loads.crr = Some(l),
        );
    }
    if profile.runs(LoadKind::Redis) {
        // After CRR, for the same reason: -k 0 leaves TIME_WAIT behind.
        for params in &profile.redis {
            let redis = |l: &Live| l.redis(*params);
            interleaved(
                &mut lives,
                &mut results,
                profile,
                (LoadKind::Redis, params.label()),
                redis,
                |l, label, x| l.say_redis(label, x),
                |loads, l| loads.redis.push(l),
            );
        }
    }
    syscall_pass(&lives, &mut results, tools, profile);
    if profile.runs(LoadKind::Exhaustion) {
        // Untimed (counts), so one pass, scenario by scenario.
        let exhaust =
            |l: &Live| exhaust::run(&l.topology.pod, l.client(), l.target, profile.exhaustion);
        for live in lives
            .iter_mut()
            .filter(|l| !l.dead && l.runs(LoadKind::Exhaustion))
        {
            match live.measure("exhaustion", false, &exhaust, profile) {
                Ok(loaded) => {
                    if let Some(r) = &loaded.report {
                        let line = r.summary() + &live.bypass_note(loaded.peers);
                        progress(&live.name, "exhaustion", &line);
                    }
                    results[live.index].loads.exhaustion = Some(loaded);
                }
                Err(e) => live.died(&mut results, e),
            }
        }
    }

    // Stopped while the namespaces still exist, so sluice can remove its
    // rules and report how it ended.
    for mut live in lives {
        let result = &mut results[live.index];
        result.elapsed_s = live.busy.as_secs_f64();
        let proxy = live.proxy.take();
        let counted = proxy.is_some() && !live.dead && profile.instructions;
        result.proxy = proxy.map(|p| {
            let stopped = p.stop();
            result.forwarder_in_use = stopped.log.ready.as_deref().and_then(forwarder_in_use);
            if stopped.log.warnings + stopped.log.errors > 0 {
                let first = stopped
                    .log
                    .first_problems
                    .first()
                    .map_or("", String::as_str);
                let what = format!(
                    "{} warnings, {} errors; first: {first}",
                    stopped.log.warnings, stopped.log.errors
                );
                progress(&live.name, "log", &what);
            }
            stopped
        });
        if counted && live.runs(LoadKind::Crr) {
            if let Some(counted) = live.instructions(tools) {
                let what = match (counted.per_connection, &counted.error) {
                    (Some(per), _) => format!(
                        "{per:.0} user-space instructions per connection ({} connections)",
                        counted.connections
                    ),
                    (None, Some(e)) => format!("not counted: {e}"),
                    (None, None) => "not counted: no connection completed".into(),
                };
                progress(&live.name, "crr instructions", &what);
                result.loads.crr_instructions = Some(counted);
            }
        }
    }
    results
}

/// After the timed rounds, one short CRR pass and one RR pass per
/// interceptor with perf counting its syscalls: apart, because the count's
/// tracepoint costs the interceptor a little on every syscall, which the
/// timed rounds must not pay.
fn syscall_pass(lives: &[Live], results: &mut [ScenarioResult], tools: &Tools, profile: &Profile) {
    if !profile.syscalls {
        return;
    }
    let crr = crr::Params {
        clients: profile.crr.clients,
        duration: profile.crr.duration.min(SYSCALL_PASS),
    };
    let rr = rr::Params {
        duration: profile.rr.duration.min(SYSCALL_PASS),
        ..profile.rr
    };
    for live in lives.iter().filter(|l| !l.dead) {
        let count = |load: &str, unit: &str, pass: &dyn Fn(&Path) -> Option<Syscalls>| {
            let counted = match &tools.perf {
                Some(perf) => pass(perf),
                None if live.proxy.is_some() => Some(Syscalls {
                    tool: "perf".into(),
                    connections: 0,
                    duration_s: 0.0,
                    syscalls: None,
                    per_connection: None,
                    waits: None,
                    work_per_connection: None,
                    error: Some(
                        "perf is not installed (make bench-deps installs linux-perf)".into(),
                    ),
                }),
                None => None,
            };
            if let Some(c) = &counted {
                let what = match (c.per_connection, &c.error) {
                    (Some(per), _) => format!(
                        "{per:.1} interceptor syscalls per {unit} ({} over {} {unit}s){}",
                        c.syscalls.unwrap_or(0),
                        c.connections,
                        c.work_per_connection
                            .map_or(String::new(), |w| format!(", {w:.2} besides waiting"))
                    ),
                    (None, Some(e)) => format!("not counted: {e}"),
                    (None, None) => format!("not counted: no {unit} completed"),
                };
                progress(&live.name, &format!("{load} syscalls"), &what);
            }
            counted
        };
        if profile.runs(LoadKind::Crr) && live.runs(LoadKind::Crr) {
            results[live.index].loads.crr_syscalls = count("crr", "connection", &|perf| {
                live.load_syscalls(perf, |l| {
                    let r = crr::run(l.client(), l.target, crr)?;
                    Ok((r.completed, r.elapsed_s))
                })
            });
        }
        if profile.runs(LoadKind::Rr) && live.runs(LoadKind::Rr) {
            results[live.index].loads.rr_syscalls = count("rr", "request", &|perf| {
                live.load_syscalls(perf, |l| {
                    let r = rr::run(l.client(), l.target, rr)?;
                    Ok((r.completed, r.measured_s))
                })
            });
        }
    }
}

/// The longest syscall-counting pass: the count per connection settles
/// within a few thousand connections.
pub const SYSCALL_PASS: Duration = Duration::from_secs(2);
/// Under callgrind sluice is some 50 times slower: a few hundred
/// connections, after a few dozen to warm it.
const INSTRUCTIONS_WARMUP: Duration = Duration::from_millis(500);
const INSTRUCTIONS_PASS: Duration = Duration::from_secs(2);

/// Rounds of one timed load, the scenarios taking turns; the rounds of each
/// scenario are merged and handed to `store`.
fn interleaved<T: Figures>(
    lives: &mut [Live],
    results: &mut [ScenarioResult],
    profile: &Profile,
    (kind, load): (LoadKind, &str),
    f: impl Fn(&Live) -> Result<T>,
    say: impl Fn(&Live, &str, &Loaded<T>),
    store: impl Fn(&mut Loads, Loaded<T>),
) {
    let n = lives.len();
    let rounds = profile.rounds.max(1) as usize;
    let mut merged: Vec<Option<Loaded<T>>> = (0..n).map(|_| None).collect();
    for round in 0..rounds {
        for turn in 0..n {
            let j = (turn + round) % n;
            let live = &mut lives[j];
            if live.dead || !live.runs(kind) {
                continue;
            }
            let label = if rounds > 1 {
                format!("{load} {}/{rounds}", round + 1)
            } else {
                load.to_string()
            };
            match live.measure(&label, true, &f, profile) {
                Ok(loaded) => {
                    say(live, &label, &loaded);
                    match &mut merged[j] {
                        Some(all) => {
                            if let Err(e) = all.absorb(loaded) {
                                all.error.get_or_insert(format!("{e:#}"));
                            }
                        }
                        empty @ None => *empty = Some(loaded),
                    }
                }
                Err(e) => live.died(results, e),
            }
        }
    }
    for (live, loaded) in lives.iter().zip(merged) {
        if let Some(loaded) = loaded {
            if rounds > 1 {
                say(live, &format!("{load} (all rounds)"), &loaded);
            }
            store(&mut results[live.index].loads, loaded);
        }
    }
}

/// Where the redis load connects: redis's port on the pod's address.
fn redis_target() -> SocketAddr {
    SocketAddr::from((ClientPod::POD_V4, redis::PORT))
}

/// Namespace names are limited; the purpose keeps the scenario recognisable.
fn short(name: &str) -> String {
    name.chars().take(16).collect()
}

/// The client side must not be the limit: a wide ephemeral port range and
/// reuse of its own TIME_WAIT ports (CRR makes ~10,000 connections a second;
/// the default range of 28,000 ports would run dry within seconds without
/// reuse). The range is 1024-65535, as clients behind a NAT gateway or
/// kube-proxy's masquerade use: their ports overlap those of sluice's own
/// connections to the workload, which come from the client's address, and
/// the benchmark must meet what such clients meet (a connection of sluice's
/// on the mirror image of a client's fails). The pod namespace, where the
/// interceptor lives, keeps the kernel defaults.
fn tune_client(client: &Netns) -> Result<()> {
    client.sysctl_set("net.ipv4.ip_local_port_range", "1024 65535")?;
    client.sysctl_set("net.ipv4.tcp_tw_reuse", "1")?;
    Ok(())
}

/// A scenario that is up: its topology, workload and interceptor. Fields drop
/// in order: the interceptor first, the namespaces last.
struct Live<'a> {
    proxy: Option<Proxy>,
    workload: Workload,
    /// redis-server, when this scenario runs the redis load.
    redis: Option<redis::Server>,
    topology: ClientPod,
    index: usize,
    name: String,
    scenario: Scenario,
    target: SocketAddr,
    patience: &'a Patience,
    /// The interceptor died: no further load for this scenario.
    dead: bool,
    busy: Duration,
}

impl<'a> Live<'a> {
    fn start(index: usize, scenario: &Scenario, tools: &'a Tools) -> Result<Live<'a>> {
        let name = scenario.name.clone();
        let topology =
            ClientPod::new(&format!("b-{}", short(&name))).context("building client ⇄ pod")?;
        tune_client(&topology.client)?;
        let address = SocketAddr::from((ClientPod::POD_V4, PORT));
        let workload = Workload::start(&topology.pod, address, Duration::ZERO)?;
        let redis = match &tools.redis {
            Some(programs) if scenario.has_redis(tools) => {
                let tag = format!("{}-{index}", std::process::id());
                Some(redis::Server::start(
                    &topology.pod,
                    programs,
                    &tools.scratch,
                    &tag,
                )?)
            }
            _ => None,
        };
        let proxy = Proxy::start(scenario, tools, &topology.pod, &topology.client, &workload)?;
        if let Some(server) = &redis {
            server
                .probe(&topology.client, redis_target())
                .with_context(|| format!("scenario {name}: redis through the interceptor"))?;
        }
        if let Some(proxy) = &proxy {
            progress(&name, "started", &proxy.command);
        }
        Ok(Live {
            proxy,
            target: workload.addr(),
            workload,
            redis,
            topology,
            index,
            name,
            scenario: scenario.clone(),
            patience: &tools.patience,
            dead: false,
            busy: Duration::ZERO,
        })
    }

    fn runs(&self, load: LoadKind) -> bool {
        self.scenario.runs(load)
    }

    fn client(&self) -> &Netns {
        &self.topology.client
    }

    fn died(&mut self, results: &mut [ScenarioResult], e: anyhow::Error) {
        progress(&self.name, "FAILED", &format!("{e:#}"));
        self.dead = true;
        results[self.index].error.get_or_insert(format!("{e:#}"));
    }

    /// Runs one round of a load. Its failure is recorded and the run goes
    /// on; an Err means the interceptor died (nothing after that means
    /// anything for this scenario).
    ///
    /// The cores are shared (other processes, and the hypervisor's other
    /// guests: steal). A disturbed round is repeated, up to the profile's
    /// attempts, after waiting for quiet; the attempt kept is the least
    /// disturbed one — chosen by the disturbance, never by its figures. A
    /// failed attempt ends the repeats and is what gets reported, and the
    /// bypass count covers every attempt, discarded ones too.
    ///
    /// Loads whose figures are not times (`timed` false: conntrack counts and
    /// memory) run once, without waiting: a second attempt would start from a
    /// proxy that already grew, and its memory per connection would be wrong.
    fn measure<T: Figures>(
        &mut self,
        load: &str,
        timed: bool,
        f: &impl Fn(&Self) -> Result<T>,
        profile: &Profile,
    ) -> Result<Loaded<T>> {
        let mut kept: Option<(Result<T>, Interference, u32)> = None;
        let mut discarded = Vec::new();
        let mut peers = Peers::default();
        let attempts = if timed { profile.attempts.max(1) } else { 1 };
        for attempt in 1..=attempts {
            if timed {
                self.wait_quiet(load, profile.quiet_wait);
            }
            progress(&self.name, load, "running");
            let started = Instant::now();
            let before = self.workload.peers();
            let monitor = Monitor::start(self.our_pids());
            let outcome = f(self);
            let interference = monitor.stop();
            self.busy += started.elapsed();
            // Let the last accepts land before counting.
            std::thread::sleep(Duration::from_millis(50));
            peers = peers.plus(self.workload.peers().since(before));
            if let Some(counted) = outcome.as_ref().ok().and_then(Figures::peers) {
                peers = peers.plus(counted);
            }
            if let Some(proxy) = self.proxy.as_mut() {
                proxy
                    .check_alive()
                    .with_context(|| format!("after the {load} load"))?;
            }
            let failed = outcome.is_err();
            let disturbed = interference.disturbed();
            let better = kept
                .as_ref()
                .is_none_or(|k| interference.weight() < k.1.weight());
            let this = (outcome, interference, attempt);
            let dropped = if failed || better {
                kept.replace(this)
            } else {
                Some(this)
            };
            if let Some((outcome, interference, _)) = dropped {
                let errors = outcome.as_ref().map_or(0, Figures::error_count);
                discarded.push(Discarded {
                    interference,
                    errors,
                });
            }
            if failed || !disturbed || attempt == attempts {
                break;
            }
            // A repeat costs the run time, as waiting does: both come out of
            // one budget, so a busy machine cannot stretch a run without end.
            if !self.patience.spend(started.elapsed()) {
                progress(&self.name, load, "disturbed; no time left to repeat it");
                break;
            }
            let what = format!(
                "disturbed ({}); repeating",
                kept.as_ref().map_or(String::new(), |k| k.1.describe())
            );
            progress(&self.name, load, &what);
        }
        let (outcome, interference, attempts) =
            kept.ok_or_else(|| anyhow::anyhow!("no attempt of {load} ran"))?;
        if interference.disturbed() {
            let what = format!("kept despite disturbance ({})", interference.describe());
            progress(&self.name, load, &what);
        }
        let (report, error) = match outcome {
            Ok(report) => (Some(report), None),
            Err(e) => {
                progress(&self.name, load, &format!("FAILED: {e:#}"));
                (None, Some(format!("{e:#}")))
            }
        };
        Ok(Loaded {
            report,
            error,
            peers,
            rounds: vec![Round {
                interference,
                attempts,
                discarded,
            }],
        })
    }

    fn our_pids(&self) -> Vec<u32> {
        let mut pids = vec![std::process::id()];
        pids.extend(self.proxy.as_ref().and_then(Proxy::pid));
        pids
    }

    /// Waits, at most `limit` and what is left of the run's budget, until
    /// other processes and guests leave the machine alone.
    fn wait_quiet(&self, load: &str, limit: Duration) {
        let start = Instant::now();
        let mut said = None::<Instant>;
        let limit = limit.min(self.patience.left());
        while start.elapsed() < limit {
            let idle = sysload::sample(self.our_pids(), Duration::from_secs(1));
            if idle.quiet() {
                break;
            }
            if said.is_none_or(|t| t.elapsed() >= Duration::from_secs(15)) {
                let what = format!(
                    "waiting for the machine to go quiet ({}; up to {:.0} s more)",
                    idle.describe(),
                    limit.saturating_sub(start.elapsed()).as_secs_f64()
                );
                progress(&self.name, load, &what);
                said = Some(Instant::now());
            }
        }
        self.patience.spend(start.elapsed());
    }

    fn conntrack(&self) -> Option<u64> {
        // Absent when conntrack is not loaded; then there is nothing to count.
        self.topology
            .pod
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
        let report = hold::run(self.client(), self.target, params, &sampler)?;
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

    fn redis(&self, params: redis::Params) -> Result<redis::Report> {
        let server = self
            .redis
            .as_ref()
            .context("no redis-server in this scenario")?;
        let (client, pod) = (&self.topology.client, &self.topology.pod);
        redis::run(client, pod, server, redis_target(), params)
    }

    fn bulk(&self, params: bulk::Params) -> Result<BulkFigures> {
        let cpu_before = self.proxy_cpu();
        let machine_before = sysload::machine_busy_seconds();
        let report = bulk::run(self.client(), self.target, params)?;
        let proxy_cpu_s = cpu_before.zip(self.proxy_cpu()).map(|(a, b)| b - a);
        let machine_cpu_s = machine_before
            .zip(sysload::machine_busy_seconds())
            .map(|(a, b)| b - a);
        Ok(BulkFigures {
            proxy_cpu_s,
            proxy_cpu_s_per_gb: cpu_per_gb(proxy_cpu_s, report.bytes),
            machine_cpu_s,
            machine_cpu_s_per_gb: cpu_per_gb(machine_cpu_s, report.bytes),
            report,
        })
    }

    fn crr(&self, params: crr::Params) -> Result<CrrFigures> {
        let cpu_before = self.proxy_cpu();
        let machine_before = sysload::machine_busy_seconds();
        let report = crr::run(self.client(), self.target, params)?;
        let proxy_cpu_s = cpu_before.zip(self.proxy_cpu()).map(|(a, b)| b - a);
        let machine_cpu_s = machine_before
            .zip(sysload::machine_busy_seconds())
            .map(|(a, b)| b - a);
        Ok(CrrFigures {
            machine_cpu_us_per_conn: cpu_per_connection(machine_cpu_s, &report),
            machine_cpu_s,
            proxy_cpu_us_per_conn: cpu_per_connection(proxy_cpu_s, &report),
            proxy_cpu_s,
            report,
            conntrack_after: self.conntrack(),
        })
    }

    /// The interceptor's syscalls over one pass of `load`, which returns
    /// what it completed and its duration, counted with perf; None without
    /// an interceptor.
    fn load_syscalls(
        &self,
        perf: &Path,
        load: impl FnOnce(&Live) -> Result<(u64, f64)>,
    ) -> Option<Syscalls> {
        let pid = self.proxy.as_ref().and_then(Proxy::pid)?;
        Some(perf::count_syscalls(perf, pid, || load(self)))
    }

    /// sluice started again under callgrind, for a CRR pass of one client
    /// after a warm-up; None for other interceptors. Its interceptor must
    /// be stopped first (it holds the port and the rules).
    fn instructions(&self, tools: &Tools) -> Option<Instructions> {
        if matches!(
            self.scenario.interceptor,
            Interceptor::None | Interceptor::Haproxy
        ) {
            return None;
        }
        let failed = |e: anyhow::Error| Instructions {
            connections: 0,
            instructions: None,
            per_connection: None,
            error: Some(format!("{e:#}")),
        };
        let Some(callgrind) = &tools.callgrind else {
            return Some(failed(anyhow!(
                "valgrind is not installed (make deps installs it)"
            )));
        };
        let dir = tools
            .scratch
            .join(format!("sl-callgrind-{}-{}", std::process::id(), self.name));
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            return Some(failed(
                anyhow!(e).context(format!("creating {}", dir.display())),
            ));
        }
        let (pod, client) = (&self.topology.pod, &self.topology.client);
        let prefix = callgrind.prefix(&dir);
        let proxy =
            match Proxy::start_under(&prefix, &self.scenario, tools, pod, client, &self.workload) {
                Ok(Some(proxy)) => proxy,
                Ok(None) => return None,
                Err(e) => return Some(failed(e.context("starting sluice under valgrind"))),
            };
        let Some(pid) = proxy.pid() else {
            return Some(failed(anyhow!("sluice under valgrind stopped")));
        };
        let one_client = |duration| crr::Params {
            clients: 1,
            duration,
        };
        // The first connections fill pools and caches the rest reuse.
        let counted = match crr::run(client, self.target, one_client(INSTRUCTIONS_WARMUP)) {
            Err(e) => failed(e.context("warm-up")),
            Ok(_) => callgrind.count(pid, &dir, || {
                Ok(crr::run(client, self.target, one_client(INSTRUCTIONS_PASS))?.completed)
            }),
        };
        proxy.stop();
        let _ = std::fs::remove_dir_all(&dir);
        Some(counted)
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

    fn say_hold(&self, label: &str, l: &Loaded<HoldFigures>) {
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
        progress(&self.name, label, &line);
    }

    fn say_rr(&self, label: &str, l: &Loaded<rr::Report>) {
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
        progress(&self.name, label, &line);
    }

    fn say_bulk(&self, label: &str, l: &Loaded<BulkFigures>) {
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
        progress(&self.name, label, &line);
    }

    fn say_redis(&self, label: &str, l: &Loaded<redis::Report>) {
        let Some(r) = &l.report else { return };
        let p50 = r
            .p50_ms
            .map_or(String::new(), |p| format!(", p50 {p:.3} ms"));
        let line = format!(
            "{:.0} requests/s{p50}, {} requests, {} connections{}{}",
            r.rps,
            r.requests,
            r.connections,
            errors_note(&r.errors),
            self.bypass_note(l.peers),
        );
        progress(&self.name, label, &line);
    }

    fn say_crr(&self, label: &str, l: &Loaded<CrrFigures>) {
        let Some(f) = &l.report else { return };
        let r = &f.report;
        let cpu = f
            .proxy_cpu_us_per_conn
            .map_or(String::new(), |c| format!(", proxy {c:.1} CPU µs/conn"));
        let line = format!(
            "{:.0} conn/s, p50 {:.1} p99 {:.1} µs{cpu}{}{}",
            r.rate,
            r.latency.p50_us,
            r.latency.p99_us,
            errors_note(&r.errors),
            self.bypass_note(l.peers),
        );
        progress(&self.name, label, &line);
    }
}

/// What `make profile` saw of one interceptor under CRR.
pub struct Profiled {
    pub command: String,
    /// The pass under `perf record`.
    pub recorded: crr::Report,
    /// The pass under `perf stat`.
    pub syscalls: Syscalls,
    /// The pass under `strace -c -f` (slowed by it): its connections and
    /// the calls by syscall; or why there is none.
    pub traced: Result<(u64, Vec<Traced>)>,
}

/// Sets up `scenario` alone and runs three CRR passes of `params` through
/// it: one under `perf record` (into `data`), one under `perf stat`, one
/// under `strace` when there is one. Torn down at the end, as a run is.
pub fn profile(
    scenario: &Scenario,
    tools: &Tools,
    params: crr::Params,
    (perf, strace): (&Path, Option<&Path>),
    data: &Path,
) -> Result<Profiled> {
    let mut live = Live::start(0, scenario, tools)?;
    let proxy = live.proxy.as_ref();
    let pid = proxy
        .and_then(Proxy::pid)
        .with_context(|| format!("scenario {} has no interceptor to profile", scenario.name))?;
    let command = proxy.map(|p| p.command.clone()).unwrap_or_default();
    let crr = |l: &Live| crr::run(l.client(), l.target, params);
    progress(&live.name, "profile", "perf record");
    let recorded = perf::record(perf, pid, data, || crr(&live))?;
    progress(&live.name, "profile", "perf stat");
    let syscalls = live
        .load_syscalls(perf, |l| {
            let r = crr(l)?;
            Ok((r.completed, r.elapsed_s))
        })
        .context("the interceptor is gone")?;
    progress(&live.name, "profile", "strace -c -f");
    let traced = match strace {
        Some(strace) => perf::strace_counts(strace, pid, || crr(&live))
            .map(|(report, calls)| (report.completed, calls)),
        None => Err(anyhow::anyhow!("strace is not installed")),
    };
    if let Some(proxy) = live.proxy.as_mut() {
        proxy.check_alive()?;
    }
    Ok(Profiled {
        command,
        recorded,
        syscalls,
        traced,
    })
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
