//! Running `pipelines/eventhubs-to-parquet.yaml` against the in-process Event Hubs emulator,
//! and checking its output and its checkpoint store.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::eventhubs_emulator::{Emulator, EmulatorConfig, EmulatorEvent};
use super::*;

pub const PARTITIONS: u32 = 4;

/// An emulator with its runtime, a work folder, and what was appended.
pub struct Hub {
    pub rt: tokio::runtime::Runtime,
    pub emu: Emulator,
    pub dir: tempfile::TempDir,
    /// Every appended export message in order (the replay input).
    pub input: PathBuf,
    /// (partition, sequence number) -> (deviceId, enqueued ms) of every appended event.
    pub appended: std::sync::Mutex<BTreeMap<(u32, i64), (String, i64)>>,
    /// The shared checkpoint store (a folder unless changed).
    pub store: String,
    pub extra_env: Vec<(String, String)>,
}

/// IoT Central sends a device's messages to one partition.
pub fn partition_of(device: &str) -> u32 {
    let h = device.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
    (h % PARTITIONS as u64) as u32
}

impl Hub {
    pub fn new() -> Hub {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let emu = rt.block_on(Emulator::start(EmulatorConfig::new("telemetry", PARTITIONS))).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("export.jsonl");
        std::fs::write(&input, b"").unwrap();
        let store = dir.path().join("store").to_string_lossy().to_string();
        Hub { rt, emu, dir, input, appended: Default::default(), store, extra_env: Vec::new() }
    }

    /// `n` simulated export messages (500 devices), as `simulate` writes them.
    pub fn simulated(&self, n: u64, seed: u64) -> Vec<String> {
        let path = self.dir.path().join(format!("sim-{seed}.jsonl"));
        simulate(&path, n, 500, seed);
        std::fs::read_to_string(&path).unwrap().lines().map(str::to_string).collect()
    }

    /// Appends export messages as IoT Central does: the partition of its device, the
    /// `iotcentral-*` annotations and properties, enqueued at the message's `enqueuedTime`.
    pub fn append(&self, lines: &[String]) {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new().append(true).open(&self.input).unwrap();
        let mut appended = self.appended.lock().unwrap();
        for line in lines {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let device = v["deviceId"].as_str().unwrap_or("none").to_string();
            let source = v["messageSource"].as_str().unwrap_or("").to_string();
            let t = centralflow::time::parse_rfc3339(v["enqueuedTime"].as_str().unwrap()).unwrap() / 1_000_000;
            let p = partition_of(&device);
            let r = self.emu.append_event(
                p,
                EmulatorEvent {
                    body: line.as_bytes().to_vec(),
                    app_properties: vec![("iotcentral-application-id".into(), "app-1".into())],
                    annotations: vec![
                        ("iotcentral-device-id".into(), device.clone()),
                        ("iotcentral-message-source".into(), source),
                    ],
                    partition_key: Some(device.clone()),
                    content_type: Some("application/json".into()),
                    enqueued_time_ms: Some(t),
                },
            );
            appended.insert((p, r.sequence_number), (device, r.enqueued_time_ms));
            writeln!(file, "{line}").unwrap();
        }
    }

    /// Appends `lines` in `chunks` pieces, one every `every`, from a background thread.
    pub fn append_slowly(
        self: &std::sync::Arc<Self>,
        lines: Vec<String>,
        chunks: usize,
        every: Duration,
    ) -> std::thread::JoinHandle<()> {
        let hub = self.clone();
        std::thread::spawn(move || {
            let size = lines.len().div_ceil(chunks);
            for c in lines.chunks(size) {
                hub.append(c);
                std::thread::sleep(every);
            }
        })
    }

    pub fn total(&self) -> usize {
        self.appended.lock().unwrap().len()
    }

    /// The last sequence number of each partition.
    pub fn last_seqs(&self) -> BTreeMap<u32, i64> {
        let mut m = BTreeMap::new();
        for (p, s) in self.appended.lock().unwrap().keys() {
            let e = m.entry(*p).or_insert(*s);
            *e = (*e).max(*s);
        }
        m
    }

    pub fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }

    /// Environment for the shipped pipeline.
    pub fn env(&self, instance: &str) -> Vec<(String, String)> {
        let mut env = vec![
            ("EVENTHUBS_CONNECTION_STRING".to_string(), self.emu.connection_string()),
            ("EVENTHUBS_ENDPOINT".into(), self.emu.endpoint()),
            ("CENTRALFLOW_OUTPUT".into(), self.out().to_string_lossy().to_string()),
            ("CENTRALFLOW_STATE".into(), self.dir.path().join("state").to_string_lossy().to_string()),
            ("CENTRALFLOW_CHECKPOINTS".into(), self.store.clone()),
            ("CENTRALFLOW_INSTANCE".into(), instance.into()),
            ("CENTRALFLOW_CHECKPOINT_INTERVAL".into(), "1s".into()),
            ("EVENTHUBS_BALANCE_INTERVAL".into(), "1s".into()),
            ("EVENTHUBS_OWNERSHIP_EXPIRY".into(), "4s".into()),
            ("CENTRALFLOW_LOG".into(), "info,centralflow=info,azure_messaging_eventhubs=warn,azure_core_amqp=error,fe2o3_amqp=error,azure_core=warn".into()),
        ];
        env.extend(self.extra_env.iter().cloned());
        env
    }

    /// Starts `centralflow run` on the shipped pipeline; stderr goes to `instance.log`.
    pub fn start(&self, instance: &str) -> Child {
        self.start_with(instance, &[])
    }

    pub fn start_with(&self, instance: &str, extra: &[(&str, &str)]) -> Child {
        let log = std::fs::File::create(self.log_path(instance)).unwrap();
        let mut c = cmd(&["run", "pipelines/eventhubs-to-parquet.yaml"]);
        for (k, v) in self.env(instance) {
            c.env(k, v);
        }
        for (k, v) in extra {
            c.env(k, v);
        }
        c.stdout(Stdio::null()).stderr(Stdio::from(log)).spawn().unwrap()
    }

    pub fn log_path(&self, instance: &str) -> PathBuf {
        self.dir.path().join(format!("{instance}.log"))
    }

    /// Everything an instance logged so far (across its runs, when `append` is used).
    pub fn log(&self, instance: &str) -> String {
        std::fs::read_to_string(self.log_path(instance)).unwrap_or_default()
    }

    /// Stops with SIGTERM and returns the log.
    pub fn stop(&self, child: Child, instance: &str) -> String {
        signal(&child, libc::SIGTERM);
        let out = wait_output(child, Duration::from_secs(120));
        let log = self.log(instance);
        assert!(out.status.success(), "{instance} failed ({:?}):\n{log}", out.status);
        log
    }

    // ------------------------------------------------------------------ the shared store

    /// The shared store, opened in this process with centralflow's own code.
    pub fn open_store(&self) -> centralflow::sources::eventhubs::BlobCheckpointStore {
        let opts: BTreeMap<String, String> = self
            .extra_env
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .filter(|(k, _)| k.starts_with("azure_") || k.starts_with("aws_"))
            .collect();
        centralflow::sources::eventhubs::BlobCheckpointStore::open(
            &self.store,
            &opts,
            self.emu.namespace(),
            self.emu.hub(),
            "$Default",
        )
        .unwrap()
    }

    /// partition -> (sequence number, epoch, owner) of the stored checkpoints.
    pub fn checkpoints(&self) -> BTreeMap<u32, (i64, u64, String)> {
        let store = self.open_store();
        let records = self.rt.block_on(store.list_checkpoint_records()).unwrap_or_default();
        records
            .into_iter()
            .filter_map(|c| {
                Some((
                    c.partition.parse().ok()?,
                    (c.sequence_number.unwrap_or(-1), c.epoch().unwrap_or(0), c.owner().unwrap_or("").to_string()),
                ))
            })
            .collect()
    }

    /// partition -> owner (empty: released).
    pub fn owners(&self) -> BTreeMap<u32, String> {
        let store = self.open_store();
        let records = self.rt.block_on(store.list_ownership_records()).unwrap_or_default();
        records.into_iter().filter_map(|o| Some((o.partition.parse().ok()?, o.owner))).collect()
    }

    /// Waits until `f` holds, checking every 50 ms.
    pub fn wait(&self, what: &str, timeout: Duration, mut f: impl FnMut(&Hub) -> bool) {
        let start = Instant::now();
        while !f(self) {
            assert!(start.elapsed() < timeout, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// True when every partition's stored checkpoint is at its last event.
    pub fn all_checkpointed(&self) -> bool {
        let cps = self.checkpoints();
        self.last_seqs().iter().all(|(p, last)| cps.get(p).is_some_and(|c| c.0 == *last))
    }

    // ------------------------------------------------------------------ output

    /// (partition, sequence number) -> rows in the raw archive, with the row's deviceId.
    pub fn raw_rows(&self) -> BTreeMap<(u32, i64), Vec<String>> {
        let mut m: BTreeMap<(u32, i64), Vec<String>> = BTreeMap::new();
        for r in read_rows(&self.out().join("raw")) {
            let p: u32 = r["_partition"].parse().unwrap();
            let s: i64 = r["_offset"].parse().unwrap();
            m.entry((p, s)).or_default().push(r.get("deviceId").cloned().unwrap_or_default());
        }
        m
    }

    /// Every appended event is in the raw archive exactly once, as the right message.
    pub fn assert_raw_exactly_once(&self) {
        let rows = self.raw_rows();
        let appended = self.appended.lock().unwrap();
        let dups: Vec<_> = rows.iter().filter(|(_, v)| v.len() > 1).map(|(k, v)| (*k, v.len())).take(10).collect();
        assert!(dups.is_empty(), "duplicates in the raw archive (partition, seq) x count: {dups:?}");
        let missing: Vec<_> = appended.keys().filter(|k| !rows.contains_key(k)).take(10).collect();
        assert!(
            missing.is_empty(),
            "missing from the raw archive: {missing:?} ({} rows of {})",
            rows.len(),
            appended.len()
        );
        let extra: Vec<_> = rows.keys().filter(|k| !appended.contains_key(k)).take(10).collect();
        assert!(extra.is_empty(), "rows that were never appended: {extra:?}");
        for (k, devices) in &rows {
            assert_eq!(devices[0], appended[k].0, "row {k:?} holds another device's message");
        }
    }

    /// The aggregates equal those of `centralflow replay pipelines/w1-tumbling.yaml` over the
    /// same messages in a file, except windows still open when the pipeline stopped.
    pub fn assert_aggregates_match_replay(&self) {
        let replay_out = self.dir.path().join("replay");
        ok(&run(
            &["replay", "pipelines/w1-tumbling.yaml"],
            &[
                ("CENTRALFLOW_INPUT", self.input.to_str().unwrap()),
                ("CENTRALFLOW_OUTPUT", replay_out.to_str().unwrap()),
            ],
            Duration::from_secs(600),
        ));
        let live = window_rows(&self.out().join("agg"));
        let replayed = window_rows(&replay_out);
        assert!(live.len() > 100, "{} live windows", live.len());
        for (k, v) in &live {
            assert_eq!(replayed.get(k), Some(v), "window {k:?}");
        }
        let last_closed = live.keys().map(|k| k.1.clone()).max().unwrap();
        let missing: Vec<_> =
            replayed.keys().filter(|k| !live.contains_key(*k) && k.1 < last_closed).take(10).collect();
        assert!(missing.is_empty(), "windows missing from the live output: {missing:?}");
    }

    /// Partitions read per instance, from the raw archive's file names (`part-{instance}-...`).
    pub fn instances_in_output(&self) -> BTreeSet<String> {
        parquet_files(&self.out().join("raw"))
            .iter()
            .filter_map(|f| f.file_name()?.to_str()?.split('-').nth(1).map(str::to_string))
            .collect()
    }
}

impl Default for Hub {
    fn default() -> Self {
        Hub::new()
    }
}

/// `source_connected` and `source_reconnects` of component `hub` from /metrics.
pub fn metrics(addr: &str) -> Option<(i64, i64)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let value = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name) && l.contains("component=\"hub\""))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as i64)
    };
    Some((value("centralflow_source_connected")?, value("centralflow_source_reconnects_total").unwrap_or(0)))
}

/// The value of a metric line that starts with `name` and contains `label`, from /metrics.
pub fn metric(addr: &str, name: &str, label: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.lines()
        .find(|l| l.starts_with(name) && l.contains(label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.trim().parse::<f64>().ok())
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
