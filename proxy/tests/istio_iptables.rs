//! `sluice istio-iptables` against Istio's behaviour, with the injector's
//! exact arguments: real rules in a client ⇄ pod topology, and a matrix of
//! connections (who connects: uid, from which side and address; to which
//! address and port; TCP or UDP; IPv4 and IPv6), each with one expected
//! outcome: it arrives at the mesh proxy's inbound port (15006) or outbound
//! port (15001) with the original destination in SO_ORIGINAL_DST, or it
//! passes untouched to whoever listens there.
//!
//! The parties are `tests/istio/party.py` processes run as the uid the case
//! names (setpriv): a stand-in for Envoy as uid 1337 on 15001 and 15006, a
//! workload as uid 1000 on the app's and Istio's ports, a server on the
//! client's side. Each answers with its label, its port and what
//! SO_ORIGINAL_DST says.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};

use netlab::{ClientPod, Netns, Proc};
use sluice::istio::INJECTOR;

const MESH_UID: u32 = 1337;
const APP_UID: u32 = 1000;
const APP_PORT: u16 = 8080;
const SERVER_PORT: u16 = 9000;

fn party() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/istio/party.py").to_string()
}

fn as_uid(uid: u32) -> Command {
    as_uid_with(uid, &[])
}

/// A party as `uid`, with `caps` (e.g. "net_admin") ambient.
fn as_uid_with(uid: u32, caps: &[&str]) -> Command {
    let mut command = Command::new("setpriv");
    command.args([&format!("--reuid={uid}"), &format!("--regid={uid}")]);
    if !caps.is_empty() {
        let plus: Vec<String> = caps.iter().map(|c| format!("+{c}")).collect();
        command.arg(format!("--inh-caps={}", plus.join(",")));
        command.arg(format!("--ambient-caps={}", plus.join(",")));
    }
    command.args([
        "--clear-groups",
        // Debian's (make deps installs it): a python3 found on root's PATH
        // may live where another uid cannot read.
        "/usr/bin/python3",
        &party(),
    ]);
    command
}

/// Starts a party answering as `label` on `ports`, once it listens.
fn serve(ns: &Netns, uid: u32, label: &str, ports: &[u16]) -> Proc {
    let mut command = as_uid(uid);
    command
        .arg("serve")
        .arg(label)
        .args(ports.iter().map(u16::to_string));
    start(ns, command, label)
}

/// Starts a party's command, once it says it listens.
fn start(ns: &Netns, mut command: Command, label: &str) -> Proc {
    command.stdout(Stdio::piped()).stderr(Stdio::inherit());
    let mut proc = ns
        .spawn(&mut command)
        .expect("start a party (python3, setpriv)");
    let stdout = proc.child_mut().stdout.take().expect("piped stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("the party says ready");
    assert_eq!(line.trim(), "ready", "party {label}");
    proc
}

/// What answers a TCP connection from `ns` as `uid` (from `src` if given)
/// to `dst`: "LABEL PORT ORIG PEER", or the error.
fn ask(ns: &Netns, uid: u32, src: Option<IpAddr>, dst: SocketAddr) -> String {
    let mut command = as_uid(uid);
    command.args([
        "ask".to_string(),
        src.map_or("-".into(), |s| s.to_string()),
        dst.ip().to_string(),
        dst.port().to_string(),
    ]);
    run(ns, &mut command)
}

fn ask_udp(ns: &Netns, uid: u32, dst: SocketAddr) -> String {
    let mut command = as_uid(uid);
    command.args([
        "ask-udp".to_string(),
        dst.ip().to_string(),
        dst.port().to_string(),
    ]);
    run(ns, &mut command)
}

fn run(ns: &Netns, command: &mut Command) -> String {
    let out = ns.output(command).expect("run a party");
    if out.status.success() {
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        format!("failed: {}", err.lines().last().unwrap_or_default())
    }
}

fn istio_iptables(ns: &Netns, extra: &[&str]) -> std::process::Output {
    let args: Vec<&str> = ["istio-iptables"]
        .iter()
        .chain(INJECTOR)
        .chain(extra)
        .copied()
        .collect();
    common::sluice_cli(ns, &args)
}

fn saved(ns: &Netns) -> String {
    let mut text = String::new();
    for tool in ["iptables-save", "ip6tables-save"] {
        let out = ns.output(&mut Command::new(tool)).expect("iptables-save");
        text += &String::from_utf8_lossy(&out.stdout);
    }
    text
}

struct Lab {
    lab: ClientPod,
    _parties: Vec<Proc>,
}

/// The topology with its parties: the mesh stand-in of `-m REDIRECT`.
fn lab(name: &str) -> Lab {
    lab_with(name, |pod| serve(pod, MESH_UID, "mesh", &[15001, 15006]))
}

/// The topology with `mesh` started in the pod, the workload, the server.
fn lab_with(name: &str, mesh: impl FnOnce(&Netns) -> Proc) -> Lab {
    let lab = ClientPod::new(name).expect("client ⇄ pod");
    let parties = vec![
        mesh(&lab.pod),
        serve(
            &lab.pod,
            APP_UID,
            "workload",
            &[APP_PORT, 15008, 15020, 15021, 15090],
        ),
        serve(&lab.client, 0, "server", &[SERVER_PORT]),
    ];
    Lab {
        lab,
        _parties: parties,
    }
}

/// Where a case's connection starts: the client's side, or the pod as a uid.
#[derive(Clone, Copy)]
enum From {
    Client,
    Pod(u32),
}

/// One connection of the matrix and what must answer it.
struct Case {
    what: &'static str,
    from: From,
    src: Option<IpAddr>,
    dst: SocketAddr,
    udp: bool,
    expect: String,
}

/// The matrix of the injector's arguments for one family.
fn cases([pod, client, lo, passthrough]: [IpAddr; 4]) -> Vec<Case> {
    let at = SocketAddr::new;
    let app = at(pod, APP_PORT);
    let server = at(client, SERVER_PORT);
    let case = |what, from, dst, expect: String| Case {
        what,
        from,
        src: None,
        dst,
        udp: false,
        expect,
    };
    let (mesh, workload) = (From::Pod(MESH_UID), From::Pod(APP_UID));
    vec![
        case(
            "client -> app port",
            From::Client,
            app,
            format!("mesh 15006 {app}"),
        ),
        case(
            "client -> 15021 (-d)",
            From::Client,
            at(pod, 15021),
            "workload 15021 -".into(),
        ),
        case(
            "client -> 15090 (-d)",
            From::Client,
            at(pod, 15090),
            "workload 15090 -".into(),
        ),
        case(
            "client -> 15008 (tunnel)",
            From::Client,
            at(pod, 15008),
            "workload 15008 -".into(),
        ),
        case(
            "app -> outside",
            workload,
            server,
            format!("mesh 15001 {server}"),
        ),
        Case {
            udp: true,
            ..case(
                "app -> outside, udp",
                workload,
                server,
                "server 9000 -".into(),
            )
        },
        case("mesh -> outside", mesh, server, "server 9000 -".into()),
        case(
            "mesh -> own pod over lo (hairpin)",
            mesh,
            app,
            format!("mesh 15006 {app}"),
        ),
        case(
            "mesh -> own pod's 15008 over lo",
            mesh,
            at(pod, 15008),
            "workload 15008 -".into(),
        ),
        Case {
            src: Some(passthrough),
            ..case(
                "mesh from passthrough -> own pod",
                mesh,
                app,
                "workload 8080 -".into(),
            )
        },
        case(
            "app -> own pod over lo",
            workload,
            app,
            "workload 8080 -".into(),
        ),
        case(
            "app -> loopback",
            workload,
            at(lo, APP_PORT),
            "workload 8080 -".into(),
        ),
    ]
}

/// (case, answer) pairs.
type Outcomes = Vec<(String, String)>;

/// Each case's answer, without the peer (its port is the kernel's), beside
/// what was expected.
fn run_cases(l: &Lab, cases: &[Case]) -> (Outcomes, Outcomes) {
    let seen = |answer: String| {
        answer
            .rsplit_once(' ')
            .map_or(answer.clone(), |(head, _)| head.to_string())
    };
    let observed = cases
        .iter()
        .map(|c| {
            let (ns, uid) = match c.from {
                From::Client => (&l.lab.client, 0),
                From::Pod(uid) => (&l.lab.pod, uid),
            };
            let answer = if c.udp {
                ask_udp(ns, uid, c.dst)
            } else {
                ask(ns, uid, c.src, c.dst)
            };
            (c.what.to_string(), seen(answer))
        })
        .collect();
    let expected = cases
        .iter()
        .map(|c| (c.what.to_string(), c.expect.clone()))
        .collect();
    (observed, expected)
}

fn v4() -> [IpAddr; 4] {
    [
        ClientPod::POD_V4.into(),
        ClientPod::CLIENT_V4.into(),
        "127.0.0.1".parse().unwrap(),
        common::BYPASS_V4.parse().unwrap(),
    ]
}

fn v6() -> [IpAddr; 4] {
    [
        ClientPod::POD_V6.into(),
        ClientPod::CLIENT_V6.into(),
        "::1".parse().unwrap(),
        common::BYPASS_V6.parse().unwrap(),
    ]
}

#[test]
fn the_injectors_arguments_capture_as_istio_does_v4_and_v6() {
    let l = lab("ist-inj");
    // --dual-stack: the pod has IPv4 first, so Istio would capture IPv4 only.
    let out = istio_iptables(&l.lab.pod, &["--dual-stack"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for family in [v4(), v6()] {
        let (observed, expected) = run_cases(&l, &cases(family));
        assert_eq!(observed, expected, "family of {}", family[0]);
    }

    // A second install finds the rules as asked and changes nothing.
    let before = saved(&l.lab.pod);
    let out = istio_iptables(&l.lab.pod, &["--dual-stack"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing changed"));
    let strip_comments = |t: &str| {
        t.lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(strip_comments(&saved(&l.lab.pod)), strip_comments(&before));

    // --cleanup-only leaves no chain, rule or address of ours behind, and
    // the client reaches the workload directly again.
    let out = istio_iptables(&l.lab.pod, &["--dual-stack", "--cleanup-only"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !saved(&l.lab.pod).contains("SLUICE"),
        "{}",
        saved(&l.lab.pod)
    );
    let lo = l
        .lab
        .pod
        .output(Command::new("ip").args(["-6", "addr", "show", "lo"]))
        .unwrap();
    assert!(!String::from_utf8_lossy(&lo.stdout).contains("::6/128"));
    let direct = ask(
        &l.lab.client,
        0,
        None,
        SocketAddr::new(ClientPod::POD_V4.into(), APP_PORT),
    );
    assert!(direct.starts_with("workload 8080 -"), "{direct}");
}

#[test]
fn without_dual_stack_a_pod_with_ipv4_first_captures_ipv4_only_as_istio_does() {
    let l = lab("ist-v4");
    let out = istio_iptables(&l.lab.pod, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let [pod, ..] = v4();
    let answer = ask(&l.lab.client, 0, None, SocketAddr::new(pod, APP_PORT));
    assert!(answer.starts_with("mesh 15006"), "{answer}");
    let [pod, ..] = v6();
    let answer = ask(&l.lab.client, 0, None, SocketAddr::new(pod, APP_PORT));
    assert!(answer.starts_with("workload 8080 -"), "{answer}");
}

#[test]
fn an_unsupported_flag_is_refused_by_name_and_nothing_is_installed() {
    let l = ClientPod::new("ist-refuse").expect("client ⇄ pod");
    let out = istio_iptables(&l.pod, &["--cni-mode"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--cni-mode"), "{err}");
    assert!(!saved(&l.pod).contains("SLUICE"));
}

/// `--run-validation` as a uid, in `ns`: the exit code.
fn validation(ns: &Netns, uid: u32) -> (Option<i32>, String) {
    let mut command = Command::new("setpriv");
    command
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
        ])
        .arg(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "istio-iptables",
            "--run-validation",
            "--skip-rule-apply",
            "--probe-timeout=3s",
        ]);
    let out = ns
        .output(&mut command)
        .expect("run sluice istio-iptables --run-validation");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn run_validation_passes_with_the_capture_as_the_proxy_uid_and_exits_126_otherwise() {
    let l = ClientPod::new("ist-valid").expect("client ⇄ pod");
    let out = istio_iptables(&l.pod, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, err) = validation(&l.pod, MESH_UID);
    assert_eq!(code, Some(0), "{err}");
    // Another uid's connections over lo are not redirected, as in Istio.
    let (code, err) = validation(&l.pod, APP_UID);
    assert_eq!(code, Some(126), "{err}");
    assert!(err.contains("validation"), "{err}");

    let out = istio_iptables(&l.pod, &["--cleanup-only"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, err) = validation(&l.pod, MESH_UID);
    assert_eq!(code, Some(126), "{err}");
}

/// `-m TPROXY`: the client's connection reaches the mesh proxy, whose own
/// connection to the app, from the client's address, shows the app the
/// client's address; with the outbound capture's nat rules in place (so
/// the kernel tracks the namespace's connections), inbound connections
/// still make no conntrack entry; outbound capture still works.
#[test]
fn tproxy_mode_shows_the_app_the_client_with_no_conntrack_entry() {
    let l = lab_with("ist-tpx", |pod| {
        let mut mesh = as_uid_with(MESH_UID, &["net_admin", "net_raw"]);
        mesh.args(["mesh-tproxy", "1337"]);
        start(pod, mesh, "mesh")
    });
    let lab = &l.lab;
    // The injector's arguments but -m TPROXY.
    let args: Vec<&str> = INJECTOR
        .iter()
        .map(|a| if *a == "REDIRECT" { "TPROXY" } else { a })
        .collect();
    let args = [&["istio-iptables"][..], &args, &["--dual-stack"]].concat();
    let out = common::sluice_cli(&lab.pod, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let before = common::conntrack_count(&lab.pod);
    for [pod, client, ..] in [v4(), v6()] {
        for _ in 0..5 {
            let answer = ask(&lab.client, 0, None, SocketAddr::new(pod, APP_PORT));
            let app = SocketAddr::new(pod, APP_PORT);
            // The app's answer ends with its peer: the client's address.
            let expected = format!("mesh 15006 {app} | workload 8080 - ");
            assert!(answer.starts_with(&expected), "{answer}");
            let peer: SocketAddr = answer
                .rsplit(' ')
                .next()
                .unwrap()
                .parse()
                .expect("the app's peer");
            assert_eq!(peer.ip(), client, "{answer}");
        }
    }
    assert_eq!(
        common::conntrack_count(&lab.pod),
        before,
        "conntrack entries of inbound connections"
    );

    // Excluded ports pass untouched (and tracked, as everything is in
    // Istio's rules: the app's replies must meet the nat rules as replies).
    for [pod, ..] in [v4(), v6()] {
        let answer = ask(&lab.client, 0, None, SocketAddr::new(pod, 15021));
        assert!(answer.starts_with("workload 15021 -"), "{answer}");
    }
    let [_, client, ..] = v4();
    let answer = ask(
        &lab.pod,
        APP_UID,
        None,
        SocketAddr::new(client, SERVER_PORT),
    );
    assert!(
        answer.starts_with(&format!("mesh 15001 {client}:{SERVER_PORT}")),
        "{answer}"
    );
}

/// `--redirect-dns --capture-all-dns` (Istio's DNS proxying): the app's DNS,
/// UDP and TCP, reaches the mesh proxy on 15053; the proxy's own DNS goes
/// out untouched; other UDP is not captured.
#[test]
fn dns_capture_sends_the_apps_dns_to_15053_and_not_the_proxys() {
    let lab = ClientPod::new("ist-dns").expect("client ⇄ pod");
    let _parties = [
        serve(&lab.pod, MESH_UID, "mesh", &[15001, 15006, 15053]),
        serve(&lab.client, 0, "server", &[53, SERVER_PORT]),
    ];
    let out = istio_iptables(
        &lab.pod,
        &["--dual-stack", "--redirect-dns", "--capture-all-dns"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for [_, client, ..] in [v4(), v6()] {
        let dns = SocketAddr::new(client, 53);
        let seen = |answer: String| {
            answer
                .rsplit_once(' ')
                .map_or(answer.clone(), |(h, _)| h.to_string())
        };
        assert_eq!(
            seen(ask_udp(&lab.pod, APP_UID, dns)),
            "mesh 15053 -",
            "app's DNS over UDP"
        );
        assert_eq!(
            seen(ask(&lab.pod, APP_UID, None, dns)),
            format!("mesh 15053 {dns}"),
            "app's DNS over TCP"
        );
        assert_eq!(
            seen(ask_udp(&lab.pod, MESH_UID, dns)),
            "server 53 -",
            "the proxy's own DNS"
        );
        let other = SocketAddr::new(client, SERVER_PORT);
        assert_eq!(
            seen(ask_udp(&lab.pod, APP_UID, other)),
            "server 9000 -",
            "other UDP"
        );
    }
}

/// The figure `-m TPROXY` is measured against: Istio's REDIRECT capture
/// costs one conntrack entry per inbound connection (README, "In an Istio
/// pod").
#[test]
fn redirect_mode_costs_a_conntrack_entry_per_inbound_connection() {
    let l = lab("ist-ct");
    let out = istio_iptables(&l.lab.pod, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before = common::conntrack_count(&l.lab.pod);
    let [pod, ..] = v4();
    for _ in 0..10 {
        let answer = ask(&l.lab.client, 0, None, SocketAddr::new(pod, APP_PORT));
        assert!(answer.starts_with("mesh 15006"), "{answer}");
    }
    assert_eq!(common::conntrack_count(&l.lab.pod) - before, 10);
}

/// Istio's init container runs `istio-iptables`: the binary by that name
/// (a link, as an image would make it) takes Istio's flags directly.
#[test]
fn invoked_as_istio_iptables_it_takes_istios_flags() {
    let l = ClientPod::new("ist-argv0").expect("client ⇄ pod");
    let dir = std::env::temp_dir().join(format!("sl-istio-argv0-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let link = dir.join("istio-iptables");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_sluice"), &link).expect("link");
    let out = l
        .pod
        .output(Command::new(&link).args(INJECTOR).arg("-n"))
        .expect("run istio-iptables");
    std::fs::remove_dir_all(&dir).expect("remove the link");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("-A SLUICE_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006"),
        "{text}"
    );
}
