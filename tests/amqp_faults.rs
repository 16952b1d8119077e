//! The `amqp` source under broker faults, and with a slow sink. These tests disturb the broker
//! (they close connections, stop and start it), so they run one at a time.

mod common;

use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;

use common::amqp_pipeline as amqp;

static BROKER: Mutex<()> = Mutex::new(());

fn rabbitmqctl(args: &[&str]) {
    let out = std::process::Command::new("rabbitmqctl").args(args).output().expect("rabbitmqctl");
    assert!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn wait_broker_up() {
    let start = Instant::now();
    while std::net::TcpStream::connect("127.0.0.1:5672").is_err() {
        assert!(start.elapsed() < Duration::from_secs(120), "the broker did not come back");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `source_reconnects_total` of the `exports` source.
fn reconnects(api: &str) -> f64 {
    metric_value(api, "centralflow_source_reconnects_total", "component=\"exports\"").unwrap_or(0.0)
}

fn connected(api: &str) -> bool {
    metric_value(api, "centralflow_source_connected", "component=\"exports\"") == Some(1.0)
}

#[test]
fn recovers_from_closed_connections_and_a_broker_restart() {
    let _guard = BROKER.lock().unwrap_or_else(|e| e.into_inner());
    let s = amqp::setup(150_000, None);
    let mut run = Logged::spawn(amqp::command(&s));
    let api = run.api();
    let w = Duration::from_secs(120);
    // each fault once the source is connected again after the previous one: the reconnect
    // counter and the connected gauge say when, no sleep guesses it
    wait_until("the source connects", w, || connected(&api));
    for (i, reason) in ["centralflow fault test", "centralflow fault test again"].iter().enumerate() {
        rabbitmqctl(&["close_all_connections", reason]);
        wait_until(&format!("reconnection {}", i + 1), w, || reconnects(&api) >= (i + 1) as f64 && connected(&api));
    }
    rabbitmqctl(&["stop_app"]);
    wait_until("the source sees the broker gone", w, || !connected(&api));
    rabbitmqctl(&["start_app"]);
    wait_broker_up();
    wait_until("reconnection after the restart", w, || reconnects(&api) >= 3.0 && connected(&api));
    amqp::drain(&s);
    let counted = reconnects(&api);
    let err = run.stop(Duration::from_secs(600));
    assert!(counted >= 3.0, "three connections lost and re-established, {counted} counted");
    // a fault seen while reading says "reconnecting", one seen while acknowledging "re-established"
    assert!(
        (err.contains("reconnecting") || err.contains("re-established")) && err.contains("connected to the broker"),
        "{err}"
    );
    assert!(err.contains("exports"), "{err}");
    let got = amqp::raw_rows(s.dir.path());
    let want = amqp::expected_raw(&s.input);
    assert!(got.values().all(|n| *n == 1), "duplicates after faults");
    assert_eq!(got, want, "nothing lost");
    amqp::assert_windows_match_replay(&s);
}

#[test]
fn a_slow_sink_backs_up_the_queue_and_memory_stays_flat() {
    let _guard = BROKER.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("cf-slow-");
    let input = dir.path().join("export.jsonl");
    simulate(&input, 100_000, 200, 3);
    amqp_refill(&queue, file_bodies(&input));
    let p = pipeline(
        dir.path(),
        "slow.yaml",
        &format!(
            "sources:\n  q:\n    type: amqp\n    url: ${{AMQP}}\n    queue: {queue}\n    prefetch: 500\nsinks:\n  slow:\n    type: jsonl\n    inputs: [q]\n    path: {}\n    rate_limit: 2000\ncheckpoint:\n  url: {}\n  interval: 1s\n",
            dir.path().join("out.jsonl").display(),
            dir.path().join("state").display()
        ),
    );
    let child = cmd(&["run", p.to_str().unwrap()])
        .env("AMQP", amqp_url())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut samples = Vec::new();
    for _ in 0..12 {
        std::thread::sleep(Duration::from_secs(1));
        samples.push(rss_kib(child.id()).unwrap());
    }
    let (ready, _) = amqp_depth(&queue);
    signal(&child, libc::SIGTERM);
    ok(&wait_output(child, Duration::from_secs(120)));
    let written = std::fs::read_to_string(dir.path().join("out.jsonl")).unwrap().lines().count();
    assert!(written < 40_000, "the sink is slow: {written} written in 12 s");
    assert!(ready > 50_000, "the rest waits in the broker: {ready} ready");
    let settled = samples[3];
    let peak = *samples[3..].iter().max().unwrap();
    assert!(peak < settled + 30 * 1024, "memory grows: {samples:?} KiB");
    tokio::runtime::Runtime::new().unwrap().block_on(amqp_delete(&queue));
}
