//! `window`: event-time windowed aggregation (tumbling, hopping, session) with watermarks,
//! allowed lateness and a `late` output.
//!
//! Time is the event's own: `enqueuedTime` by default, or any timestamp field. The watermark is
//! the largest event time seen minus `allowed_lateness`, per input partition, and the minimum
//! over partitions (a partition idle for `idle_timeout` of wall time stops holding it back, in
//! `run` only). It is advanced event by event, so which events are late does not depend on how
//! the input happened to be batched: a replay and a live run of the same messages give the same
//! rows. A window is emitted once, when the watermark reaches its end; at the end of a replay
//! every open window is emitted. An event whose windows have all been emitted is late: it goes
//! to `NAME.late` (or is dropped and counted, with `late: drop`).
//!
//! Rows: the group-by fields, `window_start`, `window_end`, `count`, then `FIELD_AGG` for each
//! aggregate, ordered by window and group. Their event time is `window_start`.
//!
//! The parts, one concern a file: the state and the event-by-event update here; the YAML
//! configuration in `config`; group keys in `keys`; session windows in `session`; emitting
//! rows in `emit` (and as columns in `columns`); aggregates in `agg`; the watermark in
//! `transforms::watermark` (shared with `device_context`).

pub mod agg;
mod columns;
mod config;
mod emit;
mod keys;
mod session;

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sketches_ddsketch::DDSketch;

use self::agg::{AggFn, AggPlan, Skipped};
use super::watermark::Watermark;
use crate::config::values::{Dur, Parsed};
use crate::event::{Batch, Event, Kind, Nanos, RowLayout, NO_TIME};
use crate::metrics::ComponentMetrics;
use crate::path::FieldPath;
use crate::runtime::{BuildCx, Emitter, Port, Transform};
pub use config::{LateMode, WindowConfig, WindowSpec};
use keys::{key_hash, write_key};
use session::session_end;

/// Events that arrived after all their windows were emitted.
pub const LATE: Port = Port::new(1, "late");
/// Events whose time or values could not be read.
pub const DEAD: Port = Port::new(2, "dead_letter");
/// Its output ports: the rows, then `late`, then `dead_letter`.
pub const PORTS: [Port; 3] = [Port::MAIN, LATE, DEAD];
/// Events per parallel extraction task.
const EXTRACT_CHUNK: usize = 256;

fn batch_len_hint(parts: &[Extracted]) -> usize {
    parts.iter().map(|p| p.recs.len()).sum()
}

#[derive(Debug, Clone, Copy)]
enum Shape {
    Tumbling { size: i64 },
    Hopping { size: i64, hop: i64 },
    Session { gap: i64, max: Option<i64> },
}

/// The (group, window) states of one tumbling or hopping window.
#[derive(Default, Serialize, Deserialize)]
struct Pane {
    /// Group key → its slot in `keys` (and its accumulators' place in `cells` and `sketches`).
    /// The table holds only slots and compares against `keys`, so a key is stored once.
    #[serde(skip)]
    index: hashbrown::HashTable<u32>,
    keys: Vec<Box<str>>,
    cells: Vec<f64>,
    sketches: Vec<DDSketch>,
}

impl Pane {
    fn reindex(&mut self) {
        let Pane { index, keys, .. } = self;
        *index = hashbrown::HashTable::with_capacity(keys.len());
        for (i, k) in keys.iter().enumerate() {
            index.insert_unique(key_hash(k), i as u32, |&s| key_hash(&keys[s as usize]));
        }
    }

    /// The slot of `key`, added with fresh accumulators when it is new.
    fn slot(&mut self, key: &str, plan: &AggPlan) -> usize {
        let Pane { index, keys, cells, sketches } = self;
        let h = key_hash(key);
        if let Some(&s) = index.find(h, |&s| &*keys[s as usize] == key) {
            return s as usize;
        }
        let s = keys.len();
        keys.push(key.into());
        index.insert_unique(h, s as u32, |&s| key_hash(&keys[s as usize]));
        plan.init(cells);
        plan.init_sketches(sketches);
        s
    }
}

#[derive(Serialize, Deserialize)]
struct Session {
    first: Nanos,
    last: Nanos,
    cells: Vec<f64>,
    sketches: Vec<DDSketch>,
}

/// Whose events a state belongs to: (source index, input partition) when state is kept per
/// partition (scale-out), else (0, 0).
type Scope = (u16, u32);

#[derive(Serialize, Deserialize, Default)]
struct State {
    watermark: Watermark,
    /// By (scope, window start).
    panes: BTreeMap<(u16, u32, Nanos), Pane>,
    /// By (scope, group key [+ U+001E + `max_duration` bucket]).
    sessions: BTreeMap<(u16, u32, Box<str>), Vec<Session>>,
}

/// The state of one input partition, as it moves between instances.
#[derive(Serialize, Deserialize)]
struct Slice {
    panes: Vec<(Nanos, Pane)>,
    sessions: Vec<(Box<str>, Vec<Session>)>,
    max: Option<Nanos>,
}

pub struct Window {
    shape: Shape,
    time: Option<FieldPath>,
    group_by: Vec<FieldPath>,
    group_cols: Vec<String>,
    plan: AggPlan,
    late: LateMode,
    state: State,
    /// Session end times, for closing them in order: (end, scope, key, first).
    timers: BTreeSet<(Nanos, Scope, Box<str>, Nanos)>,
    key: String,
    skipped: Skipped,
    name: String,
    metrics: ComponentMetrics,
    last_pane: Option<(u16, u32, Nanos)>,
    /// The output rows' columns.
    layout: RowLayout,
    /// State and watermarks per input partition (fed by a source that hands partitions over).
    partitioned: bool,
}

/// What the window needs of an event, read in parallel before the sequential update.
struct Extracted {
    /// `time, key start, key end` per event (`NO_TIME`: no usable time).
    recs: Vec<(Nanos, u32, u32)>,
    keys: String,
    /// `fields` values per event.
    vals: Vec<f64>,
}

impl Window {
    pub fn new(cfg: &WindowConfig, cx: &BuildCx<'_>) -> anyhow::Result<Window> {
        let mut w = Window::from_config(cfg, cx.name, cx.metrics.clone())?;
        w.partitioned = cx.partitioned;
        if let Some(state) = cx.restored.as_deref().filter(|s| !s.is_empty()) {
            w.restore(state).context("window state in the checkpoint is corrupt")?;
        }
        Ok(w)
    }

    /// Builds the transform (without restoring state).
    pub fn from_config(cfg: &WindowConfig, name: &str, metrics: ComponentMetrics) -> anyhow::Result<Window> {
        let shape = match &cfg.window {
            WindowSpec::Tumbling { size } => Shape::Tumbling { size: size.nanos()? },
            WindowSpec::Hopping { size, hop } => Shape::Hopping { size: size.nanos()?, hop: hop.nanos()? },
            WindowSpec::Session { gap, max_duration } => {
                Shape::Session { gap: gap.nanos()?, max: max_duration.as_ref().map(Dur::nanos).transpose()? }
            }
        };
        let time = cfg.time.as_ref().map(Parsed::get).transpose()?;
        let group_by: Vec<FieldPath> = cfg.group_by.iter().map(Parsed::get).collect::<anyhow::Result<_>>()?;
        let group_cols: Vec<String> = group_by.iter().map(|g| g.as_str().replace('.', "_")).collect();
        let spec: Vec<(FieldPath, Vec<AggFn>)> = cfg
            .aggregates
            .iter()
            .map(|(f, fns)| Ok((f.get()?, fns.iter().map(Parsed::get).collect::<anyhow::Result<Vec<_>>>()?)))
            .collect::<anyhow::Result<_>>()?;
        let lateness = cfg.allowed_lateness.nanos()?;
        let idle = cfg.idle_timeout.nanos()?;
        let plan = AggPlan::new(&spec);
        let layout = RowLayout::new(
            group_cols
                .iter()
                .cloned()
                .chain(["window_start", "window_end", "count"].map(String::from))
                .chain(plan.columns()),
        );
        Ok(Window {
            shape,
            time,
            group_by,
            group_cols,
            plan,
            layout,
            late: cfg.late,
            state: State { watermark: Watermark::new(lateness, idle), ..Default::default() },
            timers: BTreeSet::new(),
            key: String::new(),
            skipped: Skipped::default(),
            name: name.to_string(),
            metrics,
            last_pane: None,
            partitioned: false,
        })
    }

    fn restore(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let mut st: State = postcard::from_bytes(bytes)?;
        for pane in st.panes.values_mut() {
            pane.reindex();
        }
        let shape = self.shape;
        self.timers = st
            .sessions
            .iter()
            .flat_map(|((src, part, k), ss)| {
                ss.iter().map(move |s| (session_end(shape, s.first, s.last), (*src, *part), k.clone(), s.first))
            })
            .collect();
        let lateness = self.state.watermark.lateness;
        let idle = self.state.watermark.idle_timeout;
        self.state = st;
        self.state.watermark.lateness = lateness;
        self.state.watermark.idle_timeout = idle;
        Ok(())
    }

    /// The event's time, if it has a usable one.
    fn event_time(&self, ev: &Event) -> Option<Nanos> {
        match &self.time {
            None => (ev.time != NO_TIME).then_some(ev.time),
            Some(p) if p.as_str() == "enqueuedTime" && matches!(ev.kind, Kind::Export(_)) => {
                (ev.time != NO_TIME).then_some(ev.time)
            }
            Some(p) => p.get(ev).and_then(|v| v.as_time()),
        }
    }

    fn add_to_pane(&mut self, scope: Scope, start: Nanos, key: &str, vals: &[f64], t: Nanos) {
        let plan = &self.plan;
        let pk = (scope.0, scope.1, start);
        let pane = match self.last_pane {
            // consecutive events mostly fall in the same window
            Some(p) if p == pk => match self.state.panes.get_mut(&pk) {
                Some(p) => p,
                None => self.state.panes.entry(pk).or_default(),
            },
            _ => {
                self.last_pane = Some(pk);
                self.state.panes.entry(pk).or_default()
            }
        };
        let slot = pane.slot(key, plan);
        let stride = plan.stride;
        let ns = plan.sketches;
        plan.add_values(
            vals,
            t,
            &mut pane.cells[slot * stride..(slot + 1) * stride],
            &mut pane.sketches[slot * ns..(slot + 1) * ns],
            &mut self.skipped,
        );
    }

    /// The scope of an event's state.
    fn scope_of(&self, ev: &Event) -> Scope {
        if self.partitioned {
            (ev.meta.source, ev.meta.partition)
        } else {
            (0, 0)
        }
    }

    /// The watermark that decides lateness and closing for a scope.
    fn watermark_of(&self, scope: Scope) -> Nanos {
        if self.partitioned {
            self.state.watermark.partition(scope.0, scope.1)
        } else {
            self.state.watermark.current()
        }
    }

    /// Reads what the window needs from a run of events (time, group key, field values).
    fn extract(&self, events: &[Event]) -> Extracted {
        let nf = self.plan.fields.len();
        let mut x = Extracted {
            recs: Vec::with_capacity(events.len()),
            keys: String::with_capacity(events.len() * 16),
            vals: Vec::with_capacity(events.len() * nf),
        };
        for (i, ev) in events.iter().enumerate() {
            crate::event::prefetch_ahead(events, i);
            let t = self.event_time(ev).unwrap_or(NO_TIME);
            let k0 = x.keys.len() as u32;
            write_key(&self.group_by, ev, &mut x.keys);
            x.recs.push((t, k0, x.keys.len() as u32));
            self.plan.extract(ev, &mut x.vals);
        }
        x
    }

    /// Assigns one event to its windows; false when it is late.
    fn update(&mut self, scope: Scope, t: Nanos, key: &str, vals: &[f64]) -> bool {
        let wm = self.watermark_of(scope);
        match self.shape {
            Shape::Tumbling { size } => {
                let start = t.div_euclid(size) * size;
                if start + size <= wm {
                    return false;
                }
                self.add_to_pane(scope, start, key, vals, t);
                true
            }
            Shape::Hopping { size, hop } => {
                let mut start = t.div_euclid(hop) * hop;
                let mut any = false;
                while start + size > t {
                    if start + size > wm {
                        self.add_to_pane(scope, start, key, vals, t);
                        any = true;
                    }
                    start -= hop;
                }
                any
            }
            Shape::Session { gap, max } => self.add_to_session(scope, key, vals, t, gap, max, wm),
        }
    }

    fn update_gauges(&self) {
        let open: usize = self.state.panes.values().map(|p| p.keys.len()).sum::<usize>() + self.timers.len();
        self.metrics.open_windows.set(open as i64);
        let wm = self.state.watermark.current();
        if wm != i64::MIN {
            self.metrics.watermark.set(wm / 1_000_000);
        }
    }

    /// Open (group, window) states.
    pub fn open_states(&self) -> usize {
        self.state.panes.values().map(|p| p.keys.len()).sum::<usize>() + self.timers.len()
    }

    /// Bytes held by open window state (heap of the accumulators and keys), for the memory report.
    pub fn state_bytes(&self) -> usize {
        let mut b = 0;
        for p in self.state.panes.values() {
            b += p.cells.capacity() * 8;
            b += p.keys.capacity() * std::mem::size_of::<Box<str>>() + p.keys.iter().map(|k| k.len()).sum::<usize>();
            b += p.index.capacity() * (std::mem::size_of::<u32>() + 1);
            b += p.sketches.len() * std::mem::size_of::<DDSketch>();
        }
        b
    }
}

impl Transform for Window {
    fn process(&mut self, batch: Batch, out: &mut Emitter) {
        let before = self.skipped.0;
        // Reading fields is most of the work and needs no state: do it in parallel. The update
        // below is sequential, in input order, so results do not depend on the split.
        let parts: Vec<Extracted> = if batch.len() >= *super::PARALLEL_BATCH {
            batch.events.par_chunks(EXTRACT_CHUNK).map(|c| self.extract(c)).collect()
        } else {
            vec![self.extract(&batch.events)]
        };
        let nf = self.plan.fields.len();
        let mut events = batch.events.into_iter();
        // freeing a batch of events is measurable too: in parallel as well, where that pays
        let par_drop = batch_len_hint(&parts) >= *super::PARALLEL_BATCH;
        let mut done = Vec::with_capacity(if par_drop { batch_len_hint(&parts) } else { 0 });
        for x in &parts {
            for (i, &(t, k0, k1)) in x.recs.iter().enumerate() {
                let ev = events.next().expect("one record per event");
                if t == NO_TIME {
                    let what =
                        self.time.as_ref().map(|p| p.as_str().to_string()).unwrap_or_else(|| "enqueuedTime".into());
                    out.emit_to(
                        DEAD,
                        super::dead_letter_of(&ev, &format!("no usable event time in `{what}`"), &self.name),
                    );
                    self.metrics.dead_letters.inc();
                    continue;
                }
                let key = &x.keys[k0 as usize..k1 as usize];
                let scope = self.scope_of(&ev);
                if self.update(scope, t, key, &x.vals[i * nf..(i + 1) * nf]) {
                    self.state.watermark.observe(ev.meta.source, ev.meta.partition, t);
                    if par_drop {
                        done.push(ev);
                    }
                } else {
                    self.metrics.late_events.inc();
                    if self.late == LateMode::Output {
                        out.emit_to(LATE, ev);
                    }
                }
            }
        }
        if par_drop {
            done.into_par_iter().for_each(drop);
        }
        self.metrics.skipped_values.inc_by(self.skipped.0 - before);
        self.emit_ready(false, out);
    }

    fn on_tick(&mut self, now: Nanos, out: &mut Emitter) {
        if self.state.watermark.tick(now) {
            self.emit_ready(false, out);
        }
        if let Some(lag) = self.state.watermark.lag_seconds(now) {
            self.metrics.watermark_lag.set(lag);
        }
    }

    fn advance_watermark(&mut self, to: Nanos, out: &mut Emitter) {
        self.state.watermark.advance_to(to);
        self.emit_ready(false, out);
        self.update_gauges();
    }

    fn on_end(&mut self, flush: bool, out: &mut Emitter) {
        if flush {
            self.emit_ready(true, out);
        }
    }

    fn snapshot(&self) -> anyhow::Result<Vec<u8>> {
        Ok(postcard::to_allocvec(&self.state)?)
    }

    fn state_partitions(&self) -> Vec<(u16, u32)> {
        if !self.partitioned {
            return Vec::new();
        }
        let mut set: BTreeSet<Scope> = self.state.watermark.partitions().into_iter().collect();
        set.extend(self.state.panes.keys().map(|(s, p, _)| (*s, *p)));
        set.extend(self.state.sessions.keys().map(|(s, p, _)| (*s, *p)));
        set.into_iter().collect()
    }

    fn partition_state(&self, source: u16, partition: u32) -> anyhow::Result<Vec<u8>> {
        #[derive(Serialize)]
        struct SliceRef<'a> {
            panes: Vec<(Nanos, &'a Pane)>,
            sessions: Vec<(&'a str, &'a [Session])>,
            max: Option<Nanos>,
        }
        let slice = SliceRef {
            panes: self
                .state
                .panes
                .range((source, partition, Nanos::MIN)..=(source, partition, Nanos::MAX))
                .map(|((_, _, start), pane)| (*start, pane))
                .collect(),
            sessions: self
                .state
                .sessions
                .iter()
                .filter(|((s, p, _), _)| *s == source && *p == partition)
                .map(|((_, _, k), v)| (&**k, v.as_slice()))
                .collect(),
            max: self.state.watermark.partition_max(source, partition),
        };
        Ok(postcard::to_allocvec(&slice)?)
    }

    fn set_partition_state(&mut self, source: u16, partition: u32, state: Option<&[u8]>) -> anyhow::Result<()> {
        // drop what this instance holds for the partition ...
        self.state.panes.retain(|(s, p, _), _| !(*s == source && *p == partition));
        self.state.sessions.retain(|(s, p, _), _| !(*s == source && *p == partition));
        self.timers.retain(|(_, scope, ..)| *scope != (source, partition));
        self.state.watermark.set_partition(source, partition, None);
        self.last_pane = None;
        // ... and adopt what its previous reader checkpointed
        if let Some(bytes) = state.filter(|b| !b.is_empty()) {
            let slice: Slice = postcard::from_bytes(bytes).context("partition state is corrupt")?;
            for (start, mut pane) in slice.panes {
                pane.reindex();
                self.state.panes.insert((source, partition, start), pane);
            }
            for (key, list) in slice.sessions {
                for s in &list {
                    self.timers.insert((
                        session_end(self.shape, s.first, s.last),
                        (source, partition),
                        key.clone(),
                        s.first,
                    ));
                }
                self.state.sessions.insert((source, partition, key), list);
            }
            self.state.watermark.set_partition(source, partition, slice.max);
        }
        self.update_gauges();
        Ok(())
    }
}

#[cfg(test)]
mod tests;
