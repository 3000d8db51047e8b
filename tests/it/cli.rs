//! The `bridge` binary's command line: help, usage errors, configuration errors, precedence
//! through the real environment, and that secrets never reach the output.
//!
//! Every run starts from an empty environment, so the developer's or CI's variables cannot leak
//! in, and nothing here needs PostgreSQL or NATS.

use std::path::PathBuf;
use std::process::{Command, Output};

/// Runs `bridge` with exactly `env` as its environment.
fn bridge(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bridge"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("run the bridge binary")
}

/// A free loopback port (bound and released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

/// Runs the bridge until it logs its first reconnect attempt, then stops it with SIGTERM;
/// returns the exit code and everything it printed.
fn run_until_retry(env: &[(&str, &str)]) -> (Option<i32>, String) {
    use std::io::{BufRead, BufReader};
    // The default state file and spool directory are relative: a directory of its own keeps
    // them out of the source tree.
    let dir = testkit::TempDir::new("cli");
    let mut child = Command::new(env!("CARGO_BIN_EXE_bridge"))
        .current_dir(dir.path())
        .args([
            "--reconnect-backoff-secs",
            "1",
            "--pg-connect-timeout-secs",
            "2",
        ])
        .env_clear()
        .envs(env.iter().copied())
        // Tests run in parallel: not the default HTTP port.
        .env("BRIDGE_PORT", free_port().to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the bridge binary");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("reconnecting in") {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let seen = rx.recv_timeout(std::time::Duration::from_secs(30));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("wait for the bridge");
    let mut all = reader.join().unwrap();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut all).unwrap();
    assert!(seen.is_ok(), "no reconnect attempt logged: {all}");
    (status.code(), all)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts exit code 2 and a single stderr line starting with `prefix`; returns the line.
fn assert_one_line_error(out: &Output, prefix: &str) -> String {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line expected: {err:?}");
    assert!(err.starts_with(prefix), "{err}");
    assert!(stdout(out).is_empty(), "nothing on stdout: {}", stdout(out));
    err
}

/// A configuration file in Cargo's per-target temporary directory, unique to `name`.
fn config_file(name: &str, text: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cli-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}-{}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

/// `check-config` output as a TOML table.
fn checked(args: &[&str], env: &[(&str, &str)]) -> toml::Table {
    let mut full = vec!["check-config"];
    full.extend_from_slice(args);
    let out = bridge(&full, env);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    stdout(&out).parse().expect("check-config prints TOML")
}

fn get<'a>(table: &'a toml::Table, section: &str, key: &str) -> &'a toml::Value {
    &table[section][key]
}

#[test]
fn help_documents_every_environment_variable() {
    let out = bridge(&["--help"], &[]);
    assert_eq!(out.status.code(), Some(0));
    let help = stdout(&out);
    for var in [
        // docs/configuration.md
        "PG_HOST",
        "PG_PORT",
        "PG_USER",
        "PG_PASSWORD",
        "PG_DB",
        "NATS_HOST",
        "NATS_BRIDGE_USER",
        "NATS_BRIDGE_PASSWORD",
        "BRIDGE_PORT",
        // and the URL, file and admin forms
        "PG_URL",
        "NATS_URL",
        "BRIDGE_CONFIG",
        "BRIDGE_ADMIN_TOKEN",
    ] {
        assert!(help.contains(&format!("[env: {var}")), "{var} missing");
    }
    for flag in [
        "--stream",
        "--slot",
        "--publication",
        "--table",
        "--port",
        "--format",
        "--config",
        "check-config",
    ] {
        assert!(help.contains(flag), "{flag} missing");
    }
    assert!(help.contains("[default: cdc_slot]") && help.contains("[default: 9090]"));

    let out = bridge(&["--version"], &[]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).starts_with("bridge "));
}

#[test]
fn help_never_shows_secret_values() {
    let out = bridge(
        &["--help"],
        &[
            ("PG_PASSWORD", "pg-help-secret"),
            ("NATS_BRIDGE_PASSWORD", "nats-help-secret"),
            ("BRIDGE_ADMIN_TOKEN", "admin-help-secret"),
        ],
    );
    let help = stdout(&out);
    assert!(!help.contains("help-secret"), "{help}");
}

#[test]
fn bad_flag_values_are_one_line_usage_errors() {
    let err = assert_one_line_error(&bridge(&["--port", "ninety"], &[]), "bridge: usage error:");
    assert!(err.contains("--port") && err.contains("ninety"), "{err}");

    let err = assert_one_line_error(&bridge(&["--format", "xml"], &[]), "bridge: usage error:");
    assert!(err.contains("msgpack") && err.contains("json"), "{err}");

    let err = assert_one_line_error(&bridge(&["--slott", "x"], &[]), "bridge: usage error:");
    assert!(err.contains("--slot"), "suggests the right flag: {err}");

    // A bad value from the environment says where it came from.
    let err = assert_one_line_error(
        &bridge(&["check-config"], &[("PG_PORT", "port")]),
        "bridge: usage error:",
    );
    assert!(err.contains("PG_PORT"), "{err}");
}

#[test]
fn invalid_configuration_names_the_field() {
    let err = assert_one_line_error(
        &bridge(&["check-config", "--slot", "Bad-Slot"], &[]),
        "bridge: configuration error:",
    );
    assert!(
        err.contains("replication.slot") && err.contains("--slot"),
        "{err}"
    );

    // The default action validates too, before anything connects.
    let err = assert_one_line_error(
        &bridge(&[], &[("BRIDGE_SLOT", "")]),
        "bridge: configuration error:",
    );
    assert!(err.contains("replication.slot"), "{err}");

    let err = assert_one_line_error(
        &bridge(
            &[
                "check-config",
                "--lag-warn-bytes",
                "2000",
                "--lag-critical-bytes",
                "1000",
            ],
            &[],
        ),
        "bridge: configuration error:",
    );
    assert!(err.contains("monitor.lag_warn_bytes"), "{err}");

    let err = assert_one_line_error(
        &bridge(&["check-config", "--stream", "CDC.X,INIT"], &[]),
        "bridge: configuration error:",
    );
    assert!(err.contains("streams.cdc"), "{err}");
}

#[test]
fn unknown_file_key_is_named() {
    let file = config_file(
        "unknown-key",
        "[replication]\nslot = \"s1\"\npublicaton = \"typo\"\n",
    );
    let err = assert_one_line_error(
        &bridge(&["check-config", "--config", file.to_str().unwrap()], &[]),
        "bridge: configuration error:",
    );
    assert!(
        err.contains("publicaton") && err.contains("line 3"),
        "{err}"
    );
    assert!(
        err.contains(file.to_str().unwrap()),
        "names the file: {err}"
    );

    let err = assert_one_line_error(
        &bridge(
            &["check-config"],
            &[("BRIDGE_CONFIG", "/nonexistent/bridge.toml")],
        ),
        "bridge: configuration error:",
    );
    assert!(err.contains("/nonexistent/bridge.toml"), "{err}");
}

#[test]
fn check_config_hides_secrets() {
    let env = [
        ("PG_PASSWORD", "pg-s3cret"),
        (
            "PG_URL",
            "postgres://reader:url-s3cret@db.internal:6543/app",
        ),
        ("NATS_BRIDGE_USER", "bridge"),
        ("NATS_BRIDGE_PASSWORD", "nats-s3cret"),
        ("BRIDGE_ADMIN_TOKEN", "admin-s3cret"),
        ("RUST_LOG", "trace"),
    ];
    let out = bridge(&["check-config"], &env);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let all = format!("{}{}", stdout(&out), stderr(&out));
    assert!(!all.contains("s3cret"), "a secret leaked: {all}");
    assert!(all.contains("***"), "{all}");

    // A real run logs its configuration and its connection attempts (the host does not
    // resolve, so it retries until told to stop): no secret in any of it.
    let (code, all) = run_until_retry(&env);
    assert_eq!(code, Some(0), "{all}");
    assert!(all.contains("starting"), "{all}");
    assert!(all.contains("reconnecting in"), "{all}");
    assert!(!all.contains("s3cret"), "a secret leaked: {all}");
    let c = checked(&[], &env);
    assert_eq!(get(&c, "postgres", "host").as_str(), Some("db.internal"));
    assert_eq!(get(&c, "postgres", "port").as_integer(), Some(6543));
    assert_eq!(get(&c, "postgres", "user").as_str(), Some("reader"));
    assert_eq!(get(&c, "postgres", "password").as_str(), Some("***"));
    assert_eq!(get(&c, "http", "admin_token").as_str(), Some("***"));
}

#[test]
fn precedence_flag_env_file_default() {
    let file = config_file(
        "precedence",
        "[postgres]\nhost = \"file-host\"\nuser = \"file-user\"\n\
         [replication]\nslot = \"file_slot\"\npublication = \"file_pub\"\n\
         [http]\nport = 9201\n",
    );
    let file = file.to_str().unwrap();

    let c = checked(&["--config", file], &[]);
    assert_eq!(get(&c, "postgres", "host").as_str(), Some("file-host"));
    assert_eq!(get(&c, "postgres", "port").as_integer(), Some(5432)); // default
    assert_eq!(get(&c, "http", "port").as_integer(), Some(9201));

    let env = [
        ("BRIDGE_CONFIG", file),
        ("PG_HOST", "env-host"),
        ("BRIDGE_SLOT", "env_slot"),
        ("BRIDGE_PORT", "9202"),
    ];
    let c = checked(&[], &env);
    assert_eq!(get(&c, "postgres", "host").as_str(), Some("env-host"));
    assert_eq!(get(&c, "postgres", "user").as_str(), Some("file-user"));
    assert_eq!(get(&c, "replication", "slot").as_str(), Some("env_slot"));
    assert_eq!(
        get(&c, "replication", "publication").as_str(),
        Some("file_pub")
    );
    assert_eq!(get(&c, "http", "port").as_integer(), Some(9202));

    let c = checked(&["--pg-host", "flag-host", "--port", "9203"], &env);
    assert_eq!(get(&c, "postgres", "host").as_str(), Some("flag-host"));
    assert_eq!(get(&c, "replication", "slot").as_str(), Some("env_slot"));
    assert_eq!(get(&c, "http", "port").as_integer(), Some(9203));
}

#[test]
fn mirror_usage_and_unreachable_nats_are_one_line_errors() {
    // Without --db: usage error, exit 2.
    let out = bridge(&["mirror"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(assert_one_line_error(&out, "bridge: usage error:").contains("--db"));
    // A consumer name JetStream would refuse.
    let out = bridge(&["mirror", "--db", "m.sqlite", "--durable", "a.b"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(assert_one_line_error(&out, "bridge: usage error:").contains("--durable"));
    // Nothing listens there: exit 1 with what to check, before any file is created.
    let dir = std::env::temp_dir().join(format!("pgbridge-cli-mirror-{}", std::process::id()));
    let db = dir.join("m.sqlite");
    let port = free_port().to_string();
    let url = format!("nats://127.0.0.1:{port}");
    let out = bridge(
        &["mirror", "--db", db.to_str().unwrap(), "--nats-url", &url],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    let line = err.lines().last().unwrap_or_default();
    assert!(
        line.starts_with("bridge mirror: error: cannot reach NATS"),
        "{err}"
    );
    assert!(line.contains("--nats-url"), "{line}");
    assert!(!db.exists());
}

#[test]
fn mirror_against_nats_without_jetstream_is_one_line_error() {
    let nats = testkit::NatsServer::start_without_jetstream();
    let dir = testkit::TempDir::new("cli-mirror");
    let db = dir.path().join("m.sqlite");
    let mut mirror =
        testkit::BridgeProcess::spawn(Command::new(env!("CARGO_BIN_EXE_bridge")).env_clear().args(
            [
                "mirror",
                "--db",
                db.to_str().unwrap(),
                "--nats-url",
                &nats.url(),
            ],
        ));
    // At once, rather than waiting for a JetStream that will not come.
    let code = mirror.wait_exit(std::time::Duration::from_secs(30));
    let log = mirror.log();
    assert_eq!(code, Some(2), "{log}");
    let line = log.lines().last().unwrap_or_default();
    assert!(
        line.starts_with("bridge mirror: error: JetStream is not enabled on the NATS server"),
        "{log}"
    );
    assert!(line.contains("-js"), "{line}");
}

/// Bad URLs that carry a password, through every error path a URL can take: `check-config`,
/// a start and `bridge mirror` all refuse them in one line that never shows the secret.
#[test]
fn secret_bearing_bad_urls_never_print_the_secret() {
    let pg_urls = [
        "postgres://u:pg-s3cret@h:notaport/db",
        "postgres://u:pg-s3cret@h:0/db",
        "postgres://u:pg-s3cret",
        "mysql://u:pg-s3cret@h/db",
        "postgres://u:pg-s3cret%zz@h/db",
        "postgres://u:pg-s3cret@h/db?password",
        "postgres://u:pg-s3cret@h/db?sslmode=sometimes",
        "postgres://u:pg-s3cret@h1,,h2/db",
        "postgres://u:pg-s3cret@h1:1,h2:x/db",
        "postgres://u:pg-s3cret@h/db?target_session_attrs=standby",
        "postgres://u:pg-s3cret@[::1/db",
        "postgres://u:pg/s3cret@h/db?sslrootcert=/nonexistent/ca.pem",
    ];
    let nats_urls = [
        "nats://u:n-s3cret",
        "u:n-s3cret",
        "nats://u:n/s3cret@h:0",
        "nats://u:n-s3cret@h:99999",
        "http://u:n-s3cret@h",
        "u:n-s3cret://h",
        "nats://u:n-s3cret%zz@h",
        "nats://:n-s3cret@h",
        "nats://u:n-s3cret@",
        "nats://u:n-s3cret@[::1",
        "nats://a:n-s3cret@h1,nats://b:other-s3cret@h2",
    ];
    let mut cases: Vec<Vec<(&str, &str)>> = Vec::new();
    for url in pg_urls {
        cases.push(vec![("PG_URL", url)]);
    }
    for url in nats_urls {
        cases.push(vec![("NATS_URL", url)]);
    }
    // Two authentication methods, one of them in the URL.
    cases.push(vec![
        ("NATS_URL", "nats://u:n-s3cret@h"),
        ("NATS_BRIDGE_TOKEN", "tok-s3cret"),
    ]);
    for env in cases {
        let mut env = env.clone();
        env.push(("RUST_LOG", "trace"));
        for args in [&["check-config"][..], &[][..]] {
            let out = bridge(args, &env);
            let line = assert_one_line_error(&out, "bridge: configuration error: invalid");
            assert!(!line.contains("s3cret"), "{env:?} {args:?}: {line}");
            assert!(
                line.contains("invalid postgres.") || line.contains("invalid nats."),
                "{line}"
            );
        }
        let out = bridge(&["mirror", "--db", "/nonexistent/m.sqlite"], &env);
        let line = assert_one_line_error(&out, "bridge: configuration error: invalid");
        assert!(!line.contains("s3cret"), "{env:?} mirror: {line}");
    }
}

/// Reserved characters in passwords, unescaped: accepted, used, and never printed.
#[test]
fn passwords_with_reserved_characters_are_accepted_and_hidden() {
    let env = [
        (
            "PG_URL",
            "postgres://reader:p@ss/w0rd?s3cret@db.internal:6543/app",
        ),
        ("NATS_URL", "nats://bridge:na/ts#s3cret@nats.internal:4222"),
        ("RUST_LOG", "trace"),
    ];
    let out = bridge(&["check-config"], &env);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let all = format!("{}{}", stdout(&out), stderr(&out));
    assert!(!all.contains("s3cret"), "a secret leaked: {all}");
    let c: toml::Table = stdout(&out).parse().unwrap();
    assert_eq!(get(&c, "postgres", "host").as_str(), Some("db.internal"));
    assert_eq!(get(&c, "postgres", "user").as_str(), Some("reader"));
    assert_eq!(get(&c, "postgres", "password").as_str(), Some("***"));
    assert_eq!(
        c["nats"]["urls"].as_array().unwrap()[0].as_str(),
        Some("nats://***@nats.internal:4222")
    );

    // A start logs its configuration, the plain-text warning and its retries: no secret.
    let (code, all) = run_until_retry(&env);
    assert_eq!(code, Some(0), "{all}");
    assert!(!all.contains("s3cret"), "a secret leaked: {all}");
    assert!(
        all.contains(
            "NATS credentials (user) would travel unencrypted to nats://nats.internal:4222"
        ),
        "{all}"
    );
}
