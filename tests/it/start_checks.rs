//! What a new user meets at start, against real servers: a `--table` that is not a table of a
//! `FOR ALL TABLES` publication, tables the role cannot read, a CDC stream in another format,
//! the stop summary of a run that never reached PostgreSQL, and which problem stops a start
//! when PostgreSQL and NATS are both wrong.

use std::process::Command;
use std::time::Duration;

use testkit::{
    bridge_command, free_port, setup_app_db, stream_len, wait_for, with_nats, BridgeProcess,
    NatsServer, PgServer, TempDir, TestEnv,
};

const SCHEMA: &str = "CREATE TABLE users (id int PRIMARY KEY, name text)";

/// Runs the bridge until it exits (bounded: a bridge that does not refuse fails the test
/// instead of hanging it); its exit code and stderr.
fn run_to_end(cmd: &mut Command) -> (i32, String) {
    let mut bridge = BridgeProcess::spawn(cmd);
    let code = bridge.wait_exit(Duration::from_secs(60)).unwrap_or(-1);
    (code, bridge.log())
}

fn error_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.starts_with("bridge: "))
        .collect()
}

#[test]
fn a_table_missing_from_an_all_tables_publication_is_named_without_alter_publication() {
    let pg = PgServer::start();
    // Empty table list: init.sh creates the publication FOR ALL TABLES.
    setup_app_db(&pg, SCHEMA, "");
    pg.sql("app", "CREATE VIEW user_names AS SELECT name FROM users");
    let dir = TempDir::new("bridge");
    // PostgreSQL is checked before NATS.
    let nats = "nats://127.0.0.1:1";

    for (table, says) in [
        ("nosuch", "table 'nosuch' does not exist in database 'app'"),
        ("user_names", "table 'user_names' is a view, not a table"),
    ] {
        let (code, err) =
            run_to_end(bridge_command(&pg, nats, dir.path()).args(["--table", table]));
        assert_eq!(code, 2, "{err}");
        let lines = error_lines(&err);
        assert_eq!(lines.len(), 1, "{err}");
        assert!(lines[0].contains(says), "{err}");
        assert!(lines[0].contains("is FOR ALL TABLES"), "{err}");
        assert!(lines[0].contains("public.users"), "{err}");
        assert!(!lines[0].contains("ALTER PUBLICATION"), "{err}");
    }
}

#[test]
fn tables_the_role_cannot_read_are_warned_with_the_grants_and_their_snapshot_says_so() {
    let env = TestEnv::start();
    setup_app_db(&env.pg, SCHEMA, "");
    // A schema made after init.sh ran: the role has neither USAGE nor SELECT there.
    env.pg.sql(
        "app",
        "CREATE SCHEMA sales; \
         CREATE TABLE sales.invoices (id int PRIMARY KEY, total numeric); \
         INSERT INTO sales.invoices VALUES (1, 9.5)",
    );
    let dir = TempDir::new("bridge");
    let bridge = BridgeProcess::spawn(&mut bridge_command(&env.pg, &env.nats.url(), dir.path()));
    let warning = bridge.wait_for_line(
        "cannot read published table sales.invoices",
        Duration::from_secs(60),
    );
    assert!(warning.contains("WARN"), "{warning}");
    assert!(
        warning.contains("lacks USAGE on schema sales and SELECT on the table"),
        "{warning}"
    );
    assert!(
        warning.contains(
            r#"GRANT USAGE ON SCHEMA "sales" TO "bridge_reader"; GRANT SELECT ON "sales"."invoices" TO "bridge_reader";"#
        ),
        "{warning}"
    );
    assert!(warning.contains("BRIDGE_SCHEMAS=public,sales"), "{warning}");
    assert!(
        !bridge
            .log()
            .contains("cannot read published table public.users"),
        "{}",
        bridge.log()
    );
    bridge.wait_for_line("snapshot requests served", Duration::from_secs(60));

    // The snapshot fails, and its error carries the same statements.
    let reply = with_nats(&env.nats.url(), |client| async move {
        let msg = tokio::time::timeout(
            Duration::from_secs(10),
            client.request("snapshot.request.sales.invoices", "".into()),
        )
        .await
        .expect("snapshot reply in time")
        .expect("snapshot reply");
        String::from_utf8_lossy(&msg.payload).into_owned()
    });
    assert!(reply.contains("\"accepted\""), "{reply}");
    let failed = bridge.wait_for_line(
        "permission denied for schema sales",
        Duration::from_secs(60),
    );
    assert!(
        failed.contains(
            r#"GRANT USAGE ON SCHEMA "sales" TO "bridge_reader"; GRANT SELECT ON "sales"."invoices" TO "bridge_reader";"#
        ),
        "{failed}"
    );
    assert!(failed.contains("BRIDGE_SCHEMAS=public,sales"), "{failed}");
}

/// Reads the CDC stream's format metadata (`None` when absent).
fn format_metadata(nats_url: &str) -> Option<String> {
    with_nats(nats_url, |client| async move {
        let js = async_nats::jetstream::new(client);
        let mut s = js.get_stream("CDC").await.expect("stream CDC");
        let info = s.info().await.expect("stream info");
        info.config.metadata.get("pgbridge.format").cloned()
    })
}

#[test]
fn a_stream_in_another_format_is_refused_unless_it_is_empty() {
    let env = TestEnv::start();
    setup_app_db(&env.pg, SCHEMA, "");
    let url = env.nats.url();
    let dir = TempDir::new("bridge");

    // A JSON bridge creates the stream and records its format.
    let mut bridge =
        BridgeProcess::spawn(bridge_command(&env.pg, &url, dir.path()).args(["--format", "json"]));
    bridge.wait_for_line("streaming started", Duration::from_secs(60));
    assert_eq!(format_metadata(&url).as_deref(), Some("json"));
    env.pg.sql("app", "INSERT INTO users VALUES (1, 'a')");
    wait_for("the change in CDC", Duration::from_secs(60), || {
        (stream_len(&url, "CDC") == 1).then_some(())
    });
    assert_eq!(bridge.terminate(Duration::from_secs(30)), Some(0));

    // MessagePack now: refused, by the metadata.
    let refused = |how: &str| {
        let (code, err) = run_to_end(&mut bridge_command(&env.pg, &url, dir.path()));
        assert_eq!(code, 2, "{err}");
        let lines = error_lines(&err);
        assert_eq!(lines.len(), 1, "{err}");
        assert!(
            lines[0].contains("stream 'CDC' holds json messages"),
            "{err}"
        );
        assert!(lines[0].contains(how), "{err}");
        assert!(lines[0].contains("but --format is msgpack"), "{err}");
        assert!(lines[0].contains("start with --format json"), "{err}");
    };
    refused("its metadata pgbridge.format");

    // A stream without the entry (older bridge, made by hand): told from its last message.
    with_nats(&url, |client| async move {
        let js = async_nats::jetstream::new(client);
        let mut s = js.get_stream("CDC").await.unwrap();
        let mut config = s.info().await.unwrap().config.clone();
        config.metadata.remove("pgbridge.format");
        js.update_stream(config).await.unwrap();
    });
    assert_eq!(format_metadata(&url), None);
    refused("its last message, sequence 1");
    assert_eq!(stream_len(&url, "CDC"), 1, "nothing was published");

    // An empty stream takes the new format.
    with_nats(&url, |client| async move {
        let js = async_nats::jetstream::new(client);
        js.get_stream("CDC").await.unwrap().purge().await.unwrap();
    });
    let mut bridge = BridgeProcess::spawn(&mut bridge_command(&env.pg, &url, dir.path()));
    bridge.wait_for_line("streaming started", Duration::from_secs(60));
    assert_eq!(format_metadata(&url).as_deref(), Some("msgpack"));
    assert_eq!(bridge.terminate(Duration::from_secs(30)), Some(0));
}

#[test]
fn a_run_that_never_reached_postgresql_reports_its_uptime_and_reconnects() {
    let nats = NatsServer::start();
    let dir = TempDir::new("bridge");
    // Nothing listens on this loopback port.
    let port = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bridge"));
    cmd.env_clear()
        .env("BRIDGE_PORT", free_port().to_string())
        .env("PG_HOST", "127.0.0.1")
        .env("PG_PORT", port.to_string())
        .env("PG_USER", "bridge_reader")
        .env("PG_PASSWORD", "unused")
        .env("PG_DB", "app")
        .env("NATS_URL", nats.url())
        .env("RUST_LOG", "info")
        .env("TMPDIR", dir.path())
        .args(["--reconnect-backoff-secs", "1", "--state-file"])
        .arg(dir.path().join("bridge.lsn"));
    let mut bridge = BridgeProcess::spawn(&mut cmd);
    bridge.wait_for_line("PostgreSQL unavailable", Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(bridge.terminate(Duration::from_secs(30)), Some(0));
    let log = bridge.log();
    let summary = log
        .lines()
        .find(|l| l.contains("stopped: uptime="))
        .unwrap_or_else(|| panic!("no summary: {log}"));
    let field = |name: &str| -> u64 {
        let start = summary.find(&format!(" {name}=")).expect(name) + name.len() + 2;
        summary[start..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .expect(name)
    };
    let attempts = log.matches("PostgreSQL unavailable").count() as u64;
    assert!(field("uptime") >= 3, "{summary}");
    assert!(attempts >= 3, "{log}");
    assert_eq!(field("reconnects"), attempts, "{summary}\n{log}");
}

#[test]
fn with_postgresql_and_nats_both_wrong_the_start_says_what_stops_it() {
    let pg = PgServer::start();
    setup_app_db(&pg, SCHEMA, "");
    // Reachable, but no retry makes it usable.
    let nats = NatsServer::start_without_jetstream();
    let dir = TempDir::new("bridge");

    // PostgreSQL's own problem comes first, although NATS is checked meanwhile.
    let (code, err) = run_to_end(
        bridge_command(&pg, &nats.url(), dir.path()).env("PG_PASSWORD", "not the password"),
    );
    assert_eq!(code, 2, "{err}");
    let lines = error_lines(&err);
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("password authentication failed"), "{err}");

    // PostgreSQL away (nothing listens there): the NATS problem ends the start rather than
    // a wait for PostgreSQL that could only end in it.
    let (code, err) = run_to_end(
        bridge_command(&pg, &nats.url(), dir.path()).env("PG_PORT", free_port().to_string()),
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("PostgreSQL unavailable"), "{err}");
    let lines = error_lines(&err);
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("JetStream is not enabled on the NATS server"),
        "{err}"
    );
}
