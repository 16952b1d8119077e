//! A Parquet file whose row groups are encoded on the rayon pool while the sink goes on.
//!
//! arrow-rs's `AsyncArrowWriter` encodes and compresses every column on the caller's thread,
//! so a sink that writes one file keeps one core busy however many the machine has, and the
//! stages before it wait on it. Here each row group has a lane: its column writers and a queue
//! of the rows handed to it. A job on the pool drains the queue, encoding the rows, and frees
//! them at once (holding whole row groups of Arrow data until they
//! were encoded doubled the peak memory and cost a page fault per 4 KiB of it). A full row
//! group's lane closes its writers, and encoded row groups are appended to the file in the order
//! they were cut, so the file is the one the sequential writer makes: same row groups, same rows
//! in the same order.
//!
//! Rows go to a lane in groups of at least [`MIN_ROWS`]. Bounds: a write waits while [`QUEUED`]
//! groups are queued in lanes, and while more than one cut row group is still encoding.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use bytes::Bytes;
use object_store::buffered::BufWriter;
use parquet::arrow::arrow_writer::{
    compute_leaves, ArrowColumnChunk, ArrowColumnWriter, ArrowLeafColumn, ArrowRowGroupWriterFactory,
};
use parquet::arrow::ArrowWriter;
use parquet::errors::ParquetError;
use parquet::file::metadata::ParquetMetaData;
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use rayon::prelude::*;
use tokio::io::AsyncWriteExt;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

type Encoded = parquet::errors::Result<Vec<ArrowColumnChunk>>;

/// Handed to a lane at a time, at least (unless the row group ends): window output comes in
/// batches of a few hundred rows, and a pool job for each cost more than encoding them.
const MIN_ROWS: usize = 4096;
/// Handed to lanes and not yet encoded, at most: this many groups of about [`MIN_ROWS`] rows.
const QUEUED: usize = 5;

/// Rows handed to a lane, with the permit that counts them among the [`QUEUED`].
type Queued = (Vec<RecordBatch>, OwnedSemaphorePermit);

/// One row group being encoded.
struct Lane {
    state: Mutex<LaneState>,
    schema: SchemaRef,
}

struct LaneState {
    /// The column writers, or the error that stopped them; taken by the job while it runs.
    writers: Option<parquet::errors::Result<Vec<ArrowColumnWriter>>>,
    queue: VecDeque<Queued>,
    /// A job is draining the queue.
    running: bool,
    /// No more rows come: the job that empties the queue closes the writers.
    closing: bool,
    done: Option<oneshot::Sender<Encoded>>,
}

impl Lane {
    /// Queues rows; starts a job unless one is draining.
    fn push(self: &Arc<Lane>, rows: Queued) {
        let mut s = self.state.lock().expect("lane lock");
        s.queue.push_back(rows);
        self.start(&mut s);
    }

    /// No more rows: the writers are closed once the queue is encoded.
    fn close(self: &Arc<Lane>) {
        let mut s = self.state.lock().expect("lane lock");
        s.closing = true;
        self.start(&mut s);
    }

    fn start(self: &Arc<Lane>, s: &mut LaneState) {
        if !s.running {
            s.running = true;
            let lane = self.clone();
            rayon::spawn(move || lane.pump());
        }
    }

    /// Encodes queued rows until the queue is empty, freeing each group (and its permit) once
    /// encoded; closes the writers and sends the row group when closing. One job at a time.
    fn pump(&self) {
        let mut writers = self.state.lock().expect("lane lock").writers.take().expect("one job at a time");
        loop {
            let rows = {
                let mut s = self.state.lock().expect("lane lock");
                match s.queue.pop_front() {
                    Some(rows) => rows,
                    None if s.closing => break,
                    None => {
                        s.writers = Some(writers);
                        s.running = false;
                        return;
                    }
                }
            };
            if let Ok(w) = &mut writers {
                if let Err(e) = catch(|| rows.0.iter().try_for_each(|b| encode(w, &self.schema, b))) {
                    writers = Err(e);
                }
            }
        }
        let r = writers.and_then(|w| catch(|| w.into_par_iter().map(|w| w.close()).collect()));
        if let Some(done) = self.state.lock().expect("lane lock").done.take() {
            let _ = done.send(r);
        }
    }
}

/// Runs `f`, turning a panic into an error (a panic on the pool would abort the process).
fn catch<T>(f: impl FnOnce() -> parquet::errors::Result<T>) -> parquet::errors::Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err(ParquetError::General("encoding a row group panicked".into())))
}

/// Writes one batch into a row group's column writers. (Encoding the columns in parallel, on
/// the pool, made W1's CPU time 30% larger with its small batches and the archive path no
/// faster: the lanes and the decoding already keep the pool busy.)
fn encode(writers: &mut [ArrowColumnWriter], schema: &SchemaRef, rows: &RecordBatch) -> parquet::errors::Result<()> {
    let mut leaves: Vec<ArrowLeafColumn> = Vec::with_capacity(writers.len());
    for (f, c) in schema.fields().iter().zip(rows.columns()) {
        leaves.extend(compute_leaves(f, c)?);
    }
    if leaves.len() != writers.len() {
        return Err(ParquetError::General(format!("{} columns for {} writers", leaves.len(), writers.len())));
    }
    writers.iter_mut().zip(&leaves).try_for_each(|(w, l)| w.write(l))
}

/// A row group cut: its result, and the in-memory size of its rows (for estimates).
struct InFlight {
    done: oneshot::Receiver<Encoded>,
    arrow_bytes: usize,
}

pub(crate) struct ParallelWriter {
    file: SerializedFileWriter<Vec<u8>>,
    factory: ArrowRowGroupWriterFactory,
    schema: SchemaRef,
    out: BufWriter,
    row_group_size: usize,
    /// The permits of rows queued in lanes ([`QUEUED`]).
    permits: Arc<Semaphore>,
    /// The row group being filled, its rows and their in-memory size.
    lane: Option<Arc<Lane>>,
    /// Rows of the lane not yet handed to it (fewer than [`MIN_ROWS`]).
    staged: Vec<RecordBatch>,
    rows: usize,
    lane_bytes: usize,
    inflight: VecDeque<InFlight>,
    /// Row groups started so far (the index of the next one).
    groups: usize,
    /// Encoded bytes per in-memory byte of the last row group appended (1 before the first).
    ratio: f64,
}

impl ParallelWriter {
    pub fn try_new(out: BufWriter, schema: SchemaRef, props: WriterProperties) -> anyhow::Result<ParallelWriter> {
        let row_group_size = props.max_row_group_row_count().unwrap_or(1024 * 1024).max(1);
        // ArrowWriter puts the Arrow schema into the file's metadata (time zones, types Parquet
        // cannot say); its lower half then writes the row groups we encode.
        let (file, factory) =
            ArrowWriter::try_new(Vec::new(), schema.clone(), Some(props))?.into_serialized_writer()?;
        Ok(ParallelWriter {
            file,
            factory,
            schema,
            out,
            row_group_size,
            permits: Arc::new(Semaphore::new(QUEUED)),
            lane: None,
            staged: Vec::new(),
            rows: 0,
            lane_bytes: 0,
            inflight: VecDeque::new(),
            groups: 0,
            ratio: 1.0,
        })
    }

    /// Adds rows (in the writer's schema) to the row group being filled, cutting it when full.
    pub async fn write(&mut self, rows: &RecordBatch) -> anyhow::Result<()> {
        let mut rest = rows.clone();
        while rest.num_rows() > 0 {
            let take = (self.row_group_size - self.rows).min(rest.num_rows());
            let part = rest.slice(0, take);
            rest = rest.slice(take, rest.num_rows() - take);
            if self.lane.is_none() {
                let writers = self.factory.create_column_writers(self.groups)?;
                self.groups += 1;
                let (tx, done) = oneshot::channel();
                let state = LaneState {
                    writers: Some(Ok(writers)),
                    queue: VecDeque::new(),
                    running: false,
                    closing: false,
                    done: Some(tx),
                };
                let lane = Lane { state: Mutex::new(state), schema: self.schema.clone() };
                self.lane = Some(Arc::new(lane));
                self.inflight.push_back(InFlight { done, arrow_bytes: 0 });
            }
            self.lane_bytes += part.get_array_memory_size();
            self.rows += take;
            self.staged.push(part);
            if self.rows == self.row_group_size {
                self.cut().await?;
            } else if self.staged.iter().map(RecordBatch::num_rows).sum::<usize>() >= MIN_ROWS {
                self.hand_over().await?;
            }
        }
        self.drain(false).await
    }

    /// Bytes in the file so far (handed to the store or about to be).
    pub fn bytes_written(&self) -> usize {
        self.file.bytes_written()
    }

    /// An estimate of the encoded size of the rows not yet in the file.
    pub fn in_progress_size(&self) -> usize {
        let bytes = self.lane_bytes + self.inflight.iter().map(|f| f.arrow_bytes).sum::<usize>();
        (bytes as f64 * self.ratio) as usize
    }

    /// Encodes what is left, appends it, writes the footer and completes the upload; returns
    /// the file's metadata and size in bytes.
    pub async fn close(mut self) -> anyhow::Result<(ParquetMetaData, usize)> {
        self.cut().await?;
        self.drain(true).await?;
        let meta = self.file.finish()?;
        let size = self.file.bytes_written();
        self.send().await?;
        self.out.shutdown().await?;
        Ok((meta, size))
    }

    /// Hands the staged rows to the lane being filled, waiting while [`QUEUED`] groups are.
    async fn hand_over(&mut self) -> anyhow::Result<()> {
        if let (Some(lane), false) = (&self.lane, self.staged.is_empty()) {
            let permit = self.permits.clone().acquire_owned().await?;
            lane.push((std::mem::take(&mut self.staged), permit));
        }
        Ok(())
    }

    /// Closes the lane being filled, if any: its row group is complete.
    async fn cut(&mut self) -> anyhow::Result<()> {
        self.hand_over().await?;
        if let Some(lane) = self.lane.take() {
            lane.close();
            if let Some(f) = self.inflight.back_mut() {
                f.arrow_bytes = std::mem::take(&mut self.lane_bytes);
            }
            self.rows = 0;
        }
        Ok(())
    }

    /// Appends encoded row groups in order: those done, and (or, with `all`, every one) the
    /// oldest while more than one cut row group is encoding.
    async fn drain(&mut self, all: bool) -> anyhow::Result<()> {
        loop {
            let cut = self.inflight.len() - usize::from(self.lane.is_some());
            if cut == 0 {
                return Ok(());
            }
            let wait = all || cut > 1;
            let front = self.inflight.front_mut().expect("not empty");
            let chunks = if wait {
                (&mut front.done).await.map_err(|_| anyhow::anyhow!("a row group's encoder stopped"))?
            } else {
                match front.done.try_recv() {
                    Ok(r) => r,
                    Err(oneshot::error::TryRecvError::Empty) => return Ok(()),
                    Err(oneshot::error::TryRecvError::Closed) => anyhow::bail!("a row group's encoder stopped"),
                }
            };
            let arrow_bytes = self.inflight.pop_front().map_or(0, |f| f.arrow_bytes);
            let before = self.file.bytes_written();
            let mut group = self.file.next_row_group()?;
            for c in chunks? {
                c.append_to_row_group(&mut group)?;
            }
            group.close()?;
            if arrow_bytes > 0 {
                self.ratio = (self.file.bytes_written() - before) as f64 / arrow_bytes as f64;
            }
            self.send().await?;
        }
    }

    /// Hands the file's buffered bytes to the store.
    async fn send(&mut self) -> anyhow::Result<()> {
        let buf = std::mem::take(self.file.inner_mut());
        if !buf.is_empty() {
            self.out.put(Bytes::from(buf)).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{ArrayRef, Int64Array, StringArray, TimestampMicrosecondArray};
    use arrow_schema::{DataType, Field, Schema, TimeUnit};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("s", DataType::Utf8, true),
            Field::new("t", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), true),
        ]))
    }

    fn batch(from: i64, n: usize) -> RecordBatch {
        let ids = from..from + n as i64;
        let cols: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from_iter_values(ids.clone())),
            Arc::new(StringArray::from_iter(ids.clone().map(|i| (i % 7 != 0).then(|| format!("dev-{}", i % 13))))),
            Arc::new(
                TimestampMicrosecondArray::from_iter(ids.map(|i| (i % 5 != 0).then_some(i * 1000)))
                    .with_timezone("UTC"),
            ),
        ];
        RecordBatch::try_new(schema(), cols).unwrap()
    }

    /// The rows of each row group of a Parquet file, and the file's Arrow schema.
    fn read(bytes: Vec<u8>) -> (Vec<usize>, Vec<RecordBatch>, SchemaRef) {
        let b = ParquetRecordBatchReaderBuilder::try_new(Bytes::from(bytes)).unwrap();
        let groups = b.metadata().row_groups().iter().map(|g| g.num_rows() as usize).collect();
        let schema = b.schema().clone();
        (groups, b.build().unwrap().map(|r| r.unwrap()).collect(), schema)
    }

    fn rows(v: &[RecordBatch]) -> Vec<(i64, Option<String>, Option<i64>)> {
        use arrow_array::cast::AsArray;
        use arrow_array::types::{Int64Type, TimestampMicrosecondType};
        let mut out = Vec::new();
        for b in v {
            let (id, s) = (b.column(0).as_primitive::<Int64Type>(), b.column(1).as_string::<i32>());
            let t = b.column(2).as_primitive::<TimestampMicrosecondType>();
            for i in 0..b.num_rows() {
                use arrow_array::Array;
                out.push((
                    id.value(i),
                    s.is_valid(i).then(|| s.value(i).to_string()),
                    t.is_valid(i).then(|| t.value(i)),
                ));
            }
        }
        out
    }

    /// Row groups cut across batches of every size come out as the sequential writer makes
    /// them: same row groups, same rows in the same order, same schema (time zone included),
    /// also with many small batches.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_file_is_the_sequential_writers() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn object_store::ObjectStore> =
            Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap());
        let props = || WriterProperties::builder().set_max_row_group_row_count(Some(1000)).build();
        let out = BufWriter::new(store.clone(), "f.parquet".into());
        let mut ours = ParallelWriter::try_new(out, schema(), props()).unwrap();
        let mut theirs = ArrowWriter::try_new(Vec::new(), schema(), Some(props())).unwrap();
        let mut at = 0;
        // sizes around the row group's, then many small batches (more than a lane may queue)
        let sizes = [1, 999, 2500, 3, 7000, 1, 1000, 496].into_iter().chain(std::iter::repeat_n(37, 60));
        for n in sizes {
            let b = batch(at, n);
            at += n as i64;
            ours.write(&b).await.unwrap();
            theirs.write(&b).unwrap();
            assert!(ours.bytes_written() + ours.in_progress_size() > 0);
        }
        let (meta, size) = ours.close().await.unwrap();
        assert_eq!(meta.file_metadata().num_rows(), at);
        assert_eq!(size as u64, std::fs::metadata(dir.path().join("f.parquet")).unwrap().len());
        let (want_groups, want, want_schema) = read(theirs.into_inner().unwrap());
        let (groups, got, schema) = read(std::fs::read(dir.path().join("f.parquet")).unwrap());
        assert_eq!(groups, want_groups);
        assert_eq!(groups.iter().sum::<usize>(), at as usize);
        assert_eq!(schema, want_schema);
        assert_eq!(rows(&got), rows(&want));
        assert_eq!(rows(&got).len(), at as usize);
    }

    /// An encoding error on the pool comes back as an error of the write that waits for it, and
    /// an empty file is still a valid one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn errors_come_back_and_empty_files_are_valid() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn object_store::ObjectStore> =
            Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap());
        let props = WriterProperties::builder().set_max_row_group_row_count(Some(10)).build();
        let empty = ParallelWriter::try_new(BufWriter::new(store.clone(), "e.parquet".into()), schema(), props.clone());
        empty.unwrap().close().await.unwrap();
        let (groups, rows, _) = read(std::fs::read(dir.path().join("e.parquet")).unwrap());
        assert!(groups.is_empty() && rows.is_empty());

        // rows whose column does not match the writer's schema fail in the encoder
        let other = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("s", DataType::Utf8, true),
            Field::new("t", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), true),
        ]));
        let good = batch(0, 10);
        let bad = RecordBatch::try_new(
            other,
            vec![
                Arc::new(StringArray::from_iter_values((0..10).map(|i| i.to_string()))),
                good.column(1).clone(),
                good.column(2).clone(),
            ],
        )
        .unwrap();
        let mut w = ParallelWriter::try_new(BufWriter::new(store, "b.parquet".into()), schema(), props).unwrap();
        let mut err = None;
        for _ in 0..4 {
            if let Err(e) = w.write(&bad).await {
                err = Some(e);
                break;
            }
        }
        let err = match err {
            Some(e) => e,
            None => w.close().await.unwrap_err(),
        };
        assert!(!err.to_string().is_empty());
    }
}
