//! The task each component runs in: what a source, a transform and a sink do with batches,
//! barriers, partition changes, the end of their input and the coordinator's controls.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::coordinator::Restored;
use super::io::{Disconnected, Inputs, Item, Msg, Outputs, PartitionChange};
use super::{Control, Emitter, EndReason, PartitionState, Port, Report, Sink, Source, SourceCx, Transform, TICK};
use crate::metrics::ComponentMetrics;

/// Sends a report; the coordinator reads reports until every task has ended.
async fn report(reports: &mpsc::Sender<Report>, r: Report) {
    let _ = reports.send(r).await;
}

/// A source: runs until its input is exhausted or it is stopped, then serves commits of the
/// remaining epochs until shutdown.
pub(super) async fn source(mut src: Box<dyn Source>, mut cx: SourceCx, node: usize, reports: mpsc::Sender<Report>) {
    let reason = match src.run(&mut cx).await {
        Ok(r) => r,
        Err(e) => return report(&reports, Report::Failed { node, error: super::error_text(&e) }).await,
    };
    let _ = cx.outputs.broadcast(Msg::End(reason)).await;
    report(&reports, Report::Finished { node, state: src.snapshot(), partitions: Vec::new() }).await;
    loop {
        match cx.control().await {
            Control::Commit(e) => {
                if let Err(err) = src.commit(e).await {
                    let error = format!("commit of epoch {e}: {}", super::error_text(&err));
                    return report(&reports, Report::Failed { node, error }).await;
                }
            }
            Control::Shutdown => return,
            _ => {}
        }
    }
}

/// What a transform's task needs besides the transform and its edges.
pub(super) struct TransformCx {
    pub name: String,
    pub node: usize,
    pub ports: Vec<&'static str>,
    pub columnar: Vec<bool>,
    pub reports: mpsc::Sender<Report>,
    /// Ticks (idle-partition detection) run in live mode only.
    pub live: bool,
    /// A checkpoint store exists: a stop keeps state for it instead of flushing.
    pub persist: bool,
    pub metrics: ComponentMetrics,
}

impl TransformCx {
    async fn fail(&self, error: String) {
        report(&self.reports, Report::Failed { node: self.node, error }).await
    }

    /// Reports the transform's state taken for a checkpoint (by [`snapshot`]).
    async fn report_snapshot(&self, taken: Result<Report, String>) -> Result<(), ()> {
        match taken {
            Ok(r) => {
                report(&self.reports, r).await;
                Ok(())
            }
            Err(e) => {
                self.fail(e).await;
                Err(())
            }
        }
    }
}

/// The transform's state for checkpoint `epoch`, or its final state (`None`).
fn snapshot(t: &dyn Transform, node: usize, epoch: Option<u64>) -> Result<Report, String> {
    let state = t.snapshot().map_err(|e| format!("snapshot: {e:#}"))?;
    let partitions = partition_states(t).map_err(|e| format!("snapshot: {e:#}"))?;
    Ok(match epoch {
        Some(epoch) => Report::Snapshot { node, epoch, state, partitions },
        None => Report::Finished { node, state, partitions },
    })
}

/// A batch that took this long makes the next one run with `block_in_place` (see
/// [`transform`]); below it, the hand-off would cost more than it frees.
const SLOW_BATCH: Duration = Duration::from_millis(20);

fn multi_thread() -> bool {
    tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
}

/// A transform: processes batches in order, snapshots at barriers, adopts partition state.
pub(super) async fn transform(mut t: Box<dyn Transform>, cx: TransformCx, mut inputs: Inputs, outputs: Outputs) {
    let mut em = Emitter::new(&cx.ports).with_columnar(&cx.columnar);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // until a batch shows the transform is quick, as if it were not
    let mut last_took = SLOW_BATCH;
    loop {
        let item = tokio::select! {
            it = inputs.recv() => it,
            _ = tick.tick(), if cx.live => {
                t.on_tick(crate::time::now_nanos(), &mut em);
                if emit(&mut em, &outputs, &cx.metrics).await.is_err() { return; }
                continue;
            }
        };
        match item {
            Item::Batch(b) => {
                if b.columns.is_some() {
                    let error =
                        format!("{} was sent rows as columns, which no transform reads (a runtime bug)", cx.name);
                    return cx.fail(error).await;
                }
                cx.metrics.events_in.inc_by(b.len() as u64);
                let batch = Arc::try_unwrap(b).unwrap_or_else(|shared| (*shared).clone());
                let t0 = Instant::now();
                if last_took >= SLOW_BATCH && multi_thread() {
                    // A batch that takes long (a heavy jq program) would hold this worker, and
                    // with it the task it woke last: tokio keeps that one in the worker's own
                    // slot, where no other worker takes it. It was the source's, which then
                    // renewed no Service Bus lock for 27 s. block_in_place hands the worker's
                    // queue to another thread first.
                    tokio::task::block_in_place(|| t.process(batch, &mut em));
                } else {
                    t.process(batch, &mut em);
                }
                last_took = t0.elapsed();
                cx.metrics.batch_seconds.observe(last_took.as_secs_f64());
                if emit(&mut em, &outputs, &cx.metrics).await.is_err() {
                    return;
                }
            }
            Item::Barrier(e) => {
                let taken = snapshot(t.as_ref(), cx.node, Some(e));
                if cx.report_snapshot(taken).await.is_err() || outputs.broadcast(Msg::Barrier(e)).await.is_err() {
                    return;
                }
            }
            Item::Partition(change) => {
                let adopted =
                    adopt(t.as_mut(), &cx.name, &change).map_err(|e| format!("adopting partition state: {e:#}"));
                if let Err(error) = adopted {
                    return cx.fail(error).await;
                }
                if outputs.broadcast(Msg::Partition(change)).await.is_err() {
                    return;
                }
            }
            Item::End(reason) => {
                let flush = reason == EndReason::Exhausted || !cx.persist;
                t.on_end(flush, &mut em);
                let _ = emit(&mut em, &outputs, &cx.metrics).await;
                let _ = outputs.broadcast(Msg::End(reason)).await;
                let taken = snapshot(t.as_ref(), cx.node, None);
                let _ = cx.report_snapshot(taken).await;
                return;
            }
        }
    }
}

/// Replaces (or drops) the state a transform keeps for a partition that moved.
fn adopt(t: &mut dyn Transform, name: &str, change: &PartitionChange) -> anyhow::Result<()> {
    match change {
        PartitionChange::Added { source, partition, states } => {
            t.set_partition_state(*source, *partition, Some(states.get(name).map(Vec::as_slice).unwrap_or(&[])))
        }
        PartitionChange::Removed { source, partition } => t.set_partition_state(*source, *partition, None),
    }
}

fn partition_states(t: &dyn Transform) -> anyhow::Result<Vec<PartitionState>> {
    t.state_partitions()
        .into_iter()
        .map(|(source, partition)| {
            Ok(PartitionState { source, partition, state: t.partition_state(source, partition)? })
        })
        .collect()
}

/// Sends what the emitter collected, port by port, in order.
async fn emit(em: &mut Emitter, outputs: &Outputs, metrics: &ComponentMetrics) -> Result<(), Disconnected> {
    for (port, batches) in em.take_batches().into_iter().enumerate() {
        for batch in batches {
            if batch.is_empty() {
                continue;
            }
            if port == Port::MAIN.index {
                metrics.events_out.inc_by(batch.len() as u64);
            }
            outputs.send_at(port, batch).await?;
        }
    }
    Ok(())
}

/// What a sink's task needs besides the sink and its edges.
pub(super) struct SinkCx {
    pub node: usize,
    pub accepts_columns: bool,
    pub reports: mpsc::Sender<Report>,
    pub restored: Restored,
    pub metrics: ComponentMetrics,
}

impl SinkCx {
    async fn fail(&self, e: anyhow::Error) {
        report(&self.reports, Report::Failed { node: self.node, error: super::error_text(&e) }).await
    }

    async fn flush(&self, s: &mut dyn Sink, epoch: u64) -> Result<(), ()> {
        match s.flush(epoch).await {
            Ok(state) => {
                report(&self.reports, Report::Snapshot { node: self.node, epoch, state, partitions: Vec::new() }).await;
                Ok(())
            }
            Err(err) => {
                self.fail(err).await;
                Err(())
            }
        }
    }

    /// Finishes what the last checkpoint staged, then starts the sink.
    async fn start(&self, s: &mut dyn Sink) -> Result<(), ()> {
        if let Some(prev) = &self.restored.previous {
            if let Err(e) = s.recover(prev).await {
                self.metrics.errors.inc();
                tracing::error!(
                    "the output staged by the last checkpoint under the sink's previous configuration was not committed: {}",
                    crate::secret::redact(&format!("{e:#}"))
                );
            }
        }
        match s.start(self.restored.state.as_deref()).await {
            Ok(()) => Ok(()),
            Err(e) => {
                self.fail(e).await;
                Err(())
            }
        }
    }
}

/// A sink: writes batches, flushes at barriers (or when told to after its input ended),
/// commits when told to, until shutdown.
pub(super) async fn sink(mut s: Box<dyn Sink>, cx: SinkCx, mut inputs: Inputs, mut ctrl: mpsc::Receiver<Control>) {
    if cx.start(s.as_mut()).await.is_err() {
        return;
    }
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut drained = false;
    loop {
        tokio::select! {
            c = ctrl.recv() => match c {
                Some(Control::Flush(e)) => if cx.flush(s.as_mut(), e).await.is_err() { return },
                Some(Control::Commit(e)) => match s.commit(e).await {
                    Ok(()) => report(&cx.reports, Report::Committed { node: cx.node, epoch: e }).await,
                    Err(err) => return cx.fail(err).await,
                },
                Some(Control::Shutdown) | None => {
                    if let Err(err) = s.close().await { cx.fail(err).await }
                    return;
                }
                Some(_) => {}
            },
            item = inputs.recv(), if !drained => match item {
                Item::Batch(b) => {
                    if b.columns.is_some() && !cx.accepts_columns {
                        return cx.fail(anyhow::anyhow!("this sink was sent rows as columns, which it does not read (a runtime bug)")).await;
                    }
                    cx.metrics.events_in.inc_by(b.len() as u64);
                    let t0 = Instant::now();
                    if let Err(err) = s.write(b).await { return cx.fail(err).await }
                    cx.metrics.batch_seconds.observe(t0.elapsed().as_secs_f64());
                }
                Item::Barrier(e) => if cx.flush(s.as_mut(), e).await.is_err() { return },
                Item::Partition(_) => {}
                Item::End(reason) => {
                    if let Err(err) = s.on_end(reason).await { return cx.fail(err).await }
                    drained = true;
                    report(&cx.reports, Report::Drained { node: cx.node }).await;
                }
            },
            _ = tick.tick() => if let Err(err) = s.on_tick().await { return cx.fail(err).await },
        }
    }
}
