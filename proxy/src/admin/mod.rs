//! The admin side of `sluice run`: Prometheus metrics, readiness and the
//! admin endpoints (config dump, drain, log level), served on a thread of
//! its own with a plain (epoll) tokio runtime, off the data path.
//!
//! The workers never wait on it and share nothing contended with it: a
//! scrape sums the per-worker counters ([`crate::stats`]), each
//! written by its worker alone; readiness reads the phase the control
//! thread sets and a check of the installed interception, which a helper
//! thread makes when asked. A probe (or config dump) that finds the last
//! check older than [`CHECK_EVERY`] asks for one and waits for it, up to
//! [`CHECK_WAIT`]; so the checker runs at most once per [`CHECK_EVERY`]
//! however many ask, and not at all while nobody does. A check runs
//! `iptables-save` once per family (tproxy, redirect; two processes at
//! most) or reads sluice's own sk_lookup program back through the
//! descriptors it holds (ebpf).
//!
//! Port 15021 (and 15020) are open to the network: a not-ready answer says
//! why in one short sentence, and what is installed is shown only on the
//! admin address (`GET /config_dump`). Each listener serves at most
//! [`CONNECTIONS_PER_LISTENER`] connections at once, one request each, for
//! a bounded time; the rest wait in its backlog, holding no descriptor of
//! sluice's, so a flood cannot take the data path's descriptors.
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
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{Forwarder, Mode};
use crate::intercept::{ebpf, Plan};
use crate::lifecycle::{self, Phase};
use crate::stats::WorkerStats;

pub use dump::kernel_facts;

/// How old a check of the installed interception may be for an answer,
/// and so the least time between two checks.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long an answer waits for a fresh check before it gives the last
/// one (a kubelet gives a probe 1 s by default).
pub const CHECK_WAIT: Duration = Duration::from_millis(500);
/// Connections each admin listener serves at once.
pub const CONNECTIONS_PER_LISTENER: usize = 16;
/// Descriptors the admin side's connections hold at most (three listeners).
pub const MAX_DESCRIPTORS: u64 = 3 * CONNECTIONS_PER_LISTENER as u64;

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
    /// When the check started.
    pub checked: Instant,
}

impl Expected {
    fn check(&self) -> Interception {
        let checked = Instant::now();
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
            checked,
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
    /// The effective configuration (`RunOptions::effective_config`).
    pub config: serde_json::Value,
    pub expected: Expected,
    pub log: Option<LogControl>,
    /// The last check, published by the checker.
    interception: watch::Sender<Option<Interception>>,
    /// When someone last asked for a check.
    asked: Mutex<Option<Instant>>,
    checker: OnceLock<std::thread::Thread>,
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
            interception: watch::Sender::new(None),
            asked: Mutex::new(None),
            checker: OnceLock::new(),
        }
    }

    /// The question the checker has not answered yet, if any: asked after
    /// the last check was [`CHECK_EVERY`] old.
    fn unanswered(&self, last: Option<Instant>) -> Option<Instant> {
        let asked = *self.asked.lock().unwrap_or_else(PoisonError::into_inner);
        asked.filter(|&asked| last.is_none_or(|last| asked >= last + CHECK_EVERY))
    }

    pub fn draining(&self) -> bool {
        *self.phase.borrow() != Phase::Serving
    }

    /// The installed interception as a check at most [`CHECK_EVERY`] old
    /// saw it; else, when the checker does not manage within
    /// [`CHECK_WAIT`], as the last check saw it.
    pub async fn interception(&self) -> Option<Interception> {
        let now = Instant::now();
        let fresh =
            |i: &Option<Interception>| i.as_ref().is_some_and(|i| i.checked + CHECK_EVERY > now);
        let mut latest = self.interception.subscribe();
        if !fresh(&latest.borrow()) {
            {
                let mut asked = self.asked.lock().unwrap_or_else(PoisonError::into_inner);
                *asked = Some(asked.map_or(now, |asked| asked.max(now)));
            }
            if let Some(checker) = self.checker.get() {
                checker.unpark();
                let _ = tokio::time::timeout(CHECK_WAIT, latest.wait_for(fresh)).await;
            }
        }
        let last = latest.borrow().clone();
        last
    }

    /// `Ok` when sluice should receive traffic; else why not, in one short
    /// sentence: the readiness port is open to the network, so what is
    /// installed is shown on the admin address only.
    pub async fn readiness(&self) -> Result<(), &'static str> {
        if lifecycle::worker_panicked() {
            return Err("a worker panicked; sluice is stopping");
        }
        if !self.workers_running.load(Ordering::SeqCst) {
            return Err("the workers are starting");
        }
        if self.draining() {
            return Err("sluice is draining (stopping)");
        }
        match self.interception().await {
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
            .spawn(move || {
                let mut last: Option<Instant> = None;
                loop {
                    // Parked until asked; an answer for a question asked
                    // while the last check ran is that check's.
                    if shared.unanswered(last).is_none() {
                        std::thread::park();
                        continue;
                    }
                    let checked = shared.expected.check();
                    last = Some(checked.checked);
                    let was = shared.interception.send_replace(Some(checked.clone()));
                    if was.is_some_and(|was| was.matches && !checked.matches) {
                        warn!(installed = %checked.installed, "the interception no longer matches the flags: sluice is not ready");
                    }
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
