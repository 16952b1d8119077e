//! Which partitions this instance reads: all of them (replay, or live without a checkpoint
//! store), or those it owns, claimed and given up in rounds of balancing (see `balance`), each
//! adopted with its checkpointed position and state.

use std::collections::{BTreeSet, HashMap};

use anyhow::Context;
use azure_messaging_eventhubs::{ConsumerClient, StartLocation, StartPosition};

use super::config::{system_time, Start};
use super::reader::{End, StartAt};
use super::store::{BlobCheckpointStore, OwnershipRecord};
use super::{balance, EventHubsSource, Pos, Status};
use crate::runtime::{ComponentStates, SourceCx};

impl EventHubsSource {
    /// Replay: every partition, from `--from` (or the configured start) to `--to` or its end now.
    pub(super) async fn start_replay(&mut self, cx: &mut SourceCx, client: &ConsumerClient) -> anyhow::Result<()> {
        let (from, to) = self.cfg.replay_range.unwrap_or((None, None));
        let to_ms = to.map(|t| t.div_euclid(1_000_000));
        for pid in self.partition_ids.clone() {
            let p = parse_partition(&pid)?;
            let props = client
                .get_partition_properties(&pid)
                .await
                .map_err(|e| anyhow::anyhow!("reading the properties of partition {pid}: {e}"))?;
            let last_ms = props.last_enqueued_time_utc.map(system_ms);
            let empty = props.is_empty
                || props.last_enqueued_sequence_number < 0
                || from.zip(last_ms).is_some_and(|(f, l)| l < f.div_euclid(1_000_000));
            cx.add_partition(p, ComponentStates::new()).await?;
            self.new_part(p, &pid).status = Status::Done;
            if empty {
                tracing::info!(partition = %pid, "nothing to replay in this partition");
                continue;
            }
            let start = match from {
                Some(f) => StartPosition { location: StartLocation::EnqueuedTime(system_time(f)), inclusive: true },
                None => self.cfg.start_position(),
            };
            let end = End { last_seq: props.last_enqueued_sequence_number, to_ms };
            if from.is_none() && to.is_none() && self.cfg.start == Start::Earliest {
                // the whole partition: its size is known, so the progress shows a percentage
                let n = (end.last_seq - props.beginning_sequence_number + 1).max(0) as u64;
                cx.progress.total_events.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            }
            tracing::info!(partition = %pid, last_sequence_number = end.last_seq, "replaying");
            self.spawn_reader(p, StartAt::Position(start), Some(end));
        }
        Ok(())
    }

    /// Live without a checkpoint store: every partition, from the pipeline's checkpoint or the start.
    pub(super) async fn start_all(&mut self, cx: &mut SourceCx) -> anyhow::Result<()> {
        let restored: HashMap<u32, Pos> =
            self.restored.as_ref().map(|r| r.positions.iter().cloned().collect()).unwrap_or_default();
        for pid in self.partition_ids.clone() {
            let p = parse_partition(&pid)?;
            self.new_part(p, &pid);
            let start = match restored.get(&p) {
                Some(pos) => {
                    self.parts.get_mut(&p).unwrap().last = Some(pos.clone());
                    StartAt::After(pos.seq)
                }
                None => {
                    cx.add_partition(p, ComponentStates::new()).await?;
                    StartAt::Position(self.cfg.start_position())
                }
            };
            self.spawn_reader(p, start, None);
        }
        Ok(())
    }

    /// One round of ownership renewal and balancing.
    pub(super) async fn balance(&mut self, cx: &mut SourceCx) -> anyhow::Result<()> {
        let Some(store) = self.store.clone() else { return Ok(()) };
        store.heartbeat(&self.owner).await?;
        let ownerships = store.list_ownership_records().await?;
        let instances = store.instances().await?;
        let now = now_ms();
        let expiry_ms = self.expiry.as_millis() as i64;
        // renew what we hold
        let held: Vec<u32> = self.parts.keys().copied().collect();
        for p in held {
            let Some(o) = self.parts.get(&p).and_then(|x| x.ownership.clone()) else { continue };
            match store.claim(&o.partition, &self.owner, Some(&o.etag)).await {
                Ok(Some(renewed)) => self.parts.get_mut(&p).unwrap().ownership = Some(renewed),
                Ok(None) => {
                    let now_owner = ownerships.iter().find(|x| x.partition == o.partition).map(|x| x.owner.clone());
                    self.lose(cx, p, &format!("another instance ({}) owns it now", now_owner.unwrap_or_default()))
                        .await?;
                }
                Err(e) => {
                    tracing::warn!(partition = %o.partition, "cannot renew the ownership: {e:#}");
                    if now - o.modified_ms > expiry_ms {
                        self.lose(cx, p, "its ownership expired while the store was unreachable").await?;
                    }
                }
            }
        }
        let held: BTreeSet<String> = self.parts.values().map(|p| p.pid.clone()).collect();
        let releasing: BTreeSet<String> =
            self.parts.values().filter(|p| p.status != Status::Reading).map(|p| p.pid.clone()).collect();
        let decision = balance::decide(&balance::View {
            partitions: &self.partition_ids,
            ownerships: &ownerships,
            instances: &instances,
            me: &self.owner,
            held: &held,
            releasing: &releasing,
            now_ms: now,
            expiry_ms,
        });
        for (pid, etag) in decision.claim {
            let was_mine = ownerships.iter().any(|o| o.partition == pid && o.owner == self.owner);
            match store.claim(&pid, &self.owner, etag.as_deref()).await? {
                Some(rec) => {
                    let etag = rec.etag.clone();
                    if let Err(e) = self.adopt(cx, &store, rec, was_mine).await {
                        // not read: give the claim back so that it is retried (here or elsewhere)
                        tracing::warn!(partition = %pid, "cannot start reading the partition, releasing it: {e:#}");
                        if let Some(p) =
                            pid.parse::<u32>().ok().filter(|p| self.parts.get(p).is_some_and(|x| x.task.is_none()))
                        {
                            self.parts.remove(&p);
                        }
                        let _ = store.claim(&pid, "", Some(&etag)).await;
                    }
                }
                None => tracing::debug!(partition = %pid, "another instance claimed it first"),
            }
        }
        for pid in decision.release {
            let p = parse_partition(&pid)?;
            if let Some(part) = self.parts.get_mut(&p) {
                tracing::info!(partition = %pid, instances = decision.instances, "giving the partition up to balance the load");
                part.status = Status::Releasing;
                if let Some(s) = &part.stop {
                    let _ = s.send(true);
                }
            }
        }
        if !self.balanced_once {
            // partitions of the restored checkpoint that this instance no longer reads: their
            // state moves on with the partition
            if let Some(r) = self.restored.clone() {
                for (p, _) in r.positions {
                    if !self.parts.contains_key(&p) && self.restored_used.insert(p) {
                        cx.remove_partition(p).await?;
                    }
                }
            }
            self.balanced_once = true;
        }
        self.update_health(cx);
        Ok(())
    }

    /// Starts reading a partition just claimed: position and state from its checkpoint (or from
    /// the pipeline's restored checkpoint, when that is newer and still ours).
    async fn adopt(
        &mut self,
        cx: &mut SourceCx,
        store: &BlobCheckpointStore,
        rec: OwnershipRecord,
        was_mine: bool,
    ) -> anyhow::Result<()> {
        let p = parse_partition(&rec.partition)?;
        let cp = store.checkpoint(&rec.partition).await?;
        let restored = self
            .restored
            .as_ref()
            .filter(|r| r.owner == self.owner)
            .and_then(|r| r.positions.iter().find(|(q, _)| *q == p).map(|(_, pos)| pos.clone()));
        let use_restored = match (&restored, &cp) {
            (Some(r), Some(c)) => {
                was_mine && c.owner() == Some(self.owner.as_str()) && c.sequence_number.is_none_or(|s| s <= r.seq)
            }
            (Some(_), None) => was_mine,
            (None, _) => false,
        } && !self.restored_used.contains(&p);
        let pid = rec.partition.clone();
        let part = self.new_part(p, &pid);
        part.owner_level = rec.modified_ms.max(0);
        part.ownership = Some(rec);
        part.state_object = cp.as_ref().and_then(|c| c.state_object().map(str::to_string));
        part.written = None;
        let start = if use_restored {
            let r = restored.unwrap();
            tracing::info!(partition = %pid, sequence_number = r.seq, "resuming after the pipeline's checkpoint");
            part.last = Some(r.clone());
            self.restored_used.insert(p);
            StartAt::After(r.seq)
        } else {
            let states = match cp.as_ref().and_then(|c| c.state_object()) {
                Some(name) => {
                    let bytes = store.get_state(name).await?;
                    postcard::from_bytes::<ComponentStates>(&bytes).unwrap_or_else(|e| {
                        // bad input never stops a pipeline: the partition is read on, its windows start afresh
                        tracing::error!(partition = %pid, "the stored state {name} is corrupt ({e}): starting without it");
                        ComponentStates::new()
                    })
                }
                None => ComponentStates::new(),
            };
            let part = self.parts.get_mut(&p).unwrap();
            part.last = cp.as_ref().and_then(|c| {
                c.sequence_number.map(|seq| Pos {
                    seq,
                    offset: c.offset.clone().unwrap_or_default(),
                    enqueued_ms: i64::MIN,
                })
            });
            tracing::info!(
                partition = %pid,
                sequence_number = ?cp.as_ref().and_then(|c| c.sequence_number),
                states = states.len(),
                "claimed the partition"
            );
            cx.add_partition(p, states).await?;
            self.restored_used.insert(p);
            match cp.as_ref().and_then(|c| c.sequence_number) {
                Some(s) => StartAt::After(s),
                None => StartAt::Position(self.cfg.start_position()),
            }
        };
        self.spawn_reader(p, start, None);
        Ok(())
    }

    /// The partition is no longer ours (another instance owns it): stop at once.
    pub(super) async fn lose(&mut self, cx: &mut SourceCx, p: u32, why: &str) -> anyhow::Result<()> {
        let Some(part) = self.parts.remove(&p) else { return Ok(()) };
        tracing::warn!(
            partition = %part.pid,
            "lost the partition: {why}; events read since its last checkpoint will be read again by its new owner"
        );
        if let Some(s) = &part.stop {
            let _ = s.send(true);
        }
        if let Some(t) = part.task {
            t.abort();
        }
        cx.remove_partition(p).await?;
        self.update_health(cx);
        Ok(())
    }
}

fn parse_partition(pid: &str) -> anyhow::Result<u32> {
    pid.parse().with_context(|| format!("partition id {pid:?} is not a number"))
}

fn now_ms() -> i64 {
    crate::time::now_nanos() / 1_000_000
}

fn system_ms(t: std::time::SystemTime) -> i64 {
    match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}
