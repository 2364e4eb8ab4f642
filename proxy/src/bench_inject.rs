//! Costs injected on purpose, for `make bench-check-selftest` only: the
//! regression check must fail on them. Built only with the cargo feature
//! `bench-inject`; a release build has no trace of it.
//!
//! `SLUICE_BENCH_INJECT_WORK=N`: N rounds of dependent integer arithmetic
//! per connection, the shape of a real regression (more code on the
//! connection path): it costs the same instructions whatever the machine's
//! speed, so the check's instruction count sees it exactly, and its time
//! varies with the machine as real code does. `SLUICE_BENCH_INJECT_SYSCALL=1`:
//! one redundant `getsockopt(SO_RCVBUF)` per connection.

use std::hint::black_box;
use std::os::fd::AsRawFd;
use std::sync::OnceLock;

struct Injected {
    work: u64,
    syscall: bool,
}

fn injected() -> &'static Injected {
    static INJECTED: OnceLock<Injected> = OnceLock::new();
    INJECTED.get_or_init(|| Injected {
        work: std::env::var("SLUICE_BENCH_INJECT_WORK")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0),
        syscall: std::env::var("SLUICE_BENCH_INJECT_SYSCALL").as_deref() == Ok("1"),
    })
}

/// Called once per accepted connection.
pub fn per_connection(socket: &impl AsRawFd) {
    let injected = injected();
    let mut x = black_box(1u64);
    for _ in 0..injected.work {
        // A multiply-add chain: each round waits for the last, so the
        // compiler cannot fold it and the CPU cannot overlap it.
        x = black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
    }
    black_box(x);
    if injected.syscall {
        let _ = crate::linux::receive_buffer(socket);
    }
}
