//! Spool files for streamed (in-progress) transactions.
//!
//! With pgoutput protocol 2, PostgreSQL sends the changes of a large transaction before it
//! commits, in blocks that may be interleaved with other transactions. Nothing may be
//! published before the commit, and a `ROLLBACK TO SAVEPOINT` (Stream Abort with a subxid)
//! must drop only that subtransaction's changes. Keeping the raw messages in memory would make
//! the bridge's memory grow with the transaction, so they go to one append-only file per
//! transaction, as PostgreSQL's own apply worker does: a subtransaction abort truncates the file
//! where that subtransaction first appeared, Stream Commit replays it, Stream Abort deletes it.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::pg::Lsn;

/// Errors of the spool directory and files.
#[derive(Debug, thiserror::Error)]
#[error("spool file {path}: {source}")]
pub struct SpoolError {
    path: PathBuf,
    source: std::io::Error,
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
    /// A spool in a fresh directory `dir` (created; emptied if it exists).
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, SpoolError> {
        let dir = dir.into();
        let err = |source| SpoolError {
            path: dir.clone(),
            source,
        };
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(err)?;
        }
        std::fs::create_dir_all(&dir).map_err(err)?;
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
                let path = self.dir.join(format!("xid-{xid}.spool"));
                let file = OpenOptions::new()
                    .create(true)
                    .truncate(true)
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(|source| SpoolError {
                        path: path.clone(),
                        source,
                    })?;
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
        let io = |source| SpoolError {
            path: f.path.clone(),
            source,
        };
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
        let io = |source| SpoolError {
            path: f.path.clone(),
            source,
        };
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
        let io = |source| SpoolError {
            path: path.clone(),
            source,
        };
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
        let _ = std::fs::remove_dir_all(&self.dir);
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
        assert!(!dir.exists());
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
    }
}
