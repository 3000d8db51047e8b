//! The operator's files under deploy/ against a running bridge: every `bridge_*` metric the
//! Prometheus alert rules and the Grafana dashboard name is one the bridge exports on
//! `/metrics`, so a renamed or misspelled metric fails here instead of silently never alerting.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use testkit::{bridge_command, free_port, setup_app_db, wait_for, BridgeProcess, TempDir, TestEnv};

const ALERTS: &str = include_str!("../../deploy/prometheus/alerts.yml");
const DASHBOARD: &str = include_str!("../../deploy/grafana/pgbridge.json");

/// Every `bridge_[a-z0-9_]+` identifier in `text`, not counting those inside a longer
/// identifier (e.g. `pgbridge_x`).
fn metric_names(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut out = BTreeSet::new();
    let mut i = 0;
    while let Some(pos) = text[i..].find("bridge_") {
        let start = i + pos;
        let mut end = start + "bridge_".len();
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase()
                || bytes[end].is_ascii_digit()
                || bytes[end] == b'_')
        {
            end += 1;
        }
        let inside_longer = start > 0 && ident(bytes[start - 1]);
        if !inside_longer && end > start + "bridge_".len() {
            out.insert(text[start..end].to_owned());
        }
        i = end;
    }
    out
}

/// Metric families in a Prometheus text exposition (`# TYPE name kind` lines), with kind.
fn families(exposition: &str) -> Vec<(String, String)> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(n, k)| (n.to_owned(), k.trim().to_owned()))
        .collect()
}

/// The names in `wanted` that no exported family provides; a histogram's family provides
/// its `_bucket`, `_sum` and `_count` series.
fn missing(wanted: &BTreeSet<String>, exported: &[(String, String)]) -> Vec<String> {
    let provides = |name: &str| {
        exported.iter().any(|(family, kind)| {
            family == name
                || (kind == "histogram"
                    && ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|s| name.strip_suffix(s) == Some(family.as_str())))
        })
    };
    wanted.iter().filter(|n| !provides(n)).cloned().collect()
}

fn get_metrics(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n")
        .ok()?;
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

#[test]
fn tokenizer_finds_metric_names_and_histogram_series() {
    let names = metric_names(
        "rate(bridge_commit_to_puback_seconds_bucket{instance=~\"$i\"}[5m]) / \
         bridge_ring_capacity pgbridge_not_a_metric {{ $labels.instance }} bridge_",
    );
    let want: BTreeSet<String> = [
        "bridge_commit_to_puback_seconds_bucket",
        "bridge_ring_capacity",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(names, want);
    let exported = vec![
        (
            "bridge_commit_to_puback_seconds".to_owned(),
            "histogram".to_owned(),
        ),
        ("bridge_ring_capacity".to_owned(), "gauge".to_owned()),
    ];
    assert!(missing(&names, &exported).is_empty());
    // A gauge has no _count series.
    let gauge_count: BTreeSet<String> = ["bridge_ring_capacity_count".to_owned()].into();
    assert_eq!(
        missing(&gauge_count, &exported),
        vec!["bridge_ring_capacity_count"]
    );
}

#[test]
fn alert_rules_and_dashboard_name_only_exported_metrics() {
    let rules = metric_names(ALERTS);
    let dashboard = metric_names(DASHBOARD);
    // The files really are read: a tokenizer finding nothing would pass trivially.
    assert!(
        rules.len() >= 8,
        "few metric names in alerts.yml: {rules:?}"
    );
    assert!(
        dashboard.contains("bridge_commit_to_puback_seconds_bucket"),
        "no latency histogram in the dashboard: {dashboard:?}"
    );

    let env = TestEnv::start();
    setup_app_db(
        &env.pg,
        "CREATE TABLE users (id int PRIMARY KEY, name text)",
        "",
    );
    let dir = TempDir::new("deploy");
    let port = free_port();
    let mut cmd = bridge_command(&env.pg, &env.nats.url(), dir.path());
    cmd.args(["--port", &port.to_string()]);
    let mut bridge = BridgeProcess::spawn(&mut cmd);
    bridge.wait_for_line("streaming started", Duration::from_secs(60));
    let exposition = wait_for("/metrics while streaming", Duration::from_secs(30), || {
        get_metrics(port).filter(|m| m.contains("\nbridge_connected 1"))
    });
    let exported = families(&exposition);
    assert!(exported.len() >= 20, "few families exported: {exported:?}");

    let rules_missing = missing(&rules, &exported);
    let dashboard_missing = missing(&dashboard, &exported);
    assert!(
        rules_missing.is_empty() && dashboard_missing.is_empty(),
        "metrics named but not exported by the bridge: alerts.yml {rules_missing:?}, \
         pgbridge.json {dashboard_missing:?}"
    );
    // And the check does catch a name the bridge does not export.
    let misspelled: BTreeSet<String> = ["bridge_wal_lag_byte".to_owned()].into();
    assert_eq!(missing(&misspelled, &exported), vec!["bridge_wal_lag_byte"]);

    assert_eq!(
        bridge.terminate(Duration::from_secs(30)),
        Some(0),
        "{}",
        bridge.log()
    );
}
