//! The sending machinery of the `central` sink: a bounded queue of messages per device, a
//! dispatcher that starts registrations and requests (at most one request in flight per
//! device, `concurrency` in all, paced to `rate_limit` messages per second), the device
//! registration cache, and the bookkeeping that lets `flush` return exactly what is unsent.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;

use super::dps::{self, RegOutcome};
use super::hub::{self, SendOutcome};
use super::sas::GroupKey;
use super::{mqtt, CentralConfig, Transport};
use crate::metrics::ComponentMetrics;
use crate::runtime::checkpoint::CheckpointStore;
use crate::runtime::BuildCx;

/// One telemetry message to send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutMsg {
    pub device: String,
    pub model: Option<String>,
    pub component: Option<String>,
    /// `iothub-creation-time-utc`.
    pub created: Option<String>,
    /// Application properties (name, value).
    pub props: Vec<(String, String)>,
    /// JSON body.
    pub body: Vec<u8>,
    /// `iothub-messageid`.
    pub id: String,
}

/// The deterministic message id: hex of the first 16 bytes of SHA-256 over device, component,
/// creation time and body.
pub fn message_id(device: &str, component: Option<&str>, created: Option<&str>, body: &[u8]) -> String {
    let mut h = sha2::Sha256::new();
    for part in [device.as_bytes(), component.unwrap_or("").as_bytes(), created.unwrap_or("").as_bytes()] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.update(body);
    h.finalize()[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// Settings resolved from the configuration.
pub(super) struct Settings {
    pub id_scope: String,
    pub group: GroupKey,
    /// `https://host[:port]` or `http://127.0.0.1:port`, without a trailing slash.
    pub dps: String,
    /// `https` or `http`: the hub is reached with the same scheme as DPS.
    pub scheme: &'static str,
    pub transport: Transport,
    pub batch_size: usize,
    pub rate: f64,
    pub regs_per_minute: f64,
    pub concurrency: usize,
    pub queue: usize,
    pub request_timeout: Duration,
    pub mqtt_port: u16,
    pub mqtt_tls: Option<Arc<rustls::ClientConfig>>,
}

/// Registration state of a device.
#[derive(Default)]
struct Dev {
    q: VecDeque<OutMsg>,
    /// A request or registration of this device is under way.
    busy: bool,
    /// Queued in `ready` (or `delayed`).
    queued: bool,
    hub: Option<String>,
    /// The model id it was registered with.
    model: Option<String>,
    not_before: Option<Instant>,
    blocked_until: Option<Instant>,
    backoff: Duration,
    auth_failures: u32,
    max_batch: usize,
    /// Error logs for this device so far (to log each kind of trouble once, not per row).
    logged: u32,
}

#[derive(Default)]
struct St {
    devices: HashMap<Arc<str>, Dev>,
    ready: VecDeque<Arc<str>>,
    delayed: BTreeMap<(Instant, u64), Arc<str>>,
    seq: u64,
    /// Messages not yet sent: queued plus in flight.
    pending: usize,
    /// Send requests in flight.
    in_flight: usize,
    /// No new requests: from a flush until its checkpoint is committed (see [`Engine::resume`]).
    paused: bool,
    paused_at: Option<Instant>,
    flushed_epoch: u64,
    committed: Option<(u64, Instant)>,
    fatal: Option<String>,
    cache_dirty: bool,
    dropped: u64,
    retries: u64,
}

pub(super) struct Shared {
    pub set: Settings,
    pub name: String,
    pub metrics: ComponentMetrics,
    pub client: reqwest::Client,
    st: Mutex<St>,
    wake: Notify,
    progress: Notify,
    send_slots: Arc<Semaphore>,
    reg_slots: Semaphore,
    /// Held by registrations until one has succeeded: then the credentials are known to work.
    first_registration: tokio::sync::Mutex<()>,
    verified: AtomicBool,
    /// Devices whose trouble was logged.
    logged_devices: std::sync::atomic::AtomicU64,
    /// Whether `/health/ready` says this sink is ready (sending works).
    ready: AtomicBool,
    msg_pacer: Pacer,
    reg_pacer: Pacer,
}

/// Paces events to a rate, allowing a burst of `burst` worth of them after a pause.
struct Pacer {
    per_sec: f64,
    burst: Duration,
    next: Mutex<Option<Instant>>,
}

impl Pacer {
    fn new(per_sec: f64, burst: Duration) -> Pacer {
        Pacer { per_sec, burst, next: Mutex::new(None) }
    }
    /// Waits until `n` events may go.
    async fn take(&self, n: usize) {
        let start = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let floor = now.checked_sub(self.burst).unwrap_or(now);
            let at = match *next {
                Some(t) if t > floor => t,
                _ => floor,
            };
            *next = Some(at + Duration::from_secs_f64(n as f64 / self.per_sec));
            at
        };
        tokio::time::sleep_until(start).await;
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where the device cache is kept.
enum CacheStore {
    Aux(CheckpointStore, String),
    File(std::path::PathBuf),
    Memory,
}

#[derive(Serialize, Deserialize, Default)]
struct CacheFile {
    id_scope: String,
    devices: BTreeMap<String, CachedDevice>,
}

#[derive(Serialize, Deserialize, Clone)]
struct CachedDevice {
    hub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    model: Option<String>,
}

pub(super) struct Engine {
    sh: Arc<Shared>,
    cache: CacheStore,
    dispatcher: Option<tokio::task::JoinHandle<()>>,
    last_persist: std::time::Instant,
}

impl Engine {
    pub(super) async fn new(cfg: &CentralConfig, cx: &BuildCx<'_>) -> anyhow::Result<Engine> {
        let group = GroupKey::parse(cfg.group_key.expose()).map_err(anyhow::Error::msg)?;
        let endpoint = super::check_endpoint(&cfg.dps_endpoint).map_err(anyhow::Error::msg)?;
        let scheme = if endpoint.scheme() == "http" { "http" } else { "https" };
        let request_timeout = crate::time::parse_duration(&cfg.request_timeout).map_err(anyhow::Error::msg)?;
        let ca = match &cfg.ca_file {
            Some(f) => Some(std::fs::read(f).with_context(|| format!("reading the CA certificate {f}"))?),
            None => None,
        };
        let mut builder = reqwest::Client::builder()
            .timeout(request_timeout)
            .connect_timeout(Duration::from_secs(10).min(request_timeout))
            .user_agent(concat!("centralflow/", env!("CARGO_PKG_VERSION")))
            .pool_max_idle_per_host(cfg.concurrency.max(4));
        if scheme == "http" {
            builder = builder.no_proxy();
        }
        if let Some(pem) = &ca {
            let certs = reqwest::Certificate::from_pem_bundle(pem).context("the CA file is not PEM")?;
            builder = builder.tls_certs_merge(certs);
        }
        let client = builder.build().context("building the HTTP client")?;
        let mqtt_tls = match (cfg.transport, scheme) {
            (Transport::Mqtt, "https") => Some(mqtt::tls_config(ca.as_deref())?),
            _ => None,
        };
        let set = Settings {
            id_scope: cfg.id_scope.trim().to_string(),
            group,
            dps: endpoint.as_str().trim_end_matches('/').to_string(),
            scheme,
            transport: cfg.transport,
            batch_size: match cfg.transport {
                Transport::HttpsBatch | Transport::Mqtt => cfg.batch_size,
                Transport::Https => 1,
            },
            rate: cfg.rate_limit,
            regs_per_minute: cfg.registrations_per_minute,
            concurrency: cfg.concurrency,
            queue: cfg.queue,
            request_timeout,
            mqtt_port: cfg.mqtt_port,
            mqtt_tls,
        };
        let cache = match (&cfg.device_cache, &cx.state) {
            (Some(f), _) => CacheStore::File(f.into()),
            (None, Some(store)) => CacheStore::Aux(
                store.clone(),
                format!("central-{}-devices.json", crate::runtime::checkpoint::sanitize(cx.name)),
            ),
            (None, None) => {
                tracing::info!("no checkpoint store and no device_cache: device registrations are kept in memory only");
                CacheStore::Memory
            }
        };
        let sh = Arc::new(Shared {
            send_slots: Arc::new(Semaphore::new(set.concurrency)),
            reg_slots: Semaphore::new(set.concurrency.clamp(1, 32)),
            msg_pacer: Pacer::new(set.rate, Duration::from_secs(1)),
            // evenly spaced, no burst: DPS counts registrations per minute
            reg_pacer: Pacer::new(set.regs_per_minute / 60.0, Duration::ZERO),
            set,
            name: cx.name.to_string(),
            metrics: cx.metrics.clone(),
            client,
            st: Mutex::new(St::default()),
            wake: Notify::new(),
            progress: Notify::new(),
            first_registration: tokio::sync::Mutex::new(()),
            verified: AtomicBool::new(false),
            logged_devices: Default::default(),
            ready: AtomicBool::new(true),
        });
        let engine = Engine { sh, cache, dispatcher: None, last_persist: std::time::Instant::now() };
        engine.load_cache().await?;
        crate::metrics::set_ready(cx.name, true, "ready to send");
        Ok(engine)
    }

    pub(super) fn metrics(&self) -> &ComponentMetrics {
        &self.sh.metrics
    }

    async fn load_cache(&self) -> anyhow::Result<()> {
        let bytes = match &self.cache {
            CacheStore::Aux(store, name) => {
                store.get_aux(name).await.context("reading the device cache")?.map(|b| b.to_vec())
            }
            CacheStore::File(f) => match std::fs::read(f) {
                Ok(b) => Some(b),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(e).with_context(|| format!("reading the device cache {}", f.display())),
            },
            CacheStore::Memory => None,
        };
        let Some(bytes) = bytes else { return Ok(()) };
        let file: CacheFile = match serde_json::from_slice(&bytes) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("the device cache is unreadable ({e}); devices register again");
                return Ok(());
            }
        };
        if file.id_scope != self.sh.set.id_scope {
            tracing::info!("the device cache is for another ID scope; devices register again");
            return Ok(());
        }
        let mut st = lock(&self.sh.st);
        for (id, d) in file.devices {
            let dev = st.devices.entry(Arc::from(id.as_str())).or_default();
            dev.hub = Some(d.hub);
            dev.model = d.model;
        }
        tracing::info!(devices = st.devices.len(), "device registrations loaded from the cache");
        if !st.devices.is_empty() {
            // a cached registration proves the key worked before
            self.sh.verified.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Writes the device cache if it changed (`force`: now; else at most every 10 s).
    pub(super) async fn persist_cache(&mut self, force: bool) {
        if !force && self.last_persist.elapsed() < Duration::from_secs(10) {
            return;
        }
        let file = {
            let mut st = lock(&self.sh.st);
            if !st.cache_dirty {
                return;
            }
            st.cache_dirty = false;
            CacheFile {
                id_scope: self.sh.set.id_scope.clone(),
                devices: st
                    .devices
                    .iter()
                    .filter_map(|(id, d)| {
                        d.hub
                            .as_ref()
                            .map(|h| (id.to_string(), CachedDevice { hub: h.clone(), model: d.model.clone() }))
                    })
                    .collect(),
            }
        };
        self.last_persist = std::time::Instant::now();
        let bytes = match serde_json::to_vec(&file) {
            Ok(b) => b,
            Err(_) => return,
        };
        let r = match &self.cache {
            CacheStore::Aux(store, name) => store.put_aux(name, bytes).await,
            CacheStore::File(f) => write_file_atomic(f, &bytes),
            CacheStore::Memory => Ok(()),
        };
        if let Err(e) = r {
            lock(&self.sh.st).cache_dirty = true;
            tracing::warn!("the device cache could not be written (devices may register again after a restart): {e:#}");
        }
    }

    /// Queues messages restored from a checkpoint (before `start`).
    pub(super) fn restore(&self, msgs: Vec<OutMsg>) {
        let mut st = lock(&self.sh.st);
        for m in msgs {
            enqueue(&mut st, m);
        }
    }

    pub(super) fn start(&mut self) {
        let sh = self.sh.clone();
        self.dispatcher = Some(tokio::spawn(dispatcher(sh)));
        self.sh.wake.notify_one();
    }

    pub(super) fn stop(&mut self) {
        if let Some(d) = self.dispatcher.take() {
            d.abort();
        }
        crate::metrics::clear_ready(&self.sh.name);
    }

    /// The fatal error, if the sink cannot go on.
    pub(super) fn check(&self) -> anyhow::Result<()> {
        match &lock(&self.sh.st).fatal {
            Some(f) => Err(anyhow::anyhow!("{f}")),
            None => Ok(()),
        }
    }

    /// Queues messages, waiting while the queue is full.
    pub(super) async fn push(&self, msgs: Vec<OutMsg>) -> anyhow::Result<()> {
        let mut msgs = msgs.into_iter().peekable();
        while msgs.peek().is_some() {
            {
                let mut st = lock(&self.sh.st);
                if let Some(f) = &st.fatal {
                    anyhow::bail!("{f}");
                }
                let mut added = false;
                while st.pending < self.sh.set.queue {
                    let Some(m) = msgs.next() else { break };
                    enqueue(&mut st, m);
                    added = true;
                }
                if added {
                    self.sh.wake.notify_one();
                }
                if msgs.peek().is_none() {
                    return Ok(());
                }
            }
            // full: wait for progress (re-checked at least every 100 ms)
            let _ = tokio::time::timeout(Duration::from_millis(100), self.sh.progress.notified()).await;
        }
        Ok(())
    }

    /// Waits until everything is sent or `deadline` passes, then returns what is unsent (with
    /// no request in flight, so the answer is exact).
    ///
    /// Sending stays paused afterwards: the rows returned are in the checkpoint, and sending
    /// them before it is committed would, if this is the final checkpoint of a graceful stop,
    /// send them twice (once now, once after the restart). See [`Engine::resume`].
    pub(super) async fn drain(&self, epoch: u64, deadline: Option<Instant>) -> anyhow::Result<Vec<OutMsg>> {
        // A new epoch starts only once the previous checkpoint is written (or failed): what it
        // kept may be sent now. (Without this, a flush after a flush with no rows in between
        // would wait for a paused sender.)
        if lock(&self.sh.st).paused {
            lock(&self.sh.st).paused = false;
            self.sh.wake.notify_one();
        }
        let mut last_log = Instant::now();
        loop {
            let pending = {
                let st = lock(&self.sh.st);
                if let Some(f) = &st.fatal {
                    anyhow::bail!("{f}");
                }
                st.pending
            };
            if pending == 0 || deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            if last_log.elapsed() > Duration::from_secs(10) {
                last_log = Instant::now();
                tracing::info!(component = %self.sh.name, unsent = pending, "waiting for messages to be sent");
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), self.sh.progress.notified()).await;
        }
        {
            let mut st = lock(&self.sh.st);
            st.paused = true;
            st.paused_at = Some(Instant::now());
            st.flushed_epoch = epoch;
        }
        loop {
            let (fatal, in_flight) = {
                let st = lock(&self.sh.st);
                (st.fatal.clone(), st.in_flight)
            };
            if let Some(f) = fatal {
                anyhow::bail!("{f}");
            }
            if in_flight == 0 {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), self.sh.progress.notified()).await;
        }
        let st = lock(&self.sh.st);
        let mut unsent = Vec::with_capacity(st.pending);
        let mut ids: Vec<&Arc<str>> = st.devices.iter().filter(|(_, d)| !d.q.is_empty()).map(|(k, _)| k).collect();
        ids.sort();
        for id in ids {
            unsent.extend(st.devices[id].q.iter().cloned());
        }
        Ok(unsent)
    }

    /// Sending goes on after a flush once more rows arrive (the flushed checkpoint was then
    /// not the final one), or a second after the flushed checkpoint was committed, or, should
    /// that checkpoint never be committed (it failed to be written), after a minute.
    pub(super) fn resume(&self, rows_arrive: bool) {
        let mut st = lock(&self.sh.st);
        if !st.paused {
            return;
        }
        let now = Instant::now();
        let committed = st.committed.is_some_and(|(e, at)| e >= st.flushed_epoch && now - at >= Duration::from_secs(1));
        let stuck = st.paused_at.is_some_and(|t| now - t >= Duration::from_secs(60));
        if rows_arrive || committed || stuck {
            st.paused = false;
            drop(st);
            self.sh.wake.notify_one();
        }
    }

    /// Checkpoint `epoch` is durable.
    pub(super) fn committed(&self, epoch: u64) {
        lock(&self.sh.st).committed = Some((epoch, Instant::now()));
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

fn write_file_atomic(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn enqueue(st: &mut St, m: OutMsg) {
    let id: Arc<str> = match st.devices.get_key_value(m.device.as_str()) {
        Some((k, _)) => k.clone(),
        None => Arc::from(m.device.as_str()),
    };
    let dev = st.devices.entry(id.clone()).or_default();
    dev.q.push_back(m);
    st.pending += 1;
    if !dev.busy && !dev.queued {
        dev.queued = true;
        st.ready.push_back(id);
    }
}

/// Puts a device back in line after a request or registration (or a delay).
fn requeue(st: &mut St, id: &Arc<str>) {
    let Some(dev) = st.devices.get_mut(id) else { return };
    dev.busy = false;
    if dev.q.is_empty() || dev.queued {
        return;
    }
    dev.queued = true;
    match dev.not_before {
        Some(t) if t > Instant::now() => {
            st.seq += 1;
            let seq = st.seq;
            st.delayed.insert((t, seq), id.clone());
        }
        _ => st.ready.push_back(id.clone()),
    }
}

enum Action {
    Register(Arc<str>, Option<String>),
    Send(Arc<str>, String, Vec<OutMsg>),
    Idle(Option<Instant>),
}

const BLOCKED_FOR: Duration = Duration::from_secs(600);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

fn next_action(sh: &Shared, st: &mut St) -> Action {
    if st.fatal.is_some() || st.paused {
        return Action::Idle(None);
    }
    let now = Instant::now();
    while let Some(entry) = st.delayed.first_entry() {
        if entry.key().0 > now {
            break;
        }
        let id = entry.remove();
        st.ready.push_back(id);
    }
    while let Some(id) = st.ready.pop_front() {
        let Some(dev) = st.devices.get_mut(&id) else { continue };
        dev.queued = false;
        if dev.busy || dev.q.is_empty() {
            continue;
        }
        if let Some(t) = dev.not_before.filter(|t| *t > now) {
            // rows arrived for a device that is waiting out a backoff
            dev.queued = true;
            st.seq += 1;
            st.delayed.insert((t, st.seq), id);
            continue;
        }
        if dev.blocked_until.is_some_and(|t| t > now) {
            let n = dev.q.len();
            dev.q.clear();
            st.pending -= n;
            st.dropped += n as u64;
            sh.metrics.errors.inc_by(n as u64);
            if st.dropped <= 10 || st.dropped % 1000 < n as u64 {
                tracing::error!(
                    component = %sh.name,
                    device = %id,
                    rows = n,
                    dropped_total = st.dropped,
                    "rows of a device that IoT Central refuses were dropped (see the error above)"
                );
            }
            continue;
        }
        let model = dev.q.front().and_then(|m| m.model.clone());
        let needs_registration = dev.hub.is_none() || (model.is_some() && dev.model != model);
        if needs_registration {
            dev.busy = true;
            return Action::Register(id, model);
        }
        let max = if dev.max_batch > 0 { dev.max_batch.min(sh.set.batch_size) } else { sh.set.batch_size };
        let mut take = Vec::new();
        let mut bytes = 0usize;
        while let Some(m) = dev.q.front() {
            let size = m.body.len() * 4 / 3 + m.props.iter().map(|(k, v)| k.len() + v.len() + 30).sum::<usize>() + 200;
            if !take.is_empty() && (take.len() >= max || bytes + size > hub::MAX_BATCH_BYTES) {
                break;
            }
            bytes += size;
            take.push(dev.q.pop_front().unwrap());
        }
        dev.busy = true;
        let hub = dev.hub.clone().unwrap_or_default();
        st.in_flight += 1;
        return Action::Send(id, hub, take);
    }
    Action::Idle(st.delayed.first_key_value().map(|(k, _)| k.0))
}

async fn dispatcher(sh: Arc<Shared>) {
    loop {
        let Ok(permit) = sh.send_slots.clone().acquire_owned().await else { return };
        let action = next_action(&sh, &mut lock(&sh.st));
        match action {
            Action::Idle(until) => {
                drop(permit);
                match until {
                    Some(t) => {
                        tokio::select! {
                            _ = sh.wake.notified() => {}
                            _ = tokio::time::sleep_until(t) => {}
                        }
                    }
                    None => sh.wake.notified().await,
                }
            }
            Action::Register(id, model) => {
                drop(permit);
                tokio::spawn(register_task(sh.clone(), id, model));
            }
            Action::Send(id, hub, msgs) => {
                sh.msg_pacer.take(msgs.len()).await;
                tokio::spawn(send_task(sh.clone(), id, hub, msgs, permit));
            }
        }
    }
}

/// Logs a device's trouble: the first time for each device (for the first 50 devices), then
/// every thousandth time in all, so that a thousand failing devices do not flood the log.
fn device_log(sh: &Shared, dev: &mut Dev, total: &mut u64, level: tracing::Level, id: &str, msg: &str) {
    dev.logged += 1;
    *total += 1;
    let first = dev.logged == 1 && sh.logged_devices.fetch_add(1, Ordering::Relaxed) < 50;
    if !first && *total % 1000 != 0 {
        return;
    }
    let msg = crate::secret::redact(msg);
    if level == tracing::Level::ERROR {
        tracing::error!(component = %sh.name, device = %id, "{msg}");
    } else {
        tracing::warn!(component = %sh.name, device = %id, "{msg}");
    }
}

/// Stops sending for a device IoT Central refuses: its rows are dropped (and counted in errors)
/// for [`BLOCKED_FOR`], then its registration is tried again.
fn block_device(sh: &Shared, dev: &mut Dev, total: &mut u64, id: &str, why: &str) {
    dev.blocked_until = Some(Instant::now() + BLOCKED_FOR);
    let minutes = BLOCKED_FOR.as_secs() / 60;
    let msg = format!("{why}; its rows are dropped (counted in errors) for the next {minutes} minutes");
    device_log(sh, dev, total, tracing::Level::ERROR, id, &msg);
}

async fn register_task(sh: Arc<Shared>, id: Arc<str>, model: Option<String>) {
    let Ok(_slot) = sh.reg_slots.acquire().await else { return };
    // until one registration has worked, one at a time: a wrong key then fails once, clearly
    let gate = if sh.verified.load(Ordering::Relaxed) {
        None
    } else {
        let g = sh.first_registration.lock().await;
        // another registration may have succeeded while this one waited
        (!sh.verified.load(Ordering::Relaxed)).then_some(g)
    };
    let mut outcome;
    let mut tries = 0;
    loop {
        if lock(&sh.st).fatal.is_some() {
            return;
        }
        sh.reg_pacer.take(1).await;
        outcome = dps::register(&sh, &id, model.as_deref()).await;
        tries += 1;
        // one retry of a refusal before calling it a configuration error (clock skew, a race)
        if matches!(outcome, RegOutcome::Unauthorized(_)) && tries == 1 && !sh.verified.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        break;
    }
    let verified = sh.verified.load(Ordering::Relaxed);
    let mut st = lock(&sh.st);
    let st = &mut *st;
    let Some(dev) = st.devices.get_mut(&id) else { return };
    match outcome {
        RegOutcome::Assigned(hub) => {
            sh.verified.store(true, Ordering::Relaxed);
            tracing::debug!(device = %id, hub = %hub, "registered");
            dev.hub = Some(hub);
            dev.model = model;
            dev.backoff = Duration::ZERO;
            dev.not_before = None;
            dev.blocked_until = None;
            st.cache_dirty = true;
        }
        RegOutcome::Unauthorized(detail) if !verified => {
            st.fatal = Some(format!(
                "DPS refused the credentials of device {id:?} in ID scope {:?} ({detail}): the group key is not a key of \
                 this application's SAS-IoT-Devices enrollment group, or the ID scope is wrong (check id_scope and group_key)",
                sh.set.id_scope
            ));
            // reported once, by the runtime, as the reason the pipeline stops
        }
        RegOutcome::Unauthorized(detail) => {
            let why = format!("DPS refused device {id:?} in ID scope {:?} ({detail})", sh.set.id_scope);
            block_device(&sh, dev, &mut st.retries, &id, &why);
        }
        RegOutcome::Blocked(detail) | RegOutcome::DeviceError(detail) => {
            let why = format!("IoT Central does not accept device {id:?}: {detail}");
            block_device(&sh, dev, &mut st.retries, &id, &why);
        }
        RegOutcome::Retry(after, why) => {
            let wait = after.unwrap_or_else(|| next_backoff(&mut dev.backoff));
            dev.not_before = Some(Instant::now() + wait);
            device_log(
                &sh,
                dev,
                &mut st.retries,
                tracing::Level::WARN,
                &id,
                &format!("registration of {id:?} will be retried in {wait:?}: {why}"),
            );
        }
    }
    drop(gate);
    requeue(st, &id);
    sh.wake.notify_one();
    sh.progress.notify_one();
}

fn next_backoff(b: &mut Duration) -> Duration {
    *b = if b.is_zero() { Duration::from_millis(200) } else { (*b * 2).min(MAX_BACKOFF) };
    // a little jitter so that devices that failed together do not retry together
    let jitter = rand::random::<f64>() * 0.2 + 0.9;
    b.mul_f64(jitter)
}

async fn send_task(
    sh: Arc<Shared>,
    id: Arc<str>,
    hub: String,
    msgs: Vec<OutMsg>,
    _permit: tokio::sync::OwnedSemaphorePermit,
) {
    let outcome = match sh.set.transport {
        Transport::Mqtt => mqtt::send(&sh, &hub, &id, &msgs).await,
        Transport::Https => hub::send(&sh, &hub, &id, &msgs, false).await,
        Transport::HttpsBatch => hub::send(&sh, &hub, &id, &msgs, true).await,
    };
    let n = msgs.len();
    let bytes: usize = msgs.iter().map(|m| m.body.len()).sum();
    let mut st = lock(&sh.st);
    let st = &mut *st;
    st.in_flight -= 1;
    let Some(dev) = st.devices.get_mut(&id) else { return };
    let (sent, rest, problem) = match outcome {
        SendOutcome::Sent => (n, Vec::new(), None),
        SendOutcome::Partial(acked, problem) => {
            let mut rest = Vec::new();
            let mut sent = 0;
            for (m, ok) in msgs.into_iter().zip(acked.into_iter().chain(std::iter::repeat(false))) {
                if ok {
                    sent += 1;
                } else {
                    rest.push(m);
                }
            }
            (sent, rest, Some(*problem))
        }
        other => (0, msgs, Some(other)),
    };
    if sent > 0 && !sh.ready.swap(true, Ordering::Relaxed) {
        crate::metrics::set_ready(&sh.name, true, "sending");
    }
    if sent > 0 {
        st.pending -= sent;
        sh.metrics.events_out.inc_by(sent as u64);
        if rest.is_empty() {
            sh.metrics.bytes_out.inc_by(bytes as u64);
        }
        dev.backoff = Duration::ZERO;
        dev.auth_failures = 0;
    }
    match problem {
        None | Some(SendOutcome::Sent) | Some(SendOutcome::Partial(..)) => {}
        Some(SendOutcome::Retry(after, why)) => {
            st.retries += 1;
            if sh.ready.swap(false, Ordering::Relaxed) {
                crate::metrics::set_ready(&sh.name, false, &format!("retrying: {why}"));
            }
            let wait = after.unwrap_or_else(|| next_backoff(&mut dev.backoff));
            dev.not_before = Some(Instant::now() + wait);
            put_back(dev, rest);
            if st.retries <= 10 || st.retries % 1000 == 0 {
                tracing::warn!(component = %sh.name, device = %id, retries = st.retries, "retrying in {wait:?}: {why}");
            }
        }
        Some(SendOutcome::Reauth(why)) | Some(SendOutcome::NotFound(why)) => {
            // the hub does not know this device (any more), or its key: derive it again and register again
            dev.auth_failures += 1;
            dev.hub = None;
            st.cache_dirty = true;
            if dev.auth_failures > 2 {
                let wait = next_backoff(&mut dev.backoff);
                dev.not_before = Some(Instant::now() + wait);
                device_log(
                    &sh,
                    dev,
                    &mut st.retries,
                    tracing::Level::WARN,
                    &id,
                    &format!("{why}; registering again in {wait:?}"),
                );
            } else {
                tracing::info!(component = %sh.name, device = %id, "{why}; registering again");
            }
            put_back(dev, rest);
        }
        Some(SendOutcome::TooLarge(why)) if rest.len() > 1 => {
            dev.max_batch = (rest.len() / 2).max(1);
            put_back(dev, rest);
            tracing::info!(component = %sh.name, device = %id, "{why}: smaller batches for this device");
        }
        Some(SendOutcome::TooLarge(why)) | Some(SendOutcome::Bad(why)) => {
            let k = rest.len();
            st.pending -= k;
            st.dropped += k as u64;
            sh.metrics.errors.inc_by(k as u64);
            tracing::error!(component = %sh.name, device = %id, rows = k, "IoT Hub refused messages, which are dropped: {why}");
        }
    }
    requeue(st, &id);
    sh.wake.notify_one();
    sh.progress.notify_one();
}

fn put_back(dev: &mut Dev, rest: Vec<OutMsg>) {
    for m in rest.into_iter().rev() {
        dev.q.push_front(m);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_are_deterministic_and_distinct() {
        let a = message_id("d", None, Some("2026-11-01T00:00:00.000Z"), b"{}");
        assert_eq!(a, message_id("d", None, Some("2026-11-01T00:00:00.000Z"), b"{}"));
        assert_ne!(a, message_id("d", Some("c"), Some("2026-11-01T00:00:00.000Z"), b"{}"));
        assert_ne!(a, message_id("d", None, Some("2026-11-01T00:00:00.001Z"), b"{}"));
        assert_ne!(message_id("ab", None, None, b""), message_id("a", Some("b"), None, b""));
        assert_eq!(a.len(), 32);
    }

    fn msg(device: &str) -> OutMsg {
        OutMsg {
            device: device.into(),
            model: None,
            component: None,
            created: None,
            props: vec![],
            body: b"{}".to_vec(),
            id: message_id(device, None, None, b"{}"),
        }
    }

    /// Rows a flush kept (the hub unreachable) are not sent until that checkpoint commits, and a
    /// later flush sends again even if no row arrived in between (it used to wait for a paused
    /// sender forever when it had no deadline).
    #[tokio::test]
    async fn a_flush_pauses_sending_and_the_next_flush_resumes_it() {
        let cfg: CentralConfig = serde_json::from_value(serde_json::json!({
            "inputs": ["x"], "id_scope": "0ne00ABC", "group_key": "a2V5a2V5a2V5",
            "dps_endpoint": "http://127.0.0.1:9", "request_timeout": "1s"
        }))
        .unwrap();
        let cx = BuildCx::for_test("central_pause_test", "central", 1);
        let mut e = Engine::new(&cfg, &cx).await.unwrap();
        e.start();
        e.push(vec![msg("d1"), msg("d2")]).await.unwrap();
        let kept = e.drain(1, Some(Instant::now() + Duration::from_millis(200))).await.unwrap();
        assert_eq!(kept.len(), 2, "nothing could be sent");
        assert!(lock(&e.sh.st).paused, "paused until the checkpoint commits");
        e.resume(false);
        assert!(lock(&e.sh.st).paused, "not resumed by a tick before the commit");
        let sh = e.sh.clone();
        let second = tokio::spawn(async move {
            let deadline = Some(Instant::now() + Duration::from_millis(500));
            let r = e.drain(2, deadline).await;
            (e, r)
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!lock(&sh.st).paused, "the next flush sends again");
        let (mut e, r) = second.await.unwrap();
        assert_eq!(r.unwrap().len(), 2);
        e.committed(2);
        e.stop();
    }

    #[tokio::test]
    async fn the_pacer_keeps_the_rate() {
        let p = Pacer::new(1000.0, Duration::from_secs(1));
        let t0 = Instant::now();
        for _ in 0..30 {
            p.take(100).await; // 3,000 at 1,000/s: 1 s of burst, then 2 s
        }
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(1800) && took < Duration::from_millis(2600), "{took:?}");
    }

    #[tokio::test]
    async fn without_a_burst_the_pacer_spaces_every_event() {
        // registrations: 10 at 20/s take 0.45 s (the first goes at once), never faster
        let p = Pacer::new(20.0, Duration::ZERO);
        tokio::time::sleep(Duration::from_millis(300)).await; // an idle pause earns nothing
        let t0 = Instant::now();
        for _ in 0..10 {
            p.take(1).await;
        }
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(440) && took < Duration::from_millis(900), "{took:?}");
    }
}
