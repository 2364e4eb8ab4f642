//! Fixtures for the end-to-end tests: a client ⇄ pod topology (netlab), a
//! workload served from the test process inside the pod namespace, and a
//! `sluice` process running in the pod namespace. Everything is torn down on
//! drop, also when a test panics.

#![allow(dead_code)] // each test binary uses its own part of the fixtures

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use netlab::{ClientPod, Netns, Proc};

pub const BYPASS_V4: &str = "127.0.0.6";
pub const BYPASS_V6: &str = "::6";
/// Upper bound for any single wait in a test, so a hang fails instead of
/// blocking CI. Not a speed assertion.
pub const PATIENCE: Duration = Duration::from_secs(20);

pub fn pod_v4(port: u16) -> SocketAddr {
    SocketAddr::new(ClientPod::POD_V4.into(), port)
}

pub fn pod_v6(port: u16) -> SocketAddr {
    SocketAddr::new(ClientPod::POD_V6.into(), port)
}

pub fn conntrack_count(ns: &Netns) -> u64 {
    let count = ns
        .sysctl_get("net.netfilter.nf_conntrack_count")
        .expect("read nf_conntrack_count in the pod namespace");
    count.parse().expect("nf_conntrack_count is a number")
}

/// What the workload does with a connection.
#[derive(Debug, Clone, Copy)]
pub enum Behaviour {
    /// Echo every byte; after the client's FIN, send [`TRAILER`] (proof that
    /// the other direction still flows after a half-close), then close.
    Echo,
    /// Read one request of `REQUEST.len()` bytes, answer [`REPLY`], close
    /// first (so the TIME_WAIT lands on the proxy side).
    ReplyAndClose,
    /// Send [`GREETING`] and half-close at once, then read until the client
    /// closes; the bytes read are added to `Workload::drained`.
    GreetThenDrain,
    /// Read this many bytes, then reset the connection.
    ResetAfter(usize),
    /// Send this many bytes of [`download_bytes`] at once, then close.
    Download(usize),
    /// A connection whose first bytes are [`REQUEST`] is answered [`REPLY`]
    /// and closed at once (the workload closes first); any other is held
    /// open, silent, until the client closes it.
    ReplyOrHold,
}

pub const TRAILER: &[u8] = b"<eof seen>";
pub const REQUEST: &[u8] = b"ping....";
pub const REPLY: &[u8] = b"pong";
pub const GREETING: &[u8] = b"hello, then FIN";

/// The mark sluice's upstream sockets carry (its default `--mark`): with
/// `tcp_fwmark_accept`, which sluice's rules turn on, the workload's side of
/// a connection that came through sluice carries it too, whatever address
/// the connection comes from (the client's, or the bypass source).
pub const SLUICE_MARK: u32 = 1337;

/// A TCP server in the pod namespace, served by threads of the test process;
/// it counts who connected, so a test can tell connections that came through
/// sluice (their accepted socket has sluice's mark) from those that did not,
/// and records every peer address.
pub struct Workload {
    listeners: Vec<TcpListener>,
    stopping: Arc<AtomicBool>,
    pub via_sluice: Arc<AtomicU64>,
    pub direct: Arc<AtomicU64>,
    /// The peer address of every connection that came through sluice.
    pub sluice_peers: Arc<Mutex<Vec<IpAddr>>>,
    /// The peer address of every connection that did not.
    pub peers: Arc<Mutex<Vec<IpAddr>>>,
    /// (peer, local) of every connection that came through sluice: the
    /// port sluice connected from, and the address it connected to.
    pub sluice_legs: Arc<Mutex<Vec<(SocketAddr, SocketAddr)>>>,
    /// Bytes read by `GreetThenDrain` connections that ended.
    pub drained: Arc<AtomicU64>,
    /// Connections whose end (FIN or reset) the workload saw.
    pub ended: Arc<AtomicU64>,
    /// `Echo` and `GreetThenDrain` connections that ended with an error (a
    /// reset) rather than a FIN.
    pub resets: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workload {
    /// A workload on `port` of every address, IPv4 and IPv6, as servers
    /// usually listen (0.0.0.0 and `::`).
    pub fn start(pod: &Netns, port: u16, behaviour: Behaviour, threads: usize) -> Workload {
        let any = [
            SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port)),
            SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)),
        ];
        Workload::on(pod, &any, behaviour, threads)
    }

    /// A workload on IPv4 only (an IPv4-only pod).
    pub fn start_v4(pod: &Netns, port: u16, behaviour: Behaviour, threads: usize) -> Workload {
        let any = [SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port))];
        Workload::on(pod, &any, behaviour, threads)
    }

    /// A workload that listens on the pod's own addresses only (some
    /// servers bind the pod's IP), not on every address.
    pub fn start_on_pod_addresses(
        pod: &Netns,
        port: u16,
        behaviour: Behaviour,
        threads: usize,
    ) -> Workload {
        Workload::on(pod, &[pod_v4(port), pod_v6(port)], behaviour, threads)
    }

    fn on(pod: &Netns, addrs: &[SocketAddr], behaviour: Behaviour, threads: usize) -> Workload {
        let listeners: Vec<TcpListener> = pod.run(|| {
            addrs
                .iter()
                .map(|addr| listen(*addr).expect("workload bind in pod ns"))
                .collect()
        });
        let mut workload = Workload {
            listeners,
            stopping: Arc::new(AtomicBool::new(false)),
            via_sluice: Arc::default(),
            direct: Arc::default(),
            sluice_peers: Arc::default(),
            peers: Arc::default(),
            sluice_legs: Arc::default(),
            drained: Arc::default(),
            ended: Arc::default(),
            resets: Arc::default(),
            threads: Vec::new(),
        };
        for listener in &workload.listeners {
            for _ in 0..threads {
                let listener = listener.try_clone().expect("clone workload listener");
                let (stopping, via, direct, peers) = (
                    workload.stopping.clone(),
                    workload.via_sluice.clone(),
                    workload.direct.clone(),
                    workload.peers.clone(),
                );
                let sluice_peers = workload.sluice_peers.clone();
                let sluice_legs = workload.sluice_legs.clone();
                let (drained, ended) = (workload.drained.clone(), workload.ended.clone());
                let resets = workload.resets.clone();
                workload.threads.push(std::thread::spawn(move || loop {
                    let Ok((stream, peer)) = listener.accept() else {
                        if stopping.load(Ordering::SeqCst) {
                            return;
                        }
                        continue;
                    };
                    let mark = socket2::SockRef::from(&stream).mark().unwrap_or(0);
                    let through_sluice = mark == SLUICE_MARK;
                    if through_sluice { &via } else { &direct }.fetch_add(1, Ordering::SeqCst);
                    if through_sluice {
                        if let Ok(local) = stream.local_addr() {
                            sluice_legs.lock().unwrap().push((peer, local));
                        }
                    }
                    if through_sluice {
                        &sluice_peers
                    } else {
                        &peers
                    }
                    .lock()
                    .unwrap()
                    .push(peer.ip());
                    match behaviour {
                        Behaviour::Echo => {
                            let resets = resets.clone();
                            std::thread::spawn(move || {
                                if echo(stream).is_err() {
                                    resets.fetch_add(1, Ordering::SeqCst);
                                }
                            });
                        }
                        Behaviour::ReplyAndClose => reply_and_close(stream),
                        Behaviour::GreetThenDrain => {
                            let (drained, ended) = (drained.clone(), ended.clone());
                            let resets = resets.clone();
                            std::thread::spawn(move || {
                                let (bytes, reset) = greet_then_drain(stream);
                                drained.fetch_add(bytes, Ordering::SeqCst);
                                if reset {
                                    resets.fetch_add(1, Ordering::SeqCst);
                                }
                                ended.fetch_add(1, Ordering::SeqCst);
                            });
                        }
                        Behaviour::ResetAfter(limit) => {
                            std::thread::spawn(move || reset_after(stream, limit));
                        }
                        Behaviour::Download(len) => {
                            std::thread::spawn(move || download(stream, len));
                        }
                        Behaviour::ReplyOrHold => {
                            std::thread::spawn(move || reply_or_hold(stream));
                        }
                    }
                }));
            }
        }
        workload
    }

    pub fn connections(&self) -> u64 {
        self.via_sluice.load(Ordering::SeqCst) + self.direct.load(Ordering::SeqCst)
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // shutdown() on a listening socket wakes every blocked accept().
        for listener in &self.listeners {
            let _ = socket2::SockRef::from(listener).shutdown(Shutdown::Both);
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// A listener on `addr`; an IPv6 one is v6-only, so that `::` and
/// 0.0.0.0 can both be bound.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Echoes until end of stream; an error when the connection was reset.
fn echo(mut stream: TcpStream) -> std::io::Result<()> {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buffer)? {
            0 => break,
            n => stream.write_all(&buffer[..n])?,
        }
    }
    stream.write_all(TRAILER)
}

/// Bytes read, and whether the end was a reset rather than a FIN.
fn greet_then_drain(mut stream: TcpStream) -> (u64, bool) {
    if stream.write_all(GREETING).is_err() || stream.shutdown(Shutdown::Write).is_err() {
        return (0, true);
    }
    let mut buffer = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return (total, false),
            Ok(n) => total += n as u64,
            Err(_) => return (total, true),
        }
    }
}

fn reset_after(mut stream: TcpStream, limit: usize) {
    let mut buffer = vec![0u8; limit];
    let _ = stream.read_exact(&mut buffer);
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
}

/// What a [`Behaviour::Download`] workload sends.
/// Made once per length and kept, so that a download starts at once (64
/// MiB take a moment to make) and a test can make it before it connects.
pub fn download_bytes(len: usize) -> Arc<Vec<u8>> {
    static MADE: Mutex<Vec<(usize, Arc<Vec<u8>>)>> = Mutex::new(Vec::new());
    let mut made = MADE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((_, bytes)) = made.iter().find(|(made_len, _)| *made_len == len) {
        return Arc::clone(bytes);
    }
    let bytes = Arc::new(random_bytes(len, 42));
    made.push((len, Arc::clone(&bytes)));
    bytes
}

fn download(mut stream: TcpStream, len: usize) {
    let _ = stream.write_all(&download_bytes(len));
}

fn reply_or_hold(mut stream: TcpStream) {
    let mut first = [0u8; REQUEST.len()];
    if stream.read_exact(&mut first).is_ok() && first == REQUEST {
        let _ = stream.write_all(REPLY);
        return;
    }
    let mut rest = [0u8; 1024];
    while let Ok(1..) = stream.read(&mut rest) {}
}

fn reply_and_close(mut stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(PATIENCE));
    let mut request = [0u8; REQUEST.len()];
    if stream.read_exact(&mut request).is_ok() {
        let _ = stream.write_all(REPLY);
    }
}

/// How to start sluice, beyond its arguments.
#[derive(Default)]
pub struct Launch<'a> {
    /// A command and its arguments sluice runs under (`setpriv`, `prlimit`).
    pub wrapper: &'a [&'a str],
    pub env: &'a [(&'a str, &'a str)],
    /// The sluice binary (default: the one cargo built), e.g. a copy with
    /// file capabilities.
    pub program: Option<&'a std::path::Path>,
}

/// A `sluice` process in the pod namespace. Its log lines are collected; it
/// is stopped with SIGTERM on drop (which removes rules it installed).
pub struct Sluice {
    process: Option<Proc>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Sluice {
    /// Starts `sluice run <args>` and waits until it says it is ready.
    pub fn run(pod: &Netns, args: &[&str]) -> Sluice {
        Sluice::launch(pod, &Launch::default(), args)
    }

    /// Like [`Sluice::run`], with sluice started through `wrapper` (a
    /// command and its arguments, e.g. `setpriv` to drop capabilities).
    pub fn run_wrapped(pod: &Netns, wrapper: &[&str], args: &[&str]) -> Sluice {
        let launch = Launch {
            wrapper,
            ..Launch::default()
        };
        Sluice::launch(pod, &launch, args)
    }

    pub fn launch(pod: &Netns, launch: &Launch<'_>, args: &[&str]) -> Sluice {
        let sluice = launch
            .program
            .unwrap_or(std::path::Path::new(env!("CARGO_BIN_EXE_sluice")));
        let mut command = match launch.wrapper.split_first() {
            Some((program, wrapper_args)) => {
                let mut command = Command::new(program);
                command.args(wrapper_args).arg(sluice);
                command
            }
            None => Command::new(sluice),
        };
        command
            .envs(launch.env.iter().copied())
            .arg("run")
            .args(args);
        // Two workers unless the test chose: the cross-worker paths run.
        if !args.contains(&"--workers") {
            command.args(["--workers", "2"]);
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut process = pod.spawn(&mut command).expect("spawn sluice in the pod ns");
        let stderr = process
            .child_mut()
            .stderr
            .take()
            .expect("sluice stderr is piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("sluice ready") {
                    let _ = ready_tx.send(());
                }
                lines.lock().unwrap().push(line);
            }
        });
        let sluice = Sluice {
            process: Some(process),
            log,
        };
        if ready_rx.recv_timeout(PATIENCE).is_err() {
            panic!("sluice did not become ready; its log:\n{}", sluice.log());
        }
        sluice
    }

    /// Sends `signal` (SIGTERM, SIGINT, ...) without waiting.
    pub fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.pid()).expect("pid fits i32");
        let signal = nix::sys::signal::Signal::try_from(signal).expect("a signal number");
        // The child is not reaped before `wait_exit`: the pid is still its.
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
            .unwrap_or_else(|error| panic!("kill({pid}, {signal}): {error}"));
    }

    /// Waits (bounded) for sluice to exit by itself.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let process = self.process.as_mut().expect("sluice still running");
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            if let Some(status) = process.try_wait().expect("wait for sluice") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "sluice did not exit; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.process.as_ref().map_or(0, Proc::pid)
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits (bounded) until a log line contains every one of `needles`.
    pub fn wait_for_log(&self, needles: &[&str]) -> String {
        let deadline = std::time::Instant::now() + PATIENCE;
        while std::time::Instant::now() < deadline {
            let found = self
                .log
                .lock()
                .unwrap()
                .iter()
                .find(|line| needles.iter().all(|n| line.contains(n)))
                .cloned();
            if let Some(line) = found {
                return line;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("no log line with {needles:?}; log:\n{}", self.log());
    }

    pub fn stop(mut self) -> String {
        if let Some(process) = self.process.take() {
            let status = process.stop().expect("stop sluice");
            assert!(
                status.success(),
                "sluice exited with {status}; log:\n{}",
                self.log()
            );
        }
        self.log()
    }
}

impl Drop for Sluice {
    fn drop(&mut self) {
        drop(self.process.take());
    }
}

/// Runs a `sluice` subcommand in `ns` to completion.
pub fn sluice_cli(ns: &Netns, args: &[&str]) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
    command.args(args);
    ns.output(&mut command).expect("run sluice")
}

/// A client socket made in the client namespace.
pub fn connect(client: &Netns, to: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = client.run(|| TcpStream::connect_timeout(&to, PATIENCE))?;
    stream.set_read_timeout(Some(PATIENCE))?;
    stream.set_write_timeout(Some(PATIENCE))?;
    Ok(stream)
}

/// A client socket made in the client namespace, from `from` (an address
/// and port of the client's; port 0: the kernel's choice).
pub fn connect_from(
    client: &Netns,
    from: SocketAddr,
    to: SocketAddr,
) -> std::io::Result<TcpStream> {
    let stream = client.run(|| {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(to),
            socket2::Type::STREAM,
            None,
        )?;
        socket.bind(&from.into())?;
        socket.connect_timeout(&to.into(), PATIENCE)?;
        std::io::Result::Ok(TcpStream::from(socket))
    })?;
    stream.set_read_timeout(Some(PATIENCE))?;
    stream.set_write_timeout(Some(PATIENCE))?;
    Ok(stream)
}

/// Sends a line and reads the echo back: the connection is alive.
pub fn echo_once(stream: &mut TcpStream, line: &[u8]) {
    echo_once_checked(stream, line).expect("echo");
}

pub fn echo_once_checked(stream: &mut TcpStream, line: &[u8]) -> std::io::Result<()> {
    stream.write_all(line)?;
    let mut back = vec![0u8; line.len()];
    stream.read_exact(&mut back)?;
    if back != line {
        return Err(std::io::Error::other(if back.len() <= 64 {
            format!("echoed {back:?}")
        } else {
            format!("the {}-byte echo differs", back.len())
        }));
    }
    Ok(())
}

/// Sends `payload`, half-closes, and returns everything received until the
/// peer closed.
pub fn exchange(mut stream: TcpStream, payload: Vec<u8>) -> Vec<u8> {
    let mut writer = stream.try_clone().expect("clone client stream");
    let sender = std::thread::spawn(move || {
        writer.write_all(&payload).expect("client write");
        writer.shutdown(Shutdown::Write).expect("client half-close");
    });
    let mut received = Vec::new();
    stream.read_to_end(&mut received).expect("client read");
    sender.join().expect("sender thread");
    received
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// A server on `ip` in `ns` that answers every connection with "served" and
/// closes: something for the pod to reach out to, or for a client to reach
/// on a port sluice does not intercept.
pub fn answering_server(ns: &Netns, ip: IpAddr) -> SocketAddr {
    let listener = ns
        .run(|| TcpListener::bind(SocketAddr::new(ip, 0)))
        .expect("bind the answering server");
    let addr = listener.local_addr().expect("local addr");
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let _ = stream.write_all(b"served");
        }
    });
    addr
}

/// `count` short connections to each of `targets` (an [`Behaviour::Echo`]
/// workload), a thread per target, the client closing first: it sends a
/// byte and half-closes, then reads the echo and the trailer. What failed.
pub fn clients_closing_first(client: &Netns, targets: &[SocketAddr], count: u32) -> Vec<String> {
    std::thread::scope(|scope| {
        let threads: Vec<_> = targets
            .iter()
            .map(|&to| {
                scope.spawn(move || {
                    let mut failures = Vec::new();
                    for _ in 0..count {
                        let outcome = connect(client, to).and_then(|mut stream| {
                            stream.write_all(b"x")?;
                            stream.shutdown(Shutdown::Write)?;
                            let mut reply = Vec::new();
                            stream.read_to_end(&mut reply)?;
                            Ok(reply)
                        });
                        match outcome {
                            Ok(reply) if reply == [b"x".as_slice(), TRAILER].concat() => {}
                            Ok(reply) => failures.push(format!("{to}: reply {reply:?}")),
                            Err(error) => failures.push(format!("{to}: {error}")),
                        }
                    }
                    failures
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|thread| thread.join().expect("client thread"))
            .collect()
    })
}

/// A short connection from the client's address and `source_port` (reused:
/// `SO_REUSEADDR`) to a [`Behaviour::ReplyAndClose`] or `ReplyOrHold`
/// workload at `to`: request, reply, and the workload closes first. Runs in
/// the calling thread's namespace (the client's).
pub fn short_connection(source_port: u16, to: SocketAddr) -> std::io::Result<()> {
    const SHORT: Duration = Duration::from_secs(5);
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&SocketAddr::new(netlab::ClientPod::CLIENT_V4.into(), source_port).into())?;
    socket.set_read_timeout(Some(SHORT))?;
    socket.connect_timeout(&to.into(), SHORT)?;
    let mut stream: TcpStream = socket.into();
    stream.write_all(REQUEST)?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply)?;
    if reply != REPLY {
        return Err(std::io::Error::other(format!("bad reply {reply:?}")));
    }
    Ok(())
}

/// Segments the kernel retransmitted on this connection (a SYN that got no
/// answer among them): `tcpi_total_retrans` from `TCP_INFO`.
pub fn retransmitted(stream: &TcpStream) -> u32 {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is plain integers, for which all zeroes is valid.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: TCP_INFO writes at most `len` bytes into `info`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            std::ptr::from_mut(&mut info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    info.tcpi_total_retrans
}

/// Fails with the count and the first few when any connection failed.
pub fn assert_none_failed(failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} failed, the first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}

/// Where `sluice run` serves its metrics by default.
pub const METRICS: u16 = 15020;

/// One HTTP/1.1 request on a fresh connection made in `ns`: (status, body).
pub fn request(
    ns: &Netns,
    method: &str,
    to: SocketAddr,
    path: &str,
) -> std::io::Result<(u16, String)> {
    let mut stream = ns.run(|| TcpStream::connect_timeout(&to, PATIENCE))?;
    stream.set_read_timeout(Some(PATIENCE))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of the response head: {response:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    Ok((status, body.to_string()))
}

pub fn get(ns: &Netns, to: SocketAddr, path: &str) -> (u16, String) {
    request(ns, "GET", to, path).unwrap_or_else(|e| panic!("GET {to}{path}: {e}"))
}

pub fn post(ns: &Netns, to: SocketAddr, path: &str) -> (u16, String) {
    request(ns, "POST", to, path).unwrap_or_else(|e| panic!("POST {to}{path}: {e}"))
}

/// The value of one sample (`name` with its labels, as exposed).
pub fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .unwrap_or_else(|| panic!("no sample {series} in:\n{metrics}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{series}: {e}"))
}

/// The Kubernetes manifests under deploy/, parsed: (file, documents).
pub fn manifests() -> Vec<(std::path::PathBuf, Vec<yaml_rust2::Yaml>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("deploy/ exists") {
        let path = entry.expect("deploy/ entry").path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            let text = std::fs::read_to_string(&path).expect("read manifest");
            let docs = yaml_rust2::YamlLoader::load_from_str(&text)
                .unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()));
            found.push((path, docs));
        }
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(!found.is_empty(), "no manifest in {}", dir.display());
    found
}

/// A YAML list of strings (empty when absent).
pub fn yaml_strings(yaml: &yaml_rust2::Yaml) -> Vec<String> {
    yaml.as_vec()
        .map(|v| {
            v.iter()
                .map(|s| s.as_str().expect("a string").to_string())
                .collect()
        })
        .unwrap_or_default()
}

pub fn is_sluice(container: &yaml_rust2::Yaml) -> bool {
    container["image"]
        .as_str()
        .is_some_and(|image| image.contains("sluice"))
}

/// What the image's sluice binary must carry (the manifests say so): the
/// capabilities of every mode, permitted only; sluice raises what the pod
/// grants.
pub const IMAGE_FILE_CAPS: &str = "cap_net_admin,cap_net_raw,cap_bpf+p";

/// The capabilities the manifest of `mode` grants its sluice sidecar
/// (`NET_ADMIN`, ...). Redirect has no manifest: it needs what tproxy's
/// grants (iptables, policy routing).
pub fn manifest_capabilities(mode: &str) -> Vec<String> {
    let mode = if mode == "redirect" { "tproxy" } else { mode };
    let mut found = Vec::new();
    for (_, docs) in manifests() {
        for doc in docs
            .iter()
            .filter(|d| d["kind"].as_str() == Some("Deployment"))
        {
            let spec = &doc["spec"]["template"]["spec"];
            for container in spec["initContainers"].as_vec().into_iter().flatten() {
                let args = yaml_strings(&container["args"]);
                let sidecar = container["restartPolicy"].as_str() == Some("Always");
                let this_mode = args.windows(2).any(|w| w[0] == "--mode" && w[1] == mode);
                if is_sluice(container) && sidecar && this_mode {
                    found.push(yaml_strings(
                        &container["securityContext"]["capabilities"]["add"],
                    ));
                }
            }
        }
    }
    assert_eq!(found.len(), 1, "one {mode} sidecar in deploy/: {found:?}");
    found.remove(0)
}

/// A private BPF filesystem, unmounted (with whatever is pinned in it) on
/// drop, so a test's pins never land in the machine's /sys/fs/bpf.
pub struct BpfFs {
    dir: std::path::PathBuf,
}

impl BpfFs {
    pub fn mount() -> BpfFs {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("sluice-bpffs-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mount point");
        nix::mount::mount(
            Some("bpf"),
            &dir,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .expect("mount a BPF filesystem");
        BpfFs { dir }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.dir
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        if let Err(e) = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH) {
            eprintln!("unmounting {}: {e}", self.dir.display());
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}
