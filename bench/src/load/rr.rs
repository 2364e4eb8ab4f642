//! RR: request/response latency on persistent connections at a fixed
//! aggregate rate, corrected for coordinated omission.
//!
//! Each connection has its own thread and schedule: request k is due at
//! `t0 + phase + k * interval`. Latency is measured from that due time, not
//! from when the request was actually sent, so a stall that delays the
//! following requests is charged to them too (wrk2's correction). The
//! uncorrected service time (from the actual send) is recorded as well.
//!
//! Threads and blocking sockets rather than an async runtime: tokio's timer
//! has a 1 ms granularity, which would swamp differences of tens of
//! microseconds; `nanosleep` with a 1 ns timer slack wakes within a few µs.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use hdrhistogram::Histogram;
use netlab::Netns;
use serde::Serialize;

use super::{histogram, message, record, Errors, Percentiles, IO_TIMEOUT, MESSAGE};
use crate::workload::ECHO;

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Params {
    pub connections: usize,
    /// Requests per second, all connections together.
    pub rate: f64,
    pub duration: Duration,
    /// Unrecorded round trips per connection before the clock starts.
    pub warmup: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub params: Params,
    /// Requests due over the run.
    pub scheduled: u64,
    /// Requests still unsent when the run's grace period ended (overload).
    pub unsent: u64,
    /// Requests answered with their exact echo.
    pub completed: u64,
    pub achieved_rate: f64,
    pub errors: Errors,
    /// From the due time (corrected for coordinated omission).
    pub latency: Percentiles,
    /// From the actual send (not corrected; for reference).
    pub service: Percentiles,
    /// `(nines, µs)` of the corrected latency, for the plot.
    pub curve: Vec<(f64, f64)>,
    /// Runs merged into this report, and their total length.
    pub rounds: u32,
    pub measured_s: f64,
    #[serde(skip)]
    corrected_h: Histogram<u64>,
    #[serde(skip)]
    service_h: Histogram<u64>,
}

impl Report {
    fn new(
        params: Params,
        totals: Totals,
        corrected: Histogram<u64>,
        service: Histogram<u64>,
    ) -> Report {
        let measured_s = params.duration.as_secs_f64();
        Report {
            params,
            scheduled: totals.scheduled,
            unsent: totals.unsent,
            completed: totals.completed,
            achieved_rate: totals.completed as f64 / measured_s,
            errors: totals.errors,
            latency: Percentiles::of(&corrected),
            service: Percentiles::of(&service),
            curve: super::percentile_curve(&corrected),
            rounds: 1,
            measured_s,
            corrected_h: corrected,
            service_h: service,
        }
    }

    /// Adds another run of the same load: counts add up, percentiles are
    /// those of all requests together.
    pub fn merge(&mut self, other: Report) -> Result<()> {
        self.scheduled += other.scheduled;
        self.unsent += other.unsent;
        self.completed += other.completed;
        self.errors.merge(other.errors);
        self.rounds += other.rounds;
        self.measured_s += other.measured_s;
        self.achieved_rate = self.completed as f64 / self.measured_s;
        self.corrected_h
            .add(&other.corrected_h)
            .context("merging histograms")?;
        self.service_h
            .add(&other.service_h)
            .context("merging histograms")?;
        self.latency = Percentiles::of(&self.corrected_h);
        self.service = Percentiles::of(&self.service_h);
        self.curve = super::percentile_curve(&self.corrected_h);
        Ok(())
    }
}

#[derive(Default)]
struct Totals {
    scheduled: u64,
    unsent: u64,
    completed: u64,
    errors: Errors,
}

/// How long past its end a run may keep sending late requests.
const GRACE: Duration = Duration::from_secs(1);

struct ConnectionResult {
    scheduled: u64,
    unsent: u64,
    completed: u64,
    errors: Errors,
    corrected: Histogram<u64>,
    service: Histogram<u64>,
}

pub fn run(client: &Netns, target: SocketAddr, params: Params) -> Result<Report> {
    ensure!(params.connections > 0, "RR needs at least one connection");
    ensure!(params.rate > 0.0, "RR needs a positive rate");
    let interval = Duration::from_secs_f64(params.connections as f64 / params.rate);
    client.try_run(|| -> Result<Report> {
        let mut streams = Vec::with_capacity(params.connections);
        for index in 0..params.connections {
            let stream = open(target, params.warmup, index as u64)
                .with_context(|| format!("RR connection {index} to {target}"))?;
            streams.push(stream);
        }
        let t0 = Instant::now() + Duration::from_millis(20);
        let end = t0 + params.duration;
        let results: Vec<ConnectionResult> = std::thread::scope(|s| {
            let workers: Vec<_> = streams
                .into_iter()
                .enumerate()
                .map(|(index, stream)| {
                    let phase = interval.mul_f64(index as f64 / params.connections as f64);
                    s.spawn(move || connection(stream, index as u64, t0 + phase, interval, end))
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        let mut corrected = histogram();
        let mut service = histogram();
        let mut totals = Totals::default();
        for r in results {
            totals.scheduled += r.scheduled;
            totals.unsent += r.unsent;
            totals.completed += r.completed;
            totals.errors.merge(r.errors);
            corrected.add(&r.corrected).context("merging histograms")?;
            service.add(&r.service).context("merging histograms")?;
        }
        Ok(Report::new(params, totals, corrected, service))
    })?
}

fn open(target: SocketAddr, warmup: usize, index: u64) -> std::io::Result<TcpStream> {
    let mut stream = TcpStream::connect_timeout(&target, IO_TIMEOUT)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.write_all(&[ECHO])?;
    let mut reply = [0u8; MESSAGE];
    for k in 0..warmup {
        let request = message(index, u64::MAX - k as u64);
        stream.write_all(&request)?;
        stream.read_exact(&mut reply)?;
        if reply != request {
            return Err(std::io::Error::other("warm-up reply is not the echo"));
        }
    }
    Ok(stream)
}

fn connection(
    mut stream: TcpStream,
    index: u64,
    first: Instant,
    interval: Duration,
    end: Instant,
) -> ConnectionResult {
    // Without this, nanosleep may wake up to 50 µs late (the default slack),
    // and every such delay would count as latency.
    let _ = nix::sys::prctl::set_timerslack(1);
    let mut result = ConnectionResult {
        scheduled: 0,
        unsent: 0,
        completed: 0,
        errors: Errors::default(),
        corrected: histogram(),
        service: histogram(),
    };
    let mut reply = [0u8; MESSAGE];
    let mut broken = false;
    let give_up = end + GRACE;
    for k in 0u64.. {
        let due = first + interval.mul_f64(k as f64);
        if due >= end {
            break;
        }
        result.scheduled += 1;
        let now = Instant::now();
        // Still counted as scheduled: the requests of a dead or hopelessly
        // late connection are failures, not requests nobody wanted.
        if broken || now >= give_up {
            result.unsent += 1;
            continue;
        }
        if due > now {
            std::thread::sleep(due - now);
        }
        let request = message(index, k);
        let sent = Instant::now();
        let outcome = stream
            .write_all(&request)
            .map_err(|e| ("write", e))
            .and_then(|()| stream.read_exact(&mut reply).map_err(|e| ("read", e)));
        let done = Instant::now();
        match outcome {
            Ok(()) if reply == request => {
                result.completed += 1;
                record(&mut result.corrected, done - due);
                record(&mut result.service, done - sent);
            }
            Ok(()) => {
                result.errors.add_kind("reply is not the echo");
                broken = true;
            }
            Err((step, e)) => {
                result.errors.add(step, &e);
                broken = true;
            }
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::testing::Lab;

    #[test]
    fn counts_add_up() {
        let lab = Lab::new("t-rr", Duration::ZERO);
        let params = Params {
            connections: 4,
            rate: 400.0,
            duration: Duration::from_secs(1),
            warmup: 3,
        };
        let report = run(&lab.topology.client, lab.target(), params).unwrap();
        assert_eq!(report.errors.total(), 0, "{:?}", report.errors);
        // 4 connections × 100 requests/s × 1 s.
        assert_eq!(report.scheduled, 400);
        assert_eq!(report.completed, 400);
        assert_eq!(report.latency.count, 400);
        assert_eq!(report.service.count, 400);
        assert!(report.latency.p50_us > 0.0 && !report.curve.is_empty());
        assert!(report.latency.p50_us >= report.service.p50_us * 0.5);
        // A second round merges: counts add, percentiles cover both.
        let mut merged = report.clone();
        merged
            .merge(run(&lab.topology.client, lab.target(), params).unwrap())
            .unwrap();
        assert_eq!(
            (merged.scheduled, merged.completed, merged.rounds),
            (800, 800, 2)
        );
        assert_eq!(merged.latency.count, 800);
        assert!((merged.achieved_rate - report.achieved_rate).abs() < 1.0);
        // The workload saw exactly these connections, none from the bypass.
        let peers = lab.workload.peers();
        assert_eq!((peers.via_proxy, peers.not_via_proxy), (0, 8));
    }

    #[test]
    fn injected_delay_shows_up() {
        let lab = Lab::new("t-rrdelay", Duration::from_millis(5));
        let params = Params {
            connections: 2,
            rate: 100.0,
            duration: Duration::from_secs(1),
            warmup: 1,
        };
        let report = run(&lab.topology.client, lab.target(), params).unwrap();
        assert_eq!(report.completed, 100);
        assert!(report.latency.p50_us >= 5000.0, "{:?}", report.latency);
        assert!(report.service.p50_us >= 5000.0, "{:?}", report.service);
    }

    #[test]
    fn overload_is_charged_to_later_requests() {
        // 20 ms per reply at 200 requests/s on one connection: the server
        // can do 50/s, so the queue grows and the corrected latency with it,
        // while the service time stays near 20 ms; past the grace period the
        // rest is left unsent, and counted.
        let lab = Lab::new("t-rrco", Duration::from_millis(20));
        let params = Params {
            connections: 1,
            rate: 200.0,
            duration: Duration::from_secs(1),
            warmup: 0,
        };
        let report = run(&lab.topology.client, lab.target(), params).unwrap();
        assert_eq!(report.scheduled, 200);
        assert!(report.service.p90_us < 60_000.0, "{:?}", report.service);
        assert!(report.latency.max_us > 500_000.0, "{:?}", report.latency);
        assert!(report.unsent > 0, "{report:?}");
        assert_eq!(report.completed + report.unsent, report.scheduled);
    }
}
