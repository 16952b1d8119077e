//! Tests of projected decoding and of the fast path against the serde_json path.

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
        (r#"{"messageSource":"telemetry","enqueuedTime":"2026-11-01T00:00:01Z","other":{"a":tru}}"#, "malformed JSON"),
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
        let out = super::super::scan::Out { root: &mut root, nested: &mut nested, env: &mut env, slots: &mut slots };
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
