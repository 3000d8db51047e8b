//! Decoder tests: every message captured from PostgreSQL 15 (`tests/vectors`), checked
//! against the workload in the matching `.sql` file, plus hand-built edge cases.

use std::collections::HashMap;

use super::test_vectors::{self, load, unhex, Vector};
use super::*;
use crate::pg::Lsn;

const N: Cell<'static> = Cell::Null;
const U: Cell<'static> = Cell::Unchanged;

fn t(s: &str) -> Cell<'_> {
    Cell::Text(s.as_bytes())
}

fn cells<'a>(tuple: &TupleData<'a>) -> Vec<Cell<'a>> {
    tuple.iter().collect()
}

/// Decodes a whole capture through one decoder, as the replication loop would.
fn decode_all(vectors: &[Vector]) -> Vec<LogicalMessage<'_>> {
    let mut d = Decoder::new();
    let msgs = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            d.decode(&v.bytes)
                .unwrap_or_else(|e| panic!("message {i} ({}): {e}", v.lsn))
        })
        .collect();
    assert!(!d.in_stream(), "capture ends inside a stream block");
    msgs
}

/// The message tags as a string, e.g. `"BRIIC"`.
fn tags(msgs: &[LogicalMessage<'_>]) -> String {
    msgs.iter().map(|m| char::from(m.tag())).collect()
}

/// Unwraps one variant of [`LogicalMessage`] or fails the test.
macro_rules! variant {
    ($msg:expr, $v:ident) => {
        match &$msg {
            LogicalMessage::$v(x) => x,
            other => panic!("expected {}, got {other:?}", stringify!($v)),
        }
    };
}

fn col_names<'a>(r: &Relation<'a>) -> Vec<&'a str> {
    r.columns.iter().map(|c| c.name).collect()
}

fn col_types(r: &Relation<'_>) -> Vec<u32> {
    r.columns.iter().map(|c| c.type_oid).collect()
}

fn col_keys(r: &Relation<'_>) -> Vec<bool> {
    r.columns.iter().map(Column::is_key).collect()
}

/// The first normal transaction id; lower ones are reserved (invalid, bootstrap, frozen).
const FIRST_NORMAL_XID: u32 = 3;

/// Checks a Begin..Commit pair against the capture's own columns, which come from the server
/// independently of the message bytes: every line of the transaction carries Begin's xid,
/// their LSNs run in WAL order up to the commit record at Begin's final LSN, and the Commit
/// line's LSN is the transaction's end.
fn check_txn(vs: &[Vector], msgs: &[LogicalMessage<'_>], begin: usize, commit: usize) {
    let b = variant!(msgs[begin], Begin);
    let c = variant!(msgs[commit], Commit);
    assert!(b.xid >= FIRST_NORMAL_XID, "xid {}", b.xid);
    for (i, v) in vs.iter().enumerate().take(commit + 1).skip(begin) {
        assert_eq!(v.xid, b.xid, "xid column of line {i}");
    }
    for (i, w) in vs[begin..commit].windows(2).enumerate() {
        assert!(
            w[0].lsn <= w[1].lsn,
            "LSN column goes back at line {}",
            begin + i + 1
        );
    }
    assert!(
        vs[begin..commit].iter().all(|v| v.lsn <= b.final_lsn),
        "a change after the commit record at {}",
        b.final_lsn
    );
    assert_eq!(c.commit_lsn, b.final_lsn, "commit_lsn == final_lsn");
    assert!(c.commit_lsn < c.end_lsn);
    assert_eq!(
        c.end_lsn, vs[commit].lsn,
        "end_lsn is the commit line's LSN"
    );
    assert_eq!(c.commit_time, b.commit_time);
    // Captured in the 2020s; checks the epoch and the field offsets at once.
    let unix = pg_to_unix_micros(c.commit_time);
    assert!(
        (1_577_836_800_000_000..4_102_444_800_000_000).contains(&unix),
        "{unix}"
    );
}

#[test]
fn basic_transaction() {
    let vs = load(test_vectors::BASIC);
    let m = decode_all(&vs);
    assert_eq!(tags(&m), "BRIIC");
    check_txn(&vs, &m, 0, 4);

    let r = variant!(m[1], Relation);
    assert_eq!(r.xid, None);
    assert_eq!((r.namespace, r.name), ("public", "t"));
    assert_eq!(r.replica_identity, ReplicaIdentity::Default);
    assert_eq!(col_names(r), ["id", "name", "big", "note"]);
    assert_eq!(col_types(r), [23, 25, 25, 25]);
    assert_eq!(col_keys(r), [true, false, false, false]);
    assert!(r.columns.iter().all(|c| c.type_modifier == -1));

    let i1 = variant!(m[2], Insert);
    assert_eq!((i1.xid, i1.relid), (None, r.relid));
    assert_eq!(cells(&i1.new), [t("1"), t("a"), N, t("x")]);
    let i2 = variant!(m[3], Insert);
    assert_eq!(i2.relid, r.relid);
    assert_eq!(cells(&i2.new), [t("2"), t("b"), t("c"), N]);
}

#[test]
fn update_delete_replica_identity_default_and_full() {
    let vs = load(test_vectors::REPLICA_IDENTITY);
    let m = decode_all(&vs);
    assert_eq!(tags(&m), "BRUCBRUCBDCBDC");
    for (b, c) in [(0, 3), (4, 7), (8, 10), (11, 13)] {
        check_txn(&vs, &m, b, c);
    }

    // d: REPLICA IDENTITY DEFAULT. A non-key update sends no old tuple.
    let d = variant!(m[1], Relation);
    assert_eq!(d.name, "d");
    assert_eq!(d.replica_identity, ReplicaIdentity::Default);
    assert_eq!(col_keys(d), [true, false, false]);
    let u = variant!(m[2], Update);
    assert_eq!(u.relid, d.relid);
    assert_eq!(u.old, None);
    assert_eq!(cells(&u.new), [t("1"), t("uno"), t("10")]);

    // f: REPLICA IDENTITY FULL. The old row comes whole, and every column is "key".
    let f = variant!(m[5], Relation);
    assert_eq!(f.name, "f");
    assert_eq!(f.replica_identity, ReplicaIdentity::Full);
    assert_eq!(col_keys(f), [true, true, true]);
    let u = variant!(m[6], Update);
    assert_eq!(u.relid, f.relid);
    let Some(OldTuple::Full(old)) = u.old else {
        panic!("expected an 'O' old tuple, got {:?}", u.old)
    };
    assert_eq!(cells(&old), [t("1"), t("one"), t("10")]);
    assert_eq!(cells(&u.new), [t("1"), t("uno"), t("10")]);

    // DELETE under DEFAULT: a 'K' tuple, full width, non-key columns NULL.
    let del = variant!(m[9], Delete);
    assert_eq!(del.relid, d.relid);
    assert!(del.old.is_key());
    assert_eq!(del.old.tuple().len(), d.columns.len());
    assert_eq!(cells(&del.old.tuple()), [t("2"), N, N]);

    // DELETE under FULL: an 'O' tuple with every value.
    let del = variant!(m[12], Delete);
    assert_eq!(del.relid, f.relid);
    assert!(matches!(del.old, OldTuple::Full(_)));
    assert_eq!(cells(&del.old.tuple()), [t("2"), t("two"), t("20")]);
}

#[test]
fn primary_key_change_sends_old_key() {
    let vs = load(test_vectors::PK_CHANGE);
    let m = decode_all(&vs);
    assert_eq!(tags(&m), "BRUCBUC");
    check_txn(&vs, &m, 0, 3);
    check_txn(&vs, &m, 4, 6);

    let r = variant!(m[1], Relation);
    assert_eq!(col_names(r), ["a", "b", "v"]);
    assert_eq!(col_keys(r), [true, true, false]);

    // UPDATE p SET a = 2 WHERE a = 1
    let u = variant!(m[2], Update);
    let Some(OldTuple::Key(old)) = u.old else {
        panic!("expected a 'K' old tuple, got {:?}", u.old)
    };
    assert_eq!(cells(&old), [t("1"), t("k"), N]);
    assert_eq!(cells(&u.new), [t("2"), t("k"), t("val")]);

    // UPDATE p SET b = 'k2', v = 'val2' WHERE a = 2
    let u = variant!(m[5], Update);
    let Some(OldTuple::Key(old)) = u.old else {
        panic!("expected a 'K' old tuple, got {:?}", u.old)
    };
    assert_eq!(cells(&old), [t("2"), t("k"), N]);
    assert_eq!(cells(&u.new), [t("2"), t("k2"), t("val2")]);
}

#[test]
fn unchanged_toast_values() {
    let vs = load(test_vectors::TOAST);
    let m = decode_all(&vs);
    assert_eq!(tags(&m), "BRICBUCBRUCBDC");
    for (b, c) in [(0, 3), (4, 6), (7, 10), (11, 13)] {
        check_txn(&vs, &m, b, c);
    }
    let big = "x".repeat(3000);

    let r = variant!(m[1], Relation);
    assert_eq!(col_names(r), ["id", "small", "big"]);
    let i = variant!(m[2], Insert);
    assert_eq!(cells(&i.new), [t("1"), t("s1"), t(&big)]);

    // DEFAULT identity: the untouched TOASTed column is not sent.
    let u = variant!(m[5], Update);
    assert_eq!(u.old, None);
    assert_eq!(cells(&u.new), [t("1"), t("s2"), U]);
    assert!(u.new.get(2).is_some_and(|c| c.is_unchanged()));

    // FULL identity: Relation re-sent; the old tuple is flattened, the new one still 'u'.
    let r = variant!(m[8], Relation);
    assert_eq!(r.replica_identity, ReplicaIdentity::Full);
    let u = variant!(m[9], Update);
    let Some(OldTuple::Full(old)) = u.old else {
        panic!("expected an 'O' old tuple, got {:?}", u.old)
    };
    assert_eq!(cells(&old), [t("1"), t("s2"), t(&big)]);
    assert_eq!(
        old.get(2).and_then(|c| c.bytes()).map(<[u8]>::len),
        Some(3000)
    );
    assert_eq!(cells(&u.new), [t("1"), t("s3"), U]);

    let d = variant!(m[12], Delete);
    assert!(matches!(d.old, OldTuple::Full(_)));
    assert_eq!(cells(&d.old.tuple()), [t("1"), t("s3"), t(&big)]);
}

#[test]
fn truncate_flags_and_relids() {
    let vs = load(test_vectors::TRUNCATE);
    let m = decode_all(&vs);
    assert_eq!(tags(&m), "BRRTCBRTC");
    check_txn(&vs, &m, 0, 4);
    check_txn(&vs, &m, 5, 8);

    let a = variant!(m[1], Relation);
    let b = variant!(m[2], Relation);
    assert_eq!((a.name, b.name), ("a", "b"));

    // TRUNCATE a, b
    let tr = variant!(m[3], Truncate);
    assert_eq!(tr.xid, None);
    assert_eq!(tr.relids, [a.relid, b.relid]);
    assert_eq!(tr.flags, 0);
    assert!(!tr.cascade() && !tr.restart_identity());

    // TRUNCATE a RESTART IDENTITY CASCADE
    assert_eq!(variant!(m[6], Relation).relid, a.relid);
    let tr = variant!(m[7], Truncate);
    assert_eq!(tr.relids, [a.relid]);
    assert_eq!(tr.flags, Truncate::CASCADE | Truncate::RESTART_IDENTITY);
    assert!(tr.cascade() && tr.restart_identity());
}

#[test]
fn logical_decoding_messages() {
    let vs = load(test_vectors::MESSAGE);
    let m = decode_all(&vs);
    assert_eq!(tags(&m), "BRIMCM");
    check_txn(&vs, &m, 0, 4);

    // pg_logical_emit_message(true, 'pfx', 'hello') inside the transaction.
    let tx = variant!(m[3], Message);
    assert_eq!(tx.xid, None);
    assert_eq!(tx.flags, Message::TRANSACTIONAL);
    assert!(tx.transactional());
    assert_eq!(tx.prefix, "pfx");
    assert_eq!(tx.content, b"hello");
    assert_eq!(tx.lsn, vs[3].lsn);

    // pg_logical_emit_message(false, 'pfx', 'nontx'): on its own, no transaction.
    let ntx = variant!(m[5], Message);
    assert_eq!(ntx.flags, 0);
    assert!(!ntx.transactional());
    assert_eq!(ntx.prefix, "pfx");
    assert_eq!(ntx.content, b"nontx");
    assert_eq!(ntx.lsn, vs[5].lsn);
    assert_eq!(vs[5].xid, 0);
}

#[test]
fn nulls() {
    let vs = load(test_vectors::NULLS);
    let m = decode_all(&vs);
    assert_eq!(tags(&m), "BRICBUC");
    check_txn(&vs, &m, 0, 3);
    check_txn(&vs, &m, 4, 6);

    let r = variant!(m[1], Relation);
    assert_eq!(col_names(r), ["id", "i", "t", "b", "f", "by", "arr", "ts"]);
    assert_eq!(col_types(r), [23, 23, 25, 16, 701, 17, 1007, 1184]);

    // INSERT INTO n (id) VALUES (1)
    let i = variant!(m[2], Insert);
    assert_eq!(cells(&i.new), [t("1"), N, N, N, N, N, N, N]);
    assert!(i.new.iter().skip(1).all(|c| c.is_null()));

    // UPDATE n SET t = 'set', i = NULL WHERE id = 1
    let u = variant!(m[5], Update);
    assert_eq!(u.old, None);
    assert_eq!(cells(&u.new), [t("1"), N, t("set"), N, N, N, N, N]);
}

#[test]
fn types_enum_domain_and_text_values() {
    let vs = load(test_vectors::TYPES);
    let m = decode_all(&vs);
    assert_eq!(tags(&m), "BYYRICBICBIC");
    check_txn(&vs, &m, 0, 5);
    check_txn(&vs, &m, 6, 8);
    check_txn(&vs, &m, 9, 11);

    // CREATE TYPE mood AS ENUM: named as itself.
    let mood = variant!(m[1], Type);
    assert_eq!(
        (mood.xid, mood.namespace, mood.name),
        (None, "public", "mood")
    );
    // CREATE DOMAIN posint AS int: the domain's OID, but the base type's name.
    let posint = variant!(m[2], Type);
    assert_eq!((posint.namespace, posint.name), ("", "int4"));
    assert_ne!(mood.oid, posint.oid);

    let r = variant!(m[3], Relation);
    assert_eq!((r.namespace, r.name), ("public", "ty"));
    assert_eq!(r.columns.len(), 35);
    #[rustfmt::skip]
    let expected: [(&str, u32, i32); 35] = [
        ("id", 23, -1), ("i2", 21, -1), ("i4", 23, -1), ("i8", 20, -1), ("o", 26, -1),
        ("f4", 700, -1), ("f8", 701, -1), ("b", 16, -1), ("by", 17, -1), ("tx", 25, -1),
        ("vc", 1043, 24), ("ch", 1042, 7), ("nu", 1700, -1), ("d", 1082, -1),
        ("tm", 1083, -1), ("tt", 1266, -1), ("ts", 1114, -1), ("tz", 1184, -1),
        ("iv", 1186, -1), ("u", 2950, -1), ("j", 114, -1), ("jb", 3802, -1),
        ("ai4", 1007, -1), ("ai8", 1016, -1), ("ai2", 1005, -1), ("af8", 1022, -1),
        ("af4", 1021, -1), ("ab", 1000, -1), ("aby", 1001, -1), ("atx", 1009, -1),
        ("avc", 1015, -1), ("a2d", 1007, -1), ("anu", 1231, -1),
        ("mo", mood.oid, -1), ("pi", posint.oid, -1),
    ];
    let got: Vec<_> = r
        .columns
        .iter()
        .map(|c| (c.name, c.type_oid, c.type_modifier))
        .collect();
    assert_eq!(got, expected);
    assert_eq!(col_keys(r).iter().filter(|&&k| k).count(), 1);

    let s = |v: &'static str| Some(v);
    #[rustfmt::skip]
    let rows: [[Option<&str>; 35]; 3] = [
        [
            s("1"), s("-32768"), s("-2147483648"), s("-9223372036854775808"), s("0"),
            s("NaN"), s("-Infinity"),
            s("t"), s(r"\x00"), s("plain"), s("v"), s("ab "),
            s("0"), s("2025-12-10"), s("00:00:00"), s("10:30:00+02"),
            s("2025-12-10 10:30:00.123456"), s("2025-12-10 10:30:00.123456+00"),
            s("1 year 2 mons 3 days 04:05:06.789"),
            s("00000000-0000-0000-0000-000000000000"), s(r#"{"a": [1, 2]}"#),
            s(r#"{"a": 1, "b": null}"#),
            s("{}"), s("{9223372036854775807,-9223372036854775808}"), s("{1,NULL,3}"),
            s("{NaN,Infinity,-Infinity,1.5}"), s("{0.1}"), s("{t,f,NULL}"),
            s(r#"{"\\x00ff",NULL}"#), s(r#"{"a,b","c\"d",NULL,"NULL","",é}"#), s(r#"{x,"y z"}"#),
            s("{{1,2},{3,4}}"), s("{1.10,NaN}"),
            s("happy"), s("7"),
        ],
        [
            s("2"), s("32767"), s("2147483647"), s("9223372036854775807"), s("4294967295"),
            s("Infinity"), s("1.7976931348623157e+308"),
            s("f"), s(r"\x000102ff00"), s(r#"héllo ✓ 😀 "quoted" back\slash"#), s(""), s("   "),
            s("-123456789012345678901234567890.123456789"), s("0001-01-01 BC"), s("24:00:00"),
            s("23:59:59.999999-12"), s("infinity"), s("-infinity"), s("-1 days -00:00:01"),
            s("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"), s("[]"), s("{}"),
            s("{}"), s("{}"), s("{}"), s("{}"), s("{}"), s("{}"), s("{}"), s("{}"), s("{}"),
            s("{}"), s("{}"),
            s("sad"), s("2147483647"),
        ],
        [
            s("3"), s("0"), s("0"), s("0"), s("1"),
            s("0.1"), s("5e-324"),
            None, s(r"\x"), s(""), None, None,
            s("NaN"), None, None, None, None, s("1970-01-01 00:00:00+00"), s("00:00:00"),
            None, s("null"), s(r#""s""#),
            s("{NULL}"), None, None, s("{-0}"), None, None, s(r#"{"\\x"}"#), s(r#"{"\\\\"}"#),
            s("{NULL,NULL}"),
            s("{{NULL}}"), None,
            None, None,
        ],
    ];
    for (row, idx) in rows.iter().zip([4, 7, 10]) {
        let ins = variant!(m[idx], Insert);
        assert_eq!(ins.relid, r.relid);
        assert_eq!(ins.new.len(), 35);
        let want: Vec<Cell<'_>> = row.iter().map(|v| v.map_or(N, t)).collect();
        assert_eq!(cells(&ins.new), want, "row inserted at message {idx}");
    }
}

/// One step of the streaming capture with Stream Start/Stop left out (where they fall is
/// checked on its own) and runs of inserts merged.
#[derive(Debug, PartialEq)]
enum Step {
    /// A Relation, sent in a block of top-level transaction `top` with the xid prefix `xid`.
    Relation {
        top: u32,
        xid: u32,
    },
    /// Inserts of rows `first..=last` (consecutive ids, all with `payload`), sent in blocks of
    /// `top` with the xid prefix `xid`.
    Rows {
        top: u32,
        xid: u32,
        first: u32,
        last: u32,
        payload: String,
    },
    Abort {
        xid: u32,
        subxid: u32,
    },
    Commit {
        xid: u32,
    },
}

/// The `(id, payload)` of a row of table `s`.
fn s_row(tuple: &TupleData<'_>) -> (u32, String) {
    match cells(tuple)[..] {
        [Cell::Text(id), Cell::Text(payload)] => (
            std::str::from_utf8(id).unwrap().parse().unwrap(),
            String::from_utf8(payload.to_vec()).unwrap(),
        ),
        ref other => panic!("unexpected row {other:?}"),
    }
}

#[test]
fn streaming_blocks_aborts_and_commit() {
    let vs = load(test_vectors::STREAMING);
    let m = decode_all(&vs);

    // Walk the capture. The xid column holds the top-level xid for everything sent in a
    // block, the aborted (sub)transaction's xid for a Stream Abort; the Stream Commit line's
    // LSN is the transaction's end.
    let mut open: Option<u32> = None;
    let mut block_len = 0;
    let mut starts = Vec::new();
    let mut steps: Vec<Step> = Vec::new();
    let mut relation: Option<&Relation<'_>> = None;
    for (i, (v, msg)) in vs.iter().zip(&m).enumerate() {
        if let Some(top) = open {
            if !matches!(msg, LogicalMessage::StreamStop) {
                assert_eq!(
                    v.xid, top,
                    "xid column of line {i}, inside a block of {top}"
                );
                block_len += 1;
            }
        }
        match msg {
            LogicalMessage::StreamStart(s) => {
                assert_eq!(open, None, "nested Stream Start at line {i}");
                assert_eq!(s.xid, v.xid, "Stream Start xid at line {i}");
                open = Some(s.xid);
                block_len = 0;
                starts.push((s.xid, s.first_segment));
            }
            LogicalMessage::StreamStop => {
                assert_eq!(v.xid, open.take().expect("Stream Stop closes a block"));
                assert!(block_len > 0, "empty block ending at line {i}");
            }
            LogicalMessage::Relation(r) => {
                let top = open.expect("Relation inside a block");
                assert_eq!((r.namespace, r.name), ("public", "s"));
                assert_eq!(r.replica_identity, ReplicaIdentity::Default);
                assert_eq!(col_names(r), ["id", "payload"]);
                assert_eq!(col_types(r), [23, 25]);
                assert_eq!(col_keys(r), [true, false]);
                // Re-sent Relations describe the same table; only the xid prefix differs.
                if let Some(prev) = relation {
                    assert_eq!(
                        &Relation {
                            xid: prev.xid,
                            ..r.clone()
                        },
                        prev
                    );
                }
                relation = Some(r);
                let xid = r.xid.expect("xid prefix inside a block");
                steps.push(Step::Relation { top, xid });
            }
            LogicalMessage::Insert(ins) => {
                let top = open.expect("Insert inside a block");
                assert_eq!(Some(ins.relid), relation.map(|r| r.relid));
                let xid = ins.xid.expect("xid prefix inside a block");
                let (id, payload) = s_row(&ins.new);
                match steps.last_mut() {
                    Some(Step::Rows {
                        top: t,
                        xid: x,
                        last,
                        payload: p,
                        ..
                    }) if (*t, *x) == (top, xid) && *p == payload && *last + 1 == id => {
                        *last = id;
                    }
                    _ => steps.push(Step::Rows {
                        top,
                        xid,
                        first: id,
                        last: id,
                        payload,
                    }),
                }
            }
            LogicalMessage::StreamAbort(a) => {
                assert_eq!(open, None);
                assert_eq!(a.subxid, v.xid, "Stream Abort subxid at line {i}");
                assert_eq!(
                    a.abort_info, None,
                    "proto 2 / streaming on: no abort LSN and time"
                );
                steps.push(Step::Abort {
                    xid: a.xid,
                    subxid: a.subxid,
                });
            }
            LogicalMessage::StreamCommit(c) => {
                assert_eq!(open, None);
                assert_eq!(c.xid, v.xid, "Stream Commit xid at line {i}");
                assert_eq!(c.end_lsn, v.lsn, "end_lsn is the commit line's LSN");
                assert!(c.commit_lsn < c.end_lsn);
                assert!(
                    vs[..i].iter().all(|w| w.lsn <= c.commit_lsn),
                    "a change after the commit record at {}",
                    c.commit_lsn
                );
                let unix = pg_to_unix_micros(c.commit_time);
                assert!(
                    (1_577_836_800_000_000..4_102_444_800_000_000).contains(&unix),
                    "{unix}"
                );
                steps.push(Step::Commit { xid: c.xid });
            }
            other => panic!("unexpected message in the streaming capture: {other:?}"),
        }
    }

    // The run-specific facts, read off the capture. Two top-level transactions, each sent in
    // blocks: the first segment flagged as such, the later ones not. The first needs at least
    // two blocks, as its subtransaction abort falls between blocks.
    let x1 = starts[0].0;
    let x2 = starts.last().unwrap().0;
    let n1 = starts.iter().filter(|&&(x, _)| x == x1).count();
    let n2 = starts.len() - n1;
    assert!(n1 >= 2 && n2 >= 1, "{starts:?}");
    let segments = |x, n| (0..n).map(move |k| (x, k == 0));
    let want_starts: Vec<_> = segments(x1, n1).chain(segments(x2, n2)).collect();
    assert_eq!(starts, want_starts);
    // The savepoint's subtransaction is the one the first Stream Abort names; the statement
    // after ROLLBACK TO SAVEPOINT ran as a new subtransaction, the only other xid prefix.
    let Some(&Step::Abort {
        subxid: sub_rolled_back,
        ..
    }) = steps.iter().find(|s| matches!(s, Step::Abort { .. }))
    else {
        panic!("no Stream Abort in {steps:?}")
    };
    let mut prefixes: Vec<u32> = Vec::new();
    for s in &steps {
        if let Step::Rows { xid, .. } = *s {
            if !prefixes.contains(&xid) {
                prefixes.push(xid);
            }
        }
    }
    let [p0, p1, sub_after, p3] = prefixes[..] else {
        panic!("xid prefixes on the inserts: {prefixes:?}")
    };
    assert_eq!([p0, p1, p3], [x1, sub_rolled_back, x2]);
    // Xids are handed out at a transaction's first write, in statement order.
    assert!(
        x1 < sub_rolled_back && sub_rolled_back < sub_after && sub_after < x2,
        "{prefixes:?}"
    );
    // How many rows of the subtransaction, and of the second transaction, were streamed
    // before their aborts: the capture ends each at a block boundary set by memory use.
    let streamed = |x: u32| -> u32 {
        steps
            .iter()
            .map(|s| match *s {
                Step::Rows {
                    xid, first, last, ..
                } if xid == x => last - first + 1,
                _ => 0,
            })
            .sum()
    };
    let (k_sub, k2) = (streamed(sub_rolled_back), streamed(x2));
    assert!(
        (1..=400).contains(&k_sub),
        "{k_sub} rows streamed before the rollback"
    );
    assert!(
        (1..=400).contains(&k2),
        "{k2} rows streamed before the abort"
    );

    // Everything else is exact: the statements' rows in order, under the right xids, the
    // subtransaction abort (ROLLBACK TO SAVEPOINT), the COMMIT, and the second transaction
    // ending in a whole-transaction Stream Abort (subxid == xid) for its ROLLBACK.
    let rows = |top, xid, first, last, payload: &str| Step::Rows {
        top,
        xid,
        first,
        last,
        payload: payload.to_string(),
    };
    let repeat = |c: &str| c.repeat(100);
    let want = [
        Step::Relation { top: x1, xid: x1 },
        rows(x1, x1, 1, 400, &repeat("p")),
        rows(x1, sub_rolled_back, 401, 400 + k_sub, &repeat("q")),
        Step::Abort {
            xid: x1,
            subxid: sub_rolled_back,
        },
        // The abort drops the cached schema; the Relation is re-sent with the new prefix.
        Step::Relation {
            top: x1,
            xid: sub_after,
        },
        rows(x1, sub_after, 801, 801, "after rollback"),
        Step::Commit { xid: x1 },
        Step::Relation { top: x2, xid: x2 },
        rows(x2, x2, 1001, 1000 + k2, &repeat("r")),
        Step::Abort {
            xid: x2,
            subxid: x2,
        },
    ];
    assert_eq!(steps, want);
    let abort_at = |subxid: u32| {
        m.iter()
            .position(|msg| matches!(msg, LogicalMessage::StreamAbort(a) if a.subxid == subxid))
            .unwrap()
    };
    let (sub_abort, x2_abort) = (abort_at(sub_rolled_back), abort_at(x2));
    let a = variant!(m[sub_abort], StreamAbort);
    assert!(!a.is_whole_transaction());
    let a = variant!(m[x2_abort], StreamAbort);
    assert!(a.is_whole_transaction());
    assert_eq!(x2_abort, m.len() - 1, "the capture ends with the abort");

    // The model consumer. Before ROLLBACK TO SAVEPOINT, the first transaction holds its own
    // rows and the subtransaction's; the Stream Abort drops exactly the subtransaction's.
    let x1_rows: Vec<(u32, u32)> = (1..=400).map(|id| (x1, id)).collect();
    let sub_rows = (401..=400 + k_sub).map(|id| (sub_rolled_back, id));
    let c = apply_streamed(&m[..sub_abort]);
    assert!(c.committed.is_empty());
    let want_pending: Vec<_> = x1_rows.iter().copied().chain(sub_rows).collect();
    assert_eq!(c.pending, HashMap::from([(x1, want_pending)]));
    let c = apply_streamed(&m[..=sub_abort]);
    assert_eq!(c.pending, HashMap::from([(x1, x1_rows)]));

    // Before its abort, the second transaction's streamed rows are pending (never applied);
    // the whole-transaction Stream Abort discards them.
    let mut want: Vec<u32> = (1..=400).collect();
    want.push(801);
    let c = apply_streamed(&m[..x2_abort]);
    assert_eq!(c.committed, want);
    let x2_rows: Vec<_> = (1001..=1000 + k2).map(|id| (x2, id)).collect();
    assert_eq!(c.pending, HashMap::from([(x2, x2_rows)]));
    let c = apply_streamed(&m);
    assert_eq!(c.committed, want);
    assert!(c.pending.is_empty(), "{:?}", c.pending.keys());
}

/// What a consumer of streamed transactions holds.
#[derive(Default)]
struct Consumer {
    /// Per top-level xid, the buffered (subxid, row id) in arrival order.
    pending: HashMap<u32, Vec<(u32, u32)>>,
    /// The ids of the committed rows in commit order.
    committed: Vec<u32>,
}

/// A model consumer: buffers streamed changes per top-level xid, applies them at Stream
/// Commit, and on Stream Abort drops the aborted subtransaction from the point where it
/// first appeared (PostgreSQL's `stream_abort_internal`), or the whole transaction.
fn apply_streamed(msgs: &[LogicalMessage<'_>]) -> Consumer {
    let mut c = Consumer::default();
    let mut current = None;
    for msg in msgs {
        match msg {
            LogicalMessage::StreamStart(s) => current = Some(s.xid),
            LogicalMessage::StreamStop => current = None,
            LogicalMessage::Insert(i) => {
                let top = current.expect("insert inside a block");
                let (id, _) = s_row(&i.new);
                let sub = i.xid.expect("xid prefix");
                c.pending.entry(top).or_default().push((sub, id));
            }
            LogicalMessage::StreamAbort(a) if a.is_whole_transaction() => {
                c.pending.remove(&a.xid);
            }
            LogicalMessage::StreamAbort(a) => {
                if let Some(rows) = c.pending.get_mut(&a.xid) {
                    if let Some(at) = rows.iter().position(|&(sub, _)| sub == a.subxid) {
                        rows.truncate(at);
                    }
                }
            }
            LogicalMessage::StreamCommit(s) => {
                let rows = c.pending.remove(&s.xid).unwrap_or_default();
                c.committed.extend(rows.into_iter().map(|(_, id)| id));
            }
            _ => {}
        }
    }
    c
}

#[test]
fn decoder_tracks_stream_state_from_start_and_stop() {
    let vs = load(test_vectors::STREAMING);
    let mut d = Decoder::new();
    let mut blocks = 0;
    for (i, v) in vs.iter().enumerate() {
        let was_in = d.in_stream();
        let msg = d
            .decode(&v.bytes)
            .unwrap_or_else(|e| panic!("message {i}: {e}"));
        match msg {
            LogicalMessage::StreamStart(_) => {
                assert!(!was_in && d.in_stream());
                blocks += 1;
            }
            LogicalMessage::StreamStop => assert!(was_in && !d.in_stream()),
            LogicalMessage::Insert(ins) => {
                assert!(was_in && d.in_stream());
                assert!(ins.xid.is_some());
                // The same bytes mean something else outside a block: the xid would be
                // read as the relid and the relid's first byte as the tuple marker.
                assert!(LogicalMessage::parse(&v.bytes, false).is_err());
            }
            _ => assert_eq!(was_in, d.in_stream()),
        }
    }
    // Every Stream Start and Stop in the capture, counted by their tag bytes, was seen.
    let count = |tag| vs.iter().filter(|v| v.bytes[0] == tag).count();
    assert_eq!((blocks, blocks), (count(b'S'), count(b'E')));
    assert!(
        blocks >= 3,
        "two transactions, one with a subtransaction abort between blocks"
    );
    assert!(!d.in_stream());

    // After reset (reconnect), an open block is forgotten.
    assert_eq!(vs[0].bytes[0], b'S');
    d.decode(&vs[0].bytes).unwrap();
    assert!(d.in_stream());
    d.reset();
    assert!(!d.in_stream());
}

#[test]
fn stream_framing_violations_are_rejected_without_changing_state() {
    let start = unhex("530000034601");
    let stop = unhex("45");
    let begin = unhex("420000000003eb7430000303cd9ff2d6ef00000316");
    let abort = unhex("410000034600000347");
    let commit = unhex("63000003460000000000057c76e000000000057c7718000303cda01a97ff");

    let mut d = Decoder::new();
    assert_eq!(
        d.decode(&stop),
        Err(DecodeError::OutsideStream { tag: b'E' })
    );
    assert!(!d.in_stream());
    d.decode(&start).unwrap();
    for bad in [&start, &begin, &abort, &commit] {
        let err = d.decode(bad).unwrap_err();
        assert_eq!(err, DecodeError::InsideStream { tag: bad[0] });
        assert!(d.in_stream(), "state kept after {err}");
    }
    assert_eq!(d.decode(&stop), Ok(LogicalMessage::StreamStop));
    assert!(!d.in_stream());
    // A stray Stream Abort outside streaming (seen from PG18 with proto 1) just decodes.
    assert!(matches!(
        d.decode(&abort),
        Ok(LogicalMessage::StreamAbort(StreamAbort {
            xid: 838,
            subxid: 839,
            abort_info: None
        }))
    ));
}

#[test]
fn every_captured_message_rejects_truncation_and_trailing_bytes() {
    for (name, text) in test_vectors::ALL {
        let vs = load(text);
        let mut d = Decoder::new();
        for (i, v) in vs.iter().enumerate() {
            let in_stream = d.in_stream();
            for len in 0..v.bytes.len() {
                // A Stream Abort cut before its abort LSN/time is the valid short form.
                if v.bytes[0] == b'A' && len == 9 {
                    continue;
                }
                let r = LogicalMessage::parse(&v.bytes[..len], in_stream);
                assert!(
                    r.is_err(),
                    "{name} message {i} truncated to {len} decoded: {r:?}"
                );
            }
            let mut longer = v.bytes.clone();
            longer.push(0);
            let err = LogicalMessage::parse(&longer, in_stream).unwrap_err();
            let want = if v.bytes[0] == b'A' && v.bytes.len() == 9 {
                // One extra byte reads as the start of the optional abort LSN/time tail.
                DecodeError::UnexpectedEnd {
                    tag: b'A',
                    offset: v.bytes.len(),
                    need: 8,
                }
            } else {
                DecodeError::TrailingBytes {
                    tag: v.bytes[0],
                    offset: v.bytes.len(),
                    count: 1,
                }
            };
            assert_eq!(err, want, "{name} message {i}");
            d.decode(&v.bytes).unwrap();
        }
    }
}

#[test]
fn protocol_4_parallel_stream_aborts_carry_the_abort_lsn_and_time() {
    // Captured from PostgreSQL 16 with streaming 'parallel': a rolled-back savepoint and a
    // rolled-back transaction, both streamed.
    let mut d = Decoder::new();
    let mut aborts = Vec::new();
    for v in load(test_vectors::STREAMING_PARALLEL) {
        if let LogicalMessage::StreamAbort(a) = d.decode(&v.bytes).unwrap() {
            aborts.push(a);
        }
    }
    assert_eq!(aborts.len(), 2);
    assert!(!aborts[0].is_whole_transaction());
    assert!(aborts[1].is_whole_transaction());
    for a in &aborts {
        let (lsn, time) = a
            .abort_info
            .expect("abort LSN and time with streaming 'parallel'");
        assert!(lsn > Lsn::INVALID);
        // After 2020-01-01, in µs since 2000-01-01.
        assert!(time > 631_152_000_000_000, "{time}");
    }
}

#[test]
fn decoded_values_borrow_from_the_payload() {
    let vs = load(test_vectors::BASIC);
    let payload = &vs[1].bytes;
    let m = LogicalMessage::parse(payload, false).unwrap();
    let r = variant!(m, Relation);
    let range = payload.as_ptr_range();
    assert!(range.contains(&r.name.as_ptr()));
    let payload = &vs[2].bytes;
    let m = LogicalMessage::parse(payload, false).unwrap();
    let i = variant!(m, Insert);
    let v = i.new.get(1).and_then(|c| c.bytes()).unwrap();
    assert!(payload.as_ptr_range().contains(&v.as_ptr()));
}

// --- messages not in the captures: reference Appendix A.5, A.10 and hand-built layouts ---

#[test]
fn binary_tuple_cells() {
    // Appendix A.5, `binary 'true'`: int4 1, enum 'happy', posint 7, timestamptz, numeric 12.5.
    let bytes = unhex(concat!(
        "49000040224e0005",
        "620000000400000001",
        "62000000056861707079",
        "620000000400000007",
        "62000000080002b0ec8517d580",
        "620000000c0002000000000001000c1388",
    ));
    let m = LogicalMessage::parse(&bytes, false).unwrap();
    let i = variant!(m, Insert);
    assert_eq!(i.relid, 0x4022);
    assert_eq!(i.new.len(), 5);
    let c: Vec<_> = i.new.iter().collect();
    assert_eq!(c[0], Cell::Binary(&[0, 0, 0, 1]));
    assert_eq!(c[1], Cell::Binary(b"happy"));
    assert_eq!(c[2], Cell::Binary(&[0, 0, 0, 7]));
    assert_eq!(c[3].bytes().map(<[u8]>::len), Some(8));
    assert_eq!(c[4].bytes().map(<[u8]>::len), Some(12));
    assert_eq!(i.new.iter().len(), 5);
    assert_eq!(i.new.get(5), None);
    assert!(!i.new.is_empty());
    assert_eq!(format!("{:?}", i.new.get(1).unwrap()), "Binary(\"happy\")");
}

#[test]
fn two_phase_messages() {
    // Appendix A.10 (proto 3, two_phase on).
    let b = unhex(concat!(
        "62",
        "00000000015d7aa8",
        "00000000015d7ba0",
        "000303cd1c6e1c2d",
        "000002ff",
        "673100"
    ));
    let p = unhex(concat!(
        "50",
        "00",
        "00000000015d7aa8",
        "00000000015d7ba0",
        "000303cd1c6e1c2d",
        "000002ff",
        "673100"
    ));
    let k = unhex(concat!(
        "4b",
        "00",
        "00000000015d7ba0",
        "00000000015d7bd8",
        "000303cd1c6e49c6",
        "000002ff",
        "673100"
    ));
    let r = unhex(concat!(
        "72",
        "00",
        "00000000015d7d50",
        "00000000015d7d88",
        "000303cd1c6e7976",
        "000303cd1c6ea74d",
        "00000300",
        "673200"
    ));
    let mut d = Decoder::new();

    let m = d.decode(&b).unwrap();
    let bp = variant!(m, BeginPrepare);
    assert_eq!(
        (bp.prepare_lsn, bp.end_lsn),
        (Lsn(0x15d7aa8), Lsn(0x15d7ba0))
    );
    assert_eq!((bp.xid, bp.gid), (0x2ff, "g1"));

    let m = d.decode(&p).unwrap();
    let pr = variant!(m, Prepare);
    assert_eq!(pr.prepare_lsn, bp.prepare_lsn);
    assert_eq!(pr.end_lsn, bp.end_lsn);
    assert_eq!(pr.prepare_time, bp.prepare_time);
    assert_eq!((pr.xid, pr.gid), (0x2ff, "g1"));

    let m = d.decode(&k).unwrap();
    let cp = variant!(m, CommitPrepared);
    assert_eq!(
        (cp.commit_lsn, cp.end_lsn),
        (Lsn(0x15d7ba0), Lsn(0x15d7bd8))
    );
    assert_eq!((cp.xid, cp.gid), (0x2ff, "g1"));

    let m = d.decode(&r).unwrap();
    let rp = variant!(m, RollbackPrepared);
    assert_eq!(rp.prepare_end_lsn, Lsn(0x15d7d50));
    assert_eq!(rp.rollback_end_lsn, Lsn(0x15d7d88));
    assert!(rp.prepare_time < rp.rollback_time);
    assert_eq!((rp.xid, rp.gid), (0x300, "g2"));

    // Stream Prepare has Prepare's layout.
    let mut sp = p.clone();
    sp[0] = b'p';
    let m = d.decode(&sp).unwrap();
    assert_eq!(variant!(m, StreamPrepare), pr);

    // Flags must be zero on all but Begin Prepare.
    for msg in [&p, &k, &r, &sp] {
        let mut bad = msg.clone();
        bad[1] = 1;
        assert_eq!(
            d.decode(&bad),
            Err(DecodeError::NonZeroFlags {
                tag: msg[0],
                offset: 1,
                flags: 1
            })
        );
    }
}

#[test]
fn origin_and_parallel_stream_abort() {
    let o = unhex("4f0000000001540118") // origin_lsn
        .into_iter()
        .chain(*b"node1\0")
        .collect::<Vec<u8>>();
    let m = LogicalMessage::parse(&o, false).unwrap();
    assert_eq!(
        m,
        LogicalMessage::Origin(Origin {
            origin_lsn: Lsn(0x1540118),
            name: "node1"
        })
    );
    // Origin may follow the first Stream Start; it has no xid prefix.
    assert_eq!(LogicalMessage::parse(&o, true).unwrap(), m);

    // proto 4 with streaming 'parallel': abort LSN and time follow.
    let a = unhex("41000002fa000002fb00000000015b3898000303cd1bbee0aa");
    let m = LogicalMessage::parse(&a, false).unwrap();
    let sa = variant!(m, StreamAbort);
    assert_eq!((sa.xid, sa.subxid), (0x2fa, 0x2fb));
    assert_eq!(sa.abort_info, Some((Lsn(0x15b3898), 0x000303cd1bbee0aa)));
    // A partial tail is an error, not silently ignored.
    assert_eq!(
        LogicalMessage::parse(&a[..17], false),
        Err(DecodeError::UnexpectedEnd {
            tag: b'A',
            offset: 17,
            need: 8
        })
    );
    assert!(LogicalMessage::parse(&a[..13], false).is_err());
}

#[test]
fn streamed_messages_carry_the_xid_prefix() {
    // Type, Update, Delete, Truncate and Message inside a block (built from proto.c's layout).
    let xid = "000002fb";
    let cases: [(String, u8); 5] = [
        (format!("59{xid}000040c17075626c6963006d6f6f6400"), b'Y'),
        (
            format!("55{xid}000040724b00037400000001326e6e4e00037400000001337400000001786e"),
            b'U',
        ),
        (format!("44{xid}000040724b00037400000001326e6e"), b'D'),
        (format!("54{xid}000000010000004095"), b'T'),
        (
            format!("4d{xid}01000000000537644070667800000000026869"),
            b'M',
        ),
    ];
    for (hex, tag) in cases {
        let bytes = unhex(&hex);
        let m = LogicalMessage::parse(&bytes, true).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m.tag(), tag);
        let got = match &m {
            LogicalMessage::Type(x) => x.xid,
            LogicalMessage::Update(x) => x.xid,
            LogicalMessage::Delete(x) => x.xid,
            LogicalMessage::Truncate(x) => x.xid,
            LogicalMessage::Message(x) => x.xid,
            other => panic!("{other:?}"),
        };
        assert_eq!(got, Some(0x2fb));
    }
}

#[test]
fn error_messages_name_tag_and_offset() {
    let parse = |hex: &str| LogicalMessage::parse(&unhex(hex), false).unwrap_err();
    let cases: [(&str, &str); 12] = [
        ("", "pgoutput: empty message"),
        ("5a00", "pgoutput: unknown message tag 0x5a at offset 0"),
        (
            "43010000000003eb74300000000003eb7460000303cd9ff2d6ef",
            "pgoutput 'C' message: non-zero flags 0x01 at offset 1",
        ),
        (
            "55000040004e0001740000",
            "pgoutput 'U' message: unexpected end of data at offset 9 (need 4 bytes)",
        ),
        (
            "49000040004e00027400000001317a",
            "pgoutput 'I' message: invalid tuple kind 0x7a at offset 14",
        ),
        (
            "49000040004e000174ffffffff",
            "pgoutput 'I' message: negative length -1 at offset 9",
        ),
        (
            "5200004000707562ff6c696300740064000000",
            "pgoutput 'R' message: invalid UTF-8 in string at offset 8",
        ),
        (
            "52000040007075626c6963",
            "pgoutput 'R' message: unterminated string at offset 5",
        ),
        (
            "52000040007075626c696300740078000000",
            "pgoutput 'R' message: invalid replica identity 0x78 at offset 14",
        ),
        (
            "55000040004b0001740000000131780001740000000131",
            "pgoutput 'U' message: expected 'N' at offset 14, found 0x78",
        ),
        (
            "44000040004e0001740000000131",
            "pgoutput 'D' message: expected 'K' or 'O' at offset 5, found 0x4e",
        ),
        (
            "45",
            "pgoutput 'E' message at offset 0: Stream Stop outside a stream block",
        ),
    ];
    for (hex, want) in cases {
        assert_eq!(parse(hex).to_string(), want, "{hex}");
    }

    let e = parse(&"00".repeat(27).replacen("00", "43", 1));
    assert_eq!(
        e.to_string(),
        "pgoutput 'C' message: 1 trailing bytes at offset 26"
    );
    assert_eq!((e.tag(), e.offset()), (Some(b'C'), 26));
    assert_eq!(
        (DecodeError::Empty.tag(), DecodeError::Empty.offset()),
        (None, 0)
    );
    assert_eq!(
        DecodeError::InsideStream { tag: b'B' }.to_string(),
        "pgoutput 'B' message at offset 0 is not allowed inside a stream block"
    );
    // Non-printable tags are shown in hex.
    assert_eq!(
        DecodeError::UnexpectedEnd {
            tag: 0,
            offset: 1,
            need: 4
        }
        .to_string(),
        "pgoutput 0x00 message: unexpected end of data at offset 1 (need 4 bytes)"
    );
}

#[test]
fn bogus_counts_do_not_allocate_or_panic() {
    // Truncate claiming i32::MAX relids, and a negative count.
    assert_eq!(
        LogicalMessage::parse(&unhex("547fffffff0000000001"), false),
        Err(DecodeError::UnexpectedEnd {
            tag: b'T',
            offset: 10,
            need: 4
        })
    );
    assert_eq!(
        LogicalMessage::parse(&unhex("54ffffffff00"), false),
        Err(DecodeError::NegativeLength {
            tag: b'T',
            offset: 1,
            len: -1
        })
    );
    // Relation claiming 65535 columns.
    assert!(matches!(
        LogicalMessage::parse(
            &unhex(concat!("52", "00004000", "00", "00", "64", "ffff")),
            false
        ),
        Err(DecodeError::UnexpectedEnd {
            tag: b'R',
            offset: 10,
            need: 1
        })
    ));
    // A value length larger than the message, and a message content length too.
    assert_eq!(
        LogicalMessage::parse(&unhex("49000040004e0001747fffffff31"), false),
        Err(DecodeError::UnexpectedEnd {
            tag: b'I',
            offset: 13,
            need: 0x7fff_ffff
        })
    );
    assert_eq!(
        LogicalMessage::parse(
            &unhex(concat!("4d", "00", "0000000000000000", "00", "ffffffff")),
            false
        ),
        Err(DecodeError::NegativeLength {
            tag: b'M',
            offset: 11,
            len: -1
        })
    );
}

#[test]
fn insert_requires_new_tuple_marker() {
    assert_eq!(
        LogicalMessage::parse(&unhex("49000040004b0000"), false),
        Err(DecodeError::InvalidTupleMarker {
            tag: b'I',
            offset: 5,
            expected: "'N'",
            found: b'K'
        })
    );
    // Zero columns is a valid (if odd) tuple.
    let bytes = unhex("49000040004e0000");
    let m = LogicalMessage::parse(&bytes, false).unwrap();
    let i = variant!(m, Insert);
    assert!(i.new.is_empty());
    assert_eq!(i.new.iter().next(), None);
    assert_eq!(format!("{:?}", i.new), "[]");
}

#[test]
fn epoch_conversion() {
    assert_eq!(pg_to_unix_micros(0), 946_684_800_000_000);
    assert_eq!(unix_to_pg_micros(946_684_800_000_000), 0);
    assert_eq!(unix_to_pg_micros(pg_to_unix_micros(123_456)), 123_456);
    // ±infinity stay at the extremes instead of overflowing.
    assert_eq!(pg_to_unix_micros(i64::MAX), i64::MAX);
    assert_eq!(unix_to_pg_micros(i64::MIN), i64::MIN);
}

#[test]
fn replica_identity_bytes_round_trip() {
    for b in *b"dnfi" {
        assert_eq!(
            ReplicaIdentity::from_byte(b).map(ReplicaIdentity::as_byte),
            Some(b)
        );
    }
    assert_eq!(ReplicaIdentity::from_byte(b'x'), None);
}
