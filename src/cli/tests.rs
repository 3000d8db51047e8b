//! The command line: parsing, help, usage errors, and the overlays it gives the configuration.

use clap::{CommandFactory, Parser};

use self::test_env::with_env;
use super::config_args::StreamNames;
use super::*;
use crate::config::pg::DEFAULT_PG_PORT;
use crate::config::{field_sources, Config, Format, PgPorts, SslMode, TargetSessionAttrs};

#[test]
fn cli_is_well_formed() {
    Cli::command().debug_assert();
}

#[test]
fn subcommands_and_defaults() {
    with_env(&[], || {
        let cli = Cli::try_parse_from(["bridge"]).unwrap();
        assert_eq!(cli.action(), Command::Run);
        assert!(cli.config.replication.slot.is_none());
        assert!(cli.config.http.port.is_none());
        let cli = Cli::try_parse_from(["bridge", "--slot", "s", "check-config"]).unwrap();
        assert_eq!(cli.action(), Command::CheckConfig);
        assert_eq!(cli.config.replication.slot.as_deref(), Some("s"));
        let cli = Cli::try_parse_from(["bridge", "run", "--port", "9999"]).unwrap();
        assert_eq!(cli.action(), Command::Run);
        assert_eq!(cli.config.http.port, Some(9999));
    });
}

#[test]
fn seed_command_line() {
    with_env(&[], || {
        let cli = Cli::try_parse_from([
            "bridge",
            "--stream",
            "CDC,INIT",
            "--slot",
            "cdc_slot",
            "--publication",
            "cdc_pub",
            "--table",
            "users,orders",
            "--port",
            "9090",
        ])
        .unwrap();
        let c = &cli.config;
        assert_eq!(
            c.streams.stream,
            Some(StreamNames {
                cdc: "CDC".into(),
                init: Some("INIT".into())
            })
        );
        assert_eq!(
            c.replication.table.as_deref(),
            Some(&["users".to_owned(), "orders".to_owned()][..])
        );
        assert_eq!(c.http.port, Some(9090));
    });
}

#[test]
fn flag_forms() {
    with_env(&[], || {
        let parse = |args: &[&str]| Cli::try_parse_from(args).map(|c| c.config);
        let c = parse(&["bridge", "--snapshot-on-start"]).unwrap();
        assert_eq!(c.snapshot.snapshot_on_start, Some(true));
        let c = parse(&["bridge", "--snapshot-on-start=no"]).unwrap();
        assert_eq!(c.snapshot.snapshot_on_start, Some(false));
        // The flag takes no separate value, so a subcommand can follow it.
        let cli = Cli::try_parse_from(["bridge", "--snapshot-on-start", "check-config"]).unwrap();
        assert_eq!(cli.action(), Command::CheckConfig);
        let c = parse(&["bridge", "--format", "json", "--pg-sslmode", "verify-full"]).unwrap();
        assert_eq!(c.replication.format, Some(Format::Json));
        assert_eq!(c.postgres.pg_sslmode, Some(SslMode::VerifyFull));
        for bad in [
            &["bridge", "--format", "xml"][..],
            &["bridge", "--port", "http"],
            &["bridge", "--stream", "A,B,C"],
            &["bridge", "--stream", ",B"],
            &["bridge", "--http-bind", "localhost"],
            &["bridge", "--no-such-flag"],
        ] {
            let err = parse(bad).unwrap_err();
            assert_eq!(err.exit_code(), i32::from(EXIT_USAGE), "{bad:?}");
            let line = usage_error_line(&err);
            assert!(!line.contains('\n') && !line.starts_with("error"), "{line}");
        }
    });
}

#[test]
fn help_shows_defaults_but_no_secret_values() {
    with_env(
        &[
            ("PG_PASSWORD", "help-secret"),
            ("PG_URL", "postgres://u:url-secret@h/db"),
        ],
        || {
            let help = Cli::command().render_long_help().to_string();
            assert!(help.contains("[default: cdc_slot]"), "{help}");
            assert!(help.contains("[default: 9090]"));
            assert!(help.contains("[default: pgbridge-{slot}.lsn]"));
            assert!(!help.contains("help-secret") && !help.contains("url-secret"));
        },
    );
}

/// flags > environment > file > defaults, through clap's real environment handling. Every
/// environment case lives under the environment lock (see `test_env`).
#[test]
fn precedence_flag_env_file_default() {
    let tmp = temp_file(
        "precedence.toml",
        "[postgres]\nhost = \"file-host\"\nuser = \"file-user\"\ndbname = \"file-db\"\n\
     [replication]\nslot = \"file_slot\"\npublication = \"file_pub\"\n\
     id_namespace = \"file-ns\"\n\
     [http]\nport = 9101\n",
    );
    let file = tmp.path.clone();
    let file = file.to_str().unwrap().to_owned();
    let load = |argv: &[&str]| {
        let (_, layers) = parse_from(argv).expect("valid command line");
        Config::load(layers).expect("valid configuration")
    };

    // File over defaults.
    let c = with_env(&[("BRIDGE_CONFIG", &file)], || load(&["bridge"]));
    assert_eq!(c.postgres.host, "file-host");
    assert_eq!(c.postgres.port.as_slice(), [DEFAULT_PG_PORT]);
    assert_eq!(c.replication.slot, "file_slot");
    assert_eq!(c.replication.id_namespace.as_deref(), Some("file-ns"));
    assert!(!c.replication.accept_position_gap);
    assert_eq!(c.http.port, 9101);

    // Environment over file.
    let env = [
        ("BRIDGE_CONFIG", file.as_str()),
        ("PG_HOST", "env-host"),
        ("PG_PORT", "6000"),
        ("BRIDGE_SLOT", "env_slot"),
        ("BRIDGE_PORT", "9102"),
        ("BRIDGE_TABLES", "users, orders"),
        ("NATS_HOST", "nats-env:4222"),
        ("BRIDGE_SNAPSHOT_ON_START", "yes"),
        ("BRIDGE_STREAMS", "C1,I1"),
        ("BRIDGE_ID_NAMESPACE", "env_ns"),
        ("BRIDGE_ACCEPT_POSITION_GAP", "true"),
    ];
    let c = with_env(&env, || load(&["bridge"]));
    assert_eq!(c.postgres.host, "env-host");
    assert_eq!(c.postgres.port.as_slice(), [6000]);
    assert_eq!(c.postgres.user, "file-user");
    assert_eq!(c.replication.slot, "env_slot");
    assert_eq!(c.replication.publication, "file_pub");
    assert_eq!(c.replication.tables, ["users", "orders"]);
    assert_eq!(c.http.port, 9102);
    assert_eq!(c.nats.urls, ["nats-env:4222"]);
    assert!(c.snapshot.on_start);
    assert_eq!(c.replication.id_namespace.as_deref(), Some("env_ns"));
    assert!(c.replication.accept_position_gap);
    assert_eq!(
        (c.streams.cdc.as_str(), c.streams.init.as_str()),
        ("C1", "I1")
    );

    // Flags over environment, also after the subcommand (the flags are global).
    let c = with_env(&env, || {
        load(&[
            "bridge",
            "check-config",
            "--pg-host",
            "flag-host",
            "--slot",
            "flag_slot",
            "--port",
            "9103",
            "--nats-url",
            "nats://flag:4222",
            "--snapshot-on-start=false",
            "--stream",
            "C2",
            "--id-namespace",
            "flag-ns",
            "--accept-position-gap=false",
        ])
    });
    assert_eq!(c.replication.id_namespace.as_deref(), Some("flag-ns"));
    assert!(!c.replication.accept_position_gap);
    assert_eq!(c.postgres.host, "flag-host");
    assert_eq!(c.postgres.port.as_slice(), [6000]); // env, no flag given
    assert_eq!(c.replication.slot, "flag_slot");
    assert_eq!(c.http.port, 9103);
    assert_eq!(c.nats.urls, ["nats://flag:4222"]);
    assert!(!c.snapshot.on_start);
    assert_eq!(
        (c.streams.cdc.as_str(), c.streams.init.as_str()),
        ("C2", "INIT")
    );

    // NATS_URL is the same setting as NATS_HOST and wins over it.
    let c = with_env(
        &[
            ("NATS_HOST", "h1"),
            ("NATS_URL", "nats://u1:4222,nats://u2:4222"),
        ],
        || load(&["bridge"]),
    );
    assert_eq!(c.nats.urls, ["nats://u1:4222", "nats://u2:4222"]);

    // The environment is read through clap, so a malformed value is a usage error.
    with_env(&[("PG_PORT", "not-a-port")], || {
        assert!(Cli::try_parse_from(["bridge"]).is_err());
    });
    // Nothing set anywhere: the defaults.
    let c = with_env(&[], || load(&["bridge"]));
    assert_eq!(c, Config::default());
}

#[test]
fn field_sources_match_the_cli() {
    let cmd = Cli::command();
    let args: Vec<_> = cmd.get_arguments().collect();
    for (key, flag, env) in field_sources() {
        let arg = args
            .iter()
            .find(|a| a.get_long().map(|l| format!("--{l}")).as_deref() == Some(*flag))
            .unwrap_or_else(|| panic!("{key}: no flag {flag}"));
        assert_eq!(
            arg.get_env().and_then(|e| e.to_str()),
            Some(*env),
            "{key}: {flag}"
        );
    }
    // Every flag but --config and the NATS_HOST spelling configures a listed field.
    for arg in args {
        let Some(long) = arg.get_long() else { continue };
        if ["config", "nats-host", "help", "version"].contains(&long) {
            continue;
        }
        let flag = format!("--{long}");
        assert!(
            field_sources().any(|(_, f, _)| *f == flag),
            "{flag} is missing from the configuration's field sources"
        );
    }
}

/// Each value lands in the overlay of the source clap took it from.
#[test]
fn environment_and_flags_give_separate_overlays() {
    let (_, layers) = with_env(&[("BRIDGE_SLOT", "env_slot"), ("PG_PORT", "6000")], || {
        parse_from([
            "bridge",
            "check-config",
            "--port",
            "9000",
            "--pg-port",
            "7000",
        ])
        .unwrap()
    });
    assert_eq!(layers.env.replication.slot.as_deref(), Some("env_slot"));
    assert_eq!(layers.flags.replication.slot, None);
    assert_eq!(layers.flags.http.port, Some(9000));
    assert_eq!(layers.env.http.port, None);
    // A flag hides its environment variable altogether.
    assert_eq!(layers.flags.postgres.port, Some(PgPorts::single(7000)));
    assert_eq!(layers.env.postgres.port, None);
    assert_eq!(layers.file, None);

    // `--table ''` gives the empty list, which empties the file's; `--stream C` keeps INIT.
    let (_, layers) = with_env(&[], || {
        parse_from(["bridge", "--table", "", "--stream", "C"]).unwrap()
    });
    assert_eq!(layers.flags.replication.tables, Some(Vec::new()));
    assert_eq!(layers.flags.streams.cdc.as_deref(), Some("C"));
    assert_eq!(layers.flags.streams.init, None);

    // NATS_URL wins over --nats-host: one setting, and clap gave both.
    let (_, layers) = with_env(&[("NATS_URL", "nats://u:4222")], || {
        parse_from(["bridge", "--nats-host", "h"]).unwrap()
    });
    assert_eq!(layers.env.nats.urls, Some(vec!["nats://u:4222".to_owned()]));
    assert_eq!(layers.flags.nats.urls, None);
}

/// A configuration file in a directory of its own, removed on drop.
struct TempConfig {
    path: std::path::PathBuf,
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Writes `text` to a file unique to this test.
fn temp_file(name: &str, text: &str) -> TempConfig {
    let dir = std::env::temp_dir().join(format!("pgbridge-cli-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    TempConfig { path }
}

/// Serialises the tests that read or change the process environment: clap reads it on every
/// parse, and the environment is shared by all test threads.
mod test_env {
    use std::ffi::OsString;
    use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
    use std::sync::Mutex;

    use clap::CommandFactory;

    use crate::cli::Cli;

    static ENV_LOCK: Mutex<()> = Mutex::new(());

    /// Runs `f` with every environment variable the CLI reads removed, except `vars`, and
    /// restores the environment afterwards, also when `f` panics.
    pub(crate) fn with_env<R>(vars: &[(&str, &str)], f: impl FnOnce() -> R) -> R {
        let _guard = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let names: Vec<OsString> = Cli::command()
            .get_arguments()
            .filter_map(|a| a.get_env().map(|e| e.to_owned()))
            .collect();
        let saved: Vec<(OsString, Option<OsString>)> = names
            .iter()
            .map(|n| (n.clone(), std::env::var_os(n)))
            .collect();
        for name in &names {
            std::env::remove_var(name);
        }
        for (key, value) in vars {
            std::env::set_var(key, value);
        }
        let result = catch_unwind(AssertUnwindSafe(f));
        for (key, _) in vars {
            std::env::remove_var(key);
        }
        for (name, value) in saved {
            if let Some(value) = value {
                std::env::set_var(name, value);
            }
        }
        result.unwrap_or_else(|panic| resume_unwind(panic))
    }
}

/// `PG_HOST=h1,h2` with `PG_PORT=5432,5433` (one per host), or one port for all; the
/// target session flag; and the failover slot switch.
#[test]
fn several_hosts_from_the_environment_and_flags() {
    let (_, layers) = with_env(&[("PG_HOST", "h1,h2"), ("PG_PORT", "5432,5433")], || {
        parse_from(["bridge", "check-config"]).unwrap()
    });
    assert_eq!(layers.env.postgres.host.as_deref(), Some("h1,h2"));
    assert_eq!(
        layers.env.postgres.port,
        Some(PgPorts::from(vec![5432, 5433]))
    );
    let c = Config::load(layers).unwrap();
    assert_eq!(c.postgres.addresses(), "h1:5432,h2:5433");
    // Several hosts and nothing said: the primary.
    assert_eq!(
        c.postgres.target_session_attrs,
        Some(TargetSessionAttrs::ReadWrite)
    );
    assert!(c.replication.failover_slot);

    let (_, layers) = with_env(&[("PG_HOST", "h1,h2"), ("PG_PORT", "6000")], || {
        parse_from([
            "bridge",
            "--pg-target-session-attrs",
            "primary",
            "--failover-slot=false",
            "check-config",
        ])
        .unwrap()
    });
    let c = Config::load(layers).unwrap();
    assert_eq!(c.postgres.addresses(), "h1:6000,h2:6000");
    assert_eq!(
        c.postgres.target_session_attrs,
        Some(TargetSessionAttrs::Primary)
    );
    assert!(!c.replication.failover_slot);

    with_env(&[], || {
        assert!(parse_from(["bridge", "--pg-port", "5432,x"]).is_err());
        assert!(parse_from(["bridge", "--pg-target-session-attrs", "standby"]).is_err());
    });
}
