//! A compiled jq program (jaq) and its guard against runaway evaluation.
//!
//! jaq has no limit of its own on how long a program runs or how deep it recurses. The guard
//! uses the one place every evaluation step passes through: before evaluating any term, jaq
//! asks the run's data for its look-up table ([`HasLut::lut`]). Our data type counts those calls
//! and, every 256 of them, compares the clock with the record's deadline; on every call it also
//! compares the stack depth used since the record started with a budget. Past either, it
//! unwinds out of the evaluation with a private panic payload, caught around the record (jaq
//! forbids `unsafe`, so unwinding through it leaves nothing inconsistent; its values are
//! dropped). Outputs are pulled one at a time, so `max_outputs` stops an endless stream of them.
//! Natives that consume a stream evaluate their producer's terms, except when the producer is
//! itself a native without filter arguments; the only such endless producer, `range`, is
//! replaced by jq's own definition ([`GUARDED_DEFS`]). What the guard cannot stop is one native
//! operation that is itself huge (`"x" * 1e9`): that is bounded by memory, not time.

use std::cell::Cell;
use std::time::{Duration, Instant};

use jaq_core::data::{DataT, HasLut};
use jaq_core::load::{Arena, File, Import, Loader};
use jaq_core::{Compiler, Ctx, Native, Vars};
use jaq_json::Val;

/// The `iotc` module IoT Central's transformations import (`import "iotc" as iotc;`).
pub const IOTC_MODULE: &str = "def find(f): first(.[] | select(f)) // null;";

/// `range` as jq 1.6 defines it, replacing jaq's native one: a native stream feeding a native
/// consumer (`last(range(1e18))`) never evaluates a term, so the guard would never see it; as a
/// definition, every element is a step. The shorter forms are defined again after it, so that
/// they call it.
const GUARDED_DEFS: &str = "\
def range($from; $upto; $by): if $by > 0 then $from | while(. < $upto; . + $by) \
  elif $by < 0 then $from | while(. > $upto; . + $by) else empty end;
def range($from; $upto): range($from; $upto; 1);
def range($upto): range(0; $upto);";

/// Definitions as libjq 1.8 has them, where jaq's give other results on IoT Central's data
/// (checked against libjq in tests/jq_compat.rs): `from_entries` takes `name` and `Key` keys
/// and `Value` values (jaq's only `key`: `[{name, value}]`, IoT Central's telemetry, became
/// `{null: ...}`); `join` writes null as "" (jaq: "null"); `halt_error` ends the record with an
/// error naming its input (jaq's prints it to the process's stderr and exits the process).
const LIBJQ_DEFS: &str = r#"
def from_entries: reduce .[] as $x ({}; . + { ($x | .key // .Key // .name // .Name):
  ($x | if has("value") then .value else .Value end) });
def join($x): reduce .[] as $i (null; (if . == null then "" else . + $x end) +
  ($i | if . == null then "" elif type == "boolean" or type == "number" then tojson else . end)) // "";
def halt_error($exit_code): if $exit_code == 0 then halt
  else error("halt_error(\($exit_code)): \(if type == "string" then . else tojson end)") end;
def halt_error: halt_error(5);"#;

/// `fromjson` within the decoders' limits (see [`natives`]); defined before jaq_json's
/// definitions, whose `tonumber` and the like call it.
const FROMJSON_DEF: &str = "def fromjson: _json_within_limits | _fromjson;";

/// jaq's natives, with jaq's `fromjson` also as `_fromjson`, and `_json_within_limits`: the
/// input when it is text within the limits the decoders keep (nesting, see
/// [`crate::model::limits`]), else an error. Our `fromjson` ([`FROMJSON_DEF`]) is the two:
/// jaq's reader recurses once per level of nesting, and `"[" * 100000 + "]" * 100000 |
/// fromjson`, 200 KB of a message, overflowed the thread's stack and ended the process (libjq
/// refuses it: depth limit).
fn natives() -> impl Iterator<Item = jaq_core::native::Fun<Guarded>> {
    let jaq = jaq_core::funs().chain(jaq_std::funs()).chain(jaq_json::funs());
    let unchecked = jaq_json::funs().filter(|f| f.0 == "fromjson").map(|(_, args, f)| ("_fromjson", args, f));
    jaq.chain(unchecked).chain(std::iter::once(within_limits()))
}

/// `_json_within_limits` (see [`natives`]); generic as jaq's own natives are, so that the data
/// type's values are known to be [`Val`].
fn within_limits<D: for<'a> DataT<V<'a> = Val>>() -> jaq_core::native::Fun<D> {
    jaq_core::native::run(("_json_within_limits", jaq_core::native::v(0), |cv| {
        let checked = match &cv.1 {
            Val::TStr(b) => match std::str::from_utf8(b) {
                Ok(text) => crate::model::limits::check_value_limits(text).map_err(|e| format!("fromjson: {e}")),
                Err(_) => Ok(()), // jaq's reader words invalid UTF-8
            },
            _ => Ok(()), // jaq's fromjson words the type error
        };
        jaq_core::native::bome(checked.map(|()| cv.1).map_err(jaq_core::Error::str))
    }))
}

/// The data type our programs run with: jaq's JSON values, and a look-up table whose every use
/// is a guard check.
pub struct Guarded;

impl DataT for Guarded {
    type V<'a> = Val;
    type Data<'a> = GuardedLut<'a>;
}

/// The program's look-up table, as the run's data.
#[derive(Clone)]
pub struct GuardedLut<'a>(&'a jaq_core::Lut<Guarded>);

impl<'a> HasLut<'a, Guarded> for GuardedLut<'a> {
    fn lut(&self) -> &'a jaq_core::Lut<Guarded> {
        guard_step();
        self.0
    }
}

/// Why an evaluation was stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Time,
    Depth,
}

struct Guard {
    deadline: Instant,
    stack_base: usize,
    steps: u32,
}

thread_local! {
    static GUARD: Cell<Option<(Instant, usize)>> = const { Cell::new(None) };
    static STEPS: Cell<u32> = const { Cell::new(0) };
}

/// Stack a record's evaluation may use beyond where it started.
const STACK_BUDGET: usize = 512 * 1024;

#[inline]
fn stack_address() -> usize {
    let marker = 0u8;
    std::hint::black_box(&marker) as *const u8 as usize
}

fn guard_step() {
    let Some((deadline, base)) = GUARD.with(Cell::get) else { return };
    if base.saturating_sub(stack_address()) > STACK_BUDGET {
        std::panic::panic_any(Stop::Depth);
    }
    let n = STEPS.with(|s| {
        let n = s.get().wrapping_add(1);
        s.set(n);
        n
    });
    if n % 256 == 0 && Instant::now() > deadline {
        std::panic::panic_any(Stop::Time);
    }
}

impl Guard {
    fn arm(timeout: Duration) -> Guard {
        static QUIET: std::sync::Once = std::sync::Once::new();
        // our stops are not crashes: keep them out of the panic hook's output
        QUIET.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                if info.payload().downcast_ref::<Stop>().is_none() {
                    previous(info)
                }
            }));
        });
        let g = Guard { deadline: Instant::now() + timeout, stack_base: stack_address(), steps: 0 };
        GUARD.with(|c| c.set(Some((g.deadline, g.stack_base))));
        STEPS.with(|s| s.set(g.steps));
        g
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        GUARD.with(|c| c.set(None));
    }
}

/// A compiled program.
pub struct Program {
    filter: jaq_core::compile::Filter<Native<Guarded>>,
}

impl std::fmt::Debug for Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Program")
    }
}

/// Why a record produced no outputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunError {
    /// The program raised an error (`error(...)`, a type error, ...).
    Jq(String),
    Timeout(Duration),
    TooDeep,
    TooMany(usize),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Jq(e) => write!(f, "jq error: {e}"),
            RunError::Timeout(t) => write!(f, "the jq program ran longer than {t:?} on this record (`timeout`)"),
            RunError::TooDeep => {
                write!(f, "the jq program recursed deeper than {} KiB of stack on this record", STACK_BUDGET / 1024)
            }
            RunError::TooMany(n) => {
                write!(f, "the jq program emitted more than {n} outputs for this record (`max_outputs`)")
            }
        }
    }
}

/// Line and column (1-based) of `part`, a slice of `code`.
fn position(code: &str, part: &str) -> (usize, usize) {
    let offset = (part.as_ptr() as usize).saturating_sub(code.as_ptr() as usize).min(code.len());
    let before = &code[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

fn near(part: &str) -> String {
    let s: String = part.chars().take(20).collect();
    if s.is_empty() {
        "the end".into()
    } else {
        format!("`{s}`")
    }
}

impl Program {
    /// Compiles a program; errors say what was expected where (line and column in the program).
    pub fn compile(code: &str) -> Result<Program, String> {
        let guarded = jaq_core::load::parse(GUARDED_DEFS, |p| p.defs()).expect("the guarded definitions parse");
        let libjq = jaq_core::load::parse(LIBJQ_DEFS, |p| p.defs()).expect("the libjq definitions parse");
        let fromjson = jaq_core::load::parse(FROMJSON_DEF, |p| p.defs()).expect("fromjson parses");
        let defs = jaq_core::defs().chain(jaq_std::defs()).chain(fromjson).chain(jaq_json::defs());
        let defs = defs.chain(guarded).chain(libjq);
        let funs = natives();
        // modules are told apart by path: the main program is "", `iotc` is "iotc"
        let read = |imp: Import<&str, String>| match *imp.path {
            "iotc" => Ok(File { code: IOTC_MODULE.to_string(), path: "iotc".to_string() }),
            other => Err(format!("unknown module `{other}` (only `iotc` is available)")),
        };
        let loader = Loader::new(defs).with_read(read);
        let arena = Arena::default();
        let modules = loader.load(&arena, File { code, path: String::new() }).map_err(|errs| {
            let mut msgs = Vec::new();
            for (_file, e) in errs {
                match e {
                    jaq_core::load::Error::Io(list) => {
                        msgs.extend(list.into_iter().map(|(path, e)| format!("import \"{path}\": {e}")))
                    }
                    jaq_core::load::Error::Lex(list) => msgs.extend(list.into_iter().map(|(expect, at)| {
                        let (l, c) = position(code, at);
                        format!(
                            "expected {} at line {l}, column {c} of the program (near {})",
                            expect.as_str(),
                            near(at)
                        )
                    })),
                    jaq_core::load::Error::Parse(list) => msgs.extend(list.into_iter().map(|(expect, at)| {
                        let (l, c) = position(code, at);
                        format!(
                            "expected {} at line {l}, column {c} of the program (near {})",
                            expect.as_str(),
                            near(at)
                        )
                    })),
                }
            }
            msgs.join("; ")
        })?;
        let filter = Compiler::default().with_funs(funs).compile(modules).map_err(|errs| {
            errs.into_iter()
                .flat_map(|(_file, list)| list)
                .map(|(name, undefined)| {
                    let (l, c) = position(code, name);
                    format!("undefined {} `{name}` at line {l}, column {c} of the program", undefined.as_str())
                })
                .collect::<Vec<_>>()
                .join("; ")
        })?;
        Ok(Program { filter })
    }

    /// Runs the program on one input, within `timeout` and at most `max_outputs` outputs.
    pub fn run(&self, input: Val, timeout: Duration, max_outputs: usize) -> Result<Vec<Val>, RunError> {
        let guard = Guard::arm(timeout);
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let ctx = Ctx::<Guarded>::new(GuardedLut(&self.filter.lut), Vars::new([]));
            let mut outs = Vec::new();
            for v in self.filter.id.run((ctx, input)) {
                match v {
                    Ok(v) if outs.len() < max_outputs => outs.push(v),
                    Ok(_) => return Err(RunError::TooMany(max_outputs)),
                    // not jaq_core::unwrap_valr, which ends the process on `halt`
                    Err(exn) => match exn.get_err() {
                        Ok(e) => return Err(RunError::Jq(e.to_string())),
                        // `halt`: the program ends here, with what it emitted, as jq's does
                        Err(exn) => match exn.get_halt() {
                            Ok(0) => return Ok(outs),
                            Ok(code) => return Err(RunError::Jq(format!("the program halted with exit code {code}"))),
                            Err(_) => return Err(RunError::Jq("the program stopped".into())),
                        },
                    },
                }
            }
            Ok(outs)
        }));
        drop(guard);
        match ran {
            Ok(r) => r,
            Err(payload) => match payload.downcast_ref::<Stop>() {
                Some(Stop::Time) => Err(RunError::Timeout(timeout)),
                Some(Stop::Depth) => Err(RunError::TooDeep),
                // a panic inside jaq (a size that overflows, `"x" * 4611686018427387904`) is
                // about this record; jaq has no unsafe code, so nothing is left inconsistent
                None => {
                    let what = payload.downcast_ref::<&str>().map(|s| s.to_string());
                    let what = what.or_else(|| payload.downcast_ref::<String>().cloned()).unwrap_or_default();
                    Err(RunError::Jq(format!("the jq engine failed on this record: {what}")))
                }
            },
        }
    }
}

/// Parses JSON text into a jq value.
pub fn parse(json: &str) -> Result<Val, String> {
    jaq_json::read::parse_single(json.as_bytes()).map_err(|e| e.to_string())
}

/// A value as compact JSON text, as jq prints it with `-c`: NaN as null and ±Infinity as the
/// largest finite number (jaq prints `NaN` and `Infinity`, which are not JSON: the output was
/// refused as malformed).
pub fn to_json(v: &Val) -> String {
    let s = v.to_string();
    if !(s.contains("NaN") || s.contains("Infinity")) {
        return s;
    }
    finite(v).map_or(s, |f| f.to_string())
}

/// `v` with its non-finite numbers as jq prints them; `None` when it has none.
fn finite(v: &Val) -> Option<Val> {
    use jaq_json::{Num, Rc};
    match v {
        Val::Num(Num::Float(f)) if f.is_nan() => Some(Val::Null),
        Val::Num(Num::Float(f)) if f.is_infinite() => Some(Val::Num(Num::Float(f.signum() * f64::MAX))),
        Val::Arr(a) => {
            let mapped: Vec<Option<Val>> = a.iter().map(finite).collect();
            mapped.iter().any(Option::is_some).then(|| {
                let items = a.iter().zip(mapped).map(|(x, m)| m.unwrap_or_else(|| x.clone()));
                Val::Arr(Rc::new(items.collect()))
            })
        }
        Val::Obj(o) => {
            let mapped: Vec<Option<Val>> = o.values().map(finite).collect();
            mapped.iter().any(Option::is_some).then(|| {
                let items = o.iter().zip(mapped).map(|((k, x), m)| (k.clone(), m.unwrap_or_else(|| x.clone())));
                Val::Obj(Rc::new(items.collect()))
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run1(code: &str, input: &str) -> Result<Vec<String>, RunError> {
        let p = Program::compile(code).unwrap();
        p.run(parse(input).unwrap(), Duration::from_secs(2), 100).map(|v| v.iter().map(to_json).collect())
    }

    #[test]
    fn runs_programs_with_several_outputs_and_the_iotc_module() {
        assert_eq!(run1(".a, .b", r#"{"a":1,"b":"x"}"#).unwrap(), vec!["1", "\"x\""]);
        let found = run1(
            r#"import "iotc" as iotc; .telemetry | iotc::find(.name == "t").value"#,
            r#"{"telemetry":[{"name":"u","value":1},{"name":"t","value":2}]}"#,
        );
        assert_eq!(found.unwrap(), vec!["2"]);
        assert_eq!(run1("empty", "{}").unwrap(), Vec::<String>::new());
    }

    #[test]
    fn compile_errors_say_where() {
        let e = Program::compile(".a |\n  {b: }").unwrap_err();
        assert!(e.contains("line 2"), "{e}");
        let e = Program::compile(".a | nosuchfilter").unwrap_err();
        assert!(e.contains("undefined filter `nosuchfilter`") && e.contains("column 6"), "{e}");
        let e = Program::compile(r#"import "other" as o; ."#).unwrap_err();
        assert!(e.contains("unknown module `other`"), "{e}");
    }

    fn stopped(code: &str, timeout_ms: u64) -> Result<Vec<Val>, RunError> {
        Program::compile(code).unwrap().run(Val::Null, Duration::from_millis(timeout_ms), 10)
    }

    #[test]
    fn endless_tail_recursion_is_stopped_by_the_timeout() {
        assert_eq!(stopped("def f: f; f", 50), Err(RunError::Timeout(Duration::from_millis(50))));
    }

    #[test]
    fn endless_native_streams_are_stopped_by_the_timeout() {
        assert_eq!(stopped("last(range(1e18))", 50), Err(RunError::Timeout(Duration::from_millis(50))));
    }

    #[test]
    fn deep_recursion_is_stopped_before_the_stack_ends() {
        assert_eq!(stopped("def f: 1 + f; f", 5000), Err(RunError::TooDeep));
    }

    #[test]
    fn halt_ends_the_record_not_the_process() {
        assert_eq!(run1("1, halt, 2", "null").unwrap(), vec!["1"]);
        let e = run1(r#"1, ("bad" | halt_error(3)), 2"#, "null").unwrap_err();
        assert!(matches!(&e, RunError::Jq(m) if m.contains("halt_error(3): bad")), "{e}");
        let e = run1("halt_error", r#"{"a":1}"#).unwrap_err();
        // the error is a jq string: its text shows the input's quotes escaped
        assert!(matches!(&e, RunError::Jq(m) if m.contains(r#"halt_error(5): {\"a\":1}"#)), "{e}");
        assert_eq!(run1(r#""x" | halt_error(0)"#, "null").unwrap(), Vec::<String>::new());
    }

    #[test]
    fn fromjson_refuses_what_would_end_the_stack() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let input = to_json(&Val::from(deep));
        let e = run1("fromjson", &input).unwrap_err();
        assert!(matches!(&e, RunError::Jq(m) if m.contains("nested more than")), "{e}");
        assert_eq!(run1(r#"try fromjson catch "bad""#, &input).unwrap(), vec![r#""bad""#]);
        assert_eq!(run1("fromjson | .a", r#""{\"a\":[1,{\"b\":2}]}""#).unwrap(), vec![r#"[1,{"b":2}]"#]);
        assert!(run1("fromjson", "3").is_err(), "not text");
        // jaq's own definitions that parse text call the same one
        let e = run1("tonumber", &input).unwrap_err();
        assert!(matches!(&e, RunError::Jq(m) if m.contains("nested more than")), "{e}");
        assert_eq!(run1("tonumber", r#""12.5""#).unwrap(), vec!["12.5"]);
    }

    #[test]
    fn a_panic_in_the_engine_is_the_records_error() {
        let e = run1(r#""abcde" * .n"#, r#"{"n":4611686018427387904}"#).unwrap_err();
        assert!(matches!(&e, RunError::Jq(m) if m.contains("the jq engine failed")), "{e}");
        assert_eq!(run1(".+1", "1").unwrap(), vec!["2"], "and the thread goes on");
    }

    #[test]
    fn non_finite_numbers_print_as_jq_prints_them() {
        let out = run1("[.a / .b, (-1 | sqrt), (0 | log), {x: (1 / 0)}]", r#"{"a":1,"b":0}"#).unwrap();
        assert_eq!(out, vec!["[1.7976931348623157e308,null,-1.7976931348623157e308,{\"x\":1.7976931348623157e308}]"]);
        assert_eq!(run1("[.a, \"NaN\"]", r#"{"a":1.5}"#).unwrap(), vec![r#"[1.5,"NaN"]"#]);
    }

    #[test]
    fn endless_outputs_are_cut_and_errors_reported() {
        assert_eq!(stopped("repeat(.)", 5000), Err(RunError::TooMany(10)));
        assert!(matches!(stopped("error(\"boom\")", 5000), Err(RunError::Jq(e)) if e.contains("boom")));
        // and the thread goes on evaluating normally afterwards
        assert_eq!(run1(".+1", "1").unwrap(), vec!["2"]);
    }
}
