//! `bridge mirror` against real servers, checked by an oracle: a seeded random workload runs
//! on four tables (three in `public`, one in `sales`; a composite key, a uuid key, REPLICA
//! IDENTITY FULL) while the mirror bootstraps, so its snapshots are taken in the middle of the
//! workload, and follows. The workload inserts, updates TOASTed values and other columns (so
//! changes with unchanged TOAST occur), changes primary keys, deletes, truncates a table once,
//! runs several statements per transaction, rolls back savepoints and whole transactions and
//! now and then changes enough rows that PostgreSQL streams the transaction before its commit.
//! When it has stopped and the mirror has caught up, every mirrored table equals its source
//! table, row for row and value for value, compared through a canonical text form that both
//! sides produce. Also with kill -9 of the mirror and of the bridge in the middle, with the
//! bridge killed while it serves the mirror's snapshot, and with columns added by ALTER TABLE.
//!
//! The workload's seed is printed when a test fails; `MIRROR_TEST_SEED=<seed>` reruns it.

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{
    bridge_command, free_port, setup_app_db, wait_for, BridgeProcess, PgServer, TempDir, TestEnv,
};
use pgbridge::pg::conn::{quote_literal, PgConnection};
use rusqlite::types::ValueRef;

/// Row changes the two big scenarios make at least.
const TARGET_CHANGES: u64 = 50_000;
/// Row changes per second the writer aims at, so the mirror's snapshots fall in the middle
/// of the workload rather than after it.
const WRITER_RATE: u64 = 2_500;
/// The writer stops after this long even when it has not reached its target.
const WRITER_LIMIT: Duration = Duration::from_secs(240);
/// The writer stops after this many row changes even when not told to.
const WRITER_MAX_CHANGES: u64 = 4 * TARGET_CHANGES;
/// The TRUNCATE of `items` happens after this many row changes.
const TRUNCATE_AT: u64 = 27_000;
/// How long a mirror or a bridge may take to bootstrap, catch up or exit.
const STEP_TIMEOUT: Duration = Duration::from_secs(180);
/// Seed rows.
const SEED_ACCOUNTS: i64 = 3_000;
const SEED_ORDERS: i64 = 800;
const SEED_EVENTS: i64 = 2_000;
const SEED_INVOICES: i64 = 1_500;
/// First id of the rows the writer inserts (ids below are seed rows).
const FRESH_ACCOUNT: i64 = 1_000_000;
const FRESH_EVENT: i64 = 100_000;
/// Events whose primary key changed live at `id + EVENT_MOVE`.
const EVENT_MOVE: i64 = 10_000_000;
/// The default durable consumer of the mirror into `db`.
fn durable(db: &Path) -> String {
    pgbridge::mirror::default_durable(db)
}
const SLOT: &str = "cdc_slot";
/// The mirrored tables, as `--table` takes them.
const TABLES: &str = "accounts,items,events,sales.invoices";

/// The two 50 000-change scenarios run one at a time: each alone keeps a 2-core machine busy.
static HEAVY: Mutex<()> = Mutex::new(());

const SCHEMA: &str = "
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
fn seed_sql() -> String {
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
enum Kind {
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
struct Table {
    token: &'static str,
    pg: &'static str,
    key: usize,
    columns: Vec<(&'static str, Kind)>,
}

fn tables() -> Vec<Table> {
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

fn canon_f8(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else {
        format!("{v:?}")
    }
}

fn canon_f4(v: f32) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else {
        format!("{v:?}")
    }
}

fn canon_json(s: &str, floats: bool) -> String {
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
fn canon_pg(kind: Kind, v: Option<&str>) -> Option<String> {
    let s = v?;
    Some(match kind {
        Kind::F8 => canon_f8(s.parse().unwrap_or_else(|_| panic!("a float8: {s}"))),
        Kind::F4 => canon_f4(s.parse().unwrap_or_else(|_| panic!("a float4: {s}"))),
        Kind::Array => canon_json(s, false),
        Kind::FloatArray => canon_json(s, true),
        Kind::Int | Kind::Bool | Kind::Bytea | Kind::Text => s.to_string(),
    })
}

fn describe_sqlite(v: ValueRef<'_>) -> String {
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
fn canon_sqlite(kind: Kind, v: ValueRef<'_>) -> Option<String> {
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

type Row = Vec<Option<String>>;
type Rows = BTreeMap<String, Row>;

fn key_of(t: &Table, row: &Row) -> String {
    row[..t.key]
        .iter()
        .map(|v| v.as_deref().unwrap_or("<NULL>"))
        .collect::<Vec<_>>()
        .join("|")
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The source table in canonical form, by key.
fn pg_rows(pg: &PgServer, t: &Table) -> Rows {
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

fn open_sqlite(db: &Path) -> rusqlite::Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open_with_flags(
        db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(30))?;
    Ok(conn)
}

/// The mirrored table in canonical form, by key.
fn sqlite_rows(db: &Path, t: &Table) -> Result<Rows, String> {
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

fn short(v: &Option<String>) -> String {
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
fn compare_table(pg: &PgServer, db: &Path, t: &Table) -> Result<usize, String> {
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
fn compare_all(pg: &PgServer, db: &Path, tables: &[Table]) -> Result<Vec<(String, usize)>, String> {
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
fn mirror_command(
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

fn tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// One row of `_pgbridge_mirror`: table_token, snapshot_id, lsn, last_seq.
type StateRow = (String, Option<String>, Option<String>, Option<i64>);

/// Rows of `_pgbridge_mirror`; empty while the file or the table does not exist yet.
fn mirror_state(db: &Path) -> Vec<StateRow> {
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
fn bootstrapped(db: &Path, tokens: &[&str]) -> bool {
    let state = mirror_state(db);
    tokens.iter().all(|t| {
        state
            .iter()
            .any(|(tok, snap, lsn, _)| tok == t && snap.is_some() && lsn.is_some())
    })
}

/// (num_pending, num_ack_pending, delivered stream sequence) of the durable consumer, and the
/// CDC stream's last sequence.
fn consumer_state(nats_url: &str, durable: &str) -> Option<(u64, usize, u64, u64)> {
    common::with_nats(nats_url, |client| async move {
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
fn wait_mirror_caught_up(pg: &PgServer, nats_url: &str, durable: &str) {
    common::wait_caught_up(pg, SLOT, STEP_TIMEOUT);
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
fn grant_sales(pg: &PgServer) {
    pg.sql(
        "app",
        "GRANT USAGE ON SCHEMA sales TO bridge_reader; \
         GRANT SELECT ON ALL TABLES IN SCHEMA sales TO bridge_reader",
    );
}

fn spawn_bridge(env: &TestEnv, state_dir: &Path) -> BridgeProcess {
    spawn_bridge_with(env, state_dir, &[])
}

/// [`spawn_bridge`] with extra bridge arguments.
fn spawn_bridge_with(env: &TestEnv, state_dir: &Path, extra: &[&str]) -> BridgeProcess {
    let bridge = BridgeProcess::spawn(
        bridge_command(&env.pg, &env.nats.url(), state_dir)
            .args(["--snapshot-chunk-rows", "64"])
            .args(extra),
    );
    bridge.wait_for_line("snapshot requests served", Duration::from_secs(60));
    bridge
}

/// Kills a process with SIGKILL and reaps it.
fn kill_9(p: &mut BridgeProcess) {
    p.child.signal(libc::SIGKILL);
    p.wait_exit(Duration::from_secs(30));
}

/// Prints the seed when the test fails, whatever fails.
struct SeedOnFailure(u64);

impl Drop for SeedOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "mirror oracle: workload seed {0} (rerun with MIRROR_TEST_SEED={0})",
                self.0
            );
        }
    }
}

fn seed() -> u64 {
    let seed = std::env::var("MIRROR_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("mirror oracle: workload seed {seed}");
    seed
}

// ---------------------------------------------------------------------------------------
// The workload.

/// xorshift64.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// In `lo..=hi`.
    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next() % (hi - lo + 1) as u64) as i64
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[(self.next() % xs.len() as u64) as usize]
    }
}

/// Texts that are easy to get wrong on the way.
const SPECIAL_TEXTS: &[&str] = &[
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
struct WriterReport {
    changes: u64,
    transactions: u64,
    statements: u64,
    truncated: bool,
    elapsed: Duration,
}

/// The writer: a thread running random transactions against `app`, at most `rate` row changes
/// per second, until told to stop once it has made `target` row changes; in any case it stops
/// after `WRITER_LIMIT` or `WRITER_MAX_CHANGES`.
struct Writer {
    handle: JoinHandle<WriterReport>,
    changes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Writer {
    fn start(pg: &PgServer, seed: u64, target: u64, rate: u64) -> Self {
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

    fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    /// Waits (bounded) until the writer has made at least `n` changes.
    fn wait_changes(&self, n: u64) {
        wait_for(
            &format!("the writer to reach {n} changes"),
            WRITER_LIMIT,
            || (self.changes() >= n || self.handle.is_finished()).then_some(()),
        );
        assert!(self.changes() >= n, "the writer stopped early");
    }

    fn finish(self) -> WriterReport {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("the writer panicked")
    }
}

/// Runs the statements in one transaction; the number of rows they changed (each statement
/// returns one row per changed row; TRUNCATE counts as one; nothing counts that a ROLLBACK
/// undid).
fn run_transaction(conn: &mut PgConnection, statements: &[String], seed: u64) -> u64 {
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
const ROLLBACK: &str = "ROLLBACK";
const SAVEPOINT: &str = "SAVEPOINT s";
const ROLLBACK_TO_SAVEPOINT: &str = "ROLLBACK TO SAVEPOINT s";

/// The writer's state: fresh keys and its random sequence.
///
/// Keys are chosen so that no statement can fail: rows are inserted only with keys never used
/// before, and a primary-key change either moves a row to a fresh key or flips its sign
/// (`id = -id`, `line = -line`), and at most one of `x` and `-x` ever exists.
struct Workload {
    rng: Rng,
    n: u64,
    next_account: i64,
    next_order: i64,
    next_event: i64,
    truncated: bool,
}

impl Workload {
    fn new(seed: u64) -> Self {
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
    fn transaction(&mut self) -> Vec<String> {
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
    fn large(&mut self) -> String {
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
    fn chain(&mut self) -> Vec<String> {
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
    fn truncate(&mut self) -> Vec<String> {
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

    fn statement(&mut self) -> String {
        self.n += 1;
        match self.rng.next() % 100 {
            0..=39 => self.accounts(),
            40..=64 => self.items(),
            65..=79 => self.events(),
            _ => self.invoices(),
        }
    }

    fn text(&mut self) -> String {
        let n = self.n;
        match self.rng.next() % 10 {
            0 => "NULL".into(),
            1..=3 => quote_literal(self.rng.pick(SPECIAL_TEXTS)),
            _ => format!("'w{n}-{}'", self.rng.next() % 1000),
        }
    }

    fn float8(&mut self) -> String {
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

    fn account_id(&mut self) -> i64 {
        match self.rng.next() % 10 {
            0..=4 => self.rng.range(1, SEED_ACCOUNTS),
            5 | 6 => -self.rng.range(1, SEED_ACCOUNTS),
            _ => self
                .rng
                .range(FRESH_ACCOUNT, self.next_account.max(FRESH_ACCOUNT + 1)),
        }
    }

    fn accounts(&mut self) -> String {
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

    fn order_id(&mut self) -> i64 {
        if self.rng.chance(40) {
            self.rng.range(1, self.next_order - 1)
        } else {
            self.rng
                .range((self.next_order - 1500).max(1), self.next_order - 1)
        }
    }

    fn items(&mut self) -> String {
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

    fn events(&mut self) -> String {
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

    fn invoices(&mut self) -> String {
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

// ---------------------------------------------------------------------------------------
// Scenarios.

/// Seeds the database, starts the bridge; the environment, the bridge and its state dir.
fn prepare() -> (TestEnv, BridgeProcess, TempDir) {
    prepare_with(&[])
}

/// [`prepare`] with extra bridge arguments.
fn prepare_with(bridge_args: &[&str]) -> (TestEnv, BridgeProcess, TempDir) {
    let env = TestEnv::start();
    setup_app_db(&env.pg, &format!("{SCHEMA} {}", seed_sql()), "");
    grant_sales(&env.pg);
    let dir = TempDir::new("mirror");
    let bridge = spawn_bridge_with(&env, dir.path(), bridge_args);
    (env, bridge, dir)
}

fn table_tokens() -> Vec<&'static str> {
    tables().iter().map(|t| t.token).collect()
}

/// Compares every table and panics with the differences, the seed and the mirror's log.
fn assert_mirrored(env: &TestEnv, db: &Path, seed: u64, mirror_log: &str) {
    match compare_all(&env.pg, db, &tables()) {
        Ok(counts) => {
            eprintln!("mirror oracle: equal tables (rows): {counts:?}");
            assert!(
                counts.iter().all(|(_, n)| *n > 0),
                "empty tables: {counts:?}"
            );
        }
        Err(report) => panic!(
            "the mirror differs from the source (seed {seed}):\n{report}\nmirror state: {:?}\n\
             mirror log (tail):\n{}",
            mirror_state(db),
            tail(mirror_log, 60)
        ),
    }
}

/// The oracle itself sees a changed value, a missing row and an extra row (the mirror has
/// exited; its file is changed behind its back).
fn assert_oracle_sees_tampering(env: &TestEnv, db: &Path) {
    rusqlite::Connection::open(db)
        .unwrap()
        .execute_batch(
            "UPDATE accounts SET big = big || 'x' \
               WHERE id = (SELECT min(id) FROM accounts WHERE length(big) > 3000); \
             DELETE FROM items WHERE (order_id, line) = (SELECT order_id, line FROM items LIMIT 1); \
             INSERT INTO \"sales.invoices\" (id) VALUES ('00000000-0000-0000-0000-000000000000')",
        )
        .expect("tamper with the mirror");
    let report = compare_all(&env.pg, db, &tables()).expect_err("the oracle sees the changes");
    for needle in [
        "    big: expected",
        "missing in the mirror",
        "key 00000000-0000-0000-0000-000000000000: in the mirror only",
    ] {
        assert!(report.contains(needle), "{needle:?} not in:\n{report}");
    }
}

#[test]
fn mirror_equals_source_after_50k_changes() {
    let _heavy = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let seed = seed();
    let _report_seed = SeedOnFailure(seed);
    let started = Instant::now();
    let (env, bridge, dir) = prepare();
    let url = env.nats.url();
    let db: PathBuf = dir.path().join("mirror.sqlite");

    let writer = Writer::start(&env.pg, seed, TARGET_CHANGES, WRITER_RATE);
    writer.wait_changes(5_000);
    let mut mirror = spawn_bootstrapped_mirror(&url, &db, dir.path());
    let at_bootstrap = writer.changes();
    eprintln!("mirror oracle: bootstrapped after {at_bootstrap} changes");
    assert!(
        at_bootstrap < TARGET_CHANGES,
        "the snapshots were taken in the middle of the workload ({at_bootstrap} changes)"
    );

    let report = writer.finish();
    eprintln!(
        "mirror oracle: {} changes in {} transactions ({} statements) in {:?}",
        report.changes, report.transactions, report.statements, report.elapsed
    );
    assert!(report.truncated, "the workload truncated a table");
    assert!(
        report.changes >= TARGET_CHANGES,
        "the workload made {} changes",
        report.changes
    );

    stop_caught_up_mirror(&env, &url, &db, &mut mirror);
    assert_mirrored(&env, &db, seed, &mirror.log());
    assert_oracle_sees_tampering(&env, &db);
    drop(bridge);
    eprintln!("mirror oracle: scenario took {:?}", started.elapsed());
}

/// The CDC stream holds the changes in commit order: the `{commit_lsn}-{seq}` of the message
/// ids `{namespace}:{timeline}:{commit_lsn}-{seq}` never goes back.
fn assert_stream_in_commit_order(url: &str) {
    let parse = |id: &str| -> (pgbridge::pg::Lsn, u64) {
        let (_, _, lsn, seq) = common::split_msg_id(id);
        (lsn, u64::from(seq))
    };
    let mut last: Option<((pgbridge::pg::Lsn, u64), u64)> = None;
    for m in common::read_stream(url, "CDC") {
        let key = parse(m.msg_id.as_deref().expect("a message id"));
        if let Some((prev, prev_seq)) = last {
            assert!(
                key > prev,
                "stream order is not commit order: #{} {key:?} after #{prev_seq} {prev:?}",
                m.seq
            );
        }
        last = Some((key, m.seq));
    }
}

/// Waits until the mirror into `db` (its default consumer) has applied everything, then stops
/// it with SIGTERM, which must end it with exit code 0.
fn stop_caught_up_mirror(env: &TestEnv, url: &str, db: &Path, mirror: &mut BridgeProcess) {
    wait_mirror_caught_up(&env.pg, url, &durable(db));
    assert_eq!(
        mirror.terminate(Duration::from_secs(30)),
        Some(0),
        "mirror exit code; log:\n{}",
        tail(&mirror.log(), 40)
    );
}

/// Starts `bridge mirror` on every table and waits until each has its snapshot.
fn spawn_bootstrapped_mirror(url: &str, db: &Path, dir: &Path) -> BridgeProcess {
    let mut mirror = BridgeProcess::spawn(&mut mirror_command(url, db, dir, Some(TABLES), &[]));
    let tokens = table_tokens();
    wait_for("the mirror to bootstrap", STEP_TIMEOUT, || {
        if let Some(status) = mirror.child.try_wait().unwrap() {
            panic!("the mirror exited ({status}):\n{}", tail(&mirror.log(), 60));
        }
        bootstrapped(db, &tokens).then_some(())
    });
    mirror
}

/// The same workload, smaller, with the bridge publishing JSON: the mirror tells the format
/// from each message and ends with the same values (bytea from base64, NaN and infinities from
/// strings).
#[test]
fn mirror_reads_the_json_format() {
    let seed = seed();
    let _report_seed = SeedOnFailure(seed);
    let (env, bridge, dir) = prepare_with(&["--format", "json"]);
    let url = env.nats.url();
    let db: PathBuf = dir.path().join("mirror.sqlite");
    let writer = Writer::start(&env.pg, seed, 8_000, WRITER_RATE);
    writer.wait_changes(1_000);
    let mut mirror = spawn_bootstrapped_mirror(&url, &db, dir.path());
    let report = writer.finish();
    assert!(
        report.changes >= 8_000,
        "the workload made {} changes",
        report.changes
    );
    stop_caught_up_mirror(&env, &url, &db, &mut mirror);
    assert_mirrored(&env, &db, seed, &mirror.log());
    drop(bridge);
}

/// NATS stops for a few seconds while the bridge publishes and the mirror follows: both wait
/// it out, the stream keeps commit order across the restart, and the mirror ends equal to the
/// source.
#[test]
fn mirror_rides_out_a_nats_restart() {
    let seed = seed();
    let _report_seed = SeedOnFailure(seed);
    let (mut env, bridge, dir) = prepare();
    let url = env.nats.url();
    let db: PathBuf = dir.path().join("mirror.sqlite");
    let writer = Writer::start(&env.pg, seed, 8_000, WRITER_RATE);
    writer.wait_changes(1_000);
    let mut mirror = spawn_bootstrapped_mirror(&url, &db, dir.path());
    env.nats.stop();
    std::thread::sleep(Duration::from_secs(4));
    env.nats.start_again();
    let report = writer.finish();
    assert!(
        report.changes >= 8_000,
        "the workload made {} changes",
        report.changes
    );
    stop_caught_up_mirror(&env, &url, &db, &mut mirror);
    eprintln!("mirror log (tail):\n{}", tail(&mirror.log(), 12));
    assert_stream_in_commit_order(&url);
    assert_mirrored(&env, &db, seed, &mirror.log());
    drop(bridge);
}

#[test]
fn mirror_equals_source_after_kill_9_of_mirror_and_bridge() {
    let _heavy = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let seed = seed();
    let _report_seed = SeedOnFailure(seed);
    let started = Instant::now();
    let (env, mut bridge, dir) = prepare();
    let url = env.nats.url();
    let db: PathBuf = dir.path().join("mirror.sqlite");
    let tokens = table_tokens();
    // A consumer name of its own, as two mirror files would need.
    let durable = "oracle-mirror";
    let spawn_mirror = |extra: &[&str]| {
        let mut cmd = mirror_command(&url, &db, dir.path(), Some(TABLES), extra);
        BridgeProcess::spawn(cmd.args(["--durable", durable]))
    };
    let mut logs = String::new();

    let writer = Writer::start(&env.pg, seed, TARGET_CHANGES, WRITER_RATE);
    writer.wait_changes(4_000);

    // First mirror: killed during its bootstrap (or right after, on a fast machine).
    let mut mirror = spawn_mirror(&[]);
    wait_for("the mirror's first snapshot", STEP_TIMEOUT, || {
        mirror_state(&db)
            .iter()
            .any(|(_, snap, _, _)| snap.is_some())
            .then_some(())
    });
    let loaded = mirror_state(&db).len();
    kill_9(&mut mirror);
    eprintln!(
        "mirror oracle: killed the mirror with {loaded} of {} tables bootstrapped, after {} changes",
        tokens.len(),
        writer.changes()
    );
    logs.push_str(&mirror.log());
    logs.push('\n');

    // Second mirror: finishes the bootstrap and follows.
    let mut mirror = spawn_mirror(&[]);
    wait_for("the restarted mirror to bootstrap", STEP_TIMEOUT, || {
        if let Some(status) = mirror.child.try_wait().unwrap() {
            panic!("the mirror exited ({status}):\n{}", tail(&mirror.log(), 60));
        }
        bootstrapped(&db, &tokens).then_some(())
    });
    eprintln!(
        "mirror oracle: bootstrapped after {} changes",
        writer.changes()
    );

    // kill -9 of the bridge; it resumes from its state file while the writer goes on.
    writer.wait_changes(18_000);
    kill_9(&mut bridge);
    eprintln!(
        "mirror oracle: killed the bridge after {} changes",
        writer.changes()
    );
    std::thread::sleep(Duration::from_secs(1));
    let first_bridge_log = bridge.log();
    bridge = spawn_bridge(&env, dir.path());

    // kill -9 of the mirror while it follows.
    writer.wait_changes(32_000);
    kill_9(&mut mirror);
    eprintln!(
        "mirror oracle: killed the mirror again after {} changes",
        writer.changes()
    );
    logs.push_str(&mirror.log());
    logs.push('\n');
    std::thread::sleep(Duration::from_millis(500));
    let mut mirror = spawn_mirror(&[]);

    let report = writer.finish();
    eprintln!(
        "mirror oracle: {} changes in {} transactions ({} statements) in {:?}",
        report.changes, report.transactions, report.statements, report.elapsed
    );
    assert!(report.truncated, "the workload truncated a table");
    assert!(
        report.changes >= TARGET_CHANGES,
        "the workload made {} changes",
        report.changes
    );

    wait_mirror_caught_up(&env.pg, &url, durable);
    let code = mirror.terminate(Duration::from_secs(30));
    logs.push_str(&mirror.log());
    logs.push('\n');
    assert_eq!(
        code,
        Some(0),
        "mirror exit code; log:\n{}",
        tail(&mirror.log(), 40)
    );

    // A last run with --until-idle: nothing new, it exits on its own.
    let mut last = spawn_mirror(&["--until-idle", "3"]);
    let code = last.wait_exit(STEP_TIMEOUT);
    logs.push_str(&last.log());
    logs.push('\n');
    assert_eq!(
        code,
        Some(0),
        "mirror --until-idle exit code; log:\n{}",
        tail(&last.log(), 40)
    );

    let counts = compare_all(&env.pg, &db, &tables()).unwrap_or_else(|report| {
        panic!(
            "the mirror differs from the source (seed {seed}):\n{report}\nmirror state: {:?}\n\
             mirror logs (tail):\n{}\nfirst bridge's log (tail):\n{}",
            mirror_state(&db),
            tail(&logs, 80),
            tail(&first_bridge_log, 20)
        );
    });
    assert!(
        counts.iter().all(|(_, n)| *n > 0),
        "empty tables: {counts:?}"
    );
    eprintln!(
        "mirror oracle: equal tables after kills; scenario took {:?}",
        started.elapsed()
    );
    drop(bridge);
}

#[test]
fn mirror_adds_a_column_after_alter_table() {
    let env = TestEnv::start();
    setup_app_db(
        &env.pg,
        "CREATE TABLE users (id int PRIMARY KEY, name text); \
         INSERT INTO users SELECT g, 'u' || g FROM generate_series(1, 200) g",
        "",
    );
    let dir = TempDir::new("mirror");
    let bridge = spawn_bridge(&env, dir.path());
    let url = env.nats.url();
    let db = dir.path().join("mirror.sqlite");
    let mut mirror = BridgeProcess::spawn(&mut mirror_command(&url, &db, dir.path(), None, &[]));
    wait_for("the mirror to bootstrap", STEP_TIMEOUT, || {
        bootstrapped(&db, &["users"]).then_some(())
    });

    env.pg
        .sql("app", "UPDATE users SET name = name || '!' WHERE id <= 10");
    env.pg.sql(
        "app",
        "ALTER TABLE users ADD COLUMN age int, ADD COLUMN seen timestamptz, ADD COLUMN tags text[]",
    );
    env.pg.sql(
        "app",
        "UPDATE users SET age = id * 2, seen = timestamptz '2025-12-10 10:30:00.123456+00' \
         + id * interval '1 hour', tags = ARRAY['a', id::text] WHERE id % 3 = 0; \
         INSERT INTO users VALUES (1000, 'new', 42, NULL, '{x,NULL}'); \
         DELETE FROM users WHERE id = 5",
    );
    wait_mirror_caught_up(&env.pg, &url, &durable(&db));

    let users = Table {
        token: "users",
        pg: "users",
        key: 1,
        columns: vec![
            ("id", Kind::Int),
            ("name", Kind::Text),
            ("age", Kind::Int),
            ("seen", Kind::Text),
            ("tags", Kind::Array),
        ],
    };
    let columns: Vec<String> = open_sqlite(&db)
        .unwrap()
        .prepare("SELECT name FROM pragma_table_info('users') ORDER BY cid")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        columns,
        ["id", "name", "age", "seen", "tags"],
        "the mirrored table's columns; log:\n{}",
        tail(&mirror.log(), 40)
    );
    match compare_table(&env.pg, &db, &users) {
        Ok(n) => assert_eq!(n, 200, "rows"),
        Err(report) => panic!("{report}\nmirror log (tail):\n{}", tail(&mirror.log(), 40)),
    }
    let age: Option<i64> = open_sqlite(&db)
        .unwrap()
        .query_row("SELECT age FROM users WHERE id = 1000", [], |r| r.get(0))
        .unwrap();
    assert_eq!(age, Some(42));
    assert_eq!(mirror.terminate(Duration::from_secs(30)), Some(0));
    drop(bridge);
}

#[test]
fn mirror_takes_a_new_snapshot_when_the_bridge_dies_during_one() {
    let seed = seed();
    let _report_seed = SeedOnFailure(seed);
    let started = Instant::now();
    let (env, mut bridge, dir) = prepare();
    // Enough TOASTed rows that the snapshot of accounts takes a moment.
    env.pg.sql(
        "app",
        "INSERT INTO accounts (id, big) \
         SELECT g, repeat(md5(g::text), 200) FROM generate_series(5000000, 5010000) g",
    );
    let url = env.nats.url();
    let db = dir.path().join("mirror.sqlite");
    let writer = Writer::start(&env.pg, seed, 1, 500);
    writer.wait_changes(1_000);
    let mut mirror = BridgeProcess::spawn(&mut mirror_command(
        &url,
        &db,
        dir.path(),
        Some(TABLES),
        // A snapshot whose bridge died is requested again after this long.
        &["--snapshot-stall-secs", "10"],
    ));
    mirror.wait_for_line("of accounts requested", Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(200));
    kill_9(&mut bridge);
    let loaded = mirror_state(&db).len();
    std::thread::sleep(Duration::from_secs(1));
    bridge = spawn_bridge(&env, dir.path());
    wait_for("the mirror to bootstrap", STEP_TIMEOUT, || {
        if let Some(status) = mirror.child.try_wait().unwrap() {
            panic!("the mirror exited ({status}):\n{}", tail(&mirror.log(), 60));
        }
        bootstrapped(&db, &table_tokens()).then_some(())
    });
    let report = writer.finish();
    eprintln!(
        "mirror oracle: bridge killed with {loaded} tables loaded; bootstrapped after {:?}; \
         {} changes",
        started.elapsed(),
        report.changes
    );
    stop_caught_up_mirror(&env, &url, &db, &mut mirror);
    assert_mirrored(&env, &db, seed, &mirror.log());
    drop(bridge);
}

/// `ALTER TABLE ... ADD COLUMN ... DEFAULT` writes nothing to the WAL for the existing rows:
/// PostgreSQL shows them with the default, so the mirror takes a new snapshot of the table.
#[test]
fn mirror_has_the_default_of_an_added_column_in_older_rows() {
    let env = TestEnv::start();
    setup_app_db(
        &env.pg,
        "CREATE TABLE users (id int PRIMARY KEY, name text); \
         INSERT INTO users SELECT g, 'u' || g FROM generate_series(1, 20) g",
        "",
    );
    let dir = TempDir::new("mirror");
    let bridge = spawn_bridge(&env, dir.path());
    let url = env.nats.url();
    let db = dir.path().join("mirror.sqlite");
    let mut mirror = BridgeProcess::spawn(&mut mirror_command(&url, &db, dir.path(), None, &[]));
    wait_for("the mirror to bootstrap", STEP_TIMEOUT, || {
        bootstrapped(&db, &["users"]).then_some(())
    });
    env.pg.sql(
        "app",
        "ALTER TABLE users ADD COLUMN status text DEFAULT 'new', \
         ADD COLUMN n int NOT NULL DEFAULT 7",
    );
    env.pg
        .sql("app", "UPDATE users SET name = 'x' WHERE id = 1");
    wait_mirror_caught_up(&env.pg, &url, &durable(&db));
    let users = Table {
        token: "users",
        pg: "users",
        key: 1,
        columns: vec![
            ("id", Kind::Int),
            ("name", Kind::Text),
            ("status", Kind::Text),
            ("n", Kind::Int),
        ],
    };
    if let Err(report) = compare_table(&env.pg, &db, &users) {
        panic!("{report}\nmirror log (tail):\n{}", tail(&mirror.log(), 20));
    }
    assert_eq!(mirror.terminate(Duration::from_secs(30)), Some(0));
    drop(bridge);
}

// ---------------------------------------------------------------------------------------
// Transactions, row versions, schema changes, several mirrors.

/// A bridge and a mirror of `tables` (`None`: every table) on a fresh database made by
/// `schema`; the mirror has bootstrapped `tokens`.
fn small_setup(
    schema: &str,
    tables: Option<&str>,
    tokens: &[&str],
) -> (TestEnv, BridgeProcess, TempDir, BridgeProcess) {
    let env = TestEnv::start();
    setup_app_db(&env.pg, schema, "");
    let dir = TempDir::new("mirror");
    let bridge = spawn_bridge(&env, dir.path());
    let db = dir.path().join("mirror.sqlite");
    let mirror = BridgeProcess::spawn(&mut mirror_command(
        &env.nats.url(),
        &db,
        dir.path(),
        tables,
        &[],
    ));
    wait_for("the mirror to bootstrap", STEP_TIMEOUT, || {
        bootstrapped(&db, tokens).then_some(())
    });
    (env, bridge, dir, mirror)
}

/// Panics with the differences between the SQLite table and its source.
fn assert_table_mirrored(env: &TestEnv, db: &Path, t: &Table, mirror: &BridgeProcess) -> usize {
    match compare_table(&env.pg, db, t) {
        Ok(n) => n,
        Err(report) => panic!(
            "{} differs from the source:\n{report}\nmirror log (tail):\n{}",
            t.token,
            tail(&mirror.log(), 40)
        ),
    }
}

/// Readers of the SQLite file never see part of a source transaction: every transaction moves
/// money between accounts, so the sum stays the same in every committed state. The large
/// transactions are streamed by PostgreSQL before their commit and take the bridge a while to
/// publish, which is where a mirror committing on a pause would split them. Most transactions
/// end with a change of a table the mirror does not follow, so the change marked last is not
/// one it receives.
#[test]
fn mirror_shows_whole_source_transactions_only() {
    const ACCOUNTS: i64 = 4_000;
    let (env, bridge, dir, mut mirror) = small_setup(
        &format!(
            "CREATE TABLE acct (id int PRIMARY KEY, bal bigint NOT NULL); \
             CREATE TABLE audit (id serial PRIMARY KEY, note text); \
             INSERT INTO acct SELECT g, 100 FROM generate_series(1, {ACCOUNTS}) g"
        ),
        Some("acct"),
        &["acct"],
    );
    let url = env.nats.url();
    let db = dir.path().join("mirror.sqlite");
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, samples, db) = (Arc::clone(&stop), Arc::clone(&samples), db.clone());
        std::thread::spawn(move || {
            let conn = open_sqlite(&db).unwrap();
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let state: (i64, i64) = conn
                    .query_row(
                        "SELECT count(*), coalesce(sum(bal), 0) FROM acct",
                        [],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .unwrap();
                if state != (ACCOUNTS, ACCOUNTS * 100) && !seen.contains(&state) {
                    seen.push(state);
                }
                samples.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
            seen
        })
    };
    let mut conn = env.pg.connect("app");
    let mut rng = Rng::new(seed());
    for round in 0..40 {
        let sql = if round % 4 == 0 {
            // Every account: 4 000 changes, streamed before the commit.
            let half = ACCOUNTS / 2;
            format!(
                "BEGIN; UPDATE acct SET bal = bal - 1 WHERE id <= {half}; \
                 UPDATE acct SET bal = bal + 1 WHERE id > {half}; COMMIT"
            )
        } else {
            let mut statements = String::from("BEGIN;");
            for _ in 0..rng.range(1, 20) {
                let (a, b) = (rng.range(1, ACCOUNTS), rng.range(1, ACCOUNTS));
                let n = rng.range(0, 50);
                let _ = write!(
                    statements,
                    "UPDATE acct SET bal = bal - {n} WHERE id = {a}; \
                     UPDATE acct SET bal = bal + {n} WHERE id = {b};"
                );
            }
            if round % 3 != 1 {
                statements.push_str("INSERT INTO audit (note) VALUES ('transfer');");
            }
            statements.push_str("COMMIT");
            statements
        };
        conn.execute(&sql).unwrap();
    }
    // The last transaction ends with a change the mirror does not receive, and nothing
    // follows it for a while: the mirror finds its end in the stream.
    conn.execute(
        "BEGIN; UPDATE acct SET bal = bal - 1000 WHERE id = 1; \
         UPDATE acct SET bal = bal + 1000 WHERE id = 2; \
         INSERT INTO audit (note) VALUES ('last'); COMMIT",
    )
    .unwrap();
    let want = env.pg.sql("app", "SELECT bal FROM acct WHERE id = 1").rows[0][0]
        .as_deref()
        .unwrap()
        .parse::<i64>()
        .unwrap();
    wait_for(
        "the mirror to commit a transaction whose marked change is of another table",
        Duration::from_secs(60),
        || {
            let bal: i64 = open_sqlite(&db)
                .unwrap()
                .query_row("SELECT bal FROM acct WHERE id = 1", [], |r| r.get(0))
                .unwrap();
            (bal == want).then_some(())
        },
    );
    // The stream's last message is one the consumer receives, for the catch-up check.
    conn.execute("UPDATE acct SET bal = bal WHERE id = 3")
        .unwrap();
    wait_mirror_caught_up(&env.pg, &url, &durable(&db));
    stop.store(true, Ordering::Relaxed);
    let seen = sampler.join().unwrap();
    let samples = samples.load(Ordering::Relaxed);
    eprintln!("mirror transactions: {samples} samples of the SQLite file");
    assert!(samples > 50, "the file was sampled {samples} times only");
    assert!(
        seen.is_empty(),
        "readers saw part of a transaction: (rows, sum) {seen:?} (want ({ACCOUNTS}, {})); \
         mirror log:\n{}",
        ACCOUNTS * 100,
        tail(&mirror.log(), 40)
    );
    let acct = Table {
        token: "acct",
        pg: "acct",
        key: 1,
        columns: vec![("id", Kind::Int), ("bal", Kind::Int)],
    };
    assert_eq!(
        assert_table_mirrored(&env, &db, &acct, &mirror),
        ACCOUNTS as usize
    );

    // A bridge that stalls in the middle of publishing a transaction: its first change alone
    // stays invisible however long the rest takes. (Written by hand, at an LSN later than any
    // of the source's.)
    let bal = |id: i64| -> i64 {
        open_sqlite(&db)
            .unwrap()
            .query_row("SELECT bal FROM acct WHERE id = ?1", [id], |r| r.get(0))
            .unwrap()
    };
    let (one, two) = (bal(1), bal(2));
    let change = |seq: u32, id: i64, value: i64, last: bool| {
        format!(
            r#"{{"table":"acct","schema":"public","operation":"UPDATE","relation_id":1,"lsn":"FF/0","commit_lsn":"FF/0","xid":1,"commit_time":"2025-12-10T10:30:00.000000Z","seq":{seq},"last_in_tx":{last},"columns":[{{"name":"id","value":{id}}},{{"name":"bal","value":{value}}}],"old_columns":null,"unchanged_toast":[]}}"#
        )
    };
    let publish = |seq: u32, payload: String, last: bool| {
        common::with_nats(&url, |client| async move {
            let js = async_nats::jetstream::new(client);
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("FF/0-{seq}").as_str());
            if last {
                headers.insert("Pgbridge-Last-In-Tx", "true");
            }
            js.publish_with_headers("cdc.acct.update", headers, payload.into())
                .await
                .expect("publish")
                .await
                .expect("stored");
        })
    };
    publish(0, change(0, 1, one - 5, false), false);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        (bal(1), bal(2)),
        (one, two),
        "half a transaction became visible while the rest was late; log:\n{}",
        tail(&mirror.log(), 20)
    );
    publish(1, change(1, 2, two + 5, true), true);
    wait_for("the whole transaction", Duration::from_secs(30), || {
        ((bal(1), bal(2)) == (one - 5, two + 5)).then_some(())
    });
    assert_eq!(mirror.terminate(Duration::from_secs(30)), Some(0));
    drop(bridge);
}

/// Changes that come again, with new message ids (so JetStream stores them) and in any order,
/// change nothing: every row keeps the version of its last change, a deleted row its
/// tombstone and a truncated table the version of the TRUNCATE.
#[test]
fn mirror_ignores_replayed_and_out_of_order_changes() {
    let (env, bridge, dir, mut mirror) = small_setup(
        "CREATE TABLE t (id int PRIMARY KEY, v text); \
         CREATE TABLE u (id int PRIMARY KEY, v text); \
         INSERT INTO t VALUES (0, 'seed'); INSERT INTO u VALUES (0, 'seed')",
        None,
        &["t", "u"],
    );
    let url = env.nats.url();
    let db = dir.path().join("mirror.sqlite");
    for sql in [
        "INSERT INTO t SELECT g, 'a' || g FROM generate_series(1, 100) g",
        "UPDATE t SET v = 'b' || id WHERE id <= 60",
        "DELETE FROM t WHERE id <= 20",
        "UPDATE t SET id = id + 1000 WHERE id BETWEEN 21 AND 30",
        "BEGIN; UPDATE t SET v = 'c' WHERE id = 40; DELETE FROM t WHERE id = 41; \
         INSERT INTO t VALUES (20, 'again'); COMMIT",
        "INSERT INTO u SELECT g, 'x' FROM generate_series(1, 10) g",
        "TRUNCATE u",
        "INSERT INTO u VALUES (5, 'after truncate')",
    ] {
        env.pg.sql("app", sql);
    }
    wait_mirror_caught_up(&env.pg, &url, &durable(&db));
    let tables = [
        Table {
            token: "t",
            pg: "t",
            key: 1,
            columns: vec![("id", Kind::Int), ("v", Kind::Text)],
        },
        Table {
            token: "u",
            pg: "u",
            key: 1,
            columns: vec![("id", Kind::Int), ("v", Kind::Text)],
        },
    ];
    for t in &tables {
        assert_table_mirrored(&env, &db, t, &mirror);
    }

    // Every change once more in stream order, then once more backwards.
    let stored = common::read_stream(&url, "CDC");
    assert!(stored.len() > 200, "{} changes", stored.len());
    let replay: Vec<_> = stored.iter().chain(stored.iter().rev()).collect();
    let count = replay.len();
    common::with_nats(&url, |client| async move {
        let js = async_nats::jetstream::new(client);
        for (i, m) in replay.into_iter().enumerate() {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("replay-{i}").as_str());
            if let Some(h) = &m.last_in_tx_header {
                headers.insert("Pgbridge-Last-In-Tx", h.as_str());
            }
            js.publish_with_headers(m.subject.clone(), headers, m.payload.clone().into())
                .await
                .expect("publish")
                .await
                .expect("stored");
        }
    });
    assert_eq!(
        common::stream_len(&url, "CDC"),
        (stored.len() + count) as u64
    );
    wait_mirror_caught_up(&env.pg, &url, &durable(&db));
    for t in &tables {
        assert_table_mirrored(&env, &db, t, &mirror);
    }
    let tombstones: i64 = open_sqlite(&db)
        .unwrap()
        .query_row(
            "SELECT count(*) FROM _pgbridge_versions WHERE table_token = 't' AND deleted = 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(tombstones >= 20, "{tombstones} tombstones");
    assert_eq!(mirror.terminate(Duration::from_secs(30)), Some(0));
    drop(bridge);
}

/// `DROP COLUMN` and `ALTER COLUMN ... TYPE` in the middle of a workload: the mirrored table
/// ends with the source's columns, of the new types, and its values.
#[test]
fn mirror_follows_dropped_and_retyped_columns() {
    let (env, bridge, dir, mut mirror) = small_setup(
        "CREATE TABLE users (id int PRIMARY KEY, name text, age int, note text, score text); \
         INSERT INTO users SELECT g, 'u' || g, g, 'n' || g, (g * 3)::text \
           FROM generate_series(1, 200) g",
        None,
        &["users"],
    );
    let url = env.nats.url();
    let db = dir.path().join("mirror.sqlite");
    env.pg
        .sql("app", "UPDATE users SET name = name || '!' WHERE id <= 10");
    env.pg.sql("app", "ALTER TABLE users DROP COLUMN note");
    env.pg.sql(
        "app",
        "ALTER TABLE users ALTER COLUMN age TYPE text USING age::text, \
         ALTER COLUMN score TYPE bigint USING score::bigint",
    );
    // Two waves: the mirror reads the schema again at most once a second.
    for wave in 0..2 {
        env.pg.sql(
            "app",
            &format!(
                "UPDATE users SET age = age || 'y{wave}', score = score + 1 WHERE id % 4 = {wave}; \
                 INSERT INTO users VALUES ({}, 'new', 'seven', 7); \
                 DELETE FROM users WHERE id = {}",
                1000 + wave,
                50 + wave
            ),
        );
        std::thread::sleep(Duration::from_millis(1500));
    }
    wait_mirror_caught_up(&env.pg, &url, &durable(&db));
    let columns: Vec<(String, String)> = open_sqlite(&db)
        .unwrap()
        .prepare("SELECT name, type FROM pragma_table_info('users') ORDER BY cid")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let columns: Vec<(&str, &str)> = columns
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    assert_eq!(
        columns,
        [
            ("id", "INTEGER"),
            ("name", "TEXT"),
            ("age", "TEXT"),
            ("score", "INTEGER")
        ],
        "the mirrored table's columns; log:\n{}",
        tail(&mirror.log(), 40)
    );
    let users = Table {
        token: "users",
        pg: "users",
        key: 1,
        columns: vec![
            ("id", Kind::Int),
            ("name", Kind::Text),
            ("age", Kind::Text),
            ("score", Kind::Int),
        ],
    };
    assert_eq!(assert_table_mirrored(&env, &db, &users, &mirror), 200);
    assert_eq!(mirror.terminate(Duration::from_secs(30)), Some(0));
    drop(bridge);
}

/// Two mirrors on one stream, both with the default consumer name, at the same time: each
/// has its own consumer and both end equal to the source.
#[test]
fn two_mirrors_with_default_consumer_names() {
    let env = TestEnv::start();
    setup_app_db(
        &env.pg,
        "CREATE TABLE users (id int PRIMARY KEY, name text); \
         INSERT INTO users SELECT g, 'u' || g FROM generate_series(1, 100) g",
        "",
    );
    let dir = TempDir::new("mirror");
    let bridge = spawn_bridge(&env, dir.path());
    let url = env.nats.url();
    let dbs = [dir.path().join("a.sqlite"), dir.path().join("b.sqlite")];
    let names: Vec<String> = dbs.iter().map(|db| durable(db)).collect();
    assert_ne!(names[0], names[1]);
    let mut mirrors: Vec<BridgeProcess> = dbs
        .iter()
        .map(|db| BridgeProcess::spawn(&mut mirror_command(&url, db, dir.path(), None, &[])))
        .collect();
    for db in &dbs {
        wait_for("the mirrors to bootstrap", STEP_TIMEOUT, || {
            bootstrapped(db, &["users"]).then_some(())
        });
    }
    for i in 0..20 {
        env.pg.sql(
            "app",
            &format!(
                "UPDATE users SET name = name || '{i}' WHERE id % 7 = {}; \
                 INSERT INTO users VALUES ({}, 'new'); DELETE FROM users WHERE id = {}",
                i % 7,
                1000 + i,
                i + 1
            ),
        );
    }
    let users = Table {
        token: "users",
        pg: "users",
        key: 1,
        columns: vec![("id", Kind::Int), ("name", Kind::Text)],
    };
    for (db, mirror) in dbs.iter().zip(&mirrors) {
        wait_mirror_caught_up(&env.pg, &url, &durable(db));
        assert_eq!(assert_table_mirrored(&env, db, &users, mirror), 100);
    }
    for (name, mirror) in names.iter().zip(&mirrors) {
        assert!(
            consumer_state(&url, name).is_some(),
            "consumer {name} is gone"
        );
        assert!(
            !mirror.log().contains("following again"),
            "a mirror lost its consumer:\n{}",
            tail(&mirror.log(), 40)
        );
    }
    for mirror in &mut mirrors {
        assert_eq!(mirror.terminate(Duration::from_secs(30)), Some(0));
    }
    drop(bridge);
}
