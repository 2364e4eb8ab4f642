//! Istio's capture (`tools/istio-iptables/pkg/capture/run.go`, iptables
//! backend) as sluice rule sets: the same matches in the same order, so
//! each packet meets the same verdict, in sluice's own chains. Istio
//! appends to and inserts into the built-in chains; here the built-in
//! chains hold one jump each (`-A PREROUTING -j SLUICE_PREROUTING`) and the
//! order Istio's inserts make is written out in sluice's chain, so the
//! whole capture is installed, compared and removed as sluice's engine does
//! for its own modes. `-m TPROXY` is sluice's recipe, not Istio's
//! (`inbound_tproxy`, `notrack`).
//!
//! ```text
//! nat PREROUTING -> SLUICE_PREROUTING
//!   -k IF with -i: -i IF [-d CIDR] -> SLUICE_REDIRECT      (Istio: -I PREROUTING 1, last first)
//!   -k IF: -i IF -> RETURN                                 (Istio: -I PREROUTING 1)
//!   -c IF: -i IF -> RETURN
//!   -b not empty, REDIRECT: -p tcp -> SLUICE_INBOUND
//! SLUICE_INBOUND: tunnel port -> RETURN; -d ports -> RETURN (-b *); ports or all -> SLUICE_IN_REDIRECT
//! nat OUTPUT -> SLUICE_OUTPUT
//!   TPROXY: mark -t -> RETURN                              (the mesh proxy's legs to the app)
//!   -c IF: -o IF -> RETURN; -o ports (tcp, udp) -> RETURN
//!   -o lo -s 127.0.0.6 (::6) -> RETURN                     (the proxy's inbound passthrough)
//!   per uid, then per gid G: the proxy reaching its own pod over lo, but the
//!     tunnel port -> SLUICE_IN_REDIRECT; others on lo -> RETURN; G's -> RETURN
//!   owner groups not captured -> RETURN
//!   -d loopback -> RETURN; -x CIDRs -> RETURN; -q ports -> SLUICE_REDIRECT; -i -> SLUICE_REDIRECT
//! mangle PREROUTING -> SLUICE_DROP_INVALID (--drop-invalid): ctstate INVALID -> DROP
//! TPROXY: mangle PREROUTING -p tcp -> SLUICE_TPROXY
//!   -i lo, -c IF, tunnel port, -d ports -> RETURN
//!   SYNs to the pod's addresses on captured ports -> TPROXY --on-port -z, mark -t+1
//! TPROXY: raw PREROUTING -> SLUICE_NOTRACK_IN, raw OUTPUT -> SLUICE_NOTRACK_OUT (see `notrack`)
//! --redirect-dns: nat SLUICE_OUTPUT -> SLUICE_DNS (port 53 -> 15053), after
//!   the owner groups; raw SLUICE_DNS_OUT / SLUICE_DNS_IN: conntrack zones (see `dns_zones`)
//! ```

use crate::intercept::rules::{Family, RuleSet};
use std::net::IpAddr;

use crate::istio::flags::{Capture, Dns, InboundPorts, Outbound, OwnerGroups, Tproxy};

const PREROUTING: &str = "SLUICE_PREROUTING";
const OUTPUT: &str = "SLUICE_OUTPUT";
const INBOUND: &str = "SLUICE_INBOUND";
const REDIRECT: &str = "SLUICE_REDIRECT";
const IN_REDIRECT: &str = "SLUICE_IN_REDIRECT";
const DROP_INVALID: &str = "SLUICE_DROP_INVALID";
const TPROXY: &str = "SLUICE_TPROXY";
const NOTRACK_IN: &str = "SLUICE_NOTRACK_IN";
const NOTRACK_OUT: &str = "SLUICE_NOTRACK_OUT";
const DNS: &str = "SLUICE_DNS";
const DNS_OUT: &str = "SLUICE_DNS_OUT";
const DNS_IN: &str = "SLUICE_DNS_IN";
/// Where Istio's agent answers DNS.
const DNS_PORT: u16 = 15053;

/// The rule sets of one family, in `iptables-save`'s canonical form (so
/// that what is installed compares line by line with what is asked).
pub fn rule_sets(capture: &Capture, family: Family) -> Vec<RuleSet> {
    let mut sets = vec![nat(capture, family)];
    let mut mangle = RuleSet::new(family, "mangle");
    if capture.drop_invalid {
        mangle.push("PREROUTING", format!("-j {DROP_INVALID}"));
        mangle.push(DROP_INVALID, "-m conntrack --ctstate INVALID -j DROP");
    }
    let mut raw = RuleSet::new(family, "raw");
    if capture.dns.is_some() {
        dns_zones(&mut raw, capture, family);
    }
    if let Some(tproxy) = capture.tproxy {
        inbound_tproxy(&mut mangle, capture, tproxy, family);
        notrack(&mut raw, capture, tproxy);
    }
    if !raw.is_empty() {
        sets.push(raw);
    }
    if !mangle.is_empty() {
        sets.push(mangle);
    }
    sets
}

/// `-m TPROXY`, sluice's recipe instead of Istio's CONNMARK: SYNs to the
/// pod's addresses on captured ports go to the mesh proxy's transparent
/// listener on `-z`; the rest of each connection finds the proxy's socket
/// by the ordinary lookup, so no conntrack state is needed. The SYN is
/// marked [`accepted_mark`], which the accepted socket takes
/// (`tcp_fwmark_accept`), so that every packet it sends, to its last ACK
/// from TIME_WAIT, can be told from the app's own in the raw table.
/// The proxy connects to the app from the client's address with mark `-t`
/// (Envoy's `original_src`), and the policy route of that mark brings the
/// app's replies back to it (`routing.rs`, as for `sluice run --mode
/// tproxy`).
fn inbound_tproxy(mangle: &mut RuleSet, c: &Capture, tproxy: Tproxy, family: Family) {
    let any = match family {
        Family::V4 => "0.0.0.0",
        Family::V6 => "::",
    };
    mangle.push("PREROUTING", format!("-p tcp -j {TPROXY}"));
    // The pod's own connections over lo are the nat rules' (the hairpin).
    mangle.push(TPROXY, "-i lo -j RETURN");
    for interface in &c.exclude_interfaces {
        mangle.push(TPROXY, format!("-i {interface} -j RETURN"));
    }
    let target = format!(
        "-j TPROXY --on-port {} --on-ip {any} --tproxy-mark {:#x}/0xffffffff",
        c.inbound_port,
        accepted_mark(tproxy)
    );
    push_syn_matches(mangle, TPROXY, c, &target);
}

/// The mark of the mesh proxy's accepted sockets: `-t` + 1. Not `-t`
/// itself, whose policy route would send their answers to the client into
/// the local table; no route takes this one, so they leave by the main
/// table.
pub fn accepted_mark(tproxy: Tproxy) -> u32 {
    tproxy.mark + 1
}

/// With the outbound capture's nat rules, the kernel tracks every
/// connection of the namespace; these keep the inbound ones out of
/// conntrack. In: the SYNs the TPROXY rule takes (the same matches), the
/// later packets of the mesh proxy's transparent sockets, and both
/// directions of its connection to the app over lo (they carry the mark).
/// Out: the packets of the mesh proxy's accepted sockets and of its
/// connections to the app, by their marks (an owner match would miss what
/// a closed socket still sends). Connections to excluded ports stay
/// tracked: their replies come from the app, whose outbound connections
/// the nat rules must see whole; so do the mesh proxy's own outbound ones.
fn notrack(raw: &mut RuleSet, c: &Capture, tproxy: Tproxy) {
    let mark = format!("-m mark --mark {:#x}", tproxy.mark);
    raw.push("PREROUTING", format!("-j {NOTRACK_IN}"));
    raw.push(NOTRACK_IN, format!("-i lo {mark} -j CT --notrack"));
    raw.push(NOTRACK_IN, "-i lo -j RETURN");
    // -k's traffic is outbound, REDIRECTed in nat PREROUTING.
    for interface in c.exclude_interfaces.iter().chain(&c.kube_virt_interfaces) {
        raw.push(NOTRACK_IN, format!("-i {interface} -j RETURN"));
    }
    raw.push(NOTRACK_IN, "-p tcp -m socket --transparent -j CT --notrack");
    push_syn_matches(raw, NOTRACK_IN, c, "-j CT --notrack");
    raw.push("OUTPUT", format!("-j {NOTRACK_OUT}"));
    raw.push(NOTRACK_OUT, format!("{mark} -j CT --notrack"));
    let accepted = format!("-m mark --mark {:#x}", accepted_mark(tproxy));
    raw.push(NOTRACK_OUT, format!("{accepted} -j CT --notrack"));
}

/// The nameservers whose DNS this family captures: `Some(None)` for all
/// of port 53, `None` when this family has nothing to capture.
fn dns_servers(c: &Capture, family: Family) -> Option<Option<Vec<IpAddr>>> {
    match c.dns.as_ref()? {
        Dns::All => Some(None),
        Dns::Servers(servers) => {
            let ours: Vec<IpAddr> = servers
                .iter()
                .copied()
                .filter(|s| s.is_ipv4() == (family == Family::V4))
                .collect();
            (!ours.is_empty()).then_some(Some(ours))
        }
    }
}

/// An address as a host CIDR, as iptables-save prints it.
fn host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}/32"),
        IpAddr::V6(v6) => format!("{v6}/128"),
    }
}

/// Istio's conntrack zones for DNS over UDP (`addDNSConntrackZones`): the
/// app's queries and the mesh proxy's answers from 15053 in one zone, the
/// proxy's queries upstream and their answers in another, so that the two
/// legs' tuples, which can be the same, never meet in one table.
fn dns_zones(raw: &mut RuleSet, c: &Capture, family: Family) {
    raw.push("OUTPUT", format!("-j {DNS_OUT}"));
    for (owner, ids) in [("uid", &c.uids), ("gid", &c.gids)] {
        for id in ids {
            raw.push(
                DNS_OUT,
                format!("-p udp -m udp --dport 53 -m owner --{owner}-owner {id} -j CT --zone 1"),
            );
            raw.push(
                DNS_OUT,
                format!(
                    "-p udp -m udp --sport {DNS_PORT} -m owner --{owner}-owner {id} -j CT --zone 2"
                ),
            );
        }
    }
    match dns_servers(c, family) {
        None => {}
        Some(None) => {
            raw.push(DNS_OUT, "-p udp -m udp --dport 53 -j CT --zone 2");
            raw.push("PREROUTING", format!("-j {DNS_IN}"));
            raw.push(DNS_IN, "-p udp -m udp --sport 53 -j CT --zone 1");
        }
        Some(Some(servers)) => {
            raw.push("PREROUTING", format!("-j {DNS_IN}"));
            for server in servers {
                let server = host(server);
                raw.push(
                    DNS_OUT,
                    format!("-d {server} -p udp -m udp --dport 53 -j CT --zone 2"),
                );
                raw.push(
                    DNS_IN,
                    format!("-s {server} -p udp -m udp --sport 53 -j CT --zone 1"),
                );
            }
        }
    }
}

/// The RETURNs of the tunnel port and `-d`, then `target` for the SYNs to
/// the pod's addresses on captured ports: the TPROXY rule's matches, which
/// the NOTRACK rules repeat.
fn push_syn_matches(set: &mut RuleSet, chain: &str, c: &Capture, target: &str) {
    set.push(
        chain,
        format!("-p tcp -m tcp --dport {} -j RETURN", c.tunnel_port),
    );
    let syn = "--tcp-flags FIN,SYN,RST,ACK SYN";
    match &c.inbound {
        InboundPorts::None => {}
        InboundPorts::All { except } => {
            for port in except {
                set.push(chain, format!("-p tcp -m tcp --dport {port} -j RETURN"));
            }
            set.push(
                chain,
                format!("-p tcp -m addrtype --dst-type LOCAL -m tcp {syn} {target}"),
            );
        }
        InboundPorts::List(ports) => {
            for port in ports {
                set.push(
                    chain,
                    format!(
                        "-p tcp -m addrtype --dst-type LOCAL -m tcp --dport {port} {syn} {target}"
                    ),
                );
            }
        }
    }
}

fn nat(c: &Capture, family: Family) -> RuleSet {
    let v4 = family == Family::V4;
    let ours = |net: &&ipnet::IpNet| net.addr().is_ipv4() == v4;
    // Written as iptables-save prints them: the network, not the host.
    let loopback = if v4 {
        c.loopback_v4.trunc().to_string()
    } else {
        "::1/128".into()
    };
    let passthrough = if v4 { "127.0.0.6/32" } else { "::6/128" };
    let outbound: Option<Vec<String>> = match &c.outbound {
        Outbound::All => None,
        Outbound::Cidrs(cidrs) => Some(
            cidrs
                .iter()
                .filter(ours)
                .map(|n| n.trunc().to_string())
                .collect(),
        ),
    };
    // Istio leaves the proxy's other traffic on lo alone unless -i names a
    // loopback range (then it is captured as outbound).
    let loopback_captured = matches!(&c.outbound, Outbound::Cidrs(cidrs) if cidrs.iter().any(|n| n.addr().is_loopback()));

    let mut set = RuleSet::new(family, "nat");
    // Istio inserts these at the top, each above the last.
    let mut prerouting = Vec::new();
    match &outbound {
        None => {
            for interface in c.kube_virt_interfaces.iter().rev() {
                prerouting.push(format!("-i {interface} -j {REDIRECT}"));
            }
        }
        Some(cidrs) => {
            for cidr in cidrs.iter().rev() {
                for interface in c.kube_virt_interfaces.iter().rev() {
                    prerouting.push(format!("-d {cidr} -i {interface} -j {REDIRECT}"));
                }
            }
        }
    }
    for interface in c.kube_virt_interfaces.iter().rev() {
        prerouting.push(format!("-i {interface} -j RETURN"));
    }
    for interface in &c.exclude_interfaces {
        prerouting.push(format!("-i {interface} -j RETURN"));
    }
    if c.inbound != InboundPorts::None {
        prerouting.push(format!("-p tcp -j {INBOUND}"));
    }
    // A chain exists only with a rule in it (`-b ""`, Istio's default,
    // and no -k or -c leave it empty): no jump to it then.
    if !prerouting.is_empty() {
        set.push("PREROUTING", format!("-j {PREROUTING}"));
    }
    for rule in prerouting {
        set.push(PREROUTING, rule);
    }

    set.push(
        INBOUND,
        format!("-p tcp -m tcp --dport {} -j RETURN", c.tunnel_port),
    );
    match &c.inbound {
        InboundPorts::None => {}
        InboundPorts::All { except } => {
            for port in except {
                set.push(INBOUND, format!("-p tcp -m tcp --dport {port} -j RETURN"));
            }
            set.push(INBOUND, format!("-p tcp -j {IN_REDIRECT}"));
        }
        InboundPorts::List(ports) => {
            for port in ports {
                set.push(
                    INBOUND,
                    format!("-p tcp -m tcp --dport {port} -j {IN_REDIRECT}"),
                );
            }
        }
    }
    set.push(
        REDIRECT,
        format!("-p tcp -j REDIRECT --to-ports {}", c.envoy_port),
    );
    set.push(
        IN_REDIRECT,
        format!("-p tcp -j REDIRECT --to-ports {}", c.inbound_port),
    );

    set.push("OUTPUT", format!("-j {OUTPUT}"));
    if let Some(tproxy) = c.tproxy {
        // The mesh proxy's connections to the app, from the client's
        // address: not the hairpin below.
        set.push(
            OUTPUT,
            format!("-m mark --mark {:#x} -j RETURN", tproxy.mark),
        );
    }
    for interface in &c.exclude_interfaces {
        set.push(OUTPUT, format!("-o {interface} -j RETURN"));
    }
    for port in &c.outbound_ports_exclude {
        set.push(OUTPUT, format!("-p tcp -m tcp --dport {port} -j RETURN"));
        set.push(OUTPUT, format!("-p udp -m udp --dport {port} -j RETURN"));
    }
    set.push(OUTPUT, format!("-s {passthrough} -o lo -j RETURN"));
    let dns = c.dns.is_some();
    for (owner, ids) in [("uid", &c.uids), ("gid", &c.gids)] {
        for id in ids {
            // With DNS capture the proxy's own DNS over lo is not the
            // hairpin's; Istio makes that exception for uids only.
            let ports = if dns && owner == "uid" {
                format!("-m multiport ! --dports 53,{}", c.tunnel_port)
            } else {
                format!("-m tcp ! --dport {}", c.tunnel_port)
            };
            set.push(
                OUTPUT,
                format!("! -d {loopback} -o lo -p tcp {ports} -m owner --{owner}-owner {id} -j {IN_REDIRECT}"),
            );
            if !loopback_captured {
                let not_dns = if dns {
                    "-p tcp -m tcp ! --dport 53 "
                } else {
                    ""
                };
                set.push(
                    OUTPUT,
                    format!("-o lo {not_dns}-m owner ! --{owner}-owner {id} -j RETURN"),
                );
            }
            set.push(OUTPUT, format!("-m owner --{owner}-owner {id} -j RETURN"));
        }
    }
    match &c.owner_groups {
        OwnerGroups::All => {}
        OwnerGroups::Except(groups) => {
            for group in groups {
                set.push(OUTPUT, format!("-m owner --gid-owner {group} -j RETURN"));
            }
        }
        OwnerGroups::Only(groups) => {
            let matches: Vec<String> = groups
                .iter()
                .map(|g| format!("-m owner ! --gid-owner {g} "))
                .collect();
            set.push(OUTPUT, format!("{}-j RETURN", matches.concat()));
        }
    }
    if let Some(servers) = dns_servers(c, family) {
        set.push(OUTPUT, format!("-j {DNS}"));
        for proto in ["tcp", "udp"] {
            let to = |d: &str| {
                format!("{d}-p {proto} -m {proto} --dport 53 -j REDIRECT --to-ports {DNS_PORT}")
            };
            match &servers {
                None => set.push(DNS, to("")),
                Some(servers) => {
                    for server in servers {
                        set.push(DNS, to(&format!("-d {} ", host(*server))));
                    }
                }
            }
        }
    }
    set.push(OUTPUT, format!("-d {loopback} -j RETURN"));
    for cidr in c.outbound_exclude.iter().filter(ours) {
        set.push(OUTPUT, format!("-d {} -j RETURN", cidr.trunc()));
    }
    for port in &c.outbound_ports {
        set.push(
            OUTPUT,
            format!("-p tcp -m tcp --dport {port} -j {REDIRECT}"),
        );
    }
    match &outbound {
        None => set.push(OUTPUT, format!("-j {REDIRECT}")),
        Some(cidrs) => {
            for cidr in cidrs {
                set.push(OUTPUT, format!("-d {cidr} -j {REDIRECT}"));
            }
        }
    }
    set
}
