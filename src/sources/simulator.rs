//! `simulator`: a fleet of simulated devices emitting IoT Central export messages (default@v1),
//! so that every pipeline runs offline.
//!
//! Message `i` is a pure function of `(seed, i)`: its device, kind, values and event time
//! (`start + i / rate`, minus a random delay for the `out_of_order` share). In `run` the
//! simulator paces itself to `rate` messages per second of wall time; in `replay` it emits as
//! fast as the pipeline takes them. The messages, and so the results, are the same either way,
//! and the same as replaying what `centralflow simulate` wrote to a file.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use bytes::Bytes;
use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::values::{Dur, Parse, Parsed};
use crate::config::{Checker, Spec};
use crate::event::{Batch, Event, Nanos};
use crate::model::decode::{decode_object_projected, Projection};
use crate::runtime::{BuildCx, Control, EndReason, Mode, Source, SourceCx};

/// Simulated devices.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SimulatorConfig {
    /// Number of devices (`sensor-00000` ...).
    #[serde(default = "d_devices")]
    pub devices: u32,
    /// Messages per second, all devices together: the event-time spacing, and the pace in `run`.
    #[serde(default = "d_rate")]
    pub rate: f64,
    /// Stop after this many messages.
    #[serde(default)]
    pub count: Option<u64>,
    /// Stop after this much event time (e.g. `10m`).
    #[serde(default)]
    pub duration: Option<Dur>,
    /// Event time of the first message: RFC 3339, or `now` (the default).
    #[serde(default)]
    pub start: Option<Parsed<StartAt>>,
    /// Random seed: the same seed gives the same messages.
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// Telemetry fields and how their values are drawn. Default: temperature, humidity,
    /// pressure, battery, status, location.
    #[serde(default = "default_fields")]
    pub fields: IndexMap<String, FieldSpec>,
    /// Share of each message kind (normalised to sum 1).
    #[serde(default)]
    pub mix: Mix,
    /// Share of telemetry that arrives late (enqueuedTime earlier than its neighbours).
    #[serde(default = "d_ooo")]
    pub out_of_order: f64,
    /// How late, at most.
    #[serde(default = "d_delay")]
    pub max_delay: Dur,
    /// The IoT Central application id.
    #[serde(default = "d_app")]
    pub application_id: String,
    /// Device templates, assigned round-robin to devices.
    #[serde(default = "d_templates")]
    pub templates: Vec<String>,
    /// Share of devices whose telemetry is modelled in a component (`thermostat1`).
    #[serde(default = "d_component_share")]
    pub component_share: f64,
    /// Number of distinct `enrichments.site` values.
    #[serde(default = "d_sites")]
    pub sites: u32,
    /// Messages per batch.
    #[serde(default = "d_batch")]
    pub batch_size: usize,
}

/// How a telemetry value is drawn. Per-device variation: `normal` means shift by
/// `device_spread * (device % 10)`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum FieldSpec {
    Normal {
        mean: f64,
        stddev: f64,
        #[serde(default)]
        device_spread: f64,
        #[serde(default = "d_decimals")]
        decimals: u32,
    },
    Uniform {
        min: f64,
        max: f64,
        #[serde(default = "d_decimals")]
        decimals: u32,
    },
    Integer {
        min: i64,
        max: i64,
    },
    Choice {
        values: Vec<String>,
    },
    /// `{"lat": .., "lon": .., "alt": ..}` near a fixed point, per device.
    Geopoint {
        lat: f64,
        lon: f64,
    },
}

/// Share of each message kind.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Mix {
    #[serde(default = "d_mix_t")]
    pub telemetry: f64,
    #[serde(default = "d_mix_p")]
    pub properties: f64,
    #[serde(default = "d_mix_c")]
    pub connectivity: f64,
    #[serde(default = "d_mix_l")]
    pub lifecycle: f64,
}

impl Default for Mix {
    fn default() -> Self {
        Mix { telemetry: d_mix_t(), properties: d_mix_p(), connectivity: d_mix_c(), lifecycle: d_mix_l() }
    }
}

fn d_devices() -> u32 {
    100
}
fn d_rate() -> f64 {
    100.0
}
fn d_seed() -> u64 {
    1
}
fn d_ooo() -> f64 {
    0.02
}
fn d_delay() -> Dur {
    Dur::new("20s")
}

/// The simulator's `start`: `now`, or an RFC 3339 time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    Now,
    At(Nanos),
}

impl Parse for StartAt {
    fn parse(text: &str) -> Result<Self, String> {
        if text == "now" {
            return Ok(StartAt::Now);
        }
        Nanos::parse(text).map(StartAt::At)
    }
}
fn d_app() -> String {
    "6e9d8f3c-2b1a-4c8e-9f0d-1a2b3c4d5e6f".into()
}
fn d_templates() -> Vec<String> {
    vec!["dtmi:contoso:EnvSensor;1".into(), "dtmi:contoso:Freezer;2".into()]
}
fn d_component_share() -> f64 {
    0.2
}
fn d_sites() -> u32 {
    7
}
fn d_batch() -> usize {
    4096
}
fn d_decimals() -> u32 {
    3
}
fn d_mix_t() -> f64 {
    0.90
}
fn d_mix_p() -> f64 {
    0.08
}
fn d_mix_c() -> f64 {
    0.01
}
fn d_mix_l() -> f64 {
    0.01
}

/// The default telemetry fields (the same as the benchmark's export generator).
pub fn default_fields() -> IndexMap<String, FieldSpec> {
    let mut m = IndexMap::new();
    m.insert("temperature".into(), FieldSpec::Normal { mean: 20.0, stddev: 2.0, device_spread: 1.0, decimals: 3 });
    m.insert("humidity".into(), FieldSpec::Uniform { min: 40.0, max: 60.0, decimals: 3 });
    m.insert("pressure".into(), FieldSpec::Normal { mean: 1000.0, stddev: 5.0, device_spread: 0.0, decimals: 2 });
    m.insert("battery".into(), FieldSpec::Integer { min: 0, max: 100 });
    m.insert("status".into(), FieldSpec::Choice { values: vec!["ok".into(), "ok".into(), "ok".into(), "warn".into()] });
    m.insert("location".into(), FieldSpec::Geopoint { lat: 47.6, lon: -122.3 });
    m
}

impl Spec for SimulatorConfig {
    fn check(&self, ptr: &str, cx: &mut Checker<'_>) {
        if self.devices == 0 {
            cx.error(&format!("{ptr}/devices"), "must be at least 1");
        }
        if !(self.rate > 0.0 && self.rate.is_finite()) {
            cx.error(&format!("{ptr}/rate"), "must be a positive number of messages per second");
        }
        if let Some(d) = &self.duration {
            cx.positive_duration(&format!("{ptr}/duration"), d);
        }
        if let Some(s) = &self.start {
            cx.valid(&format!("{ptr}/start"), s);
        }
        cx.duration(&format!("{ptr}/max_delay"), &self.max_delay);
        if !(0.0..=1.0).contains(&self.out_of_order) {
            cx.error(&format!("{ptr}/out_of_order"), "must be a share between 0 and 1");
        }
        if !(0.0..=1.0).contains(&self.component_share) {
            cx.error(&format!("{ptr}/component_share"), "must be a share between 0 and 1");
        }
        let m = &self.mix;
        if [m.telemetry, m.properties, m.connectivity, m.lifecycle].iter().any(|x| *x < 0.0)
            || m.telemetry + m.properties + m.connectivity + m.lifecycle <= 0.0
        {
            cx.error(&format!("{ptr}/mix"), "shares must be non-negative with a positive sum");
        }
        if self.templates.is_empty() {
            cx.error(&format!("{ptr}/templates"), "needs at least one template id");
        }
        if self.sites == 0 {
            cx.error(&format!("{ptr}/sites"), "must be at least 1");
        }
        for (name, f) in &self.fields {
            let p = format!("{ptr}/fields/{}", crate::config::yaml::pointer_escape(name));
            match f {
                FieldSpec::Normal { stddev, .. } if *stddev < 0.0 => cx.error(&p, "stddev must not be negative"),
                FieldSpec::Uniform { min, max, .. } if min > max => cx.error(&p, "min must not exceed max"),
                FieldSpec::Integer { min, max } if min > max => cx.error(&p, "min must not exceed max"),
                FieldSpec::Choice { values } if values.is_empty() => cx.error(&p, "needs at least one value"),
                _ => {}
            }
        }
        if self.batch_size == 0 {
            cx.error(&format!("{ptr}/batch_size"), "must be at least 1");
        }
    }
    fn ports(&self) -> Vec<crate::runtime::Port> {
        crate::runtime::SOURCE_PORTS.to_vec()
    }
}

/// SplitMix64: a tiny, stable generator, so that a seed gives the same messages in every build.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, i: u64) -> Rng {
        let mut r = Rng(seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        r.next();
        r
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: u64) -> u64 {
        (self.unit() * n as f64) as u64 % n.max(1)
    }
    fn gauss(&mut self) -> f64 {
        let u1 = self.unit().max(1e-12);
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// Generates export messages.
#[derive(Debug, Clone)]
pub struct Generator {
    cfg: SimulatorConfig,
    start: Nanos,
    step: f64,
    max_delay: Nanos,
    limit: Option<u64>,
}

impl Generator {
    /// A generator; `now` is the event time used for `start: now`.
    pub fn new(cfg: SimulatorConfig, now: Nanos) -> anyhow::Result<Generator> {
        let start = match cfg.start.as_ref().map(|s| s.get().context("start")).transpose()? {
            None | Some(StartAt::Now) => now / 1_000_000 * 1_000_000,
            Some(StartAt::At(t)) => t,
        };
        let step = 1e9 / cfg.rate;
        let max_delay = cfg.max_delay.nanos()?;
        let by_duration = match &cfg.duration {
            Some(d) => Some((d.nanos()? as f64 / step).ceil() as u64),
            None => None,
        };
        let limit = match (cfg.count, by_duration) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Ok(Generator { cfg, start, step, max_delay, limit })
    }

    /// How many messages it will produce, if bounded.
    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    /// Wall-clock offset of message `i` from the start, at the configured rate.
    pub fn due(&self, i: u64) -> Duration {
        Duration::from_nanos((i as f64 * self.step) as u64)
    }

    /// The JSON text of message `i`.
    pub fn message(&self, i: u64) -> String {
        let c = &self.cfg;
        let mut r = Rng::new(c.seed, i);
        let dev = r.below(c.devices as u64);
        let mut t = self.start + (i as f64 * self.step) as Nanos;
        let kind_draw = r.unit();
        let m = &c.mix;
        let total = m.telemetry + m.properties + m.connectivity + m.lifecycle;
        let x = kind_draw * total;
        let late = r.unit() < c.out_of_order;
        let delay = (r.unit() * self.max_delay as f64) as Nanos / 1_000_000 * 1_000_000;
        if x < m.telemetry && late {
            t -= delay;
        }
        let ts = crate::time::format_rfc3339(t);
        let template = &c.templates[(dev % c.templates.len() as u64) as usize];
        let mut s = String::with_capacity(480);
        let _ = write!(
            s,
            r#"{{"applicationId":"{}","deviceId":"sensor-{dev:05}","schema":"default@v1","templateId":"{template}","enqueuedTime":"{ts}","enrichments":{{"site":"plant-{}"}}"#,
            c.application_id,
            dev % c.sites as u64
        );
        if x < m.telemetry {
            s.push_str(r#","messageSource":"telemetry","telemetry":{"#);
            for (k, (name, spec)) in c.fields.iter().enumerate() {
                if k > 0 {
                    s.push(',');
                }
                crate::event::write_json_str(&mut s, name);
                s.push(':');
                write_value(&mut s, spec, dev, &mut r);
            }
            let _ = write!(s, r#"}},"messageProperties":{{"iothub-creation-time-utc":"{ts}"}}"#);
            let component_devices = (c.component_share * c.devices as f64).round() as u64;
            if dev < component_devices {
                s.push_str(r#","component":"thermostat1""#);
            }
        } else if x < m.telemetry + m.properties {
            let mt = if r.unit() < 0.5 { "devicePropertyReportedChange" } else { "cloudPropertyChange" };
            let _ = write!(
                s,
                r#","messageSource":"properties","messageType":"{mt}","properties":[{{"name":"firmwareVersion","value":"1.{}.0"}}]"#,
                dev % 4
            );
        } else if x < m.telemetry + m.properties + m.connectivity {
            let mt = if r.unit() < 0.7 { "connected" } else { "disconnected" };
            let _ = write!(s, r#","messageSource":"deviceConnectivity","messageType":"{mt}""#);
        } else {
            s.push_str(r#","messageSource":"deviceLifecycle","messageType":"registered""#);
        }
        s.push('}');
        s
    }
}

fn write_value(s: &mut String, spec: &FieldSpec, dev: u64, r: &mut Rng) {
    let round = |x: f64, d: u32| {
        let m = 10f64.powi(d as i32);
        (x * m).round() / m
    };
    match spec {
        FieldSpec::Normal { mean, stddev, device_spread, decimals } => {
            let v = mean + device_spread * (dev % 10) as f64 + stddev * r.gauss();
            crate::event::write_json_f64(s, round(v, *decimals));
        }
        FieldSpec::Uniform { min, max, decimals } => {
            crate::event::write_json_f64(s, round(min + (max - min) * r.unit(), *decimals));
        }
        FieldSpec::Integer { min, max } => {
            let v = min + r.below((max - min + 1) as u64) as i64;
            let _ = write!(s, "{v}");
        }
        FieldSpec::Choice { values } => {
            let v = &values[r.below(values.len() as u64) as usize];
            crate::event::write_json_str(s, v);
        }
        FieldSpec::Geopoint { lat, lon } => {
            let _ = write!(s, r#"{{"lat":{},"lon":{},"alt":12.0}}"#, round(lat + dev as f64 * 1e-4, 6), round(*lon, 6));
        }
    }
}

pub struct SimulatorSource {
    gen: Generator,
    projection: Option<Arc<Projection>>,
    next: u64,
    name: String,
    batch: usize,
}

impl SimulatorSource {
    pub fn new(cfg: SimulatorConfig, cx: &BuildCx<'_>) -> anyhow::Result<SimulatorSource> {
        if cx.mode == Mode::Replay && cfg.count.is_none() && cfg.duration.is_none() {
            anyhow::bail!("a simulator in a replay needs `count` or `duration` (a replay runs until its sources end)");
        }
        let mut next = 0;
        if let Some(state) = cx.restored.as_deref().filter(|s| !s.is_empty()) {
            let (n, start): (u64, Nanos) =
                postcard::from_bytes(state).context("simulator state in the checkpoint is corrupt")?;
            next = n;
            // keep the original start so that event times continue where they were
            let mut cfg = cfg.clone();
            cfg.start = Some(Parsed::new(crate::time::format_rfc3339(start)));
            let batch = cfg.batch_size;
            return Ok(SimulatorSource {
                gen: Generator::new(cfg, 0)?,
                projection: cx.projection.clone(),
                next,
                name: cx.name.to_string(),
                batch,
            });
        }
        let batch = cfg.batch_size;
        Ok(SimulatorSource {
            gen: Generator::new(cfg, crate::time::now_nanos())?,
            projection: cx.projection.clone(),
            next,
            name: cx.name.to_string(),
            batch,
        })
    }

    fn make_batch(&self, from: u64, to: u64) -> (Vec<Event>, Vec<Event>) {
        let mut events = Vec::with_capacity((to - from) as usize);
        let mut dead = Vec::new();
        for i in from..to {
            let text = Bytes::from(self.gen.message(i));
            match decode_object_projected(text.clone(), self.projection.as_ref()) {
                Ok(mut ev) => {
                    ev.meta.offset = i as i64;
                    events.push(ev);
                }
                Err(reason) => {
                    dead.push(Event::dead_letter(text, &reason, &format!("simulator message {i}"), &self.name))
                }
            }
        }
        (events, dead)
    }

    fn position(&self) -> Vec<u8> {
        postcard::to_allocvec(&(self.next, self.gen.start)).unwrap_or_default()
    }
}

#[async_trait]
impl Source for SimulatorSource {
    async fn run(&mut self, cx: &mut SourceCx) -> anyhow::Result<EndReason> {
        let limit = self.gen.limit().unwrap_or(u64::MAX);
        if let Some(l) = self.gen.limit() {
            cx.progress.total_events.fetch_add(l, std::sync::atomic::Ordering::Relaxed);
        }
        let paced = cx.mode == Mode::Live;
        // in live mode, message i is due at t0 + i/rate (resuming: continue from now)
        let t0 = Instant::now() - self.gen.due(self.next);
        loop {
            while let Some(c) = cx.try_control() {
                match c {
                    Control::Barrier(e) => cx.barrier(e, self.position()).await?,
                    Control::Stop | Control::Shutdown => return Ok(EndReason::Stopped),
                    _ => {}
                }
            }
            if self.next >= limit {
                return Ok(EndReason::Exhausted);
            }
            let mut end = (self.next + self.batch as u64).min(limit);
            if paced {
                let elapsed = t0.elapsed();
                let due_now = ((elapsed.as_nanos() as f64) / self.gen.step).floor() as u64 + 1;
                end = end.min(due_now.max(self.next));
                if end <= self.next {
                    let wait = self.gen.due(self.next).saturating_sub(elapsed).min(Duration::from_millis(100));
                    tokio::select! {
                        c = cx.control() => match c {
                            Control::Barrier(e) => cx.barrier(e, self.position()).await?,
                            Control::Stop | Control::Shutdown => return Ok(EndReason::Stopped),
                            _ => {}
                        },
                        _ = tokio::time::sleep(wait) => {}
                    }
                    continue;
                }
            }
            let (events, dead) = self.make_batch(self.next, end);
            self.next = end;
            cx.send(Batch::new(events)).await?;
            cx.dead_letter(dead).await?;
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        self.position()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SimulatorConfig {
        serde_json::from_value(
            serde_json::json!({"devices": 50, "rate": 10, "count": 2000, "start": "2026-11-01T00:00:00Z", "seed": 7}),
        )
        .unwrap()
    }

    #[test]
    fn messages_are_deterministic_and_decodable() {
        let g = Generator::new(cfg(), 0).unwrap();
        let g2 = Generator::new(cfg(), 123).unwrap();
        let mut kinds = std::collections::HashMap::new();
        let mut late = 0;
        for i in 0..2000 {
            let m = g.message(i);
            assert_eq!(m, g2.message(i));
            let ev = crate::model::decode::decode_object(Bytes::from(m.clone())).unwrap_or_else(|e| panic!("{e}: {m}"));
            *kinds.entry(ev.get_str("messageSource").unwrap().to_string()).or_insert(0) += 1;
            let nominal = crate::time::parse_rfc3339("2026-11-01T00:00:00Z").unwrap() + i as i64 * 100_000_000;
            assert!(ev.time <= nominal && ev.time >= nominal - 20_000_000_000, "message {i} time");
            if ev.time < nominal {
                late += 1;
            }
            if ev.get_str("messageSource") == Some("telemetry") {
                let t = ev.get_path(&["telemetry", "temperature"]).unwrap().as_f64().unwrap();
                assert!((0.0..50.0).contains(&t));
                assert!(ev.get_path(&["telemetry", "location", "lat"]).is_some());
                assert_eq!(
                    ev.get_path(&["messageProperties", "iothub-creation-time-utc"]).unwrap().as_time(),
                    Some(ev.time)
                );
            }
        }
        let tel = kinds["telemetry"];
        assert!((1700..1900).contains(&tel), "{kinds:?}");
        assert!(kinds["properties"] > 100, "{kinds:?}");
        assert!((10..80).contains(&late), "late share about 2%: {late}");
    }

    #[test]
    fn duration_and_count_bound_the_stream() {
        let mut c = cfg();
        c.duration = Some(Dur::new("1m"));
        assert_eq!(Generator::new(c.clone(), 0).unwrap().limit(), Some(600));
        c.count = Some(100);
        assert_eq!(Generator::new(c, 0).unwrap().limit(), Some(100));
    }
}
