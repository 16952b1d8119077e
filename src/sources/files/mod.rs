//! `files`: replays archived exports from a file, a folder or an object-store prefix, or
//! (`follow: true`) follows IoT Central's blob export as it lands.
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
//! each batch is the checkpointed position; following keeps one per partition folder instead
//! (see `follow`).
//!
//! The parts, one concern a file: the source, its position and the loop that sends what a
//! reader reads here; the YAML configuration in `config`; listing the files in `listing`; the
//! reading thread in `reader`; decoding lines in parallel in `decode`; JSON-array files in
//! `array`; following the blob export in `follow`, listing its folders from a point in time in
//! `tree`.

mod array;
mod config;
mod decode;
mod follow;
mod listing;
mod reader;
mod tree;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{bail, Context};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::config::values::Timestamp;
use crate::event::{Batch, Event, Nanos};
use crate::model::decode::Projection;
use crate::model::format::MessageDecoder;
use crate::runtime::{BuildCx, Control, EndReason, Mode, Source, SourceCx};
use crate::storage;
pub use config::{FilesConfig, Framing, Layout};
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
    decoder: Arc<MessageDecoder>,
    name: String,
    /// Where reading stands (`follow: false`).
    pos: Position,
    /// Where following stands (`follow: true`).
    followed: follow::FollowPosition,
    restored: bool,
    from: Nanos,
    to: Nanos,
    mode: Mode,
    metrics_label: crate::metrics::ComponentLabel,
}

impl FilesSource {
    pub fn new(cfg: FilesConfig, cx: &BuildCx<'_>) -> anyhow::Result<FilesSource> {
        let mut pos = Position::default();
        let mut followed = follow::FollowPosition::default();
        let mut restored = false;
        if let Some(state) = cx.restored.as_deref().filter(|s| !s.is_empty()) {
            let corrupt = "files source position in the checkpoint is corrupt";
            if cfg.follow {
                followed = postcard::from_bytes(state).context(corrupt)?;
            } else {
                pos = postcard::from_bytes(state).context(corrupt)?;
            }
            restored = true;
        }
        let from = cfg.from.as_ref().map(Timestamp::get).transpose()?.unwrap_or(i64::MIN);
        let to = cfg.to.as_ref().map(Timestamp::get).transpose()?.unwrap_or(i64::MAX);
        let decoder =
            Arc::new(crate::sources::message::decoder(cfg.format, cfg.time.as_deref(), cfg.device_id.as_deref())?);
        Ok(FilesSource {
            cfg,
            projection: cx.projection.clone(),
            decoder,
            name: cx.name.to_string(),
            pos,
            followed,
            restored,
            from,
            to,
            mode: cx.mode,
            metrics_label: cx.metrics.label.clone(),
        })
    }

    /// A reader of `files`, starting at `start`.
    fn reader(&self, cx: &SourceCx, loc: storage::Location, files: Vec<listing::FileEntry>, start: Position) -> Reader {
        Reader {
            loc,
            files,
            start,
            framing: self.cfg.framing,
            batch_size: self.cfg.batch_size,
            mmap: self.cfg.mmap,
            from: self.from,
            to: self.to,
            component: self.name.clone(),
            projection: self.projection.clone(),
            decoder: self.decoder.clone(),
            progress: cx.progress.clone(),
            metrics: cx.metrics.clone(),
            handle: tokio::runtime::Handle::current(),
        }
    }

    /// Runs `reader` to its end, sending what it reads and handing each batch's position to
    /// `advance`; barriers take [`Source::snapshot`]. `Some(Stopped)` when the pipeline stopped.
    async fn drive(
        &mut self,
        cx: &mut SourceCx,
        reader: Reader,
        mut advance: impl FnMut(&mut Self, Position),
    ) -> anyhow::Result<Option<EndReason>> {
        let (tx, mut rx) = mpsc::channel::<ReaderMsg>(2);
        let stop_flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop_flag.clone();
        let join = tokio::task::spawn_blocking(move || reader.run(&tx, &flag));
        let result = loop {
            tokio::select! {
                biased;
                c = cx.control() => match c {
                    Control::Barrier(e) => cx.barrier(e, self.snapshot()).await?,
                    Control::Stop | Control::Shutdown => break Ok(Some(EndReason::Stopped)),
                    _ => {}
                },
                m = rx.recv() => match m {
                    Some(ReaderMsg::Batch { events, dead, pos }) => {
                        cx.send(Batch::new(events)).await?;
                        cx.dead_letter(dead).await?;
                        advance(self, pos);
                    }
                    None => break Ok(None),
                },
            }
        };
        stop_flag.store(true, Ordering::Relaxed);
        drop(rx);
        let _ = join.await;
        result
    }
}

enum ReaderMsg {
    Batch { events: Vec<Event>, dead: Vec<Event>, pos: Position },
}

#[async_trait]
impl Source for FilesSource {
    async fn run(&mut self, cx: &mut SourceCx) -> anyhow::Result<EndReason> {
        if self.cfg.follow {
            return self.follow(cx).await;
        }
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
        let reader = self.reader(cx, loc, files, self.pos.clone());
        let ended = self.drive(cx, reader, |me, pos| me.pos = pos).await?;
        Ok(ended.unwrap_or(EndReason::Exhausted))
    }

    fn snapshot(&self) -> Vec<u8> {
        if self.cfg.follow {
            postcard::to_allocvec(&self.followed).unwrap_or_default()
        } else {
            postcard::to_allocvec(&self.pos).unwrap_or_default()
        }
    }
}
