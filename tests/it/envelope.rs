//! `--envelope debezium` on NATS: the oracle's tables, seeded and then changed by its random
//! workload (inserts, updates of TOASTed and other columns, primary key changes, deletes,
//! REPLICA IDENTITY FULL, a truncate), all published in Debezium's change-event envelope. A
//! consumer written against Debezium's documented envelope only (`op`, `before`, `after`,
//! `source.schema`/`source.table`, the PostgreSQL connector's value forms, the unavailable-
//! value placeholder) rebuilds every table from the stream, and the rebuilt tables equal the
//! source, value for value, each compared through a canonical text that PostgreSQL computes
//! on its side with Debezium's documented semantics (days since the epoch, µs intervals with
//! 30.4375-day months, UTC ISO timestamps, decimals). Message ids are unchanged; `bridge
//! mirror` and the Python reference consumer refuse Debezium bodies with a clear error.
//!
//! The workload's seed is printed; `MIRROR_TEST_SEED=<seed>` reruns it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde_json::{Map, Value as J};
use testkit::oracle::{
    canon_f4, canon_f8, canon_json, grant_sales, mirror_command, quote_ident, seed_sql,
    spawn_bridge_with, Writer, SCHEMA, WRITER_RATE,
};
use testkit::{read_stream, setup_app_db, stream_len, BridgeProcess, TempDir, TestEnv};

/// Debezium's placeholder for an unchanged TOASTed value.
const UNAVAILABLE: &str = "__debezium_unavailable_value";

/// How a column's Debezium value is read back, and how PostgreSQL computes the same text.
#[derive(Clone, Copy, Debug)]
enum Form {
    /// int16/int32/int64.
    Int,
    /// double (`"NaN"`, `"Infinity"` as strings).
    F8,
    /// float.
    F4,
    /// boolean.
    Bool,
    /// bytes: base64.
    Bytes,
    /// array, compared as JSON.
    Array,
    /// array of doubles.
    FloatArray,
    /// string.
    Text,
    /// `org.apache.kafka.connect.data.Decimal` with this scale: base64 of the unscaled value.
    Decimal(u32),
    /// `io.debezium.data.VariableScaleDecimal`: `{"scale", "value"}`.
    VariableDecimal,
    /// `io.debezium.time.Date`: days since 1970-01-01.
    Date,
    /// `io.debezium.time.ZonedTimestamp`: ISO 8601 in UTC.
    ZonedTimestamp,
    /// `io.debezium.time.MicroDuration`: µs, a month being 30.4375 days.
    MicroDuration,
}

struct Table {
    /// `schema.table`.
    name: &'static str,
    /// Primary key columns.
    key: &'static [&'static str],
    columns: Vec<(&'static str, Form)>,
}

fn tables() -> Vec<Table> {
    use Form::*;
    vec![
        Table {
            name: "public.accounts",
            key: &["id"],
            columns: vec![
                ("id", Int),
                ("name", Text),
                ("balance", Decimal(2)),
                ("flag", Bool),
                ("score", F8),
                ("data", Bytes),
                ("tags", Array),
                ("nums", Array),
                ("doc", Text),
                ("big", Text),
                ("updated", ZonedTimestamp),
            ],
        },
        Table {
            name: "public.items",
            key: &["order_id", "line"],
            columns: vec![
                ("order_id", Int),
                ("line", Int),
                ("qty", Int),
                ("note", Text),
            ],
        },
        Table {
            name: "public.events",
            key: &["id"],
            columns: vec![
                ("id", Int),
                ("kind", Int),
                ("ratio", F4),
                ("day", Date),
                ("label", Text),
                ("flags", Array),
                ("ws", FloatArray),
            ],
        },
        Table {
            name: "sales.invoices",
            key: &["id"],
            columns: vec![
                ("id", Text),
                ("amount", VariableDecimal),
                ("paid", Date),
                ("meta", Text),
                ("term", MicroDuration),
                ("customer", Int),
                ("note", Text),
            ],
        },
    ]
}

type Rows = BTreeMap<String, Vec<Option<String>>>;

/// PostgreSQL's side: each value as the text the consumer derives from Debezium's form.
fn pg_rows(pg: &testkit::PgServer, t: &Table) -> Rows {
    let select: Vec<String> = t
        .columns
        .iter()
        .map(|(c, form)| {
            let c = quote_ident(c);
            match form {
                Form::Array | Form::FloatArray => format!("array_to_json({c})::text"),
                // Debezium's precise decimals have no NaN: it arrives as null.
                Form::Decimal(_) | Form::VariableDecimal => {
                    format!("CASE WHEN {c} = 'NaN' THEN NULL ELSE {c}::text END")
                }
                Form::Date => format!("({c} - date '1970-01-01')::text"),
                Form::ZonedTimestamp => {
                    format!("to_char({c} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
                }
                Form::MicroDuration => format!(
                    "((extract(year from {c}) * 12 + extract(month from {c})) * 2629800000000 \
                     + extract(day from {c}) * 86400000000 \
                     + (extract(hour from {c}) * 3600 + extract(minute from {c}) * 60 \
                        + extract(second from {c})) * 1000000)::bigint::text"
                ),
                _ => c,
            }
        })
        .collect();
    let sql = format!(
        "SET DateStyle = ISO; SET TimeZone = 'UTC'; SET extra_float_digits = 3; \
         SET bytea_output = hex; SELECT {} FROM {}",
        select.join(", "),
        t.name
    );
    pg.sql("app", &sql)
        .rows
        .iter()
        .map(|r| {
            let row: Vec<Option<String>> = t
                .columns
                .iter()
                .zip(r)
                .map(|((_, form), v)| {
                    v.as_deref().map(|s| match form {
                        Form::F8 => canon_f8(s.parse().expect("a float8")),
                        Form::F4 => canon_f4(s.parse().expect("a float4")),
                        Form::Array => canon_json(s, false),
                        Form::FloatArray => canon_json(s, true),
                        _ => s.to_string(),
                    })
                })
                .collect();
            (row_key(t, &row), row)
        })
        .collect()
}

fn row_key(t: &Table, row: &[Option<String>]) -> String {
    t.key
        .iter()
        .map(|k| {
            let i = t
                .columns
                .iter()
                .position(|(c, _)| c == k)
                .expect("key column");
            row[i].clone().unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join("|")
}

// ---------------------------------------------------------------------------------------
// The consumer: Debezium's documented envelope and value forms, nothing of the bridge's.

/// Kafka Connect's `Decimal`: big-endian two's complement of the unscaled value.
fn unscaled(b64: &str) -> i128 {
    let bytes = pgbridge::wire::text::base64_decode(b64).expect("base64");
    assert!(
        !bytes.is_empty() && bytes.len() <= 16,
        "decimal of {} bytes",
        bytes.len()
    );
    let mut v: i128 = if bytes[0] & 0x80 != 0 { -1 } else { 0 };
    for b in bytes {
        v = (v << 8) | i128::from(b);
    }
    v
}

fn decimal_text(unscaled: i128, scale: u32) -> String {
    let digits = unscaled.unsigned_abs().to_string();
    let sign = if unscaled < 0 { "-" } else { "" };
    if scale == 0 {
        return format!("{sign}{digits}");
    }
    let digits = format!("{digits:0>width$}", width = scale as usize + 1);
    let (int, frac) = digits.split_at(digits.len() - scale as usize);
    format!("{sign}{int}.{frac}")
}

/// One Debezium value as comparable text.
fn read_value(form: Form, v: &J) -> Option<String> {
    if v.is_null() {
        return None;
    }
    let text = || {
        v.as_str()
            .unwrap_or_else(|| panic!("{form:?}: not a string: {v}"))
    };
    let float = || match v {
        J::String(s) => s.parse::<f64>().expect("NaN or an infinity"),
        _ => v.as_f64().expect("a number"),
    };
    Some(match form {
        Form::Int | Form::Date | Form::MicroDuration => v
            .as_i64()
            .unwrap_or_else(|| panic!("{form:?}: {v}"))
            .to_string(),
        Form::F8 => canon_f8(float()),
        Form::F4 => canon_f4(float() as f32),
        Form::Bool => if v.as_bool().expect("a boolean") {
            "t"
        } else {
            "f"
        }
        .into(),
        Form::Bytes => {
            let bytes = pgbridge::wire::text::base64_decode(text()).expect("base64");
            let mut s = String::from("\\x");
            for b in bytes {
                let _ = write!(s, "{b:02x}");
            }
            s
        }
        Form::Array => canon_json(&v.to_string(), false),
        Form::FloatArray => canon_json(&v.to_string(), true),
        Form::Text => text().to_string(),
        Form::Decimal(scale) => decimal_text(unscaled(text()), scale),
        Form::VariableDecimal => {
            let scale = v["scale"].as_u64().expect("scale") as u32;
            decimal_text(unscaled(v["value"].as_str().expect("value")), scale)
        }
        Form::ZonedTimestamp => {
            // `…:SS[.f]Z` with six fractional digits, as to_char's `.US` prints them.
            let s = text().strip_suffix('Z').expect("UTC");
            let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
            format!("{whole}.{frac:0<6}Z")
        }
    })
}

/// The key of a row struct.
fn struct_key(t: &Table, row: &Map<String, J>) -> String {
    t.key
        .iter()
        .map(|k| {
            let (_, form) = t.columns.iter().find(|(c, _)| c == k).expect("key column");
            read_value(*form, &row[*k]).unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join("|")
}

/// Debezium's placeholder of an unchanged TOASTed value: the text, a one-element array of it,
/// or, for integer arrays, its bytes as numbers.
fn is_placeholder(value: &J) -> bool {
    let bytes: Vec<J> = UNAVAILABLE.bytes().map(J::from).collect();
    value.as_str() == Some(UNAVAILABLE)
        || value
            .as_array()
            .is_some_and(|a| (a.len() == 1 && a[0] == UNAVAILABLE) || *a == bytes)
}

/// Applies the change events of `messages` in order, as a Debezium consumer does; the rows of
/// each table as row structs, by key.
fn rebuild(
    messages: &[testkit::StoredMessage],
    tables: &[Table],
    schemas: bool,
) -> BTreeMap<String, BTreeMap<String, Map<String, J>>> {
    let mut state: BTreeMap<String, BTreeMap<String, Map<String, J>>> = BTreeMap::new();
    for m in messages {
        let body: J = serde_json::from_slice(&m.payload)
            .unwrap_or_else(|e| panic!("message {} is not JSON: {e}", m.seq));
        let v = if schemas {
            assert!(body["schema"].is_object(), "message {}: no schema", m.seq);
            &body["payload"]
        } else {
            &body
        };
        let name = format!(
            "{}.{}",
            v["source"]["schema"].as_str().expect("source.schema"),
            v["source"]["table"].as_str().expect("source.table")
        );
        let t = tables
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("unexpected table {name}"));
        let rows = state.entry(name).or_default();
        let row = |field: &str| v[field].as_object().cloned();
        match v["op"].as_str().expect("op") {
            "c" | "r" => {
                let after = row("after").expect("after");
                rows.insert(struct_key(t, &after), after);
            }
            "u" => {
                let mut after = row("after").expect("after");
                // Old values come with REPLICA IDENTITY FULL, or when the key changed.
                let old_key = row("before").map(|b| struct_key(t, &b));
                let old = match &old_key {
                    Some(k) => rows.remove(k),
                    None => rows.get(&struct_key(t, &after)).cloned(),
                };
                for (column, value) in after.iter_mut() {
                    if is_placeholder(value) {
                        *value = old.as_ref().expect("the row an update changes")[column].clone();
                    }
                }
                rows.insert(struct_key(t, &after), after);
            }
            "d" => {
                let before = row("before").expect("before");
                rows.remove(&struct_key(t, &before));
            }
            "t" => rows.clear(),
            op => panic!("message {}: unknown op {op}", m.seq),
        }
    }
    state
}

fn consumer_rows(t: &Table, rows: Option<&BTreeMap<String, Map<String, J>>>) -> Rows {
    rows.into_iter()
        .flatten()
        .map(|(key, row)| {
            let values = t
                .columns
                .iter()
                .map(|(c, form)| read_value(*form, row.get(*c).unwrap_or(&J::Null)))
                .collect();
            (key.clone(), values)
        })
        .collect()
}

fn differences(t: &Table, source: &Rows, rebuilt: &Rows) -> String {
    let mut report = format!(
        "{}: source {} rows, rebuilt {}\n",
        t.name,
        source.len(),
        rebuilt.len()
    );
    let keys: std::collections::BTreeSet<&String> = source.keys().chain(rebuilt.keys()).collect();
    for key in keys
        .into_iter()
        .filter(|k| source.get(*k) != rebuilt.get(*k))
        .take(8)
    {
        let _ = writeln!(
            report,
            "  key {key}: source {:?}\n           rebuilt {:?}",
            source.get(key),
            rebuilt.get(key)
        );
    }
    report
}

// ---------------------------------------------------------------------------------------
// Scenarios.

/// The oracle's empty tables and a bridge with `args`; the rows arrive through the stream.
fn start(args: &[&str]) -> (TestEnv, BridgeProcess, TempDir) {
    let env = TestEnv::start();
    setup_app_db(&env.pg, SCHEMA, "");
    grant_sales(&env.pg);
    let dir = TempDir::new("envelope");
    let bridge = spawn_bridge_with(&env, dir.path(), args);
    (env, bridge, dir)
}

/// The stream once it holds the change that inserted the marker row `items (-1, -1)`, the
/// last change made.
fn read_until_marker(url: &str, bridge: &BridgeProcess) -> Vec<testkit::StoredMessage> {
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut seen = 0;
    loop {
        // Read the whole stream only once it has stopped growing.
        let len = stream_len(url, "CDC");
        if len > 0 && len == seen {
            let messages = read_stream(url, "CDC");
            let last = messages
                .last()
                .map(|m| m.payload.as_slice())
                .unwrap_or_default();
            if String::from_utf8_lossy(last).contains("\"note\":\"marker\"") {
                return messages;
            }
        }
        seen = len;
        assert!(
            Instant::now() < deadline,
            "the marker row never reached the stream ({len} messages); bridge log:\n{}",
            bridge.log()
        );
        std::thread::sleep(Duration::from_millis(700));
    }
}

/// Seeds the tables, runs the random workload, truncates `items` and refills it, then adds
/// the marker row.
fn write_workload(env: &TestEnv, seed: u64, changes: u64) {
    env.pg.sql("app", &seed_sql());
    let writer = Writer::start(&env.pg, seed, changes, WRITER_RATE);
    let report = writer.finish();
    assert!(
        report.changes >= changes,
        "the workload made {} changes",
        report.changes
    );
    env.pg.sql(
        "app",
        "BEGIN; TRUNCATE items; INSERT INTO items SELECT o, l, o * l, 'refill' \
         FROM generate_series(1, 30) o, generate_series(1, 3) l; COMMIT; \
         UPDATE accounts SET balance = -balance WHERE id % 5 = 0; \
         INSERT INTO items VALUES (-1, -1, 0, 'marker')",
    );
}

fn assert_rebuilt(env: &TestEnv, messages: &[testkit::StoredMessage], schemas: bool) {
    let tables = tables();
    let state = rebuild(messages, &tables, schemas);
    let mut report = String::new();
    for t in &tables {
        let source = pg_rows(&env.pg, t);
        let rebuilt = consumer_rows(t, state.get(t.name));
        assert!(!source.is_empty(), "{}: the source is empty", t.name);
        if source != rebuilt {
            report.push_str(&differences(t, &source, &rebuilt));
        }
    }
    assert!(
        report.is_empty(),
        "rebuilt tables differ from the source:\n{report}"
    );
}

/// Ids as without the envelope: every message has one, all distinct.
fn assert_ids(messages: &[testkit::StoredMessage]) {
    let ids: std::collections::HashSet<&str> = messages
        .iter()
        .map(|m| m.msg_id.as_deref().expect("Nats-Msg-Id"))
        .collect();
    assert_eq!(ids.len(), messages.len(), "message ids repeat");
}

#[test]
fn debezium_consumer_rebuilds_the_tables() {
    let seed = crate::mirror::seed();
    let (env, bridge, _dir) = start(&["--envelope", "debezium"]);
    write_workload(&env, seed, 6_000);
    let messages = read_until_marker(&env.nats.url(), &bridge);
    assert_ids(&messages);
    let ops: std::collections::BTreeSet<String> = messages
        .iter()
        .map(|m| serde_json::from_slice::<J>(&m.payload).unwrap()["op"].to_string())
        .collect();
    for op in ["\"c\"", "\"u\"", "\"d\"", "\"t\""] {
        assert!(ops.contains(op), "no {op} event among {ops:?}");
    }
    let placeholders = messages
        .iter()
        .filter(|m| String::from_utf8_lossy(&m.payload).contains(UNAVAILABLE))
        .count();
    assert!(placeholders > 0, "no update left a TOASTed value unchanged");
    assert_rebuilt(&env, &messages, false);
    drop(bridge);
}

#[test]
fn debezium_with_schemas_and_the_native_consumers_refuse_it() {
    let seed = crate::mirror::seed();
    let (env, bridge, dir) = start(&["--envelope=debezium", "--debezium-schemas"]);
    write_workload(&env, seed, 1_000);
    let url = env.nats.url();
    let messages = read_until_marker(&url, &bridge);
    assert_ids(&messages);
    let first: J = serde_json::from_slice(&messages[0].payload).unwrap();
    assert_eq!(
        first["schema"]["name"], "cdc.public.accounts.Envelope",
        "{first}"
    );
    assert_rebuilt(&env, &messages, true);

    // The bridge's own consumer reads the native envelope only, and says so.
    let db = dir.path().join("mirror.sqlite");
    let mut mirror = BridgeProcess::spawn(&mut mirror_command(&url, &db, dir.path(), None, &[]));
    // It bootstraps from a snapshot (its own format) and then meets the next change.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut n = 0;
    while mirror.child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        n += 1;
        env.pg.sql(
            "app",
            &format!("INSERT INTO items VALUES (-2, {n}, 0, 'after')"),
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let code = mirror.wait_exit(Duration::from_secs(10));
    let log = mirror.log();
    assert!(
        code.is_some_and(|c| c != 0),
        "the mirror exited with {code:?}:\n{log}"
    );
    assert!(log.contains("--envelope debezium"), "{log}");

    // So does the Python reference consumer.
    let python = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".dev/venv/bin/python");
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("consumer-example/python/mirror.py");
    let mut child = testkit::KillOnDrop(
        std::process::Command::new(python)
            .arg(script)
            .args([
                "--nats",
                &url,
                "--table",
                "accounts",
                "--until-idle",
                "60",
                "--db",
            ])
            .arg(dir.path().join("python.sqlite"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn mirror.py"),
    );
    let mut stderr = child.stderr.take().expect("piped stderr");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut out).map(|_| out)
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "mirror.py did not stop");
        n += 1;
        env.pg.sql(
            "app",
            &format!("UPDATE accounts SET name = 'n{n}' WHERE id = (SELECT min(id) FROM accounts)"),
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let err = reader.join().unwrap().unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.trim_end()
            .ends_with("run the bridge with --envelope native"),
        "{err}"
    );
    drop(bridge);
}

/// Each type family as the real server prints it, in the Debezium form: domains as their base
/// type, enums, `numeric` with and without scale (and `NaN`), times with and without a time
/// zone and with millisecond precision, intervals with months, money, `bit(1)`, arrays of
/// types without a typed native decoding, infinite and BC dates; `bridge tail` shows them as
/// they are.
#[test]
fn debezium_values_of_each_type_family() {
    let env = TestEnv::start();
    setup_app_db(
        &env.pg,
        "CREATE DOMAIN price AS numeric(10,2); CREATE DOMAIN day AS date; \
         CREATE TYPE mood AS ENUM ('sad', 'happy'); \
         CREATE TABLE kinds (id int PRIMARY KEY, p price, d day, m mood, n numeric(6,3), \
           v numeric, t time, t3 time(3), tz timetz, ts timestamp, ts3 timestamp(3), \
           tstz timestamptz, iv interval, cash money, b1 bit(1), u uuid, ip inet, \
           nums numeric(5,1)[], days date[], j jsonb)",
        "",
    );
    let dir = TempDir::new("envelope");
    let bridge = spawn_bridge_with(&env, dir.path(), &["--envelope", "debezium"]);
    env.pg.sql(
        "app",
        "SET lc_monetary = 'C'; \
         INSERT INTO kinds VALUES (1, 12.5, '2024-02-29', 'happy', 1.5, 'NaN', '04:05:06.789', \
           '04:05:06.789', '10:00:00.5+02', '2025-01-01 10:00:00.123456', \
           '2025-01-01 10:00:00.123', '2025-01-01 12:00:00.5+02', \
           '1 year 2 months -3 days 04:05:06.5', '-1234.56', B'1', \
           'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '192.168.0.1/24', ARRAY[1.5, NULL, -2], \
           ARRAY['2024-01-01'::date, NULL], '{\"a\": 1}'); \
         INSERT INTO kinds (id, d, ts) VALUES (2, 'infinity', '0001-01-01 00:00:00 BC')",
    );
    let url = env.nats.url();
    let messages = testkit::wait_for(
        "both inserts on the stream",
        Duration::from_secs(60),
        || (stream_len(&url, "CDC") >= 2).then(|| read_stream(&url, "CDC")),
    );
    let after = |i: usize| -> J {
        let v: J = serde_json::from_slice(&messages[i].payload).unwrap();
        assert_eq!(v["op"], "c", "{v}");
        v["after"].clone()
    };
    let expected = serde_json::json!({
        "id": 1,
        // A domain's own modifier is not in the Relation message: numeric without scale.
        "p": {"scale": 2, "value": "BOI="},
        "d": 19_782, "m": "happy",
        "n": "Bdw=", "v": null,
        "t": 14_706_789_000_i64, "t3": 14_706_789, "tz": "08:00:00.5Z",
        "ts": 1_735_725_600_123_456_i64, "ts3": 1_735_725_600_123_i64,
        "tstz": "2025-01-01T10:00:00.5Z",
        "iv": 36_572_706_500_000_i64,
        "cash": "/h3A", "b1": true,
        "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "ip": "192.168.0.1/24",
        "nums": ["Dw==", null, "7A=="], "days": [19_723, null], "j": "{\"a\": 1}",
    });
    assert_eq!(after(0), expected, "bridge log:\n{}", bridge.log());
    let second = after(1);
    assert_eq!(second["d"], J::Null, "infinity has no day count");
    assert_eq!(second["ts"], -62_167_219_200_000_000_i64, "1 BC is year 0");

    // `bridge tail` shows Debezium bodies as they are.
    let mut tail = testkit::KillOnDrop(
        std::process::Command::new(testkit::bridge_bin())
            .env_clear()
            .env("NATS_URL", &url)
            .args(["tail", "--from-start", "--until-idle", "2"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn bridge tail"),
    );
    let mut stdout = tail.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut out).map(|_| out)
    });
    let status = testkit::wait_for("bridge tail to exit", Duration::from_secs(60), || {
        tail.try_wait().unwrap()
    });
    let out = reader.join().unwrap().unwrap();
    assert!(status.success(), "{out}");
    let lines: Vec<J> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!(lines[0]["subject"], "cdc.kinds.insert");
    assert_eq!(lines[0]["after"], expected);
    drop(bridge);
}
