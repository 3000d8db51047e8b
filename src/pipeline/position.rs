//! Position identity: a durable WAL position means something only on the cluster, timeline,
//! database and slot it was taken from. A position carried over to a re-created cluster, a
//! restored backup or a new slot would make the bridge resume past changes it never read and
//! confirm them to PostgreSQL. This module decides, before anything is confirmed, whether the
//! state file's position may be resumed from; it also holds the timeline history that gives
//! each commit its timeline, and the message-id namespace.

use std::fmt;
use std::path::PathBuf;

use crate::pg::timeline::TimelineHistory;
use crate::pg::Lsn;

/// Version of the state file's `key=value` format.
pub const STATE_FORMAT_VERSION: u32 = 1;

/// What a durable position belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PositionIdentity {
    /// The cluster's system identifier (`IDENTIFY_SYSTEM`), decimal.
    pub system_id: String,
    /// The server's timeline when the position was stored.
    pub timeline: u32,
    /// The database streamed from.
    pub database: String,
    /// The replication slot.
    pub slot: String,
}

impl fmt::Display for PositionIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "system {} timeline {} database '{}' slot '{}'",
            self.system_id, self.timeline, self.database, self.slot
        )
    }
}

/// What a state file holds: a position and, unless the file predates identities, what the
/// position belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    /// The last position stored in the stream.
    pub lsn: Lsn,
    /// `None` for the old one-line `X/X` format.
    pub identity: Option<PositionIdentity>,
}

/// Shows a recorded identity, or says it is unknown.
struct ShowRecorded<'a>(&'a Option<PositionIdentity>);

impl fmt::Display for ShowRecorded<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(id) => id.fmt(f),
            None => f.write_str("identity not recorded (old state file format)"),
        }
    }
}

/// The state file's text: a comment, then `key=value` lines.
pub fn render_state(lsn: Lsn, identity: &PositionIdentity) -> String {
    format!(
        "# pgbridge state: the last position stored in the stream, and where it belongs\n\
         version={STATE_FORMAT_VERSION}\nlsn={lsn}\nsystem_identifier={}\ntimeline={}\n\
         database={}\nslot={}\n",
        escape(&identity.system_id),
        identity.timeline,
        escape(&identity.database),
        escape(&identity.slot),
    )
}

/// Reads a state file's text: the `key=value` format, or the old one-line `X/X` (identity
/// unknown). The error says what is wrong.
pub fn parse_state(text: &str) -> Result<Recorded, String> {
    let trimmed = text.trim();
    if let Ok(lsn) = trimmed.parse::<Lsn>() {
        return Ok(Recorded {
            lsn,
            identity: None,
        });
    }
    let (mut version, mut lsn, mut system_id, mut timeline, mut database, mut slot) =
        (None, None, None, None, None, None);
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| format!("line {line:?} is not key=value"))?;
        let value = unescape(value);
        match key.trim() {
            "version" => version = Some(value),
            "lsn" => lsn = Some(value),
            "system_identifier" => system_id = Some(value),
            "timeline" => timeline = Some(value),
            "database" => database = Some(value),
            "slot" => slot = Some(value),
            // Later versions may add keys; what this one needs is checked below.
            _ => {}
        }
    }
    let need = |v: Option<String>, key: &str| v.ok_or_else(|| format!("no {key}= line"));
    let version = need(version, "version")?;
    if version.parse::<u32>().ok() != Some(STATE_FORMAT_VERSION) {
        return Err(format!(
            "format version {version:?} is not {STATE_FORMAT_VERSION} (written by a newer bridge?)"
        ));
    }
    let lsn = need(lsn, "lsn")?;
    let lsn = lsn.parse().map_err(|_| format!("lsn {lsn:?} is not X/X"))?;
    let timeline = need(timeline, "timeline")?;
    let timeline = timeline
        .parse()
        .map_err(|_| format!("timeline {timeline:?} is not a number"))?;
    Ok(Recorded {
        lsn,
        identity: Some(PositionIdentity {
            system_id: need(system_id, "system_identifier")?,
            timeline,
            database: need(database, "database")?,
            slot: need(slot, "slot")?,
        }),
    })
}

/// Database names may hold any character: `%`, CR and LF are written as `%XX` so every value
/// stays on its line.
fn escape(v: &str) -> String {
    v.replace('%', "%25")
        .replace('\n', "%0A")
        .replace('\r', "%0D")
}

fn unescape(v: &str) -> String {
    v.replace("%0A", "\n")
        .replace("%0D", "\r")
        .replace("%25", "%")
}

/// What the server says at start.
#[derive(Clone, Debug)]
pub struct Found {
    /// The server's identity now (current timeline, this database, the configured slot).
    pub identity: PositionIdentity,
    /// The slot's `confirmed_flush_lsn`, `None` when the slot does not exist.
    pub slot: Option<Lsn>,
    /// `pg_current_wal_lsn()`.
    pub current_wal: Lsn,
    /// The current timeline's history.
    pub history: TimelineHistory,
}

/// Where streaming resumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resume {
    /// From the state file's position: the slot is at or a little below it (the file is
    /// written before PostgreSQL is told, so a crash leaves it ahead).
    File(Lsn),
    /// From the slot (created when missing): no state file, or the slot is ahead of it.
    Slot,
}

/// The verdict of [`check`] when the position may be resumed from, with what to log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Where to resume.
    pub resume: Resume,
    /// Lines to log at start (level, text).
    pub notes: Vec<(log::Level, String)>,
}

/// The tail of every refusal: how to accept the gap, or why not to.
const ACCEPT_HINT: &str = "to start from the slot anyway and accept that the changes in between are not streamed, start once with --accept-position-gap (BRIDGE_ACCEPT_POSITION_GAP=true); if the old cluster is gone for good, removing the state file does the same";

/// Why a recorded position must not be resumed from: resuming would skip changes (or confirm
/// positions of another history) without a word. Each message is one line that says what is
/// recorded, what was found and how to accept the gap.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PositionError {
    /// The file belongs to another cluster, database or slot.
    #[error("state file {} holds position {lsn} of {recorded}, but this is {found} (a re-created or different cluster, database or slot): resuming there would skip changes; {ACCEPT_HINT}", path.display())]
    OtherIdentity {
        /// The state file.
        path: PathBuf,
        /// Its position.
        lsn: Lsn,
        /// What it belongs to.
        recorded: PositionIdentity,
        /// What the server is.
        found: PositionIdentity,
    },
    /// The recorded position is beyond the end of the server's WAL.
    #[error("state file {} holds position {lsn} ({}), ahead of the server's current WAL position {current_wal} ({found}): the database was restored or re-created, and resuming there would skip every change up to {lsn}; {ACCEPT_HINT}", path.display(), ShowRecorded(recorded))]
    AheadOfServer {
        /// The state file.
        path: PathBuf,
        /// Its position.
        lsn: Lsn,
        /// What it belongs to, when recorded.
        recorded: Option<PositionIdentity>,
        /// `pg_current_wal_lsn()`.
        current_wal: Lsn,
        /// What the server is.
        found: PositionIdentity,
    },
    /// The slot does not exist while the file holds a position: a new slot starts at the
    /// server's current position, past whatever happened since the old one was dropped.
    #[error("state file {} holds position {lsn} ({}), but replication slot '{slot}' does not exist ({found}): a new slot starts at the current WAL position, so the changes since the old slot was dropped (or the cluster re-created) would be skipped; {ACCEPT_HINT}", path.display(), ShowRecorded(recorded))]
    SlotMissing {
        /// The state file.
        path: PathBuf,
        /// Its position.
        lsn: Lsn,
        /// What it belongs to, when recorded.
        recorded: Option<PositionIdentity>,
        /// The slot.
        slot: String,
        /// What the server is.
        found: PositionIdentity,
    },
    /// The slot does not exist on a server that went through a promotion since the position
    /// was stored (or on the server the bridge reconnected to): the standby did not keep it.
    #[error("replication slot '{}' does not exist on the server ({found}{}), while the stream holds every change up to {lsn} (state file {}): the server was promoted from a standby that did not keep the slot, and a new slot would start at its current position and skip the changes committed since {lsn}; to follow a promotion make the slot a failover slot on the primary (PostgreSQL 17+, --failover-slot) and set sync_replication_slots = on, hot_standby_feedback = on and a primary_conninfo with dbname on the standby (docs/operations.md, Failover); {ACCEPT_HINT}", found.slot, promotion_story(*recorded_timeline, found.timeline, *switch_point), path.display())]
    SlotLost {
        /// The state file.
        path: PathBuf,
        /// The durable position.
        lsn: Lsn,
        /// The timeline the position was stored on.
        recorded_timeline: u32,
        /// Where that timeline ended on the server's history, if it is on it.
        switch_point: Option<Lsn>,
        /// What the server is.
        found: PositionIdentity,
    },
    /// The server's timeline left the recorded one before the recorded position.
    #[error("state file {} holds position {lsn} on timeline {recorded_timeline} ({recorded}), which is not on the history of the server's timeline {} ({}): the server was restored to an earlier point (PITR) or promoted before it had that position, and changes of the old timeline after the switch are not on this one; {ACCEPT_HINT}", path.display(), found.timeline, timeline_story(*recorded_timeline, *switch_point))]
    TimelineDiverged {
        /// The state file.
        path: PathBuf,
        /// Its position.
        lsn: Lsn,
        /// The recorded timeline.
        recorded_timeline: u32,
        /// What it belongs to.
        recorded: PositionIdentity,
        /// Where the recorded timeline ended on the server's history, if it is on it.
        switch_point: Option<Lsn>,
        /// What the server is.
        found: PositionIdentity,
    },
}

fn promotion_story(recorded: u32, current: u32, switch_point: Option<Lsn>) -> String {
    match (recorded == current, switch_point) {
        (true, _) => String::new(),
        (false, Some(sw)) => format!(", promoted from timeline {recorded} to {current} at {sw}"),
        (false, None) => format!(", timeline {current}; the position is on timeline {recorded}"),
    }
}

pub(crate) fn timeline_story(tli: u32, switch_point: Option<Lsn>) -> String {
    match switch_point {
        Some(sw) => format!("timeline {tli} ended at {sw}"),
        None => format!("timeline {tli} is not in its history"),
    }
}

impl PositionError {
    /// The range of WAL that is not streamed when the gap is accepted: from the recorded
    /// position to `slot` (where streaming starts instead), as text for the log.
    pub fn skipped_range(&self, slot: Lsn) -> String {
        let lsn = match self {
            PositionError::OtherIdentity { lsn, .. }
            | PositionError::AheadOfServer { lsn, .. }
            | PositionError::SlotMissing { lsn, .. }
            | PositionError::SlotLost { lsn, .. }
            | PositionError::TimelineDiverged { lsn, .. } => *lsn,
        };
        let recorded = match self {
            PositionError::OtherIdentity { recorded, .. }
            | PositionError::TimelineDiverged { recorded, .. } => Some(recorded.clone()),
            PositionError::SlotLost {
                recorded_timeline,
                found,
                ..
            } => Some(PositionIdentity {
                timeline: *recorded_timeline,
                ..found.clone()
            }),
            PositionError::AheadOfServer { recorded, .. }
            | PositionError::SlotMissing { recorded, .. } => recorded.clone(),
        };
        let found = match self {
            PositionError::OtherIdentity { found, .. }
            | PositionError::AheadOfServer { found, .. }
            | PositionError::SlotMissing { found, .. }
            | PositionError::SlotLost { found, .. }
            | PositionError::TimelineDiverged { found, .. } => found,
        };
        format!(
            "from {lsn} (recorded: {}) to {slot} (found: {found})",
            ShowRecorded(&recorded)
        )
    }
}

/// Decides where to resume, or refuses. `path` names the state file in messages.
pub fn check(
    path: &std::path::Path,
    recorded: Option<&Recorded>,
    found: &Found,
) -> Result<Verdict, Box<PositionError>> {
    let mut notes = Vec::new();
    let Some(rec) = recorded else {
        return Ok(Verdict {
            resume: Resume::Slot,
            notes,
        });
    };
    let path = path.to_path_buf();
    let lsn = rec.lsn;
    match &rec.identity {
        Some(id) => {
            let f = &found.identity;
            if id.system_id != f.system_id || id.database != f.database || id.slot != f.slot {
                return Err(Box::new(PositionError::OtherIdentity {
                    path,
                    lsn,
                    recorded: id.clone(),
                    found: f.clone(),
                }));
            }
            if id.timeline != f.timeline {
                if !found.history.contains(id.timeline, lsn) {
                    return Err(Box::new(PositionError::TimelineDiverged {
                        path,
                        lsn,
                        recorded_timeline: id.timeline,
                        recorded: id.clone(),
                        switch_point: found.history.switch_point(id.timeline),
                        found: f.clone(),
                    }));
                }
                let switch = found
                    .history
                    .switch_point(id.timeline)
                    .map_or_else(|| "?".to_string(), |s| s.to_string());
                notes.push((
                    log::Level::Info,
                    format!(
                        "the server moved from timeline {} to {} (switch point {switch}, after the stored position {lsn}): a promotion; resuming on timeline {}",
                        id.timeline, f.timeline, f.timeline
                    ),
                ));
            }
        }
        None => notes.push((
            log::Level::Info,
            "the state file has the old one-line format without identity; it is checked against the server's WAL and slot only, and rewritten with system, timeline, database and slot at the next write".into(),
        )),
    }
    if lsn > found.current_wal {
        return Err(Box::new(PositionError::AheadOfServer {
            path,
            lsn,
            recorded: rec.identity.clone(),
            current_wal: found.current_wal,
            found: found.identity.clone(),
        }));
    }
    let Some(slot) = found.slot else {
        if let Some(id) = rec
            .identity
            .as_ref()
            .filter(|id| id.timeline != found.identity.timeline)
        {
            return Err(Box::new(PositionError::SlotLost {
                path,
                lsn,
                recorded_timeline: id.timeline,
                switch_point: found.history.switch_point(id.timeline),
                found: found.identity.clone(),
            }));
        }
        return Err(Box::new(PositionError::SlotMissing {
            path,
            lsn,
            recorded: rec.identity.clone(),
            slot: found.identity.slot.clone(),
            found: found.identity.clone(),
        }));
    };
    if slot > lsn {
        notes.push((
            log::Level::Warn,
            format!(
                "replication slot '{}' is at {slot}, ahead of this bridge's state file ({lsn}): another process confirmed the changes in between (a bridge that held the slot before this one took over, or a slot advanced by hand); resuming from the slot",
                found.identity.slot
            ),
        ));
        return Ok(Verdict {
            resume: Resume::Slot,
            notes,
        });
    }
    Ok(Verdict {
        resume: Resume::File(lsn),
        notes,
    })
}

/// 64-bit FNV-1a: small, stable across versions and platforms (unlike std's hasher).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The default message-id namespace: the 64-bit FNV-1a hash of
/// `{system_identifier}/{database}/{publication}`, folded to 32 bits (upper half xor lower
/// half), as 8 lowercase hex digits. A re-created cluster or another publication gets another
/// namespace; bridges sharing a publication in one database share it.
pub fn default_namespace(system_id: &str, database: &str, publication: &str) -> String {
    let h = fnv1a64(format!("{system_id}/{database}/{publication}").as_bytes());
    format!("{:08x}", (h >> 32) ^ (h & 0xFFFF_FFFF))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(system: &str, timeline: u32) -> PositionIdentity {
        PositionIdentity {
            system_id: system.into(),
            timeline,
            database: "app".into(),
            slot: "cdc_slot".into(),
        }
    }

    fn found(system: &str, history: TimelineHistory, slot: Option<u64>, wal: u64) -> Found {
        Found {
            identity: id(system, history.current()),
            slot: slot.map(Lsn),
            current_wal: Lsn(wal),
            history,
        }
    }

    fn rec(lsn: u64, identity: Option<PositionIdentity>) -> Recorded {
        Recorded {
            lsn: Lsn(lsn),
            identity,
        }
    }

    fn path() -> &'static std::path::Path {
        std::path::Path::new("/data/bridge.lsn")
    }

    #[test]
    fn state_text_round_trips_and_reads_the_old_format() {
        let mut identity = id("7312345678901234567", 3);
        identity.database = "odd%name\nwith=signs".into();
        let text = render_state(Lsn(0x1_0000_0010), &identity);
        assert!(text.contains("\nversion=1\nlsn=1/10\n"), "{text}");
        assert!(text.contains("system_identifier=7312345678901234567\n"));
        assert!(
            text.contains("database=odd%25name%0Awith=signs\n"),
            "{text}"
        );
        assert_eq!(
            parse_state(&text).unwrap(),
            rec(0x1_0000_0010, Some(identity.clone()))
        );
        // The old one-line format: a position without identity.
        assert_eq!(parse_state("0/16B3748\n").unwrap(), rec(0x16B3748, None));
        // Unknown keys (a later version's additions) are ignored; missing ones are not.
        let extra = text.replace("slot=", "flavour=x\nslot=");
        assert_eq!(parse_state(&extra).unwrap().identity, Some(identity));
        for (bad, why) in [
            ("garbage", "not key=value"),
            ("version=1\nlsn=0/1\n", "no timeline="),
            ("version=2\nlsn=0/1\n", "format version"),
            (
                "version=1\nlsn=x\nsystem_identifier=1\ntimeline=1\ndatabase=a\nslot=s\n",
                "is not X/X",
            ),
        ] {
            let e = parse_state(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn namespace_hash_is_stable() {
        // Fixed inputs, fixed outputs: changing them would change every message id.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(
            default_namespace("7312345678901234567", "app", "cdc_pub"),
            default_namespace("7312345678901234567", "app", "cdc_pub")
        );
        assert_eq!(
            default_namespace("7312345678901234567", "app", "cdc_pub"),
            "89820f86"
        );
        let ns = default_namespace("1", "app", "cdc_pub");
        assert_eq!(ns.len(), 8);
        assert!(ns
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_ne!(ns, default_namespace("2", "app", "cdc_pub"));
        assert_ne!(ns, default_namespace("1", "app", "other_pub"));
        assert_ne!(ns, default_namespace("1", "app2", "cdc_pub"));
    }

    #[test]
    fn no_file_or_the_normal_cases_resume() {
        let f = found("1", TimelineHistory::single(1), Some(0x100), 0x1000);
        let v = check(path(), None, &f).unwrap();
        assert_eq!(v.resume, Resume::Slot);
        assert!(v.notes.is_empty());
        // Crash: the slot a little below the file.
        let v = check(path(), Some(&rec(0x180, Some(id("1", 1)))), &f).unwrap();
        assert_eq!(v.resume, Resume::File(Lsn(0x180)));
        assert!(v.notes.is_empty());
        // Equal.
        let v = check(path(), Some(&rec(0x100, Some(id("1", 1)))), &f).unwrap();
        assert_eq!(v.resume, Resume::File(Lsn(0x100)));
        // A standby taking over: the slot ahead of its older file.
        let v = check(path(), Some(&rec(0x80, Some(id("1", 1)))), &f).unwrap();
        assert_eq!(v.resume, Resume::Slot);
        assert_eq!(v.notes.len(), 1);
        assert_eq!(v.notes[0].0, log::Level::Warn);
        assert!(v.notes[0].1.contains("took over"), "{:?}", v.notes);
        assert!(!v.notes[0].1.contains("loss"), "{:?}", v.notes);
        // The old format is checked against WAL and slot, and says it will be upgraded.
        let v = check(path(), Some(&rec(0x180, None)), &f).unwrap();
        assert_eq!(v.resume, Resume::File(Lsn(0x180)));
        assert!(
            v.notes[0].1.contains("old one-line format"),
            "{:?}",
            v.notes
        );
    }

    #[test]
    fn another_cluster_database_or_slot_is_refused() {
        let f = found("2", TimelineHistory::single(1), Some(0x100), 0x1000);
        let e = check(path(), Some(&rec(0x180, Some(id("1", 1)))), &f).unwrap_err();
        assert!(matches!(*e, PositionError::OtherIdentity { .. }));
        let line = e.to_string();
        assert!(!line.contains('\n'));
        for part in [
            "/data/bridge.lsn",
            "0/180",
            "system 1 timeline 1",
            "system 2 timeline 1",
            "--accept-position-gap",
            "removing the state file",
        ] {
            assert!(line.contains(part), "{part}: {line}");
        }
        let mut other_db = id("2", 1);
        other_db.database = "other".into();
        assert!(matches!(
            check(path(), Some(&rec(0x10, Some(other_db))), &f).map_err(|e| *e),
            Err(PositionError::OtherIdentity { .. })
        ));
        let mut other_slot = id("2", 1);
        other_slot.slot = "other".into();
        assert!(matches!(
            check(path(), Some(&rec(0x10, Some(other_slot))), &f).map_err(|e| *e),
            Err(PositionError::OtherIdentity { .. })
        ));
        assert!(e
            .skipped_range(Lsn(0x100))
            .starts_with("from 0/180 (recorded: system 1"));
    }

    #[test]
    fn a_position_ahead_of_the_wal_or_without_its_slot_is_refused() {
        let f = found("1", TimelineHistory::single(1), Some(0x100), 0x1000);
        let e = check(path(), Some(&rec(0x2000, Some(id("1", 1)))), &f).unwrap_err();
        assert!(matches!(*e, PositionError::AheadOfServer { .. }), "{e}");
        assert!(e.to_string().contains("current WAL position 0/1000"), "{e}");
        let e = check(path(), Some(&rec(0x2000, None)), &f).unwrap_err();
        assert!(e.to_string().contains("identity not recorded"), "{e}");
        let gone = found("1", TimelineHistory::single(1), None, 0x1000);
        let e = check(path(), Some(&rec(0x180, Some(id("1", 1)))), &gone).unwrap_err();
        assert!(matches!(*e, PositionError::SlotMissing { .. }), "{e}");
        assert!(e.to_string().contains("'cdc_slot' does not exist"), "{e}");
        // Without a file a missing slot is simply created.
        assert_eq!(check(path(), None, &gone).unwrap().resume, Resume::Slot);
    }

    #[test]
    fn a_promotion_is_accepted_and_a_diverged_timeline_is_not() {
        let h = TimelineHistory::parse(2, "1\t0/5000000\tno recovery target specified\n").unwrap();
        let f = found("1", h, Some(0x100), 0x600_0000);
        // Stored on timeline 1 before the switch: a promotion.
        let v = check(path(), Some(&rec(0x480_0000, Some(id("1", 1)))), &f).unwrap();
        assert_eq!(v.resume, Resume::File(Lsn(0x480_0000)));
        assert!(
            v.notes[0]
                .1
                .contains("from timeline 1 to 2 (switch point 0/5000000"),
            "{:?}",
            v.notes
        );
        // Stored on timeline 1 after the switch: that WAL is not on timeline 2.
        let e = check(path(), Some(&rec(0x580_0000, Some(id("1", 1)))), &f).unwrap_err();
        assert!(matches!(*e, PositionError::TimelineDiverged { .. }), "{e}");
        assert!(
            e.to_string().contains("timeline 1 ended at 0/5000000"),
            "{e}"
        );
        // A timeline the server never had.
        let e = check(path(), Some(&rec(0x80, Some(id("1", 5)))), &f).unwrap_err();
        assert!(
            e.to_string().contains("timeline 5 is not in its history"),
            "{e}"
        );
    }

    #[test]
    fn a_promoted_server_without_the_slot_is_refused_with_the_failover_advice() {
        let h = TimelineHistory::parse(2, "1\t0/5000000\tno recovery target specified\n").unwrap();
        let f = found("1", h, None, 0x600_0000);
        let e = check(path(), Some(&rec(0x480_0000, Some(id("1", 1)))), &f).unwrap_err();
        assert!(matches!(*e, PositionError::SlotLost { .. }), "{e}");
        let line = e.to_string();
        assert!(!line.contains('\n'));
        for part in [
            "'cdc_slot' does not exist",
            "promoted from timeline 1 to 2 at 0/5000000",
            "every change up to 0/4800000",
            "sync_replication_slots = on",
            "--failover-slot",
            "--accept-position-gap",
        ] {
            assert!(line.contains(part), "{part}: {line}");
        }
        assert!(e
            .skipped_range(Lsn(0x600_0000))
            .contains("recorded: system 1 timeline 1"));
    }
}
