//! Process metrics in Prometheus format (`/metrics`), labelled by pipeline component.
//!
//! Components get a [`ComponentMetrics`] handle with their counters resolved once, so counting on
//! the hot path is an atomic add per batch, never a map lookup.

use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::{Arc, Mutex, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ComponentLabel {
    pub component: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabel {
    pub component: String,
    pub partition: String,
}

/// All metric families of the process.
pub struct Metrics {
    registry: Mutex<Registry>,
    pub events_in: Family<ComponentLabel, Counter>,
    pub events_out: Family<ComponentLabel, Counter>,
    pub bytes_in: Family<ComponentLabel, Counter>,
    pub bytes_out: Family<ComponentLabel, Counter>,
    pub errors: Family<ComponentLabel, Counter>,
    pub dead_letters: Family<ComponentLabel, Counter>,
    pub late_events: Family<ComponentLabel, Counter>,
    pub skipped_values: Family<ComponentLabel, Counter>,
    pub batch_seconds: Family<ComponentLabel, Histogram>,
    pub watermark_lag_seconds: Family<ComponentLabel, Gauge<f64, AtomicU64>>,
    pub watermark: Family<ComponentLabel, Gauge<i64, AtomicI64>>,
    pub open_windows: Family<ComponentLabel, Gauge<i64, AtomicI64>>,
    pub connected: Family<ComponentLabel, Gauge<i64, AtomicI64>>,
    pub reconnects: Family<ComponentLabel, Counter>,
    pub committed: Family<ComponentLabel, Counter>,
    pub consumer_lag: Family<PartitionLabel, Gauge<i64, AtomicI64>>,
    pub list_requests: Family<ComponentLabel, Counter>,
    pub listed_entries: Family<ComponentLabel, Counter>,
    pub checkpoint_seconds: Histogram,
    pub checkpoint_age_seconds: Gauge<f64, AtomicU64>,
    pub checkpoint_epoch: Gauge<i64, AtomicI64>,
    pub checkpoints_failed: Counter,
}

fn batch_buckets() -> Histogram {
    Histogram::new([0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0])
}

impl Metrics {
    fn new() -> Metrics {
        let mut r = Registry::with_prefix("centralflow");
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            events_in: Family::default(),
            events_out: Family::default(),
            bytes_in: Family::default(),
            bytes_out: Family::default(),
            errors: Family::default(),
            dead_letters: Family::default(),
            late_events: Family::default(),
            skipped_values: Family::default(),
            batch_seconds: Family::new_with_constructor(batch_buckets),
            watermark_lag_seconds: Family::default(),
            watermark: Family::default(),
            open_windows: Family::default(),
            connected: Family::default(),
            reconnects: Family::default(),
            committed: Family::default(),
            consumer_lag: Family::default(),
            list_requests: Family::default(),
            listed_entries: Family::default(),
            checkpoint_seconds: Histogram::new([0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0]),
            checkpoint_age_seconds: Gauge::default(),
            checkpoint_epoch: Gauge::default(),
            checkpoints_failed: Counter::default(),
        };
        r.register("events_in", "Events received by a component", m.events_in.clone());
        r.register("events_out", "Events emitted or written by a component", m.events_out.clone());
        r.register("bytes_in", "Bytes received by a component (source text)", m.bytes_in.clone());
        r.register("bytes_out", "Bytes written by a sink", m.bytes_out.clone());
        r.register("errors", "Errors (retried or not) in a component", m.errors.clone());
        r.register("dead_letters", "Records sent to a dead-letter output", m.dead_letters.clone());
        r.register("late_events", "Events later than the allowed lateness", m.late_events.clone());
        r.register("skipped_values", "Aggregated values that were missing or not numeric", m.skipped_values.clone());
        r.register("batch_seconds", "Time to process one batch", m.batch_seconds.clone());
        r.register("watermark_lag_seconds", "Wall clock minus watermark", m.watermark_lag_seconds.clone());
        r.register("watermark_ms", "Current watermark, Unix milliseconds", m.watermark.clone());
        r.register("open_windows", "Open (group, window) states", m.open_windows.clone());
        r.register("source_connected", "1 when a source's connection is up", m.connected.clone());
        r.register("source_reconnects", "Reconnections of a source", m.reconnects.clone());
        r.register(
            "source_committed",
            "Input messages a source settled at its origin (acknowledged, checkpointed) once a checkpoint covered them",
            m.committed.clone(),
        );
        r.register("consumer_lag", "Messages waiting at the broker, where known", m.consumer_lag.clone());
        r.register("source_list_requests", "Listings a source made (files: `follow`)", m.list_requests.clone());
        r.register("source_listed_entries", "Objects and folders those listings returned", m.listed_entries.clone());
        r.register(
            "checkpoint_duration_seconds",
            "Time from barrier to durable checkpoint",
            m.checkpoint_seconds.clone(),
        );
        r.register(
            "checkpoint_age_seconds",
            "Time since the last durable checkpoint",
            m.checkpoint_age_seconds.clone(),
        );
        r.register("checkpoint_epoch", "Epoch of the last durable checkpoint", m.checkpoint_epoch.clone());
        r.register("checkpoints_failed", "Checkpoints that could not be written", m.checkpoints_failed.clone());
        *m.registry.lock().unwrap() = r;
        m
    }

    /// Text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let r = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        out
    }
}

/// The process-wide metrics.
pub fn global() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::new)
}

/// Counters of one component, resolved once.
#[derive(Clone)]
pub struct ComponentMetrics {
    pub label: ComponentLabel,
    pub events_in: Counter,
    pub events_out: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub errors: Counter,
    pub dead_letters: Counter,
    pub late_events: Counter,
    pub skipped_values: Counter,
    pub batch_seconds: Histogram,
    pub connected: Gauge<i64, AtomicI64>,
    pub reconnects: Counter,
    pub committed: Counter,
    pub watermark: Gauge<i64, AtomicI64>,
    pub watermark_lag: Gauge<f64, AtomicU64>,
    pub open_windows: Gauge<i64, AtomicI64>,
}

impl ComponentMetrics {
    pub fn new(component: &str, kind: &str) -> ComponentMetrics {
        let m = global();
        let label = ComponentLabel { component: component.to_string(), kind: kind.to_string() };
        ComponentMetrics {
            events_in: m.events_in.get_or_create(&label).clone(),
            events_out: m.events_out.get_or_create(&label).clone(),
            bytes_in: m.bytes_in.get_or_create(&label).clone(),
            bytes_out: m.bytes_out.get_or_create(&label).clone(),
            errors: m.errors.get_or_create(&label).clone(),
            dead_letters: m.dead_letters.get_or_create(&label).clone(),
            late_events: m.late_events.get_or_create(&label).clone(),
            skipped_values: m.skipped_values.get_or_create(&label).clone(),
            batch_seconds: m.batch_seconds.get_or_create(&label).clone(),
            connected: m.connected.get_or_create(&label).clone(),
            reconnects: m.reconnects.get_or_create(&label).clone(),
            committed: m.committed.get_or_create(&label).clone(),
            watermark: m.watermark.get_or_create(&label).clone(),
            watermark_lag: m.watermark_lag_seconds.get_or_create(&label).clone(),
            open_windows: m.open_windows.get_or_create(&label).clone(),
            label,
        }
    }
}

/// Progress of a replay, shared by sources (writers) and the progress bar (reader).
#[derive(Default, Debug)]
pub struct Progress {
    pub total_bytes: AtomicU64,
    pub done_bytes: AtomicU64,
    pub events: AtomicU64,
    pub total_events: AtomicU64,
}

pub type SharedProgress = Arc<Progress>;

/// Readiness of the components that have an outside connection (sources and sinks), for
/// `/health/ready`. A component that never registers is not consulted.
fn readiness_map() -> &'static Mutex<std::collections::BTreeMap<String, (bool, String)>> {
    static R: OnceLock<Mutex<std::collections::BTreeMap<String, (bool, String)>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// Records whether a component can do its work now, with a short reason.
pub fn set_ready(component: &str, ready: bool, detail: &str) {
    readiness_map()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(component.to_string(), (ready, detail.to_string()));
}

/// Forgets a component (it stopped).
pub fn clear_ready(component: &str) {
    readiness_map().lock().unwrap_or_else(|e| e.into_inner()).remove(component);
}

/// Whether every registered component is ready, and the state of each.
pub fn readiness() -> (bool, Vec<(String, bool, String)>) {
    let m = readiness_map().lock().unwrap_or_else(|e| e.into_inner());
    let all = m.values().all(|(r, _)| *r);
    (all, m.iter().map(|(k, (r, d))| (k.clone(), *r, d.clone())).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_show_up_in_the_exposition() {
        let c = ComponentMetrics::new("test_metrics_src", "files");
        c.events_out.inc_by(5);
        c.dead_letters.inc();
        let text = global().encode();
        assert!(
            text.contains(r#"centralflow_events_out_total{component="test_metrics_src",kind="files"} 5"#),
            "{text}"
        );
        assert!(text.contains(r#"centralflow_dead_letters_total{component="test_metrics_src",kind="files"} 1"#));
    }
}
