//! Committing a checkpoint: each partition's position is stored with its transform state
//! (the state object first, then the checkpoint blob naming it), then the partitions given up
//! are handed over.

use std::collections::{BTreeMap, BTreeSet};

use super::store::{self, BlobCheckpointStore, CheckpointRecord};
use super::{EventHubsSource, Mark, Pos, Status};
use crate::metrics;
use crate::runtime::{ComponentStates, SourceCx};

impl EventHubsSource {
    /// Commits checkpoint `epoch`: stores each partition's position with its transform state,
    /// then hands over the partitions given up. Store failures are logged; the next commit
    /// writes again.
    pub(super) async fn commit_epoch(&mut self, cx: Option<&mut SourceCx>, epoch: u64) {
        let mut mark: Option<Mark> = None;
        while self.marks.front().is_some_and(|m| m.epoch <= epoch) {
            mark = self.marks.pop_front();
        }
        // after the stream ended, an epoch beyond every barrier seen is the final one: it covers
        // everything read
        let is_final = self.ended && self.marks.is_empty() && mark.as_ref().is_none_or(|m| m.epoch < epoch);
        if is_final {
            mark = None;
        }
        let (at, positions, drained) = match mark {
            Some(m) => (m.epoch, m.positions, m.drained),
            None if is_final => {
                let positions =
                    self.parts.iter().filter_map(|(p, part)| part.last.clone().map(|pos| (*p, pos))).collect();
                (epoch, positions, self.parts.keys().copied().collect())
            }
            None => return,
        };
        let Some(store) = self.store.clone() else { return };
        if self.released_all {
            return;
        }
        let board = self.board.clone();
        let mut writes = Vec::new();
        let mut complete: BTreeSet<u32> = BTreeSet::new();
        for (p, pos) in positions {
            let Some(part) = self.parts.get(&p) else { continue };
            let states = match &board {
                Some(b) => match b.get_at(self.source_index, p, at) {
                    Some(s) => s,
                    None => {
                        tracing::debug!(partition = %part.pid, epoch = at, "states of this epoch unknown: written at the next commit");
                        continue;
                    }
                },
                None => ComponentStates::new(),
            };
            let hash = states_hash(&states);
            if part.written == Some((pos.seq, hash)) {
                complete.insert(p);
                continue;
            }
            let (store, owner, pid, old) =
                (store.clone(), self.owner.clone(), part.pid.clone(), part.state_object.clone());
            writes.push(async move {
                let r = write_checkpoint(&store, &pid, at, &owner, &pos, &states).await;
                (p, pos.seq, hash, old, r)
            });
        }
        for (p, seq, hash, old, r) in futures::future::join_all(writes).await {
            match r {
                Ok(name) => {
                    if let Some(part) = self.parts.get_mut(&p) {
                        // events newly covered by the partition's stored checkpoint
                        if let Some((before, _)) = part.written {
                            self.committed.inc_by(seq.saturating_sub(before).max(0) as u64);
                        }
                        part.written = Some((seq, hash));
                        if old.is_some() && old != name {
                            store.delete_state(old.as_deref().unwrap_or_default()).await;
                        }
                        part.state_object = name;
                    }
                    complete.insert(p);
                }
                Err(e) => {
                    metrics::global().checkpoints_failed.inc();
                    tracing::warn!(partition = p, "storing the checkpoint failed (retried at the next commit): {e:#}");
                }
            }
        }
        // hand-overs: partitions whose reader had stopped before this checkpoint's barrier
        let mut cx = cx;
        for p in drained {
            let Some(part) = self.parts.get(&p) else { continue };
            if part.status != Status::Drained || !(complete.contains(&p) || part.last.is_none()) {
                continue;
            }
            if let Some(cx) = cx.as_deref_mut() {
                if let Err(e) = cx.remove_partition(p).await {
                    tracing::warn!("{e:#}");
                }
            }
            let part = self.parts.remove(&p).unwrap();
            if let Some(o) = &part.ownership {
                match store.claim(&o.partition, "", Some(&o.etag)).await {
                    Ok(Some(_)) => {
                        tracing::info!(partition = %part.pid, epoch = at, "partition handed over (checkpoint and state stored, ownership released)")
                    }
                    Ok(None) => {
                        tracing::warn!(partition = %part.pid, "could not release the ownership: another instance took it")
                    }
                    Err(e) => {
                        tracing::warn!(partition = %part.pid, "could not release the ownership (it expires by itself): {e:#}")
                    }
                }
            }
        }
        if let Some(cx) = cx {
            self.update_health(cx);
        }
        if is_final {
            self.released_all = true;
            store.remove_heartbeat(&self.owner).await;
        }
    }
}

async fn write_checkpoint(
    store: &BlobCheckpointStore,
    pid: &str,
    epoch: u64,
    owner: &str,
    pos: &Pos,
    states: &ComponentStates,
) -> anyhow::Result<Option<String>> {
    // the state first: a checkpoint never points past its state
    let name = if states.is_empty() {
        None
    } else {
        Some(store.put_state(pid, epoch, owner, postcard::to_allocvec(states)?).await?)
    };
    let mut extra = BTreeMap::from([
        (store::CF_EPOCH.to_string(), epoch.to_string()),
        (store::CF_OWNER.to_string(), owner.to_string()),
    ]);
    if let Some(n) = &name {
        extra.insert(store::CF_STATE.to_string(), n.clone());
    }
    store
        .put_checkpoint(&CheckpointRecord {
            partition: pid.to_string(),
            offset: Some(pos.offset.clone()).filter(|o| !o.is_empty()),
            sequence_number: Some(pos.seq),
            extra,
        })
        .await?;
    Ok(name)
}

fn states_hash(s: &ComponentStates) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for (k, v) in s {
        h.update(k.as_bytes());
        h.update(&(v.len() as u64).to_le_bytes());
        h.update(v);
    }
    h.digest()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a partition's next owner reads is what its last owner stored: position and state
    /// together, the state object written first and named by the checkpoint.
    #[tokio::test]
    async fn checkpoint_and_state_are_stored_together() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobCheckpointStore::open(
            dir.path().to_str().unwrap(),
            &Default::default(),
            "ns.servicebus.windows.net",
            "hub",
            "$Default",
        )
        .unwrap();
        let pos = Pos { seq: 41, offset: "9000".into(), enqueued_ms: 1 };
        let states = crate::runtime::ComponentStates::from([
            ("per_minute".to_string(), vec![1, 2, 3]),
            ("other".to_string(), vec![]),
        ]);
        let name = write_checkpoint(&store, "3", 7, "inst-a", &pos, &states).await.unwrap().expect("a state object");
        let cp = store.checkpoint("3").await.unwrap().unwrap();
        assert_eq!((cp.sequence_number, cp.offset.as_deref()), (Some(41), Some("9000")));
        assert_eq!((cp.epoch(), cp.owner(), cp.state_object()), (Some(7), Some("inst-a"), Some(name.as_str())));
        let back: crate::runtime::ComponentStates =
            postcard::from_bytes(&store.get_state(&name).await.unwrap()).unwrap();
        assert_eq!(back, states);
        // without state: no object, and the checkpoint names none
        let none = write_checkpoint(&store, "3", 8, "inst-a", &pos, &Default::default()).await.unwrap();
        assert!(none.is_none());
        assert_eq!(store.checkpoint("3").await.unwrap().unwrap().state_object(), None);
    }
}
