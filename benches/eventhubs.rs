//! Event Hubs throughput: events/s from the in-process emulator (4 partitions) through a
//! W1-style pipeline (telemetry filter, 1-minute per-device window, Parquet) with checkpoints in
//! a local folder, for one and for two `centralflow run` instances sharing the partitions.
//!
//! A run is timed from the start of the processes until every partition's stored checkpoint is
//! at its last event (so the output of every event is committed), then the instances are stopped.
//! Each run uses a fresh consumer group, so every run reads everything. The emulator runs in this
//! process and competes for the same cores (2 on the project's machines): the numbers are a floor.
//!
//!   cargo bench --bench eventhubs            # EH_BENCH_EVENTS (default 500000), EH_BENCH_RUNS (default 2)
//!
//! Under `cargo test --all-targets` (unoptimized) it is a smoke run of 20,000 events.

use centralflow_emulators::eventhubs as eventhubs_emulator;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use eventhubs_emulator::{Emulator, EmulatorConfig, EmulatorEvent};

#[path = "common/cpu.rs"]
mod cpu;
use cpu::{cpu_of, self_cpu};

const PARTITIONS: u32 = 4;

const PIPELINE: &str = r#"
name: eh-bench
sources:
  hub:
    type: eventhubs
    connection_string: ${EVENTHUBS_CONNECTION_STRING}
    endpoint: ${EVENTHUBS_ENDPOINT}
    consumer_group: ${EVENTHUBS_CONSUMER_GROUP}
    checkpoint_store: ${CENTRALFLOW_CHECKPOINTS}
    balance_interval: 1s
    ownership_expiry: 4s
transforms:
  telemetry:
    type: filter
    inputs: [hub]
    condition: messageSource == "telemetry"
  per_minute:
    type: window
    inputs: [telemetry]
    window: { kind: tumbling, size: 1m }
    time: enqueuedTime
    allowed_lateness: 30s
    group_by: [deviceId]
    aggregates:
      temperature: [avg, min, max]
      humidity: [avg, min, max]
      pressure: [avg, min, max]
sinks:
  lake:
    type: parquet
    inputs: [per_minute]
    url: ${CENTRALFLOW_OUTPUT}
    compression: zstd
checkpoint:
  url: ${CENTRALFLOW_STATE}/${CENTRALFLOW_INSTANCE}
  interval: 1s
"#;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_centralflow")
}

fn partition_of(device: &str) -> u32 {
    let h = device.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
    (h % PARTITIONS as u64) as u32
}

struct Run {
    wall: Duration,
    cpu: Duration,
    /// This process (the emulator) during the run.
    emulator_cpu: Duration,
}

fn checkpointed(
    rt: &tokio::runtime::Runtime,
    store: &centralflow::sources::eventhubs::BlobCheckpointStore,
    last: &BTreeMap<u32, i64>,
) -> bool {
    let records = rt.block_on(store.list_checkpoint_records()).unwrap_or_default();
    let got: BTreeMap<u32, i64> =
        records.into_iter().filter_map(|c| Some((c.partition.parse().ok()?, c.sequence_number?))).collect();
    last.iter().all(|(p, s)| got.get(p) == Some(s))
}

fn run_once(
    rt: &tokio::runtime::Runtime,
    emu: &Emulator,
    dir: &Path,
    group: &str,
    instances: usize,
    last: &BTreeMap<u32, i64>,
) -> Run {
    let pipeline = dir.join("pipeline.yaml");
    std::fs::write(&pipeline, PIPELINE).unwrap();
    let store_url = dir.join(format!("store-{group}"));
    let store = centralflow::sources::eventhubs::BlobCheckpointStore::open(
        store_url.to_str().unwrap(),
        &BTreeMap::new(),
        emu.namespace(),
        emu.hub(),
        group,
    )
    .unwrap();
    let start = Instant::now();
    let self_start = self_cpu();
    let children: Vec<Child> = (0..instances)
        .map(|i| {
            Command::new(bin())
                .args(["run", pipeline.to_str().unwrap()])
                .env("EVENTHUBS_CONNECTION_STRING", emu.connection_string())
                .env("EVENTHUBS_ENDPOINT", emu.endpoint())
                .env("EVENTHUBS_CONSUMER_GROUP", group)
                .env("CENTRALFLOW_CHECKPOINTS", &store_url)
                .env("CENTRALFLOW_OUTPUT", dir.join(format!("out-{group}")))
                .env("CENTRALFLOW_STATE", dir.join(format!("state-{group}")))
                .env("CENTRALFLOW_INSTANCE", format!("i{i}"))
                .env("CENTRALFLOW_API_ADDRESS", "127.0.0.1:0")
                .env("CENTRALFLOW_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn centralflow")
        })
        .collect();
    while !checkpointed(rt, &store, last) {
        assert!(start.elapsed() < Duration::from_secs(900), "the instances did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
    let wall = start.elapsed();
    let cpu = children.iter().map(|c| cpu_of(c.id())).sum();
    let emulator_cpu = self_cpu().saturating_sub(self_start);
    for mut c in children {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let status = c.wait().unwrap();
        assert!(status.success(), "an instance failed: {status:?}");
    }
    Run { wall, cpu, emulator_cpu }
}

fn main() {
    // `cargo test --all-targets` runs benches unoptimized: a quick smoke run there
    let (default_n, default_runs) = if cfg!(debug_assertions) { (20_000, 1) } else { (500_000, 2) };
    let n: u64 = std::env::var("EH_BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(default_n);
    let runs: usize = std::env::var("EH_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(default_runs);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("export.jsonl");
    let st = Command::new(bin())
        .args(["simulate", "--count", &n.to_string(), "--devices", "5000", "--seed", "7", "--rate", "1000"])
        .arg("--out")
        .arg(&input)
        .status()
        .unwrap();
    assert!(st.success());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let emu = rt.block_on(Emulator::start(EmulatorConfig::new("telemetry", PARTITIONS))).unwrap();
    let mut last: BTreeMap<u32, i64> = BTreeMap::new();
    let text = std::fs::read_to_string(&input).unwrap();
    let mut bytes = 0usize;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let device = v["deviceId"].as_str().unwrap_or("none").to_string();
        let t = centralflow::time::parse_rfc3339(v["enqueuedTime"].as_str().unwrap()).unwrap() / 1_000_000;
        let p = partition_of(&device);
        bytes += line.len();
        let r = emu.append_event(
            p,
            EmulatorEvent {
                body: line.as_bytes().to_vec(),
                annotations: vec![("iotcentral-device-id".into(), device.clone())],
                partition_key: Some(device),
                enqueued_time_ms: Some(t),
                ..Default::default()
            },
        );
        last.insert(p, r.sequence_number);
    }
    println!(
        "Event Hubs → W1 (filter, 1-minute per-device window, Parquet): {n} events ({:.0} MB), {PARTITIONS} partitions, checkpoints every 1 s, {} cores",
        bytes as f64 / 1e6,
        std::thread::available_parallelism().map(|p| p.get()).unwrap_or(0)
    );
    println!();
    println!(
        "| instances | wall (median of {runs}) | events/s | centralflow CPU s | events per centralflow CPU-second | emulator CPU s |"
    );
    println!("|---|---|---|---|---|---|");
    let mut k = 0;
    for instances in [1usize, 2] {
        let mut results: Vec<Run> = (0..runs)
            .map(|_| {
                k += 1;
                run_once(&rt, &emu, dir.path(), &format!("bench{k}"), instances, &last)
            })
            .collect();
        results.sort_by_key(|r| r.wall);
        let m = &results[results.len() / 2];
        println!(
            "| {instances} | {:.2} s | {:.0} | {:.2} | {:.0} | {:.2} |",
            m.wall.as_secs_f64(),
            n as f64 / m.wall.as_secs_f64(),
            m.cpu.as_secs_f64(),
            n as f64 / m.cpu.as_secs_f64().max(1e-9),
            m.emulator_cpu.as_secs_f64()
        );
    }
}
