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
use azure_messaging_eventhubs::{ConsumerClient, EventReceiver, OpenReceiverOptions, StartLocation, StartPosition};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::event::{Event, NO_TIME};
use crate::model::decode::Projection;
use crate::model::format::MessageDecoder;
use crate::model::generic::Transport;

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
    pub decoder: Arc<MessageDecoder>,
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
pub async fn read(cfg: ReaderCfg, tx: mpsc::Sender<Msg>, stop: watch::Receiver<bool>) {
    let (p, g) = (cfg.partition, cfg.generation);
    let mut r = Reader::new(cfg, tx, stop);
    loop {
        if *r.stop.borrow() {
            break;
        }
        let (client, receiver) = match r.connect().await {
            Ok(opened) => opened,
            Err(Retry::Again) => continue,
            Err(Retry::Stop) => break,
        };
        let outcome = r.stream(&receiver).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), receiver.close()).await;
        close_client(client).await;
        match outcome {
            StreamEnd::Stolen(detail) => {
                let _ = r.tx.send(Msg::Stolen { partition: p, generation: g, detail }).await;
                return;
            }
            StreamEnd::Stop | StreamEnd::Finished => break,
            StreamEnd::Closed | StreamEnd::Failed(_) | StreamEnd::Replaying => continue,
        }
    }
    let _ = r.tx.send(Msg::Ended { partition: p, generation: g }).await;
}

/// After a failed attempt to open a client or a receiver (reported, backoff waited).
enum Retry {
    Again,
    Stop,
}

/// One partition's reader: its settings, and what it keeps across clients and streams.
struct Reader {
    cfg: ReaderCfg,
    tx: mpsc::Sender<Msg>,
    stop: watch::Receiver<bool>,
    origin: Arc<str>,
    /// The sequence number of the last event passed on (or of the checkpoint).
    last: Option<i64>,
    backoff: Duration,
    /// The health last reported.
    healthy: Option<bool>,
    /// Stream failures since the link last worked.
    failures: u32,
    /// Events dropped as received again after a re-attach.
    skipped: u64,
}

/// What a stream has received and not yet passed on, with the position after it and the time
/// it must go out by.
struct Pending {
    events: Vec<Event>,
    dead: Vec<Event>,
    pos: Option<Pos>,
    deadline: Option<tokio::time::Instant>,
}

impl Reader {
    fn new(cfg: ReaderCfg, tx: mpsc::Sender<Msg>, stop: watch::Receiver<bool>) -> Reader {
        let origin: Arc<str> = format!("partition {}", cfg.partition).into();
        let last = match cfg.start {
            StartAt::After(s) => Some(s),
            StartAt::Position(_) => None,
        };
        Reader {
            cfg,
            tx,
            stop,
            origin,
            last,
            backoff: Duration::from_millis(100),
            healthy: None,
            failures: 0,
            skipped: 0,
        }
    }

    /// Opens a client and a receiver on the partition, after the last event passed on. A
    /// failure is reported and the backoff waited.
    async fn connect(&mut self) -> Result<(ConsumerClient, EventReceiver), Retry> {
        let client = tokio::select! {
            _ = self.stop.changed() => return Err(Retry::Stop),
            c = self.cfg.connector.open() => c,
        };
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                let detail = crate::secret::redact(&format!("connecting: {e:#}"));
                self.report_health(false, detail).await;
                return Err(self.retry().await);
            }
        };
        let opts = OpenReceiverOptions {
            owner_level: self.cfg.owner_level,
            prefetch: Some(self.cfg.prefetch),
            start_position: Some(self.start_position()),
            receive_timeout: None,
        };
        let open = self.cfg.connector.bounded("opening the receiver", async {
            client
                .open_receiver_on_partition(self.cfg.partition.to_string(), Some(opts))
                .await
                .map_err(|e| anyhow::anyhow!("opening the receiver: {e}"))
        });
        match open.await {
            Ok(r) => Ok((client, r)),
            Err(e) => {
                self.report_health(false, format!("{e:#}")).await;
                close_client(client).await;
                Err(self.retry().await)
            }
        }
    }

    /// Where a new receiver starts: after the last event passed on, else where configured.
    fn start_position(&self) -> StartPosition {
        match (self.last, &self.cfg.start) {
            (Some(s), _) => StartPosition { location: StartLocation::SequenceNumber(s), inclusive: false },
            (None, StartAt::Position(sp)) => sp.clone(),
            (None, StartAt::After(s)) => {
                StartPosition { location: StartLocation::SequenceNumber(*s), inclusive: false }
            }
        }
    }

    /// Waits the backoff (see [`pause`]).
    async fn retry(&mut self) -> Retry {
        if pause(&mut self.stop, &mut self.backoff).await {
            Retry::Stop
        } else {
            Retry::Again
        }
    }

    /// Streams from `receiver` (the SDK re-attaches its link by itself), opening a new stream
    /// after one that closed or failed, until the receiver must go: `Closed` then asks for a
    /// fresh client (after repeated failures).
    async fn stream(&mut self, receiver: &EventReceiver) -> StreamEnd {
        loop {
            match self.receive(receiver).await {
                StreamEnd::Failed(detail) => {
                    self.failures += 1;
                    self.report_health(false, detail).await;
                    if pause(&mut self.stop, &mut self.backoff).await {
                        return StreamEnd::Stop;
                    }
                    if self.failures >= 3 {
                        // a fresh client after repeated failures
                        return StreamEnd::Closed;
                    }
                }
                StreamEnd::Closed => {}
                other => return other,
            }
        }
    }

    /// Receives one stream of `receiver` until it ends, passing events on in batches.
    async fn receive(&mut self, receiver: &EventReceiver) -> StreamEnd {
        let stream = receiver.stream_events();
        futures::pin_mut!(stream);
        let mut out =
            Pending { events: Vec::with_capacity(self.cfg.batch_size), dead: Vec::new(), pos: None, deadline: None };
        // the attach happens on the first poll: call the link healthy when nothing failed for a while
        let settle = tokio::time::sleep(Duration::from_millis(if self.healthy == Some(true) { 0 } else { 1500 }));
        tokio::pin!(settle);
        let mut settled = self.healthy == Some(true);
        let end = loop {
            let linger = crate::time::sleep_until_or_never(out.deadline);
            tokio::select! {
                biased;
                _ = self.stop.changed() => break StreamEnd::Stop,
                _ = linger => {
                    if self.flush(&mut out).await.is_err() { break StreamEnd::Stop }
                    out.deadline = None;
                }
                _ = &mut settle, if !settled => {
                    settled = true;
                    self.settled().await;
                }
                item = stream.next() => match item {
                    Some(Ok(ev)) => {
                        if !settled {
                            settled = true;
                            self.settled().await;
                        }
                        if let Some(end) = self.on_event(&ev, &mut out).await {
                            break end;
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
        let _ = self.flush(&mut out).await;
        end
    }

    /// The link works: the failures and the backoff start again, and the health says so.
    async fn settled(&mut self) {
        self.failures = 0;
        self.backoff = Duration::from_millis(100);
        self.report_health(true, "receiving".into()).await;
    }

    /// Takes one received event into `out` (sending the batch when it is full), or drops it as
    /// received again; `Some` when the stream must end.
    async fn on_event(&mut self, ev: &ReceivedEventData, out: &mut Pending) -> Option<StreamEnd> {
        let p = self.cfg.partition;
        let seq = ev.sequence_number().unwrap_or(-1);
        if let Some(l) = self.last.filter(|l| seq <= *l) {
            // the SDK re-attached with its original start filter: seen already
            self.skipped += 1;
            if l - seq > 2 * self.cfg.prefetch as i64 {
                tracing::info!(
                    partition = p,
                    sequence_number = l,
                    "the link was re-attached from its first position: opening a new one after the last event read"
                );
                return Some(StreamEnd::Replaying);
            }
            if self.skipped == 1 || self.skipped % 10_000 == 0 {
                tracing::debug!(
                    partition = p,
                    skipped = self.skipped,
                    "dropping events received again after a re-attach"
                );
            }
            return None;
        }
        let enqueued_ms = ev.enqueued_time().map(system_ms).unwrap_or(i64::MIN);
        if let Some(e) = self.cfg.end {
            if seq > e.last_seq || e.to_ms.is_some_and(|t| enqueued_ms >= t) {
                return Some(StreamEnd::Finished);
            }
        }
        self.last = Some(seq);
        let at = convert(ev, p, seq, enqueued_ms, &self.cfg, &self.origin, &mut out.events, &mut out.dead);
        out.pos = Some(at);
        if out.deadline.is_none() {
            out.deadline = Some(tokio::time::Instant::now() + self.cfg.linger);
        }
        if out.events.len() >= self.cfg.batch_size {
            if self.flush(out).await.is_err() {
                return Some(StreamEnd::Stop);
            }
            out.deadline = None;
        }
        if self.cfg.end.is_some_and(|e| seq >= e.last_seq) {
            return Some(StreamEnd::Finished);
        }
        None
    }

    /// Passes on what `out` holds, if anything.
    async fn flush(&self, out: &mut Pending) -> Result<(), ()> {
        let (p, g) = (self.cfg.partition, self.cfg.generation);
        send_batch(&self.tx, p, g, &mut out.events, &mut out.dead, &mut out.pos).await
    }

    /// Reports the link's health (see [`report_health`]).
    async fn report_health(&mut self, ok: bool, detail: String) {
        report_health(&self.tx, self.cfg.partition, self.cfg.generation, &mut self.healthy, ok, detail).await;
    }
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
    let mut attrs: Vec<(crate::event::AttrKey, String)> = Vec::with_capacity(8);
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
            attrs.push((crate::event::attr_key(k), amqp_value_string(v)));
        }
    }
    if let Some(props) = ev.event_data().properties() {
        let mut props: Vec<(&String, &AmqpSimpleValue)> =
            props.iter().filter(|(k, _)| k.starts_with("iotcentral-")).collect();
        props.sort_by(|a, b| a.0.cmp(b.0));
        for (k, v) in props {
            if !attrs.iter().any(|(a, _)| **a == **k) {
                attrs.push((crate::event::attr_key(k), simple_value_string(v)));
            }
        }
    }
    let enqueued = if enqueued_ms == i64::MIN { NO_TIME } else { enqueued_ms * 1_000_000 };
    let transport = Transport { enqueued, device_id: crate::sources::message::transport_device(&attrs) };
    let out = cfg.decoder.decode(body.clone(), cfg.projection.as_ref(), &transport);
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
