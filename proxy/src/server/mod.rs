//! `sluice run`: worker threads, each with its own io_uring runtime,
//! accepting intercepted connections and forwarding them to the workload,
//! and the control thread that starts them, installs the interception,
//! waits for a signal and drains.
//!
//! Control stays on the main thread (rules, signals, drain); the workers
//! share nothing mutable with it but their own counters and the phase it
//! sets. The admin side (metrics, readiness, admin endpoints; see
//! [`crate::admin`]) runs on a thread of its own and only reads those.
//! Once everything is bound and installed, sluice drops the capabilities it
//! no longer needs, before any other thread starts.
//!
//! Stopping (SIGTERM or SIGINT): the workers refuse new connections with a
//! reset (the interception stays in place, so none reaches the workload
//! around sluice) while those in flight go on, for up to `--drain-timeout`.
//! What is still open then, or at a second signal, is reset on both sides:
//! sluice never ends with a FIN a stream whose FIN it did not see. Then the
//! interception is removed (if sluice installed it) and sluice exits 0.
//! A worker that panics or dies takes the process down, non-zero, after the
//! same clean-up: a process that looks alive but forwards nothing is worse
//! than one the orchestrator restarts.

mod connection;
mod control;
mod options;
mod worker;

use std::io;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::admin;
use crate::config::{Forwarder, Mode, Policy};
use crate::forward;
use crate::intercept::{self, ebpf, Installed, Plan};
use crate::lifecycle::Phase;
use crate::linux;
use crate::listener::{self, Listeners};
use crate::privileges;
use crate::stats::WorkerStats;
use crate::upstream;
pub use options::RunOptions;
pub use worker::PANIC_AFTER_ENV;
use worker::{Settings, Worker};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Listen(#[from] listener::Error),
    #[error("installing the interception rules")]
    Intercept(#[from] intercept::Error),
    #[error("attaching the eBPF program")]
    Ebpf(#[source] ebpf::Error),
    #[error("cannot start a worker thread")]
    Worker(#[source] io::Error),
    #[error(
        "cannot start an io_uring runtime: is io_uring disabled (sysctl kernel.io_uring_disabled), \
         the kernel older than 5.11, or io_uring refused by a container's seccomp profile? The \
         default profiles of Docker, podman and containerd (Kubernetes' RuntimeDefault) refuse \
         io_uring_setup, io_uring_enter and io_uring_register: run sluice with a profile that \
         allows them (deploy/sluice-tproxy.yaml says how)"
    )]
    IoUring(#[source] io::Error),
    #[error("a worker cannot set up the forwarder's per-thread state (for sockmap: its ring buffer of events)")]
    ForwarderWorker(#[source] io::Error),
    #[error(
        "--upstream-ports {low}-{high} is not inside this namespace's net.ipv4.ip_local_port_range ({pod_low}-{pod_high}): \
         the kernel picks sluice's ports from that range and only narrows it; choose a range inside it, or widen the sysctl"
    )]
    UpstreamPorts {
        low: u16,
        high: u16,
        pod_low: u16,
        pod_high: u16,
    },
    #[error("cannot read net.ipv4.ip_local_port_range")]
    PortRange(#[source] io::Error),
    #[error("cannot wait for SIGINT/SIGTERM")]
    Signals(#[source] io::Error),
    #[error(
        "ebpf mode needs an IPv6 listening socket, and this kernel has no IPv6: use --mode tproxy"
    )]
    NoIpv6Listener,
    #[error("a worker thread {0}; sluice stops so that it can be restarted (see the log above)")]
    WorkerDied(&'static str),
    #[error(transparent)]
    Admin(#[from] admin::Error),
    #[error("dropping capabilities")]
    Privileges(#[from] privileges::Error),
}

/// Descriptors kept aside from `--max-connections`' default: listeners,
/// rings, netlink and BPF objects, log output.
const RESERVED_FDS: u64 = 64;

/// Runs until SIGINT or SIGTERM and a drain. Rules installed here are
/// removed on the way out, also when start-up fails half-way.
pub fn run(options: RunOptions) -> Result<(), Error> {
    let signals = control::block_signals()?;
    control::install_panic_hook();
    check_upstream_ports(options.upstream_source)?;
    // First, so a port in use fails start-up before anything is installed.
    let admin_listeners = admin::Listeners::bind(&options.admin)?;
    let config = options.effective_config();

    let max_connections = max_connections(&options);
    let policy = options.policy;
    let ipv6 = linux::ipv6_enabled();
    let mut listeners = Listeners::bind(
        policy.mode,
        policy.proxy_port,
        policy.listener_mark(),
        options.workers,
    )?;
    // Dropped on the way out: takes away what this install added, and only
    // that (rules an earlier `rules install` made stay).
    let _rules = if options.install_rules && policy.mode != Mode::Ebpf {
        let installed = Plan::for_families(&policy, ipv6).install()?;
        if installed.is_empty() {
            info!("interception rules already installed; they stay at exit");
        } else {
            info!("interception rules installed");
        }
        Some(installed)
    } else {
        None
    };
    // Declared after the listeners, so dropped before them: no window where
    // the program steers SYNs to closed sockets.
    let program = match policy.mode {
        Mode::Ebpf => Some(AttachedProgram::attach(
            &policy,
            ipv6,
            &listeners,
            options.pin.as_deref(),
        )?),
        _ => None,
    };

    // Once for all workers, before the capabilities go: the sockmap
    // forwarder's program, maps and each worker's ring buffer.
    let forwarding =
        forward::Forwarding::new(options.forwarder, options.sockmap_after, options.workers);
    drop_capabilities(policy.mode)?;
    let settings = Arc::new(Settings {
        mode: policy.mode,
        proxy_port: policy.proxy_port,
        forwarding: forwarding.clone(),
        connect_timeout: options.connect_timeout,
        mark: policy.mark,
        upstream_source: options.upstream_source,
        idle_timeout: (!options.idle_timeout.is_zero()).then_some(options.idle_timeout),
        max_connections: (max_connections as usize).div_ceil(options.workers),
        panic_after: worker::panic_after_from_env(),
    });
    let (phase, phase_rx) = watch::channel(Phase::Serving);
    let (exits_tx, exits) = mpsc::channel();
    let (started_tx, started_rx) = mpsc::channel();
    let stats: Vec<Arc<WorkerStats>> = (0..options.workers).map(|_| Arc::default()).collect();
    let expected = match &program {
        Some(program) => admin::Expected::Ebpf {
            wanted: ebpf::EbpfPolicy::from_policy(&policy),
            interceptor: Arc::downgrade(&program.interceptor),
        },
        None => admin::Expected::Rules(Plan::for_families(&policy, ipv6)),
    };
    let shared = Arc::new(admin::Shared::new(
        stats.clone(),
        phase_rx.clone(),
        policy.mode,
        forwarding.forwarder(),
        config,
        expected,
        options.admin.log.clone(),
    ));
    admin::start(admin_listeners, shared.clone())?;
    for (index, worker_stats) in stats.iter().enumerate() {
        let listeners = listeners.take_one();
        let worker = Worker::new(settings.clone(), worker_stats.clone());
        let (started, phase, exit) = (started_tx.clone(), phase_rx.clone(), exits_tx.clone());
        std::thread::Builder::new()
            .name(format!("sluice-worker-{index}"))
            .spawn(move || {
                let _exit = control::ExitNotice(exit);
                worker.run(listeners, phase, started);
            })
            .map_err(Error::Worker)?;
    }
    for _ in 0..options.workers {
        match started_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(error),
            Err(_) => return Err(Error::WorkerDied("died at start")),
        }
    }
    shared.workers_running.store(true, Ordering::SeqCst);
    info!(
        mode = %policy.mode,
        forward = ?forwarding.forwarder(),
        port = policy.proxy_port,
        workers = options.workers,
        families = if ipv6 { "v4,v6" } else { "v4 (IPv6 disabled here)" },
        upstream_source = ?options.upstream_source,
        max_connections,
        rules = options.install_rules,
        "sluice ready"
    );

    let control = control::Control {
        signals,
        phase,
        exits,
        stats,
    };
    let signal = control.serve()?;
    control.drain(signal, options.drain_timeout)
}

/// Keeps only the capabilities the rest of the run needs, and sets
/// `no_new_privs`. Binding the transparent listeners, installing the rules,
/// loading the BPF programs and making every BPF object (the sockmap
/// forwarder's ring buffers among them) are done by now; what is left uses
/// BPF objects through the descriptors sluice holds, which needs no
/// capability (Linux 5.19 and later, also with
/// kernel.unprivileged_bpf_disabled set).
fn drop_capabilities(mode: Mode) -> Result<(), Error> {
    use caps::Capability;
    // NET_ADMIN: each upstream socket's IP_TRANSPARENT and SO_MARK; readiness
    // reads the rules (iptables-save) and the routes; --install-rules removes
    // them at exit; ebpf mode removes ::6 from lo and its policy route.
    let mut keep = vec![Capability::CAP_NET_ADMIN];
    if matches!(mode, Mode::Tproxy | Mode::Redirect) {
        // iptables-legacy reads the rules through a raw socket.
        keep.push(Capability::CAP_NET_RAW);
    }
    let kept = privileges::keep_only(&keep)?;
    let mut names: Vec<String> = kept.iter().map(ToString::to_string).collect();
    names.sort();
    info!(kept = ?names, "capabilities dropped; no_new_privs set");
    Ok(())
}

/// `--max-connections`, or what the descriptor limit holds once raised.
fn max_connections(options: &RunOptions) -> u32 {
    let limit = match linux::raise_nofile_limit() {
        Ok(limit) => {
            info!(
                soft_before = limit.soft_before,
                soft = limit.soft,
                hard = limit.hard,
                "descriptor limit (RLIMIT_NOFILE)"
            );
            limit.soft
        }
        Err(error) => {
            warn!(%error, "cannot read or raise the descriptor limit; assuming 1024");
            1024
        }
    };
    if let Some(max) = options.max_connections {
        return max;
    }
    // Each connection holds two sockets. splice's pipes are held only while
    // bytes move (an idle connection has none), so they are kept aside per
    // worker rather than per connection: the pool's idle pipes and as many
    // again in use.
    let pipes = match options.forwarder {
        Forwarder::Splice => 4 * crate::forward::splice::POOL_LIMIT as u64,
        Forwarder::Copy | Forwarder::Sockmap => 0,
    };
    // The admin side's connections are capped, and kept apart here, so that
    // a flood of them cannot take the data path's descriptors.
    let reserved = RESERVED_FDS + admin::MAX_DESCRIPTORS + (8 + pipes) * options.workers as u64;
    let max = limit.saturating_sub(reserved) / 2;
    u32::try_from(max).unwrap_or(u32::MAX).max(1)
}

/// The sk_lookup program of `--mode ebpf`, attached for sluice's lifetime
/// (unless pinned), with the routing its upstream connections need (the
/// `::6` bypass source and the policy route of the mark, see
/// `linux::bypass_socket`), which no rules install in this mode.
struct AttachedProgram {
    /// Shared with readiness, which reads the program back through it; the
    /// run keeps the only strong reference, so the program goes with it.
    interceptor: Arc<ebpf::Interceptor>,
    _routing: Option<Installed>,
}

impl AttachedProgram {
    fn attach(
        policy: &Policy,
        ipv6: bool,
        listeners: &Listeners,
        pin: Option<&Path>,
    ) -> Result<AttachedProgram, Error> {
        // Any member of each reuseport group: the kernel picks within it.
        let v4 = listeners
            .v4
            .first()
            .ok_or_else(|| Error::Worker(io::Error::other("no IPv4 listener")))?;
        let v6 = listeners.v6.first().ok_or(Error::NoIpv6Listener)?;
        let routing = Plan::for_families(policy, ipv6).install()?;
        let wanted = ebpf::EbpfPolicy::from_policy(policy);
        let (v4, v6) = (v4.as_fd(), v6.as_fd());
        let attached = match pin {
            Some(dir) => ebpf::Interceptor::attach_pinned(&wanted, v4, v6, dir),
            None => ebpf::Interceptor::attach(&wanted, v4, v6),
        };
        let interceptor = attached.map_err(Error::Ebpf)?;
        info!(link = interceptor.link_id(), pinned = ?pin, "sk_lookup program attached");
        Ok(AttachedProgram {
            interceptor: Arc::new(interceptor),
            // A pinned program outlives sluice, and so must its routing.
            _routing: if pin.is_some() {
                routing.keep();
                None
            } else {
                Some(routing)
            },
        })
    }
}

/// `--upstream-ports` narrows the namespace's range (`IP_LOCAL_PORT_RANGE`),
/// and the kernel silently ignores a bound outside it: refuse such a range
/// at start rather than connect from ports the user did not ask for.
fn check_upstream_ports(source: upstream::Source) -> Result<(), Error> {
    let upstream::Source::Client {
        ports: Some((low, high)),
    } = source
    else {
        return Ok(());
    };
    let (pod_low, pod_high) = linux::local_port_range().map_err(Error::PortRange)?;
    if low < pod_low || high > pod_high {
        return Err(Error::UpstreamPorts {
            low,
            high,
            pod_low,
            pod_high,
        });
    }
    Ok(())
}

/// One worker per core unless told otherwise.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}
