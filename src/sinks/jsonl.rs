//! `jsonl`: writes events as JSON lines to a local file (or `-` for standard output), for
//! debugging and for small outputs that other tools read. Lines are flushed at every checkpoint,
//! which records the file's length: a restart (after a crash or a reload) cuts the file back to
//! that length before the source replays what came after, so each line is in it once.

use std::io::Write as _;
use std::sync::Arc;

use anyhow::Context;
use async_trait::async_trait;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::{Checker, Spec};
use crate::event::Batch;
use crate::metrics::ComponentMetrics;
use crate::runtime::{BuildCx, Sink};

/// Writes JSON lines.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JsonlConfig {
    pub inputs: Vec<String>,
    /// A local file path, or `-` for standard output.
    pub path: String,
    /// Append to the file instead of replacing it when the pipeline starts without a
    /// checkpoint (with one, the file always continues from the checkpoint).
    #[serde(default)]
    pub append: bool,
    /// Write at most this many events per second (a slow consumer on purpose; upstream slows
    /// down with it).
    #[serde(default)]
    pub rate_limit: Option<f64>,
}

impl Spec for JsonlConfig {
    fn check(&self, ptr: &str, cx: &mut Checker<'_>) {
        if self.path.trim().is_empty() {
            cx.error(&format!("{ptr}/path"), "is empty");
        }
        if self.rate_limit.is_some_and(|r| r.is_nan() || r <= 0.0) {
            cx.error(&format!("{ptr}/rate_limit"), "must be a positive number of events per second");
        }
    }
    fn inputs(&self) -> &[String] {
        &self.inputs
    }
}

pub struct JsonlSink {
    out: Box<dyn std::io::Write + Send>,
    /// The file (not standard output): its path, and whether to keep what it holds.
    file: Option<(std::path::PathBuf, bool)>,
    /// Bytes in the file, flushed or buffered.
    len: u64,
    metrics: ComponentMetrics,
    rate_limit: Option<f64>,
    started: Option<std::time::Instant>,
    written: u64,
}

impl JsonlSink {
    pub fn new(cfg: JsonlConfig, cx: &BuildCx<'_>) -> anyhow::Result<JsonlSink> {
        let (out, file): (Box<dyn std::io::Write + Send>, _) = if cfg.path == "-" {
            (Box::new(std::io::stdout()), None)
        } else {
            let p = std::path::Path::new(&cfg.path);
            if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            (Box::new(std::io::sink()), Some((p.to_path_buf(), cfg.append)))
        };
        Ok(JsonlSink {
            out,
            file,
            len: 0,
            metrics: cx.metrics.clone(),
            rate_limit: cfg.rate_limit,
            started: None,
            written: 0,
        })
    }
}

#[async_trait]
impl Sink for JsonlSink {
    async fn start(&mut self, restored: Option<&[u8]>) -> anyhow::Result<()> {
        use std::io::{Seek, SeekFrom};
        let Some((path, append)) = &self.file else { return Ok(()) };
        let at: Option<u64> = match restored.filter(|r| !r.is_empty()) {
            Some(r) => Some(postcard::from_bytes(r).context("the jsonl sink's checkpoint state is corrupt")?),
            None => None,
        };
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(at.is_none() && !append)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        let len = f.metadata().with_context(|| format!("reading {}", path.display()))?.len();
        if let Some(at) = at {
            if len < at {
                tracing::warn!(
                    "{} holds {len} bytes, less than the {at} of the last checkpoint: it was changed outside the \
                     pipeline; appending to it",
                    path.display()
                );
            } else {
                // what was written after the checkpoint comes again from the replay
                f.set_len(at).with_context(|| format!("truncating {}", path.display()))?;
            }
        }
        self.len = f.seek(SeekFrom::End(0))?;
        self.out = Box::new(std::io::BufWriter::with_capacity(1 << 20, f));
        Ok(())
    }

    async fn write(&mut self, batch: Arc<Batch>) -> anyhow::Result<()> {
        let mut s = String::with_capacity(batch.len() * 256);
        for ev in &batch.events {
            ev.write_json(&mut s);
            s.push('\n');
        }
        self.out.write_all(s.as_bytes())?;
        self.len += s.len() as u64;
        self.metrics.events_out.inc_by(batch.len() as u64);
        if let Some(rate) = self.rate_limit {
            let started = *self.started.get_or_insert_with(std::time::Instant::now);
            self.written += batch.len() as u64;
            let due = std::time::Duration::from_secs_f64(self.written as f64 / rate);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        self.metrics.bytes_out.inc_by(s.len() as u64);
        Ok(())
    }
    async fn flush(&mut self, _epoch: u64) -> anyhow::Result<Vec<u8>> {
        self.out.flush()?;
        if self.file.is_none() {
            return Ok(Vec::new());
        }
        Ok(postcard::to_allocvec(&self.len)?)
    }
    async fn commit(&mut self, _epoch: u64) -> anyhow::Result<()> {
        Ok(())
    }
    async fn close(&mut self) -> anyhow::Result<()> {
        self.out.flush()?;
        Ok(())
    }
}
