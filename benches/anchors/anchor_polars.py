# Copied from the benchmark anchors (../shared/bench). Unchanged below this header.
#!/usr/bin/env python3
"""Anchor W1 on Polars (same work as anchor_duckdb.py). Usage: anchor_polars.py IN.jsonl OUT.parquet"""
import sys, time, polars as pl
src, dst = sys.argv[1], sys.argv[2]
t = time.time()
schema = {"deviceId": pl.Utf8, "messageSource": pl.Utf8, "enqueuedTime": pl.Utf8,
          "telemetry": pl.Struct({"temperature": pl.Float64, "humidity": pl.Float64, "pressure": pl.Float64})}
df = (pl.scan_ndjson(src, schema=schema)
      .filter(pl.col("messageSource") == "telemetry")
      .with_columns(pl.col("enqueuedTime").str.to_datetime("%Y-%m-%dT%H:%M:%S%.3fZ", time_zone="UTC").dt.truncate("1m").alias("window_start"))
      .unnest("telemetry")
      .group_by(["deviceId", "window_start"])
      .agg([pl.len().alias("n")] + [getattr(pl.col(f), a)().alias(f"{f}_{a}") for f in ["temperature", "humidity", "pressure"] for a in ["mean", "min", "max"]])
      .collect())
df.write_parquet(dst, compression="zstd")
print(f"polars seconds={time.time()-t:.3f} rows={df.height}")
