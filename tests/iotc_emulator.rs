//! Proof that the IoT Central emulator behaves like DPS + IoT Hub, using reqwest and signing
//! helpers written here independently of the emulator's verification code.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use common::iotc_emulator::*;
use hmac::{Hmac, Mac};
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use sha2::Sha256;

const SCOPE: &str = "0ne00ABCDEF";
const API: &str = "api-version=2021-04-12";
const DPS_API: &str = "api-version=2019-03-31";

fn group_key() -> String {
    B64.encode(b"centralflow enrollment group key, 40 b.")
}

// ---- signing helpers (the client side, written from the Azure docs) ----

fn hmac_b64(key_b64: &str, msg: &str) -> String {
    let key = B64.decode(key_b64).unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(msg.as_bytes());
    B64.encode(mac.finalize().into_bytes())
}

/// deviceKey = base64(HMAC-SHA256(base64decode(groupKey), deviceId)).
fn derive(group_b64: &str, id: &str) -> String {
    hmac_b64(group_b64, id)
}

/// encodeURIComponent.
fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.!~*'()".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// `SharedAccessSignature sr={sr}&sig={enc(sig)}&se={se}[&skn={skn}]`, signing `sr + "\n" + se`.
fn token(sr_encoded: &str, key_b64: &str, se: u64, skn: Option<&str>) -> String {
    let sig = hmac_b64(key_b64, &format!("{sr_encoded}\n{se}"));
    let mut t = format!("SharedAccessSignature sr={sr_encoded}&sig={}&se={se}", enc(&sig));
    if let Some(k) = skn {
        t.push_str(&format!("&skn={k}"));
    }
    t
}

fn dps_token(id: &str) -> String {
    token(&enc(&format!("{SCOPE}/registrations/{id}")), &derive(&group_key(), id), now() + 3600, Some("registration"))
}

fn hub_token(hub: &str, id: &str) -> String {
    token(&enc(&format!("{hub}/devices/{id}")), &derive(&group_key(), id), now() + 3600, None)
}

fn client() -> Client {
    Client::builder().timeout(Duration::from_secs(10)).no_proxy().build().unwrap()
}

async fn start(hubs: usize) -> IotcEmulator {
    IotcEmulator::start(SCOPE, &group_key(), hubs).await.unwrap()
}

async fn put_register(c: &Client, emu: &IotcEmulator, id: &str, auth: &str, body: &Value) -> reqwest::Response {
    c.put(format!("{}/{SCOPE}/registrations/{}/register?{DPS_API}", emu.dps_endpoint(), enc(id)))
        .header("Authorization", auth)
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn get_op(c: &Client, emu: &IotcEmulator, id: &str, op: &str) -> reqwest::Response {
    c.get(format!("{}/{SCOPE}/registrations/{}/operations/{op}?{DPS_API}", emu.dps_endpoint(), enc(id)))
        .header("Authorization", dps_token(id))
        .send()
        .await
        .unwrap()
}

/// Registers like the device bridge (PUT, then poll up to 10 times); returns the final JSON.
async fn register(c: &Client, emu: &IotcEmulator, id: &str) -> Value {
    let r = put_register(c, emu, id, &dps_token(id), &json!({"registrationId": id})).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let op = r.json::<Value>().await.unwrap()["operationId"].as_str().unwrap().to_string();
    for _ in 0..10 {
        let v: Value = get_op(c, emu, id, &op).await.json().await.unwrap();
        if v["status"] != "assigning" {
            return v;
        }
    }
    panic!("still assigning after 10 polls");
}

async fn register_ok(c: &Client, emu: &IotcEmulator, id: &str) -> String {
    let v = register(c, emu, id).await;
    assert_eq!(v["status"], "assigned", "{v}");
    v["registrationState"]["assignedHub"].as_str().unwrap().to_string()
}

async fn post(
    c: &Client,
    hub: &str,
    id: &str,
    auth: Option<&str>,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> reqwest::Response {
    let mut rb = c.post(format!("http://{hub}/devices/{}/messages/events?{API}", enc(id)));
    if let Some(a) = auth {
        rb = rb.header("Authorization", a);
    }
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    rb.body(body).send().await.unwrap()
}

async fn post_simple(c: &Client, hub: &str, id: &str) -> reqwest::Response {
    post(c, hub, id, Some(&hub_token(hub, id)), &[], b"{\"t\":1}".to_vec()).await
}

async fn error_code(r: reqwest::Response) -> i64 {
    let v: Value = r.json().await.unwrap();
    v["errorCode"].as_i64().unwrap_or_else(|| panic!("no errorCode in {v}"))
}

// ---- DPS ----

#[tokio::test]
async fn dps_registration_happy_path_with_polling() {
    let emu = start(2).await;
    let c = client();
    let id = "machine-7";
    let model = "dtmi:centralflow:computed;1";
    let body = json!({"registrationId": id, "payload": {"iotcModelId": model}});
    let r = put_register(&c, &emu, id, &dps_token(id), &body).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "assigning");
    let op = v["operationId"].as_str().unwrap().to_string();
    assert!(!op.is_empty());
    assert!(emu.registrations().is_empty(), "not registered before the operation resolves");

    let r = get_op(&c, &emu, id, &op).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "assigning");

    let r = get_op(&c, &emu, id, &op).await;
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "assigned");
    assert_eq!(v["operationId"], op.as_str());
    let rs = &v["registrationState"];
    assert_eq!(rs["registrationId"], id);
    assert_eq!(rs["deviceId"], id);
    assert_eq!(rs["status"], "assigned");
    assert_eq!(rs["assignedHub"], emu.hub_for(id).as_str());
    assert!(emu.hub_names().contains(&emu.hub_for(id)));
    assert_eq!(rs["payload"]["iotcModelId"], model);

    // Polling again repeats the answer and does not count a second registration.
    let again: Value = get_op(&c, &emu, id, &op).await.json().await.unwrap();
    assert_eq!(again["registrationState"]["assignedHub"], rs["assignedHub"]);
    assert_eq!(emu.registrations(), BTreeMap::from([(id.to_string(), 1)]));
    assert_eq!(emu.model_ids(), BTreeMap::from([(id.to_string(), model.to_string())]));
    assert_eq!(emu.registered_devices(), BTreeMap::from([(id.to_string(), emu.hub_for(id))]));

    // Knobs: Retry-After 0, and an immediate 200 when no poll is wanted.
    emu.set_dps_retry_after_secs(0);
    let r = put_register(&c, &emu, id, &dps_token(id), &json!({"registrationId": id})).await;
    assert_eq!(r.headers()["retry-after"], "0");
    emu.set_polls_before_assigned(0);
    let r = put_register(&c, &emu, id, &dps_token(id), &json!({"registrationId": id})).await;
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "assigned");
    assert_eq!(v["registrationState"]["assignedHub"], emu.hub_for(id).as_str());
    assert_eq!(emu.registrations()[id], 2);
    // The model id of the earlier registration is kept when a later one sends none.
    assert_eq!(emu.model_ids()[id], model);
    let req = emu.requests();
    assert_eq!(req.dps, 6);
    assert_eq!(req.dps_register, 3);
    assert_eq!(req.hub, 0);
    assert_eq!(req.by_status, BTreeMap::from([(200, 3), (202, 3)]));

    // Assignment is spread over the hubs, deterministically.
    let hubs: std::collections::BTreeSet<String> = (0..20).map(|i| emu.hub_for(&format!("dev-{i}"))).collect();
    assert_eq!(hubs.len(), 2);
    assert_eq!(emu.hub_for("dev-3"), emu.hub_for("dev-3"));
}

#[tokio::test]
async fn dps_rejects_bad_credentials_with_401000() {
    let emu = start(1).await;
    let c = client();
    let id = "dev-1";
    let body = json!({"registrationId": id});
    let sr = enc(&format!("{SCOPE}/registrations/{id}"));
    let good_key = derive(&group_key(), id);
    let wrong_group = B64.encode(b"some other enrollment group key.........");

    let cases: Vec<(&str, String)> = vec![
        ("wrong group key", token(&sr, &derive(&wrong_group, id), now() + 3600, Some("registration"))),
        ("group key used directly", token(&sr, &group_key(), now() + 3600, Some("registration"))),
        ("expired", token(&sr, &good_key, now() - 3600, Some("registration"))),
        ("no skn", token(&sr, &good_key, now() + 3600, None)),
        ("other skn", token(&sr, &good_key, now() + 3600, Some("enrollment"))),
        (
            "sr of another device",
            token(&enc(&format!("{SCOPE}/registrations/dev-2")), &good_key, now() + 3600, Some("registration")),
        ),
        (
            "signed sr differs from sent sr",
            token(&sr, &good_key, now() + 3600, Some("registration")).replace("%2F", "%2f"),
        ),
        ("not a SAS", "Bearer abc".to_string()),
    ];
    for (what, auth) in cases {
        let r = put_register(&c, &emu, id, &auth, &body).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{what}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["errorCode"], 401000, "{what}");
        assert_eq!(v["message"], "Unauthorized", "{what}");
        assert!(v["trackingId"].as_str().is_some_and(|s| !s.is_empty()), "{what}");
        assert!(v["timestampUtc"].as_str().is_some_and(|s| s.ends_with('Z')), "{what}");
    }
    // Without Authorization.
    let r = c
        .put(format!("{}/{SCOPE}/registrations/{id}/register?{DPS_API}", emu.dps_endpoint()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // Wrong ID scope: a token valid for that scope still fails.
    let other = "0ne00FFFFFF";
    let auth = token(&enc(&format!("{other}/registrations/{id}")), &good_key, now() + 3600, Some("registration"));
    let r = c
        .put(format!("{}/{other}/registrations/{id}/register?{DPS_API}", emu.dps_endpoint()))
        .header("Authorization", auth)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(r).await, 401000);
    // Within the 5-minute clock skew a just-expired token still works; lower-case %2f too.
    let lower = token(&sr.replace("%2F", "%2f"), &good_key, now() - 60, Some("registration"));
    assert_eq!(put_register(&c, &emu, id, &lower, &body).await.status(), StatusCode::ACCEPTED);
    emu.set_clock_skew_secs(0);
    assert_eq!(put_register(&c, &emu, id, &lower, &body).await.status(), StatusCode::UNAUTHORIZED);
    // Bad requests.
    let r = put_register(&c, &emu, id, &dps_token(id), &json!({"registrationId": "dev-2"})).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = c
        .put(format!("{}/{SCOPE}/registrations/{id}/register", emu.dps_endpoint()))
        .header("Authorization", dps_token(id))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(emu.registrations().is_empty());
    let req = emu.requests();
    assert_eq!(req.by_status[&401], 11);
    assert_eq!(req.by_status[&400], 2);
    assert_eq!(req.by_status[&202], 1);
}

#[tokio::test]
async fn dps_blocked_device_fails_with_400209() {
    let emu = start(1).await;
    let c = client();
    let id = "blocked-1";
    emu.block_device(id);
    let v = register(&c, &emu, id).await;
    assert_eq!(v["status"], "failed", "{v}");
    assert_eq!(v["registrationState"]["errorCode"], 400209);
    assert_eq!(v["registrationState"]["status"], "failed");
    assert!(v["registrationState"]["errorMessage"].as_str().is_some());
    assert!(v["registrationState"].get("assignedHub").is_none());
    assert!(emu.registrations().is_empty());
    // Not in any hub.
    let r = post_simple(&c, &emu.hub_for(id), id).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // Unblocked, it registers and sends.
    emu.unblock_device(id);
    let hub = register_ok(&c, &emu, id).await;
    assert_eq!(post_simple(&c, &hub, id).await.status(), StatusCode::NO_CONTENT);
    // Blocked again while registered: its hub refuses it.
    emu.block_device(id);
    let r = post_simple(&c, &hub, id).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(emu.messages().len(), 1);
}

#[tokio::test]
async fn dps_rate_limit_answers_429() {
    let emu = start(1).await;
    let c = client();
    emu.set_registration_limit_per_minute(Some(3));
    for i in 0..3 {
        let id = format!("d{i}");
        let r = put_register(&c, &emu, &id, &dps_token(&id), &json!({"registrationId": id})).await;
        assert_eq!(r.status(), StatusCode::ACCEPTED);
    }
    let r = put_register(&c, &emu, "d3", &dps_token("d3"), &json!({"registrationId": "d3"})).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let secs: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&secs), "{secs}");
    assert_eq!(error_code(r).await, 429001);
    assert_eq!(emu.requests().dps_register, 4);
    emu.set_registration_limit_per_minute(None);
    let r = put_register(&c, &emu, "d3", &dps_token("d3"), &json!({"registrationId": "d3"})).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
}

// ---- IoT Hub ----

#[tokio::test]
async fn single_telemetry_records_headers_exactly() {
    let emu = start(2).await;
    let c = client();
    let id = "Sensor-A1";
    let hub = register_ok(&c, &emu, id).await;
    let body = br#"{"temp":21.5,"computed":true}"#.to_vec();
    let headers = [
        ("iothub-to", "/devices/Sensor-A1/messages/events"),
        ("iothub-app-computed", "true"),
        ("iothub-app-iothub-creation-time-utc", "2024-05-01T12:00:00.000Z"),
        ("iothub-contenttype", "application/json"),
        ("iothub-contentencoding", "utf-8"),
        ("iothub-messageid", "msg-1"),
        ("iothub-correlationid", "corr-1"),
        ("User-Agent", "centralflow-test/1"),
        ("Content-Type", "application/json"),
    ];
    let r = post(&c, &hub, id, Some(&hub_token(&hub, id)), &headers, body.clone()).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let expected = Received {
        device_id: id.to_string(),
        hub: hub.clone(),
        body: body.clone(),
        app_properties: BTreeMap::from([
            ("computed".to_string(), "true".to_string()),
            ("iothub-creation-time-utc".to_string(), "2024-05-01T12:00:00.000Z".to_string()),
        ]),
        content_type: Some("application/json".into()),
        content_encoding: Some("utf-8".into()),
        message_id: Some("msg-1".into()),
        correlation_id: Some("corr-1".into()),
        creation_time_utc: Some("2024-05-01T12:00:00.000Z".into()),
        in_batch: false,
    };
    assert_eq!(emu.messages(), vec![expected.clone()]);
    assert_eq!(emu.messages()[0].json()["temp"], 21.5);

    // Other spellings of the token that Azure accepts.
    let key = derive(&group_key(), id);
    let sr = enc(&format!("{hub}/devices/{id}"));
    let variants = [
        ("lower-case escapes", token(&sr.replace("%2F", "%2f").replace("%3A", "%3a"), &key, now() + 3600, None)),
        ("lower-cased resource", token(&enc(&format!("{hub}/devices/{id}").to_lowercase()), &key, now() + 3600, None)),
        (
            "messages/events resource",
            token(&enc(&format!("{hub}/devices/{id}/messages/events")), &key, now() + 3600, None),
        ),
        ("field order, sig first", {
            let se = now() + 3600;
            let sig = hmac_b64(&key, &format!("{sr}\n{se}"));
            format!("SharedAccessSignature sig={}&se={se}&sr={sr}", enc(&sig))
        }),
    ];
    for (what, auth) in &variants {
        let r = post(&c, &hub, id, Some(auth), &[], b"x".to_vec()).await;
        assert_eq!(r.status(), StatusCode::NO_CONTENT, "{what}");
    }
    let msgs = emu.messages();
    assert_eq!(msgs.len(), 5);
    assert!(msgs[1..].iter().all(|m| m.app_properties.is_empty() && m.content_type.is_none() && !m.in_batch));
    assert_eq!(emu.requests().hub, 5);
}

#[tokio::test]
async fn batch_telemetry_recorded_element_by_element() {
    let emu = start(1).await;
    let c = client();
    let id = "batcher";
    let hub = register_ok(&c, &emu, id).await;
    let batch = json!([
        {   // Java SDK style
            "body": B64.encode(br#"{"v":1}"#),
            "base64Encoded": true,
            "properties": {
                "iothub-app-computed": "true",
                "iothub-app-iothub-creation-time-utc": "2024-05-01T12:00:00.000Z",
                "iothub-contenttype": "application/json",
                "iothub-contentencoding": "utf-8",
                "iothub-messageid": "b-1"
            }
        },
        {   // Node SDK style: no base64Encoded, body still base64
            "body": B64.encode(br#"{"v":2}"#),
            "properties": {"iothub-app-iothub-creation-time-utc": "2024-05-01T12:00:01.000Z"}
        },
        {   // un-prefixed names are application properties; reserved iothub-* dropped
            "body": "plain text body",
            "base64Encoded": false,
            "properties": {"Site": "north", "IoTHub-App-Line": "3", "iothub-to": "/x", "iothub-creation-time-utc": "ignored"}
        },
        { "body": "" }
    ]);
    let auth = hub_token(&hub, id);
    let r = post(
        &c,
        &hub,
        id,
        Some(&auth),
        &[("Content-Type", "application/vnd.microsoft.iothub.json"), ("iothub-to", "/devices/batcher/messages/events")],
        serde_json::to_vec(&batch).unwrap(),
    )
    .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let m = emu.messages();
    assert_eq!(m.len(), 4);
    assert!(m.iter().all(|x| x.in_batch && x.device_id == id && x.hub == hub));
    assert_eq!(m[0].body, br#"{"v":1}"#);
    assert_eq!(
        m[0].app_properties,
        BTreeMap::from([
            ("computed".into(), "true".into()),
            ("iothub-creation-time-utc".into(), "2024-05-01T12:00:00.000Z".into())
        ])
    );
    assert_eq!(m[0].content_type.as_deref(), Some("application/json"));
    assert_eq!(m[0].content_encoding.as_deref(), Some("utf-8"));
    assert_eq!(m[0].message_id.as_deref(), Some("b-1"));
    assert_eq!(m[0].creation_time_utc.as_deref(), Some("2024-05-01T12:00:00.000Z"));
    assert_eq!(m[1].body, br#"{"v":2}"#);
    assert_eq!(m[1].creation_time_utc.as_deref(), Some("2024-05-01T12:00:01.000Z"));
    assert_eq!(m[1].content_type, None);
    assert_eq!(m[2].body, b"plain text body");
    assert_eq!(m[2].app_properties, BTreeMap::from([("Site".into(), "north".into()), ("Line".into(), "3".into())]));
    assert_eq!(m[2].creation_time_utc, None);
    assert!(m[3].body.is_empty() && m[3].app_properties.is_empty());

    // A content type with parameters is still a batch.
    let one = json!([{"body": B64.encode(b"z")}]);
    let r = post(
        &c,
        &hub,
        id,
        Some(&auth),
        &[("Content-Type", "application/vnd.microsoft.iothub.json; charset=utf-8")],
        serde_json::to_vec(&one).unwrap(),
    )
    .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(emu.messages().len(), 5);
    assert_eq!(emu.messages()[4].body, b"z");

    // Malformed batches are refused whole.
    for bad in [
        json!({"body": "eA=="}),
        json!([]),
        json!([{"body": "not base64!"}]),
        json!([{"body": "eA==", "properties": {"k": 1}}]),
        json!([{"nobody": 1}]),
    ] {
        let r =
            post(&c, &hub, id, Some(&auth), &[("Content-Type", BATCH_CONTENT_TYPE)], serde_json::to_vec(&bad).unwrap())
                .await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{bad}");
    }
    assert_eq!(emu.messages().len(), 5);
}

#[tokio::test]
async fn wrong_hub_or_unregistered_device_gets_404() {
    let emu = start(2).await;
    let c = client();
    let id = "dev-wrong-hub";
    let hub = register_ok(&c, &emu, id).await;
    let other = emu.hub_names().into_iter().find(|h| *h != hub).unwrap();
    // Correctly signed for the other hub, still not there.
    let r = post_simple(&c, &other, id).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(r.headers()["iothub-errorcode"], "DeviceNotFound");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["errorCode"], 404001);
    assert_eq!(v["message"], "Device not found");
    // Never registered.
    let ghost = "ghost";
    let r = post_simple(&c, &emu.hub_for(ghost), ghost).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(r).await, 404001);
    // The registered one works on its hub.
    assert_eq!(post_simple(&c, &hub, id).await.status(), StatusCode::NO_CONTENT);
    assert_eq!(emu.messages().len(), 1);
    assert_eq!(emu.requests().by_status[&404], 2);
}

#[tokio::test]
async fn hub_rejects_bad_tokens_with_401() {
    let emu = start(2).await;
    let c = client();
    let id = "dev-auth";
    let hub = register_ok(&c, &emu, id).await;
    let other_hub = emu.hub_names().into_iter().find(|h| *h != hub).unwrap();
    let key = derive(&group_key(), id);
    let sr = enc(&format!("{hub}/devices/{id}"));
    // A token whose signature contains '+' or '/' and is sent without URL-encoding fails.
    let mut raw_sig_token = None;
    for se in now() + 3600..now() + 3700 {
        let sig = hmac_b64(&key, &format!("{sr}\n{se}"));
        if sig.contains('+') {
            raw_sig_token = Some(format!("SharedAccessSignature sr={sr}&sig={sig}&se={se}"));
            break;
        }
    }
    let cases: Vec<(&str, String, i64)> = vec![
        ("expired", token(&sr, &key, now() - 3600, None), 401003),
        ("wrong key", token(&sr, &derive(&group_key(), "someone-else"), now() + 3600, None), 401002),
        ("group key", token(&sr, &group_key(), now() + 3600, None), 401002),
        ("with skn", token(&sr, &key, now() + 3600, Some("device")), 401002),
        ("sr of another device", token(&enc(&format!("{hub}/devices/other")), &key, now() + 3600, None), 401003),
        ("sr of another hub", token(&enc(&format!("{other_hub}/devices/{id}")), &key, now() + 3600, None), 401003),
        ("sr of the hub only", token(&enc(&hub), &key, now() + 3600, None), 401003),
        ("sig not url-encoded", raw_sig_token.expect("some se gives a '+'"), 401002),
        ("two spaces", token(&sr, &key, now() + 3600, None).replacen(' ', "  ", 1), 401002),
        ("no se", format!("SharedAccessSignature sr={sr}&sig=abc"), 401002),
    ];
    for (what, auth, code) in cases {
        let r = post(&c, &hub, id, Some(&auth), &[], b"x".to_vec()).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{what}");
        assert!(r.headers()["iothub-errorcode"].to_str().unwrap().starts_with("IotHubUnauthorized"));
        assert_eq!(error_code(r).await, code, "{what}");
    }
    let r = post(&c, &hub, id, None, &[], b"x".to_vec()).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // Clock skew: 60 s past se passes by default, not with no skew.
    let late = token(&sr, &key, now() - 60, None);
    assert_eq!(post(&c, &hub, id, Some(&late), &[], b"x".to_vec()).await.status(), StatusCode::NO_CONTENT);
    emu.set_clock_skew_secs(0);
    assert_eq!(post(&c, &hub, id, Some(&late), &[], b"x".to_vec()).await.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(emu.messages().len(), 1);
    assert_eq!(emu.requests().by_status[&401], 12);
}

#[tokio::test]
async fn faults_too_many_requests_and_unavailable() {
    let emu = start(1).await;
    let c = client();
    let id = "dev-faults";
    let hub = register_ok(&c, &emu, id).await;
    emu.inject(Fault::TooManyRequests { share: 0.5, retry_after_secs: 7 });
    let mut statuses = Vec::new();
    for _ in 0..10 {
        let r = post_simple(&c, &hub, id).await;
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(r.headers()["retry-after"], "7");
            assert_eq!(r.headers()["iothub-errorcode"], "ThrottlingException");
        }
        statuses.push(r.status().as_u16());
    }
    assert_eq!(statuses, [204, 429, 204, 429, 204, 429, 204, 429, 204, 429]);
    assert_eq!(emu.messages().len(), 5);

    emu.clear_faults();
    emu.inject(Fault::Unavailable { share: 1.0 });
    for _ in 0..3 {
        assert_eq!(post_simple(&c, &hub, id).await.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    emu.clear_faults();
    assert_eq!(post_simple(&c, &hub, id).await.status(), StatusCode::NO_CONTENT);

    emu.inject(Fault::Unavailable { share: 0.25 });
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(post_simple(&c, &hub, id).await.status().as_u16());
    }
    assert_eq!(statuses, [204, 204, 204, 503, 204, 204, 204, 503]);
    emu.clear_faults();
    assert_eq!(emu.messages().len(), 5 + 1 + 6);
    let by = emu.requests().by_status;
    assert_eq!((by[&429], by[&503], by[&204]), (5, 5, 12));
}

#[tokio::test]
async fn faults_once_per_device() {
    let emu = start(2).await;
    let c = client();
    let a = "dev-a";
    let b = "dev-b";
    let hub_a = register_ok(&c, &emu, a).await;
    let hub_b = register_ok(&c, &emu, b).await;

    emu.inject(Fault::UnauthorizedOnce { device: a.into() });
    assert_eq!(post_simple(&c, &hub_b, b).await.status(), StatusCode::NO_CONTENT, "other devices unaffected");
    let r = post_simple(&c, &hub_a, a).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(post_simple(&c, &hub_a, a).await.status(), StatusCode::NO_CONTENT);

    emu.inject(Fault::DeviceNotFoundOnce { device: a.into() });
    let r = post_simple(&c, &hub_a, a).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(r).await, 404001);
    // The registration is gone: 404 until the device registers again.
    assert_eq!(post_simple(&c, &hub_a, a).await.status(), StatusCode::NOT_FOUND);
    assert!(!emu.registered_devices().contains_key(a));
    assert_eq!(register_ok(&c, &emu, a).await, hub_a);
    assert_eq!(post_simple(&c, &hub_a, a).await.status(), StatusCode::NO_CONTENT);
    assert_eq!(emu.registrations()[a], 2);
    assert_eq!(emu.registrations()[b], 1);
    assert_eq!(emu.messages().iter().map(|m| m.device_id.as_str()).collect::<Vec<_>>(), [b, a, a]);
}

#[tokio::test]
async fn oversize_messages_get_413() {
    let emu = start(1).await;
    let c = client();
    let id = "dev-big";
    let hub = register_ok(&c, &emu, id).await;
    let auth = hub_token(&hub, id);
    // Single: the limit counts body + property names and values.
    let r = post(&c, &hub, id, Some(&auth), &[], vec![b'a'; MAX_MESSAGE_BYTES + 1]).await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.headers()["iothub-errorcode"], "MessageTooLarge");
    assert_eq!(error_code(r).await, 413001);
    let r = post(&c, &hub, id, Some(&auth), &[("iothub-app-k", "vv")], vec![b'a'; MAX_MESSAGE_BYTES - 2]).await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let r = post(&c, &hub, id, Some(&auth), &[("iothub-app-k", "v")], vec![b'a'; MAX_MESSAGE_BYTES - 2]).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    // Batch: the whole request body counts.
    let chunk = B64.encode(vec![b'b'; 90 * 1024]);
    let batch = json!([{"body": chunk}, {"body": chunk}, {"body": chunk}]);
    let r =
        post(&c, &hub, id, Some(&auth), &[("Content-Type", BATCH_CONTENT_TYPE)], serde_json::to_vec(&batch).unwrap())
            .await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let batch = json!([{"body": chunk}, {"body": chunk}]);
    let r =
        post(&c, &hub, id, Some(&auth), &[("Content-Type", BATCH_CONTENT_TYPE)], serde_json::to_vec(&batch).unwrap())
            .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(emu.messages().len(), 3);
}

#[tokio::test]
async fn unknown_routes_and_missing_api_version() {
    let emu = start(1).await;
    let c = client();
    let id = "dev-routes";
    let hub = register_ok(&c, &emu, id).await;
    let r = c.get(format!("http://{hub}/devices/{id}/messages/events?{API}")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(r).await, 404000);
    let r = c
        .post(format!("http://{hub}/devices/{id}/messages/events"))
        .header("Authorization", hub_token(&hub, id))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = c.get(format!("{}/nothing", emu.dps_endpoint())).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = get_op(&c, &emu, id, "4.0.unknown").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert!(emu.messages().is_empty());
}

#[tokio::test]
async fn device_ids_with_reserved_characters() {
    // IoT Central ids may contain ':' and '.', which encodeURIComponent escapes.
    let emu = start(1).await;
    let c = client();
    let id = "plant:line.3";
    let hub = register_ok(&c, &emu, id).await;
    assert_eq!(emu.registrations()[id], 1);
    assert_eq!(post_simple(&c, &hub, id).await.status(), StatusCode::NO_CONTENT);
    assert_eq!(emu.messages()[0].device_id, id);
    let wait = emu.wait_for_messages(1, Duration::from_secs(1)).await;
    assert_eq!(wait.len(), 1);
}

/// From a plain #[test] with no runtime, as centralflow's CLI tests are written.
#[test]
fn works_from_blocking_tests_and_stops_on_drop() {
    let emu = IotcEmulator::start_blocking(SCOPE, &group_key(), 1).unwrap();
    let addr = emu.dps_endpoint().trim_start_matches("http://").to_string();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let body = r#"{"registrationId":"x"}"#;
    write!(
        s,
        "PUT /{SCOPE}/registrations/x/register?{DPS_API} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 401"), "{out}");
    assert!(out.contains("401000"), "{out}");
    assert_eq!(emu.wait_for_messages_blocking(1, Duration::from_millis(50)).len(), 0);
    let clone = emu.clone();
    drop(emu);
    assert!(std::net::TcpStream::connect(&addr).is_ok(), "a clone keeps it running");
    drop(clone);
    let end = std::time::Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(&addr).is_ok() {
        assert!(std::time::Instant::now() < end, "still listening after the last handle dropped");
        std::thread::sleep(Duration::from_millis(20));
    }
}
