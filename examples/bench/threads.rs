//! Each thread's CPU time and context switches, for the phases that say where a quiet or
//! steady bridge spends its CPU (idle, latency).
//!
//! CPU comes from `/proc/<pid>/task/<tid>/schedstat` (time on a CPU in nanoseconds: the
//! tick-based counters of `/proc/<pid>/stat` are 10 ms steps, as much as the whole budget of
//! 0.2 % of a core over 20 s); context switches (each a sleep or a preemption) from
//! `/proc/.../status`.

use std::collections::BTreeMap;
use std::fs;

/// One thread's counters at one moment, or what it did between two.
#[derive(Clone, Copy, Default)]
pub(super) struct TaskSample {
    pub(super) cpu_ns: u64,
    pub(super) switches: u64,
}

/// Every thread of `pid` by name (threads of one name summed).
pub(super) fn sample(pid: u32) -> BTreeMap<String, TaskSample> {
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

/// What each thread of `after` did since `before` (a thread absent before counts from zero;
/// threads that ended meanwhile are left out).
pub(super) fn since(
    after: &BTreeMap<String, TaskSample>,
    before: &BTreeMap<String, TaskSample>,
) -> BTreeMap<String, TaskSample> {
    after
        .iter()
        .map(|(name, a)| {
            let b = before.get(name).copied().unwrap_or_default();
            let d = TaskSample {
                cpu_ns: a.cpu_ns.saturating_sub(b.cpu_ns),
                switches: a.switches.saturating_sub(b.switches),
            };
            (name.clone(), d)
        })
        .collect()
}
