//! `partition_by`: Hive-style partition paths rendered from each event's time and fields.

use crate::event::{Event, NO_TIME};
use crate::path::FieldPath;

#[derive(Debug, Clone)]
enum Seg {
    Lit(String),
    Time(String),
    Field(FieldPath),
}

/// A parsed `partition_by` template.
#[derive(Debug, Clone)]
pub struct PartitionTemplate {
    segs: Vec<Seg>,
    /// Width of the time bucket within which the time part of the path does not change.
    granularity: i64,
    has_fields: bool,
}

impl crate::config::values::Parse for PartitionTemplate {
    fn parse(text: &str) -> Result<Self, String> {
        PartitionTemplate::parse(text)
    }
}

impl PartitionTemplate {
    pub fn parse(t: &str) -> Result<PartitionTemplate, String> {
        let mut segs = Vec::new();
        let mut lit = String::new();
        let mut chars = t.chars().peekable();
        let mut granularity = 86_400i64;
        let mut has_fields = false;
        while let Some(c) = chars.next() {
            match c {
                '%' => {
                    let d = chars.next().ok_or("a `%` at the end")?;
                    if !lit.is_empty() {
                        segs.push(Seg::Lit(std::mem::take(&mut lit)));
                    }
                    let g = match d {
                        'Y' | 'y' | 'C' | 'G' | 'g' => 86_400 * 366,
                        'm' | 'b' | 'B' | 'h' => 86_400 * 28,
                        'd' | 'e' | 'j' | 'F' | 'a' | 'A' | 'u' | 'w' | 'D' => 86_400,
                        'H' | 'k' | 'I' | 'l' | 'p' | 'P' => 3_600,
                        'M' | 'R' => 60,
                        'S' | 'T' | 's' => 1,
                        '%' => {
                            lit.push('%');
                            continue;
                        }
                        other => {
                            return Err(format!(
                                "`%{other}` is not supported in partition paths (use %Y %m %d %H %M %S %j %F)"
                            ))
                        }
                    };
                    granularity = granularity.min(g);
                    segs.push(Seg::Time(format!("%{d}")));
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => return Err("unclosed `{`".into()),
                        }
                    }
                    if !lit.is_empty() {
                        segs.push(Seg::Lit(std::mem::take(&mut lit)));
                    }
                    segs.push(Seg::Field(FieldPath::parse(&name)?));
                    has_fields = true;
                }
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            segs.push(Seg::Lit(lit));
        }
        if t.starts_with('/') || t.contains("..") {
            return Err("must be a relative path without `..`".into());
        }
        // day granularity and coarser are not aligned to the bucket (months differ); only
        // hour and finer are cached by bucket
        Ok(PartitionTemplate { segs, granularity, has_fields })
    }

    fn render(&self, ev: &Event, time: i64, out: &mut String) {
        let dt = (time != NO_TIME).then(|| crate::time::to_chrono(time));
        for s in &self.segs {
            match s {
                Seg::Lit(l) => out.push_str(l),
                Seg::Time(f) => match &dt {
                    Some(d) => {
                        use std::fmt::Write as _;
                        let _ = write!(out, "{}", d.format(f));
                    }
                    None => out.push_str("unknown"),
                },
                Seg::Field(p) => {
                    let v = p.get(ev).map(|v| crate::path::key_string(&v)).unwrap_or_else(|| "null".into());
                    out.push_str(&sanitize_segment(&v));
                }
            }
        }
    }
}

fn sanitize_segment(v: &str) -> String {
    let s: String = v.chars().map(|c| if c == '/' || c == '\\' || c.is_control() { '_' } else { c }).collect();
    if s.is_empty() || s == "." || s == ".." {
        "_".into()
    } else {
        s
    }
}

/// Computes partition paths, caching the last time bucket.
pub(super) struct Partitioner {
    pub(super) template: Option<PartitionTemplate>,
    pub(super) time_path: Option<FieldPath>,
    pub(super) cache: Option<(i64, i64, String)>,
}

impl Partitioner {
    pub(super) fn path(&mut self, ev: &Event) -> String {
        let Some(t) = &self.template else {
            return String::new();
        };
        let time = match &self.time_path {
            Some(p) => p.get(ev).and_then(|v| v.as_time()).unwrap_or(NO_TIME),
            None => ev.time,
        };
        if !t.has_fields && t.granularity <= 3_600 && time != NO_TIME {
            if let Some((lo, hi, s)) = &self.cache {
                if time >= *lo && time < *hi {
                    return s.clone();
                }
            }
            let g = t.granularity * 1_000_000_000;
            let lo = time.div_euclid(g) * g;
            let mut s = String::new();
            t.render(ev, time, &mut s);
            self.cache = Some((lo, lo + g, s.clone()));
            return s;
        }
        let mut s = String::new();
        t.render(ev, time, &mut s);
        s
    }
}
