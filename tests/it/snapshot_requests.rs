//! Who may ask for a snapshot and where the answer goes, with real servers: replies only to
//! inbox subjects, only the bridge holding the slot answers, tables added to the publication
//! at run time, the cap and the cooldown, the NATS connection retried, and
//! `POST /snapshots/{table}`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rmpv::Value as Mp;
use testkit::{
    bridge_command, free_port, read_stream, setup_app_db, stream_len, wait_for, BridgeProcess,
    NatsServer, TempDir, TestEnv,
};

/// A core NATS request; the JSON reply, or the client's error (e.g. no responders).
fn try_request(nats_url: &str, subject: &str) -> Result<serde_json::Value, String> {
    testkit::with_nats(nats_url, |client| async move {
        let reply = tokio::time::timeout(
            Duration::from_secs(10),
            client.request(subject.to_string(), "".into()),
        )
        .await
        .map_err(|_| "no reply in time".to_string())?
        .map_err(|e| e.to_string())?;
        Ok(serde_json::from_slice(&reply.payload).expect("JSON reply"))
    })
}

fn request(nats_url: &str, subject: &str) -> serde_json::Value {
    try_request(nats_url, subject).unwrap_or_else(|e| panic!("request {subject}: {e}"))
}

/// Publishes a request with `reply` as its reply subject, as a client that chooses it does.
fn publish_with_reply(nats_url: &str, subject: &str, reply: &str) {
    testkit::with_nats(nats_url, |client| async move {
        client
            .publish_with_reply(subject.to_string(), reply.to_string(), "".into())
            .await
            .unwrap();
        client.flush().await.unwrap();
    })
}

/// Sends a request to an inbox of our own and collects every reply for `window`.
fn replies(nats_url: &str, subject: &str, window: Duration) -> Vec<serde_json::Value> {
    testkit::with_nats(nats_url, |client| async move {
        let inbox = client.new_inbox();
        let mut sub = client.subscribe(inbox.clone()).await.unwrap();
        client
            .publish_with_reply(subject.to_string(), inbox, "".into())
            .await
            .unwrap();
        client.flush().await.unwrap();
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + window;
        while let Ok(Some(m)) = tokio::time::timeout_at(deadline, sub.next()).await {
            out.push(serde_json::from_slice(&m.payload).expect("JSON reply"));
        }
        out
    })
}

fn decode(payload: &[u8]) -> BTreeMap<String, Mp> {
    rmpv::decode::read_value(&mut &payload[..])
        .expect("MessagePack")
        .as_map()
        .expect("a map")
        .iter()
        .map(|(k, v)| (k.as_str().unwrap().to_string(), v.clone()))
        .collect()
}

/// The `init.meta.{token}` messages of the INIT stream.
fn metas(nats_url: &str, token: &str) -> Vec<testkit::StoredMessage> {
    let subject = format!("init.meta.{token}");
    read_stream(nats_url, "INIT")
        .into_iter()
        .filter(|m| m.subject == subject)
        .collect()
}

/// Waits for the meta of snapshot `id` of `token`.
fn wait_for_meta(nats_url: &str, token: &str, id: &str) -> BTreeMap<String, Mp> {
    wait_for(
        &format!("the meta of snapshot {id}"),
        Duration::from_secs(120),
        || {
            metas(nats_url, token)
                .into_iter()
                .map(|m| decode(&m.payload))
                .find(|m| m["snapshot_id"].as_str() == Some(id))
        },
    )
}

/// Waits until the bridge logged the end of snapshot `id` (its table is free again).
fn wait_finished(bridge: &BridgeProcess, id: &str) {
    bridge.wait_for_line(&format!("snapshot {id} of "), Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(200));
}

fn error_of(reply: &serde_json::Value) -> &str {
    assert_eq!(reply["status"], "error", "{reply}");
    reply["error"].as_str().unwrap()
}

/// An HTTP answer: status, headers (lower-case names), body.
pub(super) fn http_post(port: u16, path: &str, token: Option<&str>) -> (u16, String, String) {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the HTTP port");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_string())
}

/// Servers, a `users` table of 10 rows, and a bridge (no snapshot cooldown, `extra`
/// arguments) that serves snapshot requests.
fn users_and_a_bridge(extra: &[&str]) -> (TestEnv, TempDir, BridgeProcess) {
    let env = TestEnv::start();
    setup_app_db(
        &env.pg,
        "CREATE TABLE users (id int PRIMARY KEY, name text); \
         INSERT INTO users SELECT g, 'u' || g FROM generate_series(1, 10) g",
        "",
    );
    let dir = TempDir::new("bridge");
    let bridge = BridgeProcess::spawn(
        bridge_command(&env.pg, &env.nats.url(), dir.path())
            .args(["--snapshot-cooldown-secs", "0"])
            .args(extra),
    );
    bridge.wait_for_line("snapshot requests served", Duration::from_secs(60));
    (env, dir, bridge)
}

fn metric(port: u16, name: &str) -> f64 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn requests_with_a_reply_subject_outside_the_inbox_prefix_are_neither_answered_nor_served() {
    let port = free_port();
    let (env, _dir, bridge) = users_and_a_bridge(&["--port", &port.to_string()]);
    let url = env.nats.url();
    env.pg
        .sql("app", "INSERT INTO users VALUES (100, 'streamed')");
    wait_for("the insert", Duration::from_secs(30), || {
        (stream_len(&url, "CDC") == 1).then_some(())
    });
    let cdc_before = read_stream(&url, "CDC");

    // A client subscribed to `_INBOX.>` would see any reply the bridge sent to these.
    let bad = [
        "cdc.users.insert",
        "cdc.users.insert",
        "$KV.schemas.x",
        "$JS.API.STREAM.PURGE.CDC",
    ];
    for reply in bad {
        publish_with_reply(&url, "snapshot.request.users", reply);
    }
    let warning = bridge.wait_for_line("ignored: its reply subject", Duration::from_secs(10));
    assert!(warning.contains("WARN"), "{warning}");
    assert!(warning.contains("\"cdc.users.insert\""), "{warning}");
    assert!(warning.contains("--snapshot-reply-prefix"), "{warning}");
    wait_for(
        "the ignored requests counted",
        Duration::from_secs(10),
        || {
            (metric(port, "bridge_snapshot_requests_ignored_total") == bad.len() as f64)
                .then_some(())
        },
    );
    // One warning for the burst: a flood cannot fill the log.
    std::thread::sleep(Duration::from_millis(500));
    let log = bridge.log();
    assert_eq!(
        log.matches("ignored: its reply subject").count(),
        1,
        "{log}"
    );

    // Nothing stored, nothing purged, no snapshot.
    let cdc_after = read_stream(&url, "CDC");
    assert_eq!(cdc_after.len(), cdc_before.len());
    assert_eq!(cdc_after[0].seq, cdc_before[0].seq);
    assert_eq!(cdc_after[0].payload, cdc_before[0].payload);
    assert_eq!(stream_len(&url, "INIT"), 0, "{log}");
    let kv_x = testkit::with_nats(&url, |client| async move {
        let js = async_nats::jetstream::new(client);
        let kv = js.get_key_value("schemas").await.unwrap();
        kv.entry("x").await.unwrap()
    });
    assert!(kv_x.is_none(), "a reply was stored in the schemas bucket");
    assert!(!log.contains("snapshot requested"), "{log}");
    assert!(!log.contains("of public.users:"), "{log}");

    // A request from a client (reply to its inbox) is served.
    let r = request(&url, "snapshot.request.users");
    assert_eq!(r["status"], "accepted", "{r}");
    let id = r["snapshot_id"].as_str().unwrap();
    let meta = wait_for_meta(&url, "users", id);
    assert_eq!(meta["row_count"].as_u64(), Some(11));
    wait_finished(&bridge, id);
    // Without a reply subject, a request is served and answered by the meta alone.
    testkit::with_nats(&url, |client| async move {
        client
            .publish("snapshot.request.users", "".into())
            .await
            .unwrap();
        client.flush().await.unwrap();
    });
    let line = bridge.wait_for_line("without a reply subject", Duration::from_secs(10));
    assert!(line.contains("started"), "{line}");
    wait_for("a second meta", Duration::from_secs(60), || {
        (metas(&url, "users").len() == 2).then_some(())
    });
    drop(bridge);
}

#[test]
fn only_the_bridge_holding_the_slot_answers() {
    let env = TestEnv::start();
    setup_app_db(
        &env.pg,
        "CREATE TABLE a (id int PRIMARY KEY); INSERT INTO a VALUES (1), (2); \
         CREATE TABLE b (id int PRIMARY KEY); INSERT INTO b VALUES (1)",
        "",
    );
    let url = env.nats.url();
    let dir = TempDir::new("bridge");
    let mut active = BridgeProcess::spawn(&mut bridge_command(&env.pg, &url, dir.path()));
    active.wait_for_line("snapshot requests served", Duration::from_secs(60));

    let standby_dir = TempDir::new("bridge");
    let standby = BridgeProcess::spawn(&mut bridge_command(&env.pg, &url, standby_dir.path()));
    standby.wait_for_line("is active for PID", Duration::from_secs(60));
    // Its snapshot service is connected and would have subscribed by now if it served.
    std::thread::sleep(Duration::from_secs(2));

    for table in ["a", "b"] {
        let got = replies(
            &url,
            &format!("snapshot.request.{table}"),
            Duration::from_secs(2),
        );
        assert_eq!(got.len(), 1, "one answer: {got:?}");
        assert_eq!(got[0]["status"], "accepted", "{got:?}");
        wait_for_meta(&url, table, got[0]["snapshot_id"].as_str().unwrap());
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(metas(&url, "a").len(), 1);
    assert_eq!(metas(&url, "b").len(), 1);
    let log = standby.log();
    assert!(!log.contains("streaming started"), "{log}");
    assert!(!log.contains("snapshot requests served"), "{log}");
    assert!(
        !log.contains("of public.a:"),
        "the standby took no snapshot: {log}"
    );

    // The active one stops: the standby takes the slot and serves from then on.
    assert_eq!(active.terminate(Duration::from_secs(60)), Some(0));
    standby.wait_for_line("streaming started", Duration::from_secs(60));
    standby.wait_for_line("snapshot requests served", Duration::from_secs(30));
    let got = replies(&url, "snapshot.request.b", Duration::from_secs(2));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["status"], "accepted", "{got:?}");
    wait_for_meta(&url, "b", got[0]["snapshot_id"].as_str().unwrap());
    assert_eq!(metas(&url, "b").len(), 2);
    drop(standby);
}

#[test]
fn a_table_added_to_the_publication_at_run_time_can_be_snapshotted() {
    let env = TestEnv::start();
    setup_app_db(
        &env.pg,
        "CREATE TABLE users (id int PRIMARY KEY); \
         CREATE TABLE late (id int PRIMARY KEY, v text); \
         INSERT INTO late SELECT g, 'v' || g FROM generate_series(1, 25) g",
        "users",
    );
    let url = env.nats.url();
    let dir = TempDir::new("bridge");
    let bridge = BridgeProcess::spawn(&mut bridge_command(&env.pg, &url, dir.path()));
    bridge.wait_for_line("snapshot requests served", Duration::from_secs(60));

    let r = request(&url, "snapshot.request.late");
    assert_eq!(r["reason"], "unknown_table", "{r}");
    let error = error_of(&r);
    assert!(error.contains("unknown table public.late"), "{error}");
    assert!(!error.contains("users"), "no list of tables: {error}");
    let logged = bridge.wait_for_line(
        "snapshot request on \"snapshot.request.late\" refused",
        Duration::from_secs(5),
    );
    assert!(logged.contains("unknown table public.late"), "{logged}");

    env.pg
        .sql("app", "ALTER PUBLICATION cdc_pub ADD TABLE late");
    // The publication is read again at most every few seconds.
    let started = Instant::now();
    let accepted = wait_for("the new table accepted", Duration::from_secs(30), || {
        let r = request(&url, "snapshot.request.late");
        if r["status"] == "accepted" {
            return Some(r);
        }
        assert_eq!(r["reason"], "unknown_table", "{r}");
        std::thread::sleep(Duration::from_millis(500));
        None
    });
    let meta = wait_for_meta(&url, "late", accepted["snapshot_id"].as_str().unwrap());
    assert_eq!(meta["row_count"].as_u64(), Some(25), "{}", bridge.log());
    bridge.wait_for_line(
        "public.late was added to publication",
        Duration::from_secs(5),
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    // Its changes stream too.
    env.pg.sql("app", "INSERT INTO late VALUES (26, 'new')");
    wait_for(
        "the change of the new table",
        Duration::from_secs(30),
        || {
            read_stream(&url, "CDC")
                .iter()
                .any(|m| m.subject == "cdc.late.insert")
                .then_some(())
        },
    );
    drop(bridge);
}

#[test]
fn the_cap_and_the_cooldown_refuse_with_the_reason_and_no_other_table_names() {
    let env = TestEnv::start();
    setup_app_db(
        &env.pg,
        "CREATE TABLE big (id int PRIMARY KEY, v text); \
         INSERT INTO big SELECT g, 'row ' || g FROM generate_series(1, 200000) g; \
         CREATE TABLE small (id int PRIMARY KEY); INSERT INTO small VALUES (1); \
         CREATE TABLE other (id int PRIMARY KEY)",
        "",
    );
    let url = env.nats.url();
    let dir = TempDir::new("bridge");
    // Small chunks, each waiting for its PubAck: the big snapshot runs for a while.
    let bridge = BridgeProcess::spawn(bridge_command(&env.pg, &url, dir.path()).args([
        "--snapshot-max-concurrent",
        "1",
        "--snapshot-cooldown-secs",
        "60",
        "--snapshot-chunk-rows",
        "50",
    ]));
    bridge.wait_for_line("snapshot requests served", Duration::from_secs(60));

    // Cooldown: a finished snapshot of small is not taken again within 60 s.
    let r = request(&url, "snapshot.request.small");
    assert_eq!(r["status"], "accepted", "{r}");
    let id = r["snapshot_id"].as_str().unwrap();
    wait_for_meta(&url, "small", id);
    wait_finished(&bridge, id);
    let cool = request(&url, "snapshot.request.small");
    assert_eq!(cool["reason"], "cooldown", "{cool}");
    let left = cool["retry_after_secs"].as_u64().unwrap();
    assert!((1..=60).contains(&left), "{cool}");
    assert!(
        error_of(&cool).contains(&format!("try again in {left} s")),
        "{cool}"
    );

    // Cap: one at a time.
    let r = request(&url, "snapshot.request.big");
    assert_eq!(r["status"], "accepted", "{r}");
    let busy = request(&url, "snapshot.request.other");
    assert_eq!(busy["reason"], "busy", "{busy}");
    assert!(error_of(&busy).contains("try again"), "{busy}");
    let dup = request(&url, "snapshot.request.big");
    assert_eq!(dup["reason"], "in_progress", "{dup}");
    let unknown = request(&url, "snapshot.request.nosuch");
    assert_eq!(unknown["reason"], "unknown_table", "{unknown}");
    let malformed = request(&url, "snapshot.request.a.b.c");
    assert_eq!(malformed["reason"], "malformed", "{malformed}");

    // Each refusal names the requested table at most: never the others.
    for (reply, own) in [
        (&cool, "small"),
        (&busy, "other"),
        (&dup, "big"),
        (&unknown, "nosuch"),
        (&malformed, "a.b.c"),
    ] {
        let text = error_of(reply);
        for name in ["big", "small", "other"] {
            assert!(
                name == own || !text.contains(name),
                "{name} named in the refusal for {own}: {text}"
            );
        }
    }
    assert!(metas(&url, "other").is_empty());
    drop(bridge);
}

#[test]
fn the_snapshot_service_comes_up_when_nats_starts_after_the_bridge() {
    let pg = testkit::PgServer::start();
    setup_app_db(
        &pg,
        "CREATE TABLE users (id int PRIMARY KEY); INSERT INTO users VALUES (1), (2), (3)",
        "",
    );
    let nats_port = free_port();
    let url = format!("nats://127.0.0.1:{nats_port}");
    let dir = TempDir::new("bridge");
    let bridge = BridgeProcess::spawn(&mut bridge_command(&pg, &url, dir.path()));
    let line = bridge.wait_for_line("snapshot service:", Duration::from_secs(60));
    assert!(line.contains("retrying"), "{line}");
    assert!(!bridge.log().contains("snapshots unavailable"));

    let nats = NatsServer::start_on_port(nats_port);
    assert_eq!(nats.url(), url);
    bridge.wait_for_line("snapshot requests served", Duration::from_secs(60));
    let r = request(&url, "snapshot.request.users");
    assert_eq!(r["status"], "accepted", "{r}");
    let meta = wait_for_meta(&url, "users", r["snapshot_id"].as_str().unwrap());
    assert_eq!(meta["row_count"].as_u64(), Some(3));
    drop(bridge);
}

#[test]
fn post_snapshots_needs_the_admin_token_and_follows_the_same_rules() {
    let env = TestEnv::start();
    setup_app_db(
        &env.pg,
        "CREATE TABLE users (id int PRIMARY KEY); INSERT INTO users VALUES (1), (2); \
         CREATE SCHEMA sales; CREATE TABLE sales.orders (id int PRIMARY KEY)",
        "",
    );
    let url = env.nats.url();
    let dir = TempDir::new("bridge");
    let port = free_port();
    let bridge = BridgeProcess::spawn(
        bridge_command(&env.pg, &url, dir.path())
            .args(["--port", &port.to_string()])
            .env("BRIDGE_ADMIN_TOKEN", "s3cret"),
    );
    bridge.wait_for_line("snapshot requests served", Duration::from_secs(60));

    let (status, _, body) = http_post(port, "/snapshots/users", None);
    assert_eq!(status, 401, "{body}");
    let (status, _, body) = http_post(port, "/snapshots/users", Some("wrong"));
    assert_eq!(status, 401, "{body}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        stream_len(&url, "INIT"),
        0,
        "nothing started without the token"
    );

    let (status, _, body) = http_post(port, "/snapshots/users", Some("s3cret"));
    assert_eq!(status, 202, "{body}");
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["status"], "accepted", "{doc}");
    assert_eq!(doc["table"], "users");
    let id = doc["snapshot_id"].as_str().unwrap();
    let meta = wait_for_meta(&url, "users", id);
    assert_eq!(meta["row_count"].as_u64(), Some(2));
    wait_finished(&bridge, id);
    bridge.wait_for_line("requested over HTTP by 127.0.0.1", Duration::from_secs(5));

    // The same cooldown as NATS requests, with Retry-After.
    let (status, head, body) = http_post(port, "/snapshots/users", Some("s3cret"));
    assert_eq!(status, 429, "{body}");
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["reason"], "cooldown", "{doc}");
    assert!(head.contains("retry-after: "), "{head}");
    let r = request(&url, "snapshot.request.users");
    assert_eq!(r["reason"], "cooldown", "{r}");

    let (status, _, body) = http_post(port, "/snapshots/sales.orders", Some("s3cret"));
    assert_eq!(status, 202, "{body}");
    let (status, _, body) = http_post(port, "/snapshots/nosuch", Some("s3cret"));
    assert_eq!(status, 404, "{body}");
    assert!(
        !body.contains("users") && !body.contains("orders"),
        "{body}"
    );
    let (status, _, body) = http_post(port, "/snapshots/a.b.c", Some("s3cret"));
    assert_eq!(status, 400, "{body}");
    drop(bridge);
}

/// Publishes `subject` with a reply subject and a raw header block, as any client may write
/// it on the wire, on a connection subscribed to that reply subject; what came back: the
/// server's answer to the `PING` after the publish (`PONG` or `-ERR ...`), then every reply
/// within `window`.
fn publish_raw_headers(
    nats_port: u16,
    subject: &str,
    reply: &str,
    header: &str,
    window: Duration,
) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", nats_port)).expect("connect to nats-server");
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let len = header.len();
    write!(
        s,
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"protocol\":1,\"headers\":true}}\r\n\
         SUB {reply} 1\r\nHPUB {subject} {reply} {len} {len}\r\n{header}\r\nPING\r\n"
    )
    .unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + window;
    while Instant::now() < deadline && !seen.contains("-ERR") {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(_) if seen.contains(&format!("MSG {reply} ")) => break,
            Err(_) => {}
        }
    }
    seen
}

/// A header value holding a bare carriage return is legal on the wire for nats-server, and a
/// client library that panicked on it would lose the bridge's NATS connection to anyone
/// allowed to publish a request. The request is served like any other, and the bridge goes
/// on streaming and answering.
#[test]
fn a_request_with_a_carriage_return_in_a_header_value_is_served_and_breaks_nothing() {
    let (env, _dir, bridge) = users_and_a_bridge(&[]);
    let url = env.nats.url();

    let seen = publish_raw_headers(
        env.nats.port(),
        "snapshot.request.users",
        "_INBOX.raw.1",
        "NATS/1.0\r\nX-Note: a\rb\r\n\r\n",
        Duration::from_secs(30),
    );
    assert!(
        !seen.contains("-ERR"),
        "nats-server refused the message: {seen}"
    );
    assert!(seen.contains("PONG"), "{seen}");
    assert!(
        seen.contains("\"status\":\"accepted\""),
        "the bridge's reply: {seen:?}\nbridge log:\n{}",
        bridge.log()
    );
    testkit::wait_for_logged(
        "the meta",
        Duration::from_secs(60),
        &[("bridge", &bridge)],
        || (metas(&url, "users").len() == 1).then_some(()),
    );
    bridge.wait_for_line(" of public.users:", Duration::from_secs(60));

    // The same connection still answers, and changes still flow.
    env.pg
        .sql("app", "INSERT INTO users VALUES (100, 'streamed')");
    wait_for("the insert", Duration::from_secs(30), || {
        (stream_len(&url, "CDC") == 1).then_some(())
    });
    let r = request(&url, "snapshot.request.users");
    assert_eq!(r["status"], "accepted", "{r}");
    let id = r["snapshot_id"].as_str().unwrap();
    let meta = wait_for_meta(&url, "users", id);
    assert_eq!(meta["row_count"].as_u64(), Some(11));
    let log = bridge.log();
    assert!(!log.contains("panicked"), "{log}");
    drop(bridge);
}
