//! The load generators. Each runs in the client namespace, is bounded in
//! time (deadlines plus socket timeouts, so a stalled proxy ends a load
//! instead of hanging it) and counts its failures instead of hiding them.

pub mod bulk;
pub mod crr;
pub mod exhaust;
pub mod hold;
pub mod redis;
pub mod rr;

use std::collections::BTreeMap;
use std::io;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Size of RR and CRR requests and responses.
pub const MESSAGE: usize = 64;

/// Upper bound of any single socket wait; far above any latency we expect,
/// low enough that a stall costs seconds, not the run.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A latency histogram in nanoseconds (1 ns .. 100 s, 3 significant digits).
pub fn histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts.
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid histogram bounds")
}

pub fn record(histogram: &mut Histogram<u64>, elapsed: Duration) {
    let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
    histogram.saturating_record(nanos.max(1));
}

/// Percentiles of a latency histogram, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            mean_us: h.mean() / 1000.0,
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }
}

/// The latency at each "number of nines" from 0 (p0) to 5 (p99.999), in
/// steps of 0.1: the points of a percentile plot. `(nines, microseconds)`.
pub fn percentile_curve(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    // Past ~1/count the curve is just the maximum; stop where data ends.
    let max_nines = (h.len() as f64).log10().clamp(1.0, 5.0);
    let mut points = Vec::new();
    let mut tenths = 0u32;
    loop {
        let nines = f64::from(tenths) / 10.0;
        if nines > max_nines {
            break;
        }
        let quantile = 1.0 - 10f64.powf(-nines);
        points.push((nines, h.value_at_quantile(quantile) as f64 / 1000.0));
        tenths += 1;
    }
    points.push((max_nines, h.max() as f64 / 1000.0));
    points
}

/// Failures by kind, e.g. `"connect: ConnectionRefused" → 3`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Errors(pub BTreeMap<String, u64>);

impl Errors {
    pub fn add(&mut self, step: &str, error: &io::Error) {
        *self
            .0
            .entry(format!("{step}: {:?}", error.kind()))
            .or_default() += 1;
    }

    pub fn add_kind(&mut self, kind: &str) {
        *self.0.entry(kind.to_string()).or_default() += 1;
    }

    pub fn merge(&mut self, other: Errors) {
        for (kind, n) in other.0 {
            *self.0.entry(kind).or_default() += n;
        }
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

/// A message whose content identifies the connection and the request, so a
/// reply that is not this request's exact echo is caught.
pub fn message(connection: u64, sequence: u64) -> [u8; MESSAGE] {
    let mut m = [0u8; MESSAGE];
    m[..8].copy_from_slice(&connection.to_le_bytes());
    m[8..16].copy_from_slice(&sequence.to_le_bytes());
    for (i, byte) in m[16..].iter_mut().enumerate() {
        *byte = (i as u8).wrapping_add(sequence as u8);
    }
    m
}

#[cfg(test)]
pub(crate) mod testing {
    //! A client ⇄ pod topology with the workload, for the unit tests.

    use std::net::SocketAddr;
    use std::time::Duration;

    use netlab::ClientPod;

    use crate::workload::Workload;

    pub struct Lab {
        pub topology: ClientPod,
        pub workload: Workload,
    }

    impl Lab {
        pub fn new(purpose: &str, reply_delay: Duration) -> Lab {
            let topology = ClientPod::new(purpose).expect("client/pod topology");
            let addr = SocketAddr::from((ClientPod::POD_V4, 9080));
            let workload = Workload::start(&topology.pod, addr, reply_delay).expect("workload");
            Lab { topology, workload }
        }

        pub fn target(&self) -> SocketAddr {
            self.workload.addr()
        }
    }

    #[test]
    fn curve_is_monotonic_and_ends_at_max() {
        let mut h = super::histogram();
        for v in 1..=10_000u64 {
            h.record(v * 1000).unwrap();
        }
        let curve = super::percentile_curve(&h);
        assert!(curve
            .windows(2)
            .all(|w| w[0].1 <= w[1].1 && w[0].0 <= w[1].0));
        let last = curve.last().unwrap();
        assert!((last.1 - h.max() as f64 / 1000.0).abs() < 1e-9);
        let p = super::Percentiles::of(&h);
        assert!((p.p50_us - 5000.0).abs() / 5000.0 < 0.01, "{p:?}");
    }
}
