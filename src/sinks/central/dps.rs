//! DPS runtime registration over HTTPS, as the device SDKs and the IoT Central device bridge do
//! it: `PUT {endpoint}/{idScope}/registrations/{id}/register` with a registration SAS token,
//! then `GET .../operations/{operationId}` until the status is no longer `assigning`, waiting
//! what `Retry-After` says between polls.

use std::time::Duration;

use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use reqwest::StatusCode;
use serde_json::{json, Value};

use super::engine::Shared;
use super::sas::{dps_resource, enc, unix_now};

pub(super) const DPS_API_VERSION: &str = "2019-03-31";
/// Polls of one registration operation before trying again later.
const MAX_POLLS: u32 = 20;
/// Wait between polls when DPS gives no `Retry-After` (the bridge's 2 s).
const DEFAULT_POLL: Duration = Duration::from_secs(2);

/// How a registration ended.
#[derive(Debug)]
pub(super) enum RegOutcome {
    /// Assigned to this hub.
    Assigned(String),
    /// Refused for this device: unassociated or blocked (400209), or disabled.
    Blocked(String),
    /// Refused for this device for another reason (bad registration id, ...).
    DeviceError(String),
    /// 401: the signature does not verify (wrong key or ID scope).
    Unauthorized(String),
    /// Throttled, unavailable, unreachable: try again (after this long, when DPS said).
    Retry(Option<Duration>, String),
}

/// `Retry-After` in seconds (or an HTTP date, which is read as "soon"), capped at 5 minutes.
pub(super) fn retry_after(h: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = h.get(RETRY_AFTER)?.to_str().ok()?.trim();
    match v.parse::<f64>() {
        Ok(s) if s.is_finite() && s >= 0.0 => Some(Duration::from_secs_f64(s.min(300.0))),
        _ => Some(Duration::from_secs(1)),
    }
}

/// A short description of an error answer: status, `errorCode` and message when JSON.
pub(super) fn describe(status: StatusCode, body: &str) -> String {
    let v: Option<Value> = serde_json::from_str(body).ok();
    let code = v.as_ref().and_then(|v| v.get("errorCode")).map(|c| c.to_string());
    let msg = v
        .as_ref()
        .and_then(|v| v.get("message").or_else(|| v.get("Message")))
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| body.chars().take(200).collect());
    match code {
        Some(c) => format!("HTTP {}, errorCode {c}: {msg}", status.as_u16()),
        None if msg.is_empty() => format!("HTTP {}", status.as_u16()),
        None => format!("HTTP {}: {msg}", status.as_u16()),
    }
}

pub(super) async fn register(sh: &Shared, device: &str, model: Option<&str>) -> RegOutcome {
    let scope = &sh.set.id_scope;
    let token =
        sh.set.group.device_key(device).token(&dps_resource(scope, device), unix_now() + 3600, Some("registration"));
    let base = format!("{}/{}/registrations/{}", sh.set.dps, enc(scope), enc(device));
    let body = match model {
        Some(m) => json!({"registrationId": device, "payload": {"iotcModelId": m}}),
        None => json!({"registrationId": device}),
    };
    let req = sh
        .client
        .put(format!("{base}/register?api-version={DPS_API_VERSION}"))
        .header(AUTHORIZATION, &token)
        .header(CONTENT_TYPE, "application/json; charset=utf-8")
        .header(ACCEPT, "application/json")
        .body(body.to_string());
    let (mut status, mut headers, mut text) = match call(req).await {
        Ok(r) => r,
        Err(e) => return RegOutcome::Retry(None, e),
    };
    let mut polls = 0;
    loop {
        match status {
            s if s.is_success() => {}
            StatusCode::UNAUTHORIZED => return RegOutcome::Unauthorized(describe(status, &text)),
            StatusCode::TOO_MANY_REQUESTS => {
                return RegOutcome::Retry(
                    retry_after(&headers).or(Some(Duration::from_secs(5))),
                    describe(status, &text),
                )
            }
            s if s.is_server_error() || s == StatusCode::REQUEST_TIMEOUT => {
                return RegOutcome::Retry(retry_after(&headers), describe(status, &text))
            }
            StatusCode::NOT_FOUND if polls > 0 => {
                // the operation was lost: start over
                return RegOutcome::Retry(None, describe(status, &text));
            }
            _ => return RegOutcome::DeviceError(format!("DPS answered {}", describe(status, &text))),
        }
        let v: Value = match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(_) => {
                return RegOutcome::Retry(None, format!("DPS answered with something else than JSON: {text:.200}"))
            }
        };
        match v.get("status").and_then(Value::as_str).unwrap_or("") {
            "assigned" => {
                return match v.pointer("/registrationState/assignedHub").and_then(Value::as_str) {
                    Some(h) if !h.is_empty() => RegOutcome::Assigned(h.to_string()),
                    _ => RegOutcome::Retry(None, "DPS said assigned but named no hub".into()),
                }
            }
            "assigning" | "unassigned" => {}
            "failed" => {
                let state = v.get("registrationState").cloned().unwrap_or(Value::Null);
                let code = state.get("errorCode").and_then(Value::as_i64).unwrap_or(0);
                let msg = state.get("errorMessage").and_then(Value::as_str).unwrap_or("");
                return if code == 400209 {
                    RegOutcome::Blocked(format!(
                        "DPS error 400209, the device may be unassociated or blocked in IoT Central ({msg})"
                    ))
                } else {
                    RegOutcome::DeviceError(format!("DPS registration failed with errorCode {code}: {msg}"))
                };
            }
            "disabled" => return RegOutcome::Blocked("the device's enrollment is disabled".into()),
            other => return RegOutcome::Retry(None, format!("DPS answered an unknown status {other:?}")),
        }
        polls += 1;
        if polls > MAX_POLLS {
            return RegOutcome::Retry(None, format!("still assigning after {MAX_POLLS} polls"));
        }
        let Some(op) = v.get("operationId").and_then(Value::as_str) else {
            return RegOutcome::Retry(None, "DPS answered assigning without an operationId".into());
        };
        tokio::time::sleep(retry_after(&headers).unwrap_or(DEFAULT_POLL).min(Duration::from_secs(30))).await;
        let req = sh
            .client
            .get(format!("{base}/operations/{}?api-version={DPS_API_VERSION}", enc(op)))
            .header(AUTHORIZATION, &token)
            .header(ACCEPT, "application/json");
        (status, headers, text) = match call(req).await {
            Ok(r) => r,
            Err(e) => return RegOutcome::Retry(None, e),
        };
    }
}

async fn call(req: reqwest::RequestBuilder) -> Result<(StatusCode, reqwest::header::HeaderMap, String), String> {
    let resp = req.send().await.map_err(|e| format!("DPS unreachable: {}", crate::secret::redact(&error_chain(&e))))?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap_or_default();
    Ok((status, headers, text))
}

/// An error with its causes (reqwest's own text says little: "error sending request").
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
