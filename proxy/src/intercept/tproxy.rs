//! TPROXY interception: mangle-table rules and policy routing, no NAT and no
//! conntrack match, so an intercepted connection never needs a conntrack
//! entry.
//!
//! ```text
//! PREROUTING -p tcp -> SLUICE_PREROUTING
//!   1. not a SYN, and owned by a transparent socket (sluice's) -> SLUICE_DIVERT (mark, accept)
//!   2. arriving on lo (inside the pod, sluice's own upstream leg among them) -> RETURN
//!   3. excluded interfaces, source CIDRs, destination ports -> RETURN
//!   4. SYNs to intercepted ports of a local address -> TPROXY --on-port <proxy-port> --tproxy-mark <mark>
//! ```
//!
//! Rule 4 takes SYNs only. TPROXY drops a packet for which it finds no
//! listener, and a catch-all rule (`--ports *`) would otherwise also see the
//! replies that reach the pod's ordinary sockets: the workload's own outbound
//! connections, and every packet of a flow that was established before the
//! rules. Those are not sluice's to take; the packets of sluice's own flows
//! after the SYN are found by rule 1, or by the ordinary local delivery (the
//! destination is one of the pod's addresses).
//!
//! Rule 4 takes only destinations that are addresses of the pod
//! (`addrtype LOCAL`): sluice is no open relay, and the kernel says so in
//! the same lookup it routes with, where sluice would otherwise check each
//! connection's destination itself.
//!
//! Rule 2 keeps connections that stay inside the pod (to 127.0.0.0/8, ::1 or
//! the pod's own addresses, from the pod itself) away from sluice, as Istio's
//! inbound capture does.
//!
//! Rule 1 skips SYNs on purpose. The textbook divert rule (`-m socket`
//! alone) also matches a new SYN whose 4-tuple belongs to one of sluice's
//! sockets in TIME_WAIT, which happens as soon as clients reuse ports and the
//! server side closes first. Diverted, that SYN skips TPROXY, and the kernel's
//! TIME_WAIT handling hands it to the workload's own listener: the connection
//! bypasses sluice. Sent through the TPROXY rule instead, the target's
//! TIME_WAIT handling retires the old socket and picks sluice's listener.

use crate::config::{Policy, Ports};
use crate::intercept::rules::{Family, RuleSet};

const TABLE: &str = "mangle";
const ENTRY: &str = "SLUICE_PREROUTING";
const DIVERT: &str = "SLUICE_DIVERT";
/// A SYN and nothing else among FIN, SYN, RST, ACK: a new connection.
const SYN: &str = "--tcp-flags FIN,SYN,RST,ACK SYN";
/// To one of the pod's own addresses.
pub(super) const LOCAL: &str = "-m addrtype --dst-type LOCAL";

pub fn rule_set(policy: &Policy, family: Family) -> RuleSet {
    let any = match family {
        Family::V4 => "0.0.0.0",
        Family::V6 => "::",
    };
    let mut set = RuleSet::new(family, TABLE);
    set.push("PREROUTING", format!("-p tcp -j {ENTRY}"));
    set.push(
        ENTRY,
        format!(
            "-p tcp -m tcp ! --tcp-flags FIN,SYN,RST,ACK SYN -m socket --transparent -j {DIVERT}"
        ),
    );
    set.push(ENTRY, "-i lo -j RETURN");
    super::push_exclusions(&mut set, ENTRY, policy, family);
    let tproxy = format!(
        "-j TPROXY --on-port {} --on-ip {any} --tproxy-mark {:#x}/0xffffffff",
        policy.proxy_port, policy.mark
    );
    match &policy.ports {
        Ports::All => set.push(ENTRY, format!("-p tcp {LOCAL} -m tcp {SYN} {tproxy}")),
        Ports::List(ports) => {
            for port in ports {
                set.push(
                    ENTRY,
                    format!("-p tcp {LOCAL} -m tcp --dport {port} {SYN} {tproxy}"),
                );
            }
        }
    }
    set.push(
        DIVERT,
        format!("-j MARK --set-xmark {:#x}/0xffffffff", policy.mark),
    );
    set.push(DIVERT, "-j ACCEPT");
    set
}
