//! The serde_json path of the decoder: seeds and visitors that decode a message in one pass,
//! borrowing keys and strings from its text, and word its errors by field.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::{keep_for, key_kind, parse_number, part_offset, Envelope, Keep, KeyKind};
use crate::event::{build, Field, Text, Val};
use crate::model::MessageSource;
use crate::projection::{record_slot, Projection, SLOTS};
use crate::time;

/// A string key or value that borrows from the input when it has no escapes.
pub(in crate::model) struct CowStr<'a>(pub(in crate::model) Cow<'a, str>);

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
pub(in crate::model) fn classify(base: &str, arena: &mut String, raw: &str) -> Val {
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

pub(super) struct RootSeed<'s> {
    pub(super) base: &'s str,
    pub(super) root: &'s mut Vec<Field>,
    pub(super) nested: &'s mut Vec<Field>,
    pub(super) arena: &'s mut String,
    pub(super) env: &'s mut Envelope,
    pub(super) proj: Option<&'s Projection>,
    pub(super) slots: &'s mut [u8; SLOTS],
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
                    // the first one, as a lookup of the field finds it
                    env.source = env.source.or(Some(MessageSource::parse(&s)));
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

/// serde_json appends " at line L column C"; for a field-level error the field name is clearer.
fn strip_pos(e: &dyn fmt::Display) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
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
