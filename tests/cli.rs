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
        (
            "SERVICEBUS_CONNECTION_STRING",
            "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=listen;SharedAccessKey=a2V5",
        ),
        ("SERVICEBUS_QUEUE", "iotc-export"),
        ("EVENTHUBS_NAME", "hub"),
    ]
}

#[test]
fn every_shipped_pipeline_validates() {
    let files = shipped_pipelines();
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
    for c in ["run", "replay", "validate", "test", "graph", "top", "schema", "simulate"] {
        assert!(text.contains(c), "{text}");
    }
}

/// `graph` draws every shipped pipeline: its DOT parses with pydot (Graphviz's grammar, not ours)
/// into one node per component and the edges the Mermaid diagram draws, dead-letter and late
/// outputs labelled.
#[test]
fn graph_draws_every_shipped_pipeline_in_dot_and_mermaid() {
    let python = std::env::var("W1_PYTHON").expect("W1_PYTHON names a Python with pydot: run scripts/test");
    let files = shipped_pipelines();
    for f in files {
        let out = run(&["graph", "--format", "dot", f.to_str().unwrap()], &pipeline_env(), T);
        assert!(out.status.success(), "{}: {}", f.display(), String::from_utf8_lossy(&out.stderr));
        let parse = "import sys, json, pydot\n(g,) = pydot.graph_from_dot_data(sys.stdin.read())\n\
print(json.dumps({'nodes': sorted(n.get_name() for n in g.get_nodes() if n.get_name() not in ('node', 'edge', 'graph')),\
 'edges': len(g.get_edges()), 'labelled': sorted(e.get('label') for e in g.get_edges() if e.get('label'))}))";
        let mut child = std::process::Command::new(&python)
            .args(["-c", parse])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("python runs");
        use std::io::Write as _;
        child.stdin.take().unwrap().write_all(&out.stdout).unwrap();
        let parsed = child.wait_with_output().unwrap();
        assert!(parsed.status.success(), "{}: pydot: {}", f.display(), String::from_utf8_lossy(&parsed.stderr));
        let dot: serde_json::Value = serde_json::from_slice(&parsed.stdout).unwrap();
        let mermaid = run(&["graph", f.to_str().unwrap()], &pipeline_env(), T);
        let mermaid = String::from_utf8_lossy(&mermaid.stdout).to_string();
        assert!(mermaid.starts_with("flowchart LR\n"), "{mermaid}");
        let m_nodes = mermaid.lines().filter(|l| l.trim_start().starts_with('n') && !l.contains("->")).count();
        let m_edges: Vec<&str> = mermaid.lines().filter(|l| l.contains("->")).collect();
        assert_eq!(dot["nodes"].as_array().unwrap().len(), m_nodes, "{}: {dot} / {mermaid}", f.display());
        assert_eq!(dot["edges"], m_edges.len(), "{}: {dot} / {mermaid}", f.display());
        let labelled: Vec<String> = dot["labelled"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_str().unwrap().trim_matches('"').to_string())
            .collect();
        assert_eq!(labelled.len(), m_edges.iter().filter(|l| l.contains("-.->|")).count(), "{}", f.display());
        assert!(labelled.iter().all(|l| l == "late" || l == "dead_letter"), "{labelled:?}");
    }
    // the demo: every component, and its dead letters drawn as such
    let demo = run(&["graph", root().join("pipelines/demo.yaml").to_str().unwrap()], &[], T);
    let demo = String::from_utf8_lossy(&demo.stdout);
    for name in ["devices", "telemetry", "per_site", "aggregates", "rejected"] {
        assert!(
            demo.contains(&format!("[\"{name}<br/>")) || demo.contains(&format!("(\"{name}<br/>")),
            "{name}: {demo}"
        );
    }
    assert!(demo.contains("-.->|dead_letter|"), "{demo}");
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    assert!(readme.contains(&format!("```mermaid\n{demo}```")), "README.md shows the demo's graph as `graph` draws it");
}
