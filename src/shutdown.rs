//! A shutdown signal shared by every thread of the bridge.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Cloneable flag that asks every part of the bridge to stop.
///
/// Set by SIGINT/SIGTERM in the binary, by `POST /shutdown`, or by a test.
#[derive(Clone, Debug, Default)]
pub struct Shutdown(Arc<AtomicBool>);

impl Shutdown {
    /// A new, unset signal.
    pub fn new() -> Self {
        Self::default()
    }

    /// Ask every holder to stop.
    pub fn trigger(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// True once [`Shutdown::trigger`] was called.
    pub fn is_triggered(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// The underlying flag, for `signal_hook::flag::register`.
    pub fn flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.0)
    }
}
