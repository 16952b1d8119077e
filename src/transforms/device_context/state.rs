//! What is known about one device, from the export's state messages, and the `device` object
//! events get from it.
//!
//! Every value remembers the event time of the message that set it, and a message changes a
//! value only if it is at least as recent (last writer wins by event time), so a state message
//! that arrives late never overwrites a newer value.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::event::write_json_str;
use crate::event::{Event, Kind, MessageSource, Nanos, ValRef};

/// A value and the event time of the message that set it.
type Stamped<T> = (Nanos, T);

/// One device's state.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct DeviceState {
    /// Reported and cloud properties by path (`name`, or `component.name`): JSON text.
    properties: BTreeMap<String, Stamped<String>>,
    /// Desired properties, likewise.
    desired: BTreeMap<String, Stamped<String>>,
    /// Connected or not, since the time of the message that said so.
    connected: Option<Stamped<bool>>,
    /// The last lifecycle message type (`registered`, `provisioned`, ..., `deleted`).
    lifecycle: Option<Stamped<String>>,
    template: Option<Stamped<String>>,
    /// The `device` object as JSON, built on first use after a change.
    #[serde(skip)]
    json: Option<std::sync::Arc<str>>,
}

/// What a state message does to a device.
pub enum Effect {
    /// Changed (or confirmed) the state.
    Updated,
    /// A `deleted` lifecycle message: the device is forgotten.
    Deleted,
}

/// Whether an event is a state message (it updates state instead of being enriched).
pub fn is_state_message(ev: &Event) -> bool {
    matches!(
        ev.kind,
        Kind::Export(MessageSource::Properties | MessageSource::DeviceConnectivity | MessageSource::DeviceLifecycle)
    )
}

fn set<T>(slot: &mut Option<Stamped<T>>, t: Nanos, v: T) {
    if slot.as_ref().is_none_or(|(old, _)| *old <= t) {
        *slot = Some((t, v));
    }
}

fn set_in(map: &mut BTreeMap<String, Stamped<String>>, key: String, t: Nanos, v: String) {
    match map.get(&key) {
        Some((old, _)) if *old > t => {}
        _ => {
            map.insert(key, (t, v));
        }
    }
}

/// The text of a value as JSON.
fn json_of(v: ValRef<'_>) -> String {
    let mut s = String::new();
    v.write_json(&mut s);
    s
}

impl DeviceState {
    /// Applies a state message at event time `t`.
    pub fn apply(&mut self, ev: &Event, t: Nanos) -> Effect {
        self.json = None;
        if let Some(tpl) = ev.get("templateId").and_then(|v| v.as_str().map(str::to_string)) {
            set(&mut self.template, t, tpl);
        }
        let message_type = ev.get("messageType").and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        match ev.kind {
            Kind::Export(MessageSource::Properties) => {
                let desired = message_type == "devicePropertyDesiredChange";
                for (path, value) in property_changes(ev) {
                    let map = if desired { &mut self.desired } else { &mut self.properties };
                    set_in(map, path, t, value);
                }
            }
            Kind::Export(MessageSource::DeviceConnectivity) => match message_type.as_str() {
                "connected" => set(&mut self.connected, t, true),
                "disconnected" => set(&mut self.connected, t, false),
                _ => {}
            },
            Kind::Export(MessageSource::DeviceLifecycle) => {
                if message_type == "deleted" {
                    return Effect::Deleted;
                }
                if !message_type.is_empty() {
                    set(&mut self.lifecycle, t, message_type);
                }
            }
            _ => {}
        }
        Effect::Updated
    }

    /// The `device` object events get (JSON text).
    pub fn object(&mut self) -> std::sync::Arc<str> {
        if let Some(j) = &self.json {
            return j.clone();
        }
        let mut s = String::from("{");
        let mut first = true;
        let mut field = |s: &mut String, name: &str| {
            if !std::mem::take(&mut first) {
                s.push(',');
            }
            write_json_str(s, name);
            s.push(':');
        };
        if !self.properties.is_empty() {
            field(&mut s, "properties");
            write_tree(&mut s, &self.properties);
        }
        if !self.desired.is_empty() {
            field(&mut s, "desired");
            write_tree(&mut s, &self.desired);
        }
        if let Some((since, c)) = self.connected {
            field(&mut s, "connected");
            s.push_str(if c { "true" } else { "false" });
            field(&mut s, "connected_since");
            s.push('"');
            crate::time::write_rfc3339(&mut s, since);
            s.push('"');
        }
        if let Some((_, l)) = &self.lifecycle {
            field(&mut s, "lifecycle");
            write_json_str(&mut s, l);
        }
        if let Some((_, tpl)) = &self.template {
            field(&mut s, "templateId");
            write_json_str(&mut s, tpl);
        }
        s.push('}');
        let j: std::sync::Arc<str> = s.into();
        self.json = Some(j.clone());
        j
    }

    /// Approximate heap bytes.
    pub fn heap_bytes(&self) -> usize {
        let entry = std::mem::size_of::<(String, Stamped<String>)>() + 16;
        let maps = |m: &BTreeMap<String, Stamped<String>>| {
            m.iter().map(|(k, (_, v))| entry + k.capacity() + v.capacity()).sum::<usize>()
        };
        maps(&self.properties)
            + maps(&self.desired)
            + self.lifecycle.as_ref().map_or(0, |(_, s)| s.capacity())
            + self.template.as_ref().map_or(0, |(_, s)| s.capacity())
            + self.json.as_ref().map_or(0, |j| j.len() + 16)
    }
}

/// `(path, JSON value)` for each property of a `properties` message: `name`, or
/// `component.name` for a component property.
fn property_changes(ev: &Event) -> Vec<(String, String)> {
    let Some(props) = ev.get("properties") else { return Vec::new() };
    let text = json_of(props);
    let Ok(serde_json::Value::Array(items)) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|p| {
            let name = p.get("name")?.as_str()?;
            let path = match p.get("component").and_then(|c| c.as_str()).filter(|c| !c.is_empty()) {
                Some(c) => format!("{c}.{name}"),
                None => name.to_string(),
            };
            Some((path, p.get("value").map(|v| v.to_string()).unwrap_or_else(|| "null".into())))
        })
        .collect()
}

/// Writes `a: 1, c.b: 2` as `{"a":1,"c":{"b":2}}` (paths sorted, so components group).
fn write_tree(s: &mut String, map: &BTreeMap<String, Stamped<String>>) {
    s.push('{');
    let mut open: Option<&str> = None;
    let mut first = true;
    for (path, (_, v)) in map {
        let (component, name) = match path.split_once('.') {
            Some((c, n)) => (Some(c), n),
            None => (None, path.as_str()),
        };
        if open.is_some() && open != component {
            s.push('}');
            open = None;
        }
        if !std::mem::take(&mut first) {
            s.push(',');
        }
        if let (Some(c), None) = (component, open) {
            write_json_str(s, c);
            s.push_str(":{");
            open = Some(c);
        }
        write_json_str(s, name);
        s.push(':');
        s.push_str(v);
    }
    if open.is_some() {
        s.push('}');
    }
    s.push('}');
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn msg(json: &str) -> Event {
        crate::model::decode::decode_object(Bytes::from(json.to_string())).unwrap()
    }

    #[test]
    fn properties_components_connectivity_and_lifecycle_build_the_device_object() {
        let mut d = DeviceState::default();
        let p = msg(
            r#"{"messageSource":"properties","messageType":"devicePropertyReportedChange","deviceId":"d","templateId":"t1","enqueuedTime":"2026-11-01T00:00:01Z","properties":[{"name":"fw","value":"1.2"},{"component":"info","name":"os","value":"Android"},{"component":"info","name":"cpu","value":{"cores":4}}]}"#,
        );
        d.apply(&p, 1);
        let c = msg(
            r#"{"messageSource":"deviceConnectivity","messageType":"connected","deviceId":"d","enqueuedTime":"2026-11-01T00:00:02Z"}"#,
        );
        d.apply(&c, 2_000_000_000);
        let l = msg(
            r#"{"messageSource":"deviceLifecycle","messageType":"provisioned","deviceId":"d","templateId":"t2","enqueuedTime":"2026-11-01T00:00:03Z"}"#,
        );
        d.apply(&l, 3);
        let v: serde_json::Value = serde_json::from_str(&d.object()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"properties": {"fw": "1.2", "info": {"cpu": {"cores": 4}, "os": "Android"}},
                "connected": true, "connected_since": "1970-01-01T00:00:02.000Z", "lifecycle": "provisioned", "templateId": "t2"})
        );
    }

    #[test]
    fn an_older_message_never_overwrites_a_newer_value() {
        let mut d = DeviceState::default();
        let at = |v: &str| {
            msg(&format!(
                r#"{{"messageSource":"properties","messageType":"cloudPropertyChange","deviceId":"d","enqueuedTime":"2026-11-01T00:00:01Z","properties":[{{"name":"x","value":"{v}"}}]}}"#
            ))
        };
        d.apply(&at("new"), 20);
        d.apply(&at("old"), 10);
        assert!(d.object().contains("\"x\":\"new\""), "{}", d.object());
        d.apply(&at("newer"), 20);
        assert!(d.object().contains("\"x\":\"newer\""), "same time: the later arrival wins");
        let del = msg(
            r#"{"messageSource":"deviceLifecycle","messageType":"deleted","deviceId":"d","enqueuedTime":"2026-11-01T00:00:01Z"}"#,
        );
        assert!(matches!(d.apply(&del, 30), Effect::Deleted));
    }

    #[test]
    fn desired_properties_are_kept_apart() {
        let mut d = DeviceState::default();
        let m = msg(
            r#"{"messageSource":"properties","messageType":"devicePropertyDesiredChange","deviceId":"d","enqueuedTime":"2026-11-01T00:00:01Z","properties":[{"name":"setpoint","value":21.5}]}"#,
        );
        d.apply(&m, 1);
        assert_eq!(&*d.object(), r#"{"desired":{"setpoint":21.5}}"#);
    }
}
