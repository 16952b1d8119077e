//! Checkpoints: the state of every component at one barrier epoch, written as one object.
//!
//! Layout under the store's location: `{pipeline}/checkpoints/ckpt-{epoch:012}.bin` (postcard).
//! Writing one object is atomic on every store (local files are written to a temporary name and
//! renamed), so a checkpoint is either all there or absent. The newest three are kept.

use std::collections::BTreeMap;

use anyhow::Context;
use futures::TryStreamExt;
use object_store::{path::Path, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use crate::storage::Location;

/// The state of one component.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ComponentState {
    /// Hash of the component's configuration: state is only restored into the same config.
    pub fingerprint: u64,
    pub state: Vec<u8>,
}

/// One checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Checkpoint {
    pub epoch: u64,
    /// Wall-clock time it was written (ns), for the checkpoint-age metric only.
    pub written_at: i64,
    pub components: BTreeMap<String, ComponentState>,
}

/// An exclusive advisory lock (`flock`), without waiting: `Ok(false)` when another open file
/// holds it. (`File::try_lock` needs Rust 1.89; the crate builds with 1.85.)
#[cfg(unix)]
fn try_lock(file: &std::fs::File) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor this function borrows; no memory is touched.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.kind() == std::io::ErrorKind::WouldBlock {
        Ok(false)
    } else {
        Err(e)
    }
}

#[cfg(not(unix))]
fn try_lock(_file: &std::fs::File) -> std::io::Result<bool> {
    Ok(true) // no folder lock on this platform
}

/// A held lock on a local checkpoint folder (see [`CheckpointStore::lock`]).
#[derive(Debug)]
pub struct LocalLock {
    _file: std::fs::File,
}

/// Where checkpoints live.
#[derive(Clone, Debug)]
pub struct CheckpointStore {
    loc: Location,
    dir: Path,
    keep: usize,
}

impl CheckpointStore {
    pub fn new(loc: Location, pipeline: &str) -> CheckpointStore {
        let dir = loc.child(&format!("{}/checkpoints", sanitize(pipeline)));
        CheckpointStore { loc, dir, keep: 3 }
    }

    /// Takes the pipeline's lock in a local checkpoint folder, held until the returned guard is
    /// dropped (the OS releases it when the process dies). Two processes on one checkpoint
    /// folder would overwrite each other's checkpoints and, sharing an instance id, each other's
    /// output files. Object-store locations have no such lock (`Ok(None)`): instances there
    /// each need their own `checkpoint.url`.
    pub fn lock(&self, pipeline: &str) -> anyhow::Result<Option<LocalLock>> {
        use std::io::{Read, Seek, Write};
        let Some(root) = &self.loc.local_path else { return Ok(None) };
        let dir = root.join(sanitize(pipeline));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("lock");
        let mut file = std::fs::File::options()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match try_lock(&file) {
            Ok(true) => {
                file.set_len(0)?;
                file.seek(std::io::SeekFrom::Start(0))?;
                writeln!(file, "{}", std::process::id())?;
                Ok(Some(LocalLock { _file: file }))
            }
            Ok(false) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                anyhow::bail!(
                    "another centralflow process (pid {}) is running pipeline {pipeline:?} with the checkpoint folder {}: \
two runs on one folder would overwrite each other's checkpoints and output. Give each instance its own \
checkpoint.url (the shipped pipelines: its own CENTRALFLOW_INSTANCE or CENTRALFLOW_STATE)",
                    holder.trim(),
                    root.display()
                )
            }
            Err(e) => Err(e).with_context(|| format!("locking {}", path.display())),
        }
    }

    /// The location this store writes to (other per-pipeline state lives next to it).
    pub fn location(&self) -> &Location {
        &self.loc
    }

    fn path_of(&self, epoch: u64) -> Path {
        self.dir.clone().join(format!("ckpt-{epoch:012}.bin"))
    }

    async fn epochs(&self) -> anyhow::Result<Vec<u64>> {
        let list: Vec<_> = match self.loc.store.list(Some(&self.dir)).try_collect().await {
            Ok(l) => l,
            Err(object_store::Error::NotFound { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("listing checkpoints in {}", self.loc.display)),
        };
        let mut epochs: Vec<u64> = list
            .iter()
            .filter_map(|m| {
                let name = m.location.filename()?;
                name.strip_prefix("ckpt-")?.strip_suffix(".bin")?.parse().ok()
            })
            .collect();
        epochs.sort_unstable();
        Ok(epochs)
    }

    /// The epoch of the newest checkpoint, if any (without reading it).
    pub async fn latest_epoch(&self) -> anyhow::Result<Option<u64>> {
        Ok(self.epochs().await?.last().copied())
    }

    /// The newest checkpoint, if any. A checkpoint that cannot be read is an error (not
    /// silently skipped: starting over would replay or lose data).
    pub async fn latest(&self) -> anyhow::Result<Option<Checkpoint>> {
        let Some(epoch) = self.epochs().await?.last().copied() else {
            return Ok(None);
        };
        let path = self.path_of(epoch);
        let bytes =
            self.loc.store.get(&path).await?.bytes().await.with_context(|| format!("reading checkpoint {path}"))?;
        let ck: Checkpoint = postcard::from_bytes(&bytes).with_context(|| format!("checkpoint {path} is corrupt"))?;
        Ok(Some(ck))
    }

    /// Writes a checkpoint and prunes old ones.
    pub async fn write(&self, ck: &Checkpoint) -> anyhow::Result<()> {
        let bytes = postcard::to_allocvec(ck).context("encoding checkpoint")?;
        let path = self.path_of(ck.epoch);
        self.loc
            .store
            .put(&path, PutPayload::from(bytes))
            .await
            .with_context(|| format!("writing checkpoint {} to {}", ck.epoch, self.loc.display))?;
        let epochs = self.epochs().await?;
        if epochs.len() > self.keep {
            for e in &epochs[..epochs.len() - self.keep] {
                let _ = self.loc.store.delete(&self.path_of(*e)).await;
            }
        }
        Ok(())
    }

    /// Reads a small named object stored beside the checkpoints (device caches, instance ids).
    pub async fn get_aux(&self, name: &str) -> anyhow::Result<Option<bytes::Bytes>> {
        let path = self.dir.clone().join(format!("aux-{name}"));
        match self.loc.store.get(&path).await {
            Ok(r) => Ok(Some(r.bytes().await?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes a small named object beside the checkpoints.
    pub async fn put_aux(&self, name: &str, data: Vec<u8>) -> anyhow::Result<()> {
        let path = self.dir.clone().join(format!("aux-{name}"));
        self.loc.store.put(&path, PutPayload::from(data)).await?;
        Ok(())
    }
}

/// Makes a name safe as one path segment.
pub fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect()
}

/// A stable 64-bit fingerprint of a component's configuration.
pub fn fingerprint(v: &serde_json::Value) -> u64 {
    use sha2::Digest;
    let h = sha2::Sha256::digest(v.to_string().as_bytes());
    u64::from_le_bytes(h[..8].try_into().unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn write_latest_and_prune() {
        let dir = tempfile::tempdir().unwrap();
        let loc = crate::storage::open(dir.path().to_str().unwrap(), &Default::default()).unwrap();
        let store = CheckpointStore::new(loc, "my pipeline");
        assert_eq!(store.latest().await.unwrap(), None);
        for epoch in 1..=5 {
            let mut ck = Checkpoint { epoch, written_at: 7, components: BTreeMap::new() };
            ck.components.insert("w".into(), ComponentState { fingerprint: 9, state: vec![epoch as u8; 3] });
            store.write(&ck).await.unwrap();
        }
        let latest = store.latest().await.unwrap().unwrap();
        assert_eq!(latest.epoch, 5);
        assert_eq!(latest.components["w"].state, vec![5, 5, 5]);
        let files: Vec<_> = std::fs::read_dir(dir.path().join("my_pipeline/checkpoints")).unwrap().collect();
        assert_eq!(files.len(), 3, "only the newest three are kept");
        store.put_aux("cache", b"abc".to_vec()).await.unwrap();
        assert_eq!(store.get_aux("cache").await.unwrap().unwrap().as_ref(), b"abc");
        assert_eq!(store.get_aux("nope").await.unwrap(), None);
    }

    #[tokio::test]
    async fn corrupt_checkpoints_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let loc = crate::storage::open(dir.path().to_str().unwrap(), &Default::default()).unwrap();
        let store = CheckpointStore::new(loc, "p");
        std::fs::create_dir_all(dir.path().join("p/checkpoints")).unwrap();
        std::fs::write(dir.path().join("p/checkpoints/ckpt-000000000001.bin"), b"\xff\xff\xff").unwrap();
        let err = store.latest().await.unwrap_err();
        assert!(format!("{err:#}").contains("corrupt"), "{err:#}");
    }
}
