//! An IoT Central Blob export for tests: files in the layout
//! `{app-id}/{partition}/{YYYY}/{MM}/{dd}/{hh}/{mm}/{file}` uploaded to a container (Azurite,
//! moto or a folder), and `pipelines/blob-export-to-parquet.yaml` following it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use object_store::ObjectStoreExt;

use super::*;

pub const APP: &str = "6e9d8f3c-2b1a-4c8e-9f0d-1a2b3c4d5e6f";

/// Devices per partition folder, records per device in a minute's file.
pub const DEVICES: usize = 3;
pub const PER_DEVICE: usize = 4;

/// The minute `m` after 2026-11-01T13:00Z as `(YYYY/MM/dd/hh/mm, RFC 3339 prefix)`.
pub fn minute(m: u32) -> (String, String) {
    let t = chrono::DateTime::parse_from_rfc3339("2026-11-01T13:00:00Z").unwrap() + chrono::Duration::minutes(m as i64);
    (t.format("%Y/%m/%d/%H/%M").to_string(), t.format("%Y-%m-%dT%H:%M").to_string())
}

/// The path of partition `part`'s file for minute `m`, below the container.
pub fn blob_path(part: u32, m: u32) -> String {
    format!("{APP}/{part}/{}/export-{part}-{m:04}.json", minute(m).0)
}

/// One export message.
pub fn export_line(dev: &str, time: &str, temp: f64) -> String {
    format!(
        r#"{{"applicationId":"{APP}","messageSource":"telemetry","deviceId":"{dev}","schema":"default@v1","templateId":"dtmi:t;1","enqueuedTime":"{time}","telemetry":{{"temperature":{temp},"humidity":{h},"pressure":{p}}},"enrichments":{{}}}}"#,
        h = 40.0 + temp / 10.0,
        p = 1000.0 + temp
    )
}

/// Partition `part`'s file for minute `m`: every event in the first 20 s of the minute, so
/// that a file landing a minute late is still within the pipeline's 30 s of lateness.
pub fn file_body(part: u32, m: u32) -> String {
    let (_, prefix) = minute(m);
    let mut s = String::new();
    for d in 0..DEVICES {
        for k in 0..PER_DEVICE {
            let sec = d * PER_DEVICE + k;
            let temp = 15.0 + ((part * 7 + m * 3) as usize + d * 5 + k) as f64 % 17.0;
            s.push_str(&export_line(&format!("dev-{part}-{d}"), &format!("{prefix}:{sec:02}.{k}00Z"), temp));
            s.push('\n');
        }
    }
    s
}

/// The (deviceId, enqueuedTime) of every message of partition `part`'s file for minute `m`.
pub fn file_keys(part: u32, m: u32) -> Vec<(String, String)> {
    file_body(part, m)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["deviceId"].as_str().unwrap().to_string(), v["enqueuedTime"].as_str().unwrap().to_string())
        })
        .collect()
}

/// A container to upload to, opened in the test process.
pub struct Container {
    pub url: String,
    pub env: Vec<(String, String)>,
    pub loc: centralflow::storage::Location,
    rt: tokio::runtime::Runtime,
}

impl Container {
    pub fn azurite() -> Container {
        let name = unique("blob");
        azurite_create_container(&name);
        Container::open(format!("az://{name}"), azurite_env(), azurite_options())
    }

    pub fn s3() -> Container {
        let name = unique("blob");
        s3_create_bucket(&name);
        Container::open(format!("s3://{name}"), s3_env(), s3_options())
    }

    pub fn local(dir: &Path) -> Container {
        std::fs::create_dir_all(dir).unwrap();
        Container::open(dir.to_str().unwrap().to_string(), Vec::new(), BTreeMap::new())
    }

    fn open(url: String, env: Vec<(String, String)>, options: BTreeMap<String, String>) -> Container {
        let loc = centralflow::storage::open(&url, &options).unwrap();
        Container { url, env, loc, rt: tokio::runtime::Runtime::new().unwrap() }
    }

    pub fn put(&self, path: &str, body: String) {
        let p = self.loc.child(path);
        self.rt.block_on(self.loc.store.put(&p, body.into_bytes().into())).unwrap();
    }

    /// Uploads many small files, 64 at a time (a local folder: written directly).
    pub fn put_many(&self, files: Vec<(String, String)>) {
        use futures::StreamExt;
        if let Some(root) = &self.loc.local_path {
            for (path, body) in files {
                let p = root.join(path);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(p, body).unwrap();
            }
            return;
        }
        let store = self.loc.store.clone();
        let puts = files.into_iter().map(|(path, body)| {
            let (store, p) = (store.clone(), self.loc.child(&path));
            async move { store.put(&p, body.into_bytes().into()).await.map(|_| ()) }
        });
        self.rt.block_on(async {
            let mut s = futures::stream::iter(puts).buffer_unordered(64);
            while let Some(r) = s.next().await {
                r.unwrap();
            }
        });
    }
}

/// `pipelines/blob-export-to-parquet.yaml` following a container, writing into `dir`.
pub struct Follower {
    pub dir: PathBuf,
    pub input: String,
    pub env: Vec<(String, String)>,
    /// Each run's stderr, appended.
    pub log: PathBuf,
}

impl Follower {
    pub fn new(dir: &Path, c: &Container) -> Follower {
        Follower { dir: dir.to_path_buf(), input: c.url.clone(), env: c.env.clone(), log: dir.join("stderr.log") }
    }

    fn command(&self, verb: &str, out: &Path, state: &Path) -> std::process::Command {
        let mut cmd = cmd(&[verb, "pipelines/blob-export-to-parquet.yaml"]);
        cmd.env("CENTRALFLOW_INPUT", &self.input)
            .env("CENTRALFLOW_OUTPUT", out)
            .env("CENTRALFLOW_STATE", state)
            .env("CENTRALFLOW_POLL_INTERVAL", "200ms")
            .env("CENTRALFLOW_CHECKPOINT_INTERVAL", "500ms")
            .env("CENTRALFLOW_LOG", "info,centralflow::sources::files=debug");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Starts `centralflow run`, its stderr appended to `log`.
    pub fn start(&self) -> Child {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        self.command("run", &self.dir.join("out"), &self.dir.join("state"))
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn centralflow")
    }

    /// `centralflow replay` of the pipeline into `out` with the state in `state`.
    pub fn replay(&self, out: &Path, state: &Path) -> String {
        let mut cmd = self.command("replay", out, state);
        cmd.arg("--no-progress").stdout(Stdio::piped()).stderr(Stdio::piped());
        ok(&wait_output(cmd.spawn().unwrap(), Duration::from_secs(300)))
    }

    /// The raw archive: (deviceId, enqueuedTime) of every row, with duplicates counted.
    pub fn raw(&self, out: &Path) -> BTreeMap<(String, String), usize> {
        let mut m = BTreeMap::new();
        for r in read_rows(&out.join("raw")) {
            *m.entry((r["deviceId"].clone(), r["enqueuedTime"].clone())).or_default() += 1;
        }
        m
    }

    /// Waits until the raw archive of `run` holds `n` rows.
    pub fn wait_raw(&self, n: usize, child: &mut Child, timeout: Duration) {
        let start = Instant::now();
        loop {
            let have: usize = self.raw(&self.dir.join("out")).values().sum();
            if have >= n {
                return;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("centralflow exited ({status}) with {have} of {n} rows:\n{}", self.log_text());
            }
            assert!(start.elapsed() < timeout, "{have} of {n} rows after {timeout:?}:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops `run` with SIGTERM (its final checkpoint) and waits for it.
    pub fn stop(&self, child: Child) {
        signal(&child, libc::SIGTERM);
        let out = wait_output(child, Duration::from_secs(120));
        assert!(out.status.success(), "centralflow failed ({:?}):\n{}", out.status, self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// For each start of `run`: what its first poll listed, (requests, entries).
    pub fn first_polls(&self) -> Vec<(u64, u64)> {
        let field = |line: &str, name: &str| -> u64 {
            let at = line.find(&format!(" {name}=")).unwrap_or_else(|| panic!("no {name} in {line}"));
            line[at + name.len() + 2..].split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
        };
        self.log_text()
            .lines()
            .filter(|l| l.contains("following the blob export"))
            .map(|l| (field(l, "requests"), field(l, "entries")))
            .collect()
    }
}

/// A small xorshift generator: the tests print their seed, so that a failure can be replayed.
pub struct Rng(pub u64);

impl Rng {
    pub fn from_time() -> Rng {
        let seed = std::env::var("CENTRALFLOW_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
        });
        eprintln!("seed: CENTRALFLOW_TEST_SEED={seed}");
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// A duration between `lo` and `hi`.
    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        lo + Duration::from_millis(self.next() % (hi - lo).as_millis().max(1) as u64)
    }
}
