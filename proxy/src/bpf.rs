//! What the two BPF users (the sk_lookup interceptor and the sockmap
//! forwarder) share: libbpf's messages in sluice's log, and the kernel
//! release their errors name.

use std::sync::Once;

use libbpf_rs::PrintLevel;

/// Sends libbpf's messages (the verifier log among them) to the log rather
/// than straight to stderr. Once per process, whoever asks first.
pub fn log_to_tracing() {
    static LOGGING: Once = Once::new();
    LOGGING.call_once(|| {
        libbpf_rs::set_print(Some((PrintLevel::Info, libbpf_log)));
    });
}

fn libbpf_log(level: PrintLevel, message: String) {
    let message = message.trim_end();
    match level {
        PrintLevel::Warn => tracing::warn!(target: "libbpf", "{message}"),
        PrintLevel::Info => tracing::debug!(target: "libbpf", "{message}"),
        PrintLevel::Debug => tracing::trace!(target: "libbpf", "{message}"),
    }
}

/// `uname -r`, for errors that depend on the kernel.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}
