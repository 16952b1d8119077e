//! `dew_point`: the example of a compiled-in Rust transform. It derives the dew point from a
//! temperature (°C) and a relative humidity (%) with the Magnus formula (Sonntag's constants,
//! good to ±0.35 °C between -45 °C and 60 °C).
//!
//! A compiled-in transform is a config struct implementing [`Spec`] plus a type implementing
//! [`Transform`]; nothing else in the runtime changes. Events without both inputs pass through
//! unchanged and are counted in `skipped_values`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::values::Path;
use crate::config::{Checker, Spec};
use crate::event::{Batch, Value};
use crate::metrics::ComponentMetrics;
use crate::path::FieldPath;
use crate::runtime::{BuildCx, Emitter, Transform};

/// Adds the dew point computed from temperature and humidity.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DewPointConfig {
    pub inputs: Vec<String>,
    /// Temperature in °C.
    #[serde(default = "d_t")]
    pub temperature: Path,
    /// Relative humidity in %.
    #[serde(default = "d_h")]
    pub humidity: Path,
    /// Where to write the dew point (°C).
    #[serde(default = "d_o")]
    pub output: Path,
}

fn d_t() -> Path {
    Path::new("temperature")
}
fn d_h() -> Path {
    Path::new("humidity")
}
fn d_o() -> Path {
    Path::new("dew_point")
}

impl Spec for DewPointConfig {
    fn check(&self, ptr: &str, cx: &mut Checker<'_>) {
        for (field, v) in [("temperature", &self.temperature), ("humidity", &self.humidity), ("output", &self.output)] {
            cx.valid(&format!("{ptr}/{field}"), v);
        }
    }
    fn inputs(&self) -> &[String] {
        &self.inputs
    }
}

pub struct DewPoint {
    temperature: FieldPath,
    humidity: FieldPath,
    output: FieldPath,
    metrics: ComponentMetrics,
}

impl DewPoint {
    pub fn new(cfg: &DewPointConfig, cx: &BuildCx<'_>) -> anyhow::Result<DewPoint> {
        Ok(DewPoint {
            temperature: cfg.temperature.get()?,
            humidity: cfg.humidity.get()?,
            output: cfg.output.get()?,
            metrics: cx.metrics.clone(),
        })
    }
}

/// Dew point (°C) from temperature (°C) and relative humidity (%).
pub fn dew_point(t: f64, rh: f64) -> Option<f64> {
    if !(rh > 0.0 && rh <= 100.0) {
        return None;
    }
    const B: f64 = 17.62;
    const C: f64 = 243.12;
    let g = (rh / 100.0).ln() + B * t / (C + t);
    Some(C * g / (B - g))
}

impl Transform for DewPoint {
    fn process(&mut self, mut batch: Batch, out: &mut Emitter) {
        for ev in &mut batch.events {
            let t = self.temperature.get(ev).and_then(|v| v.as_f64());
            let h = self.humidity.get(ev).and_then(|v| v.as_f64());
            match (t, h) {
                (Some(t), Some(h)) => match dew_point(t, h) {
                    Some(d) => {
                        self.output.set(ev, Value::Float((d * 100.0).round() / 100.0));
                    }
                    None => {
                        self.metrics.skipped_values.inc();
                    }
                },
                _ => {
                    self.metrics.skipped_values.inc();
                }
            }
        }
        out.set_main(batch.events);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magnus_formula_matches_reference_values() {
        // reference: 20 °C at 50 % -> 9.26 °C; 30 °C at 80 % -> 26.17 °C; 0 °C at 100 % -> 0 °C
        for (t, rh, want) in [(20.0, 50.0, 9.26), (30.0, 80.0, 26.17), (0.0, 100.0, 0.0)] {
            let got = dew_point(t, rh).unwrap();
            assert!((got - want).abs() < 0.05, "{t} {rh}: {got}");
        }
        assert_eq!(dew_point(20.0, 0.0), None);
        assert_eq!(dew_point(20.0, 120.0), None);
    }

    #[test]
    fn adds_the_field_and_skips_incomplete_events() {
        let mk = |j: &str| crate::model::decode::decode_one(bytes::Bytes::from(j.to_string())).unwrap();
        let cfg: DewPointConfig = serde_json::from_value(serde_json::json!({"inputs": []})).unwrap();
        let mut d = DewPoint {
            temperature: cfg.temperature.get().unwrap(),
            humidity: cfg.humidity.get().unwrap(),
            output: cfg.output.get().unwrap(),
            metrics: ComponentMetrics::new("dp", "dew_point"),
        };
        let mut em = Emitter::new(&[""]);
        d.process(
            Batch::new(vec![
                mk(r#"{"messageSource":"telemetry","enqueuedTime":"2026-11-01T00:00:00Z","telemetry":{"temperature":20,"humidity":50}}"#),
                mk(r#"{"messageSource":"telemetry","enqueuedTime":"2026-11-01T00:00:00Z","telemetry":{"temperature":20}}"#),
            ]),
            &mut em,
        );
        let out = em.take().remove(0);
        assert_eq!(out[0].get_path(&["telemetry", "dew_point"]).unwrap().as_f64(), Some(9.26));
        assert!(out[1].get_path(&["telemetry", "dew_point"]).is_none());
        assert_eq!(d.metrics.skipped_values.get(), 1);
    }
}
