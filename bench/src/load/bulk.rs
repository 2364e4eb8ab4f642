//! Bulk: `streams` connections, each sending as fast as it can for
//! `duration` to the workload's sink, which counts and drops the bytes.
//!
//! One direction only, so "bytes moved" has one meaning: payload from client
//! to workload. At the end each stream half-closes and waits for the sink's
//! count of what arrived; a mismatch is an error (the proxy lost or invented
//! bytes, or did not forward the half-close). The time includes that final
//! exchange, so bytes still queued in the proxy are not counted as delivered
//! before they are.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use netlab::Netns;
use serde::Serialize;

use super::{Errors, IO_TIMEOUT};
use crate::workload::SINK;

/// Per write(): large enough that syscalls are not what is measured.
const CHUNK: usize = 128 * 1024;

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Params {
    pub streams: usize,
    pub duration: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub params: Params,
    /// Bytes the sink confirmed (only streams whose count matched).
    pub bytes: u64,
    pub elapsed_s: f64,
    pub gbit_per_s: f64,
    pub errors: Errors,
    /// Runs merged into this report.
    pub rounds: u32,
}

impl Report {
    /// Adds another run of the same load: throughput over both.
    pub fn merge(&mut self, other: Report) {
        self.bytes += other.bytes;
        self.elapsed_s += other.elapsed_s;
        self.rounds += other.rounds;
        self.errors.merge(other.errors);
        self.gbit_per_s = self.bytes as f64 * 8.0 / self.elapsed_s / 1e9;
    }
}

pub fn run(client: &Netns, target: SocketAddr, params: Params) -> Result<Report> {
    ensure!(params.streams > 0, "bulk needs at least one stream");
    client.try_run(|| -> Result<Report> {
        let start = Instant::now();
        let end = start + params.duration;
        let results: Vec<_> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..params.streams)
                .map(|_| s.spawn(move || stream(target, end)))
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        let elapsed = start.elapsed().as_secs_f64();
        let mut errors = Errors::default();
        let mut bytes = 0;
        for result in results {
            match result {
                Ok(confirmed) => bytes += confirmed,
                Err((step, e)) => errors.add(step, &e),
            }
        }
        Ok(Report {
            params,
            bytes,
            elapsed_s: elapsed,
            gbit_per_s: bytes as f64 * 8.0 / elapsed / 1e9,
            errors,
            rounds: 1,
        })
    })?
}

fn stream(target: SocketAddr, end: Instant) -> Result<u64, (&'static str, std::io::Error)> {
    let mut stream = TcpStream::connect_timeout(&target, IO_TIMEOUT).map_err(|e| ("connect", e))?;
    let setup = stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)));
    setup.map_err(|e| ("setsockopt", e))?;
    stream.write_all(&[SINK]).map_err(|e| ("write", e))?;
    let chunk = vec![0x5au8; CHUNK];
    let mut sent = 0u64;
    while Instant::now() < end {
        stream.write_all(&chunk).map_err(|e| ("write", e))?;
        sent += CHUNK as u64;
    }
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| ("shutdown", e))?;
    let mut count = [0u8; 8];
    stream
        .read_exact(&mut count)
        .map_err(|e| ("read count", e))?;
    let received = u64::from_le_bytes(count);
    if received != sent {
        return Err((
            "count",
            std::io::Error::other(format!("sent {sent} bytes, the sink got {received}")),
        ));
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::testing::Lab;

    #[test]
    fn bytes_add_up() {
        let lab = Lab::new("t-bulk", Duration::ZERO);
        let params = Params {
            streams: 3,
            duration: Duration::from_millis(300),
        };
        let report = run(&lab.topology.client, lab.target(), params).unwrap();
        assert_eq!(report.errors.total(), 0, "{:?}", report.errors);
        assert!(report.bytes >= 3 * CHUNK as u64, "{report:?}");
        assert_eq!(report.bytes % CHUNK as u64, 0);
        assert!(report.gbit_per_s > 0.0);
        assert_eq!(lab.workload.peers().not_via_proxy, 3);
    }
}
