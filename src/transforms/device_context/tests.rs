use super::*;

const S: Nanos = 1_000_000_000;
const T0: Nanos = 1_793_491_200 * S; // 2026-11-01T00:00:00Z

fn ctx(yaml: &str, restored: Option<Vec<u8>>, partitioned: bool) -> DeviceContext {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let name = format!("dc{}", N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let cfg: DeviceContextConfig = serde_saphyr::from_str(yaml).unwrap();
    let mut cx = BuildCx::for_test(&name, "device_context", 1);
    cx.restored = restored;
    cx.partitioned = partitioned;
    DeviceContext::new(&cfg, &cx).unwrap()
}

fn at(secs: i64) -> String {
    crate::time::format_rfc3339(T0 + secs * S)
}

fn decode(json: String, partition: u32) -> Event {
    let mut e = crate::model::decode::decode_object(bytes::Bytes::from(json)).unwrap();
    e.meta.partition = partition;
    e
}

fn tele(dev: &str, secs: i64) -> Event {
    decode(
        format!(
            r#"{{"messageSource":"telemetry","deviceId":"{dev}","enqueuedTime":"{}","telemetry":{{"t":{secs}}}}}"#,
            at(secs)
        ),
        0,
    )
}

fn prop(dev: &str, secs: i64, name: &str, value: &str) -> Event {
    decode(
        format!(
            r#"{{"messageSource":"properties","messageType":"devicePropertyReportedChange","deviceId":"{dev}","enqueuedTime":"{}","properties":[{{"name":"{name}","value":"{value}"}}]}}"#,
            at(secs)
        ),
        0,
    )
}

fn conn(dev: &str, secs: i64, what: &str) -> Event {
    decode(
        format!(
            r#"{{"messageSource":"deviceConnectivity","messageType":"{what}","deviceId":"{dev}","enqueuedTime":"{}"}}"#,
            at(secs)
        ),
        0,
    )
}

/// Runs batches through, then ends with a flush; returns (telemetry t, fw, connected) rows.
fn run(t: &mut DeviceContext, batches: Vec<Vec<Event>>, flush: bool) -> Vec<(i64, Option<String>, Option<bool>)> {
    let mut em = Emitter::new(&["", "dead_letter"]);
    for b in batches {
        t.process(Batch::new(b), &mut em);
    }
    t.on_end(flush, &mut em);
    em.take()[0]
        .iter()
        .map(|e| {
            let secs = e.get_path(&["telemetry", "t"]).and_then(|v| v.as_i64()).unwrap_or(-1);
            let fw = e.get_path(&["device", "properties", "fw"]).and_then(|v| v.as_str().map(str::to_string));
            let c = e.get_path(&["device", "connected"]).and_then(|v| match v {
                crate::event::ValRef::Bool(b) => Some(b),
                _ => None,
            });
            (secs, fw, c)
        })
        .collect()
}

#[test]
fn each_event_gets_the_state_as_of_its_own_time() {
    let mut t = ctx("{inputs: [x], allowed_lateness: 10s}", None, false);
    // fw 2 at 20 s arrives before telemetry at 18 s (out of order within the lateness)
    let rows = run(
        &mut t,
        vec![
            vec![prop("d", 10, "fw", "1"), tele("d", 15), prop("d", 20, "fw", "2")],
            vec![tele("d", 18), conn("d", 19, "connected"), tele("d", 25), tele("e", 26)],
        ],
        true,
    );
    assert_eq!(
        rows,
        vec![
            (15, Some("1".into()), None),
            (18, Some("1".into()), None),
            (25, Some("2".into()), Some(true)),
            (26, None, None),
        ]
    );
}

#[test]
fn events_wait_for_the_watermark_and_a_state_message_of_the_same_time_comes_first() {
    let mut t = ctx("{inputs: [x], allowed_lateness: 10s}", None, false);
    let mut em = Emitter::new(&["", "dead_letter"]);
    t.process(Batch::new(vec![tele("d", 5), prop("d", 5, "fw", "1"), tele("d", 14)]), &mut em);
    assert!(em.take()[0].is_empty(), "watermark 4 s: nothing released");
    t.process(Batch::new(vec![tele("d", 16)]), &mut em);
    let out = em.take();
    assert_eq!(out[0].len(), 1, "watermark 6 s releases the event at 5 s");
    assert!(out[0][0].to_json().contains(r#""device":{"properties":{"fw":"1"}}"#), "{}", out[0][0].to_json());
    // a test (or replay) end without flush keeps the rest held
    t.on_end(false, &mut em);
    assert!(em.take()[0].is_empty());
    t.advance_watermark(T0 + 15 * S, &mut em);
    assert_eq!(em.take()[0].len(), 1, "the event at 14 s");
}

#[test]
fn held_events_and_devices_survive_a_checkpoint() {
    let batches = || {
        vec![
            vec![prop("d", 10, "fw", "1"), tele("d", 12), conn("d", 13, "connected")],
            vec![prop("d", 20, "fw", "2"), tele("d", 21), tele("d", 35)],
        ]
    };
    let yaml = "{inputs: [x], allowed_lateness: 10s}";
    let mut whole = ctx(yaml, None, false);
    let expected = run(&mut whole, batches(), true);
    for split in 0..2 {
        let mut first = ctx(yaml, None, false);
        let mut em = Emitter::new(&["", "dead_letter"]);
        let mut b = batches();
        let rest = b.split_off(split);
        for x in b {
            first.process(Batch::new(x), &mut em);
        }
        let before: Vec<_> =
            em.take()[0].iter().map(|e| e.get_path(&["telemetry", "t"]).and_then(|v| v.as_i64())).collect();
        let snap = first.snapshot().unwrap();
        let mut second = ctx(yaml, Some(snap), false);
        let after = run(&mut second, rest, true);
        assert_eq!(before.len() + after.len(), expected.len(), "split {split}");
        assert_eq!(&expected[before.len()..], &after[..], "split {split}");
    }
}

#[test]
fn latest_mode_uses_the_state_on_arrival() {
    let mut t = ctx("{inputs: [x], mode: latest}", None, false);
    let rows = run(&mut t, vec![vec![prop("d", 20, "fw", "2"), tele("d", 15)]], false);
    assert_eq!(rows, vec![(15, Some("2".into()), None)], "not as of 15 s: the state when it arrived");
}

#[test]
fn deleted_devices_are_forgotten_and_late_events_get_the_current_state() {
    let mut t = ctx("{inputs: [x], allowed_lateness: 0s}", None, false);
    let del = decode(
        format!(
            r#"{{"messageSource":"deviceLifecycle","messageType":"deleted","deviceId":"d","enqueuedTime":"{}"}}"#,
            at(30)
        ),
        0,
    );
    let rows =
        run(&mut t, vec![vec![prop("d", 10, "fw", "1"), tele("d", 20), del, tele("d", 40), tele("d", 25)]], true);
    assert_eq!(t.devices(), 0);
    // the late event at 25 s comes after what the watermark (40 s) had passed, the deletion included
    assert_eq!(rows, vec![(20, Some("1".into()), None), (25, None, None), (40, None, None)]);
}

#[test]
fn a_partition_moves_with_its_devices_and_held_events() {
    let yaml = "{inputs: [x], allowed_lateness: 10s}";
    let mut a = ctx(yaml, None, true);
    let mut em = Emitter::new(&["", "dead_letter"]);
    let mut p1 = prop("d", 10, "fw", "7");
    p1.meta.partition = 1;
    let mut e1 = tele("d", 12);
    e1.meta.partition = 1;
    a.process(Batch::new(vec![p1, e1]), &mut em);
    assert_eq!(a.state_partitions(), vec![(0, 1)]);
    let slice = a.partition_state(0, 1).unwrap();
    a.set_partition_state(0, 1, None).unwrap();
    assert_eq!(a.devices(), 0);
    let mut b = ctx(yaml, None, true);
    b.set_partition_state(0, 1, Some(&slice)).unwrap();
    let rows = run(&mut b, Vec::new(), true);
    assert_eq!(rows, vec![(12, Some("7".into()), None)]);
}

#[test]
fn an_event_without_time_is_a_dead_letter() {
    let mut t = ctx("{inputs: [x], time: telemetry.when}", None, false);
    let mut em = Emitter::new(&["", "dead_letter"]);
    t.process(Batch::new(vec![tele("d", 1)]), &mut em);
    let out = em.take();
    assert_eq!(out[1].len(), 1);
    assert!(out[1][0].get_str("reason").unwrap().contains("telemetry.when"));
}
