//! Lazy decoding: a projected event holds only the fields the pipeline reads, and decodes the
//! rest of its text on first use, with the decoder registered here.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use super::{Event, Val, ValRef};
use crate::projection::{Projection, SLOTS, SLOT_ABSENT, SLOT_UNKNOWN};

/// Decodes the whole of a projected event's text. The decoder that makes projected events
/// registers it ([`register_completion`]), so that events need not know the decoder.
pub type Completion = fn(Bytes) -> Result<Event, String>;

static COMPLETION: OnceLock<Completion> = OnceLock::new();

/// Registers the decoder that completes projected events (idempotent; the first one stays).
#[inline]
pub fn register_completion(f: Completion) {
    if COMPLETION.get().is_none() {
        let _ = COMPLETION.set(f);
    }
}

impl Event {
    pub(crate) fn set_projection(&mut self, proj: Arc<Projection>, slots: [u8; SLOTS]) {
        self.proj = Some(proj);
        self.slots = slots;
    }

    /// The value in slot `s` of a projected event: `Some(None)` when the message has no such
    /// field, `None` when the slot does not say (look the field up by key).
    pub(crate) fn slot(&self, s: usize) -> Option<Option<ValRef<'_>>> {
        Some(self.slot_val(s)?.map(|v| self.val_ref(v)))
    }

    /// Like [`Event::slot`], the stored value itself.
    #[inline]
    pub(crate) fn slot_val(&self, s: usize) -> Option<Option<Val>> {
        self.proj.as_ref()?;
        match *self.slots.get(s)? {
            SLOT_ABSENT => Some(None),
            SLOT_UNKNOWN => None,
            i => Some(Some(self.fields.get(i as usize)?.val)),
        }
    }

    /// The projection this event was decoded with, if it holds only some of its fields.
    pub fn projection(&self) -> Option<&Projection> {
        self.proj.as_deref()
    }

    /// The event with all its fields: itself, or, for a projected event, its full decoding
    /// (done once, on first use).
    pub fn complete(&self) -> &Event {
        if self.proj.is_none() {
            return self;
        }
        self.full.get_or_init(|| Box::new(self.decode_full()))
    }

    fn decode_full(&self) -> Event {
        let decode = COMPLETION.get().expect("projected events come from a decoder that registered its completion");
        match decode(self.raw.clone()) {
            Ok(mut ev) => {
                ev.meta = self.meta.clone();
                ev.time = self.time;
                ev
            }
            Err(e) => {
                // The projection was decoded with the same checks, so this cannot fail; if it
                // did, the projected fields are still right.
                tracing::error!("decoding an event whose projection decoded: {e}");
                let mut ev = self.clone();
                ev.proj = None;
                ev.full = OnceLock::new();
                ev
            }
        }
    }

    /// Turns a projected event into a complete one, before a change.
    pub(super) fn materialize(&mut self) {
        if self.proj.is_some() {
            let full = match self.full.take() {
                Some(b) => *b,
                None => self.decode_full(),
            };
            *self = full;
        }
    }
}
