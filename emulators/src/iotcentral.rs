//! In-process emulator of the device-facing HTTP APIs that IoT Central's "device bridge" uses:
//! the Device Provisioning Service (DPS) runtime registration API and IoT Hub's
//! device-to-cloud telemetry endpoint. It verifies SAS tokens the way Azure does and can inject
//! faults. Everything listens on 127.0.0.1 only, in plain HTTP.
//!
//! # Starting
//! ```ignore
//! use common::iotc_emulator::*;
//! let emu = IotcEmulator::start("0ne00ABCDEF", GROUP_KEY_B64, 2).await?;   // async tests
//! let emu = IotcEmulator::start_blocking("0ne00ABCDEF", GROUP_KEY_B64, 2)?; // #[test] fns
//! let dps = emu.dps_endpoint();          // "http://127.0.0.1:PORT"  (the "global endpoint")
//! ```
//! The servers run on their own thread and tokio runtime, so the handle works from `#[test]`
//! functions that block (e.g. while the centralflow binary runs) as well as from
//! `#[tokio::test]`. They stop when the last clone of the handle is dropped.
//! Each of the `hubs` IoT Hubs listens on its own port; its *hub name* (what DPS returns as
//! `assignedHub`, what the SAS `sr` must name) is `"127.0.0.1:PORT"`. A device is always
//! assigned to the same hub: `hub_for(id)` = FNV-1a-64(id bytes) mod `hubs`. Clients reach a hub
//! at `http://{assignedHub}` (there is no TLS: the client must use http for the hub when it used
//! http for DPS).
//!
//! # API
//! * `IotcEmulator::start(id_scope, group_key_b64, hubs).await` / `start_blocking(..)` →
//!   `anyhow::Result<IotcEmulator>` (Clone).
//! * Addresses: `dps_endpoint()`, `id_scope()`, `hub_names()`, `hub_for(device)`,
//!   `device_key(device)`; free fn `derive_device_key(group_key_b64, device)`.
//! * Observations: `messages() -> Vec<Received>` (arrival order, batch elements one by one),
//!   `clear_messages()`, `wait_for_messages(n, timeout).await`,
//!   `wait_for_messages_blocking(n, timeout)`, `registrations() -> BTreeMap<String, u32>`
//!   (successful DPS registrations), `registered_devices() -> BTreeMap<device, hub>` (current),
//!   `model_ids() -> BTreeMap<device, model>`, `hub_answers() -> Vec<(Instant, status)>`,
//!   `requests() -> Requests { dps, hub, by_status,
//!   dps_register }`.
//! * Faults and knobs: `inject(Fault)`, `clear_faults()`, `block_device(id)`,
//!   `unblock_device(id)`, `set_dps_retry_after_secs(s)` (default 1), `set_polls_before_assigned(n)`
//!   (default 1), `set_registration_limit_per_minute(Option<u32>)` (default Some(200)),
//!   `set_clock_skew_secs(s)` (default 300).
//! * `Received { device_id, hub, body, app_properties, content_type, content_encoding,
//!   message_id, correlation_id, creation_time_utc, in_batch }` (+ `json()`), `Fault::{
//!   TooManyRequests { share, retry_after_secs }, Unavailable { share }, UnavailableRetryAfter {
//!   share, retry_after_secs }, UnauthorizedOnce {
//!   device }, DeviceNotFoundOnce { device } }`, consts `MAX_MESSAGE_BYTES`, `BATCH_CONTENT_TYPE`.
//!
//! # DPS (on `dps_endpoint()`)
//! * `PUT /{idScope}/registrations/{id}/register?api-version=..` body
//!   `{"registrationId": id, "payload": {"iotcModelId": ".."}}` (payload optional; `modelId` is
//!   also read) → `202 {"operationId":..,"status":"assigning"}` + `Retry-After` (default 1 s,
//!   `set_dps_retry_after_secs`). With `set_polls_before_assigned(0)` the PUT answers 200 with
//!   the final status directly.
//! * `GET /{idScope}/registrations/{id}/operations/{operationId}?api-version=..` → `202
//!   assigning` for the first `polls_before_assigned` polls (default 1), then `200
//!   {"operationId":..,"status":"assigned","registrationState":{"registrationId","deviceId",
//!   "assignedHub","status":"assigned","substatus","createdDateTimeUtc",
//!   "lastUpdatedDateTimeUtc","etag","payload"?}}`. A device blocked with `block_device` gets
//!   `200 {"status":"failed","registrationState":{..,"status":"failed","errorCode":400209,
//!   "errorMessage":..}}`. The device is registered in its hub (and counted in
//!   `registrations()`) when the operation resolves, i.e. on that poll.
//! * Both need `Authorization: SharedAccessSignature sr=..&sig=..&se=..&skn=registration`;
//!   failures answer `401 {"errorCode":401000,"trackingId","message":"Unauthorized",
//!   "timestampUtc"}`. Also: missing api-version or bad body / registrationId ≠ path id → 400
//!   (400004); unknown operation → 404 (404005); more than `registration_limit_per_minute`
//!   (default 200) accepted PUTs in the last 60 s → 429 (429001) with `Retry-After`.
//!
//! # IoT Hub (on each hub port)
//! `POST /devices/{id}/messages/events?api-version=..` with
//! `Authorization: SharedAccessSignature sr=..&sig=..&se=..` (no skn). Checks, in this order:
//! 1. share faults (`Fault::TooManyRequests` → 429 + `Retry-After`, `Fault::Unavailable` → 503);
//! 2. once faults for that device (`UnauthorizedOnce` → 401, `DeviceNotFoundOnce` → 404 and the
//!    registration is forgotten, so later requests get 404 until the device registers again);
//! 3. the device must be registered to THIS hub, else 404 `{"errorCode":404001,"message":"Device
//!    not found",..}`;
//! 4. blocked devices → 401 (IoT Central disables a blocked device in its hub);
//! 5. the SAS token (see below) → 401 (errorCode 401002 bad/missing token or signature, 401003
//!    expired or `sr` not for this device/hub);
//! 6. size: a single message's body + property names and values, or a batch request's whole
//!    body, over 256 KiB (262,144 bytes) → 413 (413001);
//! 7. format → 400 (400004); success → 204, every message recorded.
//!
//! Error answers carry `iothub-errorcode: <Name>` and a JSON body
//! `{"errorCode","trackingId","message","timestampUtc","emulatorDetail"}`.
//!
//! Single message: body = payload; `iothub-app-K: V` headers → property `K` (names arrive
//! lower-cased: HTTP header names are case-insensitive); `iothub-contenttype`,
//! `iothub-contentencoding`, `iothub-messageid`, `iothub-correlationid` → system properties.
//! Batch: `Content-Type: application/vnd.microsoft.iothub.json`, body a JSON array (non-empty)
//! of `{"body": "<base64>", "base64Encoded": true?, "properties": {..}}`; `base64Encoded`
//! absent means base64 too (Node SDK, Python sample), `false` means `body` is the UTF-8 text
//! itself. Property names: `iothub-app-K` → `K` (prefix matched case-insensitively, the rest
//! kept as sent), `iothub-contenttype|contentencoding|messageid|correlationid` → system, other
//! `iothub-*` names are dropped (reserved), anything else → application property as is (e.g.
//! `$.ct`). In both forms the application property `iothub-creation-time-utc` (sent as
//! `iothub-app-iothub-creation-time-utc`) is also copied to `creation_time_utc`.
//!
//! # SAS verification (both services)
//! Token = `SharedAccessSignature` + exactly one space + `&`-separated `name=value` fields
//! (names case-insensitive, no duplicates; `sr`, `sig`, `se` required). `sr` is kept exactly
//! as sent; the other values are URL-decoded (`%XX`, and `+` → space), and a value is only what
//! stands between the first and second `=`, so an un-encoded `sig` with `+` or `=` fails.
//! * string-to-sign = `<sr as sent>` + `"\n"` + `<se as sent>`; expected `sig` =
//!   base64(HMAC-SHA256(key = base64decode(device key), string-to-sign)), compared exactly.
//! * device key = base64(HMAC-SHA256(key = base64decode(group key), msg = UTF-8 device id as in
//!   the URL path)).
//! * expiry: rejected when `se` + clock skew (default 300 s, `set_clock_skew_secs`) < now.
//! * audience: `sr` URL-decoded, trailing `/` trimmed, compared ASCII case-insensitively with
//!   `{idScope}/registrations/{id}` (DPS; `skn` must be `registration`) or `{hub}/devices/{id}`
//!   (IoT Hub, `{hub}` = `127.0.0.1:PORT`; `skn` must be absent), or with a longer path of the
//!   request below it (`.../register`, `.../operations/{op}`, `.../messages/events`). The id may
//!   appear raw or encodeURIComponent-encoded. So `%2F` vs `%2f` and a lower-cased `sr` both
//!   verify (the signature covers the bytes as sent).
//!
//! # Faults
//! Share faults are deterministic: the n-th hub request to the events route since the fault
//! was injected is hit iff floor(n·share) > floor((n−1)·share) (0.5 → requests 2, 4, 6…;
//! 1.0 → all; 0.25 → every 4th). Faults stay until `clear_faults()`; once faults are consumed.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::Response;
use axum::Router;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::{json, Value};
use sha2::Sha256;

/// IoT Hub's device-to-cloud message size limit (256 KiB).
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// Content type of an HTTPS batch of device-to-cloud messages.
pub const BATCH_CONTENT_TYPE: &str = "application/vnd.microsoft.iothub.json";
/// Default clock skew tolerated on `se` (Azure's SharedAccessSignature uses 5 minutes).
pub const DEFAULT_CLOCK_SKEW_SECS: u64 = 300;
/// Default DPS registrations accepted per sliding minute (IoT Central quota).
pub const DEFAULT_REGISTRATIONS_PER_MINUTE: u32 = 200;
/// Requests bigger than this are refused before any parsing (413).
const BODY_READ_LIMIT: usize = 16 * 1024 * 1024;

/// One device-to-cloud message accepted by a hub (a batch gives one per element).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    pub device_id: String,
    /// Hub name, `127.0.0.1:PORT`.
    pub hub: String,
    pub body: Vec<u8>,
    /// Application properties without the `iothub-app-` prefix.
    pub app_properties: BTreeMap<String, String>,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    /// Value of the application property `iothub-creation-time-utc`.
    pub creation_time_utc: Option<String>,
    pub in_batch: bool,
}

impl Received {
    /// The body as a JSON value (panics if it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("message body is not JSON")
    }
}

/// Request counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Requests {
    /// Every request the DPS port answered.
    pub dps: u64,
    /// Every request any hub port answered.
    pub hub: u64,
    /// Status codes of all answers, DPS and hubs together.
    pub by_status: BTreeMap<u16, u64>,
    /// `PUT .../register` requests that passed authentication (rate-limited or not).
    pub dps_register: u64,
}

/// A fault to inject into the hubs (see the module docs for the order of checks).
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// 429 with `Retry-After: retry_after_secs` on `share` (0..=1) of hub requests.
    TooManyRequests { share: f64, retry_after_secs: u64 },
    /// 503 on `share` (0..=1) of hub requests.
    Unavailable { share: f64 },
    /// 503 with `Retry-After: retry_after_secs` on `share` (0..=1) of hub requests.
    UnavailableRetryAfter { share: f64, retry_after_secs: u64 },
    /// The next hub request of this device answers 401.
    UnauthorizedOnce { device: String },
    /// The next hub request of this device answers 404 DeviceNotFound, and the device's
    /// registration is forgotten (it must register with DPS again).
    DeviceNotFoundOnce { device: String },
}

/// Handle on a running emulator. Cheap to clone; the servers stop when the last clone drops.
#[derive(Clone)]
pub struct IotcEmulator {
    shared: Arc<Shared>,
    _guard: Arc<Guard>,
}

struct Guard {
    shutdown: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(tx) = lock(&self.shutdown).take() {
            let _ = tx.send(());
        }
    }
}

struct Shared {
    id_scope: String,
    group_key: Vec<u8>,
    /// `IP:PORT` DPS listens on.
    dps_addr: String,
    /// `https` when serving TLS ([`IotcEmulator::start_tls_blocking`]), else `http`.
    scheme: &'static str,
    hubs: Vec<String>,
    state: Mutex<EmuState>,
    next_id: AtomicU64,
}

struct Operation {
    device: String,
    payload: Option<Value>,
    model_id: Option<String>,
    polls: u32,
    created: String,
    /// The final answer, once resolved.
    done: Option<Value>,
}

struct ActiveFault {
    fault: Fault,
    seen: u64,
}

struct EmuState {
    messages: Vec<Received>,
    registrations: BTreeMap<String, u32>,
    model_ids: BTreeMap<String, String>,
    /// device id → index of the hub it is registered to.
    registered: HashMap<String, usize>,
    blocked: BTreeSet<String>,
    operations: HashMap<String, Operation>,
    register_times: VecDeque<Instant>,
    faults: Vec<ActiveFault>,
    requests: Requests,
    /// When each hub request was answered, and how.
    hub_answers: Vec<(Instant, u16)>,
    retry_after_secs: u64,
    polls_before_assigned: u32,
    registration_limit: Option<u32>,
    clock_skew_secs: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl IotcEmulator {
    /// Starts DPS for `id_scope` (enrollment group key `group_key_b64`) and `hubs` IoT Hubs.
    pub async fn start(id_scope: &str, group_key_b64: &str, hubs: usize) -> anyhow::Result<IotcEmulator> {
        Self::start_blocking(id_scope, group_key_b64, hubs)
    }

    /// Same as [`IotcEmulator::start`], for tests without a runtime.
    pub fn start_blocking(id_scope: &str, group_key_b64: &str, hubs: usize) -> anyhow::Result<IotcEmulator> {
        Self::start_on(std::net::SocketAddr::from(([127, 0, 0, 1], 0)), id_scope, group_key_b64, hubs)
    }

    /// DPS and the hubs over TLS with `tls` (a certificate for `127.0.0.1`): `dps_endpoint()` is
    /// `https://127.0.0.1:PORT` and clients reach the hubs at `https://{assignedHub}`.
    pub fn start_tls_blocking(
        id_scope: &str,
        group_key_b64: &str,
        hubs: usize,
        tls: Arc<rustls::ServerConfig>,
    ) -> anyhow::Result<IotcEmulator> {
        Self::start_inner(std::net::SocketAddr::from(([127, 0, 0, 1], 0)), id_scope, group_key_b64, hubs, Some(tls))
    }

    /// Starts with DPS on this address (the hubs on free ports of its IP: DPS names them to
    /// devices as their `assignedHub`).
    pub fn start_on(
        dps_addr: std::net::SocketAddr,
        id_scope: &str,
        group_key_b64: &str,
        hubs: usize,
    ) -> anyhow::Result<IotcEmulator> {
        Self::start_inner(dps_addr, id_scope, group_key_b64, hubs, None)
    }

    fn start_inner(
        dps_addr: std::net::SocketAddr,
        id_scope: &str,
        group_key_b64: &str,
        hubs: usize,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> anyhow::Result<IotcEmulator> {
        anyhow::ensure!(hubs >= 1, "at least one hub is needed");
        anyhow::ensure!(!id_scope.is_empty() && !id_scope.contains('/'), "bad ID scope {id_scope:?}");
        let group_key = B64.decode(group_key_b64.trim()).context("the group key is not base64")?;
        let bind = |addr: std::net::SocketAddr| -> anyhow::Result<std::net::TcpListener> {
            let l = std::net::TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
            l.set_nonblocking(true)?;
            Ok(l)
        };
        let dps_listener = bind(dps_addr)?;
        let ip = dps_listener.local_addr()?.ip();
        let bind = || bind(std::net::SocketAddr::new(ip, 0));
        let hub_listeners = (0..hubs).map(|_| bind()).collect::<anyhow::Result<Vec<_>>>()?;
        let dps_addr = dps_listener.local_addr()?.to_string();
        let mut hub_names = Vec::new();
        for l in &hub_listeners {
            hub_names.push(l.local_addr()?.to_string());
        }
        let shared = Arc::new(Shared {
            id_scope: id_scope.to_string(),
            group_key,
            dps_addr,
            scheme: if tls.is_some() { "https" } else { "http" },
            hubs: hub_names,
            state: Mutex::new(EmuState {
                messages: Vec::new(),
                registrations: BTreeMap::new(),
                model_ids: BTreeMap::new(),
                registered: HashMap::new(),
                blocked: BTreeSet::new(),
                operations: HashMap::new(),
                register_times: VecDeque::new(),
                faults: Vec::new(),
                requests: Requests::default(),
                hub_answers: Vec::new(),
                retry_after_secs: 1,
                polls_before_assigned: 1,
                registration_limit: Some(DEFAULT_REGISTRATIONS_PER_MINUTE),
                clock_skew_secs: DEFAULT_CLOCK_SKEW_SECS,
            }),
            next_id: AtomicU64::new(1),
        });
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("emulator runtime")?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut servers: Vec<(std::net::TcpListener, Router)> = Vec::new();
        servers.push((dps_listener, Router::new().fallback(dps_handler).with_state(shared.clone())));
        for (idx, l) in hub_listeners.into_iter().enumerate() {
            let ctx = HubCtx { shared: shared.clone(), idx };
            servers.push((l, Router::new().fallback(hub_handler).with_state(ctx)));
        }
        std::thread::Builder::new()
            .name("iotc-emulator".into())
            .spawn(move || {
                runtime.block_on(async move {
                    for (listener, router) in servers {
                        match &tls {
                            Some(cfg) => {
                                let cfg = axum_server::tls_rustls::RustlsConfig::from_config(cfg.clone());
                                let server = axum_server::from_tcp_rustls(listener, cfg).expect("listener");
                                tokio::spawn(async move {
                                    let _ = server.serve(router.into_make_service()).await;
                                });
                            }
                            None => {
                                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                                tokio::spawn(async move {
                                    let _ = axum::serve(listener, router).await;
                                });
                            }
                        }
                    }
                    let _ = rx.await;
                });
                // Dropping the runtime here cancels the servers.
            })
            .context("spawn emulator thread")?;
        Ok(IotcEmulator { shared, _guard: Arc::new(Guard { shutdown: Mutex::new(Some(tx)) }) })
    }

    /// `http://127.0.0.1:PORT` of DPS (stands for `https://global.azure-devices-provisioning.net`).
    pub fn dps_endpoint(&self) -> String {
        format!("{}://{}", self.shared.scheme, self.shared.dps_addr)
    }

    /// The ID scope DPS serves.
    pub fn id_scope(&self) -> String {
        self.shared.id_scope.clone()
    }

    /// Hub names (`127.0.0.1:PORT`), index = hub number.
    pub fn hub_names(&self) -> Vec<String> {
        self.shared.hubs.clone()
    }

    /// The hub name DPS assigns to this device.
    pub fn hub_for(&self, device_id: &str) -> String {
        self.shared.hubs[self.shared.hub_index(device_id)].clone()
    }

    /// The device key the enrollment group gives this device (base64).
    pub fn device_key(&self, device_id: &str) -> String {
        B64.encode(hmac_sha256(&self.shared.group_key, device_id.as_bytes()))
    }

    /// Every telemetry message accepted so far, in arrival order.
    pub fn messages(&self) -> Vec<Received> {
        lock(&self.shared.state).messages.clone()
    }

    /// Forgets the recorded messages.
    pub fn clear_messages(&self) {
        lock(&self.shared.state).messages.clear();
    }

    /// Waits until at least `n` messages were accepted, or `timeout` passes; returns them all.
    pub async fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let end = Instant::now() + timeout;
        loop {
            let msgs = self.messages();
            if msgs.len() >= n || Instant::now() >= end {
                return msgs;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Blocking twin of [`IotcEmulator::wait_for_messages`].
    pub fn wait_for_messages_blocking(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let end = Instant::now() + timeout;
        loop {
            let msgs = self.messages();
            if msgs.len() >= n || Instant::now() >= end {
                return msgs;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Successful DPS registrations (operations resolved to "assigned") per device id.
    pub fn registrations(&self) -> BTreeMap<String, u32> {
        lock(&self.shared.state).registrations.clone()
    }

    /// Devices currently registered, with their hub name.
    pub fn registered_devices(&self) -> BTreeMap<String, String> {
        let st = lock(&self.shared.state);
        st.registered.iter().map(|(d, i)| (d.clone(), self.shared.hubs[*i].clone())).collect()
    }

    /// Model id (`payload.iotcModelId`, else `payload.modelId`) of each device's last successful
    /// registration that sent one.
    pub fn model_ids(&self) -> BTreeMap<String, String> {
        lock(&self.shared.state).model_ids.clone()
    }

    /// When each hub request was answered (in order), with its status.
    pub fn hub_answers(&self) -> Vec<(Instant, u16)> {
        lock(&self.shared.state).hub_answers.clone()
    }

    /// Request counters.
    pub fn requests(&self) -> Requests {
        lock(&self.shared.state).requests.clone()
    }

    /// Adds a fault (faults accumulate until [`IotcEmulator::clear_faults`]).
    pub fn inject(&self, f: Fault) {
        lock(&self.shared.state).faults.push(ActiveFault { fault: f, seen: 0 });
    }

    /// Removes every fault, consumed or not.
    pub fn clear_faults(&self) {
        lock(&self.shared.state).faults.clear();
    }

    /// Blocks a device: DPS registrations fail with 400209 and its hub answers 401.
    pub fn block_device(&self, id: &str) {
        lock(&self.shared.state).blocked.insert(id.to_string());
    }

    /// Undoes [`IotcEmulator::block_device`].
    pub fn unblock_device(&self, id: &str) {
        lock(&self.shared.state).blocked.remove(id);
    }

    /// `Retry-After` seconds DPS sends while an operation is "assigning" (default 1).
    pub fn set_dps_retry_after_secs(&self, secs: u64) {
        lock(&self.shared.state).retry_after_secs = secs;
    }

    /// Polls answered "assigning" before the final status (default 1; 0 = the PUT answers 200
    /// with the final status).
    pub fn set_polls_before_assigned(&self, polls: u32) {
        lock(&self.shared.state).polls_before_assigned = polls;
    }

    /// Registrations (PUT .../register) accepted per sliding 60 s before 429; `None` = no limit.
    pub fn set_registration_limit_per_minute(&self, limit: Option<u32>) {
        lock(&self.shared.state).registration_limit = limit;
    }

    /// Seconds past `se` during which a token is still accepted (default 300).
    pub fn set_clock_skew_secs(&self, secs: u64) {
        lock(&self.shared.state).clock_skew_secs = secs;
    }
}

// ---------------------------------------------------------------------------------------------
// shared helpers

/// base64(HMAC-SHA256(base64decode(group key), device id)).
pub fn derive_device_key(group_key_b64: &str, device_id: &str) -> anyhow::Result<String> {
    let key = B64.decode(group_key_b64.trim()).context("the group key is not base64")?;
    Ok(B64.encode(hmac_sha256(&key, device_id.as_bytes())))
}

fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(msg);
    mac.finalize().into_bytes().to_vec()
}

/// JavaScript's encodeURIComponent: everything but `A-Z a-z 0-9 - _ . ! ~ * ' ( )`.
const URI_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'!')
    .remove(b'~')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

fn encode_component(s: &str) -> String {
    utf8_percent_encode(s, URI_COMPONENT).to_string()
}

/// WebUtility.UrlDecode: `+` is a space, `%XX` decoded (lossy UTF-8).
fn url_decode(s: &str) -> String {
    let plus = s.replace('+', " ");
    percent_decode_str(&plus).decode_utf8_lossy().into_owned()
}

fn now_utc() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn now_secs_f64() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl Shared {
    fn hub_index(&self, device_id: &str) -> usize {
        (fnv1a64(device_id.as_bytes()) % self.hubs.len() as u64) as usize
    }

    fn fresh_id(&self) -> u64 {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        fnv1a64(&n.to_le_bytes())
            ^ (SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0))
    }

    fn guid(&self) -> String {
        let a = self.fresh_id();
        let b = fnv1a64(&a.to_be_bytes());
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            b >> 52,
            b & 0xffff_ffff_ffff
        )
    }

    fn count(&self, dps: bool, status: StatusCode) {
        let mut st = lock(&self.state);
        if dps {
            st.requests.dps += 1;
        } else {
            st.requests.hub += 1;
            st.hub_answers.push((Instant::now(), status.as_u16()));
        }
        *st.requests.by_status.entry(status.as_u16()).or_insert(0) += 1;
    }
}

fn json_response(status: StatusCode, body: &Value, headers: &[(&'static str, String)]) -> Response {
    let mut resp = Response::new(Body::from(serde_json::to_vec(body).expect("json")));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
    for (k, v) in headers {
        if let Ok(v) = HeaderValue::from_str(v) {
            resp.headers_mut().insert(HeaderName::from_static(k), v);
        }
    }
    resp
}

fn error_body(shared: &Shared, code: u32, message: &str, detail: &str) -> Value {
    json!({
        "errorCode": code,
        "trackingId": shared.guid(),
        "message": message,
        "timestampUtc": now_utc(),
        "emulatorDetail": detail,
    })
}

/// Path segments, each percent-decoded; `None` when a segment is not UTF-8.
fn segments(path: &str) -> Option<Vec<String>> {
    path.strip_prefix('/')
        .unwrap_or(path)
        .split('/')
        .map(|s| percent_decode_str(s).decode_utf8().ok().map(|c| c.into_owned()))
        .collect()
}

fn api_version(query: Option<&str>) -> Option<String> {
    url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(k, _)| k == "api-version")
        .map(|(_, v)| v.into_owned())
        .filter(|v| !v.is_empty())
}

// ---------------------------------------------------------------------------------------------
// SAS tokens

struct Sas {
    sr_raw: String,
    sig: String,
    se_raw: String,
    se: f64,
    skn: Option<String>,
}

fn parse_sas(headers: &HeaderMap) -> Result<Sas, String> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let raw = values.next().ok_or("no Authorization header")?;
    if values.next().is_some() {
        return Err("several Authorization headers".into());
    }
    let raw = raw.to_str().map_err(|_| "Authorization is not ASCII")?;
    let parts: Vec<&str> = raw.split(char::is_whitespace).collect();
    if parts.len() != 2 || parts[0] != "SharedAccessSignature" {
        return Err("malformed token: want 'SharedAccessSignature <fields>'".into());
    }
    let mut fields: HashMap<String, String> = HashMap::new();
    for field in parts[1].split('&').filter(|f| !f.is_empty()) {
        let mut kv = field.split('=');
        let name = kv.next().unwrap_or("");
        let value = kv.next().ok_or_else(|| format!("malformed field {field:?}"))?;
        let lname = name.to_ascii_lowercase();
        let value = if lname == "sr" { value.to_string() } else { url_decode(value) };
        if fields.insert(lname, value).is_some() {
            return Err(format!("duplicate field {name:?}"));
        }
    }
    let mut take = |n: &str| fields.remove(n);
    let sr_raw = take("sr").ok_or("missing field: sr")?;
    let sig = take("sig").ok_or("missing field: sig")?;
    let se_raw = take("se").ok_or("missing field: se")?;
    let skn = take("skn");
    let se: f64 = se_raw.trim().parse().map_err(|_| format!("se {se_raw:?} is not a number"))?;
    if !se.is_finite() {
        return Err("se is not finite".into());
    }
    Ok(Sas { sr_raw, sig, se_raw, se, skn })
}

/// Whether the decoded audience names `base` (in one of its spellings) or a path below it that
/// leads to the request's `full` path.
fn audience_ok(sr_raw: &str, bases: &[String], suffix: &str) -> bool {
    let aud = url_decode(sr_raw);
    let aud = aud.trim_end_matches('/').to_ascii_lowercase();
    bases.iter().any(|b| {
        let base = b.to_ascii_lowercase();
        let full = format!("{base}{suffix}");
        aud == base || aud == full || (aud.starts_with(&format!("{base}/")) && full.starts_with(&format!("{aud}/")))
    })
}

enum AuthError {
    /// Bad or missing token, wrong signature or key name.
    Invalid(String),
    /// Expired, or issued for another resource.
    NotValidHere(String),
}

fn verify_sas(sas: &Sas, device_key: &[u8], bases: &[String], suffix: &str, skew_secs: u64) -> Result<(), AuthError> {
    if sas.se + (skew_secs as f64) < now_secs_f64() {
        return Err(AuthError::NotValidHere(format!("token expired (se={})", sas.se_raw)));
    }
    if !audience_ok(&sas.sr_raw, bases, suffix) {
        return Err(AuthError::NotValidHere(format!("sr {:?} does not grant access to {:?}", sas.sr_raw, bases[0])));
    }
    let to_sign = format!("{}\n{}", sas.sr_raw, sas.se_raw);
    let expected = B64.encode(hmac_sha256(device_key, to_sign.as_bytes()));
    if expected != sas.sig {
        return Err(AuthError::Invalid("signature mismatch".into()));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// DPS

async fn dps_handler(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let resp = dps_inner(&shared, req).await;
    shared.count(true, resp.status());
    resp
}

fn dps_error(shared: &Shared, status: StatusCode, code: u32, message: &str, detail: &str) -> Response {
    json_response(status, &error_body(shared, code, message, detail), &[])
}

fn dps_unauthorized(shared: &Shared, detail: &str) -> Response {
    dps_error(shared, StatusCode::UNAUTHORIZED, 401000, "Unauthorized", detail)
}

fn dps_auth(shared: &Shared, headers: &HeaderMap, scope: &str, device: &str, suffix: &str) -> Result<(), String> {
    if !scope.eq_ignore_ascii_case(&shared.id_scope) {
        return Err(format!("unknown ID scope {scope:?}"));
    }
    let sas = parse_sas(headers)?;
    if sas.skn.as_deref() != Some("registration") {
        return Err(format!("skn must be 'registration', got {:?}", sas.skn));
    }
    let bases =
        [format!("{scope}/registrations/{device}"), format!("{scope}/registrations/{}", encode_component(device))];
    let key = hmac_sha256(&shared.group_key, device.as_bytes());
    let skew = lock(&shared.state).clock_skew_secs;
    verify_sas(&sas, &key, &bases, suffix, skew).map_err(|e| match e {
        AuthError::Invalid(s) | AuthError::NotValidHere(s) => s,
    })
}

async fn dps_inner(shared: &Shared, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, BODY_READ_LIMIT).await {
        Ok(b) => b,
        Err(_) => return dps_error(shared, StatusCode::PAYLOAD_TOO_LARGE, 413000, "Request too large", "body"),
    };
    let Some(segs) = segments(parts.uri.path()) else {
        return dps_error(shared, StatusCode::BAD_REQUEST, 400004, "Bad request", "path is not UTF-8");
    };
    enum Route {
        Register,
        Poll(String),
    }
    let (scope, device, route) = match (&parts.method, segs.as_slice()) {
        (&Method::PUT, [scope, r, dev, reg]) if r == "registrations" && reg == "register" => {
            (scope.clone(), dev.clone(), Route::Register)
        }
        (&Method::GET, [scope, r, dev, o, op]) if r == "registrations" && o == "operations" => {
            (scope.clone(), dev.clone(), Route::Poll(op.clone()))
        }
        _ => {
            return dps_error(
                shared,
                StatusCode::NOT_FOUND,
                404000,
                "Not found",
                &format!("no DPS route for {} {}", parts.method, parts.uri.path()),
            )
        }
    };
    if api_version(parts.uri.query()).is_none() {
        return dps_error(shared, StatusCode::BAD_REQUEST, 400004, "Bad request", "api-version is required");
    }
    if device.is_empty() {
        return dps_error(shared, StatusCode::BAD_REQUEST, 400004, "Bad request", "empty registration id");
    }
    let suffix = match &route {
        Route::Register => "/register".to_string(),
        Route::Poll(op) => format!("/operations/{op}"),
    };
    if let Err(detail) = dps_auth(shared, &parts.headers, &scope, &device, &suffix) {
        return dps_unauthorized(shared, &detail);
    }
    match route {
        Route::Register => dps_register(shared, &device, &body),
        Route::Poll(op) => dps_poll(shared, &device, &op),
    }
}

fn dps_register(shared: &Shared, device: &str, body: &[u8]) -> Response {
    let bad = |detail: &str| dps_error(shared, StatusCode::BAD_REQUEST, 400004, "Bad request", detail);
    let parsed: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return bad(&format!("body is not JSON: {e}")),
    };
    let Some(obj) = parsed.as_object() else { return bad("body is not a JSON object") };
    match obj.get("registrationId").and_then(Value::as_str) {
        Some(r) if r.eq_ignore_ascii_case(device) => {}
        Some(r) => return bad(&format!("registrationId {r:?} differs from the path's {device:?}")),
        None => return bad("registrationId is missing"),
    }
    let payload = obj.get("payload").cloned().filter(|p| !p.is_null());
    let model_id = payload
        .as_ref()
        .and_then(|p| p.get("iotcModelId").or_else(|| p.get("modelId")).and_then(Value::as_str).map(str::to_string));

    let mut st = lock(&shared.state);
    st.requests.dps_register += 1;
    let now = Instant::now();
    while st.register_times.front().is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60)) {
        st.register_times.pop_front();
    }
    if let Some(limit) = st.registration_limit {
        if st.register_times.len() >= limit as usize {
            let oldest = *st.register_times.front().expect("limit reached means non-empty");
            let wait = Duration::from_secs(60).saturating_sub(now.duration_since(oldest));
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            drop(st);
            return json_response(
                StatusCode::TOO_MANY_REQUESTS,
                &error_body(
                    shared,
                    429001,
                    "Operations are being throttled for this tenant.",
                    "registration rate limit",
                ),
                &[("retry-after", secs.max(1).to_string())],
            );
        }
    }
    st.register_times.push_back(now);
    let op_id = format!("4.{:016x}.{}", fnv1a64(shared.id_scope.as_bytes()), shared.guid());
    st.operations.insert(
        op_id.clone(),
        Operation { device: device.to_string(), payload, model_id, polls: 0, created: now_utc(), done: None },
    );
    if st.polls_before_assigned == 0 {
        let done = resolve(shared, &mut st, &op_id);
        drop(st);
        return json_response(StatusCode::OK, &done, &[]);
    }
    let retry = st.retry_after_secs.to_string();
    drop(st);
    json_response(
        StatusCode::ACCEPTED,
        &json!({"operationId": op_id, "status": "assigning"}),
        &[("retry-after", retry)],
    )
}

fn dps_poll(shared: &Shared, device: &str, op_id: &str) -> Response {
    let mut st = lock(&shared.state);
    let polls_before = st.polls_before_assigned;
    let retry = st.retry_after_secs.to_string();
    let Some(op) = st.operations.get_mut(op_id) else {
        drop(st);
        return dps_error(shared, StatusCode::NOT_FOUND, 404005, "Operation not found.", op_id);
    };
    if op.device != device {
        drop(st);
        return dps_error(shared, StatusCode::NOT_FOUND, 404005, "Operation not found.", "operation of another device");
    }
    if let Some(done) = &op.done {
        let done = done.clone();
        drop(st);
        return json_response(StatusCode::OK, &done, &[]);
    }
    op.polls += 1;
    if op.polls <= polls_before {
        drop(st);
        return json_response(
            StatusCode::ACCEPTED,
            &json!({"operationId": op_id, "status": "assigning"}),
            &[("retry-after", retry)],
        );
    }
    let done = resolve(shared, &mut st, op_id);
    drop(st);
    json_response(StatusCode::OK, &done, &[])
}

/// Settles an operation: assigned (registers the device) or failed (blocked device).
fn resolve(shared: &Shared, st: &mut EmuState, op_id: &str) -> Value {
    let op = st.operations.get(op_id).expect("operation exists");
    let device = op.device.clone();
    let created = op.created.clone();
    let payload = op.payload.clone();
    let model_id = op.model_id.clone();
    let now = now_utc();
    let etag = format!("\"{}\"", shared.guid());
    let done = if st.blocked.contains(&device) {
        json!({
            "operationId": op_id,
            "status": "failed",
            "registrationState": {
                "registrationId": device,
                "createdDateTimeUtc": created,
                "status": "failed",
                "errorCode": 400209,
                "errorMessage": "Custom allocation failed with status code: 400",
                "lastUpdatedDateTimeUtc": now,
                "etag": etag,
            }
        })
    } else {
        let idx = shared.hub_index(&device);
        st.registered.insert(device.clone(), idx);
        *st.registrations.entry(device.clone()).or_insert(0) += 1;
        if let Some(m) = model_id {
            st.model_ids.insert(device.clone(), m);
        }
        let mut state = json!({
            "registrationId": device,
            "createdDateTimeUtc": created,
            "assignedHub": shared.hubs[idx],
            "deviceId": device,
            "status": "assigned",
            "substatus": "initialAssignment",
            "lastUpdatedDateTimeUtc": now,
            "etag": etag,
        });
        if let Some(p) = payload {
            state["payload"] = p;
        }
        json!({"operationId": op_id, "status": "assigned", "registrationState": state})
    };
    if let Some(op) = st.operations.get_mut(op_id) {
        op.done = Some(done.clone());
    }
    done
}

// ---------------------------------------------------------------------------------------------
// IoT Hub

#[derive(Clone)]
struct HubCtx {
    shared: Arc<Shared>,
    idx: usize,
}

async fn hub_handler(State(ctx): State<HubCtx>, req: Request) -> Response {
    let resp = hub_inner(&ctx, req).await;
    ctx.shared.count(false, resp.status());
    resp
}

fn hub_error(
    shared: &Shared,
    status: StatusCode,
    code: u32,
    name: &'static str,
    message: &str,
    detail: &str,
) -> Response {
    json_response(status, &error_body(shared, code, message, detail), &[("iothub-errorcode", name.to_string())])
}

fn share_hit(share: f64, n: u64) -> bool {
    let s = share.clamp(0.0, 1.0);
    let now = (n as f64 * s + 1e-9).floor();
    let before = ((n - 1) as f64 * s + 1e-9).floor();
    now > before
}

enum FaultHit {
    TooMany(u64),
    Unavailable,
    UnavailableFor(u64),
    Unauthorized,
    NotFound,
}

async fn hub_inner(ctx: &HubCtx, req: Request) -> Response {
    let shared = &*ctx.shared;
    let hub = &shared.hubs[ctx.idx];
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, BODY_READ_LIMIT).await {
        Ok(b) => b,
        Err(_) => {
            return hub_error(
                shared,
                StatusCode::PAYLOAD_TOO_LARGE,
                413001,
                "MessageTooLarge",
                "Message too large",
                "request body",
            )
        }
    };
    let Some(segs) = segments(parts.uri.path()) else {
        return hub_error(
            shared,
            StatusCode::BAD_REQUEST,
            400004,
            "ArgumentInvalid",
            "Bad request",
            "path is not UTF-8",
        );
    };
    let device = match (&parts.method, segs.as_slice()) {
        (&Method::POST, [d, id, m, e]) if d == "devices" && m == "messages" && e == "events" && !id.is_empty() => {
            id.clone()
        }
        _ => {
            return hub_error(
                shared,
                StatusCode::NOT_FOUND,
                404000,
                "NotFound",
                "Not found",
                &format!("no IoT Hub route for {} {}", parts.method, parts.uri.path()),
            )
        }
    };
    if api_version(parts.uri.query()).is_none() {
        return hub_error(
            shared,
            StatusCode::BAD_REQUEST,
            400001,
            "InvalidProtocolVersion",
            "api-version is required",
            "",
        );
    }

    // Faults, registration, blocking: one look at the state.
    let (hit, registered_here, blocked, skew) = {
        let mut st = lock(&shared.state);
        let mut hit = None;
        for f in st.faults.iter_mut() {
            match f.fault {
                Fault::TooManyRequests { share, retry_after_secs } => {
                    f.seen += 1;
                    if hit.is_none() && share_hit(share, f.seen) {
                        hit = Some(FaultHit::TooMany(retry_after_secs));
                    }
                }
                Fault::Unavailable { share } => {
                    f.seen += 1;
                    if hit.is_none() && share_hit(share, f.seen) {
                        hit = Some(FaultHit::Unavailable);
                    }
                }
                Fault::UnavailableRetryAfter { share, retry_after_secs } => {
                    f.seen += 1;
                    if hit.is_none() && share_hit(share, f.seen) {
                        hit = Some(FaultHit::UnavailableFor(retry_after_secs));
                    }
                }
                _ => {}
            }
        }
        if hit.is_none() {
            let pos = st.faults.iter().position(|f| match &f.fault {
                Fault::UnauthorizedOnce { device: d } | Fault::DeviceNotFoundOnce { device: d } => *d == device,
                _ => false,
            });
            if let Some(pos) = pos {
                let f = st.faults.remove(pos);
                if matches!(f.fault, Fault::DeviceNotFoundOnce { .. }) {
                    st.registered.remove(&device);
                    hit = Some(FaultHit::NotFound);
                } else {
                    hit = Some(FaultHit::Unauthorized);
                }
            }
        }
        let registered_here = st.registered.get(&device) == Some(&ctx.idx);
        (hit, registered_here, st.blocked.contains(&device), st.clock_skew_secs)
    };
    match hit {
        Some(FaultHit::TooMany(secs)) => {
            return json_response(
                StatusCode::TOO_MANY_REQUESTS,
                &error_body(shared, 429001, "Throttling", "injected fault TooManyRequests"),
                &[("iothub-errorcode", "ThrottlingException".into()), ("retry-after", secs.to_string())],
            )
        }
        Some(FaultHit::UnavailableFor(secs)) => {
            return json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &error_body(shared, 503000, "ServiceUnavailable", "injected fault UnavailableRetryAfter"),
                &[("iothub-errorcode", "ServiceUnavailable".into()), ("retry-after", secs.to_string())],
            )
        }
        Some(FaultHit::Unavailable) => {
            return hub_error(
                shared,
                StatusCode::SERVICE_UNAVAILABLE,
                503000,
                "ServiceUnavailable",
                "Service unavailable",
                "injected fault Unavailable",
            )
        }
        Some(FaultHit::Unauthorized) => {
            return hub_error(
                shared,
                StatusCode::UNAUTHORIZED,
                401002,
                "IotHubUnauthorizedAccess",
                "Unauthorized",
                "injected fault UnauthorizedOnce",
            )
        }
        Some(FaultHit::NotFound) => {
            return hub_error(
                shared,
                StatusCode::NOT_FOUND,
                404001,
                "DeviceNotFound",
                "Device not found",
                "injected fault DeviceNotFoundOnce",
            )
        }
        None => {}
    }
    if !registered_here {
        return hub_error(
            shared,
            StatusCode::NOT_FOUND,
            404001,
            "DeviceNotFound",
            "Device not found",
            &format!("device {device:?} is not registered to hub {hub}"),
        );
    }
    if blocked {
        return hub_error(
            shared,
            StatusCode::UNAUTHORIZED,
            401002,
            "IotHubUnauthorizedAccess",
            "Unauthorized",
            "device is blocked",
        );
    }

    // Authentication.
    let auth = parse_sas(&parts.headers).map_err(AuthError::Invalid).and_then(|sas| {
        if let Some(skn) = &sas.skn {
            return Err(AuthError::Invalid(format!(
                "skn {skn:?} names a shared access policy; device tokens have no skn"
            )));
        }
        let bases = [format!("{hub}/devices/{device}"), format!("{hub}/devices/{}", encode_component(&device))];
        let key = hmac_sha256(&shared.group_key, device.as_bytes());
        verify_sas(&sas, &key, &bases, "/messages/events", skew)
    });
    match auth {
        Ok(()) => {}
        Err(AuthError::Invalid(d)) => {
            return hub_error(shared, StatusCode::UNAUTHORIZED, 401002, "IotHubUnauthorizedAccess", "Unauthorized", &d)
        }
        Err(AuthError::NotValidHere(d)) => {
            return hub_error(shared, StatusCode::UNAUTHORIZED, 401003, "IotHubUnauthorized", "Unauthorized", &d)
        }
    }

    let is_batch = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case(BATCH_CONTENT_TYPE));
    let too_large = |what: &str| {
        hub_error(shared, StatusCode::PAYLOAD_TOO_LARGE, 413001, "MessageTooLarge", "Message too large", what)
    };
    let bad = |what: &str| hub_error(shared, StatusCode::BAD_REQUEST, 400004, "ArgumentInvalid", "Bad request", what);

    let received = if is_batch {
        if body.len() > MAX_MESSAGE_BYTES {
            return too_large(&format!("batch of {} bytes > {MAX_MESSAGE_BYTES}", body.len()));
        }
        match parse_batch(&body, &device, hub) {
            Ok(v) => v,
            Err(e) => return bad(&e),
        }
    } else {
        match parse_single(&parts.headers, &body, &device, hub) {
            Ok(r) => {
                let size = r.body.len()
                    + r.app_properties.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
                    + [&r.content_type, &r.content_encoding, &r.message_id, &r.correlation_id]
                        .iter()
                        .map(|o| o.as_ref().map_or(0, |s| s.len()))
                        .sum::<usize>();
                if size > MAX_MESSAGE_BYTES {
                    return too_large(&format!("message of {size} bytes > {MAX_MESSAGE_BYTES}"));
                }
                vec![r]
            }
            Err(e) => return bad(&e),
        }
    };
    lock(&shared.state).messages.extend(received);
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    resp
}

fn new_received(device: &str, hub: &str, body: Vec<u8>, in_batch: bool) -> Received {
    Received {
        device_id: device.to_string(),
        hub: hub.to_string(),
        body,
        app_properties: BTreeMap::new(),
        content_type: None,
        content_encoding: None,
        message_id: None,
        correlation_id: None,
        creation_time_utc: None,
        in_batch,
    }
}

/// Applies one property name/value as IoT Hub reads it. `batch` allows un-prefixed app names.
fn apply_property(r: &mut Received, name: &str, value: &str, batch: bool) {
    let lower = name.to_ascii_lowercase();
    if lower.len() > "iothub-app-".len() && lower.starts_with("iothub-app-") {
        let key = &name["iothub-app-".len()..];
        if key.eq_ignore_ascii_case("iothub-creation-time-utc") {
            r.creation_time_utc = Some(value.to_string());
        }
        r.app_properties.insert(key.to_string(), value.to_string());
        return;
    }
    match lower.as_str() {
        "iothub-contenttype" => r.content_type = Some(value.to_string()),
        "iothub-contentencoding" => r.content_encoding = Some(value.to_string()),
        "iothub-messageid" => r.message_id = Some(value.to_string()),
        "iothub-correlationid" => r.correlation_id = Some(value.to_string()),
        _ if lower.starts_with("iothub-") => {} // reserved: iothub-to, iothub-userid, ...
        _ if batch && !name.is_empty() => {
            r.app_properties.insert(name.to_string(), value.to_string());
        }
        _ => {}
    }
}

fn parse_single(headers: &HeaderMap, body: &[u8], device: &str, hub: &str) -> Result<Received, String> {
    let mut r = new_received(device, hub, body.to_vec(), false);
    for (name, value) in headers {
        let n = name.as_str();
        if !n.starts_with("iothub-") {
            continue;
        }
        let v = value.to_str().map_err(|_| format!("header {n} is not visible ASCII"))?;
        apply_property(&mut r, n, v, false);
    }
    Ok(r)
}

fn parse_batch(body: &[u8], device: &str, hub: &str) -> Result<Vec<Received>, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("batch is not JSON: {e}"))?;
    let items = v.as_array().ok_or("batch is not a JSON array")?;
    if items.is_empty() {
        return Err("empty batch".into());
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let obj = item.as_object().ok_or_else(|| format!("batch[{i}] is not an object"))?;
        let text = obj
            .get("body")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("batch[{i}].body is missing or not a string"))?;
        let b64 = match obj.get("base64Encoded") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(format!("batch[{i}].base64Encoded is not a boolean")),
        };
        let bytes = if b64 {
            B64.decode(text).map_err(|e| format!("batch[{i}].body is not base64: {e}"))?
        } else {
            text.as_bytes().to_vec()
        };
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(format!("batch[{i}] body over {MAX_MESSAGE_BYTES} bytes"));
        }
        let mut r = new_received(device, hub, bytes, true);
        match obj.get("properties") {
            None | Some(Value::Null) => {}
            Some(Value::Object(props)) => {
                for (k, v) in props {
                    let v = v.as_str().ok_or_else(|| format!("batch[{i}].properties.{k} is not a string"))?;
                    apply_property(&mut r, k, v, true);
                }
            }
            Some(_) => return Err(format!("batch[{i}].properties is not an object")),
        }
        out.push(r);
    }
    Ok(out)
}
