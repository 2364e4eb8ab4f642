//! The copy forwarder: io_uring reads and writes through user-space buffers.
//!
//! Each direction owns one buffer that starts small, so that thousands of
//! idle connections stay cheap, and doubles whenever a read fills it, up to
//! [`MAX_BUFFER`], so that bulk streams move in large chunks.

use std::io;

use tokio_uring::buf::BoundedBuf;
use tokio_uring::net::TcpStream;

use super::{Direction, End, Forwarded, Sockmap, Teardown};

/// An idle connection holds two of these (a read is always pending on each
/// side, and the ring owns its buffer until it completes): 512 bytes keep
/// 10,000 idle connections at 10 MiB of buffers rather than 80, while a
/// request or reply of that size or less, the usual RPC, still moves in one
/// read. A stream that fills it grows it in a few reads.
pub(super) const INITIAL_BUFFER: usize = 512;
pub(super) const MAX_BUFFER: usize = 256 * 1024;

/// Forwards both directions concurrently until both have ended.
pub async fn forward(client: &TcpStream, upstream: &TcpStream) -> Forwarded {
    let teardown = Teardown::default();
    let (to_upstream, to_client) = futures::join!(
        pump(client, upstream, &teardown),
        pump(upstream, client, &teardown)
    );
    Forwarded {
        upstream: to_upstream,
        downstream: to_client,
        sockmap: Sockmap::NotJoined,
    }
}

pub(super) async fn pump(from: &TcpStream, to: &TcpStream, teardown: &Teardown) -> Direction {
    let mut buffer = Vec::with_capacity(INITIAL_BUFFER);
    let mut bytes = 0u64;
    loop {
        buffer.clear();
        let (read, returned) = from.read(buffer).await;
        buffer = returned;
        let n = match read {
            Ok(0) => {
                // Half-close: the other direction goes on.
                teardown.pass_fin(to);
                return Direction {
                    bytes,
                    end: End::Eof,
                };
            }
            Ok(n) => n,
            Err(error) => {
                teardown.reset(to);
                return Direction {
                    bytes,
                    end: End::ReadFailed(error),
                };
            }
        };
        let filled = n == buffer.capacity();
        let (written, returned) = write_all(to, buffer).await;
        buffer = returned;
        if let Err(error) = written {
            teardown.reset(from);
            return Direction {
                bytes,
                end: End::WriteFailed(error),
            };
        }
        bytes += n as u64;
        if filled && buffer.capacity() < MAX_BUFFER {
            let grown = (buffer.capacity() * 2).min(MAX_BUFFER);
            buffer = Vec::with_capacity(grown);
        }
    }
}

/// Writes `buffer` to `to`. What the send buffer takes now is sent at once,
/// which is nearly every request and reply: a write through the ring would
/// cost one more trip around the event loop (submit, then wait for its
/// completion) before the next read. The rest, when the peer is slower, goes
/// through the ring.
pub(super) async fn write_all(to: &TcpStream, buffer: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
    let sent = match crate::linux::send_now(to, &buffer) {
        Ok(sent) => sent,
        Err(error) if error.kind() == io::ErrorKind::WouldBlock => 0,
        Err(error) => return (Err(error), buffer),
    };
    if sent == buffer.len() {
        return (Ok(()), buffer);
    }
    let len = buffer.len();
    let (written, rest) = to.write_all(buffer.slice(sent..len)).await;
    (written, rest.into_inner())
}
