//! sluice's own connection to the workload: from the bypass source, so the
//! interception rules let it through instead of catching it again.
//!
//! tokio-uring 0.5 can only connect a socket it created itself, and ours must
//! be bound to the bypass source first. The connect is therefore submitted as
//! a one-shot custom operation (`UnsubmittedOneshot` with io-uring 0.6's
//! `opcode::Connect`) on a socket2 socket: the crate's own extension point,
//! one level down, rather than a blocking connect or a readiness loop of ours.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use io_uring::{cqueue, opcode, types};
use socket2::{SockAddr, Socket};
use tokio_uring::net::TcpStream;
use tokio_uring::{OneshotOutputTransform, UnsubmittedOneshot};

use crate::linux;

pub async fn connect(destination: SocketAddr) -> io::Result<TcpStream> {
    let socket = linux::bypass_socket(destination)?;
    let address = Box::new(SockAddr::from(destination));
    let entry = opcode::Connect::new(
        types::Fd(socket.as_raw_fd()),
        address.as_ptr().cast(),
        address.len(),
    )
    .build();
    let connected = UnsubmittedOneshot::new(Pending { socket, address }, Connected, entry)
        .submit()
        .await?;
    Ok(TcpStream::from_std(connected.into()))
}

/// Kept alive until the kernel completes the operation: the socket and the
/// address the submission entry points to.
struct Pending {
    socket: Socket,
    #[allow(dead_code)] // read by the kernel through the entry's pointer
    address: Box<SockAddr>,
}

struct Connected;

impl OneshotOutputTransform for Connected {
    type Output = io::Result<Socket>;
    type StoredData = Pending;

    fn transform_oneshot_output(self, data: Pending, cqe: cqueue::Entry) -> io::Result<Socket> {
        match cqe.result() {
            errno if errno < 0 => Err(io::Error::from_raw_os_error(-errno)),
            _ => Ok(data.socket),
        }
    }
}
