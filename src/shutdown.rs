//! A shutdown signal shared by every thread of the bridge, awaited rather than polled.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Cloneable signal that asks every part of the bridge to stop.
///
/// Triggered by SIGINT/SIGTERM in the binary, by `POST /shutdown`, or by a test. Async code
/// awaits [`Shutdown::triggered`]; threads block in [`Shutdown::wait_timeout`].
#[derive(Clone, Debug, Default)]
pub struct Shutdown(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    flag: AtomicBool,
    notify: tokio::sync::Notify,
    lock: Mutex<()>,
    cond: Condvar,
}

impl Shutdown {
    /// A new, unset signal.
    pub fn new() -> Self {
        Self::default()
    }

    /// Ask every holder to stop, waking every waiter.
    pub fn trigger(&self) {
        // The lock orders the store with a waiter's check-then-wait, so no wake-up is lost.
        let _guard = self.0.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.0.flag.store(true, Ordering::SeqCst);
        self.0.notify.notify_waiters();
        self.0.cond.notify_all();
    }

    /// True once [`Shutdown::trigger`] was called.
    pub fn is_triggered(&self) -> bool {
        self.0.flag.load(Ordering::SeqCst)
    }

    /// Completes once the signal is triggered (at once if it already is).
    pub async fn triggered(&self) {
        loop {
            let notified = self.0.notify.notified();
            tokio::pin!(notified);
            // Registered before the check: a trigger in between still wakes this waiter.
            notified.as_mut().enable();
            if self.is_triggered() {
                return;
            }
            notified.await;
        }
    }

    /// Sleeps `d` unless the signal comes first; true when it did (async).
    pub async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.triggered() => true,
            _ = tokio::time::sleep(d) => self.is_triggered(),
        }
    }

    /// Runs `f` until it completes; `None` when the signal came first.
    pub async fn run_until<T>(&self, f: impl std::future::Future<Output = T>) -> Option<T> {
        tokio::select! {
            v = f => Some(v),
            _ = self.triggered() => None,
        }
    }

    /// Blocks the calling thread up to `d`, returning early (true) once the signal is
    /// triggered.
    pub fn wait_timeout(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut guard = self.0.lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if self.is_triggered() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            guard = self
                .0
                .cond
                .wait_timeout(guard, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_timeout_returns_early_on_trigger_and_times_out_without() {
        let s = Shutdown::new();
        assert!(!s.wait_timeout(Duration::from_millis(20)));
        let t = s.clone();
        let waiter = std::thread::spawn(move || t.wait_timeout(Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(20));
        s.trigger();
        assert!(waiter.join().unwrap());
        assert!(s.wait_timeout(Duration::from_secs(30)), "already triggered");
    }

    #[test]
    fn triggered_completes_for_waiters_before_and_after_the_trigger() {
        let rt = crate::runtime::current_thread().unwrap();
        let s = Shutdown::new();
        rt.block_on(async {
            let t = s.clone();
            let waiter = tokio::spawn(async move { t.triggered().await });
            assert!(!s.sleep(Duration::from_millis(20)).await);
            s.trigger();
            tokio::time::timeout(Duration::from_secs(30), waiter)
                .await
                .expect("woken")
                .unwrap();
            tokio::time::timeout(Duration::from_secs(30), s.triggered())
                .await
                .expect("already triggered");
            assert!(s.sleep(Duration::from_secs(30)).await);
        });
    }
}
