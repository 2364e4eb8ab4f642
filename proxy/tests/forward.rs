//! The same suite for every forwarder (`--forward`): TCP's semantics through
//! sluice, on the real kernel, in a client ⇄ pod topology with TPROXY.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use netlab::ClientPod;

const PORT: u16 = 9080;

struct Setup {
    topology: ClientPod,
    workload: Workload,
    sluice: Sluice,
}

/// `forwarder`: the flags that choose it (`--forward X`, and its own).
fn setup(forwarder: &[&str], purpose: &str, behaviour: Behaviour) -> Setup {
    let topology = ClientPod::new(purpose).expect("topology");
    let workload = Workload::start(&topology.pod, PORT, behaviour, 1);
    let sluice = Sluice::run(
        &topology.pod,
        &[forwarder, &["--ports", "9080", "--install-rules"]].concat(),
    );
    Setup {
        topology,
        workload,
        sluice,
    }
}

/// A topology whose workload the test writes itself: its listening socket
/// in the pod, and sluice started with `forwarder` and debug logs.
fn own_workload(forwarder: &[&str], purpose: &str) -> (ClientPod, std::net::TcpListener, Sluice) {
    let topology = ClientPod::new(purpose).expect("topology");
    let listener = topology
        .pod
        .run(|| std::net::TcpListener::bind(pod_v4(PORT)).expect("bind in pod ns"));
    let sluice = Sluice::run(
        &topology.pod,
        &[
            forwarder,
            &["--ports", "9080", "--install-rules", "--log-level", "debug"],
        ]
        .concat(),
    );
    (topology, listener, sluice)
}

fn payloads_are_byte_exact_both_ways(forwarder: &[&str], purpose: &str) {
    let s = setup(forwarder, purpose, Behaviour::Echo);
    for (len, seed) in [(1, 1), (64 << 10, 2), (64 << 20, 3)] {
        let payload = random_bytes(len, seed);
        let stream = connect(&s.topology.client, pod_v4(PORT)).expect("connect");
        let received = exchange(stream, payload.clone());
        assert_eq!(received.len(), len + TRAILER.len(), "{len}-byte payload");
        assert!(received[..len] == payload[..], "{len}-byte payload differs");
    }
    assert_eq!(s.workload.via_sluice.load(Ordering::SeqCst), 3);
}

fn client_half_close(forwarder: &[&str], purpose: &str) {
    let s = setup(forwarder, purpose, Behaviour::Echo);
    let mut stream = connect(&s.topology.client, pod_v4(PORT)).expect("connect");
    stream.write_all(b"request").expect("write");
    stream.shutdown(Shutdown::Write).expect("half-close");
    let mut reply = Vec::new();
    stream
        .read_to_end(&mut reply)
        .expect("read after half-close");
    assert_eq!(reply, [b"request".as_slice(), TRAILER].concat());
}

fn workload_half_close(forwarder: &[&str], purpose: &str) {
    let s = setup(forwarder, purpose, Behaviour::GreetThenDrain);
    let mut stream = connect(&s.topology.client, pod_v4(PORT)).expect("connect");
    // The workload's FIN arrives first; the client's bytes must still flow.
    let mut greeting = Vec::new();
    stream
        .read_to_end(&mut greeting)
        .expect("read until the workload's FIN");
    assert_eq!(greeting, GREETING);
    let payload = random_bytes(256 << 10, 4);
    stream
        .write_all(&payload)
        .expect("write after the workload's FIN");
    stream.shutdown(Shutdown::Write).expect("client FIN");
    wait_until("the workload drained the client's bytes", || {
        s.workload.ended.load(Ordering::SeqCst) == 1
    });
    assert_eq!(
        s.workload.drained.load(Ordering::SeqCst),
        payload.len() as u64
    );
}

fn workload_reset_reaches_the_client(forwarder: &[&str], purpose: &str) {
    let s = setup(forwarder, purpose, Behaviour::ResetAfter(1000));
    let mut stream = connect(&s.topology.client, pod_v4(PORT)).expect("connect");
    let chunk = random_bytes(64 << 10, 5);
    let deadline = Instant::now() + PATIENCE;
    // Keep sending until the reset surfaces, on a write or on the read.
    let error = loop {
        assert!(
            Instant::now() < deadline,
            "the workload's reset never reached the client"
        );
        if let Err(error) = stream.write_all(&chunk) {
            break error;
        }
        stream
            .set_read_timeout(Some(Duration::from_millis(10)))
            .expect("timeout");
        match stream.read(&mut [0u8; 64]) {
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {}
            Err(error) => break error,
            Ok(0) => panic!("the client saw a FIN, not a reset"),
            Ok(_) => panic!("the workload sent data"),
        }
    };
    assert!(
        matches!(
            error.kind(),
            ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
        ),
        "{error}"
    );
}

fn client_abort_closes_the_workload_side(forwarder: &[&str], purpose: &str) {
    let s = setup(forwarder, purpose, Behaviour::GreetThenDrain);
    let mut stream = connect(&s.topology.client, pod_v4(PORT)).expect("connect");
    stream.write_all(&random_bytes(10_000, 6)).expect("write");
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .expect("linger");
    drop(stream); // RST
    wait_until("the workload saw its connection end", || {
        s.workload.ended.load(Ordering::SeqCst) == 1
    });
}

fn sequential_connections_leak_nothing(forwarder: &[&str], purpose: &str) {
    let s = setup(forwarder, purpose, Behaviour::Echo);
    let round = |n: usize| {
        for i in 0..n {
            let stream = connect(&s.topology.client, pod_v4(PORT)).expect("connect");
            let payload = random_bytes(4096, i as u64);
            assert_eq!(
                exchange(stream, payload.clone()).len(),
                payload.len() + TRAILER.len()
            );
        }
    };
    // Warm up: worker pools (pipes) fill to their working size first.
    round(50);
    let before = wait_for_stable_fds(s.sluice.pid());
    let entries_before = sockmap_entries(s.sluice.pid());
    round(1000);
    let after = wait_for_stable_fds(s.sluice.pid());
    assert_eq!(
        after, before,
        "sluice's descriptors (total, pipes) changed over 1,000 connections"
    );
    // Every connection has ended: its map entries (sockmap only) are gone.
    assert_eq!(
        sockmap_entries(s.sluice.pid()),
        entries_before,
        "sluice's sockmap entries changed over 1,000 connections"
    );
    assert_eq!(entries_before, 0, "sockmap entries left after warm-up");
}

/// Entries in the sockmap forwarder's maps (`sl_socks`, `sl_targets`,
/// `sl_peers`) of process `pid`, found through the map ids in its
/// descriptors' fdinfo (sluice runs as another process; root may open any
/// map by id). 0 for a forwarder without maps.
fn sockmap_entries(pid: u32) -> usize {
    use libbpf_rs::MapCore;
    let mut total = 0;
    let fdinfo = std::fs::read_dir(format!("/proc/{pid}/fdinfo")).expect("list sluice's fdinfo");
    for entry in fdinfo.flatten() {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue; // closed meanwhile
        };
        let Some(id) = info
            .lines()
            .find_map(|line| line.strip_prefix("map_id:"))
            .and_then(|id| id.trim().parse::<u32>().ok())
        else {
            continue;
        };
        let map = libbpf_rs::MapHandle::from_map_id(id).expect("open sluice's map by id");
        let name = map.name().to_string_lossy().into_owned();
        if sluice::forward::sockmap::MAP_NAMES.contains(&name.as_str()) {
            total += map.keys().count();
        }
    }
    total
}

/// Half-closes with much in flight, both ways at once: each side writes 8
/// MiB and its FIN at once, and reads only after a pause, so when sluice sees
/// a FIN most of the bytes before it are still on their way through sluice
/// (for sockmap: queued on the peer's psock). Passing the FIN on too early
/// loses them.
fn in_flight_bytes_survive_half_close(forwarder: &[&str], purpose: &str) {
    const LEN: usize = 8 << 20;
    const PAUSE: Duration = Duration::from_millis(300);
    const PARALLEL: usize = 6;
    let (topology, listener, sluice) = own_workload(forwarder, purpose);
    // The workload says "go" first and the client waits for it: the
    // connection is then set up through sluice (for sockmap: joined, which
    // the kernel allows only before a FIN) before the payloads start.
    // Then each side writes `LEN` bytes and a FIN, pauses, and reads to the
    // end; returns what it read.
    fn both_ways(mut stream: std::net::TcpStream, seed: u64, workload: bool) -> Vec<u8> {
        stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
        stream.set_write_timeout(Some(PATIENCE)).expect("timeout");
        if workload {
            stream.write_all(b"g").expect("go");
        } else {
            let mut go = [0u8; 1];
            stream.read_exact(&mut go).expect("go");
            assert_eq!(&go, b"g");
        }
        let mut writer = stream.try_clone().expect("clone");
        let sender = std::thread::spawn(move || {
            writer.write_all(&random_bytes(LEN, seed)).expect("write");
            writer.shutdown(Shutdown::Write).expect("half-close");
        });
        std::thread::sleep(PAUSE);
        let mut received = Vec::with_capacity(LEN);
        stream.read_to_end(&mut received).expect("read to the FIN");
        sender.join().expect("sender");
        received
    }
    for round in 0..2u64 {
        let server = {
            let listener = listener.try_clone().expect("clone listener");
            std::thread::spawn(move || {
                let handlers: Vec<_> = (0..PARALLEL)
                    .map(|_| {
                        let (stream, _) = listener.accept().expect("workload accept");
                        std::thread::spawn(move || both_ways(stream, 1000 + round, true))
                    })
                    .collect();
                handlers
                    .into_iter()
                    .map(|h| h.join().expect("workload side"))
                    .collect::<Vec<_>>()
            })
        };
        let clients: Vec<_> = (0..PARALLEL)
            .map(|_| {
                let stream = connect(&topology.client, pod_v4(PORT)).expect("connect");
                std::thread::spawn(move || both_ways(stream, 2000 + round, false))
            })
            .collect();
        let from_workload = random_bytes(LEN, 1000 + round);
        for client in clients {
            let received = client.join().expect("client side");
            assert_eq!(received.len(), LEN, "round {round}: bytes to the client");
            assert!(
                received == from_workload,
                "round {round}: bytes to the client differ"
            );
        }
        let from_client = random_bytes(LEN, 2000 + round);
        for received in server.join().expect("workload") {
            assert_eq!(received.len(), LEN, "round {round}: bytes to the workload");
            assert!(
                received == from_client,
                "round {round}: bytes to the workload differ"
            );
        }
    }
    let log = sluice.stop();
    assert!(
        !log.contains("with copy"),
        "a connection was not forwarded by {forwarder:?}:\n{log}"
    );
}

/// (all descriptors, pipe descriptors) of a process, once two readings agree
/// (closes finish asynchronously on io_uring).
fn wait_for_stable_fds(pid: u32) -> (usize, usize) {
    let read = || {
        let entries: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("list sluice's fds")
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .map(|target| target.to_string_lossy().into_owned())
            .collect();
        let pipes = entries.iter().filter(|t| t.starts_with("pipe:")).count();
        (entries.len(), pipes)
    };
    let deadline = Instant::now() + PATIENCE;
    let mut last = read();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = read();
        if now == last || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

macro_rules! suite {
    ($forwarder:ident, $flags:expr) => {
        mod $forwarder {
            use super::*;
            const FORWARDER: &[&str] = &$flags;

            #[test]
            fn payloads_1b_64kib_64mib_are_byte_exact_both_ways() {
                payloads_are_byte_exact_both_ways(
                    FORWARDER,
                    concat!(stringify!($forwarder), "-bytes"),
                );
            }

            #[test]
            fn client_half_close() {
                super::client_half_close(FORWARDER, concat!(stringify!($forwarder), "-chalf"));
            }

            #[test]
            fn workload_half_close() {
                super::workload_half_close(FORWARDER, concat!(stringify!($forwarder), "-whalf"));
            }

            #[test]
            fn workload_reset_reaches_the_client() {
                super::workload_reset_reaches_the_client(
                    FORWARDER,
                    concat!(stringify!($forwarder), "-wrst"),
                );
            }

            #[test]
            fn client_abort_closes_the_workload_side() {
                super::client_abort_closes_the_workload_side(
                    FORWARDER,
                    concat!(stringify!($forwarder), "-crst"),
                );
            }

            #[test]
            fn in_flight_bytes_survive_half_close() {
                super::in_flight_bytes_survive_half_close(
                    FORWARDER,
                    concat!(stringify!($forwarder), "-flight"),
                );
            }

            #[test]
            fn sequential_connections_leak_nothing() {
                super::sequential_connections_leak_nothing(
                    FORWARDER,
                    concat!(stringify!($forwarder), "-leak"),
                );
            }
        }
    };
}

suite!(copy, ["--forward", "copy"]);
suite!(splice, ["--forward", "splice"]);
// The default: copied first, joined once older than --sockmap-after.
suite!(sockmap, ["--forward", "sockmap"]);
// Joined as soon as the upstream connection is made.
suite!(
    sockmap_now,
    ["--forward", "sockmap", "--sockmap-after", "0"]
);

/// What only the sockmap forwarder has: joining through its maps, and the
/// fallback to copy where the kernel refuses.
mod sockmap_specific {
    use super::*;

    /// A request sent at once, before sluice has joined the sockets, then
    /// a wait for the answer with no FIN: the kernel runs the program only
    /// when bytes arrive, so sluice must make it look at what is queued.
    /// While the connection is open its two sockets are in the maps (two
    /// entries in each of three); after it, none.
    #[test]
    fn early_bytes_flow_and_entries_come_and_go() {
        let topology = ClientPod::new("sm-join").expect("topology");
        let workload = Workload::start(&topology.pod, PORT, Behaviour::Echo, 1);
        // At debug level sluice logs each connection that went to copy.
        let sluice = Sluice::run(
            &topology.pod,
            &[
                "--forward",
                "sockmap",
                "--sockmap-after",
                "0",
                "--ports",
                "9080",
                "--install-rules",
                "--log-level",
                "debug",
            ],
        );
        let s = Setup {
            topology,
            workload,
            sluice,
        };
        for i in 0..20 {
            let mut stream = connect(&s.topology.client, pod_v4(PORT)).expect("connect");
            // No FIN: the echo must come back while the client waits.
            echo_once(&mut stream, &random_bytes(1000, i));
            // Six while open; the previous connection's may take a moment
            // to go (its worker thread can be descheduled right after the
            // FIN it passed on).
            wait_until("two entries in each map while open", || {
                sockmap_entries(s.sluice.pid()) == 6
            });
            stream.shutdown(Shutdown::Write).expect("half-close");
            let mut rest = Vec::new();
            stream.read_to_end(&mut rest).expect("trailer");
            assert_eq!(rest, TRAILER);
        }
        wait_until("the maps are empty", || {
            sockmap_entries(s.sluice.pid()) == 0
        });
        assert!(
            !s.sluice.log().contains("with copy"),
            "a connection fell back to copy:\n{}",
            s.sluice.log()
        );
    }

    /// Waits until sluice's counters of connections joined in the kernel and
    /// of those it could not join reach `expected` (a connection is counted
    /// when both its directions have ended, a moment after the client sees
    /// its end), and fails with the figures if they do not.
    fn assert_joined_and_fallbacks(client: &netlab::Netns, expected: (f64, f64)) {
        let scrape = || {
            let (status, metrics) = get(client, pod_v4(METRICS), "/metrics");
            assert_eq!(status, 200, "{metrics}");
            (
                sample(&metrics, "sluice_sockmap_joined_total"),
                sample(&metrics, "sluice_forwarder_fallbacks_total"),
            )
        };
        let deadline = Instant::now() + PATIENCE;
        while scrape() != expected && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(scrape(), expected, "(joined, fell back)");
    }

    fn sockmap_after(purpose: &str, after: &str, behaviour: Behaviour) -> Setup {
        setup(
            &[
                "--forward",
                "sockmap",
                "--sockmap-after",
                after,
                "--log-level",
                "debug",
            ],
            purpose,
            behaviour,
        )
    }

    /// Connections that end before `--sockmap-after` never touch the maps:
    /// copy forwards them whole, bytes exact.
    #[test]
    fn connections_shorter_than_sockmap_after_stay_on_copy() {
        let s = sockmap_after("sm-short", "1m", Behaviour::Echo);
        for i in 0..20 {
            let payload = random_bytes(10_000, i);
            let stream = connect(&s.topology.client, pod_v4(PORT)).expect("connect");
            let received = exchange(stream, payload.clone());
            assert_eq!(received, [payload.as_slice(), TRAILER].concat());
        }
        assert_eq!(sockmap_entries(s.sluice.pid()), 0);
        assert_joined_and_fallbacks(&s.topology.client, (0.0, 0.0));
        assert_eq!(s.workload.via_sluice.load(Ordering::SeqCst), 20);
    }

    /// A connection that waits past `--sockmap-after` is joined while it
    /// waits; the bytes copied before and redirected after add up at its
    /// FIN (sluice checks the count and resets on a mismatch).
    #[test]
    fn an_idle_connection_is_joined_once_older_than_sockmap_after() {
        let s = sockmap_after("sm-idle", "200ms", Behaviour::Echo);
        let mut stream = connect(&s.topology.client, pod_v4(PORT)).expect("connect");
        for (len, seed) in [(1000, 1), (1 << 20, 2)] {
            echo_once(&mut stream, &random_bytes(len, seed));
            // The first exchange is copied; the connection then waits and is
            // joined; the second goes through the kernel.
            wait_until("the connection is joined", || {
                sockmap_entries(s.sluice.pid()) == 6
            });
        }
        stream.shutdown(Shutdown::Write).expect("half-close");
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).expect("trailer");
        assert_eq!(rest, TRAILER);
        wait_until("the maps are empty", || {
            sockmap_entries(s.sluice.pid()) == 0
        });
        assert_joined_and_fallbacks(&s.topology.client, (1.0, 0.0));
    }

    /// A download that is still flowing at `--sockmap-after` is handed over
    /// between two writes: the client receives every byte, in order, and
    /// the workload's FIN after them.
    #[test]
    fn a_download_is_handed_over_while_it_flows() {
        const LEN: usize = 64 << 20;
        // Made before the workload needs it, so that it sends at once.
        let expected = download_bytes(LEN);
        let s = sockmap_after("sm-flow", "20ms", Behaviour::Download(LEN));
        let mut stream = connect(&s.topology.client, pod_v4(PORT)).expect("connect");
        stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
        // Read at a pace, so that the download lasts well past the 20 ms.
        let mut received = Vec::with_capacity(LEN);
        let mut chunk = vec![0u8; 1 << 20];
        loop {
            let n = stream.read(&mut chunk).unwrap_or_else(|e| {
                panic!(
                    "download after {} bytes: {e}\n{}",
                    received.len(),
                    s.sluice.log()
                )
            });
            if n == 0 {
                break;
            }
            received.extend_from_slice(&chunk[..n]);
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(received.len(), LEN);
        assert!(received == *expected, "the download differs");
        drop(stream);
        assert_joined_and_fallbacks(&s.topology.client, (1.0, 0.0));
    }

    /// A workload that stops reading holds the client back, as TCP would
    /// without sluice: the kernel queues no more than a few buffers' worth,
    /// and every byte arrives in order once the workload reads again, the
    /// redirect resumed.
    #[test]
    fn a_stalled_workload_holds_the_client_back() {
        held_back_then_delivered("sm-stall", false);
    }

    /// The same, with the client's FIN while its bytes are held back: it
    /// reaches the workload after every byte (copied: the kernel does not
    /// join a socket past its FIN).
    #[test]
    fn a_fin_while_held_back_comes_after_every_byte() {
        held_back_then_delivered("sm-stallfin", true);
    }

    /// The client writes until the stalled workload's connection takes no
    /// more for a second; asserts that was far less than it would have
    /// written; lets the workload read; then (unless `fin_while_held`)
    /// writes as much again while the workload reads, and half-closes. The
    /// workload checks every byte and the FIN.
    fn held_back_then_delivered(purpose: &str, fin_while_held: bool) {
        /// With no bound the client writes all of it; held back, it writes
        /// its and the workload's socket buffers, sluice's receive buffer
        /// and what sluice lets wait for the workload: tens of MiB.
        const OFFERED: usize = 512 << 20;
        const HELD_BACK_BELOW: usize = 96 << 20;
        let pattern = |offset: usize| (offset % 251) as u8;
        let (topology, listener, sluice) = own_workload(&["--forward", "sockmap"], purpose);
        let (go, read_now) = std::sync::mpsc::channel::<()>();
        let workload = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("workload accept");
            read_now.recv().expect("told to read");
            stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
            let mut received = 0usize;
            let mut chunk = vec![0u8; 1 << 20];
            loop {
                let n = stream.read(&mut chunk).expect("workload read");
                if n == 0 {
                    break;
                }
                if let Some(i) = (0..n).find(|&i| chunk[i] != pattern(received + i)) {
                    panic!("byte {} differs", received + i);
                }
                received += n;
            }
            stream.write_all(TRAILER).expect("trailer");
            received
        });
        let mut stream = connect(&topology.client, pod_v4(PORT)).expect("connect");
        // Idle past --sockmap-after (the default): joined.
        wait_until("the connection is joined", || {
            sockmap_entries(sluice.pid()) == 6
        });
        stream
            .set_write_timeout(Some(Duration::from_secs(1)))
            .expect("timeout");
        let chunk: Vec<u8> = (0..(1 << 20)).map(pattern).collect();
        let mut sent = 0usize;
        let write = |stream: &mut std::net::TcpStream, sent: &mut usize, up_to: usize| -> bool {
            while *sent < up_to {
                let start = *sent % 251;
                let len = (up_to - *sent).min(chunk.len() - start);
                match stream.write(&chunk[start..start + len]) {
                    Ok(n) => *sent += n,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        return false
                    }
                    Err(e) => panic!("client write after {sent} bytes: {e}\n{}", sluice.log()),
                }
            }
            true
        };
        let all_taken = write(&mut stream, &mut sent, OFFERED);
        let held = sent;
        assert!(
            !all_taken && held < HELD_BACK_BELOW,
            "the client wrote {held} bytes to a workload that reads nothing\n{}",
            sluice.log()
        );
        if fin_while_held {
            stream.shutdown(Shutdown::Write).expect("half-close");
            go.send(()).expect("workload");
        } else {
            go.send(()).expect("workload");
            stream.set_write_timeout(Some(PATIENCE)).expect("timeout");
            assert!(
                write(&mut stream, &mut sent, held + (64 << 20)),
                "the client could not write again"
            );
            stream.shutdown(Shutdown::Write).expect("half-close");
        }
        let received = workload.join().expect("workload");
        assert_eq!(received, sent, "bytes the workload read");
        stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).expect("trailer");
        assert_eq!(rest, TRAILER);
        drop(stream);
        wait_until("the connection is counted as held back", || {
            let (status, metrics) = get(&topology.client, pod_v4(METRICS), "/metrics");
            status == 200 && sample(&metrics, "sluice_sockmap_held_back_total") >= 1.0
        });
        let log = sluice.stop();
        assert!(!log.contains("with copy"), "fell back to copy:\n{log}");
    }

    /// Streams faster than their workload, at once: each is held back and
    /// let go again hundreds of times, and every byte arrives, in order,
    /// before the FIN.
    #[test]
    fn many_hold_backs_lose_nothing() {
        const STREAMS: usize = 4;
        const WRITING: Duration = Duration::from_secs(2);
        let pattern = |offset: u64| (offset % 251) as u8;
        let (topology, listener, sluice) = own_workload(&["--forward", "sockmap"], "sm-many");
        // The workload checks every byte and answers with its count.
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                std::thread::spawn(move || {
                    let mut chunk = vec![0u8; 1 << 20];
                    let mut received = 0u64;
                    loop {
                        let n = match stream.read(&mut chunk) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if (0..n).any(|i| chunk[i] != pattern(received + i as u64)) {
                            return; // no count: the client sees the difference
                        }
                        received += n as u64;
                    }
                    let _ = stream.write_all(&received.to_be_bytes());
                });
            }
        });
        let chunk: Vec<u8> = (0..(128 << 10) + 251).map(pattern).collect();
        let clients: Vec<_> = (0..STREAMS)
            .map(|_| {
                let mut stream = connect(&topology.client, pod_v4(PORT)).expect("connect");
                let chunk = chunk.clone();
                std::thread::spawn(move || {
                    stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
                    let start = Instant::now();
                    let mut sent = 0u64;
                    while start.elapsed() < WRITING {
                        let at = (sent % 251) as usize;
                        stream
                            .write_all(&chunk[at..at + (128 << 10)])
                            .map_err(|e| format!("write: {e}"))?;
                        sent += 128 << 10;
                    }
                    stream.shutdown(Shutdown::Write).expect("half-close");
                    let mut count = [0u8; 8];
                    stream
                        .read_exact(&mut count)
                        .map_err(|e| format!("the workload's count: {e}"))?;
                    Ok::<_, String>((sent, u64::from_be_bytes(count)))
                })
            })
            .collect();
        for client in clients {
            match client.join().expect("client") {
                Ok((sent, counted)) => assert_eq!(counted, sent, "bytes the workload counted"),
                Err(error) => panic!("{error}\n{}", sluice.log()),
            }
        }
        wait_until("the connections are counted as held back", || {
            let (status, metrics) = get(&topology.client, pod_v4(METRICS), "/metrics");
            status == 200 && sample(&metrics, "sluice_sockmap_held_back_total") >= STREAMS as f64
        });
    }

    /// Without CAP_BPF and CAP_SYS_ADMIN sluice says once that sockmap is
    /// not available, forwards with copy, and the bytes are exact.
    #[test]
    fn without_bpf_rights_falls_back_to_copy_once() {
        let topology = ClientPod::new("sm-norights").expect("topology");
        let _workload = Workload::start(&topology.pod, PORT, Behaviour::Echo, 1);
        let sluice = Sluice::run_wrapped(
            &topology.pod,
            &["setpriv", "--bounding-set", "-bpf,-sys_admin", "--"],
            &["--forward", "sockmap", "--ports", "9080", "--install-rules"],
        );
        for i in 0..3 {
            let payload = random_bytes(100_000, i);
            let stream = connect(&topology.client, pod_v4(PORT)).expect("connect");
            let received = exchange(stream, payload.clone());
            assert!(received[..payload.len()] == payload[..], "bytes differ");
        }
        let log = sluice.stop();
        assert_eq!(
            log.matches("sockmap is not available").count(),
            1,
            "one fallback line expected:\n{log}"
        );
        assert!(log.contains("CAP_BPF"), "the reason is named:\n{log}");
        assert!(log.contains("forward=Copy"), "{log}");
    }
}
