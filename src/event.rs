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

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::Arc;

use bytes::Bytes;

use std::sync::OnceLock;

use crate::projection::{Projection, SLOTS, SLOT_ABSENT, SLOT_UNKNOWN};
use crate::time;

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
    pub attrs: Vec<(Box<str>, String)>,
}

impl Meta {
    /// A metadata attribute by name.
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs.iter().find(|(k, _)| &**k == name).map(|(_, v)| v.as_str())
    }
}

/// IoT Central's `messageSource`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum MessageSource {
    #[default]
    Telemetry,
    Properties,
    DeviceConnectivity,
    DeviceLifecycle,
    DeviceTemplateLifecycle,
    Audit,
    /// A value this version does not know; the message is kept as is.
    Other,
}

impl MessageSource {
    /// All known kinds.
    pub const ALL: [MessageSource; 6] = [
        MessageSource::Telemetry,
        MessageSource::Properties,
        MessageSource::DeviceConnectivity,
        MessageSource::DeviceLifecycle,
        MessageSource::DeviceTemplateLifecycle,
        MessageSource::Audit,
    ];

    /// The export's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageSource::Telemetry => "telemetry",
            MessageSource::Properties => "properties",
            MessageSource::DeviceConnectivity => "deviceConnectivity",
            MessageSource::DeviceLifecycle => "deviceLifecycle",
            MessageSource::DeviceTemplateLifecycle => "deviceTemplateLifecycle",
            MessageSource::Audit => "audit",
            MessageSource::Other => "other",
        }
    }

    /// Parses the export's spelling; unknown values are `Other`.
    pub fn parse(s: &str) -> MessageSource {
        match s {
            "telemetry" => MessageSource::Telemetry,
            "properties" => MessageSource::Properties,
            "deviceConnectivity" => MessageSource::DeviceConnectivity,
            "deviceLifecycle" => MessageSource::DeviceLifecycle,
            "deviceTemplateLifecycle" => MessageSource::DeviceTemplateLifecycle,
            "audit" => MessageSource::Audit,
            _ => MessageSource::Other,
        }
    }
}

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

/// A micro-batch: the unit sent between components.
///
/// Derived rows can travel as Arrow columns instead (`columns`), but only to consumers that
/// said they read them (see [`crate::runtime::Emitter::wants_columns`]): every other consumer
/// only ever sees `events`.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub events: Vec<Event>,
    /// Rows as columns, after `events` in order.
    pub columns: Option<arrow::record_batch::RecordBatch>,
}

impl Batch {
    pub fn new(events: Vec<Event>) -> Self {
        Batch { events, columns: None }
    }
    /// A batch of rows as columns.
    pub fn columns(rows: arrow::record_batch::RecordBatch) -> Self {
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

/// A borrowed view of a value.
#[derive(Clone, Debug, PartialEq)]
pub enum ValRef<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Num(&'a str),
    Str(Cow<'a, str>),
    Time(Nanos),
    Obj(ObjRef<'a>),
    Json(&'a str),
    Bytes(&'a [u8]),
}

/// A borrowed view of an object of an event.
#[derive(Clone, Copy)]
pub struct ObjRef<'a> {
    ev: &'a Event,
    start: u32,
    len: u32,
    raw: Text,
}

impl PartialEq for ObjRef<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl std::fmt::Debug for ObjRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<'a> ObjRef<'a> {
    /// The value of `key`, if present (the first one, should an object repeat a key).
    pub fn get(&self, key: &str) -> Option<ValRef<'a>> {
        self.get_val(key).map(|v| self.ev.val_ref(v))
    }
    /// The raw [`Val`] of `key`.
    pub fn get_val(&self, key: &str) -> Option<Val> {
        // lengths first: most keys differ in length, and that needs no text at all
        self.fields().iter().find(|f| f.key.len() == key.len() && eq_short(self.ev.text(f.key), key)).map(|f| f.val)
    }
    fn fields(&self) -> &'a [Field] {
        &self.ev.fields[self.start as usize..(self.start + self.len) as usize]
    }
    /// The field at position `i`.
    pub fn field_at(&self, i: usize) -> Option<(&'a str, ValRef<'a>)> {
        let f = self.fields().get(i)?;
        Some((self.ev.text(f.key), self.ev.val_ref(f.val)))
    }
    /// The value of `key`, looking at position `i` first (rows of one producer share a layout).
    pub fn get_at(&self, i: usize, key: &str) -> Option<ValRef<'a>> {
        match self.fields().get(i) {
            Some(f) if f.key.len() == key.len() && eq_short(self.ev.text(f.key), key) => Some(self.ev.val_ref(f.val)),
            _ => self.get(key),
        }
    }
    /// Number of fields.
    pub fn len(&self) -> usize {
        self.len as usize
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Fields in order.
    pub fn iter(&self) -> impl Iterator<Item = (&'a str, ValRef<'a>)> + 'a {
        let ev = self.ev;
        self.fields().iter().map(move |f| (ev.text(f.key), ev.val_ref(f.val)))
    }
    /// The object's position in the event (an identity within the event).
    pub fn range(&self) -> (u32, u32) {
        (self.start, self.len)
    }
    /// The object's JSON text when it is unmodified since decoding.
    pub fn raw_json(&self) -> Option<&'a str> {
        (!self.raw.is_empty()).then(|| self.ev.text(self.raw))
    }
    /// Appends the object as JSON.
    pub fn write_json(&self, out: &mut String) {
        if let Some(raw) = self.raw_json() {
            out.push_str(raw);
            return;
        }
        out.push('{');
        for (i, (k, v)) in self.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            write_json_str(out, k);
            out.push(':');
            v.write_json(out);
        }
        out.push('}');
    }
    /// The object as a JSON string.
    pub fn to_json(&self) -> String {
        let mut s = String::new();
        self.write_json(&mut s);
        s
    }
}

impl<'a> ValRef<'a> {
    /// The value as a number, if it is one (strings are not converted).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            ValRef::Int(i) => Some(*i as f64),
            ValRef::Float(f) => Some(*f),
            ValRef::Num(s) => s.parse().ok(),
            _ => None,
        }
    }
    /// The value as an integer, if it is an integral number.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            ValRef::Int(i) => Some(*i),
            ValRef::Num(s) => s.parse().ok(),
            ValRef::Float(f) if f.fract() == 0.0 && f.abs() < 9e15 => Some(*f as i64),
            _ => None,
        }
    }
    /// The value as a string slice, if it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            ValRef::Str(s) => Some(s),
            _ => None,
        }
    }
    /// The value as a timestamp: timestamps, RFC 3339 strings, and numbers as epoch milliseconds.
    pub fn as_time(&self) -> Option<Nanos> {
        match self {
            ValRef::Time(t) => Some(*t),
            ValRef::Str(s) => time::parse_rfc3339(s),
            ValRef::Int(_) | ValRef::Float(_) | ValRef::Num(_) => self.as_f64().map(|ms| (ms * 1e6) as i64),
            _ => None,
        }
    }
    pub fn is_null(&self) -> bool {
        matches!(self, ValRef::Null)
    }
    /// Appends the value as JSON.
    pub fn write_json(&self, out: &mut String) {
        match self {
            ValRef::Null => out.push_str("null"),
            ValRef::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            ValRef::Int(i) => {
                let _ = write!(out, "{i}");
            }
            ValRef::Float(f) => write_json_f64(out, *f),
            ValRef::Num(s) | ValRef::Json(s) => out.push_str(s),
            ValRef::Str(s) => write_json_str(out, s),
            ValRef::Time(t) => {
                out.push('"');
                time::write_rfc3339(out, *t);
                out.push('"');
            }
            ValRef::Obj(o) => o.write_json(out),
            ValRef::Bytes(b) => match std::str::from_utf8(b) {
                Ok(s) => write_json_str(out, s),
                Err(_) => {
                    use base64::Engine as _;
                    write_json_str(out, &base64::engine::general_purpose::STANDARD.encode(b))
                }
            },
        }
    }
    /// The value as a JSON string.
    pub fn to_json(&self) -> String {
        let mut s = String::new();
        self.write_json(&mut s);
        s
    }
    /// Converts to an owned [`Value`].
    pub fn to_owned_value(&self) -> Value {
        match self {
            ValRef::Null => Value::Null,
            ValRef::Bool(b) => Value::Bool(*b),
            ValRef::Int(i) => Value::Int(*i),
            ValRef::Float(f) => Value::Float(*f),
            ValRef::Num(s) => match s.parse::<i64>() {
                Ok(i) => Value::Int(i),
                Err(_) => Value::Float(s.parse().unwrap_or(f64::NAN)),
            },
            ValRef::Str(s) => Value::Str(s.to_string()),
            ValRef::Time(t) => Value::Time(*t),
            ValRef::Obj(o) => Value::Json(o.to_json()),
            ValRef::Json(s) => Value::Json(s.to_string()),
            ValRef::Bytes(b) => Value::Bytes(b.to_vec()),
        }
    }
}

pub use crate::projection::eq_short;

/// Writes a float as JSON (non-finite values become null, as JSON has no NaN).
pub fn write_json_f64(out: &mut String, f: f64) {
    if f.is_finite() {
        // `{}` prints the shortest representation that round-trips
        let mut buf = format!("{f}");
        if !buf.contains(['.', 'e', 'E']) {
            buf.push_str(".0");
        }
        out.push_str(&buf);
    } else {
        out.push_str("null");
    }
}

/// Writes `s` as a JSON string literal.
pub fn write_json_str(out: &mut String, s: &str) {
    out.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: Option<&str> = match b {
            b'"' => Some("\\\""),
            b'\\' => Some("\\\\"),
            b'\n' => Some("\\n"),
            b'\r' => Some("\\r"),
            b'\t' => Some("\\t"),
            0..=0x1f => None,
            _ => continue,
        };
        out.push_str(&s[start..i]);
        match esc {
            Some(e) => out.push_str(e),
            None => {
                let _ = write!(out, "\\u{:04x}", b);
            }
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// An owned value, for building and modifying events.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Time(Nanos),
    /// JSON text of an object or array.
    Json(String),
    Bytes(Vec<u8>),
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Str(s.to_string())
    }
}
impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Str(s)
    }
}
impl From<f64> for Value {
    fn from(f: f64) -> Self {
        Value::Float(f)
    }
}
impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Value::Int(i)
    }
}
impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}

impl Default for Event {
    fn default() -> Self {
        Event::row()
    }
}

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
    fn materialize(&mut self) {
        if self.proj.is_some() {
            let full = match self.full.take() {
                Some(b) => *b,
                None => self.decode_full(),
            };
            *self = full;
        }
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

    /// The whole event as JSON (the source text itself when unmodified).
    pub fn to_json(&self) -> String {
        let mut s = String::with_capacity(self.raw.len().max(64));
        self.write_json(&mut s);
        s
    }

    /// Appends the event as JSON.
    pub fn write_json(&self, out: &mut String) {
        match self.raw_json() {
            // unmodified (projected events always are): the source text itself
            Some(raw) => out.push_str(raw),
            None => self.root().write_json(out),
        }
    }

    // ---- building and modifying ----

    fn alloc(&mut self, s: &str) -> Text {
        let off = self.arena.len();
        self.arena.push_str(s);
        Text::arena(off, s.len())
    }

    fn store(&mut self, v: &Value) -> Val {
        match v {
            Value::Null => Val::Null,
            Value::Bool(b) => Val::Bool(*b),
            Value::Int(i) => Val::Int(*i),
            Value::Float(f) => Val::Float(*f),
            Value::Str(s) => Val::Str(self.alloc(s)),
            Value::Time(t) => Val::Time(*t),
            Value::Json(s) => Val::Json(self.alloc(s)),
            Value::Bytes(b) => match std::str::from_utf8(b) {
                Ok(s) => Val::Bytes(self.alloc(s)),
                Err(_) => {
                    // keep arbitrary bytes valid for the arena by base64-encoding them
                    use base64::Engine as _;
                    let enc = base64::engine::general_purpose::STANDARD.encode(b);
                    Val::Str(self.alloc(&enc))
                }
            },
        }
    }

    fn push_field(&mut self, f: Field) {
        // The root is kept as the last range of the vector whenever we append to it.
        let (start, len) = self.root;
        if (start + len) as usize != self.fields.len() {
            let moved: Vec<Field> = self.fields[start as usize..(start + len) as usize].to_vec();
            self.root.0 = self.fields.len() as u32;
            self.fields.extend(moved);
        }
        self.fields.push(f);
        self.root.1 += 1;
        self.root_raw = Text::EMPTY;
        self.known_keys = false;
    }

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

    /// Appends a top-level field (no check for an existing key: use [`Event::set`] for that).
    pub fn push(&mut self, key: &str, v: Value) {
        self.materialize();
        let key = self.alloc(key);
        let val = self.store(&v);
        self.push_field(Field { key, val });
    }

    /// Appends a top-level field holding an object built from `fields`.
    pub fn push_object(&mut self, key: &str, fields: &[(&str, Value)]) {
        self.materialize();
        let key = self.alloc(key);
        let start = self.fields.len() as u32;
        let mut built = Vec::with_capacity(fields.len());
        for (k, v) in fields {
            let k = self.alloc(k);
            let v = self.store(v);
            built.push(Field { key: k, val: v });
        }
        // keep the root contiguous: move it behind the new object if needed
        self.fields.extend(built);
        let obj = Val::Obj { start, len: fields.len() as u32, raw: Text::EMPTY };
        self.push_field(Field { key, val: obj });
    }

    /// Sets the value at `path` (object keys from the top level), creating objects on the way.
    /// Returns false if the path crosses a value that is not an object.
    pub fn set(&mut self, path: &[&str], v: Value) -> bool {
        self.materialize();
        let val = self.store(&v);
        self.set_val(path, val)
    }

    fn set_val(&mut self, path: &[&str], val: Val) -> bool {
        let Some((last, parents)) = path.split_last() else {
            return false;
        };
        // Walk down, remembering the chain of (object range) so that we can rewrite it.
        let root = self.root;
        let mut chain: Vec<(u32, u32)> = vec![root];
        for key in parents {
            let (start, len) = *chain.last().unwrap();
            let found = self.find(start, len, key);
            match found.map(|i| self.fields[i].val) {
                Some(Val::Obj { start, len, .. }) => chain.push((start, len)),
                Some(Val::Json(t)) => {
                    // decode the JSON object one level so that it can be modified
                    let text = self.text(t).to_string();
                    match self.decode_json_object(&text) {
                        Some((s, l)) => {
                            let i = found.unwrap();
                            self.fields[i].val = Val::Obj { start: s, len: l, raw: Text::EMPTY };
                            chain.push((s, l));
                        }
                        None => return false,
                    }
                }
                Some(Val::Null) | None => {
                    // create an empty object
                    let s = self.fields.len() as u32;
                    let obj = Val::Obj { start: s, len: 0, raw: Text::EMPTY };
                    match found {
                        Some(i) => self.fields[i].val = obj,
                        None => {
                            let k = self.alloc(key);
                            let (ps, pl) = *chain.last().unwrap();
                            let (ns, nl) = self.append_to(ps, pl, Field { key: k, val: obj });
                            let last_idx = chain.len() - 1;
                            chain[last_idx] = (ns, nl);
                            self.relink(&chain, parents, last_idx);
                        }
                    }
                    chain.push((self.fields.len() as u32, 0));
                }
                Some(_) => return false,
            }
        }
        let (start, len) = *chain.last().unwrap();
        match self.find(start, len, last) {
            Some(i) => self.fields[i].val = val,
            None => {
                let k = self.alloc(last);
                let (ns, nl) = self.append_to(start, len, Field { key: k, val });
                let last_idx = chain.len() - 1;
                chain[last_idx] = (ns, nl);
                self.relink(&chain, parents, last_idx);
            }
        }
        // every object on the path is modified now
        self.clear_raw(&chain, parents);
        true
    }

    /// Decodes a JSON object text into fields appended to the vector; returns its range.
    fn decode_json_object(&mut self, text: &str) -> Option<(u32, u32)> {
        let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text).ok()?;
        let start = self.fields.len() as u32;
        let mut built = Vec::with_capacity(map.len());
        for (k, v) in &map {
            let key = self.alloc(k);
            let val = self.store(&Value::from_json(v));
            built.push(Field { key, val });
        }
        self.fields.extend(built);
        Some((start, map.len() as u32))
    }

    fn find(&self, start: u32, len: u32, key: &str) -> Option<usize> {
        (start as usize..(start + len) as usize)
            .find(|&i| self.fields[i].key.len() == key.len() && eq_short(self.text(self.fields[i].key), key))
    }

    /// Appends a field to the object at `start..start+len`, moving it to the end of the vector
    /// unless it already is there. Returns the new range.
    fn append_to(&mut self, start: u32, len: u32, f: Field) -> (u32, u32) {
        if (start + len) as usize == self.fields.len() {
            self.fields.push(f);
            return (start, len + 1);
        }
        let moved: Vec<Field> = self.fields[start as usize..(start + len) as usize].to_vec();
        let ns = self.fields.len() as u32;
        self.fields.extend(moved);
        self.fields.push(f);
        (ns, len + 1)
    }

    /// After the object at `chain[idx]` moved, updates the reference to it in its parent.
    fn relink(&mut self, chain: &[(u32, u32)], keys: &[&str], idx: usize) {
        let (ns, nl) = chain[idx];
        if idx == 0 {
            self.root = (ns, nl);
            return;
        }
        let (ps, pl) = chain[idx - 1];
        if let Some(i) = self.find(ps, pl, keys[idx - 1]) {
            self.fields[i].val = Val::Obj { start: ns, len: nl, raw: Text::EMPTY };
        }
    }

    fn clear_raw(&mut self, chain: &[(u32, u32)], keys: &[&str]) {
        self.root_raw = Text::EMPTY;
        if chain.len() == 1 {
            self.known_keys = false; // a top-level field was added or removed
        }
        for idx in 1..chain.len() {
            let (ps, pl) = chain[idx - 1];
            if let Some(i) = self.find(ps, pl, keys[idx - 1]) {
                if let Val::Obj { start, len, .. } = self.fields[i].val {
                    self.fields[i].val = Val::Obj { start, len, raw: Text::EMPTY };
                }
            }
        }
    }

    /// Removes the value at `path`. Returns whether something was removed.
    pub fn remove(&mut self, path: &[&str]) -> bool {
        self.materialize();
        let Some((last, parents)) = path.split_last() else {
            return false;
        };
        let mut chain: Vec<(u32, u32)> = vec![self.root];
        for key in parents {
            let (start, len) = *chain.last().unwrap();
            match self.find(start, len, key).map(|i| self.fields[i].val) {
                Some(Val::Obj { start, len, .. }) => chain.push((start, len)),
                Some(Val::Json(t)) => {
                    let text = self.text(t).to_string();
                    let i = self.find(start, len, key).unwrap();
                    match self.decode_json_object(&text) {
                        Some((s, l)) => {
                            self.fields[i].val = Val::Obj { start: s, len: l, raw: Text::EMPTY };
                            chain.push((s, l));
                        }
                        None => return false,
                    }
                }
                _ => return false,
            }
        }
        let (start, len) = *chain.last().unwrap();
        let Some(i) = self.find(start, len, last) else {
            return false;
        };
        // shift the rest of the object left by one
        let end = (start + len) as usize;
        self.fields.copy_within(i + 1..end, i);
        let last_idx = chain.len() - 1;
        chain[last_idx] = (start, len - 1);
        self.relink(&chain, parents, last_idx);
        self.clear_raw(&chain, parents);
        true
    }

    /// Moves the value at `from` to `to`. Returns false if `from` does not exist.
    pub fn rename(&mut self, from: &[&str], to: &[&str]) -> bool {
        let Some(v) = self.get_path(from).map(|v| v.to_owned_value()) else {
            return false;
        };
        self.remove(from);
        self.set(to, v)
    }
}

impl Value {
    /// Converts a `serde_json::Value` (objects and arrays become JSON text).
    pub fn from_json(v: &serde_json::Value) -> Value {
        match v {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(*b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            serde_json::Value::String(s) => Value::Str(s.clone()),
            other => Value::Json(other.to_string()),
        }
    }
}

/// Looks `key` up in a JSON object text without decoding the rest of it.
pub fn json_lookup<'a>(text: &'a str, key: &str) -> Option<ValRef<'a>> {
    let map: std::collections::HashMap<Cow<'a, str>, &'a serde_json::value::RawValue> =
        serde_json::from_str(text).ok()?;
    map.get(key).map(|raw| classify_raw(raw.get()))
}

/// Classifies JSON text by its first byte into a borrowed value.
pub fn classify_raw(s: &str) -> ValRef<'_> {
    match s.as_bytes().first() {
        Some(b'"') => {
            let inner = &s[1..s.len() - 1];
            if inner.contains('\\') {
                ValRef::Str(Cow::Owned(serde_json::from_str::<String>(s).unwrap_or_default()))
            } else {
                ValRef::Str(Cow::Borrowed(inner))
            }
        }
        Some(b't') => ValRef::Bool(true),
        Some(b'f') => ValRef::Bool(false),
        Some(b'n') => ValRef::Null,
        Some(b'{') | Some(b'[') => ValRef::Json(s),
        Some(_) => ValRef::Num(s),
        None => ValRef::Null,
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

    fn decoded(json: &str) -> Event {
        crate::model::decode::decode_one(Bytes::from(json.to_string())).expect("decodes")
    }

    #[test]
    fn set_creates_and_overwrites_nested_fields() {
        let mut ev = decoded(
            r#"{"messageSource":"telemetry","enqueuedTime":"2026-11-01T00:00:00Z","telemetry":{"t":1.5,"loc":{"lat":1}}}"#,
        );
        assert!(ev.raw_json().is_some());
        assert!(ev.set(&["telemetry", "f"], Value::Float(34.7)));
        assert!(ev.set(&["telemetry", "t"], Value::Int(2)));
        assert!(ev.set(&["telemetry", "loc", "lon"], Value::Float(-1.0)));
        assert!(ev.set(&["new", "a"], Value::Str("x\"y".into())));
        assert!(ev.raw_json().is_none());
        let v: serde_json::Value = serde_json::from_str(&ev.to_json()).unwrap();
        assert_eq!(v["telemetry"]["t"], 2);
        assert_eq!(v["telemetry"]["f"], 34.7);
        assert_eq!(v["telemetry"]["loc"]["lon"], -1.0);
        assert_eq!(v["telemetry"]["loc"]["lat"], 1);
        assert_eq!(v["new"]["a"], "x\"y");
        assert!(!ev.set(&["messageSource", "x"], Value::Null), "cannot descend into a string");
    }

    #[test]
    fn remove_and_rename() {
        let mut ev = decoded(
            r#"{"messageSource":"telemetry","enqueuedTime":"2026-11-01T00:00:00Z","telemetry":{"a":1,"b":2,"c":3}}"#,
        );
        assert!(ev.remove(&["telemetry", "b"]));
        assert!(!ev.remove(&["telemetry", "zz"]));
        assert!(ev.rename(&["telemetry", "a"], &["telemetry", "alpha"]));
        let v: serde_json::Value = serde_json::from_str(&ev.to_json()).unwrap();
        assert_eq!(v["telemetry"], serde_json::json!({"c":3,"alpha":1}));
    }

    #[test]
    fn rows_serialize_as_json() {
        let mut ev = Event::row();
        ev.push("deviceId", "d1".into());
        ev.push("count", Value::Int(3));
        ev.push("avg", Value::Float(1.0));
        ev.push("nan", Value::Float(f64::NAN));
        ev.push("t", Value::Time(1_700_000_000_123_000_000));
        ev.push_object("o", &[("k", Value::Str("v\n".into()))]);
        assert_eq!(
            ev.to_json(),
            r#"{"deviceId":"d1","count":3,"avg":1.0,"nan":null,"t":"2023-11-14T22:13:20.123Z","o":{"k":"v\n"}}"#
        );
        assert_eq!(ev.get_path(&["o", "k"]).unwrap().as_str(), Some("v\n"));
    }

    #[test]
    fn nested_json_is_looked_up_lazily() {
        let ev = decoded(
            r#"{"messageSource":"telemetry","enqueuedTime":"2026-11-01T00:00:00Z","telemetry":{"BloodPressure":{"Systolic":71,"Note":"a\"b"}}}"#,
        );
        assert_eq!(ev.get_path(&["telemetry", "BloodPressure", "Systolic"]).unwrap().as_f64(), Some(71.0));
        assert_eq!(ev.get_path(&["telemetry", "BloodPressure", "Note"]).unwrap().as_str(), Some("a\"b"));
        assert!(ev.get_path(&["telemetry", "BloodPressure", "Nope"]).is_none());
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
