//! `bridge mirror` against real servers, checked by an oracle: a seeded random workload runs
//! on four tables (three in `public`, one in `sales`; a composite key, a uuid key, REPLICA
//! IDENTITY FULL) while the mirror bootstraps, so its snapshots are taken in the middle of the
//! workload, and follows. The workload inserts, updates TOASTed values and other columns (so
//! changes with unchanged TOAST occur), changes primary keys, deletes, truncates a table once,
//! runs several statements per transaction, rolls back savepoints and whole transactions and
//! now and then changes enough rows that PostgreSQL streams the transaction before its commit.
//! When it has stopped and the mirror has caught up, every mirrored table equals its source
//! table, row for row and value for value, compared through a canonical text form that both
//! sides produce. Also with kill -9 of the mirror and of the bridge in the middle, with the
//! bridge killed while it serves the mirror's snapshot, and with columns added by ALTER TABLE.
//!
//! The workload's seed is printed when a test fails; `MIRROR_TEST_SEED=<seed>` reruns it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use testkit::oracle::*;
use testkit::{setup_app_db, wait_for, wait_for_logged, BridgeProcess, TempDir, TestEnv};

/// Prints the seed when the test fails, whatever fails.
struct SeedOnFailure(u64);

impl Drop for SeedOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "mirror oracle: workload seed {0} (rerun with MIRROR_TEST_SEED={0})",
                self.0
            );
        }
    }
}

/// The workload's seed: `MIRROR_TEST_SEED`, or a fresh one; printed.
pub(crate) fn seed() -> u64 {
    let seed = std::env::var("MIRROR_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("mirror oracle: workload seed {seed}");
    seed
}

// ---------------------------------------------------------------------------------------
// Scenarios.

/// Seeds the database, starts the bridge; the environment, the bridge and its state dir.
fn prepare() -> (TestEnv, BridgeProcess, TempDir) {
    prepare_with(&[])
}

/// [`prepare`] with extra bridge arguments.
fn prepare_with(bridge_args: &[&str]) -> (TestEnv, BridgeProcess, TempDir) {
    let env = TestEnv::start();
    setup_app_db(&env.pg, &format!("{SCHEMA} {}", seed_sql()), "");
    grant_sales(&env.pg);
    let dir = TempDir::new("mirror");
    let bridge = spawn_bridge_with(&env, dir.path(), bridge_args);
    (env, bridge, dir)
}

/// Compares every table and panics with the differences, the seed and the mirror's log.
fn assert_mirrored(env: &TestEnv, db: &Path, seed: u64, mirror_log: &str) {
    match compare_all(&env.pg, db, &tables()) {
        Ok(counts) => {
            eprintln!("mirror oracle: equal tables (rows): {counts:?}");
            assert!(
                counts.iter().all(|(_, n)| *n > 0),
                "empty tables: {counts:?}"
            );
        }
        Err(report) => panic!(
            "the mirror differs from the source (seed {seed}):\n{report}\nmirror state: {:?}\n\
             mirror log (tail):\n{}",
            mirror_state(db),
            tail(mirror_log, 60)
        ),
    }
}

/// The oracle itself sees a changed value, a missing row and an extra row (the mirror has
/// exited; its file is changed behind its back).
fn assert_oracle_sees_tampering(env: &TestEnv, db: &Path) {
    rusqlite::Connection::open(db)
        .unwrap()
        .execute_batch(
            "UPDATE accounts SET big = big || 'x' \
               WHERE id = (SELECT min(id) FROM accounts WHERE length(big) > 3000); \
             DELETE FROM items WHERE (order_id, line) = (SELECT order_id, line FROM items LIMIT 1); \
             INSERT INTO \"sales.invoices\" (id) VALUES ('00000000-0000-0000-0000-000000000000')",
        )
        .expect("tamper with the mirror");
    let report = compare_all(&env.pg, db, &tables()).expect_err("the oracle sees the changes");
    for needle in [
        "    big: expected",
        "missing in the mirror",
        "key 00000000-0000-0000-0000-000000000000: in the mirror only",
    ] {
        assert!(report.contains(needle), "{needle:?} not in:\n{report}");
    }
}

#[test]
fn mirror_equals_source_after_50k_changes() {
    let _heavy = testkit::heavy();
    let seed = seed();
    let _report_seed = SeedOnFailure(seed);
    let started = Instant::now();
    let (env, bridge, dir) = prepare();
    let url = env.nats.url();
    let db: PathBuf = dir.path().join("mirror.sqlite");

    let writer = Writer::start(&env.pg, seed, TARGET_CHANGES, WRITER_RATE);
    writer.wait_changes(5_000);
    let mut mirror = spawn_bootstrapped_mirror(&url, &db, dir.path());
    let at_bootstrap = writer.changes();
    eprintln!("mirror oracle: bootstrapped after {at_bootstrap} changes");
    assert!(
        at_bootstrap < TARGET_CHANGES,
        "the snapshots were taken in the middle of the workload ({at_bootstrap} changes)"
    );

    let report = writer.finish();
    eprintln!(
        "mirror oracle: {} changes in {} transactions ({} statements) in {:?}",
        report.changes, report.transactions, report.statements, report.elapsed
    );
    assert!(report.truncated, "the workload truncated a table");
    assert!(
        report.changes >= TARGET_CHANGES,
        "the workload made {} changes",
        report.changes
    );

    stop_caught_up_mirror(&env, &url, &db, &mut mirror);
    assert_mirrored(&env, &db, seed, &mirror.log());
    assert_oracle_sees_tampering(&env, &db);
    drop(bridge);
    eprintln!("mirror oracle: scenario took {:?}", started.elapsed());
}

/// The CDC stream holds the changes in commit order: the `{commit_lsn}-{seq}` of the message
/// ids `{namespace}:{timeline}:{commit_lsn}-{seq}` never goes back.
fn assert_stream_in_commit_order(url: &str) {
    let parse = |id: &str| -> (pgbridge::pg::Lsn, u64) {
        let (_, _, lsn, seq) = testkit::split_msg_id(id);
        (lsn, u64::from(seq))
    };
    let mut last: Option<((pgbridge::pg::Lsn, u64), u64)> = None;
    for m in testkit::read_stream(url, "CDC") {
        let key = parse(m.msg_id.as_deref().expect("a message id"));
        if let Some((prev, prev_seq)) = last {
            assert!(
                key > prev,
                "stream order is not commit order: #{} {key:?} after #{prev_seq} {prev:?}",
                m.seq
            );
        }
        last = Some((key, m.seq));
    }
}

/// Waits until the mirror into `db` (its default consumer) has applied everything, then stops
/// it with SIGTERM, which must end it with exit code 0.
fn stop_caught_up_mirror(env: &TestEnv, url: &str, db: &Path, mirror: &mut BridgeProcess) {
    wait_mirror_caught_up(&env.pg, url, &durable(db));
    assert_eq!(
        mirror.terminate(Duration::from_secs(30)),
        Some(0),
        "mirror exit code; log:\n{}",
        tail(&mirror.log(), 40)
    );
}

/// Starts `bridge mirror` on every table and waits until each has its snapshot.
fn spawn_bootstrapped_mirror(url: &str, db: &Path, dir: &Path) -> BridgeProcess {
    let mut mirror = BridgeProcess::spawn(&mut mirror_command(url, db, dir, Some(TABLES), &[]));
    let tokens = table_tokens();
    wait_for("the mirror to bootstrap", STEP_TIMEOUT, || {
        if let Some(status) = mirror.child.try_wait().unwrap() {
            panic!("the mirror exited ({status}):\n{}", tail(&mirror.log(), 60));
        }
        bootstrapped(db, &tokens).then_some(())
    });
    mirror
}

/// The same workload, smaller, with the bridge publishing JSON: the mirror tells the format
/// from each message and ends with the same values (bytea from base64, NaN and infinities from
/// strings).
#[test]
fn mirror_reads_the_json_format() {
    let seed = seed();
    let _report_seed = SeedOnFailure(seed);
    let (env, bridge, dir) = prepare_with(&["--format", "json"]);
    let url = env.nats.url();
    let db: PathBuf = dir.path().join("mirror.sqlite");
    let writer = Writer::start(&env.pg, seed, 8_000, WRITER_RATE);
    writer.wait_changes(1_000);
    let mut mirror = spawn_bootstrapped_mirror(&url, &db, dir.path());
    let report = writer.finish();
    assert!(
        report.changes >= 8_000,
        "the workload made {} changes",
        report.changes
    );
    stop_caught_up_mirror(&env, &url, &db, &mut mirror);
    assert_mirrored(&env, &db, seed, &mirror.log());
    drop(bridge);
}

/// NATS stops for a few seconds while the bridge publishes and the mirror follows: both wait
/// it out, the stream keeps commit order across the restart, and the mirror ends equal to the
/// source.
#[test]
fn mirror_rides_out_a_nats_restart() {
    let seed = seed();
    let _report_seed = SeedOnFailure(seed);
    let (mut env, bridge, dir) = prepare();
    let url = env.nats.url();
    let db: PathBuf = dir.path().join("mirror.sqlite");
    let writer = Writer::start(&env.pg, seed, 8_000, WRITER_RATE);
    writer.wait_changes(1_000);
    let mut mirror = spawn_bootstrapped_mirror(&url, &db, dir.path());
    env.nats.stop();
    std::thread::sleep(Duration::from_secs(4));
    env.nats.start_again();
    let report = writer.finish();
    assert!(
        report.changes >= 8_000,
        "the workload made {} changes",
        report.changes
    );
    stop_caught_up_mirror(&env, &url, &db, &mut mirror);
    eprintln!("mirror log (tail):\n{}", tail(&mirror.log(), 12));
    assert_stream_in_commit_order(&url);
    assert_mirrored(&env, &db, seed, &mirror.log());
    drop(bridge);
}

#[test]
fn mirror_equals_source_after_kill_9_of_mirror_and_bridge() {
    let _heavy = testkit::heavy();
    let seed = seed();
    let _report_seed = SeedOnFailure(seed);
    let started = Instant::now();
    let (env, mut bridge, dir) = prepare();
    let url = env.nats.url();
    let db: PathBuf = dir.path().join("mirror.sqlite");
    let tokens = table_tokens();
    // A consumer name of its own, as two mirror files would need.
    let durable = "oracle-mirror";
    let spawn_mirror = |extra: &[&str]| {
        let mut cmd = mirror_command(&url, &db, dir.path(), Some(TABLES), extra);
        BridgeProcess::spawn(cmd.args(["--durable", durable]))
    };
    let mut logs = String::new();

    let writer = Writer::start(&env.pg, seed, TARGET_CHANGES, WRITER_RATE);
    writer.wait_changes(4_000);

    // First mirror: killed during its bootstrap (or right after, on a fast machine).
    let mut mirror = spawn_mirror(&[]);
    wait_for("the mirror's first snapshot", STEP_TIMEOUT, || {
        mirror_state(&db)
            .iter()
            .any(|(_, snap, _, _)| snap.is_some())
            .then_some(())
    });
    let loaded = mirror_state(&db).len();
    kill_9(&mut mirror);
    eprintln!(
        "mirror oracle: killed the mirror with {loaded} of {} tables bootstrapped, after {} changes",
        tokens.len(),
        writer.changes()
    );
    logs.push_str(&mirror.log());
    logs.push('\n');

    // Second mirror: finishes the bootstrap and follows.
    let mut mirror = spawn_mirror(&[]);
    wait_for("the restarted mirror to bootstrap", STEP_TIMEOUT, || {
        if let Some(status) = mirror.child.try_wait().unwrap() {
            panic!("the mirror exited ({status}):\n{}", tail(&mirror.log(), 60));
        }
        bootstrapped(&db, &tokens).then_some(())
    });
    eprintln!(
        "mirror oracle: bootstrapped after {} changes",
        writer.changes()
    );

    // kill -9 of the bridge; it resumes from its state file while the writer goes on.
    writer.wait_changes(18_000);
    kill_9(&mut bridge);
    eprintln!(
        "mirror oracle: killed the bridge after {} changes",
        writer.changes()
    );
    std::thread::sleep(Duration::from_secs(1));
    let first_bridge_log = bridge.log();
    bridge = spawn_bridge(&env, dir.path());

    // kill -9 of the mirror while it follows.
    writer.wait_changes(32_000);
    kill_9(&mut mirror);
    eprintln!(
        "mirror oracle: killed the mirror again after {} changes",
        writer.changes()
    );
    logs.push_str(&mirror.log());
    logs.push('\n');
    std::thread::sleep(Duration::from_millis(500));
    let mut mirror = spawn_mirror(&[]);

    let report = writer.finish();
    eprintln!(
        "mirror oracle: {} changes in {} transactions ({} statements) in {:?}",
        report.changes, report.transactions, report.statements, report.elapsed
    );
    assert!(report.truncated, "the workload truncated a table");
    assert!(
        report.changes >= TARGET_CHANGES,
        "the workload made {} changes",
        report.changes
    );

    wait_mirror_caught_up(&env.pg, &url, durable);
    let code = mirror.terminate(Duration::from_secs(30));
    logs.push_str(&mirror.log());
    logs.push('\n');
    assert_eq!(
        code,
        Some(0),
        "mirror exit code; log:\n{}",
        tail(&mirror.log(), 40)
    );

    // A last run with --until-idle: nothing new, it exits on its own.
    let mut last = spawn_mirror(&["--until-idle", "3"]);
    let code = last.wait_exit(STEP_TIMEOUT);
    logs.push_str(&last.log());
    logs.push('\n');
    assert_eq!(
        code,
        Some(0),
        "mirror --until-idle exit code; log:\n{}",
        tail(&last.log(), 40)
    );

    let counts = compare_all(&env.pg, &db, &tables()).unwrap_or_else(|report| {
        panic!(
            "the mirror differs from the source (seed {seed}):\n{report}\nmirror state: {:?}\n\
             mirror logs (tail):\n{}\nfirst bridge's log (tail):\n{}",
            mirror_state(&db),
            tail(&logs, 80),
            tail(&first_bridge_log, 20)
        );
    });
    assert!(
        counts.iter().all(|(_, n)| *n > 0),
        "empty tables: {counts:?}"
    );
    eprintln!(
        "mirror oracle: equal tables after kills; scenario took {:?}",
        started.elapsed()
    );
    drop(bridge);
}

#[test]
fn mirror_adds_a_column_after_alter_table() {
    let env = TestEnv::start();
    setup_app_db(
        &env.pg,
        "CREATE TABLE users (id int PRIMARY KEY, name text); \
         INSERT INTO users SELECT g, 'u' || g FROM generate_series(1, 200) g",
        "",
    );
    let dir = TempDir::new("mirror");
    let bridge = spawn_bridge(&env, dir.path());
    let url = env.nats.url();
    let db = dir.path().join("mirror.sqlite");
    let mut mirror = BridgeProcess::spawn(&mut mirror_command(&url, &db, dir.path(), None, &[]));
    wait_for("the mirror to bootstrap", STEP_TIMEOUT, || {
        bootstrapped(&db, &["users"]).then_some(())
    });

    env.pg
        .sql("app", "UPDATE users SET name = name || '!' WHERE id <= 10");
    env.pg.sql(
        "app",
        "ALTER TABLE users ADD COLUMN age int, ADD COLUMN seen timestamptz, ADD COLUMN tags text[]",
    );
    env.pg.sql(
        "app",
        "UPDATE users SET age = id * 2, seen = timestamptz '2025-12-10 10:30:00.123456+00' \
         + id * interval '1 hour', tags = ARRAY['a', id::text] WHERE id % 3 = 0; \
         INSERT INTO users VALUES (1000, 'new', 42, NULL, '{x,NULL}'); \
         DELETE FROM users WHERE id = 5",
    );
    wait_mirror_caught_up(&env.pg, &url, &durable(&db));

    let users = Table {
        token: "users",
        pg: "users",
        key: 1,
        columns: vec![
            ("id", Kind::Int),
            ("name", Kind::Text),
            ("age", Kind::Int),
            ("seen", Kind::Text),
            ("tags", Kind::Array),
        ],
    };
    let columns: Vec<String> = open_sqlite(&db)
        .unwrap()
        .prepare("SELECT name FROM pragma_table_info('users') ORDER BY cid")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        columns,
        ["id", "name", "age", "seen", "tags"],
        "the mirrored table's columns; log:\n{}",
        tail(&mirror.log(), 40)
    );
    match compare_table(&env.pg, &db, &users) {
        Ok(n) => assert_eq!(n, 200, "rows"),
        Err(report) => panic!("{report}\nmirror log (tail):\n{}", tail(&mirror.log(), 40)),
    }
    let age: Option<i64> = open_sqlite(&db)
        .unwrap()
        .query_row("SELECT age FROM users WHERE id = 1000", [], |r| r.get(0))
        .unwrap();
    assert_eq!(age, Some(42));
    assert_eq!(mirror.terminate(Duration::from_secs(30)), Some(0));
    drop(bridge);
}

#[test]
fn mirror_takes_a_new_snapshot_when_the_bridge_dies_during_one() {
    let seed = seed();
    let _report_seed = SeedOnFailure(seed);
    let started = Instant::now();
    let (env, mut bridge, dir) = prepare();
    // Enough TOASTed rows that the snapshot of accounts takes a moment.
    env.pg.sql(
        "app",
        "INSERT INTO accounts (id, big) \
         SELECT g, repeat(md5(g::text), 200) FROM generate_series(5000000, 5010000) g",
    );
    let url = env.nats.url();
    let db = dir.path().join("mirror.sqlite");
    let writer = Writer::start(&env.pg, seed, 1, 500);
    writer.wait_changes(1_000);
    let mut mirror = BridgeProcess::spawn(&mut mirror_command(
        &url,
        &db,
        dir.path(),
        Some(TABLES),
        // A snapshot whose bridge died is requested again after this long.
        &["--snapshot-stall-secs", "10"],
    ));
    mirror.wait_for_line("of accounts requested", Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(200));
    kill_9(&mut bridge);
    let loaded = mirror_state(&db).len();
    std::thread::sleep(Duration::from_secs(1));
    bridge = spawn_bridge(&env, dir.path());
    wait_for("the mirror to bootstrap", STEP_TIMEOUT, || {
        if let Some(status) = mirror.child.try_wait().unwrap() {
            panic!("the mirror exited ({status}):\n{}", tail(&mirror.log(), 60));
        }
        bootstrapped(&db, &table_tokens()).then_some(())
    });
    let report = writer.finish();
    eprintln!(
        "mirror oracle: bridge killed with {loaded} tables loaded; bootstrapped after {:?}; \
         {} changes",
        started.elapsed(),
        report.changes
    );
    stop_caught_up_mirror(&env, &url, &db, &mut mirror);
    assert_mirrored(&env, &db, seed, &mirror.log());
    drop(bridge);
}

/// `ALTER TABLE ... ADD COLUMN ... DEFAULT` writes nothing to the WAL for the existing rows:
/// PostgreSQL shows them with the default, so the mirror takes a new snapshot of the table.
#[test]
fn mirror_has_the_default_of_an_added_column_in_older_rows() {
    let env = TestEnv::start();
    setup_app_db(
        &env.pg,
        "CREATE TABLE users (id int PRIMARY KEY, name text); \
         INSERT INTO users SELECT g, 'u' || g FROM generate_series(1, 20) g",
        "",
    );
    let dir = TempDir::new("mirror");
    let bridge = spawn_bridge(&env, dir.path());
    let url = env.nats.url();
    let db = dir.path().join("mirror.sqlite");
    let mut mirror = BridgeProcess::spawn(&mut mirror_command(&url, &db, dir.path(), None, &[]));
    wait_for("the mirror to bootstrap", STEP_TIMEOUT, || {
        bootstrapped(&db, &["users"]).then_some(())
    });
    env.pg.sql(
        "app",
        "ALTER TABLE users ADD COLUMN status text DEFAULT 'new', \
         ADD COLUMN n int NOT NULL DEFAULT 7",
    );
    env.pg
        .sql("app", "UPDATE users SET name = 'x' WHERE id = 1");
    wait_mirror_caught_up(&env.pg, &url, &durable(&db));
    let users = Table {
        token: "users",
        pg: "users",
        key: 1,
        columns: vec![
            ("id", Kind::Int),
            ("name", Kind::Text),
            ("status", Kind::Text),
            ("n", Kind::Int),
        ],
    };
    if let Err(report) = compare_table(&env.pg, &db, &users) {
        panic!("{report}\nmirror log (tail):\n{}", tail(&mirror.log(), 20));
    }
    assert_eq!(mirror.terminate(Duration::from_secs(30)), Some(0));
    drop(bridge);
}

// ---------------------------------------------------------------------------------------
// Transactions, row versions, schema changes, several mirrors.

/// A bridge and a mirror of `tables` (`None`: every table) on a fresh database made by
/// `schema`; the mirror has bootstrapped `tokens`.
fn small_setup(
    schema: &str,
    tables: Option<&str>,
    tokens: &[&str],
) -> (TestEnv, BridgeProcess, TempDir, BridgeProcess) {
    let env = TestEnv::start();
    setup_app_db(&env.pg, schema, "");
    let dir = TempDir::new("mirror");
    let bridge = spawn_bridge(&env, dir.path());
    let db = dir.path().join("mirror.sqlite");
    let mirror = BridgeProcess::spawn(&mut mirror_command(
        &env.nats.url(),
        &db,
        dir.path(),
        tables,
        &[],
    ));
    wait_for_logged(
        "the mirror to bootstrap",
        STEP_TIMEOUT,
        &[("bridge", &bridge), ("mirror", &mirror)],
        || bootstrapped(&db, tokens).then_some(()),
    );
    (env, bridge, dir, mirror)
}

/// Panics with the differences between the SQLite table and its source.
fn assert_table_mirrored(env: &TestEnv, db: &Path, t: &Table, mirror: &BridgeProcess) -> usize {
    match compare_table(&env.pg, db, t) {
        Ok(n) => n,
        Err(report) => panic!(
            "{} differs from the source:\n{report}\nmirror log (tail):\n{}",
            t.token,
            tail(&mirror.log(), 40)
        ),
    }
}

/// Readers of the SQLite file never see part of a source transaction: every transaction moves
/// money between accounts, so the sum stays the same in every committed state. The large
/// transactions are streamed by PostgreSQL before their commit and take the bridge a while to
/// publish, which is where a mirror committing on a pause would split them. Most transactions
/// end with a change of a table the mirror does not follow, so the change marked last is not
/// one it receives.
#[test]
fn mirror_shows_whole_source_transactions_only() {
    const ACCOUNTS: i64 = 4_000;
    let (env, bridge, dir, mut mirror) = small_setup(
        &format!(
            "CREATE TABLE acct (id int PRIMARY KEY, bal bigint NOT NULL); \
             CREATE TABLE audit (id serial PRIMARY KEY, note text); \
             INSERT INTO acct SELECT g, 100 FROM generate_series(1, {ACCOUNTS}) g"
        ),
        Some("acct"),
        &["acct"],
    );
    let url = env.nats.url();
    let db = dir.path().join("mirror.sqlite");
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, samples, db) = (Arc::clone(&stop), Arc::clone(&samples), db.clone());
        std::thread::spawn(move || {
            let conn = open_sqlite(&db).unwrap();
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let state: (i64, i64) = conn
                    .query_row(
                        "SELECT count(*), coalesce(sum(bal), 0) FROM acct",
                        [],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .unwrap();
                if state != (ACCOUNTS, ACCOUNTS * 100) && !seen.contains(&state) {
                    seen.push(state);
                }
                samples.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
            seen
        })
    };
    let mut conn = env.pg.connect("app");
    let mut rng = Rng::new(seed());
    for round in 0..40 {
        let sql = if round % 4 == 0 {
            // Every account: 4 000 changes, streamed before the commit.
            let half = ACCOUNTS / 2;
            format!(
                "BEGIN; UPDATE acct SET bal = bal - 1 WHERE id <= {half}; \
                 UPDATE acct SET bal = bal + 1 WHERE id > {half}; COMMIT"
            )
        } else {
            let mut statements = String::from("BEGIN;");
            for _ in 0..rng.range(1, 20) {
                let (a, b) = (rng.range(1, ACCOUNTS), rng.range(1, ACCOUNTS));
                let n = rng.range(0, 50);
                let _ = write!(
                    statements,
                    "UPDATE acct SET bal = bal - {n} WHERE id = {a}; \
                     UPDATE acct SET bal = bal + {n} WHERE id = {b};"
                );
            }
            if round % 3 != 1 {
                statements.push_str("INSERT INTO audit (note) VALUES ('transfer');");
            }
            statements.push_str("COMMIT");
            statements
        };
        conn.execute(&sql).unwrap();
    }
    // The last transaction ends with a change the mirror does not receive, and nothing
    // follows it for a while: the mirror finds its end in the stream.
    conn.execute(
        "BEGIN; UPDATE acct SET bal = bal - 1000 WHERE id = 1; \
         UPDATE acct SET bal = bal + 1000 WHERE id = 2; \
         INSERT INTO audit (note) VALUES ('last'); COMMIT",
    )
    .unwrap();
    let want = env.pg.sql("app", "SELECT bal FROM acct WHERE id = 1").rows[0][0]
        .as_deref()
        .unwrap()
        .parse::<i64>()
        .unwrap();
    wait_for(
        "the mirror to commit a transaction whose marked change is of another table",
        Duration::from_secs(60),
        || {
            let bal: i64 = open_sqlite(&db)
                .unwrap()
                .query_row("SELECT bal FROM acct WHERE id = 1", [], |r| r.get(0))
                .unwrap();
            (bal == want).then_some(())
        },
    );
    // The stream's last message is one the consumer receives, for the catch-up check.
    conn.execute("UPDATE acct SET bal = bal WHERE id = 3")
        .unwrap();
    wait_mirror_caught_up(&env.pg, &url, &durable(&db));
    stop.store(true, Ordering::Relaxed);
    let seen = sampler.join().unwrap();
    let samples = samples.load(Ordering::Relaxed);
    eprintln!("mirror transactions: {samples} samples of the SQLite file");
    assert!(samples > 50, "the file was sampled {samples} times only");
    assert!(
        seen.is_empty(),
        "readers saw part of a transaction: (rows, sum) {seen:?} (want ({ACCOUNTS}, {})); \
         mirror log:\n{}",
        ACCOUNTS * 100,
        tail(&mirror.log(), 40)
    );
    let acct = Table {
        token: "acct",
        pg: "acct",
        key: 1,
        columns: vec![("id", Kind::Int), ("bal", Kind::Int)],
    };
    assert_eq!(
        assert_table_mirrored(&env, &db, &acct, &mirror),
        ACCOUNTS as usize
    );

    // A bridge that stalls in the middle of publishing a transaction: its first change alone
    // stays invisible however long the rest takes. (Written by hand, at an LSN later than any
    // of the source's.)
    let bal = |id: i64| -> i64 {
        open_sqlite(&db)
            .unwrap()
            .query_row("SELECT bal FROM acct WHERE id = ?1", [id], |r| r.get(0))
            .unwrap()
    };
    let (one, two) = (bal(1), bal(2));
    let change = |seq: u32, id: i64, value: i64, last: bool| {
        format!(
            r#"{{"table":"acct","schema":"public","operation":"UPDATE","relation_id":1,"lsn":"FF/0","commit_lsn":"FF/0","xid":1,"commit_time":"2025-12-10T10:30:00.000000Z","seq":{seq},"last_in_tx":{last},"columns":[{{"name":"id","value":{id}}},{{"name":"bal","value":{value}}}],"old_columns":null,"unchanged_toast":[]}}"#
        )
    };
    let publish = |seq: u32, payload: String, last: bool| {
        testkit::with_nats(&url, |client| async move {
            let js = async_nats::jetstream::new(client);
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("FF/0-{seq}").as_str());
            if last {
                headers.insert("Pgbridge-Last-In-Tx", "true");
            }
            js.publish_with_headers("cdc.acct.update", headers, payload.into())
                .await
                .expect("publish")
                .await
                .expect("stored");
        })
    };
    publish(0, change(0, 1, one - 5, false), false);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        (bal(1), bal(2)),
        (one, two),
        "half a transaction became visible while the rest was late; log:\n{}",
        tail(&mirror.log(), 20)
    );
    publish(1, change(1, 2, two + 5, true), true);
    wait_for("the whole transaction", Duration::from_secs(30), || {
        ((bal(1), bal(2)) == (one - 5, two + 5)).then_some(())
    });
    assert_eq!(mirror.terminate(Duration::from_secs(30)), Some(0));
    drop(bridge);
}

/// Without `--table`, a table whose schema the bridge writes after the mirror started (here
/// one created later, in a publication for all tables) is mirrored too, without a restart:
/// its snapshot, then its changes, while the first table goes on.
#[test]
fn mirror_without_tables_takes_up_a_table_created_later() {
    let (env, bridge, dir, mut mirror) = small_setup(
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (0, 'seed')",
        None,
        &["t"],
    );
    let url = env.nats.url();
    let db = dir.path().join("mirror.sqlite");
    env.pg.sql(
        "app",
        "CREATE TABLE late (id int PRIMARY KEY, v text); \
         GRANT SELECT ON late TO bridge_reader; \
         INSERT INTO late SELECT g, 'a' || g FROM generate_series(1, 50) g; \
         INSERT INTO t VALUES (1, 'one')",
    );
    wait_for_logged(
        "the mirror to take up the new table",
        STEP_TIMEOUT,
        &[("bridge", &bridge), ("mirror", &mirror)],
        || bootstrapped(&db, &["t", "late"]).then_some(()),
    );
    env.pg.sql(
        "app",
        "UPDATE late SET v = 'b' WHERE id <= 10; DELETE FROM late WHERE id > 40; \
         INSERT INTO t VALUES (2, 'two')",
    );
    wait_mirror_caught_up(&env.pg, &url, &durable(&db));
    let columns = vec![("id", Kind::Int), ("v", Kind::Text)];
    for (token, rows) in [("t", 3), ("late", 40)] {
        let t = Table {
            token,
            pg: token,
            key: 1,
            columns: columns.clone(),
        };
        assert_eq!(assert_table_mirrored(&env, &db, &t, &mirror), rows);
    }
    assert!(
        mirror.log().contains("late: its schema appeared"),
        "{}",
        mirror.log()
    );
    assert!(
        bridge
            .log()
            .contains("schema of public.late (new to the stream) written"),
        "{}",
        bridge.log()
    );
    assert_eq!(mirror.terminate(Duration::from_secs(30)), Some(0));
    drop(bridge);
}

/// Changes that come again, with new message ids (so JetStream stores them) and in any order,
/// change nothing: every row keeps the version of its last change, a deleted row its
/// tombstone and a truncated table the version of the TRUNCATE.
#[test]
fn mirror_ignores_replayed_and_out_of_order_changes() {
    let (env, bridge, dir, mut mirror) = small_setup(
        "CREATE TABLE t (id int PRIMARY KEY, v text); \
         CREATE TABLE u (id int PRIMARY KEY, v text); \
         INSERT INTO t VALUES (0, 'seed'); INSERT INTO u VALUES (0, 'seed')",
        None,
        &["t", "u"],
    );
    let url = env.nats.url();
    let db = dir.path().join("mirror.sqlite");
    for sql in [
        "INSERT INTO t SELECT g, 'a' || g FROM generate_series(1, 100) g",
        "UPDATE t SET v = 'b' || id WHERE id <= 60",
        "DELETE FROM t WHERE id <= 20",
        "UPDATE t SET id = id + 1000 WHERE id BETWEEN 21 AND 30",
        "BEGIN; UPDATE t SET v = 'c' WHERE id = 40; DELETE FROM t WHERE id = 41; \
         INSERT INTO t VALUES (20, 'again'); COMMIT",
        "INSERT INTO u SELECT g, 'x' FROM generate_series(1, 10) g",
        "TRUNCATE u",
        "INSERT INTO u VALUES (5, 'after truncate')",
    ] {
        env.pg.sql("app", sql);
    }
    wait_mirror_caught_up(&env.pg, &url, &durable(&db));
    let tables = [
        Table {
            token: "t",
            pg: "t",
            key: 1,
            columns: vec![("id", Kind::Int), ("v", Kind::Text)],
        },
        Table {
            token: "u",
            pg: "u",
            key: 1,
            columns: vec![("id", Kind::Int), ("v", Kind::Text)],
        },
    ];
    for t in &tables {
        assert_table_mirrored(&env, &db, t, &mirror);
    }

    // Every change once more in stream order, then once more backwards.
    let stored = testkit::read_stream(&url, "CDC");
    assert!(stored.len() > 200, "{} changes", stored.len());
    let replay: Vec<_> = stored.iter().chain(stored.iter().rev()).collect();
    let count = replay.len();
    testkit::with_nats(&url, |client| async move {
        let js = async_nats::jetstream::new(client);
        for (i, m) in replay.into_iter().enumerate() {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("replay-{i}").as_str());
            if let Some(h) = &m.last_in_tx_header {
                headers.insert("Pgbridge-Last-In-Tx", h.as_str());
            }
            js.publish_with_headers(m.subject.clone(), headers, m.payload.clone().into())
                .await
                .expect("publish")
                .await
                .expect("stored");
        }
    });
    assert_eq!(
        testkit::stream_len(&url, "CDC"),
        (stored.len() + count) as u64
    );
    wait_mirror_caught_up(&env.pg, &url, &durable(&db));
    for t in &tables {
        assert_table_mirrored(&env, &db, t, &mirror);
    }
    let tombstones: i64 = open_sqlite(&db)
        .unwrap()
        .query_row(
            "SELECT count(*) FROM _pgbridge_versions WHERE table_token = 't' AND deleted = 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(tombstones >= 20, "{tombstones} tombstones");
    assert_eq!(mirror.terminate(Duration::from_secs(30)), Some(0));
    drop(bridge);
}

/// `DROP COLUMN` and `ALTER COLUMN ... TYPE` in the middle of a workload: the mirrored table
/// ends with the source's columns, of the new types, and its values.
#[test]
fn mirror_follows_dropped_and_retyped_columns() {
    let (env, bridge, dir, mut mirror) = small_setup(
        "CREATE TABLE users (id int PRIMARY KEY, name text, age int, note text, score text); \
         INSERT INTO users SELECT g, 'u' || g, g, 'n' || g, (g * 3)::text \
           FROM generate_series(1, 200) g",
        None,
        &["users"],
    );
    let url = env.nats.url();
    let db = dir.path().join("mirror.sqlite");
    env.pg
        .sql("app", "UPDATE users SET name = name || '!' WHERE id <= 10");
    env.pg.sql("app", "ALTER TABLE users DROP COLUMN note");
    env.pg.sql(
        "app",
        "ALTER TABLE users ALTER COLUMN age TYPE text USING age::text, \
         ALTER COLUMN score TYPE bigint USING score::bigint",
    );
    // Two waves: the mirror reads the schema again at most once a second. The bridge writes the
    // new schema when the first change after the ALTER arrives, so the first wave may reach
    // the mirror before the schema does; the second comes only once the schema is stored.
    for wave in 0..2 {
        if wave == 1 {
            wait_schema_without(&url, "users", "note");
        }
        env.pg.sql(
            "app",
            &format!(
                "UPDATE users SET age = age || 'y{wave}', score = score + 1 WHERE id % 4 = {wave}; \
                 INSERT INTO users VALUES ({}, 'new', 'seven', 7); \
                 DELETE FROM users WHERE id = {}",
                1000 + wave,
                50 + wave
            ),
        );
        std::thread::sleep(Duration::from_millis(1500));
    }
    wait_mirror_caught_up(&env.pg, &url, &durable(&db));
    let columns = column_types(&db, "users");
    let columns: Vec<(&str, &str)> = columns
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    assert_eq!(
        columns,
        [
            ("id", "INTEGER"),
            ("name", "TEXT"),
            ("age", "TEXT"),
            ("score", "INTEGER")
        ],
        "the mirrored table's columns; log:\n{}",
        tail(&mirror.log(), 40)
    );
    let users = Table {
        token: "users",
        pg: "users",
        key: 1,
        columns: vec![
            ("id", Kind::Int),
            ("name", Kind::Text),
            ("age", Kind::Text),
            ("score", Kind::Int),
        ],
    };
    assert_eq!(assert_table_mirrored(&env, &db, &users, &mirror), 200);
    assert_eq!(mirror.terminate(Duration::from_secs(30)), Some(0));
    drop(bridge);
}

/// A change that lacks a dropped column and carries a retyped one reaches the mirror before
/// the bridge has stored the table's new schema (here: the old schema is put back while the
/// mirror is stopped). The mirror keeps its columns then, and follows the new schema as soon
/// as it is stored, with no further change of the table.
#[test]
fn mirror_follows_a_schema_stored_after_the_change() {
    let (env, bridge, dir, mut mirror) = small_setup(
        "CREATE TABLE users (id int PRIMARY KEY, name text, age int, note text); \
         INSERT INTO users SELECT g, 'u' || g, g, 'n' || g FROM generate_series(1, 50) g",
        None,
        &["users"],
    );
    let url = env.nats.url();
    let db = dir.path().join("mirror.sqlite");
    assert_eq!(mirror.terminate(Duration::from_secs(30)), Some(0));
    let (_, old) = schema_bytes(&url, "users").expect("the schema of users");
    env.pg.sql("app", "ALTER TABLE users DROP COLUMN note");
    env.pg.sql(
        "app",
        "ALTER TABLE users ALTER COLUMN age TYPE text USING age::text",
    );
    env.pg
        .sql("app", "UPDATE users SET age = age || 'y' WHERE id <= 5");
    wait_schema_without(&url, "users", "note");
    let (_, new) = schema_bytes(&url, "users").expect("the schema of users");
    put_schema_bytes(&url, "users", old);

    let mut mirror = BridgeProcess::spawn(&mut mirror_command(&url, &db, dir.path(), None, &[]));
    wait_mirror_caught_up(&env.pg, &url, &durable(&db));
    let before = column_types(&db, "users");
    assert_eq!(
        before,
        [
            ("id".into(), "INTEGER".into()),
            ("name".into(), "TEXT".into()),
            ("age".into(), "INTEGER".into()),
            ("note".into(), "TEXT".into())
        ],
        "with the old schema stored, the mirror cannot tell a dropped column; log:\n{}",
        tail(&mirror.log(), 40)
    );
    put_schema_bytes(&url, "users", new);
    let want: Vec<(String, String)> = [("id", "INTEGER"), ("name", "TEXT"), ("age", "TEXT")]
        .iter()
        .map(|(n, t)| ((*n).to_owned(), (*t).to_owned()))
        .collect();
    wait_for_logged(
        "the mirror to follow the stored schema",
        STEP_TIMEOUT,
        &[("mirror", &mirror)],
        || (column_types(&db, "users") == want).then_some(()),
    );
    let users = Table {
        token: "users",
        pg: "users",
        key: 1,
        columns: vec![("id", Kind::Int), ("name", Kind::Text), ("age", Kind::Text)],
    };
    assert_eq!(assert_table_mirrored(&env, &db, &users, &mirror), 50);
    assert_eq!(mirror.terminate(Duration::from_secs(30)), Some(0));
    drop(bridge);
}

/// The mirrored table's columns and declared types, in order.
fn column_types(db: &Path, table: &str) -> Vec<(String, String)> {
    open_sqlite(db)
        .unwrap()
        .prepare("SELECT name, type FROM pragma_table_info(?1) ORDER BY cid")
        .unwrap()
        .query_map([table], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// The stored bytes of `key` in the `schemas` bucket, with their revision.
fn schema_bytes(nats_url: &str, key: &str) -> Option<(u64, bytes::Bytes)> {
    testkit::with_nats(nats_url, |client| async move {
        let js = async_nats::jetstream::new(client);
        let kv = js.get_key_value("schemas").await.ok()?;
        let e = kv.entry(key).await.ok()??;
        Some((e.revision, e.value))
    })
}

/// Stores `value` as `key` in the `schemas` bucket, as the bridge would.
fn put_schema_bytes(nats_url: &str, key: &str, value: bytes::Bytes) {
    let key = key.to_owned();
    testkit::with_nats(nats_url, |client| async move {
        let js = async_nats::jetstream::new(client);
        let kv = js.get_key_value("schemas").await.unwrap();
        kv.put(key, value).await.unwrap();
    });
}

/// Waits until the bridge's `schemas` bucket holds the schema of `key` without `column`.
fn wait_schema_without(nats_url: &str, key: &str, column: &str) {
    wait_for(
        &format!("the schema of {key} without {column} in the schemas bucket"),
        Duration::from_secs(30),
        || {
            let (_, schema) = crate::snapshot::schema_entry(nats_url, key)?;
            let columns = schema.get("columns")?.as_array()?;
            let named = |c: &rmpv::Value| crate::snapshot::map(c)["name"].as_str() == Some(column);
            (!columns.iter().any(named)).then_some(())
        },
    );
}

/// Two mirrors on one stream, both with the default consumer name, at the same time: each
/// has its own consumer and both end equal to the source.
#[test]
fn two_mirrors_with_default_consumer_names() {
    let env = TestEnv::start();
    setup_app_db(
        &env.pg,
        "CREATE TABLE users (id int PRIMARY KEY, name text); \
         INSERT INTO users SELECT g, 'u' || g FROM generate_series(1, 100) g",
        "",
    );
    let dir = TempDir::new("mirror");
    let bridge = spawn_bridge(&env, dir.path());
    let url = env.nats.url();
    let dbs = [dir.path().join("a.sqlite"), dir.path().join("b.sqlite")];
    let names: Vec<String> = dbs.iter().map(|db| durable(db)).collect();
    assert_ne!(names[0], names[1]);
    let mut mirrors: Vec<BridgeProcess> = dbs
        .iter()
        .map(|db| BridgeProcess::spawn(&mut mirror_command(&url, db, dir.path(), None, &[])))
        .collect();
    for db in &dbs {
        wait_for("the mirrors to bootstrap", STEP_TIMEOUT, || {
            bootstrapped(db, &["users"]).then_some(())
        });
    }
    for i in 0..20 {
        env.pg.sql(
            "app",
            &format!(
                "UPDATE users SET name = name || '{i}' WHERE id % 7 = {}; \
                 INSERT INTO users VALUES ({}, 'new'); DELETE FROM users WHERE id = {}",
                i % 7,
                1000 + i,
                i + 1
            ),
        );
    }
    let users = Table {
        token: "users",
        pg: "users",
        key: 1,
        columns: vec![("id", Kind::Int), ("name", Kind::Text)],
    };
    for (db, mirror) in dbs.iter().zip(&mirrors) {
        wait_mirror_caught_up(&env.pg, &url, &durable(db));
        assert_eq!(assert_table_mirrored(&env, db, &users, mirror), 100);
    }
    for (name, mirror) in names.iter().zip(&mirrors) {
        assert!(
            consumer_state(&url, name).is_some(),
            "consumer {name} is gone"
        );
        assert!(
            !mirror.log().contains("following again"),
            "a mirror lost its consumer:\n{}",
            tail(&mirror.log(), 40)
        );
    }
    for mirror in &mut mirrors {
        assert_eq!(mirror.terminate(Duration::from_secs(30)), Some(0));
    }
    drop(bridge);
}
