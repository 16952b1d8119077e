//! Helpers for the integration tests: running the binary, temporary folders, the object-store
//! peers (Azurite, moto) that `scripts/test` starts, and reading Parquet back.
#![allow(dead_code)]

pub mod amqp_pipeline;
pub mod blob_export;
pub mod eventhubs_pipeline;
pub mod servicebus_pipeline;
pub mod tls;
pub mod transformed;

// The emulators live in the `emulators` crate (also run as programs by the examples); the tests
// keep their old paths (each test binary uses some of them).
#[allow(unused_imports)]
pub use centralflow_emulators::eventhubs as eventhubs_emulator;
#[allow(unused_imports)]
pub use centralflow_emulators::iotcentral as iotc_emulator;
#[allow(unused_imports)]
pub use centralflow_emulators::servicebus as servicebus_emulator;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use arrow_array::RecordBatch;

/// Whole lines in a file a running pipeline writes (JSONL): while it writes, or after a SIGKILL
/// (a restart truncates the file to what was committed), the file may end in part of a line,
/// so only newline-terminated lines count and nothing is parsed.
pub fn count_lines(p: &Path) -> usize {
    std::fs::read(p).map(|b| b.iter().filter(|&&c| c == b'\n').count()).unwrap_or(0)
}

/// The `centralflow` binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_centralflow"))
}

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A `centralflow` command with the test defaults: the operations endpoint on a free port.
pub fn cmd(args: &[&str]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(args).current_dir(root()).env("CENTRALFLOW_API_ADDRESS", "127.0.0.1:0");
    cmd
}

/// Runs `centralflow ARGS` with extra environment, waiting at most `timeout`.
pub fn run(args: &[&str], env: &[(&str, &str)], timeout: Duration) -> Output {
    let mut cmd = cmd(args);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawn centralflow");
    wait_output(child, timeout)
}

/// Sends a signal to a child process.
pub fn signal(child: &Child, sig: i32) {
    // SAFETY: sending a signal to our own child process.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// Waits for a child with a deadline (killing it past the deadline). Its piped stdout and
/// stderr are read meanwhile, so that a child writing more than a pipe holds never blocks.
pub fn wait_output(mut child: Child, timeout: Duration) -> Output {
    fn drain<R: Read + Send + 'static>(r: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    }
    let (out, err) = (drain(child.stdout.take()), drain(child.stderr.take()));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "centralflow did not finish within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.join().unwrap()),
                String::from_utf8_lossy(&err.join().unwrap())
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output { status, stdout: out.join().unwrap(), stderr: err.join().unwrap() }
}

/// Asserts success and returns stderr (where the summary goes).
pub fn ok(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success(),
        "centralflow failed ({:?})\nstdout:\n{}\nstderr:\n{err}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    err
}

/// Writes a pipeline file into `dir` and returns its path.
pub fn pipeline(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, yaml).unwrap();
    p
}

/// Every `*.parquet` file below `dir` (not staged ones), sorted.
pub fn parquet_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                out.push(p);
            }
        }
    }
    walk(dir, &mut out);
    out.sort();
    out
}

/// Per-device window rows of a folder of Parquet files: (deviceId, window_start) -> the rest of
/// the row; a window written twice fails the test.
pub fn window_rows(dir: &Path) -> BTreeMap<(String, String), String> {
    let mut m = BTreeMap::new();
    for f in parquet_files(dir) {
        for b in read_parquet_bytes(bytes::Bytes::from(std::fs::read(&f).unwrap())) {
            for mut r in batch_rows(&b) {
                let key = (r.remove("deviceId").unwrap(), r.remove("window_start").unwrap());
                let prev = m.insert(key.clone(), format!("{r:?}"));
                assert!(prev.is_none(), "window {key:?} emitted twice");
            }
        }
    }
    m
}

/// Reads Parquet bytes into record batches.
pub fn read_parquet_bytes(bytes: bytes::Bytes) -> Vec<RecordBatch> {
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
        .expect("a valid Parquet file")
        .build()
        .unwrap();
    reader.map(|b| b.unwrap()).collect()
}

/// Reads every Parquet file below a local folder as rows of `column -> display value`.
pub fn read_rows(dir: &Path) -> Vec<BTreeMap<String, String>> {
    let mut rows = Vec::new();
    for f in parquet_files(dir) {
        for b in read_parquet_bytes(bytes::Bytes::from(std::fs::read(&f).unwrap())) {
            rows.extend(batch_rows(&b));
        }
    }
    rows
}

/// Record batch rows as `column -> display value` (nulls absent).
/// Timestamps are rendered as RFC 3339 UTC (`2026-11-01T00:00:00.123Z`).
pub fn batch_rows(b: &RecordBatch) -> Vec<BTreeMap<String, String>> {
    use arrow_array::{Array, TimestampNanosecondArray};
    let schema = b.schema();
    let cols: Vec<Box<dyn Fn(usize) -> String + '_>> = b
        .columns()
        .iter()
        .map(|c| -> Box<dyn Fn(usize) -> String + '_> {
            if let arrow_schema::DataType::Timestamp(_, tz) = c.data_type() {
                // any unit, as nanoseconds
                let ns = arrow_schema::DataType::Timestamp(arrow_schema::TimeUnit::Nanosecond, tz.clone());
                let ts = arrow_cast::cast(c.as_ref(), &ns).unwrap();
                let ts = ts.as_any().downcast_ref::<TimestampNanosecondArray>().unwrap().clone();
                Box::new(move |i| centralflow::time::format_rfc3339(ts.value(i)))
            } else {
                let f = arrow_cast::display::ArrayFormatter::try_new(c.as_ref(), &Default::default()).unwrap();
                Box::new(move |i| f.value(i).to_string())
            }
        })
        .collect();
    (0..b.num_rows())
        .map(|i| {
            let mut row = BTreeMap::new();
            for (j, f) in cols.iter().enumerate() {
                if b.column(j).is_valid(i) {
                    row.insert(schema.field(j).name().clone(), f(i));
                }
            }
            row
        })
        .collect()
}

/// Generates an export file with `centralflow simulate`.
pub fn simulate(path: &Path, count: u64, devices: u32, seed: u64) {
    let out = run(
        &[
            "simulate",
            "--count",
            &count.to_string(),
            "--devices",
            &devices.to_string(),
            "--seed",
            &seed.to_string(),
            "--rate",
            "200",
            "--out",
            path.to_str().unwrap(),
        ],
        &[],
        Duration::from_secs(120),
    );
    ok(&out);
}

// ------------------------------------------------------------------ object-store peers

fn required(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run the tests with scripts/test, which starts Azurite, moto and RabbitMQ")
    })
}

/// The well-known Azurite account key (public, documented by Microsoft).
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Azurite's blob endpoint (`http://127.0.0.1:PORT/devstoreaccount1`).
pub fn azurite_endpoint() -> String {
    required("CENTRALFLOW_TEST_AZURITE")
}

/// Environment for a centralflow process that talks to Azurite.
pub fn azurite_env() -> Vec<(String, String)> {
    azurite_env_at(&azurite_endpoint())
}

/// Environment for a centralflow process that talks to the Azurite at `endpoint`.
pub fn azurite_env_at(endpoint: &str) -> Vec<(String, String)> {
    vec![
        ("AZURE_STORAGE_ACCOUNT_NAME".into(), "devstoreaccount1".into()),
        ("AZURE_STORAGE_ACCOUNT_KEY".into(), AZURITE_KEY.into()),
        ("AZURE_STORAGE_ENDPOINT".into(), endpoint.to_string()),
        ("AZURE_ALLOW_HTTP".into(), "true".into()),
    ]
}

/// Object-store options for Azurite (for opening stores inside the test process).
pub fn azurite_options() -> BTreeMap<String, String> {
    azurite_env().into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v)).collect()
}

/// Creates a container in Azurite (object_store cannot): a SharedKey-signed REST call.
pub fn azurite_create_container(name: &str) {
    azurite_create_container_at(&azurite_endpoint(), name)
}

/// Creates a container in the Azurite at `endpoint`.
pub fn azurite_create_container_at(endpoint: &str, name: &str) {
    use base64::Engine as _;
    use hmac::Mac as _;
    let url = url::Url::parse(endpoint).unwrap();
    let path = format!("{}/{name}", url.path().trim_end_matches('/'));
    let date = httpdate();
    let version = "2021-08-06";
    let to_sign = format!(
        "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/devstoreaccount1{path}\nrestype:container"
    );
    let key = base64::engine::general_purpose::STANDARD.decode(AZURITE_KEY).unwrap();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(to_sign.as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let req = format!(
        "PUT {path}?restype=container HTTP/1.1\r\nHost: {}:{}\r\nx-ms-date: {date}\r\nx-ms-version: {version}\r\nAuthorization: SharedKey devstoreaccount1:{sig}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        url.host_str().unwrap(),
        url.port().unwrap()
    );
    let status = http(&url, &req);
    assert!(status == 201 || status == 409, "creating container {name}: HTTP {status}");
}

fn httpdate() -> String {
    chrono::Utc::now().format("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

/// Sends a raw HTTP/1.1 request and returns the status code.
fn http(url: &url::Url, req: &str) -> u16 {
    let mut s = TcpStream::connect((url.host_str().unwrap(), url.port().unwrap())).expect("connect");
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// moto's S3 endpoint.
pub fn s3_endpoint() -> String {
    required("CENTRALFLOW_TEST_S3")
}

/// Environment for a centralflow process that talks to moto.
pub fn s3_env() -> Vec<(String, String)> {
    s3_env_at(&s3_endpoint())
}

/// Environment for a centralflow process that talks to the moto at `endpoint`.
pub fn s3_env_at(endpoint: &str) -> Vec<(String, String)> {
    vec![
        ("AWS_ENDPOINT".into(), endpoint.to_string()),
        ("AWS_ALLOW_HTTP".into(), "true".into()),
        ("AWS_ACCESS_KEY_ID".into(), "testing".into()),
        ("AWS_SECRET_ACCESS_KEY".into(), "testing".into()),
        ("AWS_REGION".into(), "us-east-1".into()),
        ("AWS_VIRTUAL_HOSTED_STYLE_REQUEST".into(), "false".into()),
    ]
}

/// Object-store options for moto.
pub fn s3_options() -> BTreeMap<String, String> {
    s3_env().into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v)).collect()
}

/// Creates a bucket in moto.
pub fn s3_create_bucket(name: &str) {
    s3_create_bucket_at(&s3_endpoint(), name)
}

/// Creates a bucket in the moto at `endpoint`.
pub fn s3_create_bucket_at(endpoint: &str, name: &str) {
    let url = url::Url::parse(endpoint).unwrap();
    let req = format!(
        "PUT /{name} HTTP/1.1\r\nHost: {}:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        url.host_str().unwrap(),
        url.port().unwrap()
    );
    let status = http(&url, &req);
    assert!(status == 200 || status == 409, "creating bucket {name}: HTTP {status}");
}

/// A name unique to this test run (containers, buckets, prefixes).
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}{}", std::process::id(), rand_suffix())
}

fn rand_suffix() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    (h.finish() % 1_000_000) as u32
}

/// Environment pairs as `&str` pairs.
pub fn env_refs(v: &[(String, String)]) -> Vec<(&str, &str)> {
    v.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect()
}

// ------------------------------------------------------------------ RabbitMQ

/// The broker `scripts/test` makes sure of.
pub fn amqp_url() -> String {
    required("CENTRALFLOW_TEST_AMQP")
}

/// Publishes bodies to a (declared, durable) queue with publisher confirms.
pub async fn amqp_publish(queue: &str, bodies: impl IntoIterator<Item = Vec<u8>>) -> usize {
    use lapin::options::*;
    let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
        .await
        .expect("connect to RabbitMQ");
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(queue.into(), QueueDeclareOptions { durable: true, ..Default::default() }, Default::default())
        .await
        .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let mut n = 0;
    let mut pending = Vec::new();
    for body in bodies {
        let props = lapin::BasicProperties::default().with_delivery_mode(2).with_headers(
            lapin::types::FieldTable::from(std::collections::BTreeMap::from([(
                "iotcentral-application-id".into(),
                lapin::types::AMQPValue::LongString("6e9d8f3c".into()),
            )])),
        );
        pending.push(
            ch.basic_publish("".into(), queue.into(), BasicPublishOptions::default(), &body, props).await.unwrap(),
        );
        n += 1;
        if pending.len() >= 2000 {
            for p in pending.drain(..) {
                assert!(p.await.unwrap().is_ack());
            }
        }
    }
    for p in pending.drain(..) {
        assert!(p.await.unwrap().is_ack());
    }
    let _ = conn.close(200, "done".into()).await;
    n
}

/// The lines of a file, as message bodies.
pub fn file_bodies(path: &Path) -> Vec<Vec<u8>> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| l.as_bytes().to_vec()).collect()
}

/// Empties `queue` (deleting it) and publishes `bodies` to it.
pub fn amqp_refill(queue: &str, bodies: Vec<Vec<u8>>) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(amqp_delete(queue));
    rt.block_on(amqp_publish(queue, bodies));
}

pub fn amqp_depth(queue: &str) -> (u64, u64) {
    let out = Command::new("rabbitmqctl")
        .args(["list_queues", "-q", "name", "messages_ready", "messages_unacknowledged"])
        .output()
        .expect("rabbitmqctl");
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() == 3 && f[0] == queue {
            return (f[1].parse().unwrap_or(0), f[2].parse().unwrap_or(0));
        }
    }
    (0, 0)
}

/// Takes every message of a queue: (headers as strings, body).
pub async fn amqp_drain(queue: &str) -> Vec<(BTreeMap<String, String>, Vec<u8>)> {
    use lapin::options::*;
    let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut out = Vec::new();
    while let Some(msg) = ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await.unwrap() {
        let mut headers = BTreeMap::new();
        if let Some(h) = msg.delivery.properties.headers() {
            for (k, v) in h.inner() {
                let v = match v {
                    lapin::types::AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).to_string(),
                    other => format!("{other:?}"),
                };
                headers.insert(k.to_string(), v);
            }
        }
        out.push((headers, msg.delivery.data));
    }
    let _ = conn.close(200, "done".into()).await;
    out
}

/// Deletes a queue (and its dead-letter queue).
pub async fn amqp_delete(queue: &str) {
    use lapin::options::*;
    if let Ok(conn) = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default()).await {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch.queue_delete(queue.into(), QueueDeleteOptions::default()).await;
            let _ =
                ch.queue_delete(format!("{queue}.dead-letter").as_str().into(), QueueDeleteOptions::default()).await;
        }
        let _ = conn.close(200, "done".into()).await;
    }
}

/// The shipped pipeline files (`pipelines/*.yaml`, not their `*.test.yaml` files), sorted.
pub fn shipped_pipelines() -> Vec<PathBuf> {
    let dir = root().join("pipelines");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            name.ends_with(".yaml") && !name.ends_with(".test.yaml")
        })
        .collect();
    files.sort();
    files
}

// ------------------------------------------------------------------ a running process's log

/// A running `centralflow` whose stderr is collected as it comes, so that a test can wait for a
/// log line (observable state) instead of sleeping, and read the operations endpoint's address
/// from the log (the endpoint binds `127.0.0.1:0`: no port is picked, released and bound later).
pub struct Logged {
    pub child: Child,
    log: std::sync::Arc<std::sync::Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Logged {
    /// Spawns `cmd` with stderr collected (stdout discarded).
    pub fn spawn(mut cmd: Command) -> Logged {
        use std::io::BufRead;
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn centralflow");
        let stderr = child.stderr.take().unwrap();
        let log: std::sync::Arc<std::sync::Mutex<String>> = Default::default();
        let sink = log.clone();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        Logged { child, log, reader: Some(reader) }
    }

    /// What the process has written to stderr so far.
    pub fn text(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the log contains `needle` (failing if the process exits first); returns the
    /// line it is on.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            if let Some(l) = self.text().lines().find(|l| l.contains(needle)) {
                return l.to_string();
            }
            let exited = self.child.try_wait().unwrap();
            assert!(
                exited.is_none() && start.elapsed() < timeout,
                "no log line with {needle:?} within {timeout:?} (exit: {exited:?}):\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The operations endpoint's address (`127.0.0.1:PORT`), from its log line.
    pub fn api(&mut self) -> String {
        let line = self.wait_for("metrics and health on http://", Duration::from_secs(60));
        let rest = line.split("http://").nth(1).unwrap();
        rest.split(|c: char| c.is_whitespace() || c == '"').next().unwrap().to_string()
    }

    /// Waits for the process to exit (killing it past `timeout`); returns its status and log.
    pub fn finish(mut self, timeout: Duration) -> (std::process::ExitStatus, String) {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                panic!("centralflow did not finish within {timeout:?}:\n{}", self.text());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        (status, self.text())
    }

    /// SIGTERM, then [`Logged::finish`]; asserts success and returns the log.
    pub fn stop(self, timeout: Duration) -> String {
        signal(&self.child, libc::SIGTERM);
        let (status, log) = self.finish(timeout);
        assert!(status.success(), "centralflow failed ({status:?}):\n{log}");
        log
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        // a failed test must not leave the process running
        let _ = self.child.kill();
    }
}

/// `GET http://{addr}{path}` over a plain socket: (status, body).
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((status, body))
}

/// The value of the first sample of `/metrics` named `name` whose labels contain `label`.
pub fn metric_value(addr: &str, name: &str, label: &str) -> Option<f64> {
    let (_, text) = http_get(addr, "/metrics")?;
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.trim().parse().ok())
}

/// Waits until `f` holds, polling every 50 ms; fails with `what` past `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
