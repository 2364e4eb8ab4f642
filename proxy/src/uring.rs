//! io_uring operations tokio-uring 0.5 lacks, submitted through its own
//! extension point (`UnsubmittedOneshot` with io-uring 0.6 opcodes) rather
//! than around the runtime:
//! - `connect` of a socket made and bound elsewhere (tokio-uring connects
//!   only sockets it creates, and sluice's must be bound to the bypass source
//!   first);
//! - `poll` for readiness, which the splice forwarder waits on before each
//!   non-blocking `splice(2)`;
//! - `cancel` of whatever is in flight on a descriptor (a poll given up).
//!
//! Everything here is specific to the runtime; a move to another io_uring
//! runtime changes this file, not the forwarders' logic.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{cqueue, opcode, types};
use socket2::{SockAddr, Socket};
use tokio_uring::{OneshotOutputTransform, UnsubmittedOneshot};

/// Connects `socket` to `address`; resolves to the connected socket.
pub async fn connect(socket: Socket, address: SockAddr) -> io::Result<Socket> {
    let address = Box::new(address);
    let entry = opcode::Connect::new(
        types::Fd(socket.as_raw_fd()),
        address.as_ptr().cast(),
        address.len(),
    )
    .build();
    UnsubmittedOneshot::new(Connecting { socket, address }, Connected, entry)
        .submit()
        .await
}

/// Waits until `fd` is ready for any of `events` (`libc::POLLIN`, ...);
/// resolves to the events that are.
pub async fn poll(fd: RawFd, events: u32) -> io::Result<u32> {
    let entry = opcode::PollAdd::new(types::Fd(fd), events).build();
    UnsubmittedOneshot::new((), Plain, entry).submit().await
}

/// Cancels every operation in flight on `fd` (`IORING_ASYNC_CANCEL_FD` and
/// `_ALL`); resolves to how many there were. Their own completions come
/// with ECANCELED.
pub async fn cancel(fd: RawFd) -> io::Result<u32> {
    let entry = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all()).build();
    match UnsubmittedOneshot::new((), Plain, entry).submit().await {
        Err(error) if error.raw_os_error() == Some(libc::ENOENT) => Ok(0),
        done => done,
    }
}

/// Kept alive until the kernel completes the connect: the socket and the
/// address the submission entry points to.
struct Connecting {
    socket: Socket,
    #[allow(dead_code)] // read by the kernel through the entry's pointer
    address: Box<SockAddr>,
}

struct Connected;

impl OneshotOutputTransform for Connected {
    type Output = io::Result<Socket>;
    type StoredData = Connecting;

    fn transform_oneshot_output(self, data: Connecting, cqe: cqueue::Entry) -> io::Result<Socket> {
        result(&cqe).map(|_| data.socket)
    }
}

/// An operation whose result is a plain count or mask.
struct Plain;

impl OneshotOutputTransform for Plain {
    type Output = io::Result<u32>;
    type StoredData = ();

    fn transform_oneshot_output(self, _: (), cqe: cqueue::Entry) -> io::Result<u32> {
        result(&cqe)
    }
}

fn result(cqe: &cqueue::Entry) -> io::Result<u32> {
    match cqe.result() {
        errno if errno < 0 => Err(io::Error::from_raw_os_error(-errno)),
        value => Ok(value as u32),
    }
}
