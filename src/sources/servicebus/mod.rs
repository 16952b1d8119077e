//! `servicebus`: reads a Service Bus queue or topic subscription (IoT Central's
//! `servicebusqueue@v1` and `servicebustopic@v1` export destinations) over AMQP 1.0 in peek-lock
//! mode, with no loss and no duplicates across lost locks, connection faults and crashes.
//!
//! Delivery: the receive link keeps `prefetch` credit open (manual link credit, topped up as
//! messages arrive) while fewer than `max_held` messages are locked and unsettled, so the
//! namespace keeps sending while a checkpoint is under way. A message is completed
//! (`accepted`) only at `Commit(n)`, once checkpoint `n` that covers it is durable and every
//! sink has committed it; a management round trip after the dispositions confirms that the
//! namespace has seen them. Messages held past half of their
//! lock span have their locks renewed (`com.microsoft:renew-lock` on `ENTITY/$management`), so
//! a slow checkpoint never lets a lock expire.
//!
//! If a lock is lost anyway (a dropped connection, renewal off or failing), Service Bus
//! delivers the message again with a higher delivery count. The source remembers what it has
//! processed and not yet had confirmed as completed, by a 128-bit hash of message id, sequence
//! number and body; a redelivered copy of such a message is not processed again, only completed
//! at the next checkpoint. That memory is part of the checkpoint, so a restarted process skips
//! the redeliveries of what the restored state contains. A completion whose lock may already
//! have run out, or that was not confirmed, is remembered for [`FORGET_AFTER`] (longer than the
//! longest lock, five minutes) in case its message comes back.
//!
//! A message that cannot be decoded goes to the source's `dead_letter` output at once, and to
//! the entity's `$DeadLetterQueue` (rejected with `com.microsoft:dead-letter`,
//! `DeadLetterReason` = the reason, `DeadLetterErrorDescription` = its origin) where a good
//! message would be completed: at the commit of the checkpoint that covers its record. Settled
//! at receipt, a crash before that checkpoint lost the record (the restarted pipeline cut the
//! output back, and the message was in the `$DeadLetterQueue`, never delivered again). It is
//! remembered like a processed message, with its reason, so a copy redelivered after a lost lock
//! or a crash is dead-lettered again without a second record.
//!
//! The connection is re-established with backoff, forever; the state shows in logs, in the
//! `source_connected` metric and in `/health/ready`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use bytes::Bytes;
use fe2o3_amqp::link::delivery::DeliveryInfo;
use fe2o3_amqp::types::definitions::{Error as AmqpError, ErrorCondition, Fields};
use fe2o3_amqp::types::messaging::{Body, Message, MessageId};
use fe2o3_amqp::types::primitives::{SimpleValue, Symbol, Value};

use crate::event::{Event, Nanos, NO_TIME};
use crate::model::decode::Projection;
use crate::model::format::MessageDecoder;
use crate::model::generic::Transport;
use crate::runtime::{BuildCx, Control, EndReason, Mode, Source, SourceCx};
use crate::sources::amqp::flush;
pub use config::{ConnectionString, ServiceBusConfig};
use link::{Auth, Link};

mod config;
mod link;
mod memory;
pub use memory::FORGET_AFTER;
use memory::{DeadNote, Memory, State};

/// Deliveries taken at once when they are already there (a barrier waits for at most this many).
const READY_BURST: usize = 256;

/// A received message with its delivery state (several hundred bytes: handled boxed).
type Delivery = fe2o3_amqp::link::delivery::Delivery<Body<Value>>;

/// A received message not yet completed.
struct Held {
    /// Position among the deliveries of this connection.
    n: u64,
    info: DeliveryInfo,
    tag: Option<[u8; 16]>,
    /// When its lock runs out (Unix ms), as the namespace said.
    locked_until: i64,
    /// The lock span, learnt at receipt.
    span: i64,
    hash: u128,
}

/// A barrier: the last delivery before it, on which connection.
#[derive(Debug, Clone, Copy)]
struct Mark {
    epoch: u64,
    generation: u64,
    upto: u64,
}

pub struct ServiceBusSource {
    cfg: ServiceBusConfig,
    entity: String,
    address: config::Address,
    auth: Auth,
    /// Boxed, as deliveries are: both are large, and moving them per message showed as a
    /// good share of the source's CPU (memcpy) in a profile.
    link: Option<Box<Link>>,
    name: String,
    projection: Option<Arc<Projection>>,
    decoder: MessageDecoder,
    linger: Duration,
    quiet: Option<Duration>,
    /// Processed messages, to recognise their redelivered copies.
    memory: Memory,
    held: VecDeque<Held>,
    generation: u64,
    received: u64,
    marks: VecDeque<Mark>,
    epoch: u64,
    asked_checkpoint: bool,
    last_sequence: i64,
    skipped: u64,
    renewals: u64,
    /// Received while a hand-over waited ([`ServiceBusSource::renewing`]): events, dead letters,
    /// bytes; handed over after it.
    later: (Vec<Event>, Vec<Event>, u64),
    committed: prometheus_client::metrics::counter::Counter,
}

impl ServiceBusSource {
    pub fn new(cfg: ServiceBusConfig, cx: &BuildCx<'_>) -> anyhow::Result<ServiceBusSource> {
        if cx.mode == Mode::Replay {
            anyhow::bail!("a servicebus source never ends: use `centralflow run`, not `replay`");
        }
        let entity = cfg.entity().map_err(anyhow::Error::msg)?;
        let address = cfg.address().map_err(anyhow::Error::msg)?;
        let auth = Auth::new(&cfg)?;
        let mut memory = Memory::default();
        if let Some(state) = cx.restored.as_deref().filter(|s| !s.is_empty()) {
            let st = State::decode(state).context("servicebus source state in the checkpoint is corrupt")?;
            memory = Memory::restore(st, now_ms());
        }
        Ok(ServiceBusSource {
            entity,
            address,
            auth,
            link: None,
            name: cx.name.to_string(),
            projection: cx.projection.clone(),
            decoder: crate::sources::message::decoder(cfg.format, cfg.time.as_deref(), cfg.device_id.as_deref())?,
            linger: cfg.linger.get()?,
            quiet: Some(cfg.quiet_checkpoint.get()?).filter(|d| !d.is_zero()),
            memory,
            held: VecDeque::new(),
            generation: 0,
            received: 0,
            marks: VecDeque::new(),
            epoch: 0,
            asked_checkpoint: false,
            last_sequence: -1,
            skipped: 0,
            renewals: 0,
            later: Default::default(),
            committed: cx.metrics.committed.clone(),
            cfg,
        })
    }

    fn snapshot_state(&self) -> Vec<u8> {
        let st = self.memory.state();
        postcard::to_allocvec(&st).unwrap_or_default()
    }

    fn mark(&self, epoch: u64) -> Mark {
        Mark { epoch, generation: self.generation, upto: self.received }
    }

    /// The connection is gone, and the deliveries on it: their messages come back when their
    /// locks run out, and are recognised then.
    fn forget_link(&mut self) {
        self.memory.disconnected(self.held.drain(..).map(|h| h.hash), now_ms());
        self.generation += 1;
        self.received = 0;
    }

    /// Asks for a checkpoint once the held messages near `max_held` (the namespace sends no
    /// more until some are completed).
    fn near_max_held(&mut self, cx: &mut SourceCx) {
        if !self.asked_checkpoint && self.held.len() as f64 >= self.cfg.max_held() as f64 * self.cfg.checkpoint_at {
            self.asked_checkpoint = true;
            cx.request_checkpoint();
        }
    }

    /// A barrier's mark: what was received on this connection so far is covered by `epoch`.
    fn take_mark(&mut self, epoch: u64) {
        // a commit of a later epoch than the last barrier's is the final one (`commit`)
        self.epoch = epoch;
        self.marks.push_back(self.mark(epoch));
    }

    /// Handles one delivery: its events go to `events`, a message that cannot be decoded is
    /// dead-lettered.
    async fn on_delivery(
        &mut self,
        d: Box<Delivery>,
        events: &mut Vec<Event>,
        dead: &mut Vec<Event>,
    ) -> anyhow::Result<u64> {
        let (info, msg) = (*d).into_parts();
        let tag = <[u8; 16]>::try_from(&info.delivery_tag()[..]).ok();
        let now = now_ms();
        let mut m = Meta::of(&msg);
        self.received += 1;
        if m.sequence >= 0 {
            self.last_sequence = self.last_sequence.max(m.sequence);
        }
        let (body, unreadable) = match body_bytes(msg.body) {
            Ok(b) => (b, None),
            Err(reason) => (Bytes::new(), Some(reason)),
        };
        let len = body.len() as u64;
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        hasher.update(m.message_id.as_deref().unwrap_or("").as_bytes());
        hasher.update(&m.sequence.to_le_bytes());
        hasher.update(&body);
        let hash = hasher.digest128();
        let locked_until = m.locked_until.unwrap_or(now + 30_000);
        let held = Held { n: self.received, info, tag, locked_until, span: (locked_until - now).max(1000), hash };
        if m.delivery_count > 0 && self.memory.knows(hash) {
            // processed already (before a lost lock, a reconnect or the restored checkpoint)
            self.memory.hold(hash);
            self.held.push_back(held);
            self.skipped += 1;
            if self.skipped <= 10 || self.skipped % 1000 == 0 {
                tracing::info!(
                    skipped = self.skipped,
                    "redelivered message already processed: completed at the next checkpoint"
                );
            }
            return Ok(len);
        }
        let origin = m.origin(&self.entity);
        if let Some(reason) = unreadable {
            self.dead_letter(held, body, &reason, &origin, dead);
            return Ok(len);
        }
        let transport =
            Transport { enqueued: m.enqueued, device_id: crate::sources::message::transport_device(&m.attrs) };
        let out = self.decoder.decode(body.clone(), self.projection.as_ref(), &transport);
        if !out.iter().any(|r| r.is_ok()) {
            let reason = out.iter().find_map(|r| r.as_ref().err().cloned()).unwrap_or_else(|| "empty record".into());
            self.dead_letter(held, body, &reason, &origin, dead);
            return Ok(len);
        }
        self.memory.hold(hash);
        self.held.push_back(held);
        let origin: Arc<str> = origin.into();
        let mut left = out.iter().filter(|r| r.is_ok()).count();
        for r in out {
            match r {
                Ok(mut ev) => {
                    ev.meta.offset = m.sequence;
                    ev.meta.enqueued = m.enqueued;
                    ev.meta.origin = Some(origin.clone());
                    left -= 1;
                    // the last event takes the message's attributes, the others a copy
                    ev.meta.attrs = if left == 0 { std::mem::take(&mut m.attrs) } else { m.attrs.clone() };
                    events.push(ev);
                }
                // the message decoded in part: its bad elements go to the dead-letter output
                Err(reason) => dead.push(Event::dead_letter(body.clone(), &reason, &origin, &self.name)),
            }
        }
        Ok(len)
    }

    /// A message that cannot be decoded: its record goes to the `dead_letter` output now, and the
    /// message to the entity's `$DeadLetterQueue` at the commit that covers the record.
    fn dead_letter(&mut self, held: Held, body: Bytes, reason: &str, origin: &str, dead: &mut Vec<Event>) {
        let note =
            DeadNote { reason: reason.chars().take(1024).collect(), description: format!("centralflow: {origin}") };
        self.memory.hold_dead(held.hash, note);
        self.held.push_back(held);
        dead.push(Event::dead_letter(body, reason, origin, &self.name));
    }

    /// Settles the messages of a commit: completes the good ones, dead-letters those the memory
    /// has a [`DeadNote`] for.
    async fn settle(link: &mut Link, done: &[Held], memory: &Memory) -> anyhow::Result<()> {
        let mut good = Vec::with_capacity(done.len());
        let mut dead = Vec::new();
        for h in done {
            match memory.dead_note(h.hash) {
                Some(note) => dead.push((h.info.clone(), note.clone())),
                None => good.push(h.info.clone()),
            }
        }
        if !good.is_empty() {
            link.receiver.accept_all(good).await.map_err(|e| anyhow::anyhow!("completing: {e}"))?;
        }
        for (info, note) in dead {
            let mut fields = Fields::new();
            fields.insert(Symbol::from("DeadLetterReason"), Value::String(note.reason.clone()));
            fields.insert(Symbol::from("DeadLetterErrorDescription"), Value::String(note.description));
            let err = AmqpError {
                condition: ErrorCondition::Custom(Symbol::from("com.microsoft:dead-letter")),
                description: Some(note.reason),
                info: Some(Box::new(fields)),
            };
            link.receiver.reject(info, err).await.context("dead-lettering a message")?;
        }
        Ok(())
    }

    /// Completes what checkpoint `epoch` covers and confirms the namespace saw it.
    async fn commit_on(&mut self, epoch: u64) -> anyhow::Result<()> {
        self.asked_checkpoint = false;
        let mut mark = None;
        while self.marks.front().is_some_and(|m| m.epoch <= epoch) {
            mark = self.marks.pop_front();
        }
        let Some(mark) = mark else { return Ok(()) };
        let Some(link) = self.link.as_mut() else { return Ok(()) };
        if mark.generation != self.generation {
            return Ok(()); // those deliveries died with their connection: they come back
        }
        let n = self.held.iter().take_while(|h| h.n <= mark.upto).count();
        if n == 0 {
            return Ok(());
        }
        let done: Vec<Held> = self.held.drain(..n).collect();
        let now = now_ms();
        let confirmed = match Self::settle(link, &done, &self.memory).await {
            Ok(()) => link.round_trip(self.last_sequence + 1).await,
            Err(e) => Err(e),
        };
        for h in &done {
            // a lock that ran out (or nearly) may have made the settlement void: remember
            self.memory.settled(h.hash, confirmed.is_ok() && h.locked_until > now + 2000, now);
        }
        confirmed?;
        self.committed.inc_by(n as u64);
        self.top_up_credit().await
    }

    /// Keeps `prefetch` credit open while fewer than `max_held` messages are held: held plus
    /// credit never exceeds `max_held`. A flow frame goes out only when it adds at least half a
    /// prefetch, or the link has none left, so a steady stream costs one per half prefetch.
    async fn top_up_credit(&mut self) -> anyhow::Result<()> {
        let Some(link) = self.link.as_mut() else { return Ok(()) };
        let room = self.cfg.max_held().saturating_sub(self.held.len() as u32);
        let want = self.cfg.prefetch.min(room);
        let have = link.receiver.credit();
        if want > have && (have == 0 || want - have >= (self.cfg.prefetch / 2).max(1)) {
            link.receiver.set_credit(want).await.context("granting link credit")?;
        }
        Ok(())
    }

    /// Renews the locks of messages held past half their lock span.
    async fn renew(&mut self) -> anyhow::Result<()> {
        let now = now_ms();
        let Some(link) = self.link.as_mut() else { return Ok(()) };
        let due: Vec<usize> = (0..self.held.len())
            .filter(|&i| {
                let h = &self.held[i];
                // at half the span, a tick early: renewal runs once a second
                h.tag.is_some() && h.locked_until > now && h.locked_until - now < h.span / 2 + 1000
            })
            .collect();
        for chunk in due.chunks(link::RENEW_CHUNK) {
            let tokens: Vec<[u8; 16]> = chunk.iter().map(|&i| self.held[i].tag.unwrap()).collect();
            let mut lost = 0;
            for (&i, t) in chunk.iter().zip(link::renew_each(&mut **link, &tokens).await?) {
                let h = &mut self.held[i];
                match t {
                    Some(t) => {
                        h.locked_until = t;
                        // the span of a renewed lock is the whole lock duration (one that waited
                        // in the prefetch had only its rest at receipt)
                        h.span = (t - now).max(1000);
                        self.renewals += 1;
                    }
                    // a lock already lost: its message comes back and is recognised
                    None => {
                        h.locked_until = 0;
                        lost += 1;
                    }
                }
            }
            if lost > 0 {
                tracing::warn!("{lost} of {} message locks were lost before renewal", chunk.len());
            }
        }
        if !due.is_empty() {
            tracing::debug!(renewed = due.len(), total = self.renewals, "lock renewals");
        }
        Ok(())
    }
}

/// What a message says of itself.
struct Meta {
    message_id: Option<String>,
    sequence: i64,
    enqueued: Nanos,
    locked_until: Option<i64>,
    delivery_count: u32,
    attrs: Vec<(crate::event::AttrKey, String)>,
}

impl Meta {
    fn of(msg: &Message<Body<Value>>) -> Meta {
        let mut m = Meta {
            message_id: msg.properties.as_ref().and_then(|p| p.message_id.as_ref()).map(message_id_string),
            sequence: -1,
            enqueued: NO_TIME,
            locked_until: None,
            delivery_count: msg.header.as_ref().map_or(0, |h| h.delivery_count),
            attrs: Vec::new(),
        };
        if let Some(a) = &msg.message_annotations {
            for (k, v) in a.0.iter() {
                let fe2o3_amqp::types::messaging::annotations::OwnedKey::Symbol(k) = k else { continue };
                match (k.0.as_str(), v) {
                    ("x-opt-sequence-number", Value::Long(s)) => m.sequence = *s,
                    ("x-opt-enqueued-time", Value::Timestamp(t)) => m.enqueued = t.milliseconds() * 1_000_000,
                    ("x-opt-locked-until", Value::Timestamp(t)) => m.locked_until = Some(t.milliseconds()),
                    (k, v) if k.starts_with("iotcentral-") => {
                        m.attrs.push((crate::event::attr_key(k), value_string(v)))
                    }
                    _ => {}
                }
            }
        }
        if let Some(p) = &msg.application_properties {
            for (k, v) in p.0.iter() {
                m.attrs.push((crate::event::attr_key(k), simple_string(v)));
            }
        }
        if let Some(id) = &m.message_id {
            m.attrs.push(("message-id".into(), id.clone()));
        }
        m.attrs.push(("delivery-count".into(), m.delivery_count.to_string()));
        if m.sequence >= 0 {
            m.attrs.push(("x-opt-sequence-number".into(), m.sequence.to_string()));
        }
        if m.enqueued != NO_TIME {
            m.attrs.push(("x-opt-enqueued-time".into(), crate::time::format_rfc3339(m.enqueued)));
        }
        m
    }

    fn origin(&self, entity: &str) -> String {
        // not format!, which cost about 1,000 instructions a message here
        let seq = self.sequence.to_string();
        let mut o = String::with_capacity(entity.len() + 1 + seq.len());
        o.push_str(entity);
        o.push('#');
        o.push_str(&seq);
        o
    }
}

fn message_id_string(id: &MessageId) -> String {
    match id {
        MessageId::String(s) => s.clone(),
        MessageId::Ulong(n) => n.to_string(),
        // as Microsoft's clients show them: a GUID, hex digits
        MessageId::Uuid(u) => uuid::Uuid::from(u.clone()).hyphenated().to_string(),
        MessageId::Binary(b) => b.iter().map(|x| format!("{x:02x}")).collect(),
    }
}

fn simple_string(v: &SimpleValue) -> String {
    match v {
        SimpleValue::String(s) => s.clone(),
        SimpleValue::Symbol(s) => s.0.clone(),
        SimpleValue::Bool(b) => b.to_string(),
        SimpleValue::Int(i) => i.to_string(),
        SimpleValue::Long(i) => i.to_string(),
        SimpleValue::Uint(i) => i.to_string(),
        SimpleValue::Ulong(i) => i.to_string(),
        SimpleValue::Double(f) => f.to_string(),
        SimpleValue::Timestamp(t) => crate::time::format_rfc3339(t.milliseconds() * 1_000_000),
        other => format!("{other:?}"),
    }
}

fn value_string(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Symbol(s) => s.0.clone(),
        other => format!("{other:?}"),
    }
}

/// The body as bytes: data sections joined, or a string or binary amqp-value (some clients
/// send JSON text that way).
fn body_bytes(body: Body<Value>) -> Result<Bytes, String> {
    match body {
        Body::Data(sections) => {
            let mut v: Vec<Vec<u8>> = sections.into_iter().map(|d| d.0.into_vec()).collect();
            Ok(if v.len() == 1 { Bytes::from(v.pop().unwrap()) } else { Bytes::from(v.concat()) })
        }
        Body::Value(v) => match v.0 {
            Value::String(s) => Ok(Bytes::from(s)),
            Value::Binary(b) => Ok(Bytes::from(b.into_vec())),
            other => Err(format!("the body is an AMQP value of type {}, not JSON text", value_kind(&other))),
        },
        Body::Sequence(_) => Err("the body is an AMQP sequence, not JSON text".into()),
        Body::Empty => Err("the message has no body".into()),
    }
}

fn value_kind(v: &Value) -> &'static str {
    match v {
        Value::Map(_) => "map",
        Value::List(_) => "list",
        Value::Array(_) => "array",
        Value::Null => "null",
        _ => "scalar",
    }
}

fn now_ms() -> i64 {
    crate::time::now_nanos() / 1_000_000
}

#[async_trait]
impl Source for ServiceBusSource {
    async fn run(&mut self, cx: &mut SourceCx) -> anyhow::Result<EndReason> {
        let mut backoff = Duration::from_millis(200);
        let mut events: Vec<Event> = Vec::with_capacity(self.cfg.batch_size);
        let mut dead: Vec<Event> = Vec::new();
        let mut deadline: Option<tokio::time::Instant> = None;
        let mut last_delivery = tokio::time::Instant::now();
        let burst = (self.cfg.batch_size / 10).max(1);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        crate::metrics::set_ready(&self.name, false, "connecting");
        loop {
            if self.link.is_none() {
                match self.connect_or_wait(cx, &mut backoff).await? {
                    std::ops::ControlFlow::Continue(()) => continue,
                    std::ops::ControlFlow::Break(end) => return Ok(end),
                }
            }
            let linger = crate::time::sleep_until_or_never(deadline);
            let quiet_at =
                self.quiet.filter(|_| !self.asked_checkpoint && self.held.len() >= burst).map(|q| last_delivery + q);
            let quiet = crate::time::sleep_until_or_never(quiet_at);
            let link = self.link.as_mut().unwrap();
            tokio::select! {
                biased;
                c = cx.control() => {
                    if let Some(end) = self.on_control(cx, c, &mut events, &mut dead, &mut deadline).await? {
                        return Ok(end);
                    }
                }
                _ = linger => {
                    self.hand_over(cx, &mut events, &mut dead, &mut deadline).await?;
                }
                _ = quiet => {
                    self.hand_over(cx, &mut events, &mut dead, &mut deadline).await?;
                    self.asked_checkpoint = true;
                    cx.request_checkpoint();
                }
                _ = tick.tick() => {
                    let failed = self.housekeeping().await.err();
                    self.reconnect_on(cx, &mut events, &mut dead, failed).await?;
                }
                d = link.receiver.recv::<Body<Value>>() => {
                    if d.is_ok() {
                        last_delivery = tokio::time::Instant::now();
                    }
                    if self.on_recv(cx, d.map(Box::new), &mut events, &mut dead, &mut deadline).await? {
                        self.take_ready(cx, &mut events, &mut dead, &mut deadline).await?;
                    }
                }
            }
        }
    }

    async fn commit(&mut self, epoch: u64) -> anyhow::Result<()> {
        // the stream has ended (stop): an epoch after the last barrier is the final checkpoint,
        // which covers everything received (the mark pushed at the stop)
        let epoch = if epoch > self.epoch { u64::MAX } else { epoch };
        if let Err(e) = self.commit_on(epoch).await {
            // not fatal: the messages come back when their locks run out and are recognised
            tracing::warn!("final completion failed: {e:#}");
        }
        Ok(())
    }

    fn snapshot(&self) -> Vec<u8> {
        self.snapshot_state()
    }
}

/// The steps of the source's loop ([`Source::run`]).
impl ServiceBusSource {
    async fn connect_or_wait(
        &mut self,
        cx: &mut SourceCx,
        backoff: &mut Duration,
    ) -> anyhow::Result<std::ops::ControlFlow<EndReason>> {
        let limit = self.cfg.connect_timeout.get()?;
        let open = tokio::time::timeout(limit, Link::open(&self.address, &self.entity, &self.auth, &self.name));
        let opened = open.await.unwrap_or_else(|_| Err(anyhow::anyhow!("no answer in {limit:?}")));
        let e = match opened {
            // nothing is held on a new connection
            Ok(mut l) => match l.receiver.set_credit(self.cfg.prefetch).await {
                Ok(()) => {
                    self.generation += 1;
                    self.received = 0;
                    self.memory.reconnected(now_ms());
                    tracing::info!(entity = %self.entity, "connected to Service Bus");
                    cx.metrics.connected.set(1);
                    crate::metrics::set_ready(&self.name, true, "connected");
                    *backoff = Duration::from_millis(200);
                    self.link = Some(Box::new(l));
                    return Ok(std::ops::ControlFlow::Continue(()));
                }
                Err(e) => anyhow::anyhow!("granting link credit: {e}"),
            },
            Err(e) => e,
        };
        cx.metrics.connected.set(0);
        cx.metrics.errors.inc();
        crate::metrics::set_ready(
            &self.name,
            false,
            &format!("disconnected: {}", crate::secret::redact(&format!("{e:#}"))),
        );
        tracing::warn!(
            "cannot reach Service Bus ({}:{}), retrying in {backoff:?}: {}",
            self.address.host,
            self.address.port,
            crate::secret::redact(&format!("{e:#}"))
        );
        let sleep = tokio::time::sleep(*backoff);
        tokio::pin!(sleep);
        *backoff = (*backoff * 2).min(Duration::from_secs(30));
        // the whole backoff, serving checkpoints meanwhile (each one ending it would try again
        // at every checkpoint interval, however long the outage)
        loop {
            tokio::select! {
                c = cx.control() => match c {
                    Control::Barrier(e) => {
                        self.take_mark(e);
                        cx.barrier(e, self.snapshot_state()).await?;
                    }
                    Control::Commit(e) => self.commit_on(e).await?,
                    Control::Stop | Control::Shutdown => return Ok(std::ops::ControlFlow::Break(EndReason::Stopped)),
                    Control::Flush(_) => {}
                },
                _ = &mut sleep => return Ok(std::ops::ControlFlow::Continue(())),
            }
        }
    }

    async fn on_control(
        &mut self,
        cx: &mut SourceCx,
        c: Control,
        events: &mut Vec<Event>,
        dead: &mut Vec<Event>,
        deadline: &mut Option<tokio::time::Instant>,
    ) -> anyhow::Result<Option<EndReason>> {
        match c {
            Control::Barrier(e) => {
                // the mark covers what was received so far, whose events go before the barrier;
                // what is received while they wait follows it
                self.take_mark(e);
                let snapshot = self.snapshot_state();
                let before = async {
                    flush(cx, events, dead).await?;
                    cx.barrier(e, snapshot).await
                };
                let (sent, lost) = self.renewing(before).await;
                sent?;
                self.take_later(cx, events, dead, deadline);
                self.reconnect_on(cx, events, dead, lost).await?;
            }
            Control::Commit(e) => {
                if let Err(err) = self.commit_on(e).await {
                    tracing::warn!("completing epoch {e} failed, the connection is re-established: {err:#}");
                    self.lost_connection(cx, events, dead).await?;
                }
            }
            Control::Stop | Control::Shutdown => {
                flush(cx, events, dead).await?;
                // no more deliveries; what was received is covered by the final checkpoint
                if let Some(l) = self.link.as_mut() {
                    let _ = l.receiver.set_credit(0).await;
                }
                self.marks.push_back(self.mark(u64::MAX));
                return Ok(Some(EndReason::Stopped));
            }
            Control::Flush(_) => {}
        }
        Ok(None)
    }

    async fn take_delivery(
        &mut self,
        cx: &mut SourceCx,
        delivery: Box<Delivery>,
        events: &mut Vec<Event>,
        dead: &mut Vec<Event>,
        deadline: &mut Option<tokio::time::Instant>,
    ) -> anyhow::Result<()> {
        match self.on_delivery(delivery, events, dead).await {
            Ok(bytes) => {
                cx.metrics.bytes_in.inc_by(bytes);
            }
            Err(e) => {
                tracing::warn!("connection problem while handling a delivery: {e:#}");
                return self.lost_connection(cx, events, dead).await;
            }
        }
        if deadline.is_none() {
            *deadline = Some(tokio::time::Instant::now() + self.linger);
        }
        if events.len() >= self.cfg.batch_size {
            self.hand_over(cx, events, dead, deadline).await?;
        }
        self.near_max_held(cx);
        let failed = self.top_up_credit().await.err();
        self.reconnect_on(cx, events, dead, failed).await
    }

    /// One result of the receive link: a delivery is taken; an error means the link is lost and
    /// the connection is made again. True while the link is up.
    async fn on_recv(
        &mut self,
        cx: &mut SourceCx,
        r: Result<Box<Delivery>, fe2o3_amqp::link::RecvError>,
        events: &mut Vec<Event>,
        dead: &mut Vec<Event>,
        deadline: &mut Option<tokio::time::Instant>,
    ) -> anyhow::Result<bool> {
        match r {
            Ok(d) => self.take_delivery(cx, d, events, dead, deadline).await?,
            Err(e) => {
                tracing::warn!("lost the Service Bus link ({}); reconnecting", crate::secret::redact(&e.to_string()));
                self.lost_connection(cx, events, dead).await?;
            }
        }
        Ok(self.link.is_some())
    }

    /// Takes the deliveries that have arrived already, up to [`READY_BURST`], before going back
    /// to the loop's `select!` (whose timers cost more than taking a delivery).
    async fn take_ready(
        &mut self,
        cx: &mut SourceCx,
        events: &mut Vec<Event>,
        dead: &mut Vec<Event>,
        deadline: &mut Option<tokio::time::Instant>,
    ) -> anyhow::Result<()> {
        for _ in 0..READY_BURST {
            let Some(r) = self.ready_delivery() else { break };
            if !self.on_recv(cx, r, events, dead, deadline).await? {
                break;
            }
        }
        Ok(())
    }

    /// A delivery that has arrived already, without waiting; `None` when there is none (or no
    /// link). recv is cancel safe: a delivery not ready yet stays with the link.
    fn ready_delivery(&mut self) -> Option<Result<Box<Delivery>, fe2o3_amqp::link::RecvError>> {
        use futures::FutureExt;
        let r = self.link.as_mut()?.receiver.recv::<Body<Value>>().now_or_never()?;
        Some(r.map(Box::new))
    }

    /// Hands the events over ([`flush`]), renewing locks while the pipeline is too busy to take
    /// them ([`ServiceBusSource::renewing`]); what was received meanwhile is the next batch.
    async fn hand_over(
        &mut self,
        cx: &mut SourceCx,
        events: &mut Vec<Event>,
        dead: &mut Vec<Event>,
        deadline: &mut Option<tokio::time::Instant>,
    ) -> anyhow::Result<()> {
        let (sent, lost) = self.renewing(flush(cx, events, dead)).await;
        sent?;
        self.take_later(cx, events, dead, deadline);
        self.reconnect_on(cx, events, dead, lost).await
    }

    /// Moves what was received during a hand-over to `events` and `dead`, to leave with the next
    /// batch (`deadline`: its linger).
    fn take_later(
        &mut self,
        cx: &mut SourceCx,
        events: &mut Vec<Event>,
        dead: &mut Vec<Event>,
        deadline: &mut Option<tokio::time::Instant>,
    ) {
        let (ev, dl, bytes) = std::mem::take(&mut self.later);
        cx.metrics.bytes_in.inc_by(bytes);
        *deadline = (!ev.is_empty() || !dl.is_empty()).then(|| tokio::time::Instant::now() + self.linger);
        events.extend(ev);
        dead.extend(dl);
        self.near_max_held(cx);
    }

    /// Awaits `work`, a hand-over to the pipeline, keeping the messages held meanwhile: the
    /// pipeline takes nothing while it is busy, and a sink retrying through a storage outage
    /// keeps it busy for minutes, past every lock (each lock that runs out costs a delivery, and
    /// Service Bus dead-letters a message after ten). So every half second the deliveries that
    /// have arrived are taken (into [`ServiceBusSource::later`]; a prefetched delivery's lock
    /// runs from when it was sent, and it can be renewed only once received) and
    /// [`ServiceBusSource::housekeeping`] renews what is due. `max_held` still bounds what is
    /// taken. The error of a step that failed comes back beside `work`'s result: the connection
    /// is made again once the hand-over is done ([`ServiceBusSource::reconnect_on`]).
    async fn renewing<T>(&mut self, work: impl std::future::Future<Output = T>) -> (T, Option<anyhow::Error>) {
        tokio::pin!(work);
        let period = Duration::from_millis(500);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failed = None;
        loop {
            tokio::select! {
                biased;
                r = &mut work => return (r, failed),
                _ = tick.tick(), if failed.is_none() => {
                    failed = match self.take_buffered().await {
                        Ok(()) => self.housekeeping().await.err(),
                        Err(e) => Some(e),
                    };
                }
            }
        }
    }

    /// Takes the deliveries that have arrived, into [`ServiceBusSource::later`].
    async fn take_buffered(&mut self) -> anyhow::Result<()> {
        let (mut events, mut dead, mut bytes) = std::mem::take(&mut self.later);
        let mut result = Ok(());
        // no more than `max_held` at once
        let limit = self.cfg.max_held() as usize;
        while events.len() + dead.len() < limit {
            let Some(r) = self.ready_delivery() else { break };
            match r {
                Ok(d) => match self.on_delivery(d, &mut events, &mut dead).await {
                    Ok(n) => bytes += n,
                    Err(e) => {
                        result = Err(e.context("taking a delivery while the pipeline was busy"));
                        break;
                    }
                },
                Err(e) => {
                    result =
                        Err(anyhow::anyhow!("lost the Service Bus link ({})", crate::secret::redact(&e.to_string())));
                    break;
                }
            }
        }
        self.later = (events, dead, bytes);
        result?;
        self.top_up_credit().await
    }

    /// After a step on the connection: if it `failed`, the connection is made again.
    async fn reconnect_on(
        &mut self,
        cx: &mut SourceCx,
        events: &mut Vec<Event>,
        dead: &mut Vec<Event>,
        failed: Option<anyhow::Error>,
    ) -> anyhow::Result<()> {
        match failed {
            Some(e) => {
                tracing::warn!("{e:#}; reconnecting");
                self.lost_connection(cx, events, dead).await
            }
            None => Ok(()),
        }
    }

    /// Once a second: lock renewal, the token, and forgetting old completions.
    async fn housekeeping(&mut self) -> anyhow::Result<()> {
        let now = now_ms();
        self.memory.expire(now);
        if self.cfg.renew_locks {
            self.renew().await?;
        }
        if let Some(l) = self.link.as_mut() {
            l.refresh_token(&self.auth).await?;
        }
        Ok(())
    }

    async fn lost_connection(
        &mut self,
        cx: &mut SourceCx,
        events: &mut Vec<Event>,
        dead: &mut Vec<Event>,
    ) -> anyhow::Result<()> {
        self.link = None;
        self.forget_link();
        cx.metrics.connected.set(0);
        cx.metrics.reconnects.inc();
        crate::metrics::set_ready(&self.name, false, "reconnecting");
        flush(cx, events, dead).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_read_as_microsofts_clients_show_them() {
        let guid = uuid::Uuid::parse_str("6e9d8f3c-2b1a-4c8e-9f0d-1a2b3c4d5e6f").unwrap();
        assert_eq!(message_id_string(&MessageId::Uuid(guid.into())), "6e9d8f3c-2b1a-4c8e-9f0d-1a2b3c4d5e6f");
        let bin = fe2o3_amqp::types::primitives::Binary::from(vec![0x0a, 0xff, 0x00]);
        assert_eq!(message_id_string(&MessageId::Binary(bin)), "0aff00");
        assert_eq!(message_id_string(&MessageId::Ulong(42)), "42");
        assert_eq!(message_id_string(&MessageId::String("m-1".into())), "m-1");
    }
}
