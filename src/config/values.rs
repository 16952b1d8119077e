//! Option values written as text and parsed once, when the pipeline is read: durations
//! (`10s`), timestamps (RFC 3339) and expressions (Rhai).
//!
//! A [`Parsed`] keeps the text (for messages, the JSON Schema and serializing back) and the
//! outcome of parsing it. Reading the pipeline never fails on a bad value, so that validation
//! reports every mistake of a component, each at its own line:column ([`super::Checker`]'s
//! `duration`, `timestamp` and `expr` report the stored outcome); after validation a component
//! takes the parsed value ([`Parsed::get`]) and parses nothing again.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::event::Nanos;
use crate::expr::Expr;

/// A kind of value written as text.
pub trait Parse: Sized + Clone {
    fn parse(text: &str) -> Result<Self, String>;
}

impl Parse for Duration {
    fn parse(text: &str) -> Result<Self, String> {
        crate::time::parse_duration(text)
    }
}

/// An RFC 3339 timestamp, as nanoseconds since the Unix epoch.
impl Parse for Nanos {
    fn parse(text: &str) -> Result<Self, String> {
        crate::time::parse_rfc3339(text)
            .ok_or_else(|| format!("{text:?} is not an RFC 3339 timestamp (like 2026-11-01T13:00:00Z)"))
    }
}

impl Parse for crate::path::FieldPath {
    fn parse(text: &str) -> Result<Self, String> {
        crate::path::FieldPath::parse(text)
    }
}

/// A size in bytes, written like `128MiB`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl Parse for ByteSize {
    fn parse(text: &str) -> Result<Self, String> {
        text.trim()
            .parse::<bytesize::ByteSize>()
            .map(|b| ByteSize(b.as_u64()))
            .map_err(|e| format!("{text:?} is not a size like 128MiB ({e})"))
    }
}

impl Parse for Expr {
    fn parse(text: &str) -> Result<Self, String> {
        Expr::compile(text).map_err(|msg| format!("invalid expression: {msg}"))
    }
}

/// A value as written, and what parsing it gave.
#[derive(Clone)]
pub struct Parsed<T> {
    text: String,
    value: Result<T, String>,
}

/// A duration such as `10s`, `1m30s` or `250ms`.
pub type Dur = Parsed<Duration>;
/// An RFC 3339 timestamp.
pub type Timestamp = Parsed<Nanos>;
/// A compiled expression.
pub type Expression = Parsed<Expr>;
/// A field path (`deviceId`, `telemetry.temperature`, `temperature`).
pub type Path = Parsed<crate::path::FieldPath>;

impl<T: Parse> Parsed<T> {
    /// Parses `text` (a bad value is kept, with its error, for validation to report).
    pub fn new(text: impl Into<String>) -> Parsed<T> {
        let text = text.into();
        let value = T::parse(&text);
        Parsed { text, value }
    }

    /// The value as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The parsed value, or why the text is not one.
    pub fn value(&self) -> Result<&T, &str> {
        self.value.as_ref().map_err(String::as_str)
    }

    /// The parsed value, for building a component (validation has reported any error already;
    /// this one only reaches a caller that skipped validation).
    pub fn get(&self) -> anyhow::Result<T> {
        self.value.clone().map_err(anyhow::Error::msg)
    }
}

impl Parsed<Duration> {
    /// The duration in nanoseconds, for event-time arithmetic.
    pub fn nanos(&self) -> anyhow::Result<Nanos> {
        Ok(self.get()?.as_nanos() as Nanos)
    }
}

/// Values are equal when written the same.
impl<T> PartialEq for Parsed<T> {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl<T> Eq for Parsed<T> {}

/// Values written the same hash the same (they may be map keys: `aggregates`, `set`).
impl<T> std::hash::Hash for Parsed<T> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.text.hash(state)
    }
}

impl<T> fmt::Debug for Parsed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.text)
    }
}

impl<'de, T: Parse> Deserialize<'de> for Parsed<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Parsed::new(String::deserialize(d)?))
    }
}

impl<T> Serialize for Parsed<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.text.serialize(s)
    }
}

impl<T> schemars::JsonSchema for Parsed<T> {
    fn schema_name() -> Cow<'static, str> {
        String::schema_name()
    }
    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        String::json_schema(generator)
    }
    fn inline_schema() -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_parsed_once_and_bad_ones_kept_with_their_error() {
        let d: Dur = serde_json::from_str("\"1m30s\"").unwrap();
        assert_eq!(d.value(), Ok(&Duration::from_secs(90)));
        assert_eq!(d.nanos().unwrap(), 90_000_000_000);
        let bad: Dur = serde_json::from_str("\"soon\"").expect("reading never fails on a bad value");
        assert!(bad.value().is_err());
        assert!(bad.get().is_err());
        assert_eq!(serde_json::to_string(&bad).unwrap(), "\"soon\"", "written back as it was");
        let t = Timestamp::new("2026-11-01T00:00:01Z");
        assert_eq!(t.get().unwrap(), 1_793_491_201_000_000_000);
        assert!(Timestamp::new("yesterday").value().unwrap_err().contains("RFC 3339"));
        assert!(Expression::new("temperature >").value().unwrap_err().starts_with("invalid expression"));
    }
}
