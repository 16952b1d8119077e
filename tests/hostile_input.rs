//! Hostile input in bounded memory and time (README, "Limits"): JSON nested deeper than
//! serde_json's limit, a 100,000-element array in one AMQP body, 10,000 distinct telemetry field
//! names (through `pipelines/w1-amqp.yaml` against RabbitMQ), and a webhook client that sends its
//! body one byte a second (against the webhook server).

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::amqp_pipeline as amqp;
use common::*;

const T: Duration = Duration::from_secs(300);

fn export(device: &str, second: u32, telemetry: &str) -> String {
    format!(
        r#"{{"applicationId":"6e9d8f3c","messageSource":"telemetry","deviceId":"{device}","schema":"default@v1","templateId":"dtmi:t;1","enqueuedTime":"2026-11-01T00:{:02}:{:02}Z","telemetry":{telemetry},"enrichments":{{}}}}"#,
        second / 60,
        second % 60
    )
}

/// `{"v": [[[…0…]]]}`: `levels` arrays inside the telemetry object.
fn nested(levels: usize) -> String {
    format!("{{\"v\":{}0{}}}", "[".repeat(levels), "]".repeat(levels))
}

#[test]
fn deep_nesting_huge_arrays_and_many_field_names_through_rabbitmq() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("cf-hostile-");
    let input = dir.path().join("export.jsonl");
    simulate(&input, 3_000, 50, 17);
    // accepted: one message with 10,000 distinct telemetry names, and 1,000 messages with 10 new
    // names each (10,000 more); they are part of the expected raw output
    let mut good = std::fs::read_to_string(&input).unwrap();
    let wide: Vec<String> = (0..10_000).map(|i| format!("\"w{i:05}\":{i}")).collect();
    good.push_str(&export("wide", 1, &format!("{{{}}}", wide.join(","))));
    good.push('\n');
    for m in 0..1_000u32 {
        let names: Vec<String> = (0..10).map(|k| format!("\"n{m:04}_{k}\":{k}")).collect();
        good.push_str(&export("many-names", m % 3_600, &format!("{{{}}}", names.join(","))));
        good.push('\n');
    }
    std::fs::write(&input, &good).unwrap();
    let mut bodies = file_bodies(&input);
    // refused: nesting 120,000 levels deep (240 KB, under the 256 KB record limit) and just past
    // serde_json's limit; a 100,000-element array
    let deep = export("deep", 2, &nested(120_000));
    assert!(deep.len() < 256 * 1024);
    let past_limit = export("deep", 3, &nested(130));
    let array = format!("[{}0]", "0,".repeat(99_999));
    assert!(array.len() < 256 * 1024);
    let hostile = [deep, past_limit, array];
    for (k, h) in hostile.iter().enumerate() {
        bodies.insert(500 + k * 700, h.as_bytes().to_vec());
    }
    amqp_refill(&queue, bodies);
    let s = amqp::Setup { dir, queue: queue.clone(), input };
    let started = Instant::now();
    let run = Logged::spawn(amqp::command(&s));
    let pid = run.child.id();
    let mut peak = 0;
    let drained = Instant::now();
    loop {
        peak = peak.max(rss_kib(pid).unwrap_or(0));
        let (ready, unacked) = amqp_depth(&queue);
        if ready == 0 && unacked == 0 {
            break;
        }
        assert!(drained.elapsed() < T, "the queue did not drain: {ready} ready, {unacked} unacked");
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = run.stop(T);
    let took = started.elapsed();
    // each hostile body dead-lettered once, with the reason
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dlq = rt.block_on(amqp_drain(&format!("{queue}.dead-letter")));
    let reasons: Vec<&str> = dlq.iter().map(|(h, _)| h["x-centralflow-reason"].as_str()).collect();
    assert_eq!(dlq.len(), 3, "{reasons:?}");
    assert_eq!(reasons.iter().filter(|r| r.contains("nested more than")).count(), 2, "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("array of 100000 elements")), "{reasons:?}");
    for (_, body) in &dlq {
        assert!(hostile.iter().any(|h| h.as_bytes() == body.as_slice()), "the dead letter keeps the body");
    }
    // everything else once, the wide messages included
    let got = amqp::raw_rows(s.dir.path());
    let want = amqp::expected_raw(&s.input);
    assert!(got.values().all(|n| *n == 1), "duplicates");
    assert_eq!(got.len(), want.len(), "rows: {} of {}\n{log}", got.len(), want.len());
    assert_eq!(got, want);
    // bounded: the limits refuse early, so neither memory nor time grows with the hostile input
    println!("peak RSS {} MiB, {took:?}", peak / 1024);
    assert!(peak < 400 * 1024, "peak RSS {} MiB", peak / 1024);
    assert!(took < Duration::from_secs(120), "took {took:?}");
    rt.block_on(amqp_delete(&queue));
}

/// A client that sends its body one byte a second is answered 408 once `body_timeout` has passed,
/// and does not hold the webhook's only queue slot meanwhile: another client is answered at once.
#[test]
fn a_webhook_body_sent_one_byte_a_second_is_cut_off_by_the_body_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(
        dir.path(),
        "slow.yaml",
        &format!(
            "sources:\n  hook:\n    type: webhook\n    address: 127.0.0.1:0\n    token: ${{TOKEN}}\n    queue: 1\n    body_timeout: 3s\nsinks:\n  out:\n    type: jsonl\n    inputs: [hook]\n    path: {}\ncheckpoint:\n  interval: 30s\n",
            dir.path().join("out.jsonl").display()
        ),
    );
    let mut c = cmd(&["run", p.to_str().unwrap()]);
    c.env("TOKEN", "hostile-test-token-1234");
    let mut run = Logged::spawn(c);
    let line = run.wait_for("webhook listening on ", Duration::from_secs(60));
    let addr = line.split("http://").nth(1).unwrap().split(['/', ' ']).next().unwrap().to_string();
    let body = export("slow", 0, "{\"t\":1}");
    // the slow client: headers at once, then a byte a second
    let mut slow = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        slow,
        "POST / HTTP/1.1\r\nHost: {addr}\r\nAuthorization: hostile-test-token-1234\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    let sent = Instant::now();
    let writer = {
        let mut w = slow.try_clone().unwrap();
        let bytes = body.clone().into_bytes();
        std::thread::spawn(move || {
            for b in bytes {
                if w.write_all(&[b]).is_err() {
                    return; // the server closed the connection
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    // meanwhile a normal client is answered (the slow one holds no queue slot)
    std::thread::sleep(Duration::from_millis(1_200));
    let status = post_status(&addr, &export("fast", 1, "{\"t\":2}"));
    assert_eq!(status, 200, "a normal request while the slow one trickles");
    // the slow one: 408 with the reason, a little after 3 s
    slow.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut answer = Vec::new();
    let _ = slow.read_to_end(&mut answer);
    let took = sent.elapsed();
    let answer = String::from_utf8_lossy(&answer).to_string();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("within 3s"), "{answer}");
    assert!(took >= Duration::from_secs(3) && took < Duration::from_secs(15), "answered after {took:?}");
    drop(slow);
    writer.join().unwrap();
    let log = run.stop(Duration::from_secs(60));
    let out = std::fs::read_to_string(dir.path().join("out.jsonl")).unwrap();
    assert_eq!(out.lines().count(), 1, "only the normal request was taken: {out}\n{log}");
    assert!(out.contains("\"fast\""));
}

/// POSTs a body with the test's token over a plain socket; the status code.
fn post_status(addr: &str, body: &str) -> u16 {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "POST / HTTP/1.1\r\nHost: {addr}\r\nAuthorization: hostile-test-token-1234\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}
