//! A data file's `add` action with its statistics, read from the file's Parquet footer.
//!
//! delta-rs makes these in `writer::stats`, which it does not export; this follows it for the
//! types a layout writes, so a table reads the same whichever writer wrote it: `numRecords`,
//! and per column `nullCount`, `minValues` and `maxValues` (dates as `YYYY-MM-DD`, timestamps
//! as UTC text truncated to milliseconds, as the protocol asks; binary columns have no
//! bounds). Columns are counted as `delta.dataSkippingNumIndexedCols` (default 32 top-level
//! columns, partition columns not counted) or named by `delta.dataSkippingStatsColumns`.

use std::collections::{HashMap, HashSet};

use delta_kernel::expressions::Scalar;
use deltalake_core::kernel::scalars::ScalarExt as _;
use deltalake_core::kernel::Add;
use indexmap::IndexMap;
use parquet::basic::{ConvertedType, LogicalType, TimeUnit, Type};
use parquet::file::metadata::ParquetMetaData;
use parquet::file::statistics::Statistics;
use serde_json::{Map, Value};

/// Which columns carry statistics: the table's data-skipping settings.
#[derive(Debug, Clone)]
pub(super) enum Indexed {
    /// The first n top-level columns (all of them with `None`, the setting's -1).
    First(Option<usize>),
    /// The columns `delta.dataSkippingStatsColumns` names.
    Named(HashSet<String>),
}

impl Indexed {
    /// From the table's configuration, as delta-rs reads it.
    pub(super) fn from_config(config: &HashMap<String, String>) -> Indexed {
        if let Some(cols) = config.get("delta.dataSkippingStatsColumns") {
            return Indexed::Named(cols.split(',').map(|c| c.trim().trim_matches('`').to_string()).collect());
        }
        match config.get("delta.dataSkippingNumIndexedCols").and_then(|v| v.trim().parse::<i64>().ok()) {
            Some(n) if n < 0 => Indexed::First(None),
            Some(n) => Indexed::First(Some(n as usize)),
            None => Indexed::First(Some(32)),
        }
    }
}

/// The `add` action of a data file at `path` (relative to the table) in the partition `values`.
pub(super) fn add_action(
    values: &IndexMap<String, Scalar>,
    path: String,
    size: usize,
    meta: &ParquetMetaData,
    indexed: &Indexed,
) -> Add {
    Add {
        path,
        size: size as i64,
        partition_values: values.iter().map(|(k, v)| (k.clone(), (!v.is_null()).then(|| v.serialize()))).collect(),
        modification_time: chrono::Utc::now().timestamp_millis(),
        data_change: true,
        stats: Some(stats(values, meta, indexed).to_string()),
        tags: None,
        deletion_vector: None,
        base_row_id: None,
        default_row_commit_version: None,
        clustering_provider: None,
    }
}

/// The statistics JSON of a file.
fn stats(values: &IndexMap<String, Scalar>, meta: &ParquetMetaData, indexed: &Indexed) -> Value {
    let (mut min, mut max, mut nulls) = (Map::new(), Map::new(), Map::new());
    let schema = meta.file_metadata().schema_descr();
    let mut admitted: Vec<String> = Vec::new();
    for (i, col) in schema.columns().iter().enumerate() {
        let parts = col.path().parts();
        let top = &parts[0];
        if values.contains_key(top) || col.max_rep_level() > 0 {
            continue;
        }
        let take = match indexed {
            Indexed::Named(names) => names.contains(&parts.join(".")) || names.contains(top),
            Indexed::First(limit) => {
                if !admitted.contains(top) {
                    if limit.is_some_and(|n| admitted.len() >= n) {
                        break;
                    }
                    admitted.push(top.clone());
                }
                true
            }
        };
        if !take {
            continue;
        }
        let logical = col.logical_type_ref().cloned().or(match col.converted_type() {
            ConvertedType::UTF8 => Some(LogicalType::String),
            ConvertedType::DATE => Some(LogicalType::Date),
            _ => None,
        });
        let binary = col.physical_type() == Type::BYTE_ARRAY && logical != Some(LogicalType::String);
        let (mut lo, mut hi, mut null_count): (Option<Bound>, Option<Bound>, Option<u64>) = (None, None, Some(0));
        // a row group without statistics (a column written without them) leaves the file's
        // bounds and null count unknown: none are given rather than ones that are wrong
        let mut bounded = !binary;
        for g in meta.row_groups() {
            let Some(s) = g.column(i).statistics() else {
                (null_count, bounded) = (None, false);
                break;
            };
            null_count = null_count.zip(s.null_count_opt()).map(|(a, b)| a + b);
            if !bounded {
                continue;
            }
            let (Some(a), Some(b)) = (bound(s, logical.as_ref(), true), bound(s, logical.as_ref(), false)) else {
                // a chunk with nulls only has no bounds, and needs none; other chunks without
                // them leave the file's unknown
                if s.null_count_opt() != Some(g.num_rows() as u64) {
                    bounded = false;
                }
                continue;
            };
            lo = Some(match lo {
                Some(l) if l.less(&a) => l,
                _ => a,
            });
            hi = Some(match hi {
                Some(h) if b.less(&h) => h,
                _ => b,
            });
        }
        if let Some(n) = null_count {
            insert(&mut nulls, parts, Value::from(n));
        }
        if let (true, Some(lo), Some(hi)) = (bounded, lo, hi) {
            insert(&mut min, parts, lo.json());
            insert(&mut max, parts, hi.json());
        }
    }
    serde_json::json!({
        "numRecords": meta.file_metadata().num_rows(),
        "minValues": min,
        "maxValues": max,
        "nullCount": nulls,
    })
}

/// One bound of a column chunk, in its logical type.
#[derive(Debug, Clone, PartialEq)]
enum Bound {
    Bool(bool),
    Int(i64),
    Float(f64),
    /// Days since 1970-01-01.
    Date(i32),
    /// Microseconds since 1970-01-01 UTC.
    Time(i64),
    Text(String),
}

impl Bound {
    fn less(&self, other: &Bound) -> bool {
        match (self, other) {
            (Bound::Bool(a), Bound::Bool(b)) => a < b,
            (Bound::Int(a), Bound::Int(b)) => a < b,
            (Bound::Float(a), Bound::Float(b)) => a < b,
            (Bound::Date(a), Bound::Date(b)) => a < b,
            (Bound::Time(a), Bound::Time(b)) => a < b,
            (Bound::Text(a), Bound::Text(b)) => a < b,
            _ => false,
        }
    }

    fn json(&self) -> Value {
        match self {
            Bound::Bool(b) => Value::from(*b),
            Bound::Int(i) => Value::from(*i),
            Bound::Float(f) => Value::from(*f),
            Bound::Date(d) => {
                let day = chrono::DateTime::from_timestamp(*d as i64 * 86_400, 0).unwrap_or_default();
                Value::from(day.format("%Y-%m-%d").to_string())
            }
            Bound::Time(us) => {
                let t = chrono::DateTime::from_timestamp_micros(*us).unwrap_or_default();
                let format =
                    if t.timestamp_subsec_nanos() == 0 { "%Y-%m-%dT%H:%M:%SZ" } else { "%Y-%m-%dT%H:%M:%S%.3fZ" };
                Value::from(t.format(format).to_string())
            }
            Bound::Text(s) => Value::from(s.as_str()),
        }
    }
}

/// The minimum (`min`) or maximum of a column chunk's statistics, if it has them.
fn bound(s: &Statistics, logical: Option<&LogicalType>, min: bool) -> Option<Bound> {
    fn pick<T: Copy>(lo: Option<&T>, hi: Option<&T>, min: bool) -> Option<T> {
        if min {
            lo.copied()
        } else {
            hi.copied()
        }
    }
    Some(match s {
        Statistics::Boolean(v) => Bound::Bool(pick(v.min_opt(), v.max_opt(), min)?),
        Statistics::Int32(v) => {
            let x = pick(v.min_opt(), v.max_opt(), min)?;
            match logical {
                Some(LogicalType::Date) => Bound::Date(x),
                Some(LogicalType::Decimal(_)) => return None,
                _ => Bound::Int(x as i64),
            }
        }
        Statistics::Int64(v) => {
            let x = pick(v.min_opt(), v.max_opt(), min)?;
            match logical {
                Some(LogicalType::Timestamp(t)) if t.is_adjusted_to_u_t_c => Bound::Time(match t.unit {
                    TimeUnit::MILLIS => x.checked_mul(1000)?,
                    TimeUnit::MICROS => x,
                    TimeUnit::NANOS => x.div_euclid(1000),
                }),
                Some(LogicalType::Timestamp(_)) | Some(LogicalType::Decimal(_)) => return None,
                _ => Bound::Int(x),
            }
        }
        Statistics::Float(v) => Bound::Float(pick(v.min_opt(), v.max_opt(), min)? as f64),
        Statistics::Double(v) => Bound::Float(pick(v.min_opt(), v.max_opt(), min)?),
        Statistics::ByteArray(v) if logical == Some(&LogicalType::String) => {
            let b = if min { v.min_bytes_opt() } else { v.max_bytes_opt() }?;
            Bound::Text(String::from_utf8(b.to_vec()).ok()?)
        }
        _ => return None,
    })
}

/// Sets `value` at `path` in nested objects.
fn insert(into: &mut Map<String, Value>, path: &[String], value: Value) {
    match path {
        [leaf] => {
            into.insert(leaf.clone(), value);
        }
        [head, rest @ ..] => {
            let child = into.entry(head.clone()).or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(m) = child {
                insert(m, rest, value);
            }
        }
        [] => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray};
    use parquet::arrow::ArrowWriter;
    use parquet::file::properties::{EnabledStatistics, WriterProperties};

    /// A column written without statistics (the export layout's JSON text) has neither bounds
    /// nor a null count in the file's statistics: a count of 0 would tell readers it has no
    /// nulls. Columns with statistics keep theirs, over every row group.
    #[test]
    fn a_column_without_statistics_has_no_bounds_and_no_null_count() {
        let json: ArrayRef = Arc::new(StringArray::from(vec![Some("{\"a\":1}"), None, Some("{\"a\":2}"), None]));
        let v: ArrayRef = Arc::new(Float64Array::from(vec![Some(2.5), None, Some(-1.0), Some(7.0)]));
        let rows = RecordBatch::try_from_iter(vec![("telemetry", json), ("v", v)]).unwrap();
        let props = WriterProperties::builder()
            .set_max_row_group_row_count(Some(2))
            .set_column_statistics_enabled("telemetry".into(), EnabledStatistics::None)
            .build();
        let mut buf = Vec::new();
        let mut w = ArrowWriter::try_new(&mut buf, rows.schema(), Some(props)).unwrap();
        w.write(&rows).unwrap();
        let meta = w.close().unwrap();
        let file = parquet::file::serialized_reader::SerializedFileReader::new(bytes::Bytes::from(buf)).unwrap();
        use parquet::file::reader::FileReader as _;
        assert_eq!(file.metadata().num_row_groups(), 2, "{meta:?}");
        let got = stats(&IndexMap::new(), file.metadata(), &Indexed::First(None));
        assert_eq!(
            got,
            serde_json::json!({
                "numRecords": 4,
                "minValues": {"v": -1.0},
                "maxValues": {"v": 7.0},
                "nullCount": {"v": 1},
            })
        );
    }
}
