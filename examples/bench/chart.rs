//! The side-by-side as a picture: an SVG of horizontal bars, one panel per figure (rate, CPU
//! per change, peak RSS, time to first change, live latency), the bridge against Debezium
//! Server and `pg_recvlogical`. Written by hand: a few rectangles and labels need no library.

use std::fmt::Write;

use serde_json::Value as Json;

use super::round;

#[derive(Clone, Copy)]
enum Kind {
    Bridge,
    Peer,
    Ceiling,
}

impl Kind {
    fn colour(self) -> &'static str {
        match self {
            Kind::Bridge => "#1f77b4",
            Kind::Peer => "#e6832e",
            Kind::Ceiling => "#9a9a9a",
        }
    }
}

struct Bar {
    label: &'static str,
    value: f64,
    text: String,
    kind: Kind,
}

const WIDTH: f64 = 960.0;
const LABEL_W: f64 = 270.0;
const BAR_W: f64 = 420.0;
const BAR_H: f64 = 18.0;
const GAP: f64 = 6.0;
const TITLE_H: f64 = 26.0;
const PANEL_GAP: f64 = 14.0;

/// The chart, or `None` when neither the side-by-side nor the Kafka run ran.
pub(super) fn svg(r: &Json) -> Option<String> {
    let p = &r["peer"];
    let k = &r["kafka"];
    let l = &r["peer_live"];
    if p.is_null() && k.is_null() && l.is_null() {
        return None;
    }
    // (label, figures, kind) of every consumer that ran.
    let mut who: Vec<(&'static str, &Json, Kind)> = Vec::new();
    if !p.is_null() {
        who.push(("bridge → JetStream", &p["bridge"], Kind::Bridge));
        who.push((
            "Debezium → JetStream, JSON",
            &p["debezium"]["json_plain"],
            Kind::Peer,
        ));
        who.push((
            "Debezium → JetStream, JSON + schemas",
            &p["debezium"]["json_schemas"],
            Kind::Peer,
        ));
    }
    if !k.is_null() {
        who.push(("bridge → Kafka", &k["bridge"], Kind::Bridge));
        if !k["debezium"].is_null() {
            who.push(("Debezium → Kafka, JSON", &k["debezium"], Kind::Peer));
        }
    }
    let ceiling = if !p["ceiling"].is_null() {
        &p["ceiling"]
    } else {
        &k["ceiling"]
    };
    let bars = |field: &str, scale: f64, unit: &str, digits: i32| -> Vec<Bar> {
        who.iter()
            .filter_map(|(label, v, kind)| {
                let x = v[field].as_f64()? * scale;
                Some(Bar {
                    label,
                    value: x,
                    text: format!("{} {unit}", group(round(x, digits))),
                    kind: *kind,
                })
            })
            .collect()
    };
    let mut panels: Vec<(String, Vec<Bar>)> = Vec::new();
    let changes = p["changes"].as_u64().or_else(|| k["changes"].as_u64());
    let mut rate = Vec::new();
    if let Some(x) = ceiling["changes_per_s"].as_f64() {
        rate.push(Bar {
            label: "pg_recvlogical → /dev/null (ceiling)",
            value: x,
            text: format!("{} /s", group(x.round())),
            kind: Kind::Ceiling,
        });
    }
    rate.extend(bars("changes_per_s", 1.0, "/s", 0));
    panels.push((
        format!(
            "Backlog of {} changes: changes per second, spawn to all stored (higher is better)",
            changes.map(|c| group(c as f64)).unwrap_or_default()
        ),
        rate,
    ));
    panels.push((
        "CPU per change, µs, whole process (lower is better)".into(),
        bars("cpu_us_per_change", 1.0, "µs", 2),
    ));
    panels.push((
        "Peak RSS, MB (lower is better)".into(),
        bars("peak_rss_kb", 1.0 / 1024.0, "MB", 1),
    ));
    panels.push((
        "Spawn to first change stored, s (lower is better)".into(),
        bars("first_change_s", 1.0, "s", 2),
    ));
    if !l.is_null() {
        let mut lat = Vec::new();
        for (label, v, kind) in [
            ("bridge", &l["bridge"], Kind::Bridge),
            ("Debezium, JSON", &l["debezium_json_plain"], Kind::Peer),
        ] {
            if let (Some(p50), Some(p99), Some(max)) = (
                v["p50_ms"].as_f64(),
                v["p99_ms"].as_f64(),
                v["max_ms"].as_f64(),
            ) {
                lat.push(Bar {
                    label,
                    value: p99,
                    text: format!(
                        "p99 {} ms (p50 {}, max {})",
                        group(round(p99, 1)),
                        group(round(p50, 1)),
                        group(round(max, 1))
                    ),
                    kind,
                });
            }
        }
        panels.push((
            format!(
                "Live at {} changes/s: commit → subscriber receipt, p99 ms (lower is better)",
                l["target_changes_per_s"]
            ),
            lat,
        ));
        let mut cpu = Vec::new();
        for (label, v, kind) in [
            ("bridge", &l["bridge"], Kind::Bridge),
            ("Debezium, JSON", &l["debezium_json_plain"], Kind::Peer),
        ] {
            if let Some(x) = v["cpu_us_per_change"].as_f64() {
                cpu.push(Bar {
                    label,
                    value: x,
                    text: format!("{} µs", round(x, 1)),
                    kind,
                });
            }
        }
        panels.push((
            format!(
                "Live at {} changes/s: CPU per change, µs (lower is better)",
                l["target_changes_per_s"]
            ),
            cpu,
        ));
    }
    panels.retain(|(_, bars)| !bars.is_empty());

    let height: f64 = 60.0
        + panels
            .iter()
            .map(|(_, b)| TITLE_H + b.len() as f64 * (BAR_H + GAP) + PANEL_GAP)
            .sum::<f64>()
        + 30.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="#ffffff"/>"##);
    let dbz = p["debezium_server"]
        .as_str()
        .map(|v| format!("Debezium Server {v}"))
        .unwrap_or_else(|| "Debezium Server".into());
    let _ = writeln!(
        s,
        r#"<text x="12" y="24" font-size="16" font-weight="bold">pgbridge vs {}: same backlog, same machine, one run</text>"#,
        esc(&dbz)
    );
    let m = &r["machine"];
    let _ = writeln!(
        s,
        r##"<text x="12" y="44" fill="#555">{} vCPUs ({}), PostgreSQL {}, {}; commit {}</text>"##,
        m["nproc"],
        esc(m["cpu"].as_str().unwrap_or("")),
        esc(m["postgresql"].as_str().unwrap_or("")),
        esc(m["nats_server"].as_str().unwrap_or("")),
        esc(m["bridge_commit"].as_str().unwrap_or(""))
    );
    let mut y = 60.0;
    for (title, bars) in &panels {
        let _ = writeln!(
            s,
            r#"<text x="12" y="{}" font-weight="bold">{}</text>"#,
            y + 16.0,
            esc(title)
        );
        y += TITLE_H;
        let max = bars.iter().map(|b| b.value).fold(0.0, f64::max);
        for b in bars {
            let w = if max > 0.0 {
                (b.value / max * BAR_W).max(1.0)
            } else {
                1.0
            };
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
                LABEL_W - 8.0,
                y + 13.0,
                esc(b.label)
            );
            let _ = writeln!(
                s,
                r#"<rect x="{LABEL_W}" y="{y}" width="{w:.1}" height="{BAR_H}" fill="{}"/>"#,
                b.kind.colour()
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{}">{}</text>"#,
                LABEL_W + w + 6.0,
                y + 13.0,
                esc(&b.text)
            );
            y += BAR_H + GAP;
        }
        y += PANEL_GAP;
    }
    let _ = writeln!(
        s,
        r##"<text x="12" y="{}" fill="#555">Produced by scripts/bench --peer debezium; figures in target/bench/results.json.</text>"##,
        y + 12.0
    );
    s.push_str("</svg>\n");
    Some(s)
}

/// Thousands grouped by thin spaces, decimals kept.
fn group(x: f64) -> String {
    if x.abs() < 1000.0 {
        return x.to_string();
    }
    let int = x.round() as i64;
    let digits = int.abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push('\u{2009}');
        }
        out.push(c);
    }
    if int < 0 {
        format!("-{out}")
    } else {
        out
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
