//! The small tokio runtime every thread that talks to NATS runs on: one per thread, current
//! thread only, with I/O and timers.

/// A current-thread runtime with I/O and timers enabled.
pub fn current_thread() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}
