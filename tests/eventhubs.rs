//! The `eventhubs` source end to end: the real `centralflow` binary on
//! `pipelines/eventhubs-to-parquet.yaml` against the in-process Event Hubs emulator, with the
//! checkpoint store in a local folder or Azurite. Several instances, kills, faults, restarts,
//! time-range replays, and the store itself against Azurite and moto.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::eventhubs_pipeline::{self as eh, Hub};
use common::*;

const LONG: Duration = Duration::from_secs(400);

/// Events the source passed downstream in one run, from its summary line.
fn source_out(log: &str) -> u64 {
    let line = log
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with("hub ") && l.contains("eventhubs"))
        .unwrap_or_else(|| panic!("no summary line for the source in:\n{log}"));
    line.split_whitespace().rev().nth(1).unwrap().parse().unwrap()
}

#[test]
fn one_instance_reads_100k_events_exactly_once_and_aggregates_equal_the_replay() {
    let hub = Hub::new();
    let lines = hub.simulated(100_000, 11);
    hub.append(&lines);
    let a = hub.start("a");
    hub.wait("every partition checkpointed at its last event", LONG, Hub::all_checkpointed);
    let log = hub.stop(a, "a");
    assert_eq!(source_out(&log), 100_000, "{log}");
    assert!(log.contains("consumer_group=$Default"), "{log}");
    hub.assert_raw_exactly_once();
    // the stored checkpoints are this instance's and it released its ownerships when it stopped
    assert!(hub.checkpoints().values().all(|c| c.2 == "a"));
    assert!(hub.owners().values().all(|o| o.is_empty()), "{:?}", hub.owners());
    hub.assert_aggregates_match_replay();
}

/// `a` reads alone, `b` joins (a gives two partitions up cooperatively), then `a` is killed
/// while events keep arriving, right after one of its checkpoints (a crash between a sink's
/// commit and the partition checkpoint of the same epoch repeats that epoch's output once:
/// at-least-once by design, see README); `b` takes a's partitions over after the ownership
/// expiry. Returns the hub after `b` stopped.
fn split_then_kill() -> Arc<Hub> {
    let hub = Arc::new(Hub::new());
    let lines = hub.simulated(60_000, 12);
    hub.append(&lines[..20_000]);
    let a = hub.start("a");
    hub.wait("a owns every partition", LONG, |h| {
        let o = h.owners();
        o.len() == eh::PARTITIONS as usize && o.values().all(|x| x == "a")
    });
    let b = hub.start("b");
    hub.wait("a and b share the partitions 2/2", LONG, |h| {
        let o = h.owners();
        o.values().filter(|x| *x == "a").count() == 2 && o.values().filter(|x| *x == "b").count() == 2
    });
    let a_parts: Vec<u32> = hub.owners().into_iter().filter(|(_, o)| o == "a").map(|(p, _)| p).collect();
    let appender = hub.append_slowly(lines[20_000..].to_vec(), 25, Duration::from_millis(300));
    std::thread::sleep(Duration::from_millis(1500));
    // kill `a` just after it stored a checkpoint for both its partitions at the same epoch
    let before: BTreeMap<u32, (i64, u64, String)> = hub.checkpoints();
    let start = Instant::now();
    loop {
        let now = hub.checkpoints();
        let fresh: BTreeSet<u64> = a_parts
            .iter()
            .filter_map(|p| now.get(p).filter(|c| c.2 == "a" && Some(c.1) > before.get(p).map(|b| b.1)).map(|c| c.1))
            .collect();
        if fresh.len() == 1 && a_parts.iter().all(|p| now.get(p).is_some_and(|c| fresh.contains(&c.1))) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "a stores no checkpoints");
        std::thread::sleep(Duration::from_millis(5));
    }
    signal(&a, libc::SIGKILL);
    let _ = wait_output(a, Duration::from_secs(30));
    let killed_at = hub.checkpoints();
    appender.join().unwrap();
    hub.wait("b owns every partition", LONG, |h| {
        let o = h.owners();
        o.len() == eh::PARTITIONS as usize && o.values().all(|x| x == "b")
    });
    hub.wait("every partition checkpointed at its last event", LONG, Hub::all_checkpointed);
    let log = hub.stop(b, "b");
    for p in &a_parts {
        assert!(
            log.contains(&format!("partition=\"{p}\"")) || log.contains(&format!("partition={p}")),
            "b never mentions partition {p}:\n{log}"
        );
        assert!(hub.checkpoints()[p].0 > killed_at[p].0, "b read on in partition {p}");
    }
    let a_log = hub.log("a");
    assert!(a_log.contains("giving the partition up"), "a gave partitions up cooperatively:\n{a_log}");
    assert!(a_log.contains("partition handed over"), "{a_log}");
    assert_eq!(hub.instances_in_output(), BTreeSet::from(["a".to_string(), "b".to_string()]));
    hub
}

#[test]
fn two_instances_share_the_partitions_and_take_over_from_a_killed_one_exactly_once() {
    let hub = split_then_kill();
    hub.assert_raw_exactly_once();
}

/// Needs the window transform to keep its state per input partition (it moves with the
/// partition through the partition's checkpoint).
#[test]
fn two_instances_with_a_hand_over_and_a_kill_give_the_aggregates_of_the_replay() {
    let hub = split_then_kill();
    hub.assert_raw_exactly_once();
    hub.assert_aggregates_match_replay();
}

#[test]
fn recovers_from_detaches_dropped_connections_and_a_busy_server_by_itself() {
    let hub = Arc::new(Hub::new());
    let lines = hub.simulated(40_000, 13);
    hub.append(&lines[..10_000]);
    let port = eh::free_port();
    let addr = format!("127.0.0.1:{port}");
    let a = hub.start_with("a", &[("CENTRALFLOW_API_ADDRESS", &addr)]);
    hub.wait("the source is connected", LONG, |_| eh::metrics(&addr).is_some_and(|m| m.0 == 1));
    let appender = hub.append_slowly(lines[10_000..].to_vec(), 20, Duration::from_millis(250));
    std::thread::sleep(Duration::from_millis(700));
    hub.emu.detach_receivers(None, "amqp:link:detach-forced");
    std::thread::sleep(Duration::from_millis(1200));
    hub.emu.drop_connections();
    std::thread::sleep(Duration::from_millis(1200));
    // the re-attaches that follow are refused as busy, more often than the SDK retries by itself
    hub.emu.set_busy(24);
    hub.emu.detach_receivers(None, "com.microsoft:server-busy");
    std::thread::sleep(Duration::from_millis(1500));
    hub.emu.detach_receivers(Some(1), "amqp:link:detach-forced");
    appender.join().unwrap();
    hub.wait("every partition checkpointed at its last event", LONG, Hub::all_checkpointed);
    hub.wait("the source is connected again", Duration::from_secs(60), |_| {
        eh::metrics(&addr).is_some_and(|m| m.0 == 1)
    });
    assert_eq!(hub.emu.busy_remaining(), 0, "the busy faults were met");
    hub.wait("consumer_lag 0 on every partition", Duration::from_secs(60), |_| {
        (0..eh::PARTITIONS)
            .all(|p| eh::metric(&addr, "centralflow_consumer_lag", &format!("partition=\"{p}\"")) == Some(0.0))
    });
    let reconnects = eh::metrics(&addr).unwrap().1;
    let log = hub.stop(a, "a");
    hub.assert_raw_exactly_once();
    assert!(log.contains("reconnecting") && reconnects > 0, "the faults show in the log and metrics:\n{log}");
}

/// The store on Azurite: a graceful restart reads nothing twice; a killed instance restarted
/// (its own checkpoint is newer than the stored partition checkpoints, or not) still writes every
/// event exactly once.
#[test]
fn restarts_resume_from_the_stored_checkpoints_on_azurite() {
    let container = unique("ehstore");
    azurite_create_container(&container);
    let mut hub = Hub::new();
    hub.store = format!("az://{container}/checkpoints");
    hub.extra_env = azurite_env();
    let hub = Arc::new(hub);
    let lines = hub.simulated(45_000, 14);
    hub.append(&lines[..20_000]);
    let a = hub.start("a");
    hub.wait("checkpointed", LONG, Hub::all_checkpointed);
    let log1 = hub.stop(a, "a");
    assert_eq!(source_out(&log1), 20_000);
    // a graceful restart: only the new events are read
    hub.append(&lines[20_000..25_000]);
    let a = hub.start("a");
    hub.wait("checkpointed", LONG, Hub::all_checkpointed);
    let log2 = hub.stop(a, "a");
    assert_eq!(source_out(&log2), 5_000, "no committed event is read again:\n{log2}");
    assert!(hub.checkpoints().values().all(|c| c.2 == "a"));
    // a crash in the middle, then a restart
    let appender = hub.append_slowly(lines[25_000..].to_vec(), 20, Duration::from_millis(200));
    let a = hub.start("a");
    std::thread::sleep(Duration::from_millis(2600));
    signal(&a, libc::SIGKILL);
    let _ = wait_output(a, Duration::from_secs(30));
    appender.join().unwrap();
    let a = hub.start("a");
    hub.wait("checkpointed", LONG, Hub::all_checkpointed);
    hub.stop(a, "a");
    hub.assert_raw_exactly_once();
}

/// A consumer group checkpointed by Azure's own processors (through the SDK's `CheckpointStore`
/// trait, same layout) is resumed where they stopped.
#[test]
fn resumes_after_checkpoints_written_by_the_sdk() {
    use azure_messaging_eventhubs::CheckpointStore as _;
    let hub = Hub::new();
    let lines = hub.simulated(4_000, 15);
    hub.append(&lines);
    let store = hub.open_store();
    let mut expected = 0usize;
    for (p, last) in hub.last_seqs() {
        let done = last / 2;
        expected += (last - done) as usize;
        hub.rt
            .block_on(store.update_checkpoint(azure_messaging_eventhubs::models::Checkpoint {
                fully_qualified_namespace: hub.emu.namespace().into(),
                event_hub_name: hub.emu.hub().into(),
                consumer_group: "$Default".into(),
                partition_id: p.to_string(),
                offset: None,
                sequence_number: Some(done),
            }))
            .unwrap();
    }
    let a = hub.start("a");
    hub.wait("checkpointed", LONG, Hub::all_checkpointed);
    let log = hub.stop(a, "a");
    assert_eq!(source_out(&log) as usize, expected);
    let rows = hub.raw_rows();
    assert_eq!(rows.len(), expected);
    let first: BTreeMap<u32, i64> = hub.last_seqs().into_iter().map(|(p, l)| (p, l / 2 + 1)).collect();
    assert!(rows.keys().all(|(p, s)| *s >= first[p]), "only events after the SDK's checkpoints");
}

#[test]
fn replay_reads_a_time_range_of_every_partition_and_stops() {
    let hub = Hub::new();
    let lines = hub.simulated(8_000, 16);
    hub.append(&lines);
    let appended = hub.appended.lock().unwrap().clone();
    let times: Vec<i64> = appended.values().map(|v| v.1).collect();
    let (lo, hi) = (*times.iter().min().unwrap(), *times.iter().max().unwrap());
    let from = lo + (hi - lo) / 4;
    let to = lo + (hi - lo) * 3 / 4;
    let fmt = |ms: i64| centralflow::time::format_rfc3339(ms * 1_000_000);
    let out = hub.dir.path().join("backfill");
    let mut env = hub.env("r");
    env.push(("CENTRALFLOW_OUTPUT".into(), out.to_string_lossy().to_string()));
    let res = run(
        &["replay", "pipelines/eventhubs-to-parquet.yaml", "--no-progress", "--from", &fmt(from), "--to", &fmt(to)],
        &env_refs(&env),
        Duration::from_secs(300),
    );
    ok(&res);
    let want: BTreeSet<(u32, i64)> =
        appended.iter().filter(|(_, v)| v.1 >= from && v.1 < to).map(|(k, _)| *k).collect();
    let got: Vec<(u32, i64)> = read_rows(&out.join("raw"))
        .iter()
        .map(|r| (r["_partition"].parse().unwrap(), r["_offset"].parse().unwrap()))
        .collect();
    assert_eq!(got.len(), want.len(), "no duplicates");
    assert_eq!(got.into_iter().collect::<BTreeSet<_>>(), want);
    assert!(hub.checkpoints().is_empty() && hub.owners().is_empty(), "a replay leaves the consumer group alone");
    assert!(!hub.dir.path().join("state").exists(), "and the pipeline's checkpoint store");
    // without a range: everything there is when the replay starts
    let all = hub.dir.path().join("all");
    env.push(("CENTRALFLOW_OUTPUT".into(), all.to_string_lossy().to_string()));
    ok(&run(
        &["replay", "pipelines/eventhubs-to-parquet.yaml", "--no-progress"],
        &env_refs(&env),
        Duration::from_secs(300),
    ));
    assert_eq!(read_rows(&all.join("raw")).len(), appended.len());
    // other pipelines refuse the flags
    let res = run(
        &["replay", "pipelines/w1-tumbling.yaml", "--from", "2026-11-01T00:00:00Z"],
        &[("CENTRALFLOW_INPUT", "/nonexistent"), ("CENTRALFLOW_OUTPUT", "/tmp/none")],
        Duration::from_secs(60),
    );
    assert_eq!(res.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&res.stderr).contains("this pipeline has none"));
}

/// `meta.*` in expressions (IoT Central annotations and properties, Event Hubs positions), and
/// undecodable events in the dead-letter output with their partition and sequence number.
#[test]
fn metadata_in_expressions_and_dead_letters() {
    let hub = Hub::new();
    let lines = hub.simulated(200, 17);
    hub.append(&lines[..100]);
    let bad = hub.emu.append(2, b"{not json".to_vec(), vec![]);
    hub.append(&lines[100..]);
    let dir = hub.dir.path();
    let p = pipeline(
        dir,
        "meta.yaml",
        &format!(
            r#"sources:
  hub:
    type: eventhubs
    connection_string: ${{EVENTHUBS_CONNECTION_STRING}}
    endpoint: ${{EVENTHUBS_ENDPOINT}}
transforms:
  m:
    type: map
    inputs: [hub]
    set:
      device_annotation: meta["iotcentral-device-id"]
      app_property: meta["iotcentral-application-id"]
      partition: meta.partition
      sequence: meta.offset
      eh_offset: meta["x-opt-offset"]
      key: meta["x-opt-partition-key"]
sinks:
  out:
    type: jsonl
    inputs: [m]
    path: {out}
  dl:
    type: jsonl
    inputs: [hub.dead_letter]
    path: {dl}
"#,
            out = dir.join("meta.jsonl").display(),
            dl = dir.join("dl.jsonl").display()
        ),
    );
    let env = hub.env("m");
    let mut c = cmd(&["run", p.to_str().unwrap()]);
    for (k, v) in &env {
        c.env(k, v);
    }
    let child = c.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let meta = dir.join("meta.jsonl");
    hub.wait("every event written", LONG, |_| count_lines(&meta) >= 200);
    signal(&child, libc::SIGTERM);
    ok(&wait_output(child, LONG));
    let appended = hub.appended.lock().unwrap().clone();
    for line in std::fs::read_to_string(&meta).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        // `set` writes bare names into `telemetry` for telemetry messages
        let f = |k: &str| v.get(k).or_else(|| v["telemetry"].get(k)).cloned().unwrap_or_default();
        let (p, s) = (f("partition").as_i64().unwrap() as u32, f("sequence").as_i64().unwrap());
        assert_eq!(f("device_annotation"), v["deviceId"], "{v}");
        assert_eq!(f("key"), v["deviceId"]);
        assert_eq!(f("app_property"), "app-1");
        assert_eq!(appended[&(p, s)].0, v["deviceId"].as_str().unwrap());
        assert!(f("eh_offset").as_str().unwrap().parse::<i64>().is_ok());
    }
    let dl = std::fs::read_to_string(dir.join("dl.jsonl")).unwrap();
    assert_eq!(dl.lines().count(), 1, "{dl}");
    assert!(dl.contains(&format!("partition 2 seq {}", bad.sequence_number)), "{dl}");
}

/// The store against real object stores: the Azure SDKs' layout and metadata, conditional
/// claims (a stale ETag loses), the SDK's trait.
#[test]
fn checkpoint_store_on_azurite_moto_and_a_folder() {
    use azure_messaging_eventhubs::CheckpointStore as _;
    use centralflow::sources::eventhubs::BlobCheckpointStore;
    use object_store::ObjectStoreExt as _;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let container = unique("ehlayout");
    azurite_create_container(&container);
    let bucket = unique("ehlayout");
    s3_create_bucket(&bucket);
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(String, BTreeMap<String, String>)> = vec![
        (format!("az://{container}/cp"), azurite_options()),
        (format!("s3://{bucket}/cp"), s3_options()),
        (dir.path().to_string_lossy().to_string(), BTreeMap::new()),
    ];
    for (url, opts) in cases {
        rt.block_on(async {
            let s =
                BlobCheckpointStore::open(&url, &opts, "MyNS.servicebus.windows.net", "Telemetry", "$Default").unwrap();
            let a = s.claim("0", "a", None).await.unwrap().expect("first claim");
            assert!(s.claim("0", "b", None).await.unwrap().is_none(), "{url}: create over an existing ownership");
            let b = s.claim("0", "b", Some(&a.etag)).await.unwrap().expect("claim with the current etag");
            assert!(s.claim("0", "c", Some(&a.etag)).await.unwrap().is_none(), "{url}: a stale etag loses");
            assert_ne!(a.etag, b.etag);
            let o = s.ownership("0").await.unwrap().unwrap();
            assert_eq!((o.owner.as_str(), o.etag.as_str()), ("b", b.etag.as_str()), "{url}");
            assert!(
                (o.modified_ms - centralflow::time::now_nanos() / 1_000_000).abs() < 60_000,
                "{url}: heartbeat time"
            );
            s.put_checkpoint(&centralflow::sources::eventhubs::store::CheckpointRecord {
                partition: "0".into(),
                offset: Some("4096".into()),
                sequence_number: Some(41),
                extra: BTreeMap::from([("centralflowepoch".into(), "3".into())]),
            })
            .await
            .unwrap();
            // through the SDK's trait, as the SDK's processor would see it
            let cps = s.list_checkpoints("MyNS.servicebus.windows.net", "Telemetry", "$Default").await.unwrap();
            assert_eq!(cps.len(), 1);
            assert_eq!((cps[0].offset.as_deref(), cps[0].sequence_number), (Some("4096"), Some(41)), "{url}");
            let owns = s.list_ownerships("MyNS.servicebus.windows.net", "Telemetry", "$Default").await.unwrap();
            assert_eq!(owns[0].owner_id.as_deref(), Some("b"));
            let mut stale = owns[0].clone();
            stale.etag = Some(a.etag.clone().into());
            stale.owner_id = Some("z".into());
            assert!(s.claim_ownership(&[stale]).await.unwrap().is_empty(), "{url}: the SDK's claim with a stale etag");
            assert_eq!(s.checkpoint("0").await.unwrap().unwrap().epoch(), Some(3));
            // the raw objects: lower-cased Azure names with user metadata
            if !url.starts_with('/') {
                let loc = centralflow::storage::open(&url, &opts).unwrap();
                let path = loc
                    .prefix
                    .clone()
                    .join("myns.servicebus.windows.net")
                    .join("telemetry")
                    .join("$default")
                    .join("checkpoint")
                    .join("0");
                let got = loc.store.get(&path).await.unwrap_or_else(|e| panic!("{url}: {path}: {e}"));
                let md: BTreeMap<String, String> = got
                    .attributes
                    .iter()
                    .filter_map(|(k, v)| match k {
                        object_store::Attribute::Metadata(k) => Some((k.to_string(), v.to_string())),
                        _ => None,
                    })
                    .collect();
                assert_eq!(md.get("sequencenumber").map(String::as_str), Some("41"), "{url}: {md:?}");
                assert_eq!(md.get("offset").map(String::as_str), Some("4096"), "{url}: {md:?}");
                let body = got.bytes().await.unwrap();
                if url.starts_with("az://") {
                    assert!(body.is_empty(), "Azure blobs are empty, as the Azure SDKs write them");
                }
                let own = loc
                    .prefix
                    .clone()
                    .join("myns.servicebus.windows.net")
                    .join("telemetry")
                    .join("$default")
                    .join("ownership")
                    .join("0");
                let got = loc.store.get(&own).await.unwrap();
                assert!(got
                    .attributes
                    .iter()
                    .any(|(k, v)| matches!(k, object_store::Attribute::Metadata(k) if k == "ownerid")
                        && v.to_string() == "b"));
            }
        });
    }
}
