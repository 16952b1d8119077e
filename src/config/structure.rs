//! Pass 1 of validation: the shape of the document and of each component against the JSON
//! Schema of its type (unknown fields with suggestions, wrong types, missing fields); then the
//! typed configuration, leaving out components with structural errors.

use super::*;

/// Deserializes the document, leaving out invalid components.
pub(super) fn typed(
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

pub(super) fn yaml_path(ptr: &str) -> String {
    dotted(ptr)
}

pub(super) fn sorted(mut errs: Vec<ConfigError>) -> Vec<ConfigError> {
    errs.sort_by_key(|e| e.pos.map(|p| (p.line, p.column)).unwrap_or((u64::MAX, 0)));
    errs.dedup();
    errs
}

const TOP_LEVEL: [&str; 6] = ["name", "sources", "transforms", "sinks", "checkpoint", "api"];

/// Pass 1: the shape of the document and of each component, against JSON Schemas.
pub(super) fn structure(value: &mut serde_json::Value, cx: &mut Checker<'_>) {
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
pub(super) const SECTIONS: [(&str, &[&str], SchemaOf); 3] = [
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
        let mut errors: Vec<SchemaError> = Vec::new();
        for e in validator.iter_errors(value) {
            super::variants::explain(schema, &e, None, &mut errors);
        }
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
            report_schema_error(base, &e, cx);
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
pub(super) struct SchemaError {
    /// Instance path, below the validated value.
    pub path: String,
    pub kind: SchemaErrorKind,
    /// jsonschema's own message, for the kinds we do not word ourselves.
    pub message: String,
    /// The variant of a tagged value the error is about ("a tumbling window"), when the error
    /// is at that value itself.
    pub variant: Option<String>,
}

pub(super) enum SchemaErrorKind {
    Unknown {
        unexpected: Vec<String>,
        known: Vec<String>,
    },
    Required(String),
    Type(String),
    Enum {
        options: Vec<serde_json::Value>,
        given: Option<String>,
    },
    /// Already worded (by [`super::variants`]).
    Said(String),
    Other,
}

impl SchemaError {
    pub(super) fn new(path: String, kind: SchemaErrorKind) -> SchemaError {
        SchemaError { path, kind, message: String::new(), variant: None }
    }

    pub(super) fn said(path: String, message: String) -> SchemaError {
        SchemaError::new(path, SchemaErrorKind::Said(message))
    }

    /// One jsonschema error as it is, within `variant` if given.
    pub(super) fn of(root: &serde_json::Value, e: &jsonschema::ValidationError<'_>, variant: Option<String>) -> Self {
        use jsonschema::error::ValidationErrorKind as K;
        let kind = match &e.kind {
            K::AdditionalProperties { unexpected } => SchemaErrorKind::Unknown {
                unexpected: unexpected.clone(),
                known: known_properties(root, e.schema_path.as_str()),
            },
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
            K::Enum { options } => SchemaErrorKind::Enum {
                options: options.as_array().cloned().unwrap_or_default(),
                given: e.instance.as_str().map(str::to_string),
            },
            _ => SchemaErrorKind::Other,
        };
        SchemaError { path: e.instance_path.to_string(), kind, message: e.to_string(), variant }
    }
}

fn report_schema_error(base: &str, e: &SchemaError, cx: &mut Checker<'_>) {
    let ptr = format!("{base}{}", e.path);
    match &e.kind {
        SchemaErrorKind::Unknown { unexpected, known } => {
            let known_refs: Vec<&str> = known.iter().map(String::as_str).collect();
            let within = e.variant.as_ref().map(|v| format!(" in {v}")).unwrap_or_default();
            for u in unexpected {
                let hint = suggest(u, &known_refs);
                let list =
                    if known.is_empty() { String::new() } else { format!(" (known fields: {})", known.join(", ")) };
                cx.error_at_key(
                    &format!("{ptr}/{}", yaml::pointer_escape(u)),
                    format!("unknown field `{u}`{within}{hint}{list}"),
                );
            }
        }
        SchemaErrorKind::Required(property) => match &e.variant {
            Some(v) => cx.error(&ptr, format!("{v} needs `{property}`")),
            None => cx.error(&ptr, format!("missing required field `{property}`")),
        },
        SchemaErrorKind::Type(wanted) => {
            cx.error(&ptr, format!("must be {}", wanted.replace("null", "nothing").replace(" | ", " or ")));
        }
        SchemaErrorKind::Enum { options, given } => cx.error(&ptr, enum_message(options, given.as_deref())),
        SchemaErrorKind::Said(message) => cx.error(&ptr, redact_value(message)),
        SchemaErrorKind::Other => cx.error(&ptr, redact_value(&e.message)),
    }
}

/// `must be one of "a", "b"`, with a suggestion when `given` is close to one.
pub(super) fn enum_message(options: &[serde_json::Value], given: Option<&str>) -> String {
    let names: Vec<&str> = options.iter().filter_map(serde_json::Value::as_str).collect();
    let hint = given.map(|g| suggest(g, &names)).unwrap_or_default();
    let list: Vec<String> = options.iter().map(|o| o.to_string()).collect();
    format!("must be one of {}{hint}", list.join(", "))
}

fn redact_value(msg: &str) -> String {
    crate::secret::redact(msg)
}

/// Follows `$ref`s (within the document) from `node`.
pub(super) fn resolve<'s>(root: &'s serde_json::Value, mut node: &'s serde_json::Value) -> &'s serde_json::Value {
    for _ in 0..32 {
        match node.get("$ref").and_then(|r| r.as_str()).and_then(|r| r.strip_prefix('#')).and_then(|p| root.pointer(p))
        {
            Some(target) => node = target,
            None => break,
        }
    }
    node
}

/// The schema at a jsonschema schema path (`/properties/window/$ref/oneOf/0`), following
/// `$ref`s, and the name of the last definition followed (`WindowSpec`).
pub(super) fn node_at<'s>(
    root: &'s serde_json::Value,
    schema_path: &str,
) -> Option<(&'s serde_json::Value, Option<&'s str>)> {
    let mut cur = root;
    let mut def = None;
    for seg in schema_path.split('/').filter(|s| !s.is_empty()) {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        if seg == "$ref" {
            continue;
        }
        cur = cur.get(&seg).or_else(|| seg.parse::<usize>().ok().and_then(|i| cur.get(i)))?;
        if let Some(r) = cur.get("$ref").and_then(|r| r.as_str()) {
            def = r.rsplit('/').next();
            cur = resolve(root, cur);
        }
    }
    Some((cur, def))
}

/// Property names allowed at the object a schema path (ending in `additionalProperties`) refers to.
fn known_properties(schema: &serde_json::Value, schema_path: &str) -> Vec<String> {
    let parent = schema_path.rsplit_once('/').map_or("", |(p, _)| p);
    node_at(schema, parent)
        .and_then(|(node, _)| node.get("properties")?.as_object().map(|p| p.keys().cloned().collect()))
        .unwrap_or_default()
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
