//! Throw-away PostgreSQL clusters (`initdb` into a temporary directory, `wal_level=logical`,
//! a random loopback port), restarts, re-creation and new timelines, and the project's own
//! set-up script run against them.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pgbridge::pg::conn::{ConnectionKind, PgConnection, PgError, QueryResult};

use crate::proc::{chown_tree, command_as, pg_run_as, stop_child};
use crate::{free_port, wait_for, which, TempDir, COUNTER, START_TIMEOUT, STOP_TIMEOUT};

/// The project's set-up script (role `bridge_reader`, publication `cdc_pub`).
pub fn init_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/init.sh")
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

/// The test clusters' settings: logical WAL, slots and senders to spare, little memory, no
/// fsync, loopback only.
pub(crate) fn test_settings() -> Vec<(String, String)> {
    [
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
    .collect()
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
    /// Where the postmaster's pid is recorded (see [`PgServer::start_in`]).
    pid_dir: Option<PathBuf>,
    pid_file: Option<PathBuf>,
}

impl PgServer {
    /// Starts a cluster with the default test settings.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a cluster with extra `postgresql.conf` settings (name, value).
    pub fn start_with(extra: &[(&str, &str)]) -> Self {
        let mut settings = test_settings();
        for (k, v) in extra {
            settings.retain(|(sk, _)| sk != k);
            settings.push((k.to_string(), v.to_string()));
        }
        Self::launch(TempDir::new("pg"), settings, None)
    }

    /// Starts a cluster in `root/pg` (kept after drop, for its log) with exactly `settings`
    /// (none of the test defaults), the postmaster in a process group of its own whose pid is
    /// recorded under `root/pids` as [`crate::proc::Proc`] records its children: the
    /// benchmark's server. `root/pg` must not hold a cluster yet.
    pub fn start_in(root: &Path, settings: &[(&str, &str)]) -> Self {
        let settings = settings
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self::launch(
            TempDir::kept(&root.join("pg")),
            settings,
            Some(root.join("pids")),
        )
    }

    fn launch(dir: TempDir, settings: Vec<(String, String)>, pid_dir: Option<PathBuf>) -> Self {
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
        let mut server = PgServer {
            dir,
            bin,
            ids,
            port: 0,
            password,
            settings,
            child: None,
            pid_dir,
            pid_file: None,
        };
        server.start_again();
        server
    }

    /// Starts a server of the installation in `bin` on `dir/data`, a data directory made
    /// elsewhere (by [`initdb`] or a base backup) and owned by the unprivileged user, with
    /// exactly `settings`; `password` is its superuser's.
    pub(crate) fn start_on(
        dir: TempDir,
        bin: PathBuf,
        password: String,
        settings: Vec<(String, String)>,
    ) -> Self {
        let mut server = PgServer {
            dir,
            bin,
            ids: pg_run_as(),
            port: 0,
            password,
            settings,
            child: None,
            pid_dir: None,
            pid_file: None,
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
            if self.pid_dir.is_some() {
                cmd.process_group(0);
            }
            let child = cmd
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("spawn postgres");
            self.record_pid(child.id());
            self.child = Some(child);
            if self.wait_ready() {
                return;
            }
            // Port race or slow start: stop and retry (on another port for a first start).
            if let Some(mut c) = self.child.take() {
                stop_child(&mut c, libc::SIGQUIT, STOP_TIMEOUT);
                self.forget_pid();
            }
        }
        panic!(
            "PostgreSQL did not start on port {}; log:\n{}",
            self.port,
            self.log()
        );
    }

    /// Writes `{pid_dir}/postgres-{pid}.pid` (pid and the signal to stop it with), when the
    /// server was started with [`PgServer::start_in`].
    fn record_pid(&mut self, pid: u32) {
        if let Some(dir) = &self.pid_dir {
            fs::create_dir_all(dir).expect("pid dir");
            let file = dir.join(format!("postgres-{pid}.pid"));
            fs::write(&file, format!("{pid} {}\n", libc::SIGQUIT)).expect("pid file");
            self.pid_file = Some(file);
        }
    }

    fn forget_pid(&mut self) {
        if let Some(file) = self.pid_file.take() {
            let _ = fs::remove_file(file);
        }
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
    pub fn recreate(&mut self) {
        self.stop(StopMode::Fast);
        fs::remove_dir_all(self.dir.path().join("data")).expect("remove the data directory");
        initdb(&self.bin, self.ids, self.dir.path());
        self.start_again();
    }

    /// Moves the cluster to a new timeline, as a promotion or a point-in-time restore does:
    /// stops it, starts it in archive recovery with nothing to restore, and waits until it
    /// has ended recovery on the next timeline. Slots and data stay.
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
            self.forget_pid();
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
        self.params_as(db, PG_SUPERUSER, &self.password)
    }

    /// libpq keywords for a connection to `db` as `user` with `password`.
    pub fn params_as(&self, db: &str, user: &str, password: &str) -> Vec<(&'static str, String)> {
        vec![
            ("host", self.host().to_string()),
            ("port", self.port.to_string()),
            ("user", user.to_string()),
            ("password", password.to_string()),
            ("dbname", db.to_string()),
            ("connect_timeout", "10".to_string()),
            ("application_name", "pgbridge-test".to_string()),
        ]
    }

    /// [`PgServer::params_as`] as a libpq connection string, for command-line tools.
    pub fn conninfo_as(&self, db: &str, user: &str, password: &str) -> String {
        self.params_as(db, user, password)
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Directory of the server's binaries and its command-line tools (`psql`, `pgbench`,
    /// `pg_recvlogical`).
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// A command-line tool of the server's installation (`pgbench`, `psql`, ...) with the
    /// environment to connect to `db` as the superuser.
    pub fn tool(&self, name: &str, db: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(name));
        cmd.env("PGHOST", self.host())
            .env("PGPORT", self.port.to_string())
            .env("PGUSER", PG_SUPERUSER)
            .env("PGPASSWORD", &self.password)
            .env("PGDATABASE", db);
        cmd
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

    fn try_connect(&self, db: &str) -> Result<PgConnection, PgError> {
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

    /// The first value of the first row `sql` returns in `db` (empty when none or NULL).
    pub fn value(&self, db: &str, sql: &str) -> String {
        self.sql(db, sql)
            .rows
            .first()
            .and_then(|row| row.first().cloned().flatten())
            .unwrap_or_default()
    }

    /// Creates a database and returns its name.
    pub fn create_database(&self, name: &str) -> String {
        self.sql("postgres", &format!("CREATE DATABASE \"{name}\""));
        name.to_string()
    }
}

/// What the server's version offers: tests of a feature newer than the server say so and
/// skip, and CI runs them on a version that has it.
impl PgServer {
    /// `server_version_num`, e.g. 150018 or 180006.
    pub fn version_num(&self) -> i32 {
        self.value("postgres", "SHOW server_version_num")
            .parse()
            .expect("server_version_num is a number")
    }

    /// The major version, e.g. 15 or 18.
    pub fn major_version(&self) -> i32 {
        self.version_num() / 10000
    }

    /// True when the server is at least `major`; otherwise prints why `test` is skipped (one
    /// line, in the test's output) and returns false.
    pub fn at_least(&self, major: i32, test: &str, feature: &str) -> bool {
        let have = self.major_version();
        if have >= major {
            return true;
        }
        println!("SKIPPED {test}: {feature} needs PostgreSQL {major}+, the server is {have}");
        false
    }
}

/// Runs `initdb` into `{dir}/data` as the unprivileged user, with the superuser password of
/// `{dir}/pwfile`.
pub(crate) fn initdb(bin: &Path, ids: Option<(u32, u32)>, dir: &Path) {
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
            self.forget_pid();
        }
    }
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
        .arg(init_script())
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
