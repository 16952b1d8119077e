//! Running `pipelines/w1-amqp.yaml` against a filled queue, and checking its output.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::*;

const T: Duration = Duration::from_secs(600);

pub struct Setup {
    pub dir: tempfile::TempDir,
    pub queue: String,
    pub input: std::path::PathBuf,
}

/// A queue filled with `n` simulated export messages (also kept in a file for the replay).
pub fn setup(n: u64, poison_every: Option<usize>) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("cf-test-");
    let input = dir.path().join("export.jsonl");
    simulate(&input, n, 500, 21);
    let mut bodies = file_bodies(&input);
    if let Some(k) = poison_every {
        let mut with_poison = Vec::new();
        for (i, b) in bodies.into_iter().enumerate() {
            if i % k == k / 2 {
                with_poison.push(format!("{{\"not\": \"an export\", \"n\": {i}}}").into_bytes());
            }
            with_poison.push(b);
        }
        bodies = with_poison;
    }
    amqp_refill(&queue, bodies);
    Setup { dir, queue, input }
}

/// A pipeline that archives the telemetry of an AMQP queue as raw Parquet under `raw_url`, with
/// checkpoints under `state_url` (the broker's URL from `CENTRALFLOW_AMQP_URL`). `raw_extra`:
/// more settings of the Parquet sink, each line indented by four spaces.
pub fn raw_archive_yaml(
    name: &str,
    queue: &str,
    prefetch: u32,
    raw_url: &str,
    raw_extra: &str,
    state_url: &str,
    interval: &str,
) -> String {
    format!(
        r#"name: {name}
sources:
  exports:
    type: amqp
    url: ${{CENTRALFLOW_AMQP_URL}}
    queue: {queue}
    declare: {{ durable: true }}
    prefetch: {prefetch}
transforms:
  telemetry:
    type: filter
    inputs: [exports]
    condition: messageSource == "telemetry"
sinks:
  raw:
    type: parquet
    inputs: [telemetry]
    url: {raw_url}
{raw_extra}checkpoint:
  url: {state_url}
  interval: {interval}
"#
    )
}

/// `centralflow run pipelines/w1-amqp.yaml` on the setup's queue and folders.
pub fn command(s: &Setup) -> std::process::Command {
    let out = s.dir.path().join("out");
    let state = s.dir.path().join("state");
    let mut c = cmd(&["run", "pipelines/w1-amqp.yaml"]);
    c.env("CENTRALFLOW_QUEUE", &s.queue)
        .env("CENTRALFLOW_OUTPUT", &out)
        .env("CENTRALFLOW_STATE", &state)
        .env("CENTRALFLOW_AMQP_URL", amqp_url());
    c
}

pub fn start(s: &Setup) -> Child {
    command(s).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
}

/// Waits until the queue has nothing ready or unacknowledged, then stops the pipeline with
/// SIGTERM.
pub fn drain_and_stop(s: &Setup, child: Child) -> String {
    drain(s);
    signal(&child, libc::SIGTERM);
    ok(&wait_output(child, T))
}

/// Waits until the queue has nothing ready or unacknowledged (every message processed and
/// acknowledged after its checkpoint).
pub fn drain(s: &Setup) {
    let start = Instant::now();
    loop {
        let (ready, unacked) = amqp_depth(&s.queue);
        if ready == 0 && unacked == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "the queue did not drain: {ready} ready, {unacked} unacked"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The raw archive: (deviceId, enqueuedTime, telemetry) of every row, with duplicates counted.
pub fn raw_rows(dir: &Path) -> BTreeMap<(String, String, String), usize> {
    let mut m = BTreeMap::new();
    for r in read_rows(&dir.join("out/raw")) {
        let tele: serde_json::Value = serde_json::from_str(&r["telemetry"]).unwrap();
        *m.entry((r["deviceId"].clone(), r["enqueuedTime"].clone(), tele.to_string())).or_default() += 1;
    }
    m
}

/// The telemetry messages of the input file, in the same shape.
pub fn expected_raw(input: &Path) -> BTreeMap<(String, String, String), usize> {
    let mut m = BTreeMap::new();
    for line in std::fs::read_to_string(input).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["messageSource"] == "telemetry" {
            let t = centralflow::time::format_rfc3339(
                centralflow::time::parse_rfc3339(v["enqueuedTime"].as_str().unwrap()).unwrap(),
            );
            *m.entry((v["deviceId"].as_str().unwrap().to_string(), t, v["telemetry"].to_string())).or_default() += 1;
        }
    }
    m
}

/// Windowed output equals the replay of the same messages, except windows still open when the
/// pipeline stopped (their state is in the checkpoint; a replay emits everything at its end).
pub fn assert_windows_match_replay(s: &Setup) {
    let replay_out = s.dir.path().join("replay");
    ok(&run(
        &["replay", "pipelines/w1-tumbling.yaml"],
        &[("CENTRALFLOW_INPUT", s.input.to_str().unwrap()), ("CENTRALFLOW_OUTPUT", replay_out.to_str().unwrap())],
        T,
    ));
    let live = window_rows(&s.dir.path().join("out/agg"));
    let replayed = window_rows(&replay_out);
    assert!(live.len() > 100, "{}", live.len());
    for (k, v) in &live {
        assert_eq!(replayed.get(k), Some(v), "window {k:?}");
    }
    // the windows missing from the live output are the last ones (still open)
    let last_closed = live.keys().map(|k| k.1.clone()).max().unwrap();
    for k in replayed.keys().filter(|k| !live.contains_key(*k)) {
        assert!(k.1 >= last_closed, "window {k:?} is missing from the live output");
    }
}
