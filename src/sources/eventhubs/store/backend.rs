//! The back ends of the Event Hubs checkpoint store: listing, reading and writing (plainly or
//! conditionally on a version) one blob, on a remote object store or in the local folder.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{
    Attribute, AttributeValue, Attributes, GetOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    UpdateVersion,
};
use serde::Serialize;

use super::local::{local_list, local_read, local_write, LocalLock};
use super::{now_ms, Backend, Blob, BlobCheckpointStore, Put};
use crate::storage::Scheme;

/// The body written on S3 and GCS (content-derived ETags must change with every write).
#[derive(Serialize)]
struct RemoteBody<'a> {
    metadata: &'a BTreeMap<String, String>,
    nonce: u64,
}

impl BlobCheckpointStore {
    /// Every object under `prefix` of a remote store (none when the prefix does not exist).
    pub(super) async fn list_remote(
        &self,
        store: &Arc<dyn ObjectStore>,
        root: &Path,
        prefix: &str,
    ) -> anyhow::Result<Vec<object_store::ObjectMeta>> {
        let p = join(root, prefix.trim_end_matches('/'));
        match store.list(Some(&p)).try_collect().await {
            Ok(m) => Ok(m),
            Err(object_store::Error::NotFound { .. }) => Ok(Vec::new()),
            Err(e) => Err(e).with_context(|| format!("listing {prefix} in {}", self.display)),
        }
    }

    /// (partition, full name) of every blob under a prefix.
    pub(super) async fn list_names(&self, prefix: &str) -> anyhow::Result<Vec<(String, String)>> {
        match &self.backend {
            Backend::Remote { store, prefix: root, .. } => {
                let metas = self.list_remote(store, root, prefix).await?;
                Ok(metas
                    .into_iter()
                    .filter_map(|m| {
                        let name = m.location.filename()?.to_string();
                        Some((name.clone(), format!("{prefix}{name}")))
                    })
                    .collect())
            }
            Backend::Local { root } => Ok(local_list(&root.join(prefix.trim_end_matches('/')))?
                .into_iter()
                .map(|(n, _)| (n.clone(), format!("{prefix}{n}")))
                .collect()),
        }
    }

    pub(super) async fn get(&self, name: &str) -> anyhow::Result<Option<Blob>> {
        match &self.backend {
            Backend::Remote { store, prefix, .. } => {
                let r = match store.get_opts(&join(prefix, name), GetOptions::default()).await {
                    Ok(r) => r,
                    Err(object_store::Error::NotFound { .. }) => return Ok(None),
                    Err(e) => return Err(e).with_context(|| format!("reading {name} from {}", self.display)),
                };
                let mut metadata = BTreeMap::new();
                for (k, v) in r.attributes.iter() {
                    if let Attribute::Metadata(k) = k {
                        metadata.insert(k.to_lowercase(), v.as_ref().to_string());
                    }
                }
                let etag = r.meta.e_tag.clone().unwrap_or_default();
                let modified_ms = r.meta.last_modified.timestamp_millis();
                Ok(Some(Blob { metadata, etag, modified_ms }))
            }
            Backend::Local { root } => Ok(local_read(&root.join(name))?.map(|b| Blob {
                metadata: b.metadata,
                etag: b.version.to_string(),
                modified_ms: b.modified_ms,
            })),
        }
    }

    pub(super) async fn put(&self, name: &str, md: &BTreeMap<String, String>) -> anyhow::Result<()> {
        match &self.backend {
            Backend::Remote { store, prefix, scheme } => {
                let opts = PutOptions { mode: PutMode::Overwrite, attributes: attributes(md), ..Default::default() };
                store
                    .put_opts(&join(prefix, name), body(*scheme, md), opts)
                    .await
                    .with_context(|| format!("writing {name} to {}", self.display))?;
                Ok(())
            }
            Backend::Local { root } => {
                let path = root.join(name);
                let _lock = LocalLock::acquire(&path)?;
                let version = local_read(&path)?.map_or(1, |b| b.version + 1);
                local_write(&path, md, version)?;
                Ok(())
            }
        }
    }

    pub(super) async fn put_conditional(
        &self,
        name: &str,
        md: &BTreeMap<String, String>,
        expected: Option<&str>,
    ) -> anyhow::Result<Put> {
        match &self.backend {
            Backend::Remote { store, prefix, scheme } => {
                let mode = match expected {
                    Some(etag) => PutMode::Update(UpdateVersion { e_tag: Some(etag.to_string()), version: None }),
                    None => PutMode::Create,
                };
                let path = join(prefix, name);
                let opts = PutOptions { mode, attributes: attributes(md), ..Default::default() };
                match store.put_opts(&path, body(*scheme, md), opts).await {
                    Ok(r) => {
                        // the write's own time is the heartbeat: read it back
                        let modified_ms = match store.head(&path).await {
                            Ok(m) if m.e_tag == r.e_tag => m.last_modified.timestamp_millis(),
                            _ => now_ms(),
                        };
                        Ok(Put::Done(Blob { metadata: md.clone(), etag: r.e_tag.unwrap_or_default(), modified_ms }))
                    }
                    Err(object_store::Error::Precondition { .. } | object_store::Error::AlreadyExists { .. }) => {
                        Ok(Put::Conflict)
                    }
                    Err(e) => Err(e).with_context(|| format!("writing {name} to {}", self.display)),
                }
            }
            Backend::Local { root } => {
                let path = root.join(name);
                let _lock = LocalLock::acquire(&path)?;
                let current = local_read(&path)?;
                let version = match (expected, &current) {
                    (None, None) => 1,
                    (Some(e), Some(c)) if e == c.version.to_string() => c.version + 1,
                    _ => return Ok(Put::Conflict),
                };
                let modified_ms = local_write(&path, md, version)?;
                Ok(Put::Done(Blob { metadata: md.clone(), etag: version.to_string(), modified_ms }))
            }
        }
    }
}

pub(super) fn join(prefix: &Path, name: &str) -> Path {
    let mut p = prefix.clone();
    for part in name.split('/').filter(|s| !s.is_empty()) {
        p = p.join(part);
    }
    p
}

fn attributes(md: &BTreeMap<String, String>) -> Attributes {
    let mut a = Attributes::new();
    for (k, v) in md {
        a.insert(Attribute::Metadata(k.clone().into()), AttributeValue::from(v.clone()));
    }
    a
}

fn body(scheme: Scheme, md: &BTreeMap<String, String>) -> PutPayload {
    match scheme {
        Scheme::Azure => PutPayload::new(),
        _ => {
            let b = RemoteBody { metadata: md, nonce: rand::random() };
            PutPayload::from(Bytes::from(serde_json::to_vec(&b).unwrap_or_default()))
        }
    }
}
