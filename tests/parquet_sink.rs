//! The `parquet` sink end to end: layouts, partitions, rolling, atomic commit, graceful stop,
//! exactly-once replay, and object storage (Azurite, moto).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use futures::TryStreamExt;
use object_store::ObjectStoreExt;

const T: Duration = Duration::from_secs(180);

#[test]
fn replay_to_parquet_writes_every_telemetry_message_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("export.jsonl");
    simulate(&input, 50_000, 300, 11);
    let out = dir.path().join("raw");
    let err = ok(&run(
        &["replay", "pipelines/replay-to-parquet.yaml"],
        &[
            ("CENTRALFLOW_INPUT", input.to_str().unwrap()),
            ("CENTRALFLOW_OUTPUT", out.to_str().unwrap()),
            ("CENTRALFLOW_DEAD_LETTERS", dir.path().join("dl.jsonl").to_str().unwrap()),
        ],
        T,
    ));
    // expected: the telemetry messages of the input
    let mut expected = BTreeSet::new();
    for line in std::fs::read_to_string(&input).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["messageSource"] == "telemetry" {
            expected.insert((
                v["deviceId"].as_str().unwrap().to_string(),
                v["enqueuedTime"].as_str().unwrap().to_string(),
                v["telemetry"].to_string(),
            ));
        }
    }
    let rows = read_rows(&out);
    let mut got = BTreeSet::new();
    for r in &rows {
        let tele: serde_json::Value = serde_json::from_str(&r["telemetry"]).unwrap();
        got.insert((r["deviceId"].clone(), r["enqueuedTime"].clone(), tele.to_string()));
    }
    assert_eq!(rows.len(), expected.len(), "no duplicates, nothing missing");
    assert_eq!(got, expected);
    // envelope columns under their export names, partitioned by hour
    let r = &rows[0];
    for col in [
        "applicationId",
        "messageSource",
        "deviceId",
        "schema",
        "templateId",
        "enqueuedTime",
        "telemetry",
        "enrichments",
        "messageProperties",
    ] {
        assert!(r.contains_key(col), "{col} in {r:?}");
    }
    for f in parquet_files(&out) {
        let rel = f.strip_prefix(&out).unwrap().to_str().unwrap().to_string();
        assert!(rel.starts_with("date=2026-1") && rel.contains("/hour="), "{rel}");
    }
    assert!(err.contains("events from sources"), "{err}");
}

fn sim_pipeline(dir: &Path, sink_extra: &str, count: u64, checkpoint: &str) -> std::path::PathBuf {
    pipeline(
        dir,
        "p.yaml",
        &format!(
            "sources:\n  sim:\n    type: simulator\n    devices: 20\n    rate: {rate}\n    count: {count}\n    start: 2026-11-01T00:00:00Z\nsinks:\n  lake:\n    type: parquet\n    inputs: [sim]\n    url: {out}\n{sink_extra}{checkpoint}",
            rate = 20_000,
            out = dir.join("lake").display()
        ),
    )
}

#[test]
fn rolling_by_rows_and_compression_options() {
    for compression in ["zstd", "snappy", "none"] {
        let dir = tempfile::tempdir().unwrap();
        let p = sim_pipeline(
            dir.path(),
            &format!("    compression: {compression}\n    row_group_size: 100\n    roll: {{rows: 1000}}\n"),
            5000,
            "",
        );
        ok(&run(&["replay", p.to_str().unwrap()], &[], T));
        let files = parquet_files(&dir.path().join("lake"));
        assert_eq!(files.len(), 5, "{compression}: 5000 rows in files of 1000");
        let meta = parquet::file::reader::SerializedFileReader::new(std::fs::File::open(&files[0]).unwrap()).unwrap();
        use parquet::file::reader::FileReader as _;
        let md = meta.metadata();
        assert_eq!(md.num_row_groups(), 10, "row groups of 100");
        let codec = md.row_group(0).column(0).compression();
        let want = match compression {
            "zstd" => "ZSTD",
            "snappy" => "SNAPPY",
            _ => "UNCOMPRESSED",
        };
        assert!(format!("{codec:?}").starts_with(want), "{codec:?}");
        assert_eq!(read_rows(&dir.path().join("lake")).len(), 5000);
    }
}

/// Window output through the Parquet sink with `timestamp_unit` set to `unit` (`None`: the
/// default): the lake's folder, and its files' schema.
fn window_lake(dir: &Path, unit: Option<&str>) -> (std::path::PathBuf, arrow_schema::SchemaRef) {
    let lake = dir.join(format!("lake-{}", unit.unwrap_or("default")));
    let unit = unit.map(|u| format!("    timestamp_unit: {u}\n")).unwrap_or_default();
    let p = pipeline(
        dir,
        "p.yaml",
        &format!(
            "sources:\n  sim:\n    type: simulator\n    devices: 5\n    rate: 10\n    count: 1200\n    start: 2026-11-01T00:00:00Z\ntransforms:\n  w:\n    type: window\n    inputs: [sim]\n    window: {{kind: tumbling, size: 1m}}\n    allowed_lateness: 30s\n    aggregates: {{temperature: [avg, max]}}\nsinks:\n  lake:\n    type: parquet\n    inputs: [w]\n    url: {}\n    partition_by: date=%Y-%m-%d\n{unit}",
            lake.display()
        ),
    );
    ok(&run(&["replay", p.to_str().unwrap()], &[], T));
    let files = parquet_files(&lake);
    let b = read_parquet_bytes(bytes::Bytes::from(std::fs::read(&files[0]).unwrap()));
    let schema = b[0].schema();
    (lake, schema)
}

#[test]
fn window_rows_get_typed_columns() {
    use arrow_schema::{DataType, TimeUnit};
    let dir = tempfile::tempdir().unwrap();
    let (lake, schema) = window_lake(dir.path(), None);
    let types: BTreeMap<String, DataType> =
        schema.fields().iter().map(|f| (f.name().clone(), f.data_type().clone())).collect();
    assert_eq!(types["deviceId"], DataType::Utf8);
    assert_eq!(types["count"], DataType::Int64);
    assert_eq!(types["temperature_avg"], DataType::Float64);
    // microseconds, UTC-adjusted: what Spark (Fabric, Synapse, Databricks) reads
    assert_eq!(types["window_start"], DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())));
    let rows = read_rows(&lake);
    let total: i64 = rows.iter().map(|r| r["count"].parse::<i64>().unwrap()).sum();
    assert_eq!(total, 1200, "every message counted once");
}

#[test]
fn timestamp_unit_changes_the_type_and_not_the_times() {
    use arrow_schema::{DataType, TimeUnit};
    let dir = tempfile::tempdir().unwrap();
    let (us_lake, _) = window_lake(dir.path(), None);
    let sorted = |lake: &Path| {
        let mut r = read_rows(lake);
        r.sort();
        r
    };
    let us = sorted(&us_lake);
    for (unit, arrow_unit) in [("ms", TimeUnit::Millisecond), ("ns", TimeUnit::Nanosecond)] {
        let (lake, schema) = window_lake(dir.path(), Some(unit));
        let ws = schema.field_with_name("window_end").unwrap().data_type().clone();
        assert_eq!(ws, DataType::Timestamp(arrow_unit, Some("UTC".into())), "{unit}");
        assert_eq!(sorted(&lake), us, "{unit}: the same rows and times");
    }
}

fn visible_files_are_complete(lake: &Path) -> usize {
    let files = parquet_files(lake);
    for f in &files {
        let bytes = bytes::Bytes::from(std::fs::read(f).unwrap());
        let _ = read_parquet_bytes(bytes); // panics on a partial file
    }
    files.len()
}

#[test]
fn an_interrupted_write_leaves_no_visible_partial_file() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let p = sim_pipeline(
        dir.path(),
        "    roll: {rows: 20000}\n",
        100_000_000,
        &format!("checkpoint:\n  url: {}\n  interval: 1s\n", state.display()),
    );
    let lake = dir.path().join("lake");
    let staged_files = || -> Vec<std::path::PathBuf> { walk(&lake.join("_staging")) };
    let mut left_staged: Vec<std::path::PathBuf> = Vec::new();
    for round in 0..2 {
        let before = parquet_files(&lake).len();
        let child = cmd(&["run", p.to_str().unwrap()]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        // kill while files are being written: once a checkpoint has committed one this round and
        // a closed file (rolled at 20,000 rows) waits in staging for the next checkpoint
        let start = std::time::Instant::now();
        // (files the previous round left staged do not count: the restart removes them)
        let new_staged = || staged_files().into_iter().any(|f| !left_staged.contains(&f));
        while parquet_files(&lake).len() <= before || !new_staged() {
            assert!(start.elapsed() < T, "round {round}: no file committed and another staged");
            std::thread::sleep(Duration::from_millis(5));
        }
        // SIGKILL: no chance to clean up
        signal(&child, libc::SIGKILL);
        let out = child.wait_with_output().unwrap();
        assert!(!out.status.success());
        let n = visible_files_are_complete(&lake);
        assert!(n > before, "round {round}: checkpoints committed files before the kill");
        // what the kill left staged is there under a name no reader takes for a Parquet file
        let staged = staged_files();
        assert!(!staged.is_empty(), "round {round}: the kill left a staged file");
        for f in &staged {
            let name = f.file_name().unwrap().to_str().unwrap();
            // object_store's local writes go through `NAME#n` before the rename to NAME
            let name = name.split_once('#').map_or(name, |(n, _)| n);
            assert!(name.ends_with(".parquet.inprogress"), "round {round}: staged as {}", f.display());
        }
        let visible_staged: Vec<_> =
            parquet_files(&lake).into_iter().filter(|f| f.starts_with(lake.join("_staging"))).collect();
        assert!(visible_staged.is_empty(), "round {round}: staged files look final: {visible_staged:?}");
        left_staged = staged;
    }
    // a restart removes staged files that no checkpoint covers, and resumes (until it commits a
    // file of its own)
    let before = parquet_files(&lake).len();
    let child = cmd(&["run", p.to_str().unwrap()]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let start = std::time::Instant::now();
    while parquet_files(&lake).len() <= before {
        assert!(start.elapsed() < T, "the restart committed no file");
        std::thread::sleep(Duration::from_millis(50));
    }
    signal(&child, libc::SIGINT);
    let out = wait_output(child, T);
    ok(&out);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("resumed after epoch"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    visible_files_are_complete(&lake);
    let leftovers: Vec<_> = walk(&lake.join("_staging")).into_iter().filter(|p| p.is_file()).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

fn walk(d: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(d) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn sigint_stops_gracefully_and_flushes_everything() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(
        dir.path(),
        "p.yaml",
        &format!(
            "sources:\n  sim:\n    type: simulator\n    devices: 20\n    rate: 2000\n    out_of_order: 0\ntransforms:\n  w:\n    type: window\n    inputs: [sim]\n    window: {{kind: tumbling, size: 1m}}\nsinks:\n  raw:\n    type: parquet\n    inputs: [sim]\n    url: {raw}\n  agg:\n    type: jsonl\n    inputs: [w]\n    path: {agg}\n",
            raw = dir.path().join("raw").display(),
            agg = dir.path().join("agg.jsonl").display()
        ),
    );
    let child = cmd(&["run", p.to_str().unwrap()]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    signal(&child, libc::SIGINT);
    let out = wait_output(child, T);
    let err = ok(&out);
    let sent: u64 = err
        .lines()
        .find(|l| l.trim_start().starts_with("sim "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{err}"));
    assert!(sent > 1000, "{err}");
    // everything the source sent is in the raw files, and in the windows (flushed on stop,
    // since there is no checkpoint store to keep them in)
    assert_eq!(read_rows(&dir.path().join("raw")).len() as u64, sent);
    let counted: u64 = std::fs::read_to_string(dir.path().join("agg.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["count"].as_u64().unwrap())
        .sum();
    assert_eq!(counted, sent);
    assert!(walk(&dir.path().join("raw/_staging")).is_empty());
}

fn object_store_sink(url: &str, env: Vec<(String, String)>, options: BTreeMap<String, String>) {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(
        dir.path(),
        "p.yaml",
        &format!(
            "sources:\n  sim:\n    type: simulator\n    devices: 10\n    rate: 100\n    count: 3000\n    start: 2026-11-01T00:00:00Z\nsinks:\n  lake:\n    type: parquet\n    inputs: [sim]\n    url: {url}\n    partition_by: hour=%H\n"
        ),
    );
    ok(&run(&["replay", p.to_str().unwrap()], &env_refs(&env), T));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let loc = centralflow::storage::open(url, &options).unwrap();
    let (rows, names) = rt.block_on(async {
        let list: Vec<_> = loc.store.list(Some(&loc.prefix)).try_collect().await.unwrap();
        let mut rows = 0;
        let mut names = Vec::new();
        for m in list {
            names.push(loc.relative(&m.location));
            if m.location.as_ref().ends_with(".parquet") {
                let b = loc.store.get(&m.location).await.unwrap().bytes().await.unwrap();
                rows += read_parquet_bytes(b).iter().map(|b| b.num_rows()).sum::<usize>();
            }
        }
        (rows, names)
    });
    assert_eq!(rows, 3000, "{names:?}");
    assert!(names.iter().any(|n| n.starts_with("hour=00/part-")), "{names:?}");
    assert!(!names.iter().any(|n| n.contains("_staging")), "staged objects are renamed: {names:?}");
}

#[test]
fn writes_to_azurite() {
    let container = unique("lake");
    azurite_create_container(&container);
    object_store_sink(&format!("az://{container}/telemetry"), azurite_env(), azurite_options());
}

#[test]
fn writes_to_s3_on_moto() {
    let bucket = unique("lake");
    s3_create_bucket(&bucket);
    object_store_sink(&format!("s3://{bucket}/telemetry"), s3_env(), s3_options());
}

/// `--reset-state` starts over without touching what earlier runs wrote: its checkpoints are
/// numbered after the old ones (so they are the newest, and the next start resumes from them)
/// and its files take no old file's name.
#[test]
fn reset_state_keeps_old_output_and_its_checkpoints_are_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("export.jsonl");
    simulate(&input, 3_000, 50, 5);
    let out = dir.path().join("out");
    let state = dir.path().join("state");
    let p = pipeline(
        dir.path(),
        "reset.yaml",
        &format!(
            "sources:\n  export:\n    type: files\n    url: {}\ntransforms:\n  telemetry:\n    type: filter\n    inputs: [export]\n    condition: messageSource == \"telemetry\"\nsinks:\n  lake:\n    type: parquet\n    inputs: [telemetry]\n    url: {}\ncheckpoint:\n  url: {}\n",
            input.display(),
            out.display(),
            state.display()
        ),
    );
    let telemetry = std::fs::read_to_string(&input)
        .unwrap()
        .lines()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["messageSource"] == "telemetry")
        .count();
    let replay = |extra: &[&str]| {
        let mut args = vec!["replay", "--no-progress", p.to_str().unwrap()];
        args.extend_from_slice(extra);
        ok(&run(&args, &[], T));
    };
    let checkpoints = || -> Vec<String> {
        let mut v: Vec<String> = file_names(&state).into_iter().filter(|f| f.contains("ckpt-")).collect();
        v.sort();
        v
    };
    replay(&[]);
    let first: BTreeMap<String, u64> =
        parquet_files(&out).iter().map(|f| (f.display().to_string(), std::fs::metadata(f).unwrap().len())).collect();
    assert_eq!(read_rows(&out).len(), telemetry);
    let old = checkpoints();

    replay(&["--reset-state"]);
    for (f, len) in &first {
        assert_eq!(std::fs::metadata(f).map(|m| m.len()).ok(), Some(*len), "{f} was overwritten or removed");
    }
    assert_eq!(read_rows(&out).len(), 2 * telemetry, "the reset run wrote everything again, beside the old files");
    let newest = checkpoints().last().cloned().unwrap();
    assert!(old.iter().all(|o| *o < newest), "{newest} must be newer than {old:?}");

    // a plain restart resumes from the reset run's checkpoint: its input is already done
    replay(&[]);
    assert_eq!(read_rows(&out).len(), 2 * telemetry);
}

fn file_names(d: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(file_names(&p));
        } else {
            out.push(p.file_name().unwrap().to_string_lossy().to_string());
        }
    }
    out
}
