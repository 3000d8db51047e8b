//! `bridge tail`: prints the CDC stream's changes as JSON lines, through an ordered consumer
//! (ephemeral: nothing is left on the server). Filters by table and operation become the
//! consumer's subject filters, so the server sends only what is shown.

use std::collections::VecDeque;
use std::io::Write;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::{self, stream::Stream};
use futures_util::StreamExt;

use super::{on_nats, open_stream, render, WatchError};
use crate::config::Config;
use crate::shutdown::Shutdown;
use crate::wire::event::Operation;
use crate::wire::names::CDC_SUBJECT_PREFIX;
use crate::wire::subject::{table_token, DEFAULT_SCHEMA};

/// NATS connection name.
const CONNECTION_NAME: &str = "pgbridge-tail";

/// Where `bridge tail` starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// Only changes published from now on.
    New,
    /// Every change the stream holds.
    All,
    /// The last N changes that pass the filters, then the new ones.
    Last(u64),
}

/// What `bridge tail` shows.
#[derive(Clone, Debug)]
pub struct TailOptions {
    /// Tables as `table` (schema `public`) or `schema.table`; empty: every table.
    pub tables: Vec<String>,
    /// Operations in lower case (`insert`, ...); empty: every operation.
    pub ops: Vec<String>,
    /// Where to start.
    pub start: Start,
    /// Stop after this many changes.
    pub count: Option<u64>,
    /// Stop after this long without a change.
    pub until_idle: Option<Duration>,
    /// Colour the output (only on a terminal).
    pub colour: bool,
}

/// The consumer's subject filters for the tables and operations: `cdc.>` for everything; with
/// operations only, both the public (`cdc.*.{op}`) and the schema-qualified (`cdc.*.*.{op}`)
/// forms.
pub fn filter_subjects(tables: &[String], ops: &[String]) -> Result<Vec<String>, WatchError> {
    let mut tokens = Vec::new();
    for t in tables {
        let token = table_spec_token(t)?;
        if !tokens.contains(&token) {
            tokens.push(token);
        }
    }
    let mut op_parts: Vec<&str> = Vec::new();
    for op in ops {
        let op = op.as_str();
        if Operation::from_lower(op).is_none() {
            return Err(WatchError::Usage(format!(
                "unknown operation {op:?}: use insert, update, delete or truncate"
            )));
        }
        if !op_parts.contains(&op) {
            op_parts.push(op);
        }
    }
    let p = CDC_SUBJECT_PREFIX;
    Ok(match (tokens.is_empty(), op_parts.is_empty()) {
        (true, true) => vec![format!("{p}.>")],
        (true, false) => op_parts
            .iter()
            .flat_map(|op| [format!("{p}.*.{op}"), format!("{p}.*.*.{op}")])
            .collect(),
        (false, true) => tokens.iter().map(|t| format!("{p}.{t}.*")).collect(),
        (false, false) => tokens
            .iter()
            .flat_map(|t| op_parts.iter().map(move |op| format!("{p}.{t}.{op}")))
            .collect(),
    })
}

/// `users` or `schema.table` as the table's subject token (the names encoded as the bridge
/// encodes them, so `public.users` is `users`).
pub(crate) fn table_spec_token(spec: &str) -> Result<String, WatchError> {
    let (schema, name) = spec.split_once('.').unwrap_or((DEFAULT_SCHEMA, spec));
    if schema.is_empty() || name.is_empty() {
        return Err(WatchError::Usage(format!(
            "bad table {spec:?}: use table or schema.table"
        )));
    }
    Ok(table_token(schema, name))
}

/// Runs `bridge tail` until shutdown, `count` or `until_idle`; returns the changes printed.
pub fn run(config: &Config, options: &TailOptions, shutdown: &Shutdown) -> Result<u64, WatchError> {
    let filters = filter_subjects(&options.tables, &options.ops)?;
    on_nats(config, CONNECTION_NAME, |client| async move {
        let js = jetstream::new(client);
        let stream = open_stream(&js, &config.streams.cdc).await?;
        let deliver_policy = match options.start {
            Start::New => DeliverPolicy::New,
            Start::All => DeliverPolicy::All,
            Start::Last(n) => last_n_start(&stream, &filters, n).await?,
        };
        let mut messages = ordered(&stream, &filters, deliver_policy, false).await?;
        let stdout = std::io::stdout();
        let mut line = Vec::new();
        let mut printed = 0u64;
        let mut last_activity = Instant::now();
        loop {
            if shutdown.is_triggered() || options.count.is_some_and(|c| printed >= c) {
                return Ok(printed);
            }
            let idle_at = options.until_idle.map(|idle| last_activity + idle);
            let msg = tokio::select! {
                m = messages.next() => m,
                _ = shutdown.triggered() => return Ok(printed),
                _ = until(idle_at) => return Ok(printed),
            };
            let msg = msg
                .ok_or_else(|| WatchError::Runtime("the stream's consumer ended".into()))?
                .map_err(|e| WatchError::Runtime(format!("reading {}: {e}", config.streams.cdc)))?;
            last_activity = Instant::now();
            let seq = msg.info().map(|i| i.stream_sequence).unwrap_or_default();
            let doc = match crate::wire::decode::decode(&msg.payload) {
                Ok(doc) => doc,
                Err(e) => {
                    log::warn!("message #{seq} on {} skipped: {e}", msg.subject);
                    continue;
                }
            };
            line.clear();
            render::change_line(&mut line, seq, msg.subject.as_str(), &doc, options.colour);
            let mut out = stdout.lock();
            match out.write_all(&line).and_then(|()| out.flush()) {
                Ok(()) => printed += 1,
                // The reader went away (`| head`): nothing more to do.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(printed),
                Err(e) => return Err(e.into()),
            }
        }
    })
}

/// Completes at `deadline`, or never without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// An ordered consumer on `filters`.
async fn ordered(
    stream: &Stream,
    filters: &[String],
    deliver_policy: DeliverPolicy,
    headers_only: bool,
) -> Result<pull::Ordered, WatchError> {
    Ok(consumer(stream, filters, deliver_policy, headers_only)
        .await?
        .1)
}

/// An ordered consumer on `filters`, and how many messages it has to deliver now.
async fn consumer(
    stream: &Stream,
    filters: &[String],
    deliver_policy: DeliverPolicy,
    headers_only: bool,
) -> Result<(u64, pull::Ordered), WatchError> {
    let err = |e: &dyn std::fmt::Display| {
        WatchError::Runtime(format!("consumer on {}: {e}", filters.join(", ")))
    };
    let mut config = pull::OrderedConfig {
        deliver_policy,
        headers_only,
        ..Default::default()
    };
    // One filter goes in filter_subject, which every server version knows.
    match filters {
        [one] => config.filter_subject = one.clone(),
        _ => config.filter_subjects = filters.to_vec(),
    }
    let consumer = stream.create_consumer(config).await.map_err(|e| err(&e))?;
    let pending = consumer.cached_info().num_pending;
    let messages = consumer.messages().await.map_err(|e| err(&e))?;
    Ok((pending, messages))
}

/// Where the last `n` changes passing `filters` start. Without filters that is read from the
/// stream's last sequence; with filters the matching messages' sequences are read (headers
/// only, no payloads) up to the last one there is now.
async fn last_n_start(
    stream: &Stream,
    filters: &[String],
    n: u64,
) -> Result<DeliverPolicy, WatchError> {
    let state = stream
        .get_info()
        .await
        .map_err(|e| WatchError::Runtime(format!("reading the stream's state: {e}")))?
        .state;
    if n == 0 || state.messages == 0 {
        return Ok(DeliverPolicy::New);
    }
    let everything = filters.len() == 1 && filters[0] == format!("{CDC_SUBJECT_PREFIX}.>");
    if everything {
        let start = state
            .last_sequence
            .saturating_sub(n - 1)
            .max(state.first_sequence);
        return Ok(DeliverPolicy::ByStartSequence {
            start_sequence: start,
        });
    }
    let mut sequences: VecDeque<u64> = VecDeque::new();
    let (pending, mut scan) = consumer(stream, filters, DeliverPolicy::All, true).await?;
    if pending == 0 {
        return Ok(DeliverPolicy::ByStartSequence {
            start_sequence: state.last_sequence + 1,
        });
    }
    loop {
        // Bounded, in case the matching messages were removed meanwhile.
        let next = tokio::time::timeout(Duration::from_secs(5), scan.next()).await;
        let Ok(Some(msg)) = next else { break };
        let msg = msg.map_err(|e| WatchError::Runtime(format!("reading the stream: {e}")))?;
        let Ok(info) = msg.info() else { break };
        if sequences.len() as u64 == n {
            sequences.pop_front();
        }
        sequences.push_back(info.stream_sequence);
        if info.pending == 0 || info.stream_sequence >= state.last_sequence {
            break;
        }
    }
    Ok(match sequences.front() {
        Some(&start_sequence) => DeliverPolicy::ByStartSequence { start_sequence },
        None => DeliverPolicy::ByStartSequence {
            start_sequence: state.last_sequence + 1,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn filters_follow_the_subject_rule() {
        assert_eq!(filter_subjects(&[], &[]).unwrap(), s(&["cdc.>"]));
        assert_eq!(
            filter_subjects(&s(&["users", "public.users", "sales.order items"]), &[]).unwrap(),
            s(&["cdc.users.*", "cdc.sales.order%20items.*"])
        );
        assert_eq!(
            filter_subjects(&[], &s(&["delete"])).unwrap(),
            s(&["cdc.*.delete", "cdc.*.*.delete"])
        );
        assert_eq!(
            filter_subjects(&s(&["users", "sales.inv"]), &s(&["insert", "update"])).unwrap(),
            s(&[
                "cdc.users.insert",
                "cdc.users.update",
                "cdc.sales.inv.insert",
                "cdc.sales.inv.update"
            ])
        );
    }

    #[test]
    fn bad_filters_are_usage_errors() {
        for (tables, ops) in [
            (s(&[".users"]), s(&[])),
            (s(&["sales."]), s(&[])),
            (s(&[""]), s(&[])),
            (s(&[]), s(&["upsert"])),
        ] {
            let err = filter_subjects(&tables, &ops).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{err}");
        }
    }
}
