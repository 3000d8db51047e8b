//! The Kafka sink against a three-node Kafka cluster (KRaft, three JVMs): the leader of a
//! partition of a table's topic is killed with SIGKILL under load and started again later;
//! the bridge keeps delivering without a restart, every committed change reaches Kafka, each
//! key's records stay in commit order, and an id stored twice is only a copy of a record
//! already stored. Also: the bridge creates its topics with the replication factor and
//! `min.insync.replicas` it is given, and warns about a topic that keeps
//! `min.insync.replicas=1` on the cluster.

use std::collections::HashMap;
use std::time::Instant;

use pgbridge::pg::Lsn;
use pgbridge::wire::kafka::{ID_HEADER, OP_HEADER};
use testkit::oracle::{grant_sales, seed_sql, Writer, SCHEMA, SLOT};
use testkit::{
    bridge_command, confirmed_flush, setup_app_db, wait_caught_up, wait_for, BridgeProcess,
    KafkaCluster, KafkaRecord, PgServer, TempDir,
};

use super::kafka::{compare_tables, STEP};

/// The table whose partition leader is killed.
const TOPIC: &str = "cdc.accounts";
/// A topic made before the bridge starts, with the broker's default `min.insync.replicas`
/// (1): the bridge must warn about it.
const WEAK_TOPIC: &str = "cdc.events";
/// Row changes the writer makes, at most this many per second.
const CHANGES: u64 = 15_000;
const RATE: u64 = 1_000;
/// The leader is killed after this many changes, and started again after this many.
const KILL_AT: u64 = 4_000;
const RESTART_AT: u64 = 10_000;

#[test]
fn a_partition_leader_killed_under_load_loses_nothing() {
    let _heavy = testkit::heavy();
    let started = Instant::now();
    let cluster = std::thread::spawn(KafkaCluster::start);
    let pg = PgServer::start();
    setup_app_db(&pg, SCHEMA, "");
    grant_sales(&pg);
    let mut cluster = cluster.join().expect("the Kafka cluster started");
    eprintln!("kafka cluster: 3 nodes up in {:?}", cluster.started_in());
    cluster.create_topic(WEAK_TOPIC, 3, &[]);

    let dir = TempDir::new("kafka-cluster");
    let mut bridge = BridgeProcess::spawn(
        bridge_command(&pg, "nats://127.0.0.1:9", dir.path())
            .args(["--sink", "kafka", "--kafka-brokers", &cluster.brokers()])
            .args(["--format", "json"])
            .args(["--kafka-partitions", "3", "--kafka-replication-factor", "3"])
            .args(["--kafka-topic-config", "min.insync.replicas=2"]),
    );
    bridge.wait_for_line("streaming started", STEP);
    pg.sql("app", &seed_sql());
    let writer = Writer::start(&pg, 0x6c6561646572, CHANGES, RATE);

    // The bridge's topics: replication 3 and min.insync.replicas 2 as it was told; the warning
    // names the topic made with 1, and only that one.
    let partitions = wait_for("the bridge to create its topics", STEP, || {
        let p = cluster.partitions(TOPIC);
        (p.len() == 3
            && p.values()
                .all(|(leader, isr)| *leader > 0 && isr.len() == 3))
        .then_some(p)
    });
    assert_eq!(
        cluster
            .topic_setting(TOPIC, "min.insync.replicas")
            .as_deref(),
        Some("2")
    );
    let warning = format!("Kafka topic {WEAK_TOPIC} has min.insync.replicas=1 on a cluster of 3");
    bridge.wait_for_line(&warning, STEP);
    assert!(
        !bridge
            .log()
            .contains(&format!("Kafka topic {TOPIC} has min.insync.replicas")),
        "{}",
        bridge.log()
    );

    // Kill the leader of partition 0 of TOPIC mid-load.
    writer.wait_changes(KILL_AT);
    let victim = cluster
        .index_of(partitions[&0].0)
        .expect("partition 0 has a leader");
    let wal_at_kill: Lsn = pg.sql("postgres", "SELECT pg_current_wal_lsn()::text").rows[0][0]
        .as_deref()
        .unwrap()
        .parse()
        .unwrap();
    let changes_at_kill = writer.changes();
    cluster.kill(victim);
    let killed = Instant::now();
    let new_leader = wait_for("a new leader of partition 0", STEP, || {
        cluster.leader_of(TOPIC, 0).filter(|&l| l != victim)
    });
    let elected = killed.elapsed();
    // Deliveries to the partition resume: its end offset moves past where the new leader
    // started.
    let start_end = cluster.client().end_offsets(TOPIC)[&0];
    wait_for("records on partition 0 under its new leader", STEP, || {
        (cluster.client().end_offsets(TOPIC)[&0] > start_end).then_some(())
    });
    let resumed = killed.elapsed();
    // Recovered: every change committed before the kill is confirmed (so stored with
    // acks=all on the two nodes left).
    wait_for("the WAL at the kill to be confirmed", STEP, || {
        confirmed_flush(&pg, SLOT)
            .filter(|&c| c >= wal_at_kill)
            .map(|_| ())
    });
    let recovered = killed.elapsed();
    let changes_at_recovery = writer.changes();

    // The node comes back while the writer makes its last changes.
    writer.wait_changes(RESTART_AT);
    cluster.spawn_again(victim);
    let report = writer.finish();
    cluster.wait_node_ready(victim);
    wait_caught_up(&pg, SLOT, STEP);
    assert!(
        bridge.child.try_wait().unwrap().is_none(),
        "the bridge exited:\n{}",
        bridge.log()
    );
    // The restarted node catches up and is in sync again.
    wait_for("the restarted node back in sync", STEP, || {
        cluster
            .partitions(TOPIC)
            .values()
            .all(|(_, isr)| isr.contains(&cluster.node_id(victim)))
            .then_some(())
    });

    let all = compare_tables(&pg, &cluster.client());
    let mut duplicates = 0;
    for (topic, records) in &all {
        check_order(topic, records);
        duplicates += count_copies(topic, records);
    }
    let total: usize = all.values().map(Vec::len).sum();
    let log = bridge.log();
    let resent = log.contains("with a new producer");
    eprintln!(
        "kafka cluster leader loss: {} changes ({changes_at_kill} before the kill), {total} \
         records, {duplicates} duplicates; node {} (leader of {TOPIC}/0) killed, node {} \
         leads after {elected:?}, records stored there again after {resumed:?}, everything \
         committed before the kill confirmed after {recovered:?} ({} changes written \
         meanwhile); bridge resent its window: {resent}; test {:?}",
        report.changes,
        cluster.node_id(victim),
        cluster.node_id(new_leader),
        changes_at_recovery - changes_at_kill,
        started.elapsed()
    );
    // One broker lost is not an error: librdkafka moves on to the new leaders.
    assert!(!log.contains(" ERROR "), "{log}");
    assert_eq!(bridge.terminate(STEP), Some(0), "{log}");
}

/// (commit_lsn, seq) of a record's value.
fn position(r: &KafkaRecord) -> (Lsn, u64) {
    let v = r.json();
    (
        v["commit_lsn"].as_str().unwrap().parse().unwrap(),
        v["seq"].as_u64().unwrap(),
    )
}

/// A key's ids so far, its latest position and its last record's position.
type KeyTrack = (Vec<String>, (Lsn, u64), (Lsn, u64));

/// Per key (and partition), records follow commit order; a record behind one already
/// stored is allowed only as a copy of an id the key already has (a resend), and each key's
/// last record is its latest change.
fn check_order(topic: &str, records: &[KafkaRecord]) {
    let mut keys: HashMap<(i32, Vec<u8>), KeyTrack> = HashMap::new();
    for r in records {
        let (Some(key), Some(_)) = (&r.key, &r.value) else {
            continue;
        };
        let id = r.header(ID_HEADER).unwrap_or_default().to_string();
        let pos = position(r);
        let (ids, max, last) = keys
            .entry((r.partition, key.clone()))
            .or_insert_with(|| (Vec::new(), pos, pos));
        assert!(
            pos >= *max || ids.contains(&id),
            "{topic}: {r:?} is behind {max:?} and not a copy of a record of its key"
        );
        *max = (*max).max(pos);
        *last = pos;
        ids.push(id);
    }
    for ((p, key), (_, max, last)) in keys {
        assert_eq!(
            last,
            max,
            "{topic}/{p}: key {} does not end with its latest change",
            String::from_utf8_lossy(&key)
        );
    }
}

/// Records stored more than once (same partition, id and operation), each extra copy counted;
/// panics unless a copy equals the first record of its id (key and value).
fn count_copies(topic: &str, records: &[KafkaRecord]) -> usize {
    let mut first: HashMap<(i32, String, String), &KafkaRecord> = HashMap::new();
    let mut copies = 0;
    for r in records {
        let id = (
            r.partition,
            r.header(ID_HEADER).unwrap_or_default().to_string(),
            r.header(OP_HEADER).unwrap_or_default().to_string(),
        );
        match first.get(&id) {
            None => {
                first.insert(id, r);
            }
            Some(f) => {
                copies += 1;
                assert!(
                    f.key == r.key && f.value == r.value,
                    "{topic}: {r:?} reuses the id of a different record {f:?}"
                );
            }
        }
    }
    copies
}
