//! Following the CDC stream: changes applied in SQLite transactions that end only between
//! source transactions, with the stored positions moving in the same transactions.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::{self, kv, Message};
use futures_util::{FutureExt, StreamExt};
use rmpv::Value;

use super::store::{self, Version};
use super::{
    doc, open_stream, Applied, ColumnEvidence, FollowEnd, Mirror, MirrorError, MirrorTable,
    Position, ACK_INSIDE_TRANSACTION_EVERY, ACK_WAIT, COMMIT_EVERY, IDLE_COMMIT, MAX_ACK_PENDING,
    PROBE_MESSAGES, SCHEMA_RECHECK, TOMBSTONE_PRUNE_EVERY, TOMBSTONE_TTL,
};
use crate::pg::Lsn;
use crate::wire::decode::{self, DocError};
use crate::wire::event::Operation;
use crate::wire::fields;
use crate::wire::id::id_commit_lsn;
use crate::wire::names::SCHEMAS_BUCKET;
use crate::wire::names::{LAST_IN_TX_HEADER, LAST_IN_TX_VALUE};
use crate::wire::subject::{
    parse_table_token, schema_key_token, table_changes_filter, table_token,
};

impl Mirror {
    /// Follows the CDC stream from the stored positions.
    pub(super) async fn follow(&mut self) -> Result<FollowEnd, MirrorError> {
        let mut positions: HashMap<String, Position> = HashMap::new();
        for t in &self.tables {
            if let Some(p) = self.store.position(&t.token)? {
                positions.insert(t.token.clone(), p);
            }
        }
        let mut cdc = open_stream(&self.js, &self.cdc).await?;
        let first = cdc
            .info()
            .await
            .map_err(|e| MirrorError::JetStream(e.to_string()))?
            .state
            .first_sequence;
        let stale: Vec<String> = positions
            .iter()
            .filter(|(_, p)| p.last_seq + 1 < first)
            .map(|(t, p)| {
                log::info!(
                    "the CDC stream no longer holds sequence {} of {t} (it starts at {first}): \
                     taking a new snapshot",
                    p.last_seq + 1
                );
                t.clone()
            })
            .collect();
        if !stale.is_empty() {
            return Ok(FollowEnd::Snapshot(stale));
        }
        let start = positions.values().map(|p| p.last_seq).min().unwrap_or(0) + 1;
        let durable = self.options.durable.clone();
        // The SQLite file holds the position: the consumer is made anew from it each time.
        let _ = cdc.delete_consumer(&durable).await;
        let consumer = cdc
            .create_consumer(pull::Config {
                durable_name: Some(durable.clone()),
                description: Some(format!(
                    "pgbridge mirror into {}",
                    self.options.db.display()
                )),
                filter_subjects: self
                    .tables
                    .iter()
                    .map(|t| table_changes_filter(&t.token))
                    .collect(),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                },
                ack_policy: AckPolicy::All,
                ack_wait: ACK_WAIT,
                max_ack_pending: MAX_ACK_PENDING,
                ..Default::default()
            })
            .await
            .map_err(|e| MirrorError::JetStream(format!("creating consumer {durable}: {e}")))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| MirrorError::JetStream(e.to_string()))?;
        log::info!(
            "following stream {} from sequence {start} (consumer {durable})",
            self.cdc
        );
        // Without --table, a table whose schema appears later (the bridge writes them one by
        // one at its start, and again for a table new to the publication) is mirrored too; and
        // a mirrored table's new schema settles what its changes already suggested.
        let mut schemas = self.watch_schemas().await;

        let mut idle_since = Instant::now();
        let mut last: Option<Message> = None;
        // The source transaction of the last message, whether its end is still to come, and
        // whether any of its changes was applied (changes that come again are all skipped:
        // committing among them splits nothing).
        let mut txn: Option<Lsn> = None;
        let mut open = false;
        let mut txn_applied = false;
        let mut last_stream_seq = start.saturating_sub(1);
        let mut probe_from = 0u64;
        let mut in_batch = 0u64;
        let mut in_txn = 0u64;
        loop {
            let wait = if self.store.in_transaction() {
                IDLE_COMMIT
            } else {
                Duration::from_millis(250)
            };
            // `None`: no message for `wait`, or shutdown asked for while none was ready; then
            // the open transaction is committed (or left to the next run) at once.
            let next = tokio::select! {
                biased;
                n = tokio::time::timeout(wait, messages.next()) => n.ok(),
                _ = self.shutdown.triggered() => None,
            };
            let msg = match next {
                None => {
                    open &= txn_applied;
                    if open {
                        if let Some(t) = txn {
                            if self
                                .transaction_ended(&cdc, t, last_stream_seq, &mut probe_from)
                                .await
                            {
                                open = false;
                            }
                        }
                    }
                    if open {
                        if self.shutdown.is_triggered() {
                            // The rest of the transaction is in the stream: the next run
                            // applies it with the part seen here.
                            self.store.rollback()?;
                            return Ok(FollowEnd::Done);
                        }
                        continue;
                    }
                    self.commit(&mut positions, &mut last, &mut in_batch)
                        .await?;
                    if self.shutdown.is_triggered() {
                        return Ok(FollowEnd::Done);
                    }
                    if let Some(new) = self.schema_updates(&mut schemas).await? {
                        return Ok(FollowEnd::Snapshot(new));
                    }
                    if let Some(idle) = self.options.until_idle {
                        if idle_since.elapsed() >= idle {
                            log::info!("no change for {idle:?}: stopping");
                            return Ok(FollowEnd::Done);
                        }
                    }
                    continue;
                }
                Some(None) => {
                    self.end_early(
                        open && txn_applied,
                        &mut positions,
                        &mut last,
                        &mut in_batch,
                    )
                    .await?;
                    log::warn!("the consumer's message stream ended; following again");
                    return Ok(FollowEnd::Restart);
                }
                Some(Some(Err(e))) => {
                    self.end_early(
                        open && txn_applied,
                        &mut positions,
                        &mut last,
                        &mut in_batch,
                    )
                    .await?;
                    log::warn!("consumer {durable}: {e}; following again");
                    return Ok(FollowEnd::Restart);
                }
                Some(Some(Ok(msg))) => msg,
            };
            idle_since = Instant::now();
            let seq = msg
                .info()
                .map(|i| i.stream_sequence)
                .map_err(|e| self.bad(&msg, e))?;
            last_stream_seq = seq;
            probe_from = 0;
            let event = self.decode(&msg)?;
            if decode::is_debezium_envelope(&event) {
                return Err(self.bad(&msg, decode::DEBEZIUM_REFUSAL));
            }
            let schema =
                decode::str_field(&event, fields::SCHEMA).map_err(|e| self.bad(&msg, e))?;
            let table = decode::str_field(&event, fields::TABLE).map_err(|e| self.bad(&msg, e))?;
            let token = table_token(schema, table);
            let commit_lsn =
                decode::lsn_field(&event, fields::COMMIT_LSN).map_err(|e| self.bad(&msg, e))?;
            let last_in_tx = decode::field(&event, fields::LAST_IN_TX).and_then(Value::as_bool);
            // A change of another transaction: the one before has ended (its last change may
            // be of a table not mirrored). Commit a full batch, or stop when asked to.
            if txn != Some(commit_lsn) {
                in_txn = 0;
                txn_applied = false;
                if self.shutdown.is_triggered() {
                    self.commit(&mut positions, &mut last, &mut in_batch)
                        .await?;
                    return Ok(FollowEnd::Done);
                }
                if in_batch >= COMMIT_EVERY {
                    self.commit(&mut positions, &mut last, &mut in_batch)
                        .await?;
                    // This change stays unacknowledged: the next consumer delivers it again.
                    if let Some(new) = self.schema_updates(&mut schemas).await? {
                        return Ok(FollowEnd::Snapshot(new));
                    }
                }
                txn = Some(commit_lsn);
            }
            // Without the marker (an older bridge) the end shows only as a later transaction
            // or a pause.
            open = last_in_tx == Some(false);
            in_txn += 1;
            if in_txn.is_multiple_of(ACK_INSIDE_TRANSACTION_EVERY) {
                if let Err(e) = msg.ack().await {
                    log::debug!("acknowledgement not sent: {e}");
                }
            }
            let Some(position) = positions.get_mut(&token) else {
                last = Some(msg);
                continue;
            };
            if seq <= position.last_seq {
                self.summary.skipped += 1;
                last = Some(msg);
                continue;
            }
            self.store.begin()?;
            if commit_lsn >= position.lsn {
                let applied = self.apply(&token, &event).await.map_err(|e| match e {
                    MirrorError::BadMessage { reason, .. } => self.bad(&msg, reason),
                    e => e,
                })?;
                match applied {
                    Applied::Yes => {
                        self.summary.applied += 1;
                        txn_applied = true;
                    }
                    Applied::Stale => self.summary.skipped += 1,
                    Applied::NeedsSnapshot => {
                        // This change stays unapplied and unacknowledged: the snapshot replaces
                        // the table and its position.
                        self.end_early(true, &mut positions, &mut last, &mut in_batch)
                            .await?;
                        log::info!(
                            "{token}: a column with a default was added; taking a new snapshot"
                        );
                        return Ok(FollowEnd::Snapshot(vec![token]));
                    }
                }
            } else {
                self.summary.skipped += 1;
            }
            let position = positions.get_mut(&token).expect("looked up above");
            position.last_seq = seq;
            self.store.set_last_seq(&token, seq)?;
            in_batch += 1;
            last = Some(msg);
            if last_in_tx == Some(true) && self.shutdown.is_triggered() {
                self.commit(&mut positions, &mut last, &mut in_batch)
                    .await?;
                return Ok(FollowEnd::Done);
            }
        }
    }

    /// A watch of the schemas bucket, its present keys first; `None` (with a warning) when
    /// it cannot be made: tables present now are still mirrored, and a dropped or retyped
    /// column is followed at the table's next change.
    async fn watch_schemas(&self) -> Option<kv::Watch> {
        let watch = match self.js.get_key_value(SCHEMAS_BUCKET).await {
            Ok(bucket) => bucket
                .watch_with_history(">")
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        watch
            .map_err(|e| {
                log::warn!(
                    "cannot watch KV bucket '{SCHEMAS_BUCKET}' ({e}): tables whose schema \
                     appears later are mirrored after a restart, and columns dropped or \
                     retyped at a table's next change"
                )
            })
            .ok()
    }

    /// What the watch has shown since it was last asked. A mirrored table whose changes
    /// showed a column the stored schema did not explain gets its new schema with that
    /// evidence (the bridge may store it after the change reached the mirror). Without
    /// `--table`, tables not mirrored yet are added with their SQLite table; those, and a
    /// table that gained a column with a default, are returned for a snapshot. Called
    /// between source transactions, with nothing uncommitted. Never waits for the watch.
    async fn schema_updates(
        &mut self,
        watch: &mut Option<kv::Watch>,
    ) -> Result<Option<Vec<String>>, MirrorError> {
        let Some(w) = watch.as_mut() else {
            return Ok(None);
        };
        let mut found = Vec::new();
        let mut changed = Vec::new();
        loop {
            match w.next().now_or_never() {
                Some(Some(Ok(entry))) => {
                    if entry.operation != kv::Operation::Put {
                        continue;
                    }
                    let Ok((schema, name)) = parse_table_token(&schema_key_token(&entry.key))
                    else {
                        continue;
                    };
                    let t = MirrorTable::new(schema, name);
                    if self.table(&t.token).is_some() {
                        if self.schema_evidence.contains_key(&t.token)
                            && !changed.contains(&t.token)
                        {
                            changed.push(t.token);
                        }
                    } else if self.options.tables.is_empty()
                        && !found.iter().any(|f: &MirrorTable| f.token == t.token)
                    {
                        found.push(t);
                    }
                }
                Some(Some(Err(e))) => {
                    log::warn!("watching KV bucket '{SCHEMAS_BUCKET}': {e}; watching again");
                    *watch = self.watch_schemas().await;
                    break;
                }
                Some(None) => {
                    *watch = self.watch_schemas().await;
                    break;
                }
                None => break,
            }
        }
        let mut tokens = Vec::new();
        for token in changed {
            // The evidence stays until a change agrees with the columns: this revision may
            // not be the one that explains it (the watch shows older ones first).
            let (Some(evidence), Some(t)) = (
                self.schema_evidence.get(&token).cloned(),
                self.table(&token).cloned(),
            ) else {
                continue;
            };
            log::info!(
                "{}: its schema changed in KV bucket '{SCHEMAS_BUCKET}'; following it",
                t.local
            );
            if self.apply_evidence(&t, &evidence).await? {
                log::info!(
                    "{}: a column with a default was added; taking a new snapshot",
                    t.local
                );
                tokens.push(token);
            }
        }
        if found.is_empty() && tokens.is_empty() {
            return Ok(None);
        }
        for t in found {
            log::info!(
                "{}: its schema appeared in KV bucket '{SCHEMAS_BUCKET}'; mirroring it too",
                t.local
            );
            let schema = self.schema(&t).await?;
            self.store.apply_schema(&t.token, &t.local, &schema, None)?;
            tokens.push(t.token.clone());
            self.tables.push(t);
        }
        Ok(Some(tokens))
    }

    /// Whether the transaction at `commit_lsn`, whose last change seen so far (at stream
    /// sequence `after`) is not marked last, has ended: the stream's following messages, of any
    /// table, show either its marked last change or a change of a later transaction. Reads
    /// at most [`PROBE_MESSAGES`] from `probe_from` on (0: from `after + 1`), and remembers
    /// where it stopped.
    async fn transaction_ended(
        &self,
        cdc: &jetstream::stream::Stream,
        commit_lsn: Lsn,
        after: u64,
        probe_from: &mut u64,
    ) -> bool {
        let Ok(info) = cdc.get_info().await else {
            return false;
        };
        let end = info.state.last_sequence;
        let mut seq = (*probe_from).max(after + 1);
        let stop = end.min(seq + PROBE_MESSAGES - 1);
        while seq <= stop {
            // A message gone from the stream (limits) says nothing.
            if let Ok(m) = cdc.get_raw_message(seq).await {
                let id_lsn = m
                    .headers
                    .get(async_nats::header::NATS_MESSAGE_ID)
                    .and_then(|v| id_commit_lsn(v.as_str()));
                let marked = m
                    .headers
                    .get(LAST_IN_TX_HEADER)
                    .is_some_and(|v| v.as_str() == LAST_IN_TX_VALUE);
                match id_lsn {
                    Some(l) if l != commit_lsn => return true,
                    Some(_) if marked => return true,
                    _ => {}
                }
            }
            seq += 1;
        }
        *probe_from = seq;
        false
    }

    /// Ends following before the stream did: commits what was applied when it stopped between
    /// source transactions (`open` false), rolls it back otherwise (the next run applies the
    /// whole transaction again, from the positions in the file).
    async fn end_early(
        &mut self,
        open: bool,
        positions: &mut HashMap<String, Position>,
        last: &mut Option<Message>,
        in_batch: &mut u64,
    ) -> Result<(), MirrorError> {
        if open {
            self.store.rollback()?;
            *last = None;
            *in_batch = 0;
            Ok(())
        } else {
            self.commit(positions, last, in_batch).await
        }
    }

    /// Commits the open transaction and acknowledges every message up to the last one.
    ///
    /// The consumer delivers every change of every mirrored table in stream order, so once the
    /// message at sequence `s` is handled, no table has an unseen change before `s`: each
    /// table's stored sequence moves up to `s` with the commit. A table that rarely changes
    /// then does not fall behind the stream's limits and need a snapshot it does not need.
    async fn commit(
        &mut self,
        positions: &mut HashMap<String, Position>,
        last: &mut Option<Message>,
        in_batch: &mut u64,
    ) -> Result<(), MirrorError> {
        if let Some(seq) = last
            .as_ref()
            .and_then(|m| m.info().ok())
            .map(|i| i.stream_sequence)
        {
            for (token, p) in positions.iter_mut() {
                if p.last_seq < seq {
                    self.store.begin()?;
                    p.last_seq = seq;
                    self.store.set_last_seq(token, seq)?;
                }
            }
        }
        if self.tombstones_pruned.elapsed() >= TOMBSTONE_PRUNE_EVERY {
            self.store.begin()?;
            let n = self.store.prune_tombstones()?;
            log::debug!("{n} tombstones older than {TOMBSTONE_TTL:?} dropped");
            self.tombstones_pruned = Instant::now();
        }
        self.store.commit()?;
        *in_batch = 0;
        if let Some(msg) = last.take() {
            // AckAll: one acknowledgement covers every earlier message. A lost one only
            // means a redelivery, which the stored sequences skip.
            if let Err(e) = msg.ack().await {
                log::debug!("acknowledgement not sent: {e}");
            }
        }
        Ok(())
    }

    /// Applies one change event to the table, unless it is not newer than the row it changes.
    async fn apply(&mut self, token: &str, event: &Value) -> Result<Applied, MirrorError> {
        let bad = |e: DocError| MirrorError::BadMessage {
            stream: String::new(),
            seq: 0,
            reason: e.0,
        };
        let op = decode::str_field(event, fields::OPERATION).map_err(bad)?;
        let version: Version = (
            decode::lsn_field(event, fields::COMMIT_LSN).map_err(bad)?.0,
            u32::try_from(decode::u64_field(event, fields::SEQ).map_err(bad)?).unwrap_or(u32::MAX),
        );
        let operation = Operation::from_upper(op);
        if operation == Some(Operation::Truncate) {
            if !self.store.is_newer(token, &[], version)? {
                return Ok(Applied::Stale);
            }
            self.store.truncate(token, version)?;
            return Ok(Applied::Yes);
        }
        let columns = decode::column_pairs(event, fields::COLUMNS).map_err(bad)?;
        let key = self.store.key_of(token, &columns)?;
        let key_text = store::key_text(&key);
        match operation {
            Some(Operation::Insert | Operation::Update) => {
                let old = decode::column_pairs(event, fields::OLD_COLUMNS).map_err(bad)?;
                let old_key = if old.is_empty() {
                    None
                } else {
                    Some(self.store.key_of(token, &old)?).filter(|k| *k != key)
                };
                let old_text = old_key.as_deref().map(store::key_text);
                let mut keys = vec![key_text.as_str()];
                keys.extend(old_text.as_deref());
                if !self.store.is_newer(token, &keys, version)? {
                    return Ok(Applied::Stale);
                }
                if self.follow_schema(token, event, &columns).await? {
                    return Ok(Applied::NeedsSnapshot);
                }
                if let (Some(old_key), Some(old_text)) = (&old_key, &old_text) {
                    self.store.move_key(token, old_key, &key)?;
                    self.store.set_version(token, old_text, version, true)?;
                }
                // Columns in `unchanged_toast` are not in `columns`: the row keeps them.
                self.store.upsert(token, &columns)?;
                self.store.set_version(token, &key_text, version, false)?;
            }
            Some(Operation::Delete) => {
                if !self.store.is_newer(token, &[key_text.as_str()], version)? {
                    return Ok(Applied::Stale);
                }
                self.store.delete(token, &key)?;
                self.store.set_version(token, &key_text, version, true)?;
            }
            _ => return Err(bad(DocError(format!("unknown operation {op:?}")))),
        }
        Ok(Applied::Yes)
    }

    /// Brings the table's columns in line with what an INSERT or UPDATE shows: adds the
    /// columns it lacks, and when a column is missing from the change (not an unchanged TOAST
    /// value) or a value does not fit its column's type, reads the newest schema (at most every
    /// [`SCHEMA_RECHECK`]) to drop or retype. What the change showed is kept while the schema
    /// does not explain it, for the schema watch. Returns true when the table needs a new
    /// snapshot (a column with a default was added).
    async fn follow_schema(
        &mut self,
        token: &str,
        event: &Value,
        columns: &[(&str, &Value)],
    ) -> Result<bool, MirrorError> {
        let names: Vec<&str> = columns.iter().map(|c| c.0).collect();
        if self.ensure_columns(token, &names).await? {
            return Ok(true);
        }
        let Some(evidence) = self.column_evidence(token, event, columns) else {
            if !self.schema_evidence.is_empty() {
                self.schema_evidence.remove(token);
            }
            return Ok(false);
        };
        // Kept until the columns explain a change again: the schema watch applies the
        // bridge's next schema with it.
        self.schema_evidence
            .insert(token.to_owned(), evidence.clone());
        if self
            .schema_checked
            .get(token)
            .is_some_and(|t| t.elapsed() < SCHEMA_RECHECK)
        {
            return Ok(false);
        }
        self.schema_checked.insert(token.to_owned(), Instant::now());
        let Some(t) = self.table(token).cloned() else {
            return Ok(false);
        };
        let added_with_default = self.apply_evidence(&t, &evidence).await?;
        if self.column_evidence(token, event, columns).is_none() {
            self.schema_evidence.remove(token);
        }
        Ok(added_with_default)
    }

    /// Reads the table's newest schema and applies it with what a change showed (see
    /// [`store::Store::apply_schema`]); true when a column with a default was added.
    async fn apply_evidence(
        &mut self,
        t: &MirrorTable,
        evidence: &ColumnEvidence,
    ) -> Result<bool, MirrorError> {
        let schema = self.schema(t).await?;
        let present: Vec<&str> = evidence.present.iter().map(String::as_str).collect();
        let misfits: Vec<&str> = evidence.misfits.iter().map(String::as_str).collect();
        Ok(self
            .store
            .apply_schema(&t.token, &t.local, &schema, Some((&present, &misfits)))?)
    }

    /// Where the change's columns disagree with the mirrored table, if anywhere: a column
    /// it lacks (not an unchanged TOAST value), or a value that does not fit its column's type.
    fn column_evidence(
        &self,
        token: &str,
        event: &Value,
        columns: &[(&str, &Value)],
    ) -> Option<ColumnEvidence> {
        let kinds = self.store.column_kinds(token)?;
        let toast: Vec<&str> = match decode::field(event, fields::UNCHANGED_TOAST) {
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        let present = |k: &str| columns.iter().any(|c| c.0 == k) || toast.contains(&k);
        let missing = kinds.keys().any(|k| !present(k));
        let misfits: Vec<String> = columns
            .iter()
            .filter(|(n, v)| kinds.get(*n).is_some_and(|k| !doc::fits(*k, v)))
            .map(|c| c.0.to_owned())
            .collect();
        if !missing && misfits.is_empty() {
            return None;
        }
        let mut carried: Vec<String> = columns.iter().map(|c| c.0.to_owned()).collect();
        carried.extend(toast.iter().map(|t| (*t).to_owned()));
        Some(ColumnEvidence {
            present: carried,
            misfits,
        })
    }
}
