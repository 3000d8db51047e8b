//! PostgreSQL's share of the latency: a second logical replication client, with no NATS
//! behind it, that notes for every transaction how long after its commit time the walsender
//! delivered its Begin message. It runs beside the bridge in the latency run, on the same
//! busy machine, so a tail that shows here too comes from PostgreSQL or the machine, not
//! from the bridge.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use pgbridge::pg::framing::{parse_copy_data, ReplicationMessage};
use pgbridge::pg::pgoutput::{Decoder, LogicalMessage};
use pgbridge::pg::replication::{PgOutputOptions, ReplicationConnection};
use pgbridge::pg::Lsn;

/// µs from 1970-01-01 to 2000-01-01 (PostgreSQL's epoch).
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

pub struct Probe {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<(u32, f64)>>,
}

impl Probe {
    /// Streams from `slot` (pgoutput, `publication`) in a thread until [`Probe::finish`].
    pub fn start(params: Vec<(&'static str, String)>, slot: &str, publication: &str) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let (slot, publication) = (slot.to_string(), publication.to_string());
        let thread = std::thread::spawn(move || {
            let refs: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let mut repl = ReplicationConnection::connect(&refs).expect("probe connection");
            let options = PgOutputOptions::for_server(150000, vec![publication]);
            repl.start_logical(&slot, Lsn::INVALID, &options)
                .expect("probe START_REPLICATION");
            let mut decoder = Decoder::new();
            let mut latencies_ms = Vec::new();
            let mut received = Lsn::INVALID;
            while !flag.load(Ordering::Relaxed) {
                let Some(buf) = repl.recv(Duration::from_millis(50)).expect("probe recv") else {
                    continue;
                };
                match parse_copy_data(&buf).expect("probe framing") {
                    ReplicationMessage::XLogData(x) => {
                        received = received.max(x.wal_end);
                        if let Ok(LogicalMessage::Begin(b)) = decoder.decode(x.data) {
                            let now = crate::nats::now_unix_micros();
                            let commit = b.commit_time + PG_EPOCH_UNIX_MICROS;
                            latencies_ms.push((b.xid, (now - commit) as f64 / 1000.0));
                        }
                    }
                    ReplicationMessage::Keepalive(k) => {
                        received = received.max(k.wal_end);
                        if k.reply_requested {
                            let _ = repl.send_status(received, received, received, false);
                        }
                    }
                }
            }
            latencies_ms
        });
        Probe { stop, thread }
    }

    /// Stops the probe; (xid, commit → delivery latency in ms), one per transaction.
    pub fn finish(self) -> Vec<(u32, f64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("probe thread")
    }
}

/// PostgreSQL's share of the start-up: log in on a replication connection, start streaming
/// from `slot` (at its confirmed position, confirming nothing) and wait for the first row
/// change. The walsender first re-reads the WAL from the slot's `restart_lsn`, which is most
/// of the time when the slot's last transactions were busy. Milliseconds.
pub fn first_change_ms(params: &[(&'static str, String)], slot: &str, publication: &str) -> f64 {
    let started = std::time::Instant::now();
    let refs: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut repl = ReplicationConnection::connect(&refs).expect("probe connection");
    let options = PgOutputOptions::for_server(150000, vec![publication.to_string()]);
    repl.start_logical(slot, Lsn::INVALID, &options)
        .expect("probe START_REPLICATION");
    let mut decoder = Decoder::new();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no change in 60 s"
        );
        let Some(buf) = repl.recv(Duration::from_millis(50)).expect("probe recv") else {
            continue;
        };
        if let ReplicationMessage::XLogData(x) = parse_copy_data(&buf).expect("probe framing") {
            if let Ok(LogicalMessage::Insert(_)) = decoder.decode(x.data) {
                return started.elapsed().as_secs_f64() * 1e3;
            }
        }
    }
}
