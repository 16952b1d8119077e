//! Validation of the `central` sink's configuration (offline: nothing is contacted), the
//! fields it needs from the rows, and the checks of endpoints and device ids it shares with
//! sending.

use super::sas;
use super::shape::PROPERTY_CHARS;
use super::{CentralConfig, Measurements, Transport};
use crate::config::values;
use crate::config::{Checker, Needs, Spec};

fn valid_property_name(n: &str) -> bool {
    !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || PROPERTY_CHARS.contains(c))
}

/// Whether a URL's host is a loopback address (`127.0.0.0/8`, `::1`, `localhost`).
pub fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

/// Checks a DPS endpoint: https, or http on a loopback address.
pub fn check_endpoint(s: &str) -> Result<url::Url, String> {
    let u = url::Url::parse(s).map_err(|e| format!("{s:?} is not a URL ({e})"))?;
    match u.scheme() {
        "https" => {}
        "http" if is_loopback(&u) => {}
        "http" => {
            return Err(format!(
                "{s:?}: plain http:// is only allowed for loopback addresses (local emulators); use https://"
            ))
        }
        other => return Err(format!("{s:?}: the scheme must be https (not {other})")),
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err(format!("{s:?} has no host"));
    }
    if u.path() != "/" && !u.path().is_empty() {
        return Err(format!("{s:?}: give the endpoint without a path"));
    }
    Ok(u)
}

/// DPS registration ids (and so device ids here): letters, digits and `- . _ :`, at most 128.
pub fn valid_device_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.chars().all(|c| c.is_ascii_alphanumeric() || "-._:".contains(c))
}

impl Spec for CentralConfig {
    fn check(&self, ptr: &str, cx: &mut Checker<'_>) {
        let p = |f: &str| format!("{ptr}/{f}");
        let scope = self.id_scope.trim();
        if scope.is_empty() || scope.contains(['/', ' ', '?', '#']) {
            cx.error(&p("id_scope"), "must be the application's ID scope (like 0ne00ABC123)");
        }
        cx.secret(&p("group_key"), !self.group_key.is_empty());
        if self.group_key.is_empty() {
            cx.error(&p("group_key"), "is empty");
        } else if let Err(e) = sas::GroupKey::parse(self.group_key.expose()) {
            cx.error(&p("group_key"), e);
        }
        if let Err(e) = check_endpoint(&self.dps_endpoint) {
            cx.error(&p("dps_endpoint"), e);
        }
        if self.ca_file.as_deref().is_some_and(|f| f.trim().is_empty()) {
            cx.error(&p("ca_file"), "is empty");
        }
        if let Some(t) = cx.valid(&p("device_id"), &self.device_id) {
            if t.is_static() && !valid_device_id(self.device_id.text()) {
                cx.error(&p("device_id"), "a device id has letters, digits and `- . _ :` only (at most 128)");
            }
        }
        if let Some(m) = &self.model_id {
            cx.valid(&p("model_id"), m);
        }
        if let Some(c) = &self.component {
            cx.valid(&p("component"), c);
            if self.transport != Transport::Mqtt {
                cx.error(
                    &p("component"),
                    "component telemetry needs `transport: mqtt` (IoT Hub's HTTPS API cannot name a component)",
                );
            }
        }
        if let Some(t) = &self.creation_time {
            cx.valid(&p("creation_time"), t);
        }
        if let Some(m) = &self.measurements {
            let pairs = m.pairs();
            if pairs.is_empty() {
                cx.error(&p("measurements"), "is empty");
            }
            for (i, (name, field)) in pairs.iter().enumerate() {
                let ptr = match m {
                    Measurements::List(_) => format!("{ptr}/measurements/{i}"),
                    Measurements::Map(_) => {
                        format!("{ptr}/measurements/{}", crate::config::yaml::pointer_escape(name))
                    }
                };
                if name.is_empty() {
                    cx.error(&ptr, "a telemetry name is empty");
                }
                cx.valid(&ptr, *field);
            }
        }
        for (k, v) in &self.properties {
            let ptr = format!("{ptr}/properties/{}", crate::config::yaml::pointer_escape(k));
            if !valid_property_name(k) || k.to_ascii_lowercase().starts_with("iothub-") || k.starts_with('$') {
                cx.error(
                    &ptr,
                    format!(
                        "`{k}` cannot be a property name: letters, digits and {PROPERTY_CHARS} only, not starting with iothub- or $"
                    ),
                );
            }
            cx.valid(&ptr, v);
        }
        if self.batch_size == 0 || self.batch_size > 500 {
            cx.error(&p("batch_size"), "must be between 1 and 500");
        }
        if !(self.rate_limit.is_finite() && self.rate_limit > 0.0) {
            cx.error(&p("rate_limit"), "must be a positive number of messages per second");
        }
        if !(self.registrations_per_minute.is_finite() && self.registrations_per_minute > 0.0) {
            cx.error(&p("registrations_per_minute"), "must be a positive number");
        }
        if self.concurrency == 0 {
            cx.error(&p("concurrency"), "must be at least 1");
        }
        if self.queue == 0 {
            cx.error(&p("queue"), "must be at least 1");
        }
        cx.positive_duration(&p("flush_timeout"), &self.flush_timeout);
        cx.positive_duration(&p("request_timeout"), &self.request_timeout);
        if self.device_cache.as_deref().is_some_and(|f| f.trim().is_empty()) {
            cx.error(&p("device_cache"), "is empty");
        }
    }
    fn inputs(&self) -> &[String] {
        &self.inputs
    }
    fn needs(&self) -> Needs {
        let Some(m) = &self.measurements else { return Needs::All };
        let mut fields = Vec::new();
        let templates = [Some(&self.device_id), self.model_id.as_ref(), self.component.as_ref()].into_iter().flatten();
        for t in templates.chain(self.properties.values()) {
            if let Ok(t) = t.value() {
                fields.extend(t.fields().cloned());
            }
        }
        let times: Vec<values::Path> = match &self.creation_time {
            Some(t) => vec![t.clone()],
            None => vec![values::Path::new("window_end"), values::Path::new("enqueuedTime")],
        };
        for f in times.iter().chain(m.pairs().into_iter().map(|(_, f)| f)) {
            if let Ok(p) = f.value() {
                fields.push(p.clone());
            }
        }
        Needs::Fields(fields)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate(sink: &str) -> Vec<String> {
        let text = format!("sources:\n  s:\n    type: simulator\n    count: 1\nsinks:\n  c:\n    type: central\n    inputs: [s]\n{sink}");
        let env = |k: &str| match k {
            "KEY" => Some("a2V5a2V5a2V5".to_string()),
            "TOKEN" => Some("a-long-enough-token".to_string()),
            _ => None,
        };
        match crate::config::load_str(&text, "t", &env) {
            Ok(_) => Vec::new(),
            Err(e) => e.iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn validation_is_offline_and_says_what_is_wrong() {
        let ok = "    id_scope: 0ne00ABC\n    group_key: ${KEY}\n";
        assert!(validate(ok).is_empty(), "{:?}", validate(ok));
        let e = validate("    id_scope: 0ne00ABC\n    group_key: a2V5a2V5a2V5\n");
        assert!(e[0].contains("group_key") && e[0].contains("must come from the environment"), "{e:?}");
        assert!(!e.iter().any(|x| x.contains("a2V5a2V5a2V5")), "the literal key is not echoed: {e:?}");
        let e = validate(&format!("{ok}    dps_endpoint: http://dps.example.com\n"));
        assert!(e[0].contains("only allowed for loopback addresses"), "{e:?}");
        let e = validate(&format!("{ok}    component: thermostat1\n"));
        assert!(e[0].contains("needs `transport: mqtt`"), "{e:?}");
        let e =
            validate(&format!("{ok}    device_id: \"bad id\"\n    properties: {{iothub-x: y}}\n    batch_size: 0\n"));
        assert_eq!(e.len(), 3, "{e:?}");
        let e = validate(&format!("{ok}    measurements: {{t: \"a..b\"}}\n    rate_limit: 0\n"));
        assert_eq!(e.len(), 2, "{e:?}");
    }

    #[test]
    fn endpoints_must_be_https_or_loopback_http() {
        assert!(check_endpoint("https://global.azure-devices-provisioning.net").is_ok());
        assert!(check_endpoint("http://127.0.0.1:8080").is_ok());
        assert!(check_endpoint("http://[::1]:8080").is_ok());
        assert!(check_endpoint("http://localhost:1").is_ok());
        let e = check_endpoint("http://dps.example.com").unwrap_err();
        assert!(e.contains("only allowed for loopback"), "{e}");
        assert!(check_endpoint("ftp://x").is_err());
        assert!(check_endpoint("https://x/path").is_err());
    }
}
