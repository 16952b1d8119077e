//! Following IoT Central's blob export (`follow: true`): every `poll_interval` the source lists
//! what is new under the URL and reads it, each file once, in the layout's time order.
//!
//! **Position.** Per partition folder ([`PartPos`]): the horizon (minute folders before it are
//! done and never listed again), the files done at or after it (their names, so that a file
//! landing late in an older minute folder is told from those already read), the last file done,
//! and the file being read with the next line to read in it. The horizon trails the newest file
//! done by `lookback`, so the files remembered are those of the last `lookback` of export. A
//! restart lists each partition from its horizon's folders ([`super::tree`]), never from the
//! start of the container, and skips what is done.
//!
//! **Rounds.** A poll finds the partition folders, lists each from its horizon, and keeps the
//! files not done and complete: an object is complete once listed (IoT Central writes block
//! blobs whole); a local file once its size and modification time stayed the same across two
//! polls (write in place, or under a hidden name, `.x` or `_x`, then rename). The round reads
//! them with the files reader (the file in progress first, from its line; then by minute,
//! partition and name) and moves each partition's position as batches are sent. `replay` does
//! one round without waiting for files to settle, then ends.
//!
//! **Watermarks.** Events carry their partition folder's number as `meta.partition`, so a window
//! keeps a watermark per folder, and an idle folder stops holding it back after `idle_timeout`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use object_store::ObjectMeta;
use serde::{Deserialize, Serialize};

use super::listing::{parse_minute_key, parse_minute_path, wanted, FileEntry};
use super::tree::{minute_key, ListCounts, PartitionDir, Tree};
use super::{FilesSource, Position};
use crate::event::Nanos;
use crate::runtime::{Control, EndReason, Mode, SourceCx};
use crate::storage::{self, Location};

/// Where following stands, per partition folder (by its path relative to the URL).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct FollowPosition {
    parts: BTreeMap<String, PartPos>,
}

/// Where following stands in one partition folder. Files are named by their path in it
/// (`YYYY/MM/dd/hh/mm/name`), which sorts in the layout's time order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct PartPos {
    /// Minute folders before this one (`YYYY/MM/dd/hh/mm`) are done; empty: none is.
    horizon: String,
    /// The files done in minute folders at or after `horizon`.
    done: BTreeSet<String>,
    /// The last file done, in layout order.
    last: String,
    /// The file being read and the next line to read in it.
    current: Option<(String, u64)>,
}

/// The minute folder of a file named by its path in its partition folder.
fn minute_of(rel: &str) -> &str {
    &rel[..rel.len().min(16)]
}

impl PartPos {
    fn is_done(&self, rel: &str) -> bool {
        minute_of(rel) < self.horizon.as_str() || self.done.contains(rel)
    }

    /// Records `rel` as done; the horizon follows the newest file done, `lookback` behind.
    fn finish(&mut self, rel: &str, lookback: Nanos) {
        if self.current.as_ref().is_some_and(|(c, _)| c == rel) {
            self.current = None;
        }
        self.done.insert(rel.to_string());
        if rel > self.last.as_str() {
            self.last = rel.to_string();
        }
        let Some(newest) = parse_minute_key(minute_of(&self.last)) else { return };
        let horizon = minute_key(newest.saturating_sub(lookback));
        if horizon > self.horizon {
            self.horizon = horizon;
            let keep = self.done.split_off(self.horizon.as_str());
            self.done = keep;
        }
    }
}

/// A file of a round: its partition folder and its path in it.
#[derive(Debug, Clone)]
struct RoundFile {
    part: String,
    rel: String,
}

/// What one poll found.
struct Found {
    entries: Vec<FileEntry>,
    round: Vec<RoundFile>,
    /// Where the first file starts (the file in progress at the last checkpoint).
    skip: u64,
    partitions: usize,
}

/// What a poll needs besides the position.
struct Scan<'a> {
    tree: Tree<'a>,
    extensions: &'a [String],
    /// Minute keys of `from` and `to`, with two minutes of slack (IoT Central exports late).
    from: Option<String>,
    to: Option<String>,
    /// Local files must keep their size across two polls (not in a replay).
    settle: bool,
}

impl FollowPosition {
    /// After a batch of `round` was sent with position `pos`: the files before `pos.file` are
    /// done (`upto`: how many were already recorded), `pos.file` is read up to `pos.line`.
    fn advance(&mut self, round: &[RoundFile], upto: &mut usize, pos: &Position, lookback: Nanos) {
        while *upto < pos.file.min(round.len()) {
            let f = &round[*upto];
            self.parts.entry(f.part.clone()).or_default().finish(&f.rel, lookback);
            *upto += 1;
        }
        if let Some(f) = round.get(pos.file).filter(|_| pos.line > 0) {
            self.parts.entry(f.part.clone()).or_default().current = Some((f.rel.clone(), pos.line));
        }
    }
}

impl Scan<'_> {
    /// The complete files not done yet, in reading order. `pending`: local files seen at the
    /// last poll, by path, with their size and modification time.
    async fn poll(
        &self,
        pos: &FollowPosition,
        pending: &mut HashMap<String, (u64, chrono::DateTime<chrono::Utc>)>,
    ) -> anyhow::Result<Found> {
        let parts = self.tree.partitions().await?;
        // the file in progress at the last checkpoint
        let current = pos.parts.iter().find_map(|(p, s)| s.current.as_ref().map(|(rel, line)| (p, rel, *line)));
        let is_current = |f: &RoundFile| current.is_some_and(|(p, rel, _)| *p == f.part && *rel == f.rel);
        let mut files: Vec<(FileEntry, RoundFile)> = Vec::new();
        let mut seen = HashMap::new();
        for part in &parts {
            let state = pos.parts.get(&part.rel);
            let start = state.map(|s| s.horizon.clone()).filter(|h| !h.is_empty()).or(self.from.clone());
            for meta in self.tree.files(part, start.as_deref(), self.to.as_deref()).await? {
                let Some((entry, file)) = self.entry(part, &meta) else { continue };
                if state.is_some_and(|s| s.is_done(&file.rel))
                    || start.as_deref().is_some_and(|s| minute_of(&file.rel) < s)
                {
                    continue;
                }
                if self.settle && self.tree.loc.local_path.is_some() {
                    let now = (meta.size, meta.last_modified);
                    let key = meta.location.to_string();
                    let settled = pending.get(&key) == Some(&now);
                    seen.insert(key, now);
                    // the file in progress settled before it was begun: left out of a round, it
                    // would be forgotten as gone (`read_round`) and read again from its start
                    if !settled && !is_current(&file) {
                        continue;
                    }
                }
                files.push((entry, file));
            }
        }
        *pending = seen;
        // the file in progress first, then by minute, partition and name
        files.sort_by(|a, b| {
            (!is_current(&a.1), a.0.minute, a.0.partition, a.0.path.as_ref()).cmp(&(
                !is_current(&b.1),
                b.0.minute,
                b.0.partition,
                b.0.path.as_ref(),
            ))
        });
        let skip = match (files.first(), current) {
            (Some((_, f)), Some((_, _, line))) if is_current(f) => line,
            _ => 0,
        };
        let (entries, round) = files.into_iter().unzip();
        Ok(Found { entries, round, skip, partitions: parts.len() })
    }

    /// A listed object as a file to read, unless it is not input.
    fn entry(&self, part: &PartitionDir, meta: &ObjectMeta) -> Option<(FileEntry, RoundFile)> {
        let loc = self.tree.loc;
        let rel_url = loc.relative(&meta.location);
        if !wanted(&rel_url, self.extensions) {
            return None;
        }
        let rel = match part.rel.as_str() {
            "" => rel_url.clone(),
            p => rel_url.strip_prefix(p)?.strip_prefix('/')?.to_string(),
        };
        // from the folders below the partition's: the URL may be the application's folder, or
        // the partition's itself, and then the path from the URL has no partition or app-id
        let minute = parse_minute_path(&rel)?;
        let entry = FileEntry {
            path: meta.location.clone(),
            size: meta.size,
            partition: part.partition,
            minute: Some(minute),
            display: loc.describe(&meta.location).into(),
        };
        Some((entry, RoundFile { part: part.rel.clone(), rel }))
    }
}

impl FilesSource {
    /// `follow: true`: polls for new files and reads them until stopped (`run`), or reads the
    /// files there are once (`replay`).
    pub(super) async fn follow(&mut self, cx: &mut SourceCx) -> anyhow::Result<EndReason> {
        let loc =
            storage::open(&self.cfg.url, &self.cfg.storage).with_context(|| format!("opening {}", self.cfg.url))?;
        let counts = ListCounts::of(&self.metrics_label);
        let poll = self.cfg.poll_interval.get()?;
        let lookback = self.cfg.lookback.nanos()?;
        let replay = self.mode == Mode::Replay;
        let mut pending = HashMap::new();
        let mut polls = 0u64;
        loop {
            let next_poll = Instant::now() + poll;
            let found = match self.poll_serving(cx, &loc, &counts, &mut pending).await? {
                Err(stopped) => return Ok(stopped),
                Ok(Ok(found)) => found,
                Ok(Err(e)) if replay => return Err(e),
                Ok(Err(e)) => {
                    cx.metrics.errors.inc();
                    tracing::warn!(url = %self.cfg.url, "listing failed, trying again at the next poll: {e:#}");
                    Found { entries: Vec::new(), round: Vec::new(), skip: 0, partitions: 0 }
                }
            };
            polls += 1;
            let (n, partitions) = (found.entries.len(), found.partitions);
            let (requests, entries) = (counts.requests.get(), counts.entries.get());
            if polls == 1 {
                tracing::info!(url = %self.cfg.url, partitions, files = n, requests, entries, "following the blob export");
            } else {
                tracing::debug!(files = n, partitions, requests, entries, "polled for new files");
            }
            if !found.entries.is_empty() {
                if let Some(stopped) = self.read_round(cx, &loc, found, lookback).await? {
                    return Ok(stopped);
                }
            }
            if replay {
                return Ok(EndReason::Exhausted);
            }
            if let Some(stopped) = self.wait(cx, next_poll).await? {
                return Ok(stopped);
            }
        }
    }

    /// One poll, serving barriers while it lists. `Err(Stopped)` when the pipeline stopped.
    async fn poll_serving(
        &self,
        cx: &mut SourceCx,
        loc: &Location,
        counts: &ListCounts,
        pending: &mut HashMap<String, (u64, chrono::DateTime<chrono::Utc>)>,
    ) -> anyhow::Result<Result<anyhow::Result<Found>, EndReason>> {
        const SLACK: Nanos = 120 * 1_000_000_000;
        let scan = Scan {
            tree: Tree { loc, counts },
            extensions: &self.cfg.extensions,
            from: (self.from != i64::MIN).then(|| minute_key(self.from.saturating_sub(SLACK + 60_000_000_000))),
            to: (self.to != i64::MAX).then(|| minute_key(self.to.saturating_add(SLACK))),
            settle: self.mode == Mode::Live,
        };
        let position = self.followed.clone();
        Ok(self.serving(cx, scan.poll(&position, pending)).await?.ok_or(EndReason::Stopped))
    }

    /// Awaits `work`, serving barriers meanwhile; `None` when the pipeline stopped.
    async fn serving<T>(
        &self,
        cx: &mut SourceCx,
        work: impl std::future::Future<Output = T>,
    ) -> anyhow::Result<Option<T>> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                biased;
                c = cx.control() => match c {
                    Control::Barrier(e) => cx.barrier(e, super::Source::snapshot(self)).await?,
                    Control::Stop | Control::Shutdown => return Ok(None),
                    _ => {}
                },
                r = &mut work => return Ok(Some(r)),
            }
        }
    }

    /// Reads the files of one poll, moving the position as batches are sent.
    async fn read_round(
        &mut self,
        cx: &mut SourceCx,
        loc: &Location,
        found: Found,
        lookback: Nanos,
    ) -> anyhow::Result<Option<EndReason>> {
        let total: u64 = found.entries.iter().map(|f| f.size).sum();
        cx.progress.total_bytes.fetch_add(total, std::sync::atomic::Ordering::Relaxed);
        // a file in progress that is no longer listed is forgotten
        let round = Arc::new(found.round);
        for (name, p) in self.followed.parts.iter_mut() {
            if p.current.as_ref().is_some_and(|(rel, _)| !round.iter().any(|f| f.part == *name && f.rel == *rel)) {
                p.current = None;
            }
        }
        let first = found.entries.first().map(|f| f.path.to_string()).unwrap_or_default();
        let reader = self.reader(cx, loc.clone(), found.entries, Position { file: 0, path: first, line: found.skip });
        let mut upto = 0;
        let files = round.clone();
        self.drive(cx, reader, move |me, pos| me.followed.advance(&files, &mut upto, &pos, lookback)).await
    }

    /// Waits until `until`, serving barriers.
    async fn wait(&self, cx: &mut SourceCx, until: Instant) -> anyhow::Result<Option<EndReason>> {
        let slept = self.serving(cx, tokio::time::sleep_until(until.into())).await?;
        Ok(slept.is_none().then_some(EndReason::Stopped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOOKBACK: Nanos = 10 * 60 * 1_000_000_000;

    #[test]
    fn the_horizon_trails_the_newest_file_by_the_lookback() {
        let mut p = PartPos::default();
        p.finish("2026/11/01/13/05/a.json", LOOKBACK);
        assert_eq!(p.horizon, "2026/11/01/12/55");
        p.finish("2026/11/01/13/30/a.json", LOOKBACK);
        assert_eq!(p.horizon, "2026/11/01/13/20");
        assert!(p.is_done("2026/11/01/13/05/b.json"), "before the horizon: done without being remembered");
        assert_eq!(p.done.iter().collect::<Vec<_>>(), ["2026/11/01/13/30/a.json"], "older names are forgotten");
        // a late file within the lookback is read, and remembered
        assert!(!p.is_done("2026/11/01/13/25/late.json"));
        p.finish("2026/11/01/13/25/late.json", LOOKBACK);
        assert!(p.is_done("2026/11/01/13/25/late.json"));
        assert_eq!(p.last, "2026/11/01/13/30/a.json", "the last file in layout order");
        assert_eq!(p.horizon, "2026/11/01/13/20", "a late file does not move the horizon back");
    }

    #[test]
    fn positions_move_as_batches_are_sent() {
        let round: Vec<RoundFile> = ["a", "b"]
            .iter()
            .map(|n| RoundFile { part: "app/0".into(), rel: format!("2026/11/01/13/05/{n}.json") })
            .collect();
        let mut pos = FollowPosition::default();
        let mut upto = 0;
        let at = |file, line| Position { file, path: String::new(), line };
        pos.advance(&round, &mut upto, &at(0, 300), LOOKBACK);
        assert_eq!(pos.parts["app/0"].current, Some((round[0].rel.clone(), 300)));
        pos.advance(&round, &mut upto, &at(1, 0), LOOKBACK);
        let p = &pos.parts["app/0"];
        assert_eq!((p.current.clone(), p.last.as_str()), (None, round[0].rel.as_str()));
        pos.advance(&round, &mut upto, &at(2, 0), LOOKBACK);
        assert!(pos.parts["app/0"].is_done(&round[1].rel));
        let bytes = postcard::to_allocvec(&pos).unwrap();
        assert_eq!(postcard::from_bytes::<FollowPosition>(&bytes).unwrap(), pos, "it survives a checkpoint");
    }
}
