//! TPROXY interception: mangle-table rules and policy routing, no NAT and no
//! conntrack match, so an intercepted connection never needs a conntrack
//! entry.
//!
//! ```text
//! PREROUTING -p tcp -> SLUICE_PREROUTING
//!   1. not a SYN, and owned by a transparent socket (sluice's) -> SLUICE_DIVERT (mark, accept)
//!   2. sluice's own upstream connection (from the bypass source on lo) -> RETURN
//!   3. excluded interfaces, source CIDRs, destination ports -> RETURN
//!   4. intercepted ports -> TPROXY --on-port <proxy-port> --tproxy-mark <mark>
//! ```
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
use crate::linux::{BYPASS_SOURCE_V4, BYPASS_SOURCE_V6};
use crate::routing::PolicyRoute;

const TABLE: &str = "mangle";
const ENTRY: &str = "SLUICE_PREROUTING";
const DIVERT: &str = "SLUICE_DIVERT";

pub fn rule_set(policy: &Policy, family: Family) -> RuleSet {
    let (bypass, any) = match family {
        Family::V4 => (format!("{BYPASS_SOURCE_V4}/32"), "0.0.0.0"),
        Family::V6 => (format!("{BYPASS_SOURCE_V6}/128"), "::"),
    };
    let mut set = RuleSet::new(family, TABLE);
    set.push("PREROUTING", format!("-p tcp -j {ENTRY}"));
    set.push(
        ENTRY,
        format!(
            "-p tcp -m tcp ! --tcp-flags FIN,SYN,RST,ACK SYN -m socket --transparent -j {DIVERT}"
        ),
    );
    set.push(ENTRY, format!("-s {bypass} -i lo -j RETURN"));
    super::push_exclusions(&mut set, ENTRY, policy, family);
    let tproxy = format!(
        "-j TPROXY --on-port {} --on-ip {any} --tproxy-mark {:#x}/0xffffffff",
        policy.proxy_port, policy.mark
    );
    match &policy.ports {
        Ports::All => set.push(ENTRY, format!("-p tcp {tproxy}")),
        Ports::List(ports) => {
            for port in ports {
                set.push(ENTRY, format!("-p tcp -m tcp --dport {port} {tproxy}"));
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

pub fn policy_route(policy: &Policy) -> PolicyRoute {
    PolicyRoute {
        mark: policy.mark,
        table: policy.table,
    }
}
