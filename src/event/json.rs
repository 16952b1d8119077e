//! Writing JSON: values, objects and whole events as JSON text.

use std::fmt::Write as _;

use super::{Event, ObjRef, ValRef};
use crate::time;

impl ObjRef<'_> {
    /// Appends the object as JSON.
    pub fn write_json(&self, out: &mut String) {
        if let Some(raw) = self.raw_json() {
            out.push_str(raw);
            return;
        }
        out.push('{');
        for (i, (k, v)) in self.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            write_json_str(out, k);
            out.push(':');
            v.write_json(out);
        }
        out.push('}');
    }
    /// The object as a JSON string.
    pub fn to_json(&self) -> String {
        let mut s = String::new();
        self.write_json(&mut s);
        s
    }
}

impl ValRef<'_> {
    /// Appends the value as JSON.
    pub fn write_json(&self, out: &mut String) {
        match self {
            ValRef::Null => out.push_str("null"),
            ValRef::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            ValRef::Int(i) => {
                let _ = write!(out, "{i}");
            }
            ValRef::Float(f) => write_json_f64(out, *f),
            ValRef::Num(s) | ValRef::Json(s) => out.push_str(s),
            ValRef::Str(s) => write_json_str(out, s),
            ValRef::Time(t) => {
                out.push('"');
                time::write_rfc3339(out, *t);
                out.push('"');
            }
            ValRef::Obj(o) => o.write_json(out),
            ValRef::Bytes(b) => match std::str::from_utf8(b) {
                Ok(s) => write_json_str(out, s),
                Err(_) => {
                    use base64::Engine as _;
                    write_json_str(out, &base64::engine::general_purpose::STANDARD.encode(b))
                }
            },
        }
    }
    /// The value as a JSON string.
    pub fn to_json(&self) -> String {
        let mut s = String::new();
        self.write_json(&mut s);
        s
    }
}

/// Writes a float as JSON (non-finite values become null, as JSON has no NaN).
pub fn write_json_f64(out: &mut String, f: f64) {
    if f.is_finite() {
        // `{}` prints the shortest representation that round-trips
        let mut buf = format!("{f}");
        if !buf.contains(['.', 'e', 'E']) {
            buf.push_str(".0");
        }
        out.push_str(&buf);
    } else {
        out.push_str("null");
    }
}

/// Writes `s` as a JSON string literal.
pub fn write_json_str(out: &mut String, s: &str) {
    out.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: Option<&str> = match b {
            b'"' => Some("\\\""),
            b'\\' => Some("\\\\"),
            b'\n' => Some("\\n"),
            b'\r' => Some("\\r"),
            b'\t' => Some("\\t"),
            0..=0x1f => None,
            _ => continue,
        };
        out.push_str(&s[start..i]);
        match esc {
            Some(e) => out.push_str(e),
            None => {
                let _ = write!(out, "\\u{:04x}", b);
            }
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

impl Event {
    /// The whole event as JSON (the source text itself when unmodified).
    pub fn to_json(&self) -> String {
        let mut s = String::with_capacity(self.raw.len().max(64));
        self.write_json(&mut s);
        s
    }

    /// Appends the event as JSON.
    pub fn write_json(&self, out: &mut String) {
        match self.raw_json() {
            // unmodified (projected events always are): the source text itself
            Some(raw) => out.push_str(raw),
            None => self.root().write_json(out),
        }
    }
}
