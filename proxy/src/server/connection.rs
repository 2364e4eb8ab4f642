//! One intercepted connection, from accept to close: where it was going,
//! whether sluice may take it there, the connection to the workload (within
//! the connect timeout), and the forwarding.

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio_uring::net::TcpStream;
use tracing::debug;

use super::worker::{Registration, Worker};
use crate::forward::{self, End, Sockmap};
use crate::linux;
use crate::listener::{self, ClientAddr, OrigDst};
use crate::stats::{self, ConnectFailure, Refused};
use crate::upstream::{self, Leg, Source};

/// Serves `client`, which `registration` has entered in the worker's table
/// (at the accept: a drain counts it from then on).
pub async fn serve(
    worker: Rc<Worker>,
    client: TcpStream,
    peer: ClientAddr,
    registration: Registration,
) {
    let upstream = serve_tracked(&worker, &client, peer, &registration).await;
    // The sweep aborts the descriptors the table names: the connection
    // leaves it before its sockets close, or an abort could hit a
    // descriptor that another connection has been given since.
    drop(registration);
    drop(upstream);
    drop(client);
}

/// Everything from the original destination to the end of forwarding;
/// returns the connection to the workload, if one was made, for the caller
/// to close after the connection has left the table.
async fn serve_tracked(
    worker: &Rc<Worker>,
    client: &TcpStream,
    peer: ClientAddr,
    registration: &Registration,
) -> Option<TcpStream> {
    let settings = worker.settings.clone();
    let destination = match listener::original_dst(settings.mode, client) {
        Ok(destination) => destination,
        Err(error) => {
            debug!(client = %peer, %error, "no original destination");
            worker.refuse(client, peer, None, Refused::NoOriginalDestination);
            return None;
        }
    };
    if let Err(reason) = check_destination(destination, settings.proxy_port) {
        worker.refuse(client, peer, Some(destination.addr), reason);
        return None;
    }

    #[cfg(feature = "bench-inject")]
    crate::bench_inject::per_connection(client);
    let connect_started = Instant::now();
    let upstream = match connect(
        worker,
        registration,
        peer,
        destination.addr,
        connect_started,
    )
    .await
    {
        Ok(upstream) => upstream,
        Err((failure, error)) => {
            stats::add(&worker.stats.connect_failures[failure as usize], 1);
            debug!(client = %peer, %destination, %error, reason = failure.label(), "workload unreachable; connection reset");
            let _ = linux::reset_on_close(client);
            return None;
        }
    };
    let opened = registration.forwarding(&upstream);
    let stats = &worker.stats;
    stats::add(&stats.opened, 1);
    stats.connect_duration.observe(opened - connect_started);

    let forwarded = forward::forward(&settings.forwarding, client, &upstream).await;
    stats.connection_duration.observe(opened.elapsed());
    stats::add(&stats.closed, 1);
    let forwarded = match forwarded {
        Ok(forwarded) => forwarded,
        Err(error) => {
            debug!(client = %peer, %error, "forwarder could not start; connection reset");
            return Some(upstream);
        }
    };
    stats::add(&stats.bytes_to_workload, forwarded.upstream.bytes);
    stats::add(&stats.bytes_to_client, forwarded.downstream.bytes);
    match forwarded.sockmap {
        Sockmap::NotJoined => {}
        Sockmap::Joined { held_back } => {
            stats::add(&stats.sockmap_joined, 1);
            stats::add(&stats.sockmap_held_back, u64::from(held_back));
        }
        Sockmap::FellBack => stats::add(&stats.forwarder_fallbacks, 1),
    }
    for (side, direction) in [
        ("client", &forwarded.upstream),
        ("workload", &forwarded.downstream),
    ] {
        match &direction.end {
            End::Eof => {}
            End::ReadFailed(error) => {
                debug!(client = %peer, %error, "{side} side failed; reset passed on")
            }
            End::WriteFailed(error) => {
                debug!(client = %peer, %error, "write towards the peer of the {side} side failed; reset passed on")
            }
        }
    }
    debug!(client = %peer, %destination, up = forwarded.upstream.bytes, down = forwarded.downstream.bytes, "closed");
    Some(upstream)
}

/// A connect that found no free source port is tried again after this
/// long, then after twice as long each time ...
const PORT_RETRY: Duration = Duration::from_millis(20);
/// ... until this long after the first attempt: about a second of TIME_WAIT
/// churn (loopback reuses a TIME_WAIT after one second) is waited out,
/// while a range that held connections exhaust fails in a few attempts,
/// not in one attempt every 20 ms until the connect timeout (each one a
/// kernel search of the whole range, on the worker's thread).
const PORT_GIVE_UP: Duration = Duration::from_secs(2);

/// Connects to the workload, within the connect timeout (the worker's sweep
/// aborts a connect that takes longer).
///
/// From the client's address, the leg goes to the pod's inner address (see
/// `upstream`). A workload that refuses it listens on the pod's address
/// only: the connection goes there from the bypass source instead, the
/// worker remembers that destination for a while (one refused connect per
/// [`super::worker::INNER_REFUSED_FOR`], not one per connection), and each such
/// connection is counted. EADDRNOTAVAIL, no free source port (every one is
/// held, or in a TIME_WAIT less than a second old under a connection rate
/// beyond the port range per second), is tried again a few times, further
/// apart each time ([`PORT_RETRY`], [`PORT_GIVE_UP`]): a burst is slowed
/// down, an exhausted range fails fast, counted as `no_source_port`.
async fn connect(
    worker: &Worker,
    registration: &Registration,
    client: ClientAddr,
    destination: SocketAddr,
    started: Instant,
) -> Result<TcpStream, (ConnectFailure, io::Error)> {
    let settings = &worker.settings;
    let mut leg = match settings.upstream_source {
        Source::Bypass => Leg::FromBypass,
        Source::Client { .. } if worker.inner_refused(destination) => Leg::FromBypass,
        Source::Client { ports } => Leg::FromClient { ports },
    };
    let fell_back = leg == Leg::FromBypass && settings.upstream_source != Source::Bypass;
    let mut refused_inner = false;
    let mut port_retry = PORT_RETRY;
    loop {
        let attempt = match upstream::start(leg, destination, client.0.ip(), settings.mark) {
            Ok(pending) => {
                registration.connecting(&pending, started);
                pending.finish().await
            }
            Err(error) => Err(error),
        };
        let error = match attempt {
            Ok(upstream) => {
                if refused_inner {
                    worker.remember_inner_refused(destination);
                }
                if fell_back || refused_inner {
                    stats::add(&worker.stats.client_source_fallbacks, 1);
                }
                return Ok(upstream);
            }
            Err(error) => error,
        };
        if registration.timed_out() {
            return Err((ConnectFailure::Timeout, error));
        }
        // The socket is closed: the sweep must not abort its descriptor.
        registration.waiting();
        if matches!(leg, Leg::FromClient { .. }) && error.raw_os_error() == Some(libc::ECONNREFUSED)
        {
            leg = Leg::FromBypass;
            refused_inner = true;
            continue;
        }
        let no_port = error.raw_os_error() == Some(libc::EADDRNOTAVAIL);
        let give_up = settings.connect_timeout.min(PORT_GIVE_UP);
        if !no_port || started.elapsed() + port_retry >= give_up {
            return Err((ConnectFailure::of(&error), error));
        }
        tokio::time::sleep(port_retry).await;
        port_retry *= 2;
    }
}

/// Never to sluice's own port: that would loop.
///
/// sluice is no open relay, and needs no look per connection to be sure:
/// the interception takes only the pod's own addresses (`addrtype LOCAL` in
/// the rules; sk_lookup only runs for locally delivered packets; REDIRECT
/// rewrites to a local address), and the upstream socket is bound to `lo`
/// and routed by its mark into `local default dev lo`, so whatever its
/// destination, it can only reach a socket of the pod.
fn check_destination(destination: OrigDst, proxy_port: u16) -> Result<(), Refused> {
    if destination.addr.port() == proxy_port {
        return Err(Refused::OwnPort);
    }
    Ok(())
}
