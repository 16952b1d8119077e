//! Rows of a fixed layout ([`RowLayout`]): the keys of a producer's rows stored once, and the
//! rows made from them and filled in by position.

use super::{Event, Field, Text, Val, Value};

/// The keys of the rows a producer emits again and again (a window's output), stored once:
/// a row made from it copies two small buffers instead of storing each key.
#[derive(Debug, Clone, Default)]
pub struct RowLayout {
    arena: String,
    fields: Vec<Field>,
}

impl RowLayout {
    pub fn new<S: AsRef<str>>(keys: impl IntoIterator<Item = S>) -> RowLayout {
        let mut l = RowLayout::default();
        for k in keys {
            let k = k.as_ref();
            let key = Text::arena(l.arena.len(), k.len());
            l.arena.push_str(k);
            l.fields.push(Field { key, val: Val::Null });
        }
        l
    }

    /// Number of columns.
    pub fn len(&self) -> usize {
        self.fields.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }
}

impl Event {
    /// A derived row with the layout's keys, every value null, and room for `text` bytes of
    /// string values.
    pub fn from_layout(layout: &RowLayout, text: usize) -> Event {
        let mut ev = Event::with_capacity(0, 0);
        ev.arena.reserve_exact(layout.arena.len() + text);
        ev.arena.push_str(&layout.arena);
        ev.fields = layout.fields.clone();
        ev.root = (0, layout.fields.len() as u32);
        ev
    }

    /// Sets the value of the `i`th top-level field, if there is one (rows made with
    /// [`Event::from_layout`] know their columns' positions).
    pub fn set_at(&mut self, i: usize, v: &Value) {
        self.materialize();
        if i < self.root.1 as usize {
            let val = self.store(v);
            self.fields[self.root.0 as usize + i].val = val;
            self.root_raw = Text::EMPTY;
        }
    }

    /// Like [`Event::set_at`] with a string value.
    pub fn set_str_at(&mut self, i: usize, s: &str) {
        self.materialize();
        if i < self.root.1 as usize {
            let val = Val::Str(self.alloc(s));
            self.fields[self.root.0 as usize + i].val = val;
            self.root_raw = Text::EMPTY;
        }
    }
}
