//! `jq`: runs a jq program (IoT Central's own transformation language, through jaq) on each
//! event. Each value the program outputs becomes one event (0, 1 or many per input): a JSON
//! record whose fields are the output object's (a value that is not an object becomes
//! `{"value": ...}`), with event time from `time:` in the output, else the input event's time,
//! and the input's metadata.
//!
//! `input: export` gives the program the message as exported; `input: iotc` the shape IoT
//! Central gives its own transformations ([`iotc`]), with `import "iotc" as iotc;` and
//! `iotc::find` available, so the documented IoT Central examples run unchanged. The program is
//! compiled once, when the pipeline is read; a record on which it errs, runs longer than
//! `timeout` or emits more than `max_outputs` is dead-lettered with the reason (see
//! [`program`] for how runaway programs are stopped) and the pipeline goes on.

pub mod iotc;
pub mod program;

use std::sync::Arc;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use self::program::Program;
use crate::config::values::{self, Dur, Parsed};
use crate::config::{Checker, Needs, Spec};
use crate::event::{Batch, Event};
use crate::metrics::ComponentMetrics;
use crate::model::generic::{decode_generic_with, GenericOptions, Transport};
use crate::path::FieldPath;
use crate::runtime::{BuildCx, Emitter, Port, Transform};

/// Records the program erred on, ran too long on or emitted too much for.
pub const DEAD_LETTER: Port = Port::DEAD_LETTER;

/// A compiled program, shared.
#[derive(Clone, Debug)]
pub struct Compiled(pub Arc<Program>);

impl values::Parse for Compiled {
    fn parse(text: &str) -> Result<Self, String> {
        Program::compile(text).map(|p| Compiled(Arc::new(p)))
    }
}

/// A program read from a file (the path as written), compiled.
#[derive(Clone, Debug)]
pub struct CompiledFile(pub Arc<Program>);

impl values::Parse for CompiledFile {
    fn parse(path: &str) -> Result<Self, String> {
        let code = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
        Program::compile(&code).map(|p| CompiledFile(Arc::new(p))).map_err(|e| format!("in {path}: {e}"))
    }
}

/// Runs a jq program on each event.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JqConfig {
    pub inputs: Vec<String>,
    /// The jq program, e.g. `.telemetry | map({key: .name, value: .value}) | from_entries`.
    #[serde(default)]
    pub program: Option<Parsed<Compiled>>,
    /// Or a file holding it (relative to the working directory).
    #[serde(default)]
    pub program_file: Option<Parsed<CompiledFile>>,
    /// What the program sees: `export` (the message as exported) or `iotc` (the input IoT
    /// Central gives its own transformations).
    #[serde(default)]
    pub input: JqInput,
    /// The event time of outputs: a field of the output (RFC 3339 or epoch milliseconds).
    /// Default: the input event's time.
    #[serde(default)]
    pub time: Option<values::Path>,
    /// The longest the program may run on one record.
    #[serde(default = "d_timeout")]
    pub timeout: Dur,
    /// The most outputs the program may emit for one record.
    #[serde(default = "d_max_outputs")]
    pub max_outputs: usize,
}

/// What a jq program is given.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum JqInput {
    #[default]
    Export,
    Iotc,
}

fn d_timeout() -> Dur {
    Dur::new("1s")
}
fn d_max_outputs() -> usize {
    1000
}

impl Spec for JqConfig {
    fn check(&self, ptr: &str, cx: &mut Checker<'_>) {
        match (&self.program, &self.program_file) {
            (Some(p), None) => {
                cx.valid(&format!("{ptr}/program"), p);
            }
            (None, Some(f)) => {
                cx.valid(&format!("{ptr}/program_file"), f);
            }
            _ => cx.error(ptr, "needs one of `program` (inline) or `program_file`"),
        }
        cx.positive_duration(&format!("{ptr}/timeout"), &self.timeout);
        if self.max_outputs == 0 {
            cx.error(&format!("{ptr}/max_outputs"), "must be at least 1");
        }
        if let Some(t) = &self.time {
            cx.valid(&format!("{ptr}/time"), t);
        }
    }
    fn inputs(&self) -> &[String] {
        &self.inputs
    }
    fn ports(&self) -> Vec<Port> {
        vec![Port::MAIN, DEAD_LETTER]
    }
    fn needs(&self) -> Needs {
        // a program may read any field
        Needs::All
    }
}

pub struct Jq {
    program: Arc<Program>,
    input: JqInput,
    time: Option<FieldPath>,
    timeout: Duration,
    max_outputs: usize,
    name: String,
    metrics: ComponentMetrics,
}

impl Jq {
    pub fn new(cfg: &JqConfig, cx: &BuildCx<'_>) -> anyhow::Result<Jq> {
        let program = match (&cfg.program, &cfg.program_file) {
            (Some(p), _) => p.get()?.0,
            (None, Some(f)) => f.get()?.0,
            (None, None) => anyhow::bail!("needs `program` or `program_file`"),
        };
        Ok(Jq {
            program,
            input: cfg.input,
            time: cfg.time.as_ref().map(|p| p.get()).transpose()?,
            timeout: cfg.timeout.get()?,
            max_outputs: cfg.max_outputs,
            name: cx.name.to_string(),
            metrics: cx.metrics.clone(),
        })
    }

    /// The outputs of one event, as events.
    pub fn apply(&self, ev: &Event) -> Result<Vec<Event>, String> {
        let text = match self.input {
            JqInput::Export => ev.to_json(),
            JqInput::Iotc => iotc::input_of(ev)?.to_string(),
        };
        let input = program::parse(&text)?;
        let outs = self.program.run(input, self.timeout, self.max_outputs).map_err(|e| e.to_string())?;
        outs.iter().map(|v| self.event_of(&program::to_json(v), ev)).collect()
    }

    /// A record from one output (JSON text), with the input's metadata: decoded as any record of
    /// generic shape is ([`crate::model::generic`]), the input's time standing in for a transport's.
    fn event_of(&self, json: &str, input: &Event) -> Result<Event, String> {
        let text = if json.trim_start().starts_with('{') { json.to_string() } else { format!("{{\"value\":{json}}}") };
        let opts = GenericOptions { time: self.time.clone(), device_id: None };
        let transport = Transport { enqueued: input.time, device_id: None };
        let mut got = None;
        decode_generic_with(bytes::Bytes::from(text), &opts, &transport, |r| got = Some(r));
        let mut ev = match got {
            Some(Ok(ev)) => ev,
            Some(Err(e)) => return Err(format!("output {json:.80}: {e}")),
            None => return Err(format!("output {json:.80} is not JSON")),
        };
        let time = ev.time;
        ev.meta = input.meta.clone();
        ev.time = time;
        Ok(ev)
    }
}

impl Transform for Jq {
    fn process(&mut self, batch: Batch, out: &mut Emitter) {
        for ev in batch.events {
            match self.apply(&ev) {
                Ok(outs) => out.emit_all(outs),
                Err(reason) => {
                    out.emit_to(DEAD_LETTER, super::dead_letter_of(&ev, &reason, &self.name));
                    self.metrics.dead_letters.inc();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
