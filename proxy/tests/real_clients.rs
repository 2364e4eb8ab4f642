//! Real clients through sluice: Redis's own `redis-benchmark` with a new
//! connection per request (`-k 0`), from a client whose ephemeral ports span
//! 1024-65535 (as behind a NAT gateway or kube-proxy's masquerade), against
//! Debian's `redis-server` in the pod, in every interception mode with
//! sluice's defaults otherwise. It must complete without one error, and
//! every connection redis accepted must have come through sluice.
//!
//! redis-benchmark stops at its first connection error ("Connection reset
//! by peer"), and a connection that stalls stalls it: either fails the test.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use netlab::{ClientPod, Netns, Proc};

const REDIS_PORT: u16 = 6379;
/// A few seconds through sluice on two cores (a few thousand connections a
/// second), with the other modes' tests beside it.
const REQUESTS: u64 = 10_000;
const CLIENTS: u32 = 20;
/// Past this redis-benchmark is killed and the test fails: a connection
/// that stalls never ends it.
const LIMIT: Duration = Duration::from_secs(90);

/// The installed program `name`, or a failure that says what to install:
/// a missing redis must not pass as a skipped test.
fn program(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin", "/usr/sbin", "/usr/local/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not installed: this test needs Debian's redis-server and redis-tools \
                 packages (`make test` installs them; by hand: apt-get install redis-server \
                 redis-tools)"
            )
        })
}

/// A redis-server of the test's own in the pod namespace (never the
/// machine's system service), without persistence, on a Unix socket too so
/// that the test can ask it what it accepted without a TCP connection.
struct Redis {
    process: Option<Proc>,
    socket: PathBuf,
    /// Our `INFO` connections, which redis counts as accepted too.
    queries: u64,
}

impl Redis {
    fn start(pod: &Netns, tag: &str) -> Redis {
        let server = program("redis-server");
        let socket =
            std::env::temp_dir().join(format!("sl-test-redis-{}-{tag}.sock", std::process::id()));
        let mut command = Command::new(server);
        command
            .args(["--port", &REDIS_PORT.to_string(), "--bind", "0.0.0.0", "::"])
            .args(["--protected-mode", "no", "--daemonize", "no"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(std::env::temp_dir())
            .arg("--unixsocket")
            .arg(&socket)
            .args(["--unixsocketperm", "700", "--logfile", ""])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let process = pod.spawn(&mut command).expect("spawn redis-server");
        let mut redis = Redis {
            process: Some(process),
            socket,
            queries: 0,
        };
        let deadline = Instant::now() + PATIENCE;
        loop {
            let exited = redis
                .process
                .as_mut()
                .and_then(|p| p.try_wait().expect("wait for redis-server"));
            assert!(exited.is_none(), "redis-server exited at start: {exited:?}");
            match redis.try_accepted() {
                Ok(_) => return redis,
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "redis-server never answered on {}: {e}",
                    redis.socket.display()
                ),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// TCP connections redis has accepted so far.
    fn accepted(&mut self) -> u64 {
        self.try_accepted()
            .unwrap_or_else(|e| panic!("INFO stats from redis: {e}"))
    }

    fn try_accepted(&mut self) -> std::io::Result<u64> {
        let stream = UnixStream::connect(&self.socket)?;
        // Counted from here: redis counts the connection, answered or not.
        self.queries += 1;
        stream.set_read_timeout(Some(PATIENCE))?;
        (&stream).write_all(b"INFO stats\r\n")?;
        let mut reader = BufReader::new(stream);
        let mut head = String::new();
        reader.read_line(&mut head)?;
        let len: usize = head
            .trim_end()
            .strip_prefix('$')
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("INFO answered {head:?}")))?;
        let mut body = vec![0u8; len];
        reader.read_exact(&mut body)?;
        let stats = String::from_utf8_lossy(&body);
        let total: u64 = stats
            .lines()
            .find_map(|l| l.trim().strip_prefix("total_connections_received:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("no connection count in {stats}")))?;
        Ok(total.saturating_sub(self.queries))
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        drop(self.process.take());
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// sluice's count of connections it forwarded to the workload.
fn opened(client: &Netns) -> u64 {
    let (status, metrics) = get(client, pod_v4(METRICS), "/metrics");
    assert_eq!(status, 200, "{metrics}");
    sample(&metrics, "sluice_connections_opened_total") as u64
}

/// Lines of redis-benchmark's output that report a failure (some it
/// prints and goes on).
fn problems(text: &str) -> Vec<&str> {
    const WORDS: [&str; 7] = [
        "error",
        "reset",
        "timeout",
        "timed out",
        "refused",
        "could not",
        "broken pipe",
    ];
    text.lines()
        .filter(|l| {
            let lower = l.to_lowercase();
            WORDS.iter().any(|w| lower.contains(w))
        })
        .collect()
}

/// Requests per second of the `--csv` result line.
fn requests_per_second(csv: &str) -> Option<f64> {
    let line = csv
        .lines()
        .find(|l| l.starts_with('"') && !l.starts_with("\"test\""))?;
    line.split(',').nth(1)?.trim_matches('"').parse().ok()
}

fn redis_benchmark_without_keepalive(mode: &str) {
    let benchmark = program("redis-benchmark");
    let topology = ClientPod::new(&format!("rc{mode}")).expect("topology");
    topology
        .client
        .sysctl_set("net.ipv4.ip_local_port_range", "1024 65535")
        .expect("the client's port range");
    let mut redis = Redis::start(&topology.pod, mode);
    let mut args = vec!["--mode", mode, "--ports", "6379"];
    // ebpf attaches its program itself; the others are given their rules.
    if mode != "ebpf" {
        args.push("--install-rules");
    }
    let sluice = Sluice::run(&topology.pod, &args);
    let accepted_before = redis.accepted();
    let opened_before = opened(&topology.client);

    let mut command = Command::new(benchmark);
    command
        .args(["-h", &ClientPod::POD_V4.to_string()])
        .args(["-p", &REDIS_PORT.to_string()])
        .args(["-c", &CLIENTS.to_string(), "-n", &REQUESTS.to_string()])
        .args(["-k", "0", "-t", "ping_mbulk", "--csv"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let output = topology
        .client
        .spawn(&mut command)
        .expect("spawn redis-benchmark in the client namespace")
        .wait_output(LIMIT)
        .unwrap_or_else(|e| {
            panic!(
                "{mode}: redis-benchmark -k 0 did not finish {REQUESTS} requests ({e}); \
                 sluice's log:\n{}",
                sluice.log()
            )
        });
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!(
        "{mode}: {REQUESTS} requests, a connection each, in {:?}:\n{stdout}",
        started.elapsed()
    );
    assert!(
        output.status.success(),
        "{mode}: redis-benchmark -k 0 exited with {}: {stderr}{stdout}\nsluice's log:\n{}",
        output.status,
        sluice.log()
    );
    let printed = [problems(&stderr), problems(&stdout)].concat();
    assert!(
        printed.is_empty(),
        "{mode}: redis-benchmark -k 0 reported {printed:?}"
    );
    let rps = requests_per_second(&stdout)
        .unwrap_or_else(|| panic!("{mode}: no result in redis-benchmark's output: {stdout}"));
    assert!(rps > 0.0, "{mode}: {rps} requests/s");

    // A connection per request, and redis-benchmark's CONFIG GET. The last
    // connections may still be on their way to redis when redis-benchmark
    // has exited (sluice connects after the client's handshake): the counts
    // settle within moments, and a bypass keeps redis's above sluice's.
    let deadline = Instant::now() + Duration::from_secs(5);
    let (accepted, forwarded) = loop {
        let forwarded = opened(&topology.client) - opened_before;
        let accepted = redis.accepted() - accepted_before;
        if accepted == forwarded || Instant::now() > deadline {
            break (accepted, forwarded);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(accepted >= REQUESTS, "{mode}: redis accepted {accepted}");
    assert_eq!(
        forwarded, accepted,
        "{mode}: sluice forwarded {forwarded} connections, redis accepted {accepted}: \
         not every one came through sluice"
    );
    sluice.stop();
}

#[test]
fn redis_benchmark_without_keepalive_through_tproxy() {
    redis_benchmark_without_keepalive("tproxy");
}

#[test]
fn redis_benchmark_without_keepalive_through_ebpf() {
    redis_benchmark_without_keepalive("ebpf");
}

#[test]
fn redis_benchmark_without_keepalive_through_redirect() {
    redis_benchmark_without_keepalive("redirect");
}
