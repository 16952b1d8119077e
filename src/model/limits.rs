//! What a record may be, beyond JSON's grammar: the limits serde_json applies when it builds a
//! value (nesting, numbers, surrogate escapes) and that its skipping (`RawValue`, `IgnoredAny`,
//! which the decoder uses for kept and ignored values) does not, and how many messages one array
//! record may hold. Every decoder checks these on the paths where it would otherwise accept what
//! `serde_json::from_str::<Value>` refuses; the scanner (`scan.rs`) gives up on all of them.
//!
//! README, "Limits", lists them for users.

/// Containers open at once that serde_json accepts: its recursion limit is 128, and the
/// 128th nested array or object is refused.
pub const MAX_NESTING: usize = 127;

/// Messages in one array record. A record is at most 256 KiB, and the smallest export message is
/// about 70 bytes, so no real array comes near; a longer one is refused whole.
pub const MAX_ARRAY_ELEMENTS: usize = 10_000;

/// Element errors of one array record handed on one by one (each becomes a dead letter that
/// carries the whole record); the rest are counted in one more.
pub const MAX_ELEMENT_ERRORS: usize = 10;

/// `Err` with the reason when an array record has more than [`MAX_ARRAY_ELEMENTS`] elements.
pub fn check_array_len(n: usize) -> Result<(), String> {
    if n > MAX_ARRAY_ELEMENTS {
        return Err(format!("array of {n} elements exceeds the limit of {MAX_ARRAY_ELEMENTS} messages per record"));
    }
    Ok(())
}

/// Hands the results of an array record's elements on: events as they are, the first
/// [`MAX_ELEMENT_ERRORS`] errors one by one (`array element {i}: …`), and the count of the rest
/// in one more ([`ElementErrors::finish`]).
#[derive(Default)]
pub struct ElementErrors {
    refused: usize,
}

impl ElementErrors {
    pub fn pass<T>(&mut self, i: usize, r: Result<T, String>, out: &mut impl FnMut(Result<T, String>)) {
        match r {
            Ok(v) => out(Ok(v)),
            Err(e) => {
                self.refused += 1;
                if self.refused <= MAX_ELEMENT_ERRORS {
                    out(Err(format!("array element {i}: {e}")));
                }
            }
        }
    }

    pub fn finish<T>(self, out: &mut impl FnMut(Result<T, String>)) {
        if self.refused > MAX_ELEMENT_ERRORS {
            out(Err(format!(
                "{} more array elements refused (the first {MAX_ELEMENT_ERRORS} of a record are dead letters of their own)",
                self.refused - MAX_ELEMENT_ERRORS
            )));
        }
    }
}

/// Checks `text` (already valid JSON by the grammar, or about to be parsed by serde_json, which
/// words grammar errors) against serde_json's value limits: nesting deeper than [`MAX_NESTING`],
/// a number out of `f64`'s range, a `\u` surrogate escape that is not a proper pair. `Err`: the
/// reason, with the byte offset.
pub fn check_value_limits(text: &str) -> Result<(), String> {
    let b = text.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    // just after an object's `{`: the next string is its first key
    let mut first_key = false;
    while i < b.len() {
        match b[i] {
            b'"' => {
                let end = string(b, i + 1)?;
                if first_key && is_reserved_key(&text[i..end.min(text.len())]) {
                    return Err(format!(
                        "object key {RESERVED_KEY:?} at byte {i} is reserved by the JSON library (it would replace the object)"
                    ));
                }
                first_key = false;
                i = end;
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Err(format!(
                        "JSON nested more than {MAX_NESTING} levels deep at byte {i} (serde_json's recursion limit)"
                    ));
                }
                first_key = b[i] == b'{';
                i += 1;
            }
            b']' | b'}' => {
                depth = depth.saturating_sub(1);
                first_key = false;
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                first_key = false;
                i = number(b, i)?
            }
            c => {
                first_key &= c.is_ascii_whitespace();
                i += 1
            }
        }
    }
    Ok(())
}

/// The object key through which serde_json (with its `raw_value` feature, which the decoder
/// needs) reads an object as the JSON text of its value: as the first key of an object it makes
/// `from_str::<Value>` return that text's value, or an error, instead of the object. The stages
/// that read events as values (jq, expressions, mutations, the device bridge) would then see
/// other data than the sinks, so a record holding it anywhere as a first key is refused.
pub const RESERVED_KEY: &str = "$serde_json::private::RawValue";

/// Whether `quoted` (a JSON string with its quotes) is [`RESERVED_KEY`], escapes decoded.
fn is_reserved_key(quoted: &str) -> bool {
    let inner = quoted.strip_prefix('"').and_then(|q| q.strip_suffix('"')).unwrap_or("");
    if inner == RESERVED_KEY {
        return true;
    }
    // escaped letters spell it too; only such a key pays for decoding
    inner.len() >= RESERVED_KEY.len()
        && inner.contains('\\')
        && serde_json::from_str::<String>(quoted).is_ok_and(|k| k == RESERVED_KEY)
}

/// Whether a JSON number's text stands for a finite `f64` (serde_json refuses one that does not
/// as "number out of range"; integers too long for 64 bits are read as `f64` too).
pub fn number_in_range(n: &str) -> bool {
    // without an exponent, fewer than 309 digits cannot overflow
    if n.len() < 300 && !n.bytes().any(|c| c == b'e' || c == b'E') {
        return true;
    }
    n.parse::<f64>().is_ok_and(f64::is_finite)
}

/// A number starting at `b[i]`: the offset after it.
fn number(b: &[u8], start: usize) -> Result<usize, String> {
    let mut i = start;
    while i < b.len() && matches!(b[i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') {
        i += 1;
    }
    // ASCII bytes only, so always UTF-8
    let text = std::str::from_utf8(&b[start..i]).unwrap_or("");
    if !number_in_range(text) {
        let shown: String = text.chars().take(40).collect();
        return Err(format!("number out of range at byte {start}: {shown}"));
    }
    Ok(i)
}

/// The inside of a string from `b[i]` (after its `"`): the offset after the closing quote.
fn string(b: &[u8], mut i: usize) -> Result<usize, String> {
    while i < b.len() {
        match b[i] {
            b'"' => return Ok(i + 1),
            b'\\' if b.get(i + 1) == Some(&b'u') => {
                let at = i;
                let Some(c) = hex4(b, i + 2) else { return Ok(b.len()) }; // serde_json words it
                i += 6;
                if (0xDC00..0xE000).contains(&c) {
                    return Err(format!("lone trailing surrogate in a \\u escape at byte {at}"));
                }
                if (0xD800..0xDC00).contains(&c) {
                    let low =
                        (b.get(i) == Some(&b'\\') && b.get(i + 1) == Some(&b'u')).then(|| hex4(b, i + 2)).flatten();
                    match low {
                        Some(l) if (0xDC00..0xE000).contains(&l) => i += 6,
                        _ => return Err(format!("lone leading surrogate in a \\u escape at byte {at}")),
                    }
                }
            }
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    Ok(i)
}

fn hex4(b: &[u8], i: usize) -> Option<u32> {
    let h = b.get(i..i + 4)?;
    u32::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Agrees with `serde_json::from_str::<Value>` on valid JSON: refused exactly when serde_json
    /// refuses it.
    fn agrees(text: &str) {
        let serde = serde_json::from_str::<serde_json::Value>(text);
        let ours = check_value_limits(text);
        assert_eq!(ours.is_ok(), serde.is_ok(), "{:.80}: ours {ours:?}, serde_json {serde:?}", text);
    }

    #[test]
    fn nesting_is_refused_where_serde_json_refuses_it() {
        for n in [1, 64, 100, 126, 127, 128, 129, 200, 120_000] {
            agrees(&format!("{}{}", "[".repeat(n), "]".repeat(n)));
            agrees(&format!("{}1{}", "[".repeat(n), "]".repeat(n)));
            agrees(&format!("{}1{}", "{\"a\":".repeat(n), "}".repeat(n)));
        }
        // brackets inside strings do not count
        agrees(&format!("[\"{}\"]", "[".repeat(500)));
    }

    #[test]
    fn numbers_out_of_range_are_refused_as_serde_json_refuses_them() {
        for n in [
            "1e400",
            "-1e400",
            "1e308",
            "1.7976931348623157e308",
            "1.8e308",
            "1e-400",
            "0e999999",
            "123456789e300",
            "1E+309",
            "-0.0",
            "18446744073709551616",
            "99999999999999999999999999999",
        ] {
            agrees(n);
            agrees(&format!("{{\"t\":{{\"v\":[{n}]}}}}"));
        }
        agrees(&"9".repeat(400));
        agrees(&format!("{}.5", "9".repeat(400)));
        agrees(&format!("0.{}", "9".repeat(400)));
    }

    #[test]
    fn surrogate_escapes_are_refused_unless_paired() {
        for s in [
            r#""\ud800""#,
            r#""\uD83D\uDE00""#,
            r#""\udc00""#,
            r#""\ud800\u0041""#,
            r#""\ud800x""#,
            r#""a\\ud800""#,
            r#""\uDBFF\uDFFF""#,
            r#"{"k\ud800":1}"#,
            r#"["\u0041\ud83d\ude00\u00e9"]"#,
        ] {
            agrees(s);
        }
    }

    #[test]
    fn the_reserved_key_is_refused_only_as_a_first_key() {
        // serde_json turns such an object into the value its text stands for, or refuses it
        let v: serde_json::Value = serde_json::from_str(r#"{"$serde_json::private::RawValue":"[1]"}"#).unwrap();
        assert_eq!(v, serde_json::json!([1]));
        for refused in [
            r#"{"$serde_json::private::RawValue":"[1]"}"#,
            r#"{"$serde_json::private::RawValue":"x"}"#,
            r#"{ "$serde_json::private::RawValue" :1}"#,
            r#"{"t":{"a":[{"$serde_json::private::RawValue":"1"}]}}"#,
            r#"{"\u0024serde_json::private::RawValu\u0065":"1"}"#,
        ] {
            let e = check_value_limits(refused).unwrap_err();
            assert!(e.contains("reserved by the JSON library"), "{refused}: {e}");
        }
        for kept in [
            r#"{"a":1,"$serde_json::private::RawValue":"[1]"}"#,
            r#"["$serde_json::private::RawValue"]"#,
            r#"{"a":"$serde_json::private::RawValue"}"#,
            r#"{"$serde_json::private::RawValueX":1}"#,
            r#"{"\u0024serde_json":1}"#,
        ] {
            assert_eq!(check_value_limits(kept), Ok(()), "{kept}");
            // and serde_json reads these as the objects they are
            assert!(serde_json::from_str::<serde_json::Value>(kept).is_ok(), "{kept}");
        }
    }
}
