//! Where the time of W1 goes, stage by stage, on one thread and in memory:
//! decoding (whole and projected), the filter, the window, Parquet encoding.
//!
//!   cargo bench --bench stages [-- EXPORT.jsonl]
//!
//! Without an argument it simulates 200,000 messages like the benchmark file's (20,000 under
//! `cargo test`, which only checks that it runs).

use std::time::{Duration, Instant};

use bytes::Bytes;
use centralflow::event::{Batch, Event};
use centralflow::model::decode::{decode_record_into, decode_record_projected, set_fast_path, Projection};
use centralflow::runtime::{Emitter, Transform};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn per_event(d: Duration, n: usize) -> String {
    format!("{:>7.1} ns/event", d.as_nanos() as f64 / n as f64)
}

fn main() {
    // under `cargo test` (no --bench) a quick check that every stage runs
    let n_sim: u64 = if std::env::args().any(|a| a == "--bench") { 200_000 } else { 20_000 };
    let lines: Vec<Vec<u8>> = match std::env::args().nth(1).filter(|a| !a.starts_with('-')) {
        Some(path) => std::fs::read(&path)
            .unwrap()
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| l.to_vec())
            .take(500_000)
            .collect(),
        None => {
            let cfg: centralflow::sources::simulator::SimulatorConfig = serde_json::from_value(serde_json::json!({
                "devices": 5000, "rate": 277.0, "count": n_sim, "start": "2026-11-01T00:00:00Z", "seed": 7
            }))
            .unwrap();
            let g = centralflow::sources::simulator::Generator::new(cfg, 0).unwrap();
            (0..n_sim).map(|i| g.message(i).into_bytes()).collect()
        }
    };
    let n = lines.len();
    println!(
        "{n} messages, {:.0} bytes each on average",
        lines.iter().map(|l| l.len()).sum::<usize>() as f64 / n as f64
    );

    let proj = std::sync::Arc::new(Projection::new(
        vec!["messageSource".into(), "enqueuedTime".into(), "deviceId".into(), "telemetry".into()],
        Some(vec!["temperature".into(), "humidity".into(), "pressure".into()]),
    ));
    let cx_metrics = centralflow::metrics::ComponentMetrics::new("bench", "stage");
    let plan = centralflow::config::load_str(include_str!("../pipelines/w1-tumbling.yaml"), "w1", &|k| match k {
        "CENTRALFLOW_INPUT" | "CENTRALFLOW_OUTPUT" => Some("/tmp/bench-stages".into()),
        _ => None,
    })
    .unwrap();
    let build = |name: &str| -> Box<dyn Transform> {
        let node = &plan.nodes[plan.node(name).unwrap()];
        let centralflow::config::ComponentConfig::Transform(cfg) = &node.config else { unreachable!() };
        let cx = centralflow::runtime::BuildCx {
            pipeline: "w1",
            name,
            mode: centralflow::runtime::Mode::Replay,
            restored: None,
            state: None,
            instance: "bench",
            metrics: cx_metrics.clone(),
            projection: None,
            partitioned: false,
            first_epoch: 1,
        };
        centralflow::transforms::build(cfg, &cx).unwrap()
    };

    // Steady state, batch by batch, as the pipeline runs (memory is reused, not grown).
    let mut out = Vec::with_capacity(1);
    let (mut t_full, mut t_proj, mut t_serde, mut t_syntax, mut t_drop, mut t_filter, mut t_window) =
        Default::default();
    let mut filter = build("telemetry");
    let mut window = build("per_minute");
    let mut rows = Vec::new();
    let mut passed = 0;
    for chunk in lines.chunks(2048) {
        let t = Instant::now();
        let mut full: Vec<Event> = Vec::with_capacity(chunk.len());
        for l in chunk {
            out.clear();
            decode_record_into(Bytes::copy_from_slice(l), &mut out);
            full.extend(out.drain(..).map(|r| r.unwrap()));
        }
        t_full += t.elapsed();
        let t = Instant::now();
        drop(full);
        t_drop += t.elapsed();
        let t = Instant::now();
        for l in chunk {
            let _: serde::de::IgnoredAny = serde_json::from_slice(l).unwrap();
        }
        t_syntax += t.elapsed();
        let mut decode_projected = |fast: bool, took: &mut Duration| {
            set_fast_path(fast);
            let t = Instant::now();
            let mut projected: Vec<Event> = Vec::with_capacity(chunk.len());
            for l in chunk {
                out.clear();
                decode_record_projected(Bytes::copy_from_slice(l), Some(&proj), &mut out);
                projected.extend(out.drain(..).map(|r| r.unwrap()));
            }
            *took += t.elapsed();
            set_fast_path(true);
            projected
        };
        drop(decode_projected(false, &mut t_serde));
        let projected = decode_projected(true, &mut t_proj);
        let t = Instant::now();
        let mut em = Emitter::new(&["", "dead_letter"]);
        filter.process(Batch::new(projected), &mut em);
        let kept = em.take().swap_remove(0);
        t_filter += t.elapsed();
        passed += kept.len();
        let t = Instant::now();
        let mut em = Emitter::new(&["", "late", "dead_letter"]);
        window.process(Batch::new(kept), &mut em);
        rows.extend(em.take().swap_remove(0));
        t_window += t.elapsed();
    }
    let t = Instant::now();
    let mut em = Emitter::new(&["", "late", "dead_letter"]);
    window.on_end(true, &mut em);
    rows.extend(em.take().swap_remove(0));
    t_window += t.elapsed();
    println!("decode (whole event)        {}", per_event(t_full, n));
    println!("drop (whole event)          {}", per_event(t_drop, n));
    println!("decode (W1 projection)      {}", per_event(t_proj, n));
    println!("  on the serde_json path    {}", per_event(t_serde, n));
    println!("  serde_json syntax only    {}", per_event(t_syntax, n));
    println!("filter (fast path)          {}", per_event(t_filter, n));
    println!("window incl. drop ({} rows) {}", rows.len(), per_event(t_window, passed));

    let t = Instant::now();
    let refs: Vec<&Event> = rows.iter().collect();
    let schema = centralflow::rows::infer_rows_schema(&refs, false);
    let rb = centralflow::rows::encode_rows(&refs, &schema, false).unwrap();
    let mut buf = Vec::new();
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::ZSTD(Default::default()))
        .build();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut buf, schema, Some(props)).unwrap();
    w.write(&rb).unwrap();
    w.close().unwrap();
    println!("parquet (rows, zstd)        {} per row ({} bytes)", per_event(t.elapsed(), rows.len()), buf.len());
}
