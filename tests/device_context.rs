//! `device_context` against DuckDB's `ASOF JOIN`: a stream where 5% of messages are property
//! changes and connectivity events and 2% arrive out of order (within the allowed lateness).
//! Every telemetry row's `device.properties.*`, `device.connected` and `device.connected_since`
//! must equal what DuckDB joins as of the row's time, in `replay` and in `run` through RabbitMQ
//! with a SIGKILL in between.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

const T0_MS: i64 = 1_793_491_200_000; // 2026-11-01T00:00:00Z

/// (deviceId, enqueuedTime) -> (fw, mode, connected, connected_since), values as JSON text.
type Joined = BTreeMap<(String, String), (String, String, String, String)>;

fn rfc3339(ms: i64) -> String {
    centralflow::time::format_rfc3339(ms * 1_000_000)
}

/// `n` messages over `devices` devices, one every 100 ms of event time (so no two share a
/// time), in arrival order: 2% of them arrive up to 20 s late.
fn generate(n: usize, devices: usize, seed: u64) -> Vec<String> {
    let mut rng = seed;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut msgs: Vec<(i64, String)> = Vec::with_capacity(n);
    for i in 0..n {
        let t = T0_MS + i as i64 * 100;
        let dev = format!("dev-{:03}", next() % devices as u64);
        let kind = next() % 1000;
        let ts = rfc3339(t);
        let body = if kind < 25 {
            let (name, value) = if next() % 2 == 0 {
                ("fw", format!("\"{}.{}\"", next() % 3, next() % 10))
            } else {
                ("mode", format!("{}", next() % 5))
            };
            let mt = if next() % 2 == 0 { "devicePropertyReportedChange" } else { "cloudPropertyChange" };
            format!(
                r#"{{"deviceId":"{dev}","enqueuedTime":"{ts}","messageSource":"properties","messageType":"{mt}","properties":[{{"name":"{name}","value":{value}}}]}}"#
            )
        } else if kind < 50 {
            let mt = if next() % 3 == 0 { "disconnected" } else { "connected" };
            format!(
                r#"{{"deviceId":"{dev}","enqueuedTime":"{ts}","messageSource":"deviceConnectivity","messageType":"{mt}"}}"#
            )
        } else {
            format!(
                r#"{{"deviceId":"{dev}","enqueuedTime":"{ts}","messageSource":"telemetry","telemetry":{{"temperature":{}}}}}"#,
                next() % 400
            )
        };
        // arrival: 2% up to 20 s (200 messages) later than their time
        let delay = if next() % 100 < 2 { (next() % 20_000) as i64 } else { 0 };
        msgs.push((t + delay, body));
    }
    msgs.sort_by_key(|(arrival, _)| *arrival);
    msgs.into_iter().map(|(_, b)| b).collect()
}

/// DuckDB's answer: each telemetry row joined ASOF with the latest fw, mode and connectivity
/// of its device at or before its time.
fn duckdb_join(input: &Path) -> Joined {
    let python = std::env::var("W1_PYTHON").expect("W1_PYTHON names a Python with duckdb: run scripts/test");
    let script = r#"
import sys, json, duckdb
con = duckdb.connect()
con.execute(f"""
create table m as select * from read_json('{sys.argv[1]}', format='newline_delimited',
  columns={{deviceId: 'VARCHAR', enqueuedTime: 'VARCHAR', messageSource: 'VARCHAR', messageType: 'VARCHAR', properties: 'JSON'}});
create table t as select deviceId d, enqueuedTime::TIMESTAMPTZ ts, enqueuedTime et from m where messageSource = 'telemetry';
create table p as select deviceId d, enqueuedTime::TIMESTAMPTZ ts, json_extract_string(properties, '$[0].name') name,
  json_extract(properties, '$[0].value')::VARCHAR v from m where messageSource = 'properties';
create table c as select deviceId d, enqueuedTime::TIMESTAMPTZ ts, enqueuedTime et, messageType = 'connected' conn
  from m where messageSource = 'deviceConnectivity';
""")
rows = con.execute("""
select t.d, t.et, fw.v, mode.v, c.conn, c.et from t
asof left join (select * from p where name = 'fw') fw on t.d = fw.d and t.ts >= fw.ts
asof left join (select * from p where name = 'mode') mode on t.d = mode.d and t.ts >= mode.ts
asof left join c on t.d = c.d and t.ts >= c.ts
""").fetchall()
for r in rows:
    print(json.dumps(r))
"#;
    let out = std::process::Command::new(python).args(["-c", script, input.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "duckdb: {}", String::from_utf8_lossy(&out.stderr));
    let mut joined = Joined::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let r: Vec<serde_json::Value> = serde_json::from_str(line).unwrap();
        let text = |v: &serde_json::Value| match v {
            serde_json::Value::String(s) => canonical(s),
            serde_json::Value::Null => "null".to_string(),
            other => other.to_string(),
        };
        let since = match &r[5] {
            serde_json::Value::String(s) => canonical_time(s),
            _ => "null".into(),
        };
        let key = (r[0].as_str().unwrap().to_string(), canonical_time(r[1].as_str().unwrap()));
        assert!(joined.insert(key, (text(&r[2]), text(&r[3]), r[4].to_string(), since)).is_none());
    }
    joined
}

/// JSON text in one spelling.
fn canonical(json: &str) -> String {
    serde_json::from_str::<serde_json::Value>(json).map(|v| v.to_string()).unwrap_or_else(|_| json.to_string())
}

fn canonical_time(s: &str) -> String {
    centralflow::time::format_rfc3339(centralflow::time::parse_rfc3339(s).expect("a time"))
}

/// centralflow's answer, from the JSON lines its sink wrote (read once the run has ended).
fn centralflow_rows(path: &Path) -> (Joined, usize) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut joined = Joined::new();
    let mut lines = 0;
    for line in text.lines() {
        lines += 1;
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let dev = v["device"].clone();
        let get = |p: &str| dev.pointer(p).map(|x| x.to_string()).unwrap_or_else(|| "null".into());
        let since = dev.get("connected_since").and_then(|s| s.as_str()).map(canonical_time).unwrap_or("null".into());
        let key = (v["deviceId"].as_str().unwrap().to_string(), canonical_time(v["enqueuedTime"].as_str().unwrap()));
        joined.insert(key, (get("/properties/fw"), get("/properties/mode"), get("/connected"), since));
    }
    (joined, lines)
}

fn transforms(lateness: &str) -> String {
    format!(
        r#"transforms:
  context: {{ type: device_context, inputs: [export], allowed_lateness: {lateness} }}
  telemetry: {{ type: filter, inputs: [context], condition: 'messageSource == "telemetry"' }}
"#
    )
}

fn assert_same(expected: &Joined, got: &Joined, what: &str) {
    assert_eq!(got.len(), expected.len(), "{what}: telemetry rows");
    let mut differ = 0;
    for (k, v) in expected {
        if got.get(k) != Some(v) {
            differ += 1;
            if differ <= 5 {
                eprintln!("{what}: {k:?}: DuckDB {v:?}, centralflow {:?}", got.get(k));
            }
        }
    }
    assert_eq!(differ, 0, "{what}: rows whose device state differs from DuckDB's ASOF JOIN");
}

#[test]
fn replay_equals_duckdb_asof_join() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("export.jsonl");
    let msgs = generate(40_000, 60, 7);
    std::fs::write(&input, msgs.join("\n") + "\n").unwrap();
    let expected = duckdb_join(&input);
    assert!(expected.len() > 35_000, "mostly telemetry");
    let states = expected.values().filter(|(fw, mode, ..)| fw != "null" && mode != "null").count();
    assert!(states > expected.len() / 2, "most rows have state to check: {states}");
    let pipeline = dir.path().join("p.yaml");
    std::fs::write(
        &pipeline,
        format!(
            "name: ctx\nsources:\n  export: {{ type: files, url: {} }}\n{}sinks:\n  out: {{ type: jsonl, inputs: [telemetry], path: {} }}\n",
            input.display(),
            transforms("30s"),
            dir.path().join("out.jsonl").display()
        ),
    )
    .unwrap();
    let out = run(&["replay", "--no-progress", pipeline.to_str().unwrap()], &[], Duration::from_secs(120));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (got, lines) = centralflow_rows(&dir.path().join("out.jsonl"));
    assert_eq!(lines, expected.len(), "each telemetry row once");
    assert_same(&expected, &got, "replay");
}

#[test]
fn run_through_rabbitmq_with_a_kill_equals_duckdb_asof_join() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("export.jsonl");
    let msgs = generate(30_000, 40, 11);
    std::fs::write(&input, msgs.join("\n") + "\n").unwrap();
    let expected = duckdb_join(&input);
    let queue = unique("cf-ctx-");
    // a last message far ahead moves the watermark past everything, so that no event stays held
    let mut bodies: Vec<Vec<u8>> = msgs.iter().map(|m| m.as_bytes().to_vec()).collect();
    bodies.push(
        format!(
            r#"{{"deviceId":"zz-sentinel","enqueuedTime":"{}","messageSource":"deviceConnectivity","messageType":"connected"}}"#,
            rfc3339(T0_MS + 86_400_000)
        )
        .into_bytes(),
    );
    amqp_refill(&queue, bodies);
    let out = dir.path().join("out.jsonl");
    let pipeline = dir.path().join("p.yaml");
    std::fs::write(
        &pipeline,
        format!(
            "name: ctx-live\nsources:\n  export: {{ type: amqp, url: '${{CTX_AMQP_URL}}', queue: {queue}, prefetch: 2000 }}\n{}sinks:\n  out: {{ type: jsonl, inputs: [telemetry], path: {} }}\ncheckpoint: {{ url: {}, interval: 1s }}\n",
            transforms("30s"),
            out.display(),
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let start = || {
        cmd(&["run", pipeline.to_str().unwrap()])
            .env("CTX_AMQP_URL", amqp_url())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("run.log")).unwrap())
            .spawn()
            .unwrap()
    };
    // first run: killed once part of the output is there
    let mut child = start();
    let t = Instant::now();
    while count_lines(&out) < 5_000 && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(50));
    }
    signal(&child, libc::SIGKILL);
    let _ = child.wait();
    let rows_at_kill = count_lines(&out);
    let log = || std::fs::read_to_string(dir.path().join("run.log")).unwrap_or_default();
    assert!(rows_at_kill > 0 && rows_at_kill < expected.len(), "killed midway ({rows_at_kill} rows)\n{}", log());
    // second run: until every row is there and the queue is drained
    let child = start();
    let t = Instant::now();
    loop {
        let (ready, unacked) = amqp_depth(&queue);
        if count_lines(&out) >= expected.len() && ready == 0 && unacked == 0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "timed out: {} rows, queue {ready}/{unacked}\n{}",
            count_lines(&out),
            log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    signal(&child, libc::SIGTERM);
    let _ = wait_output(child, Duration::from_secs(30));
    let (got, lines) = centralflow_rows(&out);
    assert_eq!(lines, expected.len(), "each telemetry row exactly once across the kill");
    assert_same(&expected, &got, "run with a SIGKILL");
}
