use super::structure::SECTIONS;
use super::*;

fn env(name: &str) -> Option<String> {
    match name {
        "OUT" => Some("/tmp/out".into()),
        "DEVICES" => Some("25".into()),
        "KEY" => Some("c2VjcmV0LWtleS12YWx1ZQ==".into()),
        _ => None,
    }
}

fn load(text: &str) -> Result<Plan, Vec<ConfigError>> {
    load_str(text, "test", &env)
}

fn errors(text: &str) -> Vec<String> {
    match load(text) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(e) => e.iter().map(|e| e.to_string()).collect(),
    }
}

const GOOD: &str = r#"
sources:
  sim:
    type: simulator
    devices: ${DEVICES}
    count: 100
transforms:
  telemetry:
    type: filter
    inputs: [sim]
    condition: messageSource == "telemetry"
  both:
    type: map
    inputs: [telemetry, sim.dead_letter]
    set:
      f: temperature * 2
sinks:
  lake:
    type: parquet
    inputs: [both]
    url: ${OUT}/x
  dl:
    type: jsonl
    inputs: [both.dead_letter, telemetry.dead_letter]
    path: /tmp/dl.jsonl
"#;

#[test]
fn a_good_pipeline_becomes_an_ordered_plan() {
    let plan = load(GOOD).unwrap();
    assert_eq!(plan.name, "test");
    let names: Vec<&str> = plan.nodes.iter().map(|n| n.name.as_str()).collect();
    // every node after its inputs
    for (i, n) in plan.nodes.iter().enumerate() {
        for (up, _) in &n.inputs {
            assert!(*up < i, "{names:?}");
        }
    }
    let both = &plan.nodes[plan.node("both").unwrap()];
    assert_eq!(both.inputs.len(), 2);
    assert!(both.inputs.contains(&(plan.node("sim").unwrap(), 1)), "sim.dead_letter is port 1");
    match &plan.nodes[plan.node("sim").unwrap()].config {
        ComponentConfig::Source(SourceConfig::Simulator(s)) => assert_eq!(s.devices, 25, "interpolated number"),
        other => panic!("{other:?}"),
    }
    match &plan.nodes[plan.node("lake").unwrap()].config {
        ComponentConfig::Sink(SinkConfig::Parquet(p)) => assert_eq!(p.url, "/tmp/out/x"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn three_mistakes_give_three_located_errors() {
    let text = r#"sources:
  sim:
    type: simulator
    count: 10
    devcies: 5
transforms:
  w:
    type: filter
    inputs: [simm]
    condition: temperature >
sinks:
  out:
    type: console
    inputs: [w]
"#;
    let errs = errors(text);
    assert_eq!(errs.len(), 3, "{errs:#?}");
    assert!(
        errs[0].starts_with("sources.sim.devcies: unknown field `devcies` (did you mean `devices`?)"),
        "{}",
        errs[0]
    );
    assert!(errs[0].ends_with("(line 5, column 5)"), "{}", errs[0]);
    assert!(errs[1].starts_with("transforms.w.inputs[0]: unknown input `simm` (did you mean `sim`?)"), "{}", errs[1]);
    assert!(errs[1].ends_with("(line 9, column 14)"), "{}", errs[1]);
    assert!(errs[2].starts_with("transforms.w.condition: invalid expression"), "{}", errs[2]);
    assert!(errs[2].ends_with("(line 10, column 16)"), "{}", errs[2]);
}

#[test]
fn structural_errors_are_all_reported() {
    let text = r#"sourcs: {}
sources:
  a:
    type: simulator
    count: "many"
    rate: -1
  b:
    type: nosuch
  c:
    url: x
transforms:
  m:
    type: map
    inputs: [a]
sinks:
  s:
    type: parquet
    inputs: [a]
    compression: lz9
"#;
    let errs = errors(text);
    let joined = errs.join("\n");
    for want in [
        "sourcs: unknown field `sourcs` (did you mean `sources`?) (line 1, column 1)",
        "sources.a.count: must be integer or nothing (line 5, column 12)",
        "sources.b.type: unknown source type `nosuch`",
        "sources.c: has no `type` (one of: files, amqp, simulator",
        "sinks.s: missing required field `url`",
        "sinks.s.compression: must be one of \"zstd\", \"snappy\", \"none\" (line 19, column 18)",
    ] {
        assert!(joined.contains(want), "missing {want:?} in:\n{joined}");
    }
}

#[test]
fn value_and_graph_errors() {
    let text = r#"sources:
  a:
    type: simulator
    count: 10
    duration: 1 fortnight
    start: yesterday
transforms:
  x:
    type: map
    inputs: [y]
    set: {f: "1"}
  y:
    type: map
    inputs: [x]
    set: {g: "2"}
  z:
    type: filter
    inputs: [a.nope]
    condition: "true"
sinks:
  out:
    type: console
    inputs: [y, out]
"#;
    let joined = errors(text).join("\n");
    for want in [
        "sources.a.duration: \"1 fortnight\" is not a duration",
        "sources.a.start: \"yesterday\" is not an RFC 3339 timestamp",
        "transforms.z.inputs[0]: `a` has no output `nope` (its outputs: `a`, `a.dead_letter`)",
        "sinks.out.inputs[1]: `out` is a sink and has no output",
        "the inputs form a cycle",
    ] {
        assert!(joined.contains(want), "missing {want:?} in:\n{joined}");
    }
}

#[test]
fn missing_environment_variables_are_located() {
    let errs = errors("sources:\n  a:\n    type: files\n    url: ${NOT_SET_ANYWHERE}\nsinks:\n  o:\n    type: console\n    inputs: [a]\n");
    assert_eq!(errs.len(), 1);
    assert!(errs[0].starts_with("sources.a.url: environment variable NOT_SET_ANYWHERE is not set"), "{}", errs[0]);
    assert!(errs[0].ends_with("(line 4, column 10)"), "{}", errs[0]);
}

#[test]
fn secrets_must_come_from_the_environment_and_are_not_printed() {
    let literal = "sources:\n  a:\n    type: files\n    url: s3://b/p\n    storage:\n      aws_secret_access_key: hunter2-literal\nsinks:\n  o:\n    type: console\n    inputs: [a]\n";
    let errs = errors(literal);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].contains("is a secret and must come from the environment"), "{}", errs[0]);
    assert!(!errs[0].contains("hunter2-literal"));
    let from_env = literal.replace("hunter2-literal", "${KEY}");
    let plan = load(&from_env).unwrap();
    let dbg = format!("{plan:?}");
    assert!(dbg.contains("aws_secret_access_key"));
    // the value is registered for redaction wherever it might be printed
    assert_eq!(crate::secret::redact("key c2VjcmV0LWtleS12YWx1ZQ== leaked"), "key *** leaked");
}

#[test]
fn duplicate_names_and_empty_pipelines() {
    let joined = errors("sources:\n  a:\n    type: simulator\n    count: 1\ntransforms:\n  a:\n    type: filter\n    inputs: [a]\n    condition: 'true'\nsinks: {}\n").join("\n");
    assert!(joined.contains("the name `a` is also used in `sources`"), "{joined}");
    assert!(joined.contains("a pipeline needs at least one sink"), "{joined}");
}

#[test]
fn the_json_schema_describes_every_component_type() {
    let schema = json_schema().to_string();
    for t in crate::sources::TYPES.iter().chain(crate::transforms::TYPES).chain(crate::sinks::TYPES) {
        assert!(schema.contains(&format!("\"{t}\"")), "type {t} missing from the schema");
    }
}

/// Configuration is validated with draft 7 rules (see `validate_against`); that is only right
/// while the generated schemas use no keyword that draft 7 reads differently from 2020-12.
#[test]
fn schemas_mean_the_same_under_draft_7() {
    fn walk(v: &serde_json::Value, at: &str, bad: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(o) => {
                for k in o.keys() {
                    let new_in_2019 = [
                        "prefixItems",
                        "unevaluatedProperties",
                        "unevaluatedItems",
                        "dependentRequired",
                        "dependentSchemas",
                        "$anchor",
                        "$dynamicRef",
                        "$dynamicAnchor",
                        "$recursiveRef",
                        "minContains",
                        "maxContains",
                    ];
                    if new_in_2019.contains(&k.as_str()) {
                        bad.push(format!("{at}/{k}"));
                    }
                }
                // draft 7 ignores what stands beside a `$ref`
                if o.contains_key("$ref") {
                    let annotations = ["$ref", "description", "title", "default", "examples", "deprecated"];
                    for k in o.keys().filter(|k| !annotations.contains(&k.as_str())) {
                        bad.push(format!("{at}/{k} beside $ref"));
                    }
                }
                for (k, v) in o {
                    walk(v, &format!("{at}/{k}"), bad);
                }
            }
            serde_json::Value::Array(a) => {
                for (i, v) in a.iter().enumerate() {
                    walk(v, &format!("{at}/{i}"), bad);
                }
            }
            _ => {}
        }
    }
    let mut schemas = vec![("pipeline".to_string(), json_schema())];
    for (_, types, schema_of) in SECTIONS {
        schemas.extend(types.iter().map(|t| (t.to_string(), schema_of(t).unwrap())));
    }
    let mut bad = Vec::new();
    for (name, s) in &schemas {
        walk(s, name, &mut bad);
    }
    assert!(bad.is_empty(), "keywords draft 7 reads differently: {bad:?}");
    // and the rules still bite: an unknown field, a wrong type, a value outside an enum
    let errs = errors(
        "sources:\n  s:\n    type: files\n    url: [x]\n    nope: 1\n    format: xml\nsinks:\n  c:\n    type: console\n    inputs: [s]\n",
    );
    assert_eq!(errs.len(), 3, "{errs:#?}");
    let joined = errs.join("\n");
    for want in ["sources.s.nope: unknown field", "sources.s.url:", "sources.s.format:"] {
        assert!(joined.contains(want), "{want} in {joined}");
    }
}

#[test]
fn dotted_paths() {
    assert_eq!(dotted("/transforms/a/inputs/0"), "transforms.a.inputs[0]");
    assert_eq!(dotted("/sources/x~1y/url"), "sources.x/y.url");
    assert_eq!(dotted(""), "");
}

#[test]
fn sources_decode_only_what_the_pipeline_reads() {
    let w1 = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines/w1-tumbling.yaml")).unwrap();
    let env = |k: &str| match k {
        "CENTRALFLOW_INPUT" | "CENTRALFLOW_OUTPUT" => Some("/tmp/x".to_string()),
        _ => None,
    };
    let plan = load_str(&w1, "w1", &env).unwrap();
    let p = plan.nodes[plan.node("export").unwrap()].projection.clone().expect("a projection");
    let mut top = p.top.clone();
    top.sort();
    assert_eq!(top, ["deviceId", "enqueuedTime", "messageSource", "telemetry"]);
    assert_eq!(p.telemetry, Some(vec!["temperature".to_string(), "humidity".to_string(), "pressure".to_string()]));
    let raw =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines/replay-to-parquet.yaml")).unwrap();
    let plan = load_str(&raw, "r", &env).unwrap();
    assert!(plan.nodes[plan.node("export").unwrap()].projection.is_none(), "raw Parquet needs whole events");
}

#[test]
fn window_rows_go_as_columns_only_to_ports_whose_consumers_all_read_them() {
    let pipeline = |sinks: &str| {
        let text = format!(
            "sources:\n  sim:\n    type: simulator\n    count: 10\ntransforms:\n  w:\n    type: window\n    inputs: [sim]\n    \
             window: {{kind: tumbling, size: 1m}}\nsinks:\n{sinks}"
        );
        let plan = load(&text).unwrap();
        let cols = crate::assemble::columnar_ports(&plan);
        let w = plan.nodes.iter().position(|n| n.name == "w").unwrap();
        let sim = plan.nodes.iter().position(|n| n.name == "sim").unwrap();
        (cols[w].clone(), cols[sim][0])
    };
    let pq =
        |name: &str, extra: &str| format!("  {name}:\n    type: parquet\n    inputs: [w]\n    url: /tmp/x\n{extra}");
    // main, late, dead_letter
    assert_eq!(pipeline(&pq("a", "")), (vec![true, false, false], false));
    assert_eq!(pipeline(&(pq("a", "") + pq("b", "    layout: rows\n").as_str())).0, vec![true, false, false]);
    // a consumer that reads events only, or a Parquet sink that renders paths or metadata from events
    let jsonl = "  j:\n    type: jsonl\n    inputs: [w]\n    path: /tmp/x.jsonl\n";
    assert_eq!(pipeline(&(pq("a", "") + jsonl)).0, vec![false, false, false]);
    assert_eq!(pipeline(&pq("a", "    partition_by: date=%Y-%m-%d\n")).0, vec![false, false, false]);
    assert_eq!(pipeline(&pq("a", "    metadata_columns: true\n")).0, vec![false, false, false]);
    assert_eq!(pipeline(&pq("a", "    layout: export\n")).0, vec![false, false, false]);
    // the flag only allows columns: the window sends late events (export messages) as events
    let late = "  l:\n    type: parquet\n    inputs: [w.late]\n    url: /tmp/l\n";
    assert_eq!(pipeline(&(pq("a", "") + late)).0, vec![true, true, false]);
}

/// The errors of a pipeline with one window transform whose `window:` is `window`.
fn window_errors(window: &str) -> Vec<String> {
    errors(&format!(
        "sources:\n  sim:\n    type: simulator\n    count: 1\ntransforms:\n  w:\n    type: window\n    inputs: [sim]\n    \
         window: {window}\nsinks:\n  o:\n    type: console\n    inputs: [w]\n"
    ))
}

/// Checks that `errs` are exactly `want`, each a prefix of one error, in order.
fn assert_errors(errs: &[String], want: &[&str]) {
    assert_eq!(errs.len(), want.len(), "{errs:#?}");
    for (e, w) in errs.iter().zip(want) {
        assert!(e.starts_with(w), "want {w:?}, got {e:?}");
        assert!(!e.contains("is not valid under"), "{e}");
    }
}

#[test]
fn window_errors_name_the_kind_of_window() {
    // the issue's example: a misspelled field, located at the key, and the field it leaves out
    let errs = window_errors("{kind: tumbling, sise: 1m}");
    assert_errors(
        &errs,
        &[
            "transforms.w.window: a tumbling window needs `size` (line 9, column 13)",
            "transforms.w.window.sise: unknown field `sise` in a tumbling window (did you mean `size`?) \
             (known fields: kind, size) (line 9, column 30)",
        ],
    );
    assert_errors(
        &window_errors("{kind: hopping, size: 1m}"),
        &["transforms.w.window: a hopping window needs `hop` (line 9, column 13)"],
    );
    assert_errors(
        &window_errors("{size: 1m}"),
        &["transforms.w.window: a window needs `kind` (one of: tumbling, hopping, session) (line 9, column 13)"],
    );
    assert_errors(
        &window_errors("{kind: tumblin, size: 1m}"),
        &["transforms.w.window.kind: unknown window kind `tumblin` (did you mean `tumbling`?) \
           (one of: tumbling, hopping, session) (line 9, column 20)"],
    );
    assert_errors(
        &window_errors("{kind: 7, size: 1m}"),
        &["transforms.w.window.kind: must be one of: tumbling, hopping, session (line 9, column 20)"],
    );
    assert_errors(
        &window_errors("{kind: session, gap: [1m]}"),
        &["transforms.w.window.gap: must be string (line 9, column 34)"],
    );
    assert_errors(
        &window_errors("tumbling"),
        &["transforms.w.window: must be a mapping with `kind` (one of: tumbling, hopping, session) (line 9, column 13)"],
    );
    // a right window still gets its values checked
    assert_errors(
        &window_errors("{kind: session, gap: 1 fortnight}"),
        &["transforms.w.window.gap: \"1 fortnight\" is not a duration"],
    );
}

#[test]
fn simulator_field_errors_name_the_kind_of_field() {
    let text = r#"sources:
  sim:
    type: simulator
    count: 1
    fields:
      a: {kind: normal, mean: 1, sdtdev: 2}
      b: {kind: gaussian, mean: 1}
      c: {mean: 1}
      d: {kind: integer, min: 1, max: 2.5}
      e: 5
      f: {kind: normal, mean: "${DEVICES}", stddev: 1}
sinks:
  o:
    type: console
    inputs: [sim]
"#;
    assert_errors(
        &errors(text),
        &[
            "sources.sim.fields.a: a normal field needs `stddev` (line 6, column 10)",
            "sources.sim.fields.a.sdtdev: unknown field `sdtdev` in a normal field (did you mean `stddev`?) \
             (known fields: kind, mean, stddev, device_spread, decimals) (line 6, column 34)",
            "sources.sim.fields.b.kind: unknown field kind `gaussian` (one of: normal, uniform, integer, choice, \
             geopoint) (line 7, column 17)",
            "sources.sim.fields.c: a field needs `kind` (one of: normal, uniform, integer, choice, geopoint) \
             (line 8, column 10)",
            "sources.sim.fields.d.max: must be integer (line 9, column 39)",
            "sources.sim.fields.e: must be a mapping with `kind` (one of: normal, uniform, integer, choice, \
             geopoint) (line 10, column 10)",
        ],
    );
}

/// The errors of a pipeline with one Event Hubs source with these extra lines.
fn eventhubs_errors(lines: &str) -> Vec<String> {
    errors(&format!(
        "sources:\n  hub:\n    type: eventhubs\n    namespace: ns.servicebus.windows.net\n    event_hub: h\n{lines}\
         sinks:\n  o:\n    type: console\n    inputs: [hub]\n"
    ))
}

#[test]
fn credential_errors_name_the_kind_of_credential() {
    let errs = eventhubs_errors("    credential: {kind: client_secret, tenant_id: t, clientid: c}\n");
    assert_errors(
        &errs,
        &[
            "sources.hub.credential: a `client_secret` credential needs `client_id` (line 6, column 17)",
            "sources.hub.credential: a `client_secret` credential needs `client_secret` (line 6, column 17)",
            "sources.hub.credential.clientid: unknown field `clientid` in a `client_secret` credential \
             (did you mean `client_id`?) (known fields: kind, tenant_id, client_id, client_secret) (line 6, column 53)",
        ],
    );
    assert_errors(
        &eventhubs_errors("    credential: {kind: azure-cli}\n"),
        &["sources.hub.credential.kind: unknown credential kind `azure-cli` (did you mean `azure_cli`?) \
           (one of: managed_identity, workload_identity, client_secret, azure_cli) (line 6, column 24)"],
    );
    assert_errors(
        &eventhubs_errors("    credential: {client_id: c}\n"),
        &["sources.hub.credential: a credential needs `kind` (one of: managed_identity, workload_identity, \
           client_secret, azure_cli) (line 6, column 17)"],
    );
    assert_errors(
        &eventhubs_errors("    credential: {kind: azure_cli, tenant_id: [t]}\n"),
        &["sources.hub.credential.tenant_id: must be nothing or string (line 6, column 46)"],
    );
    assert_errors(
        &eventhubs_errors("    credential: managed_identity\n"),
        &["sources.hub.credential: must be a mapping with `kind` (one of: managed_identity, workload_identity, \
           client_secret, azure_cli) (line 6, column 17)"],
    );
}

#[test]
fn start_position_errors_say_what_a_start_may_be() {
    assert_errors(
        &eventhubs_errors("    start: earlist\n"),
        &["sources.hub.start: must be one of \"earliest\", \"latest\" (did you mean `earliest`?), or a mapping \
           with `enqueued_time` or `sequence_number` (line 6, column 12)"],
    );
    assert_errors(
        &eventhubs_errors("    start: {enqueud_time: \"2026-01-01T00:00:00Z\"}\n"),
        &["sources.hub.start.enqueud_time: unknown field `enqueud_time` (did you mean `enqueued_time`?) \
           (known fields: enqueued_time, sequence_number) (line 6, column 13)"],
    );
    assert_errors(
        &eventhubs_errors("    start: {sequence_number: x}\n"),
        &["sources.hub.start.sequence_number: must be integer (line 6, column 30)"],
    );
    assert_errors(
        &eventhubs_errors("    start: {sequence_number: 1, enqueued_time: \"2026-01-01T00:00:00Z\"}\n"),
        &["sources.hub.start: has both `enqueued_time` and `sequence_number`: give only one (line 6, column 12)"],
    );
    assert_errors(
        &eventhubs_errors("    start: {}\n"),
        &["sources.hub.start: needs one of `enqueued_time` or `sequence_number` (line 6, column 12)"],
    );
    assert_errors(
        &eventhubs_errors("    start: 5\n"),
        &["sources.hub.start: must be \"earliest\", \"latest\" or a mapping with `enqueued_time` or \
           `sequence_number` (line 6, column 12)"],
    );
    // a number from the environment inside a variant is converted like anywhere else
    let text =
        "sources:\n  hub:\n    type: eventhubs\n    namespace: ns.servicebus.windows.net\n    event_hub: h\n    \
                credential: {kind: managed_identity}\n    start: {sequence_number: \"${DEVICES}\"}\n\
                sinks:\n  o:\n    type: console\n    inputs: [hub]\n";
    load(text).unwrap();
}

/// The errors of a pipeline with one central sink with these extra lines.
fn central_errors(lines: &str) -> Vec<String> {
    errors(&format!(
        "sources:\n  sim:\n    type: simulator\n    count: 1\nsinks:\n  c:\n    type: central\n    inputs: [sim]\n    \
         id_scope: x\n    group_key: ${{KEY}}\n{lines}"
    ))
}

#[test]
fn transport_and_measurements_errors() {
    assert_errors(
        &central_errors("    transport: mqq\n"),
        &["sinks.c.transport: must be one of \"https_batch\", \"https\", \"mqtt\" (did you mean `mqtt`?) (line 11, column 16)"],
    );
    assert_errors(
        &central_errors("    transport: 1\n"),
        &["sinks.c.transport: must be \"https_batch\", \"https\" or \"mqtt\" (line 11, column 16)"],
    );
    assert_errors(
        &central_errors("    measurements: 5\n"),
        &["sinks.c.measurements: must be array or object (line 11, column 19)"],
    );
    assert_errors(
        &central_errors("    measurements: {t: 1}\n"),
        &["sinks.c.measurements.t: must be string (line 11, column 23)"],
    );
    assert_errors(
        &central_errors("    measurements: [t, [h]]\n"),
        &["sinks.c.measurements[1]: must be string (line 11, column 23)"],
    );
}

#[test]
fn optional_values_are_checked_as_their_type() {
    let text = r#"sources:
  q:
    type: amqp
    url: amqp://localhost
    queue: x
    declare: {durable: 1, bindngs: []}
  h:
    type: webhook
    token: ${KEY}
    tls: {cert_file: c.pem}
  e:
    type: eventhubs
    connection_string: 5
sinks:
  o:
    type: console
    inputs: [q, h, e]
"#;
    assert_errors(
        &errors(text),
        &[
            "sources.q.declare.durable: must be boolean (line 6, column 24)",
            "sources.q.declare.bindngs: unknown field `bindngs` (did you mean `bindings`?) (known fields: durable, \
             bindings, dead_letter_exchange) (line 6, column 27)",
            "sources.h.tls: missing required field `key_file` (line 10, column 10)",
            "sources.e.connection_string: must be string or nothing (line 13, column 24)",
        ],
    );
}

/// A union that no rule explains is reported by the branch with the fewest errors, and an error
/// that is not about a union as it is.
#[test]
fn unions_without_a_tag_fall_back_to_the_closest_branch() {
    let schema = serde_json::json!({
        "type": "object",
        "properties": {"x": {"anyOf": [
            {"type": "string", "minLength": 3, "maxLength": 1},
            {"type": "string", "minLength": 3},
        ]}},
    });
    let v = jsonschema::options().with_draft(jsonschema::Draft::Draft7).build(&schema).unwrap();
    let value = serde_json::json!({"x": "ab"});
    let mut out = Vec::new();
    for e in v.iter_errors(&value) {
        super::variants::explain(&schema, &e, None, &mut out);
    }
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].path, "/x");
    assert!(out[0].message.contains("shorter than 3"), "{}", out[0].message);
}

#[test]
fn parquet_typed_columns_are_checked_where_they_are_written() {
    let with = |columns: &str| {
        errors(&format!(
            "sources:\n  sim:\n    type: simulator\n    count: 1\nsinks:\n  lake:\n    type: parquet\n    inputs: [sim]\n    url: ./out\n    metadata_columns: true\n    columns:\n{columns}"
        ))
    };
    assert_errors(
        &with("      temperature: double\n      telemetry.temperature: {type: long, name: temperature}\n"),
        // the map is kept in path order: `telemetry.temperature` comes first
        &["sinks.lake.columns.temperature: column `temperature` is also the column of `telemetry.temperature`; \
           give one another `name` (line 12, column 20)"],
    );
    assert_errors(
        &with("      deviceId: string\n      x: {type: double, name: _offset}\n"),
        &[
            "sinks.lake.columns.deviceId: column `deviceId` is already a column of the layout; give it another \
             `name` (line 12, column 17)",
            "sinks.lake.columns.x: column `_offset` is already a column of the layout; give it another `name` \
             (line 13, column 10)",
        ],
    );
    let e = with("      temperature: float\n");
    assert_eq!(e.len(), 1, "{e:#?}");
    assert!(e[0].starts_with("sinks.lake.columns.temperature") && e[0].contains("(line 12, column"), "{e:#?}");
    assert!(e[0].contains(r#"must be one of "double", "long""#), "{e:#?}");
}

#[test]
fn delta_partition_columns_are_checked_where_they_are_written() {
    let yaml = |lines: &str| {
        format!(
            "sources:\n  sim:\n    type: simulator\n    count: 1\nsinks:\n  lake:\n    type: delta\n    inputs: [sim]\n    url: ./out/t\n{lines}"
        )
    };
    let with = |lines: &str| errors(&yaml(lines));
    let valid = |lines: &str| load(&yaml(lines)).map(|_| ()).map_err(|e| format!("{e:?}"));
    valid("    partition_by: [date, hour]\n").unwrap();
    // in the rows layout any column may come: checked when the first rows arrive
    valid("    layout: rows\n    partition_by: [site]\n").unwrap();
    assert_errors(
        &with("    layout: export\n    partition_by: [date, site, date]\n    columns: {temperature: double}\n"),
        &[
            "sinks.lake.partition_by[1]: `site` is not `date`, `hour`, a column of the export layout or a typed \
             column (line 11, column 26)",
            "sinks.lake.partition_by[2]: `date` is named twice (line 11, column 32)",
        ],
    );
    valid("    layout: export\n    partition_by: [deviceId, site]\n    columns: {enrichments.site: {type: string, name: site}}\n")
        .unwrap();
    assert_errors(&with("    app_id: ' '\n"), &["sinks.lake.app_id: must not be empty (line 10, column 13)"]);
    valid("    row_group_size: 1000\n").unwrap();
    assert_errors(
        &with("    row_group_size: 0\n"),
        &["sinks.lake.row_group_size: must be at least 1 (line 10, column 21)"],
    );
}
