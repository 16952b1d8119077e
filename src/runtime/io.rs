//! Channels between components: bounded queues of [`Msg`], with barrier alignment on the
//! receiving side.

use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;

use tokio::sync::mpsc;

use crate::event::{Batch, Event};

/// An output port of a component: its place among the ports the component declares
/// (`Spec::ports`, main output first) and its name (`NAME.late` reads port `late`). Components
/// name their ports as constants; sending or emitting on a port the component did not declare is
/// a bug and panics, so that nothing is ever dropped for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Port {
    pub index: usize,
    pub name: &'static str,
}

impl Port {
    /// The main output.
    pub const MAIN: Port = Port::new(0, "");
    /// `dead_letter` as the only secondary output (sources, filter, map).
    pub const DEAD_LETTER: Port = Port::new(1, "dead_letter");

    pub const fn new(index: usize, name: &'static str) -> Port {
        Port { index, name }
    }

    /// Checks a component's declared ports: the main output first, each at its own index, names
    /// unique. Called when a plan is built.
    pub fn check_declared(ports: &[Port]) -> Result<(), String> {
        if ports.first() != Some(&Port::MAIN) {
            return Err(format!("declares {ports:?}: the main output must come first"));
        }
        for (i, p) in ports.iter().enumerate() {
            if p.index != i || ports[..i].iter().any(|q| q.name == p.name) {
                return Err(format!("declares port `{}` at index {} among {ports:?}", p.name, p.index));
            }
        }
        Ok(())
    }
}

/// What flows on an edge.
#[derive(Debug, Clone)]
pub enum Msg {
    Batch(Arc<Batch>),
    /// Checkpoint barrier: everything before it belongs to this epoch.
    Barrier(u64),
    /// A source gained or lost an input partition (scale-out): stateful transforms adopt or
    /// drop the state they keep for it. Ordered with the partition's events.
    Partition(PartitionChange),
    /// The upstream component will send nothing more.
    End(EndReason),
}

/// A change of the input partitions a source reads.
#[derive(Debug, Clone)]
pub enum PartitionChange {
    /// The source now reads `partition`; `states` holds, per component name, the state its
    /// previous reader checkpointed for it (empty: none).
    Added { source: u16, partition: u32, states: Arc<std::collections::BTreeMap<String, Vec<u8>>> },
    /// The source no longer reads `partition`: its state moves on with the checkpoint.
    Removed { source: u16, partition: u32 },
}

/// Why a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The sources read everything there was (end of a replay).
    Exhausted,
    /// The pipeline was asked to stop (signal, reload); state goes into the checkpoint.
    Stopped,
}

impl EndReason {
    /// Combining the reasons of several inputs: stopped wins.
    pub fn merge(self, other: EndReason) -> EndReason {
        if self == EndReason::Stopped || other == EndReason::Stopped {
            EndReason::Stopped
        } else {
            EndReason::Exhausted
        }
    }
}

/// One item received by a component, after barrier alignment.
#[derive(Debug)]
pub enum Item {
    Batch(Arc<Batch>),
    Barrier(u64),
    Partition(PartitionChange),
    End(EndReason),
}

/// The receiving ends of a component's input edges. A barrier is delivered once it has
/// arrived on every input that has not ended; until then, inputs that already delivered it
/// are not read (aligned checkpoints).
pub struct Inputs {
    rx: Vec<mpsc::Receiver<Msg>>,
    ended: Vec<bool>,
    blocked: Vec<bool>,
    barrier: Option<u64>,
    reason: Option<EndReason>,
    next: usize,
    done: bool,
}

impl Inputs {
    pub fn new(rx: Vec<mpsc::Receiver<Msg>>) -> Inputs {
        let n = rx.len();
        Inputs { rx, ended: vec![false; n], blocked: vec![false; n], barrier: None, reason: None, next: 0, done: false }
    }

    /// The next item. Cancel-safe. After `End` it keeps returning `End`.
    pub async fn recv(&mut self) -> Item {
        let n = self.rx.len();
        loop {
            if let Some(e) = self.barrier {
                if (0..n).all(|i| self.ended[i] || self.blocked[i]) {
                    self.barrier = None;
                    self.blocked.iter_mut().for_each(|b| *b = false);
                    return Item::Barrier(e);
                }
            }
            if self.ended.iter().all(|e| *e) {
                self.done = true;
                return Item::End(self.reason.unwrap_or(EndReason::Exhausted));
            }
            let (i, msg) = poll_fn(|cx| {
                for k in 0..n {
                    let i = (self.next + k) % n;
                    if self.ended[i] || self.blocked[i] {
                        continue;
                    }
                    if let Poll::Ready(m) = self.rx[i].poll_recv(cx) {
                        return Poll::Ready((i, m));
                    }
                }
                Poll::Pending
            })
            .await;
            self.next = (i + 1) % n;
            match msg {
                Some(Msg::Batch(b)) => return Item::Batch(b),
                Some(Msg::Partition(c)) => return Item::Partition(c),
                Some(Msg::Barrier(e)) => {
                    if let Some(cur) = self.barrier {
                        debug_assert_eq!(cur, e, "barriers of two epochs interleaved");
                    }
                    self.barrier = Some(e);
                    self.blocked[i] = true;
                }
                Some(Msg::End(r)) => {
                    self.ended[i] = true;
                    self.reason = Some(self.reason.map_or(r, |x| x.merge(r)));
                }
                None => {
                    // The upstream task went away without an End: it failed. Treat as stopped so
                    // that state is kept rather than flushed as if complete.
                    self.ended[i] = true;
                    self.reason = Some(EndReason::Stopped);
                }
            }
        }
    }

    /// True once `End` was returned.
    pub fn is_done(&self) -> bool {
        self.done
    }
}

/// The sending ends of a component's output ports (port 0 is the main output).
#[derive(Clone, Default)]
pub struct Outputs {
    ports: Vec<Vec<mpsc::Sender<Msg>>>,
    names: Vec<&'static str>,
}

/// A downstream component stopped reading.
#[derive(Debug, thiserror::Error)]
#[error("a downstream component has stopped")]
pub struct Disconnected;

impl Outputs {
    /// The edges of each declared port (by index), and the ports' names.
    pub fn new(ports: Vec<Vec<mpsc::Sender<Msg>>>, names: Vec<&'static str>) -> Outputs {
        assert!(ports.len() <= names.len().max(1), "edges on {} ports, {} declared", ports.len(), names.len());
        Outputs { ports, names }
    }

    fn edges(&self, port: Port) -> &[mpsc::Sender<Msg>] {
        assert_declared(&self.names, port);
        self.ports.get(port.index).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Whether anything reads `port`.
    pub fn is_connected(&self, port: Port) -> bool {
        !self.edges(port).is_empty()
    }

    /// Sends a batch on a port (to every edge of it). Waits while a receiver is full.
    pub async fn send(&self, port: Port, batch: Batch) -> Result<(), Disconnected> {
        self.send_edges(self.edges(port), batch).await
    }

    /// Sends a batch on the port at `index`, as [`Emitter::take_batches`] lists them (an
    /// emitter of this component's declared ports: every index is one of them).
    pub(crate) async fn send_at(&self, index: usize, batch: Batch) -> Result<(), Disconnected> {
        self.send_edges(self.ports.get(index).map(Vec::as_slice).unwrap_or(&[]), batch).await
    }

    async fn send_edges(&self, edges: &[mpsc::Sender<Msg>], batch: Batch) -> Result<(), Disconnected> {
        if edges.is_empty() || batch.is_empty() {
            return Ok(());
        }
        let b = Arc::new(batch);
        for tx in edges {
            tx.send(Msg::Batch(b.clone())).await.map_err(|_| Disconnected)?;
        }
        Ok(())
    }

    /// Sends a control message on every port.
    pub async fn broadcast(&self, msg: Msg) -> Result<(), Disconnected> {
        for edges in &self.ports {
            for tx in edges {
                tx.send(msg.clone()).await.map_err(|_| Disconnected)?;
            }
        }
        Ok(())
    }
}

/// Panics on a port that is not among `names` (see [`Port`]).
fn assert_declared(names: &[&'static str], port: Port) {
    let declared = names.get(port.index).is_some_and(|n| *n == port.name) || (names.is_empty() && port == Port::MAIN);
    assert!(declared, "port `{}` (index {}) is not among the declared ports {names:?}: a bug", port.name, port.index);
}

/// Collects what a transform emits on each port during one call.
#[derive(Debug)]
pub struct Emitter {
    names: Vec<&'static str>,
    ports: Vec<Vec<Event>>,
    /// Per port: batches already closed, in order, ahead of the events in `ports`.
    ready: Vec<Vec<Batch>>,
    /// Per port: whether every consumer reads columnar batches.
    columnar: Vec<bool>,
}

impl Emitter {
    /// An emitter for a component with these output ports (as it declares them).
    pub fn new(ports: &[&'static str]) -> Emitter {
        let n = ports.len().max(1);
        Emitter {
            names: if ports.is_empty() { vec![""] } else { ports.to_vec() },
            ports: (0..n).map(|_| Vec::new()).collect(),
            ready: (0..n).map(|_| Vec::new()).collect(),
            columnar: vec![false; n],
        }
    }
    /// Marks the ports whose consumers all read rows as Arrow columns (set by the runtime, which
    /// knows the consumers; see [`crate::runtime::Sink::accepts_columns`]).
    pub fn with_columnar(mut self, columnar: &[bool]) -> Emitter {
        for (c, &on) in self.columnar.iter_mut().zip(columnar) {
            *c = on;
        }
        self
    }
    /// Whether rows may be emitted on `port` as columns ([`Emitter::emit_columns`]).
    pub fn wants_columns(&self, port: Port) -> bool {
        assert_declared(&self.names, port);
        self.columnar.get(port.index).copied().unwrap_or(false)
    }
    /// Emits an event on the main output.
    pub fn emit(&mut self, ev: Event) {
        self.ports[0].push(ev);
    }
    /// Emits an event on a declared port (panics on any other: see [`Port`]).
    pub fn emit_to(&mut self, port: Port, ev: Event) {
        assert_declared(&self.names, port);
        self.ports[port.index].push(ev);
    }
    /// Emits many events on the main output.
    pub fn emit_all(&mut self, evs: impl IntoIterator<Item = Event>) {
        self.ports[0].extend(evs);
    }
    /// Emits rows as columns on a port that [wants them](Emitter::wants_columns), after what
    /// was emitted on it before.
    pub fn emit_columns(&mut self, port: Port, rows: arrow_array::RecordBatch) {
        assert!(self.wants_columns(port), "columns emitted on port `{}`, whose consumers read events only", port.name);
        if rows.num_rows() == 0 {
            return;
        }
        let events = std::mem::take(&mut self.ports[port.index]);
        if !events.is_empty() {
            self.ready[port.index].push(Batch::new(events));
        }
        self.ready[port.index].push(Batch::columns(rows));
    }
    /// Replaces the main output with a whole vector (cheapest for pass-through transforms).
    pub fn set_main(&mut self, evs: Vec<Event>) {
        if self.ports[0].is_empty() {
            self.ports[0] = evs;
        } else {
            self.ports[0].extend(evs);
        }
    }
    /// Takes the events of every port, leaving the emitter empty (for emitters without
    /// columnar ports).
    pub fn take(&mut self) -> Vec<Vec<Event>> {
        debug_assert!(self.ready.iter().all(Vec::is_empty), "take() would lose columnar batches");
        self.ports.iter_mut().map(std::mem::take).collect()
    }
    /// Takes what every port emitted as batches in order, leaving the emitter empty.
    pub fn take_batches(&mut self) -> Vec<Vec<Batch>> {
        self.ports
            .iter_mut()
            .zip(&mut self.ready)
            .map(|(events, ready)| {
                let mut out = std::mem::take(ready);
                if !events.is_empty() {
                    out.push(Batch::new(std::mem::take(events)));
                }
                out
            })
            .collect()
    }
    /// Events emitted on a port so far (for tests).
    pub fn port(&self, port: Port) -> &[Event] {
        assert_declared(&self.names, port);
        &self.ports[port.index]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(n: usize) -> Msg {
        Msg::Batch(Arc::new(Batch::new((0..n).map(|_| Event::row()).collect())))
    }

    #[tokio::test]
    async fn barriers_are_aligned_across_inputs() {
        let (ta, ra) = mpsc::channel(8);
        let (tb, rb) = mpsc::channel(8);
        let mut inputs = Inputs::new(vec![ra, rb]);
        ta.send(batch(1)).await.unwrap();
        ta.send(Msg::Barrier(1)).await.unwrap();
        ta.send(batch(2)).await.unwrap(); // after the barrier: must wait for b's barrier
        tb.send(batch(3)).await.unwrap();
        tb.send(Msg::Barrier(1)).await.unwrap();
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(match inputs.recv().await {
                Item::Batch(b) => format!("b{}", b.len()),
                Item::Barrier(e) => format!("B{e}"),
                Item::Partition(_) => "P".into(),
                Item::End(_) => "E".into(),
            });
        }
        // batches 1 and 3 (any order) come before the barrier, batch 2 after it
        let barrier_at = seen.iter().position(|s| s == "B1").unwrap();
        assert_eq!(barrier_at, 2, "{seen:?}");
        assert!(seen[..2].contains(&"b1".to_string()) && seen[..2].contains(&"b3".to_string()));
        assert_eq!(seen[3], "b2");
    }

    #[tokio::test]
    async fn end_arrives_after_all_inputs_end_and_stopped_wins() {
        let (ta, ra) = mpsc::channel(8);
        let (tb, rb) = mpsc::channel(8);
        let mut inputs = Inputs::new(vec![ra, rb]);
        ta.send(Msg::End(EndReason::Exhausted)).await.unwrap();
        tb.send(Msg::Barrier(4)).await.unwrap(); // an ended input does not hold a barrier back
        assert!(matches!(inputs.recv().await, Item::Barrier(4)));
        tb.send(Msg::End(EndReason::Stopped)).await.unwrap();
        assert!(matches!(inputs.recv().await, Item::End(EndReason::Stopped)));
        assert!(inputs.is_done());
    }

    #[test]
    #[should_panic(expected = "not among the declared ports")]
    fn emitting_on_an_undeclared_port_panics() {
        let mut em = Emitter::new(&["", "late"]);
        em.emit_to(Port::new(2, "dead_letter"), Event::row());
    }

    #[test]
    #[should_panic(expected = "not among the declared ports")]
    fn a_port_of_another_name_at_a_declared_index_panics() {
        let mut em = Emitter::new(&["", "late"]);
        em.emit_to(Port::new(1, "dead_letter"), Event::row());
    }

    #[test]
    fn declared_ports_are_checked() {
        assert!(Port::check_declared(&[Port::MAIN, Port::new(1, "late")]).is_ok());
        assert!(Port::check_declared(&[Port::new(1, "late")]).is_err(), "no main output");
        assert!(Port::check_declared(&[Port::MAIN, Port::new(2, "late")]).is_err(), "a gap");
        assert!(Port::check_declared(&[Port::MAIN, Port::new(1, "x"), Port::new(2, "x")]).is_err(), "twice");
    }

    #[tokio::test]
    async fn dropped_upstream_counts_as_stopped() {
        let (ta, ra) = mpsc::channel::<Msg>(8);
        let mut inputs = Inputs::new(vec![ra]);
        drop(ta);
        assert!(matches!(inputs.recv().await, Item::End(EndReason::Stopped)));
    }
}
