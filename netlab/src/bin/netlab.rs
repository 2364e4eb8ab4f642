//! `netlab up|down|exec`: the standard inbound topology (client ⇄ veth ⇄ pod)
//! built and kept for a person to poke at by hand.

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitCode};

use clap::{Parser, Subcommand, ValueEnum};
use netlab::{ClientPod, Netns};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

#[derive(Parser)]
#[command(name = "netlab", about = "sluice's network-namespace lab")]
struct Cli {
    /// Topology name: namespaces are sl-<name>-client and sl-<name>-pod.
    #[arg(long, default_value = "lab", global = true)]
    name: String,
    #[command(subcommand)]
    command: Action,
}

#[derive(Subcommand)]
enum Action {
    /// Build the client ⇄ pod topology and keep it after exit.
    Up,
    /// Remove the topology.
    Down,
    /// Run a command inside one of the namespaces: `netlab exec pod -- sluice run`.
    Exec {
        side: Side,
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Side {
    Client,
    Pod,
}

fn names(name: &str) -> [String; 2] {
    [format!("sl-{name}-client"), format!("sl-{name}-pod")]
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let [client, pod] = names(&cli.name);
    let result = match cli.command {
        Action::Up => up(&client, &pod),
        Action::Down => down(&[client, pod]),
        Action::Exec { side, command } => {
            let ns = match side {
                Side::Client => client,
                Side::Pod => pod,
            };
            return exec(&ns, &command);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("netlab: {error}");
            ExitCode::FAILURE
        }
    }
}

fn up(client: &str, pod: &str) -> netlab::Result<()> {
    let topology = ClientPod::wire(Netns::with_name(client)?, Netns::with_name(pod)?)?;
    let ClientPod { client, pod } = topology;
    let (client, pod) = (client.persist(), pod.persist());
    println!(
        "{client}: {}/{} and {}/{} on {}",
        ClientPod::CLIENT_V4,
        ClientPod::V4_PREFIX,
        ClientPod::CLIENT_V6,
        ClientPod::V6_PREFIX,
        ClientPod::CLIENT_IF
    );
    println!(
        "{pod}: {}/{} and {}/{} on {}",
        ClientPod::POD_V4,
        ClientPod::V4_PREFIX,
        ClientPod::POD_V6,
        ClientPod::V6_PREFIX,
        ClientPod::POD_IF
    );
    println!("try: netlab exec pod -- sluice run --ports 9080 --install-rules");
    Ok(())
}

fn down(names: &[String]) -> netlab::Result<()> {
    for name in names {
        match Netns::open(name) {
            Ok(ns) => drop(ns),
            Err(error) => eprintln!("netlab: {name}: {error} (already down?)"),
        }
    }
    Ok(())
}

fn exec(ns: &str, command: &[String]) -> ExitCode {
    let ns = match Netns::open(ns) {
        Ok(ns) => ns,
        Err(error) => {
            eprintln!("netlab: {error}; run `netlab up` first");
            return ExitCode::FAILURE;
        }
    };
    // Ctrl-C reaches the whole process group. netlab must outlive it: its
    // child dies with it (PR_SET_PDEATHSIG), and a `sluice run` needs the
    // time to remove its rules. A handler, not SIG_IGN, so the child still
    // gets the default disposition after exec.
    extern "C" fn ignore(_: nix::libc::c_int) {}
    let action = SigAction::new(
        SigHandler::Handler(ignore),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: the handler does nothing, so it is async-signal-safe.
    if let Err(error) = unsafe { sigaction(Signal::SIGINT, &action) } {
        eprintln!("netlab: cannot handle SIGINT: {error}");
    }
    let mut child = Command::new(&command[0]);
    child.args(&command[1..]);
    let status = ns.spawn(&mut child).and_then(|mut process| {
        process
            .child_mut()
            .wait()
            .map_err(|source| netlab::Error::Os {
                op: "waiting for the command".into(),
                source,
            })
    });
    // The namespace belongs to `netlab up`, not to this command.
    ns.persist();
    match status {
        Ok(status) => ExitCode::from(
            status
                .code()
                .or(status.signal().map(|s| 128 + s))
                .unwrap_or(1) as u8,
        ),
        Err(error) => {
            eprintln!("netlab: {error}");
            ExitCode::FAILURE
        }
    }
}
