//! The data files of the epoch being written: one open file per partition, each encoded by the
//! Parquet sink's [`ParallelWriter`] (row groups on the rayon pool, so the table is written on
//! every core, not on the sink's task), named and described as delta-rs names and describes
//! its own (`part-00000-<uuid>-c000.zstd.parquet` under the Hive partition path, an `add`
//! action with statistics).

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use arrow_array::{Array, RecordBatch, UInt32Array};
use arrow_schema::SchemaRef;
use delta_kernel::expressions::Scalar;
use deltalake_core::kernel::scalars::ScalarExt as _;
use deltalake_core::kernel::Add;
use indexmap::IndexMap;
use object_store::buffered::BufWriter;
use object_store::path::Path;
use object_store::ObjectStore;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use super::stats::{add_action, Indexed};
use crate::sinks::parquet::encoder::ParallelWriter;
use crate::sinks::parquet::file_props;

/// A partition's values as Delta writes them (`None` for null), in the table's partition order.
type Key = Vec<Option<String>>;

/// One open data file.
struct Open {
    values: IndexMap<String, Scalar>,
    path: Path,
    writer: ParallelWriter,
}

/// The open data files of a table schema, by partition.
pub(super) struct DataFiles {
    /// Rooted at the table.
    store: Arc<dyn ObjectStore>,
    /// The table's columns, partition columns included: the rows handed to [`DataFiles::write`].
    schema: SchemaRef,
    /// Positions of the partition columns in `schema`, in the table's partition order.
    partition: Vec<(String, usize)>,
    /// Positions of the other columns, and the schema of the files (without partition columns).
    data: Vec<usize>,
    file_schema: SchemaRef,
    props: WriterProperties,
    indexed: Indexed,
    open: HashMap<Key, Open>,
}

impl DataFiles {
    pub(super) fn new(
        store: Arc<dyn ObjectStore>,
        schema: SchemaRef,
        partition_by: &[String],
        props: WriterProperties,
        indexed: Indexed,
    ) -> anyhow::Result<DataFiles> {
        let mut partition = Vec::new();
        for p in partition_by {
            let (i, _) =
                schema.column_with_name(p).with_context(|| format!("partition column `{p}` is not in the table"))?;
            partition.push((p.clone(), i));
        }
        let data: Vec<usize> = (0..schema.fields().len()).filter(|i| !partition.iter().any(|(_, p)| p == i)).collect();
        let file_schema = Arc::new(schema.project(&data)?);
        let props = file_props(&props, &file_schema);
        Ok(DataFiles { store, schema, partition, data, file_schema, props, indexed, open: HashMap::new() })
    }

    /// The table's columns these files are written in.
    pub(super) fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// Writes rows in the table's schema to the files of their partitions.
    pub(super) async fn write(&mut self, rows: &RecordBatch) -> anyhow::Result<()> {
        if rows.num_rows() == 0 {
            return Ok(());
        }
        let data = rows.project(&self.data)?;
        if self.partition.is_empty() {
            return self.file(Vec::new(), IndexMap::new())?.writer.write(&data).await;
        }
        // rows of one partition in their order; a batch is usually one partition
        let cols: Vec<&dyn Array> = self.partition.iter().map(|(_, i)| rows.column(*i).as_ref()).collect();
        // per partition: its key (the serialized values), its values and its rows
        let mut groups: Vec<(Key, IndexMap<String, Scalar>, Vec<u32>)> = Vec::new();
        let mut index: HashMap<Key, usize> = HashMap::new();
        for row in 0..rows.num_rows() {
            let mut scalars = Vec::with_capacity(cols.len());
            for (c, (name, _)) in cols.iter().zip(&self.partition) {
                scalars.push(Scalar::from_array(*c, row).with_context(|| {
                    format!("partition column `{name}` is {}, not a Delta partition type", c.data_type())
                })?);
            }
            let key: Key = scalars.iter().map(|v| (!v.is_null()).then(|| v.serialize())).collect();
            let g = match index.get(&key) {
                Some(g) => *g,
                None => {
                    let values = self.partition.iter().map(|(name, _)| name.clone()).zip(scalars).collect();
                    index.insert(key.clone(), groups.len());
                    groups.push((key, values, Vec::new()));
                    groups.len() - 1
                }
            };
            groups[g].2.push(row as u32);
        }
        let whole = groups.len() == 1;
        for (key, values, rows_of) in groups {
            let part = if whole {
                data.clone()
            } else {
                arrow_select::take::take_record_batch(&data, &UInt32Array::from(rows_of))?
            };
            self.file(key, values)?.writer.write(&part).await?;
        }
        Ok(())
    }

    /// The open file of a partition, opened if there is none.
    fn file(&mut self, key: Key, values: IndexMap<String, Scalar>) -> anyhow::Result<&mut Open> {
        if !self.open.contains_key(&key) {
            let dir: Vec<String> = values.iter().map(|(k, v)| format!("{k}={}", v.serialize_encoded())).collect();
            let name = format!("part-00000-{}-c000{}.parquet", uuid::Uuid::new_v4(), suffix(&self.props));
            let path = if dir.is_empty() { Path::from(name) } else { Path::parse(dir.join("/"))?.join(name) };
            let out = BufWriter::new(self.store.clone(), path.clone());
            let writer = ParallelWriter::try_new(out, self.file_schema.clone(), self.props.clone())?;
            self.open.insert(key.clone(), Open { values, path, writer });
        }
        Ok(self.open.get_mut(&key).expect("inserted"))
    }

    /// Finishes every open file; their `add` actions, in path order.
    pub(super) async fn close(self) -> anyhow::Result<Vec<Add>> {
        let indexed = &self.indexed;
        let closing = self.open.into_values().map(|f| async move {
            let (meta, size) = f.writer.close().await.with_context(|| format!("finishing the data file {}", f.path))?;
            anyhow::Ok(add_action(&f.values, f.path.to_string(), size, &meta, indexed))
        });
        let mut adds = futures::future::try_join_all(closing).await?;
        adds.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(adds)
    }
}

/// The compression in a data file's name, as delta-rs (and Hadoop) name it.
fn suffix(props: &WriterProperties) -> &'static str {
    match props.compression(&parquet::schema::types::ColumnPath::new(Vec::new())) {
        Compression::UNCOMPRESSED => "",
        Compression::SNAPPY => ".snappy",
        Compression::GZIP(_) => ".gz",
        Compression::LZO => ".lzo",
        Compression::BROTLI(_) => ".br",
        Compression::LZ4 => ".lz4",
        Compression::ZSTD(_) => ".zstd",
        Compression::LZ4_RAW => ".lz4raw",
    }
}
