//! The source's YAML configuration ([`FilesConfig`]: where, framing, layout, time range) and
//! its [`Spec`]: the checks `centralflow check` runs on it.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::values::Timestamp;
use crate::config::{Checker, Spec};

/// Replay of archived export files.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FilesConfig {
    /// A file, a folder, or an object-store URL: `file://`, `s3://bucket/prefix`,
    /// `az://container/prefix`, `gs://bucket/prefix`.
    pub url: String,
    /// Record framing: `auto` (a file whose first line is not a complete JSON value but starts
    /// with `[` is one JSON array; otherwise JSON lines), `jsonl` or `json_array`.
    #[serde(default)]
    pub format: Format,
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

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Format {
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
    }
    fn ports(&self) -> Vec<crate::runtime::Port> {
        crate::runtime::SOURCE_PORTS.to_vec()
    }
}
