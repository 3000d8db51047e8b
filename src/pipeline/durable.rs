//! Durable-LSN tracking: the WAL position up to which every change is stored in JetStream.
//!
//! The publisher advances it when the PubAcks of a whole transaction (and of every transaction
//! before it) are in; the wal thread reports it to PostgreSQL as the flush position and
//! persists it in a small state file, so a restart can resume from the later of the file and
//! the slot's `confirmed_flush_lsn`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;

use crate::pg::Lsn;

/// Shared, monotonic durable position (an atomic on its own cache line: written by the
/// publisher, read by the wal thread).
#[derive(Clone, Debug, Default)]
pub struct DurableLsn(Arc<CachePadded<AtomicU64>>);

impl DurableLsn {
    /// Starts at `lsn` (the position streaming resumes from: everything before it is durable).
    pub fn new(lsn: Lsn) -> Self {
        DurableLsn(Arc::new(CachePadded::new(AtomicU64::new(lsn.0))))
    }

    /// The current durable position.
    pub fn get(&self) -> Lsn {
        Lsn(self.0.load(Ordering::Acquire))
    }

    /// Moves the position forward; never backwards.
    pub fn advance(&self, lsn: Lsn) {
        self.0.fetch_max(lsn.0, Ordering::AcqRel);
    }
}

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
    #[error("state file {path} does not hold a WAL position ({content:?}); remove it to resume from the slot")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What it holds (first 40 characters).
        content: String,
    },
}

/// The file that remembers the last durable position between runs: one line `X/X`.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
    last_written: Lsn,
}

impl StateFile {
    /// A state file at `path` (not read yet).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        StateFile {
            path: path.into(),
            last_written: Lsn::INVALID,
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored position; `None` when the file does not exist (first start).
    pub fn load(&mut self) -> Result<Option<Lsn>, StateFileError> {
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
        let lsn: Lsn = text.trim().parse().map_err(|_| StateFileError::Corrupt {
            path: self.path.clone(),
            content: text.chars().take(40).collect(),
        })?;
        self.last_written = lsn;
        Ok(Some(lsn))
    }

    /// Stores `lsn` if it is newer than what was stored: written to a temporary file, synced
    /// and renamed over the old one, so a crash leaves either the old or the new position.
    pub fn store(&mut self, lsn: Lsn) -> Result<(), StateFileError> {
        if lsn <= self.last_written {
            return Ok(());
        }
        let io = |source| StateFileError::Io {
            path: self.path.clone(),
            source,
        };
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        writeln!(f, "{lsn}").map_err(io)?;
        f.sync_data().map_err(io)?;
        drop(f);
        std::fs::rename(&tmp, &self.path).map_err(io)?;
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
}

impl StateWriter {
    /// Starts the writer thread for `file` (already [loaded](StateFile::load), if it exists).
    pub fn spawn(mut file: StateFile) -> std::io::Result<StateWriter> {
        let shared = Arc::new(WriterShared {
            wanted: AtomicU64::new(file.last_written.0),
            stored: AtomicU64::new(file.last_written.0),
            stop: AtomicBool::new(false),
            error: Mutex::new(None),
        });
        let worker = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("state-file".into())
            .spawn(move || loop {
                let stop = worker.stop.load(Ordering::Acquire);
                let wanted = Lsn(worker.wanted.load(Ordering::Acquire));
                if wanted > file.last_written {
                    match file.store(wanted) {
                        Ok(()) => worker.stored.store(wanted.0, Ordering::Release),
                        Err(e) => {
                            *worker.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                            return;
                        }
                    }
                }
                if stop {
                    return;
                }
                std::thread::park_timeout(Duration::from_secs(1));
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

    #[test]
    fn durable_lsn_never_moves_back() {
        let d = DurableLsn::new(Lsn(100));
        d.advance(Lsn(50));
        assert_eq!(d.get(), Lsn(100));
        d.advance(Lsn(200));
        assert_eq!(d.clone().get(), Lsn(200));
    }

    #[test]
    fn state_file_round_trip_and_errors() {
        let dir = std::env::temp_dir().join(format!("pgbridge-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.lsn");
        let _ = std::fs::remove_file(&path);
        let mut f = StateFile::new(&path);
        assert_eq!(f.load().unwrap(), None);
        f.store(Lsn(0x1_0000_0010)).unwrap();
        f.store(Lsn(5)).unwrap(); // older: ignored
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1/10\n");
        let mut g = StateFile::new(&path);
        assert_eq!(g.load().unwrap(), Some(Lsn(0x1_0000_0010)));
        std::fs::write(&path, "garbage").unwrap();
        let err = StateFile::new(&path).load().unwrap_err();
        assert!(
            err.to_string().contains("does not hold a WAL position"),
            "{err}"
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
