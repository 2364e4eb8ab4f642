//! The command line, validated into one typed [`Policy`] before anything
//! touches the kernel: bad input is refused with nothing changed.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

#[derive(Debug, Parser)]
#[command(
    name = "sluice",
    version,
    about = "Transparent inbound TCP interceptor"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log level (error, warn, info, debug, trace) or a RUST_LOG-style
    /// filter such as `info,sluice::server=debug` [default: RUST_LOG if set,
    /// else info].
    #[arg(long, global = true, value_parser = parse_log_filter)]
    pub log_level: Option<String>,
    /// Log line format: text for people, json (one object a line) for a
    /// cluster's log collector.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// A log filter, checked before anything starts.
fn parse_log_filter(text: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::builder()
        .parse(text)
        .map(|_| text.to_string())
        .map_err(|e| format!("'{text}' is not a log level or filter ({e}); write e.g. debug or info,sluice=debug"))
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Install, remove or show the interception rules of this network namespace.
    Rules {
        #[command(subcommand)]
        action: RulesAction,
    },
    /// Run the proxy: accept intercepted connections and forward them to the workload.
    Run(RunArgs),
    /// Istio's capture from Istio's init-container flags (a drop-in for
    /// `pilot-agent istio-iptables`; also run as `istio-iptables`).
    #[command(name = "istio-iptables")]
    IstioIptables(Box<crate::istio::IstioArgs>),
}

/// The command line when the binary is invoked as `istio-iptables`.
#[derive(Debug, Parser)]
#[command(
    name = "istio-iptables",
    version,
    about = "Istio's capture through sluice's engine (sluice istio-iptables)"
)]
pub struct IstioCli {
    #[command(flatten)]
    pub args: crate::istio::IstioArgs,
}

#[derive(Debug, Subcommand)]
pub enum RulesAction {
    /// Install the rules (idempotent: installing twice installs once).
    Install {
        #[command(flatten)]
        policy: PolicyArgs,
        /// Print the exact iptables-restore input and routes; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Remove every rule, chain and route of sluice (succeeds when none is installed).
    Remove {
        #[command(flatten)]
        policy: PolicyArgs,
        /// Also detach the eBPF program pinned under this bpffs directory.
        #[arg(long)]
        pin: Option<std::path::PathBuf>,
    },
    /// Show what is installed and whether it matches the flags given.
    Show {
        #[command(flatten)]
        policy: PolicyArgs,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Install the rules at start and, at exit (SIGINT/SIGTERM), remove what
    /// this install added (rules an earlier `rules install` made stay).
    /// In ebpf mode the program is always attached by `run` itself.
    #[arg(long)]
    pub install_rules: bool,
    /// ebpf mode: pin the program and its maps under this bpffs directory so
    /// they outlive sluice (remove with `sluice rules remove --pin DIR`).
    #[arg(long)]
    pub pin: Option<std::path::PathBuf>,
    /// How the bytes of a connection are moved between its two sockets.
    #[arg(long, value_enum, default_value_t = Forwarder::Copy)]
    pub forward: Forwarder,
    /// With `--forward sockmap`: connections are copied until they are this
    /// old, then joined in the kernel (joining costs more than a short
    /// connection gains); 0 joins every connection at once.
    #[arg(long, default_value = "10ms", value_parser = parse_duration)]
    pub sockmap_after: Duration,
    /// Data-path threads, each with its own io_uring runtime [default: one per core].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub workers: Option<u16>,
    /// How long sluice waits for the workload to accept its connection; the
    /// client is then reset.
    #[arg(long, default_value = "10s", value_parser = parse_timeout)]
    pub connect_timeout: Duration,
    /// A connection that moves no byte either way for this long, with none
    /// waiting to be sent (half-closed ones included), is reset on both
    /// sides; 0 means never. A slow reader is not idle.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// On SIGTERM/SIGINT, how long connections in flight may go on before
    /// they are reset; new connections are refused meanwhile.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Where sluice's connection to the workload comes from: the client's own
    /// address (the workload sees who connected), or 127.0.0.6 / ::6.
    #[arg(long, value_enum, default_value_t = UpstreamSource::Client)]
    pub upstream_source: UpstreamSource,
    /// With `--upstream-source client`: narrows the source ports of sluice's
    /// connections to the workload, within the pod's
    /// net.ipv4.ip_local_port_range [default: that whole range]. They need
    /// not be apart from the clients' ports: those connections go to the
    /// pod's inner address.
    #[arg(long, value_parser = parse_port_range)]
    pub upstream_ports: Option<(u16, u16)>,
    /// Connections forwarded at once; beyond it, new ones are reset
    /// [default: what the descriptor limit (RLIMIT_NOFILE) holds].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: Option<u32>,
    /// Where `GET /metrics` (Prometheus text format) is served, or `off`.
    #[arg(long, default_value = "0.0.0.0:15020", value_parser = parse_listen)]
    pub metrics_addr: Listen,
    /// Where `GET /healthz/ready` is served, or `off`.
    #[arg(long, default_value = "0.0.0.0:15021", value_parser = parse_listen)]
    pub readiness_addr: Listen,
    /// Where the admin endpoints (`/config_dump`, `/quitquitquit`,
    /// `/logging`) are served, or `off`; loopback addresses only.
    #[arg(long, default_value = "127.0.0.1:15000", value_parser = parse_admin_listen)]
    pub admin_addr: Listen,
    /// Validate the flags, print the effective configuration (JSON) and
    /// exit; bind, install and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// An address to serve on, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen(pub Option<SocketAddr>);

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(addr) => write!(f, "{addr}"),
            None => f.write_str("off"),
        }
    }
}

fn parse_listen(text: &str) -> Result<Listen, String> {
    match text.trim() {
        "off" => Ok(Listen(None)),
        text => text.parse().map(|addr| Listen(Some(addr))).map_err(|_| {
            format!("'{text}' is not an address and port (e.g. 0.0.0.0:15020, [::]:15020) nor off")
        }),
    }
}

/// The admin endpoints can stop sluice and change its logging: never on an
/// address another host can reach.
fn parse_admin_listen(text: &str) -> Result<Listen, String> {
    let listen = parse_listen(text)?;
    match listen.0 {
        Some(addr) if !addr.ip().is_loopback() => Err(format!(
            "{addr} is not a loopback address: the admin endpoints (/quitquitquit, /logging) \
             must only be reachable from inside the pod; use e.g. 127.0.0.1:15000"
        )),
        _ => Ok(listen),
    }
}

/// `LOW-HIGH`, a range of ports.
fn parse_port_range(text: &str) -> Result<(u16, u16), String> {
    let (low, high) = text
        .split_once('-')
        .ok_or_else(|| format!("'{text}' is not a port range; write e.g. 40000-60999"))?;
    let (low, high) = (parse_port(low)?, parse_port(high)?);
    if low > high {
        return Err(format!(
            "'{text}': the first port must not be above the second"
        ));
    }
    Ok((low, high))
}

/// A duration such as `10s`, `1m30s`, `250ms`, or `0`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    match text.trim() {
        "0" => Ok(Duration::ZERO),
        text => humantime::parse_duration(text)
            .map_err(|e| format!("'{text}' is not a duration ({e}); write e.g. 10s, 1m30s, 250ms")),
    }
}

/// A duration that must not be zero.
fn parse_timeout(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        Duration::ZERO => Err("a timeout of 0 would fail every connection; give e.g. 10s".into()),
        duration => Ok(duration),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Forwarder {
    /// io_uring reads and writes through user-space buffers.
    Copy,
    /// socket → pipe → socket in the kernel (splice), readiness from io_uring.
    Splice,
    /// Both sockets in a sockmap; an sk_skb verdict program moves the bytes in
    /// the kernel. Falls back to copy, with one log line, where the kernel
    /// refuses (no CAP_BPF/CAP_NET_ADMIN, old kernel).
    Sockmap,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UpstreamSource {
    /// The client's own address (IP_TRANSPARENT): the workload's
    /// getpeername() is the client. No conntrack entry.
    Client,
    /// 127.0.0.6 / ::6 (Istio's convention): every connection reaches the
    /// workload from one address.
    Bypass,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// mangle-table TPROXY and policy routing; no conntrack entry per connection.
    Tproxy,
    /// nat-table REDIRECT, the compatible baseline; one conntrack entry per connection.
    Redirect,
    /// An sk_lookup eBPF program steers SYNs to sluice's socket: no netfilter, no conntrack.
    Ebpf,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Tproxy => "tproxy",
            Mode::Redirect => "redirect",
            Mode::Ebpf => "ebpf",
        })
    }
}

/// The interception flags shared by `rules` and `run`.
#[derive(Debug, Clone, Args)]
pub struct PolicyArgs {
    /// Interception mode.
    #[arg(long, value_enum, default_value_t = Mode::Tproxy)]
    pub mode: Mode,
    /// Port sluice listens on for intercepted connections.
    #[arg(long, default_value = "15006", value_parser = parse_port)]
    pub proxy_port: u16,
    /// Destination ports to intercept: a comma-separated list, or * for all.
    #[arg(long, default_value = "*", value_parser = parse_ports)]
    pub ports: Ports,
    /// Destination ports never intercepted (the proxy port is always excluded).
    #[arg(long, default_value = "15000,15006,15020,15021,15090", value_parser = parse_port_list)]
    pub exclude_ports: PortList,
    /// Client (source) CIDRs whose connections are not intercepted, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub exclude_cidrs: Vec<IpNet>,
    /// Interfaces whose incoming connections are not intercepted, comma-separated.
    #[arg(long, value_delimiter = ',', value_parser = parse_interface)]
    pub exclude_interfaces: Vec<String>,
    /// Firewall mark of intercepted packets (non-zero).
    #[arg(long, default_value_t = 1337)]
    pub mark: u32,
    /// Routing table holding the TPROXY local route.
    #[arg(long, default_value_t = 133)]
    pub table: u32,
}

impl Policy {
    /// The mark of sluice's listening sockets, which their accepted sockets
    /// take: any non-zero value but the policy's mark (see
    /// `linux::listener`).
    pub fn listener_mark(&self) -> u32 {
        self.mark + 1
    }
}

/// Which destination ports are intercepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ports {
    All,
    List(BTreeSet<u16>),
}

/// A comma-separated port list (clap needs one value type per flag).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortList(pub BTreeSet<u16>);

/// The validated interception policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    pub proxy_port: u16,
    pub ports: Ports,
    /// Always holds `proxy_port`: intercepting the proxy's own port would loop.
    pub exclude_ports: BTreeSet<u16>,
    pub exclude_cidrs: Vec<IpNet>,
    pub exclude_interfaces: Vec<String>,
    pub mark: u32,
    pub table: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--mark must not be 0: a zero mark matches every unmarked packet")]
    ZeroMark,
    #[error("--mark must be below 4294967295: sluice's listeners carry the mark plus one")]
    MaxMark,
    #[error(
        "--table {0} is reserved (0 unspec, 253 default, 254 main, 255 local): pick another, e.g. 133"
    )]
    ReservedTable(u32),
    #[error("port {0} is both in --ports and in --exclude-ports (or is the --proxy-port): remove it from one")]
    PortConflict(u16),
}

impl PolicyArgs {
    pub fn validate(&self) -> Result<Policy, ConfigError> {
        if self.mark == 0 {
            return Err(ConfigError::ZeroMark);
        }
        if self.mark == u32::MAX {
            return Err(ConfigError::MaxMark);
        }
        if matches!(self.table, 0 | 253..=255) {
            return Err(ConfigError::ReservedTable(self.table));
        }
        let mut exclude_ports = self.exclude_ports.0.clone();
        exclude_ports.insert(self.proxy_port);
        if let Ports::List(ports) = &self.ports {
            if let Some(port) = ports.intersection(&exclude_ports).next() {
                return Err(ConfigError::PortConflict(*port));
            }
        }
        let mut exclude_cidrs: Vec<IpNet> = self.exclude_cidrs.iter().map(IpNet::trunc).collect();
        exclude_cidrs.dedup();
        Ok(Policy {
            mode: self.mode,
            proxy_port: self.proxy_port,
            ports: self.ports.clone(),
            exclude_ports,
            exclude_cidrs,
            exclude_interfaces: self.exclude_interfaces.clone(),
            mark: self.mark,
            table: self.table,
        })
    }
}

fn parse_port(text: &str) -> Result<u16, String> {
    match text.trim().parse::<u16>() {
        Ok(0) => Err("port 0 is not a port; use 1-65535".into()),
        Ok(port) => Ok(port),
        Err(_) => Err(format!("'{text}' is not a port; use 1-65535")),
    }
}

fn parse_port_list(text: &str) -> Result<PortList, String> {
    text.split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(parse_port)
        .collect::<Result<_, _>>()
        .map(PortList)
}

fn parse_ports(text: &str) -> Result<Ports, String> {
    if text.trim() == "*" {
        return Ok(Ports::All);
    }
    let PortList(ports) = parse_port_list(text)?;
    if ports.is_empty() {
        return Err("give at least one port, or * for all".into());
    }
    Ok(Ports::List(ports))
}

fn parse_interface(text: &str) -> Result<String, String> {
    // IFNAMSIZ is 16 with the NUL; iptables refuses what the kernel would.
    let valid = !text.is_empty()
        && text.len() < 16
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@' | '+'));
    if valid {
        Ok(text.to_string())
    } else {
        Err(format!(
            "'{text}' is not an interface name (1-15 characters, no spaces or '/')"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Result<PolicyArgs, clap::Error> {
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            policy: PolicyArgs,
        }
        let argv = std::iter::once("sluice").chain(extra.iter().copied());
        Wrap::try_parse_from(argv).map(|w| w.policy)
    }

    #[test]
    fn defaults_intercept_everything_but_the_proxy_and_admin_ports() {
        let policy = args(&[]).unwrap().validate().unwrap();
        assert_eq!(policy.ports, Ports::All);
        assert_eq!(
            policy.exclude_ports,
            BTreeSet::from([15000, 15006, 15020, 15021, 15090])
        );
        assert_eq!(
            (policy.mark, policy.table, policy.proxy_port),
            (1337, 133, 15006)
        );
    }

    #[test]
    fn proxy_port_is_always_excluded() {
        let policy = args(&["--exclude-ports", "15021", "--proxy-port", "16000"])
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(policy.exclude_ports, BTreeSet::from([15021, 16000]));
    }

    #[test]
    fn bad_input_is_refused() {
        for bad in [
            &["--ports", "0"][..],
            &["--ports", "70000"],
            &["--ports", "80,x"],
            &["--ports", ""],
            &["--exclude-cidrs", "10.0.0.0/33"],
            &["--exclude-cidrs", "nonsense"],
            &["--exclude-interfaces", "a/b"],
            &["--proxy-port", "0"],
            &["--mark", "-1"],
        ] {
            assert!(args(bad).is_err(), "{bad:?} was accepted");
        }
        let zero_mark = args(&["--mark", "0"]).unwrap().validate();
        assert_eq!(zero_mark, Err(ConfigError::ZeroMark));
        let main_table = args(&["--table", "254"]).unwrap().validate();
        assert_eq!(main_table, Err(ConfigError::ReservedTable(254)));
        let conflict = args(&["--ports", "9080,15006"]).unwrap().validate();
        assert_eq!(conflict, Err(ConfigError::PortConflict(15006)));
    }

    #[test]
    fn admin_listen_addresses() {
        assert_eq!(parse_listen("off"), Ok(Listen(None)));
        assert_eq!(
            parse_listen("[::]:15020").map(|l| l.to_string()),
            Ok("[::]:15020".to_string())
        );
        assert!(parse_listen("15020").is_err());
        assert!(parse_admin_listen("127.0.0.1:15000").is_ok());
        assert!(parse_admin_listen("[::1]:15000").is_ok());
        assert!(parse_admin_listen("off").is_ok());
        assert!(parse_admin_listen("0.0.0.0:15000").is_err());
        assert!(parse_log_filter("info,sluice=debug").is_ok());
        assert!(parse_log_filter("sluice=loud").is_err());
    }

    #[test]
    fn cidrs_are_normalised() {
        let policy = args(&["--exclude-cidrs", "10.1.2.3/8,2001:2::1/48"])
            .unwrap()
            .validate()
            .unwrap();
        let shown: Vec<String> = policy
            .exclude_cidrs
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(shown, ["10.0.0.0/8", "2001:2::/48"]);
    }
}
