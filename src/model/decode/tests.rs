//! Tests of decoding: every kind of message, unknown fields, arrays, and the reasons given
//! for bad input.

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

/// Regression (issue 20): what serde_json's skipping accepts but its values refuse was accepted
/// (a telemetry value nested 120,000 levels deep was decoded and written to Parquet); numbers
/// out of range and lone surrogate escapes likewise. Refused on both paths now, exactly where
/// `serde_json::from_str::<Value>` refuses, and accepted just inside.
#[test]
fn past_serde_json_value_limits_is_refused_on_both_paths() {
    let msg = |tele: &str| {
        format!(
            r#"{{"messageSource":"telemetry","deviceId":"d","enqueuedTime":"2026-11-01T00:00:00Z","telemetry":{tele}}}"#
        )
    };
    // the message and its telemetry object are two levels: 125 more make serde_json's 127
    let deep = |n: usize| format!("{{\"v\":{}0{}}}", "[".repeat(n), "]".repeat(n));
    let cases = [
        (deep(120_000), "nested more than 127"),
        (deep(126), "nested more than 127"),
        (deep(125), ""),
        (deep(70), ""),
        (r#"{"t":1e400}"#.to_string(), "number out of range"),
        (r#"{"t":-1e400}"#.to_string(), "number out of range"),
        (format!(r#"{{"t":{}}}"#, "9".repeat(400)), "number out of range"),
        (r#"{"t":1e300}"#.to_string(), ""),
        (r#"{"t":1e-400}"#.to_string(), ""),
        (r#"{"t":"\ud800"}"#.to_string(), "lone leading surrogate"),
        (r#"{"t":"\udc00x"}"#.to_string(), "lone trailing surrogate"),
        (r#"{"t":"\ud83d\ude00"}"#.to_string(), ""),
        (r#"{"t":1,"x":{"y":[1e999]}}"#.to_string(), "number out of range"),
    ];
    for (tele, refused) in cases {
        let m = msg(&tele);
        let serde_ok = serde_json::from_str::<serde_json::Value>(&m).is_ok();
        assert_eq!(serde_ok, refused.is_empty(), "serde_json on {:.60}", tele);
        for fast in [true, false] {
            set_fast_path(fast);
            let r = decode_record(Bytes::from(m.clone()));
            set_fast_path(true);
            assert_eq!(r.len(), 1);
            match &r[0] {
                Ok(_) => assert!(refused.is_empty(), "fast path {fast}: accepted {:.60}", tele),
                Err(e) => assert!(!refused.is_empty() && e.contains(refused), "fast path {fast}: {e} for {:.60}", tele),
            }
        }
    }
}

/// Regression (issue 20, the differential fuzz target's first finding, after 4.3M executions): a
/// message whose first key is `$serde_json::private::RawValue` was decoded by both paths, while
/// `serde_json::from_str::<Value>` reads such an object as the JSON text of its value (or refuses
/// it). jq, expressions and mutations read events as values, so they would have seen other data
/// than the sinks. Refused on both paths now, wherever the key is an object's first; kept
/// anywhere else.
#[test]
fn the_key_serde_json_reserves_is_refused_on_both_paths() {
    let finding = include_bytes!("../../../fuzz/findings/scan_differential-raw-value-magic-key");
    let head = r#"{"messageSource":"telemetry","deviceId":"d","enqueuedTime":"2026-11-01T00:00:00Z""#;
    let cases: Vec<(Vec<u8>, bool)> = vec![
        // the finding itself, without the target's projection byte
        (finding[1..].to_vec(), true),
        (format!(r#"{head},"telemetry":{{"$serde_json::private::RawValue":"[1]"}}}}"#).into(), true),
        (format!(r#"{head},"telemetry":{{"t":1,"x":{{"$serde_json::private::RawValue":"1"}}}}}}"#).into(), true),
        (format!(r#"{head},"telemetry":{{"t":[{{ "$serde_json::private::RawValue":"1"}}]}}}}"#).into(), true),
        (format!(r#"{head},"properties":[{{"$serde_json::private::RawValue":"1"}}]}}"#).into(), true),
        (format!(r#"{head},"telemetry":{{"t":1,"$serde_json::private::RawValue":"[1]"}}}}"#).into(), false),
        (format!(r#"{head},"telemetry":{{"t":"$serde_json::private::RawValue"}}}}"#).into(), false),
    ];
    for (m, refused) in cases {
        let shown = String::from_utf8_lossy(&m).into_owned();
        for fast in [true, false] {
            set_fast_path(fast);
            let r = decode_record(Bytes::from(m.clone()));
            set_fast_path(true);
            assert_eq!(r.len(), 1, "{shown}");
            match &r[0] {
                Ok(ev) => {
                    assert!(!refused, "fast path {fast}: accepted {shown}");
                    // what was kept, serde_json reads as the same object
                    let v: serde_json::Value = serde_json::from_str(&ev.to_json()).unwrap();
                    assert!(v.is_object(), "{shown}");
                }
                Err(e) => {
                    assert!(refused && e.contains("reserved by the JSON library"), "fast path {fast}: {e} for {shown}")
                }
            }
        }
    }
}

/// An array record of more than 10,000 messages is refused whole, once; the bad elements of a
/// smaller one are dead letters of their own only for the first 10, then counted in one more.
#[test]
fn array_records_are_bounded() {
    let huge = format!("[{}0]", "0,".repeat(99_999));
    let r = decode_record(Bytes::from(huge));
    assert_eq!(r.len(), 1);
    assert!(r[0].as_ref().unwrap_err().contains("array of 100000 elements exceeds the limit of 10000"), "{r:?}");
    let good =
        r#"{"messageSource":"telemetry","deviceId":"d","enqueuedTime":"2026-11-01T00:00:00Z","telemetry":{"t":1}}"#;
    let mixed = format!("[{good},{}{good}]", "0,".repeat(5_000));
    let r = decode_record(Bytes::from(mixed));
    assert_eq!(r.iter().filter(|r| r.is_ok()).count(), 2);
    let errors: Vec<&String> = r.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(errors.len(), 11, "{errors:?}");
    assert!(errors[0].starts_with("array element 1: "), "{}", errors[0]);
    assert_eq!(errors[10], "4990 more array elements refused (the first 10 of a record are dead letters of their own)");
}
