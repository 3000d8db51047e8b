//! Test harness of pgbridge, shared by the integration tests (`tests/it`) and the benchmark
//! (`examples/bench`): throw-away PostgreSQL and nats-server processes (single servers and
//! JetStream clusters) on random loopback ports, the `bridge` process, certificates, stream
//! and slot helpers, a seeded RNG, workloads and the mirror oracle.
//!
//! Each server lives in its own temporary directory and is killed, and the directory removed,
//! when its handle is dropped, also when the test panics. Binaries are found through
//! `PG_BIN` (directory of `initdb`/`postgres`) and `NATS_SERVER_BIN` (path of `nats-server`),
//! else on `PATH`, else (PostgreSQL) under `/usr/lib/postgresql/*/bin`.
//!
//! PostgreSQL refuses to run as root; when the tests run as root the harness runs `initdb` and
//! `postgres` as the unprivileged `postgres` account (created by the Debian package).
#![warn(missing_docs)]

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub mod bridge;
pub mod certs;
pub mod cluster;
pub mod kafka;
pub mod kafka_cluster;
pub mod load;
pub mod nats;
pub mod oracle;
pub mod pg;
pub mod proc;
pub mod rng;
pub mod slot;
pub mod standby;
pub mod stream;

pub use bridge::{bridge_bin, bridge_command, split_msg_id, state_file_lsn, BridgeProcess};
pub use certs::TestCerts;
pub use cluster::NatsCluster;
pub use kafka::{KafkaClient, KafkaRecord, KafkaServer};
pub use kafka_cluster::KafkaCluster;
pub use load::InsertLoad;
pub use nats::{nats_server_bin, with_nats, NatsServer};
pub use pg::{pg_bin_dir, setup_app_db, PgServer, StopMode, PG_SUPERUSER, READER_PASSWORD};
pub use proc::KillOnDrop;
pub use rng::Rng;
pub use slot::{confirmed_flush, wait_caught_up};
pub use stream::{assert_once_in_order, json_row_ids, read_stream, stream_len, StoredMessage};

/// How long a server may take to accept connections before the test fails.
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a server may take to exit after being asked to.
pub(crate) const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Makes names (directories, passwords, serials) unique within the process.
pub(crate) static COUNTER: AtomicU32 = AtomicU32::new(0);

static HEAVY: Mutex<()> = Mutex::new(());

/// Held by the tests that must not run at the same moment as each other in one test binary:
/// those that run long workloads, clusters or several bridges, kill processes on purpose, or
/// measure memory or timing. The integration tests run on as many threads as there are CPUs,
/// so without it two of them could overlap and starve each other. A test that failed while
/// holding it does not block the others (the poison is ignored).
pub fn heavy() -> MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

/// A fresh, empty directory under the system temp dir, removed on drop.
pub struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    /// Creates `pgbridge-test-<prefix>-<pid>-<n>-<nanos>`.
    pub fn new(prefix: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let path = std::env::temp_dir().join(format!(
            "pgbridge-test-{prefix}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path, keep: false }
    }

    /// `path` itself, created when missing and kept on drop (a directory the caller owns,
    /// e.g. the benchmark's, whose logs outlive the run).
    pub fn kept(path: &Path) -> Self {
        fs::create_dir_all(path).expect("create directory");
        TempDir {
            path: path.to_path_buf(),
            keep: true,
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; servers bind it right after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

pub(crate) fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Both servers, as most integration tests need them.
pub struct TestEnv {
    /// PostgreSQL.
    pub pg: PgServer,
    /// nats-server with JetStream.
    pub nats: NatsServer,
}

impl TestEnv {
    /// Starts PostgreSQL and nats-server in parallel.
    pub fn start() -> Self {
        let nats = std::thread::spawn(NatsServer::start);
        let pg = PgServer::start();
        let nats = nats.join().expect("nats-server start failed");
        TestEnv { pg, nats }
    }
}

/// Polls `f` until it returns `Some`, at most `timeout`; panics with `what` otherwise.
pub fn wait_for<T>(what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
    wait_for_logged(what, timeout, &[], f)
}

/// [`wait_for`] whose panic also shows the logs of `processes` (name, process), so a timeout
/// says what each of them was doing.
pub fn wait_for_logged<T>(
    what: &str,
    timeout: Duration,
    processes: &[(&str, &BridgeProcess)],
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            let mut logs = String::new();
            for (name, p) in processes {
                logs.push_str(&format!("\n{name} log:\n{}\n", p.log()));
            }
            panic!("timed out after {timeout:?} waiting for {what}{logs}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}
