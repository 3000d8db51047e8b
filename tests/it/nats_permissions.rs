//! The bridge under least-privilege NATS permissions, as docs/operations.md lists them: with
//! an inbox prefix of its own (`--nats-inbox-prefix`) it streams, writes the schemas bucket and
//! serves snapshot requests, started again it reads what it created, and no other user can
//! publish (forge a PubAck) or subscribe under that prefix, or delete or purge its streams;
//! `bridge mirror`, `tail` and `snapshot` run as that other user, and stop with exit 2 as a
//! user the server refuses. A permission refused at start stops the bridge (exit 2); one
//! withdrawn while it streams is waited out, and nothing is confirmed, lost or stored twice.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use testkit::{
    bridge_command, read_stream, setup_app_db, stream_len, wait_for, BridgeProcess, NatsServer,
    PgServer, TempDir,
};

const INBOX_PREFIX: &str = "_INBOX_pgbridge";
const BRIDGE_PASSWORD: &str = "bridge-s3cret";

/// The server's users as the operations guide gives them: `bridge` with exactly the
/// permissions it needs (its JetStream API requests named one by one), and `app` (also every
/// connection without credentials) kept out of the bridge's inboxes, off its subjects, and
/// from deleting or purging streams.
fn server_config() -> String {
    format!(
        r#"
authorization {{
  users = [
    {{
      user: bridge
      password: "{BRIDGE_PASSWORD}"
      permissions: {{
        publish: {{ allow: ["cdc.>", "init.>", "outbox.>", "dlq.>", "$KV.schemas.>", "_INBOX.>",
                           "$JS.API.INFO",
                           "$JS.API.STREAM.INFO.CDC", "$JS.API.STREAM.CREATE.CDC",
                           "$JS.API.STREAM.UPDATE.CDC", "$JS.API.STREAM.MSG.GET.CDC",
                           "$JS.API.STREAM.INFO.INIT", "$JS.API.STREAM.CREATE.INIT",
                           "$JS.API.STREAM.MSG.GET.INIT",
                           "$JS.API.STREAM.INFO.OUTBOX", "$JS.API.STREAM.CREATE.OUTBOX",
                           "$JS.API.STREAM.INFO.DLQ", "$JS.API.STREAM.CREATE.DLQ",
                           "$JS.API.STREAM.INFO.KV_schemas", "$JS.API.STREAM.CREATE.KV_schemas",
                           "$JS.API.DIRECT.GET.KV_schemas.>"] }}
        subscribe: {{ allow: ["snapshot.request.>", "{INBOX_PREFIX}.>"] }}
      }}
    }}
    {{
      user: app
      password: "app-s3cret"
      permissions: {{
        publish: {{ allow: [">"],
                   deny: ["{INBOX_PREFIX}.>", "cdc.>", "init.>", "outbox.>", "dlq.>", "$KV.schemas.>",
                          "$JS.API.STREAM.DELETE.*", "$JS.API.STREAM.PURGE.*",
                          "$JS.API.STREAM.UPDATE.*", "$JS.API.STREAM.MSG.DELETE.*"] }}
        subscribe: {{ allow: [">"], deny: ["{INBOX_PREFIX}.>"] }}
      }}
    }}
  ]
}}
no_auth_user: app
"#
    )
}

/// Sends `command` on a raw connection as `app` (no credentials) and returns the server's
/// first answer to it after the handshake (`-ERR ...` or the `PONG` of the ping sent after it).
fn raw_answer(port: u16, command: &str) -> String {
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("INFO "), "{line}");
    let mut w = stream;
    write!(
        w,
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"protocol\":1}}\r\n{command}\r\nPING\r\n"
    )
    .unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    line.trim_end().to_string()
}

/// PostgreSQL with a `users` table (`seed` runs after creating it), nats-server with the
/// documented users (configuration file `conf`), and a bridge streaming as `bridge` with an
/// inbox prefix of its own and `extra` flags, once it serves snapshot requests.
struct Setup {
    pg: PgServer,
    _conf_dir: TempDir,
    conf: std::path::PathBuf,
    nats: NatsServer,
    url: String,
    dir: TempDir,
    bridge: BridgeProcess,
}

impl Setup {
    fn start(seed: &str, extra: &[&str]) -> Setup {
        let pg = PgServer::start();
        setup_app_db(
            &pg,
            &format!("CREATE TABLE users (id int PRIMARY KEY, name text); {seed}"),
            "",
        );
        let conf_dir = TempDir::new("natsconf");
        let conf = conf_dir.path().join("permissions.conf");
        std::fs::write(&conf, server_config()).unwrap();
        let nats = NatsServer::start_with_args(&["-c", conf.to_str().unwrap()]);
        let url = nats.url();
        let dir = TempDir::new("bridge");
        let bridge = BridgeProcess::spawn(as_bridge_user(&pg, &url, &dir).args(extra));
        bridge.wait_for_line("snapshot requests served", Duration::from_secs(60));
        Setup {
            pg,
            _conf_dir: conf_dir,
            conf,
            nats,
            url,
            dir,
            bridge,
        }
    }
}

/// The bridge as the `bridge` user, with its inbox prefix, its state in `dir`.
fn as_bridge_user(pg: &PgServer, url: &str, dir: &TempDir) -> std::process::Command {
    let mut cmd = bridge_command(pg, url, dir.path());
    cmd.env("NATS_BRIDGE_USER", "bridge")
        .env("NATS_BRIDGE_PASSWORD", BRIDGE_PASSWORD)
        .args(["--nats-inbox-prefix", INBOX_PREFIX]);
    cmd
}

#[test]
fn with_an_inbox_prefix_of_its_own_the_bridge_runs_on_least_privilege_and_nobody_else_reaches_its_inboxes(
) {
    let setup = Setup::start(
        "INSERT INTO users SELECT g, 'u' || g FROM generate_series(1, 10) g",
        &["--snapshot-cooldown-secs", "0"],
    );
    let (pg, nats, url, dir) = (&setup.pg, &setup.nats, setup.url.as_str(), &setup.dir);
    let bridge = setup.bridge;

    // Streaming: stored and acknowledged, so the PubAcks came back to the bridge's inbox.
    pg.sql("app", "INSERT INTO users VALUES (100, 'streamed')");
    wait_for("the insert", Duration::from_secs(30), || {
        (stream_len(url, "CDC") == 1).then_some(())
    });
    wait_for("the schemas bucket", Duration::from_secs(30), || {
        (stream_len(url, "KV_schemas") >= 1).then_some(())
    });

    // A snapshot request from another user, answered on that user's inbox and served.
    let reply = testkit::with_nats(url, |client| async move {
        tokio::time::timeout(
            Duration::from_secs(10),
            client.request("snapshot.request.users", "".into()),
        )
        .await
        .expect("a reply in time")
        .expect("a reply")
    });
    let reply: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(reply["status"], "accepted", "{reply}");
    wait_for("the snapshot's meta", Duration::from_secs(60), || {
        read_stream(url, "INIT")
            .iter()
            .any(|m| m.subject == "init.meta.users")
            .then_some(())
    });
    bridge.wait_for_line(" of public.users:", Duration::from_secs(30));

    // Nobody else can publish into the bridge's inboxes (a forged PubAck) or listen there.
    let ack = r#"{"stream":"CDC","seq":99}"#;
    let forged = raw_answer(
        nats.port(),
        &format!("PUB {INBOX_PREFIX}.x.1 {}\r\n{ack}", ack.len()),
    );
    assert!(
        forged.contains("Permissions Violation for Publish"),
        "{forged}"
    );
    let listen = raw_answer(nats.port(), &format!("SUB {INBOX_PREFIX}.> 1"));
    assert!(
        listen.contains("Permissions Violation for Subscription"),
        "{listen}"
    );
    // Nor delete or purge what the bridge stored.
    for api in ["STREAM.DELETE.CDC", "STREAM.PURGE.CDC"] {
        let answer = raw_answer(nats.port(), &format!("PUB $JS.API.{api} _INBOX.x 0\r\n"));
        assert!(
            answer.contains("Permissions Violation for Publish"),
            "{api}: {answer}"
        );
    }
    assert_eq!(stream_len(url, "CDC"), 1);

    // Still streaming, and the bridge was refused nothing along the way.
    pg.sql("app", "INSERT INTO users VALUES (101, 'after')");
    wait_for("the second insert", Duration::from_secs(30), || {
        (stream_len(url, "CDC") == 2).then_some(())
    });
    let log = bridge.log();
    assert!(
        !log.to_ascii_lowercase().contains("permission"),
        "the bridge met a permission error:\n{log}"
    );

    // Started again on the streams and bucket it created: it reads them instead of creating
    // them, and looks up the last snapshot's meta for --snapshot-on-start.
    let mut bridge = bridge;
    assert_eq!(bridge.terminate(Duration::from_secs(30)), Some(0));
    let again = BridgeProcess::spawn(as_bridge_user(pg, url, dir).arg("--snapshot-on-start"));
    again.wait_for_line(
        "already holds a snapshot of public.users",
        Duration::from_secs(60),
    );
    pg.sql("app", "INSERT INTO users VALUES (102, 'restarted')");
    wait_for(
        "the insert after the restart",
        Duration::from_secs(30),
        || (stream_len(url, "CDC") == 3).then_some(()),
    );
    let log = again.log();
    assert!(
        !log.to_ascii_lowercase().contains("permission"),
        "the restarted bridge met a permission error:\n{log}"
    );

    // The same user without the prefix is refused its inboxes, and the bridge says what it
    // needs in the same line.
    let refused_dir = TempDir::new("refused");
    let refused = BridgeProcess::spawn(
        bridge_command(pg, url, refused_dir.path())
            .env("NATS_BRIDGE_USER", "bridge")
            .env("NATS_BRIDGE_PASSWORD", BRIDGE_PASSWORD),
    );
    let line = refused.wait_for_line("NATS refused pgbridge", Duration::from_secs(60));
    assert!(
        line.contains("ERROR")
            && line.contains("Permissions Violation for Subscription to \"_INBOX.")
            && line.contains("subscribe on snapshot.request.> and on its own inboxes _INBOX.>"),
        "{line}"
    );
    // Its start cannot get further: it stops there with that line, exit code 2.
    let mut refused = refused;
    let code = refused.wait_exit(Duration::from_secs(30));
    let log = refused.log();
    assert_eq!(code, Some(2), "{log}");
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.contains("NATS refused pgbridge: ") && last.contains("Permissions Violation"),
        "{log}"
    );
}

/// `bridge SUBCOMMAND ARGS` without credentials: as `app`.
fn as_app(url: &str, args: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(testkit::bridge_bin());
    cmd.env_clear()
        .env("NATS_URL", url)
        .env("BRIDGE_PORT", testkit::free_port().to_string())
        .env("RUST_LOG", "info")
        .args(args)
        .stdin(std::process::Stdio::null());
    cmd
}

/// Runs `cmd` to its end (bounded); its exit code, stdout and stderr.
fn run_to_end(mut cmd: std::process::Command) -> (Option<i32>, String, String) {
    let out_dir = TempDir::new("command-out");
    let (stdout, stderr) = (out_dir.path().join("out"), out_dir.path().join("err"));
    let child = cmd
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let mut child = testkit::KillOnDrop(child);
    let status = wait_for("the command to end", Duration::from_secs(60), || {
        child.try_wait().unwrap()
    });
    let read = |p| std::fs::read_to_string(p).unwrap();
    (status.code(), read(&stdout), read(&stderr))
}

#[test]
fn mirror_tail_and_snapshot_run_as_the_documented_consumer_user() {
    let setup = Setup::start(
        "INSERT INTO users SELECT g, 'u' || g FROM generate_series(1, 10) g",
        &["--snapshot-cooldown-secs", "0"],
    );
    let (pg, url, dir) = (&setup.pg, setup.url.as_str(), &setup.dir);
    let bridge = setup.bridge;
    pg.sql("app", "INSERT INTO users VALUES (100, 'streamed')");
    wait_for("the insert", Duration::from_secs(30), || {
        (stream_len(url, "CDC") == 1).then_some(())
    });

    let (code, _, log) = run_to_end(as_app(url, &["snapshot", "users"]));
    assert_eq!(code, Some(0), "bridge snapshot as app:\n{log}");
    let (code, out, log) = run_to_end(as_app(url, &["tail", "--from-start", "--count", "1"]));
    assert_eq!(code, Some(0), "bridge tail as app:\n{log}");
    assert!(out.contains("\"streamed\""), "{out}");

    // The bridge's own user may not read the streams: each command stops at once with the
    // server's refusal, exit code 2.
    let refused_db = dir.path().join("refused.sqlite");
    for args in [
        &["tail", "--from-start", "--count", "1"][..],
        &["snapshot", "users"][..],
        &[
            "mirror",
            "--db",
            refused_db.to_str().unwrap(),
            "--table",
            "users",
        ][..],
    ] {
        let mut cmd = as_app(url, args);
        cmd.env("NATS_BRIDGE_USER", "bridge")
            .env("NATS_BRIDGE_PASSWORD", BRIDGE_PASSWORD)
            .env("NATS_INBOX_PREFIX", INBOX_PREFIX);
        let started = std::time::Instant::now();
        let (code, _, log) = run_to_end(cmd);
        let last = log.lines().last().unwrap_or_default();
        assert!(
            code == Some(2)
                && last.contains("error: NATS refused")
                && last.contains("Permissions Violation for Publish to \"$JS.API.CONSUMER.CREATE."),
            "{args:?} as bridge, after {:?}, exit {code:?}:\n{log}",
            started.elapsed()
        );
    }

    let db = dir.path().join("mirror.sqlite");
    let mirror = BridgeProcess::spawn(&mut as_app(
        url,
        &["mirror", "--db", db.to_str().unwrap(), "--table", "users"],
    ));
    pg.sql("app", "INSERT INTO users VALUES (101, 'mirrored')");
    wait_for(
        "the mirror to hold every row",
        Duration::from_secs(60),
        || {
            let conn = rusqlite::Connection::open(&db).ok()?;
            let n: i64 = conn
                .query_row("SELECT count(*) FROM users", [], |r| r.get(0))
                .ok()?;
            (n == 12).then_some(())
        },
    );
    // Stopped and started again, it resumes from its position.
    let mut mirror = mirror;
    assert_eq!(
        mirror.terminate(Duration::from_secs(30)),
        Some(0),
        "{}",
        mirror.log()
    );
    let first_log = mirror.log();
    pg.sql("app", "INSERT INTO users VALUES (102, 'while stopped')");
    let again = BridgeProcess::spawn(&mut as_app(
        url,
        &["mirror", "--db", db.to_str().unwrap(), "--table", "users"],
    ));
    wait_for("the mirror to catch up", Duration::from_secs(60), || {
        let conn = rusqlite::Connection::open(&db).ok()?;
        let n: i64 = conn
            .query_row("SELECT count(*) FROM users WHERE id = 102", [], |r| {
                r.get(0)
            })
            .ok()?;
        (n == 1).then_some(())
    });
    for log in [first_log, again.log(), bridge.log()] {
        assert!(
            !log.to_ascii_lowercase().contains("permission"),
            "a permission error:\n{log}"
        );
    }
}

/// Makes nats-server read its configuration file again and waits until it has, the
/// `reloads`-th time.
fn reload(nats: &NatsServer, reloads: usize) {
    let pid = nats.pid().expect("nats-server runs") as libc::pid_t;
    // SAFETY: a signal to the test's own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    wait_for("nats-server to reload", Duration::from_secs(30), || {
        (nats.log().matches("Reloaded server configuration").count() >= reloads).then_some(())
    });
}

#[test]
fn publishing_refused_while_streaming_is_waited_out_and_nothing_is_confirmed_lost_or_stored_twice()
{
    let setup = Setup::start("", &["--format", "json"]);
    let (pg, conf, nats, url) = (&setup.pg, &setup.conf, &setup.nats, setup.url.as_str());
    let mut bridge = setup.bridge;
    let granted = server_config();
    let revoked = granted.replacen(r#"["cdc.>", "init.>""#, r#"["init.>""#, 1);
    assert_ne!(granted, revoked);
    pg.sql("app", "INSERT INTO users VALUES (1, 'granted')");
    wait_for("the first insert", Duration::from_secs(60), || {
        (stream_len(url, "CDC") == 1).then_some(())
    });

    // The bridge's user loses cdc.> while the bridge streams.
    std::fs::write(conf, &revoked).unwrap();
    reload(nats, 1);
    let before: pgbridge::pg::Lsn = pg
        .value("app", "SELECT pg_current_wal_lsn()::text")
        .parse()
        .unwrap();
    pg.sql("app", "INSERT INTO users VALUES (2, 'refused')");
    pg.sql("app", "INSERT INTO users VALUES (3, 'refused too')");
    bridge.wait_for_line(
        "Permissions Violation for Publish to \"cdc.",
        Duration::from_secs(30),
    );
    // Its PubAck wait ends and it is sent again, refused again, and never confirmed.
    bridge.wait_for_line(
        "not acknowledged: no PubAck within",
        Duration::from_secs(30),
    );
    assert_eq!(stream_len(url, "CDC"), 1);
    let confirmed = testkit::confirmed_flush(pg, "cdc_slot").expect("the slot");
    assert!(
        confirmed <= before,
        "confirmed {confirmed} past the refused changes (from {before})"
    );
    assert_eq!(bridge.child.try_wait().unwrap(), None, "{}", bridge.log());
    // Every refused publish gets a refusal: logged once, not once each.
    let log = bridge.log();
    let refusals = log
        .lines()
        .filter(|l| l.contains(" ERROR ") && l.contains("] NATS refused pgbridge: "))
        .count();
    assert_eq!(refusals, 1, "{log}");

    // Granted again: both arrive, once each and in order, and are confirmed.
    std::fs::write(conf, &granted).unwrap();
    reload(nats, 2);
    wait_for("the refused inserts", Duration::from_secs(60), || {
        (stream_len(url, "CDC") == 3).then_some(())
    });
    testkit::assert_once_in_order(&testkit::json_row_ids(&read_stream(url, "CDC")), 3);
    wait_for(
        "the refused inserts confirmed",
        Duration::from_secs(30),
        || {
            testkit::confirmed_flush(pg, "cdc_slot")
                .filter(|c| *c > before)
                .map(drop)
        },
    );
}
