//! Loading, validation, URLs and redaction, through the module's public face where possible.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::load::{parse_file, resolve};
use super::nats::DEFAULT_NATS_URL;
use super::pg::{DEFAULT_PG_HOST, DEFAULT_PG_PORT, DEFAULT_PG_USER};
use super::replication::MIN_RING_CAPACITY;
use super::url::{parse_pg_url, PgUrlParts};
use super::*;

fn toml_config(text: &str) -> Result<Config, ConfigError> {
    parse_file(text, Path::new("test.toml")).and_then(resolve)
}

fn invalid_field(config: &Config) -> &'static str {
    match config.validate() {
        Err(ConfigError::Invalid { field, .. }) | Err(ConfigError::Url { field, .. }) => field,
        other => panic!("expected a field error, got {other:?}"),
    }
}

/// A configuration file in a directory of its own, removed on drop.
struct TempConfig {
    path: PathBuf,
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
    let dir = std::env::temp_dir().join(format!(
        "pgbridge-config-test-{}-{name}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    TempConfig { path }
}

#[test]
fn defaults_are_the_constants() {
    let c = Config::default();
    assert_eq!(c.postgres.host, DEFAULT_PG_HOST);
    assert_eq!(c.postgres.port.as_slice(), [5432]);
    assert_eq!(c.postgres.sslmode, None);
    assert_eq!(c.nats.urls, vec![DEFAULT_NATS_URL.to_owned()]);
    assert_eq!(c.replication.slot, "cdc_slot");
    assert_eq!(c.replication.publication, "cdc_pub");
    assert!(c.replication.tables.is_empty());
    assert_eq!(c.replication.format, Format::Msgpack);
    assert_eq!(c.replication.reconnect_backoff(), Duration::from_secs(5));
    assert_eq!(
        c.replication.standby_status_interval(),
        Duration::from_secs(10)
    );
    assert_eq!(
        c.replication.state_file_path(),
        PathBuf::from("pgbridge-cdc_slot.lsn")
    );
    assert_eq!(c.http.socket_addr().to_string(), "127.0.0.1:9090");
    assert_eq!(c.http.admin_token, None);
    assert_eq!(c.monitor.interval(), Duration::from_secs(30));
    assert_eq!(c.monitor.lag_warn_bytes, 536_870_912);
    assert_eq!(c.monitor.lag_critical_bytes, 1_073_741_824);
    assert_eq!(
        c.monitor.metrics_log_interval(),
        Some(Duration::from_secs(15))
    );
    assert_eq!(c.snapshot.chunk_rows, 10_000);
    assert!(!c.snapshot.on_start);
    assert_eq!(
        (c.streams.cdc.as_str(), c.streams.init.as_str()),
        ("CDC", "INIT")
    );
    assert_eq!(c.streams.cdc_duplicate_window(), Duration::from_secs(120));
    assert_eq!(c.streams.init_max_age(), Duration::from_secs(7 * 24 * 3600));
    c.validate().expect("the defaults are valid");
    // An empty file and an empty command line change nothing.
    assert_eq!(toml_config("").unwrap(), c);
    assert_eq!(Config::load(Layers::default()).unwrap(), c);
}

#[test]
fn toml_sections_are_read() {
    let c = toml_config(
        r#"
        [postgres]
        host = "db.example"
        port = 6432
        user = "bridge_reader"
        password = "pw"
        dbname = "app"
        sslmode = "verify-full"
        connect_timeout_secs = 3

        [nats]
        urls = ["nats://n1:4222", "n2:4223"]
        user = "bridge"
        password = "npw"

        [replication]
        slot = "s1"
        publication = "p1"
        tables = ["users", "sales.orders"]
        format = "json"
        ring_capacity = 1024
        max_in_flight = 64
        reconnect_backoff_secs = 2
        standby_status_interval_secs = 5
        state_file = "/var/lib/pgbridge/s1.lsn"

        [http]
        bind = "0.0.0.0"
        port = 9191
        admin_token = "tok"

        [monitor]
        interval_secs = 10
        lag_warn_bytes = 100
        lag_critical_bytes = 200
        metrics_log_interval_secs = 0

        [snapshot]
        chunk_rows = 500
        on_start = true

        [streams]
        cdc = "CHANGES"
        init = "BOOT"
        cdc_max_age_secs = 3600
        cdc_duplicate_window_secs = 60
        init_max_age_secs = 0
        replicas = 3
        "#,
    )
    .unwrap();
    c.validate().unwrap();
    assert_eq!(c.postgres.host, "db.example");
    assert_eq!(c.postgres.port.as_slice(), [6432]);
    assert_eq!(c.postgres.password, Some(Secret::new("pw")));
    assert_eq!(c.postgres.sslmode, Some(SslMode::VerifyFull));
    assert_eq!(c.nats.urls, ["nats://n1:4222", "n2:4223"]);
    assert_eq!(c.replication.tables, ["users", "sales.orders"]);
    assert_eq!(c.replication.format, Format::Json);
    assert_eq!(
        c.replication.state_file_path(),
        PathBuf::from("/var/lib/pgbridge/s1.lsn")
    );
    assert_eq!(c.http.socket_addr().to_string(), "0.0.0.0:9191");
    assert_eq!(c.monitor.metrics_log_interval(), None);
    assert!(c.snapshot.on_start);
    assert_eq!(c.streams.init, "BOOT");
    assert_eq!(c.streams.replicas, 3);
}

#[test]
fn unknown_keys_and_bad_values_name_the_key_and_line() {
    let err = toml_config("[replication]\nslot = \"a\"\nslott = \"b\"\n").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ConfigError::Toml { .. }));
    assert!(msg.starts_with("test.toml: line 3, column 1:"), "{msg}");
    assert!(msg.contains("slott"), "{msg}");

    let msg = toml_config("[bogus]\nx = 1\n").unwrap_err().to_string();
    assert!(msg.contains("bogus"), "{msg}");

    let msg = toml_config("[replication]\nformat = \"xml\"\n")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("xml") && msg.contains("line 2"), "{msg}");

    let msg = toml_config("[http]\nport = 70000\n")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("line 2"), "{msg}");
    assert!(!msg.contains('\n'), "one line: {msg}");
}

#[test]
fn missing_file_is_an_io_error_naming_it() {
    let layers = Layers {
        file: Some(PathBuf::from("/nonexistent/pgbridge.toml")),
        ..Layers::default()
    };
    let err = Config::load(layers).unwrap_err();
    assert!(matches!(err, ConfigError::Io { .. }));
    assert!(err.to_string().contains("/nonexistent/pgbridge.toml"));
}

#[test]
fn overlays_override_the_file_only_where_given() {
    let tmp = temp_file(
        "override.toml",
        "[replication]\nslot = \"file_slot\"\npublication = \"file_pub\"\ntables = [\"a\"]\n\
         [http]\nport = 9100\n[snapshot]\non_start = true\n",
    );
    let mut layers = Layers {
        file: Some(tmp.path.clone()),
        ..Layers::default()
    };
    layers.env.replication.slot = Some("env_slot".into());
    layers.env.replication.publication = Some("env_pub".into());
    layers.env.http.port = Some(9200);
    layers.flags.replication.slot = Some("flag_slot".into());
    layers.flags.snapshot.on_start = Some(false);
    let c = Config::load(layers.clone()).unwrap();
    assert_eq!(c.replication.slot, "flag_slot"); // flag over environment and file
    assert_eq!(c.replication.publication, "env_pub"); // environment over file
    assert_eq!(c.replication.tables, ["a"]); // file over default
    assert_eq!(c.http.port, 9200);
    assert!(!c.snapshot.on_start); // a flag can turn a file's true off
    assert_eq!(c.monitor, MonitorConfig::default()); // default where nobody spoke

    // An empty list given later empties the file's.
    layers.flags.replication.tables = Some(Vec::new());
    assert!(Config::load(layers).unwrap().replication.tables.is_empty());
}

#[test]
fn pg_url_is_expanded_and_parts_win() {
    let c = toml_config(
        "[postgres]\nurl = \"postgresql://us%40er:p%3Ass%2Fw@db.example:6543/my%20db?sslmode=require&connect_timeout=4\"\n",
    )
    .unwrap();
    assert_eq!(c.postgres.user, "us@er");
    assert_eq!(c.postgres.password.as_ref().unwrap().expose(), "p:ss/w");
    assert_eq!(c.postgres.host, "db.example");
    assert_eq!(c.postgres.port.as_slice(), [6543]);
    assert_eq!(c.postgres.dbname, "my db");
    assert_eq!(c.postgres.sslmode, Some(SslMode::Require));
    assert_eq!(c.postgres.connect_timeout_secs, 4);

    // An explicit part wins over the URL's, whichever level each comes from.
    let tmp = temp_file(
        "url.toml",
        "[postgres]\nurl = \"postgres://u:p@urlhost:1111/urldb\"\nport = 2222\n",
    );
    let mut layers = Layers {
        file: Some(tmp.path.clone()),
        ..Layers::default()
    };
    layers.flags.postgres.host = Some("flaghost".into());
    let c = Config::load(layers).unwrap();
    assert_eq!(c.postgres.host, "flaghost");
    assert_eq!(c.postgres.port.as_slice(), [2222]);
    assert_eq!(c.postgres.user, "u");
    assert_eq!(c.postgres.dbname, "urldb");

    // Missing parts fall back to the defaults.
    let p = parse_pg_url("postgres://").unwrap();
    assert_eq!(p, PgUrlParts::default());
    let c = toml_config("[postgres]\nurl = \"postgres:///appdb\"\n").unwrap();
    assert_eq!(c.postgres.host, DEFAULT_PG_HOST);
    assert_eq!(c.postgres.port.as_slice(), [DEFAULT_PG_PORT]);
    assert_eq!(c.postgres.user, DEFAULT_PG_USER);
    assert_eq!(c.postgres.password, None);
    assert_eq!(c.postgres.dbname, "appdb");

    let p = parse_pg_url("postgres://[::1]:5433/db").unwrap();
    assert_eq!(
        (p.host.as_deref(), p.port),
        (Some("::1"), Some(PgPorts::single(5433)))
    );
    let p = parse_pg_url("postgres://%2Fvar%2Frun%2Fpostgresql/db?user=me").unwrap();
    assert_eq!(p.host.as_deref(), Some("/var/run/postgresql"));
    assert_eq!(p.user.as_deref(), Some("me"));
    let p = parse_pg_url("postgres://user@host").unwrap();
    assert_eq!((p.user.as_deref(), p.password), (Some("user"), None));
}

#[test]
fn bad_pg_urls_are_refused_without_echoing_secrets() {
    for (url, expect) in [
        ("mysql://u:s3cret@h/db", "postgres://"),
        ("postgres://u:s3cret@h:notaport/db", "port"),
        ("postgres://u:s3cret@h:0/db", "port"),
        ("postgres://u:s3cret%zz@h/db", "percent-escape"),
        ("postgres://u:s3cret@h1,,h2/db", "host list is empty"),
        ("postgres://u:s3cret@h1:5432,h2:x/db", "port"),
        ("postgres://u:s3cret@h/db?port=5432,0", "port"),
        ("postgres://u:s3cret@h/db?sslmode=sometimes", "sslmode"),
        (
            "postgres://u:s3cret@h/db?target_session_attrs=standby",
            "needs the primary",
        ),
        (
            "postgres://u:s3cret@h/db?target_session_attrs=sometimes",
            "target_session_attrs",
        ),
        ("postgres://u:s3cret@[::1/db", "IPv6"),
        ("postgres://u:s3cret@h/db?password", "no '=value'"),
        ("postgres://u:s3cret@h/db?sslcert=%zz", "percent-escape"),
        ("postgres://u:s3cret/db", "port"),
        (
            "postgres://u:s3cret@h/db?connect_timeout=soon",
            "connect_timeout",
        ),
    ] {
        let err = toml_config(&format!("[postgres]\nurl = \"{url}\"\n")).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(
                err,
                ConfigError::Url {
                    field: "postgres.url",
                    ..
                }
            ),
            "{msg}"
        );
        assert!(msg.contains(expect), "{url}: {msg}");
        assert!(!msg.contains("s3cret"), "{url}: {msg}");
        assert!(msg.contains("--pg-url / PG_URL"), "{msg}");
    }
}

#[test]
fn libpq_params() {
    let mut pg = PgConfig {
        password: Some(Secret::new("pw")),
        ..PgConfig::default()
    };
    let params = pg.libpq_params();
    let get =
        |p: &[(&str, String)], k: &str| p.iter().find(|(key, _)| *key == k).map(|(_, v)| v.clone());
    assert_eq!(get(&params, "host").as_deref(), Some("localhost"));
    assert_eq!(get(&params, "port").as_deref(), Some("5432"));
    assert_eq!(get(&params, "password").as_deref(), Some("pw"));
    // Nothing configured: no sslmode, so that libpq's PGSSLMODE applies.
    assert_eq!(get(&params, "sslmode"), None);
    assert_eq!(get(&params, "sslrootcert"), None);
    assert_eq!(get(&params, "connect_timeout").as_deref(), Some("10"));
    assert_eq!(
        get(&params, "application_name").as_deref(),
        Some("pgbridge")
    );
    pg.password = None;
    assert_eq!(get(&pg.libpq_params(), "password"), None);
    pg.sslmode = Some(SslMode::VerifyFull);
    pg.sslrootcert = Some("/etc/ca.pem".into());
    pg.sslcert = Some("/etc/c.pem".into());
    pg.sslkey = Some("/etc/k.pem".into());
    let params = pg.libpq_params();
    assert_eq!(get(&params, "sslmode").as_deref(), Some("verify-full"));
    assert_eq!(get(&params, "sslrootcert").as_deref(), Some("/etc/ca.pem"));
    assert_eq!(get(&params, "sslcert").as_deref(), Some("/etc/c.pem"));
    assert_eq!(get(&params, "sslkey").as_deref(), Some("/etc/k.pem"));
}

/// Several hosts reach libpq as comma lists with the target session attributes; the file
/// takes a port, a comma list or an array; the port count must fit the hosts.
#[test]
fn several_hosts_reach_libpq_and_check_config() {
    let get =
        |p: &[(&str, String)], k: &str| p.iter().find(|(key, _)| *key == k).map(|(_, v)| v.clone());
    let c = toml_config(
        "[postgres]\nurl = \"postgres://u:url-secret@h1:5432,h2:5433/db?target_session_attrs=read-write\"\n",
    )
    .unwrap();
    c.validate().unwrap();
    let params = c.postgres.libpq_params();
    assert_eq!(get(&params, "host").as_deref(), Some("h1,h2"));
    assert_eq!(get(&params, "port").as_deref(), Some("5432,5433"));
    assert_eq!(
        get(&params, "target_session_attrs").as_deref(),
        Some("read-write")
    );
    let line = c.to_string();
    assert!(
        line.contains("postgres=u@h1:5432,h2:5433/db target_session_attrs=read-write"),
        "{line}"
    );
    let toml = c.to_redacted_toml();
    assert!(toml.contains("port = \"5432,5433\""), "{toml}");
    assert!(
        toml.contains("target_session_attrs = \"read-write\""),
        "{toml}"
    );
    for shown in [&line, &toml] {
        assert!(!shown.contains("url-secret"), "{shown}");
    }

    // One host: nothing passed, libpq's own default applies; the port stays a number.
    let c = toml_config("[postgres]\nhost = \"db\"\nport = 6000\n").unwrap();
    assert_eq!(
        get(&c.postgres.libpq_params(), "target_session_attrs"),
        None
    );
    assert!(c.to_redacted_toml().contains("port = 6000"));

    for file in [
        "[postgres]\nhost = \"a,b\"\nport = \"1, 2\"\n",
        "[postgres]\nhost = \"a,b\"\nport = [1, 2]\n",
    ] {
        let c = toml_config(file).unwrap();
        c.validate().unwrap();
        assert_eq!(c.postgres.addresses(), "a:1,b:2", "{file}");
        assert_eq!(
            c.postgres.target_session_attrs,
            Some(TargetSessionAttrs::ReadWrite)
        );
    }
    assert!(toml_config("[postgres]\nport = \"x\"\n").is_err());
    let c = toml_config("[postgres]\nurl = \"postgres://[::1]:1,h:2/db\"\n").unwrap();
    assert_eq!(c.postgres.addresses(), "[::1]:1,h:2");
    let c = toml_config("[postgres]\nhost = \"a,b\"\nport = [1, 2, 3]\n").unwrap();
    let err = c.validate().unwrap_err().to_string();
    assert!(err.contains("3 ports for 2 hosts"), "{err}");
    let c = toml_config("[postgres]\nhost = \"a,,b\"\n").unwrap();
    assert_eq!(invalid_field(&c), "postgres.host");
}

#[test]
fn bad_nats_urls_never_echo_secrets() {
    for (url, expect) in [
        ("http://u:s3cret@h:4222", "scheme 'http'"),
        ("nats://u:s3cret", "port"),
        ("u:s3cret", "port"),
        ("nats://u:s3cret@", "no host"),
        ("nats://u:s3cret@h:0", "port"),
        ("nats://u:s3cret@h:99999", "port"),
        ("nats://u:s3cret%zz@h", "percent-escape"),
        ("nats://:s3cret@h", "no user name"),
        ("nats://u:s3cret@[::1", "IPv6"),
        ("u:s3cret://h", "scheme is not"),
        ("nats://u:s3cret@h:1:2", "host"),
    ] {
        let c = Config {
            nats: NatsConfig {
                urls: vec!["nats://ok:4222".into(), url.into()],
                ..NatsConfig::default()
            },
            ..Config::default()
        };
        let err = c.validate().unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(
                err,
                ConfigError::Url {
                    field: "nats.urls",
                    ..
                }
            ),
            "{msg}"
        );
        assert!(msg.contains(expect), "{url}: {msg}");
        assert!(msg.contains("server 2 of 2"), "{url}: {msg}");
        assert!(!msg.contains("s3cret"), "{url}: {msg}");
    }
}

#[test]
fn nats_auth_is_one_method() {
    let with = |f: &dyn Fn(&mut NatsConfig)| {
        let mut n = NatsConfig::default();
        f(&mut n);
        n
    };
    let seed = nkeys::KeyPair::new_user().seed().unwrap();
    let n = with(&|n| n.urls = vec!["nats://u:p/w@h".into(), "nats://u:p%2Fw@h2".into()]);
    assert_eq!(
        n.auth().unwrap(),
        NatsAuth::UserPassword {
            user: "u".into(),
            password: Secret::new("p/w")
        }
    );
    n.validate().unwrap();
    let n = with(&|n| n.nkey_seed = Some(Secret::new(seed.clone())));
    assert_eq!(
        n.auth().unwrap(),
        NatsAuth::NkeySeed(Secret::new(seed.clone()))
    );
    n.validate().unwrap();
    assert_eq!(NatsConfig::default().auth().unwrap(), NatsAuth::None);

    for (n, field, needle) in [
        (
            with(&|n| n.urls = vec!["nats://a:1@h".into(), "nats://b:2@h2".into()]),
            "nats.urls",
            "different credentials",
        ),
        (
            with(&|n| {
                n.urls = vec!["nats://a:1@h".into()];
                n.token = Some(Secret::new("t"));
            }),
            "nats.token",
            "only one",
        ),
        (
            with(&|n| {
                n.nkey_seed = Some(Secret::new(seed.clone()));
                n.user = Some("u".into());
                n.password = Some(Secret::new("p"));
            }),
            "nats.nkey_seed",
            "only one",
        ),
        (
            with(&|n| n.nkey_seed = Some(Secret::new("SUbogusseed"))),
            "nats.nkey_seed",
            "not a valid",
        ),
        (
            with(&|n| n.nkey_seed = Some(Secret::new("not-a-seed"))),
            "nats.nkey_seed",
            "start with SU",
        ),
        (
            with(&|n| n.nkey_file = Some("/nonexistent/u.nk".into())),
            "nats.nkey_file",
            "does not exist",
        ),
        (
            with(&|n| n.tls_ca_file = Some("/nonexistent/ca.pem".into())),
            "nats.tls_ca_file",
            "does not exist",
        ),
        (
            with(&|n| n.tls_cert_file = Some("/nonexistent/c.pem".into())),
            "nats.tls_cert_file",
            "does not exist",
        ),
    ] {
        let err = n.validate().unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(&err, ConfigError::Invalid { field: f, .. } if *f == field),
            "{field}: {msg}"
        );
        assert!(msg.contains(needle), "{field}: {msg}");
        assert!(!msg.contains(&seed), "{msg}");
    }
    // A certificate needs its key.
    let tmp = temp_file("cert.pem", "x");
    let n = with(&|n| n.tls_cert_file = Some(tmp.path.clone()));
    assert!(n
        .validate()
        .unwrap_err()
        .to_string()
        .contains("nats.tls_key_file"));
    let mut pg = PgConfig {
        sslkey: Some(tmp.path.clone()),
        ..PgConfig::default()
    };
    assert!(pg
        .validate()
        .unwrap_err()
        .to_string()
        .starts_with("invalid postgres.sslcert"));
    pg.sslcert = Some(tmp.path.clone());
    pg.sslrootcert = Some("system".into());
    pg.validate().unwrap();
    pg.sslrootcert = Some("/nonexistent/root.crt".into());
    assert!(pg
        .validate()
        .unwrap_err()
        .to_string()
        .contains("does not exist"));
}

#[test]
fn tls_required_and_plaintext_warning() {
    let n = |urls: &[&str], f: &dyn Fn(&mut NatsConfig)| {
        let mut n = NatsConfig {
            urls: urls.iter().map(|u| u.to_string()).collect(),
            ..NatsConfig::default()
        };
        f(&mut n);
        n
    };
    assert!(!n(&["nats://h"], &|_| {}).requires_tls());
    assert!(n(&["nats://h", "TLS://h2"], &|_| {}).requires_tls());
    assert!(n(&["h"], &|n| n.tls_required = true).requires_tls());
    assert!(n(&["h"], &|n| n.tls_ca_file = Some("ca".into())).requires_tls());

    let creds = |n: &mut NatsConfig| {
        n.user = Some("u".into());
        n.password = Some(Secret::new("pw-secret"));
    };
    let w = n(&["nats://localhost", "nats://db.example:4222"], &creds)
        .plaintext_credentials_warning()
        .expect("warns");
    assert!(
        w.contains("nats://db.example:4222") && w.contains("(user)"),
        "{w}"
    );
    assert!(!w.contains("localhost") && !w.contains("pw-secret"), "{w}");
    let w = n(&["nats://tok-secret@10.1.2.3"], &|_| {})
        .plaintext_credentials_warning()
        .expect("warns");
    assert!(w.contains("(token)") && !w.contains("tok-secret"), "{w}");
    // No credentials, loopback only, TLS required or wss: no warning.
    assert_eq!(
        n(&["nats://db.example"], &|_| {}).plaintext_credentials_warning(),
        None
    );
    assert_eq!(
        n(&["nats://127.0.0.1", "[::1]:4222"], &creds).plaintext_credentials_warning(),
        None
    );
    assert_eq!(
        n(&["tls://db.example"], &creds).plaintext_credentials_warning(),
        None
    );
    assert_eq!(
        n(&["wss://db.example"], &creds).plaintext_credentials_warning(),
        None
    );
    assert_eq!(
        n(&["nats://db.example"], &|n| {
            creds(n);
            n.tls_required = true;
        })
        .plaintext_credentials_warning(),
        None
    );
}

#[test]
fn validation_names_the_field() {
    let ok = Config::default();
    let check = |f: &dyn Fn(&mut Config)| {
        let mut c = ok.clone();
        f(&mut c);
        c
    };
    let cases: Vec<(Config, &str, &str)> = vec![
        (
            check(&|c| c.replication.slot.clear()),
            "replication.slot",
            "empty",
        ),
        (
            check(&|c| c.replication.slot = "Cdc-Slot".into()),
            "replication.slot",
            "a-z, 0-9 and _",
        ),
        (
            check(&|c| c.replication.slot = "a".repeat(64)),
            "replication.slot",
            "1-63",
        ),
        (
            check(&|c| c.replication.publication.clear()),
            "replication.publication",
            "empty",
        ),
        (
            check(&|c| c.replication.publication = "my pub".into()),
            "replication.publication",
            "' '",
        ),
        (
            check(&|c| c.replication.tables = vec!["a.b.c".into()]),
            "replication.tables",
            "more than one",
        ),
        (
            check(&|c| c.replication.tables = vec!["1abc".into()]),
            "replication.tables",
            "start with",
        ),
        (
            check(&|c| c.replication.tables = vec!["or-ders".into()]),
            "replication.tables",
            "'-'",
        ),
        (
            check(&|c| c.replication.tables = vec!["public.".into()]),
            "replication.tables",
            "empty",
        ),
        (
            check(&|c| c.replication.tables = vec!["a".into(), "a".into()]),
            "replication.tables",
            "twice",
        ),
        (
            check(&|c| c.replication.ring_capacity = 1000),
            "replication.ring_capacity",
            "power of two",
        ),
        (
            check(&|c| c.replication.ring_capacity = 8),
            "replication.ring_capacity",
            "power of two",
        ),
        (
            check(&|c| c.replication.max_in_flight = 0),
            "replication.max_in_flight",
            "between",
        ),
        (
            check(&|c| c.replication.reconnect_backoff_secs = 0),
            "replication.reconnect_backoff_secs",
            "at least",
        ),
        (
            check(&|c| c.replication.standby_status_interval_secs = 0),
            "replication.standby_status_interval_secs",
            "at least",
        ),
        (
            check(&|c| c.replication.batch_wait_ms = 101),
            "replication.batch_wait_ms",
            "maximum",
        ),
        (
            check(&|c| c.replication.state_file = Some(PathBuf::new())),
            "replication.state_file",
            "empty",
        ),
        (
            check(&|c| c.replication.id_namespace = Some(String::new())),
            "replication.id_namespace",
            "1-64 characters",
        ),
        (
            check(&|c| c.replication.id_namespace = Some("a:b".into())),
            "replication.id_namespace",
            "A-Z, a-z, 0-9, _ and -",
        ),
        (
            check(&|c| c.replication.id_namespace = Some("x".repeat(65))),
            "replication.id_namespace",
            "1-64 characters",
        ),
        (
            check(&|c| c.postgres.port = PgPorts::single(0)),
            "postgres.port",
            "not 0",
        ),
        (
            check(&|c| c.postgres.host.clear()),
            "postgres.host",
            "empty",
        ),
        (
            check(&|c| c.postgres.connect_timeout_secs = 0),
            "postgres.connect_timeout_secs",
            "at least",
        ),
        (check(&|c| c.http.port = 0), "http.port", "not 0"),
        (
            check(&|c| c.http.admin_token = Some(Secret::new(""))),
            "http.admin_token",
            "empty",
        ),
        (
            check(&|c| c.http.admin_token = Some(Secret::new("a b"))),
            "http.admin_token",
            "whitespace",
        ),
        (
            check(&|c| c.snapshot.chunk_rows = 0),
            "snapshot.chunk_rows",
            "between 1",
        ),
        (
            check(&|c| c.monitor.lag_warn_bytes = c.monitor.lag_critical_bytes),
            "monitor.lag_warn_bytes",
            "below",
        ),
        (
            check(&|c| c.monitor.interval_secs = 0),
            "monitor.interval_secs",
            "at least",
        ),
        (
            check(&|c| c.streams.cdc = "C D C".into()),
            "streams.cdc",
            "whitespace",
        ),
        (
            check(&|c| c.streams.cdc = "cdc.stream".into()),
            "streams.cdc",
            "'.'",
        ),
        (
            check(&|c| c.streams.init = "INIT>".into()),
            "streams.init",
            "'>'",
        ),
        (
            check(&|c| c.streams.init = "I*".into()),
            "streams.init",
            "'*'",
        ),
        (
            check(&|c| c.streams.init = "CDC".into()),
            "streams.init",
            "differ",
        ),
        (
            check(&|c| c.streams.cdc_duplicate_window_secs = 0),
            "streams.cdc_duplicate_window_secs",
            "at least",
        ),
        (
            check(&|c| c.streams.cdc_max_age_secs = 60),
            "streams.cdc_duplicate_window_secs",
            "longer than",
        ),
        (
            check(&|c| c.streams.replicas = 0),
            "streams.replicas",
            "not between 1 and 5",
        ),
        (
            check(&|c| c.streams.replicas = 6),
            "streams.replicas",
            "not between 1 and 5",
        ),
        (
            check(&|c| c.nats.urls.clear()),
            "nats.urls",
            "no NATS server",
        ),
        (
            check(&|c| c.nats.urls = vec!["http://x:4222".into()]),
            "nats.urls",
            "scheme",
        ),
        (
            check(&|c| c.nats.urls = vec!["nats://:4222".into()]),
            "nats.urls",
            "no host",
        ),
        (
            check(&|c| c.nats.urls = vec!["nats://h:99999".into()]),
            "nats.urls",
            "port",
        ),
        (
            check(&|c| c.nats.user = Some("u".into())),
            "nats.password",
            "no password",
        ),
        (
            check(&|c| c.nats.password = Some(Secret::new("p"))),
            "nats.user",
            "no user",
        ),
        (
            check(&|c| {
                c.nats.token = Some(Secret::new("t"));
                c.nats.creds_file = Some("x.creds".into());
            }),
            "nats.token",
            "only one",
        ),
    ];
    for (config, field, needle) in cases {
        assert_eq!(invalid_field(&config), field, "{needle}");
        let msg = config.validate().unwrap_err().to_string();
        assert!(msg.contains(needle), "{field}: {msg}");
        assert!(msg.starts_with(&format!("invalid {field} (--")), "{msg}");
    }

    // Accepted edge cases.
    let edge = check(&|c| {
        c.replication.slot = "a".repeat(63);
        c.replication.tables = vec!["public.users".into(), "_t$1".into(), "ünïcode".into()];
        c.replication.ring_capacity = MIN_RING_CAPACITY;
        c.replication.id_namespace = Some(format!("Az09_-{}", "x".repeat(58)));
        c.streams.cdc_max_age_secs = 0;
        c.nats.urls = vec!["localhost".into(), "tls://[::1]:4222".into()];
        c.nats.user = Some("u".into());
        c.nats.password = Some(Secret::new("p"));
    });
    edge.validate().unwrap();
}

#[test]
fn secrets_never_print() {
    let c = toml_config(
        r#"
        [postgres]
        url = "postgres://u:pg-url-secret@h/db"
        password = "pg-secret"
        [nats]
        urls = ["nats://nu:nats-url-secret@n1:4222"]
        user = "nu"
        password = "nats-secret"
        [http]
        admin_token = "admin-secret"
        "#,
    )
    .unwrap();
    assert_eq!(c.postgres.password.as_ref().unwrap().expose(), "pg-secret");
    let shown = [
        format!("{c:?}"),
        format!("{c:#?}"),
        c.summary(),
        c.to_redacted_toml(),
    ];
    for text in shown {
        for secret in [
            "pg-secret",
            "pg-url-secret",
            "nats-secret",
            "nats-url-secret",
            "admin-secret",
        ] {
            assert!(!text.contains(secret), "{secret} leaked in {text}");
        }
        assert!(text.contains(REDACTED), "{text}");
    }
    assert!(c.summary().contains("admin_token=***"));
    assert!(c.to_redacted_toml().contains("nats://***@n1:4222"));
    assert_eq!(format!("{}", Secret::new("x")), REDACTED);
    assert_eq!(format!("{:?}", Some(Secret::new("x"))), "Some(***)");
    let raw: Overlay = toml::from_str("[postgres]\nurl = \"postgres://u:zz@h\"\n").unwrap();
    assert!(!format!("{raw:?}").contains("zz"));
    // An unquoted numeric secret is refused without quoting it back.
    for key in [
        "[postgres]\npassword",
        "[nats]\npassword",
        "[http]\nadmin_token",
    ] {
        let msg = toml_config(&format!("{key} = 987654321\n"))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("quoted string") && msg.contains("line 2"),
            "{msg}"
        );
        assert!(!msg.contains("987654321"), "{msg}");
    }
}

#[test]
fn redacted_toml_reads_back() {
    let mut c = Config::default();
    c.replication.tables = vec!["users".into()];
    c.http.admin_token = Some(Secret::new("tok"));
    let text = c.to_redacted_toml();
    let back = toml_config(&text).unwrap();
    assert_eq!(
        back.replication,
        ReplicationConfig {
            state_file: Some("pgbridge-cdc_slot.lsn".into()),
            spool_dir: Some("pgbridge-spool-cdc_slot".into()),
            ..c.replication.clone()
        }
    );
    assert_eq!(back.http.admin_token, Some(Secret::new(REDACTED)));
    assert_eq!(back.postgres, c.postgres);
}

#[test]
fn summary_line() {
    let s = Config::default().summary();
    assert!(!s.contains('\n'));
    for part in [
        "postgres=postgres@localhost:5432/postgres",
        "pg_password=none",
        "slot=cdc_slot",
        "publication=cdc_pub",
        "tables=all",
        "format=msgpack",
        "streams=CDC,INIT",
        "http=127.0.0.1:9090",
        "nats_tls=if-offered",
        "snapshot_reply_prefix=_INBOX.",
    ] {
        assert!(s.contains(part), "{part} missing in {s}");
    }
    assert!(
        s.starts_with("postgres=") && s.ends_with(" sink=nats"),
        "{s}"
    );
    assert!(!s.contains("kafka"), "{s}");
}

#[test]
fn summary_line_with_kafka_names_kafka_and_no_nats_setting() {
    let c = toml_config(
        "[replication]\nsink = \"kafka\"\n[kafka]\nbrokers = [\"k1:9092\", \"k2:9092\"]\n",
    )
    .unwrap();
    c.validate().unwrap();
    let s = c.summary();
    assert!(s.starts_with("postgres="), "{s}");
    assert!(s.contains(" sink=kafka "), "{s}");
    for part in [
        "kafka_brokers=k1:9092,k2:9092",
        "topic_prefix=cdc",
        "slot=cdc_slot",
    ] {
        assert!(s.contains(part), "{part} missing in {s}");
    }
    for nats in [
        "nats=",
        "nats_auth=",
        "streams=",
        "nats_tls=",
        "snapshot_reply_prefix=",
    ] {
        assert!(!s.contains(&format!(" {nats}")), "{nats} in {s}");
    }
}

#[test]
fn the_debezium_envelope_is_json() {
    let c = Config::default();
    assert_eq!(c.replication.envelope, replication::Envelope::Native);
    assert!(!c.replication.debezium_schemas);

    // Without a format it implies JSON.
    let c =
        toml_config("[replication]\nenvelope = \"debezium\"\ndebezium_schemas = true\n").unwrap();
    c.validate().unwrap();
    assert_eq!(c.replication.format, Format::Json);
    assert_eq!(c.replication.envelope, replication::Envelope::Debezium);
    assert!(c.replication.debezium_schemas);

    // A MessagePack format is refused rather than ignored.
    let c = toml_config("[replication]\nenvelope = \"debezium\"\nformat = \"msgpack\"\n").unwrap();
    assert_eq!(invalid_field(&c), "replication.format");
    let msg = c.validate().unwrap_err().to_string();
    assert!(msg.contains("--format json"), "{msg}");

    // Schemas belong to the Debezium envelope.
    let c = toml_config("[replication]\ndebezium_schemas = true\n").unwrap();
    assert_eq!(invalid_field(&c), "replication.debezium_schemas");
    assert!(toml_config("[replication]\nenvelope = \"avro\"\n").is_err());
}

#[test]
fn the_outbox_section_maps_debezium_columns_and_is_checked() {
    let config = toml_config(
        "[outbox]\ntables = [\"outbox\", \"sales.events\"]\naggregate_type_column = \"aggregatetype\"\n\
         aggregate_id_column = \"aggregateid\"\nevent_type_column = \"type\"\non_oversize = \"dlq\"\n",
    )
    .unwrap();
    assert_eq!(
        config.outbox.qualified_tables(),
        ["public.outbox", "sales.events"]
    );
    assert_eq!(config.outbox.aggregate_type_column, "aggregatetype");
    assert_eq!(config.outbox.id_column, "id");
    assert_eq!(config.outbox.on_oversize, OnOversize::Dlq);
    assert!(config.validate().is_ok());
    let twice = toml_config("[outbox]\ntables = [\"outbox\", \"public.outbox\"]\n").unwrap();
    assert_eq!(invalid_field(&twice), "outbox.tables");
    let empty = toml_config("[outbox]\npayload_column = \"\"\n").unwrap();
    assert_eq!(invalid_field(&empty), "outbox.payload_column");
    assert_eq!(Config::default().outbox.on_oversize, OnOversize::Stop);
}
