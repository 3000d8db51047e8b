//! The idle phase: a bridge that has caught up with its slot and receives nothing, for a
//! while; its CPU as a share of one core and each thread's wake-ups per second. Then the
//! same bridge with nats-server stopped (SIGSTOP) behind a backlog that fills its ring, the
//! other quiet state: what it costs while the broker takes nothing, and that everything is
//! stored once after the broker goes on.
//!
//! The counters are [`threads::sample`]'s.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value as Json};

use testkit::proc::Proc;

use super::threads::{sample, since};
use super::{nats, round, say, Bench, DB};

/// Changes written while nats-server is stopped: more than the ring and the PubAck window
/// hold by default, so the wal thread waits for room.
const STALL_BACKLOG: u64 = 20_000;
/// How long the stopped broker is measured (after the ring filled).
const STALL_SECS: u64 = 10;

/// Sends SIGCONT to nats-server when dropped, so a failed measurement never leaves it stopped.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the pid of the benchmark's own nats-server.
        unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
    }
}

impl Bench {
    /// A caught-up bridge, `secs` without writes: share of a core and wake-ups by thread.
    pub(super) fn idle(&mut self, secs: u64) -> Json {
        say(
            self,
            &format!("idle: a caught-up bridge, {secs} s without writes"),
        );
        let (mut bridge, log) = self.spawn_bridge("idle", "users");
        self.wait_caught_up(&mut bridge, &log, "streaming started");
        // Let the start-up's own work (schemas, streams, first status updates) settle.
        std::thread::sleep(Duration::from_secs(2));
        let mut idle = quiet_figures(bridge.pid(), secs);
        self.check_alive(&mut bridge, &log);
        idle["stalled_broker"] = self.stalled_broker(&mut bridge, &log);
        self.stop_bridge(bridge, &log);
        idle
    }

    /// nats-server stopped behind [`STALL_BACKLOG`] changes: the bridge's share of a core and
    /// wake-ups over [`STALL_SECS`], then the time until all are stored once it goes on.
    fn stalled_broker(&mut self, bridge: &mut Proc, log: &Path) -> Json {
        say(
            self,
            &format!("idle: nats-server stopped behind {STALL_BACKLOG} changes, {STALL_SECS} s"),
        );
        let nats_pid = self.nats.pid().expect("nats-server runs");
        let mut stream = None;
        let stored_before = self
            .rt
            .block_on(nats::stream_messages(&self.js, &mut stream, "CDC"));
        let expected = stored_before + STALL_BACKLOG;
        // SAFETY: kill(2) on the pid of the benchmark's own nats-server.
        unsafe { libc::kill(nats_pid as i32, libc::SIGSTOP) };
        let resume = Resume(nats_pid);
        self.pg.sql(
            DB,
            &format!(
                "INSERT INTO users (name, email, score, active) \
                 SELECT 'stalled ' || g, 'stalled' || g || '@example.com', g % 1000, true \
                 FROM generate_series(1, {STALL_BACKLOG}) g"
            ),
        );
        // The wal thread reads the backlog until the ring is full.
        std::thread::sleep(Duration::from_secs(2));
        let mut figures = quiet_figures(bridge.pid(), STALL_SECS);
        self.check_alive(bridge, log);
        drop(resume);
        let t1 = Instant::now();
        let stored = loop {
            let n = self
                .rt
                .block_on(nats::stream_messages(&self.js, &mut stream, "CDC"));
            if n >= expected || t1.elapsed() > Duration::from_secs(120) {
                break n;
            }
            self.check_alive(bridge, log);
            std::thread::sleep(Duration::from_millis(50));
        };
        let resumed = t1.elapsed();
        // Resends the server dropped as duplicates would show here if they were stored.
        std::thread::sleep(Duration::from_secs(1));
        let finally = self
            .rt
            .block_on(nats::stream_messages(&self.js, &mut stream, "CDC"));
        assert!(
            stored >= expected && finally == expected,
            "after nats-server went on, the CDC stream held {finally} messages, {expected} \
             expected ({stored_before} before, {STALL_BACKLOG} written while it was stopped)"
        );
        figures["changes"] = json!(STALL_BACKLOG);
        figures["seconds_to_stored_after_resume"] = json!(round(resumed.as_secs_f64(), 3));
        figures["stored_once"] = json!(true);
        figures
    }
}

/// Process `pid` over the next `secs`: share of a core and wake-ups per second, in all and by
/// thread.
fn quiet_figures(pid: u32, secs: u64) -> Json {
    let before = sample(pid);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let delta = since(&sample(pid), &before);
    let elapsed = t0.elapsed().as_secs_f64();
    let mut total_ns = 0u64;
    let mut total_switches = 0u64;
    let mut threads = serde_json::Map::new();
    for (name, d) in &delta {
        let (ns, sw) = (d.cpu_ns, d.switches);
        total_ns += ns;
        total_switches += sw;
        if ns > 0 || sw > 0 {
            threads.insert(
                name.clone(),
                json!({
                    "cpu_percent_of_core": round(ns as f64 / 1e9 / elapsed * 100.0, 4),
                    "wakeups_per_s": round(sw as f64 / elapsed, 2),
                }),
            );
        }
    }
    json!({
        "seconds": round(elapsed, 3),
        "cpu_percent_of_core": round(total_ns as f64 / 1e9 / elapsed * 100.0, 4),
        "wakeups_per_s": round(total_switches as f64 / elapsed, 2),
        "threads": threads,
    })
}
