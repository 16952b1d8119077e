//! Running `pipelines/servicebus-to-parquet.yaml` against the Service Bus emulator, with
//! Microsoft's own Python SDK (`azure-servicebus`) as the publisher, and checking the output.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use centralflow_emulators::servicebus::{Config, Emulator, Stats};

use super::*;

pub const QUEUE: &str = "iotc-export";
pub const TOPIC: &str = "iotc-topic";
pub const SUBSCRIPTION: &str = "centralflow";
pub const TOPIC_PATH: &str = "iotc-topic/Subscriptions/centralflow";

/// Where the pipeline reads.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum To {
    Queue,
    Topic,
}

impl To {
    /// The entity path the pipeline reads.
    pub fn path(self) -> &'static str {
        match self {
            To::Queue => QUEUE,
            To::Topic => TOPIC_PATH,
        }
    }
}

/// An emulator with its runtime, a work folder, and what was published.
pub struct Bus {
    pub rt: tokio::runtime::Runtime,
    pub emu: Emulator,
    pub dir: tempfile::TempDir,
    /// Every published export message that decodes, in order (the replay input).
    pub input: PathBuf,
    pub to: To,
    batches: std::sync::atomic::AtomicUsize,
}

/// The Python that has the Azure SDKs (`scripts/test` installs them into .tools/venv).
pub fn python() -> String {
    std::env::var("W1_PYTHON").expect("W1_PYTHON names a Python with azure-servicebus: run scripts/test")
}

impl Bus {
    pub fn new(to: To, lock: Duration) -> Bus {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let cfg = Config::new().queue(QUEUE).topic(TOPIC, SUBSCRIPTION).lock_duration(lock);
        let emu = rt.block_on(Emulator::start(cfg)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("export.jsonl");
        std::fs::write(&input, b"").unwrap();
        Bus { rt, emu, dir, input, to, batches: Default::default() }
    }

    /// `n` simulated export messages from 200 devices, `rate` per second of event time.
    pub fn simulated(&self, n: u64, rate: u32, seed: u64) -> Vec<String> {
        let path = self.dir.path().join(format!("sim-{seed}.jsonl"));
        let out = run(
            &["simulate", "--count", &n.to_string(), "--devices", "200", "--seed", &seed.to_string()]
                .into_iter()
                .chain(["--rate", &rate.to_string(), "--out", path.to_str().unwrap()])
                .collect::<Vec<_>>(),
            &[],
            Duration::from_secs(120),
        );
        ok(&out);
        std::fs::read_to_string(&path).unwrap().lines().map(str::to_string).collect()
    }

    /// Adds messages to the replay input without publishing them.
    pub fn record_input(&self, lines: &[String]) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&self.input).unwrap();
        for l in lines {
            writeln!(f, "{l}").unwrap();
        }
    }

    /// Publishes export messages with the Python SDK, as IoT Central does: the JSON body and
    /// the `iotcentral-*` application properties. They also go to the replay input.
    pub fn publish(&self, lines: &[String]) {
        self.record_input(lines);
        self.publish_bodies(lines);
    }

    /// Publishes bodies as they are (malformed ones too); not part of the replay input.
    pub fn publish_bodies(&self, lines: &[String]) {
        let n = self.batches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let file = self.dir.path().join(format!("publish-{n}.jsonl"));
        let mut text = String::new();
        for l in lines {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or(serde_json::Value::Null);
            let mut props = serde_json::Map::new();
            for (k, f) in [
                ("iotcentral-device-id", "deviceId"),
                ("iotcentral-application-id", "applicationId"),
                ("iotcentral-message-source", "messageSource"),
            ] {
                if let Some(s) = v.get(f).and_then(|x| x.as_str()) {
                    props.insert(k.into(), s.into());
                }
            }
            text.push_str(&serde_json::json!({"body": l, "properties": props}).to_string());
            text.push('\n');
        }
        std::fs::write(&file, text).unwrap();
        let (flag, entity) = match self.to {
            To::Queue => ("--queue", QUEUE),
            To::Topic => ("--topic", TOPIC),
        };
        let out = Command::new(python())
            .arg(root().join("tests/python/sb_publish.py"))
            .args([&self.emu.connection_string(), file.to_str().unwrap(), flag, entity])
            .args(["--message-id-prefix", &format!("m{n}-")])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "sb_publish.py failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let sent: usize = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0);
        assert_eq!(sent, lines.len(), "the SDK sent {sent} of {}", lines.len());
    }

    pub fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }

    /// Environment for the shipped pipeline.
    pub fn env(&self, instance: &str) -> Vec<(String, String)> {
        let (q, t, s) = match self.to {
            To::Queue => (QUEUE, "", ""),
            To::Topic => ("", TOPIC, SUBSCRIPTION),
        };
        vec![
            ("SERVICEBUS_CONNECTION_STRING".to_string(), self.emu.connection_string()),
            ("SERVICEBUS_QUEUE".into(), q.into()),
            ("SERVICEBUS_TOPIC".into(), t.into()),
            ("SERVICEBUS_SUBSCRIPTION".into(), s.into()),
            ("CENTRALFLOW_OUTPUT".into(), self.out().to_string_lossy().to_string()),
            ("CENTRALFLOW_STATE".into(), self.dir.path().join("state").to_string_lossy().to_string()),
            ("CENTRALFLOW_INSTANCE".into(), instance.into()),
            ("CENTRALFLOW_CHECKPOINT_INTERVAL".into(), "1s".into()),
            ("CENTRALFLOW_LOG".into(), "info,fe2o3_amqp=error".into()),
        ]
    }

    /// Starts `centralflow run` on the shipped pipeline; stderr goes to `instance.log`
    /// (appended across runs).
    pub fn start(&self, instance: &str, extra: &[(&str, &str)]) -> Child {
        self.start_with(instance, "", extra)
    }

    /// Starts the shipped pipeline with more settings of its source (YAML lines, indented
    /// as the source's keys), e.g. `    renew_locks: false\n`.
    pub fn start_with(&self, instance: &str, source_settings: &str, extra: &[(&str, &str)]) -> Child {
        let path = if source_settings.is_empty() {
            root().join("pipelines/servicebus-to-parquet.yaml")
        } else {
            let shipped = std::fs::read_to_string(root().join("pipelines/servicebus-to-parquet.yaml")).unwrap();
            let at = shipped.find("    type: servicebus\n").unwrap() + "    type: servicebus\n".len();
            let yaml = format!("{}{source_settings}{}", &shipped[..at], &shipped[at..]);
            pipeline(self.dir.path(), &format!("{instance}.yaml"), &yaml)
        };
        self.spawn(instance, &path, extra)
    }

    /// Starts `centralflow run` of a pipeline of its own (in the test's folder), with the same
    /// environment.
    pub fn start_yaml(&self, instance: &str, yaml: &str, extra: &[(&str, &str)]) -> Child {
        let path = pipeline(self.dir.path(), &format!("{instance}.yaml"), yaml);
        self.spawn(instance, &path, extra)
    }

    fn spawn(&self, instance: &str, path: &Path, extra: &[(&str, &str)]) -> Child {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path(instance)).unwrap();
        let mut c = cmd(&["run", path.to_str().unwrap()]);
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

    pub fn stats(&self, path: &str) -> Stats {
        self.emu.stats(path).unwrap()
    }

    /// Nothing available and nothing locked in the entity read.
    pub fn drained(&self) -> bool {
        let s = self.stats(self.to.path());
        s.available == 0 && s.locked == 0
    }

    /// Waits until `f` holds, checking every 50 ms; the instances' logs are shown on failure.
    pub fn wait(&self, what: &str, timeout: Duration, mut f: impl FnMut(&Bus) -> bool) {
        let start = Instant::now();
        while !f(self) {
            if start.elapsed() > timeout {
                let mut logs = String::new();
                for e in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
                    if e.path().extension().is_some_and(|x| x == "log") {
                        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                        let tail: Vec<&str> = text.lines().rev().take(30).collect();
                        logs.push_str(&format!(
                            "--- {:?}\n{}\n",
                            e.file_name(),
                            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                        ));
                    }
                }
                panic!("timed out waiting for {what}; {:?}\n{logs}", self.stats(self.to.path()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    // ------------------------------------------------------------------ output

    /// Every published export message is in the raw archive exactly once: the sequence
    /// numbers (`_offset`) are distinct and the rows are the input's messages.
    pub fn assert_raw_exactly_once(&self) {
        let rows = read_rows(&self.out().join("raw"));
        let mut seqs = BTreeMap::new();
        for r in &rows {
            *seqs.entry(r["_offset"].clone()).or_insert(0usize) += 1;
        }
        let dups: Vec<_> = seqs.iter().filter(|(_, n)| **n > 1).take(10).collect();
        assert!(dups.is_empty(), "sequence numbers in the raw archive more than once: {dups:?}");
        let key = |dev: &str, t: &str, src: &str| (dev.to_string(), t.to_string(), src.to_string());
        let mut got: BTreeMap<_, usize> = BTreeMap::new();
        for r in &rows {
            *got.entry(key(&r["deviceId"], &r["enqueuedTime"], &r["messageSource"])).or_default() += 1;
        }
        let mut want: BTreeMap<_, usize> = BTreeMap::new();
        for line in std::fs::read_to_string(&self.input).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let t = centralflow::time::format_rfc3339(
                centralflow::time::parse_rfc3339(v["enqueuedTime"].as_str().unwrap()).unwrap(),
            );
            *want.entry(key(v["deviceId"].as_str().unwrap(), &t, v["messageSource"].as_str().unwrap())).or_default() +=
                1;
        }
        let total: usize = want.values().sum();
        assert_eq!(rows.len(), total, "raw rows vs published messages");
        let diff: Vec<_> = want.iter().filter(|(k, n)| got.get(*k) != Some(n)).take(10).collect();
        assert!(diff.is_empty(), "messages not in the raw archive exactly once: {diff:?}");
    }

    /// `centralflow replay` of the published messages through the same pipeline (the source
    /// swapped for a file): its per-minute rows.
    pub fn replay_windows(&self) -> BTreeMap<(String, String), BTreeMap<String, f64>> {
        let shipped = std::fs::read_to_string(root().join("pipelines/servicebus-to-parquet.yaml")).unwrap();
        let start = shipped.find("sources:").unwrap();
        let end = shipped.find("transforms:").unwrap();
        let yaml = format!(
            "{}sources:\n  bus:\n    type: files\n    url: ${{CENTRALFLOW_INPUT}}\n{}",
            &shipped[..start],
            &shipped[end..]
        );
        let p = pipeline(self.dir.path(), "replay.yaml", &yaml);
        let out = self.dir.path().join("replay");
        ok(&run(
            &["replay", p.to_str().unwrap(), "--no-progress"],
            &[
                ("CENTRALFLOW_INPUT", self.input.to_str().unwrap()),
                ("CENTRALFLOW_OUTPUT", out.to_str().unwrap()),
                ("CENTRALFLOW_STATE", self.dir.path().join("replay-state").to_str().unwrap()),
            ],
            Duration::from_secs(600),
        ));
        assert!(
            parquet_files(&out.join("late")).is_empty() || read_rows(&out.join("late")).is_empty(),
            "the replay has late events"
        );
        merged_window_rows(&out.join("agg"))
    }

    /// The live per-minute rows, the partial rows of every instance merged.
    pub fn live_windows(&self) -> BTreeMap<(String, String), BTreeMap<String, f64>> {
        merged_window_rows(&self.out().join("agg"))
    }

    /// Live rows equal the replay's, both ways, for every window that starts more than two
    /// minutes before the replay's last (later ones may still be open in an instance when it
    /// stopped: their state is in its checkpoint); returns the number of windows compared.
    pub fn assert_windows_match_replay(&self) -> usize {
        let live = self.live_windows();
        let replayed = self.replay_windows();
        let last = replayed.keys().map(|k| centralflow::time::parse_rfc3339(&k.1).unwrap()).max().unwrap();
        let cutoff = last - 120 * 1_000_000_000;
        let early = |k: &(String, String)| centralflow::time::parse_rfc3339(&k.1).unwrap() < cutoff;
        let compared = live.keys().filter(|k| early(k)).count();
        assert!(compared > 100, "{compared} live windows to compare");
        for (k, v) in live.iter().filter(|(k, _)| early(k)) {
            let r = replayed.get(k).unwrap_or_else(|| panic!("window {k:?} is not in the replay"));
            assert_eq!(v.keys().collect::<Vec<_>>(), r.keys().collect::<Vec<_>>(), "columns of {k:?}");
            for (c, x) in v {
                let y = r[c];
                assert!((x - y).abs() <= 1e-9 * x.abs().max(1.0), "window {k:?} column {c}: live {x}, replay {y}");
            }
        }
        let missing: Vec<_> = replayed.keys().filter(|k| early(k) && !live.contains_key(*k)).take(10).collect();
        assert!(missing.is_empty(), "windows missing from the live output: {missing:?}");
        compared
    }
}

/// Per-minute rows under `dir` (every instance's folder), partial rows of one window merged:
/// counts and sums added, minima and maxima taken, averages recomputed as sum / count.
pub fn merged_window_rows(dir: &std::path::Path) -> BTreeMap<(String, String), BTreeMap<String, f64>> {
    let mut m: BTreeMap<(String, String), BTreeMap<String, f64>> = BTreeMap::new();
    for mut r in read_rows(dir) {
        let key = (r.remove("deviceId").unwrap(), r.remove("window_start").unwrap());
        r.remove("window_end");
        let acc = m.entry(key).or_default();
        for (c, v) in r {
            let Ok(x) = v.parse::<f64>() else { continue };
            if c.ends_with("_avg") {
                continue;
            }
            let e = acc.entry(c.clone());
            match e {
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(x);
                }
                std::collections::btree_map::Entry::Occupied(mut e) => {
                    let y = *e.get();
                    *e.get_mut() = if c.ends_with("_min") {
                        y.min(x)
                    } else if c.ends_with("_max") {
                        y.max(x)
                    } else {
                        y + x // counts and sums
                    };
                }
            }
        }
    }
    for acc in m.values_mut() {
        let fields: Vec<String> = acc.keys().filter_map(|c| c.strip_suffix("_sum").map(str::to_string)).collect();
        for f in fields {
            if let Some(n) = acc.get(&format!("{f}_count")).copied().filter(|n| *n > 0.0) {
                let avg = acc[&format!("{f}_sum")] / n;
                acc.insert(format!("{f}_avg"), avg);
            }
        }
    }
    m
}
