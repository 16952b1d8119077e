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

#[test]
fn recovers_from_closed_connections_and_a_broker_restart() {
    let _guard = BROKER.lock().unwrap_or_else(|e| e.into_inner());
    let s = amqp::setup(150_000, None);
    let child = amqp::start(&s);
    std::thread::sleep(Duration::from_millis(1500));
    rabbitmqctl(&["close_all_connections", "centralflow fault test"]);
    std::thread::sleep(Duration::from_millis(1500));
    rabbitmqctl(&["close_all_connections", "centralflow fault test again"]);
    std::thread::sleep(Duration::from_millis(1000));
    rabbitmqctl(&["stop_app"]);
    std::thread::sleep(Duration::from_secs(3));
    rabbitmqctl(&["start_app"]);
    wait_broker_up();
    let err = amqp::drain_and_stop(&s, child);
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
