//! The `amqp` source against the real broker (RabbitMQ on 127.0.0.1:5672): a large drain,
//! crashes at random moments, poison messages. Broker faults and a slow sink are in
//! `amqp_faults.rs` (they disturb the broker, so they run on their own).

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::amqp_pipeline::*;
use common::*;

#[test]
fn a_large_queue_drains_exactly_once() {
    let s = setup(200_000, None);
    let child = start(&s);
    let err = drain_and_stop(&s, child);
    let got = raw_rows(s.dir.path());
    let want = expected_raw(&s.input);
    assert_eq!(got.values().filter(|n| **n > 1).count(), 0, "duplicates in the raw archive");
    assert_eq!(got, want, "raw archive = the queue's telemetry");
    assert_windows_match_replay(&s);
    assert!(err.contains("exports"), "{err}");
}

/// With 1% poison messages: a kill loses no dead-letter record either (they were published and
/// acknowledged at receipt, and a kill before the next checkpoint cut their records).
#[test]
fn crashes_at_random_moments_lose_and_duplicate_nothing() {
    let s = setup(200_000, Some(100));
    let mut rng = 0x2545F4914F6CDD1Du64;
    for round in 0..5 {
        let child = start(&s);
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let wait = Duration::from_millis(800 + rng % 2500);
        std::thread::sleep(wait);
        signal(&child, libc::SIGKILL);
        let out = child.wait_with_output().unwrap();
        assert!(!out.status.success(), "round {round}");
    }
    let child = start(&s);
    drain_and_stop(&s, child);
    let got = raw_rows(s.dir.path());
    let want = expected_raw(&s.input);
    let dups: Vec<_> = got.iter().filter(|(_, n)| **n > 1).take(3).collect();
    assert!(dups.is_empty(), "duplicates after crashes: {dups:?}");
    let missing = want.keys().filter(|k| !got.contains_key(*k)).count();
    assert_eq!(missing, 0, "messages lost after crashes");
    assert_eq!(got, want);
    assert_windows_match_replay(&s);
    let dl = std::fs::read_to_string(s.dir.path().join("out/dead-letters.jsonl")).unwrap();
    let records: Vec<String> = dl
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["payload"].as_str().unwrap().to_string())
        .collect();
    let unique: BTreeSet<&String> = records.iter().collect();
    assert_eq!((records.len(), unique.len()), (2000, 2000), "one dead-letter record per poison message");
    // and the dead-letter queue has each once: its publication and the acknowledgement are one
    // transaction
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dlq = rt.block_on(amqp_drain(&format!("{}.dead-letter", s.queue)));
    let bodies: BTreeSet<String> = dlq.iter().map(|(_, b)| String::from_utf8_lossy(b).to_string()).collect();
    assert_eq!(bodies.len(), 2000, "every poison message in the dead-letter queue");
    assert_eq!(dlq.len(), 2000, "each poison message dead-lettered once");
    rt.block_on(amqp_delete(&s.queue));
}

#[test]
fn poison_messages_go_to_the_dead_letter_queue_with_reasons() {
    let s = setup(20_000, Some(100));
    let child = start(&s);
    drain_and_stop(&s, child);
    assert_eq!(raw_rows(s.dir.path()), expected_raw(&s.input), "the rest flows");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dlq = rt.block_on(amqp_drain(&format!("{}.dead-letter", s.queue)));
    assert_eq!(dlq.len(), 200, "1% poison");
    let bodies: BTreeSet<String> = dlq.iter().map(|(_, b)| String::from_utf8_lossy(b).to_string()).collect();
    assert_eq!(bodies.len(), 200);
    for (h, _) in &dlq {
        assert!(h["x-centralflow-reason"].contains("no messageSource"), "{h:?}");
        assert!(h["x-centralflow-origin"].starts_with(&s.queue), "{h:?}");
        assert_eq!(h["iotcentral-application-id"], "6e9d8f3c", "original headers kept");
    }
    let dl = std::fs::read_to_string(s.dir.path().join("out/dead-letters.jsonl")).unwrap();
    assert_eq!(dl.lines().count(), 200, "also on the dead_letter output");
    rt.block_on(amqp_delete(&s.queue));
}

/// Poison messages through a dead-letter exchange named in `dead_letter_exchange` (declared by
/// its owner, not by the source) reach the queue bound to it. One that does not exist is an
/// error at connection that names it, retried, instead of a channel closed at every commit.
#[test]
fn poison_messages_through_a_dead_letter_exchange_and_one_that_does_not_exist() {
    use lapin::options::*;
    let s = setup(2_000, Some(100));
    let (dlx, bound) = (unique("cf-dlx-"), unique("cf-dlx-q-"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default()).await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        // a topic exchange: the source's passive check does not depend on the type
        let (kind, opts) = (lapin::ExchangeKind::Topic, ExchangeDeclareOptions::default());
        ch.exchange_declare(dlx.as_str().into(), kind, opts, Default::default()).await.unwrap();
        ch.queue_declare(bound.as_str().into(), QueueDeclareOptions::default(), Default::default()).await.unwrap();
        let bind = QueueBindOptions::default();
        ch.queue_bind(bound.as_str().into(), dlx.as_str().into(), "#".into(), bind, Default::default()).await.unwrap();
        let _ = conn.close(200, "done".into()).await;
    });
    let yaml = |exchange: &str| {
        format!(
            "sources:\n  exports:\n    type: amqp\n    url: ${{CENTRALFLOW_AMQP_URL}}\n    queue: {}\n    declare: {{ durable: true }}\n    dead_letter_exchange: {exchange}\nsinks:\n  out:\n    type: jsonl\n    inputs: [exports]\n    path: {}\n  dl:\n    type: jsonl\n    inputs: [exports.dead_letter]\n    path: {}\ncheckpoint:\n  url: {}\n  interval: 1s\n",
            s.queue,
            s.dir.path().join("out.jsonl").display(),
            s.dir.path().join("dl.jsonl").display(),
            s.dir.path().join("state").display()
        )
    };
    let env = [("CENTRALFLOW_AMQP_URL", amqp_url())];
    // an exchange that does not exist: said, and nothing taken from the queue
    let p = pipeline(s.dir.path(), "missing.yaml", &yaml("cf-no-such-exchange"));
    let mut c = cmd(&["run", p.to_str().unwrap()]);
    c.envs(env.clone());
    let mut run = Logged::spawn(c);
    run.wait_for("the dead-letter exchange cf-no-such-exchange does not exist", Duration::from_secs(60));
    run.stop(Duration::from_secs(60));
    assert_eq!(amqp_depth(&s.queue), (2_020, 0), "nothing was taken");
    // the exchange that exists
    let p = pipeline(s.dir.path(), "dlx.yaml", &yaml(&dlx));
    let mut c = cmd(&["run", p.to_str().unwrap()]);
    c.envs(env);
    let run = Logged::spawn(c);
    drain(&s);
    run.stop(Duration::from_secs(60));
    let letters = rt.block_on(amqp_drain(&bound));
    assert_eq!(letters.len(), 20, "1% poison, through the exchange");
    assert!(letters.iter().all(|(h, _)| h["x-centralflow-queue"] == s.queue), "{letters:?}");
    let records = std::fs::read_to_string(s.dir.path().join("dl.jsonl")).unwrap();
    assert_eq!(records.lines().count(), 20);
    rt.block_on(async {
        let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default()).await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        let _ = ch.queue_delete(bound.as_str().into(), QueueDeleteOptions::default()).await;
        let _ = ch.exchange_delete(dlx.as_str().into(), ExchangeDeleteOptions::default()).await;
        let _ = conn.close(200, "done".into()).await;
    });
    rt.block_on(amqp_delete(&s.queue));
}
