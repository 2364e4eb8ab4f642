//! Dropping what `sluice run` no longer needs once it has bound its sockets
//! and installed the interception: every capability but those the rest of
//! its life needs, and any way to gain new ones (`no_new_privs`).
//!
//! Capabilities are per thread: this runs on the control thread before any
//! other thread starts, so every thread sluice makes inherits the reduced
//! sets. The kept capabilities stay in the inheritable and ambient sets so
//! that the `iptables-save`/`iptables-restore` sluice runs (readiness, the
//! removal at exit) get them as a non-root user too.

use caps::{CapSet, Capability, CapsHashSet};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot change the capabilities of sluice")]
    Caps(#[from] caps::errors::CapsError),
    #[error("cannot set no_new_privs")]
    NoNewPrivs(#[source] std::io::Error),
}

/// Keeps only `keep` (those of it sluice holds) in every capability set,
/// and sets `no_new_privs`. Returns the capabilities kept.
pub fn keep_only(keep: &[Capability]) -> Result<CapsHashSet, Error> {
    let permitted = caps::read(None, CapSet::Permitted)?;
    let kept: CapsHashSet = keep
        .iter()
        .copied()
        .filter(|cap| permitted.contains(cap))
        .collect();
    // Only with CAP_SETPCAP (root, typically) can the bounding set shrink;
    // without it, `no_new_privs` below already keeps an exec from gaining
    // anything beyond the permitted set.
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP)? {
        let bounding = caps::read(None, CapSet::Bounding)?;
        for cap in bounding.difference(&kept) {
            caps::drop(None, CapSet::Bounding, *cap)?;
        }
    }
    caps::clear(None, CapSet::Ambient)?;
    caps::set(None, CapSet::Effective, &kept)?;
    caps::set(None, CapSet::Inheritable, &kept)?;
    caps::set(None, CapSet::Permitted, &kept)?;
    for cap in &kept {
        caps::raise(None, CapSet::Ambient, *cap)?;
    }
    nix::sys::prctl::set_no_new_privs().map_err(|e| Error::NoNewPrivs(e.into()))?;
    Ok(kept)
}
