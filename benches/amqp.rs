//! AMQP end to end: N export messages drained from a RabbitMQ queue by `centralflow run
//! pipelines/w1-amqp.yaml` (decode, filter, 1-minute windows, raw and aggregate Parquet,
//! checkpoints, acknowledgements after each durable checkpoint), against the ceiling of a bare
//! lapin consumer on the same broker that only acknowledges in batches. Both with the same
//! prefetch, alternating, median of several runs. A run ends when the broker has every message
//! acknowledged.
//!
//!   cargo bench --bench amqp            # RabbitMQ on 127.0.0.1:5672 (scripts/test starts it)
//!
//! Environment: `AMQP_BENCH_N` (default 200,000), `AMQP_BENCH_RUNS` (default 3),
//! `CENTRALFLOW_TEST_AMQP` (broker URL). Under `cargo test` (no `--bench`): 5,000 messages, one
//! run, as a check.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

const PREFETCH: u16 = 10000; // as in pipelines/w1-amqp.yaml

fn url() -> String {
    std::env::var("CENTRALFLOW_TEST_AMQP").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

async fn connect() -> Connection {
    Connection::connect(&url(), ConnectionProperties::default()).await.expect("RabbitMQ on 127.0.0.1:5672")
}

/// Deletes and refills `queue` with `bodies` (durable queue, persistent messages, confirmed).
async fn fill(queue: &str, bodies: &[Vec<u8>]) {
    let conn = connect().await;
    let ch = conn.create_channel().await.unwrap();
    let _ = ch.queue_delete(queue.into(), QueueDeleteOptions::default()).await;
    ch.queue_declare(queue.into(), QueueDeclareOptions { durable: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let mut pending = Vec::new();
    for body in bodies {
        let props = BasicProperties::default().with_delivery_mode(2);
        pending.push(
            ch.basic_publish("".into(), queue.into(), BasicPublishOptions::default(), body, props).await.unwrap(),
        );
        if pending.len() >= 5000 {
            for p in pending.drain(..) {
                assert!(p.await.unwrap().is_ack());
            }
        }
    }
    for p in pending.drain(..) {
        assert!(p.await.unwrap().is_ack());
    }
    let _ = conn.close(200, "filled".into()).await;
}

/// The ceiling: consume with the same prefetch, acknowledge every 1,000 deliveries (multiple).
/// Timed from before connecting, as centralflow is timed from its start.
async fn bare(queue: &str, n: usize) -> Duration {
    let start = Instant::now();
    let conn = connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(PREFETCH, BasicQosOptions::default()).await.unwrap();
    let mut consumer = ch
        .basic_consume(queue.into(), "bare".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let mut got = 0;
    while let Some(d) = consumer.next().await {
        let d = d.unwrap();
        got += 1;
        if got % 1000 == 0 || got == n {
            ch.basic_ack(d.delivery_tag, BasicAckOptions { multiple: true }).await.unwrap();
        }
        if got == n {
            break;
        }
    }
    // a synchronous call on the channel: the broker has processed the acknowledgements
    let q = ch
        .queue_declare(queue.into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap();
    let took = start.elapsed();
    assert_eq!(q.message_count(), 0);
    let _ = conn.close(200, "done".into()).await;
    took
}

/// `centralflow run pipelines/w1-amqp.yaml` until its source has acknowledged all `n` messages
/// (its `centralflow_source_committed_total`), then SIGTERM.
async fn centralflow(queue: &str, n: usize, dir: &Path) -> Duration {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let _ = std::fs::remove_dir_all(dir);
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let start = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_centralflow"))
        .args(["run", root.join("pipelines/w1-amqp.yaml").to_str().unwrap()])
        .env("CENTRALFLOW_QUEUE", queue)
        .env("CENTRALFLOW_OUTPUT", dir.join("out"))
        .env("CENTRALFLOW_STATE", dir.join("state"))
        .env("CENTRALFLOW_AMQP_URL", url())
        .env("CENTRALFLOW_API_ADDRESS", format!("127.0.0.1:{port}"))
        .env("CENTRALFLOW_LOG", std::env::var("AMQP_BENCH_LOG").unwrap_or_else(|_| "warn".into()))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let metrics = format!("http://127.0.0.1:{port}/metrics");
    let http = reqwest::Client::new();
    let took = loop {
        let done = match http.get(&metrics).send().await {
            Ok(r) => r.text().await.unwrap_or_default().lines().any(|l| {
                l.starts_with("centralflow_source_committed_total{component=\"exports\"")
                    && l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).is_some_and(|v| v >= n as f64)
            }),
            Err(_) => false,
        };
        if done {
            break start.elapsed();
        }
        assert!(start.elapsed() < Duration::from_secs(600), "centralflow did not drain the queue");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "centralflow failed: {:?}", out.status);
    took
}

/// Rows in the raw telemetry archive.
fn raw_rows(dir: &Path) -> usize {
    fn walk(d: &Path, n: &mut usize) {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() && !p.ends_with("_staging") {
                walk(&p, n);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                let bytes = bytes::Bytes::from(std::fs::read(&p).unwrap());
                let r = parquet::file::reader::SerializedFileReader::new(bytes).unwrap();
                *n += parquet::file::reader::FileReader::metadata(&r).file_metadata().num_rows() as usize;
            }
        }
    }
    let mut n = 0;
    walk(&dir.join("out/raw"), &mut n);
    n
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let n: usize =
        if bench { std::env::var("AMQP_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000) } else { 5_000 };
    let runs: usize =
        if bench { std::env::var("AMQP_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3) } else { 1 };
    let cfg: centralflow::sources::simulator::SimulatorConfig = serde_json::from_value(serde_json::json!({
        "devices": 2000, "rate": 1000.0, "count": n, "start": "2026-11-01T00:00:00Z", "seed": 9
    }))
    .unwrap();
    let g = centralflow::sources::simulator::Generator::new(cfg, 0).unwrap();
    let bodies: Vec<Vec<u8>> = (0..n as u64).map(|i| g.message(i).into_bytes()).collect();
    let telemetry = bodies
        .iter()
        .filter(|b| serde_json::from_slice::<serde_json::Value>(b).unwrap()["messageSource"] == "telemetry")
        .count();
    let bytes: usize = bodies.iter().map(Vec::len).sum();
    let queue = format!("cf-bench-{}", std::process::id());
    let work = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (mut b, mut c) = (Vec::new(), Vec::new());
    for run in 0..runs {
        rt.block_on(fill(&queue, &bodies));
        b.push(rt.block_on(bare(&queue, n)));
        rt.block_on(fill(&queue, &bodies));
        let dir = work.path().join(format!("run-{run}"));
        c.push(rt.block_on(centralflow(&queue, n, &dir)));
        assert_eq!(raw_rows(&dir), telemetry, "the raw archive holds every telemetry message once");
    }
    rt.block_on(async {
        let conn = connect().await;
        let ch = conn.create_channel().await.unwrap();
        let _ = ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
    });
    b.sort();
    c.sort();
    let (b, c) = (b[b.len() / 2], c[c.len() / 2]);
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    if !bench {
        println!("AMQP check (cargo test, not a measurement)");
    }
    println!(
        "{n} messages ({:.0} bytes each) through RabbitMQ, prefetch {PREFETCH}, median of {runs}\n",
        bytes as f64 / n as f64
    );
    println!("| | drain s | messages/s |");
    println!("|---|---|---|");
    println!("| bare lapin consumer (acks every 1,000) | {:.2} | {:.0} |", b.as_secs_f64(), rate(b));
    println!("| centralflow w1-amqp (end to end) | {:.2} | {:.0} |", c.as_secs_f64(), rate(c));
    println!("| centralflow / bare | | {:.2} |", rate(c) / rate(b));
}
