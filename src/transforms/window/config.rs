//! The transform's YAML configuration ([`WindowConfig`]: the windows, time, grouping and
//! aggregates) and its [`Spec`]: the checks `centralflow check` runs on it.

use std::collections::BTreeSet;

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::agg::{self, AggFn};
use super::PORTS;
use crate::config::values::{self, Dur, Parsed};
use crate::config::{Checker, Spec};
use crate::path::FieldPath;
use crate::runtime::Port;

/// Event-time windowed aggregation.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    pub inputs: Vec<String>,
    /// The windows: `{kind: tumbling, size: 1m}`, `{kind: hopping, size: 10m, hop: 1m}` or
    /// `{kind: session, gap: 5m, max_duration: 1h}`.
    pub window: WindowSpec,
    /// The timestamp field (default: `enqueuedTime`, or `window_start` for window output).
    #[serde(default)]
    pub time: Option<values::Path>,
    /// How far behind the largest event time seen an event may arrive and still count.
    #[serde(default = "d_zero")]
    pub allowed_lateness: Dur,
    /// In `run`: a partition without events for this long stops holding the watermark back.
    #[serde(default = "d_idle")]
    pub idle_timeout: Dur,
    /// Fields to group by.
    #[serde(default = "d_group")]
    pub group_by: Vec<values::Path>,
    /// `field: [aggregates]`: count, sum, avg, min, max, first, last, stddev, stddev_pop,
    /// median, pNN (p95, p99), qX (q0.999).
    #[serde(default)]
    pub aggregates: IndexMap<values::Path, Vec<Parsed<AggFn>>>,
    /// Late events: `output` (to `NAME.late`) or `drop` (counted in `late_events`).
    #[serde(default)]
    pub late: LateMode,
}

fn d_zero() -> Dur {
    Dur::new("0s")
}
fn d_idle() -> Dur {
    Dur::new("1m")
}
fn d_group() -> Vec<values::Path> {
    vec![values::Path::new("deviceId")]
}

/// The kind of window.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum WindowSpec {
    /// Fixed, non-overlapping windows aligned to the Unix epoch.
    Tumbling { size: Dur },
    /// Windows of `size` starting every `hop`.
    Hopping { size: Dur, hop: Dur },
    /// Activity sessions: a session ends after `gap` without events. With `max_duration`, no
    /// session crosses a multiple of it (counted from the Unix epoch).
    Session {
        gap: Dur,
        #[serde(default)]
        max_duration: Option<Dur>,
    },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LateMode {
    #[default]
    Output,
    Drop,
}

impl Spec for WindowConfig {
    fn check(&self, ptr: &str, cx: &mut Checker<'_>) {
        let w = format!("{ptr}/window");
        match &self.window {
            WindowSpec::Tumbling { size } => {
                cx.positive_duration(&format!("{w}/size"), size);
            }
            WindowSpec::Hopping { size, hop } => {
                let s = cx.positive_duration(&format!("{w}/size"), size);
                let h = cx.positive_duration(&format!("{w}/hop"), hop);
                if let (Some(s), Some(h)) = (s, h) {
                    if h > s {
                        cx.error(&format!("{w}/hop"), "must not be longer than `size` (windows would leave gaps)");
                    } else if s.as_nanos() % h.as_nanos() != 0 {
                        cx.error(&format!("{w}/hop"), "`size` must be a multiple of `hop`");
                    } else if s.as_nanos() / h.as_nanos() > 1000 {
                        cx.error(&format!("{w}/hop"), "more than 1000 windows overlap: use a larger hop");
                    }
                }
            }
            WindowSpec::Session { gap, max_duration } => {
                let g = cx.positive_duration(&format!("{w}/gap"), gap);
                if let Some(m) = max_duration {
                    let m = cx.positive_duration(&format!("{w}/max_duration"), m);
                    if let (Some(g), Some(m)) = (g, m) {
                        if m <= g {
                            cx.error(&format!("{w}/max_duration"), "must be longer than `gap`");
                        }
                    }
                }
            }
        }
        cx.duration(&format!("{ptr}/allowed_lateness"), &self.allowed_lateness);
        cx.positive_duration(&format!("{ptr}/idle_timeout"), &self.idle_timeout);
        if let Some(t) = &self.time {
            cx.valid(&format!("{ptr}/time"), t);
        }
        for (i, g) in self.group_by.iter().enumerate() {
            cx.valid(&format!("{ptr}/group_by/{i}"), g);
        }
        let mut columns = BTreeSet::new();
        for (field, fns) in &self.aggregates {
            let p = format!("{ptr}/aggregates/{}", crate::config::yaml::pointer_escape(field.text()));
            let Some(path) = cx.valid(&p, field) else { continue };
            if fns.is_empty() {
                cx.error(&p, "lists no aggregates");
            }
            for (i, f) in fns.iter().enumerate() {
                if let Some(func) = cx.valid(&format!("{p}/{i}"), f) {
                    let col = format!("{}_{}", agg::column_name(path), func.suffix());
                    if !columns.insert(col.clone()) {
                        cx.error(&format!("{p}/{i}"), format!("the column `{col}` is produced twice"));
                    }
                }
            }
        }
    }
    fn inputs(&self) -> &[String] {
        &self.inputs
    }
    fn ports(&self) -> Vec<Port> {
        PORTS.to_vec()
    }
    fn needs(&self) -> crate::config::Needs {
        let paths: Result<Vec<FieldPath>, &str> =
            self.time.iter().chain(&self.group_by).chain(self.aggregates.keys()).map(|p| p.value().cloned()).collect();
        match paths {
            Ok(p) => crate::config::Needs::Fields(p),
            Err(_) => crate::config::Needs::All,
        }
    }
    fn check_partitioned(&self, ptr: &str, cx: &mut Checker<'_>) {
        if !self.group_by.iter().any(|g| g.text() == "deviceId") {
            cx.warn(
                &format!("{ptr}/group_by"),
                "its input comes from partitions that move between instances, so its state and watermark are \
                 kept per partition: a group whose events span partitions gives one row per partition and window. \
                 Include `deviceId` in `group_by` when the hub is partitioned by device",
            );
        }
    }
}
