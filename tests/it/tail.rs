//! `bridge tail` and `bridge snapshot` against real servers: the changes printed as JSON lines
//! and compared with what was written (both message formats, a table outside `public`), the
//! table and operation filters, `--last`, new-only by default; a snapshot followed to its end
//! with the progress gauge at 1, and a refused one.

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testkit::{
    bridge_command, free_port, read_stream, stream_len, wait_for, with_nats, BridgeProcess,
    KillOnDrop, NatsServer, TempDir, TestEnv,
};

/// `bridge` with only the NATS URL set (tail and snapshot need nothing else).
fn cli(nats_url: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bridge"));
    cmd.env_clear()
        .env("NATS_URL", nats_url)
        .env("RUST_LOG", "warn")
        .args(args)
        .stdin(Stdio::null());
    cmd
}

/// Runs a command that must end by itself within `timeout`.
fn run(mut cmd: Command, timeout: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn bridge");
    let mut child = KillOnDrop(child);
    let deadline = Instant::now() + timeout;
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "{cmd:?} did not end in {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut out = Output {
        status: child.try_wait().unwrap().unwrap(),
        stdout: Vec::new(),
        stderr: Vec::new(),
    };
    child
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut out.stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_end(&mut out.stderr)
        .unwrap();
    out
}

/// `bridge tail ARGS`, which must exit 0; its lines, checked to be plain JSON objects that
/// start with stream_seq and subject, then the change's fields in contract order.
fn tail(nats_url: &str, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["tail"];
    all.extend_from_slice(args);
    let out = run(cli(nats_url, &all), Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "tail {args:?}: {stderr}");
    let text = String::from_utf8(out.stdout).expect("UTF-8 output");
    assert!(!text.contains('\x1b'), "colour in piped output: {text}");
    text.lines()
        .map(|line| {
            let order: Vec<usize> = [
                "{\"stream_seq\":",
                ",\"subject\":",
                ",\"table\":",
                ",\"schema\":",
                ",\"operation\":",
                ",\"commit_lsn\":",
                ",\"seq\":",
                ",\"columns\":",
            ]
            .iter()
            .map(|k| {
                line.find(k)
                    .unwrap_or_else(|| panic!("{k} missing in {line}"))
            })
            .collect();
            assert!(order.windows(2).all(|w| w[0] < w[1]), "field order: {line}");
            assert_eq!(order[0], 0, "{line}");
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
        })
        .collect()
}

/// A line reduced to what the source determines: subject, table, schema, operation and the
/// new columns as `{name: value}`.
fn essence(line: &Value) -> Value {
    let columns: serde_json::Map<String, Value> = line["columns"]
        .as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .map(|c| (c["name"].as_str().unwrap().to_owned(), c["value"].clone()))
        .collect();
    json!({
        "subject": line["subject"], "table": line["table"], "schema": line["schema"],
        "operation": line["operation"], "columns": columns,
    })
}

fn change(subject: &str, schema: &str, table: &str, op: &str, columns: Value) -> Value {
    json!({"subject": subject, "table": table, "schema": schema, "operation": op,
           "columns": columns})
}

/// The changes the test writes, in order: the first six with MessagePack, the rest with JSON.
fn expected() -> Vec<Value> {
    vec![
        change(
            "cdc.users.insert",
            "public",
            "users",
            "INSERT",
            json!({"id": 1, "name": "ann", "data": "AP8=", "score": 1.5}),
        ),
        change(
            "cdc.sales.orders.insert",
            "sales",
            "orders",
            "INSERT",
            json!({"id": 10, "amount": "12.50", "note": "first"}),
        ),
        change(
            "cdc.users.update",
            "public",
            "users",
            "UPDATE",
            json!({"id": 1, "name": "anna", "data": "AP8=", "score": 1.5}),
        ),
        change(
            "cdc.users.insert",
            "public",
            "users",
            "INSERT",
            json!({"id": 2, "name": "bob", "data": null, "score": "NaN"}),
        ),
        change(
            "cdc.sales.orders.update",
            "sales",
            "orders",
            "UPDATE",
            json!({"id": 10, "amount": "13.00", "note": "first"}),
        ),
        change(
            "cdc.sales.orders.delete",
            "sales",
            "orders",
            "DELETE",
            json!({"id": 10}),
        ),
        change(
            "cdc.sales.orders.insert",
            "sales",
            "orders",
            "INSERT",
            json!({"id": 11, "amount": "1.00", "note": "ö \"q\""}),
        ),
        change(
            "cdc.users.delete",
            "public",
            "users",
            "DELETE",
            json!({"id": 2}),
        ),
        change(
            "cdc.users.update",
            "public",
            "users",
            "UPDATE",
            json!({"id": 1, "name": "anne", "data": "AQID", "score": -2.0}),
        ),
    ]
}

/// A DELETE carries only the key: compare just that.
fn comparable(mut v: Value) -> Value {
    if v["operation"] == "DELETE" {
        let id = v["columns"]["id"].clone();
        v["columns"] = json!({"id": id});
    }
    v
}

const SCHEMA_SQL: &str = "CREATE SCHEMA sales; \
    CREATE TABLE users (id int PRIMARY KEY, name text, data bytea, score float8); \
    CREATE TABLE sales.orders (id int PRIMARY KEY, amount numeric(10,2), note text)";

/// Streams the changes of [`expected`] through a bridge in MessagePack, then one in JSON. A
/// bridge refuses to write a second format into a stream that holds the first, but a stream
/// written by older bridges can hold both, and `tail` must read either: the JSON half is
/// written by a bridge into a second nats-server's stream and copied over, headers and all.
fn write_changes(env: &TestEnv, dir: &TempDir) {
    let url = env.nats.url();
    let other = NatsServer::start();
    let statements: [&[&str]; 2] = [
        &[
            "INSERT INTO users VALUES (1, 'ann', '\\x00ff', 1.5)",
            "INSERT INTO sales.orders VALUES (10, 12.5, 'first')",
            "UPDATE users SET name = 'anna' WHERE id = 1",
            "INSERT INTO users VALUES (2, 'bob', NULL, 'NaN')",
            "UPDATE sales.orders SET amount = 13 WHERE id = 10",
            "DELETE FROM sales.orders WHERE id = 10",
        ],
        &[
            "INSERT INTO sales.orders VALUES (11, 1, 'ö \"q\"')",
            "DELETE FROM users WHERE id = 2",
            "UPDATE users SET name = 'anne', data = '\\x010203', score = -2 WHERE id = 1",
        ],
    ];
    for ((format, statements), target) in ["msgpack", "json"]
        .iter()
        .zip(statements)
        .zip([url.clone(), other.url()])
    {
        let mut bridge = BridgeProcess::spawn(
            bridge_command(&env.pg, &target, dir.path()).args(["--format", format]),
        );
        bridge.wait_for_line("snapshot requests served", Duration::from_secs(60));
        for sql in statements {
            env.pg.sql("app", sql);
        }
        let n = statements.len() as u64;
        wait_for("the changes in CDC", Duration::from_secs(30), || {
            (stream_len(&target, "CDC") == n).then_some(())
        });
        assert_eq!(
            bridge.terminate(Duration::from_secs(30)),
            Some(0),
            "{}",
            bridge.log()
        );
    }
    let copies = read_stream(&other.url(), "CDC");
    with_nats(&url, |client| async move {
        let js = async_nats::jetstream::new(client);
        for m in copies {
            let mut headers = async_nats::HeaderMap::new();
            if let Some(id) = m.msg_id {
                headers.insert("Nats-Msg-Id", id.as_str());
            }
            if let Some(last) = m.last_in_tx_header {
                headers.insert("Pgbridge-Last-In-Tx", last.as_str());
            }
            js.publish_with_headers(m.subject, headers, m.payload.into())
                .await
                .expect("publish a copy")
                .await
                .expect("PubAck of a copy");
        }
    });
    assert_eq!(stream_len(&url, "CDC"), 9);
}

#[test]
fn tail_prints_changes_of_both_formats_with_filters_and_positions() {
    let env = TestEnv::start();
    testkit::setup_app_db(&env.pg, SCHEMA_SQL, "");
    let dir = TempDir::new("tail");
    write_changes(&env, &dir);
    let url = env.nats.url();
    let want: Vec<Value> = expected().into_iter().map(comparable).collect();

    // Everything, in stream order, MessagePack and JSON messages alike.
    let all = tail(&url, &["--from-start", "--count", "9"]);
    let seqs: Vec<u64> = all
        .iter()
        .map(|l| l["stream_seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=9).collect::<Vec<_>>());
    let got: Vec<Value> = all.iter().map(|l| comparable(essence(l))).collect();
    assert_eq!(got, want);
    assert!(all
        .iter()
        .all(|l| l["commit_lsn"].is_string() && l["xid"].is_u64()));

    // --until-idle ends a tail that has shown all there is; the filters leave out the rest.
    let select = |pred: &dyn Fn(&Value) -> bool| -> Vec<Value> {
        want.iter().filter(|v| pred(v)).cloned().collect()
    };
    let orders = tail(
        &url,
        &[
            "--from-start",
            "--until-idle",
            "2",
            "--table",
            "sales.orders",
        ],
    );
    assert_eq!(
        orders
            .iter()
            .map(|l| comparable(essence(l)))
            .collect::<Vec<_>>(),
        select(&|v| v["table"] == "orders")
    );
    let deletes = tail(
        &url,
        &["--from-start", "--until-idle", "2", "--op", "delete"],
    );
    assert_eq!(
        deletes
            .iter()
            .map(|l| comparable(essence(l)))
            .collect::<Vec<_>>(),
        select(&|v| v["operation"] == "DELETE")
    );
    let user_updates = tail(
        &url,
        &[
            "--from-start",
            "--until-idle",
            "2",
            "--table",
            "users",
            "--op",
            "update,insert",
        ],
    );
    assert_eq!(
        user_updates
            .iter()
            .map(|l| comparable(essence(l)))
            .collect::<Vec<_>>(),
        select(&|v| v["table"] == "users" && v["operation"] != "DELETE")
    );

    // --last N: the last N of the stream, or of what passes the filters.
    let last = tail(&url, &["--last", "3", "--until-idle", "2"]);
    assert_eq!(
        last.iter()
            .map(|l| comparable(essence(l)))
            .collect::<Vec<_>>(),
        want[6..].to_vec()
    );
    let last_orders = tail(
        &url,
        &[
            "--last",
            "2",
            "--until-idle",
            "2",
            "--table",
            "sales.orders",
        ],
    );
    assert_eq!(
        last_orders
            .iter()
            .map(|l| comparable(essence(l)))
            .collect::<Vec<_>>(),
        vec![want[5].clone(), want[6].clone()]
    );
    assert!(tail(
        &url,
        &["--last", "2", "--until-idle", "1", "--table", "nosuch"]
    )
    .is_empty());
    // Nothing new arrives: the default (new changes only) shows nothing.
    assert!(tail(&url, &["--until-idle", "1"]).is_empty());

    // Usage errors: one line, exit 2.
    for args in [
        &["tail", "--stream", "NOPE", "--until-idle", "1"][..],
        &["tail", "--table", ".users", "--until-idle", "1"],
        &["tail", "--op", "upsert"],
        &["tail", "--from-start", "--last", "2"],
    ] {
        let out = run(cli(&url, args), Duration::from_secs(30));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
    }
    let out = run(
        cli(&url, &["tail", "--stream", "NOPE"]),
        Duration::from_secs(30),
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("'NOPE' does not exist"));
}

#[test]
fn tail_follows_new_changes_and_stops_on_sigterm() {
    let env = TestEnv::start();
    testkit::setup_app_db(&env.pg, SCHEMA_SQL, "");
    let url = env.nats.url();
    let dir = TempDir::new("tail");
    let mut bridge = BridgeProcess::spawn(&mut bridge_command(&env.pg, &url, dir.path()));
    bridge.wait_for_line("snapshot requests served", Duration::from_secs(60));
    env.pg
        .sql("app", "INSERT INTO users VALUES (1, 'old', NULL, 0)");
    wait_for("the first change", Duration::from_secs(30), || {
        (stream_len(&url, "CDC") == 1).then_some(())
    });

    // New changes only: whatever it prints comes after the change already stored.
    let follower = cli(&url, &["tail", "--count", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut follower = KillOnDrop(follower);
    let mut id = 100;
    let deadline = Instant::now() + Duration::from_secs(30);
    while follower.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "tail --count 1 did not end");
        env.pg.sql(
            "app",
            &format!("INSERT INTO users VALUES ({id}, 'new', NULL, 0)"),
        );
        id += 1;
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(follower.try_wait().unwrap().unwrap().success());
    let mut text = String::new();
    follower
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    let line: Value = serde_json::from_str(text.trim()).unwrap();
    assert!(line["stream_seq"].as_u64().unwrap() >= 2, "{text}");
    assert_eq!(line["columns"][1]["value"], "new", "{text}");

    // A tail without an end stops on SIGTERM with exit 0.
    let child = cli(&url, &["tail", "--from-start"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    std::thread::sleep(Duration::from_secs(1));
    child.signal(libc::SIGTERM);
    let status = wait_for("tail to stop", Duration::from_secs(10), || {
        child.try_wait().unwrap()
    });
    assert_eq!(status.code(), Some(0));
    let mut text = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    assert_eq!(
        text.lines().count() as u64,
        stream_len(&url, "CDC"),
        "{text}"
    );

    // On a terminal (script(1) gives it one) the metadata is dim and the operation coloured,
    // unless --no-color.
    let on_terminal = |extra: &str| -> String {
        let mut cmd = Command::new("script");
        cmd.env_clear().env("NATS_URL", &url).args([
            "-qec",
            &format!(
                "'{}' tail --from-start --count 1 {extra}",
                env!("CARGO_BIN_EXE_bridge")
            ),
            "/dev/null",
        ]);
        let out = run(cmd, Duration::from_secs(30));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let coloured = on_terminal("");
    assert!(
        coloured.contains("{\x1b[2m\"stream_seq\":1,"),
        "{coloured:?}"
    );
    assert!(
        coloured.contains("\x1b[32m\"INSERT\"\x1b[0m"),
        "{coloured:?}"
    );
    let plain = on_terminal("--no-color");
    assert!(
        plain.starts_with("{\"stream_seq\":1,") && !plain.contains('\x1b'),
        "{plain:?}"
    );
    assert_eq!(bridge.terminate(Duration::from_secs(30)), Some(0));
}

/// The value of an unlabelled sample in `/metrics`.
fn metric(port: u16, name: &str) -> Option<f64> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn snapshot_command_follows_a_snapshot_to_its_end() {
    let env = TestEnv::start();
    testkit::setup_app_db(
        &env.pg,
        "CREATE TABLE big (id int PRIMARY KEY, v text); \
         INSERT INTO big SELECT g, 'row ' || g FROM generate_series(1, 25000) g; \
         ANALYZE big",
        "",
    );
    let url = env.nats.url();
    let dir = TempDir::new("snap");
    let port = free_port();
    let mut bridge = BridgeProcess::spawn(bridge_command(&env.pg, &url, dir.path()).args([
        "--port",
        &port.to_string(),
        "--snapshot-chunk-rows",
        "1000",
        "--snapshot-cooldown-secs",
        "0",
    ]));
    bridge.wait_for_line("snapshot requests served", Duration::from_secs(60));
    assert_eq!(metric(port, "bridge_snapshot_progress_ratio"), Some(0.0));

    let out = run(cli(&url, &["snapshot", "big"]), Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(!stdout.contains('\x1b'), "{stdout}");
    // Plain progress lines (not a terminal), with the estimate from ANALYZE.
    assert!(
        stdout.lines().next().unwrap().contains(" of ~25000 rows"),
        "{stdout}"
    );
    let last = stdout.lines().last().unwrap();
    let field = |key: &str| -> String {
        last.split(' ')
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key} missing: {last}"))
            .to_owned()
    };
    assert!(last.starts_with("snapshot of big done: "), "{last}");
    assert_eq!(field("rows"), "25000");
    assert_eq!(field("chunks"), "25");
    assert!(field("lsn").contains('/'));
    assert_eq!(field("cdc_stream_seq"), "0");
    assert!(field("seconds").parse::<f64>().unwrap() > 0.0);
    assert!(field("rows_per_sec").parse::<u64>().unwrap() > 0);
    let id = field("snapshot_id");
    bridge.wait_for_line(
        &format!("snapshot {id} of public.big: 25000 rows in 25 chunks"),
        Duration::from_secs(10),
    );
    wait_for("the progress gauge at 1", Duration::from_secs(10), || {
        (metric(port, "bridge_snapshot_progress_ratio") == Some(1.0)).then_some(())
    });

    // On a terminal: a bar redrawn in place, then the same final line.
    let mut cmd = Command::new("script");
    cmd.env_clear().env("NATS_URL", &url).args([
        "-qec",
        &format!("'{}' snapshot big", env!("CARGO_BIN_EXE_bridge")),
        "/dev/null",
    ]);
    let out = run(cmd, Duration::from_secs(120));
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{screen}");
    assert!(screen.contains("\r[##"), "{screen:?}");
    assert!(screen.contains("/~25000 rows, "), "{screen:?}");
    assert!(screen.contains("done: rows=25000 chunks=25 "), "{screen:?}");

    // A refusal: exit 1 with the bridge's reason.
    let out = run(cli(&url, &["snapshot", "nosuch"]), Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("snapshot of nosuch refused") && stderr.contains("public.nosuch"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    // A missing INIT stream is a usage error.
    let out = run(
        cli(&url, &["--stream", "CDC,NOPE", "snapshot", "big"]),
        Duration::from_secs(30),
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(bridge.terminate(Duration::from_secs(30)), Some(0));
}

#[test]
fn snapshot_command_reports_a_failed_snapshot() {
    let pg = testkit::PgServer::start();
    testkit::setup_app_db(
        &pg,
        "CREATE TABLE docs (id int PRIMARY KEY, body text); \
         INSERT INTO docs SELECT g, 'small ' || g FROM generate_series(1, 40) g; \
         INSERT INTO docs VALUES (41, repeat('x', 6000)); \
         CREATE TABLE fine (id int PRIMARY KEY); INSERT INTO fine VALUES (1), (2)",
        "",
    );
    // A row larger than the server's max_payload fails the snapshot after it was accepted.
    let conf_dir = TempDir::new("natsconf");
    let conf = conf_dir.path().join("small.conf");
    std::fs::write(&conf, "max_payload: 4096\n").unwrap();
    let nats = testkit::NatsServer::start_with_args(&["-c", conf.to_str().unwrap()]);
    let url = nats.url();
    let dir = TempDir::new("snap");
    let port = free_port();
    let mut bridge = BridgeProcess::spawn(bridge_command(&pg, &url, dir.path()).args([
        "--port",
        &port.to_string(),
        "--snapshot-chunk-rows",
        "10",
    ]));
    bridge.wait_for_line("snapshot requests served", Duration::from_secs(60));

    // A snapshot that completes sets the gauge to 1; the failed one sets it back to 0.
    let out = run(cli(&url, &["snapshot", "fine"]), Duration::from_secs(60));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("done: rows=2 chunks=1 "));
    wait_for("the progress gauge at 1", Duration::from_secs(10), || {
        (metric(port, "bridge_snapshot_progress_ratio") == Some(1.0)).then_some(())
    });

    let out = run(cli(&url, &["snapshot", "docs"]), Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stderr.starts_with("bridge snapshot: error: snapshot "),
        "{stderr}"
    );
    assert!(
        stderr.contains(" of docs failed: row 41 of public.docs")
            && stderr.contains("max_payload of 4096 bytes"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    // Chunks before the failing row were shown; no final line.
    assert!(!stdout.contains(" done: "), "{stdout}");
    bridge.wait_for_line("of public.docs failed", Duration::from_secs(10));
    wait_for(
        "the progress gauge back at 0",
        Duration::from_secs(10),
        || (metric(port, "bridge_snapshot_progress_ratio") == Some(0.0)).then_some(()),
    );
    assert_eq!(bridge.terminate(Duration::from_secs(30)), Some(0));
}
