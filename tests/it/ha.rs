//! High availability: two bridges on one slot, each with its own state file and HTTP port.
//! One streams, the other is a standby waiting for the slot. Under a continuous single-writer
//! load the active one is killed with SIGKILL three times (each time a fresh process takes its
//! place, so there are always two); the standby must take the slot over, and the stream must
//! hold every committed row once, in commit order.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use testkit::{
    assert_once_in_order, bridge_command, free_port, json_row_ids, read_stream, setup_app_db,
    stream_len, wait_caught_up, wait_for, BridgeProcess, InsertLoad, PgServer, TempDir, TestEnv,
};

/// Bound of every wait for the bridges or the stream, a takeover included.
const WAIT: Duration = Duration::from_secs(90);
const LOAD_MAX_TIME: Duration = Duration::from_secs(240);
const LOAD_MAX_TXNS: u64 = 100_000;
const KILLS: usize = 3;
/// Log line of a bridge waiting for the slot.
const STANDBY: &str = "(standby)";

/// One of the two bridge places: its state directory and the bridge running there.
struct Place {
    state: TempDir,
    port: u16,
    bridge: BridgeProcess,
}

fn spawn_bridge(pg: &PgServer, nats_url: &str, state: &Path, port: u16) -> BridgeProcess {
    BridgeProcess::spawn(
        bridge_command(pg, nats_url, state)
            .env("BRIDGE_PORT", port.to_string())
            .args(["--format", "json"]),
    )
}

/// `is_connected` of the bridge's `/status` (connected to PostgreSQL and streaming from the
/// slot); `None` when it does not answer.
fn streams_from_slot(port: u16) -> Option<bool> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /status HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    let body = answer.split("\r\n\r\n").nth(1)?;
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v["is_connected"].as_bool()
}

/// Index of the one place whose bridge streams from the slot (waits, bounded, until exactly
/// one does).
fn active(places: &[Place]) -> usize {
    wait_for("exactly one bridge streaming from the slot", WAIT, || {
        let on: Vec<usize> = (0..places.len())
            .filter(|&i| streams_from_slot(places[i].port) == Some(true))
            .collect();
        (on.len() == 1).then(|| on[0])
    })
}

fn assert_running(place: &mut Place) {
    assert!(
        place.bridge.child.try_wait().unwrap().is_none(),
        "a bridge exited:\n{}",
        place.bridge.log()
    );
}

#[test]
fn the_standby_takes_over_when_the_active_bridge_is_killed() {
    let _heavy = testkit::heavy();
    let env = TestEnv::start();
    let (pg, nats) = (&env.pg, env.nats.url());
    setup_app_db(pg, "CREATE TABLE load (id bigint PRIMARY KEY)", "");

    let mut places: Vec<Place> = Vec::new();
    for i in 0..2 {
        let state = TempDir::new(&format!("ha-{i}"));
        let port = free_port();
        let bridge = spawn_bridge(pg, &nats, state.path(), port);
        places.push(Place {
            state,
            port,
            bridge,
        });
        if i == 0 {
            active(&places);
        }
    }
    places[1].bridge.wait_for_line(STANDBY, WAIT);

    let load = InsertLoad::start(pg, "load", LOAD_MAX_TIME, LOAD_MAX_TXNS);
    wait_for("300 messages in CDC", WAIT, || {
        (stream_len(&nats, "CDC") > 300).then_some(())
    });

    let mut takeovers = Vec::new();
    for round in 1..=KILLS {
        let killed = active(&places);
        let other = 1 - killed;
        places[killed]
            .bridge
            .child
            .kill()
            .expect("SIGKILL the active bridge");
        places[killed]
            .bridge
            .child
            .wait()
            .expect("reap the killed bridge");
        let t0 = Instant::now();
        let at_kill = stream_len(&nats, "CDC");
        // Moving again under the standby: what the killed one left in flight cannot count.
        wait_for(
            "the standby to stream and the stream to move again",
            WAIT,
            || {
                (streams_from_slot(places[other].port) == Some(true)
                    && stream_len(&nats, "CDC") > at_kill)
                    .then_some(())
            },
        );
        let took = t0.elapsed();
        takeovers.push(took);
        eprintln!("kill {round}: the stream moves again {took:?} after the active bridge died");
        assert_eq!(active(&places), other, "the standby took the slot over");
        assert_running(&mut places[other]);

        // A fresh process in the killed one's place (its state file, a new HTTP port).
        let port = free_port();
        let bridge = spawn_bridge(pg, &nats, places[killed].state.path(), port);
        places[killed].port = port;
        places[killed].bridge = bridge;
        places[killed].bridge.wait_for_line(STANDBY, WAIT);
        let n = stream_len(&nats, "CDC");
        wait_for("progress with the new standby waiting", WAIT, || {
            (stream_len(&nats, "CDC") > n + 300).then_some(())
        });
    }

    // The standby restarted with its own state file (behind the slot, which the active one
    // moved on): it waits again and does not disturb the active one.
    let standby = 1 - active(&places);
    let n = stream_len(&nats, "CDC");
    assert_eq!(places[standby].bridge.terminate(WAIT), Some(0));
    let port = free_port();
    places[standby].bridge = spawn_bridge(pg, &nats, places[standby].state.path(), port);
    places[standby].port = port;
    places[standby].bridge.wait_for_line(STANDBY, WAIT);
    wait_for("progress after the standby's restart", WAIT, || {
        (stream_len(&nats, "CDC") > n + 300).then_some(())
    });
    assert_eq!(
        active(&places),
        1 - standby,
        "the active bridge kept the slot"
    );
    eprintln!(
        "restarted standby warned that the slot is ahead of its state file: {}",
        places[standby]
            .bridge
            .log()
            .contains("without being stored")
    );

    let rows = load.stop();
    wait_caught_up(pg, "cdc_slot", WAIT);
    wait_for(&format!("{rows} messages in CDC"), WAIT, || {
        (stream_len(&nats, "CDC") >= rows).then_some(())
    });
    for place in places.iter_mut() {
        assert_running(place);
    }
    let stored = read_stream(&nats, "CDC");
    assert_once_in_order(&json_row_ids(&stored), rows);

    let mut duplicates = Vec::new();
    for place in places.iter_mut() {
        assert_eq!(
            place.bridge.terminate(WAIT),
            Some(0),
            "{}",
            place.bridge.log()
        );
        duplicates.push(
            place
                .bridge
                .wait_for_line("stopped:", Duration::from_secs(5)),
        );
    }
    eprintln!("{rows} rows stored once, in order; takeovers {takeovers:?}; {duplicates:#?}");
    for place in &places {
        for line in place.bridge.log().lines().filter(|l| l.contains("WARN")) {
            eprintln!("{line}");
        }
    }
}
