//! One client connection: SASL, then AMQP 1.0 sessions and links, run by one task that owns the
//! socket's writing half (a second task reads frames). Written on fe2o3-amqp's frame decoder and
//! types rather than its acceptor's links, because Service Bus needs what those links do not
//! offer: 16-byte delivery tags (the lock tokens), choosing the outcome echoed to a receiver in
//! settle mode second (`rejected` without error for a dead-letter, `message-lock-lost` for an
//! expired lock), and deliveries that stay locked after their link or connection is gone.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fe2o3_amqp::frames::amqp::{Frame, FrameBody, FrameDecoder};
use fe2o3_amqp::types::definitions::{self, ErrorCondition, Handle, ReceiverSettleMode, Role, SenderSettleMode};
use fe2o3_amqp::types::messaging::{
    Accepted, AmqpValue, ApplicationProperties, Body, DeliveryState, Message as AmqpMessage, Properties, Rejected,
    TargetArchetype,
};
use fe2o3_amqp::types::performatives::{
    Attach, Begin, ChannelMax, Close, Detach, Disposition, End, Flow, MaxFrameSize, Open, Transfer,
};
use fe2o3_amqp::types::primitives::{Array, Binary, OrderedMap, SimpleValue, Symbol, Timestamp, Value};
use fe2o3_amqp::types::sasl::{SaslCode, SaslInit, SaslMechanisms, SaslOutcome};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::codec::Decoder;

use super::broker::{Outcome, StoreId, Target, Token};
use super::wire::{self, Parts};
use super::Inner;
use crate::pad::pad_performative;

/// Our session windows and the credit we grant client senders.
const WINDOW: u32 = 10_000;
const SENDER_CREDIT: u32 = 1_000;
/// Largest frame we accept (and announce).
const MAX_FRAME: u32 = 1024 * 1024;
/// Deliveries taken from the broker per link per round.
const TAKE_BATCH: u32 = 256;

const LOCK_LOST: &str = "com.microsoft:message-lock-lost";
const DEAD_LETTER: &str = "com.microsoft:dead-letter";

enum Kind {
    /// Client sends put-token requests.
    CbsIn,
    /// Client sends `$management` requests about an entity.
    MgmtIn(String),
    /// Replies to the client (`$cbs` or `ENTITY/$management`).
    Replies,
    /// Client sends messages to a queue or topic.
    SendIn(Target),
    /// We deliver messages of a store to the client.
    ReceiveOut { store: StoreId, peek_lock: bool },
}

struct Link {
    kind: Kind,
    /// Node address as the client named it (target of a client sender, source of a client receiver).
    node: String,
    /// The client receiver's own address (its target): where `reply-to` points.
    client_addr: Option<String>,
    // we send
    delivery_count: u32,
    credit: u32,
    drain: bool,
    replies: VecDeque<Vec<u8>>,
    // we receive
    peer_delivery_count: u32,
    credit_left: u32,
    partial: Option<Partial>,
}

/// A message delivered from a store: its lock token and the delivery tag that carries it.
struct Locked {
    token: Token,
    tag: [u8; 16],
}

struct Partial {
    delivery_id: u32,
    settled: bool,
    format: u32,
    bytes: Vec<u8>,
}

struct Session {
    next_outgoing_id: u32,
    next_delivery_id: u32,
    next_incoming_id: u32,
    /// The client's session window, as its last flow said. Tracked, not enforced: link credit
    /// alone bounds what goes out, as on Service Bus. fe2o3-amqp's client announces a window of
    /// 2,048 and never widens it unless its credit changes, so a receiver with more credit than
    /// that would stall if the window were enforced.
    remote_incoming_window: u32,
    /// Transfers received since we last told the client our window.
    received_since_flow: u32,
    links: BTreeMap<u32, Link>,
    /// Our unsettled deliveries: delivery id → lock token.
    unsettled: HashMap<u32, Token>,
}

pub(crate) struct Conn {
    inner: Arc<Inner>,
    out: Vec<u8>,
    max_frame: usize,
    authorized: bool,
    sessions: BTreeMap<u16, Session>,
    idle: Option<Duration>,
    closed: bool,
}

/// Reads one frame: (type, channel, body), or None at the end of the stream.
async fn read_frame(rd: &mut OwnedReadHalf) -> anyhow::Result<Option<BytesMut>> {
    let mut size = [0u8; 4];
    match rd.read_exact(&mut size).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let size = u32::from_be_bytes(size) as usize;
    anyhow::ensure!((8..=MAX_FRAME as usize + 8).contains(&size), "frame size {size} out of range");
    let mut buf = BytesMut::zeroed(size - 4);
    rd.read_exact(&mut buf).await?;
    Ok(Some(buf))
}

fn sasl_body(frame: &BytesMut) -> &[u8] {
    let doff = frame[0] as usize * 4;
    &frame[doff.saturating_sub(4).min(frame.len())..]
}

pub(crate) async fn serve(
    inner: Arc<Inner>,
    stream: TcpStream,
    mut kill: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (mut rd, wr) = stream.into_split();
    let mut wr = BufWriter::new(wr);
    let mut authorized = false;
    let mut header = [0u8; 8];
    rd.read_exact(&mut header).await?;
    anyhow::ensure!(&header[..4] == b"AMQP", "not AMQP");
    if header[4] == 3 {
        wr.write_all(&[b'A', b'M', b'Q', b'P', 3, 1, 0, 0]).await?;
        let mechanisms =
            SaslMechanisms { sasl_server_mechanisms: Array(vec![Symbol::from("ANONYMOUS"), Symbol::from("PLAIN")]) };
        wr.write_all(&wire::frame(1, 0, &[&pad_performative(&wire::encode(&mechanisms))])).await?;
        wr.flush().await?;
        let init = read_frame(&mut rd).await?.ok_or_else(|| anyhow::anyhow!("closed during SASL"))?;
        let init: SaslInit = serde_amqp::from_slice(sasl_body(&init))?;
        let code = match init.mechanism.0.as_str() {
            "ANONYMOUS" => SaslCode::Ok,
            "PLAIN" => {
                let response = init.initial_response.map(|b| b.into_vec()).unwrap_or_default();
                let mut fields = response.split(|b| *b == 0).skip(1);
                let (user, pass) = (fields.next().unwrap_or_default(), fields.next().unwrap_or_default());
                if user == inner.key_name.as_bytes() && pass == inner.key.as_bytes() {
                    authorized = true;
                    SaslCode::Ok
                } else {
                    SaslCode::Auth
                }
            }
            _ => SaslCode::Auth,
        };
        let failed = !matches!(code, SaslCode::Ok);
        wr.write_all(&wire::frame(
            1,
            0,
            &[&pad_performative(&wire::encode(&SaslOutcome { code, additional_data: None }))],
        ))
        .await?;
        wr.flush().await?;
        if failed {
            return Ok(());
        }
        rd.read_exact(&mut header).await?;
        anyhow::ensure!(&header[..5] == b"AMQP\0", "expected the AMQP header after SASL");
    }
    anyhow::ensure!(header[4] == 0, "unsupported protocol id {}", header[4]);
    wr.write_all(&[b'A', b'M', b'Q', b'P', 0, 1, 0, 0]).await?;
    wr.flush().await?;

    let (tx, mut rx) = mpsc::channel::<Frame>(64);
    let reader = tokio::spawn(async move {
        while let Ok(Some(mut buf)) = read_frame(&mut rd).await {
            if buf.len() <= 4 {
                continue; // heartbeat
            }
            match (FrameDecoder {}).decode(&mut buf) {
                Ok(Some(frame)) => {
                    if tx.send(frame).await.is_err() {
                        break;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(error = ?e, "servicebus emulator: undecodable frame");
                    break;
                }
            }
        }
    });
    let mut available = inner.broker.available.subscribe();
    let mut conn = Conn {
        inner,
        out: Vec::new(),
        max_frame: 512,
        authorized,
        sessions: BTreeMap::new(),
        idle: None,
        closed: false,
    };
    let mut heartbeat: Option<tokio::time::Interval> = None;
    let mut more = false;
    let result = async {
        loop {
            if more {
                // Links still have credit and messages wait: take what frames are ready, no waiting
                // (but let the other tasks run).
                tokio::task::yield_now().await;
                while let Ok(frame) = rx.try_recv() {
                    conn.handle(frame);
                }
                if kill.has_changed().unwrap_or(true) {
                    break;
                }
            } else {
                tokio::select! {
                    frame = rx.recv() => match frame {
                        Some(frame) => conn.handle(frame),
                        None => break,
                    },
                    changed = available.changed() => if changed.is_err() { break },
                    _ = async { heartbeat.as_mut().expect("guarded").tick().await }, if heartbeat.is_some() => {
                        conn.out.extend_from_slice(&wire::frame(0, 0, &[]));
                    }
                    _ = kill.changed() => break,
                }
            }
            if heartbeat.is_none() {
                if let Some(idle) = conn.idle {
                    heartbeat = Some(tokio::time::interval(idle / 2));
                }
            }
            more = conn.pump();
            if !conn.out.is_empty() {
                wr.write_all(&conn.out).await?;
                wr.flush().await?;
                conn.out.clear();
            }
            if conn.closed {
                break;
            }
        }
        anyhow::Ok(())
    }
    .await;
    reader.abort();
    result
}

fn error(condition: &str, description: impl Into<String>) -> definitions::Error {
    definitions::Error::new(ErrorCondition::Custom(Symbol::from(condition)), Some(description.into()), None)
}

fn condition_text(c: &ErrorCondition) -> String {
    serde_amqp::to_vec(c)
        .ok()
        .and_then(|b| serde_amqp::from_slice::<Symbol>(&b).ok())
        .map(|s| s.0)
        .unwrap_or_else(|| format!("{c:?}"))
}

/// Strips `amqps://host[:port]/` or `sb://host/` and a leading `/` from an address.
pub(crate) fn entity_path(address: &str) -> &str {
    let rest = match address.find("://") {
        Some(i) => {
            let after = &address[i + 3..];
            after.find('/').map(|j| &after[j..]).unwrap_or("")
        }
        None => address,
    };
    rest.trim_start_matches('/')
}

fn fields_text(info: &Option<Box<definitions::Fields>>, key: &str) -> Option<String> {
    match info.as_ref()?.get(&Symbol::from(key))? {
        Value::String(s) => Some(s.clone()),
        Value::Symbol(s) => Some(s.0.clone()),
        _ => None,
    }
}

fn map_get<'a>(map: &'a OrderedMap<Value, Value>, key: &str) -> Option<&'a Value> {
    map.get(&Value::String(key.to_string())).or_else(|| map.get(&Value::Symbol(Symbol::from(key))))
}

fn value_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Symbol(s) => Some(s.0.clone()),
        _ => None,
    }
}

fn value_int(v: Option<&Value>) -> Option<i64> {
    Some(match v? {
        Value::Long(x) => *x,
        Value::Int(x) => *x as i64,
        Value::Uint(x) => *x as i64,
        Value::Ulong(x) => *x as i64,
        Value::Short(x) => *x as i64,
        Value::Ushort(x) => *x as i64,
        Value::Byte(x) => *x as i64,
        Value::Ubyte(x) => *x as i64,
        _ => return None,
    })
}

fn tokens(v: Option<&Value>) -> Vec<Token> {
    let items: &[Value] = match v {
        Some(Value::Array(a)) => &a.0,
        Some(Value::List(l)) => l,
        _ => &[],
    };
    items
        .iter()
        .filter_map(|v| match v {
            Value::Uuid(u) => Some(*u.as_inner()),
            _ => None,
        })
        .collect()
}

fn app_prop(msg: &wire::Request, key: &str) -> Option<String> {
    match msg.application_properties.as_ref()?.0.get(key)? {
        SimpleValue::String(s) => Some(s.clone()),
        SimpleValue::Symbol(s) => Some(s.0.clone()),
        _ => None,
    }
}

/// A reply to a `$cbs` or `$management` request.
fn reply(request: &wire::Request, status: i32, description: &str, condition: Option<&str>, body: Value) -> Vec<u8> {
    let mut props = ApplicationProperties::builder()
        .insert("statusCode", status)
        .insert("statusDescription", description.to_string())
        .insert("status-code", status)
        .insert("status-description", description.to_string());
    if let Some(c) = condition {
        props = props.insert("errorCondition", Symbol::from(c));
    }
    let req_props = request.properties.as_ref();
    let message = AmqpMessage::builder()
        .properties(Properties {
            correlation_id: req_props.and_then(|p| p.message_id.clone()),
            to: req_props.and_then(|p| p.reply_to.clone()),
            ..Default::default()
        })
        .application_properties(props.build())
        .body(Body::Value(AmqpValue(body)))
        .build();
    wire::encode_message(&message)
}

impl Conn {
    fn perf<T: Serialize>(&mut self, channel: u16, p: &T) {
        let body = pad_performative(&wire::encode(p));
        self.out.extend_from_slice(&wire::frame(0, channel, &[&body]));
    }

    fn session_flow(&self, s: &Session, handle: Option<(u32, &Link)>, drain: bool, sender: bool) -> Flow {
        let (h, dc, credit) = match handle {
            Some((h, l)) if sender => (Some(Handle(h)), Some(l.delivery_count), Some(l.credit)),
            Some((h, l)) => (Some(Handle(h)), Some(l.peer_delivery_count), Some(l.credit_left)),
            None => (None, None, None),
        };
        Flow {
            next_incoming_id: Some(s.next_incoming_id),
            incoming_window: WINDOW,
            next_outgoing_id: s.next_outgoing_id,
            outgoing_window: WINDOW,
            handle: h,
            delivery_count: dc,
            link_credit: credit,
            available: None,
            drain,
            echo: false,
            properties: None,
        }
    }

    fn handle(&mut self, frame: Frame) {
        let channel = frame.channel;
        match frame.body {
            FrameBody::Open(open) => {
                self.max_frame = (open.max_frame_size.0 as usize).clamp(512, MAX_FRAME as usize);
                self.idle = open.idle_time_out.filter(|ms| *ms > 0).map(|ms| Duration::from_millis(ms as u64));
                let reply = Open {
                    container_id: format!("centralflow-servicebus-emulator-{}", self.inner.addr.port()),
                    hostname: None,
                    max_frame_size: MaxFrameSize(MAX_FRAME),
                    channel_max: ChannelMax(open.channel_max.0.min(255)),
                    idle_time_out: None,
                    outgoing_locales: None,
                    incoming_locales: None,
                    offered_capabilities: None,
                    desired_capabilities: None,
                    properties: None,
                };
                self.perf(0, &reply);
            }
            FrameBody::Begin(begin) => {
                let session = Session {
                    next_outgoing_id: 1,
                    next_delivery_id: 0,
                    next_incoming_id: begin.next_outgoing_id,
                    remote_incoming_window: begin.incoming_window,
                    received_since_flow: 0,
                    links: BTreeMap::new(),
                    unsettled: HashMap::new(),
                };
                self.sessions.insert(channel, session);
                let reply = Begin {
                    remote_channel: Some(channel),
                    next_outgoing_id: 1,
                    incoming_window: WINDOW,
                    outgoing_window: WINDOW,
                    handle_max: Handle(u32::MAX),
                    offered_capabilities: None,
                    desired_capabilities: None,
                    properties: None,
                };
                self.perf(channel, &reply);
            }
            FrameBody::Attach(attach) => self.attach(channel, attach),
            FrameBody::Flow(flow) => self.flow(channel, flow),
            FrameBody::Transfer { performative, payload } => self.transfer(channel, performative, payload),
            FrameBody::Disposition(d) => self.disposition(channel, d),
            FrameBody::Detach(detach) => {
                if let Some(s) = self.sessions.get_mut(&channel) {
                    s.links.remove(&detach.handle.0);
                }
                let reply = Detach { handle: detach.handle, closed: detach.closed, error: None };
                self.perf(channel, &reply);
            }
            FrameBody::End(_) => {
                self.sessions.remove(&channel);
                self.perf(channel, &End { error: None });
            }
            FrameBody::Close(_) => {
                self.perf(0, &Close { error: None });
                self.closed = true;
            }
            FrameBody::Empty => {}
        }
    }

    fn attach(&mut self, channel: u16, attach: Attach) {
        let handle = attach.handle.0;
        let client_sends = matches!(attach.role, Role::Sender);
        let target_addr = match attach.target.as_deref() {
            Some(TargetArchetype::Target(t)) => t.address.clone(),
            #[allow(unreachable_patterns)]
            _ => None,
        };
        let source_addr = attach.source.as_ref().and_then(|s| s.address.clone());
        let node = if client_sends { target_addr.clone() } else { source_addr.clone() }.unwrap_or_default();
        let path = entity_path(&node).to_string();
        let lower = path.to_ascii_lowercase();
        let kind: Result<Kind, (&str, String)> = if lower == "$cbs" {
            Ok(if client_sends { Kind::CbsIn } else { Kind::Replies })
        } else if let Some(entity) = lower.strip_suffix("/$management") {
            if !self.authorized {
                Err(("amqp:unauthorized-access", "put a token on $cbs first".into()))
            } else if self.inner.broker.store(entity).is_none() && self.inner.broker.send_target(entity).is_none() {
                Err(("amqp:not-found", format!("no entity {entity:?}")))
            } else if client_sends {
                Ok(Kind::MgmtIn(path[..entity.len()].to_string()))
            } else {
                Ok(Kind::Replies)
            }
        } else if !self.authorized {
            Err(("amqp:unauthorized-access", format!("no authorization for {path:?}: put a token on $cbs first")))
        } else if client_sends {
            match self.inner.broker.send_target(&path) {
                Some(t) => Ok(Kind::SendIn(t)),
                None => Err(("amqp:not-found", format!("no queue or topic {path:?}"))),
            }
        } else {
            match self.inner.broker.store(&path) {
                Some(store) => {
                    let peek_lock = !matches!(attach.snd_settle_mode, SenderSettleMode::Settled);
                    Ok(Kind::ReceiveOut { store, peek_lock })
                }
                None => Err(("amqp:not-found", format!("no queue, subscription or dead-letter queue {path:?}"))),
            }
        };
        let refused = kind.is_err();
        let reply = Attach {
            name: attach.name.clone(),
            handle: attach.handle.clone(),
            role: if client_sends { Role::Receiver } else { Role::Sender },
            snd_settle_mode: attach.snd_settle_mode.clone(),
            rcv_settle_mode: if client_sends { ReceiverSettleMode::First } else { attach.rcv_settle_mode.clone() },
            source: if refused && !client_sends { None } else { attach.source.clone() },
            target: if refused && client_sends { None } else { attach.target.clone() },
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: if client_sends { None } else { Some(0) },
            max_message_size: Some(MAX_FRAME as u64 * 64),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        self.perf(channel, &reply);
        let kind = match kind {
            Ok(kind) => kind,
            Err((condition, description)) => {
                tracing::debug!(%node, condition, %description, "servicebus emulator: refusing attach");
                self.perf(
                    channel,
                    &Detach { handle: attach.handle, closed: true, error: Some(error(condition, description)) },
                );
                return;
            }
        };
        let link = Link {
            kind,
            node,
            client_addr: if client_sends { None } else { target_addr },
            delivery_count: 0,
            credit: 0,
            drain: false,
            replies: VecDeque::new(),
            peer_delivery_count: attach.initial_delivery_count.unwrap_or(0),
            credit_left: if client_sends { SENDER_CREDIT } else { 0 },
            partial: None,
        };
        let Some(s) = self.sessions.get_mut(&channel) else { return };
        s.links.insert(handle, link);
        if client_sends {
            let s = &self.sessions[&channel];
            let flow = self.session_flow(s, Some((handle, &s.links[&handle])), false, false);
            self.perf(channel, &flow);
        }
    }

    fn flow(&mut self, channel: u16, flow: Flow) {
        let Some(s) = self.sessions.get_mut(&channel) else { return };
        let their_next_incoming = flow.next_incoming_id.unwrap_or(1);
        s.remote_incoming_window =
            their_next_incoming.wrapping_add(flow.incoming_window).wrapping_sub(s.next_outgoing_id);
        let Some(handle) = flow.handle.map(|h| h.0) else {
            if flow.echo {
                let s = &self.sessions[&channel];
                let f = self.session_flow(s, None, false, false);
                self.perf(channel, &f);
            }
            return;
        };
        let Some(link) = s.links.get_mut(&handle) else { return };
        let sender = matches!(link.kind, Kind::Replies | Kind::ReceiveOut { .. });
        if sender {
            let their_count = flow.delivery_count.unwrap_or(link.delivery_count);
            link.credit = their_count.wrapping_add(flow.link_credit.unwrap_or(0)).wrapping_sub(link.delivery_count);
            if link.credit > 1 << 30 {
                link.credit = 0; // the client counted past us: no credit
            }
            link.drain = flow.drain;
        }
        if flow.echo {
            let s = &self.sessions[&channel];
            let f = self.session_flow(s, Some((handle, &s.links[&handle])), false, sender);
            self.perf(channel, &f);
        }
    }

    fn transfer(&mut self, channel: u16, t: Transfer, payload: Bytes) {
        let Some(s) = self.sessions.get_mut(&channel) else { return };
        s.next_incoming_id = s.next_incoming_id.wrapping_add(1);
        s.received_since_flow += 1;
        let Some(link) = s.links.get_mut(&t.handle.0) else { return };
        match link.partial.as_mut() {
            Some(p) => p.bytes.extend_from_slice(&payload),
            None => {
                link.partial = Some(Partial {
                    delivery_id: t.delivery_id.unwrap_or(0),
                    settled: t.settled.unwrap_or(false),
                    format: t.message_format.unwrap_or(0),
                    bytes: payload.to_vec(),
                })
            }
        }
        if t.aborted {
            link.partial = None;
            return;
        }
        if t.more {
            return;
        }
        let p = link.partial.take().expect("set above");
        link.peer_delivery_count = link.peer_delivery_count.wrapping_add(1);
        link.credit_left = link.credit_left.saturating_sub(1);
        let payload = Bytes::from(p.bytes);
        let state: DeliveryState = match &link.kind {
            Kind::SendIn(target) => {
                let target = target.clone();
                match Parts::parse_transfer(p.format, &payload).and_then(|m| self.inner.broker.enqueue(&target, m)) {
                    Ok(()) => Accepted {}.into(),
                    Err(e) => Rejected { error: Some(error("amqp:decode-error", e)) }.into(),
                }
            }
            Kind::CbsIn => {
                self.cbs(channel, &payload);
                Accepted {}.into()
            }
            Kind::MgmtIn(entity) => {
                let entity = entity.clone();
                self.management(channel, &entity, &payload);
                Accepted {}.into()
            }
            _ => Rejected { error: Some(error("amqp:not-allowed", "this link does not take messages")) }.into(),
        };
        if !p.settled {
            let d = Disposition {
                role: Role::Receiver,
                first: p.delivery_id,
                last: None,
                settled: true,
                state: Some(state),
                batchable: false,
            };
            self.perf(channel, &d);
        }
        let Some(s) = self.sessions.get_mut(&channel) else { return };
        let refill = s.links.get(&t.handle.0).is_some_and(|l| l.credit_left < SENDER_CREDIT / 2);
        if refill {
            s.links.get_mut(&t.handle.0).expect("checked").credit_left = SENDER_CREDIT;
        }
        if refill || s.received_since_flow >= WINDOW / 2 {
            s.received_since_flow = 0;
            let s = &self.sessions[&channel];
            let link = refill.then(|| (t.handle.0, &s.links[&t.handle.0]));
            let f = self.session_flow(s, link, false, false);
            self.perf(channel, &f);
        }
    }

    fn disposition(&mut self, channel: u16, d: Disposition) {
        if !matches!(d.role, Role::Receiver) {
            return; // dispositions of our own receivers: we settle those at once
        }
        let Some(s) = self.sessions.get_mut(&channel) else { return };
        let last = d.last.unwrap_or(d.first);
        let ids: Vec<u32> = if last.wrapping_sub(d.first) <= 1024 {
            (0..=last.wrapping_sub(d.first))
                .map(|i| d.first.wrapping_add(i))
                .filter(|id| s.unsettled.contains_key(id))
                .collect()
        } else {
            s.unsettled.keys().copied().filter(|id| (d.first..=last).contains(id)).collect()
        };
        let terminal = matches!(
            d.state,
            Some(
                DeliveryState::Accepted(_)
                    | DeliveryState::Rejected(_)
                    | DeliveryState::Released(_)
                    | DeliveryState::Modified(_)
            )
        );
        if !terminal && !d.settled {
            return;
        }
        let outcome = match &d.state {
            Some(DeliveryState::Accepted(_)) => Outcome::Complete,
            Some(DeliveryState::Modified(m)) => Outcome::Abandon { failed: m.delivery_failed.unwrap_or(false) },
            Some(DeliveryState::Rejected(r)) => {
                let e = r.error.as_ref();
                Outcome::DeadLetter {
                    reason: e
                        .and_then(|e| fields_text(&e.info, super::broker::DEAD_LETTER_REASON))
                        .or_else(|| e.map(|e| condition_text(&e.condition)).filter(|c| c != DEAD_LETTER)),
                    description: e
                        .and_then(|e| fields_text(&e.info, super::broker::DEAD_LETTER_DESCRIPTION))
                        .or_else(|| e.and_then(|e| e.description.clone())),
                }
            }
            _ => Outcome::Release,
        };
        let echo_ok: DeliveryState = match &d.state {
            Some(DeliveryState::Rejected(_)) => Rejected { error: None }.into(),
            Some(state) => state.clone(),
            None => Accepted {}.into(),
        };
        let mut echoes = Vec::new();
        for id in ids {
            let token = s.unsettled.remove(&id).expect("listed above");
            let state = match self.inner.broker.settle(&token, outcome.clone()) {
                Ok(()) => echo_ok.clone(),
                Err(_) => Rejected {
                    error: Some(error(
                        LOCK_LOST,
                        "The lock on the message was lost: it expired or the message was settled already.",
                    )),
                }
                .into(),
            };
            echoes.push((id, state));
        }
        if !d.settled {
            for (id, state) in echoes {
                let echo = Disposition {
                    role: Role::Sender,
                    first: id,
                    last: None,
                    settled: true,
                    state: Some(state),
                    batchable: false,
                };
                self.perf(channel, &echo);
            }
        }
    }

    /// Queues a reply on the link the client reads replies from.
    fn route_reply(&mut self, channel: u16, node: &str, request: &wire::Request, payload: Vec<u8>) {
        let reply_to = request.properties.as_ref().and_then(|p| p.reply_to.clone());
        let mut found: Option<(u16, u32)> = None;
        if let Some(reply_to) = &reply_to {
            'outer: for (ch, s) in &self.sessions {
                for (h, l) in &s.links {
                    if matches!(l.kind, Kind::Replies) && l.client_addr.as_deref() == Some(reply_to.as_str()) {
                        found = Some((*ch, *h));
                        break 'outer;
                    }
                }
            }
        }
        if found.is_none() {
            let sessions = self
                .sessions
                .iter()
                .filter(|(ch, _)| **ch == channel)
                .chain(self.sessions.iter().filter(|(ch, _)| **ch != channel));
            'search: for (ch, s) in sessions {
                for (h, l) in &s.links {
                    if matches!(l.kind, Kind::Replies) && l.node.eq_ignore_ascii_case(node) {
                        found = Some((*ch, *h));
                        break 'search;
                    }
                }
            }
        }
        match found {
            Some((ch, h)) => {
                self.sessions.get_mut(&ch).and_then(|s| s.links.get_mut(&h)).expect("found").replies.push_back(payload)
            }
            None => tracing::debug!(%node, "servicebus emulator: no link to reply on"),
        }
    }

    fn cbs(&mut self, channel: u16, payload: &[u8]) {
        let Ok(request) = wire::decode_request(payload) else { return };
        let operation = app_prop(&request, "operation").unwrap_or_default();
        let token = match &request.body {
            Body::Value(AmqpValue(Value::String(s))) => s.clone(),
            _ => String::new(),
        };
        let (status, description) = if operation != "put-token" {
            (400, format!("unknown operation {operation:?}"))
        } else {
            let now = wire::now_ms() / 1000;
            match wire::verify_sas(&token, &self.inner.key_name, &self.inner.key, now) {
                Ok(_) => {
                    self.authorized = true;
                    (202, "Accepted".to_string())
                }
                Err(why) => (401, format!("InvalidSignature: {why}")),
            }
        };
        let condition = (status == 401).then_some("com.microsoft:auth-failed");
        let payload = reply(&request, status, &description, condition, Value::Null);
        self.route_reply(channel, "$cbs", &request, payload);
    }

    fn management(&mut self, channel: u16, entity: &str, payload: &[u8]) {
        let Ok(request) = wire::decode_request(payload) else { return };
        let operation = app_prop(&request, "operation").unwrap_or_default();
        let empty = OrderedMap::new();
        let body = match &request.body {
            Body::Value(AmqpValue(Value::Map(m))) => m,
            _ => &empty,
        };
        let broker = &self.inner.broker;
        let lock_lost =
            || (410, "The lock on the message was lost.".to_string(), Some(LOCK_LOST), Value::Map(OrderedMap::new()));
        let (status, description, condition, value) = match operation.as_str() {
            "com.microsoft:renew-lock" => match broker.renew(&tokens(map_get(body, "lock-tokens"))) {
                Ok(expirations) => {
                    let mut m = OrderedMap::new();
                    let stamps =
                        expirations.into_iter().map(|ms| Value::Timestamp(Timestamp::from_milliseconds(ms))).collect();
                    m.insert(Value::String("expirations".into()), Value::Array(Array(stamps)));
                    (200, "OK".to_string(), None, Value::Map(m))
                }
                Err(_) => lock_lost(),
            },
            "com.microsoft:update-disposition" => {
                let status = value_text(map_get(body, "disposition-status")).unwrap_or_default();
                let outcome = match status.as_str() {
                    "completed" => Some(Outcome::Complete),
                    "abandoned" => Some(Outcome::Abandon { failed: true }),
                    "suspended" => Some(Outcome::DeadLetter {
                        reason: value_text(map_get(body, "deadletter-reason")),
                        description: value_text(map_get(body, "deadletter-description")),
                    }),
                    _ => None,
                };
                match outcome {
                    None => (
                        400,
                        format!("disposition-status {status:?} is not supported by the emulator"),
                        Some("amqp:not-implemented"),
                        Value::Map(OrderedMap::new()),
                    ),
                    Some(outcome) => {
                        let mut lost = false;
                        for token in tokens(map_get(body, "lock-tokens")) {
                            lost |= broker.settle(&token, outcome.clone()).is_err();
                        }
                        if lost {
                            lock_lost()
                        } else {
                            (200, "OK".to_string(), None, Value::Map(OrderedMap::new()))
                        }
                    }
                }
            }
            "com.microsoft:peek-message" => {
                let from = value_int(map_get(body, "from-sequence-number")).unwrap_or(0);
                let count = value_int(map_get(body, "message-count")).unwrap_or(1).max(0) as usize;
                match broker.store(entity) {
                    None => (
                        404,
                        format!("no entity {entity:?} to peek"),
                        Some("com.microsoft:entity-not-found"),
                        Value::Null,
                    ),
                    Some(id) => {
                        let messages = broker.peek(id, from, count);
                        if messages.is_empty() {
                            (204, "No messages".to_string(), None, Value::Map(OrderedMap::new()))
                        } else {
                            let list = messages
                                .into_iter()
                                .map(|m| {
                                    let mut e = OrderedMap::new();
                                    e.insert(Value::String("message".into()), Value::Binary(Binary::from(m)));
                                    Value::Map(e)
                                })
                                .collect();
                            let mut m = OrderedMap::new();
                            m.insert(Value::String("messages".into()), Value::List(list));
                            (200, "OK".to_string(), None, Value::Map(m))
                        }
                    }
                }
            }
            other => (
                501,
                format!("operation {other:?} is not implemented by the emulator"),
                Some("amqp:not-implemented"),
                Value::Map(OrderedMap::new()),
            ),
        };
        let payload = reply(&request, status, &description, condition, value);
        let node = format!("{entity}/$management");
        // The client's reply link names the node as it did (case, scheme): match on the path.
        let reply_node = self
            .sessions
            .values()
            .flat_map(|s| s.links.values())
            .find(|l| matches!(l.kind, Kind::Replies) && entity_path(&l.node).eq_ignore_ascii_case(&node))
            .map(|l| l.node.clone())
            .unwrap_or(node);
        self.route_reply(channel, &reply_node, &request, payload);
    }

    /// Sends what links with credit can take: replies, and messages from their store.
    /// True if a link could take more right away.
    fn pump(&mut self) -> bool {
        let mut more = false;
        let channels: Vec<u16> = self.sessions.keys().copied().collect();
        for ch in channels {
            let handles: Vec<u32> = self.sessions[&ch].links.keys().copied().collect();
            for h in handles {
                more |= self.pump_link(ch, h);
            }
        }
        more
    }

    /// True if the link has credit left and its store or reply queue may have more.
    fn pump_link(&mut self, ch: u16, h: u32) -> bool {
        let max_frame = self.max_frame;
        let Some(s) = self.sessions.get_mut(&ch) else { return false };
        let Some(link) = s.links.get(&h) else { return false };
        let exhausted;
        // (payload, lock token and delivery tag of a locked message, pre-settled)
        let mut outgoing: Vec<(Vec<u8>, Option<Locked>, bool)> = Vec::new();
        match link.kind {
            Kind::Replies => {
                let n = link.credit as usize;
                let link = s.links.get_mut(&h).expect("present");
                for _ in 0..n {
                    let Some(p) = link.replies.pop_front() else { break };
                    outgoing.push((p, None, true));
                }
                exhausted = link.replies.is_empty();
            }
            Kind::ReceiveOut { store, peek_lock } => {
                let n = link.credit.min(TAKE_BATCH);
                if n > 0 {
                    let taken = self.inner.broker.take(store, n as usize, peek_lock);
                    exhausted = taken.len() < n as usize;
                    for d in taken {
                        outgoing.push((d.payload, Some(Locked { token: d.token, tag: d.delivery_tag }), !peek_lock));
                    }
                } else {
                    exhausted = link.credit == 0;
                }
            }
            _ => return false,
        }
        let s = self.sessions.get_mut(&ch).expect("present");
        for (payload, tag, settled) in outgoing {
            let delivery_id = s.next_delivery_id;
            s.next_delivery_id = s.next_delivery_id.wrapping_add(1);
            let tag_bytes = match tag {
                Some(Locked { token, tag }) => {
                    if !settled {
                        s.unsettled.insert(delivery_id, token);
                    }
                    tag.to_vec()
                }
                None => delivery_id.to_be_bytes().to_vec(),
            };
            let link = s.links.get_mut(&h).expect("present");
            link.credit -= 1;
            link.delivery_count = link.delivery_count.wrapping_add(1);
            let first = Transfer {
                handle: Handle(h),
                delivery_id: Some(delivery_id),
                delivery_tag: Some(serde_bytes::ByteBuf::from(tag_bytes)),
                message_format: Some(0),
                settled: Some(settled),
                more: false,
                rcv_settle_mode: None,
                state: None,
                resume: false,
                aborted: false,
                batchable: false,
            };
            // Frames after the first of a large message carry only the handle and `more`.
            let continuation = Transfer {
                delivery_id: None,
                delivery_tag: None,
                message_format: None,
                settled: None,
                ..first.clone()
            };
            let mut first = Some(first);
            let mut rest = &payload[..];
            loop {
                let mut t = first.take().unwrap_or_else(|| continuation.clone());
                // Performative sizes are small; leave them 256 bytes.
                let room = max_frame.saturating_sub(8 + 256).max(64);
                let (chunk, tail) = rest.split_at(rest.len().min(room));
                t.more = !tail.is_empty();
                let perf = pad_performative(&wire::encode(&t));
                self.out.extend_from_slice(&wire::frame(0, ch, &[&perf, chunk]));
                s.next_outgoing_id = s.next_outgoing_id.wrapping_add(1);
                s.remote_incoming_window = s.remote_incoming_window.saturating_sub(1);
                rest = tail;
                if rest.is_empty() {
                    break;
                }
            }
        }
        let link = s.links.get_mut(&h).expect("present");
        if link.drain && exhausted && link.credit > 0 {
            link.delivery_count = link.delivery_count.wrapping_add(link.credit);
            link.credit = 0;
        }
        let more = !exhausted && link.credit > 0;
        if link.drain && link.credit == 0 {
            link.drain = false;
            let s = &self.sessions[&ch];
            let f = self.session_flow(s, Some((h, &s.links[&h])), true, true);
            self.perf(ch, &f);
        }
        more
    }
}
