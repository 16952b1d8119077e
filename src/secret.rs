//! Secrets: connection strings, keys and tokens.
//!
//! A [`Secret`] prints as `***` in `Debug` and `Display`, and every secret value read from a
//! pipeline is registered with the process-wide [`redact`] filter, which the log writer and the
//! CLI's error output pass their text through. So a key that leaks into an error message from a
//! client library is still not printed.

use std::fmt;
use std::sync::{OnceLock, RwLock};

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A secret string. Configuration must take it from the environment (`${VAR}`).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        let s = s.into();
        register(&s);
        Secret(s)
    }
    /// The secret itself. Do not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret::new)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

impl JsonSchema for Secret {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Secret".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A secret. Give it as ${ENV_VAR}: secrets are read from the environment, never written in the file."
        })
    }
}

fn registry() -> &'static RwLock<Vec<String>> {
    static R: OnceLock<RwLock<Vec<String>>> = OnceLock::new();
    R.get_or_init(|| RwLock::new(Vec::new()))
}

/// Registers a secret value so that [`redact`] hides it. Also registers the parts of a
/// connection string that are keys (`SharedAccessKey=...`, `AccountKey=...`, URL passwords).
pub fn register(s: &str) {
    if s.len() < 4 {
        return; // too short to redact without mangling unrelated text
    }
    let mut parts = vec![s.to_string()];
    for kv in s.split(';') {
        if let Some((k, v)) = kv.split_once('=') {
            let k = k.trim().to_ascii_lowercase();
            if (k.contains("key") || k.contains("signature") || k.contains("password") || k.contains("token"))
                && v.len() >= 4
            {
                parts.push(v.to_string());
            }
        }
    }
    if let Ok(url) = url::Url::parse(s) {
        if let Some(p) = url.password() {
            if p.len() >= 4 {
                parts.push(p.to_string());
                if let Ok(dec) = percent_encoding::percent_decode_str(p).decode_utf8() {
                    parts.push(dec.to_string());
                }
            }
        }
    }
    let mut r = registry().write().unwrap_or_else(|e| e.into_inner());
    for p in parts {
        if !r.contains(&p) {
            r.push(p);
        }
    }
    // longest first, so that a secret containing another is replaced whole
    r.sort_by_key(|p| std::cmp::Reverse(p.len()));
}

/// Replaces every registered secret in `text` by `***`.
pub fn redact(text: &str) -> String {
    let r = registry().read().unwrap_or_else(|e| e.into_inner());
    let mut out = text.to_string();
    for s in r.iter() {
        if out.contains(s.as_str()) {
            out = out.replace(s.as_str(), "***");
        }
    }
    out
}

/// A `tracing` writer that redacts secrets from every log line.
#[derive(Clone, Copy, Default)]
pub struct RedactingWriter;

impl std::io::Write for RedactingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        std::io::stderr().write_all(redact(&text).as_bytes())?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for RedactingWriter {
    type Writer = RedactingWriter;
    fn make_writer(&'a self) -> Self::Writer {
        RedactingWriter
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new(
            "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=listen;SharedAccessKey=c2VjcmV0LWtleQ==",
        );
        assert_eq!(format!("{s:?}"), "Secret(***)");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"***\"");
        let leaked = format!("connect failed: bad key c2VjcmV0LWtleQ== in {}", s.expose());
        let clean = redact(&leaked);
        assert!(!clean.contains("c2VjcmV0LWtleQ=="), "{clean}");
        assert_eq!(clean, "connect failed: bad key *** in ***");
    }

    #[test]
    fn url_passwords_are_registered() {
        let _ = Secret::new("amqps://user:p%40ssw0rd-xyz@broker:5671/vhost");
        assert_eq!(redact("auth failed for p@ssw0rd-xyz"), "auth failed for ***");
    }
}
