//! Costs injected on purpose, for `make bench-check-selftest` only: the
//! regression check must fail on them. Built only with the cargo feature
//! `bench-inject`; a release build has no trace of it.
//!
//! `SLUICE_BENCH_INJECT_SPIN_US`: that many microseconds of CPU burnt per
//! connection (on the vDSO clock, so no syscall); `SLUICE_BENCH_INJECT_SYSCALL=1`:
//! one redundant `getsockopt(SO_RCVBUF)` per connection.

use std::os::fd::AsRawFd;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

struct Injected {
    spin: Duration,
    syscall: bool,
}

fn injected() -> &'static Injected {
    static INJECTED: OnceLock<Injected> = OnceLock::new();
    INJECTED.get_or_init(|| Injected {
        spin: std::env::var("SLUICE_BENCH_INJECT_SPIN_US")
            .ok()
            .and_then(|us| us.parse().ok())
            .map_or(Duration::ZERO, Duration::from_micros),
        syscall: std::env::var("SLUICE_BENCH_INJECT_SYSCALL").as_deref() == Ok("1"),
    })
}

/// Called once per accepted connection.
pub fn per_connection(socket: &impl AsRawFd) {
    let injected = injected();
    if !injected.spin.is_zero() {
        let started = Instant::now();
        while started.elapsed() < injected.spin {
            std::hint::spin_loop();
        }
    }
    if injected.syscall {
        let _ = crate::linux::receive_buffer(socket);
    }
}
