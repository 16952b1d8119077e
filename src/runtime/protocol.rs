//! The checkpoint protocol as a state machine: no tasks, no channels, no I/O.
//!
//! The coordinator ([`super::coordinator`]) feeds it what happens (a component's [`Report`], a
//! timer tick, a stop request, the result of writing a checkpoint) and carries out the
//! [`Action`]s it returns (send a [`Control`] to a component, write a checkpoint). Everything
//! exactly-once depends on lives here, so that it can be tested without spawning anything:
//!
//! 1. **Barrier issued.** An epoch starts on a tick, on a source's request, or (final epoch) once
//!    every component has finished. Live sources get `Barrier(n)`; sinks whose inputs already
//!    ended get `Flush(n)`; finished components contribute their final state.
//! 2. **Reports collected.** Each component reports its state for epoch `n` (`Snapshot`), or
//!    finishes (`Finished`), or, for sinks, drains (then it is told to `Flush(n)`).
//! 3. **Durable.** When nothing is awaited the checkpoint is written ([`Action::Write`]); the
//!    coordinator reports the outcome with [`Protocol::written`].
//! 4. **Committed.** Sinks get `Commit(n)` once it is durable; sources get `Commit(n)` only when
//!    every sink has committed `n` (output visible before positions move). Without sinks, sources
//!    commit when the checkpoint is durable.
//! 5. **Final epoch.** After every component finished, one last epoch covers the rest; the run
//!    ends when the sources have committed it. A final checkpoint that cannot be written fails
//!    the run (its output stays staged for the next start).
//! 6. **Failure.** A component's failure ends the run at once; later reports change nothing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

use super::checkpoint::{Checkpoint, ComponentState};
use super::{ComponentStates, Control, PartitionState, Report, Role};

/// What the protocol knows of one component.
#[derive(Debug, Clone)]
pub(crate) struct NodeInfo {
    pub name: String,
    pub role: Role,
    /// Stored with its state: state is restored only into the same configuration.
    pub fingerprint: u64,
}

/// Something the coordinator must do.
#[derive(Debug)]
pub(crate) enum Action {
    /// Send a control message to a component.
    Send(usize, Control),
    /// Write this checkpoint, then report the outcome with [`Protocol::written`].
    Write(Checkpoint),
    /// Checkpoint `epoch` is durable: publish the per-partition states it holds (for sources
    /// that hand partitions over) and record its metrics.
    Durable { epoch: u64, started: Instant, partitions: HashMap<(u16, u32), ComponentStates> },
}

#[derive(Debug)]
struct NodeRt {
    info: NodeInfo,
    done: bool,
    final_state: Option<Vec<u8>>,
    final_partitions: Vec<PartitionState>,
}

/// An epoch whose reports are being collected (or whose checkpoint is being written).
#[derive(Debug)]
struct Pending {
    epoch: u64,
    started: Instant,
    waiting: HashSet<usize>,
    states: HashMap<usize, Vec<u8>>,
    /// (source, partition) -> component -> state.
    partitions: HashMap<(u16, u32), ComponentStates>,
    is_final: bool,
}

impl Pending {
    fn add_partitions(&mut self, component: &str, parts: &[PartitionState]) {
        for p in parts {
            self.partitions.entry((p.source, p.partition)).or_default().insert(component.to_string(), p.state.clone());
        }
    }
}

/// The checkpoint protocol of one run. See the module documentation.
#[derive(Debug)]
pub(crate) struct Protocol {
    nodes: Vec<NodeRt>,
    /// The last epoch started.
    epoch: u64,
    first_epoch: u64,
    /// Collecting reports.
    pending: Option<Pending>,
    /// Complete, being written.
    writing: Option<Pending>,
    stopping: bool,
    failure: Option<String>,
    /// Per sink, the last epoch it committed.
    sink_committed: BTreeMap<usize, u64>,
    /// The last epoch sources were told to commit.
    sources_committed: u64,
    final_epoch: Option<u64>,
    finished: bool,
}

impl Protocol {
    /// A protocol for these components, whose first epoch will be `base_epoch + 1`.
    pub fn new(nodes: Vec<NodeInfo>, base_epoch: u64) -> Protocol {
        let sink_committed =
            nodes.iter().enumerate().filter(|(_, n)| n.role == Role::Sink).map(|(i, _)| (i, base_epoch)).collect();
        Protocol {
            nodes: nodes
                .into_iter()
                .map(|info| NodeRt { info, done: false, final_state: None, final_partitions: Vec::new() })
                .collect(),
            epoch: base_epoch,
            first_epoch: base_epoch,
            pending: None,
            writing: None,
            stopping: false,
            failure: None,
            sink_committed,
            sources_committed: base_epoch,
            final_epoch: None,
            finished: false,
        }
    }

    /// Whether a timer tick would start a checkpoint now (none running, not stopping).
    pub fn idle(&self) -> bool {
        self.pending.is_none() && self.writing.is_none() && !self.stopping && !self.finished
    }

    /// The run is over: the final epoch is committed, or something failed.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Why the run failed, if it did.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// Epochs started by this run.
    pub fn epochs(&self) -> u64 {
        self.epoch - self.first_epoch
    }

    /// The checkpoint interval elapsed.
    pub fn tick(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        if self.idle() && self.nodes.iter().any(|n| n.info.role == Role::Source && !n.done) {
            self.start_epoch(false, &mut out);
        }
        out
    }

    /// Stop was asked for: sources end their streams; what is in flight is flushed and
    /// checkpointed by the final epoch.
    pub fn stop(&mut self) -> Vec<Action> {
        if self.stopping || self.finished {
            return Vec::new();
        }
        self.stopping = true;
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.info.role == Role::Source && !n.done)
            .map(|(i, _)| Action::Send(i, Control::Stop))
            .collect()
    }

    /// A component reported.
    pub fn report(&mut self, r: Report) -> Vec<Action> {
        let mut out = Vec::new();
        if self.finished {
            return out;
        }
        match r {
            Report::Snapshot { node, epoch, state, partitions } => {
                if let Some(p) = self.pending.as_mut().filter(|p| p.epoch == epoch) {
                    p.states.insert(node, state);
                    p.add_partitions(&self.nodes[node].info.name, &partitions);
                    p.waiting.remove(&node);
                }
            }
            Report::Finished { node, state, partitions } => {
                let n = &mut self.nodes[node];
                n.done = true;
                if let Some(p) = self.pending.as_mut() {
                    if p.waiting.remove(&node) {
                        p.states.insert(node, state.clone());
                        p.add_partitions(&n.info.name, &partitions);
                    }
                }
                n.final_state = Some(state);
                n.final_partitions = partitions;
            }
            Report::Drained { node } => {
                self.nodes[node].done = true;
                if let Some(p) = self.pending.as_ref().filter(|p| p.waiting.contains(&node)) {
                    out.push(Action::Send(node, Control::Flush(p.epoch)));
                }
            }
            Report::Committed { node, epoch } => {
                let c = self.sink_committed.entry(node).or_insert(epoch);
                *c = (*c).max(epoch);
                let all = self.sink_committed.values().copied().min().unwrap_or(epoch);
                if all > self.sources_committed {
                    tracing::debug!(epoch = all, "every sink committed: sources commit");
                    self.sources_committed = all;
                    self.send_sources(Control::Commit(all), &mut out);
                }
            }
            Report::Failed { node, error } => {
                self.failure = Some(format!("{}: {}", self.nodes[node].info.name, error));
                self.finished = true;
                return out;
            }
            Report::RequestCheckpoint => {
                if self.idle() {
                    self.start_epoch(false, &mut out);
                }
            }
        }
        self.advance(&mut out);
        out
    }

    /// The outcome of an [`Action::Write`].
    pub fn written(&mut self, epoch: u64, result: Result<(), String>) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(p) = self.writing.take_if(|p| p.epoch == epoch) else {
            debug_assert!(false, "written({epoch}) without a checkpoint being written");
            return out;
        };
        match result {
            Ok(()) => {
                out.push(Action::Durable { epoch, started: p.started, partitions: p.partitions });
                if self.sink_committed.is_empty() {
                    self.sources_committed = epoch;
                    self.send_sources(Control::Commit(epoch), &mut out);
                }
                for (i, n) in self.nodes.iter().enumerate() {
                    if n.info.role == Role::Sink {
                        out.push(Action::Send(i, Control::Commit(epoch)));
                    }
                }
                if p.is_final {
                    self.final_epoch = Some(epoch);
                }
            }
            Err(e) => {
                tracing::error!("checkpoint {epoch} not written, its output stays staged: {e}");
                if p.is_final {
                    self.failure = Some(format!("final checkpoint could not be written: {e}"));
                    self.finished = true;
                    return out;
                }
            }
        }
        self.advance(&mut out);
        out
    }

    /// After any change: a complete epoch is written; the run ends once the final epoch is
    /// committed; once everything finished, the final epoch starts.
    fn advance(&mut self, out: &mut Vec<Action>) {
        if self.finished {
            return;
        }
        if self.writing.is_none() && self.pending.as_ref().is_some_and(|p| p.waiting.is_empty()) {
            let p = self.pending.take().expect("pending");
            let components = p
                .states
                .iter()
                .map(|(&i, s)| {
                    let info = &self.nodes[i].info;
                    (info.name.clone(), ComponentState { fingerprint: info.fingerprint, state: s.clone() })
                })
                .collect();
            out.push(Action::Write(Checkpoint { epoch: p.epoch, written_at: crate::time::now_nanos(), components }));
            self.writing = Some(p);
            return;
        }
        if self.writing.is_some() {
            return;
        }
        if self.final_epoch.is_some_and(|f| self.sources_committed >= f) {
            self.finished = true;
            return;
        }
        if self.pending.is_none() && self.final_epoch.is_none() && self.nodes.iter().all(|n| n.done) {
            self.start_epoch(true, out);
        }
    }

    fn send_sources(&self, c: Control, out: &mut Vec<Action>) {
        for (i, n) in self.nodes.iter().enumerate() {
            if n.info.role == Role::Source {
                out.push(Action::Send(i, c));
            }
        }
    }

    fn start_epoch(&mut self, is_final: bool, out: &mut Vec<Action>) {
        self.epoch += 1;
        let epoch = self.epoch;
        let mut p = Pending {
            epoch,
            started: Instant::now(),
            waiting: HashSet::new(),
            states: HashMap::new(),
            partitions: HashMap::new(),
            is_final,
        };
        for (i, n) in self.nodes.iter().enumerate() {
            match (n.info.role, n.done) {
                (Role::Sink, true) => {
                    p.waiting.insert(i);
                    out.push(Action::Send(i, Control::Flush(epoch)));
                }
                (Role::Source, false) => {
                    p.waiting.insert(i);
                    out.push(Action::Send(i, Control::Barrier(epoch)));
                }
                (Role::Sink | Role::Transform, false) => {
                    p.waiting.insert(i);
                }
                (Role::Source | Role::Transform, true) => {
                    p.states.insert(i, n.final_state.clone().unwrap_or_default());
                    p.add_partitions(&n.info.name, &n.final_partitions);
                }
            }
        }
        self.pending = Some(p);
        // an epoch with nothing to wait for (everything finished, no sink) is complete already
        self.advance(out);
    }
}

#[cfg(test)]
#[path = "protocol_tests.rs"]
mod tests;
