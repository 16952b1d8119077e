//! Every way a source decodes a record (`export`, `json`, `auto`), on arbitrary bytes (run with
//! `-dict=dict/export.dict`: the export's field names and values): no panic, bounded output,
//! and every event it gives reads back and writes as JSON.
#![no_main]

use bytes::Bytes;
use centralflow::model::format::{MessageDecoder, MessageFormat};
use centralflow::model::generic::Transport;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for format in [MessageFormat::Export, MessageFormat::Json, MessageFormat::Auto] {
        let d = MessageDecoder { format, ..Default::default() };
        let out = d.decode(Bytes::copy_from_slice(data), None, &Transport::NONE);
        // one result per message, and at most limits::MAX_ELEMENT_ERRORS + 1 errors
        let errors = out.iter().filter(|r| r.is_err()).count();
        assert!(errors <= centralflow::model::limits::MAX_ELEMENT_ERRORS + 1, "{errors} errors");
        assert!(out.len() <= centralflow::model::limits::MAX_ARRAY_ELEMENTS + 1);
        for ev in out.into_iter().flatten() {
            let json = ev.to_json();
            serde_json::from_str::<serde_json::Value>(&json).expect("an event writes valid JSON");
            for path in ["deviceId", "telemetry", "temperature", "enqueuedTime", "properties", "x.y"] {
                let _ = ev.get_str(path);
            }
        }
    }
});
