//! In-process Azure Event Hubs emulator (AMQP 1.0) for integration tests.
//!
//! An AMQP 1.0 server built on `fe2o3-amqp` (feature `acceptor`) that speaks enough of the
//! Event Hubs wire protocol for the real `azure_messaging_eventhubs` 0.16 `ConsumerClient`:
//! SASL ANONYMOUS, CBS `put-token` on `$cbs` (every token is accepted), `$management` READ
//! for `com.microsoft:eventhub` and `com.microsoft:partition`, and partition receive links
//! (`amqps://NS/HUB/ConsumerGroups/CG/Partitions/N`) with the
//! `apache.org:selector-filter:string` start-position filter, owner level (epoch) and
//! `amqp:link:stolen`. Plain TCP on 127.0.0.1 only; no TLS.
//!
//! # Usage
//!
//! ```ignore
//! mod common;
//! use common::eventhubs_emulator::*;
//!
//! let emu = Emulator::start(EmulatorConfig::new("hub", 4)).await?;
//! emu.append(0, b"hello".to_vec(), vec![("k".into(), "v".into())]);
//! let consumer = azure_messaging_eventhubs::ConsumerClient::builder()
//!     .with_custom_endpoint(emu.endpoint())          // "amqp://127.0.0.1:PORT"
//!     .open_with_connection_string(&emu.connection_string(), None)
//!     .await?;
//! ```
//!
//! # API
//!
//! * [`EmulatorConfig`] `{ namespace, hub, partitions }`: partition ids are `"0".."N-1"`; every
//!   consumer group name is accepted (no consumer group has to be declared).
//! * [`Emulator::start`] listens on `127.0.0.1:0`; [`Emulator`] is a cheap `Clone` handle.
//! * [`Emulator::endpoint`] `"amqp://127.0.0.1:PORT"` (for `with_custom_endpoint`),
//!   [`Emulator::connection_string`] `"Endpoint=sb://NS/;SharedAccessKeyName=..;SharedAccessKey=..;EntityPath=HUB"`.
//! * [`Emulator::append`] / [`Emulator::append_at`] add an event to a partition and return its
//!   [`AppendResult`]. Sequence numbers start at 0 per partition. Offsets are decimal strings of
//!   increasing integers per partition (byte-position-like: the first event has offset `"0"`, each
//!   next offset grows by `body.len() + 64`, so offsets differ from sequence numbers on purpose).
//!   Enqueued times are milliseconds since the Unix epoch and never decrease within a partition
//!   (`append` uses the wall clock, `append_at` the given time; both are clamped to be at least the
//!   partition's previous enqueued time). [`Emulator::append_event`] takes an [`EmulatorEvent`]
//!   that can also carry extra message annotations (e.g. IoT Central's `iotcentral-device-id`),
//!   a partition key (`x-opt-partition-key`) and a content type.
//! * Faults: [`Emulator::detach_receivers`] (detach every receive link, optionally of one
//!   partition, with an AMQP error condition such as `amqp:link:detach-forced`),
//!   [`Emulator::drop_connections`] (TCP shutdown of every client connection, no AMQP close),
//!   [`Emulator::set_busy`] (the next `n` partition receive-link attaches or `$management` READ
//!   requests, whichever come first, fail with `com.microsoft:server-busy`; a READ answers
//!   status 503 with that error condition, an attach is refused with a null source and a closing
//!   detach carrying the condition).
//! * Observation: [`Emulator::active_receivers`], [`Emulator::connections`],
//!   [`Emulator::busy_remaining`], [`Emulator::partition_len`].
//! * [`Emulator::shutdown`] stops listening and drops every connection.
//!
//! # Semantics
//!
//! * Start positions (selector filter): `x-opt-offset > '-1'` (earliest), `> '@latest'` (only
//!   events appended after the attach), `x-opt-offset >`/`>= 'N'`,
//!   `x-opt-sequence-number >`/`>= 'N'`, `x-opt-enqueued-time >`/`>= 'MS'`. A link without a
//!   filter starts at the earliest event. Events appended later are delivered live, within the
//!   link credit granted by the client (the SDK's prefetch).
//! * Each event is one pre-settled transfer with message annotations `x-opt-sequence-number`
//!   (long), `x-opt-offset` (string), `x-opt-enqueued-time` (timestamp), the body as one data
//!   section and the given application properties (string values).
//! * Owner level (`com.microsoft:epoch` link property), per (consumer group, partition), as
//!   Event Hubs documents it: a receiver with epoch `e2 >= e1` detaches the existing receivers
//!   (epoch or not) with `amqp:link:stolen`; an attach with a lower epoch, or without an epoch
//!   while an epoch receiver exists, is refused with `amqp:link:stolen`.
//! * The server echoes Detach, End and Close, and tolerates peers that vanish.
//!
//! The emulator lives until [`Emulator::shutdown`] or until its tokio runtime ends (dropping the
//! handles does not stop it).
//!
//! Crates used here: `fe2o3-amqp` 0.16 with feature `acceptor` (server side), `tokio` 1.54
//! (rt-multi-thread, macros, sync, time, net), `anyhow` 1, `tracing` 0.1; `tokio-util` must stay
//! pinned at =0.7.19 in the graph for fe2o3-amqp 0.16.2 to build.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fe2o3_amqp::acceptor::{
    ConnectionAcceptor, LinkAcceptor, LinkEndpoint, ListenerSessionHandle, SaslAnonymousMechanism, SessionAcceptor,
};
use fe2o3_amqp::link::{DetachError, SendError};
use fe2o3_amqp::types::definitions::{self, ErrorCondition, Role};
use fe2o3_amqp::types::messaging::{
    AmqpValue, ApplicationProperties, Body, Data, Message, MessageAnnotations, Properties, Source, Target,
    TargetArchetype,
};
use fe2o3_amqp::types::performatives::Attach;
use fe2o3_amqp::types::primitives::{Array, Binary, OrderedMap, SimpleValue, Symbol, Timestamp, Value};
use fe2o3_amqp::{Delivery, Receiver, Sendable, Sender};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// SAS key name used in [`Emulator::connection_string`] (any key is accepted).
pub const EMULATOR_SAS_KEY_NAME: &str = "RootManageSharedAccessKey";
/// SAS key used in [`Emulator::connection_string`] (any key is accepted).
pub const EMULATOR_SAS_KEY: &str = "ZW11bGF0b3Ita2V5LW5vdC1hLXNlY3JldA==";
/// Default namespace of [`EmulatorConfig::new`].
pub const EMULATOR_NAMESPACE: &str = "emulator.servicebus.windows.net";

const SELECTOR_FILTER_NAME: &str = "apache.org:selector-filter:string";
const EPOCH_PROPERTY: &str = "com.microsoft:epoch";
const LINK_STOLEN: &str = "amqp:link:stolen";
const SERVER_BUSY: &str = "com.microsoft:server-busy";
/// Offsets grow by `body.len() + OFFSET_OVERHEAD` per event.
const OFFSET_OVERHEAD: i64 = 64;
/// Upper bound for every server-side close/detach handshake, so that no server task can hang.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Emulator configuration.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// Fully qualified namespace announced in the connection string, e.g.
    /// `"emulator.servicebus.windows.net"`. Clients use it as AMQP hostname and in link addresses.
    pub namespace: String,
    /// Event hub name.
    pub hub: String,
    /// Number of partitions; the partition ids are `"0"`, `"1"`, ...
    pub partitions: u32,
}

impl EmulatorConfig {
    /// `namespace` = [`EMULATOR_NAMESPACE`].
    pub fn new(hub: impl Into<String>, partitions: u32) -> Self {
        Self { namespace: EMULATOR_NAMESPACE.to_string(), hub: hub.into(), partitions }
    }
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        Self::new("hub", 4)
    }
}

/// Where an appended event landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendResult {
    pub sequence_number: i64,
    pub offset: String,
    pub enqueued_time_ms: i64,
}

/// Handle to a running emulator. Cloning is cheap (an `Arc` inside).
#[derive(Clone)]
pub struct Emulator {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator").field("addr", &self.inner.addr).field("hub", &self.inner.cfg.hub).finish()
    }
}

struct Inner {
    cfg: EmulatorConfig,
    addr: SocketAddr,
    created_at_ms: i64,
    partitions: Vec<PartitionState>,
    receivers: Mutex<HashMap<u64, ReceiverEntry>>,
    /// Connection id -> a clone of the client socket, used to shut it down.
    connections: Mutex<HashMap<u64, std::net::TcpStream>>,
    busy: AtomicU32,
    next_id: AtomicU64,
    shutdown: watch::Sender<bool>,
    accept_task: Mutex<Option<JoinHandle<()>>>,
}

struct PartitionState {
    log: Mutex<PartitionLog>,
    /// Number of events in the log; bumped on every append to wake live receivers.
    appended: watch::Sender<usize>,
}

#[derive(Default)]
struct PartitionLog {
    events: Vec<Arc<StoredEvent>>,
    next_offset: i64,
}

struct StoredEvent {
    sequence_number: i64,
    offset: i64,
    enqueued_time_ms: i64,
    body: Vec<u8>,
    properties: Vec<(String, String)>,
    annotations: Vec<(String, String)>,
    partition_key: Option<String>,
    content_type: Option<String>,
}

/// A fully specified event for [`Emulator::append_event`].
#[derive(Debug, Clone, Default)]
pub struct EmulatorEvent {
    /// The body, sent as one data section.
    pub body: Vec<u8>,
    /// Application properties (string values).
    pub app_properties: Vec<(String, String)>,
    /// Extra message annotations (symbol keys, string values), e.g. IoT Central's
    /// `iotcentral-device-id`; the SDK shows them in `ReceivedEventData::system_properties()`.
    pub annotations: Vec<(String, String)>,
    /// Sent as the `x-opt-partition-key` annotation.
    pub partition_key: Option<String>,
    /// The AMQP `content-type` property.
    pub content_type: Option<String>,
    /// Enqueued time in ms since the Unix epoch; `None` = now. Clamped to be non-decreasing.
    pub enqueued_time_ms: Option<i64>,
}

struct ReceiverEntry {
    partition: u32,
    consumer_group: String,
    epoch: Option<i64>,
    ctl: mpsc::UnboundedSender<LinkControl>,
}

enum LinkControl {
    Detach { condition: String, description: String },
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl Emulator {
    /// Starts the emulator on `127.0.0.1:0` (plain TCP). Must run inside a tokio runtime; the
    /// emulator lives as long as that runtime or until [`Emulator::shutdown`].
    pub async fn start(cfg: EmulatorConfig) -> anyhow::Result<Emulator> {
        Emulator::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), cfg).await
    }

    /// Starts the emulator on this address.
    pub async fn start_on(addr: SocketAddr, cfg: EmulatorConfig) -> anyhow::Result<Emulator> {
        anyhow::ensure!(cfg.partitions > 0, "an event hub needs at least one partition");
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let partitions = (0..cfg.partitions)
            .map(|_| PartitionState { log: Mutex::new(PartitionLog::default()), appended: watch::channel(0usize).0 })
            .collect();
        let (shutdown, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            cfg,
            addr,
            created_at_ms: now_ms(),
            partitions,
            receivers: Mutex::new(HashMap::new()),
            connections: Mutex::new(HashMap::new()),
            busy: AtomicU32::new(0),
            next_id: AtomicU64::new(1),
            shutdown,
            accept_task: Mutex::new(None),
        });
        let task = tokio::spawn(accept_loop(inner.clone(), listener));
        *inner.accept_task.lock().unwrap() = Some(task);
        tracing::debug!(%addr, hub = %inner.cfg.hub, "Event Hubs emulator listening");
        Ok(Emulator { inner })
    }

    /// `"amqp://127.0.0.1:PORT"`, for `ConsumerClientBuilder::with_custom_endpoint`.
    pub fn endpoint(&self) -> String {
        format!("amqp://{}", self.inner.addr)
    }

    /// The listening address.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// `"Endpoint=sb://NS/;SharedAccessKeyName=...;SharedAccessKey=...;EntityPath=HUB"`.
    pub fn connection_string(&self) -> String {
        format!(
            "Endpoint=sb://{}/;SharedAccessKeyName={};SharedAccessKey={};EntityPath={}",
            self.inner.cfg.namespace, EMULATOR_SAS_KEY_NAME, EMULATOR_SAS_KEY, self.inner.cfg.hub
        )
    }

    /// `"Endpoint=sb://127.0.0.1:PORT;SharedAccessKeyName=..;SharedAccessKey=..;UseDevelopmentEmulator=true;EntityPath=HUB"`:
    /// the form Microsoft's SDKs (e.g. PyPI `azure-eventhub`) take for a local emulator.
    pub fn development_connection_string(&self) -> String {
        format!(
            "Endpoint=sb://{};SharedAccessKeyName={};SharedAccessKey={};UseDevelopmentEmulator=true;EntityPath={}",
            self.inner.addr, EMULATOR_SAS_KEY_NAME, EMULATOR_SAS_KEY, self.inner.cfg.hub
        )
    }

    /// The configured namespace.
    pub fn namespace(&self) -> &str {
        &self.inner.cfg.namespace
    }

    /// The configured event hub name.
    pub fn hub(&self) -> &str {
        &self.inner.cfg.hub
    }

    /// Partition ids `"0".."N-1"`.
    pub fn partition_ids(&self) -> Vec<String> {
        (0..self.inner.cfg.partitions).map(|p| p.to_string()).collect()
    }

    /// Appends an event enqueued "now" (wall clock, never earlier than the previous event).
    /// Panics if the partition does not exist.
    pub fn append(&self, partition: u32, body: Vec<u8>, app_properties: Vec<(String, String)>) -> AppendResult {
        self.append_at(partition, body, app_properties, now_ms())
    }

    /// Appends an event with an explicit enqueued time (ms since the Unix epoch), clamped so that
    /// enqueued times never decrease within a partition. Panics if the partition does not exist.
    pub fn append_at(
        &self,
        partition: u32,
        body: Vec<u8>,
        app_properties: Vec<(String, String)>,
        enqueued_time_ms: i64,
    ) -> AppendResult {
        self.append_event(
            partition,
            EmulatorEvent { body, app_properties, enqueued_time_ms: Some(enqueued_time_ms), ..Default::default() },
        )
    }

    /// Appends an event with annotations, partition key or content type. Panics if the
    /// partition does not exist.
    pub fn append_event(&self, partition: u32, event: EmulatorEvent) -> AppendResult {
        let state = self
            .inner
            .partitions
            .get(partition as usize)
            .unwrap_or_else(|| panic!("emulator: partition {partition} does not exist"));
        let requested_time = event.enqueued_time_ms.unwrap_or_else(now_ms);
        let (result, len) = {
            let mut log = state.log.lock().unwrap();
            let sequence_number = log.events.len() as i64;
            let offset = log.next_offset;
            let enqueued_time_ms = match log.events.last() {
                Some(last) => requested_time.max(last.enqueued_time_ms),
                None => requested_time,
            };
            log.next_offset += event.body.len() as i64 + OFFSET_OVERHEAD;
            log.events.push(Arc::new(StoredEvent {
                sequence_number,
                offset,
                enqueued_time_ms,
                body: event.body,
                properties: event.app_properties,
                annotations: event.annotations,
                partition_key: event.partition_key,
                content_type: event.content_type,
            }));
            (AppendResult { sequence_number, offset: offset.to_string(), enqueued_time_ms }, log.events.len())
        };
        state.appended.send_replace(len);
        result
    }

    /// Number of events in a partition.
    pub fn partition_len(&self, partition: u32) -> usize {
        self.inner.partitions[partition as usize].log.lock().unwrap().events.len()
    }

    /// Detaches (closing detach with `condition`, e.g. `"amqp:link:detach-forced"`) every active
    /// receive link, or only those of `partition`.
    pub fn detach_receivers(&self, partition: Option<u32>, condition: &str) {
        let victims: Vec<ReceiverEntry> = {
            let mut receivers = self.inner.receivers.lock().unwrap();
            let ids: Vec<u64> = receivers
                .iter()
                .filter(|(_, e)| partition.is_none_or(|p| p == e.partition))
                .map(|(id, _)| *id)
                .collect();
            ids.iter().filter_map(|id| receivers.remove(id)).collect()
        };
        for v in victims {
            let _ = v.ctl.send(LinkControl::Detach {
                condition: condition.to_string(),
                description: format!("The emulator detached the receiver ({condition})."),
            });
        }
    }

    /// Abruptly closes every client TCP connection (socket shutdown, no AMQP close frame).
    pub fn drop_connections(&self) {
        let conns = self.inner.connections.lock().unwrap();
        for s in conns.values() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// The next `n` partition receive-link attaches or `$management` READ requests fail with
    /// `com.microsoft:server-busy` (each failed operation consumes one). `set_busy(0)` clears.
    pub fn set_busy(&self, n: u32) {
        self.inner.busy.store(n, Ordering::SeqCst);
    }

    /// How many busy failures are still pending.
    pub fn busy_remaining(&self) -> u32 {
        self.inner.busy.load(Ordering::SeqCst)
    }

    /// Active receive links on `partition` (all consumer groups).
    pub fn active_receivers(&self, partition: u32) -> usize {
        self.inner.receivers.lock().unwrap().values().filter(|e| e.partition == partition).count()
    }

    /// Open client TCP connections.
    pub fn connections(&self) -> usize {
        self.inner.connections.lock().unwrap().len()
    }

    /// Stops listening, drops every connection and waits (briefly) for them to go away.
    pub async fn shutdown(self) {
        let _ = self.inner.shutdown.send(true);
        let task = self.inner.accept_task.lock().unwrap().take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
        self.drop_connections();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.connections() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Inner {
    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Consumes one unit of the busy budget, if any.
    fn take_busy(&self) -> bool {
        self.busy.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
    }
}

// ---------------------------------------------------------------------------------------------
// Connections and sessions
// ---------------------------------------------------------------------------------------------

async fn accept_loop(inner: Arc<Inner>, listener: tokio::net::TcpListener) {
    let mut shutdown = inner.shutdown.subscribe();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tracing::debug!(%peer, "emulator: TCP connection accepted");
                    tokio::spawn(serve_connection(inner.clone(), stream));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "emulator: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

struct ConnectionGuard {
    inner: Arc<Inner>,
    id: u64,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if let Ok(mut conns) = self.inner.connections.lock() {
            conns.remove(&self.id);
        }
    }
}

async fn serve_connection(inner: Arc<Inner>, stream: tokio::net::TcpStream) {
    // Keep a clone of the socket so that `drop_connections` can shut it down under the AMQP
    // connection engine's feet.
    let stream = match stream.into_std() {
        Ok(s) => s,
        Err(_) => return,
    };
    let killer = match stream.try_clone() {
        Ok(k) => k,
        Err(_) => return,
    };
    let stream = match tokio::net::TcpStream::from_std(stream) {
        Ok(s) => s,
        Err(_) => return,
    };
    let id = inner.next_id();
    inner.connections.lock().unwrap().insert(id, killer);
    let _guard = ConnectionGuard { inner: inner.clone(), id };

    let acceptor = ConnectionAcceptor::builder()
        .container_id("eventhubs-emulator")
        .sasl_acceptor(SaslAnonymousMechanism::new())
        .build();
    let mut connection =
        match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(crate::pad::PaddedIo::new(stream))).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::debug!(error = ?e, "emulator: AMQP open failed");
                return;
            }
            Err(_) => return,
        };
    let session_acceptor = SessionAcceptor::new();
    while let Some(incoming) = connection.next_incoming_session().await {
        match session_acceptor.accept_incoming_session(incoming, &mut connection).await {
            Ok(session) => {
                tokio::spawn(serve_session(inner.clone(), session));
            }
            Err(e) => {
                tracing::debug!(error = ?e, "emulator: session begin failed");
                break;
            }
        }
    }
    // The connection engine answers the peer's Close itself; this only collects its outcome.
    let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, connection.on_close()).await;
    tracing::debug!(id, "emulator: connection finished");
}

/// `LinkAcceptor::new()`'s type.
type DefaultLinkAcceptor = LinkAcceptor<fn(Source) -> Option<Source>, fn(Target) -> Option<Target>>;

/// Reply links of one session, by the client node address they deliver to (`reply-to`).
type ReplyRoutes = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Message<Body<Value>>>>>>;

#[derive(Clone, Copy, Debug)]
enum RequestNode {
    Cbs,
    Management,
}

impl RequestNode {
    fn address(self) -> &'static str {
        match self {
            RequestNode::Cbs => "$cbs",
            RequestNode::Management => "$management",
        }
    }
}

async fn serve_session(inner: Arc<Inner>, mut session: ListenerSessionHandle) {
    let routes: ReplyRoutes = Arc::new(Mutex::new(HashMap::new()));
    // Events go out pre-settled, as Event Hubs sends them, whatever settle mode the client asks
    // for (pyamqp asks for unsettled and never settles, so unsettled events would stall the link).
    let acceptor: DefaultLinkAcceptor = LinkAcceptor::builder()
        .supported_sender_settle_modes(fe2o3_amqp::acceptor::SupportedSenderSettleModes::Settled)
        .fallback_sender_settle_mode(fe2o3_amqp::types::definitions::SenderSettleMode::Settled)
        .build();
    // Publishing links settle in mode first: pyamqp's senders (Microsoft's Python SDKs) do not
    // answer a receiver's unsettled disposition in mode second and would wait forever.
    let publish_acceptor: DefaultLinkAcceptor = LinkAcceptor::builder()
        .supported_receiver_settle_modes(fe2o3_amqp::acceptor::SupportedReceiverSettleModes::First)
        .fallback_receiver_settle_mode(fe2o3_amqp::types::definitions::ReceiverSettleMode::First)
        .build();
    while let Some(attach) = session.next_incoming_attach().await {
        match attach.role {
            // The client sends: requests to $cbs / $management.
            Role::Sender => {
                let node = match target_address(&attach).as_deref() {
                    Some("$cbs") => Some(RequestNode::Cbs),
                    Some("$management") => Some(RequestNode::Management),
                    _ => None,
                };
                match node {
                    Some(node) => match acceptor.accept_incoming_attach(attach, &mut session).await {
                        Ok(LinkEndpoint::Receiver(receiver)) => {
                            tokio::spawn(request_loop(inner.clone(), node, receiver, routes.clone()));
                        }
                        Ok(LinkEndpoint::Sender(_)) => {}
                        Err(e) => tracing::debug!(error = ?e, "emulator: request link attach failed"),
                    },
                    None => {
                        let addr = target_address(&attach).unwrap_or_default();
                        match parse_send_address(&inner, &addr) {
                            Ok(partition) => {
                                match publish_acceptor.accept_incoming_attach(attach, &mut session).await {
                                    Ok(LinkEndpoint::Receiver(receiver)) => {
                                        tokio::spawn(publish_loop(inner.clone(), receiver, partition));
                                    }
                                    Ok(LinkEndpoint::Sender(_)) => {}
                                    Err(e) => tracing::debug!(error = ?e, "emulator: publishing link attach failed"),
                                }
                            }
                            Err((condition, description)) => {
                                let mut attach = attach;
                                attach.target = None;
                                refuse(&acceptor, &mut session, attach, condition, description).await;
                            }
                        }
                    }
                }
            }
            // The client receives: replies from $cbs / $management, or events.
            Role::Receiver => {
                let source = source_address(&attach).unwrap_or_default();
                if source == "$cbs" || source == "$management" {
                    let reply_to = target_address(&attach).unwrap_or_default();
                    match acceptor.accept_incoming_attach(attach, &mut session).await {
                        Ok(LinkEndpoint::Sender(sender)) => {
                            let (tx, rx) = mpsc::unbounded_channel();
                            routes.lock().unwrap().insert(reply_to, tx);
                            tokio::spawn(reply_loop(sender, rx));
                        }
                        Ok(LinkEndpoint::Receiver(_)) => {}
                        Err(e) => tracing::debug!(error = ?e, "emulator: reply link attach failed"),
                    }
                } else {
                    attach_partition_receiver(&inner, &acceptor, &mut session, attach, &source).await;
                }
            }
        }
    }
    tracing::trace!("emulator: session finished");
}

fn target_address(attach: &Attach) -> Option<String> {
    let target = attach.target.as_deref()?;
    #[allow(unreachable_patterns)]
    match target {
        TargetArchetype::Target(t) => t.address.clone(),
        _ => None,
    }
}

fn source_address(attach: &Attach) -> Option<String> {
    attach.source.as_ref()?.address.clone()
}

fn amqp_error(condition: &str, description: impl Into<String>) -> definitions::Error {
    definitions::Error::new(ErrorCondition::Custom(Symbol::from(condition)), Some(description.into()), None)
}

/// Refuses an attach the way Event Hubs does: answer the attach with a null terminus (the caller
/// nulls `source` for client receivers, `target` for client senders), then close the link with
/// the error. The closing handshake runs in its own task.
async fn refuse(
    acceptor: &DefaultLinkAcceptor,
    session: &mut ListenerSessionHandle,
    attach: Attach,
    condition: &str,
    description: String,
) {
    tracing::debug!(link = %attach.name, %condition, %description, "emulator: refusing attach");
    let error = amqp_error(condition, description);
    match acceptor.accept_incoming_attach(attach, session).await {
        Ok(LinkEndpoint::Sender(sender)) => {
            tokio::spawn(async move {
                let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, sender.close_with_error(error)).await;
            });
        }
        Ok(LinkEndpoint::Receiver(receiver)) => {
            tokio::spawn(async move {
                let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, receiver.close_with_error(error)).await;
            });
        }
        Err(e) => tracing::debug!(error = ?e, "emulator: refused attach did not complete"),
    }
}

/// Answers the peer's detach of a server-side sender link with the matching detach.
async fn echo_detach(sender: Sender, err: DetachError) {
    match err {
        DetachError::ClosedByRemote | DetachError::RemoteClosedWithError(_) => {
            let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, sender.close()).await;
        }
        DetachError::DetachedByRemote | DetachError::RemoteDetachedWithError(_) => {
            let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, sender.detach()).await;
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// $cbs and $management
// ---------------------------------------------------------------------------------------------

async fn reply_loop(mut sender: Sender, mut replies: mpsc::UnboundedReceiver<Message<Body<Value>>>) {
    loop {
        tokio::select! {
            reply = replies.recv() => match reply {
                Some(message) => {
                    if let Err(e) = sender.send(message).await {
                        tracing::debug!(error = ?e, "emulator: reply send failed");
                        return;
                    }
                }
                None => return,
            },
            err = sender.on_detach() => {
                echo_detach(sender, err).await;
                return;
            }
        }
    }
}

async fn request_loop(inner: Arc<Inner>, node: RequestNode, mut receiver: Receiver, routes: ReplyRoutes) {
    loop {
        // `recv` answers a remote detach itself.
        let delivery: Delivery<Body<Value>> = match receiver.recv().await {
            Ok(d) => d,
            Err(e) => {
                tracing::trace!(error = ?e, ?node, "emulator: request link ended");
                return;
            }
        };
        if let Err(e) = receiver.accept(&delivery).await {
            tracing::debug!(error = ?e, "emulator: cannot accept request");
            return;
        }
        let request = delivery.into_message();
        let (status, description, condition, body) = match node {
            RequestNode::Cbs => (202, "Accepted".to_string(), None, Value::Null),
            RequestNode::Management => handle_management(&inner, &request),
        };
        let props = request.properties.clone().unwrap_or_default();
        let mut app = ApplicationProperties::builder()
            .insert("status-code", SimpleValue::Int(status))
            .insert("status-description", SimpleValue::String(description));
        if let Some(condition) = condition {
            app = app.insert("error-condition", SimpleValue::Symbol(Symbol::from(condition)));
        }
        let reply = Message::builder()
            .properties(Properties {
                correlation_id: props.message_id.clone(),
                to: props.reply_to.clone(),
                ..Default::default()
            })
            .application_properties(app.build())
            .body(Body::Value(AmqpValue(body)))
            .build();
        // Clients without `reply-to` (pyamqp, under Microsoft's Python SDKs) read replies on a
        // receiver whose own address is the node's.
        let reply_to = props.reply_to.unwrap_or_else(|| node.address().to_string());
        let route = routes.lock().unwrap().get(&reply_to).cloned();
        match route {
            Some(tx) => {
                let _ = tx.send(reply);
            }
            None => tracing::debug!(%reply_to, "emulator: no reply link for request"),
        }
    }
}

fn app_prop_string(message: &Message<Body<Value>>, key: &str) -> Option<String> {
    match message.application_properties.as_ref()?.get(key)? {
        SimpleValue::String(s) => Some(s.clone()),
        SimpleValue::Symbol(s) => Some(s.0.clone()),
        other => Some(format!("{other:?}")),
    }
}

/// Returns (status code, description, error condition, body).
fn handle_management(inner: &Inner, request: &Message<Body<Value>>) -> (i32, String, Option<&'static str>, Value) {
    let operation = app_prop_string(request, "operation").unwrap_or_default();
    let entity_type = app_prop_string(request, "type").unwrap_or_default();
    if operation != "READ" {
        return (
            501,
            format!("Operation '{operation}' is not implemented by the emulator."),
            Some("amqp:not-implemented"),
            Value::Null,
        );
    }
    if inner.take_busy() {
        return (503, "The server is busy (emulator fault injection).".to_string(), Some(SERVER_BUSY), Value::Null);
    }
    let name = app_prop_string(request, "name").unwrap_or_default();
    if !name.eq_ignore_ascii_case(&inner.cfg.hub) {
        return (
            404,
            format!("The messaging entity '{name}' could not be found."),
            Some("amqp:not-found"),
            Value::Null,
        );
    }
    let mut map: OrderedMap<Value, Value> = OrderedMap::new();
    let mut put = |k: &str, v: Value| {
        map.insert(Value::String(k.to_string()), v);
    };
    match entity_type.as_str() {
        "com.microsoft:eventhub" => {
            put("name", Value::String(inner.cfg.hub.clone()));
            put("type", Value::String(entity_type.clone()));
            put("created_at", Value::Timestamp(Timestamp::from_milliseconds(inner.created_at_ms)));
            put("partition_count", Value::Int(inner.cfg.partitions as i32));
            let ids: Vec<Value> = (0..inner.cfg.partitions).map(|p| Value::String(p.to_string())).collect();
            put("partition_ids", Value::Array(Array::from(ids)));
        }
        "com.microsoft:partition" => {
            let partition = app_prop_string(request, "partition").unwrap_or_default();
            let state = partition.parse::<u32>().ok().and_then(|p| inner.partitions.get(p as usize));
            let Some(state) = state else {
                return (
                    400,
                    "The specified partition is invalid for an EventHub partition sender or receiver.".to_string(),
                    Some("com.microsoft:argument-out-of-range"),
                    Value::Null,
                );
            };
            let log = state.log.lock().unwrap();
            let (last_seq, last_offset, last_time) = match log.events.last() {
                Some(e) => (e.sequence_number, e.offset.to_string(), e.enqueued_time_ms),
                // An empty partition: the Azure SDKs map CE zero to "no time".
                None => (-1, "-1".to_string(), -62_135_596_800_000),
            };
            put("name", Value::String(inner.cfg.hub.clone()));
            put("type", Value::String(entity_type.clone()));
            put("partition", Value::String(partition.clone()));
            put("begin_sequence_number", Value::Long(0));
            put("last_enqueued_sequence_number", Value::Long(last_seq));
            put("last_enqueued_offset", Value::String(last_offset));
            put("last_enqueued_time_utc", Value::Timestamp(Timestamp::from_milliseconds(last_time)));
            put("is_partition_empty", Value::Bool(log.events.is_empty()));
            put("last_enqueued_sequence_number_epoch", Value::Long(0));
        }
        other => return (400, format!("Unknown entity type '{other}'."), Some("amqp:not-implemented"), Value::Null),
    }
    (200, "OK".to_string(), None, Value::Map(map))
}

// ---------------------------------------------------------------------------------------------
// Partition receivers
// ---------------------------------------------------------------------------------------------

/// Start position from the selector filter. Events are ordered by every one of these keys, so
/// the predicate is monotonic along a partition.
#[derive(Debug, Clone, Copy)]
enum StartPosition {
    Earliest,
    Latest,
    Offset { value: i64, inclusive: bool },
    Sequence { value: i64, inclusive: bool },
    EnqueuedTime { value: i64, inclusive: bool },
}

impl StartPosition {
    fn parse(expr: &str) -> Result<Self, String> {
        let expr = expr.trim();
        let (field, rest) = expr
            .split_once(|c: char| c.is_whitespace() || c == '>' || c == '<' || c == '=')
            .map(|(f, _)| (f, &expr[f.len()..]))
            .ok_or_else(|| format!("cannot parse selector '{expr}'"))?;
        let rest = rest.trim_start();
        let (inclusive, rest) = if let Some(r) = rest.strip_prefix(">=") {
            (true, r)
        } else if let Some(r) = rest.strip_prefix('>') {
            (false, r)
        } else {
            return Err(format!("unsupported operator in selector '{expr}'"));
        };
        let value = rest.trim().trim_matches('\'');
        let number = || value.parse::<i64>().map_err(|_| format!("invalid value '{value}' in selector '{expr}'"));
        match field.to_ascii_lowercase().as_str() {
            "amqp.annotation.x-opt-offset" => {
                if value == "@latest" {
                    Ok(Self::Latest)
                } else if value == "-1" && !inclusive {
                    Ok(Self::Earliest)
                } else {
                    Ok(Self::Offset { value: number()?, inclusive })
                }
            }
            "amqp.annotation.x-opt-sequence-number" => Ok(Self::Sequence { value: number()?, inclusive }),
            "amqp.annotation.x-opt-enqueued-time" => Ok(Self::EnqueuedTime { value: number()?, inclusive }),
            _ => Err(format!("unsupported selector field '{field}'")),
        }
    }

    fn matches(&self, e: &StoredEvent) -> bool {
        fn cmp(actual: i64, value: i64, inclusive: bool) -> bool {
            if inclusive {
                actual >= value
            } else {
                actual > value
            }
        }
        match *self {
            Self::Earliest | Self::Latest => true,
            Self::Offset { value, inclusive } => cmp(e.offset, value, inclusive),
            Self::Sequence { value, inclusive } => cmp(e.sequence_number, value, inclusive),
            Self::EnqueuedTime { value, inclusive } => cmp(e.enqueued_time_ms, value, inclusive),
        }
    }

    fn initial_cursor(&self, log: &PartitionLog) -> usize {
        match self {
            Self::Latest => log.events.len(),
            _ => log.events.partition_point(|e| !self.matches(e)),
        }
    }
}

fn selector_expression(attach: &Attach) -> Option<String> {
    let filter = attach.source.as_ref()?.filter.as_ref()?;
    for (key, value) in filter.iter() {
        // The descriptor (0x0000468C00000004 or the symbol) is not checked: Event Hubs clients
        // send exactly one filter, keyed by its name, holding the selector string.
        if let Value::Described(described) = value {
            if let Value::String(s) = &described.value {
                if key.0 == SELECTOR_FILTER_NAME || s.trim_start().starts_with("amqp.annotation.") {
                    return Some(s.clone());
                }
            }
        }
    }
    None
}

fn epoch_of(attach: &Attach) -> Option<i64> {
    let props = attach.properties.as_ref()?;
    match props.get(&Symbol::from(EPOCH_PROPERTY))? {
        Value::Long(v) => Some(*v),
        Value::Int(v) => Some(*v as i64),
        Value::Uint(v) => Some(*v as i64),
        Value::Ulong(v) => Some(*v as i64),
        _ => None,
    }
}

/// Parses `amqps://NS/HUB/ConsumerGroups/CG/Partitions/N` (or the same path without scheme and
/// host) into (consumer group, partition).
fn parse_partition_address(inner: &Inner, address: &str) -> Result<(String, u32), (&'static str, String)> {
    let path = match address.split_once("://") {
        Some((_, rest)) => rest.split_once('/').map(|(_, p)| p).unwrap_or(""),
        None => address.trim_start_matches('/'),
    };
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segments.as_slice() {
        [hub, cgs, cg, parts, partition]
            if cgs.eq_ignore_ascii_case("ConsumerGroups") && parts.eq_ignore_ascii_case("Partitions") =>
        {
            if !hub.eq_ignore_ascii_case(&inner.cfg.hub) {
                return Err(("amqp:not-found", format!("The messaging entity '{hub}' could not be found.")));
            }
            match partition.parse::<u32>() {
                Ok(p) if p < inner.cfg.partitions => Ok((cg.to_string(), p)),
                _ => Err((
                    "com.microsoft:argument-out-of-range",
                    "The specified partition is invalid for an EventHub partition sender or receiver.".to_string(),
                )),
            }
        }
        _ => Err(("amqp:not-found", format!("The emulator has no node '{address}'."))),
    }
}

/// Parses a publishing link's target: `amqps://NS/HUB`, `amqps://NS/HUB/Partitions/N` (or the
/// same without scheme and host) into the partition it names, if any.
fn parse_send_address(inner: &Inner, address: &str) -> Result<Option<u32>, (&'static str, String)> {
    let path = match address.split_once("://") {
        Some((_, rest)) => rest.split_once('/').map(|(_, p)| p).unwrap_or(""),
        None => address.trim_start_matches('/'),
    };
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (hub, partition) = match segments.as_slice() {
        [hub] => (*hub, None),
        [hub, parts, p] if parts.eq_ignore_ascii_case("Partitions") => (*hub, Some(*p)),
        _ => return Err(("amqp:not-found", format!("The emulator has no node '{address}'."))),
    };
    if !hub.eq_ignore_ascii_case(&inner.cfg.hub) {
        return Err(("amqp:not-found", format!("The messaging entity '{hub}' could not be found.")));
    }
    match partition.map(str::parse::<u32>) {
        None => Ok(None),
        Some(Ok(p)) if p < inner.cfg.partitions => Ok(Some(p)),
        Some(_) => Err((
            "com.microsoft:argument-out-of-range",
            "The specified partition is invalid for an EventHub partition sender or receiver.".to_string(),
        )),
    }
}

/// Message format of a batch (`EventDataBatch`): each data section is an encoded message.
const BATCH_FORMAT: u32 = 0x8001_3700;

fn simple_text(v: &SimpleValue) -> String {
    match v {
        SimpleValue::String(s) => s.clone(),
        SimpleValue::Symbol(s) => s.0.clone(),
        SimpleValue::Bool(b) => b.to_string(),
        SimpleValue::Long(x) => x.to_string(),
        SimpleValue::Int(x) => x.to_string(),
        SimpleValue::Short(x) => x.to_string(),
        SimpleValue::Byte(x) => x.to_string(),
        SimpleValue::Ulong(x) => x.to_string(),
        SimpleValue::Uint(x) => x.to_string(),
        SimpleValue::Ushort(x) => x.to_string(),
        SimpleValue::Ubyte(x) => x.to_string(),
        SimpleValue::Double(x) => x.into_inner().to_string(),
        SimpleValue::Float(x) => x.into_inner().to_string(),
        other => format!("{other:?}"),
    }
}

/// A published message as an event: body (data sections, or a binary or string value),
/// application properties and annotations as text, partition key, content type.
fn event_of_message(message: Message<Body<Value>>) -> EmulatorEvent {
    let body = match message.body {
        Body::Data(sections) => sections.into_iter().flat_map(|d| d.0.into_vec()).collect(),
        Body::Value(AmqpValue(Value::Binary(b))) => b.into_vec(),
        Body::Value(AmqpValue(Value::String(s))) => s.into_bytes(),
        _ => Vec::new(),
    };
    let app_properties = message
        .application_properties
        .map(|p| p.0.iter().map(|(k, v)| (k.clone(), simple_text(v))).collect())
        .unwrap_or_default();
    let mut partition_key = None;
    let mut annotations = Vec::new();
    for (k, v) in message.message_annotations.map(|a| a.0).unwrap_or_default() {
        let fe2o3_amqp::types::messaging::annotations::OwnedKey::Symbol(k) = k else { continue };
        let v = match v {
            Value::String(s) => s,
            Value::Symbol(s) => s.0,
            _ => continue,
        };
        if k.0 == "x-opt-partition-key" {
            partition_key = Some(v);
        } else if !k.0.starts_with("x-opt-") {
            annotations.push((k.0, v));
        }
    }
    let content_type = message.properties.and_then(|p| p.content_type).map(|c| c.0);
    EmulatorEvent { body, app_properties, annotations, partition_key, content_type, enqueued_time_ms: None }
}

/// The events of one transfer: its message, or each message of a batch.
fn events_of_delivery(delivery: Delivery<Body<Value>>) -> Vec<EmulatorEvent> {
    use fe2o3_amqp::types::messaging::message::__private::Deserializable;
    if delivery.message_format() != &Some(BATCH_FORMAT) {
        return vec![event_of_message(delivery.into_message())];
    }
    let message = delivery.into_message();
    let envelope_key = message
        .message_annotations
        .as_ref()
        .and_then(|a| a.0.iter().find(|(k, _)| matches!(k, fe2o3_amqp::types::messaging::annotations::OwnedKey::Symbol(s) if s.0 == "x-opt-partition-key")))
        .and_then(|(_, v)| if let Value::String(s) = v { Some(s.clone()) } else { None });
    let Body::Data(sections) = message.body else { return Vec::new() };
    sections
        .into_iter()
        .filter_map(|d| serde_amqp::from_slice::<Deserializable<Message<Body<Value>>>>(&d.0).ok())
        .map(|m| {
            let mut e = event_of_message(m.0);
            e.partition_key = e.partition_key.or_else(|| envelope_key.clone());
            e
        })
        .collect()
}

/// Appends what a client publishes: to the partition its link names, else by partition key
/// (FNV-1a of the key), else round robin.
async fn publish_loop(inner: Arc<Inner>, mut receiver: Receiver, partition: Option<u32>) {
    let emu = Emulator { inner };
    let mut next = 0u32;
    loop {
        let delivery: Delivery<Body<Value>> = match receiver.recv().await {
            Ok(d) => d,
            Err(e) => {
                tracing::trace!(error = ?e, "emulator: publishing link ended");
                return;
            }
        };
        let info = fe2o3_amqp::link::delivery::DeliveryInfo::from(&delivery);
        let events = events_of_delivery(delivery);
        let partitions = emu.inner.cfg.partitions;
        for event in events {
            let p = match (partition, &event.partition_key) {
                (Some(p), _) => p,
                (None, Some(key)) => {
                    let hash =
                        key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
                    (hash % partitions as u64) as u32
                }
                (None, None) => {
                    next = next.wrapping_add(1);
                    next % partitions
                }
            };
            emu.append_event(p, event);
        }
        // Accepted once appended: a client that saw its send complete finds the events.
        if let Err(e) = receiver.accept(info).await {
            tracing::debug!(error = ?e, "emulator: cannot accept a published message");
            return;
        }
    }
}

struct ReceiverGuard {
    inner: Arc<Inner>,
    id: u64,
}

impl Drop for ReceiverGuard {
    fn drop(&mut self) {
        if let Ok(mut receivers) = self.inner.receivers.lock() {
            receivers.remove(&self.id);
        }
    }
}

async fn attach_partition_receiver(
    inner: &Arc<Inner>,
    acceptor: &DefaultLinkAcceptor,
    session: &mut ListenerSessionHandle,
    mut attach: Attach,
    address: &str,
) {
    let refused = |mut attach: Attach| {
        attach.source = None;
        attach
    };
    let (consumer_group, partition) = match parse_partition_address(inner, address) {
        Ok(v) => v,
        Err((condition, description)) => {
            refuse(acceptor, session, refused(attach), condition, description).await;
            return;
        }
    };
    let start = match selector_expression(&attach) {
        Some(expr) => match StartPosition::parse(&expr) {
            Ok(p) => p,
            Err(description) => {
                refuse(acceptor, session, refused(attach), "amqp:invalid-field", description).await;
                return;
            }
        },
        None => StartPosition::Earliest,
    };
    if inner.take_busy() {
        refuse(
            acceptor,
            session,
            refused(attach),
            SERVER_BUSY,
            "The server is busy (emulator fault injection).".to_string(),
        )
        .await;
        return;
    }
    let epoch = epoch_of(&attach);
    let id = inner.next_id();
    let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();

    // Owner-level decision and registration under one lock.
    let decision: Result<Vec<ReceiverEntry>, String> = {
        let mut receivers = inner.receivers.lock().unwrap();
        let same: Vec<u64> = receivers
            .iter()
            .filter(|(_, e)| e.partition == partition && e.consumer_group.eq_ignore_ascii_case(&consumer_group))
            .map(|(id, _)| *id)
            .collect();
        let max_epoch = same.iter().filter_map(|id| receivers[id].epoch).max();
        let outcome = match (epoch, max_epoch) {
            (None, Some(m)) => Err(format!(
                "At least one receiver for the endpoint is created with epoch of '{m}', and so non-epoch receiver is not allowed. Either reconnect with a higher epoch, or make sure all epoch receivers are closed or disconnected."
            )),
            (None, None) => Ok(Vec::new()),
            (Some(e), Some(m)) if e < m => Err(format!(
                "Receiver with a higher epoch '{m}' already exists. Receiver with epoch {e} cannot be created. Make sure you are creating receiver with increasing epoch value to ensure connectivity, or ensure all old epoch receivers are closed or disconnected."
            )),
            (Some(_), _) => Ok(same.iter().filter_map(|id| receivers.remove(id)).collect()),
        };
        if outcome.is_ok() {
            receivers
                .insert(id, ReceiverEntry { partition, consumer_group: consumer_group.clone(), epoch, ctl: ctl_tx });
        }
        outcome
    };
    let victims = match decision {
        Ok(v) => v,
        Err(description) => {
            refuse(acceptor, session, refused(attach), LINK_STOLEN, description).await;
            return;
        }
    };
    let guard = ReceiverGuard { inner: inner.clone(), id };
    for victim in victims {
        let _ = victim.ctl.send(LinkControl::Detach {
            condition: LINK_STOLEN.to_string(),
            description: format!(
                "New receiver with higher epoch of '{}' is created hence current receiver with epoch '{}' is getting disconnected. If you are recreating the receiver, make sure a higher epoch is used.",
                epoch.unwrap_or_default(),
                victim.epoch.map(|e| e.to_string()).unwrap_or_default()
            ),
        });
    }

    // The sender is authoritative for the source: echo it without the capabilities.
    if let Some(source) = attach.source.as_mut() {
        source.capabilities = None;
    }
    let link_name = attach.name.clone();
    match acceptor.accept_incoming_attach(attach, session).await {
        Ok(LinkEndpoint::Sender(sender)) => {
            tracing::debug!(link = %link_name, partition, %consumer_group, ?epoch, ?start, "emulator: receiver attached");
            tokio::spawn(event_loop(inner.clone(), guard, partition, start, sender, ctl_rx));
        }
        Ok(LinkEndpoint::Receiver(_)) => {}
        Err(e) => tracing::debug!(error = ?e, "emulator: partition link attach failed"),
    }
}

fn event_message(e: &StoredEvent) -> Sendable<Body<Value>> {
    let mut annotations = MessageAnnotations::builder()
        .insert("x-opt-sequence-number", Value::Long(e.sequence_number))
        .insert("x-opt-offset", Value::String(e.offset.to_string()))
        .insert("x-opt-enqueued-time", Value::Timestamp(Timestamp::from_milliseconds(e.enqueued_time_ms)));
    if let Some(key) = &e.partition_key {
        annotations = annotations.insert("x-opt-partition-key", Value::String(key.clone()));
    }
    for (k, v) in &e.annotations {
        annotations = annotations.insert(k.as_str(), Value::String(v.clone()));
    }
    let mut builder = Message::builder().message_annotations(annotations.build());
    if let Some(content_type) = &e.content_type {
        builder = builder
            .properties(Properties { content_type: Some(Symbol::from(content_type.as_str())), ..Default::default() });
    }
    if !e.properties.is_empty() {
        let mut props = ApplicationProperties::builder();
        for (k, v) in &e.properties {
            props = props.insert(k.clone(), SimpleValue::String(v.clone()));
        }
        builder = builder.application_properties(props.build());
    }
    let message = builder.body(Body::<Value>::Data(vec![Data(Binary::from(e.body.clone()))].into())).build();
    Sendable::builder().message(message).settled(true).build()
}

async fn event_loop(
    inner: Arc<Inner>,
    _guard: ReceiverGuard,
    partition: u32,
    start: StartPosition,
    mut sender: Sender,
    mut ctl: mpsc::UnboundedReceiver<LinkControl>,
) {
    let state = &inner.partitions[partition as usize];
    let mut appended = state.appended.subscribe();
    let mut cursor = start.initial_cursor(&state.log.lock().unwrap());
    loop {
        let next = state.log.lock().unwrap().events.get(cursor).cloned();
        match next {
            Some(event) => {
                if !start.matches(&event) {
                    cursor += 1;
                    continue;
                }
                // With credit available `send` does not look at the link's incoming frames, so
                // check for a detach from the client first (`on_detach` is cancel safe).
                tokio::select! {
                    biased;
                    err = sender.on_detach() => {
                        tracing::debug!(partition, error = ?err, "emulator: receiver detached by client");
                        echo_detach(sender, err).await;
                        return;
                    }
                    _ = std::future::ready(()) => {}
                }
                let sendable = event_message(&event);
                tokio::select! {
                    biased;
                    control = ctl.recv() => {
                        handle_control(sender, control).await;
                        return;
                    }
                    sent = sender.send(sendable) => match sent {
                        Ok(_) => cursor += 1,
                        Err(e) => {
                            // A remote detach seen while waiting for credit is answered inside
                            // `send`; anything else means the session or connection is gone.
                            log_send_error(&e);
                            return;
                        }
                    }
                }
            }
            None => {
                tokio::select! {
                    biased;
                    control = ctl.recv() => {
                        handle_control(sender, control).await;
                        return;
                    }
                    err = sender.on_detach() => {
                        tracing::debug!(partition, error = ?err, "emulator: receiver detached by client");
                        echo_detach(sender, err).await;
                        return;
                    }
                    changed = appended.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    }
}

fn log_send_error(e: &SendError) {
    tracing::debug!(error = ?e, "emulator: event send ended");
}

async fn handle_control(sender: Sender, control: Option<LinkControl>) {
    match control {
        Some(LinkControl::Detach { condition, description }) => {
            tracing::debug!(%condition, "emulator: detaching receiver");
            let error = amqp_error(&condition, description);
            let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, sender.close_with_error(error)).await;
        }
        None => {
            let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, sender.close()).await;
        }
    }
}
