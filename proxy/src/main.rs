use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use sluice::admin::{AdminOptions, LogControl};
use sluice::config::{
    Cli, Command, IstioCli, LogFormat, Mode, RulesAction, RunArgs, UpstreamSource,
};
use sluice::intercept::ebpf;
use sluice::intercept::Plan;
use sluice::server::{self, RunOptions};
use sluice::upstream;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer};

fn main() -> ExitCode {
    // Istio's init container runs `istio-iptables` (or `pilot-agent
    // istio-iptables`): a link or copy of sluice by that name takes its flags.
    let invoked_as = std::env::args_os()
        .next()
        .map(std::path::PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    if invoked_as.as_deref() == Some("istio-iptables") {
        return istio_iptables(IstioCli::parse().args);
    }
    let cli = Cli::parse();
    if let Command::IstioIptables(args) = cli.command {
        return istio_iptables(*args);
    }
    let log = match init_logging(cli.log_level.as_deref(), cli.log_format) {
        Ok(log) => log,
        Err(error) => {
            eprintln!("sluice: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    match execute(cli.command, log) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("sluice: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr, as text or one JSON object a line, filtered by
/// `--log-level`, else RUST_LOG, else info. The filter sits behind a reload
/// layer so `POST /logging` can change it while sluice runs.
fn init_logging(level: Option<&str>, format: LogFormat) -> anyhow::Result<LogControl> {
    let filter = match level {
        Some(level) => EnvFilter::builder().parse(level)?,
        None => EnvFilter::builder()
            .with_default_directive(tracing::Level::INFO.into())
            .from_env()
            .context("RUST_LOG is not a valid log filter")?,
    };
    let (filter, handle) = reload::Layer::new(filter);
    let output = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_current_span(false)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .try_init()
        .context("cannot set up logging")?;
    Ok(Arc::new(move |level: &str| {
        let filter = EnvFilter::builder()
            .parse(level)
            .map_err(|e| format!("'{level}' is not a log level or filter: {e}"))?;
        let shown = filter.to_string();
        handle
            .reload(filter)
            .map_err(|e| format!("cannot change the log filter: {e}"))?;
        Ok(shown)
    }))
}

/// `sluice istio-iptables`: Istio's flags and env vars, resolved; the log
/// set by Istio's logging flags; the capture installed.
fn istio_iptables(args: sluice::istio::IstioArgs) -> ExitCode {
    let env = |name: &str| std::env::var(name).ok();
    let outcome = args
        .resolve(&env)
        .map_err(anyhow::Error::from)
        .and_then(|resolved| {
            let format = if resolved.log_json {
                LogFormat::Json
            } else {
                LogFormat::Text
            };
            init_logging(resolved.log_level.as_deref(), format)?;
            sluice::privileges::activate()
                .context("raising the capabilities sluice is permitted")?;
            // The error line says "sluice istio-iptables:" already.
            sluice::istio::execute(&resolved).map_err(anyhow::Error::from)
        });
    match outcome {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("sluice istio-iptables: {error:#}");
            let validation = error
                .downcast_ref::<sluice::istio::Error>()
                .is_some_and(|e| matches!(e, sluice::istio::Error::Validation(_)));
            if validation {
                ExitCode::from(sluice::istio::validation::FAILED)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn execute(command: Command, log: LogControl) -> anyhow::Result<ExitCode> {
    // Before anything that needs them; a non-root sluice may start with its
    // capabilities permitted only (file capabilities).
    sluice::privileges::activate().context("raising the capabilities sluice is permitted")?;
    match command {
        Command::Rules { action } => rules(action),
        Command::IstioIptables(_) => unreachable!("dispatched in main, before logging is set up"),
        Command::Run(args) => {
            let dry_run = args.dry_run;
            let options = run_options(args, log)?;
            if dry_run {
                // What would run, checked and defaulted; nothing is touched.
                let config = options.effective_config();
                println!("{}", serde_json::to_string_pretty(&config)?);
                return Ok(ExitCode::SUCCESS);
            }
            server::run(options).context("sluice run")?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn run_options(args: RunArgs, log: LogControl) -> anyhow::Result<RunOptions> {
    let policy = args.policy.validate()?;
    let workers = args
        .workers
        .map_or_else(server::default_workers, usize::from);
    Ok(RunOptions {
        policy,
        pin: args.pin,
        forwarder: args.forward,
        sockmap_after: args.sockmap_after,
        install_rules: args.install_rules,
        workers,
        connect_timeout: args.connect_timeout,
        idle_timeout: args.idle_timeout,
        drain_timeout: args.drain_timeout,
        max_connections: args.max_connections,
        upstream_source: match args.upstream_source {
            UpstreamSource::Client => upstream::Source::Client {
                ports: args.upstream_ports,
            },
            UpstreamSource::Bypass => upstream::Source::Bypass,
        },
        admin: AdminOptions {
            metrics: args.metrics_addr.0,
            readiness: args.readiness_addr.0,
            admin: args.admin_addr.0,
            log: Some(log),
        },
    })
}
fn rules(action: RulesAction) -> anyhow::Result<ExitCode> {
    match action {
        RulesAction::Install { policy, dry_run } => {
            let policy = policy.validate()?;
            if policy.mode == Mode::Ebpf {
                if !dry_run {
                    anyhow::bail!(
                        "the eBPF program needs sluice's listening sockets, so `sluice run --mode ebpf` \
                         attaches it (add --pin DIR to keep it after exit)"
                    );
                }
                println!(
                    "# sk_lookup program, attached by `sluice run --mode ebpf`, with this policy:"
                );
                println!("{}", ebpf::EbpfPolicy::from_policy(&policy));
            }
            let plan = Plan::new(&policy);
            if dry_run {
                print!("{}", plan.dry_run());
            } else {
                // It outlives this process: `rules remove` takes it away.
                plan.install()
                    .context("installing the interception rules")?
                    .keep();
                println!("installed");
            }
        }
        RulesAction::Remove { policy, pin } => {
            let plan = Plan::new(&policy.validate()?);
            if let Some(dir) = pin {
                ebpf::remove_pinned(&dir).context("removing the pinned eBPF program")?;
            }
            plan.remove().context("removing the interception rules")?;
            println!("removed");
        }
        RulesAction::Show { policy } => {
            let policy = policy.validate()?;
            if policy.mode == Mode::Ebpf {
                print!(
                    "{}",
                    ebpf::show().context("reading the attached eBPF programs")?
                );
                let wanted = ebpf::EbpfPolicy::from_policy(&policy);
                let attached = ebpf::installed().context("reading the attached eBPF programs")?;
                if !attached
                    .iter()
                    .any(|program| program.policy.as_ref() == Some(&wanted))
                {
                    println!("status: no sluice program with the flags' policy is attached");
                    return Ok(ExitCode::from(3));
                }
                println!("status: attached, matches the flags");
                return Ok(ExitCode::SUCCESS);
            }
            let plan = Plan::new(&policy);
            let status = plan.show().context("reading the interception rules")?;
            print!("{status}");
            // Scripts can tell "installed as asked" from the rest.
            if !status.matches() {
                return Ok(ExitCode::from(3));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
