//! The first moments of a sockmap connection: forwarded by copy, then handed
//! over to the kernel once it has lived long enough to be worth joining.
//!
//! Joining costs about thirty syscalls (map updates, counters, a wait for the
//! peer's send queue at each FIN), which a short connection, the request and
//! reply of a connection per call, never earns back. So a connection starts
//! with copy and is joined only once it is older than `--sockmap-after`.
//!
//! Copy here waits for readiness before it reads (a poll, then a read that
//! does not wait), instead of leaving a read in the kernel: a direction
//! waiting for bytes holds nothing but a poll, which may be given up at any
//! moment without losing a byte. The hand-over happens when both directions
//! wait so at once after the deadline: no byte is then in user space, and
//! whatever arrives from then on waits in the receive queue for the program.
//! A direction that is writing finishes first; one that has ended (a FIN or a
//! reset) keeps the connection on copy to its end, since the kernel joins only
//! established sockets.

use std::cell::Cell;
use std::convert::Infallible;
use std::os::fd::AsRawFd;
use std::pin::pin;
use std::time::Duration;

use futures::future::{self, Either};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_uring::net::TcpStream;

use super::copy::{INITIAL_BUFFER, MAX_BUFFER};
use super::{Direction, End, Forwarded, Sockmap, Teardown};
use crate::{linux, uring};

/// How [`copy_first`] ended.
pub enum CopyFirst {
    /// Both directions ended on copy.
    Ended(Forwarded),
    /// Both directions are waiting, with no byte in hand and nothing in the
    /// kernel but their abandoned polls (already cancelled): the connection
    /// is the sockmap's. The bytes each socket's direction copied so far,
    /// client's first.
    HandedOver([u64; 2]),
}

/// Forwards with copy until both directions end, or until `after` has passed
/// and both are waiting for bytes at the same time.
pub async fn copy_first(client: &TcpStream, upstream: &TcpStream, after: Duration) -> CopyFirst {
    let handover = Handover {
        deadline: Instant::now() + after,
        waiting: [Cell::new(false), Cell::new(false)],
        stopped: Cell::new(false),
        stop: Notify::new(),
    };
    let teardown = Teardown::default();
    let pumps = pin!(future::join(
        pump(client, upstream, 0, &handover, &teardown),
        pump(upstream, client, 1, &handover, &teardown),
    ));
    // Both directions may already be waiting when the deadline comes (an
    // idle connection): nobody else would look then.
    let deadline = pin!(async {
        tokio::time::sleep_until(handover.deadline).await;
        handover.try_stop();
        future::pending::<Infallible>().await
    });
    let (to_upstream, to_client) = match future::select(pumps, deadline).await {
        Either::Left((directions, _)) => directions,
        Either::Right((never, _)) => match never {},
    };
    match (to_upstream, to_client) {
        (Step::Ended(upstream_end), Step::Ended(downstream_end)) => CopyFirst::Ended(Forwarded {
            upstream: upstream_end,
            downstream: downstream_end,
            sockmap: Sockmap::NotJoined,
        }),
        (to_upstream, to_client) => {
            // Only a stop pauses a direction, and it pauses both (see
            // `Handover::try_stop`), so both are paused here.
            let _ = future::join(
                uring::cancel(client.as_raw_fd()),
                uring::cancel(upstream.as_raw_fd()),
            )
            .await;
            CopyFirst::HandedOver([to_upstream.bytes(), to_client.bytes()])
        }
    }
}

/// What the two directions share to agree on a moment to stop.
struct Handover {
    deadline: Instant,
    /// Per direction: waiting for bytes, none in hand.
    waiting: [Cell<bool>; 2],
    stopped: Cell<bool>,
    /// Wakes the directions waiting for bytes when `stopped` is set.
    stop: Notify,
}

impl Handover {
    /// Stops both directions if the deadline has passed and both are
    /// waiting; true once they are stopped.
    fn try_stop(&self) -> bool {
        if !self.stopped.get()
            && self.waiting.iter().all(Cell::get)
            && Instant::now() >= self.deadline
        {
            self.stopped.set(true);
            self.stop.notify_waiters();
        }
        self.stopped.get()
    }
}

enum Step {
    Ended(Direction),
    /// Stopped between two messages; the bytes copied until then.
    Paused(u64),
}

impl Step {
    fn bytes(&self) -> u64 {
        match self {
            Step::Ended(direction) => direction.bytes,
            Step::Paused(bytes) => *bytes,
        }
    }
}

/// Copies from `from` to `to` as [`super::copy`] does, but waits for
/// readiness before each read, and stops when the hand-over says so.
async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    side: usize,
    handover: &Handover,
    teardown: &Teardown,
) -> Step {
    // Taken at the first byte: a connection that waits holds no buffer.
    let mut buffer = Vec::new();
    let mut bytes = 0u64;
    // Whether the last read emptied the receive queue. Only then may the
    // direction wait, and so be stopped: a read that filled the buffer may
    // have taken part of a segment, and the kernel's verdict path would
    // hand the program that segment whole, the part already copied again.
    let mut drained = true;
    // The receive buffer's size, read once when first needed.
    let mut queue_limit = None;
    loop {
        let ready = if drained {
            handover.waiting[side].set(true);
            if handover.try_stop() {
                return Step::Paused(bytes);
            }
            let stopped = handover.stop.notified();
            let readable = uring::poll(from.as_raw_fd(), (libc::POLLIN | libc::POLLRDHUP) as u32);
            let ready = match future::select(pin!(readable), pin!(stopped)).await {
                Either::Left((ready, _)) => ready,
                Either::Right(((), _)) => Ok(0),
            };
            // The other direction may have stopped both while this poll
            // ended.
            if handover.stopped.get() {
                return Step::Paused(bytes);
            }
            handover.waiting[side].set(false);
            ready
        } else {
            Ok(0)
        };
        if buffer.capacity() == 0 {
            buffer.reserve_exact(INITIAL_BUFFER);
        }
        if !drained && Instant::now() >= handover.deadline {
            // Time to hand over, but the queue may hold more than the buffer:
            // one read as large as the queue can be empties it.
            let queue =
                *queue_limit.get_or_insert_with(|| linux::receive_buffer(from).unwrap_or(0));
            if queue >= buffer.capacity() {
                buffer = Vec::with_capacity(queue + 1);
            }
        }
        buffer.clear();
        let read = ready.and_then(|_| linux::recv_now(from, &mut buffer));
        let n = match read {
            Ok(0) => {
                teardown.pass_fin(to);
                return Step::Ended(Direction {
                    bytes,
                    end: End::Eof,
                });
            }
            Ok(n) => n,
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                drained = true;
                continue;
            }
            Err(error) => {
                teardown.reset(to);
                return Step::Ended(Direction {
                    bytes,
                    end: End::ReadFailed(error),
                });
            }
        };
        let filled = n == buffer.capacity();
        drained = !filled;
        let (written, returned) = super::copy::write_all(to, buffer).await;
        buffer = returned;
        if let Err(error) = written {
            teardown.reset(from);
            return Step::Ended(Direction {
                bytes,
                end: End::WriteFailed(error),
            });
        }
        bytes += n as u64;
        if filled && buffer.capacity() < MAX_BUFFER {
            buffer = Vec::with_capacity((buffer.capacity() * 2).min(MAX_BUFFER));
        } else if buffer.capacity() > MAX_BUFFER {
            buffer = Vec::with_capacity(MAX_BUFFER);
        }
    }
}
