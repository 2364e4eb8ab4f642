//! The admin side of `sluice run`: Prometheus metrics, readiness and the
//! admin endpoints (config dump, drain, log level), served on a thread of
//! its own with a plain (epoll) tokio runtime, off the data path.
//!
//! The workers never wait on it and share nothing contended with it: a
//! scrape sums the per-worker counters ([`crate::server::stats`]), each
//! written by its worker alone; readiness reads the phase the control
//! thread sets and a check of the installed interception that a helper
//! thread refreshes every [`CHECK_EVERY`] (reading the rules runs
//! `iptables-save`, too costly for every probe), and only while someone
//! asks: for [`WANTED_FOR`] after a probe or a config dump. Unasked, it
//! costs nothing (two `iptables-save` a second would be 1-2% of a core);
//! the first answer after a long silence may be as old as that silence,
//! and the next is fresh.
//!
//! | port (default) | endpoint |
//! | --- | --- |
//! | 0.0.0.0:15020 | `GET /metrics` |
//! | 0.0.0.0:15021 | `GET /healthz/ready` |
//! | 127.0.0.1:15000 | `GET /config_dump`, `POST /quitquitquit`, `POST /logging?level=...` |

mod dump;
mod http;
mod metrics;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{Forwarder, Mode};
use crate::intercept::{ebpf, Plan};
use crate::server::stats::WorkerStats;
use crate::server::Phase;

pub use dump::{effective_config, kernel_facts};

/// How often the installed interception is compared with the flags.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long after a question the comparison goes on (a kubelet probes every
/// 10 s by default).
pub const WANTED_FOR: Duration = Duration::from_secs(30);

/// Changes the log filter at run time (`POST /logging?level=...`): given a
/// level or a RUST_LOG-style filter, it says what is in force now, or why
/// the filter was refused. The binary owns the subscriber, so it provides
/// this.
pub type LogControl = Arc<dyn Fn(&str) -> Result<String, String> + Send + Sync>;

/// Where each endpoint is served (`None`: off).
#[derive(Clone, Default)]
pub struct AdminOptions {
    pub metrics: Option<SocketAddr>,
    pub readiness: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub log: Option<LogControl>,
}

impl std::fmt::Debug for AdminOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminOptions")
            .field("metrics", &self.metrics)
            .field("readiness", &self.readiness)
            .field("admin", &self.admin)
            .field("log", &self.log.is_some())
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot serve {what} on {addr}{hint}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        hint: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the admin thread")]
    Thread(#[source] io::Error),
}

/// The admin listeners, bound before sluice changes anything, so a port in
/// use fails start-up with nothing installed.
#[derive(Debug)]
pub struct Listeners {
    metrics: Option<std::net::TcpListener>,
    readiness: Option<std::net::TcpListener>,
    admin: Option<std::net::TcpListener>,
}

impl Listeners {
    pub fn bind(options: &AdminOptions) -> Result<Listeners, Error> {
        let bind = |what: &'static str, flag: &'static str, addr: Option<SocketAddr>| {
            addr.map(|addr| {
                std::net::TcpListener::bind(addr)
                    .and_then(|listener| {
                        listener.set_nonblocking(true)?;
                        Ok(listener)
                    })
                    .map_err(|source| Error::Bind {
                        what,
                        addr,
                        hint: if source.kind() == io::ErrorKind::AddrInUse {
                            flag
                        } else {
                            ""
                        },
                        source,
                    })
            })
            .transpose()
        };
        Ok(Listeners {
            metrics: bind(
                "metrics",
                ": the port is in use (another sidecar?); choose another with --metrics-addr, or off",
                options.metrics,
            )?,
            readiness: bind(
                "readiness",
                ": the port is in use; choose another with --readiness-addr, or off",
                options.readiness,
            )?,
            admin: bind(
                "the admin endpoints",
                ": the port is in use; choose another with --admin-addr, or off",
                options.admin,
            )?,
        })
    }
}

/// What the installed interception must be for sluice to be ready.
#[derive(Debug, Clone)]
pub enum Expected {
    /// tproxy, redirect: these rules and routes (`sluice rules show`).
    Rules(Plan),
    /// ebpf: sluice's own sk_lookup program, attached, with this policy in
    /// its maps. Weak: the run owns the program, and detaches it on the way
    /// out whatever the admin side is doing.
    Ebpf {
        wanted: ebpf::EbpfPolicy,
        interceptor: Weak<ebpf::Interceptor>,
    },
}

/// The last comparison of what is installed with [`Expected`].
#[derive(Debug, Clone)]
pub struct Interception {
    pub matches: bool,
    /// What is installed, as `sluice rules show` prints it, or why it could
    /// not be read.
    pub installed: String,
    pub checked: Instant,
}

impl Expected {
    fn check(&self) -> Interception {
        let (matches, installed) = match self {
            Expected::Rules(plan) => match plan.show() {
                Ok(status) => (status.matches(), status.to_string()),
                Err(error) => (false, format!("cannot read the rules: {}", chain(&error))),
            },
            Expected::Ebpf {
                wanted,
                interceptor,
            } => match interceptor.upgrade() {
                None => (
                    false,
                    "the sk_lookup program is detached: sluice is stopping".into(),
                ),
                Some(interceptor) => match interceptor.installed() {
                    Ok(Some(program)) => {
                        (program.policy.as_ref() == Some(wanted), program.to_string())
                    }
                    Ok(None) => (
                        false,
                        format!(
                            "sluice's link {} is no longer attached to this network namespace",
                            interceptor.link_id()
                        ),
                    ),
                    Err(error) => (
                        false,
                        format!("cannot read the sk_lookup program back: {}", chain(&error)),
                    ),
                },
            },
        };
        Interception {
            matches,
            installed,
            checked: Instant::now(),
        }
    }
}

/// What the run shows the admin side; the admin side only reads it.
pub struct Shared {
    pub stats: Vec<Arc<WorkerStats>>,
    pub phase: watch::Receiver<Phase>,
    /// Set by the control thread once every worker's runtime is up.
    pub workers_running: AtomicBool,
    pub mode: Mode,
    /// In use: copy after a sockmap fallback.
    pub forwarder: Forwarder,
    /// The effective configuration ([`effective_config`]).
    pub config: serde_json::Value,
    pub expected: Expected,
    pub log: Option<LogControl>,
    interception: Mutex<Option<Interception>>,
    /// Until when the checker goes on comparing.
    wanted_until: Mutex<Instant>,
    checker: std::sync::OnceLock<std::thread::Thread>,
}

impl Shared {
    pub fn new(
        stats: Vec<Arc<WorkerStats>>,
        phase: watch::Receiver<Phase>,
        mode: Mode,
        forwarder: Forwarder,
        config: serde_json::Value,
        expected: Expected,
        log: Option<LogControl>,
    ) -> Shared {
        Shared {
            stats,
            phase,
            workers_running: AtomicBool::new(false),
            mode,
            forwarder,
            config,
            expected,
            log,
            interception: Mutex::new(None),
            wanted_until: Mutex::new(Instant::now()),
            checker: std::sync::OnceLock::new(),
        }
    }

    /// Someone asks: the checker goes on for [`WANTED_FOR`].
    fn want(&self) {
        *self
            .wanted_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now() + WANTED_FOR;
        if let Some(checker) = self.checker.get() {
            checker.unpark();
        }
    }

    fn wanted(&self) -> bool {
        Instant::now()
            < *self
                .wanted_until
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
    }

    pub fn draining(&self) -> bool {
        *self.phase.borrow() != Phase::Serving
    }

    pub fn interception(&self) -> Option<Interception> {
        self.want();
        self.interception
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// `Ok` when sluice should receive traffic; else why not, in one short
    /// sentence: the readiness port is open to the network, so what is
    /// installed is shown on the admin address only.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if crate::server::worker_panicked() {
            return Err("a worker panicked; sluice is stopping");
        }
        if !self.workers_running.load(Ordering::SeqCst) {
            return Err("the workers are starting");
        }
        if self.draining() {
            return Err("sluice is draining (stopping)");
        }
        match self.interception() {
            None => Err("the interception has not been checked yet"),
            Some(i) if !i.matches => Err(
                "the interception installed does not match the flags (not installed yet, or changed since); \
                 GET /config_dump on the admin address shows it",
            ),
            Some(_) => Ok(()),
        }
    }
}

/// Starts the admin thread (and its checker), serving on `listeners`.
pub fn start(listeners: Listeners, shared: Arc<Shared>) -> Result<(), Error> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(Error::Thread)?;
    let needs_check = listeners.readiness.is_some() || listeners.admin.is_some();
    if needs_check {
        let shared_for_checker = shared.clone();
        let shared = shared.clone();
        // A plain thread: reading the rules runs iptables-save and opens a
        // netlink runtime of its own, which must not block (or nest in) the
        // admin runtime.
        let checker = std::thread::Builder::new()
            .name("sluice-check".into())
            .spawn(move || loop {
                let checked = shared.expected.check();
                let was = shared
                    .interception
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .replace(checked.clone());
                if was.is_some_and(|was| was.matches && !checked.matches) {
                    warn!(installed = %checked.installed, "the interception no longer matches the flags: sluice is not ready");
                }
                std::thread::sleep(CHECK_EVERY);
                while !shared.wanted() {
                    std::thread::park_timeout(WANTED_FOR);
                }
            })
            .map_err(Error::Thread)?;
        let _ = shared_for_checker.checker.set(checker.thread().clone());
    }
    std::thread::Builder::new()
        .name("sluice-admin".into())
        .spawn(move || {
            runtime.block_on(async move {
                let registry = Arc::new(metrics::registry(shared.clone()));
                let mut tasks = Vec::new();
                for (listener, endpoints) in [
                    (listeners.metrics, http::Endpoints::Metrics),
                    (listeners.readiness, http::Endpoints::Readiness),
                    (listeners.admin, http::Endpoints::Admin),
                ] {
                    let Some(listener) = listener else { continue };
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => {
                            if let Ok(addr) = listener.local_addr() {
                                info!(%addr, endpoints = ?endpoints, "admin endpoints listening");
                            }
                            let server = http::Server {
                                endpoints,
                                shared: shared.clone(),
                                registry: registry.clone(),
                            };
                            tasks.push(tokio::spawn(server.serve(listener)));
                        }
                        Err(error) => warn!(%error, ?endpoints, "cannot serve"),
                    }
                }
                futures::future::join_all(tasks).await;
            });
        })
        .map_err(Error::Thread)?;
    Ok(())
}

/// An error with its sources, on one line.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text += ": ";
        text += &cause.to_string();
        source = cause.source();
    }
    text
}
