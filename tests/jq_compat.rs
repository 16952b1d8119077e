//! The `jq` transform against jq itself (libjq, through the PyPI `jq` package): IoT Central's
//! documented transformation examples and further programs give byte-identical JSON output on
//! the same inputs. Known divergences of jaq are listed (here and in the README) and checked to
//! still diverge, so that the list stays true.

use std::time::Duration;

use centralflow::transforms::jq::{iotc, program};
use serde_json::{json, Value};

/// Export messages the programs run on (as the `iotc` input shape, and as exported).
const MESSAGES: [&str; 3] = [
    r#"{"applicationId":"6e9d8f3c","messageSource":"telemetry","deviceId":"sensor-00001","schema":"default@v1","templateId":"dtmi:contoso:Freezer;2","enqueuedTime":"2026-11-01T00:00:05.123Z","enrichments":{"site":"plant-1","line":"A"},"telemetry":{"temperature":22.257,"humidity":57.774,"pressure":1004.56,"battery":70,"status":"ok","RangeOfMotion":90,"location":{"lat":47.6001,"lon":-122.3,"alt":12.0}},"messageProperties":{"iothub-creation-time-utc":"2026-11-01T00:00:05.000Z"}}"#,
    r#"{"applicationId":"6e9d8f3c","messageSource":"telemetry","deviceId":"sensor-00002","schema":"default@v1","templateId":"dtmi:contoso:EnvSensor;1","enqueuedTime":"2026-11-01T00:01:00.000Z","enrichments":{},"telemetry":{"temperature":-3.5,"humidity":0.1,"battery":0,"status":"warn","t1":0.25,"count":123456789},"messageProperties":{}}"#,
    r#"{"applicationId":"6e9d8f3c","messageSource":"properties","messageType":"cloudPropertyChange","deviceId":"sensor-00003","schema":"default@v1","templateId":"dtmi:contoso:Freezer;2","enqueuedTime":"2026-11-01T00:02:00.000Z","enrichments":{"site":"plant-2"},"properties":[{"name":"MachineSerialNumber","value":"abc","component":"DeviceComponent"}]}"#,
];

/// IoT Central's documented examples (howto-transform-data-internally), then further programs.
const PROGRAMS: &[&str] = &[
    ".",
    ".telemetry | map({ key: .name, value: .value }) | from_entries",
    r#"import "iotc" as iotc; { rangeOfMotion: (.telemetry | iotc::find(.name == "RangeOfMotion").value | . * 3.14159265358979323846 / 180) }"#,
    r#". as $in | .telemetry[] | { EnqueuedTime: $in.enqueuedTime, Device: $in.device.id, Template: ($in.device.templateName // ""), Capability: .name, Value: .value }"#,
    r#"if .device.templateId == "dtmi:contoso:Freezer;2" then {id: .device.id, t: .enqueuedTime} else empty end"#,
    r#"import "iotc" as iotc; {deviceId: .device.id, Timestamp: .enqueuedTime, T1: .telemetry | iotc::find(.name=="temperature").value}"#,
    // paths and map/select
    ".enqueuedTime, .device.id, .enrichments.site",
    "[.telemetry[]?.name]",
    ".telemetry | map(select(.value | type == \"number\"))",
    ".telemetry | map(select(.value | type == \"number\") | .value) | add",
    "reduce .telemetry[]? as $t ({}; . + {($t.name): $t.value})",
    ".enrichments | to_entries",
    ".enrichments | to_entries | map(.value |= ascii_upcase) | from_entries",
    "with_entries(select(.key != \"device\"))",
    "\"\\(.device.id) at \\(.enqueuedTime)\"",
    ".device.id | @base64",
    ".device.id | @base64 | @base64d",
    "[.telemetry[]? | .value | tostring]",
    r#"import "iotc" as iotc; .telemetry | iotc::find(.name == "temperature").value | . * 9 / 5 + 32"#,
    r#"import "iotc" as iotc; (.telemetry | iotc::find(.name == "temperature").value) as $t | if $t == null then "none" elif $t > 20 then "hot" elif $t > 0 then "ok" else "cold" end"#,
    ".missing // \"default\", (.enrichments.site // \"nowhere\")",
    "try error(\"stop\") catch .",
    "try (.device.id | tonumber) catch \"not a number\"",
    ".telemetry[]? | select(.name | startswith(\"t\")) | .name",
    ".telemetry | length",
    "keys",
    "[paths | map(tostring) | join(\"/\")]",
    ".telemetry | sort_by(.name) | map(.name)",
    ".telemetry | group_by(.value | type) | map(length)",
    "[.telemetry[]?.value | numbers] | min, max",
    ".enqueuedTime | split(\"T\") | .[0]",
    ".device.id | ascii_upcase | ltrimstr(\"SENSOR-\")",
    "[limit(2; .telemetry[]?)] | length",
    "{a: 1, b: {c: 2}} * {b: {d: 3}}",
    "[range(5)] | map(. * 2)",
    "[range(0; 10; 3)]",
    "del(.device) | keys",
    ".telemetry | any(.value == 70), all(.name | length > 0)",
    "tojson | fromjson | .device.id",
    "[.[] | type]",
    ".telemetry | map(.value | numbers | floor)",
    ".telemetry | map(.value | numbers) | add / length",
    ".x.y.z?",
    ".enqueuedTime | test(\"^2026-11\")",
    "[.telemetry[]? | select(.value | type == \"object\") | .value | keys[]]",
    "[.telemetry[]?.value | numbers] | sort | reverse",
    "first(.telemetry[]?.name), ([.telemetry[]?] | last | .name)",
    "[foreach (.telemetry[]?.value | numbers) as $v (0; . + $v)]",
    "(.telemetry // []) | map(.name) | join(\",\")",
    "{(.deviceId // .device.id): .enqueuedTime}",
    ".device | has(\"id\"), (.telemetry | has(0))",
    "[.telemetry[]?.value | numbers | . * 1000 | round]",
    "path(..) | select(length == 2)",
    "[.. | strings] | length",
    // where jaq's own definitions differ from libjq's (ours are libjq's: program.rs)
    ".telemetry | from_entries",
    ".enrichments | to_entries | map({name: .key, Value: .value}) | from_entries",
    "[.device.id, .component, .missing, 3, true] | join(\"/\")",
    "[nan, (infinite | isinfinite), (-1 | sqrt)]",
];

/// Where jaq is known to answer differently from jq 1.7 (jaq's manual lists them); each is
/// checked to still differ, so that this list and the README stay true.
const DIVERGENT: &[(&str, &str)] = &[
    ("[1e-7, 1.5e300]", "number literals in exponent form: jq (decNumber) writes `1E-7`, jaq `1e-7`"),
    ("12345678901234567890 | . + 1", "integers beyond 2^53: jq writes `12345678901234567000`, jaq `1.2345678901234567e19`"),
    ("12345678901234567890 | floor", "`floor` of an integer beyond 2^53: jaq keeps the literal, jq rounds it to a double"),
    ("1 / 0", "division by zero: jq raises an error, jaq gives infinity"),
    ("{(null): 1}", "a key that is not a string: jq raises an error, jaq builds an object that is not JSON (the jq transform dead-letters such a record)"),
    (r#"{"a":1,"b":2,"c":3} | del(.a) | keys_unsorted"#, "`del` moves the last key into the deleted one's place: jaq `[\"c\",\"b\"]`, jq `[\"b\",\"c\"]`"),
    ("10 / 2 | tostring", "a whole float as text: jaq `\"5.0\"`, jq `\"5\"`"),
    (r#""abc" * 0"#, "a string repeated 0 times: jaq `null`, jq `\"\"`"),
];

fn python() -> String {
    std::env::var("W1_PYTHON").expect("W1_PYTHON names a Python with the `jq` package: run scripts/test")
}

/// Our outputs: each output's compact JSON, or `error` when the program raised one.
fn ours(prog: &str, input: &str) -> Value {
    let p = program::Program::compile(prog).unwrap_or_else(|e| panic!("{prog}: {e}"));
    match p.run(program::parse(input).unwrap(), Duration::from_secs(5), 1000) {
        Ok(outs) => json!({"ok": outs.iter().map(program::to_json).collect::<Vec<_>>()}),
        Err(program::RunError::Jq(_)) => json!({"error": true}),
        Err(e) => panic!("{prog}: {e}"),
    }
}

/// libjq's outputs for every (program, input), in one Python process, each as libjq writes it. `import "iotc"` is given
/// to libjq as the same definition, inlined.
fn theirs(cases: &[(String, String)]) -> Vec<Value> {
    let script = r#"
import sys, json, jq
IOTC = sys.argv[1]
out = []
for prog, inp in json.load(sys.stdin):
    p = prog.replace('import "iotc" as iotc;', IOTC + ' ').replace('iotc::find(', 'iotc_find(')
    try:
        # libjq's own serialization (`tojson` is `jq -c`'s), not Python's
        out.append({"ok": jq.compile("(" + p + ") | tojson").input_text(inp).all()})
    except ValueError:
        out.append({"error": True})
print(json.dumps(out))
"#;
    let iotc_inline = program::IOTC_MODULE.replace("def find(", "def iotc_find(");
    let mut child = std::process::Command::new(python())
        .args(["-c", script, &iotc_inline])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child.stdin.take().unwrap().write_all(serde_json::to_string(cases).unwrap().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "libjq: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn inputs() -> Vec<String> {
    let mut v = Vec::new();
    for m in MESSAGES {
        let ev = centralflow::model::decode::decode_object(bytes::Bytes::from(m)).unwrap();
        v.push(iotc::input_of(&ev).unwrap().to_string());
        v.push(m.to_string());
    }
    v
}

#[test]
fn jq_programs_give_the_same_bytes_as_libjq() {
    let cases: Vec<(String, String)> =
        PROGRAMS.iter().flat_map(|p| inputs().into_iter().map(move |i| (p.to_string(), i))).collect();
    assert!(PROGRAMS.len() >= 36, "the documented examples and at least 30 more");
    let expected = theirs(&cases);
    let mut differ = Vec::new();
    for ((prog, input), want) in cases.iter().zip(&expected) {
        let got = ours(prog, input);
        if &got != want {
            differ.push(format!("{prog}\n  on {input:.100}\n  jq:  {want}\n  jaq: {got}"));
        }
    }
    let produced = expected.iter().filter(|v| v["ok"].as_array().is_some_and(|a| !a.is_empty())).count();
    assert!(produced > cases.len() / 2, "most cases produce output ({produced} of {})", cases.len());
    assert!(differ.is_empty(), "{} of {} differ:\n{}", differ.len(), cases.len(), differ.join("\n"));
}

#[test]
fn known_divergences_still_diverge() {
    let cases: Vec<(String, String)> = DIVERGENT.iter().map(|(p, _)| (p.to_string(), "null".to_string())).collect();
    let expected = theirs(&cases);
    for ((prog, why), want) in DIVERGENT.iter().zip(&expected) {
        assert_ne!(
            &ours(prog, "null"),
            want,
            "{prog} no longer diverges ({why}): remove it from the list and the README"
        );
    }
}
