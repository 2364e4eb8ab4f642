//! Per-worker counters: each worker writes its own, the control thread sums
//! them when it needs a figure.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

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
    Other,
}

impl ConnectFailure {
    pub const ALL: [ConnectFailure; 4] = [
        ConnectFailure::Refused,
        ConnectFailure::Timeout,
        ConnectFailure::Unreachable,
        ConnectFailure::Other,
    ];

    pub fn of(error: &std::io::Error) -> ConnectFailure {
        match error.raw_os_error() {
            Some(libc::ECONNREFUSED) => ConnectFailure::Refused,
            Some(libc::ETIMEDOUT) => ConnectFailure::Timeout,
            Some(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EADDRNOTAVAIL) => {
                ConnectFailure::Unreachable
            }
            _ => ConnectFailure::Other,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            ConnectFailure::Refused => "refused",
            ConnectFailure::Timeout => "timeout",
            ConnectFailure::Unreachable => "unreachable",
            ConnectFailure::Other => "other",
        }
    }
}

/// One worker's counters. Only that worker writes them.
#[derive(Debug, Default)]
pub struct WorkerStats {
    pub accepted: AtomicU64,
    /// Connections forwarded to the end (cleanly or not).
    pub closed: AtomicU64,
    /// Connections in the worker's table now.
    pub active: AtomicU64,
    pub refused: [AtomicU64; Refused::ALL.len()],
    pub connect_failures: [AtomicU64; ConnectFailure::ALL.len()],
    pub idle_timeouts: AtomicU64,
    pub bytes_to_workload: AtomicU64,
    pub bytes_to_client: AtomicU64,
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
