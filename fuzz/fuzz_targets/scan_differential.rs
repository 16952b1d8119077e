//! The decoder's fast path (the hand-written scanner) against its serde_json path on arbitrary
//! bytes, with and without a projection: the same events and errors (the scanner gives up on
//! anything it does not decode exactly as serde_json would). And neither accepts a record that
//! `serde_json::from_slice::<Value>` refuses.
#![no_main]

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use centralflow::model::decode::{decode_record_projected, set_fast_path, Projection};
use libfuzzer_sys::fuzz_target;

fn projections() -> &'static [Option<Arc<Projection>>; 3] {
    static P: OnceLock<[Option<Arc<Projection>>; 3]> = OnceLock::new();
    P.get_or_init(|| {
        let p = |top: &[&str], tele: Option<&[&str]>| {
            Some(Arc::new(Projection::new(
                top.iter().map(|s| s.to_string()).collect(),
                tele.map(|t| t.iter().map(|s| s.to_string()).collect()),
            )))
        };
        [
            None,
            p(&["deviceId", "telemetry"], Some(&["temperature", "humidity"])),
            p(&["telemetry", "properties", "x"], None),
        ]
    })
}

fn decode(fast: bool, data: &[u8], p: Option<&Arc<Projection>>) -> Vec<Result<String, String>> {
    set_fast_path(fast);
    let mut out = Vec::new();
    decode_record_projected(Bytes::copy_from_slice(data), p, &mut out);
    set_fast_path(true);
    out.into_iter().map(|r| r.map(|ev| format!("{ev:?}\n{}", ev.to_json()))).collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, data)) = data.split_first() else { return };
    let p = projections()[which as usize % 3].as_ref();
    let fast = decode(true, data, p);
    let slow = decode(false, data, p);
    assert_eq!(fast, slow, "fast path and serde_json path differ on {:?}", String::from_utf8_lossy(data));
    if fast.iter().any(Result::is_ok) {
        // whatever decoded, serde_json takes as a value too
        if let Err(e) = serde_json::from_slice::<serde_json::Value>(data) {
            panic!("decoded what serde_json refuses ({e}): {:?}", String::from_utf8_lossy(data));
        }
    }
});
