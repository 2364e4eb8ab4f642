//! The splice forwarder: socket → pipe → socket inside the kernel, so the
//! bytes never cross into user space.
//!
//! Readiness comes from io_uring (a poll operation); the moves are
//! non-blocking `splice(2)` calls. io_uring's own `IORING_OP_SPLICE` was the
//! other way: on a socket with no data yet it cannot arm a poll and instead
//! parks the request on an io-wq worker thread, so 10,000 idle connections
//! would hold 20,000 kernel threads. Waiting for readiness first keeps an
//! idle connection at no thread and, with the pool below, no pipe.
//!
//! A direction takes a pipe from a per-thread pool only when its socket is
//! readable, moves what is there, and gives the (empty) pipe back before it
//! waits again.

use std::cell::RefCell;
use std::io;
use std::os::fd::AsRawFd;

use tokio_uring::net::TcpStream;

use super::{Direction, End, Forwarded, Sockmap, Teardown};
use crate::linux::{self, Pipe};
use crate::uring;

/// Bytes a pipe is asked to hold (see `Pipe::new` for when it holds less).
const PIPE_SIZE: usize = 256 * 1024;
/// Idle pipes kept per worker thread.
pub const POOL_LIMIT: usize = 64;

thread_local! {
    static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// Forwards both directions concurrently until both have ended.
pub async fn forward(client: &TcpStream, upstream: &TcpStream) -> io::Result<Forwarded> {
    // TCP's splice honours the file's O_NONBLOCK, not SPLICE_F_NONBLOCK.
    linux::set_nonblocking(client)?;
    linux::set_nonblocking(upstream)?;
    let teardown = Teardown::default();
    let (to_upstream, to_client) = futures::join!(
        pump(client, upstream, &teardown),
        pump(upstream, client, &teardown)
    );
    Ok(Forwarded {
        upstream: to_upstream,
        downstream: to_client,
        sockmap: Sockmap::NotJoined,
    })
}

async fn pump(from: &TcpStream, to: &TcpStream, teardown: &Teardown) -> Direction {
    let mut bytes = 0u64;
    loop {
        let end = match readable(from).await {
            Ok(()) => match take_pipe() {
                Ok(pipe) => {
                    let burst = move_available(&pipe, from, to, &mut bytes).await;
                    // A pipe that may still hold bytes is not reused.
                    if !matches!(burst, Some(End::WriteFailed(_))) {
                        give_back(pipe);
                    }
                    burst
                }
                Err(error) => Some(End::ReadFailed(error)),
            },
            Err(error) => Some(End::ReadFailed(error)),
        };
        match end {
            None => continue,
            Some(End::Eof) => {
                // Half-close: the other direction goes on.
                teardown.pass_fin(to);
                return Direction {
                    bytes,
                    end: End::Eof,
                };
            }
            Some(End::ReadFailed(error)) => {
                teardown.reset(to);
                return Direction {
                    bytes,
                    end: End::ReadFailed(error),
                };
            }
            Some(End::WriteFailed(error)) => {
                teardown.reset(from);
                return Direction {
                    bytes,
                    end: End::WriteFailed(error),
                };
            }
        }
    }
}

/// Moves what `from` has now into `to`. `None`: all moved, `from` would
/// block; otherwise how the direction ended.
async fn move_available(
    pipe: &Pipe,
    from: &TcpStream,
    to: &TcpStream,
    bytes: &mut u64,
) -> Option<End> {
    loop {
        match pipe.fill_from(from, pipe.capacity()) {
            // Readable and nothing to move: end of stream, never a spin.
            Ok(0) => return Some(End::Eof),
            Ok(filled) => {
                if let Err(error) = drain(pipe, to, filled).await {
                    return Some(End::WriteFailed(error));
                }
                *bytes += filled as u64;
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return None,
            Err(error) => return Some(End::ReadFailed(error)),
        }
    }
}

async fn drain(pipe: &Pipe, to: &TcpStream, mut pending: usize) -> io::Result<()> {
    while pending > 0 {
        match pipe.drain_into(to, pending) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(moved) => pending -= moved,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                uring::poll(to.as_raw_fd(), libc::POLLOUT as u32).await?;
            }
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

async fn readable(socket: &TcpStream) -> io::Result<()> {
    uring::poll(socket.as_raw_fd(), (libc::POLLIN | libc::POLLRDHUP) as u32)
        .await
        .map(drop)
}

fn take_pipe() -> io::Result<Pipe> {
    match PIPES.with(|pool| pool.borrow_mut().pop()) {
        Some(pipe) => Ok(pipe),
        None => Pipe::new(PIPE_SIZE),
    }
}

fn give_back(pipe: Pipe) {
    PIPES.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < POOL_LIMIT {
            pool.push(pipe);
        }
    });
}
