//! A steady insert load on one table.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pgbridge::pg::conn::{ConnectionKind, PgConnection};

use crate::pg::PgServer;

/// database `app`, a few rows per transaction, until stopped or its own bounds (time, count).
/// One writer and increasing ids make commit order the order of the ids.
pub struct InsertLoad {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    committed: std::sync::Arc<std::sync::atomic::AtomicU64>,
    handle: Option<std::thread::JoinHandle<u64>>,
}

impl InsertLoad {
    /// Starts the writer: transactions of 1–3 inserts, a few milliseconds apart.
    pub fn start(pg: &PgServer, table: &str, max_time: Duration, max_txns: u64) -> Self {
        use std::sync::atomic::{AtomicBool, AtomicU64};
        let params = pg.params("app");
        let table = table.to_owned();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let committed = std::sync::Arc::new(AtomicU64::new(0));
        let (stop_flag, counter) = (stop.clone(), committed.clone());
        let handle = std::thread::spawn(move || {
            let refs: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let mut conn = PgConnection::connect(&refs, ConnectionKind::Normal).expect("load");
            let started = Instant::now();
            let (mut next_id, mut txns) = (1u64, 0u64);
            while !stop_flag.load(Ordering::Relaxed)
                && started.elapsed() < max_time
                && txns < max_txns
            {
                let last = next_id + txns % 3;
                let inserts: String = (next_id..=last)
                    .map(|id| format!(" INSERT INTO {table} (id) VALUES ({id});"))
                    .collect();
                conn.execute(&format!("BEGIN;{inserts} COMMIT;"))
                    .unwrap_or_else(|e| panic!("load transaction {txns} failed: {e}"));
                next_id = last + 1;
                txns += 1;
                counter.store(next_id - 1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
            next_id - 1
        });
        InsertLoad {
            stop,
            committed,
            handle: Some(handle),
        }
    }

    /// Rows committed so far (the highest id).
    pub fn rows(&self) -> u64 {
        self.committed.load(Ordering::Relaxed)
    }

    /// Stops the writer; the number of rows it committed (ids 1..=n).
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let handle = self.handle.take().expect("load thread");
        handle.join().expect("load thread panicked")
    }
}

impl Drop for InsertLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
