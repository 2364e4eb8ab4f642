//! The capabilities sluice works with: made usable at start ([`activate`]),
//! and, once `sluice run` has bound its sockets, installed the interception
//! and made its BPF objects, dropped to those the rest of its life needs,
//! with any way to gain new ones (`no_new_privs`) closed ([`keep_only`]).
//!
//! A non-root sluice gets its capabilities either in the ambient set (a
//! runtime that sets it, `setpriv --ambient-caps`) or from file
//! capabilities on its binary (`setcap cap_net_admin,cap_net_raw,cap_bpf+p`,
//! which is what a Kubernetes pod needs: it hands a non-root container no
//! ambient capabilities). Those are permitted only, without the effective
//! bit: with it the kernel refuses to start a binary when the pod grants
//! fewer capabilities than the file names, and one image serves every mode.
//! So sluice raises what it is permitted itself.
//!
//! Capabilities are per thread: both run on the main thread before any
//! other thread starts, so every thread sluice makes inherits the sets. The
//! capabilities also go into the inheritable and ambient sets so that the
//! `iptables-save`/`iptables-restore` sluice runs get them as a non-root
//! user too.

use caps::{CapSet, Capability, CapsHashSet};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot change the capabilities of sluice")]
    Caps(#[from] caps::errors::CapsError),
    #[error("cannot set no_new_privs")]
    NoNewPrivs(#[source] std::io::Error),
}

/// Makes every permitted capability effective and, for a non-root user,
/// inheritable and ambient (a root user's children get theirs from the
/// bounding set). Returns the effective set.
pub fn activate() -> Result<CapsHashSet, Error> {
    let permitted = caps::read(None, CapSet::Permitted)?;
    caps::set(None, CapSet::Effective, &permitted)?;
    if !nix::unistd::geteuid().is_root() {
        caps::set(None, CapSet::Inheritable, &permitted)?;
        for cap in &permitted {
            caps::raise(None, CapSet::Ambient, *cap)?;
        }
    }
    Ok(permitted)
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

/// Whether the calling thread may load networking BPF programs and make
/// sockmaps: CAP_BPF (or CAP_SYS_ADMIN) and CAP_NET_ADMIN in its effective
/// set. Capabilities are per thread: this asks for the caller's.
pub fn may_load_bpf() -> std::io::Result<bool> {
    let effective = effective()?;
    Ok(
        (effective.contains(&Capability::CAP_BPF)
            || effective.contains(&Capability::CAP_SYS_ADMIN))
            && effective.contains(&Capability::CAP_NET_ADMIN),
    )
}

/// Whether the calling thread holds CAP_NET_ADMIN, which every change of
/// rules and routes needs.
pub fn has_cap_net_admin() -> std::io::Result<bool> {
    Ok(effective()?.contains(&Capability::CAP_NET_ADMIN))
}

fn effective() -> std::io::Result<CapsHashSet> {
    caps::read(None, CapSet::Effective)
        .map_err(|e| std::io::Error::other(format!("reading the effective capabilities: {e}")))
}
