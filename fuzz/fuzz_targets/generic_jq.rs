//! Records of any JSON shape (`format: json`, transformed exports) and what the jq transform does
//! with them: decoded generically, then run through IoT Central-style jq programs with the
//! transform's runaway guard (a time limit and an output limit). No panic, no hang.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use centralflow::model::generic::{decode_generic, GenericOptions};
use centralflow::transforms::jq::program::{parse, Program};
use libfuzzer_sys::fuzz_target;

fn programs() -> &'static Vec<Program> {
    static P: OnceLock<Vec<Program>> = OnceLock::new();
    P.get_or_init(|| {
        [
            ".",
            "{deviceId, t: .telemetry.temperature}",
            ".telemetry | to_entries | map({name: .key, value: .value})",
            "[.. | numbers] | add",
            "paths | tostring",
            "select(.messageSource == \"telemetry\") | .enrichments + {x: 1}",
        ]
        .iter()
        .map(|p| Program::compile(p).expect("the program compiles"))
        .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    for ev in decode_generic(Bytes::copy_from_slice(data), &GenericOptions::default()).into_iter().flatten() {
        let json = ev.to_json();
        let Ok(input) = parse(&json) else { continue };
        for p in programs() {
            let _ = p.run(input.clone(), Duration::from_millis(200), 1000);
        }
    }
    // the raw text as jq input, as the jq transform parses its input
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(input) = parse(text) {
            for p in programs() {
                let _ = p.run(input.clone(), Duration::from_millis(200), 1000);
            }
        }
    }
});
