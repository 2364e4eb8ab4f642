//! One intercepted connection, from accept to close: where it was going,
//! whether sluice may take it there, the connection to the workload (within
//! the connect timeout), and the forwarding.

use std::rc::Rc;
use std::sync::atomic::Ordering;

use tokio_uring::net::TcpStream;
use tracing::debug;

use super::stats::{self, ConnectFailure, Refused};
use super::worker::Worker;
use crate::forward::{self, End};
use crate::linux;
use crate::listener::{self, ClientAddr, OrigDst};
use crate::upstream;

pub async fn serve(worker: Rc<Worker>, client: TcpStream, peer: ClientAddr) {
    let Some(registration) = worker.track(&client) else {
        return worker.refuse(&client, peer, None, Refused::Draining);
    };
    let settings = worker.settings.clone();
    let _ = linux::set_nodelay(&client);
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

    let mut connect_started = None;
    let upstream = match upstream::socket(destination.addr) {
        Ok(socket) => {
            connect_started = Some(registration.connecting(&socket));
            upstream::connect(socket, destination.addr).await
        }
        Err(error) => Err(error),
    };
    let upstream = match upstream {
        Ok(upstream) => upstream,
        Err(error) => {
            let failure = if registration.timed_out() {
                ConnectFailure::Timeout
            } else {
                ConnectFailure::of(&error)
            };
            worker.stats.connect_failures[failure as usize].fetch_add(1, Ordering::Relaxed);
            debug!(client = %peer, %destination, %error, reason = failure.label(), "workload unreachable; connection reset");
            let _ = linux::reset_on_close(&client);
            return;
        }
    };
    let opened = registration.forwarding(&upstream);
    let stats = &worker.stats;
    stats::add(&stats.opened, 1);
    if let Some(started) = connect_started {
        stats.connect_duration.observe(opened - started);
    }

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
    if forwarded.fell_back {
        stats::add(&stats.forwarder_fallbacks, 1);
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

/// sluice only forwards to the namespace's own addresses: anything else
/// would make it an open relay.
fn check_destination(destination: OrigDst, proxy_port: u16) -> Result<(), Refused> {
    if destination.addr.port() == proxy_port {
        return Err(Refused::OwnPort);
    }
    match linux::is_local_address(destination.addr.ip()) {
        Ok(true) => Ok(()),
        // An error (out of descriptors, say) refuses too: never relay on doubt.
        Ok(false) | Err(_) => Err(Refused::NotLocal),
    }
}
