//! Storage outages (issue 20 item 2): an AMQP run whose Parquet sink and checkpoint store are on
//! Azurite (or moto), with the storage taken away for 60 s mid-run. Azurite is stopped and
//! started again on the same folder and port (requests are refused meanwhile); moto, which
//! keeps its objects in memory, is frozen with SIGSTOP and thawed with SIGCONT (requests hang).
//! While it is gone: `/health/ready` names the location and what is wrong, the broker holds the
//! messages published meanwhile (the source stops taking them: memory stays bounded). When it is
//! back: the run goes on by itself, and every telemetry record is in the output exactly once.
//!
//! Each test runs its own Azurite or moto (`scripts/test` exports where they are installed),
//! so the shared ones the other tests use are never interrupted.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::amqp_pipeline::{expected_raw, raw_archive_yaml};
use common::*;
use futures::TryStreamExt;
use object_store::ObjectStoreExt;

const OUTAGE: Duration = Duration::from_secs(60);
const W: Duration = Duration::from_secs(180);

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Azurite,
    Moto,
}

/// A private Azurite or moto on a fixed loopback port.
struct Peer {
    kind: Kind,
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Peer {
    fn start(kind: Kind, dir: &Path) -> Peer {
        // the port must stay the same across the restart; it is free when picked
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut p = Peer { kind, port, dir: dir.to_path_buf(), child: None };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        let var = match self.kind {
            Kind::Azurite => "CENTRALFLOW_TEST_AZURITE_BIN",
            Kind::Moto => "CENTRALFLOW_TEST_MOTO_BIN",
        };
        let bin = std::env::var(var).unwrap_or_else(|_| panic!("{var} is not set: run the tests with scripts/test"));
        let port = self.port.to_string();
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("peer-{}.log", self.port)))
            .unwrap();
        let mut c = Command::new(bin);
        match self.kind {
            Kind::Azurite => c
                .args(["--blobHost", "127.0.0.1", "--blobPort", &port, "--skipApiVersionCheck", "--loose"])
                .arg("--location")
                .arg(self.dir.join("azurite")),
            Kind::Moto => c.args(["-H", "127.0.0.1", "-p", &port]),
        };
        let child = c.stdout(log.try_clone().unwrap()).stderr(log).spawn().expect("start the storage peer");
        self.child = Some(child);
        wait_until("the storage peer listens", Duration::from_secs(60), || {
            std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        });
    }

    fn endpoint(&self) -> String {
        match self.kind {
            Kind::Azurite => format!("http://127.0.0.1:{}/devstoreaccount1", self.port),
            Kind::Moto => format!("http://127.0.0.1:{}", self.port),
        }
    }

    fn env(&self) -> Vec<(String, String)> {
        match self.kind {
            Kind::Azurite => azurite_env_at(&self.endpoint()),
            Kind::Moto => s3_env_at(&self.endpoint()),
        }
    }

    /// A new container or bucket; its URL.
    fn bucket(&self) -> String {
        let name = unique("outage");
        match self.kind {
            Kind::Azurite => {
                azurite_create_container_at(&self.endpoint(), &name);
                format!("az://{name}")
            }
            Kind::Moto => {
                s3_create_bucket_at(&self.endpoint(), &name);
                format!("s3://{name}")
            }
        }
    }

    /// Azurite: stopped (SIGTERM, it saves its state), port closed. moto: frozen.
    fn take_away(&mut self) {
        let child = self.child.as_mut().unwrap();
        match self.kind {
            Kind::Azurite => {
                // SIGTERM: Azurite closes its databases and says so; its process then waits
                // for open keep-alive connections to go, so it is killed once it has said it
                signal(child, libc::SIGTERM);
                let log = self.dir.join(format!("peer-{}.log", self.port));
                let deadline = Instant::now() + Duration::from_secs(30);
                while child.try_wait().unwrap().is_none()
                    && !std::fs::read_to_string(&log).unwrap_or_default().contains("successfully closed")
                {
                    assert!(Instant::now() < deadline, "Azurite did not stop");
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = child.kill();
                let _ = child.wait();
                self.child = None;
                assert!(std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err(), "Azurite still answers");
            }
            Kind::Moto => signal(child, libc::SIGSTOP),
        }
    }

    fn bring_back(&mut self) {
        match self.kind {
            Kind::Azurite => self.spawn(),
            Kind::Moto => signal(self.child.as_ref().unwrap(), libc::SIGCONT),
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn publish(queue: &str, bodies: &[Vec<u8>]) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(amqp_publish(queue, bodies.to_vec()));
}

fn ready_body(api: &str) -> String {
    http_get(api, "/health/ready").map(|(_, b)| b).unwrap_or_default()
}

/// Every raw telemetry row under `url/raw`, as (deviceId, enqueuedTime, telemetry) with counts.
fn stored_raw(url: &str, env: &[(String, String)]) -> BTreeMap<(String, String, String), usize> {
    let options: BTreeMap<String, String> = env.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())).collect();
    let loc = centralflow::storage::open(&format!("{url}/raw"), &options).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let list: Vec<_> = loc.store.list(Some(&loc.prefix)).try_collect().await.unwrap();
        let mut m = BTreeMap::new();
        for o in list {
            let name = o.location.to_string();
            assert!(!name.contains("_staging"), "a staged file is left: {name}");
            assert!(name.ends_with(".parquet"), "unexpected object {name}");
            let b = loc.store.get(&o.location).await.unwrap().bytes().await.unwrap();
            for batch in read_parquet_bytes(b) {
                for r in batch_rows(&batch) {
                    let tele: serde_json::Value = serde_json::from_str(&r["telemetry"]).unwrap();
                    *m.entry((r["deviceId"].clone(), r["enqueuedTime"].clone(), tele.to_string())).or_default() += 1;
                }
            }
        }
        m
    })
}

fn outage(kind: Kind) {
    let dir = tempfile::tempdir().unwrap();
    let mut peer = Peer::start(kind, dir.path());
    let url = peer.bucket();
    let queue = unique("cf-outage-");
    let input = dir.path().join("export.jsonl");
    simulate(&input, 30_000, 200, 7);
    let bodies = file_bodies(&input);
    let thirds: Vec<&[Vec<u8>]> = bodies.chunks(10_000).collect();
    assert_eq!(thirds.len(), 3);
    amqp_refill(&queue, thirds[0].to_vec());

    let yaml = raw_archive_yaml(
        "outage",
        &queue,
        1000,
        &format!("{url}/raw"),
        "    partition_by: date=%Y-%m-%d\n",
        &format!("{url}/state"),
        "2s",
    );
    let p = pipeline(dir.path(), "outage.yaml", &yaml);
    let env = peer.env();
    let mut c = cmd(&["run", p.to_str().unwrap()]);
    c.env("CENTRALFLOW_AMQP_URL", amqp_url());
    for (k, v) in &env {
        c.env(k, v);
    }
    let mut run = Logged::spawn(c);
    let api = run.api();
    let pid = run.child.id();

    // the first third is in: committed and acknowledged
    wait_until("the first third acknowledged", W, || amqp_depth(&queue) == (0, 0));
    let rss_before = rss_kib(pid).unwrap();

    peer.take_away();
    let gone = Instant::now();
    // the next third arrives while the storage is away: the broker keeps it
    publish(&queue, thirds[1]);
    wait_until("/health/ready to name the storage", OUTAGE, || {
        let b = ready_body(&api);
        b.contains(&format!("storage {url}")) && b.contains("\"ready\":false")
    });
    let during = ready_body(&api);
    let mut peak_rss = rss_before;
    let mut held = (0, 0);
    while gone.elapsed() < OUTAGE {
        held = amqp_depth(&queue);
        peak_rss = peak_rss.max(rss_kib(pid).unwrap());
        assert!(run.child.try_wait().unwrap().is_none(), "centralflow exited during the outage:\n{}", run.text());
        std::thread::sleep(Duration::from_millis(500));
    }
    peer.bring_back();

    // the pipeline goes on by itself; the last third after it is back
    // (not `wait_until`: a failure here shows what is still not ready, and the log)
    let back = Instant::now();
    loop {
        let b = ready_body(&api);
        if !b.contains("storage ") && b.contains("\"ready\":true") {
            break;
        }
        assert!(back.elapsed() < W, "ready again: not within {W:?}; /health/ready: {b}\n{}", run.text());
        std::thread::sleep(Duration::from_millis(50));
    }
    publish(&queue, thirds[2]);
    wait_until("everything acknowledged", W, || amqp_depth(&queue) == (0, 0));
    let log = run.stop(W);

    // while away: the broker held what the source had not taken (it takes at most about one
    // prefetch beyond what it committed), and memory stayed bounded
    let (ready, unacked) = held;
    assert!(ready >= 8_000 && unacked <= 2_000, "held by the broker during the outage: {held:?}");
    assert!(
        peak_rss < rss_before + 100 * 1024,
        "memory grew from {rss_before} KiB to {peak_rss} KiB during the outage"
    );
    assert!(during.contains(&format!("storage {url}")), "{during}");
    assert!(log.contains("storage request failed; retrying") || during.contains("no answer for"), "{log}");
    assert!(log.contains("storage answers again"), "{log}");

    // every record once
    let got = stored_raw(&url, &env);
    let want = expected_raw(&input);
    let (got_n, want_n): (usize, usize) = (got.values().sum(), want.values().sum());
    assert_eq!(got_n, want_n, "rows in the output");
    assert!(got == want, "output differs from the input (duplicates or losses)");
}

#[test]
fn azurite_stopped_for_a_minute() {
    outage(Kind::Azurite);
}

#[test]
fn moto_frozen_for_a_minute() {
    outage(Kind::Moto);
}
