//! `device_context`: joins each device's own state, as the export tells it (property changes,
//! connectivity, lifecycle), into its other events by event time.
//!
//! State messages (`properties`, `deviceConnectivity`, `deviceLifecycle`) update a per-device
//! state and are not passed on (unless `keep_state_messages`); every other event passes on with
//! a `device` object: `device.properties.NAME` (`device.properties.COMPONENT.NAME`),
//! `device.desired.NAME`, `device.connected`, `device.connected_since`, `device.lifecycle`,
//! `device.templateId`.
//!
//! **Event time** (`mode: event_time`, the default): an event gets the state as of its own
//! time: the latest state message of its device at or before it, what a DuckDB `ASOF JOIN`
//! gives. Since a state message may arrive up to `allowed_lateness` after events it precedes,
//! events are held until the watermark (the largest event time seen, per input partition, minus
//! `allowed_lateness`; the least over partitions) passes them, then released in event-time
//! order, state messages before events of the same time. The cost is latency: an event leaves
//! `allowed_lateness` (plus the time until a later event arrives) after it came. An event that
//! arrives behind the watermark gets the state as it stands (counted in `late_events`).
//! `mode: latest` holds nothing back: each event gets the state as it stands when the event
//! arrives, which depends on arrival order and is therefore not replay-deterministic.
//!
//! State (devices and held events) is checkpointed; per input partition when the source hands
//! partitions over. A `deleted` lifecycle message forgets the device.

mod held;
mod state;

use std::collections::{BTreeMap, HashMap};

use anyhow::Context as _;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use self::held::Held;
use self::state::{is_state_message, DeviceState, Effect};
use super::watermark::Watermark;
use crate::config::values::{self, Dur};
use crate::config::{Checker, Needs, Spec};
use crate::event::{Batch, Event, Kind, Nanos, Value, NO_TIME};
use crate::metrics::ComponentMetrics;
use crate::path::FieldPath;
use crate::runtime::{BuildCx, Emitter, Port, Transform};

/// Events without a usable time.
pub const DEAD_LETTER: Port = Port::DEAD_LETTER;

/// Device state joined into events by event time.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceContextConfig {
    pub inputs: Vec<String>,
    /// `event_time` (default: each event gets the state as of its own time, replay equals live)
    /// or `latest` (the state when the event arrives; no waiting, not replay-deterministic).
    #[serde(default)]
    pub mode: ContextMode,
    /// How late a state message may arrive after events it precedes (event_time mode): events
    /// are held this long behind the newest event time.
    #[serde(default = "d_lateness")]
    pub allowed_lateness: Dur,
    /// In `run`: a partition without events for this long stops holding the watermark back.
    #[serde(default = "d_idle")]
    pub idle_timeout: Dur,
    /// The timestamp field (default: `enqueuedTime`).
    #[serde(default)]
    pub time: Option<values::Path>,
    /// Also pass the state messages on (after applying them).
    #[serde(default)]
    pub keep_state_messages: bool,
}

/// When an event's device state is taken.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ContextMode {
    #[default]
    EventTime,
    Latest,
}

fn d_lateness() -> Dur {
    Dur::new("30s")
}
fn d_idle() -> Dur {
    Dur::new("1m")
}

impl Spec for DeviceContextConfig {
    fn check(&self, ptr: &str, cx: &mut Checker<'_>) {
        cx.duration(&format!("{ptr}/allowed_lateness"), &self.allowed_lateness);
        cx.positive_duration(&format!("{ptr}/idle_timeout"), &self.idle_timeout);
        if let Some(t) = &self.time {
            cx.valid(&format!("{ptr}/time"), t);
        }
    }
    fn inputs(&self) -> &[String] {
        &self.inputs
    }
    fn ports(&self) -> Vec<Port> {
        vec![Port::MAIN, DEAD_LETTER]
    }
    fn needs(&self) -> Needs {
        let mut paths: Vec<FieldPath> = ["messageSource", "messageType", "deviceId", "templateId", "properties"]
            .iter()
            .filter_map(|p| FieldPath::parse(p).ok())
            .collect();
        if let Some(Ok(t)) = self.time.as_ref().map(|t| t.value().cloned()) {
            paths.push(t);
        }
        Needs::Fields(paths)
    }
    fn forwards(&self) -> bool {
        true
    }
}

/// Whose state: (source index, input partition) when state is kept per partition, else (0, 0).
type Scope = (u16, u32);

/// The state of one scope: its devices, and the events held until the watermark passes them.
#[derive(Debug, Default, Serialize, Deserialize)]
struct ScopeState {
    devices: HashMap<String, DeviceState>,
    /// By (event time, 0 for state messages / 1 for others, arrival number).
    held: BTreeMap<(Nanos, u8, u64), Held>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    watermark: Watermark,
    scopes: BTreeMap<Scope, ScopeState>,
    seq: u64,
}

pub struct DeviceContext {
    mode: ContextMode,
    time: Option<FieldPath>,
    keep_state: bool,
    partitioned: bool,
    state: State,
    name: String,
    metrics: ComponentMetrics,
}

impl DeviceContext {
    pub fn new(cfg: &DeviceContextConfig, cx: &BuildCx<'_>) -> anyhow::Result<DeviceContext> {
        let lateness = cfg.allowed_lateness.nanos()?;
        let idle = cfg.idle_timeout.nanos()?;
        let mut t = DeviceContext {
            mode: cfg.mode,
            time: cfg.time.as_ref().map(|p| p.get()).transpose()?,
            keep_state: cfg.keep_state_messages,
            partitioned: cx.partitioned,
            state: State { watermark: Watermark::new(lateness, idle), ..Default::default() },
            name: cx.name.to_string(),
            metrics: cx.metrics.clone(),
        };
        if let Some(bytes) = cx.restored.as_deref().filter(|s| !s.is_empty()) {
            let restored: State =
                postcard::from_bytes(bytes).context("device_context state in the checkpoint is corrupt")?;
            t.state.scopes = restored.scopes;
            t.state.seq = restored.seq;
            let (l, i) = (t.state.watermark.lateness, t.state.watermark.idle_timeout);
            t.state.watermark = restored.watermark;
            t.state.watermark.lateness = l;
            t.state.watermark.idle_timeout = i;
        }
        Ok(t)
    }

    fn event_time(&self, ev: &Event) -> Option<Nanos> {
        match &self.time {
            Some(p) if !(p.as_str() == "enqueuedTime" && matches!(ev.kind, Kind::Export(_))) => {
                p.get(ev).and_then(|v| v.as_time())
            }
            _ => (ev.time != NO_TIME).then_some(ev.time),
        }
    }

    fn scope_of(&self, ev: &Event) -> Scope {
        if self.partitioned {
            (ev.meta.source, ev.meta.partition)
        } else {
            (0, 0)
        }
    }

    fn watermark_of(&self, scope: Scope) -> Nanos {
        if self.partitioned {
            self.state.watermark.partition(scope.0, scope.1)
        } else {
            self.state.watermark.current()
        }
    }

    /// Applies a state message, or adds the device's state to an event, and emits it.
    fn settle(scope: &mut ScopeState, mut ev: Event, t: Nanos, keep_state: bool, out: &mut Emitter) {
        let device = ev.get("deviceId").and_then(|v| v.as_str().map(str::to_string));
        if is_state_message(&ev) {
            if let Some(d) = device {
                if let Effect::Deleted = scope.devices.entry(d.clone()).or_default().apply(&ev, t) {
                    scope.devices.remove(&d);
                }
            }
            if keep_state {
                out.emit(ev);
            }
            return;
        }
        if let Some(state) = device.and_then(|d| scope.devices.get_mut(&d)) {
            ev.set(&["device"], Value::Json(state.object().to_string()));
        }
        out.emit(ev);
    }

    /// Releases, in event-time order, the held events the watermark has passed (all of them
    /// with `all`).
    fn release(&mut self, all: bool, out: &mut Emitter) {
        let scopes: Vec<Scope> = self.state.scopes.keys().copied().collect();
        for scope in scopes {
            let wm = if all { Nanos::MAX } else { self.watermark_of(scope) };
            let keep = self.keep_state;
            let Some(st) = self.state.scopes.get_mut(&scope) else { continue };
            while let Some(entry) = st.held.first_entry() {
                if entry.key().0 >= wm {
                    break;
                }
                let ((t, _, _), held) = entry.remove_entry();
                match held.into_event() {
                    Ok(ev) => Self::settle(st, ev, t, keep, out),
                    Err(e) => tracing::error!(component = %self.name, "a held event could not be restored: {e}"),
                }
            }
        }
        self.update_gauges();
    }

    fn update_gauges(&self) {
        let held: usize = self.state.scopes.values().map(|s| s.held.len()).sum();
        self.metrics.open_windows.set(held as i64);
        let wm = self.state.watermark.current();
        if wm != i64::MIN {
            self.metrics.watermark.set(wm / 1_000_000);
        }
    }

    /// Devices known, over every scope.
    pub fn devices(&self) -> usize {
        self.state.scopes.values().map(|s| s.devices.len()).sum()
    }

    /// Approximate heap bytes of the device states (for the memory figures).
    pub fn state_bytes(&self) -> usize {
        let per_entry = std::mem::size_of::<(String, DeviceState)>() + 8;
        self.state
            .scopes
            .values()
            .flat_map(|s| s.devices.iter())
            .map(|(k, d)| per_entry + k.capacity() + d.heap_bytes())
            .sum()
    }
}

impl Transform for DeviceContext {
    fn process(&mut self, batch: Batch, out: &mut Emitter) {
        for ev in batch.events {
            let Some(t) = self.event_time(&ev) else {
                let what = self.time.as_ref().map_or("enqueuedTime", |p| p.as_str()).to_string();
                out.emit_to(
                    DEAD_LETTER,
                    super::dead_letter_of(&ev, &format!("no usable event time in `{what}`"), &self.name),
                );
                self.metrics.dead_letters.inc();
                continue;
            };
            let scope = self.scope_of(&ev);
            let behind = self.mode == ContextMode::Latest || t < self.watermark_of(scope);
            if behind && self.mode == ContextMode::EventTime && !is_state_message(&ev) {
                self.metrics.late_events.inc();
            }
            self.state.watermark.observe(ev.meta.source, ev.meta.partition, t);
            let keep = self.keep_state;
            let st = self.state.scopes.entry(scope).or_default();
            if behind {
                if self.mode == ContextMode::EventTime {
                    // what the watermark passed comes first, so the state is as of now
                    self.release(false, out);
                }
                let st = self.state.scopes.entry(scope).or_default();
                Self::settle(st, ev, t, keep, out);
            } else {
                let order = u8::from(!is_state_message(&ev));
                self.state.seq += 1;
                st.held.insert((t, order, self.state.seq), Held::of(&ev));
            }
        }
        if self.mode == ContextMode::EventTime {
            self.release(false, out);
        }
    }

    fn on_tick(&mut self, now: Nanos, out: &mut Emitter) {
        if self.state.watermark.tick(now) {
            self.release(false, out);
        }
        if let Some(lag) = self.state.watermark.lag_seconds(now) {
            self.metrics.watermark_lag.set(lag);
        }
    }

    fn advance_watermark(&mut self, to: Nanos, out: &mut Emitter) {
        self.state.watermark.advance_to(to);
        self.release(false, out);
    }

    fn on_end(&mut self, flush: bool, out: &mut Emitter) {
        if flush {
            self.release(true, out);
        }
    }

    fn snapshot(&self) -> anyhow::Result<Vec<u8>> {
        Ok(postcard::to_allocvec(&self.state)?)
    }

    fn state_partitions(&self) -> Vec<(u16, u32)> {
        if !self.partitioned {
            return Vec::new();
        }
        let mut set: std::collections::BTreeSet<Scope> = self.state.watermark.partitions().into_iter().collect();
        set.extend(self.state.scopes.keys().copied());
        set.into_iter().collect()
    }

    fn partition_state(&self, source: u16, partition: u32) -> anyhow::Result<Vec<u8>> {
        #[derive(Serialize)]
        struct SliceRef<'a> {
            scope: Option<&'a ScopeState>,
            max: Option<Nanos>,
        }
        let slice = SliceRef {
            scope: self.state.scopes.get(&(source, partition)),
            max: self.state.watermark.partition_max(source, partition),
        };
        Ok(postcard::to_allocvec(&slice)?)
    }

    fn set_partition_state(&mut self, source: u16, partition: u32, state: Option<&[u8]>) -> anyhow::Result<()> {
        self.state.scopes.remove(&(source, partition));
        self.state.watermark.set_partition(source, partition, None);
        if let Some(bytes) = state.filter(|b| !b.is_empty()) {
            #[derive(Deserialize)]
            struct SliceOwned {
                scope: Option<ScopeState>,
                max: Option<Nanos>,
            }
            let slice: SliceOwned = postcard::from_bytes(bytes).context("partition state is corrupt")?;
            if let Some(s) = slice.scope {
                self.state.scopes.insert((source, partition), s);
            }
            self.state.watermark.set_partition(source, partition, slice.max);
        }
        self.update_gauges();
        Ok(())
    }
}

#[cfg(test)]
mod tests;
