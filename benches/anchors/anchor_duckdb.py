# Copied from the benchmark anchors (../shared/bench). Unchanged below this header.
#!/usr/bin/env python3
"""Anchor W1 on DuckDB: IoT Central export JSONL -> telemetry only -> 1-minute tumbling
windows per device on enqueuedTime -> count/avg/min/max of three fields -> Parquet (zstd).
Usage: anchor_duckdb.py IN.jsonl OUT.parquet [threads]"""
import sys, time, duckdb
src, dst = sys.argv[1], sys.argv[2]
threads = int(sys.argv[3]) if len(sys.argv) > 3 else 2
con = duckdb.connect()
con.execute(f"SET threads={threads}")
t = time.time()
con.execute(f"""
COPY (
  SELECT deviceId,
         time_bucket(INTERVAL '1 minute', enqueuedTime) AS window_start,
         count(*) AS n,
         avg(telemetry.temperature) AS temperature_avg, min(telemetry.temperature) AS temperature_min, max(telemetry.temperature) AS temperature_max,
         avg(telemetry.humidity) AS humidity_avg, min(telemetry.humidity) AS humidity_min, max(telemetry.humidity) AS humidity_max,
         avg(telemetry.pressure) AS pressure_avg, min(telemetry.pressure) AS pressure_min, max(telemetry.pressure) AS pressure_max
  FROM read_json('{src}', format='newline_delimited',
       columns={{deviceId:'VARCHAR', messageSource:'VARCHAR', enqueuedTime:'TIMESTAMPTZ',
                telemetry:'STRUCT(temperature DOUBLE, humidity DOUBLE, pressure DOUBLE)'}})
  WHERE messageSource = 'telemetry'
  GROUP BY ALL
) TO '{dst}' (FORMAT parquet, COMPRESSION zstd)""")
el = time.time() - t
rows = con.execute(f"select count(*) from '{dst}'").fetchone()[0]
print(f"duckdb threads={threads} seconds={el:.3f} rows={rows}")
