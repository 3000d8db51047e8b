//! Persisting the durable position (the WAL position up to which every change is stored in
//! JetStream, a [`DurableLsn`](crate::telemetry::counters::DurableLsn)).
//!
//! The publisher advances it when the PubAcks of a whole transaction (and of every transaction
//! before it) are in; the wal thread reports it to PostgreSQL as the flush position and
//! persists it in a small state file, so a restart can resume from the later of the file and
//! the slot's `confirmed_flush_lsn` (when the file belongs to the same cluster, database and
//! slot, see [`super::position`]).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::pg::Lsn;

use super::position::{self, PositionIdentity, Recorded};

/// Errors reading or writing the state file.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    /// The file could not be read or written.
    #[error("state file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file does not hold a WAL position.
    #[error("state file {path} does not hold a WAL position ({reason}); remove it to resume from the slot")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// The file that remembers the last durable position between runs, with the identity it
/// belongs to (`key=value` lines, see [`position::render_state`]).
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
    identity: Option<PositionIdentity>,
    last_written: Lsn,
}

impl StateFile {
    /// A state file at `path` (not read yet).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        StateFile {
            path: path.into(),
            identity: None,
            last_written: Lsn::INVALID,
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sets what the positions written from now on belong to.
    pub fn set_identity(&mut self, identity: PositionIdentity) {
        self.identity = Some(identity);
    }

    /// The stored position and identity; `None` when the file does not exist (first start).
    pub fn load(&mut self) -> Result<Option<Recorded>, StateFileError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateFileError::Io {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        let recorded = position::parse_state(&text).map_err(|reason| StateFileError::Corrupt {
            path: self.path.clone(),
            reason,
        })?;
        self.last_written = recorded.lsn;
        Ok(Some(recorded))
    }

    /// Stores `lsn` if it is newer than what was stored (see [`StateFile::write`]).
    pub fn store(&mut self, lsn: Lsn) -> Result<(), StateFileError> {
        if lsn <= self.last_written {
            return Ok(());
        }
        self.write(lsn)
    }

    /// Writes `lsn` and the identity whatever the file held (an accepted gap may move the
    /// position back). Written to a temporary file created exclusively with mode 0600, synced,
    /// renamed over the old one, and the directory synced, so a crash leaves either the old or
    /// the new file, and the rename itself survives a power loss.
    pub fn write(&mut self, lsn: Lsn) -> Result<(), StateFileError> {
        let io = |source| StateFileError::Io {
            path: self.path.clone(),
            source,
        };
        let text = match &self.identity {
            Some(id) => position::render_state(lsn, id),
            None => format!("{lsn}\n"),
        };
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        // A crash between create and rename leaves the temporary file behind.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
            _ => {}
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(text.as_bytes()).map_err(io)?;
        f.sync_data().map_err(io)?;
        drop(f);
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        self.last_written = lsn;
        Ok(())
    }
}

/// Writes the state file on its own thread, so the wal thread never waits for the disk: a
/// synced write takes from under a millisecond to tens of milliseconds on a busy disk, and
/// the wal thread would hold back every change meanwhile.
///
/// The wal thread [requests](StateWriter::request) a position and confirms to PostgreSQL only
/// what [has been stored](StateWriter::stored), so the file is never behind the slot.
pub struct StateWriter {
    shared: Arc<WriterShared>,
    thread: Option<JoinHandle<()>>,
}

struct WriterShared {
    wanted: AtomicU64,
    stored: AtomicU64,
    stop: AtomicBool,
    error: Mutex<Option<StateFileError>>,
    /// A new identity for the file (after a promotion), taken by the writer thread.
    identity: Mutex<Option<PositionIdentity>>,
}

impl StateWriter {
    /// Starts the writer thread for `file` (already [loaded](StateFile::load), if it exists).
    pub fn spawn(mut file: StateFile) -> std::io::Result<StateWriter> {
        let shared = Arc::new(WriterShared {
            wanted: AtomicU64::new(file.last_written.0),
            stored: AtomicU64::new(file.last_written.0),
            stop: AtomicBool::new(false),
            error: Mutex::new(None),
            identity: Mutex::new(None),
        });
        let worker = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("state-file".into())
            .spawn(move || loop {
                let stop = worker.stop.load(Ordering::Acquire);
                let wanted = Lsn(worker.wanted.load(Ordering::Acquire));
                let new_identity = worker
                    .identity
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take();
                let renamed = new_identity.is_some();
                if let Some(id) = new_identity {
                    file.set_identity(id);
                }
                if wanted > file.last_written || renamed {
                    let lsn = wanted.max(file.last_written);
                    match file.write(lsn) {
                        Ok(()) => worker.stored.store(lsn.0, Ordering::Release),
                        Err(e) => {
                            *worker.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                            return;
                        }
                    }
                }
                if stop {
                    return;
                }
                // Every request, identity change and the stop unpark this thread (a token
                // given before it parks is kept): no periodic wake-up.
                std::thread::park();
            })?;
        Ok(StateWriter {
            shared,
            thread: Some(thread),
        })
    }

    /// Asks for `lsn` to be stored (a newer request replaces an older one).
    pub fn request(&self, lsn: Lsn) {
        if self.shared.wanted.fetch_max(lsn.0, Ordering::AcqRel) < lsn.0 {
            if let Some(t) = &self.thread {
                t.thread().unpark();
            }
        }
    }

    /// Records positions under `identity` from now on (the server moved to a new timeline);
    /// the file is rewritten at once.
    pub fn set_identity(&self, identity: PositionIdentity) {
        *self
            .shared
            .identity
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(identity);
        if let Some(t) = &self.thread {
            t.thread().unpark();
        }
    }

    /// The newest position stored in the file.
    pub fn stored(&self) -> Lsn {
        Lsn(self.shared.stored.load(Ordering::Acquire))
    }

    /// The error that stopped the writer, if any (reported once).
    pub fn take_error(&self) -> Option<StateFileError> {
        self.shared
            .error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Requests `lsn` and waits (at most `timeout`) until it is stored; the stored position.
    pub fn store_now(&self, lsn: Lsn, timeout: Duration) -> Result<Lsn, StateFileError> {
        self.request(lsn);
        let deadline = Instant::now() + timeout;
        while self.stored() < lsn && Instant::now() < deadline {
            if let Some(e) = self.take_error() {
                return Err(e);
            }
            if self.thread.as_ref().is_none_or(JoinHandle::is_finished) {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        match self.take_error() {
            Some(e) => Err(e),
            None => Ok(self.stored()),
        }
    }
}

impl Drop for StateWriter {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> PositionIdentity {
        PositionIdentity {
            system_id: "7312345678901234567".into(),
            timeline: 1,
            database: "app".into(),
            slot: "cdc_slot".into(),
        }
    }

    #[test]
    fn state_file_round_trip_and_errors() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("pgbridge-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.lsn");
        let _ = std::fs::remove_file(&path);
        let mut f = StateFile::new(&path);
        assert_eq!(f.load().unwrap(), None);
        f.set_identity(identity());
        f.store(Lsn(0x1_0000_0010)).unwrap();
        f.store(Lsn(5)).unwrap(); // older: ignored
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            position::render_state(Lsn(0x1_0000_0010), &identity())
        );
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        let mut g = StateFile::new(&path);
        assert_eq!(
            g.load().unwrap(),
            Some(Recorded {
                lsn: Lsn(0x1_0000_0010),
                identity: Some(identity())
            })
        );
        // `write` moves back too (an accepted gap); `store` does not.
        g.set_identity(identity());
        g.write(Lsn(0x20)).unwrap();
        assert_eq!(
            StateFile::new(&path).load().unwrap().unwrap().lsn,
            Lsn(0x20)
        );
        std::fs::write(&path, "garbage").unwrap();
        let err = StateFile::new(&path).load().unwrap_err();
        assert!(
            err.to_string().contains("does not hold a WAL position"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn old_format_is_read_and_upgraded_on_the_next_write() {
        let dir = std::env::temp_dir().join(format!("pgbridge-old-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.lsn");
        std::fs::write(&path, "0/16B3748\n").unwrap();
        let mut f = StateFile::new(&path);
        let old = f.load().unwrap().unwrap();
        assert_eq!((old.lsn, old.identity), (Lsn(0x16B3748), None));
        f.set_identity(identity());
        f.store(Lsn(0x16B3800)).unwrap();
        let new = StateFile::new(&path).load().unwrap().unwrap();
        assert_eq!((new.lsn, new.identity), (Lsn(0x16B3800), Some(identity())));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_stale_temporary_file_is_replaced_not_followed() {
        let dir = std::env::temp_dir().join(format!("pgbridge-tmp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.lsn");
        let tmp = dir.join("s.lsn.tmp");
        let elsewhere = dir.join("elsewhere");
        std::fs::write(&elsewhere, "keep").unwrap();
        // A stale leftover, here a symlink: it is removed, not written through.
        std::os::unix::fs::symlink(&elsewhere, &tmp).unwrap();
        let mut f = StateFile::new(&path);
        f.set_identity(identity());
        f.store(Lsn(0x30)).unwrap();
        assert_eq!(std::fs::read_to_string(&elsewhere).unwrap(), "keep");
        assert!(!tmp.exists());
        assert_eq!(
            StateFile::new(&path).load().unwrap().unwrap().lsn,
            Lsn(0x30)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn state_writer_stores_in_the_background() {
        let dir = std::env::temp_dir().join(format!("pgbridge-writer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.lsn");
        let _ = std::fs::remove_file(&path);
        let w = StateWriter::spawn(StateFile::new(&path)).unwrap();
        assert_eq!(w.stored(), Lsn::INVALID);
        w.request(Lsn(0x20));
        assert_eq!(
            w.store_now(Lsn(0x30), Duration::from_secs(10)).unwrap(),
            Lsn(0x30)
        );
        w.request(Lsn(0x10)); // older: ignored
        drop(w);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "0/30\n");
        // An unwritable path is reported, not hidden.
        let w = StateWriter::spawn(StateFile::new(dir.join("missing/s.lsn"))).unwrap();
        assert!(w.store_now(Lsn(1), Duration::from_secs(10)).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
