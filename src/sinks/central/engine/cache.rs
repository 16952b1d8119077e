//! The device registration cache of the `central` sink: which hub each device was assigned
//! (and with which model), loaded at start and persisted beside the checkpoints, in a local
//! file, or nowhere, so that a restart does not register every device again.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::{lock, Engine};
use crate::runtime::checkpoint::CheckpointStore;

/// Where the device cache is kept.
pub(super) enum CacheStore {
    Aux(CheckpointStore, String),
    File(std::path::PathBuf),
    Memory,
}

#[derive(Serialize, Deserialize, Default)]
struct CacheFile {
    id_scope: String,
    devices: BTreeMap<String, CachedDevice>,
}

#[derive(Serialize, Deserialize, Clone)]
struct CachedDevice {
    hub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    model: Option<String>,
}

impl Engine {
    pub(super) async fn load_cache(&self) -> anyhow::Result<()> {
        let bytes = match &self.cache {
            CacheStore::Aux(store, name) => {
                store.get_aux(name).await.context("reading the device cache")?.map(|b| b.to_vec())
            }
            CacheStore::File(f) => match std::fs::read(f) {
                Ok(b) => Some(b),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(e).with_context(|| format!("reading the device cache {}", f.display())),
            },
            CacheStore::Memory => None,
        };
        let Some(bytes) = bytes else { return Ok(()) };
        let file: CacheFile = match serde_json::from_slice(&bytes) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("the device cache is unreadable ({e}); devices register again");
                return Ok(());
            }
        };
        if file.id_scope != self.sh.set.id_scope {
            tracing::info!("the device cache is for another ID scope; devices register again");
            return Ok(());
        }
        let mut st = lock(&self.sh.st);
        for (id, d) in file.devices {
            let dev = st.devices.entry(Arc::from(id.as_str())).or_default();
            dev.hub = Some(d.hub);
            dev.model = d.model;
        }
        tracing::info!(devices = st.devices.len(), "device registrations loaded from the cache");
        if !st.devices.is_empty() {
            // a cached registration proves the key worked before
            self.sh.verified.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Writes the device cache if it changed (`force`: now; else at most every 10 s).
    pub(in crate::sinks::central) async fn persist_cache(&mut self, force: bool) {
        if !force && self.last_persist.elapsed() < Duration::from_secs(10) {
            return;
        }
        let file = {
            let mut st = lock(&self.sh.st);
            if !st.cache_dirty {
                return;
            }
            st.cache_dirty = false;
            CacheFile {
                id_scope: self.sh.set.id_scope.clone(),
                devices: st
                    .devices
                    .iter()
                    .filter_map(|(id, d)| {
                        d.hub
                            .as_ref()
                            .map(|h| (id.to_string(), CachedDevice { hub: h.clone(), model: d.model.clone() }))
                    })
                    .collect(),
            }
        };
        self.last_persist = std::time::Instant::now();
        let bytes = match serde_json::to_vec(&file) {
            Ok(b) => b,
            Err(_) => return,
        };
        let r = match &self.cache {
            CacheStore::Aux(store, name) => store.put_aux(name, bytes).await,
            CacheStore::File(f) => write_file_atomic(f, &bytes),
            CacheStore::Memory => Ok(()),
        };
        if let Err(e) = r {
            lock(&self.sh.st).cache_dirty = true;
            tracing::warn!("the device cache could not be written (devices may register again after a restart): {e:#}");
        }
    }
}

fn write_file_atomic(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
