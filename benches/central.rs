//! The `central` sink's throughput to the in-repo IoT Central emulator (DPS + IoT Hub over HTTP
//! on loopback), and how many HTTP requests 1,000 rows take with batching on and off.
//!
//! `cargo bench --bench central` runs the release binary (`centralflow replay`) over generated
//! export files (50,000 rows; 2,000 when `cargo test` runs it): files → central, no rate limit (the sink's `rate_limit` set far above what the
//! machine does), devices registered in a warm-up run first (the registration cache is kept in
//! the checkpoint store), so the measured run only sends. Prints a markdown table.
//! The emulator runs in this process on one thread; on 2 cores it competes with centralflow
//! for the CPU, so the numbers are a floor for a real hub, not a ceiling.

use centralflow_emulators::iotcentral as iotc_emulator;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use iotc_emulator::IotcEmulator;

const SCOPE: &str = "0ne00BENCH0";

fn group_key() -> String {
    base64::engine::general_purpose::STANDARD.encode(b"centralflow benchmark enrollment group!!")
}

/// `rows` telemetry messages, interleaved over `devices` devices, starting at `offset` seconds.
fn write_input(path: &Path, rows: usize, devices: usize, offset: i64) {
    let start = 1_793_491_200i64 + offset;
    let mut text = String::with_capacity(rows * 260);
    for i in 0..rows {
        let t = (start + i as i64) * 1_000_000_000;
        text.push_str(&format!(
            "{{\"applicationId\":\"6e9d8f3c\",\"messageSource\":\"telemetry\",\"deviceId\":\"dev-{:05}\",\"schema\":\"default@v1\",\"templateId\":\"dtmi:bench:s;1\",\"enqueuedTime\":\"{}\",\"telemetry\":{{\"temperature\":{:.2},\"humidity\":{}}},\"enrichments\":{{}}}}\n",
            i % devices,
            centralflow::time::format_rfc3339(t),
            20.0 + (i % 97) as f64 / 4.0,
            i % 50
        ));
    }
    std::fs::write(path, text).unwrap();
}

fn run(dir: &Path, name: &str, input: &Path, transport: &str, emu: &IotcEmulator) -> Duration {
    let yaml = format!(
        "name: {name}\nsources:\n  in:\n    type: files\n    url: {}\nsinks:\n  iotc:\n    type: central\n    inputs: [in]\n    id_scope: {SCOPE}\n    group_key: ${{KEY}}\n    dps_endpoint: {}\n    transport: {transport}\n    creation_time: enqueuedTime\n    measurements: [temperature, humidity]\n    rate_limit: 10000000\n    registrations_per_minute: 10000000\n    concurrency: 32\ncheckpoint:\n  url: {}\n  interval: 5s\n",
        input.display(),
        emu.dps_endpoint(),
        dir.join("state").display()
    );
    let p = dir.join(format!("{name}.yaml"));
    std::fs::write(&p, yaml).unwrap();
    let t0 = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_centralflow"))
        .args(["replay", "--no-progress", p.to_str().unwrap()])
        .env("KEY", group_key())
        .env("CENTRALFLOW_API_ADDRESS", "127.0.0.1:0")
        .output()
        .expect("run centralflow");
    let took = t0.elapsed();
    assert!(out.status.success(), "centralflow failed:\n{}", String::from_utf8_lossy(&out.stderr));
    took
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs it as a quick smoke test
    let rows = if std::env::args().any(|a| a == "--bench") { 50_000 } else { 2_000 };
    let cases: [(&str, usize, usize); 4] =
        [("https_batch", 1_000, rows), ("https", 1_000, rows), ("https_batch", 100, rows), ("https", 100, rows)];
    println!("| transport | devices | rows | seconds | rows/s | HTTP requests per 1,000 rows |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (i, (transport, devices, rows)) in cases.into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let emu = IotcEmulator::start_blocking(SCOPE, &group_key(), 2).unwrap();
        emu.set_registration_limit_per_minute(None);
        emu.set_polls_before_assigned(0);
        // warm-up: register every device (one row each), kept in the registration cache
        let warm = dir.path().join("warm.jsonl");
        write_input(&warm, devices, devices, 0);
        run(dir.path(), &format!("bench{i}"), &warm, transport, &emu);
        assert_eq!(emu.registrations().len(), devices);
        emu.clear_messages();
        let before = emu.requests().hub;
        let input = dir.path().join("input.jsonl");
        write_input(&input, rows, devices, 1_000_000);
        let took = run(dir.path(), &format!("bench{i}"), &input, transport, &emu);
        let requests = emu.requests().hub - before;
        assert_eq!(emu.messages().len(), rows, "every row arrived");
        assert!(emu.registrations().values().all(|n| *n == 1), "no registration in the measured run");
        println!(
            "| {transport} | {devices} | {rows} | {:.2} | {:.0} | {:.1} |",
            took.as_secs_f64(),
            rows as f64 / took.as_secs_f64(),
            requests as f64 * 1000.0 / rows as f64
        );
    }
}
