use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use sluice::config::{Cli, Command, RulesAction};
use sluice::intercept::Plan;
use sluice::server::{self, RunOptions};

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
                forwarder: args.forward,
                install_rules: args.install_rules,
                workers,
            })
            .context("sluice run")?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn rules(action: RulesAction) -> anyhow::Result<ExitCode> {
    match action {
        RulesAction::Install { policy, dry_run } => {
            let plan = Plan::new(&policy.validate()?);
            if dry_run {
                print!("{}", plan.dry_run());
            } else {
                plan.install()
                    .context("installing the interception rules")?;
                println!("installed");
            }
        }
        RulesAction::Remove { policy } => {
            let plan = Plan::new(&policy.validate()?);
            plan.remove().context("removing the interception rules")?;
            println!("removed");
        }
        RulesAction::Show { policy } => {
            let plan = Plan::new(&policy.validate()?);
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
