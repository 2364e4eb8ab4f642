//! End to end, on the real kernel, for every interception mode: a client
//! namespace connects to a workload in a pod namespace, the rules installed
//! by `sluice run --install-rules` catch the connection, and sluice forwards
//! it. The suite is the same for each mode; only the conntrack expectation
//! differs (TPROXY: none; REDIRECT: one entry per connection).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use netlab::ClientPod;

const PORT: u16 = 9080;
const OTHER_PORT: u16 = 9081;

/// What a mode does to the pod's conntrack table.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Conntrack {
    /// Not one entry, ever: the point of TPROXY.
    None,
    /// An entry per intercepted connection: NAT needs it.
    PerConnection,
}

fn start(mode: &str, topology: &ClientPod, ports: &str) -> Sluice {
    Sluice::run(
        &topology.pod,
        &["--mode", mode, "--ports", ports, "--install-rules"],
    )
}

fn assert_conntrack(topology: &ClientPod, expected: Conntrack) {
    let count = conntrack_count(&topology.pod);
    match expected {
        Conntrack::None => assert_eq!(count, 0, "this mode must not create conntrack entries"),
        Conntrack::PerConnection => assert!(
            count > 0,
            "REDIRECT works through conntrack, yet the count is 0"
        ),
    }
}

fn echo_through_sluice(mode: &str, conntrack: Conntrack, to: fn(u16) -> SocketAddr, purpose: &str) {
    let topology = ClientPod::new(purpose).expect("topology");
    let workload = Workload::start(&topology.pod, PORT, Behaviour::Echo, 1);
    let other = Workload::start(&topology.pod, OTHER_PORT, Behaviour::Echo, 1);
    let sluice = start(mode, &topology, "9080,9081");

    let payload = random_bytes(1 << 20, 7);
    let stream = connect(&topology.client, to(PORT)).expect("connect through sluice");
    // Checked while the connection is open: REDIRECT's entry exists now.
    assert_conntrack(&topology, conntrack);
    let received = exchange(stream, payload.clone());

    let (echoed, trailer) = received.split_at(received.len().min(payload.len()));
    assert!(
        echoed == payload.as_slice(),
        "echo differs from the payload ({} bytes back)",
        received.len()
    );
    assert_eq!(
        trailer, TRAILER,
        "the reply after the half-close is missing"
    );
    assert_eq!(
        workload.via_sluice.load(Ordering::SeqCst),
        1,
        "the workload did not see sluice's bypass source"
    );
    assert_eq!(workload.direct.load(Ordering::SeqCst), 0);

    // The original destination is recovered, not guessed: the other port's
    // workload gets the connection made to it.
    let stream = connect(&topology.client, to(OTHER_PORT)).expect("connect to the other port");
    assert_eq!(
        exchange(stream, b"other".to_vec()),
        [b"other".as_slice(), TRAILER].concat()
    );
    assert_eq!(other.via_sluice.load(Ordering::SeqCst), 1);
    assert_eq!(workload.connections(), 1);
    assert_conntrack(&topology, conntrack);
    sluice.stop();
}

fn half_close_keeps_the_other_direction_flowing(mode: &str, conntrack: Conntrack, purpose: &str) {
    let topology = ClientPod::new(purpose).expect("topology");
    let _workload = Workload::start(&topology.pod, PORT, Behaviour::Echo, 1);
    let _sluice = start(mode, &topology, "9080");

    let mut stream = connect(&topology.client, pod_v4(PORT)).expect("connect");
    stream.write_all(b"request").expect("write");
    stream
        .shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    // The workload only sends its trailer after it saw our FIN: receiving it
    // proves the FIN was passed on while the reply direction stayed open.
    let mut reply = Vec::new();
    stream
        .read_to_end(&mut reply)
        .expect("read after half-close");
    assert_eq!(reply, [b"request".as_slice(), TRAILER].concat());
    assert_conntrack(&topology, conntrack);
}

/// Many short connections from a handful of client ports, the server closing
/// first: 4-tuples come back while sluice's side of the previous connection
/// is in TIME_WAIT. Every connection must succeed and pass through sluice.
fn burst_of_connections_reusing_ports(mode: &str, conntrack: Conntrack, purpose: &str) {
    const CONNECTIONS: u64 = 20_000;
    const THREADS: u16 = 8;
    const PORTS_PER_THREAD: u16 = 4;
    let topology = ClientPod::new(purpose).expect("topology");
    let workload = Workload::start(&topology.pod, PORT, Behaviour::ReplyAndClose, 4);
    let sluice = start(mode, &topology, "9080");

    // The whole burst is bounded: a broken interception tends to hang
    // connections rather than fail them, and that must fail the test, not
    // stall it.
    let deadline = Instant::now() + Duration::from_secs(120);
    let done = AtomicU64::new(0);
    let failures = std::sync::Mutex::new(Vec::<String>::new());
    topology.client.run(|| {
        std::thread::scope(|scope| {
            for thread in 0..THREADS {
                let (done, failures) = (&done, &failures);
                scope.spawn(move || {
                    let ports: Vec<u16> = (0..PORTS_PER_THREAD)
                        .map(|i| 40_000 + thread * PORTS_PER_THREAD + i)
                        .collect();
                    let mut next = 0usize;
                    while done.fetch_add(1, Ordering::SeqCst) < CONNECTIONS {
                        if Instant::now() > deadline {
                            failures
                                .lock()
                                .unwrap()
                                .push("the burst ran out of time".into());
                            return;
                        }
                        // A port whose last connection is still closing on
                        // this side cannot connect again yet: take the next.
                        let outcome = loop {
                            let port = ports[next % ports.len()];
                            next += 1;
                            match short_connection(port, pod_v4(PORT)) {
                                Err(e) if e.kind() == ErrorKind::AddrNotAvailable => continue,
                                Err(e) if e.kind() == ErrorKind::AddrInUse => continue,
                                other => break other,
                            }
                        };
                        if let Err(error) = outcome {
                            failures.lock().unwrap().push(error.to_string());
                        }
                    }
                });
            }
        });
    });

    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} connections failed, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(
        workload.direct.load(Ordering::SeqCst),
        0,
        "connections reached the workload without sluice (peers {:?})",
        workload
            .peers
            .lock()
            .unwrap()
            .iter()
            .take(5)
            .collect::<Vec<_>>()
    );
    assert_eq!(workload.via_sluice.load(Ordering::SeqCst), CONNECTIONS);
    assert_conntrack(&topology, conntrack);
    sluice.stop();
}

fn closed_workload_port_resets_the_client_and_sluice_goes_on(mode: &str, purpose: &str) {
    let topology = ClientPod::new(purpose).expect("topology");
    let workload = Workload::start(&topology.pod, PORT, Behaviour::Echo, 1);
    let _sluice = start(mode, &topology, "9080,9081");

    // Nothing listens on 9081: sluice accepted, its upstream connect is
    // refused, and the client must see a reset rather than hang. The reset
    // may land before connect() returns, or on the first read.
    let outcome = connect_then_read(&topology.client, pod_v4(9081));
    let error = outcome.expect_err("a closed port must not answer");
    assert_eq!(error.kind(), ErrorKind::ConnectionReset, "{error}");

    let stream = connect(&topology.client, pod_v4(PORT)).expect("next connection");
    assert_eq!(
        exchange(stream, b"still here".to_vec()),
        [b"still here".as_slice(), TRAILER].concat()
    );
    assert_eq!(workload.via_sluice.load(Ordering::SeqCst), 1);
}

/// TPROXY takes only the pod's own addresses (`addrtype LOCAL`): a
/// connection to an address the pod does not own, routed to the pod, never
/// reaches sluice, so sluice cannot relay it anywhere. (REDIRECT rewrites
/// the destination to a local one by construction; sk_lookup only sees
/// locally delivered packets.)
#[test]
fn tproxy_destination_that_is_not_local_is_not_intercepted() {
    let topology = ClientPod::new("relay").expect("topology");
    let workload = Workload::start(&topology.pod, PORT, Behaviour::Echo, 1);
    let sluice = start("tproxy", &topology, "9080");
    let elsewhere = Ipv4Addr::new(198, 18, 1, 99);
    topology
        .client
        .add_route(
            IpAddr::V4(Ipv4Addr::new(198, 18, 1, 0)),
            24,
            ClientPod::POD_V4.into(),
        )
        .expect("route to the pod");

    let outcome = topology.client.run(|| {
        TcpStream::connect_timeout(
            &SocketAddr::new(elsewhere.into(), PORT),
            Duration::from_secs(2),
        )
    });
    // Dropped (a timeout), or refused by the pod's routing with an ICMP
    // unreachable (whether the kernel sends one depends on its ICMP rate
    // limit): never connected.
    let refused = outcome.map(drop).map_err(|e| e.kind());
    assert!(
        matches!(
            refused,
            Err(ErrorKind::TimedOut | ErrorKind::NetworkUnreachable | ErrorKind::HostUnreachable)
        ),
        "the pod does not forward, and sluice must not answer for a foreign address: {refused:?}"
    );
    assert_eq!(workload.connections(), 0);
    // The interception still works for the pod's own address.
    let stream = connect(&topology.client, pod_v4(PORT)).expect("connect");
    assert_eq!(
        exchange(stream, b"local".to_vec()),
        [b"local".as_slice(), TRAILER].concat()
    );
    assert_eq!(workload.via_sluice.load(Ordering::SeqCst), 1);
    sluice.stop();
}

fn rules_without_sluice_block_and_removal_restores_direct_access(mode: &str, purpose: &str) {
    let topology = ClientPod::new(purpose).expect("topology");
    let workload = Workload::start(&topology.pod, PORT, Behaviour::Echo, 1);
    let installed = sluice_cli(
        &topology.pod,
        &["rules", "install", "--mode", mode, "--ports", "9080"],
    );
    assert!(
        installed.status.success(),
        "{}",
        String::from_utf8_lossy(&installed.stderr)
    );

    // Interception proven: with nothing on the proxy port, the connection
    // cannot reach the workload even though the workload listens.
    // TPROXY drops a SYN when no socket is on the proxy port; REDIRECT
    // sends it to the closed proxy port, which resets it.
    let outcome = topology
        .client
        .run(|| TcpStream::connect_timeout(&pod_v4(PORT), Duration::from_secs(2)));
    assert!(
        outcome.is_err(),
        "connection reached the workload despite the rules"
    );
    assert_eq!(workload.connections(), 0);

    let removed = sluice_cli(&topology.pod, &["rules", "remove"]);
    assert!(
        removed.status.success(),
        "{}",
        String::from_utf8_lossy(&removed.stderr)
    );
    let stream = connect(&topology.client, pod_v4(PORT)).expect("direct connection");
    assert_eq!(
        exchange(stream, b"direct".to_vec()),
        [b"direct".as_slice(), TRAILER].concat()
    );
    assert_eq!(workload.direct.load(Ordering::SeqCst), 1);
    assert_eq!(
        *workload.peers.lock().unwrap(),
        [IpAddr::from(ClientPod::CLIENT_V4)]
    );
}

/// The whole suite for one mode.
macro_rules! suite {
    ($mode:ident, $conntrack:expr) => {
        mod $mode {
            use super::*;
            const MODE: &str = stringify!($mode);

            #[test]
            fn echo_1mib_v4_is_byte_exact_and_reaches_the_original_destination() {
                echo_through_sluice(MODE, $conntrack, pod_v4, concat!(stringify!($mode), "-e4"));
            }

            #[test]
            fn echo_1mib_v6_is_byte_exact_and_reaches_the_original_destination() {
                echo_through_sluice(MODE, $conntrack, pod_v6, concat!(stringify!($mode), "-e6"));
            }

            #[test]
            fn half_close_keeps_the_other_direction_flowing() {
                super::half_close_keeps_the_other_direction_flowing(
                    MODE,
                    $conntrack,
                    concat!(stringify!($mode), "-half"),
                );
            }

            #[test]
            fn burst_of_20000_connections_reusing_ports_all_go_through_sluice() {
                burst_of_connections_reusing_ports(
                    MODE,
                    $conntrack,
                    concat!(stringify!($mode), "-burst"),
                );
            }

            #[test]
            fn closed_workload_port_resets_the_client_and_sluice_goes_on() {
                super::closed_workload_port_resets_the_client_and_sluice_goes_on(
                    MODE,
                    concat!(stringify!($mode), "-closed"),
                );
            }
        }
    };
}

suite!(tproxy, Conntrack::None);
suite!(redirect, Conntrack::PerConnection);
suite!(ebpf, Conntrack::None);

#[test]
fn tproxy_rules_without_sluice_block_and_removal_restores_direct_access() {
    rules_without_sluice_block_and_removal_restores_direct_access("tproxy", "tproxy-norun");
}

#[test]
fn redirect_rules_without_sluice_block_and_removal_restores_direct_access() {
    rules_without_sluice_block_and_removal_restores_direct_access("redirect", "redirect-norun");
}

/// eBPF mode leaves netfilter alone entirely, and its program goes with the
/// process: afterwards connections reach the workload directly.
#[test]
fn ebpf_uses_no_netfilter_and_detaches_when_sluice_exits() {
    let topology = ClientPod::new("ebpf-gone").expect("topology");
    let workload = Workload::start(&topology.pod, PORT, Behaviour::Echo, 1);
    let sluice = start("ebpf", &topology, "9080");

    let stream = connect(&topology.client, pod_v4(PORT)).expect("connect through sluice");
    assert_eq!(
        exchange(stream, b"via".to_vec()),
        [b"via".as_slice(), TRAILER].concat()
    );
    assert_eq!(workload.via_sluice.load(Ordering::SeqCst), 1);
    for tool in ["iptables-save", "ip6tables-save"] {
        let saved = topology
            .pod
            .output(&mut std::process::Command::new(tool))
            .expect(tool);
        let rules = String::from_utf8_lossy(&saved.stdout);
        assert!(
            !rules
                .lines()
                .any(|l| l.starts_with('*') || l.starts_with("-A")),
            "{tool}: {rules}"
        );
    }
    let nft = topology
        .pod
        .output(std::process::Command::new("nft").args(["list", "ruleset"]))
        .expect("nft");
    assert!(
        String::from_utf8_lossy(&nft.stdout).trim().is_empty(),
        "nft ruleset is not empty"
    );
    assert_eq!(conntrack_count(&topology.pod), 0);
    let shown = sluice_cli(
        &topology.pod,
        &["rules", "show", "--mode", "ebpf", "--ports", "9080"],
    );
    assert!(
        shown.status.success(),
        "{}",
        String::from_utf8_lossy(&shown.stdout)
    );

    sluice.stop();
    let shown = sluice_cli(
        &topology.pod,
        &["rules", "show", "--mode", "ebpf", "--ports", "9080"],
    );
    assert_eq!(
        shown.status.code(),
        Some(3),
        "a program is still attached: {}",
        String::from_utf8_lossy(&shown.stdout)
    );
    let stream = connect(&topology.client, pod_v4(PORT)).expect("direct connection");
    assert_eq!(
        exchange(stream, b"direct".to_vec()),
        [b"direct".as_slice(), TRAILER].concat()
    );
    assert_eq!(workload.direct.load(Ordering::SeqCst), 1);
}

/// Connects and reads once. A reset may land before connect() returns or on
/// the read; either way it comes back as the error.
fn connect_then_read(client: &netlab::Netns, to: SocketAddr) -> std::io::Result<usize> {
    let mut stream = connect(client, to)?;
    stream.read(&mut [0u8; 16])
}

/// A SYN from outside that claims to come from the bypass source `::6`.
/// IPv6 has no reverse-path filter, and the pod's own connections from
/// `::6` must not be intercepted, so such a SYN does reach the workload's
/// listener, unintercepted. It still gets no connection: the workload's
/// answer goes to `::6`, an address of the pod itself (sluice puts it on
/// lo), so it never leaves the pod, and the handshake never completes.
fn spoofed_bypass_source_gets_no_connection(mode: &str, purpose: &str) {
    let topology = ClientPod::new(purpose).expect("topology");
    let workload = Workload::start(&topology.pod, PORT, Behaviour::Echo, 1);
    let _sluice = start(mode, &topology, "9080");
    let spoofed = topology.client.run(|| {
        let socket = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)?;
        // Not an address of the client: sent as if it were.
        socket.set_freebind_v6(true)?;
        socket.bind(&SocketAddr::new("::6".parse().expect("::6"), 0).into())?;
        socket.connect_timeout(&pod_v6(PORT).into(), Duration::from_secs(3))
    });
    let error = spoofed.expect_err("a SYN from a spoofed ::6 got a connection");
    assert_eq!(error.kind(), ErrorKind::TimedOut, "{error}");
    // The control: the same workload answers the client's real address.
    let mut real = connect(&topology.client, pod_v6(PORT)).expect("connect");
    echo_once(&mut real, b"real address");
    drop(real);
    assert_eq!(
        workload.direct.load(Ordering::SeqCst),
        0,
        "the spoofed SYN was accepted"
    );
}

#[test]
fn ebpf_spoofed_bypass_source_gets_no_connection() {
    spoofed_bypass_source_gets_no_connection("ebpf", "ebpf-spoof6");
}

#[test]
fn tproxy_spoofed_bypass_source_gets_no_connection() {
    spoofed_bypass_source_gets_no_connection("tproxy", "tproxy-spoof6");
}
