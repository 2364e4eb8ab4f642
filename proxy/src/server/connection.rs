//! One intercepted connection, from accept to close: where it was going,
//! whether sluice may take it there, the connection to the workload (within
//! the connect timeout), and the forwarding.

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio_uring::net::TcpStream;
use tracing::debug;

use super::stats::{self, ConnectFailure, Refused};
use super::worker::{Registration, Worker};
use crate::forward::{self, End, Sockmap};
use crate::linux;
use crate::listener::{self, ClientAddr, OrigDst};
use crate::upstream::{self, Leg, Source};

pub async fn serve(worker: Rc<Worker>, client: TcpStream, peer: ClientAddr) {
    let Some(registration) = worker.track(&client) else {
        return worker.refuse(&client, peer, None, Refused::Draining);
    };
    let settings = worker.settings.clone();
    let destination = match listener::original_dst(settings.mode, &client) {
        Ok(destination) => destination,
        Err(error) => {
            debug!(client = %peer, %error, "no original destination");
            return worker.refuse(&client, peer, None, Refused::NoOriginalDestination);
        }
    };
    if let Err(reason) = check_destination(destination, settings.proxy_port) {
        return worker.refuse(&client, peer, Some(destination.addr), reason);
    }

    #[cfg(feature = "bench-inject")]
    crate::bench_inject::per_connection(&client);
    let connect_started = Instant::now();
    let upstream = match connect(
        &worker,
        &registration,
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
            let _ = linux::reset_on_close(&client);
            return;
        }
    };
    let opened = registration.forwarding(&upstream);
    let stats = &worker.stats;
    stats::add(&stats.opened, 1);
    stats.connect_duration.observe(opened - connect_started);

    let forwarded = forward::forward(&settings.forwarding, &client, &upstream).await;
    stats.connection_duration.observe(opened.elapsed());
    stats::add(&stats.closed, 1);
    let forwarded = match forwarded {
        Ok(forwarded) => forwarded,
        Err(error) => {
            debug!(client = %peer, %error, "forwarder could not start; connection reset");
            return;
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
}

/// How long to wait before trying again a connect that found no free port.
const PORT_RETRY: Duration = Duration::from_millis(20);

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
/// beyond the port range per second), is tried again every 20 ms until the
/// timeout: a burst is slowed down, not failed.
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
        if !no_port || started.elapsed() + PORT_RETRY >= settings.connect_timeout {
            return Err((ConnectFailure::of(&error), error));
        }
        tokio::time::sleep(PORT_RETRY).await;
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
