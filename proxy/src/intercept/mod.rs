//! Installing, showing and removing the interception of one mode in the
//! network namespace sluice runs in. Every change is checked first (rights,
//! tools), applied in one transaction per family, and rolled back if a later
//! step fails, so an error leaves nothing half-installed; removal takes only
//! what sluice added ([`installed`]).

pub mod ebpf;
pub mod installed;
pub mod redirect;
pub mod rules;
pub mod tproxy;

use std::fmt::Write as _;

use crate::config::{Mode, Policy};
use crate::linux;
use crate::routing::{self, BypassSource, PolicyRoute, Presence, RoutingState, PROTOCOL};
pub use installed::Installed;
use rules::{Family, RuleSet};

/// Every netfilter table any mode puts chains in (raw: `istio-iptables
/// -m TPROXY`'s NOTRACK rules).
const TABLES: [&str; 3] = ["mangle", "nat", "raw"];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("changing the interception needs CAP_NET_ADMIN: run sluice as root, or grant it the capability (e.g. securityContext.capabilities.add: [NET_ADMIN])")]
    NoNetAdmin,
    #[error("cannot tell whether sluice holds CAP_NET_ADMIN")]
    Capabilities(#[source] std::io::Error),
    #[error(transparent)]
    Rules(#[from] rules::Error),
    #[error("policy routing")]
    Routing(#[from] routing::Error),
}

/// The rules and routes a policy asks for.
#[derive(Debug, Clone)]
pub struct Plan {
    pub mode: Mode,
    pub rule_sets: Vec<RuleSet>,
    pub route: Option<PolicyRoute>,
    /// IPv6 is part of the plan unless the namespace has it disabled.
    pub ipv6: bool,
}

impl Plan {
    /// The plan for the calling thread's namespace.
    pub fn new(policy: &Policy) -> Plan {
        Plan::for_families(policy, linux::ipv6_enabled())
    }

    pub fn for_families(policy: &Policy, ipv6: bool) -> Plan {
        let families: &[Family] = if ipv6 { &Family::BOTH } else { &[Family::V4] };
        match policy.mode {
            Mode::Tproxy => Plan {
                mode: policy.mode,
                rule_sets: families
                    .iter()
                    .map(|&f| tproxy::rule_set(policy, f))
                    .collect(),
                route: Some(policy_route(policy, ipv6)),
                ipv6,
            },
            Mode::Redirect => Plan {
                mode: policy.mode,
                rule_sets: families
                    .iter()
                    .map(|&f| redirect::rule_set(policy, f))
                    .collect(),
                route: Some(policy_route(policy, ipv6)),
                ipv6,
            },
            // The program is attached by `sluice run` (it needs the proxy's
            // listening sockets); the plan is the routing its upstream
            // connections need.
            Mode::Ebpf => Plan {
                mode: policy.mode,
                rule_sets: Vec::new(),
                route: Some(policy_route(policy, ipv6)),
                ipv6,
            },
        }
    }

    /// What `rules install --dry-run` prints: the exact restore input of each
    /// family (as applied to a namespace without sluice rules) and the routes.
    pub fn dry_run(&self) -> String {
        let mut out = String::new();
        for set in &self.rule_sets {
            let empty = RuleSet::new(set.family, set.table);
            let tool = match set.family {
                Family::V4 => "iptables-restore --noflush",
                Family::V6 => "ip6tables-restore --noflush",
            };
            let _ = write!(out, "# {tool}\n{}", set.install_script(&empty));
        }
        if let Some(route) = &self.route {
            out += "# policy routing (rtnetlink)\n";
            let _ = writeln!(
                out,
                "# protocol {PROTOCOL} marks what sluice adds (the IPv4 rule: {PROTOCOL} + the sysctls \
                 it turned on); removal takes only that"
            );
            for line in route.describe() {
                out += &line;
                out.push('\n');
            }
        }
        if self.ipv6 {
            out += "# bypass source of sluice's upstream connections (rtnetlink)\n";
            out += &BypassSource::describe();
            out.push('\n');
        }
        out
    }

    /// Installs what is missing, recording each change: the [`Installed`]
    /// undoes exactly those when dropped (so does a failure half-way,
    /// before this returns), unless kept.
    pub fn install(&self) -> Result<Installed, Error> {
        preflight(!self.rule_sets.is_empty())?;
        let mut installed = Installed::default();
        for set in &self.rule_sets {
            // One mode at a time: another mode's chains would intercept
            // first, so every table this plan leaves empty is emptied.
            let planned = |table: &&str| {
                self.rule_sets
                    .iter()
                    .any(|s| s.family == set.family && s.table == *table)
            };
            for table in TABLES.iter().filter(|t| !planned(t)) {
                installed.set_rules(&RuleSet::new(set.family, table))?;
            }
            installed.set_rules(set)?;
        }
        if let Some(route) = self.route {
            installed.set_route(route)?;
        }
        if self.ipv6 {
            installed.add_bypass()?;
        }
        Ok(installed)
    }

    /// Removes every sluice chain, hook, rule and route, whatever mode and
    /// flags installed them, and nothing else; succeeds when nothing is
    /// installed.
    pub fn remove(&self) -> Result<(), Error> {
        if !crate::privileges::has_cap_net_admin().map_err(Error::Capabilities)? {
            return Err(Error::NoNetAdmin);
        }
        // A host that runs only the eBPF mode needs no iptables: without the
        // tools there can be no sluice chains to remove.
        let tools = RuleSet::check_tools();
        let netfilter = self.mode != Mode::Ebpf || tools.is_ok();
        if netfilter {
            tools?;
        }
        installed::remove_all(self.ipv6, netfilter)
    }

    /// Readiness calls this up to once a second: it starts `iptables-save`
    /// once per rule set and no other process (a missing tool is reported
    /// by the save itself).
    pub fn show(&self) -> Result<Status, Error> {
        let mut installed = Vec::new();
        for set in &self.rule_sets {
            installed.push(RuleSet::read_installed(set.family, set.table)?);
        }
        let routing = match &self.route {
            Some(route) => Some(route.read()?),
            None => None,
        };
        Ok(Status {
            wanted: self.clone(),
            installed,
            routing,
            bypass_source: if self.ipv6 {
                BypassSource::present()?
            } else {
                Presence::Missing
            },
        })
    }
}

/// The policy route of the mark: TPROXY's intercepted packets take it to the
/// local stack, and in every mode sluice's upstream sockets, which carry the
/// mark and are bound to lo, reach the pod's addresses through it (see
/// `linux::bypass_socket`).
pub fn policy_route(policy: &Policy, ipv6: bool) -> PolicyRoute {
    PolicyRoute {
        mark: policy.mark,
        table: policy.table,
        ipv6,
    }
}

/// The RETURN rules every mode puts before its interception rules, in the
/// same order: interfaces, client CIDRs of this family, ports.
fn push_exclusions(set: &mut RuleSet, chain: &str, policy: &Policy, family: Family) {
    for interface in &policy.exclude_interfaces {
        set.push(chain, format!("-i {interface} -j RETURN"));
    }
    let same_family = |cidr: &&ipnet::IpNet| cidr.addr().is_ipv4() == (family == Family::V4);
    for cidr in policy.exclude_cidrs.iter().filter(same_family) {
        set.push(chain, format!("-s {cidr} -j RETURN"));
    }
    for port in &policy.exclude_ports {
        set.push(chain, format!("-p tcp -m tcp --dport {port} -j RETURN"));
    }
}

fn preflight(netfilter: bool) -> Result<(), Error> {
    if !crate::privileges::has_cap_net_admin().map_err(Error::Capabilities)? {
        return Err(Error::NoNetAdmin);
    }
    if netfilter {
        RuleSet::check_tools()?;
    }
    Ok(())
}

/// What is installed, beside what the flags ask for.
#[derive(Debug)]
pub struct Status {
    wanted: Plan,
    installed: Vec<RuleSet>,
    routing: Option<RoutingState>,
    bypass_source: Presence,
}

impl Status {
    pub fn nothing_installed(&self) -> bool {
        self.installed.iter().all(RuleSet::is_empty)
            && self.routing.is_none_or(|r| r.empty())
            && self.bypass_source != Presence::Sluice
    }

    pub fn matches(&self) -> bool {
        self.installed == self.wanted.rule_sets
            && self.routing.is_none_or(|r| r.complete())
            && (self.bypass_source.present() || !self.wanted.ipv6)
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (installed, wanted) in self.installed.iter().zip(&self.wanted.rule_sets) {
            let family = match installed.family {
                Family::V4 => "IPv4",
                Family::V6 => "IPv6",
            };
            writeln!(f, "# {family} {} table", installed.table)?;
            if installed.is_empty() {
                writeln!(f, "(no sluice rules)")?;
            }
            let lines = installed
                .hooks
                .iter()
                .chain(installed.chains.values().flatten());
            for line in lines {
                writeln!(f, "{line}")?;
            }
            if installed != wanted && !installed.is_empty() {
                writeln!(
                    f,
                    "(differs from the flags given; `sluice rules install` with them replaces it)"
                )?;
            }
        }
        if let Some(state) = &self.routing {
            writeln!(f, "# policy routing")?;
            let on = if state.sysctls { "on" } else { "off" };
            writeln!(f, "sysctls tcp_fwmark_accept, fwmark_reflect: {on}")?;
            writeln!(f, "fwmark rule v4: {}", state.rule_v4)?;
            if state.ipv6 {
                writeln!(f, "fwmark rule v6: {}", state.rule_v6)?;
            }
            writeln!(f, "local route v4: {}", state.local_route_v4)?;
            if state.ipv6 {
                writeln!(f, "local route v6: {}", state.local_route_v6)?;
            }
        }
        if self.wanted.ipv6 {
            writeln!(f, "bypass source ::6 on lo: {}", self.bypass_source)?;
        } else {
            writeln!(f, "IPv6: disabled in this namespace; IPv4 only")?;
        }
        let verdict = if self.nothing_installed() {
            "not installed"
        } else if self.matches() {
            "installed, matches the flags"
        } else {
            "installed, does NOT match the flags"
        };
        writeln!(f, "status: {verdict}")
    }
}
