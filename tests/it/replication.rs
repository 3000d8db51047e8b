//! The replication connection against a real PostgreSQL: slot creation, START_REPLICATION,
//! decoding a transaction from the walsender, answering keepalives so the walsender does not
//! time out, moving the slot with status updates, and a consistent snapshot COPY.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use pgbridge::pg::conn::{sqlstate, ConnectionKind, PgConnection};
use pgbridge::pg::framing::{parse_copy_data, ReplicationMessage};
use pgbridge::pg::pgoutput::{Cell, Decoder, LogicalMessage};
use pgbridge::pg::replication::{PgOutputOptions, ReplicationConnection, SnapshotAction};
use pgbridge::pg::Lsn;
use testkit::{confirmed_flush, wait_for, PgServer};

fn replication(pg: &PgServer, db: &str) -> ReplicationConnection {
    let params = pg.params(db);
    let refs: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
    ReplicationConnection::connect(&refs).expect("replication connection")
}

/// What the loop saw, in order: one short line per pgoutput message.
fn describe(msg: &LogicalMessage<'_>) -> String {
    let cells = |t: &pgbridge::pg::pgoutput::TupleData<'_>| {
        t.iter()
            .map(|c| match c {
                Cell::Null => "null".to_string(),
                Cell::Unchanged => "unchanged".to_string(),
                Cell::Text(b) | Cell::Binary(b) => String::from_utf8_lossy(b).into_owned(),
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    match msg {
        LogicalMessage::Begin(_) => "B".into(),
        LogicalMessage::Relation(r) => format!("R {}.{}", r.namespace, r.name),
        LogicalMessage::Insert(i) => format!("I {}", cells(&i.new)),
        LogicalMessage::Commit(_) => "C".into(),
        other => format!("{}", other.tag() as char),
    }
}

#[test]
fn streams_a_transaction_and_answers_keepalives() {
    // A short sender timeout: a client that ignores reply requests is cut off after 2 s.
    let pg = PgServer::start_with(&[("wal_sender_timeout", "2s")]);
    pg.sql(
        "postgres",
        "CREATE TABLE t (id int PRIMARY KEY, name text); CREATE PUBLICATION pub FOR TABLE t",
    );

    let mut repl = replication(&pg, "postgres");
    let id = repl.identify_system().unwrap();
    assert_eq!(id.dbname.as_deref(), Some("postgres"));
    assert_eq!(id.timeline, 1);
    let slot = repl
        .create_slot("it_slot", false, SnapshotAction::Nothing)
        .unwrap();
    assert_eq!(slot.slot_name, "it_slot");
    assert!(slot.consistent_point >= id.xlogpos);
    assert_eq!(confirmed_flush(&pg, "it_slot"), Some(slot.consistent_point));

    let options = PgOutputOptions::for_server(repl.server_version(), vec!["pub".into()]);
    repl.start_logical("it_slot", Lsn::INVALID, &options)
        .unwrap();
    pg.sql("postgres", "INSERT INTO t VALUES (1, 'one'), (2, NULL)");

    let mut decoder = Decoder::new();
    let mut seen = Vec::new();
    let mut commit_end = None;
    let mut last_received = Lsn::INVALID;
    let mut reply_requests = 0;
    let mut second_sent = false;
    let started = Instant::now();
    // Run well past two sender timeouts: only answered keepalives keep the stream alive.
    while started.elapsed() < Duration::from_secs(30) {
        let Some(buf) = repl.recv(Duration::from_millis(200)).unwrap() else {
            continue;
        };
        match parse_copy_data(&buf).unwrap() {
            ReplicationMessage::XLogData(x) => {
                last_received = last_received.max(x.wal_end);
                let msg = decoder.decode(x.data).unwrap();
                seen.push(describe(&msg));
                if let LogicalMessage::Commit(c) = msg {
                    commit_end = Some(c.end_lsn);
                    // Durable downstream: acknowledge the transaction's end.
                    repl.send_status(last_received, c.end_lsn, c.end_lsn, false)
                        .unwrap();
                    if second_sent {
                        break;
                    }
                }
            }
            ReplicationMessage::Keepalive(k) => {
                last_received = last_received.max(k.wal_end);
                if k.reply_requested {
                    reply_requests += 1;
                    let flush = commit_end.unwrap_or(Lsn::INVALID);
                    repl.send_status(last_received, flush, flush, false)
                        .unwrap();
                }
            }
        }
        // After surviving more than two timeouts, a second transaction must still arrive.
        if !second_sent && commit_end.is_some() && started.elapsed() > Duration::from_secs(5) {
            pg.sql("postgres", "INSERT INTO t VALUES (3, 'three')");
            second_sent = true;
        }
    }
    assert!(reply_requests >= 1, "the server never asked for a reply");
    assert_eq!(
        seen,
        vec![
            "B",
            "R public.t",
            "I 1,one",
            "I 2,null",
            "C",
            "B",
            "I 3,three",
            "C"
        ],
        "messages received"
    );
    let end = commit_end.unwrap();
    wait_for(
        "confirmed_flush_lsn to move",
        Duration::from_secs(10),
        || (confirmed_flush(&pg, "it_slot") == Some(end)).then_some(()),
    );

    repl.stop(Duration::from_secs(10)).unwrap();
}

#[test]
fn second_consumer_on_an_active_slot_is_refused_with_object_in_use() {
    let pg = PgServer::start();
    pg.sql("postgres", "CREATE PUBLICATION pub FOR ALL TABLES");
    let mut first = replication(&pg, "postgres");
    first
        .create_slot("busy", false, SnapshotAction::Nothing)
        .unwrap();
    let options = PgOutputOptions::for_server(first.server_version(), vec!["pub".into()]);
    first.start_logical("busy", Lsn::INVALID, &options).unwrap();

    let mut second = replication(&pg, "postgres");
    let err = second
        .start_logical("busy", Lsn::INVALID, &options)
        .unwrap_err();
    assert_eq!(err.sqlstate(), Some(sqlstate::OBJECT_IN_USE), "{err}");
    assert!(err.to_string().contains("is active for PID"), "{err}");

    let mut again = replication(&pg, "postgres");
    let err = again
        .create_slot("busy", false, SnapshotAction::Nothing)
        .unwrap_err();
    assert_eq!(err.sqlstate(), Some(sqlstate::DUPLICATE_OBJECT), "{err}");
}

#[test]
fn missing_publication_is_reported_by_the_stream() {
    let pg = PgServer::start();
    pg.sql("postgres", "CREATE TABLE t (id int PRIMARY KEY)");
    let mut repl = replication(&pg, "postgres");
    repl.create_slot("nopub", false, SnapshotAction::Nothing)
        .unwrap();
    let options = PgOutputOptions::for_server(repl.server_version(), vec!["nosuch".into()]);
    repl.start_logical("nopub", Lsn::INVALID, &options).unwrap();
    pg.sql("postgres", "INSERT INTO t VALUES (1)");
    if pg.major_version() >= 18 {
        // PostgreSQL 18 skips a publication that does not exist (a WARNING in its log) and
        // streams on: nothing arrives for the row, and no error.
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Some(buf) = repl.recv(Duration::from_millis(200)).unwrap() {
                assert_ne!(buf[0], b'w', "a change of no publication was sent");
            }
        }
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let err = loop {
        assert!(Instant::now() < deadline, "no error from the walsender");
        match repl.recv(Duration::from_millis(200)) {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert_eq!(err.sqlstate(), Some(sqlstate::UNDEFINED_OBJECT), "{err}");
    assert!(
        err.to_string()
            .contains("publication \"nosuch\" does not exist"),
        "{err}"
    );
}

#[test]
fn snapshot_copy_lines_up_with_the_temporary_slot() {
    let pg = PgServer::start();
    pg.sql(
        "postgres",
        "CREATE TABLE s (id int PRIMARY KEY, v text); \
         INSERT INTO s SELECT g, 'row ' || g FROM generate_series(1, 2500) g; \
         CREATE PUBLICATION pub FOR TABLE s",
    );
    let mut repl = replication(&pg, "postgres");
    repl.connection()
        .execute("BEGIN READ ONLY ISOLATION LEVEL REPEATABLE READ")
        .unwrap();
    let slot = repl
        .create_slot("snap_tmp", true, SnapshotAction::Use)
        .unwrap();
    // Committed after the slot's consistent point: not in the snapshot.
    pg.sql("postgres", "INSERT INTO s VALUES (9999, 'late')");

    let mut rows = Vec::new();
    let n = repl
        .connection()
        .copy_out("COPY (SELECT id, v FROM s ORDER BY id) TO STDOUT", |row| {
            rows.push(String::from_utf8(row.to_vec()).unwrap());
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(n, 2500);
    assert_eq!(rows.len(), 2500);
    assert_eq!(rows[0], "1\trow 1\n");
    assert!(!rows.iter().any(|r| r.starts_with("9999\t")));

    repl.connection().execute("COMMIT").unwrap();

    // The late row is exactly what streaming from the consistent point yields.
    let options = PgOutputOptions::for_server(repl.server_version(), vec!["pub".into()]);
    repl.start_logical("snap_tmp", slot.consistent_point, &options)
        .unwrap();
    let mut decoder = Decoder::new();
    let mut inserted = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while inserted.is_empty() && Instant::now() < deadline {
        if let Some(buf) = repl.recv(Duration::from_millis(200)).unwrap() {
            if let ReplicationMessage::XLogData(x) = parse_copy_data(&buf).unwrap() {
                if let LogicalMessage::Insert(i) = decoder.decode(x.data).unwrap() {
                    inserted.push(describe(&LogicalMessage::Insert(i)));
                }
            }
        }
    }
    assert_eq!(inserted, vec!["I 9999,late"]);
}

#[test]
fn normal_connection_queries_with_parameters() {
    let pg = PgServer::start();
    let mut c = pg.connect("postgres");
    assert_eq!(c.kind(), ConnectionKind::Normal);
    let r = c
        .query_params(
            "SELECT $1::int + 1 AS n, $2::text AS s, NULL AS z",
            &["41", "it's"],
        )
        .unwrap();
    assert_eq!(r.get(0, "n"), Some("42"));
    assert_eq!(r.get(0, "s"), Some("it's"));
    assert_eq!(r.get(0, "z"), None);
    let err = c.query("SELECT * FROM nosuch").unwrap_err();
    assert_eq!(err.sqlstate(), Some("42P01"));
    assert!(!err.is_connection_problem());
    // Session settings that make text output deterministic.
    let r = c
        .query("SELECT current_setting('TimeZone') tz, current_setting('DateStyle') ds, current_setting('extra_float_digits') efd, current_setting('client_encoding') enc")
        .unwrap();
    assert_eq!(r.get(0, "tz"), Some("UTC"));
    assert_eq!(r.get(0, "ds"), Some("ISO, MDY"));
    assert_eq!(r.get(0, "efd"), Some("3"));
    assert_eq!(r.get(0, "enc"), Some("UTF8"));
    // Stopping early cancels the COPY and leaves the connection usable.
    let mut taken = 0;
    c.copy_out(
        "COPY (SELECT g FROM generate_series(1, 5000000) g) TO STDOUT",
        |_| {
            taken += 1;
            if taken == 10 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        },
    )
    .unwrap();
    assert_eq!(taken, 10);
    assert_eq!(c.query("SELECT 1 AS one").unwrap().get(0, "one"), Some("1"));
    let _: PgConnection = c;
}
