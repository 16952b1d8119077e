//! Typed columns (`columns:`): fields a user names, each written as a typed, nullable column
//! beside the layout's own columns. A value of another type is null in its column; the JSON
//! text columns keep it, so nothing is lost.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_array::builder::{BooleanBuilder, Float64Builder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder};
use arrow_array::ArrayRef;
use arrow_schema::{DataType, Field};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::event::{Event, ValRef};
use crate::path::FieldPath;
use crate::rows::{ts_type, ts_value};

/// The type of a typed column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ColumnType {
    /// 64-bit float; integers are accepted.
    Double,
    /// 64-bit integer; a fraction or a number out of range is null.
    Long,
    /// Text; only JSON strings.
    String,
    /// Only JSON `true`/`false`.
    Boolean,
    /// An RFC 3339 string or epoch milliseconds, written in the sink's `timestamp_unit`, UTC.
    Timestamp,
}

impl ColumnType {
    fn arrow(self) -> DataType {
        match self {
            ColumnType::Double => DataType::Float64,
            ColumnType::Long => DataType::Int64,
            ColumnType::String => DataType::Utf8,
            ColumnType::Boolean => DataType::Boolean,
            ColumnType::Timestamp => ts_type(),
        }
    }
}

/// A typed column: its type, or `{type: ..., name: ...}` to name the column other than the path.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum ColumnSpec {
    Type(ColumnType),
    Long {
        #[serde(rename = "type")]
        ty: ColumnType,
        /// The column's name (default: the path as written).
        #[serde(default)]
        name: Option<String>,
    },
}

impl ColumnSpec {
    pub fn ty(&self) -> ColumnType {
        match self {
            ColumnSpec::Type(t) | ColumnSpec::Long { ty: t, .. } => *t,
        }
    }
    /// The column name for this spec under `path`.
    pub fn name<'a>(&'a self, path: &'a str) -> &'a str {
        match self {
            ColumnSpec::Long { name: Some(n), .. } => n,
            _ => path,
        }
    }
}

/// The typed columns of a sink, in the order of their names (the map's order).
pub struct TypedColumns {
    cols: Vec<(String, FieldPath, ColumnType)>,
    /// Per column: the telemetry key its path names (`temperature`, `telemetry.temperature`),
    /// and whether the path is bare; such columns are read from one lookup of the telemetry
    /// object per event instead of a path lookup each (see [`TypedBuilders::append`]).
    tele: Vec<Option<(String, bool)>>,
    /// Some column is a bare telemetry key; some is `telemetry.K`.
    any_bare: bool,
    any_prefixed: bool,
}

impl TypedColumns {
    pub fn new(spec: &BTreeMap<String, ColumnSpec>) -> anyhow::Result<TypedColumns> {
        let mut cols = Vec::with_capacity(spec.len());
        for (path, s) in spec {
            let p = FieldPath::parse(path).map_err(|e| anyhow::anyhow!("columns.{path}: {e}"))?;
            cols.push((s.name(path).to_string(), p, s.ty()));
        }
        let tele: Vec<_> = cols.iter().map(|(_, p, _)| telemetry_key(p)).collect();
        let any = |bare: bool| tele.iter().any(|k| matches!(k, Some((_, x)) if *x == bare));
        let (any_bare, any_prefixed) = (any(true), any(false));
        Ok(TypedColumns { cols, tele, any_bare, any_prefixed })
    }

    pub fn is_empty(&self) -> bool {
        self.cols.is_empty()
    }

    pub fn len(&self) -> usize {
        self.cols.len()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.cols.iter().map(|(n, _, _)| n.as_str())
    }

    pub fn fields(&self) -> Vec<Field> {
        self.cols.iter().map(|(n, _, t)| Field::new(n, t.arrow(), true)).collect()
    }

    /// Builders of the typed columns, filled an event at a time: every column's value of an
    /// event is looked up while that event's fields are in cache.
    pub fn builders(&self, capacity: usize) -> TypedBuilders<'_> {
        let b = self.cols.iter().map(|(_, _, t)| Builder::new(*t, capacity)).collect();
        TypedBuilders { cols: self, b }
    }
}

/// The telemetry key a path names: `telemetry.K` (`true`: written bare, `K`), if it names one.
fn telemetry_key(p: &FieldPath) -> Option<(String, bool)> {
    match p.parts() {
        [t, k] if t == "telemetry" => Some((k.clone(), false)),
        [k] if !p.is_export_key() && k != "meta" => Some((k.clone(), true)),
        _ => None,
    }
}

/// The typed columns being built (see [`TypedColumns::builders`]).
pub struct TypedBuilders<'a> {
    cols: &'a TypedColumns,
    b: Vec<Builder>,
}

enum Builder {
    Double(Float64Builder),
    Long(Int64Builder),
    String(StringBuilder),
    Boolean(BooleanBuilder),
    Timestamp(TimestampMicrosecondBuilder),
}

impl Builder {
    fn new(t: ColumnType, n: usize) -> Builder {
        match t {
            ColumnType::Double => Builder::Double(Float64Builder::with_capacity(n)),
            ColumnType::Long => Builder::Long(Int64Builder::with_capacity(n)),
            ColumnType::String => Builder::String(StringBuilder::with_capacity(n, n * 16)),
            ColumnType::Boolean => Builder::Boolean(BooleanBuilder::with_capacity(n)),
            ColumnType::Timestamp => {
                Builder::Timestamp(TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC"))
            }
        }
    }
}

impl TypedBuilders<'_> {
    /// Appends `ev`'s value (or null) to every column.
    pub fn append(&mut self, ev: &Event) {
        // What `FieldPath::get` answers for a telemetry key of an event that is not projected,
        // from one lookup of the telemetry object for all such columns: a bare `K` is the
        // telemetry object's `K` when every top-level key is the export format's (else a
        // top-level `K` could come first); `telemetry.K` is the first `telemetry` field's `K`.
        let direct = ev.projection().is_none();
        let (mut bare_obj, mut first_obj) = (None, None);
        if direct {
            if ev.has_only_export_keys() && self.cols.any_bare {
                bare_obj = Some(ev.own_telemetry());
            }
            if self.cols.any_prefixed {
                if let Some(ValRef::Obj(o)) = ev.own_get("telemetry") {
                    first_obj = Some(o);
                }
            }
        }
        for (((_, p, _), key), b) in self.cols.cols.iter().zip(&self.cols.tele).zip(&mut self.b) {
            let v = match (key, bare_obj, first_obj) {
                (Some((k, true)), Some(t), _) => t.and_then(|t| t.get(k)),
                (Some((k, false)), _, Some(o)) => o.get(k),
                _ => p.get(ev),
            };
            match b {
                Builder::Double(b) => b.append_option(v.and_then(|v| as_double(&v))),
                Builder::Long(b) => b.append_option(v.and_then(|v| as_long(&v))),
                Builder::String(b) => match v {
                    Some(ValRef::Str(s)) => b.append_value(s),
                    _ => b.append_null(),
                },
                Builder::Boolean(b) => b.append_option(v.and_then(|v| as_bool(&v))),
                Builder::Timestamp(b) => b.append_option(v.and_then(|v| as_micros(&v))),
            }
        }
    }

    pub fn finish(self) -> Vec<ArrayRef> {
        self.b
            .into_iter()
            .map(|b| -> ArrayRef {
                match b {
                    Builder::Double(mut b) => Arc::new(b.finish()),
                    Builder::Long(mut b) => Arc::new(b.finish()),
                    Builder::String(mut b) => Arc::new(b.finish()),
                    Builder::Boolean(mut b) => Arc::new(b.finish()),
                    Builder::Timestamp(mut b) => Arc::new(b.finish()),
                }
            })
            .collect()
    }
}

/// A number as a double: floats and integers (an unparsed number literal too).
fn as_double(v: &ValRef<'_>) -> Option<f64> {
    match v {
        ValRef::Float(f) => Some(*f),
        ValRef::Int(i) => Some(*i as f64),
        ValRef::Num(t) => t.parse::<f64>().ok().filter(|f| f.is_finite()),
        _ => None,
    }
}

/// An integer that fits in 64 bits; a fraction (`1.5`) or a number out of range is null.
fn as_long(v: &ValRef<'_>) -> Option<i64> {
    match v {
        ValRef::Int(i) => Some(*i),
        // a literal the decoder kept as text: only an integer literal that fits
        ValRef::Num(t) => t.parse::<i64>().ok(),
        // `2.0` is an integer written as a float; `1.5` and 1e300 are not longs (`i64::MAX as
        // f64` is 2^63, just out of range)
        ValRef::Float(f) if f.fract() == 0.0 && *f >= i64::MIN as f64 && *f < i64::MAX as f64 => Some(*f as i64),
        _ => None,
    }
}

fn as_bool(v: &ValRef<'_>) -> Option<bool> {
    match v {
        ValRef::Bool(b) => Some(*b),
        _ => None,
    }
}

/// An RFC 3339 string or epoch milliseconds (an integer), in microseconds.
fn as_micros(v: &ValRef<'_>) -> Option<i64> {
    match v {
        ValRef::Time(t) => Some(ts_value(*t)),
        ValRef::Str(s) => crate::time::parse_rfc3339(s).map(ts_value),
        ValRef::Int(ms) => ms.checked_mul(1_000),
        ValRef::Num(t) => t.parse::<i64>().ok()?.checked_mul(1_000),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    /// The one-lookup path for telemetry keys answers what a path lookup per column does, for
    /// bare and `telemetry.` paths, a top-level field by a telemetry name, a missing or null
    /// telemetry, nested paths and envelope fields.
    #[test]
    fn columns_read_from_telemetry_equal_path_lookups() {
        use arrow_array::Array as _;
        let msgs = [
            r#"{"messageSource":"telemetry","deviceId":"d1","enqueuedTime":"2026-11-01T00:00:00Z","telemetry":{"temperature":21.5,"status":"ok","n":3,"BloodPressure":{"Systolic":71}}}"#,
            r#"{"messageSource":"telemetry","deviceId":"d2","enqueuedTime":"2026-11-01T00:00:00Z","temperature":99,"telemetry":{"temperature":1.5,"status":"hot"}}"#,
            r#"{"messageSource":"telemetry","enqueuedTime":"2026-11-01T00:00:00Z","telemetry":null,"status":"x"}"#,
            r#"{"messageSource":"telemetry","enqueuedTime":"2026-11-01T00:00:00Z"}"#,
            r#"{"messageSource":"telemetry","enqueuedTime":"2026-11-01T00:00:00Z","telemetry":{"n":"7","temperature":"warm"}}"#,
        ];
        let mut spec = BTreeMap::new();
        for (path, ty) in [
            ("temperature", ColumnType::Double),
            ("telemetry.temperature", ColumnType::Double),
            ("status", ColumnType::String),
            ("telemetry.status", ColumnType::String),
            ("n", ColumnType::Long),
            ("BloodPressure.Systolic", ColumnType::Long),
            ("deviceId", ColumnType::String),
        ] {
            spec.insert(path.to_string(), ColumnSpec::Type(ty));
        }
        let typed = TypedColumns::new(&spec).unwrap();
        let events: Vec<Event> =
            msgs.iter().map(|m| crate::model::decode::decode_one(bytes::Bytes::from(m.to_string())).unwrap()).collect();
        let mut b = typed.builders(events.len());
        for ev in &events {
            b.append(ev);
        }
        let cols = b.finish();
        for ((name, p, ty), col) in typed.cols.iter().zip(&cols) {
            for (row, ev) in events.iter().enumerate() {
                let want = p.get(ev);
                let got = if col.is_null(row) {
                    None
                } else {
                    Some(arrow_cast::display::array_value_to_string(col, row).unwrap())
                };
                // doubles compared as numbers (Arrow writes 99 as "99.0")
                let got = match ty {
                    ColumnType::Double => got.map(|s| s.parse::<f64>().unwrap().to_string()),
                    _ => got,
                };
                let want = match ty {
                    ColumnType::Double => want.and_then(|v| as_double(&v)).map(|f| f.to_string()),
                    ColumnType::Long => want.and_then(|v| as_long(&v)).map(|i| i.to_string()),
                    ColumnType::String => match want {
                        Some(ValRef::Str(s)) => Some(s.to_string()),
                        _ => None,
                    },
                    _ => unreachable!(),
                };
                assert_eq!(got, want, "column {name}, message {row}");
            }
        }
        // the cases above are not all null
        assert!(cols.iter().all(|c| c.null_count() < events.len()));
    }

    #[test]
    fn double_takes_floats_and_integers_only() {
        assert_eq!(as_double(&ValRef::Float(21.5)), Some(21.5));
        assert_eq!(as_double(&ValRef::Int(21)), Some(21.0));
        assert_eq!(as_double(&ValRef::Num("1e3")), Some(1000.0));
        assert_eq!(as_double(&ValRef::Str(Cow::Borrowed("21.5"))), None);
        assert_eq!(as_double(&ValRef::Str(Cow::Borrowed("abc"))), None);
        assert_eq!(as_double(&ValRef::Bool(true)), None);
        assert_eq!(as_double(&ValRef::Null), None);
        assert_eq!(as_double(&ValRef::Json("{\"a\":1}")), None);
    }

    #[test]
    fn long_refuses_fractions_and_out_of_range() {
        assert_eq!(as_long(&ValRef::Int(120)), Some(120));
        assert_eq!(as_long(&ValRef::Int(i64::MIN)), Some(i64::MIN));
        assert_eq!(as_long(&ValRef::Float(2.0)), Some(2));
        assert_eq!(as_long(&ValRef::Float(1.5)), None);
        assert_eq!(as_long(&ValRef::Float(1e300)), None);
        assert_eq!(as_long(&ValRef::Float(i64::MAX as f64)), None);
        assert_eq!(as_long(&ValRef::Num("99999999999999999999")), None);
        assert_eq!(as_long(&ValRef::Num("42")), Some(42));
        assert_eq!(as_long(&ValRef::Str(Cow::Borrowed("42"))), None);
        assert_eq!(as_long(&ValRef::Bool(false)), None);
    }

    #[test]
    fn boolean_only_from_booleans() {
        assert_eq!(as_bool(&ValRef::Bool(true)), Some(true));
        assert_eq!(as_bool(&ValRef::Int(1)), None);
        assert_eq!(as_bool(&ValRef::Str(Cow::Borrowed("true"))), None);
    }

    #[test]
    fn timestamp_from_rfc3339_or_epoch_millis() {
        assert_eq!(as_micros(&ValRef::Str(Cow::Borrowed("2026-01-02T03:04:05.678Z"))), Some(1_767_323_045_678_000));
        assert_eq!(as_micros(&ValRef::Int(1_767_323_045_678)), Some(1_767_323_045_678_000));
        assert_eq!(as_micros(&ValRef::Str(Cow::Borrowed("yesterday"))), None);
        assert_eq!(as_micros(&ValRef::Float(1.5)), None);
        assert_eq!(as_micros(&ValRef::Int(i64::MAX)), None);
    }
}
