//! [`Batch`]: the micro-batch of events (or of rows as Arrow columns) sent between components.

use super::Event;

/// A micro-batch: the unit sent between components.
///
/// Derived rows can travel as Arrow columns instead (`columns`), but only to consumers that
/// said they read them (see [`crate::runtime::Emitter::wants_columns`]): every other consumer
/// only ever sees `events`.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub events: Vec<Event>,
    /// Rows as columns, after `events` in order.
    pub columns: Option<arrow_array::RecordBatch>,
}

impl Batch {
    pub fn new(events: Vec<Event>) -> Self {
        Batch { events, columns: None }
    }
    /// A batch of rows as columns.
    pub fn columns(rows: arrow_array::RecordBatch) -> Self {
        Batch { events: Vec::new(), columns: Some(rows) }
    }
    pub fn len(&self) -> usize {
        self.events.len() + self.columns.as_ref().map_or(0, |c| c.num_rows())
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Approximate size in bytes (source text plus field vectors), for metrics and rolling.
    pub fn byte_size(&self) -> usize {
        self.events.iter().map(Event::byte_size).sum::<usize>()
            + self.columns.as_ref().map_or(0, |c| c.get_array_memory_size())
    }
}
