//! Timestamps and durations: RFC 3339 parsing on the hot path, formatting, and `30s`/`5m` durations.
//!
//! IoT Central writes `enqueuedTime` as `YYYY-MM-DDTHH:MM:SS.fffZ`, with anywhere from 0 to 9
//! fractional digits. The fast path below handles that shape without allocation; anything else
//! (offsets, lower-case separators, no `Z`) falls back to chrono.

use crate::event::Nanos;

const NANOS_PER_SEC: i64 = 1_000_000_000;

/// Days since 1970-01-01 for a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719468;
    let era = if z >= 0 { z } else { z - 146096 } / 146097;
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[inline]
fn digits(b: &[u8]) -> Option<u32> {
    let mut v = 0u32;
    for &c in b {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + (c - b'0') as u32;
    }
    Some(v)
}

/// Parses an RFC 3339 / ISO 8601 UTC timestamp into nanoseconds since the epoch.
/// A timestamp without a zone (`2021-04-21T11:30:16`) is read as UTC, as IoT Hub does for
/// `iothub-creation-time-utc`.
pub fn parse_rfc3339(s: &str) -> Option<Nanos> {
    fast_parse(s.as_bytes()).or_else(|| slow_parse(s))
}

fn fast_parse(b: &[u8]) -> Option<Nanos> {
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    if *b.last()? != b'Z' {
        return None;
    }
    let y = digits(&b[0..4])? as i64;
    let mo = digits(&b[5..7])?;
    let d = digits(&b[8..10])?;
    let h = digits(&b[11..13])? as i64;
    let mi = digits(&b[14..16])? as i64;
    let s = digits(&b[17..19])? as i64;
    if !(1..=12).contains(&mo) || d == 0 || d > days_in_month(y, mo) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let frac = &b[19..b.len() - 1];
    let mut nanos = 0i64;
    if !frac.is_empty() {
        if frac[0] != b'.' || frac.len() < 2 || frac.len() > 10 {
            return None;
        }
        let f = digits(&frac[1..])? as i64;
        nanos = f * 10i64.pow(10 - frac.len() as u32);
    }
    let days = days_from_civil(y, mo, d);
    // nanoseconds in an i64 reach only the years 1677 to 2262: outside them there is no time
    (days * 86400 + h * 3600 + mi * 60 + s).checked_mul(NANOS_PER_SEC)?.checked_add(nanos)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

fn slow_parse(s: &str) -> Option<Nanos> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return t.timestamp_nanos_opt();
    }
    // no zone: UTC
    let naive = chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f").ok()?;
    naive.and_utc().timestamp_nanos_opt()
}

/// Appends `t` as RFC 3339 UTC with milliseconds (more digits only when needed).
///
/// Written digit by digit: through `write!` with widths this took about 2,000 instructions a
/// call, and sources call it for every message (`x-opt-enqueued-time`), sinks for every row.
pub fn write_rfc3339(out: &mut String, t: Nanos) {
    let secs = t.div_euclid(NANOS_PER_SEC);
    let nanos = t.rem_euclid(NANOS_PER_SEC) as u32;
    let days = secs.div_euclid(86400);
    let sod = secs.rem_euclid(86400) as u32;
    // an i64 of nanoseconds spans 1677 to 2262: the year always has four digits
    let (y, m, d) = civil_from_days(days);
    let (frac, width) = if nanos % 1_000_000 == 0 {
        (nanos / 1_000_000, 3)
    } else if nanos % 1_000 == 0 {
        (nanos / 1_000, 6)
    } else {
        (nanos, 9)
    };
    let mut b = *b"0000-00-00T00:00:00.000000000Z";
    put_digits(&mut b[0..4], y as u32);
    put_digits(&mut b[5..7], m);
    put_digits(&mut b[8..10], d);
    put_digits(&mut b[11..13], sod / 3600);
    put_digits(&mut b[14..16], sod / 60 % 60);
    put_digits(&mut b[17..19], sod % 60);
    put_digits(&mut b[20..20 + width], frac);
    b[20 + width] = b'Z';
    out.push_str(std::str::from_utf8(&b[..21 + width]).expect("ASCII digits"));
}

/// Writes `v` into `to` as decimal digits, zero-padded to its length.
#[inline]
fn put_digits(to: &mut [u8], mut v: u32) {
    for c in to.iter_mut().rev() {
        *c = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

/// `t` as an RFC 3339 string.
pub fn format_rfc3339(t: Nanos) -> String {
    let mut s = String::with_capacity(24);
    write_rfc3339(&mut s, t);
    s
}

/// Broken-down UTC time, for partition paths.
pub fn to_chrono(t: Nanos) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_nanos(t)
}

/// Parses a duration such as `30s`, `1m`, `5min`, `2h`, `500ms`, `1h 30m`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}); write it like 30s, 5m, 1h or 500ms"))
}

/// Sleeps until `deadline`, or forever without one: a `select!` branch that fires only when a
/// timer is armed (a partial batch waiting for more input, a quiet queue).
pub async fn sleep_until_or_never(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Current wall-clock time in nanoseconds since the epoch. Only for pacing, liveness and
/// processing-time metadata: never for deciding windows.
pub fn now_nanos() -> Nanos {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Option<&str>) {
        let got = parse_rfc3339(input).map(|t| {
            let c = to_chrono(t);
            c.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
        });
        assert_eq!(got.as_deref(), expected, "input {input}");
    }

    #[test]
    fn parses_every_fraction_length() {
        check("2020-08-05T22:26:55Z", Some("2020-08-05T22:26:55.000000000Z"));
        check("2020-08-05T22:26:55.4Z", Some("2020-08-05T22:26:55.400000000Z"));
        check("2020-08-05T22:26:55.455Z", Some("2020-08-05T22:26:55.455000000Z"));
        check("1933-01-26T03:10:44.480001324Z", Some("1933-01-26T03:10:44.480001324Z"));
        check("2024-02-29T00:00:00.123456Z", Some("2024-02-29T00:00:00.123456000Z"));
    }

    #[test]
    fn falls_back_for_other_shapes() {
        check("2021-04-21T11:30:16", Some("2021-04-21T11:30:16.000000000Z"));
        check("2021-04-21T13:30:16+02:00", Some("2021-04-21T11:30:16.000000000Z"));
        check("2021-04-21t11:30:16z", Some("2021-04-21T11:30:16.000000000Z"));
        check("2023-02-29T00:00:00Z", None);
        check("2021-13-01T00:00:00Z", None);
        check("yesterday", None);
        // more than nine digits: RFC 3339 allows it; the tenth digit is below our resolution
        check("2021-04-21T11:30:16.1234567891Z", Some("2021-04-21T11:30:16.123456789Z"));
    }

    #[test]
    fn times_beyond_nanosecond_range_are_refused_not_wrapped() {
        // an i64 of nanoseconds reaches 1677-09-21 to 2262-04-11
        check("1026-11-01T00:00:02Z", None);
        check("9999-12-31T23:59:59Z", None);
        check("2262-04-11T23:47:16.854775807Z", Some("2262-04-11T23:47:16.854775807Z"));
        check("2262-04-11T23:47:16.854775808Z", None);
        check("1677-09-22T00:00:00Z", Some("1677-09-22T00:00:00.000000000Z"));
        check("1677-09-20T00:00:00Z", None);
    }

    #[test]
    fn formats_round_trip() {
        for s in [
            "2026-11-01T00:00:00.000Z",
            "1969-12-31T23:59:59.999Z",
            "2026-11-01T13:05:07.123456Z",
            "2026-11-01T13:05:07.123456789Z",
        ] {
            assert_eq!(format_rfc3339(parse_rfc3339(s).unwrap()), s);
        }
    }

    #[test]
    fn formatting_agrees_with_chrono_over_the_whole_range() {
        // chrono as the reference, with our rule for the fraction (3, 6 or 9 digits)
        let reference = |t: Nanos| {
            let c = to_chrono(t);
            let n = t.rem_euclid(NANOS_PER_SEC);
            let frac = if n % 1_000_000 == 0 {
                format!("{:03}", n / 1_000_000)
            } else if n % 1_000 == 0 {
                format!("{:06}", n / 1_000)
            } else {
                format!("{n:09}")
            };
            format!("{}.{frac}Z", c.format("%Y-%m-%dT%H:%M:%S"))
        };
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut times = vec![i64::MIN, i64::MAX, 0, -1, 1, 999_999, 1_000_000, -1_000_000_000];
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let t = x as i64;
            // whole milliseconds and microseconds too, which take the shorter fractions
            times.extend([t, t - t.rem_euclid(1_000_000), t - t.rem_euclid(1_000)]);
        }
        for t in times {
            assert_eq!(format_rfc3339(t), reference(t), "t = {t}");
        }
    }

    #[test]
    fn civil_round_trip_over_four_centuries() {
        for days in (-200_000..200_000).step_by(97) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap().as_secs(), 30);
        assert_eq!(parse_duration("1m").unwrap().as_secs(), 60);
        assert_eq!(parse_duration("1h 30m").unwrap().as_secs(), 5400);
        assert_eq!(parse_duration("0").unwrap().as_secs(), 0);
        assert!(parse_duration("soon").unwrap_err().contains("not a duration"));
    }
}
