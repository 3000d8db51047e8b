//! Liveness of the replication connection and of the whole bridge, against real servers: a
//! walsender that stops answering (a peer gone without a reset) is detected and the connection
//! made anew, a quiet but live connection is kept, and a fatal error of the wal thread while
//! NATS is down ends the bridge promptly with that error instead of hanging.

use std::time::{Duration, Instant};

use testkit::{
    bridge_command, read_stream, setup_app_db, wait_for, BridgeProcess, PgServer, TempDir, TestEnv,
};

const SCHEMA: &str = "CREATE TABLE t (id bigint PRIMARY KEY, v text)";
const WAIT: Duration = Duration::from_secs(60);

/// The pid of the walsender serving `slot`, if it is active.
fn walsender_pid(pg: &PgServer, slot: &str) -> Option<i32> {
    let r = pg.sql(
        "app",
        &format!("SELECT active_pid FROM pg_replication_slots WHERE slot_name = '{slot}'"),
    );
    r.rows
        .first()
        .and_then(|row| row[0].as_deref())
        .and_then(|p| p.parse().ok())
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig})");
}

fn insert(pg: &PgServer, from: i64, to: i64) {
    pg.sql(
        "app",
        &format!("INSERT INTO t SELECT g, 'v' || g FROM generate_series({from}, {to}) g"),
    );
}

fn wait_messages(url: &str, n: usize) {
    wait_for(&format!("{n} messages in CDC"), WAIT, || {
        (read_stream(url, "CDC").len() >= n).then_some(())
    });
}

#[test]
fn a_silent_walsender_is_given_up_and_the_bridge_streams_on() {
    let env = TestEnv::start();
    setup_app_db(&env.pg, SCHEMA, "t");
    let dir = TempDir::new("bridge");
    let url = env.nats.url();
    let mut bridge = BridgeProcess::spawn(bridge_command(&env.pg, &url, dir.path()).args([
        "--slot",
        "live_slot",
        "--standby-status-interval-secs",
        "1",
        "--wal-receive-timeout-secs",
        "4",
        "--format",
        "json",
    ]));
    bridge.wait_for_line("streaming started", WAIT);
    insert(&env.pg, 1, 10);
    wait_messages(&url, 10);

    // A stopped walsender keeps its socket open and says nothing, like a host gone without a
    // reset.
    let pid = wait_for("walsender", WAIT, || walsender_pid(&env.pg, "live_slot"));
    signal(pid, libc::SIGSTOP);
    let stopped = Instant::now();
    let line = bridge.wait_for_line("nothing received from PostgreSQL for 4 s", WAIT);
    let detected = stopped.elapsed();
    assert!(
        detected >= Duration::from_secs(3),
        "given up after {detected:?}: {line}"
    );
    // The old walsender still holds the slot until it notices its client is gone.
    signal(pid, libc::SIGCONT);
    insert(&env.pg, 11, 20);
    wait_messages(&url, 20);
    let ids: Vec<i64> = read_stream(&url, "CDC")
        .iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).expect("event");
            v["columns"][0]["value"].as_i64().expect("id")
        })
        .collect();
    assert_eq!(ids, (1..=20).collect::<Vec<_>>());
    assert_eq!(bridge.terminate(WAIT), Some(0), "{}", bridge.log());
}

#[test]
fn a_quiet_live_connection_is_kept() {
    let env = TestEnv::start();
    setup_app_db(&env.pg, SCHEMA, "t");
    let dir = TempDir::new("bridge");
    let url = env.nats.url();
    let mut bridge = BridgeProcess::spawn(bridge_command(&env.pg, &url, dir.path()).args([
        "--standby-status-interval-secs",
        "1",
        "--wal-receive-timeout-secs",
        "3",
    ]));
    bridge.wait_for_line("streaming started", WAIT);
    // Several timeouts of silence from the database: the bridge's own requests for an answer
    // keep the connection known to be alive.
    std::thread::sleep(Duration::from_secs(10));
    insert(&env.pg, 1, 5);
    wait_messages(&url, 5);
    assert_eq!(bridge.terminate(WAIT), Some(0));
    let log = bridge.log();
    assert!(!log.contains("nothing received"), "{log}");
    assert_eq!(log.matches("streaming started").count(), 1, "{log}");
}

#[test]
fn a_fatal_wal_error_while_nats_is_down_ends_the_bridge() {
    let mut env = TestEnv::start();
    setup_app_db(&env.pg, SCHEMA, "t");
    let dir = TempDir::new("bridge");
    let url = env.nats.url();
    let mut bridge = BridgeProcess::spawn(&mut bridge_command(&env.pg, &url, dir.path()));
    bridge.wait_for_line("streaming started", WAIT);
    insert(&env.pg, 1, 5);
    wait_messages(&url, 5);
    env.nats.stop();
    // Changes stay unacknowledged in the window; then the publication goes, which the
    // walsender reports as an error on the replication stream.
    insert(&env.pg, 6, 10);
    std::thread::sleep(Duration::from_millis(500));
    env.pg.sql("app", "DROP PUBLICATION cdc_pub");
    insert(&env.pg, 11, 12);
    let failed = Instant::now();
    let line = bridge.wait_for_line("cdc_pub", WAIT);
    assert!(
        failed.elapsed() < Duration::from_secs(20),
        "the error was logged only after {:?}: {line}",
        failed.elapsed()
    );
    let code = bridge.wait_exit(Duration::from_secs(90));
    assert_eq!(code, Some(1), "{}", bridge.log());
    let log = bridge.log();
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.contains("cdc_pub"),
        "the last line names the cause: {log}"
    );
}
