//! Collecting configuration errors: [`ConfigError`] (a message at a YAML path and line:column)
//! and the [`Checker`] every component's `Spec::check` reports to.

use super::*;

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
    pub(super) map: &'a SourceMap,
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
