//! Checking captured rows against a case's expectations, and saying how they differ.
//!
//! Values compare as JSON, except that numbers are equal when they are the same number (`2` and
//! `2.0`, and floats within a relative 1e-9, so that an average computed in another order still
//! matches) and strings that are both RFC 3339 times are equal when they are the same instant
//! (`...T00:01:00Z` and `...T00:01:00.000Z`).

use serde_json::{Map, Value};

use super::spec::{Order, Output};
use crate::event::Event;

/// A row as a test sees it: the event as JSON (as the JSONL sink writes it).
pub fn row_of(ev: &Event) -> Map<String, Value> {
    match serde_json::from_str::<Value>(&ev.to_json()) {
        Ok(Value::Object(m)) => m,
        Ok(other) => Map::from_iter([("value".to_string(), other)]),
        Err(e) => Map::from_iter([("unreadable".to_string(), Value::String(e.to_string()))]),
    }
}

/// Checks one output; returns the failures, each a message with its diff.
pub fn check(out: &Output, events: &[Event]) -> Vec<String> {
    let rows: Vec<Map<String, Value>> = events.iter().map(row_of).collect();
    let shown: Vec<Map<String, Value>> = match &out.fields {
        Some(f) => rows.iter().map(|r| project(r, f)).collect(),
        None => rows.clone(),
    };
    let mut failures = Vec::new();
    if let Some(n) = out.count {
        if n != rows.len() {
            let mut msg = format!("{}: expected {n} row{}, got {}", out.at, plural(n), rows.len());
            for r in rows.iter().take(5) {
                msg.push_str(&format!("\n  + {}", compact(r)));
            }
            if rows.len() > 5 {
                msg.push_str(&format!("\n  ({} more)", rows.len() - 5));
            }
            failures.push(msg);
        }
    }
    if let Some(expected) = &out.rows {
        let expected: Vec<Map<String, Value>> = match &out.fields {
            Some(f) => expected.iter().map(|r| project(r, f)).collect(),
            None => expected.clone(),
        };
        if let Some(diff) = diff_rows(&expected, &shown, out.order) {
            failures.push(format!("{}: rows differ\n{diff}", out.at));
        }
    }
    if let Some(wanted) = &out.contains {
        let missing: Vec<&Map<String, Value>> =
            wanted.iter().filter(|w| !rows.iter().any(|r| contains_row(r, w))).collect();
        for w in missing {
            let near = closest(w, &rows.iter().collect::<Vec<_>>(), true);
            failures.push(format!(
                "{}: no row contains {}{}",
                out.at,
                compact(w),
                near.map(|(r, d)| format!("\n    closest row: {}\n{d}", compact(r))).unwrap_or_default()
            ));
        }
    }
    if let Some(cond) = &out.condition {
        let mut bad = 0usize;
        let mut first = None;
        for (i, ev) in events.iter().enumerate() {
            let ok = cond.eval_bool(ev);
            if !matches!(ok, Ok(true)) {
                bad += 1;
                if first.is_none() {
                    let why = match ok {
                        Err(e) => format!(" ({e})"),
                        _ => String::new(),
                    };
                    first = Some(format!("row {}{why}: {}", i + 1, compact(&rows[i])));
                }
            }
        }
        if bad > 0 {
            failures.push(format!(
                "{}: condition `{}` fails for {bad} of {} rows; first: {}",
                out.at,
                cond.source(),
                rows.len(),
                first.unwrap_or_default()
            ));
        }
    }
    failures
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn project(r: &Map<String, Value>, fields: &[String]) -> Map<String, Value> {
    fields.iter().filter_map(|f| r.get(f).map(|v| (f.clone(), v.clone()))).collect()
}

/// The rows as a diff (`-` expected and missing, `+` unexpected, with field differences of the
/// closest pairs), or `None` when they match.
pub fn diff_rows(expected: &[Map<String, Value>], actual: &[Map<String, Value>], order: Order) -> Option<String> {
    match order {
        Order::Exact => diff_in_order(expected, actual),
        Order::Any => diff_any_order(expected, actual),
    }
}

fn diff_in_order(expected: &[Map<String, Value>], actual: &[Map<String, Value>]) -> Option<String> {
    let mut out = String::new();
    for i in 0..expected.len().max(actual.len()) {
        match (expected.get(i), actual.get(i)) {
            (Some(e), Some(a)) if rows_equal(e, a) => {}
            (Some(e), Some(a)) => out.push_str(&format!(
                "  row {}:\n  - {}\n  + {}\n{}",
                i + 1,
                compact(e),
                compact(a),
                fields_diff(e, a)
            )),
            (Some(e), None) => out.push_str(&format!("  row {} missing:\n  - {}\n", i + 1, compact(e))),
            (None, Some(a)) => out.push_str(&format!("  row {} unexpected:\n  + {}\n", i + 1, compact(a))),
            (None, None) => {}
        }
    }
    (!out.is_empty()).then_some(out)
}

fn diff_any_order(expected: &[Map<String, Value>], actual: &[Map<String, Value>]) -> Option<String> {
    let mut used = vec![false; actual.len()];
    let mut missing = Vec::new();
    for e in expected {
        match (0..actual.len()).find(|&j| !used[j] && rows_equal(e, &actual[j])) {
            Some(j) => used[j] = true,
            None => missing.push(e),
        }
    }
    let mut unexpected: Vec<&Map<String, Value>> =
        actual.iter().zip(&used).filter(|(_, u)| !**u).map(|(a, _)| a).collect();
    if missing.is_empty() && unexpected.is_empty() {
        return None;
    }
    let mut out = format!(
        "  expected {} row{}, got {}: {} missing, {} unexpected\n",
        expected.len(),
        plural(expected.len()),
        actual.len(),
        missing.len(),
        unexpected.len()
    );
    for e in missing {
        out.push_str(&format!("  - {}\n", compact(e)));
        // pair it with the closest unexpected row, to show what differs
        if let Some((a, d)) = closest(e, &unexpected, false) {
            out.push_str(&format!("  + {}\n{d}", compact(a)));
            let a: *const Map<String, Value> = a;
            unexpected.retain(|u| !std::ptr::eq(*u, a));
        }
    }
    for a in unexpected {
        out.push_str(&format!("  + {}\n", compact(a)));
    }
    Some(out)
}

/// The row sharing most field values with `want`, and the differing fields, if any row shares
/// at least one.
fn closest<'r>(
    want: &Map<String, Value>,
    rows: &[&'r Map<String, Value>],
    only_named: bool,
) -> Option<(&'r Map<String, Value>, String)> {
    let score =
        |r: &Map<String, Value>| want.iter().filter(|(k, v)| r.get(*k).is_some_and(|x| values_equal(v, x))).count();
    let best = rows.iter().copied().max_by_key(|r| score(r))?;
    if score(best) == 0 {
        return None;
    }
    let d = if only_named {
        fields_diff(want, &project(best, &want.keys().cloned().collect::<Vec<_>>()))
    } else {
        fields_diff(want, best)
    };
    Some((best, d))
}

/// Per field: `expected X, got Y` (or missing / unexpected fields).
fn fields_diff(e: &Map<String, Value>, a: &Map<String, Value>) -> String {
    let mut out = String::new();
    for (k, ev) in e {
        match a.get(k) {
            Some(av) if values_equal(ev, av) => {}
            Some(av) => out.push_str(&format!("      {k}: expected {ev}, got {av}\n")),
            None => out.push_str(&format!("      {k}: expected {ev}, missing\n")),
        }
    }
    for (k, av) in a {
        if !e.contains_key(k) {
            out.push_str(&format!("      {k}: not expected, got {av}\n"));
        }
    }
    out
}

/// Every field of `want` has an equal value in `row` (nested objects: the same, recursively).
pub fn contains_row(row: &Map<String, Value>, want: &Map<String, Value>) -> bool {
    want.iter().all(|(k, w)| match (row.get(k), w) {
        (Some(Value::Object(r)), Value::Object(w)) => contains_row(r, w),
        (Some(r), w) => values_equal(w, r),
        (None, _) => false,
    })
}

pub fn rows_equal(a: &Map<String, Value>, b: &Map<String, Value>) -> bool {
    a.len() == b.len() && a.iter().all(|(k, v)| b.get(k).is_some_and(|w| values_equal(v, w)))
}

/// JSON equality with numbers by value and times by instant.
pub fn values_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(i), Some(j)) => i == j,
            _ => {
                let (f, g) = (x.as_f64().unwrap_or(f64::NAN), y.as_f64().unwrap_or(f64::NAN));
                f == g || (f - g).abs() <= 1e-9 * f.abs().max(g.abs())
            }
        },
        (Value::String(s), Value::String(t)) => {
            s == t
                || matches!((crate::time::parse_rfc3339(s), crate::time::parse_rfc3339(t)), (Some(x), Some(y)) if x == y)
        }
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(p, q)| values_equal(p, q)),
        (Value::Object(x), Value::Object(y)) => rows_equal(x, y),
        _ => a == b,
    }
}

fn compact(r: &Map<String, Value>) -> String {
    let s = serde_json::to_string(r).unwrap_or_default();
    if s.len() > 400 {
        let mut end = 400;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}... ({} bytes)", &s[..end], s.len())
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn m(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn numbers_and_times_compare_by_value() {
        assert!(values_equal(&json!(2), &json!(2.0)));
        assert!(values_equal(&json!(0.1 + 0.2), &json!(0.3)));
        assert!(!values_equal(&json!(0.3), &json!(0.31)));
        assert!(values_equal(&json!("2026-11-01T00:01:00Z"), &json!("2026-11-01T00:01:00.000Z")));
        assert!(!values_equal(&json!("2026-11-01T00:01:00Z"), &json!("2026-11-01T00:01:01Z")));
        assert!(!values_equal(&json!("a"), &json!(1)));
    }

    #[test]
    fn any_order_reports_missing_and_unexpected_with_the_field_that_differs() {
        let e = vec![m(json!({"site": "a", "n": 2})), m(json!({"site": "b", "n": 1}))];
        let a = vec![m(json!({"site": "b", "n": 1})), m(json!({"site": "a", "n": 3}))];
        let d = diff_rows(&e, &a, Order::Any).expect("a difference");
        assert!(d.contains("1 missing, 1 unexpected"), "{d}");
        assert!(d.contains("n: expected 2, got 3"), "{d}");
        let same = [m(json!({"site": "a", "n": 2.0})), m(json!({"site": "b", "n": 1}))];
        assert_eq!(diff_rows(&e, &[same[1].clone(), same[0].clone()], Order::Any), None);
        assert!(diff_rows(&e, &[same[1].clone(), same[0].clone()], Order::Exact).is_some());
    }

    #[test]
    fn extra_and_missing_rows_are_both_reported() {
        let e = vec![m(json!({"x": 1}))];
        let d = diff_rows(&e, &[m(json!({"x": 1})), m(json!({"x": 9}))], Order::Any).unwrap();
        assert!(d.contains("0 missing, 1 unexpected") && d.contains("+ {\"x\":9}"), "{d}");
        let d = diff_rows(&e, &[], Order::Exact).unwrap();
        assert!(d.contains("row 1 missing"), "{d}");
    }

    #[test]
    fn contains_is_partial_and_recursive() {
        let row = m(json!({"a": 1, "t": {"x": 2, "y": 3}}));
        assert!(contains_row(&row, &m(json!({"t": {"x": 2}}))));
        assert!(!contains_row(&row, &m(json!({"t": {"x": 3}}))));
        assert!(!contains_row(&row, &m(json!({"b": 1}))));
    }
}
