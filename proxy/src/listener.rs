//! The transparent listening sockets, and recovery of the destination a
//! client originally asked for.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::config::Mode;
use crate::linux;

/// The address the client connected to, before interception.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrigDst {
    pub addr: SocketAddr,
    pub recovered: Recovered,
}

/// How an [`OrigDst`] was found; the modes must not be mixed up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovered {
    /// `getsockname()` on a socket TPROXY or sk_lookup handed over: the
    /// kernel kept the destination.
    SocketName,
    /// `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`: the destination before
    /// REDIRECT rewrote it, kept by conntrack.
    Conntrack,
}

/// The client's own address, as the proxy's accepted socket sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

impl std::fmt::Display for OrigDst {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.addr.fmt(f)
    }
}

impl std::fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("port {port} is already in use ({family}), and stayed so for 3 s: stop what listens there or choose another --proxy-port")]
    PortInUse { port: u16, family: &'static str },
    #[error("a transparent listener needs CAP_NET_ADMIN (IP_TRANSPARENT): run sluice as root or grant it NET_ADMIN")]
    NotPermitted,
    #[error("cannot listen on {addr}")]
    Other {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// The listening sockets: one per worker and family, in one `SO_REUSEPORT`
/// group per family, so that each worker accepts from a queue of its own
/// (the kernel spreads connections over the group by their hash, TPROXY's
/// and sk_lookup's listener lookups included) rather than every worker
/// waking for one shared queue. No IPv6 listeners on a kernel without IPv6;
/// a namespace that only has IPv6 disabled still gets them (they can bind,
/// and simply receive nothing).
pub struct Listeners {
    pub v4: Vec<std::net::TcpListener>,
    pub v6: Vec<std::net::TcpListener>,
}

const BACKLOG: i32 = 4096;

impl Listeners {
    /// `count` listeners per family; `mark`: see `linux::listener`.
    pub fn bind(mode: Mode, port: u16, mark: u32, count: usize) -> Result<Listeners, Error> {
        // sk_lookup hands connections to any listening socket of the right
        // family, whatever it is bound to; only TPROXY needs transparency.
        let transparent = mode == Mode::Tproxy;
        let v6 = match listen(
            (Ipv6Addr::UNSPECIFIED, port).into(),
            transparent,
            mark,
            count,
        ) {
            Ok(listeners) => listeners,
            Err(Error::Other { source, .. })
                if source.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
            {
                Vec::new()
            }
            Err(error) => return Err(error),
        };
        Ok(Listeners {
            v4: listen(
                (Ipv4Addr::UNSPECIFIED, port).into(),
                transparent,
                mark,
                count,
            )?,
            v6,
        })
    }

    /// One listener of each family, for one worker.
    pub fn take_one(&mut self) -> Vec<std::net::TcpListener> {
        [&mut self.v4, &mut self.v6]
            .into_iter()
            .filter_map(Vec::pop)
            .collect()
    }
}

/// How long a bind that meets EADDRINUSE is tried again. The listener of a
/// sluice that just exited can hold the port for a moment (in ebpf mode the
/// sockmap keeps it until the kernel frees the program's maps), and a
/// container restart binds at once.
const PORT_RELEASE_WAIT: Duration = Duration::from_secs(3);

fn listen(
    addr: SocketAddr,
    transparent: bool,
    mark: u32,
    count: usize,
) -> Result<Vec<std::net::TcpListener>, Error> {
    let family = if addr.is_ipv4() { "IPv4" } else { "IPv6" };
    let failed = |error: io::Error| match error.raw_os_error() {
        Some(libc::EADDRINUSE) => Error::PortInUse {
            port: addr.port(),
            family,
        },
        Some(libc::EPERM) => Error::NotPermitted,
        _ => Error::Other {
            addr,
            source: error,
        },
    };
    // SO_REUSEPORT would let the group join whatever listens there already
    // with it (another sluice): first make sure nothing does.
    let deadline = Instant::now() + PORT_RELEASE_WAIT;
    loop {
        match linux::port_free(addr) {
            Ok(()) => break,
            Err(error)
                if error.raw_os_error() == Some(libc::EADDRINUSE) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(error) => return Err(failed(error)),
        }
    }
    (0..count)
        .map(|_| {
            let listener = linux::listener(addr, transparent, mark, BACKLOG).map_err(failed)?;
            // Accepted sockets inherit it: no call per connection.
            linux::set_keepalive(&listener).map_err(failed)?;
            Ok(listener)
        })
        .collect()
}

pub fn original_dst(mode: Mode, accepted: &impl AsRawFd) -> io::Result<OrigDst> {
    match mode {
        Mode::Tproxy | Mode::Ebpf => Ok(OrigDst {
            addr: linux::local_addr(accepted)?,
            recovered: Recovered::SocketName,
        }),
        Mode::Redirect => Ok(OrigDst {
            addr: linux::original_dst(accepted)?,
            recovered: Recovered::Conntrack,
        }),
    }
}
