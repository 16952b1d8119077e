//! The source's YAML configuration ([`FilesConfig`]: where, what the records are, framing,
//! layout, time range, following) and its [`Spec`]: the checks `centralflow check` runs on it.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::values::{Dur, Path, Timestamp};
use crate::config::{Checker, Spec};
use crate::model::format::MessageFormat;

/// Archived export files, or (`follow`) a blob export as it lands.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FilesConfig {
    /// A file, a folder, or an object-store URL: `file://`, `s3://bucket/prefix`,
    /// `az://container/prefix`, `gs://bucket/prefix`.
    pub url: String,
    /// What the records are: `export` (IoT Central's export messages, the default), `json`
    /// (objects of any shape, e.g. a transformed export) or `auto` (export messages when they
    /// have `messageSource`).
    #[serde(default)]
    pub format: MessageFormat,
    /// `json`/`auto`: the field holding a record's time (RFC 3339 or epoch milliseconds).
    #[serde(default)]
    pub time: Option<Box<Path>>,
    /// `json`/`auto`: the field holding a record's device id (it becomes `deviceId`).
    #[serde(default)]
    pub device_id: Option<Box<Path>>,
    /// Record framing: `auto` (a file whose first line is not a complete JSON value but starts
    /// with `[` is one JSON array; otherwise JSON lines), `jsonl` or `json_array`.
    #[serde(default)]
    pub framing: Framing,
    /// Keep reading the blob export's new files as they land (`run`; `replay` reads the files
    /// there are and stops). Needs IoT Central's layout.
    #[serde(default)]
    pub follow: bool,
    /// `follow`: how often to look for new files.
    #[serde(default = "d_poll")]
    pub poll_interval: Dur,
    /// `follow`: how far before the newest file read of a partition folder to look again for
    /// files that land late in older minute folders.
    #[serde(default = "d_lookback")]
    pub lookback: Dur,
    /// Folder layout: `auto` (recognises IoT Central's blob export layout), `iotcentral` or `plain`.
    #[serde(default)]
    pub layout: Layout,
    /// Only messages enqueued at or after this time (RFC 3339).
    #[serde(default)]
    pub from: Option<Timestamp>,
    /// Only messages enqueued before this time (RFC 3339).
    #[serde(default)]
    pub to: Option<Timestamp>,
    /// Only files whose name ends with one of these (e.g. `[.json, .json.gz]`). Default: every
    /// file except those whose name starts with `.` or `_`.
    #[serde(default)]
    pub extensions: Vec<String>,
    /// Object-store options (lower-case keys of the cloud's environment variables).
    #[serde(default)]
    pub storage: BTreeMap<String, String>,
    /// Events per batch (approximate).
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Read local, uncompressed JSON-lines files through memory maps (default), so that their
    /// text is not copied. A file truncated while it is read then stops the process (SIGBUS);
    /// set `false` for files that another program may truncate or rewrite in place.
    #[serde(default = "default_true")]
    pub mmap: bool,
}

fn default_batch() -> usize {
    2048
}

fn default_true() -> bool {
    true
}

fn d_poll() -> Dur {
    Dur::new("10s")
}

fn d_lookback() -> Dur {
    Dur::new("10m")
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Framing {
    #[default]
    Auto,
    Jsonl,
    JsonArray,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    #[default]
    Auto,
    Iotcentral,
    Plain,
}

impl Spec for FilesConfig {
    fn check(&self, ptr: &str, cx: &mut Checker<'_>) {
        cx.url(&format!("{ptr}/url"), &self.url);
        let from = self.from.as_ref().and_then(|f| cx.timestamp(&format!("{ptr}/from"), f));
        let to = self.to.as_ref().and_then(|t| cx.timestamp(&format!("{ptr}/to"), t));
        if let (Some(f), Some(t)) = (from, to) {
            if f >= t {
                cx.error(&format!("{ptr}/to"), "must be later than `from`");
            }
        }
        if self.batch_size == 0 {
            cx.error(&format!("{ptr}/batch_size"), "must be at least 1");
        }
        cx.storage_options(&format!("{ptr}/storage"), &self.storage);
        crate::sources::message::check(ptr, cx, self.format, self.time.as_deref(), self.device_id.as_deref());
        cx.positive_duration(&format!("{ptr}/poll_interval"), &self.poll_interval);
        cx.duration(&format!("{ptr}/lookback"), &self.lookback);
        if self.follow && self.layout == Layout::Plain {
            cx.error(&format!("{ptr}/layout"), "`follow` needs IoT Central's blob export layout");
        }
    }
    fn ports(&self) -> Vec<crate::runtime::Port> {
        crate::runtime::SOURCE_PORTS.to_vec()
    }
}
