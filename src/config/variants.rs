//! Explaining a value that matches none of the branches of a `oneOf` or `anyOf` (a tagged
//! enum such as a window, a credential, a start position, or an optional or untagged value).
//!
//! jsonschema reports such a value as "not valid under any of the schemas listed in the
//! 'oneOf' keyword", with the errors of every branch. We choose the branch the value means
//! (by its JSON type, its tag such as `kind`, or its single key for an externally tagged
//! enum) and report that branch's errors, naming the variant ("a tumbling window"); a value
//! that means no branch (a missing or unknown tag, a wrong type) gets a message that lists
//! what it may be.

use jsonschema::error::ValidationErrorKind as K;
use jsonschema::ValidationError;
use serde_json::Value;

use super::structure::{enum_message, node_at, resolve, suggest, SchemaError, SchemaErrorKind};
use super::yaml;

/// The variant a branch's errors are about: at instance path `at`, named `name`
/// ("a tumbling window").
pub(super) struct Variant {
    at: String,
    name: String,
}

/// Turns one jsonschema error into the errors we report, explaining failed unions by the
/// branch the value means. Never drops an error: what it cannot explain it keeps as it is.
pub(super) fn explain(root: &Value, e: &ValidationError<'_>, variant: Option<&Variant>, out: &mut Vec<SchemaError>) {
    if let K::OneOfNotValid { context } | K::AnyOf { context } = &e.kind {
        let before = out.len();
        if let Some(union) = Union::at(root, e.schema_path.as_str()) {
            union.explain(root, e, context, out);
        }
        if out.len() > before {
            return;
        }
    }
    let at = e.instance_path.as_str();
    let name = variant.filter(|v| v.at == at).map(|v| v.name.clone());
    out.push(SchemaError::of(root, e, name));
}

/// The branches of a `oneOf`/`anyOf`, each resolved through `$ref`.
struct Union<'s> {
    branches: Vec<&'s Value>,
    /// What a value of it is called ("window"): its title, its definition's name, or its key.
    noun: Option<String>,
}

impl<'s> Union<'s> {
    /// The union whose keyword (`…/oneOf` or `…/anyOf`) is at `schema_path`.
    fn at(root: &'s Value, schema_path: &str) -> Option<Union<'s>> {
        let (parent, keyword) = schema_path.rsplit_once('/')?;
        let (node, def) = node_at(root, parent)?;
        Union::of(root, node, keyword, def)
    }

    /// The union of `node` (resolved), whose branches are under `keyword`; `def` is the name of
    /// the definition it was reached through.
    fn of(root: &'s Value, node: &'s Value, keyword: &str, def: Option<&str>) -> Option<Union<'s>> {
        let branches: Vec<&Value> = node.get(keyword)?.as_array()?.iter().map(|b| resolve(root, b)).collect();
        let title = node.get("title").and_then(Value::as_str).map(|t| {
            let mut c = t.chars();
            c.next().map(|f| f.to_lowercase().chain(c).collect()).unwrap_or_default()
        });
        Some(Union { branches, noun: title.or_else(|| def.map(humanize)) })
    }

    fn explain(
        &self,
        root: &Value,
        e: &ValidationError<'_>,
        context: &[Vec<ValidationError<'_>>],
        out: &mut Vec<SchemaError>,
    ) {
        let value: &Value = &e.instance;
        let at = e.instance_path.as_str();
        let noun = self.noun.clone().unwrap_or_else(|| last_key(at).unwrap_or("value").to_string());
        let fits: Vec<usize> =
            (0..self.branches.len()).filter(|&i| accepts(&types_of(root, self.branches[i]), value)).collect();
        if fits.is_empty() {
            out.push(self.wrong_type(root, at));
            return;
        }
        if !value.is_object() && fits.iter().all(|&i| constants(self.branches[i]).is_some()) {
            let options: Vec<Value> =
                fits.iter().flat_map(|&i| constants(self.branches[i]).unwrap_or_default()).collect();
            let mut message = enum_message(&options, value.as_str());
            let keys = self.external_keys();
            if !keys.is_empty() {
                message.push_str(&format!(", or a mapping with {}", or_list(&keys)));
            }
            out.push(SchemaError::said(at.to_string(), message));
            return;
        }
        let (chosen, name) = if fits.len() == 1 {
            (fits[0], None)
        } else if let Some(key) = self.tag_key(&fits) {
            match self.by_tag(&fits, &key, value, at, &noun) {
                Ok(c) => c,
                Err(e) => return out.push(*e),
            }
        } else if self.externally_tagged(&fits) {
            match self.by_key(&fits, value, at) {
                Ok(i) => (i, None),
                Err(e) => return out.push(*e),
            }
        } else {
            let fewest = fits.iter().copied().min_by_key(|&i| context.get(i).map_or(usize::MAX, Vec::len));
            (fewest.unwrap_or(fits[0]), None)
        };
        let variant = name.map(|name| Variant { at: at.to_string(), name });
        for err in context.get(chosen).into_iter().flatten() {
            explain(root, err, variant.as_ref(), out);
        }
    }

    /// A value of a JSON type that no branch takes.
    fn wrong_type(&self, root: &Value, at: &str) -> SchemaError {
        // an optional union (`anyOf: [{$ref: union}, {type: null}]`): what the union takes
        let not_null: Vec<&&Value> = self.branches.iter().filter(|b| types_of(root, b) != ["null"]).collect();
        if let [only] = not_null.as_slice() {
            let inner = ["oneOf", "anyOf"].iter().find_map(|k| Union::of(root, only, k, None));
            if let Some(inner) = inner {
                return inner.wrong_type(root, at);
            }
        }
        let all: Vec<usize> = (0..self.branches.len()).collect();
        if let Some(key) = self.tag_key(&all) {
            let tags = self.tags(&all, &key).join(", ");
            return SchemaError::said(at.to_string(), format!("must be a mapping with `{key}` (one of: {tags})"));
        }
        let keys = self.external_keys();
        let options: Vec<String> =
            self.branches.iter().filter_map(|b| constants(b)).flatten().map(|c| c.to_string()).collect();
        if !keys.is_empty() || !options.is_empty() {
            let mut forms = options;
            if !keys.is_empty() {
                forms.push(format!("a mapping with {}", or_list(&keys)));
            }
            return SchemaError::said(at.to_string(), format!("must be {}", listed(&forms, "or")));
        }
        let mut types: Vec<&str> = Vec::new();
        for b in &self.branches {
            for t in types_of(root, b) {
                if !types.contains(&t) {
                    types.push(t);
                }
            }
        }
        types.sort_by_key(|t| TYPES.iter().position(|x| x == t));
        SchemaError::new(at.to_string(), SchemaErrorKind::Type(types.join(" | ")))
    }

    /// The property (`kind`, `type`, …) that has one constant string value in every branch.
    fn tag_key(&self, among: &[usize]) -> Option<String> {
        if among.len() < 2 {
            return None;
        }
        let first = self.branches[among[0]].get("properties")?.as_object()?;
        first.keys().find(|k| among.iter().all(|&i| tag_of(self.branches[i], k).is_some())).cloned()
    }

    fn tags(&self, among: &[usize], key: &str) -> Vec<String> {
        among.iter().filter_map(|&i| tag_of(self.branches[i], key)).map(str::to_string).collect()
    }

    /// The branch whose tag the value has, and the variant's name; or why there is none.
    fn by_tag(
        &self,
        among: &[usize],
        key: &str,
        value: &Value,
        at: &str,
        noun: &str,
    ) -> Result<(usize, Option<String>), Box<SchemaError>> {
        let tags = self.tags(among, key);
        let list = tags.join(", ");
        let key_ptr = format!("{at}/{}", yaml::pointer_escape(key));
        match value.get(key) {
            None => Err(said(at.to_string(), format!("{} needs `{key}` (one of: {list})", a(noun)))),
            Some(Value::String(tag)) => match among.iter().find(|&&i| tag_of(self.branches[i], key) == Some(tag)) {
                Some(&i) => Ok((i, Some(a(&format!("{} {noun}", code_or_word(tag)))))),
                None => {
                    let known: Vec<&str> = tags.iter().map(String::as_str).collect();
                    let hint = suggest(tag, &known);
                    Err(said(key_ptr, format!("unknown {noun} {key} `{tag}`{hint} (one of: {list})")))
                }
            },
            Some(_) => Err(said(key_ptr, format!("must be one of: {list}"))),
        }
    }

    /// The single required keys of object branches that have just that key (`{enqueued_time: …}`).
    fn external_keys(&self) -> Vec<String> {
        self.branches.iter().filter_map(|b| external_key(b)).map(str::to_string).collect()
    }

    fn externally_tagged(&self, among: &[usize]) -> bool {
        among.iter().all(|&i| external_key(self.branches[i]).is_some())
    }

    /// The branch whose single key the value has; or why there is none.
    fn by_key(&self, among: &[usize], value: &Value, at: &str) -> Result<usize, Box<SchemaError>> {
        let keys: Vec<String> =
            among.iter().filter_map(|&i| external_key(self.branches[i])).map(str::to_string).collect();
        let present: Vec<usize> = among
            .iter()
            .copied()
            .filter(|&i| external_key(self.branches[i]).is_some_and(|k| value.get(k).is_some()))
            .collect();
        match present.as_slice() {
            [one] => Ok(*one),
            [] => {
                let unexpected: Vec<String> =
                    value.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
                if unexpected.is_empty() {
                    return Err(said(at.to_string(), format!("needs one of {}", or_list(&keys))));
                }
                let kind = SchemaErrorKind::Unknown { unexpected, known: keys };
                Err(Box::new(SchemaError::new(at.to_string(), kind)))
            }
            several => {
                let given: Vec<String> =
                    several.iter().filter_map(|&i| external_key(self.branches[i])).map(|k| format!("`{k}`")).collect();
                let both = if given.len() == 2 { "both " } else { "" };
                Err(said(at.to_string(), format!("has {both}{}: give only one", listed(&given, "and"))))
            }
        }
    }
}

/// An explained error, boxed for a `Result`.
fn said(path: String, message: String) -> Box<SchemaError> {
    Box::new(SchemaError::said(path, message))
}

const TYPES: [&str; 7] = ["integer", "number", "string", "boolean", "array", "object", "null"];

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0) => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The JSON types a schema takes (empty: any), looking through `$ref`, constants and unions.
fn types_of<'s>(root: &'s Value, schema: &'s Value) -> Vec<&'static str> {
    let schema = resolve(root, schema);
    let named = |t: &str| TYPES.iter().copied().find(|x| *x == t);
    match schema.get("type") {
        Some(Value::String(t)) => return named(t).into_iter().collect(),
        Some(Value::Array(ts)) => return ts.iter().filter_map(Value::as_str).filter_map(named).collect(),
        _ => {}
    }
    if let Some(cs) = constants(schema) {
        return cs.iter().map(json_type).collect();
    }
    for keyword in ["oneOf", "anyOf"] {
        if let Some(bs) = schema.get(keyword).and_then(Value::as_array) {
            let per: Vec<Vec<&'static str>> = bs.iter().map(|b| types_of(root, b)).collect();
            if per.iter().any(Vec::is_empty) {
                return Vec::new();
            }
            return per.into_iter().flatten().collect();
        }
    }
    Vec::new()
}

fn accepts(types: &[&str], v: &Value) -> bool {
    let t = json_type(v);
    types.is_empty() || types.contains(&t) || (t == "integer" && types.contains(&"number"))
}

/// The values of a `const` or `enum` schema.
fn constants(schema: &Value) -> Option<Vec<Value>> {
    if let Some(c) = schema.get("const") {
        return Some(vec![c.clone()]);
    }
    schema.get("enum").and_then(Value::as_array).cloned()
}

/// The constant string a branch gives property `key` (its tag).
fn tag_of<'s>(branch: &'s Value, key: &str) -> Option<&'s str> {
    let p = branch.get("properties")?.get(key)?;
    match constants(p)?.as_slice() {
        [_] => p.get("const").or_else(|| p.get("enum")?.get(0))?.as_str(),
        _ => None,
    }
}

/// The key of an object branch with exactly one property, required (externally tagged).
fn external_key(branch: &Value) -> Option<&str> {
    let props = branch.get("properties")?.as_object()?;
    let required = branch.get("required")?.as_array()?;
    match (props.keys().collect::<Vec<_>>().as_slice(), required.as_slice()) {
        ([k], [r]) if r.as_str() == Some(k.as_str()) => Some(k),
        _ => None,
    }
}

/// `WindowSpec` → `window`, `TlsFiles` → `tls files`.
fn humanize(def: &str) -> String {
    let def = def.strip_suffix("Spec").or_else(|| def.strip_suffix("Config")).unwrap_or(def);
    let mut out = String::new();
    for (i, c) in def.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push(' ');
        }
        out.extend(c.to_lowercase());
    }
    out
}

fn last_key(ptr: &str) -> Option<&str> {
    ptr.rsplit('/').find(|s| !s.is_empty() && s.parse::<usize>().is_err())
}

/// `tumbling` as it is; `client_secret` in backticks.
fn code_or_word(tag: &str) -> String {
    if tag.chars().all(|c| c.is_ascii_lowercase()) {
        tag.to_string()
    } else {
        format!("`{tag}`")
    }
}

/// "a window", "an `azure_cli` credential".
fn a(noun: &str) -> String {
    let first = noun.trim_start_matches('`').chars().next().unwrap_or('x');
    let article = if "aeiou".contains(first.to_ascii_lowercase()) { "an" } else { "a" };
    format!("{article} {noun}")
}

/// "`a`, `b` or `c`".
fn or_list(names: &[String]) -> String {
    listed(&names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>(), "or")
}

/// "a, b `and` c".
fn listed(items: &[String], and: &str) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} {and} {last}", rest.join(", ")),
    }
}
