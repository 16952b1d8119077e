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
//!
//! The parts, one concern a file: the source itself (its state, readers and run loop) here; the
//! YAML configuration in `config`; opening clients in `connect`; which partitions are read, and
//! claiming and giving them up, in `partitions`; committing checkpoints in `commit`; reading a
//! partition in `reader`; the ownership decisions in `balance`; the checkpoint store in `store`.

mod balance;
mod commit;
mod config;
pub(crate) mod connect;
mod partitions;
pub mod reader;
pub mod store;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use azure_messaging_eventhubs::ConsumerClient;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::event::Batch;
use crate::metrics;
use crate::model::decode::Projection;
use crate::model::format::MessageDecoder;
use crate::runtime::{BuildCx, Control, EndReason, Mode, PartitionBoard, Source, SourceCx};

pub use config::{Credential, EventHubsConfig, Start};
pub use connect::Connector;
pub use reader::Pos;
use reader::{End, Msg, ReaderCfg, StartAt};
pub use store::BlobCheckpointStore;
use store::OwnershipRecord;

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
    decoder: Arc<MessageDecoder>,
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
        // the SDK's TLS takes rustls's process default (also when the source runs in a library)
        crate::install_crypto_provider();
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
            decoder: Arc::new(crate::sources::message::decoder(
                cfg.format,
                cfg.time.as_deref(),
                cfg.device_id.as_deref(),
            )?),
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
            decoder: self.decoder.clone(),
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
                let props = self
                    .connector
                    .bounded("reading the hub's properties", async {
                        client.get_eventhub_properties().await.map_err(|e| anyhow::anyhow!("{e}"))
                    })
                    .await?;
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
