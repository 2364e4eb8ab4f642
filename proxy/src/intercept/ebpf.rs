//! eBPF interception (`--mode ebpf`): an `sk_lookup` program
//! (`bpf/sk_lookup.bpf.c`) attached to the network namespace hands new TCP
//! connections for intercepted ports straight to sluice's listening socket,
//! held in a sockmap. No netfilter rule, no policy route, no conntrack entry;
//! the accepted socket's `getsockname()` is the original destination.
//!
//! The policy lives entirely in maps, so [`Interceptor::update_policy`]
//! rewrites maps and never reattaches. The program is attached through a BPF
//! link owned by [`Interceptor`]: dropping it detaches the program, unless
//! the link was pinned in a BPF filesystem ([`Interceptor::pin`]), in which
//! case it stays until [`remove_pinned`].
//!
//! Interception fails closed: when the policy intercepts a connection but
//! the sockmap holds no listener (sluice exited, its link pinned) the SYN
//! is refused rather than let through to the workload.

mod kernel;
mod maps;

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ipnet::IpNet;
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{ErrorKind, Link};
use socket2::{Domain, Protocol, SockRef, Type};

use crate::config::{Policy, Ports};
use maps::{Encoded, Maps, LISTENER_V4, LISTENER_V6, MAX_CIDRS_PER_FAMILY, MAX_INTERFACES};

#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::undocumented_unsafe_blocks,
    unused_imports
)]
mod skel {
    include!(concat!(env!("OUT_DIR"), "/sk_lookup.skel.rs"));
}

/// The program's name in the kernel: how sluice recognises its own links.
const PROGRAM_NAME: &str = "sluice_lookup";
/// The link's file name in a pin directory; the maps are pinned by name.
const LINK_PIN: &str = "link";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("loading and attaching an eBPF program needs CAP_BPF and CAP_NET_ADMIN: run sluice as root or grant CAP_BPF and CAP_NET_ADMIN (e.g. securityContext.capabilities.add: [BPF, NET_ADMIN])")]
    NotPermitted,
    #[error("reading the BPF links of this network namespace needs CAP_SYS_ADMIN (the kernel enumerates BPF objects only for it): run as root")]
    NoSysAdmin,
    #[error("cannot tell which capabilities sluice holds")]
    Capabilities(#[source] io::Error),
    #[error("kernel {release} cannot run sluice's sk_lookup program: --mode ebpf needs Linux 5.17 or newer (sk_lookup came in 5.9, the ingress_ifindex field it reads in 5.17); use --mode tproxy on this kernel")]
    KernelTooOld { release: String },
    #[error(
        "the kernel refused sluice's sk_lookup program (libbpf's messages, the verifier log among them, are in the log at warn level)"
    )]
    Load(#[source] libbpf_rs::Error),
    #[error("attaching the sk_lookup program to this network namespace")]
    Attach(#[source] libbpf_rs::Error),
    #[error("opening this thread's network namespace (/proc/thread-self/ns/net)")]
    Netns(#[source] io::Error),
    #[error("an sk_lookup program of sluice is already attached to this network namespace (link {link_id}): stop the other sluice, or remove a pinned one with `sluice rules remove --mode ebpf --pin DIR`")]
    AlreadyAttached { link_id: u32 },
    #[error("listing the BPF links of this network namespace")]
    Query(#[source] io::Error),
    #[error("the {family} listener is not usable: {problem}")]
    BadListener {
        family: &'static str,
        problem: String,
    },
    #[error("interface {name:?} does not exist in the intercepted network namespace: create it first or drop it from --exclude-interfaces")]
    NoSuchInterface {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("too many {what}: the eBPF maps hold at most {max}")]
    TooMany { what: &'static str, max: usize },
    #[error("{op}")]
    Map {
        op: String,
        #[source]
        source: libbpf_rs::Error,
    },
    #[error("sluice's eBPF maps hold something unexpected: {0}")]
    Corrupt(String),
    #[error("{} is not on a BPF filesystem: mount one (`mount -t bpf bpf /sys/fs/bpf`) and pin below it", dir.display())]
    NotBpfFs { dir: PathBuf },
    #[error("{}", path.display())]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} already exists: remove what is pinned there first (`sluice rules remove --mode ebpf --pin DIR`)", path.display())]
    PinExists { path: PathBuf },
    #[error("pinning {}", path.display())]
    Pin {
        path: PathBuf,
        #[source]
        source: libbpf_rs::Error,
    },
    #[error("this interceptor is already pinned in {}", dir.display())]
    AlreadyPinned { dir: PathBuf },
    #[error("opening the pinned link {}", path.display())]
    OpenPinned {
        path: PathBuf,
        #[source]
        source: libbpf_rs::Error,
    },
    #[error("the link pinned in {} is not sluice's sk_lookup link on this network namespace ({found}): remove it with `sluice rules remove --mode ebpf --pin DIR`", dir.display())]
    PinnedElsewhere { dir: PathBuf, found: String },
    #[error("detaching the pinned link {}", path.display())]
    Detach {
        path: PathBuf,
        #[source]
        source: libbpf_rs::Error,
    },
    #[error("removing {}", path.display())]
    Unpin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What the program enforces; every field is map content.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EbpfPolicy {
    /// Intercept every destination port but the excluded ones (`ports` is
    /// then ignored and kept empty).
    pub intercept_all: bool,
    /// Destination ports to intercept, sorted, without duplicates.
    pub ports: Vec<u16>,
    /// Destination ports never intercepted; wins over `ports`.
    pub exclude_ports: Vec<u16>,
    /// Client (source) networks never intercepted.
    pub exclude_cidrs: Vec<IpNet>,
    /// Interfaces whose incoming connections are never intercepted, by name
    /// in the intercepted namespace (looked up when the policy is written: an
    /// interface created later is not covered until the next update).
    pub exclude_interfaces: Vec<String>,
}

impl EbpfPolicy {
    pub fn from_policy(p: &Policy) -> EbpfPolicy {
        let (intercept_all, ports) = match &p.ports {
            Ports::All => (true, Vec::new()),
            Ports::List(ports) => (false, ports.iter().copied().collect()),
        };
        EbpfPolicy {
            intercept_all,
            ports,
            exclude_ports: p.exclude_ports.iter().copied().collect(),
            exclude_cidrs: p.exclude_cidrs.clone(),
            exclude_interfaces: p.exclude_interfaces.clone(),
        }
        .normalized()
    }

    /// Sorted and deduplicated, CIDRs truncated to their network: the form
    /// the maps read back as, so that two policies compare by meaning.
    pub fn normalized(mut self) -> EbpfPolicy {
        if self.intercept_all {
            self.ports.clear();
        }
        for list in [&mut self.ports, &mut self.exclude_ports] {
            list.sort_unstable();
            list.dedup();
        }
        self.exclude_cidrs = self.exclude_cidrs.iter().map(IpNet::trunc).collect();
        self.exclude_cidrs.sort();
        self.exclude_cidrs.dedup();
        self.exclude_interfaces.sort();
        self.exclude_interfaces.dedup();
        self
    }

    /// The map form; interface names resolved by `ifindex` (run inside the
    /// intercepted namespace).
    fn encode(&self, ifindex: impl Fn(&str) -> io::Result<u32>) -> Result<Encoded, Error> {
        let policy = self.clone().normalized();
        for (what, count) in [
            (
                "IPv4 --exclude-cidrs",
                policy
                    .exclude_cidrs
                    .iter()
                    .filter(|c| c.addr().is_ipv4())
                    .count(),
            ),
            (
                "IPv6 --exclude-cidrs",
                policy
                    .exclude_cidrs
                    .iter()
                    .filter(|c| c.addr().is_ipv6())
                    .count(),
            ),
        ] {
            if count > MAX_CIDRS_PER_FAMILY {
                return Err(Error::TooMany {
                    what,
                    max: MAX_CIDRS_PER_FAMILY,
                });
            }
        }
        if policy.exclude_interfaces.len() > MAX_INTERFACES {
            return Err(Error::TooMany {
                what: "--exclude-interfaces",
                max: MAX_INTERFACES,
            });
        }
        let exclude_ifindexes = policy
            .exclude_interfaces
            .iter()
            .map(|name| {
                ifindex(name).map_err(|source| Error::NoSuchInterface {
                    name: name.clone(),
                    source,
                })
            })
            .collect::<Result<BTreeSet<u32>, Error>>()?;
        Ok(Encoded {
            intercept_all: policy.intercept_all,
            ports: policy.ports.into_iter().collect(),
            exclude_ports: policy.exclude_ports.into_iter().collect(),
            exclude_cidrs: policy.exclude_cidrs,
            exclude_ifindexes,
        })
    }

    /// From the map form; interface indexes named in the calling thread's
    /// namespace (`#N` for one that no longer exists).
    fn decode(encoded: Encoded) -> EbpfPolicy {
        EbpfPolicy {
            intercept_all: encoded.intercept_all,
            ports: encoded.ports.into_iter().collect(),
            exclude_ports: encoded.exclude_ports.into_iter().collect(),
            exclude_cidrs: encoded.exclude_cidrs,
            exclude_interfaces: encoded
                .exclude_ifindexes
                .into_iter()
                .map(|i| kernel::ifname(i).unwrap_or_else(|| format!("#{i}")))
                .collect(),
        }
        .normalized()
    }
}

impl fmt::Display for EbpfPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn list<T: ToString>(items: &[T]) -> String {
            if items.is_empty() {
                "none".into()
            } else {
                items
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            }
        }
        if self.intercept_all {
            writeln!(f, "intercepted ports: all")?;
        } else {
            writeln!(f, "intercepted ports: {}", list(&self.ports))?;
        }
        writeln!(f, "excluded ports: {}", list(&self.exclude_ports))?;
        writeln!(f, "excluded client CIDRs: {}", list(&self.exclude_cidrs))?;
        writeln!(f, "excluded interfaces: {}", list(&self.exclude_interfaces))
    }
}

/// sluice's sk_lookup program, loaded and attached to the network namespace
/// of the thread that called [`Interceptor::attach`]. Dropping it detaches
/// the program (unless pinned). `Send + Sync`: once attached, the link is
/// bound to that namespace whichever thread holds it.
pub struct Interceptor {
    link: Link,
    maps: Maps,
    netns: kernel::Netns,
    link_id: u32,
    prog_id: u32,
    pinned: Option<PathBuf>,
    /// Serialises policy updates: each writes the one inactive slot.
    updating: Mutex<()>,
}

impl fmt::Debug for Interceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Interceptor")
            .field("link_id", &self.link_id)
            .field("prog_id", &self.prog_id)
            .field("netns_ino", &self.netns.ino)
            .field("pinned", &self.pinned)
            .finish_non_exhaustive()
    }
}

impl Interceptor {
    /// Loads the program, writes `policy` and the two listeners into its
    /// maps, then attaches it to the calling thread's network namespace, so
    /// it is never live with an empty policy. The listeners must be
    /// listening TCP sockets: `v4` AF_INET, `v6` AF_INET6 (v6-only or not);
    /// any bound address and port will do.
    pub fn attach(
        policy: &EbpfPolicy,
        v4_listener: BorrowedFd<'_>,
        v6_listener: BorrowedFd<'_>,
    ) -> Result<Interceptor, Error> {
        preflight()?;
        let netns = kernel::Netns::current().map_err(Error::Netns)?;
        check_listener(v4_listener, Domain::IPV4)?;
        check_listener(v6_listener, Domain::IPV6)?;
        let encoded = policy.encode(kernel::ifindex)?;
        refuse_a_second_program(&netns, None)?;

        let mut storage = MaybeUninit::uninit();
        let open = skel::SkLookupSkelBuilder::default()
            .open(&mut storage)
            .map_err(Error::Load)?;
        let loaded = open.load().map_err(load_error)?;
        let maps = Maps::from_skel(&loaded.maps)?;
        maps.write(&encoded)?;
        maps.set_listener(LISTENER_V4, v4_listener)?;
        maps.set_listener(LISTENER_V6, v6_listener)?;
        let link = loaded
            .progs
            .sluice_lookup
            .attach_netns(netns.fd().as_raw_fd())
            .map_err(attach_error)?;
        // The skeleton (and its program descriptor) goes at the end of this
        // function; the link keeps the program and the handles keep the maps.
        let info = link.info().map_err(|source| Error::Map {
            op: "reading the new link's ids".into(),
            source,
        })?;
        tracing::info!(
            link = info.id,
            program = info.prog_id,
            netns = netns.ino,
            "sk_lookup program attached"
        );
        Ok(Interceptor {
            link,
            maps,
            netns,
            link_id: info.id,
            prog_id: info.prog_id,
            pinned: None,
            updating: Mutex::new(()),
        })
    }

    /// For `--pin DIR`: takes over the link pinned in `dir` by an earlier
    /// sluice (new listeners and policy into its maps; the program stays
    /// attached throughout), or attaches afresh and pins there.
    pub fn attach_pinned(
        policy: &EbpfPolicy,
        v4_listener: BorrowedFd<'_>,
        v6_listener: BorrowedFd<'_>,
        dir: &Path,
    ) -> Result<Interceptor, Error> {
        if !dir.join(LINK_PIN).exists() {
            let mut interceptor = Interceptor::attach(policy, v4_listener, v6_listener)?;
            interceptor.pin(dir)?;
            return Ok(interceptor);
        }
        preflight()?;
        if !kernel::on_bpffs(dir).map_err(|source| Error::PinDir {
            path: dir.to_owned(),
            source,
        })? {
            return Err(Error::NotBpfFs {
                dir: dir.to_owned(),
            });
        }
        let netns = kernel::Netns::current().map_err(Error::Netns)?;
        check_listener(v4_listener, Domain::IPV4)?;
        check_listener(v6_listener, Domain::IPV6)?;
        let encoded = policy.encode(kernel::ifindex)?;

        let path = dir.join(LINK_PIN);
        let link = Link::open(&path).map_err(|source| Error::OpenPinned {
            path: path.clone(),
            source,
        })?;
        let info = link.info().map_err(|source| Error::OpenPinned {
            path: path.clone(),
            source,
        })?;
        let elsewhere = |found: String| Error::PinnedElsewhere {
            dir: dir.to_owned(),
            found,
        };
        match &info.info {
            libbpf_rs::query::LinkTypeInfo::NetNs(n)
                if matches!(n.attach_type, libbpf_rs::ProgramAttachType::SkLookup) =>
            {
                if u64::from(n.ino) != netns.ino {
                    return Err(elsewhere(format!(
                        "it is attached to network namespace {} (0: one that is gone), this is {}",
                        n.ino, netns.ino
                    )));
                }
            }
            other => return Err(elsewhere(format!("a link of another kind: {other:?}"))),
        }
        refuse_a_second_program(&netns, Some(info.id))?;
        let program = kernel::program(info.prog_id).map_err(Error::Query)?;
        if program.name != PROGRAM_NAME {
            return Err(elsewhere(format!("its program is {:?}", program.name)));
        }
        let maps = Maps::from_pinned(dir)?;
        let used: BTreeSet<u32> = program.map_ids.iter().copied().collect();
        if !maps.ids()?.is_subset(&used) {
            return Err(elsewhere(
                "the maps pinned beside it are not its program's".into(),
            ));
        }
        maps.write(&encoded)?;
        maps.set_listener(LISTENER_V4, v4_listener)?;
        maps.set_listener(LISTENER_V6, v6_listener)?;
        tracing::info!(
            link = info.id,
            program = info.prog_id,
            dir = %dir.display(),
            "took over the pinned sk_lookup link"
        );
        Ok(Interceptor {
            link,
            maps,
            netns,
            link_id: info.id,
            prog_id: info.prog_id,
            pinned: Some(dir.to_owned()),
            updating: Mutex::new(()),
        })
    }

    /// Replaces the policy: map writes only, the program stays attached.
    /// Connections see the old policy or the new one, never a mix. Interface
    /// names are looked up in the namespace the program is attached to.
    pub fn update_policy(&self, policy: &EbpfPolicy) -> Result<(), Error> {
        let encoded = if policy.exclude_interfaces.is_empty() {
            policy.encode(kernel::ifindex)?
        } else {
            self.netns
                .run(|| policy.encode(kernel::ifindex))
                .map_err(Error::Netns)??
        };
        let _serial = self
            .updating
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.maps.write(&encoded)
    }

    /// Pins the link (`dir/link`) and the maps (`dir/<map name>`) in a BPF
    /// filesystem, creating `dir`, so the interception outlives this value
    /// and the process; [`remove_pinned`] undoes it.
    pub fn pin(&mut self, dir: &Path) -> Result<(), Error> {
        match &self.pinned {
            Some(pinned) if pinned == dir => return Ok(()),
            Some(pinned) => {
                return Err(Error::AlreadyPinned {
                    dir: pinned.clone(),
                })
            }
            None => {}
        }
        std::fs::create_dir_all(dir).map_err(|source| Error::PinDir {
            path: dir.to_owned(),
            source,
        })?;
        let on_bpffs = kernel::on_bpffs(dir).map_err(|source| Error::PinDir {
            path: dir.to_owned(),
            source,
        })?;
        if !on_bpffs {
            return Err(Error::NotBpfFs {
                dir: dir.to_owned(),
            });
        }
        for name in pin_names() {
            let path = dir.join(name);
            if path.exists() {
                return Err(Error::PinExists { path });
            }
        }
        self.maps.pin(dir)?;
        let path = dir.join(LINK_PIN);
        if let Err(source) = self.link.pin(&path) {
            for name in maps::NAMES {
                let _ = std::fs::remove_file(dir.join(name));
            }
            return Err(Error::Pin { path, source });
        }
        self.pinned = Some(dir.to_owned());
        Ok(())
    }

    pub fn link_id(&self) -> u32 {
        self.link_id
    }

    pub fn prog_id(&self) -> u32 {
        self.prog_id
    }

    pub fn pinned(&self) -> Option<&Path> {
        self.pinned.as_deref()
    }

    /// This interceptor's program as the kernel holds it now, read through
    /// the descriptors it owns: unlike [`installed`], which finds links by
    /// id, this needs no capability. `None` once the link is no longer
    /// attached to its namespace (`sluice rules remove --pin` detaches it).
    pub fn installed(&self) -> Result<Option<Installed>, Error> {
        let info = self.link.info().map_err(|source| Error::Map {
            op: "reading the link's state".into(),
            source,
        })?;
        // A detached netns link reports namespace 0.
        let attached = matches!(
            &info.info,
            libbpf_rs::query::LinkTypeInfo::NetNs(n) if u64::from(n.ino) == self.netns.ino
        );
        if !attached {
            return Ok(None);
        }
        Ok(Some(Installed {
            link_id: self.link_id,
            prog_id: self.prog_id,
            program: PROGRAM_NAME.into(),
            policy: Some(self.policy()?),
            listeners: [
                self.maps.listener_cookie(LISTENER_V4)?,
                self.maps.listener_cookie(LISTENER_V6)?,
            ],
        }))
    }

    /// The policy as the maps hold it now.
    pub fn policy(&self) -> Result<EbpfPolicy, Error> {
        let encoded = self.maps.read()?;
        let names = self
            .netns
            .run(|| EbpfPolicy::decode(encoded))
            .map_err(Error::Netns)?;
        Ok(names)
    }
}

/// Two sk_lookup programs of sluice on one namespace would both run, and a
/// stale one with an empty sockmap refuses what the other would steer: any
/// sluice link but `keep` is refused.
fn refuse_a_second_program(netns: &kernel::Netns, keep: Option<u32>) -> Result<(), Error> {
    match kernel::sk_lookup_links(netns.ino) {
        Ok(links) => {
            for link in links.into_iter().filter(|l| Some(l.link_id) != keep) {
                if kernel::program(link.prog_id).is_ok_and(|p| p.name == PROGRAM_NAME) {
                    return Err(Error::AlreadyAttached {
                        link_id: link.link_id,
                    });
                }
            }
            Ok(())
        }
        // Not granted (the manifests do not grant it): the check is skipped,
        // not the start.
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            tracing::info!("without CAP_SYS_ADMIN sluice cannot check whether another sluice already intercepts this namespace");
            Ok(())
        }
        Err(e) => Err(Error::Query(e)),
    }
}

fn pin_names() -> impl Iterator<Item = &'static str> {
    std::iter::once(LINK_PIN).chain(maps::NAMES)
}

fn preflight() -> Result<(), Error> {
    crate::bpf::log_to_tracing();
    if !crate::privileges::may_load_bpf().map_err(Error::Capabilities)? {
        return Err(Error::NotPermitted);
    }
    Ok(())
}

/// Why loading failed, in the terms a person can act on.
fn load_error(source: libbpf_rs::Error) -> Error {
    let release = crate::bpf::kernel_release();
    if kernel::sk_lookup_supported() == Some(false)
        || kernel::kernel_version().is_some_and(|v| v < (5, 17))
    {
        return Error::KernelTooOld { release };
    }
    if source.kind() == ErrorKind::PermissionDenied {
        // Capabilities were checked: an LSM or seccomp policy said no.
        return Error::NotPermitted;
    }
    Error::Load(source)
}

fn attach_error(source: libbpf_rs::Error) -> Error {
    match source.kind() {
        ErrorKind::PermissionDenied => Error::NotPermitted,
        ErrorKind::InvalidInput if kernel::kernel_version().is_some_and(|v| v < (5, 9)) => {
            Error::KernelTooOld {
                release: crate::bpf::kernel_release(),
            }
        }
        _ => Error::Attach(source),
    }
}

/// bpf_sk_assign takes only a listening TCP socket of the lookup's family;
/// the sockmap refuses other states. Checked here to say which one is wrong.
fn check_listener(fd: BorrowedFd<'_>, domain: Domain) -> Result<(), Error> {
    let family = if domain == Domain::IPV4 {
        "IPv4"
    } else {
        "IPv6"
    };
    let bad = |problem: String| Error::BadListener { family, problem };
    let socket = SockRef::from(&fd);
    let got_domain = socket
        .domain()
        .map_err(|e| bad(format!("not a socket ({e})")))?;
    if got_domain != domain {
        return Err(bad(format!("it is a {got_domain:?} socket")));
    }
    let kind = socket.r#type().map_err(|e| bad(e.to_string()))?;
    let protocol = socket.protocol().map_err(|e| bad(e.to_string()))?;
    if kind != Type::STREAM || protocol.is_some_and(|p| p != Protocol::TCP) {
        return Err(bad("it is not a TCP socket".into()));
    }
    if !socket.is_listener().map_err(|e| bad(e.to_string()))? {
        return Err(bad("it is not listening (call listen() first)".into()));
    }
    Ok(())
}

/// An sk_lookup program attached to this network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub link_id: u32,
    pub prog_id: u32,
    pub program: String,
    /// The policy in its maps; `None` for a program that is not sluice's.
    pub policy: Option<EbpfPolicy>,
    /// Socket cookies of the listeners in its sockmap (IPv4, IPv6).
    pub listeners: [Option<u64>; 2],
}

impl fmt::Display for Installed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "link {} -> program {} {}",
            self.link_id, self.prog_id, self.program
        )?;
        let Some(policy) = &self.policy else {
            return writeln!(f, "(not sluice's program)");
        };
        write!(f, "{policy}")?;
        for (family, cookie) in ["IPv4", "IPv6"].iter().zip(self.listeners) {
            match cookie {
                Some(cookie) => writeln!(f, "{family} listener: socket cookie {cookie}")?,
                None => writeln!(
                    f,
                    "{family} listener: none (intercepted {family} connections are refused)"
                )?,
            }
        }
        Ok(())
    }
}

/// Every sk_lookup program attached to the calling thread's network
/// namespace, sluice's with the policy in its maps.
pub fn installed() -> Result<Vec<Installed>, Error> {
    let netns = kernel::Netns::current().map_err(Error::Netns)?;
    let links = kernel::sk_lookup_links(netns.ino).map_err(|e| {
        if e.raw_os_error() == Some(libc::EPERM) {
            Error::NoSysAdmin
        } else {
            Error::Query(e)
        }
    })?;
    let mut found = Vec::new();
    for link in links {
        let program = kernel::program(link.prog_id).map_err(Error::Query)?;
        let maps = if program.name == PROGRAM_NAME {
            Maps::from_ids(&program.map_ids)?
        } else {
            None
        };
        let (policy, listeners) = match maps {
            Some(maps) => (
                Some(EbpfPolicy::decode(maps.read()?)),
                [
                    maps.listener_cookie(LISTENER_V4)?,
                    maps.listener_cookie(LISTENER_V6)?,
                ],
            ),
            None => (None, [None, None]),
        };
        found.push(Installed {
            link_id: link.link_id,
            prog_id: link.prog_id,
            program: program.name,
            policy,
            listeners,
        });
    }
    Ok(found)
}

/// `sluice rules show --mode ebpf`: the sk_lookup programs attached to this
/// network namespace and the policy in sluice's maps.
pub fn show() -> Result<String, Error> {
    use fmt::Write as _;
    let netns = kernel::Netns::current().map_err(Error::Netns)?;
    let installed = installed()?;
    let mut out = format!(
        "# eBPF sk_lookup programs on network namespace net:[{}]\n",
        netns.ino
    );
    for program in &installed {
        let _ = write!(out, "{program}");
    }
    let status = if installed.iter().any(|i| i.policy.is_some()) {
        "installed"
    } else {
        "not installed"
    };
    let _ = writeln!(out, "status: {status}");
    Ok(out)
}

/// `sluice rules remove --mode ebpf --pin DIR`: detaches the link pinned in
/// `dir` at once (also if a running sluice still holds it) and removes the
/// pins sluice made there. Succeeds when nothing is pinned.
pub fn remove_pinned(dir: &Path) -> Result<(), Error> {
    if !dir.exists() {
        return Ok(());
    }
    if !kernel::on_bpffs(dir).map_err(|source| Error::PinDir {
        path: dir.to_owned(),
        source,
    })? {
        return Err(Error::NotBpfFs {
            dir: dir.to_owned(),
        });
    }
    let path = dir.join(LINK_PIN);
    if path.exists() {
        let link = Link::open(&path).map_err(|source| Error::OpenPinned {
            path: path.clone(),
            source,
        })?;
        link.detach().map_err(|source| Error::Detach {
            path: path.clone(),
            source,
        })?;
    }
    for name in pin_names() {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(Error::Unpin { path, source }),
        }
    }
    // The directory goes too if sluice's pins were all it held; a mount
    // point (EBUSY) or someone else's files (ENOTEMPTY) keep it.
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EBUSY)) => Ok(()),
        Err(source) => Err(Error::Unpin {
            path: dir.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Mode;

    #[test]
    fn from_policy_maps_every_field() {
        let policy = Policy {
            mode: Mode::Tproxy,
            proxy_port: 15006,
            ports: Ports::List(BTreeSet::from([9080, 80])),
            exclude_ports: BTreeSet::from([15006, 15020]),
            exclude_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
            exclude_interfaces: vec!["eth1".into()],
            mark: 1337,
            table: 133,
        };
        let ebpf = EbpfPolicy::from_policy(&policy);
        assert_eq!(
            ebpf,
            EbpfPolicy {
                intercept_all: false,
                ports: vec![80, 9080],
                exclude_ports: vec![15006, 15020],
                exclude_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
                exclude_interfaces: vec!["eth1".into()],
            }
        );
        let all = EbpfPolicy::from_policy(&Policy {
            ports: Ports::All,
            ..policy
        });
        assert!(all.intercept_all && all.ports.is_empty());
    }

    #[test]
    fn encoding_resolves_interfaces_and_checks_limits() {
        let policy = EbpfPolicy {
            intercept_all: true,
            ports: vec![1],
            exclude_ports: vec![15006, 15006],
            exclude_cidrs: vec!["198.18.0.9/29".parse().unwrap()],
            exclude_interfaces: vec!["eth0".into()],
        };
        let encoded = policy
            .encode(|name| Ok(if name == "eth0" { 2 } else { 9 }))
            .unwrap();
        assert!(encoded.intercept_all && encoded.ports.is_empty());
        assert_eq!(encoded.exclude_ports, BTreeSet::from([15006]));
        assert_eq!(encoded.exclude_cidrs, ["198.18.0.8/29".parse().unwrap()]);
        assert_eq!(encoded.exclude_ifindexes, BTreeSet::from([2]));

        let missing = policy.encode(|_| Err(io::Error::from_raw_os_error(libc::ENODEV)));
        assert!(matches!(missing, Err(Error::NoSuchInterface { .. })));
        let many = EbpfPolicy {
            exclude_cidrs: (0..=u32::try_from(MAX_CIDRS_PER_FAMILY).unwrap())
                .map(|i| IpNet::new(std::net::Ipv4Addr::from(i << 8).into(), 32).unwrap())
                .collect(),
            ..EbpfPolicy::default()
        };
        assert!(matches!(many.encode(|_| Ok(1)), Err(Error::TooMany { .. })));
    }

    #[test]
    fn interceptor_can_live_on_any_thread() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Interceptor>();
    }
}
