//! Concurrency: open `connections` connections in `steps` equal steps, each
//! proven end to end by one small echo, and hold them all; the caller's
//! sampler (conntrack count, proxy RSS) runs before the first step, after
//! each step and a few times while everything is held. Then all are closed.
//!
//! A tokio current-thread runtime: 10,000 connections on one thread, with a
//! bounded number of handshakes in flight so no listen queue overflows.

use std::net::SocketAddr;
use std::ops::Range;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use netlab::Netns;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use super::{Errors, IO_TIMEOUT};
use crate::workload::ECHO;

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Params {
    pub connections: usize,
    pub steps: usize,
    /// How long all connections stay open, sampled every [`SAMPLE_EVERY`].
    pub hold: Duration,
    /// Handshakes in flight at once.
    pub parallel: usize,
}

const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// After closing: long enough for FINs to be exchanged through the proxy.
const SETTLE: Duration = Duration::from_millis(500);

/// One observation, taken with `open` connections established.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Sample {
    pub open: usize,
    pub conntrack: Option<u64>,
    pub proxy_rss_kib: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub params: Params,
    /// Connections established and proven with an echo.
    pub opened: usize,
    pub errors: Errors,
    pub ramp_s: f64,
    /// Before the first connection, during the ramp, while held.
    pub samples: Vec<Sample>,
    /// After every connection was closed and [`SETTLE`] passed.
    pub after_close: Sample,
}

impl Report {
    pub fn baseline(&self) -> Option<&Sample> {
        self.samples.first()
    }

    /// The samples taken with every connection open.
    pub fn held(&self) -> impl Iterator<Item = &Sample> {
        self.samples[1..]
            .iter()
            .filter(move |s| s.open == self.opened && self.opened > 0)
    }
}

pub fn run(
    client: &Netns,
    target: SocketAddr,
    params: Params,
    sample: &(dyn Fn(usize) -> Sample + Sync),
) -> Result<Report> {
    ensure!(params.connections > 0 && params.steps > 0 && params.parallel > 0);
    client.try_run(|| -> Result<Report> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the client's tokio runtime")?;
        runtime.block_on(ramp(target, params, sample))
    })?
}

async fn ramp(
    target: SocketAddr,
    params: Params,
    sample: &(dyn Fn(usize) -> Sample + Sync),
) -> Result<Report> {
    let mut samples = vec![sample(0)];
    let mut streams: Vec<TcpStream> = Vec::with_capacity(params.connections);
    let mut errors = Errors::default();
    let mut attempted = 0;
    let start = Instant::now();
    for step in 1..=params.steps {
        let goal = params.connections * step / params.steps;
        let opening = Opening {
            target,
            indexes: attempted as u64..goal as u64,
            parallel: params.parallel,
            connect_timeout: IO_TIMEOUT,
        };
        opening.run(&mut streams, &mut errors).await;
        attempted = goal;
        samples.push(sample(streams.len()));
    }
    let ramp_s = start.elapsed().as_secs_f64();
    let held_until = Instant::now() + params.hold;
    while Instant::now() < held_until {
        tokio::time::sleep(SAMPLE_EVERY).await;
        samples.push(sample(streams.len()));
    }
    // Every held connection must still be alive: one more round trip each
    // would take long at 10,000, so check they have not been closed under us
    // by reading with no data expected.
    let mut closed = 0;
    for stream in &streams {
        let mut byte = [0u8; 1];
        match stream.try_read(&mut byte) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            _ => closed += 1,
        }
    }
    for _ in 0..closed {
        errors.add_kind("closed while held");
    }
    let opened = streams.len();
    drop(streams);
    tokio::time::sleep(SETTLE).await;
    Ok(Report {
        params,
        opened,
        errors,
        ramp_s,
        samples,
        after_close: sample(0),
    })
}

/// Connections to open, each proven with one echo, `parallel` handshakes
/// in flight at a time.
pub(super) struct Opening {
    pub target: SocketAddr,
    /// Each connection's index, which its echo carries.
    pub indexes: Range<u64>,
    pub parallel: usize,
    /// A SYN the kernel dropped is sent again after 1 s, 3 s, 7 s …: this
    /// bounds how long one is waited for.
    pub connect_timeout: Duration,
}

impl Opening {
    /// Adds the connections that were opened to `streams`, the failures to
    /// `errors`.
    pub async fn run(self, streams: &mut Vec<TcpStream>, errors: &mut Errors) {
        let mut indexes = self.indexes;
        let mut in_flight = JoinSet::new();
        loop {
            while in_flight.len() < self.parallel.max(1) {
                let Some(index) = indexes.next() else { break };
                in_flight.spawn(open(self.target, index, self.connect_timeout));
            }
            match in_flight.join_next().await {
                Some(Ok(Ok(stream))) => streams.push(stream),
                Some(Ok(Err((step, e)))) => errors.add(step, &e),
                Some(Err(e)) => errors.add_kind(&format!("task: {e}")),
                None => break,
            }
        }
    }
}

async fn open(
    target: SocketAddr,
    index: u64,
    connect_timeout: Duration,
) -> Result<TcpStream, (&'static str, std::io::Error)> {
    let timed_out = |step| (step, std::io::Error::from(std::io::ErrorKind::TimedOut));
    let mut stream = tokio::time::timeout(connect_timeout, TcpStream::connect(target))
        .await
        .map_err(|_| timed_out("connect"))?
        .map_err(|e| ("connect", e))?;
    let mut request = [0u8; 9];
    request[0] = ECHO;
    request[1..].copy_from_slice(&index.to_le_bytes());
    stream.write_all(&request).await.map_err(|e| ("write", e))?;
    let mut reply = [0u8; 8];
    tokio::time::timeout(IO_TIMEOUT, stream.read_exact(&mut reply))
        .await
        .map_err(|_| timed_out("read"))?
        .map_err(|e| ("read", e))?;
    if reply != request[1..] {
        return Err(("read", std::io::Error::other("reply is not the echo")));
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::testing::Lab;

    #[test]
    fn opens_holds_and_samples() {
        let lab = Lab::new("t-hold", Duration::ZERO);
        let params = Params {
            connections: 300,
            steps: 3,
            hold: Duration::from_millis(300),
            parallel: 64,
        };
        let sampler = |open| Sample {
            open,
            conntrack: Some(open as u64),
            proxy_rss_kib: None,
        };
        let report = run(&lab.topology.client, lab.target(), params, &sampler).unwrap();
        assert_eq!(report.errors.total(), 0, "{:?}", report.errors);
        assert_eq!(report.opened, 300);
        let opens: Vec<usize> = report.samples.iter().map(|s| s.open).collect();
        assert_eq!(&opens[..4], &[0, 100, 200, 300]);
        assert!(report.held().count() >= 1);
        assert_eq!(lab.workload.peers().not_via_proxy, 300);
    }
}
