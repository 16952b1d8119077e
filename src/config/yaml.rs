//! YAML with positions: every node keeps its line and column, so that each configuration error
//! can point at the place it is about. `${VAR}` and `${VAR:-default}` are interpolated in string
//! scalars here, before any typing (`$${` writes a literal `${`).

use std::collections::HashMap;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

/// A position in the YAML file (1-based).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pos {
    pub line: u64,
    pub column: u64,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

/// A YAML node.
#[derive(Debug, Clone)]
pub enum Node {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Spanned<Node>>),
    Map(Vec<(Spanned<String>, Spanned<Node>)>),
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Node;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any YAML value")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
                Ok(Node::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<Node, E> {
                Ok(Node::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
                Node::deserialize(d)
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Node, E> {
                Ok(Node::Bool(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Node, E> {
                Ok(Node::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
                Ok(if v <= i64::MAX as u64 { Node::Int(v as i64) } else { Node::Float(v as f64) })
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Node, E> {
                Ok(Node::Float(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Node, E> {
                Ok(Node::Str(v.to_string()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Node, E> {
                Ok(Node::Str(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
                let mut out = Vec::new();
                while let Some(n) = seq.next_element::<Spanned<Node>>()? {
                    out.push(n);
                }
                Ok(Node::Seq(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
                let mut out = Vec::new();
                while let Some(k) = map.next_key::<Spanned<KeyString>>()? {
                    let v = map.next_value::<Spanned<Node>>()?;
                    out.push((Spanned { value: k.value.0, referenced: k.referenced, defined: k.defined }, v));
                }
                Ok(Node::Map(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// A mapping key: strings, and scalars written as keys (`1:`, `true:`) in their text form.
struct KeyString(String);

impl<'de> Deserialize<'de> for KeyString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = KeyString;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a scalar key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<KeyString, E> {
                Ok(KeyString(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<KeyString, E> {
                Ok(KeyString(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<KeyString, E> {
                Ok(KeyString(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<KeyString, E> {
                Ok(KeyString(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<KeyString, E> {
                Ok(KeyString(v.to_string()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<KeyString, E> {
                Ok(KeyString("null".into()))
            }
        }
        d.deserialize_any(V)
    }
}

fn pos_of<T>(s: &Spanned<T>) -> Pos {
    Pos { line: s.referenced.line(), column: s.referenced.column() }
}

/// What we know about each node after conversion, by JSON pointer.
#[derive(Debug, Default, Clone)]
pub struct SourceMap {
    /// Position of the value at each pointer.
    pub values: HashMap<String, Pos>,
    /// Position of the key whose value is at each pointer.
    pub keys: HashMap<String, Pos>,
    /// Pointers whose string value was (wholly or partly) taken from the environment.
    pub from_env: HashMap<String, EnvUse>,
}

/// How a string got its value from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvUse {
    /// The whole value was one `${VAR}` (the usual way to pass a secret).
    pub whole: bool,
    /// Variables used.
    pub vars: Vec<String>,
}

impl SourceMap {
    /// The best position for a pointer: the value, else the key, else the closest parent.
    pub fn locate(&self, pointer: &str) -> Option<Pos> {
        let mut p = pointer.to_string();
        loop {
            if let Some(pos) = self.values.get(&p).or_else(|| self.keys.get(&p)) {
                return Some(*pos);
            }
            match p.rfind('/') {
                Some(i) => p.truncate(i),
                None => return None,
            }
        }
    }
}

/// A problem found while reading the YAML itself.
#[derive(Debug, Clone)]
pub struct YamlIssue {
    pub pointer: String,
    pub pos: Option<Pos>,
    pub message: String,
}

/// Escapes a key for a JSON pointer.
pub fn pointer_escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// Parses YAML text into a JSON value, a map of positions, and the problems found on the way
/// (missing environment variables, duplicate keys).
pub fn parse(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(serde_json::Value, SourceMap, Vec<YamlIssue>), YamlIssue> {
    // YAML 1.2 booleans only (`n`, `no`, `off` are strings), and duplicate keys reach us so that
    // they are reported with their position among the other errors.
    let options = serde_saphyr::options! {
        strict_booleans: true,
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::PassThrough,
    };
    let root: Spanned<Node> = serde_saphyr::from_str_with_options(text, options).map_err(|e| YamlIssue {
        pointer: String::new(),
        pos: None,
        message: format!("not valid YAML: {}", first_line(&e.to_string())),
    })?;
    let mut map = SourceMap::default();
    let mut issues = Vec::new();
    let value = convert(&root, String::new(), &mut map, &mut issues, env);
    Ok((value, map, issues))
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or(s).to_string()
}

fn convert(
    node: &Spanned<Node>,
    ptr: String,
    map: &mut SourceMap,
    issues: &mut Vec<YamlIssue>,
    env: &dyn Fn(&str) -> Option<String>,
) -> serde_json::Value {
    use serde_json::Value as J;
    map.values.insert(ptr.clone(), pos_of(node));
    match &node.value {
        Node::Null => J::Null,
        Node::Bool(b) => J::Bool(*b),
        Node::Int(i) => J::from(*i),
        Node::Float(f) => serde_json::Number::from_f64(*f).map(J::Number).unwrap_or(J::Null),
        Node::Str(s) => match interpolate(s, env) {
            Ok((out, used)) => {
                if !used.is_empty() {
                    let whole = is_single_placeholder(s);
                    map.from_env.insert(ptr.clone(), EnvUse { whole, vars: used });
                }
                J::String(out)
            }
            Err(msg) => {
                issues.push(YamlIssue { pointer: ptr.clone(), pos: Some(pos_of(node)), message: msg });
                J::String(String::new())
            }
        },
        Node::Seq(items) => J::Array(
            items.iter().enumerate().map(|(i, n)| convert(n, format!("{ptr}/{i}"), map, issues, env)).collect(),
        ),
        Node::Map(entries) => {
            let mut obj = serde_json::Map::new();
            for (k, v) in entries {
                let child = format!("{ptr}/{}", pointer_escape(&k.value));
                if obj.contains_key(&k.value) {
                    issues.push(YamlIssue {
                        pointer: child.clone(),
                        pos: Some(pos_of(k)),
                        message: format!("duplicate key `{}`", k.value),
                    });
                }
                map.keys.insert(child.clone(), pos_of(k));
                let val = convert(v, child, map, issues, env);
                obj.insert(k.value.clone(), val);
            }
            J::Object(obj)
        }
    }
}

fn is_single_placeholder(s: &str) -> bool {
    let t = s.trim();
    t.starts_with("${") && t.ends_with('}') && t[2..].find('}') == Some(t.len() - 3)
}

/// Expands `${VAR}`, `${VAR:-default}` and `$${` (a literal `${`). Returns the text and the
/// variables used, or a message naming the first variable that is not set.
pub fn interpolate(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<(String, Vec<String>), String> {
    if !s.contains("${") {
        return Ok((s.to_string(), Vec::new()));
    }
    let mut out = String::with_capacity(s.len());
    let mut used = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        if i > 0 && rest.as_bytes()[i - 1] == b'$' {
            out.push_str(&rest[..i - 1]);
            out.push_str("${");
            rest = &rest[i + 2..];
            continue;
        }
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let end = after.find('}').ok_or_else(|| format!("unclosed `${{` in {s:?}"))?;
        let inner = &after[..end];
        let (name, default) = match inner.find(":-") {
            Some(j) => (&inner[..j], Some(&inner[j + 2..])),
            None => (inner, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "`${{{inner}}}` is not a valid variable reference (use ${{NAME}} or ${{NAME:-default}})"
            ));
        }
        match env(name).filter(|v| !v.is_empty() || default.is_none()) {
            Some(v) => out.push_str(&v),
            None => match default {
                Some(d) => out.push_str(d),
                None => {
                    return Err(format!(
                        "environment variable {name} is not set (give a default with ${{{name}:-value}})"
                    ))
                }
            },
        }
        used.push(name.to_string());
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok((out, used))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOME_DIR" => Some("/home/x".into()),
            "EMPTY" => Some(String::new()),
            "N" => Some("42".into()),
            _ => None,
        }
    }

    fn check(input: &str, expected: Result<&str, &str>) {
        let got = interpolate(input, &env).map(|(s, _)| s);
        match expected {
            Ok(e) => assert_eq!(got.as_deref(), Ok(e), "{input}"),
            Err(e) => assert!(got.as_ref().unwrap_err().contains(e), "{input}: {got:?}"),
        }
    }

    #[test]
    fn interpolation() {
        check("plain", Ok("plain"));
        check("${HOME_DIR}/out", Ok("/home/x/out"));
        check("${MISSING:-./state}", Ok("./state"));
        check("${EMPTY:-dflt}", Ok("dflt"));
        check("${EMPTY}", Ok(""));
        check("a $${HOME_DIR} b", Ok("a ${HOME_DIR} b"));
        check("${N}${N}", Ok("4242"));
        check("${MISSING}", Err("environment variable MISSING is not set"));
        check("${bad name}", Err("not a valid variable reference"));
        check("${OPEN", Err("unclosed"));
    }

    #[test]
    fn positions_and_env_use_are_recorded() {
        let text = "sources:\n  a:\n    type: files\n    url: ${HOME_DIR}\n    n: 3\n";
        let (v, map, issues) = parse(text, &env).unwrap();
        assert!(issues.is_empty());
        assert_eq!(v["sources"]["a"]["url"], "/home/x");
        assert_eq!(map.values["/sources/a/url"], Pos { line: 4, column: 10 });
        assert_eq!(map.keys["/sources/a/n"], Pos { line: 5, column: 5 });
        assert_eq!(map.from_env["/sources/a/url"], EnvUse { whole: true, vars: vec!["HOME_DIR".into()] });
        assert_eq!(map.locate("/sources/a/url/deeper"), Some(Pos { line: 4, column: 10 }));
    }

    #[test]
    fn missing_variables_and_duplicates_are_issues() {
        let text = "a: ${NOPE}\nb: 1\nb: 2\n";
        let r = parse(text, &env);
        match r {
            Ok((_, _, issues)) => {
                assert!(
                    issues.iter().any(|i| i.message.contains("NOPE") && i.pos == Some(Pos { line: 1, column: 4 })),
                    "{issues:?}"
                );
            }
            Err(e) => assert!(e.message.contains("duplicate"), "{e:?}"),
        }
        assert!(parse("a: [1, 2\n", &env).unwrap_err().message.starts_with("not valid YAML"));
    }
}
