//! Parsing JSON numbers: the common plain form in one pass, anything else by the standard
//! library.

use crate::event::Val;

/// A JSON number as an integer when it is one, else a float.
pub(in crate::model) fn parse_number(s: &str) -> Val {
    if let Some(v) = parse_plain_number(s.as_bytes()) {
        return v;
    }
    if !s.contains(['.', 'e', 'E']) {
        if let Ok(i) = s.parse::<i64>() {
            return Val::Int(i);
        }
    }
    s.parse::<f64>().map(Val::Float).unwrap_or(Val::Null)
}

/// Powers of ten that are exact in an f64.
const POW10: [f64; 16] = [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15];

/// The common case of [`parse_number`] in one pass: `-?digits(.digits)?` with at most 15
/// digits in all (telemetry such as `25.542`). The mantissa and the power of ten are then both
/// exact in an f64, so one division gives the correctly rounded value, as `str::parse` does
/// (Clinger's fast path). `None` for anything else (exponents, long numbers).
#[inline]
fn parse_plain_number(b: &[u8]) -> Option<Val> {
    let (neg, digits) = match b.first()? {
        b'-' => (true, &b[1..]),
        _ => (false, b),
    };
    let mut m: u64 = 0;
    let mut n = 0;
    let mut frac: Option<usize> = None;
    for &c in digits {
        match c {
            b'0'..=b'9' => {
                m = m * 10 + (c - b'0') as u64;
                n += 1;
                if n > 15 {
                    return None;
                }
                if let Some(f) = frac.as_mut() {
                    *f += 1;
                }
            }
            b'.' if frac.is_none() => frac = Some(0),
            _ => return None,
        }
    }
    match frac {
        _ if n == 0 => None,
        None => Some(Val::Int(if neg { -(m as i64) } else { m as i64 })),
        Some(0) => None,
        Some(f) => {
            let v = m as f64 / POW10[f];
            Some(Val::Float(if neg { -v } else { v }))
        }
    }
}
