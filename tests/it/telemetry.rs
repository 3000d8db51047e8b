//! The bridge's HTTP endpoints, slot monitor and admin token against real servers: metrics
//! parsed as Prometheus text, `/status` and `/health` while streaming and while NATS or
//! PostgreSQL is down, `POST /shutdown` with and without the token, malformed and oversized
//! requests, and the slot lag while NATS is away.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use pgbridge::pg::Lsn;
use serde_json::Value;
use testkit::{
    bridge_command, free_port, read_stream, setup_app_db, stream_len, wait_for, BridgeProcess,
    PgServer, StopMode, TempDir, TestEnv,
};

const SCHEMA: &str = "CREATE TABLE users (id int PRIMARY KEY, name text)";

/// An HTTP answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

fn parse_answer(raw: &[u8]) -> Option<Answer> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Some(Answer {
        status,
        headers,
        body: body.to_owned(),
    })
}

/// Sends `raw` bytes and reads the answer until the server closes; `None` when there is no
/// parseable answer (connection refused or reset).
fn send_raw(port: u16, raw: &[u8]) -> Option<Answer> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = s.write_all(raw);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    parse_answer(&out)
}

/// Sends a head, then `body_len` bytes from another thread while reading the answer, as a
/// client streaming a large upload does.
fn send_with_body(port: u16, head: &[u8], body_len: usize) -> Option<Answer> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(head).ok()?;
    let mut writer = s.try_clone().unwrap();
    let upload = std::thread::spawn(move || {
        let chunk = vec![b'x'; 64 * 1024];
        let mut sent = 0;
        while sent < body_len {
            let n = chunk.len().min(body_len - sent);
            if writer.write_all(&chunk[..n]).is_err() {
                break;
            }
            sent += n;
        }
    });
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let _ = upload.join();
    parse_answer(&out)
}

fn request(port: u16, method: &str, path: &str, token: Option<&str>) -> Answer {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let raw =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Length: 0\r\n\r\n");
    send_raw(port, raw.as_bytes())
        .unwrap_or_else(|| panic!("no answer to {method} {path} on port {port}"))
}

fn get(port: u16, path: &str) -> Answer {
    request(port, "GET", path, None)
}

/// Waits (bounded) until `/health` answers `status`; returns the answer.
fn wait_health(port: u16, status: u16, timeout: Duration) -> Answer {
    wait_for(&format!("/health {status}"), timeout, || {
        let a = get(port, "/health");
        (a.status == status).then_some(a)
    })
}

/// Scrapes and parses `/metrics`: plain samples by name, and histograms by name.
struct Scrape {
    values: HashMap<String, f64>,
    histograms: HashMap<String, Vec<prometheus_parse::HistogramCount>>,
}

impl Scrape {
    fn value(&self, name: &str) -> f64 {
        *self
            .values
            .get(name)
            .unwrap_or_else(|| panic!("metric {name} missing"))
    }

    /// Observations of a histogram (its +Inf bucket).
    fn histogram_count(&self, name: &str) -> f64 {
        self.histograms
            .get(name)
            .and_then(|b| b.iter().find(|c| c.less_than.is_infinite()))
            .map(|c| c.count)
            .unwrap_or_else(|| panic!("histogram {name} missing"))
    }
}

fn scrape(port: u16) -> Scrape {
    let a = get(port, "/metrics");
    assert_eq!(a.status, 200, "{}", a.body);
    let ct = a
        .headers
        .iter()
        .find(|(k, _)| k == "content-type")
        .map(|(_, v)| v.as_str());
    assert_eq!(ct, Some("text/plain; version=0.0.4"));
    let parsed = prometheus_parse::Scrape::parse(a.body.lines().map(|l| Ok(l.to_owned())))
        .expect("Prometheus text format");
    let mut values = HashMap::new();
    let mut histograms = HashMap::new();
    for s in parsed.samples {
        match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => {
                values.insert(s.metric, v);
            }
            prometheus_parse::Value::Histogram(b) => {
                histograms.insert(s.metric, b);
            }
            prometheus_parse::Value::Summary(_) => {}
        }
    }
    Scrape { values, histograms }
}

fn confirmed_flush(pg: &PgServer) -> Lsn {
    pg.sql(
        "app",
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'cdc_slot'",
    )
    .rows[0][0]
        .as_deref()
        .expect("confirmed_flush_lsn")
        .parse()
        .unwrap()
}

fn insert_rows(pg: &PgServer, from: i32, to: i32) {
    for id in from..=to {
        pg.sql("app", &format!("INSERT INTO users VALUES ({id}, 'u{id}')"));
    }
}

fn wait_stream_len(nats_url: &str, n: u64) {
    wait_for(
        &format!("{n} messages in CDC"),
        Duration::from_secs(60),
        || (stream_len(nats_url, "CDC") == n).then_some(()),
    );
}

/// A bridge on the env with its HTTP port; extra flags appended.
fn start_bridge(env: &TestEnv, dir: &TempDir, port: u16, extra: &[&str]) -> BridgeProcess {
    let mut cmd = bridge_command(&env.pg, &env.nats.url(), dir.path());
    cmd.args(["--port", &port.to_string()]).args(extra);
    let bridge = BridgeProcess::spawn(&mut cmd);
    bridge.wait_for_line("streaming started", Duration::from_secs(60));
    wait_health(port, 200, Duration::from_secs(30));
    bridge
}

/// `bridge health` against the bridge on `port`: exit code and what it printed.
fn health_probe(port: u16) -> (Option<i32>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bridge"))
        .env_clear()
        .args([
            "health",
            "--http-bind",
            "0.0.0.0",
            "--port",
            &port.to_string(),
        ])
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    )
}

/// The metric names every scrape must show (docs/operations.md, "Metrics").
const REQUIRED: &[&str] = &[
    "bridge_uptime_seconds",
    "bridge_wal_messages_received_total",
    "bridge_cdc_events_published_total",
    "bridge_last_ack_lsn",
    "bridge_connected",
    "bridge_reconnects_total",
    "bridge_nats_reconnects_total",
    "bridge_last_processing_time_us",
    "bridge_slot_active",
    "bridge_wal_lag_bytes",
    "bridge_ring_occupancy",
    "bridge_pubacks_in_flight",
    "bridge_publish_errors_total",
    "bridge_cdc_events_duplicate_total",
    "bridge_published_bytes_total",
    "bridge_snapshot_progress_ratio",
];

#[test]
fn metrics_status_and_health_while_streaming() {
    let env = TestEnv::start();
    setup_app_db(&env.pg, SCHEMA, "");
    let dir = TempDir::new("bridge");
    let port = free_port();
    let mut bridge = start_bridge(&env, &dir, port, &["--monitor-interval-secs", "1"]);

    let before = scrape(port);
    for name in REQUIRED {
        before.value(name);
    }
    assert_eq!(before.value("bridge_cdc_events_published_total"), 0.0);
    assert_eq!(before.value("bridge_connected"), 1.0);
    assert_eq!(
        before.histogram_count("bridge_commit_to_puback_seconds"),
        0.0
    );

    // 20 rows: 5 in one transaction, then one per statement.
    env.pg.sql(
        "app",
        "BEGIN; INSERT INTO users SELECT g, 'bulk' FROM generate_series(1, 5) g; COMMIT",
    );
    insert_rows(&env.pg, 6, 20);
    wait_stream_len(&env.nats.url(), 20);

    let m = wait_for("metrics of 20 events", Duration::from_secs(10), || {
        let m = scrape(port);
        (m.value("bridge_cdc_events_published_total") == 20.0).then_some(m)
    });
    assert_eq!(m.value("bridge_wal_changes_total"), 20.0);
    assert_eq!(m.value("bridge_wal_transactions_total"), 16.0);
    assert_eq!(m.value("bridge_cdc_events_duplicate_total"), 0.0);
    assert_eq!(m.histogram_count("bridge_commit_to_puback_seconds"), 20.0);
    assert!(
        m.value("bridge_wal_messages_received_total")
            >= before.value("bridge_wal_messages_received_total") + 20.0 + 32.0
    );
    assert!(m.value("bridge_published_bytes_total") > 20.0 * 20.0);
    // The flush position goes to PostgreSQL at the wal thread's status cadence (100 ms) once
    // the state file holds it, so it may trail the PubAcks counted above.
    let acked = wait_for(
        "a flush position sent to PostgreSQL",
        Duration::from_secs(10),
        || {
            let m = scrape(port);
            (m.value("bridge_last_ack_lsn") > 0.0).then_some(m)
        },
    );
    assert!(acked.value("bridge_durable_lsn") >= acked.value("bridge_last_ack_lsn"));
    assert!(m.value("bridge_uptime_seconds") > 0.0);
    assert_eq!(m.value("bridge_nats_connected"), 1.0);
    assert_eq!(m.value("bridge_ring_capacity"), 4096.0);
    assert_eq!(m.value("bridge_healthy"), 1.0);
    wait_for(
        "the monitor's first reading",
        Duration::from_secs(10),
        || (scrape(port).value("bridge_slot_active") == 1.0).then_some(()),
    );

    let status = get(port, "/status");
    assert_eq!(status.status, 200);
    let s = status.json();
    let mut keys: Vec<&str> = s.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "cdc_events_published",
            "current_lsn",
            "dead_letters",
            "durable_lsn",
            "id_namespace",
            "is_connected",
            "last_processing_time_us",
            "nats_reconnect_count",
            "reconnect_count",
            "sink",
            "sink_connected",
            "sink_reconnect_count",
            "slot_active",
            "slot_inactive_since",
            "slot_invalidation_reason",
            "status",
            "uptime_seconds",
            "version",
            "wal_lag_bytes",
            "wal_lag_mb",
            "wal_messages_received",
        ]
    );
    assert_eq!(s["status"], "streaming");
    assert_eq!(s["cdc_events_published"], 20);
    assert_eq!(s["is_connected"], true);
    assert_eq!(s["slot_active"], true);
    assert_eq!(s["slot_invalidation_reason"], serde_json::Value::Null);
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(s["sink"], "nats");
    assert_eq!(s["sink_connected"], true);
    assert_eq!(s["sink_reconnect_count"], s["nats_reconnect_count"]);
    s["current_lsn"].as_str().unwrap().parse::<Lsn>().unwrap();
    s["durable_lsn"].as_str().unwrap().parse::<Lsn>().unwrap();
    let ns = s["id_namespace"].as_str().unwrap();
    assert!(
        ns.len() == 8 && ns.bytes().all(|b| b.is_ascii_hexdigit()),
        "{ns}"
    );
    assert!(s["uptime_seconds"].as_f64().unwrap() > 0.0);

    let health = get(port, "/health");
    assert_eq!(health.status, 200);
    assert_eq!(health.json(), serde_json::json!({"status": "ok"}));
    // The monitor's first reading may come before the bridge created the slot: not an error.
    assert!(!bridge.log().contains("ERROR"), "{}", bridge.log());

    assert_eq!(
        bridge.terminate(Duration::from_secs(60)),
        Some(0),
        "{}",
        bridge.log()
    );
}

#[test]
fn health_and_slot_lag_follow_nats_and_postgresql_outages() {
    let mut env = TestEnv::start();
    setup_app_db(&env.pg, SCHEMA, "");
    let dir = TempDir::new("bridge");
    let port = free_port();
    let mut bridge = start_bridge(&env, &dir, port, &["--monitor-interval-secs", "1"]);
    insert_rows(&env.pg, 1, 3);
    wait_stream_len(&env.nats.url(), 3);
    assert_eq!(
        health_probe(port),
        (Some(0), "{\"status\":\"ok\"}".to_owned())
    );

    // NATS down: 503 with the reason; nothing is confirmed, so the slot lag grows.
    env.nats.stop();
    let down = wait_health(port, 503, Duration::from_secs(30));
    let (code, out) = health_probe(port);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("NATS unavailable"), "{out}");
    let reason = down.json()["reason"].as_str().unwrap().to_owned();
    assert!(reason.contains("NATS unavailable"), "{reason}");
    assert_eq!(down.json()["status"], "unavailable");
    assert_eq!(get(port, "/status").json()["status"], "degraded");
    assert_eq!(scrape(port).value("bridge_nats_connected"), 0.0);
    assert_eq!(get(port, "/status").json()["sink_connected"], false);

    insert_rows(&env.pg, 4, 10);
    let first = wait_for("a slot lag", Duration::from_secs(30), || {
        let lag = scrape(port).value("bridge_wal_lag_bytes");
        (lag > 0.0).then_some(lag)
    });
    env.pg.sql(
        "app",
        "INSERT INTO users SELECT g, repeat('x', 200) FROM generate_series(11, 400) g",
    );
    let grown = wait_for("a growing slot lag", Duration::from_secs(30), || {
        let lag = scrape(port).value("bridge_wal_lag_bytes");
        (lag > first + 10_000.0).then_some(lag)
    });
    let status = get(port, "/status").json();
    assert!(status["wal_lag_bytes"].as_u64().unwrap() > 10_000);
    assert!(status["wal_lag_mb"].as_f64().is_some());

    // NATS back: healthy again, everything stored, and the lag shrinks.
    env.nats.start_again();
    wait_health(port, 200, Duration::from_secs(60));
    wait_stream_len(&env.nats.url(), 400);
    let shrunk = wait_for("a shrinking slot lag", Duration::from_secs(60), || {
        let lag = scrape(port).value("bridge_wal_lag_bytes");
        (lag < grown / 4.0).then_some(lag)
    });
    let m = scrape(port);
    assert!(m.value("bridge_nats_reconnects_total") >= 1.0);
    assert_eq!(m.value("bridge_cdc_events_published_total"), 400.0);
    assert!(m.histogram_count("bridge_commit_to_puback_seconds") >= 400.0);
    eprintln!("slot lag: {first} -> {grown} (NATS down) -> {shrunk} (NATS back)");

    // PostgreSQL down: 503 naming it; back: 200, streaming resumes.
    env.pg.stop(StopMode::Fast);
    let down = wait_health(port, 503, Duration::from_secs(30));
    let reason = down.json()["reason"].as_str().unwrap().to_owned();
    assert!(reason.contains("PostgreSQL unavailable"), "{reason}");
    assert_eq!(get(port, "/status").json()["is_connected"], false);
    env.pg.start_again();
    wait_health(port, 200, Duration::from_secs(60));
    env.pg
        .sql("app", "INSERT INTO users VALUES (1000, 'after')");
    wait_stream_len(&env.nats.url(), 401);
    assert!(scrape(port).value("bridge_reconnects_total") >= 1.0);

    assert_eq!(
        bridge.terminate(Duration::from_secs(60)),
        Some(0),
        "{}",
        bridge.log()
    );
}

#[test]
fn shutdown_and_stream_endpoints_need_the_admin_token() {
    let env = TestEnv::start();
    setup_app_db(&env.pg, SCHEMA, "");

    // No token configured: every admin request is refused with 403.
    let dir = TempDir::new("bridge");
    let port = free_port();
    let mut open = start_bridge(&env, &dir, port, &[]);
    for (method, path) in [
        ("POST", "/shutdown"),
        ("GET", "/streams/info?stream=CDC"),
        ("POST", "/streams/purge?stream=CDC"),
    ] {
        for token in [None, Some("anything")] {
            let a = request(port, method, path, token);
            assert_eq!(a.status, 403, "{method} {path}: {}", a.body);
            assert!(a.body.contains("--admin-token"), "{}", a.body);
        }
    }
    assert_eq!(get(port, "/health").status, 200, "still running");
    assert_eq!(
        open.terminate(Duration::from_secs(60)),
        Some(0),
        "{}",
        open.log()
    );

    // A token configured (through the environment, as documented): 401 without it or with
    // a wrong one; the right one works.
    let token = "t0ken-Secret_42";
    let dir = TempDir::new("bridge");
    let port = free_port();
    let mut cmd = bridge_command(&env.pg, &env.nats.url(), dir.path());
    cmd.env("BRIDGE_ADMIN_TOKEN", token)
        .args(["--port", &port.to_string()]);
    let mut bridge = BridgeProcess::spawn(&mut cmd);
    bridge.wait_for_line("streaming started", Duration::from_secs(60));
    wait_health(port, 200, Duration::from_secs(30));

    for t in [
        None,
        Some("wrong"),
        Some("t0ken-Secret_4"),
        Some("t0ken-Secret_421"),
    ] {
        let a = request(port, "POST", "/shutdown", t);
        assert_eq!(a.status, 401, "{t:?}: {}", a.body);
        assert!(a.headers.iter().any(|(k, _)| k == "www-authenticate"));
    }
    let raw = format!(
        "POST /shutdown HTTP/1.1\r\nAuthorization: Basic {token}\r\nContent-Length: 0\r\n\r\n"
    );
    assert_eq!(send_raw(port, raw.as_bytes()).unwrap().status, 401);
    assert_eq!(
        request(port, "GET", "/streams/info?stream=CDC", Some("wrong")).status,
        401
    );

    // The stream endpoints with the token.
    let info = request(port, "GET", "/streams/info?stream=CDC", Some(token));
    assert_eq!(info.status, 200, "{}", info.body);
    assert_eq!(info.json()["config"]["name"], "CDC");
    assert_eq!(
        request(port, "GET", "/streams/info?stream=NOPE", Some(token)).status,
        404
    );
    assert_eq!(
        request(port, "GET", "/streams/info", Some(token)).status,
        400
    );
    assert_eq!(
        request(port, "POST", "/streams/create?stream=CDC", Some(token)).status,
        409
    );
    assert_eq!(
        request(port, "POST", "/streams/purge?stream=OTHER", Some(token)).status,
        400
    );
    let deleted = request(port, "POST", "/streams/delete?stream=INIT", Some(token));
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    assert_eq!(deleted.json()["success"], true);
    let created = request(port, "POST", "/streams/create?stream=INIT", Some(token));
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(created.json()["config"]["subjects"][0], "init.>");
    let purged = request(port, "POST", "/streams/purge?stream=INIT", Some(token));
    assert_eq!(purged.status, 200, "{}", purged.body);
    assert_eq!(purged.json()["purged"], 0);

    // Changes, then a shutdown over HTTP: exit 0, and the slot confirms the last commit.
    env.pg.sql(
        "app",
        "BEGIN; INSERT INTO users VALUES (1, 'a'), (2, 'b'); COMMIT; \
         INSERT INTO users VALUES (3, 'c');",
    );
    wait_stream_len(&env.nats.url(), 3);
    let last_commit: Lsn = {
        let msgs = read_stream(&env.nats.url(), "CDC");
        let v = rmpv::decode::read_value(&mut msgs[2].payload.as_slice()).unwrap();
        v.as_map()
            .unwrap()
            .iter()
            .find(|(k, _)| k.as_str() == Some("commit_lsn"))
            .and_then(|(_, v)| v.as_str())
            .unwrap()
            .parse()
            .unwrap()
    };
    let a = request(port, "POST", "/shutdown", Some(token));
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.json()["status"], "shutting down");
    assert_eq!(
        bridge.wait_exit(Duration::from_secs(60)),
        Some(0),
        "{}",
        bridge.log()
    );
    let log = bridge.log();
    assert!(log.contains("shutdown requested over HTTP"), "{log}");
    assert!(log.contains("stopped:"), "{log}");
    assert!(!log.contains(token), "the token was logged:\n{log}");
    let confirmed = confirmed_flush(&env.pg);
    assert!(
        confirmed > last_commit,
        "slot confirmed {confirmed}, last commit at {last_commit}"
    );
    // The port is free again.
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
fn malformed_and_oversized_requests_get_4xx_and_streaming_goes_on() {
    let env = TestEnv::start();
    setup_app_db(&env.pg, SCHEMA, "");
    let dir = TempDir::new("bridge");
    let port = free_port();
    let mut bridge = start_bridge(&env, &dir, port, &[]);
    let started = Instant::now();

    // A client that sends half a request and waits gets a 408, without blocking others.
    let mut idle = TcpStream::connect(("127.0.0.1", port)).unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\n").unwrap();

    let status = |raw: &[u8]| send_raw(port, raw).map(|a| a.status);
    assert_eq!(status(b"\x00\x01\xfe\xff garbage \x07\r\n\r\n"), Some(400));
    assert_eq!(status(b"GET /health\r\n\r\n"), Some(400));
    assert_eq!(status(b"GET /health HTTP/9.9\r\n\r\n"), Some(505));
    assert_eq!(
        status(b"GET /health HTTP/1.1\r\nBad Header\r\n\r\n"),
        Some(400)
    );
    let mut big_header = b"GET /health HTTP/1.1\r\nX-Big: ".to_vec();
    big_header.extend(std::iter::repeat_n(b'a', 100 * 1024));
    big_header.extend_from_slice(b"\r\n\r\n");
    assert_eq!(status(&big_header), Some(431));
    // 10 MB announced with Content-Length: refused from the header, body drained.
    let ten_mb = 10 * 1024 * 1024;
    let head = format!("POST /shutdown HTTP/1.1\r\nContent-Length: {ten_mb}\r\n\r\n");
    assert_eq!(
        send_with_body(port, head.as_bytes(), ten_mb).map(|a| a.status),
        Some(413)
    );
    // A Content-Length no memory could hold.
    assert_eq!(
        status(b"POST /shutdown HTTP/1.1\r\nContent-Length: 100000000000000\r\n\r\n"),
        Some(413)
    );
    // 10 MB without Content-Length: no body as far as HTTP goes; the rest is drained.
    assert_eq!(
        send_with_body(port, b"POST /metrics HTTP/1.1\r\n\r\n", ten_mb).map(|a| a.status),
        Some(405)
    );
    // 10 MB of bytes that never end a head.
    assert_eq!(
        send_with_body(port, b"GET /", ten_mb).map(|a| a.status),
        Some(431)
    );
    assert_eq!(
        status(
            b"POST /shutdown HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        ),
        Some(411)
    );
    assert_eq!(get(port, "/nope").status, 404);
    assert_eq!(get(port, "/").status, 404);
    let wrong = request(port, "DELETE", "/metrics", None);
    assert_eq!(wrong.status, 405);
    assert!(wrong
        .headers
        .iter()
        .any(|(k, v)| k == "allow" && v == "GET"));
    assert_eq!(get(port, "/shutdown").status, 405);

    // Connections that send nothing occupy no worker: requests are answered meanwhile, and
    // the silent ones get a 408.
    let mut burst: Vec<TcpStream> = (0..60)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    assert_eq!(burst.len(), 60);
    let t = Instant::now();
    assert_eq!(get(port, "/health").status, 200);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    let silent = burst.last_mut().unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut answer = Vec::new();
    let _ = silent.read_to_end(&mut answer);
    assert_eq!(parse_answer(&answer).map(|a| a.status), Some(408));
    drop(burst);

    let mut answer = Vec::new();
    idle.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let _ = idle.read_to_end(&mut answer);
    assert_eq!(parse_answer(&answer).map(|a| a.status), Some(408));

    // Still streaming, still healthy.
    assert!(
        bridge.child.try_wait().unwrap().is_none(),
        "{}",
        bridge.log()
    );
    wait_health(port, 200, Duration::from_secs(30));
    env.pg
        .sql("app", "INSERT INTO users VALUES (1, 'after the noise')");
    wait_stream_len(&env.nats.url(), 1);
    assert!(started.elapsed() < Duration::from_secs(60));
    assert_eq!(
        bridge.terminate(Duration::from_secs(60)),
        Some(0),
        "{}",
        bridge.log()
    );
}

#[test]
fn a_taken_http_port_is_a_configuration_error() {
    let pg = PgServer::start();
    setup_app_db(&pg, SCHEMA, "");
    let dir = TempDir::new("bridge");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = bridge_command(&pg, "nats://127.0.0.1:1", dir.path())
        .args(["--port", &port.to_string()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("bridge: "))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(line.contains(&format!("127.0.0.1:{port}")), "{line}");
    assert!(line.contains("--port"), "{line}");
}
