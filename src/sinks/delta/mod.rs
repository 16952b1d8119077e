//! `delta`: a Delta Lake table in a local folder or object storage, written through delta-rs
//! (`deltalake-core`, without DataFusion) on the store clients the other sinks use.
//!
//! Layouts and typed columns are the Parquet sink's (`layout`, `columns`, `metadata_columns`);
//! timestamps are microseconds, Delta's `timestamp` type. Partition columns are named in
//! `partition_by`: `date` and `hour` are made from the event time, any other name is a column of
//! the layout or a typed column.
//!
//! Data files are written by `files.rs` on the Parquet sink's encoder, so rows are encoded on
//! every core while the sink goes on, and described by `stats.rs` as delta-rs describes its own.
//!
//! Delivery: data files are written as rows arrive (a data file no commit names is invisible to
//! every reader); at each checkpoint barrier the epoch's files are closed and their `add` actions
//! kept in the checkpoint; once the checkpoint is durable they are committed as **one** Delta
//! commit that also carries a `txn` action (`appId` = the pipeline, sink and instance,
//! `version` = the epoch). A restart reads the table's last `txn` version for its app id and
//! commits an epoch of the restored checkpoint only if the table does not have it yet, so a crash
//! between the checkpoint and the commit neither loses nor duplicates a row. Files of an epoch
//! that never reached a checkpoint stay unreferenced (the replay writes their rows again);
//! `VACUUM` removes them.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{bail, Context};
use arrow_array::{ArrayRef, Date32Array, Int32Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use deltalake_core::kernel::engine::arrow_conversion::{TryIntoArrow as _, TryIntoKernel as _};
use deltalake_core::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake_core::kernel::{Action, Add, StructField, StructType, Transaction};
use deltalake_core::logstore::{default_logstore, LogStoreRef, StorageConfig};
use deltalake_core::protocol::{DeltaOperation, OutputMode, SaveMode};
use deltalake_core::{DeltaTable, DeltaTableError};
use parquet::file::properties::WriterProperties;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::values::{self, Parsed};
use crate::config::{Checker, Spec};
use crate::event::{Batch, Event, NO_TIME};
use crate::metrics::ComponentMetrics;
use crate::path::FieldPath;
use crate::rows::{conform, export_schema, schema_covers, type_covers};
use crate::runtime::{BuildCx, Sink};
use crate::sinks::parquet::{
    check_columns, d_row_group, detect_layout, encode_layout, layout_schema, ColumnSpec, Compression, ParquetLayout,
    TypedColumns,
};
use crate::storage::{self, Location};

mod files;
mod stats;

use files::DataFiles;
use stats::Indexed;

/// Writes a Delta Lake table, one commit per checkpoint epoch.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeltaConfig {
    pub inputs: Vec<String>,
    /// The table: a folder, `file://`, `az://container/path`,
    /// `abfss://container@account.dfs.core.windows.net/path`, `s3://bucket/path` or `gs://`.
    pub url: String,
    /// Partition columns, in order: `date` (the event time's UTC date) and `hour` (0-23) are made
    /// from the event time; any other name is a column of the layout or a typed column.
    #[serde(default)]
    pub partition_by: Vec<String>,
    /// The timestamp field for `date` and `hour` (default: the event time: `enqueuedTime` for
    /// export messages, `window_start` for window output).
    #[serde(default)]
    pub partition_time: Option<values::Path>,
    /// `auto` (export layout for export messages, rows otherwise), `export` or `rows`: as the
    /// Parquet sink's.
    #[serde(default)]
    pub layout: ParquetLayout,
    /// Typed columns beside the layout's own, as the Parquet sink's `columns`.
    #[serde(default)]
    pub columns: BTreeMap<String, ColumnSpec>,
    /// Add `_partition`, `_offset`, `_origin` and `_enqueued_time` columns.
    #[serde(default)]
    pub metadata_columns: bool,
    /// `zstd` (default), `snappy` or `none`.
    #[serde(default)]
    pub compression: Compression,
    /// Rows per row group of the data files (default 122,880, as the Parquet sink's and
    /// DuckDB's). An open row group's encoded pages stay in memory until it is full, so this
    /// bounds the memory of every open data file.
    #[serde(default = "d_row_group")]
    pub row_group_size: usize,
    /// The `appId` of this sink's `txn` actions (default:
    /// `centralflow/{pipeline}/{sink}/{instance}`). Two writers must never share one.
    #[serde(default)]
    pub app_id: Option<String>,
    /// Object-store options (lower-case keys of the cloud's environment variables).
    #[serde(default)]
    pub storage: BTreeMap<String, String>,
}

/// Partition columns made from the event time.
const DATE: &str = "date";
const HOUR: &str = "hour";

impl Spec for DeltaConfig {
    fn check(&self, ptr: &str, cx: &mut Checker<'_>) {
        cx.url(&format!("{ptr}/url"), &self.url);
        if let Some(p) = &self.partition_time {
            cx.valid(&format!("{ptr}/partition_time"), p);
        }
        cx.storage_options(&format!("{ptr}/storage"), &self.storage);
        if self.row_group_size == 0 {
            cx.error(&format!("{ptr}/row_group_size"), "must be at least 1");
        }
        check_columns(ptr, cx, &self.columns, self.layout, self.metadata_columns);
        let typed: Vec<&str> = self.columns.iter().map(|(p, s)| s.name(p)).collect();
        let export: Vec<String> =
            export_schema(self.metadata_columns).fields().iter().map(|f| f.name().clone()).collect();
        for (i, name) in self.partition_by.iter().enumerate() {
            let at = format!("{ptr}/partition_by/{i}");
            if self.partition_by[..i].contains(name) {
                cx.error(&at, format!("`{name}` is named twice"));
            } else if name.is_empty() {
                cx.error(&at, "must not be empty");
            } else if self.layout == ParquetLayout::Export
                && !(name == DATE || name == HOUR || typed.contains(&name.as_str()) || export.contains(name))
            {
                cx.error(
                    &at,
                    format!("`{name}` is not `date`, `hour`, a column of the export layout or a typed column"),
                );
            }
        }
        if self.app_id.as_deref().is_some_and(|a| a.trim().is_empty()) {
            cx.error(&format!("{ptr}/app_id"), "must not be empty");
        }
    }
    fn inputs(&self) -> &[String] {
        &self.inputs
    }
}

/// The add actions of one epoch, kept in the checkpoint until they are committed.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pending {
    epoch: u64,
    /// The `txn` version it commits with.
    version: i64,
    adds: Vec<Add>,
}

/// The sink's checkpoint state.
#[derive(Debug, Serialize, Deserialize)]
struct State {
    url: String,
    app_id: String,
    pending: Vec<Pending>,
}

/// A table location opened on our own object-store client.
struct TableAt {
    loc: Location,
    log_store: LogStoreRef,
}

impl TableAt {
    fn open(url: &str, storage_options: &BTreeMap<String, String>) -> anyhow::Result<TableAt> {
        let loc = storage::open(url, storage_options).with_context(|| format!("opening {url}"))?;
        let table_url = match &loc.local_path {
            Some(p) => {
                // delta-rs refuses a local table whose folder does not exist yet
                std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
                url::Url::from_directory_path(p)
            }
            .map_err(|_| anyhow::anyhow!("{} is not a usable folder", p.display()))?,
            None => url::Url::parse(url).with_context(|| format!("{url:?} is not a URL"))?,
        };
        // the store is rooted at the bucket or container; delta-rs prefixes it with the table path
        let cfg = StorageConfig::default();
        let prefixed: Arc<dyn object_store::ObjectStore> =
            Arc::from(cfg.decorate_store(loc.store.clone(), &table_url)?);
        let log_store = default_logstore(prefixed, loc.store.clone(), &table_url, &cfg);
        Ok(TableAt { loc, log_store })
    }

    /// The table, or `None` when there is none at the location yet.
    async fn load(&self) -> anyhow::Result<Option<DeltaTable>> {
        let mut t = DeltaTable::new(self.log_store.clone());
        match t.load().await {
            Ok(()) => Ok(Some(t)),
            Err(DeltaTableError::NotATable(_)) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading the Delta table at {}", self.loc.display)),
        }
    }
}

/// The last `txn` version of `app_id` in the table (-1: none).
async fn txn_version(table: &DeltaTable, app_id: &str) -> anyhow::Result<i64> {
    let v = table.snapshot()?.transaction_version(table.log_store().as_ref(), app_id).await?;
    Ok(v.unwrap_or(-1))
}

/// Commits one epoch's files with its `txn` action, unless the table has that version already.
async fn commit_epoch(table: &mut DeltaTable, app_id: &str, p: &Pending, display: &str) -> anyhow::Result<bool> {
    if txn_version(table, app_id).await? >= p.version {
        return Ok(false);
    }
    let now = chrono::Utc::now().timestamp_millis();
    let props = CommitProperties::default().with_application_transaction(Transaction::new_with_last_update(
        app_id,
        p.version,
        Some(now),
    ));
    let actions: Vec<Action> = p.adds.iter().cloned().map(Action::Add).collect();
    let op = DeltaOperation::StreamingUpdate {
        output_mode: OutputMode::Append,
        query_id: app_id.to_string(),
        epoch_id: p.version,
    };
    let result =
        CommitBuilder::from(props).with_actions(actions).build(Some(table.snapshot()?), table.log_store(), op).await;
    match result {
        Ok(done) => {
            table.state = Some(done.snapshot());
            Ok(true)
        }
        Err(e) => {
            // a commit that landed can be reported as failed (a retried request, a conflict
            // with itself): the table decides
            table.update_state().await.with_context(|| format!("reading the Delta table at {display}"))?;
            if txn_version(table, app_id).await? >= p.version {
                return Ok(true);
            }
            Err(e).with_context(|| {
                format!("committing epoch {} ({} files) to the Delta table at {display}", p.epoch, p.adds.len())
            })
        }
    }
}

pub struct DeltaSink {
    cfg: DeltaConfig,
    at: TableAt,
    app_id: String,
    table: Option<DeltaTable>,
    /// The epoch's open data files, in the table's current schema.
    files: Option<DataFiles>,
    /// Files closed during the current epoch (before a schema change).
    early: Vec<Add>,
    pending: Vec<Pending>,
    /// Added to an epoch to make its `txn` version (see `start`).
    shift: u64,
    first_epoch: u64,
    layout: Option<ParquetLayout>,
    typed: TypedColumns,
    time_path: Option<FieldPath>,
    props: WriterProperties,
    metrics: ComponentMetrics,
}

impl DeltaSink {
    pub async fn new(cfg: DeltaConfig, cx: &BuildCx<'_>) -> anyhow::Result<DeltaSink> {
        let at = TableAt::open(&cfg.url, &cfg.storage)?;
        storage::probe(&at.loc).await?;
        let props = cfg.compression.writer_properties().set_max_row_group_row_count(Some(cfg.row_group_size)).build();
        let app_id =
            cfg.app_id.clone().unwrap_or_else(|| format!("centralflow/{}/{}/{}", cx.pipeline, cx.name, cx.instance));
        let layout = match cfg.layout {
            ParquetLayout::Auto => None,
            l => Some(l),
        };
        Ok(DeltaSink {
            typed: TypedColumns::new(&cfg.columns)?,
            time_path: cfg.partition_time.as_ref().map(Parsed::get).transpose()?,
            at,
            app_id,
            table: None,
            files: None,
            early: Vec::new(),
            pending: Vec::new(),
            shift: 0,
            first_epoch: cx.first_epoch.max(1),
            layout,
            props,
            metrics: cx.metrics.clone(),
            cfg,
        })
    }

    fn display(&self) -> &str {
        &self.at.loc.display
    }

    /// Commits the epochs of a checkpoint's state that the table at `at` does not have yet.
    async fn commit_restored(&mut self, state: &State) -> anyhow::Result<()> {
        if state.pending.is_empty() {
            return Ok(());
        }
        let same = state.url == self.cfg.url;
        let other;
        let at = if same {
            &self.at
        } else {
            other = TableAt::open(&state.url, &self.cfg.storage)?;
            &other
        };
        let Some(mut table) = at.load().await? else {
            bail!(
                "checkpoint lists {} uncommitted epochs for the Delta table at {}, which is not there",
                state.pending.len(),
                state.url
            );
        };
        for p in &state.pending {
            if commit_epoch(&mut table, &state.app_id, p, &state.url).await? {
                tracing::info!(epoch = p.epoch, files = p.adds.len(), table = %state.url, "committed an epoch the checkpoint covers");
            }
        }
        if same {
            self.table = Some(table);
        }
        Ok(())
    }

    /// The partition columns made from the event time that `schema` lacks, for `events`.
    fn time_columns(&self, schema: &Schema, events: &[&Event]) -> Vec<(Field, ArrayRef)> {
        let time = |ev: &Event| match &self.time_path {
            Some(p) => p.get(ev).and_then(|v| v.as_time()).unwrap_or(NO_TIME),
            None => ev.time,
        };
        let mut out = Vec::new();
        for name in &self.cfg.partition_by {
            if schema.field_with_name(name).is_ok() {
                continue;
            }
            if name == DATE {
                let days: Date32Array = events
                    .iter()
                    .map(|ev| {
                        let t = time(ev);
                        (t != NO_TIME).then(|| t.div_euclid(86_400_000_000_000) as i32)
                    })
                    .collect();
                out.push((Field::new(DATE, DataType::Date32, true), Arc::new(days) as ArrayRef));
            } else if name == HOUR {
                let hours: Int32Array = events
                    .iter()
                    .map(|ev| {
                        let t = time(ev);
                        (t != NO_TIME).then(|| t.div_euclid(3_600_000_000_000).rem_euclid(24) as i32)
                    })
                    .collect();
                out.push((Field::new(HOUR, DataType::Int32, true), Arc::new(hours) as ArrayRef));
            }
        }
        out
    }

    /// The table, created with `schema` if there is none yet, and its open files.
    async fn ensure_table(&mut self, schema: &SchemaRef) -> anyhow::Result<()> {
        if self.table.is_none() {
            self.table = self.at.load().await?;
        }
        if self.table.is_none() {
            for p in &self.cfg.partition_by {
                if schema.field_with_name(p).is_err() {
                    bail!("partition column `{p}` is not `date`, `hour`, a column of these rows or a typed column");
                }
            }
            let st: StructType = schema.as_ref().try_into_kernel().context("the rows' columns as a Delta schema")?;
            let created = DeltaTable::new(self.at.log_store.clone())
                .create()
                .with_columns(st.fields().cloned())
                .with_partition_columns(self.cfg.partition_by.clone())
                .with_save_mode(SaveMode::Ignore)
                .await;
            let table = match created {
                Ok(t) => t,
                // another instance created it first
                Err(_) => self.at.load().await?.context("creating the Delta table failed")?,
            };
            tracing::info!(table = %self.display(), "created the Delta table");
            self.table = Some(table);
        }
        if self.files.is_none() {
            let table = self.table.as_ref().expect("loaded");
            let parts = table.snapshot()?.metadata().partition_columns().to_vec();
            if parts != self.cfg.partition_by {
                bail!(
                    "the Delta table at {} is partitioned by {parts:?}, the sink's `partition_by` is {:?}",
                    self.display(),
                    self.cfg.partition_by
                );
            }
            self.files = Some(self.open_files()?);
        }
        Ok(())
    }

    /// Data files in the table's current schema.
    fn open_files(&self) -> anyhow::Result<DataFiles> {
        let table = self.table.as_ref().expect("loaded");
        let state = table.snapshot()?;
        let mapping = state.table_config().column_mapping_mode;
        if mapping.is_some_and(|m| m != delta_kernel::table_features::ColumnMappingMode::None) {
            bail!("the Delta table at {} uses column mapping, which this sink does not write", self.display());
        }
        let metadata = state.metadata();
        let schema: Schema =
            (&metadata.parse_schema()?).try_into_arrow().context("the Delta table's schema in Arrow")?;
        DataFiles::new(
            table.object_store(),
            Arc::new(schema),
            metadata.partition_columns(),
            self.props.clone(),
            Indexed::from_config(metadata.configuration()),
        )
    }

    /// Adds the columns of `schema` that the table lacks (a commit of its own, after closing
    /// the files written so far in the old schema); fails on a column whose type the table's
    /// column cannot hold.
    async fn evolve(&mut self, schema: &SchemaRef) -> anyhow::Result<SchemaRef> {
        let current = self.files.as_ref().expect("open").schema().clone();
        if schema_covers(&current, schema) {
            return Ok(current);
        }
        let mut new: Vec<Field> = Vec::new();
        for f in schema.fields() {
            match current.field_with_name(f.name()) {
                Ok(c) if !type_covers(c.data_type(), f.data_type()) => {
                    bail!(
                        "column `{}` is {} in the Delta table at {}; these rows have {}",
                        f.name(),
                        c.data_type(),
                        self.display(),
                        f.data_type()
                    )
                }
                Ok(_) => {}
                Err(_) => new.push(f.as_ref().clone().with_nullable(true)),
            }
        }
        let adds = self.files.take().expect("open").close().await?;
        self.early.extend(adds);
        let fields: Vec<StructField> =
            new.iter().map(|f| f.try_into_kernel()).collect::<Result<_, _>>().context("new columns as Delta fields")?;
        let names: Vec<String> = new.iter().map(|f| f.name().clone()).collect();
        let table = self.table.take().expect("loaded");
        let table = table
            .add_columns()
            .with_fields(fields)
            .await
            .with_context(|| format!("adding columns {names:?} to the Delta table at {}", self.at.loc.display))?;
        tracing::info!(table = %self.display(), columns = ?names, "added columns to the Delta table");
        self.table = Some(table);
        let files = self.open_files()?;
        let schema = files.schema().clone();
        self.files = Some(files);
        Ok(schema)
    }

    async fn write_events(&mut self, events: &[&Event]) -> anyhow::Result<()> {
        let layout = *self.layout.get_or_insert_with(|| detect_layout(events));
        let meta = self.cfg.metadata_columns;
        let rows_schema = layout_schema(layout, events, meta, &self.typed);
        let time_cols = self.time_columns(&rows_schema, events);
        let mut fields: Vec<Field> = rows_schema.fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.extend(time_cols.iter().map(|(f, _)| f.clone()));
        let schema: SchemaRef = Arc::new(Schema::new(fields));
        self.ensure_table(&schema).await?;
        let table_schema = self.evolve(&schema).await?;
        let mut at = 0;
        for rb in encode_layout(events, layout, meta, &self.typed, &rows_schema)? {
            let n = rb.num_rows();
            let mut cols = rb.columns().to_vec();
            cols.extend(time_cols.iter().map(|(_, a)| a.slice(at, n)));
            at += n;
            let rb = conform(&RecordBatch::try_new(schema.clone(), cols)?, &table_schema)?;
            self.files
                .as_mut()
                .expect("open")
                .write(&rb)
                .await
                .with_context(|| format!("writing to {}", self.display()))?;
        }
        self.metrics.events_out.inc_by(events.len() as u64);
        Ok(())
    }
}

#[async_trait]
impl Sink for DeltaSink {
    async fn recover(&mut self, previous: &[u8]) -> anyhow::Result<()> {
        let state: State = serde_json::from_slice(previous).context("delta sink state in the checkpoint is corrupt")?;
        self.commit_restored(&state)
            .await
            .context("committing what the checkpoint of the previous configuration covers")
    }

    async fn start(&mut self, restored: Option<&[u8]>) -> anyhow::Result<()> {
        if let Some(bytes) = restored.filter(|s| !s.is_empty()) {
            let state: State =
                serde_json::from_slice(bytes).context("delta sink state in the checkpoint is corrupt")?;
            self.commit_restored(&state).await?;
        }
        if self.table.is_none() {
            self.table = self.at.load().await?;
        }
        if let Some(table) = &self.table {
            let last = txn_version(table, &self.app_id).await?;
            // epochs that the table has already seen for this app id (a pipeline without a
            // checkpoint store starts its epochs at 1 again): continue its versions instead
            if last >= self.first_epoch as i64 {
                self.shift = last as u64 + 1 - self.first_epoch;
                tracing::warn!(
                    table = %self.display(),
                    app_id = %self.app_id,
                    "the table has txn version {last} for this sink, beyond this run's first epoch {}; \
                     continuing from version {} (without a checkpoint store a restart is not exactly once)",
                    self.first_epoch,
                    last + 1
                );
            }
        }
        Ok(())
    }

    async fn write(&mut self, batch: Arc<Batch>) -> anyhow::Result<()> {
        if batch.columns.is_some() {
            bail!("the delta sink reads rows, not columns");
        }
        if batch.events.is_empty() {
            return Ok(());
        }
        let events: Vec<&Event> = batch.events.iter().collect();
        self.write_events(&events).await
    }

    async fn flush(&mut self, epoch: u64) -> anyhow::Result<Vec<u8>> {
        let mut adds = std::mem::take(&mut self.early);
        if let Some(f) = self.files.take() {
            adds.extend(f.close().await.with_context(|| format!("closing data files of {}", self.at.loc.display))?);
        }
        if !adds.is_empty() {
            self.metrics.bytes_out.inc_by(adds.iter().map(|a| a.size.max(0) as u64).sum());
            self.pending.push(Pending { epoch, version: (epoch + self.shift) as i64, adds });
        }
        let state = State { url: self.cfg.url.clone(), app_id: self.app_id.clone(), pending: self.pending.clone() };
        Ok(serde_json::to_vec(&state)?)
    }

    async fn commit(&mut self, epoch: u64) -> anyhow::Result<()> {
        while self.pending.first().is_some_and(|p| p.epoch <= epoch) {
            let p = self.pending.first().expect("checked").clone();
            let display = self.at.loc.display.clone();
            let table = self.table.as_mut().context("a Delta table with pending files")?;
            commit_epoch(table, &self.app_id, &p, &display).await?;
            self.pending.remove(0);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Value;

    fn row(device: &str, t: i64, fields: &[(&str, f64)]) -> Event {
        let mut e = Event::row();
        e.push("deviceId", device.into());
        e.push("window_start", Value::Time(t));
        for (k, v) in fields {
            e.push(k, Value::Float(*v));
        }
        e.time = t;
        e
    }

    fn batch(events: Vec<Event>) -> Arc<Batch> {
        Arc::new(Batch::new(events))
    }

    async fn sink(dir: &std::path::Path, first_epoch: u64) -> DeltaSink {
        let cfg: DeltaConfig = serde_json::from_value(serde_json::json!({
            "inputs": ["w"], "url": dir.to_str().unwrap(), "partition_by": ["date"]
        }))
        .unwrap();
        DeltaSink::new(cfg, &BuildCx::for_test("lake", "delta", first_epoch)).await.unwrap()
    }

    async fn table(dir: &std::path::Path) -> DeltaTable {
        TableAt::open(dir.to_str().unwrap(), &BTreeMap::new()).unwrap().load().await.unwrap().expect("a table")
    }

    /// Rows with a new column add it to the (partitioned) table; each epoch is one commit whose
    /// txn version is the epoch; a restart from a checkpoint whose commit did not happen commits
    /// it once, and a second restart from the same checkpoint adds nothing.
    #[tokio::test]
    async fn epochs_commit_once_and_new_columns_join_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let day = 86_400_000_000_000i64;
        let mut s = sink(dir.path(), 1).await;
        s.start(None).await.unwrap();
        s.write(batch(vec![row("a", day, &[("t_avg", 1.0)]), row("b", 2 * day, &[("t_avg", 2.0)])])).await.unwrap();
        s.flush(1).await.unwrap();
        s.commit(1).await.unwrap();
        s.write(batch(vec![row("a", day, &[("t_avg", 3.0), ("h_avg", 4.0)])])).await.unwrap();
        s.flush(2).await.unwrap();
        s.commit(2).await.unwrap();
        // epoch 3 reaches its checkpoint, then the process dies before the commit
        s.write(batch(vec![row("c", day, &[("t_avg", 5.0)])])).await.unwrap();
        let state = s.flush(3).await.unwrap();
        drop(s);

        let t = table(dir.path()).await;
        let names: Vec<String> = t.snapshot().unwrap().schema().fields().map(|f| f.name().clone()).collect();
        assert_eq!(names, ["deviceId", "window_start", "t_avg", "date", "h_avg"]);
        assert_eq!(txn_version(&t, "centralflow/p/lake/i").await.unwrap(), 2);
        let files_before = t.snapshot().unwrap().log_data().num_files();
        assert_eq!(files_before, 3, "two dates in epoch 1, one in epoch 2");

        for restart in 0..2 {
            let mut s = sink(dir.path(), 4).await;
            s.start(Some(&state)).await.unwrap();
            let t = table(dir.path()).await;
            assert_eq!(txn_version(&t, "centralflow/p/lake/i").await.unwrap(), 3, "restart {restart}");
            assert_eq!(t.snapshot().unwrap().log_data().num_files(), 4, "epoch 3 committed once (restart {restart})");
        }
        let t = table(dir.path()).await;
        let ops: Vec<String> = {
            use futures::TryStreamExt;
            let mut h: Vec<_> = t.history(None).try_collect().await.unwrap();
            h.reverse();
            h.into_iter().map(|c| c.operation.unwrap_or_default()).collect()
        };
        assert_eq!(ops, ["CREATE TABLE", "STREAMING UPDATE", "ADD COLUMN", "STREAMING UPDATE", "STREAMING UPDATE"]);
    }

    /// A pipeline without a checkpoint store starts its epochs at 1 on every run: the versions
    /// continue after the table's instead of being taken for epochs already committed.
    #[tokio::test]
    async fn a_run_without_checkpoints_continues_the_txn_versions() {
        let dir = tempfile::tempdir().unwrap();
        for run in 1..=2 {
            let mut s = sink(dir.path(), 1).await;
            s.start(None).await.unwrap();
            s.write(batch(vec![row("a", 0, &[("t_avg", run as f64)])])).await.unwrap();
            s.flush(1).await.unwrap();
            s.commit(1).await.unwrap();
            let t = table(dir.path()).await;
            assert_eq!(txn_version(&t, "centralflow/p/lake/i").await.unwrap(), run);
            assert_eq!(t.snapshot().unwrap().log_data().num_files(), run as usize, "run {run} kept");
        }
    }

    /// Our data files are described as delta-rs describes its own: the same rows written by
    /// delta-rs's `RecordBatchWriter` and by `DataFiles` (several row groups, two partitions,
    /// nulls, sub-millisecond times, negative numbers) give the same partition values, partition
    /// folders and statistics, and the files hold the same rows.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn data_files_are_described_as_delta_rs_describes_them() {
        use arrow_array::{BooleanArray, Float64Array, Int64Array, StringArray, TimestampMicrosecondArray};
        use deltalake_core::writer::{DeltaWriter as _, RecordBatchWriter};
        let dir = tempfile::tempdir().unwrap();
        let fields = vec![
            Field::new("deviceId", DataType::Utf8, true),
            Field::new("t", DataType::Timestamp(arrow_schema::TimeUnit::Microsecond, Some("UTC".into())), true),
            Field::new("v", DataType::Float64, true),
            Field::new("n", DataType::Int64, true),
            Field::new("ok", DataType::Boolean, true),
            Field::new("date", DataType::Date32, true),
        ];
        let st: StructType = (&Schema::new(fields)).try_into_kernel().unwrap();
        let at = TableAt::open(dir.path().to_str().unwrap(), &BTreeMap::new()).unwrap();
        let table = DeltaTable::new(at.log_store.clone())
            .create()
            .with_columns(st.fields().cloned())
            .with_partition_columns(vec!["date".to_string()])
            .await
            .unwrap();
        let metadata = table.snapshot().unwrap().metadata().clone();
        let schema: SchemaRef = Arc::new((&metadata.parse_schema().unwrap()).try_into_arrow().unwrap());
        let n = 1000i64;
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter(
                (0..n).map(|i| (i % 9 != 0).then(|| format!("dev-{:03}", (i * 37) % 101))),
            )),
            Arc::new(
                TimestampMicrosecondArray::from_iter(
                    (0..n).map(|i| (i % 11 != 0).then_some(1_700_000_000_000_000 + i * 1234)),
                )
                .with_timezone("UTC"),
            ),
            Arc::new(Float64Array::from_iter((0..n).map(|i| (i % 7 != 0).then_some((i as f64 - 400.0) / 3.0)))),
            Arc::new(Int64Array::from_iter((0..n).map(|i| (i % 13 != 0).then_some(500 - i)))),
            Arc::new(BooleanArray::from_iter((0..n).map(|i| (i % 5 != 0).then_some(i % 3 == 0)))),
            Arc::new(Date32Array::from_iter((0..n).map(|i| Some(19_000 + (i % 2) as i32)))),
        ];
        let rows = RecordBatch::try_new(schema.clone(), cols).unwrap();
        let props = Compression::Zstd.writer_properties().set_max_row_group_row_count(Some(128)).build();

        let mut theirs = RecordBatchWriter::for_table(&table).unwrap().with_writer_properties(props.clone());
        theirs.write(rows.clone()).await.unwrap();
        let theirs = theirs.flush().await.unwrap();
        let config = metadata.configuration().clone();
        let mut ours =
            DataFiles::new(table.object_store(), schema, &["date".to_string()], props, Indexed::from_config(&config))
                .unwrap();
        ours.write(&rows.slice(0, 300)).await.unwrap();
        ours.write(&rows.slice(300, 700)).await.unwrap();
        let ours = ours.close().await.unwrap();

        let described = |adds: &[Add]| {
            let mut v: Vec<_> = adds
                .iter()
                .map(|a| {
                    let folder = a.path.rsplit_once('/').map(|(d, _)| d.to_string());
                    let stats: serde_json::Value = serde_json::from_str(a.stats.as_deref().unwrap()).unwrap();
                    (format!("{:?}", a.partition_values.iter().collect::<BTreeMap<_, _>>()), folder, stats)
                })
                .collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        let (got, want) = (described(&ours), described(&theirs));
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got, want);
        let read = |adds: &[Add]| {
            let mut all = Vec::new();
            for a in adds {
                let path = dir.path().join(&a.path);
                let file = std::fs::File::open(&path).unwrap();
                let b = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
                for rb in b.build().unwrap() {
                    let rb = rb.unwrap();
                    let text = arrow_cast::display::ArrayFormatter::try_new(rb.column(0), &Default::default()).unwrap();
                    for i in 0..rb.num_rows() {
                        all.push(format!("{} {}", a.path.split('/').next().unwrap(), text.value(i)));
                    }
                }
            }
            all.sort();
            all
        };
        assert_eq!(read(&ours), read(&theirs));
        assert_eq!(read(&ours).len(), n as usize);
    }

    /// A column whose type the table's cannot hold is an error naming it, not a dropped value.
    #[tokio::test]
    async fn a_column_of_another_type_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = sink(dir.path(), 1).await;
        s.start(None).await.unwrap();
        s.write(batch(vec![row("a", 0, &[("n", 1.0)])])).await.unwrap();
        let mut e = Event::row();
        e.push("deviceId", "a".into());
        e.push("window_start", Value::Time(0));
        e.push("n", "text".into());
        let err = s.write(batch(vec![e])).await.unwrap_err().to_string();
        assert!(err.contains("column `n` is Float64 in the Delta table"), "{err}");
    }
}
