//! A primary with a physical standby, for failover: the standby is a base backup of the
//! primary (`pg_basebackup -R`), streams through a physical slot on the primary, and, when
//! asked, keeps the primary's failover slots in step (`sync_replication_slots`, PostgreSQL
//! 17+). [`promote`] ends its recovery, as an operator's failover does.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use crate::pg::{initdb, test_settings, PgServer, PG_SUPERUSER};
use crate::proc::{chown_tree, command_as, pg_run_as, run};
use crate::{wait_for, TempDir, COUNTER, START_TIMEOUT};

/// The `application_name` the standby connects to the primary with (also the name for
/// `synchronous_standby_names`).
pub const STANDBY_NAME: &str = "standby1";

/// The oldest PostgreSQL with failover slots.
pub const FAILOVER_MIN_MAJOR: u32 = 17;

/// The binaries of a PostgreSQL with failover slots: `PG_BIN_18` (written into `.dev/env` by
/// `scripts/install-deps.sh`). Panics with what to do when it is not set or older than 17:
/// a failover test must never pass without the server it is about.
pub fn failover_pg_bin() -> PathBuf {
    let dir = std::env::var_os("PG_BIN_18")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "PG_BIN_18 is not set: the failover tests need PostgreSQL {FAILOVER_MIN_MAJOR} or \
             later (failover slots); run scripts/install-deps.sh and source .dev/env, or set \
             PG_BIN_18 to the directory holding its initdb, postgres and pg_basebackup"
            )
        });
    let major = major_version(&dir);
    assert!(
        major >= FAILOVER_MIN_MAJOR,
        "PG_BIN_18={} is PostgreSQL {major}: the failover tests need {FAILOVER_MIN_MAJOR} or later",
        dir.display()
    );
    dir
}

/// The major version of the server in `bin` (`postgres --version`).
fn major_version(bin: &Path) -> u32 {
    let text = run(
        std::process::Command::new(bin.join("postgres")).arg("--version"),
        "postgres --version",
    );
    text.split_whitespace()
        .find_map(|w| w.split('.').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no version in {text:?}"))
}

/// The test settings, for both servers (a standby needs at least the primary's limits), with
/// full page writes, which `pg_basebackup` needs.
fn settings() -> Vec<(String, String)> {
    let mut settings = test_settings();
    settings.retain(|(k, _)| k != "full_page_writes");
    settings.push(("full_page_writes".into(), "on".into()));
    settings
}

/// A new temporary directory owned by the unprivileged user, with the superuser's `pwfile`.
fn server_dir(password: &str) -> TempDir {
    let dir = TempDir::new("pg");
    chown_tree(dir.path(), pg_run_as());
    let pwfile = dir.path().join("pwfile");
    fs::write(&pwfile, format!("{password}\n")).unwrap();
    fs::set_permissions(&pwfile, fs::Permissions::from_mode(0o644)).unwrap();
    dir
}

/// Starts a primary of the installation in `bin` with a physical slot `standby_slot` for its
/// standby.
pub fn start_primary(bin: &Path, standby_slot: &str) -> PgServer {
    let password = format!(
        "pw-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let dir = server_dir(&password);
    initdb(bin, pg_run_as(), dir.path());
    let primary = PgServer::start_on(dir, bin.to_path_buf(), password, settings());
    primary.sql(
        "postgres",
        &format!("SELECT pg_create_physical_replication_slot('{standby_slot}', true)"),
    );
    primary
}

/// A base backup of `primary` (`pg_basebackup -R` through `standby_slot`), started as its
/// streaming standby; with `sync_slots`, it keeps the primary's failover slots
/// (`sync_replication_slots = on`, `hot_standby_feedback = on`, a `primary_conninfo` with
/// `dbname`). Waits until the primary sees it streaming.
pub fn start_standby(primary: &PgServer, standby_slot: &str, sync_slots: bool) -> PgServer {
    let bin = primary.bin_dir().to_path_buf();
    let dir = server_dir(primary.password());
    let data = dir.path().join("data");
    let mut backup = command_as(&bin.join("pg_basebackup"), pg_run_as());
    backup
        .arg("-D")
        .arg(&data)
        .args(["-h", primary.host(), "-p", &primary.port().to_string()])
        .args(["-U", PG_SUPERUSER, "-S", standby_slot])
        .args(["-R", "-X", "stream", "-c", "fast", "--no-sync"])
        .env("PGPASSWORD", primary.password());
    run(&mut backup, "pg_basebackup");
    let mut settings = settings();
    // Given here rather than through -R's file: slot synchronization needs the dbname.
    let conninfo = format!(
        "host={} port={} user={PG_SUPERUSER} password={} dbname=postgres application_name={STANDBY_NAME}",
        primary.host(),
        primary.port(),
        primary.password()
    );
    settings.push(("primary_conninfo".into(), conninfo));
    settings.push(("primary_slot_name".into(), standby_slot.into()));
    settings.push(("hot_standby_feedback".into(), "on".into()));
    if sync_slots {
        settings.push(("sync_replication_slots".into(), "on".into()));
    }
    let standby = PgServer::start_on(dir, bin, primary.password().to_string(), settings);
    wait_for(
        "the standby to stream from the primary",
        START_TIMEOUT,
        || {
            (primary.value(
                "postgres",
                &format!(
                    "SELECT count(*) FROM pg_stat_replication \
                 WHERE application_name = '{STANDBY_NAME}' AND state = 'streaming'"
                ),
            ) == "1")
                .then_some(())
        },
    );
    standby
}

/// Sets `synchronized_standby_slots` on the primary (the bridge then never receives a change
/// before the standby has it) and, with `synchronous`, makes the standby synchronous (every
/// commit a client saw acknowledged is on the standby).
pub fn protect_standby(primary: &PgServer, standby_slot: &str, synchronous: bool) {
    primary.sql(
        "postgres",
        &format!("ALTER SYSTEM SET synchronized_standby_slots = '{standby_slot}'"),
    );
    if synchronous {
        primary.sql(
            "postgres",
            &format!("ALTER SYSTEM SET synchronous_standby_names = '{STANDBY_NAME}'"),
        );
    }
    primary.sql("postgres", "SELECT pg_reload_conf()");
}

/// Waits until the standby holds `slot` as a synchronized, persistent slot.
pub fn wait_slot_synced(standby: &PgServer, slot: &str) {
    wait_for(
        "the slot to be synchronized to the standby",
        START_TIMEOUT,
        || {
            let r = standby.sql(
                "postgres",
                &format!(
                    "SELECT (synced AND NOT temporary)::text FROM pg_replication_slots \
                 WHERE slot_name = '{slot}'"
                ),
            );
            (r.rows.first().and_then(|row| row[0].as_deref()) == Some("true")).then_some(())
        },
    );
}

/// Ends the standby's recovery (`pg_ctl promote`) and waits until it accepts writes.
pub fn promote(standby: &PgServer) {
    let mut cmd = command_as(&standby.bin_dir().join("pg_ctl"), pg_run_as());
    cmd.arg("promote")
        .arg("-D")
        .arg(standby.dir().join("data"))
        .args(["-w", "-t", "60"]);
    run(&mut cmd, "pg_ctl promote");
    wait_for(
        "the promoted standby to accept writes",
        START_TIMEOUT,
        || (standby.value("postgres", "SELECT pg_is_in_recovery()::text") == "false").then_some(()),
    );
}
