//! A Parquet file whose row groups are encoded on the rayon pool while the sink goes on.
//!
//! arrow-rs's `AsyncArrowWriter` encodes and compresses every column on the caller's thread,
//! so a sink that writes one file keeps one core busy however many the machine has, and the
//! stages before it wait on it. Here the rows of a row group are collected as they come; a full
//! row group is handed to the pool, where its columns are encoded in parallel (one
//! `ArrowColumnWriter` each), and encoded row groups are appended to the file in the order they
//! were cut, so the file is the one the sequential writer would make: same row groups, same
//! rows in the same order. When a row group is cut while an older one is still encoding, the
//! write waits for the older one: at most two are encoding besides the one being filled, which
//! bounds memory (allowing more measured no faster on two cores and used as much memory).

use std::collections::VecDeque;
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use bytes::Bytes;
use object_store::buffered::BufWriter;
use parquet::arrow::arrow_writer::{compute_leaves, ArrowColumnChunk, ArrowRowGroupWriterFactory};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use rayon::prelude::*;
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;

type Encoded = parquet::errors::Result<Vec<ArrowColumnChunk>>;

/// A row group being encoded: its result, and the in-memory size of its rows (for estimates).
struct InFlight {
    done: oneshot::Receiver<Encoded>,
    arrow_bytes: usize,
}

pub(crate) struct ParallelWriter {
    file: SerializedFileWriter<Vec<u8>>,
    factory: Arc<ArrowRowGroupWriterFactory>,
    schema: SchemaRef,
    out: BufWriter,
    row_group_size: usize,
    /// Rows of the row group being collected.
    pending: Vec<RecordBatch>,
    pending_rows: usize,
    pending_bytes: usize,
    inflight: VecDeque<InFlight>,
    /// Row groups cut so far (the index of the next one).
    groups: usize,
    /// Row groups that may be encoding when no write waits (see the module's note).
    ahead: usize,
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
            factory: Arc::new(factory),
            schema,
            out,
            row_group_size,
            pending: Vec::new(),
            pending_rows: 0,
            pending_bytes: 0,
            inflight: VecDeque::new(),
            groups: 0,
            ahead: 1,
            ratio: 1.0,
        })
    }

    /// Adds rows (in the writer's schema); hands every full row group to the pool.
    pub async fn write(&mut self, rows: &RecordBatch) -> anyhow::Result<()> {
        let mut rest = rows.clone();
        while rest.num_rows() > 0 {
            let room = self.row_group_size - self.pending_rows;
            let take = room.min(rest.num_rows());
            let part = rest.slice(0, take);
            rest = rest.slice(take, rest.num_rows() - take);
            self.pending_bytes += part.get_array_memory_size();
            self.pending_rows += take;
            self.pending.push(part);
            if self.pending_rows == self.row_group_size {
                self.cut();
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
        let bytes = self.pending_bytes + self.inflight.iter().map(|f| f.arrow_bytes).sum::<usize>();
        (bytes as f64 * self.ratio) as usize
    }

    /// Encodes what is left, appends it, writes the footer and completes the upload.
    pub async fn close(mut self) -> anyhow::Result<()> {
        if self.pending_rows > 0 {
            self.cut();
        }
        self.drain(true).await?;
        self.file.finish()?;
        self.send().await?;
        self.out.shutdown().await?;
        Ok(())
    }

    /// Hands the collected rows to the pool as the next row group.
    fn cut(&mut self) {
        let batches = std::mem::take(&mut self.pending);
        let arrow_bytes = std::mem::take(&mut self.pending_bytes);
        self.pending_rows = 0;
        let (tx, done) = oneshot::channel();
        let (factory, schema, index) = (self.factory.clone(), self.schema.clone(), self.groups);
        self.groups += 1;
        rayon::spawn(move || {
            // a panic would otherwise abort the process (rayon's default); it becomes an error
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                encode_row_group(&factory, index, &schema, &batches)
            }))
            .unwrap_or_else(|_| Err(parquet::errors::ParquetError::General("encoding a row group panicked".into())));
            drop(batches);
            let _ = tx.send(r);
        });
        self.inflight.push_back(InFlight { done, arrow_bytes });
    }

    /// Appends encoded row groups in order: those done, and (or, with `all`, every one) the
    /// oldest while more than `ahead` are encoding.
    async fn drain(&mut self, all: bool) -> anyhow::Result<()> {
        while !self.inflight.is_empty() {
            let wait = all || self.inflight.len() > self.ahead;
            let front = self.inflight.front_mut().expect("not empty");
            let chunks = if wait {
                (&mut front.done).await.map_err(|_| anyhow::anyhow!("a row group's encoder stopped"))?
            } else {
                match front.done.try_recv() {
                    Ok(r) => r,
                    Err(oneshot::error::TryRecvError::Empty) => break,
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
        Ok(())
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

/// Encodes one row group: each leaf column by its own writer, the columns in parallel.
fn encode_row_group(
    factory: &ArrowRowGroupWriterFactory,
    index: usize,
    schema: &SchemaRef,
    batches: &[RecordBatch],
) -> parquet::errors::Result<Vec<ArrowColumnChunk>> {
    let writers = factory.create_column_writers(index)?;
    // which top-level column each leaf writer belongs to, and its leaf within that column
    let mut owner = Vec::with_capacity(writers.len());
    for (c, f) in schema.fields().iter().enumerate() {
        let leaves = match batches.first() {
            Some(b) => compute_leaves(f, b.column(c))?.len(),
            None => 1,
        };
        owner.extend((0..leaves).map(|l| (c, l)));
    }
    writers
        .into_par_iter()
        .zip(owner)
        .map(|(mut w, (c, l))| {
            for b in batches {
                let leaf = compute_leaves(&schema.fields()[c], b.column(c))?.swap_remove(l);
                w.write(&leaf)?;
            }
            w.close()
        })
        .collect()
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
    /// them: same row groups, same rows in the same order, same schema (time zone included).
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
        for n in [1, 999, 2500, 3, 7000, 1, 1000, 496] {
            let b = batch(at, n);
            at += n as i64;
            ours.write(&b).await.unwrap();
            theirs.write(&b).unwrap();
            assert!(ours.bytes_written() + ours.in_progress_size() > 0);
        }
        ours.close().await.unwrap();
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
