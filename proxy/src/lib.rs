//! sluice: a transparent inbound TCP interceptor for Linux.
//!
//! See the README for the design; each module's header says what it owns.

pub mod admin;
#[cfg(feature = "bench-inject")]
pub mod bench_inject;
pub mod bpf;
pub mod config;
pub mod forward;
pub mod intercept;
pub mod istio;
pub mod lifecycle;
pub mod linux;
pub mod listener;
pub mod privileges;
pub mod routing;
pub mod server;
pub mod stats;
pub mod upstream;
mod uring;
