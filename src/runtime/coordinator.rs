//! Builds the component tasks of a plan, runs them, and drives checkpoints.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::checkpoint::{Checkpoint, CheckpointStore, ComponentState};
use super::io::{Inputs, Item, Msg, Outputs};
use super::{BuildCx, Control, Emitter, EndReason, Mode, Report, Sink, Source, SourceCx, Transform, TICK};
use crate::config::{ComponentConfig, Plan, Role};
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

struct NodeRt {
    name: String,
    role: Role,
    fingerprint: u64,
    ctrl: Option<mpsc::UnboundedSender<Control>>,
    done: bool,
    final_state: Option<Vec<u8>>,
    final_partitions: Vec<super::PartitionState>,
    metrics: ComponentMetrics,
    kind: String,
}

struct Pending {
    epoch: u64,
    started: Instant,
    waiting: HashSet<usize>,
    states: HashMap<usize, Vec<u8>>,
    /// Per-partition states: (source, partition) -> component -> state.
    partitions: HashMap<(u16, u32), BTreeMap<String, Vec<u8>>>,
    is_final: bool,
}

impl Pending {
    fn add_partitions(&mut self, component: &str, parts: &[super::PartitionState]) {
        for p in parts {
            self.partitions.entry((p.source, p.partition)).or_default().insert(component.to_string(), p.state.clone());
        }
    }
}

/// Runs a plan until its sources are exhausted or `stop` resolves, then writes the final
/// checkpoint, commits, and returns.
pub async fn run_pipeline(
    plan: &Plan,
    opts: RunOptions,
    stop: impl Future<Output = ()> + Send,
) -> anyhow::Result<RunSummary> {
    let store = match plan.checkpoint.as_ref().and_then(|c| c.url.as_ref().map(|u| (u, c))) {
        Some((url, c)) => {
            let loc =
                crate::storage::open(url, &c.storage).with_context(|| format!("opening the checkpoint store {url}"))?;
            Some(CheckpointStore::new(loc, &plan.name))
        }
        None => None,
    };
    let _lock = match &store {
        Some(s) => s.lock(&plan.name)?,
        None => None,
    };
    let interval = plan.checkpoint.as_ref().map(|c| c.interval()).unwrap_or(Duration::from_secs(10));
    let restored = match (&store, opts.reset_state) {
        (Some(s), false) => s.latest().await.context("reading the last checkpoint")?,
        _ => None,
    };
    if let Some(ck) = &restored {
        tracing::info!(epoch = ck.epoch, "resuming from checkpoint");
    }
    // Epochs only grow, also across `--reset-state`: a checkpoint numbered below the old ones
    // would be pruned as the oldest (and the next start would resume from the old state), and
    // output files, named by epoch, would take the names of the old run's files.
    let base_epoch = match (&restored, &store) {
        (Some(ck), _) => ck.epoch,
        (None, Some(s)) => s.latest_epoch().await.context("listing checkpoints")?.unwrap_or(0),
        (None, None) => 0,
    };
    if restored.is_none() && base_epoch > 0 {
        tracing::info!(after = base_epoch, "starting over (--reset-state): epochs continue after the old checkpoints");
    }
    let instance = instance_id(store.as_ref()).await?;
    let persist = store.is_some();

    let (report_tx, mut reports) = mpsc::unbounded_channel::<Report>();
    let n = plan.nodes.len();
    // edges
    let mut out_ports: Vec<Vec<Vec<mpsc::Sender<Msg>>>> =
        plan.nodes.iter().map(|p| vec![Vec::new(); p.ports.len().max(1)]).collect();
    let mut in_rx: Vec<Vec<mpsc::Receiver<Msg>>> = (0..n).map(|_| Vec::new()).collect();
    for (i, node) in plan.nodes.iter().enumerate() {
        for &(up, port) in &node.inputs {
            let (tx, rx) = mpsc::channel(opts.channel_capacity.max(1));
            out_ports[up][port].push(tx);
            in_rx[i].push(rx);
        }
    }

    let columnar = columnar_ports(plan);

    let mut tasks = JoinSet::new();
    let board = Arc::new(super::PartitionBoard::default());
    let mut rt: Vec<NodeRt> = Vec::with_capacity(n);
    let mut source_index = 0u16;
    let mut in_rx = in_rx.into_iter();
    let mut out_ports = out_ports.into_iter();
    for (i, node) in plan.nodes.iter().enumerate() {
        let inputs = Inputs::new(in_rx.next().unwrap());
        let outputs = Outputs::new(out_ports.next().unwrap());
        let metrics = ComponentMetrics::new(&node.name, node.kind);
        // state under another configuration is not restored, but a sink still gets it to finish
        // what the checkpoint covers (`Sink::recover`)
        let (restored_state, previous_state) = match restored.as_ref().and_then(|ck| ck.components.get(&node.name)) {
            Some(cs) if cs.fingerprint == node.fingerprint => (Some(cs.state.clone()), None),
            Some(cs) => {
                tracing::warn!(component = %node.name, "configuration changed since the checkpoint: state not restored");
                (None, (!cs.state.is_empty()).then(|| cs.state.clone()))
            }
            None => (None, None),
        };
        let bcx = BuildCx {
            pipeline: &plan.name,
            name: &node.name,
            mode: opts.mode,
            restored: restored_state.clone(),
            state: store.clone(),
            instance: &instance,
            metrics: metrics.clone(),
            // one per source and run: leaked so that events can point at it without counting
            projection: node.projection.clone().map(|p| &*Box::leak(Box::new(p))),
            partitioned: node.partitioned,
            first_epoch: base_epoch + 1,
        };
        let (ctrl_tx, ctrl_rx) = mpsc::unbounded_channel();
        let reports = report_tx.clone();
        let span = tracing::info_span!("component", name = %node.name, kind = node.kind);
        let mut has_ctrl = true;
        match &node.config {
            ComponentConfig::Source(cfg) => {
                let src = crate::sources::build(cfg, &bcx).await.with_context(|| format!("source {}", node.name))?;
                let cx = SourceCx {
                    name: node.name.as_str().into(),
                    mode: opts.mode,
                    metrics: metrics.clone(),
                    progress: opts.progress.clone(),
                    node: i,
                    source_index,
                    outputs,
                    ctrl: ctrl_rx,
                    reports: reports.clone(),
                    deferred: Default::default(),
                    warned_dead_letters: 0,
                    board: board.clone(),
                };
                source_index += 1;
                tasks.spawn(tracing::Instrument::instrument(source_task(src, cx, i, reports), span));
            }
            ComponentConfig::Transform(cfg) => {
                let t = crate::transforms::build(cfg, &bcx).with_context(|| format!("transform {}", node.name))?;
                has_ctrl = false;
                let ports = node.ports.len();
                tasks.spawn(tracing::Instrument::instrument(
                    transform_task(
                        t,
                        node.name.clone(),
                        inputs,
                        outputs,
                        (ports, columnar[i].clone()),
                        i,
                        reports,
                        opts.mode,
                        persist,
                        metrics.clone(),
                    ),
                    span,
                ));
            }
            ComponentConfig::Sink(cfg) => {
                let s = crate::sinks::build(cfg, &bcx).await.with_context(|| format!("sink {}", node.name))?;
                tasks.spawn(tracing::Instrument::instrument(
                    sink_task(
                        (s, cfg.accepts_columns()),
                        inputs,
                        ctrl_rx,
                        i,
                        reports,
                        (restored_state, previous_state),
                        metrics.clone(),
                    ),
                    span,
                ));
            }
        }
        rt.push(NodeRt {
            name: node.name.clone(),
            role: node.role,
            fingerprint: node.fingerprint,
            ctrl: has_ctrl.then_some(ctrl_tx),
            done: false,
            final_state: None,
            final_partitions: Vec::new(),
            metrics,
            kind: node.kind.to_string(),
        });
    }
    drop(report_tx);

    let mut epoch = base_epoch;
    let first_epoch = epoch;
    let mut pending: Option<Pending> = None;
    let mut stopping = false;
    let mut final_done = false;
    let mut failure: Option<String> = None;
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    let mut last_durable = Instant::now();
    // sources commit an epoch once every sink has committed it (output visible before positions move)
    let mut sink_committed: HashMap<usize, u64> =
        rt.iter().enumerate().filter(|(_, r)| r.role == Role::Sink).map(|(i, _)| (i, epoch)).collect();
    let mut sources_committed = epoch;
    let mut final_epoch: Option<u64> = None;
    tokio::pin!(stop);

    while !final_done {
        tokio::select! {
            r = reports.recv() => {
                let Some(r) = r else { break };
                match r {
                    Report::Snapshot { node, epoch: e, state, partitions } => {
                        if let Some(p) = pending.as_mut().filter(|p| p.epoch == e) {
                            p.states.insert(node, state);
                            p.add_partitions(&rt[node].name, &partitions);
                            p.waiting.remove(&node);
                        }
                    }
                    Report::Finished { node, state, partitions } => {
                        rt[node].done = true;
                        if let Some(p) = pending.as_mut() {
                            if p.waiting.remove(&node) {
                                p.states.insert(node, state.clone());
                                p.add_partitions(&rt[node].name, &partitions);
                            }
                        }
                        rt[node].final_state = Some(state);
                        rt[node].final_partitions = partitions;
                    }
                    Report::Drained { node } => {
                        rt[node].done = true;
                        if let Some(p) = pending.as_ref().filter(|p| p.waiting.contains(&node)) {
                            send(&rt[node], Control::Flush(p.epoch));
                        }
                    }
                    Report::Committed { node, epoch: e } => {
                        let c = sink_committed.entry(node).or_insert(e);
                        *c = (*c).max(e);
                        let all = sink_committed.values().copied().min().unwrap_or(e);
                        if all > sources_committed {
                            tracing::debug!(epoch = all, "every sink committed: sources commit");
                            sources_committed = all;
                            for r in rt.iter().filter(|r| r.role == Role::Source) {
                                send(r, Control::Commit(all));
                            }
                        }
                    }
                    Report::Failed { node, error } => {
                        tracing::error!(component = %rt[node].name, "{}", crate::secret::redact(&error));
                        failure = Some(format!("{}: {}", rt[node].name, error));
                        break;
                    }
                    Report::RequestCheckpoint => {
                        if pending.is_none() && !stopping {
                            epoch += 1;
                            pending = Some(start_epoch(&rt, epoch, false));
                        }
                    }
                }
            }
            _ = ticker.tick(), if pending.is_none() && !stopping => {
                if rt.iter().any(|r| r.role == Role::Source && !r.done) {
                    epoch += 1;
                    pending = Some(start_epoch(&rt, epoch, false));
                }
            }
            _ = &mut stop, if !stopping => {
                stopping = true;
                tracing::info!("stopping: sources end their streams, everything in flight is flushed");
                for r in rt.iter().filter(|r| r.role == Role::Source && !r.done) {
                    send(r, Control::Stop);
                }
            }
        }
        // a complete checkpoint is written, then committed
        if pending.as_ref().is_some_and(|p| p.waiting.is_empty()) {
            let p = pending.take().unwrap();
            let aligned = p.started.elapsed();
            let ck = Checkpoint {
                epoch: p.epoch,
                written_at: crate::time::now_nanos(),
                components: p
                    .states
                    .iter()
                    .map(|(&i, s)| {
                        (rt[i].name.clone(), ComponentState { fingerprint: rt[i].fingerprint, state: s.clone() })
                    })
                    .collect::<BTreeMap<_, _>>(),
            };
            let written = match &store {
                Some(s) => match s.write(&ck).await {
                    Ok(()) => true,
                    Err(e) => {
                        metrics::global().checkpoints_failed.inc();
                        tracing::error!("checkpoint {} not written, its output stays staged: {e:#}", p.epoch);
                        if p.is_final {
                            failure = Some(format!("final checkpoint could not be written: {e:#}"));
                        }
                        false
                    }
                },
                None => true,
            };
            if written {
                tracing::debug!(
                    epoch = p.epoch,
                    aligned_ms = aligned.as_secs_f64() * 1e3,
                    durable_ms = p.started.elapsed().as_secs_f64() * 1e3,
                    "checkpoint durable"
                );
                board.publish(p.epoch, p.partitions);
                let m = metrics::global();
                m.checkpoint_seconds.observe(p.started.elapsed().as_secs_f64());
                m.checkpoint_epoch.set(p.epoch as i64);
                last_durable = Instant::now();
                if sink_committed.is_empty() {
                    sources_committed = p.epoch;
                }
                for r in rt.iter().filter(|r| r.role != Role::Transform) {
                    if r.role == Role::Sink || sink_committed.is_empty() {
                        send(r, Control::Commit(p.epoch));
                    }
                }
                if p.is_final {
                    final_epoch = Some(p.epoch);
                }
            } else if p.is_final {
                final_done = true;
            }
        }
        if final_epoch.is_some_and(|f| sources_committed >= f) {
            final_done = true;
        }
        metrics::global().checkpoint_age_seconds.set(last_durable.elapsed().as_secs_f64());
        // when everything has drained, one last epoch covers the rest
        if pending.is_none() && !final_done && final_epoch.is_none() && rt.iter().all(|r| r.done) {
            epoch += 1;
            pending = Some(start_epoch(&rt, epoch, true));
        }
    }

    for r in &rt {
        send(r, Control::Shutdown);
    }
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
        epochs: epoch - first_epoch,
        restored_epoch: restored.map(|c| c.epoch),
        components: rt
            .iter()
            .map(|r| ComponentSummary {
                name: r.name.clone(),
                role: r.role,
                kind: r.kind.clone(),
                events_in: r.metrics.events_in.get(),
                events_out: r.metrics.events_out.get(),
                dead_letters: r.metrics.dead_letters.get(),
                late_events: r.metrics.late_events.get(),
            })
            .collect(),
    })
}

fn send(r: &NodeRt, c: Control) {
    if let Some(tx) = &r.ctrl {
        let _ = tx.send(c);
    }
}

fn start_epoch(rt: &[NodeRt], epoch: u64, is_final: bool) -> Pending {
    let mut p = Pending {
        epoch,
        started: Instant::now(),
        waiting: HashSet::new(),
        states: HashMap::new(),
        partitions: HashMap::new(),
        is_final,
    };
    for (i, r) in rt.iter().enumerate() {
        match (r.role, r.done) {
            (Role::Sink, true) => {
                p.waiting.insert(i);
                send(r, Control::Flush(epoch));
            }
            (Role::Sink, false) => {
                p.waiting.insert(i);
            }
            (Role::Source, false) => {
                p.waiting.insert(i);
                send(r, Control::Barrier(epoch));
            }
            (Role::Transform, false) => {
                p.waiting.insert(i);
            }
            (_, true) => {
                p.states.insert(i, r.final_state.clone().unwrap_or_default());
                let parts = r.final_partitions.clone();
                p.add_partitions(&r.name, &parts);
            }
        }
    }
    p
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

async fn source_task(mut src: Box<dyn Source>, mut cx: SourceCx, node: usize, reports: mpsc::UnboundedSender<Report>) {
    let reason = match src.run(&mut cx).await {
        Ok(r) => r,
        Err(e) => {
            let _ = reports.send(Report::Failed { node, error: format!("{e:#}") });
            return;
        }
    };
    let _ = cx.outputs.broadcast(Msg::End(reason)).await;
    let _ = reports.send(Report::Finished { node, state: src.snapshot(), partitions: Vec::new() });
    loop {
        match cx.control().await {
            Control::Commit(e) => {
                if let Err(err) = src.commit(e).await {
                    let _ = reports.send(Report::Failed { node, error: format!("commit of epoch {e}: {err:#}") });
                    return;
                }
            }
            Control::Shutdown => return,
            _ => {}
        }
    }
}

/// Per node and output port: whether every consumer of the port reads rows as Arrow columns
/// ([`crate::sinks::SinkConfig::accepts_columns`]), so that a transform may emit them so.
pub(crate) fn columnar_ports(plan: &Plan) -> Vec<Vec<bool>> {
    plan.nodes
        .iter()
        .enumerate()
        .map(|(i, node)| {
            (0..node.ports.len().max(1))
                .map(|p| {
                    let mut consumers = plan.nodes.iter().filter(|n| n.inputs.contains(&(i, p))).peekable();
                    consumers.peek().is_some()
                        && consumers.all(|n| matches!(&n.config, ComponentConfig::Sink(s) if s.accepts_columns()))
                })
                .collect()
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
async fn transform_task(
    mut t: Box<dyn Transform>,
    name: String,
    mut inputs: Inputs,
    outputs: Outputs,
    (ports, columnar): (usize, Vec<bool>),
    node: usize,
    reports: mpsc::UnboundedSender<Report>,
    mode: Mode,
    persist: bool,
    metrics: ComponentMetrics,
) {
    let mut em = Emitter::new(ports).with_columnar(&columnar);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let live = mode == Mode::Live;
    let fail = |e: String| {
        let _ = reports.send(Report::Failed { node, error: e });
    };
    loop {
        let item = tokio::select! {
            it = inputs.recv() => it,
            _ = tick.tick(), if live => {
                t.on_tick(crate::time::now_nanos(), &mut em);
                if emit(&mut em, &outputs, &metrics).await.is_err() { return; }
                continue;
            }
        };
        match item {
            Item::Batch(b) => {
                if b.columns.is_some() {
                    return fail(format!("{name} was sent rows as columns, which no transform reads (a runtime bug)"));
                }
                metrics.events_in.inc_by(b.len() as u64);
                let batch = Arc::try_unwrap(b).unwrap_or_else(|shared| (*shared).clone());
                let t0 = Instant::now();
                t.process(batch, &mut em);
                metrics.batch_seconds.observe(t0.elapsed().as_secs_f64());
                if emit(&mut em, &outputs, &metrics).await.is_err() {
                    return;
                }
            }
            Item::Barrier(e) => {
                match t.snapshot().and_then(|state| Ok((state, partition_states(t.as_ref())?))) {
                    Ok((state, partitions)) => {
                        let _ = reports.send(Report::Snapshot { node, epoch: e, state, partitions });
                    }
                    Err(err) => return fail(format!("snapshot: {err:#}")),
                }
                if outputs.broadcast(Msg::Barrier(e)).await.is_err() {
                    return;
                }
            }
            Item::Partition(change) => {
                let r = match &change {
                    super::PartitionChange::Added { source, partition, states } => t.set_partition_state(
                        *source,
                        *partition,
                        Some(states.get(name.as_str()).map(Vec::as_slice).unwrap_or(&[])),
                    ),
                    super::PartitionChange::Removed { source, partition } => {
                        t.set_partition_state(*source, *partition, None)
                    }
                };
                if let Err(err) = r {
                    return fail(format!("adopting partition state: {err:#}"));
                }
                if outputs.broadcast(Msg::Partition(change)).await.is_err() {
                    return;
                }
            }
            Item::End(reason) => {
                let flush = reason == EndReason::Exhausted || !persist;
                t.on_end(flush, &mut em);
                let _ = emit(&mut em, &outputs, &metrics).await;
                let _ = outputs.broadcast(Msg::End(reason)).await;
                match t.snapshot().and_then(|state| Ok((state, partition_states(t.as_ref())?))) {
                    Ok((state, partitions)) => {
                        let _ = reports.send(Report::Finished { node, state, partitions });
                    }
                    Err(err) => fail(format!("snapshot: {err:#}")),
                }
                return;
            }
        }
    }
}

fn partition_states(t: &dyn Transform) -> anyhow::Result<Vec<super::PartitionState>> {
    t.state_partitions()
        .into_iter()
        .map(|(source, partition)| {
            Ok(super::PartitionState { source, partition, state: t.partition_state(source, partition)? })
        })
        .collect()
}

async fn emit(em: &mut Emitter, outputs: &Outputs, metrics: &ComponentMetrics) -> Result<(), super::io::Disconnected> {
    for (port, batches) in em.take_batches().into_iter().enumerate() {
        for batch in batches {
            if batch.is_empty() {
                continue;
            }
            if port == 0 {
                metrics.events_out.inc_by(batch.len() as u64);
            }
            outputs.send(port, batch).await?;
        }
    }
    Ok(())
}

async fn sink_task(
    (mut s, accepts_columns): (Box<dyn Sink>, bool),
    mut inputs: Inputs,
    mut ctrl: mpsc::UnboundedReceiver<Control>,
    node: usize,
    reports: mpsc::UnboundedSender<Report>,
    (restored, previous): (Option<Vec<u8>>, Option<Vec<u8>>),
    metrics: ComponentMetrics,
) {
    let fail = |e: anyhow::Error| {
        let _ = reports.send(Report::Failed { node, error: format!("{e:#}") });
    };
    if let Some(prev) = previous {
        if let Err(e) = s.recover(&prev).await {
            metrics.errors.inc();
            tracing::error!(
                "the output staged by the last checkpoint under the sink's previous configuration was not committed: {}",
                crate::secret::redact(&format!("{e:#}"))
            );
        }
    }
    if let Err(e) = s.start(restored.as_deref()).await {
        return fail(e);
    }
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut drained = false;
    loop {
        tokio::select! {
            c = ctrl.recv() => match c {
                Some(Control::Flush(e)) => match s.flush(e).await {
                    Ok(state) => { let _ = reports.send(Report::Snapshot { node, epoch: e, state, partitions: Vec::new() }); }
                    Err(err) => return fail(err),
                },
                Some(Control::Commit(e)) => match s.commit(e).await {
                    Ok(()) => { let _ = reports.send(Report::Committed { node, epoch: e }); }
                    Err(err) => return fail(err),
                },
                Some(Control::Shutdown) | None => {
                    if let Err(err) = s.close().await { fail(err) }
                    return;
                }
                Some(_) => {}
            },
            item = inputs.recv(), if !drained => match item {
                Item::Batch(b) => {
                    if b.columns.is_some() && !accepts_columns {
                        return fail(anyhow::anyhow!("this sink was sent rows as columns, which it does not read (a runtime bug)"));
                    }
                    metrics.events_in.inc_by(b.len() as u64);
                    let t0 = Instant::now();
                    if let Err(err) = s.write(b).await { return fail(err) }
                    metrics.batch_seconds.observe(t0.elapsed().as_secs_f64());
                }
                Item::Barrier(e) => match s.flush(e).await {
                    Ok(state) => { let _ = reports.send(Report::Snapshot { node, epoch: e, state, partitions: Vec::new() }); }
                    Err(err) => return fail(err),
                },
                Item::Partition(_) => {}
                Item::End(reason) => {
                    if let Err(err) = s.on_end(reason).await { return fail(err) }
                    drained = true;
                    let _ = reports.send(Report::Drained { node });
                }
            },
            _ = tick.tick() => if let Err(err) = s.on_tick().await { return fail(err) },
        }
    }
}
