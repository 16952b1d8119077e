//! The test file format (`*.test.yaml`) and its validation, with YAML positions in every error.
//!
//! ```yaml
//! pipeline: ../demo.yaml          # relative to this file
//! environment: { TOKEN: abc }     # ${VAR} values for the pipeline (all cases)
//! cases:
//!   - name: averages per site
//!     inputs:                     # arrival order
//!       - at: devices             # a source
//!         messages: [ {...}, {...} ]   # or message:, lines:, file:, simulator:
//!     outputs:
//!       - at: per_site            # a component, `name.port`, or a sink (its input)
//!         rows: [ {...} ]         # and/or contains:, count:, condition:
//!     no_output_from: [per_site.late]
//!     watermark: 2026-11-01T00:01:00Z   # or end_of_input: false; default: flush at the end
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config::{self, yaml, Checker, ConfigError, Plan};
use crate::event::Nanos;
use crate::expr::Expr;

/// A test file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    pipeline: String,
    #[serde(default)]
    environment: Map<String, Value>,
    cases: Vec<RawCase>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCase {
    name: String,
    #[serde(default)]
    environment: Map<String, Value>,
    #[serde(default)]
    inputs: Vec<RawInput>,
    #[serde(default)]
    outputs: Vec<RawOutput>,
    #[serde(default)]
    no_output_from: Vec<String>,
    end_of_input: Option<bool>,
    watermark: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInput {
    at: String,
    messages: Option<Vec<Value>>,
    message: Option<Value>,
    lines: Option<Value>,
    file: Option<String>,
    simulator: Option<Map<String, Value>>,
    #[serde(default)]
    partition: u32,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
    received: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutput {
    at: String,
    rows: Option<Vec<Map<String, Value>>>,
    contains: Option<Vec<Map<String, Value>>>,
    count: Option<usize>,
    condition: Option<String>,
    #[serde(default)]
    order: Order,
    fields: Option<Vec<String>>,
}

/// Whether `rows` must come in the order written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    #[default]
    Any,
    Exact,
}

/// A validated test file.
#[derive(Debug)]
pub struct TestFile {
    pub path: PathBuf,
    pub pipeline_path: PathBuf,
    pub cases: Vec<Case>,
}

/// One case: its own pipeline (built with its environment), inputs and expectations.
#[derive(Debug)]
pub struct Case {
    pub name: String,
    pub plan: Plan,
    pub inputs: Vec<Input>,
    pub outputs: Vec<Output>,
    /// Outputs that must stay empty: (node, port) and the name as written.
    pub no_output_from: Vec<(Target, String)>,
    pub end: End,
}

/// How a case ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// End of input: windows are flushed, as at the end of a replay.
    Flush,
    /// The inputs end without a flush (only what the watermark already closed is out).
    Hold,
    /// The watermark is advanced to this time on every input partition, without a flush.
    Watermark(Nanos),
}

/// Input records for one source.
#[derive(Debug)]
pub struct Input {
    /// Index of the source node.
    pub node: usize,
    pub records: Vec<Record>,
    pub partition: u32,
    pub attributes: Vec<(crate::event::AttrKey, String)>,
    /// The arrival time, for sources that stamp one (device-bridge requests without a timestamp).
    pub received: Nanos,
}

/// One raw record and where it came from (for dead letters and messages).
#[derive(Debug)]
pub struct Record {
    pub bytes: Vec<u8>,
    pub origin: String,
}

/// A place whose output is captured: a node and one of its output ports, or a sink's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    Port(usize, usize),
    SinkInput(usize),
}

/// One expectation about an output.
#[derive(Debug)]
pub struct Output {
    pub at: String,
    pub target: Target,
    pub rows: Option<Vec<Map<String, Value>>>,
    pub contains: Option<Vec<Map<String, Value>>>,
    pub count: Option<usize>,
    pub condition: Option<Expr>,
    pub order: Order,
    pub fields: Option<Vec<String>>,
}

/// Where a test file's problems are reported: the test file, or the pipeline it names.
#[derive(Debug)]
pub struct Invalid {
    pub file: PathBuf,
    pub errors: Vec<ConfigError>,
}

/// The fixed arrival time of records when a case gives none: sources that stamp the time a
/// record arrived (device-bridge requests without `timestamp`) get this, so results never depend
/// on the wall clock.
pub const DEFAULT_RECEIVED: &str = "2026-01-01T00:00:00Z";

/// Reads and validates a test file. Errors name the file and the YAML position; an invalid
/// pipeline is reported with the pipeline's own file and positions.
pub fn load(path: &Path) -> Result<TestFile, Invalid> {
    let invalid = |errors| Invalid { file: path.to_path_buf(), errors };
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(vec![error_at("", None, format!("cannot read {}: {e}", path.display()))]))?;
    // `${...}` in a test file is data (a message may contain it), not interpolated here
    let keep = |k: &str| Some(format!("${{{k}}}"));
    let (value, map, _) =
        yaml::parse(&text, &keep).map_err(|i| invalid(vec![error_at(&i.pointer, i.pos, i.message)]))?;
    let mut cx = Checker::new(&map);
    let raw: RawFile = match serde_path_to_error::deserialize(&value) {
        Ok(r) => r,
        Err(e) => {
            report_serde(&e, &mut cx);
            return Err(invalid(cx.errors));
        }
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let pipeline_path = dir.join(&raw.pipeline);
    let pipeline_text = match std::fs::read_to_string(&pipeline_path) {
        Ok(t) => t,
        Err(e) => {
            cx.error("/pipeline", format!("cannot read the pipeline {}: {e}", pipeline_path.display()));
            return Err(invalid(cx.errors));
        }
    };
    if raw.cases.is_empty() {
        cx.error("/cases", "has no cases");
    }
    let mut cases = Vec::new();
    let mut names = std::collections::HashSet::new();
    for (i, rc) in raw.cases.into_iter().enumerate() {
        let ptr = format!("/cases/{i}");
        if !names.insert(rc.name.clone()) {
            cx.error(&format!("{ptr}/name"), format!("another case is named {:?}", rc.name));
        }
        let env = merged_env(&raw.environment, &rc.environment);
        let stem = pipeline_path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
        let plan = match config::load_str(&pipeline_text, &stem, &|k| env.get(k).cloned()) {
            Ok(p) => p,
            Err(errors) => return Err(Invalid { file: pipeline_path, errors }),
        };
        if let Some(case) = check_case(rc, plan, &ptr, dir, &mut cx) {
            cases.push(case);
        }
    }
    if !cx.errors.is_empty() {
        return Err(invalid(cx.errors));
    }
    Ok(TestFile { path: path.to_path_buf(), pipeline_path, cases })
}

fn error_at(pointer: &str, pos: Option<yaml::Pos>, message: String) -> ConfigError {
    ConfigError { path: config::dotted(pointer), pos, message }
}

/// Environment values as strings (numbers and booleans as written).
fn merged_env(file: &Map<String, Value>, case: &Map<String, Value>) -> BTreeMap<String, String> {
    file.iter()
        .chain(case.iter())
        .map(|(k, v)| (k.clone(), v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())))
        .collect()
}

/// Reports a typing error at its place: an unknown field at its key, the rest at the value.
fn report_serde(e: &serde_path_to_error::Error<serde_json::Error>, cx: &mut Checker<'_>) {
    let mut ptr = String::new();
    for seg in e.path().iter() {
        match seg {
            serde_path_to_error::Segment::Seq { index } => ptr.push_str(&format!("/{index}")),
            serde_path_to_error::Segment::Map { key } => ptr.push_str(&format!("/{}", yaml::pointer_escape(key))),
            _ => {}
        }
    }
    let msg = e.inner().to_string();
    let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
    match msg.strip_prefix("unknown field `").and_then(|r| r.split('`').next()) {
        Some(field) => {
            let hint = KNOWN_FIELDS
                .iter()
                .find(|f| strsim::jaro_winkler(f, field) > 0.85)
                .map(|f| format!(" (did you mean `{f}`?)"))
                .unwrap_or_default();
            let at = format!("{}/{}", ptr.trim_end_matches(&format!("/{field}")), yaml::pointer_escape(field));
            cx.error_at_key(&at, format!("{msg}{hint}"));
        }
        None => cx.error(&ptr, msg),
    }
}

/// Every field name of the format, for suggestions.
const KNOWN_FIELDS: &[&str] = &[
    "pipeline",
    "environment",
    "cases",
    "name",
    "inputs",
    "outputs",
    "no_output_from",
    "end_of_input",
    "watermark",
    "at",
    "messages",
    "message",
    "lines",
    "file",
    "simulator",
    "partition",
    "attributes",
    "received",
    "rows",
    "contains",
    "count",
    "condition",
    "order",
    "fields",
];

fn check_case(rc: RawCase, plan: Plan, ptr: &str, dir: &Path, cx: &mut Checker<'_>) -> Option<Case> {
    let errors_before = cx.errors.len();
    let end = match (rc.watermark.as_deref(), rc.end_of_input) {
        (Some(_), Some(true)) => {
            cx.error(&format!("{ptr}/end_of_input"), "`watermark` stops before the end of input: leave one out");
            End::Flush
        }
        (Some(w), _) => match crate::time::parse_rfc3339(w) {
            Some(t) => End::Watermark(t),
            None => {
                cx.error(
                    &format!("{ptr}/watermark"),
                    format!("{w:?} is not an RFC 3339 time like 2026-11-01T00:01:00Z"),
                );
                End::Flush
            }
        },
        (None, Some(false)) => End::Hold,
        (None, _) => End::Flush,
    };
    let mut inputs = Vec::new();
    for (j, ri) in rc.inputs.into_iter().enumerate() {
        if let Some(i) = check_input(ri, &plan, &format!("{ptr}/inputs/{j}"), dir, cx) {
            inputs.push(i);
        }
    }
    let mut outputs = Vec::new();
    for (j, ro) in rc.outputs.into_iter().enumerate() {
        if let Some(o) = check_output(ro, &plan, &format!("{ptr}/outputs/{j}"), cx) {
            outputs.push(o);
        }
    }
    let mut no_output_from = Vec::new();
    for (j, at) in rc.no_output_from.into_iter().enumerate() {
        match target(&plan, &at) {
            Ok(t) => no_output_from.push((t, at)),
            Err(e) => cx.error(&format!("{ptr}/no_output_from/{j}"), e),
        }
    }
    if outputs.is_empty() && no_output_from.is_empty() {
        cx.error(ptr, "checks nothing: give `outputs` or `no_output_from`");
    }
    (cx.errors.len() == errors_before).then_some(Case { name: rc.name, plan, inputs, outputs, no_output_from, end })
}

fn check_input(ri: RawInput, plan: &Plan, ptr: &str, dir: &Path, cx: &mut Checker<'_>) -> Option<Input> {
    let node = match plan.node(&ri.at) {
        Some(n) if plan.nodes[n].role == config::Role::Source => n,
        _ => {
            let sources: Vec<&str> =
                plan.nodes.iter().filter(|n| n.role == config::Role::Source).map(|n| n.name.as_str()).collect();
            let hint = config::suggest(&ri.at, &sources);
            cx.error(
                &format!("{ptr}/at"),
                format!("the pipeline has no source `{}`{hint} (sources: {})", ri.at, sources.join(", ")),
            );
            return None;
        }
    };
    let given =
        [ri.messages.is_some(), ri.message.is_some(), ri.lines.is_some(), ri.file.is_some(), ri.simulator.is_some()]
            .iter()
            .filter(|g| **g)
            .count();
    if given != 1 {
        cx.error(ptr, "needs exactly one of `messages`, `message`, `lines`, `file`, `simulator`");
        return None;
    }
    let text = ri.received.as_deref().unwrap_or(DEFAULT_RECEIVED);
    let Some(received) = crate::time::parse_rfc3339(text) else {
        cx.error(&format!("{ptr}/received"), format!("{text:?} is not an RFC 3339 time"));
        return None;
    };
    let records = records_of(&ri, ptr, dir, received, cx)?;
    let attributes = ri.attributes.into_iter().map(|(k, v)| (k.into(), v)).collect();
    Some(Input { node, records, partition: ri.partition, attributes, received })
}

/// The raw records of an input, each with its origin (`cases[0].inputs[1].lines[2]`, `data.jsonl:7`).
fn records_of(ri: &RawInput, ptr: &str, dir: &Path, received: Nanos, cx: &mut Checker<'_>) -> Option<Vec<Record>> {
    // the element's path, as errors name it: `cases[0].inputs[1].lines[2]`
    let origin = |what: &str, n: usize| format!("{}{what}[{n}]", config::dotted(ptr));
    let json = |v: &Value| serde_json::to_vec(v).unwrap_or_default();
    if let Some(ms) = &ri.messages {
        return Some(
            ms.iter().enumerate().map(|(n, m)| Record { bytes: json(m), origin: origin(".messages", n) }).collect(),
        );
    }
    if let Some(m) = &ri.message {
        return Some(vec![Record { bytes: json(m), origin: format!("{}.message", config::dotted(ptr)) }]);
    }
    if let Some(lines) = &ri.lines {
        let list: Vec<String> = match lines {
            Value::String(s) => s.lines().map(str::to_string).collect(),
            Value::Array(a) if a.iter().all(Value::is_string) => {
                a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect()
            }
            _ => {
                cx.error(&format!("{ptr}/lines"), "must be a text block (one record a line) or a list of strings");
                return None;
            }
        };
        return Some(
            list.into_iter()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
                .map(|(n, l)| Record { bytes: l.into_bytes(), origin: origin(".lines", n) })
                .collect(),
        );
    }
    if let Some(f) = &ri.file {
        let path = dir.join(f);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) => {
                cx.error(&format!("{ptr}/file"), format!("cannot read {}: {e}", path.display()));
                return None;
            }
        };
        return Some(
            text.split(|b| *b == b'\n')
                .enumerate()
                .filter(|(_, l)| l.iter().any(|b| !b.is_ascii_whitespace()))
                .map(|(n, l)| Record { bytes: l.to_vec(), origin: format!("{}:{}", path.display(), n + 1) })
                .collect(),
        );
    }
    let sim = ri.simulator.as_ref()?;
    simulated(sim, &format!("{ptr}/simulator"), received, cx)
}

/// Messages of a seeded simulator: `count` is required; `start` defaults to the arrival time.
fn simulated(sim: &Map<String, Value>, ptr: &str, received: Nanos, cx: &mut Checker<'_>) -> Option<Vec<Record>> {
    let Some(count) = sim.get("count").and_then(Value::as_u64) else {
        cx.error(ptr, "needs `count` (a bounded, seeded simulator)");
        return None;
    };
    let mut cfg = sim.clone();
    cfg.entry("start").or_insert_with(|| Value::String(crate::time::format_rfc3339(received)));
    let cfg: crate::sources::simulator::SimulatorConfig = match serde_json::from_value(Value::Object(cfg)) {
        Ok(c) => c,
        Err(e) => {
            cx.error(ptr, e.to_string());
            return None;
        }
    };
    let generator = match crate::sources::simulator::Generator::new(cfg, received) {
        Ok(g) => g,
        Err(e) => {
            cx.error(ptr, format!("{e:#}"));
            return None;
        }
    };
    Some(
        (0..count)
            .map(|i| Record { bytes: generator.message(i).into_bytes(), origin: format!("simulator message {i}") })
            .collect(),
    )
}

fn check_output(ro: RawOutput, plan: &Plan, ptr: &str, cx: &mut Checker<'_>) -> Option<Output> {
    let target = match target(plan, &ro.at) {
        Ok(t) => t,
        Err(e) => {
            cx.error(&format!("{ptr}/at"), e);
            return None;
        }
    };
    if ro.rows.is_none() && ro.contains.is_none() && ro.count.is_none() && ro.condition.is_none() {
        cx.error(ptr, "checks nothing: give `rows`, `contains`, `count` or `condition`");
        return None;
    }
    let condition = match &ro.condition {
        Some(src) => match Expr::compile(src) {
            Ok(e) => Some(e),
            Err(e) => {
                cx.error(&format!("{ptr}/condition"), e);
                return None;
            }
        },
        None => None,
    };
    Some(Output {
        at: ro.at,
        target,
        rows: ro.rows,
        contains: ro.contains,
        count: ro.count,
        condition,
        order: ro.order,
        fields: ro.fields,
    })
}

/// Resolves `name` (a component's main output, or a sink's input) or `name.port`.
pub fn target(plan: &Plan, at: &str) -> Result<Target, String> {
    let (name, port) = match at.split_once('.') {
        Some((n, p)) => (n, Some(p)),
        None => (at, None),
    };
    let Some(i) = plan.node(name) else {
        let names: Vec<&str> = plan.nodes.iter().map(|n| n.name.as_str()).collect();
        return Err(format!(
            "the pipeline has no component `{name}`{} (components: {})",
            config::suggest(name, &names),
            names.join(", ")
        ));
    };
    let node = &plan.nodes[i];
    match port {
        None if node.role == config::Role::Sink => Ok(Target::SinkInput(i)),
        None => Ok(Target::Port(i, 0)),
        Some(p) => match node.ports.iter().position(|q| *q == p && !q.is_empty()) {
            Some(k) => Ok(Target::Port(i, k)),
            None => {
                let named: Vec<&str> = node.ports.iter().copied().filter(|q| !q.is_empty()).collect();
                Err(if named.is_empty() {
                    format!("`{name}` has no output `{p}` (it has only its main output)")
                } else {
                    format!(
                        "`{name}` has no output `{p}`{} (outputs: {})",
                        config::suggest(p, &named),
                        named.join(", ")
                    )
                })
            }
        },
    }
}
