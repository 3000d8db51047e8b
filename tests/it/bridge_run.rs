//! The `bridge` binary against real servers: set-up problems are one clear line with the
//! documented exit code and lose nothing; a second instance waits as a standby; SIGTERM
//! drains and exits 0.

use std::time::Duration;

use pgbridge::pg::Lsn;
use testkit::{
    bridge_command, confirmed_flush, read_stream, setup_app_db, stream_len, wait_for,
    BridgeProcess, NatsServer, PgServer, TempDir, TestEnv,
};

const SCHEMA: &str = "CREATE TABLE users (id int PRIMARY KEY, name text); \
                      CREATE TABLE orders (id int PRIMARY KEY, total numeric)";

fn run_to_end(cmd: &mut std::process::Command) -> (i32, String) {
    let out = cmd.output().expect("run bridge");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn error_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.starts_with("bridge: "))
        .collect()
}

#[test]
fn setup_problems_are_one_clear_line_and_exit_2() {
    let pg = PgServer::start();
    setup_app_db(&pg, SCHEMA, "users");
    let dir = TempDir::new("bridge");
    // PostgreSQL is checked before NATS: no NATS server is needed to see these.
    let nats = "nats://127.0.0.1:1";

    let (code, err) =
        run_to_end(bridge_command(&pg, nats, dir.path()).args(["--publication", "nosuch"]));
    assert_eq!(code, 2, "{err}");
    let lines = error_lines(&err);
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("publication 'nosuch' does not exist"),
        "{err}"
    );
    assert!(lines[0].contains("CREATE PUBLICATION \"nosuch\""), "{err}");

    let (code, err) =
        run_to_end(bridge_command(&pg, nats, dir.path()).args(["--table", "users,orders"]));
    assert_eq!(code, 2, "{err}");
    let lines = error_lines(&err);
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("table 'orders' is not in publication 'cdc_pub'"),
        "{err}"
    );
    assert!(lines[0].contains("public.users"), "{err}");

    let (code, err) =
        run_to_end(bridge_command(&pg, nats, dir.path()).env("PG_PASSWORD", "wrong-pw"));
    assert_eq!(code, 2, "{err}");
    let lines = error_lines(&err);
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("password authentication failed"), "{err}");
    assert!(!err.contains("wrong-pw"), "password echoed: {err}");

    // Nothing was created by the failed attempts.
    let slots = pg.sql("app", "SELECT count(*) FROM pg_replication_slots");
    assert_eq!(slots.rows[0][0].as_deref(), Some("0"));
}

#[test]
fn wal_level_replica_is_refused_with_the_fix() {
    let pg = PgServer::start_with(&[("wal_level", "replica")]);
    pg.create_database("app");
    pg.sql(
        "app",
        "CREATE ROLE bridge_reader LOGIN REPLICATION PASSWORD 'reader-secret'",
    );
    let dir = TempDir::new("bridge");
    let (code, err) = run_to_end(&mut bridge_command(&pg, "nats://127.0.0.1:1", dir.path()));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("wal_level is 'replica'"), "{err}");
    assert!(
        err.contains("ALTER SYSTEM SET wal_level = logical"),
        "{err}"
    );
}

#[test]
fn nats_without_jetstream_is_one_clear_line_and_exit_2() {
    let pg = PgServer::start();
    setup_app_db(&pg, SCHEMA, "");
    let nats = NatsServer::start_without_jetstream();
    let dir = TempDir::new("bridge");
    let (code, err) = run_to_end(&mut bridge_command(&pg, &nats.url(), dir.path()));
    assert_eq!(code, 2, "{err}");
    let lines = error_lines(&err);
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("JetStream is not enabled"), "{err}");
    assert!(lines[0].contains("-js"), "{err}");
}

#[test]
fn a_row_larger_than_max_payload_stops_without_losing_it() {
    let pg = PgServer::start();
    setup_app_db(&pg, SCHEMA, "");
    let nats_dir = TempDir::new("natsconf");
    let conf = nats_dir.path().join("small.conf");
    std::fs::write(&conf, "max_payload: 2048\n").unwrap();
    let nats = NatsServer::start_with_args(&["-c", conf.to_str().unwrap()]);
    let dir = TempDir::new("bridge");
    let mut bridge = BridgeProcess::spawn(&mut bridge_command(&pg, &nats.url(), dir.path()));
    bridge.wait_for_line("streaming started", Duration::from_secs(60));

    pg.sql("app", "INSERT INTO users VALUES (1, 'small')");
    wait_for("the small row", Duration::from_secs(30), || {
        (stream_len(&nats.url(), "CDC") == 1).then_some(())
    });
    let small_commit: Lsn = {
        let m = &read_stream(&nats.url(), "CDC")[0];
        testkit::split_msg_id(m.msg_id.as_deref().unwrap()).2
    };
    let before_big = wait_for(
        "the slot to confirm the small row",
        Duration::from_secs(30),
        || confirmed_flush(&pg, "cdc_slot").filter(|l| *l > small_commit),
    );
    let r = pg.sql(
        "app",
        "INSERT INTO users VALUES (2, repeat('x', 10000)) RETURNING pg_current_wal_lsn()::text",
    );
    let big_lsn: Lsn = r.rows[0][0].as_deref().unwrap().parse().unwrap();

    let code = bridge.wait_exit(Duration::from_secs(60));
    assert_eq!(code, Some(1), "{}", bridge.log());
    let log = bridge.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.starts_with("bridge: ")).collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(
        lines[0].contains("exceeds the NATS server's max_payload of 2048 bytes"),
        "{log}"
    );
    assert!(lines[0].contains("users"), "{log}");
    // Not confirmed to PostgreSQL: the row is still in the slot's WAL ...
    let confirmed = confirmed_flush(&pg, "cdc_slot").unwrap();
    assert!(confirmed >= before_big);
    assert!(
        confirmed <= big_lsn,
        "confirmed {confirmed} passed the unpublished row at {big_lsn}"
    );
    assert_eq!(stream_len(&nats.url(), "CDC"), 1);
    // ... and is published once a server accepts it.
    let roomy = NatsServer::start();
    let mut again = BridgeProcess::spawn(&mut bridge_command(&pg, &roomy.url(), dir.path()));
    wait_for("the big row", Duration::from_secs(60), || {
        (stream_len(&roomy.url(), "CDC") >= 1).then_some(())
    });
    let msgs = read_stream(&roomy.url(), "CDC");
    assert_eq!(
        msgs.len(),
        1,
        "only the unpublished row is sent again: {:?}\n{}",
        msgs.iter()
            .map(|m| (&m.subject, &m.msg_id, m.payload.len()))
            .collect::<Vec<_>>(),
        again.log()
    );
    assert!(msgs[0].payload.len() > 10000);
    assert_eq!(
        again.terminate(Duration::from_secs(60)),
        Some(0),
        "{}",
        again.log()
    );
}

#[test]
fn standby_waits_and_sigterm_drains_and_exits_0() {
    let env = TestEnv::start();
    setup_app_db(&env.pg, SCHEMA, "");
    let dir = TempDir::new("bridge");
    let mut active =
        BridgeProcess::spawn(&mut bridge_command(&env.pg, &env.nats.url(), dir.path()));
    active.wait_for_line("streaming started", Duration::from_secs(60));

    env.pg.sql(
        "app",
        "BEGIN; INSERT INTO users VALUES (1, 'a'), (2, 'b'); UPDATE users SET name = 'c' WHERE id = 1; \
         INSERT INTO orders VALUES (1, 9.5); COMMIT",
    );
    wait_for("4 messages", Duration::from_secs(30), || {
        (stream_len(&env.nats.url(), "CDC") == 4).then_some(())
    });

    // A second bridge on the same slot waits as a standby instead of failing.
    let standby_dir = TempDir::new("bridge");
    let mut standby = BridgeProcess::spawn(&mut bridge_command(
        &env.pg,
        &env.nats.url(),
        standby_dir.path(),
    ));
    standby.wait_for_line("is active for PID", Duration::from_secs(60));
    assert!(standby.log().contains("waiting"), "{}", standby.log());
    assert!(
        standby.child.try_wait().unwrap().is_none(),
        "standby exited"
    );
    assert_eq!(
        standby.terminate(Duration::from_secs(30)),
        Some(0),
        "{}",
        standby.log()
    );

    assert_eq!(
        active.terminate(Duration::from_secs(60)),
        Some(0),
        "{}",
        active.log()
    );
    let summary = active.wait_for_line("stopped:", Duration::from_secs(5));
    assert!(
        summary.contains("transactions=1 changes=4 published=4 duplicates=0"),
        "{summary}"
    );
    let msgs = read_stream(&env.nats.url(), "CDC");
    let commit_lsn = {
        let v = rmpv::decode::read_value(&mut msgs[3].payload.as_slice()).unwrap();
        let m = v.as_map().unwrap().clone();
        m.iter()
            .find(|(k, _)| k.as_str() == Some("commit_lsn"))
            .and_then(|(_, v)| v.as_str())
            .unwrap()
            .parse::<Lsn>()
            .unwrap()
    };
    let after = confirmed_flush(&env.pg, "cdc_slot").unwrap();
    assert!(
        after > commit_lsn,
        "slot confirmed {after}, commit at {commit_lsn}"
    );
    let stored = testkit::state_file_lsn(&dir.path().join("bridge.lsn")).expect("a state file");
    assert_eq!(stored, after, "state file = confirmed position");
}

#[test]
fn a_slot_ahead_of_the_state_file_is_reported_and_followed() {
    let env = TestEnv::start();
    setup_app_db(&env.pg, SCHEMA, "");
    let dir = TempDir::new("bridge");
    let mut first = BridgeProcess::spawn(&mut bridge_command(&env.pg, &env.nats.url(), dir.path()));
    first.wait_for_line("streaming started", Duration::from_secs(60));
    env.pg.sql("app", "INSERT INTO users VALUES (1, 'a')");
    wait_for("the row", Duration::from_secs(30), || {
        (stream_len(&env.nats.url(), "CDC") == 1).then_some(())
    });
    assert_eq!(
        first.terminate(Duration::from_secs(60)),
        Some(0),
        "{}",
        first.log()
    );
    let slot = confirmed_flush(&env.pg, "cdc_slot").unwrap();
    assert!(slot > Lsn(1));

    // The state file says less was stored than the slot confirmed (a standby taking the slot
    // over with its own older file; here the old one-line format).
    std::fs::write(dir.path().join("bridge.lsn"), "0/1\n").unwrap();
    let mut second =
        BridgeProcess::spawn(&mut bridge_command(&env.pg, &env.nats.url(), dir.path()));
    let line = second.wait_for_line("ahead of this bridge's state file", Duration::from_secs(60));
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains(&slot.to_string()), "{line}");
    assert!(line.contains("resuming from the slot"), "{line}");
    second.wait_for_line("streaming started", Duration::from_secs(60));
    assert!(
        second.log().contains(&format!("from {slot}")),
        "{}",
        second.log()
    );
    assert_eq!(
        second.terminate(Duration::from_secs(60)),
        Some(0),
        "{}",
        second.log()
    );
}

/// A second SIGTERM while the first is still draining (changes in flight, NATS gone) ends the
/// bridge at once with exit code 1; nothing is confirmed past what NATS stored.
#[test]
fn a_second_sigterm_during_a_stuck_drain_exits_1_at_once() {
    let mut env = TestEnv::start();
    setup_app_db(&env.pg, SCHEMA, "users");
    let dir = TempDir::new("bridge");
    let mut bridge =
        BridgeProcess::spawn(&mut bridge_command(&env.pg, &env.nats.url(), dir.path()));
    bridge.wait_for_line("streaming started", Duration::from_secs(60));
    env.pg.sql("app", "INSERT INTO users VALUES (1, 'a')");
    wait_for("1 message", Duration::from_secs(30), || {
        (stream_len(&env.nats.url(), "CDC") == 1).then_some(())
    });

    env.nats.stop();
    // Everything before this position may be confirmed (the first change, keepalives); the
    // change written after it must not be.
    let before: Lsn = env.pg.sql("app", "SELECT pg_current_wal_lsn()::text").rows[0][0]
        .as_deref()
        .unwrap()
        .parse()
        .unwrap();
    env.pg.sql("app", "INSERT INTO users VALUES (2, 'b')");
    bridge.wait_for_line("NATS connection lost", Duration::from_secs(30));
    // The second change is on its way but cannot be stored: the first SIGTERM drains (up to
    // its limit), the second ends it.
    std::thread::sleep(Duration::from_millis(500));
    bridge.child.signal(libc::SIGTERM);
    bridge.wait_for_line("SIGTERM received", Duration::from_secs(10));
    assert!(
        bridge.child.try_wait().unwrap().is_none(),
        "the first SIGTERM must drain, not exit:\n{}",
        bridge.log()
    );
    let second = std::time::Instant::now();
    bridge.child.signal(libc::SIGTERM);
    assert_eq!(
        bridge.wait_exit(Duration::from_secs(10)),
        Some(1),
        "{}",
        bridge.log()
    );
    assert!(
        second.elapsed() < Duration::from_secs(5),
        "{:?}",
        second.elapsed()
    );
    let confirmed = confirmed_flush(&env.pg, "cdc_slot").unwrap();
    assert!(
        confirmed <= before,
        "confirmed {confirmed} past the unstored change (written after {before})"
    );
}
