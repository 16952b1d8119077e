//! The data unit: [`Event`] (one record) and [`Batch`] (a micro-batch of them).
//!
//! An event is a JSON-like record stored without a tree of allocations: its text lives in
//! `raw` (the bytes it was decoded from, shared with the chunk they were read in) and in a
//! small per-event `arena` for strings that had to be unescaped or were set by a transform.
//! Fields are a flat vector of `(key, value)` pairs whose keys and string values are spans
//! ([`Text`]) into one of those two buffers. Objects are ranges of that vector, so decoding
//! an IoT Central export message costs one allocation for the fields and nothing per string.
//!
//! Values keep numbers as they were written ([`Val::Num`]) and parse them on access, so a
//! pipeline pays for the fields it reads, not for every field of every message.
//!
//! The parts, one concern a file: the storage types and the reading side of [`Event`] here;
//! [`ValRef`] and [`ObjRef`], borrowed views of its values, in `view`; writing JSON in `json`;
//! owned values ([`Value`]) in `value`; building and changing events in `mutation`; rows of a
//! fixed layout ([`RowLayout`]) in `row`; the decoding of the rest of a projected event on
//! first use in `lazy`; [`MessageSource`] in `message_source`; [`Batch`] in `batch`.

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use crate::projection::{Projection, SLOTS, SLOT_UNKNOWN};

mod batch;
mod json;
mod lazy;
mod message_source;
mod mutation;
mod row;
mod value;
mod view;

pub use crate::projection::eq_short;
pub use batch::Batch;
pub use json::{write_json_f64, write_json_str};
pub use lazy::{register_completion, Completion};
pub use message_source::MessageSource;
pub use row::RowLayout;
pub use value::Value;
pub use view::{classify_raw, json_lookup, ObjRef, ValRef};

/// Nanoseconds since the Unix epoch, UTC. `NO_TIME` when an event has no event time.
pub type Nanos = i64;
/// The absence of an event time.
pub const NO_TIME: Nanos = i64::MIN;

/// A span of text inside an event: either in its `raw` bytes or, with the top bit of `len`
/// set, in its `arena`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Text {
    off: u32,
    len: u32,
}

const IN_ARENA: u32 = 1 << 31;

impl Text {
    /// The empty text.
    pub const EMPTY: Text = Text { off: 0, len: 0 };

    fn raw(off: usize, len: usize) -> Text {
        debug_assert!(len < IN_ARENA as usize);
        Text { off: off as u32, len: len as u32 }
    }
    fn arena(off: usize, len: usize) -> Text {
        Text { off: off as u32, len: len as u32 | IN_ARENA }
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        (self.len & !IN_ARENA) as usize
    }
    /// True when the text is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A field value. `Copy`: all text is referenced through [`Text`] spans.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum Val {
    /// JSON null (also: a missing value where one is required).
    #[default]
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// A JSON number exactly as written in the source; parsed on access.
    Num(Text),
    /// A string (already unescaped).
    Str(Text),
    /// A timestamp in nanoseconds since the Unix epoch, UTC.
    Time(Nanos),
    /// An object: fields `start..start + len` of the event; `raw` is its JSON text when the
    /// object is unmodified since decoding (empty otherwise).
    Obj {
        start: u32,
        len: u32,
        raw: Text,
    },
    /// JSON text that was not decoded (nested objects, arrays).
    Json(Text),
    /// Bytes that need not be UTF-8 (the payload of a dead letter).
    Bytes(Text),
}

/// One `key: value` pair.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct Field {
    pub key: Text,
    pub val: Val,
}

/// What kind of record an event is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Kind {
    /// An IoT Central export message (`messageSource` says which).
    Export(MessageSource),
    /// A derived row (window output, computed records).
    #[default]
    Row,
    /// A record that could not be processed: fields `reason`, `origin`, `component`, `payload`.
    DeadLetter,
}

/// Where an event came from. Set by sources; `source` is filled in by the runtime.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Meta {
    /// Index of the source component in the pipeline.
    pub source: u16,
    /// Input partition (Event Hubs partition, blob partition folder; 0 otherwise).
    pub partition: u32,
    /// Position within the partition: line number, sequence number, delivery tag.
    pub offset: i64,
    /// File, object or queue the event was read from.
    pub origin: Option<Arc<str>>,
    /// Time the broker enqueued the event (Event Hubs), or `NO_TIME`.
    pub enqueued: Nanos,
    /// Source-specific metadata: AMQP headers, Event Hubs properties and annotations
    /// (`iotcentral-device-id`, ...). Read as `meta.NAME`.
    pub attrs: Vec<(AttrKey, String)>,
}

/// A metadata attribute's name: borrowed for the names set on every message (no allocation, to
/// make and to drop, per message and per event), owned for any other.
pub type AttrKey = std::borrow::Cow<'static, str>;

/// `name` as an attribute key.
pub fn attr_key(name: &str) -> AttrKey {
    const KNOWN: [&str; 12] = [
        "iotcentral-application-id",
        "iotcentral-device-id",
        "iotcentral-message-source",
        "iotcentral-message-type",
        "iotcentral-template-id",
        "iotcentral-module-id",
        "iotcentral-component-name",
        "message-id",
        "delivery-count",
        "x-opt-sequence-number",
        "x-opt-enqueued-time",
        "x-opt-offset",
    ];
    match KNOWN.iter().find(|k| **k == name) {
        Some(k) => AttrKey::Borrowed(k),
        None => AttrKey::Owned(name.to_string()),
    }
}

impl Meta {
    /// A metadata attribute by name.
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs.iter().find(|(k, _)| &**k == name).map(|(_, v)| v.as_str())
    }
}

/// A record flowing through a pipeline.
#[derive(Clone, Debug)]
pub struct Event {
    raw: Bytes,
    arena: String,
    fields: Vec<Field>,
    /// The top-level object: `fields[root.0 .. root.0 + root.1]`; `root_raw` its JSON text when unmodified.
    root: (u32, u32),
    root_raw: Text,
    /// Cached event time (IoT Central `enqueuedTime`, or the row's time column).
    pub time: Nanos,
    /// Set by the decoder, cleared by any change: every top-level key is one of the export
    /// format's, so a bare telemetry name cannot also be a top-level field.
    known_keys: bool,
    /// Where `telemetry` probably is among the top-level fields (checked on use).
    tele_hint: u8,
    /// Set when the decoder kept only the fields the pipeline reads (see [`Projection`]); the
    /// whole event is then decoded from `raw` the first time anything else is asked for, into
    /// `full` (by the decoder registered with [`register_completion`]).
    proj: Option<Arc<Projection>>,
    /// With `proj`: where the projection's first fields are (see [`SLOTS`]).
    slots: [u8; SLOTS],
    full: OnceLock<Box<Event>>,
    pub kind: Kind,
    pub meta: Meta,
}

/// How many events ahead a loop over a batch prefetches.
const PREFETCH_AHEAD: usize = 6;

/// For a loop over `events` now at `i`: prefetches the event a few places ahead (see
/// [`Event::prefetch`]).
#[inline(always)]
pub fn prefetch_ahead(events: &[Event], i: usize) {
    if let Some(ahead) = events.get(i + PREFETCH_AHEAD) {
        ahead.prefetch();
    }
}

impl Default for Event {
    fn default() -> Self {
        Event::row()
    }
}

impl Event {
    /// Asks the CPU to start loading what reading this event's fields touches (its field list
    /// and the start of its text), for loops that read many events decoded on another core:
    /// issued a few events ahead, the loads overlap instead of stalling one after another.
    #[inline(always)]
    pub fn prefetch(&self) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: prefetching is a hint that never faults, whatever the address.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch::<_MM_HINT_T0>(self.fields.as_ptr() as *const i8);
            _mm_prefetch::<_MM_HINT_T0>((self.fields.as_ptr() as *const i8).wrapping_add(64));
            _mm_prefetch::<_MM_HINT_T0>(self.raw.as_ptr() as *const i8);
            _mm_prefetch::<_MM_HINT_T0>((self.raw.as_ptr() as *const i8).wrapping_add(64));
        }
    }

    /// An empty derived row.
    pub fn row() -> Event {
        Event::with_capacity(0, 0)
    }

    /// An empty derived row with room for `fields` fields and `text` bytes of keys and strings.
    pub fn with_capacity(fields: usize, text: usize) -> Event {
        Event {
            raw: Bytes::new(),
            arena: String::with_capacity(text),
            fields: Vec::with_capacity(fields),
            root: (0, 0),
            root_raw: Text::EMPTY,
            time: NO_TIME,
            known_keys: false,
            tele_hint: u8::MAX,
            proj: None,
            slots: [SLOT_UNKNOWN; SLOTS],
            full: OnceLock::new(),
            kind: Kind::Row,
            meta: Meta::default(),
        }
    }

    /// Assembles an event from decoded parts (used by the decoder).
    pub(crate) fn from_parts(
        raw: Bytes,
        arena: String,
        fields: Vec<Field>,
        root_len: u32,
        time: Nanos,
        kind: Kind,
    ) -> Event {
        let root_raw = Text::raw(0, raw.len());
        Event {
            raw,
            arena,
            fields,
            root: (0, root_len),
            root_raw,
            time,
            known_keys: false,
            tele_hint: u8::MAX,
            proj: None,
            slots: [SLOT_UNKNOWN; SLOTS],
            full: OnceLock::new(),
            kind,
            meta: Meta::default(),
        }
    }

    pub(crate) fn set_layout_hints(&mut self, known_keys: bool, telemetry: Option<u8>) {
        self.known_keys = known_keys;
        self.tele_hint = telemetry.unwrap_or(u8::MAX);
    }

    /// A top-level field from the event's own storage (the projection, when it is one).
    pub(crate) fn own_get(&self, key: &str) -> Option<ValRef<'_>> {
        self.own_root().get(key)
    }

    fn own_root(&self) -> ObjRef<'_> {
        ObjRef { ev: self, start: self.root.0, len: self.root.1, raw: self.root_raw }
    }

    /// The `telemetry` object from the event's own storage.
    pub(crate) fn own_telemetry(&self) -> Option<ObjRef<'_>> {
        let root = self.own_root();
        if let Some((k, ValRef::Obj(o))) = root.field_at(self.tele_hint as usize) {
            if eq_short(k, "telemetry") {
                return Some(o);
            }
        }
        match root.get("telemetry") {
            Some(ValRef::Obj(o)) => Some(o),
            _ => None,
        }
    }

    /// The export message's `messageSource` as the decoder read it (the first `messageSource`
    /// key, as a lookup finds it), while no field has changed since decoding and the value is
    /// one this version knows; `None` otherwise (read the field).
    pub fn decoded_message_source(&self) -> Option<MessageSource> {
        match self.kind {
            Kind::Export(s) if s != MessageSource::Other && !self.root_raw.is_empty() => Some(s),
            _ => None,
        }
    }

    /// Whether every top-level key is one of the export format's (see [`crate::path`]).
    pub fn has_only_export_keys(&self) -> bool {
        self.known_keys
    }

    /// The `telemetry` object, if the event has one.
    pub fn telemetry(&self) -> Option<ObjRef<'_>> {
        self.complete().own_telemetry()
    }

    /// A dead-letter record for `payload`, which could not be processed for `reason`.
    pub fn dead_letter(payload: Bytes, reason: &str, origin: &str, component: &str) -> Event {
        let mut ev = Event::row();
        ev.kind = Kind::DeadLetter;
        let len = payload.len();
        ev.raw = payload;
        ev.push("reason", Value::Str(reason.to_string()));
        ev.push("origin", Value::Str(origin.to_string()));
        ev.push("component", Value::Str(component.to_string()));
        let key = ev.alloc("payload");
        ev.push_field(Field { key, val: Val::Bytes(Text::raw(0, len)) });
        ev
    }

    /// The source text the event was decoded from (empty for derived rows).
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    /// The JSON text of the whole event if it is unmodified since decoding.
    pub fn raw_json(&self) -> Option<&str> {
        (!self.root_raw.is_empty()).then(|| self.text(self.root_raw))
    }

    /// Resolves a text span.
    pub fn text(&self, t: Text) -> &str {
        let len = t.len();
        let off = t.off as usize;
        if t.len & IN_ARENA != 0 {
            &self.arena[off..off + len]
        } else {
            let bytes = &self.raw[off..off + len];
            debug_assert!(std::str::from_utf8(bytes).is_ok());
            // SAFETY: text spans into `raw` are only created by the decoder (`build::raw_span`),
            // over input it validated as UTF-8 as a whole, at the boundaries of JSON tokens (which
            // are character boundaries). Bytes that need not be UTF-8 (dead-letter payloads) are
            // `Val::Bytes` and are only read through `bytes_of`.
            unsafe { std::str::from_utf8_unchecked(bytes) }
        }
    }

    fn bytes_of(&self, t: Text) -> &[u8] {
        let off = t.off as usize;
        if t.len & IN_ARENA != 0 {
            &self.arena.as_bytes()[off..off + t.len()]
        } else {
            &self.raw[off..off + t.len()]
        }
    }

    /// Borrowed view of a value of this event.
    pub fn val_ref(&self, v: Val) -> ValRef<'_> {
        match v {
            Val::Null => ValRef::Null,
            Val::Bool(b) => ValRef::Bool(b),
            Val::Int(i) => ValRef::Int(i),
            Val::Float(f) => ValRef::Float(f),
            Val::Num(t) => ValRef::Num(self.text(t)),
            Val::Str(t) => ValRef::Str(Cow::Borrowed(self.text(t))),
            Val::Time(t) => ValRef::Time(t),
            Val::Obj { start, len, raw } => ValRef::Obj(ObjRef { ev: self, start, len, raw }),
            Val::Json(t) => ValRef::Json(self.text(t)),
            Val::Bytes(t) => ValRef::Bytes(self.bytes_of(t)),
        }
    }

    /// The top-level object.
    pub fn root(&self) -> ObjRef<'_> {
        self.complete().own_root()
    }

    /// The object at a range previously obtained from [`ObjRef::range`].
    pub fn obj_at(&self, start: u32, len: u32) -> ObjRef<'_> {
        let ok = (start as usize + len as usize) <= self.fields.len();
        let (start, len) = if ok { (start, len) } else { (0, 0) };
        ObjRef { ev: self, start, len, raw: Text::EMPTY }
    }

    /// A top-level field.
    pub fn get(&self, key: &str) -> Option<ValRef<'_>> {
        match &self.proj {
            Some(p) if p.covers_top(key) => self.own_get(key),
            Some(_) => self.complete().own_get(key),
            None => self.own_get(key),
        }
    }

    /// A top-level string field.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        match self.get(key)? {
            ValRef::Str(Cow::Borrowed(s)) => Some(s),
            _ => None,
        }
    }

    /// Follows `path` (object keys) from the top level; descends into undecoded JSON too.
    pub fn get_path(&self, path: &[&str]) -> Option<ValRef<'_>> {
        let (first, rest) = path.split_first()?;
        let mut cur = self.get(first)?;
        for key in rest {
            cur = match cur {
                ValRef::Obj(o) => o.get(key)?,
                ValRef::Json(text) => json_lookup(text, key)?,
                _ => return None,
            };
        }
        Some(cur)
    }

    /// Approximate memory/bytes size.
    pub fn byte_size(&self) -> usize {
        self.raw.len() + self.arena.len() + self.fields.len() * std::mem::size_of::<Field>()
    }
}

/// Builder used by the decoder: spans are offsets into the raw text.
pub(crate) mod build {
    use super::*;
    /// A span into the raw text.
    pub fn raw_span(base: &str, part: &str) -> Text {
        let off = part.as_ptr() as usize - base.as_ptr() as usize;
        Text::raw(off, part.len())
    }
    /// Stores `s` in the arena.
    pub fn arena_span(arena: &mut String, s: &str) -> Text {
        let off = arena.len();
        arena.push_str(s);
        Text::arena(off, s.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event decoded from `json` (one export message), for the tests of every part.
    pub(super) fn decoded(json: &str) -> Event {
        crate::model::decode::decode_one(Bytes::from(json.to_string())).expect("decodes")
    }

    #[test]
    fn dead_letters_keep_arbitrary_bytes() {
        let ev = Event::dead_letter(Bytes::from_static(b"\xff\xfe{"), "invalid UTF-8", "f.jsonl:3", "src");
        assert_eq!(ev.kind, Kind::DeadLetter);
        assert_eq!(ev.get("payload"), Some(ValRef::Bytes(b"\xff\xfe{")));
        assert!(ev.to_json().contains("\"payload\":\"//57\""), "base64 for non-UTF-8: {}", ev.to_json());
    }
}

#[cfg(test)]
mod eq_tests {
    use super::eq_short;

    #[test]
    fn short_equality_matches_std() {
        let words = [
            "",
            "a",
            "ab",
            "deviceId",
            "deviceIe",
            "telemetry",
            "telemetrx",
            "messageSource",
            "applicationId",
            "messageProperties",
            "messagePropertiez",
            "abcdefghijklmnop",
            "abcdefghijklmnoq",
        ];
        for a in words {
            for b in words {
                assert_eq!(eq_short(a, b), a == b, "{a} {b}");
            }
        }
    }
}
