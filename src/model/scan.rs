//! The decoder's fast path: a hand-written scanner for the common case of an export message.
//!
//! It produces exactly what the serde_json path in [`super::decode`] produces, for the messages it
//! accepts, and gives up ([`Bail`]) on anything else: malformed JSON, a value of the wrong type,
//! a string with escapes that would have to be unescaped (keys, kept values, envelope strings),
//! an `enqueuedTime` that does not parse, deep nesting. The caller then decodes the message again
//! on the serde_json path, which decides and words the error. So this scanner must never accept
//! what serde_json rejects: it validates every byte it skips (string escapes and control
//! characters, number grammar, literals, commas and colons, trailing text) and is tested against
//! the serde_json path on mutated messages (`decode::projection_tests::fast_path_agrees_with_serde_json`).
//!
//! Why: scanning is most of the decoding time, and serde_json's visitor machinery (typed keys,
//! `RawValue`, `IgnoredAny`) costs about twice what a scanner specialised to this one format does
//! (see docs/performance.md, "W1: where the time goes").

use super::decode::{keep_for, key_kind, parse_number, record_slot, Envelope, Keep, KeyKind, Projection, SLOTS};
use super::limits::RESERVED_KEY;
use super::MessageSource;
use crate::event::{build, Field, Text, Val};
use crate::time;

/// The fast path gave up: decode the message on the serde_json path instead.
#[derive(Debug)]
pub(super) struct Bail;

type R<T> = Result<T, Bail>;

/// [`RESERVED_KEY`] with its quotes, as a first key starts.
const RESERVED_QUOTED: &[u8] = b"\"$serde_json::private::RawValue\"";

/// Nesting the scanner follows before giving up (serde_json's own limit is 128).
const MAX_DEPTH: u32 = 64;

const LO: u64 = 0x0101_0101_0101_0101;
const HI: u64 = 0x8080_8080_8080_8080;

/// The high bit set in each byte of `w` that is `"`, `\` or a control character (< 0x20). Only
/// the lowest set bit is exact (borrows can mark later bytes), which is the one used.
#[inline(always)]
fn specials(w: u64) -> u64 {
    let q = w ^ (LO * b'"' as u64);
    let s = w ^ (LO * b'\\' as u64);
    (q.wrapping_sub(LO) & !q | s.wrapping_sub(LO) & !s | w.wrapping_sub(LO * 0x20) & !w) & HI
}

/// Bit `k` set when byte `i + k` of `b` is `"`, `\` or a control character (< 0x20), for the
/// 16 bytes from `i` (which the caller has checked are there). SSE2 is part of x86-64.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn specials16(b: &[u8], i: usize) -> u32 {
    use std::arch::x86_64::*;
    debug_assert!(i + 16 <= b.len());
    // SAFETY: the 16 bytes read are inside `b` (checked by the caller); SSE2 is always there
    // on x86-64 and the load is unaligned.
    unsafe {
        let v = _mm_loadu_si128(b.as_ptr().add(i) as *const __m128i);
        let quote = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8));
        let backslash = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\\' as i8));
        // unsigned c <= 0x1f exactly when max(c, 0x1f) == 0x1f
        let limit = _mm_set1_epi8(0x1f);
        let control = _mm_cmpeq_epi8(_mm_max_epu8(v, limit), limit);
        _mm_movemask_epi8(_mm_or_si128(_mm_or_si128(quote, backslash), control)) as u32
    }
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Scanner<'a> {
    #[inline(always)]
    fn peek(&self) -> u8 {
        self.b.get(self.i).copied().unwrap_or(0)
    }

    #[inline(always)]
    fn ws(&mut self) {
        while let Some(&c) = self.b.get(self.i) {
            if c == b' ' || c == b'\n' || c == b'\r' || c == b'\t' {
                self.i += 1;
            } else {
                break;
            }
        }
    }

    #[inline(always)]
    fn eat(&mut self, c: u8) -> R<()> {
        if self.peek() == c {
            self.i += 1;
            Ok(())
        } else {
            Err(Bail)
        }
    }

    /// A string starting at the current `"`: returns its contents' range and whether it has
    /// escapes (validated as serde_json validates a skipped string: the escape letter and the
    /// four hex digits of `\u`; a surrogate escape is left to serde_json).
    #[inline]
    fn string(&mut self) -> R<(usize, usize, bool)> {
        self.eat(b'"')?;
        let b = self.b;
        let start = self.i;
        let mut i = start;
        let mut escaped = false;
        loop {
            // to the next special byte: 16 bytes at a time, then 8, then one by one
            'fast: {
                #[cfg(target_arch = "x86_64")]
                while i + 16 <= b.len() {
                    let m = specials16(b, i);
                    if m != 0 {
                        i += m.trailing_zeros() as usize;
                        break 'fast;
                    }
                    i += 16;
                }
                while i + 8 <= b.len() {
                    let m = specials(u64::from_le_bytes(b[i..i + 8].try_into().unwrap()));
                    if m != 0 {
                        i += (m.trailing_zeros() / 8) as usize;
                        break 'fast;
                    }
                    i += 8;
                }
            }
            match b.get(i) {
                None => return Err(Bail),
                Some(b'"') => {
                    self.i = i + 1;
                    return Ok((start, i, escaped));
                }
                Some(b'\\') => {
                    escaped = true;
                    match b.get(i + 1) {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => i += 2,
                        Some(b'u') => {
                            let hex = b.get(i + 2..i + 6).ok_or(Bail)?;
                            // surrogates: serde_json checks their pairing even when skipping
                            let surrogate = matches!(hex[0], b'd' | b'D') && !matches!(hex[1], b'0'..=b'7');
                            if surrogate || !hex.iter().all(u8::is_ascii_hexdigit) {
                                return Err(Bail);
                            }
                            i += 6;
                        }
                        _ => return Err(Bail),
                    }
                }
                Some(&c) if c < 0x20 => return Err(Bail),
                Some(_) => i += 1,
            }
        }
    }

    /// A string that must have no escapes (the serde_json path unescapes it): its text.
    #[inline]
    fn plain_string(&mut self, text: &'a str) -> R<&'a str> {
        let (s, e, escaped) = self.string()?;
        if escaped {
            return Err(Bail);
        }
        // the bounds are ASCII quotes of UTF-8 text validated by the caller
        Ok(&text[s..e])
    }

    fn digits(&mut self) -> R<()> {
        if !self.peek().is_ascii_digit() {
            return Err(Bail);
        }
        while self.peek().is_ascii_digit() {
            self.i += 1;
        }
        Ok(())
    }

    /// A number, by JSON's grammar (a leading zero stands alone: what follows it must then be
    /// a separator, which the caller checks).
    #[inline]
    fn number(&mut self) -> R<()> {
        let start = self.i;
        if self.peek() == b'-' {
            self.i += 1;
        }
        match self.peek() {
            b'0' => self.i += 1,
            b'1'..=b'9' => self.digits()?,
            _ => return Err(Bail),
        }
        if self.peek() == b'.' {
            self.i += 1;
            self.digits()?;
        }
        if matches!(self.peek(), b'e' | b'E') {
            self.i += 1;
            if matches!(self.peek(), b'+' | b'-') {
                self.i += 1;
            }
            self.digits()?;
            // an exponent can take it out of f64's range (serde_json: "number out of range")
            return self.in_range(start);
        }
        if self.i - start >= 300 {
            return self.in_range(start);
        }
        Ok(())
    }

    /// The number from `start` to here is a finite `f64` (else give up).
    #[cold]
    fn in_range(&self, start: usize) -> R<()> {
        let text = std::str::from_utf8(&self.b[start..self.i]).map_err(|_| Bail)?;
        if super::limits::number_in_range(text) {
            Ok(())
        } else {
            Err(Bail)
        }
    }

    fn literal(&mut self, lit: &[u8]) -> R<()> {
        if self.b.get(self.i..self.i + lit.len()) == Some(lit) {
            self.i += lit.len();
            Ok(())
        } else {
            Err(Bail)
        }
    }

    /// An object's `{`: true when a member follows (else the object is empty and closed).
    #[inline(always)]
    fn open_object(&mut self) -> R<bool> {
        self.eat(b'{')?;
        self.ws();
        if self.peek() == b'}' {
            self.i += 1;
            return Ok(false);
        }
        // the first key is read by `key`, which gives up on escapes: only the plain spelling
        if self.b[self.i..].starts_with(RESERVED_QUOTED) {
            return Err(Bail);
        }
        Ok(true)
    }

    /// A member's key (without escapes) and its colon.
    #[inline(always)]
    fn key(&mut self, text: &'a str) -> R<&'a str> {
        let key = self.plain_string(text)?;
        self.ws();
        self.eat(b':')?;
        self.ws();
        Ok(key)
    }

    /// After a member or element: `,` (true: another follows) or the closing bracket.
    #[inline(always)]
    fn next_or_close(&mut self, close: u8) -> R<bool> {
        self.ws();
        match self.peek() {
            b',' => {
                self.i += 1;
                self.ws();
                Ok(true)
            }
            c if c == close => {
                self.i += 1;
                Ok(false)
            }
            _ => Err(Bail),
        }
    }

    /// Skips any JSON value, validating it.
    fn skip_value(&mut self, depth: u32) -> R<()> {
        match self.peek() {
            b'"' => self.string().map(|_| ()),
            b'{' => {
                if depth >= MAX_DEPTH {
                    return Err(Bail);
                }
                self.i += 1;
                self.ws();
                if self.peek() == b'}' {
                    self.i += 1;
                    return Ok(());
                }
                // a first key that is, or may be, `limits::RESERVED_KEY`: serde_json decides
                let (s, e, escaped) = self.string()?;
                if escaped || self.b[s..e] == *RESERVED_KEY.as_bytes() {
                    return Err(Bail);
                }
                loop {
                    self.ws();
                    self.eat(b':')?;
                    self.ws();
                    self.skip_value(depth + 1)?;
                    if !self.next_or_close(b'}')? {
                        return Ok(());
                    }
                    self.string()?;
                }
            }
            b'[' => {
                if depth >= MAX_DEPTH {
                    return Err(Bail);
                }
                self.i += 1;
                self.ws();
                if self.peek() == b']' {
                    self.i += 1;
                    return Ok(());
                }
                loop {
                    self.skip_value(depth + 1)?;
                    if !self.next_or_close(b']')? {
                        return Ok(());
                    }
                }
            }
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => Err(Bail),
        }
    }

    /// A value kept as it is (serde_json path: a `RawValue` then `classify`).
    #[inline]
    fn classify(&mut self, text: &'a str, depth: u32) -> R<Val> {
        let start = self.i;
        Ok(match self.peek() {
            b'"' => Val::Str(build::raw_span(text, self.plain_string(text)?)),
            b't' => {
                self.literal(b"true")?;
                Val::Bool(true)
            }
            b'f' => {
                self.literal(b"false")?;
                Val::Bool(false)
            }
            b'n' => {
                self.literal(b"null")?;
                Val::Null
            }
            b'{' | b'[' => {
                self.skip_value(depth)?;
                Val::Json(build::raw_span(text, &text[start..self.i]))
            }
            _ => {
                self.number()?;
                Val::Num(build::raw_span(text, &text[start..self.i]))
            }
        })
    }
}

/// Where the decoded fields go (the serde_json path's `RootSeed`, minus the arena: the fast path
/// never unescapes).
pub(super) struct Out<'s> {
    pub root: &'s mut Vec<Field>,
    pub nested: &'s mut Vec<Field>,
    pub env: &'s mut Envelope,
    pub slots: &'s mut [u8; SLOTS],
}

/// Decodes one export message (UTF-8 already validated) as the serde_json path would, or bails.
pub(super) fn decode(text: &str, proj: Option<&Projection>, out: Out<'_>) -> R<()> {
    let Out { root, nested, env, slots } = out;
    let mut sc = Scanner { b: text.as_bytes(), i: 0 };
    sc.ws();
    let mut tele_seen = false;
    let mut more = sc.open_object()?;
    while more {
        let key = sc.key(text)?;
        let kind = key_kind(key);
        if kind == KeyKind::Other {
            env.known_keys = false;
        }
        let keep = keep_for(proj, key, kind);
        if keep == Keep::Nothing {
            match kind {
                // parsed (and so unescaped) by the serde_json path even when not kept
                KeyKind::EnvString => match sc.peek() {
                    b'"' => {
                        sc.plain_string(text)?;
                    }
                    _ => sc.literal(b"null")?,
                },
                KeyKind::Object => match sc.peek() {
                    b'{' => sc.skip_value(1)?,
                    _ => sc.literal(b"null")?,
                },
                KeyKind::Properties => match sc.peek() {
                    b'[' => sc.skip_value(1)?,
                    _ => sc.literal(b"null")?,
                },
                _ => sc.skip_value(1)?,
            }
            more = sc.next_or_close(b'}')?;
            continue;
        }
        if kind == KeyKind::Object && key == "telemetry" && root.len() < 255 {
            env.telemetry = Some(root.len() as u8);
        }
        let val = match kind {
            KeyKind::EnvString => match sc.peek() {
                b'"' => Val::Str(build::raw_span(text, sc.plain_string(text)?)),
                _ => {
                    sc.literal(b"null")?;
                    Val::Null
                }
            },
            KeyKind::MessageSource => {
                let s = sc.plain_string(text)?;
                // the first one, as a lookup of the field finds it
                env.source = env.source.or(Some(MessageSource::parse(s)));
                Val::Str(build::raw_span(text, s))
            }
            KeyKind::EnqueuedTime => {
                let s = sc.plain_string(text)?;
                env.time = time::parse_rfc3339(s).ok_or(Bail)?;
                Val::Str(build::raw_span(text, s))
            }
            KeyKind::Object => {
                let tele_slots = match (proj, keep) {
                    (Some(p), Keep::Some(_)) if !tele_seen => Some((p, &mut *slots)),
                    _ => None,
                };
                tele_seen |= matches!(keep, Keep::Some(_));
                object(&mut sc, text, nested, keep, proj.is_some(), tele_slots)?
            }
            KeyKind::Properties => match sc.peek() {
                b'[' => sc.classify(text, 1)?,
                _ => {
                    sc.literal(b"null")?;
                    Val::Null
                }
            },
            KeyKind::Other => sc.classify(text, 1)?,
        };
        if let Some(p) = proj {
            record_slot(slots, p.top_slot(key), root.len());
        }
        root.push(Field { key: build::raw_span(text, key), val });
        more = sc.next_or_close(b'}')?;
    }
    sc.ws();
    if sc.i != text.len() {
        return Err(Bail);
    }
    Ok(())
}

/// A payload object decoded one level deep (the serde_json path's `ObjSeed`), or null.
fn object<'a>(
    sc: &mut Scanner<'a>,
    text: &'a str,
    nested: &mut Vec<Field>,
    keep: Keep<'_>,
    numbers: bool,
    mut slots: Option<(&Projection, &mut [u8; SLOTS])>,
) -> R<Val> {
    if sc.peek() != b'{' {
        sc.literal(b"null")?;
        return Ok(Val::Null);
    }
    let open = sc.i;
    let start = nested.len();
    let mut all_kept = true;
    let mut more = sc.open_object()?;
    while more {
        let key = sc.key(text)?;
        if let Keep::Some(keys) = keep {
            let Some(at) = keys.iter().position(|k| crate::event::eq_short(k, key)) else {
                sc.skip_value(2)?;
                all_kept = false;
                more = sc.next_or_close(b'}')?;
                continue;
            };
            if let Some((p, slots)) = slots.as_mut() {
                record_slot(slots, p.telemetry_slot_at(at), nested.len());
            }
        }
        let vstart = sc.i;
        let mut val = sc.classify(text, 2)?;
        if numbers {
            if let Val::Num(_) = val {
                val = parse_number(&text[vstart..sc.i]);
            }
        }
        nested.push(Field { key: build::raw_span(text, key), val });
        more = sc.next_or_close(b'}')?;
    }
    let len = nested.len() - start;
    // the object's own text, when everything in it was kept (as the serde_json path does)
    let raw = if all_kept && len > 0 { build::raw_span(text, &text[open..sc.i]) } else { Text::EMPTY };
    Ok(Val::Obj { start: start as u32, len: len as u32, raw })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specials_finds_the_first_quote_backslash_or_control_byte() {
        let at = |s: &[u8; 8]| {
            let m = specials(u64::from_le_bytes(*s));
            (m != 0).then(|| m.trailing_zeros() / 8)
        };
        assert_eq!(at(b"abcdefgh"), None);
        assert_eq!(at(b"abc\"efgh"), Some(3));
        assert_eq!(at(b"\\bcdefgh"), Some(0));
        assert_eq!(at(b"abcdefg\x1f"), Some(7));
        assert_eq!(at(b"ab\x00\"efgh"), Some(2));
        assert_eq!(at(b"\xc3\xa9\xe2\x82\xac !~"), None, "UTF-8 and high ASCII are plain");
        assert_eq!(at(b"\x7f\x20\x21\x5b\x5d\x5c\x22\x01"), Some(5));
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn sixteen_byte_scan_marks_exactly_quotes_backslashes_and_control_bytes() {
        for c in 0..=255u8 {
            let special = c == b'"' || c == b'\\' || c < 0x20;
            for pos in 0..16 {
                let mut buf = [b'a'; 19];
                buf[1 + pos] = c;
                let want = if special { 1u32 << pos } else { 0 };
                assert_eq!(super::specials16(&buf, 1), want, "byte {c:#04x} at {pos}");
            }
        }
        // several: every one is marked
        assert_eq!(super::specials16(b"\"abc\\def\x01ghijkl\"", 0), 1 | 1 << 4 | 1 << 8 | 1 << 15);
    }
}
