//! The sockmap forwarder: the two sockets of a connection are joined inside
//! the kernel by an `sk_skb` stream-verdict program (`bpf/sockmap.bpf.c`),
//! which redirects every byte one socket receives to the other's send side.
//! User space only joins the sockets, watches them for FIN and errors, passes
//! those on, and cleans up.
//!
//! [`SockmapEngine`] loads the program and its maps once per process, with
//! a ring buffer for each worker (see "A slow peer"); every worker shares it
//! (map updates by descriptor are thread-safe). Everything is made there,
//! before `sluice run` drops CAP_BPF: using the objects afterwards, through
//! the descriptors sluice holds, needs no capability.
//!
//! ## Joining
//!
//! A connection comes here once it is older than `--sockmap-after`, after
//! copy forwarded its first bytes (`handover`), or at once with
//! `--sockmap-after 0`. The bytes copied before count as received and
//! forwarded in the FIN handshake below.
//!
//! Both sockets enter `sl_targets` (where redirects look their peer up) and
//! `sl_peers` (cookie → peer cookie, byte count) before either enters
//! `sl_socks`, the map the program is attached to: a socket's bytes are
//! redirected from the moment it is in `sl_socks`, and a redirect to a
//! socket not yet in `sl_targets` would be dropped. Bytes that arrived before
//! a socket entered `sl_socks` wait in its receive queue, and the kernel runs
//! the program only when the next segment arrives (a client that sent its
//! request and waits would wait forever): setting `SO_RCVLOWAT` makes TCP
//! call the data-ready callback, hence the program, at once.
//!
//! ## Half-close without losing bytes
//!
//! A redirected skb is not sent on the spot: it is queued on the peer's
//! psock (`ingress_skb`) and a workqueue moves it into the peer's send queue.
//! So when user space sees the FIN on socket A (POLLRDHUP), bytes of A may
//! still wait in that queue for peer B, and `shutdown(B, SHUT_WR)` then would
//! make the workqueue's send fail with EPIPE and drop them (the kernel then
//! sets EPIPE as B's error). The FIN is passed on only after a byte-count
//! handshake:
//!
//! 1. the program counts, per source socket, the bytes it redirected
//!    (`sl_peers[A].bytes`);
//! 2. on A's FIN, `TCP_INFO` on A, read under A's socket lock, waits out the
//!    processing of the FIN segment, which runs the program for everything
//!    before it: A's count is now final. As a check, with the bytes copied
//!    before the join, it must equal what A received (`tcpi_bytes_received`,
//!    which counts the FIN as one) minus one;
//! 3. B has taken a byte into its send queue when `write_seq` passed it;
//!    `tcpi_bytes_acked` then `SIOCOUTQ` (`write_seq - snd_una`), read in
//!    that order, give a lower bound of `write_seq` (an ACK arriving between
//!    the two reads only lowers the sum), and its value before joining is
//!    subtracted. Once B has taken A's count, every redirected byte is in
//!    TCP's hands, and the FIN queued behind them by `shutdown(SHUT_WR)`
//!    leaves after them.
//!
//! A reset or error on either socket resets both, as the other forwarders do.
//!
//! ## A slow peer
//!
//! The kernel puts no bound on the bytes a psock queues for a peer whose
//! send buffer is full: redirected skbs leave the source's receive queue at
//! once, so TCP keeps the client's window open while the workload reads
//! nothing (gigabytes in seconds, measured). So the program tells the
//! connection's worker, through that worker's ring buffer in `sl_events`,
//! each time a socket has redirected another 2 MiB. The direction then
//! compares what it redirected with what the peer took; above [`PAUSE_ABOVE`]
//! it takes its socket out of `sl_socks` (it stays a target for the other
//! direction). Its bytes then wait in its own receive queue, whose window
//! holds the client back, as with any other forwarder. Once the peer has
//! caught up to [`RESUME_AT`], the socket goes back in and `SO_RCVLOWAT`
//! runs the program over what waited, behind everything redirected before.
//! The peer also gets a larger send buffer, [`PEER_SEND_BUFFER`]: the kernel
//! refills a full one only once per clock tick, which alone held make
//! bench's single stream to less than half its rate.
//! A FIN that comes while paused is passed on after the rest is copied,
//! since the kernel joins only established sockets.
//!
//! ## No stream goes on past a hole
//!
//! Taking a socket out of `sl_socks` while a program run is under way cuts
//! that run short, and the kernel drops what it had not reached. `SO_RCVLOWAT`
//! keeps runs from starting first, but cannot close the window between the
//! two calls. So after every such delete, once the socket's lock has been
//! taken (a run under way has ended), the direction checks that every byte
//! the socket received was copied before the join, redirected, or still waits
//! in its receive queue ([`account`]); if not, both sockets are reset before
//! anything resumes the redirect or copies the rest, so the peer never gets
//! the bytes after the hole.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::mem::MaybeUninit;
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{ErrorKind, MapCore, MapFlags, MapHandle, MapType, RingBuffer};
use tokio::sync::Notify;
use tokio_uring::net::TcpStream;
use tracing::{debug, warn};

use super::{copy, Direction, End, Forwarded, Sockmap, Teardown};
use crate::linux::{self, TcpCounters};
use crate::uring;

#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::undocumented_unsafe_blocks,
    unused_imports
)]
mod skel {
    include!(concat!(env!("OUT_DIR"), "/sockmap.skel.rs"));
}

/// The maps' names in the kernel (how the tests find and count them).
pub const MAP_NAMES: [&str; 3] = ["sl_socks", "sl_targets", "sl_peers"];

/// `struct peer` in the program: the peer's cookie, bytes redirected to it,
/// the worker to tell.
const PEER_SIZE: usize = 24;
const _: () = assert!(size_of::<skel::types::peer>() == PEER_SIZE);

/// `MAX_WORKERS` in the program: entries of `sl_events`.
const MAX_WORKERS: u32 = 1024;

/// Each worker's ring buffer: 16-byte records (a cookie and its header), and
/// the worker empties it whenever it is woken.
const EVENTS_BYTES: u32 = 64 * 1024;

/// Bytes redirected and not yet taken by the peer above which a direction
/// stops redirecting (twice the largest send buffer TCP grows to by
/// default, tcp_wmem, so that a peer which keeps up is never held back),
/// and the figure it waits for before it starts again.
const PAUSE_ABOVE: u64 = 8 << 20;
const RESUME_AT: u64 = 1 << 20;

/// `SO_RCVLOWAT` of a socket taken out of `sl_socks` (see `keep_up`). Not
/// its cap: the kernel grows the receive buffer to match it, which would let
/// the client queue twice that while held back.
const QUIET_LOWAT: i32 = 1 << 20;

/// The send buffer a held-back direction's peer gets (see `keep_up`).
const PEER_SEND_BUFFER: usize = 16 << 20;

/// Shortest wait between two looks at a held-back direction's peer (never a
/// turn of the loop without a sleep), and the first.
const MIN_LOOK: Duration = Duration::from_micros(100);
const FIRST_LOOK: Duration = Duration::from_millis(1);
/// Longest wait between two looks while the peer takes bytes: one clock
/// tick at HZ=250, the kernel's retry period for a full send buffer.
const MAX_LOOK: Duration = Duration::from_millis(4);
/// Longest wait between two looks at a peer that took nothing meanwhile.
const MAX_STILL_LOOK: Duration = Duration::from_secs(1);

/// Longest pause between two looks at whether the peer has taken every
/// redirected byte, while it takes some.
const MAX_BACKOFF: Duration = Duration::from_millis(8);

/// How long a peer whose send queue is empty may still lack redirected bytes
/// before they count as lost (see `taken`): the kernel moves them as soon as
/// the queue has room, within a clock tick.
const LOST_AFTER: Duration = Duration::from_secs(2);

/// How long the count of a socket's bytes (see `check_count`) may keep
/// moving. Nothing empties its receive queue meanwhile, so its window
/// closes and the bytes stop within milliseconds of a fast sender.
const COUNT_PATIENCE: Duration = Duration::from_secs(10);

/// TCP states (linux/tcp.h numbering) past the peer's FIN.
const TCP_TIME_WAIT: u8 = 6;
const TCP_CLOSE_WAIT: u8 = 8;
const TCP_LAST_ACK: u8 = 9;
const TCP_CLOSING: u8 = 11;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("loading an sk_skb program and making sockmaps needs CAP_BPF and CAP_NET_ADMIN: run sluice as root or grant them")]
    NotPermitted,
    #[error("cannot tell which capabilities sluice holds")]
    Capabilities(#[source] io::Error),
    #[error("the kernel ({release}) refused sluice's sk_skb program (libbpf's messages, the verifier log among them, are in the log at warn level)")]
    Load {
        release: String,
        #[source]
        source: libbpf_rs::Error,
    },
    #[error("the kernel ({release}) refused to attach the stream-verdict program to a sockmap")]
    Attach {
        release: String,
        #[source]
        source: libbpf_rs::Error,
    },
    #[error("the sockmap forwarder serves at most {MAX_WORKERS} workers, not {0}")]
    TooManyWorkers(usize),
    #[error("{op}")]
    Map {
        op: &'static str,
        #[source]
        source: libbpf_rs::Error,
    },
}

/// The verdict program attached to its sockmap, and the maps connections
/// are joined through. Dropping it frees them (nothing is pinned or attached
/// outside the process).
pub struct SockmapEngine {
    socks: MapHandle,
    targets: MapHandle,
    peers: MapHandle,
    /// The workers' ring buffers not taken yet, each already in
    /// `sl_events` at its index.
    rings: Mutex<Vec<(u32, MapHandle)>>,
}

impl fmt::Debug for SockmapEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SockmapEngine").finish_non_exhaustive()
    }
}

impl SockmapEngine {
    /// The program, its maps, and a ring buffer for each of `workers`.
    pub fn new(workers: usize) -> Result<SockmapEngine, Error> {
        let workers = u32::try_from(workers)
            .ok()
            .filter(|&n| n <= MAX_WORKERS)
            .ok_or(Error::TooManyWorkers(workers))?;
        crate::bpf::log_to_tracing();
        if !crate::privileges::may_load_bpf().map_err(Error::Capabilities)? {
            return Err(Error::NotPermitted);
        }
        let mut storage = MaybeUninit::uninit();
        let open = skel::SockmapSkelBuilder::default()
            .open(&mut storage)
            .map_err(load_error)?;
        let loaded = open.load().map_err(load_error)?;
        let dup = |map: &libbpf_rs::MapMut<'_>| {
            MapHandle::try_from(&**map).map_err(|source| Error::Map {
                op: "duplicating a map descriptor",
                source,
            })
        };
        // Popped from the end: worker 0 takes index 0. sl_events itself
        // stays with the program that reads it.
        let rings = (0..workers)
            .rev()
            .map(|index| Ok((index, ring_at(&loaded.maps.sl_events, index)?)))
            .collect::<Result<Vec<_>, Error>>()?;
        let engine = SockmapEngine {
            socks: dup(&loaded.maps.sl_socks)?,
            targets: dup(&loaded.maps.sl_targets)?,
            peers: dup(&loaded.maps.sl_peers)?,
            rings: Mutex::new(rings),
        };
        // The map keeps the program once attached; the skeleton (and its
        // descriptors) can go at the end of this function.
        loaded
            .progs
            .sluice_verdict
            .attach_sockmap(engine.socks.as_fd().as_raw_fd())
            .map_err(|source| {
                if source.kind() == ErrorKind::PermissionDenied {
                    Error::NotPermitted
                } else {
                    Error::Attach {
                        release: crate::bpf::kernel_release(),
                        source,
                    }
                }
            })?;
        Ok(engine)
    }
}

/// A worker's ring buffer, put in `events` (`sl_events`) at `index` for the
/// program to write to.
fn ring_at(events: &impl MapCore, index: u32) -> Result<MapHandle, Error> {
    let opts = libbpf_rs::libbpf_sys::bpf_map_create_opts {
        sz: size_of::<libbpf_rs::libbpf_sys::bpf_map_create_opts>() as _,
        ..Default::default()
    };
    let ring = MapHandle::create(
        MapType::RingBuf,
        Some("sl_worker_ring"),
        0,
        0,
        EVENTS_BYTES,
        &opts,
    )
    .map_err(|source| Error::Map {
        op: "making a worker's ring buffer",
        source,
    })?;
    let fd = u32::try_from(ring.as_fd().as_raw_fd()).unwrap_or(u32::MAX);
    events
        .update(&index.to_ne_bytes(), &fd.to_ne_bytes(), MapFlags::ANY)
        .map_err(|source| Error::Map {
            op: "putting a worker's ring buffer in sl_events",
            source,
        })?;
    Ok(ring)
}

fn load_error(source: libbpf_rs::Error) -> Error {
    // Capabilities were checked: an LSM or seccomp policy said no.
    if source.kind() == ErrorKind::PermissionDenied {
        return Error::NotPermitted;
    }
    Error::Load {
        release: crate::bpf::kernel_release(),
        source,
    }
}

/// This worker's end of `sl_events`: the ring buffer the program writes to
/// for the connections this worker joined, and the directions waiting to
/// hear of their source socket.
struct Events {
    index: u32,
    ring: RingBuffer<'static>,
    /// The ring's map: polled for readiness; also keeps it alive.
    map: MapHandle,
    waiting: Rc<RefCell<HashMap<u64, Rc<Notify>>>>,
}

thread_local! {
    static EVENTS: RefCell<Option<Rc<Events>>> = const { RefCell::new(None) };
}

impl Events {
    /// This worker's, taken when it starts: a ring buffer the engine made,
    /// and a task on its runtime that wakes the directions the program
    /// names.
    fn of_this_worker(engine: &SockmapEngine) -> io::Result<Rc<Events>> {
        if let Some(events) = EVENTS.with(|events| events.borrow().clone()) {
            return Ok(events);
        }
        let (index, map) = engine
            .rings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
            .ok_or_else(|| {
                io::Error::other("sockmap: more workers than the engine made ring buffers for")
            })?;
        let waiting: Rc<RefCell<HashMap<u64, Rc<Notify>>>> = Rc::default();
        let wake = waiting.clone();
        let mut builder = libbpf_rs::RingBufferBuilder::new();
        builder
            .add(&map, move |record: &[u8]| {
                let cookie = record
                    .get(..8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_ne_bytes);
                if let Some(notify) = cookie.and_then(|c| wake.borrow().get(&c).cloned()) {
                    notify.notify_one();
                }
                0
            })
            .map_err(io::Error::other)?;
        let ring = builder.build().map_err(io::Error::other)?;
        let events = Rc::new(Events {
            index,
            ring,
            map,
            waiting,
        });
        EVENTS.with(|slot| *slot.borrow_mut() = Some(events.clone()));
        tokio_uring::spawn(events.clone().deliver());
        Ok(events)
    }

    /// Runs as long as the worker: wakes the directions named in the ring.
    async fn deliver(self: Rc<Self>) {
        loop {
            if let Err(error) = uring::poll(self.map.as_fd().as_raw_fd(), libc::POLLIN as u32).await
            {
                warn!(%error, "sockmap: the worker's event ring cannot be watched; slow peers are no longer paused");
                return;
            }
            let _ = self.ring.consume();
        }
    }

    fn watch(&self, cookie: u64) -> Rc<Notify> {
        let notify = Rc::new(Notify::new());
        self.waiting.borrow_mut().insert(cookie, notify.clone());
        notify
    }

    fn unwatch(&self, cookie: u64) {
        self.waiting.borrow_mut().remove(&cookie);
    }
}

/// Sets up this worker's ring buffer and the task that reads it; a worker
/// calls it on its runtime before its first connection.
pub fn start_worker(engine: &SockmapEngine) -> io::Result<()> {
    Events::of_this_worker(engine).map(drop)
}

/// How [`forward`] ended.
#[derive(Debug)]
pub enum Outcome {
    /// Both directions ended (cleanly or not; see each direction's end).
    Forwarded(Forwarded),
    /// The sockets could not be joined and no byte was redirected: another
    /// forwarder can take the connection.
    NotJoined(io::Error),
    /// Joining failed after the kernel may have redirected bytes: the
    /// connection cannot be saved.
    Failed(io::Error),
}

/// Joins the two sockets in the kernel and watches them until both
/// directions have ended. `copied`: the bytes each socket (client's first)
/// received that were forwarded by copy before.
pub async fn forward(
    engine: &SockmapEngine,
    client: &TcpStream,
    upstream: &TcpStream,
    copied: [u64; 2],
) -> Outcome {
    let joined = match Joined::join(engine, [client, upstream], copied) {
        Ok(joined) => joined,
        Err(JoinError::Before(error)) => return Outcome::NotJoined(error),
        Err(JoinError::After(joined, error)) => {
            return match joined.unjoin().await {
                Ok(()) => Outcome::NotJoined(error),
                Err(unjoin) => Outcome::Failed(io::Error::new(
                    unjoin.kind(),
                    format!("{error}; then, taking the sockets out again: {unjoin}"),
                )),
            };
        }
    };
    let failed = Cell::new(false);
    let (to_upstream, to_client) = futures::join!(
        joined.direction(CLIENT, &failed),
        joined.direction(UPSTREAM, &failed)
    );
    Outcome::Forwarded(Forwarded {
        upstream: to_upstream,
        downstream: to_client,
        sockmap: Sockmap::Joined {
            held_back: joined.held_back.get(),
        },
    })
}

const CLIENT: usize = 0;
const UPSTREAM: usize = 1;

enum JoinError<'a> {
    /// Nothing was redirected yet.
    Before(io::Error),
    /// The program may have redirected bytes already.
    After(Joined<'a>, io::Error),
}

/// A connection whose sockets are in the maps; dropping it takes them out.
struct Joined<'a> {
    engine: &'a SockmapEngine,
    sockets: [&'a TcpStream; 2],
    cookies: [u64; 2],
    /// What each socket had written (acked + queued) before it was joined.
    written_before: [u64; 2],
    /// What each socket had received and copy forwarded before.
    copied: [u64; 2],
    events: Rc<Events>,
    /// Per socket: the program has redirected another step of its bytes.
    stepped: [Rc<Notify>; 2],
    /// Times a direction was held back for its peer.
    held_back: Cell<u32>,
}

impl<'a> Joined<'a> {
    fn join(
        engine: &'a SockmapEngine,
        sockets: [&'a TcpStream; 2],
        copied: [u64; 2],
    ) -> Result<Joined<'a>, JoinError<'a>> {
        let before = |error| JoinError::Before(explain(sockets, error));
        let cookies = [
            linux::socket_cookie(sockets[CLIENT]).map_err(before)?,
            linux::socket_cookie(sockets[UPSTREAM]).map_err(before)?,
        ];
        let written_before = [
            written(sockets[CLIENT]).map_err(before)?,
            written(sockets[UPSTREAM]).map_err(before)?,
        ];
        let events = Events::of_this_worker(engine).map_err(before)?;
        // From here on, Drop removes whatever was inserted.
        let joined = Joined {
            engine,
            sockets,
            cookies,
            written_before,
            copied,
            stepped: cookies.map(|cookie| events.watch(cookie)),
            events,
            held_back: Cell::new(0),
        };
        for side in [CLIENT, UPSTREAM] {
            let fd = socket_fd(sockets[side]);
            update(&engine.targets, cookies[side], &fd).map_err(before)?;
            let mut peer = [0u8; PEER_SIZE];
            peer[..8].copy_from_slice(&cookies[1 - side].to_ne_bytes());
            peer[16..20].copy_from_slice(&joined.events.index.to_ne_bytes());
            update(&engine.peers, cookies[side], &peer).map_err(before)?;
        }
        // The client's bytes are redirected from this insert on.
        update(&engine.socks, cookies[CLIENT], &socket_fd(sockets[CLIENT])).map_err(before)?;
        // The kernel accepts only established sockets: the workload's FIN
        // may have come in the meantime.
        if let Err(error) = update(
            &engine.socks,
            cookies[UPSTREAM],
            &socket_fd(sockets[UPSTREAM]),
        ) {
            return Err(JoinError::After(joined, explain(sockets, error)));
        }
        for socket in sockets {
            if let Err(error) = linux::set_rcvlowat(socket, 1) {
                return Err(JoinError::After(joined, error));
            }
        }
        #[cfg(feature = "test-inject")]
        if inject::set("sockmap-unjoin") {
            return Err(JoinError::After(
                joined,
                io::Error::other("test-inject: sockmap-unjoin"),
            ));
        }
        Ok(joined)
    }

    /// Undoes a join that went half-way, without losing a byte: stops the
    /// program on both sockets, checks that no byte was lost meanwhile, lets
    /// each peer take what was redirected to it, and leaves the rest in the
    /// receive queues for another forwarder. An error: the connection must
    /// be reset.
    async fn unjoin(self) -> io::Result<()> {
        // As when a direction is held back (see `keep_up`): no program run
        // may start while the sockets leave sl_socks.
        for socket in self.sockets {
            linux::set_rcvlowat(socket, QUIET_LOWAT)?;
        }
        for cookie in self.cookies {
            // ENOENT: never inserted.
            let _ = self.engine.socks.delete(&cookie.to_ne_bytes());
        }
        #[cfg(feature = "test-inject")]
        if let Some(bytes) = inject::take("sockmap-hole-at-unjoin") {
            inject::drop_bytes(self.sockets[CLIENT], bytes).await?;
        }
        let failed = Cell::new(false);
        for side in [CLIENT, UPSTREAM] {
            self.check_count(side, &failed).await?;
        }
        // Another forwarder's reads would wait for SO_RCVLOWAT bytes.
        for socket in self.sockets {
            linux::set_rcvlowat(socket, 1)?;
        }
        for side in [CLIENT, UPSTREAM] {
            let redirected = self.redirected(side)?;
            self.taken(
                1 - side,
                self.written_before[1 - side] + redirected,
                &failed,
            )
            .await?;
        }
        Ok(())
    }

    /// Waits for the end of the direction from `side` to its peer and
    /// passes it on.
    async fn direction(&self, side: usize, failed: &Cell<bool>) -> Direction {
        let (from, to) = (self.sockets[side], self.sockets[1 - side]);
        let watched = (libc::POLLRDHUP | libc::POLLERR | libc::POLLHUP) as u32;
        // Only POLLRDHUP is asked for (POLLERR and POLLHUP always come):
        // POLLIN can flicker while the program consumes bytes. The poll
        // stays armed while the direction looks at its peer's progress.
        let rdhup = || uring::poll(from.as_raw_fd(), libc::POLLRDHUP as u32);
        let mut ended = std::pin::pin!(rdhup());
        let events = loop {
            tokio::select! {
                polled = ended.as_mut() => match polled {
                    Ok(events) if events & watched != 0 => break events,
                    Ok(_) => ended.set(rdhup()),
                    Err(error) => return self.fail(side, failed, End::ReadFailed(error)),
                },
                () = self.stepped[side].notified() => {
                    // Boxed: inline, its state (a copy pump among it) would
                    // size every connection's task, whatever its forwarder.
                    if let Some(direction) = Box::pin(self.keep_up(side, failed)).await {
                        return direction;
                    }
                }
            }
        };
        if failed.get() {
            // The other direction failed and reset both sockets; it reports.
            return self.ended(side, End::Eof);
        }
        if events & libc::POLLERR as u32 != 0 {
            let error = linux::take_error(from)
                .ok()
                .flatten()
                .unwrap_or_else(|| io::ErrorKind::ConnectionReset.into());
            return self.fail(side, failed, End::ReadFailed(error));
        }
        // A FIN. TCP_INFO takes the socket lock, so the FIN's processing,
        // which ran the program over every byte before it, is complete and
        // the count below is final.
        let received = match linux::tcp_counters(from) {
            Ok(counters) => counters.bytes_received,
            Err(error) => return self.fail(side, failed, End::ReadFailed(error)),
        };
        let redirected = match self.redirected(side) {
            Ok(bytes) => bytes,
            Err(error) => return self.fail(side, failed, End::ReadFailed(error)),
        };
        // Everything received but the FIN must have been copied before the
        // join or redirected since; otherwise bytes were dropped and the
        // stream cannot go on intact.
        if let Err(error) = all_forwarded(received, self.copied[side] + redirected) {
            return self.fail(side, failed, End::ReadFailed(error));
        }
        let target = self.written_before[1 - side] + redirected;
        #[cfg(feature = "test-inject")]
        let target = target + inject::take("sockmap-lost").unwrap_or(0);
        if let Err(error) = self.taken(1 - side, target, failed).await {
            return self.fail(side, failed, End::WriteFailed(error));
        }
        if failed.get() {
            return self.ended(side, End::Eof);
        }
        // Every redirected byte is in TCP's send queue: the FIN follows them.
        // A failure means `to` is gone, which the other direction reports.
        let _ = to.shutdown(Shutdown::Write);
        self.ended(side, End::Eof)
    }

    /// (bytes redirected from socket `side` and not taken by its peer yet,
    /// bytes its peer has taken since the join).
    fn progress(&self, side: usize) -> io::Result<(u64, u64)> {
        let redirected = self.redirected(side)?;
        let taken = written(self.sockets[1 - side])?.saturating_sub(self.written_before[1 - side]);
        Ok((redirected.saturating_sub(taken), taken))
    }

    /// The program redirected another step of socket `side`'s bytes: if
    /// its peer is that far behind, stops redirecting until it catches up
    /// (see the module's notes). Some when the direction ended meanwhile.
    async fn keep_up(&self, side: usize, failed: &Cell<bool>) -> Option<Direction> {
        let (from, to) = (self.sockets[side], self.sockets[1 - side]);
        match self.progress(side) {
            Ok((backlog, _)) if backlog <= PAUSE_ABOVE => return None,
            Ok((backlog, _)) => {
                debug!(backlog, "sockmap: the peer is behind; pausing the redirect")
            }
            Err(error) => return Some(self.fail(side, failed, End::ReadFailed(error))),
        }
        // The kernel drops what a program run under way has not reached
        // when the program goes (tcp_read_skb takes skbs off the queue, and
        // without a program the verdict is "drop"): 3 of 10 runs of the
        // tests below reset a connection that way. So first no run may
        // start: with SO_RCVLOWAT at QUIET_LOWAT TCP calls the data-ready
        // callback only once that much has come, far more than arrives in
        // the microseconds until the program is gone, and setting it takes
        // the socket's lock, which waits out a run under way. A run can still
        // start between the two calls (this thread preempted, a megabyte
        // arriving): the count after the delete catches that.
        if let Err(error) = linux::set_rcvlowat(from, QUIET_LOWAT) {
            return Some(self.fail(side, failed, End::ReadFailed(error)));
        }
        // The kernel feeds a full peer again only at the next clock tick
        // (a delayed retry; the peer's write-space callback cannot bring
        // it forward). With TCP's own send buffer, at most 4 MiB, make
        // bench's single-stream load through sockmap ran at 5.2 Gbit/s,
        // against 14.1-14.4 with 16 MiB (`sluice-bench --scenarios
        // tproxy-sockmap --loads bulk`, this call left out). It only bounds
        // what waits in the peer's queue, like the mark above. Without
        // CAP_NET_ADMIN the kernel's size stays.
        if let Err(error) = linux::force_send_buffer(to, PEER_SEND_BUFFER) {
            debug!(%error, "sockmap: cannot enlarge the peer's send buffer");
        }
        self.held_back.set(self.held_back.get() + 1);
        let key = self.cookies[side].to_ne_bytes();
        if let Err(error) = self.engine.socks.delete(&key) {
            return Some(self.fail(side, failed, End::ReadFailed(io::Error::other(error))));
        }
        #[cfg(feature = "test-inject")]
        if let Some(bytes) = inject::take("sockmap-hole-at-pause") {
            if let Err(error) = inject::drop_bytes(from, bytes).await {
                return Some(self.fail(side, failed, End::ReadFailed(error)));
            }
        }
        // Before anything resumes the redirect or copies the rest.
        if let Err(error) = self.check_count(side, failed).await {
            return Some(self.fail(side, failed, End::ReadFailed(error)));
        }
        let paused_at = Instant::now();
        let mut pace = Pace::default();
        loop {
            if failed.get() {
                return Some(self.ended(side, End::Eof));
            }
            let events = match linux::events_now(from, libc::POLLRDHUP) {
                Ok(events) => events,
                Err(error) => return Some(self.fail(side, failed, End::ReadFailed(error))),
            };
            if events & (libc::POLLRDHUP | libc::POLLERR | libc::POLLHUP) != 0 {
                return Some(self.copy_rest(side, failed).await);
            }
            let (backlog, taken) = match self.progress(side) {
                Ok((backlog, _)) if backlog <= RESUME_AT => break,
                Ok(progress) => progress,
                Err(error) => return Some(self.fail(side, failed, End::WriteFailed(error))),
            };
            tokio::time::sleep(pace.next_look(backlog, taken, paused_at.elapsed())).await;
        }
        debug!(held_back_for = ?paused_at.elapsed(), "sockmap: the peer caught up; resuming the redirect");
        match update(&self.engine.socks, self.cookies[side], &socket_fd(from)) {
            // What waited in the receive queue goes through the program now,
            // not at the next segment, which may never come.
            Ok(()) => match linux::set_rcvlowat(from, 1) {
                Ok(()) => None,
                Err(error) => Some(self.fail(side, failed, End::ReadFailed(error))),
            },
            // The FIN came in the meantime: the kernel joins only
            // established sockets.
            Err(error) if error.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                Some(self.copy_rest(side, failed).await)
            }
            Err(error) => Some(self.fail(side, failed, End::ReadFailed(error))),
        }
    }

    /// Ends a paused direction by copy: once the peer has taken every
    /// redirected byte, what waits in the receive queue and what follows,
    /// up to the FIN, goes through user space.
    async fn copy_rest(&self, side: usize, failed: &Cell<bool>) -> Direction {
        let (from, to) = (self.sockets[side], self.sockets[1 - side]);
        // Out of sl_socks already; TCP_INFO takes the socket lock, so a
        // program run under way has ended and the count is final.
        if let Err(error) = linux::tcp_counters(from) {
            return self.fail(side, failed, End::ReadFailed(error));
        }
        let redirected = match self.redirected(side) {
            Ok(bytes) => bytes,
            Err(error) => return self.fail(side, failed, End::ReadFailed(error)),
        };
        let target = self.written_before[1 - side] + redirected;
        if let Err(error) = self.taken(1 - side, target, failed).await {
            return self.fail(side, failed, End::WriteFailed(error));
        }
        if failed.get() {
            return self.ended(side, End::Eof);
        }
        // Reads wait for SO_RCVLOWAT bytes: back to one.
        if let Err(error) = linux::set_rcvlowat(from, 1) {
            return self.fail(side, failed, End::ReadFailed(error));
        }
        // The FIN is passed on below, after the count.
        let rest = copy::pump(from, to, &Teardown::fin_left_to_caller()).await;
        if !matches!(rest.end, End::Eof) {
            // copy reset the sockets; the other direction must hear why.
            failed.set(true);
            for socket in self.sockets {
                super::abort(socket);
            }
            return Direction {
                bytes: self.copied[side] + redirected + rest.bytes,
                end: rest.end,
            };
        }
        let forwarded = self.copied[side] + redirected + rest.bytes;
        if let Err(error) = linux::tcp_counters(from)
            .and_then(|counters| all_forwarded(counters.bytes_received, forwarded))
        {
            return self.fail(side, failed, End::ReadFailed(error));
        }
        let _ = to.shutdown(Shutdown::Write);
        Direction {
            bytes: forwarded,
            end: End::Eof,
        }
    }

    /// Waits until socket `side` has taken `target` bytes (acked + queued)
    /// into its send queue. Ends early, with `Ok`, if the other direction
    /// failed meanwhile; with an error if the socket fails or the bytes are
    /// lost. A peer that takes them slowly, or not at all (a workload that
    /// stopped reading: its send queue stays full), is waited for as copy
    /// waits on a write, until its connection fails (TCP gives up on a peer
    /// gone) or the idle timeout resets it; it is looked at less and less
    /// often while it takes nothing.
    async fn taken(&self, side: usize, target: u64, failed: &Cell<bool>) -> io::Result<()> {
        let socket = self.sockets[side];
        let mut backoff = Duration::from_micros(250);
        let mut last = None;
        let mut empty_since = None;
        loop {
            if failed.get() {
                return Ok(());
            }
            let (written, queued) = sent_and_queued(socket)?;
            if written >= target {
                return Ok(());
            }
            // The socket was reset, or the kernel's send of redirected bytes
            // failed (it then sets the socket's error): they will never go.
            let events = linux::events_now(socket, 0)?;
            if events & (libc::POLLERR | libc::POLLHUP) != 0 {
                return Err(linux::take_error(socket)?
                    .unwrap_or_else(|| io::ErrorKind::ConnectionReset.into()));
            }
            let moved = last.is_some_and(|last| written > last);
            last = Some(written);
            // The workqueue moves redirected bytes into the send queue as
            // soon as it has room: a peer whose queue stays empty while it
            // lacks some will never get them (a redirect the kernel could
            // not deliver is dropped without an error on either socket).
            // Without this the wait would last until the idle timeout, or
            // for ever with `--idle-timeout 0`.
            if moved || queued > 0 {
                empty_since = None;
            } else if empty_since.get_or_insert_with(Instant::now).elapsed() >= LOST_AFTER {
                return Err(io::Error::other(format!(
                    "sockmap: {} redirected bytes never reached the peer's send queue",
                    target - written
                )));
            }
            // There is no event for "psock queue empty", so look again soon;
            // but a peer whose send queue holds bytes and took none since the
            // last look waits for its reader: less and less often then.
            tokio::time::sleep(backoff).await;
            let stalled = !moved && queued > 0;
            backoff = (backoff * 2).min(if stalled { MAX_STILL_LOOK } else { MAX_BACKOFF });
        }
    }

    /// Checks that socket `side`, just taken out of sl_socks, lost no byte:
    /// see [`account`]. Looks until the figures hold still.
    async fn check_count(&self, side: usize, failed: &Cell<bool>) -> io::Result<()> {
        let socket = self.sockets[side];
        // TCP_INFO takes the socket's lock: a program run under way at the
        // delete has ended, and the count of redirected bytes is final.
        linux::tcp_counters(socket)?;
        let forwarded = self.copied[side] + self.redirected(side)?;
        let deadline = Instant::now() + COUNT_PATIENCE;
        let mut wait = MIN_LOOK;
        loop {
            if failed.get() {
                return Ok(());
            }
            let before = linux::tcp_counters(socket)?;
            let queued = linux::unread_bytes(socket)?;
            let after = linux::tcp_counters(socket)?;
            match account(before, queued, after, forwarded) {
                Account::Whole => return Ok(()),
                Account::Hole(error) => return Err(error),
                Account::Moving if Instant::now() >= deadline => {
                    return Err(io::Error::other(format!(
                        "sockmap: bytes kept arriving for {COUNT_PATIENCE:?}; they could not be counted"
                    )))
                }
                Account::Moving => {}
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(MAX_LOOK);
        }
    }

    /// Bytes the program redirected from socket `side` to its peer.
    fn redirected(&self, side: usize) -> io::Result<u64> {
        let value = self
            .engine
            .peers
            .lookup(&self.cookies[side].to_ne_bytes(), MapFlags::ANY)
            .map_err(io::Error::other)?
            .ok_or_else(|| io::Error::other("sockmap: the peer entry is gone"))?;
        let bytes: [u8; 8] = value
            .get(8..16)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| io::Error::other("sockmap: short peer entry"))?;
        Ok(u64::from_ne_bytes(bytes))
    }

    fn ended(&self, side: usize, end: End) -> Direction {
        Direction {
            bytes: self.copied[side] + self.redirected(side).unwrap_or(0),
            end,
        }
    }

    /// Resets both sockets and wakes the other direction (SHUT_RD makes its
    /// poll see POLLRDHUP; `failed` tells it why).
    fn fail(&self, side: usize, failed: &Cell<bool>, end: End) -> Direction {
        failed.set(true);
        for socket in self.sockets {
            super::abort(socket);
        }
        self.ended(side, end)
    }
}

impl Drop for Joined<'_> {
    fn drop(&mut self) {
        for cookie in self.cookies {
            self.events.unwatch(cookie);
        }
        // The kernel takes a closing socket out of its sockmaps by itself;
        // doing it here also covers sockets that live on (a connection handed
        // to another forwarder) and the peer map, a plain hash. ENOENT (never
        // inserted, or already gone) is fine.
        for map in [&self.engine.socks, &self.engine.targets, &self.engine.peers] {
            for cookie in self.cookies {
                let _ = map.delete(&cookie.to_ne_bytes());
            }
        }
    }
}

/// The value a sockhash update takes: the socket's descriptor.
fn socket_fd(socket: &TcpStream) -> [u8; 8] {
    // Descriptors are never negative.
    u64::try_from(socket.as_raw_fd())
        .unwrap_or(u64::MAX)
        .to_ne_bytes()
}

/// The kernel refuses (EOPNOTSUPP) to add a socket that is no longer
/// established, i.e. one whose peer already sent its FIN: says so, so that
/// this ordinary case is told apart from a kernel that cannot do it at all.
fn explain(sockets: [&TcpStream; 2], error: io::Error) -> io::Error {
    const TCP_ESTABLISHED: u8 = 1;
    if error.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return error;
    }
    let closing = sockets
        .iter()
        .any(|socket| linux::tcp_counters(*socket).is_ok_and(|c| c.state != TCP_ESTABLISHED));
    if closing {
        io::Error::new(io::ErrorKind::NotConnected, NotEstablished)
    } else {
        error
    }
}

/// A socket received its FIN before it could be joined.
#[derive(Debug)]
struct NotEstablished;

impl fmt::Display for NotEstablished {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a FIN arrived before the sockets could be joined (the kernel joins only established sockets)")
    }
}

impl std::error::Error for NotEstablished {}

/// Checks, at a FIN, that everything a socket received before it was
/// forwarded: `received` is `tcpi_bytes_received`, which counts the FIN as
/// one; `forwarded` what was copied and redirected.
fn all_forwarded(received: u64, forwarded: u64) -> io::Result<()> {
    if forwarded + 1 == received {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "sockmap: {} bytes received before the FIN but {forwarded} forwarded (copied and redirected)",
        received.saturating_sub(1)
    )))
}

/// What a socket's counters say of the bytes it received, read once no
/// program run can take more of them (the socket out of sl_socks, its lock
/// taken since).
#[derive(Debug)]
enum Account {
    /// Every byte was forwarded (copied before the join or redirected) or
    /// still waits in the receive queue.
    Whole,
    /// Bytes left the receive queue without being forwarded: a program run
    /// cut short by the delete, whose unreached bytes the kernel dropped.
    Hole(io::Error),
    /// A segment arrived between the reads: look again.
    Moving,
}

/// Whether all a socket received is accounted for: `before` and `after`,
/// its counters read just before and after `queued`, the bytes in its
/// receive queue; `forwarded`, the bytes copied before the join and
/// redirected since.
fn account(before: TcpCounters, queued: u64, after: TcpCounters, forwarded: u64) -> Account {
    if before.bytes_received != after.bytes_received {
        return Account::Moving;
    }
    // `bytes_received` counts a FIN as one; a closed socket may have had
    // one (both sides closed) or not (reset).
    let fins = match after.state {
        TCP_TIME_WAIT | TCP_CLOSE_WAIT | TCP_LAST_ACK | TCP_CLOSING => 1..=1,
        linux::TCP_CLOSE => 0..=1,
        _ => 0..=0,
    };
    let unaccounted = i128::from(after.bytes_received) - i128::from(forwarded) - i128::from(queued);
    if (i128::from(*fins.start())..=i128::from(*fins.end())).contains(&unaccounted) {
        return Account::Whole;
    }
    let payload = after.bytes_received.saturating_sub(*fins.start());
    Account::Hole(io::Error::other(if unaccounted > i128::from(*fins.end()) {
        format!(
            "sockmap: {payload} bytes received but {forwarded} forwarded and {queued} still \
             queued (a program run cut short dropped the rest): reset rather than go on past \
             the hole"
        )
    } else {
        format!(
            "sockmap: {forwarded} bytes forwarded and {queued} still queued, more than the \
             {payload} received"
        )
    }))
}

/// When a held-back direction looks at its peer again (see `keep_up`): at
/// the pace the peer has taken bytes since the pause, when it should be down
/// to [`RESUME_AT`] (resumed late, the stream stands still). The kernel
/// feeds the peer in bursts (it retries a full send buffer a clock tick
/// later), so the pace is taken over the whole pause. A peer that took
/// nothing since the last look is looked at again soon, then less and less
/// often: a stalled workload costs a look a second, not hundreds.
#[derive(Debug)]
struct Pace {
    /// What the peer had taken at the first look.
    taken_at_pause: Option<u64>,
    /// What it had taken at the last look.
    taken_before: Option<u64>,
    /// The next wait if the peer takes nothing meanwhile.
    still: Duration,
}

impl Default for Pace {
    fn default() -> Pace {
        Pace {
            taken_at_pause: None,
            taken_before: None,
            still: FIRST_LOOK,
        }
    }
}

impl Pace {
    /// The wait until the next look. `backlog`: bytes redirected and not
    /// taken yet; `taken`: bytes the peer has taken since the join, a lower
    /// bound read in two steps (see `written`) that can dip, so differences
    /// saturate; `paused_for`: time since the pause.
    fn next_look(&mut self, backlog: u64, taken: u64, paused_for: Duration) -> Duration {
        let gained = taken.saturating_sub(*self.taken_at_pause.get_or_insert(taken));
        let moved = self.taken_before.is_some_and(|before| taken > before);
        self.taken_before = Some(taken);
        let wait = if moved && gained > 0 {
            self.still = FIRST_LOOK;
            // A zero `paused_for` makes the pace infinite and the wait
            // zero; a tiny pace makes it too long for a Duration: MAX_LOOK.
            let per_second = gained as f64 / paused_for.as_secs_f64();
            Duration::try_from_secs_f64(backlog.saturating_sub(RESUME_AT) as f64 / per_second)
                .map_or(MAX_LOOK, |wait| wait.min(MAX_LOOK))
        } else {
            let wait = self.still;
            self.still = (self.still * 2).min(MAX_STILL_LOOK);
            wait
        };
        wait.max(MIN_LOOK)
    }
}

/// Bytes `socket` has taken into its send queue since it was made
/// (write_seq's progress), as a lower bound: bytes_acked is read first and
/// the queue (write_seq - snd_una) second, so bytes an ACK covers between
/// the two reads are missing from both figures, never counted twice.
fn written(socket: &TcpStream) -> io::Result<u64> {
    sent_and_queued(socket).map(|(written, _)| written)
}

/// [`written`], and the bytes in the send queue (sent and not acknowledged,
/// or not sent yet) at the second read.
fn sent_and_queued(socket: &TcpStream) -> io::Result<(u64, u32)> {
    let acked = linux::tcp_counters(socket)?.bytes_acked;
    let queued = linux::send_queue_bytes(socket)?;
    Ok((acked + u64::from(queued), queued))
}

/// A map update that keeps the kernel's errno (libbpf-rs' errors do not
/// expose it): EOPNOTSUPP for a socket that is no longer established must be
/// told apart from other refusals.
fn update(map: &MapHandle, cookie: u64, value: &[u8]) -> io::Result<()> {
    let key = cookie.to_ne_bytes();
    if value.len() != map.value_size() as usize {
        return Err(io::Error::other("sockmap: value of the wrong size"));
    }
    // SAFETY: plain syscall wrapper; the key and value buffers match the
    // map's key size (8, checked at load by the skeleton's types) and value
    // size (checked above) and outlive the call.
    let rc = unsafe {
        libbpf_rs::libbpf_sys::bpf_map_update_elem(
            map.as_fd().as_raw_fd(),
            key.as_ptr().cast(),
            value.as_ptr().cast(),
            libbpf_rs::libbpf_sys::BPF_NOEXIST.into(),
        )
    };
    if rc < 0 {
        return Err(io::Error::from_raw_os_error(-rc));
    }
    Ok(())
}

/// Logs that a connection went to copy: a FIN before joining is ordinary
/// (debug); anything else is said once per process at warn level.
pub fn warn_not_joined(error: &io::Error) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    let ordinary = error
        .get_ref()
        .is_some_and(|inner| inner.is::<NotEstablished>());
    if ordinary || WARNED.swap(true, Ordering::Relaxed) {
        tracing::debug!(%error, "sockmap could not take a connection; forwarded with copy");
    } else {
        warn!(%error, "sockmap could not take a connection; forwarding it (and any other it cannot take) with copy (logged once)");
    }
}

/// Faults the tests inject, named in `SLUICE_TEST_INJECT` (comma-separated,
/// `name` or `name=bytes`). Only with the cargo feature `test-inject`, which
/// only the tests turn on: a release build has no trace of it.
/// - `sockmap-hole-at-pause=N`: the first direction held back loses N bytes
///   of its receive queue once out of sl_socks, as to a program run the
///   delete cut short;
/// - `sockmap-unjoin`: every join is undone at its end, as when the
///   workload's FIN comes between the two sockets' inserts;
/// - `sockmap-hole-at-unjoin=N`: the first unjoin loses N bytes of the
///   client socket's receive queue;
/// - `sockmap-lost=N`: the first FIN waits for N redirected bytes more than
///   there are, as if the kernel had lost them on the way to the peer.
#[cfg(feature = "test-inject")]
mod inject {
    use std::io;
    use std::sync::{Mutex, PoisonError};
    use std::time::{Duration, Instant};

    use tokio_uring::net::TcpStream;

    use crate::linux;

    /// Faults not yet taken; read from the environment at the first use.
    static FAULTS: Mutex<Option<Vec<(String, u64)>>> = Mutex::new(None);

    fn with<T>(f: impl FnOnce(&mut Vec<(String, u64)>) -> T) -> T {
        let mut faults = FAULTS.lock().unwrap_or_else(PoisonError::into_inner);
        let faults = faults.get_or_insert_with(|| {
            std::env::var("SLUICE_TEST_INJECT")
                .unwrap_or_default()
                .split(',')
                .filter(|fault| !fault.is_empty())
                .map(|fault| match fault.split_once('=') {
                    Some((name, bytes)) => (name.to_owned(), bytes.parse().unwrap_or(0)),
                    None => (fault.to_owned(), 0),
                })
                .collect()
        });
        f(faults)
    }

    /// Whether fault `name` is set; it stays set.
    pub fn set(name: &str) -> bool {
        with(|faults| faults.iter().any(|(fault, _)| fault == name))
    }

    /// Fault `name`'s figure, to its first taker only.
    pub fn take(name: &str) -> Option<u64> {
        with(|faults| {
            let at = faults.iter().position(|(fault, _)| fault == name)?;
            Some(faults.remove(at).1)
        })
    }

    /// Reads and throws away `bytes` bytes of `socket`'s receive queue,
    /// waiting (a bounded time) for them to arrive.
    pub async fn drop_bytes(socket: &TcpStream, bytes: u64) -> io::Result<()> {
        let mut left = usize::try_from(bytes).map_err(io::Error::other)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while left > 0 {
            let mut buffer = Vec::with_capacity(left);
            match linux::recv_now(socket, &mut buffer) {
                Ok(0) => {
                    return Err(io::Error::other(
                        "test-inject: end of stream before the hole",
                    ))
                }
                Ok(n) => left = left.saturating_sub(n),
                Err(error)
                    if error.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(error) => return Err(error),
            }
        }
        tracing::warn!(bytes, "test-inject: a hole in the stream");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(state: u8, bytes_received: u64) -> TcpCounters {
        TcpCounters {
            state,
            bytes_acked: 0,
            bytes_received,
            notsent_bytes: 0,
            unacked_segments: 0,
        }
    }

    const ESTABLISHED: u8 = 1;

    #[test]
    fn every_byte_forwarded_or_queued_is_whole() {
        let c = counters(ESTABLISHED, 1000);
        assert!(matches!(account(c, 400, c, 600), Account::Whole));
        assert!(matches!(account(c, 0, c, 1000), Account::Whole));
        assert!(matches!(account(c, 1000, c, 0), Account::Whole));
    }

    #[test]
    fn bytes_neither_forwarded_nor_queued_are_a_hole() {
        let c = counters(ESTABLISHED, 1000);
        let Account::Hole(error) = account(c, 300, c, 600) else {
            panic!("100 bytes missing, not seen");
        };
        let error = error.to_string();
        assert!(error.contains("1000 bytes received but 600 forwarded and 300 still queued"));
        // More accounted for than received: no hole, but no sense either.
        let Account::Hole(error) = account(c, 500, c, 600) else {
            panic!("100 bytes too many, not seen");
        };
        assert!(error.to_string().contains("more than the 1000 received"));
    }

    #[test]
    fn a_fin_counts_as_one_received() {
        for state in [TCP_CLOSE_WAIT, TCP_LAST_ACK, TCP_CLOSING, TCP_TIME_WAIT] {
            let c = counters(state, 1001);
            assert!(matches!(account(c, 1, c, 999), Account::Whole), "{state}");
            assert!(
                matches!(account(c, 1, c, 1000), Account::Hole(_)),
                "{state}"
            );
            assert!(matches!(account(c, 1, c, 998), Account::Hole(_)), "{state}");
        }
        // Closed: with a FIN, or reset without one.
        let closed = counters(linux::TCP_CLOSE, 1001);
        assert!(matches!(account(closed, 1, closed, 999), Account::Whole));
        assert!(matches!(account(closed, 1, closed, 1000), Account::Whole));
        assert!(matches!(account(closed, 1, closed, 998), Account::Hole(_)));
    }

    #[test]
    fn bytes_arriving_between_the_reads_say_nothing() {
        let before = counters(ESTABLISHED, 1000);
        let after = counters(ESTABLISHED, 2000);
        assert!(matches!(account(before, 1000, after, 600), Account::Moving));
        // A FIN arriving meanwhile too.
        let fin = counters(TCP_CLOSE_WAIT, 1001);
        assert!(matches!(account(before, 400, fin, 600), Account::Moving));
    }

    #[test]
    fn zero_counters_do_not_overflow() {
        let zero = counters(linux::TCP_CLOSE, 0);
        assert!(matches!(account(zero, 0, zero, 0), Account::Whole));
        assert!(matches!(account(zero, 0, zero, u64::MAX), Account::Hole(_)));
        assert!(matches!(
            account(zero, u64::MAX, zero, u64::MAX),
            Account::Hole(_)
        ));
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn the_first_look_and_a_still_peer_back_off_to_a_second() {
        let mut pace = Pace::default();
        let mut waits = Vec::new();
        for _ in 0..14 {
            waits.push(pace.next_look(8 * MIB, 5 * MIB, Duration::from_millis(3)));
        }
        assert_eq!(waits[0], FIRST_LOOK);
        assert!(waits.windows(2).all(|w| w[1] >= w[0]), "{waits:?}");
        assert_eq!(*waits.last().unwrap(), MAX_STILL_LOOK);
    }

    #[test]
    fn a_moving_peer_is_looked_at_when_it_should_be_at_resume_at() {
        let mut pace = Pace::default();
        pace.next_look(8 * MIB, 0, Duration::ZERO);
        // 1 MiB in 1 s, 1 KiB above RESUME_AT: about a millisecond.
        let wait = pace.next_look(RESUME_AT + 1024, MIB, Duration::from_secs(1));
        assert!(
            (Duration::from_micros(950)..=Duration::from_micros(1000)).contains(&wait),
            "{wait:?}"
        );
        // A slow peer: no longer than MAX_LOOK.
        let wait = pace.next_look(8 * MIB, MIB + 1, Duration::from_secs(1000));
        assert_eq!(wait, MAX_LOOK);
        // Moving again after a still spell starts the spell over.
        pace.next_look(8 * MIB, MIB + 1, Duration::from_secs(1000));
        pace.next_look(8 * MIB, MIB + 1, Duration::from_secs(1000));
        pace.next_look(8 * MIB, MIB + 2, Duration::from_secs(1000));
        assert_eq!(
            pace.next_look(8 * MIB, MIB + 2, Duration::from_secs(1000)),
            FIRST_LOOK
        );
    }

    /// The pace's edges: no time since the pause (an infinite pace), a
    /// backlog already at or below RESUME_AT, a counter that dips (the
    /// `Duration::from_secs_f64(inf)` panic of a zero pace, once), the
    /// largest figures.
    #[test]
    fn the_pace_survives_its_edges() {
        let mut pace = Pace::default();
        pace.next_look(8 * MIB, MIB, Duration::ZERO);
        assert_eq!(pace.next_look(8 * MIB, 2 * MIB, Duration::ZERO), MIN_LOOK);
        assert_eq!(
            pace.next_look(RESUME_AT / 2, 3 * MIB, Duration::from_millis(1)),
            MIN_LOOK
        );
        // Dips below where it was at the pause, then moves without gaining.
        let mut pace = Pace::default();
        pace.next_look(8 * MIB, 5 * MIB, Duration::from_millis(1));
        pace.next_look(8 * MIB, 4 * MIB, Duration::from_millis(2));
        let wait = pace.next_look(8 * MIB, 4 * MIB + 1, Duration::from_millis(3));
        assert!((MIN_LOOK..=MAX_STILL_LOOK).contains(&wait), "{wait:?}");
        for backlog in [0, 1, RESUME_AT, RESUME_AT + 1, u64::MAX] {
            for paused_for in [Duration::ZERO, Duration::from_nanos(1), Duration::MAX] {
                let mut pace = Pace::default();
                for taken in [0, u64::MAX / 2, u64::MAX, 1, u64::MAX] {
                    let wait = pace.next_look(backlog, taken, paused_for);
                    assert!(
                        (MIN_LOOK..=MAX_STILL_LOOK).contains(&wait),
                        "{backlog} {taken} {paused_for:?}: {wait:?}"
                    );
                }
            }
        }
    }
}
