//! Linux socket options and process facts, each behind one small typed
//! function. The `unsafe` of borrowing a runtime's raw descriptor lives here
//! and nowhere else.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::fcntl::{OFlag, SpliceFFlags};

use socket2::{Domain, SockRef, Socket, Type};

/// Source address of sluice's own connection to the workload (Istio's
/// convention): the interception rules let packets from it on `lo` pass, so
/// the proxy's upstream connection is not intercepted a second time, and the
/// workload sees that a connection came through sluice.
pub const BYPASS_SOURCE_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
/// The IPv6 twin of [`BYPASS_SOURCE_V4`]; unlike 127.0.0.6 it must be added
/// to `lo` (`sluice rules install` does).
pub const BYPASS_SOURCE_V6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

pub fn bypass_source(family_of: IpAddr) -> IpAddr {
    match family_of {
        IpAddr::V4(_) => IpAddr::V4(BYPASS_SOURCE_V4),
        IpAddr::V6(_) => IpAddr::V6(BYPASS_SOURCE_V6),
    }
}

/// A listening socket; with `transparent`, `IP_TRANSPARENT` lets TPROXY hand
/// it connections addressed to any local or non-local destination.
/// IPv6 listeners are v6-only: IPv4 has its own listener.
///
/// The listener carries `mark`, which its accepted sockets take instead of
/// the SYN's (with `tcp_fwmark_accept`, an intercepted SYN's mark would
/// send their replies into the policy route's local table).
pub fn listener(
    addr: SocketAddr,
    transparent: bool,
    mark: u32,
    backlog: i32,
) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_mark(mark)?;
    // Accepted sockets inherit it: no call per connection.
    socket.set_tcp_nodelay(true)?;
    match addr {
        SocketAddr::V4(_) => socket.set_ip_transparent_v4(transparent)?,
        SocketAddr::V6(_) => {
            socket.set_only_v6(true)?;
            socket.set_ip_transparent_v6(transparent)?;
        }
    }
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

/// Whether `addr` can be bound by a socket without `SO_REUSEPORT`: EADDRINUSE
/// when something listens there.
pub fn port_free(addr: SocketAddr) -> io::Result<()> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())
}

/// A socket for sluice's connection to the workload at `target`, not
/// bound yet ([`bind_bypass`], [`bind_transparent`]).
///
/// It carries `mark` and is bound to `lo`. The mark's policy route (`fwmark
/// <mark> lookup <table>`, `local default dev lo`) is what lets a socket
/// bound to `lo` reach the pod's own addresses (IPv6 matches the interface
/// strictly, and the pod's address lives on its eth0); the workload's side
/// takes the mark (`tcp_fwmark_accept`), so its replies to a client's
/// address take the same route back. Bound to `lo`, the TIME_WAIT this
/// socket leaves when sluice closes first (the client closed first) is
/// reused after a second, as loopback connections' are (`tcp_tw_reuse=2`):
/// from `::6` or a client's address, which are no loopback addresses, it
/// would otherwise block its port for a minute, and a sustained connection
/// rate would run out of ports.
pub fn upstream_socket(target: SocketAddr, mark: u32) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(target), Type::STREAM, None)?;
    socket.set_tcp_nodelay(true)?;
    // No keepalive: the peer is in the pod, on this kernel, which answers
    // for it (a reset when it goes; probes are answered even while the
    // workload hangs), so probes could never find it silent.
    socket.set_mark(mark)?;
    socket.bind_device(Some(b"lo"))?;
    Ok(socket)
}

/// Binds an upstream socket to the bypass source of `destination`'s family.
/// `IP_BIND_ADDRESS_NO_PORT` defers the port choice to `connect()`, so the
/// whole 4-tuple space is available rather than one port per bind.
pub fn bind_bypass(socket: &Socket, destination: SocketAddr) -> io::Result<()> {
    bind_address_no_port(socket)?;
    socket.bind(&SocketAddr::new(bypass_source(destination.ip()), 0).into())
}

/// Binds an upstream socket to `source`, an address this namespace does
/// not own (a client's): `IP_TRANSPARENT`. As for [`bind_bypass`], the port
/// is `connect()`'s to choose.
pub fn bind_transparent(socket: &Socket, source: IpAddr) -> io::Result<()> {
    match source {
        IpAddr::V4(_) => socket.set_ip_transparent_v4(true)?,
        IpAddr::V6(_) => socket.set_ip_transparent_v6(true)?,
    }
    bind_address_no_port(socket)?;
    socket.bind(&SocketAddr::new(source, 0).into())
}

/// `IP_LOCAL_PORT_RANGE` (Linux 6.3; in no crate's bindings yet): the
/// ports `connect()` may pick for this socket. The kernel only narrows the
/// namespace's `net.ipv4.ip_local_port_range` with it (a bound outside that
/// range is ignored), which `sluice run` checks at start.
pub fn set_local_port_range(socket: &Socket, low: u16, high: u16) -> io::Result<()> {
    const IP_LOCAL_PORT_RANGE: libc::c_int = 51;
    let range: u32 = u32::from(low) | (u32::from(high) << 16);
    // SAFETY: the option reads one u32 through the pointer, whose size is
    // passed along.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_IP,
            IP_LOCAL_PORT_RANGE,
            std::ptr::from_ref(&range).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The namespace's `net.ipv4.ip_local_port_range` (IPv6 uses it too).
pub fn local_port_range() -> io::Result<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")?;
    let mut numbers = text.split_whitespace().map(str::parse::<u16>);
    match (numbers.next(), numbers.next()) {
        (Some(Ok(low)), Some(Ok(high))) => Ok((low, high)),
        _ => Err(io::Error::other(format!(
            "cannot read net.ipv4.ip_local_port_range: {text:?}"
        ))),
    }
}

/// `getsockname()`: on a socket accepted through TPROXY (or sk_lookup) this
/// is the destination the client asked for.
pub fn local_addr(socket: &impl AsRawFd) -> io::Result<SocketAddr> {
    with_sockref(socket, |s| s.local_addr())?
        .as_socket()
        .ok_or_else(|| io::Error::other("socket has no IP address"))
}

/// `SO_ORIGINAL_DST` (or its IPv6 twin): the destination conntrack saw
/// before REDIRECT rewrote it.
pub fn original_dst(socket: &impl AsRawFd) -> io::Result<SocketAddr> {
    let local = local_addr(socket)?;
    let original = with_sockref(socket, |s| match local {
        SocketAddr::V4(_) => s.original_dst_v4(),
        SocketAddr::V6(_) => s.original_dst_v6(),
    })?;
    original
        .as_socket()
        .ok_or_else(|| io::Error::other("SO_ORIGINAL_DST returned no IP address"))
}

/// Makes the next close send RST instead of FIN: how a reset from one side
/// is passed on to the other.
pub fn reset_on_close(socket: &impl AsRawFd) -> io::Result<()> {
    with_sockref(socket, |s| s.set_linger(Some(std::time::Duration::ZERO)))
}

/// `shutdown(SHUT_RD)`: wakes a pending read on this socket with end of
/// stream, without sending anything to the peer.
pub fn shutdown_read(socket: &impl AsRawFd) -> io::Result<()> {
    with_sockref(socket, |s| s.shutdown(std::net::Shutdown::Read))
}

pub fn set_nodelay(socket: &impl AsRawFd) -> io::Result<()> {
    with_sockref(socket, |s| s.set_tcp_nodelay(true))
}

/// Puts a socket in non-blocking mode, so that `splice(2)` on it returns
/// EAGAIN instead of sleeping (TCP's splice looks at the file's O_NONBLOCK,
/// not at SPLICE_F_NONBLOCK).
pub fn set_nonblocking(socket: &impl AsRawFd) -> io::Result<()> {
    with_sockref(socket, |s| s.set_nonblocking(true))
}

/// `SO_COOKIE`: the kernel's 64-bit identity of a socket, the same number
/// BPF programs get from `bpf_get_socket_cookie()`.
pub fn socket_cookie(socket: &impl AsRawFd) -> io::Result<u64> {
    with_sockref(socket, |s| s.cookie())
}

/// `SO_ERROR`: takes (and clears) the error pending on a socket.
pub fn take_error(socket: &impl AsRawFd) -> io::Result<Option<io::Error>> {
    with_sockref(socket, |s| s.take_error())
}

/// `SO_RCVLOWAT`. Setting it makes TCP check at once whether the receive
/// queue is ready and, if so, call the socket's data-ready callback: the way
/// to have a stream-verdict program see bytes that arrived before the socket
/// entered its sockmap (the kernel only runs it on the next arrival).
pub fn set_rcvlowat(socket: &impl AsRawFd, bytes: i32) -> io::Result<()> {
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>())
        .map_err(|_| io::Error::other("int does not fit socklen_t"))?;
    // SAFETY: SO_RCVLOWAT reads one int from the pointer, valid for `len`.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            std::ptr::from_ref(&bytes).cast(),
            len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What [`tcp_counters`] reads from `TCP_INFO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpCounters {
    /// `TCP_ESTABLISHED`, `TCP_CLOSE`, ... (linux/tcp.h numbering).
    pub state: u8,
    /// Bytes the peer acknowledged (snd_una's progress).
    pub bytes_acked: u64,
    /// Sequence space received in order (rcv_nxt's progress): payload, plus
    /// one for a FIN.
    pub bytes_received: u64,
    /// Bytes written to the socket and not yet sent (0 before Linux 4.6).
    pub notsent_bytes: u32,
    /// Segments sent and not yet acknowledged.
    pub unacked_segments: u32,
}

/// TCP's state `TCP_CLOSE`: the connection is gone (reset, or both FINs
/// done and the socket unhashed).
pub const TCP_CLOSE: u8 = 7;

/// `TCP_INFO`'s byte counters. The kernel fills it under the socket's lock,
/// so the numbers include every segment whose processing had started.
pub fn tcp_counters(socket: &impl AsRawFd) -> io::Result<TcpCounters> {
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::tcp_info>())
        .map_err(|_| io::Error::other("tcp_info does not fit socklen_t"))?;
    // SAFETY: `info` is valid for `len` bytes and the kernel writes at most
    // that many; zeroed first, so fields an older kernel does not fill read
    // as 0.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // bytes_acked and bytes_received came in Linux 4.1 and 4.2.
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_segs_out);
    if (len as usize) < needed {
        return Err(io::Error::other(
            "the kernel's TCP_INFO has no byte counters (Linux 4.2 or newer needed)",
        ));
    }
    // SAFETY: zero-initialised plain data, partly overwritten by the kernel.
    let info = unsafe { info.assume_init() };
    Ok(TcpCounters {
        state: info.tcpi_state,
        bytes_acked: info.tcpi_bytes_acked,
        bytes_received: info.tcpi_bytes_received,
        notsent_bytes: info.tcpi_notsent_bytes,
        unacked_segments: info.tcpi_unacked,
    })
}

/// `SO_SNDBUFFORCE`: a send buffer of `bytes` (the kernel doubles it for
/// its bookkeeping, as for `SO_SNDBUF`), above `net.core.wmem_max`; needs
/// CAP_NET_ADMIN. Ends TCP's own sizing of it.
pub fn force_send_buffer(socket: &impl AsRawFd, bytes: usize) -> io::Result<()> {
    nix::sys::socket::setsockopt(
        &borrow(socket),
        nix::sys::socket::sockopt::SndBufForce,
        &bytes,
    )
    .map_err(io::Error::from)
}

/// `SIOCOUTQ`: bytes in the send queue, sent but not acknowledged or not
/// sent yet (write_seq - snd_una).
pub fn send_queue_bytes(socket: &impl AsRawFd) -> io::Result<u32> {
    let mut bytes: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (= TIOCOUTQ) writes one int through the pointer.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::TIOCOUTQ, &mut bytes) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    u32::try_from(bytes).map_err(|_| io::Error::other("SIOCOUTQ returned a negative count"))
}

/// Which of `events` (`libc::POLLERR`, ...) a socket has right now, without
/// waiting (`poll(2)` with a zero timeout). POLLERR and POLLHUP are always
/// reported; nothing is consumed.
pub fn events_now(socket: &impl AsRawFd, events: i16) -> io::Result<i16> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let socket = borrow(socket);
    let mut fds = [PollFd::new(socket, PollFlags::from_bits_truncate(events))];
    poll(&mut fds, PollTimeout::ZERO)?;
    Ok(fds[0].revents().map_or(0, |revents| revents.bits()))
}

/// Sends as much of `bytes` as `socket`'s send buffer takes now, without
/// waiting (`MSG_DONTWAIT`; `MSG_NOSIGNAL`: a peer gone is an error, not a
/// SIGPIPE): `WouldBlock` when the buffer is full.
pub fn send_now(socket: &impl AsRawFd, bytes: &[u8]) -> io::Result<usize> {
    with_sockref(socket, |s| {
        s.send_with_flags(bytes, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    })
}

/// The most payload `socket`'s receive queue can hold: its receive buffer
/// (`SO_RCVBUF`, the kernel's figure, which already counts overhead).
pub fn receive_buffer(socket: &impl AsRawFd) -> io::Result<usize> {
    with_sockref(socket, |s| s.recv_buffer_size())
}

/// Reads what `socket` holds now into `buffer`'s spare capacity, without
/// waiting (`MSG_DONTWAIT`): `WouldBlock` when nothing is there, 0 at end of
/// stream. For readers that wait for readiness first and so hold no read in
/// the kernel while they wait.
pub fn recv_now(socket: &impl AsRawFd, buffer: &mut Vec<u8>) -> io::Result<usize> {
    let n = with_sockref(socket, |s| {
        s.recv_with_flags(buffer.spare_capacity_mut(), libc::MSG_DONTWAIT)
    })?;
    // SAFETY: the kernel wrote `n` bytes right after the initialised part.
    unsafe { buffer.set_len(buffer.len() + n) };
    Ok(n)
}

/// Bytes waiting in `socket`'s receive queue (up to its end of stream),
/// counted by a peek that copies nothing: `MSG_PEEK | MSG_TRUNC`, with which
/// TCP walks its queue and only counts. Not `SIOCINQ`: for a socket in a
/// sockmap Linux answers that from the psock's own queue (`tcp_bpf_ioctl`).
pub fn unread_bytes(socket: &impl AsRawFd) -> io::Result<u64> {
    // More than any receive queue holds (the kernel caps reads at 2 GiB).
    const ALL: usize = 1 << 30;
    // SAFETY: with MSG_TRUNC, TCP copies nothing, so the kernel never
    // writes through the null buffer; it only checks that the range is one
    // of user addresses, which it is.
    let n = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            std::ptr::null_mut(),
            ALL,
            libc::MSG_PEEK | libc::MSG_TRUNC | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        let error = io::Error::last_os_error();
        return if error.kind() == io::ErrorKind::WouldBlock {
            Ok(0)
        } else {
            Err(error)
        };
    }
    u64::try_from(n).map_err(|_| io::Error::other("recv returned a negative count"))
}

/// A pipe for `splice(2)`: both ends non-blocking, resized to `size` bytes
/// where the kernel allows it.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

/// A new pipe's size when it cannot be resized.
const DEFAULT_PIPE_SIZE: usize = 64 * 1024;

impl Pipe {
    /// A pipe of `size` bytes or, where the kernel refuses that size, of its
    /// default size. The refusal is EPERM once this user's pipes exceed
    /// `fs.pipe-user-pages-soft` without CAP_SYS_RESOURCE (a non-root
    /// sidecar with many busy connections): a smaller pipe moves the same
    /// bytes in more calls, where failing would reset the connection.
    pub fn new(size: usize) -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        let wanted = i32::try_from(size).map_err(|_| io::Error::other("pipe size too large"))?;
        let capacity = match nix::fcntl::fcntl(&write, nix::fcntl::FcntlArg::F_SETPIPE_SZ(wanted)) {
            Ok(set) => usize::try_from(set).unwrap_or(size),
            Err(nix::errno::Errno::EPERM) => {
                let got = nix::fcntl::fcntl(&write, nix::fcntl::FcntlArg::F_GETPIPE_SZ)?;
                usize::try_from(got).unwrap_or(DEFAULT_PIPE_SIZE)
            }
            Err(error) => return Err(error.into()),
        };
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }

    /// Bytes the pipe holds: the most one splice into it can move.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Moves up to `len` bytes from `socket` into the pipe; 0 is end of
    /// stream.
    pub fn fill_from(&self, socket: &impl AsRawFd, len: usize) -> io::Result<usize> {
        splice(&borrow(socket), &self.write, len)
    }

    /// Moves up to `len` bytes from the pipe into `socket`.
    pub fn drain_into(&self, socket: &impl AsRawFd, len: usize) -> io::Result<usize> {
        splice(&self.read, &borrow(socket), len)
    }
}

fn splice(from: &impl AsFd, to: &impl AsFd, len: usize) -> io::Result<usize> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    nix::fcntl::splice(from, None, to, None, len, flags).map_err(io::Error::from)
}

/// `IP_BIND_ADDRESS_NO_PORT` (socket2 lacks it; nix has it).
fn bind_address_no_port(socket: &Socket) -> io::Result<()> {
    nix::sys::socket::setsockopt(
        socket,
        nix::sys::socket::sockopt::IpBindAddressNoPort,
        &true,
    )
    .map_err(io::Error::from)
}

fn with_sockref<T>(socket: &impl AsRawFd, f: impl FnOnce(SockRef<'_>) -> T) -> T {
    f(SockRef::from(&borrow(socket)))
}

/// tokio-uring's sockets give only raw descriptors.
fn borrow(socket: &impl AsRawFd) -> BorrowedFd<'_> {
    // SAFETY: the descriptor is owned by `socket`, which the returned borrow
    // cannot outlive, and a BorrowedFd never closes what it borrows.
    unsafe { BorrowedFd::borrow_raw(socket.as_raw_fd()) }
}

/// Aborts a TCP connection without closing its descriptor: `connect()` with
/// `AF_UNSPEC` runs the kernel's `tcp_disconnect`, which sends a reset to
/// the peer of an established (or half-closed) connection, abandons a
/// connect in progress, and leaves the socket closed, so whatever waits on it
/// wakes with an error and nothing it does afterwards can send a FIN.
/// Works whichever forwarder holds the socket.
pub fn abort(socket: &impl AsRawFd) -> io::Result<()> {
    let unspec = libc::sockaddr {
        sa_family: libc::AF_UNSPEC as libc::sa_family_t,
        sa_data: [0; 14],
    };
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr>())
        .map_err(|_| io::Error::other("sockaddr does not fit socklen_t"))?;
    // SAFETY: a valid sockaddr of `len` bytes, read by the kernel only.
    let rc = unsafe { libc::connect(socket.as_raw_fd(), &unspec, len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// TCP keepalive, so that a peer that vanished without a word (a node gone,
/// a NAT that forgot the flow) is found in about two minutes instead of
/// holding the connection forever. Accepted sockets inherit it from their
/// listener.
pub fn set_keepalive(socket: &impl AsRawFd) -> io::Result<()> {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(std::time::Duration::from_secs(60))
        .with_interval(std::time::Duration::from_secs(10))
        .with_retries(6);
    with_sockref(socket, |s| s.set_tcp_keepalive(&keepalive))
}

/// The descriptor limit before and after [`raise_nofile_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    pub soft_before: u64,
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit: the soft limit of 1024
/// that most containers start with would cap sluice near 500 connections.
pub fn raise_nofile_limit() -> io::Result<NofileLimit> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft_before, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft_before < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    Ok(NofileLimit {
        soft_before,
        soft,
        hard,
    })
}

/// Waits up to `timeout` for one of `signals` (which the calling thread has
/// blocked); `None` when none came.
pub fn wait_signal(
    signals: &nix::sys::signal::SigSet,
    timeout: std::time::Duration,
) -> io::Result<Option<nix::sys::signal::Signal>> {
    let timeout = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: a valid signal set and timespec; no siginfo is asked for.
    let rc = unsafe { libc::sigtimedwait(signals.as_ref(), std::ptr::null_mut(), &timeout) };
    if rc < 0 {
        let error = io::Error::last_os_error();
        return match error.raw_os_error() {
            Some(libc::EAGAIN | libc::EINTR) => Ok(None),
            _ => Err(error),
        };
    }
    nix::sys::signal::Signal::try_from(rc)
        .map(Some)
        .map_err(io::Error::from)
}

/// Whether IPv6 can be used in this network namespace: the kernel has it
/// (an `AF_INET6` socket can be made) and it is not disabled
/// (`net.ipv6.conf.all.disable_ipv6`, as in an IPv4-only pod). A pod with
/// IPv6 disabled can still make IPv6 sockets, but cannot give `lo` the
/// `::6` bypass source nor reach anything over IPv6.
pub fn ipv6_enabled() -> bool {
    if Socket::new(Domain::IPV6, Type::STREAM, None).is_err() {
        return false;
    }
    std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6")
        .map_or(true, |value| value.trim() != "1")
}
