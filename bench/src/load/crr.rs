//! CRR: connect, one 64-byte request, its echo, close — as fast as each of
//! `clients` parallel clients can, for `duration`. The client closes first,
//! so TIME_WAIT lands in the client namespace (where the runner allows its
//! reuse), not on the proxy's accepted sockets.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use netlab::Netns;
use serde::Serialize;

use super::{histogram, message, record, Errors, Percentiles, IO_TIMEOUT, MESSAGE};
use crate::workload::ECHO;

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Params {
    pub clients: usize,
    pub duration: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub params: Params,
    /// Connections that completed their exchange.
    pub completed: u64,
    /// Completed connections per second.
    pub rate: f64,
    pub errors: Errors,
    /// Connect to reply, per completed connection.
    pub latency: Percentiles,
    /// Wall time of the run (the last attempts may end after `duration`).
    pub elapsed_s: f64,
    /// Runs merged into this report.
    pub rounds: u32,
    #[serde(skip)]
    latency_h: hdrhistogram::Histogram<u64>,
}

impl Report {
    /// Adds another run of the same load: the rate is over both.
    pub fn merge(&mut self, other: Report) -> Result<()> {
        self.completed += other.completed;
        self.errors.merge(other.errors);
        self.elapsed_s += other.elapsed_s;
        self.rounds += other.rounds;
        self.rate = self.completed as f64 / self.elapsed_s;
        self.latency_h
            .add(&other.latency_h)
            .context("merging histograms")?;
        self.latency = Percentiles::of(&self.latency_h);
        Ok(())
    }
}

pub fn run(client: &Netns, target: SocketAddr, params: Params) -> Result<Report> {
    ensure!(params.clients > 0, "CRR needs at least one client");
    client.try_run(|| -> Result<Report> {
        let start = Instant::now();
        let end = start + params.duration;
        let results: Vec<_> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..params.clients as u64)
                .map(|index| s.spawn(move || client_loop(target, index, end)))
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        let elapsed = start.elapsed();
        let mut latency = histogram();
        let mut errors = Errors::default();
        for (h, e) in results {
            latency.add(&h).context("merging histograms")?;
            errors.merge(e);
        }
        Ok(Report {
            params,
            completed: latency.len(),
            rate: latency.len() as f64 / elapsed.as_secs_f64(),
            errors,
            latency: Percentiles::of(&latency),
            elapsed_s: elapsed.as_secs_f64(),
            rounds: 1,
            latency_h: latency,
        })
    })?
}

fn client_loop(
    target: SocketAddr,
    index: u64,
    end: Instant,
) -> (hdrhistogram::Histogram<u64>, Errors) {
    let mut latency = histogram();
    let mut errors = Errors::default();
    let mut request = [0u8; 1 + MESSAGE];
    request[0] = ECHO;
    let mut reply = [0u8; MESSAGE];
    let mut sequence = 0u64;
    while Instant::now() < end {
        sequence += 1;
        request[1..].copy_from_slice(&message(index, sequence));
        let start = Instant::now();
        match exchange(target, &request, &mut reply) {
            Ok(()) if reply[..] == request[1..] => record(&mut latency, start.elapsed()),
            Ok(()) => errors.add_kind("reply is not the echo"),
            Err((step, e)) => {
                errors.add(step, &e);
                // A refusing or resetting proxy must not turn this into a
                // busy loop that starves everything else on the machine.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    (latency, errors)
}

fn exchange(
    target: SocketAddr,
    request: &[u8],
    reply: &mut [u8],
) -> Result<(), (&'static str, std::io::Error)> {
    let mut stream = TcpStream::connect_timeout(&target, IO_TIMEOUT).map_err(|e| ("connect", e))?;
    let setup = stream
        .set_nodelay(true)
        .and_then(|()| stream.set_read_timeout(Some(IO_TIMEOUT)))
        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)));
    setup.map_err(|e| ("setsockopt", e))?;
    stream.write_all(request).map_err(|e| ("write", e))?;
    stream.read_exact(reply).map_err(|e| ("read", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::testing::Lab;

    #[test]
    fn counts_add_up() {
        let lab = Lab::new("t-crr", Duration::ZERO);
        let params = Params {
            clients: 2,
            duration: Duration::from_millis(500),
        };
        let report = run(&lab.topology.client, lab.target(), params).unwrap();
        assert_eq!(report.errors.total(), 0, "{:?}", report.errors);
        assert!(report.completed > 10, "{report:?}");
        assert_eq!(report.latency.count, report.completed);
        // Every completed exchange was one accepted connection.
        let peers = lab.workload.peers();
        assert_eq!(peers.not_via_proxy, report.completed);
        assert_eq!(peers.via_proxy, 0);
    }

    #[test]
    fn injected_delay_shows_up() {
        let lab = Lab::new("t-crrdelay", Duration::from_millis(5));
        let params = Params {
            clients: 2,
            duration: Duration::from_millis(300),
        };
        let report = run(&lab.topology.client, lab.target(), params).unwrap();
        assert!(report.completed > 0);
        assert!(report.latency.p50_us >= 5000.0, "{:?}", report.latency);
        // Two clients, each at most one exchange per 5 ms.
        assert!(report.rate <= 2.0 * 200.0 * 1.05, "{report:?}");
    }

    #[test]
    fn refused_connections_are_counted() {
        let lab = Lab::new("t-crrerr", Duration::ZERO);
        let closed_port = SocketAddr::from((netlab::ClientPod::POD_V4, 9999));
        let params = Params {
            clients: 1,
            duration: Duration::from_millis(100),
        };
        let report = run(&lab.topology.client, closed_port, params).unwrap();
        assert_eq!(report.completed, 0);
        assert!(
            report
                .errors
                .0
                .get("connect: ConnectionRefused")
                .copied()
                .unwrap_or(0)
                > 0
        );
    }
}
