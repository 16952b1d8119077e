//! One task per partition being read: its own `ConsumerClient` (one link per partition and
//! client, so a partition read again later never meets a cached link with an old start filter),
//! decoding at the edge, de-duplication by sequence number, and recovery from faults.
//!
//! After a detach, a busy server or a dropped connection the SDK re-attaches by itself with the
//! link's *original* start filter, so events already received arrive again: every event whose
//! sequence number is not above the last one passed on is dropped here. Errors that reach the
//! stream (the SDK's own retries exhausted, a refused attach) end it; the reader then opens a
//! new stream, and after repeated failures a new client, starting after the last sequence
//! number passed on, with backoff, forever. `amqp:link:stolen` (`ConsumerDisconnected`) is
//! reported to the source, which checks whether it still owns the partition.

use std::sync::Arc;
use std::time::Duration;

use azure_messaging_eventhubs::error::ErrorKind as EhErrorKind;
use azure_messaging_eventhubs::models::{AmqpSimpleValue, AmqpValue, ReceivedEventData};
use azure_messaging_eventhubs::{ConsumerClient, OpenReceiverOptions, StartLocation, StartPosition};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::event::{Event, NO_TIME};
use crate::model::decode::{decode_record_projected, Projection};

use super::Connector;

/// The position after an event: what a checkpoint stores.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pos {
    pub seq: i64,
    pub offset: String,
    /// Enqueued time, ms since the Unix epoch.
    pub enqueued_ms: i64,
}

/// Where a reader starts.
#[derive(Debug, Clone)]
pub enum StartAt {
    /// After this sequence number (a checkpoint).
    After(i64),
    /// The configured start position (no checkpoint).
    Position(StartPosition),
}

/// Where a bounded (replay) reader ends.
#[derive(Debug, Clone, Copy)]
pub struct End {
    /// The partition's last sequence number when the replay started.
    pub last_seq: i64,
    /// Events enqueued at or after this time (ms) are not read.
    pub to_ms: Option<i64>,
}

/// What a reader tells the source.
#[derive(Debug)]
pub enum Msg {
    Events {
        partition: u32,
        generation: u64,
        events: Vec<Event>,
        dead: Vec<Event>,
        last: Pos,
    },
    /// The link works (`true`) or failed (`false`, with why).
    Health {
        partition: u32,
        generation: u64,
        ok: bool,
        detail: String,
    },
    /// The link was stolen by another receiver (`amqp:link:stolen`).
    Stolen {
        partition: u32,
        generation: u64,
        detail: String,
    },
    /// The reader stopped (asked to, or its range is read): nothing more comes from it.
    Ended {
        partition: u32,
        generation: u64,
    },
}

pub struct ReaderCfg {
    pub partition: u32,
    pub generation: u64,
    pub start: StartAt,
    pub end: Option<End>,
    pub prefetch: u32,
    pub owner_level: Option<i64>,
    pub batch_size: usize,
    pub linger: Duration,
    pub projection: Option<Arc<Projection>>,
    pub component: Arc<str>,
    pub connector: Arc<Connector>,
}

enum StreamEnd {
    Stop,
    Finished,
    Stolen(String),
    Failed(String),
    /// The stream ended without an error (re-open it).
    Closed,
    /// The SDK re-attached from the link's original position: open a new link after the last
    /// event instead of receiving everything since that position again.
    Replaying,
}

/// Reads one partition until stopped (or until its end, for a replay).
pub async fn read(cfg: ReaderCfg, tx: mpsc::Sender<Msg>, mut stop: watch::Receiver<bool>) {
    let (p, g) = (cfg.partition, cfg.generation);
    let origin: Arc<str> = format!("partition {p}").into();
    let mut last: Option<i64> = match cfg.start {
        StartAt::After(s) => Some(s),
        StartAt::Position(_) => None,
    };
    let mut backoff = Duration::from_millis(100);
    let mut healthy: Option<bool> = None;
    let mut failures = 0u32;
    let mut skipped = 0u64;
    'client: loop {
        if *stop.borrow() {
            break;
        }
        let client = tokio::select! {
            _ = stop.changed() => break 'client,
            c = cfg.connector.open() => c,
        };
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                let detail = crate::secret::redact(&format!("connecting: {e:#}"));
                report_health(&tx, p, g, &mut healthy, false, detail).await;
                if pause(&mut stop, &mut backoff).await {
                    break;
                }
                continue;
            }
        };
        let start = match (last, &cfg.start) {
            (Some(s), _) => StartPosition { location: StartLocation::SequenceNumber(s), inclusive: false },
            (None, StartAt::Position(sp)) => sp.clone(),
            (None, StartAt::After(s)) => {
                StartPosition { location: StartLocation::SequenceNumber(*s), inclusive: false }
            }
        };
        let opts = OpenReceiverOptions {
            owner_level: cfg.owner_level,
            prefetch: Some(cfg.prefetch),
            start_position: Some(start),
            receive_timeout: None,
        };
        let receiver = match client.open_receiver_on_partition(p.to_string(), Some(opts)).await {
            Ok(r) => r,
            Err(e) => {
                report_health(&tx, p, g, &mut healthy, false, format!("opening the receiver: {e}")).await;
                close_client(client).await;
                if pause(&mut stop, &mut backoff).await {
                    break;
                }
                continue;
            }
        };
        // streams on this receiver; the SDK re-attaches its link by itself
        let outcome = 'stream: loop {
            let stream = receiver.stream_events();
            futures::pin_mut!(stream);
            let mut events: Vec<Event> = Vec::with_capacity(cfg.batch_size);
            let mut dead: Vec<Event> = Vec::new();
            let mut pos: Option<Pos> = None;
            let mut deadline: Option<tokio::time::Instant> = None;
            // the attach happens on the first poll: call the link healthy when nothing failed for a while
            let settle = tokio::time::sleep(Duration::from_millis(if healthy == Some(true) { 0 } else { 1500 }));
            tokio::pin!(settle);
            let mut settled = healthy == Some(true);
            let end = loop {
                let linger = crate::time::sleep_until_or_never(deadline);
                tokio::select! {
                    biased;
                    _ = stop.changed() => break StreamEnd::Stop,
                    _ = linger => {
                        if send_batch(&tx, p, g, &mut events, &mut dead, &mut pos).await.is_err() { break StreamEnd::Stop }
                        deadline = None;
                    }
                    _ = &mut settle, if !settled => {
                        settled = true;
                        failures = 0;
                        backoff = Duration::from_millis(100);
                        report_health(&tx, p, g, &mut healthy, true, "receiving".into()).await;
                    }
                    item = stream.next() => match item {
                        Some(Ok(ev)) => {
                            if !settled {
                                settled = true;
                                failures = 0;
                                backoff = Duration::from_millis(100);
                                report_health(&tx, p, g, &mut healthy, true, "receiving".into()).await;
                            }
                            let seq = ev.sequence_number().unwrap_or(-1);
                            if let Some(l) = last.filter(|l| seq <= *l) {
                                // the SDK re-attached with its original start filter: seen already
                                skipped += 1;
                                if l - seq > 2 * cfg.prefetch as i64 {
                                    tracing::info!(partition = p, sequence_number = l, "the link was re-attached from its first position: opening a new one after the last event read");
                                    break StreamEnd::Replaying;
                                }
                                if skipped == 1 || skipped % 10_000 == 0 {
                                    tracing::debug!(partition = p, skipped, "dropping events received again after a re-attach");
                                }
                                continue;
                            }
                            let enqueued_ms = ev.enqueued_time().map(system_ms).unwrap_or(i64::MIN);
                            if let Some(e) = cfg.end {
                                if seq > e.last_seq || e.to_ms.is_some_and(|t| enqueued_ms >= t) {
                                    break StreamEnd::Finished;
                                }
                            }
                            last = Some(seq);
                            let at = convert(&ev, p, seq, enqueued_ms, &cfg, &origin, &mut events, &mut dead);
                            pos = Some(at);
                            if deadline.is_none() {
                                deadline = Some(tokio::time::Instant::now() + cfg.linger);
                            }
                            if events.len() >= cfg.batch_size {
                                if send_batch(&tx, p, g, &mut events, &mut dead, &mut pos).await.is_err() { break StreamEnd::Stop }
                                deadline = None;
                            }
                            if cfg.end.is_some_and(|e| seq >= e.last_seq) {
                                break StreamEnd::Finished;
                            }
                        }
                        Some(Err(e)) => {
                            if matches!(e.kind, EhErrorKind::ConsumerDisconnected(_)) {
                                break StreamEnd::Stolen(e.to_string());
                            }
                            break StreamEnd::Failed(crate::secret::redact(&e.to_string()));
                        }
                        None => break StreamEnd::Closed,
                    }
                }
            };
            let _ = send_batch(&tx, p, g, &mut events, &mut dead, &mut pos).await;
            match end {
                StreamEnd::Failed(detail) => {
                    failures += 1;
                    report_health(&tx, p, g, &mut healthy, false, detail).await;
                    if pause(&mut stop, &mut backoff).await {
                        break 'stream StreamEnd::Stop;
                    }
                    if failures >= 3 {
                        // a fresh client after repeated failures
                        break 'stream StreamEnd::Closed;
                    }
                }
                StreamEnd::Closed => {}
                other => break 'stream other,
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), receiver.close()).await;
        close_client(client).await;
        match outcome {
            StreamEnd::Stolen(detail) => {
                let _ = tx.send(Msg::Stolen { partition: p, generation: g, detail }).await;
                return;
            }
            StreamEnd::Stop | StreamEnd::Finished => break,
            StreamEnd::Closed | StreamEnd::Failed(_) | StreamEnd::Replaying => continue,
        }
    }
    let _ = tx.send(Msg::Ended { partition: p, generation: g }).await;
}

async fn close_client(client: ConsumerClient) {
    let _ = tokio::time::timeout(Duration::from_secs(5), client.close()).await;
}

/// Waits `backoff` (doubling it, up to 10 s) unless asked to stop; true when stopping.
async fn pause(stop: &mut watch::Receiver<bool>, backoff: &mut Duration) -> bool {
    let d = *backoff;
    *backoff = (*backoff * 2).min(Duration::from_secs(10));
    tokio::select! {
        _ = stop.changed() => true,
        _ = tokio::time::sleep(d) => *stop.borrow(),
    }
}

async fn report_health(
    tx: &mpsc::Sender<Msg>,
    partition: u32,
    generation: u64,
    healthy: &mut Option<bool>,
    ok: bool,
    detail: String,
) {
    if *healthy == Some(ok) && ok {
        return;
    }
    *healthy = Some(ok);
    let _ = tx.send(Msg::Health { partition, generation, ok, detail }).await;
}

async fn send_batch(
    tx: &mpsc::Sender<Msg>,
    partition: u32,
    generation: u64,
    events: &mut Vec<Event>,
    dead: &mut Vec<Event>,
    pos: &mut Option<Pos>,
) -> Result<(), ()> {
    let Some(last) = pos.take() else { return Ok(()) };
    let msg = Msg::Events { partition, generation, events: std::mem::take(events), dead: std::mem::take(dead), last };
    tx.send(msg).await.map_err(|_| ())
}

fn system_ms(t: std::time::SystemTime) -> i64 {
    match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

/// Decodes one event into `events` (or `dead`), with its metadata; returns its position.
#[allow(clippy::too_many_arguments)]
fn convert(
    ev: &ReceivedEventData,
    partition: u32,
    seq: i64,
    enqueued_ms: i64,
    cfg: &ReaderCfg,
    origin: &Arc<str>,
    events: &mut Vec<Event>,
    dead: &mut Vec<Event>,
) -> Pos {
    let offset = ev.offset().clone().unwrap_or_default();
    let body = Bytes::copy_from_slice(ev.event_data().body().unwrap_or_default());
    let mut attrs: Vec<(Box<str>, String)> = Vec::with_capacity(8);
    attrs.push(("x-opt-sequence-number".into(), seq.to_string()));
    attrs.push(("x-opt-offset".into(), offset.clone()));
    if enqueued_ms != i64::MIN {
        attrs.push(("x-opt-enqueued-time".into(), crate::time::format_rfc3339(enqueued_ms * 1_000_000)));
    }
    if let Some(k) = ev.partition_key() {
        attrs.push(("x-opt-partition-key".into(), k.clone()));
    }
    // IoT Central puts iotcentral-* in the annotations or the application properties (docs name both)
    let mut annotations: Vec<(&String, &AmqpValue)> = ev
        .system_properties()
        .iter()
        .filter(|(k, _)| k.starts_with("iotcentral-") || k.starts_with("x-opt-"))
        .collect();
    annotations.sort_by(|a, b| a.0.cmp(b.0));
    for (k, v) in annotations {
        if !attrs.iter().any(|(a, _)| **a == **k) {
            attrs.push((k.as_str().into(), amqp_value_string(v)));
        }
    }
    if let Some(props) = ev.event_data().properties() {
        let mut props: Vec<(&String, &AmqpSimpleValue)> =
            props.iter().filter(|(k, _)| k.starts_with("iotcentral-")).collect();
        props.sort_by(|a, b| a.0.cmp(b.0));
        for (k, v) in props {
            if !attrs.iter().any(|(a, _)| **a == **k) {
                attrs.push((k.as_str().into(), simple_value_string(v)));
            }
        }
    }
    let enqueued = if enqueued_ms == i64::MIN { NO_TIME } else { enqueued_ms * 1_000_000 };
    let mut out = Vec::with_capacity(1);
    decode_record_projected(body.clone(), cfg.projection.as_ref(), &mut out);
    let dl_origin = || format!("partition {partition} seq {seq}");
    if !out.iter().any(|r| r.is_ok()) {
        let reason = out.iter().find_map(|r| r.as_ref().err().cloned()).unwrap_or_else(|| "empty event body".into());
        dead.push(Event::dead_letter(body, &reason, &dl_origin(), &cfg.component));
    } else {
        for r in out {
            match r {
                Ok(mut e) => {
                    e.meta.partition = partition;
                    e.meta.offset = seq;
                    e.meta.enqueued = enqueued;
                    e.meta.origin = Some(origin.clone());
                    e.meta.attrs = attrs.clone();
                    events.push(e);
                }
                Err(reason) => dead.push(Event::dead_letter(body.clone(), &reason, &dl_origin(), &cfg.component)),
            }
        }
    }
    Pos { seq, offset, enqueued_ms }
}

fn amqp_value_string(v: &AmqpValue) -> String {
    match v {
        AmqpValue::String(s) => s.clone(),
        AmqpValue::Symbol(s) => format!("{s:?}").trim_matches('"').to_string(),
        AmqpValue::Boolean(b) => b.to_string(),
        AmqpValue::Long(n) => n.to_string(),
        AmqpValue::Int(n) => n.to_string(),
        AmqpValue::ULong(n) => n.to_string(),
        AmqpValue::UInt(n) => n.to_string(),
        AmqpValue::Double(n) => n.to_string(),
        AmqpValue::TimeStamp(t) => format!("{t:?}"),
        other => format!("{other:?}"),
    }
}

fn simple_value_string(v: &AmqpSimpleValue) -> String {
    match v {
        AmqpSimpleValue::String(s) => s.clone(),
        AmqpSimpleValue::Boolean(b) => b.to_string(),
        AmqpSimpleValue::Long(n) => n.to_string(),
        AmqpSimpleValue::Int(n) => n.to_string(),
        AmqpSimpleValue::ULong(n) => n.to_string(),
        AmqpSimpleValue::UInt(n) => n.to_string(),
        AmqpSimpleValue::Double(n) => n.to_string(),
        other => format!("{other:?}"),
    }
}
