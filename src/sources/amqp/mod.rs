//! `amqp`: consumes export messages from an AMQP 0-9-1 queue (RabbitMQ), with no loss and no
//! duplicates across connection faults and crashes.
//!
//! Acknowledgements wait for the checkpoint that covers a delivery: at `Commit(n)` the source
//! acknowledges (`multiple`) up to the last delivery before barrier `n` and commits the
//! channel's transaction (`tx.commit`): once the broker answers, it has the acknowledgement. A
//! passive queue declaration then reads the queue depth for the lag metric.
//!
//! Delivery tags die with a channel, so after a reconnect every unacknowledged delivery comes
//! back (`redelivered`). The source remembers which messages it has processed but not yet had
//! acknowledged (by a 128-bit hash of message id and body, counted, so that two identical
//! messages stay two): a redelivered message whose copies are all accounted for is not processed
//! again, only acknowledged at the next checkpoint. That memory is part of the checkpoint, so a
//! restarted process skips the redeliveries of what the restored state already contains.
//! Messages delivered for the first time are never skipped.
//!
//! A message that cannot be decoded goes to the source's `dead_letter` output at once. It is
//! published, with the reason and its origin in headers, to the queue's dead-letter exchange
//! when it has one, else to a dead-letter queue (`{queue}.dead-letter` unless configured), at
//! the commit of the checkpoint that holds its record, in one AMQP transaction with that
//! commit's acknowledgements (the channel is in `tx.select` mode). (Published and acknowledged
//! at receipt, a crash before that checkpoint lost the record; published with confirms before
//! the acknowledgement, a crash between them published it twice.) It is remembered like a
//! processed message, with its reason, so a copy redelivered after a crash is published again
//! without a second record. (RabbitMQ makes a transaction atomic only within one queue, so a
//! broker crash during `tx.commit` could still lose or repeat a dead letter.) It never blocks
//! the queue.
//!
//! The connection is re-established with backoff, forever; the state shows in logs, in the
//! `source_connected` metric and in `/health/ready`.
//!
//! The YAML configuration and its checks are in `config`.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};
use serde::{Deserialize, Serialize};

use crate::event::{Batch, Event};
use crate::metrics;
use crate::model::decode::Projection;
use crate::model::format::MessageDecoder;
use crate::model::generic::Transport;
use crate::runtime::{BuildCx, Control, EndReason, Mode, Source, SourceCx};
pub use config::{AmqpConfig, Binding, Declare};

mod config;

/// What a checkpoint keeps: hashes of processed, not yet acknowledged messages, with counts.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct State {
    processed: Vec<(u128, u32)>,
    /// Of those, the messages to dead-letter: (hash, reason, origin).
    dead: Vec<(u128, String, String)>,
}

/// A checkpoint written before dead letters were published at the commit (no `dead`).
#[derive(Deserialize)]
struct StateV1 {
    processed: Vec<(u128, u32)>,
}

impl State {
    fn decode(bytes: &[u8]) -> Result<State, postcard::Error> {
        crate::sources::message::decode_state(bytes, |v1: StateV1| State { processed: v1.processed, dead: Vec::new() })
    }
}

/// A delivery on the current channel to dead-letter at the commit that covers it, with its
/// reason and origin.
struct ToDeadLetter {
    tag: u64,
    body: Vec<u8>,
    props: BasicProperties,
    reason: String,
    origin: String,
}

/// A processed message not known to be acknowledged: its copies, and when one was last seen (in
/// commits made while connected, and in Unix ms).
#[derive(Debug, Clone, Copy)]
struct Seen {
    copies: u32,
    commit: u64,
    at_ms: i64,
}

/// A processed message not seen again for this many commits made while connected and this
/// long is forgotten (its acknowledgement took effect without being confirmed, or it was
/// restored from a checkpoint taken before its acknowledgement): long enough for the broker to
/// requeue what a dead connection held, which it may notice only at missed heartbeats (so at
/// least three of the connection's heartbeat intervals).
const FORGET_COMMITS: u64 = 10;
const FORGET_MS: i64 = 5 * 60 * 1000;

/// A barrier: the last delivery before it, on which channel.
#[derive(Debug, Clone, Copy)]
struct Mark {
    epoch: u64,
    generation: u64,
    tag: u64,
}

struct Link {
    conn: Connection,
    /// In transaction mode (`tx.select`): dead letters and acknowledgements are committed
    /// together.
    channel: Channel,
    consumer: Consumer,
}

pub struct AmqpSource {
    cfg: AmqpConfig,
    /// The connection; kept after the stream ends so that the final checkpoint can be
    /// acknowledged on the channel its deliveries came on.
    link: Option<Link>,
    name: String,
    projection: Option<Arc<Projection>>,
    decoder: MessageDecoder,
    linger: Duration,
    /// See [`AmqpConfig::quiet_checkpoint`]; `None` when turned off.
    quiet: Option<Duration>,
    /// Processed messages not yet acknowledged (confirmed).
    processed: HashMap<u128, Seen>,
    /// Deliveries on the current channel not yet acknowledged: (tag, hash of a processed message).
    delivered: VecDeque<(u64, Option<u128>)>,
    /// Per hash, deliveries on the current channel that stand for processed copies.
    outstanding: HashMap<u128, u32>,
    /// Processed messages that go to the dead-letter queue: hash -> (reason, origin).
    dead_notes: HashMap<u128, (String, String)>,
    /// Deliveries on the current channel to dead-letter at their commit.
    to_dead_letter: VecDeque<ToDeadLetter>,
    /// Commits made while connected (the age of what is remembered).
    commits: u64,
    /// How long what is remembered lasts unseen ([`FORGET_MS`], or three heartbeats).
    forget_ms: i64,
    generation: u64,
    last_tag: u64,
    acked_to: u64,
    marks: VecDeque<Mark>,
    asked_checkpoint: bool,
    dead_letter_exchange: Option<String>,
    dead_letter_queue: String,
    skipped: u64,
    /// Messages settled with the broker.
    committed: prometheus_client::metrics::counter::Counter,
}

impl AmqpSource {
    pub fn new(cfg: AmqpConfig, cx: &BuildCx<'_>) -> anyhow::Result<AmqpSource> {
        if cx.mode == Mode::Replay {
            anyhow::bail!("an amqp source never ends: use `centralflow run`, not `replay`");
        }
        let mut processed = HashMap::new();
        let mut dead_notes = HashMap::new();
        if let Some(state) = cx.restored.as_deref().filter(|s| !s.is_empty()) {
            let st = State::decode(state).context("amqp source state in the checkpoint is corrupt")?;
            let at_ms = crate::time::now_nanos() / 1_000_000;
            processed = st.processed.into_iter().map(|(h, n)| (h, Seen { copies: n, commit: 0, at_ms })).collect();
            dead_notes = st.dead.into_iter().map(|(h, r, o)| (h, (r, o))).collect();
        }
        let linger = cfg.linger.get()?;
        let quiet = Some(cfg.quiet_checkpoint.get()?).filter(|d| !d.is_zero());
        let dead_letter_exchange = cfg
            .dead_letter_exchange
            .clone()
            .or_else(|| cfg.declare.as_ref().and_then(|d| d.dead_letter_exchange.clone()));
        let dead_letter_queue = cfg.dead_letter_queue.clone().unwrap_or_else(|| format!("{}.dead-letter", cfg.queue));
        Ok(AmqpSource {
            link: None,
            name: cx.name.to_string(),
            projection: cx.projection.clone(),
            decoder: crate::sources::message::decoder(cfg.format, cfg.time.as_deref(), cfg.device_id.as_deref())?,
            linger,
            quiet,
            processed,
            delivered: VecDeque::new(),
            outstanding: HashMap::new(),
            dead_notes,
            to_dead_letter: VecDeque::new(),
            commits: 0,
            forget_ms: FORGET_MS,
            generation: 0,
            last_tag: 0,
            acked_to: 0,
            marks: VecDeque::new(),
            asked_checkpoint: false,
            dead_letter_exchange,
            dead_letter_queue,
            committed: cx.metrics.committed.clone(),
            skipped: 0,
            cfg,
        })
    }

    async fn connect(&self) -> anyhow::Result<Link> {
        let props = ConnectionProperties::default().with_connection_name(format!("centralflow {}", self.name).into());
        let conn = Connection::connect(self.cfg.url.expose(), props).await.context("connecting")?;
        let channel = conn.create_channel().await.context("opening a channel")?;
        channel.basic_qos(self.cfg.prefetch, BasicQosOptions::default()).await.context("basic.qos")?;
        // a checkpoint's dead letters and acknowledgements take effect together (tx.commit), so a
        // crash between them neither loses a dead letter nor publishes one twice
        channel.tx_select().await.context("tx.select")?;
        let q: ShortString = self.cfg.queue.as_str().into();
        if let Some(d) = &self.cfg.declare {
            let mut args = FieldTable::default();
            if let Some(dlx) = &d.dead_letter_exchange {
                args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(dlx.as_str().into()));
                channel
                    .exchange_declare(
                        dlx.as_str().into(),
                        ExchangeKind::Fanout,
                        durable_exchange(),
                        FieldTable::default(),
                    )
                    .await
                    .with_context(|| format!("declaring the dead-letter exchange {dlx}"))?;
                let dlq = format!("{}.dead-letter", self.cfg.queue);
                channel
                    .queue_declare(dlq.as_str().into(), durable_queue(true), FieldTable::default())
                    .await
                    .with_context(|| format!("declaring {dlq}"))?;
                channel
                    .queue_bind(
                        dlq.as_str().into(),
                        dlx.as_str().into(),
                        "#".into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
            }
            channel
                .queue_declare(q.clone(), durable_queue(d.durable), args)
                .await
                .with_context(|| format!("declaring queue {}", self.cfg.queue))?;
            for b in &d.bindings {
                let kind = match b.exchange_type.as_str() {
                    "direct" => ExchangeKind::Direct,
                    "fanout" => ExchangeKind::Fanout,
                    "headers" => ExchangeKind::Headers,
                    _ => ExchangeKind::Topic,
                };
                channel
                    .exchange_declare(b.exchange.as_str().into(), kind, durable_exchange(), FieldTable::default())
                    .await
                    .with_context(|| format!("declaring exchange {}", b.exchange))?;
                channel
                    .queue_bind(
                        q.clone(),
                        b.exchange.as_str().into(),
                        b.routing_key.as_str().into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
            }
        }
        match &self.dead_letter_exchange {
            None => {
                channel
                    .queue_declare(self.dead_letter_queue.as_str().into(), durable_queue(true), FieldTable::default())
                    .await
                    .with_context(|| format!("declaring the dead-letter queue {}", self.dead_letter_queue))?;
            }
            // a dead letter published to an exchange that does not exist closes the channel at
            // every commit: said here, at once, instead
            Some(dlx) => {
                let passive = ExchangeDeclareOptions { passive: true, ..Default::default() };
                channel
                    .exchange_declare(dlx.as_str().into(), ExchangeKind::Fanout, passive, FieldTable::default())
                    .await
                    .with_context(|| format!("the dead-letter exchange {dlx} does not exist"))?;
            }
        }
        let consumer = channel
            .basic_consume(
                q,
                self.cfg.consumer_tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("consuming from {}", self.cfg.queue))?;
        Ok(Link { conn, channel, consumer })
    }

    /// The barrier mark: the last delivery still to acknowledge (acknowledging an acknowledged
    /// tag closes the channel).
    fn mark(&self, epoch: u64) -> Mark {
        let tag = self.delivered.back().map(|d| d.0).unwrap_or(self.acked_to);
        Mark { epoch, generation: self.generation, tag }
    }

    fn snapshot_state(&self) -> Vec<u8> {
        let st = State {
            processed: self.processed.iter().map(|(h, s)| (*h, s.copies)).collect(),
            dead: self.dead_notes.iter().map(|(h, (r, o))| (*h, r.clone(), o.clone())).collect(),
        };
        postcard::to_allocvec(&st).unwrap_or_default()
    }

    /// Forgets the deliveries of a dead channel (they come back redelivered).
    fn new_channel(&mut self) {
        self.generation += 1;
        self.delivered.clear();
        self.outstanding.clear();
        self.to_dead_letter.clear();
        self.last_tag = 0;
        self.acked_to = 0;
    }

    /// Handles one delivery: its events go to `events`, the record of a message that cannot be
    /// decoded to `dead` (the message is dead-lettered at its commit).
    fn on_delivery(&mut self, d: lapin::message::Delivery, events: &mut Vec<Event>, dead: &mut Vec<Event>) {
        let tag = d.delivery_tag;
        self.last_tag = tag;
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        if let Some(id) = d.properties.message_id() {
            hasher.update(id.as_str().as_bytes());
            hasher.update(b"\0");
        }
        hasher.update(&d.data);
        let h = hasher.digest128();
        let copies = self.processed.get(&h).map_or(0, |s| s.copies);
        let seen = Seen { copies, commit: self.commits, at_ms: crate::time::now_nanos() / 1_000_000 };
        let standing = self.outstanding.get(&h).copied().unwrap_or(0);
        if d.redelivered && copies > standing {
            // already processed (before a reconnect or before the restored checkpoint)
            self.processed.insert(h, seen);
            *self.outstanding.entry(h).or_default() += 1;
            self.delivered.push_back((tag, Some(h)));
            if let Some((reason, origin)) = self.dead_notes.get(&h).cloned() {
                self.to_dead_letter.push_back(ToDeadLetter { tag, body: d.data, props: d.properties, reason, origin });
            }
            self.skipped += 1;
            if self.skipped <= 10 || self.skipped % 1000 == 0 {
                tracing::info!(
                    skipped = self.skipped,
                    "redelivered message already processed: acknowledged at the next checkpoint"
                );
            }
            return;
        }
        let origin = format!("{}#{tag}", self.cfg.queue);
        let mut attrs: Vec<(crate::event::AttrKey, String)> = Vec::new();
        if let Some(headers) = d.properties.headers() {
            for (k, v) in headers.inner() {
                if k.as_str().starts_with("iotcentral-") {
                    attrs.push((crate::event::attr_key(k.as_str()), amqp_value_string(v)));
                }
            }
        }
        let body = Bytes::from(d.data);
        let enqueued = sent_time(&d.properties);
        let props = d.properties;
        let transport = Transport { enqueued, device_id: crate::sources::message::transport_device(&attrs) };
        let out = self.decoder.decode(body.clone(), self.projection.as_ref(), &transport);
        let good = out.iter().filter(|r| r.is_ok()).count();
        self.processed.insert(h, Seen { copies: copies + 1, ..seen });
        *self.outstanding.entry(h).or_default() += 1;
        self.delivered.push_back((tag, Some(h)));
        if good == 0 {
            // published to the dead-letter queue at the commit that holds its record
            let reason = out.iter().find_map(|r| r.as_ref().err().cloned()).unwrap_or_else(|| "empty record".into());
            let short: String = reason.chars().take(1024).collect();
            let d = ToDeadLetter { tag, body: body.to_vec(), props, reason: short.clone(), origin: origin.clone() };
            self.to_dead_letter.push_back(d);
            self.dead_notes.insert(h, (short, origin.clone()));
            dead.push(Event::dead_letter(body, &reason, &origin, &self.name));
            return;
        }
        for r in out {
            match r {
                Ok(mut ev) => {
                    ev.meta.offset = tag as i64;
                    ev.meta.enqueued = enqueued;
                    ev.meta.attrs = attrs.clone();
                    events.push(ev);
                }
                // the message decoded in part: its bad elements go to the dead-letter output
                Err(reason) => dead.push(Event::dead_letter(body.clone(), &reason, &origin, &self.name)),
            }
        }
    }

    async fn dead_letter(
        &self,
        link: &Link,
        body: &[u8],
        reason: &str,
        origin: &str,
        props: &BasicProperties,
    ) -> anyhow::Result<()> {
        let mut headers = props.headers().clone().unwrap_or_default();
        headers.insert("x-centralflow-reason".into(), AMQPValue::LongString(reason.into()));
        headers.insert("x-centralflow-origin".into(), AMQPValue::LongString(origin.into()));
        headers.insert("x-centralflow-queue".into(), AMQPValue::LongString(self.cfg.queue.as_str().into()));
        let properties = props.clone().with_headers(headers).with_delivery_mode(2);
        let (exchange, key) = match &self.dead_letter_exchange {
            Some(x) => (x.as_str(), self.cfg.queue.as_str()),
            None => ("", self.dead_letter_queue.as_str()),
        };
        // part of the channel's transaction: it takes effect with the commit's tx.commit
        link.channel
            .basic_publish(exchange.into(), key.into(), BasicPublishOptions::default(), body, properties)
            .await
            .with_context(|| format!("publishing the dead letter of {origin}"))?;
        Ok(())
    }

    /// Dead-letters and acknowledges what checkpoint `epoch` covers, in one transaction.
    async fn commit_on(&mut self, link: Option<&Link>, epoch: u64) -> anyhow::Result<()> {
        // a checkpoint completed: the one asked for, or one that started before the request (a
        // request made while a checkpoint is running is not queued), so ask again when needed
        self.asked_checkpoint = false;
        let mut mark = None;
        while self.marks.front().is_some_and(|m| m.epoch <= epoch) {
            mark = self.marks.pop_front();
        }
        let Some(mark) = mark else { return Ok(()) };
        // nothing comes back while disconnected: only connected commits age what is remembered
        let Some(link) = link else { return Ok(()) };
        self.commits += 1;
        self.forget_old();
        if mark.generation != self.generation || mark.tag <= self.acked_to {
            return Ok(()); // those tags died with their channel: redeliveries are acknowledged later
        }
        // the dead letters it covers, and the acknowledgements, in one transaction
        if self.to_dead_letter.front().is_some_and(|d| d.tag <= mark.tag) && self.dead_letter_exchange.is_none() {
            // the queue may have been deleted since the connection declared it: a message the
            // default exchange cannot route is dropped without a word
            link.channel
                .queue_declare(
                    self.dead_letter_queue.as_str().into(),
                    QueueDeclareOptions { passive: true, ..Default::default() },
                    FieldTable::default(),
                )
                .await
                .with_context(|| format!("the dead-letter queue {} is gone", self.dead_letter_queue))?;
        }
        while self.to_dead_letter.front().is_some_and(|d| d.tag <= mark.tag) {
            let d = self.to_dead_letter.front().unwrap();
            self.dead_letter(link, &d.body, &d.reason, &d.origin, &d.props).await?;
            self.to_dead_letter.pop_front();
        }
        // acknowledge up to the last delivery of the checkpoint that is still unacknowledged
        let covered = self.delivered.iter().take_while(|(t, _)| *t <= mark.tag).count();
        if let Some(&(last, _)) = covered.checked_sub(1).and_then(|i| self.delivered.get(i)) {
            link.channel.basic_ack(last, BasicAckOptions { multiple: true }).await.context("acknowledging")?;
        }
        // once tx.commit-ok is back, the broker has the dead letters and the acknowledgements
        link.channel.tx_commit().await.context("committing acknowledgements and dead letters")?;
        self.acked_to = mark.tag;
        self.committed.inc_by(covered as u64);
        while self.delivered.front().is_some_and(|(t, _)| *t <= mark.tag) {
            let (_, h) = self.delivered.pop_front().unwrap();
            if let Some(h) = h {
                if let Some(o) = self.outstanding.get_mut(&h) {
                    *o = o.saturating_sub(1);
                    if *o == 0 {
                        self.outstanding.remove(&h);
                    }
                }
                if let Some(p) = self.processed.get_mut(&h) {
                    p.copies = p.copies.saturating_sub(1);
                    if p.copies == 0 {
                        self.processed.remove(&h);
                        self.dead_notes.remove(&h);
                    }
                }
            }
        }
        // the depth for the lag metric: committed already, so a failure here is only logged
        let depth = link.channel.queue_declare(
            self.cfg.queue.as_str().into(),
            QueueDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default(),
        );
        match depth.await {
            Ok(q) => {
                let label = metrics::PartitionLabel { component: self.name.clone(), partition: "0".into() };
                metrics::global().consumer_lag.get_or_create(&label).set(q.message_count() as i64);
            }
            Err(e) => tracing::warn!("reading the depth of {}: {e}", self.cfg.queue),
        }
        Ok(())
    }

    /// Forgets processed messages that can no longer come back: not outstanding on this channel,
    /// and not seen for [`FORGET_COMMITS`] connected commits and `forget_ms`.
    fn forget_old(&mut self) {
        let now = crate::time::now_nanos() / 1_000_000;
        let (commits, outstanding) = (self.commits, &self.outstanding);
        self.processed.retain(|h, s| {
            s.copies > 0
                && (outstanding.contains_key(h)
                    || s.commit + FORGET_COMMITS > commits
                    || s.at_ms + self.forget_ms > now)
        });
        if !self.dead_notes.is_empty() {
            self.dead_notes.retain(|h, _| self.processed.contains_key(h));
        }
    }
}

fn durable_queue(durable: bool) -> QueueDeclareOptions {
    QueueDeclareOptions { durable, ..Default::default() }
}

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions { durable: true, ..Default::default() }
}

/// When the message was stamped: the `timestamp_in_ms` header (RabbitMQ's message timestamp
/// plugin sets it, in milliseconds), else the `timestamp` property (seconds); `NO_TIME` without.
fn sent_time(props: &BasicProperties) -> crate::event::Nanos {
    let header = props.headers().as_ref().and_then(|h| match h.inner().get("timestamp_in_ms")? {
        AMQPValue::LongLongInt(ms) => Some(*ms),
        AMQPValue::LongInt(ms) => Some(*ms as i64),
        AMQPValue::Timestamp(ms) => Some(*ms as i64),
        _ => None,
    });
    match (header, props.timestamp()) {
        (Some(ms), _) => ms.saturating_mul(1_000_000),
        (None, Some(s)) => (*s as i64).saturating_mul(1_000_000_000),
        (None, None) => crate::event::NO_TIME,
    }
}

fn amqp_value_string(v: &AMQPValue) -> String {
    match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).to_string(),
        AMQPValue::ShortString(s) => s.as_str().to_string(),
        other => format!("{other:?}"),
    }
}

#[async_trait]
impl Source for AmqpSource {
    async fn run(&mut self, cx: &mut SourceCx) -> anyhow::Result<EndReason> {
        let mut link: Option<Link> = self.link.take();
        let mut backoff = Duration::from_millis(200);
        let mut events: Vec<Event> = Vec::with_capacity(self.cfg.batch_size);
        let mut dead: Vec<Event> = Vec::new();
        let mut deadline: Option<tokio::time::Instant> = None;
        let mut last_delivery = tokio::time::Instant::now();
        let burst = (self.cfg.batch_size / 10).max(1);
        metrics::set_ready(&self.name, false, "connecting");
        loop {
            if link.is_none() {
                match self.connect_or_wait(cx, &mut backoff).await? {
                    std::ops::ControlFlow::Continue(Some(l)) => link = Some(l),
                    std::ops::ControlFlow::Continue(None) => continue,
                    std::ops::ControlFlow::Break(end) => return Ok(end),
                }
            }
            let l = link.as_mut().unwrap();
            let linger = crate::time::sleep_until_or_never(deadline);
            let quiet_at = self
                .quiet
                .filter(|_| !self.asked_checkpoint && self.delivered.len() >= burst)
                .map(|q| last_delivery + q);
            let quiet = crate::time::sleep_until_or_never(quiet_at);
            tokio::select! {
                biased;
                c = cx.control() => {
                    if let Some(end) = self.on_control(cx, c, &mut link, &mut events, &mut dead, &mut deadline).await? {
                        return Ok(end);
                    }
                }
                _ = linger => {
                    flush(cx, &mut events, &mut dead).await?;
                    deadline = None;
                }
                _ = quiet => {
                    // the burst is over: commit and acknowledge it now
                    flush(cx, &mut events, &mut dead).await?;
                    deadline = None;
                    self.asked_checkpoint = true;
                    cx.request_checkpoint();
                }
                d = l.consumer.next() => match d {
                    Some(Ok(delivery)) => {
                        last_delivery = tokio::time::Instant::now();
                        self.take_delivery(cx, delivery, &mut events, &mut dead, &mut deadline).await?;
                    }
                    Some(Err(e)) => {
                        tracing::warn!("lost the broker connection ({}); reconnecting", crate::secret::redact(&e.to_string()));
                        self.lost_connection(cx, &mut events, &mut dead).await?;
                        link = None;
                    }
                    None => {
                        tracing::warn!("the broker closed the consumer; reconnecting");
                        self.lost_connection(cx, &mut events, &mut dead).await?;
                        link = None;
                    }
                },
            }
        }
    }

    async fn commit(&mut self, epoch: u64) -> anyhow::Result<()> {
        // the stream has ended (stop): acknowledge the final checkpoint on the same channel
        let link = self.link.take();
        let r = self.commit_on(link.as_ref(), epoch).await;
        self.link = link;
        if let Err(e) = &r {
            // not fatal: unacknowledged deliveries come back and are recognised as processed
            tracing::warn!("final acknowledgement failed: {e:#}");
        }
        Ok(())
    }

    fn snapshot(&self) -> Vec<u8> {
        self.snapshot_state()
    }
}

/// The steps of the source's loop ([`Source::run`]).
impl AmqpSource {
    /// Connects to the broker (`Continue(Some(link))`), or says why not and waits the backoff
    /// while answering control messages (`Continue(None)`, or `Break` when asked to stop).
    async fn connect_or_wait(
        &mut self,
        cx: &mut SourceCx,
        backoff: &mut Duration,
    ) -> anyhow::Result<std::ops::ControlFlow<EndReason, Option<Link>>> {
        let e = match self.connect().await {
            Ok(l) => {
                // a connection after the first is a reconnection, whichever way the last one was
                // lost (the consumer stream ended or failed, an acknowledgement or a delivery's
                // handling failed)
                if self.generation > 0 {
                    cx.metrics.reconnects.inc();
                }
                self.new_channel();
                let heartbeat = l.conn.configuration().heartbeat() as i64;
                self.forget_ms = FORGET_MS.max(3 * heartbeat * 1000);
                tracing::info!(queue = %self.cfg.queue, "connected to the broker");
                cx.metrics.connected.set(1);
                metrics::set_ready(&self.name, true, "connected");
                *backoff = Duration::from_millis(200);
                return Ok(std::ops::ControlFlow::Continue(Some(l)));
            }
            Err(e) => e,
        };
        cx.metrics.connected.set(0);
        cx.metrics.errors.inc();
        metrics::set_ready(&self.name, false, &format!("disconnected: {e:#}"));
        tracing::warn!(
            "cannot reach the broker, retrying in {backoff:?}: {}",
            crate::secret::redact(&format!("{e:#}"))
        );
        let sleep = tokio::time::sleep(*backoff);
        *backoff = (*backoff * 2).min(Duration::from_secs(30));
        tokio::select! {
            c = cx.control() => match c {
                Control::Barrier(e) => {
                    self.marks.push_back(self.mark(e));
                    cx.barrier(e, self.snapshot_state()).await?;
                }
                Control::Commit(e) => self.commit_on(None, e).await?,
                Control::Stop | Control::Shutdown => return Ok(std::ops::ControlFlow::Break(EndReason::Stopped)),
                Control::Flush(_) => {}
            },
            _ = sleep => {}
        }
        Ok(std::ops::ControlFlow::Continue(None))
    }

    /// Answers a control message while connected: `Some` when the source stops (the link is
    /// kept for the final acknowledgement). A failed acknowledgement drops `link`.
    async fn on_control(
        &mut self,
        cx: &mut SourceCx,
        c: Control,
        link: &mut Option<Link>,
        events: &mut Vec<Event>,
        dead: &mut Vec<Event>,
        deadline: &mut Option<tokio::time::Instant>,
    ) -> anyhow::Result<Option<EndReason>> {
        match c {
            Control::Barrier(e) => {
                flush(cx, events, dead).await?;
                *deadline = None;
                self.marks.push_back(self.mark(e));
                cx.barrier(e, self.snapshot_state()).await?;
            }
            Control::Commit(e) => {
                if let Err(err) = self.commit_on(link.as_ref(), e).await {
                    tracing::warn!("acknowledging epoch {e} failed, the connection is re-established: {err:#}");
                    *link = None;
                }
            }
            Control::Stop | Control::Shutdown => {
                flush(cx, events, dead).await?;
                // no more deliveries; what was delivered and not processed comes back
                let l = link.as_ref().unwrap();
                let _ = l.channel.basic_cancel(self.cfg.consumer_tag.as_str().into(), Default::default()).await;
                self.link = link.take();
                return Ok(Some(EndReason::Stopped));
            }
            Control::Flush(_) => {}
        }
        Ok(None)
    }

    /// Takes one delivery: decodes it into `events` (or `dead`), sends a full batch on, and asks
    /// for a checkpoint when enough deliveries wait for their acknowledgement.
    async fn take_delivery(
        &mut self,
        cx: &mut SourceCx,
        delivery: lapin::message::Delivery,
        events: &mut Vec<Event>,
        dead: &mut Vec<Event>,
        deadline: &mut Option<tokio::time::Instant>,
    ) -> anyhow::Result<()> {
        cx.metrics.bytes_in.inc_by(delivery.data.len() as u64);
        self.on_delivery(delivery, events, dead);
        if deadline.is_none() {
            *deadline = Some(tokio::time::Instant::now() + self.linger);
        }
        if events.len() >= self.cfg.batch_size {
            flush(cx, events, dead).await?;
            *deadline = None;
        }
        let unacked = self.delivered.len() as f64;
        if !self.asked_checkpoint && unacked >= self.cfg.prefetch as f64 * self.cfg.checkpoint_at {
            self.asked_checkpoint = true;
            cx.request_checkpoint();
        }
        Ok(())
    }

    /// The connection is gone: says so, and sends on what was received.
    async fn lost_connection(
        &mut self,
        cx: &mut SourceCx,
        events: &mut Vec<Event>,
        dead: &mut Vec<Event>,
    ) -> anyhow::Result<()> {
        cx.metrics.connected.set(0);
        metrics::set_ready(&self.name, false, "reconnecting");
        flush(cx, events, dead).await
    }
}

/// Sends what a broker source collected: events downstream, undecodable messages to the
/// `dead_letter` output (shared by the `amqp` and `servicebus` sources).
pub(crate) async fn flush(cx: &mut SourceCx, events: &mut Vec<Event>, dead: &mut Vec<Event>) -> anyhow::Result<()> {
    if !events.is_empty() {
        cx.send(Batch::new(std::mem::take(events))).await?;
    }
    if !dead.is_empty() {
        cx.dead_letter(std::mem::take(dead)).await?;
    }
    Ok(())
}
