//! The IoT Central continuous data export model (`schema: "default@v1"`).
//!
//! Six kinds of message share one envelope (`applicationId`, `messageSource`, `messageType`,
//! `deviceId`, `schema`, `templateId`, `enqueuedTime`, `enrichments`) and differ in their payload:
//! `telemetry` (an object of any JSON values), `properties` (an array of `{name, value, component?,
//! module?}`), `actor`/`resource`/`updated` for audit logs, nothing for connectivity and lifecycle.
//! [`decode`] turns JSON text into an [`Event`](crate::event::Event) without losing any field.

pub mod decode;
mod scan;

/// IoT Central's `messageSource`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum MessageSource {
    #[default]
    Telemetry,
    Properties,
    DeviceConnectivity,
    DeviceLifecycle,
    DeviceTemplateLifecycle,
    Audit,
    /// A value this version does not know; the message is kept as is.
    Other,
}

impl MessageSource {
    /// All known kinds.
    pub const ALL: [MessageSource; 6] = [
        MessageSource::Telemetry,
        MessageSource::Properties,
        MessageSource::DeviceConnectivity,
        MessageSource::DeviceLifecycle,
        MessageSource::DeviceTemplateLifecycle,
        MessageSource::Audit,
    ];

    /// The export's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageSource::Telemetry => "telemetry",
            MessageSource::Properties => "properties",
            MessageSource::DeviceConnectivity => "deviceConnectivity",
            MessageSource::DeviceLifecycle => "deviceLifecycle",
            MessageSource::DeviceTemplateLifecycle => "deviceTemplateLifecycle",
            MessageSource::Audit => "audit",
            MessageSource::Other => "other",
        }
    }

    /// Parses the export's spelling; unknown values are `Other`.
    pub fn parse(s: &str) -> MessageSource {
        match s {
            "telemetry" => MessageSource::Telemetry,
            "properties" => MessageSource::Properties,
            "deviceConnectivity" => MessageSource::DeviceConnectivity,
            "deviceLifecycle" => MessageSource::DeviceLifecycle,
            "deviceTemplateLifecycle" => MessageSource::DeviceTemplateLifecycle,
            "audit" => MessageSource::Audit,
            _ => MessageSource::Other,
        }
    }
}

/// Envelope field names, in the export's spelling, as they appear as columns in raw Parquet.
pub const ENVELOPE_STRING_FIELDS: [&str; 8] =
    ["applicationId", "messageSource", "messageType", "deviceId", "schema", "templateId", "module", "component"];

/// IoT Central's limit for one device-to-cloud message, which we also apply to input records.
pub const MAX_RECORD_BYTES: usize = 256 * 1024;
