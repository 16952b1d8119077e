//! Runs one test case: the pipeline's transforms, built as `replay` builds them, driven
//! synchronously in arrival order; sources replaced by the case's records (decoded as each
//! source decodes what it receives); sinks replaced by captures of their input. Nothing outside
//! the process is contacted, no checkpoint is written, and the wall clock plays no part.

use std::collections::HashMap;

use anyhow::Context;
use bytes::Bytes;

use super::spec::{Case, End, Target};
use crate::config::{ComponentConfig, Role};
use crate::event::{Batch, Event};
use crate::metrics::ComponentMetrics;
use crate::runtime::{BuildCx, Emitter, Mode, Port, Transform};

/// What a case's run produced, by place.
#[derive(Default)]
pub struct Captured {
    by_target: HashMap<Target, Vec<Event>>,
}

impl Captured {
    /// The events that reached a place, in order.
    pub fn at(&self, t: Target) -> &[Event] {
        self.by_target.get(&t).map(Vec::as_slice).unwrap_or(&[])
    }
}

struct Driver<'a> {
    case: &'a Case,
    transforms: Vec<Option<(Box<dyn Transform>, Emitter)>>,
    /// Consumers of each (node, port).
    consumers: HashMap<(usize, usize), Vec<usize>>,
    captured: Captured,
}

/// Runs a case and returns everything every component emitted and every sink received.
pub fn run(case: &Case) -> anyhow::Result<Captured> {
    let mut d = Driver::new(case)?;
    for input in &case.inputs {
        let cfg = match &case.plan.nodes[input.node].config {
            ComponentConfig::Source(c) => c,
            _ => unreachable!("inputs are checked to name sources"),
        };
        let source_index = case.plan.nodes[..input.node].iter().filter(|n| n.role == Role::Source).count() as u16;
        let name = &case.plan.nodes[input.node].name;
        let projection = case.plan.nodes[input.node].projection.as_ref();
        let (mut events, mut dead) = (Vec::new(), Vec::new());
        for (n, rec) in input.records.iter().enumerate() {
            let raw = Bytes::from(rec.bytes.clone());
            for r in crate::sources::decode_test_record(cfg, raw.clone(), input.received, &input.attributes, projection)
            {
                match r {
                    Ok(mut ev) => {
                        ev.meta.source = source_index;
                        ev.meta.partition = input.partition;
                        ev.meta.offset = n as i64;
                        ev.meta.origin = Some(rec.origin.as_str().into());
                        ev.meta.attrs = input.attributes.clone();
                        events.push(ev);
                    }
                    Err(reason) => dead.push(Event::dead_letter(raw.clone(), &reason, &rec.origin, name)),
                }
            }
        }
        d.deliver(input.node, Port::MAIN.index, events);
        d.deliver(input.node, Port::DEAD_LETTER.index, dead);
    }
    d.finish();
    Ok(d.captured)
}

impl<'a> Driver<'a> {
    fn new(case: &'a Case) -> anyhow::Result<Driver<'a>> {
        let plan = &case.plan;
        let mut transforms = Vec::with_capacity(plan.nodes.len());
        for node in &plan.nodes {
            let built = match &node.config {
                ComponentConfig::Transform(cfg) => {
                    let bcx = BuildCx {
                        pipeline: &plan.name,
                        name: &node.name,
                        mode: Mode::Replay,
                        restored: None,
                        state: None,
                        instance: "test",
                        metrics: ComponentMetrics::new(&node.name, node.kind),
                        projection: None,
                        partitioned: false,
                        first_epoch: 1,
                    };
                    let t = crate::transforms::build(cfg, &bcx).with_context(|| format!("transform {}", node.name))?;
                    Some((t, Emitter::new(&node.ports)))
                }
                _ => None,
            };
            transforms.push(built);
        }
        let mut consumers: HashMap<(usize, usize), Vec<usize>> = HashMap::new();
        for (i, node) in plan.nodes.iter().enumerate() {
            for &input in &node.inputs {
                consumers.entry(input).or_default().push(i);
            }
        }
        Ok(Driver { case, transforms, consumers, captured: Captured::default() })
    }

    /// Sends what `node` emitted on `port` to its consumers, depth first, so that every event
    /// is processed in arrival order.
    fn deliver(&mut self, node: usize, port: usize, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        self.captured.by_target.entry(Target::Port(node, port)).or_default().extend(events.iter().cloned());
        let consumers = self.consumers.get(&(node, port)).cloned().unwrap_or_default();
        for c in consumers {
            if self.case.plan.nodes[c].role == Role::Sink {
                self.captured.by_target.entry(Target::SinkInput(c)).or_default().extend(events.iter().cloned());
                continue;
            }
            let Some((t, em)) = self.transforms[c].as_mut() else { continue };
            t.process(Batch::new(events.clone()), em);
            self.forward(c);
        }
    }

    /// Delivers what a transform's emitter holds.
    fn forward(&mut self, node: usize) {
        let Some((_, em)) = self.transforms[node].as_mut() else { return };
        let outputs = em.take_batches();
        for (port, batches) in outputs.into_iter().enumerate() {
            let events: Vec<Event> = batches.into_iter().flat_map(|b| b.events).collect();
            self.deliver(node, port, events);
        }
    }

    /// The end of the case's input, in topological order so that each transform ends after
    /// everything upstream has.
    fn finish(&mut self) {
        for node in self.topological() {
            let Some((t, em)) = self.transforms[node].as_mut() else { continue };
            match self.case.end {
                End::Flush => t.on_end(true, em),
                End::Hold => t.on_end(false, em),
                End::Watermark(to) => {
                    t.advance_watermark(to, em);
                    t.on_end(false, em);
                }
            }
            self.forward(node);
        }
    }

    fn topological(&self) -> Vec<usize> {
        let nodes = &self.case.plan.nodes;
        let mut done = vec![false; nodes.len()];
        let mut order = Vec::with_capacity(nodes.len());
        while order.len() < nodes.len() {
            let before = order.len();
            for (i, n) in nodes.iter().enumerate() {
                if !done[i] && n.inputs.iter().all(|(u, _)| done[*u]) {
                    done[i] = true;
                    order.push(i);
                }
            }
            if order.len() == before {
                break; // validation refuses cycles; never loop
            }
        }
        order
    }
}
