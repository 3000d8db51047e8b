//! Throw-away PostgreSQL and nats-server for the benchmark, set up the way the integration
//! tests do it (tests/common): `initdb` into a temporary directory, `wal_level=logical`, random
//! loopback ports, PostgreSQL run as the unprivileged `postgres` account when we are root.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pgbridge::pg::conn::{ConnectionKind, PgConnection, QueryResult};

use crate::procs::{free_port, run, Proc};

pub const SUPERUSER: &str = "postgres";
pub const PASSWORD: &str = "bench-superuser";
pub const READER: &str = "bridge_reader";
pub const READER_PASSWORD: &str = "bench-reader";
pub const DB: &str = "app";

/// Directory holding `initdb`, `postgres`, `pgbench`, `pg_recvlogical`, `psql`.
pub fn pg_bin() -> PathBuf {
    if let Some(d) = std::env::var_os("PG_BIN") {
        return PathBuf::from(d);
    }
    let mut found: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .map(|rd| rd.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    found.retain(|d| d.join("initdb").is_file());
    found.sort();
    found
        .pop()
        .expect("PostgreSQL not found: run scripts/install-deps.sh or set PG_BIN")
}

fn nats_bin() -> PathBuf {
    std::env::var_os("NATS_SERVER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("nats-server"))
}

/// uid/gid of the `postgres` account when we are root.
fn pg_ids() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let passwd = fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    let line = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .expect("running as root needs the 'postgres' account (install postgresql)");
    let f: Vec<&str> = line.split(':').collect();
    Some((f[2].parse().unwrap(), f[3].parse().unwrap()))
}

pub struct Postgres {
    pub dir: PathBuf,
    pub port: u16,
    pub bin: PathBuf,
    proc: Option<Proc>,
}

impl Postgres {
    /// initdb and start; `settings` are `-c` options.
    pub fn start(root: &Path, settings: &[(&str, &str)]) -> Postgres {
        let dir = root.join("pg");
        fs::create_dir_all(&dir).unwrap();
        let ids = pg_ids();
        if let Some((uid, gid)) = ids {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
        }
        let bin = pg_bin();
        let pwfile = dir.join("pwfile");
        fs::write(&pwfile, format!("{PASSWORD}\n")).unwrap();
        fs::set_permissions(&pwfile, fs::Permissions::from_mode(0o644)).unwrap();
        let as_pg = |program: &Path| {
            let mut cmd = Command::new(program);
            if let Some((uid, gid)) = ids {
                cmd.uid(uid).gid(gid).current_dir("/").env("HOME", "/tmp");
            }
            cmd
        };
        run(
            as_pg(&bin.join("initdb"))
                .arg("-D")
                .arg(dir.join("data"))
                .args([
                    "-U",
                    SUPERUSER,
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                    "--no-sync",
                ])
                .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
                .arg(format!("--pwfile={}", pwfile.display())),
            "initdb",
        );
        let port = free_port();
        let log = fs::File::create(dir.join("postgres.log")).unwrap();
        if let Some((uid, gid)) = ids {
            std::os::unix::fs::chown(dir.join("postgres.log"), Some(uid), Some(gid)).unwrap();
        }
        let mut cmd = as_pg(&bin.join("postgres"));
        cmd.arg("-D")
            .arg(dir.join("data"))
            .arg("-p")
            .arg(port.to_string())
            .arg("-k")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in settings {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        // SIGQUIT: immediate shutdown, the postmaster takes its backends along.
        let proc = Proc::spawn(root, "postgres", &mut cmd, libc::SIGQUIT);
        let pg = Postgres {
            dir,
            port,
            bin,
            proc: Some(proc),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while pg.try_connect("postgres").is_err() {
            assert!(
                Instant::now() < deadline,
                "PostgreSQL did not start:\n{}",
                fs::read_to_string(pg.dir.join("postgres.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        pg
    }

    pub fn params(&self, db: &str, user: &str, password: &str) -> Vec<(&'static str, String)> {
        vec![
            ("host", "127.0.0.1".into()),
            ("port", self.port.to_string()),
            ("user", user.into()),
            ("password", password.into()),
            ("dbname", db.into()),
            ("application_name", "pgbridge-bench".into()),
        ]
    }

    /// libpq connection string for command-line tools.
    pub fn conninfo(&self, db: &str, user: &str, password: &str) -> String {
        self.params(db, user, password)
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn try_connect(&self, db: &str) -> Result<PgConnection, pgbridge::pg::conn::PgError> {
        let params = self.params(db, SUPERUSER, PASSWORD);
        let refs: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
        PgConnection::connect(&refs, ConnectionKind::Normal)
    }

    /// A superuser connection to `db`.
    pub fn connect(&self, db: &str) -> PgConnection {
        self.try_connect(db)
            .unwrap_or_else(|e| panic!("connect to PostgreSQL: {e}"))
    }

    /// Runs SQL as the superuser in `db`; the last statement's rows.
    pub fn sql(&self, db: &str, sql: &str) -> QueryResult {
        self.connect(db)
            .query(sql)
            .unwrap_or_else(|e| panic!("SQL failed: {e}\n{sql}"))
    }

    /// The first value of `sql`'s first row.
    pub fn value(&self, db: &str, sql: &str) -> String {
        let r = self.sql(db, sql);
        r.rows
            .first()
            .and_then(|row| row.first().cloned().flatten())
            .unwrap_or_default()
    }

    /// Environment for libpq command-line tools connecting as the superuser.
    pub fn tool(&self, name: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(name));
        cmd.env("PGHOST", "127.0.0.1")
            .env("PGPORT", self.port.to_string())
            .env("PGUSER", SUPERUSER)
            .env("PGPASSWORD", PASSWORD)
            .env("PGDATABASE", DB);
        cmd
    }

    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop(libc::SIGINT, Duration::from_secs(30));
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

pub struct Nats {
    pub port: u16,
    pub proc: Proc,
}

impl Nats {
    pub fn start(root: &Path) -> Nats {
        let dir = root.join("nats");
        fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let log = fs::File::create(dir.join("nats.log")).unwrap();
        let mut cmd = Command::new(nats_bin());
        cmd.args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir.join("store"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let proc = Proc::spawn(root, "nats-server", &mut cmd, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut line = String::new();
                if BufReader::new(s).read_line(&mut line).is_ok() && line.starts_with("INFO ") {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Nats { port, proc }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}
