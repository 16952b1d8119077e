//! What a source's messages are (`format:`): IoT Central export messages (`export`, the
//! decoder of [`super::decode`]), records of any JSON shape (`json`, [`super::generic`]), or
//! either, told apart by the `messageSource` key (`auto`). Every source decodes through a
//! [`MessageDecoder`], so that all of them accept the same shapes the same way.

use std::sync::Arc;

use bytes::Bytes;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::decode::{decode_object_projected, decode_record_each, Projection, NO_MESSAGE_SOURCE};
use super::generic::{array_elements, decode_generic_with, mentions_message_source, GenericOptions, Transport};
use crate::event::Event;

/// The messages a source accepts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MessageFormat {
    /// IoT Central's export messages (`default@v1`); anything else is a dead letter.
    #[default]
    Export,
    /// Any JSON object (or array of objects); fields are paths into it.
    Json,
    /// Export messages when they have `messageSource`, records of any shape otherwise.
    Auto,
}

/// Decodes what a source receives, by its `format:`.
#[derive(Debug, Clone, Default)]
pub struct MessageDecoder {
    pub format: MessageFormat,
    /// For records that are not export messages.
    pub generic: GenericOptions,
}

impl MessageDecoder {
    /// Decodes one record (a message, or a JSON array of them), handing each event, or the
    /// reason an element cannot be one, to `out`. Export messages keep only the fields of
    /// `proj` (when given); other records keep all.
    #[inline]
    pub fn decode_each(
        &self,
        raw: Bytes,
        proj: Option<&Arc<Projection>>,
        transport: &Transport<'_>,
        mut out: impl FnMut(Result<Event, String>),
    ) {
        match self.format {
            MessageFormat::Export => decode_record_each(raw, proj, out),
            MessageFormat::Json => decode_generic_with(raw, &self.generic, transport, out),
            // too large: the export decoder words the reason
            MessageFormat::Auto if raw.len() > super::MAX_RECORD_BYTES => decode_record_each(raw, proj, out),
            MessageFormat::Auto => {
                let text = match std::str::from_utf8(&raw) {
                    Ok(t) => t,
                    Err(e) => return out(Err(format!("invalid UTF-8 at byte {}", e.valid_up_to()))),
                };
                if !text.trim_start().starts_with('[') {
                    return self.auto_one(raw, proj, transport, &mut out);
                }
                // an array: each element is told apart on its own
                let elems = match array_elements(&raw, text) {
                    Ok(v) => v,
                    Err(reason) => return out(Err(reason)),
                };
                let mut errors = super::limits::ElementErrors::default();
                for (i, sub) in elems.into_iter().enumerate() {
                    self.auto_one(sub, proj, transport, &mut |r: Result<Event, String>| errors.pass(i, r, &mut out));
                }
                errors.finish(&mut out);
            }
        }
    }

    /// Decodes into a vector (pipeline tests, the webhook).
    pub fn decode(
        &self,
        raw: Bytes,
        proj: Option<&Arc<Projection>>,
        transport: &Transport<'_>,
    ) -> Vec<Result<Event, String>> {
        let mut out = Vec::with_capacity(1);
        self.decode_each(raw, proj, transport, |r| out.push(r));
        out
    }

    /// `auto` for one object: an export message when it has `messageSource`, else generic.
    fn auto_one(
        &self,
        raw: Bytes,
        proj: Option<&Arc<Projection>>,
        transport: &Transport<'_>,
        out: &mut impl FnMut(Result<Event, String>),
    ) {
        if mentions_message_source(&raw) {
            match decode_object_projected(raw.clone(), proj) {
                // `messageSource` was only nested: a record of another shape
                Err(e) if e == NO_MESSAGE_SOURCE => {}
                // `messageSource` but not the export layout: a JQ transformation that kept it
                // (IoT Central's `.` passes its transform input through, whose telemetry is an
                // array), when it decodes as a record of any shape; else the export reason
                Err(e) => {
                    let mut generic = Vec::with_capacity(1);
                    decode_generic_with(raw, &self.generic, transport, |r| generic.push(r));
                    return match generic.iter().position(Result::is_err) {
                        None => generic.into_iter().for_each(&mut *out),
                        Some(i) => {
                            let other = generic.swap_remove(i).unwrap_err();
                            out(Err(format!("{e} (and as a record of any shape: {other})")))
                        }
                    };
                }
                r => return out(r),
            }
        }
        decode_generic_with(raw, &self.generic, transport, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::FieldPath;

    fn decoder(format: MessageFormat) -> MessageDecoder {
        MessageDecoder {
            format,
            generic: GenericOptions { time: Some(FieldPath::parse("Timestamp").unwrap()), device_id: None },
        }
    }

    fn kinds(format: MessageFormat, body: &str) -> Vec<Result<&'static str, String>> {
        decoder(format)
            .decode(Bytes::from(body.to_string()), None, &Transport::NONE)
            .into_iter()
            .map(|r| {
                r.map(|e| match e.kind {
                    crate::event::Kind::Export(_) => "export",
                    _ => "row",
                })
            })
            .collect()
    }

    const EXPORT: &str =
        r#"{"messageSource":"telemetry","deviceId":"d1","enqueuedTime":"2026-11-01T00:00:00Z","telemetry":{"t":1}}"#;
    const ROW: &str = r#"{"deviceId":"d1","Timestamp":"2026-11-01T00:00:00Z","T1":3.5}"#;

    #[test]
    fn each_format_takes_its_messages() {
        assert_eq!(kinds(MessageFormat::Export, EXPORT), [Ok("export")]);
        assert_eq!(kinds(MessageFormat::Export, ROW), [Err(NO_MESSAGE_SOURCE.to_string())]);
        assert_eq!(kinds(MessageFormat::Json, ROW), [Ok("row")]);
        assert!(kinds(MessageFormat::Json, EXPORT)[0].as_ref().unwrap_err().contains("no usable time"));
        assert_eq!(kinds(MessageFormat::Auto, EXPORT), [Ok("export")]);
        assert_eq!(kinds(MessageFormat::Auto, ROW), [Ok("row")]);
        let mixed = format!("[{EXPORT},{ROW},7]");
        let got = kinds(MessageFormat::Auto, &mixed);
        assert_eq!(got[..2], [Ok("export"), Ok("row")]);
        assert!(got[2].as_ref().unwrap_err().starts_with("array element 2: not a JSON object"), "{got:?}");
        // a nested messageSource does not make an export message
        let nested = r#"{"Timestamp":"2026-11-01T00:00:00Z","original":{"messageSource":"telemetry"}}"#;
        assert_eq!(kinds(MessageFormat::Auto, nested), [Ok("row")]);
        // a broken export message keeps the export decoder's reason
        let bad = r#"{"messageSource":"telemetry","enqueuedTime":"soon"}"#;
        assert!(kinds(MessageFormat::Auto, bad)[0].as_ref().unwrap_err().contains("enqueuedTime"));
        // transformed, keeping messageSource: IoT Central's `.` (its transform input, telemetry
        // an array) and a program's own shape; records of any shape, with their time
        let passed = r#"{"messageSource":"telemetry","Timestamp":"2026-11-01T00:00:05Z","enqueuedTime":"2026-11-01T00:00:05Z","telemetry":[{"name":"t1","value":3.5}],"device":{"id":"d1"}}"#;
        let own = r#"{"messageSource":"telemetry","Timestamp":"2026-11-01T00:00:00Z","T1":1}"#;
        for body in [passed, own] {
            let got = decoder(MessageFormat::Auto).decode(Bytes::from(body), None, &Transport::NONE);
            let ev = got[0].as_ref().unwrap_or_else(|e| panic!("{body}: {e}"));
            assert!(matches!(ev.kind, crate::event::Kind::Row), "{body}");
            assert_eq!(
                ev.time,
                crate::time::parse_rfc3339(&body[body.find("Timestamp").unwrap() + 12..][..20]).unwrap()
            );
        }
        // neither: both reasons
        let neither = r#"{"messageSource":"telemetry","telemetry":[1]}"#;
        let e = kinds(MessageFormat::Auto, neither)[0].clone().unwrap_err();
        assert!(e.contains("telemetry: invalid type") && e.contains("as a record of any shape: no usable time"), "{e}");
    }
}
