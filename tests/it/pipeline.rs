//! PostgreSQL → bridge → JetStream with real servers: the message contract (docs/protocol.md),
//! commit order, message ids, TOAST, large and streamed transactions, durable flush.

use std::collections::BTreeMap;
use std::time::Duration;

use rmpv::Value as Mp;
use testkit::{
    bridge_command, read_stream, setup_app_db, stream_len, wait_for, BridgeProcess, StoredMessage,
    TempDir, TestEnv,
};

const SCHEMA: &str = "
CREATE TABLE users (id int PRIMARY KEY, email text NOT NULL, name text);
CREATE TABLE orders (id bigint PRIMARY KEY, user_id int, total numeric(12,2), tags text[]);
CREATE TABLE docs (id int PRIMARY KEY, title text, body text);
ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
CREATE TABLE kinds (
  id int PRIMARY KEY, i2 smallint, i8 bigint, f4 real, f8 double precision, b bool, by bytea,
  t text, ai int[], at text[], af float8[], ts timestamptz, j jsonb, u uuid, n numeric);
CREATE SCHEMA sales;
CREATE TABLE sales.users (id int PRIMARY KEY, region text);
";

/// A decoded change message, keyed by field name.
struct Change {
    subject: String,
    msg_id: String,
    fields: BTreeMap<String, Mp>,
    keys: Vec<String>,
}

impl Change {
    fn str(&self, k: &str) -> &str {
        self.fields[k]
            .as_str()
            .unwrap_or_else(|| panic!("{k} is not a string"))
    }
    fn u64(&self, k: &str) -> u64 {
        self.fields[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k} is not an integer"))
    }
    /// `columns` (or `old_columns`) as name → value.
    fn cols(&self, k: &str) -> BTreeMap<String, Mp> {
        match &self.fields[k] {
            Mp::Array(a) => a
                .iter()
                .map(|c| {
                    let m = c.as_map().expect("column is a map");
                    assert_eq!(m.len(), 2);
                    assert_eq!(m[0].0.as_str(), Some("name"));
                    assert_eq!(m[1].0.as_str(), Some("value"));
                    (m[0].1.as_str().unwrap().to_string(), m[1].1.clone())
                })
                .collect(),
            other => panic!("{k} is not an array: {other}"),
        }
    }
}

fn decode(m: &StoredMessage) -> Change {
    let v = rmpv::decode::read_value(&mut m.payload.as_slice()).expect("valid MessagePack");
    let map = v.as_map().expect("a map").clone();
    Change {
        subject: m.subject.clone(),
        msg_id: m.msg_id.clone().expect("Nats-Msg-Id header"),
        keys: map
            .iter()
            .map(|(k, _)| k.as_str().unwrap().to_string())
            .collect(),
        fields: map
            .into_iter()
            .map(|(k, v)| (k.as_str().unwrap().to_string(), v))
            .collect(),
    }
}

/// The last published change of each transaction, and only it, has `last_in_tx` and the
/// header; `changes` are (commit_lsn, last_in_tx field, header) in stream order, all the
/// published changes of whole transactions.
fn check_last_in_tx(changes: &[(String, bool, Option<String>)]) {
    for (i, (commit_lsn, field, header)) in changes.iter().enumerate() {
        let last = changes.get(i + 1).is_none_or(|next| &next.0 != commit_lsn);
        assert_eq!(*field, last, "last_in_tx of change {i} ({commit_lsn})");
        assert_eq!(
            header.as_deref(),
            last.then_some("true"),
            "Pgbridge-Last-In-Tx header of change {i} ({commit_lsn})"
        );
    }
}

fn last_in_tx_of(m: &StoredMessage) -> (String, bool, Option<String>) {
    let c = decode(m);
    let last = c.fields["last_in_tx"]
        .as_bool()
        .expect("last_in_tx is a bool");
    (
        c.str("commit_lsn").to_owned(),
        last,
        m.last_in_tx_header.clone(),
    )
}

fn wait_messages(nats_url: &str, n: u64) -> Vec<StoredMessage> {
    wait_for(
        &format!("{n} messages in CDC"),
        Duration::from_secs(60),
        || (stream_len(nats_url, "CDC") >= n).then_some(()),
    );
    read_stream(nats_url, "CDC")
}

#[test]
fn changes_arrive_in_commit_order_with_the_contract_fields() {
    let env = TestEnv::start();
    setup_app_db(&env.pg, SCHEMA, "");
    let dir = TempDir::new("bridge");
    let bridge = BridgeProcess::spawn(&mut bridge_command(&env.pg, &env.nats.url(), dir.path()));
    bridge.wait_for_line("streaming started", Duration::from_secs(60));

    // One transaction, then one statement per transaction.
    env.pg.sql(
        "app",
        "BEGIN;
         INSERT INTO users VALUES (1, 'a@x', 'Ann'), (2, 'b@x', NULL);
         INSERT INTO orders VALUES (10, 1, 9.99, '{a,\"b c\",NULL}');
         COMMIT;",
    );
    for stmt in [
        "UPDATE users SET name = 'Anna' WHERE id = 1",
        "UPDATE users SET id = 3 WHERE id = 2",
        "DELETE FROM orders WHERE id = 10",
        "INSERT INTO sales.users VALUES (1, 'eu')",
        "INSERT INTO kinds VALUES (1, -32768, -9223372036854775808, 'NaN', '-Infinity', true, '\\x00ff00', 'héllo ✓',
           '{}', '{x,NULL}', '{1.5,Infinity}', '2025-12-10 10:30:00.123456+00', '{\"a\": 1}',
           'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '12.50')",
        "TRUNCATE orders, docs",
    ] {
        env.pg.sql("app", stmt);
    }
    let msgs = wait_messages(&env.nats.url(), 10);
    assert_eq!(msgs.len(), 10, "exactly the changes, nothing twice");
    let ch: Vec<Change> = msgs.iter().map(decode).collect();

    // Field names and order are the contract.
    let expected_keys = [
        "table",
        "schema",
        "operation",
        "relation_id",
        "lsn",
        "commit_lsn",
        "xid",
        "commit_time",
        "seq",
        "last_in_tx",
        "columns",
        "old_columns",
        "unchanged_toast",
    ];
    for c in &ch {
        let keys: Vec<&str> = c.keys.iter().map(String::as_str).collect();
        let want: Vec<&str> = expected_keys
            .iter()
            .copied()
            .filter(|k| *k != "old_columns" || matches!(c.str("operation"), "UPDATE" | "DELETE"))
            .collect();
        assert_eq!(keys, want, "{}", c.subject);
        let (ns, timeline, commit_lsn, seq) = testkit::split_msg_id(&c.msg_id);
        assert!(
            ns.len() == 8 && ns.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
            "{}",
            c.msg_id
        );
        assert_eq!(timeline, 1, "{}", c.msg_id);
        assert_eq!(commit_lsn.to_string(), c.str("commit_lsn"));
        assert_eq!(u64::from(seq), c.u64("seq"));
        let t = c.str("commit_time");
        assert!(
            t.len() == 27 && t.ends_with('Z') && t.as_bytes()[10] == b'T',
            "{t}"
        );
    }
    // Commit order, and seq counting within each transaction.
    let subjects: Vec<&str> = ch.iter().map(|c| c.subject.as_str()).collect();
    assert_eq!(
        subjects,
        [
            "cdc.users.insert",
            "cdc.users.insert",
            "cdc.orders.insert",
            "cdc.users.update",
            "cdc.users.update",
            "cdc.orders.delete",
            "cdc.sales.users.insert",
            "cdc.kinds.insert",
            "cdc.orders.truncate",
            "cdc.docs.truncate",
        ]
    );
    let lsn = |s: &str| s.parse::<pgbridge::pg::Lsn>().unwrap();
    for w in ch.windows(2) {
        assert!(lsn(w[0].str("commit_lsn")) <= lsn(w[1].str("commit_lsn")));
    }
    assert_eq!(
        [ch[0].u64("seq"), ch[1].u64("seq"), ch[2].u64("seq")],
        [0, 1, 2]
    );
    assert_eq!(ch[0].str("commit_lsn"), ch[2].str("commit_lsn"));
    assert_eq!(ch[0].u64("xid"), ch[2].u64("xid"));
    assert_eq!([ch[8].u64("seq"), ch[9].u64("seq")], [0, 1]);
    // A multi-change transaction is marked on its last change only; a single-change one on it.
    check_last_in_tx(&msgs.iter().map(last_in_tx_of).collect::<Vec<_>>());
    assert_eq!(
        ch.iter()
            .map(|c| c.fields["last_in_tx"].as_bool().unwrap())
            .collect::<Vec<_>>(),
        [false, false, true, true, true, true, true, true, false, true]
    );

    // Values and shapes per operation.
    let c = &ch[0];
    assert_eq!(
        (c.str("table"), c.str("schema"), c.str("operation")),
        ("users", "public", "INSERT")
    );
    assert!(c.u64("relation_id") > 0);
    let cols = c.cols("columns");
    assert_eq!(cols["id"], Mp::from(1));
    assert_eq!(cols["email"], Mp::from("a@x"));
    assert_eq!(cols["name"], Mp::from("Ann"));
    assert_eq!(ch[1].cols("columns")["name"], Mp::Nil);
    let o = ch[2].cols("columns");
    assert_eq!(o["total"], Mp::from("9.99"), "numeric stays text");
    assert_eq!(
        o["tags"],
        Mp::Array(vec![Mp::from("a"), Mp::from("b c"), Mp::Nil])
    );

    let u = &ch[3];
    assert_eq!(u.cols("columns")["name"], Mp::from("Anna"));
    assert_eq!(
        u.fields["old_columns"],
        Mp::Nil,
        "no old key when the key did not change"
    );
    let pk = &ch[4];
    assert_eq!(pk.cols("columns")["id"], Mp::from(3));
    let old = pk.cols("old_columns");
    assert_eq!(old.len(), 1, "old key: only the identity columns");
    assert_eq!(old["id"], Mp::from(2));

    let d = &ch[5];
    assert_eq!(d.str("operation"), "DELETE");
    assert_eq!(d.cols("columns")["id"], Mp::from(10));
    assert_eq!(d.cols("old_columns")["id"], Mp::from(10));

    let s = &ch[6];
    assert_eq!((s.str("schema"), s.str("table")), ("sales", "users"));

    let k = ch[7].cols("columns");
    assert_eq!(k["i2"], Mp::from(-32768));
    assert_eq!(k["i8"], Mp::from(i64::MIN));
    assert!(k["f4"].as_f64().unwrap().is_nan());
    assert_eq!(k["f8"].as_f64(), Some(f64::NEG_INFINITY));
    assert_eq!(k["b"], Mp::Boolean(true));
    assert_eq!(k["by"], Mp::Binary(vec![0, 255, 0]));
    assert_eq!(k["t"], Mp::from("héllo ✓"));
    assert_eq!(k["ai"], Mp::Array(vec![]));
    assert_eq!(k["at"], Mp::Array(vec![Mp::from("x"), Mp::Nil]));
    assert_eq!(
        k["af"],
        Mp::Array(vec![Mp::F64(1.5), Mp::F64(f64::INFINITY)])
    );
    assert_eq!(k["ts"], Mp::from("2025-12-10 10:30:00.123456+00"));
    assert_eq!(k["j"], Mp::from("{\"a\": 1}"));
    assert_eq!(k["u"], Mp::from("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"));
    assert_eq!(k["n"], Mp::from("12.50"));

    let t = &ch[8];
    assert_eq!(t.str("operation"), "TRUNCATE");
    assert_eq!(t.fields["columns"], Mp::Array(vec![]));

    // Everything was stored, so the slot may move up to the last commit.
    let confirmed = wait_for(
        "slot to confirm the last commit",
        Duration::from_secs(30),
        || {
            let r = env.pg.sql(
            "app",
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'cdc_slot'",
        );
            let c = lsn(r.rows[0][0].as_deref().unwrap());
            (c > lsn(ch[9].str("commit_lsn"))).then_some(c)
        },
    );
    assert!(confirmed > lsn(ch[9].str("commit_lsn")));
    drop(bridge);
}

#[test]
fn json_format_unchanged_toast_and_table_filter() {
    let env = TestEnv::start();
    setup_app_db(&env.pg, SCHEMA, "");
    let dir = TempDir::new("bridge");
    let bridge = BridgeProcess::spawn(bridge_command(&env.pg, &env.nats.url(), dir.path()).args([
        "--format",
        "json",
        "--table",
        "docs,kinds",
    ]));
    bridge.wait_for_line("streaming started", Duration::from_secs(60));
    env.pg.sql(
        "app",
        "INSERT INTO docs VALUES (1, 't', repeat('x', 5000));
         INSERT INTO users VALUES (1, 'filtered@x', NULL);
         UPDATE docs SET title = 't2' WHERE id = 1;
         INSERT INTO kinds (id, f8, by) VALUES (2, 'NaN', '\\x0001');",
    );
    // The transaction's last change is of a table not streamed: the marker goes to the last
    // published one.
    env.pg.sql(
        "app",
        "BEGIN;
         INSERT INTO docs VALUES (2, 'u', 'v');
         INSERT INTO kinds (id) VALUES (3);
         INSERT INTO users VALUES (2, 'filtered@x', NULL);
         COMMIT;",
    );
    let msgs = wait_messages(&env.nats.url(), 5);
    assert_eq!(msgs.len(), 5, "users is not streamed");
    let marks: Vec<(String, bool, Option<String>)> = msgs
        .iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            // Right after `seq`, as in MessagePack.
            let text = String::from_utf8(m.payload.clone()).unwrap();
            let after_seq = format!(",\"seq\":{},\"last_in_tx\":", v["seq"]);
            assert!(text.contains(&after_seq), "{text}");
            (
                v["commit_lsn"].as_str().unwrap().to_owned(),
                v["last_in_tx"].as_bool().expect("last_in_tx is a bool"),
                m.last_in_tx_header.clone(),
            )
        })
        .collect();
    check_last_in_tx(&marks);
    assert_eq!(marks[3].0, marks[4].0);
    assert!(!marks[3].1 && marks[4].1);
    let v: Vec<serde_json::Value> = msgs
        .iter()
        .map(|m| serde_json::from_slice(&m.payload).expect("valid JSON"))
        .collect();
    assert_eq!(v[0]["operation"], "INSERT");
    assert_eq!(v[0]["columns"][2]["value"].as_str().unwrap().len(), 5000);
    let upd = &v[1];
    assert_eq!(upd["operation"], "UPDATE");
    assert_eq!(upd["unchanged_toast"], serde_json::json!(["body"]));
    let names: Vec<&str> = upd["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["id", "title"],
        "an unchanged TOAST value is not sent as null"
    );
    let k = &v[2]["columns"];
    assert_eq!(k[4]["name"], "f8");
    assert_eq!(k[4]["value"], "NaN");
    let by = k
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "by")
        .unwrap();
    assert_eq!(by["value"], "AAE=", "bytea as base64");
    // The filtered-out insert still counts in seq: ids stay stable if the table list changes.
    drop(bridge);
}

#[test]
fn large_and_streamed_transactions_with_savepoint_rollback() {
    let env = TestEnv::start();
    setup_app_db(
        &env.pg,
        "CREATE TABLE big (id int PRIMARY KEY, pad text)",
        "",
    );
    let dir = TempDir::new("bridge");
    let bridge = BridgeProcess::spawn(&mut bridge_command(&env.pg, &env.nats.url(), dir.path()));
    bridge.wait_for_line("streaming started", Duration::from_secs(60));
    // Far above logical_decoding_work_mem (64kB in the harness): streamed in blocks.
    env.pg.sql(
        "app",
        "INSERT INTO big SELECT g, 'row' FROM generate_series(1, 50000) g",
    );
    env.pg.sql(
        "app",
        "BEGIN;
         INSERT INTO big SELECT g, 'kept' FROM generate_series(100001, 101000) g;
         SAVEPOINT s;
         INSERT INTO big SELECT g, 'dropped' FROM generate_series(200001, 203000) g;
         ROLLBACK TO SAVEPOINT s;
         INSERT INTO big VALUES (300000, 'after');
         COMMIT;
         BEGIN;
         INSERT INTO big SELECT g, 'aborted' FROM generate_series(400001, 403000) g;
         ROLLBACK;
         INSERT INTO big VALUES (500000, 'last');",
    );
    let msgs = wait_messages(&env.nats.url(), 51002);
    // Stream order is commit order: a wrongly published aborted row would come before the
    // last row and show up in the comparison below.
    assert_eq!(msgs.len(), 51002);
    let ids: Vec<i64> = msgs
        .iter()
        .map(|m| {
            let c = decode(m);
            c.cols("columns")["id"].as_i64().unwrap()
        })
        .collect();
    let mut want: Vec<i64> = (1..=50000).collect();
    want.extend(100001..=101000);
    want.push(300000);
    want.push(500000);
    assert_eq!(
        ids, want,
        "every committed row once, in order; no rolled-back row"
    );
    let ids_unique: std::collections::HashSet<_> = msgs.iter().map(|m| m.msg_id.clone()).collect();
    assert_eq!(ids_unique.len(), msgs.len());
    // The streamed transactions too: one mark each, on the last change.
    let marks: Vec<_> = msgs.iter().map(last_in_tx_of).collect();
    check_last_in_tx(&marks);
    let marked: Vec<usize> = (0..marks.len()).filter(|&i| marks[i].1).collect();
    assert_eq!(marked, [49999, 51000, 51001]);
    drop(bridge);
}
