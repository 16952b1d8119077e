//! The options every source shares for what its messages are: `format` (`export`, `json` or
//! `auto`), and for records that are not export messages, `time` (the field holding the event
//! time) and `device_id` (the field holding the device). Each source's configuration has the
//! three fields (serde cannot flatten them into a struct that refuses unknown fields; the paths
//! are boxed, so that every source's configuration stays small); these
//! functions check them and build the [`MessageDecoder`] from them.

use crate::config::values::Path;
use crate::config::Checker;
use crate::model::format::{MessageDecoder, MessageFormat};
use crate::model::generic::GenericOptions;

/// Checks `format`, `time` and `device_id` of the source at `ptr`.
pub fn check(ptr: &str, cx: &mut Checker<'_>, format: MessageFormat, time: Option<&Path>, device_id: Option<&Path>) {
    for (name, path) in [("time", time), ("device_id", device_id)] {
        let Some(p) = path else { continue };
        let at = format!("{ptr}/{name}");
        if cx.valid(&at, p).is_some() && format == MessageFormat::Export {
            cx.error(&at, "applies to records that are not export messages: set `format: json` or `auto`");
        }
    }
}

/// The decoder for these options (checked by [`check`]).
pub fn decoder(format: MessageFormat, time: Option<&Path>, device_id: Option<&Path>) -> anyhow::Result<MessageDecoder> {
    Ok(MessageDecoder {
        format,
        generic: GenericOptions {
            time: time.map(Path::get).transpose()?,
            device_id: device_id.map(Path::get).transpose()?,
        },
    })
}

/// The device a transport names: the `iotcentral-device-id` property (IoT Central sets it on
/// messages to Event Hubs, Service Bus and AMQP), among a message's metadata.
pub fn transport_device(attrs: &[(crate::event::AttrKey, String)]) -> Option<&str> {
    attrs.iter().find(|(k, _)| &**k == "iotcentral-device-id").map(|(_, v)| v.as_str())
}

/// A source's checkpointed state as postcard wrote it, or as the version before wrote it (`Old`,
/// brought up to date by `upgrade`): postcard is not self-describing, so older bytes lack a
/// field added at the end and are read in the older shape. The error is the current shape's.
pub fn decode_state<New: serde::de::DeserializeOwned, Old: serde::de::DeserializeOwned>(
    bytes: &[u8],
    upgrade: impl FnOnce(Old) -> New,
) -> Result<New, postcard::Error> {
    postcard::from_bytes(bytes).or_else(|e| postcard::from_bytes::<Old>(bytes).map(upgrade).map_err(|_| e))
}
