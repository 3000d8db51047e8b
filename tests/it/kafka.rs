//! The Kafka sink against a real broker (Apache Kafka 4, KRaft, one node): the record
//! contract (topics, keys, values, headers, tombstones, key changes, truncates), a change
//! larger than the broker accepts, at-least-once across kill -9 under load, and a broker
//! outage under load without a bridge restart.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use pgbridge::wire::kafka::{ID_HEADER, OP_HEADER};
use testkit::kafka::KafkaServer;
use testkit::oracle::kafka::kafka_rows;
use testkit::oracle::{grant_sales, kill_9, pg_rows, seed_sql, tables, Writer, SCHEMA, SLOT};
use testkit::{
    bridge_command, confirmed_flush, setup_app_db, split_msg_id, wait_caught_up, BridgeProcess,
    KafkaClient, KafkaRecord, PgServer, TempDir,
};

pub(super) const STEP: Duration = Duration::from_secs(120);

/// A bridge delivering to `kafka` in JSON, with its state in `dir`.
pub(super) fn kafka_bridge(
    pg: &PgServer,
    kafka: &KafkaServer,
    dir: &Path,
    extra: &[&str],
) -> BridgeProcess {
    let bridge = BridgeProcess::spawn(
        bridge_command(pg, "nats://127.0.0.1:9", dir)
            .args(["--sink", "kafka", "--kafka-brokers", &kafka.brokers()])
            .args(["--format", "json"])
            .args(extra),
    );
    bridge.wait_for_line("streaming started", STEP);
    bridge
}

/// The topic's records once it holds at least `n`; on timeout the panic shows the bridge's
/// log and what the topic holds.
pub(super) fn wait_records(
    kafka: &KafkaServer,
    bridge: &BridgeProcess,
    topic: &str,
    n: usize,
) -> Vec<KafkaRecord> {
    wait_read(kafka, bridge, topic, n, |t| kafka.read_topic(t))
}

/// [`wait_records`] with the topic read by `read` (e.g. `read_committed`).
pub(super) fn wait_read(
    kafka: &KafkaServer,
    bridge: &BridgeProcess,
    topic: &str,
    n: usize,
    read: impl Fn(&str) -> Vec<KafkaRecord>,
) -> Vec<KafkaRecord> {
    let deadline = Instant::now() + STEP;
    loop {
        let records = if kafka.topics().iter().any(|t| t == topic) {
            read(topic)
        } else {
            Vec::new()
        };
        if records.len() >= n {
            return records;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {n} records in {topic} (topics {:?}): {records:#?}\nbridge log:\n{}",
            kafka.topics(),
            bridge.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The bridge's HTTP port, from its log.
pub(super) fn http_port(bridge: &BridgeProcess) -> u16 {
    let line = bridge.wait_for_line("HTTP endpoints on http://127.0.0.1:", STEP);
    let rest = line.split("http://127.0.0.1:").nth(1).unwrap();
    rest.split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// GET `path`: the status and the body, `None` when nothing answers.
pub(super) fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split(' ').nth(1)?.parse().ok()?;
    let body = out
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Some((status, body))
}

/// Waits (bounded) until `/health` answers `status`.
fn wait_health(port: u16, status: u16) {
    let deadline = Instant::now() + STEP;
    while http_get(port, "/health").map(|a| a.0) != Some(status) {
        assert!(Instant::now() < deadline, "/health never answered {status}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// (commit_lsn, seq) of a record, from its value.
pub(super) fn position(r: &KafkaRecord) -> (String, u64) {
    let v = r.json();
    (
        v["commit_lsn"].as_str().unwrap().to_string(),
        v["seq"].as_u64().unwrap(),
    )
}

#[test]
fn records_follow_the_contract_and_an_oversized_change_stops_the_bridge() {
    let _heavy = testkit::heavy();
    let kafka = std::thread::spawn(|| KafkaServer::start_with(&[("message.max.bytes", "200000")]));
    let pg = PgServer::start();
    let kafka = kafka.join().expect("the Kafka broker started");
    setup_app_db(
        &pg,
        "CREATE TABLE t1 (id int PRIMARY KEY, v text, b bytea, f float8, arr int[]);
         CREATE SCHEMA s; CREATE TABLE s.\"odd.name\" (k text PRIMARY KEY, n int);
         CREATE TABLE big (id int PRIMARY KEY, body text);
         ALTER TABLE big ALTER COLUMN body SET STORAGE EXTERNAL;",
        "",
    );
    pg.sql(
        "app",
        "GRANT USAGE ON SCHEMA s TO bridge_reader; GRANT SELECT ON ALL TABLES IN SCHEMA s TO bridge_reader",
    );
    let dir = TempDir::new("kafka-contract");
    let mut bridge = kafka_bridge(&pg, &kafka, dir.path(), &[]);
    for sql in [
        "INSERT INTO t1 VALUES (1, 'a', '\\x0102', 1.5, '{1,2}'), (2, 'b', NULL, 'NaN', NULL), (3, 'c', '', -0.25, '{}')",
        "UPDATE t1 SET v = 'a2' WHERE id = 1",
        "UPDATE t1 SET id = 20, v = 'moved' WHERE id = 2",
        "DELETE FROM t1 WHERE id = 3",
        "INSERT INTO s.\"odd.name\" VALUES ('x', 1)",
        "TRUNCATE t1",
        "INSERT INTO t1 VALUES (4, 'after truncate', NULL, 0, NULL)",
    ] {
        pg.sql("app", sql);
    }
    // 3 inserts, 1 update, delete + tombstone + insert, delete + tombstone, 3 truncates
    // (one per partition), 1 insert.
    let records = wait_records(&kafka, &bridge, "cdc.t1", 13);
    assert_eq!(records.len(), 13, "{records:#?}");
    let odd = wait_records(&kafka, &bridge, "cdc.s.odd_2Ename", 1);
    assert_eq!(odd[0].key_json().unwrap(), serde_json::json!({"k": "x"}));
    assert_eq!(odd[0].json()["schema"], "s");

    // Every record: a parseable id, an op, a key for the row changes.
    let mut by_id: HashMap<String, Vec<&KafkaRecord>> = HashMap::new();
    for r in &records {
        let id = r.header(ID_HEADER).expect("pgbridge-id");
        let op = r.header(OP_HEADER).expect("pgbridge-op");
        let base = id.trim_end_matches("#d").trim_end_matches("#i");
        split_msg_id(base);
        if op != "truncate" {
            assert!(r.key.is_some(), "{r:?}");
        }
        by_id.entry(id.to_string()).or_default().push(r);
    }
    let ops = |op: &str| -> Vec<&KafkaRecord> {
        records
            .iter()
            .filter(|r| r.header(OP_HEADER) == Some(op))
            .collect()
    };
    // Inserts: the key is the primary key as a JSON document; the value is the event.
    let inserts = ops("insert");
    assert_eq!(inserts.len(), 5, "3 + the key change's insert + 1");
    let first = inserts
        .iter()
        .find(|r| r.key_json().unwrap() == serde_json::json!({"id": 1}))
        .unwrap();
    let v = first.json();
    assert_eq!(v["operation"], "INSERT");
    assert_eq!(v["table"], "t1");
    assert_eq!(v["columns"][2]["value"], "AQI=");
    assert_eq!(v["columns"][4]["value"], serde_json::json!([1, 2]));

    // DELETE, then its tombstone: same key, no value, same id, the next offset.
    let deletes = ops("delete");
    assert_eq!(deletes.len(), 2, "the DELETE and the key change's DELETE");
    for d in &deletes {
        let t = records
            .iter()
            .find(|r| r.partition == d.partition && r.offset == d.offset + 1)
            .expect("a record after the DELETE");
        assert_eq!(t.header(OP_HEADER), Some("tombstone"));
        assert_eq!(t.value, None);
        assert_eq!(t.key, d.key);
        assert_eq!(t.header(ID_HEADER), d.header(ID_HEADER));
    }

    // The key change: DELETE of id 2 and INSERT of id 20 with the UPDATE's positions and the
    // documented id suffixes.
    let moved_del = deletes
        .iter()
        .find(|r| r.header(ID_HEADER).unwrap().ends_with("#d"))
        .expect("the key change's DELETE");
    assert_eq!(moved_del.key_json().unwrap(), serde_json::json!({"id": 2}));
    let base = moved_del.header(ID_HEADER).unwrap().trim_end_matches("#d");
    let moved_ins = by_id[&format!("{base}#i")][0];
    assert_eq!(moved_ins.key_json().unwrap(), serde_json::json!({"id": 20}));
    assert_eq!(moved_ins.json()["operation"], "INSERT");
    assert_eq!(moved_del.json()["operation"], "DELETE");
    assert_eq!(position(moved_del), position(moved_ins));
    let (_, _, lsn, seq) = split_msg_id(base);
    assert_eq!(position(moved_ins), (lsn.to_string(), u64::from(seq)));
    assert!(
        ops("update").len() == 1,
        "only the UPDATE that kept its key"
    );

    // TRUNCATE: one keyless record on every partition, one id.
    let truncates = ops("truncate");
    let mut parts: Vec<i32> = truncates.iter().map(|r| r.partition).collect();
    parts.sort();
    assert_eq!(parts, vec![0, 1, 2]);
    assert!(truncates
        .iter()
        .all(|r| r.key.is_none() && r.header(ID_HEADER) == truncates[0].header(ID_HEADER)));

    // Per key, offsets follow commit order.
    let mut last: BTreeMap<(i32, Vec<u8>), (String, u64)> = BTreeMap::new();
    for r in records
        .iter()
        .filter(|r| r.value.is_some() && r.key.is_some())
    {
        let k = (r.partition, r.key.clone().unwrap());
        let pos = position(r);
        let lsn = |s: &str| s.parse::<pgbridge::pg::Lsn>().unwrap();
        if let Some(prev) = last.get(&k) {
            assert!((lsn(&prev.0), prev.1) <= (lsn(&pos.0), pos.1), "{r:?}");
        }
        last.insert(k, pos);
    }

    // A change larger than the broker accepts: a clear stop naming the table and size, and
    // the WAL is not confirmed past it.
    let before = wait_caught_up(&pg, SLOT, STEP);
    pg.sql("app", "INSERT INTO big VALUES (1, repeat(md5('x'), 10000))");
    let code = bridge.wait_exit(STEP);
    assert_eq!(code, Some(1), "log:\n{}", bridge.log());
    let log = bridge.log();
    assert!(
        log.contains("public.big") && log.contains("larger than Kafka accepts"),
        "{log}"
    );
    let confirmed = confirmed_flush(&pg, SLOT).unwrap();
    let end: pgbridge::pg::Lsn = pg.sql("postgres", "SELECT pg_current_wal_lsn()::text").rows[0][0]
        .as_deref()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        confirmed >= before && confirmed < end,
        "{confirmed} {before} {end}"
    );
    // Nothing before it was lost.
    assert_eq!(kafka.read_topic("cdc.t1").len(), 13);
}

/// Ids stored twice, each (topic, partition, id, op) counted once per extra copy; panics when
/// a duplicate's first copy is not below one of `marks` (end offsets read right after a kill)
/// and its second copy at or above it.
pub(super) fn count_duplicates(
    topic: &str,
    records: &[KafkaRecord],
    marks: &[BTreeMap<String, BTreeMap<i32, i64>>],
) -> usize {
    let mut seen: HashMap<(i32, String, String), i64> = HashMap::new();
    let mut dups = 0;
    for r in records {
        let key = (
            r.partition,
            r.header(ID_HEADER).unwrap_or_default().to_string(),
            r.header(OP_HEADER).unwrap_or_default().to_string(),
        );
        match seen.get(&key) {
            None => {
                seen.insert(key, r.offset);
            }
            Some(first) => {
                dups += 1;
                let straddles = marks.iter().any(|m| {
                    let end = m
                        .get(topic)
                        .and_then(|p| p.get(&r.partition))
                        .copied()
                        .unwrap_or(0);
                    *first < end && r.offset >= end
                });
                assert!(
                    straddles,
                    "{topic}: {key:?} at offsets {first} and {} is a duplicate not explained by a kill",
                    r.offset
                );
                seen.insert(key, r.offset);
            }
        }
    }
    dups
}

/// The oracle's tables, rebuilt from their topics, equal PostgreSQL's; every topic's records.
pub(super) fn compare_tables(
    pg: &PgServer,
    kafka: &KafkaClient,
) -> BTreeMap<String, Vec<KafkaRecord>> {
    compare_tables_read(pg, |topic| kafka.read_topic(topic))
}

/// [`compare_tables`] with the topics read by `read`.
pub(super) fn compare_tables_read(
    pg: &PgServer,
    read: impl Fn(&str) -> Vec<KafkaRecord>,
) -> BTreeMap<String, Vec<KafkaRecord>> {
    let mut all = BTreeMap::new();
    for t in tables() {
        let topic = pgbridge::wire::kafka::topic(
            "cdc",
            t.pg.split_once('.').map_or("public", |(s, _)| s),
            t.pg.split_once('.').map_or(t.pg, |(_, n)| n),
        );
        let records = read(&topic);
        let got = kafka_rows(&records, &t).unwrap_or_else(|e| panic!("{e}"));
        let want = pg_rows(pg, &t);
        assert_eq!(got.len(), want.len(), "{}: row count", t.pg);
        for (k, row) in &want {
            assert_eq!(got.get(k), Some(row), "{}: row {k}", t.pg);
        }
        all.insert(topic, records);
    }
    all
}

/// Starts PostgreSQL with the oracle's tables (no rows yet) and a broker.
fn oracle_env() -> (PgServer, KafkaServer) {
    let kafka = std::thread::spawn(KafkaServer::start);
    let pg = PgServer::start();
    setup_app_db(&pg, SCHEMA, "");
    grant_sales(&pg);
    (pg, kafka.join().expect("the Kafka broker started"))
}

#[test]
fn kill_9_five_times_under_load_loses_nothing() {
    let _heavy = testkit::heavy();
    let started = Instant::now();
    let (pg, kafka) = oracle_env();
    let dir = TempDir::new("kafka-kill");
    let mut bridge = kafka_bridge(&pg, &kafka, dir.path(), &[]);
    // Seeded after the bridge made its slot: every row is in Kafka.
    pg.sql("app", &seed_sql());
    let writer = Writer::start(&pg, 0x6b61666b61, 12_000, 1_500);
    let mut marks = Vec::new();
    for round in 1..=5u64 {
        writer.wait_changes(round * 1_800);
        kill_9(&mut bridge);
        let mark: BTreeMap<String, BTreeMap<i32, i64>> = kafka
            .topics()
            .into_iter()
            .map(|t| {
                let ends = kafka.end_offsets(&t);
                (t, ends)
            })
            .collect();
        marks.push(mark);
        bridge = kafka_bridge(&pg, &kafka, dir.path(), &[]);
    }
    let report = writer.finish();
    wait_caught_up(&pg, SLOT, STEP);
    let all = compare_tables(&pg, &kafka.client());
    let dups: usize = all
        .iter()
        .map(|(topic, records)| count_duplicates(topic, records, &marks))
        .sum();
    let total: usize = all.values().map(Vec::len).sum();
    eprintln!(
        "kafka kill -9: {} changes, {total} records, {dups} duplicates after 5 kills, {:?}",
        report.changes,
        started.elapsed()
    );
    assert_eq!(bridge.terminate(STEP), Some(0), "{}", bridge.log());
}

#[test]
fn a_broker_outage_under_load_needs_no_restart() {
    let _heavy = testkit::heavy();
    let started = Instant::now();
    let (pg, mut kafka) = oracle_env();
    let dir = TempDir::new("kafka-outage");
    // Records time out during the outage: the bridge's own resend with a fresh producer runs,
    // not only librdkafka's retries.
    let mut bridge = kafka_bridge(
        &pg,
        &kafka,
        dir.path(),
        &["--kafka-property", "message.timeout.ms=4000"],
    );
    pg.sql("app", &seed_sql());
    let writer = Writer::start(&pg, 0x6f75746167, 9_000, 1_000);
    writer.wait_changes(2_000);
    let port = http_port(&bridge);
    wait_health(port, 200);
    // The start line says which sink runs, without NATS settings it does not use.
    let start = bridge.wait_for_line("starting: postgres=", STEP);
    assert!(start.contains(" sink=kafka kafka_brokers="), "{start}");
    assert!(
        !start.contains(" streams=") && !start.contains(" nats="),
        "{start}"
    );
    // Every table's topic holds records: a bridge still creating a topic when the broker
    // stops waits in that creation and has no record in flight to time out.
    let deadline = Instant::now() + STEP;
    for topic in [
        "cdc.accounts",
        "cdc.events",
        "cdc.items",
        "cdc.sales.invoices",
    ] {
        while !kafka.topics().iter().any(|t| t == topic)
            || kafka.end_offsets(topic).values().sum::<i64>() == 0
        {
            assert!(Instant::now() < deadline, "no records in topic {topic}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    kafka.stop();
    let stopped = Instant::now();
    bridge.wait_for_line("no Kafka broker reachable", STEP);
    // The broker connection shows in /health.
    wait_health(port, 503);
    let (_, body) = http_get(port, "/health").unwrap();
    assert!(
        body.contains("Kafka unavailable") || body.contains("Kafka is not confirming"),
        "{body}"
    );
    // /status names the sink and its connection, and shows no NATS field.
    let status = || -> serde_json::Value {
        serde_json::from_str(&http_get(port, "/status").expect("/status").1).unwrap()
    };
    let down_status = status();
    assert_eq!(down_status["sink"], "kafka", "{down_status}");
    assert_eq!(down_status["sink_connected"], false, "{down_status}");
    assert!(
        down_status.get("nats_reconnect_count").is_none(),
        "{down_status}"
    );
    std::thread::sleep(Duration::from_secs(10).saturating_sub(stopped.elapsed()));
    let held = confirmed_flush(&pg, SLOT);
    let down = stopped.elapsed();
    kafka.start_again();
    let report = writer.finish();
    wait_caught_up(&pg, SLOT, STEP);
    assert!(confirmed_flush(&pg, SLOT) > held);
    assert!(
        bridge.child.try_wait().unwrap().is_none(),
        "the bridge exited"
    );
    bridge.wait_for_line("Kafka brokers reachable again", STEP);
    bridge.wait_for_line("with a new producer", STEP);
    wait_health(port, 200);
    let (_, metrics) = http_get(port, "/metrics").expect("/metrics");
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics"))
    };
    assert!(value("bridge_kafka_delivery_reports_total") > 0.0);
    assert!(
        value("bridge_publish_errors_total") > 0.0,
        "the timed-out records"
    );
    assert_eq!(value("bridge_sink_connected"), 1.0);
    assert!(value("bridge_sink_reconnects_total") >= 1.0);
    let up_status = status();
    assert_eq!(up_status["sink_connected"], true, "{up_status}");
    assert!(
        up_status["sink_reconnect_count"].as_u64() >= Some(1),
        "{up_status}"
    );
    compare_tables(&pg, &kafka.client());
    eprintln!(
        "kafka outage: {} changes, broker down {down:?}, test {:?}",
        report.changes,
        started.elapsed()
    );
    assert_eq!(bridge.terminate(STEP), Some(0), "{}", bridge.log());
}

/// Runs `bridge` with exactly `env` as its environment.
fn bridge_cli(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_bridge"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("run the bridge binary")
}

#[test]
fn kafka_settings_are_checked_merged_and_redacted() {
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    // Kafka without brokers, and Kafka settings with the NATS sink: exit 2, one clear line.
    let out = bridge_cli(&["check-config", "--sink", "kafka"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("kafka.brokers (--kafka-brokers / KAFKA_BROKERS)"),
        "{}",
        text(&out)
    );
    let out = bridge_cli(&["check-config"], &[("KAFKA_BROKERS", "k:9092")]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("add --sink kafka"), "{}", text(&out));
    let out = bridge_cli(
        &[
            "check-config",
            "--sink",
            "kafka",
            "--kafka-brokers",
            "k:1",
            "--kafka-property",
            "acks=1",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));

    // File, environment and flags: properties add up key by key; secrets never show.
    let dir = TempDir::new("kafka-cli");
    let file = dir.path().join("bridge.toml");
    std::fs::write(
        &file,
        "[kafka]\nbrokers = [\"file:1\"]\ntombstones = false\n\
         [kafka.properties]\n\"ssl.key.password\" = \"filesecret\"\n\"client.id\" = \"fromfile\"\n\"linger.ms\" = 5\n\
         [kafka.topic_config]\n\"min.insync.replicas\" = 2\n\"retention.ms\" = \"1000\"\n",
    )
    .unwrap();
    let out = bridge_cli(
        &[
            "check-config",
            "--config",
            file.to_str().unwrap(),
            "--sink",
            "kafka",
            "--kafka-brokers",
            "a:1,b:2",
            "--kafka-property",
            "sasl.password=hunter2",
            "--kafka-property",
            "client.id=fromflag",
            "--topic-prefix",
            "pg.app",
            "--kafka-topic-config",
            "retention.ms=5",
        ],
        &[(
            "KAFKA_PROPERTIES",
            "sasl.username=alice;security.protocol=SASL_SSL",
        )],
    );
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(
        !all.contains("hunter2") && !all.contains("filesecret"),
        "{all}"
    );
    let t: toml::Table = String::from_utf8_lossy(&out.stdout).parse().expect("TOML");
    let k = &t["kafka"];
    assert_eq!(k["brokers"].as_array().unwrap().len(), 2);
    assert_eq!(k["topic_prefix"].as_str(), Some("pg.app"));
    assert_eq!(k["tombstones"].as_bool(), Some(false));
    assert_eq!(t["replication"]["sink"].as_str(), Some("kafka"));
    let p = &k["properties"];
    assert_eq!(p["client.id"].as_str(), Some("fromflag"));
    assert_eq!(p["linger.ms"].as_str(), Some("5"));
    // Flags beat their environment variable as a whole (clap reads one or the other).
    assert!(p.get("sasl.username").is_none(), "{p:?}");
    assert_eq!(p["sasl.password"].as_str(), Some("***"));
    assert_eq!(p["ssl.key.password"].as_str(), Some("***"));
    // Topic settings add up key by key too.
    let tc = &k["topic_config"];
    assert_eq!(tc["min.insync.replicas"].as_str(), Some("2"));
    assert_eq!(tc["retention.ms"].as_str(), Some("5"));

    // Without the flag, the environment's properties add to the file's.
    let out = bridge_cli(
        &[
            "check-config",
            "--config",
            file.to_str().unwrap(),
            "--sink",
            "kafka",
        ],
        &[(
            "KAFKA_PROPERTIES",
            "sasl.username=alice;security.protocol=SASL_SSL",
        )],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let t: toml::Table = String::from_utf8_lossy(&out.stdout).parse().expect("TOML");
    let p = &t["kafka"]["properties"];
    assert_eq!(p["sasl.username"].as_str(), Some("alice"));
    assert_eq!(p["security.protocol"].as_str(), Some("SASL_SSL"));
    assert_eq!(p["client.id"].as_str(), Some("fromfile"));
    assert_eq!(p["ssl.key.password"].as_str(), Some("***"));

    let help = text(&bridge_cli(
        &["--help"],
        &[("KAFKA_PROPERTIES", "sasl.password=hunter2")],
    ));
    assert!(
        !help.contains("hunter2"),
        "--help shows KAFKA_PROPERTIES' value"
    );
    for flag in [
        "--sink",
        "--kafka-brokers",
        "--topic-prefix",
        "--kafka-property",
        "--kafka-tombstones",
        "--kafka-partitions",
        "--kafka-replication-factor",
        "--kafka-topic-config",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}
