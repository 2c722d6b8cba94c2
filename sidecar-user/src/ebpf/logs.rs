//! Kernel log lines (aya-log) forwarded into tracing. aya-log writes `log` records;
//! the tracing subscriber installs a `log` bridge, so they come out with our other logs.

use aya_log::EbpfLogger;
use tokio::io::{Interest, unix::AsyncFd};
use tracing::level_filters::LevelFilter;

/// The reader of the programs' log ring buffer.
pub type KernelLogger = EbpfLogger<&'static dyn log::Log>;

/// The aya-log level the programs are loaded with: the most verbose level tracing
/// would print, so disabled levels cost the kernel one branch and no ring-buffer write.
pub fn kernel_log_level() -> u8 {
    let level = match LevelFilter::current() {
        LevelFilter::OFF => return 0,
        LevelFilter::ERROR => aya_log::Level::Error,
        LevelFilter::WARN => aya_log::Level::Warn,
        LevelFilter::INFO => aya_log::Level::Info,
        LevelFilter::DEBUG => aya_log::Level::Debug,
        _ => aya_log::Level::Trace,
    };
    level as u8
}

/// Forwards records as they arrive, until the runtime stops.
pub async fn forward(logger: KernelLogger) {
    // SAFETY: the logger owns its ring buffer's fd for its whole life and always
    // reports that same fd; the AsyncFd owns the logger.
    let mut fd = match unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) } {
        Ok(fd) => fd,
        Err(error) => {
            let (_, error) = error.into_parts();
            tracing::warn!(%error, "cannot watch the kernel log buffer; eBPF log lines are lost");
            return;
        }
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
