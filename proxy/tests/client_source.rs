//! `--upstream-source client` (the default): the workload sees the client's
//! own address, with no conntrack entry, in every mode and with every
//! forwarder; the ports sluice connects from never meet the client's own
//! (the mirror image of a client connection); the bypass source is still
//! there for workloads that want it; and nothing else in the pod changes.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::time::Instant;

use common::*;
use netlab::ClientPod;

const PORT: u16 = 9080;
const OTHER_PORT: u16 = 9081;

fn client_addrs() -> [IpAddr; 2] {
    [ClientPod::CLIENT_V4.into(), ClientPod::CLIENT_V6.into()]
}

/// 1 MiB each way over IPv4 and IPv6: byte-exact, and the workload's peer
/// is the client, for every connection; the pod's conntrack table stays
/// empty.
fn client_address_reaches_the_workload(mode: &str, forwarder: &str) {
    let topology = ClientPod::new(&format!("cs{mode}{forwarder}")).expect("topology");
    let workload = Workload::start(&topology.pod, PORT, Behaviour::Echo, 1);
    let mut args = vec!["--mode", mode, "--forward", forwarder, "--ports", "9080"];
    if mode != "ebpf" {
        args.push("--install-rules");
    }
    let sluice = Sluice::run(&topology.pod, &args);
    for (seed, to) in [pod_v4(PORT), pod_v6(PORT)].into_iter().enumerate() {
        let payload = random_bytes(1 << 20, seed as u64);
        let stream = connect(&topology.client, to).expect("connect through sluice");
        let received = exchange(stream, payload.clone());
        assert!(
            received[..payload.len().min(received.len())] == payload[..],
            "bytes differ"
        );
        assert_eq!(&received[payload.len()..], TRAILER);
    }
    assert_eq!(*workload.sluice_peers.lock().unwrap(), client_addrs());
    assert_eq!(workload.direct.load(Ordering::SeqCst), 0);
    assert_eq!(conntrack_count(&topology.pod), 0);
    sluice.stop();
}

macro_rules! matrix {
    ($($name:ident: $mode:literal, $forwarder:literal;)*) => {$(
        #[test]
        fn $name() {
            client_address_reaches_the_workload($mode, $forwarder);
        }
    )*};
}

matrix! {
    tproxy_copy_shows_the_client_address: "tproxy", "copy";
    tproxy_splice_shows_the_client_address: "tproxy", "splice";
    tproxy_sockmap_shows_the_client_address: "tproxy", "sockmap";
    ebpf_copy_shows_the_client_address: "ebpf", "copy";
    ebpf_splice_shows_the_client_address: "ebpf", "splice";
    ebpf_sockmap_shows_the_client_address: "ebpf", "sockmap";
}

/// `--upstream-source bypass` keeps today's behaviour: 127.0.0.6 and ::6.
#[test]
fn bypass_source_still_shows_the_bypass_address() {
    let topology = ClientPod::new("csbypass").expect("topology");
    let workload = Workload::start(&topology.pod, PORT, Behaviour::Echo, 1);
    let sluice = Sluice::run(
        &topology.pod,
        &[
            "--ports",
            "9080",
            "--install-rules",
            "--upstream-source",
            "bypass",
        ],
    );
    for to in [pod_v4(PORT), pod_v6(PORT)] {
        let stream = connect(&topology.client, to).expect("connect");
        assert_eq!(
            exchange(stream, b"bypass".to_vec()),
            [b"bypass".as_slice(), TRAILER].concat()
        );
    }
    let bypass: [IpAddr; 2] = [
        Ipv4Addr::new(127, 0, 0, 6).into(),
        Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6).into(),
    ];
    assert_eq!(*workload.sluice_peers.lock().unwrap(), bypass);
    assert_eq!(conntrack_count(&topology.pod), 0);
    sluice.stop();
}

/// One client address holding 5,000 connections through sluice, then
/// 20,000 short connections from the same address and 32 source ports
/// (each reused hundreds of times): every one goes through sluice. sluice's
/// connections to the workload come from the client's address too, to the
/// inner address, from ports the pod's kernel picks: were they to go to the
/// pod's address, the kernel's choice would be the client's own next port
/// (the same hash of addresses and destination), and one would meet a client
/// connection's mirror image and hang.
#[test]
fn one_client_address_holding_5000_then_a_burst_of_20000() {
    const HELD: u64 = 5_000;
    const BURST: u64 = 20_000;
    const CLIENT_PORTS: u16 = 32;
    let topology = ClientPod::new("csmirror").expect("topology");
    let workload = Workload::start(&topology.pod, PORT, Behaviour::ReplyOrHold, 4);
    let _sluice = Sluice::run(
        &topology.pod,
        &["--ports", "9080", "--install-rules", "--log-level", "debug"],
    );
    let held: Vec<TcpStream> = (0..HELD)
        .map(|i| {
            let mut stream = connect(&topology.client, pod_v4(PORT))
                .unwrap_or_else(|e| panic!("held connection {i}: {e}"));
            stream.write_all(b"hold....").expect("write");
            stream
        })
        .collect();
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut next = 0u64;
    for i in 0..BURST {
        // Above the client kernel's own range (32768-60999), which the held
        // connections draw from. A port whose last connection is still
        // closing on the client's side cannot connect again yet (its own
        // kernel says so): take the next.
        let outcome = loop {
            let port = 61_000 + (next % u64::from(CLIENT_PORTS)) as u16;
            next += 1;
            match topology.client.run(|| short_connection(port, pod_v4(PORT))) {
                Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => continue,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
                other => break other.map_err(|e| format!("#{i} from port {port}: {e}")),
            }
        };
        if let Err(failure) = outcome {
            failures.push(failure);
        }
    }
    eprintln!(
        "{BURST} short connections from {CLIENT_PORTS} ports beside {HELD} held ones in {:?}",
        started.elapsed()
    );
    assert_none_failed(&failures);
    assert_eq!(workload.via_sluice.load(Ordering::SeqCst), HELD + BURST);
    assert_eq!(workload.direct.load(Ordering::SeqCst), 0);
    let peers = workload.sluice_peers.lock().unwrap();
    assert!(peers
        .iter()
        .all(|peer| *peer == IpAddr::from(ClientPod::CLIENT_V4)));
    assert_eq!(conntrack_count(&topology.pod), 0);
    drop(held);
}

/// One client address making three times as many short connections as
/// `--upstream-ports` (narrowed to 1,000 ports) holds, the client closing first (so sluice's
/// connection to the workload closes first and keeps the TIME_WAIT), over
/// IPv4 and IPv6: not one fails.
#[test]
fn one_client_address_outlasts_the_upstream_port_range() {
    const PORTS: u32 = 1000;
    const CONNECTIONS: u32 = 3 * PORTS;
    let topology = ClientPod::new("csrate").expect("topology");
    let workload = Workload::start(&topology.pod, PORT, Behaviour::Echo, 4);
    let _sluice = Sluice::run(
        &topology.pod,
        &[
            "--ports",
            "9080",
            "--install-rules",
            "--upstream-ports",
            "40000-40999",
        ],
    );
    let started = Instant::now();
    let failures =
        clients_closing_first(&topology.client, &[pod_v4(PORT), pod_v6(PORT)], CONNECTIONS);
    eprintln!(
        "2 x {CONNECTIONS} connections through {PORTS} upstream ports in {:?}",
        started.elapsed()
    );
    assert_none_failed(&failures);
    assert_eq!(
        workload.via_sluice.load(Ordering::SeqCst),
        2 * u64::from(CONNECTIONS)
    );
}

/// With the client source and its return path installed, everything that
/// does not go through sluice is as before: the workload's own outbound
/// connections, clients in an excluded CIDR, a port that is not
/// intercepted. Their replies are not pulled into the local route.
#[test]
fn everything_else_in_the_pod_is_unaffected() {
    let topology = ClientPod::new("csother").expect("topology");
    let excluded: [(IpAddr, u8); 2] = [
        (Ipv4Addr::new(198, 18, 0, 9).into(), 24),
        (Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 9).into(), 64),
    ];
    for (addr, len) in excluded {
        topology
            .client
            .add_addr(ClientPod::CLIENT_IF, addr, len)
            .expect("a second client address");
    }
    let intercepted = Workload::start(&topology.pod, PORT, Behaviour::Echo, 1);
    let other = Workload::start(&topology.pod, OTHER_PORT, Behaviour::Echo, 1);
    let sluice = Sluice::run(
        &topology.pod,
        &[
            "--ports",
            "9080",
            "--exclude-cidrs",
            "198.18.0.9/32,2001:2::9/128",
            "--install-rules",
        ],
    );
    let echo = |stream: TcpStream, what: &str| {
        assert_eq!(
            exchange(stream, what.as_bytes().to_vec()),
            [what.as_bytes(), TRAILER].concat(),
            "{what}"
        );
    };
    // The client has two addresses per family now: say which.
    let connect_from = |from: IpAddr, to: SocketAddr| {
        connect_from(&topology.client, SocketAddr::new(from, 0), to)
            .unwrap_or_else(|e| panic!("connect from {from} to {to}: {e}"))
    };
    // Through sluice, from the client's address.
    let through = connect_from(ClientPod::CLIENT_V4.into(), pod_v4(PORT));
    echo(through, "through");
    // From an excluded address: straight to the workload.
    for ((addr, _), to) in excluded.into_iter().zip([pod_v4(PORT), pod_v6(PORT)]) {
        echo(connect_from(addr, to), "excluded");
    }
    // A port that is not intercepted.
    for (from, to) in client_addrs()
        .into_iter()
        .zip([pod_v4(OTHER_PORT), pod_v6(OTHER_PORT)])
    {
        echo(connect_from(from, to), "not intercepted");
    }
    // The workload's own outbound connections.
    for ip in client_addrs() {
        let to = answering_server(&topology.client, ip);
        let mut reply = String::new();
        topology
            .pod
            .run(|| {
                let mut stream = TcpStream::connect_timeout(&to, PATIENCE)?;
                stream.set_read_timeout(Some(PATIENCE))?;
                stream.read_to_string(&mut reply)
            })
            .unwrap_or_else(|e| panic!("outbound to {to}: {e}"));
        assert_eq!(reply, "served");
    }
    assert_eq!(
        *intercepted.sluice_peers.lock().unwrap(),
        [IpAddr::from(ClientPod::CLIENT_V4)]
    );
    assert_eq!(
        *intercepted.peers.lock().unwrap(),
        excluded.map(|(addr, _)| addr)
    );
    assert_eq!(*other.peers.lock().unwrap(), client_addrs());
    assert_eq!(other.via_sluice.load(Ordering::SeqCst), 0);
    sluice.stop();
}
