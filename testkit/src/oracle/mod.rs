//! The mirror oracle, shared by the mirror and chaos tests: a seeded random workload on four
//! tables (three in `public`, one in `sales`) and its writer, the canonical row-by-row
//! comparison of a mirrored SQLite file with its PostgreSQL source, and helpers around the
//! mirror process (command, state table, consumer, catch-up).

pub mod kafka;
mod workload;

pub use crate::rng::Rng;
pub use workload::*;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::bridge::{bridge_bin, bridge_command, BridgeProcess};
use crate::pg::PgServer;
use crate::{free_port, wait_for, TestEnv};
use rusqlite::types::ValueRef;

/// Row changes the two big scenarios make at least.
pub const TARGET_CHANGES: u64 = 50_000;
/// Row changes per second the writer aims at, so the mirror's snapshots fall in the middle
/// of the workload rather than after it.
pub const WRITER_RATE: u64 = 2_500;
/// The writer stops after this long even when it has not reached its target.
pub const WRITER_LIMIT: Duration = Duration::from_secs(240);
/// The writer stops after this many row changes even when not told to.
pub const WRITER_MAX_CHANGES: u64 = 4 * TARGET_CHANGES;
/// The TRUNCATE of `items` happens after this many row changes.
pub const TRUNCATE_AT: u64 = 27_000;
/// How long a mirror or a bridge may take to bootstrap, catch up or exit.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(180);
/// Seed rows.
pub const SEED_ACCOUNTS: i64 = 3_000;
/// Seed rows of `items` orders (five lines each).
pub const SEED_ORDERS: i64 = 800;
/// Seed rows of `events`.
pub const SEED_EVENTS: i64 = 2_000;
/// Seed rows of `sales.invoices`.
pub const SEED_INVOICES: i64 = 1_500;
/// First id of the rows the writer inserts (ids below are seed rows).
pub const FRESH_ACCOUNT: i64 = 1_000_000;
/// First id of the events the writer inserts.
pub const FRESH_EVENT: i64 = 100_000;
/// Events whose primary key changed live at `id + EVENT_MOVE`.
pub const EVENT_MOVE: i64 = 10_000_000;
/// The default durable consumer of the mirror into `db`.
pub fn durable(db: &Path) -> String {
    pgbridge::mirror::default_durable(db)
}
/// The bridge's replication slot in the oracle's scenarios.
pub const SLOT: &str = "cdc_slot";
/// The mirrored tables, as `--table` takes them.
pub const TABLES: &str = "accounts,items,events,sales.invoices";

/// The four tables of the workload.
pub const SCHEMA: &str = "
CREATE TABLE accounts (id bigint PRIMARY KEY, name text, balance numeric(12,2), flag boolean,
    score double precision, data bytea, tags text[], nums int[], doc jsonb, big text,
    updated timestamptz);
ALTER TABLE accounts ALTER COLUMN big SET STORAGE EXTERNAL;
CREATE TABLE items (order_id int, line int, qty int, note text, PRIMARY KEY (order_id, line));
CREATE TABLE events (id int PRIMARY KEY, kind smallint, ratio real, day date,
    label varchar(40), flags boolean[], ws float8[]);
ALTER TABLE events REPLICA IDENTITY FULL;
CREATE SCHEMA sales;
CREATE TABLE sales.invoices (id uuid PRIMARY KEY, amount numeric, paid date, meta json,
    term interval, customer bigint, note text);
";

/// Seed rows: TOASTed values on every fourth account, NULLs here and there.
pub fn seed_sql() -> String {
    format!(
        "INSERT INTO accounts SELECT g, 'name ' || g, (g * 7 % 100000) / 100.0, \
           CASE WHEN g % 7 = 0 THEN NULL ELSE g % 3 = 0 END, g / 8.0, \
           decode(md5(g::text), 'hex'), ARRAY['t' || g, NULL, 'q\"uo,te'], ARRAY[g, -g]::int[], \
           jsonb_build_object('g', g, 'k', ARRAY[1, 2]), \
           CASE WHEN g % 4 = 0 THEN repeat(md5(g::text), 100 + (g % 150)::int) ELSE 'small ' || g END, \
           timestamptz '2025-01-01 00:00:00+00' + g * interval '1.234567 second' \
         FROM generate_series(1, {SEED_ACCOUNTS}) g; \
         INSERT INTO items SELECT o, l, o * l, CASE WHEN l = 3 THEN NULL ELSE 'note ' || o || '/' || l END \
         FROM generate_series(1, {SEED_ORDERS}) o, generate_series(1, 5) l; \
         INSERT INTO events SELECT g, (g % 300)::smallint, (g % 97) / 7.0::real, \
           date '2020-02-29' + g, 'label ' || g, ARRAY[g % 2 = 0, NULL, true], \
           ARRAY[g / 4.0, -0.5]::float8[] \
         FROM generate_series(1, {SEED_EVENTS}) g; \
         INSERT INTO sales.invoices SELECT md5('seed' || g)::uuid, g * 10.5, \
           CASE WHEN g % 5 = 0 THEN NULL ELSE date '2024-01-01' + g END, \
           ('{{ \"g\" : ' || g || ', \"s\": \"x\" }}')::json, g * interval '1 day 3 hours 0.25 second', \
           g * 1000003, CASE WHEN g % 9 = 0 THEN NULL ELSE 'inv ' || g END \
         FROM generate_series(1, {SEED_INVOICES}) g"
    )
}

// ---------------------------------------------------------------------------------------
// Canonical form.

/// How a column's values are compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// smallint, integer, bigint.
    Int,
    /// double precision.
    F8,
    /// real.
    F4,
    /// boolean: `t`/`f`.
    Bool,
    /// bytea: `\x` hex.
    Bytea,
    /// One-dimensional array: compared as JSON (PostgreSQL side: `array_to_json`).
    Array,
    /// One-dimensional float array: as `Array`, with each number compared as a float
    /// (PostgreSQL prints 3 where the mirror may write 3.0).
    FloatArray,
    /// Everything else: the text PostgreSQL prints.
    Text,
}

/// A mirrored table: its token (SQLite table name), PostgreSQL name, key and columns.
pub struct Table {
    /// Table name in the SQLite mirror.
    pub token: &'static str,
    /// Qualified name in PostgreSQL.
    pub pg: &'static str,
    /// Number of leading columns that form the primary key.
    pub key: usize,
    /// Columns in order, with how their values are compared.
    pub columns: Vec<(&'static str, Kind)>,
}

/// The workload's tables as the mirror stores them.
pub fn tables() -> Vec<Table> {
    use Kind::*;
    vec![
        Table {
            token: "accounts",
            pg: "accounts",
            key: 1,
            columns: vec![
                ("id", Int),
                ("name", Text),
                ("balance", Text),
                ("flag", Bool),
                ("score", F8),
                ("data", Bytea),
                ("tags", Array),
                ("nums", Array),
                ("doc", Text),
                ("big", Text),
                ("updated", Text),
            ],
        },
        Table {
            token: "items",
            pg: "items",
            key: 2,
            columns: vec![
                ("order_id", Int),
                ("line", Int),
                ("qty", Int),
                ("note", Text),
            ],
        },
        Table {
            token: "events",
            pg: "events",
            key: 1,
            columns: vec![
                ("id", Int),
                ("kind", Int),
                ("ratio", F4),
                ("day", Text),
                ("label", Text),
                ("flags", Array),
                ("ws", FloatArray),
            ],
        },
        Table {
            token: "sales.invoices",
            pg: "sales.invoices",
            key: 1,
            columns: vec![
                ("id", Text),
                ("amount", Text),
                ("paid", Text),
                ("meta", Text),
                ("term", Text),
                ("customer", Int),
                ("note", Text),
            ],
        },
    ]
}

/// A double in its canonical text: the shortest form that reads back as the same value.
pub fn canon_f8(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else {
        format!("{v:?}")
    }
}

/// A real in its canonical text (compared at single precision).
pub fn canon_f4(v: f32) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else {
        format!("{v:?}")
    }
}

/// JSON in canonical form (serde_json's); with `floats`, the numbers of a top-level array as
/// floats.
pub fn canon_json(s: &str, floats: bool) -> String {
    match serde_json::from_str::<serde_json::Value>(s) {
        Ok(serde_json::Value::Array(items)) if floats => {
            let items: Vec<String> = items
                .iter()
                .map(|v| match v.as_f64() {
                    Some(f) => canon_f8(f),
                    None => v.to_string(),
                })
                .collect();
            format!("[{}]", items.join(","))
        }
        Ok(v) => v.to_string(),
        Err(e) => format!("<not JSON ({e}): {s}>"),
    }
}

/// One PostgreSQL value (its text output; `array_to_json` for arrays) in canonical form.
pub fn canon_pg(kind: Kind, v: Option<&str>) -> Option<String> {
    let s = v?;
    Some(match kind {
        Kind::F8 => canon_f8(s.parse().unwrap_or_else(|_| panic!("a float8: {s}"))),
        Kind::F4 => canon_f4(s.parse().unwrap_or_else(|_| panic!("a float4: {s}"))),
        Kind::Array => canon_json(s, false),
        Kind::FloatArray => canon_json(s, true),
        Kind::Int | Kind::Bool | Kind::Bytea | Kind::Text => s.to_string(),
    })
}

/// A SQLite value as text for failure messages.
pub fn describe_sqlite(v: ValueRef<'_>) -> String {
    match v {
        ValueRef::Null => "<NULL>".into(),
        ValueRef::Integer(i) => format!("<INTEGER {i}>"),
        ValueRef::Real(f) => format!("<REAL {f:?}>"),
        ValueRef::Text(t) => format!("<TEXT {:?}>", String::from_utf8_lossy(t)),
        ValueRef::Blob(b) => format!("<BLOB {} bytes>", b.len()),
    }
}

/// One SQLite value in canonical form; a value stored with the wrong SQLite type comes out
/// as `<TYPE value>`, which never equals a PostgreSQL value.
pub fn canon_sqlite(kind: Kind, v: ValueRef<'_>) -> Option<String> {
    if let ValueRef::Null = v {
        return None;
    }
    Some(match (kind, v) {
        (Kind::Int, ValueRef::Integer(i)) => i.to_string(),
        (Kind::F8, ValueRef::Real(f)) => canon_f8(f),
        (Kind::F8, ValueRef::Integer(i)) => canon_f8(i as f64),
        (Kind::F4, ValueRef::Real(f)) => canon_f4(f as f32),
        (Kind::F4, ValueRef::Integer(i)) => canon_f4(i as f32),
        (Kind::F8 | Kind::F4, ValueRef::Text(b"NaN")) => "NaN".into(),
        (Kind::Bool, ValueRef::Integer(0)) => "f".into(),
        (Kind::Bool, ValueRef::Integer(1)) => "t".into(),
        (Kind::Bytea, ValueRef::Blob(b)) => {
            let mut s = String::with_capacity(2 + 2 * b.len());
            s.push_str("\\x");
            for byte in b {
                let _ = write!(s, "{byte:02x}");
            }
            s
        }
        (Kind::Array, ValueRef::Text(t)) => canon_json(&String::from_utf8_lossy(t), false),
        (Kind::FloatArray, ValueRef::Text(t)) => canon_json(&String::from_utf8_lossy(t), true),
        (Kind::Text, ValueRef::Text(t)) => match std::str::from_utf8(t) {
            Ok(s) => s.to_string(),
            Err(_) => format!("<TEXT not UTF-8: {:?}>", String::from_utf8_lossy(t)),
        },
        (_, other) => describe_sqlite(other),
    })
}

/// One row's canonical values.
pub type Row = Vec<Option<String>>;
/// Rows by canonical primary key.
pub type Rows = BTreeMap<String, Row>;

/// The canonical primary key of `row`.
pub fn key_of(t: &Table, row: &Row) -> String {
    row[..t.key]
        .iter()
        .map(|v| v.as_deref().unwrap_or("<NULL>"))
        .collect::<Vec<_>>()
        .join("|")
}

/// `s` as a quoted SQL identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The source table in canonical form, by key.
pub fn pg_rows(pg: &PgServer, t: &Table) -> Rows {
    let select: Vec<String> = t
        .columns
        .iter()
        .map(|(c, k)| match k {
            Kind::Array | Kind::FloatArray => {
                format!("array_to_json({})::text", quote_ident(c))
            }
            _ => quote_ident(c),
        })
        .collect();
    let sql = format!(
        "SET DateStyle = ISO; SET TimeZone = 'UTC'; SET extra_float_digits = 3; \
         SET IntervalStyle = postgres; SET bytea_output = hex; SELECT {} FROM {}",
        select.join(", "),
        t.pg
    );
    pg.sql("app", &sql)
        .rows
        .iter()
        .map(|r| {
            let row: Row = t
                .columns
                .iter()
                .zip(r)
                .map(|((_, k), v)| canon_pg(*k, v.as_deref()))
                .collect();
            (key_of(t, &row), row)
        })
        .collect()
}

/// Opens the mirror's SQLite file read-only, waiting for its writer when busy.
pub fn open_sqlite(db: &Path) -> rusqlite::Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open_with_flags(
        db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(30))?;
    Ok(conn)
}

/// The mirrored table in canonical form, by key.
pub fn sqlite_rows(db: &Path, t: &Table) -> Result<Rows, String> {
    let conn = open_sqlite(db).map_err(|e| format!("open {}: {e}", db.display()))?;
    let select: Vec<String> = t.columns.iter().map(|(c, _)| quote_ident(c)).collect();
    let sql = format!("SELECT {} FROM {}", select.join(", "), quote_ident(t.token));
    let mut stmt = conn
        .prepare(&sql)
        .map_err(|e| format!("{}: {sql}: {e}", t.token))?;
    let mut rows = stmt.query([]).map_err(|e| format!("{}: {e}", t.token))?;
    let mut out = Rows::new();
    while let Some(r) = rows.next().map_err(|e| format!("{}: {e}", t.token))? {
        let mut row = Row::with_capacity(t.columns.len());
        for (i, (_, k)) in t.columns.iter().enumerate() {
            let v = r.get_ref(i).map_err(|e| format!("{}: {e}", t.token))?;
            row.push(canon_sqlite(*k, v));
        }
        let key = key_of(t, &row);
        if let Some(prev) = out.insert(key.clone(), row) {
            return Err(format!(
                "{}: two rows with key {key} (one is {prev:?})",
                t.token
            ));
        }
    }
    Ok(out)
}

/// A value shortened for failure messages.
pub fn short(v: &Option<String>) -> String {
    match v {
        None => "NULL".into(),
        Some(s) if s.chars().count() > 72 => {
            let head: String = s.chars().take(60).collect();
            format!("{head:?}… ({} chars)", s.chars().count())
        }
        Some(s) => format!("{s:?}"),
    }
}

/// Compares one table; `Err` describes the first differences (not the whole table).
pub fn compare_table(pg: &PgServer, db: &Path, t: &Table) -> Result<usize, String> {
    let source = pg_rows(pg, t);
    let mirrored = sqlite_rows(db, t)?;
    if source == mirrored {
        return Ok(source.len());
    }
    let mut report = format!(
        "table {}: source has {} rows, the mirror {}; first differences:\n",
        t.token,
        source.len(),
        mirrored.len()
    );
    let mut shown = 0;
    let mut differing = 0;
    let keys: std::collections::BTreeSet<&String> = source.keys().chain(mirrored.keys()).collect();
    for key in keys {
        let line = match (source.get(key), mirrored.get(key)) {
            (Some(s), Some(m)) if s == m => continue,
            (Some(_), None) => format!("  key {key}: missing in the mirror\n"),
            (None, Some(_)) => format!("  key {key}: in the mirror only (not in the source)\n"),
            (Some(s), Some(m)) => {
                let mut l = format!("  key {key}:\n");
                for (((name, _), sv), mv) in t.columns.iter().zip(s).zip(m) {
                    if sv != mv {
                        let _ = writeln!(l, "    {name}: expected {} got {}", short(sv), short(mv));
                    }
                }
                l
            }
            (None, None) => unreachable!(),
        };
        differing += 1;
        if shown < 8 {
            report.push_str(&line);
            shown += 1;
        }
    }
    let _ = writeln!(report, "  ({differing} differing keys in all)");
    Err(report)
}

/// Compares every table; `Err` holds the report of each differing table.
pub fn compare_all(
    pg: &PgServer,
    db: &Path,
    tables: &[Table],
) -> Result<Vec<(String, usize)>, String> {
    let mut counts = Vec::new();
    let mut errors = String::new();
    for t in tables {
        match compare_table(pg, db, t) {
            Ok(n) => counts.push((t.token.to_string(), n)),
            Err(e) => errors.push_str(&e),
        }
    }
    if errors.is_empty() {
        Ok(counts)
    } else {
        Err(errors)
    }
}

// ---------------------------------------------------------------------------------------
// The mirror's side: process, state table, consumer.

/// `bridge mirror` for `db` (`tables` for `--table`, none: every table with a schema); only
/// NATS settings in the environment.
pub fn mirror_command(
    nats_url: &str,
    db: &Path,
    dir: &Path,
    tables: Option<&str>,
    extra: &[&str],
) -> Command {
    let mut cmd = Command::new(bridge_bin());
    cmd.env_clear()
        .env("NATS_URL", nats_url)
        .env("BRIDGE_PORT", free_port().to_string())
        .env("RUST_LOG", "info")
        .env("TMPDIR", dir)
        .arg("mirror")
        .arg("--db")
        .arg(db)
        .args(extra);
    if let Some(tables) = tables {
        cmd.args(["--table", tables]);
    }
    cmd
}

/// The last `lines` lines of `log`.
pub fn tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// One row of `_pgbridge_mirror`: table_token, snapshot_id, lsn, last_seq.
pub type StateRow = (String, Option<String>, Option<String>, Option<i64>);

/// Rows of `_pgbridge_mirror`; empty while the file or the table does not exist yet.
pub fn mirror_state(db: &Path) -> Vec<StateRow> {
    if !db.exists() {
        return Vec::new();
    }
    let Ok(conn) = open_sqlite(db) else {
        return Vec::new();
    };
    let Ok(mut stmt) = conn
        .prepare("SELECT table_token, snapshot_id, lsn, last_seq FROM _pgbridge_mirror ORDER BY 1")
    else {
        return Vec::new();
    };
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .map(|rows| rows.filter_map(Result::ok).collect())
        .unwrap_or_default()
}

/// Whether every table of `tokens` has a loaded snapshot in the state table.
pub fn bootstrapped(db: &Path, tokens: &[&str]) -> bool {
    let state = mirror_state(db);
    tokens.iter().all(|t| {
        state
            .iter()
            .any(|(tok, snap, lsn, _)| tok == t && snap.is_some() && lsn.is_some())
    })
}

/// (num_pending, num_ack_pending, delivered stream sequence) of the durable consumer, and the
/// CDC stream's last sequence.
pub fn consumer_state(nats_url: &str, durable: &str) -> Option<(u64, usize, u64, u64)> {
    crate::nats::with_nats(nats_url, |client| async move {
        let js = async_nats::jetstream::new(client);
        let mut stream = js.get_stream("CDC").await.ok()?;
        let last = stream.info().await.ok()?.state.last_sequence;
        let info = stream.consumer_info(durable).await.ok()?;
        Some((
            info.num_pending,
            info.num_ack_pending,
            info.delivered.stream_sequence,
            last,
        ))
    })
}

/// Waits until the bridge has confirmed everything written and the mirror's consumer has
/// nothing pending or unacknowledged (twice in a row, a moment apart).
pub fn wait_mirror_caught_up(pg: &PgServer, nats_url: &str, durable: &str) {
    crate::slot::wait_caught_up(pg, SLOT, STEP_TIMEOUT);
    let mut streak = 0;
    wait_for("the mirror's consumer to catch up", STEP_TIMEOUT, || {
        match consumer_state(nats_url, durable) {
            Some((0, 0, delivered, last)) if delivered >= last => streak += 1,
            _ => streak = 0,
        }
        std::thread::sleep(Duration::from_millis(200));
        (streak >= 2).then_some(())
    });
}

/// Grants the bridge's role read access to schema `sales` (init.sh grants `public` only).
pub fn grant_sales(pg: &PgServer) {
    pg.sql(
        "app",
        "GRANT USAGE ON SCHEMA sales TO bridge_reader; \
         GRANT SELECT ON ALL TABLES IN SCHEMA sales TO bridge_reader",
    );
}

/// A bridge for the oracle's tables, publishing to the environment's NATS.
pub fn spawn_bridge(env: &TestEnv, state_dir: &Path) -> BridgeProcess {
    spawn_bridge_with(env, state_dir, &[])
}

/// [`spawn_bridge`] with extra bridge arguments.
pub fn spawn_bridge_with(env: &TestEnv, state_dir: &Path, extra: &[&str]) -> BridgeProcess {
    let bridge = BridgeProcess::spawn(
        bridge_command(&env.pg, &env.nats.url(), state_dir)
            .args(["--snapshot-chunk-rows", "64"])
            .args(extra),
    );
    bridge.wait_for_line("snapshot requests served", Duration::from_secs(60));
    bridge
}

/// Kills a process with SIGKILL and reaps it.
pub fn kill_9(p: &mut BridgeProcess) {
    p.child.signal(libc::SIGKILL);
    p.wait_exit(Duration::from_secs(30));
}
