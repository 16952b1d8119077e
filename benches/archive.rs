//! The archive path side by side (issue 18): `centralflow replay` of an export file to raw
//! Parquet and to a Delta table (telemetry only, no partitions, zstd, typed columns for three
//! readings) against DuckDB's `COPY (SELECT ... FROM read_json(...)) TO ... (FORMAT parquet)`
//! (benches/anchors/archive_duckdb.py), same file, 2 threads each, whole processes, alternating
//! runs after a warm-up, medians. Prints wall time, CPU time (and how many cores that kept busy)
//! and peak RSS, and checks that every output holds the same number of rows.
//!
//! Run it with `scripts/bench-w1 archive` (which installs DuckDB and generates the 1,000,000-message
//! file if missing). Environment as benches/w1.rs: `W1_INPUT`, `W1_RUNS` (default 3), `W1_PYTHON`.
//!
//! Under `cargo test` (no `--bench` argument) it is a check rather than a measurement: 20,000
//! generated messages, one run each, and the same comparison of row counts.

use std::path::{Path, PathBuf};

#[path = "common/measure.rs"]
mod measure;
use measure::{anchor, bench_input, median, replay, Measure};

const PIPELINE: &str = r#"name: archive-SINK
sources:
  export:
    type: files
    url: ${CENTRALFLOW_INPUT}
transforms:
  telemetry:
    type: filter
    inputs: [export]
    condition: messageSource == "telemetry"
sinks:
  lake:
    type: SINK
    inputs: [telemetry]
    url: ${CENTRALFLOW_OUTPUT}
    compression: zstd
    columns: {temperature: double, humidity: double, pressure: double}
"#;

/// Rows in the Parquet files under `dir` (or the file `dir`), from their footers.
fn parquet_rows(dir: &Path) -> i64 {
    fn walk(p: &Path, n: &mut i64) {
        if p.is_dir() {
            for e in std::fs::read_dir(p).unwrap().flatten() {
                walk(&e.path(), n);
            }
        } else if p.extension().is_some_and(|e| e == "parquet") {
            use parquet::file::reader::FileReader;
            let r =
                parquet::file::serialized_reader::SerializedFileReader::new(std::fs::File::open(p).unwrap()).unwrap();
            *n += r.metadata().file_metadata().num_rows();
        }
    }
    let mut n = 0;
    walk(dir, &mut n);
    n
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var("W1_PYTHON").map(PathBuf::from).unwrap_or_else(|_| root.join(".venv/bin/python"));
    let bench = std::env::args().any(|a| a == "--bench");
    let work = tempfile::tempdir().unwrap();
    let (input, runs) = bench_input(&root, work.path(), bench);
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_centralflow"));
    let duck_out = work.path().join("duckdb.parquet");
    let mut pipelines = Vec::new();
    for sink in ["parquet", "delta"] {
        let p = work.path().join(format!("{sink}.yaml"));
        std::fs::write(&p, PIPELINE.replace("SINK", sink)).unwrap();
        pipelines.push((sink, p, work.path().join(sink)));
    }
    let centralflow = |p: &Path, out: &Path| replay(&bin, p, &input, out);
    let script = root.join("benches/anchors/archive_duckdb.py");
    let duckdb = || anchor(&python, &script, &input, &duck_out);
    // warm-up, then alternate so that all see the same conditions
    if bench {
        for (_, p, out) in &pipelines {
            centralflow(p, out);
        }
        duckdb();
    }
    let mut ours: Vec<Vec<Measure>> = vec![Vec::new(); pipelines.len()];
    let mut theirs = Vec::new();
    for _ in 0..runs {
        for (i, (_, p, out)) in pipelines.iter().enumerate() {
            ours[i].push(centralflow(p, out));
        }
        theirs.push(duckdb());
    }
    let dk = median(theirs);
    let want = parquet_rows(&duck_out);
    if !bench {
        println!("archive check (cargo test, not a measurement): 20,000 generated messages");
    }
    println!("replay to raw Parquet and Delta over {} ({runs} runs, median; 2 threads each)\n", input.display());
    println!("| | wall s | CPU s | cores busy | peak RSS MiB | wall / DuckDB | rows |");
    println!("|---|---|---|---|---|---|---|");
    let row = |name: &str, m: &Measure, rows: i64| {
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} | {:.0} | {:.2} | {rows} |",
            m.wall.as_secs_f64(),
            m.cpu.as_secs_f64(),
            m.cpu.as_secs_f64() / m.wall.as_secs_f64(),
            m.max_rss_kib as f64 / 1024.0,
            m.wall.as_secs_f64() / dk.wall.as_secs_f64()
        )
    };
    let mut same = true;
    for (i, (sink, _, out)) in pipelines.iter().enumerate() {
        let rows = parquet_rows(out);
        same &= rows == want;
        row(&format!("centralflow `{sink}`"), &median(ours[i].clone()), rows);
    }
    row("DuckDB COPY", &dk, want);
    if !same {
        println!("\nrow counts DIFFER");
        std::process::exit(1);
    }
}
