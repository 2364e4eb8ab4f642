//! The sockmap forwarder: the two sockets of a connection are joined inside
//! the kernel by an `sk_skb` stream-verdict program (`bpf/sockmap.bpf.c`),
//! which redirects every byte one socket receives to the other's send side.
//! User space only joins the sockets, watches them for FIN and errors, passes
//! those on, and cleans up.
//!
//! [`SockmapEngine`] loads the program and its maps once per process; every
//! worker shares it (map updates by descriptor are thread-safe).
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

use std::cell::Cell;
use std::fmt;
use std::io;
use std::mem::MaybeUninit;
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;
use std::time::Duration;

use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{ErrorKind, MapCore, MapFlags, MapHandle, PrintLevel};
use tokio_uring::net::TcpStream;
use tracing::warn;

use super::{Direction, End, Forwarded, Sockmap};
use crate::linux;
use crate::uring;

#[allow(clippy::all, clippy::pedantic, unused_imports)]
mod skel {
    include!(concat!(env!("OUT_DIR"), "/sockmap.skel.rs"));
}

/// The maps' names in the kernel (how the tests find and count them).
pub const MAP_NAMES: [&str; 3] = ["sl_socks", "sl_targets", "sl_peers"];

/// `struct peer` in the program: the peer's cookie, bytes redirected to it.
const PEER_SIZE: usize = 16;
const _: () = assert!(size_of::<skel::types::peer>() == PEER_SIZE);

/// Longest pause between two looks at whether the peer has taken every
/// redirected byte.
const MAX_BACKOFF: Duration = Duration::from_millis(8);

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
}

impl fmt::Debug for SockmapEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SockmapEngine").finish_non_exhaustive()
    }
}

impl SockmapEngine {
    pub fn new() -> Result<SockmapEngine, Error> {
        static LOGGING: Once = Once::new();
        // libbpf's warnings (the verifier log among them) go to the log.
        LOGGING.call_once(|| {
            libbpf_rs::set_print(Some((PrintLevel::Info, libbpf_log)));
        });
        if !linux::may_load_bpf().map_err(Error::Capabilities)? {
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
        let engine = SockmapEngine {
            socks: dup(&loaded.maps.sl_socks)?,
            targets: dup(&loaded.maps.sl_targets)?,
            peers: dup(&loaded.maps.sl_peers)?,
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
                        release: kernel_release(),
                        source,
                    }
                }
            })?;
        Ok(engine)
    }
}

fn load_error(source: libbpf_rs::Error) -> Error {
    // Capabilities were checked: an LSM or seccomp policy said no.
    if source.kind() == ErrorKind::PermissionDenied {
        return Error::NotPermitted;
    }
    Error::Load {
        release: kernel_release(),
        source,
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

fn libbpf_log(level: PrintLevel, message: String) {
    let message = message.trim_end();
    match level {
        PrintLevel::Warn => tracing::warn!(target: "libbpf", "{message}"),
        PrintLevel::Info => tracing::debug!(target: "libbpf", "{message}"),
        PrintLevel::Debug => tracing::trace!(target: "libbpf", "{message}"),
    }
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
        sockmap: Sockmap::Joined,
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
        // From here on, Drop removes whatever was inserted.
        let joined = Joined {
            engine,
            sockets,
            cookies,
            written_before,
            copied,
        };
        for side in [CLIENT, UPSTREAM] {
            let fd = socket_fd(sockets[side]);
            update(&engine.targets, cookies[side], &fd).map_err(before)?;
            let mut peer = [0u8; PEER_SIZE];
            peer[..8].copy_from_slice(&cookies[1 - side].to_ne_bytes());
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
        Ok(joined)
    }

    /// Undoes a join that went half-way, without losing a byte: stops the
    /// program on both sockets, lets each peer take what was redirected to
    /// it, and leaves the rest in the receive queues for another forwarder.
    async fn unjoin(self) -> io::Result<()> {
        for cookie in self.cookies {
            // ENOENT: never inserted.
            let _ = self.engine.socks.delete(&cookie.to_ne_bytes());
        }
        // TCP_INFO takes each socket's lock: a program run already under way
        // has ended, and none starts now.
        for socket in self.sockets {
            linux::tcp_counters(socket)?;
        }
        let failed = Cell::new(false);
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
        let events = loop {
            // Only POLLRDHUP is asked for (POLLERR and POLLHUP always come):
            // POLLIN can flicker while the program consumes bytes.
            match uring::poll(from.as_raw_fd(), libc::POLLRDHUP as u32).await {
                Ok(events) if events & watched != 0 => break events,
                Ok(_) => continue,
                Err(error) => return self.fail(side, failed, End::ReadFailed(error)),
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
        let copied = self.copied[side];
        if copied + redirected + 1 != received {
            let error = io::Error::other(format!(
                "sockmap: {} bytes received before the FIN but {copied} copied and {redirected} redirected",
                received.saturating_sub(1)
            ));
            return self.fail(side, failed, End::ReadFailed(error));
        }
        let target = self.written_before[1 - side] + redirected;
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

    /// Waits until socket `side` has taken `target` bytes (acked + queued)
    /// into its send queue. Ends early, with `Ok`, if the other direction
    /// failed meanwhile.
    async fn taken(&self, side: usize, target: u64, failed: &Cell<bool>) -> io::Result<()> {
        let socket = self.sockets[side];
        let mut backoff = Duration::from_micros(250);
        loop {
            if failed.get() || written(socket)? >= target {
                return Ok(());
            }
            // The socket was reset, or the kernel's send of redirected bytes
            // failed (it then sets the socket's error): they will never go.
            let events = linux::events_now(socket, 0)?;
            if events & (libc::POLLERR | libc::POLLHUP) != 0 {
                return Err(linux::take_error(socket)?
                    .unwrap_or_else(|| io::ErrorKind::ConnectionReset.into()));
            }
            // The workqueue moves the bytes as the send buffer frees up;
            // there is no event for "psock queue empty", so look again soon.
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
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

/// Bytes `socket` has taken into its send queue since it was made
/// (write_seq's progress), as a lower bound: bytes_acked is read first and
/// the queue (write_seq - snd_una) second, so bytes an ACK covers between
/// the two reads are missing from both figures, never counted twice.
fn written(socket: &TcpStream) -> io::Result<u64> {
    let acked = linux::tcp_counters(socket)?.bytes_acked;
    let queued = linux::send_queue_bytes(socket)?;
    Ok(acked + u64::from(queued))
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
