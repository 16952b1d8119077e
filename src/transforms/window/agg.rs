//! Aggregate functions and their accumulator layout.
//!
//! All accumulators of one (group, window) live in one run of `f64` cells ("slots"): the event
//! count, then per aggregated field only the cells its functions need (valid-value count, sum,
//! min, max, Welford mean and M2, first/last time and value). Quantile sketches live beside the
//! cells. Every accumulator can be merged with another, which session windows need.

use serde::{Deserialize, Serialize};
use sketches_ddsketch::{Config as SketchConfig, DDSketch};

use crate::event::{Event, Nanos, Value};
use crate::path::FieldPath;

/// Relative accuracy of quantiles: a returned value is within 1% of a value of the right rank.
pub const QUANTILE_ACCURACY: f64 = 0.01;

impl crate::config::values::Parse for AggFn {
    fn parse(text: &str) -> Result<Self, String> {
        AggFn::parse(text)
    }
}

/// One aggregate function.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AggFn {
    /// Number of numeric values of the field.
    Count,
    Sum,
    Avg,
    Min,
    Max,
    /// Value at the earliest event time (first arrival on ties).
    First,
    /// Value at the latest event time (last arrival on ties).
    Last,
    /// Sample standard deviation (n - 1), null below two values.
    Stddev,
    /// Population standard deviation.
    StddevPop,
    /// Approximate quantile `q` in [0, 1] (DDSketch, 1% relative accuracy).
    Quantile(f64),
}

impl AggFn {
    /// Parses `avg`, `p95`, `p99.9`, `q0.95`, `median`, ...
    pub fn parse(s: &str) -> Result<AggFn, String> {
        let t = s.trim().to_ascii_lowercase();
        Ok(match t.as_str() {
            "count" => AggFn::Count,
            "sum" => AggFn::Sum,
            "avg" | "mean" => AggFn::Avg,
            "min" => AggFn::Min,
            "max" => AggFn::Max,
            "first" => AggFn::First,
            "last" => AggFn::Last,
            "stddev" | "stddev_samp" => AggFn::Stddev,
            "stddev_pop" => AggFn::StddevPop,
            "median" => AggFn::Quantile(0.5),
            _ => {
                let q = if let Some(p) = t.strip_prefix('p') {
                    p.parse::<f64>().ok().map(|p| p / 100.0)
                } else if let Some(q) = t.strip_prefix('q') {
                    q.parse::<f64>().ok()
                } else {
                    None
                };
                match q {
                    Some(q) if (0.0..=1.0).contains(&q) => AggFn::Quantile(q),
                    _ => {
                        return Err(format!(
                            "unknown aggregate {s:?} (use count, sum, avg, min, max, first, last, stddev, stddev_pop, median, p50, p95, p99 or q0.999)"
                        ))
                    }
                }
            }
        })
    }

    /// The column suffix: `avg`, `p95`, `q0_999`.
    pub fn suffix(&self) -> String {
        match self {
            AggFn::Count => "count".into(),
            AggFn::Sum => "sum".into(),
            AggFn::Avg => "avg".into(),
            AggFn::Min => "min".into(),
            AggFn::Max => "max".into(),
            AggFn::First => "first".into(),
            AggFn::Last => "last".into(),
            AggFn::Stddev => "stddev".into(),
            AggFn::StddevPop => "stddev_pop".into(),
            AggFn::Quantile(q) => {
                let p = q * 100.0;
                if (p - p.round()).abs() < 1e-9 {
                    format!("p{}", p.round() as i64)
                } else {
                    format!("q{}", q).replace('.', "_")
                }
            }
        }
    }
}

/// The cells one field needs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct FieldLayout {
    base: usize,
    sum: bool,
    minmax: bool,
    welford: bool,
    first: bool,
    last: bool,
    /// Index among the sketches of a slot, if a quantile is asked for.
    sketch: Option<usize>,
}

// offsets within a field's cells
const N: usize = 0;

/// One aggregated field.
#[derive(Debug, Clone)]
pub struct FieldAgg {
    pub path: FieldPath,
    pub column: String,
    pub fns: Vec<AggFn>,
    /// Output column of each function.
    names: Vec<String>,
    layout: FieldLayout,
    off_sum: usize,
    off_min: usize,
    off_mean: usize,
    off_first: usize,
    off_last: usize,
}

impl FieldAgg {
    /// The field's value count in a (group, window)'s cells: its `count` aggregate.
    #[inline]
    pub fn count(&self, c: &[f64]) -> i64 {
        c[self.layout.base + N] as i64
    }

    /// A non-count aggregate of the field from a (group, window)'s cells and sketches; `None`
    /// (null) without values, or for a sample standard deviation of one value.
    #[inline]
    pub fn value(&self, func: &AggFn, c: &[f64], s: &[DDSketch]) -> Option<f64> {
        let b = self.layout.base;
        let n = c[b + N];
        if n == 0.0 {
            return None;
        }
        Some(match func {
            AggFn::Count => n,
            AggFn::Sum => c[b + self.off_sum],
            AggFn::Avg => c[b + self.off_sum] / n,
            AggFn::Min => c[b + self.off_min],
            AggFn::Max => c[b + self.off_min + 1],
            AggFn::First => c[b + self.off_first + 1],
            AggFn::Last => c[b + self.off_last + 1],
            AggFn::Stddev if n < 2.0 => return None,
            AggFn::Stddev => (c[b + self.off_mean + 1] / (n - 1.0)).max(0.0).sqrt(),
            AggFn::StddevPop => (c[b + self.off_mean + 1] / n).max(0.0).sqrt(),
            AggFn::Quantile(q) => return self.layout.sketch.and_then(|k| s[k].quantile(*q).ok().flatten()),
        })
    }
}

/// The accumulator layout of a window transform.
#[derive(Debug, Clone)]
pub struct AggPlan {
    pub fields: Vec<FieldAgg>,
    /// Cells per (group, window): `stride`. Cell 0 is the event count.
    pub stride: usize,
    /// Sketches per (group, window).
    pub sketches: usize,
}

/// Values skipped because they were missing or not numeric.
#[derive(Debug, Default, Clone, Copy)]
pub struct Skipped(pub u64);

impl AggPlan {
    /// Builds the layout for `(path, functions)` pairs.
    pub fn new(spec: &[(FieldPath, Vec<AggFn>)]) -> AggPlan {
        let mut stride = 1; // event count
        let mut sketches = 0;
        let mut fields = Vec::new();
        for (path, fns) in spec {
            let has = |f: &dyn Fn(&AggFn) -> bool| fns.iter().any(f);
            let sum = has(&|f| matches!(f, AggFn::Sum | AggFn::Avg));
            let minmax = has(&|f| matches!(f, AggFn::Min | AggFn::Max));
            let welford = has(&|f| matches!(f, AggFn::Stddev | AggFn::StddevPop));
            let first = has(&|f| matches!(f, AggFn::First));
            let last = has(&|f| matches!(f, AggFn::Last));
            let q = has(&|f| matches!(f, AggFn::Quantile(_)));
            let base = stride;
            let mut off = 1; // n
            let off_sum = off;
            off += sum as usize;
            let off_min = off;
            off += 2 * minmax as usize;
            let off_mean = off;
            off += 2 * welford as usize;
            let off_first = off;
            off += 2 * first as usize;
            let off_last = off;
            off += 2 * last as usize;
            stride += off;
            let sketch = q.then(|| {
                sketches += 1;
                sketches - 1
            });
            let column = column_name(path);
            fields.push(FieldAgg {
                names: fns.iter().map(|f| format!("{column}_{}", f.suffix())).collect(),
                column,
                path: path.clone(),
                fns: fns.clone(),
                layout: FieldLayout { base, sum, minmax, welford, first, last, sketch },
                off_sum,
                off_min,
                off_mean,
                off_first,
                off_last,
            });
        }
        AggPlan { fields, stride, sketches }
    }

    /// Fresh cells for one (group, window).
    pub fn init(&self, cells: &mut Vec<f64>) {
        let start = cells.len();
        cells.resize(start + self.stride, 0.0);
        for f in &self.fields {
            let b = start + f.layout.base;
            if f.layout.minmax {
                cells[b + f.off_min] = f64::INFINITY;
                cells[b + f.off_min + 1] = f64::NEG_INFINITY;
            }
            if f.layout.first {
                cells[b + f.off_first] = f64::from_bits(i64::MAX as u64);
            }
            if f.layout.last {
                cells[b + f.off_last] = f64::from_bits(i64::MIN as u64);
            }
        }
    }

    /// New sketches for one (group, window).
    pub fn init_sketches(&self, out: &mut Vec<DDSketch>) {
        for _ in 0..self.sketches {
            out.push(new_sketch());
        }
    }

    /// Appends the value of each aggregated field of `ev` to `out` (NaN when missing, not
    /// numeric or not finite). This is the part of aggregation that reads events, so it can run
    /// in parallel; [`AggPlan::add_values`] then only does arithmetic.
    pub fn extract(&self, ev: &Event, out: &mut Vec<f64>) {
        for f in &self.fields {
            let v = f.path.get_f64(ev).filter(|v| v.is_finite()).unwrap_or(f64::NAN);
            out.push(v);
        }
    }

    /// Adds one event at time `t` to the cells `c` (and sketches `s`).
    pub fn add(&self, ev: &Event, t: Nanos, c: &mut [f64], s: &mut [DDSketch], skipped: &mut Skipped) {
        let mut vals = Vec::with_capacity(self.fields.len());
        self.extract(ev, &mut vals);
        self.add_values(&vals, t, c, s, skipped);
    }

    /// Adds one event's extracted values (see [`AggPlan::extract`]) at time `t`.
    pub fn add_values(&self, vals: &[f64], t: Nanos, c: &mut [f64], s: &mut [DDSketch], skipped: &mut Skipped) {
        c[0] += 1.0;
        for (f, &v) in self.fields.iter().zip(vals) {
            if v.is_nan() {
                skipped.0 += 1;
                continue;
            }
            let b = f.layout.base;
            c[b + N] += 1.0;
            if f.layout.sum {
                c[b + f.off_sum] += v;
            }
            if f.layout.minmax {
                let i = b + f.off_min;
                if v < c[i] {
                    c[i] = v;
                }
                if v > c[i + 1] {
                    c[i + 1] = v;
                }
            }
            if f.layout.welford {
                let n = c[b + N];
                let i = b + f.off_mean;
                let delta = v - c[i];
                c[i] += delta / n;
                c[i + 1] += delta * (v - c[i]);
            }
            if f.layout.first {
                let i = b + f.off_first;
                if t < c[i].to_bits() as i64 {
                    c[i] = f64::from_bits(t as u64);
                    c[i + 1] = v;
                }
            }
            if f.layout.last {
                let i = b + f.off_last;
                if t >= c[i].to_bits() as i64 {
                    c[i] = f64::from_bits(t as u64);
                    c[i + 1] = v;
                }
            }
            if let Some(k) = f.layout.sketch {
                s[k].add(v);
            }
        }
    }

    /// Merges the cells `o` into `c` (`o` arrived later, for tie-breaking of first/last).
    pub fn merge(&self, c: &mut [f64], s: &mut [DDSketch], o: &[f64], os: &[DDSketch]) {
        c[0] += o[0];
        for f in &self.fields {
            let b = f.layout.base;
            let (na, nb) = (c[b + N], o[b + N]);
            c[b + N] = na + nb;
            if f.layout.sum {
                c[b + f.off_sum] += o[b + f.off_sum];
            }
            if f.layout.minmax {
                let i = b + f.off_min;
                c[i] = c[i].min(o[i]);
                c[i + 1] = c[i + 1].max(o[i + 1]);
            }
            if f.layout.welford && nb > 0.0 {
                let i = b + f.off_mean;
                if na == 0.0 {
                    c[i] = o[i];
                    c[i + 1] = o[i + 1];
                } else {
                    // Chan et al.'s parallel update
                    let n = na + nb;
                    let delta = o[i] - c[i];
                    c[i] += delta * nb / n;
                    c[i + 1] += o[i + 1] + delta * delta * na * nb / n;
                }
            }
            if f.layout.first {
                let i = b + f.off_first;
                if (o[i].to_bits() as i64) < c[i].to_bits() as i64 {
                    c[i] = o[i];
                    c[i + 1] = o[i + 1];
                }
            }
            if f.layout.last {
                let i = b + f.off_last;
                if o[i].to_bits() as i64 >= c[i].to_bits() as i64 && nb > 0.0 {
                    c[i] = o[i];
                    c[i + 1] = o[i + 1];
                }
            }
            if let Some(k) = f.layout.sketch {
                let _ = s[k].merge(&os[k]);
            }
        }
    }

    /// Appends the aggregate columns of one (group, window) to a row.
    pub fn finish(&self, c: &[f64], s: &[DDSketch], row: &mut Event) {
        let names = self.fields.iter().flat_map(|f| &f.names);
        for (name, v) in names.zip(self.values(c, s)) {
            row.push(name, v);
        }
    }

    /// Like [`AggPlan::finish`], into a row made from a layout whose column `first` is the first
    /// aggregate column (see [`AggPlan::columns`]).
    pub fn finish_at(&self, c: &[f64], s: &[DDSketch], row: &mut Event, first: usize) {
        for (i, v) in self.values(c, s).enumerate() {
            row.set_at(first + i, &v);
        }
    }

    /// The aggregate columns, in the order of [`AggPlan::columns`]: (field, function).
    pub fn aggregates(&self) -> impl Iterator<Item = (&FieldAgg, &AggFn)> + '_ {
        self.fields.iter().flat_map(|f| f.fns.iter().map(move |func| (f, func)))
    }

    /// The aggregate values, in the order of [`AggPlan::columns`]: [`Value::Int`] for a count,
    /// [`Value::Float`] or [`Value::Null`] for the rest.
    pub fn values<'a>(&'a self, c: &'a [f64], s: &'a [DDSketch]) -> impl Iterator<Item = Value> + 'a {
        self.aggregates().map(move |(f, func)| match func {
            AggFn::Count => Value::Int(f.count(c)),
            _ => f.value(func, c, s).map_or(Value::Null, Value::Float),
        })
    }

    /// Names of the aggregate columns, in output order.
    pub fn columns(&self) -> Vec<String> {
        self.fields.iter().flat_map(|f| f.names.iter().cloned()).collect()
    }
}

/// A sketch with the documented accuracy.
pub fn new_sketch() -> DDSketch {
    DDSketch::new(SketchConfig::new(QUANTILE_ACCURACY, 2048, 1.0e-9))
}

/// Output column prefix of a field: the path without a leading `telemetry.`, dots as `_`.
pub fn column_name(path: &FieldPath) -> String {
    let s = path.as_str();
    s.strip_prefix("telemetry.").unwrap_or(s).replace('.', "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_suffix() {
        for (s, suffix) in [
            ("avg", "avg"),
            ("p95", "p95"),
            ("P99", "p99"),
            ("median", "p50"),
            ("q0.999", "q0_999"),
            ("stddev", "stddev"),
        ] {
            assert_eq!(AggFn::parse(s).unwrap().suffix(), suffix, "{s}");
        }
        assert!(AggFn::parse("p101").is_err());
        assert!(AggFn::parse("average").unwrap_err().contains("unknown aggregate"));
    }

    fn ev(v: f64) -> Event {
        let mut e = Event::row();
        e.push("x", Value::Float(v));
        e
    }

    #[test]
    fn merge_equals_adding_everything_to_one() {
        let path = FieldPath::parse("x").unwrap();
        let fns: Vec<AggFn> = ["count", "sum", "avg", "min", "max", "first", "last", "stddev", "stddev_pop", "p50"]
            .iter()
            .map(|s| AggFn::parse(s).unwrap())
            .collect();
        let plan = AggPlan::new(&[(path, fns)]);
        let values: Vec<(i64, f64)> = (0..40).map(|i| ((i * 7919) % 40, (i as f64 * 1.37).sin() * 10.0)).collect();
        let mut skipped = Skipped::default();
        let (mut all, mut all_s) = (Vec::new(), Vec::new());
        plan.init(&mut all);
        plan.init_sketches(&mut all_s);
        let (mut a, mut a_s, mut b, mut b_s) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        plan.init(&mut a);
        plan.init_sketches(&mut a_s);
        plan.init(&mut b);
        plan.init_sketches(&mut b_s);
        for (i, (t, v)) in values.iter().enumerate() {
            plan.add(&ev(*v), *t, &mut all, &mut all_s, &mut skipped);
            if i < 25 {
                plan.add(&ev(*v), *t, &mut a, &mut a_s, &mut skipped);
            } else {
                plan.add(&ev(*v), *t, &mut b, &mut b_s, &mut skipped);
            }
        }
        plan.merge(&mut a, &mut a_s, &b, &b_s);
        let (mut r1, mut r2) = (Event::row(), Event::row());
        plan.finish(&all, &all_s, &mut r1);
        plan.finish(&a, &a_s, &mut r2);
        for col in plan.columns() {
            let x = r1.get(&col).unwrap().as_f64().unwrap();
            let y = r2.get(&col).unwrap().as_f64().unwrap();
            assert!((x - y).abs() <= 1e-9 * x.abs().max(1.0), "{col}: {x} vs {y}");
        }
        // reference values
        let n = values.len() as f64;
        let mean = values.iter().map(|v| v.1).sum::<f64>() / n;
        let var = values.iter().map(|v| (v.1 - mean).powi(2)).sum::<f64>() / (n - 1.0);
        assert!((r1.get("x_stddev").unwrap().as_f64().unwrap() - var.sqrt()).abs() < 1e-9);
        let first = values.iter().min_by_key(|v| v.0).unwrap().1;
        assert_eq!(r1.get("x_first").unwrap().as_f64().unwrap(), first);
    }

    #[test]
    fn quantiles_are_within_the_documented_error() {
        let plan = AggPlan::new(&[(FieldPath::parse("x").unwrap(), vec![AggFn::Quantile(0.95), AggFn::Quantile(0.5)])]);
        let (mut c, mut s) = (Vec::new(), Vec::new());
        plan.init(&mut c);
        plan.init_sketches(&mut s);
        let mut vals: Vec<f64> = (1..=10_000).map(|i| -50.0 + i as f64 * 0.013).collect();
        for v in &vals {
            plan.add(&ev(*v), 0, &mut c, &mut s, &mut Skipped::default());
        }
        vals.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let mut row = Event::row();
        plan.finish(&c, &s, &mut row);
        for (col, q) in [("x_p95", 0.95), ("x_p50", 0.5)] {
            let got = row.get(col).unwrap().as_f64().unwrap();
            let exact = vals[((vals.len() - 1) as f64 * q) as usize];
            assert!((got - exact).abs() <= QUANTILE_ACCURACY * exact.abs() + 0.013, "{col}: {got} vs {exact}");
        }
    }

    #[test]
    fn missing_and_non_numeric_values_are_skipped_and_counted() {
        let plan = AggPlan::new(&[(FieldPath::parse("x").unwrap(), vec![AggFn::Avg, AggFn::Count])]);
        let (mut c, mut s) = (Vec::new(), Vec::new());
        plan.init(&mut c);
        let mut skipped = Skipped::default();
        let mut bad = Event::row();
        bad.push("x", Value::Str("hot".into()));
        plan.add(&bad, 0, &mut c, &mut s, &mut skipped);
        plan.add(&Event::row(), 0, &mut c, &mut s, &mut skipped);
        plan.add(&ev(f64::NAN), 0, &mut c, &mut s, &mut skipped);
        plan.add(&ev(4.0), 0, &mut c, &mut s, &mut skipped);
        assert_eq!(skipped.0, 3);
        let mut row = Event::row();
        plan.finish(&c, &s, &mut row);
        assert_eq!(row.get("x_avg").unwrap().as_f64(), Some(4.0));
        assert_eq!(row.get("x_count").unwrap().as_i64(), Some(1));
    }
}
