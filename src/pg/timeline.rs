//! A server's timelines: the history `TIMELINE_HISTORY` gives (which timeline wrote the WAL at
//! a position) and the WAL position and history of the latest (re)connect, shared with the
//! sinks that must check a recorded position against the server.

use std::sync::Mutex;

use crate::pg::Lsn;

/// A server's timeline history: the timelines before the current one and where each ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimelineHistory {
    current: u32,
    /// (timeline, switch point) sorted by switch point: WAL before the switch point belongs to
    /// that timeline, WAL from it on to the next entry (or the current timeline).
    switches: Vec<(u32, Lsn)>,
}

impl TimelineHistory {
    /// A server that never changed timeline (or whose history is not needed).
    pub fn single(current: u32) -> Self {
        TimelineHistory {
            current,
            switches: Vec::new(),
        }
    }

    /// The history of timeline `current` from the text of its history file (`TIMELINE_HISTORY`):
    /// lines `parentTLI<TAB>switchpoint<TAB>reason`, blank lines and `#` comments skipped.
    pub fn parse(current: u32, text: &str) -> Result<Self, String> {
        let mut switches = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split_whitespace();
            let (Some(tli), Some(lsn)) = (fields.next(), fields.next()) else {
                return Err(format!("history line {line:?} has no switch point"));
            };
            let tli: u32 = tli
                .parse()
                .map_err(|_| format!("history line {line:?}: {tli:?} is not a timeline"))?;
            let lsn: Lsn = lsn
                .parse()
                .map_err(|_| format!("history line {line:?}: {lsn:?} is not X/X"))?;
            switches.push((tli, lsn));
        }
        switches.sort_by_key(|&(_, lsn)| lsn);
        Ok(TimelineHistory { current, switches })
    }

    /// The current timeline.
    pub fn current(&self) -> u32 {
        self.current
    }

    /// The timeline WAL at `lsn` was written on: the first timeline that ended after it, or
    /// the current one. After a promotion the new primary sends WAL from before the switch
    /// point again; it keeps its old timeline, so it keeps its message ids.
    pub fn timeline_of(&self, lsn: Lsn) -> u32 {
        self.switches
            .iter()
            .find(|&&(_, switch)| lsn < switch)
            .map_or(self.current, |&(tli, _)| tli)
    }

    /// Where timeline `tli` ended, if it is a past timeline of this history.
    pub fn switch_point(&self, tli: u32) -> Option<Lsn> {
        self.switches
            .iter()
            .find(|&&(t, _)| t == tli)
            .map(|&(_, lsn)| lsn)
    }

    /// True when a position stored on timeline `tli` is part of this history: on the current
    /// timeline, or on a past one at or before its switch point.
    pub fn contains(&self, tli: u32, lsn: Lsn) -> bool {
        tli == self.current || self.switch_point(tli).is_some_and(|switch| lsn <= switch)
    }
}

/// What the server said at the bridge's latest (re)connect: its WAL position then, a lower
/// bound of its position now (a server's WAL only grows), and its timeline history. Shared
/// with the Kafka sink, whose exactly-once positions record must fit them.
#[derive(Debug)]
pub struct ServerPosition(Mutex<(Lsn, TimelineHistory)>);

impl ServerPosition {
    /// The server's WAL position `wal` and timeline history `history`.
    pub fn new(wal: Lsn, history: TimelineHistory) -> Self {
        ServerPosition(Mutex::new((wal, history)))
    }

    /// After a reconnect: what the (possibly other, promoted) server said.
    pub fn set(&self, wal: Lsn, history: TimelineHistory) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = (wal, history);
    }

    /// The server's WAL position and timeline history.
    pub fn get(&self) -> (Lsn, TimelineHistory) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The timeline WAL at `lsn` was written on (see [`TimelineHistory::timeline_of`]).
    pub fn timeline_of(&self, lsn: Lsn) -> u32 {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .timeline_of(lsn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shared_server_position_follows_a_reconnect() {
        let server = ServerPosition::new(Lsn(0x500), TimelineHistory::single(1));
        assert_eq!(server.get(), (Lsn(0x500), TimelineHistory::single(1)));
        assert_eq!(server.timeline_of(Lsn(0x400)), 1);
        // Promoted at 0/480: WAL from there on is timeline 2's.
        let promoted = TimelineHistory::parse(2, "1\t0/480\tpromoted\n").unwrap();
        server.set(Lsn(0x600), promoted.clone());
        assert_eq!(server.get(), (Lsn(0x600), promoted));
        assert_eq!(server.timeline_of(Lsn(0x47F)), 1);
        assert_eq!(server.timeline_of(Lsn(0x480)), 2);
    }

    #[test]
    fn timeline_of_an_lsn_follows_the_history() {
        // Timeline 3: 1 ended at 0/3000000, 2 at 0/5000000 (listed out of order on purpose).
        let h = TimelineHistory::parse(
            3,
            "# comment\n2\t0/5000000\tbefore transaction 900\n\n1\t0/3000000\tno recovery target specified\n",
        )
        .unwrap();
        assert_eq!(h.timeline_of(Lsn(0)), 1);
        assert_eq!(h.timeline_of(Lsn(0x2FF_FFFF)), 1);
        assert_eq!(
            h.timeline_of(Lsn(0x300_0000)),
            2,
            "the switch point begins the next"
        );
        assert_eq!(h.timeline_of(Lsn(0x4FF_FFFF)), 2);
        assert_eq!(h.timeline_of(Lsn(0x500_0000)), 3);
        assert_eq!(h.timeline_of(Lsn(u64::MAX)), 3);
        assert_eq!(TimelineHistory::single(1).timeline_of(Lsn(42)), 1);
        assert_eq!(h.switch_point(2), Some(Lsn(0x500_0000)));
        assert_eq!(h.switch_point(3), None);
        assert!(h.contains(3, Lsn(u64::MAX)));
        assert!(h.contains(1, Lsn(0x300_0000)), "at the switch point");
        assert!(!h.contains(1, Lsn(0x300_0001)), "after the switch point");
        assert!(!h.contains(4, Lsn(1)), "a later timeline");
        assert!(TimelineHistory::parse(2, "1\n").is_err());
        assert!(TimelineHistory::parse(2, "x\t0/1\n").is_err());
    }
}
