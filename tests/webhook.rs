//! The `webhook` source, running the real binary: tokens, bad bodies (dead letters with
//! reasons), answers only after the covering checkpoint, 503 when full, TLS, `replay` refused;
//! and end to end: POSTs → the shipped compute-after-export and device-bridge pipelines → the
//! IoT Central emulator.

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use common::iotc_emulator::*;
use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

const TOKEN: &str = "webhook-test-token-1234";
const SCOPE: &str = "0ne00WEBH00";
const T: Duration = Duration::from_secs(120);

/// Starts `centralflow run` on a pipeline whose webhook listens on port 0, and reads the port it
/// bound from its log (no port is picked, released and bound again later by someone else).
fn start(yaml: &std::path::Path, env: &[(&str, &str)]) -> (Logged, u16) {
    let mut c = cmd(&["run", yaml.to_str().unwrap()]);
    for (k, v) in env {
        c.env(k, v);
    }
    let mut run = Logged::spawn(c);
    let line = run.wait_for("webhook listening on ", Duration::from_secs(60));
    let addr = line.split("://").nth(1).unwrap();
    let port = addr.split(['/', ' ']).next().unwrap().rsplit(':').next().unwrap().parse().unwrap();
    (run, port)
}

fn stop(run: Logged) -> String {
    run.stop(T)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build().unwrap()
}

async fn post(
    url: &str,
    auth: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> (StatusCode, reqwest::header::HeaderMap, String) {
    let mut rb = client().post(url).header("content-type", "application/json").body(body);
    if let Some(a) = auth {
        rb = rb.header("authorization", a);
    }
    let r = rb.send().await.expect("the webhook answers");
    let (s, h) = (r.status(), r.headers().clone());
    (s, h, r.text().await.unwrap_or_default())
}

fn export_message(device: &str, time: &str, telemetry: Value) -> Value {
    json!({
        "applicationId": "1dffa667-9bee-4f16-b243-25ad4151475e",
        "messageSource": "telemetry",
        "deviceId": device,
        "schema": "default@v1",
        "templateId": "dtmi:computeModel:compute;1",
        "enqueuedTime": time,
        "telemetry": telemetry,
        "enrichments": {},
    })
}

fn jsonl(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn webhook_to_files(dir: &std::path::Path, port: u16, extra_source: &str, extra_sink: &str) -> std::path::PathBuf {
    pipeline(
        dir,
        "webhook.yaml",
        &format!(
            "sources:\n  hook:\n    type: webhook\n    address: 127.0.0.1:{port}\n    token: ${{TOKEN}}\n{extra_source}sinks:\n  out:\n    type: jsonl\n    inputs: [hook]\n    path: {}\n{extra_sink}  rejected:\n    type: jsonl\n    inputs: [hook.dead_letter]\n    path: {}\ncheckpoint:\n  interval: 30s\n",
            dir.join("out.jsonl").display(),
            dir.join("dead.jsonl").display()
        ),
    )
}

#[test]
fn bad_tokens_and_bad_bodies_are_refused_and_dead_lettered_good_ones_answered_after_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let port = 0; // the webhook binds a free port: `start` reads it from the log
    let p = webhook_to_files(dir.path(), port, "", "");
    let (child, port) = start(&p, &[("TOKEN", TOKEN)]);
    let url = format!("http://127.0.0.1:{port}/");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let good = export_message("dev-1", "2026-11-01T00:00:00.000Z", json!({"temp": 21.5})).to_string();
    rt.block_on(async {
        assert_eq!(post(&url, None, good.clone()).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(post(&url, Some("wrong-token-but-long"), good.clone()).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(post(&url, Some(&format!("{TOKEN}x")), good.clone()).await.0, StatusCode::UNAUTHORIZED);
        let big = format!("{{\"messageSource\":\"telemetry\",\"pad\":\"{}\"}}", "x".repeat(300 * 1024));
        let (s, _, text) = post(&url, Some(TOKEN), big).await;
        assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{text}");
        let (s, _, text) = post(&url, Some(TOKEN), "{\"messageSource\": \"telemetry\", ").await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{text}");
        let bridge_bad = json!({"device": {"deviceId": "bad id!"}, "measurements": {"t": 1}}).to_string();
        let (s, _, text) = post(&url, Some(TOKEN), bridge_bad).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{text}");
        assert!(text.contains("deviceId"), "{text}");
        // a good message is answered once a checkpoint covers it: asked for at once, not after 30 s
        let t0 = Instant::now();
        let (s, _, text) = post(&url, Some(TOKEN), good.clone()).await;
        assert_eq!(s, StatusCode::OK, "{text}");
        assert!(t0.elapsed() < Duration::from_secs(10), "answered after {:?}", t0.elapsed());
        assert_eq!(text, "{\"accepted\":1}");
        let bridge = json!({"device": {"deviceId": "my-cloud-device"}, "measurements": {"temp": 20.31}, "timestamp": "2020-06-08T20:16:54.602Z"});
        let (s, _, _) = post(&url, Some(&format!("Bearer {TOKEN}")), bridge.to_string()).await;
        assert_eq!(s, StatusCode::OK);
        let r = client().get(&url).header("authorization", TOKEN).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    });
    let err = stop(child);
    assert!(!err.contains(TOKEN), "the token is never printed");
    let out = jsonl(&dir.path().join("out.jsonl"));
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!(out[0]["deviceId"], "dev-1");
    assert_eq!(out[1]["messageSource"], "telemetry");
    assert_eq!(out[1]["deviceId"], "my-cloud-device");
    assert_eq!(out[1]["enqueuedTime"], "2020-06-08T20:16:54.602Z");
    assert_eq!(out[1]["telemetry"]["temp"], 20.31);
    let dead = jsonl(&dir.path().join("dead.jsonl"));
    let reasons: Vec<&str> = dead.iter().map(|d| d["reason"].as_str().unwrap()).collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(reasons[0].contains("262144"), "{reasons:?}");
    assert!(reasons[1].contains("malformed") || reasons[1].contains("JSON"), "{reasons:?}");
    assert!(reasons[2].contains("deviceId"), "{reasons:?}");
    assert!(dead.iter().all(|d| d["origin"].as_str().unwrap().starts_with("webhook 127.0.0.1:")));
}

/// A refused body is answered once a durable checkpoint holds its dead letter: the sender does
/// not send it again, so a kill right after the answer must not lose the record. (Answered as
/// soon as the record was queued, it waited for the 30 s checkpoint and the kill lost it.)
#[test]
fn a_refused_body_is_answered_once_its_dead_letter_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "sources:\n  hook:\n    type: webhook\n    address: 127.0.0.1:0\n    token: ${{TOKEN}}\nsinks:\n  out:\n    type: jsonl\n    inputs: [hook]\n    path: {}\n  rejected:\n    type: jsonl\n    inputs: [hook.dead_letter]\n    path: {}\ncheckpoint:\n  url: {}\n  interval: 30s\n",
        dir.path().join("out.jsonl").display(),
        dir.path().join("dead.jsonl").display(),
        dir.path().join("state").display()
    );
    let p = pipeline(dir.path(), "refused.yaml", &yaml);
    let (run, port) = start(&p, &[("TOKEN", TOKEN)]);
    let url = format!("http://127.0.0.1:{port}/");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let t0 = Instant::now();
    let (s, _, text) = rt.block_on(post(&url, Some(TOKEN), "{\"messageSource\": \"telemetry\", "));
    assert_eq!(s, StatusCode::BAD_REQUEST, "{text}");
    assert!(t0.elapsed() < Duration::from_secs(10), "a checkpoint is asked for at once: {:?}", t0.elapsed());
    signal(&run.child, libc::SIGKILL);
    let _ = run.finish(T);
    let (run, _) = start(&p, &[("TOKEN", TOKEN)]);
    stop(run);
    let dead = jsonl(&dir.path().join("dead.jsonl"));
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0]["payload"].as_str().unwrap().starts_with("{\"messageSource\""), "{dead:?}");
}

#[test]
fn a_full_queue_answers_503_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let port = 0; // the webhook binds a free port: `start` reads it from the log
                  // one request at a time; the sink takes 2 s per event, so the first is held that long
    let p = webhook_to_files(dir.path(), port, "    queue: 1\n    retry_after: 3\n", "    rate_limit: 0.5\n");
    let (mut child, port) = start(&p, &[("TOKEN", TOKEN)]);
    let api = child.api();
    let url = format!("http://127.0.0.1:{port}/");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let first = tokio::spawn({
            let url = url.clone();
            async move {
                post(&url, Some(TOKEN), export_message("d", "2026-11-01T00:00:00Z", json!({"t": 1})).to_string()).await
            }
        });
        // the first request holds the one slot once its body has been read
        let api2 = api.clone();
        tokio::task::spawn_blocking(move || {
            wait_until("the first request is read", T, || {
                metric_value(&api2, "centralflow_bytes_in_total", "component=\"hook\"").is_some_and(|b| b > 0.0)
            })
        })
        .await
        .unwrap();
        let (s, h, _) =
            post(&url, Some(TOKEN), export_message("d", "2026-11-01T00:00:01Z", json!({"t": 2})).to_string()).await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(h.get("retry-after").and_then(|v| v.to_str().ok()), Some("3"));
        assert_eq!(first.await.unwrap().0, StatusCode::OK);
    });
    stop(child);
    assert_eq!(jsonl(&dir.path().join("out.jsonl")).len(), 1, "the refused request was not taken");
}

#[test]
fn replay_refuses_a_webhook_source() {
    let dir = tempfile::tempdir().unwrap();
    let p = webhook_to_files(dir.path(), 0, "", "");
    let out = run(&["replay", "--no-progress", p.to_str().unwrap()], &[("TOKEN", TOKEN)], T);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("never ends"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn tls_with_a_certificate_and_key_from_files() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let (ca, ca_key) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
    let ext = dir.path().join("leaf.ext");
    std::fs::write(&ext, "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n").unwrap();
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl").args(args).current_dir(dir.path()).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    // a test CA, and a certificate for 127.0.0.1 that it signs
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &["-days", "1", "-subj", "/CN=centralflow test CA", "-keyout", "ca.key", "-out", "ca.pem"],
        ]
        .concat(),
    );
    openssl(
        &[&["req", "-new"][..], &ec, &["-subj", "/CN=localhost", "-keyout", "key.pem", "-out", "leaf.csr"]].concat(),
    );
    openssl(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "leaf.ext",
        "-out",
        "cert.pem",
    ]);
    let _ = ca_key;
    let port = 0; // the webhook binds a free port: `start` reads it from the log
    let tls = format!("    tls:\n      cert_file: {}\n      key_file: {}\n", cert.display(), key.display());
    let p = webhook_to_files(dir.path(), port, &tls, "");
    let (child, port) = start(&p, &[("TOKEN", TOKEN)]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ca = reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap();
        let c = reqwest::Client::builder().no_proxy().tls_certs_only([ca]).build().unwrap();
        let body = export_message("tls-dev", "2026-11-01T00:00:00Z", json!({"t": 1})).to_string();
        let r = c
            .post(format!("https://127.0.0.1:{port}/"))
            .header("authorization", TOKEN)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        // plain HTTP to the TLS port does not get through
        let plain =
            client().post(format!("http://127.0.0.1:{port}/")).header("authorization", TOKEN).body(body).send().await;
        assert!(plain.is_err() || plain.unwrap().status() != StatusCode::OK);
    });
    stop(child);
    assert_eq!(jsonl(&dir.path().join("out.jsonl")).len(), 1);
}

fn group_key() -> String {
    base64::engine::general_purpose::STANDARD.encode(b"webhook test group key, forty bytes long")
}

fn shipped_env(emu: &IotcEmulator, port: u16, state: &std::path::Path) -> Vec<(String, String)> {
    vec![
        ("CENTRALFLOW_WEBHOOK_ADDRESS".into(), format!("127.0.0.1:{port}")),
        ("CENTRALFLOW_WEBHOOK_TOKEN".into(), TOKEN.into()),
        ("IOTC_ID_SCOPE".into(), SCOPE.into()),
        ("IOTC_GROUP_KEY".into(), group_key()),
        ("CENTRALFLOW_DPS_ENDPOINT".into(), emu.dps_endpoint()),
        ("CENTRALFLOW_STATE".into(), state.to_str().unwrap().into()),
    ]
}

#[test]
fn end_to_end_posts_through_compute_after_export_reach_iot_central() {
    let dir = tempfile::tempdir().unwrap();
    let emu = IotcEmulator::start_blocking(SCOPE, &group_key(), 2).unwrap();
    emu.set_dps_retry_after_secs(0);
    let port = 0; // the webhook binds a free port: `start` reads it from the log
    let env = shipped_env(&emu, port, &dir.path().join("state"));
    let (child, port) = start(&root().join("pipelines/compute-after-export.yaml"), &env_refs(&env));
    let url = format!("http://127.0.0.1:{port}/");
    // the sample device's CSV telemetry, and one computed message coming back around
    let inputs = [
        ("cmp-1", "2026-11-01T10:00:00.100Z", "21.5, 60, 47.6, -122.3"),
        ("cmp-2", "2026-11-01T10:00:01.200Z", "-4, 81.5, 51.5, -0.12"),
        ("cmp-1", "2026-11-01T10:00:05.300Z", "22, 59, 47.6, -122.3"),
    ];
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for (d, t, data) in inputs {
            let body = export_message(d, t, json!({"data": data})).to_string();
            let url = url.clone();
            tasks.push(tokio::spawn(async move { post(&url, Some(TOKEN), body).await }));
        }
        let mut looped = export_message("cmp-1", "2026-11-01T10:00:09Z", json!({"temp": 99.0}));
        looped["messageProperties"] = json!({"computed": "true"});
        tasks.push(tokio::spawn({
            let url = url.clone();
            async move { post(&url, Some(TOKEN), looped.to_string()).await }
        }));
        for t in tasks {
            let (s, _, text) = t.await.unwrap();
            assert_eq!(s, StatusCode::OK, "{text}");
        }
    });
    // answered 2xx only after the checkpoint, which waits for the sink: the messages are there
    let msgs = emu.messages();
    stop(child);
    assert_eq!(msgs.len(), 3, "{msgs:?}");
    let want = [
        ("cmp-1", "2026-11-01T10:00:00.100Z", json!({"temp": 70.7, "humidity": 60.0, "lat": 47.6, "lon": -122.3})),
        ("cmp-2", "2026-11-01T10:00:01.200Z", json!({"temp": 24.8, "humidity": 81.5, "lat": 51.5, "lon": -0.12})),
        ("cmp-1", "2026-11-01T10:00:05.300Z", json!({"temp": 71.6, "humidity": 59.0, "lat": 47.6, "lon": -122.3})),
    ];
    for (d, t, body) in want {
        let m = msgs
            .iter()
            .find(|m| m.device_id == d && m.creation_time_utc.as_deref() == Some(t))
            .unwrap_or_else(|| panic!("nothing for {d} at {t}: {msgs:?}"));
        assert_eq!(m.json(), body);
        assert_eq!(m.app_properties["computed"], "true");
    }
    assert_eq!(emu.registrations().len(), 2);
}

#[test]
fn end_to_end_the_device_bridge_replacement_sends_measurements_as_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let emu = IotcEmulator::start_blocking(SCOPE, &group_key(), 1).unwrap();
    emu.set_dps_retry_after_secs(0);
    let port = 0; // the webhook binds a free port: `start` reads it from the log
    let env = shipped_env(&emu, port, &dir.path().join("state"));
    let (child, port) = start(&root().join("pipelines/device-bridge.yaml"), &env_refs(&env));
    let url = format!("http://127.0.0.1:{port}/");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let reqs = [
            json!({"device": {"deviceId": "bridge-dev", "modelId": "dtmi:bridge:sensor;1"}, "measurements": {"temp": 20.31, "ledColor": "blue"}, "timestamp": "2020-06-08T20:16:54.602Z"}),
            json!({"device": {"deviceId": "bridge-dev"}, "measurements": {"temp": 20.5}, "timestamp": "2020-06-08T20:17:54.602Z"}),
        ];
        for r in reqs {
            let (s, _, text) = post(&url, Some(TOKEN), r.to_string()).await;
            assert_eq!(s, StatusCode::OK, "{text}");
        }
    });
    let msgs = emu.messages();
    stop(child);
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    assert_eq!(msgs[0].json(), json!({"temp": 20.31, "ledColor": "blue"}));
    assert_eq!(msgs[0].creation_time_utc.as_deref(), Some("2020-06-08T20:16:54.602Z"));
    assert_eq!(msgs[1].json(), json!({"temp": 20.5}));
    assert!(!msgs[0].app_properties.contains_key("computed"), "device data is not marked computed");
    assert_eq!(emu.model_ids().get("bridge-dev").map(String::as_str), Some("dtmi:bridge:sensor;1"));
    assert_eq!(emu.registrations()["bridge-dev"], 1);
}

#[test]
fn every_request_answered_200_is_in_the_output_even_when_the_pipeline_stops_under_load() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let dir = tempfile::tempdir().unwrap();
    let port = 0; // the webhook binds a free port: `start` reads it from the log
    let p = pipeline(
        dir.path(),
        "stop.yaml",
        &format!(
            "sources:\n  hook:\n    type: webhook\n    address: 127.0.0.1:{port}\n    token: ${{TOKEN}}\nsinks:\n  out:\n    type: jsonl\n    inputs: [hook]\n    path: {}\ncheckpoint:\n  url: {}\n  interval: 30s\n",
            dir.path().join("out.jsonl").display(),
            dir.path().join("state").display()
        ),
    );
    let (child, port) = start(&p, &[("TOKEN", TOKEN)]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let answers: Arc<Mutex<Vec<(u64, u16)>>> = Arc::default();
    let url = format!("http://127.0.0.1:{port}/");
    let mut tasks = Vec::new();
    for w in 0..4u64 {
        let (done, answers, url) = (done.clone(), answers.clone(), url.clone());
        tasks.push(rt.spawn(async move {
            let c = client();
            let mut i = 0u64;
            while !done.load(Ordering::Relaxed) {
                let n = w * 1_000_000 + i;
                i += 1;
                let body = export_message("load", "2026-11-01T00:00:00Z", json!({"n": n})).to_string();
                let status = match c.post(&url).header("authorization", TOKEN).body(body).send().await {
                    Ok(r) => r.status().as_u16(),
                    Err(_) => 0,
                };
                answers.lock().unwrap().push((n, status));
                if status == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }
    // stop under load: once requests have been answered, while more keep coming
    wait_until("20 requests answered 200", T, || {
        answers.lock().unwrap().iter().filter(|(_, s)| *s == 200).count() >= 20
    });
    stop(child); // a graceful stop: asserts success
    done.store(true, Ordering::Relaxed);
    for t in tasks {
        rt.block_on(t).unwrap();
    }
    let written: std::collections::BTreeSet<u64> =
        jsonl(&dir.path().join("out.jsonl")).iter().map(|v| v["telemetry"]["n"].as_u64().unwrap()).collect();
    let answers = answers.lock().unwrap();
    let accepted: Vec<u64> = answers.iter().filter(|(_, s)| *s == 200).map(|(n, _)| *n).collect();
    assert!(accepted.len() >= 20, "requests went through before the stop: {}", accepted.len());
    let lost: Vec<&u64> = accepted.iter().filter(|n| !written.contains(n)).collect();
    assert!(lost.is_empty(), "answered 200 but not written: {lost:?}");
    assert!(answers.iter().any(|(_, s)| *s != 200), "some requests came after the stop and were refused");
}
