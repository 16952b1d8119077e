//! `central`: posts rows back into an IoT Central application as device telemetry ("compute
//! after export"), as the devices themselves would: DPS registration with keys derived from the
//! enrollment group key, then IoT Hub's device-to-cloud API.
//!
//! - Identity: each row is sent as the device named by `device_id` (a template over the row,
//!   `{deviceId}` by default), registered once with DPS (optionally with `model_id`), its
//!   assigned hub cached in memory and persisted (an object beside the checkpoints, or
//!   `device_cache`), so a restart does not register again. Registrations are paced
//!   (`registrations_per_minute`, DPS allows 200) and, until one has succeeded, run one at a time,
//!   so a wrong key gives one clear error instead of a storm of refusals.
//! - Transport: `https_batch` (IoT Hub's batch format, up to `batch_size` messages and 256 KB per
//!   request), `https` (one message per request) or `mqtt` (TLS to the hub; needed for component
//!   telemetry, `$.sub`, which the HTTPS API cannot express).
//! - Each message carries `iothub-creation-time-utc` (from `creation_time`), content type and
//!   encoding, the `properties` (`computed=true` by default, for an export filter that excludes
//!   computed data) and a deterministic `iothub-messageid` (hash of device, component, creation
//!   time and body), so duplicates are identifiable downstream.
//! - Delivery: rows wait in a bounded queue (`write` waits when it is full: backpressure) and are
//!   sent with bounded concurrency under a message rate limit; a row counts as sent only on a 2xx
//!   (or an MQTT PUBACK). `flush(epoch)` waits (up to `flush_timeout` in `run`; until everything is
//!   sent in `replay`) and returns the rows still unsent as the sink's state, which a restart sends
//!   again: nothing is lost. A graceful stop sends each row exactly once; a crash between a send
//!   and the next checkpoint can send rows again (exactly-once to an HTTP endpoint needs the
//!   receiver to deduplicate, here by message id).
//! - Errors: 429/503 (and other 5xx, timeouts) are retried with backoff honouring `Retry-After`;
//!   401 from a hub re-derives the key and registers again; 404 (device not found) registers again;
//!   DPS 401 before any registration succeeded stops the pipeline with one message naming the ID
//!   scope and the device; DPS error 400209 (device unassociated or blocked) drops that device's
//!   rows with a logged, counted error while the others go on.
//!
//! Files: this one holds the configuration and the sink; `validate.rs` checks the
//! configuration, `shape.rs` turns rows into messages, `engine/` queues and sends them (with
//! `dps.rs`, `hub.rs` and `mqtt.rs` for the protocols and `sas.rs` for keys and tokens).

mod dps;
mod engine;
mod hub;
mod mqtt;
pub(crate) use mqtt::tls_config;
pub mod sas;
mod shape;
mod validate;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::values::{self, Dur, Parsed};
use crate::event::Batch;
use crate::runtime::{BuildCx, EndReason, Mode, Sink};
use crate::secret::Secret;
use shape::Shaper;

pub use engine::{message_id, OutMsg};
pub use shape::Template;
pub use validate::{check_endpoint, is_loopback, valid_device_id};

/// Posts rows to IoT Central as device telemetry.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CentralConfig {
    pub inputs: Vec<String>,
    /// The application's ID scope (Permissions → Device connection groups).
    pub id_scope: String,
    /// The SAS-IoT-Devices enrollment group's primary or secondary key (a secret: `${VAR}`).
    pub group_key: Secret,
    /// DPS global endpoint. Sovereign clouds use others; `http://` only for loopback addresses
    /// (local emulators), and the hub is then reached over http too.
    #[serde(default = "d_dps")]
    pub dps_endpoint: String,
    /// An extra CA certificate (PEM file) to trust, besides the usual roots.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// Which device each row is sent as: a template over the row, `{field.path}` placeholders
    /// and literal text (`{deviceId}`, `{deviceId}-computed`, `site-{enrichments.site}`).
    #[serde(default = "d_device")]
    pub device_id: Parsed<Template>,
    /// Model (device template) id sent at registration (`iotcModelId`); a template too.
    #[serde(default)]
    pub model_id: Option<Parsed<Template>>,
    /// Component to send the telemetry to (a template); needs `transport: mqtt`.
    #[serde(default)]
    pub component: Option<Parsed<Template>>,
    /// The field giving each message's creation time (`iothub-creation-time-utc`). Default:
    /// `window_end` when the row has it, else `enqueuedTime`.
    #[serde(default)]
    pub creation_time: Option<values::Path>,
    /// Which fields become which telemetry names: a list of fields (the telemetry name is the
    /// last segment: `temperature_avg`, `telemetry.temp` → `temp`) or a map `name: field`.
    /// Default: the row's `telemetry` object, or else every top-level field but the device id,
    /// the creation time and `window_start`/`window_end`.
    #[serde(default)]
    pub measurements: Option<Measurements>,
    /// Application properties of every message (values are templates). The default marks
    /// computed data so that an export filter (`computed` does not exist) keeps it out of the
    /// export that feeds this pipeline.
    #[serde(default = "d_props")]
    pub properties: IndexMap<String, Parsed<Template>>,
    /// `https_batch` (default), `https` (one message per request) or `mqtt` (components).
    #[serde(default)]
    pub transport: Transport,
    /// Messages per HTTPS batch request (the request also stays under 256 KB).
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    /// Messages per second, all devices together (IoT Central allows 200 per application).
    #[serde(default = "d_rate")]
    pub rate_limit: f64,
    /// DPS registrations per minute (DPS allows 200).
    #[serde(default = "d_regs")]
    pub registrations_per_minute: f64,
    /// Requests in flight at once (each to a different device).
    #[serde(default = "d_concurrency")]
    pub concurrency: usize,
    /// Rows held for sending; `write` waits when this many are unsent (backpressure).
    #[serde(default = "d_queue")]
    pub queue: usize,
    /// In `run`, how long a checkpoint waits for unsent rows before it stores them in its state.
    #[serde(default = "d_flush")]
    pub flush_timeout: Dur,
    /// Timeout of one HTTP request or MQTT exchange.
    #[serde(default = "d_timeout")]
    pub request_timeout: Dur,
    /// A local file for the device registration cache. Default: an object beside the
    /// checkpoints (in memory only when the pipeline has no checkpoint store).
    #[serde(default)]
    pub device_cache: Option<String>,
    /// The hub's MQTT port (TLS; plain TCP only with an `http://` loopback DPS endpoint).
    #[serde(default = "d_mqtt_port")]
    pub mqtt_port: u16,
}

fn d_dps() -> String {
    "https://global.azure-devices-provisioning.net".into()
}
fn d_device() -> Parsed<Template> {
    Parsed::new("{deviceId}")
}
fn d_props() -> IndexMap<String, Parsed<Template>> {
    IndexMap::from([("computed".to_string(), Parsed::new("true"))])
}
fn d_batch() -> usize {
    100
}
fn d_rate() -> f64 {
    200.0
}
fn d_regs() -> f64 {
    200.0
}
fn d_concurrency() -> usize {
    16
}
fn d_queue() -> usize {
    10_000
}
fn d_flush() -> Dur {
    Dur::new("10s")
}
fn d_timeout() -> Dur {
    Dur::new("30s")
}
fn d_mqtt_port() -> u16 {
    8883
}

/// How messages travel to the hub.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// HTTPS, many messages of a device per request (`application/vnd.microsoft.iothub.json`).
    #[default]
    HttpsBatch,
    /// HTTPS, one message per request.
    Https,
    /// MQTT over TLS, one connection per device while it has messages; supports components.
    Mqtt,
}

/// `measurements:` as a list of fields or a map of telemetry name to field.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum Measurements {
    List(Vec<values::Path>),
    Map(IndexMap<String, values::Path>),
}

impl Measurements {
    fn pairs(&self) -> Vec<(String, &values::Path)> {
        match self {
            Measurements::List(l) => l.iter().map(|f| (leaf(f.text()), f)).collect(),
            Measurements::Map(m) => m.iter().map(|(k, v)| (k.clone(), v)).collect(),
        }
    }
}

fn leaf(f: &str) -> String {
    f.trim().rsplit('.').next().unwrap_or(f).to_string()
}
/// State kept in a checkpoint: the rows not yet sent.
#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    unsent: Vec<OutMsg>,
}

pub struct CentralSink {
    engine: engine::Engine,
    shaper: Shaper,
    mode: Mode,
    flush_timeout: Duration,
    name: String,
    dropped: u64,
    /// The input was read to its end: the final flush waits until everything is sent.
    exhausted: bool,
}

impl CentralSink {
    pub async fn new(cfg: CentralConfig, cx: &BuildCx<'_>) -> anyhow::Result<CentralSink> {
        let shaper = Shaper::new(&cfg)?;
        let flush_timeout = cfg.flush_timeout.get()?;
        let engine = engine::Engine::new(&cfg, cx).await.context("setting up the central sink")?;
        Ok(CentralSink {
            engine,
            shaper,
            mode: cx.mode,
            flush_timeout,
            name: cx.name.to_string(),
            dropped: 0,
            exhausted: false,
        })
    }
}

#[async_trait]
impl Sink for CentralSink {
    async fn start(&mut self, restored: Option<&[u8]>) -> anyhow::Result<()> {
        if let Some(bytes) = restored.filter(|b| !b.is_empty()) {
            let st: State =
                postcard::from_bytes(bytes).context("the central sink's state in the checkpoint is corrupt")?;
            if !st.unsent.is_empty() {
                tracing::info!(rows = st.unsent.len(), "sending the rows the last checkpoint left unsent");
            }
            self.engine.restore(st.unsent);
        }
        self.engine.start();
        Ok(())
    }

    async fn write(&mut self, batch: Arc<Batch>) -> anyhow::Result<()> {
        self.engine.resume(true);
        let mut msgs = Vec::with_capacity(batch.len());
        for ev in &batch.events {
            match self.shaper.shape(ev) {
                Ok(m) => msgs.push(m),
                Err(reason) => {
                    self.dropped += 1;
                    self.engine.metrics().errors.inc();
                    if self.dropped <= 10 || self.dropped % 1000 == 0 {
                        tracing::warn!(
                            component = %self.name,
                            dropped = self.dropped,
                            "row not sent: {reason}: {}",
                            crate::secret::redact(&truncate(&ev.to_json(), 300))
                        );
                    }
                }
            }
        }
        self.engine.push(msgs).await
    }

    async fn flush(&mut self, epoch: u64) -> anyhow::Result<Vec<u8>> {
        let deadline = match (self.mode, self.exhausted) {
            (Mode::Replay, _) | (_, true) => None,
            (Mode::Live, false) => Some(tokio::time::Instant::now() + self.flush_timeout),
        };
        let unsent = self.engine.drain(epoch, deadline).await?;
        if !unsent.is_empty() {
            tracing::info!(rows = unsent.len(), "rows not sent yet are kept in the checkpoint");
        }
        Ok(postcard::to_allocvec(&State { unsent })?)
    }

    async fn on_end(&mut self, reason: EndReason) -> anyhow::Result<()> {
        self.exhausted = reason == EndReason::Exhausted;
        Ok(())
    }

    async fn commit(&mut self, epoch: u64) -> anyhow::Result<()> {
        self.engine.committed(epoch);
        Ok(())
    }

    async fn on_tick(&mut self) -> anyhow::Result<()> {
        self.engine.check()?;
        self.engine.resume(false);
        self.engine.persist_cache(false).await;
        Ok(())
    }

    async fn close(&mut self) -> anyhow::Result<()> {
        self.engine.persist_cache(true).await;
        self.engine.stop();
        Ok(())
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.len() <= n {
        return s.to_string();
    }
    let mut end = n;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
