//! The idle phase: a bridge that has caught up with its slot and receives nothing, for a
//! while; its CPU as a share of one core and each thread's wake-ups per second.
//!
//! CPU comes from `/proc/<pid>/task/<tid>/schedstat` (time on a CPU in nanoseconds: the
//! tick-based counters of `/proc/<pid>/stat` are 10 ms steps, as much as the whole budget of
//! 0.2 % of a core over 20 s); wake-ups are the context switches in `/proc/.../status`.

use std::collections::BTreeMap;
use std::fs;
use std::time::{Duration, Instant};

use serde_json::{json, Value as Json};

use super::{round, say, Bench};

/// One thread's counters at one moment.
#[derive(Clone, Copy, Default)]
struct TaskSample {
    cpu_ns: u64,
    switches: u64,
}

/// Every thread of `pid` by name (threads of one name summed).
fn sample(pid: u32) -> BTreeMap<String, TaskSample> {
    let mut out: BTreeMap<String, TaskSample> = BTreeMap::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let p = task.path();
        let name = fs::read_to_string(p.join("comm"))
            .unwrap_or_default()
            .trim()
            .to_string();
        let cpu_ns = fs::read_to_string(p.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        let status = fs::read_to_string(p.join("status")).unwrap_or_default();
        let switches: u64 = status
            .lines()
            .filter_map(|l| {
                let v = l
                    .strip_prefix("voluntary_ctxt_switches:")
                    .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))?;
                v.trim().parse::<u64>().ok()
            })
            .sum();
        let e = out.entry(name).or_default();
        e.cpu_ns += cpu_ns;
        e.switches += switches;
    }
    out
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
        for (name, a) in &after {
            let b = before.get(name).copied().unwrap_or_default();
            let ns = a.cpu_ns.saturating_sub(b.cpu_ns);
            let sw = a.switches.saturating_sub(b.switches);
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
}
