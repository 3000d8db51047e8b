//! Test harness: throw-away PostgreSQL and nats-server processes on random loopback ports.
//!
//! Each server lives in its own temporary directory and is killed, and the directory removed,
//! when its handle is dropped, also when the test panics. Binaries are found through
//! `PG_BIN` (directory of `initdb`/`postgres`) and `NATS_SERVER_BIN` (path of `nats-server`),
//! else on `PATH`, else (PostgreSQL) under `/usr/lib/postgresql/*/bin`.
//!
//! PostgreSQL refuses to run as root; when the tests run as root the harness runs `initdb` and
//! `postgres` as the unprivileged `postgres` account (created by the Debian package).
#![allow(dead_code)] // each test binary uses a different part of the harness

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use pgbridge::pg::conn::{ConnectionKind, PgConnection, QueryResult};

pub mod oracle;

/// How long a server may take to accept connections before the test fails.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a server may take to exit after being asked to.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A fresh, empty directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

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
        TempDir(path)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; servers bind it right after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Directory holding `initdb` and `postgres`.
pub fn pg_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        return PathBuf::from(dir);
    }
    if let Some(p) = which("initdb") {
        // Follow Debian's /usr/bin wrappers or /usr/local/bin symlinks to the real directory.
        let real = fs::canonicalize(&p).unwrap_or(p);
        if let Some(dir) = real.parent() {
            if dir.join("postgres").is_file() {
                return dir.to_path_buf();
            }
        }
    }
    let mut versions: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    versions.retain(|d| d.join("initdb").is_file());
    versions.sort_by_key(|d| {
        d.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    versions.pop().expect(
        "PostgreSQL server binaries not found: run scripts/install-deps.sh or set PG_BIN \
         to the directory holding initdb and postgres",
    )
}

/// Path of `nats-server`.
pub fn nats_server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NATS_SERVER_BIN") {
        return PathBuf::from(p);
    }
    which("nats-server")
        .expect("nats-server not found: run scripts/install-deps.sh or set NATS_SERVER_BIN")
}

/// uid/gid to run PostgreSQL as: ourselves, or the `postgres` account when we are root.
fn pg_run_as() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let passwd = fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    let line = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .expect("running as root needs the unprivileged 'postgres' account (install postgresql)");
    let f: Vec<&str> = line.split(':').collect();
    Some((f[2].parse().unwrap(), f[3].parse().unwrap()))
}

fn chown_tree(path: &Path, ids: Option<(u32, u32)>) {
    if let Some((uid, gid)) = ids {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown test dir");
    }
}

fn command_as(program: &Path, ids: Option<(u32, u32)>) -> Command {
    let mut cmd = Command::new(program);
    if let Some((uid, gid)) = ids {
        cmd.uid(uid).gid(gid);
        // The postgres account cannot read root's home or cwd.
        cmd.current_dir("/").env("HOME", "/tmp");
    }
    cmd
}

/// Sends `sig` to a child and waits for it, escalating to SIGKILL after the timeout.
fn stop_child(child: &mut Child, sig: i32, timeout: Duration) {
    if child.try_wait().ok().flatten().is_some() {
        return;
    }
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, sig) };
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// How to stop PostgreSQL (pg_ctl's modes as signals to the postmaster).
#[derive(Clone, Copy, Debug)]
pub enum StopMode {
    /// SIGINT: abort sessions, checkpoint, exit.
    Fast,
    /// SIGQUIT: exit without a checkpoint, as a crash.
    Immediate,
}

/// Superuser name of the test clusters.
pub const PG_SUPERUSER: &str = "postgres";

/// A throw-away PostgreSQL cluster with `wal_level=logical` on a random loopback port.
pub struct PgServer {
    dir: TempDir,
    bin: PathBuf,
    ids: Option<(u32, u32)>,
    port: u16,
    password: String,
    settings: Vec<(String, String)>,
    child: Option<Child>,
}

impl PgServer {
    /// Starts a cluster with the default test settings.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a cluster with extra `postgresql.conf` settings (name, value).
    pub fn start_with(extra: &[(&str, &str)]) -> Self {
        let dir = TempDir::new("pg");
        let ids = pg_run_as();
        chown_tree(dir.path(), ids);
        let bin = pg_bin_dir();
        let password = format!(
            "pw-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let pwfile = dir.path().join("pwfile");
        fs::write(&pwfile, format!("{password}\n")).unwrap();
        fs::set_permissions(&pwfile, fs::Permissions::from_mode(0o644)).unwrap();

        initdb(&bin, ids, dir.path());
        let mut settings: Vec<(String, String)> = [
            ("wal_level", "logical"),
            ("max_wal_senders", "20"),
            ("max_replication_slots", "20"),
            ("max_prepared_transactions", "5"),
            ("logical_decoding_work_mem", "64kB"),
            ("listen_addresses", "127.0.0.1"),
            ("fsync", "off"),
            ("full_page_writes", "off"),
            ("shared_buffers", "32MB"),
            ("max_connections", "50"),
            ("log_min_messages", "warning"),
            ("timezone", "UTC"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in extra {
            settings.retain(|(sk, _)| sk != k);
            settings.push((k.to_string(), v.to_string()));
        }
        let mut server = PgServer {
            dir,
            bin,
            ids,
            port: 0,
            password,
            settings,
            child: None,
        };
        server.start_again();
        server
    }

    /// (Re)starts the postmaster on the same data directory. The first start picks a free
    /// port (another one if the pick was taken meanwhile); a restart keeps the port, so
    /// clients configured with it (the bridge) reconnect, and retries it a few times before
    /// giving up. Waits until it accepts connections.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "PostgreSQL is already running");
        let restart = self.port != 0;
        for attempt in 0..5 {
            if !restart && (self.port == 0 || attempt > 0) {
                self.port = free_port();
            }
            if restart && attempt > 0 {
                // The old postmaster's socket may linger for a moment.
                std::thread::sleep(Duration::from_millis(200));
            }
            let log = fs::File::create(self.dir.path().join("postgres.log")).unwrap();
            chown_tree(&self.dir.path().join("postgres.log"), self.ids);
            let mut cmd = command_as(&self.bin.join("postgres"), self.ids);
            cmd.arg("-D")
                .arg(self.dir.path().join("data"))
                .arg("-p")
                .arg(self.port.to_string())
                .arg("-k")
                .arg(self.dir.path());
            for (k, v) in &self.settings {
                cmd.arg("-c").arg(format!("{k}={v}"));
            }
            let child = cmd
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("spawn postgres");
            self.child = Some(child);
            if self.wait_ready() {
                return;
            }
            // Port race or slow start: stop and retry (on another port for a first start).
            if let Some(mut c) = self.child.take() {
                stop_child(&mut c, libc::SIGQUIT, STOP_TIMEOUT);
            }
        }
        panic!(
            "PostgreSQL did not start on port {}; log:\n{}",
            self.port,
            self.log()
        );
    }

    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if c.try_wait().ok().flatten().is_some() {
                    return false;
                }
            }
            if self.try_connect("postgres").is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Replaces the cluster by a new one (a new system identifier, no databases, roles or
    /// slots but the defaults) on the same port, as a re-created database server would be.
    #[allow(dead_code)]
    pub fn recreate(&mut self) {
        self.stop(StopMode::Fast);
        fs::remove_dir_all(self.dir.path().join("data")).expect("remove the data directory");
        initdb(&self.bin, self.ids, self.dir.path());
        self.start_again();
    }

    /// Moves the cluster to a new timeline, as a promotion or a point-in-time restore does:
    /// stops it, starts it in archive recovery with nothing to restore, and waits until it
    /// has ended recovery on the next timeline. Slots and data stay.
    #[allow(dead_code)]
    pub fn new_timeline(&mut self) {
        self.stop(StopMode::Fast);
        let signal = self.dir.path().join("data/recovery.signal");
        fs::write(&signal, "").unwrap();
        chown_tree(&signal, self.ids);
        self.settings
            .push(("restore_command".to_string(), "false".to_string()));
        self.start_again();
        self.settings.retain(|(k, _)| k != "restore_command");
        wait_for("recovery to end", START_TIMEOUT, || {
            let r = self.connect("postgres").query("SELECT pg_is_in_recovery()");
            r.ok()
                .filter(|r| r.rows[0][0].as_deref() == Some("f"))
                .map(|_| ())
        });
    }

    /// Stops the postmaster, keeping the data directory for [`PgServer::start_again`].
    pub fn stop(&mut self, mode: StopMode) {
        if let Some(mut c) = self.child.take() {
            let sig = match mode {
                StopMode::Fast => libc::SIGINT,
                StopMode::Immediate => libc::SIGQUIT,
            };
            stop_child(&mut c, sig, STOP_TIMEOUT);
        }
    }

    /// The cluster's temporary directory (data, socket, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server log so far (for failure messages).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// Loopback address the server listens on.
    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Superuser password (host connections use scram-sha-256).
    pub fn password(&self) -> &str {
        &self.password
    }

    /// libpq keywords for a superuser connection to `db`.
    pub fn params(&self, db: &str) -> Vec<(&'static str, String)> {
        vec![
            ("host", self.host().to_string()),
            ("port", self.port.to_string()),
            ("user", PG_SUPERUSER.to_string()),
            ("password", self.password.clone()),
            ("dbname", db.to_string()),
            ("connect_timeout", "10".to_string()),
            ("application_name", "pgbridge-test".to_string()),
        ]
    }

    /// A `postgres://` URL for the superuser and `db`.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://{}:{}@{}:{}/{}",
            PG_SUPERUSER,
            self.password,
            self.host(),
            self.port,
            db
        )
    }

    fn try_connect(&self, db: &str) -> Result<PgConnection, pgbridge::pg::conn::PgError> {
        let params = self.params(db);
        let refs: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
        PgConnection::connect(&refs, ConnectionKind::Normal)
    }

    /// A normal superuser connection to `db`.
    pub fn connect(&self, db: &str) -> PgConnection {
        self.try_connect(db)
            .unwrap_or_else(|e| panic!("connect to test PostgreSQL db {db}: {e}"))
    }

    /// Runs SQL in `db` and returns the last statement's rows; panics on error.
    pub fn sql(&self, db: &str, sql: &str) -> QueryResult {
        self.connect(db)
            .query(sql)
            .unwrap_or_else(|e| panic!("SQL failed: {e}\n{sql}"))
    }

    /// Creates a database and returns its name.
    pub fn create_database(&self, name: &str) -> String {
        self.sql("postgres", &format!("CREATE DATABASE \"{name}\""));
        name.to_string()
    }
}

/// Runs `initdb` into `{dir}/data` as the unprivileged user, with the superuser password of
/// `{dir}/pwfile`.
fn initdb(bin: &Path, ids: Option<(u32, u32)>, dir: &Path) {
    let pwfile = dir.join("pwfile");
    let data = dir.join("data");
    let out = command_as(&bin.join("initdb"), ids)
        .arg("-D")
        .arg(&data)
        .args([
            "-U",
            PG_SUPERUSER,
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        ])
        .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
        .arg(format!("--pwfile={}", pwfile.display()))
        .output()
        .expect("run initdb");
    assert!(
        out.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c, libc::SIGQUIT, Duration::from_secs(10));
        }
    }
}

/// A throw-away `nats-server -js` (or without `-js`, see [`NatsServer::start_without_jetstream`])
/// on a random loopback port with its own store directory.
pub struct NatsServer {
    dir: TempDir,
    bin: PathBuf,
    port: u16,
    jetstream: bool,
    extra_args: Vec<String>,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts nats-server with JetStream enabled.
    pub fn start() -> Self {
        Self::launch(true, &[])
    }

    /// Starts nats-server without JetStream (no `-js`), e.g. to test the error it causes.
    pub fn start_without_jetstream() -> Self {
        Self::launch(false, &[])
    }

    /// Starts nats-server with JetStream and extra command-line arguments, e.g.
    /// `&["--user", "u", "--pass", "p"]`. They are kept for [`NatsServer::start_again`].
    pub fn start_with_args(args: &[&str]) -> Self {
        Self::launch(true, args)
    }

    /// Starts nats-server with JetStream on `port`, e.g. one a bridge already tries to reach.
    pub fn start_on_port(port: u16) -> Self {
        let mut s = NatsServer {
            dir: TempDir::new("nats"),
            bin: nats_server_bin(),
            port,
            jetstream: true,
            extra_args: Vec::new(),
            child: None,
        };
        s.start_again();
        s
    }

    fn launch(jetstream: bool, args: &[&str]) -> Self {
        let mut s = NatsServer {
            dir: TempDir::new("nats"),
            bin: nats_server_bin(),
            port: 0,
            jetstream,
            extra_args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
        };
        s.start_again();
        s
    }

    /// (Re)starts on the same port and store directory, e.g. after [`NatsServer::stop`].
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "nats-server is already running");
        for attempt in 0..5 {
            if self.port == 0 || (attempt > 0 && !self.has_store()) {
                self.port = free_port();
            }
            let log = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.path().join("nats.log"))
                .unwrap();
            let mut cmd = Command::new(&self.bin);
            cmd.args(["-a", "127.0.0.1", "-p"])
                .arg(self.port.to_string());
            if self.jetstream {
                cmd.arg("-js").arg("-sd").arg(self.dir.path().join("store"));
            }
            let child = cmd
                .args(&self.extra_args)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display()));
            self.child = Some(child);
            if self.wait_ready() {
                return;
            }
            if let Some(mut c) = self.child.take() {
                stop_child(&mut c, libc::SIGKILL, STOP_TIMEOUT);
            }
            // Same store, same port is what a restart test wants: retry a few times first.
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("nats-server did not start; log:\n{}", self.log());
    }

    fn has_store(&self) -> bool {
        self.dir.path().join("store").exists()
    }

    /// Ready when it accepts a TCP connection and greets with `INFO`.
    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if c.try_wait().ok().flatten().is_some() {
                    return false;
                }
            }
            if let Ok(s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut line = String::new();
                if BufReader::new(s).read_line(&mut line).is_ok() && line.starts_with("INFO ") {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Stops the server gracefully (SIGTERM), keeping the store.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c, libc::SIGTERM, STOP_TIMEOUT);
        }
    }

    /// TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The store directory's parent (store, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(self.dir.path().join("nats.log")) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c, libc::SIGKILL, Duration::from_secs(10));
        }
    }
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

/// A child process (e.g. the bridge under test) killed when the handle is dropped, so a
/// failing test leaves nothing running.
pub struct KillOnDrop(pub Child);

impl KillOnDrop {
    /// Sends a signal (e.g. `libc::SIGTERM`).
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, sig) };
    }
}

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `f` until it returns `Some`, at most `timeout`; panics with `what` otherwise.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The slot's `confirmed_flush_lsn` (slots are cluster-wide: read from any database).
pub fn confirmed_flush(pg: &PgServer, slot: &str) -> Option<pgbridge::pg::Lsn> {
    pg.sql(
        "postgres",
        &format!(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = '{slot}'"
        ),
    )
    .rows
    .first()
    .and_then(|r| r[0].as_deref())
    .map(|s| s.parse().expect("an LSN from PostgreSQL"))
}

/// Waits (bounded) until `slot` confirms everything written so far; the confirmed position.
pub fn wait_caught_up(pg: &PgServer, slot: &str, timeout: Duration) -> pgbridge::pg::Lsn {
    let end: pgbridge::pg::Lsn = pg.sql("postgres", "SELECT pg_current_wal_lsn()::text").rows[0][0]
        .as_deref()
        .expect("current WAL")
        .parse()
        .expect("an LSN from PostgreSQL");
    wait_for(
        "the slot to confirm the current WAL position",
        timeout,
        || confirmed_flush(pg, slot).filter(|c| *c >= end),
    )
}

/// Password of the `bridge_reader` role that [`setup_app_db`] creates.
pub const READER_PASSWORD: &str = "reader-secret";

/// Creates database `app` with `schema_sql`, then runs the project's own `deploy/init.sh` in it
/// (role `bridge_reader`, publication `cdc_pub` for `tables`, or all tables when empty).
pub fn setup_app_db(pg: &PgServer, schema_sql: &str, tables: &str) {
    pg.create_database("app");
    if !schema_sql.is_empty() {
        pg.sql("app", schema_sql);
    }
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/init.sh"))
        .env("PGHOST", pg.host())
        .env("PGPORT", pg.port().to_string())
        .env("PGUSER", PG_SUPERUSER)
        .env("PGPASSWORD", pg.password())
        .env("PGDATABASE", "app")
        .env("BRIDGE_PG_PASSWORD", READER_PASSWORD)
        .env("BRIDGE_TABLES", tables)
        .output()
        .expect("run init.sh");
    assert!(
        out.status.success(),
        "init.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `bridge` binary set up for database `app` of `pg` as `bridge_reader`, publishing to
/// `nats_url`, with its state file in `state_dir` and its HTTP endpoints on a free loopback
/// port (`BRIDGE_PORT`; a `--port` flag wins). Add flags with `.args(...)`.
pub fn bridge_command(pg: &PgServer, nats_url: &str, state_dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bridge"));
    cmd.env_clear()
        .env("BRIDGE_PORT", free_port().to_string())
        .env("PG_HOST", pg.host())
        .env("PG_PORT", pg.port().to_string())
        .env("PG_USER", "bridge_reader")
        .env("PG_PASSWORD", READER_PASSWORD)
        .env("PG_DB", "app")
        .env("NATS_URL", nats_url)
        .env("RUST_LOG", "info")
        .env("TMPDIR", state_dir)
        .args(["--reconnect-backoff-secs", "1"])
        .arg("--state-file")
        .arg(state_dir.join("bridge.lsn"));
    cmd
}

/// A running bridge whose stderr lines are collected; killed on drop.
pub struct BridgeProcess {
    /// The process.
    pub child: KillOnDrop,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl BridgeProcess {
    /// Starts the command with stderr captured.
    pub fn spawn(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn bridge");
        let stderr = child.stderr.take().unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        BridgeProcess {
            child: KillOnDrop(child),
            lines,
        }
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits (bounded) for a log line containing `needle` and returns it.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> String {
        wait_for(&format!("log line {needle:?}"), timeout, || {
            self.lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
                .cloned()
        })
    }

    /// Sends SIGTERM and waits (bounded) for the exit code.
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        self.child.signal(libc::SIGTERM);
        self.wait_exit(timeout)
    }

    /// Waits (bounded) for the process to exit; its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let status = wait_for("bridge to exit", timeout, || self.child.try_wait().unwrap());
        // Let the reader thread collect the last lines.
        std::thread::sleep(Duration::from_millis(100));
        status.code()
    }
}

/// One message stored in a JetStream stream.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    /// Stream sequence.
    pub seq: u64,
    /// Subject.
    pub subject: String,
    /// The `Nats-Msg-Id` header.
    pub msg_id: Option<String>,
    /// The `Pgbridge-Last-In-Tx` header.
    pub last_in_tx_header: Option<String>,
    /// Payload.
    pub payload: Vec<u8>,
    /// When JetStream stored it (the server's clock: the same host in tests).
    pub stored_at: std::time::SystemTime,
}

/// The parts of a change's message id `{namespace}:{timeline}:{commit_lsn}-{seq}`; panics on
/// anything else.
#[allow(dead_code)]
pub fn split_msg_id(id: &str) -> (String, u32, pgbridge::pg::Lsn, u32) {
    let parts = pgbridge::pipeline::event::parse_message_id(id).unwrap_or_else(|| {
        panic!("message id {id:?} is not {{namespace}}:{{timeline}}:{{commit_lsn}}-{{seq}}")
    });
    (
        parts.namespace.to_string(),
        parts.timeline,
        parts.commit_lsn,
        parts.seq,
    )
}

/// The position in the bridge's state file at `path` (either format), `None` when there is no
/// file.
#[allow(dead_code)]
pub fn state_file_lsn(path: &Path) -> Option<pgbridge::pg::Lsn> {
    let text = fs::read_to_string(path).ok()?;
    let recorded = pgbridge::pipeline::position::parse_state(&text)
        .unwrap_or_else(|e| panic!("state file {}: {e}: {text}", path.display()));
    Some(recorded.lsn)
}

/// Runs `f` with a NATS client connected to `nats_url`, on a throw-away current-thread runtime.
pub fn with_nats<T, F, Fut>(nats_url: &str, f: F) -> T
where
    F: FnOnce(async_nats::Client) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = async_nats::connect(nats_url)
            .await
            .expect("connect to NATS");
        f(client).await
    })
}

/// Reads every message of `stream` (empty when the stream does not exist yet), in stream
/// order, through an ordered consumer.
pub fn read_stream(nats_url: &str, stream: &str) -> Vec<StoredMessage> {
    use futures_util::StreamExt;
    with_nats(nats_url, |client| async move {
        let js = async_nats::jetstream::new(client);
        let Ok(mut s) = js.get_stream(stream).await else {
            return Vec::new();
        };
        let info = s.info().await.expect("stream info").clone();
        let mut out = Vec::new();
        if info.state.messages == 0 {
            return out;
        }
        let consumer = s
            .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
            .await
            .expect("ordered consumer");
        let mut messages = consumer.messages().await.expect("consume");
        let deadline = Instant::now() + Duration::from_secs(120);
        while out.len() < info.state.messages as usize {
            let left = deadline.saturating_duration_since(Instant::now());
            let next = tokio::time::timeout(left, messages.next())
                .await
                .expect("reading the stream timed out")
                .expect("stream ended")
                .expect("message");
            let info_of = next.info().expect("message info");
            let seq = info_of.stream_sequence;
            let stored_at = std::time::UNIX_EPOCH
                + Duration::from_nanos(
                    u64::try_from(info_of.published.unix_timestamp_nanos()).unwrap_or(0),
                );
            out.push(StoredMessage {
                seq,
                stored_at,
                subject: next.subject.to_string(),
                msg_id: next
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Nats-Msg-Id"))
                    .map(|v| v.as_str().to_string()),
                last_in_tx_header: next
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Pgbridge-Last-In-Tx"))
                    .map(|v| v.as_str().to_string()),
                payload: next.payload.to_vec(),
            });
            if seq >= info.state.last_sequence {
                break;
            }
        }
        out
    })
}

/// Number of messages in `stream` (0 when it does not exist).
pub fn stream_len(nats_url: &str, stream: &str) -> u64 {
    with_nats(nats_url, |client| async move {
        let js = async_nats::jetstream::new(client);
        match js.get_stream(stream).await {
            Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
            Err(_) => 0,
        }
    })
}

/// Certificates for TLS tests, made at test time with the `openssl` command line: a CA, a server
/// certificate for `localhost` and `127.0.0.1` signed by it, a client certificate with the
/// common name `bridge_reader` signed by it, and an unrelated second CA. Files: `ca.pem`,
/// `server.pem`, `server.key`, `pg-server.key` (owned by the account PostgreSQL runs as, mode
/// 0600, as PostgreSQL demands), `client.pem`, `client.key`, `other-ca.pem`.
pub struct TestCerts {
    dir: TempDir,
}

impl TestCerts {
    /// Generates the files (P-256 keys: quick to make, accepted by PostgreSQL and rustls).
    pub fn generate() -> Self {
        let dir = TempDir::new("certs");
        let d = dir.path();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(d)
                .output()
                .expect("run openssl (needed by the TLS tests)");
            assert!(
                out.status.success(),
                "openssl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for (ca, cn) in [("ca", "pgbridge test CA"), ("other-ca", "unrelated CA")] {
            let (key, pem, subj) = (
                format!("{ca}.key"),
                format!("{ca}.pem"),
                format!("/CN={cn}"),
            );
            let mut args = vec!["req", "-x509"];
            args.extend(ec);
            args.extend([
                "-keyout",
                &key,
                "-out",
                &pem,
                "-days",
                "2",
                "-subj",
                &subj,
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ]);
            openssl(&args);
        }
        for (name, cn, ext) in [
            (
                "server",
                "localhost",
                "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
            ),
            ("client", "bridge_reader", "extendedKeyUsage=clientAuth\n"),
        ] {
            let (key, csr, pem, extfile) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
                format!("{name}.ext"),
            );
            fs::write(
                d.join(&extfile),
                format!("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n{ext}"),
            )
            .unwrap();
            let subj = format!("/CN={cn}");
            let mut args = vec!["req"];
            args.extend(ec);
            args.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
            openssl(&args);
            let serial = format!(
                "0x{:x}",
                std::process::id() as u64 * 1000 + COUNTER.fetch_add(1, Ordering::Relaxed) as u64
            );
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-set_serial",
                &serial,
                "-days",
                "2",
                "-extfile",
                &extfile,
                "-out",
                &pem,
            ]);
        }
        let pg_key = d.join("pg-server.key");
        fs::copy(d.join("server.key"), &pg_key).unwrap();
        fs::set_permissions(&pg_key, fs::Permissions::from_mode(0o600)).unwrap();
        if let Some((uid, gid)) = pg_run_as() {
            std::os::unix::fs::chown(&pg_key, Some(uid), Some(gid)).unwrap();
        }
        TestCerts { dir }
    }

    /// The file `name` (see the type's documentation).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// [`TestCerts::path`] as a string, for command lines and configuration files.
    pub fn file(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_owned()
    }
}

/// A JetStream cluster of local nats-server processes (`n1`, `n2`, ...), each with its own
/// store and a route to every other, on random loopback ports. Killed and removed on drop.
pub struct NatsCluster {
    dir: TempDir,
    bin: PathBuf,
    /// (client port, cluster port) of each node.
    ports: Vec<(u16, u16)>,
    children: Vec<Option<Child>>,
}

impl NatsCluster {
    /// Starts `n` nodes and waits until each greets and answers JetStream requests (the
    /// cluster has a meta leader).
    pub fn start(n: usize) -> Self {
        let ports = (0..n).map(|_| (free_port(), free_port())).collect();
        let mut cluster = NatsCluster {
            dir: TempDir::new("nats-cluster"),
            bin: nats_server_bin(),
            ports,
            children: (0..n).map(|_| None).collect(),
        };
        for i in 0..n {
            cluster.spawn(i);
        }
        for i in 0..n {
            cluster.wait_ready(i);
        }
        cluster
    }

    /// Server name of node `i`.
    pub fn name(&self, i: usize) -> String {
        format!("n{}", i + 1)
    }

    /// Index of the node named `name`.
    pub fn index_of(&self, name: &str) -> usize {
        (0..self.ports.len())
            .find(|&i| self.name(i) == name)
            .unwrap_or_else(|| panic!("no node named {name}"))
    }

    /// `nats://127.0.0.1:PORT` of node `i`.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.ports[i].0)
    }

    /// Every node's URL, comma-joined (as `NATS_URL` takes them).
    pub fn urls(&self) -> String {
        (0..self.ports.len())
            .map(|i| self.url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&mut self, i: usize) {
        assert!(self.children[i].is_none(), "node {i} is already running");
        let node = self.dir.path().join(self.name(i));
        fs::create_dir_all(&node).unwrap();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.join("nats.log"))
            .unwrap();
        let routes: Vec<String> = (0..self.ports.len())
            .filter(|&j| j != i)
            .map(|j| format!("nats://127.0.0.1:{}", self.ports[j].1))
            .collect();
        let child = Command::new(&self.bin)
            .args(["-a", "127.0.0.1", "-p"])
            .arg(self.ports[i].0.to_string())
            .arg("-js")
            .arg("-sd")
            .arg(node.join("store"))
            .args(["--name", &self.name(i), "--cluster_name", "pgbridge-test"])
            .arg("--cluster")
            .arg(format!("nats://127.0.0.1:{}", self.ports[i].1))
            .arg("--routes")
            .arg(routes.join(","))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display()));
        self.children[i] = Some(child);
    }

    /// Waits until node `i` greets with `INFO` and answers a JetStream account request.
    fn wait_ready(&mut self, i: usize) {
        let deadline = Instant::now() + START_TIMEOUT;
        let url = self.url(i);
        while Instant::now() < deadline {
            if let Some(c) = self.children[i].as_mut() {
                if c.try_wait().ok().flatten().is_some() {
                    panic!("nats-server {} exited; log:\n{}", self.name(i), self.log(i));
                }
            }
            if jetstream_answers(&url) {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "nats-server {} not ready with JetStream; log:\n{}",
            self.name(i),
            self.log(i)
        );
    }

    /// Kills node `i` with SIGKILL, keeping its store.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            stop_child(&mut c, libc::SIGKILL, STOP_TIMEOUT);
        }
    }

    /// Starts node `i` again on the same ports and store; waits until it answers JetStream.
    pub fn start_again(&mut self, i: usize) {
        self.spawn(i);
        self.wait_ready(i);
    }

    /// Information on `stream`, asked through each running node in turn; `None` while none
    /// answers.
    pub fn stream_info(&self, stream: &str) -> Option<async_nats::jetstream::stream::Info> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let running = (0..self.ports.len()).filter(|&i| self.children[i].is_some());
        running.map(|i| self.url(i)).find_map(|url| {
            rt.block_on(async {
                let work = async {
                    let client = async_nats::connect(url.as_str()).await.ok()?;
                    let js = async_nats::jetstream::new(client);
                    let mut s = js.get_stream(stream).await.ok()?;
                    s.info().await.ok().cloned()
                };
                tokio::time::timeout(Duration::from_secs(5), work)
                    .await
                    .ok()
                    .flatten()
            })
        })
    }

    /// Name of the current leader of `stream` (`None` while it has none).
    pub fn stream_leader(&self, stream: &str) -> Option<String> {
        self.stream_info(stream)?.cluster?.leader
    }

    /// Messages in `stream` (`None` while nobody answers).
    pub fn stream_messages(&self, stream: &str) -> Option<u64> {
        self.stream_info(stream).map(|i| i.state.messages)
    }

    /// Node `i`'s log so far.
    pub fn log(&self, i: usize) -> String {
        let path = self.dir.path().join(self.name(i)).join("nats.log");
        fs::read_to_string(path).unwrap_or_default()
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for c in self.children.iter_mut() {
            if let Some(mut c) = c.take() {
                stop_child(&mut c, libc::SIGKILL, Duration::from_secs(10));
            }
        }
    }
}

/// Whether the server at `url` answers a JetStream account request (within a few seconds).
fn jetstream_answers(url: &str) -> bool {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let work = async {
            let client = async_nats::connect(url).await.ok()?;
            async_nats::jetstream::new(client)
                .query_account()
                .await
                .ok()
        };
        tokio::time::timeout(Duration::from_secs(5), work)
            .await
            .ok()
            .flatten()
            .is_some()
    })
}

/// A single writer inserting rows with increasing ids into `table (id bigint, ...)` of
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

/// The row ids of a stream of JSON change events (`--format json`), with their message ids,
/// in stream order.
pub fn json_row_ids(messages: &[StoredMessage]) -> Vec<(i64, String)> {
    messages
        .iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).expect("JSON event");
            let id = v["columns"]
                .as_array()
                .and_then(|cols| cols.iter().find(|c| c["name"] == "id"))
                .and_then(|c| c["value"].as_i64())
                .unwrap_or_else(|| panic!("no integer id column in {v}"));
            (id, m.msg_id.clone().expect("Nats-Msg-Id"))
        })
        .collect()
}

/// Asserts that `rows` (row id, message id, in stream order) hold ids 1..=n each exactly once,
/// by row id and by message id, in increasing order.
pub fn assert_once_in_order(rows: &[(i64, String)], n: u64) {
    let ids: std::collections::HashSet<&String> = rows.iter().map(|(_, m)| m).collect();
    assert_eq!(ids.len(), rows.len(), "a message id is stored twice");
    for w in rows.windows(2) {
        assert!(
            w[0].0 < w[1].0,
            "stream order is not commit order: row {} ({}) before row {} ({})",
            w[0].0,
            w[0].1,
            w[1].0,
            w[1].1
        );
    }
    let got: Vec<i64> = rows.iter().map(|(id, _)| *id).collect();
    let want: Vec<i64> = (1..=n as i64).collect();
    if got != want {
        let have: std::collections::HashSet<i64> = got.iter().copied().collect();
        let missing: Vec<i64> = want
            .iter()
            .filter(|i| !have.contains(i))
            .take(20)
            .copied()
            .collect();
        panic!(
            "stream holds {} rows, {n} committed; first missing: {missing:?}",
            got.len()
        );
    }
}
