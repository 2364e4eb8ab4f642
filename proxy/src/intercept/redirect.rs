//! REDIRECT interception, the compatible baseline: nat-table rules rewrite
//! the destination to the proxy port, and the proxy asks conntrack for the
//! original one (`SO_ORIGINAL_DST`). Every intercepted connection costs a
//! conntrack entry; that is the point of comparing it with TPROXY.
//!
//! ```text
//! nat PREROUTING -p tcp -> SLUICE_PREROUTING
//!   1. arriving on lo (inside the pod, sluice's own upstream leg among them) -> RETURN
//!   2. excluded interfaces, source CIDRs, destination ports -> RETURN
//!   3. intercepted ports of a local address -> REDIRECT --to-ports <proxy-port>
//! ```
//!
//! nat rules see only the first packet of a connection, so no divert rule is
//! needed; conntrack applies the rewrite to the rest.

use crate::config::{Policy, Ports};
use crate::intercept::rules::{Family, RuleSet};
use crate::intercept::tproxy::LOCAL;

const TABLE: &str = "nat";
const ENTRY: &str = "SLUICE_PREROUTING";

pub fn rule_set(policy: &Policy, family: Family) -> RuleSet {
    let mut set = RuleSet::new(family, TABLE);
    set.push("PREROUTING", format!("-p tcp -j {ENTRY}"));
    set.push(ENTRY, "-i lo -j RETURN");
    super::push_exclusions(&mut set, ENTRY, policy, family);
    let redirect = format!("-j REDIRECT --to-ports {}", policy.proxy_port);
    match &policy.ports {
        Ports::All => set.push(ENTRY, format!("-p tcp {LOCAL} {redirect}")),
        Ports::List(ports) => {
            for port in ports {
                set.push(
                    ENTRY,
                    format!("-p tcp {LOCAL} -m tcp --dport {port} {redirect}"),
                );
            }
        }
    }
    set
}
