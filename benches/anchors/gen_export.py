# Copied from the benchmark anchors this project measures against (../shared/bench), so that
# the benchmark runs from a clean clone. Unchanged below this header.
#!/usr/bin/env python3
"""Synthetic IoT Central continuous-data-export stream (schema default@v1), JSON lines.

Mix: ~90% telemetry, ~8% property changes, ~2% connectivity/lifecycle; a small share
of telemetry arrives out of order (up to 20 s late) so event-time windowing matters.
Deterministic for a given seed. Usage: gen_export.py N_MESSAGES N_DEVICES SEED > out.jsonl
"""
import json, random, sys, datetime as dt

def main():
    n, ndev, seed = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    rnd = random.Random(seed)
    app = "6e9d8f3c-2b1a-4c8e-9f0d-1a2b3c4d5e6f"
    tmpl = ["dtmi:contoso:EnvSensor;1", "dtmi:contoso:Freezer;2"]
    t0 = dt.datetime(2026, 11, 1, 0, 0, 0, tzinfo=dt.timezone.utc)
    step_ms = 3_600_000 / n  # the whole stream spans one hour of enqueuedTime
    out = sys.stdout
    for i in range(n):
        dev = rnd.randrange(ndev)
        did = f"sensor-{dev:05d}"
        t = t0 + dt.timedelta(milliseconds=i * step_ms)
        if rnd.random() < 0.02:
            t -= dt.timedelta(milliseconds=rnd.randrange(20_000))
        ts = t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"
        r = rnd.random()
        base = {"applicationId": app, "deviceId": did, "schema": "default@v1",
                "templateId": tmpl[dev % 2], "enqueuedTime": ts,
                "enrichments": {"site": f"plant-{dev % 7}"}}
        if r < 0.90:
            m = {**base, "messageSource": "telemetry",
                 "telemetry": {"temperature": round(20 + (dev % 10) + rnd.gauss(0, 2), 3),
                               "humidity": round(40 + rnd.random() * 20, 3),
                               "pressure": round(1000 + rnd.gauss(0, 5), 2),
                               "battery": rnd.randrange(0, 101),
                               "status": rnd.choice(["ok", "ok", "ok", "warn"]),
                               "location": {"lat": 47.6 + dev * 1e-4, "lon": -122.3, "alt": 12.0}},
                 "messageProperties": {"iothub-creation-time-utc": ts}}
            if dev % 5 == 0:
                m["component"] = "thermostat1"
        elif r < 0.98:
            m = {**base, "messageSource": "properties",
                 "messageType": rnd.choice(["devicePropertyReportedChange", "cloudPropertyChange"]),
                 "properties": [{"name": "firmwareVersion", "value": f"1.{dev % 4}.0"}]}
        else:
            kind = rnd.choice(["deviceConnectivity", "deviceLifecycle"])
            m = {**base, "messageSource": kind,
                 "messageType": "connected" if kind == "deviceConnectivity" else "registered"}
        out.write(json.dumps(m, separators=(",", ":")))
        out.write("\n")

if __name__ == "__main__":
    main()
