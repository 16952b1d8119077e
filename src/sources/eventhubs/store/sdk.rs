//! The Event Hubs checkpoint store as the Azure SDK's `CheckpointStore`, so that the SDK's own
//! `EventProcessor` can use the same layout.

use std::collections::BTreeMap;

use azure_messaging_eventhubs::models::{Checkpoint, Ownership};

use super::{BlobCheckpointStore, CheckpointRecord};

fn az_err(e: anyhow::Error) -> azure_core::Error {
    azure_core::Error::with_message(azure_core::error::ErrorKind::Io, format!("{e:#}"))
}

fn offset_date_time(ms: i64) -> Option<azure_core::time::OffsetDateTime> {
    azure_core::time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000).ok()
}

/// The store also serves the SDK's own `EventProcessor` (same layout, same semantics: claims
/// that lose a race are left out of the result).
#[async_trait::async_trait]
impl azure_messaging_eventhubs::CheckpointStore for BlobCheckpointStore {
    async fn claim_ownership(&self, ownerships: &[Ownership]) -> azure_core::Result<Vec<Ownership>> {
        let mut out = Vec::new();
        for o in ownerships {
            let etag = o.etag.as_ref().map(|e| e.to_string());
            let claimed = self
                .claim(&o.partition_id, o.owner_id.as_deref().unwrap_or(""), etag.as_deref())
                .await
                .map_err(az_err)?;
            if let Some(c) = claimed {
                let mut o = o.clone();
                o.etag = Some(c.etag.into());
                o.last_modified_time = offset_date_time(c.modified_ms);
                out.push(o);
            }
        }
        Ok(out)
    }

    async fn list_checkpoints(
        &self,
        namespace: &str,
        event_hub_name: &str,
        consumer_group: &str,
    ) -> azure_core::Result<Vec<Checkpoint>> {
        let records = self.list_checkpoint_records().await.map_err(az_err)?;
        Ok(records
            .into_iter()
            .map(|r| Checkpoint {
                fully_qualified_namespace: namespace.to_string(),
                event_hub_name: event_hub_name.to_string(),
                consumer_group: consumer_group.to_string(),
                partition_id: r.partition,
                offset: r.offset,
                sequence_number: r.sequence_number,
            })
            .collect())
    }

    async fn list_ownerships(
        &self,
        namespace: &str,
        event_hub_name: &str,
        consumer_group: &str,
    ) -> azure_core::Result<Vec<Ownership>> {
        let records = self.list_ownership_records().await.map_err(az_err)?;
        Ok(records
            .into_iter()
            .map(|r| Ownership {
                fully_qualified_namespace: namespace.to_string(),
                event_hub_name: event_hub_name.to_string(),
                consumer_group: consumer_group.to_string(),
                partition_id: r.partition,
                owner_id: Some(r.owner),
                etag: Some(r.etag.into()),
                last_modified_time: offset_date_time(r.modified_ms),
            })
            .collect())
    }

    async fn update_checkpoint(&self, checkpoint: Checkpoint) -> azure_core::Result<()> {
        let rec = CheckpointRecord {
            partition: checkpoint.partition_id,
            offset: checkpoint.offset,
            sequence_number: checkpoint.sequence_number,
            extra: BTreeMap::new(),
        };
        self.put_checkpoint(&rec).await.map_err(az_err)
    }
}
