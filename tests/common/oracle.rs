//! The mirror oracle, shared by the mirror and chaos tests: a seeded random workload on four
//! tables (three in `public`, one in `sales`) and its writer, the canonical row-by-row
//! comparison of a mirrored SQLite file with its PostgreSQL source, and helpers around the
//! mirror process (command, state table, consumer, catch-up).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{bridge_command, free_port, wait_for, BridgeProcess, PgServer, TestEnv};
use pgbridge::pg::conn::{quote_literal, PgConnection};
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
pub const SEED_ORDERS: i64 = 800;
pub const SEED_EVENTS: i64 = 2_000;
pub const SEED_INVOICES: i64 = 1_500;
/// First id of the rows the writer inserts (ids below are seed rows).
pub const FRESH_ACCOUNT: i64 = 1_000_000;
pub const FRESH_EVENT: i64 = 100_000;
/// Events whose primary key changed live at `id + EVENT_MOVE`.
pub const EVENT_MOVE: i64 = 10_000_000;
/// The default durable consumer of the mirror into `db`.
pub fn durable(db: &Path) -> String {
    pgbridge::mirror::default_durable(db)
}
pub const SLOT: &str = "cdc_slot";
/// The mirrored tables, as `--table` takes them.
pub const TABLES: &str = "accounts,items,events,sales.invoices";

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
    pub token: &'static str,
    pub pg: &'static str,
    pub key: usize,
    pub columns: Vec<(&'static str, Kind)>,
}

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

pub fn canon_f8(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else {
        format!("{v:?}")
    }
}

pub fn canon_f4(v: f32) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else {
        format!("{v:?}")
    }
}

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

pub type Row = Vec<Option<String>>;
pub type Rows = BTreeMap<String, Row>;

pub fn key_of(t: &Table, row: &Row) -> String {
    row[..t.key]
        .iter()
        .map(|v| v.as_deref().unwrap_or("<NULL>"))
        .collect::<Vec<_>>()
        .join("|")
}

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
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bridge"));
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
    super::with_nats(nats_url, |client| async move {
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
    super::wait_caught_up(pg, SLOT, STEP_TIMEOUT);
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

// ---------------------------------------------------------------------------------------
// The workload.

/// xorshift64.
pub struct Rng(pub u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// In `lo..=hi`.
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next() % (hi - lo + 1) as u64) as i64
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[(self.next() % xs.len() as u64) as usize]
    }
}

/// Texts that are easy to get wrong on the way.
pub const SPECIAL_TEXTS: &[&str] = &[
    "",
    "a'b",
    "back\\slash",
    "line\nbreak",
    "tab\there",
    "ünïcödé € ✓",
    "emoji 😀",
    "NULL",
    "  spaces  ",
    "{\"looks\": \"like json\"}",
    "[1,2]",
    "12.50",
];

/// What the writer did.
pub struct WriterReport {
    pub changes: u64,
    pub transactions: u64,
    pub statements: u64,
    pub truncated: bool,
    pub elapsed: Duration,
}

/// The writer: a thread running random transactions against `app`, at most `rate` row changes
/// per second, until told to stop once it has made `target` row changes; in any case it stops
/// after `WRITER_LIMIT` or `WRITER_MAX_CHANGES`.
pub struct Writer {
    pub handle: JoinHandle<WriterReport>,
    pub changes: Arc<AtomicU64>,
    pub stop: Arc<AtomicBool>,
}

impl Writer {
    pub fn start(pg: &PgServer, seed: u64, target: u64, rate: u64) -> Self {
        let changes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut conn = pg.connect("app");
        let handle = {
            let changes = Arc::clone(&changes);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut w = Workload::new(seed);
                let started = Instant::now();
                let mut report = WriterReport {
                    changes: 0,
                    transactions: 0,
                    statements: 0,
                    truncated: false,
                    elapsed: Duration::ZERO,
                };
                while started.elapsed() < WRITER_LIMIT {
                    let done = changes.load(Ordering::Relaxed);
                    if (stop.load(Ordering::Relaxed) && done >= target)
                        || done >= WRITER_MAX_CHANGES
                    {
                        break;
                    }
                    let statements = if !w.truncated && done >= TRUNCATE_AT {
                        w.truncated = true;
                        report.truncated = true;
                        w.truncate()
                    } else {
                        w.transaction()
                    };
                    let n = run_transaction(&mut conn, &statements, seed);
                    report.transactions += 1;
                    report.statements += statements.len() as u64;
                    let done = changes.fetch_add(n, Ordering::Relaxed) + n;
                    // Pace: at most `rate` changes per second.
                    let due = Duration::from_millis(done * 1000 / rate);
                    let elapsed = started.elapsed();
                    if due > elapsed {
                        std::thread::sleep(due - elapsed);
                    }
                }
                report.changes = changes.load(Ordering::Relaxed);
                report.elapsed = started.elapsed();
                report
            })
        };
        Writer {
            handle,
            changes,
            stop,
        }
    }

    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    /// Waits (bounded) until the writer has made at least `n` changes.
    pub fn wait_changes(&self, n: u64) {
        wait_for(
            &format!("the writer to reach {n} changes"),
            WRITER_LIMIT,
            || (self.changes() >= n || self.handle.is_finished()).then_some(()),
        );
        assert!(self.changes() >= n, "the writer stopped early");
    }

    pub fn finish(self) -> WriterReport {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("the writer panicked")
    }
}

/// Runs the statements in one transaction; the number of rows they changed (each statement
/// returns one row per changed row; TRUNCATE counts as one; nothing counts that a ROLLBACK
/// undid).
pub fn run_transaction(conn: &mut PgConnection, statements: &[String], seed: u64) -> u64 {
    let mut run = |sql: &str| {
        conn.query(sql)
            .unwrap_or_else(|e| panic!("writer statement failed: {e}\n{sql}\n(seed {seed})"))
    };
    let mut n = 0;
    let mut at_savepoint = 0;
    run("BEGIN");
    for sql in statements {
        match sql.as_str() {
            ROLLBACK => {
                run(ROLLBACK);
                return 0;
            }
            SAVEPOINT => {
                run(SAVEPOINT);
                at_savepoint = n;
            }
            ROLLBACK_TO_SAVEPOINT => {
                run(ROLLBACK_TO_SAVEPOINT);
                n = at_savepoint;
            }
            _ if sql.starts_with("TRUNCATE") => {
                run(sql);
                n += 1;
            }
            _ => n += run(sql).rows.len() as u64,
        }
    }
    run("COMMIT");
    n
}

/// Control statements of the writer's transactions.
pub const ROLLBACK: &str = "ROLLBACK";
pub const SAVEPOINT: &str = "SAVEPOINT s";
pub const ROLLBACK_TO_SAVEPOINT: &str = "ROLLBACK TO SAVEPOINT s";

/// The writer's state: fresh keys and its random sequence.
///
/// Keys are chosen so that no statement can fail: rows are inserted only with keys never used
/// before, and a primary-key change either moves a row to a fresh key or flips its sign
/// (`id = -id`, `line = -line`), and at most one of `x` and `-x` ever exists.
pub struct Workload {
    pub rng: Rng,
    pub n: u64,
    pub next_account: i64,
    pub next_order: i64,
    pub next_event: i64,
    pub truncated: bool,
}

impl Workload {
    pub fn new(seed: u64) -> Self {
        Workload {
            rng: Rng::new(seed),
            n: 0,
            next_account: FRESH_ACCOUNT,
            next_order: SEED_ORDERS + 1,
            next_event: FRESH_EVENT,
            truncated: false,
        }
    }

    /// One transaction: mostly one statement, sometimes up to five; now and then one large
    /// enough that PostgreSQL streams it before its commit, one rolled back, one with a
    /// savepoint rolled back, or a chain of changes of the same rows.
    pub fn transaction(&mut self) -> Vec<String> {
        let mut v: Vec<String> = match self.rng.next() % 1000 {
            0 | 1 => vec![self.large(), self.statement()],
            2 | 3 => vec![self.large(), self.statement(), ROLLBACK.into()],
            4..=29 => vec![
                self.statement(),
                SAVEPOINT.into(),
                self.statement(),
                self.statement(),
                ROLLBACK_TO_SAVEPOINT.into(),
                self.statement(),
            ],
            30..=69 => self.chain(),
            _ => Vec::new(),
        };
        if v.is_empty() {
            let count = if self.rng.chance(60) {
                1
            } else {
                self.rng.range(2, 5)
            };
            v = (0..count).map(|_| self.statement()).collect();
        }
        v
    }

    /// A statement changing about a thousand rows.
    pub fn large(&mut self) -> String {
        let n = self.n;
        if self.rng.chance(50) {
            let o = self.order_id();
            format!(
                "UPDATE items SET qty = coalesce(qty, 0) + 1, note = 'bulk {n}' \
                 WHERE order_id BETWEEN {o} AND {} RETURNING 1",
                o + 250
            )
        } else {
            let a = self.rng.range(1, SEED_ACCOUNTS);
            format!(
                "UPDATE accounts SET flag = NOT flag, balance = balance + 0.01 \
                 WHERE id BETWEEN {a} AND {} OR id BETWEEN {} AND {} RETURNING 1",
                a + 500,
                -a - 500,
                -a
            )
        }
    }

    /// New rows changed again in the same transaction: updated (also the TOASTed column),
    /// their key changed, some deleted.
    pub fn chain(&mut self) -> Vec<String> {
        self.n += 1;
        let n = self.n;
        if self.rng.chance(50) {
            let lo = self.next_account;
            let hi = lo + self.rng.range(1, 4);
            self.next_account = hi + 1;
            let score = self.float8();
            vec![
                format!(
                    "INSERT INTO accounts (id, name, big, tags, nums) \
                     SELECT g, 'chain {n}', repeat(md5(g::text), 120), ARRAY['c'], '{{}}' \
                     FROM generate_series({lo}, {hi}) g RETURNING 1"
                ),
                format!(
                    "UPDATE accounts SET name = 'chain updated', score = {score} \
                     WHERE id BETWEEN {lo} AND {hi} RETURNING 1"
                ),
                format!(
                    "UPDATE accounts SET id = -id WHERE id BETWEEN {lo} AND {} RETURNING 1",
                    lo + 1
                ),
                format!("UPDATE accounts SET big = 'short {n}' WHERE id = {hi} RETURNING 1"),
                format!("DELETE FROM accounts WHERE id = {} RETURNING 1", -lo),
                format!(
                    "UPDATE accounts SET id = -id WHERE id = {} RETURNING 1",
                    -lo - 1
                ),
            ]
        } else {
            let o = self.next_order;
            let to = o + 1;
            self.next_order += 2;
            vec![
                format!(
                    "INSERT INTO items SELECT {o}, l, l, 'chain {n}' \
                     FROM generate_series(1, 4) l RETURNING 1"
                ),
                format!(
                    "UPDATE items SET line = -line WHERE order_id = {o} AND line <= 2 RETURNING 1"
                ),
                format!("UPDATE items SET qty = 0 WHERE order_id = {o} RETURNING 1"),
                format!("UPDATE items SET order_id = {to} WHERE order_id = {o} RETURNING 1"),
                format!("DELETE FROM items WHERE order_id = {to} AND line = 3 RETURNING 1"),
            ]
        }
    }

    /// TRUNCATE items, then new orders in the same transaction and the next ones.
    pub fn truncate(&mut self) -> Vec<String> {
        let first = self.next_order;
        self.next_order += 300;
        vec![
            "TRUNCATE items".to_string(),
            format!(
                "INSERT INTO items SELECT o, l, o + l, 'after truncate ' || o \
                 FROM generate_series({first}, {}) o, generate_series(1, 4) l RETURNING 1",
                first + 299
            ),
        ]
    }

    pub fn statement(&mut self) -> String {
        self.n += 1;
        match self.rng.next() % 100 {
            0..=39 => self.accounts(),
            40..=64 => self.items(),
            65..=79 => self.events(),
            _ => self.invoices(),
        }
    }

    pub fn text(&mut self) -> String {
        let n = self.n;
        match self.rng.next() % 10 {
            0 => "NULL".into(),
            1..=3 => quote_literal(self.rng.pick(SPECIAL_TEXTS)),
            _ => format!("'w{n}-{}'", self.rng.next() % 1000),
        }
    }

    pub fn float8(&mut self) -> String {
        let r = self.rng.next();
        match r % 12 {
            0 => "NULL".into(),
            1 => "'NaN'::float8".into(),
            2 => "'Infinity'::float8".into(),
            3 => "'-Infinity'::float8".into(),
            4 => format!("'{:e}'::float8", (r >> 20) as f64 * 1e290),
            5 => format!("'{:e}'::float8", (r >> 20) as f64 * -1e-300),
            6..=8 => format!(
                "'{:e}'::float8",
                ((r >> 16) % 1_000_000_000) as f64 / 1000.0
            ),
            _ => format!("{}::float8 / 8", (r >> 20) % 100_000),
        }
    }

    pub fn account_id(&mut self) -> i64 {
        match self.rng.next() % 10 {
            0..=4 => self.rng.range(1, SEED_ACCOUNTS),
            5 | 6 => -self.rng.range(1, SEED_ACCOUNTS),
            _ => self
                .rng
                .range(FRESH_ACCOUNT, self.next_account.max(FRESH_ACCOUNT + 1)),
        }
    }

    pub fn accounts(&mut self) -> String {
        let n = self.n;
        let a = self.account_id();
        let w = self.rng.range(0, 6);
        match self.rng.next() % 100 {
            // Inserts, a third of them with a TOASTed value (3.2 to 8 KB).
            0..=19 => {
                let k = self.rng.range(1, 8);
                let lo = self.next_account;
                self.next_account += k;
                let name = self.text();
                let score = self.float8();
                let special = quote_literal(self.rng.pick(SPECIAL_TEXTS));
                let extra = self.rng.range(-1000, 1000);
                let len = self.rng.range(100, 250);
                let big = self.text();
                format!(
                    "INSERT INTO accounts (id, name, balance, flag, score, data, tags, nums, doc, \
                     big, updated) \
                     SELECT g, {name} || g, (g % 100000) / 100.0 + {extra} / 4.0, \
                       CASE WHEN g % 5 = 0 THEN NULL ELSE g % 2 = 0 END, {score}, \
                       CASE WHEN g % 6 = 0 THEN NULL WHEN g % 6 = 1 THEN '\\x'::bytea \
                         ELSE decode(md5(g::text || '{n}'), 'hex') END, \
                       CASE WHEN g % 7 = 0 THEN NULL WHEN g % 7 = 1 THEN '{{}}'::text[] \
                         ELSE ARRAY[{special}, 'g' || g, NULL] END, \
                       ARRAY[(g % 1000)::int, {extra}], \
                       jsonb_build_object('g', g, 's', {special}, 'n', {n}), \
                       CASE WHEN g % 3 = 0 THEN repeat(md5(g::text || '{n}'), {len}) ELSE {big} END, \
                       timestamptz '2025-01-01 00:00:00+00' + g * interval '1.000123 second' \
                         + {n} * interval '1 minute' \
                     FROM generate_series({lo}, {}) g RETURNING 1",
                    lo + k - 1
                )
            }
            // Updates leaving `big` alone: unchanged TOAST for long values.
            20..=44 => {
                let name = self.text();
                let score = self.float8();
                let d = self.rng.range(-500, 500);
                format!(
                    "UPDATE accounts SET balance = balance + {d} / 4.0, flag = NOT flag, \
                     score = {score}, name = {name}, updated = updated + interval '1.5 ms', \
                     nums = nums || {d} \
                     WHERE id BETWEEN {a} AND {} RETURNING 1",
                    a + w
                )
            }
            // Updates of the TOASTed column (new long value, short value or NULL).
            45..=59 => {
                let len = self.rng.range(100, 250);
                let short = self.text();
                let big = match self.rng.next() % 10 {
                    0..=6 => format!("repeat(md5(id::text || '{n}'), {len})"),
                    7 | 8 => short,
                    _ => "NULL".into(),
                };
                let special = quote_literal(self.rng.pick(SPECIAL_TEXTS));
                format!(
                    "UPDATE accounts SET big = {big}, data = decode(md5(id::text || '{n}x'), 'hex'), \
                     tags = array_append(tags, {special}), doc = doc || '{{\"u\": {n}}}' \
                     WHERE id BETWEEN {a} AND {} RETURNING 1",
                    a + w.min(2)
                )
            }
            // Primary-key changes: a sign flip of a few rows, or a move to a fresh id.
            60..=69 => format!(
                "UPDATE accounts SET id = -id WHERE id BETWEEN {a} AND {} RETURNING 1",
                a + w.min(3)
            ),
            70..=76 => {
                let to = self.next_account;
                self.next_account += 1;
                format!(
                    "UPDATE accounts SET id = {to}, name = 'moved {n}' \
                     WHERE id = (SELECT min(id) FROM accounts WHERE id >= {a}) RETURNING 1"
                )
            }
            // Upserts: of existing rows (an update) or of a fresh id (an insert).
            77..=84 => {
                let to = self.next_account;
                self.next_account += 1;
                let name = self.text();
                let score = self.float8();
                format!(
                    "INSERT INTO accounts (id, name, score, flag) \
                     SELECT id, {name}::text, ({score})::float8, true FROM accounts \
                       WHERE id BETWEEN {a} AND {} \
                     UNION ALL SELECT {to}, {name}::text, ({score})::float8, NULL::boolean \
                     ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, score = EXCLUDED.score, \
                       doc = coalesce(accounts.doc, '{{}}') || jsonb_build_object('up', {n}) \
                     RETURNING 1",
                    a + w.min(2)
                )
            }
            // Deletes.
            _ => format!(
                "DELETE FROM accounts WHERE id BETWEEN {a} AND {} RETURNING 1",
                a + w.min(3)
            ),
        }
    }

    pub fn order_id(&mut self) -> i64 {
        if self.rng.chance(40) {
            self.rng.range(1, self.next_order - 1)
        } else {
            self.rng
                .range((self.next_order - 1500).max(1), self.next_order - 1)
        }
    }

    pub fn items(&mut self) -> String {
        let n = self.n;
        let o = self.order_id();
        match self.rng.next() % 100 {
            0..=24 => {
                let k = self.rng.range(1, 6);
                let first = self.next_order;
                let orders = self.rng.range(1, 3);
                self.next_order += orders;
                let note = self.text();
                format!(
                    "INSERT INTO items SELECT o, l, o * l % 1000, {note} \
                     FROM generate_series({first}, {}) o, generate_series(1, {k}) l RETURNING 1",
                    first + orders - 1
                )
            }
            25..=54 => {
                let d = self.rng.range(-9, 9);
                let note = self.text();
                format!(
                    "UPDATE items SET qty = coalesce(qty, 0) + {d}, note = {note} \
                     WHERE order_id = {o} AND abs(line) <= {} RETURNING 1",
                    self.rng.range(1, 6)
                )
            }
            // Primary-key changes: lines flip sign, or the order moves to a fresh id.
            55..=66 => {
                let sign = if self.rng.chance(50) { ">" } else { "<" };
                format!(
                    "UPDATE items SET line = -line, qty = {n} % 97 \
                     WHERE order_id = {o} AND line {sign} 0 RETURNING 1"
                )
            }
            67..=76 => {
                let to = self.next_order;
                self.next_order += 1;
                format!("UPDATE items SET order_id = {to} WHERE order_id = {o} RETURNING 1")
            }
            _ => format!(
                "DELETE FROM items WHERE order_id = {o} AND abs(line) >= {} RETURNING 1",
                self.rng.range(1, 5)
            ),
        }
    }

    pub fn events(&mut self) -> String {
        let n = self.n;
        let a = if self.rng.chance(50) {
            self.rng.range(1, SEED_EVENTS)
        } else {
            self.rng
                .range(FRESH_EVENT, self.next_event.max(FRESH_EVENT + 1))
        };
        let w = self.rng.range(0, 5);
        match self.rng.next() % 100 {
            0..=29 => {
                let k = self.rng.range(1, 10);
                let lo = self.next_event;
                self.next_event += k;
                let label = self.text();
                let r = self.rng.range(0, 1 << 20);
                format!(
                    "INSERT INTO events SELECT g, (g % 32000)::smallint, \
                       CASE WHEN g % 9 = 0 THEN NULL WHEN g % 9 = 1 THEN 'NaN'::real \
                         ELSE ({r} + g) / 7.0::real END, \
                       date '1999-12-31' + (g % 20000)::int, left({label}, 40), \
                       CASE WHEN g % 4 = 0 THEN NULL ELSE ARRAY[g % 2 = 0, NULL] END, \
                       ARRAY[g / 8.0, {r} / 16.0]::float8[] \
                     FROM generate_series({lo}, {}) g RETURNING 1",
                    lo + k - 1
                )
            }
            30..=59 => {
                let r = self.rng.range(0, 1 << 20);
                format!(
                    "UPDATE events SET ratio = {r} / 3.0::real, day = day + 1, \
                     flags = coalesce(flags, '{{}}') || (id % 3 = 0), \
                     ws = ws || ({r} / 32.0)::float8, kind = (kind + {n}) % 32000 \
                     WHERE id BETWEEN {a} AND {} RETURNING 1",
                    a + w
                )
            }
            60..=74 => format!(
                "UPDATE events SET id = id + {EVENT_MOVE} \
                 WHERE id BETWEEN {a} AND {} AND id < {EVENT_MOVE} RETURNING 1",
                a + w
            ),
            _ => format!(
                "DELETE FROM events WHERE id BETWEEN {a} AND {} OR id BETWEEN {} AND {} \
                 RETURNING 1",
                a + w.min(2),
                a + EVENT_MOVE,
                a + EVENT_MOVE + w.min(1)
            ),
        }
    }

    pub fn invoices(&mut self) -> String {
        let n = self.n;
        let from = format!("{:016x}{:016x}", self.rng.next(), self.rng.next());
        let w = self.rng.range(1, 4);
        let pick = format!(
            "id IN (SELECT id FROM sales.invoices WHERE id >= '{from}'::uuid ORDER BY id LIMIT {w})"
        );
        match self.rng.next() % 100 {
            0..=24 => {
                let k = self.rng.range(1, 6);
                let note = self.text();
                format!(
                    "INSERT INTO sales.invoices SELECT md5('{n}/' || g)::uuid, \
                       CASE WHEN g = 2 THEN 'NaN'::numeric ELSE (g * 37 + {n}) / 7.0 END, \
                       CASE WHEN g = 3 THEN NULL ELSE date '2024-01-01' + ({n} % 700)::int END, \
                       ('{{\"n\":{n},  \"g\" : [' || g || ', null], \"t\": ' || to_json({note}::text) || '}}')::json, \
                       (g + {n} % 100) * interval '1 day 2 hours 3 minutes 4.5 seconds' - interval '1 month', \
                       {n} * 1000 + g, {note} \
                     FROM generate_series(1, {k}) g RETURNING 1"
                )
            }
            25..=59 => {
                let note = self.text();
                format!(
                    "UPDATE sales.invoices SET amount = amount + 0.01, paid = paid + 1, \
                     meta = ('[' || {n} || ', ' || coalesce(meta::text, 'null') || ']')::json, \
                     term = term * 2, note = {note} WHERE {pick} RETURNING 1"
                )
            }
            60..=74 => format!(
                "UPDATE sales.invoices SET id = md5(id::text || '{n}')::uuid WHERE {pick} RETURNING 1"
            ),
            _ => format!("DELETE FROM sales.invoices WHERE {pick} RETURNING 1"),
        }
    }
}

pub fn table_tokens() -> Vec<&'static str> {
    tables().iter().map(|t| t.token).collect()
}
