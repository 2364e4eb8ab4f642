//! The eBPF interception engine (`intercept::ebpf`) on the real kernel: its
//! sk_lookup program is attached to a netlab pod namespace, and the test's
//! own listeners stand in for sluice (port 15006) and for the workload
//! (9080, 9081, 9090), so each connection's landing place is seen directly.
//! Nothing is ever attached to the machine's own namespace; pins go to a
//! private BPF filesystem mounted by the test and unmounted on drop.
//!
//! The sk_lookup links on a namespace are read back with `bpftool`, not with
//! the engine's own query code, so a wrong `installed()` cannot hide a leak.

mod common;

use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::BpfFs;
use ipnet::IpNet;
use netlab::{ClientPod, Netns};
use sluice::intercept::ebpf::{self, EbpfPolicy, Error, Interceptor};
use socket2::{Domain, SockRef, Socket, Type};

const PROXY_PORT: u16 = 15006;
const PORT: u16 = 9080;
const OTHER_PORT: u16 = 9081;
const EXCLUDED_PORT: u16 = 9090;
/// Client addresses inside the excluded CIDRs below.
const EXCLUDED_CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 9);
const EXCLUDED_CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 9);
/// Upper bound of any single wait, so a hang fails instead of blocking.
const PATIENCE: Duration = Duration::from_secs(5);

fn pod_v4(port: u16) -> SocketAddr {
    SocketAddr::new(ClientPod::POD_V4.into(), port)
}

fn pod_v6(port: u16) -> SocketAddr {
    SocketAddr::new(ClientPod::POD_V6.into(), port)
}

fn policy(ports: &[u16]) -> EbpfPolicy {
    EbpfPolicy {
        intercept_all: false,
        ports: ports.to_vec(),
        exclude_ports: vec![PROXY_PORT],
        exclude_cidrs: Vec::new(),
        exclude_interfaces: Vec::new(),
    }
}

/// Where a connection ended up.
#[derive(Debug, PartialEq, Eq)]
enum Landed {
    /// On the stand-in for sluice; `local` is the accepted socket's
    /// getsockname(), which must be the original destination.
    Proxy { local: SocketAddr },
    /// On the workload's own listener of this port.
    Workload { port: u16 },
    /// The SYN was answered with RST.
    Refused,
}

/// A listening socket in the pod namespace, non-blocking so the test can
/// poll all of them; IPv6 ones are v6-only, as sluice's are.
fn listen(addr: SocketAddr) -> TcpListener {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).expect("socket");
    socket.set_reuse_address(true).expect("SO_REUSEADDR");
    if addr.is_ipv6() {
        socket.set_only_v6(true).expect("IPV6_V6ONLY");
    }
    socket
        .bind(&addr.into())
        .expect("bind in the pod namespace");
    socket.listen(128).expect("listen");
    socket.set_nonblocking(true).expect("non-blocking");
    socket.into()
}

/// The pod side: the stand-in proxy listeners and the workload's.
struct Pod {
    topology: ClientPod,
    proxy: Vec<TcpListener>,
    workload: Vec<(u16, TcpListener)>,
}

impl Pod {
    fn new(purpose: &str) -> Pod {
        let topology = ClientPod::new(purpose).expect("client/pod topology");
        let (proxy, workload) = topology.pod.run(|| {
            let proxy = vec![
                listen((Ipv4Addr::UNSPECIFIED, PROXY_PORT).into()),
                listen((Ipv6Addr::UNSPECIFIED, PROXY_PORT).into()),
            ];
            let workload = [PORT, OTHER_PORT, EXCLUDED_PORT]
                .into_iter()
                .flat_map(|port| [(port, listen(pod_v4(port))), (port, listen(pod_v6(port)))])
                .collect();
            (proxy, workload)
        });
        Pod {
            topology,
            proxy,
            workload,
        }
    }

    fn client(&self) -> &Netns {
        &self.topology.client
    }

    fn pod(&self) -> &Netns {
        &self.topology.pod
    }

    /// Attaches to the pod namespace with the stand-in proxy listeners.
    fn attach(&self, policy: &EbpfPolicy) -> Interceptor {
        let (v4, v6) = (self.proxy[0].as_fd(), self.proxy[1].as_fd());
        self.pod()
            .run(|| Interceptor::attach(policy, v4, v6))
            .unwrap_or_else(|e| panic!("attach: {}", report(&e)))
    }

    /// Connects from `from` (optionally bound to `src`) to `dst`, and finds
    /// which listener accepted that connection.
    fn connect(&self, from: &Netns, src: Option<IpAddr>, dst: SocketAddr) -> Landed {
        let client = match from.run(|| connect(src, dst)) {
            Ok(client) => client,
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Landed::Refused,
            Err(e) => panic!("connect to {dst} from {src:?}: {e}"),
        };
        let me = client.local_addr().expect("client address");
        let me = me.as_socket().expect("an IP address");
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            for listener in &self.proxy {
                if let Ok((accepted, peer)) = listener.accept() {
                    if peer == me {
                        let local = accepted.local_addr().expect("getsockname");
                        return Landed::Proxy { local };
                    }
                }
            }
            for (port, listener) in &self.workload {
                if let Ok((_, peer)) = listener.accept() {
                    if peer == me {
                        return Landed::Workload { port: *port };
                    }
                }
            }
            thread::sleep(Duration::from_millis(2));
        }
        panic!("connection {me} -> {dst} was established but no listener accepted it");
    }

    /// From the client's first address: with a second one on the same
    /// subnet, IPv6 source selection could pick either.
    fn client_to(&self, dst: SocketAddr) -> Landed {
        let src = match dst {
            SocketAddr::V4(_) => IpAddr::V4(ClientPod::CLIENT_V4),
            SocketAddr::V6(_) => IpAddr::V6(ClientPod::CLIENT_V6),
        };
        self.connect(self.client(), Some(src), dst)
    }
}

fn connect(src: Option<IpAddr>, dst: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(dst), Type::STREAM, None)?;
    if let Some(src) = src {
        socket.bind(&SocketAddr::new(src, 0).into())?;
    }
    socket.connect_timeout(&dst.into(), PATIENCE)?;
    Ok(socket)
}

/// An error with its sources, for panic messages.
fn report(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text += &format!(": {s}");
        source = s.source();
    }
    text
}

fn netns_ino(ns: &Netns) -> u64 {
    fs::metadata(ns.path()).expect("stat the namespace").ino()
}

/// `bpftool link show`'s plain output. bpftool lists every link on the
/// machine, then opens each by id; a link that another test is creating
/// (its id not yet settled: EAGAIN) or freeing (ENOENT) in between fails
/// the whole listing, so a failure is retried a bounded number of times.
fn bpftool_link_show() -> String {
    let mut failures = Vec::new();
    for _ in 0..10 {
        let out = Command::new("bpftool")
            .args(["link", "show"])
            .output()
            .expect("run bpftool (apt-get install bpftool)");
        if out.status.success() {
            return String::from_utf8(out.stdout).expect("bpftool prints UTF-8");
        }
        failures.push(String::from_utf8_lossy(&out.stderr).trim().to_string());
        thread::sleep(Duration::from_millis(50));
    }
    panic!("bpftool link show failed 10 times: {failures:?}");
}

/// (link id, program id) of every sk_lookup link on `ns`, from `bpftool
/// link show`, whose plain output is one record per link:
/// `12: netns  prog 45` then an indented `netns_ino 4026532…  attach_type sk_lookup`.
fn bpftool_sk_lookup_links(ns: &Netns) -> Vec<(u32, u32)> {
    let text = bpftool_link_show();
    let ino = format!("netns_ino {}", netns_ino(ns));
    let mut found = Vec::new();
    let mut record: Vec<&str> = Vec::new();
    let mut flush = |record: &mut Vec<&str>| {
        let joined = record.join(" ");
        let words: Vec<&str> = joined.split_whitespace().collect();
        let netns_sk_lookup = words.get(1) == Some(&"netns")
            && joined.contains(&ino)
            && words.windows(2).any(|w| w == ["attach_type", "sk_lookup"]);
        if netns_sk_lookup {
            let id = words[0].trim_end_matches(':').parse().expect("link id");
            let prog = words
                .windows(2)
                .find(|w| w[0] == "prog")
                .and_then(|w| w[1].parse().ok())
                .expect("prog id");
            found.push((id, prog));
        }
        record.clear();
    };
    for line in text.lines() {
        if !line.starts_with(char::is_whitespace) {
            flush(&mut record);
        }
        record.push(line);
    }
    flush(&mut record);
    found
}

/// No netfilter rule of any kind in `ns`, and no conntrack entry.
fn assert_no_netfilter(ns: &Netns) {
    for tool in ["iptables-save", "ip6tables-save"] {
        let out = ns.output(&mut Command::new(tool)).expect(tool);
        let text = String::from_utf8_lossy(&out.stdout);
        let rules: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert!(rules.is_empty(), "{tool} in the pod namespace: {rules:?}");
    }
    let out = ns
        .output(Command::new("nft").args(["list", "ruleset"]))
        .expect("nft list ruleset");
    assert!(out.status.success(), "nft list ruleset failed");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "");
    let count = ns
        .sysctl_get("net.netfilter.nf_conntrack_count")
        .expect("read nf_conntrack_count in the pod namespace");
    assert_eq!(count, "0", "conntrack entries in the pod namespace");
}

fn cookie(listener: &TcpListener) -> u64 {
    SockRef::from(listener).cookie().expect("SO_COOKIE")
}

#[test]
fn steers_intercepted_ports_and_keeps_the_original_destination() {
    let pod = Pod::new("ebpf-steer");
    let interceptor = pod.attach(&policy(&[PORT]));

    assert_eq!(
        pod.client_to(pod_v4(PORT)),
        Landed::Proxy {
            local: pod_v4(PORT)
        }
    );
    assert_eq!(
        pod.client_to(pod_v6(PORT)),
        Landed::Proxy {
            local: pod_v6(PORT)
        }
    );
    // A port not in the list, and the proxy's own port, are left alone.
    for dst in [pod_v4(OTHER_PORT), pod_v6(OTHER_PORT)] {
        assert_eq!(pod.client_to(dst), Landed::Workload { port: OTHER_PORT });
    }
    assert_no_netfilter(pod.pod());

    // What `sluice rules show --mode ebpf` reads: the policy and exactly the
    // sockets this test put in the sockmap.
    let installed = pod.pod().run(ebpf::installed).expect("installed()");
    assert_eq!(installed.len(), 1, "{installed:?}");
    assert_eq!(installed[0].link_id, interceptor.link_id());
    assert_eq!(installed[0].policy, Some(policy(&[PORT])));
    assert_eq!(
        installed[0].listeners,
        [Some(cookie(&pod.proxy[0])), Some(cookie(&pod.proxy[1]))]
    );
    let shown = pod.pod().run(ebpf::show).expect("show()");
    assert!(shown.contains("intercepted ports: 9080"), "{shown}");
    assert!(shown.contains("status: installed"), "{shown}");
    // Nothing on the client side, nor (by bpftool) anywhere but the pod.
    let in_client = pod.client().run(ebpf::installed).expect("installed()");
    assert!(in_client.is_empty(), "{in_client:?}");
    assert_eq!(bpftool_sk_lookup_links(pod.client()), []);
}

#[test]
fn exclusions_reach_the_workload_directly() {
    let pod = Pod::new("ebpf-excl");
    for (addr, len) in [
        (IpAddr::V4(EXCLUDED_CLIENT_V4), 24),
        (IpAddr::V6(EXCLUDED_CLIENT_V6), 64),
    ] {
        pod.client()
            .add_addr(ClientPod::CLIENT_IF, addr, len)
            .expect("second client address");
    }
    let all = EbpfPolicy {
        intercept_all: true,
        ports: Vec::new(),
        exclude_ports: vec![PROXY_PORT, EXCLUDED_PORT],
        exclude_cidrs: vec![
            "198.18.0.8/29".parse().unwrap(),
            "2001:2::8/125".parse().unwrap(),
        ],
        exclude_interfaces: Vec::new(),
    };
    let interceptor = pod.attach(&all);

    // Every port is intercepted...
    for port in [PORT, OTHER_PORT] {
        for dst in [pod_v4(port), pod_v6(port)] {
            assert_eq!(pod.client_to(dst), Landed::Proxy { local: dst });
        }
    }
    // ...but an excluded port,
    for dst in [pod_v4(EXCLUDED_PORT), pod_v6(EXCLUDED_PORT)] {
        assert_eq!(
            pod.client_to(dst),
            Landed::Workload {
                port: EXCLUDED_PORT
            }
        );
    }
    // and a client in an excluded CIDR.
    let excluded_v4 = Some(IpAddr::V4(EXCLUDED_CLIENT_V4));
    let excluded_v6 = Some(IpAddr::V6(EXCLUDED_CLIENT_V6));
    assert_eq!(
        pod.connect(pod.client(), excluded_v4, pod_v4(PORT)),
        Landed::Workload { port: PORT }
    );
    assert_eq!(
        pod.connect(pod.client(), excluded_v6, pod_v6(PORT)),
        Landed::Workload { port: PORT }
    );

    // Excluded interfaces: excluding lo changes nothing for the client,
    // whose connections arrive on the pod's eth0 (and the pod calling its
    // own address is never intercepted: see the_pod_itself_is_not_steered)...
    let excluding = |ifname: &str| EbpfPolicy {
        exclude_interfaces: vec![ifname.to_string()],
        ..all.clone()
    };
    interceptor
        .update_policy(&excluding("lo"))
        .unwrap_or_else(|e| panic!("update: {}", report(&e)));
    assert_eq!(
        pod.client_to(pod_v4(PORT)),
        Landed::Proxy {
            local: pod_v4(PORT)
        }
    );
    // ...excluding eth0 lets them through.
    let by_interface = excluding(ClientPod::POD_IF);
    interceptor
        .update_policy(&by_interface)
        .unwrap_or_else(|e| panic!("update: {}", report(&e)));
    for dst in [pod_v4(PORT), pod_v6(PORT)] {
        assert_eq!(pod.client_to(dst), Landed::Workload { port: PORT });
    }
    let read_back = interceptor.policy().expect("read the policy back");
    assert_eq!(read_back, by_interface.normalized());
}

/// Connections that stay inside the pod are not intercepted, as in Istio's
/// inbound capture: sluice's own upstream connections (from 127.0.0.6 /
/// ::6, which would loop), any loopback source, and the pod calling its own
/// address. The last one is told by its source, not its path: sk_lookup's
/// ingress_ifindex is inet_iif(), the device owning the address, although
/// the packet loops through lo (iptables' `-i` would say lo).
#[test]
fn the_pod_itself_is_not_steered() {
    let pod = Pod::new("ebpf-bypass");
    pod.pod()
        .run(sluice::routing::BypassSource::install)
        .expect("add ::6 to lo");
    let _interceptor = pod.attach(&policy(&[PORT]));
    let from_pod = |src: Option<IpAddr>, dst| pod.connect(pod.pod(), src, dst);

    let inside = [
        (
            Some(IpAddr::V4(sluice::linux::BYPASS_SOURCE_V4)),
            pod_v4(PORT),
        ),
        (
            Some(IpAddr::V6(sluice::linux::BYPASS_SOURCE_V6)),
            pod_v6(PORT),
        ),
        (Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 7))), pod_v4(PORT)),
        (None, pod_v4(PORT)),
        (None, pod_v6(PORT)),
    ];
    for (src, dst) in inside {
        assert_eq!(
            from_pod(src, dst),
            Landed::Workload { port: PORT },
            "from {src:?} to {dst}"
        );
    }
    // The program is attached and steers the client's connections.
    assert_eq!(
        pod.client_to(pod_v4(PORT)),
        Landed::Proxy {
            local: pod_v4(PORT)
        }
    );
}

#[test]
fn a_policy_update_changes_behaviour_without_reattaching() {
    let pod = Pod::new("ebpf-update");
    let interceptor = pod.attach(&policy(&[PORT]));
    let links = bpftool_sk_lookup_links(pod.pod());
    assert_eq!(links, [(interceptor.link_id(), interceptor.prog_id())]);
    assert_eq!(
        pod.client_to(pod_v4(OTHER_PORT)),
        Landed::Workload { port: OTHER_PORT }
    );

    // From a thread outside the namespace: the interceptor is bound to the
    // namespace it was attached in, not to a thread.
    let moved = policy(&[OTHER_PORT]);
    interceptor
        .update_policy(&moved)
        .unwrap_or_else(|e| panic!("update: {}", report(&e)));
    assert_eq!(
        pod.client_to(pod_v4(OTHER_PORT)),
        Landed::Proxy {
            local: pod_v4(OTHER_PORT)
        }
    );
    assert_eq!(
        pod.client_to(pod_v6(OTHER_PORT)),
        Landed::Proxy {
            local: pod_v6(OTHER_PORT)
        }
    );
    assert_eq!(pod.client_to(pod_v4(PORT)), Landed::Workload { port: PORT });
    // Same link, same program: only the maps changed.
    assert_eq!(bpftool_sk_lookup_links(pod.pod()), links);
    assert_eq!(interceptor.policy().expect("read back"), moved);

    // Updates in a row, each reusing the slot the one before last wrote
    // (two slots; a period of three puts exclusions into both): exclusions
    // that were there must be gone when a policy drops them.
    for round in 0..6 {
        let mut next = policy(&[PORT]);
        let excluding = round % 3 == 0;
        if excluding {
            next.exclude_cidrs = vec![
                IpNet::from(IpAddr::V4(ClientPod::CLIENT_V4)),
                IpNet::from(IpAddr::V6(ClientPod::CLIENT_V6)),
            ];
            next.exclude_interfaces = vec!["lo".into()];
        }
        interceptor
            .update_policy(&next)
            .unwrap_or_else(|e| panic!("update {round}: {}", report(&e)));
        assert_eq!(interceptor.policy().expect("read back"), next);
        for dst in [pod_v4(PORT), pod_v6(PORT)] {
            let expected = if excluding {
                Landed::Workload { port: PORT }
            } else {
                Landed::Proxy { local: dst }
            };
            assert_eq!(pod.client_to(dst), expected, "round {round}");
        }
    }
    assert_no_netfilter(pod.pod());
}

#[test]
fn dropping_the_interceptor_detaches_the_program() {
    let pod = Pod::new("ebpf-drop");
    let interceptor = pod.attach(&policy(&[PORT]));
    let link = (interceptor.link_id(), interceptor.prog_id());
    assert_eq!(bpftool_sk_lookup_links(pod.pod()), [link]);
    assert_eq!(
        pod.client_to(pod_v4(PORT)),
        Landed::Proxy {
            local: pod_v4(PORT)
        }
    );

    drop(interceptor);
    assert_eq!(bpftool_sk_lookup_links(pod.pod()), []);
    let installed = pod.pod().run(ebpf::installed).expect("installed()");
    assert!(installed.is_empty(), "{installed:?}");
    for dst in [pod_v4(PORT), pod_v6(PORT)] {
        assert_eq!(pod.client_to(dst), Landed::Workload { port: PORT });
    }
}

#[test]
fn an_intercepted_connection_is_refused_when_the_listener_is_gone() {
    let mut pod = Pod::new("ebpf-closed");
    let _interceptor = pod.attach(&policy(&[PORT]));
    // Closing a socket takes it out of the sockmap, once the kernel releases
    // it: a process another test forks at that moment holds a copy of the
    // descriptor until it execs, and meanwhile the listener still accepts.
    pod.proxy.truncate(1);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let installed = pod.pod().run(ebpf::installed).expect("installed()");
        if installed[0].listeners[1].is_none() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the closed IPv6 listener is still in the sockmap: {installed:?}"
        );
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(pod.client_to(pod_v6(PORT)), Landed::Refused);
    // Fail closed only where sluice is missing: IPv4 still works, and a
    // port the policy leaves alone still reaches the workload.
    assert_eq!(
        pod.client_to(pod_v4(PORT)),
        Landed::Proxy {
            local: pod_v4(PORT)
        }
    );
    assert_eq!(
        pod.client_to(pod_v6(OTHER_PORT)),
        Landed::Workload { port: OTHER_PORT }
    );
}

#[test]
fn a_pinned_link_outlives_the_interceptor_until_removed() {
    let pod = Pod::new("ebpf-pin");
    let bpffs = BpfFs::mount();
    let dir = bpffs.path().join("sluice");
    let (v4, v6) = (pod.proxy[0].as_fd(), pod.proxy[1].as_fd());
    let first = pod
        .pod()
        .run(|| Interceptor::attach_pinned(&policy(&[PORT]), v4, v6, &dir))
        .unwrap_or_else(|e| panic!("attach and pin: {}", report(&e)));
    assert_eq!(first.pinned(), Some(dir.as_path()));
    let link = (first.link_id(), first.prog_id());
    drop(first);

    // The pin keeps the program attached, and the policy in force.
    assert_eq!(bpftool_sk_lookup_links(pod.pod()), [link]);
    assert_eq!(
        pod.client_to(pod_v4(PORT)),
        Landed::Proxy {
            local: pod_v4(PORT)
        }
    );
    // A second, unpinned sluice would run beside it: refused.
    let twice = pod
        .pod()
        .run(|| Interceptor::attach(&policy(&[PORT]), v4, v6));
    assert!(
        matches!(twice, Err(Error::AlreadyAttached { link_id }) if link_id == link.0),
        "{twice:?}"
    );

    // A restarted sluice takes the pinned link over with its new listeners
    // and policy; the link is the same one.
    let (new_v4, new_v6) = pod.pod().run(|| {
        (
            listen((Ipv4Addr::UNSPECIFIED, PROXY_PORT + 1).into()),
            listen((Ipv6Addr::UNSPECIFIED, PROXY_PORT + 1).into()),
        )
    });
    let moved = policy(&[OTHER_PORT]);
    let second = pod
        .pod()
        .run(|| Interceptor::attach_pinned(&moved, new_v4.as_fd(), new_v6.as_fd(), &dir))
        .unwrap_or_else(|e| panic!("take over the pin: {}", report(&e)));
    assert_eq!((second.link_id(), second.prog_id()), link);
    let client = pod
        .client()
        .run(|| connect(None, pod_v4(OTHER_PORT)))
        .expect("connect");
    let me = client.local_addr().unwrap().as_socket().unwrap();
    let deadline = Instant::now() + PATIENCE;
    let accepted = loop {
        match new_v4.accept() {
            Ok((accepted, peer)) if peer == me => break accepted,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("the new listener did not get the connection: {e}"),
        }
    };
    assert_eq!(accepted.local_addr().unwrap(), pod_v4(OTHER_PORT));
    assert_eq!(pod.client_to(pod_v4(PORT)), Landed::Workload { port: PORT });

    // Removal detaches at once, even while `second` still holds the link.
    ebpf::remove_pinned(&dir).unwrap_or_else(|e| panic!("remove: {}", report(&e)));
    assert_eq!(bpftool_sk_lookup_links(pod.pod()), []);
    assert!(!dir.exists(), "the pin directory is left");
    drop(second);
    assert_eq!(
        pod.client_to(pod_v4(OTHER_PORT)),
        Landed::Workload { port: OTHER_PORT }
    );
    // Idempotent: nothing pinned is not an error.
    ebpf::remove_pinned(&dir).expect("remove again");
}

#[test]
fn pinning_outside_a_bpf_filesystem_is_refused() {
    let pod = Pod::new("ebpf-nopin");
    let mut interceptor = pod.attach(&policy(&[PORT]));
    let dir = std::env::temp_dir().join(format!("sluice-not-bpffs-{}", std::process::id()));
    let result = interceptor.pin(&dir);
    let _ = fs::remove_dir(&dir);
    assert!(matches!(result, Err(Error::NotBpfFs { .. })), "{result:?}");
    assert_eq!(interceptor.pinned(), None);
}

#[test]
fn listeners_are_checked_before_anything_is_loaded() {
    let pod = Pod::new("ebpf-listen");
    let unlistened = pod.pod().run(|| {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        socket.bind(&pod_v4(0).into()).expect("bind");
        socket
    });
    let v6 = pod.proxy[1].as_fd();
    let not_listening = pod
        .pod()
        .run(|| Interceptor::attach(&policy(&[PORT]), unlistened.as_fd(), v6));
    assert!(
        matches!(&not_listening, Err(Error::BadListener { family: "IPv4", problem }) if problem.contains("not listening")),
        "{not_listening:?}"
    );
    let swapped = pod
        .pod()
        .run(|| Interceptor::attach(&policy(&[PORT]), v6, v6));
    assert!(
        matches!(&swapped, Err(Error::BadListener { family: "IPv4", .. })),
        "{swapped:?}"
    );
    assert_eq!(bpftool_sk_lookup_links(pod.pod()), []);
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Clears the calling thread's effective capabilities (capabilities are per
/// thread; this one ends with the closure that calls it).
fn drop_effective_capabilities() {
    const VERSION_3: u32 = 0x2008_0522;
    let mut header = CapHeader {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget/capset with a v3 header and two data structs, as the
    // ABI requires; both live across the calls.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    assert_eq!(rc, 0, "capget: {}", io::Error::last_os_error());
    for d in &mut data {
        d.effective = 0;
    }
    // SAFETY: as above.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    assert_eq!(rc, 0, "capset: {}", io::Error::last_os_error());
}

#[test]
fn without_capabilities_the_error_says_what_to_grant() {
    let pod = Pod::new("ebpf-caps");
    let (v4, v6) = (pod.proxy[0].as_fd(), pod.proxy[1].as_fd());
    let result = pod.pod().run(|| {
        drop_effective_capabilities();
        Interceptor::attach(&policy(&[PORT]), v4, v6)
    });
    let err = result.expect_err("attached without capabilities");
    assert!(matches!(err, Error::NotPermitted), "{err:?}");
    assert!(
        err.to_string()
            .contains("run sluice as root or grant CAP_BPF and CAP_NET_ADMIN"),
        "{err}"
    );
    let shown = pod.pod().run(|| {
        drop_effective_capabilities();
        ebpf::show()
    });
    assert!(matches!(shown, Err(Error::NoSysAdmin)), "{shown:?}");
    assert_eq!(bpftool_sk_lookup_links(pod.pod()), []);
}

#[test]
fn cidr_policy_is_read_back_normalised() {
    let pod = Pod::new("ebpf-readback");
    let messy = EbpfPolicy {
        intercept_all: false,
        ports: vec![OTHER_PORT, PORT, PORT],
        exclude_ports: vec![EXCLUDED_PORT, PROXY_PORT],
        exclude_cidrs: vec![
            "2001:2::99/64".parse::<IpNet>().unwrap(),
            "198.18.7.7/16".parse().unwrap(),
        ],
        exclude_interfaces: vec!["lo".into()],
    };
    let interceptor = pod.attach(&messy);
    let expected = EbpfPolicy {
        intercept_all: false,
        ports: vec![PORT, OTHER_PORT],
        exclude_ports: vec![EXCLUDED_PORT, PROXY_PORT],
        exclude_cidrs: vec![
            "198.18.0.0/16".parse().unwrap(),
            "2001:2::/64".parse().unwrap(),
        ],
        exclude_interfaces: vec!["lo".into()],
    };
    assert_eq!(interceptor.policy().expect("read back"), expected);
    let installed = pod.pod().run(ebpf::installed).expect("installed()");
    assert_eq!(installed[0].policy.as_ref(), Some(&expected));
}

#[test]
fn a_reuseport_group_behind_the_sockmap_shares_the_connections() {
    // bpf_sk_assign() without BPF_SK_LOOKUP_F_NO_REUSEPORT lets the kernel
    // pick within the assigned socket's SO_REUSEPORT group: one listener per
    // worker works, with any one of them in the sockmap.
    let pod = Pod::new("ebpf-reuse");
    let group: Vec<TcpListener> = pod.pod().run(|| {
        (0..2)
            .map(|_| {
                let addr: SocketAddr = (Ipv4Addr::UNSPECIFIED, PROXY_PORT + 2).into();
                let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
                socket.set_reuse_port(true).expect("SO_REUSEPORT");
                socket.bind(&addr.into()).expect("bind");
                socket.listen(128).expect("listen");
                socket.set_nonblocking(true).expect("non-blocking");
                socket.into()
            })
            .collect()
    });
    let (v4, v6) = (group[0].as_fd(), pod.proxy[1].as_fd());
    let _interceptor = pod
        .pod()
        .run(|| Interceptor::attach(&policy(&[PORT]), v4, v6))
        .unwrap_or_else(|e| panic!("attach: {}", report(&e)));

    const CONNECTIONS: usize = 64;
    let clients: Vec<Socket> = (0..CONNECTIONS)
        .map(|_| {
            pod.client()
                .run(|| connect(None, pod_v4(PORT)))
                .expect("connect")
        })
        .collect();
    let mut accepted = [0usize; 2];
    let deadline = Instant::now() + PATIENCE;
    while accepted.iter().sum::<usize>() < CONNECTIONS && Instant::now() < deadline {
        for (count, listener) in accepted.iter_mut().zip(&group) {
            while let Ok((socket, _)) = listener.accept() {
                assert_eq!(socket.local_addr().expect("getsockname"), pod_v4(PORT));
                *count += 1;
            }
        }
        thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(accepted.iter().sum::<usize>(), clients.len());
    assert!(
        accepted.iter().all(|&n| n > 0),
        "one socket of the group took everything: {accepted:?}"
    );
}
