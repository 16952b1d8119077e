//! The runtime: runs a validated pipeline as one task per component, connected by bounded
//! channels of micro-batches, and coordinates checkpoints with barriers.
//!
//! Delivery protocol (see ARCHITECTURE.md): the coordinator asks every source to inject barrier
//! `n`; each source emits it between two batches and reports its position; transforms snapshot
//! their state when the barrier has arrived on all inputs and pass it on; sinks `flush(n)`
//! (stage their output) when it reaches them. Once every component has reported, the
//! checkpoint (positions + states + staged outputs) is written, and only then are sinks told to
//! `commit(n)` (make staged files visible) and sources to commit (acknowledge, store offsets).

pub mod checkpoint;
pub mod coordinator;
pub mod io;
mod protocol;
mod tasks;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::event::{Batch, Event, Nanos};
use crate::metrics::{ComponentMetrics, SharedProgress};
pub use coordinator::{run, Component, Graph, Node, Restored, RunOptions, RunSummary, Session};
pub use io::{Emitter, EndReason, Item, Msg, Outputs, PartitionChange, Port};

/// Capacity of the control channel of each component and of the report channel. Both are
/// bounded like every channel; the protocol has far fewer messages outstanding (one epoch at a
/// time, a few messages per component per epoch), so senders never wait on them in practice.
pub(crate) const REPORTS: usize = 256;

/// A component's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Source,
    Transform,
    Sink,
}

impl Role {
    /// Its section of the pipeline YAML.
    pub fn section(self) -> &'static str {
        match self {
            Role::Source => "sources",
            Role::Transform => "transforms",
            Role::Sink => "sinks",
        }
    }
}

/// The output ports of every source: the events, and the records that could not be decoded
/// ([`SourceCx::dead_letter`]).
pub const SOURCE_PORTS: [Port; 2] = [Port::MAIN, Port::DEAD_LETTER];

/// Live (`centralflow run`) or replay (`centralflow replay`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Unbounded: paced sources, idle-partition detection by wall clock, ops endpoint.
    Live,
    /// Bounded: read everything as fast as possible, then flush and exit.
    Replay,
}

/// Messages from the coordinator to a component.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Sources: inject barrier `n` now.
    Barrier(u64),
    /// Sinks whose inputs have all ended: flush for epoch `n` without waiting for a barrier.
    Flush(u64),
    /// Checkpoint `n` is durable: commit what it covers.
    Commit(u64),
    /// Sources: stop reading, end the stream.
    Stop,
    /// Everything is committed: exit.
    Shutdown,
}

/// Messages from components to the coordinator.
#[derive(Debug)]
pub(crate) enum Report {
    Snapshot {
        node: usize,
        epoch: u64,
        state: Vec<u8>,
        partitions: Vec<PartitionState>,
    },
    Finished {
        node: usize,
        state: Vec<u8>,
        partitions: Vec<PartitionState>,
    },
    Drained {
        node: usize,
    },
    /// A sink committed epoch `epoch` (its output is visible).
    Committed {
        node: usize,
        epoch: u64,
    },
    Failed {
        node: usize,
        error: String,
    },
    RequestCheckpoint,
}

/// A component that brings events in from the outside world.
#[async_trait]
pub trait Source: Send {
    /// Produces events until the input is exhausted or [`Control::Stop`] arrives. It must serve
    /// [`Control::Barrier`] (via [`SourceCx::barrier`]) and may act on [`Control::Commit`].
    async fn run(&mut self, cx: &mut SourceCx) -> anyhow::Result<EndReason>;
    /// Commits what checkpoint `epoch` covers (acknowledgements, stored offsets). Sources get
    /// `Commit(n)` only after every sink has committed epoch `n`, so that positions never move
    /// past output that is not yet visible.
    async fn commit(&mut self, _epoch: u64) -> anyhow::Result<()> {
        Ok(())
    }
    /// The current position, as stored in a checkpoint.
    fn snapshot(&self) -> Vec<u8> {
        Vec::new()
    }
}

/// A synchronous stage: no I/O, no awaiting.
pub trait Transform: Send {
    /// Processes one batch, emitting on `out`.
    fn process(&mut self, batch: Batch, out: &mut Emitter);
    /// Called about once a second in live mode with the wall clock (idle-partition detection).
    fn on_tick(&mut self, _now: Nanos, _out: &mut Emitter) {}
    /// Every input partition has reached event time `to` (pipeline tests: `watermark:`): a
    /// stateful transform advances its watermark to at least `to` and emits what that closes.
    /// Nothing in a running pipeline calls it; watermarks there come from event times.
    fn advance_watermark(&mut self, _to: Nanos, _out: &mut Emitter) {}
    /// All inputs ended. `flush` says whether to emit everything still held (end of a replay,
    /// or a stop without a checkpoint store) or to keep it for the final checkpoint.
    fn on_end(&mut self, _flush: bool, _out: &mut Emitter) {}
    /// State for a checkpoint.
    fn snapshot(&self) -> anyhow::Result<Vec<u8>> {
        Ok(Vec::new())
    }
    /// For scale-out: the input partitions (source index, partition) this transform keeps
    /// state for, when its state is kept per partition (see `BuildCx::partitioned`).
    fn state_partitions(&self) -> Vec<(u16, u32)> {
        Vec::new()
    }
    /// The state kept for one input partition, for the partition's checkpoint.
    fn partition_state(&self, _source: u16, _partition: u32) -> anyhow::Result<Vec<u8>> {
        Ok(Vec::new())
    }
    /// Replaces the state of an input partition with `state` (or drops it with `None`), when
    /// the partition moves to or away from this instance.
    fn set_partition_state(&mut self, _source: u16, _partition: u32, _state: Option<&[u8]>) -> anyhow::Result<()> {
        Ok(())
    }
}

/// The state one transform keeps for one input partition, at a checkpoint.
#[derive(Debug, Clone)]
pub struct PartitionState {
    pub source: u16,
    pub partition: u32,
    pub state: Vec<u8>,
}

/// Per-partition state of the last durable checkpoints, by (source index, partition), then
/// component name: what a source that hands partitions over (Event Hubs) stores with the
/// partition's checkpoint. The last [`PartitionBoard::HISTORY`] epochs are kept, because a
/// source may commit epoch `n` after epoch `n + 1` became durable (sources commit once every
/// sink has committed).
#[derive(Debug, Default)]
pub struct PartitionBoard {
    inner: std::sync::Mutex<std::collections::VecDeque<(u64, EpochStates)>>,
}

/// States by component name.
pub type ComponentStates = std::collections::BTreeMap<String, Vec<u8>>;

/// The per-partition states of one checkpoint.
type EpochStates = std::collections::HashMap<(u16, u32), ComponentStates>;

impl PartitionBoard {
    /// Epochs kept.
    pub const HISTORY: usize = 16;

    pub(crate) fn publish(&self, epoch: u64, states: std::collections::HashMap<(u16, u32), ComponentStates>) {
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        m.push_back((epoch, states));
        while m.len() > Self::HISTORY {
            m.pop_front();
        }
    }
    /// The states of a partition at the last durable checkpoint that had any.
    pub fn get(&self, source: u16, partition: u32) -> Option<(u64, ComponentStates)> {
        let m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        m.iter().rev().find_map(|(e, s)| s.get(&(source, partition)).map(|v| (*e, v.clone())))
    }
    /// The states of a partition at checkpoint `epoch` (empty when no component kept state for
    /// it then); `None` when that epoch is not (or no longer) known.
    pub fn get_at(&self, source: u16, partition: u32, epoch: u64) -> Option<ComponentStates> {
        let m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        m.iter().find(|(e, _)| *e == epoch).map(|(_, s)| s.get(&(source, partition)).cloned().unwrap_or_default())
    }
    pub(crate) fn forget(&self, source: u16, partition: u32) {
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for (_, s) in m.iter_mut() {
            s.remove(&(source, partition));
        }
    }
}

/// A component that writes events to the outside world.
#[async_trait]
pub trait Sink: Send {
    /// Called once before any write; `restored` is the state of the last checkpoint, whose
    /// staged output must now be committed.
    async fn start(&mut self, _restored: Option<&[u8]>) -> anyhow::Result<()> {
        Ok(())
    }
    /// The last checkpoint holds this sink's state from a different configuration, which is
    /// therefore not restored (`start` gets `None`, right after this). Output that checkpoint
    /// staged is covered by it and its input is settled at the source once committed: commit
    /// it now if the new configuration can, so that an edit after a crash loses nothing. An
    /// error is logged, not fatal.
    async fn recover(&mut self, _previous: &[u8]) -> anyhow::Result<()> {
        Ok(())
    }
    async fn write(&mut self, batch: Arc<Batch>) -> anyhow::Result<()>;
    /// Makes everything written so far durable but not yet visible; returns the state that lets
    /// [`Sink::commit`] (or a restart) finish the job.
    async fn flush(&mut self, epoch: u64) -> anyhow::Result<Vec<u8>>;
    /// Checkpoint `epoch` is durable: make its output visible.
    async fn commit(&mut self, epoch: u64) -> anyhow::Result<()>;
    /// All inputs ended, for this reason; the final flush follows. A sink that may hold output
    /// back (a remote that is slow to accept it) can wait for all of it when the input was
    /// exhausted, and keep it in the final checkpoint when the pipeline was stopped.
    async fn on_end(&mut self, _reason: EndReason) -> anyhow::Result<()> {
        Ok(())
    }
    /// Called about once a second (time-based rolling).
    async fn on_tick(&mut self) -> anyhow::Result<()> {
        Ok(())
    }
    async fn close(&mut self) -> anyhow::Result<()> {
        Ok(())
    }
}

/// What a source sees of the runtime.
pub struct SourceCx {
    pub name: Arc<str>,
    pub mode: Mode,
    pub metrics: ComponentMetrics,
    pub progress: SharedProgress,
    node: usize,
    source_index: u16,
    outputs: Outputs,
    ctrl: mpsc::Receiver<Control>,
    reports: mpsc::Sender<Report>,
    deferred: VecDeque<Control>,
    warned_dead_letters: u64,
    board: Arc<PartitionBoard>,
}

impl SourceCx {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        name: Arc<str>,
        opts: &RunOptions,
        metrics: ComponentMetrics,
        (node, source_index): (usize, u16),
        outputs: Outputs,
        ctrl: mpsc::Receiver<Control>,
        reports: mpsc::Sender<Report>,
        board: Arc<PartitionBoard>,
    ) -> SourceCx {
        SourceCx {
            name,
            mode: opts.mode,
            metrics,
            progress: opts.progress.clone(),
            node,
            source_index,
            outputs,
            ctrl,
            reports,
            deferred: Default::default(),
            warned_dead_letters: 0,
            board,
        }
    }

    /// Sends a batch on the main output, stamping each event with this source's index.
    pub async fn send(&mut self, mut batch: Batch) -> anyhow::Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        for ev in &mut batch.events {
            ev.meta.source = self.source_index;
        }
        self.metrics.events_out.inc_by(batch.len() as u64);
        self.progress.events.fetch_add(batch.len() as u64, std::sync::atomic::Ordering::Relaxed);
        self.outputs.send(Port::MAIN, batch).await?;
        Ok(())
    }

    /// Sends records that could not be processed to the `dead_letter` output. When nothing
    /// reads that output, each record is logged instead (never dropped silently).
    pub async fn dead_letter(&mut self, events: Vec<Event>) -> anyhow::Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        self.metrics.dead_letters.inc_by(events.len() as u64);
        if self.outputs.is_connected(Port::DEAD_LETTER) {
            self.outputs.send(Port::DEAD_LETTER, Batch::new(events)).await?;
        } else {
            log_unrouted_dead_letters(&self.name, &events, &mut self.warned_dead_letters);
        }
        Ok(())
    }

    /// Waits for the next control message.
    pub async fn control(&mut self) -> Control {
        if let Some(c) = self.deferred.pop_front() {
            return c;
        }
        self.ctrl.recv().await.unwrap_or(Control::Stop)
    }

    /// The next control message, if one is waiting.
    pub fn try_control(&mut self) -> Option<Control> {
        if let Some(c) = self.deferred.pop_front() {
            return Some(c);
        }
        self.ctrl.try_recv().ok()
    }

    /// Injects barrier `epoch` after everything sent so far and records `position` for it.
    pub async fn barrier(&mut self, epoch: u64, position: Vec<u8>) -> anyhow::Result<()> {
        self.outputs.broadcast(Msg::Barrier(epoch)).await?;
        let _ = self
            .reports
            .send(Report::Snapshot { node: self.node, epoch, state: position, partitions: Vec::new() })
            .await;
        Ok(())
    }

    /// This source's index among the pipeline's sources (`meta.source` of its events).
    pub fn source_index(&self) -> u16 {
        self.source_index
    }

    /// Scale-out: the source starts reading `partition`. `states` (component name -> state) is
    /// what the partition's previous reader checkpointed; downstream transforms replace their
    /// state for the partition with it. Send before the partition's first events.
    pub async fn add_partition(&mut self, partition: u32, states: ComponentStates) -> anyhow::Result<()> {
        let change = PartitionChange::Added { source: self.source_index, partition, states: Arc::new(states) };
        self.outputs.broadcast(Msg::Partition(change)).await?;
        Ok(())
    }

    /// Scale-out: the source no longer reads `partition` (after the checkpoint that covers all
    /// it read of it is durable); downstream transforms drop its state.
    pub async fn remove_partition(&mut self, partition: u32) -> anyhow::Result<()> {
        self.board.forget(self.source_index, partition);
        let change = PartitionChange::Removed { source: self.source_index, partition };
        self.outputs.broadcast(Msg::Partition(change)).await?;
        Ok(())
    }

    /// Per-partition states of the last durable checkpoint, for storing with the partition's
    /// own checkpoint (read it when committing).
    pub fn partition_states(&self, partition: u32) -> Option<(u64, ComponentStates)> {
        self.board.get(self.source_index, partition)
    }

    /// The per-partition states of durable checkpoints (also usable after `run` returned, in
    /// [`Source::commit`]).
    pub fn partition_board(&self) -> Arc<PartitionBoard> {
        self.board.clone()
    }

    /// Asks for a checkpoint soon (e.g. unacknowledged deliveries near the broker's prefetch limit).
    pub fn request_checkpoint(&self) {
        // when the report channel is full the coordinator has plenty to do already; the next
        // request or tick starts the checkpoint
        let _ = self.reports.try_send(Report::RequestCheckpoint);
    }
}

/// Logs dead letters that no component consumes: the first ten of each component, then every
/// thousandth, so that a flood of bad input does not flood the log.
pub(crate) fn log_unrouted_dead_letters(component: &str, events: &[Event], warned: &mut u64) {
    for ev in events {
        *warned += 1;
        if *warned <= 10 || *warned % 1000 == 0 {
            tracing::warn!(
                component,
                reason = ev.get_str("reason").unwrap_or(""),
                origin = ev.get_str("origin").unwrap_or(""),
                count = *warned,
                "dead letter (route `{component}.dead_letter` to a sink to keep them)"
            );
        }
    }
}

/// Options for building one component.
pub struct BuildCx<'a> {
    pub pipeline: &'a str,
    pub name: &'a str,
    pub mode: Mode,
    /// State from the last checkpoint for this component (same configuration only).
    pub restored: Option<Vec<u8>>,
    /// Where checkpoints (and caches that live beside them) are kept, if configured.
    pub state: Option<checkpoint::CheckpointStore>,
    /// Identifies this process among instances writing to the same places.
    pub instance: &'a str,
    /// Sources: the fields the pipeline reads of their events (`None`: decode everything).
    pub projection: Option<std::sync::Arc<crate::projection::Projection>>,
    /// Transforms: keep state per input partition, because a source upstream hands its
    /// partitions over between instances (Event Hubs).
    pub partitioned: bool,
    pub metrics: ComponentMetrics,
    /// The epoch of the first checkpoint this run takes (epochs never repeat for a pipeline
    /// with a checkpoint store, so output named by epoch never takes an old name).
    pub first_epoch: u64,
}

#[cfg(test)]
impl<'a> BuildCx<'a> {
    /// A context for unit tests: live, no checkpoint store, instance `i`.
    pub(crate) fn for_test(name: &'a str, kind: &str, first_epoch: u64) -> BuildCx<'a> {
        BuildCx {
            pipeline: "p",
            name,
            mode: Mode::Live,
            restored: None,
            state: None,
            instance: "i",
            projection: None,
            partitioned: false,
            metrics: ComponentMetrics::new(name, kind),
            first_epoch,
        }
    }
}

/// How often transforms and sinks get ticks.
pub(crate) const TICK: Duration = Duration::from_secs(1);

/// An error and its causes on one line, like `{e:#}`, without the causes that a message already
/// quotes: object_store's errors repeat their source's text (`Generic LocalFileSystem error:
/// Unable to copy data to file: No space left on device (os error 28)`, then that source, then
/// its source), which would otherwise be printed three or four times.
pub fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut last = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !last.is_empty() && last.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
        last = text;
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn error_text_leaves_out_causes_a_message_already_quotes() {
        let io = std::io::Error::new(std::io::ErrorKind::StorageFull, "No space left on device (os error 28)");
        let inner =
            anyhow::Error::new(io).context("Unable to copy data to file: No space left on device (os error 28)");
        let e = inner.context("finishing /data/out/x.parquet");
        assert_eq!(
            super::error_text(&e),
            "finishing /data/out/x.parquet: Unable to copy data to file: No space left on device (os error 28)"
        );
        let plain = anyhow::anyhow!("refused").context("connecting");
        assert_eq!(super::error_text(&plain), format!("{plain:#}"));
    }

    use super::*;
    use std::collections::HashMap;

    fn st(v: u8) -> ComponentStates {
        ComponentStates::from([("w".to_string(), vec![v])])
    }

    #[test]
    fn the_partition_board_keeps_recent_epochs() {
        let b = PartitionBoard::default();
        b.publish(1, HashMap::from([((0, 1), st(1))]));
        b.publish(2, HashMap::from([((0, 2), st(2))]));
        assert_eq!(b.get_at(0, 1, 1), Some(st(1)));
        assert_eq!(b.get_at(0, 1, 2), Some(ComponentStates::new()), "epoch 2 is known and had no state for it");
        assert_eq!(b.get_at(0, 1, 3), None, "epoch 3 is not known yet");
        assert_eq!(b.get(0, 1), Some((1, st(1))), "the last epoch that had any");
        b.forget(0, 2);
        assert_eq!(b.get(0, 2), None);
        for e in 3..3 + PartitionBoard::HISTORY as u64 {
            b.publish(e, HashMap::new());
        }
        assert_eq!(b.get_at(0, 1, 1), None, "older epochs are dropped");
        assert_eq!(b.get_at(0, 1, 3), Some(ComponentStates::new()));
    }
}
