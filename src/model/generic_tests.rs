//! Tests of the generic decoder: the three output shapes of IoT Central's transformation
//! examples, times and devices from fields or the transport, and the reasons for refusals.

use super::*;
use crate::path::FieldPath;

fn opts(time: Option<&str>, device: Option<&str>) -> GenericOptions {
    GenericOptions {
        time: time.map(|t| FieldPath::parse(t).unwrap()),
        device_id: device.map(|d| FieldPath::parse(d).unwrap()),
    }
}

fn one_event(json: &str, o: &GenericOptions, t: &Transport<'_>) -> Result<Event, String> {
    let mut v = Vec::new();
    decode_generic_with(Bytes::from(json.to_string()), o, t, |r| v.push(r));
    assert_eq!(v.len(), 1, "{json}");
    v.pop().unwrap()
}

fn get(ev: &Event, path: &str) -> Option<String> {
    FieldPath::parse(path).unwrap().get(ev).map(|v| v.to_json())
}

const T0: &str = "2026-11-01T00:00:01.500Z";

#[test]
fn flattened_telemetry_with_the_transport_s_time_and_device() {
    let t0 = crate::time::parse_rfc3339(T0).unwrap();
    let transport = Transport { enqueued: t0, device_id: Some("d7") };
    let ev = one_event(r#"{"temperature":21.5,"humidity":40}"#, &opts(None, None), &transport).unwrap();
    assert_eq!(ev.kind, Kind::Row);
    assert_eq!(ev.time, t0);
    assert_eq!(get(&ev, "temperature").as_deref(), Some("21.5"));
    assert_eq!(get(&ev, "deviceId").as_deref(), Some("\"d7\""), "the transport's device becomes deviceId");
    assert_eq!(ev.to_json(), r#"{"temperature":21.5,"humidity":40,"deviceId":"d7"}"#);
}

#[test]
fn one_row_per_telemetry_value() {
    let o = opts(Some("EnqueuedTime"), Some("Device"));
    let body = r#"[{"EnqueuedTime":"2026-11-01T00:00:01Z","Device":"d1","Template":"","Capability":"temperature","Value":21.5},
                   {"EnqueuedTime":"2026-11-01T00:00:01Z","Device":"d1","Template":"","Capability":"humidity","Value":40}]"#;
    let evs = decode_generic_with_vec(body, &o);
    assert_eq!(evs.len(), 2);
    let ev = evs[1].as_ref().unwrap();
    assert_eq!(ev.time, crate::time::parse_rfc3339("2026-11-01T00:00:01Z").unwrap());
    assert_eq!(get(ev, "Capability").as_deref(), Some("\"humidity\""));
    assert_eq!(get(ev, "deviceId").as_deref(), Some("\"d1\""));
    let raw = std::str::from_utf8(ev.raw()).unwrap();
    assert!(raw.starts_with("{\"EnqueuedTime\"") && raw.ends_with('}') && raw.contains("humidity"), "{raw}");
}

fn decode_generic_with_vec(body: &str, o: &GenericOptions) -> Vec<Result<Event, String>> {
    decode_generic(Bytes::from(body.to_string()), o)
}

#[test]
fn a_custom_object_with_nested_fields() {
    let o = opts(Some("Timestamp"), None);
    let body = r#"{"deviceId":"d1","Timestamp":"2026-11-01T00:00:02Z","T1":3.5,"device":{"id":"d1","props":{"site":"p\"1"}},"tags":[1,2]}"#;
    let ev = one_event(body, &o, &Transport::NONE).unwrap();
    assert_eq!(get(&ev, "T1").as_deref(), Some("3.5"));
    assert_eq!(get(&ev, "device.id").as_deref(), Some("\"d1\""));
    assert_eq!(get(&ev, "device.props.site").as_deref(), Some("\"p\\\"1\""), "escaped strings are unescaped");
    assert_eq!(get(&ev, "tags").as_deref(), Some("[1,2]"));
    assert_eq!(ev.to_json(), body, "unchanged records are written back as they came");
    assert_eq!(FieldPath::parse("T1").unwrap().get_f64(&ev), Some(3.5));
}

#[test]
fn times_are_rfc3339_or_epoch_milliseconds() {
    let o = opts(Some("ts"), None);
    for (body, expect) in [
        (r#"{"ts":"2026-11-01T00:00:01.5Z"}"#, 1_793_491_201_500_000_000),
        (r#"{"ts":1793491201500}"#, 1_793_491_201_500_000_000),
        (r#"{"ts":"1793491201500"}"#, 1_793_491_201_500_000_000),
        (r#"{"ts":1793491201500.25}"#, 1_793_491_201_500_250_000),
    ] {
        assert_eq!(one_event(body, &o, &Transport::NONE).unwrap().time, expect, "{body}");
    }
}

#[test]
fn records_without_a_usable_time_are_refused_with_the_reason() {
    let cases = [
        (opts(None, None), r#"{"t":1}"#, "no usable time: set `time:`"),
        (opts(Some("ts"), None), r#"{"t":1}"#, "no usable time: the record has no `ts`"),
        (opts(Some("ts"), None), r#"{"ts":null}"#, "no usable time: the record has no `ts`"),
        (opts(Some("ts"), None), r#"{"ts":"soon"}"#, "`ts` is \"soon\", not an RFC 3339 timestamp"),
        (opts(Some("ts"), None), r#"{"ts":{"a":1}}"#, "`ts` is {\"a\":1}"),
        (opts(Some("ts"), Some("dev")), r#"{"ts":1,"dev":[1]}"#, "`dev` is [1], not a device id"),
    ];
    for (o, body, reason) in cases {
        let err = one_event(body, &o, &Transport::NONE).unwrap_err();
        assert!(err.contains(reason), "{body}: {err}");
    }
    // a present but unusable time does not fall back to the transport's
    let t = Transport { enqueued: 5, device_id: None };
    assert!(one_event(r#"{"ts":"soon"}"#, &opts(Some("ts"), None), &t).is_err());
    assert_eq!(one_event(r#"{"x":1}"#, &opts(Some("ts"), None), &t).unwrap().time, 5, "a missing one does");
}

#[test]
fn what_is_not_an_object_is_refused() {
    let o = opts(None, None);
    let t = Transport { enqueued: 1, device_id: None };
    for (body, reason) in [
        ("", "an empty record"),
        ("42", "not a JSON object: 42"),
        ("{\"a\":", "malformed JSON"),
        ("[{\"a\":1},", "malformed JSON array"),
        ("nonsense", "malformed JSON"),
    ] {
        let mut v = Vec::new();
        decode_generic_with(Bytes::from(body), &o, &t, |r| v.push(r));
        assert!(v[0].as_ref().unwrap_err().contains(reason), "{body:?}: {v:?}");
    }
    let v = decode_generic(Bytes::from_static(b"[{\"a\":1},\"x\"]"), &o);
    assert!(v[1].as_ref().unwrap_err().starts_with("array element 1: not a JSON object"), "{v:?}");
    let big = format!("{{\"a\":\"{}\"}}", "x".repeat(MAX_RECORD_BYTES));
    assert!(decode_generic(Bytes::from(big), &o)[0].as_ref().unwrap_err().contains("exceeds the limit"));
}

#[test]
fn a_device_field_wins_over_the_transport_s_and_numbers_are_ids_too() {
    let t = Transport { enqueued: 1, device_id: Some("from-header") };
    let ev = one_event(r#"{"dev":42,"deviceId":"other"}"#, &opts(None, Some("dev")), &t).unwrap();
    assert_eq!(ev.get_str("deviceId"), Some("42"));
    let ev = one_event(r#"{"x":1}"#, &opts(None, Some("dev")), &t).unwrap();
    assert_eq!(ev.get_str("deviceId"), Some("from-header"));
    let ev = one_event(r#"{"x":1}"#, &opts(None, None), &Transport { enqueued: 1, device_id: None }).unwrap();
    assert_eq!(ev.get("deviceId"), None, "no device: no deviceId");
}
