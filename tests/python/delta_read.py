"""Reads a centralflow Delta table as users do: with delta-rs's Python package (`deltalake` from
PyPI) and, for a local table, its data files with PySpark. Prints one JSON object:
  rows: [deviceId, enqueuedTime in microseconds, telemetry JSON text] for a raw table
  count, columns (name -> Arrow type), partition_columns, stats_records (the numRecords of
  the data files' statistics, summed), history (oldest first: version,
  operation, queryId, epochId), txn (the table's txn version of each queryId in the history),
  spark (count, files and column types of the table's data files read by PySpark) or null.
Usage: delta_read.py URL STORAGE_OPTIONS_JSON [spark]
"""
import json
import sys

from deltalake import DeltaTable

url, opts = sys.argv[1], json.loads(sys.argv[2])
want_spark = len(sys.argv) > 3 and sys.argv[3] == "spark"
dt = DeltaTable(url, storage_options=opts or None)
t = dt.to_pyarrow_table()
out = {
    "count": t.num_rows,
    "columns": {f.name: str(f.type) for f in t.schema},
    "partition_columns": dt.metadata().partition_columns,
}
if "enqueuedTime" in t.column_names:
    dev = t.column("deviceId").to_pylist()
    ts = t.column("enqueuedTime").cast("int64").to_pylist()
    tele = t.column("telemetry").to_pylist()
    out["rows"] = [[d, x, y] for d, x, y in zip(dev, ts, tele)]
# the data files' statistics as delta-rs reads them: their record counts must add up to the rows
import pyarrow as pa
adds = pa.table(dt.get_add_actions(flatten=True))
out["stats_records"] = sum(adds.column("num_records").to_pylist())
history = []
for h in sorted(dt.history(), key=lambda h: h["version"]):
    p = h.get("operationParameters") or {}
    history.append({"version": h["version"], "operation": h["operation"],
                    "queryId": p.get("queryId"), "epochId": p.get("epochId")})
out["history"] = history
out["txn"] = {q: dt.transaction_version(q) for q in {h["queryId"] for h in history if h["queryId"]}}
out["spark"] = None
if want_spark:
    from pyspark.sql import SparkSession
    spark = (SparkSession.builder.master("local[1]").appName("centralflow-delta")
             .config("spark.ui.enabled", "false").config("spark.sql.session.timeZone", "UTC").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    files = dt.file_uris()
    df = spark.read.parquet(*files)
    out["spark"] = {"count": df.count(), "files": len(files),
                    "types": {f.name: f.dataType.typeName() for f in df.schema.fields}}
print(json.dumps(out))
