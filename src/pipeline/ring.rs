//! The byte budget of the ring between the wal thread and the publisher.
//!
//! The ring is bounded by a count of items, which bounds memory only as long as rows are
//! small: 8 192 changes of 100 KB rows would be 800 MB. So the bytes that the queued changes
//! hold are counted too, and the wal thread waits (as it does when the ring is full) while
//! they are over the budget, so PostgreSQL keeps the WAL instead of the bridge's memory.
//!
//! Each side counts only what it moved itself, on its own cache line: the wal thread the bytes
//! it pushed, the publisher the bytes it popped (stored once per batch, not per change), so the
//! hot path pays no shared read-modify-write.

use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_utils::CachePadded;

use crate::pg::value::Value;

use crate::wire::event::{ChangeEvent, ColumnValue};

/// Bytes pushed and popped, and the limit on their difference.
#[derive(Debug)]
pub struct RingBudget {
    pushed: CachePadded<AtomicU64>,
    popped: CachePadded<AtomicU64>,
    limit: u64,
}

impl RingBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Self {
        RingBudget {
            pushed: CachePadded::new(AtomicU64::new(0)),
            popped: CachePadded::new(AtomicU64::new(0)),
            limit,
        }
    }

    /// The limit.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes held by the changes on the ring now.
    pub fn used(&self) -> u64 {
        self.pushed
            .load(Ordering::Relaxed)
            .saturating_sub(self.popped.load(Ordering::Acquire))
    }

    /// True when `bytes` more would go over the limit.
    pub fn would_exceed(&self, bytes: u64) -> bool {
        self.used().saturating_add(bytes) > self.limit
    }

    /// Wal side: `bytes` were pushed.
    pub fn pushed(&self, bytes: u64) {
        // Only the wal thread writes this counter.
        let total = self.pushed.load(Ordering::Relaxed) + bytes;
        self.pushed.store(total, Ordering::Relaxed);
    }

    /// Publisher side: `bytes` more were popped since the last call.
    pub fn popped(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        // Only the publisher writes this counter.
        let total = self.popped.load(Ordering::Relaxed) + bytes;
        self.popped.store(total, Ordering::Release);
    }
}

/// The heap memory a change holds (its buffers' capacities, which is what recycling keeps),
/// not counting the names and table shared with the relation cache.
pub fn event_bytes(ev: &ChangeEvent) -> u64 {
    let columns = |cols: &Vec<ColumnValue>| -> usize {
        cols.capacity() * std::mem::size_of::<ColumnValue>()
            + cols.iter().map(|c| value_bytes(&c.value)).sum::<usize>()
    };
    let mut n = std::mem::size_of::<ChangeEvent>() + columns(&ev.columns);
    if let Some(old) = &ev.old_columns {
        n += columns(old);
    }
    n += ev.unchanged_toast.capacity() * std::mem::size_of::<std::sync::Arc<str>>();
    n as u64
}

fn value_bytes(v: &Value) -> usize {
    match v {
        Value::Text(s) => s.capacity(),
        Value::Bytes(b) => b.capacity(),
        Value::Array(items) => {
            items.capacity() * std::mem::size_of::<Value>()
                + items.iter().map(value_bytes).sum::<usize>()
        }
        Value::Null | Value::Bool(_) | Value::Int(_) | Value::Float(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::pg::Lsn;
    use crate::wire::event::{Operation, TableRef};

    fn event(columns: Vec<ColumnValue>) -> ChangeEvent {
        ChangeEvent {
            table: Arc::new(TableRef {
                schema: Arc::from("public"),
                table: Arc::from("t"),
                relation_id: 1,
            }),
            operation: Operation::Insert,
            lsn: Lsn(1),
            commit_lsn: Lsn(1),
            timeline: 1,
            xid: 1,
            commit_time: 0,
            seq: 0,
            last_in_tx: false,
            columns,
            old_columns: None,
            unchanged_toast: Vec::new(),
        }
    }

    #[test]
    fn wide_values_count_by_capacity() {
        let small = event_bytes(&event(vec![ColumnValue {
            name: Arc::from("id"),
            value: Value::Int(1),
        }]));
        let mut text = String::with_capacity(100_000);
        text.push('x');
        let wide = event_bytes(&event(vec![
            ColumnValue {
                name: Arc::from("id"),
                value: Value::Int(1),
            },
            ColumnValue {
                name: Arc::from("body"),
                value: Value::Array(vec![Value::Text(text), Value::Bytes(vec![0; 10])]),
            },
        ]));
        assert!(small < 1_000, "{small}");
        assert!(wide >= 100_010, "{wide}");
    }

    #[test]
    fn the_budget_is_the_difference_of_both_sides() {
        let b = RingBudget::new(1000);
        assert!(!b.would_exceed(1000));
        assert!(b.would_exceed(1001));
        b.pushed(600);
        b.pushed(300);
        assert_eq!(b.used(), 900);
        assert!(b.would_exceed(101));
        b.popped(600);
        assert_eq!(b.used(), 300);
        assert!(!b.would_exceed(700));
        b.popped(0);
        b.popped(300);
        assert_eq!(b.used(), 0);
    }
}
