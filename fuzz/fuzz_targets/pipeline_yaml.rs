//! Pipeline YAML through validation (`centralflow validate`): errors, never a panic or a hang,
//! whatever the text (YAML bombs, deep nesting, anchors, tags, odd scalars).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let env = |k: &str| (k == "SECRET").then(|| "a-secret-value".to_string());
    let _ = centralflow::config::load_str(text, "fuzz", &env);
});
