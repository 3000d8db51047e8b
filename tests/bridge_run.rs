//! The `bridge` binary against a real PostgreSQL: set-up errors are one clear line with exit
//! code 2; a normal run creates the slot, follows the stream, and stops cleanly on SIGTERM
//! without confirming anything it has not made durable.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{wait_for, KillOnDrop, PgServer};

fn bridge(pg: &PgServer, password: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bridge"));
    cmd.env_clear()
        .env("PG_HOST", pg.host())
        .env("PG_PORT", pg.port().to_string())
        .env("PG_USER", "bridge_reader")
        .env("PG_PASSWORD", password)
        .env("PG_DB", "app")
        .env("RUST_LOG", "info")
        .args(["--state-file", "/dev/null", "--reconnect-backoff-secs", "1"])
        .args(args);
    cmd
}

/// A database `app` set up by the project's own init.sh.
fn setup(tables: &str) -> PgServer {
    let pg = PgServer::start();
    pg.create_database("app");
    pg.sql(
        "app",
        "CREATE TABLE users (id int PRIMARY KEY, name text); CREATE TABLE orders (id int PRIMARY KEY, total numeric)",
    );
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/init.sh"))
        .env("PGHOST", pg.host())
        .env("PGPORT", pg.port().to_string())
        .env("PGUSER", common::PG_SUPERUSER)
        .env("PGPASSWORD", pg.password())
        .env("PGDATABASE", "app")
        .env("BRIDGE_PG_PASSWORD", "reader-secret")
        .env("BRIDGE_TABLES", tables)
        .output()
        .expect("run init.sh");
    assert!(
        out.status.success(),
        "init.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    pg
}

fn run_to_end(cmd: &mut Command) -> (i32, String) {
    let out = cmd.output().expect("run bridge");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn error_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.starts_with("bridge: "))
        .collect()
}

#[test]
fn setup_problems_are_one_clear_line_and_exit_2() {
    let pg = setup("users");

    let (code, err) = run_to_end(&mut bridge(
        &pg,
        "reader-secret",
        &["--publication", "nosuch"],
    ));
    assert_eq!(code, 2, "{err}");
    let lines = error_lines(&err);
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("publication 'nosuch' does not exist"),
        "{err}"
    );
    assert!(lines[0].contains("CREATE PUBLICATION \"nosuch\""), "{err}");

    let (code, err) = run_to_end(&mut bridge(
        &pg,
        "reader-secret",
        &["--table", "users,orders"],
    ));
    assert_eq!(code, 2, "{err}");
    let lines = error_lines(&err);
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("table 'orders' is not in publication 'cdc_pub'"),
        "{err}"
    );
    assert!(lines[0].contains("public.users"), "{err}");

    let (code, err) = run_to_end(&mut bridge(&pg, "wrong", &[]));
    assert_eq!(code, 2, "{err}");
    let lines = error_lines(&err);
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("password authentication failed"), "{err}");
    assert!(!err.contains("wrong"), "password echoed: {err}");

    // Nothing was created by the failed attempts.
    let slots = pg.sql("app", "SELECT count(*) FROM pg_replication_slots");
    assert_eq!(slots.rows[0][0].as_deref(), Some("0"));
}

#[test]
fn wal_level_replica_is_refused_with_the_fix() {
    let pg = PgServer::start_with(&[("wal_level", "replica")]);
    pg.create_database("app");
    pg.sql(
        "app",
        "CREATE ROLE bridge_reader LOGIN REPLICATION PASSWORD 'reader-secret'",
    );
    let (code, err) = run_to_end(&mut bridge(&pg, "reader-secret", &[]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("wal_level is 'replica'"), "{err}");
    assert!(
        err.contains("ALTER SYSTEM SET wal_level = logical"),
        "{err}"
    );
}

/// Collects stderr lines of a running bridge on a channel.
fn spawn_logged(cmd: &mut Command) -> (KillOnDrop, mpsc::Receiver<String>) {
    let mut child = KillOnDrop(cmd.stderr(Stdio::piped()).spawn().expect("spawn bridge"));
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

fn wait_line(rx: &mpsc::Receiver<String>, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if pred(&line) => return line,
            Ok(_) => continue,
            Err(_) => panic!("no log line {what} within 30 s"),
        }
    }
}

#[test]
fn streams_until_sigterm_and_confirms_nothing_undurable() {
    let pg = setup("");
    let (mut child, rx) = spawn_logged(&mut bridge(&pg, "reader-secret", &["--slot", "app_slot"]));
    wait_line(&rx, "streaming", |l| {
        l.contains("streaming slot 'app_slot'")
    });
    let before: String = pg.sql(
        "app",
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'app_slot'",
    )
    .rows[0][0]
        .clone()
        .unwrap();

    pg.sql(
        "app",
        "BEGIN; INSERT INTO users VALUES (1, 'a'), (2, 'b'); UPDATE users SET name = 'c' WHERE id = 1; \
         INSERT INTO orders VALUES (1, 9.5); COMMIT",
    );
    let line = wait_line(&rx, "with the transaction", |l| {
        l.contains("committed xid=")
    });
    assert!(line.contains("changes=4"), "{line}");
    assert!(line.contains("public.users insert=2"), "{line}");
    assert!(line.contains("public.users update=1"), "{line}");
    assert!(line.contains("public.orders insert=1"), "{line}");

    // A second bridge on the same slot waits as a standby instead of failing.
    let (mut standby, standby_rx) =
        spawn_logged(&mut bridge(&pg, "reader-secret", &["--slot", "app_slot"]));
    wait_line(&standby_rx, "about the busy slot", |l| {
        l.contains("is active for PID") && l.contains("waiting")
    });
    assert!(standby.try_wait().unwrap().is_none(), "standby exited");
    standby.signal(libc::SIGTERM);
    assert_eq!(standby.wait().unwrap().code(), Some(0));

    child.signal(libc::SIGTERM);
    let status = wait_for("bridge to exit", Duration::from_secs(30), || {
        child.try_wait().unwrap()
    });
    assert_eq!(status.code(), Some(0));
    let summary = wait_line(&rx, "summary", |l| l.contains("stopped:"));
    assert!(summary.contains("transactions=1 changes=4"), "{summary}");

    // No sink yet: nothing is durable, so the slot must not have moved.
    let after = pg.sql(
        "app",
        "SELECT confirmed_flush_lsn::text, active FROM pg_replication_slots WHERE slot_name = 'app_slot'",
    );
    assert_eq!(after.rows[0][0].as_deref(), Some(before.as_str()));
    assert_eq!(after.rows[0][1].as_deref(), Some("f"));
}
