//! Network-namespace topologies for sluice's tests and benchmarks.
//!
//! Every kernel object netlab creates is owned by a guard whose `Drop` removes
//! it, also when a test panics. Netlink and `/proc/sys` calls always run on a
//! fresh thread that entered one of our namespaces: the caller's thread, and
//! the machine's own namespace, are never changed.
//!
//! Addresses are restricted to the benchmarking ranges 198.18.0.0/15 and
//! 2001:2::/48, so a mistake can never shadow a real network.

mod link;
mod netns;
mod proc;
mod topology;

use std::io;
use std::net::IpAddr;

pub use link::{veth, Netem};
pub use netns::{remove_own_namespaces, Netns};
pub use proc::Proc;
pub use topology::{ClientPod, End, Host, Lab, Link, Spec};

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call (namespace, mount, file, process) failed.
    #[error("{op}: {source}")]
    Os {
        op: String,
        #[source]
        source: io::Error,
    },
    /// The kernel refused a netlink request.
    #[error("{op} in namespace {ns}: {source}")]
    Netlink {
        ns: String,
        op: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("no interface {ifname:?} in namespace {ns}: create it first (e.g. with netlab::veth) or fix the name")]
    NoSuchLink { ns: String, ifname: String },
    /// The kernel lacks a feature the topology asks for.
    #[error("{0}")]
    Unsupported(String),
    /// The caller asked for something netlab refuses to do.
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    fn os(op: impl Into<String>, source: impl Into<io::Error>) -> Error {
        Error::Os {
            op: op.into(),
            source: source.into(),
        }
    }
}

/// Only the benchmarking ranges (RFC 2544, RFC 5180) may be configured.
fn check_addr(addr: IpAddr) -> Result<()> {
    let ok = match addr {
        IpAddr::V4(a) => u32::from(a) >> 17 == u32::from_be_bytes([198, 18, 0, 0]) >> 17,
        IpAddr::V6(a) => a.segments()[..3] == [0x2001, 0x2, 0],
    };
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "address {addr} is outside the benchmarking ranges: use 198.18.0.0/15 or 2001:2::/48"
        )))
    }
}

fn check_prefix(addr: IpAddr, prefix_len: u8) -> Result<()> {
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if prefix_len <= max {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "prefix length /{prefix_len} is too long for {addr}: at most /{max}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards_can_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Netns>();
        send_sync::<ClientPod>();
        send_sync::<Error>();
        fn send<T: Send>() {}
        send::<Proc>();
    }

    #[test]
    fn address_ranges() {
        for ok in [
            "198.18.0.1",
            "198.19.255.255",
            "2001:2::1",
            "2001:2:0:ffff::1",
        ] {
            assert!(check_addr(ok.parse().unwrap()).is_ok(), "{ok}");
        }
        for bad in [
            "198.17.255.255",
            "198.20.0.0",
            "10.0.0.1",
            "2001:2:1::1",
            "::1",
        ] {
            assert!(check_addr(bad.parse().unwrap()).is_err(), "{bad}");
        }
    }
}
