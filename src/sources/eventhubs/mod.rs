//! `eventhubs`: reads an Event Hub (IoT Central's main export destination) with a consumer
//! group, sharing its partitions between the running instances of the pipeline.
//!
//! - Reading: one task per partition (see `reader`), with the SDK `azure_messaging_eventhubs`
//!   0.16; events are decoded at the edge (only the fields the pipeline reads), carry
//!   `meta.partition` (the partition id), `meta.offset` (the sequence number), `meta.enqueued`
//!   and, as `meta.*` attributes, the `iotcentral-*` annotations and application properties and
//!   the `x-opt-*` annotations. Undecodable events go to the `dead_letter` output with origin
//!   `partition N seq S`.
//! - Checkpoints (see `store`): in object storage (a folder, Azure Blob, S3) in the Azure SDKs'
//!   blob layout. A partition's checkpoint moves only at `Commit(n)`, once the pipeline's
//!   checkpoint `n` is durable and every sink has committed its output, and it carries the
//!   partition's transform state at `n` (the state object is written first, then the checkpoint
//!   blob naming it). Restarts resume after the stored sequence number.
//! - Scale-out (see `balance`): instances heartbeat, renew their ownerships and claim only
//!   partitions nobody holds (released or expired). An instance over its share gives one up
//!   cooperatively: it stops reading it, lets the next checkpoint cover what it read, writes the
//!   partition's checkpoint with its state, tells the downstream transforms to drop the
//!   partition's state, and releases the ownership. The next owner adopts position and state
//!   together. A crashed instance's partitions are taken over after `ownership_expiry`.
//!
//! Why not the SDK's `EventProcessor`: it balances by stealing partitions from live owners and
//! gives no hook to finish a checkpoint before a partition moves, so a moving partition would be
//! read twice or lose its window state; the protocol above needs to decide when ownership ends.
//! The store still implements the SDK's `CheckpointStore` trait, so the SDK's processor (or
//! Azure's processors in other languages) can use the same checkpoints.

mod balance;
pub mod reader;
pub mod store;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use azure_messaging_eventhubs::{ConsumerClient, RetryOptions, StartLocation, StartPosition};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::config::values::{Dur, Timestamp};
use crate::config::{Checker, Spec};
use crate::event::{Batch, Nanos};
use crate::metrics;
use crate::model::decode::Projection;
use crate::runtime::{BuildCx, ComponentStates, Control, EndReason, Mode, PartitionBoard, Source, SourceCx};
use crate::secret::Secret;

pub use reader::Pos;
use reader::{End, Msg, ReaderCfg, StartAt};
pub use store::BlobCheckpointStore;
use store::{CheckpointRecord, OwnershipRecord};

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
fn d_batch() -> usize {
    1000
}
fn d_linger() -> Dur {
    Dur::new("50ms")
}

impl EventHubsConfig {
    /// (namespace, hub) from the fields and the connection string.
    fn names(&self) -> Result<(String, String), String> {
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

    fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref().map(str::trim).filter(|e| !e.is_empty())
    }

    fn start_position(&self) -> StartPosition {
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

fn system_time(ns: Nanos) -> std::time::SystemTime {
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

// ------------------------------------------------------------------ connecting

enum Auth {
    ConnectionString(Secret),
    Token(Arc<dyn azure_core::credentials::TokenCredential>),
}

/// Opens `ConsumerClient`s (one per partition reader, one for management calls).
pub struct Connector {
    auth: Auth,
    namespace: String,
    hub: String,
    group: String,
    endpoint: Option<String>,
}

impl Connector {
    fn new(cfg: &EventHubsConfig) -> anyhow::Result<Connector> {
        let (namespace, hub) = cfg.names().map_err(anyhow::Error::msg)?;
        let auth = match (&cfg.connection_string, &cfg.credential) {
            (Some(cs), None) => {
                // the key alone may appear in a library's message: redact it too
                if let Ok(parsed) = cs.expose().parse::<azure_messaging_eventhubs::ConnectionString>() {
                    if let Some(k) = parsed.shared_access_key {
                        crate::secret::register(k.secret());
                    }
                }
                Auth::ConnectionString(cs.clone())
            }
            (_, Some(c)) => Auth::Token(credential(c)?),
            (None, None) => anyhow::bail!("needs a connection string or a credential"),
        };
        Ok(Connector {
            auth,
            namespace,
            hub,
            group: cfg.consumer_group.clone(),
            endpoint: cfg.endpoint().map(str::to_string),
        })
    }

    /// A connected client.
    pub async fn open(&self) -> anyhow::Result<ConsumerClient> {
        let mut b = ConsumerClient::builder()
            .with_consumer_group(self.group.clone())
            .with_application_id("centralflow".to_string())
            .with_retry_options(RetryOptions {
                initial_delay: azure_core::time::Duration::milliseconds(100),
                max_delay: azure_core::time::Duration::seconds(5),
                max_retries: 5,
                max_total_elapsed: azure_core::time::Duration::seconds(30),
            });
        if let Some(e) = &self.endpoint {
            b = b.with_custom_endpoint(e.clone());
        }
        let client = match &self.auth {
            Auth::ConnectionString(cs) => b.open_with_connection_string(cs.expose(), Some(&self.hub)).await,
            Auth::Token(c) => b.open(&self.namespace, self.hub.clone(), c.clone()).await,
        };
        client.map_err(|e| anyhow::anyhow!(crate::secret::redact(&e.to_string())))
    }
}

fn credential(c: &Credential) -> anyhow::Result<Arc<dyn azure_core::credentials::TokenCredential>> {
    use azure_identity::*;
    Ok(match c {
        Credential::ManagedIdentity { client_id } => {
            ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
                user_assigned_id: client_id.clone().map(UserAssignedId::ClientId),
                ..Default::default()
            }))?
        }
        Credential::WorkloadIdentity { client_id, tenant_id } => {
            WorkloadIdentityCredential::new(Some(WorkloadIdentityCredentialOptions {
                client_id: client_id.clone(),
                tenant_id: tenant_id.clone(),
                ..Default::default()
            }))?
        }
        Credential::ClientSecret { tenant_id, client_id, client_secret } => ClientSecretCredential::new(
            tenant_id,
            client_id.clone(),
            azure_core::credentials::Secret::new(client_secret.expose().to_string()),
            None,
        )?,
        Credential::AzureCli { tenant_id } => AzureCliCredential::new(Some(AzureCliCredentialOptions {
            tenant_id: tenant_id.clone(),
            ..Default::default()
        }))?,
    })
}

// ------------------------------------------------------------------ the source

/// What the pipeline's checkpoint keeps of this source: where each partition it read stands.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct SourceState {
    owner: String,
    positions: Vec<(u32, Pos)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Reading,
    /// Asked to stop reading (giving it up).
    Releasing,
    /// Its reader has stopped: the next checkpoint covers all that was read of it.
    Drained,
    /// Replay: its range is read.
    Done,
}

struct Part {
    pid: String,
    status: Status,
    generation: u64,
    stop: Option<watch::Sender<bool>>,
    task: Option<tokio::task::JoinHandle<()>>,
    /// The last event passed downstream.
    last: Option<Pos>,
    ownership: Option<OwnershipRecord>,
    /// The state object the stored checkpoint names.
    state_object: Option<String>,
    /// What the stored checkpoint holds: (sequence number, hash of the states).
    written: Option<(i64, u64)>,
    healthy: bool,
    /// The receivers' owner level (epoch): the time of the claim, so that the link of an
    /// instance that claimed later displaces ours, and ours cannot take it back.
    owner_level: i64,
}

/// Positions at a barrier.
struct Mark {
    epoch: u64,
    positions: Vec<(u32, Pos)>,
    drained: Vec<u32>,
}

pub struct EventHubsSource {
    cfg: EventHubsConfig,
    name: Arc<str>,
    projection: Option<Arc<Projection>>,
    mode: Mode,
    owner: String,
    store: Option<BlobCheckpointStore>,
    connector: Arc<Connector>,
    restored: Option<SourceState>,
    parts: BTreeMap<u32, Part>,
    partition_ids: Vec<String>,
    marks: VecDeque<Mark>,
    board: Option<Arc<PartitionBoard>>,
    source_index: u16,
    generation: u64,
    tx: Option<mpsc::Sender<Msg>>,
    linger: Duration,
    interval: Duration,
    expiry: Duration,
    ended: bool,
    released_all: bool,
    /// Partitions whose position in the restored pipeline checkpoint is used up: resumed from it
    /// (their transform state came with it) or handed on (their state was dropped).
    restored_used: BTreeSet<u32>,
    /// The first successful balancing round has run.
    balanced_once: bool,
    /// A client for management calls (partition properties, for the lag metric).
    mgmt: Option<ConsumerClient>,
    /// Events covered by stored partition checkpoints.
    committed: prometheus_client::metrics::counter::Counter,
}

impl EventHubsSource {
    pub fn new(cfg: EventHubsConfig, cx: &BuildCx<'_>) -> anyhow::Result<EventHubsSource> {
        let connector = Arc::new(Connector::new(&cfg)?);
        let owner = cx.instance.to_lowercase();
        let store = match (&cfg.checkpoint_store, cx.mode) {
            (Some(url), Mode::Live) => Some(BlobCheckpointStore::open(
                url,
                &cfg.storage,
                &connector.namespace,
                &connector.hub,
                &connector.group,
            )?),
            _ => None,
        };
        let restored = match cx.restored.as_deref().filter(|s| !s.is_empty()) {
            Some(s) if cx.mode == Mode::Live => {
                let st: SourceState =
                    postcard::from_bytes(s).context("eventhubs source state in the checkpoint is corrupt")?;
                Some(st)
            }
            _ => None,
        };
        if let Start::EnqueuedTime(t) = &cfg.start {
            t.get().context("start.enqueued_time")?;
        }
        Ok(EventHubsSource {
            committed: cx.metrics.committed.clone(),
            linger: cfg.linger.get()?,
            interval: cfg.balance_interval.get()?,
            expiry: cfg.ownership_expiry.get()?,
            name: cx.name.into(),
            projection: cx.projection.clone(),
            mode: cx.mode,
            owner,
            store,
            connector,
            restored,
            parts: BTreeMap::new(),
            partition_ids: Vec::new(),
            marks: VecDeque::new(),
            board: None,
            source_index: 0,
            generation: 0,
            tx: None,
            ended: false,
            released_all: false,
            restored_used: BTreeSet::new(),
            balanced_once: false,
            mgmt: None,
            cfg,
        })
    }

    fn snapshot_state(&self) -> Vec<u8> {
        let mut positions =
            self.parts.iter().filter_map(|(p, part)| part.last.clone().map(|pos| (*p, pos))).collect::<Vec<_>>();
        // restored positions not decided on yet (the store was unreachable): kept for the next start
        if let Some(r) = &self.restored {
            for (p, pos) in &r.positions {
                if !self.parts.contains_key(p) && !self.restored_used.contains(p) {
                    positions.push((*p, pos.clone()));
                }
            }
        }
        postcard::to_allocvec(&SourceState { owner: self.owner.clone(), positions }).unwrap_or_default()
    }

    fn spawn_reader(&mut self, partition: u32, start: StartAt, end: Option<End>) {
        self.generation += 1;
        let (stop_tx, stop_rx) = watch::channel(false);
        let cfg = ReaderCfg {
            partition,
            generation: self.generation,
            start,
            end,
            prefetch: self.cfg.prefetch,
            // like Azure's processors: a new owner's link displaces a stale one, and a stale
            // owner's reconnect (a lower level) is refused
            owner_level: (self.mode == Mode::Live && self.store.is_some())
                .then(|| self.parts.get(&partition).map_or(0, |p| p.owner_level)),
            batch_size: self.cfg.batch_size,
            linger: self.linger,
            projection: self.projection.clone(),
            component: self.name.clone(),
            connector: self.connector.clone(),
        };
        let tx = self.tx.clone().expect("the reader channel exists while running");
        let task = tokio::spawn(reader::read(cfg, tx, stop_rx));
        let part = self.parts.get_mut(&partition).expect("a part for the reader");
        part.generation = self.generation;
        part.stop = Some(stop_tx);
        part.task = Some(task);
        part.status = Status::Reading;
        part.healthy = false;
    }

    fn new_part(&mut self, partition: u32, pid: &str) -> &mut Part {
        self.parts.entry(partition).or_insert_with(|| Part {
            pid: pid.to_string(),
            status: Status::Reading,
            generation: 0,
            stop: None,
            task: None,
            last: None,
            ownership: None,
            state_object: None,
            written: None,
            healthy: false,
            owner_level: 0,
        })
    }

    fn update_health(&self, cx: &SourceCx) {
        let active: Vec<&Part> = self.parts.values().filter(|p| p.status == Status::Reading).collect();
        let ok = active.iter().all(|p| p.healthy);
        cx.metrics.connected.set(ok as i64);
        let detail = if active.is_empty() {
            "no partition to read".to_string()
        } else if ok {
            format!("reading {} partition(s)", active.len())
        } else {
            let bad: Vec<&str> = active.iter().filter(|p| !p.healthy).map(|p| p.pid.as_str()).collect();
            format!("reconnecting partition(s) {}", bad.join(", "))
        };
        metrics::set_ready(&self.name, ok, &detail);
    }

    /// Partition ids of the hub (retrying, while serving control messages).
    async fn discover(&mut self, cx: &mut SourceCx) -> anyhow::Result<Option<(ConsumerClient, Vec<String>)>> {
        let mut backoff = Duration::from_millis(200);
        loop {
            let attempt = async {
                let client = self.connector.open().await?;
                let props = client.get_eventhub_properties().await.map_err(|e| anyhow::anyhow!("{e}"))?;
                anyhow::Ok((client, props.partition_ids))
            };
            let r = tokio::select! {
                r = attempt => r,
                c = cx.control() => {
                    if self.serve_idle(cx, c).await? { return Ok(None) }
                    continue;
                }
            };
            match r {
                Ok(v) => return Ok(Some(v)),
                Err(e) => {
                    cx.metrics.connected.set(0);
                    cx.metrics.errors.inc();
                    let msg = crate::secret::redact(&format!("{e:#}"));
                    metrics::set_ready(&self.name, false, &format!("connecting: {msg}"));
                    tracing::warn!(hub = %self.connector.hub, "cannot read the event hub's partitions, retrying in {backoff:?}: {msg}");
                    let sleep = tokio::time::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    tokio::pin!(sleep);
                    loop {
                        tokio::select! {
                            _ = &mut sleep => break,
                            c = cx.control() => if self.serve_idle(cx, c).await? { return Ok(None) },
                        }
                    }
                }
            }
        }
    }

    /// Serves a control message while nothing is being read; true on stop.
    async fn serve_idle(&mut self, cx: &mut SourceCx, c: Control) -> anyhow::Result<bool> {
        match c {
            Control::Barrier(e) => {
                self.push_mark(e);
                cx.barrier(e, self.snapshot_state()).await?;
            }
            Control::Commit(e) => self.commit_epoch(Some(cx), e).await,
            Control::Stop | Control::Shutdown => return Ok(true),
            Control::Flush(_) => {}
        }
        Ok(false)
    }

    fn push_mark(&mut self, epoch: u64) {
        let positions =
            self.parts.iter().filter_map(|(p, part)| part.last.clone().map(|pos| (*p, pos))).collect::<Vec<_>>();
        let drained = self.parts.iter().filter(|(_, p)| p.status == Status::Drained).map(|(k, _)| *k).collect();
        self.marks.push_back(Mark { epoch, positions, drained });
    }

    /// Replay: every partition, from `--from` (or the configured start) to `--to` or its end now.
    async fn start_replay(&mut self, cx: &mut SourceCx, client: &ConsumerClient) -> anyhow::Result<()> {
        let (from, to) = self.cfg.replay_range.unwrap_or((None, None));
        let to_ms = to.map(|t| t.div_euclid(1_000_000));
        for pid in self.partition_ids.clone() {
            let p = parse_partition(&pid)?;
            let props = client
                .get_partition_properties(&pid)
                .await
                .map_err(|e| anyhow::anyhow!("reading the properties of partition {pid}: {e}"))?;
            let last_ms = props.last_enqueued_time_utc.map(system_ms);
            let empty = props.is_empty
                || props.last_enqueued_sequence_number < 0
                || from.zip(last_ms).is_some_and(|(f, l)| l < f.div_euclid(1_000_000));
            cx.add_partition(p, ComponentStates::new()).await?;
            self.new_part(p, &pid).status = Status::Done;
            if empty {
                tracing::info!(partition = %pid, "nothing to replay in this partition");
                continue;
            }
            let start = match from {
                Some(f) => StartPosition { location: StartLocation::EnqueuedTime(system_time(f)), inclusive: true },
                None => self.cfg.start_position(),
            };
            let end = End { last_seq: props.last_enqueued_sequence_number, to_ms };
            if from.is_none() && to.is_none() && self.cfg.start == Start::Earliest {
                // the whole partition: its size is known, so the progress shows a percentage
                let n = (end.last_seq - props.beginning_sequence_number + 1).max(0) as u64;
                cx.progress.total_events.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            }
            tracing::info!(partition = %pid, last_sequence_number = end.last_seq, "replaying");
            self.spawn_reader(p, StartAt::Position(start), Some(end));
        }
        Ok(())
    }

    /// Live without a checkpoint store: every partition, from the pipeline's checkpoint or the start.
    async fn start_all(&mut self, cx: &mut SourceCx) -> anyhow::Result<()> {
        let restored: HashMap<u32, Pos> =
            self.restored.as_ref().map(|r| r.positions.iter().cloned().collect()).unwrap_or_default();
        for pid in self.partition_ids.clone() {
            let p = parse_partition(&pid)?;
            self.new_part(p, &pid);
            let start = match restored.get(&p) {
                Some(pos) => {
                    self.parts.get_mut(&p).unwrap().last = Some(pos.clone());
                    StartAt::After(pos.seq)
                }
                None => {
                    cx.add_partition(p, ComponentStates::new()).await?;
                    StartAt::Position(self.cfg.start_position())
                }
            };
            self.spawn_reader(p, start, None);
        }
        Ok(())
    }

    /// One round of ownership renewal and balancing.
    async fn balance(&mut self, cx: &mut SourceCx) -> anyhow::Result<()> {
        let Some(store) = self.store.clone() else { return Ok(()) };
        store.heartbeat(&self.owner).await?;
        let ownerships = store.list_ownership_records().await?;
        let instances = store.instances().await?;
        let now = now_ms();
        let expiry_ms = self.expiry.as_millis() as i64;
        // renew what we hold
        let held: Vec<u32> = self.parts.keys().copied().collect();
        for p in held {
            let Some(o) = self.parts.get(&p).and_then(|x| x.ownership.clone()) else { continue };
            match store.claim(&o.partition, &self.owner, Some(&o.etag)).await {
                Ok(Some(renewed)) => self.parts.get_mut(&p).unwrap().ownership = Some(renewed),
                Ok(None) => {
                    let now_owner = ownerships.iter().find(|x| x.partition == o.partition).map(|x| x.owner.clone());
                    self.lose(cx, p, &format!("another instance ({}) owns it now", now_owner.unwrap_or_default()))
                        .await?;
                }
                Err(e) => {
                    tracing::warn!(partition = %o.partition, "cannot renew the ownership: {e:#}");
                    if now - o.modified_ms > expiry_ms {
                        self.lose(cx, p, "its ownership expired while the store was unreachable").await?;
                    }
                }
            }
        }
        let held: BTreeSet<String> = self.parts.values().map(|p| p.pid.clone()).collect();
        let releasing: BTreeSet<String> =
            self.parts.values().filter(|p| p.status != Status::Reading).map(|p| p.pid.clone()).collect();
        let decision = balance::decide(&balance::View {
            partitions: &self.partition_ids,
            ownerships: &ownerships,
            instances: &instances,
            me: &self.owner,
            held: &held,
            releasing: &releasing,
            now_ms: now,
            expiry_ms,
        });
        for (pid, etag) in decision.claim {
            let was_mine = ownerships.iter().any(|o| o.partition == pid && o.owner == self.owner);
            match store.claim(&pid, &self.owner, etag.as_deref()).await? {
                Some(rec) => {
                    let etag = rec.etag.clone();
                    if let Err(e) = self.adopt(cx, &store, rec, was_mine).await {
                        // not read: give the claim back so that it is retried (here or elsewhere)
                        tracing::warn!(partition = %pid, "cannot start reading the partition, releasing it: {e:#}");
                        if let Some(p) =
                            pid.parse::<u32>().ok().filter(|p| self.parts.get(p).is_some_and(|x| x.task.is_none()))
                        {
                            self.parts.remove(&p);
                        }
                        let _ = store.claim(&pid, "", Some(&etag)).await;
                    }
                }
                None => tracing::debug!(partition = %pid, "another instance claimed it first"),
            }
        }
        for pid in decision.release {
            let p = parse_partition(&pid)?;
            if let Some(part) = self.parts.get_mut(&p) {
                tracing::info!(partition = %pid, instances = decision.instances, "giving the partition up to balance the load");
                part.status = Status::Releasing;
                if let Some(s) = &part.stop {
                    let _ = s.send(true);
                }
            }
        }
        if !self.balanced_once {
            // partitions of the restored checkpoint that this instance no longer reads: their
            // state moves on with the partition
            if let Some(r) = self.restored.clone() {
                for (p, _) in r.positions {
                    if !self.parts.contains_key(&p) && self.restored_used.insert(p) {
                        cx.remove_partition(p).await?;
                    }
                }
            }
            self.balanced_once = true;
        }
        self.update_health(cx);
        Ok(())
    }

    /// Starts reading a partition just claimed: position and state from its checkpoint (or from
    /// the pipeline's restored checkpoint, when that is newer and still ours).
    async fn adopt(
        &mut self,
        cx: &mut SourceCx,
        store: &BlobCheckpointStore,
        rec: OwnershipRecord,
        was_mine: bool,
    ) -> anyhow::Result<()> {
        let p = parse_partition(&rec.partition)?;
        let cp = store.checkpoint(&rec.partition).await?;
        let restored = self
            .restored
            .as_ref()
            .filter(|r| r.owner == self.owner)
            .and_then(|r| r.positions.iter().find(|(q, _)| *q == p).map(|(_, pos)| pos.clone()));
        let use_restored = match (&restored, &cp) {
            (Some(r), Some(c)) => {
                was_mine && c.owner() == Some(self.owner.as_str()) && c.sequence_number.is_none_or(|s| s <= r.seq)
            }
            (Some(_), None) => was_mine,
            (None, _) => false,
        } && !self.restored_used.contains(&p);
        let pid = rec.partition.clone();
        let part = self.new_part(p, &pid);
        part.owner_level = rec.modified_ms.max(0);
        part.ownership = Some(rec);
        part.state_object = cp.as_ref().and_then(|c| c.state_object().map(str::to_string));
        part.written = None;
        let start = if use_restored {
            let r = restored.unwrap();
            tracing::info!(partition = %pid, sequence_number = r.seq, "resuming after the pipeline's checkpoint");
            part.last = Some(r.clone());
            self.restored_used.insert(p);
            StartAt::After(r.seq)
        } else {
            let states = match cp.as_ref().and_then(|c| c.state_object()) {
                Some(name) => {
                    let bytes = store.get_state(name).await?;
                    postcard::from_bytes::<ComponentStates>(&bytes).unwrap_or_else(|e| {
                        // bad input never stops a pipeline: the partition is read on, its windows start afresh
                        tracing::error!(partition = %pid, "the stored state {name} is corrupt ({e}): starting without it");
                        ComponentStates::new()
                    })
                }
                None => ComponentStates::new(),
            };
            let part = self.parts.get_mut(&p).unwrap();
            part.last = cp.as_ref().and_then(|c| {
                c.sequence_number.map(|seq| Pos {
                    seq,
                    offset: c.offset.clone().unwrap_or_default(),
                    enqueued_ms: i64::MIN,
                })
            });
            tracing::info!(
                partition = %pid,
                sequence_number = ?cp.as_ref().and_then(|c| c.sequence_number),
                states = states.len(),
                "claimed the partition"
            );
            cx.add_partition(p, states).await?;
            self.restored_used.insert(p);
            match cp.as_ref().and_then(|c| c.sequence_number) {
                Some(s) => StartAt::After(s),
                None => StartAt::Position(self.cfg.start_position()),
            }
        };
        self.spawn_reader(p, start, None);
        Ok(())
    }

    /// The partition is no longer ours (another instance owns it): stop at once.
    async fn lose(&mut self, cx: &mut SourceCx, p: u32, why: &str) -> anyhow::Result<()> {
        let Some(part) = self.parts.remove(&p) else { return Ok(()) };
        tracing::warn!(
            partition = %part.pid,
            "lost the partition: {why}; events read since its last checkpoint will be read again by its new owner"
        );
        if let Some(s) = &part.stop {
            let _ = s.send(true);
        }
        if let Some(t) = part.task {
            t.abort();
        }
        cx.remove_partition(p).await?;
        self.update_health(cx);
        Ok(())
    }

    async fn on_msg(&mut self, cx: &mut SourceCx, m: Msg) -> anyhow::Result<bool> {
        match m {
            Msg::Events { partition, generation, events, dead, last } => {
                let Some(part) = self.parts.get_mut(&partition).filter(|p| p.generation == generation) else {
                    return Ok(false);
                };
                part.last = Some(last);
                if !events.is_empty() {
                    cx.send(Batch::new(events)).await?;
                }
                if !dead.is_empty() {
                    cx.dead_letter(dead).await?;
                }
            }
            Msg::Health { partition, generation, ok, detail } => {
                if let Some(part) = self.parts.get_mut(&partition).filter(|p| p.generation == generation) {
                    if !ok {
                        cx.metrics.errors.inc();
                        if part.healthy {
                            cx.metrics.reconnects.inc();
                        }
                        tracing::warn!(partition = %part.pid, "{detail}; reconnecting");
                    } else if !part.healthy {
                        tracing::info!(partition = %part.pid, "{detail}");
                    }
                    part.healthy = ok;
                    self.update_health(cx);
                }
            }
            Msg::Stolen { partition, generation, detail } => {
                let Some(part) = self.parts.get(&partition).filter(|p| p.generation == generation) else {
                    return Ok(false);
                };
                // still ours? (a stale receiver of a crashed owner can displace us for a moment)
                let still = match (&self.store, part.ownership.clone()) {
                    (Some(store), Some(o)) => store.claim(&o.partition, &self.owner, Some(&o.etag)).await?,
                    _ => None,
                };
                match still {
                    Some(o) => {
                        tracing::warn!(partition = %o.partition, "receiver displaced ({detail}) although the partition is ours: reading on");
                        let start = match &part.last {
                            Some(pos) => StartAt::After(pos.seq),
                            None => StartAt::Position(self.cfg.start_position()),
                        };
                        let part = self.parts.get_mut(&partition).unwrap();
                        part.owner_level = part.owner_level.max(o.modified_ms);
                        part.ownership = Some(o);
                        self.spawn_reader(partition, start, None);
                    }
                    None => self.lose(cx, partition, &format!("receiver displaced ({detail})")).await?,
                }
            }
            Msg::Ended { partition, generation } => {
                let Some(part) = self.parts.get_mut(&partition).filter(|p| p.generation == generation) else {
                    return Ok(false);
                };
                part.task = None;
                part.stop = None;
                match self.mode {
                    Mode::Replay => part.status = Status::Done,
                    Mode::Live if part.status == Status::Releasing => {
                        part.status = Status::Drained;
                        // the hand-over waits for a checkpoint: ask for one now
                        cx.request_checkpoint();
                    }
                    Mode::Live => part.status = Status::Drained,
                }
                return Ok(self.parts.values().all(|p| p.task.is_none()));
            }
        }
        Ok(false)
    }

    /// Commits checkpoint `epoch`: stores each partition's position with its transform state,
    /// then hands over the partitions given up. Store failures are logged; the next commit
    /// writes again.
    async fn commit_epoch(&mut self, cx: Option<&mut SourceCx>, epoch: u64) {
        let mut mark: Option<Mark> = None;
        while self.marks.front().is_some_and(|m| m.epoch <= epoch) {
            mark = self.marks.pop_front();
        }
        // after the stream ended, an epoch beyond every barrier seen is the final one: it covers
        // everything read
        let is_final = self.ended && self.marks.is_empty() && mark.as_ref().is_none_or(|m| m.epoch < epoch);
        if is_final {
            mark = None;
        }
        let (at, positions, drained) = match mark {
            Some(m) => (m.epoch, m.positions, m.drained),
            None if is_final => {
                let positions =
                    self.parts.iter().filter_map(|(p, part)| part.last.clone().map(|pos| (*p, pos))).collect();
                (epoch, positions, self.parts.keys().copied().collect())
            }
            None => return,
        };
        let Some(store) = self.store.clone() else { return };
        if self.released_all {
            return;
        }
        let board = self.board.clone();
        let mut writes = Vec::new();
        let mut complete: BTreeSet<u32> = BTreeSet::new();
        for (p, pos) in positions {
            let Some(part) = self.parts.get(&p) else { continue };
            let states = match &board {
                Some(b) => match b.get_at(self.source_index, p, at) {
                    Some(s) => s,
                    None => {
                        tracing::debug!(partition = %part.pid, epoch = at, "states of this epoch unknown: written at the next commit");
                        continue;
                    }
                },
                None => ComponentStates::new(),
            };
            let hash = states_hash(&states);
            if part.written == Some((pos.seq, hash)) {
                complete.insert(p);
                continue;
            }
            let (store, owner, pid, old) =
                (store.clone(), self.owner.clone(), part.pid.clone(), part.state_object.clone());
            writes.push(async move {
                let r = write_checkpoint(&store, &pid, at, &owner, &pos, &states).await;
                (p, pos.seq, hash, old, r)
            });
        }
        for (p, seq, hash, old, r) in futures::future::join_all(writes).await {
            match r {
                Ok(name) => {
                    if let Some(part) = self.parts.get_mut(&p) {
                        // events newly covered by the partition's stored checkpoint
                        if let Some((before, _)) = part.written {
                            self.committed.inc_by(seq.saturating_sub(before).max(0) as u64);
                        }
                        part.written = Some((seq, hash));
                        if old.is_some() && old != name {
                            store.delete_state(old.as_deref().unwrap_or_default()).await;
                        }
                        part.state_object = name;
                    }
                    complete.insert(p);
                }
                Err(e) => {
                    metrics::global().checkpoints_failed.inc();
                    tracing::warn!(partition = p, "storing the checkpoint failed (retried at the next commit): {e:#}");
                }
            }
        }
        // hand-overs: partitions whose reader had stopped before this checkpoint's barrier
        let mut cx = cx;
        for p in drained {
            let Some(part) = self.parts.get(&p) else { continue };
            if part.status != Status::Drained || !(complete.contains(&p) || part.last.is_none()) {
                continue;
            }
            if let Some(cx) = cx.as_deref_mut() {
                if let Err(e) = cx.remove_partition(p).await {
                    tracing::warn!("{e:#}");
                }
            }
            let part = self.parts.remove(&p).unwrap();
            if let Some(o) = &part.ownership {
                match store.claim(&o.partition, "", Some(&o.etag)).await {
                    Ok(Some(_)) => {
                        tracing::info!(partition = %part.pid, epoch = at, "partition handed over (checkpoint and state stored, ownership released)")
                    }
                    Ok(None) => {
                        tracing::warn!(partition = %part.pid, "could not release the ownership: another instance took it")
                    }
                    Err(e) => {
                        tracing::warn!(partition = %part.pid, "could not release the ownership (it expires by itself): {e:#}")
                    }
                }
            }
        }
        if let Some(cx) = cx {
            self.update_health(cx);
        }
        if is_final {
            self.released_all = true;
            store.remove_heartbeat(&self.owner).await;
        }
    }

    /// Sets `consumer_lag` (events enqueued after the last one read) of the partitions being read.
    async fn update_lag(&mut self) {
        if self.mgmt.is_none() {
            self.mgmt =
                tokio::time::timeout(Duration::from_secs(5), self.connector.open()).await.ok().and_then(Result::ok);
        }
        let Some(client) = &self.mgmt else { return };
        for part in self.parts.values().filter(|p| p.status == Status::Reading) {
            let props =
                match tokio::time::timeout(Duration::from_secs(5), client.get_partition_properties(&part.pid)).await {
                    Ok(Ok(p)) => p,
                    _ => {
                        // a fresh client next time
                        self.mgmt = None;
                        return;
                    }
                };
            let read = part.last.as_ref().map_or(props.beginning_sequence_number - 1, |p| p.seq);
            metrics::global()
                .consumer_lag
                .get_or_create(&metrics::PartitionLabel {
                    component: self.name.to_string(),
                    partition: part.pid.clone(),
                })
                .set((props.last_enqueued_sequence_number - read).max(0));
        }
    }

    /// Stops every reader and forwards what they still had; the stream then ends.
    async fn stop_readers(&mut self, cx: &mut SourceCx, rx: &mut mpsc::Receiver<Msg>) -> anyhow::Result<()> {
        for part in self.parts.values() {
            if let Some(s) = &part.stop {
                let _ = s.send(true);
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while self.parts.values().any(|p| p.task.is_some()) {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(m)) => {
                    self.on_msg(cx, m).await?;
                }
                _ => break,
            }
        }
        for part in self.parts.values_mut() {
            if let Some(t) = part.task.take() {
                t.abort();
            }
        }
        Ok(())
    }
}

async fn write_checkpoint(
    store: &BlobCheckpointStore,
    pid: &str,
    epoch: u64,
    owner: &str,
    pos: &Pos,
    states: &ComponentStates,
) -> anyhow::Result<Option<String>> {
    // the state first: a checkpoint never points past its state
    let name = if states.is_empty() {
        None
    } else {
        Some(store.put_state(pid, epoch, owner, postcard::to_allocvec(states)?).await?)
    };
    let mut extra = BTreeMap::from([
        (store::CF_EPOCH.to_string(), epoch.to_string()),
        (store::CF_OWNER.to_string(), owner.to_string()),
    ]);
    if let Some(n) = &name {
        extra.insert(store::CF_STATE.to_string(), n.clone());
    }
    store
        .put_checkpoint(&CheckpointRecord {
            partition: pid.to_string(),
            offset: Some(pos.offset.clone()).filter(|o| !o.is_empty()),
            sequence_number: Some(pos.seq),
            extra,
        })
        .await?;
    Ok(name)
}

fn states_hash(s: &ComponentStates) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for (k, v) in s {
        h.update(k.as_bytes());
        h.update(&(v.len() as u64).to_le_bytes());
        h.update(v);
    }
    h.digest()
}

fn parse_partition(pid: &str) -> anyhow::Result<u32> {
    pid.parse().with_context(|| format!("partition id {pid:?} is not a number"))
}

fn now_ms() -> i64 {
    crate::time::now_nanos() / 1_000_000
}

fn system_ms(t: std::time::SystemTime) -> i64 {
    match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

#[async_trait]
impl Source for EventHubsSource {
    async fn run(&mut self, cx: &mut SourceCx) -> anyhow::Result<EndReason> {
        self.board = Some(cx.partition_board());
        self.source_index = cx.source_index();
        metrics::set_ready(&self.name, false, "connecting");
        cx.metrics.connected.set(0);
        let (tx, mut rx) = mpsc::channel::<Msg>(64);
        self.tx = Some(tx);
        let Some((client, ids)) = self.discover(cx).await? else {
            self.ended = true;
            return Ok(EndReason::Stopped);
        };
        self.partition_ids = ids;
        tracing::info!(
            hub = %self.connector.hub,
            consumer_group = %self.connector.group,
            partitions = self.partition_ids.len(),
            owner = %self.owner,
            store = self.store.as_ref().map(|s| s.display().to_string()).unwrap_or_else(|| "none".into()),
            "connected to the event hub"
        );
        let balancing = self.mode == Mode::Live && self.store.is_some();
        match (self.mode, balancing) {
            (Mode::Replay, _) => self.start_replay(cx, &client).await?,
            (Mode::Live, false) => {
                tracing::warn!("no checkpoint_store: this instance reads every partition (do not start a second one)");
                self.start_all(cx).await?
            }
            (Mode::Live, true) => {
                if let Err(e) = self.balance(cx).await {
                    tracing::warn!("balancing partitions failed, retrying: {e:#}");
                }
            }
        }
        if self.mode == Mode::Live {
            self.mgmt = Some(client);
        } else {
            let _ = tokio::time::timeout(Duration::from_secs(5), client.close()).await;
        }
        if self.mode == Mode::Replay && self.parts.values().all(|p| p.task.is_none()) {
            self.ended = true;
            return Ok(EndReason::Exhausted);
        }
        self.update_health(cx);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + self.interval, self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                c = cx.control() => match c {
                    Control::Barrier(e) => {
                        self.push_mark(e);
                        cx.barrier(e, self.snapshot_state()).await?;
                    }
                    Control::Commit(e) => self.commit_epoch(Some(cx), e).await,
                    Control::Stop | Control::Shutdown => {
                        self.stop_readers(cx, &mut rx).await?;
                        self.ended = true;
                        return Ok(EndReason::Stopped);
                    }
                    Control::Flush(_) => {}
                },
                m = rx.recv() => {
                    let Some(m) = m else { continue };
                    let all_ended = self.on_msg(cx, m).await?;
                    if all_ended && self.mode == Mode::Replay {
                        self.ended = true;
                        return Ok(EndReason::Exhausted);
                    }
                }
                _ = tick.tick(), if self.mode == Mode::Live => {
                    if balancing {
                        if let Err(e) = self.balance(cx).await {
                            cx.metrics.errors.inc();
                            tracing::warn!("balancing partitions failed (retried in {:?}): {e:#}", self.interval);
                        }
                    }
                    self.update_lag().await;
                }
            }
        }
    }

    async fn commit(&mut self, epoch: u64) -> anyhow::Result<()> {
        self.commit_epoch(None, epoch).await;
        Ok(())
    }

    fn snapshot(&self) -> Vec<u8> {
        self.snapshot_state()
    }
}

impl Drop for EventHubsSource {
    fn drop(&mut self) {
        for part in self.parts.values() {
            if let Some(t) = &part.task {
                t.abort();
            }
        }
        metrics::clear_ready(&self.name);
    }
}

#[cfg(test)]
mod tests;
