//! A consistent snapshot of one table, lined up exactly with the replication stream
//! (docs/protocol.md, "Snapshots"): on a replication connection, `BEGIN READ ONLY ISOLATION LEVEL
//! REPEATABLE READ`, `CREATE_REPLICATION_SLOT ... TEMPORARY ... (SNAPSHOT 'use')` gives the
//! consistent point C and installs the slot's snapshot, `COPY (SELECT ...) TO STDOUT` reads the
//! rows and columns the publication streams in that snapshot (reference §3.1: PostgreSQL does
//! not apply column lists or row filters to a COPY, so the query does), `COMMIT`, and the
//! connection (with its temporary slot) is dropped.
//! The snapshot holds exactly the transactions that commit before C; every transaction with
//! `commit_lsn >= C` is in the change stream.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::pg::conn::{
    quote_ident, quote_literal, sqlstate, ConnectionKind, PgConnection, PgError,
};
use crate::pg::copy::{CopyRowError, CopyRowParser};
use crate::pg::lsn::Lsn;
use crate::pg::replication::{ReplicationConnection, SnapshotAction};
use crate::pg::setup::{
    grant_hint, published_tables, table_privileges, MissingPrivilege, PublishedTable,
};
use crate::pg::value::{decode_or_verbatim, Value, ValueKind};

static SLOT_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Why a snapshot failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// PostgreSQL refused or the connection broke.
    #[error(transparent)]
    Pg(#[from] PgError),
    /// The table has no columns visible to the publication (or does not exist).
    #[error("table {0} has no published columns")]
    NoColumns(String),
    /// A COPY row could not be parsed.
    #[error(transparent)]
    Row(#[from] CopyRowError),
    /// The caller stopped the snapshot.
    #[error("snapshot of {0} stopped: {1}")]
    Stopped(String, String),
    /// The bridge's role may not read the table (no USAGE on its schema or no SELECT).
    #[error("{error}; the bridge's role cannot read {table}: {hint}")]
    NoPrivilege {
        /// `schema.table`.
        table: String,
        /// PostgreSQL's refusal.
        error: Box<PgError>,
        /// The GRANT statements that fix it.
        hint: String,
    },
}

/// The columns a snapshot reads, in table order.
#[derive(Debug, Clone)]
pub struct SnapshotColumns {
    /// Column names.
    pub names: Vec<Arc<str>>,
    /// How each column's text is decoded.
    pub kinds: Vec<ValueKind>,
}

/// One row of the COPY as it arrived: each field's text (COPY's escapes undone, `None` for
/// NULL) with the kind it decodes as. Encoders read the common kinds straight from the text
/// instead of building typed values first.
pub struct CopyRow<'a> {
    parser: &'a CopyRowParser,
    kinds: &'a [ValueKind],
}

impl<'a> CopyRow<'a> {
    /// The fields in column order: how each decodes, and its text (`None` for NULL).
    pub fn fields(&self) -> impl Iterator<Item = (ValueKind, Option<&'a [u8]>)> + '_ {
        let parser = self.parser;
        self.kinds
            .iter()
            .enumerate()
            .map(move |(i, kind)| (*kind, parser.get(i)))
    }

    /// True when every field is ASCII, so text fields are valid UTF-8 without a check.
    pub fn is_ascii(&self) -> bool {
        self.parser.is_ascii()
    }

    /// Column `i` as a typed value; a cell that does not decode as its kind is its text.
    pub fn value(&self, i: usize) -> Value {
        match (self.kinds.get(i), self.parser.get(i)) {
            (Some(kind), Some(text)) => decode_or_verbatim(*kind, text),
            _ => Value::Null,
        }
    }
}

/// What a finished snapshot read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotOutcome {
    /// The consistent point: stream changes with `commit_lsn >= lsn` come after the snapshot.
    pub lsn: Lsn,
    /// Rows read.
    pub rows: u64,
    /// The publication's row filter the rows were read with, as PostgreSQL prints it; `None`
    /// when the publication streams every row of the table.
    pub row_filter: Option<String>,
}

/// Reads `schema.table` in a snapshot consistent with the replication stream.
///
/// `on_connected` gets PostgreSQL's row estimate of the table (`pg_class.reltuples`; `None`
/// when it has none or it cannot be read), read on the snapshot's connection before its
/// transaction, so a snapshot logs in once. `on_start` gets the consistent point and the
/// columns before the first row; `on_row` gets each row and may stop the snapshot with a
/// reason. The rows and columns are
/// exactly those the publication streams: its column list and row filter (PostgreSQL 15+) are
/// applied to the COPY, read in the same transaction so they are the ones in force at the
/// consistent point.
pub fn take_snapshot<K: AsRef<str>, V: AsRef<str>>(
    params: &[(K, V)],
    publication: &str,
    schema: &str,
    table: &str,
    on_connected: impl FnOnce(Option<u64>),
    on_start: impl FnMut(Lsn, &SnapshotColumns) -> Result<(), String>,
    on_row: impl FnMut(&CopyRow<'_>) -> Result<(), String>,
) -> Result<SnapshotOutcome, SnapshotError> {
    match read_snapshot(
        params,
        publication,
        schema,
        table,
        on_connected,
        on_start,
        on_row,
    ) {
        Err(SnapshotError::Pg(error))
            if error.sqlstate() == Some(sqlstate::INSUFFICIENT_PRIVILEGE) =>
        {
            let t = PublishedTable {
                schema: schema.to_string(),
                name: table.to_string(),
            };
            Err(SnapshotError::NoPrivilege {
                table: t.qualified(),
                error: Box::new(error),
                hint: privilege_hint(params, publication, &t),
            })
        }
        other => other,
    }
}

/// The hint the start's privilege warning gives, found on a connection of its own (the
/// snapshot's transaction is aborted); statements for both privileges when that fails.
fn privilege_hint<K: AsRef<str>, V: AsRef<str>>(
    params: &[(K, V)],
    publication: &str,
    t: &PublishedTable,
) -> String {
    let role = params
        .iter()
        .find(|(k, _)| k.as_ref() == "user")
        .map_or("bridge_reader", |(_, v)| v.as_ref());
    let found = PgConnection::connect(params, ConnectionKind::Normal).and_then(|mut conn| {
        let missing = table_privileges(&mut conn, t)?;
        let schemas = published_tables(&mut conn, publication)?
            .into_iter()
            .map(|p| p.schema)
            .collect::<Vec<_>>();
        Ok((missing, schemas))
    });
    let (mut missing, mut schemas) = found.unwrap_or((
        MissingPrivilege {
            schema_usage: true,
            select: true,
        },
        Vec::new(),
    ));
    if !missing.schema_usage && !missing.select {
        // Granted meanwhile, or refused for another object: name both.
        missing = MissingPrivilege {
            schema_usage: true,
            select: true,
        };
    }
    schemas.sort();
    schemas.dedup();
    grant_hint(role, t, missing, &schemas)
}

fn read_snapshot<K: AsRef<str>, V: AsRef<str>>(
    params: &[(K, V)],
    publication: &str,
    schema: &str,
    table: &str,
    on_connected: impl FnOnce(Option<u64>),
    mut on_start: impl FnMut(Lsn, &SnapshotColumns) -> Result<(), String>,
    mut on_row: impl FnMut(&CopyRow<'_>) -> Result<(), String>,
) -> Result<SnapshotOutcome, SnapshotError> {
    let qualified = format!("{}.{}", quote_ident(schema), quote_ident(table));
    let mut repl = ReplicationConnection::connect(params)?;
    let server_version = repl.server_version();
    let target = SnapshotTarget {
        server_version,
        publication,
        schema,
        table,
    };
    // Before BEGIN, in a transaction of its own: CREATE_REPLICATION_SLOT must be the first
    // command of the snapshot's transaction.
    on_connected(target.row_estimate(repl.connection()));
    repl.connection()
        .execute("BEGIN READ ONLY ISOLATION LEVEL REPEATABLE READ")?;
    let slot_name = format!(
        "pgbridge_snap_{}_{}",
        std::process::id(),
        SLOT_COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let slot = repl.create_slot(&slot_name, true, SnapshotAction::Use)?;

    let cols = repl.connection().query(&target.columns_sql())?;
    let columns = SnapshotColumns {
        names: cols
            .rows
            .iter()
            .map(|r| Arc::from(r[0].as_deref().unwrap_or_default()))
            .collect(),
        kinds: cols
            .rows
            .iter()
            .map(|r| ValueKind::from_oid(r[1].as_deref().and_then(|t| t.parse().ok()).unwrap_or(0)))
            .collect(),
    };
    if columns.names.is_empty() {
        return Err(SnapshotError::NoColumns(qualified));
    }
    let plan = repl.connection().query(&target.plan_sql())?;
    // A plain table is read without its inheritance children: pgoutput streams each child as
    // a table of its own. A partitioned table is read with its partitions, as it is streamed.
    let only = plan.get(0, "relkind") != Some("p");
    let row_filter = plan.get(0, "row_filter").map(str::to_string);
    on_start(slot.consistent_point, &columns)
        .map_err(|e| SnapshotError::Stopped(qualified.clone(), e))?;

    let copy = copy_sql(&qualified, only, &columns.names, row_filter.as_deref());
    let mut parser = CopyRowParser::new();
    let mut failure: Option<SnapshotError> = None;
    let mut rows = 0u64;
    repl.connection().copy_out(&copy, |row| {
        if let Err(e) = parser.parse(row) {
            failure = Some(e.into());
            return ControlFlow::Break(());
        }
        rows += 1;
        let row = CopyRow {
            parser: &parser,
            kinds: &columns.kinds,
        };
        match on_row(&row) {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                failure = Some(SnapshotError::Stopped(qualified.clone(), e));
                ControlFlow::Break(())
            }
        }
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    repl.connection().execute("COMMIT")?;
    Ok(SnapshotOutcome {
        lsn: slot.consistent_point,
        rows,
        row_filter,
    })
}

/// The table a snapshot reads, and what it needs to know to build its SQL.
struct SnapshotTarget<'a> {
    server_version: i32,
    publication: &'a str,
    schema: &'a str,
    table: &'a str,
}

impl SnapshotTarget<'_> {
    /// `schemaname = ... AND tablename = ...` on `pg_publication_tables p` for this table.
    fn publication_entries(&self) -> String {
        format!(
            "p.pubname = {} AND p.schemaname = {} AND p.tablename = {}",
            quote_literal(self.publication),
            quote_literal(self.schema),
            quote_literal(self.table)
        )
    }

    fn regclass(&self) -> String {
        quote_literal(&format!(
            "{}.{}",
            quote_ident(self.schema),
            quote_ident(self.table)
        ))
    }

    /// PostgreSQL's row estimate of the table (`pg_class.reltuples`), for the reply to a
    /// request and the progress gauge; `None` when it has none (never vacuumed or analysed)
    /// or cannot be read.
    fn row_estimate(&self, conn: &mut PgConnection) -> Option<u64> {
        let sql = format!(
            "SELECT reltuples::float8 FROM pg_class WHERE oid = {}::regclass",
            self.regclass()
        );
        match conn.query(&sql) {
            Ok(result) => result
                .get(0, "reltuples")
                .and_then(|t| t.parse::<f64>().ok())
                .filter(|n| *n >= 0.0)
                .map(|n| n.round() as u64),
            Err(e) => {
                log::debug!(
                    "cannot read the row estimate of {}.{}: {e}",
                    self.schema,
                    self.table
                );
                None
            }
        }
    }

    /// The published columns in table order, with the OID their text decodes as (a domain's
    /// base type). Dropped and generated columns are never published; on PostgreSQL 15+ a
    /// publication's column list (`pg_publication_tables.attnames`) narrows them further. A
    /// NULL `attnames` (no list) means every column.
    fn columns_sql(&self) -> String {
        let generated = if self.server_version >= 120000 {
            " AND a.attgenerated = ''"
        } else {
            ""
        };
        let column_list = if self.server_version >= 150000 {
            let entries = self.publication_entries();
            format!(
                " AND (NOT EXISTS (SELECT FROM pg_publication_tables p WHERE {entries} AND p.attnames IS NOT NULL) \
                   OR a.attname = ANY (SELECT unnest(p.attnames) FROM pg_publication_tables p WHERE {entries}))"
            )
        } else {
            String::new()
        };
        format!(
            "SELECT a.attname, CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE a.atttypid END AS typ \
               FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
              WHERE a.attrelid = {rel}::regclass AND a.attnum > 0 AND NOT a.attisdropped{generated}{column_list} \
              ORDER BY a.attnum",
            rel = self.regclass(),
        )
    }

    /// One row: the table's `relkind` and the row filter the publication streams it with
    /// (NULL for none).
    ///
    /// The filter follows pgoutput (PostgreSQL 15+, `pgoutput_row_filter_init`): a publication
    /// `FOR ALL TABLES`, or one holding the table's schema (`FOR TABLES IN SCHEMA`), streams
    /// every row whatever filter an entry has; otherwise the filters of the table's entries
    /// are OR'ed, and one entry without a filter streams every row. `rowfilter` is the text
    /// `pg_get_expr` prints in this session, so it parses back here. Before PostgreSQL 15
    /// there are no row filters and the columns do not exist.
    fn plan_sql(&self) -> String {
        let row_filter = if self.server_version >= 150000 {
            let publication = quote_literal(self.publication);
            format!(
                "(SELECT CASE WHEN bool_or(p.rowfilter IS NULL) THEN NULL \
                              ELSE string_agg(DISTINCT '(' || p.rowfilter || ')', ' OR ' \
                                              ORDER BY '(' || p.rowfilter || ')') END \
                    FROM pg_publication_tables p \
                   WHERE {entries} \
                     AND NOT EXISTS (SELECT FROM pg_publication pb \
                                      WHERE pb.pubname = {publication} \
                                        AND (pb.puballtables \
                                             OR EXISTS (SELECT FROM pg_publication_namespace pn \
                                                          JOIN pg_namespace n ON n.oid = pn.pnnspid \
                                                         WHERE pn.pnpubid = pb.oid AND n.nspname = {schema}))))",
                entries = self.publication_entries(),
                schema = quote_literal(self.schema),
            )
        } else {
            "NULL::text".to_string()
        };
        format!(
            "SELECT c.relkind::text AS relkind, {row_filter} AS row_filter \
               FROM pg_class c WHERE c.oid = {rel}::regclass",
            rel = self.regclass(),
        )
    }
}

/// `COPY (SELECT columns FROM [ONLY] table [WHERE row filter]) TO STDOUT`.
fn copy_sql(qualified: &str, only: bool, names: &[Arc<str>], row_filter: Option<&str>) -> String {
    let select = names
        .iter()
        .map(|n| quote_ident(n))
        .collect::<Vec<_>>()
        .join(", ");
    let only = if only { "ONLY " } else { "" };
    match row_filter {
        Some(filter) => {
            format!("COPY (SELECT {select} FROM {only}{qualified} WHERE {filter}) TO STDOUT")
        }
        None => format!("COPY (SELECT {select} FROM {only}{qualified}) TO STDOUT"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(server_version: i32) -> SnapshotTarget<'static> {
        SnapshotTarget {
            server_version,
            publication: "cdc_pub",
            schema: "sales",
            table: "o'rders",
        }
    }

    #[test]
    fn servers_before_15_are_never_asked_for_column_lists_or_row_filters() {
        for v in [100023, 110022, 130016, 140013] {
            let t = target(v);
            for sql in [t.columns_sql(), t.plan_sql()] {
                assert!(!sql.contains("attnames"), "{v}: {sql}");
                assert!(!sql.contains("rowfilter"), "{v}: {sql}");
                assert!(!sql.contains("pg_publication_namespace"), "{v}: {sql}");
            }
        }
        // attgenerated came with PostgreSQL 12.
        assert!(!target(110022).columns_sql().contains("attgenerated"));
        assert!(target(120000).columns_sql().contains("attgenerated"));
    }

    #[test]
    fn postgres_15_reads_the_publication_column_list_and_row_filter() {
        let t = target(150018);
        let cols = t.columns_sql();
        assert!(cols.contains("p.attnames"), "{cols}");
        assert!(cols.contains("p.pubname = 'cdc_pub'"), "{cols}");
        assert!(cols.contains("p.tablename = 'o''rders'"), "{cols}");
        assert!(
            cols.contains("'\"sales\".\"o''rders\"'::regclass"),
            "{cols}"
        );
        let plan = t.plan_sql();
        assert!(plan.contains("p.rowfilter"), "{plan}");
        assert!(plan.contains("puballtables"), "{plan}");
        assert!(plan.contains("n.nspname = 'sales'"), "{plan}");
    }

    #[test]
    fn copy_reads_only_the_table_and_applies_the_filter() {
        let names: Vec<Arc<str>> = vec![Arc::from("id"), Arc::from("we\"ird")];
        assert_eq!(
            copy_sql("\"public\".\"t\"", true, &names, None),
            "COPY (SELECT \"id\", \"we\"\"ird\" FROM ONLY \"public\".\"t\") TO STDOUT"
        );
        assert_eq!(
            copy_sql(
                "\"public\".\"t\"",
                false,
                &names[..1],
                Some("(((id % 2) = 0)) OR ((id > 5))")
            ),
            "COPY (SELECT \"id\" FROM \"public\".\"t\" WHERE (((id % 2) = 0)) OR ((id > 5))) TO STDOUT"
        );
    }
}
