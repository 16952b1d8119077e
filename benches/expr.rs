//! Expression languages compared on realistic per-event expressions over IoT Central export
//! messages: Rhai (what centralflow uses, through its lazy field binding) against CEL (the `cel`
//! crate, with a variable resolver that converts the fields an expression names on demand), and
//! jq (the `jq` transform, through jaq): `jq` is the program alone on a parsed input,
//! `jq_per_event` what the transform pays per event (the event as JSON, parsed, the program run,
//! its output written as JSON).
//!
//!   cargo bench --bench expr
//!
//! The numbers behind the choice are in docs/performance.md.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use cel::common::value::{CowVal, Val};
use cel::context::VariableResolver;
use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;

use centralflow::event::{Event, ValRef};
use centralflow::expr::Expr;
use centralflow::transforms::jq::program as jq;

const MSG: &str = r#"{"applicationId":"6e9d8f3c-2b1a-4c8e-9f0d-1a2b3c4d5e6f","deviceId":"sensor-00042","schema":"default@v1","templateId":"dtmi:contoso:EnvSensor;1","enqueuedTime":"2026-11-01T00:00:07.123Z","enrichments":{"site":"plant-3"},"messageSource":"telemetry","telemetry":{"temperature":31.25,"humidity":48.113,"pressure":1003.2,"battery":77,"status":"ok","location":{"lat":47.6042,"lon":-122.3,"alt":12.0}},"messageProperties":{"iothub-creation-time-utc":"2026-11-01T00:00:07.100Z"}}"#;

/// (name, Rhai expression, CEL expression, jq program): the same computation in each language.
const CASES: [(&str, &str, &str, &str); 4] = [
    (
        "filter_message_source",
        r#"messageSource == "telemetry""#,
        r#"messageSource == "telemetry""#,
        r#".messageSource == "telemetry""#,
    ),
    (
        "filter_threshold_and_device",
        r#"telemetry.temperature > 30.0 && deviceId != "sensor-00001""#,
        r#"telemetry.temperature > 30.0 && deviceId != "sensor-00001""#,
        r#".telemetry.temperature > 30.0 and .deviceId != "sensor-00001""#,
    ),
    (
        "map_fahrenheit",
        "telemetry.temperature * 9.0 / 5.0 + 32.0",
        "telemetry.temperature * 9.0 / 5.0 + 32.0",
        ".telemetry.temperature * 9.0 / 5.0 + 32.0",
    ),
    (
        "map_concat",
        r#"enrichments.site + "/" + deviceId"#,
        r#"enrichments.site + "/" + deviceId"#,
        r#".enrichments.site + "/" + .deviceId"#,
    ),
];

fn to_cel(v: &ValRef<'_>) -> cel::Value {
    match v {
        ValRef::Null => cel::Value::Null,
        ValRef::Bool(b) => cel::Value::Bool(*b),
        ValRef::Int(i) => cel::Value::Int(*i),
        // CEL's JSON mapping: numbers are doubles
        ValRef::Float(_) | ValRef::Num(_) => cel::Value::Float(v.as_f64().unwrap_or(f64::NAN)),
        ValRef::Str(s) => cel::Value::String(Arc::new(s.to_string())),
        ValRef::Obj(o) => {
            let m: HashMap<String, cel::Value> = o.iter().map(|(k, v)| (k.to_string(), to_cel(&v))).collect();
            cel::Value::from(m)
        }
        other => cel::Value::String(Arc::new(other.to_json())),
    }
}

/// Converts the top-level field an expression names, when it is looked up.
struct EventResolver<'e> {
    ev: &'e Event,
}

impl VariableResolver for EventResolver<'_> {
    fn resolve<'b>(&'b self, variable: &str) -> Option<CowVal<'b, 'b>> {
        let v = self.ev.get(variable)?;
        let b: Box<dyn Val> = to_cel(&v).try_into().ok()?;
        Some(CowVal::Owned(b))
    }
}

fn bench(c: &mut Criterion) {
    let ev = centralflow::model::decode::decode_one(Bytes::from_static(MSG.as_bytes())).unwrap();
    let env = Arc::new(cel::Env::stdlib());
    let mut g = c.benchmark_group("expr");
    let timeout = std::time::Duration::from_secs(1);
    for (name, rhai_src, cel_src, jq_src) in CASES {
        let rhai = Expr::compile(rhai_src).unwrap();
        g.bench_function(format!("{name}/rhai"), |b| b.iter(|| black_box(rhai.eval(black_box(&ev)).unwrap())));
        let program = env.compile(cel_src).unwrap();
        g.bench_function(format!("{name}/cel"), |b| {
            b.iter(|| {
                let resolver = EventResolver { ev: black_box(&ev) };
                let mut ctx = cel::Context::with_env(env.clone());
                ctx.set_variable_resolver(&resolver);
                black_box(program.execute(&ctx).unwrap())
            })
        });
        let jq = jq::Program::compile(jq_src).unwrap();
        let parsed = jq::parse(&ev.to_json()).unwrap();
        g.bench_function(format!("{name}/jq"), |b| {
            b.iter(|| black_box(jq.run(black_box(parsed.clone()), timeout, 10).unwrap()))
        });
        g.bench_function(format!("{name}/jq_per_event"), |b| {
            b.iter(|| {
                let input = jq::parse(&black_box(&ev).to_json()).unwrap();
                let out = jq.run(input, timeout, 10).unwrap();
                black_box(out.iter().map(jq::to_json).collect::<Vec<_>>())
            })
        });
    }
    // the filter as centralflow runs it: `eval_bool` takes the compiled fast path for `field == "text"`
    let fast = Expr::compile(CASES[0].1).unwrap();
    g.bench_function("filter_message_source/centralflow_fast_path", |b| {
        b.iter(|| black_box(fast.eval_bool(black_box(&ev)).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
