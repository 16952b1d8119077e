//! The input IoT Central gives its own transformations (`input: iotc`), built from an export
//! message: telemetry as an array of `{name, value}`, and a `device` object (`id`, `templateId`,
//! `properties.reported`, `cloudProperties`, the lifecycle flags) filled from the device
//! context where a `device_context` upstream knows it. See
//! ../shared/docs/iot-central-reference.md, section 1.10.

use serde_json::{json, Map, Value};

use crate::event::Event;

/// The export envelope fields that keep their place in the transformation input.
const ENVELOPE: [&str; 9] = [
    "applicationId",
    "messageSource",
    "messageType",
    "schema",
    "enqueuedTime",
    "enrichments",
    "messageProperties",
    "component",
    "module",
];

/// Builds the transformation input of an export message.
pub fn input_of(ev: &Event) -> Result<Value, String> {
    let full: Value = serde_json::from_str(&ev.to_json()).map_err(|e| format!("the event is not JSON: {e}"))?;
    let Value::Object(msg) = full else { return Err("the event is not a JSON object".into()) };
    let mut out = Map::new();
    for k in ENVELOPE {
        if let Some(v) = msg.get(k) {
            out.insert(k.to_string(), v.clone());
        }
    }
    if let Some(Value::Object(t)) = msg.get("telemetry") {
        let list: Vec<Value> = t.iter().map(|(name, value)| json!({"name": name, "value": value})).collect();
        out.insert("telemetry".into(), Value::Array(list));
    }
    for k in ["properties", "actor", "resource", "updated"] {
        if let Some(v) = msg.get(k) {
            out.insert(k.to_string(), v.clone());
        }
    }
    out.insert("device".into(), device_of(&msg));
    Ok(Value::Object(out))
}

/// The `device` object: what the message says, and what `device_context` added.
fn device_of(msg: &Map<String, Value>) -> Value {
    let mut d = Map::new();
    if let Some(id) = msg.get("deviceId") {
        d.insert("id".into(), id.clone());
    }
    let ctx = msg.get("device").and_then(Value::as_object);
    let template = ctx.and_then(|c| c.get("templateId")).or_else(|| msg.get("templateId"));
    if let Some(t) = template {
        d.insert("templateId".into(), t.clone());
    }
    // device_context keeps a component's properties as an object under the component's name;
    // they are listed here as they are kept: `{name: COMPONENT, value: {...}}`
    let reported: Vec<Value> = match ctx.and_then(|c| c.get("properties")) {
        Some(Value::Object(props)) => props.iter().map(|(name, v)| json!({"name": name, "value": v})).collect(),
        _ => Vec::new(),
    };
    d.insert("properties".into(), json!({"reported": reported}));
    d.insert("cloudProperties".into(), Value::Array(Vec::new()));
    if let Some(lifecycle) = ctx.and_then(|c| c.get("lifecycle")).and_then(Value::as_str) {
        d.insert("provisioned".into(), Value::Bool(lifecycle == "provisioned"));
        d.insert("blocked".into(), Value::Bool(lifecycle == "disabled" || lifecycle == "blocked"));
        d.insert("approved".into(), Value::Bool(lifecycle != "unapproved"));
    }
    Value::Object(d)
}
