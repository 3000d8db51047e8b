//! Exactly-once delivery to Kafka (`--kafka-exactly-once`) against a real broker: a
//! read_committed consumer sees every change once and the positions topic holds the end of
//! the last transaction; an aborted transaction is invisible to it; a producer fenced by
//! another with the bridge's transactional id is replaced without a restart; and across
//! kill -9 under load, including kills after a Kafka commit and before PostgreSQL confirmed
//! it, every change is seen exactly once, in commit order per key; `--on-oversize` behaves as
//! at least once.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use pgbridge::pg::Lsn;
use pgbridge::wire::kafka::{position_key, positions_topic, PositionRecord, ID_HEADER};
use testkit::kafka::KafkaServer;
use testkit::oracle::{grant_sales, kill_9, seed_sql, Writer, SCHEMA, SLOT};
use testkit::{
    confirmed_flush, setup_app_db, state_file_lsn, wait_caught_up, BridgeProcess, KafkaRecord,
    PgServer, TempDir,
};

use super::kafka::{
    compare_tables_read, count_duplicates, kafka_bridge, position, wait_read, STEP,
};

const EOS: &[&str] = &["--kafka-exactly-once"];
/// One partition for the broker's transaction log: the first transactional producer does
/// not wait for fifty to be created.
const TXN_LOG: &[(&str, &str)] = &[("transaction.state.log.num.partitions", "1")];

/// PostgreSQL with the oracle's tables (no rows yet) and a broker ready for transactions.
fn eos_env() -> (PgServer, KafkaServer) {
    let kafka = std::thread::spawn(|| KafkaServer::start_with(TXN_LOG));
    let pg = PgServer::start();
    setup_app_db(&pg, SCHEMA, "");
    grant_sales(&pg);
    (pg, kafka.join().expect("the Kafka broker started"))
}

/// The cluster's system identifier.
fn system_identifier(pg: &PgServer) -> String {
    pg.sql(
        "postgres",
        "SELECT system_identifier::text FROM pg_control_system()",
    )
    .rows[0][0]
        .clone()
        .unwrap()
}

/// The committed position record of this cluster's slot, if any.
fn committed_position(kafka: &KafkaServer, pg: &PgServer) -> Option<(PositionRecord, Lsn)> {
    let key = position_key(&system_identifier(pg), SLOT);
    kafka
        .client()
        .read_topic_isolated(&positions_topic("cdc"), true)
        .into_iter()
        .rev()
        .find(|r| r.key.as_deref() == Some(key.as_bytes()))
        .map(|r| {
            let rec: PositionRecord = serde_json::from_slice(r.value.as_deref().unwrap()).unwrap();
            let lsn = rec.end_lsn.parse().unwrap();
            (rec, lsn)
        })
}

/// The committed records of `topic` once it holds at least `n`.
fn wait_committed(
    kafka: &KafkaServer,
    bridge: &BridgeProcess,
    topic: &str,
    n: usize,
) -> Vec<KafkaRecord> {
    wait_read(kafka, bridge, topic, n, |t| {
        kafka.client().read_topic_isolated(t, true)
    })
}

/// Each key's records are in commit order (commit_lsn, seq) within its partition.
fn assert_commit_order(records: &[KafkaRecord]) {
    let mut last: HashMap<(i32, Vec<u8>), (Lsn, u64)> = HashMap::new();
    for r in records
        .iter()
        .filter(|r| r.value.is_some() && r.key.is_some())
    {
        let (lsn, seq) = position(r);
        let pos = (lsn.parse::<Lsn>().unwrap(), seq);
        let k = (r.partition, r.key.clone().unwrap());
        if let Some(prev) = last.get(&k) {
            assert!(*prev <= pos, "out of commit order: {r:?}");
        }
        last.insert(k, pos);
    }
}

#[test]
fn exactly_once_contract_positions_aborts_and_a_fenced_producer() {
    let _heavy = testkit::heavy();
    let kafka = std::thread::spawn(|| KafkaServer::start_with(TXN_LOG));
    let pg = PgServer::start();
    let kafka = kafka.join().expect("the Kafka broker started");
    setup_app_db(&pg, "CREATE TABLE t1 (id int PRIMARY KEY, v text);", "");
    let dir = TempDir::new("kafka-eos-contract");
    let mut bridge = kafka_bridge(&pg, &kafka, dir.path(), EOS);
    for sql in [
        "INSERT INTO t1 SELECT g, 'v' || g FROM generate_series(1, 50) g",
        "UPDATE t1 SET v = 'u' WHERE id <= 10",
        "DELETE FROM t1 WHERE id > 45",
    ] {
        pg.sql("app", sql);
    }
    // 50 inserts, 10 updates, 5 deletes with their tombstones.
    let first = wait_committed(&kafka, &bridge, "cdc.t1", 70);
    bridge.wait_for_line("holds no position for key", STEP);

    // The positions topic: this cluster's key, the end of the last transaction.
    let (rec, end) = committed_position(&kafka, &pg).expect("a position record");
    assert_eq!(rec.system_identifier, system_identifier(&pg));
    assert_eq!(rec.slot, SLOT);
    let last_commit: Lsn = first
        .iter()
        .filter_map(|r| {
            r.value
                .as_ref()
                .map(|_| position(r).0.parse::<Lsn>().unwrap())
        })
        .max()
        .unwrap();
    assert!(
        end > last_commit,
        "position {end} after commit {last_commit}"
    );
    let topics = kafka.topics();
    assert!(
        topics.contains(&positions_topic("cdc")),
        "positions topic missing: {topics:?}"
    );

    // Another producer with the bridge's transactional id fences it and aborts a
    // transaction of its own: invisible to read_committed, the bridge goes on with a fresh
    // producer, without a restart.
    let tid = format!("pgbridge-{}-{SLOT}", system_identifier(&pg));
    kafka
        .client()
        .abort_a_transaction(&tid, "cdc.t1", ID_HEADER, "aborted-1");
    pg.sql(
        "app",
        "INSERT INTO t1 SELECT g, 'w' || g FROM generate_series(100, 119) g",
    );
    let all = wait_committed(&kafka, &bridge, "cdc.t1", 90);
    bridge.wait_for_line("Kafka transaction aborted; producing", STEP);
    assert!(
        bridge.child.try_wait().unwrap().is_none(),
        "the bridge exited: {}",
        bridge.log()
    );
    assert_eq!(all.len(), 90, "{:#?}", all);
    assert!(all.iter().all(|r| r.header(ID_HEADER) != Some("aborted-1")));
    let uncommitted = kafka.client().read_topic_isolated("cdc.t1", false);
    assert!(
        uncommitted
            .iter()
            .any(|r| r.header(ID_HEADER) == Some("aborted-1")),
        "the aborted record is stored (only hidden)"
    );
    assert_eq!(count_duplicates("cdc.t1", &all, &[]), 0);
    assert_commit_order(&all);
    let (_, end2) = committed_position(&kafka, &pg).unwrap();
    assert!(end2 > end);
    wait_caught_up(&pg, SLOT, STEP);
    assert_eq!(bridge.terminate(STEP), Some(0), "{}", bridge.log());
}

#[test]
fn exactly_once_keeps_the_on_oversize_behaviour() {
    let _heavy = testkit::heavy();
    let mut props = TXN_LOG.to_vec();
    props.push(("message.max.bytes", "200000"));
    let kafka = std::thread::spawn(move || KafkaServer::start_with(&props));
    let pg = PgServer::start();
    let kafka = kafka.join().expect("the Kafka broker started");
    setup_app_db(
        &pg,
        "CREATE TABLE t1 (id int PRIMARY KEY, v text);
         CREATE TABLE big (id int PRIMARY KEY, body text);
         ALTER TABLE big ALTER COLUMN body SET STORAGE EXTERNAL;",
        "",
    );
    let big = |id: u32| format!("INSERT INTO big VALUES ({id}, repeat(md5('x'), 10000))");
    let dir = TempDir::new("kafka-eos-oversize");
    // --on-oversize dlq: the too large change is a dead letter in its transaction, the
    // changes around it flow.
    let mut bridge = kafka_bridge(
        &pg,
        &kafka,
        dir.path(),
        &["--kafka-exactly-once", "--on-oversize", "dlq"],
    );
    pg.sql("app", "INSERT INTO t1 VALUES (1, 'a')");
    pg.sql("app", &big(1));
    pg.sql("app", "INSERT INTO t1 VALUES (2, 'b')");
    let t1 = wait_committed(&kafka, &bridge, "cdc.t1", 2);
    assert_eq!(t1.len(), 2);
    let dlq = wait_committed(&kafka, &bridge, "dlq", 1);
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    assert_eq!(
        dlq[0].header("pgbridge-error"),
        Some("too_large"),
        "{dlq:?}"
    );
    wait_caught_up(&pg, SLOT, STEP);
    assert_eq!(bridge.terminate(STEP), Some(0), "{}", bridge.log());

    // --on-oversize stop (the default): a clear stop, nothing confirmed past it.
    let mut bridge = kafka_bridge(&pg, &kafka, dir.path(), EOS);
    let before = wait_caught_up(&pg, SLOT, STEP);
    pg.sql("app", &big(2));
    let end: Lsn = pg.sql("postgres", "SELECT pg_current_wal_lsn()::text").rows[0][0]
        .as_deref()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(bridge.wait_exit(STEP), Some(1), "{}", bridge.log());
    let log = bridge.log();
    assert!(
        log.contains("public.big") && log.contains("larger than Kafka accepts"),
        "{log}"
    );
    let confirmed = confirmed_flush(&pg, SLOT).unwrap();
    assert!(
        confirmed >= before && confirmed < end,
        "{confirmed} {before} {end}"
    );
    assert_eq!(kafka.client().read_topic_isolated("dlq", true).len(), 1);
}

/// After a kill: the positions topic's committed LSN when it is past both what PostgreSQL
/// confirmed and the state file (a kill after the Kafka commit and before the confirmation).
fn in_commit_window(pg: &PgServer, kafka: &KafkaServer, state: &std::path::Path) -> Option<Lsn> {
    let (_, kafka_end) = committed_position(kafka, pg)?;
    let confirmed = confirmed_flush(pg, SLOT).unwrap_or(Lsn::INVALID);
    let stored = state_file_lsn(state).unwrap_or(Lsn::INVALID);
    eprintln!("after the kill: Kafka {kafka_end}, confirmed {confirmed}, state file {stored}");
    (kafka_end > confirmed && kafka_end > stored).then_some(kafka_end)
}

/// Freezes the bridge at moments a little apart until one is inside the commit window (see
/// [`in_commit_window`]), at most [`FREEZES`] times; the bridge stays frozen when it is.
fn freeze_in_commit_window(
    bridge: &BridgeProcess,
    pg: &PgServer,
    kafka: &KafkaServer,
    state: &std::path::Path,
    round: u64,
) -> Option<Lsn> {
    const FREEZES: u64 = 40;
    for attempt in 0..FREEZES {
        bridge.child.signal(libc::SIGSTOP);
        if let Some(lsn) = in_commit_window(pg, kafka, state) {
            return Some(lsn);
        }
        bridge.child.signal(libc::SIGCONT);
        std::thread::sleep(std::time::Duration::from_millis(
            5 + (attempt * 17 + round * 7) % 60,
        ));
    }
    None
}

#[test]
fn kill_9_under_load_delivers_each_change_exactly_once() {
    /// At least this many kills; more (up to the limit) until one fell into the window
    /// between a Kafka commit and PostgreSQL's confirmation.
    const KILLS: u64 = 5;
    const KILL_LIMIT: u64 = 15;
    let _heavy = testkit::heavy();
    let started = Instant::now();
    let (pg, kafka) = eos_env();
    let dir = TempDir::new("kafka-eos-kill");
    let state = dir.path().join("bridge.lsn");
    let mut bridge = kafka_bridge(&pg, &kafka, dir.path(), EOS);
    pg.sql("app", &seed_sql());
    let writer = Writer::start(&pg, 0x656f73, 100_000, 1_500);
    let mut windows = 0;
    let mut round = 0;
    while round < KILLS || (windows == 0 && round < KILL_LIMIT) {
        round += 1;
        writer.wait_changes(round * 1_200);
        // Killed while it delivers: once PostgreSQL confirmed a commit of this run, a moment
        // later, while the writer goes on.
        bridge.wait_for_line("exactly once: skipped", STEP);
        let before = confirmed_flush(&pg, SLOT);
        let deadline = Instant::now() + STEP;
        while confirmed_flush(&pg, SLOT) <= before {
            assert!(Instant::now() < deadline, "no progress:\n{}", bridge.log());
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        std::thread::sleep(std::time::Duration::from_millis(100 + 150 * (round % 5)));
        // Every other kill aims at the window: the bridge is frozen (SIGSTOP) and killed only
        // when, frozen, it is inside; else it goes on a moment. The others fall where they fall.
        let window = if round % 2 == 0 {
            freeze_in_commit_window(&bridge, &pg, &kafka, &state, round)
        } else {
            None
        };
        kill_9(&mut bridge);
        let window = window.or_else(|| in_commit_window(&pg, &kafka, &state));
        bridge = kafka_bridge(&pg, &kafka, dir.path(), EOS);
        if let Some(lsn) = window {
            // The restarted bridge skips what Kafka has and PostgreSQL had not confirmed.
            let line = bridge.wait_for_line("exactly once: skipped", STEP);
            let n: u64 = line
                .split("skipped ")
                .nth(1)
                .and_then(|t| t.split(' ').next())
                .and_then(|t| t.parse().ok())
                .unwrap_or_else(|| panic!("{line}"));
            assert!(
                n > 0,
                "kill {round} in the commit window ({lsn}) but: {line}"
            );
            windows += 1;
        }
    }
    assert!(
        windows > 0,
        "no kill of {round} fell between a Kafka commit and PostgreSQL's confirmation; last bridge log:\n{}",
        bridge.log()
    );
    let report = writer.finish();
    wait_caught_up(&pg, SLOT, STEP);
    let all = compare_tables_read(&pg, |topic| kafka.client().read_topic_isolated(topic, true));
    let mut stored_uncommitted = 0;
    for (topic, records) in &all {
        // Exactly once: no id twice, whatever the kills.
        assert_eq!(count_duplicates(topic, records, &[]), 0, "{topic}");
        assert_commit_order(records);
        stored_uncommitted +=
            kafka.client().read_topic_isolated(topic, false).len() - records.len();
    }
    let total: usize = all.values().map(Vec::len).sum();
    let per_topic: BTreeMap<&String, usize> = all.iter().map(|(t, r)| (t, r.len())).collect();
    eprintln!(
        "kafka exactly once kill -9: {} changes, {total} committed records {per_topic:?}, {stored_uncommitted} records of aborted transactions hidden, {round} kills, {windows} in the commit window, {:?}",
        report.changes,
        started.elapsed()
    );
    assert_eq!(bridge.terminate(STEP), Some(0), "{}", bridge.log());
}

/// PostgreSQL with table `t1` and a broker ready for transactions.
fn t1_env() -> (PgServer, KafkaServer) {
    let kafka = std::thread::spawn(|| KafkaServer::start_with(TXN_LOG));
    let pg = PgServer::start();
    setup_app_db(&pg, "CREATE TABLE t1 (id int PRIMARY KEY, v text);", "");
    (pg, kafka.join().expect("the Kafka broker started"))
}

/// Writes, outside any transaction, a position record of this cluster and slot at `end_lsn`
/// on `timeline`: what a cluster restored from a backup (same system identifier) finds of
/// its former life.
fn forge_position(kafka: &KafkaServer, pg: &PgServer, end_lsn: Lsn, timeline: u32) {
    let rec = PositionRecord {
        system_identifier: system_identifier(pg),
        slot: SLOT.into(),
        timeline,
        end_lsn: end_lsn.to_string(),
        written_ms: 0,
    };
    let key = position_key(&rec.system_identifier, SLOT);
    kafka.client().produce(
        &positions_topic("cdc"),
        0,
        key.as_bytes(),
        Some(&serde_json::to_vec(&rec).unwrap()),
    );
    assert_eq!(
        committed_position(kafka, pg).map(|(r, _)| r),
        Some(rec),
        "the forged record is the key's last"
    );
}

/// The server's current WAL position.
fn current_wal(pg: &PgServer) -> Lsn {
    pg.value("postgres", "SELECT pg_current_wal_lsn()::text")
        .parse()
        .unwrap()
}

/// A start that must refuse: exit code 2 and exactly one line naming `needle`, nothing
/// confirmed to PostgreSQL and nothing more in `cdc.t1` (committed or not) than `stored`.
fn assert_refused(
    pg: &PgServer,
    kafka: &KafkaServer,
    dir: &std::path::Path,
    needle: &str,
    stored: usize,
) -> String {
    let confirmed = confirmed_flush(pg, SLOT);
    let mut bridge = kafka_bridge(pg, kafka, dir, EOS);
    assert_eq!(bridge.wait_exit(STEP), Some(2), "{}", bridge.log());
    let log = bridge.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(needle)).collect();
    assert_eq!(lines.len(), 1, "one line with {needle:?}:\n{log}");
    assert_eq!(
        confirmed_flush(pg, SLOT),
        confirmed,
        "nothing confirmed:\n{log}"
    );
    assert_eq!(
        kafka.client().read_topic_isolated("cdc.t1", false).len(),
        stored,
        "nothing produced:\n{log}"
    );
    eprintln!("refused: {}", lines[0]);
    lines[0].to_string()
}

#[test]
fn exactly_once_refuses_a_position_beyond_the_servers_wal() {
    let _heavy = testkit::heavy();
    let (pg, kafka) = t1_env();
    let dir = TempDir::new("kafka-eos-ahead");
    let mut bridge = kafka_bridge(&pg, &kafka, dir.path(), EOS);
    pg.sql("app", "INSERT INTO t1 VALUES (1, 'a')");
    wait_committed(&kafka, &bridge, "cdc.t1", 1);
    wait_caught_up(&pg, SLOT, STEP);
    assert_eq!(bridge.terminate(STEP), Some(0), "{}", bridge.log());

    // The cluster's former life got much further than its WAL reaches now.
    let far = Lsn(0xFF_0000_0000);
    assert!(far > current_wal(&pg));
    forge_position(&kafka, &pg, far, 1);
    pg.sql(
        "app",
        "INSERT INTO t1 SELECT g, 'b' FROM generate_series(2, 6) g",
    );
    let line = assert_refused(
        &pg,
        &kafka,
        dir.path(),
        "holds position FF/0 (timeline 1)",
        1,
    );
    assert!(
        line.contains("ahead of the server's WAL position") && line.contains("tombstone"),
        "{line}"
    );

    // The way out the line names: a tombstone for the key. Nothing is skipped then.
    let key = position_key(&system_identifier(&pg), SLOT);
    kafka
        .client()
        .produce(&positions_topic("cdc"), 0, key.as_bytes(), None);
    let mut bridge = kafka_bridge(&pg, &kafka, dir.path(), EOS);
    let all = wait_committed(&kafka, &bridge, "cdc.t1", 6);
    bridge.wait_for_line("holds no position for key", STEP);
    assert_eq!(all.len(), 6, "{all:#?}");
    assert_eq!(count_duplicates("cdc.t1", &all, &[]), 0);
    wait_caught_up(&pg, SLOT, STEP);
    assert_eq!(bridge.terminate(STEP), Some(0), "{}", bridge.log());
}

#[test]
fn exactly_once_checks_the_positions_timeline_against_the_servers_history() {
    let _heavy = testkit::heavy();
    let (mut pg, kafka) = t1_env();
    let dir = TempDir::new("kafka-eos-timeline");
    let mut bridge = kafka_bridge(&pg, &kafka, dir.path(), EOS);
    pg.sql("app", "INSERT INTO t1 VALUES (1, 'a')");
    wait_committed(&kafka, &bridge, "cdc.t1", 1);
    wait_caught_up(&pg, SLOT, STEP);
    assert_eq!(bridge.terminate(STEP), Some(0), "{}", bridge.log());
    let (rec, end1) = committed_position(&kafka, &pg).unwrap();
    assert_eq!(rec.timeline, 1);

    // A promotion after the recorded position: the record is on the server's history.
    pg.new_timeline();
    pg.sql("app", "INSERT INTO t1 VALUES (2, 'b')");
    let mut bridge = kafka_bridge(&pg, &kafka, dir.path(), EOS);
    wait_committed(&kafka, &bridge, "cdc.t1", 2);
    let line = bridge.wait_for_line(&format!("holds {end1} (timeline 1, server at"), STEP);
    assert!(line.contains("on timeline 2)"), "{line}");
    // Another one while it streams: records name the timeline their position was written
    // on, so the next start finds its record on the server's history.
    pg.new_timeline();
    bridge.wait_for_line("streaming goes on on timeline 3", STEP);
    pg.sql("app", "INSERT INTO t1 VALUES (3, 'c')");
    wait_committed(&kafka, &bridge, "cdc.t1", 3);
    wait_caught_up(&pg, SLOT, STEP);
    assert_eq!(bridge.terminate(STEP), Some(0), "{}", bridge.log());
    let (rec, end3) = committed_position(&kafka, &pg).unwrap();
    assert_eq!(rec.timeline, 3);
    pg.sql("app", "INSERT INTO t1 VALUES (4, 'd')");
    let mut bridge = kafka_bridge(&pg, &kafka, dir.path(), EOS);
    let all = wait_committed(&kafka, &bridge, "cdc.t1", 4);
    bridge.wait_for_line(&format!("holds {end3} (timeline 3, server at"), STEP);
    wait_caught_up(&pg, SLOT, STEP);
    assert_eq!(bridge.terminate(STEP), Some(0), "{}", bridge.log());
    assert_eq!(all.len(), 4, "{all:#?}");
    assert_eq!(count_duplicates("cdc.t1", &all, &[]), 0);

    // A record on timeline 1 past the point where the server left it (below the server's
    // WAL position: only the history tells it apart).
    forge_position(&kafka, &pg, current_wal(&pg), 1);
    pg.sql("app", "INSERT INTO t1 VALUES (5, 'e')");
    let line = assert_refused(
        &pg,
        &kafka,
        dir.path(),
        "not on the history of the server's timeline 3",
        4,
    );
    assert!(line.contains("that timeline ended at"), "{line}");
}
