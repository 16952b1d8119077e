//! The `central` sink against the in-repo IoT Central emulator (DPS + IoT Hub over HTTP on
//! loopback), running the real binary: exactly-once delivery across a graceful restart, with
//! and without injected 429/503, registration once per device, a wrong group key, blocked
//! devices, re-registration on 401/404, single messages, the shipped window pipeline; and MQTT
//! component telemetry against the local Mosquitto broker.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::iotc_emulator::*;
use common::*;
use serde_json::{json, Value};

const SCOPE: &str = "0ne00CF7E57";
const T: Duration = Duration::from_secs(180);

fn group_key() -> String {
    base64::engine::general_purpose::STANDARD.encode(b"centralflow test enrollment group key 01")
}

/// `rows` telemetry export messages for `devices` devices, a second apart, interleaved.
fn export_rows(path: &Path, rows: usize, devices: usize) -> Vec<Value> {
    let start = 1_793_491_200_000i64; // 2026-11-01T00:00:00Z in ms
    let mut out = Vec::with_capacity(rows);
    let mut text = String::new();
    for i in 0..rows {
        let t = start + i as i64 * 1000;
        let v = json!({
            "applicationId": "6e9d8f3c-0000-4000-8000-000000000001",
            "messageSource": "telemetry",
            "deviceId": format!("dev-{:04}", i % devices),
            "schema": "default@v1",
            "templateId": "dtmi:test:sensor;1",
            "enqueuedTime": centralflow::time::format_rfc3339(t * 1_000_000),
            "telemetry": {"temperature": 20.0 + (i % 97) as f64 / 4.0, "humidity": (i % 50) as i64, "status": "ok"},
            "enrichments": {},
        });
        text.push_str(&v.to_string());
        text.push('\n');
        out.push(v);
    }
    std::fs::write(path, text).unwrap();
    out
}

struct Setup {
    _dir: tempfile::TempDir,
    emu: IotcEmulator,
    pipeline: std::path::PathBuf,
}

fn env(s: &Setup, key: &str) -> Vec<(String, String)> {
    vec![
        ("IOTC_ID_SCOPE".into(), SCOPE.into()),
        ("IOTC_GROUP_KEY".into(), key.into()),
        ("DPS".into(), s.emu.dps_endpoint()),
    ]
}

/// A files → central pipeline; `extra` adds lines to the sink.
fn setup(rows: usize, devices: usize, extra: &str) -> (Setup, Vec<Value>) {
    let dir = tempfile::tempdir().unwrap();
    let emu = IotcEmulator::start_blocking(SCOPE, &group_key(), 2).unwrap();
    emu.set_registration_limit_per_minute(None);
    emu.set_dps_retry_after_secs(0);
    let input = dir.path().join("export.jsonl");
    let expected = export_rows(&input, rows, devices);
    let yaml = format!(
        "sources:\n  in:\n    type: files\n    url: {}\n    batch_size: 200\nsinks:\n  iotc:\n    type: central\n    inputs: [in]\n    id_scope: ${{IOTC_ID_SCOPE}}\n    group_key: ${{IOTC_GROUP_KEY}}\n    dps_endpoint: ${{DPS}}\n    creation_time: enqueuedTime\n    measurements: [temperature, humidity]\n    registrations_per_minute: 100000\n{extra}checkpoint:\n  url: {}\n  interval: 1s\n",
        input.display(),
        dir.path().join("state").display()
    );
    let pipeline = pipeline(dir.path(), "central.yaml", &yaml);
    (Setup { _dir: dir, emu, pipeline }, expected)
}

fn spawn(s: &Setup, mode: &str, key: &str) -> Child {
    let mut c = cmd(&[mode, s.pipeline.to_str().unwrap()]);
    for (k, v) in env(s, key) {
        c.env(k, v);
    }
    c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

/// Runs until at least `n` messages arrived, then stops it with SIGTERM (gracefully).
fn run_and_stop_after(s: &Setup, n: usize) -> String {
    let child = spawn(s, "run", &group_key());
    let got = s.emu.wait_for_messages_blocking(n, Duration::from_secs(120));
    assert!(got.len() >= n, "only {} messages arrived", got.len());
    signal(&child, libc::SIGTERM);
    ok(&wait_output(child, T))
}

/// What each export row must become.
fn expected_message(row: &Value) -> (String, String, Value) {
    let t = &row["telemetry"];
    (
        row["deviceId"].as_str().unwrap().to_string(),
        row["enqueuedTime"].as_str().unwrap().to_string(),
        json!({"temperature": t["temperature"], "humidity": t["humidity"]}),
    )
}

/// Every row arrived exactly once, with its body, headers and creation time.
fn assert_exactly_once(emu: &IotcEmulator, rows: &[Value], batch: bool) {
    let msgs = emu.messages();
    let ids: BTreeSet<&str> = msgs.iter().map(|m| m.message_id.as_deref().expect("a message id")).collect();
    assert_eq!(ids.len(), msgs.len(), "duplicate message ids: {} messages, {} ids", msgs.len(), ids.len());
    let mut got: BTreeMap<(String, String), Vec<Value>> = BTreeMap::new();
    for m in &msgs {
        assert_eq!(m.content_type.as_deref(), Some("application/json"));
        assert_eq!(m.content_encoding.as_deref(), Some("utf-8"));
        assert_eq!(m.app_properties.get("computed").map(String::as_str), Some("true"), "{m:?}");
        assert_eq!(m.in_batch, batch);
        assert_eq!(m.hub, emu.hub_for(&m.device_id), "sent to the hub DPS assigned");
        let created = m.creation_time_utc.clone().expect("a creation time");
        got.entry((m.device_id.clone(), created)).or_default().push(m.json());
    }
    let mut want: BTreeMap<(String, String), Vec<Value>> = BTreeMap::new();
    for r in rows {
        let (d, t, body) = expected_message(r);
        want.entry((d, t)).or_default().push(body);
    }
    let missing = want.keys().filter(|k| !got.contains_key(*k)).count();
    assert_eq!(missing, 0, "{missing} rows never arrived");
    assert_eq!(msgs.len(), rows.len(), "exactly one message per row");
    assert_eq!(got, want, "bodies and creation times");
}

#[test]
fn ten_thousand_rows_for_a_thousand_devices_arrive_exactly_once_across_a_restart() {
    let (s, rows) = setup(10_000, 1_000, "    rate_limit: 1000\n    queue: 1000\n    flush_timeout: 1s\n");
    let err = run_and_stop_after(&s, 2_000);
    let first = s.emu.messages().len();
    assert!(first < 10_000, "the first run was stopped mid-way ({first} sent)\n{err}");
    let regs_first = s.emu.registrations().len();
    // the second run resumes from the checkpoint and reads the file to its end
    let out = wait_output(spawn(&s, "run", &group_key()), T);
    let err2 = ok(&out);
    assert!(err2.contains("device registrations loaded from the cache"), "{err2}");
    assert_exactly_once(&s.emu, &rows, true);
    let regs = s.emu.registrations();
    assert_eq!(regs.len(), 1_000, "every device registered");
    assert!(regs.values().all(|n| *n == 1), "each device registered once, also across the restart: {regs:?}");
    assert!(regs_first > 0 && regs_first <= 1_000);
    let req = s.emu.requests();
    assert!(req.hub < 10_000, "batching: {} requests for 10,000 rows", req.hub);
}

#[test]
fn injected_429_and_503_on_a_tenth_of_requests_and_a_restart_lose_nothing() {
    // 1,000 rows held at 500 per second: the stop's final checkpoint cannot wait for them all
    let (s, rows) = setup(10_000, 1_000, "    rate_limit: 500\n    queue: 1000\n    flush_timeout: 1s\n");
    s.emu.inject(Fault::TooManyRequests { share: 0.05, retry_after_secs: 1 });
    s.emu.inject(Fault::Unavailable { share: 0.055 });
    let err1 = run_and_stop_after(&s, 2_000);
    assert!(s.emu.messages().len() < 10_000, "stopped mid-way");
    let err2 = ok(&wait_output(spawn(&s, "run", &group_key()), T));
    // the stop came while rows were waiting to be retried: they went into the final checkpoint
    assert!(err1.contains("rows not sent yet are kept in the checkpoint"), "{err1}");
    assert!(err2.contains("sending the rows the last checkpoint left unsent"), "{err2}");
    let req = s.emu.requests();
    let (n429, n503) = (req.by_status.get(&429).copied().unwrap_or(0), req.by_status.get(&503).copied().unwrap_or(0));
    assert!(n429 > 10 && n503 > 10, "faults were injected: {:?}", req.by_status);
    let share = (n429 + n503) as f64 / req.hub as f64;
    assert!(share > 0.07 && share < 0.14, "about a tenth of the hub requests failed: {share}");
    assert_exactly_once(&s.emu, &rows, true);
    assert!(s.emu.registrations().values().all(|n| *n == 1));
}

/// `Retry-After` on a 429 and on a 503 is waited for, measured between the refused requests at
/// the hub: one row of one device, so every hub request is that row's next try (the sink's own
/// backoff would try again after 200 ms).
#[test]
fn retry_after_on_429_and_503_is_honoured() {
    for (fault, code) in [
        (Fault::TooManyRequests { share: 1.0, retry_after_secs: 2 }, 429),
        (Fault::UnavailableRetryAfter { share: 1.0, retry_after_secs: 2 }, 503),
    ] {
        let (s, rows) = setup(1, 1, "    flush_timeout: 1s\n");
        s.emu.inject(fault);
        let child = spawn(&s, "run", &group_key());
        let refused =
            || s.emu.hub_answers().into_iter().filter(|(_, c)| *c == code).map(|(t, _)| t).collect::<Vec<_>>();
        wait_until(&format!("three {code} answers"), T, || refused().len() >= 3);
        s.emu.clear_faults();
        let err = ok(&wait_output(child, T));
        let times = refused();
        let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
        for g in &gaps {
            assert!(
                *g >= Duration::from_millis(1_900),
                "{code}: tried again after {g:?}, Retry-After said 2 s: {gaps:?}\n{err}"
            );
            assert!(*g < Duration::from_secs(6), "{code}: waited {g:?} for a Retry-After of 2 s: {gaps:?}");
        }
        assert_exactly_once(&s.emu, &rows, true);
    }
}

#[test]
fn a_wrong_group_key_is_one_clear_error_naming_scope_and_device() {
    let (s, _) = setup(200, 20, "");
    let wrong = base64::engine::general_purpose::STANDARD.encode(b"not the key of this enrollment group!!!");
    let out = wait_output(spawn(&s, "replay", &wrong), T);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{err}");
    let last = err.lines().rev().find(|l| l.starts_with("error:")).unwrap_or_default();
    assert!(last.contains(SCOPE) && last.contains("dev-0") && last.contains("group key"), "{err}");
    assert!(last.contains("401"), "{err}");
    let req = s.emu.requests();
    assert!(req.dps_register <= 2, "one registration and at most one retry, not a storm: {req:?}");
    assert_eq!(req.hub, 0);
    assert!(!err.contains(&wrong), "the key is not printed");
    assert!(err.matches("refused the credentials").count() <= 2, "{err}");
}

#[test]
fn a_blocked_device_is_dropped_with_an_error_and_the_others_go_on() {
    let (s, rows) = setup(300, 10, "");
    s.emu.block_device("dev-0003");
    let out = wait_output(spawn(&s, "replay", &group_key()), T);
    let err = ok(&out);
    assert!(err.contains("400209") && err.contains("dev-0003"), "{err}");
    let lines = err.lines().filter(|l| l.contains("400209")).count();
    assert!(lines <= 3, "logged once per device, not per row:\n{err}");
    let others: Vec<Value> = rows.into_iter().filter(|r| r["deviceId"] != "dev-0003").collect();
    assert_exactly_once(&s.emu, &others, true);
    assert!(err.contains("dropped"), "{err}");
}

#[test]
fn single_messages_and_registering_again_after_401_and_404() {
    let (s, rows) = setup(200, 10, "    transport: https\n    rate_limit: 1000\n");
    s.emu.inject(Fault::UnauthorizedOnce { device: "dev-0001".into() });
    s.emu.inject(Fault::DeviceNotFoundOnce { device: "dev-0002".into() });
    ok(&wait_output(spawn(&s, "replay", &group_key()), T));
    assert_exactly_once(&s.emu, &rows, false);
    let regs = s.emu.registrations();
    assert_eq!(regs["dev-0001"], 2, "401 re-derives the key and registers again");
    assert_eq!(regs["dev-0002"], 2, "device not found registers again");
    assert_eq!(regs["dev-0003"], 1);
    assert_eq!(s.emu.requests().hub, 202, "one request per message, plus the two refused");
}

#[test]
fn the_shipped_window_pipeline_posts_five_minute_aggregates() {
    let dir = tempfile::tempdir().unwrap();
    let emu = IotcEmulator::start_blocking(SCOPE, &group_key(), 2).unwrap();
    let input = dir.path().join("export.jsonl");
    // 10 devices, one message a second for 20 minutes: 4 windows per device
    let rows = export_rows(&input, 1_200, 10);
    let state = dir.path().join("state");
    let envs = [
        ("CENTRALFLOW_INPUT", input.to_str().unwrap().to_string()),
        ("IOTC_ID_SCOPE", SCOPE.to_string()),
        ("IOTC_GROUP_KEY", group_key()),
        ("CENTRALFLOW_DPS_ENDPOINT", emu.dps_endpoint()),
        ("CENTRALFLOW_STATE", state.to_str().unwrap().to_string()),
    ];
    let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = run(&["replay", "--no-progress", "pipelines/window-to-central.yaml"], &envs, T);
    ok(&out);
    // expected: per device and 5-minute window on enqueuedTime, count and average temperature
    let mut want: BTreeMap<(String, i64), (u64, f64)> = BTreeMap::new();
    for r in &rows {
        let t = centralflow::time::parse_rfc3339(r["enqueuedTime"].as_str().unwrap()).unwrap();
        let w = t.div_euclid(300_000_000_000) * 300_000_000_000;
        let e = want.entry((r["deviceId"].as_str().unwrap().to_string(), w)).or_default();
        e.0 += 1;
        e.1 += r["telemetry"]["temperature"].as_f64().unwrap();
    }
    let msgs = emu.messages();
    assert_eq!(msgs.len(), want.len(), "one message per device and window");
    for m in &msgs {
        let end = centralflow::time::parse_rfc3339(m.creation_time_utc.as_deref().unwrap()).unwrap();
        let (count, sum) = want[&(m.device_id.clone(), end - 300_000_000_000)];
        let body = m.json();
        assert_eq!(body["count"], count, "{body}");
        assert!((body["temperature_avg"].as_f64().unwrap() - sum / count as f64).abs() < 1e-9, "{body}");
        assert_eq!(body.as_object().unwrap().len(), 2, "only the measurements: {body}");
        assert_eq!(m.app_properties["computed"], "true");
    }
    assert!(emu.registrations().values().all(|n| *n == 1));
}

#[test]
fn component_telemetry_over_mqtt_reaches_the_broker_with_its_property_bag() {
    use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
    let dir = tempfile::tempdir().unwrap();
    let emu = IotcEmulator::start_blocking(SCOPE, &group_key(), 1).unwrap();
    emu.set_dps_retry_after_secs(0);
    let input = dir.path().join("export.jsonl");
    let rows = export_rows(&input, 20, 2);
    // subscribe first (Mosquitto on 127.0.0.1:1883 stands in for the hub's MQTT endpoint)
    let mut opts = MqttOptions::new(format!("cf-test-{}", std::process::id()), "127.0.0.1", 1883);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut conn) = Client::new(opts, 10);
    client.subscribe("devices/+/messages/events/#", QoS::AtLeastOnce).unwrap();
    let mut subscribed = false;
    for ev in conn.iter() {
        if let Ok(Event::Incoming(Packet::SubAck(_))) = ev {
            subscribed = true;
            break;
        }
        ev.expect("Mosquitto on 127.0.0.1:1883");
    }
    assert!(subscribed);
    let yaml = format!(
        "sources:\n  in:\n    type: files\n    url: {}\nsinks:\n  iotc:\n    type: central\n    inputs: [in]\n    id_scope: ${{IOTC_ID_SCOPE}}\n    group_key: ${{IOTC_GROUP_KEY}}\n    dps_endpoint: ${{DPS}}\n    transport: mqtt\n    mqtt_port: 1883\n    component: thermostat1\n    model_id: dtmi:test:sensor;1\n    creation_time: enqueuedTime\n    measurements: [temperature, humidity]\n",
        input.display()
    );
    let p = pipeline(dir.path(), "mqtt.yaml", &yaml);
    let out = run(
        &["replay", "--no-progress", p.to_str().unwrap()],
        &[("IOTC_ID_SCOPE", SCOPE), ("IOTC_GROUP_KEY", &group_key()), ("DPS", &emu.dps_endpoint())],
        T,
    );
    ok(&out);
    let mut got = Vec::new();
    let end = Instant::now() + Duration::from_secs(20);
    while got.len() < rows.len() && Instant::now() < end {
        match conn.recv_timeout(Duration::from_millis(500)) {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => got.push(p),
            Ok(Err(e)) => panic!("subscriber: {e}"),
            _ => {}
        }
    }
    assert_eq!(got.len(), rows.len(), "every row was published");
    let mut seen = BTreeSet::new();
    for p in &got {
        let (prefix, bag) = p.topic.split_once("/messages/events/").expect("an events topic");
        let device = prefix.strip_prefix("devices/").unwrap();
        let bag: BTreeMap<String, String> = url::form_urlencoded::parse(bag.as_bytes()).into_owned().collect();
        assert_eq!(bag["$.sub"], "thermostat1", "{}", p.topic);
        assert_eq!(bag["$.ct"], "application/json");
        assert_eq!(bag["$.ce"], "utf-8");
        assert_eq!(bag["computed"], "true");
        assert_eq!(bag["$.mid"].len(), 32);
        let row = rows
            .iter()
            .find(|r| r["deviceId"] == device && r["enqueuedTime"] == bag["iothub-creation-time-utc"].as_str())
            .unwrap_or_else(|| panic!("no row for {}", p.topic));
        let body: Value = serde_json::from_slice(&p.payload).unwrap();
        assert_eq!(body, expected_message(row).2);
        assert!(seen.insert(bag["$.mid"].clone()), "published once");
    }
    assert_eq!(emu.model_ids().values().collect::<BTreeSet<_>>(), BTreeSet::from([&"dtmi:test:sensor;1".to_string()]));
    assert_eq!(emu.requests().hub, 0, "nothing went over HTTPS");
}

/// The central sink's pipeline over the files source, for the TLS tests.
fn tls_pipeline(input: &Path, sink_extra: &str) -> String {
    format!(
        "sources:\n  in:\n    type: files\n    url: {}\nsinks:\n  iotc:\n    type: central\n    inputs: [in]\n    id_scope: ${{IOTC_ID_SCOPE}}\n    group_key: ${{IOTC_GROUP_KEY}}\n    dps_endpoint: ${{DPS}}\n    creation_time: enqueuedTime\n    measurements: [temperature, humidity]\n{sink_extra}",
        input.display()
    )
}

fn tls_env(emu: &IotcEmulator) -> Vec<(String, String)> {
    vec![
        ("IOTC_ID_SCOPE".into(), SCOPE.into()),
        ("IOTC_GROUP_KEY".into(), group_key()),
        ("DPS".into(), emu.dps_endpoint()),
    ]
}

/// HTTPS to DPS and to the hub DPS assigns, trusting a throwaway CA given as `ca_file`; without
/// it the same endpoints are refused for their certificate (the client verifies it).
#[test]
fn https_to_dps_and_the_hub_trusts_the_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::tls::TestCa::new(dir.path());
    let emu = IotcEmulator::start_tls_blocking(SCOPE, &group_key(), 2, ca.server_config()).unwrap();
    emu.set_registration_limit_per_minute(None);
    emu.set_dps_retry_after_secs(0);
    assert!(emu.dps_endpoint().starts_with("https://127.0.0.1:"), "{}", emu.dps_endpoint());
    let input = dir.path().join("export.jsonl");
    let rows = export_rows(&input, 60, 6);
    let env = tls_env(&emu);

    // no ca_file: the throwaway CA is not among the usual roots
    let p = pipeline(dir.path(), "no-ca.yaml", &tls_pipeline(&input, ""));
    let mut c = cmd(&["run", p.to_str().unwrap()]);
    c.envs(env.iter().map(|(k, v)| (k, v)));
    let untrusted = Logged::spawn(c);
    wait_until("the certificate is refused", T, || untrusted.text().to_lowercase().contains("certificate"));
    let log = untrusted.text();
    signal(&untrusted.child, libc::SIGKILL);
    let _ = untrusted.finish(T);
    assert!(emu.registrations().is_empty() && emu.messages().is_empty(), "nothing got through:\n{log}");

    // with it: every row arrives, over TLS to DPS and to the hubs
    let ca_line = format!("    ca_file: {}\n", ca.ca.display());
    let p = pipeline(dir.path(), "ca.yaml", &tls_pipeline(&input, &ca_line));
    ok(&run(&["replay", "--no-progress", p.to_str().unwrap()], &env_refs(&env), T));
    assert_exactly_once(&emu, &rows, true);
    assert!(emu.requests().hub > 0 && emu.registrations().len() == 6);
}

/// Component telemetry over MQTT with TLS on 8883 (Mosquitto with the throwaway CA's server
/// certificate stands in for the hub's MQTT endpoint; DPS over HTTPS with the same CA).
#[test]
fn component_telemetry_over_mqtt_with_tls_on_8883() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let ca = common::tls::TestCa::new(dir.path());
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            // `user root`: as root Mosquitto would otherwise switch to its own user, which cannot
            // read the key in the test's private folder
            "user root\nlistener 8883 127.0.0.1\nallow_anonymous true\ncafile {}\ncertfile {}\nkeyfile {}\n",
            ca.ca.display(),
            ca.cert.display(),
            ca.key.display()
        ),
    )
    .unwrap();
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut broker = Kill(
        std::process::Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("mosquitto.log")).unwrap())
            .spawn()
            .expect("mosquitto"),
    );
    wait_until("Mosquitto runs with TLS on 127.0.0.1:8883", Duration::from_secs(30), || {
        let log = std::fs::read_to_string(dir.path().join("mosquitto.log")).unwrap_or_default();
        assert!(broker.0.try_wait().unwrap().is_none(), "mosquitto exited (is 8883 taken?):\n{log}");
        log.contains(" running")
    });
    let input = dir.path().join("export.jsonl");
    let rows = export_rows(&input, 20, 2);
    // a subscriber over TLS, trusting the CA; `-d` says when the subscription is in place
    // (line-buffered: its output is a pipe)
    let mut sub = Kill(
        std::process::Command::new("stdbuf")
            .args(["-oL", "mosquitto_sub", "-h", "127.0.0.1", "-p", "8883", "--cafile"])
            .arg(&ca.ca)
            .args(["-t", "devices/+/messages/events/#", "-v", "-d", "-W", "120"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto_sub"),
    );
    let lines: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
    let out = sub.0.stdout.take().unwrap();
    let sink = lines.clone();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(l);
        }
    });
    wait_until("the subscriber is subscribed", Duration::from_secs(30), || {
        lines.lock().unwrap().iter().any(|l| l.contains("SUBACK"))
    });
    let emu = IotcEmulator::start_tls_blocking(SCOPE, &group_key(), 1, ca.server_config()).unwrap();
    emu.set_dps_retry_after_secs(0);
    let extra = format!(
        "    transport: mqtt\n    mqtt_port: 8883\n    component: thermostat1\n    ca_file: {}\n",
        ca.ca.display()
    );
    let p = pipeline(dir.path(), "mqtt-tls.yaml", &tls_pipeline(&input, &extra));
    ok(&run(&["replay", "--no-progress", p.to_str().unwrap()], &env_refs(&tls_env(&emu)), T));
    let published = || lines.lock().unwrap().iter().filter(|l| l.starts_with("devices/")).cloned().collect::<Vec<_>>();
    wait_until("every row published", Duration::from_secs(60), || published().len() >= rows.len());
    let got = published();
    assert_eq!(got.len(), rows.len(), "{got:#?}");
    for l in &got {
        let (topic, body) = l.split_once(' ').unwrap();
        assert!(topic.contains("$.sub=thermostat1"), "{topic}");
        let body: Value = serde_json::from_str(body).unwrap();
        assert!(rows.iter().any(|r| expected_message(r).2 == body), "{body}");
    }
    assert_eq!(emu.requests().hub, 0, "nothing went over HTTPS to the hub");
    let _ = broker.0.kill();
}
