//! The workload: one TCP server in the pod namespace, served by a tokio
//! current-thread runtime (one thread; 10,000 idle connections cost it only
//! memory).
//!
//! A connection opens with one byte that says what the client wants:
//! - [`ECHO`]: every byte is sent back (after `reply_delay`, if set); on the
//!   client's FIN the server sends its own FIN.
//! - [`SINK`]: bytes are counted and dropped; on the client's FIN the server
//!   answers the count as a little-endian u64, so the client can check that
//!   every byte it sent arrived (and that the proxy forwards after a half-close).
//!
//! Every accepted connection is classified: it came through the proxy when
//! its peer is the bypass source (127.0.0.6 / ::6: HAProxy's `source`, and
//! sluice with `--upstream-source bypass`) or when the accepted socket
//! carries sluice's mark, [`PROXY_MARK`]. By default sluice connects from the
//! client's own address, so the peer cannot tell; but its upstream socket
//! carries `SO_MARK` = its policy mark, and its rules turn on
//! `net.ipv4.tcp_fwmark_accept` in the pod namespace, so the workload's
//! accepted socket takes the mark of the SYN that opened it. For an
//! interception mode, any other connection reached the workload without
//! passing through the proxy: a bypass.
//!
//! The mark is as exact as the address. A SYN that bypassed the proxy
//! arrives from the client unmarked (a mark does not cross the veth between
//! namespaces), and sluice's rules never mark a SYN that goes anywhere but
//! sluice's own listener: TPROXY marks the SYNs it steers to sluice (whose
//! accepted sockets carry the listener's mark, 1338, not 1337), and the
//! divert rule marks only packets after the SYN. So a workload socket with
//! mark 1337 was opened by a socket that set it: sluice's upstream leg. A
//! custom scenario that gives sluice another `--mark` shows as bypasses, loudly,
//! not as a silent pass.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use netlab::Netns;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

pub const ECHO: u8 = b'E';
pub const SINK: u8 = b'S';

/// Where the proxy's own connections to the workload come from (sluice's and
/// the HAProxy configuration's `source`).
pub const BYPASS_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
pub const BYPASS_V6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);
/// sluice's default `--mark`, which the built-in scenarios keep: the mark of
/// its upstream sockets, and so of the workload's sockets they open.
pub const PROXY_MARK: u32 = 1337;

/// The kernel caps the backlog at the namespace's `net.core.somaxconn`
/// (4096 by default); a ramp of 10,000 connections needs more than std's 128.
const BACKLOG: i32 = 4096;

#[derive(Debug, Default)]
pub struct Counters {
    /// From the bypass source or with the proxy's mark: came through the proxy.
    pub via_proxy: AtomicU64,
    /// Any other: for an interception mode, a bypass.
    pub not_via_proxy: AtomicU64,
}

/// A snapshot of [`Counters`], to report per load as a difference.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Peers {
    pub via_proxy: u64,
    pub not_via_proxy: u64,
}

impl Peers {
    pub fn plus(self, other: Peers) -> Peers {
        Peers {
            via_proxy: self.via_proxy + other.via_proxy,
            not_via_proxy: self.not_via_proxy + other.not_via_proxy,
        }
    }

    pub fn since(self, before: Peers) -> Peers {
        Peers {
            via_proxy: self.via_proxy - before.via_proxy,
            not_via_proxy: self.not_via_proxy - before.not_via_proxy,
        }
    }
}

pub struct Workload {
    addr: SocketAddr,
    counters: Arc<Counters>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Workload {
    /// Listens on `addr` inside `ns` and serves until dropped. `reply_delay`
    /// holds every echo reply back (for tests that need a known latency).
    pub fn start(ns: &Netns, addr: SocketAddr, reply_delay: Duration) -> Result<Workload> {
        let counters = Arc::new(Counters::default());
        let (stop_tx, stop_rx) = oneshot::channel();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let shared = counters.clone();
        // Spawned from inside the namespace, so the runtime thread is there too.
        let thread = ns.try_run(move || {
            std::thread::Builder::new()
                .name("workload".into())
                .spawn(move || {
                    let started = listen(addr).and_then(|listener| {
                        let runtime = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .context("building the workload's tokio runtime")?;
                        Ok((listener, runtime))
                    });
                    let (listener, runtime) = match started {
                        Ok(started) => {
                            let _ = ready_tx.send(Ok(()));
                            started
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    runtime.block_on(async move {
                        match TcpListener::from_std(listener) {
                            Ok(listener) => serve(listener, shared, reply_delay, stop_rx).await,
                            Err(e) => eprintln!("workload: registering the listener: {e}"),
                        }
                    });
                })
        })??;
        let ready = ready_rx
            .recv()
            .map_err(|_| anyhow!("the workload thread ended before it listened"))?;
        ready.with_context(|| format!("starting the workload on {addr}"))?;
        Ok(Workload {
            addr,
            counters,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn peers(&self) -> Peers {
        Peers {
            via_proxy: self.counters.via_proxy.load(Ordering::SeqCst),
            not_via_proxy: self.counters.not_via_proxy.load(Ordering::SeqCst),
        }
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn listen(addr: SocketAddr) -> Result<std::net::TcpListener> {
    use nix::sys::socket::{
        bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
        SockaddrStorage,
    };
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("socket()")?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).context("SO_REUSEADDR")?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(addr),
    )
    .with_context(|| format!("bind({addr})"))?;
    let backlog = Backlog::new(BACKLOG).context("backlog")?;
    listen(&fd, backlog).context("listen()")?;
    Ok(std::net::TcpListener::from(fd))
}

async fn serve(
    listener: TcpListener,
    counters: Arc<Counters>,
    reply_delay: Duration,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let counter = if is_bypass(peer.ip()) || has_proxy_mark(&stream) {
                        &counters.via_proxy
                    } else {
                        &counters.not_via_proxy
                    };
                    counter.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(handle(stream, reply_delay));
                }
                // EMFILE and friends: back off instead of spinning or giving up.
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            },
        }
    }
}

pub fn is_bypass(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4 == BYPASS_V4,
        IpAddr::V6(v6) => v6 == BYPASS_V6 || v6.to_ipv4_mapped() == Some(BYPASS_V4),
    }
}

/// Whether the accepted socket carries [`PROXY_MARK`] (see the module
/// header). A socket whose mark cannot be read counts as not through the
/// proxy: a reported bypass gets looked at, a hidden one would not.
fn has_proxy_mark(stream: &TcpStream) -> bool {
    use nix::sys::socket::{getsockopt, sockopt};
    getsockopt(stream, sockopt::Mark).is_ok_and(|mark| mark == PROXY_MARK)
}

async fn handle(mut stream: TcpStream, reply_delay: Duration) {
    let _ = stream.set_nodelay(true);
    let mut what = [0u8; 1];
    if stream.read_exact(&mut what).await.is_err() {
        return;
    }
    let _ = match what[0] {
        ECHO => echo(&mut stream, reply_delay).await,
        SINK => sink(&mut stream).await,
        _ => return,
    };
}

async fn echo(stream: &mut TcpStream, reply_delay: Duration) -> std::io::Result<()> {
    // Small: the echo connections carry 64-byte messages, and 10,000 of them
    // are held open at once.
    let mut buffer = [0u8; 2048];
    loop {
        let n = stream.read(&mut buffer).await?;
        if n == 0 {
            return stream.shutdown().await;
        }
        if !reply_delay.is_zero() {
            tokio::time::sleep(reply_delay).await;
        }
        stream.write_all(&buffer[..n]).await?;
    }
}

async fn sink(stream: &mut TcpStream) -> std::io::Result<()> {
    let mut buffer = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = stream.read(&mut buffer).await?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    stream.write_all(&total.to_le_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::SocketAddr;

    use socket2::{Domain, Socket, Type};

    use super::*;
    use crate::load::testing::Lab;

    /// One echo from inside the pod, from `source` and with `mark`.
    fn echo_from(lab: &Lab, source: Option<Ipv4Addr>, mark: Option<u32>) {
        let target = lab.target();
        lab.topology.pod.run(move || {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            if let Some(mark) = mark {
                socket.set_mark(mark).unwrap();
            }
            if let Some(ip) = source {
                socket.bind(&SocketAddr::from((ip, 0)).into()).unwrap();
            }
            socket.connect(&target.into()).unwrap();
            let mut stream = std::net::TcpStream::from(socket);
            stream.write_all(&[ECHO, 7]).unwrap();
            let mut reply = [0u8; 1];
            stream.read_exact(&mut reply).unwrap();
        });
    }

    #[test]
    fn through_the_proxy_by_address_or_by_mark() {
        let lab = Lab::new("t-wlmark", Duration::ZERO);
        // What sluice's rules do in the pod: the accepted socket takes the
        // SYN's mark.
        lab.topology
            .pod
            .sysctl_set("net.ipv4.tcp_fwmark_accept", "1")
            .unwrap();
        let seen = |f: &dyn Fn()| {
            let before = lab.workload.peers();
            f();
            std::thread::sleep(Duration::from_millis(50));
            lab.workload.peers().since(before)
        };
        let via = Peers {
            via_proxy: 1,
            not_via_proxy: 0,
        };
        let bypass = Peers {
            via_proxy: 0,
            not_via_proxy: 1,
        };
        // HAProxy, sluice --upstream-source bypass.
        assert_eq!(seen(&|| echo_from(&lab, Some(BYPASS_V4), None)), via);
        // sluice from the client's address: only the mark tells.
        assert_eq!(seen(&|| echo_from(&lab, None, Some(PROXY_MARK))), via);
        // Another mark (sluice's listeners carry mark + 1), or none.
        assert_eq!(
            seen(&|| echo_from(&lab, None, Some(PROXY_MARK + 1))),
            bypass
        );
        assert_eq!(seen(&|| echo_from(&lab, None, None)), bypass);
    }
}
