//! The transactional outbox against real servers: events of an outbox table and of
//! `pg_logical_emit_message(true, 'outbox.…', …)` reach stream `OUTBOX` once each, with the
//! stored payload byte for byte, the row's id (or one from the position) and commit order;
//! through kill -9 of the bridge and a NATS restart; and what cannot be delivered as it is lands in `DLQ` with
//! its reason while the events after it flow and the slot is confirmed past it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgbridge::pg::conn::{ConnectionKind, PgConnection};
use pgbridge::pg::Lsn;
use testkit::{
    bridge_command, free_port, read_stream, setup_app_db, split_msg_id, stream_len, wait_caught_up,
    wait_for, with_nats, BridgeProcess, NatsServer, PgServer, Rng, StoredMessage, TempDir, TestEnv,
};

pub(super) const SCHEMA: &str =
    "CREATE TABLE orders (id bigint PRIMARY KEY, customer text NOT NULL); \
     CREATE TABLE outbox (id text PRIMARY KEY, aggregate_type text, aggregate_id text, \
                          event_type text, payload jsonb)";
const SLOT: &str = "cdc_slot";
/// Bound of every wait for the bridge or the servers.
const WAIT: Duration = Duration::from_secs(60);

fn spawn(env_pg: &PgServer, url: &str, dir: &TempDir, extra: &[&str]) -> BridgeProcess {
    let mut cmd = bridge_command(env_pg, url, dir.path());
    cmd.args([
        "--outbox-table",
        "outbox",
        "--format",
        "json",
        "--standby-status-interval-secs",
        "1",
    ])
    .args(extra);
    let bridge = BridgeProcess::spawn(&mut cmd);
    bridge.wait_for_line("streaming started", WAIT);
    bridge
}

/// The statements of order `i`'s transaction: the order, its `OrderPlaced` row, and for every
/// third order an emitted `OrderShipped` message.
pub(super) fn order_txn(i: u64) -> String {
    let emit = if i.is_multiple_of(3) {
        format!(
            " SELECT pg_logical_emit_message(true, 'outbox.order.OrderShipped', '{{\"order\": {i}}}');"
        )
    } else {
        String::new()
    };
    format!(
        "BEGIN; INSERT INTO orders VALUES ({i}, 'c{i}'); \
         INSERT INTO outbox VALUES ('evt-{i}', 'order', 'agg-{}', 'OrderPlaced', \
           '{{\"order\": {i},   \"note\": \"ü \\\"q\\\"\", \"items\": [1, 2.50]}}');{emit} COMMIT;",
        i % 7
    )
}

fn order_of(m: &StoredMessage) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(&m.payload).expect("JSON payload");
    v["order"].as_u64().expect("an order number")
}

fn commit_lsn(m: &StoredMessage) -> Lsn {
    m.header("Pgbridge-Commit-Lsn")
        .expect("Pgbridge-Commit-Lsn")
        .parse()
        .expect("an LSN")
}

/// `GET path` on the bridge's HTTP port: the body.
fn http_get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the bridge");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(body.len());
    body[..len.min(body.len())].to_owned()
}

#[test]
fn outbox_events_arrive_once_in_commit_order_and_add_nothing_to_cdc() {
    let env = TestEnv::start();
    setup_app_db(&env.pg, SCHEMA, "");
    let dir = TempDir::new("bridge");
    let url = env.nats.url();
    let mut bridge = spawn(&env.pg, &url, &dir, &[]);

    let n: u64 = 60;
    let mut conn = env.pg.connect("app");
    // Written before the orders: updates and deletes of an outbox row publish nothing; a
    // rolled-back transaction, a non-transactional message and other prefixes neither.
    for sql in [
        "INSERT INTO outbox VALUES ('tmp', 'order', 'agg-x', 'Tmp', '{}')",
        "UPDATE outbox SET event_type = 'Changed', payload = '[1]' WHERE id = 'tmp'",
        "DELETE FROM outbox WHERE id = 'tmp'",
        "BEGIN; INSERT INTO orders VALUES (0, 'rolled back'); \
         INSERT INTO outbox VALUES ('rolled', 'order', 'agg-0', 'OrderPlaced', '{}'); \
         SELECT pg_logical_emit_message(true, 'outbox.order.Rolled', '{}'); ROLLBACK",
        "SELECT pg_logical_emit_message(false, 'outbox.order.NotInATransaction', '{}')",
        "SELECT pg_logical_emit_message(true, 'other.prefix', 'x')",
    ] {
        conn.execute(sql).unwrap();
    }
    for i in 1..=n {
        conn.execute(&order_txn(i)).unwrap();
    }
    wait_caught_up(&env.pg, SLOT, WAIT);
    let shipped = n / 3;
    wait_for("every outbox event", WAIT, || {
        (stream_len(&url, "OUTBOX") >= n + 1 + shipped).then_some(())
    });

    let stored: HashMap<String, String> = env
        .pg
        .sql("app", "SELECT id, payload::text FROM outbox")
        .rows
        .into_iter()
        .map(|r| (r[0].clone().unwrap(), r[1].clone().unwrap()))
        .collect();
    let cdc = read_stream(&url, "CDC");
    assert_eq!(
        cdc.len() as u64,
        n,
        "one change per order, none of the outbox"
    );
    let mut order_commit = HashMap::new();
    for m in &cdc {
        assert_eq!(m.subject, "cdc.orders.insert");
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        let id = v["columns"][0]["value"].as_u64().unwrap();
        let lsn: Lsn = v["commit_lsn"].as_str().unwrap().parse().unwrap();
        order_commit.insert(id, lsn);
    }

    let outbox = read_stream(&url, "OUTBOX");
    assert_eq!(outbox.len() as u64, n + 1 + shipped, "every event once");
    // The row inserted and then changed and deleted: its insert, as it was inserted.
    let tmp = &outbox[0];
    assert_eq!(tmp.msg_id.as_deref(), Some("tmp"));
    assert_eq!(tmp.subject, "outbox.order.Tmp");
    assert_eq!(tmp.payload, b"{}");
    let (mut placed, mut shipped_seen) = (Vec::new(), Vec::new());
    let mut last_lsn = Lsn(0);
    let mut ids = HashSet::new();
    for m in &outbox[1..] {
        let id = m.msg_id.clone().expect("Nats-Msg-Id");
        assert!(ids.insert(id.clone()), "{id} stored twice");
        let lsn = commit_lsn(m);
        assert!(lsn >= last_lsn, "commit order along the stream");
        last_lsn = lsn;
        let order = order_of(m);
        // The event's commit LSN is its transaction's: the order's change event has it too.
        assert_eq!(Some(&lsn), order_commit.get(&order), "{id}");
        match m.subject.as_str() {
            "outbox.order.OrderPlaced" => {
                assert_eq!(id, format!("evt-{order}"));
                assert_eq!(
                    String::from_utf8(m.payload.clone()).unwrap(),
                    stored[&id],
                    "the payload is payload::text byte for byte"
                );
                assert_eq!(
                    m.header("Pgbridge-Aggregate-Id"),
                    Some(format!("agg-{}", order % 7).as_str())
                );
                assert_eq!(m.header("Pgbridge-Event-Type"), Some("OrderPlaced"));
                placed.push(order);
            }
            "outbox.order.OrderShipped" => {
                assert_eq!(m.payload, format!("{{\"order\": {order}}}").as_bytes());
                // An id from the position: the transaction's commit and the message's ordinal
                // after the two inserts.
                let (_, _, id_lsn, seq) = split_msg_id(&id);
                assert_eq!((id_lsn, seq), (lsn, 2), "{id}");
                assert_eq!(m.header("Pgbridge-Event-Type"), Some("OrderShipped"));
                assert_eq!(m.header("Pgbridge-Aggregate-Id"), None);
                shipped_seen.push(order);
            }
            other => panic!("unexpected subject {other}"),
        }
    }
    // Per aggregate (and overall) in commit order, each once.
    assert_eq!(placed, (1..=n).collect::<Vec<_>>());
    assert_eq!(
        shipped_seen,
        (1..=n).filter(|i| i.is_multiple_of(3)).collect::<Vec<_>>()
    );
    assert_eq!(stream_len(&url, "DLQ"), 0);
    // Each stream's messages follow the previous one of the same stream: no refusal.
    assert!(!bridge.log().contains("another writer"), "{}", bridge.log());
    assert_eq!(bridge.terminate(WAIT), Some(0), "{}", bridge.log());
}

#[test]
fn kill_9_five_times_under_an_event_load_stores_every_event_once() {
    let mut env = TestEnv::start();
    setup_app_db(&env.pg, SCHEMA, "");
    let dir = TempDir::new("bridge");
    let url = env.nats.url();
    let mut bridge = spawn(&env.pg, &url, &dir, &[]);

    // One writer, one order transaction after the other, until stopped (bounded).
    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicU64::new(0));
    let writer = {
        let params = env.pg.params("app");
        let (stop, committed) = (Arc::clone(&stop), Arc::clone(&committed));
        std::thread::spawn(move || {
            let refs: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let mut conn = PgConnection::connect(&refs, ConnectionKind::Normal).unwrap();
            let started = Instant::now();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) && started.elapsed() < WAIT && i < 100_000 {
                i += 1;
                conn.execute(&order_txn(i)).unwrap();
                committed.store(i, Ordering::Relaxed);
            }
            i
        })
    };
    let mut rng = Rng::new(0x0b0c_5eed ^ u64::from(std::process::id()));
    for kill in 1..=5 {
        std::thread::sleep(Duration::from_millis(rng.range(300, 1500) as u64));
        assert!(
            bridge.child.try_wait().unwrap().is_none(),
            "{}",
            bridge.log()
        );
        bridge.child.signal(libc::SIGKILL);
        assert_eq!(
            bridge.wait_exit(WAIT),
            None,
            "kill {kill}: killed by SIGKILL"
        );
        bridge = spawn(&env.pg, &url, &dir, &[]);
    }
    // And NATS away for a moment: both streams' windows are sent again in order.
    std::thread::sleep(Duration::from_millis(500));
    env.nats.stop();
    std::thread::sleep(Duration::from_secs(2));
    env.nats.start_again();
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let n = writer.join().unwrap();
    assert!(n > 50, "the load committed only {n} transactions");
    wait_caught_up(&env.pg, SLOT, WAIT);
    let expected = n + n / 3;
    wait_for("every outbox event", WAIT, || {
        (stream_len(&url, "OUTBOX") >= expected).then_some(())
    });

    let outbox = read_stream(&url, "OUTBOX");
    let mut ids = HashSet::new();
    let mut by_kind: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for m in &outbox {
        let id = m.msg_id.clone().expect("Nats-Msg-Id");
        assert!(ids.insert(id.clone()), "{id} stored twice");
        by_kind
            .entry(m.subject.as_str())
            .or_default()
            .push(order_of(m));
    }
    assert_eq!(outbox.len() as u64, expected, "every event exactly once");
    assert_eq!(
        by_kind["outbox.order.OrderPlaced"],
        (1..=n).collect::<Vec<_>>(),
        "every row event once, in commit order"
    );
    assert_eq!(
        by_kind["outbox.order.OrderShipped"],
        (1..=n).filter(|i| i.is_multiple_of(3)).collect::<Vec<_>>(),
        "every emitted event once, in commit order"
    );
    assert_eq!(stream_len(&url, "CDC"), n);
    assert_eq!(bridge.terminate(WAIT), Some(0), "{}", bridge.log());
}

#[test]
fn undeliverable_events_become_dead_letters_and_the_rest_flows() {
    const MAX_PAYLOAD: usize = 8192;
    let conf = TempDir::new("nats-conf");
    let conf_file = conf.path().join("nats.conf");
    std::fs::write(&conf_file, format!("max_payload: {MAX_PAYLOAD}\n")).unwrap();
    let nats = std::thread::spawn(move || {
        NatsServer::start_with_args(&["-c", conf_file.to_str().unwrap()])
    });
    let pg = PgServer::start();
    let nats = nats.join().unwrap();
    setup_app_db(&pg, SCHEMA, "");
    let dir = TempDir::new("bridge");
    let url = nats.url();
    // An OUTBOX stream made by hand that takes messages of at most 4 kB: a larger event is
    // refused for good (though under max_payload).
    with_nats(&url, |client| async move {
        async_nats::jetstream::new(client)
            .create_stream(async_nats::jetstream::stream::Config {
                name: "OUTBOX".into(),
                subjects: vec!["outbox.>".into()],
                max_message_size: 4096,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .expect("create OUTBOX")
    });
    let port = free_port();
    let port_arg = port.to_string();
    let mut bridge = spawn(
        &pg,
        &url,
        &dir,
        &["--on-oversize", "dlq", "--port", &port_arg],
    );

    let big = "x".repeat(20_000);
    let mut conn = pg.connect("app");
    for sql in [
        "INSERT INTO outbox VALUES ('good-a', 'order', 'agg', 'OrderPlaced', '{\"n\": 0}')".to_owned(),
        "INSERT INTO outbox VALUES ('bad-empty', '', 'agg', 'OrderPlaced', '{\"n\": 1}')".to_owned(),
        "INSERT INTO outbox VALUES ('bad-null', 'order', 'agg', NULL, '{\"n\": 2}')".to_owned(),
        format!("INSERT INTO outbox VALUES ('bad-big', 'order', 'agg', 'OrderPlaced', '{{\"big\": \"{big}\"}}')"),
        "SELECT pg_logical_emit_message(true, 'outbox..OrderPlaced', '{\"n\": 3}')".to_owned(),
        "BEGIN; SELECT pg_logical_emit_message(true, 'outbox.a b.c', '{\"n\": 4}'); COMMIT".to_owned(),
        format!("SELECT pg_logical_emit_message(true, 'outbox.order.Big', '{big}')"),
        format!("INSERT INTO orders VALUES (1, '{big}')"),
        format!(
            "INSERT INTO outbox VALUES ('bad-refused', 'order', 'agg', 'OrderPlaced', '\"{}\"')",
            "y".repeat(5000)
        ),
        "BEGIN; INSERT INTO outbox VALUES ('good-b', 'order', 'agg', 'OrderPlaced', '{\"n\": 5}'); \
         SELECT pg_logical_emit_message(true, 'outbox.order.Shipped', '{\"n\": 6}'); \
         INSERT INTO orders VALUES (2, 'small'); COMMIT"
            .to_owned(),
    ] {
        conn.execute(&sql).unwrap();
    }
    // The slot is confirmed past every dead letter: none of them holds the WAL back.
    wait_caught_up(&pg, SLOT, WAIT);
    wait_for("the dead letters", WAIT, || {
        (stream_len(&url, "DLQ") >= 8).then_some(())
    });

    let outbox = read_stream(&url, "OUTBOX");
    let subjects: Vec<(&str, &str)> = outbox
        .iter()
        .map(|m| (m.subject.as_str(), std::str::from_utf8(&m.payload).unwrap()))
        .collect();
    assert_eq!(
        subjects,
        [
            ("outbox.order.OrderPlaced", "{\"n\": 0}"),
            ("outbox.order.OrderPlaced", "{\"n\": 5}"),
            ("outbox.order.Shipped", "{\"n\": 6}"),
        ],
        "the events after the dead letters flow"
    );
    let cdc = read_stream(&url, "CDC");
    assert_eq!(cdc.len(), 1, "the oversize change went to the DLQ");
    assert_eq!(cdc[0].subject, "cdc.orders.insert");

    let big_payload = pg.value(
        "app",
        "SELECT payload::text FROM outbox WHERE id = 'bad-big'",
    );
    let dlq = read_stream(&url, "DLQ");
    let letters: Vec<(&str, &str, &str)> = dlq
        .iter()
        .map(|m| {
            (
                m.subject.as_str(),
                m.header("Pgbridge-Error").expect("Pgbridge-Error"),
                m.header("Pgbridge-Source").expect("Pgbridge-Source"),
            )
        })
        .collect();
    assert_eq!(
        letters,
        [
            (
                "dlq.outbox.outbox",
                "empty_routing_value",
                "outbox..OrderPlaced"
            ),
            ("dlq.outbox.outbox", "empty_routing_value", "outbox.order."),
            ("dlq.outbox.outbox", "too_large", "outbox.order.OrderPlaced"),
            (
                "dlq.outbox.=messages",
                "invalid_subject",
                "outbox..OrderPlaced"
            ),
            ("dlq.outbox.=messages", "invalid_subject", "outbox.a b.c"),
            ("dlq.outbox.=messages", "too_large", "outbox.order.Big"),
            ("dlq.cdc.orders", "too_large", "cdc.orders.insert"),
            ("dlq.outbox.outbox", "refused", "outbox.order.OrderPlaced"),
        ]
    );
    // Original body and headers, and the row's id (or one from the position) as message id.
    assert_eq!(dlq[0].msg_id.as_deref(), Some("bad-empty"));
    assert_eq!(dlq[0].payload, b"{\"n\": 1}");
    assert_eq!(dlq[0].header("Pgbridge-Aggregate-Id"), Some("agg"));
    assert_eq!(dlq[0].header("Pgbridge-Event-Type"), Some("OrderPlaced"));
    assert_eq!(dlq[1].msg_id.as_deref(), Some("bad-null"));
    assert_eq!(dlq[2].msg_id.as_deref(), Some("bad-big"));
    // Too large: the headers and as much of the body as fits.
    for (m, full) in [(&dlq[2], big_payload.len()), (&dlq[5], big.len())] {
        assert_eq!(
            m.header("Pgbridge-Truncated"),
            Some(full.to_string().as_str())
        );
        assert!(!m.payload.is_empty() && m.payload.len() < MAX_PAYLOAD);
    }
    assert!(big_payload.as_bytes().starts_with(&dlq[2].payload));
    assert!(big.as_bytes().starts_with(&dlq[5].payload));
    for m in &dlq[3..6] {
        split_msg_id(m.msg_id.as_deref().expect("an id from the position"));
    }
    assert_eq!(dlq[3].payload, b"{\"n\": 3}");
    assert!(dlq[6].msg_id.is_some());
    assert_eq!(dlq[7].msg_id.as_deref(), Some("bad-refused"));
    assert_eq!(
        dlq[7].payload.len(),
        5002,
        "the whole body: it fits the server"
    );
    assert!(dlq[7]
        .header("Pgbridge-Error-Detail")
        .unwrap()
        .contains("maximum"));

    let status: serde_json::Value = serde_json::from_str(&http_get(port, "/status")).unwrap();
    assert_eq!(status["dead_letters"], 8);
    let metrics = http_get(port, "/metrics");
    for line in [
        "bridge_dead_letters_total{reason=\"empty_routing_value\"} 2",
        "bridge_dead_letters_total{reason=\"invalid_subject\"} 2",
        "bridge_dead_letters_total{reason=\"too_large\"} 3",
        "bridge_dead_letters_total{reason=\"refused\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }

    // `bridge dlq`: list, refuse what cannot be replayed, replay a corrected one.
    let dlq_cmd = |args: &[&str]| {
        let out = std::process::Command::new(testkit::bridge_bin())
            .env_clear()
            .env("NATS_URL", &url)
            .arg("dlq")
            .args(args)
            .output()
            .expect("run bridge dlq");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, listed, _) = dlq_cmd(&["list"]);
    assert_eq!(code, Some(0));
    let listed: Vec<serde_json::Value> = listed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(listed.len(), 8);
    assert_eq!(listed[0]["error"], "empty_routing_value");
    assert_eq!(listed[0]["msg_id"], "bad-empty");
    assert_eq!(listed[2]["truncated_from"], big_payload.len());
    let seq = |i: usize| listed[i]["seq"].to_string();
    let (code, _, err) = dlq_cmd(&["replay", &seq(2)]);
    assert_eq!(code, Some(2), "a cut body cannot be replayed: {err}");
    let (code, _, err) = dlq_cmd(&["replay", &seq(0)]);
    assert_eq!(code, Some(2), "outbox..OrderPlaced is no subject: {err}");
    let (code, replayed, err) = dlq_cmd(&["replay", &seq(0), "--to", "outbox.order.OrderPlaced"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(replayed.contains("\"stream\":\"OUTBOX\""), "{replayed}");
    let outbox = read_stream(&url, "OUTBOX");
    let last = outbox.last().unwrap();
    assert_eq!(
        (last.msg_id.as_deref(), last.payload.as_slice()),
        (Some("bad-empty"), b"{\"n\": 1}".as_slice())
    );
    assert_eq!(last.header("Pgbridge-Aggregate-Id"), Some("agg"));
    assert_eq!(last.header("Pgbridge-Error"), None);
    assert_eq!(stream_len(&url, "DLQ"), 7, "removed once stored");

    // The refusal rerouted one message; the ones behind it were resent without alarm.
    assert!(!bridge.log().contains("another writer"), "{}", bridge.log());

    // A restart sends nothing again into either stream.
    assert_eq!(bridge.terminate(WAIT), Some(0), "{}", bridge.log());
    let mut bridge = spawn(&pg, &url, &dir, &["--on-oversize", "dlq"]);
    conn.execute("INSERT INTO outbox VALUES ('good-c', 'order', 'agg', 'OrderPlaced', '{}')")
        .unwrap();
    wait_caught_up(&pg, SLOT, WAIT);
    wait_for("the event after the restart", WAIT, || {
        (stream_len(&url, "OUTBOX") >= 5).then_some(())
    });
    assert_eq!(stream_len(&url, "OUTBOX"), 5);
    assert_eq!(stream_len(&url, "DLQ"), 7);
    assert_eq!(bridge.terminate(WAIT), Some(0), "{}", bridge.log());
}

#[test]
fn a_transaction_streamed_before_its_commit_publishes_its_events_once_in_order() {
    let env = TestEnv::start();
    setup_app_db(&env.pg, SCHEMA, "");
    let dir = TempDir::new("bridge");
    let url = env.nats.url();
    let mut bridge = spawn(&env.pg, &url, &dir, &[]);

    // Far beyond the test server's logical_decoding_work_mem: PostgreSQL streams both
    // transactions before they end; the rolled-back one must publish nothing.
    let n = 2000;
    let body = |i: u64| {
        format!(
            "INSERT INTO outbox VALUES ('big-{i}', 'order', 'agg-{}', 'OrderPlaced', \
             '{{\"order\": {i}, \"pad\": \"{}\"}}');",
            i % 3,
            "p".repeat(100)
        )
    };
    let statements = |prefix: &str| -> String {
        (1..=n)
            .map(|i| {
                let mut s = body(i).replace("big-", prefix);
                if i % 10 == 0 {
                    s.push_str(&format!(
                        " SELECT pg_logical_emit_message(true, 'outbox.order.Tick', '{{\"order\": {i}}}');"
                    ));
                }
                s
            })
            .collect()
    };
    let mut conn = env.pg.connect("app");
    conn.execute(&format!("BEGIN; {} ROLLBACK;", statements("gone-")))
        .unwrap();
    conn.execute(&format!("BEGIN; {} COMMIT;", statements("big-")))
        .unwrap();
    wait_caught_up(&env.pg, SLOT, WAIT);
    let expected = n + n / 10;
    wait_for("every event of the transaction", WAIT, || {
        (stream_len(&url, "OUTBOX") >= expected).then_some(())
    });

    let outbox = read_stream(&url, "OUTBOX");
    assert_eq!(
        outbox.len() as u64,
        expected,
        "every event once, none of the rollback"
    );
    let lsn = commit_lsn(&outbox[0]);
    let (mut rows, mut ticks) = (Vec::new(), Vec::new());
    let mut ids = HashSet::new();
    for m in &outbox {
        let id = m.msg_id.clone().unwrap();
        assert!(ids.insert(id.clone()), "{id} stored twice");
        assert_eq!(commit_lsn(m), lsn, "one transaction");
        match m.subject.as_str() {
            "outbox.order.OrderPlaced" => {
                assert_eq!(id, format!("big-{}", order_of(m)));
                rows.push(order_of(m));
            }
            "outbox.order.Tick" => {
                // The message's ordinal counts the inserts before it.
                let (_, _, id_lsn, seq) = split_msg_id(&id);
                let order = order_of(m);
                assert_eq!((id_lsn, u64::from(seq)), (lsn, order + order / 10 - 1));
                ticks.push(order);
            }
            other => panic!("unexpected subject {other}"),
        }
    }
    assert_eq!(rows, (1..=n).collect::<Vec<_>>());
    assert_eq!(ticks, (1..=n).filter(|i| i % 10 == 0).collect::<Vec<_>>());
    // PostgreSQL did stream them (the spool path, not the plain one, was taken).
    wait_for("the slot's streamed transactions", WAIT, || {
        let streamed: u64 = env
            .pg
            .value(
                "postgres",
                "SELECT stream_txns FROM pg_stat_replication_slots WHERE slot_name = 'cdc_slot'",
            )
            .parse()
            .unwrap_or(0);
        (streamed >= 2).then_some(())
    });
    assert_eq!(bridge.terminate(WAIT), Some(0), "{}", bridge.log());
}
