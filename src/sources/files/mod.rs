//! `files`: replays archived exports from a file, a folder or an object-store prefix.
//!
//! Framing: JSON lines (one message, or one JSON array of messages, per line) or one JSON array
//! per file; gzip is detected by its magic bytes. IoT Central's blob export layout
//! `{app-id}/{partition}/{YYYY}/{MM}/{dd}/{hh}/{mm}/{file}` is recognised: files are then read in
//! time order (minute, partition, name), the partition folder becomes the event's partition, and
//! `from`/`to` select files by their minute before reading them. Any other layout is read in
//! path order. Either way the order is deterministic, so two replays give the same output.
//!
//! Reading runs on a blocking thread; each chunk's lines are decoded by jobs on the rayon pool
//! (a part of 256 lines each) while the next chunk is read. The position (file, line) after
//! each batch is the checkpointed position.
//!
//! The parts, one concern a file: the source and its position here; the YAML configuration in
//! `config`; listing the files in `listing`; the reading thread in `reader`; decoding lines in
//! parallel in `decode`; JSON-array files in `array`.

mod array;
mod config;
mod decode;
mod listing;
mod reader;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{bail, Context};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::config::values::Timestamp;
use crate::event::{Batch, Event, Nanos};
use crate::model::decode::Projection;
use crate::runtime::{BuildCx, Control, EndReason, Source, SourceCx};
use crate::storage;
pub use config::{FilesConfig, Format, Layout};
use listing::list_files;
use reader::Reader;

/// Where reading stands: the next line to read of the file at `file`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Position {
    file: usize,
    path: String,
    line: u64,
}

pub struct FilesSource {
    cfg: FilesConfig,
    projection: Option<Arc<Projection>>,
    name: String,
    pos: Position,
    restored: bool,
    from: Nanos,
    to: Nanos,
}

impl FilesSource {
    pub fn new(cfg: FilesConfig, cx: &BuildCx<'_>) -> anyhow::Result<FilesSource> {
        let mut pos = Position::default();
        let mut restored = false;
        if let Some(state) = cx.restored.as_deref().filter(|s| !s.is_empty()) {
            pos = postcard::from_bytes(state).context("files source position in the checkpoint is corrupt")?;
            restored = true;
        }
        let from = cfg.from.as_ref().map(Timestamp::get).transpose()?.unwrap_or(i64::MIN);
        let to = cfg.to.as_ref().map(Timestamp::get).transpose()?.unwrap_or(i64::MAX);
        Ok(FilesSource { cfg, projection: cx.projection.clone(), name: cx.name.to_string(), pos, restored, from, to })
    }
}

enum ReaderMsg {
    Batch { events: Vec<Event>, dead: Vec<Event>, pos: Position },
}

#[async_trait]
impl Source for FilesSource {
    async fn run(&mut self, cx: &mut SourceCx) -> anyhow::Result<EndReason> {
        let loc =
            storage::open(&self.cfg.url, &self.cfg.storage).with_context(|| format!("opening {}", self.cfg.url))?;
        let files = list_files(&loc, &self.cfg, self.from, self.to).await?;
        if files.is_empty() {
            tracing::warn!(url = %self.cfg.url, "no input files");
        }
        if self.restored {
            // the listing must still contain the file we stopped in
            match files.get(self.pos.file) {
                Some(f) if f.path.as_ref() == self.pos.path => {}
                _ => match files.iter().position(|f| f.path.as_ref() == self.pos.path) {
                    Some(i) => self.pos.file = i,
                    None if self.pos.path.is_empty() => {}
                    None => bail!(
                        "the checkpoint stopped in {}, which is no longer listed under {}",
                        self.pos.path,
                        self.cfg.url
                    ),
                },
            }
        }
        let total: u64 = files.iter().map(|f| f.size).sum();
        let done_before: u64 = files.iter().take(self.pos.file).map(|f| f.size).sum();
        cx.progress.total_bytes.fetch_add(total, Ordering::Relaxed);
        cx.progress.done_bytes.fetch_add(done_before, Ordering::Relaxed);

        let (tx, mut rx) = mpsc::channel::<ReaderMsg>(2);
        let reader = Reader {
            loc,
            files,
            start: self.pos.clone(),
            format: self.cfg.format,
            batch_size: self.cfg.batch_size,
            mmap: self.cfg.mmap,
            from: self.from,
            to: self.to,
            component: self.name.clone(),
            projection: self.projection.clone(),
            progress: cx.progress.clone(),
            metrics: cx.metrics.clone(),
            handle: tokio::runtime::Handle::current(),
        };
        let stop_flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop_flag.clone();
        let join = tokio::task::spawn_blocking(move || reader.run(&tx, &flag));
        let result = loop {
            tokio::select! {
                biased;
                c = cx.control() => match c {
                    Control::Barrier(e) => cx.barrier(e, postcard::to_allocvec(&self.pos)?).await?,
                    Control::Stop | Control::Shutdown => break Ok(EndReason::Stopped),
                    _ => {}
                },
                m = rx.recv() => match m {
                    Some(ReaderMsg::Batch { events, dead, pos }) => {
                        cx.send(Batch::new(events)).await?;
                        cx.dead_letter(dead).await?;
                        self.pos = pos;
                    }
                    None => break Ok(EndReason::Exhausted),
                },
            }
        };
        stop_flag.store(true, Ordering::Relaxed);
        drop(rx);
        let _ = join.await;
        result
    }

    fn snapshot(&self) -> Vec<u8> {
        postcard::to_allocvec(&self.pos).unwrap_or_default()
    }
}
