use super::*;

fn jq(yaml: &str) -> Jq {
    let cfg: JqConfig = serde_saphyr::from_str(yaml).unwrap();
    Jq::new(&cfg, &BuildCx::for_test("jq", "jq", 1)).unwrap()
}

fn export(json: &str) -> Event {
    crate::model::decode::decode_object(bytes::Bytes::from(json.to_string())).unwrap()
}

const MSG: &str = r#"{"applicationId":"a","messageSource":"telemetry","deviceId":"d1","schema":"default@v1","templateId":"dtmi:x;1","enqueuedTime":"2026-11-01T00:00:05.000Z","telemetry":{"t1":3.5,"RangeOfMotion":90},"enrichments":{}}"#;

#[test]
fn the_documented_iot_central_examples_run_on_the_iotc_input() {
    let ev = export(MSG);
    let flat =
        jq("{inputs: [x], input: iotc, program: '.telemetry | map({ key: .name, value: .value }) | from_entries'}");
    let out = flat.apply(&ev).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].to_json(), r#"{"t1":3.5,"RangeOfMotion":90}"#);
    assert_eq!(out[0].time, ev.time, "the input's time");
    let rows = jq(
        r#"{inputs: [x], input: iotc, time: EnqueuedTime, program: '. as $in | .telemetry[] | { EnqueuedTime: $in.enqueuedTime, Device: $in.device.id, Template: ($in.device.templateName // ""), Capability: .name, Value: .value }'}"#,
    );
    let out = rows.apply(&ev).unwrap();
    assert_eq!(out.len(), 2, "one output per telemetry value");
    assert_eq!(out[1].get_str("Capability"), Some("RangeOfMotion"));
    assert_eq!(out[1].time, ev.time);
    let custom = jq(
        r#"{inputs: [x], input: iotc, program: 'import "iotc" as iotc; {deviceId: .device.id, Timestamp: .enqueuedTime, T1: .telemetry | iotc::find(.name=="t1").value}', time: Timestamp}"#,
    );
    assert_eq!(
        custom.apply(&ev).unwrap()[0].to_json(),
        r#"{"deviceId":"d1","Timestamp":"2026-11-01T00:00:05.000Z","T1":3.5}"#
    );
}

#[test]
fn outputs_are_records_with_paths_and_the_input_metadata() {
    let mut ev = export(MSG);
    ev.meta.partition = 3;
    let t = jq("{inputs: [x], program: '{id: .deviceId, nested: {v: (.telemetry.t1 * 2)}}, 7'}");
    let out = t.apply(&ev).unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].get_path(&["nested", "v"]).and_then(|v| v.as_f64()), Some(7.0));
    assert_eq!(out[0].meta.partition, 3);
    assert_eq!(out[1].to_json(), r#"{"value":7}"#);
}

#[test]
fn errors_and_records_without_time_are_dead_letters() {
    let ev = export(MSG);
    let t = jq("{inputs: [x], program: '.telemetry.t1 | error(\"too hot\")'}");
    let mut em = Emitter::new(&["", "dead_letter"]);
    let mut t2 = t;
    t2.process(Batch::new(vec![ev.clone()]), &mut em);
    let out = em.take();
    assert!(out[0].is_empty());
    assert!(out[1][0].get_str("reason").unwrap().contains("too hot"), "{}", out[1][0].to_json());
    let bad_key = jq("{inputs: [x], program: '{(null): 1}'}");
    let e = bad_key.apply(&ev).unwrap_err();
    assert!(e.starts_with("output {null:1}"), "jaq builds it, JSON has no such object: {e}");
    // `time:` names the output's time; without it there, the input's time stands in
    let fallback = jq("{inputs: [x], program: '{a: 1}', time: when}");
    assert_eq!(fallback.apply(&ev).unwrap()[0].time, ev.time);
    let bad_time = jq("{inputs: [x], program: '{when: \"yesterday\"}', time: when}");
    assert!(bad_time.apply(&ev).is_err(), "a time that is there but not a time is dead-lettered");
}

#[test]
fn compile_errors_are_validation_errors_at_the_program() {
    let text = "name: p\nsources:\n  s: {type: simulator}\ntransforms:\n  j:\n    type: jq\n    inputs: [s]\n    program: '.a | {b: }'\nsinks:\n  c: {type: console, inputs: [j]}\n";
    let errs = crate::config::load_str(text, "p", &|_| None).unwrap_err();
    let e = errs.iter().find(|e| e.path == "transforms.j.program").expect("an error at the program");
    assert!(e.message.contains("expected") && e.pos.is_some_and(|p| p.line == 8), "{e}");
}
