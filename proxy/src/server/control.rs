//! The control thread: the signals that stop sluice, the drain that
//! follows, and the watch on the workers (a worker that panics or ends
//! takes the process down).

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::{worker, Error};
use crate::lifecycle::{Phase, PANICKED};
use crate::linux;
use crate::stats::{self, WorkerStats};

/// How often the control thread looks at the workers while it waits.
const TICK: Duration = Duration::from_millis(50);
/// How long the workers get to reset their connections when told to.
const ABORT_WAIT: Duration = Duration::from_secs(1);

/// Blocks SIGINT and SIGTERM in the calling thread. Called before any
/// thread starts, so every thread inherits the mask and only the control
/// thread's `sigtimedwait` sees the signals.
pub(super) fn block_signals() -> Result<SigSet, Error> {
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals
        .thread_block()
        .map_err(|e| Error::Signals(e.into()))?;
    Ok(signals)
}

/// Logs a panic through the log (so JSON logs keep it), resets the
/// panicking worker's connections before unwinding closes them with a FIN,
/// and tells the control thread.
pub(super) fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        error!(thread = thread.name().unwrap_or("?"), "panic: {info}");
        worker::abort_current_worker();
        PANICKED.store(true, Ordering::SeqCst);
    }));
}

/// Sent when a worker thread ends, for whatever reason.
pub(super) struct ExitNotice(pub(super) mpsc::Sender<()>);

impl Drop for ExitNotice {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

pub(super) struct Control {
    pub(super) signals: SigSet,
    pub(super) phase: watch::Sender<Phase>,
    pub(super) exits: mpsc::Receiver<()>,
    pub(super) stats: Vec<Arc<WorkerStats>>,
}

impl Control {
    /// Waits for a signal; fails when a worker dies first.
    pub(super) fn serve(&self) -> Result<Signal, Error> {
        loop {
            if let Some(signal) = self.wait(TICK)? {
                return Ok(signal);
            }
        }
    }

    /// Refuses new connections, waits for those in flight up to `timeout`
    /// (or a second signal), then resets what is left.
    pub(super) fn drain(&self, signal: Signal, timeout: Duration) -> Result<(), Error> {
        let _ = self.phase.send(Phase::Draining);
        let in_flight = self.active();
        info!(%signal, in_flight, timeout = ?timeout, "sluice draining: new connections are refused");
        let deadline = Instant::now() + timeout;
        loop {
            let active = self.active();
            if active == 0 {
                info!("drained: every connection ended; sluice stopping");
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                warn!(
                    open = active,
                    "drain timeout: resetting the connections still open"
                );
                break;
            }
            if let Some(second) = self.wait(TICK.min(deadline - now))? {
                warn!(signal = %second, open = active, "second signal: resetting the connections still open");
                break;
            }
        }
        self.abort()?;
        info!("sluice stopping");
        Ok(())
    }

    /// Resets every connection and waits (briefly) until the workers have.
    fn abort(&self) -> Result<(), Error> {
        let _ = self.phase.send(Phase::Aborting);
        let deadline = Instant::now() + ABORT_WAIT;
        while self.active() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// One wait for a signal, with a look at the workers' health.
    fn wait(&self, timeout: Duration) -> Result<Option<Signal>, Error> {
        if PANICKED.load(Ordering::SeqCst) {
            let _ = self.abort();
            return Err(Error::WorkerDied("panicked"));
        }
        if self.exits.try_recv().is_ok() {
            let _ = self.abort();
            return Err(Error::WorkerDied("ended"));
        }
        linux::wait_signal(&self.signals, timeout).map_err(Error::Signals)
    }

    fn active(&self) -> u64 {
        stats::total(&self.stats, |s| &s.active)
    }
}
