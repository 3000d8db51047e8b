//! The Python reference consumer (`consumer-example/python/mirror.py`) against real servers:
//! it bootstraps while a writer inserts, updates (also a primary key and rows with TOASTed
//! values) and deletes, follows the stream, is killed, and after a restart ends with exactly
//! the table.
//!
//! Needs the project venv with the consumer's requirements: `scripts/install-deps.sh`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testkit::{bridge_command, setup_app_db, BridgeProcess, KillOnDrop, TempDir, TestEnv};

const SEED_ROWS: i64 = 2000;
/// How long one run of the mirror may take before the test fails.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(120);

fn python() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(".dev/venv/bin/python");
    assert!(
        p.is_file(),
        "{} missing: run scripts/install-deps.sh (it installs consumer-example/python/requirements.txt)",
        p.display()
    );
    p
}

fn mirror_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("consumer-example/python/mirror.py")
}

/// Starts `mirror.py` with the given extra arguments; stdout is piped, stderr inherited.
/// No `--format`: the mirror tells the bridge's format from each message.
fn spawn_mirror(nats_url: &str, db: &Path, extra: &[&str]) -> KillOnDrop {
    let child = Command::new(python())
        .arg(mirror_script())
        .args(["--nats", nats_url, "--table", "accounts", "--db"])
        .arg(db)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn mirror.py");
    KillOnDrop(child)
}

/// Waits (bounded) for the mirror to exit successfully; its stdout (read meanwhile, so a
/// long dump cannot fill the pipe).
fn finish(mut mirror: KillOnDrop, what: &str) -> String {
    let mut stdout = mirror.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut out).map(|_| out)
    });
    let deadline = Instant::now() + MIRROR_TIMEOUT;
    let status = loop {
        if let Some(s) = mirror.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "{what} did not finish in time");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{what} failed: {status}");
    reader.join().unwrap().expect("read the mirror's output")
}

/// The source table in the canonical form `mirror.py --dump` prints.
fn source_rows(env: &TestEnv) -> Vec<Value> {
    env.pg
        .sql(
            "app",
            "SELECT id, name, n, f, flag, data::text, big FROM accounts ORDER BY id",
        )
        .rows
        .iter()
        .map(|r| {
            let s = |i: usize| r[i].clone().map_or(Value::Null, Value::from);
            let int = |i: usize| {
                r[i].as_deref()
                    .map_or(Value::Null, |v| json!(v.parse::<i64>().unwrap()))
            };
            json!({
                "id": int(0),
                "name": s(1),
                "n": int(2),
                "f": r[3].as_deref().map_or(Value::Null, |v| json!(v.parse::<f64>().unwrap())),
                "flag": r[4].as_deref().map_or(Value::Null, |v| json!(v == "t")),
                "data": s(5),
                "big": s(6),
            })
        })
        .collect()
}

#[test]
fn python_mirror_rebuilds_the_table_under_concurrent_writes_and_resumes() {
    mirror_scenario("msgpack");
}

/// The bridge writes JSON and the mirror is given no `--format`: it detects JSON per message.
#[test]
fn python_mirror_reads_the_json_format_too() {
    mirror_scenario("json");
}

/// Seeds the table, runs the writer, runs and kills the mirror, restarts it until idle and
/// compares its rows with the table; the bridge publishes in `format`.
fn mirror_scenario(format: &str) {
    let _ = python();
    let env = TestEnv::start();
    setup_app_db(
        &env.pg,
        &format!(
            "CREATE TABLE accounts (id int PRIMARY KEY, name text, n int, f double precision, \
             flag boolean, data bytea, big text); \
             ALTER TABLE accounts ALTER COLUMN big SET STORAGE EXTERNAL; \
             INSERT INTO accounts SELECT g, 'name ' || g, g * 3, g / 8.0, g % 2 = 0, \
             decode(md5(g::text), 'hex'), \
             CASE WHEN g % 10 = 0 THEN repeat(md5(g::text), 100) ELSE 'small ' || g END \
             FROM generate_series(1, {SEED_ROWS}) g"
        ),
        "",
    );
    let dir = TempDir::new("pymirror");
    let bridge = BridgeProcess::spawn(bridge_command(&env.pg, &env.nats.url(), dir.path()).args([
        "--snapshot-chunk-rows",
        "100",
        "--format",
        format,
    ]));
    bridge.wait_for_line("snapshot requests served", Duration::from_secs(60));
    let url = env.nats.url();
    let db = dir.path().join("mirror.sqlite");

    // A writer changes the table before, during and after the mirror's snapshot.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = Arc::clone(&stop);
        let mut conn = env.pg.connect("app");
        std::thread::spawn(move || {
            let started = Instant::now();
            let mut n: i64 = 0;
            // The writer's own pseudo-random sequence (xorshift), so a failure can be rerun.
            let mut x: u64 = 0x2545_f491_4f6c_dd1d;
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(20) {
                n += 1;
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let id = ((x >> 16) % SEED_ROWS as u64) as i64 + 1;
                let sql = match (n, x % 5) {
                    // One primary-key change of a row with a TOASTed value, early on.
                    (3, _) => "UPDATE accounts SET id = 900000 WHERE id = 10".to_string(),
                    (_, 0) => format!(
                        "INSERT INTO accounts VALUES ({}, 'new {n}', {n}, {n}.25, true, \
                         '\\x00ff{n:04x}', repeat('t{n}', 900)) ON CONFLICT (id) DO NOTHING",
                        100000 + n
                    ),
                    // Leaves `big` alone: sent as unchanged TOAST for the long values.
                    (_, 1) | (_, 2) => format!(
                        "UPDATE accounts SET n = coalesce(n, 0) + 1, name = 'u{n}', \
                         flag = NOT flag, f = f * 1.5 WHERE id = {id}"
                    ),
                    (_, 3) => format!(
                        "UPDATE accounts SET big = repeat('b{n}', 1000), data = NULL WHERE id = {id}"
                    ),
                    _ => format!("DELETE FROM accounts WHERE id = {id}"),
                };
                conn.execute(&sql).expect("writer statement");
                std::thread::sleep(Duration::from_millis(2));
            }
            n
        })
    };
    std::thread::sleep(Duration::from_millis(500));

    // First run: bootstraps during the writes and follows them until it is killed.
    let first = spawn_mirror(&url, &db, &["--until-idle", "30"]);
    std::thread::sleep(Duration::from_secs(4));
    drop(first);
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().unwrap();
    assert!(written > 100, "the writer ran ({written} statements)");

    testkit::wait_caught_up(&env.pg, "cdc_slot", Duration::from_secs(120));

    // Second run: continues from the position the killed run committed, until idle.
    finish(
        spawn_mirror(&url, &db, &["--until-idle", "3"]),
        "the second mirror run",
    );
    assert!(
        source_rows(&env).iter().any(|r| r["id"] == json!(900000)),
        "the primary-key change is in the table"
    );
    assert_mirrors_the_table(&env, &url, &db);

    // Changes the stream no longer holds: the mirror takes a new snapshot.
    env.pg.sql(
        "app",
        "UPDATE accounts SET name = 'after purge' WHERE id % 7 = 0; \
         DELETE FROM accounts WHERE id % 11 = 0",
    );
    testkit::wait_caught_up(&env.pg, "cdc_slot", Duration::from_secs(120));
    testkit::with_nats(&url, |client| async move {
        let js = async_nats::jetstream::new(client);
        js.get_stream("CDC").await.unwrap().purge().await.unwrap();
    });
    finish(
        spawn_mirror(&url, &db, &["--until-idle", "2"]),
        "the mirror run after the purge",
    );
    assert_mirrors_the_table(&env, &url, &db);
    drop(bridge);
}

/// Compares `mirror.py --dump` with the table, row by row.
fn assert_mirrors_the_table(env: &TestEnv, url: &str, db: &Path) {
    let dump = finish(spawn_mirror(url, db, &["--dump"]), "mirror.py --dump");
    let mirrored: Vec<Value> = dump
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let source = source_rows(env);
    assert_eq!(mirrored.len(), source.len(), "row count");
    for (m, s) in mirrored.iter().zip(&source) {
        assert_eq!(m, s, "mirrored row differs from the table");
    }
}

#[test]
fn python_mirror_stops_with_the_error_of_a_failed_snapshot() {
    let _ = python();
    let pg = testkit::PgServer::start();
    setup_app_db(
        &pg,
        "CREATE TABLE accounts (id int PRIMARY KEY, big text); \
         INSERT INTO accounts VALUES (1, 'small'), (2, repeat('x', 6000))",
        "",
    );
    let conf_dir = TempDir::new("natsconf");
    let conf = conf_dir.path().join("small.conf");
    std::fs::write(&conf, "max_payload: 4096\n").unwrap();
    let nats = testkit::NatsServer::start_with_args(&["-c", conf.to_str().unwrap()]);
    let dir = TempDir::new("pymirror");
    let bridge = BridgeProcess::spawn(&mut bridge_command(&pg, &nats.url(), dir.path()));
    bridge.wait_for_line("snapshot requests served", Duration::from_secs(60));

    let mut mirror = KillOnDrop(
        Command::new(python())
            .arg(mirror_script())
            .args(["--nats", &nats.url(), "--table", "accounts", "--db"])
            .arg(dir.path().join("mirror.sqlite"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mirror.py"),
    );
    let mut stderr = mirror.stderr.take().expect("piped stderr");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut out).map(|_| out)
    });
    // Far below the mirror's own SNAPSHOT_TIMEOUT: it must not wait for a meta that the
    // failure replaced.
    let deadline = Instant::now() + MIRROR_TIMEOUT;
    let status = loop {
        if let Some(s) = mirror.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the mirror kept waiting");
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = reader.join().unwrap().expect("read the mirror's stderr");
    assert_eq!(status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("snapshot "), "{stderr}");
    assert!(
        last.contains(" of accounts failed: row 2 of public.accounts"),
        "{stderr}"
    );
    assert!(last.contains("max_payload of 4096 bytes"), "{stderr}");
    drop(bridge);
}

/// A fatal error (here: no NATS server) ends in one line and exit code 1, not a traceback.
#[test]
fn python_mirror_reports_an_unreachable_nats_server_in_one_line() {
    let _ = python();
    let dir = TempDir::new("pymirror");
    // A loopback port nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("nats://127.0.0.1:{port}");
    let out = Command::new(python())
        .arg(mirror_script())
        .args(["--nats", &url, "--table", "accounts", "--db"])
        .arg(dir.path().join("mirror.sqlite"))
        .stdin(Stdio::null())
        .output()
        .expect("run mirror.py");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("Traceback"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!("mirror: cannot connect to NATS at {url} ")),
        "{stderr}"
    );
}
