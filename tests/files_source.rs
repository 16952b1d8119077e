//! The `files` source end to end: framings, gzip, IoT Central's blob layout with a time range,
//! bad input to dead letters, and the same over Azurite (az://) and moto (s3://).

mod common;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use common::*;
use object_store::ObjectStoreExt;

const T: Duration = Duration::from_secs(120);

fn to_jsonl(dir: &Path, url: &str, extra: &str) -> std::path::PathBuf {
    pipeline(
        dir,
        "p.yaml",
        &format!(
            "sources:\n  in:\n    type: files\n    url: {url}\n{extra}sinks:\n  out:\n    type: jsonl\n    inputs: [in]\n    path: {out}\n  dl:\n    type: jsonl\n    inputs: [in.dead_letter]\n    path: {dl}\n",
            out = dir.join("out.jsonl").display(),
            dl = dir.join("dl.jsonl").display()
        ),
    )
}

fn lines(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn msg(dev: &str, t: &str) -> String {
    format!(
        r#"{{"applicationId":"a","messageSource":"telemetry","deviceId":"{dev}","schema":"default@v1","templateId":"t","enqueuedTime":"{t}","telemetry":{{"temperature":21.5}},"enrichments":{{}}}}"#
    )
}

#[test]
fn json_lines_arrays_and_gzip_in_path_order() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir_all(input.join("sub")).unwrap();
    // a: JSON lines, one line holding an array of two messages
    std::fs::write(
        input.join("a.jsonl"),
        format!(
            "{}\n[{},{}]\n\n{}\r\n",
            msg("d1", "2026-11-01T00:00:01Z"),
            msg("d2", "2026-11-01T00:00:02Z"),
            msg("d3", "2026-11-01T00:00:03Z"),
            msg("d4", "2026-11-01T00:00:04Z")
        ),
    )
    .unwrap();
    // b: a pretty-printed JSON array file
    std::fs::write(
        input.join("b.json"),
        format!("[\n  {},\n  {}\n]\n", msg("d5", "2026-11-01T00:00:05Z"), msg("d6", "2026-11-01T00:00:06Z")),
    )
    .unwrap();
    // sub/c.jsonl.gz: gzip
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(format!("{}\n{}\n", msg("d7", "2026-11-01T00:00:07Z"), msg("d8", "2026-11-01T00:00:08Z")).as_bytes())
        .unwrap();
    std::fs::write(input.join("sub/c.jsonl.gz"), gz.finish().unwrap()).unwrap();
    // hidden and staging files are ignored
    std::fs::write(input.join(".hidden.jsonl"), msg("x", "2026-11-01T00:00:09Z")).unwrap();
    std::fs::create_dir_all(input.join("_staging")).unwrap();
    std::fs::write(input.join("_staging/y.jsonl"), msg("y", "2026-11-01T00:00:09Z")).unwrap();

    let p = to_jsonl(dir.path(), input.to_str().unwrap(), "");
    ok(&run(&["replay", p.to_str().unwrap()], &[], T));
    let devices: Vec<String> =
        lines(&dir.path().join("out.jsonl")).iter().map(|v| v["deviceId"].as_str().unwrap().to_string()).collect();
    assert_eq!(devices, ["d1", "d2", "d3", "d4", "d5", "d6", "d7", "d8"]);
    assert!(lines(&dir.path().join("dl.jsonl")).is_empty());
}

#[test]
fn blob_export_layout_is_read_in_time_order_within_a_range() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("container");
    let app = "6e9d8f3c-2b1a-4c8e-9f0d-1a2b3c4d5e6f";
    // minute folders, two partitions, written in a scrambled order
    for (part, minute, dev) in
        [(1, 7, "p1m7"), (0, 5, "p0m5"), (1, 5, "p1m5"), (0, 20, "p0m20"), (0, 6, "p0m6"), (0, 1, "p0m1")]
    {
        let d = input.join(format!("{app}/{part}/2026/11/01/13/{minute:02}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("data.json"), msg(dev, &format!("2026-11-01T13:{minute:02}:30Z")) + "\n").unwrap();
    }
    let p =
        to_jsonl(dir.path(), input.to_str().unwrap(), "    from: 2026-11-01T13:05:00Z\n    to: 2026-11-01T13:08:00Z\n");
    ok(&run(&["replay", p.to_str().unwrap()], &[], T));
    let devices: Vec<String> =
        lines(&dir.path().join("out.jsonl")).iter().map(|v| v["deviceId"].as_str().unwrap().to_string()).collect();
    assert_eq!(devices, ["p0m5", "p1m5", "p0m6", "p1m7"], "minute, then partition; outside the range left out");
}

/// A file that breaks off (here a gzip stream cut short; in object storage, a body that fails
/// for good) gives every line before the break, a dead letter for the line it cut, and one for
/// the break naming the line it came after; the next file is read whole. (Before, the lines
/// decoded ahead of the break and those in the buffer being filled were dropped, and the
/// dead letter named no line.)
#[test]
fn a_file_that_breaks_off_gives_its_lines_before_the_break() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    let mut text = String::new();
    for i in 0..60_000 {
        text.push_str(&msg(&format!("a{i}"), "2026-11-01T00:00:01Z"));
        text.push('\n');
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(text.as_bytes()).unwrap();
    let whole = gz.finish().unwrap();
    std::fs::write(input.join("a.jsonl.gz"), &whole[..whole.len() * 7 / 10]).unwrap();
    std::fs::write(input.join("b.jsonl"), format!("{}\n", msg("b0", "2026-11-01T00:00:02Z"))).unwrap();
    let p = to_jsonl(dir.path(), input.to_str().unwrap(), "");
    ok(&run(&["replay", p.to_str().unwrap()], &[], T));
    let out = lines(&dir.path().join("out.jsonl"));
    let devices: Vec<&str> = out.iter().map(|v| v["deviceId"].as_str().unwrap()).collect();
    let before = devices.len() - 1;
    assert_eq!(devices[before], "b0", "the next file is read");
    assert!(before > 30_000 && before < 60_000, "{before} lines before the break");
    let expected: Vec<String> = (0..before).map(|i| format!("a{i}")).collect();
    assert!(devices[..before].iter().zip(&expected).all(|(d, e)| d == e), "every line before the break, in order");
    let dl = lines(&dir.path().join("dl.jsonl"));
    assert_eq!(dl.len(), 2, "{dl:?}");
    let cut = before as u64 + 1;
    assert!(dl[0]["origin"].as_str().unwrap().ends_with(&format!("a.jsonl.gz:{cut}")), "{dl:?}");
    let reason = dl[1]["reason"].as_str().unwrap();
    assert!(reason.contains(&format!("the file broke off after line {cut}")), "{reason}");
}

#[test]
fn bad_input_goes_to_dead_letters_with_reasons_and_origins() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.jsonl");
    let mut data = Vec::new();
    data.extend_from_slice(msg("good1", "2026-11-01T00:00:01Z").as_bytes());
    data.extend_from_slice(b"\n{\"messageSource\": \"telemetry\", \"enqueuedTime\": \n"); // malformed
    data.extend_from_slice(br#"{"messageSource":"telemetry","enqueuedTime":"2026-11-01T00:00:01Z","deviceId":42}"#); // wrong type
    data.push(b'\n');
    data.extend_from_slice(
        b"{\"messageSource\":\"telemetry\",\"enqueuedTime\":\"2026-11-01T00:00:01Z\",\"deviceId\":\"\xff\xfe\"}\n",
    ); // invalid UTF-8
    data.extend_from_slice(
        format!(
            r#"{{"messageSource":"telemetry","enqueuedTime":"2026-11-01T00:00:01Z","telemetry":{{"blob":"{}"}}}}"#,
            "x".repeat(300_000)
        )
        .as_bytes(),
    ); // oversized
    data.push(b'\n');
    data.extend_from_slice(br#"{"messageSource":"telemetry","enqueuedTime":"soon"}"#); // bad time
    data.push(b'\n');
    data.extend_from_slice(msg("good2", "2026-11-01T00:00:02Z").as_bytes());
    data.push(b'\n');
    std::fs::write(&f, &data).unwrap();
    let p = to_jsonl(dir.path(), f.to_str().unwrap(), "");
    let err = ok(&run(&["replay", p.to_str().unwrap()], &[], T));
    let good: Vec<String> =
        lines(&dir.path().join("out.jsonl")).iter().map(|v| v["deviceId"].as_str().unwrap().to_string()).collect();
    assert_eq!(good, ["good1", "good2"], "the pipeline goes on after bad records");
    let dl = lines(&dir.path().join("dl.jsonl"));
    let got: Vec<(String, String)> = dl
        .iter()
        .map(|v| {
            (
                v["origin"].as_str().unwrap().rsplit('/').next().unwrap().to_string(),
                v["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expect = [
        ("bad.jsonl:2", "malformed JSON"),
        ("bad.jsonl:3", "deviceId: invalid type: integer `42`, expected a string"),
        ("bad.jsonl:4", "invalid UTF-8 at byte"),
        ("bad.jsonl:5", "exceeds the limit of 262144 bytes"),
        ("bad.jsonl:6", "enqueuedTime: \"soon\" is not an RFC 3339 timestamp"),
    ];
    assert_eq!(got.len(), expect.len(), "{got:#?}");
    for ((origin, reason), (eo, er)) in got.iter().zip(expect) {
        assert_eq!(origin, eo);
        assert!(reason.contains(er), "{origin}: {reason}");
    }
    assert_eq!(dl[0]["component"], "in");
    assert!(dl[0]["payload"].as_str().unwrap().starts_with("{\"messageSource\""), "the record itself is kept");
    assert!(err.contains("5 dead letters"), "the summary counts them: {err}");
}

/// Local JSON-lines files are read through memory maps of about 4 MiB; `mmap: false` reads
/// them. Both must give the same events, in the same order, with the same line numbers, and the
/// same dead letters, wherever the maps' edges fall: across a CRLF line, blank lines, an array
/// line, bad records, a line longer than a map, and a last line without a newline.
#[test]
fn mapped_and_read_files_give_the_same_events_and_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("big.jsonl");
    let mut data = Vec::new();
    let push = |data: &mut Vec<u8>, i: u64| {
        let t = format!("2026-11-01T00:{:02}:{:02}.{:03}Z", (i / 1000) % 60, (i / 10) % 60, i % 1000);
        match i % 23 {
            0 => data.extend_from_slice(format!("{}\r\n", msg(&format!("crlf{i}"), &t)).as_bytes()),
            1 => data.extend_from_slice(b"\n   \n"),
            2 => data.extend_from_slice(
                format!("[{},{}]\n", msg(&format!("a{i}"), &t), msg(&format!("b{i}"), &t)).as_bytes(),
            ),
            3 => data.extend_from_slice(b"{\"messageSource\": \"telemetry\", \"enqueuedTime\": \n"),
            // a padded message, so that lines (and the maps' edges) fall at varied offsets
            _ => data.extend_from_slice(
                format!("{}{}\n", msg(&format!("d{i}"), &t), " ".repeat((i * 7 % 300) as usize)).as_bytes(),
            ),
        }
    };
    let mut i = 0u64;
    while data.len() < 5 << 20 {
        push(&mut data, i);
        i += 1;
    }
    // a line longer than a map (a dead letter: above the record limit), then more of the same
    data.extend_from_slice(format!("{{\"blob\":\"{}\"}}\n", "y".repeat(9 << 20)).as_bytes());
    while data.len() < 20 << 20 {
        push(&mut data, i);
        i += 1;
    }
    data.extend_from_slice(msg("last", "2026-11-01T01:00:00Z").as_bytes()); // no newline
    std::fs::write(&f, &data).unwrap();

    let mut runs = Vec::new();
    // small batches of uneven parts (256 + 44 lines) too
    for (name, extra) in [("mapped", ""), ("read", "    mmap: false\n"), ("small", "    batch_size: 300\n")] {
        let sub = dir.path().join(name);
        std::fs::create_dir_all(&sub).unwrap();
        let p = to_jsonl(&sub, f.to_str().unwrap(), extra);
        let err = ok(&run(&["replay", p.to_str().unwrap()], &[("CENTRALFLOW_LOG", "centralflow=debug")], T));
        assert_eq!(err.contains("reading through memory maps"), name != "read", "{name}: {err}");
        let events: Vec<String> = lines(&sub.join("out.jsonl"))
            .iter()
            .map(|v| format!("{} {}", v["deviceId"].as_str().unwrap(), v["enqueuedTime"].as_str().unwrap()))
            .collect();
        let dead: Vec<String> = lines(&sub.join("dl.jsonl"))
            .iter()
            .map(|v| format!("{} {}", v["origin"].as_str().unwrap().rsplit('/').next().unwrap(), v["reason"]))
            .collect();
        runs.push((events, dead));
    }
    let (mapped, read, small) = (&runs[0], &runs[1], &runs[2]);
    // in file order: the number in a device id is the line it was written for
    let nums: Vec<u64> = mapped.0[..mapped.0.len() - 1]
        .iter()
        .map(|e| e.split(' ').next().unwrap().trim_start_matches(|c: char| c.is_ascii_alphabetic()).parse().unwrap())
        .collect();
    assert!(nums.windows(2).all(|w| w[0] <= w[1]), "events out of file order");
    assert!(mapped.0.len() > 30_000, "{}", mapped.0.len());
    assert_eq!(mapped.0.last().map(String::as_str), Some("last 2026-11-01T01:00:00Z"));
    assert!(mapped.0.iter().any(|e| e.starts_with("crlf")) && mapped.0.iter().any(|e| e.starts_with('b')));
    assert!(mapped.1.iter().any(|d| d.contains("exceeds the limit")), "{:?}", &mapped.1[..3]);
    assert!(mapped.1.len() > 1000, "{}", mapped.1.len());
    assert!(mapped.0 == read.0, "the same events in the same order");
    assert!(mapped.1 == read.1, "the same dead letters, with the same line numbers");
    assert!(mapped == small, "the same events and dead letters in batches of 300 lines");
}

#[test]
fn unrouted_dead_letters_are_logged_not_dropped_silently() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.jsonl");
    std::fs::write(&f, "not json\n").unwrap();
    let p = pipeline(
        dir.path(),
        "p.yaml",
        &format!("sources:\n  in:\n    type: files\n    url: {}\nsinks:\n  out:\n    type: jsonl\n    inputs: [in]\n    path: {}\n", f.display(), dir.path().join("o.jsonl").display()),
    );
    let err = ok(&run(&["replay", p.to_str().unwrap()], &[], T));
    assert!(err.contains("dead letter") && err.contains("malformed JSON") && err.contains("bad.jsonl:1"), "{err}");
}

fn object_store_round_trip(url: &str, env: Vec<(String, String)>, options: BTreeMap<String, String>) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let loc = centralflow::storage::open(url, &options).unwrap();
    rt.block_on(async {
        for (name, body) in [
            ("2026/a.jsonl", format!("{}\n{}\n", msg("s1", "2026-11-01T00:00:01Z"), msg("s2", "2026-11-01T00:00:02Z"))),
            ("2026/b.jsonl", format!("{}\nnot json\n", msg("s3", "2026-11-01T00:00:03Z"))),
        ] {
            loc.store.put(&loc.child(name), body.into_bytes().into()).await.unwrap();
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let p = to_jsonl(dir.path(), url, "");
    ok(&run(&["replay", p.to_str().unwrap()], &env_refs(&env), T));
    let devices: Vec<String> =
        lines(&dir.path().join("out.jsonl")).iter().map(|v| v["deviceId"].as_str().unwrap().to_string()).collect();
    assert_eq!(devices, ["s1", "s2", "s3"]);
    let dl = lines(&dir.path().join("dl.jsonl"));
    assert_eq!(dl.len(), 1);
    assert!(dl[0]["origin"].as_str().unwrap().ends_with("2026/b.jsonl:2"), "{}", dl[0]["origin"]);
}

#[test]
fn reads_from_azurite() {
    let container = unique("files");
    azurite_create_container(&container);
    object_store_round_trip(&format!("az://{container}/exports"), azurite_env(), azurite_options());
}

#[test]
fn reads_from_s3_on_moto() {
    let bucket = unique("files");
    s3_create_bucket(&bucket);
    object_store_round_trip(&format!("s3://{bucket}/exports"), s3_env(), s3_options());
}
