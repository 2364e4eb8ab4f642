//! What `sluice run` is asked to do, once validated and defaulted, and its
//! rendering for `GET /config_dump` and `--dry-run`.

use std::time::Duration;

use serde_json::{json, Value};

use crate::admin::AdminOptions;
use crate::config::{Forwarder, Policy, Ports};
use crate::upstream;

pub struct RunOptions {
    pub policy: Policy,
    /// ebpf mode: where to pin the program so it outlives sluice.
    pub pin: Option<std::path::PathBuf>,
    pub forwarder: Forwarder,
    /// With sockmap: the age at which a connection is joined.
    pub sockmap_after: Duration,
    pub install_rules: bool,
    pub workers: usize,
    pub connect_timeout: Duration,
    /// Zero: no idle timeout.
    pub idle_timeout: Duration,
    pub drain_timeout: Duration,
    /// `None`: what the descriptor limit holds.
    pub max_connections: Option<u32>,
    pub upstream_source: upstream::Source,
    /// Metrics, readiness and admin endpoints.
    pub admin: AdminOptions,
}

impl RunOptions {
    /// The configuration `sluice run` works with, once validated and defaulted.
    pub fn effective_config(&self) -> Value {
        let options = self;
        let listen = |addr: Option<std::net::SocketAddr>| match addr {
            Some(addr) => json!(addr.to_string()),
            None => json!("off"),
        };
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "policy": policy(&options.policy),
            "forward": format!("{:?}", options.forwarder).to_lowercase(),
            "sockmap_after": seconds(options.sockmap_after),
            "install_rules": options.install_rules,
            "pin": options.pin.as_ref().map(|p| p.display().to_string()),
            "workers": options.workers,
            "connect_timeout": seconds(options.connect_timeout),
            "idle_timeout": seconds(options.idle_timeout),
            "drain_timeout": seconds(options.drain_timeout),
            "max_connections": options.max_connections,
            "upstream_source": match options.upstream_source {
                crate::upstream::Source::Client { .. } => "client",
                crate::upstream::Source::Bypass => "bypass",
            },
            "upstream_ports": match options.upstream_source {
                crate::upstream::Source::Client { ports: Some((low, high)) } => json!(format!("{low}-{high}")),
                crate::upstream::Source::Client { ports: None } => json!("net.ipv4.ip_local_port_range"),
                crate::upstream::Source::Bypass => Value::Null,
            },
            "metrics_addr": listen(options.admin.metrics),
            "readiness_addr": listen(options.admin.readiness),
            "admin_addr": listen(options.admin.admin),
        })
    }
}

fn policy(policy: &Policy) -> Value {
    json!({
        "mode": policy.mode.to_string(),
        "proxy_port": policy.proxy_port,
        "ports": match &policy.ports {
            Ports::All => json!("*"),
            Ports::List(ports) => json!(ports),
        },
        "exclude_ports": policy.exclude_ports,
        "exclude_cidrs": policy.exclude_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "exclude_interfaces": policy.exclude_interfaces,
        "mark": policy.mark,
        "table": policy.table,
    })
}

fn seconds(duration: Duration) -> f64 {
    duration.as_secs_f64()
}
