//! Scenarios: what stands between the client and the workload, and how to
//! start and stop it inside the pod namespace.
//!
//! A scenario is a name and an [`Interceptor`]. The built-in ones are the
//! matrix of interception modes × forwarders, beside `direct` and HAProxy,
//! and the policy-size variants (CRR alone, with 1, 100 and 1,000 excluded
//! ports). Other sluice variants need no code: `--scenario NAME=ARGS` adds a
//! `sluice run ARGS` column.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use netlab::{Netns, Proc};
use serde::Serialize;

use crate::load::redis;
use crate::procstat;
use crate::profile::LoadKind;
use crate::workload::{Workload, ECHO};

/// The workload's port: the one every interceptor intercepts (and redis's,
/// [`redis::PORT`], where the redis load runs).
pub const PORT: u16 = 9080;
/// The interceptor's listening port (sluice's default).
pub const PROXY_PORT: u16 = 15006;
const READY_WITHIN: Duration = Duration::from_secs(20);
/// What sluice says once it forwards; the line names the forwarder in use.
const SLUICE_READY: &str = "sluice ready";

/// The sizes of the policy-size figure: ports given to `--exclude-ports`.
pub const POLICY_SIZES: [usize; 3] = [1, 100, 1000];
/// The first excluded port of the policy-size variants: no load connects to
/// a port from there on, so the exclusions only cost their lookup.
const FIRST_EXCLUDED: u16 = 20000;

#[derive(Debug, Clone, Serialize)]
pub struct Scenario {
    pub name: String,
    pub interceptor: Interceptor,
    /// The only loads this scenario runs (None: all of the profile's).
    pub only: Option<Vec<LoadKind>>,
    /// A policy-size variant: how many ports it gives `--exclude-ports`.
    pub excluded_ports: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Interceptor {
    /// No interception: the physical limit.
    None,
    /// `sluice run ARGS --ports 9080[,6379] --install-rules --workers <cores>`.
    Sluice { args: Vec<String> },
    /// HAProxy in transparent mode behind sluice's TPROXY rules (installed
    /// with `sluice rules install`): an existing proxy on the same
    /// interception, so the difference is the proxy alone.
    Haproxy,
    /// An Istio pod's inbound capture in `-m TPROXY`, with sluice as its
    /// mesh proxy on 15006 (mark 1337, table 133, as Envoy): the same
    /// proxy behind either capture, so the difference is the rules alone.
    Istio { rules: IstioRules },
}

/// Whose rules capture an Istio pod's traffic (the injector's arguments
/// with `-m TPROXY -b <ports>`, outbound capture on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IstioRules {
    /// Istio's own rule text ([`istio_tproxy_rules`]).
    Istio,
    /// `sluice istio-iptables`: sluice's recipe, no conntrack entry.
    Sluice,
}

impl Scenario {
    fn new(name: &str, interceptor: Interceptor) -> Scenario {
        Scenario {
            name: name.into(),
            interceptor,
            only: None,
            excluded_ports: None,
        }
    }

    fn sluice(name: &str, args: &[&str]) -> Scenario {
        let args = args.iter().map(|a| a.to_string()).collect();
        Scenario::new(name, Interceptor::Sluice { args })
    }

    /// `mode` with `excluded` ports from [`FIRST_EXCLUDED`] on, each its own
    /// entry (no ranges: tproxy renders each as one RETURN rule, which is
    /// the cost being measured), running CRR alone.
    fn policy_size(mode: &str, excluded: usize) -> Scenario {
        let ports: Vec<String> = (0..excluded)
            .map(|i| (usize::from(FIRST_EXCLUDED) + i).to_string())
            .collect();
        let mut scenario = Scenario::sluice(
            &format!("{mode}-excl{excluded}"),
            &["--mode", mode, "--exclude-ports", &ports.join(",")],
        );
        scenario.only = Some(vec![LoadKind::Crr]);
        scenario.excluded_ports = Some(excluded);
        scenario
    }

    /// Every built-in scenario, in report order; all run when `--scenarios`
    /// is not given. The modes × forwarders matrix first, then the
    /// policy-size variants.
    pub fn builtin() -> Vec<Scenario> {
        let mut all = vec![
            Scenario::new("direct", Interceptor::None),
            Scenario::sluice("redirect", &["--mode", "redirect"]),
        ];
        for mode in ["tproxy", "ebpf"] {
            // copy keeps the bare mode's name (the results before the
            // forwarder dimension called it so).
            all.push(Scenario::sluice(mode, &["--mode", mode]));
            for forward in ["splice", "sockmap"] {
                all.push(Scenario::sluice(
                    &format!("{mode}-{forward}"),
                    &["--mode", mode, "--forward", forward],
                ));
            }
            if mode == "tproxy" {
                // The connection to the workload from 127.0.0.6 instead of
                // the client's address (the default): beside `tproxy`, the
                // cost of preserving the address.
                all.push(Scenario::sluice(
                    "tproxy-bypass",
                    &["--mode", mode, "--upstream-source", "bypass"],
                ));
            }
        }
        all.push(Scenario::new("haproxy", Interceptor::Haproxy));
        for (name, rules) in [
            ("istio-tproxy", IstioRules::Istio),
            ("istio-sluice", IstioRules::Sluice),
        ] {
            all.push(Scenario::new(name, Interceptor::Istio { rules }));
        }
        for mode in ["tproxy", "ebpf"] {
            for excluded in POLICY_SIZES {
                all.push(Scenario::policy_size(mode, excluded));
            }
        }
        all
    }

    /// Whether this scenario takes part in `load`.
    pub fn runs(&self, load: LoadKind) -> bool {
        self.only.as_ref().is_none_or(|only| only.contains(&load))
    }

    /// The interception mode: sluice's `--mode` (tproxy when not given);
    /// HAProxy sits behind sluice's tproxy rules; None for `direct`.
    pub fn mode(&self) -> Option<String> {
        match &self.interceptor {
            Interceptor::None => None,
            Interceptor::Sluice { args } => {
                Some(flag_value(args, "--mode").unwrap_or_else(|| "tproxy".into()))
            }
            Interceptor::Haproxy | Interceptor::Istio { .. } => Some("tproxy".into()),
        }
    }

    /// What moves the bytes: sluice's `--forward` (copy when not given),
    /// `haproxy`, or None for `direct`.
    pub fn forwarder(&self) -> Option<String> {
        match &self.interceptor {
            Interceptor::None => None,
            Interceptor::Sluice { args } => {
                Some(flag_value(args, "--forward").unwrap_or_else(|| "copy".into()))
            }
            Interceptor::Haproxy => Some("haproxy".into()),
            Interceptor::Istio { .. } => Some("copy".into()),
        }
    }

    /// `NAME=ARGS`: a sluice scenario with these `sluice run` arguments.
    pub fn parse_custom(spec: &str) -> Result<Scenario> {
        let (name, args) = spec
            .split_once('=')
            .ok_or_else(|| anyhow!("--scenario {spec:?}: expected NAME=SLUICE-RUN-ARGS"))?;
        let valid = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if name.is_empty() || !name.chars().all(valid) {
            bail!("--scenario {spec:?}: the name must be made of [A-Za-z0-9_-]");
        }
        let args = args.split_whitespace().map(str::to_string).collect();
        Ok(Scenario::new(name, Interceptor::Sluice { args }))
    }

    pub fn is_direct(&self) -> bool {
        self.interceptor == Interceptor::None
    }

    /// Whether a redis-server runs beside the workload: when this run has
    /// redis and the scenario takes part in its load.
    pub fn has_redis(&self, tools: &Tools) -> bool {
        tools.redis.is_some() && self.runs(LoadKind::Redis)
    }

    /// The ports its interceptor intercepts: the workload's, and redis's
    /// when it runs. Only then: the other figures stay those of a
    /// one-port policy, as in runs (and baselines) without redis.
    pub fn ports(&self, tools: &Tools) -> String {
        if self.has_redis(tools) {
            format!("{PORT},{}", redis::PORT)
        } else {
            PORT.to_string()
        }
    }
}

/// The last value of `--flag VALUE` or `--flag=VALUE` in `args`, as sluice's
/// parser (clap) takes it: a later flag wins.
fn flag_value(args: &[String], flag: &str) -> Option<String> {
    let mut value = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if arg == flag {
            value = args.next().cloned();
        } else if let Some(v) = arg.strip_prefix(flag).and_then(|r| r.strip_prefix('=')) {
            value = Some(v.to_string());
        }
    }
    value
}

/// The forwarder a sluice ready line names (`forward=Sockmap`), lower case:
/// what actually runs, after any fallback.
pub fn forwarder_in_use(ready_line: &str) -> Option<String> {
    let value = ready_line.split("forward=").nth(1)?;
    let word: String = value
        .chars()
        .take_while(char::is_ascii_alphanumeric)
        .collect();
    (!word.is_empty()).then(|| word.to_lowercase())
}

/// What the runner needs to start interceptors.
pub struct Tools {
    pub sluice: PathBuf,
    /// None when HAProxy is not installed.
    pub haproxy: Option<PathBuf>,
    pub workers: usize,
    /// Connections the interceptor must accept at once (HAProxy's maxconn).
    pub max_connections: usize,
    /// perf, for the interceptors' syscall counts (None: not installed).
    pub perf: Option<PathBuf>,
    /// valgrind, for sluice's instructions per connection (None: not
    /// installed).
    pub callgrind: Option<crate::callgrind::Callgrind>,
    pub scratch: PathBuf,
    pub patience: Patience,
    /// redis-server and redis-benchmark, when the run has the redis load.
    pub redis: Option<redis::Programs>,
}

/// The run's budget for waiting on a busy machine and repeating disturbed
/// loads.
#[derive(Debug)]
pub struct Patience {
    left_ms: std::sync::atomic::AtomicU64,
}

impl Patience {
    pub fn new(budget: Duration) -> Patience {
        let ms = u64::try_from(budget.as_millis()).unwrap_or(u64::MAX);
        Patience { left_ms: ms.into() }
    }

    pub fn left(&self) -> Duration {
        Duration::from_millis(self.left_ms.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// Takes `spent` from the budget; false when nothing is left.
    pub fn spend(&self, spent: Duration) -> bool {
        let ms = u64::try_from(spent.as_millis()).unwrap_or(u64::MAX);
        let left = self
            .left_ms
            .load(std::sync::atomic::Ordering::SeqCst)
            .saturating_sub(ms);
        self.left_ms
            .store(left, std::sync::atomic::Ordering::SeqCst);
        left > 0
    }
}

/// Finds `name` in PATH (and the sbin directories, where Debian puts
/// haproxy and which a non-login root shell may lack).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// A running interceptor. Dropping it stops it (netlab's [`Proc`]).
pub struct Proxy {
    process: Option<Proc>,
    log: Arc<Mutex<Log>>,
    pub command: String,
    /// The configuration file's text, for interceptors that have one.
    pub config: Option<String>,
    cleanup: Vec<PathBuf>,
}

/// What an interceptor printed: counts of warnings and errors, the first
/// problems in full and the last lines, so a long run's log stays small.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Log {
    pub lines: u64,
    pub warnings: u64,
    pub errors: u64,
    pub first_problems: Vec<String>,
    pub tail: VecDeque<String>,
    /// sluice's ready line (it names the forwarder in use).
    pub ready: Option<String>,
    /// Lines saying connections were forwarded with copy instead of the
    /// forwarder asked for (sluice's sockmap fallbacks), the first few.
    pub fallbacks: Vec<String>,
}

const KEEP_PROBLEMS: usize = 20;
const KEEP_TAIL: usize = 30;
const KEEP_FALLBACKS: usize = 5;

impl Log {
    fn push(&mut self, line: String) {
        self.lines += 1;
        // sluice (tracing): " WARN ", " ERROR "; HAProxy: [WARNING], [ALERT].
        let warning = line.contains("WARN");
        let error = line.contains("ERROR") || line.contains("ALERT");
        self.warnings += u64::from(warning);
        self.errors += u64::from(error);
        if (warning || error) && self.first_problems.len() < KEEP_PROBLEMS {
            self.first_problems.push(line.clone());
        }
        if self.ready.is_none() && line.contains(SLUICE_READY) {
            self.ready = Some(line.clone());
        }
        // Both of sluice's fallback lines (the engine refused at start; a
        // connection the kernel would not join) say "with copy".
        if line.contains("with copy") && self.fallbacks.len() < KEEP_FALLBACKS {
            self.fallbacks.push(line.clone());
        }
        if self.tail.len() == KEEP_TAIL {
            self.tail.pop_front();
        }
        self.tail.push_back(line);
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Stopped {
    pub command: String,
    pub config: Option<String>,
    pub exit: String,
    pub log: Log,
}

impl Proxy {
    /// Starts the interceptor of `scenario` in `pod` and waits until it
    /// forwards a probe connection from `client` to `workload`.
    pub fn start(
        scenario: &Scenario,
        tools: &Tools,
        pod: &Netns,
        client: &Netns,
        workload: &Workload,
    ) -> Result<Option<Proxy>> {
        Proxy::start_under(&[], scenario, tools, pod, client, workload)
    }

    /// As [`Proxy::start`], with sluice's command line after `prefix`
    /// (e.g. valgrind's; the process stays the one whose pid is measured).
    pub fn start_under(
        prefix: &[String],
        scenario: &Scenario,
        tools: &Tools,
        pod: &Netns,
        client: &Netns,
        workload: &Workload,
    ) -> Result<Option<Proxy>> {
        let proxy = match &scenario.interceptor {
            Interceptor::None => None,
            Interceptor::Sluice { args } => {
                let ports = scenario.ports(tools);
                let rules = ["--ports", &ports, "--install-rules"].map(String::from);
                Some(start_sluice(
                    prefix,
                    &[&args[..], &rules].concat(),
                    tools,
                    pod,
                )?)
            }
            Interceptor::Haproxy => Some(start_haproxy(scenario, tools, pod)?),
            Interceptor::Istio { rules } => {
                let args = install_istio_capture(*rules, &scenario.ports(tools), tools, pod)?;
                Some(start_sluice(prefix, &args, tools, pod)?)
            }
        };
        let target = SocketAddr::from((netlab::ClientPod::POD_V4, PORT));
        if let Err(e) = probe(client, target, workload, proxy.is_some()) {
            let log = proxy
                .as_ref()
                .map(|p| p.log_text())
                .unwrap_or_else(|| "(no interceptor)".into());
            return Err(e.context(format!(
                "scenario {}: a probe connection did not go through; interceptor log:\n{log}",
                scenario.name
            )));
        }
        Ok(proxy)
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Proc::pid)
    }

    pub fn cpu_seconds(&self) -> Result<f64> {
        procstat::cpu_seconds(self.pid().ok_or_else(|| anyhow!("stopped"))?)
    }

    pub fn rss_kib(&self) -> Result<u64> {
        procstat::rss_kib(self.pid().ok_or_else(|| anyhow!("stopped"))?)
    }

    /// Fails when the process has exited (crashed) since it started.
    pub fn check_alive(&mut self) -> Result<()> {
        let Some(process) = self.process.as_mut() else {
            bail!("{} was stopped", self.command);
        };
        if let Some(status) = process.try_wait()? {
            // The last line that mentions an error usually says why; the
            // whole tail follows, once the reader has drained the pipe.
            std::thread::sleep(Duration::from_millis(100));
            let text = self.log_text();
            let mut lines = text.lines().rev().filter(|l| !l.trim().is_empty());
            let last = lines
                .clone()
                .find(|l| l.to_lowercase().contains("error"))
                .or_else(|| lines.next())
                .unwrap_or("");
            bail!(
                "{} exited during the run ({status}): {last}\nlog:\n{text}",
                self.command
            );
        }
        Ok(())
    }

    /// The forwarder sluice says it runs, once it is ready (None for
    /// other interceptors).
    pub fn forwarder_in_use(&self) -> Option<String> {
        lock(&self.log).ready.as_deref().and_then(forwarder_in_use)
    }

    fn log_text(&self) -> String {
        let log = lock(&self.log);
        log.tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    pub fn stop(mut self) -> Stopped {
        let exit = match self.process.take().map(Proc::stop) {
            Some(Ok(status)) => status.to_string(),
            Some(Err(e)) => format!("could not stop: {e}"),
            None => "already stopped".into(),
        };
        // The log reader ends with the process; give it a moment to drain.
        std::thread::sleep(Duration::from_millis(50));
        Stopped {
            command: self.command.clone(),
            config: self.config.clone(),
            exit,
            log: lock(&self.log).clone(),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        drop(self.process.take());
        for path in &self.cleanup {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn lock(log: &Mutex<Log>) -> std::sync::MutexGuard<'_, Log> {
    // A panicking reader thread leaves a usable log behind.
    log.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The command as the report shows it: the program's file name, not the
/// build machine's path to it, and long lists shortened (the policy-size
/// variants exclude 1,000 ports; results.json keeps them whole).
fn command_line(command: &Command) -> String {
    let program = Path::new(command.get_program());
    std::iter::once(program.file_name().unwrap_or(program.as_os_str()))
        .chain(command.get_args())
        .map(|a| shorten_list(&a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `a,b,c,…,z` as `a,b,…,z (N items)` when it has more than a few items.
fn shorten_list(arg: &str) -> String {
    let items: Vec<&str> = arg.split(',').collect();
    if items.len() <= 4 {
        return arg.to_string();
    }
    format!(
        "{},{},…,{} ({} items)",
        items[0],
        items[1],
        items[items.len() - 1],
        items.len()
    )
}

/// Spawns `command` in `pod` with its stderr (and stdout) collected into a
/// [`Log`]; `ready` is sent the first line containing `ready_line`.
fn spawn_logged(
    pod: &Netns,
    mut command: Command,
    ready_line: Option<&'static str>,
) -> Result<(Proxy, mpsc::Receiver<()>)> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let line = command_line(&command);
    let mut process = pod
        .spawn(&mut command)
        .with_context(|| format!("starting {line}"))?;
    let stderr = process
        .child_mut()
        .stderr
        .take()
        .ok_or_else(|| anyhow!("stderr of {line} is not piped"))?;
    let log = Arc::new(Mutex::new(Log::default()));
    let (ready_tx, ready_rx) = mpsc::channel();
    let lines = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let ready = ready_line.is_some_and(|r| line.contains(r));
            // Logged first, so whoever hears "ready" finds the line.
            lock(&lines).push(line);
            if ready {
                let _ = ready_tx.send(());
            }
        }
    });
    Ok((
        Proxy {
            process: Some(process),
            log,
            command: line,
            config: None,
            cleanup: Vec::new(),
        },
        ready_rx,
    ))
}

/// `sluice run ARGS --workers <cores>`, once it says it is ready.
fn start_sluice(prefix: &[String], args: &[String], tools: &Tools, pod: &Netns) -> Result<Proxy> {
    let mut command = match prefix.split_first() {
        Some((program, prefix)) => {
            let mut command = Command::new(program);
            command.args(prefix).arg(&tools.sluice);
            command
        }
        None => Command::new(&tools.sluice),
    };
    command
        .arg("run")
        .args(args)
        .args(["--workers", &tools.workers.to_string()]);
    let (mut proxy, ready) = spawn_logged(pod, command, Some(SLUICE_READY))?;
    let deadline = Instant::now() + READY_WITHIN;
    while Instant::now() < deadline {
        if ready.recv_timeout(Duration::from_millis(100)).is_ok() {
            return Ok(proxy);
        }
        proxy.check_alive()?;
    }
    bail!(
        "{} did not say \"sluice ready\" within {READY_WITHIN:?}; log:\n{}",
        proxy.command,
        proxy.log_text()
    )
}

/// Istio's mesh proxy settings (`-u`, `-t`, `-r`), which sluice takes as
/// its own policy's mark and table.
const ISTIO_MARK: &str = "1337";
const ISTIO_TABLE: &str = "133";

/// Installs an Istio pod's capture of `ports` in `pod` (again, for a
/// restart under callgrind: both ways are idempotent), and returns the
/// `sluice run` arguments of its mesh proxy: no rules of its own, Istio's
/// mark and table.
///
/// Behind Istio's rules, sluice connects to the workload from 127.0.0.6
/// (`--upstream-source bypass`, Istio's inbound passthrough source, which
/// those rules let through). Envoy's `original_src` would connect from the
/// client's address to the pod's, where sluice's client leg goes to
/// 127.0.0.6, whose replies need `tcp_fwmark_accept`, which Istio's rules
/// do not set. Either way the workload connection is a second tracked
/// connection: the conntrack figure is the rules'.
fn install_istio_capture(
    rules: IstioRules,
    ports: &str,
    tools: &Tools,
    pod: &Netns,
) -> Result<Vec<String>> {
    let mut args: Vec<String> = [
        "--mode",
        "tproxy",
        "--mark",
        ISTIO_MARK,
        "--table",
        ISTIO_TABLE,
    ]
    .map(String::from)
    .to_vec();
    match rules {
        IstioRules::Istio => {
            let file = tools
                .scratch
                .join(format!("sl-bench-istio-{}.rules", std::process::id()));
            std::fs::write(&file, istio_tproxy_rules(ports))
                .with_context(|| format!("writing {}", file.display()))?;
            let restored = pod
                .output(Command::new("iptables-restore").arg(&file))
                .context("iptables-restore of Istio's TPROXY rules")
                .and_then(succeeded);
            let _ = std::fs::remove_file(&file);
            restored?;
            let shown = pod
                .output(Command::new("ip").args(["rule", "show", "fwmark", ISTIO_MARK]))
                .context("ip rule show")?;
            if shown.stdout.is_empty() {
                let add = ["rule", "add", "fwmark", ISTIO_MARK, "lookup", ISTIO_TABLE];
                pod.output(Command::new("ip").args(add))
                    .context("ip rule add")
                    .and_then(succeeded)?;
            }
            let route = [
                "route",
                "replace",
                "local",
                "default",
                "dev",
                "lo",
                "table",
                ISTIO_TABLE,
            ];
            pod.output(Command::new("ip").args(route))
                .context("ip route replace")
                .and_then(succeeded)?;
            args.extend(["--upstream-source", "bypass"].map(String::from));
        }
        IstioRules::Sluice => {
            let mut install = Command::new(&tools.sluice);
            install
                .arg("istio-iptables")
                .args(istio_tproxy_arguments(ports));
            pod.output(&mut install)
                .context("sluice istio-iptables")
                .and_then(succeeded)?;
        }
    }
    Ok(args)
}

/// The injector's arguments with `-m TPROXY` and `-b ports`.
pub fn istio_tproxy_arguments(ports: &str) -> Vec<String> {
    let args = [
        "-p",
        "15001",
        "-z",
        "15006",
        "-u",
        ISTIO_MARK,
        "-m",
        "TPROXY",
        "-i",
        "*",
        "-x",
        "",
        "-b",
        ports,
        "-d",
        "15090,15021,15020",
    ];
    args.map(String::from).to_vec()
}

/// Istio's own rules for [`istio_tproxy_arguments`], IPv4, as its
/// istio-iptables writes them (tools/istio-iptables, the tproxy cases of
/// its golden tests): every inbound packet of a captured port goes through
/// conntrack (`--ctstate`), the mesh proxy's connections are marked by
/// CONNMARK, and the outbound capture's nat rules make the kernel track
/// every connection in the namespace.
pub fn istio_tproxy_rules(ports: &str) -> String {
    let mut inbound = String::new();
    for port in ports.split(',') {
        inbound += &format!(
            "-A ISTIO_INBOUND -p tcp --dport {port} -m conntrack --ctstate RELATED,ESTABLISHED \
             -j ISTIO_DIVERT\n-A ISTIO_INBOUND -p tcp --dport {port} -j ISTIO_TPROXY\n"
        );
    }
    format!(
        "*mangle
:ISTIO_DIVERT - [0:0]
:ISTIO_TPROXY - [0:0]
:ISTIO_INBOUND - [0:0]
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A PREROUTING -p tcp -m mark --mark 1337 -j CONNMARK --save-mark
-A OUTPUT -p tcp -o lo -m mark --mark 1337 -j RETURN
-A OUTPUT ! -d 127.0.0.1/32 -p tcp -o lo -m owner --uid-owner 1337 -j MARK --set-mark 1338
-A OUTPUT ! -d 127.0.0.1/32 -p tcp -o lo -m owner --gid-owner 1337 -j MARK --set-mark 1338
-A OUTPUT -p tcp -m connmark --mark 1337 -j CONNMARK --restore-mark
-A ISTIO_DIVERT -j MARK --set-mark 1337
-A ISTIO_DIVERT -j ACCEPT
-A ISTIO_TPROXY ! -d 127.0.0.1/32 -p tcp -j TPROXY --on-port 15006 --tproxy-mark 1337/0xffffffff
-A ISTIO_INBOUND -p tcp -m mark --mark 1337 -j RETURN
-A ISTIO_INBOUND -s 127.0.0.6/32 -i lo -p tcp -j RETURN
-A ISTIO_INBOUND -i lo -p tcp -m mark ! --mark 1338 -j RETURN
{inbound}COMMIT
*nat
:ISTIO_INBOUND - [0:0]
:ISTIO_REDIRECT - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
COMMIT
"
    )
}

/// A command's output when it succeeded; its stderr as the error if not.
fn succeeded(output: std::process::Output) -> Result<std::process::Output> {
    if output.status.success() {
        Ok(output)
    } else {
        bail!(
            "{}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )
    }
}

fn start_haproxy(scenario: &Scenario, tools: &Tools, pod: &Netns) -> Result<Proxy> {
    let haproxy = tools
        .haproxy
        .as_ref()
        .ok_or_else(|| anyhow!("haproxy is not installed (make bench-deps)"))?;
    let mut rules = Command::new(&tools.sluice);
    rules.args([
        "rules",
        "install",
        "--mode",
        "tproxy",
        "--ports",
        &scenario.ports(tools),
    ]);
    let line = command_line(&rules);
    let output = pod
        .output(&mut rules)
        .with_context(|| format!("running {line}"))?;
    if !output.status.success() {
        bail!(
            "{line} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    // The rules turn on tcp_fwmark_accept for sluice's client-source leg:
    // an accepted socket whose listener has no mark takes its SYN's, and a
    // TPROXY SYN carries the policy mark, so HAProxy's SYN-ACKs would be
    // routed into the policy table's local route and the handshake would
    // hang. sluice gives its listeners another mark; HAProxy 2.6 (Debian
    // 12's) cannot (`bind ... mark` is an unknown keyword, and `tcp-request
    // connection set-mark` comes after the handshake). HAProxy connects from
    // the bypass source and needs no tcp_fwmark_accept, so it goes off again:
    // the pod is then as the rules made it before the client-source change.
    pod.sysctl_set("net.ipv4.tcp_fwmark_accept", "0")
        .context("turning tcp_fwmark_accept off for HAProxy")?;
    let config = tools
        .scratch
        .join(format!("sl-bench-haproxy-{}.cfg", std::process::id()));
    let text = haproxy_config(
        tools.workers,
        tools.max_connections,
        scenario.has_redis(tools),
    );
    std::fs::write(&config, &text).with_context(|| format!("writing {}", config.display()))?;
    let mut command = Command::new(haproxy);
    command.arg("-db").arg("-f").arg(&config);
    let started = spawn_logged(pod, command, None);
    let (mut proxy, _) = match started {
        Ok(started) => started,
        Err(e) => {
            let _ = std::fs::remove_file(&config);
            return Err(e);
        }
    };
    // The file is a temporary; the report shows its text instead.
    proxy.command = "haproxy -db -f haproxy.cfg".into();
    proxy.cleanup.push(config);
    proxy.config = Some(text);
    // The readiness probe that follows is what says HAProxy is up; a
    // configuration error shows as an early exit.
    std::thread::sleep(Duration::from_millis(200));
    proxy.check_alive()?;
    Ok(proxy)
}

/// TCP mode, transparent bind on the TPROXY port, upstream from the bypass
/// source so sluice's rules let it through, as many threads as sluice has
/// workers. Timeouts far above any load's length: none may cut a held
/// connection. With `redis`, connections whose original destination is
/// redis's port go to redis (TPROXY keeps that destination: `dst_port`).
pub fn haproxy_config(threads: usize, max_connections: usize, redis: bool) -> String {
    let pod = netlab::ClientPod::POD_V4;
    let (use_redis, redis_backend) = if redis {
        let port = redis::PORT;
        (
            format!("    use_backend redis if {{ dst_port {port} }}\n"),
            format!(
                "
backend redis
    server r {pod}:{port} source 127.0.0.6 maxconn {max_connections}
"
            ),
        )
    } else {
        (String::new(), String::new())
    };
    format!(
        "global
    nbthread {threads}
    maxconn {max_connections}

defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m

frontend intercepted
    bind :{PROXY_PORT} transparent
    maxconn {max_connections}
{use_redis}    default_backend workload

backend workload
    server w {pod}:{PORT} source 127.0.0.6 maxconn {max_connections}
{redis_backend}"
    )
}

/// Connects from `client` until an echo comes back through the expected
/// path: via the proxy when there is one, straight otherwise.
fn probe(client: &Netns, target: SocketAddr, workload: &Workload, via_proxy: bool) -> Result<()> {
    let deadline = Instant::now() + READY_WITHIN;
    let mut last_error = anyhow!("no attempt");
    while Instant::now() < deadline {
        let before = workload.peers();
        match client.try_run(|| echo_once(target))? {
            Ok(()) => {
                let seen = workload.peers().since(before);
                let (expected, other) = if via_proxy {
                    (seen.via_proxy, seen.not_via_proxy)
                } else {
                    (seen.not_via_proxy, seen.via_proxy)
                };
                if expected == 1 && other == 0 {
                    return Ok(());
                }
                last_error = anyhow!(
                    "the probe reached the workload by the wrong path ({} via the proxy, {} not)",
                    seen.via_proxy,
                    seen.not_via_proxy
                );
            }
            Err(e) => last_error = anyhow::Error::new(e).context(format!("probe to {target}")),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(last_error)
}

fn echo_once(target: SocketAddr) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    stream.write_all(&[ECHO])?;
    stream.write_all(b"probe")?;
    let mut reply = [0u8; 5];
    stream.read_exact(&mut reply)?;
    if &reply != b"probe" {
        return Err(std::io::Error::other("probe reply is not the echo"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn flags_as_clap_takes_them() {
        let args = strings(&["--mode", "ebpf", "--forward=splice", "--mode=tproxy"]);
        assert_eq!(flag_value(&args, "--mode").as_deref(), Some("tproxy"));
        assert_eq!(flag_value(&args, "--forward").as_deref(), Some("splice"));
        assert_eq!(flag_value(&args, "--pin"), None);
        assert_eq!(flag_value(&strings(&["--modex=1"]), "--mode"), None);
    }

    #[test]
    fn forwarder_from_the_ready_line() {
        let line = "2026-11-22T02:31:00Z  INFO sluice::server: sluice ready mode=ebpf \
                    forward=Sockmap port=15006 workers=2 rules=true";
        assert_eq!(forwarder_in_use(line).as_deref(), Some("sockmap"));
        assert_eq!(forwarder_in_use("sluice ready mode=tproxy"), None);
    }

    #[test]
    fn matrix_and_policy_sizes() {
        let all = Scenario::builtin();
        let names: Vec<&str> = all.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names[..12],
            [
                "direct",
                "redirect",
                "tproxy",
                "tproxy-splice",
                "tproxy-sockmap",
                "tproxy-bypass",
                "ebpf",
                "ebpf-splice",
                "ebpf-sockmap",
                "haproxy",
                "istio-tproxy",
                "istio-sluice"
            ]
        );
        let bypass = &all[5];
        assert_eq!(
            (bypass.mode().as_deref(), bypass.forwarder().as_deref()),
            (Some("tproxy"), Some("copy"))
        );
        let Interceptor::Sluice { args } = &bypass.interceptor else {
            panic!("{bypass:?}");
        };
        assert_eq!(
            flag_value(args, "--upstream-source").as_deref(),
            Some("bypass")
        );
        assert!(bypass.runs(LoadKind::Concurrency) && bypass.only.is_none());
        let sockmap = &all[8];
        assert_eq!(sockmap.mode().as_deref(), Some("ebpf"));
        assert_eq!(sockmap.forwarder().as_deref(), Some("sockmap"));
        assert!(sockmap.runs(LoadKind::Concurrency));
        let big = all
            .iter()
            .find(|s| s.name == "tproxy-excl1000")
            .expect("tproxy-excl1000");
        assert_eq!(big.excluded_ports, Some(1000));
        assert!(big.runs(LoadKind::Crr) && !big.runs(LoadKind::Rr));
        let Interceptor::Sluice { args } = &big.interceptor else {
            panic!("{big:?}");
        };
        let ports = flag_value(args, "--exclude-ports").expect("--exclude-ports");
        let ports: Vec<&str> = ports.split(',').collect();
        assert_eq!(
            (ports.len(), ports[0], ports[999]),
            (1000, "20000", "20999")
        );
        assert_eq!(all.len(), 12 + 2 * POLICY_SIZES.len());
    }

    #[test]
    fn haproxy_sends_redis_s_port_to_redis() {
        let plain = haproxy_config(2, 100, false);
        assert!(!plain.contains("redis"), "{plain}");
        let with = haproxy_config(2, 100, true);
        assert!(
            with.contains(
                "    use_backend redis if { dst_port 6379 }\n    default_backend workload"
            ),
            "{with}"
        );
        assert!(
            with.contains("backend redis\n    server r 198.18.0.2:6379 source 127.0.0.6"),
            "{with}"
        );
    }

    #[test]
    fn long_lists_shortened() {
        assert_eq!(shorten_list("1,2,3,4"), "1,2,3,4");
        assert_eq!(shorten_list("1,2,3,4,5"), "1,2,…,5 (5 items)");
    }
}
