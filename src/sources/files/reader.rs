//! The reading thread: [`Reader`] reads the files in order, a chunk or a memory map at a
//! time, and hands complete lines to the decoding jobs (see `decode`).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use tokio::sync::mpsc;

use super::array::looks_like_array_file;
use super::listing::FileEntry;
use super::{Framing, Position, ReaderMsg};
use crate::event::{Event, Nanos};
use crate::model::decode::Projection;
use crate::storage::Location;

pub(super) struct Reader {
    pub(super) loc: Location,
    pub(super) projection: Option<Arc<Projection>>,
    pub(super) decoder: Arc<crate::model::format::MessageDecoder>,
    pub(super) files: Vec<FileEntry>,
    pub(super) start: Position,
    pub(super) framing: Framing,
    pub(super) batch_size: usize,
    pub(super) mmap: bool,
    pub(super) from: Nanos,
    pub(super) to: Nanos,
    pub(super) component: String,
    pub(super) progress: crate::metrics::SharedProgress,
    pub(super) metrics: crate::metrics::ComponentMetrics,
    pub(super) handle: tokio::runtime::Handle,
}

/// Counts the (compressed) bytes read, for progress.
struct Counting<R> {
    inner: R,
    progress: crate::metrics::SharedProgress,
    metrics: crate::metrics::ComponentMetrics,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.done_bytes.fetch_add(n as u64, Ordering::Relaxed);
        self.metrics.bytes_in.inc_by(n as u64);
        Ok(n)
    }
}

const CHUNK: usize = 4 << 20;

/// A reader whose first error ends its input; the error is kept for after what came before it
/// ([`Breaks::broke_off`]).
struct Breaks<R> {
    inner: R,
    error: Option<std::io::Error>,
}

impl<R: Read> Read for Breaks<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.error.is_some() {
            return Ok(0); // ended: the reader under it is not asked again
        }
        loop {
            match self.inner.read(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.error = Some(e);
                    return Ok(0);
                }
                ok => return ok,
            }
        }
    }
}

impl<R> Breaks<R> {
    /// The error met, if any (after `lines` lines of a JSON-lines file).
    fn broke_off(&mut self, lines: Option<u64>) -> anyhow::Result<()> {
        let Some(e) = self.error.take() else { return Ok(()) };
        let at = lines.map(|n| format!(" after line {n}")).unwrap_or_default();
        Err(anyhow::Error::new(e).context(format!("the file broke off{at}")))
    }
}

/// Reads into `buf[start..]` until it is full or the input ends; returns (filled length, eof).
fn fill(input: &mut impl Read, buf: &mut [u8], start: usize) -> std::io::Result<(usize, bool)> {
    let mut len = start;
    while len < buf.len() {
        let n = input.read(&mut buf[len..])?;
        if n == 0 {
            return Ok((len, true));
        }
        len += n;
    }
    Ok((len, false))
}

impl Reader {
    pub(super) fn run(self, tx: &mpsc::Sender<ReaderMsg>, stop: &std::sync::atomic::AtomicBool) {
        for idx in self.start.file..self.files.len() {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let skip = if idx == self.start.file { self.start.line } else { 0 };
            let dead = match self.read_file(idx, skip, tx, stop) {
                Ok(()) => Vec::new(),
                Err(e) if e.downcast_ref::<Closed>().is_some() => return,
                // An unreadable file (corrupt gzip, vanished object) is a dead letter, not the end.
                Err(e) => {
                    let f = &self.files[idx];
                    let reason = format!("cannot read file: {e:#}");
                    vec![Event::dead_letter(Bytes::new(), &reason, &f.display, &self.component)]
                }
            };
            // the file is done: the position moves to the start of the next one
            let pos = Position {
                file: idx + 1,
                path: self.files.get(idx + 1).map(|f| f.path.to_string()).unwrap_or_default(),
                line: 0,
            };
            if tx.blocking_send(ReaderMsg::Batch { events: vec![], dead, pos }).is_err() {
                return;
            }
        }
    }

    fn open(&self, f: &FileEntry) -> anyhow::Result<Box<dyn Read + Send>> {
        let raw: Box<dyn Read + Send> = match &self.loc.local_path {
            Some(_) => {
                let p = std::path::PathBuf::from(format!("/{}", f.path));
                Box::new(std::fs::File::open(&p).with_context(|| format!("opening {}", p.display()))?)
            }
            None => {
                let store = self.loc.store.clone();
                let path = f.path.clone();
                let get = self.handle.block_on(async move { store.get(&path).await })?;
                let stream = get.into_stream().map_err(std::io::Error::other);
                let reader = tokio_util::io::StreamReader::new(stream);
                Box::new(tokio_util::io::SyncIoBridge::new_with_handle(reader, self.handle.clone()))
            }
        };
        let counted = Counting { inner: raw, progress: self.progress.clone(), metrics: self.metrics.clone() };
        let mut buffered = BufReader::with_capacity(1 << 20, counted);
        let head = buffered.fill_buf()?;
        if head.len() >= 2 && head[0] == 0x1f && head[1] == 0x8b {
            Ok(Box::new(flate2::read::MultiGzDecoder::new(buffered)))
        } else {
            Ok(Box::new(buffered))
        }
    }

    fn read_file(
        &self,
        idx: usize,
        skip: u64,
        tx: &mpsc::Sender<ReaderMsg>,
        stop: &std::sync::atomic::AtomicBool,
    ) -> anyhow::Result<()> {
        let f = &self.files[idx];
        if let Some((file, size)) = self.mappable(f)? {
            return self.read_mapped(idx, &file, size, skip, tx, stop);
        }
        // a read error ends the input as if the file ended there: the lines before it go on
        // (a line it cut is a dead letter), then the error, naming the line it came after
        let mut input = Breaks { inner: self.open(f)?, error: None };
        // One buffer: the decoding jobs take copies of their lines, so it is refilled while they
        // run. It only grows for a line longer than a chunk, or to hold a whole JSON-array file.
        let mut cur: Vec<u8> = vec![0; CHUNK];
        let (mut len, mut eof) = fill(&mut input, &mut cur, 0)?;
        let array_mode = match self.framing {
            Framing::JsonArray => true,
            Framing::Jsonl => false,
            Framing::Auto => looks_like_array_file(&cur[..len], eof),
        };
        if array_mode {
            while !eof {
                cur.resize(cur.len() * 2, 0);
                (len, eof) = fill(&mut input, &mut cur, len)?;
            }
            self.emit_array_file(idx, Bytes::copy_from_slice(&cur[..len]), skip, tx)?;
            return input.broke_off(None);
        }
        let mut line_no: u64 = 0; // lines fully consumed
        let mut ahead = VecDeque::new();
        loop {
            if stop.load(Ordering::Relaxed) {
                return Err(Closed.into());
            }
            // complete lines only; the tail goes to the front of the next chunk
            let cut = loop {
                if eof {
                    break len;
                }
                match memchr::memrchr(b'\n', &cur[..len]) {
                    Some(i) => break i + 1,
                    None => {
                        cur.resize(cur.len() * 2, 0); // one line longer than the buffer
                        (len, eof) = fill(&mut input, &mut cur, len)?;
                    }
                }
            };
            // the end of this chunk decodes while the next one is read
            line_no += self.decode_lines(idx, &cur[..cut], None, line_no, skip, &mut ahead, tx)?;
            if eof {
                break;
            }
            let tail = len - cut;
            cur.copy_within(cut..len, 0);
            if cur.len() < tail + CHUNK / 2 {
                cur.resize(tail + CHUNK, 0);
            }
            (len, eof) = fill(&mut input, &mut cur, tail)?;
        }
        self.finish(&mut ahead, tx)?;
        input.broke_off(Some(line_no))
    }

    /// A local, uncompressed JSON-lines file, opened for [`Reader::read_mapped`]; `None` for
    /// anything else (object storage, gzip, JSON-array files, or when `mmap: false`).
    fn mappable(&self, f: &FileEntry) -> anyhow::Result<Option<(std::fs::File, u64)>> {
        if !self.mmap || self.loc.local_path.is_none() || self.framing == Framing::JsonArray {
            return Ok(None);
        }
        let p = std::path::PathBuf::from(format!("/{}", f.path));
        let file = std::fs::File::open(&p).with_context(|| format!("opening {}", p.display()))?;
        let meta = file.metadata().with_context(|| format!("reading {}", p.display()))?;
        if !meta.is_file() || meta.len() == 0 {
            return Ok(None);
        }
        let mut head = [0u8; 4096];
        let n = std::os::unix::fs::FileExt::read_at(&file, &mut head, 0)
            .with_context(|| format!("reading {}", p.display()))?;
        let head = &head[..n];
        let gzip = head.len() >= 2 && head[0] == 0x1f && head[1] == 0x8b;
        // an array file, or one whose first 4 KiB do not settle it, is read the other way
        let array = self.framing == Framing::Auto
            && (looks_like_array_file(head, n as u64 == meta.len()) || head.iter().all(u8::is_ascii_whitespace));
        Ok((!gzip && !array).then_some((file, meta.len())))
    }

    /// Reads a local, uncompressed JSON-lines file through memory maps of about [`CHUNK`] bytes
    /// each: events point into the map, so neither the kernel nor this process copies the text
    /// (reading and copying were about 7% of W1's CPU time). A map is released once no event of
    /// it is left. The file is read as it was when opened: what is appended later is not read.
    /// (Like every reader of a mapped file, it relies on the file not being truncated or
    /// rewritten in place while it is read; exports are written once, and `mmap: false` turns
    /// this off.)
    fn read_mapped(
        &self,
        idx: usize,
        file: &std::fs::File,
        size: u64,
        skip: u64,
        tx: &mpsc::Sender<ReaderMsg>,
        stop: &std::sync::atomic::AtomicBool,
    ) -> anyhow::Result<()> {
        // map offsets are multiples of the page size; 64 KiB is one of every page size in use
        const ALIGN: u64 = 64 << 10;
        let shown = &self.files[idx].display;
        tracing::debug!(file = %shown, size, "reading through memory maps");
        // Maps this thread still holds, so that unmapping (about 2% of W1's CPU time) happens
        // here rather than in whichever transform drops a map's last event.
        let mut held: std::collections::VecDeque<Arc<memmap2::Mmap>> = Default::default();
        let mut line_no: u64 = 0;
        let mut start: u64 = 0; // the first byte not yet decoded
        let mut ahead = VecDeque::new();
        while start < size {
            if stop.load(Ordering::Relaxed) {
                return Err(Closed.into());
            }
            let base = start - start % ALIGN;
            let from = (start - base) as usize;
            let mut want = CHUNK as u64 + from as u64;
            // complete lines only; a line longer than the map doubles it
            let (map, cut) = loop {
                let end = (base + want).min(size);
                // SAFETY: the map is read-only. It is unsound only if another process truncates
                // the file meanwhile (SIGBUS) or rewrites it in place (text validated as UTF-8
                // could change under the events); `mmap: false` is documented for such files.
                let map =
                    unsafe { memmap2::MmapOptions::new().offset(base).len((end - base) as usize).populate().map(file) }
                        .with_context(|| format!("mapping {shown}"))?;
                if end == size {
                    let len = map.len();
                    break (map, len);
                }
                match memchr::memrchr(b'\n', &map[from..]) {
                    Some(i) => break (map, from + i + 1),
                    None => want *= 2,
                }
            };
            let read = (cut - from) as u64;
            self.progress.done_bytes.fetch_add(read, Ordering::Relaxed);
            self.metrics.bytes_in.inc_by(read);
            let map = Arc::new(map);
            line_no += self.decode_lines(idx, &map[from..cut], Some((&map, from)), line_no, skip, &mut ahead, tx)?;
            start = base + cut as u64;
            held.push_back(map);
            held.retain(|m| Arc::strong_count(m) > 1);
        }
        self.finish(&mut ahead, tx)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("reading stopped")]
pub(super) struct Closed;
