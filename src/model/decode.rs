//! Decoding export JSON into events: the hot path of every pipeline.
//!
//! One pass of serde_json over the text, borrowing everything: keys and string values become
//! spans into the record's bytes, numbers stay as text until read, nested objects below the
//! first level stay as JSON text. The top-level payload objects (`telemetry`, `enrichments`,
//! `messageProperties`, audit `actor`/`resource`/`updated`) are decoded one level deep, since
//! pipelines look into them. Unknown fields are kept in place, in their original order.
//!
//! Errors are reasons meant for a dead-letter record: they name the field and what was wrong.

use std::borrow::Cow;
use std::cell::RefCell;
use std::fmt;

use bytes::Bytes;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::{MessageSource, MAX_RECORD_BYTES};
use crate::event::{build, Event, Field, Kind, Nanos, Text, Val, NO_TIME};
use crate::time;

pub use crate::projection::{record_slot, Projection, SLOTS, SLOT_ABSENT, SLOT_UNKNOWN};
use std::sync::Arc;

/// Turns the decoder's fast path ([`super::scan`]) on or off for the calling thread: for the
/// benchmarks and tests that compare it with the serde_json path. On by default.
#[doc(hidden)]
pub fn set_fast_path(on: bool) {
    FAST_PATH.with(|f| f.set(on));
}

/// Decodes one input record: a single export message or a JSON array of them. Each message
/// yields an event or the reason it could not be decoded.
pub fn decode_record(raw: Bytes) -> Vec<Result<Event, String>> {
    let mut out = Vec::with_capacity(1);
    decode_record_into(raw, &mut out);
    out
}

/// Like [`decode_record`], appending to `out`.
pub fn decode_record_into(raw: Bytes, out: &mut Vec<Result<Event, String>>) {
    decode_record_projected(raw, None, out)
}

/// Like [`decode_record_into`], keeping only the fields of `proj` (when given).
pub fn decode_record_projected(raw: Bytes, proj: Option<&Arc<Projection>>, out: &mut Vec<Result<Event, String>>) {
    decode_record_each(raw, proj, |r| out.push(r));
}

/// Like [`decode_record_projected`], handing each result to `out` (the hot loop of the files
/// source: an event is moved once less than through a vector of results).
#[inline]
pub fn decode_record_each(raw: Bytes, proj: Option<&Arc<Projection>>, mut out: impl FnMut(Result<Event, String>)) {
    if proj.is_some() {
        crate::event::register_completion(decode_object);
    }
    if raw.len() > MAX_RECORD_BYTES {
        out(Err(format!(
            "record of {} bytes exceeds the limit of {} bytes (IoT Central's own message limit)",
            raw.len(),
            MAX_RECORD_BYTES
        )));
        return;
    }
    let text = match std::str::from_utf8(&raw) {
        Ok(t) => t,
        Err(e) => {
            out(Err(format!("invalid UTF-8 at byte {}", e.valid_up_to())));
            return;
        }
    };
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        let elems: Vec<&RawValue> = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                out(Err(format!("malformed JSON array: {e}")));
                return;
            }
        };
        for (i, elem) in elems.iter().enumerate() {
            let part = build::raw_span(text, elem.get());
            let start = part_offset(text, elem.get());
            let sub = raw.slice(start..start + part.len());
            out(decode_valid(sub, proj).map_err(|e| format!("array element {i}: {e}")));
        }
    } else {
        out(decode_valid(raw, proj));
    }
}

fn part_offset(base: &str, part: &str) -> usize {
    part.as_ptr() as usize - base.as_ptr() as usize
}

/// Decodes exactly one export message (no arrays).
pub fn decode_one(raw: Bytes) -> Result<Event, String> {
    let mut v = decode_record(raw);
    match v.len() {
        1 => v.pop().unwrap(),
        n => Err(format!("expected one message, found {n}")),
    }
}

#[derive(Default)]
struct Scratch {
    root: Vec<Field>,
    nested: Vec<Field>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
    /// Whether the hand-written scanner ([`super::scan`]) is tried first; off only in tests that
    /// compare it with the serde_json path.
    static FAST_PATH: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Decodes one JSON object (UTF-8 already checked by the caller or checked here).
pub fn decode_object(raw: Bytes) -> Result<Event, String> {
    std::str::from_utf8(&raw).map_err(|e| format!("invalid UTF-8 at byte {}", e.valid_up_to()))?;
    decode_valid(raw, None)
}

/// Decodes exactly one export message keeping only the fields of `proj` (when given).
pub fn decode_object_projected(raw: Bytes, proj: Option<&Arc<Projection>>) -> Result<Event, String> {
    if proj.is_some() {
        crate::event::register_completion(decode_object);
    }
    std::str::from_utf8(&raw).map_err(|e| format!("invalid UTF-8 at byte {}", e.valid_up_to()))?;
    decode_valid(raw, proj)
}

/// Decodes one JSON object whose bytes the caller has checked to be UTF-8.
fn decode_valid(raw: Bytes, proj_arc: Option<&Arc<Projection>>) -> Result<Event, String> {
    let proj = proj_arc.map(|p| &**p);
    // SAFETY: every caller has validated `raw` as UTF-8: `decode_object` just now, and
    // `decode_record_into` for the whole record, of which array elements are token-aligned slices.
    let text = unsafe { std::str::from_utf8_unchecked(&raw) };
    let parts = SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let Scratch { root, nested } = &mut *s;
        root.clear();
        nested.clear();
        let mut arena = String::new();
        let mut env = Envelope::new();
        let mut slots = [SLOT_ABSENT; SLOTS];
        let out = super::scan::Out { root, nested, env: &mut env, slots: &mut slots };
        if !FAST_PATH.with(|f| f.get()) || super::scan::decode(text, proj, out).is_err() {
            // not the common case (or malformed): serde_json decides, and words any error
            root.clear();
            nested.clear();
            env = Envelope::new();
            slots = [SLOT_ABSENT; SLOTS];
            let mut de = serde_json::Deserializer::from_str(text);
            let seed = RootSeed { base: text, root, nested, arena: &mut arena, env: &mut env, proj, slots: &mut slots };
            seed.deserialize(&mut de).map_err(|e| json_error(text, e))?;
            de.end().map_err(|e| json_error(text, e))?;
        }
        let source = env.source.ok_or("not an IoT Central export message: no messageSource field")?;
        if env.time == NO_TIME {
            return Err("enqueuedTime is missing".to_string());
        }
        let root_len = root.len() as u32;
        let mut fields = Vec::with_capacity(root.len() + nested.len());
        fields.extend(root.iter().map(|f| match f.val {
            Val::Obj { start, len, raw } => Field { key: f.key, val: Val::Obj { start: start + root_len, len, raw } },
            _ => *f,
        }));
        fields.extend_from_slice(nested);
        if let Some(p) = proj {
            // telemetry slots were counted within `nested`, which follows the root fields
            for s in &mut slots[(2 + p.top.len()).min(SLOTS)..] {
                if *s < SLOT_UNKNOWN {
                    let at = *s as usize + root_len as usize;
                    *s = if at < SLOT_UNKNOWN as usize { at as u8 } else { SLOT_UNKNOWN };
                }
            }
        }
        Ok((arena, fields, root_len, env.time, source, env.known_keys, env.telemetry, slots))
    })?;
    let (arena, fields, root_len, time, source, known, tele, slots) = parts;
    let mut ev = Event::from_parts(raw, arena, fields, root_len, time, Kind::Export(source));
    ev.set_layout_hints(known, tele);
    if let Some(p) = proj_arc {
        ev.set_projection(p.clone(), slots);
    }
    Ok(ev)
}

fn json_error(text: &str, e: serde_json::Error) -> String {
    let msg = e.to_string();
    // A syntax error inside a field surfaces as that field's error: tell them apart by checking
    // the syntax of the whole record (only on this error path).
    let syntax = e.is_syntax() || e.is_eof() || serde_json::from_str::<serde::de::IgnoredAny>(text).is_err();
    if syntax {
        let msg = match serde_json::from_str::<serde::de::IgnoredAny>(text) {
            Err(inner) => inner.to_string(),
            Ok(_) => msg,
        };
        let snippet: String = text.chars().take(60).collect();
        format!("malformed JSON: {msg} (record starts {snippet:?})")
    } else {
        msg
    }
}

pub(super) struct Envelope {
    pub(super) source: Option<MessageSource>,
    pub(super) time: Nanos,
    /// No top-level key outside the export format.
    pub(super) known_keys: bool,
    /// Position of `telemetry` among the top-level fields.
    pub(super) telemetry: Option<u8>,
}

impl Envelope {
    fn new() -> Self {
        Envelope { source: None, time: NO_TIME, known_keys: true, telemetry: None }
    }
}

/// A string key or value that borrows from the input when it has no escapes.
struct CowStr<'a>(Cow<'a, str>);

impl<'de> de::Deserialize<'de> for CowStr<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CowStr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Owned(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

// The `Cow` says whether the text borrows from `base` (a span) or had to be unescaped (arena).
#[allow(clippy::ptr_arg)]
fn text_of(base: &str, arena: &mut String, s: &Cow<'_, str>) -> Text {
    match s {
        Cow::Borrowed(b) => build::raw_span(base, b),
        Cow::Owned(o) => build::arena_span(arena, o),
    }
}

/// Converts a raw JSON value into a [`Val`] that references the input.
fn classify(base: &str, arena: &mut String, raw: &str) -> Val {
    match raw.as_bytes()[0] {
        b'"' => {
            let inner = &raw[1..raw.len() - 1];
            if inner.as_bytes().contains(&b'\\') {
                let s: String = serde_json::from_str(raw).unwrap_or_default();
                Val::Str(build::arena_span(arena, &s))
            } else {
                Val::Str(build::raw_span(base, inner))
            }
        }
        b't' => Val::Bool(true),
        b'f' => Val::Bool(false),
        b'n' => Val::Null,
        b'{' | b'[' => Val::Json(build::raw_span(base, raw)),
        _ => Val::Num(build::raw_span(base, raw)),
    }
}

struct RootSeed<'s> {
    base: &'s str,
    root: &'s mut Vec<Field>,
    nested: &'s mut Vec<Field>,
    arena: &'s mut String,
    env: &'s mut Envelope,
    proj: Option<&'s Projection>,
    slots: &'s mut [u8; SLOTS],
}

impl<'de, 's> DeserializeSeed<'de> for RootSeed<'s> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, 's> Visitor<'de> for RootSeed<'s> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object (an IoT Central export message)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let RootSeed { base, root, nested, arena, env, proj, slots } = self;
        *env = Envelope::new();
        let mut tele_seen = false;
        while let Some(CowStr(key)) = map.next_key::<CowStr<'de>>()? {
            let key_text = text_of(base, arena, &key);
            let kind = key_kind(&key);
            if kind == KeyKind::Other {
                env.known_keys = false;
            }
            let keep = keep_for(proj, &key, kind);
            if keep == Keep::Nothing {
                match kind {
                    KeyKind::EnvString => {
                        let _: Option<CowStr<'de>> =
                            map.next_value().map_err(|e| de::Error::custom(format!("{key}: {}", strip_pos(&e))))?;
                    }
                    KeyKind::Object => {
                        let seed = ObjSeed {
                            base,
                            nested: &mut *nested,
                            arena: &mut *arena,
                            keep: Keep::Nothing,
                            numbers: false,
                            slots: None,
                        };
                        map.next_value_seed(seed)
                            .map_err(|e| de::Error::custom(format!("{key}: {}", strip_pos(&e))))?;
                    }
                    KeyKind::Properties => {
                        let raw: &'de RawValue = map.next_value()?;
                        if !(raw.get().starts_with('[') || raw.get() == "null") {
                            return Err(de::Error::custom("properties: expected an array of {name, value}"));
                        }
                    }
                    _ => {
                        let _: de::IgnoredAny = map.next_value()?;
                    }
                }
                continue;
            }
            if kind == KeyKind::Object && key.as_ref() == "telemetry" && root.len() < 255 {
                env.telemetry = Some(root.len() as u8);
            }
            let val = match kind {
                KeyKind::EnvString => {
                    let v: Option<CowStr<'de>> =
                        map.next_value().map_err(|e| de::Error::custom(format!("{key}: {}", strip_pos(&e))))?;
                    match v {
                        Some(CowStr(s)) => Val::Str(text_of(base, arena, &s)),
                        None => Val::Null,
                    }
                }
                KeyKind::MessageSource => {
                    let CowStr(s) =
                        map.next_value().map_err(|e| de::Error::custom(format!("messageSource: {}", strip_pos(&e))))?;
                    env.source = Some(MessageSource::parse(&s));
                    Val::Str(text_of(base, arena, &s))
                }
                KeyKind::EnqueuedTime => {
                    let CowStr(s) =
                        map.next_value().map_err(|e| de::Error::custom(format!("enqueuedTime: {}", strip_pos(&e))))?;
                    env.time = time::parse_rfc3339(&s).ok_or_else(|| {
                        de::Error::custom(format!(
                            "enqueuedTime: {s:?} is not an RFC 3339 timestamp between the years 1677 and 2262"
                        ))
                    })?;
                    Val::Str(text_of(base, arena, &s))
                }
                KeyKind::Object => {
                    let numbers = proj.is_some();
                    // the kept telemetry keys get slots (their indices are relative to `nested`
                    // until the root's length is known)
                    let tele_slots = match (proj, keep) {
                        (Some(p), Keep::Some(_)) if !tele_seen => Some((p, &mut *slots)),
                        _ => None,
                    };
                    tele_seen |= matches!(keep, Keep::Some(_));
                    let seed =
                        ObjSeed { base, nested: &mut *nested, arena: &mut *arena, keep, numbers, slots: tele_slots };
                    map.next_value_seed(seed).map_err(|e| de::Error::custom(format!("{key}: {}", strip_pos(&e))))?
                }
                KeyKind::Properties => {
                    let raw: &'de RawValue = map.next_value()?;
                    let v = classify(base, arena, raw.get());
                    match v {
                        Val::Json(_) if raw.get().starts_with('[') => v,
                        Val::Null => v,
                        _ => return Err(de::Error::custom("properties: expected an array of {name, value}")),
                    }
                }
                KeyKind::Other => {
                    let raw: &'de RawValue = map.next_value()?;
                    classify(base, arena, raw.get())
                }
            };
            if let Some(p) = proj {
                record_slot(slots, p.top_slot(&key), root.len());
            }
            root.push(Field { key: key_text, val });
        }
        Ok(())
    }
}

/// How the decoder treats a top-level key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum KeyKind {
    /// Envelope strings (`deviceId`, ...): must be strings or null.
    EnvString,
    MessageSource,
    EnqueuedTime,
    /// Payload objects decoded one level deep (`telemetry`, ...).
    Object,
    Properties,
    Other,
}

/// Dispatches on length first, then compares at most two candidates word-wise: faster than a
/// string `match`, which calls `memcmp` for every candidate of the same length.
pub(super) fn key_kind(k: &str) -> KeyKind {
    use crate::event::eq_short as eq;
    use KeyKind::*;
    match k.len() {
        5 if eq(k, "actor") => Object,
        6 if eq(k, "schema") || eq(k, "module") => EnvString,
        7 if eq(k, "updated") => Object,
        8 if eq(k, "deviceId") => EnvString,
        8 if eq(k, "resource") => Object,
        9 if eq(k, "telemetry") => Object,
        9 if eq(k, "component") => EnvString,
        10 if eq(k, "templateId") => EnvString,
        10 if eq(k, "properties") => Properties,
        11 if eq(k, "messageType") => EnvString,
        11 if eq(k, "enrichments") => Object,
        12 if eq(k, "enqueuedTime") => EnqueuedTime,
        13 if eq(k, "messageSource") => MessageSource,
        13 if eq(k, "applicationId") => EnvString,
        17 if eq(k, "messageProperties") => Object,
        _ => Other,
    }
}

/// serde_json appends " at line L column C"; for a field-level error the field name is clearer.
fn strip_pos(e: &dyn fmt::Display) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// What the decoder keeps of a top-level value: everything without a projection; else what the
/// projection covers (`messageSource` and `enqueuedTime` always), of `telemetry` only its listed
/// keys. Skipped values get the same checks.
pub(super) fn keep_for<'p>(proj: Option<&'p Projection>, key: &str, kind: KeyKind) -> Keep<'p> {
    match proj {
        None => Keep::All,
        Some(p) if p.covers_top(key) => match (kind, p.telemetry.as_deref()) {
            (KeyKind::Object, Some(keys)) if key == "telemetry" => Keep::Some(keys),
            _ => Keep::All,
        },
        Some(_) => Keep::Nothing,
    }
}

/// Which fields of an object the decoder keeps.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Keep<'p> {
    All,
    Some(&'p [String]),
    Nothing,
}

struct ObjSeed<'s> {
    base: &'s str,
    nested: &'s mut Vec<Field>,
    arena: &'s mut String,
    keep: Keep<'s>,
    /// Parse kept numbers now (projected decoding: the pipeline reads them).
    numbers: bool,
    /// Record where the kept keys are (the projection's `telemetry`).
    slots: Option<(&'s Projection, &'s mut [u8; SLOTS])>,
}

impl<'de, 's> DeserializeSeed<'de> for ObjSeed<'s> {
    type Value = Val;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Val, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, 's> Visitor<'de> for ObjSeed<'s> {
    type Value = Val;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Val, E> {
        Ok(Val::Null)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Val, A::Error> {
        let ObjSeed { base, nested, arena, keep, numbers, mut slots } = self;
        if keep == Keep::Nothing {
            while map.next_key::<de::IgnoredAny>()?.is_some() {
                map.next_value::<de::IgnoredAny>()?;
            }
            return Ok(Val::Null);
        }
        let start = nested.len();
        let mut first_key: Option<&'de str> = None;
        let mut all_borrowed = true;
        let mut last_end: Option<&'de str> = None;
        while let Some(CowStr(key)) = map.next_key::<CowStr<'de>>()? {
            match &key {
                Cow::Borrowed(k) if nested.len() == start => first_key = Some(k),
                Cow::Owned(_) => all_borrowed = false,
                _ => {}
            }
            if let Keep::Some(keys) = keep {
                let Some(at) = keys.iter().position(|k| crate::event::eq_short(k, &key)) else {
                    map.next_value::<de::IgnoredAny>()?;
                    all_borrowed = false; // the object's text is not what we keep
                    continue;
                };
                if let Some((p, slots)) = slots.as_mut() {
                    record_slot(slots, p.telemetry_slot_at(at), nested.len());
                }
            }
            let key_text = text_of(base, arena, &key);
            let raw: &'de RawValue = map.next_value()?;
            last_end = Some(raw.get());
            let mut val = classify(base, arena, raw.get());
            if numbers {
                if let Val::Num(_) = val {
                    val = parse_number(raw.get());
                }
            }
            nested.push(Field { key: key_text, val });
        }
        let len = nested.len() - start;
        let raw = match (all_borrowed, first_key, last_end) {
            (true, Some(k), Some(last)) => object_span(base, k, last).unwrap_or(Text::EMPTY),
            _ => Text::EMPTY,
        };
        Ok(Val::Obj { start: start as u32, len: len as u32, raw })
    }
}

/// A JSON number as an integer when it is one, else a float.
pub(super) fn parse_number(s: &str) -> Val {
    if let Some(v) = parse_plain_number(s.as_bytes()) {
        return v;
    }
    if !s.contains(['.', 'e', 'E']) {
        if let Ok(i) = s.parse::<i64>() {
            return Val::Int(i);
        }
    }
    s.parse::<f64>().map(Val::Float).unwrap_or(Val::Null)
}

/// Powers of ten that are exact in an f64.
const POW10: [f64; 16] = [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15];

/// The common case of [`parse_number`] in one pass: `-?digits(.digits)?` with at most 15
/// digits in all (telemetry such as `25.542`). The mantissa and the power of ten are then both
/// exact in an f64, so one division gives the correctly rounded value, as `str::parse` does
/// (Clinger's fast path). `None` for anything else (exponents, long numbers).
#[inline]
fn parse_plain_number(b: &[u8]) -> Option<Val> {
    let (neg, digits) = match b.first()? {
        b'-' => (true, &b[1..]),
        _ => (false, b),
    };
    let mut m: u64 = 0;
    let mut n = 0;
    let mut frac: Option<usize> = None;
    for &c in digits {
        match c {
            b'0'..=b'9' => {
                m = m * 10 + (c - b'0') as u64;
                n += 1;
                if n > 15 {
                    return None;
                }
                if let Some(f) = frac.as_mut() {
                    *f += 1;
                }
            }
            b'.' if frac.is_none() => frac = Some(0),
            _ => return None,
        }
    }
    match frac {
        _ if n == 0 => None,
        None => Some(Val::Int(if neg { -(m as i64) } else { m as i64 })),
        Some(0) => None,
        Some(f) => {
            let v = m as f64 / POW10[f];
            Some(Val::Float(if neg { -v } else { v }))
        }
    }
}

/// Recovers the text of an object from its first key and its last value: the `{` is the
/// first non-blank byte before the key's opening quote, the `}` the first after the value.
fn object_span(base: &str, first_key: &str, last_val: &str) -> Option<Text> {
    let b = base.as_bytes();
    let mut open = part_offset(base, first_key).checked_sub(2)?; // skip the opening quote
    while b.get(open)?.is_ascii_whitespace() {
        open = open.checked_sub(1)?;
    }
    if b[open] != b'{' {
        return None;
    }
    let mut close = part_offset(base, last_val) + last_val.len();
    while b.get(close)?.is_ascii_whitespace() {
        close += 1;
    }
    if b[close] != b'}' {
        return None;
    }
    Some(build::raw_span(base, &base[open..=close]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::ValRef;

    fn ok(json: &str) -> Event {
        decode_one(Bytes::from(json.to_string())).unwrap_or_else(|e| panic!("{e}: {json}"))
    }
    fn err(json: &[u8]) -> String {
        decode_one(Bytes::from(json.to_vec())).expect_err("should fail")
    }

    const TELEMETRY: &str = r#"{
    "applicationId": "1dffa667-9bee-4f16-b243-25ad4151475e",
    "messageSource": "telemetry",
    "deviceId": "1vzb5ghlsg1",
    "schema": "default@v1",
    "templateId": "urn:qugj6vbw5:___qbj_27r",
    "enqueuedTime": "2020-08-05T22:26:55.455Z",
    "telemetry": {
        "Activity": "running",
        "BloodPressure": { "Diastolic": 7, "Systolic": 71 },
        "BodyTemperature": 98.73447010562934,
        "HeartRate": 88,
        "HeartRateVariability": 17,
        "RespiratoryRate": 13
    },
    "enrichments": { "userSpecifiedKey": "sampleValue" },
    "module": "VitalsModule",
    "component": "DeviceComponent",
    "messageProperties": { "messageProp": "value" }
}"#;

    #[test]
    fn telemetry_sample_from_the_docs() {
        let ev = ok(TELEMETRY);
        assert_eq!(ev.kind, Kind::Export(MessageSource::Telemetry));
        assert_eq!(crate::time::format_rfc3339(ev.time), "2020-08-05T22:26:55.455Z");
        assert_eq!(ev.get_str("deviceId"), Some("1vzb5ghlsg1"));
        assert_eq!(ev.get_str("component"), Some("DeviceComponent"));
        assert_eq!(ev.get_path(&["telemetry", "Activity"]).unwrap().as_str(), Some("running"));
        assert_eq!(ev.get_path(&["telemetry", "HeartRate"]).unwrap().as_f64(), Some(88.0));
        assert_eq!(ev.get_path(&["telemetry", "BloodPressure", "Systolic"]).unwrap().as_f64(), Some(71.0));
        assert_eq!(ev.get_path(&["enrichments", "userSpecifiedKey"]).unwrap().as_str(), Some("sampleValue"));
        assert_eq!(ev.get_path(&["messageProperties", "messageProp"]).unwrap().as_str(), Some("value"));
        // unmodified: the telemetry object's own text is kept for archiving
        match ev.get("telemetry").unwrap() {
            ValRef::Obj(o) => {
                let raw = o.raw_json().expect("raw kept");
                assert!(raw.starts_with('{') && raw.ends_with('}'));
                let v: serde_json::Value = serde_json::from_str(raw).unwrap();
                assert_eq!(v["HeartRate"], 88);
            }
            other => panic!("{other:?}"),
        }
        // whole message round-trips
        let a: serde_json::Value = serde_json::from_str(TELEMETRY).unwrap();
        let b: serde_json::Value = serde_json::from_str(&ev.to_json()).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn every_message_kind_decodes() {
        let samples = [
            (MessageSource::Telemetry, TELEMETRY.to_string()),
            (MessageSource::Properties, r#"{"applicationId":"fb74969c-8682-4708-af01-33499a7f7d98","messageSource":"properties","deviceId":"Pepjmh1Hcc","enqueuedTime":"2023-03-02T10:35:39.281Z","enrichments":{},"messageType":"devicePropertyReportedChange","schema":"default@v1","templateId":"dtmi:azureiot:ddzig4ascxz","properties":[{"component":"device_info","name":"swVersion","value":"12"}]}"#.to_string()),
            (MessageSource::DeviceConnectivity, r#"{"applicationId":"1dffa667-9bee-4f16-b243-25ad4151475e","messageSource":"deviceConnectivity","messageType":"connected","deviceId":"1vzb5ghlsg1","schema":"default@v1","templateId":"urn:qugj6vbw5:___qbj_27r","enqueuedTime":"2021-04-05T22:26:55.455Z","enrichments":{"userSpecifiedKey":"sampleValue"}}"#.to_string()),
            (MessageSource::DeviceLifecycle, r#"{"applicationId":"1dffa667-9bee-4f16-b243-25ad4151475e","messageSource":"deviceLifecycle","messageType":"registered","deviceId":"1vzb5ghlsg1","schema":"default@v1","templateId":"urn:qugj6vbw5:___qbj_27r","enqueuedTime":"2021-01-01T22:26:55.455Z","enrichments":{"userSpecifiedKey":"sampleValue"}}"#.to_string()),
            (MessageSource::DeviceTemplateLifecycle, r#"{"applicationId":"1dffa667-9bee-4f16-b243-25ad4151475e","messageSource":"deviceTemplateLifecycle","messageType":"created","schema":"default@v1","templateId":"urn:qugj6vbw5:___qbj_27r","enqueuedTime":"2021-01-01T22:26:55.455Z","enrichments":{"userSpecifiedKey":"sampleValue"}}"#.to_string()),
            (MessageSource::Audit, r#"{"actor":{"id":"test-audit","type":"apiToken"},"applicationId":"570c2d7b-1111-2222-abcd-000000000000","enqueuedTime":"2022-07-25T21:54:40.000Z","enrichments":{},"messageSource":"audit","messageType":"created","resource":{"displayName":"Sensor 1","id":"sensor","type":"device"},"schema":"default@v1"}"#.to_string()),
        ];
        for (kind, json) in samples {
            let ev = ok(&json);
            assert_eq!(ev.kind, Kind::Export(kind), "{json}");
            let a: serde_json::Value = serde_json::from_str(&json).unwrap();
            let b: serde_json::Value = serde_json::from_str(&ev.to_json()).unwrap();
            assert_eq!(a, b, "lossless for {kind:?}");
        }
        let audit = ok(
            r#"{"actor":{"id":"a","type":"apiToken"},"enqueuedTime":"2022-07-25T21:54:40Z","messageSource":"audit","messageType":"updated","resource":{"id":"sensor"},"updated":{"displayName":"x"}}"#,
        );
        assert_eq!(audit.get_path(&["actor", "type"]).unwrap().as_str(), Some("apiToken"));
        assert_eq!(audit.get_path(&["updated", "displayName"]).unwrap().as_str(), Some("x"));
        assert!(audit.get("deviceId").is_none(), "optional envelope fields stay optional");
    }

    #[test]
    fn unknown_fields_any_order_and_escapes_are_kept() {
        let json = r#"{"zzz":[1,2,{"a":null}],"enqueuedTime":"2021-01-29T16:45:39.143Z","telemetry":{"t\u00e9mp":8.5,"s":"a\"b","n":null,"b":true,"geo":{"lat":1.5,"lon":-2}},"messageSource":"telemetry","deviceId":"dev\\1","messageProperties":{"iothub-creation-time-utc":"2021-01-29T16:45:39.021Z"},"future":{"x":1}}"#;
        let ev = ok(json);
        assert_eq!(ev.get_str("deviceId"), Some("dev\\1"));
        assert_eq!(ev.get_path(&["telemetry", "témp"]).unwrap().as_f64(), Some(8.5));
        assert_eq!(ev.get_path(&["telemetry", "s"]).unwrap().as_str(), Some("a\"b"));
        assert_eq!(ev.get_path(&["telemetry", "n"]), Some(ValRef::Null));
        assert_eq!(ev.get_path(&["telemetry", "b"]), Some(ValRef::Bool(true)));
        assert_eq!(ev.get_path(&["telemetry", "geo", "lon"]).unwrap().as_f64(), Some(-2.0));
        assert_eq!(
            ev.get_path(&["messageProperties", "iothub-creation-time-utc"]).unwrap().as_time(),
            crate::time::parse_rfc3339("2021-01-29T16:45:39.021Z")
        );
        assert_eq!(ev.get_path(&["future", "x"]).unwrap().as_f64(), Some(1.0));
        let a: serde_json::Value = serde_json::from_str(json).unwrap();
        let b: serde_json::Value = serde_json::from_str(&ev.to_json()).unwrap();
        assert_eq!(a, b);
        assert_eq!(ev.root().iter().next().unwrap().0, "zzz", "original order kept");
    }

    #[test]
    fn json_arrays_are_several_messages() {
        let rec = format!(
            "[{TELEMETRY}, {}]",
            r#"{"messageSource":"telemetry","enqueuedTime":"2020-08-05T22:26:56Z","deviceId":"b","telemetry":{}}"#
        );
        let out = decode_record(Bytes::from(rec));
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].as_ref().unwrap().get_str("deviceId"), Some("b"));
        let bad = decode_record(Bytes::from_static(
            br#"[{"messageSource":"telemetry","enqueuedTime":"2020-08-05T22:26:56Z"}, 5]"#,
        ));
        assert!(bad[0].is_ok());
        assert!(bad[1].as_ref().unwrap_err().starts_with("array element 1:"), "{:?}", bad[1]);
    }

    #[test]
    fn bad_input_gives_reasons() {
        assert!(err(b"{\"messageSource\": \"telemetry\", ").starts_with("malformed JSON"));
        assert!(err(b"not json").starts_with("malformed JSON"));
        assert_eq!(
            err(b"{\"messageSource\":\"telemetry\",\"enqueuedTime\":\"2020-08-05T22:26:56Z\"}\xff"),
            "invalid UTF-8 at byte 67"
        );
        assert!(err(br#"{"enqueuedTime":"2020-08-05T22:26:56Z"}"#).contains("no messageSource"));
        assert_eq!(err(br#"{"messageSource":"telemetry"}"#), "enqueuedTime is missing");
        assert!(err(br#"{"messageSource":"telemetry","enqueuedTime":"yesterday"}"#)
            .contains("enqueuedTime: \"yesterday\" is not an RFC 3339 timestamp"));
        let e = err(br#"{"messageSource":"telemetry","enqueuedTime":"2020-08-05T22:26:56Z","deviceId":5}"#);
        assert!(e.starts_with("deviceId: invalid type: integer `5`, expected a string"), "{e}");
        let e = err(br#"{"messageSource":"telemetry","enqueuedTime":"2020-08-05T22:26:56Z","telemetry":[1]}"#);
        assert!(e.starts_with("telemetry: invalid type: sequence, expected an object"), "{e}");
        let e = err(br#"{"messageSource":"properties","enqueuedTime":"2020-08-05T22:26:56Z","properties":"x"}"#);
        assert!(e.starts_with("properties: expected an array"), "{e}");
        let big = format!(
            r#"{{"messageSource":"telemetry","enqueuedTime":"2020-08-05T22:26:56Z","telemetry":{{"blob":"{}"}}}}"#,
            "x".repeat(MAX_RECORD_BYTES)
        );
        assert!(err(big.as_bytes()).contains("exceeds the limit of 262144 bytes"));
        assert!(err(b"{\"messageSource\":\"telemetry\",\"enqueuedTime\":\"2020-08-05T22:26:56Z\"} trailing")
            .starts_with("malformed JSON"));
    }

    #[test]
    fn times_outside_the_representable_range_are_bad_input() {
        // found by fast_path_agrees_with_serde_json: such a year overflowed the nanoseconds
        let e = err(br#"{"messageSource":"telemetry","enqueuedTime":"1026-11-01T00:00:02Z"}"#);
        assert!(e.contains("between the years 1677 and 2262"), "{e}");
    }

    #[test]
    fn unknown_message_sources_are_kept() {
        let ev = ok(r#"{"messageSource":"somethingNew","enqueuedTime":"2020-08-05T22:26:56Z"}"#);
        assert_eq!(ev.kind, Kind::Export(MessageSource::Other));
        assert_eq!(ev.get_str("messageSource"), Some("somethingNew"));
    }
}

#[cfg(test)]
mod projection_tests {
    use super::*;
    use crate::path::FieldPath;

    const MSG: &str = r#"{"applicationId":"a","messageSource":"telemetry","deviceId":"d1","schema":"default@v1","templateId":"t","enqueuedTime":"2026-11-01T00:00:01.5Z","telemetry":{"temperature":21.5,"humidity":40,"status":"ok","geo":{"lat":1.5}},"enrichments":{"site":"p1"},"messageProperties":{"iothub-creation-time-utc":"2026-11-01T00:00:01Z"}}"#;

    fn proj(top: &[&str], tele: Option<&[&str]>) -> Arc<Projection> {
        Arc::new(Projection::new(
            top.iter().map(|s| s.to_string()).collect(),
            tele.map(|t| t.iter().map(|s| s.to_string()).collect()),
        ))
    }

    #[test]
    fn projected_events_answer_every_path_like_full_ones() {
        let full = decode_object(Bytes::from_static(MSG.as_bytes())).unwrap();
        let p = proj(&["deviceId", "telemetry"], Some(&["temperature"]));
        let part = decode_object_projected(Bytes::from_static(MSG.as_bytes()), Some(&p)).unwrap();
        assert!(part.projection().is_some());
        for path in [
            "deviceId",
            "temperature",
            "telemetry.temperature",
            "humidity",
            "telemetry.geo.lat",
            "enrichments.site",
            "messageProperties.iothub-creation-time-utc",
            "templateId",
            "status",
            "nope",
            "meta.offset",
            "messageSource",
        ] {
            let fp = FieldPath::parse(path).unwrap();
            assert_eq!(
                fp.get(&part).map(|v| v.as_f64().map(|f| f.to_string()).unwrap_or_else(|| v.to_json())),
                fp.get(&full).map(|v| v.as_f64().map(|f| f.to_string()).unwrap_or_else(|| v.to_json())),
                "{path}"
            );
        }
        assert_eq!(part.to_json(), MSG, "unmodified: the source text");
        assert_eq!(part.get_str("templateId"), Some("t"), "outside the projection: decoded on demand");
        assert_eq!(part.time, full.time);
        let mut changed = part.clone();
        assert!(changed.set(&["telemetry", "x"], crate::event::Value::Int(1)));
        assert!(changed.projection().is_none(), "a change makes it whole");
        assert_eq!(changed.get_path(&["telemetry", "humidity"]).unwrap().as_f64(), Some(40.0));
    }

    #[test]
    fn slots_answer_like_a_lookup_by_key() {
        let msgs = [
            MSG,
            // no telemetry; an unknown top-level key shadowing a telemetry name
            r#"{"messageSource":"telemetry","enqueuedTime":"2026-11-01T00:00:01Z","deviceId":"d2","humidity":3}"#,
            r#"{"deviceId":"d3","telemetry":{"humidity":1,"temperature":null},"messageSource":"telemetry","enqueuedTime":"2026-11-01T00:00:01Z","humidity":7}"#,
            // escaped key, telemetry first, keys in another order, duplicates
            r#"{"telemetry":{"pres\u0073ure":2,"temperature":"x","temperature":5},"enqueuedTime":"2026-11-01T00:00:01Z","messageSource":"telemetry","deviceId":"d4","deviceId":"d5"}"#,
            r#"{"messageSource":"properties","enqueuedTime":"2026-11-01T00:00:01Z","deviceId":"d6","telemetry":null}"#,
        ];
        let projections = [
            proj(&["deviceId", "telemetry"], Some(&["temperature", "humidity", "pressure"])),
            proj(&["telemetry", "deviceId"], Some(&["pressure", "temperature"])),
            // more than the slots hold: the last ones are looked up by key
            proj(&["deviceId", "templateId", "schema", "telemetry"], Some(&["a", "b", "humidity", "temperature"])),
            proj(&["deviceId"], None),
        ];
        let paths = [
            "deviceId",
            "messageSource",
            "enqueuedTime",
            "temperature",
            "humidity",
            "pressure",
            "telemetry.temperature",
            "telemetry.pressure",
            "telemetry.geo.lat",
            "templateId",
        ];
        let mut by_slot = 0;
        for msg in msgs {
            let full = decode_object(Bytes::from(msg.to_string())).unwrap();
            for p in &projections {
                let part = decode_object_projected(Bytes::from(msg.to_string()), Some(p)).unwrap();
                for path in paths {
                    let fp = FieldPath::parse(path).unwrap();
                    let show = |v: Option<crate::event::ValRef<'_>>| {
                        v.map(|v| v.as_f64().map(|f| f.to_string()).unwrap_or_else(|| v.to_json()))
                    };
                    assert_eq!(show(fp.get(&part)), show(fp.get(&full)), "{path} of {msg} with {p:?}");
                }
                by_slot += (0..SLOTS).filter(|s| matches!(part.slot(*s), Some(Some(_)))).count();
            }
        }
        assert!(by_slot > 40, "slots are recorded ({by_slot})");
    }

    #[test]
    fn projected_decoding_checks_skipped_fields_too() {
        let p = proj(&["deviceId"], None);
        for (bad, want) in [
            (
                r#"{"messageSource":"telemetry","enqueuedTime":"2026-11-01T00:00:01Z","templateId":5}"#,
                "templateId: invalid type",
            ),
            (
                r#"{"messageSource":"telemetry","enqueuedTime":"2026-11-01T00:00:01Z","enrichments":[1]}"#,
                "enrichments: invalid type",
            ),
            (
                r#"{"messageSource":"telemetry","enqueuedTime":"2026-11-01T00:00:01Z","properties":"x"}"#,
                "properties: expected an array",
            ),
            (
                r#"{"messageSource":"telemetry","enqueuedTime":"2026-11-01T00:00:01Z","other":{"a":tru}}"#,
                "malformed JSON",
            ),
        ] {
            let full = decode_object(Bytes::from(bad.to_string())).unwrap_err();
            let part = decode_object_projected(Bytes::from(bad.to_string()), Some(&p)).unwrap_err();
            assert!(full.contains(want) && part.contains(want), "{bad}: {full} / {part}");
        }
    }

    /// Decodes with the fast path on or off.
    fn decode_with(fast: bool, text: &[u8], p: Option<&Arc<Projection>>) -> Result<String, String> {
        set_fast_path(fast);
        let mut out = Vec::new();
        decode_record_projected(Bytes::copy_from_slice(text), p, &mut out);
        set_fast_path(true);
        // the whole event as decoded (spans, slots, hints), and what it reads back as
        Ok(out
            .into_iter()
            .map(|r| r.map(|ev| format!("{ev:?}\n{}", ev.to_json())))
            .collect::<Result<Vec<_>, _>>()?
            .join("\n"))
    }

    /// `text` with `edits` applied: (position, 0 delete / 1 insert / 2 replace, which of `bytes`).
    fn edited(text: &str, edits: &[(usize, usize, usize)], bytes: &[&[u8]]) -> Vec<u8> {
        let mut text = text.as_bytes().to_vec();
        for &(at, op, what) in edits {
            let at = at % (text.len() + 1);
            match op {
                0 if at < text.len() => {
                    text.remove(at);
                }
                1 => {
                    text.splice(at..at, bytes[what].iter().copied());
                }
                _ if at < text.len() => {
                    text.splice(at..at + 1, bytes[what].iter().copied());
                }
                _ => {}
            }
        }
        text
    }

    const SAMPLES: [&str; 5] = [
        MSG,
        r#"{"applicationId":"6e9d8f3c","deviceId":"sensor-02652","schema":"default@v1","templateId":"dtmi:contoso:EnvSensor;1","enqueuedTime":"2026-11-01T00:00:00.000Z","enrichments":{"site":"plant-6"},"messageSource":"telemetry","telemetry":{"temperature":25.542,"humidity":41.883,"pressure":1002.77,"battery":74,"status":"ok","location":{"lat":47.8652,"lon":-122.3,"alt":12.0}},"messageProperties":{"iothub-creation-time-utc":"2026-11-01T00:00:00.000Z"}}"#,
        " { \"messageSource\" : \"properties\" ,\n\t\"enqueuedTime\":\"2023-03-02T10:35:39.281Z\",\"properties\":[{\"name\":\"sw\",\"value\":\"1\\u00e9\"}],\"x\":[-0.5e+3,true,false,null,{}],\"enrichments\":null,\"deviceId\":null } ",
        r#"{"actor":{"id":"a","type":"apiToken"},"enqueuedTime":"2022-07-25T21:54:40Z","messageSource":"audit","messageType":"updated","resource":{"id":"s"},"updated":{"d":"x\"y"},"telemetry":{}}"#,
        r#"[{"messageSource":"telemetry","enqueuedTime":"2026-11-01T00:00:01Z","telemetry":{"temperature":-1E2,"a\nb":1}},{"messageSource":"x","enqueuedTime":"2026-11-01T00:00:02Z"}]"#,
    ];

    #[test]
    fn the_fast_path_takes_the_common_messages() {
        for (i, m) in SAMPLES[..2].iter().enumerate() {
            let (mut root, mut nested, mut env, mut slots) =
                (Vec::new(), Vec::new(), Envelope::new(), [SLOT_ABSENT; SLOTS]);
            let out =
                super::super::scan::Out { root: &mut root, nested: &mut nested, env: &mut env, slots: &mut slots };
            assert!(super::super::scan::decode(m, None, out).is_ok(), "sample {i}");
        }
    }

    proptest::proptest! {
        /// The one-pass number parser gives what `str::parse` gives.
        #[test]
        fn plain_numbers_parse_like_the_standard_library(s in "-?(0|[1-9][0-9]{0,17})(\\.[0-9]{1,17})?") {
            let want = if s.contains('.') {
                Val::Float(s.parse::<f64>().unwrap())
            } else {
                s.parse::<i64>().map(Val::Int).unwrap_or_else(|_| Val::Float(s.parse().unwrap()))
            };
            let got = parse_number(&s);
            match (got, want) {
                (Val::Float(a), Val::Float(b)) => proptest::prop_assert_eq!(a.to_bits(), b.to_bits(), "{}", s),
                (a, b) => proptest::prop_assert_eq!(a, b, "{}", s),
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(3000))]
        /// Whatever the fast path accepts, serde_json accepts and decodes the same way; what it
        /// rejects gets serde_json's own error. Checked on messages with random edits (bytes
        /// deleted, inserted or replaced by JSON's punctuation, digits, escapes and blanks).
        #[test]
        fn fast_path_agrees_with_serde_json(
            sample in 0usize..5,
            edits in proptest::collection::vec((0usize..400, 0usize..3, 0usize..24), 0..4),
            projected in 0usize..3,
        ) {
            const BYTES: &[&[u8]] = &[b"{", b"}", b"[", b"]", b"\"", b",", b":", b"\\", b"\\u12", b"\\uD800", b"0", b"01", b"-", b".", b"e", b"+", b"1", b" ", b"\n", b"\x01", b"null", b"tru", b"\xc3\xa9", b"\\n"];
            let text = edited(SAMPLES[sample], &edits, BYTES);
            let p = match projected {
                0 => None,
                1 => Some(proj(&["deviceId", "telemetry"], Some(&["temperature", "humidity", "pressure"]))),
                _ => Some(proj(&["telemetry", "properties", "x"], None)),
            };
            let fast = decode_with(true, &text, p.as_ref());
            let slow = decode_with(false, &text, p.as_ref());
            proptest::prop_assert_eq!(fast, slow, "{}", String::from_utf8_lossy(&text));
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1000))]
        /// The window's and the filter's shortcut reads (`get_stored`, `get_f64`) answer as the
        /// general lookup does, whatever the values' types: on messages with random edits,
        /// decoded with and without projections.
        #[test]
        fn stored_reads_agree_with_lookups(
            sample in 0usize..3,
            edits in proptest::collection::vec((0usize..400, 0usize..3, 0usize..12), 0..3),
            projected in 0usize..3,
        ) {
            const BYTES: &[&[u8]] = &[b"\"", b"0", b"-1", b".5", b"e9", b"null", b"true", b"\"x\"", b"{}", b"[1]", b"\\n", b" "];
            let text = edited(SAMPLES[sample], &edits, BYTES);
            let p = match projected {
                0 => None,
                1 => Some(proj(&["deviceId", "telemetry"], Some(&["temperature", "humidity", "pressure"]))),
                _ => Some(proj(&["deviceId", "telemetry", "enrichments"], None)),
            };
            let mut out = Vec::new();
            decode_record_projected(Bytes::copy_from_slice(&text), p.as_ref(), &mut out);
            for ev in out.into_iter().flatten() {
                for path in ["deviceId", "messageSource", "temperature", "telemetry.humidity", "pressure", "battery",
                             "enrichments.site", "templateId", "telemetry.location"] {
                    let fp = crate::path::FieldPath::parse(path).unwrap();
                    let want = fp.get(&ev);
                    if let Some(stored) = fp.get_stored(&ev) {
                        proptest::prop_assert_eq!(stored.map(|v| ev.val_ref(v)), want.clone(), "{}", path);
                    }
                    let f = fp.get_f64(&ev);
                    let g = want.and_then(|v| v.as_f64());
                    proptest::prop_assert_eq!(f.map(f64::to_bits), g.map(f64::to_bits), "{}", path);
                }
            }
        }
    }

    /// The shortcut is taken where the decoder recorded the field (or the test above would
    /// prove nothing).
    #[test]
    fn stored_reads_are_taken_for_projected_fields() {
        let p = proj(&["deviceId", "telemetry"], Some(&["temperature", "humidity", "pressure"]));
        let mut out = Vec::new();
        decode_record_projected(Bytes::from_static(SAMPLES[1].as_bytes()), Some(&p), &mut out);
        let ev = out.pop().unwrap().unwrap();
        let read = |path: &str| crate::path::FieldPath::parse(path).unwrap().get_stored(&ev);
        assert!(matches!(read("deviceId"), Some(Some(Val::Str(_)))));
        assert!(matches!(read("temperature"), Some(Some(Val::Float(_)))));
        assert!(matches!(read("telemetry.pressure"), Some(Some(Val::Float(_)))));
        assert_eq!(read("enrichments.site"), None, "not projected: the general lookup answers");
    }
}
