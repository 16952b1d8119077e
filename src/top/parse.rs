//! A small parser of the Prometheus text exposition format (and of OpenMetrics text, which
//! `centralflow run` serves): enough for `centralflow top`, which reads counters and gauges.
//!
//! Each sample is given its family: the name of its `# TYPE` line, with the suffixes of that type
//! (`_total` and `_created` of a counter, `_bucket`, `_sum`, `_count` of a histogram ...) taken
//! off the sample's name. A counter declared with its `_total` (the older Prometheus style) is
//! named without it too, so both formats give the same family names.

use std::fmt;

/// One sample: `name{labels} value [timestamp]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The family (see the module doc): `centralflow_events_in` for `centralflow_events_in_total`.
    pub family: String,
    /// The name as written.
    pub name: String,
    pub labels: Labels,
    pub value: f64,
}

impl Sample {
    /// The value of a label.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// A line that is not a comment, a blank or a sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for ParseError {}

/// The suffixes a sample's name may add to its family's, by type.
fn suffixes(kind: &str) -> &'static [&'static str] {
    match kind {
        "counter" => &["_total", "_created"],
        "histogram" | "gaugehistogram" => &["_bucket", "_sum", "_count", "_created", "_gsum", "_gcount"],
        "summary" => &["_sum", "_count", "_created"],
        "info" => &["_info"],
        _ => &[],
    }
}

/// Parses an exposition; fails on the first line that is neither a comment nor a sample.
pub fn parse(text: &str) -> Result<Vec<Sample>, ParseError> {
    // the family of the last # TYPE line, and its type
    let mut current: Option<(String, String)> = None;
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let err = |message: String| ParseError { line: i + 1, message };
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.split_whitespace();
            if words.next() == Some("TYPE") {
                let (Some(name), Some(kind)) = (words.next(), words.next()) else {
                    return Err(err(format!("a TYPE line without a name and a type: {line:?}")));
                };
                current = Some((name.to_string(), kind.to_string()));
            }
            continue; // HELP, UNIT, EOF and free comments
        }
        let (name, labels, rest) = sample_parts(line).map_err(err)?;
        let value = rest
            .split_whitespace()
            .next()
            .ok_or_else(|| err(format!("no value: {line:?}")))
            .and_then(|v| parse_value(v).ok_or_else(|| err(format!("{v:?} is not a number"))))?;
        out.push(Sample { family: family_of(name, current.as_ref()), name: name.to_string(), labels, value });
    }
    Ok(out)
}

/// The family of a sample named `name` under the last `# TYPE` line.
fn family_of(name: &str, current: Option<&(String, String)>) -> String {
    let Some((family, kind)) = current else { return name.to_string() };
    let belongs =
        name == family || suffixes(kind).iter().any(|s| name.strip_suffix(s).is_some_and(|base| base == family));
    if !belongs {
        return name.to_string();
    }
    match kind.as_str() {
        "counter" => family.strip_suffix("_total").unwrap_or(family).to_string(),
        _ => family.clone(),
    }
}

/// `+Inf`, `-Inf`, `NaN` and decimal or exponent notation.
fn parse_value(v: &str) -> Option<f64> {
    match v {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => v.parse().ok(),
    }
}

type Labels = Vec<(String, String)>;
type Parts<'a> = (&'a str, Labels, &'a str);

/// Splits a sample line into its name, its labels and what follows them (value, timestamp,
/// exemplar).
fn sample_parts(line: &str) -> Result<Parts<'_>, String> {
    let end = line.find(|c: char| c == '{' || c.is_whitespace()).unwrap_or(line.len());
    let name = &line[..end];
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
        return Err(format!("not a metric name: {line:?}"));
    }
    let rest = &line[end..];
    let Some(body) = rest.strip_prefix('{') else { return Ok((name, Vec::new(), rest)) };
    let (labels, after) = labels(body).map_err(|e| format!("{e}: {line:?}"))?;
    Ok((name, labels, after))
}

/// The labels after `{`, up to and with the closing `}`; returns them and the text after it.
fn labels(mut s: &str) -> Result<(Labels, &str), String> {
    let mut out = Vec::new();
    loop {
        s = s.trim_start();
        if let Some(after) = s.strip_prefix('}') {
            return Ok((out, after));
        }
        let eq = s.find('=').ok_or("a label without a value")?;
        let key = s[..eq].trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("bad label name {key:?}"));
        }
        let quoted = s[eq + 1..].trim_start().strip_prefix('"').ok_or("a label value without quotes")?;
        let (value, after) = quoted_value(quoted)?;
        out.push((key.to_string(), value));
        s = after.trim_start();
        if let Some(after) = s.strip_prefix(',') {
            s = after;
        } else if !s.starts_with('}') {
            return Err("expected `,` or `}` after a label".into());
        }
    }
}

/// A label value after its opening quote, with `\\`, `\"` and `\n` unescaped; returns it and the
/// text after its closing quote.
fn quoted_value(s: &str) -> Result<(String, &str), String> {
    let mut value = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((value, &s[i + 1..])),
            '\\' => match chars.next() {
                Some((_, 'n')) => value.push('\n'),
                Some((_, '"')) => value.push('"'),
                Some((_, '\\')) => value.push('\\'),
                Some((_, other)) => {
                    value.push('\\');
                    value.push(other);
                }
                None => break,
            },
            c => value.push(c),
        }
    }
    Err("an unterminated label value".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels_of(s: &Sample) -> Vec<(&str, &str)> {
        s.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
    }

    #[test]
    fn openmetrics_counters_lose_total_and_keep_their_labels() {
        let text = "# HELP centralflow_events_in Events received by a component.\n\
# TYPE centralflow_events_in counter\n\
centralflow_events_in_total{component=\"sim\",kind=\"simulator\"} 1200\n\
centralflow_events_in_created{component=\"sim\",kind=\"simulator\"} 1.7e9\n\
# HELP centralflow_checkpoint_age_seconds Time since the last durable checkpoint.\n\
# TYPE centralflow_checkpoint_age_seconds gauge\n\
centralflow_checkpoint_age_seconds 0.25\n\
# EOF\n";
        let s = parse(text).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].family, "centralflow_events_in");
        assert_eq!(s[0].name, "centralflow_events_in_total");
        assert_eq!(labels_of(&s[0]), [("component", "sim"), ("kind", "simulator")]);
        assert_eq!(s[0].label("kind"), Some("simulator"));
        assert_eq!(s[0].value, 1200.0);
        assert_eq!(s[1].family, "centralflow_events_in");
        assert_eq!(s[1].value, 1.7e9);
        assert_eq!((s[2].family.as_str(), s[2].value), ("centralflow_checkpoint_age_seconds", 0.25));
        assert!(s[2].labels.is_empty());
    }

    #[test]
    fn prometheus_style_counters_declared_with_total_name_the_same_family() {
        let s =
            parse("# TYPE http_requests_total counter\nhttp_requests_total{code=\"200\"} 3 1700000000000\n").unwrap();
        assert_eq!((s[0].family.as_str(), s[0].value), ("http_requests", 3.0));
        // without a TYPE line the name is the family: nothing is guessed
        let s = parse("untyped_total 4\n").unwrap();
        assert_eq!(s[0].family, "untyped_total");
    }

    #[test]
    fn escaped_quotes_backslashes_and_newlines_in_label_values() {
        let s = parse(r#"m{a="say \"hi\"",b="C:\\dir",c="two\nlines",d="x}, y=\"z\""} 1"#).unwrap();
        assert_eq!(
            labels_of(&s[0]),
            [("a", "say \"hi\""), ("b", "C:\\dir"), ("c", "two\nlines"), ("d", "x}, y=\"z\"")]
        );
        // a trailing comma and spaces are allowed
        let s = parse("m{ a = \"1\" , } 2").unwrap();
        assert_eq!((labels_of(&s[0]), s[0].value), (vec![("a", "1")], 2.0));
    }

    #[test]
    fn histograms_special_values_and_exemplars() {
        let text = "# TYPE b histogram\nb_bucket{le=\"+Inf\"} 7 # {trace_id=\"x\"} 1\nb_sum NaN\nb_count 7\nc -Inf\n";
        let s = parse(text).unwrap();
        assert!(s[..3].iter().all(|s| s.family == "b"));
        assert_eq!(s[0].label("le"), Some("+Inf"));
        assert_eq!(s[0].value, 7.0);
        assert!(s[1].value.is_nan());
        assert_eq!((s[3].family.as_str(), s[3].value), ("c", f64::NEG_INFINITY));
    }

    #[test]
    fn malformed_lines_are_reported_with_their_number() {
        for (text, line) in [
            ("a 1\nb{x=\"1\" 2\n", 2),
            ("a{x=1} 1", 1),
            ("\n\na{x=\"1\"}", 3),
            ("a{x=\"1\"} one", 1),
            ("a{=\"1\"} 1", 1),
            ("a{x=\"unterminated} 1", 1),
            ("{x=\"1\"} 1", 1),
        ] {
            let e = parse(text).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
        }
    }
}
