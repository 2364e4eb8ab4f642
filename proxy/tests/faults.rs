//! What a pod meets in real life, on the real kernel: the defaults (no
//! flags), a workload that does not answer, termination (SIGTERM and the
//! drain), the descriptor limit, restarts, a panicking worker. Each fault is
//! made with real kernel means: rules that drop, signals, rlimits.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use netlab::{ClientPod, Netns};

const PORT: u16 = 9080;

fn iptables(ns: &Netns, tool: &str, args: &[&str]) {
    let output = ns
        .output(std::process::Command::new(tool).args(args))
        .expect("run iptables");
    assert!(
        output.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Reads until end of stream or error; the error kind, if any.
fn read_until_end(stream: &mut TcpStream) -> Result<usize, ErrorKind> {
    let mut total = 0;
    let mut buffer = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n,
            Err(error) => return Err(error.kind()),
        }
    }
}

/// `sluice run` with no interception flag at all: every port (`*`). Inbound
/// connections go through sluice; the workload's own outbound connections
/// and connections inside the pod (127.0.0.1, the pod's own address) are
/// left alone; TPROXY and eBPF make no conntrack entry.
fn default_ports_star(mode: &str, install_rules: bool, conntrack_free: bool) {
    let topology = ClientPod::new(&format!("star{mode}")).expect("topology");
    let workload = Workload::start(&topology.pod, PORT, Behaviour::Echo, 2);
    let mut args = vec!["--mode", mode];
    if install_rules {
        args.push("--install-rules");
    }
    let sluice = Sluice::run(&topology.pod, &args);

    for to in [pod_v4(PORT), pod_v6(PORT)] {
        let stream = connect(&topology.client, to).expect("connect through sluice");
        assert_eq!(
            exchange(stream, b"inbound".to_vec()),
            [b"inbound".as_slice(), TRAILER].concat()
        );
    }
    assert_eq!(workload.via_sluice.load(Ordering::SeqCst), 2);

    // The workload's own outbound connections (their replies must not be
    // caught by the catch-all interception), and connections over the pod's
    // loopback.
    let outside_v4 = answering_server(&topology.client, ClientPod::CLIENT_V4.into());
    let outside_v6 = answering_server(&topology.client, ClientPod::CLIENT_V6.into());
    let loopback = answering_server(&topology.pod, IpAddr::from([127, 0, 0, 1]));
    for to in [outside_v4, outside_v6, loopback] {
        let mut reply = String::new();
        topology
            .pod
            .run(|| {
                let mut stream = TcpStream::connect_timeout(&to, PATIENCE)?;
                stream.set_read_timeout(Some(PATIENCE))?;
                stream.read_to_string(&mut reply)
            })
            .unwrap_or_else(|e| panic!("connection from the pod to {to}: {e}"));
        assert_eq!(reply, "served", "from the pod to {to}");
    }

    // Inside the pod, to the pod's own addresses.
    for to in [pod_v4(PORT), pod_v6(PORT)] {
        let stream = topology
            .pod
            .run(|| TcpStream::connect_timeout(&to, PATIENCE))
            .expect("connect inside the pod");
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        assert_eq!(
            exchange(stream, b"local".to_vec()),
            [b"local".as_slice(), TRAILER].concat()
        );
    }
    assert_eq!(
        workload.direct.load(Ordering::SeqCst),
        2,
        "connections inside the pod must not go through sluice"
    );
    assert_eq!(workload.via_sluice.load(Ordering::SeqCst), 2);
    if conntrack_free {
        assert_eq!(conntrack_count(&topology.pod), 0);
    }
    sluice.stop();
}

#[test]
fn default_ports_star_tproxy() {
    default_ports_star("tproxy", true, true);
}

#[test]
fn default_ports_star_redirect() {
    default_ports_star("redirect", true, false);
}

#[test]
fn default_ports_star_ebpf() {
    default_ports_star("ebpf", false, true);
}

/// The workload's port black-holes SYNs (a rule in the pod drops sluice's
/// SYN): the client's connection is reset once the connect timeout expires,
/// instead of staying open and silent for minutes.
#[test]
fn black_holed_upstream_is_reset_within_the_connect_timeout() {
    const TIMEOUT: Duration = Duration::from_secs(2);
    let topology = ClientPod::new("blackhole").expect("topology");
    let _workload = Workload::start(&topology.pod, PORT, Behaviour::Echo, 1);
    let _sluice = Sluice::run(
        &topology.pod,
        &[
            "--ports",
            "9080",
            "--install-rules",
            "--connect-timeout",
            "2s",
        ],
    );
    // sluice's upstream leg arrives on lo; the client's SYN on the veth.
    for tool in ["iptables", "ip6tables"] {
        iptables(
            &topology.pod,
            tool,
            &[
                "-I", "INPUT", "-i", "lo", "-p", "tcp", "--dport", "9080", "--syn", "-j", "DROP",
            ],
        );
    }
    let started = Instant::now();
    let mut stream = connect(&topology.client, pod_v4(PORT)).expect("sluice accepts");
    stream.write_all(b"anyone there?").expect("write");
    let outcome = read_until_end(&mut stream);
    let elapsed = started.elapsed();
    assert_eq!(outcome, Err(ErrorKind::ConnectionReset));
    eprintln!("black-holed connection reset after {elapsed:?}");
    assert!(
        elapsed < TIMEOUT + Duration::from_secs(1),
        "reset after {elapsed:?}, beyond the connect timeout ({TIMEOUT:?}) plus a second"
    );
    assert!(
        elapsed >= TIMEOUT,
        "reset after {elapsed:?}, before the timeout"
    );
}

/// Waits (bounded) until the workload has seen `n` resets.
fn await_resets(workload: &Workload, n: u64) {
    let deadline = Instant::now() + PATIENCE;
    while workload.resets.load(Ordering::SeqCst) < n {
        assert!(
            Instant::now() < deadline,
            "the workload saw {} resets, expected {n}",
            workload.resets.load(Ordering::SeqCst)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A connection that moves no byte for the idle timeout is reset on both
/// sides: an open one, and a half-closed one.
#[test]
fn idle_connections_are_reset_after_the_idle_timeout() {
    let topology = ClientPod::new("idle").expect("topology");
    let echo = Workload::start(&topology.pod, PORT, Behaviour::Echo, 1);
    let greeter = Workload::start(&topology.pod, 9081, Behaviour::GreetThenDrain, 1);
    let _sluice = Sluice::run(
        &topology.pod,
        &[
            "--ports",
            "9080,9081",
            "--install-rules",
            "--idle-timeout",
            "1s",
        ],
    );
    let mut open = connect(&topology.client, pod_v4(PORT)).expect("connect");
    echo_once(&mut open, b"then silence");
    // The workload greets and half-closes; the client then says nothing.
    let mut half_closed = connect(&topology.client, pod_v4(9081)).expect("connect");
    let mut greeting = vec![0u8; GREETING.len()];
    half_closed.read_exact(&mut greeting).expect("greeting");

    let started = Instant::now();
    assert_eq!(read_until_end(&mut open), Err(ErrorKind::ConnectionReset));
    let after = started.elapsed();
    eprintln!("idle connection reset after {after:?}");
    // Not before the timeout; after it by at most the sweep's eighth of it
    // and its tick, with room for a loaded machine.
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(3)).contains(&after),
        "reset after {after:?} of silence, for --idle-timeout 1s"
    );
    await_resets(&echo, 1);
    await_resets(&greeter, 1);
}

/// A reader that is slow but moving is not idle, whatever the forwarder:
/// for seconds, no byte arrives at sluice's sockets (every buffer on the
/// way is full), yet bytes leave them as the client reads, a little at a
/// time. The download must outlive `--idle-timeout 1s`, whole.
fn slow_reader_is_not_idle(forwarder: &[&str]) {
    const LEN: usize = 32 << 20;
    let topology = ClientPod::new(&format!("slow{}", forwarder[1])).expect("topology");
    let _workload = Workload::start(&topology.pod, PORT, Behaviour::Download(LEN), 1);
    let mut args = vec!["--ports", "9080", "--install-rules", "--idle-timeout", "1s"];
    args.extend(forwarder);
    let sluice = Sluice::run(&topology.pod, &args);
    // Made before the connection: making them takes a debug build over a
    // second, an idle second the timeout would rightly end.
    let expected = download_bytes(LEN);
    let mut stream = connect(&topology.client, pod_v4(PORT)).expect("connect");
    let mut received = Vec::with_capacity(LEN);
    let mut buffer = vec![0u8; 64 * 1024];
    // 4 KiB every 100 ms for 4 s: four idle timeouts of a trickle.
    let slow_until = Instant::now() + Duration::from_secs(4);
    loop {
        let slow = Instant::now() < slow_until;
        let want = if slow { 4 * 1024 } else { buffer.len() };
        let n = match stream.read(&mut buffer[..want]) {
            Ok(n) => n,
            Err(error) => panic!(
                "the download failed after {} bytes: {error}\n{}",
                received.len(),
                sluice.log()
            ),
        };
        if n == 0 {
            break;
        }
        received.extend_from_slice(&buffer[..n]);
        if slow {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    assert_eq!(received.len(), LEN);
    assert!(received == *expected, "bytes differ");
}

#[test]
fn a_slow_reader_outlives_the_idle_timeout_copy() {
    slow_reader_is_not_idle(&["--forward", "copy"]);
}

#[test]
fn a_slow_reader_outlives_the_idle_timeout_sockmap_joined() {
    slow_reader_is_not_idle(&["--forward", "sockmap", "--sockmap-after", "0"]);
}

/// SIGTERM while a large download goes to a slow reader: the client gets
/// every byte and a clean end of stream, and sluice exits 0 after it.
fn sigterm_during_download(mode: &str, forwarder: &str) {
    const LEN: usize = 32 << 20;
    let topology = ClientPod::new(&format!("dl{mode}{forwarder}")).expect("topology");
    let _workload = Workload::start(&topology.pod, PORT, Behaviour::Download(LEN), 1);
    let mut args = vec![
        "--mode",
        mode,
        "--forward",
        forwarder,
        "--drain-timeout",
        "60s",
    ];
    args.extend(["--ports", "9080"]);
    if mode != "ebpf" {
        args.push("--install-rules");
    }
    let mut sluice = Sluice::run(&topology.pod, &args);
    let mut stream = connect(&topology.client, pod_v4(PORT)).expect("connect");
    let mut received = Vec::with_capacity(LEN);
    let mut buffer = vec![0u8; 64 * 1024];
    let mut signalled = false;
    loop {
        let n = stream
            .read(&mut buffer)
            .expect("the download must not fail");
        if n == 0 {
            break;
        }
        received.extend_from_slice(&buffer[..n]);
        if !signalled && received.len() >= 1 << 20 {
            sluice.signal(libc::SIGTERM);
            signalled = true;
        }
        // A slow reader: the download outlasts the signal by seconds.
        std::thread::sleep(Duration::from_millis(2));
    }
    eprintln!(
        "{mode}/{forwarder}: received {} of {LEN} bytes",
        received.len()
    );
    assert_eq!(received.len(), LEN);
    assert!(received == *download_bytes(LEN), "bytes differ");
    drop(stream);
    let status = sluice.wait_exit();
    assert!(
        status.success(),
        "sluice exited with {status}:\n{}",
        sluice.log()
    );
    assert!(sluice.log().contains("drained"), "{}", sluice.log());
}

#[test]
fn sigterm_during_a_download_tproxy_copy() {
    sigterm_during_download("tproxy", "copy");
}

#[test]
fn sigterm_during_a_download_ebpf_sockmap() {
    sigterm_during_download("ebpf", "sockmap");
}

#[test]
fn sigterm_during_a_download_redirect_splice() {
    sigterm_during_download("redirect", "splice");
}

/// A connection still open at the drain deadline is reset on both sides,
/// not ended with a FIN; sluice still exits 0.
fn open_at_the_drain_deadline(mode: &str) {
    let topology = ClientPod::new(&format!("dd{mode}")).expect("topology");
    let workload = Workload::start(&topology.pod, PORT, Behaviour::Echo, 1);
    let mut args = vec!["--mode", mode, "--ports", "9080", "--drain-timeout", "1s"];
    if mode != "ebpf" {
        args.push("--install-rules");
    }
    let mut sluice = Sluice::run(&topology.pod, &args);
    let mut stream = connect(&topology.client, pod_v4(PORT)).expect("connect");
    echo_once(&mut stream, b"still talking");
    sluice.signal(libc::SIGTERM);
    let status = sluice.wait_exit();
    assert!(
        status.success(),
        "sluice exited with {status}:\n{}",
        sluice.log()
    );
    assert_eq!(
        read_until_end(&mut stream),
        Err(ErrorKind::ConnectionReset),
        "the client saw a FIN, not a reset"
    );
    await_resets(&workload, 1);
    assert!(sluice.log().contains("drain timeout"), "{}", sluice.log());
}

#[test]
fn open_at_the_drain_deadline_is_reset_tproxy() {
    open_at_the_drain_deadline("tproxy");
}

#[test]
fn open_at_the_drain_deadline_is_reset_ebpf() {
    open_at_the_drain_deadline("ebpf");
}

/// During the drain, new connections are refused with a reset and none
/// reaches the workload around sluice; the one in flight still works.
fn new_connections_during_the_drain(mode: &str) {
    let topology = ClientPod::new(&format!("dn{mode}")).expect("topology");
    let workload = Workload::start(&topology.pod, PORT, Behaviour::Echo, 2);
    let mut args = vec!["--mode", mode, "--drain-timeout", "20s"];
    if mode != "ebpf" {
        args.push("--install-rules");
    }
    let mut sluice = Sluice::run(&topology.pod, &args);
    let mut in_flight = connect(&topology.client, pod_v4(PORT)).expect("connect");
    echo_once(&mut in_flight, b"before");
    sluice.signal(libc::SIGTERM);
    sluice.wait_for_log(&["draining"]);
    for to in [pod_v4(PORT), pod_v6(PORT)] {
        let outcome = connect(&topology.client, to).and_then(|mut stream| {
            stream.write_all(b"new")?;
            let mut byte = [0u8; 1];
            stream.read(&mut byte)
        });
        assert_eq!(
            outcome.map_err(|e| e.kind()),
            Err(ErrorKind::ConnectionReset),
            "a new connection during the drain was not refused"
        );
    }
    echo_once(&mut in_flight, b"during the drain");
    assert_eq!(workload.direct.load(Ordering::SeqCst), 0);
    assert_eq!(workload.via_sluice.load(Ordering::SeqCst), 1);
    drop(in_flight);
    let status = sluice.wait_exit();
    assert!(
        status.success(),
        "sluice exited with {status}:\n{}",
        sluice.log()
    );
    sluice.wait_for_log(&["drained"]);
}

#[test]
fn new_connections_during_the_drain_are_refused_tproxy() {
    new_connections_during_the_drain("tproxy");
}

#[test]
fn new_connections_during_the_drain_are_refused_redirect() {
    new_connections_during_the_drain("redirect");
}

#[test]
fn new_connections_during_the_drain_are_refused_ebpf() {
    new_connections_during_the_drain("ebpf");
}

/// Under `prlimit --nofile=256`, more connections than fit: the surplus is
/// reset, sluice stays up, and serves the next connection once they close.
#[test]
fn descriptor_limit_resets_the_surplus_and_sluice_goes_on() {
    const HELD: usize = 200;
    let topology = ClientPod::new("nofile").expect("topology");
    let workload = Workload::start(&topology.pod, PORT, Behaviour::Echo, 1);
    let launch = Launch {
        wrapper: &["prlimit", "--nofile=256:256", "--"],
        ..Launch::default()
    };
    let sluice = Sluice::launch(
        &topology.pod,
        &launch,
        &["--ports", "9080", "--install-rules"],
    );
    let line = sluice.wait_for_log(&["sluice ready"]);
    assert!(line.contains("max_connections="), "{line}");

    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..HELD {
        let outcome = connect(&topology.client, pod_v4(PORT)).and_then(|mut stream| {
            echo_once_checked(&mut stream, b"hi")?;
            Ok(stream)
        });
        match outcome {
            Ok(stream) => held.push(stream),
            Err(error) => {
                assert!(
                    matches!(
                        error.kind(),
                        ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof
                    ),
                    "{error} after {} held; sluice's log:\n{}",
                    held.len(),
                    sluice.log()
                );
                refused += 1;
            }
        }
    }
    eprintln!(
        "{} held, {refused} refused under a limit of 256 descriptors",
        held.len()
    );
    assert!(refused > 0, "all {HELD} fit: the limit was not reached");
    assert!(
        held.len() >= 50,
        "only {} connections were served",
        held.len()
    );
    drop(held);
    // sluice frees their places as it sees them close, a moment later.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let outcome = connect(&topology.client, pod_v4(PORT)).and_then(|mut stream| {
            echo_once_checked(&mut stream, b"after")?;
            Ok(stream)
        });
        match outcome {
            Ok(_) => break,
            Err(error) => assert!(
                Instant::now() < deadline,
                "no connection served after the others closed: {error}"
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(workload.via_sluice.load(Ordering::SeqCst) > 50);
    assert!(sluice.log().contains("refused"), "{}", sluice.log());
    sluice.stop();
}

/// Stop and start again at once, five times: every start succeeds.
fn restarts(mode: &str) {
    let topology = ClientPod::new(&format!("rs{mode}")).expect("topology");
    let workload = Workload::start(&topology.pod, PORT, Behaviour::Echo, 1);
    let mut args = vec!["--mode", mode, "--ports", "9080"];
    if mode != "ebpf" {
        args.push("--install-rules");
    }
    for round in 0..5u64 {
        let sluice = Sluice::run(&topology.pod, &args);
        let stream = connect(&topology.client, pod_v4(PORT)).expect("connect");
        assert_eq!(
            exchange(stream, b"again".to_vec()),
            [b"again".as_slice(), TRAILER].concat()
        );
        sluice.stop();
        assert_eq!(workload.via_sluice.load(Ordering::SeqCst), round + 1);
    }
}

#[test]
fn five_restarts_in_a_row_tproxy() {
    restarts("tproxy");
}

#[test]
fn five_restarts_in_a_row_redirect() {
    restarts("redirect");
}

#[test]
fn five_restarts_in_a_row_ebpf() {
    restarts("ebpf");
}

/// A worker that panics takes the process down, non-zero, and the rules
/// sluice installed go with it. (Only a debug build, which `cargo test`
/// makes, reads the hook.)
#[cfg(debug_assertions)]
#[test]
fn a_panicking_worker_takes_the_process_down_and_removes_the_rules() {
    let topology = ClientPod::new("panic").expect("topology");
    let _workload = Workload::start(&topology.pod, PORT, Behaviour::Echo, 1);
    let launch = Launch {
        env: &[(sluice::server::PANIC_AFTER_ENV, "1")],
        ..Launch::default()
    };
    let mut sluice = Sluice::launch(
        &topology.pod,
        &launch,
        &["--ports", "9080", "--install-rules"],
    );
    let _ = connect(&topology.client, pod_v4(PORT));
    let status = sluice.wait_exit();
    assert!(!status.success(), "sluice exited 0 after a worker panicked");
    assert!(sluice.log().contains("panicked"), "{}", sluice.log());
    let saved = topology
        .pod
        .output(&mut std::process::Command::new("iptables-save"))
        .expect("iptables-save");
    let saved = String::from_utf8_lossy(&saved.stdout);
    assert!(!saved.contains("SLUICE"), "rules left behind:\n{saved}");
}

/// A sustained IPv6 connection rate through sluice, the clients closing
/// first, so that sluice's upstream leg (from ::6) closes first and keeps
/// the TIME_WAIT: more connections than the pod's port range holds, and not
/// one fails. IPv4's 127.0.0.6 is loopback, whose TIME_WAITs the kernel
/// reuses anyway; ::6 is not.
#[test]
fn ipv6_connection_rate_outlasts_the_port_range() {
    const PORTS: u32 = 1000;
    const CONNECTIONS: u32 = 3 * PORTS;
    const CLIENTS: u32 = 4;
    let topology = ClientPod::new("v6rate").expect("topology");
    topology
        .pod
        .sysctl_set("net.ipv4.ip_local_port_range", "40000 40999")
        .expect("narrow the pod's port range");
    let workload = Workload::start(&topology.pod, PORT, Behaviour::Echo, 4);
    let _sluice = Sluice::run(&topology.pod, &["--ports", "9080", "--install-rules"]);
    let started = Instant::now();
    let targets = [pod_v6(PORT); CLIENTS as usize];
    let failures = clients_closing_first(&topology.client, &targets, CONNECTIONS / CLIENTS);
    eprintln!(
        "{CONNECTIONS} IPv6 connections through a port range of {PORTS} in {:?}",
        started.elapsed()
    );
    assert_none_failed(&failures);
    assert_eq!(
        workload.via_sluice.load(Ordering::SeqCst),
        u64::from(CONNECTIONS)
    );
}

/// An IPv4-only pod (IPv6 disabled in its namespace): sluice runs v4-only,
/// says so, installs what IPv4 needs (`rules show` agrees), and forwards.
fn ipv4_only_pod(mode: &str) {
    let topology = ClientPod::new(&format!("v4only{mode}")).expect("topology");
    for key in [
        "net.ipv6.conf.all.disable_ipv6",
        "net.ipv6.conf.default.disable_ipv6",
    ] {
        topology
            .pod
            .sysctl_set(key, "1")
            .expect("disable IPv6 in the pod");
    }
    let workload = Workload::start_v4(&topology.pod, PORT, Behaviour::Echo, 1);
    let mut args = vec!["--mode", mode];
    if mode != "ebpf" {
        args.push("--install-rules");
    }
    let sluice = Sluice::run(&topology.pod, &args);
    let ready = sluice.wait_for_log(&["sluice ready"]);
    assert!(ready.contains("IPv6 disabled"), "{ready}");
    let stream = connect(&topology.client, pod_v4(PORT)).expect("connect through sluice");
    assert_eq!(
        exchange(stream, b"v4 only".to_vec()),
        [b"v4 only".as_slice(), TRAILER].concat()
    );
    assert_eq!(workload.via_sluice.load(Ordering::SeqCst), 1);
    if mode != "ebpf" {
        let shown = sluice_cli(&topology.pod, &["rules", "show", "--mode", mode]);
        let text = String::from_utf8_lossy(&shown.stdout);
        assert!(shown.status.success(), "{text}");
        assert!(text.contains("IPv4 only"), "{text}");
    }
    sluice.stop();
}

#[test]
fn ipv4_only_pod_tproxy() {
    ipv4_only_pod("tproxy");
}

#[test]
fn ipv4_only_pod_ebpf() {
    ipv4_only_pod("ebpf");
}

/// 256 KiB pipes, as the splice forwarder asks, beyond what
/// `fs.pipe-user-pages-soft` lets a user without CAP_SYS_RESOURCE have
/// (16384 pages: 256 such pipes): the kernel then refuses the size (EPERM),
/// and the pipe must still be made, at its default size, rather than fail
/// (which would reset the connection). Run as an unprivileged user, in a
/// process of its own: the test binary runs its ignored half below.
#[test]
fn splice_pipes_beyond_the_user_limit_fall_back_to_the_default_size() {
    let exe = std::env::current_exe().expect("the test binary");
    let output = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["--inh-caps=-all", "--bounding-set=-all", "--"])
        .arg(exe)
        .args(["--exact", "unprivileged_pipes", "--ignored", "--nocapture"])
        .env("SLUICE_UNPRIVILEGED_PIPES", "1")
        .output()
        .expect("run setpriv");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("pipes at the default size"), "{stdout}");
}

#[test]
#[ignore = "the unprivileged half of splice_pipes_beyond_the_user_limit_fall_back_to_the_default_size"]
fn unprivileged_pipes() {
    const SIZE: usize = 256 * 1024;
    assert!(
        std::env::var_os("SLUICE_UNPRIVILEGED_PIPES").is_some(),
        "run by its parent test only"
    );
    let pipes: Vec<sluice::linux::Pipe> = (0..400)
        .map(|i| sluice::linux::Pipe::new(SIZE).unwrap_or_else(|e| panic!("pipe {i}: {e}")))
        .collect();
    let small = pipes.iter().filter(|p| p.capacity() < SIZE).count();
    println!("400 pipes made, {small} pipes at the default size");
    assert!(small > 0, "the user limit was never reached");
    assert!(pipes.iter().all(|p| p.capacity() >= 4096));
}
