//! IoT Central's `messageSource`: which of the export's kinds of message an event is.

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
