//! On-demand snapshots with real servers: request handling (unknown table, duplicate,
//! malformed subject) and the exactness of the bootstrap rule (docs/protocol.md, "The bootstrap rule") under concurrent
//! writes: chunks + CDC changes from `cdc_stream_seq + 1` with `commit_lsn >= lsn` rebuild
//! the table exactly.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgbridge::pg::Lsn;
use rmpv::Value as Mp;
use testkit::{
    bridge_command, read_stream, setup_app_db, wait_for, BridgeProcess, TempDir, TestEnv,
};

fn request(nats_url: &str, subject: &str) -> serde_json::Value {
    testkit::with_nats(nats_url, |client| async move {
        let reply = tokio::time::timeout(
            Duration::from_secs(10),
            client.request(subject.to_string(), "".into()),
        )
        .await
        .expect("reply in time")
        .expect("a reply");
        serde_json::from_slice(&reply.payload).expect("JSON reply")
    })
}

pub(crate) fn map(v: &Mp) -> BTreeMap<String, Mp> {
    v.as_map()
        .expect("a map")
        .iter()
        .map(|(k, v)| (k.as_str().unwrap().to_string(), v.clone()))
        .collect()
}

fn decode(payload: &[u8]) -> BTreeMap<String, Mp> {
    map(&rmpv::decode::read_value(&mut &payload[..]).expect("MessagePack"))
}

fn cols(v: &Mp) -> BTreeMap<String, Mp> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let c = map(c);
            (c["name"].as_str().unwrap().to_string(), c["value"].clone())
        })
        .collect()
}

#[test]
fn requests_get_clear_replies_and_leave_streaming_untouched() {
    let env = TestEnv::start();
    setup_app_db(
        &env.pg,
        "CREATE TABLE users (id int PRIMARY KEY, name text); \
         INSERT INTO users SELECT g, 'u' || g FROM generate_series(1, 100000) g; \
         ANALYZE users",
        "",
    );
    let dir = TempDir::new("bridge");
    let bridge = BridgeProcess::spawn(bridge_command(&env.pg, &env.nats.url(), dir.path()).args([
        "--snapshot-chunk-rows",
        "500",
        "--snapshot-cooldown-secs",
        "0",
    ]));
    bridge.wait_for_line("snapshot requests served", Duration::from_secs(60));
    let url = env.nats.url();

    let r = request(&url, "snapshot.request.nosuch");
    assert_eq!(r["status"], "error", "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("unknown table public.nosuch"),
        "{r}"
    );
    assert_eq!(r["reason"], "unknown_table", "{r}");
    // The streamed tables are not listed to whoever asks.
    assert!(
        !r["error"].as_str().unwrap().contains("public.users"),
        "{r}"
    );

    let r = request(&url, "snapshot.request.a.b.c");
    assert_eq!(r["status"], "error", "{r}");
    assert_eq!(r["reason"], "malformed", "{r}");
    assert!(
        r["error"].as_str().unwrap().contains("malformed table"),
        "{r}"
    );

    let r = request(&url, "snapshot.request.bad%zz");
    assert_eq!(r["status"], "error", "{r}");

    let first = request(&url, "snapshot.request.users");
    assert_eq!(first["status"], "accepted", "{first}");
    // Read on the snapshot's own connection; ANALYZE read every page of the table.
    assert_eq!(first["estimated_rows"], 100000, "{first}");
    let id = first["snapshot_id"].as_str().unwrap().to_string();
    let dup = request(&url, "snapshot.request.users");
    assert_eq!(dup["status"], "error", "{dup}");
    assert!(
        dup["error"].as_str().unwrap().contains(
            "already in progress; wait for its meta message init.meta.users in stream 'INIT'"
        ),
        "{dup}"
    );

    // Streaming goes on meanwhile.
    env.pg
        .sql("app", "INSERT INTO users VALUES (200001, 'during')");
    wait_for(
        "the change during the snapshot",
        Duration::from_secs(60),
        || {
            read_stream(&url, "CDC")
                .iter()
                .any(|m| m.subject == "cdc.users.insert")
                .then_some(())
        },
    );

    let meta = wait_for("snapshot meta", Duration::from_secs(120), || {
        read_stream(&url, "INIT")
            .into_iter()
            .find(|m| m.subject == "init.meta.users")
    });
    let meta = decode(&meta.payload);
    assert_eq!(meta["snapshot_id"].as_str(), Some(id.as_str()));
    assert_eq!(meta["table"].as_str(), Some("users"));
    // The row inserted meanwhile is in the snapshot exactly when it committed before the
    // consistent point.
    let during = read_stream(&url, "CDC")
        .into_iter()
        .find(|m| m.subject == "cdc.users.insert")
        .unwrap();
    let during_commit: Lsn = decode(&during.payload)["commit_lsn"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let lsn: Lsn = meta["lsn"].as_str().unwrap().parse().unwrap();
    let rows = if during_commit < lsn { 100001 } else { 100000 };
    assert_eq!(meta["row_count"].as_u64(), Some(rows));
    assert_eq!(meta["batch_count"].as_u64(), Some(rows.div_ceil(500)));
    let chunks: Vec<_> = read_stream(&url, "INIT")
        .into_iter()
        .filter(|m| m.subject.starts_with(&format!("init.snap.users.{id}.")))
        .collect();
    assert_eq!(chunks.len() as u64, rows.div_ceil(500));
    let first_chunk = decode(&chunks[0].payload);
    assert_eq!(first_chunk["operation"].as_str(), Some("snapshot"));
    assert_eq!(first_chunk["chunk"].as_u64(), Some(0));
    assert_eq!(first_chunk["lsn"], meta["lsn"]);
    assert_eq!(first_chunk["data"].as_array().unwrap().len(), 500);

    // After the first finished, a new request is accepted again.
    // Tables in public have one spelling, as in change subjects.
    let spelled = request(&url, "snapshot.request.public.users");
    assert_eq!(spelled["status"], "error", "{spelled}");
    let again = request(&url, "snapshot.request.users");
    assert_eq!(again["status"], "accepted", "{again}");
    drop(bridge);
}

#[test]
fn snapshot_plus_stream_rebuilds_the_table_exactly_under_concurrent_writes() {
    let env = TestEnv::start();
    setup_app_db(
        &env.pg,
        "CREATE TABLE items (id int PRIMARY KEY, v int, note text); \
         INSERT INTO items SELECT g, 0, 'seed' FROM generate_series(1, 30000) g",
        "",
    );
    let dir = TempDir::new("bridge");
    let bridge = BridgeProcess::spawn(
        bridge_command(&env.pg, &env.nats.url(), dir.path())
            .args(["--snapshot-chunk-rows", "1000"]),
    );
    bridge.wait_for_line("snapshot requests served", Duration::from_secs(60));
    let url = env.nats.url();

    // A writer changes the table before, during and after the snapshot.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = Arc::clone(&stop);
        let mut conn = env.pg.connect("app");
        std::thread::spawn(move || {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) && n < 20_000 {
                n += 1;
                let id = (n * 7919) % 30000 + 1;
                let sql = match n % 4 {
                    0 => format!("UPDATE items SET v = v + 1, note = 'u{n}' WHERE id = {id}"),
                    1 => format!("DELETE FROM items WHERE id = {id}"),
                    2 => format!("INSERT INTO items VALUES ({}, {n}, 'new') ON CONFLICT (id) DO UPDATE SET v = {n}", 30000 + n),
                    _ => format!("UPDATE items SET id = {} WHERE id = {id}", 100000 + n),
                };
                conn.execute(&sql).expect("writer statement");
            }
            n
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let r = request(&url, "snapshot.request.items");
    assert_eq!(r["status"], "accepted", "{r}");
    let id = r["snapshot_id"].as_str().unwrap().to_string();
    let meta = wait_for("snapshot meta", Duration::from_secs(120), || {
        read_stream(&url, "INIT")
            .into_iter()
            .find(|m| m.subject == "init.meta.items")
    });
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().unwrap();
    assert!(written > 100, "the writer ran ({written} statements)");

    // Wait until the bridge has confirmed everything written.
    testkit::wait_caught_up(&env.pg, "cdc_slot", Duration::from_secs(120));

    // Bootstrap as a consumer does.
    let meta = decode(&meta.payload);
    let lsn: Lsn = meta["lsn"].as_str().unwrap().parse().unwrap();
    let cdc_seq = meta["cdc_stream_seq"].as_u64().unwrap();
    let mut replica: BTreeMap<i64, (i64, String)> = BTreeMap::new();
    let row = |c: &BTreeMap<String, Mp>| {
        (
            c["v"].as_i64().unwrap(),
            c["note"].as_str().unwrap().to_string(),
        )
    };
    let mut chunks = 0;
    for m in read_stream(&url, "INIT") {
        if !m.subject.starts_with(&format!("init.snap.items.{id}.")) {
            continue;
        }
        chunks += 1;
        let c = decode(&m.payload);
        for r in c["data"].as_array().unwrap() {
            let r = map(r);
            replica.insert(r["id"].as_i64().unwrap(), row(&r));
        }
    }
    assert_eq!(chunks, meta["batch_count"].as_u64().unwrap());
    let mut applied = 0;
    let mut skipped = 0;
    for m in read_stream(&url, "CDC") {
        if m.seq <= cdc_seq {
            continue;
        }
        let ev = decode(&m.payload);
        let commit: Lsn = ev["commit_lsn"].as_str().unwrap().parse().unwrap();
        if commit < lsn {
            skipped += 1;
            continue;
        }
        applied += 1;
        match ev["operation"].as_str().unwrap() {
            "INSERT" => {
                let c = cols(&ev["columns"]);
                replica.insert(c["id"].as_i64().unwrap(), row(&c));
            }
            "UPDATE" => {
                let c = cols(&ev["columns"]);
                if let Some(old) = ev["old_columns"]
                    .as_array()
                    .map(|_| cols(&ev["old_columns"]))
                {
                    replica.remove(&old["id"].as_i64().unwrap());
                }
                replica.insert(c["id"].as_i64().unwrap(), row(&c));
            }
            "DELETE" => {
                let c = cols(&ev["columns"]);
                replica.remove(&c["id"].as_i64().unwrap());
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(applied > 0, "changes after the snapshot were applied");
    let source: BTreeMap<i64, (i64, String)> = env
        .pg
        .sql("app", "SELECT id, v, note FROM items")
        .rows
        .iter()
        .map(|r| {
            (
                r[0].as_deref().unwrap().parse().unwrap(),
                (
                    r[1].as_deref().unwrap().parse().unwrap(),
                    r[2].clone().unwrap(),
                ),
            )
        })
        .collect();
    assert_eq!(
        replica.len(),
        source.len(),
        "applied {applied}, skipped {skipped}"
    );
    assert!(
        replica == source,
        "the replica differs from the table (applied {applied}, skipped {skipped})"
    );
    drop(bridge);
}

/// The current value and revision of a key in the `schemas` bucket.
pub(crate) fn schema_entry(nats_url: &str, key: &str) -> Option<(u64, BTreeMap<String, Mp>)> {
    testkit::with_nats(nats_url, |client| async move {
        let js = async_nats::jetstream::new(client);
        let kv = js.get_key_value("schemas").await.ok()?;
        let e = kv.entry(key).await.ok()??;
        Some((e.revision, decode(&e.value)))
    })
}

/// Waits for a revision of `key` in the `schemas` bucket after `rev`; it and its column names.
fn next_schema_revision(nats_url: &str, key: &str, rev: u64) -> (u64, Vec<String>) {
    let (rev, doc) = wait_for("a new schema revision", Duration::from_secs(30), || {
        schema_entry(nats_url, key).filter(|(r, _)| *r > rev)
    });
    let names = doc["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| map(c)["name"].as_str().unwrap().to_string())
        .collect();
    (rev, names)
}

/// How many revisions the `schemas` bucket holds for a key.
fn schema_revisions(nats_url: &str, key: &str) -> usize {
    use futures_util::StreamExt;
    testkit::with_nats(nats_url, |client| async move {
        let js = async_nats::jetstream::new(client);
        let kv = js.get_key_value("schemas").await.unwrap();
        let mut h = kv.history(key).await.unwrap();
        let mut n = 0;
        while let Ok(Some(e)) = tokio::time::timeout(Duration::from_secs(2), h.next()).await {
            e.unwrap();
            n += 1;
        }
        n
    })
}

#[test]
fn schemas_are_in_kv_and_follow_alter_table() {
    let env = TestEnv::start();
    setup_app_db(
        &env.pg,
        "CREATE TABLE users (id int PRIMARY KEY, email varchar(200) NOT NULL, created timestamptz DEFAULT now()); \
         CREATE SCHEMA sales; CREATE TABLE sales.orders (a int, b int, PRIMARY KEY (b, a))",
        "",
    );
    let dir = TempDir::new("bridge");
    let bridge = BridgeProcess::spawn(&mut bridge_command(&env.pg, &env.nats.url(), dir.path()));
    bridge.wait_for_line("snapshot requests served", Duration::from_secs(60));
    let url = env.nats.url();

    let (rev, users) = wait_for("schema of users", Duration::from_secs(30), || {
        schema_entry(&url, "users")
    });
    assert_eq!(users["table"].as_str(), Some("users"));
    assert_eq!(users["schema"].as_str(), Some("public.users"));
    assert!(users["relation_id"].as_u64().unwrap() > 0);
    assert!(users["timestamp"].as_str().unwrap().ends_with('Z'));
    assert_eq!(users["primary_key"], Mp::Array(vec![Mp::from("id")]));
    let columns = users["columns"].as_array().unwrap();
    let col = |i: usize| map(&columns[i]);
    assert_eq!(col(1)["name"].as_str(), Some("email"));
    assert_eq!(col(1)["position"].as_u64(), Some(2));
    assert_eq!(col(1)["data_type"].as_str(), Some("character varying(200)"));
    assert_eq!(col(1)["is_nullable"], Mp::Boolean(false));
    assert_eq!(col(2)["column_default"].as_str(), Some("now()"));
    assert_eq!(col(2)["is_nullable"], Mp::Boolean(true));

    let (_, orders) = wait_for("schema of sales.orders", Duration::from_secs(30), || {
        schema_entry(&url, "sales.orders")
    });
    assert_eq!(
        orders["primary_key"],
        Mp::Array(vec![Mp::from("b"), Mp::from("a")])
    );

    // A change that does not alter the table writes no new revision; ALTER TABLE does.
    env.pg
        .sql("app", "INSERT INTO users (id, email) VALUES (1, 'a@x')");
    env.pg.sql("app", "ALTER TABLE users ADD COLUMN age int");
    env.pg.sql(
        "app",
        "INSERT INTO users (id, email, age) VALUES (2, 'b@x', 30)",
    );
    let (rev2, names) = next_schema_revision(&url, "users", rev);
    assert_eq!(names, ["id", "email", "created", "age"]);
    assert!(rev2 > rev);
    // The restarted bridge finds the same schema and writes nothing new either.
    drop(bridge);
    let bridge = BridgeProcess::spawn(&mut bridge_command(&env.pg, &env.nats.url(), dir.path()));
    bridge.wait_for_line("snapshot requests served", Duration::from_secs(60));
    env.pg.sql(
        "app",
        "INSERT INTO users (id, email, age) VALUES (3, 'c@x', 31)",
    );
    wait_for("the insert", Duration::from_secs(30), || {
        (testkit::stream_len(&url, "CDC") == 3).then_some(())
    });
    assert_eq!(
        schema_revisions(&url, "users"),
        2,
        "one revision at start, one after ALTER TABLE"
    );
    drop(bridge);
}

/// The schema writer's session ended under it (an administrator, an idle timeout, a server
/// restart): the next schema change is still written, on a new session.
#[test]
fn a_schema_change_is_written_after_the_schema_writers_session_ended() {
    let env = TestEnv::start();
    setup_app_db(
        &env.pg,
        "CREATE TABLE users (id int PRIMARY KEY, email text)",
        "",
    );
    let dir = TempDir::new("bridge");
    let bridge = BridgeProcess::spawn(&mut bridge_command(&env.pg, &env.nats.url(), dir.path()));
    bridge.wait_for_line("snapshot requests served", Duration::from_secs(60));
    let url = env.nats.url();
    let (rev, _) = wait_for("schema of users", Duration::from_secs(30), || {
        schema_entry(&url, "users")
    });

    // The bridge's one SQL session besides its replication session and the slot monitor's.
    let killed = env.pg.sql(
        "app",
        "SELECT pg_terminate_backend(pid) AS killed FROM pg_stat_activity \
         WHERE application_name = 'pgbridge' AND backend_type = 'client backend'",
    );
    assert_eq!(killed.rows.len(), 1, "{killed:?}");
    assert_eq!(killed.get(0, "killed"), Some("t"));

    env.pg.sql("app", "ALTER TABLE users ADD COLUMN age int");
    env.pg.sql("app", "INSERT INTO users VALUES (1, 'a@x', 30)");
    let (_, names) = next_schema_revision(&url, "users", rev);
    assert_eq!(names, ["id", "email", "age"]);
    let log = bridge.log();
    assert!(!log.contains("reading the schema of"), "{log}");
}

#[test]
fn chunks_stay_under_max_payload_whatever_the_row_count() {
    let env = TestEnv::start();
    setup_app_db(
        &env.pg,
        "CREATE TABLE wide (id int PRIMARY KEY, pad text); \
         INSERT INTO wide SELECT g, repeat(md5(g::text), 250) FROM generate_series(1, 400) g",
        "",
    );
    let dir = TempDir::new("bridge");
    let bridge = BridgeProcess::spawn(&mut bridge_command(&env.pg, &env.nats.url(), dir.path()));
    bridge.wait_for_line("snapshot requests served", Duration::from_secs(60));
    let url = env.nats.url();
    // 400 rows of 8 KB: one chunk by row count (10 000), several by size (1 MB limit).
    let r = request(&url, "snapshot.request.wide");
    assert_eq!(r["status"], "accepted", "{r}");
    let meta = wait_for("snapshot meta", Duration::from_secs(60), || {
        read_stream(&url, "INIT")
            .into_iter()
            .find(|m| m.subject == "init.meta.wide")
    });
    let meta = decode(&meta.payload);
    assert_eq!(meta["row_count"].as_u64(), Some(400));
    let chunks: Vec<_> = read_stream(&url, "INIT")
        .into_iter()
        .filter(|m| m.subject.starts_with("init.snap.wide."))
        .collect();
    assert!(chunks.len() > 1, "split by size: {} chunks", chunks.len());
    assert_eq!(chunks.len() as u64, meta["batch_count"].as_u64().unwrap());
    assert!(chunks.iter().all(|c| c.payload.len() <= 1024 * 1024));
    let rows: usize = chunks
        .iter()
        .map(|c| decode(&c.payload)["data"].as_array().unwrap().len())
        .sum();
    assert_eq!(rows, 400, "{}", bridge.log());
}

/// The `init.meta.{token}` messages of the INIT stream, in stream order.
fn metas(nats_url: &str, token: &str) -> Vec<testkit::StoredMessage> {
    let subject = format!("init.meta.{token}");
    read_stream(nats_url, "INIT")
        .into_iter()
        .filter(|m| m.subject == subject)
        .collect()
}

/// Waits until the INIT stream holds `n` metas of `token`; the last one.
fn wait_for_metas(nats_url: &str, token: &str, n: usize) -> testkit::StoredMessage {
    wait_for(
        &format!("{n} messages on init.meta.{token}"),
        Duration::from_secs(120),
        || {
            let m = metas(nats_url, token);
            (m.len() >= n).then(|| m.last().cloned()).flatten()
        },
    )
}

fn keys(m: &BTreeMap<String, Mp>) -> Vec<&str> {
    m.keys().map(String::as_str).collect()
}

#[test]
fn a_failed_snapshot_publishes_its_error_to_the_meta_subject_and_streaming_goes_on() {
    let pg = testkit::PgServer::start();
    setup_app_db(
        &pg,
        "CREATE TABLE docs (id int PRIMARY KEY, body text); \
         INSERT INTO docs SELECT g, 'small ' || g FROM generate_series(1, 40) g; \
         INSERT INTO docs VALUES (41, repeat('x', 6000)); \
         CREATE TABLE pairs (id int PRIMARY KEY, pad text); \
         INSERT INTO pairs SELECT g, repeat('p', CASE WHEN g % 2 = 1 THEN 1950 ELSE 2040 END) \
           FROM generate_series(1, 4) g",
        "",
    );
    let conf_dir = TempDir::new("natsconf");
    let conf = conf_dir.path().join("small.conf");
    std::fs::write(&conf, "max_payload: 4096\n").unwrap();
    let nats = testkit::NatsServer::start_with_args(&["-c", conf.to_str().unwrap()]);
    let url = nats.url();
    let dir = TempDir::new("bridge");
    let bridge = BridgeProcess::spawn(bridge_command(&pg, &url, dir.path()).args([
        "--snapshot-chunk-rows",
        "10",
        "--snapshot-cooldown-secs",
        "0",
    ]));
    bridge.wait_for_line("snapshot requests served", Duration::from_secs(60));

    let r = request(&url, "snapshot.request.docs");
    assert_eq!(r["status"], "accepted", "{r}");
    let id = r["snapshot_id"].as_str().unwrap().to_string();
    let failure = wait_for_metas(&url, "docs", 1);
    assert_eq!(
        failure.msg_id.as_deref(),
        Some(format!("meta-{id}").as_str())
    );
    let doc = decode(&failure.payload);
    assert_eq!(
        keys(&doc),
        ["error", "schema", "snapshot_id", "table", "timestamp"],
        "no position fields in a failure: {doc:?}"
    );
    assert_eq!(doc["snapshot_id"].as_str(), Some(id.as_str()));
    assert_eq!(doc["table"].as_str(), Some("docs"));
    assert_eq!(doc["schema"].as_str(), Some("public"));
    assert!(doc["timestamp"].as_str().unwrap().ends_with('Z'));
    let error = doc["error"].as_str().unwrap();
    assert!(
        error.contains("row 41 of public.docs (first column id = 41)"),
        "{error}"
    );
    assert!(
        error.contains("exceeds the NATS server's max_payload of 4096 bytes"),
        "{error}"
    );
    let size: usize = error
        .split(" encodes to ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the error names the row's size: {error}"));
    assert!(size > 6000, "{error}");
    bridge.wait_for_line(
        &format!("snapshot {id} of public.docs failed"),
        Duration::from_secs(10),
    );

    // Rows that fit one by one but not two together go in chunks of their own.
    let r = request(&url, "snapshot.request.pairs");
    assert_eq!(r["status"], "accepted", "{r}");
    let meta = decode(&wait_for_metas(&url, "pairs", 1).payload);
    assert!(!meta.contains_key("error"), "{meta:?}");
    assert_eq!(meta["row_count"].as_u64(), Some(4));
    assert_eq!(meta["batch_count"].as_u64(), Some(4));
    let chunks: Vec<_> = read_stream(&url, "INIT")
        .into_iter()
        .filter(|m| m.subject.starts_with("init.snap.pairs."))
        .collect();
    assert_eq!(chunks.len(), 4);
    assert!(chunks.iter().all(|c| c.payload.len() <= 4096));

    // Streaming goes on, and the table is free for the next snapshot.
    pg.sql("app", "INSERT INTO docs VALUES (100, 'after')");
    wait_for(
        "the insert after the failure",
        Duration::from_secs(60),
        || {
            read_stream(&url, "CDC")
                .iter()
                .any(|m| m.subject == "cdc.docs.insert")
                .then_some(())
        },
    );
    let again = request(&url, "snapshot.request.docs");
    assert_eq!(again["status"], "accepted", "{again}");
    let second = decode(&wait_for_metas(&url, "docs", 2).payload);
    assert_eq!(
        second["snapshot_id"].as_str(),
        again["snapshot_id"].as_str()
    );
    assert!(second.contains_key("error"), "{second:?}");

    // Once the row is gone, a restart with --snapshot-on-start replaces the failed snapshot.
    pg.sql("app", "DELETE FROM docs WHERE id = 41");
    testkit::wait_caught_up(&pg, "cdc_slot", Duration::from_secs(60));
    drop(bridge);
    let bridge =
        BridgeProcess::spawn(bridge_command(&pg, &url, dir.path()).args(["--snapshot-on-start"]));
    bridge.wait_for_line(
        "the last snapshot of public.docs in stream 'INIT' failed; taking a new one",
        Duration::from_secs(60),
    );
    let meta = decode(&wait_for_metas(&url, "docs", 3).payload);
    assert!(!meta.contains_key("error"), "{meta:?}\n{}", bridge.log());
    assert_eq!(meta["row_count"].as_u64(), Some(41), "{meta:?}");
    drop(bridge);
}

#[test]
fn failures_use_the_configured_format_and_a_bridge_without_postgresql_stops_serving() {
    let mut env = TestEnv::start();
    setup_app_db(&env.pg, "CREATE TABLE users (id int PRIMARY KEY)", "");
    let url = env.nats.url();
    let dir = TempDir::new("bridge");
    let bridge = BridgeProcess::spawn(bridge_command(&env.pg, &url, dir.path()).args([
        "--format",
        "json",
        "--snapshot-cooldown-secs",
        "0",
    ]));
    bridge.wait_for_line("snapshot requests served", Duration::from_secs(60));

    // The COPY fails: the failure document is JSON, like every message of this bridge.
    env.pg
        .sql("app", "REVOKE SELECT ON users FROM bridge_reader");
    let r = request(&url, "snapshot.request.users");
    assert_eq!(r["status"], "accepted", "{r}");
    let failure = wait_for_metas(&url, "users", 1);
    let doc: serde_json::Value = serde_json::from_slice(&failure.payload).expect("JSON");
    assert_eq!(doc["snapshot_id"], r["snapshot_id"]);
    let error = doc["error"].as_str().unwrap();
    assert!(error.contains("permission denied"), "{error}");
    assert!(error.contains("request the snapshot again"), "{error}");
    assert!(
        doc.get("lsn").is_none() && doc.get("cdc_stream_seq").is_none(),
        "{doc}"
    );
    env.pg.sql("app", "GRANT SELECT ON users TO bridge_reader");

    // PostgreSQL down: the bridge no longer streams from the slot, so it does not answer.
    env.pg.stop(testkit::StopMode::Fast);
    bridge.wait_for_line(
        "snapshot requests no longer served",
        Duration::from_secs(30),
    );
    let err = testkit::with_nats(&url, |client| async move {
        client
            .request("snapshot.request.users".to_string(), "".into())
            .await
            .map(|_| ())
            .unwrap_err()
            .to_string()
    });
    assert!(err.contains("no responders"), "{err}");

    // Back again: the bridge streams and serves again, and the snapshot succeeds.
    env.pg.start_again();
    let r = wait_for("the request served again", Duration::from_secs(60), || {
        testkit::with_nats(&url, |client| async move {
            let reply = client
                .request("snapshot.request.users".to_string(), "".into())
                .await
                .ok()?;
            Some(serde_json::from_slice::<serde_json::Value>(&reply.payload).unwrap())
        })
        .or_else(|| {
            std::thread::sleep(Duration::from_millis(300));
            None
        })
    });
    assert_eq!(r["status"], "accepted", "{r}");
    let meta = wait_for_metas(&url, "users", 2);
    let meta: serde_json::Value = serde_json::from_slice(&meta.payload).expect("JSON");
    assert_eq!(meta["row_count"], 0, "{meta}\n{}", bridge.log());
    drop(bridge);
}

#[test]
fn snapshots_hold_exactly_the_rows_and_columns_the_publication_streams() {
    let env = TestEnv::start();
    if !env.pg.at_least(
        15,
        "snapshots_hold_exactly_the_rows_and_columns_the_publication_streams",
        "publication row filters and column lists",
    ) {
        return;
    }
    setup_app_db(
        &env.pg,
        "CREATE TABLE evens (id int PRIMARY KEY, v text, secret text); \
         CREATE TABLE evens_kid (extra int) INHERITS (evens); \
         INSERT INTO evens SELECT g, 'v' || g, 'hidden' FROM generate_series(1, 100) g; \
         INSERT INTO evens_kid VALUES (1000, 'kid', 'hidden', 1), (1001, 'odd kid', 'hidden', 2)",
        "evens",
    );
    // FOR TABLE without ONLY takes the inheritance child in too, as a table of its own with
    // the same column list and filter.
    env.pg.sql(
        "app",
        "ALTER PUBLICATION cdc_pub SET TABLE evens (id, v) WHERE (id % 2 = 0)",
    );
    let url = env.nats.url();
    let dir = TempDir::new("bridge");
    let bridge = BridgeProcess::spawn(
        bridge_command(&env.pg, &url, dir.path()).args(["--snapshot-chunk-rows", "20"]),
    );
    bridge.wait_for_line("snapshot requests served", Duration::from_secs(60));

    let rows_of = |token: &str, id: &str| -> Vec<BTreeMap<String, Mp>> {
        read_stream(&url, "INIT")
            .into_iter()
            .filter(|m| m.subject.starts_with(&format!("init.snap.{token}.{id}.")))
            .flat_map(|m| {
                decode(&m.payload)["data"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(map)
                    .collect::<Vec<_>>()
            })
            .collect()
    };

    let r = request(&url, "snapshot.request.evens");
    assert_eq!(r["status"], "accepted", "{r}");
    let meta = decode(&wait_for_metas(&url, "evens", 1).payload);
    assert!(!meta.contains_key("error"), "{meta:?}");
    assert_eq!(meta["row_count"].as_u64(), Some(50), "{meta:?}");
    let rows = rows_of("evens", r["snapshot_id"].as_str().unwrap());
    let ids: Vec<i64> = rows.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, (2..=100).step_by(2).collect::<Vec<i64>>());
    assert!(rows.iter().all(|r| keys(r) == ["id", "v"]), "{:?}", rows[0]);
    bridge.wait_for_line(
        "publication row filter (((id % 2) = 0))",
        Duration::from_secs(10),
    );

    // The child is snapshotted on its own, with the same filter.
    let r = request(&url, "snapshot.request.evens_kid");
    assert_eq!(r["status"], "accepted", "{r}");
    wait_for_metas(&url, "evens_kid", 1);
    let kid = rows_of("evens_kid", r["snapshot_id"].as_str().unwrap());
    assert_eq!(kid.len(), 1, "{kid:?}");
    assert_eq!(kid[0]["id"].as_i64(), Some(1000));

    // The stream applies the same filter: an odd row is not streamed, an even one is.
    env.pg.sql(
        "app",
        "INSERT INTO evens VALUES (101, 'odd', 'x'), (102, 'even', 'x')",
    );
    testkit::wait_caught_up(&env.pg, "cdc_slot", Duration::from_secs(60));
    let inserted: Vec<i64> = read_stream(&url, "CDC")
        .iter()
        .filter(|m| m.subject == "cdc.evens.insert")
        .map(|m| cols(&decode(&m.payload)["columns"])["id"].as_i64().unwrap())
        .collect();
    assert_eq!(inserted, [102]);
    drop(bridge);
}

#[test]
fn snapshot_on_start_fills_in_only_tables_without_a_snapshot() {
    let env = TestEnv::start();
    setup_app_db(
        &env.pg,
        "CREATE TABLE a (id int PRIMARY KEY); INSERT INTO a VALUES (1), (2), (3); \
         CREATE TABLE b (id int PRIMARY KEY); INSERT INTO b VALUES (1), (2)",
        "",
    );
    let url = env.nats.url();
    let dir = TempDir::new("bridge");
    let bridge = BridgeProcess::spawn(&mut bridge_command(&env.pg, &url, dir.path()));
    bridge.wait_for_line("snapshot requests served", Duration::from_secs(60));
    assert_eq!(request(&url, "snapshot.request.a")["status"], "accepted");
    wait_for_metas(&url, "a", 1);
    drop(bridge);

    // The environment variable turns it on; only b lacks a snapshot.
    let bridge = BridgeProcess::spawn(
        bridge_command(&env.pg, &url, dir.path()).env("BRIDGE_SNAPSHOT_ON_START", "true"),
    );
    bridge.wait_for_line(
        "stream 'INIT' already holds a snapshot of public.a",
        Duration::from_secs(60),
    );
    bridge.wait_for_line(
        "stream 'INIT' holds no snapshot of public.b",
        Duration::from_secs(60),
    );
    let meta = decode(&wait_for_metas(&url, "b", 1).payload);
    assert_eq!(meta["row_count"].as_u64(), Some(2), "{meta:?}");
    bridge.wait_for_line("of public.b: 2 rows in 1 chunks", Duration::from_secs(10));
    assert_eq!(metas(&url, "a").len(), 1);
    drop(bridge);

    // Both have one now: a restart takes none.
    let before = testkit::stream_len(&url, "INIT");
    let bridge = BridgeProcess::spawn(
        bridge_command(&env.pg, &url, dir.path()).args(["--snapshot-on-start"]),
    );
    bridge.wait_for_line(
        "stream 'INIT' already holds a snapshot of public.b",
        Duration::from_secs(60),
    );
    assert!(bridge
        .log()
        .contains("already holds a snapshot of public.a"));
    assert_eq!(testkit::stream_len(&url, "INIT"), before);
    drop(bridge);
}

#[test]
fn a_snapshot_stopped_by_shutdown_reports_it() {
    let env = TestEnv::start();
    setup_app_db(
        &env.pg,
        "CREATE TABLE big (id int PRIMARY KEY, v text); \
         INSERT INTO big SELECT g, 'row ' || g FROM generate_series(1, 200000) g",
        "",
    );
    let url = env.nats.url();
    let dir = TempDir::new("bridge");
    // Small chunks, each waiting for its PubAck: the snapshot runs far longer than it takes
    // the test to see its first chunk and stop the bridge.
    let mut bridge = BridgeProcess::spawn(
        bridge_command(&env.pg, &url, dir.path()).args(["--snapshot-chunk-rows", "50"]),
    );
    bridge.wait_for_line("snapshot requests served", Duration::from_secs(60));
    let r = request(&url, "snapshot.request.big");
    assert_eq!(r["status"], "accepted", "{r}");
    wait_for("the first chunk", Duration::from_secs(60), || {
        (testkit::stream_len(&url, "INIT") > 0).then_some(())
    });
    assert_eq!(
        bridge.terminate(Duration::from_secs(60)),
        Some(0),
        "{}",
        bridge.log()
    );

    let metas = metas(&url, "big");
    assert_eq!(metas.len(), 1, "{}", bridge.log());
    let doc = decode(&metas[0].payload);
    assert_eq!(doc["snapshot_id"].as_str(), r["snapshot_id"].as_str());
    let error = doc["error"]
        .as_str()
        .unwrap_or_else(|| panic!("a failure: {doc:?}"));
    assert!(
        error.contains("the bridge shut down before the snapshot finished"),
        "{error}"
    );
    let chunks = testkit::stream_len(&url, "INIT") - 1;
    assert!(chunks < 200000 / 50, "stopped part way: {chunks} chunks");
}
