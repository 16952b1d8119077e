//! Pipeline definitions: YAML in, a validated [`Plan`] out.
//!
//! Validation is pure (no network, no files beyond the YAML) and collects every error, each
//! with its YAML path and line:column. It runs in three passes:
//! 1. structure, against the JSON Schema of each component's type (unknown fields, wrong types,
//!    missing fields), so that all structural mistakes are reported at once;
//! 2. values, by each component's [`Spec`] (durations, expressions, URLs, secrets);
//! 3. the graph (unknown inputs and ports, cycles, components that lead nowhere).
//!
//! `centralflow schema` prints the JSON Schema of the whole format (from the same types).

mod checker;
mod graph;
mod registry;
mod structure;
pub mod values;
mod variants;
pub mod yaml;

pub use checker::{dotted, Checker, ConfigError};
pub use graph::projection_for;
use graph::semantic;
pub use structure::suggest;
use structure::{sorted, structure, typed, yaml_path};

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use yaml::Pos;
use yaml::SourceMap;

use crate::sinks::SinkConfig;
use crate::sources::SourceConfig;
use crate::transforms::TransformConfig;

/// A whole pipeline file.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Name of the pipeline, used for its checkpoints and in metrics. Defaults to the file name.
    #[serde(default)]
    pub name: Option<String>,
    /// Where events come from.
    #[serde(default)]
    pub sources: IndexMap<String, SourceConfig>,
    /// Per-event functions and windowed aggregations.
    #[serde(default)]
    pub transforms: IndexMap<String, TransformConfig>,
    /// Where results go.
    #[serde(default)]
    pub sinks: IndexMap<String, SinkConfig>,
    /// Checkpoints (state and positions) for restart without loss. Without it, a stopped
    /// pipeline flushes everything it holds and a restart starts over.
    #[serde(default)]
    pub checkpoint: Option<CheckpointConfig>,
    /// The HTTP endpoint for metrics and health (`centralflow run` only).
    #[serde(default)]
    pub api: Option<ApiConfig>,
}

/// Checkpoint settings.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Folder or object-store URL for checkpoints. Without it, barriers still commit output
    /// every `interval`, but nothing is kept for a restart.
    #[serde(default)]
    pub url: Option<String>,
    /// Time between checkpoints (e.g. `10s`).
    #[serde(default = "default_interval")]
    pub interval: values::Dur,
    /// Object-store options for `url` (same keys as the cloud's environment variables, lower case).
    #[serde(default)]
    pub storage: BTreeMap<String, String>,
}

fn default_interval() -> values::Dur {
    values::Dur::new("10s")
}

impl CheckpointConfig {
    /// The interval.
    pub fn interval(&self) -> anyhow::Result<Duration> {
        self.interval.get().map_err(|e| e.context("checkpoint.interval"))
    }
}

/// Operations endpoint settings.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Address to listen on (default `127.0.0.1:8686`).
    #[serde(default = "default_api_address")]
    pub address: String,
    /// Set to false to run without the endpoint.
    #[serde(default = "yes")]
    pub enabled: bool,
}

fn default_api_address() -> String {
    "127.0.0.1:8686".into()
}
fn yes() -> bool {
    true
}

/// Implemented by every component configuration.
pub trait Spec {
    /// Checks values beyond the schema; `ptr` is the component's JSON pointer (`/sources/export`).
    fn check(&self, ptr: &str, cx: &mut Checker<'_>);
    /// Names of the components (or `component.port`) it reads.
    fn inputs(&self) -> &[String] {
        &[]
    }
    /// Its output ports: the main output first, then named secondary outputs, each declared
    /// as a constant that the component emits to (checked when the plan is built).
    fn ports(&self) -> Vec<crate::runtime::Port> {
        vec![crate::runtime::Port::MAIN]
    }
    /// What it reads of the events it receives, so that sources can decode only that.
    fn needs(&self) -> Needs {
        Needs::All
    }
    /// Whether it passes the events it receives on to its main output (a filter does; a window
    /// or a sink does not).
    fn forwards(&self) -> bool {
        false
    }
    /// Checks it once it is known to keep its state per input partition (it is fed by a source
    /// whose partitions move between instances).
    fn check_partitioned(&self, _ptr: &str, _cx: &mut Checker<'_>) {}
    /// Sources: its partitions move between the instances that run the pipeline, so the state
    /// of the transforms it feeds is kept per partition (Event Hubs).
    fn hands_over_partitions(&self) -> bool {
        false
    }
    /// Sinks: it reads derived rows as Arrow columns ([`crate::event::Batch::columns`]); the
    /// runtime sends columns on a port only when all its consumers do.
    fn accepts_columns(&self) -> bool {
        false
    }
    /// Sources that `centralflow replay --from/--to` can limit to a time range: where the range
    /// goes (`None`: the source has no such range).
    fn replay_range(&mut self) -> Option<&mut Option<ReplayRange>> {
        None
    }
}

/// A time range of a replay (`--from`, `--to`), each end optional.
pub type ReplayRange = (Option<crate::event::Nanos>, Option<crate::event::Nanos>);

/// What a component reads of its input events.
#[derive(Debug, Clone)]
pub enum Needs {
    /// Anything (it writes whole events, or evaluates arbitrary expressions).
    All,
    /// These fields only.
    Fields(Vec<crate::path::FieldPath>),
}

pub use crate::runtime::Role;

/// A component's configuration, by role.
#[derive(Debug, Clone)]
pub enum ComponentConfig {
    Source(SourceConfig),
    Transform(TransformConfig),
    Sink(SinkConfig),
}

/// One component of a validated plan.
#[derive(Debug, Clone)]
pub struct PlanNode {
    pub name: String,
    pub role: Role,
    /// Its `type`.
    pub kind: &'static str,
    /// Upstream (node index, output port).
    pub inputs: Vec<(usize, usize)>,
    /// Output ports: `""` (main) then the named secondary outputs.
    pub ports: Vec<&'static str>,
    /// Sources: their partitions move between instances ([`Spec::hands_over_partitions`]).
    pub hands_over: bool,
    /// Sinks: they read rows as Arrow columns ([`Spec::accepts_columns`]).
    pub accepts_columns: bool,
    pub fingerprint: u64,
    pub config: ComponentConfig,
    /// Sources: the fields the pipeline reads of their events (`None`: all).
    pub projection: Option<std::sync::Arc<crate::projection::Projection>>,
    /// Transforms: a source upstream hands partitions over between instances, so state is
    /// kept per input partition.
    pub partitioned: bool,
}

/// A validated pipeline, ready to run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub name: String,
    pub nodes: Vec<PlanNode>,
    pub checkpoint: Option<CheckpointConfig>,
    pub api: Option<ApiConfig>,
    pub warnings: Vec<ConfigError>,
}

impl Plan {
    /// Index of a node by name.
    pub fn node(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }
}

/// The JSON Schema of the pipeline format.
pub fn json_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(PipelineConfig)).unwrap_or_default()
}

/// Reads and validates a pipeline file, interpolating from the process environment.
pub fn load_file(path: &std::path::Path) -> Result<Plan, Vec<ConfigError>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![ConfigError { path: String::new(), pos: None, message: format!("cannot read {}: {e}", path.display()) }]
    })?;
    let default_name = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "pipeline".into());
    load_str(&text, &default_name, &|k| std::env::var(k).ok())
}

/// Validates pipeline text. `env` resolves `${VAR}`.
pub fn load_str(
    text: &str,
    default_name: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Plan, Vec<ConfigError>> {
    let (mut value, map, issues) = yaml::parse(text, env)
        .map_err(|i| vec![ConfigError { path: yaml_path(&i.pointer), pos: i.pos, message: i.message }])?;
    let mut cx = Checker::new(&map);
    for i in issues {
        cx.errors.push(ConfigError { path: yaml_path(&i.pointer), pos: i.pos, message: i.message });
    }
    structure(&mut value, &mut cx);
    // Components with structural errors are left out of the later passes (but still count as
    // existing, so that nothing else is reported about them); the rest are checked fully, so
    // that one run reports every mistake.
    let invalid: std::collections::BTreeSet<String> = cx.errors.iter().filter_map(|e| component_of(&e.path)).collect();
    let config = typed(&value, &invalid, &mut cx);
    let plan = semantic(config, &value, default_name, &invalid, &mut cx);
    if !cx.errors.is_empty() {
        return Err(sorted(cx.errors));
    }
    let mut plan = plan.expect("a plan when there are no errors");
    plan.warnings = cx.warnings;
    Ok(plan)
}

/// `sources.a.url` -> `a` (the component an error is about, if any).
fn component_of(dotted_path: &str) -> Option<String> {
    let mut parts = dotted_path.splitn(3, '.');
    match (parts.next(), parts.next()) {
        (Some("sources" | "transforms" | "sinks"), Some(name)) => {
            Some(name.split('[').next().unwrap_or(name).to_string())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests;
