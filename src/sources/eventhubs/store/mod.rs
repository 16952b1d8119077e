//! Partition ownership and checkpoints in object storage, in the Azure SDKs' blob layout.
//!
//! Layout (every name lower-cased, as the Azure SDKs' blob checkpoint stores do):
//! - `{fully_qualified_namespace}/{event_hub}/{consumer_group}/ownership/{partition}`: the
//!   partition's owner, metadata `ownerid` (empty: released). Its ETag is the ownership's version,
//!   its last-modified time the owner's heartbeat. Claimed with `If-Match: <etag>`, or
//!   `If-None-Match: *` when it does not exist yet: of two conflicting claims one loses.
//! - `.../checkpoint/{partition}`: metadata `offset` and `sequencenumber` (strings), the last
//!   event processed. centralflow adds `centralflowepoch`, `centralflowowner` and
//!   `centralflowstate` (the name of the state object below); Azure's processors ignore them.
//! - `.../centralflow/state/{partition}/{epoch}-{owner}`: the per-partition state of the
//!   pipeline's stateful transforms at that checkpoint (what moves with a partition). Written
//!   before the checkpoint blob that names it, so a checkpoint never points past its state.
//! - `.../centralflow/instances/{owner}`: each running instance's heartbeat (so that an
//!   instance that owns nothing yet is counted when partitions are shared out).
//!
//! Back ends:
//! - Azure Blob (`az://`): empty blobs with user metadata (`x-ms-meta-*`) exactly as the Azure
//!   SDKs write them, so a consumer group can move between Azure's processors and centralflow
//!   without replaying.
//! - S3, GCS: the same names and metadata; the body is a small JSON copy of the metadata with a
//!   nonce, because S3 derives ETags from the content and empty bodies would all share one ETag
//!   (conditional writes could not tell two versions apart).
//! - A local folder: the file system has no user metadata and `object_store` no conditional
//!   update there, so each blob is a JSON file `{"metadata": {...}, "version": N,
//!   "modified_ms": T}`; `version` is the ETag, and conditional writes hold a lock file
//!   (`NAME.lock`, created exclusively, broken when older than 10 s) around read-compare-write.
//!
//! Files: this one holds the records and the store's operations; `backend.rs` reads and writes
//! one blob on a remote store or the local folder, `local.rs` the local folder's files and locks,
//! and `sdk.rs` serves the Azure SDK's `CheckpointStore` trait.

mod backend;
mod local;
mod sdk;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::storage::{self, Scheme};
use backend::join;
use local::{local_list, local_read, write_atomic};

/// Metadata key of the owner (Azure layout).
pub const OWNER_ID: &str = "ownerid";
/// Metadata key of the checkpoint's offset (Azure layout).
pub const OFFSET: &str = "offset";
/// Metadata key of the checkpoint's sequence number (Azure layout).
pub const SEQUENCE_NUMBER: &str = "sequencenumber";
/// centralflow's additions to a checkpoint (ignored by Azure's processors).
pub const CF_EPOCH: &str = "centralflowepoch";
pub const CF_OWNER: &str = "centralflowowner";
pub const CF_STATE: &str = "centralflowstate";

/// One partition's ownership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnershipRecord {
    pub partition: String,
    /// Empty when released.
    pub owner: String,
    /// The version to present when renewing or taking it over.
    pub etag: String,
    /// Last write (heartbeat), ms since the Unix epoch.
    pub modified_ms: i64,
}

/// One partition's checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckpointRecord {
    pub partition: String,
    pub offset: Option<String>,
    pub sequence_number: Option<i64>,
    /// Other metadata (`centralflowepoch`, ...).
    pub extra: BTreeMap<String, String>,
}

impl CheckpointRecord {
    pub fn epoch(&self) -> Option<u64> {
        self.extra.get(CF_EPOCH).and_then(|e| e.parse().ok())
    }
    pub fn owner(&self) -> Option<&str> {
        self.extra.get(CF_OWNER).map(String::as_str)
    }
    pub fn state_object(&self) -> Option<&str> {
        self.extra.get(CF_STATE).map(String::as_str).filter(|s| !s.is_empty())
    }
}

/// A blob as the back ends see it.
#[derive(Debug, Clone)]
struct Blob {
    metadata: BTreeMap<String, String>,
    etag: String,
    modified_ms: i64,
}

#[derive(Clone)]
enum Backend {
    Remote { store: Arc<dyn ObjectStore>, prefix: Path, scheme: Scheme },
    Local { root: PathBuf },
}

/// The checkpoint and ownership store of one consumer group.
#[derive(Clone)]
pub struct BlobCheckpointStore {
    backend: Backend,
    /// `{namespace}/{hub}/{group}` lower-cased.
    base: String,
    namespace: String,
    hub: String,
    group: String,
    display: String,
}

impl std::fmt::Debug for BlobCheckpointStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlobCheckpointStore({}/{})", self.display, self.base)
    }
}

/// How a conditional write went.
#[derive(Debug)]
enum Put {
    Done(Blob),
    /// The condition failed: someone else wrote first.
    Conflict,
}

fn now_ms() -> i64 {
    crate::time::now_nanos() / 1_000_000
}

impl BlobCheckpointStore {
    /// Opens the store at `url` (a folder, `az://`, `s3://`, `gs://`) for one consumer group.
    pub fn open(
        url: &str,
        options: &BTreeMap<String, String>,
        namespace: &str,
        hub: &str,
        group: &str,
    ) -> anyhow::Result<BlobCheckpointStore> {
        let loc = storage::open(url, options).with_context(|| format!("opening the checkpoint store {url}"))?;
        let backend = match (&loc.local_path, loc.scheme) {
            (Some(p), _) => Backend::Local { root: p.clone() },
            (None, scheme) => Backend::Remote { store: loc.store.clone(), prefix: loc.prefix.clone(), scheme },
        };
        Ok(BlobCheckpointStore {
            backend,
            base: format!("{namespace}/{hub}/{group}").to_lowercase(),
            namespace: namespace.to_string(),
            hub: hub.to_string(),
            group: group.to_string(),
            display: url.to_string(),
        })
    }

    /// Where the store is, for messages.
    pub fn display(&self) -> &str {
        &self.display
    }

    fn name(&self, kind: &str, partition: &str) -> String {
        format!("{}/{kind}/{partition}", self.base).to_lowercase()
    }

    fn prefix(&self, kind: &str) -> String {
        format!("{}/{kind}/", self.base).to_lowercase()
    }

    // ------------------------------------------------------------------ ownership

    /// The ownership of every partition that has one.
    pub async fn list_ownership_records(&self) -> anyhow::Result<Vec<OwnershipRecord>> {
        let names = self.list_names(&self.prefix("ownership")).await?;
        let blobs: Vec<(String, Option<Blob>)> = futures::stream::iter(names)
            .map(|(partition, full)| async move { (partition, self.get(&full).await) })
            .buffer_unordered(16)
            .map(|(p, r)| r.map(|b| (p, b)))
            .try_collect()
            .await?;
        let mut out: Vec<OwnershipRecord> = blobs
            .into_iter()
            .filter_map(|(partition, b)| {
                let b = b?;
                Some(OwnershipRecord {
                    partition,
                    owner: b.metadata.get(OWNER_ID).cloned().unwrap_or_default(),
                    etag: b.etag,
                    modified_ms: b.modified_ms,
                })
            })
            .collect();
        out.sort_by(|a, b| partition_order(&a.partition, &b.partition));
        Ok(out)
    }

    /// One partition's ownership, if it has one.
    pub async fn ownership(&self, partition: &str) -> anyhow::Result<Option<OwnershipRecord>> {
        let b = self.get(&self.name("ownership", partition)).await?;
        Ok(b.map(|b| OwnershipRecord {
            partition: partition.to_string(),
            owner: b.metadata.get(OWNER_ID).cloned().unwrap_or_default(),
            etag: b.etag,
            modified_ms: b.modified_ms,
        }))
    }

    /// Writes `owner` (empty: release) into a partition's ownership if its version is still
    /// `expected` (`None`: the ownership must not exist yet). `Ok(None)` when another writer
    /// got there first.
    pub async fn claim(
        &self,
        partition: &str,
        owner: &str,
        expected: Option<&str>,
    ) -> anyhow::Result<Option<OwnershipRecord>> {
        let md = BTreeMap::from([(OWNER_ID.to_string(), owner.to_string())]);
        match self.put_conditional(&self.name("ownership", partition), &md, expected).await? {
            Put::Done(b) => Ok(Some(OwnershipRecord {
                partition: partition.to_string(),
                owner: owner.to_string(),
                etag: b.etag,
                modified_ms: b.modified_ms,
            })),
            Put::Conflict => Ok(None),
        }
    }

    // ------------------------------------------------------------------ checkpoints

    /// One partition's checkpoint, if it has one.
    pub async fn checkpoint(&self, partition: &str) -> anyhow::Result<Option<CheckpointRecord>> {
        let b = self.get(&self.name("checkpoint", partition)).await?;
        Ok(b.map(|b| checkpoint_of(partition, b.metadata)))
    }

    /// Every partition's checkpoint.
    pub async fn list_checkpoint_records(&self) -> anyhow::Result<Vec<CheckpointRecord>> {
        let names = self.list_names(&self.prefix("checkpoint")).await?;
        let mut out: Vec<CheckpointRecord> = futures::stream::iter(names)
            .map(|(partition, full)| async move { self.get(&full).await.map(|b| (partition, b)) })
            .buffer_unordered(16)
            .try_filter_map(|(p, b)| async move { Ok(b.map(|b| checkpoint_of(&p, b.metadata))) })
            .try_collect()
            .await?;
        out.sort_by(|a, b| partition_order(&a.partition, &b.partition));
        Ok(out)
    }

    /// Writes a partition's checkpoint (unconditionally, as the Azure SDKs do: only the
    /// partition's owner writes it).
    pub async fn put_checkpoint(&self, cp: &CheckpointRecord) -> anyhow::Result<()> {
        let mut md = cp.extra.clone();
        if let Some(o) = &cp.offset {
            md.insert(OFFSET.into(), o.clone());
        }
        if let Some(s) = cp.sequence_number {
            md.insert(SEQUENCE_NUMBER.into(), s.to_string());
        }
        self.put(&self.name("checkpoint", &cp.partition), &md).await
    }

    // ------------------------------------------------------------------ centralflow's own objects

    /// Stores the per-partition transform state of a checkpoint; returns the object's name
    /// (for the checkpoint's `centralflowstate`).
    pub async fn put_state(&self, partition: &str, epoch: u64, owner: &str, data: Vec<u8>) -> anyhow::Result<String> {
        let rel = format!("{partition}/{epoch:012}-{}", crate::runtime::checkpoint::sanitize(owner)).to_lowercase();
        let name = self.name("centralflow/state", &rel);
        match &self.backend {
            Backend::Remote { store, prefix, .. } => {
                store
                    .put(&join(prefix, &name), PutPayload::from(data))
                    .await
                    .with_context(|| format!("writing {name} to {}", self.display))?;
            }
            Backend::Local { root } => write_atomic(&root.join(&name), &data)?,
        }
        Ok(rel)
    }

    /// Reads a state object named by a checkpoint.
    pub async fn get_state(&self, rel: &str) -> anyhow::Result<Vec<u8>> {
        let name = self.name("centralflow/state", rel);
        match &self.backend {
            Backend::Remote { store, prefix, .. } => Ok(store
                .get(&join(prefix, &name))
                .await
                .with_context(|| format!("reading {name} from {}", self.display))?
                .bytes()
                .await?
                .to_vec()),
            Backend::Local { root } => {
                std::fs::read(root.join(&name)).with_context(|| format!("reading {name} from {}", self.display))
            }
        }
    }

    /// Deletes a state object that no checkpoint names any more (best effort).
    pub async fn delete_state(&self, rel: &str) {
        let name = self.name("centralflow/state", rel);
        match &self.backend {
            Backend::Remote { store, prefix, .. } => {
                let _ = store.delete(&join(prefix, &name)).await;
            }
            Backend::Local { root } => {
                let _ = std::fs::remove_file(root.join(&name));
            }
        }
    }

    /// Records that `owner` is alive (its heartbeat).
    pub async fn heartbeat(&self, owner: &str) -> anyhow::Result<()> {
        let md = BTreeMap::from([(OWNER_ID.to_string(), owner.to_string())]);
        self.put(&self.name("centralflow/instances", &crate::runtime::checkpoint::sanitize(owner)), &md).await
    }

    /// Removes an instance's heartbeat (it stopped).
    pub async fn remove_heartbeat(&self, owner: &str) {
        let name = self.name("centralflow/instances", &crate::runtime::checkpoint::sanitize(owner));
        match &self.backend {
            Backend::Remote { store, prefix, .. } => {
                let _ = store.delete(&join(prefix, &name)).await;
            }
            Backend::Local { root } => {
                let _ = std::fs::remove_file(root.join(&name));
            }
        }
    }

    /// Instances with a heartbeat: (owner as written in its name, last heartbeat in ms).
    pub async fn instances(&self) -> anyhow::Result<Vec<(String, i64)>> {
        let prefix = self.prefix("centralflow/instances");
        match &self.backend {
            Backend::Remote { store, prefix: root, .. } => {
                let metas = self.list_remote(store, root, &prefix).await?;
                Ok(metas
                    .into_iter()
                    .filter_map(|m| Some((m.location.filename()?.to_string(), m.last_modified.timestamp_millis())))
                    .collect())
            }
            Backend::Local { root } => {
                let mut out = Vec::new();
                for (name, path) in local_list(&root.join(prefix.trim_end_matches('/')))? {
                    if let Some(b) = local_read(&path)? {
                        out.push((name, b.modified_ms));
                    }
                }
                Ok(out)
            }
        }
    }
}

fn checkpoint_of(partition: &str, mut md: BTreeMap<String, String>) -> CheckpointRecord {
    let offset = md.remove(OFFSET).filter(|o| !o.is_empty());
    let sequence_number = md.remove(SEQUENCE_NUMBER).and_then(|s| s.parse().ok());
    CheckpointRecord { partition: partition.to_string(), offset, sequence_number, extra: md }
}

/// Numeric partition ids in numeric order, others after them by name.
fn partition_order(a: &str, b: &str) -> std::cmp::Ordering {
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        (Ok(_), Err(_)) => std::cmp::Ordering::Less,
        (Err(_), Ok(_)) => std::cmp::Ordering::Greater,
        _ => a.cmp(b),
    }
}

impl BlobCheckpointStore {
    /// The namespace, hub and consumer group this store serves (as configured).
    pub fn names(&self) -> (&str, &str, &str) {
        (&self.namespace, &self.hub, &self.group)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> (tempfile::TempDir, BlobCheckpointStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = BlobCheckpointStore::open(
            dir.path().to_str().unwrap(),
            &BTreeMap::new(),
            "NS.servicebus.windows.net",
            "Hub",
            "$Default",
        )
        .unwrap();
        (dir, s)
    }

    #[tokio::test]
    async fn layout_is_lower_cased_azure_names() {
        let (dir, s) = local();
        s.claim("0", "me", None).await.unwrap().unwrap();
        s.put_checkpoint(&CheckpointRecord {
            partition: "0".into(),
            offset: Some("120".into()),
            sequence_number: Some(7),
            extra: BTreeMap::new(),
        })
        .await
        .unwrap();
        let base = dir.path().join("ns.servicebus.windows.net/hub/$default");
        assert!(base.join("ownership/0").is_file());
        assert!(base.join("checkpoint/0").is_file());
        let cp: serde_json::Value = serde_json::from_slice(&std::fs::read(base.join("checkpoint/0")).unwrap()).unwrap();
        assert_eq!(cp["metadata"]["offset"], "120");
        assert_eq!(cp["metadata"]["sequencenumber"], "7");
        let got = s.checkpoint("0").await.unwrap().unwrap();
        assert_eq!((got.offset.as_deref(), got.sequence_number), (Some("120"), Some(7)));
    }

    #[tokio::test]
    async fn conflicting_claims_lose() {
        let (_dir, s) = local();
        let a = s.claim("1", "a", None).await.unwrap().unwrap();
        assert!(s.claim("1", "b", None).await.unwrap().is_none(), "create over an existing ownership");
        let b = s.claim("1", "b", Some(&a.etag)).await.unwrap().unwrap();
        assert!(s.claim("1", "a", Some(&a.etag)).await.unwrap().is_none(), "stale etag");
        assert_eq!(s.ownership("1").await.unwrap().unwrap().owner, "b");
        let released = s.claim("1", "", Some(&b.etag)).await.unwrap().unwrap();
        assert_eq!(released.owner, "");
        let all = s.list_ownership_records().await.unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].etag, released.etag);
    }

    #[tokio::test]
    async fn concurrent_claims_have_one_winner() {
        let (_dir, s) = local();
        let first = s.claim("2", "x", None).await.unwrap().unwrap();
        let mut handles = Vec::new();
        for i in 0..8 {
            let s = s.clone();
            let etag = first.etag.clone();
            handles.push(tokio::spawn(async move { s.claim("2", &format!("o{i}"), Some(&etag)).await.unwrap() }));
        }
        let mut winners = 0;
        for h in handles {
            winners += h.await.unwrap().is_some() as usize;
        }
        assert_eq!(winners, 1);
    }

    #[tokio::test]
    async fn states_and_heartbeats() {
        let (_dir, s) = local();
        let name = s.put_state("3", 12, "Inst/1", b"state".to_vec()).await.unwrap();
        assert_eq!(s.get_state(&name).await.unwrap(), b"state");
        s.delete_state(&name).await;
        assert!(s.get_state(&name).await.is_err());
        s.heartbeat("i1").await.unwrap();
        s.heartbeat("i2").await.unwrap();
        let mut inst = s.instances().await.unwrap();
        inst.sort();
        assert_eq!(inst.iter().map(|i| i.0.as_str()).collect::<Vec<_>>(), vec!["i1", "i2"]);
        s.remove_heartbeat("i1").await;
        assert_eq!(s.instances().await.unwrap().len(), 1);
    }
}
