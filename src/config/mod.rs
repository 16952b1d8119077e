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

pub mod values;
pub mod yaml;

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

/// One configuration error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted YAML path (`transforms.per_minute.window.size`).
    pub path: String,
    pub pos: Option<Pos>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)?;
        if let Some(p) = self.pos {
            write!(f, " ({p})")?;
        }
        Ok(())
    }
}

/// Turns a JSON pointer into a dotted path: `/transforms/a/inputs/0` → `transforms.a.inputs[0]`.
pub fn dotted(pointer: &str) -> String {
    let mut out = String::new();
    for seg in pointer.split('/').skip(1) {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        if seg.parse::<usize>().is_ok() && !out.is_empty() {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&seg);
        }
    }
    out
}

/// Collects errors during validation, locating each by JSON pointer.
pub struct Checker<'a> {
    pub errors: Vec<ConfigError>,
    pub warnings: Vec<ConfigError>,
    map: &'a SourceMap,
}

impl<'a> Checker<'a> {
    pub fn new(map: &'a SourceMap) -> Checker<'a> {
        Checker { errors: Vec::new(), warnings: Vec::new(), map }
    }

    fn make(&self, pointer: &str, message: impl Into<String>) -> ConfigError {
        ConfigError { path: dotted(pointer), pos: self.map.locate(pointer), message: message.into() }
    }

    /// Records an error at a pointer.
    pub fn error(&mut self, pointer: &str, message: impl Into<String>) {
        let e = self.make(pointer, message);
        self.errors.push(e);
    }

    /// Records an error about a key itself (an unknown field): located at the key.
    pub fn error_at_key(&mut self, pointer: &str, message: impl Into<String>) {
        let mut e = self.make(pointer, message);
        if let Some(p) = self.map.keys.get(pointer) {
            e.pos = Some(*p);
        }
        self.errors.push(e);
    }

    /// Records a warning at a pointer.
    pub fn warn(&mut self, pointer: &str, message: impl Into<String>) {
        let e = self.make(pointer, message);
        self.warnings.push(e);
    }

    /// Reports a value that did not parse; returns it when it did.
    pub fn valid<'v, T: values::Parse>(&mut self, pointer: &str, v: &'v values::Parsed<T>) -> Option<&'v T> {
        match v.value() {
            Ok(t) => Some(t),
            Err(e) => {
                self.error(pointer, e.to_string());
                None
            }
        }
    }

    /// Checks a duration.
    pub fn duration(&mut self, pointer: &str, d: &values::Dur) -> Option<Duration> {
        self.valid(pointer, d).copied()
    }

    /// Checks a duration that must be longer than zero.
    pub fn positive_duration(&mut self, pointer: &str, d: &values::Dur) -> Option<Duration> {
        let d = self.duration(pointer, d)?;
        if d.is_zero() {
            self.error(pointer, "must be longer than zero");
            return None;
        }
        Some(d)
    }

    /// Checks an RFC 3339 timestamp.
    pub fn timestamp(&mut self, pointer: &str, t: &values::Timestamp) -> Option<crate::event::Nanos> {
        self.valid(pointer, t).copied()
    }

    /// Checks an expression.
    pub fn expr<'v>(&mut self, pointer: &str, e: &'v values::Expression) -> Option<&'v crate::expr::Expr> {
        self.valid(pointer, e)
    }

    /// Checks a storage location.
    pub fn url(&mut self, pointer: &str, url: &str) {
        if let Err(e) = crate::storage::check_url(url) {
            self.error(pointer, e);
        }
    }

    /// A secret must come from the environment as a whole `${VAR}`.
    pub fn secret(&mut self, pointer: &str, present: bool) {
        if !present {
            return;
        }
        match self.map.from_env.get(pointer) {
            Some(u) if u.whole => {}
            _ => self.error(pointer, "is a secret and must come from the environment: write it as ${VARIABLE}"),
        }
    }

    /// Checks `storage:` options: secret-looking keys must come from the environment.
    pub fn storage_options(&mut self, pointer: &str, opts: &BTreeMap<String, String>) {
        for (k, v) in opts {
            let lk = k.to_ascii_lowercase();
            let secret = ["key", "secret", "token", "password", "sas", "credential"].iter().any(|s| lk.contains(s))
                && !lk.ends_with("_name")
                && !lk.ends_with("_id")
                && !lk.contains("key_id")
                && !lk.contains("keyname");
            if secret {
                self.secret(&format!("{pointer}/{}", yaml::pointer_escape(k)), !v.is_empty());
                crate::secret::register(v);
            }
        }
    }
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

/// Deserializes the document, leaving out invalid components.
fn typed(
    value: &serde_json::Value,
    invalid: &std::collections::BTreeSet<String>,
    cx: &mut Checker<'_>,
) -> PipelineConfig {
    fn section<T: serde::de::DeserializeOwned>(
        value: &serde_json::Value,
        name: &str,
        invalid: &std::collections::BTreeSet<String>,
        cx: &mut Checker<'_>,
    ) -> IndexMap<String, T> {
        let mut out = IndexMap::new();
        if let Some(obj) = value.get(name).and_then(|v| v.as_object()) {
            for (k, v) in obj {
                if invalid.contains(k) {
                    continue;
                }
                match serde_path_to_error::deserialize::<_, T>(v) {
                    Ok(c) => {
                        out.insert(k.clone(), c);
                    }
                    Err(e) => {
                        let ptr =
                            format!("/{name}/{}/{}", yaml::pointer_escape(k), e.path().to_string().replace('.', "/"));
                        cx.error(ptr.trim_end_matches('/'), e.inner().to_string());
                    }
                }
            }
        }
        out
    }
    let opt = |key: &str, cx: &mut Checker<'_>| -> Option<serde_json::Value> {
        let v = value.get(key).filter(|v| !v.is_null())?;
        let _ = cx;
        Some(v.clone())
    };
    let checkpoint = opt("checkpoint", cx).and_then(|v| serde_json::from_value(v).ok());
    let api = opt("api", cx).and_then(|v| serde_json::from_value(v).ok());
    PipelineConfig {
        name: value.get("name").and_then(|n| n.as_str()).map(str::to_string),
        sources: section(value, "sources", invalid, cx),
        transforms: section(value, "transforms", invalid, cx),
        sinks: section(value, "sinks", invalid, cx),
        checkpoint,
        api,
    }
}

fn yaml_path(ptr: &str) -> String {
    dotted(ptr)
}

fn sorted(mut errs: Vec<ConfigError>) -> Vec<ConfigError> {
    errs.sort_by_key(|e| e.pos.map(|p| (p.line, p.column)).unwrap_or((u64::MAX, 0)));
    errs.dedup();
    errs
}

const TOP_LEVEL: [&str; 6] = ["name", "sources", "transforms", "sinks", "checkpoint", "api"];

/// Pass 1: the shape of the document and of each component, against JSON Schemas.
fn structure(value: &mut serde_json::Value, cx: &mut Checker<'_>) {
    let Some(root) = value.as_object_mut() else {
        cx.error("", "a pipeline file is a mapping with `sources`, `transforms` and `sinks`");
        return;
    };
    for key in root.keys() {
        if !TOP_LEVEL.contains(&key.as_str()) {
            let hint = suggest(key, &TOP_LEVEL);
            cx.error_at_key(&format!("/{}", yaml::pointer_escape(key)), format!("unknown field `{key}`{hint}"));
        }
    }
    if let Some(name) = root.get("name") {
        if !name.is_string() {
            cx.error("/name", "must be a string");
        }
    }
    for (section, types, schema_of) in SECTIONS {
        let Some(sec) = root.get_mut(section) else {
            continue;
        };
        if sec.is_null() {
            *sec = serde_json::Value::Object(Default::default());
            continue;
        }
        let Some(sec) = sec.as_object_mut() else {
            cx.error(&format!("/{section}"), "must be a mapping of component names to components");
            continue;
        };
        for (name, comp) in sec.iter_mut() {
            let ptr = format!("/{section}/{}", yaml::pointer_escape(name));
            if !valid_name(name) {
                cx.error(&ptr, format!("`{name}` is not a valid component name (letters, digits, `_` and `-`)"));
            }
            let Some(obj) = comp.as_object_mut() else {
                cx.error(&ptr, "must be a mapping with a `type`");
                continue;
            };
            let ty = match obj.get("type") {
                Some(serde_json::Value::String(t)) => t.clone(),
                Some(_) => {
                    cx.error(&format!("{ptr}/type"), "must be a string");
                    continue;
                }
                None => {
                    cx.error(&ptr, format!("has no `type` (one of: {})", types.join(", ")));
                    continue;
                }
            };
            let Some(schema) = schema_of(&ty) else {
                let hint = suggest(&ty, types);
                cx.error(
                    &format!("{ptr}/type"),
                    format!(
                        "unknown {} type `{ty}`{hint} (one of: {})",
                        &section[..section.len() - 1],
                        types.join(", ")
                    ),
                );
                continue;
            };
            let mut body = serde_json::Value::Object(obj.clone());
            body.as_object_mut().unwrap().remove("type");
            validate_against(&schema, &mut body, &ptr, cx);
            // keep coerced values
            let ty_val = serde_json::Value::String(ty);
            *obj = body.as_object().cloned().unwrap_or_default();
            obj.insert("type".into(), ty_val);
        }
    }
    for (key, schema) in [
        ("checkpoint", serde_json::to_value(schemars::schema_for!(CheckpointConfig)).unwrap()),
        ("api", serde_json::to_value(schemars::schema_for!(ApiConfig)).unwrap()),
    ] {
        if let Some(v) = root.get_mut(key) {
            if !v.is_null() {
                validate_against(&schema, v, &format!("/{key}"), cx);
            }
        }
    }
}

/// The component sections of a pipeline: their key, their `type` names, and each type's JSON
/// Schema.
type SchemaOf = fn(&str) -> Option<serde_json::Value>;
const SECTIONS: [(&str, &[&str], SchemaOf); 3] = [
    ("sources", crate::sources::TYPES, crate::sources::variant_schema),
    ("transforms", crate::transforms::TYPES, crate::transforms::variant_schema),
    ("sinks", crate::sinks::TYPES, crate::sinks::variant_schema),
];

fn valid_name(n: &str) -> bool {
    !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Validates `value` against `schema`, reporting every error; strings that came from the
/// environment are converted to numbers or booleans where the schema wants those.
fn validate_against(schema: &serde_json::Value, value: &mut serde_json::Value, base: &str, cx: &mut Checker<'_>) {
    // Draft 7 rules: compiling the 2020-12 meta-schema, which every validator is checked
    // against first, took 60 ms, most of every small replay's run time and 8% of W1's; draft 7's
    // takes under 5 ms. Our schemas (schemars) use only keywords that mean the same in both
    // drafts, which `schemas_mean_the_same_under_draft_7` checks.
    let validator = match jsonschema::options().with_draft(jsonschema::Draft::Draft7).build(schema) {
        Ok(v) => v,
        Err(e) => {
            cx.error(base, format!("internal: invalid schema: {e}"));
            return;
        }
    };
    for _round in 0..4 {
        let errors: Vec<SchemaError> = validator
            .iter_errors(value)
            .map(|e| SchemaError {
                path: e.instance_path.to_string(),
                kind: SchemaErrorKind::of(&e.kind),
                message: e.to_string(),
                schema_path: e.schema_path.to_string(),
            })
            .collect();
        if errors.is_empty() {
            return;
        }
        // Coerce interpolated strings, then validate again.
        let mut changed = false;
        for e in &errors {
            if let SchemaErrorKind::Type(wanted) = &e.kind {
                let full = format!("{base}{}", e.path);
                if cx.map.from_env.contains_key(&full) {
                    if let Some(v) = value.pointer_mut(&e.path) {
                        if let Some(c) = coerce(v, wanted) {
                            *v = c;
                            changed = true;
                        }
                    }
                }
            }
        }
        if changed {
            continue;
        }
        for e in errors {
            report_schema_error(schema, base, &e, cx);
        }
        return;
    }
}

fn coerce(v: &serde_json::Value, wanted: &str) -> Option<serde_json::Value> {
    let s = v.as_str()?.trim();
    let w = wanted.to_ascii_lowercase();
    if w.contains("integer") {
        if let Ok(i) = s.parse::<i64>() {
            return Some(i.into());
        }
    }
    if w.contains("number") {
        if let Ok(f) = s.parse::<f64>() {
            return serde_json::Number::from_f64(f).map(serde_json::Value::Number);
        }
    }
    if w.contains("boolean") {
        match s {
            "true" => return Some(true.into()),
            "false" => return Some(false.into()),
            _ => {}
        }
    }
    None
}

/// The parts of a JSON Schema validation error that we report.
struct SchemaError {
    path: String,
    kind: SchemaErrorKind,
    message: String,
    schema_path: String,
}

enum SchemaErrorKind {
    Unknown(Vec<String>),
    Required(String),
    Type(String),
    Enum(Vec<String>),
    Other,
}

impl SchemaErrorKind {
    fn of(k: &jsonschema::error::ValidationErrorKind) -> SchemaErrorKind {
        use jsonschema::error::ValidationErrorKind as K;
        match k {
            K::AdditionalProperties { unexpected } => SchemaErrorKind::Unknown(unexpected.clone()),
            K::Required { property } => SchemaErrorKind::Required(property.as_str().unwrap_or("?").to_string()),
            K::Type { kind } => {
                let dbg = format!("{kind:?}").to_ascii_lowercase();
                let mut found: Vec<(usize, &str)> =
                    ["integer", "number", "string", "boolean", "array", "object", "null"]
                        .iter()
                        .filter_map(|t| dbg.find(t).map(|i| (i, *t)))
                        .collect();
                found.sort();
                SchemaErrorKind::Type(found.iter().map(|(_, t)| *t).collect::<Vec<_>>().join(" | "))
            }
            K::Enum { options } => SchemaErrorKind::Enum(
                options.as_array().map(|a| a.iter().map(|o| o.to_string()).collect()).unwrap_or_default(),
            ),
            _ => SchemaErrorKind::Other,
        }
    }
}

fn report_schema_error(schema: &serde_json::Value, base: &str, e: &SchemaError, cx: &mut Checker<'_>) {
    let ptr = format!("{base}{}", e.path);
    match &e.kind {
        SchemaErrorKind::Unknown(unexpected) => {
            let known = known_properties(schema, &e.schema_path);
            let known_refs: Vec<&str> = known.iter().map(String::as_str).collect();
            for u in unexpected {
                let hint = suggest(u, &known_refs);
                let list =
                    if known.is_empty() { String::new() } else { format!(" (known fields: {})", known.join(", ")) };
                cx.error_at_key(
                    &format!("{ptr}/{}", yaml::pointer_escape(u)),
                    format!("unknown field `{u}`{hint}{list}"),
                );
            }
        }
        SchemaErrorKind::Required(property) => {
            cx.error(&ptr, format!("missing required field `{property}`"));
        }
        SchemaErrorKind::Type(wanted) => {
            cx.error(&ptr, format!("must be {}", wanted.replace("null", "nothing").replace(" | ", " or ")));
        }
        SchemaErrorKind::Enum(opts) => {
            cx.error(&ptr, format!("must be one of {}", opts.join(", ")));
        }
        SchemaErrorKind::Other => cx.error(&ptr, redact_value(&e.message)),
    }
}

fn redact_value(msg: &str) -> String {
    crate::secret::redact(msg)
}

/// Property names allowed at the object a schema path (ending in `additionalProperties`) refers to.
fn known_properties(schema: &serde_json::Value, schema_path: &str) -> Vec<String> {
    let mut cur = schema;
    let segs: Vec<&str> = schema_path.split('/').filter(|s| !s.is_empty()).collect();
    for seg in &segs[..segs.len().saturating_sub(1)] {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        if seg == "$ref" {
            continue;
        }
        cur = match cur.get(&seg).or_else(|| seg.parse::<usize>().ok().and_then(|i| cur.get(i))) {
            Some(c) => c,
            None => return Vec::new(),
        };
        // follow references
        while let Some(r) = cur.get("$ref").and_then(|r| r.as_str()) {
            match r.strip_prefix('#').and_then(|p| schema.pointer(p)) {
                Some(t) => cur = t,
                None => break,
            }
        }
    }
    cur.get("properties").and_then(|p| p.as_object()).map(|p| p.keys().cloned().collect()).unwrap_or_default()
}

/// ` (did you mean `x`?)` when a known name is close.
pub fn suggest(word: &str, known: &[&str]) -> String {
    let best = known
        .iter()
        .map(|k| (strsim::damerau_levenshtein(word, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min_by_key(|(d, _)| *d);
    match best {
        Some((_, k)) => format!(" (did you mean `{k}`?)"),
        None => String::new(),
    }
}

/// Passes 2 and 3: component checks and the graph.
fn semantic(
    config: PipelineConfig,
    value: &serde_json::Value,
    default_name: &str,
    invalid: &std::collections::BTreeSet<String>,
    cx: &mut Checker<'_>,
) -> Option<Plan> {
    let name = config.name.clone().unwrap_or_else(|| default_name.to_string());
    let declared = |sec: &str| value.get(sec).and_then(|v| v.as_object()).map_or(0, |o| o.len());
    if declared("sources") == 0 {
        cx.error("/sources", "a pipeline needs at least one source");
    }
    if declared("sinks") == 0 {
        cx.error("/sinks", "a pipeline needs at least one sink");
    }
    check_settings(&config, cx);
    let mut nodes = plan_nodes(&config, value, cx);
    resolve_edges(&mut nodes, invalid, cx);
    if let Some(cycle) = find_cycle(&nodes) {
        let first = &nodes[cycle[0]];
        let path: Vec<&str> = cycle.iter().map(|&i| nodes[i].name.as_str()).collect();
        cx.error(
            &format!("/{}/{}/inputs", first.role.section(), yaml::pointer_escape(&first.name)),
            format!("the inputs form a cycle: {} -> {}", path.join(" -> "), path[0]),
        );
    }
    // components whose output nobody reads (warning: probably a mistake)
    for (i, n) in nodes.iter().enumerate() {
        if n.role != Role::Sink && !nodes.iter().any(|m| m.inputs.iter().any(|(u, p)| *u == i && *p == 0)) {
            cx.warn(
                &format!("/{}/{}", n.role.section(), yaml::pointer_escape(&n.name)),
                "its output is not read by any component",
            );
        }
    }
    if !cx.errors.is_empty() {
        return None;
    }
    let nodes = finish(nodes, cx);
    Some(Plan { name, nodes, checkpoint: config.checkpoint, api: config.api, warnings: Vec::new() })
}

/// The pipeline-wide settings: checkpoint and operations endpoint.
fn check_settings(config: &PipelineConfig, cx: &mut Checker<'_>) {
    if let Some(c) = &config.checkpoint {
        if let Some(u) = &c.url {
            cx.url("/checkpoint/url", u);
        }
        cx.positive_duration("/checkpoint/interval", &c.interval);
        cx.storage_options("/checkpoint/storage", &c.storage);
    }
    if let Some(a) = &config.api {
        if a.address.parse::<std::net::SocketAddr>().is_err() {
            cx.error("/api/address", format!("{:?} is not an address like 127.0.0.1:8686", a.address));
        }
    }
}

/// One node per component, each checked by its own [`Spec`]; names unique across sections.
fn plan_nodes(config: &PipelineConfig, value: &serde_json::Value, cx: &mut Checker<'_>) -> Vec<PlanNode> {
    fn node<C: Spec + fmt::Debug>(
        role: Role,
        name: &str,
        c: &C,
        kind: &'static str,
        value: &serde_json::Value,
        wrap: ComponentConfig,
        cx: &mut Checker<'_>,
    ) -> PlanNode {
        let ptr = format!("/{}/{}", role.section(), yaml::pointer_escape(name));
        c.check(&ptr, cx);
        let ports = if role == Role::Sink { Vec::new() } else { c.ports() };
        if let (false, Err(e)) = (role == Role::Sink, crate::runtime::Port::check_declared(&ports)) {
            cx.error(&ptr, format!("the `{kind}` component {e} (a bug in centralflow)"));
        }
        PlanNode {
            name: name.to_string(),
            role,
            kind,
            inputs: vec![],
            ports: ports.iter().map(|p| p.name).collect(),
            hands_over: c.hands_over_partitions(),
            accepts_columns: c.accepts_columns(),
            fingerprint: crate::runtime::checkpoint::fingerprint(&value[role.section()][name]),
            config: wrap,
            projection: None,
            partitioned: false,
        }
    }
    let mut nodes = Vec::new();
    for (n, c) in &config.sources {
        nodes.push(node(Role::Source, n, c, c.kind(), value, ComponentConfig::Source(c.clone()), cx));
    }
    for (n, c) in &config.transforms {
        nodes.push(node(Role::Transform, n, c, c.kind(), value, ComponentConfig::Transform(c.clone()), cx));
    }
    for (n, c) in &config.sinks {
        nodes.push(node(Role::Sink, n, c, c.kind(), value, ComponentConfig::Sink(c.clone()), cx));
    }
    let mut seen: BTreeMap<String, Role> = BTreeMap::new();
    for node in &nodes {
        if let Some(prev) = seen.insert(node.name.clone(), node.role) {
            cx.error(
                &format!("/{}/{}", node.role.section(), yaml::pointer_escape(&node.name)),
                format!(
                    "the name `{}` is also used in `{}`: component names must be unique",
                    node.name,
                    prev.section()
                ),
            );
        }
    }
    nodes
}

/// Resolves every `inputs:` entry (`name` or `name.port`) to (node index, port index).
fn resolve_edges(nodes: &mut [PlanNode], invalid: &std::collections::BTreeSet<String>, cx: &mut Checker<'_>) {
    let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).chain(invalid.iter().cloned()).collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    for i in 0..nodes.len() {
        let inputs = match &nodes[i].config {
            ComponentConfig::Source(_) => continue,
            ComponentConfig::Transform(t) => t.inputs().to_vec(),
            ComponentConfig::Sink(s) => s.inputs().to_vec(),
        };
        let base = format!("/{}/{}/inputs", nodes[i].role.section(), yaml::pointer_escape(&nodes[i].name));
        if inputs.is_empty() {
            cx.error(&base, "needs at least one input");
        }
        let mut resolved = Vec::new();
        for (k, input) in inputs.iter().enumerate() {
            let ptr = format!("{base}/{k}");
            let (comp, port) = input.split_once('.').unwrap_or((input.as_str(), ""));
            if invalid.contains(comp) {
                continue; // already reported
            }
            let Some(up) = nodes.iter().position(|n| n.name == comp) else {
                cx.error(&ptr, format!("unknown input `{comp}`{}", suggest(comp, &name_refs)));
                continue;
            };
            if nodes[up].role == Role::Sink {
                cx.error(&ptr, format!("`{comp}` is a sink and has no output"));
                continue;
            }
            let Some(p) = nodes[up].ports.iter().position(|x| *x == port) else {
                let named: String =
                    nodes[up].ports.iter().filter(|p| !p.is_empty()).map(|p| format!(", `{comp}.{p}`")).collect();
                cx.error(&ptr, format!("`{comp}` has no output `{port}` (its outputs: `{comp}`{named})"));
                continue;
            };
            if up == i {
                cx.error(&ptr, "a component cannot read its own output");
                continue;
            }
            resolved.push((up, p));
        }
        nodes[i].inputs = resolved;
    }
}

/// Orders the nodes so that each comes after its inputs, and derives what follows from the
/// graph: each source's projection, and which transforms keep state per partition.
fn finish(nodes: Vec<PlanNode>, cx: &mut Checker<'_>) -> Vec<PlanNode> {
    let order = topo_order(&nodes);
    let mut remap = vec![0; nodes.len()];
    for (new, &old) in order.iter().enumerate() {
        remap[old] = new;
    }
    let mut ordered: Vec<PlanNode> = order.iter().map(|&i| nodes[i].clone()).collect();
    for n in &mut ordered {
        for inp in &mut n.inputs {
            inp.0 = remap[inp.0];
        }
    }
    for i in 0..ordered.len() {
        if ordered[i].role == Role::Source {
            ordered[i].projection = projection_for(&ordered, i).map(std::sync::Arc::new);
        }
        // nodes come after their inputs: one pass propagates "fed by a source whose partitions move"
        let fed = ordered[i].inputs.iter().any(|(u, _)| ordered[*u].partitioned || ordered[*u].hands_over);
        ordered[i].partitioned = ordered[i].role != Role::Source && fed;
        if let (true, ComponentConfig::Transform(t)) = (ordered[i].partitioned, &ordered[i].config) {
            t.check_partitioned(&format!("/transforms/{}", yaml::pointer_escape(&ordered[i].name)), cx);
        }
    }
    ordered
}

/// The fields the pipeline reads of the events of source `src` (see
/// [`crate::projection::for_source`]). `None` when some component needs everything.
pub fn projection_for(nodes: &[PlanNode], src: usize) -> Option<crate::projection::Projection> {
    let readers: Vec<crate::projection::Reader> = nodes
        .iter()
        .map(|n| {
            let (needs, forwards) = match &n.config {
                ComponentConfig::Transform(t) => (t.needs(), t.forwards()),
                ComponentConfig::Sink(s) => (s.needs(), false),
                ComponentConfig::Source(_) => (Needs::Fields(Vec::new()), false),
            };
            let reads = match needs {
                Needs::All => None,
                Needs::Fields(paths) => Some(paths.iter().map(|p| (p.parts().to_vec(), p.is_export_key())).collect()),
            };
            crate::projection::Reader { inputs: n.inputs.clone(), reads, forwards }
        })
        .collect();
    crate::projection::for_source(&readers, src)
}

fn find_cycle(nodes: &[PlanNode]) -> Option<Vec<usize>> {
    // colours: 0 new, 1 on stack, 2 done
    fn visit(i: usize, nodes: &[PlanNode], colour: &mut [u8], stack: &mut Vec<usize>) -> Option<Vec<usize>> {
        colour[i] = 1;
        stack.push(i);
        for &(up, _) in &nodes[i].inputs {
            if colour[up] == 1 {
                let at = stack.iter().position(|&s| s == up).unwrap();
                let mut cyc: Vec<usize> = stack[at..].to_vec();
                cyc.reverse();
                return Some(cyc);
            }
            if colour[up] == 0 {
                if let Some(c) = visit(up, nodes, colour, stack) {
                    return Some(c);
                }
            }
        }
        stack.pop();
        colour[i] = 2;
        None
    }
    let mut colour = vec![0u8; nodes.len()];
    for i in 0..nodes.len() {
        if colour[i] == 0 {
            let mut stack = Vec::new();
            if let Some(c) = visit(i, nodes, &mut colour, &mut stack) {
                return Some(c);
            }
        }
    }
    None
}

fn topo_order(nodes: &[PlanNode]) -> Vec<usize> {
    let mut done = vec![false; nodes.len()];
    let mut order = Vec::with_capacity(nodes.len());
    fn visit(i: usize, nodes: &[PlanNode], done: &mut [bool], order: &mut Vec<usize>) {
        if done[i] {
            return;
        }
        done[i] = true;
        for &(up, _) in &nodes[i].inputs {
            visit(up, nodes, done, order);
        }
        order.push(i);
    }
    for i in 0..nodes.len() {
        visit(i, nodes, &mut done, &mut order);
    }
    order
}

/// Declares a closed enum of component configurations tagged by `type`, with its list of type
/// names and per-type JSON Schemas. Adding a component type is one line here.
#[macro_export]
macro_rules! component_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident($ty_name:literal, $cfg:ty),)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
        #[serde(tag = "type")]
        pub enum $name {
            $(#[serde(rename = $ty_name)] $variant($cfg),)*
        }

        /// The `type` names.
        pub const TYPES: &[&str] = &[$($ty_name),*];

        /// The JSON Schema of one type's configuration (without its `type` field).
        pub fn variant_schema(ty: &str) -> Option<serde_json::Value> {
            match ty {
                $($ty_name => serde_json::to_value(schemars::schema_for!($cfg)).ok(),)*
                _ => None,
            }
        }

        impl $name {
            /// The `type` name.
            pub fn kind(&self) -> &'static str {
                match self { $(Self::$variant(_) => $ty_name,)* }
            }
        }

        #[allow(unused_imports)]
        use $crate::config::Spec as _;

        // Method calls (not `Spec::check(c, ..)`) reach a boxed configuration through `Deref`,
        // so that every method is forwarded, including ones added later.
        impl $crate::config::Spec for $name {
            fn check(&self, ptr: &str, cx: &mut $crate::config::Checker<'_>) {
                match self { $(Self::$variant(c) => c.check(ptr, cx),)* }
            }
            fn inputs(&self) -> &[String] {
                match self { $(Self::$variant(c) => c.inputs(),)* }
            }
            fn ports(&self) -> Vec<$crate::runtime::Port> {
                match self { $(Self::$variant(c) => c.ports(),)* }
            }
            fn needs(&self) -> $crate::config::Needs {
                match self { $(Self::$variant(c) => c.needs(),)* }
            }
            fn forwards(&self) -> bool {
                match self { $(Self::$variant(c) => c.forwards(),)* }
            }
            fn check_partitioned(&self, ptr: &str, cx: &mut $crate::config::Checker<'_>) {
                match self { $(Self::$variant(c) => c.check_partitioned(ptr, cx),)* }
            }
            fn hands_over_partitions(&self) -> bool {
                match self { $(Self::$variant(c) => c.hands_over_partitions(),)* }
            }
            fn accepts_columns(&self) -> bool {
                match self { $(Self::$variant(c) => c.accepts_columns(),)* }
            }
            fn replay_range(&mut self) -> Option<&mut Option<$crate::config::ReplayRange>> {
                match self { $(Self::$variant(c) => c.replay_range(),)* }
            }
        }
    };
}

#[cfg(test)]
mod tests;
