use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::event::ValRef;

const PORT_NAMES: [&str; 3] = ["", "late", "dead_letter"];

const S: Nanos = 1_000_000_000;
const T0: Nanos = 1_793_491_200 * S; // 2026-11-01T00:00:00Z

fn window(yaml: &str) -> Window {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    // each test its own metric labels: counters are process-wide
    let name = format!("w{}", N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let cfg: WindowConfig = serde_saphyr::from_str(yaml).unwrap();
    Window::from_config(&cfg, &name, ComponentMetrics::new(&name, "window")).unwrap()
}

/// An export-like telemetry event for device `dev` at `T0 + secs`.
fn ev(dev: &str, secs: f64, temp: Option<f64>) -> Event {
    ev_p(dev, secs, temp, 0)
}

fn ev_p(dev: &str, secs: f64, temp: Option<f64>, partition: u32) -> Event {
    let t = T0 + (secs * 1e9) as Nanos;
    let tele = temp.map(|v| format!(r#""temperature":{v}"#)).unwrap_or_default();
    let json = format!(
        r#"{{"messageSource":"telemetry","deviceId":"{dev}","enqueuedTime":"{}","telemetry":{{{tele}}},"enrichments":{{"site":"s-{dev}"}}}}"#,
        crate::time::format_rfc3339(t)
    );
    let mut e = crate::model::decode::decode_one(bytes::Bytes::from(json)).unwrap();
    e.meta.partition = partition;
    e
}

struct Out {
    rows: Vec<Event>,
    late: Vec<Event>,
    dead: Vec<Event>,
}

fn run(w: &mut Window, batches: Vec<Vec<Event>>, flush: bool) -> Out {
    let mut out = Out { rows: vec![], late: vec![], dead: vec![] };
    for b in batches {
        let mut em = Emitter::new(&PORT_NAMES);
        w.process(Batch::new(b), &mut em);
        collect(&mut em, &mut out);
    }
    let mut em = Emitter::new(&PORT_NAMES);
    w.on_end(flush, &mut em);
    collect(&mut em, &mut out);
    out
}

fn collect(em: &mut Emitter, out: &mut Out) {
    let mut p = em.take().into_iter();
    out.rows.extend(p.next().unwrap());
    out.late.extend(p.next().unwrap());
    out.dead.extend(p.next().unwrap());
}

fn secs(v: Option<ValRef<'_>>) -> f64 {
    (v.unwrap().as_time().unwrap() - T0) as f64 / 1e9
}

fn summary(rows: &[Event]) -> Vec<String> {
    rows.iter()
        .map(|r| {
            format!(
                "{} [{},{}) n={}",
                r.get_str("deviceId").unwrap_or("-"),
                secs(r.get("window_start")),
                secs(r.get("window_end")),
                r.get("count").unwrap().as_i64().unwrap()
            )
        })
        .collect()
}

const TUMBLING: &str = "inputs: [x]\nwindow: {kind: tumbling, size: 1m}\nallowed_lateness: 30s\naggregates: {temperature: [avg, min, max]}\n";

#[test]
fn window_boundaries_are_inclusive_at_the_start() {
    let mut w = window(TUMBLING);
    let out =
        run(&mut w, vec![vec![ev("a", 0.0, Some(1.0)), ev("a", 59.999, Some(2.0)), ev("a", 60.0, Some(3.0))]], true);
    assert_eq!(summary(&out.rows), vec!["a [0,60) n=2", "a [60,120) n=1"]);
    assert_eq!(out.rows[0].get("temperature_avg").unwrap().as_f64(), Some(1.5));
    assert_eq!(out.rows[1].get("temperature_max").unwrap().as_f64(), Some(3.0));
}

#[test]
fn windows_close_when_the_watermark_passes_their_end_not_before() {
    let mut w = window(TUMBLING);
    let mut em = Emitter::new(&PORT_NAMES);
    w.process(Batch::new(vec![ev("a", 10.0, Some(1.0)), ev("a", 89.0, Some(1.0))]), &mut em);
    assert!(em.port(Port::MAIN).is_empty(), "watermark 59s < end 60s");
    w.process(Batch::new(vec![ev("a", 90.0, Some(1.0))]), &mut em);
    assert_eq!(summary(em.port(Port::MAIN)), vec!["a [0,60) n=1"], "watermark 60s reaches the end");
}

#[test]
fn empty_windows_produce_no_rows_and_a_watermark_jump_closes_everything_before_it() {
    let mut w = window(TUMBLING);
    let out = run(
        &mut w,
        vec![vec![ev("a", 5.0, Some(1.0)), ev("b", 65.0, Some(1.0))], vec![ev("a", 3600.0, Some(1.0))]],
        false,
    );
    assert_eq!(summary(&out.rows), vec!["a [0,60) n=1", "b [60,120) n=1"], "no rows for the empty hour between");
    assert_eq!(w.open_states(), 1, "the window of the jump stays open");
}

#[test]
fn late_events_go_to_the_late_output_or_are_dropped_and_counted() {
    for (mode, expect_late) in [("output", 1), ("drop", 0)] {
        let mut w = window(&format!("{TUMBLING}late: {mode}\n"));
        let out = run(
            &mut w,
            vec![vec![
                ev("a", 10.0, Some(1.0)),
                ev("a", 95.0, Some(2.0)),
                ev("a", 40.0, Some(9.0)),
                ev("a", 70.0, Some(3.0)),
            ]],
            true,
        );
        // 95s moves the watermark to 65s: [0,60) is closed, so 40s is late; 70s (lateness 25s) is not
        assert_eq!(summary(&out.rows), vec!["a [0,60) n=1", "a [60,120) n=2"]);
        assert_eq!(out.late.len(), expect_late, "{mode}");
        assert_eq!(w.metrics.late_events.get(), 1, "{mode}: counted either way");
    }
}

#[test]
fn lateness_does_not_depend_on_batching() {
    let events: Vec<Event> = [10.0, 95.0, 40.0, 70.0, 130.0, 100.0, 61.0, 200.0, 155.0]
        .iter()
        .enumerate()
        .map(|(i, s)| ev(if i % 2 == 0 { "a" } else { "b" }, *s, Some(*s)))
        .collect();
    let whole = run(&mut window(TUMBLING), vec![events.clone()], true);
    let single = run(&mut window(TUMBLING), events.iter().map(|e| vec![e.clone()]).collect(), true);
    assert_eq!(summary(&whole.rows), summary(&single.rows));
    assert_eq!(whole.late.len(), single.late.len());
    assert_eq!(whole.late.len(), 1, "40s (61s is not: its window ends at 120s, the watermark is at 100s)");
}

#[test]
fn a_session_the_watermark_has_passed_is_closed_mid_batch() {
    // gap 10 s, no lateness: b@30 moves the watermark to 30 s, past a's session [0,10); a@5 is
    // then late, whether or not a batch ended between them
    let cfg = "inputs: [x]\nwindow: {kind: session, gap: 10s}\naggregates: {temperature: [count]}\n";
    let events = vec![ev("a", 0.0, Some(1.0)), ev("b", 30.0, Some(2.0)), ev("a", 5.0, Some(3.0))];
    let whole = run(&mut window(cfg), vec![events.clone()], true);
    let single = run(&mut window(cfg), events.into_iter().map(|e| vec![e]).collect(), true);
    assert_eq!(summary(&whole.rows), vec!["a [0,10) n=1", "b [30,40) n=1"]);
    assert_eq!(summary(&whole.rows), summary(&single.rows));
    assert_eq!((whole.late.len(), single.late.len()), (1, 1));
}

#[test]
fn hopping_windows_count_each_event_in_every_window_that_holds_it() {
    let mut w = window("inputs: [x]\nwindow: {kind: hopping, size: 3m, hop: 1m}\naggregates: {temperature: [sum]}\n");
    let out = run(&mut w, vec![vec![ev("a", 30.0, Some(1.0)), ev("a", 150.0, Some(10.0))]], true);
    assert_eq!(
        summary(&out.rows),
        vec!["a [-120,60) n=1", "a [-60,120) n=1", "a [0,180) n=2", "a [60,240) n=1", "a [120,300) n=1"]
    );
    assert_eq!(out.rows[2].get("temperature_sum").unwrap().as_f64(), Some(11.0));
}

#[test]
fn sessions_merge_when_an_event_bridges_them() {
    let mut w = window("inputs: [x]\nwindow: {kind: session, gap: 1m}\nallowed_lateness: 10m\naggregates: {temperature: [count, first, last]}\n");
    let out = run(
        &mut w,
        vec![vec![
            ev("a", 0.0, Some(1.0)),
            ev("a", 100.0, Some(3.0)),
            ev("a", 50.0, Some(2.0)),
            ev("a", 500.0, Some(4.0)),
        ]],
        true,
    );
    assert_eq!(summary(&out.rows), vec!["a [0,160) n=3", "a [500,560) n=1"]);
    assert_eq!(out.rows[0].get("temperature_first").unwrap().as_f64(), Some(1.0));
    assert_eq!(out.rows[0].get("temperature_last").unwrap().as_f64(), Some(3.0), "last by event time, not arrival");
}

#[test]
fn sessions_do_not_cross_max_duration_boundaries() {
    let mut w = window("inputs: [x]\nwindow: {kind: session, gap: 1m, max_duration: 5m}\n");
    let out = run(&mut w, vec![(0..10).map(|i| ev("a", 250.0 + i as f64 * 20.0, None)).collect()], true);
    // events at 250..430 every 20 s: one activity, cut at 300 s
    assert_eq!(
        summary(&out.rows),
        vec!["a [250,300) n=3", "a [310,490) n=7"],
        "the first session ends at the boundary"
    );
}

#[test]
fn group_by_several_fields_and_event_time_from_any_field() {
    let mut w = window(
        "inputs: [x]\nwindow: {kind: tumbling, size: 1m}\ntime: messageProperties.iothub-creation-time-utc\ngroup_by: [enrichments.site, deviceId]\n",
    );
    let mk = |dev: &str, enq: f64, created: f64| {
        let j = format!(
            r#"{{"messageSource":"telemetry","deviceId":"{dev}","enqueuedTime":"{}","messageProperties":{{"iothub-creation-time-utc":"{}"}},"enrichments":{{"site":"p1"}}}}"#,
            crate::time::format_rfc3339(T0 + (enq * 1e9) as Nanos),
            crate::time::format_rfc3339(T0 + (created * 1e9) as Nanos)
        );
        crate::model::decode::decode_one(bytes::Bytes::from(j)).unwrap()
    };
    let out = run(&mut w, vec![vec![mk("a", 61.0, 59.0), mk("b", 61.0, 61.0)]], true);
    assert_eq!(summary(&out.rows), vec!["a [0,60) n=1", "b [60,120) n=1"]);
    assert_eq!(out.rows[0].get_str("enrichments_site"), Some("p1"));
    let no_time = run(&mut w, vec![vec![ev("c", 1.0, None)]], true);
    assert_eq!(no_time.dead.len(), 1, "no creation time: dead letter");
}

#[test]
fn the_watermark_is_the_minimum_over_partitions() {
    let mut w = window("inputs: [x]\nwindow: {kind: tumbling, size: 1m}\n");
    let mut em = Emitter::new(&PORT_NAMES);
    w.process(Batch::new(vec![ev_p("a", 10.0, None, 0), ev_p("a", 20.0, None, 1), ev_p("a", 200.0, None, 0)]), &mut em);
    assert!(em.port(Port::MAIN).is_empty(), "partition 1 is at 20s");
    w.process(Batch::new(vec![ev_p("a", 130.0, None, 1)]), &mut em);
    assert_eq!(summary(em.port(Port::MAIN)), vec!["a [0,60) n=2"]);
}

#[test]
fn snapshot_and_restore_give_the_same_output_as_an_uninterrupted_run() {
    let events: Vec<Event> =
        (0..400).map(|i| ev(["a", "b", "c"][i % 3], i as f64 * 1.7 - (i % 7) as f64, Some(i as f64))).collect();
    for cfg in [
        TUMBLING.to_string(),
        "inputs: [x]\nwindow: {kind: hopping, size: 2m, hop: 30s}\nallowed_lateness: 10s\naggregates: {temperature: [avg, p95, stddev]}\n".to_string(),
        "inputs: [x]\nwindow: {kind: session, gap: 3s}\nallowed_lateness: 10s\naggregates: {temperature: [first, last, sum]}\n".to_string(),
    ] {
        let whole = run(&mut window(&cfg), vec![events.clone()], true);
        let mut first = window(&cfg);
        let part1 = run(&mut first, vec![events[..170].to_vec()], false);
        let state = first.snapshot().unwrap();
        let mut second = window(&cfg);
        second.restore(&state).unwrap();
        let part2 = run(&mut second, vec![events[170..].to_vec()], true);
        let mut rows = part1.rows.clone();
        rows.extend(part2.rows.clone());
        let a: Vec<String> = whole.rows.iter().map(|r| r.to_json()).collect();
        let b: Vec<String> = rows.iter().map(|r| r.to_json()).collect();
        assert_eq!(a, b, "{cfg}");
        assert_eq!(whole.late.len(), part1.late.len() + part2.late.len());
    }
}

fn partitioned(cfg: &str) -> Window {
    let mut w = window(cfg);
    w.partitioned = true;
    w
}

#[test]
fn partitioned_state_keeps_a_watermark_per_partition() {
    let mut w = partitioned("inputs: [x]\nwindow: {kind: tumbling, size: 1m}\n");
    let mut em = Emitter::new(&PORT_NAMES);
    let batch = vec![ev_p("a", 10.0, None, 0), ev_p("b", 20.0, None, 1), ev_p("a", 200.0, None, 0)];
    w.process(Batch::new(batch), &mut em);
    assert_eq!(summary(em.port(Port::MAIN)), vec!["a [0,60) n=1"], "partition 0 closes its own window");
    // partition 1 is behind partition 0 but not late by its own progress
    w.process(Batch::new(vec![ev_p("b", 30.0, None, 1)]), &mut em);
    assert!(em.port(LATE).is_empty());
    w.process(Batch::new(vec![ev_p("b", 61.0, None, 1), ev_p("b", 40.0, None, 1)]), &mut em);
    assert_eq!(em.port(LATE).len(), 1, "late by its partition's watermark");
    assert_eq!(summary(em.port(Port::MAIN)), vec!["a [0,60) n=1", "b [0,60) n=2"]);
}

#[test]
fn a_partition_handed_over_mid_window_gives_the_rows_of_an_uninterrupted_run() {
    // two partitions, each with its own devices; partition 1 moves to another instance half-way
    let stream = |p: u32| -> Vec<Event> {
        (0..300)
            .map(|i| {
                let dev = ["a", "b", "c"][i % 3];
                ev_p(&format!("{dev}{p}"), i as f64 * 1.3 - (i % 5) as f64, Some(i as f64 + p as f64), p)
            })
            .collect()
    };
    let (p0, p1) = (stream(0), stream(1));
    for cfg in [
        TUMBLING.to_string(),
        "inputs: [x]\nwindow: {kind: hopping, size: 2m, hop: 30s}\nallowed_lateness: 10s\naggregates: {temperature: [avg, p95]}\n".to_string(),
        "inputs: [x]\nwindow: {kind: session, gap: 2s}\nallowed_lateness: 3s\naggregates: {temperature: [first, last, sum]}\n".to_string(),
    ] {
        let interleave = |a: &[Event], b: &[Event]| -> Vec<Event> {
            a.iter().zip(b).flat_map(|(x, y)| [x.clone(), y.clone()]).collect()
        };
        let whole = run(&mut partitioned(&cfg), vec![interleave(&p0, &p1)], true);

        let mut one = partitioned(&cfg);
        let before = run(&mut one, vec![interleave(&p0[..140], &p1[..140])], false);
        assert_eq!(one.state_partitions(), vec![(0, 0), (0, 1)]);
        let slice = one.partition_state(0, 1).unwrap();
        one.set_partition_state(0, 1, None).unwrap();
        assert_eq!(one.state_partitions(), vec![(0, 0)], "released");
        let mut two = partitioned(&cfg);
        two.set_partition_state(0, 1, Some(&slice)).unwrap();
        let rest0 = run(&mut one, vec![p0[140..].to_vec()], true);
        let rest1 = run(&mut two, vec![p1[140..].to_vec()], true);

        let sorted = |rows: Vec<&Event>| -> Vec<String> {
            let mut v: Vec<String> = rows.iter().map(|r| r.to_json()).collect();
            v.sort();
            v
        };
        let split: Vec<&Event> = before.rows.iter().chain(&rest0.rows).chain(&rest1.rows).collect();
        assert!(!whole.rows.is_empty());
        assert_eq!(sorted(whole.rows.iter().collect()), sorted(split), "{cfg}");
        assert_eq!(whole.late.len(), before.late.len() + rest0.late.len() + rest1.late.len(), "{cfg}");
    }
}

#[test]
fn missing_values_are_skipped_not_fatal() {
    let mut w = window(TUMBLING);
    let out = run(&mut w, vec![vec![ev("a", 1.0, None), ev("a", 2.0, Some(4.0))]], true);
    assert_eq!(summary(&out.rows), vec!["a [0,60) n=2"]);
    assert_eq!(out.rows[0].get("temperature_avg").unwrap().as_f64(), Some(4.0));
    assert_eq!(w.metrics.skipped_values.get(), 1, "one missing value of one field");
}

// ------------------------------------------------------------------ against a naive reference

#[derive(Debug, Clone)]
struct Rec {
    key: u8,
    t: Nanos,
    v: Option<f64>,
}

/// (key, window start, window end) -> (arrival index, time, value) of its events.
type Groups = BTreeMap<(u8, Nanos, Nanos), Vec<(usize, Nanos, f64)>>;

/// Plain GROUP BY over all events (which are all within lateness, so none is late).
fn reference(recs: &[Rec], shape: Shape) -> Groups {
    let mut groups: Groups = BTreeMap::new();
    let push = |g: &mut BTreeMap<_, Vec<_>>, k, i, r: &Rec| {
        g.entry(k).or_default().push((i, r.t, r.v.unwrap_or(f64::NAN)));
    };
    match shape {
        Shape::Tumbling { size } => {
            for (i, r) in recs.iter().enumerate() {
                let s = r.t.div_euclid(size) * size;
                push(&mut groups, (r.key, s, s + size), i, r);
            }
        }
        Shape::Hopping { size, hop } => {
            for (i, r) in recs.iter().enumerate() {
                let mut s = r.t.div_euclid(hop) * hop;
                while s + size > r.t {
                    push(&mut groups, (r.key, s, s + size), i, r);
                    s -= hop;
                }
            }
        }
        Shape::Session { gap, max } => {
            let mut by: BTreeMap<(u8, i64), Vec<(usize, &Rec)>> = BTreeMap::new();
            for (i, r) in recs.iter().enumerate() {
                let b = max.map(|m| r.t.div_euclid(m)).unwrap_or(0);
                by.entry((r.key, b)).or_default().push((i, r));
            }
            for ((key, _), mut list) in by {
                list.sort_by_key(|(i, r)| (r.t, *i));
                let mut cur: Vec<(usize, &Rec)> = Vec::new();
                let flush = |cur: &mut Vec<(usize, &Rec)>, g: &mut BTreeMap<_, Vec<_>>| {
                    if let (Some(f), Some(l)) = (cur.first(), cur.last()) {
                        let end = match max {
                            Some(m) => (l.1.t + gap).min((f.1.t.div_euclid(m) + 1) * m),
                            None => l.1.t + gap,
                        };
                        let k = (key, f.1.t, end);
                        for (i, r) in cur.iter() {
                            g.entry(k).or_default().push((*i, r.t, r.v.unwrap_or(f64::NAN)));
                        }
                    }
                    cur.clear();
                };
                for item in list {
                    if let Some(last) = cur.last() {
                        if item.1.t - last.1.t >= gap {
                            flush(&mut cur, &mut groups);
                        }
                    }
                    cur.push(item);
                }
                flush(&mut cur, &mut groups);
            }
        }
    }
    groups
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

fn arb_stream(lateness: i64) -> impl Strategy<Value = Vec<Rec>> {
    prop::collection::vec((0u8..3, 0i64..8, 0i64..=lateness, prop::option::weighted(0.9, -50.0f64..50.0)), 1..250)
        .prop_map(|steps| {
            let mut max = 0i64;
            steps
                .into_iter()
                .map(|(key, step, back, v)| {
                    max += step;
                    // within lateness of the largest time seen so far
                    let t = (max - back).max(0);
                    Rec { key, t: T0 + t * S, v }
                })
                .collect()
        })
}

/// Events cut into batches of the given sizes, the rest in a last batch.
fn split_at(events: &[Event], splits: &[usize]) -> Vec<Vec<Event>> {
    let mut batches = Vec::new();
    let mut rest = events;
    for &s in splits {
        let s = s.min(rest.len());
        batches.push(rest[..s].to_vec());
        rest = &rest[s..];
    }
    batches.push(rest.to_vec());
    batches
}

fn check_against_reference(recs: &[Rec], cfg: &str, shape: Shape, splits: &[usize]) -> Result<(), TestCaseError> {
    let mut w = window(cfg);
    let events: Vec<Event> = recs.iter().map(|r| ev(&format!("d{}", r.key), (r.t - T0) as f64 / 1e9, r.v)).collect();
    let batches = split_at(&events, splits);
    let out = run(&mut w, batches, true);
    prop_assert!(out.late.is_empty(), "no event is late: {}", out.late.len());
    let expected = reference(recs, shape);
    prop_assert_eq!(out.rows.len(), expected.len(), "{:?}", summary(&out.rows));
    for row in &out.rows {
        let key: u8 = row.get_str("deviceId").unwrap()[1..].parse().unwrap();
        let s = row.get("window_start").unwrap().as_time().unwrap();
        let e = row.get("window_end").unwrap().as_time().unwrap();
        let members = expected
            .get(&(key, s, e))
            .ok_or_else(|| TestCaseError::fail(format!("unexpected window {key} {s} {e}")))?;
        prop_assert_eq!(row.get("count").unwrap().as_i64().unwrap(), members.len() as i64);
        let vals: Vec<(usize, Nanos, f64)> = members.iter().copied().filter(|m| !m.2.is_nan()).collect();
        let get = |c: &str| row.get(c).and_then(|v| v.as_f64());
        if vals.is_empty() {
            prop_assert!(get("temperature_avg").is_none());
            continue;
        }
        let n = vals.len() as f64;
        let sum: f64 = vals.iter().map(|v| v.2).sum();
        let mean = sum / n;
        prop_assert!(close(get("temperature_sum").unwrap(), sum));
        prop_assert!(close(get("temperature_avg").unwrap(), mean));
        prop_assert_eq!(get("temperature_min").unwrap(), vals.iter().map(|v| v.2).fold(f64::INFINITY, f64::min));
        prop_assert_eq!(get("temperature_max").unwrap(), vals.iter().map(|v| v.2).fold(f64::NEG_INFINITY, f64::max));
        // first: earliest time, first arrival; last: latest time, last arrival
        let first = vals.iter().min_by_key(|v| (v.1, v.0)).unwrap().2;
        let last = vals.iter().max_by_key(|v| (v.1, v.0)).unwrap().2;
        prop_assert_eq!(get("temperature_first").unwrap(), first);
        prop_assert_eq!(get("temperature_last").unwrap(), last);
        if vals.len() >= 2 {
            let var = vals.iter().map(|v| (v.2 - mean).powi(2)).sum::<f64>() / (n - 1.0);
            prop_assert!((get("temperature_stddev").unwrap() - var.sqrt()).abs() < 1e-7, "stddev");
        } else {
            prop_assert!(get("temperature_stddev").is_none());
        }
    }
    Ok(())
}

const AGGS: &str = "aggregates: {temperature: [count, sum, avg, min, max, first, last, stddev]}\n";

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn tumbling_equals_group_by(recs in arb_stream(20), splits in prop::collection::vec(1usize..60, 0..5)) {
        let cfg = format!("inputs: [x]\nwindow: {{kind: tumbling, size: 30s}}\nallowed_lateness: 20s\n{AGGS}");
        check_against_reference(&recs, &cfg, Shape::Tumbling { size: 30 * S }, &splits)?;
    }

    #[test]
    fn hopping_equals_group_by(recs in arb_stream(15), splits in prop::collection::vec(1usize..60, 0..5)) {
        let cfg = format!("inputs: [x]\nwindow: {{kind: hopping, size: 40s, hop: 10s}}\nallowed_lateness: 15s\n{AGGS}");
        check_against_reference(&recs, &cfg, Shape::Hopping { size: 40 * S, hop: 10 * S }, &splits)?;
    }

    #[test]
    fn sessions_equal_offline_sessionization(recs in arb_stream(10), splits in prop::collection::vec(1usize..60, 0..5), capped in any::<bool>()) {
        let (cfg, max) = if capped {
            (format!("inputs: [x]\nwindow: {{kind: session, gap: 12s, max_duration: 1m}}\nallowed_lateness: 10s\n{AGGS}"), Some(60 * S))
        } else {
            (format!("inputs: [x]\nwindow: {{kind: session, gap: 12s}}\nallowed_lateness: 10s\n{AGGS}"), None)
        };
        check_against_reference(&recs, &cfg, Shape::Session { gap: 12 * S, max }, &splits)?;
    }
}

/// A stream with events older than the allowed lateness (some of them late).
fn arb_stream_with_late(lateness: i64) -> impl Strategy<Value = Vec<Rec>> {
    prop::collection::vec((0u8..3, 0i64..8, 0i64..=3 * lateness, prop::option::weighted(0.9, -50.0f64..50.0)), 1..250)
        .prop_map(|steps| {
            let mut max = 0i64;
            steps
                .into_iter()
                .map(|(key, step, back, v)| {
                    max += step;
                    Rec { key, t: T0 + (max - back).max(0) * S, v }
                })
                .collect()
        })
}

/// Rows, late events and the summary of each, for a stream cut into batches at `splits`.
fn rows_in_batches(cfg: &str, recs: &[Rec], splits: &[usize]) -> (Vec<String>, Vec<String>) {
    let events: Vec<Event> = recs.iter().map(|r| ev(&format!("d{}", r.key), (r.t - T0) as f64 / 1e9, r.v)).collect();
    let batches = split_at(&events, splits);
    let out = run(&mut window(cfg), batches, true);
    let mut rows: Vec<String> = out.rows.iter().map(|r| r.to_json()).collect();
    rows.sort();
    let mut late: Vec<String> = out.late.iter().map(|r| r.to_json()).collect();
    late.sort();
    (rows, late)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// With late events in the stream: the same rows and the same late events whatever the
    /// batching (one event per batch is the reference).
    #[test]
    fn batching_never_changes_rows_or_late_events(
        recs in arb_stream_with_late(10),
        splits in prop::collection::vec(1usize..60, 0..6),
        shape in 0u8..4,
    ) {
        let cfg = match shape {
            0 => format!("inputs: [x]\nwindow: {{kind: tumbling, size: 30s}}\nallowed_lateness: 10s\n{AGGS}"),
            1 => format!("inputs: [x]\nwindow: {{kind: hopping, size: 40s, hop: 10s}}\nallowed_lateness: 10s\n{AGGS}"),
            2 => format!("inputs: [x]\nwindow: {{kind: session, gap: 12s}}\nallowed_lateness: 10s\n{AGGS}"),
            _ => format!("inputs: [x]\nwindow: {{kind: session, gap: 12s, max_duration: 1m}}\nallowed_lateness: 10s\n{AGGS}"),
        };
        let ones: Vec<usize> = vec![1; recs.len()];
        let reference = rows_in_batches(&cfg, &recs, &ones);
        let batched = rows_in_batches(&cfg, &recs, &splits);
        prop_assert_eq!(&batched.0, &reference.0, "rows");
        prop_assert_eq!(&batched.1, &reference.1, "late events");
    }
}

// ------------------------------------------------------------- rows as columns

/// An event whose group-by candidates have several types: `zone` an integer, a float or
/// missing; `ok` a bool; `temperature` a number, missing or text (skipped).
fn ev_typed(dev: u8, secs: i64, zone: u8, ok: bool, temp: Option<f64>) -> Event {
    let t = T0 + secs * S;
    let zone = match zone {
        0 => String::new(),
        1 => r#","zone":3"#.to_string(),
        2 => r#","zone":4.5"#.to_string(),
        _ => r#","zone":-7"#.to_string(),
    };
    let temp = match temp {
        Some(v) if v.is_nan() => r#","temperature":"n/a""#.to_string(),
        Some(v) => format!(r#","temperature":{v}"#),
        None => String::new(),
    };
    let json = format!(
        r#"{{"messageSource":"telemetry","deviceId":"d{dev}","enqueuedTime":"{}","telemetry":{{"ok":{ok}{zone}{temp}}}}}"#,
        crate::time::format_rfc3339(t)
    );
    crate::model::decode::decode_one(bytes::Bytes::from(json)).unwrap()
}

/// Runs the same batches through a window emitting rows and one emitting columns.
fn rows_and_columns(cfg: &str, batches: &[Vec<Event>]) -> (Vec<Event>, Vec<arrow_array::RecordBatch>, usize) {
    let (mut a, mut b) = (window(cfg), window(cfg));
    let mut rows = Vec::new();
    let mut cols = Vec::new();
    let mut col_rows_as_events = 0;
    let mut step = |w: &mut Window, b: Option<&Vec<Event>>, columnar: bool| {
        let mut em = Emitter::new(&PORT_NAMES).with_columnar(&[columnar, false, false]);
        match b {
            Some(b) => w.process(Batch::new(b.clone()), &mut em),
            None => w.on_end(true, &mut em),
        }
        let mut ports = em.take_batches().into_iter();
        for batch in ports.next().unwrap() {
            if columnar {
                col_rows_as_events += batch.events.len();
                cols.extend(batch.columns);
            } else {
                assert!(batch.columns.is_none(), "columns on a port that did not ask for them");
                rows.extend(batch.events);
            }
        }
    };
    for batch in batches {
        step(&mut a, Some(batch), false);
        step(&mut b, Some(batch), true);
    }
    step(&mut a, None, false);
    step(&mut b, None, true);
    (rows, cols, col_rows_as_events)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// The columns a window emits for the Parquet sink hold what the sink would have made of
    /// the rows: same columns, same order, same values (a column of rows that are all null is
    /// text there and typed here).
    #[test]
    fn columns_hold_what_the_rows_would(
        recs in prop::collection::vec((0u8..4, 0i64..40, 0u8..4, any::<bool>(), prop::option::weighted(0.8, prop_oneof![9 => -50.0f64..50.0, 1 => Just(f64::NAN)])), 1..200),
        group in 0usize..4,
        hopping in any::<bool>(),
        split in 1usize..50,
    ) {
        let group_by = ["[deviceId]", "[deviceId, telemetry.zone]", "[telemetry.ok, deviceId]", "[]"][group];
        let shape = if hopping { "{kind: hopping, size: 20s, hop: 10s}" } else { "{kind: tumbling, size: 15s}" };
        let cfg = format!(
            "inputs: [x]\nwindow: {shape}\nallowed_lateness: 5s\ngroup_by: {group_by}\n\
             aggregates: {{temperature: [count, sum, avg, min, max, first, last, stddev, p50]}}\n"
        );
        let mut t = 0;
        let events: Vec<Event> = recs.iter().map(|&(dev, step, zone, ok, temp)| {
            t += step / 8;
            ev_typed(dev, t, zone, ok, temp)
        }).collect();
        let batches: Vec<Vec<Event>> = events.chunks(split).map(|c| c.to_vec()).collect();
        let (rows, cols, fell_back) = rows_and_columns(&cfg, &batches);
        // mixed int/float zones are one float column; only a JSON or mixed-type key falls back
        prop_assert_eq!(fell_back, 0);
        let n: usize = cols.iter().map(|c| c.num_rows()).sum();
        prop_assert_eq!(n, rows.len());
        let mut at = 0;
        for c in &cols {
            let refs: Vec<&Event> = rows[at..at + c.num_rows()].iter().collect();
            at += c.num_rows();
            let schema = crate::rows::infer_rows_schema(&refs, false);
            let expected = crate::rows::encode_rows(&refs, &schema, false).unwrap();
            let names = |s: &arrow_schema::Schema| s.fields().iter().map(|f| f.name().clone()).collect::<Vec<_>>();
            prop_assert_eq!(names(&c.schema()), names(&schema));
            for (i, (got, want)) in c.columns().iter().zip(expected.columns()).enumerate() {
                let name = schema.field(i).name();
                if want.null_count() == want.len() {
                    prop_assert_eq!(got.null_count(), got.len(), "{} is all null", name);
                } else {
                    prop_assert_eq!(got.data_type(), want.data_type(), "{}", name);
                    prop_assert!(got.as_ref() == want.as_ref(), "{}: {:?} != {:?}", name, got, want);
                }
            }
        }
    }
}

#[test]
fn a_key_holding_json_is_emitted_as_rows_on_a_columnar_port() {
    let cfg =
        "inputs: [x]\nwindow: {kind: tumbling, size: 1m}\ngroup_by: [enrichments]\naggregates: {temperature: [avg]}\n";
    let (rows, cols, fell_back) = rows_and_columns(cfg, &[vec![ev("a", 1.0, Some(2.0)), ev("b", 2.0, Some(4.0))]]);
    assert!(cols.is_empty());
    assert_eq!(fell_back, 2);
    assert_eq!(rows.len(), 2);
}
