use std::io::Read;
use std::process::{Child, ExitStatus, Output};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::{Error, Result};

/// A child process spawned in a namespace ([`crate::Netns::spawn`]).
/// Drop sends SIGTERM, waits up to 2 s, then SIGKILLs and reaps it.
#[derive(Debug)]
pub struct Proc {
    child: Child,
}

impl Proc {
    pub(crate) fn new(child: Child) -> Proc {
        Proc { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits for the exit (SIGKILL after 5 s).
    pub fn stop(mut self) -> Result<ExitStatus> {
        self.terminate(Duration::from_secs(5))
    }

    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        let pid = self.pid();
        self.child
            .try_wait()
            .map_err(|e| Error::os(format!("waiting for process {pid}"), e))
    }

    /// Waits for the process to exit on its own and collects what it printed
    /// on piped stdout/stderr. Past `limit` it is killed, and that is an
    /// error: a command that hangs fails its test instead of blocking it.
    pub fn wait_output(mut self, limit: Duration) -> Result<Output> {
        let pid = self.pid();
        let stdout = self.child.stdout.take().map(drain);
        let stderr = self.child.stderr.take().map(drain);
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                return Err(Error::os(
                    format!("process {pid} still running after {limit:?}; killed"),
                    std::io::Error::from(std::io::ErrorKind::TimedOut),
                ));
            }
            thread::sleep(Duration::from_millis(5));
        };
        let collect = |reader: Option<thread::JoinHandle<Vec<u8>>>| {
            reader
                .map(|r| r.join().unwrap_or_default())
                .unwrap_or_default()
        };
        Ok(Output {
            status,
            stdout: collect(stdout),
            stderr: collect(stderr),
        })
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    fn terminate(&mut self, grace: Duration) -> Result<ExitStatus> {
        // Once reaped, the pid may belong to someone else: never signal it then.
        // `Child` remembers the status, so this also makes a second call a no-op.
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        let pid = self.pid();
        let raw =
            i32::try_from(pid).map_err(|_| Error::Invalid(format!("pid {pid} out of range")))?;
        match kill(Pid::from_raw(raw), Signal::SIGTERM) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => return Err(Error::os(format!("sending SIGTERM to process {pid}"), e)),
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(10));
        }
        let killed = self.child.kill().and_then(|()| self.child.wait());
        killed.map_err(|e| Error::os(format!("killing process {pid}"), e))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Err(e) = self.terminate(Duration::from_secs(2)) {
            eprintln!("netlab: {e}");
        }
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        bytes
    })
}
