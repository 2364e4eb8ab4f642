//! `sluice istio-iptables`: a drop-in for Istio's init container
//! (`pilot-agent istio-iptables`, also run as `istio-iptables`), which
//! takes the injector's flags and env vars and installs the capture through
//! sluice's engine: one transaction per family, idempotent, drift shown by
//! `-n` beside `sluice rules show`, removed exactly by `--cleanup-only`.
//!
//! What is implemented, and what is refused by name, is in `flags.rs`; the
//! rules, in `capture.rs`.

pub mod capture;
pub mod flags;
pub mod validation;

use std::net::IpAddr;

use crate::config::Mode;
use crate::intercept::rules::Family;
use crate::intercept::{self, Plan};
use crate::routing::PolicyRoute;
pub use flags::{Action, IstioArgs, Resolved};

/// The arguments Istio's sidecar injector gives its init container
/// (`istio-iptables`), with the injector's defaults.
pub const INJECTOR: &[&str] = &[
    "-p",
    "15001",
    "-z",
    "15006",
    "-u",
    "1337",
    "-m",
    "REDIRECT",
    "-i",
    "*",
    "-x",
    "",
    "-b",
    "*",
    "-d",
    "15090,15021,15020",
];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Flags(#[from] flags::FlagError),
    #[error("no usable local IP address (neither loopback nor link-local) in this network namespace: run sluice istio-iptables inside the pod's namespace")]
    NoAddress,
    #[error("reading this namespace's addresses")]
    Addresses(#[source] nix::Error),
    #[error(transparent)]
    Intercept(#[from] intercept::Error),
    /// Istio's tool exits [`validation::FAILED`] on this.
    #[error("iptables validation failed; workload is not ready for the mesh")]
    Validation(#[from] validation::Error),
}

/// The plan of `capture` for this namespace: IPv4, and IPv6 when Istio
/// would enable it (see [`ipv6_wanted`]).
pub fn plan(capture: &flags::Capture) -> Result<Plan, Error> {
    let ipv6 = ipv6_wanted(capture.dual_stack)?;
    Ok(plan_for(capture, ipv6))
}

pub fn plan_for(capture: &flags::Capture, ipv6: bool) -> Plan {
    let families: &[Family] = if ipv6 { &Family::BOTH } else { &[Family::V4] };
    Plan {
        mode: if capture.tproxy.is_some() {
            Mode::Tproxy
        } else {
            Mode::Redirect
        },
        rule_sets: families
            .iter()
            .flat_map(|&family| capture::rule_sets(capture, family))
            .collect(),
        // REDIRECT needs no policy routing.
        route: capture.tproxy.map(|t| PolicyRoute {
            mark: t.mark,
            table: t.table,
            ipv6,
        }),
        ipv6,
    }
}

/// What `sluice istio-iptables` does with the resolved flags; the text to
/// print on success.
pub fn execute(resolved: &Resolved) -> Result<String, Error> {
    let plan = plan(&resolved.capture)?;
    let mut said = apply(resolved.action, &plan)?;
    if let Some(v) = resolved.validation {
        let c = &resolved.capture;
        // Istio listens on IPv6 loopback when the pod's address is IPv6.
        let ipv6 = ipv6_wanted(false)?;
        validation::validate(
            [c.envoy_port, c.inbound_port],
            v.probe_port,
            ipv6,
            v.timeout,
        )?;
        said += "validation passed, iptables rules established\n";
    }
    Ok(said)
}

fn apply(action: Action, plan: &Plan) -> Result<String, Error> {
    match action {
        Action::SkipRuleApply => Ok("--skip-rule-apply: nothing changed\n".into()),
        Action::DryRun => Ok(plan.dry_run()),
        Action::CleanupOnly => {
            plan.remove()?;
            Ok("removed\n".into())
        }
        Action::Install => {
            if plan.show()?.matches() {
                return Ok("already installed, matches the flags: nothing changed\n".into());
            }
            // It outlives this process, as the init container's rules do.
            plan.install()?.keep();
            Ok("installed\n".into())
        }
    }
}

/// Istio's rule (`getLocalIP`): IPv6 is captured when the first address
/// that is neither loopback nor link-local is IPv6 (IPv4 addresses come
/// first in the kernel's dump, so a dual-stack pod counts as IPv4), or,
/// with `--dual-stack`, when there is any such IPv6 address. Without one
/// at all, Istio's tool fails, and so does this.
pub fn ipv6_wanted(dual_stack: bool) -> Result<bool, Error> {
    let mut v4 = false;
    let mut v6 = false;
    for address in nix::ifaddrs::getifaddrs().map_err(Error::Addresses)? {
        let Some(address) = address.address else {
            continue;
        };
        let ip = if let Some(a) = address.as_sockaddr_in() {
            IpAddr::V4(a.ip())
        } else if let Some(a) = address.as_sockaddr_in6() {
            IpAddr::V6(a.ip())
        } else {
            continue;
        };
        if usable(ip) {
            v4 |= ip.is_ipv4();
            v6 |= ip.is_ipv6();
        }
    }
    match (v4, v6) {
        (false, false) => Err(Error::NoAddress),
        (_, true) if dual_stack || !v4 => Ok(true),
        _ => Ok(false),
    }
}

fn usable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local(),
        IpAddr::V6(v6) => {
            let link_local = (v6.segments()[0] & 0xffc0) == 0xfe80;
            !v6.is_loopback() && !link_local && !v6.is_multicast()
        }
    }
}
