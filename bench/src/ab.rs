//! `make bench-check`'s same-machine A/B: the base build's sluice and the
//! head's, run in turns on this machine in this job, each figure judged by
//! the change of head against base.
//!
//! A committed baseline from another day and another machine cannot tell a
//! 10% regression from a noisy afternoon; two builds measured side by side
//! can, because whatever slows the machine slows both. The order is A B B A
//! A B ... (base, head, head, base, ...): a drift over the check's minutes
//! (a neighbour starting, a CPU warming) falls on both equally.
//!
//! # Runs
//!
//! Every run is a whole `measure` of the check's scenarios with one of the
//! two sluice binaries and the same sluice-bench (head's): fresh namespaces,
//! fresh processes, so no run inherits another's state and each is an
//! independent sample. There are two kinds:
//!
//! - **count** runs, one per build first (another pair when a count figure
//!   fails, see below): the concurrency load (conntrack entries and memory
//!   per connection) and the interceptor's syscalls, counted by perf over a
//!   CRR pass of one client and an RR pass of one connection. One client at
//!   a time leaves the interceptor nothing to batch, so the count per
//!   connection is the code's, not the moment's (with 8 clients it moved by
//!   0.3-0.4 between scenarios that run the same code, results/2026-12-01-vm).
//! - **timed** runs: RR, bulk (1 and 4 streams) and CRR, each once per run,
//!   no syscall counting beside them, no waiting for quiet and no repeats:
//!   a disturbance falls on either build at random, and the rank test
//!   below takes it as the noise it is.
//!
//! # Gates
//!
//! | gate | figures | fails when |
//! | --- | --- | --- |
//! | exact | errors, bypassed, conntrack peak and after CRR (tproxy, ebpf) | not 0 in any head run |
//! | count | syscalls per connection (CRR) and per request (RR), sluice's user-space instructions per connection (CRR, callgrind), conntrack per connection (redirect), RSS KiB per connection | head − base beyond a fixed tolerance in every count pair |
//! | time | CRR conn/s, machine CPU µs per connection, RR p50, bulk Gbit/s, proxy CPU s per GB | the confidence interval of head/base lies wholly beyond the threshold |
//! | tail | RR p90, p99, p99.9 | the interval lies wholly beyond 5× (a catastrophe) |
//! | shown | every figure of `direct`, which has no interceptor | never: it is the A/A control, the noise of the pairing itself; a time or tail regression whose control got worse too (beyond doubt, or by more than 10%) is undecided: those runs measured the machine |
//!
//! A count gate is deterministic in what it measures, so it needs no test:
//! one extra syscall per connection is +1.0, the tolerance 0.5. Should one
//! pair show it, a second pair (head first this time) must show it too;
//! the check then fails at once, without timed pairs.
//!
//! A time figure's interval is the Moses interval of the shift of
//! log(head) against log(base) (`stats.rs`): 95% two-sided, so each bound
//! is wrong with a probability of at most 2.5%. The verdict compares it
//! with the figure's threshold t (the smallest change the check is meant
//! to catch, as a factor 1 + t):
//!
//! - its lower bound beyond 1 + t: **regression** (worse by more than t,
//!   beyond reasonable doubt);
//! - its upper bound within 1 + t: **ok** (if worse at all, by less than t);
//! - its upper bound beyond 1 / (1 + t) better: **improved**;
//! - otherwise **undecided**: the runs so far are too noisy to say.
//!
//! A regression needs the whole interval beyond the threshold, not just a
//! significant difference: with some fifty time figures in a check, a test
//! at 5% per figure would fail most checks of an unchanged tree, whereas
//! an interval that lies wholly beyond t when nothing changed needs the
//! estimate beyond t by two standard errors of its own, which a noise of
//! the size that made it cannot do but rarely.
//!
//! # How many rounds
//!
//! The number of timed pairs follows the noise: at least [`Plan::min_pairs`]
//! (five runs per build: the fewest whose 95% interval has room inside the
//! samples' range), then one pair at a time while any time figure is
//! undecided or regressed, until [`Plan::max_pairs`] or the time budget. A
//! figure still undecided then passes, and the table says so with its
//! interval: the machine was too noisy to see a change of t in it. A time
//! regression is judged at that end too, not when it first appears: a
//! neighbour's burst over a few runs of one build can put the interval of
//! five pairs beyond t; over more pairs it thins out, a real regression
//! does not. (A count or exact failure needs no more pairs: it ends the
//! check at once.)

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;

use crate::check::{self, Bad, Rule};
use crate::load::{crr, rr};
use crate::profile::{LoadKind, Profile, ProfileName};
use crate::report::Run;
use crate::scenario::Interceptor;
use crate::stats;

/// One-sided level of each bound of a time figure's interval.
pub const ALPHA: f64 = 0.025;
/// Tail latency fails only beyond this many times base's.
pub const CATASTROPHE: f64 = 5.0;
/// Timed pairs at least: five runs per build are the fewest whose 95%
/// interval lies inside the range of the differences (k = 3 of 25).
pub const MIN_PAIRS: usize = 5;
/// Timed pairs at most, while a figure is undecided.
pub const MAX_PAIRS: usize = 10;
/// Minutes of timed pairs after which no further pair starts.
pub const BUDGET_MINUTES: f64 = 20.0;

const CRR_RATE: Gate = Gate::Time {
    bad: Bad::Lower,
    threshold: 0.03,
};
const CRR_CPU: Gate = Gate::Time {
    bad: Bad::Higher,
    threshold: 0.05,
};
const RR_P50: Gate = Gate::Time {
    bad: Bad::Higher,
    threshold: 0.05,
};
const BULK_RATE: Gate = Gate::Time {
    bad: Bad::Lower,
    threshold: 0.05,
};
const BULK_CPU: Gate = Gate::Time {
    bad: Bad::Higher,
    threshold: 0.10,
};
const TAIL: Gate = Gate::Tail {
    bad: Bad::Higher,
    factor: CATASTROPHE,
};
const SYSCALLS: Gate = Gate::Count {
    bad: Bad::Higher,
    tolerance: 0.5,
};
/// Thousands of user-space instructions per connection (callgrind): one
/// binary gave 31.5-32.9 over five passes; 3 is some 1 µs of CPU, a tenth
/// of sluice's own user-space work per connection.
const INSTRUCTIONS: Gate = Gate::Count {
    bad: Bad::Higher,
    tolerance: 3.0,
};
const CONNTRACK_PER_CONN: Gate = Gate::Count {
    bad: Bad::Higher,
    tolerance: 0.05,
};
const RSS_PER_CONN: Gate = Gate::Count {
    bad: Bad::Higher,
    tolerance: 1.0,
};

/// Which build a run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Base,
    Head,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Base => "base",
            Side::Head => "head",
        })
    }
}

/// What a run is for (see the module header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pass {
    Count,
    Timed,
}

impl std::fmt::Display for Pass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Pass::Count => "count",
            Pass::Timed => "timed",
        })
    }
}

/// The loads of a pass: the check profile's sizes, one round, no waiting.
pub fn profile(pass: Pass) -> Profile {
    let mut p = Profile::new(ProfileName::Check);
    p.rounds = 1;
    p.quiet_wait = Duration::ZERO;
    p.attempts = 1;
    p.wait_budget = Duration::ZERO;
    match pass {
        Pass::Count => {
            p.loads = vec![LoadKind::Concurrency, LoadKind::Rr, LoadKind::Crr];
            p.rr = rr::Params {
                connections: 1,
                rate: 1000.0,
                duration: Duration::from_secs(1),
                warmup: 20,
            };
            p.crr = crr::Params {
                clients: 1,
                duration: Duration::from_secs(1),
            };
            p.syscalls = true;
            p.instructions = true;
        }
        Pass::Timed => {
            p.loads = vec![LoadKind::Rr, LoadKind::Bulk, LoadKind::Crr];
            p.syscalls = false;
            p.instructions = false;
        }
    }
    p
}

/// How a figure is judged (see the module header).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "gate", rename_all = "lowercase")]
pub enum Gate {
    Exact,
    Count { bad: Bad, tolerance: f64 },
    Time { bad: Bad, threshold: f64 },
    Tail { bad: Bad, factor: f64 },
    Shown,
}

/// One figure of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct Value {
    pub scenario: String,
    pub figure: String,
    pub gate: Gate,
    pub value: f64,
}

fn value(scenario: &str, figure: impl Into<String>, gate: Gate, v: f64) -> Value {
    Value {
        scenario: scenario.into(),
        figure: figure.into(),
        gate,
        value: v,
    }
}

/// The figures of a run of `pass`, in absolute units (no ratio to direct:
/// the two builds meet on the same machine, so direct is not needed as a
/// yardstick; its own figures are the A/A control).
pub fn figures(run: &Run, pass: Pass) -> Vec<Value> {
    let mut out: Vec<Value> = check::figures(run)
        .into_iter()
        .filter(|m| m.rule == Rule::Zero)
        .map(|m| value(&m.scenario, m.figure, Gate::Exact, m.value))
        .collect();
    for s in run.scenarios.iter().filter(|s| s.skipped.is_none()) {
        let name = s.name.as_str();
        let direct = s.interceptor == Interceptor::None;
        let gate = |g: Gate| if direct { Gate::Shown } else { g };
        let l = &s.loads;
        match pass {
            Pass::Count => {
                let syscalls = [
                    ("crr", "conn", &l.crr_syscalls),
                    ("rr", "req", &l.rr_syscalls),
                ];
                for (load, unit, counted) in syscalls {
                    let Some(c) = counted else { continue };
                    if let Some(work) = c.work_per_connection {
                        let figure = format!("{load} work syscalls/{unit}");
                        out.push(value(name, figure, SYSCALLS, work));
                    }
                    if let Some(all) = c.per_connection {
                        let figure = format!("{load} all syscalls/{unit}");
                        out.push(value(name, figure, Gate::Shown, all));
                    }
                }
                if let Some(per) = l.crr_instructions.as_ref().and_then(|i| i.per_connection) {
                    let figure = "crr k-instructions/conn";
                    out.push(value(name, figure, INSTRUCTIONS, per / 1000.0));
                }
                if let Some(h) = l.concurrency.as_ref().and_then(|x| x.report.as_ref()) {
                    if !direct && !check::keeps_conntrack_empty(&s.interceptor) {
                        if let Some(per) = h.conntrack_per_connection {
                            out.push(value(name, "conntrack/conn", CONNTRACK_PER_CONN, per));
                        }
                    }
                    if let Some(rss) = h.proxy_rss_per_connection_kib {
                        out.push(value(name, "rss KiB/conn", RSS_PER_CONN, rss));
                    }
                }
            }
            Pass::Timed => {
                if let Some(r) = l.rr.as_ref().and_then(|x| x.report.as_ref()) {
                    let p = &r.latency;
                    out.push(value(name, "rr p50 µs", gate(RR_P50), p.p50_us));
                    out.push(value(name, "rr p90 µs", gate(TAIL), p.p90_us));
                    out.push(value(name, "rr p99 µs", gate(TAIL), p.p99_us));
                    out.push(value(name, "rr p99.9 µs", gate(TAIL), p.p999_us));
                }
                for b in l.bulk.iter().filter_map(|b| b.report.as_ref()) {
                    let streams = b.report.params.streams;
                    let figure = format!("bulk x{streams} Gbit/s");
                    out.push(value(name, figure, gate(BULK_RATE), b.report.gbit_per_s));
                    if let Some(cpu) = b.proxy_cpu_s_per_gb {
                        let figure = format!("bulk x{streams} proxy CPU s/GB");
                        out.push(value(name, figure, gate(BULK_CPU), cpu));
                    }
                }
                if let Some(c) = l.crr.as_ref().and_then(|x| x.report.as_ref()) {
                    out.push(value(name, "crr conn/s", gate(CRR_RATE), c.report.rate));
                    if let Some(cpu) = c.machine_cpu_us_per_conn {
                        out.push(value(name, "crr machine CPU µs/conn", gate(CRR_CPU), cpu));
                    }
                }
            }
        }
    }
    out
}

/// Every value of one figure so far, per build, in run order.
#[derive(Debug, Clone, Serialize)]
pub struct Sampled {
    pub scenario: String,
    pub figure: String,
    #[serde(flatten)]
    pub gate: Gate,
    pub base: Vec<f64>,
    pub head: Vec<f64>,
}

/// The figures of all runs so far, in the order they first appeared.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Samples {
    pub figures: Vec<Sampled>,
}

impl Samples {
    pub fn add(&mut self, side: Side, values: Vec<Value>) {
        for v in values {
            let index = match self
                .figures
                .iter()
                .position(|f| f.scenario == v.scenario && f.figure == v.figure)
            {
                Some(i) => i,
                None => {
                    self.figures.push(Sampled {
                        scenario: v.scenario,
                        figure: v.figure,
                        gate: v.gate,
                        base: Vec::new(),
                        head: Vec::new(),
                    });
                    self.figures.len() - 1
                }
            };
            let f = &mut self.figures[index];
            match side {
                Side::Base => f.base.push(v.value),
                Side::Head => f.head.push(v.value),
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    Improved,
    Regression,
    /// A time figure whose interval still straddles its threshold.
    Undecided,
    /// Not judged: the A/A control, or a value a ratio cannot be made of.
    Shown,
    /// Head has it, base does not (a new scenario or figure).
    New,
    /// Base has it, head does not.
    Missing,
}

impl Verdict {
    pub fn fails(self) -> bool {
        matches!(self, Verdict::Regression | Verdict::Missing)
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Ok => "ok",
            Verdict::Improved => "improved",
            Verdict::Regression => "REGRESSION",
            Verdict::Undecided => "undecided",
            Verdict::Shown => "-",
            Verdict::New => "new",
            Verdict::Missing => "MISSING",
        })
    }
}

/// A figure's verdict and what it rests on.
#[derive(Debug, Clone, Serialize)]
pub struct Judged {
    #[serde(flatten)]
    pub sampled: Sampled,
    /// Time, tail and shown figures: head/base (the Hodges-Lehmann
    /// estimate) and its 95% interval; count figures: head − base of the
    /// medians, and the smallest and largest difference of a pair.
    pub estimate: Option<f64>,
    pub low: Option<f64>,
    pub high: Option<f64>,
    pub verdict: Verdict,
}

/// Judges one figure with `alpha` on each side of its interval.
pub fn judge(s: &Sampled, alpha: f64) -> Judged {
    let mut judged = Judged {
        sampled: s.clone(),
        estimate: None,
        low: None,
        high: None,
        verdict: Verdict::Ok,
    };
    judged.verdict = match (s.head.is_empty(), s.base.is_empty()) {
        (true, true) => Verdict::Shown,
        (true, false) => Verdict::Missing,
        (false, base_empty) => match s.gate {
            Gate::Exact => exact(&s.head),
            _ if base_empty => Verdict::New,
            Gate::Count { bad, tolerance } => {
                let (estimate, low, high, verdict) = count(&s.head, &s.base, bad, tolerance);
                judged.estimate = Some(estimate);
                (judged.low, judged.high) = (Some(low), Some(high));
                verdict
            }
            Gate::Time { bad, threshold } => {
                let interval = stats::log_shift(&s.head, &s.base, alpha);
                judged.set_ratio(interval);
                interval.map_or(Verdict::Shown, |i| time(i, bad, threshold))
            }
            Gate::Tail { bad, factor } => {
                let interval = stats::log_shift(&s.head, &s.base, alpha);
                judged.set_ratio(interval);
                interval.map_or(Verdict::Shown, |i| tail(i, bad, factor))
            }
            Gate::Shown => {
                judged.set_ratio(stats::log_shift(&s.head, &s.base, alpha));
                Verdict::Shown
            }
        },
    };
    judged
}

impl Judged {
    fn set_ratio(&mut self, interval: Option<stats::Shift>) {
        if let Some(i) = interval {
            self.estimate = Some(i.estimate.exp());
            self.low = i.low.map(f64::exp);
            self.high = i.high.map(f64::exp);
        }
    }
}

fn exact(head: &[f64]) -> Verdict {
    if head.iter().all(|v| *v == 0.0) {
        Verdict::Ok
    } else {
        Verdict::Regression
    }
}

/// A count figure: the difference of each pair (the i-th head run with the
/// i-th base run), worse-oriented; a regression only when every pair is
/// beyond the tolerance. Returns (median head − median base, smallest pair
/// difference, largest, verdict).
fn count(head: &[f64], base: &[f64], bad: Bad, tolerance: f64) -> (f64, f64, f64, Verdict) {
    let estimate = stats::median(head) - stats::median(base);
    let differences: Vec<f64> = head.iter().zip(base).map(|(h, b)| h - b).collect();
    let low = differences.iter().copied().fold(f64::INFINITY, f64::min);
    let high = differences
        .iter()
        .copied()
        .fold(f64::NEG_INFINITY, f64::max);
    let (worst_best, best_worst) = match bad {
        // The smallest worsening over the pairs, and the smallest improvement.
        Bad::Higher => (low, high),
        Bad::Lower => (-high, -low),
    };
    let verdict = if worst_best > tolerance {
        Verdict::Regression
    } else if best_worst < -tolerance {
        Verdict::Improved
    } else {
        Verdict::Ok
    };
    (estimate, low, high, verdict)
}

/// Worse-oriented bounds of a log shift: (low, high) of how much worse.
fn worse(i: stats::Shift, bad: Bad) -> (Option<f64>, Option<f64>) {
    match bad {
        Bad::Higher => (i.low, i.high),
        Bad::Lower => (i.high.map(|h| -h), i.low.map(|l| -l)),
    }
}

/// A time figure against its threshold (see the module header).
fn time(i: stats::Shift, bad: Bad, threshold: f64) -> Verdict {
    let limit = threshold.ln_1p();
    match worse(i, bad) {
        (Some(low), _) if low > limit => Verdict::Regression,
        (_, Some(high)) if high < -limit => Verdict::Improved,
        (_, Some(high)) if high <= limit => Verdict::Ok,
        _ => Verdict::Undecided,
    }
}

/// A tail figure fails only when it is worse by `factor` beyond doubt.
fn tail(i: stats::Shift, bad: Bad, factor: f64) -> Verdict {
    match worse(i, bad) {
        (Some(low), _) if low > factor.ln() => Verdict::Regression,
        _ => Verdict::Ok,
    }
}

/// How many runs, and when to stop (see the module header).
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub min_pairs: usize,
    pub max_pairs: usize,
    /// For the timed pairs: no new pair starts beyond it once the minimum is
    /// done.
    pub budget: Duration,
}

/// A finished A/B.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub plan: Plan,
    pub runs: Vec<RunNote>,
    pub timed_pairs: usize,
    /// Why no further pair ran.
    pub stopped: String,
    pub judged: Vec<Judged>,
    pub elapsed_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunNote {
    pub side: Side,
    pub pass: Pass,
    pub elapsed_s: f64,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        !self.judged.iter().any(|j| j.verdict.fails())
    }

    pub fn failures(&self) -> usize {
        self.judged.iter().filter(|j| j.verdict.fails()).count()
    }

    pub fn undecided(&self) -> usize {
        self.judged
            .iter()
            .filter(|j| j.verdict == Verdict::Undecided)
            .count()
    }
}

/// The order of the `pair`-th pair: A B, then B A, ...
pub fn order(pair: usize) -> [Side; 2] {
    if pair.is_multiple_of(2) {
        [Side::Base, Side::Head]
    } else {
        [Side::Head, Side::Base]
    }
}

/// The A/A control: no interceptor, so its head and base runs differ only
/// by when they ran.
const CONTROL: &str = "direct";

/// How much worse the control may get (its estimate) before its runs are
/// taken to say more of the machine than of the code.
const CONTROL_MOVED: f64 = 0.10;

/// Judges every figure; a time or tail figure's regression stands only if
/// the control did not get worse in the same figure over the same runs:
/// beyond doubt, or by more than [`CONTROL_MOVED`]. On a VM whose
/// neighbours steal a quarter of its CPU in bursts, the bursts once fell on
/// head's runs in five pairs of five: `direct`'s CRR fell by a third and
/// tproxy's by half, RR p50 rose for both, with one binary on both sides.
/// Such runs say nothing of the code, so the figure is undecided (which
/// passes) rather than a regression.
fn judge_all(samples: &Samples) -> Vec<Judged> {
    let mut judged: Vec<Judged> = samples.figures.iter().map(|s| judge(s, ALPHA)).collect();
    for j in &mut judged {
        let (Gate::Time { bad, .. } | Gate::Tail { bad, .. }) = j.sampled.gate else {
            continue;
        };
        if j.verdict != Verdict::Regression || j.sampled.scenario == CONTROL {
            continue;
        }
        let control = samples
            .figures
            .iter()
            .find(|c| c.scenario == CONTROL && c.figure == j.sampled.figure);
        let control_moved = control
            .and_then(|c| stats::log_shift(&c.head, &c.base, ALPHA))
            .is_some_and(|i| {
                let estimate = match bad {
                    Bad::Higher => i.estimate,
                    Bad::Lower => -i.estimate,
                };
                estimate > CONTROL_MOVED.ln_1p() || worse(i, bad).0.is_some_and(|low| low > 0.0)
            });
        if control_moved {
            j.verdict = Verdict::Undecided;
        }
    }
    judged
}

/// Whether a gate judges a time figure (decided over the timed pairs).
fn timed(gate: Gate) -> bool {
    matches!(gate, Gate::Time { .. } | Gate::Tail { .. })
}

/// Runs the A/B: `measure` makes one run of a build and returns its
/// figures. Count pairs first, then timed pairs as the noise asks.
pub fn run(
    plan: &Plan,
    mut measure: impl FnMut(Side, Pass) -> Result<Vec<Value>>,
) -> Result<Outcome> {
    let start = Instant::now();
    let mut samples = Samples::default();
    let mut runs = Vec::new();
    let mut one = |side: Side, pass: Pass, samples: &mut Samples| -> Result<()> {
        let t = Instant::now();
        let values = measure(side, pass)?;
        samples.add(side, values);
        runs.push(RunNote {
            side,
            pass,
            elapsed_s: t.elapsed().as_secs_f64(),
        });
        Ok(())
    };

    for side in order(0) {
        one(side, Pass::Count, &mut samples)?;
    }
    let count_failed = |samples: &Samples| {
        judge_all(samples)
            .iter()
            .any(|j| matches!(j.sampled.gate, Gate::Count { .. }) && j.verdict.fails())
    };
    if count_failed(&samples) {
        eprintln!(
            "sluice-bench: a count figure is beyond its tolerance; a second count pair, head \
             first, must show it too"
        );
        for side in order(1) {
            one(side, Pass::Count, &mut samples)?;
        }
    }

    let timed_start = Instant::now();
    let mut pairs = 0;
    let stopped = loop {
        // Two count pairs that agree are a verdict no timed pair can undo:
        // the check fails now, not twenty minutes from now.
        if pairs == 0 && count_failed(&samples) {
            break "a count figure failed in both count pairs: no timed pairs".to_string();
        }
        if pairs >= plan.min_pairs {
            let judged = judge_all(&samples);
            if judged
                .iter()
                .any(|j| j.verdict.fails() && !timed(j.sampled.gate))
            {
                break "a figure already failed".to_string();
            }
            // A time regression is not final until the most pairs (or the
            // budget): a burst of a neighbour's work that fell on one
            // build's runs can put an interval of five pairs beyond its
            // threshold (unchanged code failed 1 check in 10 that way,
            // RR p50 +35%), and more pairs dilute it, whereas a real
            // regression holds in every pair and stays.
            let open = judged
                .iter()
                .filter(|j| {
                    j.verdict == Verdict::Undecided
                        || (j.verdict == Verdict::Regression && timed(j.sampled.gate))
                })
                .count();
            if open == 0 {
                break "every time figure decided".to_string();
            }
            if pairs >= plan.max_pairs {
                break format!(
                    "{open} time figures undecided or regressed after the most pairs, {pairs}"
                );
            }
            let per_pair = timed_start.elapsed() / pairs.max(1) as u32;
            if timed_start.elapsed() + per_pair > plan.budget {
                break format!(
                    "{open} time figures undecided or regressed, and another pair ({:.0} s) \
                     would pass the budget of {:.0} s",
                    per_pair.as_secs_f64(),
                    plan.budget.as_secs_f64()
                );
            }
            eprintln!(
                "sluice-bench: {open} time figures undecided or regressed after {pairs} pairs: \
                 one more"
            );
        }
        for side in order(pairs) {
            one(side, Pass::Timed, &mut samples)?;
        }
        pairs += 1;
    };
    Ok(Outcome {
        plan: plan.clone(),
        runs,
        timed_pairs: pairs,
        stopped,
        judged: judge_all(&samples),
        elapsed_s: start.elapsed().as_secs_f64(),
    })
}

/// A figure with as many decimals as its size deserves.
pub fn number(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 {
        "0".into()
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 0.1 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn spread(values: &[f64]) -> String {
    if values.is_empty() {
        return "—".into();
    }
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let median = number(stats::median(values));
    if min == max {
        median
    } else {
        format!("{median} [{}–{}]", number(min), number(max))
    }
}

fn percent(ratio: f64) -> String {
    format!("{:+.1}%", (ratio - 1.0) * 100.0)
}

/// The change column: head/base and its interval, or head − base.
fn change(j: &Judged) -> String {
    match (j.sampled.gate, j.estimate) {
        (_, None) => "—".into(),
        (Gate::Count { .. }, Some(d)) => {
            let signed = |v: f64| {
                if v >= 0.0 {
                    format!("+{}", number(v))
                } else {
                    number(v)
                }
            };
            match (j.low, j.high) {
                (Some(l), Some(h)) if l != h => {
                    format!("{} (pairs {}…{})", signed(d), signed(l), signed(h))
                }
                _ => signed(d),
            }
        }
        (_, Some(r)) => match (j.low, j.high) {
            (Some(l), Some(h)) => format!("{} [{}, {}]", percent(r), percent(l), percent(h)),
            _ => format!("{} [no interval yet]", percent(r)),
        },
    }
}

fn limit(gate: Gate) -> String {
    match gate {
        Gate::Exact => "= 0".into(),
        Gate::Count {
            bad: Bad::Higher,
            tolerance,
        } => format!("≤ +{}", number(tolerance)),
        Gate::Count {
            bad: Bad::Lower,
            tolerance,
        } => format!("≥ −{}", number(tolerance)),
        Gate::Time {
            bad: Bad::Higher,
            threshold,
        } => format!("≤ +{:.0}%", threshold * 100.0),
        Gate::Time {
            bad: Bad::Lower,
            threshold,
        } => format!("≥ −{:.1}%", (1.0 - 1.0 / (1.0 + threshold)) * 100.0),
        Gate::Tail {
            bad: Bad::Higher,
            factor,
        } => format!("< {factor}×"),
        Gate::Tail {
            bad: Bad::Lower,
            factor,
        } => format!("> 1/{factor}"),
        Gate::Shown => "A/A control".into(),
    }
}

/// The table for the CI log.
pub fn table(o: &Outcome) -> String {
    let header = [
        "scenario", "figure", "base", "head", "change", "limit", "verdict",
    ];
    let lines: Vec<[String; 7]> = o
        .judged
        .iter()
        .map(|j| {
            [
                j.sampled.scenario.clone(),
                j.sampled.figure.clone(),
                spread(&j.sampled.base),
                spread(&j.sampled.head),
                change(j),
                limit(j.sampled.gate),
                j.verdict.to_string(),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for line in &lines {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut row = |cells: &[&str]| {
        let mut line = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            let pad = " ".repeat(w - cell.chars().count());
            if i < 2 || i == 6 {
                let _ = write!(line, "{cell}{pad}  ");
            } else {
                let _ = write!(line, "{pad}{cell}  ");
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    };
    row(&header);
    for line in &lines {
        row(&line.each_ref().map(String::as_str));
    }
    out
}

/// One line per kind of verdict, for the end of the log.
pub fn summary(o: &Outcome) -> String {
    let mut by: BTreeMap<String, usize> = BTreeMap::new();
    for j in &o.judged {
        *by.entry(j.verdict.to_string()).or_default() += 1;
    }
    let counts: Vec<String> = by.iter().map(|(v, n)| format!("{n} {v}")).collect();
    let base_runs = o.runs.iter().filter(|r| r.side == Side::Base).count();
    format!(
        "{} figures ({}), {} runs ({} per build: {} timed pairs, {} count runs) in {:.0} s; \
         stopped: {}",
        o.judged.len(),
        counts.join(", "),
        o.runs.len(),
        base_runs,
        o.timed_pairs,
        o.runs.iter().filter(|r| r.pass == Pass::Count).count(),
        o.elapsed_s,
        o.stopped
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampled(gate: Gate, base: &[f64], head: &[f64]) -> Sampled {
        Sampled {
            scenario: "tproxy".into(),
            figure: "f".into(),
            gate,
            base: base.to_vec(),
            head: head.to_vec(),
        }
    }

    fn verdict(gate: Gate, base: &[f64], head: &[f64]) -> Verdict {
        judge(&sampled(gate, base, head), ALPHA).verdict
    }

    /// Five runs with ±1% of noise around `level`.
    fn noisy(level: f64) -> Vec<f64> {
        [1.00, 1.01, 0.995, 1.005, 0.99]
            .iter()
            .map(|x| x * level)
            .collect()
    }

    #[test]
    fn the_order_is_abba() {
        let runs: Vec<Side> = (0..4).flat_map(order).collect();
        use Side::{Base as A, Head as B};
        assert_eq!(runs, [A, B, B, A, A, B, B, A]);
    }

    #[test]
    fn a_time_figure_within_noise_is_ok_and_a_slowdown_fails() {
        let base = noisy(10_000.0);
        assert_eq!(verdict(CRR_RATE, &base, &noisy(10_000.0)), Verdict::Ok);
        // 10% fewer connections per second, well outside the noise.
        assert_eq!(
            verdict(CRR_RATE, &base, &noisy(9_000.0)),
            Verdict::Regression
        );
        // 10% more: better beyond the threshold.
        assert_eq!(
            verdict(CRR_RATE, &base, &noisy(11_000.0)),
            Verdict::Improved
        );
        // Higher is bad for latency: the same 10% the other way round.
        assert_eq!(
            verdict(RR_P50, &noisy(50.0), &noisy(55.0)),
            Verdict::Regression
        );
        assert_eq!(
            verdict(RR_P50, &noisy(50.0), &noisy(45.0)),
            Verdict::Improved
        );
    }

    #[test]
    fn noise_wider_than_the_threshold_is_undecided_not_failed() {
        let base = [100.0, 130.0, 80.0, 110.0, 95.0];
        let head = [90.0, 120.0, 75.0, 125.0, 100.0];
        assert_eq!(verdict(CRR_RATE, &base, &head), Verdict::Undecided);
        // Too few runs for an interval: undecided as well.
        assert_eq!(
            verdict(CRR_RATE, &[100.0, 101.0], &[50.0, 51.0]),
            Verdict::Undecided
        );
    }

    #[test]
    fn a_change_within_the_threshold_is_ok_even_when_significant() {
        // 1% slower, consistently: real, but below the 3% the check is for.
        let base = noisy(10_000.0);
        let head: Vec<f64> = base.iter().map(|b| b * 0.99).collect();
        assert_eq!(verdict(CRR_RATE, &base, &head), Verdict::Ok);
    }

    #[test]
    fn tail_latency_fails_only_at_a_catastrophe() {
        let base = noisy(200.0);
        // Three times worse: reported, passes.
        let j = judge(&sampled(TAIL, &base, &noisy(600.0)), ALPHA);
        assert_eq!(j.verdict, Verdict::Ok);
        assert!((j.estimate.unwrap() - 3.0).abs() < 0.01, "{j:?}");
        // Ten times worse in every run: beyond 5× without a doubt.
        assert_eq!(verdict(TAIL, &base, &noisy(2_000.0)), Verdict::Regression);
        // One run of ten times among ordinary ones: a stall, not a catastrophe.
        let mut head = noisy(200.0);
        head[2] = 2_000.0;
        assert_eq!(verdict(TAIL, &base, &head), Verdict::Ok);
    }

    #[test]
    fn counts_fail_when_every_pair_is_beyond_the_tolerance() {
        // One extra syscall per connection.
        assert_eq!(verdict(SYSCALLS, &[16.4], &[17.4]), Verdict::Regression);
        assert_eq!(verdict(SYSCALLS, &[16.4], &[16.8]), Verdict::Ok);
        assert_eq!(verdict(SYSCALLS, &[16.4], &[15.4]), Verdict::Improved);
        // The confirming pair did not show it: noise.
        assert_eq!(verdict(SYSCALLS, &[16.4, 16.5], &[17.4, 16.6]), Verdict::Ok);
        assert_eq!(
            verdict(SYSCALLS, &[16.4, 16.5], &[17.4, 17.6]),
            Verdict::Regression
        );
        let j = judge(&sampled(SYSCALLS, &[16.4, 16.5], &[17.4, 17.6]), ALPHA);
        assert!((j.estimate.unwrap() - 1.05).abs() < 1e-9, "{j:?}");
    }

    #[test]
    fn exact_figures_look_at_head_only() {
        assert_eq!(verdict(Gate::Exact, &[3.0], &[0.0, 0.0]), Verdict::Ok);
        assert_eq!(
            verdict(Gate::Exact, &[0.0], &[0.0, 1.0]),
            Verdict::Regression
        );
        // Also when base never had the figure (a new scenario).
        assert_eq!(verdict(Gate::Exact, &[], &[2.0]), Verdict::Regression);
    }

    #[test]
    fn missing_new_and_unmeasurable() {
        assert_eq!(verdict(CRR_RATE, &noisy(1.0), &[]), Verdict::Missing);
        assert_eq!(verdict(CRR_RATE, &[], &noisy(1.0)), Verdict::New);
        assert_eq!(verdict(SYSCALLS, &[], &[3.0]), Verdict::New);
        // A CPU figure of 0 ticks: no ratio, not judged.
        assert_eq!(
            verdict(BULK_CPU, &[0.0, 0.1, 0.1, 0.1, 0.1], &noisy(0.1)),
            Verdict::Shown
        );
        assert_eq!(
            verdict(Gate::Shown, &noisy(1.0), &noisy(2.0)),
            Verdict::Shown
        );
        assert!(Verdict::Missing.fails() && Verdict::Regression.fails());
        assert!(!Verdict::Undecided.fails() && !Verdict::New.fails());
    }

    fn crr(scenario: &str, rate: f64) -> Vec<Value> {
        vec![
            value(scenario, "errors", Gate::Exact, 0.0),
            value(scenario, "crr conn/s", CRR_RATE, rate),
        ]
    }

    /// `direct`'s CRR rate, shown and never judged, as the check has it.
    fn control(rate: f64) -> Vec<Value> {
        vec![value(CONTROL, "crr conn/s", Gate::Shown, rate)]
    }

    fn plan(min_pairs: usize, max_pairs: usize) -> Plan {
        Plan {
            min_pairs,
            max_pairs,
            budget: Duration::from_secs(3600),
        }
    }

    #[test]
    fn rounds_stop_once_every_figure_is_decided() {
        let mut calls = Vec::new();
        let mut i = 0usize;
        let outcome = run(&plan(5, 10), |side, pass| {
            calls.push((side, pass));
            i += 1;
            let wobble = [1.0, 1.005, 0.995, 1.01, 0.99][i % 5];
            Ok(match pass {
                Pass::Count => vec![value("tproxy", "syscalls", SYSCALLS, 16.0)],
                Pass::Timed => crr("tproxy", 10_000.0 * wobble),
            })
        })
        .unwrap();
        assert!(outcome.passed(), "{}", table(&outcome));
        assert_eq!(outcome.timed_pairs, 5, "{}", summary(&outcome));
        assert_eq!(calls.len(), 2 + 10);
        assert_eq!(calls[0], (Side::Base, Pass::Count));
        assert_eq!(calls[2..6].iter().map(|c| c.0).collect::<Vec<_>>(), {
            use Side::{Base as A, Head as B};
            [A, B, B, A]
        });
    }

    #[test]
    fn rounds_go_on_while_noise_hides_the_answer() {
        let mut i = 0usize;
        let outcome = run(&plan(5, 8), |side, pass| {
            i += 1;
            // ±20%: a 3% threshold cannot be decided either way.
            let wobble = [1.0, 1.2, 0.8, 1.1, 0.9, 1.15, 0.85][i % 7];
            let rate = match side {
                Side::Base => 10_000.0,
                Side::Head => 9_900.0,
            };
            Ok(match pass {
                Pass::Count => Vec::new(),
                Pass::Timed => crr("tproxy", rate * wobble),
            })
        })
        .unwrap();
        assert_eq!(outcome.timed_pairs, 8, "{}", summary(&outcome));
        assert!(outcome.passed(), "undecided passes: {}", table(&outcome));
        assert_eq!(outcome.undecided(), 1);
    }

    #[test]
    fn a_time_regression_must_hold_over_the_most_pairs() {
        // One binary on both sides; a neighbour's burst slows head's runs
        // of the first five pairs by 12%, then leaves.
        let mut head_runs = 0;
        let outcome = run(&plan(5, 10), |side, pass| {
            let wobble = [1.0, 1.005, 0.995, 1.01, 0.99][head_runs % 5];
            let rate = match side {
                Side::Base => 10_000.0 * wobble,
                Side::Head => {
                    head_runs += 1;
                    let burst = if head_runs <= 5 { 0.88 } else { 1.0 };
                    10_000.0 * wobble * burst
                }
            };
            Ok(match pass {
                Pass::Count => Vec::new(),
                Pass::Timed => crr("tproxy", rate),
            })
        })
        .unwrap();
        assert!(outcome.timed_pairs > 5, "{}", summary(&outcome));
        assert!(outcome.passed(), "{}", table(&outcome));
        // A slowdown in every head run stays one to the end.
        let outcome = run(&plan(5, 7), |side, pass| {
            let rate = match side {
                Side::Base => 10_000.0,
                Side::Head => 8_800.0,
            };
            Ok(match pass {
                Pass::Count => Vec::new(),
                Pass::Timed => crr("tproxy", rate),
            })
        })
        .unwrap();
        assert_eq!(outcome.timed_pairs, 7, "{}", summary(&outcome));
        assert!(!outcome.passed(), "{}", table(&outcome));
    }

    #[test]
    fn a_regression_the_control_shows_too_is_undecided() {
        // tproxy's CRR 40% lower in head's runs; the control's as given.
        let with_control = |control_head: f64| {
            run(&plan(5, 5), |side, pass| {
                let (rate, control_rate) = match side {
                    Side::Base => (10_000.0, 25_000.0),
                    Side::Head => (6_000.0, control_head),
                };
                Ok(match pass {
                    Pass::Count => Vec::new(),
                    Pass::Timed => [control(control_rate), crr("tproxy", rate)].concat(),
                })
            })
            .unwrap()
        };
        // One binary on both sides; head's runs met the neighbours' bursts.
        let outcome = with_control(15_000.0);
        assert!(outcome.passed(), "{}", table(&outcome));
        // Without the control's drop, the same drop of tproxy fails.
        let outcome = with_control(25_000.0);
        assert!(!outcome.passed(), "{}", table(&outcome));
    }

    #[test]
    fn a_count_regression_is_confirmed_by_a_second_pair() {
        let mut count_runs = 0;
        let outcome = run(&plan(5, 5), |side, pass| {
            Ok(match pass {
                Pass::Count => {
                    count_runs += 1;
                    let extra = if side == Side::Head { 1.0 } else { 0.0 };
                    vec![value("tproxy", "syscalls", SYSCALLS, 16.0 + extra)]
                }
                Pass::Timed => crr("tproxy", 10_000.0),
            })
        })
        .unwrap();
        assert_eq!(count_runs, 4);
        assert!(!outcome.passed());
        // Confirmed, it fails the check with no timed pair at all.
        assert_eq!(outcome.timed_pairs, 0);
    }

    #[test]
    fn a_count_figure_that_one_pair_alone_shows_runs_the_timed_pairs() {
        let mut count_runs = 0;
        let outcome = run(&plan(5, 5), |side, pass| {
            Ok(match pass {
                Pass::Count => {
                    count_runs += 1;
                    // Only the first pair's head shows a syscall more.
                    let extra = if side == Side::Head && count_runs <= 2 {
                        1.0
                    } else {
                        0.0
                    };
                    vec![value("tproxy", "syscalls", SYSCALLS, 16.0 + extra)]
                }
                Pass::Timed => crr("tproxy", 10_000.0),
            })
        })
        .unwrap();
        assert_eq!(count_runs, 4);
        assert_eq!(outcome.timed_pairs, 5, "{}", summary(&outcome));
        assert!(outcome.passed(), "{}", table(&outcome));
    }

    #[test]
    fn the_table_shows_intervals_and_limits() {
        let outcome = Outcome {
            plan: plan(5, 5),
            runs: Vec::new(),
            timed_pairs: 5,
            stopped: "test".into(),
            judged: vec![
                judge(&sampled(CRR_RATE, &noisy(1e4), &noisy(9e3)), ALPHA),
                judge(&sampled(SYSCALLS, &[16.4], &[17.4]), ALPHA),
            ],
            elapsed_s: 1.0,
        };
        let text = table(&outcome);
        assert!(text.contains("-10.0% ["), "{text}");
        assert!(text.contains("≥ −2.9%"), "{text}");
        assert!(text.contains("+1.00"), "{text}");
        assert!(text.contains("≤ +0.50"), "{text}");
        assert_eq!(text.matches("REGRESSION").count(), 2, "{text}");
        assert!(summary(&outcome).contains("2 REGRESSION"));
    }
}
