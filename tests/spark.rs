//! centralflow's Parquet as the Azure analytics stack reads it: PySpark (the engine of Fabric,
//! Synapse and Databricks) in local mode opens the raw export layout and the window output,
//! sees timestamp columns as Spark timestamps, and reads the same rows and times as DuckDB.
//! `scripts/test` installs pyspark and duckdb into .tools/venv and names its Python in W1_PYTHON.

mod common;

use common::*;

const T: std::time::Duration = std::time::Duration::from_secs(120);

const READ: &str = r#"
import json, sys
from pyspark.sql import SparkSession
import duckdb
raw, win = sys.argv[1], sys.argv[2]
spark = (SparkSession.builder.master("local[1]").appName("centralflow-check")
         .config("spark.ui.enabled", "false").config("spark.sql.session.timeZone", "UTC").getOrCreate())
spark.sparkContext.setLogLevel("ERROR")
def spark_side(path, time_cols, key):
    df = spark.read.option("recursiveFileLookup", "true").parquet(path)
    types = {f.name: f.dataType.typeName() for f in df.schema.fields if f.name in time_cols}
    sel = ", ".join([key] + [f"unix_micros({c}) AS {c}" for c in time_cols])
    rows = sorted(tuple(r) for r in df.selectExpr(*sel.split(", ")).collect())
    return types, rows
def duck_side(path, time_cols, key):
    sel = ", ".join([key] + [f"epoch_us({c})" for c in time_cols])
    return sorted(duckdb.sql(f"SELECT {sel} FROM read_parquet('{path}/**/*.parquet')").fetchall())
out = {}
for name, path, cols, key in [("raw", raw, ["enqueuedTime"], "deviceId"),
                              ("window", win, ["window_start", "window_end"], "deviceId")]:
    types, rows = spark_side(path, cols, key)
    duck = duck_side(path, cols, key)
    out[name] = {"types": types, "rows": len(rows), "same_as_duckdb": [list(r) for r in rows] == [list(r) for r in duck],
                 "first": list(rows[0]) if rows else None}
print(json.dumps(out))
"#;

#[test]
fn pyspark_reads_raw_and_window_output_as_duckdb_does() {
    let python =
        std::env::var("W1_PYTHON").expect("W1_PYTHON names a Python with pyspark and duckdb: run scripts/test");
    let dir = tempfile::tempdir().unwrap();
    let (raw, win) = (dir.path().join("raw"), dir.path().join("win"));
    let p = pipeline(
        dir.path(),
        "p.yaml",
        &format!(
            "sources:\n  sim:\n    type: simulator\n    devices: 4\n    rate: 10\n    count: 900\n    start: 2026-11-01T00:00:00Z\ntransforms:\n  telemetry:\n    type: filter\n    inputs: [sim]\n    condition: messageSource == \"telemetry\"\n  w:\n    type: window\n    inputs: [telemetry]\n    window: {{kind: tumbling, size: 1m}}\n    aggregates: {{temperature: [avg]}}\nsinks:\n  raw:\n    type: parquet\n    inputs: [sim]\n    url: {}\n  lake:\n    type: parquet\n    inputs: [w]\n    url: {}\n",
            raw.display(),
            win.display()
        ),
    );
    ok(&run(&["replay", p.to_str().unwrap()], &[], T));
    let out = std::process::Command::new(&python)
        .args(["-c", READ, raw.to_str().unwrap(), win.to_str().unwrap()])
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "PySpark failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or("")).expect(&stdout);
    let raw_rows = read_rows(&raw).len() as u64;
    let win_rows = read_rows(&win).len() as u64;
    assert_eq!(v["raw"]["types"]["enqueuedTime"], "timestamp", "{v}");
    assert_eq!(v["window"]["types"]["window_start"], "timestamp", "{v}");
    assert_eq!(v["window"]["types"]["window_end"], "timestamp", "{v}");
    assert_eq!(v["raw"]["rows"], raw_rows, "{v}");
    assert_eq!(raw_rows, 900, "every message once");
    assert_eq!(v["window"]["rows"], win_rows, "{v}");
    assert!(win_rows > 0);
    assert_eq!(v["raw"]["same_as_duckdb"], true, "{v}");
    assert_eq!(v["window"]["same_as_duckdb"], true, "{v}");
    // the first window starts at the simulator's start, to the microsecond
    assert_eq!(v["window"]["first"][1], 1_793_491_200_000_000i64, "{v}");
}
