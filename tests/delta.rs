//! The `delta` sink read as users read it: delta-rs's Python package (`deltalake` from PyPI) reads
//! the table and its history, PySpark (the engine of Fabric, Synapse and Databricks) reads its
//! data files. Exactly once across SIGKILLs of an AMQP run (RabbitMQ), into a local folder and
//! into Azurite. `scripts/test` installs the Python packages into .tools/venv (W1_PYTHON).

mod common;

use std::collections::BTreeMap;
use std::process::{Child, Stdio};
use std::time::Duration;

use common::amqp_pipeline::{drain, expected_raw, setup, Setup};
use common::*;

const T: Duration = Duration::from_secs(300);

fn python() -> String {
    std::env::var("W1_PYTHON").expect("W1_PYTHON names a Python with deltalake and pyspark: run scripts/test")
}

/// What `tests/python/delta_read.py` tells of a table, whose statistics count its rows.
fn read_table(url: &str, options: &BTreeMap<String, String>, spark: bool) -> serde_json::Value {
    let script = root().join("tests/python/delta_read.py");
    let opts = serde_json::to_string(options).unwrap();
    let mut args = vec![script.to_str().unwrap().to_string(), url.to_string(), opts];
    if spark {
        args.push("spark".into());
    }
    let out = std::process::Command::new(python()).args(&args).output().expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "reading {url} failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or("")).expect(&stdout);
    // every data file's statistics are read by delta-rs, and their record counts are the rows
    assert_eq!(v["stats_records"], v["count"], "the add actions' numRecords against the rows of {url}");
    v
}

/// The raw rows of a table in the shape of [`expected_raw`], duplicates counted.
fn raw_rows(v: &serde_json::Value) -> BTreeMap<(String, String, String), usize> {
    let mut m = BTreeMap::new();
    for r in v["rows"].as_array().expect("rows") {
        let t = centralflow::time::format_rfc3339(r[1].as_i64().unwrap() * 1_000);
        let tele: serde_json::Value = serde_json::from_str(r[2].as_str().unwrap()).unwrap();
        *m.entry((r[0].as_str().unwrap().to_string(), t, tele.to_string())).or_default() += 1;
    }
    m
}

/// Every commit after the table's creation is one epoch of one app id, with increasing epochs,
/// and the table's `txn` version of that app id is the last one.
fn assert_one_commit_per_epoch(v: &serde_json::Value) -> usize {
    let history = v["history"].as_array().unwrap();
    assert_eq!(history[0]["operation"], "CREATE TABLE", "{v}");
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    let mut commits = 0;
    for h in &history[1..] {
        assert_eq!(h["operation"], "STREAMING UPDATE", "only epoch commits: {h}");
        let app = h["queryId"].as_str().unwrap().to_string();
        let epoch = h["epochId"].as_i64().or_else(|| h["epochId"].as_str().and_then(|s| s.parse().ok())).unwrap();
        if let Some(prev) = last.get(&app) {
            assert!(epoch > *prev, "epochs of {app} increase: {prev} then {epoch}");
        }
        last.insert(app, epoch);
        commits += 1;
    }
    if let Some(txn) = v["txn"].as_object() {
        for (app, epoch) in &last {
            assert_eq!(txn[app].as_i64(), Some(*epoch), "txn version of {app}: {v}");
        }
    }
    commits
}

fn yaml(s: &Setup, raw_url: &str, agg_url: &str) -> String {
    format!(
        r#"name: amqp-to-delta
sources:
  exports:
    type: amqp
    url: ${{CENTRALFLOW_AMQP_URL}}
    queue: {queue}
    declare: {{ durable: true }}
    prefetch: 5000
transforms:
  telemetry:
    type: filter
    inputs: [exports]
    condition: messageSource == "telemetry"
  per_minute:
    type: window
    inputs: [telemetry]
    window: {{ kind: tumbling, size: 1m }}
    allowed_lateness: 30s
    group_by: [deviceId]
    aggregates: {{ temperature: [count, avg] }}
sinks:
  raw:
    type: delta
    inputs: [telemetry]
    url: {raw_url}
    partition_by: [date]
    columns: {{ temperature: double }}
  agg:
    type: delta
    inputs: [per_minute]
    url: {agg_url}
checkpoint:
  url: {state}
  interval: 1s
"#,
        queue = s.queue,
        state = s.dir.path().join("state").display()
    )
}

fn start(p: &std::path::Path, env: &[(String, String)]) -> Child {
    let mut c = cmd(&["run", p.to_str().unwrap()]);
    c.env("CENTRALFLOW_AMQP_URL", amqp_url());
    for (k, v) in env {
        c.env(k, v);
    }
    c.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
}

/// Two SIGKILLs at random moments, then a run that drains the queue and stops.
fn crash_twice_then_drain(s: &Setup, p: &std::path::Path, env: &[(String, String)], seed: u64) {
    let mut rng = seed;
    let mut logs = Vec::new();
    for round in 0..2 {
        let child = start(p, env);
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(1500 + rng % 2500));
        signal(&child, libc::SIGKILL);
        let out = child.wait_with_output().unwrap();
        assert!(!out.status.success(), "round {round} was killed");
        logs.push(String::from_utf8_lossy(&out.stderr).to_string());
    }
    let child = start(p, env);
    if std::panic::catch_unwind(|| drain(s)).is_err() {
        signal(&child, libc::SIGKILL);
        let out = child.wait_with_output().unwrap();
        logs.push(String::from_utf8_lossy(&out.stderr).to_string());
        let kept = std::env::temp_dir().join(format!("delta-test-{}.log", std::process::id()));
        std::fs::write(&kept, logs.join("\n---- next run ----\n")).unwrap();
        let last = logs.last().unwrap();
        let tail: Vec<&str> = last.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect();
        panic!(
            "the queue did not drain; every run's log is in {}; the last ends:\n{}",
            kept.display(),
            tail.join("\n")
        );
    }
    signal(&child, libc::SIGTERM);
    ok(&wait_output(child, T));
}

fn check_exactly_once(s: &Setup, raw: &serde_json::Value, agg: &serde_json::Value) {
    let got = raw_rows(raw);
    let want = expected_raw(&s.input);
    let dups: Vec<_> = got.iter().filter(|(_, n)| **n > 1).take(3).collect();
    assert!(dups.is_empty(), "duplicates in the Delta table: {dups:?}");
    let missing = want.keys().filter(|k| !got.contains_key(*k)).count();
    assert_eq!(missing, 0, "rows lost");
    assert_eq!(got, want);
    assert_eq!(raw["partition_columns"], serde_json::json!(["date"]));
    assert_eq!(raw["columns"]["enqueuedTime"], "timestamp[us, tz=UTC]", "{}", raw["columns"]);
    assert_eq!(raw["columns"]["temperature"], "double");
    let commits = assert_one_commit_per_epoch(raw);
    assert!(commits >= 3, "three runs commit at least once each: {commits}");
    assert_one_commit_per_epoch(agg);
    // every window of the drained queue, each once (the last minutes per device may still be
    // open in the checkpoint when the pipeline stops)
    assert!(agg["count"].as_u64().unwrap() > 0, "{}", agg["count"]);
}

#[test]
fn crashes_into_a_local_delta_table_commit_every_row_once() {
    let s = setup(60_000, None);
    let raw_dir = s.dir.path().join("lake/raw");
    let agg_dir = s.dir.path().join("lake/agg");
    let p = pipeline(s.dir.path(), "p.yaml", &yaml(&s, raw_dir.to_str().unwrap(), agg_dir.to_str().unwrap()));
    crash_twice_then_drain(&s, &p, &[], 0x9E3779B97F4A7C15);
    let none = BTreeMap::new();
    let raw = read_table(raw_dir.to_str().unwrap(), &none, true);
    let agg = read_table(agg_dir.to_str().unwrap(), &none, true);
    check_exactly_once(&s, &raw, &agg);
    // PySpark reads the data files: same rows, Spark timestamps
    let spark = &raw["spark"];
    assert_eq!(spark["count"], raw["count"], "{spark}");
    assert_eq!(spark["types"]["enqueuedTime"], "timestamp", "{spark}");
    assert_eq!(agg["spark"]["count"], agg["count"], "{}", agg["spark"]);
    assert_eq!(agg["spark"]["types"]["window_start"], "timestamp", "{}", agg["spark"]);
    // no data file of a killed run's unfinished epoch is part of the table
    let files = parquet_files(&raw_dir).len() as u64;
    assert!(spark["files"].as_u64().unwrap() <= files);
}

#[test]
fn crashes_into_a_delta_table_on_azurite_commit_every_row_once() {
    let s = setup(20_000, None);
    let container = unique("delta-");
    azurite_create_container(&container);
    let raw_url = format!("az://{container}/lake/raw");
    let agg_url = format!("az://{container}/lake/agg");
    let p = pipeline(s.dir.path(), "p.yaml", &yaml(&s, &raw_url, &agg_url));
    crash_twice_then_drain(&s, &p, &azurite_env(), 0xD1B54A32D192ED03);
    let opts: BTreeMap<String, String> = azurite_options();
    let raw = read_table(&raw_url, &opts, false);
    let agg = read_table(&agg_url, &opts, false);
    check_exactly_once(&s, &raw, &agg);
}

#[test]
fn replay_to_delta_is_read_by_deltalake_and_pyspark() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("export.jsonl");
    simulate(&input, 20_000, 50, 3);
    let out = dir.path().join("delta");
    ok(&run(
        &["replay", "pipelines/replay-to-delta.yaml"],
        &[
            ("CENTRALFLOW_INPUT", input.to_str().unwrap()),
            ("CENTRALFLOW_OUTPUT", out.to_str().unwrap()),
            ("CENTRALFLOW_DEAD_LETTERS", dir.path().join("dl.jsonl").to_str().unwrap()),
        ],
        T,
    ));
    let table = out.join("telemetry");
    let v = read_table(table.to_str().unwrap(), &BTreeMap::new(), true);
    assert_eq!(raw_rows(&v), expected_raw(&input));
    assert_eq!(v["partition_columns"], serde_json::json!(["date", "hour"]));
    assert_eq!(v["columns"]["date"], "date32[day]", "{}", v["columns"]);
    assert_eq!(v["columns"]["hour"], "int32");
    assert_eq!(v["spark"]["count"], v["count"]);
    assert_eq!(assert_one_commit_per_epoch(&v), 1, "a replay is one epoch");
    // partition folders as Hive names them
    assert!(std::fs::read_dir(&table).unwrap().flatten().any(|e| e.file_name().to_string_lossy().starts_with("date=")));
}

#[test]
fn replay_to_delta_on_s3_commits_through_put_if_absent() {
    // moto answers S3's conditional PUT (If-None-Match), which the commit of `_delta_log/N.json` uses
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("export.jsonl");
    simulate(&input, 5_000, 20, 5);
    let bucket = unique("delta-");
    s3_create_bucket(&bucket);
    let out = format!("s3://{bucket}/lake");
    let mut env: Vec<(String, String)> = s3_env();
    env.push(("CENTRALFLOW_INPUT".into(), input.to_str().unwrap().into()));
    env.push(("CENTRALFLOW_OUTPUT".into(), out.clone()));
    env.push(("CENTRALFLOW_DEAD_LETTERS".into(), dir.path().join("dl.jsonl").to_str().unwrap().into()));
    ok(&run(&["replay", "pipelines/replay-to-delta.yaml"], &env_refs(&env), T));
    let v = read_table(&format!("{out}/telemetry"), &s3_options(), false);
    assert_eq!(raw_rows(&v), expected_raw(&input));
    assert_eq!(assert_one_commit_per_epoch(&v), 1);
}
