//! Service Bus end to end: N export messages drained from a queue of the Service Bus emulator
//! by `centralflow run pipelines/servicebus-to-parquet.yaml` (decode, filter, 1-minute
//! windows, raw and aggregate Parquet, checkpoints, completion after each durable checkpoint),
//! against the ceiling of a bare fe2o3-amqp peek-lock receiver on the same emulator that only
//! completes, in batches of half the prefetch. Both with the same prefetch (link credit),
//! alternating, median of several runs. A run ends when the emulator has every message completed.
//! Beside the rates: the CPU time per message of centralflow's process and of the emulator
//! (this process; with the bare receiver, which runs in it, one figure), from `/proc`, so that
//! a reader can see what the two cores were busy with.
//!
//!   cargo bench --bench servicebus
//!
//! Environment: `SB_BENCH_N` (default 100,000), `SB_BENCH_RUNS` (default 3). Under `cargo test`
//! (no `--bench`): 3,000 messages, one run, as a check.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use centralflow_emulators::servicebus::{Config, Emulator, Message};
use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::types::definitions::ReceiverSettleMode;
use fe2o3_amqp::types::messaging::Body;
use fe2o3_amqp::types::primitives::Value;
use fe2o3_amqp::{Connection, Receiver, Session};

#[path = "common/cpu.rs"]
mod cpu;
use cpu::{cpu_of, self_cpu};

/// Link credit of both receivers: `SB_BENCH_PREFETCH`, default the pipeline's default.
fn prefetch() -> u32 {
    std::env::var("SB_BENCH_PREFETCH").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_PREFETCH)
}
const DEFAULT_PREFETCH: u32 = 1000; // as in pipelines/servicebus-to-parquet.yaml
const QUEUE: &str = "bench";

fn fill(emu: &Emulator, bodies: &[Vec<u8>]) {
    for (i, b) in bodies.iter().enumerate() {
        emu.send(
            QUEUE,
            Message {
                body: b.clone(),
                message_id: Some(format!("m{i}")),
                content_type: None,
                application_properties: vec![],
            },
        )
        .unwrap();
    }
    assert_eq!(emu.stats(QUEUE).unwrap().available, bodies.len() as u64);
}

async fn wait_completed(emu: &Emulator, base: u64, n: u64, start: Instant) -> Duration {
    // SB_BENCH_TRACE=1: deliveries and completions every 50 ms, to see where a run waits
    let trace = std::env::var_os("SB_BENCH_TRACE").is_some();
    let mut next = Duration::ZERO;
    loop {
        let s = emu.stats(QUEUE).unwrap();
        if trace && start.elapsed() >= next {
            eprintln!(
                "{:>6.3} s  delivered {:>7}  completed {:>7}",
                start.elapsed().as_secs_f64(),
                s.deliveries,
                s.completed - base
            );
            next += Duration::from_millis(50);
        }
        if s.completed >= base + n {
            return start.elapsed();
        }
        assert!(start.elapsed() < Duration::from_secs(600), "the queue did not drain");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The ceiling: peek-lock with the same credit, complete every half prefetch at once and grant
/// the credit again. Timed from before connecting, as centralflow is timed from its start.
async fn bare(emu: &Emulator, n: u64) -> Duration {
    let base = emu.stats(QUEUE).unwrap().completed;
    let start = Instant::now();
    let (key_name, key) = emu.key();
    // TCP_NODELAY as centralflow's source sets it: with Nagle's algorithm the small flow and
    // disposition frames wait for delayed acknowledgements (about 40 ms per batch)
    let tcp = tokio::net::TcpStream::connect(emu.addr()).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let mut conn = Connection::builder()
        .container_id("bare")
        .hostname("127.0.0.1")
        .sasl_profile(fe2o3_amqp::sasl_profile::SaslProfile::Anonymous)
        .open_with_stream(tcp)
        .await
        .unwrap();
    let mut session = Session::begin(&mut conn).await.unwrap();
    let mut cbs = fe2o3_amqp_cbs::client::CbsClient::attach(&mut session).await.unwrap();
    // as centralflow's source does: fe2o3-amqp's sender can miss its first credit if the flow
    // lands just as the first send starts waiting (src/sources/servicebus/link.rs)
    tokio::time::sleep(Duration::from_millis(20)).await;
    let audience = format!("sb://127.0.0.1/{QUEUE}");
    let expiry = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64 + 3600;
    let token = sas(&audience, &key_name, &key, expiry);
    let put = cbs.put_token(
        audience.clone(),
        fe2o3_amqp_cbs::token::CbsToken::new(token, "servicebus.windows.net:sastoken", None),
    );
    tokio::time::timeout(Duration::from_secs(30), put)
        .await
        .expect("put-token: no answer in 30 s (fe2o3-amqp's lost first credit?)")
        .unwrap();
    let mut rx = Receiver::builder()
        .name("bare-receiver")
        .source(QUEUE)
        .receiver_settle_mode(ReceiverSettleMode::First)
        .credit_mode(CreditMode::Manual)
        .auto_accept(false)
        .attach(&mut session)
        .await
        .unwrap();
    // complete every half prefetch, then grant the whole prefetch again, so that messages keep
    // arriving while a completion is on its way (completing only when the credit is used up
    // would stall the link once per batch)
    let (prefetch, batch) = (prefetch(), prefetch() as usize / 2);
    rx.set_credit(prefetch).await.unwrap();
    let mut held = Vec::with_capacity(batch);
    let mut got = 0u64;
    while got < n {
        let d = match tokio::time::timeout(Duration::from_secs(60), rx.recv::<Body<Value>>()).await {
            Ok(d) => d.unwrap(),
            Err(_) => panic!(
                "the bare receiver got nothing for 60 s after {got} of {n} messages (credit {}); emulator: {:?}",
                rx.credit(),
                emu.stats(QUEUE).unwrap()
            ),
        };
        got += 1;
        let (info, _msg) = d.into_parts();
        held.push(info);
        if held.len() == batch || got == n {
            rx.accept_all(held.drain(..)).await.unwrap();
            // nothing is held now: the whole prefetch again (what was granted and not yet
            // delivered counts in it), so the link never runs dry while completions travel
            rx.set_credit(prefetch).await.unwrap();
        }
    }
    let took = wait_completed(emu, base, n, start).await;
    let _ = rx.close().await;
    let _ = conn.close().await;
    took
}

fn sas(uri: &str, key_name: &str, key: &str, expiry: i64) -> String {
    use base64::Engine;
    use hmac::Mac;
    const SET: &percent_encoding::AsciiSet =
        &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');
    let enc = |s: &str| percent_encoding::utf8_percent_encode(s, SET).to_string();
    let sr = enc(uri);
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(format!("{sr}\n{expiry}").as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    format!("SharedAccessSignature sr={sr}&sig={}&se={expiry}&skn={}", enc(&sig), enc(key_name))
}

/// `centralflow run pipelines/servicebus-to-parquet.yaml` until the emulator has all `n`
/// messages completed, then SIGTERM.
async fn centralflow(emu: &Emulator, n: u64, dir: &Path) -> (Duration, Duration) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let _ = std::fs::remove_dir_all(dir);
    let base = emu.stats(QUEUE).unwrap().completed;
    let start = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_centralflow"))
        // SB_BENCH_PIPELINE: another pipeline file, to take the run apart (not for the figures)
        .args([
            "run",
            &std::env::var("SB_BENCH_PIPELINE")
                .unwrap_or_else(|_| root.join("pipelines/servicebus-to-parquet.yaml").display().to_string()),
        ])
        .env("SERVICEBUS_CONNECTION_STRING", emu.connection_string())
        .env("SERVICEBUS_QUEUE", QUEUE)
        .env("SERVICEBUS_PREFETCH", prefetch().to_string())
        .env("CENTRALFLOW_OUTPUT", dir.join("out"))
        .env("CENTRALFLOW_STATE", dir.join("state"))
        .env("CENTRALFLOW_API_ADDRESS", "127.0.0.1:0")
        .env("CENTRALFLOW_LOG", std::env::var("SB_BENCH_LOG").unwrap_or_else(|_| "warn".into()))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let took = wait_completed(emu, base, n, start).await;
    let cpu = cpu_of(child.id());
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "centralflow failed: {:?}", out.status);
    (took, cpu)
}

/// Rows in the raw archive.
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
    let env = |k: &str, d: u64| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let n = if bench { env("SB_BENCH_N", 100_000) } else { 3_000 };
    let runs = if bench { env("SB_BENCH_RUNS", 3) as usize } else { 1 };
    let cfg: centralflow::sources::simulator::SimulatorConfig = serde_json::from_value(serde_json::json!({
        "devices": 2000, "rate": 1000.0, "count": n, "start": "2026-11-01T00:00:00Z", "seed": 9
    }))
    .unwrap();
    let g = centralflow::sources::simulator::Generator::new(cfg, 0).unwrap();
    let bodies: Vec<Vec<u8>> = (0..n).map(|i| g.message(i).into_bytes()).collect();
    let bytes: usize = bodies.iter().map(Vec::len).sum();
    let work = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let emu = rt.block_on(Emulator::start(Config::new().queue(QUEUE).lock_duration(Duration::from_secs(60)))).unwrap();
    // per run: (wall, CPU of this process = emulator [+ bare receiver], CPU of centralflow)
    let (mut b, mut c) = (Vec::new(), Vec::new());
    for run in 0..runs {
        fill(&emu, &bodies);
        let cpu0 = self_cpu();
        let wall = rt.block_on(bare(&emu, n));
        b.push((wall, self_cpu() - cpu0, Duration::ZERO));
        fill(&emu, &bodies);
        let dir = work.path().join(format!("run-{run}"));
        let cpu0 = self_cpu();
        let (wall, cf_cpu) = rt.block_on(centralflow(&emu, n, &dir));
        c.push((wall, self_cpu() - cpu0, cf_cpu));
        if std::env::var_os("SB_BENCH_PIPELINE").is_none() {
            assert_eq!(raw_rows(&dir), n as usize, "the raw archive holds every message once");
        }
    }
    b.sort();
    c.sort();
    let ((b, b_emu, _), (c, c_emu, c_cpu)) = (b[b.len() / 2], c[c.len() / 2]);
    let us = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    if !bench {
        println!("Service Bus check (cargo test, not a measurement)");
    }
    println!(
        "{n} messages ({:.0} bytes each) through the Service Bus emulator, prefetch {}, median of {runs}\n",
        bytes as f64 / n as f64,
        prefetch()
    );
    println!("| | drain s | messages/s | CPU µs per message: receiver | emulator |");
    println!("|---|---|---|---|---|");
    // the bare receiver runs in this process, beside the emulator: their CPU is one figure
    println!(
        "| bare fe2o3-amqp peek-lock receiver (completes every half prefetch) | {:.2} | {:.0} | {:.1} (with the emulator) | |",
        b.as_secs_f64(),
        rate(b),
        us(b_emu)
    );
    println!(
        "| centralflow servicebus-to-parquet (end to end) | {:.2} | {:.0} | {:.1} | {:.1} |",
        c.as_secs_f64(),
        rate(c),
        us(c_cpu),
        us(c_emu)
    );
    println!("| centralflow / bare | | {:.2} | | |", rate(c) / rate(b));
}
