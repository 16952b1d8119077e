//! Borrowed views of an event's values ([`ValRef`], [`ObjRef`]), and of values in JSON text
//! that was not decoded ([`json_lookup`], [`classify_raw`]).

use std::borrow::Cow;

use super::{eq_short, Event, Field, Nanos, Text, Val};
use crate::time;

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
    pub(super) ev: &'a Event,
    pub(super) start: u32,
    pub(super) len: u32,
    pub(super) raw: Text,
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

#[cfg(test)]
mod tests {
    use crate::event::tests::decoded;

    #[test]
    fn nested_json_is_looked_up_lazily() {
        let ev = decoded(
            r#"{"messageSource":"telemetry","enqueuedTime":"2026-11-01T00:00:00Z","telemetry":{"BloodPressure":{"Systolic":71,"Note":"a\"b"}}}"#,
        );
        assert_eq!(ev.get_path(&["telemetry", "BloodPressure", "Systolic"]).unwrap().as_f64(), Some(71.0));
        assert_eq!(ev.get_path(&["telemetry", "BloodPressure", "Note"]).unwrap().as_str(), Some("a\"b"));
        assert!(ev.get_path(&["telemetry", "BloodPressure", "Nope"]).is_none());
    }
}
