//! TLS and credentials against real servers: PostgreSQL with `ssl=on` and client certificates
//! required, nats-server with `tls { verify: true }`, and nats-server with an NKey user. The
//! certificates come from a CA generated at test time with the `openssl` command line.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use pgbridge::config::{NatsConfig, Secret};
use pgbridge::sink::nats as sink;
use testkit::{
    bridge_command, setup_app_db, wait_for, BridgeProcess, NatsServer, PgServer, TempDir, TestCerts,
};

const SCHEMA: &str = "CREATE TABLE users (id int PRIMARY KEY, name text)";
const WAIT: Duration = Duration::from_secs(60);

/// PostgreSQL with TLS on; `bridge_reader` may log in only over TLS with a client certificate
/// the CA signed for its name (`clientcert=verify-full`) and its password.
fn tls_postgres(certs: &TestCerts, dir: &Path) -> PgServer {
    let hba = dir.join("pg_hba.conf");
    std::fs::write(
        &hba,
        "local all all trust\n\
         hostssl all bridge_reader 127.0.0.1/32 scram-sha-256 clientcert=verify-full\n\
         host all postgres 127.0.0.1/32 scram-sha-256\n",
    )
    .unwrap();
    let (cert, key, ca) = (
        certs.file("server.pem"),
        certs.file("pg-server.key"),
        certs.file("ca.pem"),
    );
    let hba = hba.to_str().unwrap().to_owned();
    PgServer::start_with(&[
        ("ssl", "on"),
        ("ssl_cert_file", &cert),
        ("ssl_key_file", &key),
        ("ssl_ca_file", &ca),
        ("hba_file", &hba),
    ])
}

/// nats-server with JetStream and TLS that verifies client certificates.
fn tls_nats(certs: &TestCerts, dir: &Path) -> NatsServer {
    let conf = dir.join("tls.conf");
    std::fs::write(
        &conf,
        format!(
            "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n}}\n",
            certs.file("server.pem"),
            certs.file("server.key"),
            certs.file("ca.pem")
        ),
    )
    .unwrap();
    NatsServer::start_with_args(&["-c", conf.to_str().unwrap()])
}

/// Messages in `stream`, read through the bridge's own connect function with `config`.
fn stream_len(config: &NatsConfig, stream: &str) -> u64 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (client, _) = sink::connect(config, "pgbridge-test")
            .await
            .expect("test client connects");
        let js = async_nats::jetstream::new(client);
        match js.get_stream(stream).await {
            Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
            Err(_) => 0,
        }
    })
}

/// Runs the bridge until it exits, at most 30 s; its exit code (-1 when it was still running
/// and got killed) and its log.
fn run_to_end(cmd: &mut Command) -> (i32, String) {
    let mut bridge = BridgeProcess::spawn(cmd);
    for _ in 0..300 {
        if let Some(status) = bridge.child.try_wait().unwrap() {
            std::thread::sleep(Duration::from_millis(100));
            return (status.code().unwrap_or(-1), bridge.log());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    (-1, bridge.log())
}

#[test]
fn tls_with_client_certificates_to_both_servers() {
    let certs = TestCerts::generate();
    let conf_dir = TempDir::new("tlsconf");
    let pg = tls_postgres(&certs, conf_dir.path());
    setup_app_db(&pg, SCHEMA, "");
    let nats = tls_nats(&certs, conf_dir.path());
    let dir = TempDir::new("bridge");
    let tls_env = |cmd: &mut Command| {
        cmd.env("NATS_TLS_CA_FILE", certs.path("ca.pem"))
            .env("NATS_TLS_CERT_FILE", certs.path("client.pem"))
            .env("NATS_TLS_KEY_FILE", certs.path("client.key"));
    };

    let mut cmd = bridge_command(&pg, &nats.url(), dir.path());
    cmd.args(["--pg-sslmode", "verify-full", "--pg-sslrootcert"])
        .arg(certs.path("ca.pem"))
        .arg("--pg-sslcert")
        .arg(certs.path("client.pem"))
        .arg("--pg-sslkey")
        .arg(certs.path("client.key"));
    tls_env(&mut cmd);
    let mut bridge = BridgeProcess::spawn(&mut cmd);
    bridge.wait_for_line("streaming started", WAIT);
    // The bridge's sessions use TLS with its certificate.
    let rows = pg.sql(
        "app",
        "SELECT bool_and(s.ssl), min(s.client_dn), count(*) FROM pg_stat_ssl s \
         JOIN pg_stat_activity a USING (pid) WHERE a.usename = 'bridge_reader'",
    );
    assert_eq!(rows.rows[0][0].as_deref(), Some("t"), "{:?}", rows.rows);
    assert_eq!(
        rows.rows[0][1].as_deref(),
        Some("/CN=bridge_reader"),
        "{:?}",
        rows.rows
    );

    pg.sql("app", "INSERT INTO users VALUES (1, 'over tls')");
    let reader = NatsConfig {
        urls: vec![nats.url()],
        tls_ca_file: Some(certs.path("ca.pem")),
        tls_cert_file: Some(certs.path("client.pem")),
        tls_key_file: Some(certs.path("client.key")),
        ..NatsConfig::default()
    };
    wait_for("the change in the CDC stream", WAIT, || {
        (stream_len(&reader, "CDC") == 1).then_some(())
    });
    assert!(!bridge.log().contains("would travel unencrypted"));
    assert_eq!(bridge.terminate(WAIT), Some(0), "{}", bridge.log());

    // PostgreSQL: no sslmode configured, so libpq's own PGSSLMODE applies. `disable` meets
    // the hostssl-only rule for bridge_reader: refused, which shows it was passed through.
    let mut cmd = bridge_command(&pg, &nats.url(), dir.path());
    cmd.env("PGSSLMODE", "disable");
    tls_env(&mut cmd);
    let (code, err) = run_to_end(&mut cmd);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no encryption"), "{err}");

    // ... and PGSSLMODE, PGSSLROOTCERT, PGSSLCERT and PGSSLKEY alone are enough.
    let mut cmd = bridge_command(&pg, &nats.url(), dir.path());
    cmd.env("PGSSLMODE", "verify-full")
        .env("PGSSLROOTCERT", certs.path("ca.pem"))
        .env("PGSSLCERT", certs.path("client.pem"))
        .env("PGSSLKEY", certs.path("client.key"));
    tls_env(&mut cmd);
    let mut bridge = BridgeProcess::spawn(&mut cmd);
    bridge.wait_for_line("streaming started", WAIT);
    assert_eq!(bridge.terminate(WAIT), Some(0), "{}", bridge.log());

    // PostgreSQL with a CA that did not sign the server's certificate: like any failed
    // connection attempt, a warning naming the TLS failure, retried (the server's certificate
    // may be in the middle of a renewal).
    let mut cmd = bridge_command(&pg, &nats.url(), dir.path());
    cmd.args(["--pg-sslmode", "verify-full", "--pg-sslrootcert"])
        .arg(certs.path("other-ca.pem"))
        .arg("--pg-sslcert")
        .arg(certs.path("client.pem"))
        .arg("--pg-sslkey")
        .arg(certs.path("client.key"));
    tls_env(&mut cmd);
    let mut bridge = BridgeProcess::spawn(&mut cmd);
    let line = bridge.wait_for_line("reconnecting in", WAIT);
    assert!(
        line.contains("SSL error: certificate verify failed"),
        "{line}"
    );
    assert_eq!(bridge.terminate(WAIT), Some(0), "{}", bridge.log());

    // NATS with a CA that did not sign the server's certificate: a handshake failure, logged
    // naming TLS and the setting, and retried like an unreachable server.
    let mut cmd = bridge_command(&pg, &nats.url(), dir.path());
    cmd.args(["--pg-sslmode", "verify-full", "--pg-sslrootcert"])
        .arg(certs.path("ca.pem"))
        .arg("--pg-sslcert")
        .arg(certs.path("client.pem"))
        .arg("--pg-sslkey")
        .arg(certs.path("client.key"))
        .env("NATS_TLS_CA_FILE", certs.path("other-ca.pem"))
        .env("NATS_TLS_CERT_FILE", certs.path("client.pem"))
        .env("NATS_TLS_KEY_FILE", certs.path("client.key"));
    let mut bridge = BridgeProcess::spawn(&mut cmd);
    let line = bridge.wait_for_line("TLS with NATS", WAIT);
    assert!(line.contains("--nats-tls-ca-file"), "{line}");
    assert!(line.contains("retrying in"), "{line}");
    assert!(bridge.child.try_wait().unwrap().is_none(), "still retrying");
    assert_eq!(bridge.terminate(WAIT), Some(0), "{}", bridge.log());

    // NATS without a client certificate: the server refuses it.
    let mut cmd = bridge_command(&pg, &nats.url(), dir.path());
    cmd.args(["--pg-sslmode", "verify-full", "--pg-sslrootcert"])
        .arg(certs.path("ca.pem"))
        .arg("--pg-sslcert")
        .arg(certs.path("client.pem"))
        .arg("--pg-sslkey")
        .arg(certs.path("client.key"))
        .env("NATS_TLS_CA_FILE", certs.path("ca.pem"));
    let mut bridge = BridgeProcess::spawn(&mut cmd);
    let line = bridge.wait_for_line("TLS with NATS", WAIT);
    assert!(line.contains("CertificateRequired"), "{line}");
    assert!(line.contains("--nats-tls-cert-file"), "{line}");
    assert_eq!(bridge.terminate(WAIT), Some(0), "{}", bridge.log());
}

#[test]
fn nkey_seed_authenticates() {
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().unwrap();
    let conf_dir = TempDir::new("nkeyconf");
    let conf = conf_dir.path().join("nkey.conf");
    std::fs::write(
        &conf,
        format!(
            "authorization {{\n  users = [ {{ nkey: \"{}\" }} ]\n}}\n",
            user.public_key()
        ),
    )
    .unwrap();
    let nats = NatsServer::start_with_args(&["-c", conf.to_str().unwrap()]);
    let pg = PgServer::start();
    setup_app_db(&pg, SCHEMA, "");
    let dir = TempDir::new("bridge");

    let mut cmd = bridge_command(&pg, &nats.url(), dir.path());
    cmd.env("NATS_NKEY_SEED", &seed);
    let mut bridge = BridgeProcess::spawn(&mut cmd);
    bridge.wait_for_line("streaming started", WAIT);
    // A single server: the start warns that a host crash can cost acknowledged changes.
    let line = bridge.wait_for_line("has a single replica", WAIT);
    assert!(
        line.contains("WARN") && line.contains("sync_interval: always"),
        "{line}"
    );
    pg.sql("app", "INSERT INTO users VALUES (1, 'nkey')");
    let reader = NatsConfig {
        urls: vec![nats.url()],
        nkey_seed: Some(Secret::new(seed.clone())),
        ..NatsConfig::default()
    };
    wait_for("the change in the CDC stream", WAIT, || {
        (stream_len(&reader, "CDC") == 1).then_some(())
    });
    assert!(!bridge.log().contains(&seed), "seed logged");
    assert_eq!(bridge.terminate(WAIT), Some(0), "{}", bridge.log());

    // The seed from a file.
    let seed_file = conf_dir.path().join("bridge.nk");
    std::fs::write(&seed_file, format!("{seed}\n")).unwrap();
    let mut cmd = bridge_command(&pg, &nats.url(), dir.path());
    cmd.env("NATS_NKEY_FILE", &seed_file);
    let mut bridge = BridgeProcess::spawn(&mut cmd);
    bridge.wait_for_line("streaming started", WAIT);
    assert_eq!(bridge.terminate(WAIT), Some(0), "{}", bridge.log());

    // Another key: refused, exit 2, the seed not shown.
    let other = nkeys::KeyPair::new_user().seed().unwrap();
    let mut cmd = bridge_command(&pg, &nats.url(), dir.path());
    cmd.env("NATS_NKEY_SEED", &other);
    let (code, err) = run_to_end(&mut cmd);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("refused the bridge's credentials"), "{err}");
    assert!(!err.contains(&other), "{err}");
}
