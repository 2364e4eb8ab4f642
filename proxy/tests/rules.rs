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

/// Runs `ip <args>` in `ns` and returns what it printed.
fn ip(ns: &Netns, args: &[&str]) -> String {
    let output = ns
        .output(std::process::Command::new("ip").args(args))
        .expect("run ip");
    assert!(
        output.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Everything an install touches, as text two states can be compared by:
/// the rules of every netfilter table (not the tables and built-in chains,
/// which stay once made), the fwmark rules, the routes, the addresses of
/// lo, the sysctls.
fn namespace_state(ns: &Netns) -> String {
    let mut state = String::new();
    for tool in ["iptables-save", "ip6tables-save"] {
        let output = ns
            .output(&mut std::process::Command::new(tool))
            .expect("iptables-save");
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            if line.starts_with("-A") || line.starts_with(":SLUICE") {
                state += line;
                state.push('\n');
            }
        }
    }
    for args in [
        &["-4", "rule", "show"][..],
        &["-6", "rule", "show"],
        &["-4", "route", "show", "table", "all"],
        &["-6", "route", "show", "table", "all"],
        &["-6", "addr", "show", "dev", "lo"],
    ] {
        state += &format!("# ip {}\n{}", args.join(" "), ip(ns, args));
    }
    for key in [
        "net.ipv4.tcp_fwmark_accept",
        "net.ipv4.fwmark_reflect",
        "net.ipv6.fwmark_reflect",
    ] {
        state += &format!("{key}={}\n", ns.sysctl_get(key).expect("sysctl"));
    }
    state
}

/// What Istio's init container (or any other tool) leaves in a pod: the
/// same fwmark rule and local route sluice uses by default, and `::6`.
fn add_foreign_routing(ns: &Netns) {
    ip(
        ns,
        &["-4", "rule", "add", "fwmark", "1337", "lookup", "133"],
    );
    ip(
        ns,
        &["-6", "rule", "add", "fwmark", "1337", "lookup", "133"],
    );
    ip(
        ns,
        &[
            "-4",
            "route",
            "add",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            "133",
        ],
    );
    ip(ns, &["-6", "addr", "add", "::6/128", "dev", "lo"]);
}

/// `rules remove` takes what sluice added and nothing else: a foreign
/// `fwmark 1337 lookup 133` (Istio's defaults), a foreign local route in
/// table 133 and a foreign `::6` are still there afterwards, in both
/// families; the route sluice added beside them (v6) is gone.
#[test]
fn rules_remove_leaves_a_foreign_fwmark_rule_route_and_address() {
    let ns = Netns::new("foreign").expect("netns");
    add_foreign_routing(&ns);
    let foreign = namespace_state(&ns);

    ok(&sluice_cli(&ns, &["rules", "install"]));
    let shown = ok(&sluice_cli(&ns, &["rules", "show"]));
    assert!(
        shown.contains("status: installed, matches the flags"),
        "{shown}"
    );
    assert!(
        ip(&ns, &["-4", "route", "show", "table", "133"]).contains("local default dev lo"),
        "the foreign route was replaced"
    );
    ok(&sluice_cli(&ns, &["rules", "remove"]));
    assert_eq!(
        namespace_state(&ns),
        foreign,
        "rules remove took more (or less) than sluice added"
    );
    let shown = sluice_cli(&ns, &["rules", "show"]);
    let stdout = String::from_utf8_lossy(&shown.stdout);
    assert!(stdout.contains("status: not installed"), "{stdout}");
    assert!(
        stdout.contains("fwmark rule v4: present (not sluice's)"),
        "{stdout}"
    );
}

/// An init container's `rules install`, then `run --install-rules` (with the
/// same flags, or others): at its exit, sluice leaves the namespace as it
/// found it, with the earlier rules in place, so the pod stays intercepted.
#[test]
fn run_install_rules_leaves_an_earlier_install_in_place_at_exit() {
    let ns = Netns::new("keep").expect("netns");
    ok(&sluice_cli(&ns, &["rules", "install", "--ports", "9080"]));
    let earlier = namespace_state(&ns);
    for ports in ["9080", "9080,9081"] {
        let sluice = Sluice::run(&ns, &["--ports", ports, "--install-rules"]);
        sluice.stop();
        assert_eq!(
            namespace_state(&ns),
            earlier,
            "run --ports {ports} --install-rules did not leave the earlier install"
        );
    }
    let shown = ok(&sluice_cli(&ns, &["rules", "show", "--ports", "9080"]));
    assert!(
        shown.contains("status: installed, matches the flags"),
        "{shown}"
    );
    ok(&sluice_cli(&ns, &["rules", "remove"]));
    assert_clean(&ns);
}

/// An install that fails half-way (ip6tables-restore refuses, after the
/// IPv4 rules were replaced) puts back what was there: the rules of an
/// earlier install, and a foreign rule, route and `::6`.
#[test]
fn a_failed_install_puts_back_what_was_there() {
    let ns = Netns::new("rollback").expect("netns");
    add_foreign_routing(&ns);
    ok(&sluice_cli(&ns, &["rules", "install", "--ports", "9080"]));
    let earlier = namespace_state(&ns);

    let dir = std::env::temp_dir().join(format!("sl-failing-ip6tables-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let fake = dir.join("ip6tables-restore");
    std::fs::write(
        &fake,
        "#!/bin/sh\n\
         [ \"$1\" = --version ] && exec /usr/sbin/ip6tables-restore \"$@\"\n\
         cat >/dev/null\n\
         echo 'ip6tables-restore: refused by the test' >&2\n\
         exit 1\n",
    )
    .expect("write the failing ip6tables-restore");
    let executable = std::os::unix::fs::PermissionsExt::from_mode(0o755);
    std::fs::set_permissions(&fake, executable).expect("chmod");
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"));
    command
        .args(["rules", "install", "--ports", "9081"])
        .env("PATH", path);
    let output = ns.output(&mut command).expect("run sluice");
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = failed(&output);
    assert!(stderr.contains("refused by the test"), "{stderr}");
    assert_eq!(
        namespace_state(&ns),
        earlier,
        "the rollback did not put back what was there"
    );
}

/// `run` takes away at exit what it installed, in every mode (the rules of
/// `--install-rules`; ebpf's policy route, sysctls and `::6`), and only that:
/// in an empty namespace and beside a foreign rule, route and `::6`, the
/// namespace is as it was.
#[test]
fn run_removes_at_exit_what_it_installed_and_only_that() {
    for foreign in [false, true] {
        for mode in ["tproxy", "redirect", "ebpf"] {
            let ns = Netns::new("atexit").expect("netns");
            if foreign {
                add_foreign_routing(&ns);
            }
            let before = namespace_state(&ns);
            let mut args = vec!["--mode", mode, "--ports", "9080"];
            if mode != "ebpf" {
                args.push("--install-rules");
            }
            let sluice = Sluice::run(&ns, &args);
            assert_ne!(namespace_state(&ns), before, "{mode}: nothing installed");
            sluice.stop();
            assert_eq!(
                namespace_state(&ns),
                before,
                "{mode}, foreign routing {foreign}: not as before"
            );
        }
    }
}

/// `run --mode ebpf --pin DIR` leaves its program and the routing it needs
/// after exit; `rules remove --mode ebpf --pin DIR` then takes both, so the
/// namespace is as before (the policy route and sysctls included, which no
/// ebpf-mode `rules remove` used to look for).
#[test]
fn rules_remove_takes_what_a_pinned_ebpf_run_left() {
    let ns = Netns::new("ebpfpin").expect("netns");
    let bpffs = BpfFs::mount();
    let pin = bpffs.path().join("sluice");
    let pin = pin.to_str().expect("a UTF-8 path");
    let before = namespace_state(&ns);
    let sluice = Sluice::run(&ns, &["--mode", "ebpf", "--ports", "9080", "--pin", pin]);
    sluice.stop();
    assert_ne!(
        namespace_state(&ns),
        before,
        "the pinned run's routing went"
    );
    ok(&sluice_cli(
        &ns,
        &["rules", "remove", "--mode", "ebpf", "--pin", pin],
    ));
    assert_eq!(namespace_state(&ns), before);
}
