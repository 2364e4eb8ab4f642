//! The whole `make bench` pipeline with the smoke profile: every load,
//! results.json, README.md tables and plots, nothing left behind. A subset of
//! the scenarios keeps it short: each interception mode, tproxy with the
//! bypass source, an eBPF one with the sockmap forwarder, HAProxy, and
//! policy-size variants of both modes.
//!
//! The sluice binary under test is another package's, so Cargo gives this
//! test no `CARGO_BIN_EXE_sluice`. The test asks Cargo for it instead:
//! `cargo build -p sluice --message-format=json` (the same Cargo, the same
//! target directory) and takes the executable's path from the artifact
//! message. Under `make test` (`cargo test --workspace`) the binary is
//! already built for sluice's own integration tests, so this is a no-op that
//! only finds the path; alone (`cargo test -p sluice-bench`) it builds it.
//! Cargo releases its build lock before running tests, so this does not
//! deadlock.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn sluice_binary() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let output = Command::new(cargo)
        .args([
            "build",
            "-p",
            "sluice",
            "--bin",
            "sluice",
            "--message-format=json",
        ])
        .current_dir(&workspace)
        .output()
        .expect("run cargo build -p sluice");
    assert!(
        output.status.success(),
        "cargo build -p sluice failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "sluice")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .expect("cargo reported no sluice executable")
}

/// `sluice-bench` with the smoke profile, writing under `out`; stderr piped
/// (the progress log), stdin closed.
fn smoke_run(sluice: &Path, out: &Path, scenarios: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice-bench"));
    command
        .arg("--sluice")
        .arg(sluice)
        .arg("--out")
        .arg(out)
        .args(["--profile", "smoke", "--scenarios", scenarios])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    command
}

fn leftover_namespaces(pid: u32) -> Vec<String> {
    let marker = format!("-{pid}-");
    std::fs::read_dir("/run/netns")
        .map(|dir| {
            dir.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("sl-") && n.contains(&marker))
                .collect()
        })
        .unwrap_or_default()
}

const SCENARIOS: [&str; 8] = [
    "redirect",
    "tproxy",
    "tproxy-bypass",
    "ebpf-sockmap",
    "haproxy",
    "tproxy-excl1",
    "tproxy-excl1000",
    "ebpf-excl1000",
];
/// The scenarios of the main tables (the rest run CRR alone).
const MATRIX: [&str; 6] = [
    "direct",
    "redirect",
    "tproxy",
    "tproxy-bypass",
    "ebpf-sockmap",
    "haproxy",
];

#[test]
fn smoke_profile_end_to_end() {
    let sluice = sluice_binary();
    let out = std::env::temp_dir().join(format!("sl-bench-smoke-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let child = smoke_run(&sluice, &out, &SCENARIOS.join(","))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start sluice-bench");
    let pid = child.id();
    let output = child.wait_with_output().expect("wait for sluice-bench");
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "sluice-bench failed:\n{log}");
    assert_eq!(leftover_namespaces(pid), Vec::<String>::new(), "{log}");

    let runs: Vec<PathBuf> = std::fs::read_dir(&out)
        .expect("out dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(runs.len(), 1, "one run directory in {}", out.display());
    let run_dir = &runs[0];
    let json = std::fs::read_to_string(run_dir.join("results.json")).expect("results.json");
    let results: Value = serde_json::from_str(&json).expect("results.json parses");

    let machine = &results["machine"];
    for key in ["kernel", "cpu_model", "commit", "date"] {
        assert!(
            machine[key].as_str().is_some_and(|v| !v.is_empty()),
            "{key}"
        );
    }
    assert!(machine["cores"].as_u64().unwrap_or(0) >= 1);
    assert_eq!(results["profile"]["name"], "smoke");

    let scenarios = results["scenarios"].as_array().expect("scenarios");
    let names: Vec<&str> = scenarios
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    let mut expected = vec!["direct"];
    expected.extend(SCENARIOS);
    assert_eq!(names, expected);
    for s in scenarios {
        let name = s["name"].as_str().unwrap_or("?");
        if name == "haproxy" && !s["skipped"].is_null() {
            eprintln!("haproxy skipped: {}", s["skipped"]);
            continue;
        }
        assert!(s["error"].is_null(), "{name}: {}", s["error"]);
        let loads = &s["loads"];
        if name != "direct" && name != "haproxy" {
            // What sluice said it runs, not only what it was asked for.
            assert_eq!(s["forwarder_in_use"], s["forwarder"], "{name}");
        }
        if !MATRIX.contains(&name) {
            assert_eq!(s["only"], serde_json::json!(["crr"]), "{name}");
            assert!(s["excluded_ports"].as_u64().is_some(), "{name}");
            for absent in ["concurrency", "rr", "exhaustion"] {
                assert!(loads[absent].is_null(), "{name} ran {absent}");
            }
            let crr = &loads["crr"];
            assert!(crr["error"].is_null(), "{name}: {}", crr["error"]);
            assert_eq!(crr["peers"]["not_via_proxy"], 0, "{name} bypassed: {crr}");
            assert!(
                crr["report"]["completed"].as_u64().unwrap_or(0) > 0,
                "{name}"
            );
            continue;
        }
        let mut all = vec![
            &loads["concurrency"],
            &loads["rr"],
            &loads["crr"],
            &loads["exhaustion"],
        ];
        let bulk = loads["bulk"].as_array().expect("bulk loads");
        assert_eq!(bulk.len(), 2, "{name}: bulk with 1 and 4 streams");
        all.extend(bulk);
        for load in all {
            assert!(load["error"].is_null(), "{name}: {}", load["error"]);
            assert!(load["report"].is_object(), "{name}: {load}");
            if name != "direct" {
                assert_eq!(load["peers"]["not_via_proxy"], 0, "{name} bypassed: {load}");
                assert!(
                    load["peers"]["via_proxy"].as_u64().unwrap_or(0) > 0,
                    "{name}"
                );
            }
        }
        let rr = &loads["rr"]["report"];
        assert_eq!(rr["completed"], rr["scheduled"], "{name}: {rr}");
        assert!(rr["latency"]["p50_us"].as_f64().unwrap_or(0.0) > 0.0);
        let crr = &loads["crr"]["report"];
        assert!(crr["completed"].as_u64().unwrap_or(0) > 0);
        assert!(crr["machine_cpu_us_per_conn"].is_number(), "{name}: {crr}");
        let syscalls = &loads["crr_syscalls"];
        if name == "direct" {
            assert!(syscalls.is_null(), "{syscalls}");
        } else if std::path::Path::new("/usr/bin/perf").exists() {
            assert!(
                syscalls["per_connection"].as_f64().unwrap_or(0.0) > 1.0,
                "{name}: {syscalls}"
            );
        }
        for b in bulk {
            assert!(
                b["report"]["bytes"].as_u64().unwrap_or(0) > 0,
                "{name}: {b}"
            );
            if name != "direct" {
                assert!(b["report"]["proxy_cpu_s_per_gb"].is_number(), "{name}: {b}");
            }
        }
        let hold = &loads["concurrency"]["report"];
        assert_eq!(hold["opened"], 200, "{name}: {hold}");
        assert!(
            hold["conntrack_per_connection"].is_number(),
            "{name}: {hold}"
        );
        if name == "tproxy" || name == "ebpf-sockmap" {
            assert_eq!(
                hold["conntrack_peak"], 0,
                "TPROXY needs no conntrack: {hold}"
            );
        }
        if name == "redirect" {
            assert!(hold["conntrack_per_connection"].as_f64().unwrap_or(0.0) >= 1.0);
        }
        // A full conntrack table: NAT needs entries, TPROXY and direct none.
        let exhaustion = &loads["exhaustion"]["report"];
        let (attempted, succeeded) = (&exhaustion["attempted"], &exhaustion["succeeded"]);
        assert_eq!(
            exhaustion["free"], exhaustion["params"]["free"],
            "{name}: {exhaustion}"
        );
        match name {
            "direct" | "tproxy" | "haproxy" => {
                assert_eq!(succeeded, attempted, "{name}: {exhaustion}")
            }
            "redirect" => assert!(
                succeeded.as_u64() < attempted.as_u64(),
                "{name}: {exhaustion}"
            ),
            _ => {}
        }
    }

    let md = std::fs::read_to_string(out.join("README.md")).expect("README.md");
    for heading in [
        "## Summary",
        "## RR",
        "## CRR",
        "## Bulk",
        "## Concurrency",
        "## Conntrack exhaustion",
    ] {
        let section = md
            .split(heading)
            .nth(1)
            .unwrap_or_else(|| panic!("{heading} in\n{md}"));
        let section = section.split("\n## ").next().unwrap_or_default();
        assert!(section.contains("|---"), "{heading} has a table");
        for name in MATRIX {
            assert!(
                section.contains(&format!("| {name} |")),
                "{heading}: row {name}"
            );
        }
    }
    let policy = md
        .split("## Policy size")
        .nth(1)
        .unwrap_or_else(|| panic!("## Policy size in\n{md}"));
    let policy = policy.split("\n## ").next().unwrap_or_default();
    for row in ["| tproxy | 1 | ", "| tproxy | 1000 | ", "| ebpf | 1000 | "] {
        assert!(policy.contains(row), "policy row {row:?} in\n{policy}");
    }
    assert!(!policy.contains("failed"), "{policy}");
    let run_name = run_dir.file_name().unwrap().to_string_lossy().into_owned();
    for svg in ["rr-latency.svg", "conntrack.svg", "policy-size.svg"] {
        let text = std::fs::read_to_string(run_dir.join(svg)).expect(svg);
        assert!(text.starts_with("<svg"), "{svg}");
        assert!(
            md.contains(&format!("]({run_name}/{svg})")),
            "README links {svg}"
        );
    }
    std::fs::remove_dir_all(&out).expect("remove the smoke output");
}

/// The processes whose parent is `pid`, from every thread's children list.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// SIGTERM in the middle of a run (what CI's timeout sends) leaves no
/// namespace and no interceptor behind, and says so in the exit status.
#[test]
fn sigterm_mid_run_leaves_nothing_behind() {
    use std::io::{BufRead, BufReader};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    let sluice = sluice_binary();
    let out = std::env::temp_dir().join(format!("sl-bench-sigterm-{}", std::process::id()));
    let mut child = smoke_run(&sluice, &out, "tproxy,ebpf")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start sluice-bench");
    let pid = child.id();
    let stderr = child.stderr.take().expect("piped stderr");
    let (lines, log) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    // Both interceptors up: namespaces, rules and an sk_lookup link exist.
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen
        .iter()
        .filter(|l: &&String| l.contains("started:"))
        .count()
        < 2
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match log.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => {
                let _ = child.kill();
                panic!("the interceptors never started:\n{}", seen.join("\n"));
            }
        }
    }
    assert!(
        !leftover_namespaces(pid).is_empty(),
        "no namespace to clean up"
    );
    let interceptors = children_of(pid);
    assert!(!interceptors.is_empty(), "sluice-bench has no children");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("send SIGTERM");
    let status = child.wait().expect("wait for sluice-bench");
    seen.extend(log.try_iter());
    let seen = seen.join("\n");
    assert_eq!(status.code(), Some(128 + 15), "{seen}");
    assert_eq!(leftover_namespaces(pid), Vec::<String>::new(), "{seen}");
    // SIGKILL from PR_SET_PDEATHSIG is asynchronous: give it a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    // A zombie is dead too: nobody may be left to reap orphans here.
    let alive = |p: &u32| {
        std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|stat| {
            stat.rsplit(") ")
                .next()
                .is_some_and(|s| !s.starts_with('Z'))
        })
    };
    while interceptors.iter().any(alive) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left: Vec<u32> = interceptors.into_iter().filter(alive).collect();
    assert_eq!(left, Vec::<u32>::new(), "children still running\n{seen}");
    let _ = std::fs::remove_dir_all(&out);
}
