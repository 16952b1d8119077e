//! The source's YAML configuration ([`EventHubsConfig`], its credential and start position)
//! and its [`Spec`]: the checks `centralflow check` runs on it.

use std::collections::BTreeMap;
use std::time::Duration;

use azure_messaging_eventhubs::{StartLocation, StartPosition};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::values::{Dur, Path, Timestamp};
use crate::config::{Checker, Spec};
use crate::event::Nanos;
use crate::model::format::MessageFormat;
use crate::secret::Secret;

/// An Event Hub read with a consumer group.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EventHubsConfig {
    /// A SAS connection string (`Endpoint=sb://NS.servicebus.windows.net/;SharedAccessKeyName=..;
    /// SharedAccessKey=..[;EntityPath=HUB]`): a secret, from the environment. Or use `credential`.
    #[serde(default)]
    pub connection_string: Option<Secret>,
    /// Fully qualified namespace (`NS.servicebus.windows.net`). Required with `credential`; taken
    /// from the connection string otherwise.
    #[serde(default)]
    pub namespace: Option<String>,
    /// The Event Hub. Optional when the connection string names it (`EntityPath`).
    #[serde(default)]
    pub event_hub: Option<String>,
    /// The consumer group (one per pipeline: instances of the same pipeline share it).
    #[serde(default = "d_group")]
    pub consumer_group: String,
    /// A Microsoft Entra ID credential instead of a connection string.
    #[serde(default)]
    pub credential: Option<Credential>,
    /// What the events are: `export` (IoT Central's export messages, the default), `json`
    /// (objects of any shape, e.g. a transformed export) or `auto`.
    #[serde(default)]
    pub format: MessageFormat,
    /// `json`/`auto`: the field holding a record's time (RFC 3339 or epoch milliseconds); else
    /// the event's enqueued time.
    #[serde(default)]
    pub time: Option<Box<Path>>,
    /// `json`/`auto`: the field holding a record's device id; else the `iotcentral-device-id`
    /// property.
    #[serde(default)]
    pub device_id: Option<Box<Path>>,
    /// Where to start in a partition that has no checkpoint: `earliest` (default), `latest`,
    /// `{enqueued_time: RFC 3339}` or `{sequence_number: N}` (that event included).
    #[serde(default)]
    pub start: Start,
    /// Events the service may send ahead per partition (link credit).
    #[serde(default = "d_prefetch")]
    pub prefetch: u32,
    /// Ownership and checkpoints, shared by every instance: a folder, `az://container/prefix`,
    /// `s3://bucket/prefix` (Azure SDKs' blob layout). Without it, one instance reads every
    /// partition and keeps its positions in the pipeline's own checkpoint.
    #[serde(default)]
    pub checkpoint_store: Option<String>,
    /// Object-store options for `checkpoint_store` (lower-case keys of the cloud's variables).
    #[serde(default)]
    pub storage: BTreeMap<String, String>,
    /// How often ownership is renewed and partitions are shared out again.
    #[serde(default = "d_balance")]
    pub balance_interval: Dur,
    /// An ownership not renewed for this long is taken over (a crashed instance's partitions
    /// move after at most this long). At least twice `balance_interval`.
    #[serde(default = "d_expiry")]
    pub ownership_expiry: Dur,
    /// How long connecting, authorizing or opening a receiver may take before the attempt
    /// counts as failed and is made again: a peer that accepts and never answers must not stall
    /// a partition for good.
    #[serde(default = "d_connect_timeout")]
    pub connect_timeout: Dur,
    /// Events per batch sent downstream.
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    /// How long a partial batch may wait for more events.
    #[serde(default = "d_linger")]
    pub linger: Dur,
    /// A custom AMQP endpoint (`amqp://127.0.0.1:5672` for an emulator; `amqps://` for TLS).
    /// Empty: the namespace's own.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Set by `centralflow replay --from/--to` (enqueued-time range, ns): not part of the file.
    #[serde(skip)]
    #[schemars(skip)]
    pub replay_range: Option<(Option<Nanos>, Option<Nanos>)>,
}

/// A Microsoft Entra ID credential, by kind.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Credential {
    /// The machine's or app's managed identity (system-assigned, or user-assigned by client id).
    ManagedIdentity {
        #[serde(default)]
        client_id: Option<String>,
    },
    /// Kubernetes workload identity (`AZURE_CLIENT_ID`, `AZURE_TENANT_ID`,
    /// `AZURE_FEDERATED_TOKEN_FILE` unless given here).
    WorkloadIdentity {
        #[serde(default)]
        client_id: Option<String>,
        #[serde(default)]
        tenant_id: Option<String>,
    },
    /// A service principal with a client secret (a secret, from the environment).
    ClientSecret { tenant_id: String, client_id: String, client_secret: Secret },
    /// The signed-in Azure CLI account (development).
    AzureCli {
        #[serde(default)]
        tenant_id: Option<String>,
    },
}

/// Where to start reading a partition without a checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Start {
    #[default]
    Earliest,
    Latest,
    EnqueuedTime(Timestamp),
    SequenceNumber(i64),
}

fn d_group() -> String {
    "$Default".into()
}
fn d_prefetch() -> u32 {
    300
}
fn d_balance() -> Dur {
    Dur::new("10s")
}
fn d_expiry() -> Dur {
    Dur::new("60s")
}
fn d_connect_timeout() -> Dur {
    Dur::new("30s")
}
fn d_batch() -> usize {
    1000
}
fn d_linger() -> Dur {
    Dur::new("50ms")
}

impl EventHubsConfig {
    /// (namespace, hub) from the fields and the connection string.
    pub(super) fn names(&self) -> Result<(String, String), String> {
        let cs = match &self.connection_string {
            Some(s) if !s.is_empty() => Some(
                s.expose()
                    .parse::<azure_messaging_eventhubs::ConnectionString>()
                    .map_err(|e| format!("connection string: {}", crate::secret::redact(&e.to_string())))?,
            ),
            _ => None,
        };
        let namespace = match (&self.namespace, &cs) {
            (Some(n), _) if !n.trim().is_empty() => n.trim().to_string(),
            (_, Some(cs)) => cs.fully_qualified_namespace.clone(),
            _ => return Err("`namespace` is required with a credential".into()),
        };
        let hub = match (&self.event_hub, cs.as_ref().and_then(|c| c.entity_path.clone())) {
            (Some(h), Some(e)) if !h.is_empty() && *h != e => {
                return Err(format!("`event_hub` is {h:?} but the connection string names {e:?}"))
            }
            (Some(h), _) if !h.trim().is_empty() => h.trim().to_string(),
            (_, Some(e)) => e,
            _ => return Err("`event_hub` is required (the connection string has no EntityPath)".into()),
        };
        Ok((namespace, hub))
    }

    pub(super) fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref().map(str::trim).filter(|e| !e.is_empty())
    }

    pub(super) fn start_position(&self) -> StartPosition {
        let (location, inclusive) = match &self.start {
            Start::Earliest => (StartLocation::Earliest, false),
            Start::Latest => (StartLocation::Latest, false),
            Start::EnqueuedTime(t) => {
                // checked when the source was built (`EventHubsSource::new`)
                let ns = t.value().copied().unwrap_or_default();
                (StartLocation::EnqueuedTime(system_time(ns)), true)
            }
            Start::SequenceNumber(n) => (StartLocation::SequenceNumber(*n), true),
        };
        StartPosition { location, inclusive }
    }
}

pub(super) fn system_time(ns: Nanos) -> std::time::SystemTime {
    if ns >= 0 {
        std::time::UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        std::time::UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

impl Spec for EventHubsConfig {
    fn hands_over_partitions(&self) -> bool {
        true
    }
    fn replay_range(&mut self) -> Option<&mut Option<crate::config::ReplayRange>> {
        Some(&mut self.replay_range)
    }
    fn check(&self, ptr: &str, cx: &mut Checker<'_>) {
        crate::sources::message::check(ptr, cx, self.format, self.time.as_deref(), self.device_id.as_deref());
        let cs_given = self.connection_string.as_ref().is_some_and(|s| !s.is_empty());
        cx.secret(&format!("{ptr}/connection_string"), cs_given);
        match (cs_given, &self.credential) {
            (true, Some(_)) => {
                cx.error(&format!("{ptr}/credential"), "give a connection string or a credential, not both")
            }
            (false, None) => cx.error(ptr, "needs `connection_string` or `credential`"),
            _ => {}
        }
        if let Err(e) = self.names() {
            let at = if e.starts_with("connection string") {
                "connection_string"
            } else if e.contains("namespace") {
                "namespace"
            } else {
                "event_hub"
            };
            cx.error(&format!("{ptr}/{at}"), e);
        }
        if let Some(n) = &self.namespace {
            if n.contains("://") || n.contains('/') {
                cx.error(
                    &format!("{ptr}/namespace"),
                    "is the fully qualified host name (NS.servicebus.windows.net), not a URL",
                );
            }
        }
        if let Some(Credential::ClientSecret { client_secret, tenant_id, client_id }) = &self.credential {
            cx.secret(&format!("{ptr}/credential/client_secret"), !client_secret.is_empty());
            if tenant_id.trim().is_empty() {
                cx.error(&format!("{ptr}/credential/tenant_id"), "is empty");
            }
            if client_id.trim().is_empty() {
                cx.error(&format!("{ptr}/credential/client_id"), "is empty");
            }
        }
        if self.consumer_group.trim().is_empty() {
            cx.error(&format!("{ptr}/consumer_group"), "is empty");
        }
        if let Start::EnqueuedTime(t) = &self.start {
            cx.timestamp(&format!("{ptr}/start/enqueued_time"), t);
        }
        if let Start::SequenceNumber(n) = &self.start {
            if *n < 0 {
                cx.error(&format!("{ptr}/start/sequence_number"), "must not be negative");
            }
        }
        if self.prefetch == 0 {
            cx.error(&format!("{ptr}/prefetch"), "must be at least 1");
        }
        if self.batch_size == 0 {
            cx.error(&format!("{ptr}/batch_size"), "must be at least 1");
        }
        cx.duration(&format!("{ptr}/linger"), &self.linger);
        let interval = cx.positive_duration(&format!("{ptr}/balance_interval"), &self.balance_interval);
        let expiry = cx.positive_duration(&format!("{ptr}/ownership_expiry"), &self.ownership_expiry);
        cx.positive_duration(&format!("{ptr}/connect_timeout"), &self.connect_timeout);
        if let (Some(i), Some(e)) = (interval, expiry) {
            if e < i * 2 {
                cx.error(
                    &format!("{ptr}/ownership_expiry"),
                    format!("must be at least twice `balance_interval` ({})", humantime::format_duration(i * 2)),
                );
            }
        }
        if let Some(u) = &self.checkpoint_store {
            cx.url(&format!("{ptr}/checkpoint_store"), u);
        }
        cx.storage_options(&format!("{ptr}/storage"), &self.storage);
        if let Some(e) = self.endpoint() {
            if !(e.starts_with("amqp://") || e.starts_with("amqps://")) {
                cx.error(&format!("{ptr}/endpoint"), "must be an amqp:// or amqps:// URL (or empty)");
            }
        }
    }
    fn ports(&self) -> Vec<crate::runtime::Port> {
        crate::runtime::SOURCE_PORTS.to_vec()
    }
}
