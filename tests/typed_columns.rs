//! Typed columns of the `parquet` sink (`columns:`), as DuckDB and PySpark read them: each
//! column has its type, holds the value of its field where the JSON has that type, and is null
//! exactly where the JSON value has another type (or is missing). Replays
//! pipelines/testdata/typed-columns.jsonl, whose fields take every kind of wrong type.
//! `scripts/test` installs pyspark and duckdb into .tools/venv and names its Python in W1_PYTHON.

mod common;

use common::*;

const T: std::time::Duration = std::time::Duration::from_secs(120);

/// Prints, as JSON: the column types by DuckDB and Spark, the rows where a typed column differs
/// from what its JSON value says it must be, the non-null and null counts of each column, and
/// whether Spark reads the same values as DuckDB.
const READ: &str = r#"
import json, sys
from datetime import datetime, timezone
import duckdb
from pyspark.sql import SparkSession
path, cols = sys.argv[1], json.loads(sys.argv[2])
glob = f"{path}/**/*.parquet"

def at(obj, keys):
    for k in keys:
        if not isinstance(obj, dict) or k not in obj:
            return None
        obj = obj[k]
    return obj

def expected(v, ty):
    num = isinstance(v, (int, float)) and not isinstance(v, bool)
    if ty == "double":
        return float(v) if num else None
    if ty == "long":
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        return v if num and isinstance(v, int) and -2**63 <= v < 2**63 else None
    if ty == "string":
        return v if isinstance(v, str) else None
    if ty == "boolean":
        return v if isinstance(v, bool) else None
    if ty == "timestamp":
        if isinstance(v, str):
            try:
                t = datetime.fromisoformat(v.replace("Z", "+00:00"))
            except ValueError:
                return None
            return int(t.timestamp()) * 1_000_000 + t.microsecond
        return v * 1000 if num and isinstance(v, int) else None
    raise ValueError(ty)

duck_sql = {"double": "DOUBLE", "long": "BIGINT", "string": "VARCHAR", "boolean": "BOOLEAN"}
out = {"duckdb_types": {}, "spark_types": {}, "wrong": [], "non_null": {}, "null": {}}
con = duckdb.connect()
desc = {r[0]: r[1] for r in con.sql(f"DESCRIBE SELECT * FROM read_parquet('{glob}')").fetchall()}
for c in cols:
    out["duckdb_types"][c["name"]] = desc.get(c["name"])
sel = ", ".join(["deviceId", "telemetry", "enrichments"] +
                [f'epoch_us("{c["name"]}")' if c["type"] == "timestamp" else f'"{c["name"]}"' for c in cols])
rows = con.sql(f"SELECT {sel} FROM read_parquet('{glob}') ORDER BY deviceId").fetchall()
out["rows"] = len(rows)
for r in rows:
    doc = {"telemetry": json.loads(r[1]) if r[1] else None, "enrichments": json.loads(r[2]) if r[2] else None}
    for i, c in enumerate(cols):
        got, want = r[3 + i], expected(at(doc, c["keys"]), c["type"])
        if got != want:
            out["wrong"].append([r[0], c["name"], got, want])
        key = "null" if got is None else "non_null"
        out[key][c["name"]] = out[key].get(c["name"], 0) + 1
# the typed value equals DuckDB's own extraction from the JSON text wherever it is not null
for c in cols:
    if c["type"] in duck_sql:
        j = c["keys"][0] + "->>'$." + ".".join(c["keys"][1:]) + "'"
        n = con.sql(f'''SELECT count(*) FROM read_parquet('{glob}') WHERE "{c["name"]}" IS NOT NULL
                        AND "{c["name"]}" IS DISTINCT FROM TRY_CAST({j} AS {duck_sql[c["type"]]})''').fetchall()[0][0]
        if n:
            out["wrong"].append(["json_extract", c["name"], n, 0])
spark = (SparkSession.builder.master("local[1]").appName("centralflow-typed")
         .config("spark.ui.enabled", "false").config("spark.sql.session.timeZone", "UTC").getOrCreate())
spark.sparkContext.setLogLevel("ERROR")
df = spark.read.option("recursiveFileLookup", "true").parquet(path)
out["spark_types"] = {f.name: f.dataType.typeName() for f in df.schema.fields if f.name in [c["name"] for c in cols]}
exprs = ["deviceId"] + [f'unix_micros(`{c["name"]}`)' if c["type"] == "timestamp" else f'`{c["name"]}`' for c in cols]
srows = sorted((tuple(r) for r in df.selectExpr(*exprs).collect()), key=lambda r: r[0])
drows = con.sql(f"SELECT deviceId, {sel.split(', ', 3)[3]} FROM read_parquet('{glob}') ORDER BY deviceId").fetchall()
out["spark_same_as_duckdb"] = [list(r) for r in srows] == [list(r) for r in drows]
print(json.dumps(out))
"#;

#[test]
fn typed_columns_read_by_duckdb_and_pyspark() {
    let python =
        std::env::var("W1_PYTHON").expect("W1_PYTHON names a Python with pyspark and duckdb: run scripts/test");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("raw");
    let input = root().join("pipelines/testdata/typed-columns.jsonl");
    let p = pipeline(
        dir.path(),
        "p.yaml",
        &format!(
            "sources:\n  export:\n    type: files\n    url: {}\nsinks:\n  lake:\n    type: parquet\n    inputs: [export]\n    url: {}\n    partition_by: date=%Y-%m-%d/hour=%H\n    metadata_columns: true\n    columns:\n      temperature: double\n      status: string\n      BloodPressure.Systolic: long\n      online: boolean\n      ts: timestamp\n      enrichments.site: {{type: string, name: site}}\n",
            input.display(),
            out.display()
        ),
    );
    ok(&run(&["replay", p.to_str().unwrap()], &[], T));
    let cols = serde_json::json!([
        {"name": "temperature", "type": "double", "keys": ["telemetry", "temperature"]},
        {"name": "status", "type": "string", "keys": ["telemetry", "status"]},
        {"name": "BloodPressure.Systolic", "type": "long", "keys": ["telemetry", "BloodPressure", "Systolic"]},
        {"name": "online", "type": "boolean", "keys": ["telemetry", "online"]},
        {"name": "ts", "type": "timestamp", "keys": ["telemetry", "ts"]},
        {"name": "site", "type": "string", "keys": ["enrichments", "site"]},
    ]);
    let res = std::process::Command::new(&python)
        .args(["-c", READ, out.to_str().unwrap(), &cols.to_string()])
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(res.status.success(), "the check failed: {}\n{stdout}", String::from_utf8_lossy(&res.stderr));
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or("")).expect(&stdout);
    eprintln!("{v}");
    assert_eq!(v["rows"], 8, "every message once: {v}");
    assert_eq!(v["wrong"], serde_json::json!([]), "{v}");
    let duck = &v["duckdb_types"];
    let spark = &v["spark_types"];
    for (name, d, s) in [
        ("temperature", "DOUBLE", "double"),
        ("status", "VARCHAR", "string"),
        ("BloodPressure.Systolic", "BIGINT", "long"),
        ("online", "BOOLEAN", "boolean"),
        ("ts", "TIMESTAMP WITH TIME ZONE", "timestamp"),
        ("site", "VARCHAR", "string"),
    ] {
        assert_eq!(duck[name], d, "{name}: {v}");
        assert_eq!(spark[name], s, "{name}: {v}");
        // the data has both values of the column's type and values of other types
        assert!(v["non_null"][name].as_u64().unwrap_or(0) > 0, "{name}: {v}");
        assert!(v["null"][name].as_u64().unwrap_or(0) > 0, "{name}: {v}");
    }
    assert_eq!(v["spark_same_as_duckdb"], true, "{v}");
    // every file of the folder has the same schema
    let schemas: std::collections::BTreeSet<String> = parquet_files(&out)
        .iter()
        .map(|f| {
            let r =
                parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(f).unwrap())
                    .unwrap();
            format!("{:?}", r.schema())
        })
        .collect();
    assert!(parquet_files(&out).len() >= 2, "partitioned into hours");
    assert_eq!(schemas.len(), 1, "{schemas:?}");
}
