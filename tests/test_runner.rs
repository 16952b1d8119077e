//! `centralflow test`, the pipeline unit-test runner, tested through the binary: passing and
//! failing cases with their messages and exit codes, malformed test files with YAML positions,
//! the late and dead-letter ports, the watermark option, JUnit XML, and the shipped test files.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);

/// A small pipeline: export -> telemetry filter -> 1-minute windows per device, with sinks on
/// the windows, the late output and the dead letters.
const PIPELINE: &str = r#"
name: runner
sources:
  export: { type: files, url: ./in }
transforms:
  telemetry: { type: filter, inputs: [export], condition: 'messageSource == "telemetry"' }
  per_minute:
    type: window
    inputs: [telemetry]
    window: { kind: tumbling, size: 1m }
    allowed_lateness: 10s
    group_by: [deviceId]
    aggregates: { temperature: [avg, max] }
sinks:
  lake: { type: parquet, inputs: [per_minute], url: ./out }
  late: { type: jsonl, inputs: [per_minute.late], path: ./late.jsonl }
  rejected: { type: jsonl, inputs: [export.dead_letter], path: ./dead.jsonl }
"#;

/// Three telemetry messages of d1 in the first minute and one of d2, then one in the second.
const INPUTS: &str = r#"
    inputs:
      - at: export
        messages:
          - {deviceId: d1, enqueuedTime: "2026-11-01T00:00:01Z", messageSource: telemetry, telemetry: {temperature: 20}}
          - {deviceId: d1, enqueuedTime: "2026-11-01T00:00:30Z", messageSource: telemetry, telemetry: {temperature: 24}}
          - {deviceId: d2, enqueuedTime: "2026-11-01T00:00:40Z", messageSource: telemetry, telemetry: {temperature: 30}}
          - {deviceId: d1, enqueuedTime: "2026-11-01T00:01:05Z", messageSource: telemetry, telemetry: {temperature: 25}}
"#;

/// Writes the pipeline and a test file with one case (its inputs, then `checks`), runs the
/// runner on it; returns (exit code, stdout + stderr).
fn run_case(dir: &Path, checks: &str) -> (i32, String) {
    let text = format!("pipeline: p.yaml\ncases:\n  - name: the case\n{INPUTS}{checks}");
    run_file(dir, &text)
}

fn run_file(dir: &Path, test_file: &str) -> (i32, String) {
    std::fs::write(dir.join("p.yaml"), PIPELINE).unwrap();
    let path = dir.join("p.test.yaml");
    std::fs::write(&path, test_file).unwrap();
    let out = run(&["test", path.to_str().unwrap()], &[], T);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

const ROWS: &str = r#"
    outputs:
      - at: lake
        fields: [deviceId, window_start, count, temperature_avg]
        rows:
          - {deviceId: d1, window_start: "2026-11-01T00:00:00Z", count: 2, temperature_avg: 22}
          - {deviceId: d2, window_start: "2026-11-01T00:00:00Z", count: 1, temperature_avg: 30}
          - {deviceId: d1, window_start: "2026-11-01T00:01:00Z", count: 1, temperature_avg: 25}
"#;

#[test]
fn a_passing_case_prints_ok_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out) = run_case(dir.path(), ROWS);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("test ") && out.contains(": the case ... ok"), "{out}");
    assert!(out.contains("test result: ok. 1 passed, 0 failed"), "{out}");
}

#[test]
fn a_wrong_value_fails_with_the_field_that_differs() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out) =
        run_case(dir.path(), &ROWS.replace("count: 1, temperature_avg: 30", "count: 1, temperature_avg: 31"));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(": the case ... FAILED"), "{out}");
    assert!(out.contains("lake: rows differ"), "{out}");
    assert!(out.contains("1 missing, 1 unexpected"), "{out}");
    assert!(out.contains("temperature_avg: expected 31, got 30.0"), "{out}");
    assert!(out.contains("test result: FAILED. 0 passed, 1 failed"), "{out}");
}

#[test]
fn a_missing_row_fails() {
    let dir = tempfile::tempdir().unwrap();
    let extra = "          - {deviceId: d3, window_start: \"2026-11-01T00:00:00Z\", count: 1, temperature_avg: 1}\n";
    let (code, out) = run_case(dir.path(), &format!("{ROWS}{extra}"));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("expected 4 rows, got 3: 1 missing, 0 unexpected"), "{out}");
    assert!(out.contains(r#"- {"deviceId":"d3""#), "{out}");
}

#[test]
fn an_extra_row_fails() {
    let dir = tempfile::tempdir().unwrap();
    let fewer: String = ROWS.lines().filter(|l| !l.contains("temperature_avg: 25")).map(|l| format!("{l}\n")).collect();
    let (code, out) = run_case(dir.path(), &fewer);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("expected 2 rows, got 3: 0 missing, 1 unexpected"), "{out}");
    assert!(out.contains(r#"+ {"deviceId":"d1","window_start":"2026-11-01T00:01:00.000Z""#), "{out}");
}

#[test]
fn rows_in_exact_order_fail_when_the_order_differs() {
    let dir = tempfile::tempdir().unwrap();
    let reordered = ROWS.replace("rows:", "order: exact\n        rows:");
    let (code, out) = run_case(dir.path(), &reordered);
    // the window emits the first minute's rows before the second's; within a minute, by key
    // order of first appearance, which this test does not rely on: only one of the two orders
    // of the first two rows can match
    let swapped = reordered.replace(
        "          - {deviceId: d1, window_start: \"2026-11-01T00:00:00Z\", count: 2, temperature_avg: 22}\n          - {deviceId: d2, window_start: \"2026-11-01T00:00:00Z\", count: 1, temperature_avg: 30}\n",
        "          - {deviceId: d2, window_start: \"2026-11-01T00:00:00Z\", count: 1, temperature_avg: 30}\n          - {deviceId: d1, window_start: \"2026-11-01T00:00:00Z\", count: 2, temperature_avg: 22}\n",
    );
    assert_ne!(swapped, reordered);
    let (code2, out2) = run_case(dir.path(), &swapped);
    assert_eq!([code, code2].iter().filter(|c| **c == 0).count(), 1, "exactly one order passes:\n{out}\n{out2}");
    let failed = if code == 1 { out } else { out2 };
    assert!(failed.contains("row 1:") && failed.contains("row 2:"), "{failed}");
}

#[test]
fn an_unmet_condition_names_the_first_row_that_fails() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out) =
        run_case(dir.path(), "    outputs:\n      - at: telemetry\n        condition: temperature < 25\n");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("telemetry: condition `temperature < 25` fails for 2 of 4 rows; first: row 3"), "{out}");
    assert!(out.contains(r#""deviceId":"d2""#), "{out}");
}

#[test]
fn output_where_none_is_allowed_fails() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out) = run_case(dir.path(), "    no_output_from: [per_minute]\n");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("per_minute: expected no output, got 3 rows; first: "), "{out}");
}

#[test]
fn a_wrong_count_and_contains_fail_with_what_there_was() {
    let dir = tempfile::tempdir().unwrap();
    let checks = "    outputs:\n      - at: lake\n        count: 2\n        contains: [{deviceId: d9}]\n";
    let (code, out) = run_case(dir.path(), checks);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("lake: expected 2 rows, got 3"), "{out}");
    assert!(out.contains(r#"lake: no row contains {"deviceId":"d9"}"#), "{out}");
}

#[test]
fn late_and_dead_letter_ports_are_captured() {
    let dir = tempfile::tempdir().unwrap();
    let text = r#"pipeline: p.yaml
cases:
  - name: late and dead
    inputs:
      - at: export
        messages:
          - {deviceId: d1, enqueuedTime: "2026-11-01T00:02:00Z", messageSource: telemetry, telemetry: {temperature: 20}}
          - {deviceId: d1, enqueuedTime: "2026-11-01T00:00:30Z", messageSource: telemetry, telemetry: {temperature: 99}}
      - at: export
        lines: ['{"deviceId": "d1", "messageSource": "telemetry", "telemetry": {}}', '{oops']
    outputs:
      - at: per_minute.late
        count: 1
        contains: [{deviceId: d1, telemetry: {temperature: 99}}]
      - at: late
        count: 1
      - at: export.dead_letter
        count: 2
        condition: component == "export" && origin.starts_with("cases[0].inputs[1].lines[")
      - at: rejected
        contains: [{reason: enqueuedTime is missing}]
"#;
    let (code, out) = run_file(dir.path(), text);
    assert_eq!(code, 0, "{out}");
    // and the same file fails when the late event is not late
    let (code, out) = run_file(dir.path(), &text.replace("00:00:30Z", "00:01:55Z"));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("per_minute.late: expected 1 row, got 0"), "{out}");
}

#[test]
fn the_watermark_option_stops_before_the_flush() {
    let dir = tempfile::tempdir().unwrap();
    let case = |end: &str| {
        format!(
            "pipeline: p.yaml\ncases:\n  - name: w\n{end}{INPUTS}    outputs:\n      - at: per_minute\n        fields: [deviceId, window_start]\n        rows: [{{deviceId: d1, window_start: \"2026-11-01T00:00:00Z\"}}, {{deviceId: d2, window_start: \"2026-11-01T00:00:00Z\"}}]\n"
        )
    };
    // the events alone take the watermark to 00:00:55: nothing is closed
    let (code, out) = run_file(dir.path(), &case("    end_of_input: false\n"));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("expected 2 rows, got 0"), "{out}");
    // at 00:01:00 the first minute closes, the second stays open
    let (code, out) = run_file(dir.path(), &case("    watermark: 2026-11-01T00:01:00Z\n"));
    assert_eq!(code, 0, "{out}");
    // just before, nothing
    let (code, out) = run_file(dir.path(), &case("    watermark: 2026-11-01T00:00:59.999Z\n"));
    assert_eq!(code, 1, "{out}");
    // the default end of input flushes all three windows
    let (code, out) = run_file(dir.path(), &case(""));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("0 missing, 1 unexpected"), "{out}");
}

#[test]
fn malformed_test_files_are_reported_with_yaml_positions_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "pipeline: p.yaml\ncases:\n  - name: a\n    inputs:\n      - at: export\n        mesages: []\n    no_output_from: [lake]\n",
            "unknown field `mesages`",
            "line 6, column 9",
        ),
        (
            "pipeline: p.yaml\ncases:\n  - name: a\n    inputs:\n      - at: exprt\n        messages: []\n    no_output_from: [lake]\n",
            "the pipeline has no source `exprt` (did you mean `export`?) (sources: export)",
            "line 5, column 13",
        ),
        (
            "pipeline: p.yaml\ncases:\n  - name: a\n    outputs:\n      - at: per_minute.lat\n        count: 1\n",
            "`per_minute` has no output `lat` (did you mean `late`?)",
            "line 5, column 13",
        ),
        (
            "pipeline: p.yaml\ncases:\n  - name: a\n    outputs:\n      - at: lake\n        condition: 'temperature >'\n",
            "cases[0].outputs[0].condition:",
            "line 6, column 20",
        ),
        (
            "pipeline: p.yaml\ncases:\n  - name: a\n    watermark: yesterday\n    no_output_from: [lake]\n",
            "is not an RFC 3339 time",
            "line 4, column 16",
        ),
        ("pipeline: p.yaml\ncases:\n  - name: a\n    inputs: [\n", "not valid YAML", ""),
        ("pipeline: p.yaml\ncases:\n  - name: a\n", "checks nothing", "line 3, column 5"),
    ];
    for (text, message, position) in cases {
        let (code, out) = run_file(dir.path(), text);
        assert_eq!(code, 2, "{text}\n{out}");
        assert!(out.contains(message), "{text}\nwanted {message:?} in:\n{out}");
        assert!(out.contains(position), "{text}\nwanted {position:?} in:\n{out}");
        assert!(out.contains("1 invalid test file"), "{out}");
    }
}

#[test]
fn an_invalid_pipeline_is_reported_with_its_own_file_and_position() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.yaml"), PIPELINE.replace("size: 1m", "size: soon")).unwrap();
    let path = dir.path().join("bad.test.yaml");
    std::fs::write(&path, "pipeline: bad.yaml\ncases:\n  - name: a\n    no_output_from: [lake]\n").unwrap();
    let out = run(&["test", path.to_str().unwrap()], &[], T);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("bad.yaml: error: transforms.per_minute.window.size"), "{text}");
    assert!(text.contains("line 10"), "{text}");
}

#[test]
fn environment_values_reach_the_pipeline_and_nothing_else_does() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline =
        PIPELINE.replace("condition: 'messageSource == \"telemetry\"'", "condition: 'deviceId == \"${ONLY}\"'");
    std::fs::write(dir.path().join("env.yaml"), pipeline).unwrap();
    let path = dir.path().join("env.test.yaml");
    let text = format!(
        "pipeline: env.yaml\nenvironment: {{ONLY: d1}}\ncases:\n  - name: file level\n{INPUTS}    outputs: [{{at: telemetry, count: 3}}]\n  - name: case level\n    environment: {{ONLY: d2}}\n{INPUTS}    outputs: [{{at: telemetry, count: 1}}]\n"
    );
    std::fs::write(&path, &text).unwrap();
    let out = run(&["test", path.to_str().unwrap()], &[("ONLY", "d9")], T);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    // without `environment:` the process environment is not used
    std::fs::write(&path, text.replace("environment: {ONLY: d1}\n", "").replace("    environment: {ONLY: d2}\n", ""))
        .unwrap();
    let out = run(&["test", path.to_str().unwrap()], &[("ONLY", "d1")], T);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    assert!(stdout.contains("ONLY"), "{stdout}");
}

#[test]
fn junit_xml_lists_every_case_with_its_failure() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.yaml"), PIPELINE).unwrap();
    let text = format!(
        "pipeline: p.yaml\ncases:\n  - name: good <one>\n{INPUTS}{ROWS}  - name: bad & wrong\n{INPUTS}    no_output_from: [lake]\n"
    );
    std::fs::write(dir.path().join("p.test.yaml"), text).unwrap();
    let xml = dir.path().join("junit.xml");
    let out = run(&["test", dir.path().to_str().unwrap(), "--junit", xml.to_str().unwrap()], &[], T);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
    let python = std::env::var("W1_PYTHON").unwrap_or_else(|_| "python3".into());
    let parse = "import sys, json, xml.etree.ElementTree as E\nr = E.parse(sys.argv[1]).getroot()\n\
print(json.dumps({'tests': r.get('tests'), 'failures': r.get('failures'), 'cases': [(c.get('name'), c.find('failure') is not None) for c in r.iter('testcase')]}))";
    let parsed = std::process::Command::new(python).args(["-c", parse, xml.to_str().unwrap()]).output().unwrap();
    assert!(parsed.status.success(), "{}", String::from_utf8_lossy(&parsed.stderr));
    let v: serde_json::Value = serde_json::from_slice(&parsed.stdout).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"tests": "2", "failures": "1", "cases": [["good <one>", false], ["bad & wrong", true]]})
    );
}

#[test]
fn every_shipped_pipeline_has_a_test_file_and_they_pass() {
    let pipelines = shipped_pipelines();
    for p in &pipelines {
        let t = p.with_extension("test.yaml");
        assert!(t.exists(), "{} has no {}", p.display(), t.display());
    }
    let out = run(&["test", root().join("pipelines").to_str().unwrap()], &[], T);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let cases = stdout.lines().filter(|l| l.starts_with("test ") && l.ends_with(" ... ok")).count();
    assert!(cases >= 2 * pipelines.len(), "at least two cases a pipeline:\n{stdout}");
    assert!(stdout.contains(&format!("test result: ok. {cases} passed, 0 failed")), "{stdout}");
}

#[test]
fn no_test_files_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(&["test", dir.path().to_str().unwrap()], &[], T);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no *.test.yaml files under"));
}
