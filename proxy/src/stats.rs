//! Per-worker counters: each worker writes its own, the control and admin
//! threads sum them when they need a figure (a scrape, the drain). Nothing
//! here is shared between workers, so counting costs a worker no cache-line
//! transfer and no lock per connection.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Why a connection was reset without being forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    NotLocal,
    OwnPort,
    ConnectionLimit,
    Draining,
    NoOriginalDestination,
}

impl Refused {
    pub const ALL: [Refused; 5] = [
        Refused::NotLocal,
        Refused::OwnPort,
        Refused::ConnectionLimit,
        Refused::Draining,
        Refused::NoOriginalDestination,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refused::NotLocal => "not_local",
            Refused::OwnPort => "own_port",
            Refused::ConnectionLimit => "connection_limit",
            Refused::Draining => "draining",
            Refused::NoOriginalDestination => "no_original_destination",
        }
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refused::NotLocal => {
                "destination is not a local address of this namespace (sluice is no open relay)"
            }
            Refused::OwnPort => "destination port is sluice's own port",
            Refused::ConnectionLimit => "--max-connections reached",
            Refused::Draining => "sluice is draining (stopping)",
            Refused::NoOriginalDestination => "cannot recover the original destination",
        })
    }
}

/// Why sluice's connection to the workload failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    Refused,
    Timeout,
    Unreachable,
    /// EADDRNOTAVAIL: every source port towards that destination is taken.
    NoSourcePort,
    Other,
}

impl ConnectFailure {
    pub const ALL: [ConnectFailure; 5] = [
        ConnectFailure::Refused,
        ConnectFailure::Timeout,
        ConnectFailure::Unreachable,
        ConnectFailure::NoSourcePort,
        ConnectFailure::Other,
    ];

    pub fn of(error: &std::io::Error) -> ConnectFailure {
        match error.raw_os_error() {
            Some(libc::ECONNREFUSED) => ConnectFailure::Refused,
            Some(libc::ETIMEDOUT) => ConnectFailure::Timeout,
            Some(libc::ENETUNREACH | libc::EHOSTUNREACH) => ConnectFailure::Unreachable,
            Some(libc::EADDRNOTAVAIL) => ConnectFailure::NoSourcePort,
            _ => ConnectFailure::Other,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            ConnectFailure::Refused => "refused",
            ConnectFailure::Timeout => "timeout",
            ConnectFailure::Unreachable => "unreachable",
            ConnectFailure::NoSourcePort => "no_source_port",
            ConnectFailure::Other => "other",
        }
    }
}

/// One worker's counters. Only that worker writes them.
///
/// Aligned to two cache lines (the adjacent-line prefetcher pairs them) so
/// that two workers' counters never share one.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct WorkerStats {
    pub accepted: AtomicU64,
    /// Connections whose upstream connect succeeded: forwarded to the
    /// workload. Refused ones and failed connects are counted apart.
    pub opened: AtomicU64,
    /// Opened connections that ended (cleanly or not): `opened - closed` are
    /// being forwarded now.
    pub closed: AtomicU64,
    /// Connections in the worker's table now (connecting ones included).
    pub active: AtomicU64,
    pub refused: [AtomicU64; Refused::ALL.len()],
    pub connect_failures: [AtomicU64; ConnectFailure::ALL.len()],
    pub idle_timeouts: AtomicU64,
    pub bytes_to_workload: AtomicU64,
    pub bytes_to_client: AtomicU64,
    /// Sockmap connections the kernel would not join, forwarded with copy.
    pub forwarder_fallbacks: AtomicU64,
    /// Connections the sockmap forwarder joined in the kernel.
    pub sockmap_joined: AtomicU64,
    /// Times a joined direction stopped redirecting until its peer caught up.
    pub sockmap_held_back: AtomicU64,
    /// Connections forwarded from the bypass source although the client's
    /// address was asked for: their workload refused the inner address.
    pub client_source_fallbacks: AtomicU64,
    /// The destinations those went to; written once per destination and
    /// worker, when first found (not per connection), read by the admin side.
    pub fallback_destinations: std::sync::Mutex<std::collections::BTreeSet<std::net::SocketAddr>>,
    /// From the start of the upstream connect to its success.
    pub connect_duration: Histogram<ConnectBuckets>,
    /// From the successful upstream connect to the end of forwarding.
    pub connection_duration: Histogram<ConnectionBuckets>,
}

/// Adds to a counter only its worker writes: a plain load and store rather
/// than a locked read-modify-write, since no other thread ever writes it.
pub fn add(counter: &AtomicU64, n: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}

/// The finite upper bounds (seconds) of a histogram's buckets.
pub trait Buckets: fmt::Debug + Default {
    const BOUNDS: [f64; BUCKETS];
}

/// Finite buckets of every histogram (plus one +Inf).
pub const BUCKETS: usize = 12;

/// `sluice_upstream_connect_duration_seconds`: a connect inside the pod
/// takes well under a millisecond; the tail shows a workload whose backlog
/// is full, up to the connect timeout.
#[derive(Debug, Default)]
pub struct ConnectBuckets;

impl Buckets for ConnectBuckets {
    const BOUNDS: [f64; BUCKETS] = [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5, 10.0,
    ];
}

/// `sluice_connection_duration_seconds`: from one request to long-lived
/// streams.
#[derive(Debug, Default)]
pub struct ConnectionBuckets;

impl Buckets for ConnectionBuckets {
    const BOUNDS: [f64; BUCKETS] = [
        0.001, 0.005, 0.025, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0, 3600.0,
    ];
}

/// One worker's histogram: a plain counter per bucket (not cumulative: the
/// scrape accumulates), written by its worker alone and summed over workers
/// at scrape time.
#[derive(Debug, Default)]
pub struct Histogram<B: Buckets> {
    /// Observations in (bound[i-1], bound[i]]; the last one is +Inf.
    buckets: [AtomicU64; BUCKETS + 1],
    sum_nanos: AtomicU64,
    _bounds: B,
}

impl<B: Buckets> Histogram<B> {
    /// Records one observation; called by the owning worker only.
    pub fn observe(&self, value: Duration) {
        let seconds = value.as_secs_f64();
        let index = B::BOUNDS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(BUCKETS);
        add(&self.buckets[index], 1);
        add(
            &self.sum_nanos,
            u64::try_from(value.as_nanos()).unwrap_or(u64::MAX),
        );
    }
}

/// A histogram summed over workers, as the exposition format wants it.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramTotal {
    /// (upper bound, observations in that bucket alone), the last bound
    /// +Inf; not cumulative, as prometheus-client's encoder accumulates.
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum_seconds: f64,
}

/// Sums one histogram over every worker.
pub fn histogram_total<B: Buckets>(
    workers: &[std::sync::Arc<WorkerStats>],
    histogram: impl Fn(&WorkerStats) -> &Histogram<B>,
) -> HistogramTotal {
    let mut counts = [0u64; BUCKETS + 1];
    let mut sum_nanos = 0u64;
    for stats in workers {
        let h = histogram(stats);
        for (total, bucket) in counts.iter_mut().zip(&h.buckets) {
            *total += bucket.load(Ordering::Relaxed);
        }
        sum_nanos = sum_nanos.wrapping_add(h.sum_nanos.load(Ordering::Relaxed));
    }
    let buckets = B::BOUNDS
        .iter()
        .copied()
        .chain(std::iter::once(f64::INFINITY))
        .zip(counts)
        .collect();
    HistogramTotal {
        buckets,
        count: counts.iter().sum(),
        sum_seconds: Duration::from_nanos(sum_nanos).as_secs_f64(),
    }
}

/// Sums one counter over every worker.
pub fn total(
    workers: &[std::sync::Arc<WorkerStats>],
    counter: impl Fn(&WorkerStats) -> &AtomicU64,
) -> u64 {
    workers
        .iter()
        .map(|stats| counter(stats).load(Ordering::Relaxed))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn histograms_sum_over_workers() {
        let workers = [
            Arc::new(WorkerStats::default()),
            Arc::new(WorkerStats::default()),
        ];
        workers[0]
            .connect_duration
            .observe(Duration::from_micros(50));
        workers[1]
            .connect_duration
            .observe(Duration::from_micros(50));
        workers[1]
            .connect_duration
            .observe(Duration::from_millis(2));
        workers[0].connect_duration.observe(Duration::from_secs(60));
        let total = histogram_total(&workers, |s| &s.connect_duration);
        assert_eq!(total.count, 4);
        assert_eq!(total.buckets.len(), BUCKETS + 1);
        assert_eq!(total.buckets[0], (0.0001, 2));
        assert_eq!(total.buckets[4], (0.0025, 1));
        assert_eq!(total.buckets[BUCKETS - 1], (10.0, 0));
        assert_eq!(total.buckets[BUCKETS], (f64::INFINITY, 1));
        assert!(
            (total.sum_seconds - 60.0021).abs() < 1e-9,
            "{}",
            total.sum_seconds
        );
    }
}
