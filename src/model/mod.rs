//! The IoT Central continuous data export model (`schema: "default@v1"`).
//!
//! Six kinds of message share one envelope (`applicationId`, `messageSource`, `messageType`,
//! `deviceId`, `schema`, `templateId`, `enqueuedTime`, `enrichments`) and differ in their payload:
//! `telemetry` (an object of any JSON values), `properties` (an array of `{name, value, component?,
//! module?}`), `actor`/`resource`/`updated` for audit logs, nothing for connectivity and lifecycle.
//! [`decode`] turns JSON text into an [`Event`](crate::event::Event) without losing any field.
//!
//! Records of any other JSON shape (IoT Central's transformed exports) are decoded by
//! [`generic`]; [`format`] picks one or the other by a source's `format:`.

pub mod decode;
pub mod format;
pub mod generic;
pub mod limits;
mod scan;

pub use crate::event::MessageSource;

/// Envelope field names, in the export's spelling, as they appear as columns in raw Parquet.
pub const ENVELOPE_STRING_FIELDS: [&str; 8] =
    ["applicationId", "messageSource", "messageType", "deviceId", "schema", "templateId", "module", "component"];

/// IoT Central's limit for one device-to-cloud message, which we also apply to input records.
pub const MAX_RECORD_BYTES: usize = 256 * 1024;
