//! Where the process is in its life: serving, draining or aborting, and
//! whether a worker panicked. The control thread sets it; the workers and
//! the admin side read it. A leaf: it depends on nothing else of sluice's.

use std::sync::atomic::{AtomicBool, Ordering};

/// What the control thread asks of every worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Accept and forward.
    Serving,
    /// Refuse new connections (reset); let those in flight finish.
    Draining,
    /// Reset every connection in flight, on both sides, now.
    Aborting,
}

/// Set by the panic hook: a worker panicked, the process must go.
pub static PANICKED: AtomicBool = AtomicBool::new(false);

/// Whether a worker panicked (the process is on its way out).
pub fn worker_panicked() -> bool {
    PANICKED.load(Ordering::SeqCst)
}
