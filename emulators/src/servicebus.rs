//! Azure Service Bus emulator: an AMQP 1.0 server with queues, topics and subscriptions, peek-lock
//! and receive-and-delete, dead-letter sub-queues and the `$management` operations a peek-lock
//! consumer needs. Checked against Microsoft's own client (PyPI `azure-servicebus`) and used by
//! centralflow's Service Bus source tests. Plain TCP on loopback, no TLS: clients connect with
//! `Endpoint=sb://127.0.0.1:PORT;SharedAccessKeyName=..;SharedAccessKey=..;UseDevelopmentEmulator=true`.
//!
//! # Usage
//! ```ignore
//! use centralflow_emulators::servicebus::{Config, Emulator, Message};
//! let emu = Emulator::start(Config::new().queue("q").topic("t", "s").lock_duration(Duration::from_secs(5))).await?;
//! emu.send("q", Message::text("hello"))?;
//! let cs = emu.connection_string();
//! assert_eq!(emu.stats("q")?.available, 1);
//! ```
//!
//! # What it implements
//! * SASL ANONYMOUS and PLAIN (PLAIN with the key name and key authorizes the connection), and
//!   CBS `put-token` on `$cbs`: the SAS token is verified (HMAC-SHA256 over
//!   `url-encoded-audience + "\n" + expiry` with the emulator's key as UTF-8 bytes, `skn` = the key
//!   name, expiry not past); the answer is status 202, or 401 with `com.microsoft:auth-failed`.
//!   Links to entities are refused (`amqp:unauthorized-access`) on a connection without a valid
//!   token or PLAIN login.
//! * Addresses (with or without `amqps://HOST/`, matched case-insensitively): `QUEUE`, `TOPIC`
//!   (send), `TOPIC/Subscriptions/SUB`, `ENTITY/$DeadLetterQueue` (receive), `ENTITY/$management`
//!   (request and reply links). A message sent to a topic is copied to every subscription. Batches
//!   (message format 0x80013700, as the SDKs send `ServiceBusMessageBatch`) are split into their
//!   messages. Unknown entities are refused with `amqp:not-found`.
//! * Receiving: peek-lock when the client's sender settle mode is not `settled` (deliveries are
//!   unsettled; settle mode second or first as the client asks), receive-and-delete when it is
//!   (pre-settled deliveries, removed at once). Credit is respected exactly, drain included;
//!   messages sent later go out live to attached receivers with credit; competing receivers get
//!   distinct messages. Messages go out in sequence order, abandoned ones first again.
//! * Each delivery: delivery tag = the lock token as 16 bytes in .NET GUID order (the SDKs read
//!   it with `uuid.UUID(bytes_le=tag)`); header `delivery-count` (0 on first delivery); message
//!   annotations `x-opt-sequence-number` (long, increasing per queue or topic),
//!   `x-opt-enqueued-time`, `x-opt-locked-until` (timestamps), `x-opt-lock-token` (uuid), and
//!   `x-opt-deadletter-source` in dead-letter queues. Properties, application properties, body
//!   sections and footer go through as sent.
//! * Settlement on the link: `accepted` completes; `released` puts the message back as it was;
//!   `modified` puts it back, with the delivery count up if `delivery-failed`; `rejected`
//!   dead-letters it, reason and description from the error's info `DeadLetterReason` /
//!   `DeadLetterErrorDescription` (else the condition and description), which become
//!   application properties of the dead-lettered message. A receiver in settle mode second gets
//!   the applied outcome back (`rejected` without error for a dead-letter, as Service Bus does);
//!   a settlement whose lock expired gets `rejected` with `com.microsoft:message-lock-lost`.
//! * Locks last the lock duration (default 30 s); an expired lock puts the message back with
//!   the delivery count up. Locks survive their link and connection (settle or renew them through
//!   `$management` from another connection). A delivery count reaching the max delivery count
//!   (default 10) dead-letters with reason `MaxDeliveryCountExceeded`.
//! * `$management`: `com.microsoft:renew-lock` (`lock-tokens` → `expirations`),
//!   `com.microsoft:update-disposition` (`disposition-status` completed / abandoned / suspended,
//!   `lock-tokens`, `deadletter-reason`, `deadletter-description`), `com.microsoft:peek-message`
//!   (`from-sequence-number`, `message-count` → `messages`, or 204). Replies carry
//!   `statusCode` / `statusDescription` (and `status-code` / `status-description`, which CBS
//!   clients read), `correlation-id` = the request's `message-id`, and go to the link whose
//!   address is the request's `reply-to`, else to the client's receiver on the same node.
//!   A lost lock answers 410 with `errorCondition` `com.microsoft:message-lock-lost`.
//! * Not implemented: sessions, deferral, scheduled messages, transactions, filters on
//!   subscriptions (every subscription gets every message), TTL expiry, duplicate detection.

mod broker;
mod conn;
mod wire;

use std::collections::HashMap;
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Data, Header, Message as AmqpMessage, MessageId, Properties,
};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Symbol};
use tokio::sync::watch;

use broker::Broker;

/// SAS key name in [`Emulator::connection_string`].
pub const KEY_NAME: &str = "RootManageSharedAccessKey";
/// Default SAS key (any key can be set with [`Config::key`]).
pub const DEFAULT_KEY: &str = "c2VydmljZWJ1cy1lbXVsYXRvci1rZXktbm90LWEtc2VjcmV0";

/// Entities and settings of an emulator.
#[derive(Debug, Clone)]
pub struct Config {
    namespace: String,
    queues: Vec<String>,
    topics: Vec<(String, Vec<String>)>,
    lock_duration: Duration,
    max_delivery_count: u32,
    key: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            namespace: "emulator".into(),
            queues: Vec::new(),
            topics: Vec::new(),
            lock_duration: Duration::from_secs(30),
            max_delivery_count: 10,
            key: DEFAULT_KEY.into(),
        }
    }
}

impl Config {
    /// No entities, lock duration 30 s, max delivery count 10.
    pub fn new() -> Config {
        Config::default()
    }
    /// The namespace's name (informational; clients name the emulator by its address).
    pub fn namespace(mut self, name: impl Into<String>) -> Config {
        self.namespace = name.into();
        self
    }
    /// Adds a queue.
    pub fn queue(mut self, name: impl Into<String>) -> Config {
        self.queues.push(name.into());
        self
    }
    /// Adds a subscription to a topic (the topic is created with its first subscription).
    pub fn topic(mut self, topic: impl Into<String>, subscription: impl Into<String>) -> Config {
        let topic = topic.into();
        let subscription = subscription.into();
        match self.topics.iter_mut().find(|(t, _)| t.eq_ignore_ascii_case(&topic)) {
            Some((_, subs)) => subs.push(subscription),
            None => self.topics.push((topic, vec![subscription])),
        }
        self
    }
    /// Lock duration of every entity.
    pub fn lock_duration(mut self, d: Duration) -> Config {
        self.lock_duration = d;
        self
    }
    /// Deliveries after which a message is dead-lettered (`MaxDeliveryCountExceeded`).
    pub fn max_delivery_count(mut self, n: u32) -> Config {
        self.max_delivery_count = n.max(1);
        self
    }
    /// The SAS key tokens must be signed with.
    pub fn key(mut self, key: impl Into<String>) -> Config {
        self.key = key.into();
        self
    }
}

/// Counters of one queue, subscription or dead-letter queue.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// Messages waiting, not locked.
    pub available: u64,
    /// Messages locked by a receiver.
    pub locked: u64,
    /// Messages completed (or received in receive-and-delete mode).
    pub completed: u64,
    /// Messages now in this entity's `$DeadLetterQueue`.
    pub dead_lettered: u64,
    /// Deliveries made.
    pub deliveries: u64,
    /// Deliveries of a message whose delivery count was above 0.
    pub redeliveries: u64,
    /// Locks renewed.
    pub lock_renewals: u64,
    /// Locks that expired.
    pub lock_expiries: u64,
    /// The most messages locked at once.
    pub peak_locked: u64,
}

/// An application property value of a [`Message`].
pub type PropertyValue = serde_json::Value;

/// A message for [`Emulator::send`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Message {
    /// The body, sent as one data section.
    pub body: Vec<u8>,
    pub message_id: Option<String>,
    pub content_type: Option<String>,
    /// Strings, booleans, integers (long), floats (double), null; arrays and objects as JSON text.
    pub application_properties: Vec<(String, PropertyValue)>,
}

impl Message {
    /// A message with this body and nothing else.
    pub fn text(body: impl Into<String>) -> Message {
        Message { body: body.into().into_bytes(), ..Default::default() }
    }

    fn encode(&self) -> Vec<u8> {
        let mut props = ApplicationProperties::builder();
        for (k, v) in &self.application_properties {
            let v = match v {
                serde_json::Value::Null => SimpleValue::Null,
                serde_json::Value::Bool(b) => SimpleValue::Bool(*b),
                serde_json::Value::Number(n) => match (n.as_i64(), n.as_f64()) {
                    (Some(i), _) => SimpleValue::Long(i),
                    (None, Some(f)) => SimpleValue::Double(f.into()),
                    _ => SimpleValue::String(n.to_string()),
                },
                serde_json::Value::String(s) => SimpleValue::String(s.clone()),
                other => SimpleValue::String(other.to_string()),
            };
            props = props.insert(k.clone(), v);
        }
        let message = AmqpMessage::builder()
            .header(Header { durable: true, ..Default::default() })
            .properties(Properties {
                message_id: self.message_id.clone().map(MessageId::String),
                content_type: self.content_type.clone().map(Symbol::from),
                ..Default::default()
            })
            .application_properties(props.build())
            .body(Data(Binary::from(self.body.clone())))
            .build();
        use fe2o3_amqp::types::messaging::message::__private::Serializable;
        serde_amqp::to_vec(&Serializable(message)).expect("messages always encode")
    }
}

/// Handle to a running emulator; clones share it.
#[derive(Clone)]
pub struct Emulator {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("servicebus::Emulator").field("addr", &self.inner.addr).finish()
    }
}

pub(crate) struct Inner {
    pub(crate) addr: SocketAddr,
    pub(crate) broker: Arc<Broker>,
    pub(crate) key_name: String,
    pub(crate) key: String,
    namespace: String,
    connections: Mutex<HashMap<u64, (std::net::TcpStream, watch::Sender<bool>)>>,
    next_id: AtomicU64,
    shutdown: watch::Sender<bool>,
}

impl Emulator {
    /// Starts on 127.0.0.1 with a free port.
    pub async fn start(cfg: Config) -> anyhow::Result<Emulator> {
        Emulator::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), cfg).await
    }

    /// Starts on this address.
    pub async fn start_on(addr: SocketAddr, cfg: Config) -> anyhow::Result<Emulator> {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            addr,
            broker: Broker::new(&cfg),
            key_name: KEY_NAME.to_string(),
            key: cfg.key.clone(),
            namespace: cfg.namespace.clone(),
            connections: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            shutdown: watch::channel(false).0,
        });
        tokio::spawn(accept_loop(inner.clone(), listener));
        tokio::spawn(janitor(inner.clone()));
        tracing::debug!(%addr, namespace = %inner.namespace, "servicebus emulator: listening");
        Ok(Emulator { inner })
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// `Endpoint=sb://127.0.0.1:PORT;SharedAccessKeyName=..;SharedAccessKey=..;UseDevelopmentEmulator=true`
    pub fn connection_string(&self) -> String {
        format!(
            "Endpoint=sb://{};SharedAccessKeyName={};SharedAccessKey={};UseDevelopmentEmulator=true",
            self.inner.addr, self.inner.key_name, self.inner.key
        )
    }

    /// (key name, key).
    pub fn key(&self) -> (String, String) {
        (self.inner.key_name.clone(), self.inner.key.clone())
    }

    /// Enqueues a message to a queue or topic, as a client's send would.
    pub fn send(&self, entity: &str, msg: Message) -> anyhow::Result<()> {
        let target = self.inner.broker.send_target(entity).with_context(|| format!("no queue or topic {entity:?}"))?;
        let parts = wire::Parts::parse(&bytes::Bytes::from(msg.encode())).map_err(anyhow::Error::msg)?;
        self.inner.broker.enqueue(&target, vec![parts]).map_err(anyhow::Error::msg)
    }

    /// Counters of `q`, `t/Subscriptions/s`, `q/$DeadLetterQueue` (case-insensitive).
    pub fn stats(&self, entity_path: &str) -> anyhow::Result<Stats> {
        self.inner.broker.stats(entity_path).with_context(|| format!("no entity {entity_path:?}"))
    }

    /// Shuts down every client connection's socket (no AMQP close). Locks stay.
    pub fn drop_connections(&self) {
        let conns = self.inner.connections.lock().unwrap_or_else(|e| e.into_inner());
        for (stream, kill) in conns.values() {
            let _ = stream.shutdown(Shutdown::Both);
            let _ = kill.send(true);
        }
    }

    /// Open client connections.
    pub fn connections(&self) -> usize {
        self.inner.connections.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Stops listening and drops every connection.
    pub fn shutdown(&self) {
        let _ = self.inner.shutdown.send(true);
        self.drop_connections();
    }
}

async fn accept_loop(inner: Arc<Inner>, listener: tokio::net::TcpListener) {
    let mut stop = inner.shutdown.subscribe();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "servicebus emulator: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (kill, killed) = watch::channel(false);
        match stream.into_std().and_then(|s| Ok((s.try_clone()?, s))) {
            Ok((clone, std_stream)) => {
                inner.connections.lock().unwrap_or_else(|e| e.into_inner()).insert(id, (clone, kill));
                let Ok(stream) = tokio::net::TcpStream::from_std(std_stream) else { continue };
                let inner = inner.clone();
                tokio::spawn(async move {
                    if let Err(e) = conn::serve(inner.clone(), stream, killed).await {
                        tracing::debug!(error = %e, "servicebus emulator: connection ended");
                    }
                    inner.connections.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                });
            }
            Err(e) => tracing::warn!(error = %e, "servicebus emulator: socket setup failed"),
        }
    }
}

/// Expires locks when they are due.
async fn janitor(inner: Arc<Inner>) {
    let mut stop = inner.shutdown.subscribe();
    loop {
        let next = inner.broker.expire_locks();
        let sleep = async {
            match next {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sleep => {}
            _ = inner.broker.janitor.notified() => {}
            _ = stop.changed() => return,
        }
    }
}
