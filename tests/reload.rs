//! Reloading a pipeline (what `centralflow run` does at every SIGHUP) frees everything a run
//! built. Alone in its file, so that the process's memory is this test's only.

use centralflow::assemble::run_pipeline;
use centralflow::runtime::RunOptions;

/// The resident set size of this process, from /proc (Linux).
fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `centralflow run` builds the whole pipeline anew at every SIGHUP reload: nothing a build
/// allocates (projections above all, which events point at) may outlive it.
#[tokio::test]
async fn reloading_a_pipeline_a_hundred_times_does_not_grow_memory() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let line = r#"{"applicationId":"a","messageSource":"telemetry","deviceId":"d1","schema":"default@v1","templateId":"t","enqueuedTime":"2026-11-01T00:00:01Z","telemetry":{"temperature":21.5}}"#;
    std::fs::write(&input, format!("{line}\n").repeat(200)).unwrap();
    let yaml = format!(
        "sources:\n  export: {{type: files, url: {}}}\ntransforms:\n  t:\n    type: filter\n    inputs: [export]\n    condition: messageSource == \"telemetry\"\n  w:\n    type: window\n    inputs: [t]\n    window: {{kind: tumbling, size: 1m}}\n    aggregates: {{temperature: [avg]}}\nsinks:\n  out: {{type: jsonl, inputs: [w], path: {}}}\n",
        input.display(),
        dir.path().join("out.jsonl").display()
    );
    let mut first = None;
    let mut projections = Vec::new();
    for i in 0..100 {
        // a reload validates the file again: a new plan, a new projection
        let plan = centralflow::config::load_str(&yaml, "reload", &|_| None).expect("valid");
        let p = plan.nodes.iter().find_map(|n| n.projection.clone()).expect("the source is projected");
        projections.push(std::sync::Arc::downgrade(&p));
        drop(p);
        let summary = run_pipeline(&plan, RunOptions::default(), std::future::pending()).await.unwrap();
        // counters are the process's (they continue across reloads, as Prometheus expects)
        assert_eq!(summary.components[0].events_out, 200 * (i + 1));
        if i == 9 {
            first = rss_kib();
        }
    }
    assert!(
        projections.iter().all(|w| w.upgrade().is_none()),
        "every run's projection is freed with its plan and its events"
    );
    if let (Some(a), Some(b)) = (first, rss_kib()) {
        // the projections are freed (above); this catches anything larger a run might keep
        // (its events and their text, its components), which 90 runs would multiply
        assert!(b < a + 4096, "RSS grew from {a} KiB after 10 runs to {b} KiB after 100");
    }
}
