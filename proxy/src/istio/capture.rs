//! Istio's capture (`tools/istio-iptables/pkg/capture/run.go`, iptables
//! backend, REDIRECT mode) as sluice rule sets: the same matches in the
//! same order, so each packet meets the same verdict, in sluice's own
//! chains. Istio appends to and inserts into the built-in chains; here the
//! built-in chains hold one jump each (`-A PREROUTING -j SLUICE_PREROUTING`)
//! and the order Istio's inserts make is written out in sluice's chain, so
//! the whole capture is installed, compared and removed as sluice's
//! engine does for its own modes.
//!
//! ```text
//! nat PREROUTING -> SLUICE_PREROUTING
//!   -k IF with -i: -i IF [-d CIDR] -> SLUICE_REDIRECT      (Istio: -I PREROUTING 1, last first)
//!   -k IF: -i IF -> RETURN                                 (Istio: -I PREROUTING 1)
//!   -c IF: -i IF -> RETURN
//!   -b not empty: -p tcp -> SLUICE_INBOUND
//! SLUICE_INBOUND: tunnel port -> RETURN; -d ports -> RETURN (-b *); ports or all -> SLUICE_IN_REDIRECT
//! nat OUTPUT -> SLUICE_OUTPUT
//!   -c IF: -o IF -> RETURN; -o ports (tcp, udp) -> RETURN
//!   -o lo -s 127.0.0.6 (::6) -> RETURN                     (the proxy's inbound passthrough)
//!   per uid, then per gid G: the proxy reaching its own pod over lo, but the
//!     tunnel port -> SLUICE_IN_REDIRECT; others on lo -> RETURN; G's -> RETURN
//!   owner groups not captured -> RETURN
//!   -d loopback -> RETURN; -x CIDRs -> RETURN; -q ports -> SLUICE_REDIRECT; -i -> SLUICE_REDIRECT
//! mangle PREROUTING -> SLUICE_DROP_INVALID (--drop-invalid): ctstate INVALID -> DROP
//! ```

use crate::intercept::rules::{Family, RuleSet};
use crate::istio::flags::{is_v4, Capture, InboundPorts, Outbound, OwnerGroups};

const PREROUTING: &str = "SLUICE_PREROUTING";
const OUTPUT: &str = "SLUICE_OUTPUT";
const INBOUND: &str = "SLUICE_INBOUND";
const REDIRECT: &str = "SLUICE_REDIRECT";
const IN_REDIRECT: &str = "SLUICE_IN_REDIRECT";
const DROP_INVALID: &str = "SLUICE_DROP_INVALID";

/// The rule sets of one family, in `iptables-save`'s canonical form (so
/// that what is installed compares line by line with what is asked).
pub fn rule_sets(capture: &Capture, family: Family) -> Vec<RuleSet> {
    let mut sets = vec![nat(capture, family)];
    if capture.drop_invalid {
        let mut mangle = RuleSet::new(family, "mangle");
        mangle.push("PREROUTING", format!("-j {DROP_INVALID}"));
        mangle.push(DROP_INVALID, "-m conntrack --ctstate INVALID -j DROP");
        sets.push(mangle);
    }
    sets
}

fn nat(c: &Capture, family: Family) -> RuleSet {
    let v4 = family == Family::V4;
    let ours = |net: &&ipnet::IpNet| is_v4(net) == v4;
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
    set.push("PREROUTING", format!("-j {PREROUTING}"));
    // Istio inserts these at the top, each above the last.
    match &outbound {
        None => {
            for interface in c.kube_virt_interfaces.iter().rev() {
                set.push(PREROUTING, format!("-i {interface} -j {REDIRECT}"));
            }
        }
        Some(cidrs) => {
            for cidr in cidrs.iter().rev() {
                for interface in c.kube_virt_interfaces.iter().rev() {
                    set.push(
                        PREROUTING,
                        format!("-d {cidr} -i {interface} -j {REDIRECT}"),
                    );
                }
            }
        }
    }
    for interface in c.kube_virt_interfaces.iter().rev() {
        set.push(PREROUTING, format!("-i {interface} -j RETURN"));
    }
    for interface in &c.exclude_interfaces {
        set.push(PREROUTING, format!("-i {interface} -j RETURN"));
    }
    if c.inbound != InboundPorts::None {
        set.push(PREROUTING, format!("-p tcp -j {INBOUND}"));
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
    for interface in &c.exclude_interfaces {
        set.push(OUTPUT, format!("-o {interface} -j RETURN"));
    }
    for port in &c.outbound_ports_exclude {
        set.push(OUTPUT, format!("-p tcp -m tcp --dport {port} -j RETURN"));
        set.push(OUTPUT, format!("-p udp -m udp --dport {port} -j RETURN"));
    }
    set.push(OUTPUT, format!("-s {passthrough} -o lo -j RETURN"));
    for (owner, ids) in [("uid", &c.uids), ("gid", &c.gids)] {
        for id in ids {
            set.push(
                OUTPUT,
                format!(
                    "! -d {loopback} -o lo -p tcp -m tcp ! --dport {} -m owner --{owner}-owner {id} -j {IN_REDIRECT}",
                    c.tunnel_port
                ),
            );
            if !loopback_captured {
                set.push(
                    OUTPUT,
                    format!("-o lo -m owner ! --{owner}-owner {id} -j RETURN"),
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
