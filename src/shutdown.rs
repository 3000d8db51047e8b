//! A shutdown signal shared by every thread of the bridge, awaited rather than polled.

use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Cloneable signal that asks every part of the bridge to stop.
///
/// Triggered by SIGINT/SIGTERM in the binary, by `POST /shutdown`, or by a test. Async code
/// awaits [`Shutdown::triggered`]; threads block in [`Shutdown::wait_timeout`], or poll
/// [`Shutdown::wake_fd`] beside their own sockets.
#[derive(Clone, Debug, Default)]
pub struct Shutdown(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    flag: AtomicBool,
    notify: tokio::sync::Notify,
    lock: Mutex<()>,
    cond: Condvar,
    /// Made on the first [`Shutdown::wake_fd`]: (read end, write end); the trigger writes a
    /// byte that nobody reads, so the read end stays readable from then on.
    fds: OnceLock<(UnixStream, UnixStream)>,
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
        if let Some((_, write)) = self.0.fds.get() {
            // Non-blocking: one byte is enough, a full buffer already says it.
            let _ = (&*write).write(&[1]);
        }
    }

    /// A descriptor that becomes readable (and stays so) once the signal is triggered, for a
    /// thread that waits in `poll` on its own sockets: it sleeps until data or the signal
    /// comes instead of waking up periodically to look at the flag. `None` when no socket
    /// pair could be made (the caller then polls with a bounded timeout).
    pub fn wake_fd(&self) -> Option<RawFd> {
        // Made under the trigger's lock: either the trigger sees the pair and writes to it,
        // or the flag is already set when the caller looks at it after this.
        let _guard = self.0.lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.0.fds.get().is_none() {
            let (read, write) = UnixStream::pair().ok()?;
            write.set_nonblocking(true).ok()?;
            if self.is_triggered() {
                let _ = (&write).write(&[1]);
            }
            let _ = self.0.fds.set((read, write));
        }
        self.0.fds.get().map(|(read, _)| read.as_raw_fd())
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

    fn readable(fd: RawFd, ms: i32) -> bool {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
    }

    #[test]
    fn the_wake_fd_becomes_readable_on_the_trigger_and_stays_so() {
        let s = Shutdown::new();
        let fd = s.wake_fd().expect("a socket pair");
        assert_eq!(s.wake_fd(), Some(fd), "one pair per signal");
        assert!(!readable(fd, 0));
        s.clone().trigger();
        assert!(readable(fd, 30_000));
        assert!(readable(fd, 0), "still readable");
        // Made after the trigger: readable at once.
        let late = Shutdown::new();
        late.trigger();
        assert!(readable(late.wake_fd().unwrap(), 0));
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
