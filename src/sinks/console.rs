//! `console`: prints events to standard output, for debugging and short summaries.

use std::io::Write as _;
use std::sync::Arc;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::{Checker, Spec};
use crate::event::Batch;
use crate::metrics::ComponentMetrics;
use crate::runtime::{BuildCx, Sink};

/// Prints events.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    pub inputs: Vec<String>,
    /// `json` (one JSON object per line) or `text` (`key=value` pairs).
    #[serde(default)]
    pub format: ConsoleFormat,
    /// Print at most this many events; the rest are counted and reported when the pipeline ends.
    #[serde(default)]
    pub limit: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ConsoleFormat {
    #[default]
    Json,
    Text,
}

impl Spec for ConsoleConfig {
    fn check(&self, _ptr: &str, _cx: &mut Checker<'_>) {}
    fn inputs(&self) -> &[String] {
        &self.inputs
    }
}

pub struct ConsoleSink {
    cfg: ConsoleConfig,
    name: String,
    printed: u64,
    hidden: u64,
    metrics: ComponentMetrics,
}

impl ConsoleSink {
    pub fn new(cfg: ConsoleConfig, cx: &BuildCx<'_>) -> ConsoleSink {
        ConsoleSink { cfg, name: cx.name.to_string(), printed: 0, hidden: 0, metrics: cx.metrics.clone() }
    }
}

/// `key=value` rendering of an event's top-level fields.
pub fn text_line(ev: &crate::event::Event) -> String {
    let mut s = String::new();
    for (i, (k, v)) in ev.root().iter().enumerate() {
        if i > 0 {
            s.push(' ');
        }
        s.push_str(k);
        s.push('=');
        match v {
            crate::event::ValRef::Str(t) => s.push_str(&t),
            other => s.push_str(&other.to_json()),
        }
    }
    s
}

#[async_trait]
impl Sink for ConsoleSink {
    async fn write(&mut self, batch: Arc<Batch>) -> anyhow::Result<()> {
        let mut out = String::new();
        for ev in &batch.events {
            if self.cfg.limit.is_some_and(|l| self.printed >= l) {
                self.hidden += 1;
                continue;
            }
            match self.cfg.format {
                ConsoleFormat::Json => ev.write_json(&mut out),
                ConsoleFormat::Text => out.push_str(&text_line(ev)),
            }
            out.push('\n');
            self.printed += 1;
        }
        self.metrics.events_out.inc_by(batch.len() as u64);
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(out.as_bytes())?;
        Ok(())
    }
    async fn flush(&mut self, _epoch: u64) -> anyhow::Result<Vec<u8>> {
        std::io::stdout().flush()?;
        Ok(Vec::new())
    }
    async fn commit(&mut self, _epoch: u64) -> anyhow::Result<()> {
        Ok(())
    }
    async fn close(&mut self) -> anyhow::Result<()> {
        if self.hidden > 0 {
            println!("({}: {} more events not shown, limit {})", self.name, self.hidden, self.cfg.limit.unwrap_or(0));
        }
        std::io::stdout().flush()?;
        Ok(())
    }
}
