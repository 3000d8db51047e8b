//! The transactional outbox on the Kafka sink against a real broker: events of an outbox
//! table and emitted messages reach topic `outbox.{aggregate_type}` keyed by aggregate id,
//! with the payload byte for byte, the row's id and commit order per aggregate; what cannot be
//! delivered as it is (an empty aggregate type, a malformed prefix, a too large event, and
//! with `--on-oversize dlq` a too large change) lands in topic `dlq` with its reason, and the
//! events after it flow.

use std::collections::{BTreeMap, HashMap};

use pgbridge::wire::kafka::ID_HEADER;
use testkit::kafka::KafkaServer;
use testkit::{setup_app_db, split_msg_id, wait_caught_up, KafkaRecord, PgServer, TempDir};

use super::kafka::{kafka_bridge, wait_records, STEP};
use super::outbox::{order_txn, SCHEMA};

/// The orders' transactions (one outbox row each, an emitted message every third).
const ORDERS: u64 = 30;
/// Bytes of the too large payload and change: over the broker's `message.max.bytes`.
const BIG: usize = 300_000;

#[test]
fn outbox_events_reach_their_topics_and_dead_letters_reach_dlq() {
    let _heavy = testkit::heavy();
    let kafka = std::thread::spawn(|| KafkaServer::start_with(&[("message.max.bytes", "200000")]));
    let pg = PgServer::start();
    let kafka = kafka.join().expect("the Kafka broker started");
    setup_app_db(&pg, SCHEMA, "");
    let dir = TempDir::new("kafka-outbox");
    let bridge = kafka_bridge(
        &pg,
        &kafka,
        dir.path(),
        &["--outbox-table", "outbox", "--on-oversize", "dlq"],
    );

    let mut conn = pg.connect("app");
    for i in 1..=ORDERS {
        conn.execute(&order_txn(i)).unwrap();
        let dead = match i {
            10 => "INSERT INTO outbox VALUES ('bad-1', '', 'agg-1', 'X', '{}')".to_owned(),
            15 => "SELECT pg_logical_emit_message(true, 'outbox..OrderPlaced', '{\"n\": 3}')"
                .to_owned(),
            20 => format!(
                "INSERT INTO outbox VALUES ('big-1', 'order', 'agg-big', 'Big', \
                 jsonb_build_object('big', repeat('x', {BIG})))"
            ),
            25 => format!("INSERT INTO orders VALUES (1000, repeat('y', {BIG}))"),
            _ => continue,
        };
        conn.execute(&dead).unwrap();
    }
    conn.execute(
        "INSERT INTO outbox VALUES ('dot-1', 'order.line', 'agg-9', 'Added', '{\"x\": 1}')",
    )
    .unwrap();
    wait_caught_up(&pg, "cdc_slot", STEP);

    let shipped = ORDERS / 3;
    let events = wait_records(&kafka, &bridge, "outbox.order", (ORDERS + shipped) as usize);
    assert_eq!(events.len() as u64, ORDERS + shipped, "every event once");
    let stored: HashMap<String, String> = pg
        .sql("app", "SELECT id, payload::text FROM outbox")
        .rows
        .into_iter()
        .map(|r| (r[0].clone().unwrap(), r[1].clone().unwrap()))
        .collect();
    // Per partition in offset order; a key lives on one partition.
    let mut sorted: Vec<&KafkaRecord> = events.iter().collect();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    let mut last_per_key: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
    let (mut placed, mut shipped_seen) = (Vec::new(), Vec::new());
    for r in sorted {
        let id = r.header(ID_HEADER).expect("pgbridge-id").to_owned();
        let value = r.value.clone().expect("a value");
        let v: serde_json::Value = serde_json::from_slice(&value).expect("JSON payload");
        let order = v["order"].as_u64().expect("an order number");
        assert!(r.header("pgbridge-commit-lsn").is_some(), "{r:?}");
        match r.header("pgbridge-event-type") {
            Some("OrderPlaced") => {
                assert_eq!(id, format!("evt-{order}"));
                assert_eq!(
                    String::from_utf8(value).unwrap(),
                    stored[&id],
                    "the value is payload::text byte for byte"
                );
                let key = format!("agg-{}", order % 7);
                assert_eq!(r.key.as_deref(), Some(key.as_bytes()));
                assert_eq!(r.header("pgbridge-aggregate-id"), Some(key.as_str()));
                let last = last_per_key.insert(key.into_bytes(), order);
                assert!(last < Some(order), "commit order per aggregate: {r:?}");
                placed.push(order);
            }
            Some("OrderShipped") => {
                // An emitted message: no aggregate id, so no key; an id from its position.
                assert_eq!(r.key, None);
                assert_eq!(value, format!("{{\"order\": {order}}}").as_bytes());
                let (_, _, _, seq) = split_msg_id(&id);
                assert_eq!(seq, 2, "{id}");
                shipped_seen.push(order);
            }
            other => panic!("unexpected event type {other:?}: {r:?}"),
        }
    }
    placed.sort_unstable();
    shipped_seen.sort_unstable();
    assert_eq!(placed, (1..=ORDERS).collect::<Vec<_>>());
    assert_eq!(
        shipped_seen,
        (1..=ORDERS).filter(|i| i % 3 == 0).collect::<Vec<_>>()
    );

    // An aggregate type that is no topic name as it is: encoded.
    let dot = wait_records(&kafka, &bridge, "outbox.order_2Eline", 1);
    assert_eq!(dot.len(), 1);
    assert_eq!(dot[0].key.as_deref(), Some(&b"agg-9"[..]));
    assert_eq!(dot[0].header(ID_HEADER), Some("dot-1"));
    assert_eq!(dot[0].value.as_deref(), Some(&b"{\"x\": 1}"[..]));

    // The change too large for the broker went to `dlq`; the other orders to their topic.
    let cdc = wait_records(&kafka, &bridge, "cdc.orders", ORDERS as usize);
    assert_eq!(cdc.len() as u64, ORDERS);

    let dlq = wait_records(&kafka, &bridge, "dlq", 4);
    assert_eq!(dlq.len(), 4, "{dlq:#?}");
    let by_error = |error: &str| -> Vec<&KafkaRecord> {
        dlq.iter()
            .filter(|r| r.header("pgbridge-error") == Some(error))
            .collect()
    };
    let empty = by_error("empty_routing_value");
    assert_eq!(empty.len(), 1, "{dlq:#?}");
    assert_eq!(empty[0].header(ID_HEADER), Some("bad-1"));
    assert_eq!(empty[0].key.as_deref(), Some(&b"agg-1"[..]));
    assert_eq!(empty[0].value.as_deref(), Some(&b"{}"[..]));
    assert_eq!(empty[0].header("pgbridge-source"), Some("outbox."));
    assert!(empty[0]
        .header("pgbridge-error-detail")
        .unwrap()
        .contains("aggregate type is empty"));
    let invalid = by_error("invalid_subject");
    assert_eq!(invalid.len(), 1, "{dlq:#?}");
    assert_eq!(invalid[0].value.as_deref(), Some(&b"{\"n\": 3}"[..]));
    assert!(invalid[0]
        .header("pgbridge-error-detail")
        .unwrap()
        .contains("outbox..OrderPlaced"));
    let large = by_error("too_large");
    assert_eq!(large.len(), 2, "{dlq:#?}");
    for r in &large {
        // Without its value, which Kafka would refuse again; its size in a header.
        assert_eq!(r.value.as_deref(), Some(&b""[..]));
        let size: usize = r.header("pgbridge-truncated").unwrap().parse().unwrap();
        assert!(size > BIG, "{r:?}");
    }
    let event = large
        .iter()
        .find(|r| r.header("pgbridge-source") == Some("outbox.order"))
        .expect("the too large event");
    assert_eq!(event.header(ID_HEADER), Some("big-1"));
    assert_eq!(event.key.as_deref(), Some(&b"agg-big"[..]));
    let change = large
        .iter()
        .find(|r| r.header("pgbridge-source") == Some("cdc.orders"))
        .expect("the too large change");
    assert_eq!(change.header("pgbridge-op"), Some("insert"));
    assert_eq!(change.key.as_deref(), Some(&b"{\"id\":1000}"[..]));
}
