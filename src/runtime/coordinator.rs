//! Runs a wired [`Graph`]: spawns one task per component and drives the checkpoint
//! [`Protocol`] with what the components report, a timer and the stop signal.
//!
//! What a run starts from (the checkpoint store, its lock, the restored checkpoint, the first
//! epoch, the instance id) is opened by [`Session::open`] before the components are built,
//! because building them needs it; see [`crate::assemble`] for how a plan becomes a graph.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::checkpoint::{Checkpoint, CheckpointStore, LocalLock};
use super::io::{Inputs, Msg, Outputs};
use super::protocol::{Action, NodeInfo, Protocol};
use super::tasks::{self, TransformCx};
use super::{Control, Mode, PartitionBoard, Report, Role, Sink, Source, SourceCx, Transform, REPORTS};
use crate::metrics::{self, ComponentMetrics, SharedProgress};

/// How to run a plan.
#[derive(Clone)]
pub struct RunOptions {
    pub mode: Mode,
    /// Batches buffered per edge.
    pub channel_capacity: usize,
    /// Ignore existing checkpoints and start over.
    pub reset_state: bool,
    pub progress: SharedProgress,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions { mode: Mode::Replay, channel_capacity: 4, reset_state: false, progress: Default::default() }
    }
}

/// What a finished run did, per component.
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    pub epochs: u64,
    pub restored_epoch: Option<u64>,
    pub components: Vec<ComponentSummary>,
}

#[derive(Debug, Clone)]
pub struct ComponentSummary {
    pub name: String,
    pub role: Role,
    pub kind: String,
    pub events_in: u64,
    pub events_out: u64,
    pub dead_letters: u64,
    pub late_events: u64,
}

/// What one run starts from: the checkpoint store (locked while the session lives), the
/// checkpoint restored from it, and the numbering of new epochs.
pub struct Session {
    pub store: Option<CheckpointStore>,
    _lock: Option<LocalLock>,
    pub restored: Option<Checkpoint>,
    /// The epoch before this run's first (epochs only grow, also across `--reset-state`).
    pub base_epoch: u64,
    /// Identifies this process among instances writing to the same places.
    pub instance: String,
    pub interval: Duration,
}

/// A component's restored state: for the same configuration (`state`), or, from another
/// configuration, the state a sink may still finish committing (`previous`, see
/// [`Sink::recover`]).
#[derive(Debug, Default, Clone)]
pub struct Restored {
    pub state: Option<Vec<u8>>,
    pub previous: Option<Vec<u8>>,
}

impl Session {
    /// Opens and locks the store, reads the last checkpoint (unless `reset`).
    pub async fn open(
        pipeline: &str,
        store: Option<CheckpointStore>,
        interval: Duration,
        reset: bool,
    ) -> anyhow::Result<Session> {
        let lock = match &store {
            Some(s) => s.lock(pipeline)?,
            None => None,
        };
        let restored = match (&store, reset) {
            (Some(s), false) => s.latest().await.context("reading the last checkpoint")?,
            _ => None,
        };
        if let Some(ck) = &restored {
            tracing::info!(epoch = ck.epoch, "resuming from checkpoint");
        }
        // A checkpoint numbered below the old ones would be pruned as the oldest (and the next
        // start would resume from the old state), and output files, named by epoch, would take
        // the names of the old run's files.
        let base_epoch = match (&restored, &store) {
            (Some(ck), _) => ck.epoch,
            (None, Some(s)) => s.latest_epoch().await.context("listing checkpoints")?.unwrap_or(0),
            (None, None) => 0,
        };
        if restored.is_none() && base_epoch > 0 {
            tracing::info!(
                after = base_epoch,
                "starting over (--reset-state): epochs continue after the old checkpoints"
            );
        }
        let instance = instance_id(store.as_ref()).await?;
        Ok(Session { store, _lock: lock, restored, base_epoch, instance, interval })
    }

    /// The state the last checkpoint holds for a component with this name and configuration.
    pub fn restored(&self, name: &str, fingerprint: u64) -> Restored {
        match self.restored.as_ref().and_then(|ck| ck.components.get(name)) {
            Some(cs) if cs.fingerprint == fingerprint => Restored { state: Some(cs.state.clone()), previous: None },
            Some(cs) => {
                tracing::warn!(component = name, "configuration changed since the checkpoint: state not restored");
                Restored { state: None, previous: (!cs.state.is_empty()).then(|| cs.state.clone()) }
            }
            None => Restored::default(),
        }
    }
}

/// A built component.
pub enum Component {
    Source(Box<dyn Source>),
    Transform(Box<dyn Transform>),
    /// A sink, and whether it reads rows as Arrow columns.
    Sink(Box<dyn Sink>, bool),
}

impl Component {
    pub fn role(&self) -> Role {
        match self {
            Component::Source(_) => Role::Source,
            Component::Transform(_) => Role::Transform,
            Component::Sink(..) => Role::Sink,
        }
    }
}

/// One component of a graph, built and ready to run.
pub struct Node {
    pub name: String,
    pub kind: &'static str,
    pub fingerprint: u64,
    /// Upstream (node index, output port); every input comes earlier in the graph.
    pub inputs: Vec<(usize, usize)>,
    /// Output ports, by name: `""` (main) first.
    pub ports: Vec<&'static str>,
    /// Per output port: whether every consumer reads rows as Arrow columns.
    pub columnar: Vec<bool>,
    pub component: Component,
    pub restored: Restored,
    pub metrics: ComponentMetrics,
}

/// The components of a pipeline and their edges.
pub struct Graph {
    pub nodes: Vec<Node>,
}

/// Runs a graph until its sources are exhausted or `stop` resolves, then writes the final
/// checkpoint, commits, and returns.
pub async fn run(
    graph: Graph,
    session: Session,
    opts: RunOptions,
    stop: impl Future<Output = ()> + Send,
) -> anyhow::Result<RunSummary> {
    let (report_tx, mut reports) = mpsc::channel::<Report>(REPORTS);
    let board = Arc::new(PartitionBoard::default());
    let summary_of: Vec<(String, Role, &'static str, ComponentMetrics)> =
        graph.nodes.iter().map(|n| (n.name.clone(), n.component.role(), n.kind, n.metrics.clone())).collect();
    let infos: Vec<NodeInfo> = graph
        .nodes
        .iter()
        .zip(&summary_of)
        .map(|(n, (name, role, ..))| NodeInfo { name: name.clone(), role: *role, fingerprint: n.fingerprint })
        .collect();
    let (mut tasks, ctrl) = spawn(graph, &session, &opts, &board, report_tx);
    let mut proto = Protocol::new(infos, session.base_epoch);

    let interval = session.interval;
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    let mut last_durable = Instant::now();
    // the checkpoint age gauge moves every second, not only when something happens
    let mut age = tokio::time::interval(Duration::from_secs(1));
    age.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tokio::pin!(stop);
    let mut stop_asked = false;
    while !proto.is_finished() {
        let actions = tokio::select! {
            r = reports.recv() => match r {
                Some(Report::Failed { node, error }) => {
                    tracing::error!(component = %summary_of[node].0, "{}", crate::secret::redact(&error));
                    proto.report(Report::Failed { node, error })
                }
                Some(r) => proto.report(r),
                None => break,
            },
            _ = ticker.tick(), if proto.idle() => proto.tick(),
            _ = age.tick() => Vec::new(),
            _ = &mut stop, if !stop_asked => {
                stop_asked = true;
                tracing::info!("stopping: sources end their streams, everything in flight is flushed");
                proto.stop()
            }
        };
        carry_out(actions, &mut proto, session.store.as_ref(), &ctrl, &board, &mut last_durable).await;
        metrics::global().checkpoint_age_seconds.set(last_durable.elapsed().as_secs_f64());
    }

    for tx in ctrl.iter().flatten() {
        let _ = tx.try_send(Control::Shutdown);
    }
    let mut failure = proto.failure().map(str::to_string);
    if failure.is_some() {
        tasks.abort_all();
    }
    while let Some(res) = tasks.join_next().await {
        if let Err(e) = res {
            if e.is_panic() && failure.is_none() {
                failure = Some(format!("a component panicked: {e}"));
            }
        }
    }
    if let Some(f) = failure {
        anyhow::bail!(crate::secret::redact(&f));
    }
    Ok(RunSummary {
        epochs: proto.epochs(),
        restored_epoch: session.restored.as_ref().map(|c| c.epoch),
        components: summary_of
            .into_iter()
            .map(|(name, role, kind, m)| ComponentSummary {
                name,
                role,
                kind: kind.to_string(),
                events_in: m.events_in.get(),
                events_out: m.events_out.get(),
                dead_letters: m.dead_letters.get(),
                late_events: m.late_events.get(),
            })
            .collect(),
    })
}

/// Carries out the protocol's actions, feeding the outcome of each checkpoint write back to it.
async fn carry_out(
    mut actions: Vec<Action>,
    proto: &mut Protocol,
    store: Option<&CheckpointStore>,
    ctrl: &[Option<mpsc::Sender<Control>>],
    board: &PartitionBoard,
    last_durable: &mut Instant,
) {
    while !actions.is_empty() {
        let mut next = Vec::new();
        for a in actions {
            match a {
                Action::Send(node, c) => {
                    if let Some(tx) = &ctrl[node] {
                        // a component that has exited no longer needs it
                        let _ = tx.send(c).await;
                    }
                }
                Action::Write(ck) => {
                    let result = match store {
                        Some(s) => s.write(&ck).await.map_err(|e| {
                            metrics::global().checkpoints_failed.inc();
                            super::error_text(&e)
                        }),
                        None => Ok(()),
                    };
                    next.extend(proto.written(ck.epoch, result));
                }
                Action::Durable { epoch, started, partitions } => {
                    tracing::debug!(epoch, durable_ms = started.elapsed().as_secs_f64() * 1e3, "checkpoint durable");
                    board.publish(epoch, partitions);
                    let m = metrics::global();
                    m.checkpoint_seconds.observe(started.elapsed().as_secs_f64());
                    m.checkpoint_epoch.set(epoch as i64);
                    *last_durable = Instant::now();
                }
            }
        }
        actions = next;
    }
}

/// Wires the edges and spawns one task per component; returns the tasks and, per component,
/// its control channel (sources and sinks).
fn spawn(
    graph: Graph,
    session: &Session,
    opts: &RunOptions,
    board: &Arc<PartitionBoard>,
    reports: mpsc::Sender<Report>,
) -> (JoinSet<()>, Vec<Option<mpsc::Sender<Control>>>) {
    let n = graph.nodes.len();
    let mut out_ports: Vec<Vec<Vec<mpsc::Sender<Msg>>>> =
        graph.nodes.iter().map(|p| vec![Vec::new(); p.ports.len().max(1)]).collect();
    let mut in_rx: Vec<Vec<mpsc::Receiver<Msg>>> = (0..n).map(|_| Vec::new()).collect();
    for (i, node) in graph.nodes.iter().enumerate() {
        for &(up, port) in &node.inputs {
            let (tx, rx) = mpsc::channel(opts.channel_capacity.max(1));
            out_ports[up][port].push(tx);
            in_rx[i].push(rx);
        }
    }
    let mut tasks = JoinSet::new();
    let mut ctrl = Vec::with_capacity(n);
    let mut source_index = 0u16;
    for (i, ((node, rx), ports)) in graph.nodes.into_iter().zip(in_rx).zip(out_ports).enumerate() {
        let inputs = Inputs::new(rx);
        let outputs = Outputs::new(ports, node.ports.clone());
        let span = tracing::info_span!("component", name = %node.name, kind = node.kind);
        let (ctrl_tx, ctrl_rx) = mpsc::channel(REPORTS);
        let reports = reports.clone();
        match node.component {
            Component::Source(src) => {
                let cx = SourceCx::new(
                    node.name.as_str().into(),
                    opts,
                    node.metrics,
                    (i, source_index),
                    outputs,
                    ctrl_rx,
                    reports.clone(),
                    board.clone(),
                );
                source_index += 1;
                tasks.spawn(tracing::Instrument::instrument(tasks::source(src, cx, i, reports), span));
                ctrl.push(Some(ctrl_tx));
            }
            Component::Transform(t) => {
                let cx = TransformCx {
                    name: node.name,
                    node: i,
                    ports: node.ports,
                    columnar: node.columnar,
                    reports,
                    live: opts.mode == Mode::Live,
                    persist: session.store.is_some(),
                    metrics: node.metrics,
                };
                tasks.spawn(tracing::Instrument::instrument(tasks::transform(t, cx, inputs, outputs), span));
                ctrl.push(None);
            }
            Component::Sink(s, accepts_columns) => {
                let cx =
                    tasks::SinkCx { node: i, accepts_columns, reports, restored: node.restored, metrics: node.metrics };
                tasks.spawn(tracing::Instrument::instrument(tasks::sink(s, cx, inputs, ctrl_rx), span));
                ctrl.push(Some(ctrl_tx));
            }
        }
    }
    (tasks, ctrl)
}

/// A stable id for this process's outputs: `CENTRALFLOW_INSTANCE`, else one kept in the state
/// store, else a random one.
async fn instance_id(store: Option<&CheckpointStore>) -> anyhow::Result<String> {
    if let Ok(v) = std::env::var("CENTRALFLOW_INSTANCE") {
        if !v.is_empty() {
            return Ok(super::checkpoint::sanitize(&v));
        }
    }
    let fresh = || format!("{:08x}", rand::random::<u32>());
    match store {
        Some(s) => match s.get_aux("instance-id").await? {
            Some(b) => Ok(String::from_utf8_lossy(&b).trim().to_string()),
            None => {
                let id = fresh();
                s.put_aux("instance-id", id.clone().into_bytes()).await?;
                Ok(id)
            }
        },
        None => Ok(fresh()),
    }
}
