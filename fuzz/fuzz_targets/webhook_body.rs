//! The webhook's body handling: what a request body becomes (an export message, a device-bridge
//! request turned into one, a record of any shape) and its decoding, in each `format`.
#![no_main]

use bytes::Bytes;
use centralflow::model::format::{MessageDecoder, MessageFormat};
use centralflow::model::generic::Transport;
use centralflow::sources::webhook::{record_of, WebhookFormat};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let body = Bytes::copy_from_slice(data);
    for format in [WebhookFormat::Auto, WebhookFormat::Export, WebhookFormat::Bridge, WebhookFormat::Json] {
        let Ok(record) = record_of(format, &body, 1_793_491_200_000_000_000) else { continue };
        let decoder = MessageDecoder {
            format: match format {
                WebhookFormat::Export | WebhookFormat::Bridge => MessageFormat::Export,
                WebhookFormat::Json => MessageFormat::Json,
                WebhookFormat::Auto => MessageFormat::Auto,
            },
            ..Default::default()
        };
        for ev in decoder.decode(record, None, &Transport::NONE).into_iter().flatten() {
            let _ = ev.to_json();
        }
    }
});
