//! Records of any JSON shape (`format: json`): what IoT Central's destinations receive when an
//! export carries a JQ transformation, or anything else that is JSON.
//!
//! [`decode_generic`] turns one record (a JSON object, or a JSON array of objects) into
//! [`Kind::Row`] events. Fields are decoded as the export decoder does (keys and strings are
//! spans into the record's bytes, numbers stay as written until read), and nested objects are
//! decoded all the way down, so that a field path reads them (`device.id`,
//! `telemetry.temperature`); arrays stay JSON text. Every field is kept, in order.
//!
//! Each event needs a time: the value at [`GenericOptions::time`] (RFC 3339 text, or epoch
//! milliseconds as a number or as digits), or, when the record has no such field, the time the
//! transport gives ([`Transport::enqueued`]: Event Hubs' enqueued time, the AMQP `timestamp`
//! property). A record without either is refused with the reason, for the source's
//! `dead_letter` output. The device is the value at [`GenericOptions::device_id`], else the
//! transport's (`iotcentral-device-id`); when there is one, the event's top-level `deviceId`
//! holds it, so that windows (grouped by `deviceId` by default) and the `central` sink find it.
//!
//! Nothing here knows a source: any producer of JSON records (a source, a transform whose
//! outputs become events) calls [`decode_generic`] or [`decode_generic_with`].

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::decode::{classify, CowStr};
use super::MAX_RECORD_BYTES;
use crate::event::{build, Event, Field, Kind, Nanos, Val, ValRef, Value, NO_TIME};
use crate::path::FieldPath;

/// How records of any shape become events.
#[derive(Debug, Clone, Default)]
pub struct GenericOptions {
    /// The field holding the event time (`Timestamp`, `EnqueuedTime`, `payload.ts`): RFC 3339
    /// text or epoch milliseconds. `None`: only the transport's time.
    pub time: Option<FieldPath>,
    /// The field holding the device id. `None`: only the transport's device id.
    pub device_id: Option<FieldPath>,
}

/// What the transport that carried a record knows of it.
#[derive(Debug, Clone, Copy)]
pub struct Transport<'a> {
    /// When the broker enqueued the record (`NO_TIME`: the transport has no such time).
    pub enqueued: Nanos,
    /// The device the transport names (the `iotcentral-device-id` property).
    pub device_id: Option<&'a str>,
}

impl Transport<'_> {
    /// A transport that knows nothing of the record (files, a transform's output).
    pub const NONE: Transport<'static> = Transport { enqueued: NO_TIME, device_id: None };
}

impl Default for Transport<'_> {
    fn default() -> Self {
        Transport::NONE
    }
}

/// Decodes one record of any JSON shape: a JSON object, or a JSON array of objects (one event
/// each). Each element yields a [`Kind::Row`] event, or the reason it cannot be one.
pub fn decode_generic(raw: Bytes, opts: &GenericOptions) -> Vec<Result<Event, String>> {
    let mut out = Vec::with_capacity(1);
    decode_generic_with(raw, opts, &Transport::NONE, |r| out.push(r));
    out
}

/// Like [`decode_generic`], with what the transport knows of the record (its fallbacks for the
/// time and the device), handing each result to `out`.
pub fn decode_generic_with(
    raw: Bytes,
    opts: &GenericOptions,
    transport: &Transport<'_>,
    mut out: impl FnMut(Result<Event, String>),
) {
    if raw.len() > MAX_RECORD_BYTES {
        out(Err(format!(
            "record of {} bytes exceeds the limit of {MAX_RECORD_BYTES} bytes (IoT Central's own message limit)",
            raw.len()
        )));
        return;
    }
    let text = match std::str::from_utf8(&raw) {
        Ok(t) => t,
        Err(e) => return out(Err(format!("invalid UTF-8 at byte {}", e.valid_up_to()))),
    };
    if !text.trim_start().starts_with('[') {
        return out(one(raw, opts, transport));
    }
    match array_elements(&raw, text) {
        Ok(elems) => {
            let mut errors = super::limits::ElementErrors::default();
            for (i, sub) in elems.into_iter().enumerate() {
                errors.pass(i, one(sub, opts, transport), &mut out);
            }
            errors.finish(&mut out);
        }
        Err(reason) => out(Err(reason)),
    }
}

/// The elements of a JSON array record (`text`: `raw` as text), each a slice of `raw`; `Err`
/// when the record is no JSON array, is past serde_json's value limits as a whole, or has more
/// elements than one record may ([`super::limits`]).
pub(super) fn array_elements(raw: &Bytes, text: &str) -> Result<Vec<Bytes>, String> {
    let elems: Vec<&RawValue> = serde_json::from_str(text).map_err(|e| format!("malformed JSON array: {e}"))?;
    super::limits::check_array_len(elems.len())?;
    super::limits::check_value_limits(text)?;
    Ok(elems
        .iter()
        .map(|elem| {
            let start = elem.get().as_ptr() as usize - text.as_ptr() as usize;
            raw.slice(start..start + elem.get().len())
        })
        .collect())
}

/// Objects nested deeper than this stay JSON text (field paths still read into them).
const MAX_DEPTH: usize = 32;

/// One JSON object (valid UTF-8) into an event with its time and device.
fn one(raw: Bytes, opts: &GenericOptions, transport: &Transport<'_>) -> Result<Event, String> {
    // SAFETY: the caller checked the whole record as UTF-8, and array elements are slices of it
    // at token boundaries.
    let text = unsafe { std::str::from_utf8_unchecked(&raw) };
    let trimmed = text.trim();
    if !trimmed.starts_with('{') {
        let snippet: String = trimmed.chars().take(40).collect();
        return Err(match serde_json::from_str::<de::IgnoredAny>(text) {
            _ if trimmed.is_empty() => "an empty record".to_string(),
            Err(e) => format!("malformed JSON: {e} (record starts {snippet:?})"),
            Ok(_) => format!("not a JSON object: {snippet} (format: json takes objects, or arrays of them)"),
        });
    }
    super::limits::check_value_limits(text)?;
    let mut arena = String::new();
    let mut nested = Vec::new();
    let root = parse_object(text, text, &mut arena, &mut nested, 0).map_err(|e| {
        let snippet: String = text.chars().take(60).collect();
        format!("malformed JSON: {e} (record starts {snippet:?})")
    })?;
    let root_len = root.len() as u32;
    let mut fields = Vec::with_capacity(root.len() + nested.len());
    fields.extend(root);
    fields.extend(nested);
    // nested objects were numbered within `nested`, which follows the root fields
    for f in &mut fields {
        if let Val::Obj { start, .. } = &mut f.val {
            *start += root_len;
        }
    }
    let mut ev = Event::from_parts(raw, arena, fields, root_len, NO_TIME, Kind::Row);
    ev.time = event_time(&ev, opts, transport)?;
    if let Some(device) = device_of(&ev, opts, transport)? {
        if ev.get_str("deviceId") != Some(device.as_str()) {
            ev.set(&["deviceId"], Value::Str(device));
        }
    }
    Ok(ev)
}

/// The event time: the record's field, else the transport's.
fn event_time(ev: &Event, opts: &GenericOptions, transport: &Transport<'_>) -> Result<Nanos, String> {
    let found = opts.time.as_ref().and_then(|p| p.get(ev)).filter(|v| !v.is_null());
    match (found, &opts.time) {
        (Some(v), Some(path)) => time_of(&v).ok_or_else(|| {
            format!("no usable time: `{path}` is {}, not an RFC 3339 timestamp or epoch milliseconds", shown(&v))
        }),
        _ if transport.enqueued != NO_TIME => Ok(transport.enqueued),
        (_, Some(path)) => {
            Err(format!("no usable time: the record has no `{path}` and its transport gives no enqueued time"))
        }
        (_, None) => Err("no usable time: set `time:` to the record's timestamp field (its transport gives \
                          no enqueued time)"
            .to_string()),
    }
}

/// A timestamp from RFC 3339 text or epoch milliseconds (a number, or a string of digits), within
/// the range of event times (the years 1677 to 2262).
fn time_of(v: &ValRef<'_>) -> Option<Nanos> {
    let text = match v {
        ValRef::Time(t) => return Some(*t),
        ValRef::Str(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => s.as_ref(),
        ValRef::Str(s) => return crate::time::parse_rfc3339(s),
        ValRef::Num(s) => s,
        ValRef::Int(i) => return i.checked_mul(1_000_000),
        ValRef::Float(f) => return ms_to_nanos(*f),
        _ => return None,
    };
    // milliseconds written as digits exactly (to the nanosecond); exponents through a float
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    match (whole.parse::<i64>(), frac.len() <= 6 && frac.bytes().all(|b| b.is_ascii_digit())) {
        (Ok(ms), true) => {
            let frac_ns: i64 = format!("{frac:0<6}").parse().ok()?;
            ms.checked_mul(1_000_000)?.checked_add(if ms < 0 || whole.starts_with('-') { -frac_ns } else { frac_ns })
        }
        _ => ms_to_nanos(text.parse().ok()?),
    }
}

fn ms_to_nanos(ms: f64) -> Option<Nanos> {
    let ns = (ms * 1e6).round();
    (ns.is_finite() && ns > i64::MIN as f64 && ns < i64::MAX as f64).then_some(ns as Nanos)
}

/// The device: the record's field, else the transport's.
fn device_of(ev: &Event, opts: &GenericOptions, transport: &Transport<'_>) -> Result<Option<String>, String> {
    if let Some(path) = &opts.device_id {
        match path.get(ev) {
            None | Some(ValRef::Null) => {}
            Some(ValRef::Str(s)) => return Ok(Some(s.into_owned())),
            Some(v @ (ValRef::Int(_) | ValRef::Num(_))) => return Ok(Some(crate::path::key_string(&v))),
            Some(v) => return Err(format!("`{path}` is {}, not a device id", shown(&v))),
        }
    }
    Ok(transport.device_id.map(str::to_string))
}

/// A value as shown in a reason: short JSON.
fn shown(v: &ValRef<'_>) -> String {
    let json = v.to_json();
    if json.chars().count() > 40 {
        format!("{}…", json.chars().take(40).collect::<String>())
    } else {
        json
    }
}

/// Decodes the object `obj` (a slice of `base`) one level into its fields; nested objects go
/// to `nested` (each one contiguous, numbered from the start of `nested`).
fn parse_object(
    base: &str,
    obj: &str,
    arena: &mut String,
    nested: &mut Vec<Field>,
    depth: usize,
) -> Result<Vec<Field>, String> {
    let Entries(entries) = serde_json::from_str(obj).map_err(|e| e.to_string())?;
    let mut fields = Vec::with_capacity(entries.len());
    for (key, raw) in entries {
        let key = match key {
            Cow::Borrowed(k) => build::raw_span(base, k),
            Cow::Owned(k) => build::arena_span(arena, &k),
        };
        let v = raw.get();
        let val = match v.as_bytes()[0] {
            b'{' if depth < MAX_DEPTH => {
                let inner = parse_object(base, v, arena, nested, depth + 1)?;
                let start = nested.len() as u32;
                let len = inner.len() as u32;
                nested.extend(inner);
                Val::Obj { start, len, raw: build::raw_span(base, v) }
            }
            _ => classify(base, arena, v),
        };
        fields.push(Field { key, val });
    }
    Ok(fields)
}

/// An object's entries in order: keys borrowed where they have no escapes, values as raw text.
struct Entries<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> de::Deserialize<'de> for Entries<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries<'de>, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(CowStr(k)) = map.next_key::<CowStr<'de>>()? {
                    out.push((k, map.next_value::<&'de RawValue>()?));
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Whether a record (an object, or an array of them) is an IoT Central export message: it has
/// a `messageSource` key. A cheap test on the text, for `format: auto`; the export decoder
/// then decides (and a record whose only `messageSource` is nested is decoded generically).
pub fn mentions_message_source(raw: &[u8]) -> bool {
    memchr::memmem::find(raw, b"\"messageSource\"").is_some()
}

#[cfg(test)]
#[path = "generic_tests.rs"]
mod tests;
