//! Spool files for streamed (in-progress) transactions.
//!
//! With pgoutput protocol 2, PostgreSQL sends the changes of a large transaction before it
//! commits, in blocks that may be interleaved with other transactions. Nothing may be
//! published before the commit, and a `ROLLBACK TO SAVEPOINT` (Stream Abort with a subxid)
//! must drop only that subtransaction's changes. Keeping the raw messages in memory would make
//! the bridge's memory grow with the transaction, so they go to one append-only file per
//! transaction, as PostgreSQL's own apply worker does: a subtransaction abort truncates the file
//! where that subtransaction first appeared, Stream Commit replays it, Stream Abort deletes it.
//!
//! The files hold row data, so the directory is private: created with mode 0700, refused when
//! it is a symlink, belongs to another user or is open to others; each file is created anew
//! (never an existing one, never through a symlink) with mode 0600.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::pg::Lsn;

/// Errors of the spool directory and files.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// Reading or writing failed.
    #[error("spool file {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The directory is not private to the bridge.
    #[error("spool directory {path} {reason}: the spool holds row data, so it must be a directory of the bridge's own user with mode 0700 (remove it, fix it, or choose another with --spool-dir)")]
    NotPrivate {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

impl SpoolError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        SpoolError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// True when the directory itself is unusable (a configuration problem).
    pub fn is_configuration(&self) -> bool {
        matches!(self, SpoolError::NotPrivate { .. })
    }
}

/// Name of the spool file of transaction `xid`.
fn file_name(xid: u32) -> String {
    format!("xid-{xid}.spool")
}

/// True for names [`file_name`] makes.
fn is_spool_file(name: &str) -> bool {
    name.strip_prefix("xid-")
        .and_then(|rest| rest.strip_suffix(".spool"))
        .is_some_and(|xid| !xid.is_empty() && xid.bytes().all(|b| b.is_ascii_digit()))
}

/// Makes sure `dir` exists and is private: created with mode 0700 when missing; refused when it
/// is not a directory (a symlink is not followed), belongs to another user, or grants any
/// access to group or others. Run at start, before anything is streamed.
pub fn ensure_private_dir(dir: &Path) -> Result<(), SpoolError> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| SpoolError::io(dir, e))?;
        }
        Err(e) => return Err(SpoolError::io(dir, e)),
        Ok(_) => {}
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| SpoolError::io(dir, e))?;
    let not_private = |reason: String| SpoolError::NotPrivate {
        path: dir.to_path_buf(),
        reason,
    };
    if meta.file_type().is_symlink() {
        return Err(not_private("is a symbolic link".into()));
    }
    if !meta.is_dir() {
        return Err(not_private("is not a directory".into()));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if meta.uid() != uid {
        return Err(not_private(format!(
            "belongs to uid {}, not to the bridge's uid {uid}",
            meta.uid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(not_private(format!(
            "has mode {:04o}, open to other users",
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

struct SpoolFile {
    path: PathBuf,
    writer: BufWriter<File>,
    len: u64,
    /// Offset where each subtransaction's first message starts.
    first_offset: HashMap<u32, u64>,
}

/// The spool files of the streamed transactions in progress, keyed by top-level xid.
pub struct Spool {
    dir: PathBuf,
    files: HashMap<u32, SpoolFile>,
}

/// One spooled message: its WAL position and its pgoutput bytes (with the xid prefix it had
/// inside the stream block).
pub struct SpooledMessage {
    /// XLogData position of the message.
    pub lsn: Lsn,
    /// The pgoutput message.
    pub data: Vec<u8>,
}

impl Spool {
    /// A spool in the private directory `dir` (see [`ensure_private_dir`]). Spool files an
    /// earlier run left there are stale (PostgreSQL streams those transactions again) and are
    /// removed; nothing else in the directory is touched.
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, SpoolError> {
        let dir = dir.into();
        ensure_private_dir(&dir)?;
        for entry in std::fs::read_dir(&dir).map_err(|e| SpoolError::io(&dir, e))? {
            let entry = entry.map_err(|e| SpoolError::io(&dir, e))?;
            if entry.file_name().to_str().is_some_and(is_spool_file) {
                // Removes a symlink itself, never its target.
                std::fs::remove_file(entry.path()).map_err(|e| SpoolError::io(&entry.path(), e))?;
            }
        }
        Ok(Spool {
            dir,
            files: HashMap::new(),
        })
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of transactions being spooled.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// True when no transaction is being spooled.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Appends a message of subtransaction `subxid` (may equal `xid`) to transaction `xid`.
    pub fn append(
        &mut self,
        xid: u32,
        subxid: u32,
        lsn: Lsn,
        data: &[u8],
    ) -> Result<(), SpoolError> {
        let f = match self.files.entry(xid) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let path = self.dir.join(file_name(xid));
                let file = create_new(&path)?;
                e.insert(SpoolFile {
                    path,
                    writer: BufWriter::with_capacity(64 * 1024, file),
                    len: 0,
                    first_offset: HashMap::new(),
                })
            }
        };
        f.first_offset.entry(subxid).or_insert(f.len);
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let io = |source| SpoolError::io(&f.path, source);
        f.writer.write_all(&len.to_be_bytes()).map_err(io)?;
        f.writer.write_all(&lsn.0.to_be_bytes()).map_err(io)?;
        f.writer.write_all(data).map_err(io)?;
        f.len += 12 + data.len() as u64;
        Ok(())
    }

    /// Stream Abort: drops the whole transaction when `subxid == xid`, otherwise everything
    /// from the subtransaction's first message on (later messages belong to subtransactions
    /// nested in it, aborted with it).
    pub fn abort(&mut self, xid: u32, subxid: u32) -> Result<(), SpoolError> {
        if xid == subxid {
            if let Some(f) = self.files.remove(&xid) {
                drop(f.writer);
                let _ = std::fs::remove_file(&f.path);
            }
            return Ok(());
        }
        let Some(f) = self.files.get_mut(&xid) else {
            return Ok(());
        };
        let Some(&cut) = f.first_offset.get(&subxid) else {
            return Ok(());
        };
        let io = |source| SpoolError::io(&f.path, source);
        f.writer.flush().map_err(io)?;
        f.writer.get_ref().set_len(cut).map_err(io)?;
        f.writer.seek(SeekFrom::Start(cut)).map_err(io)?;
        f.len = cut;
        f.first_offset.retain(|_, off| *off < cut);
        Ok(())
    }

    /// Stream Commit: hands every spooled message of `xid` to `each` in order, then removes
    /// the file. A transaction with nothing spooled yields nothing.
    pub fn replay<E>(
        &mut self,
        xid: u32,
        mut each: impl FnMut(SpooledMessage) -> Result<(), E>,
    ) -> Result<Result<(), E>, SpoolError> {
        let Some(f) = self.files.remove(&xid) else {
            return Ok(Ok(()));
        };
        let path = f.path.clone();
        let io = |source| SpoolError::io(&path, source);
        let mut file = f.writer.into_inner().map_err(|e| io(e.into_error()))?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        let mut reader = BufReader::with_capacity(64 * 1024, file.take(f.len));
        let mut header = [0u8; 12];
        let outcome = loop {
            match reader.read_exact(&mut header) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
                Err(e) => return Err(io(e)),
            }
            let (len, lsn) = header.split_at(4);
            let len = u32::from_be_bytes(len.try_into().unwrap_or_default()) as usize;
            let lsn = Lsn(u64::from_be_bytes(lsn.try_into().unwrap_or_default()));
            let mut data = vec![0u8; len];
            reader.read_exact(&mut data).map_err(io)?;
            if let Err(e) = each(SpooledMessage { lsn, data }) {
                break Err(e);
            }
        };
        drop(reader);
        let _ = std::fs::remove_file(&path);
        Ok(outcome)
    }

    /// Forgets every transaction (after a reconnect PostgreSQL streams them again from the
    /// start).
    pub fn clear(&mut self) {
        for (_, f) in self.files.drain() {
            drop(f.writer);
            let _ = std::fs::remove_file(&f.path);
        }
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        self.clear();
    }
}

/// Creates `path` for reading and writing with mode 0600; never opens an existing file or
/// follows a symlink. A leftover file of the same name (a crash between creating and removing
/// it) is removed first.
fn create_new(path: &Path) -> Result<File, SpoolError> {
    let open = || {
        OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
    };
    match open() {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::remove_file(path).map_err(|e| SpoolError::io(path, e))?;
            open().map_err(|e| SpoolError::io(path, e))
        }
        other => other.map_err(|e| SpoolError::io(path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(spool: &mut Spool, xid: u32) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        spool
            .replay::<()>(xid, |m| {
                out.push((m.lsn.0, m.data));
                Ok(())
            })
            .unwrap()
            .unwrap();
        out
    }

    #[test]
    fn subtransaction_abort_truncates_and_commit_replays() {
        let dir = std::env::temp_dir().join(format!("pgbridge-spool-test-{}", std::process::id()));
        let mut spool = Spool::new(&dir).unwrap();
        spool.append(10, 10, Lsn(1), b"a").unwrap();
        spool.append(10, 11, Lsn(2), b"bb").unwrap();
        spool.append(20, 20, Lsn(3), b"other").unwrap();
        spool.append(10, 12, Lsn(4), b"nested").unwrap();
        spool.abort(10, 11).unwrap();
        spool.append(10, 13, Lsn(5), b"after").unwrap();
        spool.abort(10, 99).unwrap(); // unknown subxact: nothing
        assert_eq!(spool.len(), 2);
        assert_eq!(
            collect(&mut spool, 10),
            vec![(1, b"a".to_vec()), (5, b"after".to_vec())]
        );
        spool.abort(20, 20).unwrap();
        assert!(collect(&mut spool, 20).is_empty());
        assert!(spool.is_empty());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        drop(spool);
        std::fs::remove_dir(&dir).unwrap();
    }

    #[test]
    fn replay_stops_at_the_callers_error() {
        let dir = std::env::temp_dir().join(format!("pgbridge-spool-test2-{}", std::process::id()));
        let mut spool = Spool::new(&dir).unwrap();
        for i in 0..5u8 {
            spool.append(1, 1, Lsn(i.into()), &[i]).unwrap();
        }
        let mut seen = 0;
        let r = spool
            .replay(1, |_| {
                seen += 1;
                if seen == 3 {
                    Err("stop")
                } else {
                    Ok(())
                }
            })
            .unwrap();
        assert_eq!(r, Err("stop"));
        assert_eq!(seen, 3);
        spool.clear();
        drop(spool);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pgbridge-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn the_directory_and_files_are_private() {
        let base = scratch("spool-private");
        let dir = base.join("a").join("spool");
        let mut spool = Spool::new(&dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        spool.append(7, 7, Lsn(1), b"row").unwrap();
        assert_eq!(mode(&dir.join("xid-7.spool")), 0o600);
        drop(spool);
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn open_symlinked_or_foreign_directories_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let base = scratch("spool-refused");
        std::fs::create_dir_all(&base).unwrap();
        let open = base.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = Spool::new(&open)
            .err()
            .expect("an open directory is refused");
        assert!(e.is_configuration());
        assert!(e.to_string().contains("mode 0755"), "{e}");

        let target = base.join("target");
        std::fs::create_dir(&target).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o700)).unwrap();
        let link = base.join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = Spool::new(&link).err().expect("a symlink is refused");
        assert!(e.to_string().contains("symbolic link"), "{e}");

        let file = base.join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(Spool::new(&file).is_err());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn stale_spool_files_go_and_nothing_else_is_touched() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("spool-stale");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(dir.join("xid-12.spool"), b"stale").unwrap();
        std::fs::write(dir.join("notes.txt"), b"keep").unwrap();
        // A symlink planted under a spool file's name is removed, its target left alone.
        let outside = scratch("spool-outside");
        std::fs::write(&outside, b"victim").unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("xid-13.spool")).unwrap();
        let mut spool = Spool::new(&dir).unwrap();
        assert!(!dir.join("xid-12.spool").exists());
        assert!(std::fs::symlink_metadata(dir.join("xid-13.spool")).is_err());
        assert_eq!(std::fs::read(&outside).unwrap(), b"victim");
        assert_eq!(std::fs::read(dir.join("notes.txt")).unwrap(), b"keep");
        spool.append(13, 13, Lsn(1), b"new").unwrap();
        assert_eq!(std::fs::read(&outside).unwrap(), b"victim");
        drop(spool);
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_file(&outside).unwrap();
    }

    #[test]
    fn spool_file_names() {
        assert!(is_spool_file(&file_name(0)));
        assert!(is_spool_file(&file_name(u32::MAX)));
        for other in [
            "xid-.spool",
            "xid-1.spoolx",
            "xid-a.spool",
            "notes.txt",
            "xid-1",
        ] {
            assert!(!is_spool_file(other), "{other}");
        }
    }
}
