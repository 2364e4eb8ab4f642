//! Micro-benchmarks of sluice's forwarders on 127.0.0.1, no interception: a
//! client socket ⇄ a forwarder joining the socket it accepted and its own
//! socket to the server ⇄ a sink or echo server. Every socket lives in a
//! netlab namespace made per group (the machine's own namespace is left
//! alone, and the sockmap holds only those sockets): the threads that make
//! them are started inside it, and so stay in it.
//!
//! The forwarder runs as in a sluice worker: on its own thread, in its own
//! tokio-uring runtime, with sluice's upstream connect and forwarder. The
//! client (criterion's loop) and the server are plain blocking std sockets.
//! Each route (`direct`, no forwarder, then `copy`, `splice`, `sockmap`) gets
//! one connection per group, set up before and checked after the
//! measurement, so an iteration times only bytes crossing the route:
//!
//! - `transfer_64KiB`, `transfer_16MiB`: the client writes the payload and
//!   waits for the server's one-byte acknowledgement that all of it arrived;
//! - `round_trip_64B`: 64 bytes out and echoed back.
//!
//! `direct` is the reference: read the forwarders' figures as ratios to it.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use netlab::Netns;
use sluice::config::Forwarder;
use sluice::forward::sockmap::{self, SockmapEngine};
use sluice::forward::{self, End, Forwarded, Forwarding};

/// Longer than any iteration and than criterion's analysis between the
/// measurement and the checks: only a lost byte or a stuck forwarder waits
/// this long, and it then fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(30);

const ROUTES: [Route; 4] = [
    Route::Direct,
    Route::Through(Forwarder::Copy),
    Route::Through(Forwarder::Splice),
    Route::Through(Forwarder::Sockmap),
];

#[derive(Clone, Copy)]
enum Route {
    Direct,
    Through(Forwarder),
}

impl Route {
    fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Through(Forwarder::Copy) => "copy",
            Route::Through(Forwarder::Splice) => "splice",
            Route::Through(Forwarder::Sockmap) => "sockmap",
        }
    }
}

/// What the server does with each `unit` bytes it reads.
#[derive(Clone, Copy)]
enum Serve {
    /// Answers one byte, the last one it read.
    Sink { unit: usize },
    /// Sends them back.
    Echo { unit: usize },
}

impl Serve {
    fn unit(self) -> usize {
        match self {
            Serve::Sink { unit } | Serve::Echo { unit } => unit,
        }
    }
}

/// Bytes the server read and wrote on its one connection.
struct Served {
    received: u64,
    sent: u64,
}

/// One connection from the client to the server along a route.
struct Path {
    route: Route,
    client: TcpStream,
    server: JoinHandle<Served>,
    forwarder: Option<JoinHandle<Forwarded>>,
}

impl Path {
    fn open(ns: &Netns, route: Route, serve: Serve) -> Path {
        // A thread inherits the namespace of the thread that starts it.
        ns.run(|| Path::open_here(route, serve))
    }

    fn open_here(route: Route, serve: Serve) -> Path {
        let server_listener = loopback_listener();
        let server_addr = local_addr(&server_listener);
        let server = std::thread::Builder::new()
            .name("bench-server".into())
            .spawn(move || serve_one(server_listener, serve))
            .expect("spawn the server thread");
        let (target, forwarder) = match route {
            Route::Direct => (server_addr, None),
            Route::Through(forwarder) => {
                let listener = loopback_listener();
                let addr = local_addr(&listener);
                let forwarding = forwarding(forwarder);
                let thread = std::thread::Builder::new()
                    .name(format!("sluice-{}", route.name()))
                    .spawn(move || forward_one(listener, server_addr, forwarding))
                    .expect("spawn the forwarder thread");
                (addr, Some(thread))
            }
        };
        let client = TcpStream::connect(target).expect("connect the client");
        client.set_nodelay(true).expect("client TCP_NODELAY");
        client
            .set_read_timeout(Some(PATIENCE))
            .expect("client read timeout");
        client
            .set_write_timeout(Some(PATIENCE))
            .expect("client write timeout");
        let mut path = Path {
            route,
            client,
            server,
            forwarder,
        };
        // One exchange before any measurement: the connection is then set
        // up all the way (for sockmap: joined, which the kernel refuses
        // after a FIN), also when a filter skips the benchmark.
        let probe = payload(serve.unit());
        match serve {
            Serve::Sink { .. } => path.transfer(&probe),
            Serve::Echo { .. } => path.round_trip(&probe, &mut vec![0; probe.len()]),
        }
        path
    }

    /// Sends `payload` and waits for the server's acknowledgement.
    fn transfer(&mut self, payload: &[u8]) {
        self.client.write_all(payload).expect("send the payload");
        let mut ack = [0u8; 1];
        self.client
            .read_exact(&mut ack)
            .expect("read the server's acknowledgement");
        assert_eq!(
            Some(&ack[0]),
            payload.last(),
            "{}: the server's last byte differs from the payload's",
            self.route.name()
        );
    }

    /// Sends `request` and reads its echo into `reply`.
    fn round_trip(&mut self, request: &[u8], reply: &mut [u8]) {
        self.client.write_all(request).expect("send the request");
        self.client.read_exact(reply).expect("read the echo");
        assert!(
            request == reply,
            "{}: the echo differs from the request",
            self.route.name()
        );
    }

    /// Closes the connection from the client's side and checks that the
    /// forwarder passed on every byte both ways and both FINs.
    fn close(self) {
        let Path {
            route,
            mut client,
            server,
            forwarder,
        } = self;
        let name = route.name();
        client.shutdown(Shutdown::Write).expect("client FIN");
        let mut rest = Vec::new();
        client
            .read_to_end(&mut rest)
            .unwrap_or_else(|e| panic!("{name}: reading to the server's FIN: {e}"));
        assert!(rest.is_empty(), "{name}: unexpected bytes before the FIN");
        let served = server
            .join()
            .unwrap_or_else(|_| panic!("{name}: the server failed"));
        let Some(forwarder) = forwarder else {
            return;
        };
        let forwarded = forwarder
            .join()
            .unwrap_or_else(|_| panic!("{name}: the forwarder failed"));
        for (direction, to, expected) in [
            (&forwarded.upstream, "server", served.received),
            (&forwarded.downstream, "client", served.sent),
        ] {
            assert!(
                matches!(direction.end, End::Eof),
                "{name}: towards the {to}: {:?}",
                direction.end
            );
            assert_eq!(
                direction.bytes, expected,
                "{name}: bytes forwarded towards the {to}"
            );
        }
    }
}

fn loopback_listener() -> TcpListener {
    TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).expect("listen on 127.0.0.1")
}

fn local_addr(listener: &TcpListener) -> SocketAddr {
    listener.local_addr().expect("listener's address")
}

/// The forwarder as sluice sets it up. sockmap has no fallback here: copy's
/// figures must not appear under its name; and it joins at once, so that
/// these figures are the kernel's redirect, not copy's first moments.
fn forwarding(forwarder: Forwarder) -> Forwarding {
    match forwarder {
        Forwarder::Sockmap => match SockmapEngine::new(1) {
            Ok(engine) => Forwarding::Sockmap {
                engine: Arc::new(engine),
                after: std::time::Duration::ZERO,
            },
            Err(error) => panic!("the sockmap forwarder: {}", chain(&error)),
        },
        other => Forwarding::new(other, std::time::Duration::ZERO, 1),
    }
}

/// The mark sluice's upstream sockets carry (sluice's default); the server
/// is on loopback, which needs no policy route.
const UPSTREAM_MARK: u32 = 1337;

/// A sluice worker for one connection: accepts it, connects to `server`
/// and forwards until both directions have ended.
fn forward_one(listener: TcpListener, server: SocketAddr, forwarding: Forwarding) -> Forwarded {
    let runtime = tokio_uring::Runtime::new(tokio_uring::builder().entries(1024))
        .expect("an io_uring runtime (is kernel.io_uring_disabled set?)");
    runtime.block_on(async move {
        let listener = tokio_uring::net::TcpListener::from_std(listener);
        let (client, _) = listener.accept().await.expect("forwarder: accept");
        sluice::linux::set_nodelay(&client).expect("forwarder: TCP_NODELAY");
        let pending = sluice::upstream::start(
            sluice::upstream::Leg::FromBypass,
            server,
            server.ip(),
            UPSTREAM_MARK,
        )
        .expect("forwarder: upstream socket");
        let upstream = pending
            .finish()
            .await
            .expect("forwarder: connect to the server");
        match &forwarding {
            Forwarding::Sockmap { engine, .. } => {
                match sockmap::forward(engine, &client, &upstream, [0, 0]).await {
                    sockmap::Outcome::Forwarded(forwarded) => forwarded,
                    sockmap::Outcome::NotJoined(e) | sockmap::Outcome::Failed(e) => {
                        panic!("sockmap: the sockets were not joined: {e}")
                    }
                }
            }
            _ => forward::forward(&forwarding, &client, &upstream)
                .await
                .expect("the forwarder could not start"),
        }
    })
}

/// Serves one connection until the client's FIN, then closes.
fn serve_one(listener: TcpListener, serve: Serve) -> Served {
    let (mut stream, _) = listener.accept().expect("server: accept");
    drop(listener);
    stream.set_nodelay(true).expect("server TCP_NODELAY");
    stream
        .set_read_timeout(Some(PATIENCE))
        .expect("server read timeout");
    stream
        .set_write_timeout(Some(PATIENCE))
        .expect("server write timeout");
    let mut served = Served {
        received: 0,
        sent: 0,
    };
    let unit = serve.unit();
    let echo = matches!(serve, Serve::Echo { .. });
    let mut buf = vec![0u8; unit.min(256 << 10)];
    while let Some(last) = read_unit(&mut stream, &mut buf, unit) {
        served.received += unit as u64;
        let answer = if echo { &buf[..unit] } else { &[last][..] };
        stream.write_all(answer).expect("server: answer");
        served.sent += answer.len() as u64;
    }
    served
}

/// Reads `unit` bytes through `buf` (which holds all of them when it is
/// `unit` long); returns the last, or None on a FIN before the first.
fn read_unit(stream: &mut TcpStream, buf: &mut [u8], unit: usize) -> Option<u8> {
    let mut remaining = unit;
    let mut last = 0;
    while remaining > 0 {
        let at = (unit - remaining) % buf.len();
        let want = remaining.min(buf.len() - at);
        let n = match stream.read(&mut buf[at..at + want]) {
            Ok(0) if remaining == unit => return None,
            Ok(0) => panic!("server: FIN in the middle of a {unit}-byte unit"),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => panic!("server: read: {e}"),
        };
        last = buf[at + n - 1];
        remaining -= n;
    }
    Some(last)
}

fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(&format!(": {e}"));
        source = e.source();
    }
    text
}

/// Not a constant byte, so the acknowledgement's check means something.
fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

fn transfer(c: &mut Criterion, name: &str, len: usize) {
    let payload = payload(len);
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Bytes(len as u64));
    if len >= 1 << 20 {
        // Milliseconds per iteration: criterion's linear sampling would
        // need far more time than the measurement time for its samples.
        group
            .sampling_mode(SamplingMode::Flat)
            .sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3));
    } else {
        group
            .sample_size(20)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2));
    }
    let ns = Netns::new("micro").expect("a network namespace for the benchmark (needs root)");
    for route in ROUTES {
        let mut path = Path::open(&ns, route, Serve::Sink { unit: len });
        group.bench_function(route.name(), |b| b.iter(|| path.transfer(&payload)));
        path.close();
    }
    group.finish();
}

fn transfers(c: &mut Criterion) {
    transfer(c, "transfer_64KiB", 64 << 10);
    transfer(c, "transfer_16MiB", 16 << 20);
}

fn round_trips(c: &mut Criterion) {
    const LEN: usize = 64;
    let request = payload(LEN);
    let mut reply = vec![0u8; LEN];
    let mut group = c.benchmark_group("round_trip_64B");
    group
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let ns = Netns::new("micro").expect("a network namespace for the benchmark (needs root)");
    for route in ROUTES {
        let mut path = Path::open(&ns, route, Serve::Echo { unit: LEN });
        group.bench_function(route.name(), |b| {
            b.iter(|| path.round_trip(&request, &mut reply))
        });
        path.close();
    }
    group.finish();
}

criterion_group! {
    name = forwarders;
    config = Criterion::default().without_plots();
    targets = transfers, round_trips
}
criterion_main!(forwarders);
