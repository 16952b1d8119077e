//! `parquet`: Parquet files in a local folder or object storage, committed atomically.
//!
//! Two layouts:
//! - `export` (raw export messages): one column per envelope field under its export name
//!   (`applicationId`, `messageSource`, `messageType`, `deviceId`, `schema`, `templateId`,
//!   `enqueuedTime` as a UTC timestamp, `module`, `component`), the payload objects as JSON text
//!   (`telemetry`, `properties`, `enrichments`, `messageProperties`, audit `actor`, `resource`,
//!   `updated`) and any other top-level field in `extra`. The schema never changes, so a device
//!   that adds a telemetry field does not split the dataset into incompatible files; query
//!   telemetry with JSON functions (`telemetry->>'temperature'` in DuckDB).
//! - `rows` (derived rows such as window output): one column per top-level field, typed from the
//!   values; a batch with new columns starts a new file.
//!
//! Delivery: files are written to `_staging/…parquet.inprogress` and closed at every checkpoint
//! barrier (and when they reach the rolling limits); a staged file is renamed to its final name
//! only after the checkpoint that covers it is durable. Readers never see a partial file, and a
//! crash leaves every record in exactly one visible file once the replay is done.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use arrow_array::RecordBatch;
use arrow_schema::{DataType, SchemaRef, TimeUnit};
use async_trait::async_trait;
use futures::TryStreamExt;
use object_store::buffered::BufWriter;
use object_store::path::Path;
use object_store::ObjectStoreExt;
use parquet::basic::{Compression as PqCompression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use rayon::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::values::{self, ByteSize, Dur, Parsed};
use crate::config::{Checker, Spec};
use crate::event::{Batch, Event, Kind};
use crate::metrics::ComponentMetrics;
use crate::rows::{
    conform, encode_export_with, encode_rows, export_schema, infer_rows_schema, schema_covers, with_time_unit,
};
use crate::runtime::{BuildCx, Sink};
use crate::storage::{self, Location};

pub(crate) mod encoder;
mod partition;
mod typed;
use encoder::ParallelWriter;
pub use partition::PartitionTemplate;
use partition::Partitioner;
pub(crate) use typed::TypedColumns;
pub use typed::{ColumnSpec, ColumnType};

/// Writes Parquet files.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ParquetConfig {
    pub inputs: Vec<String>,
    /// Folder or object-store URL (`./out`, `s3://bucket/prefix`, `az://container/prefix`, `gs://...`).
    pub url: String,
    /// `zstd` (default), `snappy` or `none`.
    #[serde(default)]
    pub compression: Compression,
    /// Rows per row group (default 122,880, as DuckDB's). A row group is buffered until it is
    /// full and the last one is encoded and written when the file closes: smaller ones bound
    /// the memory of an open file and shorten the end of a replay (W1: 1,000,000-row groups
    /// made it 25 ms longer).
    #[serde(default = "d_row_group")]
    pub row_group_size: usize,
    /// When to start a new file (besides every checkpoint).
    #[serde(default)]
    pub roll: Roll,
    /// Hive-style partition path from the event time (strftime) and fields (`{path}`), e.g.
    /// `date=%Y-%m-%d/hour=%H` or `site={enrichments.site}/date=%Y-%m-%d`.
    #[serde(default)]
    pub partition_by: Option<Parsed<PartitionTemplate>>,
    /// The timestamp field for `partition_by` (default: the event time: `enqueuedTime` for
    /// export messages, `window_start` for window output).
    #[serde(default)]
    pub partition_time: Option<values::Path>,
    /// `auto` (export layout for export messages, rows otherwise), `export` or `rows`.
    #[serde(default)]
    pub layout: ParquetLayout,
    /// Add `_partition`, `_offset`, `_origin` and `_enqueued_time` columns (where an event came from).
    #[serde(default)]
    pub metadata_columns: bool,
    /// The unit of timestamp columns: `us` (the default: every common reader, Spark included,
    /// opens it), `ms`, or `ns` (which Spark, hence Fabric, Synapse and Databricks, refuses).
    #[serde(default)]
    pub timestamp_unit: TimestampUnit,
    /// Typed columns beside the layout's own: a map from a field path (as elsewhere:
    /// `temperature` is `telemetry.temperature` in an export message) to `double`, `long`,
    /// `string`, `boolean` or `timestamp`, or to `{type: ..., name: ...}` to name the column other
    /// than the path. A value of another type is null in its column (the JSON text keeps it).
    #[serde(default)]
    pub columns: BTreeMap<String, ColumnSpec>,
    /// File name prefix.
    #[serde(default = "d_prefix")]
    pub file_prefix: String,
    /// Object-store options (lower-case keys of the cloud's environment variables).
    #[serde(default)]
    pub storage: BTreeMap<String, String>,
}

pub(crate) fn d_row_group() -> usize {
    122_880
}
fn d_prefix() -> String {
    "part".into()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    #[default]
    Zstd,
    Snappy,
    None,
}

impl Compression {
    /// Parquet writer properties with this compression, naming centralflow as the writer.
    pub(crate) fn writer_properties(self) -> parquet::file::properties::WriterPropertiesBuilder {
        let compression = match self {
            Compression::Zstd => PqCompression::ZSTD(ZstdLevel::default()),
            Compression::Snappy => PqCompression::SNAPPY,
            Compression::None => PqCompression::UNCOMPRESSED,
        };
        WriterProperties::builder()
            .set_compression(compression)
            .set_created_by(format!("centralflow {}", env!("CARGO_PKG_VERSION")))
    }
}

/// The properties of a file of `schema`: dictionaries for text columns only (numbers and times
/// rarely repeat enough to pay for one, and building it cost CPU on every value), except the
/// export layout's per-message JSON text; no statistics for JSON text (see [`JSON_TEXT`]).
pub(crate) fn file_props(props: &WriterProperties, schema: &SchemaRef) -> WriterProperties {
    let mut b = props.clone().into_builder().set_dictionary_enabled(false);
    let export = export_schema(false);
    let export = schema.fields().len() >= export.fields().len()
        && export.fields().iter().zip(schema.fields()).all(|(a, b)| a.name() == b.name());
    for f in schema.fields() {
        if f.data_type() != &DataType::Utf8 {
            continue;
        }
        let name = f.name().as_str();
        let json = if export { JSON_TEXT.iter().find(|(n, _)| *n == name) } else { None };
        let (dictionary, statistics) = match json {
            Some((_, repeats)) => (*repeats, false),
            None => (true, true),
        };
        b = b.set_column_dictionary_enabled(name.into(), dictionary);
        if !statistics {
            b = b.set_column_statistics_enabled(name.into(), EnabledStatistics::None);
        }
    }
    b.build()
}

/// The export layout's JSON text columns, and whether their values repeat enough for a
/// dictionary. Nobody filters on the bounds of JSON text, so they get no statistics, which cost
/// two comparisons of the whole text per value. `telemetry` (readings) and `messageProperties`
/// (creation times) are new in nearly every message: their dictionaries grew past the 1 MiB
/// page limit a few thousand rows into every row group and were dropped, after interning
/// those rows for nothing (the 1M-message bench file: 7,300 and 18,000 of 122,880 rows).
const JSON_TEXT: [(&str, bool); 8] = [
    ("telemetry", false),
    ("messageProperties", false),
    ("properties", true),
    ("enrichments", true),
    ("actor", true),
    ("resource", true),
    ("updated", true),
    ("extra", true),
];

/// The unit of the timestamp columns written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TimestampUnit {
    #[default]
    Us,
    Ms,
    Ns,
}

impl TimestampUnit {
    fn arrow(self) -> TimeUnit {
        match self {
            TimestampUnit::Us => TimeUnit::Microsecond,
            TimestampUnit::Ms => TimeUnit::Millisecond,
            TimestampUnit::Ns => TimeUnit::Nanosecond,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ParquetLayout {
    #[default]
    Auto,
    Export,
    Rows,
}

/// Rolling limits; each is optional.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Roll {
    /// Rows per file.
    #[serde(default)]
    pub rows: Option<u64>,
    /// Bytes per file, e.g. `128MiB`.
    #[serde(default)]
    pub bytes: Option<Parsed<ByteSize>>,
    /// Age of a file, e.g. `5m`.
    #[serde(default)]
    pub interval: Option<Dur>,
}

impl Spec for ParquetConfig {
    /// It takes derived rows as Arrow columns when nothing needs them as events (no partition
    /// path or metadata columns rendered from them) and its input gives rows only.
    fn accepts_columns(&self) -> bool {
        self.partition_by.is_none()
            && !self.metadata_columns
            && self.columns.is_empty()
            && (self.layout == ParquetLayout::Rows || (self.layout == ParquetLayout::Auto && self.inputs.len() == 1))
    }
    fn check(&self, ptr: &str, cx: &mut Checker<'_>) {
        cx.url(&format!("{ptr}/url"), &self.url);
        if self.row_group_size == 0 {
            cx.error(&format!("{ptr}/row_group_size"), "must be at least 1");
        }
        if self.roll.rows == Some(0) {
            cx.error(&format!("{ptr}/roll/rows"), "must be at least 1");
        }
        if let Some(b) = &self.roll.bytes {
            cx.valid(&format!("{ptr}/roll/bytes"), b);
        }
        if let Some(i) = &self.roll.interval {
            cx.positive_duration(&format!("{ptr}/roll/interval"), i);
        }
        if let Some(p) = &self.partition_by {
            cx.valid(&format!("{ptr}/partition_by"), p);
        }
        if let Some(p) = &self.partition_time {
            cx.valid(&format!("{ptr}/partition_time"), p);
        }
        if self.file_prefix.is_empty() || self.file_prefix.contains('/') {
            cx.error(&format!("{ptr}/file_prefix"), "must be a non-empty name without `/`");
        }
        cx.storage_options(&format!("{ptr}/storage"), &self.storage);
        check_columns(ptr, cx, &self.columns, self.layout, self.metadata_columns);
    }
    fn inputs(&self) -> &[String] {
        &self.inputs
    }
}

/// Typed columns (of a Parquet or Delta sink): valid paths, distinct names, none taken by the
/// layout's own columns.
pub(crate) fn check_columns(
    ptr: &str,
    cx: &mut Checker<'_>,
    columns: &BTreeMap<String, ColumnSpec>,
    layout: ParquetLayout,
    metadata_columns: bool,
) {
    // the columns of the layout that a typed column must not take
    let mut taken: Vec<String> = Vec::new();
    if layout != ParquetLayout::Rows {
        taken.extend(export_schema(false).fields().iter().map(|f| f.name().clone()));
    }
    if metadata_columns {
        taken.extend(["_partition", "_offset", "_origin", "_enqueued_time"].map(String::from));
    }
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for (path, spec) in columns {
        let at = format!("{ptr}/columns/{}", path.replace('~', "~0").replace('/', "~1"));
        if let Err(e) = crate::path::FieldPath::parse(path) {
            cx.error_at_key(&at, format!("not a field path: {e}"));
        }
        let name = spec.name(path);
        if name.is_empty() {
            cx.error(&at, "the column name must not be empty");
        } else if taken.iter().any(|t| t == name) {
            cx.error(&at, format!("column `{name}` is already a column of the layout; give it another `name`"));
        } else if let Some(other) = seen.insert(name, path) {
            cx.error(&at, format!("column `{name}` is also the column of `{other}`; give one another `name`"));
        }
    }
}

// ---------------------------------------------------------------- the sink

/// A staged file waiting for its checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Staged {
    epoch: u64,
    staged: String,
    target: String,
}

struct OpenFile {
    writer: ParallelWriter,
    staged: Path,
    target: Path,
    /// The schema rows are built in ([`crate::rows::ts_type`] timestamps).
    schema: SchemaRef,
    /// The schema written, when the file's timestamp unit differs from the built one.
    written: Option<SchemaRef>,
    rows: u64,
    opened: Instant,
}

pub struct ParquetSink {
    cfg: ParquetConfig,
    loc: Location,
    props: WriterProperties,
    partitioner: Partitioner,
    open: HashMap<String, OpenFile>,
    pending: Vec<Staged>,
    instance: String,
    /// The epoch whose data is being written now (last flushed + 1).
    epoch: u64,
    /// Staged files of an earlier configuration that could not be committed (see `recover`):
    /// never deleted.
    preserve: Vec<String>,
    seq: u64,
    roll_bytes: Option<u64>,
    roll_interval: Option<std::time::Duration>,
    layout: Option<ParquetLayout>,
    typed: TypedColumns,
    metrics: ComponentMetrics,
}

impl ParquetSink {
    pub async fn new(cfg: ParquetConfig, cx: &BuildCx<'_>) -> anyhow::Result<ParquetSink> {
        let loc = storage::open(&cfg.url, &cfg.storage).with_context(|| format!("opening {}", cfg.url))?;
        storage::probe(&loc).await?;
        let props = cfg.compression.writer_properties().set_max_row_group_row_count(Some(cfg.row_group_size)).build();
        let template = cfg.partition_by.as_ref().map(Parsed::get).transpose()?;
        let time_path = cfg.partition_time.as_ref().map(Parsed::get).transpose()?;
        let roll_bytes = cfg.roll.bytes.as_ref().map(|b| b.get().map(|b| b.0)).transpose()?;
        let roll_interval = cfg.roll.interval.as_ref().map(Dur::get).transpose()?;
        let layout = match cfg.layout {
            ParquetLayout::Auto => None,
            l => Some(l),
        };
        let typed = TypedColumns::new(&cfg.columns)?;
        Ok(ParquetSink {
            typed,
            loc,
            props,
            partitioner: Partitioner { template, time_path, cache: None },
            open: HashMap::new(),
            pending: Vec::new(),
            instance: cx.instance.to_string(),
            epoch: cx.first_epoch.max(1),
            preserve: Vec::new(),
            seq: 0,
            roll_bytes,
            roll_interval,
            layout,
            metrics: cx.metrics.clone(),
            cfg,
        })
    }

    /// Writer properties for a file: dictionary encoding only for string columns, where it pays
    /// (device ids, message types); for numbers and timestamps it costs time and saves nothing.
    fn file_props(&self, schema: &SchemaRef) -> WriterProperties {
        file_props(&self.props, schema)
    }

    fn file_name(&mut self) -> String {
        self.seq += 1;
        format!("{}-{}-{:08}-{:05}.parquet", self.cfg.file_prefix, self.instance, self.epoch, self.seq)
    }

    fn paths(&mut self, partition: &str) -> (Path, Path) {
        let name = self.file_name();
        let rel = if partition.is_empty() { name.clone() } else { format!("{partition}/{name}") };
        let staged = self.loc.child(&format!("_staging/{rel}.inprogress"));
        (staged, self.loc.child(&rel))
    }

    async fn close_file(&mut self, key: &str) -> anyhow::Result<()> {
        let Some(f) = self.open.remove(key) else {
            return Ok(());
        };
        let bytes = f.writer.bytes_written() as u64;
        let loc = &self.loc;
        f.writer.close().await.with_context(|| format!("finishing {}", loc.describe(&f.staged)))?;
        self.metrics.bytes_out.inc_by(bytes);
        self.pending.push(Staged { epoch: self.epoch, staged: f.staged.to_string(), target: f.target.to_string() });
        Ok(())
    }

    async fn write_group(&mut self, key: String, events: &[&Event]) -> anyhow::Result<()> {
        let layout = *self.layout.get_or_insert_with(|| detect_layout(events));
        let meta = self.cfg.metadata_columns;
        let schema = layout_schema(layout, events, meta, &self.typed);
        // a rows batch that does not fit the open file's schema starts a new file
        self.fit_schema(&key, &schema).await?;
        let mut rest = events;
        while !rest.is_empty() {
            self.ensure_open(&key, &schema)?;
            let (now, later) = rest.split_at(self.room(&key, rest.len()));
            rest = later;
            let file_schema = self.open[&key].schema.clone();
            for rb in encode_layout(now, layout, meta, &self.typed, &file_schema)? {
                self.append(&key, &rb).await?;
            }
            self.wrote(&key, now.len()).await?;
        }
        Ok(())
    }

    /// Writes rows that came as columns (see [`ParquetConfig::accepts_columns`]), as
    /// [`ParquetSink::write_group`] writes rows that came as events.
    async fn write_columns(&mut self, rows: &RecordBatch) -> anyhow::Result<()> {
        let layout = *self.layout.get_or_insert(ParquetLayout::Rows);
        anyhow::ensure!(layout == ParquetLayout::Rows, "rows came as columns into a sink writing the export layout");
        let key = String::new();
        let schema = rows.schema();
        self.fit_schema(&key, &schema).await?;
        let mut done = 0;
        while done < rows.num_rows() {
            self.ensure_open(&key, &schema)?;
            let n = self.room(&key, rows.num_rows() - done);
            let part = conform(&rows.slice(done, n), &self.open[&key].schema)?;
            done += n;
            self.append(&key, &part).await?;
            self.wrote(&key, n).await?;
        }
        Ok(())
    }

    /// Closes the open file of `key` if rows of `schema` do not fit in it.
    async fn fit_schema(&mut self, key: &str, schema: &SchemaRef) -> anyhow::Result<()> {
        if let Some(f) = self.open.get(key) {
            if !schema_covers(&f.schema, schema) {
                self.close_file(key).await?;
            }
        }
        Ok(())
    }

    /// Opens a file for `key` with `schema` unless one is open.
    fn ensure_open(&mut self, key: &str, schema: &SchemaRef) -> anyhow::Result<()> {
        if !self.open.contains_key(key) {
            let (staged, target) = self.paths(key);
            let buf = BufWriter::new(self.loc.store.clone(), staged.clone());
            let written = (self.cfg.timestamp_unit != TimestampUnit::Us)
                .then(|| with_time_unit(schema, self.cfg.timestamp_unit.arrow()));
            let out = written.as_ref().unwrap_or(schema);
            let writer = ParallelWriter::try_new(buf, out.clone(), self.file_props(out))?;
            self.open.insert(
                key.to_string(),
                OpenFile { writer, staged, target, schema: schema.clone(), written, rows: 0, opened: Instant::now() },
            );
        }
        Ok(())
    }

    /// How many of `want` rows the open file of `key` takes: with a row limit, exactly what fits.
    fn room(&self, key: &str, want: usize) -> usize {
        let room = match self.cfg.roll.rows {
            Some(r) => (r.saturating_sub(self.open[key].rows) as usize).max(1),
            None => want,
        };
        room.min(want)
    }

    /// Writes a batch in the file's schema to the open file of `key`.
    async fn append(&mut self, key: &str, rows: &RecordBatch) -> anyhow::Result<()> {
        let f = self.open.get_mut(key).expect("an open file");
        let cast;
        let rows = match &f.written {
            Some(out) => {
                cast = conform(rows, out)?;
                &cast
            }
            None => rows,
        };
        let loc = &self.loc;
        f.writer.write(rows).await.with_context(|| format!("writing {}", loc.describe(&f.staged)))?;
        f.rows += rows.num_rows() as u64;
        Ok(())
    }

    /// After `n` rows went into the open file of `key`: counts them and rolls a full file.
    async fn wrote(&mut self, key: &str, n: usize) -> anyhow::Result<()> {
        self.metrics.events_out.inc_by(n as u64);
        let f = &self.open[key];
        let full = self.cfg.roll.rows.is_some_and(|r| f.rows >= r)
            || self.roll_bytes.is_some_and(|b| (f.writer.bytes_written() + f.writer.in_progress_size()) as u64 >= b);
        if full {
            self.close_file(key).await?;
        }
        Ok(())
    }
}

/// The layout of a sink with `layout: auto`, from its first events: the export layout for
/// export messages, rows otherwise.
pub(crate) fn detect_layout(events: &[&Event]) -> ParquetLayout {
    if matches!(events.first().map(|e| e.kind), Some(Kind::Export(_))) {
        ParquetLayout::Export
    } else {
        ParquetLayout::Rows
    }
}

/// The columns of `events` in `layout` (export or rows, never auto), with the typed columns
/// last; a derived column of the rows layout by the name of a typed column gives way to it.
pub(crate) fn layout_schema(layout: ParquetLayout, events: &[&Event], meta: bool, typed: &TypedColumns) -> SchemaRef {
    let schema = match layout {
        ParquetLayout::Export => export_schema(meta),
        _ => infer_rows_schema(events, meta),
    };
    if typed.is_empty() {
        return schema;
    }
    let names: Vec<&str> = typed.names().collect();
    let mut fields: Vec<arrow_schema::FieldRef> =
        schema.fields().iter().filter(|f| !names.contains(&f.name().as_str())).cloned().collect();
    fields.extend(typed.fields().into_iter().map(Arc::new));
    Arc::new(arrow_schema::Schema::new(fields))
}

/// Encodes `events` into batches of `schema` (a [`layout_schema`], or one that covers it, typed
/// columns last): in parallel chunks on the rayon pool when there are several, returned in order.
pub(crate) fn encode_layout(
    events: &[&Event],
    layout: ParquetLayout,
    meta: bool,
    typed: &TypedColumns,
    schema: &SchemaRef,
) -> anyhow::Result<Vec<RecordBatch>> {
    let base = if typed.is_empty() {
        schema.clone()
    } else {
        let n = schema.fields().len() - typed.len();
        Arc::new(arrow_schema::Schema::new(schema.fields()[..n].to_vec()))
    };
    let encode = |part: &[&Event]| {
        let mut b = typed.builders(part.len());
        let rb = match layout {
            // the typed columns in the same pass over each event as the layout's
            ParquetLayout::Export => encode_export_with(part, meta, |ev| b.append(ev))?,
            _ => {
                let rb = encode_rows(part, &base, meta)?;
                part.iter().for_each(|ev| b.append(ev));
                rb
            }
        };
        if typed.is_empty() {
            return Ok(rb);
        }
        let mut cols = rb.columns().to_vec();
        cols.extend(b.finish());
        Ok(RecordBatch::try_new(schema.clone(), cols)?)
    };
    // one chunk is encoded here: handing it to the pool would only make this thread wait
    if events.len() <= ENCODE_CHUNK {
        return Ok(vec![encode(events)?]);
    }
    events.par_chunks(ENCODE_CHUNK).map(encode).collect()
}

/// Events per chunk of [`encode_layout`].
const ENCODE_CHUNK: usize = 8192;

/// Removes `NAME#N` files (object_store's local multipart uploads that never completed) of this
/// instance under `dir`.
fn remove_interrupted_uploads(dir: &std::path::Path, mine: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        if path.is_dir() {
            remove_interrupted_uploads(&path, mine);
        } else if name.starts_with(mine)
            && name.rsplit_once('#').is_some_and(|(_, n)| n.bytes().all(|b| b.is_ascii_digit()))
        {
            tracing::info!(file = %path.display(), "removing an upload a crash interrupted");
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Makes a staged file visible under its final name (idempotent).
async fn commit_staged(store: Arc<dyn object_store::ObjectStore>, s: &Staged) -> anyhow::Result<()> {
    let staged = Path::from(s.staged.as_str());
    let target = Path::from(s.target.as_str());
    match store.rename(&staged, &target).await {
        Ok(()) => Ok(()),
        Err(object_store::Error::NotFound { .. }) => {
            // committed before a crash: the target must be there
            match store.head(&target).await {
                Ok(_) => Ok(()),
                Err(e) => Err(anyhow::anyhow!("staged file {} is gone and {} does not exist: {e}", s.staged, s.target)),
            }
        }
        Err(e) => Err(e).with_context(|| format!("committing {}", s.target)),
    }
}

#[async_trait]
impl Sink for ParquetSink {
    async fn recover(&mut self, previous: &[u8]) -> anyhow::Result<()> {
        let (epoch, pending): (u64, Vec<Staged>) =
            postcard::from_bytes(previous).context("parquet sink state in the checkpoint is corrupt")?;
        let mut failed: Vec<String> = Vec::new();
        let mut first_error = None;
        for s in &pending {
            if let Err(e) = commit_staged(self.loc.store.clone(), s).await {
                // keep it staged: `start` must not delete it
                self.preserve.push(s.staged.clone());
                failed.push(s.staged.clone());
                first_error.get_or_insert(e);
            }
        }
        if let Some(e) = first_error {
            anyhow::bail!(
                "{} of {} files staged by checkpoint {epoch} could not be committed under the new configuration \
(did `url` change? they stay staged, commit them by renaming; first: {}): {e:#}",
                failed.len(),
                pending.len(),
                failed[0]
            );
        }
        if !pending.is_empty() {
            tracing::info!(
                files = pending.len(),
                "committed the output staged by checkpoint {epoch} under the previous configuration"
            );
        }
        // new files must not take the names of the committed ones
        self.epoch = self.epoch.max(epoch + 1);
        Ok(())
    }

    async fn start(&mut self, restored: Option<&[u8]>) -> anyhow::Result<()> {
        let mut keep: Vec<String> = std::mem::take(&mut self.preserve);
        if let Some(state) = restored.filter(|s| !s.is_empty()) {
            let (epoch, pending): (u64, Vec<Staged>) =
                postcard::from_bytes(state).context("parquet sink state in the checkpoint is corrupt")?;
            // everything staged up to the checkpoint is covered by it: commit now
            for s in &pending {
                commit_staged(self.loc.store.clone(), s).await?;
            }
            keep.extend(pending.iter().map(|s| s.staged.clone()));
            self.epoch = self.epoch.max(epoch + 1);
        }
        // staged files of this instance that no checkpoint covers are from a crashed run: the
        // replay writes their records again
        let staging = self.loc.child("_staging");
        let listed: Vec<object_store::ObjectMeta> = match self.loc.store.list(Some(&staging)).try_collect().await {
            Ok(l) => l,
            Err(object_store::Error::NotFound { .. }) => Vec::new(),
            Err(e) => return Err(e).context("listing staged files"),
        };
        let mine = format!("{}-{}-", self.cfg.file_prefix, self.instance);
        for m in listed {
            let name = m.location.filename().unwrap_or("");
            if name.starts_with(&mine) && !keep.contains(&m.location.to_string()) {
                tracing::info!(file = %m.location, "removing a staged file no checkpoint covers");
                let _ = self.loc.store.delete(&m.location).await;
            }
        }
        // in a local folder, an upload a crash interrupted is a `NAME#N` file, which listing
        // leaves out (object_store's multipart parts before their rename)
        if let Some(root) = &self.loc.local_path {
            remove_interrupted_uploads(&root.join("_staging"), &mine);
        }
        Ok(())
    }

    async fn write(&mut self, batch: Arc<Batch>) -> anyhow::Result<()> {
        // group by partition path, keeping order within each group
        let mut groups: Vec<(String, Vec<&Event>)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for ev in &batch.events {
            let key = self.partitioner.path(ev);
            match index.get(&key) {
                Some(&i) => groups[i].1.push(ev),
                None => {
                    index.insert(key.clone(), groups.len());
                    groups.push((key, vec![ev]));
                }
            }
        }
        for (key, evs) in groups {
            self.write_group(key, &evs).await?;
        }
        // columns follow the batch's events
        if let Some(rows) = &batch.columns {
            self.write_columns(rows).await?;
        }
        Ok(())
    }

    async fn flush(&mut self, epoch: u64) -> anyhow::Result<Vec<u8>> {
        let keys: Vec<String> = self.open.keys().cloned().collect();
        for k in keys {
            self.close_file(&k).await?;
        }
        // files of this epoch carry its number; the next ones the next
        for s in self.pending.iter_mut().filter(|s| s.epoch >= self.epoch) {
            s.epoch = epoch;
        }
        self.epoch = epoch + 1;
        self.seq = 0;
        Ok(postcard::to_allocvec(&(epoch, &self.pending))?)
    }

    async fn commit(&mut self, epoch: u64) -> anyhow::Result<()> {
        let (now, later): (Vec<Staged>, Vec<Staged>) =
            std::mem::take(&mut self.pending).into_iter().partition(|s| s.epoch <= epoch);
        self.pending = later;
        for (i, s) in now.iter().enumerate() {
            if let Err(e) = commit_staged(self.loc.store.clone(), s).await {
                // keep what is not committed: the checkpoint state still lists it
                self.pending.splice(0..0, now[i..].iter().cloned());
                return Err(e);
            }
        }
        Ok(())
    }

    async fn on_tick(&mut self) -> anyhow::Result<()> {
        if let Some(max) = self.roll_interval {
            let old: Vec<String> =
                self.open.iter().filter(|(_, f)| f.opened.elapsed() >= max).map(|(k, _)| k.clone()).collect();
            for k in old {
                self.close_file(&k).await?;
            }
        }
        Ok(())
    }

    async fn close(&mut self) -> anyhow::Result<()> {
        // after the final checkpoint nothing is open; anything still open was never covered
        for (_, f) in self.open.drain() {
            drop(f);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rows::ts_type;
    use arrow_array::ArrayRef;
    use arrow_schema::{Field, Schema};

    #[test]
    fn partition_templates() {
        let ev = crate::model::decode::decode_one(bytes::Bytes::from_static(
            br#"{"messageSource":"telemetry","deviceId":"a/b","enqueuedTime":"2026-11-01T13:05:00Z","enrichments":{"site":"plant-1"}}"#,
        ))
        .unwrap();
        let mut p = Partitioner {
            template: Some(PartitionTemplate::parse("date=%Y-%m-%d/hour=%H").unwrap()),
            time_path: None,
            cache: None,
        };
        assert_eq!(p.path(&ev), "date=2026-11-01/hour=13");
        assert_eq!(p.path(&ev), "date=2026-11-01/hour=13", "cached");
        let mut p = Partitioner {
            template: Some(PartitionTemplate::parse("site={enrichments.site}/dev={deviceId}/%F").unwrap()),
            time_path: None,
            cache: None,
        };
        assert_eq!(p.path(&ev), "site=plant-1/dev=a_b/2026-11-01");
        assert!(PartitionTemplate::parse("%Q").is_err());
        assert!(PartitionTemplate::parse("{unclosed").is_err());
        assert!(PartitionTemplate::parse("/abs").is_err());
    }

    #[test]
    fn row_types_are_inferred_and_merged() {
        let mut a = Event::row();
        a.push("deviceId", "d".into());
        a.push("n", crate::event::Value::Int(1));
        a.push("t", crate::event::Value::Time(5));
        let mut b = Event::row();
        b.push("n", crate::event::Value::Float(1.5));
        b.push("x", crate::event::Value::Null);
        let s = infer_rows_schema(&[&a, &b], false);
        let types: Vec<(String, DataType)> =
            s.fields().iter().map(|f| (f.name().clone(), f.data_type().clone())).collect();
        assert_eq!(
            types,
            vec![
                ("deviceId".into(), DataType::Utf8),
                ("n".into(), DataType::Float64),
                ("t".into(), ts_type()),
                ("x".into(), DataType::Utf8)
            ]
        );
        let rb = encode_rows(&[&a, &b], &s, false).unwrap();
        assert_eq!(rb.num_rows(), 2);
        assert!(schema_covers(&s, &infer_rows_schema(&[&a], false)));
        assert!(!schema_covers(&infer_rows_schema(&[&a], false), &s));
    }

    #[test]
    fn export_layout_keeps_every_field() {
        let ev = crate::model::decode::decode_one(bytes::Bytes::from_static(
            br#"{"actor":{"id":"x"},"messageSource":"audit","enqueuedTime":"2022-07-25T21:54:40Z","future":1,"other":"y"}"#,
        ))
        .unwrap();
        let rb = crate::rows::encode_export(&[&ev], true).unwrap();
        let col = |n: &str| rb.column_by_name(n).unwrap().clone();
        let s = arrow_cast::display::ArrayFormatter::try_new(col("extra").as_ref(), &Default::default())
            .unwrap()
            .value(0)
            .to_string();
        assert_eq!(s, r#"{"future":1,"other":"y"}"#);
        let a = arrow_cast::display::ArrayFormatter::try_new(col("actor").as_ref(), &Default::default())
            .unwrap()
            .value(0)
            .to_string();
        assert_eq!(a, r#"{"id":"x"}"#);
        assert_eq!(col("deviceId").null_count(), 1);
    }

    fn cx(name: &str, first_epoch: u64) -> BuildCx<'_> {
        BuildCx::for_test(name, "parquet", first_epoch)
    }

    fn committed(dir: &std::path::Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "parquet"))
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    }

    /// A crash between a durable checkpoint and the sink's commit, then a restart with a changed
    /// sink configuration: the files that checkpoint staged are committed, not deleted.
    #[tokio::test]
    async fn a_changed_configuration_still_commits_what_the_checkpoint_staged() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = |compression: &str| -> ParquetConfig {
            serde_json::from_value(serde_json::json!({
                "inputs": ["x"], "url": dir.path().to_str().unwrap(), "compression": compression
            }))
            .unwrap()
        };
        let ev = crate::model::decode::decode_one(bytes::Bytes::from_static(
            br#"{"messageSource":"telemetry","deviceId":"d1","enqueuedTime":"2026-11-01T13:05:00Z","telemetry":{"t":1}}"#,
        ))
        .unwrap();
        let mut before = ParquetSink::new(cfg("zstd"), &cx("pq_recover_a", 7)).await.unwrap();
        before.start(None).await.unwrap();
        before.write(Arc::new(Batch::new(vec![ev.clone()]))).await.unwrap();
        let state = before.flush(7).await.unwrap();
        drop(before); // the crash: checkpoint 7 is durable, its commit never ran
        assert!(committed(dir.path()).is_empty());

        let mut after = ParquetSink::new(cfg("snappy"), &cx("pq_recover_b", 8)).await.unwrap();
        after.recover(&state).await.unwrap();
        after.start(None).await.unwrap();
        assert_eq!(committed(dir.path()), vec!["part-i-00000007-00001.parquet".to_string()]);
        // the new configuration's files carry later epochs: no name is taken twice
        after.write(Arc::new(Batch::new(vec![ev]))).await.unwrap();
        after.flush(8).await.unwrap();
        after.commit(8).await.unwrap();
        assert_eq!(
            committed(dir.path()),
            vec!["part-i-00000007-00001.parquet".to_string(), "part-i-00000008-00001.parquet".to_string()]
        );
    }

    #[test]
    fn sizes() {
        let bytes = |s: &str| Parsed::<ByteSize>::new(s).get().map(|b| b.0);
        assert_eq!(bytes("128MiB").unwrap(), 128 << 20);
        assert_eq!(bytes("1000").unwrap(), 1000);
        assert!(bytes("lots").is_err());
    }

    /// Rows as columns go through the same rolling and schema handling as rows as events:
    /// every row lands in exactly one committed file, a file never holds more than `roll.rows`,
    /// a batch whose types the open file cannot hold starts a new file, and one it can hold is
    /// converted to the file's types.
    #[tokio::test]
    async fn rows_as_columns_roll_and_change_schema_without_losing_a_row() {
        use arrow_array::{Array, Float64Array, Int64Array, StringArray};
        let dir = tempfile::tempdir().unwrap();
        let cfg: ParquetConfig = serde_json::from_value(serde_json::json!({
            "inputs": ["w"], "url": dir.path().to_str().unwrap(), "roll": {"rows": 3}
        }))
        .unwrap();
        assert!(cfg.accepts_columns());
        let batch = |zone: ArrayRef, first: i64| {
            let n = zone.len();
            let dev: ArrayRef =
                Arc::new(StringArray::from_iter_values((0..n).map(|i| format!("d{}", first + i as i64))));
            let count: ArrayRef = Arc::new(Int64Array::from_iter_values((0..n as i64).map(|i| first + i)));
            let schema = Schema::new(vec![
                Field::new("deviceId", DataType::Utf8, true),
                Field::new("zone", zone.data_type().clone(), true),
                Field::new("count", DataType::Int64, true),
            ]);
            Arc::new(Batch::columns(RecordBatch::try_new(Arc::new(schema), vec![dev, zone, count]).unwrap()))
        };
        let mut sink = ParquetSink::new(cfg, &cx("pq_columns", 1)).await.unwrap();
        sink.start(None).await.unwrap();
        // integers, then floats (a new file: an integer column cannot hold them), then integers
        // again (converted into the open file's float column)
        sink.write(batch(Arc::new(Int64Array::from(vec![1, 2, 3, 4, 5])), 0)).await.unwrap();
        sink.write(batch(Arc::new(Float64Array::from(vec![Some(0.5), None])), 5)).await.unwrap();
        sink.write(batch(Arc::new(Int64Array::from(vec![7, 8])), 7)).await.unwrap();
        sink.flush(1).await.unwrap();
        sink.commit(1).await.unwrap();

        let mut rows: Vec<(i64, String, Option<f64>)> = Vec::new();
        let mut sizes = Vec::new();
        for name in committed(dir.path()) {
            let file = std::fs::File::open(dir.path().join(&name)).unwrap();
            let reader =
                parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap().build().unwrap();
            let mut n = 0;
            for rb in reader {
                let rb = rb.unwrap();
                n += rb.num_rows();
                let zone = arrow_cast::cast(rb.column(1), &DataType::Float64).unwrap();
                let zone = zone.as_any().downcast_ref::<Float64Array>().unwrap();
                let dev = rb.column(0).as_any().downcast_ref::<StringArray>().unwrap();
                let count = rb.column(2).as_any().downcast_ref::<Int64Array>().unwrap();
                for i in 0..rb.num_rows() {
                    rows.push((count.value(i), dev.value(i).to_string(), zone.is_valid(i).then(|| zone.value(i))));
                }
            }
            sizes.push(n);
        }
        assert_eq!(sizes, vec![3, 2, 3, 1], "files roll at 3 rows; the float batch starts a new file");
        rows.sort_by_key(|r| r.0);
        let want: Vec<(i64, String, Option<f64>)> =
            [Some(1.0), Some(2.0), Some(3.0), Some(4.0), Some(5.0), Some(0.5), None, Some(7.0), Some(8.0)]
                .into_iter()
                .enumerate()
                .map(|(i, z)| (i as i64, format!("d{i}"), z))
                .collect();
        assert_eq!(rows, want);
    }
}
