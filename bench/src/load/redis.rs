//! Redis: a real client and server instead of our own echo. Debian's
//! `redis-server` runs in the pod namespace on [`PORT`], intercepted like the
//! workload's port; Debian's `redis-benchmark` runs in the client namespace
//! against the pod's address, either over keep-alive connections (`-k 1`) or
//! with a new connection per request (`-k 0`), and its own figures are
//! taken: requests per second and, from redis-benchmark 7 on, the p50.
//!
//! redis-benchmark knows no duration, so each run is a number of requests,
//! bounded by a deadline past which it is killed (a stalled connection never
//! ends it). It stops at its first connection error; a run that did not
//! complete is a failed load, not a figure.
//!
//! Which way the connections came cannot be read from redis's sockets (the
//! echo workload reads their mark), so it is counted instead: every
//! connection through an interceptor is accepted twice in the pod namespace
//! (by the interceptor, then by redis), one that bypassed it once. Redis
//! tells how many it accepted (`INFO stats`, asked over a Unix socket, which
//! is no TCP accept), the pod's TCP MIB how many the namespace accepted in
//! all (`PassiveOpens`); nothing else accepts there during the load.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use netlab::{Netns, Proc};
use serde::Serialize;

use super::{Errors, IO_TIMEOUT};
use crate::scenario::find_program;
use crate::workload::Peers;

/// redis-server's port in the pod namespace (Redis's own default).
pub const PORT: u16 = 6379;
/// The redis-benchmark test: PING in the multi-bulk protocol every client
/// library speaks, so the server's work is as small as a command gets and
/// what is measured is the path to it.
pub const TEST: &str = "ping_mbulk";
/// How long redis-server may take to answer its first `INFO`.
const START_WITHIN: Duration = Duration::from_secs(10);
/// What `make bench-deps` installs.
const PACKAGES: &str = "Debian's redis-server and redis-tools (make bench-deps installs them)";

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Params {
    /// `-k 1`: each client keeps its connection; `-k 0`: a new connection
    /// per request.
    pub keepalive: bool,
    /// `-c`: parallel clients.
    pub clients: usize,
    /// `-n`: requests in all.
    pub requests: u64,
    /// Past this, redis-benchmark is killed and the load has failed.
    pub limit: Duration,
}

impl Params {
    /// The load's name in progress lines.
    pub fn label(&self) -> &'static str {
        if self.keepalive {
            "redis keep-alive"
        } else {
            "redis -k 0"
        }
    }

    /// How the clients connect, as the report says it.
    pub fn connections(&self) -> &'static str {
        if self.keepalive {
            "keep-alive"
        } else {
            "one per request"
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub params: Params,
    /// Requests completed: all that were asked for (redis-benchmark stops at
    /// its first failure), over every round.
    pub requests: u64,
    /// Requests per second as redis-benchmark measured them, over every round.
    pub rps: f64,
    /// The time those requests took (requests / rps of each round), summed.
    pub measured_s: f64,
    /// The median of the rounds' p50 latency in milliseconds; None when
    /// redis-benchmark (before 7) does not print it.
    pub p50_ms: Option<f64>,
    pub p50_ms_rounds: Vec<f64>,
    /// TCP connections redis accepted during the load.
    pub connections: u64,
    /// Problems redis-benchmark printed without stopping.
    pub errors: Errors,
    /// Which way redis's connections came (see the module's header).
    pub peers: Peers,
    /// Wall time, redis-benchmark's start and its `CONFIG GET` included.
    pub elapsed_s: f64,
    /// Runs merged into this report.
    pub rounds: u32,
}

impl Report {
    /// Adds another run of the same load.
    pub fn merge(&mut self, other: Report) {
        self.requests += other.requests;
        self.measured_s += other.measured_s;
        self.rps = rate(self.requests, self.measured_s);
        self.p50_ms_rounds.extend(other.p50_ms_rounds);
        self.p50_ms = median(&self.p50_ms_rounds);
        self.connections += other.connections;
        self.errors.merge(other.errors);
        self.peers = self.peers.plus(other.peers);
        self.elapsed_s += other.elapsed_s;
        self.rounds += other.rounds;
    }
}

fn rate(requests: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        requests as f64 / seconds
    } else {
        0.0
    }
}

/// The median: percentiles of different rounds do not add up, and one
/// disturbed round should not move it.
fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if !n.is_multiple_of(2) => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// The installed redis-server and redis-benchmark.
#[derive(Debug, Clone)]
pub struct Programs {
    pub server: PathBuf,
    pub benchmark: PathBuf,
    /// redis-server's version (`v=` of `--version`), for the report.
    pub version: Option<String>,
}

impl Programs {
    pub fn find() -> Result<Programs> {
        let find = |name: &str| {
            find_program(name).ok_or_else(|| {
                anyhow!(
                    "{name} is not installed: the redis load needs {PACKAGES}; or leave it out \
                     with --loads"
                )
            })
        };
        let server = find("redis-server")?;
        let benchmark = find("redis-benchmark")?;
        let version = Command::new(&server)
            .arg("--version")
            .output()
            .ok()
            .and_then(|out| version(&String::from_utf8_lossy(&out.stdout)));
        Ok(Programs {
            server,
            benchmark,
            version,
        })
    }
}

/// `7.0.15` of "Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0 ...".
fn version(text: &str) -> Option<String> {
    text.split_whitespace()
        .find_map(|word| word.strip_prefix("v="))
        .map(str::to_string)
}

/// A redis-server in the pod namespace: no persistence, reachable from the
/// client, and on a Unix socket for the runner's `INFO`. Stopped (and its
/// files removed) on drop.
pub struct Server {
    process: Option<Proc>,
    socket: PathBuf,
    log: PathBuf,
    benchmark: PathBuf,
    /// `INFO` connections of ours, which redis counts as accepted too.
    queries: AtomicU64,
}

impl Server {
    /// Starts redis-server in `pod`; its socket and log go in `scratch`,
    /// named after `tag`.
    pub fn start(pod: &Netns, programs: &Programs, scratch: &Path, tag: &str) -> Result<Server> {
        let socket = scratch.join(format!("sl-bench-redis-{tag}.sock"));
        let log = scratch.join(format!("sl-bench-redis-{tag}.log"));
        let mut command = Command::new(&programs.server);
        command
            .args(["--port", &PORT.to_string(), "--bind", "0.0.0.0", "::"])
            .args(["--protected-mode", "no", "--daemonize", "no"])
            // Nothing on disk: the figures are the path's, not the disk's.
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(scratch)
            .arg("--unixsocket")
            .arg(&socket)
            .args(["--unixsocketperm", "700"])
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let process = pod.spawn(&mut command).context("starting redis-server")?;
        let mut server = Server {
            process: Some(process),
            socket,
            log,
            benchmark: programs.benchmark.clone(),
            queries: AtomicU64::new(0),
        };
        let deadline = Instant::now() + START_WITHIN;
        loop {
            let exited = match server.process.as_mut() {
                Some(p) => p.try_wait()?,
                None => None,
            };
            if let Some(status) = exited {
                bail!(
                    "redis-server exited at start ({status}); its log:\n{}",
                    server.log_text()
                );
            }
            match server.accepted() {
                Ok(_) => return Ok(server),
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context(format!(
                        "redis-server did not answer within {START_WITHIN:?}; its log:\n{}",
                        server.log_text()
                    )));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// TCP connections redis has accepted so far (its own count, less our
    /// `INFO` connections).
    pub fn accepted(&self) -> Result<u64> {
        let stats = info(&self.socket, "stats", &self.queries)?;
        let total = field(&stats, "total_connections_received")
            .ok_or_else(|| anyhow!("INFO stats has no total_connections_received: {stats}"))?;
        Ok(total.saturating_sub(self.queries.load(Ordering::SeqCst)))
    }

    /// One PING from `client` to `target`: the interceptor in front of
    /// redis lets it through.
    pub fn probe(&self, client: &Netns, target: SocketAddr) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match client.try_run(|| ping(target))? {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(anyhow::Error::new(e).context(format!("PING to redis at {target}")));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        drop(self.process.take());
        for path in [&self.socket, &self.log] {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn ping(target: SocketAddr) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&target, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.write_all(b"PING\r\n")?;
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply)?;
    if &reply != b"+PONG\r\n" {
        return Err(std::io::Error::other(format!(
            "PING answered {:?}",
            String::from_utf8_lossy(&reply)
        )));
    }
    Ok(())
}

/// `INFO <section>` over redis's Unix socket: the bulk string's text.
/// `connections` counts the connections made, which redis counts too,
/// answered or not.
fn info(socket: &Path, section: &str, connections: &AtomicU64) -> Result<String> {
    let stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to redis at {}", socket.display()))?;
    connections.fetch_add(1, Ordering::SeqCst);
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    (&stream).write_all(format!("INFO {section}\r\n").as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut head = String::new();
    reader.read_line(&mut head)?;
    let len: usize = head
        .trim_end()
        .strip_prefix('$')
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow!("INFO answered {head:?}"))?;
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body)?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// `name:value` of an `INFO` reply, as a number.
fn field(info: &str, name: &str) -> Option<u64> {
    info.lines()
        .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
}

/// The TCP connections `ns` has accepted so far: `PassiveOpens` of its
/// TCP MIB (IPv4 and IPv6 share it).
pub fn passive_opens(ns: &Netns) -> Result<u64> {
    // thread-self: /proc/net would follow the process's namespace, not
    // this thread's.
    let snmp = ns.try_run(|| std::fs::read_to_string("/proc/thread-self/net/snmp"))??;
    snmp_field(&snmp, "Tcp:", "PassiveOpens")
        .ok_or_else(|| anyhow!("no Tcp PassiveOpens in /proc/net/snmp"))
}

/// A counter of /proc/net/snmp: a line of names, then a line of values,
/// both starting with `prefix`.
fn snmp_field(snmp: &str, prefix: &str, name: &str) -> Option<u64> {
    let mut lines = snmp.lines().filter(|l| l.starts_with(prefix));
    let names = lines.next()?.split_whitespace();
    let values = lines.next()?.split_whitespace();
    names
        .zip(values)
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
}

/// Which way `connections` redis accepted came, given the pod's
/// `passive_opens` over the same time: the accepts beyond redis's are the
/// interceptor's, one per connection it forwarded; redis's connections
/// beyond those bypassed it. A client the interceptor accepted but could
/// not forward would hide one bypass; such a run has failed anyway.
pub fn split_peers(connections: u64, passive_opens: u64) -> Peers {
    let via_proxy = connections.min(passive_opens.saturating_sub(connections));
    Peers {
        via_proxy,
        not_via_proxy: connections - via_proxy,
    }
}

/// Redis's accepted connections and the pod's passive opens, once they no
/// longer move. redis-benchmark's last connections can still be on their
/// way when it exits (an interceptor connects to redis after the client's
/// handshake with it, and redis accepts after that), and one counted in the
/// next load's window would show there as a bypass.
fn settled(server: &Server, pod: &Netns) -> Result<(u64, u64)> {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut last = (server.accepted()?, passive_opens(pod)?);
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = (server.accepted()?, passive_opens(pod)?);
        if now == last || Instant::now() > deadline {
            return Ok(now);
        }
        last = now;
    }
}

/// What redis-benchmark's `--csv` says of the one test it ran.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Csv {
    pub rps: f64,
    pub p50_ms: Option<f64>,
}

/// `"test","rps",...,"p50_latency_ms",...` then one line per test;
/// before redis 7, only test and rps, without a header.
pub fn parse_csv(stdout: &str) -> Option<Csv> {
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .filter(|l| l.starts_with('"'))
        .map(|l| l.split(',').map(|c| c.trim().trim_matches('"')).collect())
        .collect();
    let header = rows.iter().find(|r| r.first() == Some(&"test"));
    let data = rows.iter().find(|r| r.first() != Some(&"test"))?;
    let column = |name: &str, default: Option<usize>| {
        let index = match header {
            Some(h) => h.iter().position(|c| *c == name),
            None => default,
        }?;
        data.get(index)?.parse::<f64>().ok()
    };
    let rps = column("rps", Some(1)).filter(|r| r.is_finite() && *r > 0.0)?;
    let p50_ms = column("p50_latency_ms", None);
    Some(Csv { rps, p50_ms })
}

/// Lines of redis-benchmark's output that report a failure (it prints some
/// and goes on, e.g. "Error writing to the server").
pub fn problem_lines(text: &str) -> Vec<&str> {
    const PROBLEMS: [&str; 7] = [
        "error",
        "reset",
        "timeout",
        "timed out",
        "refused",
        "could not",
        "broken pipe",
    ];
    text.lines()
        .map(str::trim)
        .filter(|l| {
            let lower = l.to_lowercase();
            PROBLEMS.iter().any(|p| lower.contains(p))
        })
        .collect()
}

/// One redis-benchmark run of `params` from `client` against `target`,
/// where `server` listens in `pod`.
pub fn run(
    client: &Netns,
    pod: &Netns,
    server: &Server,
    target: SocketAddr,
    params: Params,
) -> Result<Report> {
    ensure!(
        params.clients > 0 && params.requests > 0,
        "the redis load needs clients and requests"
    );
    let accepted_before = server.accepted()?;
    let opens_before = passive_opens(pod)?;
    let mut command = Command::new(&server.benchmark);
    command
        .args([
            "-h",
            &target.ip().to_string(),
            "-p",
            &target.port().to_string(),
        ])
        .args(["-c", &params.clients.to_string()])
        .args(["-n", &params.requests.to_string()])
        .args(["-k", if params.keepalive { "1" } else { "0" }])
        .args(["-t", TEST, "--csv"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let process = client
        .spawn(&mut command)
        .context("starting redis-benchmark in the client namespace")?;
    let output = process.wait_output(params.limit).map_err(|e| {
        anyhow!(
            "redis-benchmark did not finish {} requests within {:?} (a stalled connection?): {e}",
            params.requests,
            params.limit
        )
    })?;
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let mut problems = problem_lines(&stderr);
    problems.extend(problem_lines(&stdout));
    if !output.status.success() {
        let why = problems
            .first()
            .copied()
            .or_else(|| stderr.lines().last())
            .unwrap_or("no message");
        bail!("redis-benchmark exited with {}: {why}", output.status);
    }
    let csv = parse_csv(&stdout).ok_or_else(|| {
        anyhow!("redis-benchmark printed no result; its output:\n{stdout}{stderr}")
    })?;
    let (accepted, opens) = settled(server, pod)?;
    let connections = accepted.saturating_sub(accepted_before);
    let opens = opens.saturating_sub(opens_before);
    let mut errors = Errors::default();
    for line in problems {
        errors.add_kind(&line.chars().take(80).collect::<String>());
    }
    let measured_s = params.requests as f64 / csv.rps;
    Ok(Report {
        params,
        requests: params.requests,
        rps: csv.rps,
        measured_s,
        p50_ms: csv.p50_ms,
        p50_ms_rounds: csv.p50_ms.into_iter().collect(),
        connections,
        errors,
        peers: split_peers(connections, opens),
        elapsed_s: elapsed.as_secs_f64(),
        rounds: 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::testing::Lab;

    const CSV7: &str = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\
                        \"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\
                        \"PING_MBULK\",\"42955.32\",\"0.814\",\"0.120\",\"0.471\",\"3.951\",\"6.959\",\"9.463\"\n";

    #[test]
    fn csv_of_redis_7_and_before() {
        assert_eq!(
            parse_csv(CSV7),
            Some(Csv {
                rps: 42955.32,
                p50_ms: Some(0.471)
            })
        );
        assert_eq!(
            parse_csv("\"PING_MBULK\",\"8964.59\"\n"),
            Some(Csv {
                rps: 8964.59,
                p50_ms: None
            })
        );
        assert_eq!(parse_csv(""), None);
        assert_eq!(
            parse_csv("\"test\",\"rps\"\n\"PING_MBULK\",\"0.00\"\n"),
            None
        );
    }

    #[test]
    fn version_of_redis_server() {
        let text = "Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0 bits=64 \
                    build=ae4d7c971a948f0\n";
        assert_eq!(version(text).as_deref(), Some("7.0.15"));
        assert_eq!(version("redis-server: command not found"), None);
    }

    #[test]
    fn problems_but_not_the_keepalive_warning() {
        let text = "WARNING: Keepalive disabled. You probably need 'echo 1 > \
                    /proc/sys/net/ipv4/tcp_tw_reuse' for Linux\n\
                    Error: Connection reset by peer\n\
                    Could not connect to Redis at 198.18.0.2:6379: Connection refused\n";
        assert_eq!(
            problem_lines(text),
            [
                "Error: Connection reset by peer",
                "Could not connect to Redis at 198.18.0.2:6379: Connection refused"
            ]
        );
        assert!(problem_lines(CSV7).is_empty());
    }

    #[test]
    fn peers_from_the_accept_counts() {
        let peers = |via_proxy, not_via_proxy| Peers {
            via_proxy,
            not_via_proxy,
        };
        // direct: one accept per connection, redis's.
        assert_eq!(split_peers(100, 100), peers(0, 100));
        // through a proxy: two.
        assert_eq!(split_peers(100, 200), peers(100, 0));
        assert_eq!(split_peers(100, 190), peers(90, 10));
        // a proxy that accepted more than it forwarded.
        assert_eq!(split_peers(100, 230), peers(100, 0));
        assert_eq!(split_peers(0, 5), peers(0, 0));
        assert_eq!(split_peers(5, 0), peers(0, 5));
    }

    #[test]
    fn median_and_merge() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        let params = Params {
            keepalive: true,
            clients: 1,
            requests: 100,
            limit: Duration::from_secs(1),
        };
        let report = |rps: f64, p50: f64| Report {
            params,
            requests: 100,
            rps,
            measured_s: 100.0 / rps,
            p50_ms: Some(p50),
            p50_ms_rounds: vec![p50],
            connections: 1,
            errors: Errors::default(),
            peers: Peers::default(),
            elapsed_s: 1.0,
            rounds: 1,
        };
        let mut a = report(100.0, 1.0);
        a.merge(report(50.0, 3.0));
        // 200 requests in 1 s + 2 s.
        assert!((a.rps - 200.0 / 3.0).abs() < 1e-9, "{a:?}");
        assert_eq!((a.p50_ms, a.rounds, a.connections), (Some(2.0), 2, 2));
    }

    #[test]
    fn snmp_counter() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Tcp: RtoAlgorithm RtoMin ActiveOpens PassiveOpens\nTcp: 1 200 16 7\n";
        assert_eq!(snmp_field(snmp, "Tcp:", "PassiveOpens"), Some(7));
        assert_eq!(snmp_field(snmp, "Tcp:", "Nope"), None);
    }

    /// The namespace's own count, not the process's: three connections to
    /// the pod's workload are three accepts there.
    #[test]
    fn passive_opens_are_the_namespace_s() {
        let lab = Lab::new("t-rdopens", Duration::ZERO);
        let before = passive_opens(&lab.topology.pod).unwrap();
        let target = lab.target();
        for _ in 0..3 {
            lab.topology.client.run(|| {
                let mut stream = TcpStream::connect(target).unwrap();
                stream.write_all(&[crate::workload::ECHO, 1]).unwrap();
                let mut reply = [0u8; 1];
                stream.read_exact(&mut reply).unwrap();
            });
        }
        let after = passive_opens(&lab.topology.pod).unwrap();
        assert_eq!(after - before, 3);
    }

    /// A short run against a redis-server in the pod, no interceptor: every
    /// connection is redis's own, none went through a proxy.
    #[test]
    fn a_direct_run_counts_its_connections() {
        let programs = Programs::find().unwrap_or_else(|e| panic!("{e:#}"));
        let lab = Lab::new("t-redis", Duration::ZERO);
        let tag = format!("t-{}", std::process::id());
        let server =
            Server::start(&lab.topology.pod, &programs, &std::env::temp_dir(), &tag).unwrap();
        let target = SocketAddr::from((netlab::ClientPod::POD_V4, PORT));
        server.probe(&lab.topology.client, target).unwrap();
        let params = Params {
            keepalive: false,
            clients: 4,
            requests: 500,
            limit: Duration::from_secs(30),
        };
        let r = run(
            &lab.topology.client,
            &lab.topology.pod,
            &server,
            target,
            params,
        )
        .unwrap();
        assert_eq!(r.errors.total(), 0, "{r:?}");
        assert!(r.rps > 0.0 && r.requests == 500, "{r:?}");
        // A connection per request, and redis-benchmark's CONFIG GET.
        assert!(r.connections >= 500, "{r:?}");
        assert_eq!(r.peers.via_proxy, 0, "{r:?}");
        assert_eq!(r.peers.not_via_proxy, r.connections, "{r:?}");
        // Nothing on the port: redis-benchmark 7 retries refused connects
        // without end; the deadline ends it, and the load fails.
        let nothing = SocketAddr::from((netlab::ClientPod::POD_V4, PORT + 1));
        let params = Params {
            limit: Duration::from_secs(2),
            ..params
        };
        let (client, pod) = (&lab.topology.client, &lab.topology.pod);
        let failed = run(client, pod, &server, nothing, params);
        let e = format!("{:#}", failed.expect_err("a run against a closed port"));
        assert!(
            e.contains("did not finish") || e.contains("redis-benchmark exited"),
            "{e}"
        );
    }
}
