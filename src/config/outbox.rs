//! `[outbox]`: the outbox tables, their column names, and what happens to a change too large
//! for the broker.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Column holding the event's id (its `Nats-Msg-Id`).
pub(crate) const DEFAULT_OUTBOX_ID_COLUMN: &str = "id";
/// Column holding the aggregate type (the subject's second token).
pub(crate) const DEFAULT_OUTBOX_AGGREGATE_TYPE_COLUMN: &str = "aggregate_type";
/// Column holding the aggregate id (the `Pgbridge-Aggregate-Id` header).
pub(crate) const DEFAULT_OUTBOX_AGGREGATE_ID_COLUMN: &str = "aggregate_id";
/// Column holding the event type (the subject's third token).
pub(crate) const DEFAULT_OUTBOX_EVENT_TYPE_COLUMN: &str = "event_type";
/// Column holding the payload, published as its text.
pub(crate) const DEFAULT_OUTBOX_PAYLOAD_COLUMN: &str = "payload";
/// What a change larger than the broker accepts does: stop, so nothing is lost silently.
pub(crate) const DEFAULT_ON_OVERSIZE: OnOversize = OnOversize::Stop;

/// What a change event larger than the broker accepts does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OnOversize {
    /// Stop the bridge with an error; the change stays in the WAL until the limit is raised.
    #[default]
    Stop,
    /// Publish it as a dead letter (headers and as much of the body as fits) and go on.
    Dlq,
}

impl fmt::Display for OnOversize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OnOversize::Stop => "stop",
            OnOversize::Dlq => "dlq",
        })
    }
}

/// Outbox tables and dead letters.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OutboxConfig {
    /// Outbox tables, as `table` or `schema.table`: their inserts are published as outbox
    /// events, and they publish no change events.
    pub tables: Vec<String>,
    /// Column of the event id.
    pub id_column: String,
    /// Column of the aggregate type.
    pub aggregate_type_column: String,
    /// Column of the aggregate id (optional in the table).
    pub aggregate_id_column: String,
    /// Column of the event type.
    pub event_type_column: String,
    /// Column of the payload.
    pub payload_column: String,
    /// What a change event too large for the broker does.
    pub on_oversize: OnOversize,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            tables: Vec::new(),
            id_column: DEFAULT_OUTBOX_ID_COLUMN.to_owned(),
            aggregate_type_column: DEFAULT_OUTBOX_AGGREGATE_TYPE_COLUMN.to_owned(),
            aggregate_id_column: DEFAULT_OUTBOX_AGGREGATE_ID_COLUMN.to_owned(),
            event_type_column: DEFAULT_OUTBOX_EVENT_TYPE_COLUMN.to_owned(),
            payload_column: DEFAULT_OUTBOX_PAYLOAD_COLUMN.to_owned(),
            on_oversize: DEFAULT_ON_OVERSIZE,
        }
    }
}

impl OutboxConfig {
    /// The outbox tables as `schema.table` (`table` alone means `public.table`).
    pub(crate) fn qualified_tables(&self) -> Vec<String> {
        self.tables
            .iter()
            .map(|t| {
                if t.contains('.') {
                    t.clone()
                } else {
                    format!("public.{t}")
                }
            })
            .collect()
    }
}
