//! The idle phase: a bridge that has caught up with its slot and receives nothing, for a
//! while; its CPU as a share of one core and each thread's wake-ups per second.
//!
//! The counters are [`threads::sample`]'s.

use std::time::{Duration, Instant};

use serde_json::{json, Value as Json};

use super::threads::{sample, since};
use super::{round, say, Bench};

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
        let pid = bridge.pid();
        let before = sample(pid);
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs(secs));
        let after = sample(pid);
        let elapsed = t0.elapsed().as_secs_f64();
        self.check_alive(&mut bridge, &log);
        self.stop_bridge(bridge, &log);

        let mut total_ns = 0u64;
        let mut total_switches = 0u64;
        let mut threads = serde_json::Map::new();
        for (name, d) in since(&after, &before) {
            let (ns, sw) = (d.cpu_ns, d.switches);
            total_ns += ns;
            total_switches += sw;
            if ns > 0 || sw > 0 {
                threads.insert(
                    name,
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
}
