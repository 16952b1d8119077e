#!/usr/bin/env python3
"""The archive anchor (issue 18): IoT Central export JSONL -> telemetry only -> raw Parquet (zstd)
with the envelope as columns, the payload objects as JSON text and typed columns for three
readings, as centralflow's `parquet` sink writes it. Written for benches/archive.rs.
Usage: archive_duckdb.py IN.jsonl OUT.parquet [threads]"""
import sys, duckdb
src, dst = sys.argv[1], sys.argv[2]
threads = int(sys.argv[3]) if len(sys.argv) > 3 else 2
con = duckdb.connect()
con.execute(f"SET threads={threads}")
con.execute(f"""
COPY (
  SELECT applicationId, messageSource, deviceId, schema, templateId, enqueuedTime, component,
         telemetry::VARCHAR AS telemetry, enrichments::VARCHAR AS enrichments,
         messageProperties::VARCHAR AS messageProperties,
         (telemetry->>'temperature')::DOUBLE AS temperature,
         (telemetry->>'humidity')::DOUBLE AS humidity,
         (telemetry->>'pressure')::DOUBLE AS pressure
  FROM read_json('{src}', format='newline_delimited',
       columns={{applicationId:'VARCHAR', messageSource:'VARCHAR', deviceId:'VARCHAR', schema:'VARCHAR',
                templateId:'VARCHAR', enqueuedTime:'TIMESTAMPTZ', component:'VARCHAR', telemetry:'JSON',
                enrichments:'JSON', messageProperties:'JSON'}})
  WHERE messageSource = 'telemetry'
) TO '{dst}' (FORMAT parquet, COMPRESSION zstd)""")
rows = con.execute(f"select count(*) from '{dst}'").fetchone()[0]
print(f"duckdb threads={threads} rows={rows}")
