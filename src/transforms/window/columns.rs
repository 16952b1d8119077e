//! Window output as Arrow columns, for ports whose consumers read them (the Parquet sink; see
//! [`Emitter::wants_columns`](crate::runtime::Emitter::wants_columns)).
//!
//! Building one [`Event`](crate::event::Event) per (group, window) and turning the rows back into
//! columns in the sink cost about a tenth of W1, most of it on the window's task, which is the
//! sequential part of the pipeline. The columns hold exactly the values the rows would: the
//! sink writes the same Parquet either way, except that an aggregate column is always typed
//! (`Float64`, `Int64` for counts) where rows whose values are all null give a text column.

use std::sync::Arc;

use arrow_array::builder::{Float64Builder, Int64Builder, StringBuilder};
use arrow_array::RecordBatch;
use arrow_array::{ArrayRef, BooleanArray, Float64Array, Int64Array, TimestampMicrosecondArray};
use arrow_schema::{DataType, Field, Schema};

use super::agg::AggFn;
use super::{Pane, Window};
use crate::event::Nanos;
use crate::rows::{ts_type, ts_value};

/// One group-by column: the text of each row's part of the key, without its type tag (`None`:
/// null), and the tag of its non-null values.
fn group_column<'a>(parts: &[&'a str], g: usize, c: usize) -> Option<(u8, Vec<Option<&'a str>>)> {
    let mut tag = None;
    let mut vals = Vec::with_capacity(parts.len() / g.max(1));
    for row in parts.chunks_exact(g) {
        let part = row[c];
        match part.as_bytes().first() {
            None => return None,
            Some(b'z') => vals.push(None),
            Some(&t) => {
                match tag {
                    None => tag = Some(t),
                    Some(x) if x == t => {}
                    // mixed types: the rows' column would be text holding JSON renderings
                    Some(_) => return None,
                }
                vals.push(Some(&part[1..]));
            }
        }
    }
    Some((tag.unwrap_or(b's'), vals))
}

impl Window {
    /// The rows of a closing pane, in `order`, as one columnar batch; `None` when a group-by
    /// column has no exact column type (JSON values, or values of several types): the pane is
    /// then emitted as rows.
    pub(super) fn pane_columns(&self, pane: &Pane, order: &[usize], start: Nanos, end: Nanos) -> Option<RecordBatch> {
        let n = order.len();
        let g = self.group_cols.len();
        let mut parts: Vec<&str> = Vec::with_capacity(n * g);
        for &i in order {
            let key = &*pane.keys[i];
            let key = key.split('\u{1e}').next().unwrap_or(key);
            let before = parts.len();
            parts.extend(key.split('\u{1f}').take(g));
            if parts.len() != before + g {
                return None;
            }
        }
        let mut fields: Vec<Field> = Vec::with_capacity(self.layout.len());
        let mut cols: Vec<ArrayRef> = Vec::with_capacity(self.layout.len());
        for (c, name) in self.group_cols.iter().enumerate() {
            let (tag, vals) = group_column(&parts, g, c)?;
            let col: ArrayRef = match tag {
                b's' => {
                    let bytes = vals.iter().flatten().map(|s| s.len()).sum();
                    let mut b = StringBuilder::with_capacity(n, bytes);
                    for v in &vals {
                        b.append_option(*v);
                    }
                    Arc::new(b.finish())
                }
                b'n' => {
                    let ints: Option<Vec<Option<i64>>> =
                        vals.iter().map(|v| v.map_or(Some(None), |s| s.parse::<i64>().ok().map(Some))).collect();
                    match ints {
                        Some(ints) => Arc::new(Int64Array::from(ints)),
                        None => Arc::new(Float64Array::from(
                            vals.iter().map(|v| v.map(|s| s.parse::<f64>().unwrap_or(f64::NAN))).collect::<Vec<_>>(),
                        )),
                    }
                }
                b'b' => Arc::new(BooleanArray::from(vals.iter().map(|v| v.map(|s| s == "true")).collect::<Vec<_>>())),
                b't' => Arc::new(
                    TimestampMicrosecondArray::from(
                        vals.iter().map(|v| v.and_then(|s| s.parse().ok()).map(ts_value)).collect::<Vec<_>>(),
                    )
                    .with_data_type(ts_type()),
                ),
                _ => return None,
            };
            fields.push(Field::new(name, col.data_type().clone(), true));
            cols.push(col);
        }
        for (name, t) in [("window_start", start), ("window_end", end)] {
            fields.push(Field::new(name, ts_type(), true));
            cols.push(Arc::new(TimestampMicrosecondArray::from(vec![ts_value(t); n]).with_data_type(ts_type())));
        }
        let (stride, ns) = (self.plan.stride, self.plan.sketches);
        fields.push(Field::new("count", DataType::Int64, true));
        cols.push(Arc::new(Int64Array::from_iter_values(order.iter().map(|&i| pane.cells[i * stride] as i64))));
        // straight from the accumulators, row by row (a row's cells are adjacent)
        enum Col {
            Int(Int64Builder),
            Float(Float64Builder),
        }
        let aggs: Vec<_> = self.plan.aggregates().collect();
        let mut builders: Vec<Col> = aggs
            .iter()
            .map(|(_, func)| match func {
                AggFn::Count => Col::Int(Int64Builder::with_capacity(n)),
                _ => Col::Float(Float64Builder::with_capacity(n)),
            })
            .collect();
        for &i in order {
            let (c, s) = (&pane.cells[i * stride..(i + 1) * stride], &pane.sketches[i * ns..(i + 1) * ns]);
            for ((f, func), col) in aggs.iter().zip(&mut builders) {
                match col {
                    Col::Int(b) => b.append_value(f.count(c)),
                    Col::Float(b) => b.append_option(f.value(func, c, s)),
                }
            }
        }
        for (col, name) in builders.into_iter().zip(self.plan.columns()) {
            let col: ArrayRef = match col {
                Col::Int(mut b) => Arc::new(b.finish()),
                Col::Float(mut b) => Arc::new(b.finish()),
            };
            fields.push(Field::new(name, col.data_type().clone(), true));
            cols.push(col);
        }
        RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).ok()
    }
}
