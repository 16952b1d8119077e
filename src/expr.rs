//! Per-event expressions, in [Rhai](https://rhai.rs) (see ARCHITECTURE.md for why Rhai and
//! docs/performance.md for the numbers behind the choice).
//!
//! An expression sees the event's fields as variables: envelope fields by their export names
//! (`messageSource`, `deviceId`, `enqueuedTime`, ...), payload objects (`telemetry.temperature`,
//! `enrichments.site`, `messageProperties["iothub-creation-time-utc"]`), window output columns
//! (`temperature_avg`), and `meta` (`meta.partition`, `meta.offset`, `meta.origin`). A name that
//! is not a top-level field is looked up in `telemetry`, so `temperature` means
//! `telemetry.temperature`. Missing fields are `()`.
//!
//! Variables are resolved lazily, on use: evaluating `messageSource == "telemetry"` reads one
//! field of the event and converts nothing else. Expressions are compiled once per pipeline.
//! The simplest and most common shape, `field == "text"` (or `!=`), is evaluated without the
//! interpreter; a property test checks that both paths agree.

use std::cell::Cell;
use std::sync::{Arc, OnceLock};

use rhai::{Dynamic, Engine, EvalAltResult, ImmutableString, Map, AST};

use crate::event::{Event, ObjRef, ValRef, Value};

/// A compiled expression.
#[derive(Clone)]
pub struct Expr {
    src: Arc<str>,
    ast: Arc<AST>,
    fast: Option<FastCompare>,
}

impl std::fmt::Debug for Expr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Expr({:?})", self.src)
    }
}

#[derive(Clone, Debug)]
struct FastCompare {
    var: crate::path::FieldPath,
    literal: String,
    negate: bool,
    /// `var` is `messageSource`, which the decoder has read already.
    message_source: bool,
}

/// A handle to an object of the event being evaluated. Only valid during that evaluation.
#[derive(Clone)]
struct ObjHandle {
    start: u32,
    len: u32,
    /// Identity of the event it belongs to, checked on every use.
    owner: usize,
}

thread_local! {
    static CURRENT: Cell<*const Event> = const { Cell::new(std::ptr::null()) };
}

/// Sets the event that variables resolve against for the duration of one evaluation.
struct CurrentGuard;

impl CurrentGuard {
    fn set(ev: &Event) -> CurrentGuard {
        CURRENT.with(|c| c.set(ev as *const Event));
        CurrentGuard
    }
}

impl Drop for CurrentGuard {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(std::ptr::null()));
    }
}

fn with_current<R>(f: impl FnOnce(&Event) -> R) -> Option<R> {
    let p = CURRENT.with(|c| c.get());
    if p.is_null() {
        return None;
    }
    // SAFETY: `CURRENT` is only non-null while a `CurrentGuard` created from a live `&Event` is
    // alive on this thread, i.e. during a synchronous evaluation that borrows that event.
    Some(f(unsafe { &*p }))
}

fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut e = Engine::new();
        e.set_max_operations(100_000);
        e.set_max_expr_depths(64, 32);
        e.set_max_string_size(1 << 20);
        e.set_max_array_size(100_000);
        e.set_max_map_size(100_000);
        e.on_print(|_| {});
        e.on_debug(|_, _, _| {});
        e.register_type_with_name::<ObjHandle>("Object");
        e.register_indexer_get(|h: &mut ObjHandle, key: &str| -> Result<Dynamic, Box<EvalAltResult>> {
            let owner = h.owner;
            let (start, len) = (h.start, h.len);
            with_current(|ev| {
                if ev as *const Event as usize != owner {
                    return Err("an object of another event was used".into());
                }
                Ok(obj_of(ev, start, len).get(key).map(|v| to_dynamic(ev, v)).unwrap_or(Dynamic::UNIT))
            })
            .unwrap_or_else(|| Err("an object was used outside of its event".into()))
        });
        e.register_fn("keys", |h: &mut ObjHandle| -> Dynamic {
            let (start, len) = (h.start, h.len);
            with_current(|ev| {
                obj_of(ev, start, len)
                    .iter()
                    .map(|(k, _)| Dynamic::from(ImmutableString::from(k)))
                    .collect::<Vec<_>>()
                    .into()
            })
            .unwrap_or(Dynamic::UNIT)
        });
        e.register_fn("round", |x: f64, digits: i64| -> f64 {
            let m = 10f64.powi(digits as i32);
            (x * m).round() / m
        });
        e.register_fn("round", |x: i64, _digits: i64| -> i64 { x });
        e.register_fn("is_number", |x: Dynamic| x.is_int() || x.is_float());
        e.register_fn("to_float", |x: Dynamic| -> Dynamic {
            number_of(&x).map(Dynamic::from).unwrap_or(Dynamic::UNIT)
        });
        e.register_fn("time_ms", |s: &str| -> Dynamic {
            crate::time::parse_rfc3339(s).map(|t| Dynamic::from(t / 1_000_000)).unwrap_or(Dynamic::UNIT)
        });
        // Rhai marks `on_var` deprecated only to say it is volatile; the version is pinned.
        #[allow(deprecated)]
        e.on_var(|name, _, _| Ok(with_current(|ev| resolve_var(ev, name))));
        e
    })
}

fn number_of(x: &Dynamic) -> Option<f64> {
    if let Ok(f) = x.as_float() {
        return Some(f);
    }
    if let Ok(i) = x.as_int() {
        return Some(i as f64);
    }
    x.clone().into_immutable_string().ok().and_then(|s| s.trim().parse().ok())
}

fn obj_of(ev: &Event, start: u32, len: u32) -> ObjRef<'_> {
    ev.obj_at(start, len)
}

/// Resolves a variable name against an event, as described in the module documentation.
fn resolve_var(ev: &Event, name: &str) -> Dynamic {
    match lookup(ev, name) {
        Some(v) => to_dynamic(ev, v),
        None if name == "meta" => meta_map(ev),
        None => Dynamic::UNIT,
    }
}

/// The value a bare name refers to: a top-level field, else a telemetry field.
pub fn lookup<'a>(ev: &'a Event, name: &str) -> Option<ValRef<'a>> {
    if let Some(v) = ev.get(name) {
        return Some(v);
    }
    match ev.get("telemetry") {
        Some(ValRef::Obj(t)) => t.get(name),
        _ => None,
    }
}

fn meta_map(ev: &Event) -> Dynamic {
    let mut m = Map::new();
    m.insert("partition".into(), Dynamic::from(ev.meta.partition as i64));
    m.insert("offset".into(), Dynamic::from(ev.meta.offset));
    m.insert("source".into(), Dynamic::from(ev.meta.source as i64));
    if let Some(o) = &ev.meta.origin {
        m.insert("origin".into(), Dynamic::from(ImmutableString::from(o.as_ref())));
    }
    if ev.meta.enqueued != crate::event::NO_TIME {
        m.insert(
            "enqueued_time".into(),
            Dynamic::from(ImmutableString::from(crate::time::format_rfc3339(ev.meta.enqueued))),
        );
    }
    for (k, v) in &ev.meta.attrs {
        m.insert(k.as_ref().into(), Dynamic::from(ImmutableString::from(v.as_str())));
    }
    m.into()
}

fn to_dynamic(ev: &Event, v: ValRef<'_>) -> Dynamic {
    match v {
        ValRef::Null => Dynamic::UNIT,
        ValRef::Bool(b) => Dynamic::from(b),
        ValRef::Int(i) => Dynamic::from(i),
        ValRef::Float(f) => Dynamic::from(f),
        ValRef::Num(s) => match s.parse::<i64>() {
            Ok(i) => Dynamic::from(i),
            Err(_) => s.parse::<f64>().map(Dynamic::from).unwrap_or(Dynamic::UNIT),
        },
        ValRef::Str(s) => Dynamic::from(ImmutableString::from(s.as_ref())),
        ValRef::Time(t) => Dynamic::from(ImmutableString::from(crate::time::format_rfc3339(t))),
        ValRef::Obj(o) => {
            let (start, len) = o.range();
            Dynamic::from(ObjHandle { start, len, owner: ev as *const Event as usize })
        }
        ValRef::Json(s) => {
            serde_json::from_str::<serde_json::Value>(s).map(|j| json_to_dynamic(&j)).unwrap_or(Dynamic::UNIT)
        }
        ValRef::Bytes(b) => Dynamic::from(ImmutableString::from(String::from_utf8_lossy(b).as_ref())),
    }
}

fn json_to_dynamic(j: &serde_json::Value) -> Dynamic {
    match j {
        serde_json::Value::Null => Dynamic::UNIT,
        serde_json::Value::Bool(b) => Dynamic::from(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Dynamic::from(i),
            None => Dynamic::from(n.as_f64().unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => Dynamic::from(ImmutableString::from(s.as_str())),
        serde_json::Value::Array(a) => a.iter().map(json_to_dynamic).collect::<Vec<_>>().into(),
        serde_json::Value::Object(o) => {
            let m: Map = o.iter().map(|(k, v)| (k.as_str().into(), json_to_dynamic(v))).collect();
            m.into()
        }
    }
}

fn dynamic_to_json(d: &Dynamic) -> serde_json::Value {
    if d.is_unit() {
        return serde_json::Value::Null;
    }
    if let Ok(b) = d.as_bool() {
        return b.into();
    }
    if let Ok(i) = d.as_int() {
        return i.into();
    }
    if let Ok(f) = d.as_float() {
        return serde_json::Number::from_f64(f).map(serde_json::Value::Number).unwrap_or(serde_json::Value::Null);
    }
    if let Some(s) = d.read_lock::<ImmutableString>() {
        return serde_json::Value::String(s.to_string());
    }
    if let Some(a) = d.read_lock::<rhai::Array>() {
        return serde_json::Value::Array(a.iter().map(dynamic_to_json).collect());
    }
    if let Some(m) = d.read_lock::<Map>() {
        return serde_json::Value::Object(m.iter().map(|(k, v)| (k.to_string(), dynamic_to_json(v))).collect());
    }
    if let Some(h) = d.read_lock::<ObjHandle>() {
        let (start, len) = (h.start, h.len);
        if let Some(j) = with_current(|ev| obj_of(ev, start, len).to_json()) {
            return serde_json::from_str(&j).unwrap_or(serde_json::Value::Null);
        }
    }
    serde_json::Value::String(d.to_string())
}

fn dynamic_to_value(d: Dynamic) -> Value {
    if d.is_unit() {
        return Value::Null;
    }
    if let Ok(b) = d.as_bool() {
        return Value::Bool(b);
    }
    if let Ok(i) = d.as_int() {
        return Value::Int(i);
    }
    if let Ok(f) = d.as_float() {
        return Value::Float(f);
    }
    if d.is_string() {
        return Value::Str(d.into_string().unwrap_or_default());
    }
    Value::Json(dynamic_to_json(&d).to_string())
}

impl Expr {
    /// Compiles an expression; the error names the position within the expression.
    pub fn compile(src: &str) -> Result<Expr, String> {
        let ast = engine().compile_expression(src).map_err(|e| {
            let pos = e.1;
            match (pos.line(), pos.position()) {
                (Some(l), Some(c)) if src.contains('\n') => {
                    format!("{} (expression line {l}, column {c})", e.0)
                }
                (_, Some(c)) => format!("{} (at character {c} of the expression)", e.0),
                _ => e.0.to_string(),
            }
        })?;
        Ok(Expr { src: src.into(), ast: Arc::new(ast), fast: fast_compare(src) })
    }

    /// The expression's text.
    pub fn source(&self) -> &str {
        &self.src
    }

    /// The field a `field == "text"` expression reads, when it is of that shape.
    pub fn compared_field(&self) -> Option<&crate::path::FieldPath> {
        self.fast.as_ref().map(|f| &f.var)
    }

    /// Evaluates against an event.
    pub fn eval(&self, ev: &Event) -> Result<Value, String> {
        let ev = ev.complete();
        let _g = CurrentGuard::set(ev);
        let d: Dynamic = engine().eval_ast(&self.ast).map_err(|e| format!("{e} in `{}`", self.src))?;
        Ok(dynamic_to_value(d))
    }

    /// Evaluates a condition: must produce a boolean (`()` counts as false).
    pub fn eval_bool(&self, ev: &Event) -> Result<bool, String> {
        if let Some(f) = &self.fast {
            return Ok(f.eval(ev));
        }
        self.eval_bool_interpreted(ev)
    }

    fn eval_bool_interpreted(&self, ev: &Event) -> Result<bool, String> {
        let ev = ev.complete();
        let _g = CurrentGuard::set(ev);
        let d: Dynamic = engine().eval_ast(&self.ast).map_err(|e| format!("{e} in `{}`", self.src))?;
        if d.is_unit() {
            return Ok(false);
        }
        d.as_bool().map_err(|t| format!("`{}` gave a {t}, not a boolean", self.src))
    }
}

impl FastCompare {
    fn eval(&self, ev: &Event) -> bool {
        // `messageSource` as the decoder read it, without looking the field up
        if self.message_source {
            if let Some(s) = ev.decoded_message_source() {
                return (s.as_str() == self.literal) != self.negate;
            }
        }
        let eq = self.var.get_str(ev).is_some_and(|s| crate::event::eq_short(&s, &self.literal));
        eq != self.negate
    }
}

/// Recognises `name == "text"`, `"text" == name` and their `!=` forms.
fn fast_compare(src: &str) -> Option<FastCompare> {
    let s = src.trim();
    let (op, negate) = if s.contains("==") {
        ("==", false)
    } else if s.contains("!=") {
        ("!=", true)
    } else {
        return None;
    };
    let (a, b) = s.split_once(op)?;
    let (a, b) = (a.trim(), b.trim());
    let is_ident = |x: &str| {
        let mut c = x.chars();
        matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_')
            && x.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
    };
    let is_lit =
        |x: &str| x.len() >= 2 && x.starts_with('"') && x.ends_with('"') && !x[1..x.len() - 1].contains(['"', '\\']);
    let (var, lit) = if is_ident(a) && is_lit(b) {
        (a, b)
    } else if is_ident(b) && is_lit(a) {
        (b, a)
    } else {
        return None;
    };
    // keywords are not variables
    if matches!(var, "true" | "false" | "this" | "fn" | "if" | "else") {
        return None;
    }
    let var = crate::path::FieldPath::parse(var).ok()?;
    let message_source = var.as_str() == "messageSource";
    Some(FastCompare { var, literal: lit[1..lit.len() - 1].to_string(), negate, message_source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use proptest::prelude::*;

    fn ev(json: &str) -> Event {
        crate::model::decode::decode_one(Bytes::from(json.to_string())).unwrap()
    }

    const MSG: &str = r#"{"messageSource":"telemetry","deviceId":"d1","enqueuedTime":"2026-11-01T00:00:00Z","telemetry":{"temperature":21.5,"battery":50,"status":"ok","data":"20.5, 60, 47.6, -122.3","BloodPressure":{"Systolic":71}},"enrichments":{"site":"plant-1"},"messageProperties":{"iothub-creation-time-utc":"2026-11-01T00:00:00Z"}}"#;

    fn check(src: &str, expected: Value) {
        let e = Expr::compile(src).unwrap_or_else(|e| panic!("{src}: {e}"));
        assert_eq!(e.eval(&ev(MSG)).unwrap_or_else(|e| panic!("{src}: {e}")), expected, "{src}");
    }

    #[test]
    fn reads_fields_of_every_kind() {
        check(r#"messageSource == "telemetry""#, Value::Bool(true));
        check("telemetry.temperature * 9 / 5 + 32", Value::Float(70.7));
        check("temperature", Value::Float(21.5));
        check("battery + 1", Value::Int(51));
        check("telemetry.BloodPressure.Systolic", Value::Int(71));
        check("enrichments.site", Value::Str("plant-1".into()));
        check(r#"messageProperties["iothub-creation-time-utc"]"#, Value::Str("2026-11-01T00:00:00Z".into()));
        check("telemetry.missing", Value::Null);
        check("nothing_here", Value::Null);
        check("meta.partition", Value::Int(0));
        check(r#"parse_float(telemetry.data.split(", ")[1])"#, Value::Float(60.0));
        check("round(21.456, 1)", Value::Float(21.5));
        check("if temperature > 20 { \"warm\" } else { \"cold\" }", Value::Str("warm".into()));
        check("time_ms(enqueuedTime)", Value::Int(1_793_491_200_000));
        check("telemetry", Value::Json(r#"{"temperature":21.5,"battery":50,"status":"ok","data":"20.5, 60, 47.6, -122.3","BloodPressure":{"Systolic":71}}"#.into()));
    }

    #[test]
    fn conditions() {
        let e = ev(MSG);
        assert!(Expr::compile("temperature > 20 && status == \"ok\"").unwrap().eval_bool(&e).unwrap());
        assert!(!Expr::compile("missing_field").unwrap().eval_bool(&e).unwrap(), "() is false");
        assert!(Expr::compile("temperature + 1").unwrap().eval_bool(&e).unwrap_err().contains("not a boolean"));
        assert!(Expr::compile("telemetry.status * 2").unwrap().eval(&e).is_err());
    }

    #[test]
    fn compile_errors_name_the_place() {
        let err = Expr::compile("temperature > ").unwrap_err();
        assert!(err.contains("at character"), "{err}");
        assert!(Expr::compile("let x = 1; x").is_err(), "statements are not expressions");
    }

    #[test]
    fn fast_path_is_recognised() {
        assert!(fast_compare(r#"messageSource == "telemetry""#).is_some());
        assert!(fast_compare(r#""telemetry" != messageSource"#).unwrap().negate);
        assert!(fast_compare(r#"a == "x" || b == "y""#).is_none());
        assert!(fast_compare(r#"a == "x\"y""#).is_none());
        assert!(fast_compare("a == b").is_none());
    }

    /// `messageSource` compared as the decoder read it agrees with the interpreter: known and
    /// unknown values, a duplicate key (the first counts, as a lookup finds it), and after the
    /// field was changed.
    #[test]
    fn message_source_from_the_decoder_agrees_with_the_interpreter() {
        let base = r#""enqueuedTime":"2026-11-01T00:00:00Z","telemetry":{"a":1}"#;
        let mut events: Vec<Event> = [
            r#""messageSource":"telemetry""#,
            r#""messageSource":"properties""#,
            r#""messageSource":"somethingNew""#,
            r#""messageSource":"telemetry","messageSource":"properties""#,
            r#""messageSource":"properties","messageSource":"telemetry""#,
        ]
        .iter()
        .map(|ms| ev(&format!("{{{ms},{base}}}")))
        .collect();
        let mut changed = ev(&format!(r#"{{"messageSource":"telemetry",{base}}}"#));
        changed.set(&["messageSource"], Value::Str("properties".into()));
        events.push(changed);
        assert_eq!(events[0].decoded_message_source(), Some(crate::event::MessageSource::Telemetry));
        assert_eq!(events[5].decoded_message_source(), None, "changed since decoding");
        for lit in ["telemetry", "properties", "somethingNew", "other"] {
            for op in ["==", "!="] {
                let compiled = Expr::compile(&format!("messageSource {op} \"{lit}\"")).unwrap();
                assert!(compiled.fast.is_some());
                for (i, e) in events.iter().enumerate() {
                    let fast = compiled.eval_bool(e).unwrap();
                    let slow = compiled.eval_bool_interpreted(e).unwrap();
                    assert_eq!(fast, slow, "messageSource {op} {lit:?}, event {i}");
                }
            }
        }
    }

    fn arb_value() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("\"telemetry\"".to_string()),
            Just("\"properties\"".to_string()),
            Just("\"\"".to_string()),
            Just("5".to_string()),
            Just("null".to_string()),
            Just("true".to_string()),
            Just("{\"a\":1}".to_string()),
            "[a-z]{0,6}".prop_map(|s| format!("\"{s}\"")),
        ]
    }

    proptest! {
        #[test]
        fn fast_path_agrees_with_the_interpreter(top in proptest::option::of(arb_value()), tele in proptest::option::of(arb_value()), lit in "[a-z]{0,6}|telemetry", neg in any::<bool>()) {
            let mut json = String::from(r#"{"messageSource":"telemetry","enqueuedTime":"2026-11-01T00:00:00Z""#);
            if let Some(v) = &top { json.push_str(&format!(",\"x\":{v}")); }
            json.push_str(",\"telemetry\":{");
            if let Some(v) = &tele { json.push_str(&format!("\"x\":{v}")); }
            json.push_str("}}");
            let e = ev(&json);
            let src = format!("x {} \"{lit}\"", if neg { "!=" } else { "==" });
            let compiled = Expr::compile(&src).unwrap();
            prop_assert!(compiled.fast.is_some());
            let fast = compiled.eval_bool(&e).unwrap();
            let slow = compiled.eval_bool_interpreted(&e).unwrap();
            prop_assert_eq!(fast, slow, "{} on {}", src, json);
        }
    }
}
