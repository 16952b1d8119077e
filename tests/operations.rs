//! Operating `centralflow run`: the HTTP endpoint (`/metrics`, `/health/live`,
//! `/health/ready`), JSON logs, and reloading the pipeline on SIGHUP or a changed file with a
//! checkpoint in between. Against the real binary (and RabbitMQ for the connected source).

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// A running `centralflow` whose JSON log lines are collected as they come.
struct Running {
    child: Child,
    logs: Arc<Mutex<Vec<serde_json::Value>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    fn start(mut cmd: std::process::Command) -> Running {
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn centralflow");
        let logs: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // with --log-format json every log line is a JSON object; the end-of-run summary
                // is plain text
                let v = serde_json::from_str::<serde_json::Value>(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "plain": line }));
                sink.lock().unwrap().push(v);
            }
        });
        Running { child, logs, reader: Some(reader) }
    }

    /// Waits for a log line whose message contains `text`; returns the message.
    fn wait_log(&mut self, text: &str, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            if let Some(m) = self.logs.lock().unwrap().iter().filter_map(message).find(|m| m.contains(text)) {
                return m;
            }
            let exited = self.child.try_wait().unwrap();
            assert!(
                exited.is_none() && start.elapsed() < timeout,
                "no log line with {text:?} within {timeout:?} (exit: {exited:?}): {:#?}",
                self.logs
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The address of the operations endpoint, from the log.
    fn api(&mut self) -> String {
        let m = self.wait_log("metrics and health on http://", Duration::from_secs(30));
        m.split("http://").nth(1).unwrap().trim().to_string()
    }

    fn finish(mut self, timeout: Duration) -> (std::process::ExitStatus, Vec<serde_json::Value>) {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                panic!("centralflow did not finish within {timeout:?}: {:#?}", self.logs.lock().unwrap());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        let logs = self.logs.lock().unwrap().clone();
        (status, logs)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // a failed test must not leave the process running
        let _ = self.child.kill();
    }
}

fn message(v: &serde_json::Value) -> Option<String> {
    v.pointer("/fields/message").and_then(|m| m.as_str()).map(str::to_string)
}

fn get(url: &str) -> (u16, String) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let r = reqwest::get(url).await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let status = r.status().as_u16();
        (status, r.text().await.unwrap())
    })
}

/// `name{labels} value` samples of a Prometheus text exposition.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn sample(m: &BTreeMap<String, f64>, name: &str, component: &str) -> Option<f64> {
    m.iter()
        .find(|(k, _)| k.starts_with(&format!("{name}{{")) && k.contains(&format!("component=\"{component}\"")))
        .map(|(_, v)| *v)
}

const W: Duration = Duration::from_secs(120);

#[test]
fn metrics_and_health_describe_a_running_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("cf-ops-");
    let input = dir.path().join("export.jsonl");
    simulate(&input, 5_000, 50, 11);
    let mut bodies = file_bodies(&input);
    bodies.push(b"{ not json".to_vec());
    amqp_refill(&queue, bodies);
    let p = pipeline(
        dir.path(),
        "ops.yaml",
        &format!(
            r#"name: ops
sources:
  q:
    type: amqp
    url: ${{AMQP}}
    queue: {queue}
transforms:
  telemetry:
    type: filter
    inputs: [q]
    condition: messageSource == "telemetry"
  per_minute:
    type: window
    inputs: [telemetry]
    window: {{ kind: tumbling, size: 1m }}
    aggregates: {{ temperature: [avg] }}
sinks:
  lake:
    type: parquet
    inputs: [per_minute]
    url: {out}
  rejected:
    type: jsonl
    inputs: [q.dead_letter]
    path: {dead}
checkpoint:
  url: {state}
  interval: 1s
"#,
            out = dir.path().join("out").display(),
            dead = dir.path().join("dead.jsonl").display(),
            state = dir.path().join("state").display()
        ),
    );
    let mut c = cmd(&["run", "--log-format", "json", p.to_str().unwrap()]);
    c.env("AMQP", amqp_url());
    let mut r = Running::start(c);
    let api = r.api();

    assert_eq!(get(&format!("http://{api}/health/live")).0, 200);
    let start = Instant::now();
    loop {
        let (status, body) = get(&format!("http://{api}/health/ready"));
        if status == 200 {
            assert!(body.contains("connected"), "{body}");
            break;
        }
        assert!(start.elapsed() < W, "never ready: {status} {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // every message read and a checkpoint since (it acknowledges them)
    let m = loop {
        let m = samples(&get(&format!("http://{api}/metrics")).1);
        let read = sample(&m, "centralflow_events_out_total", "q").unwrap_or(0.0);
        let acked = amqp_depth(&queue) == (0, 0);
        let lag = sample(&m, "centralflow_consumer_lag", "q");
        let settled = sample(&m, "centralflow_source_committed_total", "q");
        if read >= 5_000.0
            && acked
            && lag == Some(0.0)
            && settled == Some(5_001.0)
            && sample(&m, "centralflow_dead_letters_total", "q") == Some(1.0)
        {
            break m;
        }
        assert!(start.elapsed() < W, "not all read: {read}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let telemetry = std::fs::read_to_string(&input).unwrap().matches(r#""messageSource":"telemetry""#).count() as f64;
    assert_eq!(sample(&m, "centralflow_events_in_total", "telemetry"), Some(5_000.0));
    assert_eq!(sample(&m, "centralflow_events_out_total", "telemetry"), Some(telemetry));
    assert!(sample(&m, "centralflow_bytes_in_total", "q").unwrap() > 5_000.0 * 300.0);
    assert_eq!(sample(&m, "centralflow_source_connected", "q"), Some(1.0));
    assert!(sample(&m, "centralflow_batch_seconds_count", "per_minute").unwrap() >= 1.0);
    assert!(sample(&m, "centralflow_watermark_lag_seconds", "per_minute").is_some());
    assert!(sample(&m, "centralflow_open_windows", "per_minute").unwrap() >= 1.0);
    assert!(m.contains_key("centralflow_checkpoint_duration_seconds_count"));
    assert!(m["centralflow_checkpoint_epoch"] >= 1.0);
    assert!(m["centralflow_checkpoint_age_seconds"] < 30.0);
    for family in ["centralflow_errors_total", "centralflow_late_events_total", "centralflow_bytes_out_total"] {
        assert!(m.keys().any(|k| k.starts_with(family)), "{family} missing");
    }

    signal(&r.child, libc::SIGTERM);
    let (status, logs) = r.finish(W);
    assert!(status.success(), "{logs:#?}");
    // JSON logs: every tracing line is an object with a level and a message
    let structured: Vec<_> = logs.iter().filter(|l| l.get("plain").is_none()).collect();
    assert!(structured.len() >= 3, "{logs:#?}");
    assert!(structured.iter().all(|l| l["level"].is_string() && message(l).is_some()), "{structured:#?}");
    tokio::runtime::Runtime::new().unwrap().block_on(amqp_delete(&queue));
}

#[test]
fn an_unreachable_broker_is_not_ready_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(
        dir.path(),
        "down.yaml",
        &format!(
            "sources:\n  q:\n    type: amqp\n    url: ${{AMQP}}\n    queue: nowhere\nsinks:\n  out:\n    type: jsonl\n    inputs: [q]\n    path: {}\ncheckpoint:\n  url: {}\n",
            dir.path().join("out.jsonl").display(),
            dir.path().join("state").display()
        ),
    );
    let mut c = cmd(&["run", "--log-format", "json", p.to_str().unwrap()]);
    c.env("AMQP", "amqp://guest:guest@127.0.0.1:1/%2f");
    let mut r = Running::start(c);
    let api = r.api();
    assert_eq!(get(&format!("http://{api}/health/live")).0, 200, "alive while the source retries");
    let start = Instant::now();
    let body = loop {
        let (status, body) = get(&format!("http://{api}/health/ready"));
        assert_ne!(status, 200, "ready without a broker: {body}");
        if body.contains("disconnected") {
            break body;
        }
        assert!(start.elapsed() < W, "no reason given: {status} {body}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(body.contains("\"q\""), "names the source: {body}");
    let m = samples(&get(&format!("http://{api}/metrics")).1);
    assert_eq!(sample(&m, "centralflow_source_connected", "q"), Some(0.0));
    // it keeps retrying (with backoff) rather than giving up
    let start = Instant::now();
    while sample(&samples(&get(&format!("http://{api}/metrics")).1), "centralflow_errors_total", "q").unwrap_or(0.0)
        < 2.0
    {
        assert!(start.elapsed() < W, "no retries");
        std::thread::sleep(Duration::from_millis(200));
    }
    signal(&r.child, libc::SIGTERM);
    let (status, logs) = r.finish(W);
    assert!(status.success(), "{logs:#?}");
}

fn ops_pipeline(dir: &Path, raw: &str, extra: &str) -> String {
    format!(
        r#"name: reload
sources:
  sim:
    type: simulator
    devices: 20
    rate: 500
    count: 9000
    start: "2026-11-01T00:00:00Z"
    seed: 5
    out_of_order: 0
transforms:
  telemetry:
    type: filter
    inputs: [sim]
    condition: messageSource == "telemetry"
  per_second:
    type: window
    inputs: [telemetry]
    window: {{ kind: tumbling, size: 1s }}
    aggregates: {{ temperature: [avg] }}
sinks:
  raw:
    type: jsonl
    inputs: [sim]
    path: {raw}
  rows:
    type: jsonl
    inputs: [per_second]
    path: {rows}
checkpoint:
  url: {state}
  interval: 1h
{extra}"#,
        raw = dir.join(raw).display(),
        rows = dir.join("rows.jsonl").display(),
        state = dir.join("state").display()
    )
}

fn lines(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", p.display())))
        .collect()
}

#[test]
fn sighup_and_file_changes_reload_the_pipeline_with_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = pipeline(d, "reload.yaml", &ops_pipeline(d, "raw-1.jsonl", ""));
    let mut r = Running::start(cmd(&["run", "--log-format", "json", p.to_str().unwrap()]));
    let wait_lines = |f: &str, n: usize| {
        let start = Instant::now();
        while count_lines(&d.join(f)) < n {
            assert!(start.elapsed() < W, "{f} stays under {n} lines");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_lines("raw-1.jsonl", 1_000);

    // an invalid change is refused and the pipeline goes on
    std::fs::write(&p, ops_pipeline(d, "raw-x.jsonl", "bogus_key: 1\n")).unwrap();
    let refused = r.wait_log("reload refused", W);
    assert!(refused.contains("bogus_key"), "{refused}");

    // a valid change, picked up from the file's modification time
    std::fs::write(&p, ops_pipeline(d, "raw-2.jsonl", "")).unwrap();
    r.wait_log("reloaded", W);
    wait_lines("raw-2.jsonl", 500);

    // a change that keeps the file's modification time is only seen on SIGHUP
    let mtime = std::fs::metadata(&p).unwrap().modified().unwrap();
    std::fs::write(&p, ops_pipeline(d, "raw-3.jsonl", "")).unwrap();
    std::fs::File::options().write(true).open(&p).unwrap().set_modified(mtime).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert!(!d.join("raw-3.jsonl").exists(), "reloaded without a signal");
    signal(&r.child, libc::SIGHUP);

    let (status, logs) = r.finish(W); // the simulator's 9,000 messages end the run
    assert!(status.success(), "{logs:#?}");
    let reloads = logs.iter().filter_map(message).filter(|m| m.starts_with("reloaded")).count();
    assert_eq!(reloads, 2, "{logs:#?}");

    // every message exactly once across the three runs: the source resumed from the checkpoint
    let parts: Vec<Vec<serde_json::Value>> =
        ["raw-1.jsonl", "raw-2.jsonl", "raw-3.jsonl"].iter().map(|f| lines(&d.join(f))).collect();
    assert!(
        parts.iter().all(|p| !p.is_empty()),
        "each run wrote: {:?}",
        parts.iter().map(Vec::len).collect::<Vec<_>>()
    );
    let mut seen = BTreeMap::new();
    for m in parts.iter().flatten() {
        let key = (m["deviceId"].as_str().unwrap().to_string(), m["enqueuedTime"].as_str().unwrap().to_string());
        *seen.entry(key).or_insert(0) += 1;
    }
    assert_eq!(parts.iter().map(Vec::len).sum::<usize>(), 9_000);
    assert_eq!(seen.len(), 9_000, "no message twice");
    assert!(!d.join("raw-x.jsonl").exists());

    // windows open across a reload kept their state: each (device, second) once, counts whole
    let telemetry: Vec<&serde_json::Value> =
        parts.iter().flatten().filter(|m| m["messageSource"] == "telemetry").collect();
    let mut want: BTreeMap<(String, i64), i64> = BTreeMap::new();
    for m in &telemetry {
        let t = chrono::DateTime::parse_from_rfc3339(m["enqueuedTime"].as_str().unwrap()).unwrap();
        *want.entry((m["deviceId"].as_str().unwrap().to_string(), t.timestamp())).or_insert(0) += 1;
    }
    let mut got: BTreeMap<(String, i64), i64> = BTreeMap::new();
    for row in lines(&d.join("rows.jsonl")) {
        let t = chrono::DateTime::parse_from_rfc3339(row["window_start"].as_str().unwrap()).unwrap();
        let key = (row["deviceId"].as_str().unwrap().to_string(), t.timestamp());
        assert!(got.insert(key.clone(), row["count"].as_i64().unwrap()).is_none(), "{key:?} emitted twice");
    }
    assert_eq!(got, want);
}

#[test]
fn a_killed_run_resumes_its_jsonl_output_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let yaml = ops_pipeline(d, "raw.jsonl", "").replace("interval: 1h", "interval: 500ms");
    let p = pipeline(d, "crash.yaml", &yaml);
    for round in 0..3 {
        let child = cmd(&["run", p.to_str().unwrap()]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let before = count_lines(&d.join("raw.jsonl"));
        let start = Instant::now();
        while count_lines(&d.join("raw.jsonl")) < before + 1_200 {
            assert!(start.elapsed() < W, "round {round}: no progress");
            std::thread::sleep(Duration::from_millis(20));
        }
        signal(&child, libc::SIGKILL);
        wait_output(child, W);
    }
    let out = ok(&wait_output(
        cmd(&["run", p.to_str().unwrap()]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap(),
        W,
    ));
    let raw = lines(&d.join("raw.jsonl"));
    let keys: std::collections::BTreeSet<(String, String)> = raw
        .iter()
        .map(|m| (m["deviceId"].as_str().unwrap().to_string(), m["enqueuedTime"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(raw.len(), 9_000, "{out}");
    assert_eq!(keys.len(), 9_000, "each message once after three crashes");
}

/// A second process on the same local checkpoint folder is refused with a clear error, not
/// left to overwrite the first one's checkpoints and output; the lock goes with the process.
#[test]
fn a_second_process_on_the_same_checkpoint_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = pipeline(d, "locked.yaml", &ops_pipeline(d, "raw.jsonl", ""));
    let first = Running::start(cmd(&["run", "--log-format", "json", p.to_str().unwrap()]));
    // the lock is held once the lock file names the holder (written after the flock succeeds;
    // the operations endpoint's log line comes before the lock is taken, so it says nothing)
    let pid = first.child.id().to_string();
    let lock = d.join("state/reload/lock");
    wait_until("the first process holds the lock", W, || std::fs::read_to_string(&lock).is_ok_and(|t| t.trim() == pid));
    let second = run(&["replay", "--no-progress", p.to_str().unwrap()], &[], W);
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert!(err.contains("another centralflow process") && err.contains(&pid), "{err}");
    signal(&first.child, libc::SIGKILL);
    let _ = first.finish(W);
    // the lock died with the process
    let third = run(&["replay", "--no-progress", p.to_str().unwrap()], &[], W);
    ok(&third);
}
