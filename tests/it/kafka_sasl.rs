//! The Kafka sink on a broker that authenticates with SASL/PLAIN and authorizes with ACLs:
//! the bridge's librdkafka properties reach the broker, and a user the broker refuses stops
//! the bridge with one line and exit code 2, nothing confirmed (also with exactly-once
//! delivery).

use testkit::kafka::{KafkaServer, SASL_ADMIN};
use testkit::{bridge_command, confirmed_flush, setup_app_db, BridgeProcess, PgServer, TempDir};

use super::kafka::{wait_records, STEP};

/// The bridge into `kafka`'s SASL listener as `user` (name, password).
fn sasl_bridge(
    pg: &PgServer,
    kafka: &KafkaServer,
    dir: &TempDir,
    user: (&str, &str),
    extra: &[&str],
) -> BridgeProcess {
    BridgeProcess::spawn(
        bridge_command(pg, "nats://127.0.0.1:9", dir.path())
            .args(["--sink", "kafka", "--kafka-brokers", &kafka.sasl_brokers()])
            .args(["--format", "json"])
            .args(["--kafka-property", "security.protocol=SASL_PLAINTEXT"])
            .args(["--kafka-property", "sasl.mechanism=PLAIN"])
            .args(["--kafka-property", &format!("sasl.username={}", user.0)])
            .args(["--kafka-property", &format!("sasl.password={}", user.1)])
            .args(extra),
    )
}

/// Waits for the bridge to exit; asserts exit code 2 and that its last line says Kafka
/// refused the user for `why`.
fn assert_refused(bridge: &mut BridgeProcess, why: &str) {
    let deadline = std::time::Instant::now() + STEP;
    while bridge.child.try_wait().unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "still running after {STEP:?}:\n{}",
            bridge.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let code = bridge.wait_exit(STEP);
    let log = bridge.log();
    let last = log.lines().last().unwrap_or_default();
    assert!(
        code == Some(2)
            && last.contains("bridge: error: Kafka refused the bridge's user: ")
            && last.contains(why)
            && last.contains("check the SASL credentials"),
        "exit {code:?}:\n{log}"
    );
    assert!(
        !log.contains("alice-s3cret") && !log.contains("wrong-s3cret"),
        "{log}"
    );
}

#[test]
fn over_sasl_an_authorized_user_streams_and_a_refused_one_stops_with_one_line() {
    let pg = PgServer::start();
    setup_app_db(
        &pg,
        "CREATE TABLE users (id int PRIMARY KEY, name text)",
        "",
    );
    let kafka = KafkaServer::start_with_sasl(&[("alice", "alice-s3cret")]);

    // A wrong password: refused at start.
    let dir = TempDir::new("wrong");
    let mut wrong = sasl_bridge(&pg, &kafka, &dir, ("alice", "wrong-s3cret"), &[]);
    assert_refused(&mut wrong, "Authentication failed");

    // Authenticated, but without any ACL: the idempotent producer gets no producer id. The
    // change waits in the WAL; the bridge stops on it.
    let dir = TempDir::new("alice");
    let mut alice = sasl_bridge(&pg, &kafka, &dir, ("alice", "alice-s3cret"), &[]);
    alice.wait_for_line("streaming started", STEP);
    pg.sql("app", "INSERT INTO users VALUES (1, 'refused')");
    assert_refused(&mut alice, "Cluster authorization failed");
    // With --kafka-exactly-once it stops before the first change: the transactional
    // producer cannot start.
    let dir = TempDir::new("alice-eos");
    let mut eos = sasl_bridge(
        &pg,
        &kafka,
        &dir,
        ("alice", "alice-s3cret"),
        &["--kafka-exactly-once"],
    );
    assert_refused(&mut eos, "authorization failed");
    let confirmed = confirmed_flush(&pg, "cdc_slot").expect("the slot");

    // The super user: the same change arrives.
    let dir = TempDir::new("admin");
    let bridge = sasl_bridge(&pg, &kafka, &dir, SASL_ADMIN, &[]);
    bridge.wait_for_line("streaming started", STEP);
    let records = wait_records(&kafka, &bridge, "cdc.users", 1);
    assert_eq!(records.len(), 1, "{}", bridge.log());
    assert!(
        records[0]
            .value
            .as_deref()
            .is_some_and(|v| String::from_utf8_lossy(v).contains("refused")),
        "{:?}",
        records[0]
    );
    assert!(confirmed_flush(&pg, "cdc_slot").expect("the slot") >= confirmed);
}
