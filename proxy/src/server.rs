//! `sluice run`: worker threads, each with its own io_uring runtime,
//! accepting intercepted connections and forwarding them to the workload.
//!
//! Control stays on the main thread (rules, signals); the workers share
//! nothing mutable but the listening sockets and a few atomic counters.

use std::io;
use std::os::fd::AsFd;
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};
use tokio_uring::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use crate::config::{Forwarder, Mode, Policy};
use crate::forward::{self, End};
use crate::intercept::{self, ebpf, Plan};
use crate::linux;
use crate::listener::{self, ClientAddr, Listeners, OrigDst};
use crate::routing::{self, BypassSource};
use crate::upstream;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Listen(#[from] listener::Error),
    #[error("installing the interception rules")]
    Intercept(#[from] intercept::Error),
    #[error("attaching the eBPF program")]
    Ebpf(#[source] ebpf::Error),
    #[error("the IPv6 bypass source")]
    Bypass(#[from] routing::Error),
    #[error("cannot start a worker thread")]
    Worker(#[source] io::Error),
    #[error("cannot start an io_uring runtime: is io_uring disabled (sysctl kernel.io_uring_disabled) or the kernel older than 5.11?")]
    IoUring(#[source] io::Error),
    #[error("cannot wait for SIGINT/SIGTERM")]
    Signals(#[source] nix::Error),
}

/// Counters shared by every worker.
#[derive(Debug, Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    pub forwarded: AtomicU64,
    pub refused: AtomicU64,
    pub upstream_failed: AtomicU64,
}

pub struct RunOptions {
    pub policy: Policy,
    /// ebpf mode: where to pin the program so it outlives sluice.
    pub pin: Option<std::path::PathBuf>,
    pub forwarder: Forwarder,
    pub install_rules: bool,
    pub workers: usize,
}

/// Runs until SIGINT or SIGTERM. Rules installed here are removed on the way
/// out, also when start-up fails half-way.
pub fn run(options: RunOptions) -> Result<(), Error> {
    // Blocked before any thread starts, so every thread inherits the mask and
    // only the main thread's sigwait sees the signals.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block().map_err(Error::Signals)?;

    let policy = options.policy;
    let listeners = Listeners::bind(policy.mode, policy.proxy_port)?;
    let _rules = if options.install_rules && policy.mode != Mode::Ebpf {
        Some(InstalledRules::install(Plan::new(&policy))?)
    } else {
        None
    };
    // Declared after the listeners, so dropped before them: no window where
    // the program steers SYNs to closed sockets.
    let _program = match policy.mode {
        Mode::Ebpf => Some(AttachedProgram::attach(
            &policy,
            &listeners,
            options.pin.as_deref(),
        )?),
        _ => None,
    };

    // Once for all workers: the sockmap forwarder's program and maps.
    let forwarding = forward::Forwarding::new(options.forwarder);
    let stats = Arc::new(Stats::default());
    let (started_tx, started_rx) = mpsc::channel();
    for index in 0..options.workers {
        let v4 = listeners.v4.try_clone().map_err(Error::Worker)?;
        let v6 = listeners.v6.try_clone().map_err(Error::Worker)?;
        let worker = Worker {
            mode: policy.mode,
            forwarding: forwarding.clone(),
            proxy_port: policy.proxy_port,
            stats: stats.clone(),
        };
        let started = started_tx.clone();
        std::thread::Builder::new()
            .name(format!("sluice-worker-{index}"))
            .spawn(move || worker.run(v4, v6, started))
            .map_err(Error::Worker)?;
    }
    for _ in 0..options.workers {
        match started_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(Error::IoUring(error)),
            Err(_) => {
                return Err(Error::Worker(io::Error::other(
                    "a worker thread died at start",
                )))
            }
        }
    }
    info!(
        mode = %policy.mode,
        forward = ?forwarding.forwarder(),
        port = policy.proxy_port,
        workers = options.workers,
        rules = options.install_rules,
        "sluice ready"
    );
    let signal = signals.wait().map_err(Error::Signals)?;
    info!(%signal, accepted = stats.accepted.load(Ordering::Relaxed), "sluice stopping");
    Ok(())
}

/// The sk_lookup program of `--mode ebpf`, attached for sluice's lifetime
/// (unless pinned), with the IPv6 bypass source it needs.
struct AttachedProgram {
    _interceptor: ebpf::Interceptor,
    added_bypass: bool,
}

impl AttachedProgram {
    fn attach(
        policy: &Policy,
        listeners: &Listeners,
        pin: Option<&Path>,
    ) -> Result<AttachedProgram, Error> {
        let added_bypass = !BypassSource::present()?;
        BypassSource::install()?;
        let wanted = ebpf::EbpfPolicy::from_policy(policy);
        let (v4, v6) = (listeners.v4.as_fd(), listeners.v6.as_fd());
        let attached = match pin {
            Some(dir) => ebpf::Interceptor::attach_pinned(&wanted, v4, v6, dir),
            None => ebpf::Interceptor::attach(&wanted, v4, v6),
        };
        match attached {
            Ok(interceptor) => {
                info!(link = interceptor.link_id(), pinned = ?pin, "sk_lookup program attached");
                Ok(AttachedProgram {
                    _interceptor: interceptor,
                    added_bypass: added_bypass && pin.is_none(),
                })
            }
            Err(error) => {
                if added_bypass {
                    let _ = BypassSource::remove();
                }
                Err(Error::Ebpf(error))
            }
        }
    }
}

impl Drop for AttachedProgram {
    fn drop(&mut self) {
        if self.added_bypass {
            if let Err(error) = BypassSource::remove() {
                warn!(%error, "could not remove ::6 from lo");
            }
        }
    }
}

/// Rules installed by `run --install-rules`, removed when dropped.
struct InstalledRules(Plan);

impl InstalledRules {
    fn install(plan: Plan) -> Result<InstalledRules, intercept::Error> {
        plan.install()?;
        info!("interception rules installed");
        Ok(InstalledRules(plan))
    }
}

impl Drop for InstalledRules {
    fn drop(&mut self) {
        match self.0.remove() {
            Ok(()) => info!("interception rules removed"),
            Err(error) => {
                warn!(%error, "could not remove the interception rules; run `sluice rules remove`")
            }
        }
    }
}

#[derive(Clone)]
struct Worker {
    mode: Mode,
    forwarding: forward::Forwarding,
    proxy_port: u16,
    stats: Arc<Stats>,
}

impl Worker {
    /// Runs the worker's accept loops; reports on `started` whether its
    /// io_uring runtime came up, so a kernel that refuses io_uring fails
    /// `sluice run` instead of leaving it alive with no worker.
    fn run(
        self,
        v4: std::net::TcpListener,
        v6: std::net::TcpListener,
        started: mpsc::Sender<io::Result<()>>,
    ) {
        let runtime = match tokio_uring::Runtime::new(tokio_uring::builder().entries(1024)) {
            Ok(runtime) => runtime,
            Err(error) => {
                let _ = started.send(Err(error));
                return;
            }
        };
        let _ = started.send(Ok(()));
        let worker = Rc::new(self);
        runtime.block_on(async move {
            let v4 = tokio_uring::spawn(worker.clone().accept_loop(TcpListener::from_std(v4)));
            let v6 = tokio_uring::spawn(worker.accept_loop(TcpListener::from_std(v6)));
            let _ = futures::join!(v4, v6);
        });
    }

    async fn accept_loop(self: Rc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    self.stats.accepted.fetch_add(1, Ordering::Relaxed);
                    tokio_uring::spawn(self.clone().serve(stream, ClientAddr(peer)));
                }
                Err(error) => {
                    // EMFILE and friends pass; an accept loop that exits
                    // would take interception down with it.
                    warn!(%error, "accept failed; retrying shortly");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn serve(self: Rc<Self>, client: TcpStream, peer: ClientAddr) {
        let _ = linux::set_nodelay(&client);
        let destination = match listener::original_dst(self.mode, &client) {
            Ok(destination) => destination,
            Err(error) => {
                warn!(client = %peer, %error, "cannot recover the original destination; connection reset");
                return self.refuse(&client);
            }
        };
        if let Err(reason) = self.check_destination(destination) {
            warn!(client = %peer, destination = %destination, "refused: {reason}");
            return self.refuse(&client);
        }
        let upstream = match upstream::connect(destination.addr).await {
            Ok(upstream) => upstream,
            Err(error) => {
                self.stats.upstream_failed.fetch_add(1, Ordering::Relaxed);
                debug!(client = %peer, destination = %destination, %error, "workload unreachable; connection reset");
                let _ = linux::reset_on_close(&client);
                return;
            }
        };
        let forwarded = match forward::forward(&self.forwarding, &client, &upstream).await {
            Ok(forwarded) => forwarded,
            Err(error) => {
                warn!(client = %peer, %error, "forwarder could not start; connection reset");
                return;
            }
        };
        self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
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
        debug!(client = %peer, destination = %destination, up = forwarded.upstream.bytes, down = forwarded.downstream.bytes, "closed");
    }

    /// sluice only forwards to the namespace's own addresses: anything else
    /// would make it an open relay.
    fn check_destination(&self, destination: OrigDst) -> Result<(), String> {
        if destination.addr.port() == self.proxy_port {
            return Err(format!(
                "destination port {} is sluice's own port",
                self.proxy_port
            ));
        }
        match linux::is_local_address(destination.addr.ip()) {
            Ok(true) => Ok(()),
            Ok(false) => Err(
                "destination is not a local address of this namespace (sluice is no open relay)"
                    .into(),
            ),
            Err(error) => Err(format!(
                "cannot tell whether the destination is local: {error}"
            )),
        }
    }

    fn refuse(&self, client: &TcpStream) {
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        let _ = linux::reset_on_close(client);
    }
}

/// One worker per core unless told otherwise.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}
