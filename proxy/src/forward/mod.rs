//! Moving bytes between the two sockets of an intercepted connection.
//!
//! Every forwarder keeps TCP's semantics: bytes exact and in order, a FIN
//! passed on one way while the other way still flows, a reset passed on as a
//! reset, both sockets closed at the end.

pub mod copy;
pub mod splice;

use std::io;

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
}

/// Forwards both directions of a connection with the chosen forwarder until
/// both have ended. An error means the forwarder could not start; both
/// sockets are then reset.
pub async fn forward(
    forwarder: Forwarder,
    client: &TcpStream,
    upstream: &TcpStream,
) -> io::Result<Forwarded> {
    let forwarded = match forwarder {
        Forwarder::Copy => Ok(copy::forward(client, upstream).await),
        Forwarder::Splice => splice::forward(client, upstream).await,
    };
    if forwarded.is_err() {
        abort(client);
        abort(upstream);
    }
    forwarded
}

/// Passes a failure on to the peer behind `socket`: its close becomes a
/// reset, and the direction reading from it wakes up (end of stream) so the
/// connection can finish and close.
fn abort(socket: &TcpStream) {
    let _ = linux::reset_on_close(socket);
    let _ = linux::shutdown_read(socket);
}
