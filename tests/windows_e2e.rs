//! Windows end to end: the same messages fed live by the paced simulator and replayed from a
//! file give identical rows; W1 runs from its shipped pipeline.

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(180);

fn window_pipeline(source: &str, out: &std::path::Path) -> String {
    format!(
        "sources:\n  in:\n{source}transforms:\n  telemetry:\n    type: filter\n    inputs: [in]\n    condition: messageSource == \"telemetry\"\n  w:\n    type: window\n    inputs: [telemetry]\n    window: {{kind: tumbling, size: 5s}}\n    allowed_lateness: 2s\n    aggregates:\n      temperature: [avg, min, max, p95]\n      humidity: [sum, first, last]\n  s:\n    type: window\n    inputs: [telemetry]\n    window: {{kind: session, gap: 3s}}\n    allowed_lateness: 2s\n    group_by: [enrichments.site]\n    aggregates: {{pressure: [avg, stddev]}}\nsinks:\n  rows:\n    type: jsonl\n    inputs: [w, s]\n    path: {}\n  late:\n    type: jsonl\n    inputs: [w.late, s.late]\n    path: {}.late\n",
        out.display(),
        out.display()
    )
}

/// A message's `enqueuedTime` as an instant (the output may write it in another form).
fn instant(v: &serde_json::Value) -> Option<centralflow::event::Nanos> {
    v["enqueuedTime"].as_str().and_then(centralflow::time::parse_rfc3339)
}

/// The lines of a file, sorted; a missing file fails the test (both runs write both files).
fn sorted_lines(p: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut v: Vec<String> = text.lines().map(str::to_string).collect();
    v.sort();
    v
}

#[test]
fn replay_and_live_give_identical_rows() {
    let dir = tempfile::tempdir().unwrap();
    // 6,000 messages at 2,000 per second of event time, 5% up to 3 s late (some beyond lateness)
    let sim = "    type: simulator\n    devices: 40\n    rate: 2000\n    count: 6000\n    seed: 99\n    start: 2026-11-01T00:00:00Z\n    out_of_order: 0.05\n    max_delay: 3s\n";
    // live: paced by the wall clock (3 s)
    let live_out = dir.path().join("live.jsonl");
    let p = pipeline(dir.path(), "live.yaml", &window_pipeline(sim, &live_out));
    let started = std::time::Instant::now();
    ok(&run(&["run", p.to_str().unwrap()], &[], T));
    assert!(started.elapsed() >= Duration::from_millis(2500), "the live run is paced");
    // replay: the same messages from a file
    let file = dir.path().join("export.jsonl");
    let out = run(
        &[
            "simulate",
            "--count",
            "6000",
            "--devices",
            "40",
            "--rate",
            "2000",
            "--seed",
            "99",
            "--out-of-order",
            "0.05",
            "--max-delay",
            "3s",
            "--start",
            "2026-11-01T00:00:00Z",
            "--out",
            file.to_str().unwrap(),
        ],
        &[],
        T,
    );
    ok(&out);
    let replay_out = dir.path().join("replay.jsonl");
    let src = format!("    type: files\n    url: {}\n", file.display());
    let p = pipeline(dir.path(), "replay.yaml", &window_pipeline(&src, &replay_out));
    ok(&run(&["replay", p.to_str().unwrap()], &[], T));

    let live = sorted_lines(&live_out);
    let replay = sorted_lines(&replay_out);
    assert!(live.len() > 50, "{}", live.len());
    assert_eq!(live, replay, "same rows live and replayed");
    let late_live = sorted_lines(&dir.path().join("live.jsonl.late"));
    let late_replay = sorted_lines(&dir.path().join("replay.jsonl.late"));
    // 5% of 6,000 messages up to 3 s out of order with 2 s of lateness: some are late
    assert!(!late_live.is_empty(), "no late events: the test checks nothing about lateness");
    assert_eq!(late_live, late_replay, "same late events");
    // and each late line is one of the input's telemetry messages
    let input: std::collections::BTreeSet<(String, Option<i64>)> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["messageSource"] == "telemetry")
        .map(|v| (v["deviceId"].as_str().unwrap().to_string(), instant(&v)))
        .collect();
    for l in &late_live {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let key = (v["deviceId"].as_str().unwrap_or("").to_string(), instant(&v));
        assert!(input.contains(&key), "a late line that is no input message: {l}");
    }
}

#[test]
fn w1_pipeline_counts_every_telemetry_message_once() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("export.jsonl");
    simulate(&input, 20_000, 100, 5);
    let out = dir.path().join("w1");
    ok(&run(
        &["replay", "pipelines/w1-tumbling.yaml"],
        &[("CENTRALFLOW_INPUT", input.to_str().unwrap()), ("CENTRALFLOW_OUTPUT", out.to_str().unwrap())],
        T,
    ));
    let telemetry = std::fs::read_to_string(&input)
        .unwrap()
        .lines()
        .filter(|l| l.contains(r#""messageSource":"telemetry""#))
        .count();
    let mut counted = 0;
    for f in parquet_files(&out) {
        if f.to_str().unwrap().contains("/_late/") {
            continue;
        }
        for b in read_parquet_bytes(bytes::Bytes::from(std::fs::read(&f).unwrap())) {
            for r in batch_rows(&b) {
                counted += r["count"].parse::<usize>().unwrap();
                assert!(
                    r.contains_key("temperature_avg") && r.contains_key("pressure_max") && r.contains_key("window_end")
                );
            }
        }
    }
    let late = read_rows(&out.join("_late")).len();
    assert_eq!(counted + late, telemetry, "every telemetry message in exactly one window, or late");
}
