//! `map`: derives, renames and removes fields.
//!
//! `set` evaluates expressions in order (a later one sees what an earlier one set), then
//! `rename`, then `remove`. Paths follow [`FieldPath`](crate::path::FieldPath): a bare name is
//! an existing top-level field, else a telemetry field. A failing expression sends the event to
//! `dead_letter` (default) or, with `on_error: null`, sets the field to null and goes on.

use indexmap::IndexMap;
use rayon::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{dead_letter_of, PARALLEL_BATCH};
use crate::config::values::{Expression, Path};
use crate::config::{Checker, Spec};
use crate::event::{Batch, Event, Value};
use crate::expr::Expr;
use crate::metrics::ComponentMetrics;
use crate::path::FieldPath;
use crate::runtime::{BuildCx, Emitter, Port, Transform};

/// Events it could not process.
pub const DEAD_LETTER: Port = Port::DEAD_LETTER;

/// Derives, renames and removes fields.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MapConfig {
    pub inputs: Vec<String>,
    /// `path: expression`, evaluated in order.
    #[serde(default)]
    pub set: IndexMap<Path, Expression>,
    /// `from: to`; a bare `to` stays in the same object.
    #[serde(default)]
    pub rename: IndexMap<Path, Path>,
    /// Paths to remove.
    #[serde(default)]
    pub remove: Vec<Path>,
    /// What a failing expression does: `dead_letter` (the event goes there) or `null`.
    #[serde(default)]
    pub on_error: OnError,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    #[default]
    DeadLetter,
    Null,
}

impl Spec for MapConfig {
    fn check(&self, ptr: &str, cx: &mut Checker<'_>) {
        if self.set.is_empty() && self.rename.is_empty() && self.remove.is_empty() {
            cx.error(ptr, "does nothing: give at least one of `set`, `rename`, `remove`");
        }
        for (k, v) in &self.set {
            let p = format!("{ptr}/set/{}", crate::config::yaml::pointer_escape(k.text()));
            cx.valid(&p, k);
            cx.expr(&p, v);
        }
        for (k, v) in &self.rename {
            let p = format!("{ptr}/rename/{}", crate::config::yaml::pointer_escape(k.text()));
            cx.valid(&p, k);
            cx.valid(&p, v);
        }
        for (i, r) in self.remove.iter().enumerate() {
            cx.valid(&format!("{ptr}/remove/{i}"), r);
        }
    }
    fn inputs(&self) -> &[String] {
        &self.inputs
    }
    fn ports(&self) -> Vec<Port> {
        vec![Port::MAIN, DEAD_LETTER]
    }
}

pub struct Map {
    set: Vec<(FieldPath, Expr)>,
    rename: Vec<(FieldPath, FieldPath)>,
    remove: Vec<FieldPath>,
    on_error: OnError,
    name: String,
    metrics: ComponentMetrics,
}

impl Map {
    pub fn new(cfg: &MapConfig, cx: &BuildCx<'_>) -> anyhow::Result<Map> {
        Ok(Map {
            set: cfg.set.iter().map(|(k, v)| Ok((k.get()?, v.get()?))).collect::<anyhow::Result<_>>()?,
            rename: cfg.rename.iter().map(|(k, v)| Ok((k.get()?, v.get()?))).collect::<anyhow::Result<_>>()?,
            remove: cfg.remove.iter().map(Path::get).collect::<anyhow::Result<_>>()?,
            on_error: cfg.on_error,
            name: cx.name.to_string(),
            metrics: cx.metrics.clone(),
        })
    }

    /// Applies the map to one event; `Err` carries the reason for a dead letter.
    fn apply(&self, ev: &mut Event) -> Result<(), String> {
        for (p, e) in &self.set {
            let v = match e.eval(ev) {
                Ok(v) => v,
                Err(_) if self.on_error == OnError::Null => {
                    self.metrics.errors.inc();
                    Value::Null
                }
                Err(reason) => return Err(format!("set {p}: {reason}")),
            };
            if !p.set(ev, v) {
                return Err(format!("set {p}: the path crosses a value that is not an object"));
            }
        }
        for (from, to) in &self.rename {
            from.rename(to, ev);
        }
        for r in &self.remove {
            r.remove(ev);
        }
        Ok(())
    }
}

impl Transform for Map {
    fn process(&mut self, mut batch: Batch, out: &mut Emitter) {
        let results: Vec<Result<(), String>> = if batch.len() >= *PARALLEL_BATCH {
            batch.events.par_iter_mut().map(|ev| self.apply(ev)).collect()
        } else {
            batch.events.iter_mut().map(|ev| self.apply(ev)).collect()
        };
        let mut keep = Vec::with_capacity(batch.len());
        for (ev, r) in batch.events.into_iter().zip(results) {
            match r {
                Ok(()) => keep.push(ev),
                Err(reason) => {
                    self.metrics.dead_letters.inc();
                    out.emit_to(DEAD_LETTER, dead_letter_of(&ev, &reason, &self.name));
                }
            }
        }
        out.set_main(keep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(yaml: serde_json::Value) -> Map {
        let cfg: MapConfig = serde_json::from_value(yaml).unwrap();
        Map {
            set: cfg.set.iter().map(|(k, v)| (k.get().unwrap(), v.get().unwrap())).collect(),
            rename: cfg.rename.iter().map(|(k, v)| (k.get().unwrap(), v.get().unwrap())).collect(),
            remove: cfg.remove.iter().map(|r| r.get().unwrap()).collect(),
            on_error: cfg.on_error,
            name: "m".into(),
            metrics: ComponentMetrics::new("m", "map"),
        }
    }

    fn ev(json: &str) -> Event {
        crate::model::decode::decode_one(bytes::Bytes::from(json.to_string())).unwrap()
    }

    const MSG: &str = r#"{"messageSource":"telemetry","deviceId":"d1","enqueuedTime":"2026-11-01T00:00:00Z","telemetry":{"temperature":20.0,"data":"20.5, 60, 47.6, -122.3"}}"#;

    #[test]
    fn set_rename_remove() {
        let m = map(serde_json::json!({
            "inputs": [],
            "set": {"temperature_f": "temperature * 9 / 5 + 32", "double_f": "temperature_f * 2", "deviceId": "deviceId + \"-x\""},
            "rename": {"temperature": "temperature_c"},
            "remove": ["data"]
        }));
        let mut e = ev(MSG);
        m.apply(&mut e).unwrap();
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(
            v["telemetry"],
            serde_json::json!({"temperature_c": 20.0, "temperature_f": 68.0, "double_f": 136.0})
        );
        assert_eq!(v["deviceId"], "d1-x");
    }

    #[test]
    fn errors_go_to_dead_letter_or_null() {
        let mut m = map(serde_json::json!({"inputs": [], "set": {"bad": "data * 2"}}));
        let mut em = Emitter::new(&["", "dead_letter"]);
        m.process(Batch::new(vec![ev(MSG)]), &mut em);
        assert_eq!(em.port(Port::MAIN).len(), 0);
        assert_eq!(em.port(DEAD_LETTER).len(), 1);
        assert!(em.port(DEAD_LETTER)[0].get_str("reason").unwrap().starts_with("set bad:"));
        let mut m = map(serde_json::json!({"inputs": [], "set": {"bad": "data * 2"}, "on_error": "null"}));
        let mut em = Emitter::new(&["", "dead_letter"]);
        m.process(Batch::new(vec![ev(MSG)]), &mut em);
        assert_eq!(em.port(Port::MAIN).len(), 1);
        assert_eq!(em.port(Port::MAIN)[0].get_path(&["telemetry", "bad"]), Some(crate::event::ValRef::Null));
    }
}
