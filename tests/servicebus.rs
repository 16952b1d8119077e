//! The `servicebus` source end to end: the real `centralflow` binary on
//! `pipelines/servicebus-to-parquet.yaml` against the Service Bus emulator, messages published
//! by Microsoft's Python SDK (`azure-servicebus`), dead letters read back with it. Kills, lost
//! locks with and without renewal, dropped connections, a topic subscription, two instances.

mod common;

use std::time::{Duration, Instant};

use common::servicebus_pipeline::{self as sb, Bus, To};
use common::*;

const LONG: Duration = Duration::from_secs(300);

/// Messages for the kill test (`CENTRALFLOW_TEST_SB_MESSAGES` to change it).
fn kill_test_messages() -> u64 {
    std::env::var("CENTRALFLOW_TEST_SB_MESSAGES").ok().and_then(|s| s.parse().ok()).unwrap_or(100_000)
}

#[test]
fn one_hundred_thousand_messages_exactly_once_across_three_sigkills_and_windows_equal_the_replay() {
    let n = kill_test_messages();
    let bus = Bus::new(To::Queue, Duration::from_secs(3));
    let lines = bus.simulated(n, 200, 31);
    bus.publish(&lines);
    assert_eq!(bus.stats(sb::QUEUE).available, n);
    let mut child = bus.start("a", &[]);
    for kill in 1..=3u64 {
        // Each kill lands on an instance that has connected and completed messages of its own:
        // a random moment in the next fifth of the queue, but never one the killed instance
        // before it had already passed (a poll every 50 ms can overshoot a fifth's start).
        let connected = kill as usize;
        bus.wait("the instance connected", LONG, |b| {
            b.log("a").matches("connected to Service Bus").count() >= connected
        });
        let done = bus.stats(sb::QUEUE).completed;
        let at = (n * kill / 5 + rand::random::<u64>() % (n / 5)).max(done + n / 50);
        bus.wait(&format!("{at} messages completed"), LONG, |b| b.stats(sb::QUEUE).completed >= at);
        signal(&child, libc::SIGKILL);
        let _ = wait_output(child, Duration::from_secs(30));
        // the dead instance's locks run out; its messages are available again, at their places
        bus.wait("the killed instance's locks expired", LONG, |b| b.stats(sb::QUEUE).locked == 0);
        child = bus.start("a", &[]);
    }
    bus.wait("the queue drained", LONG, Bus::drained);
    let log = bus.stop(child, "a");
    assert!(log.matches("connected to Service Bus").count() >= 4, "{log}");
    let s = bus.stats(sb::QUEUE);
    assert!(s.redeliveries > 0, "the kills left locked messages to redeliver: {s:?}");
    assert_eq!(s.dead_lettered, 0, "{s:?}");
    bus.assert_raw_exactly_once();
    let windows = bus.assert_windows_match_replay();
    eprintln!("{n} messages, 3 kills, {} redeliveries, {windows} windows equal to the replay", s.redeliveries);
}

/// Completions wait for a checkpoint 8 s apart; the lock lasts 2 s. Renewal keeps every lock.
#[test]
fn lock_renewal_keeps_messages_held_past_three_lock_durations() {
    let bus = Bus::new(To::Queue, Duration::from_secs(2));
    let lines = bus.simulated(2000, 200, 32);
    bus.publish(&lines);
    let settings = "    checkpoint_at: 1.0\n    quiet_checkpoint: 0s\n";
    let child =
        bus.start_with("a", settings, &[("CENTRALFLOW_CHECKPOINT_INTERVAL", "8s"), ("SERVICEBUS_PREFETCH", "5000")]);
    let start = Instant::now();
    bus.wait("every message received", LONG, |b| b.stats(sb::QUEUE).locked == 2000);
    bus.wait("the queue drained", LONG, Bus::drained);
    assert!(start.elapsed() > Duration::from_secs(6), "held {:?}: less than three lock durations", start.elapsed());
    bus.stop(child, "a");
    let s = bus.stats(sb::QUEUE);
    assert!(s.lock_renewals >= 2000, "{s:?}");
    assert_eq!((s.redeliveries, s.lock_expiries, s.completed), (0, 0, 2000), "{s:?}");
    bus.assert_raw_exactly_once();
}

/// A pipeline too busy to take what the source hands over (a slow jq program here, about 0.2 s
/// a message in a debug build; in production a sink retrying through a storage outage) keeps
/// the source waiting in one hand-over for longer than a lock lasts: batches of 30 take 6 s
/// each, the lock lasts 5 s (Service Bus's shortest), and the source waits once the 4 batches
/// the pipeline queues are full. Renewal goes on meanwhile, and deliveries that arrive
/// meanwhile are taken so that theirs is too: no lock runs out, nothing is delivered twice.
#[test]
fn locks_are_renewed_while_the_pipeline_is_too_busy_to_take_messages() {
    const N: usize = 210;
    let bus = Bus::new(To::Queue, Duration::from_secs(5));
    let lines = bus.simulated(N as u64, 200, 36);
    bus.publish(&lines);
    let yaml = r#"name: busy
sources:
  bus:
    type: servicebus
    connection_string: ${SERVICEBUS_CONNECTION_STRING}
    queue: ${SERVICEBUS_QUEUE}
    batch_size: 30
    quiet_checkpoint: 0s
transforms:
  slow:
    type: jq
    inputs: [bus]
    input: export
    timeout: 10s
    program: 'reduce range(80000) as $i (.; .)'
sinks:
  out:
    type: jsonl
    inputs: [slow]
    path: ${CENTRALFLOW_OUTPUT}/busy.jsonl
checkpoint:
  url: ${CENTRALFLOW_STATE}/busy
  interval: 1s
"#;
    let child = bus.start_yaml(
        "a",
        yaml,
        &[("CENTRALFLOW_LOG", "info,fe2o3_amqp=error,centralflow::sources::servicebus=debug")],
    );
    bus.wait("the queue drained", LONG, Bus::drained);
    let log = bus.stop(child, "a");
    let s = bus.stats(sb::QUEUE);
    assert!(s.lock_renewals > 0, "{s:?}");
    assert_eq!((s.redeliveries, s.lock_expiries, s.completed), (0, 0, N as u64), "{s:?}\n{log}");
    let out = std::fs::read_to_string(bus.out().join("busy.jsonl")).unwrap();
    let keys: std::collections::BTreeSet<&str> = out.lines().collect();
    assert_eq!((out.lines().count(), keys.len()), (N, N), "every message once");
}

/// Link credit is topped up as messages arrive, so the namespace keeps sending while a
/// checkpoint is pending, but never past `max_held` locked messages: with a prefetch of 100 and
/// `max_held: 300` (a checkpoint asked for at 300 held), the locked count climbs to 300 and no
/// further.
#[test]
fn held_messages_stop_at_max_held_while_a_checkpoint_is_pending() {
    let bus = Bus::new(To::Queue, Duration::from_secs(30));
    let lines = bus.simulated(2000, 200, 35);
    bus.publish(&lines);
    let settings = "    max_held: 300\n    checkpoint_at: 1.0\n    quiet_checkpoint: 0s\n";
    let child =
        bus.start_with("a", settings, &[("CENTRALFLOW_CHECKPOINT_INTERVAL", "5s"), ("SERVICEBUS_PREFETCH", "100")]);
    bus.wait("the queue drained", LONG, Bus::drained);
    bus.stop(child, "a");
    let s = bus.stats(sb::QUEUE);
    assert_eq!(s.peak_locked, 300, "max_held bounds the locked messages: {s:?}");
    bus.assert_raw_exactly_once();
}

/// The same with renewal off: locks run out, Service Bus redelivers, and the copies are
/// recognised as processed (completed, not written again). Poison messages among them too: a
/// redelivered copy is dead-lettered at a later commit, without a second dead-letter record.
#[test]
fn with_lock_renewal_off_redelivered_copies_are_not_processed_twice() {
    let bus = Bus::new(To::Queue, Duration::from_secs(2));
    let lines = bus.simulated(2000, 200, 33);
    bus.record_input(&lines);
    let mut all = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        if i % 100 == 50 {
            all.push(format!("poison {i}"));
        }
        all.push(l.clone());
    }
    bus.publish_bodies(&all);
    let settings = "    checkpoint_at: 1.0\n    quiet_checkpoint: 0s\n    renew_locks: false\n";
    let child =
        bus.start_with("a", settings, &[("CENTRALFLOW_CHECKPOINT_INTERVAL", "5s"), ("SERVICEBUS_PREFETCH", "5000")]);
    bus.wait("the queue drained", LONG, Bus::drained);
    let log = bus.stop(child, "a");
    let s = bus.stats(sb::QUEUE);
    assert!(s.lock_expiries > 0 && s.redeliveries > 0, "{s:?}");
    assert_eq!(s.lock_renewals, 0, "{s:?}");
    assert!(log.contains("redelivered message already processed"), "{log}");
    bus.assert_raw_exactly_once();
    assert_eq!(s.dead_lettered, 20, "{s:?}");
    let file = std::fs::read_to_string(bus.out().join("dead-letters-a.jsonl")).unwrap();
    assert_eq!(file.lines().count(), 20, "one dead-letter record per poison message");
}

#[test]
fn malformed_messages_land_in_the_dead_letter_queue_with_reasons_read_back_by_the_sdk() {
    let bus = Bus::new(To::Queue, Duration::from_secs(30));
    let good = bus.simulated(5000, 200, 34);
    let mut all = Vec::new();
    let mut bad = Vec::new();
    for (i, l) in good.iter().enumerate() {
        if i % 100 == 50 {
            let b =
                if i % 200 == 50 { format!("{{\"not\": \"an export\", \"n\": {i}}}") } else { format!("garbage {i}") };
            bad.push(b.clone());
            all.push(b);
        }
        all.push(l.clone());
    }
    assert_eq!(bad.len(), 50);
    bus.record_input(&good);
    bus.publish_bodies(&all);
    let child = bus.start("a", &[]);
    bus.wait("the queue drained", LONG, Bus::drained);
    bus.stop(child, "a");
    bus.assert_raw_exactly_once();
    assert_eq!(bus.stats(sb::QUEUE).dead_lettered, 50);
    // read back with Microsoft's SDK from the queue's $DeadLetterQueue
    let out = std::process::Command::new(sb::python())
        .arg(root().join("tests/python/sb_dead_letters.py"))
        .args([&bus.emu.connection_string(), "--queue", sb::QUEUE])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let letters: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(letters.len(), 50);
    let mut bodies: Vec<String> = letters.iter().map(|l| l["body"].as_str().unwrap().to_string()).collect();
    bodies.sort();
    bad.sort();
    assert_eq!(bodies, bad);
    for l in &letters {
        let reason = l["reason"].as_str().unwrap_or("");
        let description = l["description"].as_str().unwrap_or("");
        assert!(!reason.is_empty() && reason != "MaxDeliveryCountExceeded", "{l}");
        assert!(description.contains("iotc-export#"), "the origin: {l}");
    }
    let garbage = letters.iter().find(|l| l["body"].as_str().unwrap().starts_with("garbage")).unwrap();
    assert!(garbage["reason"].as_str().unwrap().to_lowercase().contains("json"), "{garbage}");
    // and the pipeline's own dead-letter output has them too
    let file = std::fs::read_to_string(bus.out().join("dead-letters-a.jsonl")).unwrap();
    assert_eq!(file.lines().count(), 50);
}

/// Dead letters across kills: a message that cannot be decoded is dead-lettered where a good one
/// is completed, at the commit that covers its record, so a kill loses neither (settled at
/// receipt, every poison message received since the last checkpoint was in the
/// `$DeadLetterQueue` while the restarted pipeline had cut its record from the output).
#[test]
fn dead_letters_are_recorded_once_and_dead_lettered_once_across_sigkills() {
    let bus = Bus::new(To::Queue, Duration::from_secs(3));
    let n = 30_000u64;
    let good = bus.simulated(n, 200, 37);
    let mut all = Vec::new();
    let mut bad = Vec::new();
    for (i, l) in good.iter().enumerate() {
        if i % 50 == 25 {
            let b = format!("not an export {i}");
            bad.push(b.clone());
            all.push(b);
        }
        all.push(l.clone());
    }
    bus.record_input(&good);
    bus.publish_bodies(&all);
    let total = all.len() as u64;
    let mut child = bus.start("a", &[]);
    for kill in 1..=3u64 {
        let connected = kill as usize;
        bus.wait("the instance connected", LONG, |b| {
            b.log("a").matches("connected to Service Bus").count() >= connected
        });
        let s = bus.stats(sb::QUEUE);
        let done = s.completed + s.dead_lettered;
        let at = (total * kill / 5 + rand::random::<u64>() % (total / 5)).max(done + total / 50);
        bus.wait(&format!("{at} messages settled"), LONG, |b| {
            let s = b.stats(sb::QUEUE);
            s.completed + s.dead_lettered >= at
        });
        signal(&child, libc::SIGKILL);
        let _ = wait_output(child, Duration::from_secs(30));
        bus.wait("the killed instance's locks expired", LONG, |b| b.stats(sb::QUEUE).locked == 0);
        child = bus.start("a", &[]);
    }
    bus.wait("the queue drained", LONG, Bus::drained);
    bus.stop(child, "a");
    bus.assert_raw_exactly_once();
    let s = bus.stats(sb::QUEUE);
    assert!(s.redeliveries > 0, "the kills left locked messages to redeliver: {s:?}");
    assert_eq!(s.dead_lettered, bad.len() as u64, "{s:?}");
    let file = std::fs::read_to_string(bus.out().join("dead-letters-a.jsonl")).unwrap();
    let mut recorded: Vec<String> = file
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["payload"].as_str().unwrap().to_string())
        .collect();
    recorded.sort();
    bad.sort();
    assert_eq!(recorded.len(), bad.len(), "dead-letter records: one per poison message");
    assert_eq!(recorded, bad);
}

#[test]
fn reads_a_topic_subscription() {
    let bus = Bus::new(To::Topic, Duration::from_secs(30));
    let lines = bus.simulated(5000, 200, 35);
    bus.publish(&lines);
    assert_eq!(bus.stats(sb::TOPIC_PATH).available, 5000);
    let child = bus.start("a", &[]);
    bus.wait("the subscription drained", LONG, Bus::drained);
    let log = bus.stop(child, "a");
    assert!(log.contains("entity=iotc-topic/Subscriptions/centralflow"), "{log}");
    assert_eq!(bus.stats(sb::TOPIC_PATH).completed, 5000);
    bus.assert_raw_exactly_once();
}

#[test]
fn reconnects_after_the_emulator_drops_every_connection() {
    let bus = Bus::new(To::Queue, Duration::from_secs(3));
    let lines = bus.simulated(20_000, 200, 36);
    bus.publish(&lines);
    let child = bus.start("a", &[]);
    for drop in 1..=3u64 {
        let at = 4000 * drop;
        bus.wait(&format!("{at} messages completed"), LONG, |b| b.stats(sb::QUEUE).completed >= at);
        bus.emu.drop_connections();
        bus.wait("the source reconnected", LONG, |b| {
            b.emu.connections() > 0 && b.log("a").matches("connected to Service Bus").count() > drop as usize
        });
    }
    bus.wait("the queue drained", LONG, Bus::drained);
    let log = bus.stop(child, "a");
    // one connection to begin with, and one more after each drop at least
    assert!(log.matches("connected to Service Bus").count() >= 4, "{log}");
    assert!(log.matches("re-established").count() + log.matches("reconnecting").count() >= 3, "{log}");
    bus.assert_raw_exactly_once();
}

/// Service Bus hands each message to one of the competing instances: each writes partial
/// per-minute rows under its own folder; merged (counts and sums added, min of minima, max of
/// maxima) they equal the replay of all messages.
#[test]
fn two_instances_drain_one_queue_exactly_once_and_their_partial_windows_merge_to_the_replay() {
    let bus = Bus::new(To::Queue, Duration::from_secs(30));
    let lines = bus.simulated(30_000, 20, 37);
    bus.publish(&lines);
    let a = bus.start("a", &[("SERVICEBUS_PREFETCH", "200")]);
    let b = bus.start("b", &[("SERVICEBUS_PREFETCH", "200")]);
    bus.wait("the queue drained", LONG, Bus::drained);
    bus.stop(a, "a");
    bus.stop(b, "b");
    bus.assert_raw_exactly_once();
    for i in ["a", "b"] {
        let rows = read_rows(&bus.out().join(format!("agg/instance={i}")));
        assert!(rows.len() > 100, "instance {i} wrote {} partial rows", rows.len());
    }
    let windows = bus.assert_windows_match_replay();
    eprintln!("{windows} merged windows equal to the replay");
}

/// A namespace that cannot be reached: the source tries again after a backoff that doubles
/// (0.2 s, 0.4 s, ... up to 30 s), whatever the checkpoints do meanwhile. Checkpoints every
/// 200 ms used to end each wait, so it tried again five times a second for as long as the
/// outage lasted.
#[test]
fn an_unreachable_namespace_is_retried_with_a_growing_backoff() {
    let dir = tempfile::tempdir().unwrap();
    // a port nothing listens on
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let conn = format!(
        "Endpoint=sb://127.0.0.1:{port};SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true"
    );
    let log = dir.path().join("stderr.log");
    let mut c = cmd(&["run", "pipelines/servicebus-to-parquet.yaml"]);
    c.env("SERVICEBUS_CONNECTION_STRING", &conn)
        .env("SERVICEBUS_QUEUE", "nowhere")
        .env("CENTRALFLOW_OUTPUT", dir.path().join("out"))
        .env("CENTRALFLOW_STATE", dir.path().join("state"))
        .env("CENTRALFLOW_CHECKPOINT_INTERVAL", "200ms")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let child = c.spawn().unwrap();
    std::thread::sleep(Duration::from_secs(6));
    signal(&child, libc::SIGTERM);
    let out = wait_output(child, Duration::from_secs(60));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(out.status.success(), "{:?}\n{text}", out.status);
    let attempts = text.matches("cannot reach Service Bus").count();
    // at 0, 0.2, 0.6, 1.4, 3.0 s (and 6.2 s): five or six in six seconds
    assert!((4..=7).contains(&attempts), "{attempts} attempts in 6 s:\n{text}");
}
