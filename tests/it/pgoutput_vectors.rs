//! The decoder's unit-test vectors (`tests/vectors/*.hex`) come from a real server. This test
//! replays each scenario (`tests/vectors/*.sql`) on a fresh cluster, captures the pgoutput
//! bytes with `pg_logical_slot_peek_binary_changes`, and checks that they decode to the same
//! messages as the stored capture (OIDs, xids and LSNs differ between runs and are left out).
//!
//! `PGBRIDGE_UPDATE_VECTORS=1 cargo test --test it pgoutput_vectors` rewrites the stored files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use pgbridge::pg::pgoutput::{Cell, Decoder, LogicalMessage, OldTuple, TupleData};
use testkit::PgServer;

struct Scenario {
    name: String,
    options: Vec<(String, String)>,
    setup: String,
    workload: String,
}

fn vectors_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

fn scenarios() -> Vec<Scenario> {
    let mut out = Vec::new();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(vectors_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .collect();
    paths.sort();
    for p in paths {
        let text = std::fs::read_to_string(&p).unwrap();
        let first = text.lines().next().unwrap();
        let options = first
            .strip_prefix("-- options: ")
            .expect("first line: -- options: k=v ...")
            .split_whitespace()
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k.to_string(), v.to_string())
            })
            .collect();
        let (setup, workload) = text
            .split_once("-- @workload\n")
            .expect("-- @workload marker");
        out.push(Scenario {
            name: p.file_stem().unwrap().to_string_lossy().into_owned(),
            options,
            setup: setup.to_string(),
            workload: workload.to_string(),
        });
    }
    out
}

/// Runs the scenario in its own database and returns `(lsn, xid, bytes)` per message.
fn capture(pg: &PgServer, s: &Scenario) -> Vec<(String, String, Vec<u8>)> {
    let db = pg.create_database(&format!("v_{}", s.name));
    let mut c = pg.connect(&db);
    c.execute(&s.setup).unwrap();
    c.execute("CREATE PUBLICATION pub FOR ALL TABLES").unwrap();
    c.execute("SELECT pg_create_logical_replication_slot('cap', 'pgoutput')")
        .unwrap();
    // One statement at a time, as psql sends them: a multi-statement string would run as a
    // single transaction.
    let mut stmt = String::new();
    for line in s.workload.lines() {
        stmt.push_str(line);
        stmt.push('\n');
        if line.trim_end().ends_with(';') {
            c.execute(&stmt).unwrap();
            stmt.clear();
        }
    }
    assert!(
        stmt.trim().is_empty(),
        "{}: unterminated statement {stmt:?}",
        s.name
    );
    // Decoding stops at the flushed WAL position; records that do not flush by themselves
    // (a non-transactional message, an abort) need a push.
    c.execute("SELECT pg_switch_wal()").unwrap();
    let opts: String = s
        .options
        .iter()
        .map(|(k, v)| format!(", '{k}', '{v}'"))
        .collect();
    c.execute("SET logical_decoding_work_mem = '64kB'").unwrap();
    let r = c
        .query(&format!(
            "SELECT lsn::text, xid::text, data FROM pg_logical_slot_peek_binary_changes('cap', NULL, NULL, 'publication_names', 'pub'{opts})"
        ))
        .unwrap();
    c.execute("SELECT pg_drop_replication_slot('cap')").unwrap();
    r.rows
        .into_iter()
        .map(|row| {
            let hex = row[2].as_deref().unwrap();
            let bytes = from_hex(hex.strip_prefix("\\x").unwrap());
            (row[0].clone().unwrap(), row[1].clone().unwrap(), bytes)
        })
        .collect()
}

fn from_hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn stored(name: &str) -> Vec<Vec<u8>> {
    std::fs::read_to_string(vectors_dir().join(format!("{name}.hex")))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| from_hex(l.split_whitespace().nth(2).unwrap()))
        .collect()
}

/// A run-independent rendering: names instead of OIDs, values, no LSNs/xids/times. What a
/// server streams before the commit depends on its memory accounting and version (18 does not
/// stream a transaction it knows to be aborted), so streamed transactions are rendered as they
/// survive: their changes at Stream Commit or Stream Prepare, without the aborted parts, and
/// S/E/A are left out; so are empty transactions, which only 14 sends.
fn fingerprint(messages: &[Vec<u8>]) -> Vec<String> {
    let mut decoder = Decoder::new();
    // Per streamed top-level xid: (subtransaction, line) in stream order.
    let mut streams: HashMap<u32, Vec<(u32, String)>> = HashMap::new();
    let mut open: Option<u32> = None;
    let mut names: HashMap<u32, String> = HashMap::new();
    let cells = |t: &TupleData<'_>| {
        t.iter()
            .map(|c| match c {
                Cell::Null => "n".to_string(),
                Cell::Unchanged => "u".to_string(),
                Cell::Text(b) => format!("t{:?}", String::from_utf8_lossy(b)),
                Cell::Binary(b) => format!("b{}", to_hex(b)),
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    let old = |o: &OldTuple<'_>| match o {
        OldTuple::Key(t) => format!("K[{}]", cells(t)),
        OldTuple::Full(t) => format!("O[{}]", cells(t)),
    };
    let mut out = Vec::new();
    for m in messages {
        let msg = decoder.decode(m).expect("captured message decodes");
        let sub = match &msg {
            LogicalMessage::Relation(r) => r.xid,
            LogicalMessage::Type(t) => t.xid,
            LogicalMessage::Insert(i) => i.xid,
            LogicalMessage::Update(u) => u.xid,
            LogicalMessage::Delete(d) => d.xid,
            LogicalMessage::Truncate(t) => t.xid,
            LogicalMessage::Message(m) => m.xid,
            _ => None,
        };
        match &msg {
            LogicalMessage::StreamStart(s) => {
                open = Some(s.xid);
                continue;
            }
            LogicalMessage::StreamStop => {
                open = None;
                continue;
            }
            LogicalMessage::StreamAbort(a) => {
                let lines = streams.entry(a.xid).or_default();
                match lines.iter().position(|(s, _)| *s == a.subxid) {
                    _ if a.is_whole_transaction() => lines.clear(),
                    Some(cut) => lines.truncate(cut),
                    None => {}
                }
                continue;
            }
            LogicalMessage::StreamCommit(c) => {
                out.extend(
                    streams
                        .remove(&c.xid)
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(_, l)| l),
                );
            }
            LogicalMessage::StreamPrepare(p) => {
                out.extend(
                    streams
                        .remove(&p.xid)
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(_, l)| l),
                );
            }
            _ => {}
        }
        let line = match msg {
            LogicalMessage::Begin(_) => "B".to_string(),
            LogicalMessage::Commit(_) => "C".to_string(),
            LogicalMessage::Relation(r) => {
                names.insert(r.relid, format!("{}.{}", r.namespace, r.name));
                let cols: Vec<String> = r
                    .columns
                    .iter()
                    .map(|c| {
                        let ty = if c.type_oid < 10000 {
                            c.type_oid.to_string()
                        } else {
                            "user".into()
                        };
                        format!("{}{}:{}", if c.is_key() { "*" } else { "" }, c.name, ty)
                    })
                    .collect();
                format!(
                    "R {}.{} {:?} {}",
                    r.namespace,
                    r.name,
                    r.replica_identity,
                    cols.join(" ")
                )
            }
            LogicalMessage::Type(t) => format!("Y {}.{}", t.namespace, t.name),
            LogicalMessage::Insert(i) => format!("I {} [{}]", names[&i.relid], cells(&i.new)),
            LogicalMessage::Update(u) => format!(
                "U {} {} [{}]",
                names[&u.relid],
                u.old.as_ref().map(&old).unwrap_or_default(),
                cells(&u.new)
            ),
            LogicalMessage::Delete(d) => format!("D {} {}", names[&d.relid], old(&d.old)),
            LogicalMessage::Truncate(t) => format!(
                "T {} flags={}",
                t.relids
                    .iter()
                    .map(|r| names[r].clone())
                    .collect::<Vec<_>>()
                    .join(","),
                t.flags
            ),
            LogicalMessage::Message(m) => format!(
                "M tx={} {} {:?}",
                m.transactional(),
                m.prefix,
                String::from_utf8_lossy(m.content)
            ),
            LogicalMessage::StreamCommit(_) => "c".to_string(),
            other => format!("{}", other.tag() as char),
        };
        match (open, sub) {
            (Some(top), Some(sub)) => streams.entry(top).or_default().push((sub, line)),
            // 14 sends transactions with nothing published as Begin, Commit; 15+ skips them.
            _ if line == "C" && out.last().is_some_and(|l| l == "B") => {
                out.pop();
            }
            _ => out.push(line),
        }
    }
    out
}

#[test]
fn stored_vectors_match_a_live_capture() {
    let pg = PgServer::start();
    let version = pg.sql("postgres", "SHOW server_version").rows[0][0]
        .clone()
        .unwrap();
    let update = std::env::var_os("PGBRIDGE_UPDATE_VECTORS").is_some();
    let all = scenarios();
    assert!(all.len() >= 9, "scenarios found: {}", all.len());
    let major: u32 = pg.sql("postgres", "SHOW server_version_num").rows[0][0]
        .as_deref()
        .unwrap()
        .parse::<u32>()
        .unwrap()
        / 10000;
    for s in &all {
        // pgoutput refuses a protocol above the server's: 2 needs 14, 3 needs 15, 4 needs 16.
        let proto: u32 = s
            .options
            .iter()
            .find(|(k, _)| k == "proto_version")
            .map_or(1, |(_, v)| v.parse().unwrap());
        let needs = match proto {
            1 => 10,
            p => 12 + p,
        };
        if major < needs {
            println!(
                "SKIPPED scenario {}: pgoutput protocol {proto} needs PostgreSQL {needs}+, the server is {major}",
                s.name
            );
            continue;
        }
        let live = capture(&pg, s);
        assert!(!live.is_empty(), "{}: nothing captured", s.name);
        let live_bytes: Vec<Vec<u8>> = live.iter().map(|(_, _, b)| b.clone()).collect();
        if update {
            let opts: Vec<String> = s.options.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let mut text = format!("# captured from {version} with: {}\n", opts.join(" "));
            for (lsn, xid, b) in &live {
                text.push_str(&format!("{lsn} {xid} {}\n", to_hex(b)));
            }
            std::fs::write(vectors_dir().join(format!("{}.hex", s.name)), text).unwrap();
            continue;
        }
        assert_eq!(
            fingerprint(&live_bytes),
            fingerprint(&stored(&s.name)),
            "scenario {}: the live server's pgoutput differs from tests/vectors/{}.hex \
             (PGBRIDGE_UPDATE_VECTORS=1 rewrites it)",
            s.name,
            s.name
        );
    }
}
