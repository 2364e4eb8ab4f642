//! Moving bytes between the two sockets of an intercepted connection.
//!
//! Every forwarder keeps TCP's semantics: bytes exact and in order, a FIN
//! passed on one way while the other way still flows, a reset passed on as a
//! reset, both sockets closed at the end.

pub mod copy;

use std::io;

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
