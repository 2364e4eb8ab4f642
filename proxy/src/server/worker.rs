//! One data-path thread: its io_uring runtime, its accept loops, the
//! connections it forwards, and the phase the control thread has set
//! (serving, draining, aborting).
//!
//! Everything a worker owns is its own: the connection table is a plain
//! `RefCell` on its thread, and its counters are written by it alone (the
//! control thread only reads them), so no cache line bounces between cores
//! per connection.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::{Rc, Weak};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use slab::Slab;
use tokio::sync::watch;
use tokio_uring::net::{TcpListener, TcpStream};
use tracing::warn;

use super::connection;
use crate::config::Mode;
use crate::forward::Forwarding;
use crate::lifecycle::Phase;
use crate::linux;
use crate::listener::ClientAddr;
use crate::stats::{self, Refused, WorkerStats};

/// What every worker is told at start; never changes.
#[derive(Debug, Clone)]
pub struct Settings {
    pub mode: Mode,
    pub proxy_port: u16,
    pub forwarding: Forwarding,
    pub connect_timeout: Duration,
    /// The policy's mark, which sluice's upstream sockets carry.
    pub mark: u32,
    pub upstream_source: crate::upstream::Source,
    /// `None`: connections may stay idle for ever.
    pub idle_timeout: Option<Duration>,
    /// This worker's share of `--max-connections`.
    pub max_connections: usize,
    /// Test hook (see [`PANIC_AFTER_ENV`]).
    pub panic_after: Option<u64>,
}

/// Names a number of accepted connections after which a worker panics. The
/// way the fault suite proves that a panicking worker takes the process down:
/// nothing else can reach that path, and a failpoint crate would put a
/// shared lock on every connection.
pub const PANIC_AFTER_ENV: &str = "SLUICE_TEST_WORKER_PANIC_AFTER";

/// [`PANIC_AFTER_ENV`]'s number, read only by debug builds (the ones `cargo
/// test` makes): a release build must not let its environment make a
/// worker panic.
pub fn panic_after_from_env() -> Option<u64> {
    if cfg!(debug_assertions) {
        std::env::var(PANIC_AFTER_ENV).ok()?.parse().ok()
    } else {
        None
    }
}

/// Accept errors (EMFILE, ENFILE, ENOBUFS, ENOMEM, ...) are retried after a
/// pause that doubles up to this.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
const MIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(5);

/// The longest pause between two sweeps of the connection table (connect
/// timeouts are enforced within it).
const MAX_SWEEP: Duration = Duration::from_secs(1);

/// How long a worker sends a destination whose workload refused the inner
/// address (it listens on the pod's address only) from the bypass source
/// without trying the inner address again: a workload that comes back
/// listening on every address gets the client's address again after that.
pub const INNER_REFUSED_FOR: Duration = Duration::from_secs(30);

thread_local! {
    /// The worker of this thread, for the panic hook.
    static CURRENT: RefCell<Weak<Worker>> = const { RefCell::new(Weak::new()) };
}

/// Resets every connection of the calling thread's worker, if it is one.
/// Called by the panic hook: the unwinding that follows would close them
/// with a FIN, ending streams that did not end.
pub fn abort_current_worker() {
    let _ = CURRENT.try_with(|current| {
        if let Some(worker) = current.try_borrow().ok().and_then(|w| w.upgrade()) {
            worker.abort_all();
        }
    });
}

pub struct Worker {
    pub settings: Arc<Settings>,
    pub stats: Arc<WorkerStats>,
    phase: Cell<Phase>,
    connections: RefCell<Slab<Tracked>>,
    accept_errors: RateLimited,
    refusals: RateLimited,
    /// Destinations whose workload refused the inner address, and since when.
    inner_refused: RefCell<HashMap<SocketAddr, Instant>>,
}

/// A connection in the worker's table.
struct Tracked {
    client: RawFd,
    stage: Stage,
}

enum Stage {
    Accepted,
    Connecting {
        upstream: RawFd,
        since: Instant,
        timed_out: bool,
    },
    Forwarding {
        upstream: RawFd,
        /// Bytes both sockets had received and had acknowledged at the last
        /// look, and when that figure last changed or bytes were pending.
        moved: u64,
        changed: Instant,
    },
}

impl Worker {
    pub fn new(settings: Arc<Settings>, stats: Arc<WorkerStats>) -> Worker {
        Worker {
            settings,
            stats,
            phase: Cell::new(Phase::Serving),
            connections: RefCell::new(Slab::new()),
            accept_errors: RateLimited::default(),
            refusals: RateLimited::default(),
            inner_refused: RefCell::new(HashMap::new()),
        }
    }

    /// Runs the accept loops until the process ends; reports on `started`
    /// whether the io_uring runtime came up, so a kernel that refuses
    /// io_uring fails `sluice run` instead of leaving it alive with no worker.
    pub fn run(
        self,
        listeners: Vec<std::net::TcpListener>,
        phase: watch::Receiver<Phase>,
        started: mpsc::Sender<Result<(), super::Error>>,
    ) {
        // One thread submits to each ring, and nothing needs its completions
        // the instant they come: no interrupt to other cores per completion.
        let mut ring = tokio_uring::uring_builder();
        ring.setup_single_issuer().setup_coop_taskrun();
        let runtime = match tokio_uring::Runtime::new(
            tokio_uring::builder().entries(1024).uring_builder(&ring),
        ) {
            Ok(runtime) => runtime,
            Err(error) => {
                let _ = started.send(Err(super::Error::IoUring(error)));
                return;
            }
        };
        let worker = Rc::new(self);
        CURRENT.with(|current| *current.borrow_mut() = Rc::downgrade(&worker));
        runtime.block_on(async move {
            if let Err(error) = worker.settings.forwarding.start_worker() {
                let _ = started.send(Err(super::Error::ForwarderWorker(error)));
                return;
            }
            let mut tasks = Vec::new();
            for listener in listeners {
                let listener = TcpListener::from_std(listener);
                tasks.push(tokio_uring::spawn(worker.clone().accept_loop(listener)));
            }
            tasks.push(tokio_uring::spawn(worker.clone().follow(phase)));
            tasks.push(tokio_uring::spawn(worker.clone().sweep()));
            let _ = started.send(Ok(()));
            futures::future::join_all(tasks).await;
        });
    }

    async fn accept_loop(self: Rc<Self>, listener: TcpListener) {
        let mut backoff = MIN_ACCEPT_BACKOFF;
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    backoff = MIN_ACCEPT_BACKOFF;
                    self.accepted(stream, ClientAddr(peer));
                }
                Err(error) => {
                    // Out of descriptors or memory: the connection waits in
                    // the backlog; an accept loop that exits would take
                    // interception down with it.
                    self.accept_errors.warn(|suppressed| {
                        warn!(%error, suppressed, "accept failed; retrying (logged at most once a second)")
                    });
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                }
            }
        }
    }

    fn accepted(self: &Rc<Self>, stream: TcpStream, peer: ClientAddr) {
        stats::add(&self.stats.accepted, 1);
        // Only this worker writes its counter.
        let count = self.stats.accepted.load(Ordering::Relaxed);
        if self.settings.panic_after == Some(count) {
            panic!("{PANIC_AFTER_ENV}={count}: a worker panics, as the test asked");
        }
        if self.phase.get() != Phase::Serving {
            return self.refuse(&stream, peer, None, Refused::Draining);
        }
        if self.connections.borrow().len() >= self.settings.max_connections {
            return self.refuse(&stream, peer, None, Refused::ConnectionLimit);
        }
        // In the table from the accept on, not from the task's first poll:
        // a drain that counted the table in between would miss it.
        let Some(registration) = self.track(&stream) else {
            return self.refuse(&stream, peer, None, Refused::Draining);
        };
        tokio_uring::spawn(connection::serve(self.clone(), stream, peer, registration));
    }

    /// Resets `client` (its close sends RST), counts the refusal under
    /// `reason` and says so in the log, at most once a second: a remote
    /// client must not be able to flood the log.
    pub fn refuse(
        &self,
        client: &impl AsRawFd,
        peer: ClientAddr,
        destination: Option<SocketAddr>,
        reason: Refused,
    ) {
        stats::add(&self.stats.refused[reason as usize], 1);
        let _ = linux::reset_on_close(client);
        self.refusals.warn(|suppressed| match destination {
            Some(destination) => {
                warn!(client = %peer, %destination, suppressed, "refused: {reason}")
            }
            None => warn!(client = %peer, suppressed, "refused: {reason}"),
        });
    }

    /// Whether connections to `destination` go from the bypass source
    /// because its workload refused the inner address lately.
    pub fn inner_refused(&self, destination: SocketAddr) -> bool {
        let mut refused = self.inner_refused.borrow_mut();
        match refused.get(&destination) {
            Some(since) if since.elapsed() < INNER_REFUSED_FOR => true,
            Some(_) => {
                refused.remove(&destination);
                false
            }
            None => false,
        }
    }

    /// Remembers that `destination`'s workload refused the inner address
    /// and was reached at the pod's address; `GET /config_dump` lists it.
    pub fn remember_inner_refused(&self, destination: SocketAddr) {
        self.inner_refused
            .borrow_mut()
            .insert(destination, Instant::now());
        if let Ok(mut listed) = self.stats.fallback_destinations.lock() {
            listed.insert(destination);
        }
    }

    /// Enters `client` in the table; `None` when the worker is aborting (a
    /// connection accepted just before must not slip through).
    pub fn track(self: &Rc<Self>, client: &impl AsRawFd) -> Option<Registration> {
        if self.phase.get() == Phase::Aborting {
            return None;
        }
        let key = self.connections.borrow_mut().insert(Tracked {
            client: client.as_raw_fd(),
            stage: Stage::Accepted,
        });
        self.publish_active();
        Some(Registration {
            worker: self.clone(),
            key,
        })
    }

    fn publish_active(&self) {
        let active = self.connections.borrow().len() as u64;
        self.stats.active.store(active, Ordering::Relaxed);
    }

    /// Follows the control thread's phase.
    async fn follow(self: Rc<Self>, mut phase: watch::Receiver<Phase>) {
        while phase.changed().await.is_ok() {
            let now = *phase.borrow_and_update();
            self.phase.set(now);
            if now == Phase::Aborting {
                self.abort_all();
            }
        }
    }

    /// Resets every connection in the table on both sides. The forwarders
    /// see the error and end; their tasks then leave the table.
    pub fn abort_all(&self) {
        let Ok(connections) = self.connections.try_borrow() else {
            return;
        };
        for (_, tracked) in connections.iter() {
            let _ = linux::abort(&tracked.client);
            match tracked.stage {
                Stage::Accepted => {}
                Stage::Connecting { upstream, .. } | Stage::Forwarding { upstream, .. } => {
                    let _ = linux::abort(&upstream);
                }
            }
        }
    }

    /// Enforces the connect timeout and the idle timeout, from the table:
    /// one timer per worker rather than one per connection.
    async fn sweep(self: Rc<Self>) {
        let connect = self.settings.connect_timeout;
        let idle = self.settings.idle_timeout;
        let tick = (connect / 10).min(MAX_SWEEP).max(Duration::from_millis(10));
        // An idle check reads TCP_INFO of both sockets; an eighth of the
        // timeout keeps the error under 13% at a small cost.
        let idle_every = idle.map(|idle| (idle / 8).max(tick));
        let mut idle_checked = Instant::now();
        loop {
            tokio::time::sleep(tick).await;
            let now = Instant::now();
            let check_idle = idle_every.is_some_and(|every| now - idle_checked >= every);
            if check_idle {
                idle_checked = now;
            }
            let mut connections = self.connections.borrow_mut();
            for (_, tracked) in connections.iter_mut() {
                match &mut tracked.stage {
                    Stage::Connecting {
                        upstream,
                        since,
                        timed_out,
                    } if !*timed_out && now - *since >= connect => {
                        // Wakes the pending connect with an error; the
                        // connection's task resets the client.
                        *timed_out = true;
                        let _ = linux::abort(upstream);
                    }
                    Stage::Forwarding {
                        upstream,
                        moved,
                        changed,
                    } if check_idle => {
                        let look = Traffic::of(tracked.client).and(Traffic::of(*upstream));
                        if look.moved != *moved || look.pending {
                            *moved = look.moved;
                            *changed = now;
                        } else if idle.is_some_and(|idle| now - *changed >= idle) {
                            stats::add(&self.stats.idle_timeouts, 1);
                            let _ = linux::abort(&tracked.client);
                            let _ = linux::abort(upstream);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

/// What the idle sweep sees of a connection's sockets, from TCP_INFO:
/// whatever the forwarder, even one that moves bytes inside the kernel.
///
/// Idle is no byte moved either way and nothing pending. Received bytes
/// alone are not enough: a reader that is slow but moving drains the
/// workload's or the client's receive buffer, which shows up only as
/// bytes acknowledged to sluice, or as bytes waiting in sluice's send
/// queue while the reader's window is shut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Traffic {
    /// Bytes received plus bytes the peer acknowledged.
    moved: u64,
    /// Bytes written but not yet sent or not yet acknowledged.
    pending: bool,
}

impl Traffic {
    fn of(socket: RawFd) -> Traffic {
        match linux::tcp_counters(&socket) {
            Ok(c) => Traffic {
                moved: c.bytes_received.wrapping_add(c.bytes_acked),
                pending: c.notsent_bytes > 0 || c.unacked_segments > 0,
            },
            // A socket the kernel cannot describe moves nothing; the
            // forwarder sees its error on its own.
            Err(_) => Traffic {
                moved: 0,
                pending: false,
            },
        }
    }

    fn and(self, other: Traffic) -> Traffic {
        Traffic {
            moved: self.moved.wrapping_add(other.moved),
            pending: self.pending || other.pending,
        }
    }
}

/// A connection's place in its worker's table; leaving it (drop) takes the
/// connection out. Dropped before the connection's sockets, so the table
/// never names a closed descriptor.
pub struct Registration {
    worker: Rc<Worker>,
    key: usize,
}

impl Registration {
    /// A connect to the workload, begun `since` (its first attempt), is
    /// under way on `upstream`.
    pub fn connecting(&self, upstream: &impl AsRawFd, since: Instant) {
        self.set(Stage::Connecting {
            upstream: upstream.as_raw_fd(),
            since,
            timed_out: false,
        });
    }

    /// Between two connect attempts: no upstream socket.
    pub fn waiting(&self) {
        self.set(Stage::Accepted);
    }

    /// Returns when forwarding started (the metrics reuse it).
    pub fn forwarding(&self, upstream: &impl AsRawFd) -> Instant {
        let now = Instant::now();
        self.set(Stage::Forwarding {
            upstream: upstream.as_raw_fd(),
            moved: 0,
            changed: now,
        });
        now
    }

    /// Whether the sweep ended the upstream connect for taking too long.
    pub fn timed_out(&self) -> bool {
        let connections = self.worker.connections.borrow();
        matches!(
            connections.get(self.key).map(|t| &t.stage),
            Some(Stage::Connecting {
                timed_out: true,
                ..
            })
        )
    }

    fn set(&self, stage: Stage) {
        if let Some(tracked) = self.worker.connections.borrow_mut().get_mut(self.key) {
            tracked.stage = stage;
        }
        // An abort that came while the connection was between stages must
        // still reach the new socket.
        if self.worker.phase.get() == Phase::Aborting {
            self.worker.abort_all();
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.worker.connections.borrow_mut().try_remove(self.key);
        self.worker.publish_active();
    }
}

/// A warning said at most once a second, with how many were held back.
#[derive(Default)]
struct RateLimited {
    last: Cell<Option<Instant>>,
    suppressed: Cell<u64>,
}

impl RateLimited {
    fn warn(&self, log: impl FnOnce(u64)) {
        let now = Instant::now();
        if self
            .last
            .get()
            .is_some_and(|last| now - last < Duration::from_secs(1))
        {
            self.suppressed.set(self.suppressed.get() + 1);
            return;
        }
        self.last.set(Some(now));
        log(self.suppressed.replace(0));
    }
}
