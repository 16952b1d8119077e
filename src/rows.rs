//! The Arrow row contract: how events become Arrow columns and back, shared by every component
//! that writes or emits columns (the Parquet sink, the window's output built as columns).
//!
//! - the **export layout** of raw export messages ([`export_schema`], [`encode_export`]): the
//!   envelope fields typed, the payload objects as JSON text, anything else in `extra`;
//! - **derived rows** ([`infer_rows_schema`], [`encode_rows`]): one column per top-level field,
//!   typed from the values;
//! - a batch of rows put in a file's schema ([`conform`], [`schema_covers`]);
//! - one timestamp type for every time column ([`ts_type`]).

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::builder::{
    BinaryBuilder, BooleanBuilder, Float64Builder, Int32Builder, Int64Builder, StringBuilder,
    TimestampMicrosecondBuilder,
};
use arrow_array::ArrayRef;
use arrow_array::RecordBatch;
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};

use crate::event::{Event, Nanos, ValRef, NO_TIME};

const EXPORT_STRINGS: [&str; 8] =
    ["applicationId", "messageSource", "messageType", "deviceId", "schema", "templateId", "module", "component"];
const EXPORT_JSON: [&str; 7] =
    ["telemetry", "properties", "enrichments", "messageProperties", "actor", "resource", "updated"];

/// Where a top-level key of an export message goes in the export layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// [`EXPORT_STRINGS`]`[i]`
    String(usize),
    /// [`EXPORT_JSON`]`[i]`
    Json(usize),
    /// `extra` (or `enqueuedTime`, which has a column of its own)
    Other,
}

/// The slot of `key`: a `match` on the names of [`EXPORT_STRINGS`] and [`EXPORT_JSON`] (a test
/// keeps the two in step), which the compiler turns into a few length and byte tests instead
/// of a string comparison per name; once per key of every message.
fn export_slot(key: &str) -> Slot {
    match key {
        "applicationId" => Slot::String(0),
        "messageSource" => Slot::String(1),
        "messageType" => Slot::String(2),
        "deviceId" => Slot::String(3),
        "schema" => Slot::String(4),
        "templateId" => Slot::String(5),
        "module" => Slot::String(6),
        "component" => Slot::String(7),
        "telemetry" => Slot::Json(0),
        "properties" => Slot::Json(1),
        "enrichments" => Slot::Json(2),
        "messageProperties" => Slot::Json(3),
        "actor" => Slot::Json(4),
        "resource" => Slot::Json(5),
        "updated" => Slot::Json(6),
        _ => Slot::Other,
    }
}

/// The Arrow type of every timestamp column built (window output built as columns uses it too,
/// so that its files and files written from rows share a schema): microseconds, UTC-adjusted,
/// which every common reader opens as a timestamp. Spark (and so Fabric, Synapse and
/// Databricks) refuses nanosecond timestamps; IoT Central's times have millisecond precision,
/// so nothing is lost. A sink may write another unit ([`with_time_unit`]).
pub fn ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// An event time (nanoseconds since the epoch) in the unit of [`ts_type`].
#[inline]
pub fn ts_value(t: Nanos) -> i64 {
    t.div_euclid(1_000)
}

/// `schema` with every timestamp column in `unit` (UTC-adjusted), for a sink that writes that
/// unit; [`conform`] then casts batches built with [`ts_type`] to it.
pub fn with_time_unit(schema: &SchemaRef, unit: TimeUnit) -> SchemaRef {
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            DataType::Timestamp(_, tz) => f.as_ref().clone().with_data_type(DataType::Timestamp(unit, tz.clone())),
            _ => f.as_ref().clone(),
        })
        .collect();
    Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()))
}

/// The schema of the export layout.
pub fn export_schema(metadata_columns: bool) -> SchemaRef {
    let mut fields: Vec<Field> = Vec::new();
    for name in &EXPORT_STRINGS[..6] {
        fields.push(Field::new(*name, DataType::Utf8, true));
    }
    fields.push(Field::new("enqueuedTime", ts_type(), true));
    for name in &EXPORT_STRINGS[6..] {
        fields.push(Field::new(*name, DataType::Utf8, true));
    }
    for name in EXPORT_JSON {
        fields.push(Field::new(name, DataType::Utf8, true));
    }
    fields.push(Field::new("extra", DataType::Utf8, true));
    if metadata_columns {
        fields.extend(meta_fields());
    }
    Arc::new(Schema::new(fields))
}

fn meta_fields() -> Vec<Field> {
    vec![
        Field::new("_partition", DataType::Int32, false),
        Field::new("_offset", DataType::Int64, false),
        Field::new("_origin", DataType::Utf8, true),
        Field::new("_enqueued_time", ts_type(), true),
    ]
}

fn push_meta(events: &[&Event], cols: &mut Vec<ArrayRef>) {
    let mut p = Int32Builder::with_capacity(events.len());
    let mut o = Int64Builder::with_capacity(events.len());
    let mut g = StringBuilder::new();
    let mut q = TimestampMicrosecondBuilder::with_capacity(events.len()).with_timezone("UTC");
    for ev in events {
        p.append_value(ev.meta.partition as i32);
        o.append_value(ev.meta.offset);
        g.append_option(ev.meta.origin.as_deref());
        q.append_option((ev.meta.enqueued != NO_TIME).then_some(ts_value(ev.meta.enqueued)));
    }
    cols.push(Arc::new(p.finish()));
    cols.push(Arc::new(o.finish()));
    cols.push(Arc::new(g.finish()));
    cols.push(Arc::new(q.finish()));
}

const TEXT_COLUMNS: usize = EXPORT_STRINGS.len() + EXPORT_JSON.len();

thread_local! {
    /// Bytes per row of the export layout's text columns in this thread's last batch.
    static TEXT_PER_ROW: Cell<[usize; TEXT_COLUMNS]> = const { Cell::new([32; TEXT_COLUMNS]) };
}

/// Encodes export messages.
pub fn encode_export(events: &[&Event], metadata_columns: bool) -> anyhow::Result<RecordBatch> {
    encode_export_with(events, metadata_columns, |_| {})
}

/// Encodes export messages, calling `also` with each event while its fields are at hand (so
/// that other columns built from the same events cost no second pass over their memory).
pub fn encode_export_with(
    events: &[&Event],
    metadata_columns: bool,
    mut also: impl FnMut(&Event),
) -> anyhow::Result<RecordBatch> {
    let n = events.len();
    // text capacity from the bytes per row of this thread's last batch: a builder that grows
    // copies its text again (into fresh pages, which fault)
    let per_row = TEXT_PER_ROW.with(Cell::get);
    let with_room = |b: usize| StringBuilder::with_capacity(n, n * b + 64);
    let mut strings: Vec<StringBuilder> = per_row[..EXPORT_STRINGS.len()].iter().map(|b| with_room(*b)).collect();
    let mut jsons: Vec<StringBuilder> = per_row[EXPORT_STRINGS.len()..].iter().map(|b| with_room(*b)).collect();
    let mut extra = StringBuilder::new();
    let mut time = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut buf = String::new();
    for ev in events {
        let mut seen_s = [false; EXPORT_STRINGS.len()];
        let mut seen_j = [false; EXPORT_JSON.len()];
        let mut extra_buf: Option<String> = None;
        for (k, v) in ev.root().iter() {
            if k == "enqueuedTime" {
                continue;
            }
            let slot = export_slot(k);
            if let Slot::String(i) = slot {
                match &v {
                    ValRef::Str(s) => strings[i].append_value(s),
                    ValRef::Null => strings[i].append_null(),
                    other => strings[i].append_value(other.to_json()),
                }
                seen_s[i] = true;
            } else if let Slot::Json(i) = slot {
                if v.is_null() {
                    jsons[i].append_null();
                } else if let Some(raw) = if let ValRef::Obj(o) = &v { o.raw_json() } else { None } {
                    // an object as it came: its text, copied once
                    jsons[i].append_value(raw);
                } else {
                    buf.clear();
                    v.write_json(&mut buf);
                    jsons[i].append_value(&buf);
                }
                seen_j[i] = true;
            } else {
                let e = extra_buf.get_or_insert_with(|| String::from("{"));
                if e.len() > 1 {
                    e.push(',');
                }
                crate::event::write_json_str(e, k);
                e.push(':');
                v.write_json(e);
            }
        }
        for (i, s) in seen_s.iter().enumerate() {
            if !s {
                strings[i].append_null();
            }
        }
        for (i, s) in seen_j.iter().enumerate() {
            if !s {
                jsons[i].append_null();
            }
        }
        match extra_buf {
            Some(mut e) => {
                e.push('}');
                extra.append_value(e);
            }
            None => extra.append_null(),
        }
        time.append_option((ev.time != NO_TIME).then_some(ts_value(ev.time)));
        also(ev);
    }
    if n > 0 {
        let mut per_row = [0; TEXT_COLUMNS];
        for (b, t) in strings.iter().chain(&jsons).zip(&mut per_row) {
            // an eighth more than last time: rows vary
            *t = b.values_slice().len().div_ceil(n) * 9 / 8;
        }
        TEXT_PER_ROW.with(|c| c.set(per_row));
    }
    let mut cols: Vec<ArrayRef> = Vec::new();
    let mut strings = strings.into_iter();
    for _ in 0..6 {
        cols.push(Arc::new(strings.next().unwrap().finish()));
    }
    cols.push(Arc::new(time.finish()));
    for mut s in strings {
        cols.push(Arc::new(s.finish()));
    }
    for mut j in jsons {
        cols.push(Arc::new(j.finish()));
    }
    cols.push(Arc::new(extra.finish()));
    if metadata_columns {
        push_meta(events, &mut cols);
    }
    Ok(RecordBatch::try_new(export_schema(metadata_columns), cols)?)
}

/// A column's type while rows are scanned: a plain tag, so that inferring costs no allocation
/// per value (a `DataType::Timestamp` carries its time zone as an `Arc<str>`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Ty {
    Null,
    Bool,
    Int,
    Float,
    Time,
    Binary,
    Utf8,
}

impl Ty {
    fn of(v: &ValRef<'_>) -> Ty {
        match v {
            ValRef::Null => Ty::Null,
            ValRef::Bool(_) => Ty::Bool,
            ValRef::Int(_) => Ty::Int,
            ValRef::Float(_) => Ty::Float,
            ValRef::Num(s) if s.contains(['.', 'e', 'E']) => Ty::Float,
            ValRef::Num(_) => Ty::Int,
            ValRef::Time(_) => Ty::Time,
            ValRef::Bytes(_) => Ty::Binary,
            ValRef::Str(_) | ValRef::Obj(_) | ValRef::Json(_) => Ty::Utf8,
        }
    }

    /// The type that holds values of both.
    fn merge(self, b: Ty) -> Ty {
        use Ty::*;
        match (self, b) {
            (x, y) if x == y => x,
            (Null, y) => y,
            (x, Null) => x,
            (Int, Float) | (Float, Int) => Float,
            _ => Utf8,
        }
    }

    /// The Arrow type of the column (a column of nulls only is text).
    fn data_type(self) -> DataType {
        match self {
            Ty::Bool => DataType::Boolean,
            Ty::Int => DataType::Int64,
            Ty::Float => DataType::Float64,
            Ty::Time => ts_type(),
            Ty::Binary => DataType::Binary,
            Ty::Null | Ty::Utf8 => DataType::Utf8,
        }
    }
}

/// Infers the columns of derived rows: each top-level field, typed from its values.
pub fn infer_rows_schema(events: &[&Event], metadata_columns: bool) -> SchemaRef {
    let mut cols: Vec<(String, Ty)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for ev in events {
        let root = ev.root();
        // rows of one producer share their layout: compare by position before hashing
        let same_layout = root.len() == cols.len()
            && root.iter().zip(&cols).all(|((k, _), (c, _))| k.len() == c.len() && crate::event::eq_short(k, c));
        if same_layout {
            for ((_, v), col) in root.iter().zip(cols.iter_mut()) {
                if col.1 != Ty::Utf8 {
                    col.1 = col.1.merge(Ty::of(&v));
                }
            }
            continue;
        }
        for (k, v) in root.iter() {
            let t = Ty::of(&v);
            match index.get(k) {
                Some(&i) => cols[i].1 = cols[i].1.merge(t),
                None => {
                    index.insert(k.to_string(), cols.len());
                    cols.push((k.to_string(), t));
                }
            }
        }
        if index.len() != cols.len() {
            index = cols.iter().enumerate().map(|(i, c)| (c.0.clone(), i)).collect();
        }
    }
    let mut fields: Vec<Field> = cols.into_iter().map(|(k, t)| Field::new(k, t.data_type(), true)).collect();
    if metadata_columns {
        fields.extend(meta_fields());
    }
    Arc::new(Schema::new(fields))
}

/// Whether every column of `b` exists in `a` with a type `a` can hold.
pub fn schema_covers(a: &Schema, b: &Schema) -> bool {
    b.fields().iter().all(|f| a.field_with_name(f.name()).is_ok_and(|x| type_covers(x.data_type(), f.data_type())))
}

/// Whether a column of type `a` can hold values of type `b` (as [`conform`] converts them).
pub fn type_covers(a: &DataType, b: &DataType) -> bool {
    a == b || (a == &DataType::Float64 && b == &DataType::Int64) || a == &DataType::Utf8
}

/// Encodes rows into `schema`.
pub fn encode_rows<'a>(
    events: &[&'a Event],
    schema: &SchemaRef,
    metadata_columns: bool,
) -> anyhow::Result<RecordBatch> {
    let n = events.len();
    let data_fields = if metadata_columns { schema.fields().len() - 4 } else { schema.fields().len() };
    let mut cols: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    let mut buf = String::new();
    for (ci, f) in schema.fields().iter().take(data_fields).enumerate() {
        let name = f.name().as_str();
        fn at<'e>(ev: &'e Event, ci: usize, name: &str) -> Option<ValRef<'e>> {
            ev.root().get_at(ci, name)
        }
        let get = |ev: &&'a Event| at(ev, ci, name);
        let col: ArrayRef = match f.data_type() {
            DataType::Boolean => {
                let mut b = BooleanBuilder::with_capacity(n);
                for ev in events {
                    b.append_option(match get(ev) {
                        Some(ValRef::Bool(x)) => Some(x),
                        _ => None,
                    });
                }
                Arc::new(b.finish())
            }
            DataType::Int64 => {
                let mut b = Int64Builder::with_capacity(n);
                for ev in events {
                    b.append_option(get(ev).and_then(|v| v.as_i64()));
                }
                Arc::new(b.finish())
            }
            DataType::Float64 => {
                let mut b = Float64Builder::with_capacity(n);
                for ev in events {
                    b.append_option(get(ev).and_then(|v| v.as_f64()));
                }
                Arc::new(b.finish())
            }
            DataType::Timestamp(_, _) => {
                let mut b = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
                for ev in events {
                    b.append_option(get(ev).and_then(|v| v.as_time()).map(ts_value));
                }
                Arc::new(b.finish())
            }
            DataType::Binary => {
                let mut b = BinaryBuilder::new();
                for ev in events {
                    match get(ev) {
                        Some(ValRef::Bytes(x)) => b.append_value(x),
                        Some(ValRef::Null) | None => b.append_null(),
                        Some(other) => b.append_value(other.to_json()),
                    }
                }
                Arc::new(b.finish())
            }
            _ => {
                let mut b = StringBuilder::with_capacity(n, n * 16);
                for ev in events {
                    match get(ev) {
                        None | Some(ValRef::Null) => b.append_null(),
                        Some(ValRef::Str(s)) => b.append_value(s),
                        Some(ValRef::Time(t)) => b.append_value(crate::time::format_rfc3339(t)),
                        Some(other) => {
                            buf.clear();
                            other.write_json(&mut buf);
                            b.append_value(&buf);
                        }
                    }
                }
                Arc::new(b.finish())
            }
        };
        cols.push(col);
    }
    if metadata_columns {
        push_meta(events, &mut cols);
    }
    Ok(RecordBatch::try_new(schema.clone(), cols)?)
}

/// `rows` in a file's schema, which [covers](schema_covers) theirs: columns in the file's order,
/// converted to its types, and null where the rows lack a column (as [`encode_rows`] writes
/// rows without a field).
pub fn conform(rows: &RecordBatch, schema: &SchemaRef) -> anyhow::Result<RecordBatch> {
    if rows.schema().fields() == schema.fields() {
        return Ok(RecordBatch::try_new(schema.clone(), rows.columns().to_vec())?);
    }
    let cols = schema
        .fields()
        .iter()
        .map(|f| match rows.column_by_name(f.name()) {
            Some(c) if c.data_type() == f.data_type() => Ok(c.clone()),
            Some(c) => Ok(arrow_cast::cast(c, f.data_type())?),
            None => Ok(arrow_array::new_null_array(f.data_type(), rows.num_rows())),
        })
        .collect::<anyhow::Result<Vec<ArrayRef>>>()?;
    Ok(RecordBatch::try_new(schema.clone(), cols)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `export_slot` and the column name lists say the same: every name goes to its own
    /// column, and other keys (near misses included) go to `extra`.
    #[test]
    fn export_slots_follow_the_column_names() {
        for (i, name) in EXPORT_STRINGS.iter().enumerate() {
            assert_eq!(export_slot(name), Slot::String(i), "{name}");
        }
        for (i, name) in EXPORT_JSON.iter().enumerate() {
            assert_eq!(export_slot(name), Slot::Json(i), "{name}");
        }
        for other in ["enqueuedTime", "", "deviceid", "deviceId ", "telemetr", "Telemetry", "extra", "schemas"] {
            assert_eq!(export_slot(other), Slot::Other, "{other:?}");
        }
    }
}
