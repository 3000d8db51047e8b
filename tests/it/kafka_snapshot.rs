//! Snapshots into Kafka init topics (`--sink kafka`): a snapshot taken while a writer runs,
//! followed by the CDC topic from the meta's offsets (the documented bootstrap), equals the
//! source table row for row; `--snapshot-on-start` fills in only the tables whose init topic
//! holds no meta; `POST /snapshots/{table}` needs the admin token and names known tables.

use std::time::{Duration, Instant};

use pgbridge::wire::kafka::{init_topic, OP_HEADER, SNAPSHOT_META_OP};
use testkit::kafka::KafkaServer;
use testkit::oracle::kafka::bootstrap_rows;
use testkit::oracle::{grant_sales, pg_rows, seed_sql, tables, Table, Writer, SCHEMA, SLOT};
use testkit::{setup_app_db, wait_caught_up, BridgeProcess, PgServer, TempDir};

use super::kafka::{http_get, http_port, kafka_bridge, STEP};

const TOKEN: &str = "s3cret";

/// PostgreSQL with the oracle's tables, seeded before any bridge made its slot (so the rows
/// reach Kafka only through snapshots), and a broker.
fn seeded_env() -> (PgServer, KafkaServer) {
    let kafka = std::thread::spawn(KafkaServer::start);
    let pg = PgServer::start();
    setup_app_db(&pg, SCHEMA, "");
    grant_sales(&pg);
    pg.sql("app", &seed_sql());
    (pg, kafka.join().expect("the Kafka broker started"))
}

/// POST `path`: the status and the body.
fn http_post(port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    let (status, _, body) = super::snapshot_requests::http_post(port, path, token);
    (status, body)
}

/// The value of metric `name` on `/metrics`.
fn metric(port: u16, name: &str) -> f64 {
    let (status, out) = http_get(port, "/metrics").expect("the HTTP port answers");
    assert_eq!(status, 200, "{out}");
    out.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{out}"))
}

/// (schema, table) of an oracle table.
fn names(t: &Table) -> (&str, &str) {
    t.pg.split_once('.').unwrap_or(("public", t.pg))
}

/// The request path of an oracle table.
fn path(t: &Table) -> String {
    format!("/snapshots/{}", t.pg)
}

/// Meta records in the table's init topic.
fn metas(kafka: &KafkaServer, t: &Table) -> usize {
    let (schema, table) = names(t);
    let topic = init_topic("cdc", schema, table);
    if !kafka.topics().contains(&topic) {
        return 0;
    }
    kafka
        .read_topic(&topic)
        .iter()
        .filter(|r| r.header(OP_HEADER) == Some(SNAPSHOT_META_OP))
        .count()
}

/// Waits (bounded) until the table's init topic holds `n` meta records.
fn wait_metas(kafka: &KafkaServer, bridge: &BridgeProcess, t: &Table, n: usize) {
    let deadline = Instant::now() + STEP;
    while metas(kafka, t) < n {
        assert!(
            Instant::now() < deadline,
            "no meta record for {} in time; bridge log:\n{}",
            t.pg,
            bridge.log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Every oracle table, bootstrapped from Kafka by the documented rule, equals PostgreSQL's.
fn assert_bootstrap_equals_source(pg: &PgServer, kafka: &KafkaServer) -> Vec<(usize, usize)> {
    let mut counts = Vec::new();
    for t in tables() {
        let (got, b) = bootstrap_rows(kafka, "cdc", &t).unwrap_or_else(|e| panic!("{e}"));
        let want = pg_rows(pg, &t);
        assert_eq!(got.len(), want.len(), "{}: row count ({b:?})", t.pg);
        for (k, row) in &want {
            assert_eq!(got.get(k), Some(row), "{}: row {k}", t.pg);
        }
        counts.push((b.snapshot_rows, b.applied));
    }
    counts
}

#[test]
fn kafka_snapshot_plus_topic_rebuilds_every_table_exactly_under_concurrent_writes() {
    let _heavy = testkit::heavy();
    let (pg, kafka) = seeded_env();
    let dir = TempDir::new("kafka-snap");
    let bridge = kafka_bridge(
        &pg,
        &kafka,
        dir.path(),
        &[
            "--admin-token",
            TOKEN,
            "--kafka-partitions",
            "3",
            "--snapshot-chunk-rows",
            "200",
            "--snapshot-max-concurrent",
            "4",
        ],
    );
    let port = http_port(&bridge);
    bridge.wait_for_line("served on POST /snapshots/{table}", STEP);

    // Refused before anything is written: no token, a wrong one, an unknown table.
    let (status, body) = http_post(port, "/snapshots/accounts", None);
    assert_eq!(status, 401, "{body}");
    let (status, body) = http_post(port, "/snapshots/accounts", Some("wrong"));
    assert_eq!(status, 401, "{body}");
    let (status, body) = http_post(port, "/snapshots/nosuch", Some(TOKEN));
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("unknown table public.nosuch"), "{body}");
    assert!(
        !kafka.topics().iter().any(|t| t.contains(".pgbridge.init.")),
        "{:?}",
        kafka.topics()
    );

    // A writer changes every table before, during and after the snapshots.
    let writer = Writer::start(&pg, 0x736e6170, 9_000, 1_500);
    writer.wait_changes(1_500);
    for t in tables() {
        let (status, body) = http_post(port, &path(&t), Some(TOKEN));
        assert_eq!(status, 202, "{}: {body}", t.pg);
    }
    // A second request for a table: refused, while it runs with the init topic whose meta
    // record to wait for (or, if it finished already, by the cooldown).
    let first = &tables()[0];
    let (status, body) = http_post(port, &path(first), Some(TOKEN));
    let (schema, table) = names(first);
    let topic = init_topic("cdc", schema, table);
    eprintln!("kafka snapshot: a repeated request answered {status}: {body}");
    match status {
        409 => assert!(
            body.contains(&format!("wait for its meta record on Kafka topic {topic}"))
                && !body.contains("init.meta"),
            "{body}"
        ),
        429 => assert!(body.contains("cooldown"), "{body}"),
        other => panic!("a repeated snapshot request answered {other}: {body}"),
    }
    for t in tables() {
        wait_metas(&kafka, &bridge, &t, 1);
    }
    let report = writer.finish();
    wait_caught_up(&pg, SLOT, STEP);
    // The snapshot metrics count Kafka snapshots: the last one completed.
    assert_eq!(metric(port, "bridge_snapshot_progress_ratio"), 1.0);

    let counts = assert_bootstrap_equals_source(&pg, &kafka);
    let (snapshot_rows, applied): (usize, usize) =
        counts.iter().fold((0, 0), |(a, b), (c, d)| (a + c, b + d));
    eprintln!(
        "kafka snapshot: {} writer changes; {snapshot_rows} snapshot rows, {applied} changes applied after them",
        report.changes
    );
    assert!(applied > 0, "changes after the snapshots were applied");
    drop(bridge);
}

#[test]
fn kafka_snapshot_on_start_fills_in_only_tables_without_a_meta() {
    let _heavy = testkit::heavy();
    let (pg, kafka) = seeded_env();
    let dir = TempDir::new("kafka-snap-start");
    let all = tables();
    let accounts = &all[0];
    // First run: accounts only, on request.
    let mut bridge = kafka_bridge(&pg, &kafka, dir.path(), &["--admin-token", TOKEN]);
    let port = http_port(&bridge);
    bridge.wait_for_line("served on POST /snapshots/{table}", STEP);
    let (status, body) = http_post(port, &path(accounts), Some(TOKEN));
    assert_eq!(status, 202, "{body}");
    wait_metas(&kafka, &bridge, accounts, 1);
    assert_eq!(bridge.terminate(STEP), Some(0), "{}", bridge.log());

    // Second run: the other tables are snapshotted at start, accounts is not.
    bridge = kafka_bridge(&pg, &kafka, dir.path(), &["--snapshot-on-start"]);
    for t in &all[1..] {
        wait_metas(&kafka, &bridge, t, 1);
    }
    bridge.wait_for_line(
        "already holds a snapshot of public.accounts (its last meta record); none taken",
        STEP,
    );
    assert_eq!(metas(&kafka, accounts), 1);
    pg.sql(
        "app",
        "UPDATE accounts SET name = 'after' WHERE id <= 10; DELETE FROM items WHERE order_id <= 5",
    );
    wait_caught_up(&pg, SLOT, STEP);
    assert_bootstrap_equals_source(&pg, &kafka);
    assert_eq!(bridge.terminate(STEP), Some(0), "{}", bridge.log());

    // Third run: every table has its snapshot; none is taken again.
    bridge = kafka_bridge(&pg, &kafka, dir.path(), &["--snapshot-on-start"]);
    for t in &all {
        let (schema, table) = names(t);
        bridge.wait_for_line(
            &format!("already holds a snapshot of {schema}.{table}"),
            STEP,
        );
        assert_eq!(metas(&kafka, t), 1, "{}", t.pg);
    }
    assert_eq!(bridge.terminate(STEP), Some(0), "{}", bridge.log());
}
