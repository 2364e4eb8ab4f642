//! The admin side of `sluice run`: real HTTP requests to the metrics,
//! readiness and admin endpoints, from the client namespace (what a
//! Prometheus or a kubelet on the node sees) or from inside the pod.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use netlab::{ClientPod, Netns};

const PORT: u16 = 9080;
const READINESS: u16 = 15021;
const ADMIN: &str = "127.0.0.1:15000";

fn admin() -> SocketAddr {
    ADMIN.parse().expect("admin address")
}

/// Scrapes from the client namespace until `done` holds (bounded).
fn scrape_until(client: &Netns, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, metrics) = get(client, pod_v4(METRICS), "/metrics");
        assert_eq!(status, 200, "{metrics}");
        if done(&metrics) {
            return metrics;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never reached the expected state:\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Probes readiness from the client namespace until it answers `want`.
fn readiness_becomes(client: &Netns, at: SocketAddr, want: u16, sluice: &Sluice) -> String {
    readiness_says(client, at, want, "", sluice)
}

/// Probes readiness until it answers `want` with `needle` in the body.
fn readiness_says(
    client: &Netns,
    at: SocketAddr,
    want: u16,
    needle: &str,
    sluice: &Sluice,
) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, body) = get(client, at, "/healthz/ready");
        if status == want && body.contains(needle) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "readiness stayed {status} ({body}), want {want}; log:\n{}",
            sluice.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn metrics_count_every_connection_exactly() {
    const N: u64 = 25;
    let topology = ClientPod::new("metrics").expect("topology");
    let workload = Workload::start(&topology.pod, PORT, Behaviour::Echo, 1);
    // The metrics address is the default one.
    let sluice = Sluice::run(&topology.pod, &["--ports", "9080", "--install-rules"]);

    let payload = random_bytes(1000, 7);
    for _ in 0..N {
        let stream = connect(&topology.client, pod_v4(PORT)).expect("connect");
        let echoed = exchange(stream, payload.clone());
        assert_eq!(echoed, [payload.as_slice(), TRAILER].concat());
    }
    // A connection straight to sluice's own port is refused (own_port).
    // The reset may come before connect() returns: either way it counts.
    if let Ok(own) = connect(&topology.client, pod_v4(15006)) {
        let _ = exchange_lossy(own);
    }

    let metrics = scrape_until(&topology.client, |m| {
        sample(m, "sluice_connections_closed_total") >= N as f64
            && sample(m, "sluice_connections_refused_total{reason=\"own_port\"}") >= 1.0
    });
    let n = N as f64;
    assert_eq!(sample(&metrics, "sluice_connections_opened_total"), n);
    assert_eq!(sample(&metrics, "sluice_connections_closed_total"), n);
    assert_eq!(sample(&metrics, "sluice_connections_active"), 0.0);
    assert_eq!(
        sample(&metrics, "sluice_connections_accepted_total"),
        n + 1.0
    );
    assert_eq!(
        sample(&metrics, "sluice_bytes_total{direction=\"to_workload\"}"),
        n * payload.len() as f64
    );
    assert_eq!(
        sample(&metrics, "sluice_bytes_total{direction=\"to_client\"}"),
        n * (payload.len() + TRAILER.len()) as f64
    );
    assert_eq!(
        sample(
            &metrics,
            "sluice_connections_refused_total{reason=\"own_port\"}"
        ),
        1.0
    );
    for reason in [
        "not_local",
        "connection_limit",
        "draining",
        "no_original_destination",
    ] {
        let series = format!("sluice_connections_refused_total{{reason=\"{reason}\"}}");
        assert_eq!(sample(&metrics, &series), 0.0, "{series}");
    }
    for reason in [
        "refused",
        "timeout",
        "unreachable",
        "no_source_port",
        "other",
    ] {
        let series = format!("sluice_upstream_connect_failures_total{{reason=\"{reason}\"}}");
        assert_eq!(sample(&metrics, &series), 0.0, "{series}");
    }
    assert_eq!(
        sample(&metrics, "sluice_upstream_connect_duration_seconds_count"),
        n
    );
    assert_eq!(
        sample(
            &metrics,
            "sluice_upstream_connect_duration_seconds_bucket{le=\"+Inf\"}"
        ),
        n
    );
    assert_eq!(
        sample(&metrics, "sluice_connection_duration_seconds_count"),
        n
    );
    assert!(sample(&metrics, "sluice_connection_duration_seconds_sum") > 0.0);
    assert_eq!(sample(&metrics, "sluice_forwarder_fallbacks_total"), 0.0);
    assert_eq!(sample(&metrics, "sluice_draining"), 0.0);
    assert_eq!(
        sample(
            &metrics,
            &format!(
                "sluice_build_info{{version=\"{}\",mode=\"tproxy\",forwarder=\"copy\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );
    assert_eq!(workload.via_sluice.load(Ordering::SeqCst), N);
    sluice.stop();
}

/// A failed upstream connect is counted under its reason, not as opened.
#[test]
fn a_failed_upstream_connect_is_counted_under_its_reason() {
    let topology = ClientPod::new("mfail").expect("topology");
    // No workload on 9080: the workload refuses sluice's connect.
    let sluice = Sluice::run(&topology.pod, &["--ports", "9080", "--install-rules"]);
    if let Ok(stream) = connect(&topology.client, pod_v4(PORT)) {
        let _ = exchange_lossy(stream);
    }
    let metrics = scrape_until(&topology.client, |m| {
        sample(
            m,
            "sluice_upstream_connect_failures_total{reason=\"refused\"}",
        ) >= 1.0
    });
    assert_eq!(
        sample(
            &metrics,
            "sluice_upstream_connect_failures_total{reason=\"refused\"}"
        ),
        1.0
    );
    assert_eq!(sample(&metrics, "sluice_connections_opened_total"), 0.0);
    assert_eq!(sample(&metrics, "sluice_connections_closed_total"), 0.0);
    sluice.stop();
}

/// Sends a little and reads until the peer closes or resets.
fn exchange_lossy(mut stream: TcpStream) -> Vec<u8> {
    let _ = stream.write_all(b"x");
    let mut received = Vec::new();
    let _ = stream.read_to_end(&mut received);
    received
}

/// 503 while the rules are not installed (the init container has not run),
/// 200 once they are, 503 when someone flushes them, 200 again, and 503
/// during the drain.
#[test]
fn readiness_follows_the_interception_and_the_drain() {
    let topology = ClientPod::new("ready").expect("topology");
    let _workload = Workload::start(&topology.pod, PORT, Behaviour::Echo, 1);
    let mut sluice = Sluice::run(
        &topology.pod,
        &["--ports", "9080", "--drain-timeout", "20s"],
    );
    let ready = pod_v4(READINESS);

    let body = readiness_says(&topology.client, ready, 503, "does not match", &sluice);
    assert_says_only_why(&body);

    let installed = sluice_cli(&topology.pod, &["rules", "install", "--ports", "9080"]);
    assert!(installed.status.success(), "{installed:?}");
    readiness_becomes(&topology.client, ready, 200, &sluice);

    let flushed = topology
        .pod
        .output(std::process::Command::new("iptables").args([
            "-t",
            "mangle",
            "-F",
            "SLUICE_PREROUTING",
        ]))
        .expect("iptables -F");
    assert!(flushed.status.success(), "{flushed:?}");
    let body = readiness_becomes(&topology.client, ready, 503, &sluice);
    assert_says_only_why(&body);

    let installed = sluice_cli(&topology.pod, &["rules", "install", "--ports", "9080"]);
    assert!(installed.status.success(), "{installed:?}");
    readiness_becomes(&topology.client, ready, 200, &sluice);

    // A connection in flight keeps the drain going while readiness is probed.
    let mut held = connect(&topology.client, pod_v4(PORT)).expect("connect");
    held.write_all(b"held").expect("write");
    let mut echoed = [0u8; 4];
    held.read_exact(&mut echoed).expect("echo");
    sluice.signal(libc::SIGTERM);
    readiness_says(&topology.client, ready, 503, "draining", &sluice);
    let metrics = get(&topology.client, pod_v4(METRICS), "/metrics").1;
    assert_eq!(sample(&metrics, "sluice_draining"), 1.0);
    drop(held);
    let status = sluice.wait_exit();
    assert!(status.success(), "{status}; log:\n{}", sluice.log());
    let removed = sluice_cli(&topology.pod, &["rules", "remove"]);
    assert!(removed.status.success(), "{removed:?}");
}

/// A not-ready answer on the port open to the network: why, in one short
/// line, and nothing of what is installed (the admin address shows that).
fn assert_says_only_why(body: &str) {
    assert_eq!(body.lines().count(), 1, "{body}");
    assert!(body.len() < 200, "{body}");
    for installed in ["SLUICE", "table", "-A ", "fwmark"] {
        assert!(!body.contains(installed), "{body}");
    }
}

/// ebpf mode's readiness reads sluice's own program back through the
/// descriptors sluice holds: ready while it is attached with the flags'
/// policy, not ready once `rules remove --pin` detaches it under sluice.
#[test]
fn ebpf_readiness_follows_sluices_own_program() {
    let bpffs = BpfFs::mount();
    let pin = bpffs.path().join("sluice");
    let pin = pin.to_str().expect("a UTF-8 path");
    let topology = ClientPod::new("ebpfready").expect("topology");
    let sluice = Sluice::run(
        &topology.pod,
        &["--mode", "ebpf", "--ports", "9080", "--pin", pin],
    );
    let ready = pod_v4(READINESS);
    readiness_becomes(&topology.client, ready, 200, &sluice);

    let removed = sluice_cli(
        &topology.pod,
        &["rules", "remove", "--mode", "ebpf", "--pin", pin],
    );
    assert!(removed.status.success(), "{removed:?}");
    let body = readiness_says(&topology.client, ready, 503, "does not match", &sluice);
    assert_says_only_why(&body);
    let (status, dump) = get(&topology.pod, admin(), "/config_dump");
    assert_eq!(status, 200);
    assert!(dump.contains("no longer attached"), "{dump}");
    sluice.stop();
}

#[test]
fn config_dump_reflects_the_flags_and_admin_is_local_only() {
    let topology = ClientPod::new("dump").expect("topology");
    let sluice = Sluice::run(
        &topology.pod,
        &[
            "--ports",
            "9080,9081",
            "--exclude-cidrs",
            "198.18.9.0/24",
            "--forward",
            "splice",
            "--drain-timeout",
            "3s",
            "--install-rules",
            "--metrics-addr",
            "off",
            "--readiness-addr",
            "0.0.0.0:16021",
        ],
    );
    // The admin endpoints default to 127.0.0.1:15000: inside the pod only.
    let (status, body) = get(&topology.pod, admin(), "/config_dump");
    assert_eq!(status, 200, "{body}");
    let dump: serde_json::Value = serde_json::from_str(&body).expect("config_dump is JSON");
    assert_eq!(dump["mode"], "tproxy");
    assert_eq!(dump["forwarder"], "splice");
    assert_eq!(dump["version"], env!("CARGO_PKG_VERSION"));
    let config = &dump["config"];
    assert_eq!(config["policy"]["ports"], serde_json::json!([9080, 9081]));
    assert_eq!(
        config["policy"]["exclude_ports"],
        serde_json::json!([15000, 15006, 15020, 15021, 15090])
    );
    assert_eq!(
        config["policy"]["exclude_cidrs"],
        serde_json::json!(["198.18.9.0/24"])
    );
    assert_eq!(config["drain_timeout"], 3.0);
    assert_eq!(config["install_rules"], true);
    assert_eq!(config["workers"], 2);
    assert_eq!(config["metrics_addr"], "off");
    assert_eq!(config["readiness_addr"], "0.0.0.0:16021");
    assert_eq!(config["admin_addr"], ADMIN);
    assert_eq!(dump["workers"]["running"], true);
    let kernel = &dump["kernel"];
    assert!(
        kernel["release"].as_str().is_some_and(|r| !r.is_empty()),
        "{kernel}"
    );
    assert_eq!(kernel["no_new_privs"], true);
    assert_eq!(
        kernel["capabilities"],
        serde_json::json!(["CAP_NET_ADMIN", "CAP_NET_RAW"])
    );
    // The first check of the installed rules comes within a second or so.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (_, body) = get(&topology.pod, admin(), "/config_dump");
        let dump: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        if dump["interception"]["matches"] == true {
            let installed = dump["interception"]["installed"].as_str().unwrap_or("");
            assert!(installed.contains("TPROXY"), "{installed}");
            assert_eq!(dump["ready"], true);
            break;
        }
        assert!(Instant::now() < deadline, "never matched: {dump}");
        std::thread::sleep(Duration::from_millis(100));
    }
    readiness_becomes(&topology.client, pod_v4(16021), 200, &sluice);

    // Not from the client namespace: neither on the pod's address nor
    // intercepted (15000 is excluded).
    let reached = connect(&topology.client, pod_v4(15000));
    assert!(reached.is_err(), "the admin port answered the client");
    assert!(
        connect(&topology.client, pod_v4(METRICS)).is_err(),
        "--metrics-addr off still serves"
    );
    let (status, _) = get(&topology.pod, admin(), "/nowhere");
    assert_eq!(status, 404);
    let (status, _) = get(&topology.pod, admin(), "/quitquitquit");
    assert_eq!(status, 405, "a GET must not stop sluice");
    sluice.stop();
}

#[test]
fn quitquitquit_drains_and_sluice_exits_zero() {
    let topology = ClientPod::new("quit").expect("topology");
    let mut sluice = Sluice::run(&topology.pod, &["--ports", "9080", "--install-rules"]);
    let (status, body) = post(&topology.pod, admin(), "/quitquitquit");
    assert_eq!(status, 200, "{body}");
    let exit = sluice.wait_exit();
    assert!(exit.success(), "{exit}; log:\n{}", sluice.log());
    assert!(sluice.log().contains("draining"), "{}", sluice.log());
    let saved = topology
        .pod
        .output(&mut std::process::Command::new("iptables-save"))
        .expect("iptables-save");
    assert!(
        !String::from_utf8_lossy(&saved.stdout).contains("SLUICE"),
        "rules left behind"
    );
}

#[test]
fn logging_level_changes_at_run_time() {
    let topology = ClientPod::new("loglvl").expect("topology");
    let _workload = Workload::start(&topology.pod, PORT, Behaviour::Echo, 1);
    let sluice = Sluice::run(&topology.pod, &["--ports", "9080", "--install-rules"]);
    let once = || {
        let stream = connect(&topology.client, pod_v4(PORT)).expect("connect");
        exchange(stream, b"hi".to_vec());
    };
    once();
    let _ = scrape_until(&topology.client, |m| {
        sample(m, "sluice_connections_closed_total") >= 1.0
    });
    assert!(!sluice.log().contains("DEBUG"), "{}", sluice.log());

    let (status, body) = post(&topology.pod, admin(), "/logging?level=bogus%3Dloud");
    assert_eq!(status, 400, "{body}");
    let (status, body) = post(&topology.pod, admin(), "/logging?level=debug");
    assert_eq!(status, 200, "{body}");
    once();
    sluice.wait_for_log(&["DEBUG", "closed"]);
    sluice.stop();
}

#[test]
fn json_logs_parse_line_by_line_and_rust_log_filters() {
    let topology = ClientPod::new("jsonlog").expect("topology");
    let _workload = Workload::start(&topology.pod, PORT, Behaviour::Echo, 1);
    let launch = Launch {
        env: &[("RUST_LOG", "info,sluice::server=debug")],
        ..Launch::default()
    };
    let sluice = Sluice::launch(
        &topology.pod,
        &launch,
        &["--ports", "9080", "--install-rules", "--log-format", "json"],
    );
    let stream = connect(&topology.client, pod_v4(PORT)).expect("connect");
    exchange(stream, b"hi".to_vec());
    sluice.wait_for_log(&["closed"]);
    let log = sluice.stop();
    let mut levels = std::collections::BTreeSet::new();
    for line in log.lines() {
        let record: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(record["timestamp"].is_string(), "{line}");
        assert!(record["fields"]["message"].is_string(), "{line}");
        levels.insert(record["level"].as_str().unwrap_or("").to_string());
    }
    assert!(log.contains("\"sluice ready\""), "{log}");
    assert!(
        levels.contains("DEBUG"),
        "RUST_LOG was not applied: {levels:?}"
    );
}

#[test]
fn dry_run_prints_the_effective_configuration_and_touches_nothing() {
    let ns = Netns::new("rundry").expect("netns");
    let output = sluice_cli(&ns, &["run", "--dry-run", "--ports", "9080"]);
    assert!(output.status.success(), "{output:?}");
    let config: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("dry run prints JSON");
    assert_eq!(config["policy"]["mode"], "tproxy");
    assert_eq!(config["policy"]["proxy_port"], 15006);
    assert_eq!(config["metrics_addr"], "0.0.0.0:15020");
    assert_eq!(config["readiness_addr"], "0.0.0.0:15021");
    assert_eq!(config["admin_addr"], "127.0.0.1:15000");
    assert_eq!(config["drain_timeout"], 5.0);
    let saved = ns
        .output(&mut std::process::Command::new("iptables-save"))
        .expect("iptables-save");
    assert!(!String::from_utf8_lossy(&saved.stdout).contains("SLUICE"));
    // Bad input fails the dry run as it would fail the run.
    let bad = sluice_cli(&ns, &["run", "--dry-run", "--admin-addr", "0.0.0.0:15000"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("loopback"));
}

/// As in the manifest: an unprivileged user with NET_ADMIN and NET_RAW
/// only. sluice installs, forwards, keeps no more than it needs, cannot
/// gain more, and removes the rules at exit.
#[test]
fn runs_unprivileged_with_only_net_admin_and_net_raw() {
    let topology = ClientPod::new("nonroot").expect("topology");
    let workload = Workload::start(&topology.pod, PORT, Behaviour::Echo, 1);
    let launch = Launch {
        wrapper: &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all,+net_admin,+net_raw",
            "--ambient-caps=+net_admin,+net_raw",
            "--bounding-set=-all,+net_admin,+net_raw",
            "--",
        ],
        ..Launch::default()
    };
    let mut sluice = Sluice::launch(
        &topology.pod,
        &launch,
        &["--ports", "9080", "--install-rules"],
    );
    let stream = connect(&topology.client, pod_v4(PORT)).expect("connect");
    assert_eq!(
        exchange(stream, b"unprivileged".to_vec()),
        [b"unprivileged".as_slice(), TRAILER].concat()
    );
    assert_eq!(workload.via_sluice.load(Ordering::SeqCst), 1);
    readiness_becomes(&topology.client, pod_v4(READINESS), 200, &sluice);

    // Every thread: uid 65534, NET_ADMIN and NET_RAW (bits 12, 13) only.
    let tasks = std::fs::read_dir(format!("/proc/{}/task", sluice.pid())).expect("tasks");
    for task in tasks {
        let status = std::fs::read_to_string(task.expect("task").path().join("status"))
            .expect("task status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or_else(|| panic!("no {name} in {status}"))
                .to_string()
        };
        assert!(field("Uid:").starts_with("65534"), "{status}");
        assert_eq!(field("CapEff:"), "0000000000003000", "{status}");
        assert_eq!(field("CapPrm:"), "0000000000003000", "{status}");
        assert_eq!(field("NoNewPrivs:"), "1", "{status}");
    }
    sluice.signal(libc::SIGTERM);
    let status = sluice.wait_exit();
    assert!(status.success(), "{status}; log:\n{}", sluice.log());
    assert_rules_removed(&topology.pod, &sluice);
}

/// No `SLUICE_*` chain is left in `pod`: the unprivileged sluice removed
/// its rules at exit.
fn assert_rules_removed(pod: &Netns, sluice: &Sluice) {
    let saved = pod
        .output(&mut std::process::Command::new("iptables-save"))
        .expect("iptables-save");
    assert!(
        !String::from_utf8_lossy(&saved.stdout).contains("SLUICE"),
        "the unprivileged sluice could not remove its rules; log:\n{}",
        sluice.log()
    );
}

/// As root the bounding set shrinks too; ebpf mode keeps NET_ADMIN only
/// (readiness reads the program back through sluice's own descriptors), also
/// with the sockmap forwarder (its ring buffers are made before the drop).
#[test]
fn root_keeps_only_what_each_mode_needs() {
    for (mode, caps) in [("tproxy", 0x3000u64), ("ebpf", 0x1000)] {
        let topology = ClientPod::new(&format!("caps{mode}")).expect("topology");
        let mut args = vec!["--mode", mode, "--ports", "9080", "--forward", "sockmap"];
        if mode != "ebpf" {
            args.push("--install-rules");
        }
        let sluice = Sluice::run(&topology.pod, &args);
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", sluice.pid())).expect("status");
        let hex = |name: &str| {
            let text = status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name}"));
            u64::from_str_radix(text.trim(), 16).expect("hex")
        };
        assert_eq!(hex("CapEff:"), caps, "{mode}: {status}");
        assert_eq!(hex("CapBnd:"), caps, "{mode}: {status}");
        readiness_becomes(&topology.client, pod_v4(READINESS), 200, &sluice);
        sluice.stop();
    }
}

/// A copy of the sluice binary carrying the file capabilities the manifests
/// tell the image to set; removed on drop.
struct FileCapsBinary {
    dir: std::path::PathBuf,
}

impl FileCapsBinary {
    fn new() -> FileCapsBinary {
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("filecaps-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("make the directory of the copy");
        let binary = FileCapsBinary { dir };
        std::fs::copy(env!("CARGO_BIN_EXE_sluice"), binary.path()).expect("copy sluice");
        let set = std::process::Command::new("setcap")
            .arg(IMAGE_FILE_CAPS)
            .arg(binary.path())
            .output()
            .expect("run setcap (libcap2-bin)");
        assert!(set.status.success(), "setcap: {set:?}");
        binary
    }

    fn path(&self) -> std::path::PathBuf {
        self.dir.join("sluice")
    }
}

impl Drop for FileCapsBinary {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Each thread's `name` line of /proc/PID/task/*/status.
fn task_status_fields(pid: u32, name: &str) -> Vec<String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks");
    tasks
        .map(|task| {
            let status = std::fs::read_to_string(task.expect("task").path().join("status"))
                .expect("task status");
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or_else(|| panic!("no {name} in {status}"))
                .to_string()
        })
        .collect()
}

/// As a pod runs sluice with the manifests under deploy/: uid 65534, the
/// capabilities its mode's manifest grants and no other (the bounding
/// set), no_new_privs (`allowPrivilegeEscalation: false`), and those
/// capabilities coming from the binary's file capabilities, since
/// Kubernetes gives a non-root container no ambient ones. In every mode
/// sluice intercepts, becomes ready, keeps only what the rest of its run
/// needs, and removes what it installed.
#[test]
fn runs_as_uid_65534_with_the_manifests_capabilities_in_every_mode() {
    let binary = FileCapsBinary::new();
    let program = binary.path();
    // (mode, forwarder, the capabilities kept after start-up)
    for (mode, forward, kept) in [
        ("tproxy", "copy", "0000000000003000"),
        ("redirect", "splice", "0000000000003000"),
        ("ebpf", "sockmap", "0000000000001000"),
    ] {
        let granted = manifest_capabilities(mode);
        let bounding = std::iter::once("-all".to_string())
            .chain(granted.iter().map(|c| format!("+{}", c.to_lowercase())))
            .collect::<Vec<_>>()
            .join(",");
        let bounding = format!("--bounding-set={bounding}");
        let wrapper = [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            bounding.as_str(),
            "--no-new-privs",
            "--",
        ];
        let topology = ClientPod::new(&format!("fcap{mode}")).expect("topology");
        let workload = Workload::start(&topology.pod, PORT, Behaviour::Echo, 1);
        let mut args = vec!["--mode", mode, "--ports", "9080", "--forward", forward];
        match mode {
            // As sluice-tproxy.yaml: an init container installs the rules.
            "tproxy" => {
                let mut install = std::process::Command::new(wrapper[0]);
                install
                    .args(&wrapper[1..])
                    .arg(&program)
                    .args(["rules", "install", "--mode", mode, "--ports", "9080"]);
                let installed = topology.pod.output(&mut install).expect("rules install");
                assert!(installed.status.success(), "{mode}: {installed:?}");
            }
            "redirect" => args.push("--install-rules"),
            _ => args.extend(["--sockmap-after", "0"]),
        }
        let launch = Launch {
            wrapper: &wrapper,
            program: Some(&program),
            ..Launch::default()
        };
        let mut sluice = Sluice::launch(&topology.pod, &launch, &args);

        // An echo before the half-close: the sockmap forwarder joins a
        // connection whose client has not sent its FIN yet.
        let mut stream = connect(&topology.client, pod_v4(PORT)).expect("connect");
        echo_once(&mut stream, b"unprivileged");
        assert_eq!(
            exchange(stream, b"and on".to_vec()),
            [b"and on".as_slice(), TRAILER].concat(),
            "{mode}"
        );
        assert_eq!(workload.via_sluice.load(Ordering::SeqCst), 1, "{mode}");
        readiness_becomes(&topology.client, pod_v4(READINESS), 200, &sluice);
        let metrics = get(&topology.client, pod_v4(METRICS), "/metrics").1;
        let build = format!(
            "sluice_build_info{{version=\"{}\",mode=\"{mode}\",forwarder=\"{forward}\"}}",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(sample(&metrics, &build), 1.0, "{mode}: {}", sluice.log());
        assert_eq!(
            sample(&metrics, "sluice_forwarder_fallbacks_total"),
            0.0,
            "{mode}: {}",
            sluice.log()
        );

        for (field, want) in [
            ("Uid:", "65534\t65534\t65534\t65534"),
            ("CapEff:", kept),
            ("CapPrm:", kept),
            ("NoNewPrivs:", "1"),
        ] {
            for value in task_status_fields(sluice.pid(), field) {
                assert_eq!(value, want, "{mode}: {field}");
            }
        }
        sluice.signal(libc::SIGTERM);
        let status = sluice.wait_exit();
        assert!(status.success(), "{mode}: {status}; log:\n{}", sluice.log());
        if mode == "redirect" {
            assert_rules_removed(&topology.pod, &sluice);
        }
    }
}

/// Wrappers for the tools sluice runs (`iptables-save` and the like), each
/// start counted in a file: how many processes sluice spawned.
struct CountedTools {
    dir: std::path::PathBuf,
}

impl CountedTools {
    const TOOLS: [&str; 4] = [
        "iptables-save",
        "ip6tables-save",
        "iptables-restore",
        "ip6tables-restore",
    ];

    fn new() -> CountedTools {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("counted-tools-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("make the wrappers' directory");
        let tools = CountedTools { dir };
        let path = std::env::var("PATH").expect("PATH");
        for tool in Self::TOOLS {
            let real = std::env::split_paths(&path)
                .map(|dir| dir.join(tool))
                .find(|candidate| candidate.is_file())
                .unwrap_or_else(|| panic!("{tool} is not installed"));
            let wrapper = tools.dir.join(tool);
            let script = format!(
                "#!/bin/sh\necho \"$0 $*\" >> {}\nexec {} \"$@\"\n",
                tools.log().display(),
                real.display()
            );
            std::fs::write(&wrapper, script).expect("write a wrapper");
            std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))
                .expect("make a wrapper executable");
        }
        tools
    }

    fn log(&self) -> std::path::PathBuf {
        self.dir.join("started")
    }

    /// `PATH` with the wrappers first.
    fn path(&self) -> String {
        format!(
            "{}:{}",
            self.dir.display(),
            std::env::var("PATH").expect("PATH")
        )
    }

    /// The tools started so far.
    fn started(&self) -> Vec<String> {
        std::fs::read_to_string(self.log())
            .map(|log| log.lines().map(str::to_string).collect())
            .unwrap_or_default()
    }
}

impl Drop for CountedTools {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(Iterator::count)
        .unwrap_or(0)
}

/// 1,000 connections to the metrics and readiness ports, each sending a
/// request and never reading the answer, and probes throughout, while
/// sluice has few descriptors (256): the admin side holds no more than its
/// cap of them, the data path forwards throughout, and the readiness
/// checks start at most one `iptables-save` per family a second, and none
/// once nobody asks.
#[test]
fn an_admin_flood_neither_starves_the_data_path_nor_spawns_without_bound() {
    const FLOOD: usize = 1000;
    const FLOOD_FOR: Duration = Duration::from_secs(4);
    // Held by the admin side at most: one cap per flooded listener.
    const ADMIN_HELD: usize = 2 * 16;
    let topology = ClientPod::new("flood").expect("topology");
    let _workload = Workload::start(&topology.pod, PORT, Behaviour::Echo, 1);
    let tools = CountedTools::new();
    let path = tools.path();
    let launch = Launch {
        wrapper: &["prlimit", "--nofile=256:256", "--"],
        env: &[("PATH", path.as_str())],
        ..Launch::default()
    };
    let sluice = Sluice::launch(
        &topology.pod,
        &launch,
        &["--ports", "9080", "--install-rules"],
    );
    readiness_becomes(&topology.client, pod_v4(READINESS), 200, &sluice);
    let idle_descriptors = open_descriptors(sluice.pid());
    let started_before = tools.started().len();
    let began = Instant::now();

    let flood: Vec<socket2::Socket> = topology
        .client
        .run(|| {
            (0..FLOOD)
                .map(|i| {
                    let port = if i % 2 == 0 { METRICS } else { READINESS };
                    let socket =
                        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                    socket.set_nonblocking(true)?;
                    match socket.connect(&pod_v4(port).into()) {
                        Err(e) if e.raw_os_error() != Some(libc::EINPROGRESS) => Err(e),
                        _ => Ok(socket),
                    }
                })
                .collect::<std::io::Result<_>>()
        })
        .expect("open the flood");
    // Each connection sends its request as soon as it is established, from
    // a thread of its own, so that none holds a place at sluice silently.
    let flooding = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sender = {
        let flooding = flooding.clone();
        std::thread::spawn(move || {
            let mut sent = vec![false; FLOOD];
            while flooding.load(Ordering::SeqCst) {
                for (i, (socket, sent)) in flood.iter().zip(&mut sent).enumerate() {
                    if !*sent {
                        let path = if i % 2 == 0 {
                            "/metrics"
                        } else {
                            "/healthz/ready"
                        };
                        let request = format!("GET {path} HTTP/1.1\r\nHost: pod\r\n\r\n");
                        *sent = socket.send(request.as_bytes()).is_ok();
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (flood, sent)
        })
    };
    let mut most_descriptors = idle_descriptors;
    let mut echoes = 0;
    while began.elapsed() < FLOOD_FOR {
        let mut stream = connect(&topology.client, pod_v4(PORT)).expect("connect during the flood");
        echo_once(&mut stream, b"through the flood");
        echoes += 1;
        // A kubelet's probes go on too: a check a second.
        get(&topology.client, pod_v4(READINESS), "/healthz/ready");
        most_descriptors = most_descriptors.max(open_descriptors(sluice.pid()));
        std::thread::sleep(Duration::from_millis(100));
    }
    flooding.store(false, Ordering::SeqCst);
    let (flood, sent) = sender.join().expect("the flood's sender");
    let flooded_for = began.elapsed();
    let started = tools.started();
    let during = &started[started_before..];
    eprintln!(
        "flood of {FLOOD} for {flooded_for:?}: {} requests sent, {echoes} echoes through sluice, \
         descriptors {idle_descriptors} idle and {most_descriptors} at most, {} tools started",
        sent.iter().filter(|s| **s).count(),
        during.len()
    );
    assert!(
        most_descriptors <= idle_descriptors + ADMIN_HELD + 8,
        "sluice held {most_descriptors} descriptors under the flood, {idle_descriptors} before"
    );
    assert!(
        !sluice.log().contains("accept failed"),
        "the data path ran out of descriptors:\n{}",
        sluice.log()
    );
    assert!(echoes > 0);
    // At most one check a second, each one iptables-save per family.
    let checks = flooded_for.as_secs() + 2;
    assert!(
        during.len() as u64 <= 2 * checks,
        "{} tools started in {flooded_for:?} of flood: {during:?}",
        during.len()
    );
    assert!(
        sent.iter().filter(|s| **s).count() > 2 * ADMIN_HELD,
        "the flood hardly reached sluice"
    );

    // Once the flood is gone and nobody asks, nothing more is started.
    drop(flood);
    let deadline = Instant::now() + PATIENCE;
    while open_descriptors(sluice.pid()) > idle_descriptors + 2 {
        assert!(Instant::now() < deadline, "the admin side never settled");
        std::thread::sleep(Duration::from_millis(100));
    }
    let settled = tools.started().len();
    std::thread::sleep(3 * Duration::from_secs(1));
    let quiet = tools.started();
    assert_eq!(
        quiet.len(),
        settled,
        "tools started while nobody asked: {:?}",
        &quiet[settled..]
    );
    readiness_becomes(&topology.client, pod_v4(READINESS), 200, &sluice);
    sluice.stop();
}
