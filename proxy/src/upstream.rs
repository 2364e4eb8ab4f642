//! sluice's own connection to the workload: from the client's own address
//! (`--upstream-source client`), or from the bypass source (`bypass`); over
//! lo, which the interception lets through instead of catching it again.

use std::cell::Cell;
use std::hash::{Hash, Hasher};
use std::io;
use std::net::{IpAddr, SocketAddr};

use socket2::Socket;
use tokio_uring::net::TcpStream;

use crate::{linux, uring};

/// Where the connection to the workload comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The client's own address, with a port from this range.
    Client { ports: (u16, u16) },
    /// 127.0.0.6 / ::6.
    Bypass,
}

/// Ports tried for one connection before giving up: a port is in use when
/// the same client's address already holds it (another connection to the
/// workload, a TIME_WAIT) or the pod listens on it.
const PORT_ATTEMPTS: u32 = 64;

thread_local! {
    /// Where this worker's next search for a client-source port starts:
    /// each worker walks the range from its own place, so that they rarely
    /// meet.
    static NEXT_PORT: Cell<u32> = Cell::new(std::process::id() ^ thread_seed());
}

fn thread_seed() -> u32 {
    let mut hasher = std::hash::DefaultHasher::new();
    std::thread::current().id().hash(&mut hasher);
    hasher.finish() as u32
}

/// The socket the connection from `client` to `destination` will be made
/// from, with the policy's `mark` (see [`linux::upstream_socket`]); its
/// descriptor can be aborted (the connect timeout) while [`connect`] waits.
///
/// From the client's address, sluice picks the source port itself, from
/// `--upstream-ports`, apart from the ports clients connect from. The
/// kernel's own choice would come from the pod's ephemeral range, by the
/// same hash of (client address, destination) that the client's kernel uses
/// for its next connection to the same destination: the upstream connection
/// would take the port of a client connection to come, or of one that is
/// open (the mirror image: two sockets in the pod for one 4-tuple, seen
/// from either end), and one of the two hangs. IP_LOCAL_PORT_RANGE cannot
/// help: the kernel only narrows the pod's range with it.
pub fn socket(
    destination: SocketAddr,
    client: IpAddr,
    source: Source,
    mark: u32,
) -> io::Result<Socket> {
    let socket = linux::upstream_socket(destination, mark)?;
    let (low, high) = match source {
        Source::Bypass => {
            linux::bind_bypass(&socket, destination)?;
            return Ok(socket);
        }
        Source::Client { ports } => ports,
    };
    let span = u32::from(high) - u32::from(low) + 1;
    for _ in 0..PORT_ATTEMPTS.min(span) {
        let offset = NEXT_PORT.with(|next| {
            let offset = next.get() % span;
            next.set(offset + 1);
            offset
        });
        let port = u16::try_from(u32::from(low) + offset).unwrap_or(low);
        match linux::bind_transparent(&socket, SocketAddr::new(client, port)) {
            Ok(()) => return Ok(socket),
            Err(error) if error.raw_os_error() == Some(libc::EADDRINUSE) => continue,
            Err(error) => return Err(error),
        }
    }
    Err(io::Error::from_raw_os_error(libc::EADDRNOTAVAIL))
}

pub async fn connect(socket: Socket, destination: SocketAddr) -> io::Result<TcpStream> {
    let connected = uring::connect(socket, destination.into()).await?;
    Ok(TcpStream::from_std(connected.into()))
}
