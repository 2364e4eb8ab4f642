//! `istio-iptables`'s command line, as Istio's injector writes it: the same
//! flags with the same defaults, each (but `-p`) also read from the env var
//! of its long name in upper case (`--istio-inbound-ports` from
//! `ISTIO_INBOUND_PORTS`), a flag given on the command line winning over
//! its env var (Istio's `tools/istio-iptables/pkg/cmd/root.go`).
//!
//! Where Istio differs from what a user would want, sluice is stricter and
//! says so: a value Istio passes to iptables unchecked (a port, a CIDR) is
//! checked here, and an env var whose value does not parse is an error,
//! where Istio silently keeps the default. A flag sluice does not implement
//! is refused by name, on the command line and in the environment.

use std::net::IpAddr;
use std::time::Duration;

use clap::Args;
use ipnet::IpNet;

/// Every flag of `istio-iptables`. Values are kept as the text given, so
/// the env var can fill in what the command line left out
/// ([`IstioArgs::resolve`]).
#[derive(Debug, Default, Args)]
pub struct IstioArgs {
    /// Port the mesh proxy takes outbound connections on (REDIRECT).
    #[arg(short = 'p', long = "envoy-port")]
    envoy_port: Option<String>,
    /// Port the mesh proxy takes inbound connections on [env INBOUND_CAPTURE_PORT].
    #[arg(short = 'z', long = "inbound-capture-port")]
    inbound_capture_port: Option<String>,
    /// HBONE tunnel port, never captured [env INBOUND_TUNNEL_PORT].
    #[arg(short = 'e', long = "inbound-tunnel-port")]
    inbound_tunnel_port: Option<String>,
    /// UIDs whose traffic is not captured, comma-separated [env PROXY_UID;
    /// default: ENVOY_USER's uid, else 1337].
    #[arg(short = 'u', long = "proxy-uid")]
    proxy_uid: Option<String>,
    /// GIDs whose traffic is not captured [env PROXY_GID; default: the uids].
    #[arg(short = 'g', long = "proxy-gid")]
    proxy_gid: Option<String>,
    /// Inbound interception: REDIRECT or TPROXY [env ISTIO_INBOUND_INTERCEPTION_MODE].
    #[arg(short = 'm', long = "istio-inbound-interception-mode")]
    mode: Option<String>,
    /// Inbound ports to capture: a list, * for all, empty for none [env ISTIO_INBOUND_PORTS].
    #[arg(short = 'b', long = "istio-inbound-ports")]
    inbound_ports: Option<String>,
    /// Inbound ports not captured when -b is * [env ISTIO_LOCAL_EXCLUDE_PORTS].
    #[arg(short = 'd', long = "istio-local-exclude-ports")]
    local_exclude_ports: Option<String>,
    /// Interfaces whose traffic is never captured [env ISTIO_EXCLUDE_INTERFACES].
    #[arg(short = 'c', long = "istio-exclude-interfaces")]
    exclude_interfaces: Option<String>,
    /// Outbound destinations to capture: CIDRs, * for all, empty for none [env ISTIO_SERVICE_CIDR].
    #[arg(short = 'i', long = "istio-service-cidr")]
    service_cidr: Option<String>,
    /// Outbound destinations never captured [env ISTIO_SERVICE_EXCLUDE_CIDR].
    #[arg(short = 'x', long = "istio-service-exclude-cidr")]
    service_exclude_cidr: Option<String>,
    /// Outbound TCP ports always captured [env ISTIO_OUTBOUND_PORTS].
    #[arg(short = 'q', long = "istio-outbound-ports")]
    outbound_ports: Option<String>,
    /// Outbound ports never captured [env ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE].
    #[arg(short = 'o', long = "istio-local-outbound-ports-exclude")]
    local_outbound_ports_exclude: Option<String>,
    /// Interfaces whose inbound traffic is captured as outbound [env KUBE_VIRT_INTERFACES].
    #[arg(short = 'k', long = "kube-virt-interfaces")]
    kube_virt_interfaces: Option<String>,
    /// TPROXY mark [env ISTIO_INBOUND_TPROXY_MARK].
    #[arg(short = 't', long = "istio-inbound-tproxy-mark")]
    tproxy_mark: Option<String>,
    /// TPROXY routing table [env ISTIO_INBOUND_TPROXY_ROUTE_TABLE].
    #[arg(short = 'r', long = "istio-inbound-tproxy-route-table")]
    tproxy_route_table: Option<String>,
    /// Print the rules; change nothing [env DRY_RUN].
    #[arg(short = 'n', long = "dry-run", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    dry_run: Option<String>,
    /// Remove the capture and install nothing [env CLEANUP_ONLY].
    #[arg(long = "cleanup-only", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    cleanup_only: Option<String>,
    /// Check nothing, change nothing [env SKIP_RULE_APPLY].
    #[arg(long = "skip-rule-apply", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    skip_rule_apply: Option<String>,
    /// Drop packets conntrack finds INVALID [env DROP_INVALID, INVALID_DROP].
    #[arg(long = "drop-invalid", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    drop_invalid: Option<String>,
    /// Capture IPv6 when the pod has any global IPv6 address [env DUAL_STACK, ISTIO_DUAL_STACK].
    #[arg(long = "dual-stack", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    dual_stack: Option<String>,
    /// Accepted as Istio's: sluice's install always converges on the flags [env RECONCILE].
    #[arg(long = "reconcile", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    reconcile: Option<String>,
    /// Accepted as Istio's: sluice's install always converges on the flags [env FORCE_APPLY].
    #[arg(long = "force-apply", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    force_apply: Option<String>,
    /// Istio's logging flag: sets sluice's log level (e.g. default:info).
    #[arg(long = "log_output_level")]
    log_output_level: Option<String>,
    /// Istio's logging flag: logs as JSON.
    #[arg(long = "log_as_json", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    log_as_json: Option<String>,

    /// Check that the capture redirects, as the proxy's uid; exit 126 if
    /// not [env RUN_VALIDATION].
    #[arg(long = "run-validation", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    run_validation: Option<String>,
    /// The validation's original destination port [env IPTABLES_PROBE_PORT].
    #[arg(long = "iptables-probe-port")]
    iptables_probe_port: Option<String>,
    /// How long the validation tries, as Go writes it: 5s, 500ms, 1m
    /// [env PROBE_TIMEOUT].
    #[arg(long = "probe-timeout")]
    probe_timeout: Option<String>,

    /// Send DNS (port 53, UDP and TCP) to the mesh proxy on 15053: to the
    /// nameservers of /etc/resolv.conf [env REDIRECT_DNS, ISTIO_META_DNS_CAPTURE].
    #[arg(long = "redirect-dns", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    redirect_dns: Option<String>,
    /// With --redirect-dns: all DNS, whatever the server [env CAPTURE_ALL_DNS].
    #[arg(long = "capture-all-dns", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    capture_all_dns: Option<String>,

    // Refused (see REFUSED): declared so the error can say why.
    #[arg(long = "network-namespace", hide = true)]
    network_namespace: Option<String>,
    #[arg(long = "cni-mode", hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    cni_mode: Option<String>,
    #[arg(long = "native-nftables", hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    native_nftables: Option<String>,
    #[arg(long = "force-iptables-binary", hide = true)]
    force_iptables_binary: Option<String>,
}

/// Flags sluice does not implement, and why; set to a true value (or, for
/// a value flag, to anything) on the command line or in the env var, each
/// is an error that names it.
const REFUSED: &[(&str, &str)] = &[
    (
        "network-namespace",
        "run sluice inside the pod's namespace instead (nsenter --net=PATH)",
    ),
    (
        "cni-mode",
        "sluice runs as the init container, not from the CNI plugin",
    ),
    (
        "native-nftables",
        "sluice writes iptables rules (iptables-nft or legacy, whichever the image has)",
    ),
    ("force-iptables-binary", "sluice uses the iptables on PATH"),
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FlagError {
    #[error("--{flag} ({source_}): {value:?} is not {what}")]
    Invalid {
        flag: &'static str,
        source_: String,
        value: String,
        what: &'static str,
    },
    #[error("--{flag} ({source_}) is not supported by sluice istio-iptables: {why}")]
    Refused {
        flag: &'static str,
        source_: String,
        why: &'static str,
    },
    #[error("{env_var}: no group {group:?} in this image's /etc/group; give its gid instead")]
    Group {
        env_var: &'static str,
        group: String,
    },
    #[error("--redirect-dns needs the nameservers of /etc/resolv.conf, which cannot be read ({0}); or add --capture-all-dns")]
    ResolvConf(String),
    #[error("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR {0:?} must be an IPv4 loopback CIDR with a prefix of 8 to 32, e.g. 127.0.0.1/32")]
    Loopback(String),
}

/// Inbound ports to capture (`-b`, with `-d` when it is `*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboundPorts {
    None,
    All { except: Vec<u16> },
    List(Vec<u16>),
}

/// Outbound destinations to capture (`-i`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    All,
    Cidrs(Vec<IpNet>),
}

/// Which groups' outbound traffic is captured (`ISTIO_OUTBOUND_OWNER_GROUPS`
/// and `..._EXCLUDE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnerGroups {
    All,
    Except(Vec<String>),
    Only(Vec<String>),
}

/// Istio's capture, checked and defaulted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capture {
    pub envoy_port: u16,
    pub inbound_port: u16,
    pub tunnel_port: u16,
    pub uids: Vec<String>,
    pub gids: Vec<String>,
    pub inbound: InboundPorts,
    pub exclude_interfaces: Vec<String>,
    pub kube_virt_interfaces: Vec<String>,
    pub outbound: Outbound,
    pub outbound_exclude: Vec<IpNet>,
    pub outbound_ports: Vec<u16>,
    pub outbound_ports_exclude: Vec<u16>,
    pub owner_groups: OwnerGroups,
    /// `ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR`: what counts as loopback for IPv4.
    pub loopback_v4: IpNet,
    pub drop_invalid: bool,
    pub dual_stack: bool,
    /// `-m TPROXY`: inbound by sluice's conntrack-free recipe.
    pub tproxy: Option<Tproxy>,
    /// `--redirect-dns`, when it has something to capture.
    pub dns: Option<Dns>,
}

/// DNS capture: all of port 53, or that to these nameservers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dns {
    All,
    Servers(Vec<IpAddr>),
}

/// `-t` and `-r`: the mark the mesh proxy puts on its connections to the
/// app (Envoy's `original_src`), and the table that routes the app's
/// replies to them back to the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tproxy {
    pub mark: u32,
    pub table: u32,
}

/// What to do with the capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Install,
    DryRun,
    CleanupOnly,
    SkipRuleApply,
}

/// `--run-validation`'s probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validation {
    pub probe_port: u16,
    pub timeout: Duration,
}

/// The resolved command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub capture: Capture,
    pub action: Action,
    pub validation: Option<Validation>,
    /// `--log_output_level`'s scope:level pairs, as a sluice log filter.
    pub log_level: Option<String>,
    pub log_json: bool,
}

/// Where a value came from, for error messages.
struct Given {
    value: String,
    source: String,
}

impl IstioArgs {
    /// Resolves every flag with `env` standing for the process environment:
    /// command line, else env var, else Istio's default.
    pub fn resolve(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<Resolved, FlagError> {
        let given = |flag: &'static str, cli: &Option<String>, envs: &[&str]| -> Option<Given> {
            if let Some(value) = cli {
                return Some(Given {
                    value: value.clone(),
                    source: "command line".into(),
                });
            }
            // Istio applies the additional env vars after the primary one,
            // so the last one set wins.
            let mut found = None;
            // `-p` alone has no env var in Istio.
            let primary = (flag != "envoy-port").then(|| env_name(flag));
            for name in primary
                .into_iter()
                .chain(envs.iter().map(|e| e.to_string()))
            {
                if let Some(value) = env(&name) {
                    found = Some(Given {
                        value,
                        source: format!("env {name}"),
                    });
                }
            }
            found
        };
        let text = |flag: &'static str, cli: &Option<String>, default: &str| -> String {
            given(flag, cli, &[]).map_or(default.to_string(), |g| g.value)
        };
        let port =
            |flag: &'static str, cli: &Option<String>, default: u16| -> Result<u16, FlagError> {
                match given(flag, cli, &[]) {
                    None => Ok(default),
                    Some(g) => parse_port(&g.value).ok_or(FlagError::Invalid {
                        flag,
                        source_: g.source,
                        value: g.value,
                        what: "a port (1-65535)",
                    }),
                }
            };
        let ports = |flag: &'static str, cli: &Option<String>| -> Result<Vec<u16>, FlagError> {
            let Some(g) = given(flag, cli, &[]) else {
                return Ok(Vec::new());
            };
            split(&g.value)
                .map(parse_port)
                .collect::<Option<Vec<u16>>>()
                .ok_or(FlagError::Invalid {
                    flag,
                    source_: g.source,
                    value: g.value,
                    what: "a comma-separated list of ports",
                })
        };
        let boolean =
            |flag: &'static str, cli: &Option<String>, extra: &[&str]| -> Result<bool, FlagError> {
                match given(flag, cli, extra) {
                    None => Ok(false),
                    Some(g) => parse_go_bool(&g.value).ok_or(FlagError::Invalid {
                        flag,
                        source_: g.source,
                        value: g.value,
                        what: "a boolean (true, false, 1, 0, t, f)",
                    }),
                }
            };
        let cidrs = |flag: &'static str, cli: &Option<String>| -> Result<Vec<IpNet>, FlagError> {
            let Some(g) = given(flag, cli, &[]) else {
                return Ok(Vec::new());
            };
            split(&g.value)
                .map(|c| c.parse::<IpNet>().ok())
                .collect::<Option<Vec<IpNet>>>()
                .ok_or(FlagError::Invalid {
                    flag,
                    source_: g.source,
                    value: g.value,
                    what: "a comma-separated list of CIDRs (e.g. 10.0.0.0/8,fd00::/8)",
                })
        };

        for (flag, why) in REFUSED {
            let cli = self.refused_value(flag);
            if let Some(g) = given(flag, &cli, &[]) {
                // A boolean set to false asks for nothing.
                if parse_go_bool(&g.value) != Some(false) {
                    return Err(FlagError::Refused {
                        flag,
                        source_: g.source,
                        why,
                    });
                }
            }
        }
        // Istio takes anything but TPROXY as REDIRECT.
        let mode = text("istio-inbound-interception-mode", &self.mode, "");
        let uids = match split(&text("proxy-uid", &self.proxy_uid, "")).collect::<Vec<_>>() {
            uids if uids.is_empty() => vec![envoy_uid(env)],
            uids => uids.into_iter().map(String::from).collect(),
        };
        let gids = match split(&text("proxy-gid", &self.proxy_gid, "")).collect::<Vec<_>>() {
            gids if gids.is_empty() => uids.clone(),
            gids => gids.into_iter().map(String::from).collect(),
        };
        let inbound = match text("istio-inbound-ports", &self.inbound_ports, "").as_str() {
            "" => InboundPorts::None,
            "*" => InboundPorts::All {
                except: ports("istio-local-exclude-ports", &self.local_exclude_ports)?,
            },
            _ => InboundPorts::List(ports("istio-inbound-ports", &self.inbound_ports)?),
        };
        let outbound = match text("istio-service-cidr", &self.service_cidr, "").as_str() {
            "*" => Outbound::All,
            _ => Outbound::Cidrs(cidrs("istio-service-cidr", &self.service_cidr)?),
        };
        let loopback_text =
            env("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR").unwrap_or("127.0.0.1/32".into());
        let loopback_v4 = match loopback_text.parse::<IpNet>() {
            Ok(net @ IpNet::V4(v4))
                if v4.addr().is_loopback() && (8..=32).contains(&v4.prefix_len()) =>
            {
                net
            }
            _ => return Err(FlagError::Loopback(loopback_text)),
        };
        let groups = env("ISTIO_OUTBOUND_OWNER_GROUPS").unwrap_or("*".into());
        let owner_groups = if groups == "*" {
            let name = "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE";
            let except = group_ids(name, &env(name).unwrap_or_default())?;
            if except.is_empty() {
                OwnerGroups::All
            } else {
                OwnerGroups::Except(except)
            }
        } else {
            OwnerGroups::Only(group_ids("ISTIO_OUTBOUND_OWNER_GROUPS", &groups)?)
        };
        let mut capture = Capture {
            envoy_port: port("envoy-port", &self.envoy_port, 15001)?,
            inbound_port: port("inbound-capture-port", &self.inbound_capture_port, 15006)?,
            tunnel_port: port("inbound-tunnel-port", &self.inbound_tunnel_port, 15008)?,
            uids,
            gids,
            inbound,
            exclude_interfaces: split(&text(
                "istio-exclude-interfaces",
                &self.exclude_interfaces,
                "",
            ))
            .map(String::from)
            .collect(),
            kube_virt_interfaces: split(&text(
                "kube-virt-interfaces",
                &self.kube_virt_interfaces,
                "",
            ))
            .map(String::from)
            .collect(),
            outbound,
            outbound_exclude: {
                if text("istio-service-exclude-cidr", &self.service_exclude_cidr, "") == "*" {
                    return Err(FlagError::Invalid {
                        flag: "istio-service-exclude-cidr",
                        source_: "given".into(),
                        value: "*".into(),
                        what: "a list of CIDRs (* is not allowed here, as in Istio)",
                    });
                }
                cidrs("istio-service-exclude-cidr", &self.service_exclude_cidr)?
            },
            outbound_ports: ports("istio-outbound-ports", &self.outbound_ports)?,
            outbound_ports_exclude: ports(
                "istio-local-outbound-ports-exclude",
                &self.local_outbound_ports_exclude,
            )?,
            owner_groups,
            loopback_v4,
            drop_invalid: boolean("drop-invalid", &self.drop_invalid, &["INVALID_DROP"])?,
            dual_stack: boolean("dual-stack", &self.dual_stack, &["ISTIO_DUAL_STACK"])?,
            tproxy: None,
            dns: None,
        };
        if boolean(
            "redirect-dns",
            &self.redirect_dns,
            &["ISTIO_META_DNS_CAPTURE"],
        )? {
            capture.dns = if boolean("capture-all-dns", &self.capture_all_dns, &[])? {
                Some(Dns::All)
            } else {
                // As Istio: no nameserver, nothing to capture (it warns).
                let servers = nameservers(&resolv_conf()?);
                (!servers.is_empty()).then_some(Dns::Servers(servers))
            };
        }
        // Checked for their values, then nothing more to do: sluice's
        // install converges on the flags whatever is there.
        boolean("reconcile", &self.reconcile, &[])?;
        boolean("force-apply", &self.force_apply, &[])?;
        let number = |flag: &'static str,
                      cli: &Option<String>,
                      default: u32,
                      what: &'static str| {
            match given(flag, cli, &[]) {
                None => Ok(default),
                Some(g) => g.value.parse::<u32>().map_err(|_| FlagError::Invalid {
                    flag,
                    source_: g.source,
                    value: g.value,
                    what,
                }),
            }
        };
        // Checked in either mode, so that a typo is not silently carried.
        let mark = number(
            "istio-inbound-tproxy-mark",
            &self.tproxy_mark,
            1337,
            "a non-zero mark",
        )?;
        let table = number(
            "istio-inbound-tproxy-route-table",
            &self.tproxy_route_table,
            133,
            "a routing table number other than 0, 253, 254, 255",
        )?;
        if mode == "TPROXY" {
            if mark == 0 || mark == u32::MAX {
                return Err(FlagError::Invalid {
                    flag: "istio-inbound-tproxy-mark",
                    source_: "given".into(),
                    value: mark.to_string(),
                    what: "a mark from 1 to 4294967294 (0 matches every unmarked packet; the mesh proxy's accepted sockets take the mark + 1)",
                });
            }
            if matches!(table, 0 | 253..=255) {
                return Err(FlagError::Invalid {
                    flag: "istio-inbound-tproxy-route-table",
                    source_: "given".into(),
                    value: table.to_string(),
                    what: "a routing table number other than 0, 253, 254, 255",
                });
            }
            capture.tproxy = Some(Tproxy { mark, table });
        }
        let action = if boolean("dry-run", &self.dry_run, &[])? {
            Action::DryRun
        } else if boolean("skip-rule-apply", &self.skip_rule_apply, &[])? {
            Action::SkipRuleApply
        } else if boolean("cleanup-only", &self.cleanup_only, &[])? {
            Action::CleanupOnly
        } else {
            Action::Install
        };
        let validation = if boolean("run-validation", &self.run_validation, &[])? {
            let timeout = match given("probe-timeout", &self.probe_timeout, &[]) {
                None => Duration::from_secs(5),
                Some(g) => parse_go_duration(&g.value).ok_or(FlagError::Invalid {
                    flag: "probe-timeout",
                    source_: g.source,
                    value: g.value,
                    what: "a duration such as 5s, 500ms or 1m",
                })?,
            };
            Some(Validation {
                probe_port: port("iptables-probe-port", &self.iptables_probe_port, 15002)?,
                timeout,
            })
        } else {
            None
        };
        Ok(Resolved {
            capture,
            action,
            validation,
            log_level: self.log_output_level.as_deref().map(log_filter),
            log_json: self
                .log_as_json
                .as_deref()
                .is_some_and(|v| parse_go_bool(v) == Some(true)),
        })
    }

    fn refused_value(&self, flag: &str) -> Option<String> {
        match flag {
            "network-namespace" => &self.network_namespace,
            "cni-mode" => &self.cni_mode,
            "native-nftables" => &self.native_nftables,
            "force-iptables-binary" => &self.force_iptables_binary,
            _ => &None,
        }
        .clone()
    }
}

/// The env var of a flag: its long name upper-cased, `-` → `_`.
fn env_name(flag: &str) -> String {
    flag.to_uppercase().replace('-', "_")
}

/// /etc/resolv.conf's text; Istio's tool fails without it when it needs it.
fn resolv_conf() -> Result<String, FlagError> {
    std::fs::read_to_string("/etc/resolv.conf").map_err(|e| FlagError::ResolvConf(e.to_string()))
}

/// The `nameserver` addresses of a resolv.conf, in order (zone suffixes and
/// what does not parse are dropped, as Istio drops them).
pub fn nameservers(resolv_conf: &str) -> Vec<IpAddr> {
    resolv_conf
        .lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter_map(|addr| addr.split('%').next()?.parse().ok())
        .collect()
}

/// Group names as gids, as `iptables-save` prints them (so a second
/// install finds what the first made); numbers as they are.
fn group_ids(env_var: &'static str, list: &str) -> Result<Vec<String>, FlagError> {
    split(list)
        .map(|group| {
            if group.parse::<u32>().is_ok() {
                return Ok(group.to_string());
            }
            match nix::unistd::Group::from_name(group) {
                Ok(Some(g)) => Ok(g.gid.to_string()),
                _ => Err(FlagError::Group {
                    env_var,
                    group: group.to_string(),
                }),
            }
        })
        .collect()
}

/// Istio's list split: commas, empty items dropped.
fn split(text: &str) -> impl Iterator<Item = &str> {
    text.split(',').filter(|item| !item.is_empty())
}

fn parse_port(text: &str) -> Option<u16> {
    text.parse::<u16>().ok().filter(|p| *p != 0)
}

/// A Go duration (time.ParseDuration): a sequence of decimal numbers, each
/// with a unit (ns, us, µs, ms, s, m, h), e.g. 1m30s or 1.5s.
fn parse_go_duration(text: &str) -> Option<Duration> {
    if text == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = text;
    let mut seconds = 0.0;
    while !rest.is_empty() {
        let number_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let number: f64 = rest[..number_end].parse().ok()?;
        rest = &rest[number_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        seconds += number * scale;
        rest = &rest[unit_end..];
    }
    Duration::try_from_secs_f64(seconds).ok()
}

/// Go's strconv.ParseBool.
fn parse_go_bool(text: &str) -> Option<bool> {
    match text {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// The uid of ENVOY_USER (default istio-proxy) from the passwd database,
/// else 1337, as Istio's tool does.
fn envoy_uid(env: &dyn Fn(&str) -> Option<String>) -> String {
    let user = env("ENVOY_USER").unwrap_or("istio-proxy".into());
    nix::unistd::User::from_name(&user)
        .ok()
        .flatten()
        .map_or("1337".into(), |u| u.uid.to_string())
}

/// Istio's `--log_output_level` (`default:info,scope:debug`) as a sluice
/// filter: the default scope's level.
fn log_filter(istio: &str) -> String {
    istio
        .split(',')
        .filter_map(|pair| pair.split_once(':'))
        .find(|(scope, _)| *scope == "default")
        .map_or("info", |(_, level)| match level {
            "none" => "off",
            "fatal" => "error",
            level => level,
        })
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: IstioArgs,
    }

    fn resolve(argv: &[&str], env: &[(&str, &str)]) -> Result<Resolved, FlagError> {
        let cli =
            Cli::try_parse_from(std::iter::once("istio-iptables").chain(argv.iter().copied()))
                .expect("flags parse");
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        cli.args
            .resolve(&|name| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
    }

    #[test]
    fn the_injectors_arguments() {
        let r = resolve(crate::istio::INJECTOR, &[]).unwrap();
        let c = &r.capture;
        assert_eq!(
            (c.envoy_port, c.inbound_port, c.tunnel_port),
            (15001, 15006, 15008)
        );
        assert_eq!(
            (c.uids.as_slice(), c.gids.as_slice()),
            (&["1337".to_string()][..], &["1337".to_string()][..])
        );
        assert_eq!(
            c.inbound,
            InboundPorts::All {
                except: vec![15090, 15021, 15020]
            }
        );
        assert_eq!(c.outbound, Outbound::All);
        assert!(c.outbound_exclude.is_empty());
        assert_eq!(c.owner_groups, OwnerGroups::All);
        assert_eq!(r.action, Action::Install);
    }

    #[test]
    fn a_flag_beats_its_env_var_which_beats_the_default() {
        let env = [
            ("ISTIO_INBOUND_PORTS", "80,443"),
            ("INBOUND_CAPTURE_PORT", "16006"),
        ];
        let r = resolve(&["-b", "8080"], &env).unwrap();
        assert_eq!(r.capture.inbound, InboundPorts::List(vec![8080]));
        assert_eq!(r.capture.inbound_port, 16006);
        assert_eq!(
            resolve(&[], &[]).unwrap().capture.inbound,
            InboundPorts::None
        );
        // -p alone has no env var.
        assert_eq!(
            resolve(&[], &[("ENVOY_PORT", "1")])
                .unwrap()
                .capture
                .envoy_port,
            15001
        );
        // The additional env var wins over the primary one, as in Istio.
        let env = [("DROP_INVALID", "false"), ("INVALID_DROP", "true")];
        assert!(resolve(&[], &env).unwrap().capture.drop_invalid);
        assert!(
            !resolve(&["--drop-invalid=false"], &env)
                .unwrap()
                .capture
                .drop_invalid
        );
    }

    #[test]
    fn gids_default_to_the_uids_and_d_counts_only_with_a_wildcard() {
        let r = resolve(&["-u", "3,4", "-b", "80", "-d", "81"], &[]).unwrap();
        assert_eq!(r.capture.gids, ["3", "4"]);
        assert_eq!(r.capture.inbound, InboundPorts::List(vec![80]));
        // Istio's list split drops empty items.
        let r = resolve(&["-b", "*", "-d", "6000,7000,"], &[]).unwrap();
        assert_eq!(
            r.capture.inbound,
            InboundPorts::All {
                except: vec![6000, 7000]
            }
        );
    }

    #[test]
    fn owner_groups_from_the_environment() {
        // Names become gids, as iptables-save prints them.
        let only = resolve(&[], &[("ISTIO_OUTBOUND_OWNER_GROUPS", "root,202")]).unwrap();
        assert_eq!(
            only.capture.owner_groups,
            OwnerGroups::Only(vec!["0".into(), "202".into()])
        );
        let except = resolve(
            &[],
            &[("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "888,daemon")],
        )
        .unwrap();
        assert_eq!(
            except.capture.owner_groups,
            OwnerGroups::Except(vec!["888".into(), "1".into()])
        );
        let unknown = resolve(&[], &[("ISTIO_OUTBOUND_OWNER_GROUPS", "no-such-group")]);
        assert!(matches!(unknown, Err(FlagError::Group { .. })));
        // Istio's quirk, kept: an empty list captures no group's traffic.
        let none = resolve(&[], &[("ISTIO_OUTBOUND_OWNER_GROUPS", "")]).unwrap();
        assert_eq!(none.capture.owner_groups, OwnerGroups::Only(Vec::new()));
    }

    #[test]
    fn bad_values_and_unsupported_flags_are_refused_by_name() {
        let err = resolve(&[], &[("ISTIO_INBOUND_PORTS", "80,x")]).unwrap_err();
        assert!(
            err.to_string()
                .contains("--istio-inbound-ports (env ISTIO_INBOUND_PORTS)"),
            "{err}"
        );
        let err = resolve(&["-i", "10.0.0.0"], &[]).unwrap_err();
        assert!(err.to_string().contains("--istio-service-cidr"), "{err}");
        let err = resolve(&["-x", "*"], &[]).unwrap_err();
        assert!(
            err.to_string().contains("--istio-service-exclude-cidr"),
            "{err}"
        );
        let err = resolve(&["--cni-mode"], &[]).unwrap_err();
        assert!(
            matches!(
                err,
                FlagError::Refused {
                    flag: "cni-mode",
                    ..
                }
            ),
            "{err}"
        );
        // Off is no request.
        assert!(resolve(&["--cni-mode=false"], &[]).is_ok());
        let tproxy = resolve(&["-m", "TPROXY", "-t", "7"], &[])
            .unwrap()
            .capture
            .tproxy;
        assert_eq!(
            tproxy,
            Some(Tproxy {
                mark: 7,
                table: 133
            })
        );
        // Istio takes anything but exactly TPROXY as REDIRECT.
        assert_eq!(
            resolve(&["-m", "tproxy"], &[]).unwrap().capture.tproxy,
            None
        );
        assert!(resolve(&["-m", "TPROXY", "-r", "254"], &[]).is_err());
        let err =
            resolve(&[], &[("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "10.0.0.1/32")]).unwrap_err();
        assert!(matches!(err, FlagError::Loopback(_)), "{err}");
    }

    #[test]
    fn dns_capture_from_the_flag_or_istios_proxy_metadata() {
        let all = resolve(
            &["--capture-all-dns"],
            &[("ISTIO_META_DNS_CAPTURE", "true")],
        )
        .unwrap();
        assert_eq!(all.capture.dns, Some(Dns::All));
        // capture-all alone asks for nothing, as in Istio.
        assert_eq!(
            resolve(&["--capture-all-dns"], &[]).unwrap().capture.dns,
            None
        );
        let conf =
            "# x\nsearch a.svc\nnameserver 10.96.0.10\nnameserver fe80::1%eth0\nnameserver bad\n";
        let servers: Vec<IpAddr> = vec!["10.96.0.10".parse().unwrap(), "fe80::1".parse().unwrap()];
        assert_eq!(nameservers(conf), servers);
    }

    #[test]
    fn validation_takes_istios_defaults_and_go_durations() {
        let r = resolve(&["--run-validation"], &[]).unwrap();
        let v = r.validation.unwrap();
        assert_eq!((v.probe_port, v.timeout), (15002, Duration::from_secs(5)));
        let r = resolve(
            &[],
            &[("RUN_VALIDATION", "true"), ("PROBE_TIMEOUT", "1m30s")],
        )
        .unwrap();
        assert_eq!(r.validation.unwrap().timeout, Duration::from_secs(90));
        assert_eq!(parse_go_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_go_duration("5"), None);
        assert!(resolve(&["--run-validation", "--probe-timeout", "soon"], &[]).is_err());
        assert_eq!(resolve(&[], &[]).unwrap().validation, None);
    }

    #[test]
    fn istio_log_flags_become_sluice_log_settings() {
        let r = resolve(&["--log_output_level=default:debug", "--log_as_json"], &[]).unwrap();
        assert_eq!(r.log_level.as_deref(), Some("debug"));
        assert!(r.log_json);
        let r = resolve(&["-n"], &[]).unwrap();
        assert_eq!(r.action, Action::DryRun);
    }
}
