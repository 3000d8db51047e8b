//! The test harness itself: servers start on loopback, are configured for logical
//! replication, and are gone (process and directory) after drop, also on panic.

use std::path::PathBuf;
use std::time::Duration;

use testkit::{NatsServer, PgServer, StopMode, TestEnv};

fn pid_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

fn postmaster_pid(pg: &PgServer) -> u32 {
    pg.sql("postgres", "SELECT pg_backend_pid()"); // server answers
    let r = pg.sql(
        "postgres",
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'",
    );
    r.rows[0][0].as_ref().unwrap().parse().unwrap()
}

#[test]
fn servers_start_configured_and_clean_up() {
    let env = TestEnv::start();
    let r = env.pg.sql("postgres", "SHOW wal_level");
    assert_eq!(r.rows[0][0].as_deref(), Some("logical"));
    let r = env.pg.sql("postgres", "SELECT inet_server_addr()::text");
    assert_eq!(r.rows[0][0].as_deref(), Some("127.0.0.1/32"));
    assert!(env.nats.port() != env.pg.port());

    let checkpointer = postmaster_pid(&env.pg);
    let dirs: Vec<PathBuf> = vec![env.pg.dir().to_path_buf(), env.nats.dir().to_path_buf()];
    assert!(dirs.iter().all(|d| d.exists()));
    drop(env);
    testkit::wait_for(
        "postgres processes to exit",
        Duration::from_secs(20),
        || (!pid_alive(checkpointer)).then_some(()),
    );
    for d in dirs {
        assert!(!d.exists(), "{} left behind", d.display());
    }
}

#[test]
fn wrong_password_is_refused() {
    let pg = PgServer::start();
    let mut params = pg.params("postgres");
    for (k, v) in params.iter_mut() {
        if *k == "password" {
            *v = "wrong".into();
        }
    }
    let refs: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let err = pgbridge::pg::conn::PgConnection::connect(
        &refs,
        pgbridge::pg::conn::ConnectionKind::Normal,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("password authentication failed"),
        "{err}"
    );
}

#[test]
fn postgres_restarts_with_its_data() {
    let mut pg = PgServer::start();
    pg.sql(
        "postgres",
        "CREATE TABLE kept (id int); INSERT INTO kept VALUES (42)",
    );
    pg.stop(StopMode::Fast);
    pg.start_again();
    let r = pg.sql("postgres", "SELECT id FROM kept");
    assert_eq!(r.rows[0][0].as_deref(), Some("42"));
    pg.stop(StopMode::Immediate);
    pg.start_again();
    assert_eq!(
        pg.sql("postgres", "SELECT count(*) FROM kept").rows[0][0].as_deref(),
        Some("1")
    );
}

#[test]
fn nats_restarts_on_same_port() {
    let mut nats = NatsServer::start();
    let port = nats.port();
    nats.stop();
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    nats.start_again();
    assert_eq!(nats.port(), port);
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
}

#[test]
fn panicking_test_still_cleans_up() {
    let result = std::panic::catch_unwind(|| {
        let pg = PgServer::start();
        let pid = postmaster_pid(&pg);
        std::panic::panic_any(pid);
    });
    let pid = *result.unwrap_err().downcast::<u32>().unwrap();
    testkit::wait_for(
        "postgres to exit after panic",
        Duration::from_secs(20),
        || (!pid_alive(pid)).then_some(()),
    );
}
