//! IoT Hub's device-to-cloud API over HTTPS: `POST {hub}/devices/{id}/messages/events`, one
//! message (`iothub-app-*` headers) or a batch (`application/vnd.microsoft.iothub.json`: a JSON
//! array of `{"body": base64, "base64Encoded": true, "properties": {...}}`, as the Java SDK sends).

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use reqwest::StatusCode;
use serde_json::{Map, Value};

use super::dps::{describe, error_chain, retry_after};
use super::engine::{OutMsg, Shared};
use super::sas::{enc, hub_resource, unix_now};

pub(super) const HUB_API_VERSION: &str = "2021-04-12";
/// Batches stay under this (IoT Hub's limit is 256 KiB per request; the Python sample keeps 255 KiB).
pub(super) const MAX_BATCH_BYTES: usize = 250 * 1024;
pub(super) const BATCH_CONTENT_TYPE: &str = "application/vnd.microsoft.iothub.json";

/// How a send ended.
#[derive(Debug)]
pub(super) enum SendOutcome {
    Sent,
    /// Some messages were acknowledged (MQTT): which, and what stopped the rest.
    Partial(Vec<bool>, Box<SendOutcome>),
    /// Throttled (429), unavailable (503), other server errors, timeouts: try again.
    Retry(Option<Duration>, String),
    /// 401: derive the key and register again.
    Reauth(String),
    /// 404: the hub does not know the device: register again.
    NotFound(String),
    /// 413: too large.
    TooLarge(String),
    /// 400 and other refusals that a retry cannot fix.
    Bad(String),
}

/// Properties of a message as IoT Hub names them over HTTPS.
fn properties(m: &OutMsg) -> Vec<(String, String)> {
    let mut p = Vec::with_capacity(m.props.len() + 4);
    if let Some(t) = &m.created {
        p.push(("iothub-app-iothub-creation-time-utc".to_string(), t.clone()));
    }
    for (k, v) in &m.props {
        p.push((format!("iothub-app-{k}"), v.clone()));
    }
    p.push(("iothub-contenttype".into(), "application/json".into()));
    p.push(("iothub-contentencoding".into(), "utf-8".into()));
    p.push(("iothub-messageid".into(), m.id.clone()));
    p
}

/// The batch body for `msgs`.
pub(super) fn batch_body(msgs: &[OutMsg]) -> Vec<u8> {
    let items: Vec<Value> = msgs
        .iter()
        .map(|m| {
            let props: Map<String, Value> = properties(m).into_iter().map(|(k, v)| (k, Value::String(v))).collect();
            let mut o = Map::new();
            o.insert("body".into(), Value::String(B64.encode(&m.body)));
            o.insert("base64Encoded".into(), Value::Bool(true));
            o.insert("properties".into(), Value::Object(props));
            Value::Object(o)
        })
        .collect();
    serde_json::to_vec(&items).unwrap_or_default()
}

pub(super) async fn send(sh: &Shared, hub: &str, device: &str, msgs: &[OutMsg], batch: bool) -> SendOutcome {
    let token = sh.set.group.device_key(device).token(&hub_resource(hub, device), unix_now() + 3600, None);
    let url =
        format!("{}://{hub}/devices/{}/messages/events?api-version={HUB_API_VERSION}", sh.set.scheme, enc(device));
    let mut req = sh
        .client
        .post(url)
        .header(AUTHORIZATION, token)
        .header("iothub-to", format!("/devices/{}/messages/events", enc(device)));
    if batch {
        req = req.header(CONTENT_TYPE, BATCH_CONTENT_TYPE).body(batch_body(msgs));
    } else {
        let Some(m) = msgs.first() else { return SendOutcome::Sent };
        req = req.header(CONTENT_TYPE, "application/json");
        for (k, v) in properties(m) {
            req = req.header(k, v);
        }
        req = req.body(m.body.clone());
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => return SendOutcome::Retry(None, format!("IoT Hub {hub} unreachable: {}", error_chain(&e))),
    };
    let status = resp.status();
    if status.is_success() {
        return SendOutcome::Sent;
    }
    let after = retry_after(resp.headers());
    let text = resp.text().await.unwrap_or_default();
    let what = format!("IoT Hub {hub} answered {}", describe(status, &text));
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => SendOutcome::Reauth(what),
        StatusCode::NOT_FOUND => SendOutcome::NotFound(what),
        StatusCode::PAYLOAD_TOO_LARGE => SendOutcome::TooLarge(what),
        StatusCode::TOO_MANY_REQUESTS => SendOutcome::Retry(after.or(Some(Duration::from_secs(1))), what),
        s if s.is_server_error() || s == StatusCode::REQUEST_TIMEOUT => SendOutcome::Retry(after, what),
        _ => SendOutcome::Bad(what),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_elements_carry_body_and_properties() {
        let m = OutMsg {
            device: "d".into(),
            model: None,
            component: None,
            created: Some("2026-11-01T00:05:00.000Z".into()),
            props: vec![("computed".into(), "true".into())],
            body: br#"{"t":1}"#.to_vec(),
            id: "abc".into(),
        };
        let v: Value = serde_json::from_slice(&batch_body(&[m])).unwrap();
        let e = &v[0];
        assert_eq!(B64.decode(e["body"].as_str().unwrap()).unwrap(), br#"{"t":1}"#);
        assert_eq!(e["base64Encoded"], true);
        let p = &e["properties"];
        assert_eq!(p["iothub-app-iothub-creation-time-utc"], "2026-11-01T00:05:00.000Z");
        assert_eq!(p["iothub-app-computed"], "true");
        assert_eq!(p["iothub-contenttype"], "application/json");
        assert_eq!(p["iothub-contentencoding"], "utf-8");
        assert_eq!(p["iothub-messageid"], "abc");
    }
}
