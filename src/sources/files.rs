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

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{bail, Context};
use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::ObjectStoreExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::config::values::Timestamp;
use crate::config::{Checker, Spec};
use crate::event::{Batch, Event, Nanos};
use crate::model::decode::{decode_record_each, decode_record_into, Projection};
use crate::runtime::{BuildCx, Control, EndReason, Source, SourceCx};
use crate::storage::{self, Location};

/// Replay of archived export files.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FilesConfig {
    /// A file, a folder, or an object-store URL: `file://`, `s3://bucket/prefix`,
    /// `az://container/prefix`, `gs://bucket/prefix`.
    pub url: String,
    /// Record framing: `auto` (a file whose first line is not a complete JSON value but starts
    /// with `[` is one JSON array; otherwise JSON lines), `jsonl` or `json_array`.
    #[serde(default)]
    pub format: Format,
    /// Folder layout: `auto` (recognises IoT Central's blob export layout), `iotcentral` or `plain`.
    #[serde(default)]
    pub layout: Layout,
    /// Only messages enqueued at or after this time (RFC 3339).
    #[serde(default)]
    pub from: Option<Timestamp>,
    /// Only messages enqueued before this time (RFC 3339).
    #[serde(default)]
    pub to: Option<Timestamp>,
    /// Only files whose name ends with one of these (e.g. `[.json, .json.gz]`). Default: every
    /// file except those whose name starts with `.` or `_`.
    #[serde(default)]
    pub extensions: Vec<String>,
    /// Object-store options (lower-case keys of the cloud's environment variables).
    #[serde(default)]
    pub storage: BTreeMap<String, String>,
    /// Events per batch (approximate).
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Read local, uncompressed JSON-lines files through memory maps (default), so that their
    /// text is not copied. A file truncated while it is read then stops the process (SIGBUS);
    /// set `false` for files that another program may truncate or rewrite in place.
    #[serde(default = "default_true")]
    pub mmap: bool,
}

fn default_batch() -> usize {
    2048
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    #[default]
    Auto,
    Jsonl,
    JsonArray,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    #[default]
    Auto,
    Iotcentral,
    Plain,
}

impl Spec for FilesConfig {
    fn check(&self, ptr: &str, cx: &mut Checker<'_>) {
        cx.url(&format!("{ptr}/url"), &self.url);
        let from = self.from.as_ref().and_then(|f| cx.timestamp(&format!("{ptr}/from"), f));
        let to = self.to.as_ref().and_then(|t| cx.timestamp(&format!("{ptr}/to"), t));
        if let (Some(f), Some(t)) = (from, to) {
            if f >= t {
                cx.error(&format!("{ptr}/to"), "must be later than `from`");
            }
        }
        if self.batch_size == 0 {
            cx.error(&format!("{ptr}/batch_size"), "must be at least 1");
        }
        cx.storage_options(&format!("{ptr}/storage"), &self.storage);
    }
    fn ports(&self) -> Vec<crate::runtime::Port> {
        crate::runtime::SOURCE_PORTS.to_vec()
    }
}

/// One input file.
#[derive(Debug, Clone)]
struct FileEntry {
    path: Path,
    size: u64,
    partition: u32,
    /// Minute of the blob export folder, if the layout has one.
    minute: Option<Nanos>,
    display: Arc<str>,
}

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

/// Lists the files of a location in reading order.
async fn list_files(loc: &Location, cfg: &FilesConfig, from: Nanos, to: Nanos) -> anyhow::Result<Vec<FileEntry>> {
    // a single local file
    if let Some(p) = &loc.local_path {
        let meta = std::fs::metadata(p).with_context(|| format!("{}", p.display()))?;
        if meta.is_file() {
            return Ok(vec![FileEntry {
                path: loc.prefix.clone(),
                size: meta.len(),
                partition: 0,
                minute: None,
                display: p.display().to_string().into(),
            }]);
        }
    } else if let Ok(meta) = loc.store.head(&loc.prefix).await {
        // a single object
        return Ok(vec![FileEntry {
            path: meta.location.clone(),
            size: meta.size,
            partition: 0,
            minute: None,
            display: loc.display.clone().into(),
        }]);
    }
    let metas: Vec<object_store::ObjectMeta> =
        loc.store.list(Some(&loc.prefix)).try_collect().await.with_context(|| format!("listing {}", loc.display))?;
    let mut files: Vec<FileEntry> = Vec::new();
    for m in metas {
        let rel = loc.relative(&m.location);
        let name = m.location.filename().unwrap_or("");
        let hidden = rel.split('/').any(|seg| seg.starts_with('.') || seg.starts_with('_'));
        if hidden {
            continue;
        }
        if !cfg.extensions.is_empty() && !cfg.extensions.iter().any(|e| name.ends_with(e.as_str())) {
            continue;
        }
        let (partition, minute) = parse_blob_layout(&rel).map(|(p, m)| (p, Some(m))).unwrap_or((0, None));
        files.push(FileEntry {
            display: loc.describe(&m.location).into(),
            path: m.location,
            size: m.size,
            partition,
            minute,
        });
    }
    let all_blob = !files.is_empty() && files.iter().all(|f| f.minute.is_some());
    let use_blob = match cfg.layout {
        Layout::Iotcentral => {
            if let Some(bad) = files.iter().find(|f| f.minute.is_none()) {
                bail!(
                    "{} does not follow IoT Central's layout {{app-id}}/{{partition}}/{{YYYY}}/{{MM}}/{{dd}}/{{hh}}/{{mm}}/{{file}}",
                    bad.display
                );
            }
            true
        }
        Layout::Plain => false,
        Layout::Auto => all_blob,
    };
    if use_blob {
        // A minute folder holds what was exported during that minute; IoT Central may export up
        // to 60 s late, so keep two minutes of slack on each side. Events are filtered exactly.
        let slack = 120 * 1_000_000_000;
        files.retain(|f| {
            let m = f.minute.unwrap();
            m + 60_000_000_000 + slack > from && m - slack < to
        });
        files.sort_by(|a, b| (a.minute, a.partition, a.path.as_ref()).cmp(&(b.minute, b.partition, b.path.as_ref())));
    } else {
        for f in &mut files {
            f.partition = 0;
        }
        files.sort_by(|a, b| a.path.as_ref().cmp(b.path.as_ref()));
    }
    Ok(files)
}

/// `{app-id}/{partition}/{YYYY}/{MM}/{dd}/{hh}/{mm}/{file...}` → (partition, minute).
fn parse_blob_layout(rel: &str) -> Option<(u32, Nanos)> {
    let segs: Vec<&str> = rel.split('/').collect();
    if segs.len() < 8 {
        return None;
    }
    let n = segs.len();
    // the layout may sit below a prefix: match from the end
    let (part, y, mo, d, h, mi) = (segs[n - 7], segs[n - 6], segs[n - 5], segs[n - 4], segs[n - 3], segs[n - 2]);
    let num = |s: &str, len: usize| {
        (s.len() == len && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse::<u32>().ok()).flatten()
    };
    let partition = part.parse::<u32>().ok()?;
    let ts = format!("{:04}-{:02}-{:02}T{:02}:{:02}:00Z", num(y, 4)?, num(mo, 2)?, num(d, 2)?, num(h, 2)?, num(mi, 2)?);
    Some((partition, crate::time::parse_rfc3339(&ts)?))
}

/// The lines of one part of a mapped file: the part's events share it.
struct MappedPart(Arc<memmap2::Mmap>, std::ops::Range<usize>);

impl AsRef<[u8]> for MappedPart {
    fn as_ref(&self) -> &[u8] {
        &self.0[self.1.clone()]
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

struct Reader {
    loc: Location,
    projection: Option<Arc<Projection>>,
    files: Vec<FileEntry>,
    start: Position,
    format: Format,
    batch_size: usize,
    mmap: bool,
    from: Nanos,
    to: Nanos,
    component: String,
    progress: crate::metrics::SharedProgress,
    metrics: crate::metrics::ComponentMetrics,
    handle: tokio::runtime::Handle,
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
            decode_record_each(text.slice(s..e), projection.as_ref(), |r| match r {
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
struct InFlight {
    /// (part, what it decoded or what a panicking decoder said)
    rx: std::sync::mpsc::Receiver<(usize, Result<Decoded, String>)>,
    slots: Vec<Option<Decoded>>,
    pos: Position,
}

/// Reads into `buf[start..]` until it is full or the input ends; returns (filled length, eof).
fn fill(input: &mut Box<dyn Read + Send>, buf: &mut [u8], start: usize) -> std::io::Result<(usize, bool)> {
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
    fn run(self, tx: &mpsc::Sender<ReaderMsg>, stop: &std::sync::atomic::AtomicBool) {
        for idx in self.start.file..self.files.len() {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let skip = if idx == self.start.file { self.start.line } else { 0 };
            if let Err(e) = self.read_file(idx, skip, tx, stop) {
                if e.downcast_ref::<Closed>().is_some() {
                    return;
                }
                // An unreadable file (corrupt gzip, vanished object) is a dead letter, not the end.
                let f = &self.files[idx];
                let dl =
                    Event::dead_letter(Bytes::new(), &format!("cannot read file: {e:#}"), &f.display, &self.component);
                let pos = Position {
                    file: idx + 1,
                    path: self.files.get(idx + 1).map(|f| f.path.to_string()).unwrap_or_default(),
                    line: 0,
                };
                if tx.blocking_send(ReaderMsg::Batch { events: vec![], dead: vec![dl], pos }).is_err() {
                    return;
                }
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
        let mut input = self.open(f)?;
        // One buffer: the decoding jobs take copies of their lines, so it is refilled while they
        // run. It only grows for a line longer than a chunk, or to hold a whole JSON-array file.
        let mut cur: Vec<u8> = vec![0; CHUNK];
        let (mut len, mut eof) = fill(&mut input, &mut cur, 0)?;
        let array_mode = match self.format {
            Format::JsonArray => true,
            Format::Jsonl => false,
            Format::Auto => looks_like_array_file(&cur[..len], eof),
        };
        if array_mode {
            while !eof {
                cur.resize(cur.len() * 2, 0);
                (len, eof) = fill(&mut input, &mut cur, len)?;
            }
            return self.emit_array_file(idx, Bytes::copy_from_slice(&cur[..len]), skip, tx);
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
        self.finish(&mut ahead, tx)
    }

    /// A local, uncompressed JSON-lines file, opened for [`Reader::read_mapped`]; `None` for
    /// anything else (object storage, gzip, JSON-array files, or when `mmap: false`).
    fn mappable(&self, f: &FileEntry) -> anyhow::Result<Option<(std::fs::File, u64)>> {
        if !self.mmap || self.loc.local_path.is_none() || self.format == Format::JsonArray {
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
        let array = self.format == Format::Auto
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
    fn decode_lines(
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
    fn finish(&self, ahead: &mut VecDeque<InFlight>, tx: &mpsc::Sender<ReaderMsg>) -> anyhow::Result<()> {
        while !ahead.is_empty() {
            self.send_oldest(ahead, tx)?;
        }
        Ok(())
    }

    /// Sends the messages of a JSON-array file; the position counts elements, so that a restart
    /// skips the `skip` already sent.
    fn emit_array_file(&self, idx: usize, all: Bytes, skip: u64, tx: &mpsc::Sender<ReaderMsg>) -> anyhow::Result<()> {
        let f = &self.files[idx];
        let mut out = Vec::new();
        decode_record_into_unbounded(all.clone(), &mut out);
        let here = |line: u64| Position { file: idx, path: f.path.to_string(), line };
        let mut events = Vec::new();
        let mut dead = Vec::new();
        for (i, r) in out.into_iter().enumerate().skip(skip as usize) {
            match r {
                Ok(mut ev) if ev.time >= self.from && ev.time < self.to => {
                    ev.meta.partition = f.partition;
                    ev.meta.offset = i as i64;
                    ev.meta.origin = Some(f.display.clone());
                    events.push(ev);
                }
                Ok(_) => {}
                Err(reason) => {
                    let payload = if all.len() <= crate::model::MAX_RECORD_BYTES { all.clone() } else { Bytes::new() };
                    dead.push(Event::dead_letter(payload, &reason, &format!("{}[{i}]", f.display), &self.component));
                }
            }
            if events.len() >= self.batch_size.max(1) {
                let batch = std::mem::take(&mut events);
                tx.blocking_send(ReaderMsg::Batch {
                    events: batch,
                    dead: std::mem::take(&mut dead),
                    pos: here(i as u64 + 1),
                })
                .map_err(|_| Closed)?;
            }
        }
        let next = Position {
            file: idx + 1,
            path: self.files.get(idx + 1).map(|f| f.path.to_string()).unwrap_or_default(),
            line: 0,
        };
        tx.blocking_send(ReaderMsg::Batch { events, dead, pos: next }).map_err(|_| Closed)?;
        Ok(())
    }
}

/// A JSON-array file: its elements are decoded one by one (the whole file may exceed the
/// per-record limit, each message may not).
fn decode_record_into_unbounded(all: Bytes, out: &mut Vec<Result<Event, String>>) {
    let text = match std::str::from_utf8(&all) {
        Ok(t) => t,
        Err(e) => {
            out.push(Err(format!("invalid UTF-8 at byte {}", e.valid_up_to())));
            return;
        }
    };
    let elems: Vec<&serde_json::value::RawValue> = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            out.push(Err(format!("malformed JSON array file: {e}")));
            return;
        }
    };
    for elem in elems {
        let off = elem.get().as_ptr() as usize - text.as_ptr() as usize;
        decode_record_into(all.slice(off..off + elem.get().len()), out);
    }
}

/// A file is one JSON array when it starts with `[` and its first line is not a complete JSON
/// value on its own (JSON lines whose lines are arrays also start with `[`).
fn looks_like_array_file(head: &[u8], eof: bool) -> bool {
    let trimmed = head.iter().position(|b| !b.is_ascii_whitespace());
    let Some(start) = trimmed else { return false };
    if head[start] != b'[' {
        return false;
    }
    let line_end = memchr::memchr(b'\n', &head[start..]).map(|i| start + i);
    match line_end {
        Some(e) => serde_json::from_slice::<serde::de::IgnoredAny>(&head[start..e]).is_err(),
        None => !eof || serde_json::from_slice::<serde::de::IgnoredAny>(&head[start..]).is_ok(),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("reading stopped")]
struct Closed;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_layout_paths() {
        let (p, m) = parse_blob_layout("6e9d8f3c-2b1a/3/2026/11/01/13/05/a1b2.json").unwrap();
        assert_eq!(p, 3);
        assert_eq!(crate::time::format_rfc3339(m), "2026-11-01T13:05:00.000Z");
        assert!(parse_blob_layout("prefix/app/0/2026/11/01/13/05/x.json").is_some(), "below a prefix");
        assert!(parse_blob_layout("app/x/2026/11/01/13/05/f").is_none());
        assert!(parse_blob_layout("app/0/26/11/01/13/05/f").is_none());
        assert!(parse_blob_layout("export.jsonl").is_none());
    }

    #[test]
    fn array_files_are_told_from_json_lines() {
        assert!(looks_like_array_file(b"[\n {\"a\":1},\n {\"a\":2}\n]\n", true));
        assert!(looks_like_array_file(b"[{\"a\":1},{\"a\":2}]", true));
        assert!(!looks_like_array_file(b"[{\"a\":1}]\n[{\"a\":2}]\n", true), "JSON lines of arrays");
        assert!(!looks_like_array_file(b"{\"a\":1}\n", true));
        assert!(!looks_like_array_file(b"  ", true));
    }
}
