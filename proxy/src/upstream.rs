//! sluice's own connection to the workload: from the client's own address
//! (`--upstream-source client`), or from the bypass source (`bypass`); over
//! lo, which the interception lets through instead of catching it again.

use std::cell::Cell;
use std::hash::{Hash, Hasher};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};

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

/// A connection to the workload under way; its descriptor can be aborted
/// (the connect timeout) while [`Pending::finish`] waits.
pub struct Pending {
    socket: Socket,
    /// The connect was started (from a client's address); otherwise it is
    /// made by the ring.
    started: bool,
}

impl AsRawFd for Pending {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

/// Starts the connection from `client` to `destination`, with the policy's
/// `mark` (see [`linux::upstream_socket`]).
///
/// From the client's address, sluice picks the source port itself, from
/// `--upstream-ports`, apart from the ports clients connect from. The
/// kernel's own choice would come from the pod's ephemeral range, by the
/// same hash of (client address, destination) that the client's kernel uses
/// for its next connection to the same destination: the upstream connection
/// would take the port of a client connection to come, or of one that is
/// open (the mirror image: two sockets in the pod for one 4-tuple, seen
/// from either end), and one of the two hangs. `IP_LOCAL_PORT_RANGE` cannot
/// help: the kernel only narrows the pod's range with it.
///
/// Each worker walks the range in turn. The next port is nearly always free,
/// so the ring makes the connect. When it was not (`search`: the last try
/// said EADDRNOTAVAIL, the 4-tuple is held by another connection or a
/// TIME_WAIT too young to reuse), the ports are tried in turn with a
/// non-blocking `connect()`, which says at once: a run of thousands of ports
/// held by open connections costs milliseconds, not a ring trip each. That
/// fails with EADDRNOTAVAIL when the whole range is taken.
pub fn start(
    destination: SocketAddr,
    client: IpAddr,
    source: Source,
    mark: u32,
    search: bool,
) -> io::Result<Pending> {
    let (low, high) = match source {
        Source::Bypass => {
            let socket = linux::upstream_socket(destination, mark, false)?;
            linux::bind_bypass(&socket, destination)?;
            return Ok(Pending {
                socket,
                started: false,
            });
        }
        Source::Client { ports } => ports,
    };
    let ports = Ports { low, high };
    if !search {
        let socket = linux::upstream_socket(destination, mark, false)?;
        match linux::bind_transparent(&socket, SocketAddr::new(client, ports.next())) {
            Ok(()) => {
                return Ok(Pending {
                    socket,
                    started: false,
                })
            }
            // A port something listens on, say: search from here.
            Err(error) if taken(&error) => {}
            Err(error) => return Err(error),
        }
    }
    for _ in 0..ports.span() {
        let socket = linux::upstream_socket(destination, mark, true)?;
        match linux::bind_transparent(&socket, SocketAddr::new(client, ports.next())) {
            Ok(()) => {}
            Err(error) if taken(&error) => continue,
            Err(error) => return Err(error),
        }
        match linux::start_connect(&socket, destination) {
            Ok(()) => {
                return Ok(Pending {
                    socket,
                    started: true,
                })
            }
            Err(error) if taken(&error) => continue,
            Err(error) => return Err(error),
        }
    }
    Err(io::Error::from_raw_os_error(libc::EADDRNOTAVAIL))
}

/// A port (or its 4-tuple) someone holds: try the next.
fn taken(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EADDRINUSE | libc::EADDRNOTAVAIL)
    )
}

/// `--upstream-ports`, walked by this worker from its own place.
struct Ports {
    low: u16,
    high: u16,
}

impl Ports {
    fn span(&self) -> u32 {
        u32::from(self.high) - u32::from(self.low) + 1
    }

    fn next(&self) -> u16 {
        let span = self.span();
        let offset = NEXT_PORT.with(|next| {
            let offset = next.get() % span;
            next.set(offset + 1);
            offset
        });
        u16::try_from(u32::from(self.low) + offset).unwrap_or(self.low)
    }
}

impl Pending {
    /// Waits until the connection is made.
    pub async fn finish(self, destination: SocketAddr) -> io::Result<TcpStream> {
        if !self.started {
            let connected = uring::connect(self.socket, destination.into()).await?;
            return Ok(TcpStream::from_std(connected.into()));
        }
        uring::poll(self.socket.as_raw_fd(), libc::POLLOUT as u32).await?;
        if let Some(error) = linux::take_error(&self.socket)? {
            return Err(error);
        }
        // The ring's reads and writes want a blocking socket (they would
        // hand EAGAIN back instead of waiting).
        linux::set_blocking(&self.socket)?;
        Ok(TcpStream::from_std(self.socket.into()))
    }
}
