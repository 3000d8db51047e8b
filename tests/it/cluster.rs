//! The bridge on a 3-node JetStream cluster with an R3 CDC stream, under a continuous
//! single-writer load: the stream's leader is killed with SIGKILL, then (once the stream has a
//! new leader and moves again) a second node, so the stream loses its quorum; both come back.
//! The bridge must ride it all out without exiting, and the stream must hold every committed
//! row once, in commit order.

use std::time::{Duration, Instant};

use testkit::{
    assert_once_in_order, bridge_command, json_row_ids, read_stream, setup_app_db, wait_caught_up,
    wait_for, BridgeProcess, InsertLoad, NatsCluster, PgServer, TempDir,
};

/// Bound of every wait for the bridge, the cluster or the stream.
const WAIT: Duration = Duration::from_secs(120);
/// The load stops by itself after this long or this many transactions.
const LOAD_MAX_TIME: Duration = Duration::from_secs(240);
const LOAD_MAX_TXNS: u64 = 100_000;
/// How long the stream stays without quorum.
const NO_QUORUM: Duration = Duration::from_secs(8);

fn assert_running(bridge: &mut BridgeProcess) {
    assert!(
        bridge.child.try_wait().unwrap().is_none(),
        "the bridge exited:\n{}",
        bridge.log()
    );
}

/// [`wait_for`] with [`WAIT`], showing the bridge's log when it times out.
fn wait_or_log<T>(bridge: &BridgeProcess, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what}; bridge log:\n{}",
            bridge.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Messages in the CDC stream, asked through the running nodes; `None` while nobody answers.
fn cdc_len(cluster: &NatsCluster) -> Option<u64> {
    cluster.stream_messages("CDC")
}

/// Waits (bounded) until the CDC stream holds more than `than` messages.
fn wait_progress(cluster: &NatsCluster, than: u64, what: &str) -> u64 {
    wait_for(what, WAIT, || cdc_len(cluster).filter(|&n| n > than))
}

#[test]
fn r3_stream_rides_out_a_leader_loss_and_a_quorum_loss() {
    let _heavy = testkit::heavy();
    let cluster = std::thread::spawn(|| NatsCluster::start(3));
    let pg = PgServer::start();
    let mut cluster = cluster.join().expect("cluster start failed");
    setup_app_db(&pg, "CREATE TABLE load (id bigint PRIMARY KEY)", "");
    let state = TempDir::new("cluster-state");
    let mut bridge =
        BridgeProcess::spawn(bridge_command(&pg, &cluster.urls(), state.path()).args([
            "--stream-replicas",
            "3",
            "--format",
            "json",
        ]));
    let leader = wait_or_log(&bridge, "a leader of the CDC stream", || {
        cluster.stream_leader("CDC")
    });

    for stream in ["CDC", "INIT", "KV_schemas"] {
        let replicas = wait_or_log(&bridge, &format!("stream {stream}"), || {
            cluster.stream_info(stream).map(|i| i.config.num_replicas)
        });
        assert_eq!(replicas, 3, "replicas of {stream}");
    }

    let load = InsertLoad::start(&pg, "load", LOAD_MAX_TIME, LOAD_MAX_TXNS);
    let before = wait_progress(&cluster, 300, "300 messages before the first kill");

    // 1. The stream's leader goes away: another node takes over.
    let first = cluster.index_of(&leader);
    let killed_at = Instant::now();
    cluster.kill(first);
    eprintln!("killed the CDC leader {leader} with {before} messages stored");
    let new_leader = wait_for("a new leader of the CDC stream", WAIT, || {
        cluster.stream_leader("CDC").filter(|l| *l != leader)
    });
    let at_new_leader = cdc_len(&cluster).unwrap_or(before);
    let moving = wait_progress(
        &cluster,
        at_new_leader + 100,
        "progress under the new leader",
    );
    eprintln!(
        "new leader {new_leader}; the stream moves again ({moving} messages) {:?} after the kill",
        killed_at.elapsed()
    );
    assert_running(&mut bridge);

    // 2. A second node goes away: no quorum, nothing can be stored; the bridge waits.
    let second = cluster.index_of(&new_leader);
    cluster.kill(second);
    eprintln!("killed {new_leader}: the stream has no quorum");
    let rows_at_loss = load.rows();
    std::thread::sleep(NO_QUORUM);
    assert!(
        load.rows() > rows_at_loss,
        "PostgreSQL must keep committing while the stream has no quorum"
    );
    assert_running(&mut bridge);

    // 3. Both come back: the bridge goes on by itself.
    let restarted_at = Instant::now();
    cluster.start_again(first);
    cluster.start_again(second);
    let back = wait_or_log(
        &bridge,
        "a leader of the CDC stream after the restart",
        || cluster.stream_leader("CDC"),
    );
    eprintln!(
        "the CDC stream has a leader ({back}) {:?} after the restart",
        restarted_at.elapsed()
    );
    let after = wait_progress(&cluster, moving, "progress after the nodes came back");
    eprintln!(
        "both nodes back; the stream moves again ({after} messages) {:?} after the restart",
        restarted_at.elapsed()
    );
    let more = wait_progress(&cluster, after + 300, "more progress after the restart");
    let rows = load.stop();
    eprintln!("load stopped at {rows} rows ({more} messages stored before the stop)");

    wait_caught_up(&pg, "cdc_slot", WAIT);
    wait_for(&format!("{rows} messages in CDC"), WAIT, || {
        cdc_len(&cluster).filter(|&n| n >= rows)
    });
    assert_running(&mut bridge);
    let stored = read_stream(&cluster.url(0), "CDC");
    assert_once_in_order(&json_row_ids(&stored), rows);

    assert_eq!(bridge.terminate(WAIT), Some(0), "{}", bridge.log());
    let summary = bridge.wait_for_line("stopped:", Duration::from_secs(5));
    let log = bridge.log();
    eprintln!(
        "{rows} rows stored once, in order; retry rounds logged: {}, reconnect resends: {}; {summary}",
        log.matches("not acknowledged").count(),
        log.matches("sending the").count()
    );
    for line in log
        .lines()
        .filter(|l| l.contains("pgbridge::sink::nats::publisher"))
    {
        eprintln!("{line}");
    }
}

/// A bridge started while the cluster has no JetStream quorum (two of three nodes down) gets
/// no answer to its stream requests: it must wait and retry, not exit, and stream once the
/// nodes are back.
#[test]
fn a_start_without_quorum_waits_for_the_cluster() {
    let _heavy = testkit::heavy();
    let cluster = std::thread::spawn(|| NatsCluster::start(3));
    let pg = PgServer::start();
    let mut cluster = cluster.join().expect("cluster start failed");
    setup_app_db(&pg, "CREATE TABLE load (id bigint PRIMARY KEY)", "");
    cluster.kill(1);
    cluster.kill(2);
    let state = TempDir::new("cluster-noquorum-state");
    let mut bridge =
        BridgeProcess::spawn(bridge_command(&pg, &cluster.urls(), state.path()).args([
            "--stream-replicas",
            "3",
            "--format",
            "json",
        ]));
    let line = bridge.wait_for_line("JetStream request failed", WAIT);
    assert!(line.contains("retrying in"), "{line}");
    assert_running(&mut bridge);

    cluster.start_again(1);
    cluster.start_again(2);
    bridge.wait_for_line("streaming started", WAIT);
    let rows = 200;
    pg.sql(
        "app",
        &format!("INSERT INTO load SELECT g FROM generate_series(1, {rows}) g"),
    );
    wait_caught_up(&pg, "cdc_slot", WAIT);
    wait_or_log(&bridge, &format!("{rows} messages in CDC"), || {
        cdc_len(&cluster).filter(|&n| n >= rows)
    });
    let stored = read_stream(&cluster.url(0), "CDC");
    assert_once_in_order(&json_row_ids(&stored), rows);
    assert_eq!(bridge.terminate(WAIT), Some(0), "{}", bridge.log());
}
