//! The results: the machine they were measured on, the targets they are held to, and the
//! table printed at the end.

use std::fs;

use serde_json::{json, Value as Json};

use super::*;

pub(super) fn machine(b: &Bench) -> Json {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|x| x.1.trim().to_string())
        })
        .unwrap_or_default();
    let mem_kb: u64 = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("MemTotal:")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0);
    let version = |cmd: &mut Command| {
        cmd.output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": model,
        "memory_mb": mem_kb / 1024,
        "kernel": fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "postgresql": b.pg.value("postgres", "SHOW server_version"),
        "nats_server": version(Command::new(
            std::env::var_os("NATS_SERVER_BIN").unwrap_or_else(|| "nats-server".into())
        ).arg("--version")),
        "bridge_commit": std::env::var("BENCH_COMMIT").unwrap_or_default(),
        "loadavg_at_start": b.loadavg_at_start,
        "loadavg_at_end": loadavg(),
    })
}

fn target(name: &str, target: &str, value: Json, met: Option<bool>) -> Json {
    json!({"name": name, "target": target, "value": value, "met": met})
}

pub(super) fn targets(r: &Json) -> Json {
    let f = |v: &Json| v.as_f64();
    let tput = f(&r["streaming"]["ratio_to_pg_recvlogical"]);
    let cpu = f(&r["streaming"]["bridge"]["cpu_us_per_change"]);
    let rss_mb = f(&r["streaming"]["bridge"]["peak_rss_kb"]).map(|kb| kb / 1024.0);
    // The PubAck figure is the bridge's histogram; the consumer's stands in without one.
    let p99 = f(&r["latency"]["bridge_histogram"]["p99_ms"])
        .or_else(|| f(&r["latency"]["consumer"]["p99_ms"]));
    let snapshot = f(&r["snapshot"]["ratio"]);
    let start = f(&r["startup"]["median_ms"]);
    let own_start = start
        .zip(f(&r["startup"]["postgresql_only_median_ms"]))
        .map(|(all, pg)| round(all - pg, 1));
    let large = f(&r["large_transaction"]["ratio_to_pg_recvlogical"]);
    let steady_cpu = f(&r["latency"]["bridge_cpu_us_per_change"]);
    let idle = f(&r["idle"]["cpu_percent_of_core"]);
    json!([
        target(
            "throughput vs pg_recvlogical",
            ">= 0.9",
            json!(tput),
            tput.map(|v| v >= 0.9)
        ),
        target(
            "bridge CPU per change (us)",
            "<= 2",
            json!(cpu),
            cpu.map(|v| v <= 2.0)
        ),
        target(
            "bridge peak RSS (MB)",
            "<= 16",
            json!(rss_mb.map(|v| round(v, 1))),
            rss_mb.map(|v| v <= 16.0)
        ),
        target(
            "commit -> PubAck p99 at 5000/s (ms)",
            "<= 10",
            json!(p99),
            p99.map(|v| v <= 10.0)
        ),
        target(
            "snapshot vs COPY",
            ">= 0.8",
            json!(snapshot),
            snapshot.map(|v| v >= 0.8)
        ),
        target(
            "start to streaming (ms, median)",
            "< 200",
            json!(start),
            start.map(|v| v < 200.0)
        ),
        target(
            "large transaction vs pg_recvlogical",
            ">= 0.8",
            json!(large),
            large.map(|v| v >= 0.8)
        ),
        target(
            "bridge CPU per change at 5000/s (us)",
            "<= 5",
            json!(steady_cpu),
            steady_cpu.map(|v| v <= 5.0)
        ),
        target(
            "idle bridge (% of a core)",
            "<= 0.2",
            json!(idle),
            idle.map(|v| v <= 0.2)
        ),
        target(
            "bridge's own start-up share (ms, median)",
            "< 50",
            json!(own_start),
            own_start.map(|v| v < 50.0)
        ),
    ])
}

fn fmt_num(v: &Json, unit: &str) -> String {
    match v.as_f64() {
        Some(x) if x >= 1000.0 => format!("{} {unit}", group(x.round() as u64)),
        Some(x) => format!("{} {unit}", round(x, 3)),
        None => "n/a".into(),
    }
}

/// The `n` threads with the most CPU per change, as `name us (switches)`.
fn busiest_threads(threads: &Json, n: usize) -> String {
    let Some(map) = threads.as_object() else {
        return "n/a".into();
    };
    let mut t: Vec<(&String, f64, f64)> = map
        .iter()
        .map(|(name, v)| {
            let us = v["us_per_change"].as_f64().unwrap_or(0.0);
            (name, us, v["switches_per_change"].as_f64().unwrap_or(0.0))
        })
        .collect();
    t.sort_by(|a, b| b.1.total_cmp(&a.1));
    t.iter()
        .take(n)
        .map(|(name, us, sw)| format!("{name} {us} ({sw})"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A latency summary's `p50_ms`, `p99_ms` and `max_ms` as `p50 / p99 / max ms`.
fn p50_p99_max(v: &Json) -> String {
    format!("{} / {} / {} ms", v["p50_ms"], v["p99_ms"], v["max_ms"])
}

fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

pub(super) fn print_table(r: &Json) {
    let s = &r["streaming"];
    let l = &r["large_transaction"];
    let j = &r["jetstream_ceiling"];
    let lat = &r["latency"];
    let snap = &r["snapshot"];
    let chained = &j["fast_batch_chained_reference"];
    let stalled = &r["idle"]["stalled_broker"];
    // (the phase a row belongs to, its cells); phases left out with --only print nothing.
    let rows: Vec<(&str, [String; 4])> = vec![
        (
            "streaming",
            [
                format!(
                    "streaming, {} small txns ({} changes)",
                    s["transactions"], s["changes"]
                ),
                fmt_num(&s["bridge"]["changes_per_s"], "ch/s"),
                format!(
                    "pg_recvlogical {}",
                    fmt_num(&s["ceiling"]["changes_per_s"], "ch/s")
                ),
                fmt_num(&s["ratio_to_pg_recvlogical"], ""),
            ],
        ),
        (
            "jetstream_ceiling",
            [
                "  same, vs JetStream publisher".into(),
                fmt_num(&s["bridge"]["changes_per_s"], "ch/s"),
                format!("async-nats {}", fmt_num(&j["messages_per_s"], "msg/s")),
                fmt_num(&s["ratio_to_jetstream"], ""),
            ],
        ),
        (
            "streaming",
            [
                "  bridge CPU per change".into(),
                fmt_num(&s["bridge"]["cpu_us_per_change"], "us"),
                format!(
                    "publisher alone {}",
                    fmt_num(&j["publisher_cpu_us_per_message"], "us")
                ),
                String::new(),
            ],
        ),
        (
            "jetstream_ceiling",
            [
                "  publisher alone: one ack inbox / fast batch".into(),
                fmt_num(
                    &j["core_publish_reference"]["publisher_cpu_us_per_message"],
                    "us",
                ),
                format!(
                    "fast batch {} at {}",
                    fmt_num(
                        &j["fast_batch_reference"]["publisher_cpu_us_per_message"],
                        "us"
                    ),
                    fmt_num(&j["fast_batch_reference"]["messages_per_s"], "msg/s")
                ),
                String::new(),
            ],
        ),
        (
            "jetstream_ceiling",
            [
                "  fast batch with the bridge's expected-last header".into(),
                fmt_num(&chained["publisher_cpu_us_per_message"], "us"),
                format!(
                    "at {}, nats-server {}",
                    fmt_num(&chained["messages_per_s"], "msg/s"),
                    fmt_num(&chained["nats_server_cpu_us_per_message"], "us")
                ),
                String::new(),
            ],
        ),
        (
            "streaming",
            [
                "  nats-server CPU per change".into(),
                fmt_num(&s["bridge"]["nats_server_cpu_us_per_change"], "us"),
                format!(
                    "publisher {} / fast batch {}",
                    fmt_num(&j["nats_server_cpu_us_per_message"], "us"),
                    fmt_num(
                        &j["fast_batch_reference"]["nats_server_cpu_us_per_message"],
                        "us"
                    )
                ),
                String::new(),
            ],
        ),
        (
            "streaming",
            [
                "  bridge peak RSS".into(),
                fmt_num(&s["bridge"]["peak_rss_kb"], "kB"),
                String::new(),
                String::new(),
            ],
        ),
        (
            "large_transaction",
            [
                format!("large txn ({} rows)", l["rows"]),
                fmt_num(&l["bridge"]["changes_per_s"], "ch/s"),
                format!(
                    "pg_recvlogical {}",
                    fmt_num(&l["ceiling"]["changes_per_s"], "ch/s")
                ),
                fmt_num(&l["ratio_to_pg_recvlogical"], ""),
            ],
        ),
        (
            "large_transaction",
            [
                "  bridge CPU per change / peak RSS".into(),
                format!(
                    "{} / {}",
                    fmt_num(&l["bridge"]["cpu_us_per_change"], "us"),
                    fmt_num(&l["bridge"]["peak_rss_kb"], "kB")
                ),
                String::new(),
                String::new(),
            ],
        ),
        (
            "latency",
            [
                format!(
                    "latency at {} ch/s, consumer, p50 / p99 / max",
                    lat["target_changes_per_s"]
                ),
                p50_p99_max(&lat["consumer"]),
                format!("{} msgs", lat["messages"]),
                String::new(),
            ],
        ),
        (
            "latency",
            [
                "  commit -> PubAck (bridge histogram, buckets)".into(),
                format!(
                    "{} / {} / <={} ms",
                    lat["bridge_histogram"]["p50_ms"],
                    lat["bridge_histogram"]["p99_ms"],
                    lat["bridge_histogram"]["max_at_most_ms"]
                ),
                format!(
                    "p99 bucket ({}, {}] ms",
                    lat["bridge_histogram"]["p99_bucket_ms"][0],
                    lat["bridge_histogram"]["p99_bucket_ms"][1]
                ),
                String::new(),
            ],
        ),
        (
            "latency",
            [
                "  PostgreSQL alone (2nd slot), p50 / p99 / max".into(),
                p50_p99_max(&lat["postgresql_only"]),
                String::new(),
                String::new(),
            ],
        ),
        (
            "latency",
            [
                "  minus PostgreSQL, per txn, p50 / p99 / max".into(),
                p50_p99_max(&lat["bridge_share"]),
                String::new(),
                String::new(),
            ],
        ),
        (
            "latency",
            [
                "  NATS ping (5 ms), p50 / p99 / max".into(),
                p50_p99_max(&lat["nats_ping"]),
                String::new(),
                String::new(),
            ],
        ),
        (
            "latency",
            [
                "  JetStream ping (5 ms), p50 / p99 / max".into(),
                p50_p99_max(&lat["jetstream_ping"]),
                match lat["jetstream_ping"]["errors"].as_u64() {
                    Some(e) if e > 0 => {
                        format!("{} pings, {e} failed", lat["jetstream_ping"]["pings"])
                    }
                    _ => format!("{} pings", lat["jetstream_ping"]["pings"]),
                },
                String::new(),
            ],
        ),
        (
            "latency",
            [
                "  bridge CPU per change at this rate".into(),
                fmt_num(&lat["bridge_cpu_us_per_change"], "us"),
                match (
                    lat["bridge_cpu_user_s"].as_f64(),
                    lat["bridge_cpu_sys_s"].as_f64(),
                ) {
                    (Some(u), Some(s)) => format!("user {u} s, system {s} s"),
                    _ => String::new(),
                },
                String::new(),
            ],
        ),
        (
            "latency",
            [
                "  per thread: us, context switches per change".into(),
                busiest_threads(&lat["bridge_threads"], 2),
                String::new(),
                String::new(),
            ],
        ),
        (
            "idle",
            [
                format!("idle bridge, {} s: share of a core", r["idle"]["seconds"]),
                format!("{} %", r["idle"]["cpu_percent_of_core"]),
                format!("{} wake-ups/s", r["idle"]["wakeups_per_s"]),
                String::new(),
            ],
        ),
        (
            "idle",
            [
                format!(
                    "  nats-server stopped, {} waiting, {} s",
                    stalled["changes"], stalled["seconds"]
                ),
                format!("{} %", stalled["cpu_percent_of_core"]),
                format!(
                    "{} wake-ups/s, stored once {} s after",
                    stalled["wakeups_per_s"], stalled["seconds_to_stored_after_resume"]
                ),
                String::new(),
            ],
        ),
        (
            "snapshot",
            [
                format!("snapshot ({} rows)", snap["rows"]),
                fmt_num(&snap["bridge"]["rows_per_s"], "rows/s"),
                format!("COPY {}", fmt_num(&snap["ceiling"]["rows_per_s"], "rows/s")),
                fmt_num(&snap["ratio"], ""),
            ],
        ),
        (
            "snapshot",
            [
                "  request to meta stored / chunks".into(),
                format!(
                    "{} / {}",
                    fmt_num(&snap["bridge"]["seconds"], "s"),
                    snap["bridge"]["chunks"]
                ),
                format!("COPY {}", fmt_num(&snap["ceiling"]["seconds"], "s")),
                String::new(),
            ],
        ),
        (
            "snapshot",
            [
                "  bridge CPU per row / share of a core".into(),
                format!(
                    "{} / {}",
                    fmt_num(&snap["bridge"]["cpu_us_per_row"], "us"),
                    fmt_num(&snap["bridge"]["cpu_share_of_one_core"], "")
                ),
                format!(
                    "nats-server CPU {}",
                    fmt_num(&snap["bridge"]["nats_server_cpu_s"], "s")
                ),
                String::new(),
            ],
        ),
        (
            "snapshot",
            [
                "  bridge peak RSS (before the request)".into(),
                format!(
                    "{} ({})",
                    fmt_num(&snap["bridge"]["peak_rss_kb"], "kB"),
                    fmt_num(&snap["bridge"]["rss_before_kb"], "kB")
                ),
                // What earlier phases left in nats-server (their duplicate-window ids among
                // it) is what its collector scans while it stores the chunks.
                format!(
                    "nats-server RSS {} before",
                    fmt_num(&snap["bridge"]["nats_server_rss_before_kb"], "kB")
                ),
                String::new(),
            ],
        ),
        (
            "startup",
            [
                "start-up to first change, median / max".into(),
                format!(
                    "{} / {} ms",
                    r["startup"]["median_ms"], r["startup"]["max_ms"]
                ),
                String::new(),
                String::new(),
            ],
        ),
        (
            "startup",
            [
                "  PostgreSQL alone: login to first change".into(),
                format!("{} ms", r["startup"]["postgresql_only_median_ms"]),
                String::new(),
                String::new(),
            ],
        ),
    ];
    println!();
    println!(
        "{:<44} {:>24} {:>32} {:>6}",
        "figure", "bridge", "ceiling", "ratio"
    );
    for (_, row) in rows.iter().filter(|(phase, _)| !r[*phase].is_null()) {
        println!("{:<44} {:>24} {:>32} {:>6}", row[0], row[1], row[2], row[3]);
    }
    println!();
    println!(
        "{:<44} {:>10} {:>12} {:>5}",
        "figure", "target", "value", "met"
    );
    for t in r["targets"].as_array().into_iter().flatten() {
        let met = match t["met"].as_bool() {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "n/a",
        };
        let value = if t["value"].is_null() {
            "n/a".to_string()
        } else {
            t["value"].to_string()
        };
        println!(
            "{:<44} {:>10} {:>12} {:>5}",
            t["name"].as_str().unwrap_or(""),
            t["target"].as_str().unwrap_or(""),
            value,
            met
        );
    }
}
