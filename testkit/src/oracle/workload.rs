//! The oracle's random workload: the statements it draws from its seed and the writer that
//! runs them against PostgreSQL at a steady rate.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pgbridge::pg::conn::{quote_literal, PgConnection};

use super::*;

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
    /// Row changes made in committed transactions.
    pub changes: u64,
    /// Transactions committed.
    pub transactions: u64,
    /// Statements run.
    pub statements: u64,
    /// Whether the TRUNCATE of `items` happened.
    pub truncated: bool,
    /// How long the writer ran.
    pub elapsed: Duration,
}

/// The writer: a thread running random transactions against `app`, at most `rate` row changes
/// per second, until told to stop once it has made `target` row changes; in any case it stops
/// after `WRITER_LIMIT` or `WRITER_MAX_CHANGES`.
pub struct Writer {
    /// The writer thread.
    pub handle: JoinHandle<WriterReport>,
    /// Row changes made so far.
    pub changes: Arc<AtomicU64>,
    /// Set to stop the writer.
    pub stop: Arc<AtomicBool>,
}

impl Writer {
    /// Starts the writer against database `app` of `pg`.
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

    /// Row changes made so far.
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

    /// Stops the writer; what it did.
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
/// Opens the savepoint the writer rolls back to.
pub const SAVEPOINT: &str = "SAVEPOINT s";
/// Rolls back to [`SAVEPOINT`].
pub const ROLLBACK_TO_SAVEPOINT: &str = "ROLLBACK TO SAVEPOINT s";

/// The writer's state: fresh keys and its random sequence.
///
/// Keys are chosen so that no statement can fail: rows are inserted only with keys never used
/// before, and a primary-key change either moves a row to a fresh key or flips its sign
/// (`id = -id`, `line = -line`), and at most one of `x` and `-x` ever exists.
pub struct Workload {
    /// The random sequence.
    pub rng: Rng,
    /// Statements drawn so far.
    pub n: u64,
    /// Next fresh `accounts` id.
    pub next_account: i64,
    /// Next fresh `items` order id.
    pub next_order: i64,
    /// Next fresh `events` id.
    pub next_event: i64,
    /// Whether the TRUNCATE was drawn.
    pub truncated: bool,
}

impl Workload {
    /// A workload drawn from `seed`.
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

    /// One random statement on one of the tables.
    pub fn statement(&mut self) -> String {
        self.n += 1;
        match self.rng.next() % 100 {
            0..=39 => self.accounts(),
            40..=64 => self.items(),
            65..=79 => self.events(),
            _ => self.invoices(),
        }
    }

    /// A random text literal (NULL, the awkward ones, plain).
    pub fn text(&mut self) -> String {
        let n = self.n;
        match self.rng.next() % 10 {
            0 => "NULL".into(),
            1..=3 => quote_literal(self.rng.pick(SPECIAL_TEXTS)),
            _ => format!("'w{n}-{}'", self.rng.next() % 1000),
        }
    }

    /// A random float8 literal (NULL, infinities, NaN, extremes, plain).
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

    /// An `accounts` key: a seed row, its negated twin or a fresh one.
    pub fn account_id(&mut self) -> i64 {
        match self.rng.next() % 10 {
            0..=4 => self.rng.range(1, SEED_ACCOUNTS),
            5 | 6 => -self.rng.range(1, SEED_ACCOUNTS),
            _ => self
                .rng
                .range(FRESH_ACCOUNT, self.next_account.max(FRESH_ACCOUNT + 1)),
        }
    }

    /// A random statement on `accounts`.
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

    /// An order id: an existing order or a fresh one.
    pub fn order_id(&mut self) -> i64 {
        if self.rng.chance(40) {
            self.rng.range(1, self.next_order - 1)
        } else {
            self.rng
                .range((self.next_order - 1500).max(1), self.next_order - 1)
        }
    }

    /// A random statement on `items`.
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

    /// A random statement on `events`.
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

    /// A random statement on `sales.invoices`.
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

/// The SQLite table names of the mirrored tables.
pub fn table_tokens() -> Vec<&'static str> {
    tables().iter().map(|t| t.token).collect()
}
