//! Moving bytes between the two sockets of an intercepted connection.
//!
//! Every forwarder keeps TCP's semantics: bytes exact and in order, a FIN
//! passed on one way while the other way still flows, a reset passed on as a
//! reset, both sockets closed at the end.

pub mod copy;
mod handover;
pub mod sockmap;
pub mod splice;

use std::cell::Cell;
use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio_uring::net::TcpStream;

use crate::config::Forwarder;
use crate::linux;

/// How one direction of a connection ended.
#[derive(Debug)]
pub enum End {
    /// The sender closed its side; the FIN was passed on.
    Eof,
    /// Reading from the sender failed (typically a reset); the receiver is
    /// reset in turn.
    ReadFailed(io::Error),
    /// Writing to the receiver failed; the sender is reset in turn.
    WriteFailed(io::Error),
}

/// One direction's account.
#[derive(Debug)]
pub struct Direction {
    pub bytes: u64,
    pub end: End,
}

/// Both directions of a finished connection.
#[derive(Debug)]
pub struct Forwarded {
    /// client → workload
    pub upstream: Direction,
    /// workload → client
    pub downstream: Direction,
    pub sockmap: Sockmap,
}

/// What became of a connection under the sockmap forwarder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sockmap {
    /// Not joined: another forwarder, or a connection that ended on copy
    /// before `--sockmap-after`.
    #[default]
    NotJoined,
    /// Joined in the kernel; `held_back`: times a direction stopped
    /// redirecting until its peer caught up (a slow reader).
    Joined { held_back: u32 },
    /// The kernel would not join it; copy forwarded it.
    FellBack,
}

/// The forwarder a process runs with, and what it needs: the sockmap
/// forwarder's BPF program and maps, set up once and shared by every worker.
#[derive(Debug, Clone)]
pub enum Forwarding {
    Copy,
    Splice,
    Sockmap {
        engine: Arc<sockmap::SockmapEngine>,
        /// A connection is copied until it is this old, then joined
        /// (`--sockmap-after`; zero joins at once).
        after: Duration,
    },
}

impl Forwarding {
    /// Sets `forwarder` up for `workers` data-path threads. Where the kernel
    /// refuses the sockmap forwarder (no CAP_BPF/CAP_NET_ADMIN, an old
    /// kernel) this says so in one log line and forwards with copy instead.
    pub fn new(forwarder: Forwarder, sockmap_after: Duration, workers: usize) -> Forwarding {
        match forwarder {
            Forwarder::Copy => Forwarding::Copy,
            Forwarder::Splice => Forwarding::Splice,
            Forwarder::Sockmap => match sockmap::SockmapEngine::new(workers) {
                Ok(engine) => Forwarding::Sockmap {
                    engine: Arc::new(engine),
                    after: sockmap_after,
                },
                Err(error) => {
                    tracing::warn!(
                        error = %ErrorChain(&error),
                        "--forward sockmap is not available; forwarding with copy instead"
                    );
                    Forwarding::Copy
                }
            },
        }
    }

    /// What a data-path thread needs before its first connection; runs on
    /// that thread's runtime.
    pub fn start_worker(&self) -> io::Result<()> {
        match self {
            Forwarding::Sockmap { engine, .. } => sockmap::start_worker(engine),
            Forwarding::Copy | Forwarding::Splice => Ok(()),
        }
    }

    /// The forwarder in use (copy after a sockmap fallback).
    pub fn forwarder(&self) -> Forwarder {
        match self {
            Forwarding::Copy => Forwarder::Copy,
            Forwarding::Splice => Forwarder::Splice,
            Forwarding::Sockmap { .. } => Forwarder::Sockmap,
        }
    }
}

/// An error with its sources, for one log line.
struct ErrorChain<'a>(&'a dyn std::error::Error);

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(error) = source {
            write!(f, ": {error}")?;
            source = error.source();
        }
        Ok(())
    }
}

/// Forwards both directions of a connection with the chosen forwarder until
/// both have ended. An error means the forwarder could not start; both
/// sockets are then reset.
pub async fn forward(
    forwarding: &Forwarding,
    client: &TcpStream,
    upstream: &TcpStream,
) -> io::Result<Forwarded> {
    let forwarded = match forwarding {
        Forwarding::Copy => Ok(copy::forward(client, upstream).await),
        Forwarding::Splice => splice::forward(client, upstream).await,
        Forwarding::Sockmap { engine, after } => {
            forward_sockmap(engine, *after, client, upstream).await
        }
    };
    if forwarded.is_err() {
        abort(client);
        abort(upstream);
    }
    forwarded
}

/// The sockmap forwarder's way: copy first (unless `after` is zero), then
/// the sockets joined in the kernel; copy again where the kernel will not.
async fn forward_sockmap(
    engine: &sockmap::SockmapEngine,
    after: Duration,
    client: &TcpStream,
    upstream: &TcpStream,
) -> io::Result<Forwarded> {
    let copied = if after.is_zero() {
        [0, 0]
    } else {
        // Boxed: its state would otherwise be part of every connection's
        // task, idle copy connections and joined ones included (0.4 KiB
        // each: 3.3 against 2.9 KiB per idle copy connection in make
        // bench's concurrency load), while it lives only for a connection's
        // first moments.
        match Box::pin(handover::copy_first(client, upstream, after)).await {
            handover::CopyFirst::Ended(forwarded) => return Ok(forwarded),
            handover::CopyFirst::HandedOver(copied) => copied,
        }
    };
    match sockmap::forward(engine, client, upstream, copied).await {
        sockmap::Outcome::Forwarded(forwarded) => Ok(forwarded),
        sockmap::Outcome::NotJoined(error) => {
            // No byte went through the kernel's redirect: copy goes on from
            // where the sockets are.
            sockmap::warn_not_joined(&error);
            let mut forwarded = copy::forward(client, upstream).await;
            forwarded.upstream.bytes += copied[0];
            forwarded.downstream.bytes += copied[1];
            forwarded.sockmap = Sockmap::FellBack;
            Ok(forwarded)
        }
        sockmap::Outcome::Failed(error) => Err(error),
    }
}

/// What the two directions of one connection share: whether either of them
/// has started resetting it (the other direction may then read end of
/// stream rather than the error, as one syscall takes a socket's pending
/// error, and it must not send a FIN ahead of the reset), and whether one has
/// passed its FIN on.
#[derive(Default)]
struct Teardown {
    resetting: Cell<bool>,
    one_fin_passed: Cell<bool>,
}

impl Teardown {
    /// One whose FIN the caller passes on itself, after a check of its own:
    /// [`Teardown::pass_fin`] leaves it alone.
    fn fin_left_to_caller() -> Teardown {
        Teardown {
            one_fin_passed: Cell::new(true),
            ..Teardown::default()
        }
    }

    /// See [`abort`]; also tells the other direction.
    fn reset(&self, socket: &TcpStream) {
        self.resetting.set(true);
        abort(socket);
    }

    /// Half-close: passes the FIN on, unless the connection is being reset.
    /// The second FIN of a connection is left to `close()`, which follows at
    /// once and sends it after the queued bytes (`to` has been read to its
    /// end, so the close is no reset): one syscall less per connection.
    /// A failure means `to` is already gone, which the other direction
    /// reports.
    fn pass_fin(&self, to: &TcpStream) {
        if self.resetting.get() || self.one_fin_passed.replace(true) {
            return;
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    }
}

/// Passes a failure on to the peer behind `socket`: its close becomes a
/// reset, and the direction reading from it wakes up (end of stream) so the
/// connection can finish and close.
fn abort(socket: &TcpStream) {
    let _ = linux::reset_on_close(socket);
    let _ = linux::shutdown_read(socket);
}
