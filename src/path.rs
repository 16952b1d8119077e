//! Field paths as users write them in pipelines: `deviceId`, `telemetry.temperature`,
//! `temperature` (short for `telemetry.temperature`), `telemetry.BloodPressure.Systolic`,
//! `enrichments.site`, `messageProperties.iothub-creation-time-utc`, `meta.partition`.
//!
//! A path whose first segment is not a top-level field of the event is looked up inside
//! `telemetry`, so telemetry names work bare. `meta.*` reads where the event came from.

use std::borrow::Cow;
use std::fmt;
use std::sync::OnceLock;

use crate::event::{Event, ValRef, Value, NO_TIME};
use crate::projection::Projection;

/// A parsed field path.
#[derive(Clone)]
pub struct FieldPath {
    parts: Vec<String>,
    text: String,
    /// The first segment is a key of the export format (`deviceId`, `telemetry`, ...).
    export_key: bool,
    /// For the first projection met (by [`Projection::id`]): the slot of the path's first
    /// field(s), and how many segments the slot stands for.
    slot: OnceLock<(u64, Option<(usize, usize)>)>,
}

impl PartialEq for FieldPath {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for FieldPath {}

impl std::hash::Hash for FieldPath {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.text.hash(state)
    }
}

impl fmt::Debug for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.text)
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FieldPath {
    /// Parses `a.b.c`. Segments may contain anything but dots (`iothub-creation-time-utc`).
    pub fn parse(s: &str) -> Result<FieldPath, String> {
        let t = s.trim();
        if t.is_empty() {
            return Err("empty field path".into());
        }
        let parts: Vec<String> = t.split('.').map(str::to_string).collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(format!("{t:?} is not a field path (empty segment)"));
        }
        let export_key = EXPORT_KEYS.contains(&parts[0].as_str());
        Ok(FieldPath { parts, text: t.to_string(), export_key, slot: OnceLock::new() })
    }

    /// The path as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The last segment (used to name output columns: `temperature` for `telemetry.temperature`).
    pub fn leaf(&self) -> &str {
        self.parts.last().map(String::as_str).unwrap_or("")
    }

    /// Segments.
    pub fn parts(&self) -> &[String] {
        &self.parts
    }

    /// Whether the path is a single segment.
    pub fn is_bare(&self) -> bool {
        self.parts.len() == 1
    }

    /// The value at this path, if any.
    pub fn get<'e>(&self, ev: &'e Event) -> Option<ValRef<'e>> {
        // A projected event answers from its own fields when they cover the path, by slot
        // when the decoder recorded where the field is.
        let ev = match ev.projection() {
            Some(p) => {
                if let Some(found) = self.by_slot(p, ev) {
                    return found;
                }
                if self.covered_by(p, ev) {
                    ev
                } else {
                    ev.complete()
                }
            }
            None => ev,
        };
        let first = self.parts[0].as_str();
        // An export message whose top-level keys are all the format's cannot have a top-level
        // field by a telemetry name: go to telemetry directly.
        if self.export_key || !ev.has_only_export_keys() {
            if let Some(v) = ev.own_get(first) {
                return descend(v, &self.parts[1..]);
            }
        }
        if first == "meta" && self.parts.len() == 2 {
            return meta(ev, &self.parts[1]);
        }
        descend(ev.own_telemetry()?.get(first)?, &self.parts[1..])
    }

    /// The value by the slot of a projected event; `None` when slots do not say.
    fn by_slot<'e>(&self, p: &Projection, ev: &'e Event) -> Option<Option<ValRef<'e>>> {
        let (slot, used) = self.slot_for(p, ev)?;
        match ev.slot(slot)? {
            None => Some(None),
            Some(v) if used == self.parts.len() => Some(Some(v)),
            Some(v) => Some(descend(v, &self.parts[used..])),
        }
    }

    /// The slot holding this path's field in a projected event, and the segments it covers.
    #[inline]
    fn slot_for(&self, p: &Projection, ev: &Event) -> Option<(usize, usize)> {
        let id = p.id();
        let (cached, slot) = *self.slot.get_or_init(|| (id, p.slot_of(&self.parts, self.export_key)));
        let (slot, used) = if cached == id { slot? } else { p.slot_of(&self.parts, self.export_key)? };
        // a bare telemetry name is telemetry's only when no unknown top-level key could be it
        if !self.export_key && self.parts[0] != "telemetry" && !ev.has_only_export_keys() {
            return None;
        }
        Some((slot, used))
    }

    /// The stored value at this path when the decoder recorded where it is and the path is
    /// that field itself: `Some(None)` when the event does not have it, `None` when the slots
    /// do not say (use [`FieldPath::get`]). Agrees with `get` wherever it answers; it only
    /// skips building a [`ValRef`] on the hottest reads (a window's values and group keys).
    #[inline]
    pub fn get_stored(&self, ev: &Event) -> Option<Option<crate::event::Val>> {
        let (slot, used) = self.slot_for(ev.projection()?, ev)?;
        if used != self.parts.len() {
            return None;
        }
        ev.slot_val(slot)
    }

    /// The value at this path as a number (as [`ValRef::as_f64`] reads it).
    #[inline]
    pub fn get_f64(&self, ev: &Event) -> Option<f64> {
        use crate::event::Val;
        match self.get_stored(ev) {
            Some(None) => None,
            Some(Some(Val::Float(f))) => Some(f),
            Some(Some(Val::Int(i))) => Some(i as f64),
            Some(Some(Val::Num(t))) => ev.text(t).parse().ok(),
            Some(Some(_)) => None,
            None => self.get(ev)?.as_f64(),
        }
    }

    /// The value at this path if it is a string (as [`ValRef::as_str`] reads it).
    #[inline]
    pub fn get_str<'e>(&self, ev: &'e Event) -> Option<Cow<'e, str>> {
        match self.get_stored(ev) {
            Some(Some(crate::event::Val::Str(t))) => Some(Cow::Borrowed(ev.text(t))),
            Some(_) => None,
            None => match self.get(ev)? {
                ValRef::Str(s) => Some(s),
                _ => None,
            },
        }
    }

    /// Whether a projection keeps what this path reads, for this event.
    fn covered_by(&self, p: &Projection, ev: &Event) -> bool {
        p.covers(&self.parts, self.export_key, ev.has_only_export_keys())
    }

    /// Adds what this path reads to a projection under construction.
    pub fn project_into(&self, p: &mut Projection, all_telemetry: &mut bool) {
        p.add_path(&self.parts, self.export_key, all_telemetry)
    }

    /// Whether its first segment is a key of the export format (see [`Projection::add_path`]).
    pub fn is_export_key(&self) -> bool {
        self.export_key
    }

    /// The concrete path to write to: an existing top-level field, else inside `telemetry` when
    /// the event has a telemetry object, else top level.
    pub fn target(&self, ev: &Event) -> Vec<String> {
        let first = self.parts[0].as_str();
        if ev.get(first).is_some() || first == "telemetry" {
            return self.parts.clone();
        }
        if matches!(ev.get("telemetry"), Some(ValRef::Obj(t)) if t.get(first).is_some())
            || (matches!(ev.get("telemetry"), Some(ValRef::Obj(_))) && self.is_bare())
        {
            let mut p = vec!["telemetry".to_string()];
            p.extend(self.parts.iter().cloned());
            return p;
        }
        self.parts.clone()
    }

    /// Sets the value at this path (see [`FieldPath::target`]).
    pub fn set(&self, ev: &mut Event, v: Value) -> bool {
        let target = self.target(ev);
        let refs: Vec<&str> = target.iter().map(String::as_str).collect();
        ev.set(&refs, v)
    }

    /// Removes the value at this path.
    pub fn remove(&self, ev: &mut Event) -> bool {
        let target = self.target(ev);
        let refs: Vec<&str> = target.iter().map(String::as_str).collect();
        ev.remove(&refs)
    }

    /// Renames: a bare `to` stays in the same object as `self`.
    pub fn rename(&self, to: &FieldPath, ev: &mut Event) -> bool {
        let from = self.target(ev);
        let dest: Vec<String> = if to.is_bare() {
            let mut d = from[..from.len() - 1].to_vec();
            d.push(to.parts[0].clone());
            d
        } else {
            to.parts.clone()
        };
        let f: Vec<&str> = from.iter().map(String::as_str).collect();
        let t: Vec<&str> = dest.iter().map(String::as_str).collect();
        ev.rename(&f, &t)
    }
}

/// Top-level keys of the export format (all kinds).
const EXPORT_KEYS: [&str; 17] = [
    "applicationId",
    "messageSource",
    "messageType",
    "deviceId",
    "schema",
    "templateId",
    "enqueuedTime",
    "enrichments",
    "telemetry",
    "properties",
    "module",
    "component",
    "messageProperties",
    "actor",
    "resource",
    "updated",
    "meta",
];

fn descend<'e>(mut v: ValRef<'e>, rest: &[String]) -> Option<ValRef<'e>> {
    for key in rest {
        v = match v {
            ValRef::Obj(o) => o.get(key)?,
            ValRef::Json(text) => crate::event::json_lookup(text, key)?,
            _ => return None,
        };
    }
    Some(v)
}

fn meta<'e>(ev: &'e Event, key: &str) -> Option<ValRef<'e>> {
    match key {
        "partition" => Some(ValRef::Int(ev.meta.partition as i64)),
        "offset" => Some(ValRef::Int(ev.meta.offset)),
        "source" => Some(ValRef::Int(ev.meta.source as i64)),
        "origin" => ev.meta.origin.as_deref().map(|o| ValRef::Str(Cow::Borrowed(o))),
        "enqueued_time" if ev.meta.enqueued != NO_TIME => Some(ValRef::Time(ev.meta.enqueued)),
        other => ev.meta.attr(other).map(|v| ValRef::Str(Cow::Borrowed(v))),
    }
}

/// A group-by key part or output value for a path: its string form (numbers as written).
pub fn key_string(v: &ValRef<'_>) -> String {
    match v {
        ValRef::Str(s) => s.to_string(),
        ValRef::Num(s) | ValRef::Json(s) => s.to_string(),
        other => other.to_json(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn ev() -> Event {
        crate::model::decode::decode_one(Bytes::from_static(
            br#"{"messageSource":"telemetry","deviceId":"d1","enqueuedTime":"2026-11-01T00:00:00Z","telemetry":{"temperature":21.5,"BloodPressure":{"Systolic":71}},"enrichments":{"site":"p1"},"messageProperties":{"iothub-creation-time-utc":"2026-11-01T00:00:01Z"}}"#,
        ))
        .unwrap()
    }

    fn check(path: &str, expected: Option<&str>) {
        let e = ev();
        let got = FieldPath::parse(path).unwrap().get(&e).map(|v| v.to_json());
        assert_eq!(got.as_deref(), expected, "{path}");
    }

    #[test]
    fn lookups() {
        check("deviceId", Some("\"d1\""));
        check("temperature", Some("21.5"));
        check("telemetry.temperature", Some("21.5"));
        check("telemetry.BloodPressure.Systolic", Some("71"));
        check("BloodPressure.Systolic", Some("71"));
        check("enrichments.site", Some("\"p1\""));
        check("messageProperties.iothub-creation-time-utc", Some("\"2026-11-01T00:00:01Z\""));
        check("meta.partition", Some("0"));
        check("nope", None);
        check("telemetry.nope.deeper", None);
        assert!(FieldPath::parse("a..b").is_err());
        assert!(FieldPath::parse(" ").is_err());
    }

    #[test]
    fn writes_go_where_reads_come_from() {
        let mut e = ev();
        assert!(FieldPath::parse("temperature_f").unwrap().set(&mut e, Value::Float(70.7)));
        assert_eq!(e.get_path(&["telemetry", "temperature_f"]).unwrap().as_f64(), Some(70.7));
        assert!(FieldPath::parse("deviceId").unwrap().set(&mut e, "d2".into()));
        assert_eq!(e.get_str("deviceId"), Some("d2"));
        assert!(FieldPath::parse("temperature").unwrap().rename(&FieldPath::parse("temp_c").unwrap(), &mut e));
        assert_eq!(e.get_path(&["telemetry", "temp_c"]).unwrap().as_f64(), Some(21.5));
        assert!(FieldPath::parse("enrichments.site").unwrap().remove(&mut e));
        assert!(e.get_path(&["enrichments", "site"]).is_none());
        let mut row = Event::row();
        assert!(FieldPath::parse("count").unwrap().set(&mut row, Value::Int(1)));
        assert_eq!(row.get("count").unwrap().as_i64(), Some(1));
    }
}
