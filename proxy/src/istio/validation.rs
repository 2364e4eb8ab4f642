//! `--run-validation`, as Istio's `tools/istio-iptables/pkg/validation`:
//! listen where the mesh proxy would (loopback, `-p` and `-z`), connect
//! once a second from loopback to 127.0.0.6 (or ::6) on the probe port,
//! and pass when a connection arrives whose `SO_ORIGINAL_DST` names the
//! probe port: the capture redirected it. It must run as the proxy's uid or
//! gid, whose connections to the pod over lo are the ones redirected
//! (Istio's istio-validation container runs as 1337); any other uid times
//! out, as in Istio.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// Istio's exit code for a failed validation.
pub const FAILED: u8 = 126;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no listener available on {0}: {1}")]
    Listen(SocketAddr, #[source] std::io::Error),
    #[error("validation timeout: no probe to {probe} came back redirected within {timeout:?}; the capture is not in place (or this process is not the proxy's uid/gid)")]
    Timeout {
        probe: SocketAddr,
        timeout: Duration,
    },
}

/// Runs the probe until it passes or `timeout` ends.
pub fn validate(
    ports: [u16; 2],
    probe_port: u16,
    ipv6: bool,
    timeout: Duration,
) -> Result<(), Error> {
    let (listen_ip, from, to): (IpAddr, IpAddr, IpAddr) = if ipv6 {
        let inner = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);
        (
            Ipv6Addr::LOCALHOST.into(),
            Ipv6Addr::LOCALHOST.into(),
            inner.into(),
        )
    } else {
        (
            Ipv4Addr::LOCALHOST.into(),
            Ipv4Addr::LOCALHOST.into(),
            Ipv4Addr::new(127, 0, 0, 6).into(),
        )
    };
    let probe = SocketAddr::new(to, probe_port);
    let deadline = Instant::now() + timeout;
    let done = Arc::new(AtomicBool::new(false));
    let (passed_tx, passed) = mpsc::channel();
    for port in ports {
        let addr = SocketAddr::new(listen_ip, port);
        let listener = TcpListener::bind(addr).map_err(|e| Error::Listen(addr, e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::Listen(addr, e))?;
        let (done, passed_tx) = (done.clone(), passed_tx.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let redirected = crate::linux::original_dst(&stream)
                            .is_ok_and(|d| d.port() == probe_port);
                        if redirected {
                            let _ = passed_tx.send(());
                        }
                    }
                    // Until a connection comes, or a tenth of a second
                    // passes to look at `done` again.
                    Err(_) => {
                        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
                        let _ = poll(&mut fds, PollTimeout::from(100u8));
                    }
                }
            }
        });
    }
    let outcome = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break Err(Error::Timeout { probe, timeout });
        }
        // A connection from loopback to the inner address: only the capture
        // sends it to a listener here.
        let _ = connect_from(from, probe, left.min(Duration::from_secs(1)));
        if passed
            .recv_timeout(left.min(Duration::from_secs(1)))
            .is_ok()
        {
            break Ok(());
        }
    };
    done.store(true, Ordering::Relaxed);
    outcome
}

fn connect_from(from: IpAddr, to: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        None,
    )?;
    socket.bind(&SocketAddr::new(from, 0).into())?;
    socket.connect_timeout(&to.into(), timeout)?;
    Ok(socket.into())
}
