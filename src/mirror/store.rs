//! The SQLite side of the mirror: the mirrored tables and, in the same file, the position of
//! each (`_pgbridge_mirror`), written in the same transaction as the rows so that a restart
//! continues exactly where the last commit stopped.
//!
//! Row versions live beside the tables, in `_pgbridge_versions`, so the user's tables keep
//! exactly the source's columns: one row per (table, primary key) with the `(commit_lsn,
//! seq)` of the last change applied to it, flagged `deleted` for a deleted row (a tombstone),
//! plus, under the empty key, the version of the table's last TRUNCATE. A change is applied
//! only when it is newer than both. Rows loaded by a snapshot have no entry: the snapshot's
//! LSN is the table's floor (older changes are skipped before they get here), and any change
//! at or after it is newer. Tombstones are dropped after [`TOMBSTONE_TTL`].

use std::collections::HashMap;
use std::path::Path;

use rmpv::Value;
use rusqlite::types::Value as Sql;
use rusqlite::{params, Connection, OptionalExtension};

use super::doc::{to_sql, ColumnKind};
use crate::pg::Lsn;
use crate::wire::decode::{self, DocError};
use crate::wire::fields;

/// The table holding each mirrored table's position.
pub const STATE_TABLE: &str = "_pgbridge_mirror";
/// The table of row versions and tombstones.
pub const VERSIONS_TABLE: &str = "_pgbridge_versions";
/// How long a tombstone is kept: far longer than JetStream's duplicate window (2 minutes by
/// default), within which a change can come a second time.
pub const TOMBSTONE_TTL: std::time::Duration = std::time::Duration::from_secs(3600);
/// Prepared statements kept: a few per mirrored table and column set.
const STATEMENT_CACHE: usize = 256;

/// SQLite failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file cannot be opened or written.
    #[error("SQLite file {path}: {source}")]
    Open {
        /// The file.
        path: String,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// A statement failed.
    #[error("SQLite: {0}")]
    Sql(#[from] rusqlite::Error),
    /// The table cannot be mirrored as it is.
    #[error("cannot mirror {table}: {reason}")]
    Unsupported {
        /// The table.
        table: String,
        /// Why.
        reason: String,
    },
    /// A schema document or change without the fields the mirror needs.
    #[error("{0}")]
    Message(#[from] DocError),
}

/// Where a mirrored table stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Position {
    /// The snapshot the table was loaded from.
    pub snapshot_id: String,
    /// The snapshot's consistent point: changes committed before it are in the snapshot.
    pub lsn: Lsn,
    /// The last CDC stream sequence applied (or skipped) for this table.
    pub last_seq: u64,
}

/// The version of a change: its transaction's `commit_lsn` and its `seq` in it. Later changes
/// have greater versions.
pub type Version = (u64, u32);

/// What the mirror knows of one SQLite table.
#[derive(Debug)]
struct Table {
    /// Name, not quoted.
    name: String,
    /// `"name"`, quoted.
    quoted: String,
    /// Column kinds by name.
    kinds: HashMap<String, ColumnKind>,
    /// Primary-key columns in key order.
    key: Vec<String>,
}

/// The SQLite database of a mirror.
pub struct Store {
    conn: Connection,
    /// By table token (`users`, `sales.invoices`).
    tables: HashMap<String, Table>,
    in_transaction: bool,
}

/// An SQLite identifier, quoted.
pub fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl Store {
    /// Opens (creating) the SQLite file.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.display().to_string(),
            source,
        };
        let conn = Connection::open(path).map_err(open_err)?;
        // WAL lets readers query the mirror while it applies changes; NORMAL still never
        // loses a committed transaction to a process crash, only (at most the last ones) to a
        // power loss, and then the stored position goes back with the rows.
        conn.execute_batch(&format!(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=10000; \
             CREATE TABLE IF NOT EXISTS {STATE_TABLE} (table_token TEXT PRIMARY KEY, \
             snapshot_id TEXT NOT NULL, lsn TEXT NOT NULL, last_seq INTEGER NOT NULL); \
             CREATE TABLE IF NOT EXISTS {VERSIONS_TABLE} (table_token TEXT NOT NULL, \
             row_key TEXT NOT NULL, commit_lsn INTEGER NOT NULL, seq INTEGER NOT NULL, \
             deleted INTEGER NOT NULL, written INTEGER NOT NULL, \
             PRIMARY KEY (table_token, row_key)) WITHOUT ROWID; \
             CREATE INDEX IF NOT EXISTS {VERSIONS_TABLE}_tombstones ON {VERSIONS_TABLE} \
             (written) WHERE deleted = 1"
        ))
        .map_err(open_err)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        Ok(Store {
            conn,
            tables: HashMap::new(),
            in_transaction: false,
        })
    }

    /// Creates the table `name` from a schema document of the `schemas` bucket, or adds the
    /// columns it lacks; `token` names it from now on.
    ///
    /// With `evidence` (from a change: the columns it has, and those whose value does not fit
    /// their SQLite type), also drops the columns neither the schema nor the change has, and
    /// retypes the columns that did not fit and whose type the schema changed (a table
    /// rebuild: SQLite cannot change a column's type; the stored values are converted as the
    /// new type affinity dictates). The caller has a transaction open for that. Only what the
    /// change shows is done, since the schema may be newer than the change (the mirror may be
    /// behind). Without it (at start), columns are only added.
    ///
    /// Returns true when a column with a default was added to an existing table: PostgreSQL
    /// gives the rows it already had that default without writing them to the WAL, so only a
    /// new snapshot brings those values.
    pub fn apply_schema(
        &mut self,
        token: &str,
        name: &str,
        schema: &Value,
        evidence: Option<(&[&str], &[&str])>,
    ) -> Result<bool, StoreError> {
        let unsupported = |reason: &str| StoreError::Unsupported {
            table: name.to_owned(),
            reason: reason.to_owned(),
        };
        let key: Vec<String> = match decode::field(schema, fields::PRIMARY_KEY) {
            Some(Value::Array(k)) => k
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        };
        if key.is_empty() {
            return Err(unsupported(
                "it has no primary key (add one in PostgreSQL; the mirror finds rows by key)",
            ));
        }
        let mut columns: Vec<(i64, String, ColumnKind, bool)> =
            match decode::field(schema, fields::COLUMNS) {
                Some(Value::Array(cols)) => cols
                    .iter()
                    .map(|c| {
                        Ok((
                            decode::field(c, fields::POSITION)
                                .and_then(Value::as_i64)
                                .unwrap_or(0),
                            decode::str_field(c, fields::NAME)?.to_owned(),
                            ColumnKind::for_pg_type(decode::str_field(c, fields::DATA_TYPE)?),
                            decode::field(c, fields::COLUMN_DEFAULT).is_some_and(|d| !d.is_nil()),
                        ))
                    })
                    .collect::<Result<_, DocError>>()?,
                _ => return Err(unsupported("its schema document lists no columns")),
            };
        columns.sort_by_key(|c| c.0);
        let quoted = quote(name);
        let existing = self.read_columns(name)?;
        let mut added_with_default = false;
        if existing.is_empty() {
            let mut defs: Vec<String> = columns
                .iter()
                .map(|(_, n, k, _)| format!("{} {}", quote(n), k.sqlite_type()))
                .collect();
            defs.push(format!(
                "PRIMARY KEY ({})",
                key.iter().map(|k| quote(k)).collect::<Vec<_>>().join(", ")
            ));
            self.conn
                .execute_batch(&format!("CREATE TABLE {quoted} ({})", defs.join(", ")))?;
            log::info!("created table {quoted}");
        } else {
            for (_, n, k, has_default) in &columns {
                if !existing.iter().any(|(e, _, _)| e == n) {
                    added_with_default |= *has_default;
                    self.conn.execute_batch(&format!(
                        "ALTER TABLE {quoted} ADD COLUMN {} {}",
                        quote(n),
                        k.sqlite_type()
                    ))?;
                    log::info!("added column {} to {quoted}", quote(n));
                }
            }
            if let Some((present, misfits)) = evidence {
                self.follow_schema(name, &columns, present, misfits)?;
            }
        }
        self.load_table(token, name)?;
        Ok(added_with_default)
    }

    /// Drops the columns neither `columns` nor `present` has (except key columns) and retypes
    /// those of `misfits` whose kind changed, rebuilding the table.
    fn follow_schema(
        &mut self,
        name: &str,
        columns: &[(i64, String, ColumnKind, bool)],
        present: &[&str],
        misfits: &[&str],
    ) -> Result<(), StoreError> {
        let quoted = quote(name);
        for (n, _, pk) in self.read_columns(name)? {
            if pk == 0 && !columns.iter().any(|c| c.1 == n) && !present.contains(&n.as_str()) {
                self.conn
                    .execute_batch(&format!("ALTER TABLE {quoted} DROP COLUMN {}", quote(&n)))?;
                log::info!("dropped column {} of {quoted}", quote(&n));
            }
        }
        let existing = self.read_columns(name)?;
        let wanted = |n: &str, declared: &str| {
            columns
                .iter()
                .find(|c| c.1 == n && misfits.contains(&n))
                .map_or_else(|| declared.to_owned(), |c| c.2.sqlite_type().to_owned())
        };
        if existing.iter().all(|(n, t, _)| wanted(n, t) == *t) {
            return Ok(());
        }
        // SQLite's documented way to change a column's type: a new table, the rows copied
        // (each value converted by the new column's affinity), the old table replaced.
        let rebuilt = quote(&format!("_pgbridge_rebuild_{name}"));
        let mut defs: Vec<String> = existing
            .iter()
            .map(|(n, t, _)| format!("{} {}", quote(n), wanted(n, t)))
            .collect();
        let mut key: Vec<(i64, &str)> = existing
            .iter()
            .filter(|c| c.2 > 0)
            .map(|c| (c.2, c.0.as_str()))
            .collect();
        key.sort();
        defs.push(format!(
            "PRIMARY KEY ({})",
            key.iter()
                .map(|k| quote(k.1))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        let names = existing
            .iter()
            .map(|c| quote(&c.0))
            .collect::<Vec<_>>()
            .join(", ");
        // Cached statements refer to the old table.
        self.conn.flush_prepared_statement_cache();
        self.conn.execute_batch(&format!(
            "DROP TABLE IF EXISTS {rebuilt}; CREATE TABLE {rebuilt} ({}); \
             INSERT INTO {rebuilt} ({names}) SELECT {names} FROM {quoted}; \
             DROP TABLE {quoted}; ALTER TABLE {rebuilt} RENAME TO {quoted}",
            defs.join(", ")
        ))?;
        let changed: Vec<String> = existing
            .iter()
            .filter(|(n, t, _)| wanted(n, t) != *t)
            .map(|(n, t, _)| format!("{} {t} -> {}", quote(n), wanted(n, t)))
            .collect();
        log::info!("retyped {quoted}: {}", changed.join(", "));
        Ok(())
    }

    /// Reads the table's columns and key from SQLite into [`Store::tables`].
    fn load_table(&mut self, token: &str, name: &str) -> Result<(), StoreError> {
        let quoted = quote(name);
        let info = self.read_columns(name)?;
        let mut key: Vec<(i64, String)> = info
            .iter()
            .filter(|(_, _, pk)| *pk > 0)
            .map(|(n, _, pk)| (*pk, n.clone()))
            .collect();
        key.sort();
        self.tables.insert(
            token.to_owned(),
            Table {
                name: name.to_owned(),
                quoted,
                kinds: info
                    .into_iter()
                    .map(|(n, t, _)| (n, ColumnKind::from_sqlite_type(&t)))
                    .collect(),
                key: key.into_iter().map(|(_, n)| n).collect(),
            },
        );
        Ok(())
    }

    /// The SQLite declared kind of each of the table's columns.
    pub fn column_kinds(&self, token: &str) -> Option<&HashMap<String, ColumnKind>> {
        self.tables.get(token).map(|t| &t.kinds)
    }

    /// (name, declared type, position in the primary key or 0) of each column.
    fn read_columns(&self, name: &str) -> Result<Vec<(String, String, i64)>, StoreError> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT name, type, pk FROM pragma_table_info({})",
            sql_string(name)
        ))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Whether the table has every one of `names` as a column.
    pub fn has_columns<'a>(&self, token: &str, mut names: impl Iterator<Item = &'a str>) -> bool {
        self.tables
            .get(token)
            .is_some_and(|t| names.all(|n| t.kinds.contains_key(n)))
    }

    /// The table's position, or `None` before its first snapshot.
    pub fn position(&self, token: &str) -> Result<Option<Position>, StoreError> {
        let row: Option<(String, String, i64)> = self
            .conn
            .query_row(
                &format!(
                    "SELECT snapshot_id, lsn, last_seq FROM {STATE_TABLE} WHERE table_token = ?1"
                ),
                [token],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        row.map(|(snapshot_id, lsn, last_seq)| {
            Ok(Position {
                lsn: lsn.parse().map_err(|_| {
                    DocError(format!("{STATE_TABLE}: invalid LSN {lsn:?} for {token}"))
                })?,
                snapshot_id,
                last_seq: u64::try_from(last_seq).unwrap_or(0),
            })
        })
        .transpose()
    }

    /// Records the position (inside the current transaction).
    pub fn set_position(&mut self, token: &str, p: &Position) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(&format!(
                "INSERT INTO {STATE_TABLE} VALUES (?1, ?2, ?3, ?4) ON CONFLICT (table_token) \
                 DO UPDATE SET snapshot_id = excluded.snapshot_id, lsn = excluded.lsn, \
                 last_seq = excluded.last_seq"
            ))?
            .execute(params![
                token,
                p.snapshot_id,
                p.lsn.to_string(),
                seq_sql(p.last_seq)
            ])?;
        Ok(())
    }

    /// Moves the table's stream position (inside the current transaction).
    pub fn set_last_seq(&mut self, token: &str, last_seq: u64) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(&format!(
                "UPDATE {STATE_TABLE} SET last_seq = ?1 WHERE table_token = ?2"
            ))?
            .execute(params![seq_sql(last_seq), token])?;
        Ok(())
    }

    /// Starts a transaction unless one is open.
    pub fn begin(&mut self) -> Result<(), StoreError> {
        if !self.in_transaction {
            self.conn.execute_batch("BEGIN IMMEDIATE")?;
            self.in_transaction = true;
        }
        Ok(())
    }

    /// Whether a transaction is open.
    pub fn in_transaction(&self) -> bool {
        self.in_transaction
    }

    /// Commits the open transaction, if any.
    pub fn commit(&mut self) -> Result<(), StoreError> {
        if self.in_transaction {
            self.conn.execute_batch("COMMIT")?;
            self.in_transaction = false;
        }
        Ok(())
    }

    /// Rolls back the open transaction, if any (and with it any column change it made).
    pub fn rollback(&mut self) -> Result<(), StoreError> {
        if self.in_transaction {
            self.in_transaction = false;
            self.conn.execute_batch("ROLLBACK")?;
            self.conn.flush_prepared_statement_cache();
            let tables: Vec<(String, String)> = self
                .tables
                .iter()
                .map(|(token, t)| (token.clone(), t.name.clone()))
                .collect();
            for (token, name) in tables {
                self.load_table(&token, &name)?;
            }
        }
        Ok(())
    }

    fn table(&self, token: &str) -> Result<&Table, StoreError> {
        self.tables
            .get(token)
            .ok_or_else(|| StoreError::Unsupported {
                table: token.to_owned(),
                reason: "not a mirrored table".into(),
            })
    }

    /// Deletes every row and row version (a snapshot's start).
    pub fn clear(&mut self, token: &str) -> Result<(), StoreError> {
        let sql = format!("DELETE FROM {}", self.table(token)?.quoted);
        self.conn.execute(&sql, [])?;
        self.conn
            .prepare_cached(&format!(
                "DELETE FROM {VERSIONS_TABLE} WHERE table_token = ?1"
            ))?
            .execute([token])?;
        Ok(())
    }

    /// TRUNCATE at `version`: deletes every row and tombstone; older changes are skipped from
    /// now on.
    pub fn truncate(&mut self, token: &str, version: Version) -> Result<(), StoreError> {
        self.clear(token)?;
        self.set_version(token, "", version, false)
    }

    /// Whether a change at `version` to the rows with these keys (see [`key_text`]) is newer
    /// than each of them and than the table's last TRUNCATE.
    pub fn is_newer(
        &self,
        token: &str,
        keys: &[&str],
        version: Version,
    ) -> Result<bool, StoreError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT commit_lsn, seq FROM {VERSIONS_TABLE} WHERE table_token = ?1 AND row_key = ?2"
        ))?;
        for key in std::iter::once(&"").chain(keys) {
            let stored: Option<(i64, i64)> = stmt
                .query_row(params![token, key], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            if let Some((lsn, seq)) = stored {
                if (lsn, seq) >= version_sql(version) {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// Records `version` as the row's (a tombstone when `deleted`).
    pub fn set_version(
        &mut self,
        token: &str,
        key: &str,
        version: Version,
        deleted: bool,
    ) -> Result<(), StoreError> {
        let (lsn, seq) = version_sql(version);
        self.conn
            .prepare_cached(&format!(
                "INSERT INTO {VERSIONS_TABLE} VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                 ON CONFLICT (table_token, row_key) DO UPDATE SET commit_lsn = excluded.commit_lsn, \
                 seq = excluded.seq, deleted = excluded.deleted, written = excluded.written"
            ))?
            .execute(params![token, key, lsn, seq, deleted, unix_now()])?;
        Ok(())
    }

    /// Drops the tombstones written more than [`TOMBSTONE_TTL`] ago; returns how many.
    pub fn prune_tombstones(&mut self) -> Result<usize, StoreError> {
        let before = unix_now() - TOMBSTONE_TTL.as_secs() as i64;
        Ok(self
            .conn
            .prepare_cached(&format!(
                "DELETE FROM {VERSIONS_TABLE} WHERE deleted = 1 AND written < ?1"
            ))?
            .execute([before])?)
    }

    /// Inserts the row, or updates the given columns of the row with its key; columns not
    /// given (unchanged TOAST values) keep their value.
    pub fn upsert(&mut self, token: &str, row: &[(&str, &Value)]) -> Result<(), StoreError> {
        let t = self.table(token)?;
        let mut names = String::new();
        let mut marks = String::new();
        let mut sets = String::new();
        let mut values = Vec::with_capacity(row.len());
        for (i, (name, value)) in row.iter().enumerate() {
            let q = quote(name);
            if i > 0 {
                names.push_str(", ");
                marks.push_str(", ");
            }
            names.push_str(&q);
            marks.push('?');
            if !t.key.iter().any(|k| k == name) {
                if !sets.is_empty() {
                    sets.push_str(", ");
                }
                sets.push_str(&format!("{q} = excluded.{q}"));
            }
            values.push(to_sql(kind(t, name), value));
        }
        let keys = t
            .key
            .iter()
            .map(|k| quote(k))
            .collect::<Vec<_>>()
            .join(", ");
        let action = if sets.is_empty() {
            "DO NOTHING".to_owned()
        } else {
            format!("DO UPDATE SET {sets}")
        };
        let sql = format!(
            "INSERT INTO {} ({names}) VALUES ({marks}) ON CONFLICT ({keys}) {action}",
            t.quoted
        );
        self.conn
            .prepare_cached(&sql)?
            .execute(rusqlite::params_from_iter(values))?;
        Ok(())
    }

    /// The key values of a row's columns (missing key columns are NULL).
    pub fn key_of(&self, token: &str, row: &[(&str, &Value)]) -> Result<Vec<Sql>, StoreError> {
        let t = self.table(token)?;
        Ok(t.key
            .iter()
            .map(|k| {
                row.iter()
                    .find(|(n, _)| n == k)
                    .map_or(Sql::Null, |(_, v)| to_sql(kind(t, k), v))
            })
            .collect())
    }

    fn where_key(t: &Table) -> String {
        t.key
            .iter()
            .map(|k| format!("{} IS ?", quote(k)))
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    /// Deletes the row with this key (nothing when there is none).
    pub fn delete(&mut self, token: &str, key: &[Sql]) -> Result<(), StoreError> {
        let t = self.table(token)?;
        let sql = format!("DELETE FROM {} WHERE {}", t.quoted, Self::where_key(t));
        self.conn
            .prepare_cached(&sql)?
            .execute(rusqlite::params_from_iter(key))?;
        Ok(())
    }

    /// Gives the row at key `old` the key `new` (a primary-key change), keeping its other
    /// columns, so that the columns the change does not carry (unchanged TOAST) survive.
    pub fn move_key(&mut self, token: &str, old: &[Sql], new: &[Sql]) -> Result<(), StoreError> {
        self.delete(token, new)?;
        let t = self.table(token)?;
        let sets = t
            .key
            .iter()
            .map(|k| format!("{} = ?", quote(k)))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "UPDATE {} SET {sets} WHERE {}",
            t.quoted,
            Self::where_key(t)
        );
        self.conn
            .prepare_cached(&sql)?
            .execute(rusqlite::params_from_iter(new.iter().chain(old)))?;
        Ok(())
    }

    /// Number of rows in a mirrored table.
    #[cfg(test)]
    pub fn count(&self, token: &str) -> Result<u64, StoreError> {
        let sql = format!("SELECT count(*) FROM {}", self.table(token)?.quoted);
        let n: i64 = self.conn.query_row(&sql, [], |r| r.get(0))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

/// A primary key as the text that names its row in [`VERSIONS_TABLE`]: each value tagged
/// with its type, so different keys never share a text, and never empty.
pub fn key_text(key: &[Sql]) -> String {
    let mut out = String::new();
    for v in key {
        match v {
            Sql::Null => out.push_str("n;"),
            Sql::Integer(i) => out.push_str(&format!("i{i};")),
            Sql::Real(f) => out.push_str(&format!("r{:016x};", f.to_bits())),
            Sql::Text(t) => out.push_str(&format!("t{}:{t};", t.len())),
            Sql::Blob(b) => {
                out.push('b');
                for byte in b {
                    out.push_str(&format!("{byte:02x}"));
                }
                out.push(';');
            }
        }
    }
    out
}

/// A version as SQLite integers (an LSN never comes near `i64::MAX`).
fn version_sql((lsn, seq): Version) -> (i64, i64) {
    (i64::try_from(lsn).unwrap_or(i64::MAX), i64::from(seq))
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn kind(t: &Table, name: &str) -> ColumnKind {
    t.kinds.get(name).copied().unwrap_or(ColumnKind::Text)
}

/// A stream sequence as SQLite's signed integer (sequences never come near `i64::MAX`).
fn seq_sql(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

/// An SQL string literal.
fn sql_string(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(cols: &[(&str, &str)], key: &[&str]) -> Value {
        Value::Map(vec![
            (
                Value::from("primary_key"),
                Value::Array(key.iter().map(|k| Value::from(*k)).collect()),
            ),
            (
                Value::from("columns"),
                Value::Array(
                    cols.iter()
                        .enumerate()
                        .map(|(i, (n, t))| {
                            Value::Map(vec![
                                (Value::from("name"), Value::from(*n)),
                                (Value::from("position"), Value::from(i as i64 + 1)),
                                (Value::from("data_type"), Value::from(*t)),
                            ])
                        })
                        .collect(),
                ),
            ),
        ])
    }

    fn rows(store: &Store, sql: &str) -> Vec<Vec<Sql>> {
        let mut stmt = store.conn.prepare(sql).unwrap();
        let n = stmt.column_count();
        stmt.query_map([], |r| (0..n).map(|i| r.get::<_, Sql>(i)).collect())
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn applies_changes_keeps_unsent_columns_and_moves_keys() {
        let dir = std::env::temp_dir().join(format!("pgbridge-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.sqlite");
        let _ = std::fs::remove_file(&path);
        let mut s = Store::open(&path).unwrap();
        let sch = schema(
            &[("id", "integer"), ("body", "text"), ("n", "bigint")],
            &["id"],
        );
        s.apply_schema("t", "t", &sch, None).unwrap();
        s.begin().unwrap();
        let (one, two, body, n5) = (
            Value::from(1),
            Value::from(2),
            Value::from("long"),
            Value::from(5),
        );
        s.upsert("t", &[("id", &one), ("body", &body), ("n", &n5)])
            .unwrap();
        // An update without `body` (unchanged TOAST) keeps it.
        let n6 = Value::from(6);
        s.upsert("t", &[("id", &one), ("n", &n6)]).unwrap();
        // A key change keeps the columns the change does not carry.
        let old = s.key_of("t", &[("id", &one)]).unwrap();
        let new = s.key_of("t", &[("id", &two)]).unwrap();
        s.move_key("t", &old, &new).unwrap();
        s.set_position(
            "t",
            &Position {
                snapshot_id: "x".into(),
                lsn: Lsn::from(42),
                last_seq: 7,
            },
        )
        .unwrap();
        s.commit().unwrap();
        assert_eq!(
            rows(&s, "SELECT id, body, n FROM t"),
            vec![vec![
                Sql::Integer(2),
                Sql::Text("long".into()),
                Sql::Integer(6)
            ]]
        );
        assert_eq!(s.position("t").unwrap().unwrap().last_seq, 7);

        // A new column in the schema is added, old rows get NULL.
        drop(s);
        let mut s = Store::open(&path).unwrap();
        let sch2 = schema(
            &[
                ("id", "integer"),
                ("body", "text"),
                ("n", "bigint"),
                ("f", "double precision"),
            ],
            &["id"],
        );
        s.apply_schema("t", "t", &sch2, None).unwrap();
        assert!(s.has_columns("t", ["f", "id"].into_iter()));
        assert_eq!(s.count("t").unwrap(), 1);
        s.begin().unwrap();
        s.clear("t").unwrap();
        s.rollback().unwrap();
        assert_eq!(s.count("t").unwrap(), 1);
        assert!(matches!(
            s.apply_schema("u", "u", &schema(&[("a", "text")], &[]), None),
            Err(StoreError::Unsupported { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn temp_store(name: &str) -> (std::path::PathBuf, Store) {
        let dir =
            std::env::temp_dir().join(format!("pgbridge-store-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.sqlite");
        let _ = std::fs::remove_file(&path);
        let s = Store::open(&path).unwrap();
        (dir, s)
    }

    #[test]
    fn versions_keep_older_changes_out() {
        let (dir, mut s) = temp_store("versions");
        s.apply_schema("t", "t", &schema(&[("id", "integer")], &["id"]), None)
            .unwrap();
        s.begin().unwrap();
        let k1 = key_text(&[Sql::Integer(1)]);
        let k2 = key_text(&[Sql::Integer(2)]);
        assert!(s.is_newer("t", &[&k1], (100, 0)).unwrap(), "no version yet");
        s.set_version("t", &k1, (100, 3), false).unwrap();
        assert!(
            !s.is_newer("t", &[&k1], (100, 3)).unwrap(),
            "the same change"
        );
        assert!(!s.is_newer("t", &[&k1], (100, 2)).unwrap());
        assert!(!s.is_newer("t", &[&k1], (99, 7)).unwrap());
        assert!(s.is_newer("t", &[&k1], (100, 4)).unwrap());
        assert!(s.is_newer("t", &[&k1], (101, 0)).unwrap());
        // A tombstone holds older changes of the deleted row back too.
        s.set_version("t", &k2, (200, 0), true).unwrap();
        assert!(!s.is_newer("t", &[&k1, &k2], (150, 0)).unwrap());
        // TRUNCATE: everything older is out, also for rows never seen.
        s.truncate("t", (300, 1)).unwrap();
        let k3 = key_text(&[Sql::Integer(3)]);
        assert!(!s.is_newer("t", &[&k3], (300, 0)).unwrap());
        assert!(s.is_newer("t", &[&k3], (300, 2)).unwrap());
        s.commit().unwrap();
        // Old tombstones go; a fresh one stays.
        s.begin().unwrap();
        s.set_version("t", &k2, (400, 0), true).unwrap();
        s.conn
            .execute(
                &format!("UPDATE {VERSIONS_TABLE} SET written = 0 WHERE row_key = ?1"),
                [&k2],
            )
            .unwrap();
        s.set_version("t", &k1, (400, 1), true).unwrap();
        assert_eq!(s.prune_tombstones().unwrap(), 1);
        assert!(s.is_newer("t", &[&k2], (350, 0)).unwrap());
        assert!(!s.is_newer("t", &[&k1], (350, 0)).unwrap());
        s.commit().unwrap();
        // Keys of different types or splits never share a text.
        let texts = [
            key_text(&[Sql::Integer(1)]),
            key_text(&[Sql::Text("1".into())]),
            key_text(&[Sql::Text("a;".into()), Sql::Text("b".into())]),
            key_text(&[Sql::Text("a".into()), Sql::Text(";b".into())]),
            key_text(&[Sql::Null]),
            key_text(&[Sql::Blob(vec![1])]),
            key_text(&[Sql::Real(1.0)]),
        ];
        let unique: std::collections::HashSet<_> = texts.iter().collect();
        assert_eq!(unique.len(), texts.len(), "{texts:?}");
        assert!(texts.iter().all(|t| !t.is_empty()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dropped_and_retyped_columns_follow_the_schema() {
        let (dir, mut s) = temp_store("retype");
        let before = schema(
            &[
                ("id", "integer"),
                ("a", "integer"),
                ("b", "text"),
                ("c", "text"),
            ],
            &["id"],
        );
        s.apply_schema("t", "t", &before, None).unwrap();
        s.begin().unwrap();
        let (one, five, fifteen, x) = (
            Value::from(1),
            Value::from(5),
            Value::from("15"),
            Value::from("x"),
        );
        s.upsert(
            "t",
            &[("id", &one), ("a", &five), ("b", &fifteen), ("c", &x)],
        )
        .unwrap();
        s.commit().unwrap();
        let after = schema(
            &[("id", "integer"), ("a", "text"), ("b", "bigint")],
            &["id"],
        );
        // Without evidence (at start) nothing is dropped or retyped.
        s.apply_schema("t", "t", &after, None).unwrap();
        assert_eq!(
            rows(&s, "SELECT count(*) FROM pragma_table_info('t')")[0][0],
            Sql::Integer(4)
        );
        // A change that still has `c` keeps it; `a` fits its old type: not retyped yet.
        s.begin().unwrap();
        s.apply_schema("t", "t", &after, Some((&["id", "a", "b", "c"], &[])))
            .unwrap();
        assert_eq!(
            rows(&s, "SELECT count(*) FROM pragma_table_info('t')")[0][0],
            Sql::Integer(4)
        );
        s.apply_schema("t", "t", &after, Some((&["id", "a", "b"], &["a", "b"])))
            .unwrap();
        s.commit().unwrap();
        assert_eq!(
            rows(
                &s,
                "SELECT name, type FROM pragma_table_info('t') ORDER BY cid"
            ),
            vec![
                vec![Sql::Text("id".into()), Sql::Text("INTEGER".into())],
                vec![Sql::Text("a".into()), Sql::Text("TEXT".into())],
                vec![Sql::Text("b".into()), Sql::Text("INTEGER".into())],
            ]
        );
        assert_eq!(
            rows(&s, "SELECT id, a, b FROM t"),
            vec![vec![
                Sql::Integer(1),
                Sql::Text("5".into()),
                Sql::Integer(15)
            ]],
            "values converted to the new types"
        );
        // The statements and the key still work on the rebuilt table.
        s.begin().unwrap();
        let seven = Value::from("7");
        s.upsert("t", &[("id", &one), ("a", &seven)]).unwrap();
        s.commit().unwrap();
        assert_eq!(
            rows(&s, "SELECT a FROM t WHERE id = 1"),
            vec![vec![Sql::Text("7".into())]]
        );
        assert!(s.has_columns("t", ["id", "a", "b"].into_iter()));
        assert!(!s.has_columns("t", ["c"].into_iter()));
        // A rollback brings back the columns and what the store knows of them.
        s.begin().unwrap();
        s.apply_schema(
            "t",
            "t",
            &schema(&[("id", "integer")], &["id"]),
            Some((&["id"], &[])),
        )
        .unwrap();
        assert!(!s.has_columns("t", ["a"].into_iter()));
        s.rollback().unwrap();
        assert!(s.has_columns("t", ["a", "b"].into_iter()));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
