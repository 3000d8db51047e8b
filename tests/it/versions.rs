//! What depends on the server's version, against whichever server `PG_BIN` names (CI runs this
//! module on 15 and 18): two-phase transactions (proto 3, 15+), parallel streaming (proto 4,
//! 16+), published generated columns (18+). The bridge must publish the same events on every
//! version; a test of a feature the server lacks prints a SKIPPED line.

use std::time::Duration;

use pgbridge::pg::pgoutput::{Decoder, LogicalMessage};
use pgbridge::pg::Lsn;
use testkit::{
    bridge_command, json_row_ids, read_stream, setup_app_db, split_msg_id, stream_len, wait_for,
    BridgeProcess, PgServer, StoredMessage, TempDir, TestEnv,
};

fn wait_messages(nats_url: &str, n: u64) -> Vec<StoredMessage> {
    wait_for(
        &format!("{n} messages in CDC"),
        Duration::from_secs(120),
        || (stream_len(nats_url, "CDC") >= n).then_some(()),
    );
    read_stream(nats_url, "CDC")
}

fn json_bridge(env: &TestEnv, dir: &TempDir) -> BridgeProcess {
    let bridge = BridgeProcess::spawn(
        bridge_command(&env.pg, &env.nats.url(), dir.path()).args(["--format", "json"]),
    );
    bridge.wait_for_line("streaming started", Duration::from_secs(60));
    bridge
}

fn commit_lsn(m: &StoredMessage) -> Lsn {
    split_msg_id(m.msg_id.as_deref().expect("Nats-Msg-Id")).2
}

/// The Begin `final_lsn` (the commit record's start) of every transaction a second slot,
/// created without two-phase, decodes from pgoutput proto 1: what a plain commit would give.
fn plain_commit_lsns(pg: &PgServer, slot: &str) -> Vec<Lsn> {
    let rows = pg
        .sql(
            "app",
            &format!(
                "SELECT data FROM pg_logical_slot_peek_binary_changes('{slot}', NULL, NULL, \
                 'proto_version', '1', 'publication_names', 'cdc_pub')"
            ),
        )
        .rows;
    let mut d = Decoder::new();
    rows.iter()
        .filter_map(|r| {
            let hex = r[0].as_deref().unwrap().strip_prefix("\\x").unwrap();
            let bytes: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            match d.decode(&bytes).unwrap() {
                LogicalMessage::Begin(b) => Some(b.final_lsn),
                _ => None,
            }
        })
        .collect()
}

/// On 15+ the bridge's slot is two-phase: the prepared transactions below really travel as
/// Begin Prepare .. Prepare, Commit/Rollback Prepared.
fn check_two_phase_slot(pg: &PgServer) {
    let two_phase = pg.value(
        "app",
        "SELECT two_phase FROM pg_replication_slots WHERE slot_name <> 'plain' AND slot_type = 'logical'",
    );
    let want = if pg.major_version() >= 15 { "t" } else { "f" };
    assert_eq!(two_phase, want, "two_phase of the bridge's slot");
}

#[test]
fn prepared_transactions_are_published_once_at_commit_prepared() {
    let env = TestEnv::start();
    setup_app_db(&env.pg, "CREATE TABLE t (id int PRIMARY KEY, v text)", "");
    env.pg.sql(
        "app",
        "SELECT pg_create_logical_replication_slot('plain', 'pgoutput')",
    );
    let dir = TempDir::new("bridge");
    let mut bridge = json_bridge(&env, &dir);
    check_two_phase_slot(&env.pg);
    let mut c = env.pg.connect("app");
    for sql in [
        "BEGIN",
        "INSERT INTO t VALUES (2, 'prepared'), (3, 'prepared')",
        "PREPARE TRANSACTION 'committed_later'",
        "INSERT INTO t VALUES (1, 'plain, committed in between')",
        "BEGIN",
        "INSERT INTO t VALUES (100, 'rolled back')",
        "PREPARE TRANSACTION 'rolled_back'",
        "ROLLBACK PREPARED 'rolled_back'",
        "COMMIT PREPARED 'committed_later'",
        "INSERT INTO t VALUES (4, 'last')",
    ] {
        c.execute(sql).unwrap();
    }
    let msgs = wait_messages(&env.nats.url(), 4);
    // Nothing more arrives: the rolled-back transaction is not published late either.
    std::thread::sleep(Duration::from_secs(2));
    let msgs = if stream_len(&env.nats.url(), "CDC") == 4 {
        msgs
    } else {
        read_stream(&env.nats.url(), "CDC")
    };
    let rows: Vec<i64> = json_row_ids(&msgs).into_iter().map(|(id, _)| id).collect();
    // Commit order: the plain insert committed before COMMIT PREPARED.
    assert_eq!(rows, [1, 2, 3, 4], "published once each, none rolled back");
    // The ids are those of a plain commit: the COMMIT PREPARED record, as a slot without
    // two-phase sees it.
    let plain = plain_commit_lsns(&env.pg, "plain");
    let ours: Vec<Lsn> = {
        let mut v: Vec<Lsn> = msgs.iter().map(commit_lsn).collect();
        v.dedup();
        v
    };
    assert_eq!(ours, plain, "commit LSNs of the transactions");
    assert_eq!(bridge.terminate(Duration::from_secs(30)), Some(0));
}

#[test]
fn a_restart_between_prepare_and_commit_prepared_loses_nothing() {
    let env = TestEnv::start();
    setup_app_db(&env.pg, "CREATE TABLE t (id int PRIMARY KEY, v text)", "");
    let dir = TempDir::new("bridge");
    let mut bridge = json_bridge(&env, &dir);
    check_two_phase_slot(&env.pg);
    let slot = env.pg.value(
        "app",
        "SELECT slot_name FROM pg_replication_slots WHERE slot_type = 'logical'",
    );
    let mut c = env.pg.connect("app");
    let before_prepare: Lsn = env
        .pg
        .value("app", "SELECT pg_current_wal_lsn()")
        .parse()
        .unwrap();
    for sql in [
        "BEGIN",
        "INSERT INTO t VALUES (2, 'prepared'), (3, 'prepared')",
        "PREPARE TRANSACTION 'across_restart'",
        "INSERT INTO t VALUES (1, 'committed after the PREPARE')",
    ] {
        c.execute(sql).unwrap();
    }
    let msgs = wait_messages(&env.nats.url(), 1);
    let after_prepare = commit_lsn(&msgs[0]);
    let confirmed_flush = || -> Option<Lsn> {
        env.pg
            .value(
                "app",
                &format!(
                    "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{slot}'"
                ),
            )
            .parse()
            .ok()
    };
    // On 15+ the bridge confirms what is durable, but not past the waiting PREPARE: the slot
    // stays between the two, so PostgreSQL sends the prepared transaction again after a
    // restart. (14 sends nothing at PREPARE: there is nothing to hold.)
    let two_phase = env.pg.major_version() >= 15;
    if two_phase {
        wait_for(
            "the slot to confirm up to the PREPARE",
            Duration::from_secs(30),
            || confirmed_flush().filter(|lsn| *lsn > before_prepare),
        );
        // Several status updates later it has not moved past it.
        std::thread::sleep(Duration::from_secs(2));
        let confirmed = confirmed_flush().unwrap();
        assert!(
            confirmed < after_prepare,
            "confirmed {confirmed} past the PREPARE (a later commit at {after_prepare})"
        );
    }
    assert_eq!(bridge.terminate(Duration::from_secs(30)), Some(0));
    if two_phase {
        let confirmed = confirmed_flush().unwrap();
        assert!(confirmed < after_prepare, "after shutdown: {confirmed}");
    }

    let mut bridge = json_bridge(&env, &dir);
    c.execute("COMMIT PREPARED 'across_restart'").unwrap();
    c.execute("INSERT INTO t VALUES (4, 'last')").unwrap();
    let msgs = wait_messages(&env.nats.url(), 4);
    let rows = json_row_ids(&msgs);
    // Row 1 came again after the restart, with the same id: stored once.
    testkit::assert_once_in_order(&rows, 4);
    assert!(
        !bridge.log().contains("without its prepared changes"),
        "{}",
        bridge.log()
    );
    assert_eq!(bridge.terminate(Duration::from_secs(30)), Some(0));
}

/// Rows of one large transaction, a large rolled-back subtransaction inside another, and a
/// large rolled-back transaction: far above `logical_decoding_work_mem` (64kB in the
/// harness), so they are streamed before they commit (proto 4 `streaming 'parallel'` on
/// 16+, proto 2/3 `streaming 'on'` on 14 and 15). The published result is the same.
/// 200 000 rows by default (about 30 s in a debug build here); `PGBRIDGE_BIG_ROWS=1000000`
/// runs the full-size check (about 2.5 min).
#[test]
fn streamed_transactions_arrive_alike_on_every_version() {
    let rows: i64 = std::env::var("PGBRIDGE_BIG_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let env = TestEnv::start();
    setup_app_db(
        &env.pg,
        "CREATE TABLE big (id int PRIMARY KEY, pad text)",
        "",
    );
    let dir = TempDir::new("bridge");
    let mut bridge = json_bridge(&env, &dir);
    let parallel = env.pg.major_version() >= 16;
    let want_options = if parallel {
        "protocol 4, streaming parallel"
    } else if env.pg.major_version() == 15 {
        "protocol 3, streaming on"
    } else {
        "protocol 2, streaming on"
    };
    bridge.wait_for_line(want_options, Duration::from_secs(10));
    env.pg.sql(
        "app",
        &format!(
            "BEGIN;
             INSERT INTO big SELECT g, 'kept' FROM generate_series(1, {rows}) g;
             COMMIT;
             BEGIN;
             INSERT INTO big VALUES ({rows} + 1, 'before the savepoint');
             SAVEPOINT s;
             INSERT INTO big SELECT g, 'dropped' FROM generate_series({rows} + 1001, {rows} + 31000) g;
             ROLLBACK TO SAVEPOINT s;
             INSERT INTO big VALUES ({rows} + 2, 'after the savepoint');
             COMMIT;
             BEGIN;
             INSERT INTO big SELECT g, 'aborted' FROM generate_series({rows} + 100001, {rows} + 130000) g;
             ROLLBACK;
             INSERT INTO big VALUES ({rows} + 3, 'last');"
        ),
    );
    let n = rows as u64 + 3;
    let msgs = wait_messages(&env.nats.url(), n);
    testkit::assert_once_in_order(&json_row_ids(&msgs), n);
    // The two committed ones were really streamed (not decoded at commit). The rolled-back
    // one may not be: PostgreSQL 18 skips a transaction it already knows to be aborted.
    let slot = env.pg.value(
        "app",
        "SELECT slot_name FROM pg_replication_slots WHERE slot_type = 'logical'",
    );
    let streamed: i64 = env
        .pg
        .value(
            "app",
            &format!(
                "SELECT stream_txns FROM pg_stat_replication_slots WHERE slot_name = '{slot}'"
            ),
        )
        .parse()
        .unwrap();
    assert!(streamed >= 2, "streamed transactions: {streamed}");
    assert_eq!(bridge.terminate(Duration::from_secs(30)), Some(0));
}

#[test]
fn stored_generated_columns_are_published_when_the_publication_says_so() {
    let env = TestEnv::start();
    if !env.pg.at_least(
        18,
        "stored_generated_columns_are_published_when_the_publication_says_so",
        "publish_generated_columns",
    ) {
        return;
    }
    setup_app_db(
        &env.pg,
        "CREATE TABLE g (id int PRIMARY KEY, a int, twice int GENERATED ALWAYS AS (a * 2) STORED)",
        "",
    );
    env.pg.sql(
        "app",
        "ALTER PUBLICATION cdc_pub SET (publish_generated_columns = stored)",
    );
    let dir = TempDir::new("bridge");
    let mut bridge = json_bridge(&env, &dir);
    env.pg.sql("app", "INSERT INTO g (id, a) VALUES (1, 21)");
    env.pg.sql("app", "UPDATE g SET a = 5 WHERE id = 1");
    let msgs = wait_messages(&env.nats.url(), 2);
    let twice: Vec<serde_json::Value> = msgs
        .iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            v["columns"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == "twice")
                .unwrap_or_else(|| panic!("no generated column in {v}"))["value"]
                .clone()
        })
        .collect();
    assert_eq!(twice, [serde_json::json!(42), serde_json::json!(10)]);
    // Without the publication option the column is left out, as on older servers.
    env.pg.sql(
        "app",
        "ALTER PUBLICATION cdc_pub SET (publish_generated_columns = none)",
    );
    env.pg.sql("app", "INSERT INTO g (id, a) VALUES (2, 1)");
    let msgs = wait_messages(&env.nats.url(), 3);
    let v: serde_json::Value = serde_json::from_slice(&msgs[2].payload).unwrap();
    let names: Vec<&str> = v["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["id", "a"]);
    assert_eq!(bridge.terminate(Duration::from_secs(30)), Some(0));
}

/// Starts the bridge until its slot exists, stops it, lets `invalidate` invalidate the slot,
/// and returns the exit code and stderr of the next start.
fn restart_on_invalidated_slot(env: &TestEnv, invalidate: impl FnOnce(&PgServer)) -> (i32, String) {
    setup_app_db(&env.pg, "CREATE TABLE t (id int PRIMARY KEY)", "");
    let dir = TempDir::new("bridge");
    let mut bridge = json_bridge(env, &dir);
    env.pg.sql("app", "INSERT INTO t VALUES (1)");
    wait_messages(&env.nats.url(), 1);
    assert_eq!(bridge.terminate(Duration::from_secs(30)), Some(0));
    invalidate(&env.pg);
    let status = env.pg.value(
        "app",
        "SELECT wal_status FROM pg_replication_slots WHERE slot_type = 'logical'",
    );
    assert_eq!(status, "lost", "the slot was invalidated");
    let mut bridge =
        BridgeProcess::spawn(&mut bridge_command(&env.pg, &env.nats.url(), dir.path()));
    let code = bridge.wait_exit(Duration::from_secs(60)).unwrap_or(-1);
    (code, bridge.log())
}

fn error_line(log: &str) -> &str {
    let lines: Vec<&str> = log.lines().filter(|l| l.starts_with("bridge: ")).collect();
    assert_eq!(lines.len(), 1, "one error line: {log}");
    lines[0]
}

#[test]
fn a_slot_past_max_slot_wal_keep_size_stops_the_start_with_what_to_do() {
    let nats = std::thread::spawn(testkit::NatsServer::start);
    let pg = PgServer::start_with(&[
        ("max_slot_wal_keep_size", "1MB"),
        ("wal_keep_size", "0"),
        ("min_wal_size", "32MB"),
        ("max_wal_size", "32MB"),
    ]);
    let env = TestEnv {
        pg,
        nats: nats.join().unwrap(),
    };
    let (code, log) = restart_on_invalidated_slot(&env, |pg| {
        let mut c = pg.connect("app");
        for _ in 0..4 {
            c.execute("CREATE TABLE filler AS SELECT g FROM generate_series(1, 20000) g")
                .unwrap();
            c.execute("DROP TABLE filler").unwrap();
            c.execute("SELECT pg_switch_wal()").unwrap();
        }
        c.execute("CHECKPOINT").unwrap();
    });
    assert_eq!(code, 2, "{log}");
    let line = error_line(&log);
    assert!(line.contains("was invalidated (wal_removed)"), "{line}");
    assert!(line.contains("max_slot_wal_keep_size"), "{line}");
    assert!(line.contains("pg_drop_replication_slot("), "{line}");
}

#[test]
fn an_idle_timeout_stops_the_start_with_what_to_do() {
    let nats = std::thread::spawn(testkit::NatsServer::start);
    let pg = PgServer::start();
    let env = TestEnv {
        pg,
        nats: nats.join().unwrap(),
    };
    if !env.pg.at_least(
        18,
        "an_idle_timeout_stops_the_start_with_what_to_do",
        "idle_replication_slot_timeout",
    ) {
        return;
    }
    let (code, log) = restart_on_invalidated_slot(&env, |pg| {
        pg.sql(
            "postgres",
            "ALTER SYSTEM SET idle_replication_slot_timeout = '1s'",
        );
        pg.sql("postgres", "SELECT pg_reload_conf()");
        std::thread::sleep(Duration::from_secs(2));
        pg.sql("postgres", "CHECKPOINT");
        // What the slot monitor reads (and /status shows) about it.
        let mut c = pg.connect("app");
        let slot = pg.value(
            "app",
            "SELECT slot_name FROM pg_replication_slots WHERE slot_type = 'logical'",
        );
        let r = pgbridge::telemetry::monitor::read_slot(&mut c, &slot)
            .unwrap()
            .unwrap();
        assert_eq!(r.invalidation_reason.as_deref(), Some("idle_timeout"));
        assert!(r.inactive_since.is_some());
    });
    assert_eq!(code, 2, "{log}");
    let line = error_line(&log);
    assert!(line.contains("was invalidated (idle_timeout)"), "{line}");
    assert!(line.contains("idle_replication_slot_timeout"), "{line}");
}

/// A slot made before the bridge asked for two-phase (an older bridge, or by hand): it becomes
/// two-phase from the position streaming starts at, and a transaction prepared before that
/// arrives whole at its COMMIT PREPARED.
#[test]
fn a_slot_created_without_two_phase_serves_prepared_transactions_alike() {
    let env = TestEnv::start();
    setup_app_db(&env.pg, "CREATE TABLE t (id int PRIMARY KEY, v text)", "");
    env.pg.sql(
        "app",
        "SELECT pg_create_logical_replication_slot('old_slot', 'pgoutput')",
    );
    let mut c = env.pg.connect("app");
    // Prepared before the bridge ever streamed from the slot.
    for sql in [
        "BEGIN",
        "INSERT INTO t VALUES (2, 'prepared before')",
        "PREPARE TRANSACTION 'before'",
    ] {
        c.execute(sql).unwrap();
    }
    let dir = TempDir::new("bridge");
    let mut bridge = BridgeProcess::spawn(
        bridge_command(&env.pg, &env.nats.url(), dir.path())
            .args(["--format", "json", "--slot", "old_slot"]),
    );
    bridge.wait_for_line("streaming started", Duration::from_secs(60));
    for sql in [
        "INSERT INTO t VALUES (1, 'plain')",
        "BEGIN",
        "INSERT INTO t VALUES (4, 'prepared after')",
        "PREPARE TRANSACTION 'after'",
        "COMMIT PREPARED 'before'",
        "INSERT INTO t VALUES (3, 'plain')",
        "COMMIT PREPARED 'after'",
    ] {
        c.execute(sql).unwrap();
    }
    let msgs = wait_messages(&env.nats.url(), 4);
    testkit::assert_once_in_order(&json_row_ids(&msgs), 4);
    let two_phase = env.pg.value(
        "app",
        "SELECT two_phase FROM pg_replication_slots WHERE slot_name = 'old_slot'",
    );
    let want = if env.pg.major_version() >= 15 {
        "t"
    } else {
        "f"
    };
    assert_eq!(
        two_phase, want,
        "the slot became two-phase at START_REPLICATION"
    );
    assert_eq!(bridge.terminate(Duration::from_secs(30)), Some(0));
}
