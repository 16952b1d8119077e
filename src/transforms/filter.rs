//! `filter`: keeps the events for which a condition is true.
//!
//! A condition that fails to evaluate (a type error, say) sends the event to the transform's
//! `dead_letter` output with the reason; `()` (a missing field) counts as false.

use rayon::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::dead_letter_of;
use crate::config::values::Expression;
use crate::config::{Checker, Spec};
use crate::event::Batch;
use crate::expr::Expr;
use crate::metrics::ComponentMetrics;
use crate::runtime::{BuildCx, Emitter, Port, Transform};

/// Events it could not process.
pub const DEAD_LETTER: Port = Port::DEAD_LETTER;

/// Keeps events matching a condition.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    pub inputs: Vec<String>,
    /// An expression that is true for the events to keep, e.g. `messageSource == "telemetry"`.
    pub condition: Expression,
}

impl Spec for FilterConfig {
    fn check(&self, ptr: &str, cx: &mut Checker<'_>) {
        cx.expr(&format!("{ptr}/condition"), &self.condition);
    }
    fn inputs(&self) -> &[String] {
        &self.inputs
    }
    fn ports(&self) -> Vec<Port> {
        vec![Port::MAIN, DEAD_LETTER]
    }
    fn needs(&self) -> crate::config::Needs {
        // `field == "text"` reads one field; anything else may read any
        match self.condition.value().ok().and_then(|e| e.compared_field().cloned()) {
            Some(f) => crate::config::Needs::Fields(vec![f]),
            None => crate::config::Needs::All,
        }
    }
    fn forwards(&self) -> bool {
        true
    }
}

pub struct Filter {
    expr: Expr,
    name: String,
    metrics: ComponentMetrics,
}

impl Filter {
    pub fn new(cfg: &FilterConfig, cx: &BuildCx<'_>) -> anyhow::Result<Filter> {
        let expr = cfg.condition.get()?;
        Ok(Filter { expr, name: cx.name.to_string(), metrics: cx.metrics.clone() })
    }
}

impl Transform for Filter {
    fn process(&mut self, batch: Batch, out: &mut Emitter) {
        let expr = &self.expr;
        let mut events = batch.events;
        let mut dead = Vec::new();
        let mut judge = |ev: &crate::event::Event, verdict: Result<bool, String>| match verdict {
            Ok(keep) => keep,
            Err(reason) => {
                dead.push(dead_letter_of(ev, &reason, &self.name));
                false
            }
        };
        // verdicts first (prefetching the events ahead, which were decoded on another core),
        // then kept events move in place, at most once
        let verdicts: Vec<Result<bool, String>> = if events.len() >= *super::PARALLEL_BATCH {
            events.par_iter().map(|ev| expr.eval_bool(ev)).collect()
        } else {
            (0..events.len())
                .map(|i| {
                    crate::event::prefetch_ahead(&events, i);
                    expr.eval_bool(&events[i])
                })
                .collect()
        };
        let mut verdicts = verdicts.into_iter();
        events.retain(|ev| judge(ev, verdicts.next().unwrap_or(Ok(false))));
        self.metrics.dead_letters.inc_by(dead.len() as u64);
        for d in dead {
            out.emit_to(DEAD_LETTER, d);
        }
        out.set_main(events);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Event;

    fn events(lines: &[&str]) -> Batch {
        Batch::new(
            lines
                .iter()
                .map(|l| crate::model::decode::decode_one(bytes::Bytes::from(l.to_string())).unwrap())
                .collect(),
        )
    }

    fn run(condition: &str, input: Batch) -> (Vec<Event>, Vec<Event>) {
        let cfg = FilterConfig { inputs: vec![], condition: Expression::new(condition) };
        let mut f = Filter {
            expr: cfg.condition.get().unwrap(),
            name: "f".into(),
            metrics: ComponentMetrics::new("f", "filter"),
        };
        let mut em = Emitter::new(&["", "dead_letter"]);
        f.process(input, &mut em);
        let mut ports = em.take().into_iter();
        (ports.next().unwrap(), ports.next().unwrap())
    }

    #[test]
    fn keeps_matching_and_dead_letters_errors() {
        let input = events(&[
            r#"{"messageSource":"telemetry","enqueuedTime":"2026-11-01T00:00:00Z","telemetry":{"t":1}}"#,
            r#"{"messageSource":"properties","enqueuedTime":"2026-11-01T00:00:00Z"}"#,
            r#"{"messageSource":"telemetry","enqueuedTime":"2026-11-01T00:00:00Z","telemetry":{"t":"x"}}"#,
        ]);
        // arithmetic on a string, or on a missing field, is an error: both go to dead_letter
        let (kept, dead) = run("t / 1 > 0", input.clone());
        assert_eq!(kept.len(), 1);
        assert_eq!(dead.len(), 2);
        let reason = dead[0].get_str("reason").unwrap();
        assert!(reason.contains("t / 1 > 0"), "{reason}");
        assert!(matches!(dead[0].get("payload"), Some(crate::event::ValRef::Bytes(b)) if b.starts_with(b"{")));
        let (kept, dead) = run(r#"messageSource == "telemetry""#, input);
        assert_eq!((kept.len(), dead.len()), (2, 0));
    }

    #[test]
    fn large_batches_keep_their_order() {
        let lines: Vec<String> = (0..3000)
            .map(|i| {
                format!(
                    r#"{{"messageSource":"telemetry","enqueuedTime":"2026-11-01T00:00:00Z","telemetry":{{"n":{i}}}}}"#
                )
            })
            .collect();
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let (kept, _) = run("n % 3 == 0", events(&refs));
        let ns: Vec<i64> = kept.iter().map(|e| e.get_path(&["telemetry", "n"]).unwrap().as_i64().unwrap()).collect();
        assert_eq!(ns, (0..3000).filter(|n| n % 3 == 0).collect::<Vec<_>>());
    }
}
