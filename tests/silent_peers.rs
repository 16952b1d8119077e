//! A peer that accepts connections and never answers (a stuck proxy, a half-open firewall, or an
//! AMQP stack that missed a wakeup) must not stall a source for good: the Service Bus and Event
//! Hubs sources give up on an attempt after `connect_timeout`, say why, and connect again.

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// Accepts every connection and reads what comes, never writing. Counts the connections.
fn black_hole() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            count.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    (port, accepted)
}

/// Runs the pipeline until the black hole has seen three connections (the first attempt given
/// up on and two more), then stops it; returns its log.
fn three_attempts(source: &str, connection_string: &str, accepted: &AtomicUsize) -> String {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "name: silent\nsources:\n  src:\n{source}sinks:\n  out:\n    type: jsonl\n    inputs: [src]\n    path: {}\ncheckpoint:\n  url: {}\n",
        dir.path().join("out.jsonl").display(),
        dir.path().join("state").display()
    );
    let file = pipeline(dir.path(), "silent.yaml", &yaml);
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    let mut child = cmd(&["run", file.to_str().unwrap()])
        .env("CENTRALFLOW_LOG", "info")
        .env("SILENT_CONNECTION_STRING", connection_string)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let start = Instant::now();
    while accepted.load(Ordering::SeqCst) < 3 {
        let text = std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
        if let Some(status) = child.try_wait().unwrap() {
            panic!("centralflow exited ({status}):\n{text}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{} connection(s) in 60 s: an attempt never gave up\n{text}",
            accepted.load(Ordering::SeqCst)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    signal(&child, libc::SIGTERM);
    let out = wait_output(child, Duration::from_secs(30));
    let text = std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
    assert!(out.status.success(), "{:?}\n{text}", out.status);
    text
}

#[test]
fn servicebus_gives_up_on_a_silent_peer_and_connects_again() {
    let (port, accepted) = black_hole();
    let source = "    type: servicebus\n    connection_string: ${SILENT_CONNECTION_STRING}\n    queue: q\n    connect_timeout: 1s\n";
    let cs = format!(
        "Endpoint=sb://127.0.0.1:{port}/;SharedAccessKeyName=k;SharedAccessKey=a2V5;UseDevelopmentEmulator=true"
    );
    let log = three_attempts(source, &cs, &accepted);
    assert!(log.contains("cannot reach Service Bus") && log.contains("no answer in 1s"), "{log}");
}

#[test]
fn eventhubs_gives_up_on_a_silent_peer_and_connects_again() {
    let (port, accepted) = black_hole();
    let dir = tempfile::tempdir().unwrap();
    let source = format!(
        "    type: eventhubs\n    connection_string: ${{SILENT_CONNECTION_STRING}}\n    endpoint: amqp://127.0.0.1:{port}\n    checkpoint_store: {}\n    connect_timeout: 1s\n",
        dir.path().display()
    );
    let cs = "Endpoint=sb://emulator.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=a2V5;EntityPath=hub";
    let log = three_attempts(&source, cs, &accepted);
    assert!(log.contains("cannot read the event hub's partitions") && log.contains("no answer in 1s"), "{log}");
}
