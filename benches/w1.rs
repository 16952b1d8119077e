//! W1 side by side: centralflow (`replay pipelines/w1-tumbling.yaml`) against DuckDB running the
//! same aggregation (benches/anchors/anchor_duckdb.py), on the same file, both on 2 threads,
//! whole processes, median of several runs after a warm-up. Prints wall time, CPU time and peak
//! RSS of each, the ratios, and checks that both produced the same rows.
//!
//! Run it with `scripts/bench-w1`, which installs DuckDB into .venv and generates the input
//! (1,000,000 messages, seed 7, 5,000 devices: 465 MB) if missing. Environment:
//! `W1_INPUT` (the export file), `W1_RUNS` (default 3), `W1_PYTHON` (default .venv/bin/python).
//!
//! Under `cargo test` (no `--bench` argument) it is a check rather than a measurement: 20,000
//! generated messages, one run each, and the same comparison of the rows.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type, TimestampMicrosecondType, TimestampNanosecondType};
use arrow_array::Array;

#[path = "common/measure.rs"]
mod measure;
use measure::{anchor, bench_input, median, replay};

type Row = (String, i64);

/// (deviceId, window_start in µs) -> [count, 9 aggregates] (a null aggregate as NaN), and the
/// windows written more than once (the map keeps one of them; the check counts them as wrong).
fn read_rows(files: &[PathBuf], count_col: &str) -> (BTreeMap<Row, Vec<f64>>, Vec<Row>) {
    let aggs = [
        "temperature_avg",
        "temperature_min",
        "temperature_max",
        "humidity_avg",
        "humidity_min",
        "humidity_max",
        "pressure_avg",
        "pressure_min",
        "pressure_max",
    ];
    let mut out = BTreeMap::new();
    let mut twice = Vec::new();
    for f in files {
        let bytes = bytes::Bytes::from(std::fs::read(f).unwrap());
        let reader =
            parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes).unwrap().build().unwrap();
        for b in reader {
            let b = b.unwrap();
            let dev = arrow_cast::cast(b.column_by_name("deviceId").unwrap(), &arrow_schema::DataType::Utf8).unwrap();
            let dev = dev.as_string::<i32>();
            let ws = b.column_by_name("window_start").unwrap();
            let starts: Vec<i64> = if let Some(a) = ws.as_primitive_opt::<TimestampNanosecondType>() {
                (0..a.len()).map(|i| a.value(i) / 1000).collect()
            } else {
                let a = ws.as_primitive::<TimestampMicrosecondType>();
                (0..a.len()).map(|i| a.value(i)).collect()
            };
            let n = b.column_by_name(count_col).unwrap().as_primitive::<Int64Type>().clone();
            let cols: Vec<_> =
                aggs.iter().map(|c| b.column_by_name(c).unwrap().as_primitive::<Float64Type>().clone()).collect();
            for (i, start) in starts.iter().enumerate() {
                let mut v = vec![n.value(i) as f64];
                v.extend(cols.iter().map(|c| if c.is_null(i) { f64::NAN } else { c.value(i) }));
                let key = (dev.value(i).to_string(), *start);
                if out.insert(key.clone(), v).is_some() {
                    twice.push(key);
                }
            }
        }
    }
    (out, twice)
}

/// Whether two values of a row agree: both NaN (null), or within `1e-9` relatively; the
/// relative difference (infinite when only one side is NaN).
fn agree(a: f64, b: f64) -> (bool, f64) {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => (true, 0.0),
        (true, false) | (false, true) => (false, f64::INFINITY),
        (false, false) => {
            let rel = (a - b).abs() / b.abs().max(1e-300);
            (rel <= 1e-9, rel)
        }
    }
}

fn parquet_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    v.sort();
    v
}

fn main() {
    // the comparison itself (harness = false: no #[test] here): a NaN on one side differs
    assert!(agree(f64::NAN, f64::NAN).0 && agree(1.0, 1.0 + 1e-12).0);
    assert!(!agree(f64::NAN, 1.0).0 && !agree(1.0, f64::NAN).0 && !agree(1.0, 1.1).0);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let bench = std::env::args().any(|a| a == "--bench");
    let work = tempfile::tempdir().unwrap();
    let python = std::env::var("W1_PYTHON").map(PathBuf::from).unwrap_or_else(|_| root.join(".venv/bin/python"));
    let (input, runs) = bench_input(&root, work.path(), bench);
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_centralflow"));
    let cf_out = work.path().join("centralflow");
    let duck_out = work.path().join("duckdb.parquet");

    let w1 = root.join("pipelines/w1-tumbling.yaml");
    let centralflow = || replay(&bin, &w1, &input, &cf_out);
    let script = root.join("benches/anchors/anchor_duckdb.py");
    let duckdb = || anchor(&python, &script, &input, &duck_out);
    // warm-up (page cache, lazy loading), then alternate so that both see the same conditions
    if bench {
        centralflow();
        duckdb();
    }
    let (mut cf, mut dk) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        cf.push(centralflow());
        dk.push(duckdb());
    }
    let (cf, dk) = (median(cf), median(dk));

    // same rows?
    let (ours, ours_twice) = read_rows(&parquet_files(&cf_out), "count");
    let (theirs, theirs_twice) = read_rows(std::slice::from_ref(&duck_out), "n");
    let mut worst = 0.0f64;
    let mut mismatches = 0;
    for (k, v) in &theirs {
        match ours.get(k) {
            Some(o) => {
                assert_eq!(o.len(), v.len());
                for (a, b) in o.iter().zip(v) {
                    let (ok, rel) = agree(*a, *b);
                    worst = worst.max(rel);
                    if !ok {
                        mismatches += 1;
                    }
                }
            }
            None => mismatches += 1,
        }
    }
    if !ours_twice.is_empty() || !theirs_twice.is_empty() {
        println!("windows written more than once: centralflow {ours_twice:?}, DuckDB {theirs_twice:?}");
    }
    let same = !theirs.is_empty()
        && ours.len() == theirs.len()
        && mismatches == 0
        && ours_twice.is_empty()
        && theirs_twice.is_empty();

    let mib = |k: i64| k as f64 / 1024.0;
    if !bench {
        println!("W1 check (cargo test, not a measurement): 20,000 generated messages");
    }
    println!("W1 over {} ({} runs, median; 2 threads each)\n", input.display(), runs);
    println!("| | wall s | CPU s | peak RSS MiB |");
    println!("|---|---|---|---|");
    println!(
        "| centralflow | {:.2} | {:.2} | {:.0} |",
        cf.wall.as_secs_f64(),
        cf.cpu.as_secs_f64(),
        mib(cf.max_rss_kib)
    );
    println!("| DuckDB | {:.2} | {:.2} | {:.0} |", dk.wall.as_secs_f64(), dk.cpu.as_secs_f64(), mib(dk.max_rss_kib));
    println!(
        "| centralflow / DuckDB | {:.2} | {:.2} | {:.2} |",
        cf.wall.as_secs_f64() / dk.wall.as_secs_f64(),
        cf.cpu.as_secs_f64() / dk.cpu.as_secs_f64(),
        cf.max_rss_kib as f64 / dk.max_rss_kib as f64
    );
    println!(
        "\nrows: centralflow {}, DuckDB {}; {} (largest relative difference {:.1e})",
        ours.len(),
        theirs.len(),
        if same { "identical within 1e-9" } else { "DIFFERENT" },
        worst
    );
    if !same {
        std::process::exit(1);
    }
}
