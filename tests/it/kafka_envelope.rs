//! `--envelope debezium` on the Kafka sink against a real broker: values and keys are
//! Debezium's (with schemas here), a key change becomes Debezium `d` and `c` events, and the
//! tombstone after a DELETE keeps the Debezium key.

use std::collections::BTreeMap;

use pgbridge::wire::kafka::OP_HEADER;
use serde_json::{json, Value as J};
use testkit::kafka::KafkaServer;
use testkit::oracle::SLOT;
use testkit::{setup_app_db, wait_caught_up, KafkaRecord, PgServer, TempDir};

use super::kafka::{kafka_bridge, wait_records, STEP};

#[test]
fn debezium_records_on_kafka() {
    let _heavy = testkit::heavy();
    let kafka = std::thread::spawn(KafkaServer::start);
    let pg = PgServer::start();
    let kafka = kafka.join().expect("the Kafka broker started");
    setup_app_db(&pg, "CREATE TABLE t (id int PRIMARY KEY, v text)", "");
    let dir = TempDir::new("kafka-envelope");
    let bridge = kafka_bridge(
        &pg,
        &kafka,
        dir.path(),
        &["--envelope", "debezium", "--debezium-schemas"],
    );
    for sql in [
        "INSERT INTO t VALUES (1, 'a'), (2, 'b')",
        "UPDATE t SET v = 'a2' WHERE id = 1",
        "UPDATE t SET id = 20 WHERE id = 2",
        "DELETE FROM t WHERE id = 1",
    ] {
        pg.sql("app", sql);
    }
    wait_caught_up(&pg, SLOT, STEP);
    // 2 inserts, 1 update, the key change's DELETE + tombstone + INSERT, DELETE + tombstone.
    let records = wait_records(&kafka, &bridge, "cdc.t", 8);
    assert_eq!(records.len(), 8, "{records:#?}");

    let mut sorted: Vec<&KafkaRecord> = records.iter().collect();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    // Per key, in order: (op or "tombstone", the Debezium document or null).
    let mut per_key: BTreeMap<i64, Vec<(String, J)>> = BTreeMap::new();
    for r in sorted {
        let key = r.key_json().expect("every record has a key");
        // The key: Debezium's key document, schema and payload = the primary key.
        assert_eq!(key["schema"]["type"], "struct", "{r:?}");
        let id = key["payload"]["id"].as_i64().expect("key payload id");
        assert_eq!(key["payload"], json!({ "id": id }));
        let Some(value) = &r.value else {
            assert_eq!(r.header(OP_HEADER), Some("tombstone"));
            per_key
                .entry(id)
                .or_default()
                .push(("tombstone".into(), J::Null));
            continue;
        };
        let v: J = serde_json::from_slice(value).expect("a JSON value");
        assert_eq!(v["schema"]["type"], "struct", "{r:?}");
        let p = v["payload"].clone();
        assert_eq!(p["source"]["table"], "t");
        assert_eq!(p["source"]["schema"], "public");
        assert!(p["source"]["lsn"].as_u64().unwrap() > 0, "{p}");
        per_key
            .entry(id)
            .or_default()
            .push((p["op"].as_str().unwrap().to_owned(), p));
    }
    let ops = |id: i64| -> Vec<&str> { per_key[&id].iter().map(|(o, _)| o.as_str()).collect() };
    assert_eq!(ops(1), ["c", "u", "d", "tombstone"]);
    assert_eq!(ops(2), ["c", "d", "tombstone"], "the key change's old key");
    assert_eq!(ops(20), ["c"], "the key change's new key");

    let doc = |id: i64, i: usize| &per_key[&id][i].1;
    assert_eq!(doc(1, 0)["after"], json!({"id": 1, "v": "a"}));
    assert_eq!(doc(1, 0)["before"], J::Null);
    assert_eq!(doc(1, 1)["after"], json!({"id": 1, "v": "a2"}));
    assert_eq!(doc(1, 2)["before"]["id"], 1);
    assert_eq!(doc(1, 2)["after"], J::Null);
    // The key change's halves: the old row deleted, the new one created, one position.
    let (del, ins) = (doc(2, 1), doc(20, 0));
    assert_eq!(del["before"]["id"], 2);
    assert_eq!(del["after"], J::Null);
    assert_eq!(ins["after"], json!({"id": 20, "v": "b"}));
    assert_eq!(ins["before"], J::Null);
    assert_eq!(del["source"]["lsn"], ins["source"]["lsn"]);
}
