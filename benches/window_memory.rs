//! Memory per open (group, window) state: 100,000 devices, each with one open 1-minute window
//! over 5 aggregated telemetry fields, measured with a counting allocator (live heap bytes
//! after the events are gone, minus before), for plain aggregates and with a quantile sketch.
//! And memory per device of `device_context`: 100,000 devices with 20 reported properties each.
//!
//!   cargo bench --bench window_memory
//!
//! Under `cargo test` (no `--bench`) it runs 2,000 devices, as a check.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use centralflow::event::Batch;
use centralflow::metrics::ComponentMetrics;
use centralflow::runtime::{Emitter, Transform};
use centralflow::transforms::device_context::{DeviceContext, DeviceContextConfig};
use centralflow::transforms::window::{Window, WindowConfig};

/// The system allocator, counting live bytes.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const FIELDS: [&str; 5] = ["temperature", "humidity", "pressure", "battery", "co2"];

fn measure(devices: usize, aggregates: &str) -> (f64, usize) {
    let yaml = format!(
        "inputs: [x]\nwindow: {{kind: tumbling, size: 1m}}\naggregates: {{{}}}\n",
        FIELDS.iter().map(|f| format!("{f}: {aggregates}")).collect::<Vec<_>>().join(", ")
    );
    let cfg: WindowConfig = serde_saphyr::from_str(&yaml).unwrap();
    let before = LIVE.load(Ordering::Relaxed);
    let mut w = Window::from_config(&cfg, "mem", ComponentMetrics::new("mem", "window")).unwrap();
    for chunk in (0..devices).collect::<Vec<_>>().chunks(4096) {
        let events = chunk
            .iter()
            .map(|d| {
                let tele: Vec<String> =
                    FIELDS.iter().enumerate().map(|(i, f)| format!(r#""{f}":{}.{}"#, 20 + i, d % 97)).collect();
                let json = format!(
                    r#"{{"messageSource":"telemetry","deviceId":"device-{d:06}","enqueuedTime":"2026-11-01T00:00:{:02}.{:03}Z","telemetry":{{{}}}}}"#,
                    d % 60,
                    d % 1000,
                    tele.join(",")
                );
                centralflow::model::decode::decode_one(bytes::Bytes::from(json)).unwrap()
            })
            .collect();
        let mut out = Emitter::new(&["", "late", "dead_letter"]);
        w.process(Batch::new(events), &mut out);
        assert!(out.take().iter().all(Vec::is_empty), "every window stays open");
    }
    assert_eq!(w.open_states(), devices);
    let live = LIVE.load(Ordering::Relaxed) - before;
    (live as f64 / devices as f64, w.state_bytes())
}

/// Live heap bytes per device of `device_context` state: every device has reported `props`
/// properties (short string values, as firmware versions and serial numbers are) and has been
/// asked for its `device` object once (which is cached).
fn measure_context(devices: usize, props: usize) -> (f64, usize) {
    let cfg: DeviceContextConfig = serde_saphyr::from_str("{inputs: [x], allowed_lateness: 0s}").unwrap();
    let metrics = ComponentMetrics::new("ctx", "device_context");
    let cx = centralflow::runtime::BuildCx {
        pipeline: "p",
        name: "ctx",
        mode: centralflow::runtime::Mode::Replay,
        restored: None,
        state: None,
        instance: "i",
        metrics,
        projection: None,
        partitioned: false,
        first_epoch: 1,
    };
    let before = LIVE.load(Ordering::Relaxed);
    let mut t = DeviceContext::new(&cfg, &cx).unwrap();
    for chunk in (0..devices).collect::<Vec<_>>().chunks(2048) {
        let mut events = Vec::with_capacity(chunk.len() * 2);
        for d in chunk {
            let list: Vec<String> =
                (0..props).map(|p| format!(r#"{{"name":"property{p:02}","value":"v{}.{}"}}"#, d % 7, p)).collect();
            let prop = format!(
                r#"{{"messageSource":"properties","messageType":"devicePropertyReportedChange","deviceId":"device-{d:06}","enqueuedTime":"2026-11-01T00:00:00Z","properties":[{}]}}"#,
                list.join(",")
            );
            let tele = format!(
                r#"{{"messageSource":"telemetry","deviceId":"device-{d:06}","enqueuedTime":"2026-11-01T00:00:01Z","telemetry":{{"t":1}}}}"#
            );
            for j in [prop, tele] {
                events.push(centralflow::model::decode::decode_one(bytes::Bytes::from(j)).unwrap());
            }
        }
        let mut out = Emitter::new(&["", "dead_letter"]);
        t.process(Batch::new(events), &mut out);
        t.on_end(true, &mut out);
        assert_eq!(out.take()[0].len(), chunk.len(), "each telemetry event out, enriched");
    }
    assert_eq!(t.devices(), devices);
    let live = LIVE.load(Ordering::Relaxed) - before;
    (live as f64 / devices as f64, t.state_bytes())
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let devices = if bench { 100_000 } else { 2_000 };
    println!("open (device, 1-minute window) states: {devices} devices x {} aggregated fields\n", FIELDS.len());
    println!("| aggregates per field | live heap bytes per open window | of which accumulators and keys |");
    println!("|---|---|---|");
    // bounds around the measured figures (README: 262, 367 and 6,200 bytes at 100,000 devices;
    // 222, 299 and 6,695 at 2,000): a state that grows by half again, or a measurement that
    // counts nothing, fails; so does an order that no longer holds (more aggregates cost more)
    let mut last = 0.0;
    for (aggs, low, high) in [
        ("[avg, min, max]", 150.0, 400.0),
        ("[count, sum, avg, min, max, stddev]", 200.0, 550.0),
        ("[avg, p95]", 3_000.0, 10_000.0),
    ] {
        let (per, state) = measure(devices, aggs);
        let state_per = state as f64 / devices as f64;
        println!("| `{aggs}` | {per:.0} | {state_per:.0} |");
        assert!((low..high).contains(&per), "{aggs}: {per:.0} bytes per window, expected {low}..{high}");
        assert!(state_per > 0.0 && state_per <= per * 1.1, "{aggs}: the state estimate {state_per:.0} of {per:.0}");
        assert!(per > last, "{aggs}: {per:.0} bytes per window, no more than with fewer aggregates ({last:.0})");
        last = per;
    }
    let props = 20;
    println!("\ndevice_context: {devices} devices x {props} reported properties\n");
    println!("| live heap bytes per device | of which device states (estimate) |");
    println!("|---|---|");
    let (per, state) = measure_context(devices, props);
    let state_per = state as f64 / devices as f64;
    println!("| {per:.0} | {state_per:.0} |");
    // README: 3,667 bytes per device at 100,000 devices (3,792 at 2,000), 2,431 of them states
    assert!((2_500.0..5_500.0).contains(&per), "{per:.0} bytes per device, expected 2,500..5,500");
    assert!(state_per > 1_000.0 && state_per <= per, "the state estimate {state_per:.0} of {per:.0}");
}
