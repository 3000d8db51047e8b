//! Position identity against real servers: a state file from a re-created cluster, another
//! slot or database, a position beyond the server's WAL, or a dropped slot refuses the start
//! with exit code 2 and one line, and confirms nothing; `--accept-position-gap` starts from
//! the slot and streams what is written afterwards.

use std::path::Path;
use std::time::Duration;

use testkit::{
    bridge_command, confirmed_flush, read_stream, setup_app_db, split_msg_id, stream_len,
    wait_caught_up, wait_for, BridgeProcess, PgServer, TempDir, TestEnv,
};

const SCHEMA: &str = "CREATE TABLE users (id int PRIMARY KEY, name text)";
const WAIT: Duration = Duration::from_secs(60);

/// Runs the bridge once: it streams, `rows` are inserted and stored, and it stops cleanly.
fn run_once(pg: &PgServer, nats_url: &str, dir: &Path, first_id: i32, rows: i32) {
    let mut bridge = BridgeProcess::spawn(&mut bridge_command(pg, nats_url, dir));
    bridge.wait_for_line("streaming started", WAIT);
    let before = stream_len(nats_url, "CDC");
    for i in first_id..first_id + rows {
        pg.sql("app", &format!("INSERT INTO users VALUES ({i}, 'n{i}')"));
    }
    wait_for("the rows in the stream", WAIT, || {
        (stream_len(nats_url, "CDC") >= before + rows as u64).then_some(())
    });
    wait_caught_up(pg, "cdc_slot", WAIT);
    assert_eq!(bridge.terminate(WAIT), Some(0), "{}", bridge.log());
}

/// Starts the bridge, expects exit code 2 and exactly one error line; the line.
fn refused(cmd: &mut std::process::Command) -> String {
    let mut bridge = BridgeProcess::spawn(cmd);
    let code = bridge.wait_exit(WAIT);
    let log = bridge.log();
    assert_eq!(code, Some(2), "{log}");
    let lines: Vec<&str> = log.lines().filter(|l| l.starts_with("bridge: ")).collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(lines[0].contains("--accept-position-gap"), "{log}");
    assert!(!log.contains("streaming started"), "{log}");
    lines[0].to_string()
}

fn state_value(path: &Path, key: &str) -> String {
    let text = std::fs::read_to_string(path).expect("the state file");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")).map(str::to_string))
        .unwrap_or_else(|| panic!("no {key}= in {text}"))
}

fn system_identifier(pg: &PgServer) -> String {
    pg.sql(
        "postgres",
        "SELECT system_identifier::text FROM pg_control_system()",
    )
    .rows[0][0]
        .clone()
        .unwrap()
}

#[test]
fn a_recreated_cluster_is_refused_until_the_gap_is_accepted() {
    let mut env = TestEnv::start();
    let url = env.nats.url();
    setup_app_db(&env.pg, SCHEMA, "");
    let dir = TempDir::new("bridge");
    let state = dir.path().join("bridge.lsn");
    run_once(&env.pg, &url, dir.path(), 1, 1);
    let old_system = system_identifier(&env.pg);
    assert_eq!(state_value(&state, "system_identifier"), old_system);
    assert_eq!(state_value(&state, "version"), "1");
    let old_ns = split_msg_id(read_stream(&url, "CDC")[0].msg_id.as_deref().unwrap()).0;

    // The database server is re-created on the same port; the bridge's directory stays.
    env.pg.recreate();
    setup_app_db(&env.pg, SCHEMA, "");
    let new_system = system_identifier(&env.pg);
    assert_ne!(old_system, new_system);

    let line = refused(&mut bridge_command(&env.pg, &url, dir.path()));
    assert!(line.contains(&format!("system {old_system}")), "{line}");
    assert!(line.contains(&format!("system {new_system}")), "{line}");
    assert_eq!(
        confirmed_flush(&env.pg, "cdc_slot"),
        None,
        "no slot is created before the position is accepted"
    );

    // With a slot made by hand (as a set-up script might), still refused, and the slot is
    // not moved.
    env.pg.sql(
        "app",
        "SELECT pg_create_logical_replication_slot('cdc_slot', 'pgoutput')",
    );
    env.pg
        .sql("app", "INSERT INTO users VALUES (100, 'before')");
    let slot_before = confirmed_flush(&env.pg, "cdc_slot").unwrap();
    refused(&mut bridge_command(&env.pg, &url, dir.path()));
    assert_eq!(confirmed_flush(&env.pg, "cdc_slot"), Some(slot_before));
    assert_eq!(stream_len(&url, "CDC"), 1, "nothing was published");
    assert_eq!(state_value(&state, "system_identifier"), old_system);

    // Accepted: the skipped range is logged, the file is rewritten, changes flow.
    let mut bridge = BridgeProcess::spawn(
        bridge_command(&env.pg, &url, dir.path()).arg("--accept-position-gap"),
    );
    bridge.wait_for_line("streaming started", WAIT);
    let log = bridge.log();
    let gap = log
        .lines()
        .find(|l| l.contains("position gap accepted"))
        .unwrap_or_else(|| panic!("no gap line: {log}"));
    assert!(gap.contains("WARN"), "{gap}");
    assert!(gap.contains(&format!("to {slot_before}")), "{gap}");
    assert!(
        gap.contains(&format!("recorded: system {old_system}")),
        "{gap}"
    );
    assert!(
        gap.contains(&format!("found: system {new_system}")),
        "{gap}"
    );
    assert_eq!(state_value(&state, "system_identifier"), new_system);
    for i in 1..=3 {
        env.pg
            .sql("app", &format!("INSERT INTO users VALUES ({i}, 'new{i}')"));
    }
    // The row written after the slot was made, then the three.
    wait_for("the new rows", WAIT, || {
        (stream_len(&url, "CDC") >= 5).then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    let msgs = read_stream(&url, "CDC");
    assert_eq!(msgs.len(), 5, "{}", bridge.log());
    let new_ns = split_msg_id(msgs[1].msg_id.as_deref().unwrap()).0;
    assert_ne!(old_ns, new_ns, "a new cluster gets a new id namespace");
    assert_eq!(bridge.terminate(WAIT), Some(0), "{}", bridge.log());

    // From now on the file belongs to the new cluster: a plain start works.
    let mut again = BridgeProcess::spawn(&mut bridge_command(&env.pg, &url, dir.path()));
    again.wait_for_line("streaming started", WAIT);
    assert_eq!(again.terminate(WAIT), Some(0), "{}", again.log());
}

#[test]
fn foreign_or_impossible_positions_are_refused() {
    let env = TestEnv::start();
    let url = env.nats.url();
    setup_app_db(&env.pg, SCHEMA, "");
    let dir = TempDir::new("bridge");
    let state = dir.path().join("bridge.lsn");
    run_once(&env.pg, &url, dir.path(), 1, 2);
    let good = std::fs::read_to_string(&state).unwrap();
    let lsn = state_value(&state, "lsn");
    let slot = confirmed_flush(&env.pg, "cdc_slot").unwrap();
    let stored = stream_len(&url, "CDC");
    let unchanged = |what: &str| {
        assert_eq!(
            confirmed_flush(&env.pg, "cdc_slot"),
            Some(slot),
            "{what}: the slot moved"
        );
        assert_eq!(
            stream_len(&url, "CDC"),
            stored,
            "{what}: something was published"
        );
    };

    // A position beyond the server's WAL (a restored database, or an edited file).
    std::fs::write(&state, good.replace(&format!("lsn={lsn}"), "lsn=FF/0")).unwrap();
    let line = refused(&mut bridge_command(&env.pg, &url, dir.path()));
    assert!(
        line.contains("FF/0") && line.contains("ahead of the server's current WAL position"),
        "{line}"
    );
    unchanged("ahead");

    // Another slot's file.
    std::fs::write(&state, &good).unwrap();
    let line = refused(bridge_command(&env.pg, &url, dir.path()).args(["--slot", "other_slot"]));
    assert!(
        line.contains("slot 'cdc_slot'") && line.contains("slot 'other_slot'"),
        "{line}"
    );
    assert_eq!(confirmed_flush(&env.pg, "other_slot"), None, "not created");
    unchanged("other slot");

    // Another database's file.
    std::fs::write(&state, good.replace("database=app", "database=elsewhere")).unwrap();
    let line = refused(&mut bridge_command(&env.pg, &url, dir.path()));
    assert!(
        line.contains("database 'elsewhere'") && line.contains("database 'app'"),
        "{line}"
    );
    unchanged("other database");

    // The old one-line format is still read: checked, resumed, and upgraded.
    std::fs::write(&state, format!("{lsn}\n")).unwrap();
    let mut bridge = BridgeProcess::spawn(&mut bridge_command(&env.pg, &url, dir.path()));
    bridge.wait_for_line("streaming started", WAIT);
    assert!(bridge.log().contains("upgraded"), "{}", bridge.log());
    assert_eq!(bridge.terminate(WAIT), Some(0), "{}", bridge.log());
    assert_eq!(state_value(&state, "slot"), "cdc_slot");

    // The slot dropped (and so about to be re-created below the file's position).
    env.pg
        .sql("app", "SELECT pg_drop_replication_slot('cdc_slot')");
    env.pg.sql("app", "INSERT INTO users VALUES (50, 'unseen')");
    let line = refused(&mut bridge_command(&env.pg, &url, dir.path()));
    assert!(line.contains("'cdc_slot' does not exist"), "{line}");
    assert_eq!(
        confirmed_flush(&env.pg, "cdc_slot"),
        None,
        "the slot is not created again before the gap is accepted"
    );
    assert_eq!(stream_len(&url, "CDC"), stored);
    // Twice: a refused start leaves nothing behind that would let the next one pass.
    refused(&mut bridge_command(&env.pg, &url, dir.path()));
}

#[test]
fn a_new_timeline_through_the_position_is_followed_and_shows_in_the_ids() {
    let mut env = TestEnv::start();
    let url = env.nats.url();
    setup_app_db(&env.pg, SCHEMA, "");
    let dir = TempDir::new("bridge");
    let state = dir.path().join("bridge.lsn");
    run_once(&env.pg, &url, dir.path(), 1, 1);
    assert_eq!(state_value(&state, "timeline"), "1");
    let first = read_stream(&url, "CDC")[0].msg_id.clone().unwrap();
    assert_eq!(split_msg_id(&first).1, 1, "{first}");

    // The server ends recovery on timeline 2 after the stored position: like a promotion.
    env.pg.new_timeline();
    let timeline = env.pg.sql(
        "postgres",
        "SELECT timeline_id::text FROM pg_control_checkpoint()",
    );
    assert_eq!(timeline.rows[0][0].as_deref(), Some("2"));

    let mut bridge = BridgeProcess::spawn(&mut bridge_command(&env.pg, &url, dir.path()));
    bridge.wait_for_line("streaming started", WAIT);
    assert!(
        bridge.log().contains("from timeline 1 to 2 (switch point"),
        "{}",
        bridge.log()
    );
    env.pg.sql("app", "INSERT INTO users VALUES (2, 'after')");
    wait_for("the new row", WAIT, || {
        (stream_len(&url, "CDC") >= 2).then_some(())
    });
    wait_caught_up(&env.pg, "cdc_slot", WAIT);
    assert_eq!(bridge.terminate(WAIT), Some(0), "{}", bridge.log());
    let msgs = read_stream(&url, "CDC");
    assert_eq!(msgs.len(), 2, "{}", bridge.log());
    let (ns1, _, _, _) = split_msg_id(&first);
    let (ns2, tl2, _, _) = split_msg_id(msgs[1].msg_id.as_deref().unwrap());
    assert_eq!(
        tl2, 2,
        "a change after the switch point has the new timeline"
    );
    assert_eq!(
        ns1, ns2,
        "same cluster, database and publication: same namespace"
    );
    assert_eq!(state_value(&state, "timeline"), "2");

    // A position of timeline 1 past the switch point is not on timeline 2's history.
    let history = env
        .pg
        .sql("postgres", "SELECT pg_read_file('pg_wal/00000002.history')");
    let history = history.rows[0][0].clone().unwrap();
    let switch: pgbridge::pg::Lsn = history.split('\t').nth(1).unwrap().parse().unwrap();
    let past = pgbridge::pg::Lsn(switch.0 + 8);
    let good = std::fs::read_to_string(&state).unwrap();
    let lsn = state_value(&state, "lsn");
    std::fs::write(
        &state,
        good.replace("timeline=2", "timeline=1")
            .replace(&format!("lsn={lsn}"), &format!("lsn={past}")),
    )
    .unwrap();
    let slot = confirmed_flush(&env.pg, "cdc_slot");
    let line = refused(&mut bridge_command(&env.pg, &url, dir.path()));
    assert!(
        line.contains(&format!("timeline 1 ended at {switch}")),
        "{line}"
    );
    assert_eq!(confirmed_flush(&env.pg, "cdc_slot"), slot);
}

#[test]
fn a_new_timeline_while_streaming_is_followed_after_the_reconnect() {
    let mut env = TestEnv::start();
    let url = env.nats.url();
    setup_app_db(&env.pg, SCHEMA, "");
    let dir = TempDir::new("bridge");
    let state = dir.path().join("bridge.lsn");
    let mut bridge = BridgeProcess::spawn(&mut bridge_command(&env.pg, &url, dir.path()));
    bridge.wait_for_line("streaming started", WAIT);
    env.pg.sql("app", "INSERT INTO users VALUES (1, 'before')");
    wait_for("the first row", WAIT, || {
        (stream_len(&url, "CDC") >= 1).then_some(())
    });
    wait_caught_up(&env.pg, "cdc_slot", WAIT);

    // The server goes away and comes back on timeline 2; the bridge reconnects by itself.
    env.pg.new_timeline();
    bridge.wait_for_line("streaming goes on on timeline 2", WAIT);
    env.pg.sql("app", "INSERT INTO users VALUES (2, 'after')");
    wait_for("the second row", WAIT, || {
        (stream_len(&url, "CDC") >= 2).then_some(())
    });
    wait_caught_up(&env.pg, "cdc_slot", WAIT);
    assert_eq!(bridge.terminate(WAIT), Some(0), "{}", bridge.log());
    let msgs = read_stream(&url, "CDC");
    assert_eq!(msgs.len(), 2, "{}", bridge.log());
    let timelines: Vec<u32> = msgs
        .iter()
        .map(|m| split_msg_id(m.msg_id.as_deref().unwrap()).1)
        .collect();
    assert_eq!(timelines, [1, 2]);
    assert_eq!(state_value(&state, "timeline"), "2", "{}", bridge.log());
}
