//! The emulators checked against Microsoft's own clients (issue 15, item 8): the PyPI
//! `azure-servicebus` and `azure-eventhub` SDKs (installed by `scripts/test`, whose Python is
//! `W1_PYTHON`) connect with `UseDevelopmentEmulator=true` connection strings naming the emulator's
//! port, send, receive and settle; each test compares what the SDK saw with the emulator's own
//! counters. The scripts are in tests/python/.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::eventhubs_emulator as eh;
use common::servicebus_emulator::{Config, Emulator, Message, Stats};
use serde_json::{json, Value};

fn python() -> String {
    std::env::var("W1_PYTHON")
        .expect("W1_PYTHON names a Python with azure-servicebus and azure-eventhub: run scripts/test")
}

fn script(name: &str) -> PathBuf {
    common::root().join("tests/python").join(name)
}

/// Runs a script of tests/python with these arguments (at most two minutes); its stdout.
async fn run_script(name: &str, args: &[&str]) -> String {
    let mut cmd = tokio::process::Command::new(python());
    cmd.arg(script(name)).args(args).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{name} {args:?} did not finish within 2 minutes"))
        .expect("run python");
    assert!(
        out.status.success(),
        "{name} {args:?} failed:\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// sb_sdk_check.py's JSON answer.
async fn sb_check(emu: &Emulator, args: &[&str]) -> Value {
    let cs = emu.connection_string();
    let mut all = vec![cs.as_str()];
    all.extend_from_slice(args);
    let out = run_script("sb_sdk_check.py", &all).await;
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("sb_sdk_check {args:?}: {e}: {out}"))
}

fn bodies(v: &Value) -> Vec<String> {
    v.as_array().expect("a list of messages").iter().map(|m| m["body"].as_str().unwrap().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servicebus_peek_lock_complete_abandon_dead_letter_renew_and_expiry() {
    let emu = Emulator::start(Config::new().queue("orders").lock_duration(Duration::from_secs(2))).await.unwrap();
    let r = sb_check(&emu, &["queue", "orders", "2"]).await;

    // First delivery of each: in order, delivery count 0, distinct lock tokens and increasing
    // sequence numbers, properties as sent, locked for the lock duration from now.
    let first = r["first"].as_array().unwrap();
    assert_eq!(bodies(&r["first"]), ["m0", "m1", "m2", "m3", "m4"]);
    let mut tokens = std::collections::HashSet::new();
    for (i, m) in first.iter().enumerate() {
        assert_eq!(m["delivery_count"], 0, "{m}");
        assert_eq!(m["message_id"], format!("id-{i}"));
        assert_eq!(m["application_properties"], json!({"i": i, "kind": "test"}));
        assert!(tokens.insert(m["lock_token"].as_str().unwrap().to_string()), "lock tokens are distinct");
        let locked_for = m["locked_until"].as_f64().unwrap() - m["enqueued_time"].as_f64().unwrap();
        assert!((1.9..4.0).contains(&locked_for), "locked for {locked_for} s after enqueueing: {m}");
    }
    let seqs: Vec<i64> = first.iter().map(|m| m["sequence_number"].as_i64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");

    // Abandoned: delivered again, delivery count 1, same sequence number, new lock token.
    let again = &r["abandoned_again"][0];
    assert_eq!(again["body"], "m1");
    assert_eq!(again["delivery_count"], 1);
    assert_eq!(again["sequence_number"], first[1]["sequence_number"]);
    assert_ne!(again["lock_token"], first[1]["lock_token"]);

    // Renewed: the lock runs later than before.
    let (before, after) = (r["renew"]["before"].as_f64().unwrap(), r["renew"]["after"].as_f64().unwrap());
    assert!(after > before + 0.2, "renewal moved locked_until from {before} to {after}");

    // Expired: m4 comes back once its lock ran out, delivery count 1.
    let expired = &r["expired_again"][0];
    assert_eq!(expired["body"], "m4");
    assert_eq!(expired["delivery_count"], 1);
    assert!(r["expired_at"].as_f64().unwrap() >= r["m4_locked_until"].as_f64().unwrap() - 0.05);

    // Dead-lettered with the reason and description, read back from $DeadLetterQueue.
    let dead = r["dead_letters"].as_array().unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["body"], "m2");
    assert_eq!(dead[0]["dead_letter_reason"], "Malformed");
    assert_eq!(dead[0]["dead_letter_error_description"], "not JSON at byte 3");
    assert_eq!(dead[0]["dead_letter_source"], "orders");
    assert_eq!(dead[0]["application_properties"]["kind"], "test");
    assert_eq!(dead[0]["sequence_number"], first[2]["sequence_number"]);

    // The emulator counted the same story.
    let stats = emu.stats("orders").unwrap();
    assert_eq!(
        stats,
        Stats {
            available: 0,
            locked: 0,
            completed: 4,
            dead_lettered: 1,
            deliveries: 7,
            redeliveries: 2,
            lock_renewals: 1,
            lock_expiries: 1,
            // depends on how the SDK batches its receives; tests/servicebus.rs checks it
            peak_locked: stats.peak_locked,
        }
    );
    let dlq = emu.stats("Orders/$deadletterqueue").unwrap();
    assert_eq!((dlq.available, dlq.locked, dlq.deliveries), (1, 0, 0), "peeking does not lock: {dlq:?}");
    assert!(emu.stats("nope").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servicebus_topic_copies_to_every_subscription() {
    let emu = Emulator::start(Config::new().topic("exports", "lake").topic("exports", "alerts")).await.unwrap();
    // One message through the Rust API first, with what Microsoft's SDK must read back.
    emu.send(
        "exports",
        Message {
            body: b"{\"direct\": true}".to_vec(),
            message_id: Some("direct-1".into()),
            content_type: Some("application/json".into()),
            application_properties: vec![("iotcentral-device-id".into(), json!("dev-1")), ("n".into(), json!(7))],
        },
    )
    .unwrap();
    let r = sb_check(&emu, &["topic", "exports", "lake", "alerts", "4"]).await;
    for sub in ["lake", "alerts"] {
        let got = &r[sub];
        assert_eq!(bodies(got), ["{\"direct\": true}", "t0", "t1", "t2"], "{sub}");
        assert_eq!(got[0]["message_id"], "direct-1");
        assert_eq!(got[0]["content_type"], "application/json");
        assert_eq!(got[0]["application_properties"], json!({"iotcentral-device-id": "dev-1", "n": 7}));
        assert_eq!(got[2]["application_properties"], json!({"i": 1}));
        let stats = emu.stats(&format!("exports/Subscriptions/{sub}")).unwrap();
        assert_eq!(
            (stats.completed, stats.deliveries, stats.available, stats.locked),
            (4, 4, 0, 0),
            "{sub}: {stats:?}"
        );
    }
    // A topic message has one sequence number, the same in every subscription.
    assert_eq!(r["lake"][3]["sequence_number"], r["alerts"][3]["sequence_number"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servicebus_receive_and_delete_competing_receivers_and_prefetch() {
    let emu = Emulator::start(Config::new().queue("r").queue("c").queue("p").lock_duration(Duration::from_secs(60)))
        .await
        .unwrap();

    let r = sb_check(&emu, &["receive_and_delete", "r"]).await;
    assert_eq!(bodies(&r["received"]), ["r0", "r1", "r2"]);
    assert!(r["received"].as_array().unwrap().iter().all(|m| m["lock_token"].is_null()));
    let stats = emu.stats("r").unwrap();
    assert_eq!((stats.completed, stats.deliveries, stats.available, stats.locked), (3, 3, 0, 0), "{stats:?}");

    // Two receivers on one queue: each message goes to exactly one of them.
    for i in 0..10 {
        emu.send("c", Message::text(format!("c{i}"))).unwrap();
    }
    let r = sb_check(&emu, &["compete", "c", "10"]).await;
    let (a, b) = (bodies(&r["a"]), bodies(&r["b"]));
    assert_eq!(a.len(), 5, "{r}");
    let mut all: Vec<String> = a.iter().chain(&b).cloned().collect();
    all.sort();
    let mut want: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
    want.sort();
    assert_eq!(all, want, "a: {a:?}, b: {b:?}");
    assert_eq!(emu.stats("c").unwrap().completed, 10);

    // A prefetch of 5,000 gets 5,000 of 6,000, locked. (The SDK tops its credit up after a receive
    // and releases what arrived meanwhile when it closes: released messages are available again.)
    for i in 0..6000 {
        emu.send("p", Message::text(format!("p{i}"))).unwrap();
    }
    let r = sb_check(&emu, &["prefetch", "p", "5000"]).await;
    assert_eq!((r["received"].as_u64(), r["distinct"].as_u64()), (Some(5000), Some(5000)), "{r}");
    let stats = emu.stats("p").unwrap();
    assert_eq!((stats.locked, stats.available), (5000, 1000), "{stats:?}");
    assert_eq!(stats.redeliveries, 0, "released messages keep their delivery count: {stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servicebus_refuses_a_token_signed_with_another_key() {
    let emu = Emulator::start(Config::new().queue("q")).await.unwrap();
    let r = sb_check(&emu, &["bad_key", "q"]).await;
    assert_eq!(r["error"], "ServiceBusAuthenticationError", "{r}");
    assert_eq!(emu.stats("q").unwrap().available, 0);
}

/// A settlement that arrives after the lock expired (and the message went out again) is refused
/// with `com.microsoft:message-lock-lost`; the redelivered copy settles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servicebus_settling_an_expired_lock_is_refused() {
    let emu = Emulator::start(Config::new().queue("q").lock_duration(Duration::from_secs(1))).await.unwrap();
    let r = sb_check(&emu, &["lock_lost", "q"]).await;
    assert_eq!((&r["old"]["delivery_count"], &r["new"]["delivery_count"]), (&json!(0), &json!(1)), "{r}");
    let message = r["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("com.microsoft:message-lock-lost"), "{r}");
    let stats = emu.stats("q").unwrap();
    assert_eq!((stats.completed, stats.lock_expiries, stats.available, stats.locked), (1, 1, 0, 0), "{stats:?}");
}

/// sb_publish.py and sb_dead_letters.py, the scripts the Service Bus source's tests use, and the
/// max delivery count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servicebus_publish_and_dead_letter_scripts() {
    let emu = Emulator::start(Config::new().queue("in").topic("t", "s").max_delivery_count(1)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("records.jsonl");
    let records = [
        json!({"body": "{\"telemetry\": {\"temperature\": 21.5}}", "properties": {"iotcentral-device-id": "d1"}}),
        json!({"body": "not json: ünïcödé", "properties": {}}),
        json!({"body": "  spaced  ", "properties": {"n": 3, "flag": true}}),
    ];
    std::fs::write(&file, records.iter().map(|r| format!("{r}\n")).collect::<String>()).unwrap();
    let path = file.to_str().unwrap();
    let cs = emu.connection_string();

    let out =
        run_script("sb_publish.py", &[&cs, path, "--queue", "in", "--message-id-prefix", "p-", "--batch", "2"]).await;
    assert_eq!(out.trim(), "3");
    assert_eq!(emu.stats("in").unwrap().available, 3);
    let out = run_script("sb_publish.py", &[&cs, path, "--topic", "t"]).await;
    assert_eq!(out.trim(), "3");
    assert_eq!(emu.stats("t/Subscriptions/s").unwrap().available, 3);

    // Max delivery count 1: one abandon dead-letters each message.
    let r = sb_check(&emu, &["abandon_all", "in", "3"]).await;
    let abandoned = r["abandoned"].as_array().unwrap();
    let ids: Vec<&str> = abandoned.iter().map(|m| m["message_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["p-0", "p-1", "p-2"]);
    let stats = emu.stats("in").unwrap();
    assert_eq!((stats.dead_lettered, stats.available, stats.locked), (3, 0, 0), "{stats:?}");

    let out = run_script("sb_dead_letters.py", &[&cs, "--queue", "in"]).await;
    let dead: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(dead.len(), 3, "{out}");
    for (d, rec) in dead.iter().zip(&records) {
        assert_eq!(d["body"], rec["body"], "bodies come back exactly");
        assert_eq!(d["reason"], "MaxDeliveryCountExceeded");
        assert_eq!(d["delivery_count"], 1);
        for (k, v) in rec["properties"].as_object().unwrap() {
            assert_eq!(&d["application_properties"][k], v);
        }
        assert_eq!(d["application_properties"]["DeadLetterReason"], "MaxDeliveryCountExceeded");
    }
    let out = run_script("sb_dead_letters.py", &[&cs, "--topic", "t", "--subscription", "s"]).await;
    assert_eq!(out.trim(), "", "nothing was dead-lettered in the subscription");
}

/// The Event Hubs emulator with Microsoft's azure-eventhub: a producer sends batches to two
/// partitions and keyed events; the hub's and partitions' properties, and consumers from the
/// earliest event and from sequence numbers (inclusive and not), see what the emulator holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eventhubs_send_and_receive_with_the_sdk() {
    let emu = eh::Emulator::start(eh::EmulatorConfig::new("telemetry", 4)).await.unwrap();
    let out = run_script("eh_sdk_check.py", &[&emu.development_connection_string()]).await;
    let r: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(r["partition_ids"], json!(["0", "1", "2", "3"]));

    // What the emulator holds, partition by partition, against the SDK's properties and reads.
    let mut keyed_partitions = Vec::new();
    for p in 0..4u32 {
        let len = emu.partition_len(p);
        let props = &r["partitions"][p.to_string()];
        assert_eq!(props["last_enqueued_sequence_number"], len as i64 - 1, "partition {p}: {props}");
        assert_eq!(props["is_empty"], len == 0);
        if len == 0 {
            continue;
        }
        let events = r["events"][p.to_string()].as_array().unwrap();
        assert_eq!(events.len(), len, "partition {p}: {events:?}");
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e["sequence_number"], i, "partition {p}");
            assert_eq!(e["partition"], p.to_string());
        }
        let bodies: Vec<&str> = events.iter().map(|e| e["body"].as_str().unwrap()).collect();
        match p {
            0 => assert!(bodies.starts_with(&["a0", "a1", "a2"]), "{bodies:?}"),
            1 => assert!(bodies.starts_with(&["b0", "b1", "b2"]), "{bodies:?}"),
            _ => {}
        }
        let keyed: Vec<&Value> = events.iter().filter(|e| e["partition_key"] == "device-42").collect();
        if !keyed.is_empty() {
            keyed_partitions.push(p);
            let bodies: Vec<&str> = keyed.iter().map(|e| e["body"].as_str().unwrap()).collect();
            assert_eq!(bodies, ["k0", "k1", "k2"]);
            assert_eq!(keyed[1]["properties"], json!({"iotcentral-device-id": "device-42", "i": "1"}));
        }
    }
    assert_eq!(keyed_partitions.len(), 1, "one partition key, one partition: {keyed_partitions:?}");

    // Starting positions: from sequence number 1 inclusive, and after sequence number 0.
    let from1: Vec<&str> =
        r["p0_from_seq_1_inclusive"].as_array().unwrap().iter().map(|e| e["body"].as_str().unwrap()).collect();
    assert_eq!(from1, ["a1", "a2"]);
    let after0: Vec<&str> =
        r["p1_after_seq_0"].as_array().unwrap().iter().map(|e| e["body"].as_str().unwrap()).collect();
    assert_eq!(after0, ["b1", "b2"]);
}
