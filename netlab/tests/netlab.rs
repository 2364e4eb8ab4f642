//! Real-kernel tests: they need root and create (and remove) `sl-` namespaces.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use netlab::{ClientPod, Error, Netns};

const TIMEOUT: Duration = Duration::from_secs(5);

/// Listens in the pod, connects from the client, and checks one request and
/// one reply go through with the expected addresses.
fn ping_pong(topo: &ClientPod, server_ip: IpAddr, client_ip: IpAddr) {
    let listener = topo
        .pod
        .run(|| TcpListener::bind(SocketAddr::new(server_ip, 0)))
        .unwrap();
    let server_addr = listener.local_addr().unwrap();
    thread::scope(|s| {
        let server = s.spawn(|| {
            let (mut conn, peer) = accept_within(&listener, TIMEOUT);
            conn.set_read_timeout(Some(TIMEOUT)).unwrap();
            let mut buf = [0; 4];
            conn.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"ping");
            conn.write_all(b"pong").unwrap();
            peer.ip()
        });
        let mut conn = topo
            .client
            .run(|| TcpStream::connect_timeout(&server_addr, TIMEOUT))
            .unwrap();
        conn.set_read_timeout(Some(TIMEOUT)).unwrap();
        conn.write_all(b"ping").unwrap();
        let mut buf = [0; 4];
        conn.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"pong");
        assert_eq!(server.join().unwrap(), client_ip);
    });
}

/// A blocking accept() would hang the test forever if the client never connects.
fn accept_within(listener: &TcpListener, limit: Duration) -> (TcpStream, SocketAddr) {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + limit;
    loop {
        match listener.accept() {
            Ok((conn, peer)) => {
                conn.set_nonblocking(false).unwrap();
                return (conn, peer);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!(
                "no connection to {:?} within {limit:?}: {e}",
                listener.local_addr()
            ),
        }
    }
}

#[test]
fn client_pod_carries_tcp_v4_and_v6_and_is_removed_on_drop() {
    let topo = ClientPod::new("tcp").unwrap();
    let paths = [topo.client.path(), topo.pod.path()];
    for p in &paths {
        assert!(p.exists(), "{}", p.display());
        assert!(p
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("sl-tcp-"));
    }
    ping_pong(&topo, ClientPod::POD_V4.into(), ClientPod::CLIENT_V4.into());
    ping_pong(&topo, ClientPod::POD_V6.into(), ClientPod::CLIENT_V6.into());
    drop(topo);
    for p in &paths {
        assert!(!p.exists(), "{} still exists", p.display());
    }
}

#[test]
fn routes_and_extra_addresses() {
    let topo = ClientPod::new("route").unwrap();
    let vip4 = IpAddr::V4(Ipv4Addr::new(198, 19, 0, 1));
    let vip6 = IpAddr::V6(Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 1));
    topo.pod.add_addr("lo", vip4, 32).unwrap();
    topo.pod.add_addr("lo", vip6, 128).unwrap();
    // Host bits in the destination are cleared by add_route.
    let via4 = ClientPod::POD_V4.into();
    let via6 = ClientPod::POD_V6.into();
    topo.client.add_route(vip4, 16, via4).unwrap();
    topo.client.add_route(vip6, 64, via6).unwrap();
    ping_pong(&topo, vip4, ClientPod::CLIENT_V4.into());
    ping_pong(&topo, vip6, ClientPod::CLIENT_V6.into());

    assert!(topo.client.link_index("eth0").unwrap() > 1);
    assert_eq!(topo.client.link_index("lo").unwrap(), 1);
    assert!(matches!(
        topo.client.link_index("nope0"),
        Err(Error::NoSuchLink { .. })
    ));
    assert!(matches!(
        topo.client.set_link_up("nope0"),
        Err(Error::NoSuchLink { .. })
    ));
    let outside = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    assert!(matches!(
        topo.client.add_addr("eth0", outside, 8),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        topo.client.add_route(vip4, 16, via6),
        Err(Error::Invalid(_))
    ));
    // A duplicate address is the kernel's to refuse.
    let dup = topo
        .client
        .add_addr("eth0", ClientPod::CLIENT_V4.into(), 24);
    assert!(matches!(dup, Err(Error::Netlink { .. })), "{dup:?}");
}

#[test]
fn sysctl_round_trip_leaves_the_root_namespace_alone() {
    let key = "net.ipv4.ip_forward";
    let read_root = || std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    let root_before = read_root();
    let want = if root_before.trim() == "1" { "0" } else { "1" };

    let ns = Netns::new("sysctl").unwrap();
    ns.sysctl_set(key, want).unwrap();
    assert_eq!(ns.sysctl_get(key).unwrap(), want);
    assert_eq!(ns.sysctl_get("net.ipv6.conf.all.accept_dad").unwrap(), "0");
    assert_eq!(read_root(), root_before);
    assert!(matches!(
        ns.sysctl_set("kernel.hostname", "x"),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        ns.sysctl_get("net.ipv4.no_such_key"),
        Err(Error::Os { .. })
    ));
}

#[test]
fn spawned_process_runs_inside_and_dies_with_its_guard() {
    let topo = ClientPod::new("spawn").unwrap();
    let ns_inode = std::fs::metadata(topo.pod.path()).unwrap().ino();

    let mut cmd = Command::new("sh");
    cmd.args(["-c", "readlink /proc/self/ns/net; cat /proc/self/net/dev"]);
    let mut p = topo.pod.spawn(cmd.stdout(Stdio::piped())).unwrap();
    let mut out = String::new();
    p.child_mut()
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(p.child_mut().wait().unwrap().success());
    assert!(out.starts_with(&format!("net:[{ns_inode}]\n")), "{out}");
    let mut ifaces: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(i, _)| i.trim())
        .collect();
    ifaces.retain(|i| !i.starts_with("net") && !i.contains('|'));
    ifaces.sort_unstable();
    assert_eq!(ifaces, ["eth0", "lo"], "{out}");

    let sleeper = topo.pod.spawn(Command::new("sleep").arg("30")).unwrap();
    let proc_dir = PathBuf::from(format!("/proc/{}", sleeper.pid()));
    assert!(proc_dir.exists());
    drop(sleeper);
    assert!(
        !proc_dir.exists(),
        "{} survived its guard",
        proc_dir.display()
    );

    let mut sleeper = topo.pod.spawn(Command::new("sleep").arg("30")).unwrap();
    assert!(sleeper.try_wait().unwrap().is_none());
    let status = sleeper.stop().unwrap();
    assert!(!status.success());
}

#[test]
fn panic_still_removes_the_namespace() {
    let path = Mutex::new(None::<PathBuf>);
    let result = panic::catch_unwind(AssertUnwindSafe(|| {
        let ns = Netns::new("panic").unwrap();
        *path.lock().unwrap() = Some(ns.path());
        // A panic inside run() comes back to the caller's thread...
        ns.run(|| panic!("inside the namespace"));
    }));
    let payload = result.unwrap_err();
    assert_eq!(
        payload.downcast_ref::<&str>(),
        Some(&"inside the namespace")
    );
    // ...and unwinding through the guard removed the namespace.
    let path = path.into_inner().unwrap().unwrap();
    assert!(
        !Path::new(&path).exists(),
        "{} survived the panic",
        path.display()
    );
}

#[test]
fn names_are_unique_and_purposes_checked() {
    let a = Netns::new("uniq").unwrap();
    let b = Netns::new("uniq").unwrap();
    assert_ne!(a.name(), b.name());
    let prefix = format!("sl-uniq-{}-", std::process::id());
    assert!(a.name().starts_with(&prefix), "{}", a.name());
    assert!(matches!(Netns::new("a/b"), Err(Error::Invalid(_))));
    assert!(matches!(Netns::new(""), Err(Error::Invalid(_))));
}

#[test]
fn a_declared_topology_is_built_with_its_sysctls_and_removed_with_the_lab() {
    let mut spec = ClientPod::spec();
    spec.hosts[1]
        .sysctls
        .push(("net.ipv4.tcp_tw_reuse".into(), "0".into()));
    spec.hosts[1]
        .sysctls
        .push(("net.core.somaxconn".into(), "777".into()));
    let lab = spec.build("spec").unwrap();
    let pod = lab.host("pod").unwrap();
    assert_eq!(pod.sysctl_get("net.ipv4.tcp_tw_reuse").unwrap(), "0");
    assert_eq!(pod.sysctl_get("net.core.somaxconn").unwrap(), "777");
    let client = lab.host("cli").unwrap();
    assert_ne!(client.sysctl_get("net.core.somaxconn").unwrap(), "777");
    assert!(matches!(lab.host("nope"), Err(Error::Invalid(_))));
    let paths = [client.path(), pod.path()];

    let topo = ClientPod::from_lab(lab).unwrap();
    ping_pong(&topo, ClientPod::POD_V4.into(), ClientPod::CLIENT_V4.into());
    ping_pong(&topo, ClientPod::POD_V6.into(), ClientPod::CLIENT_V6.into());
    drop(topo);
    for p in &paths {
        assert!(!p.exists(), "{} still exists", p.display());
    }

    // A mistake in the spec removes what was built before it.
    let mut bad = ClientPod::spec();
    bad.links[0].b.addrs.push(("10.0.0.2".parse().unwrap(), 8));
    assert!(matches!(bad.build("spec-bad"), Err(Error::Invalid(_))));
}

/// The kernel's build options, where it publishes them.
fn kernel_config() -> Option<String> {
    let gz = std::fs::File::open("/proc/config.gz").ok()?;
    let out = Command::new("zcat").stdin(gz).output().ok()?;
    String::from_utf8(out.stdout).ok()
}

#[test]
fn netem_delays_the_link_or_says_the_kernel_lacks_it() {
    let delay = Duration::from_millis(40);
    let mut spec = ClientPod::spec();
    spec.links[0].a.netem = Some(netlab::Netem {
        delay,
        ..Default::default()
    });
    match spec.build("netem") {
        Ok(lab) => {
            let topo = ClientPod::from_lab(lab).unwrap();
            let listener = topo
                .pod
                .run(|| TcpListener::bind((ClientPod::POD_V4, 0)))
                .unwrap();
            let addr = listener.local_addr().unwrap();
            // The SYN leaves through the delayed end: the handshake cannot
            // complete sooner than the delay.
            let started = Instant::now();
            let conn = topo
                .client
                .run(|| TcpStream::connect_timeout(&addr, TIMEOUT))
                .unwrap();
            assert!(started.elapsed() >= delay, "{:?}", started.elapsed());
            drop(conn);
            ping_pong(&topo, ClientPod::POD_V4.into(), ClientPod::CLIENT_V4.into());
        }
        Err(Error::Unsupported(message)) => {
            // Only a kernel built without netem may say so.
            let config =
                kernel_config().expect("netem refused, and no /proc/config.gz to tell why");
            assert!(
                config.contains("# CONFIG_NET_SCH_NETEM is not set"),
                "netem refused on a kernel that has it: {message}"
            );
            assert!(message.contains("CONFIG_NET_SCH_NETEM"), "{message}");
        }
        Err(other) => panic!("netem: {other}"),
    }
    let bad = netlab::Netem {
        loss_percent: 120.0,
        ..Default::default()
    };
    let topo = ClientPod::new("netem-bad").unwrap();
    assert!(matches!(
        topo.client.set_netem("eth0", &bad),
        Err(Error::Invalid(_))
    ));
}
