//! Decoding lines in parallel: a chunk's lines are split into parts decoded by jobs on the
//! rayon pool, and the decoded batches are sent in order.

use std::collections::VecDeque;
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use tokio::sync::mpsc;

use super::reader::{Closed, Reader};
use super::{Position, ReaderMsg};
use crate::event::{Event, Nanos};
use crate::model::decode::Projection;
use crate::model::format::MessageDecoder;
use crate::model::generic::Transport;

/// The lines of one part of a mapped file: the part's events share it.
struct MappedPart(Arc<memmap2::Mmap>, std::ops::Range<usize>);

impl AsRef<[u8]> for MappedPart {
    fn as_ref(&self) -> &[u8] {
        &self.0[self.1.clone()]
    }
}

/// Lines per decoding job.
const PART: usize = 256;
/// Parts handed to the pool and not yet sent, per rayon thread. More keeps the decoding threads
/// busier but lets events go cold in cache before the next stage reads them (on two cores, two
/// batches of 2,048 lines measured best; three were as good, a whole 4 MiB chunk used 9% more
/// CPU time).
const PARTS_AHEAD_PER_THREAD: usize = 8;
/// At most this many parts in flight on large machines (about 16,000 events), so that the
/// memory of decoded events waiting to be sent stays bounded.
const MAX_PARTS_AHEAD: usize = 64;

/// What a decoding job needs to know of its file.
struct PartCx {
    display: Arc<str>,
    partition: u32,
    from: Nanos,
    to: Nanos,
    projection: Option<Arc<Projection>>,
    decoder: Arc<MessageDecoder>,
    component: String,
}

impl PartCx {
    /// Decodes one part: `text` holds its lines, `lines` their (line number, start, end) in it.
    /// Returns the events in line order and the dead letters.
    fn decode(&self, text: &Bytes, lines: &[(u64, usize, usize)]) -> Decoded {
        let mut events = Vec::with_capacity(lines.len());
        let mut dead = Vec::new();
        // one count per part, so that two decoding threads never share it
        let origin: Arc<str> = Arc::from(&*self.display);
        let projection = self.projection.as_deref().map(Projection::copy);
        for &(no, s, mut e) in lines {
            if e > s && text[e - 1] == b'\r' {
                e -= 1;
            }
            let line = &text[s..e];
            if line.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            self.decoder.decode_each(text.slice(s..e), projection.as_ref(), &Transport::NONE, |r| match r {
                Ok(mut ev) => {
                    if ev.time < self.from || ev.time >= self.to {
                        return;
                    }
                    ev.meta.partition = self.partition;
                    ev.meta.offset = no as i64 + 1;
                    ev.meta.origin = Some(origin.clone());
                    events.push(ev);
                }
                Err(reason) => dead.push(Event::dead_letter(
                    Bytes::copy_from_slice(line),
                    &reason,
                    &format!("{}:{}", self.display, no + 1),
                    &self.component,
                )),
            });
        }
        (events, dead)
    }
}

/// A decoded part: its events and its dead letters.
type Decoded = (Vec<Event>, Vec<Event>);

/// A batch whose parts are being decoded: the decoded parts received so far, and the position
/// after the batch.
pub(super) struct InFlight {
    /// (part, what it decoded or what a panicking decoder said)
    rx: std::sync::mpsc::Receiver<(usize, Result<Decoded, String>)>,
    slots: Vec<Option<Decoded>>,
    pos: Position,
}

impl Reader {
    /// Decodes the lines of `chunk` (starting at line `first_line`) and sends them in batches of
    /// about `batch_size` lines. Each batch is split into jobs of [`PART`] lines on the rayon
    /// pool; up to [`PARTS_AHEAD_PER_THREAD`] parts per thread decode while the oldest batch
    /// is waited for and sent. The last batches of the chunk are left in `ahead`, decoding
    /// while the caller maps or reads the next chunk ([`Reader::finish`] sends them at the end
    /// of the file). Returns the number of lines consumed.
    ///
    /// Each job owns its part's text: with `mapped` (the memory map `chunk` is part of, and where
    /// in it `chunk` starts) an owner over the map, otherwise a copy of the part's lines, so that
    /// the caller's buffer is free again once this returns. The events of a part share that one
    /// reference count, which no other decoding job touches.
    ///
    /// One job per part, spawned from this thread, rather than a parallel iterator over the
    /// batch: a parallel iterator started from outside the pool is picked up by one worker, and
    /// on two cores the other was seldom woken to steal half of it (W1's two decoding threads
    /// ran together a quarter of the time). A job put into the pool's queue wakes a sleeping
    /// worker. Only this thread waits when the pipeline is full, never a rayon worker (a worker
    /// blocked on a channel could starve a transform that needs the pool to drain it).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn decode_lines(
        &self,
        idx: usize,
        chunk: &[u8],
        mapped: Option<(&Arc<memmap2::Mmap>, usize)>,
        first_line: u64,
        skip: u64,
        ahead: &mut VecDeque<InFlight>,
        tx: &mpsc::Sender<ReaderMsg>,
    ) -> anyhow::Result<u64> {
        let f = &self.files[idx];
        let mut lines: Vec<(u64, usize, usize)> = Vec::with_capacity(chunk.len() / 400 + 1);
        let mut start = 0;
        let mut n = first_line;
        for nl in memchr::memchr_iter(b'\n', chunk) {
            lines.push((n, start, nl));
            n += 1;
            start = nl + 1;
        }
        if start < chunk.len() {
            lines.push((n, start, chunk.len()));
            n += 1;
        }
        let consumed = n - first_line;
        lines.retain(|(no, _, _)| *no >= skip);
        let cx = Arc::new(PartCx {
            display: f.display.clone(),
            partition: f.partition,
            from: self.from,
            to: self.to,
            projection: self.projection.clone(),
            decoder: self.decoder.clone(),
            component: self.component.clone(),
        });
        for group in lines.chunks(self.batch_size.max(1)) {
            let (done, rx) = std::sync::mpsc::channel();
            let mut parts = 0;
            for part in group.chunks(PART) {
                let (first, last) = (part[0].1, part[part.len() - 1].2);
                let text = match mapped {
                    Some((map, at)) => Bytes::from_owner(MappedPart(map.clone(), at + first..at + last)),
                    None => Bytes::copy_from_slice(&chunk[first..last]),
                };
                let lines: Vec<(u64, usize, usize)> =
                    part.iter().map(|&(no, s, e)| (no, s - first, e - first)).collect();
                let (cx, done, k) = (cx.clone(), done.clone(), parts);
                rayon::spawn_fifo(move || {
                    // a panic here would otherwise abort the process (rayon's default)
                    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cx.decode(&text, &lines)))
                        .map_err(|p| {
                            let what =
                                p.downcast_ref::<&str>().map(|s| s.to_string()).or(p.downcast_ref::<String>().cloned());
                            what.unwrap_or_default()
                        });
                    // the receiver is gone only when reading stopped
                    let _ = done.send((k, decoded));
                });
                parts += 1;
            }
            let last_line = group.last().map(|l| l.0 + 1).unwrap_or(first_line);
            let pos = Position { file: idx, path: f.path.to_string(), line: last_line };
            ahead.push_back(InFlight { rx, slots: (0..parts).map(|_| None).collect(), pos });
            let limit = (PARTS_AHEAD_PER_THREAD * rayon::current_num_threads()).min(MAX_PARTS_AHEAD);
            while ahead.iter().map(|fl| fl.slots.len()).sum::<usize>() > limit {
                self.send_oldest(ahead, tx)?;
            }
        }
        Ok(consumed)
    }

    /// Waits for the oldest batch in `ahead` to be decoded and sends it.
    fn send_oldest(&self, ahead: &mut VecDeque<InFlight>, tx: &mpsc::Sender<ReaderMsg>) -> anyhow::Result<()> {
        let Some(mut fl) = ahead.pop_front() else { return Ok(()) };
        while fl.slots.iter().any(Option::is_none) {
            let (k, decoded) = fl.rx.recv().context("a decoding job ended without its result")?;
            let decoded = decoded.map_err(|panic| {
                let shown = &self.files[fl.pos.file].display;
                anyhow::anyhow!("decoding the lines up to line {} of {shown} failed: {panic}", fl.pos.line)
            })?;
            fl.slots[k] = Some(decoded);
        }
        let total: usize = fl.slots.iter().flatten().map(|(e, _)| e.len()).sum();
        let mut parts = fl.slots.into_iter().flatten();
        // the first part's vector becomes the batch's, so its events are not moved again
        let (mut events, mut dead) = parts.next().unwrap_or_default();
        events.reserve(total - events.len());
        for (e, d) in parts {
            events.extend(e);
            dead.extend(d);
        }
        tx.blocking_send(ReaderMsg::Batch { events, dead, pos: fl.pos }).map_err(|_| Closed)?;
        Ok(())
    }

    /// Sends every batch still in `ahead` (at the end of a file).
    pub(super) fn finish(&self, ahead: &mut VecDeque<InFlight>, tx: &mpsc::Sender<ReaderMsg>) -> anyhow::Result<()> {
        while !ahead.is_empty() {
            self.send_oldest(ahead, tx)?;
        }
        Ok(())
    }
}
