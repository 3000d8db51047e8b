//! Checks and set-up on PostgreSQL before streaming: `wal_level`, the role's privileges, the
//! publication and the tables it contains, and the replication slot (created when missing,
//! after the publication is known to exist, because pgoutput resolves publications at the
//! slot's decoding position).

use super::conn::{quote_ident, quote_literal, ConnectionKind, PgConnection, PgError};
use super::lsn::Lsn;
use super::replication::{ReplicationConnection, SnapshotAction};

/// Why the bridge cannot stream from this database; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// `wal_level` is not `logical`.
    #[error(
        "wal_level is '{0}', logical replication needs 'logical': run ALTER SYSTEM SET wal_level = logical; and restart PostgreSQL"
    )]
    WalLevel(String),
    /// The login role lacks the REPLICATION attribute.
    #[error(
        "role '{0}' may not start replication: run ALTER ROLE \"{0}\" REPLICATION; (deploy/init.sh sets up a least-privilege role)"
    )]
    NoReplicationPrivilege(String),
    /// The publication does not exist.
    #[error(
        "publication '{publication}' does not exist in database '{database}': create it as a superuser, e.g. {sql} (or run deploy/init.sh)"
    )]
    PublicationMissing {
        /// Publication name.
        publication: String,
        /// Database searched.
        database: String,
        /// SQL that creates it for the configured tables.
        sql: String,
    },
    /// A table given with `--table` is not published.
    #[error(
        "table '{table}' is not in publication '{publication}' (it has: {available}): run ALTER PUBLICATION {publication_ident} ADD TABLE {table}; or remove it from --table"
    )]
    TableNotPublished {
        /// The table as configured.
        table: String,
        /// Publication name.
        publication: String,
        /// The publication name quoted for SQL.
        publication_ident: String,
        /// The tables the publication does contain.
        available: String,
    },
    /// A `--table` of a `FOR ALL TABLES` publication that is not a published table: every
    /// table is in such a publication, so the name is wrong (or names no table).
    #[error(
        "table '{table}' {problem} in database '{database}' (publication '{publication}' is FOR ALL TABLES and has: {available}): fix --table"
    )]
    NoSuchTable {
        /// The table as configured.
        table: String,
        /// "does not exist", "is a view, not a table", ...
        problem: &'static str,
        /// Database searched.
        database: String,
        /// Publication name.
        publication: String,
        /// The tables the publication does contain.
        available: String,
    },
    /// The slot was invalidated: the one-line advice of [`super::invalidation::advice`].
    #[error("{0}")]
    SlotInvalidated(String),
    /// The slot exists but cannot be used by this bridge.
    #[error("replication slot '{slot}' cannot be used: {reason}")]
    SlotUnusable {
        /// Slot name.
        slot: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// A PostgreSQL error while checking.
    #[error(transparent)]
    Pg(#[from] PgError),
}

impl SetupError {
    /// True when the problem is in the configuration or the database set-up (exit code 2),
    /// not a passing failure worth retrying.
    pub fn is_configuration(&self) -> bool {
        !matches!(self, SetupError::Pg(e) if e.is_connection_problem())
    }
}

/// A published table as PostgreSQL names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PublishedTable {
    /// Schema.
    pub schema: String,
    /// Table name.
    pub name: String,
}

impl PublishedTable {
    /// `schema.name`.
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    /// Matches a configured name: `table` means `public.table`, `schema.table` is exact.
    pub fn matches(&self, configured: &str) -> bool {
        match configured.split_once('.') {
            Some((s, t)) => s == self.schema && t == self.name,
            None => self.schema == "public" && configured == self.name,
        }
    }
}

/// What [`check_database`] found.
#[derive(Debug, Clone)]
pub struct DatabaseInfo {
    /// Server version number, e.g. 150018.
    pub server_version: i32,
    /// Every table of the publication.
    pub published: Vec<PublishedTable>,
    /// The tables to stream: the configured ones, or all published when none are configured.
    pub tables: Vec<PublishedTable>,
    /// The server's `wal_sender_timeout` in milliseconds (0: disabled).
    pub wal_sender_timeout_ms: u64,
}

/// A warning when the bridge's longest interval between standby status updates comes too
/// close to the server's `wal_sender_timeout`: while the bridge cannot take more WAL (the
/// ring is full during a NATS outage) it only sends those updates, and a server that waits
/// less than twice the interval may drop the connection in between.
pub fn status_interval_warning(
    standby_status_interval: std::time::Duration,
    wal_sender_timeout_ms: u64,
) -> Option<String> {
    let interval_ms = u64::try_from(standby_status_interval.as_millis()).unwrap_or(u64::MAX);
    (wal_sender_timeout_ms > 0 && interval_ms.saturating_mul(2) > wal_sender_timeout_ms).then(
        || {
            format!(
                "the server's wal_sender_timeout ({wal_sender_timeout_ms} ms) is less than twice \
             --standby-status-interval-secs ({} s): while the bridge waits for NATS the server \
             may drop the replication connection; lower the interval to at most {} s or raise \
             wal_sender_timeout",
                standby_status_interval.as_secs(),
                (wal_sender_timeout_ms / 2000).max(1)
            )
        },
    )
}

/// Checks `wal_level`, the role, the publication and the configured tables over a normal
/// connection.
pub fn check_database(
    conn: &mut PgConnection,
    publication: &str,
    tables: &[String],
) -> Result<DatabaseInfo, SetupError> {
    debug_assert_eq!(conn.kind(), ConnectionKind::Normal);
    let r = conn.query(
        "SELECT current_setting('wal_level') AS wal_level, current_user AS usr, current_database() AS db, \
                (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user) AS can_replicate, \
                (SELECT setting FROM pg_settings WHERE name = 'wal_sender_timeout') AS wal_sender_timeout",
    )?;
    // pg_settings gives it in its unit, milliseconds.
    let wal_sender_timeout_ms = r
        .get(0, "wal_sender_timeout")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let wal_level = r.get(0, "wal_level").unwrap_or_default().to_string();
    if wal_level != "logical" {
        return Err(SetupError::WalLevel(wal_level));
    }
    let user = r.get(0, "usr").unwrap_or_default().to_string();
    let database = r.get(0, "db").unwrap_or_default().to_string();
    if r.get(0, "can_replicate") != Some("t") {
        return Err(SetupError::NoReplicationPrivilege(user));
    }

    let exists = conn.query_params(
        "SELECT puballtables FROM pg_publication WHERE pubname = $1",
        &[publication],
    )?;
    if exists.rows.is_empty() {
        let sql = if tables.is_empty() {
            format!(
                "CREATE PUBLICATION {} FOR ALL TABLES;",
                quote_ident(publication)
            )
        } else {
            format!(
                "CREATE PUBLICATION {} FOR TABLE {};",
                quote_ident(publication),
                tables.join(", ")
            )
        };
        return Err(SetupError::PublicationMissing {
            publication: publication.to_string(),
            database,
            sql,
        });
    }
    let all_tables = exists.get(0, "puballtables") == Some("t");
    let r = conn.query_params(
        "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1, 2",
        &[publication],
    )?;
    let published: Vec<PublishedTable> = r
        .rows
        .iter()
        .map(|row| PublishedTable {
            schema: row[0].clone().unwrap_or_default(),
            name: row[1].clone().unwrap_or_default(),
        })
        .collect();
    let mut selected = Vec::new();
    for t in tables {
        match published.iter().find(|p| p.matches(t)) {
            Some(p) => selected.push(p.clone()),
            None => {
                let available = if published.is_empty() {
                    "no tables".to_string()
                } else {
                    published
                        .iter()
                        .map(PublishedTable::qualified)
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                if all_tables {
                    // ALTER PUBLICATION ... ADD TABLE is refused for such a publication.
                    return Err(SetupError::NoSuchTable {
                        table: t.clone(),
                        problem: unpublished_relation(conn, t)?,
                        database,
                        publication: publication.to_string(),
                        available,
                    });
                }
                return Err(SetupError::TableNotPublished {
                    table: t.clone(),
                    publication: publication.to_string(),
                    publication_ident: quote_ident(publication),
                    available,
                });
            }
        }
    }
    let tables = if tables.is_empty() {
        published.clone()
    } else {
        selected
    };
    Ok(DatabaseInfo {
        server_version: conn.server_version(),
        published,
        tables,
        wal_sender_timeout_ms,
    })
}

/// Why `configured` (`table` or `schema.table`) is not in a `FOR ALL TABLES` publication:
/// it does not exist, is not a table, or is a kind of table PostgreSQL never publishes.
fn unpublished_relation(
    conn: &mut PgConnection,
    configured: &str,
) -> Result<&'static str, PgError> {
    let (schema, name) = configured.split_once('.').unwrap_or(("public", configured));
    let r = conn.query_params(
        "SELECT c.relkind::text AS kind, c.relpersistence::text AS persistence \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relname = $2",
        &[schema, name],
    )?;
    Ok(match (r.get(0, "kind"), r.get(0, "persistence")) {
        (None, _) => "does not exist",
        (Some("r" | "p"), Some("u")) => "is unlogged, and unlogged tables are never published",
        (Some("r" | "p"), Some("t")) => "is temporary, and temporary tables are never published",
        (Some("r" | "p"), _) => "is not published (system and information_schema tables never are)",
        (Some("v"), _) => "is a view, not a table",
        (Some("m"), _) => "is a materialized view, not a table",
        (Some("i" | "I"), _) => "is an index, not a table",
        (Some("S"), _) => "is a sequence, not a table",
        (Some("f"), _) => "is a foreign table, which is never published",
        (Some(_), _) => "is not a table",
    })
}

/// What a role lacks to read a table (snapshots `COPY` it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MissingPrivilege {
    /// No `USAGE` on the table's schema.
    pub schema_usage: bool,
    /// No `SELECT` on the table.
    pub select: bool,
}

/// The statements that give `role` what it lacks on `table`, and the `init.sh` alternative
/// (`schemas`: every schema that holds a published table).
pub fn grant_hint(
    role: &str,
    table: &PublishedTable,
    missing: MissingPrivilege,
    schemas: &[String],
) -> String {
    let role_ident = quote_ident(role);
    let schema_ident = quote_ident(&table.schema);
    let mut sql = Vec::new();
    if missing.schema_usage {
        sql.push(format!(
            "GRANT USAGE ON SCHEMA {schema_ident} TO {role_ident};"
        ));
    }
    if missing.select {
        sql.push(format!(
            "GRANT SELECT ON {schema_ident}.{} TO {role_ident};",
            quote_ident(&table.name)
        ));
    }
    let mut schemas: Vec<&str> = schemas.iter().map(String::as_str).collect();
    if !schemas.contains(&table.schema.as_str()) {
        schemas.push(&table.schema);
    }
    format!(
        "as a superuser run {} (or re-run deploy/init.sh with BRIDGE_SCHEMAS={})",
        sql.join(" "),
        schemas.join(",")
    )
}

/// One warning for each of `tables` the connected role cannot read: no `USAGE` on its schema
/// or no `SELECT` on it. Streaming needs neither, but its snapshots fail with "permission
/// denied", so the start says it, with the statements that fix it.
pub fn privilege_warnings(
    conn: &mut PgConnection,
    tables: &[PublishedTable],
    published: &[PublishedTable],
) -> Result<Vec<String>, PgError> {
    let role = conn
        .query("SELECT current_user AS usr")?
        .get(0, "usr")
        .unwrap_or_default()
        .to_string();
    let mut schemas: Vec<String> = published.iter().map(|t| t.schema.clone()).collect();
    schemas.sort();
    schemas.dedup();
    let mut warnings = Vec::new();
    for t in tables {
        let missing = table_privileges(conn, t)?;
        if !missing.schema_usage && !missing.select {
            continue;
        }
        let lacks = match (missing.schema_usage, missing.select) {
            (true, true) => format!("USAGE on schema {} and SELECT on the table", t.schema),
            (true, false) => format!("USAGE on schema {}", t.schema),
            _ => "SELECT on the table".to_string(),
        };
        warnings.push(format!(
            "role '{role}' cannot read published table {} (it lacks {lacks}): its changes stream, but its snapshots fail with permission denied; {}",
            t.qualified(),
            grant_hint(&role, t, missing, &schemas)
        ));
    }
    Ok(warnings)
}

/// What the connected role lacks to read `table`.
pub fn table_privileges(
    conn: &mut PgConnection,
    table: &PublishedTable,
) -> Result<MissingPrivilege, PgError> {
    // By OID: looking the table up by name would itself fail without USAGE on the schema.
    let r = conn.query_params(
        "SELECT has_schema_privilege(n.oid, 'USAGE') AS usage, \
                has_table_privilege(c.oid, 'SELECT') AS sel \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relname = $2",
        &[&table.schema, &table.name],
    )?;
    // A table dropped meanwhile lacks nothing.
    Ok(MissingPrivilege {
        schema_usage: r.get(0, "usage") == Some("f"),
        select: r.get(0, "sel") == Some("f"),
    })
}

/// The tables of `publication` now, e.g. to find tables added while the bridge runs.
pub fn published_tables(
    conn: &mut PgConnection,
    publication: &str,
) -> Result<Vec<PublishedTable>, PgError> {
    let r = conn.query_params(
        "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1, 2",
        &[publication],
    )?;
    Ok(r.rows
        .iter()
        .map(|row| PublishedTable {
            schema: row[0].clone().unwrap_or_default(),
            name: row[1].clone().unwrap_or_default(),
        })
        .collect())
}

/// A warning when the bridge is given several hosts to follow a promotion, but its slot will
/// not be on a promoted standby: the server has no failover slots (before PostgreSQL 17), or
/// the slot is not one (`--failover-slot=false`). After a promotion such a bridge stops.
pub fn several_hosts_warning(
    hosts: usize,
    server_version: i32,
    slot_failover: Option<bool>,
) -> Option<String> {
    let why = match slot_failover {
        _ if hosts < 2 => return None,
        None => format!(
            "PostgreSQL {} has no failover slots (17 and later have)",
            server_version / 10000
        ),
        Some(false) => "the slot is not a failover slot (--failover-slot=false)".to_string(),
        Some(true) => return None,
    };
    Some(format!(
        "{hosts} PostgreSQL hosts are configured to follow a promotion, but {why}: a promoted \
         standby will not have the slot, and the bridge will then stop (exit code 2) rather than \
         skip changes"
    ))
}

/// The state of the bridge's slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotState {
    /// Where streaming resumes: the slot's `confirmed_flush_lsn`.
    pub confirmed_flush: Lsn,
    /// True when this call created the slot.
    pub created: bool,
    /// PID of the process streaming from it now, if any.
    pub active_pid: Option<i32>,
    /// Whether it is a failover slot; `None` on servers before PostgreSQL 17, which have none.
    pub failover: Option<bool>,
}

/// Makes sure the logical slot exists in this database with the pgoutput plugin, creating it
/// when missing (a failover slot when `failover` and the server has them). `conn` is a normal
/// connection, `repl` a replication one.
pub fn ensure_slot(
    conn: &mut PgConnection,
    repl: &mut ReplicationConnection,
    slot: &str,
    failover: bool,
) -> Result<SlotState, SetupError> {
    match find_slot(conn, slot)? {
        Some(state) => Ok(state),
        None => create_slot(repl, slot, failover),
    }
}

/// The first server version with failover slots (`CREATE_REPLICATION_SLOT ... FAILOVER`,
/// `sync_replication_slots`, `synchronized_standby_slots`).
pub const FAILOVER_SLOTS_SINCE: i32 = 170000;

/// Creates the logical slot (pgoutput, no snapshot); a failover slot when `failover` and the
/// server is PostgreSQL 17 or later.
pub fn create_slot(
    repl: &mut ReplicationConnection,
    slot: &str,
    failover: bool,
) -> Result<SlotState, SetupError> {
    let failover = failover && repl.server_version() >= FAILOVER_SLOTS_SINCE;
    let created = if failover {
        repl.create_failover_slot(slot)?
    } else {
        repl.create_slot(slot, false, SnapshotAction::Nothing)?
    };
    log::info!(
        "created replication slot '{slot}' at {}{}",
        created.consistent_point,
        if failover { " (a failover slot)" } else { "" }
    );
    Ok(SlotState {
        confirmed_flush: created.consistent_point,
        created: true,
        active_pid: None,
        failover: (repl.server_version() >= FAILOVER_SLOTS_SINCE).then_some(failover),
    })
}

/// The start's checks of the failover set-up on PostgreSQL 17 and later, as lines to log
/// (level, text). With `want` (`--failover-slot`), an existing slot that is not a failover
/// slot is made one (`ALTER_REPLICATION_SLOT`), or, when that is refused, a warning says how;
/// and a failover slot on a primary without `synchronized_standby_slots` is warned about, because
/// the bridge may then confirm changes a standby does not have yet, and a promotion of that
/// standby would lose them. `conn` may be a normal or a replication connection.
pub fn failover_checks(
    conn: &mut PgConnection,
    repl: &mut ReplicationConnection,
    slot_name: &str,
    slot: &mut SlotState,
    want: bool,
) -> Result<Vec<(log::Level, String)>, PgError> {
    let mut notes = Vec::new();
    if slot.failover == Some(false) && want {
        match repl.set_slot_failover(slot_name, true) {
            Ok(()) => {
                slot.failover = Some(true);
                notes.push((
                    log::Level::Info,
                    format!(
                        "replication slot '{slot_name}' was not a failover slot: made it one \
                         (ALTER_REPLICATION_SLOT, --failover-slot), so standbys with \
                         sync_replication_slots = on keep it for a promotion"
                    ),
                ));
            }
            Err(e) if !e.is_connection_problem() => notes.push((
                log::Level::Warn,
                format!(
                    "replication slot '{slot_name}' is not a failover slot, so a promoted standby \
                     will not have it and streaming cannot go on after a failover; making it one \
                     failed ({e}): run ALTER_REPLICATION_SLOT {} (FAILOVER true) on a \
                     replication connection while no one streams from it (or start with \
                     --failover-slot=false to keep it as it is)",
                    quote_ident(slot_name)
                ),
            )),
            Err(e) => return Err(e),
        }
    }
    if want && slot.failover == Some(true) {
        let r = conn.query(
            "SELECT current_setting('synchronized_standby_slots', true) AS standby_slots, \
                    pg_is_in_recovery()::text AS recovery",
        )?;
        let standby_slots = r.get(0, "standby_slots").unwrap_or_default().trim();
        if standby_slots.is_empty() && r.get(0, "recovery") == Some("false") {
            notes.push((
                log::Level::Warn,
                format!(
                    "replication slot '{slot_name}' is a failover slot, but the primary has no \
                     synchronized_standby_slots: the bridge may receive (and confirm) changes a \
                     standby has not received yet, and a promotion of that standby loses them \
                     from the database while they are in the stream; set \
                     synchronized_standby_slots to the standbys' physical slots \
                     (ALTER SYSTEM SET synchronized_standby_slots = '...'; SELECT pg_reload_conf();), \
                     or, without standbys, start with --failover-slot=false"
                ),
            ));
        }
    }
    Ok(notes)
}

/// The server's current WAL write position (`pg_current_wal_lsn()`, or the replayed position
/// on a standby).
pub fn current_wal_lsn(conn: &mut PgConnection) -> Result<Lsn, SetupError> {
    let r = conn.query(
        "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
                      ELSE pg_current_wal_lsn() END)::text AS lsn",
    )?;
    r.get(0, "lsn").and_then(|s| s.parse().ok()).ok_or_else(|| {
        SetupError::Pg(PgError::UnexpectedResult {
            command: "pg_current_wal_lsn()".into(),
            status: "no WAL position".into(),
        })
    })
}

/// The logical slot of this database with the pgoutput plugin, `None` when it does not exist;
/// an error when it exists but cannot be used. `conn` may be a normal or a replication
/// connection (the simple protocol, hence the quoted literal).
pub fn find_slot(conn: &mut PgConnection, slot: &str) -> Result<Option<SlotState>, SetupError> {
    // `failover` exists from PostgreSQL 17 on; through jsonb it is NULL before.
    let r = conn.query(&format!(
        "SELECT plugin, slot_type, database, confirmed_flush_lsn::text, active_pid::text, wal_status, \
                current_database() AS db, to_jsonb(s) ->> 'failover' AS failover \
           FROM pg_replication_slots s WHERE slot_name = {}",
        quote_literal(slot)
    ))?;
    if r.rows.is_empty() {
        return Ok(None);
    }
    let unusable = |reason: String| SetupError::SlotUnusable {
        slot: slot.to_string(),
        reason,
    };
    if r.get(0, "slot_type") != Some("logical") {
        return Err(unusable(
            "it is a physical slot; choose another --slot name".into(),
        ));
    }
    if r.get(0, "plugin") != Some("pgoutput") {
        return Err(unusable(format!(
            "it uses the output plugin '{}', the bridge needs pgoutput; drop it with SELECT pg_drop_replication_slot('{slot}'); or choose another --slot",
            r.get(0, "plugin").unwrap_or("?")
        )));
    }
    if r.get(0, "database") != r.get(0, "db") {
        return Err(unusable(format!(
            "it belongs to database '{}', not '{}'",
            r.get(0, "database").unwrap_or("?"),
            r.get(0, "db").unwrap_or("?")
        )));
    }
    if r.get(0, "wal_status") == Some("lost") {
        let reason =
            super::invalidation::read_reason(conn, slot)?.unwrap_or_else(|| "wal_removed".into());
        return Err(SetupError::SlotInvalidated(super::invalidation::advice(
            slot, &reason,
        )));
    }
    let confirmed_flush = r
        .get(0, "confirmed_flush_lsn")
        .and_then(|s| s.parse().ok())
        .unwrap_or(Lsn::INVALID);
    Ok(Some(SlotState {
        confirmed_flush,
        created: false,
        active_pid: r.get(0, "active_pid").and_then(|p| p.parse().ok()),
        failover: r.get(0, "failover").map(|f| f == "true"),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_interval_is_checked_against_wal_sender_timeout() {
        use std::time::Duration;
        let ten = Duration::from_secs(10);
        assert_eq!(status_interval_warning(ten, 60_000), None);
        assert_eq!(status_interval_warning(ten, 20_000), None);
        assert_eq!(status_interval_warning(ten, 0), None, "disabled");
        let w = status_interval_warning(ten, 15_000).unwrap();
        assert!(w.contains("15000 ms") && w.contains("at most 7 s"), "{w}");
        assert!(status_interval_warning(ten, 1_000)
            .unwrap()
            .contains("at most 1 s"));
    }

    #[test]
    fn several_hosts_without_a_slot_on_the_standby_are_warned_about() {
        assert_eq!(several_hosts_warning(1, 150000, None), None);
        assert_eq!(several_hosts_warning(2, 180000, Some(true)), None);
        let w = several_hosts_warning(2, 160004, None).unwrap();
        assert!(w.contains("PostgreSQL 16 has no failover slots"), "{w}");
        let w = several_hosts_warning(3, 180000, Some(false)).unwrap();
        assert!(w.starts_with("3 PostgreSQL hosts"), "{w}");
        assert!(w.contains("--failover-slot=false"), "{w}");
    }

    #[test]
    fn configured_names_match_published_tables() {
        let t = PublishedTable {
            schema: "public".into(),
            name: "users".into(),
        };
        assert!(t.matches("users"));
        assert!(t.matches("public.users"));
        assert!(!t.matches("sales.users"));
        assert!(!t.matches("user"));
        let s = PublishedTable {
            schema: "sales".into(),
            name: "users".into(),
        };
        assert!(!s.matches("users"));
        assert!(s.matches("sales.users"));
    }

    #[test]
    fn grant_hints_name_what_is_missing_and_every_published_schema() {
        let t = PublishedTable {
            schema: "sales".into(),
            name: "invoices".into(),
        };
        let both = MissingPrivilege {
            schema_usage: true,
            select: true,
        };
        let h = grant_hint("bridge_reader", &t, both, &["public".into()]);
        assert!(h.contains(
            r#"GRANT USAGE ON SCHEMA "sales" TO "bridge_reader"; GRANT SELECT ON "sales"."invoices" TO "bridge_reader";"#
        ));
        assert!(h.contains("BRIDGE_SCHEMAS=public,sales"));
        let select_only = MissingPrivilege {
            schema_usage: false,
            select: true,
        };
        let h = grant_hint("r", &t, select_only, &["public".into(), "sales".into()]);
        assert!(!h.contains("USAGE"));
        assert!(h.contains(r#"GRANT SELECT ON "sales"."invoices" TO "r";"#));
        assert!(h.ends_with("(or re-run deploy/init.sh with BRIDGE_SCHEMAS=public,sales)"));
    }

    #[test]
    fn errors_say_what_to_run() {
        let e = SetupError::PublicationMissing {
            publication: "cdc_pub".into(),
            database: "app".into(),
            sql: "CREATE PUBLICATION \"cdc_pub\" FOR ALL TABLES;".into(),
        };
        assert!(e
            .to_string()
            .contains("CREATE PUBLICATION \"cdc_pub\" FOR ALL TABLES;"));
        assert!(e.is_configuration());
        let e = SetupError::NoSuchTable {
            table: "nosuch".into(),
            problem: "does not exist",
            database: "app".into(),
            publication: "cdc_pub".into(),
            available: "public.users".into(),
        };
        assert!(!e.to_string().contains("ALTER PUBLICATION"));
        assert!(e.is_configuration());
        let e = SetupError::Pg(PgError::ConnectionLost("gone".into()));
        assert!(!e.is_configuration());
    }
}
