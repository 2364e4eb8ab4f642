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

fn setup(forwarder: &str, purpose: &str, behaviour: Behaviour) -> Setup {
    let topology = ClientPod::new(purpose).expect("topology");
    let workload = Workload::start(&topology.pod, PORT, behaviour, 1);
    let sluice = Sluice::run(
        &topology.pod,
        &["--forward", forwarder, "--ports", "9080", "--install-rules"],
    );
    Setup {
        topology,
        workload,
        sluice,
    }
}

fn payloads_are_byte_exact_both_ways(forwarder: &str, purpose: &str) {
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

fn client_half_close(forwarder: &str, purpose: &str) {
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

fn workload_half_close(forwarder: &str, purpose: &str) {
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

fn workload_reset_reaches_the_client(forwarder: &str, purpose: &str) {
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

fn client_abort_closes_the_workload_side(forwarder: &str, purpose: &str) {
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

fn sequential_connections_leak_nothing(forwarder: &str, purpose: &str) {
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
    round(1000);
    let after = wait_for_stable_fds(s.sluice.pid());
    assert_eq!(
        after, before,
        "sluice's descriptors (total, pipes) changed over 1,000 connections"
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
    ($forwarder:ident) => {
        mod $forwarder {
            use super::*;
            const FORWARDER: &str = stringify!($forwarder);

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
            fn sequential_connections_leak_nothing() {
                super::sequential_connections_leak_nothing(
                    FORWARDER,
                    concat!(stringify!($forwarder), "-leak"),
                );
            }
        }
    };
}

suite!(copy);
suite!(splice);
