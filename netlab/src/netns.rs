use std::fs::{self, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::panic;
use std::path::{Path, PathBuf};
use std::process::{self, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;
use std::thread;

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::prctl;
use nix::sys::signal::Signal;
use nix::unistd::{getpid, getppid};

use crate::{Error, Proc, Result};

/// Where `ip netns` keeps named namespaces, so `ip netns list` shows ours.
const NETNS_DIR: &str = "/run/netns";

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// A named network namespace, `/run/netns/sl-<purpose>-<pid>-<n>`, removed on drop.
///
/// The guard never enters the namespace on the caller's thread (every method
/// uses a fresh thread), so it is `Send + Sync` and can be shared freely.
/// Interfaces inside (veth ends) disappear with the namespace.
#[derive(Debug)]
pub struct Netns {
    name: String,
    fd: OwnedFd,
}

impl Netns {
    /// Creates the namespace the way `ip netns add` does, then brings `lo` up
    /// and turns IPv6 duplicate address detection off, so addresses are
    /// usable at once.
    pub fn new(purpose: &str) -> Result<Netns> {
        let valid = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if purpose.is_empty() || purpose.len() > 64 || !purpose.chars().all(valid) {
            return Err(Error::Invalid(format!(
                "namespace purpose {purpose:?}: use 1-64 characters from [A-Za-z0-9_-]"
            )));
        }
        static SWEEP: Once = Once::new();
        SWEEP.call_once(sweep_stale);
        let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        Netns::create(format!("sl-{purpose}-{}-{n}", process::id()))
    }

    /// A namespace with exactly this name, for a topology a person keeps
    /// (`netlab up`): `sl-<name>` with no pid in it, so no stale sweep takes
    /// it. It is still removed on drop unless [`Netns::persist`] is called.
    pub fn with_name(name: &str) -> Result<Netns> {
        let valid = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if !name.starts_with("sl-") || name.len() > 64 || !name.chars().all(valid) {
            return Err(Error::Invalid(format!(
                "namespace name {name:?}: use sl- and then characters from [A-Za-z0-9_-]"
            )));
        }
        Netns::create(name.to_string())
    }

    /// Takes over an existing named namespace (e.g. to remove it).
    pub fn open(name: &str) -> Result<Netns> {
        let path = Path::new(NETNS_DIR).join(name);
        let file = fs::File::open(&path)
            .map_err(|e| Error::os(format!("opening namespace {}", path.display()), e))?;
        Ok(Netns {
            name: name.to_string(),
            fd: file.into(),
        })
    }

    /// Gives the namespace up to outlive this guard; returns its name.
    pub fn persist(mut self) -> String {
        // A guard with no name leaves its namespace in place (see Drop).
        std::mem::take(&mut self.name)
    }

    fn create(name: String) -> Result<Netns> {
        let path = Path::new(NETNS_DIR).join(&name);
        fs::create_dir_all(NETNS_DIR)
            .map_err(|e| Error::os(format!("creating {NETNS_DIR} (netlab needs root)"), e))?;
        shared_netns_dir()?;
        // create_new: a leftover from a crashed run must not be silently reused.
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o444)
            .open(&path)
            .map_err(|e| Error::os(format!("creating {}", path.display()), e))?;

        // unshare() moves only the calling thread, so a throwaway thread does it
        // and the bind mount keeps the namespace alive after that thread ends.
        let created = thread::scope(|s| {
            s.spawn(|| -> Result<OwnedFd> {
                unshare(CloneFlags::CLONE_NEWNET).map_err(|e| {
                    Error::os(
                        format!("unshare(CLONE_NEWNET) for {name} (netlab needs root)"),
                        e,
                    )
                })?;
                let fd = fs::File::open("/proc/thread-self/ns/net")
                    .map_err(|e| Error::os("opening /proc/thread-self/ns/net", e))?;
                mount(
                    Some("/proc/thread-self/ns/net"),
                    &path,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(|e| {
                    Error::os(
                        format!("bind-mounting the namespace on {}", path.display()),
                        e,
                    )
                })?;
                Ok(fd.into())
            })
            .join()
        });
        let fd = match created {
            Ok(Ok(fd)) => fd,
            Ok(Err(e)) => {
                let _ = fs::remove_file(&path);
                return Err(e);
            }
            Err(panicked) => {
                let _ = fs::remove_file(&path);
                panic::resume_unwind(panicked)
            }
        };
        // From here on the guard owns the mount: any failure below unmounts it.
        let ns = Netns { name, fd };
        ns.set_link_up("lo")?;
        ns.sysctl_set("net.ipv6.conf.all.accept_dad", "0")?;
        ns.sysctl_set("net.ipv6.conf.default.accept_dad", "0")?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Runs `f` on a fresh thread inside this namespace and returns its result.
    /// Sockets `f` creates stay in the namespace and may be used from any thread.
    ///
    /// Panics if the thread cannot enter the namespace (see [`Netns::try_run`]);
    /// a panic in `f` is resumed on the caller's thread.
    pub fn run<R: Send, F: FnOnce() -> R + Send>(&self, f: F) -> R {
        match self.try_run(f) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        }
    }

    /// Like [`Netns::run`], but returns an error when `setns` fails.
    pub fn try_run<R: Send, F: FnOnce() -> R + Send>(&self, f: F) -> Result<R> {
        let fd = self.fd.as_fd();
        let joined = thread::scope(|s| {
            s.spawn(move || {
                setns(fd, CloneFlags::CLONE_NEWNET).map_err(|e| {
                    Error::os(format!("entering namespace {} (setns)", self.name), e)
                })?;
                Ok(f())
            })
            .join()
        });
        joined.unwrap_or_else(|panicked| panic::resume_unwind(panicked))
    }

    /// Writes `/proc/sys/<key>` inside the namespace. Only `net.*` keys are
    /// accepted: most other sysctls are global and would change the host.
    pub fn sysctl_set(&self, key: &str, value: &str) -> Result<()> {
        let path = sysctl_path(key)?;
        self.try_run(|| fs::write(&path, value))?.map_err(|e| {
            Error::os(
                format!("setting {key}={value} in namespace {}", self.name),
                e,
            )
        })
    }

    /// Reads `/proc/sys/<key>` inside the namespace, trimmed.
    pub fn sysctl_get(&self, key: &str) -> Result<String> {
        let path = sysctl_path(key)?;
        let value = self
            .try_run(|| fs::read_to_string(&path))?
            .map_err(|e| Error::os(format!("reading {key} in namespace {}", self.name), e))?;
        Ok(value.trim().to_owned())
    }

    /// Runs `cmd` inside the namespace to completion (at most a minute) and
    /// returns its exit status and output.
    pub fn output(&self, cmd: &mut Command) -> Result<std::process::Output> {
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        self.spawn(cmd)?
            .wait_output(std::time::Duration::from_secs(60))
    }

    /// Spawns `cmd` inside the namespace. The child gets SIGKILL when the
    /// spawning thread exits (`PR_SET_PDEATHSIG` follows the thread, not the
    /// process), so spawn from the thread that owns the [`Proc`]. Use a fresh
    /// `Command` per call: the namespace hook is added to it.
    pub fn spawn(&self, cmd: &mut Command) -> Result<Proc> {
        let ns_fd = self.fd.as_raw_fd();
        let parent = getpid();
        // SAFETY: the hook runs between fork and exec and makes only
        // async-signal-safe system calls without allocating; `ns_fd` stays open
        // in the child until exec because `self` outlives this call.
        unsafe {
            cmd.pre_exec(move || {
                prctl::set_pdeathsig(Signal::SIGKILL)?;
                // The parent may have died before the death signal was armed.
                if getppid() != parent {
                    return Err(Errno::ESRCH.into());
                }
                setns(BorrowedFd::borrow_raw(ns_fd), CloneFlags::CLONE_NEWNET)?;
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| {
            let program = cmd.get_program().to_string_lossy();
            Error::os(format!("spawning {program} in namespace {}", self.name), e)
        })?;
        Ok(Proc::new(child))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.name.is_empty() {
            return; // persisted
        }
        let path = self.path();
        // MNT_DETACH: processes or sockets still inside must not keep the name
        // busy; the kernel frees the namespace when its last user goes.
        if let Err(e) = umount2(&path, MntFlags::MNT_DETACH) {
            eprintln!("netlab: unmounting {}: {e}", path.display());
        }
        if let Err(e) = fs::remove_file(&path) {
            eprintln!("netlab: removing {}: {e}", path.display());
        }
    }
}

/// Removes `sl-` namespaces whose creating process is gone: a test killed by
/// SIGKILL or a timeout never runs its destructors. Namespaces of live
/// processes (parallel test binaries) are left alone.
fn sweep_stale() {
    remove_where("stale ", |pid| !Path::new(&format!("/proc/{pid}")).exists());
}

/// Removes every namespace this process made with [`Netns::new`], for a
/// process about to exit without running its guards (on SIGTERM, from a
/// signal-handling thread). The processes inside die with this one
/// (`PR_SET_PDEATHSIG`), and with the last of them the namespace itself,
/// its links, rules and BPF links. Each removal is reported on stderr.
pub fn remove_own_namespaces() {
    let me = process::id();
    remove_where("", |pid| pid == me);
}

/// Makes `/run/netns` a shared mount point of its own, once per process, as
/// `ip netns add` does the first time it runs after boot. Were it left to
/// `ip netns`, its recursive bind of the directory over itself would copy
/// the namespaces netlab had mounted there at that moment: the copies hide
/// the originals, and their removal then fails with EBUSY, leaving them
/// behind. Done before netlab's first mount, nothing is there to copy, and
/// `ip netns` later finds a mount point and leaves it alone.
fn shared_netns_dir() -> Result<()> {
    static DONE: std::sync::OnceLock<nix::Result<()>> = std::sync::OnceLock::new();
    let outcome = DONE.get_or_init(|| {
        let shared = || {
            mount(
                None::<&str>,
                NETNS_DIR,
                None::<&str>,
                MsFlags::MS_SHARED | MsFlags::MS_REC,
                None::<&str>,
            )
        };
        // EINVAL: not a mount point yet.
        if shared().is_ok() {
            return Ok(());
        }
        mount(
            Some(NETNS_DIR),
            NETNS_DIR,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .and_then(|()| shared())
    });
    (*outcome).map_err(|e| Error::os(format!("making {NETNS_DIR} a shared mount point"), e))
}

/// Unmounts and removes the `sl-<purpose>-<pid>-<n>` namespaces whose pid
/// `doomed` picks; `what` qualifies them in messages.
fn remove_where(what: &str, doomed: impl Fn(u32) -> bool) {
    let Ok(entries) = fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(owner_pid) else {
            continue;
        };
        if !doomed(pid) {
            continue;
        }
        let path = entry.path();
        // EINVAL: not a mount point (the creator died before mounting).
        match umount2(&path, MntFlags::MNT_DETACH) {
            Ok(()) | Err(Errno::EINVAL) => {}
            Err(e) => {
                eprintln!("netlab: unmounting {what}{}: {e}", path.display());
                continue;
            }
        }
        match fs::remove_file(&path) {
            Ok(()) => eprintln!("netlab: removed {what}namespace {}", path.display()),
            Err(e) => eprintln!("netlab: removing {what}{}: {e}", path.display()),
        }
    }
}

/// The pid in `sl-<purpose>-<pid>-<n>`; the purpose may itself contain dashes.
fn owner_pid(name: &str) -> Option<u32> {
    let mut tail = name.strip_prefix("sl-")?.rsplitn(3, '-');
    let (n, pid, _purpose) = (tail.next()?, tail.next()?, tail.next()?);
    n.parse::<u64>().ok()?;
    pid.parse().ok()
}

/// `net.ipv4.ip_forward` → `/proc/sys/net/ipv4/ip_forward`; as in sysctl(8),
/// a `/` inside a component stands for a dot (`net.ipv4.conf.eth0/100.rp_filter`).
fn sysctl_path(key: &str) -> Result<PathBuf> {
    let parts: Vec<&str> = key.split('.').collect();
    if parts.first() != Some(&"net") || parts.len() < 2 {
        return Err(Error::Invalid(format!(
            "sysctl {key:?}: only net.* keys are per namespace; anything else would change the host"
        )));
    }
    let mut path = PathBuf::from("/proc/sys");
    for part in parts {
        let part = part.replace('/', ".");
        if part.is_empty() || part == "." || part == ".." {
            return Err(Error::Invalid(format!("sysctl {key:?}: malformed key")));
        }
        path.push(part);
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pids() {
        assert_eq!(owner_pid("sl-tcp-cli-7345-0"), Some(7345));
        assert_eq!(owner_pid("sl-x-12-3"), Some(12));
        for other in ["sl-12-3", "sl-x-y-3", "sl-x-12-y", "foo-x-12-3", "sl-x-12-"] {
            assert_eq!(owner_pid(other), None, "{other}");
        }
    }

    #[test]
    fn sysctl_keys() {
        let p = sysctl_path("net.ipv4.conf.eth0/100.rp_filter").unwrap();
        assert_eq!(p, Path::new("/proc/sys/net/ipv4/conf/eth0.100/rp_filter"));
        for bad in [
            "kernel.hostname",
            "net",
            "net..x",
            "net.ipv4./.x",
            "vm.swappiness",
            "",
        ] {
            assert!(sysctl_path(bad).is_err(), "{bad}");
        }
    }
}
