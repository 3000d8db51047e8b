//! The driver against a scripted delivery: the durable position follows the watermark only at
//! transaction ends, and the counters and recycled events follow the deliveries.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::pg::Lsn;
use crate::sink::ring::{self, RingItem};
use crate::telemetry::counters::{DurableLsn, PublisherStats};
use crate::wire::event::{ChangeEvent, Operation, TableRef};
use crate::wire::outbox::{OutboxEvent, OutboxOrigin};

use super::{run, Delivery, Feed, Progress, Ticket};

/// A broker with a window of `window` changes that delivers one change per call of
/// `delivered`, and notes the durable position it saw at each call.
struct OneByOne {
    window: u64,
    next: Ticket,
    below: Ticket,
    durable: DurableLsn,
    stats: Arc<PublisherStats>,
    log: Rc<RefCell<Log>>,
}

#[derive(Default)]
struct Log {
    sent: Vec<(Lsn, u32)>,
    /// The watermark and the durable position at each call of `delivered`.
    seen: Vec<(Ticket, Lsn)>,
    closed: bool,
}

impl Delivery for OneByOne {
    type Error = std::io::Error;

    async fn open(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }

    fn ready(&self) -> bool {
        true
    }

    fn room(&self) -> bool {
        self.next - self.below < self.window
    }

    async fn send(&mut self, event: &ChangeEvent) -> Result<Ticket, Self::Error> {
        self.log
            .borrow_mut()
            .sent
            .push((event.commit_lsn, event.seq));
        self.next += 1;
        Ok(self.next - 1)
    }

    async fn send_outbox(&mut self, event: &OutboxEvent) -> Result<Ticket, Self::Error> {
        self.log
            .borrow_mut()
            .sent
            .push((event.commit_lsn, event.seq));
        self.next += 1;
        Ok(self.next - 1)
    }

    async fn delivered(&mut self, _feed: Feed<'_>) -> Result<Progress, Self::Error> {
        assert!(self.below < self.next, "called with nothing in flight");
        let durable = self.durable.get();
        self.log.borrow_mut().seen.push((self.below, durable));
        self.below += 1;
        Ok(Progress {
            below: self.below,
            duplicates: u64::from(self.below == 2),
            bytes: 10,
        })
    }

    async fn close(&mut self) -> Result<(), Self::Error> {
        self.log.borrow_mut().closed = true;
        Ok(())
    }

    fn stats(&self) -> &Arc<PublisherStats> {
        &self.stats
    }
}

fn change(table: &Arc<TableRef>, commit: u64, seq: u32, last: bool) -> Box<ChangeEvent> {
    Box::new(ChangeEvent {
        table: Arc::clone(table),
        operation: Operation::Insert,
        lsn: Lsn(commit - 1),
        commit_lsn: Lsn(commit),
        timeline: 1,
        xid: 1,
        commit_time: 0,
        seq,
        last_in_tx: last,
        columns: Vec::new(),
        old_columns: None,
        unchanged_toast: Vec::new(),
    })
}

#[test]
fn durable_follows_the_watermark_at_transaction_ends() {
    let table = Arc::new(TableRef {
        schema: Arc::from("public"),
        table: Arc::from("t"),
        relation_id: 1,
        columns: Vec::new(),
        key_columns: Vec::new(),
    });
    // Transactions of 2, 1 and 3 changes (tickets 0-1, 2, 3-5), committed at 100, 200, 300;
    // an empty one (no change published) at 250 in between.
    let (mut writer, reader) = ring::channel(64, u64::MAX);
    let txns: [(u64, u32); 3] = [(100, 2), (200, 1), (300, 3)];
    for (commit, n) in txns {
        for seq in 0..n {
            assert!(writer
                .push(RingItem::change(change(
                    &table,
                    commit - 10,
                    seq,
                    seq + 1 == n
                )))
                .is_ok());
        }
        assert!(writer
            .push(RingItem::Commit {
                end_lsn: Lsn(commit)
            })
            .is_ok());
        if commit == 200 {
            assert!(writer.push(RingItem::Commit { end_lsn: Lsn(250) }).is_ok());
        }
    }
    assert!(writer.push(RingItem::End).is_ok());
    let durable = DurableLsn::new(Lsn(0));
    let stats = Arc::new(PublisherStats::default());
    let log = Rc::new(RefCell::new(Log::default()));
    let delivery = OneByOne {
        window: 2,
        next: 0,
        below: 0,
        durable: durable.clone(),
        stats: Arc::clone(&stats),
        log: Rc::clone(&log),
    };
    let rt = crate::runtime::current_thread().unwrap();
    rt.block_on(run(delivery, reader, durable.clone())).unwrap();
    let log = log.borrow();
    assert!(log.closed);
    assert_eq!(log.sent.len(), 6);
    // At each call, the durable position covers exactly the transactions whose every change
    // is below the watermark.
    let expected = |below: Ticket| match below {
        0 | 1 => 0,
        2 => 100,
        // The empty transaction right after ticket 2 is durable with it.
        3..=5 => 250,
        _ => 300,
    };
    assert_eq!(log.seen.len(), 6);
    for (below, seen) in &log.seen {
        assert_eq!(seen.0, expected(*below), "durable at watermark {below}");
    }
    assert_eq!(durable.get(), Lsn(300));
    assert_eq!(stats.published.load(Ordering::Relaxed), 5);
    assert_eq!(stats.duplicates.load(Ordering::Relaxed), 1);
    assert_eq!(stats.bytes.load(Ordering::Relaxed), 60);
    assert_eq!(stats.in_flight.load(Ordering::Relaxed), 0);
    // Every delivered event went back to the wal side for reuse.
    let mut recycled = 0;
    while writer.recycled().is_some() {
        recycled += 1;
    }
    assert_eq!(recycled, 6);
}

#[test]
fn an_outbox_event_is_delivered_in_its_place_and_can_end_a_transaction() {
    let table = Arc::new(TableRef {
        schema: Arc::from("public"),
        table: Arc::from("t"),
        relation_id: 1,
        columns: Vec::new(),
        key_columns: Vec::new(),
    });
    let outbox = |commit: u64, seq: u32| {
        RingItem::Outbox(Box::new(OutboxEvent {
            origin: OutboxOrigin::Message {
                prefix: "outbox.a.b".into(),
            },
            id: None,
            aggregate_type: Some("a".into()),
            aggregate_id: None,
            event_type: Some("b".into()),
            payload: b"{}".to_vec(),
            commit_lsn: Lsn(commit),
            timeline: 1,
            seq,
            commit_time: 0,
        }))
    };
    // A transaction of a change and an event (tickets 0-1), then one of an event alone (2).
    let (mut writer, reader) = ring::channel(64, u64::MAX);
    assert!(writer
        .push(RingItem::change(change(&table, 90, 0, true)))
        .is_ok());
    assert!(writer.push(outbox(90, 1)).is_ok());
    assert!(writer.push(RingItem::Commit { end_lsn: Lsn(100) }).is_ok());
    assert!(writer.push(outbox(190, 0)).is_ok());
    assert!(writer.push(RingItem::Commit { end_lsn: Lsn(200) }).is_ok());
    assert!(writer.push(RingItem::End).is_ok());
    let durable = DurableLsn::new(Lsn(0));
    let log = Rc::new(RefCell::new(Log::default()));
    let delivery = OneByOne {
        window: 8,
        next: 0,
        below: 0,
        durable: durable.clone(),
        stats: Arc::new(PublisherStats::default()),
        log: Rc::clone(&log),
    };
    let rt = crate::runtime::current_thread().unwrap();
    rt.block_on(run(delivery, reader, durable.clone())).unwrap();
    let log = log.borrow();
    assert_eq!(log.sent, [(Lsn(90), 0), (Lsn(90), 1), (Lsn(190), 0)]);
    // The first transaction is durable only once its event is delivered too.
    let seen: Vec<(Ticket, u64)> = log.seen.iter().map(|(b, l)| (*b, l.0)).collect();
    assert_eq!(seen, [(0, 0), (1, 0), (2, 100)]);
    assert_eq!(durable.get(), Lsn(200));
}
