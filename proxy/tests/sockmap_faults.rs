//! Faults of the sockmap forwarder that the kernel makes too rarely to meet
//! on purpose, injected into sluice (cargo feature `test-inject`, which
//! proxy/Cargo.toml turns on for every test build; `SLUICE_TEST_INJECT`
//! names the fault): a program run cut short by a socket leaving
//! `sl_socks` (the kernel drops what it had not reached), and redirected
//! bytes that never reach the peer. Each must reset the connection at once:
//! the peer never gets a byte after a hole, and no connection waits for
//! bytes that will not come.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use netlab::ClientPod;

const PORT: u16 = 9080;

/// The byte at `offset` of every stream the tests send.
fn pattern(offset: u64) -> u8 {
    (offset % 251) as u8
}

/// A topology whose workload the test serves itself, and sluice with the
/// sockmap forwarder (joining at once), debug logs and `faults` injected.
fn with_faults(purpose: &str, faults: &str, more: &[&str]) -> (ClientPod, TcpListener, Sluice) {
    let topology = ClientPod::new(purpose).expect("topology");
    let listener = topology
        .pod
        .run(|| TcpListener::bind(pod_v4(PORT)).expect("bind in pod ns"));
    let sluice = sluice_with_faults(&topology, faults, more);
    (topology, listener, sluice)
}

/// sluice in `topology`'s pod with the sockmap forwarder (joining at once),
/// debug logs and `faults` injected.
fn sluice_with_faults(topology: &ClientPod, faults: &str, more: &[&str]) -> Sluice {
    let launch = Launch {
        env: &[("SLUICE_TEST_INJECT", faults)],
        ..Launch::default()
    };
    let args = [
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
        more,
    ]
    .concat();
    Sluice::launch(&topology.pod, &launch, &args)
}

/// What the workload read of the pattern: how many bytes, the first that
/// differed, and how its stream ended (None: a FIN).
struct Received {
    bytes: u64,
    differs_at: Option<u64>,
    end: Option<ErrorKind>,
}

/// Accepts one connection, waits for `go`, then reads it to its end,
/// checking every byte against the pattern.
fn checking_workload(
    listener: TcpListener,
    go: mpsc::Receiver<()>,
) -> std::thread::JoinHandle<Received> {
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("workload accept");
        go.recv().expect("told to read");
        stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
        let mut read = Received {
            bytes: 0,
            differs_at: None,
            end: None,
        };
        let mut chunk = vec![0u8; 1 << 20];
        loop {
            let n = match stream.read(&mut chunk) {
                Ok(0) => return read,
                Ok(n) => n,
                Err(error) => {
                    read.end = Some(error.kind());
                    return read;
                }
            };
            if read.differs_at.is_none() {
                read.differs_at = (0..n)
                    .find(|&i| chunk[i] != pattern(read.bytes + i as u64))
                    .map(|i| read.bytes + i as u64);
            }
            read.bytes += n as u64;
        }
    })
}

/// Writes the pattern until `limit` bytes, an error, or a write that waits
/// longer than `stall`; the bytes written and the error, if any.
fn write_pattern(stream: &mut TcpStream, limit: u64, stall: Duration) -> (u64, Option<ErrorKind>) {
    stream.set_write_timeout(Some(stall)).expect("timeout");
    let chunk: Vec<u8> = (0..(1 << 20) + 251).map(pattern).collect();
    let mut sent = 0u64;
    while sent < limit {
        let at = (sent % 251) as usize;
        let len = ((limit - sent) as usize).min(1 << 20);
        match stream.write(&chunk[at..at + len]) {
            Ok(n) => sent += n as u64,
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return (sent, None);
            }
            Err(error) => return (sent, Some(error.kind())),
        }
    }
    (sent, None)
}

fn is_reset(kind: ErrorKind) -> bool {
    matches!(kind, ErrorKind::ConnectionReset | ErrorKind::BrokenPipe)
}

/// The client's stream, after its writes: reset, as the workload's.
fn assert_client_reset(stream: &mut TcpStream, write_error: Option<ErrorKind>, log: &str) {
    if write_error.is_some_and(is_reset) {
        return;
    }
    stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
        Err(error) if is_reset(error.kind()) => {}
        other => panic!("the client was not reset: {other:?}\n{log}"),
    }
}

/// A direction held back for a workload that reads nothing loses bytes as
/// it leaves `sl_socks` (a program run cut short): sluice counts at once,
/// finds the hole, and resets both sides; the workload reads every byte
/// before the hole, exact, and none after it.
#[test]
fn a_hole_while_held_back_resets_both_sides() {
    let (topology, listener, sluice) = with_faults("smf-pause", "sockmap-hole-at-pause=65536", &[]);
    let (go, read_now) = mpsc::channel();
    let workload = checking_workload(listener, read_now);
    let mut stream = connect(&topology.client, pod_v4(PORT)).expect("connect");
    // Until held back (8 MiB waiting for the workload, more in buffers),
    // and the stream then reset, or a second with no progress.
    let (sent, write_error) = write_pattern(&mut stream, 512 << 20, Duration::from_secs(1));
    // Whatever comes, the workload's read ends (a reset stream refuses it).
    let _ = stream.shutdown(Shutdown::Write);
    go.send(()).expect("workload");
    let read = workload.join().expect("workload");
    let log = sluice.log();
    assert!(read.bytes < sent, "no byte was lost: {}\n{log}", read.bytes);
    assert_hole_caught(&read, sent, &mut stream, write_error, &log);
}

/// A join undone half-way (the workload's FIN between the two inserts) that
/// loses bytes of the client's as the client socket leaves `sl_socks`:
/// sluice counts before copy takes over, and resets both sides instead.
#[test]
fn a_hole_while_unjoining_resets_both_sides() {
    let (topology, listener, sluice) = with_faults(
        "smf-unjoin",
        "sockmap-unjoin,sockmap-hole-at-unjoin=65536",
        &[],
    );
    let (go, read_now) = mpsc::channel();
    go.send(()).expect("workload");
    let workload = checking_workload(listener, read_now);
    let mut stream = connect(&topology.client, pod_v4(PORT)).expect("connect");
    let (sent, write_error) = write_pattern(&mut stream, 64 << 20, PATIENCE);
    let _ = stream.shutdown(Shutdown::Write);
    let read = workload.join().expect("workload");
    let log = sluice.log();
    assert_hole_caught(&read, sent, &mut stream, write_error, &log);
}

/// What a caught hole looks like: the workload read no byte past it, its
/// stream ended in a reset, the client's too, and the log names the count.
fn assert_hole_caught(
    read: &Received,
    sent: u64,
    stream: &mut TcpStream,
    write_error: Option<ErrorKind>,
    log: &str,
) {
    assert_eq!(
        read.differs_at, None,
        "the workload read past the hole ({} of {sent} bytes sent)\n{log}",
        read.bytes
    );
    assert!(
        read.end.is_some_and(is_reset),
        "the workload's stream ended with {:?} after {} bytes, not a reset\n{log}",
        read.end,
        read.bytes
    );
    assert_client_reset(stream, write_error, log);
    assert!(
        log.contains("still queued"),
        "the count is not named\n{log}"
    );
}

/// The same undone join with no byte lost: the count agrees, `SO_RCVLOWAT`
/// is back to one, and copy carries the connection on, bytes exact.
#[test]
fn an_undone_join_goes_on_with_copy() {
    let topology = ClientPod::new("smf-copy").expect("topology");
    let _workload = Workload::start(&topology.pod, PORT, Behaviour::Echo, 1);
    let sluice = sluice_with_faults(&topology, "sockmap-unjoin", &[]);
    for seed in 0..3 {
        let mut stream = connect(&topology.client, pod_v4(PORT)).expect("connect");
        // Echoes with no FIN behind them: reads that waited for
        // SO_RCVLOWAT's megabyte would never end.
        for (len, more) in [(1, 0), (1000, 1), (4 << 20, 2)] {
            if let Err(error) = echo_once_checked(&mut stream, &random_bytes(len, seed * 3 + more))
            {
                panic!("{len} bytes: {error}\n{}", sluice.log());
            }
        }
        stream.shutdown(Shutdown::Write).expect("half-close");
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).expect("trailer");
        assert_eq!(rest, TRAILER);
    }
    let log = sluice.stop();
    assert!(log.contains("test-inject: sockmap-unjoin"), "{log}");
}

/// Redirected bytes that never reach the workload's socket (lost in the
/// kernel, with no error on either socket) hold the client's FIN back for
/// ever: with `--idle-timeout 0` nothing else would end the connection.
/// sluice sees the workload's send queue empty with bytes missing and
/// resets both sides.
#[test]
fn bytes_lost_on_the_way_reset_the_connection() {
    let topology = ClientPod::new("smf-lost").expect("topology");
    let _workload = Workload::start(&topology.pod, PORT, Behaviour::Echo, 1);
    let sluice = sluice_with_faults(&topology, "sockmap-lost=4096", &["--idle-timeout", "0"]);
    let mut stream = connect(&topology.client, pod_v4(PORT)).expect("connect");
    echo_once(&mut stream, &random_bytes(1000, 1));
    stream.shutdown(Shutdown::Write).expect("half-close");
    stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
    let start = Instant::now();
    let mut rest = Vec::new();
    let end = stream.read_to_end(&mut rest);
    let log = sluice.log();
    match end {
        Err(error) if is_reset(error.kind()) => {}
        other => panic!(
            "after {:?} the client's stream ended with {other:?} ({} bytes), not a reset\n{log}",
            start.elapsed(),
            rest.len()
        ),
    }
    // Logged as the connection ends, which may be just after the reset.
    sluice.wait_for_log(&["never reached the peer"]);
}
