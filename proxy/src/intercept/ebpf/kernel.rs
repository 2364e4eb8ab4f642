//! What the eBPF engine asks the kernel outside of libbpf-rs' safe API:
//! BPF links and programs found by id (with their errors, which libbpf-rs'
//! id iterators swallow), the identity of a network namespace, capabilities
//! and feature probes. The raw libbpf calls and their `unsafe` live here.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::thread;

use libbpf_rs::libbpf_sys;
use libbpf_rs::query::{LinkInfo, LinkTypeInfo};
use libbpf_rs::ProgramAttachType;

/// A network namespace, held open by a descriptor.
#[derive(Debug)]
pub(super) struct Netns {
    file: File,
    pub ino: u64,
}

impl Netns {
    /// The namespace of the calling thread: `setns` is per thread, so
    /// `/proc/self/ns/net` (the main thread's) could be another one.
    pub fn current() -> io::Result<Netns> {
        let file = File::open("/proc/thread-self/ns/net")?;
        let ino = file.metadata()?.ino();
        Ok(Netns { file, ino })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Runs `f` inside this namespace, leaving the caller's thread where it
    /// is: on a short-lived thread, or on the caller's when it is there
    /// already (no `setns`, which needs CAP_SYS_ADMIN, long dropped when
    /// readiness reads the policy back).
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> io::Result<R> {
        if Netns::current()?.ino == self.ino {
            return Ok(f());
        }
        let fd = self.fd();
        thread::scope(|s| {
            s.spawn(move || {
                nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from)?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panicked| std::panic::resume_unwind(panicked))
        })
    }
}

/// An sk_lookup link on a network namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct LinkRecord {
    pub link_id: u32,
    pub prog_id: u32,
}

/// Every sk_lookup link attached to the namespace with inode `netns_ino`.
/// The kernel lets only CAP_SYS_ADMIN walk link ids (EPERM otherwise).
pub(super) fn sk_lookup_links(netns_ino: u64) -> io::Result<Vec<LinkRecord>> {
    let mut found = Vec::new();
    let mut id = 0u32;
    loop {
        let mut next = 0u32;
        // SAFETY: plain syscall wrapper; `next` is a valid out pointer.
        let rc = unsafe { libbpf_sys::bpf_link_get_next_id(id, &mut next) };
        if rc != 0 {
            let err = io::Error::from_raw_os_error(-rc);
            if err.raw_os_error() == Some(libc::ENOENT) {
                break;
            }
            return Err(err);
        }
        id = next;
        let fd = match link_fd(id) {
            Ok(fd) => fd,
            // The link went away between the two calls.
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(error) => return Err(error),
        };
        let info = LinkInfo::from_fd(fd.as_fd()).map_err(io::Error::other)?;
        if let LinkTypeInfo::NetNs(netns) = &info.info {
            let sk_lookup = matches!(netns.attach_type, ProgramAttachType::SkLookup);
            if u64::from(netns.ino) == netns_ino && sk_lookup {
                found.push(LinkRecord {
                    link_id: info.id,
                    prog_id: info.prog_id,
                });
            }
        }
    }
    Ok(found)
}

/// A descriptor of link `id`. EAGAIN means the link is being made this very
/// moment (the kernel gives it an id before it is settled), by another
/// process attaching at the same time: it settles within microseconds.
fn link_fd(id: u32) -> io::Result<OwnedFd> {
    for _ in 0..100 {
        // SAFETY: plain syscall wrapper.
        let fd = unsafe { libbpf_sys::bpf_link_get_fd_by_id(id) };
        if fd >= 0 {
            // SAFETY: the kernel just gave us this descriptor; nothing else
            // owns it.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        if -fd != libc::EAGAIN {
            return Err(io::Error::from_raw_os_error(-fd));
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    Err(io::Error::from_raw_os_error(libc::EAGAIN))
}

/// A loaded program's name and the ids of the maps it uses.
#[derive(Debug)]
pub(super) struct ProgRecord {
    pub name: String,
    pub map_ids: Vec<u32>,
}

pub(super) fn program(prog_id: u32) -> io::Result<ProgRecord> {
    // SAFETY: plain syscall wrapper.
    let fd = unsafe { libbpf_sys::bpf_prog_get_fd_by_id(prog_id) };
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(-fd));
    }
    // SAFETY: the kernel just gave us this descriptor; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut map_ids = vec![0u32; 64];
    let mut info = libbpf_sys::bpf_prog_info {
        nr_map_ids: 64,
        map_ids: map_ids.as_mut_ptr() as u64,
        ..Default::default()
    };
    let mut len = u32::try_from(size_of::<libbpf_sys::bpf_prog_info>())
        .map_err(|_| io::Error::other("bpf_prog_info does not fit u32"))?;
    // SAFETY: `info` is a valid bpf_prog_info of `len` bytes; its map_ids
    // pointer is valid for nr_map_ids u32 and outlives the call.
    let rc = unsafe {
        libbpf_sys::bpf_obj_get_info_by_fd(
            fd.as_raw_fd(),
            std::ptr::from_mut(&mut info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(-rc));
    }
    // The kernel reports how many maps there are, and fills at most 64.
    map_ids.truncate(usize::try_from(info.nr_map_ids.min(64)).unwrap_or(0));
    let name_bytes: Vec<u8> = info.name.iter().map(|&c| c as u8).collect();
    let name = CStr::from_bytes_until_nul(&name_bytes)
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(ProgRecord { name, map_ids })
}

/// Whether the kernel knows `BPF_PROG_TYPE_SK_LOOKUP`; `None` when the probe
/// itself failed.
pub(super) fn sk_lookup_supported() -> Option<bool> {
    // SAFETY: plain probe; NULL options are allowed.
    let rc = unsafe {
        libbpf_sys::libbpf_probe_bpf_prog_type(
            libbpf_sys::BPF_PROG_TYPE_SK_LOOKUP,
            std::ptr::null(),
        )
    };
    match rc {
        1 => Some(true),
        0 => Some(false),
        _ => None,
    }
}

/// (major, minor) of the running kernel, if its release string parses.
pub(super) fn kernel_version() -> Option<(u32, u32)> {
    let release = crate::bpf::kernel_release();
    let mut parts = release.split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Whether `path` is on a BPF filesystem (only there can objects be pinned).
pub(super) fn on_bpffs(path: &Path) -> io::Result<bool> {
    let fs = nix::sys::statfs::statfs(path).map_err(io::Error::from)?;
    Ok(fs.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

/// The index of interface `name` in the calling thread's namespace.
pub(super) fn ifindex(name: &str) -> io::Result<u32> {
    nix::net::if_::if_nametoindex(name).map_err(io::Error::from)
}

/// The name of interface `index` in the calling thread's namespace.
pub(super) fn ifname(index: u32) -> Option<String> {
    nix::net::if_::if_indextoname(index)
        .ok()
        .map(|name| name.to_string_lossy().into_owned())
}
