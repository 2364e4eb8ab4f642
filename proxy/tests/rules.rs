//! `sluice rules install|show|remove` against the real netfilter and routing
//! of a namespace made for each test.

mod common;

use common::*;
use netlab::Netns;
use sluice::routing::{PolicyRoute, RoutingState};

fn ok(output: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "sluice failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn failed(output: &std::process::Output) -> String {
    assert!(!output.status.success(), "sluice should have failed");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn iptables_save(ns: &Netns) -> String {
    let mut all = String::new();
    for tool in ["iptables-save", "ip6tables-save"] {
        let output = ns
            .output(std::process::Command::new(tool).arg("-t").arg("mangle"))
            .expect("iptables-save");
        all += &String::from_utf8_lossy(&output.stdout);
    }
    all
}

fn routing(ns: &Netns) -> RoutingState {
    ns.run(|| {
        PolicyRoute {
            mark: 1337,
            table: 133,
            ipv6: true,
        }
        .read()
    })
    .expect("read policy routing over rtnetlink")
}

fn assert_clean(ns: &Netns) {
    let saved = iptables_save(ns);
    assert!(
        !saved.contains("SLUICE"),
        "sluice chains left behind:\n{saved}"
    );
    assert!(
        routing(ns).empty(),
        "policy routing left behind: {:?}",
        routing(ns)
    );
}

#[test]
fn dry_run_prints_the_exact_restore_input_and_changes_nothing() {
    // In a namespace of its own: were --dry-run broken, nothing else is hit.
    let ns = Netns::new("dry").expect("netns");
    let output = sluice_cli(
        &ns,
        &[
            "rules",
            "install",
            "--dry-run",
            "--ports",
            "9080,9081",
            "--exclude-ports",
            "15021,15090",
        ],
    );
    let golden = include_str!("golden/tproxy-dry-run.txt");
    assert_eq!(ok(&output), golden);
    assert_clean(&ns);
}

/// The first run of a new user: no flag at all, so every port (`*`), SYNs
/// only, nothing arriving on lo.
#[test]
fn dry_run_of_the_defaults() {
    let ns = Netns::new("drydef").expect("netns");
    let output = sluice_cli(&ns, &["rules", "install", "--dry-run"]);
    let golden = include_str!("golden/tproxy-default-dry-run.txt");
    assert_eq!(ok(&output), golden);
    assert_clean(&ns);
}

#[test]
fn install_show_reinstall_remove() {
    let ns = Netns::new("rules").expect("netns");
    let flags = [
        "--ports",
        "9080,9081",
        "--exclude-cidrs",
        "198.18.9.0/24,2001:2:9::/48",
    ];
    let cli = |action: &str, extra: &[&str]| {
        let args: Vec<&str> = ["rules", action].iter().chain(extra).copied().collect();
        sluice_cli(&ns, &args)
    };

    ok(&cli("install", &flags));
    let first = iptables_save(&ns);
    assert_eq!(
        first
            .matches("-A PREROUTING -p tcp -j SLUICE_PREROUTING")
            .count(),
        2,
        "one hook per family:\n{first}"
    );
    assert!(
        first.contains("-s 198.18.9.0/24 -j RETURN")
            && first.contains("-s 2001:2:9::/48 -j RETURN")
    );
    assert!(routing(&ns).complete(), "{:?}", routing(&ns));
    let shown = ok(&cli("show", &flags));
    assert!(
        shown.contains("status: installed, matches the flags"),
        "{shown}"
    );

    ok(&cli("install", &flags));
    assert_eq!(
        iptables_save(&ns)
            .lines()
            .filter(|l| l.starts_with("-A"))
            .count(),
        first.lines().filter(|l| l.starts_with("-A")).count(),
        "a second install added rules"
    );

    let other = cli("show", &["--ports", "9080"]);
    assert_eq!(
        other.status.code(),
        Some(3),
        "show must say the flags differ"
    );
    assert!(String::from_utf8_lossy(&other.stdout).contains("does NOT match"));

    ok(&cli("remove", &[]));
    assert_clean(&ns);
    ok(&cli("remove", &[]));
    let shown = cli("show", &[]);
    assert!(String::from_utf8_lossy(&shown.stdout).contains("status: not installed"));
}

fn fwmark_accept(ns: &Netns) -> String {
    ns.sysctl_get("net.ipv4.tcp_fwmark_accept")
        .expect("read tcp_fwmark_accept")
}

/// `tcp_fwmark_accept` and `fwmark_reflect`, which the client-source return
/// path needs, are turned on by install and back off by remove, in every
/// mode that has rules; and left on by remove when on before sluice came.
#[test]
fn install_and_remove_restore_tcp_fwmark_accept() {
    for mode in ["tproxy", "redirect"] {
        let ns = Netns::new("fwmark").expect("netns");
        assert_eq!(fwmark_accept(&ns), "0");
        ok(&sluice_cli(&ns, &["rules", "install", "--mode", mode]));
        assert_eq!(fwmark_accept(&ns), "1", "{mode}");
        let shown = ok(&sluice_cli(&ns, &["rules", "show", "--mode", mode]));
        assert!(
            shown.contains("sysctls tcp_fwmark_accept, fwmark_reflect: on"),
            "{shown}"
        );
        assert_eq!(
            ns.sysctl_get("net.ipv6.fwmark_reflect").expect("sysctl"),
            "1"
        );
        // Installing again must not forget that sluice turned it on.
        ok(&sluice_cli(&ns, &["rules", "install", "--mode", mode]));
        ok(&sluice_cli(&ns, &["rules", "remove"]));
        assert_eq!(fwmark_accept(&ns), "0", "{mode}: not restored");
        for key in ["net.ipv4.fwmark_reflect", "net.ipv6.fwmark_reflect"] {
            assert_eq!(ns.sysctl_get(key).expect("sysctl"), "0", "{key}");
        }
        assert_clean(&ns);

        // On before sluice: sluice does not own it, and leaves it on.
        ns.sysctl_set("net.ipv4.tcp_fwmark_accept", "1")
            .expect("sysctl");
        ok(&sluice_cli(&ns, &["rules", "install", "--mode", mode]));
        ok(&sluice_cli(&ns, &["rules", "remove"]));
        assert_eq!(fwmark_accept(&ns), "1", "{mode}: turned off someone else's");
        assert_clean(&ns);
    }
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let ns = Netns::new("bad").expect("netns");
    for (args, says) in [
        (&["--mark", "0"][..], "--mark must not be 0"),
        (&["--ports", "80,0"], "port 0"),
        (&["--exclude-cidrs", "198.18.0.0/99"], "--exclude-cidrs"),
        (&["--table", "255"], "reserved"),
        (
            &["--ports", "15006"],
            "both in --ports and in --exclude-ports",
        ),
    ] {
        let all: Vec<&str> = ["rules", "install"].iter().chain(args).copied().collect();
        let stderr = failed(&sluice_cli(&ns, &all));
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert_clean(&ns);
    }
}

#[test]
fn missing_iptables_is_reported_with_the_package_to_install() {
    let ns = Netns::new("noipt").expect("netns");
    let empty = std::env::temp_dir().join(format!("sl-empty-path-{}", std::process::id()));
    std::fs::create_dir_all(&empty).expect("empty dir");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"));
    command.args(["rules", "install"]).env("PATH", &empty);
    let output = ns.output(&mut command).expect("run sluice");
    let stderr = failed(&output);
    assert!(stderr.contains("apt-get install iptables"), "{stderr}");
    assert_clean(&ns);
    let _ = std::fs::remove_dir(&empty);
}

#[test]
fn missing_cap_net_admin_is_reported() {
    let ns = Netns::new("nocap").expect("netns");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"));
    command.args(["rules", "install"]);
    // Dropped from the bounding set, root's exec no longer gets it.
    // SAFETY: between fork and exec, one prctl, async-signal-safe, and no
    // allocation.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            if libc::prctl(libc::PR_CAPBSET_DROP, 12 /* CAP_NET_ADMIN */, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let stderr = failed(&ns.output(&mut command).expect("run sluice"));
    assert!(stderr.contains("CAP_NET_ADMIN"), "{stderr}");
    assert_clean(&ns);
}

#[test]
fn run_refuses_a_proxy_port_in_use_and_installs_nothing() {
    let ns = Netns::new("inuse").expect("netns");
    let _holder = ns.run(|| std::net::TcpListener::bind("0.0.0.0:15006").expect("hold the port"));
    let output = sluice_cli(&ns, &["run", "--ports", "9080", "--install-rules"]);
    let stderr = failed(&output);
    assert!(stderr.contains("15006 is already in use"), "{stderr}");
    assert_clean(&ns);
}

#[test]
fn default_dry_run_excludes_the_proxy_and_admin_ports() {
    // No flags: what a first run installs. 15000 (admin), 15006 (proxy),
    // 15020 (metrics), 15021 (readiness), 15090 are never intercepted.
    let ns = Netns::new("drydef").expect("netns");
    let output = sluice_cli(&ns, &["rules", "install", "--dry-run"]);
    let golden = include_str!("golden/tproxy-default-dry-run.txt");
    assert_eq!(ok(&output), golden);
    assert_clean(&ns);
}
