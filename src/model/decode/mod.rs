//! Decoding export JSON into events: the hot path of every pipeline.
//!
//! One pass of serde_json over the text, borrowing everything: keys and string values become
//! spans into the record's bytes, numbers stay as text until read, nested objects below the
//! first level stay as JSON text. The top-level payload objects (`telemetry`, `enrichments`,
//! `messageProperties`, audit `actor`/`resource`/`updated`) are decoded one level deep, since
//! pipelines look into them. Unknown fields are kept in place, in their original order.
//!
//! Errors are reasons meant for a dead-letter record: they name the field and what was wrong.
//!
//! The parts: the entry points and the assembly of an event here; the serde_json path
//! (its seeds and visitors) in `seed`; how each top-level key is treated, shared with the
//! fast path ([`super::scan`]), in `keys`; number parsing in `number`.

use std::cell::RefCell;

use bytes::Bytes;
use serde::de::DeserializeSeed;

use super::{MessageSource, MAX_RECORD_BYTES};
use crate::event::{Event, Field, Kind, Nanos, Val, NO_TIME};

pub use crate::projection::{record_slot, Projection, SLOTS, SLOT_ABSENT, SLOT_UNKNOWN};
use std::sync::Arc;

mod keys;
mod number;
#[cfg(test)]
mod projection_tests;
mod seed;
#[cfg(test)]
mod tests;

pub(in crate::model) use keys::{keep_for, key_kind, Keep, KeyKind};
pub(in crate::model) use number::parse_number;
use seed::RootSeed;
pub(in crate::model) use seed::{classify, CowStr};

/// The reason a JSON object that is not an export message is refused (`format: auto` decodes
/// such an object as a record of any shape instead).
pub const NO_MESSAGE_SOURCE: &str = "not an IoT Central export message: no messageSource field";

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
        let elems = match super::generic::array_elements(&raw, text) {
            Ok(v) => v,
            Err(reason) => return out(Err(reason)),
        };
        let mut errors = super::limits::ElementErrors::default();
        for (i, sub) in elems.into_iter().enumerate() {
            errors.pass(i, decode_valid(sub, proj), &mut out);
        }
        errors.finish(&mut out);
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
            // what serde_json's skipping accepts and its values refuse (deep nesting, numbers
            // out of range, lone surrogates): refused here, as `from_str::<Value>` would
            crate::model::limits::check_value_limits(text)?;
            let mut de = serde_json::Deserializer::from_str(text);
            let seed = RootSeed { base: text, root, nested, arena: &mut arena, env: &mut env, proj, slots: &mut slots };
            seed.deserialize(&mut de).map_err(|e| json_error(text, e))?;
            de.end().map_err(|e| json_error(text, e))?;
        }
        let source = env.source.ok_or(NO_MESSAGE_SOURCE)?;
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
