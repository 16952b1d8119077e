//! `webhook`: an HTTP(S) server receiving IoT Central's webhook export, and requests in the IoT
//! Central Device Bridge's format, so that centralflow can stand in for the bridge's Azure
//! Function.
//!
//! - One POST is one export message (or a JSON array of them, as the decoder accepts), or one
//!   bridge request `{"device": {"deviceId", "modelId"?}, "measurements": {...}, "timestamp"?}`,
//!   which becomes an export-like telemetry event (`messageSource: telemetry`, `deviceId`,
//!   `enqueuedTime` = `timestamp` or the time of receipt, `telemetry` = the measurements,
//!   `modelId` kept), so that downstream components treat both alike.
//! - Authorisation: `Authorization` must be the configured token (or `Bearer {token}`), compared
//!   in constant time; 401 otherwise (the body is not read).
//! - No loss: a request is answered 2xx only once the checkpoint covering its events is durable
//!   (the source asks for a checkpoint as soon as requests wait, so the delay is about one
//!   checkpoint); the sender (IoT Central retries webhooks) sends again on anything else.
//!   Requests held at once are bounded by `queue`: beyond it the answer is 503 with
//!   `Retry-After`. If a process dies while holding requests, the sender retries them, so a
//!   crash can duplicate but not lose.
//! - Bad bodies: over 256 KiB → 413, malformed JSON or an invalid bridge device id → 400; each
//!   also goes to the source's `dead_letter` output with the reason, and is answered, like a good
//!   one, once the checkpoint that holds its dead letter is durable (the sender does not send a
//!   refused body again, so a record lost in a crash would be lost for good).
//! - Optional TLS with a certificate chain and key from PEM files.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use subtle::ConstantTimeEq;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::config::values::{Dur, Path};
use crate::config::{Checker, Spec};
use crate::event::{Batch, Event};
use crate::metrics::{self, ComponentMetrics};
use crate::model::decode::Projection;
use crate::model::format::{MessageDecoder, MessageFormat};
use crate::model::generic::Transport;
use crate::model::MAX_RECORD_BYTES;
use crate::runtime::{BuildCx, Control, EndReason, Mode, Source, SourceCx};
use crate::secret::Secret;

/// An HTTP endpoint for IoT Central's webhook export and device-bridge requests.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Address to listen on, e.g. `0.0.0.0:8443`.
    #[serde(default = "d_address")]
    pub address: String,
    /// The path that receives POSTs.
    #[serde(default = "d_path")]
    pub path: String,
    /// The static token IoT Central sends in `Authorization` (a secret: `${VAR}`).
    pub token: Secret,
    /// Serve HTTPS with this certificate chain and key (PEM files).
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    /// `auto` (export messages, bridge requests, and records of any shape), `export`, `bridge`
    /// or `json` (records of any shape, e.g. a transformed export).
    #[serde(default)]
    pub format: WebhookFormat,
    /// `json`/`auto`: the field holding a record's time (RFC 3339 or epoch milliseconds). The
    /// webhook has no enqueued time: a record without it is refused (400, dead letter).
    #[serde(default)]
    pub time: Option<Box<Path>>,
    /// `json`/`auto`: the field holding a record's device id (it becomes `deviceId`).
    #[serde(default)]
    pub device_id: Option<Box<Path>>,
    /// Requests held at once (waiting to be processed or for their checkpoint); more get 503.
    #[serde(default = "d_queue")]
    pub queue: usize,
    /// Seconds a sender is told to wait (`Retry-After`) when the queue is full.
    #[serde(default = "d_retry_after")]
    pub retry_after: u64,
    /// Events per batch sent downstream.
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    /// How long a partial batch may wait for more requests.
    #[serde(default = "d_linger")]
    pub linger: Dur,
    /// How long a request's body may take to arrive once its headers are in (default 30 s): a
    /// sender that trickles or stalls is answered 408. A request takes its place in the queue
    /// only once its body is in, so slow senders never hold the queue.
    #[serde(default = "d_body_timeout")]
    pub body_timeout: Dur,
}

/// Certificate and key files.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert_file: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: String,
}

/// What the endpoint accepts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WebhookFormat {
    #[default]
    Auto,
    Export,
    Bridge,
    Json,
}

fn d_address() -> String {
    "127.0.0.1:8080".into()
}
fn d_path() -> String {
    "/".into()
}
fn d_queue() -> usize {
    1000
}
fn d_retry_after() -> u64 {
    1
}
fn d_batch() -> usize {
    1000
}
fn d_linger() -> Dur {
    Dur::new("20ms")
}
fn d_body_timeout() -> Dur {
    Dur::new("30s")
}

impl Spec for WebhookConfig {
    fn check(&self, ptr: &str, cx: &mut Checker<'_>) {
        if self.address.parse::<SocketAddr>().is_err() {
            cx.error(&format!("{ptr}/address"), format!("{:?} is not an address like 0.0.0.0:8443", self.address));
        }
        if !self.path.starts_with('/') {
            cx.error(&format!("{ptr}/path"), "must start with /");
        }
        cx.secret(&format!("{ptr}/token"), !self.token.is_empty());
        if self.token.expose().trim().len() < 8 {
            cx.error(&format!("{ptr}/token"), "is too short: use at least 8 characters (IoT Central sends it as is)");
        }
        if let Some(t) = &self.tls {
            if t.cert_file.trim().is_empty() {
                cx.error(&format!("{ptr}/tls/cert_file"), "is empty");
            }
            if t.key_file.trim().is_empty() {
                cx.error(&format!("{ptr}/tls/key_file"), "is empty");
            }
        }
        if self.queue == 0 {
            cx.error(&format!("{ptr}/queue"), "must be at least 1");
        }
        if self.batch_size == 0 {
            cx.error(&format!("{ptr}/batch_size"), "must be at least 1");
        }
        cx.duration(&format!("{ptr}/linger"), &self.linger);
        cx.duration(&format!("{ptr}/body_timeout"), &self.body_timeout);
        crate::sources::message::check(
            ptr,
            cx,
            message_format(self.format),
            self.time.as_deref(),
            self.device_id.as_deref(),
        );
    }
    fn ports(&self) -> Vec<crate::runtime::Port> {
        crate::runtime::SOURCE_PORTS.to_vec()
    }
}

/// What a body is once bridge requests are turned into export messages.
fn message_format(f: WebhookFormat) -> MessageFormat {
    match f {
        WebhookFormat::Auto => MessageFormat::Auto,
        WebhookFormat::Export | WebhookFormat::Bridge => MessageFormat::Export,
        WebhookFormat::Json => MessageFormat::Json,
    }
}

/// How the webhook decodes a body once [`record_of`] has turned a bridge request into an export
/// message (records of any shape need their own time: the webhook has no enqueued time).
pub fn decoder(cfg: &WebhookConfig) -> anyhow::Result<MessageDecoder> {
    crate::sources::message::decoder(message_format(cfg.format), cfg.time.as_deref(), cfg.device_id.as_deref())
}

/// The device bridge's rule for device ids: `^[a-zA-Z0-9-._:]*[a-zA-Z0-9-]+$`.
pub fn bridge_device_id_ok(id: &str) -> bool {
    let ok = |c: char| c.is_ascii_alphanumeric() || "-._:".contains(c);
    !id.is_empty() && id.chars().all(ok) && id.chars().last().is_some_and(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// Turns a device-bridge request into an export-like telemetry message (JSON text).
pub fn bridge_to_export(v: &Value, received: crate::event::Nanos) -> Result<String, String> {
    let obj = v.as_object().ok_or("a bridge request is a JSON object")?;
    let device = obj.get("device").and_then(Value::as_object).ok_or("`device` must be an object")?;
    let id = device.get("deviceId").and_then(Value::as_str).ok_or("`device.deviceId` is missing or not a string")?;
    if !bridge_device_id_ok(id) {
        return Err(format!(
            "device.deviceId {id:?} is invalid: letters, digits and - . _ : only, ending in a letter, a digit or -"
        ));
    }
    let measurements =
        obj.get("measurements").filter(|m| m.is_object()).ok_or("`measurements` must be a non-null object")?;
    let time = match obj.get("timestamp") {
        None | Some(Value::Null) => received,
        Some(Value::String(s)) => crate::time::parse_rfc3339(s)
            .ok_or_else(|| format!("timestamp {s:?} is not an ISO 8601 time like 2020-06-08T20:16:54.602Z"))?,
        Some(_) => return Err("`timestamp` must be a string".into()),
    };
    let mut out = Map::new();
    out.insert("messageSource".into(), "telemetry".into());
    out.insert("deviceId".into(), id.into());
    out.insert("enqueuedTime".into(), crate::time::format_rfc3339(time).into());
    out.insert("telemetry".into(), measurements.clone());
    match device.get("modelId") {
        None | Some(Value::Null) => {}
        Some(Value::String(m)) => {
            out.insert("modelId".into(), m.as_str().into());
        }
        Some(_) => return Err("`device.modelId` must be a string".into()),
    }
    serde_json::to_string(&Value::Object(out)).map_err(|e| e.to_string())
}

/// What the HTTP side hands to the source task: a request's events and dead letters (either may
/// be empty), and where to say that a checkpoint holds them.
struct Incoming {
    events: Vec<Event>,
    dead: Vec<Event>,
    respond: oneshot::Sender<()>,
    permit: OwnedSemaphorePermit,
}

/// A request waiting for its answer, and its place in the bounded queue.
type Held = (oneshot::Sender<()>, OwnedSemaphorePermit);

struct App {
    name: String,
    path: String,
    token: Secret,
    format: WebhookFormat,
    decoder: MessageDecoder,
    projection: Option<Arc<Projection>>,
    slots: Arc<Semaphore>,
    tx: mpsc::UnboundedSender<Incoming>,
    stopping: AtomicBool,
    retry_after: u64,
    body_timeout: Duration,
    seq: AtomicU64,
    metrics: ComponentMetrics,
    unauthorized: AtomicU64,
}

pub struct WebhookSource {
    cfg: WebhookConfig,
    name: String,
    linger: Duration,
    app: Option<Arc<App>>,
    rx: Option<mpsc::UnboundedReceiver<Incoming>>,
    handle: Option<axum_server::Handle<SocketAddr>>,
    /// Requests answered once their epoch commits (each holds its place in the queue until then).
    marked: VecDeque<(u64, Vec<Held>)>,
    /// Requests whose events were sent since the last barrier.
    waiting: Vec<Held>,
    projection: Option<Arc<Projection>>,
    metrics: ComponentMetrics,
}

impl WebhookSource {
    pub fn new(cfg: WebhookConfig, cx: &BuildCx<'_>) -> anyhow::Result<WebhookSource> {
        if cx.mode == Mode::Replay {
            anyhow::bail!("a webhook source never ends: use `centralflow run`, not `replay`");
        }
        let linger = cfg.linger.get()?;
        Ok(WebhookSource {
            name: cx.name.to_string(),
            linger,
            app: None,
            rx: None,
            handle: None,
            marked: VecDeque::new(),
            waiting: Vec::new(),
            projection: cx.projection.clone(),
            metrics: cx.metrics.clone(),
            cfg,
        })
    }

    async fn serve(&mut self) -> anyhow::Result<()> {
        let addr: SocketAddr = self.cfg.address.parse().context("the webhook address")?;
        let tls = match &self.cfg.tls {
            Some(t) => Some(server_tls(t)?),
            None => None,
        };
        // the previous run of a reloaded pipeline may still be letting go of the port
        let mut tries = 0;
        let listener = loop {
            match std::net::TcpListener::bind(addr) {
                Ok(l) => break l,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 20 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(e).with_context(|| format!("cannot listen on {addr}")),
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let app = Arc::new(App {
            name: self.name.clone(),
            path: self.cfg.path.clone(),
            token: self.cfg.token.clone(),
            format: self.cfg.format,
            decoder: decoder(&self.cfg)?,
            projection: self.projection.clone(),
            slots: Arc::new(Semaphore::new(self.cfg.queue)),
            tx,
            stopping: AtomicBool::new(false),
            retry_after: self.cfg.retry_after,
            body_timeout: self.cfg.body_timeout.get()?,
            seq: AtomicU64::new(0),
            metrics: self.metrics.clone(),
            unauthorized: AtomicU64::new(0),
        });
        let router = axum::Router::new().fallback(handle).with_state(app.clone());
        let handle = axum_server::Handle::new();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let bound = listener.local_addr()?;
        match tls {
            Some(cfg) => {
                let server =
                    axum_server::from_tcp_rustls(listener, axum_server::tls_rustls::RustlsConfig::from_config(cfg))?
                        .handle(handle.clone());
                tokio::spawn(async move {
                    if let Err(e) = server.serve(router.into_make_service_with_connect_info::<SocketAddr>()).await {
                        tracing::error!("the webhook server stopped: {e}");
                    }
                });
            }
            None => {
                let server = axum_server::from_tcp(listener)?.handle(handle.clone());
                tokio::spawn(async move {
                    if let Err(e) = server.serve(router.into_make_service_with_connect_info::<SocketAddr>()).await {
                        tracing::error!("the webhook server stopped: {e}");
                    }
                });
            }
        }
        tracing::info!("webhook listening on {scheme}://{bound}{}", self.cfg.path);
        metrics::set_ready(&self.name, true, &format!("listening on {scheme}://{bound}"));
        self.app = Some(app);
        self.rx = Some(rx);
        self.handle = Some(handle);
        Ok(())
    }

    fn answer(&mut self, epoch: u64) {
        while self.marked.front().is_some_and(|(e, _)| *e <= epoch) {
            let (_, reqs) = self.marked.pop_front().unwrap();
            for (r, _place) in reqs {
                let _ = r.send(());
            }
        }
    }
}

impl Drop for WebhookSource {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.graceful_shutdown(Some(Duration::from_secs(2)));
        }
        metrics::clear_ready(&self.name);
    }
}

fn server_tls(t: &TlsFiles) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&t.cert_file)
        .with_context(|| format!("reading the certificate {}", t.cert_file))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("the certificate {} is not PEM", t.cert_file))?;
    if certs.is_empty() {
        anyhow::bail!("{} holds no certificate", t.cert_file);
    }
    let key = PrivateKeyDer::from_pem_file(&t.key_file).with_context(|| format!("reading the key {}", t.key_file))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the certificate and key do not fit together")?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

fn plain(status: StatusCode, text: &str) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], format!("{text}\n")).into_response()
}

fn busy(app: &App, text: &str) -> Response {
    let mut r = plain(StatusCode::SERVICE_UNAVAILABLE, text);
    if let Ok(v) = HeaderValue::from_str(&app.retry_after.to_string()) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

fn authorized(app: &App, req: &Request) -> bool {
    let Some(got) = req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes()) else { return false };
    let want = app.token.expose().as_bytes();
    let exact: bool = got.ct_eq(want).into();
    let bearer =
        got.len() == want.len() + 7 && got[..7].eq_ignore_ascii_case(b"Bearer ") && bool::from(got[7..].ct_eq(want));
    exact | bearer
}

/// Reads at most `limit` bytes; `Err(prefix)` with what was read when the body is larger.
async fn read_limited(body: Body, limit: usize) -> Result<Bytes, Result<Bytes, String>> {
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| Err(format!("reading the body: {e}")))?;
        if buf.len() + chunk.len() > limit {
            let take = limit - buf.len();
            buf.extend_from_slice(&chunk[..take]);
            return Err(Ok(Bytes::from(buf)));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buf))
}

async fn handle(State(app): State<Arc<App>>, ConnectInfo(peer): ConnectInfo<SocketAddr>, req: Request) -> Response {
    if req.uri().path() != app.path {
        return plain(StatusCode::NOT_FOUND, "not found");
    }
    if req.method() != Method::POST {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "POST export messages here");
    }
    if !authorized(&app, &req) {
        app.metrics.errors.inc();
        let n = app.unauthorized.fetch_add(1, Ordering::Relaxed) + 1;
        if n <= 10 || n % 1000 == 0 {
            tracing::warn!(component = %app.name, peer = %peer, count = n, "request refused: missing or wrong Authorization token");
        }
        return plain(StatusCode::UNAUTHORIZED, "missing or wrong Authorization token");
    }
    if app.stopping.load(Ordering::Relaxed) {
        return busy(&app, "stopping; send again later");
    }
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    // the body first, within `body_timeout`: a slow sender holds no place in the queue
    let read = tokio::time::timeout(app.body_timeout, read_limited(req.into_body(), MAX_RECORD_BYTES)).await;
    let Ok(read) = read else {
        app.metrics.errors.inc();
        let reason = format!("the request body did not arrive within {:?} (body_timeout)", app.body_timeout);
        tracing::warn!(component = %app.name, peer = %peer, "request refused: {reason}");
        let mut r = plain(StatusCode::REQUEST_TIMEOUT, &reason);
        r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        return r;
    };
    let Ok(permit) = app.slots.clone().try_acquire_owned() else {
        return busy(&app, "too many requests waiting; send again later");
    };
    let n = app.seq.fetch_add(1, Ordering::Relaxed) + 1;
    let origin = format!("webhook {peer} #{n}");
    // A refused body is answered with its reason only once a checkpoint holds its dead letter;
    // if the source stops first, the sender is told to send again.
    let dead = |payload: Bytes, reason: &str| vec![Event::dead_letter(payload, reason, &origin, &app.name)];
    let body = match read {
        Ok(b) => b,
        Err(Ok(prefix)) => {
            let reason = format!(
                "body of more than {MAX_RECORD_BYTES} bytes{} (IoT Central's message limit); the dead letter keeps the first {MAX_RECORD_BYTES}",
                declared.map(|d| format!(" ({d} declared)")).unwrap_or_default()
            );
            return match hand_over(&app, Vec::new(), dead(prefix, &reason), permit).await {
                Ok(()) => plain(StatusCode::PAYLOAD_TOO_LARGE, &reason),
                Err(r) => r,
            };
        }
        Err(Err(e)) => return plain(StatusCode::BAD_REQUEST, &e),
    };
    app.metrics.bytes_in.inc_by(body.len() as u64);
    let received = crate::time::now_nanos();
    let record = match record_of(app.format, &body, received) {
        Ok(r) => r,
        Err(reason) => {
            return match hand_over(&app, Vec::new(), dead(body, &reason), permit).await {
                Ok(()) => plain(StatusCode::BAD_REQUEST, &reason),
                Err(r) => r,
            };
        }
    };
    let out = app.decoder.decode(record, app.projection.as_ref(), &Transport::NONE);
    let mut events = Vec::with_capacity(out.len());
    let mut bad = Vec::new();
    for r in out {
        match r {
            Ok(mut ev) => {
                ev.meta.offset = n as i64;
                ev.meta.origin = Some(Arc::from(origin.as_str()));
                events.push(ev);
            }
            Err(reason) => bad.push(Event::dead_letter(body.clone(), &reason, &origin, &app.name)),
        }
    }
    if events.is_empty() {
        let reason =
            bad.first().and_then(|e| e.get_str("reason").map(str::to_string)).unwrap_or_else(|| "no message".into());
        return match hand_over(&app, Vec::new(), bad, permit).await {
            Ok(()) => plain(StatusCode::BAD_REQUEST, &reason),
            Err(r) => r,
        };
    }
    let count = events.len();
    match hand_over(&app, events, bad, permit).await {
        Ok(()) => (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], format!("{{\"accepted\":{count}}}"))
            .into_response(),
        Err(r) => r,
    }
}

/// Hands a request's events and dead letters to the source task and waits until a durable
/// checkpoint holds them. `Err`: the answer to give instead, "send again" (the source is
/// stopping, or stopped before a checkpoint covered the request).
async fn hand_over(
    app: &App,
    events: Vec<Event>,
    dead: Vec<Event>,
    permit: OwnedSemaphorePermit,
) -> Result<(), Response> {
    let (respond, done) = oneshot::channel();
    if app.tx.send(Incoming { events, dead, respond, permit }).is_err() {
        return Err(busy(app, "stopping; send again later"));
    }
    done.await.map_err(|_| busy(app, "not processed; send again"))
}

/// The export record a request body stands for: the body itself, or, for a device-bridge
/// request, the export-like telemetry message it becomes (`received` is its time when the
/// request has no `timestamp`). `Err`: the reason the body is refused.
pub fn record_of(format: WebhookFormat, body: &Bytes, received: crate::event::Nanos) -> Result<Bytes, String> {
    if !is_bridge(format, body)? {
        return Ok(body.clone());
    }
    // the bridge reads the body as a value: the limits serde_json's value has (and the key that
    // would change what it reads) are refused as the export decoder refuses them
    if let Ok(text) = std::str::from_utf8(body) {
        crate::model::limits::check_value_limits(text)?;
    }
    serde_json::from_slice::<Value>(body)
        .map_err(|e| format!("malformed JSON: {e}"))
        .and_then(|v| bridge_to_export(&v, received))
        .map(Bytes::from)
}

/// Whether a body is a device-bridge request (`Err`: not JSON at all).
fn is_bridge(format: WebhookFormat, body: &[u8]) -> Result<bool, String> {
    match format {
        WebhookFormat::Export | WebhookFormat::Json => Ok(false),
        WebhookFormat::Bridge => Ok(true),
        WebhookFormat::Auto => {
            let first = body.iter().find(|b| !b.is_ascii_whitespace()).copied();
            if first != Some(b'{') {
                return Ok(false); // arrays are export messages; anything else fails in the decoder
            }
            #[derive(Deserialize)]
            struct Probe {
                #[serde(default)]
                device: Option<serde::de::IgnoredAny>,
                #[serde(default)]
                measurements: Option<serde::de::IgnoredAny>,
                #[serde(default, rename = "messageSource")]
                message_source: Option<serde::de::IgnoredAny>,
            }
            let p: Probe = serde_json::from_slice(body).map_err(|e| format!("malformed JSON: {e}"))?;
            Ok(p.message_source.is_none() && (p.device.is_some() || p.measurements.is_some()))
        }
    }
}

#[async_trait]
impl Source for WebhookSource {
    async fn run(&mut self, cx: &mut SourceCx) -> anyhow::Result<EndReason> {
        metrics::set_ready(&self.name, false, "starting");
        self.serve().await?;
        let mut rx = self.rx.take().expect("serving");
        let app = self.app.clone().expect("serving");
        let mut events: Vec<Event> = Vec::new();
        let mut dead: Vec<Event> = Vec::new();
        let mut deadline: Option<tokio::time::Instant> = None;
        let mut asked = false;
        loop {
            let linger = crate::time::sleep_until_or_never(deadline);
            tokio::select! {
                biased;
                c = cx.control() => match c {
                    Control::Barrier(e) => {
                        flush(cx, &mut events, &mut dead).await?;
                        deadline = None;
                        cx.barrier(e, Vec::new()).await?;
                        self.marked.push_back((e, std::mem::take(&mut self.waiting)));
                        asked = false;
                    }
                    Control::Commit(e) => {
                        self.answer(e);
                        if !self.waiting.is_empty() {
                            cx.request_checkpoint();
                            asked = true;
                        }
                    }
                    Control::Stop | Control::Shutdown => {
                        app.stopping.store(true, Ordering::Relaxed);
                        // what handlers queued before the close goes into the final checkpoint;
                        // after it, a handler's send fails and it answers "send again"
                        rx.close();
                        while let Ok(m) = rx.try_recv() {
                            events.extend(m.events);
                            dead.extend(m.dead);
                            self.waiting.push((m.respond, m.permit));
                        }
                        flush(cx, &mut events, &mut dead).await?;
                        // what was sent goes into the final checkpoint; answered at its commit
                        let rest = std::mem::take(&mut self.waiting);
                        self.marked.push_back((u64::MAX, rest));
                        metrics::set_ready(&self.name, false, "stopping");
                        return Ok(EndReason::Stopped);
                    }
                    Control::Flush(_) => {}
                },
                _ = linger => {
                    flush(cx, &mut events, &mut dead).await?;
                    deadline = None;
                }
                m = rx.recv() => match m {
                    Some(m) => {
                        events.extend(m.events);
                        dead.extend(m.dead);
                        self.waiting.push((m.respond, m.permit));
                        if !asked {
                            cx.request_checkpoint();
                            asked = true;
                        }
                        if deadline.is_none() {
                            deadline = Some(tokio::time::Instant::now() + self.linger);
                        }
                        if events.len() >= self.cfg.batch_size {
                            flush(cx, &mut events, &mut dead).await?;
                            deadline = None;
                        }
                    }
                    None => return Ok(EndReason::Stopped),
                },
            }
        }
    }

    async fn commit(&mut self, _epoch: u64) -> anyhow::Result<()> {
        // after the stream ended: the final checkpoint covers everything that was sent
        self.answer(u64::MAX);
        Ok(())
    }
}

async fn flush(cx: &mut SourceCx, events: &mut Vec<Event>, dead: &mut Vec<Event>) -> anyhow::Result<()> {
    if !events.is_empty() {
        cx.send(Batch::new(std::mem::take(events))).await?;
    }
    if !dead.is_empty() {
        cx.dead_letter(std::mem::take(dead)).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_a_secret_from_the_environment() {
        let text = |tok: &str| {
            format!("sources:\n  w:\n    type: webhook\n    token: {tok}\nsinks:\n  o:\n    type: console\n    inputs: [w]\n")
        };
        let env = |k: &str| (k == "TOKEN").then(|| "a-long-enough-token".to_string());
        assert!(crate::config::load_str(&text("${TOKEN}"), "t", &env).is_ok());
        let e = crate::config::load_str(&text("literal-token-1234"), "t", &env).unwrap_err();
        assert!(e[0].to_string().contains("must come from the environment"), "{e:?}");
    }

    #[test]
    fn bridge_device_ids_follow_the_bridge() {
        for ok in ["my-cloud-device", "A_b.c:d-1", "x", "dev-"] {
            assert!(bridge_device_id_ok(ok), "{ok}");
        }
        for bad in ["", "a b", "dev.", "dev_", "dév", "a/b"] {
            assert!(!bridge_device_id_ok(bad), "{bad}");
        }
    }

    #[test]
    fn bridge_requests_become_telemetry() {
        let v: Value = serde_json::from_str(
            r#"{"device":{"deviceId":"my-cloud-device","modelId":"dtmi:x;1"},"measurements":{"temp":20.31,"ledColor":"blue"},"timestamp":"2020-06-08T20:16:54.602Z"}"#,
        )
        .unwrap();
        let text = bridge_to_export(&v, 0).unwrap();
        let out: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(out["messageSource"], "telemetry");
        assert_eq!(out["deviceId"], "my-cloud-device");
        assert_eq!(out["enqueuedTime"], "2020-06-08T20:16:54.602Z");
        assert_eq!(out["telemetry"]["temp"], 20.31);
        assert_eq!(out["modelId"], "dtmi:x;1");
        let ev = crate::model::decode::decode_one(Bytes::from(text)).unwrap();
        assert_eq!(ev.get_str("deviceId"), Some("my-cloud-device"));
        // no timestamp: the time of receipt
        let v: Value = serde_json::from_str(r#"{"device":{"deviceId":"d"},"measurements":{}}"#).unwrap();
        let out: Value = serde_json::from_str(&bridge_to_export(&v, 1_000_000_000).unwrap()).unwrap();
        assert_eq!(out["enqueuedTime"], "1970-01-01T00:00:01.000Z");
        for (bad, why) in [
            (r#"{"device":{"deviceId":"a b"},"measurements":{}}"#, "invalid"),
            (r#"{"device":{},"measurements":{}}"#, "missing"),
            (r#"{"device":{"deviceId":"d"},"measurements":null}"#, "non-null object"),
            (r#"{"device":{"deviceId":"d"},"measurements":{},"timestamp":"yesterday"}"#, "not an ISO 8601"),
        ] {
            let v: Value = serde_json::from_str(bad).unwrap();
            let e = bridge_to_export(&v, 0).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn bodies_are_told_apart() {
        assert_eq!(is_bridge(WebhookFormat::Auto, br#"{"device":{"deviceId":"d"},"measurements":{}}"#), Ok(true));
        assert_eq!(is_bridge(WebhookFormat::Auto, br#"{"messageSource":"telemetry","deviceId":"d"}"#), Ok(false));
        assert_eq!(is_bridge(WebhookFormat::Auto, br#"[{"messageSource":"telemetry"}]"#), Ok(false));
        assert!(is_bridge(WebhookFormat::Auto, br#"{"device": "#).is_err());
    }
}
