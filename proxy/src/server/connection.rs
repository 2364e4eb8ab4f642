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
use super::worker::{Registration, Settings, Worker};
use crate::forward::{self, End, Sockmap};
use crate::linux;
use crate::listener::{self, ClientAddr, OrigDst};
use crate::upstream;

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

    let connect_started = Instant::now();
    let upstream = match connect(
        &registration,
        peer,
        destination.addr,
        &settings,
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
/// aborts a connect that takes longer). EADDRNOTAVAIL, no free source port
/// for this destination (every one is held, or in a TIME_WAIT less than a
/// second old under a connection rate beyond the port range per second),
/// is a search of the range (see `upstream::start`), then tried again every
/// 20 ms until the timeout: a burst is slowed down, not failed.
async fn connect(
    registration: &Registration,
    client: ClientAddr,
    destination: SocketAddr,
    settings: &Settings,
    started: Instant,
) -> Result<TcpStream, (ConnectFailure, io::Error)> {
    let mut search = false;
    loop {
        let pending = upstream::start(
            destination,
            client.0.ip(),
            settings.upstream_source,
            settings.mark,
            search,
        );
        let attempt = match pending {
            Ok(pending) => {
                registration.connecting(&pending, started);
                pending.finish(destination).await
            }
            Err(error) => Err(error),
        };
        let error = match attempt {
            Ok(upstream) => return Ok(upstream),
            Err(error) => error,
        };
        if registration.timed_out() {
            return Err((ConnectFailure::Timeout, error));
        }
        // The socket is closed: the sweep must not abort its descriptor.
        registration.waiting();
        let no_port = error.raw_os_error() == Some(libc::EADDRNOTAVAIL);
        if !no_port || started.elapsed() + PORT_RETRY >= settings.connect_timeout {
            return Err((ConnectFailure::of(&error), error));
        }
        // The first miss searches the range at once; a search that found
        // nothing waits a little for TIME_WAITs to come of age.
        if search {
            tokio::time::sleep(PORT_RETRY).await;
        }
        search = true;
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
