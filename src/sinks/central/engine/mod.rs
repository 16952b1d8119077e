//! The sending machinery of the `central` sink: a bounded queue of messages per device, a
//! dispatcher that starts registrations and requests (at most one request in flight per
//! device, `concurrency` in all, paced to `rate_limit` messages per second), the device
//! registration cache, and the bookkeeping that lets `flush` return exactly what is unsent.
//!
//! This file holds the shared state and the interface the sink calls; `dispatch.rs` chooses
//! what goes next, `tasks.rs` runs one registration or send, `cache.rs` keeps registrations
//! across restarts and `pacer.rs` paces messages and registrations.

mod cache;
mod dispatch;
mod pacer;
mod tasks;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;

use super::sas::GroupKey;
use super::{mqtt, CentralConfig, Transport};
use crate::metrics::ComponentMetrics;
use crate::runtime::BuildCx;
use cache::CacheStore;
use dispatch::{dispatcher, enqueue};
use pacer::Pacer;

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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
        let request_timeout = cfg.request_timeout.get()?;
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
}
