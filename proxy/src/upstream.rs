//! sluice's own connection to the workload, over lo, which the interception
//! lets through instead of catching it again.
//!
//! With `--upstream-source client` (the default) it comes from the client's
//! own address and goes to the workload's port at the pod's *inner address*,
//! 127.0.0.6 / `::6`, not at the address the client connected to. That is
//! what keeps every tuple sluice makes apart from every tuple a client can
//! make. Were the leg client:P → pod-address:port, the workload's accepted
//! socket (pod-address:port ← client:P) would be exactly the socket a new
//! SYN from the real client's port P looks for: TPROXY's established lookup
//! (and the kernel's own, before sk_lookup runs) would hand that SYN to the
//! workload, which drops or challenges it, and the client stalls or resets
//! an unrelated connection. And a leg that took the port of one of the
//! client's live connections would meet sluice's own accepted socket. No
//! choice of ports avoids both for clients that use every port (NAT
//! gateways, kube-proxy's masquerade). Nothing from outside the pod can
//! reach 127.0.0.6 or `::6` (127/8 is martian off lo; `::6` is exempt from
//! interception only on lo), so no client tuple can ever be a leg's, and the
//! kernel may pick the leg's port itself, with its own uniqueness check.
//!
//! A workload that listens on the pod's address only (not on 0.0.0.0 or
//! `::`) refuses the inner address: the connection then goes to the address
//! the client asked for, from the bypass source, and the fallback is counted
//! (see `server::connection`).

use std::io;
use std::net::{IpAddr, SocketAddr};

use socket2::Socket;
use tokio_uring::net::TcpStream;

use crate::{linux, uring};

/// Where the connection to the workload comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The client's own address; the kernel picks the port, within `ports`
    /// when given (`--upstream-ports`).
    Client { ports: Option<(u16, u16)> },
    /// 127.0.0.6 / ::6.
    Bypass,
}

/// The two shapes a connection to the workload takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leg {
    /// client address:port chosen by the kernel → inner address:original port.
    FromClient { ports: Option<(u16, u16)> },
    /// bypass source:port chosen by the kernel → the original destination.
    FromBypass,
}

impl Leg {
    /// Where this leg connects to, for a connection that was going to
    /// `destination`.
    pub fn target(self, destination: SocketAddr) -> SocketAddr {
        match self {
            Leg::FromClient { .. } => {
                SocketAddr::new(linux::bypass_source(destination.ip()), destination.port())
            }
            Leg::FromBypass => destination,
        }
    }
}

/// A connection to the workload under way; its descriptor can be aborted
/// (the connect timeout) while [`Pending::finish`] waits.
pub struct Pending {
    socket: Socket,
    target: SocketAddr,
}

impl std::os::fd::AsRawFd for Pending {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.socket.as_raw_fd()
    }
}

/// Makes the socket of a `leg` for a connection from `client` to
/// `destination`, with the policy's `mark` (see [`linux::upstream_socket`]).
/// The port is left to `connect()` (`IP_BIND_ADDRESS_NO_PORT`), which checks
/// the whole 4-tuple, TIME_WAITs included.
pub fn start(leg: Leg, destination: SocketAddr, client: IpAddr, mark: u32) -> io::Result<Pending> {
    let target = leg.target(destination);
    let socket = linux::upstream_socket(target, mark)?;
    match leg {
        Leg::FromBypass => linux::bind_bypass(&socket, target)?,
        Leg::FromClient { ports } => {
            if let Some((low, high)) = ports {
                linux::set_local_port_range(&socket, low, high)?;
            }
            linux::bind_transparent(&socket, client)?;
        }
    }
    Ok(Pending { socket, target })
}

impl Pending {
    /// Waits until the connection is made.
    pub async fn finish(self) -> io::Result<TcpStream> {
        let connected = uring::connect(self.socket, self.target.into()).await?;
        Ok(TcpStream::from_std(connected.into()))
    }
}
