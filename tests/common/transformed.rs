//! IoT Central's transformed exports for tests: the three output shapes of the documented JQ
//! transformation examples (reference doc, section 1.10), a pipeline that windows each, and the
//! checks of its Parquet output.
//!
//! - **flattened** telemetry, `.telemetry | map({key: .name, value: .value}) | from_entries`:
//!   `{"temperature": 21.5, "humidity": 40}`, no time or device of its own (a transport that
//!   has them gives them; otherwise the export adds `{deviceId: .device.id, enqueuedTime}`);
//! - **rows**, one per telemetry value for Azure Data Explorer:
//!   `{"EnqueuedTime", "Device", "Template", "Capability", "Value"}`;
//! - a **custom** object: `{deviceId: .device.id, Timestamp: .enqueuedTime, T1: ...}`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use super::*;

/// One telemetry message before the transformation: device, time (whole seconds), temperature,
/// humidity. Two devices, three minutes, three messages a device and minute, in time order.
pub fn messages() -> Vec<(String, String, f64, f64)> {
    let mut out = Vec::new();
    for minute in 0..3 {
        for sec in [10, 20, 30] {
            for d in 1..=2 {
                let temp = 15.0 + (minute * 7 + sec / 10 * 3 + d * 5) as f64 % 11.0 + 0.5;
                let hum = 40.0 + (minute + d) as f64;
                out.push((format!("d{d}"), format!("2026-11-01T10:{minute:02}:{sec:02}Z"), temp, hum));
            }
        }
    }
    out
}

/// The flattened shape, with the device and time the export adds for transports without them.
pub fn flattened_with_time(m: &(String, String, f64, f64)) -> Value {
    json!({"deviceId": m.0, "enqueuedTime": m.1, "temperature": m.2, "humidity": m.3})
}

/// The flattened shape as IoT Central's example emits it.
pub fn flattened(m: &(String, String, f64, f64)) -> Value {
    json!({"temperature": m.2, "humidity": m.3})
}

/// The rows shape: one per telemetry value.
pub fn rows(m: &(String, String, f64, f64)) -> Vec<Value> {
    [("temperature", m.2), ("humidity", m.3)]
        .iter()
        .map(|(cap, v)| json!({"EnqueuedTime": m.1, "Device": m.0, "Template": "", "Capability": cap, "Value": v}))
        .collect()
}

/// The custom shape.
pub fn custom(m: &(String, String, f64, f64)) -> Value {
    json!({"deviceId": m.0, "Timestamp": m.1, "T1": m.2 / 10.0})
}

/// A pipeline with sources `flat`, `rows` and `custom` (their YAML given), each windowed by
/// minute into `agg_*` Parquet and archived raw into `raw_*` Parquet under `out`; dead letters
/// of all three into `out/rejected.jsonl`.
pub fn pipeline_yaml(flat: &str, rows: &str, custom: &str, out: &Path, checkpoint: &str) -> String {
    let o = out.display();
    format!(
        "sources:\n  flat:\n{flat}  rows:\n{rows}  custom:\n{custom}transforms:
  w_flat:
    type: window
    inputs: [flat]
    window: {{kind: tumbling, size: 1m}}
    group_by: [deviceId]
    aggregates: {{temperature: [avg, min, max], humidity: [avg]}}
  w_rows:
    type: window
    inputs: [rows]
    window: {{kind: tumbling, size: 1m}}
    group_by: [deviceId, Capability]
    aggregates: {{Value: [avg, min, max]}}
  w_custom:
    type: window
    inputs: [custom]
    window: {{kind: tumbling, size: 1m}}
    time: Timestamp
    group_by: [deviceId]
    aggregates: {{T1: [avg, min, max]}}
sinks:
  raw_flat: {{type: parquet, inputs: [flat], url: {o}/raw_flat}}
  raw_rows: {{type: parquet, inputs: [rows], url: {o}/raw_rows}}
  raw_custom: {{type: parquet, inputs: [custom], url: {o}/raw_custom}}
  agg_flat: {{type: parquet, inputs: [w_flat], url: {o}/agg_flat}}
  agg_rows: {{type: parquet, inputs: [w_rows], url: {o}/agg_rows}}
  agg_custom: {{type: parquet, inputs: [w_custom], url: {o}/agg_custom}}
  rejected:
    type: jsonl
    inputs: [flat.dead_letter, rows.dead_letter, custom.dead_letter]
    path: {o}/rejected.jsonl
{checkpoint}"
    )
}

/// count, avg, min, max of some values.
fn stats(v: &[f64]) -> (usize, f64, f64, f64) {
    let n = v.len();
    let sum: f64 = v.iter().sum();
    (n, sum / n as f64, v.iter().cloned().fold(f64::MAX, f64::min), v.iter().cloned().fold(f64::MIN, f64::max))
}

fn num(row: &BTreeMap<String, String>, col: &str) -> f64 {
    row.get(col).unwrap_or_else(|| panic!("no {col} in {row:?}")).parse().unwrap()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(1.0)
}

/// Checks the windows and raw archives of [`pipeline_yaml`] against [`messages`] (all of them
/// went through each shape).
pub fn check_output(out: &Path) {
    let msgs = messages();
    let minute = |t: &str| format!("{}:00.000Z", &t[..16]);
    // by (device, [capability,] minute start)
    let mut flat: BTreeMap<(String, String), Vec<(f64, f64)>> = BTreeMap::new();
    let mut by_cap: BTreeMap<(String, String, String), Vec<f64>> = BTreeMap::new();
    for m in &msgs {
        flat.entry((m.0.clone(), minute(&m.1))).or_default().push((m.2, m.3));
        by_cap.entry((m.0.clone(), "temperature".into(), minute(&m.1))).or_default().push(m.2);
        by_cap.entry((m.0.clone(), "humidity".into(), minute(&m.1))).or_default().push(m.3);
    }
    let agg = read_rows(&out.join("agg_flat"));
    assert_eq!(agg.len(), flat.len(), "{agg:?}");
    for r in &agg {
        let want = &flat[&(r["deviceId"].clone(), r["window_start"].clone())];
        let (n, avg, min, max) = stats(&want.iter().map(|w| w.0).collect::<Vec<_>>());
        assert_eq!(num(r, "count") as usize, n, "{r:?}");
        assert!(close(num(r, "temperature_avg"), avg) && close(num(r, "temperature_min"), min), "{r:?}");
        assert!(close(num(r, "temperature_max"), max), "{r:?}");
        let hum = stats(&want.iter().map(|w| w.1).collect::<Vec<_>>()).1;
        assert!(close(num(r, "humidity_avg"), hum), "{r:?}");
    }
    let agg = read_rows(&out.join("agg_rows"));
    assert_eq!(agg.len(), by_cap.len(), "{agg:?}");
    for r in &agg {
        let want = &by_cap[&(r["deviceId"].clone(), r["Capability"].clone(), r["window_start"].clone())];
        let (n, avg, min, max) = stats(want);
        assert_eq!(num(r, "count") as usize, n, "{r:?}");
        assert!(close(num(r, "Value_avg"), avg) && close(num(r, "Value_min"), min), "{r:?}");
        assert!(close(num(r, "Value_max"), max), "{r:?}");
    }
    let agg = read_rows(&out.join("agg_custom"));
    assert_eq!(agg.len(), flat.len(), "{agg:?}");
    for r in &agg {
        let want = &flat[&(r["deviceId"].clone(), r["window_start"].clone())];
        let (n, avg, min, max) = stats(&want.iter().map(|w| w.0 / 10.0).collect::<Vec<_>>());
        assert_eq!(num(r, "count") as usize, n);
        assert!(close(num(r, "T1_avg"), avg) && close(num(r, "T1_min"), min) && close(num(r, "T1_max"), max), "{r:?}");
    }
    // the raw archives hold the records' own fields
    let raw = read_rows(&out.join("raw_rows"));
    assert_eq!(raw.len(), 2 * msgs.len());
    assert!(raw
        .iter()
        .all(|r| r["deviceId"] == r["Device"] && r.contains_key("Value") && r.contains_key("EnqueuedTime")));
    let raw = read_rows(&out.join("raw_custom"));
    assert_eq!(raw.len(), msgs.len());
    assert!(raw.iter().all(|r| r.contains_key("T1") && r.contains_key("Timestamp")), "{raw:?}");
    assert_eq!(read_rows(&out.join("raw_flat")).len(), msgs.len());
}

/// The dead letters of [`pipeline_yaml`]'s run: (source, reason).
pub fn rejected(out: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(out.join("rejected.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["component"].as_str().unwrap().to_string(), v["reason"].as_str().unwrap().to_string())
        })
        .collect()
}
