//! Netfilter rules as text, applied atomically with `iptables-restore
//! --noflush` (one transaction per family), and read back with
//! `iptables-save`.
//!
//! Rules are written in the canonical form `iptables-save` prints, so what is
//! installed can be compared line by line with what the flags ask for.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

/// Every chain sluice owns starts with this; `remove` takes all of them, so
/// it also cleans up after an install made with other flags.
pub const CHAIN_PREFIX: &str = "SLUICE_";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{tool} is not installed: install the iptables package (apt-get install iptables) and try again")]
    Missing { tool: &'static str },
    #[error("cannot run {tool}")]
    Spawn {
        tool: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed ({status}): {stderr}")]
    Failed {
        tool: &'static str,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const BOTH: [Family; 2] = [Family::V4, Family::V6];

    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    fn save(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }
}

/// The sluice chains of one netfilter table and family, and the rules in
/// built-in chains that jump to them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSet {
    pub family: Family,
    pub table: &'static str,
    /// `-A` lines in built-in chains, e.g. `-A PREROUTING -p tcp -j SLUICE_PREROUTING`.
    pub hooks: Vec<String>,
    /// Chain name → its `-A` lines, in order.
    pub chains: BTreeMap<String, Vec<String>>,
}

impl RuleSet {
    pub fn new(family: Family, table: &'static str) -> RuleSet {
        RuleSet {
            family,
            table,
            hooks: Vec::new(),
            chains: BTreeMap::new(),
        }
    }

    /// Appends `spec` to `chain` (declaring the chain if new).
    pub fn push(&mut self, chain: &str, spec: impl AsRef<str>) {
        let line = format!("-A {chain} {}", spec.as_ref());
        if chain.starts_with(CHAIN_PREFIX) {
            self.chains.entry(chain.to_string()).or_default().push(line);
        } else {
            // In the order iptables-save lists them (by built-in chain,
            // then as added), so that what is read back compares equal.
            let rank = builtin_rank(chain);
            let at = self
                .hooks
                .iter()
                .rposition(|h| builtin_rank(hook_chain(h)) <= rank)
                .map_or(0, |i| i + 1);
            self.hooks.insert(at, line);
        }
    }

    /// The `iptables-restore --noflush` input that makes the table hold
    /// exactly this rule set, given what is installed now. Declaring a chain
    /// flushes it, and a hook already present is not added again, so applying
    /// it twice leaves one copy.
    pub fn install_script(&self, installed: &RuleSet) -> String {
        let mut script = format!("*{}\n", self.table);
        for chain in self.chains.keys() {
            script += &format!(":{chain} - [0:0]\n");
        }
        for stale in installed
            .chains
            .keys()
            .filter(|c| !self.chains.contains_key(*c))
        {
            script += &format!("-F {stale}\n");
        }
        for hook in installed.hooks.iter().filter(|h| !self.hooks.contains(h)) {
            script += &format!("-D {}\n", &hook[3..]);
        }
        for stale in installed
            .chains
            .keys()
            .filter(|c| !self.chains.contains_key(*c))
        {
            script += &format!("-X {stale}\n");
        }
        for lines in self.chains.values() {
            for line in lines {
                script += line;
                script.push('\n');
            }
        }
        for hook in self.hooks.iter().filter(|h| !installed.hooks.contains(h)) {
            script += hook;
            script.push('\n');
        }
        script + "COMMIT\n"
    }

    /// The input that removes everything `installed` holds; `None` when it
    /// holds nothing.
    pub fn remove_script(installed: &RuleSet) -> Option<String> {
        if installed.is_empty() {
            return None;
        }
        let mut script = format!("*{}\n", installed.table);
        for hook in &installed.hooks {
            script += &format!("-D {}\n", &hook[3..]);
        }
        for chain in installed.chains.keys() {
            script += &format!("-F {chain}\n");
        }
        for chain in installed.chains.keys() {
            script += &format!("-X {chain}\n");
        }
        Some(script + "COMMIT\n")
    }

    pub fn is_empty(&self) -> bool {
        self.hooks.is_empty() && self.chains.is_empty()
    }

    /// Reads the sluice chains and hooks of `table` from `iptables-save`.
    pub fn read_installed(family: Family, table: &'static str) -> Result<RuleSet, Error> {
        let saved = run(family.save(), &["-t", table], None)?;
        Ok(RuleSet::parse_saved(family, table, &saved))
    }

    fn parse_saved(family: Family, table: &'static str, saved: &str) -> RuleSet {
        let mut set = RuleSet::new(family, table);
        let mut in_table = false;
        for line in saved.lines() {
            if let Some(name) = line.strip_prefix('*') {
                in_table = name == table;
            } else if !in_table {
                continue;
            } else if let Some(chain) = line.strip_prefix(':') {
                let name = chain.split_whitespace().next().unwrap_or_default();
                if name.starts_with(CHAIN_PREFIX) {
                    set.chains.entry(name.to_string()).or_default();
                }
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let (chain, spec) = rule.split_once(' ').unwrap_or((rule, ""));
                let jumps_to_ours = spec.contains(&format!("-j {CHAIN_PREFIX}"));
                if chain.starts_with(CHAIN_PREFIX) || jumps_to_ours {
                    set.push(chain, spec);
                }
            }
        }
        set
    }

    /// Applies a script in one transaction.
    pub fn apply(family: Family, script: &str) -> Result<(), Error> {
        run(family.restore(), &["--noflush", "--wait"], Some(script)).map(drop)
    }

    /// Fails early, with the package to install, when the tools are missing.
    pub fn check_tools() -> Result<(), Error> {
        for family in Family::BOTH {
            for tool in [family.save(), family.restore()] {
                run(tool, &["--version"], None)?;
            }
        }
        Ok(())
    }
}

/// Where iptables-save lists a built-in chain among the others.
fn builtin_rank(chain: &str) -> usize {
    ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"]
        .iter()
        .position(|c| *c == chain)
        .unwrap_or(usize::MAX)
}

/// The chain of a `-A CHAIN ...` line.
fn hook_chain(line: &str) -> &str {
    line.split_whitespace().nth(1).unwrap_or_default()
}

fn run(tool: &'static str, args: &[&str], stdin: Option<&str>) -> Result<String, Error> {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => Error::Missing { tool },
            _ => Error::Spawn { tool, source },
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|source| Error::Spawn { tool, source })?;
    }
    let output = child
        .wait_with_output()
        .map_err(|source| Error::Spawn { tool, source })?;
    if !output.status.success() {
        return Err(Error::Failed {
            tool,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVED: &str = "\
# Generated by iptables-save v1.8.9 (nf_tables)
*mangle
:PREROUTING ACCEPT [0:0]
:SLUICE_DIVERT - [0:0]
:SLUICE_PREROUTING - [0:0]
-A PREROUTING -i eth0 -j KEEP_ME
-A PREROUTING -p tcp -j SLUICE_PREROUTING
-A SLUICE_DIVERT -j ACCEPT
-A SLUICE_PREROUTING -p tcp -j SLUICE_DIVERT
COMMIT
*nat
:SLUICE_OTHER - [0:0]
COMMIT
";

    #[test]
    fn parse_keeps_only_sluice_lines_of_the_table() {
        let set = RuleSet::parse_saved(Family::V4, "mangle", SAVED);
        assert_eq!(set.hooks, ["-A PREROUTING -p tcp -j SLUICE_PREROUTING"]);
        assert_eq!(
            set.chains.keys().collect::<Vec<_>>(),
            ["SLUICE_DIVERT", "SLUICE_PREROUTING"]
        );
        assert_eq!(set.chains["SLUICE_DIVERT"], ["-A SLUICE_DIVERT -j ACCEPT"]);
    }

    #[test]
    fn reinstall_does_not_duplicate_the_hook_and_drops_stale_chains() {
        let installed = RuleSet::parse_saved(Family::V4, "mangle", SAVED);
        let mut wanted = RuleSet::new(Family::V4, "mangle");
        wanted.push("PREROUTING", "-p tcp -j SLUICE_PREROUTING");
        wanted.push("SLUICE_PREROUTING", "-p tcp -j RETURN");
        let script = wanted.install_script(&installed);
        assert_eq!(
            script,
            "*mangle\n:SLUICE_PREROUTING - [0:0]\n-F SLUICE_DIVERT\n-X SLUICE_DIVERT\n\
             -A SLUICE_PREROUTING -p tcp -j RETURN\nCOMMIT\n"
        );
    }

    #[test]
    fn hooks_keep_iptables_saves_order_whatever_order_they_are_added_in() {
        let mut set = RuleSet::new(Family::V4, "raw");
        set.push("OUTPUT", "-j SLUICE_A_OUT");
        set.push("PREROUTING", "-j SLUICE_A_IN");
        set.push("PREROUTING", "-j SLUICE_B_IN");
        set.push("OUTPUT", "-j SLUICE_B_OUT");
        assert_eq!(
            set.hooks,
            [
                "-A PREROUTING -j SLUICE_A_IN",
                "-A PREROUTING -j SLUICE_B_IN",
                "-A OUTPUT -j SLUICE_A_OUT",
                "-A OUTPUT -j SLUICE_B_OUT"
            ]
        );
    }

    #[test]
    fn remove_script_undoes_everything_and_nothing_when_empty() {
        let installed = RuleSet::parse_saved(Family::V4, "mangle", SAVED);
        assert_eq!(
            RuleSet::remove_script(&installed).unwrap(),
            "*mangle\n-D PREROUTING -p tcp -j SLUICE_PREROUTING\n-F SLUICE_DIVERT\n\
             -F SLUICE_PREROUTING\n-X SLUICE_DIVERT\n-X SLUICE_PREROUTING\nCOMMIT\n"
        );
        assert_eq!(
            RuleSet::remove_script(&RuleSet::new(Family::V4, "mangle")),
            None
        );
    }
}
