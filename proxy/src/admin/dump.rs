//! `GET /config_dump` and `sluice run --dry-run`: the effective
//! configuration, what is installed, and the kernel facts sluice relies on.

use serde_json::{json, Value};

use super::Shared;

/// The facts of this kernel and process that sluice depends on.
pub fn kernel_facts() -> Value {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .ok()
            .map(|s| s.trim().to_string())
    };
    let effective = caps::read(None, caps::CapSet::Effective)
        .map(|set| {
            let mut names: Vec<String> = set.iter().map(ToString::to_string).collect();
            names.sort();
            json!(names)
        })
        .unwrap_or_else(|e| json!(format!("cannot read: {e}")));
    json!({
        "release": read("/proc/sys/kernel/osrelease"),
        // 0: allowed; 1: root only; 2: disabled. Absent before 6.6.
        "io_uring_disabled": read("/proc/sys/kernel/io_uring_disabled"),
        // TPROXY's accepted sockets need it for the client-source mode.
        "tcp_fwmark_accept": read("/proc/sys/net/ipv4/tcp_fwmark_accept"),
        "unprivileged_bpf_disabled": read("/proc/sys/kernel/unprivileged_bpf_disabled"),
        "may_load_bpf": crate::privileges::may_load_bpf().ok(),
        "capabilities": effective,
        "no_new_privs": nix::sys::prctl::get_no_new_privs().ok(),
        "uid": nix::unistd::getuid().as_raw(),
    })
}

/// Destinations whose workload refused the inner address (it listens on the
/// pod's address only), so that their connections come from the bypass
/// source: which, and how many connections went that way.
fn client_source_fallbacks(shared: &Shared) -> Value {
    let mut destinations = std::collections::BTreeSet::new();
    for stats in &shared.stats {
        if let Ok(listed) = stats.fallback_destinations.lock() {
            destinations.extend(listed.iter().map(ToString::to_string));
        }
    }
    json!({
        "reason": "workload_not_on_inner_address",
        "connections": crate::stats::total(&shared.stats, |s| &s.client_source_fallbacks),
        "destinations": destinations,
    })
}

/// Everything `GET /config_dump` shows.
pub async fn config_dump(shared: &Shared) -> Value {
    let interception = shared.interception().await;
    let ready = shared.readiness().await.is_ok();
    let workers_running = shared
        .workers_running
        .load(std::sync::atomic::Ordering::SeqCst);
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "mode": shared.mode.to_string(),
        "forwarder": format!("{:?}", shared.forwarder).to_lowercase(),
        "config": shared.config,
        "workers": {
            "count": shared.stats.len(),
            // io_uring is available: every worker's runtime came up.
            "running": workers_running,
        },
        "draining": shared.draining(),
        "client_source_fallbacks": client_source_fallbacks(shared),
        "ready": ready,
        "interception": interception.map(|i| json!({
            "matches": i.matches,
            "installed": i.installed,
            "checked_seconds_ago": i.checked.elapsed().as_secs_f64(),
        })),
        "kernel": kernel_facts(),
    })
}
