//! Scaling out as the README describes it: two bridges, each with its own slot and table set,
//! the same publication, one shared CDC stream. Every change is stored once, by the bridge of
//! its table, even when one transaction touches both sets.

use std::collections::BTreeSet;
use std::time::Duration;

use testkit::{
    bridge_command, read_stream, setup_app_db, stream_len, wait_for, BridgeProcess, TempDir,
    TestEnv,
};

const SCHEMA: &str = "CREATE TABLE users (id int PRIMARY KEY, name text); \
                      CREATE TABLE orders (id int PRIMARY KEY, total numeric)";

#[test]
fn two_bridges_split_one_publication_into_one_stream() {
    let env = TestEnv::start();
    setup_app_db(&env.pg, SCHEMA, "");
    let (dir_u, dir_o) = (TempDir::new("bridge"), TempDir::new("bridge"));
    let mut users = BridgeProcess::spawn(
        bridge_command(&env.pg, &env.nats.url(), dir_u.path()).args([
            "--slot",
            "cdc_users",
            "--table",
            "users",
        ]),
    );
    let mut orders = BridgeProcess::spawn(
        bridge_command(&env.pg, &env.nats.url(), dir_o.path()).args([
            "--slot",
            "cdc_orders",
            "--table",
            "orders",
        ]),
    );
    users.wait_for_line("streaming started", Duration::from_secs(60));
    orders.wait_for_line("streaming started", Duration::from_secs(60));

    // Mixed transactions: in each, the first change of one set and of the other would get
    // the same id if each bridge numbered only its own tables' changes.
    for i in 0..10 {
        env.pg.sql(
            "app",
            &format!(
                "BEGIN; INSERT INTO orders VALUES ({i}, 1.5); INSERT INTO users VALUES ({i}, 'u'); \
                 UPDATE orders SET total = 2 WHERE id = {i}; COMMIT"
            ),
        );
    }
    wait_for("30 changes", Duration::from_secs(60), || {
        (stream_len(&env.nats.url(), "CDC") >= 30).then_some(())
    });
    // Give a wrongly dropped or doubled message time to show.
    std::thread::sleep(Duration::from_millis(500));
    let msgs = read_stream(&env.nats.url(), "CDC");
    assert_eq!(msgs.len(), 30);
    let ids: BTreeSet<String> = msgs.iter().map(|m| m.msg_id.clone().unwrap()).collect();
    assert_eq!(ids.len(), 30, "message ids are unique across the bridges");
    let users_n = msgs
        .iter()
        .filter(|m| m.subject.starts_with("cdc.users."))
        .count();
    let orders_n = msgs
        .iter()
        .filter(|m| m.subject.starts_with("cdc.orders."))
        .count();
    assert_eq!((users_n, orders_n), (10, 20));

    assert_eq!(
        users.terminate(Duration::from_secs(60)),
        Some(0),
        "{}",
        users.log()
    );
    assert_eq!(
        orders.terminate(Duration::from_secs(60)),
        Some(0),
        "{}",
        orders.log()
    );
    assert!(
        users.log().contains("published=10 duplicates=0"),
        "{}",
        users.log()
    );
    assert!(
        orders.log().contains("published=20 duplicates=0"),
        "{}",
        orders.log()
    );
}
