//! The local-folder back end of the Event Hubs checkpoint store: each blob a JSON file with its
//! metadata, version and modification time, written atomically, and the lock files that make
//! conditional writes safe between processes.

use std::collections::BTreeMap;
use std::path::{Path as FsPath, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use super::now_ms;

/// The local file format.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct LocalBlob {
    pub(super) metadata: BTreeMap<String, String>,
    pub(super) version: u64,
    pub(super) modified_ms: i64,
}

pub(super) fn local_list(dir: &FsPath) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with('.') || name.ends_with(".lock") || name.ends_with(".tmp") || !e.path().is_file() {
            continue;
        }
        out.push((name, e.path()));
    }
    Ok(out)
}

pub(super) fn local_read(path: &FsPath) -> anyhow::Result<Option<LocalBlob>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(
            serde_json::from_slice(&b)
                .with_context(|| format!("{} is not a checkpoint-store record", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

pub(super) fn local_write(path: &FsPath, md: &BTreeMap<String, String>, version: u64) -> anyhow::Result<i64> {
    let modified_ms = now_ms();
    let b = LocalBlob { metadata: md.clone(), version, modified_ms };
    write_atomic(path, &serde_json::to_vec(&b)?)?;
    Ok(modified_ms)
}

pub(super) fn write_atomic(path: &FsPath, data: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().context("a path with a folder")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.{:08x}.tmp",
        path.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default(),
        rand::random::<u32>()
    ));
    std::fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// An exclusive lock on a local record: `NAME.lock`, created with `create_new`. A lock older
/// than [`STALE_LOCK`] belongs to a process that died holding it and is broken.
pub(super) struct LocalLock {
    path: PathBuf,
}

const STALE_LOCK: Duration = Duration::from_secs(10);

impl LocalLock {
    pub(super) fn acquire(target: &FsPath) -> anyhow::Result<LocalLock> {
        let dir = target.parent().context("a path with a folder")?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = PathBuf::from(format!("{}.lock", target.display()));
        let started = std::time::Instant::now();
        loop {
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(_) => return Ok(LocalLock { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let stale = std::fs::metadata(&path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|age| age > STALE_LOCK);
                    if stale {
                        let _ = std::fs::remove_file(&path);
                        continue;
                    }
                    if started.elapsed() > STALE_LOCK * 2 {
                        bail!("{} stays locked", target.display());
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(e).with_context(|| format!("locking {}", target.display())),
            }
        }
    }
}

impl Drop for LocalLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
