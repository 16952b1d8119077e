//! The command line: validation of every shipped pipeline, error reporting, schema, simulate.

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);

/// Values for every variable the shipped pipelines use without a default.
fn pipeline_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("CENTRALFLOW_INPUT", "/tmp/in.jsonl"),
        ("CENTRALFLOW_OUTPUT", "/tmp/out"),
        ("CENTRALFLOW_QUEUE", "exports"),
        ("IOTC_ID_SCOPE", "0ne00000000"),
        ("IOTC_GROUP_KEY", "c2VjcmV0LWdyb3VwLWtleS1mb3ItdGVzdHM="),
        ("CENTRALFLOW_WEBHOOK_TOKEN", "test-token-value"),
        (
            "EVENTHUBS_CONNECTION_STRING",
            "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=listen;SharedAccessKey=a2V5;EntityPath=hub",
        ),
        ("EVENTHUBS_NAMESPACE", "ns.servicebus.windows.net"),
        ("EVENTHUBS_NAME", "hub"),
    ]
}

#[test]
fn every_shipped_pipeline_validates() {
    let dir = root().join("pipelines");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).collect();
    files.sort();
    assert!(files.len() >= 3, "pipelines/ holds the shipped pipelines");
    for f in files {
        let out = run(&["validate", f.to_str().unwrap()], &pipeline_env(), T);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{} does not validate:\n{}", f.display(), String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains(": ok: "), "{stdout}");
    }
}

#[test]
fn three_mistakes_give_three_errors_and_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(
        dir.path(),
        "bad.yaml",
        r#"sources:
  sim:
    type: simulator
    count: 10
    rate: fast
transforms:
  w:
    type: window
    inputs: [sim]
    window: {kind: tumbling, size: 1 fortnight}
sinks:
  out:
    type: console
    inputs: [ww]
"#,
    );
    let out = run(&["validate", p.to_str().unwrap()], &[], T);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.contains(": error: ")).collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert!(lines[0].contains("sources.sim.rate: must be number (line 5, column 11)"), "{}", lines[0]);
    assert!(lines[1].contains("transforms.w.window.size: \"1 fortnight\" is not a duration"), "{}", lines[1]);
    assert!(lines[1].ends_with("(line 10, column 36)"), "{}", lines[1]);
    assert!(
        lines[2].contains("sinks.out.inputs[0]: unknown input `ww` (did you mean `w`?) (line 14, column 14)"),
        "{}",
        lines[2]
    );
    assert!(err.contains("3 errors"));
}

#[test]
fn run_refuses_an_invalid_pipeline_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(dir.path(), "bad.yaml", "sources: {}\nsinks: {}\n");
    let out = run(&["replay", p.to_str().unwrap()], &[], T);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs at least one source"));
}

#[test]
fn secrets_never_appear_in_validate_output() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(
        dir.path(),
        "s.yaml",
        "sources:\n  a:\n    type: files\n    url: s3://bucket/x\n    storage:\n      aws_secret_access_key: ${MY_SECRET}\n      aws_region: 7\nsinks:\n  o:\n    type: console\n    inputs: [a]\n",
    );
    let secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY";
    let out = run(&["validate", p.to_str().unwrap()], &[("MY_SECRET", secret)], T);
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(2), "aws_region must be a string: {all}");
    assert!(!all.contains(secret), "{all}");
}

#[test]
fn schema_is_a_json_schema_of_the_format() {
    let out = run(&["schema"], &[], T);
    ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["title"], "PipelineConfig");
    let text = v.to_string();
    for t in ["files", "simulator", "webhook", "filter", "map", "window", "parquet", "console", "jsonl", "central"] {
        assert!(text.contains(&format!("\"{t}\"")), "{t}");
    }
}

#[test]
fn simulate_writes_export_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("sim.jsonl");
    simulate(&f, 500, 10, 3);
    let text = std::fs::read_to_string(&f).unwrap();
    assert_eq!(text.lines().count(), 500);
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["schema"], "default@v1");
        assert!(v["enqueuedTime"].as_str().unwrap().starts_with("2026-1"), "{v}");
    }
    // deterministic
    let g = dir.path().join("sim2.jsonl");
    simulate(&g, 500, 10, 3);
    assert_eq!(std::fs::read(&f).unwrap(), std::fs::read(&g).unwrap());
}

#[test]
fn help_describes_the_commands() {
    let out = run(&["--help"], &[], T);
    let text = String::from_utf8_lossy(&out.stdout);
    for c in ["run", "replay", "validate", "schema", "simulate"] {
        assert!(text.contains(c), "{text}");
    }
}
