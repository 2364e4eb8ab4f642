use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use sluice::config::{Cli, Command, Mode, RulesAction, UpstreamSource};
use sluice::intercept::ebpf;
use sluice::intercept::Plan;
use sluice::server::{self, RunOptions};
use sluice::upstream;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_max_level(cli.log_level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match execute(cli.command) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("sluice: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn execute(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Rules { action } => rules(action),
        Command::Run(args) => {
            let policy = args.policy.validate()?;
            let workers = args
                .workers
                .map_or_else(server::default_workers, usize::from);
            server::run(RunOptions {
                policy,
                pin: args.pin,
                forwarder: args.forward,
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
            })
            .context("sluice run")?;
            Ok(ExitCode::SUCCESS)
        }
    }
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
                plan.install()
                    .context("installing the interception rules")?;
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
