//! What sluice installed, and its removal.
//!
//! An install records what it changes in an [`Installed`]: dropped, that
//! undoes exactly those changes (a failed install's rollback, the exit of
//! `run --install-rules` or of `run --mode ebpf`), unless kept (`rules
//! install`, a pinned program: the interception outlives the process). What
//! was there before stays, or is put back: an earlier `rules install`'s
//! rules (an init container's), Istio's own `fwmark 1337 lookup 133`, a
//! `::6` someone else added. A pod is never left without the interception
//! someone else installed.
//!
//! `rules remove` ([`remove_all`]) is another process: it finds sluice's own
//! objects by what marks them in the namespace, and takes all of them and
//! nothing else:
//! - netfilter: the chains named `SLUICE_*`, and the rules in built-in
//!   chains that jump to them ([`super::rules::CHAIN_PREFIX`]);
//! - fwmark rules, local routes, `::6` on lo: the protocol field
//!   [`routing::PROTOCOL`], any mark and table;
//! - the sysctls: the bits sluice's IPv4 fwmark rule records, of those it
//!   turned on.

use tracing::{info, warn};

use super::rules::{Family, RuleSet};
use super::{Error, TABLES};
use crate::routing::{self, BypassSource, PolicyRoute};

/// The changes one install made, undone when dropped unless kept.
#[derive(Debug, Default)]
#[must_use = "dropping it undoes the install; keep() leaves it in place"]
pub struct Installed {
    /// Each table changed, in order.
    rules: Vec<Replaced>,
    route: Option<(PolicyRoute, routing::Added)>,
    /// `::6` on lo was added.
    bypass: bool,
}

/// The sluice chains of one table before and after an install replaced them.
#[derive(Debug)]
struct Replaced {
    before: RuleSet,
    after: RuleSet,
}

impl Installed {
    /// Whether the install found everything in place and changed nothing.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
            && self
                .route
                .as_ref()
                .is_none_or(|(_, added)| added.is_empty())
            && !self.bypass
    }

    /// Leaves what was installed in place after this is dropped.
    pub fn keep(mut self) {
        self.rules.clear();
        self.route = None;
        self.bypass = false;
    }

    /// Makes the table of `wanted` hold exactly its chains (an empty set
    /// removes sluice's), noting what it held.
    pub(super) fn set_rules(&mut self, wanted: &RuleSet) -> Result<(), Error> {
        let before = RuleSet::read_installed(wanted.family, wanted.table)?;
        if before == *wanted {
            return Ok(());
        }
        RuleSet::apply(wanted.family, &wanted.install_script(&before))?;
        self.rules.push(Replaced {
            before,
            after: wanted.clone(),
        });
        // As iptables-save prints it, which is what undo compares with.
        let after = RuleSet::read_installed(wanted.family, wanted.table)?;
        if let Some(last) = self.rules.last_mut() {
            last.after = after;
        }
        Ok(())
    }

    pub(super) fn set_route(&mut self, route: PolicyRoute) -> Result<(), Error> {
        let (_, added) = self.route.insert((route, routing::Added::default()));
        route.install(added)?;
        Ok(())
    }

    pub(super) fn add_bypass(&mut self) -> Result<(), Error> {
        self.bypass = BypassSource::install()?;
        Ok(())
    }

    /// Undoes the changes, last first; goes on past a failure and returns
    /// the first.
    fn undo(&mut self) -> Result<(), Error> {
        let mut outcome = Ok(());
        if std::mem::take(&mut self.bypass) {
            outcome = outcome.and(BypassSource::remove().map_err(Error::from));
        }
        if let Some((route, added)) = self.route.take() {
            outcome = outcome.and(route.undo(&added).map_err(Error::from));
        }
        for replaced in self.rules.drain(..).rev() {
            outcome = outcome.and(replaced.undo());
        }
        outcome
    }
}

impl Replaced {
    fn undo(self) -> Result<(), Error> {
        let Replaced { before, after } = self;
        let now = RuleSet::read_installed(after.family, after.table)?;
        if now != after {
            // Someone changed them since (`rules remove`, another install):
            // they are no longer what this install made.
            warn!(
                table = after.table,
                family = ?after.family,
                "the sluice rules were changed since sluice installed them; left as they are"
            );
            return Ok(());
        }
        RuleSet::apply(after.family, &before.install_script(&now))?;
        Ok(())
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        if self.is_empty() {
            return;
        }
        match self.undo() {
            Ok(()) => info!("interception removed: what this sluice installed, and only that"),
            Err(error) => warn!(
                error = &error as &(dyn std::error::Error + 'static),
                "could not remove all of the interception this sluice installed; run `sluice rules remove`"
            ),
        }
    }
}

/// `sluice rules remove`: everything of sluice's in this namespace, whatever
/// mode and flags installed it, and nothing else. `netfilter` false skips
/// the iptables part (a host without the tools has no sluice chains).
pub fn remove_all(ipv6: bool, netfilter: bool) -> Result<(), Error> {
    if netfilter {
        let families: &[Family] = if ipv6 { &Family::BOTH } else { &[Family::V4] };
        for &family in families {
            for table in TABLES {
                let installed = RuleSet::read_installed(family, table)?;
                if let Some(script) = RuleSet::remove_script(&installed) {
                    RuleSet::apply(family, &script)?;
                }
            }
        }
    }
    routing::remove_sluices(ipv6)?;
    if ipv6 {
        BypassSource::remove()?;
    }
    Ok(())
}
