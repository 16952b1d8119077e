//! Owned values ([`Value`]), for building and modifying events, and conversions to them.

use super::{Nanos, ValRef};

/// An owned value, for building and modifying events.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Time(Nanos),
    /// JSON text of an object or array.
    Json(String),
    Bytes(Vec<u8>),
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Str(s.to_string())
    }
}
impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Str(s)
    }
}
impl From<f64> for Value {
    fn from(f: f64) -> Self {
        Value::Float(f)
    }
}
impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Value::Int(i)
    }
}
impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}

impl Value {
    /// Converts a `serde_json::Value` (objects and arrays become JSON text).
    pub fn from_json(v: &serde_json::Value) -> Value {
        match v {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(*b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            serde_json::Value::String(s) => Value::Str(s.clone()),
            other => Value::Json(other.to_string()),
        }
    }
}

impl ValRef<'_> {
    /// Converts to an owned [`Value`].
    pub fn to_owned_value(&self) -> Value {
        match self {
            ValRef::Null => Value::Null,
            ValRef::Bool(b) => Value::Bool(*b),
            ValRef::Int(i) => Value::Int(*i),
            ValRef::Float(f) => Value::Float(*f),
            ValRef::Num(s) => match s.parse::<i64>() {
                Ok(i) => Value::Int(i),
                Err(_) => Value::Float(s.parse().unwrap_or(f64::NAN)),
            },
            ValRef::Str(s) => Value::Str(s.to_string()),
            ValRef::Time(t) => Value::Time(*t),
            ValRef::Obj(o) => Value::Json(o.to_json()),
            ValRef::Json(s) => Value::Json(s.to_string()),
            ValRef::Bytes(b) => Value::Bytes(b.to_vec()),
        }
    }
}
