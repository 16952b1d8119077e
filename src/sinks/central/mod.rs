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

mod dps;
mod engine;
mod hub;
mod mqtt;
pub mod sas;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::{Checker, Needs, Spec};
use crate::event::{Batch, Event, Kind, ValRef};
use crate::path::FieldPath;
use crate::runtime::{BuildCx, EndReason, Mode, Sink};
use crate::secret::Secret;

pub use engine::{message_id, OutMsg};

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
    pub device_id: String,
    /// Model (device template) id sent at registration (`iotcModelId`); a template too.
    #[serde(default)]
    pub model_id: Option<String>,
    /// Component to send the telemetry to (a template); needs `transport: mqtt`.
    #[serde(default)]
    pub component: Option<String>,
    /// The field giving each message's creation time (`iothub-creation-time-utc`). Default:
    /// `window_end` when the row has it, else `enqueuedTime`.
    #[serde(default)]
    pub creation_time: Option<String>,
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
    pub properties: IndexMap<String, String>,
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
    pub flush_timeout: String,
    /// Timeout of one HTTP request or MQTT exchange.
    #[serde(default = "d_timeout")]
    pub request_timeout: String,
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
fn d_device() -> String {
    "{deviceId}".into()
}
fn d_props() -> IndexMap<String, String> {
    IndexMap::from([("computed".to_string(), "true".to_string())])
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
fn d_flush() -> String {
    "10s".into()
}
fn d_timeout() -> String {
    "30s".into()
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
    List(Vec<String>),
    Map(IndexMap<String, String>),
}

impl Measurements {
    fn pairs(&self) -> Vec<(String, String)> {
        match self {
            Measurements::List(l) => l.iter().map(|f| (leaf(f), f.clone())).collect(),
            Measurements::Map(m) => m.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        }
    }
}

fn leaf(f: &str) -> String {
    f.trim().rsplit('.').next().unwrap_or(f).to_string()
}

/// Characters IoT Hub allows in property names and values over HTTPS (besides ASCII letters and digits).
const PROPERTY_CHARS: &str = "!#$%&'*+-.^_`|~";

fn valid_property_name(n: &str) -> bool {
    !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || PROPERTY_CHARS.contains(c))
}

/// Makes a property value acceptable to IoT Hub's HTTPS API: other characters are percent-encoded.
fn property_value(v: &str) -> String {
    if v.chars().all(|c| c.is_ascii_alphanumeric() || PROPERTY_CHARS.contains(c) || c == ':') {
        return v.to_string();
    }
    let mut out = String::with_capacity(v.len() + 8);
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || (PROPERTY_CHARS.as_bytes().contains(&b) && b != b'%') || b == b':' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Whether a URL's host is a loopback address (`127.0.0.0/8`, `::1`, `localhost`).
pub fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

/// Checks a DPS endpoint: https, or http on a loopback address.
pub fn check_endpoint(s: &str) -> Result<url::Url, String> {
    let u = url::Url::parse(s).map_err(|e| format!("{s:?} is not a URL ({e})"))?;
    match u.scheme() {
        "https" => {}
        "http" if is_loopback(&u) => {}
        "http" => {
            return Err(format!(
                "{s:?}: plain http:// is only allowed for loopback addresses (local emulators); use https://"
            ))
        }
        other => return Err(format!("{s:?}: the scheme must be https (not {other})")),
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err(format!("{s:?} has no host"));
    }
    if u.path() != "/" && !u.path().is_empty() {
        return Err(format!("{s:?}: give the endpoint without a path"));
    }
    Ok(u)
}

/// DPS registration ids (and so device ids here): letters, digits and `- . _ :`, at most 128.
pub fn valid_device_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.chars().all(|c| c.is_ascii_alphanumeric() || "-._:".contains(c))
}

// ---------------------------------------------------------------- templates

#[derive(Debug, Clone)]
enum Part {
    Lit(String),
    Field(FieldPath),
}

/// `text{field.path}text`: literal text and fields of the row.
#[derive(Debug, Clone)]
pub struct Template {
    parts: Vec<Part>,
}

impl Template {
    pub fn parse(t: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut chars = t.chars();
        while let Some(c) = chars.next() {
            match c {
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => return Err(format!("{t:?}: unclosed `{{`")),
                        }
                    }
                    if !lit.is_empty() {
                        parts.push(Part::Lit(std::mem::take(&mut lit)));
                    }
                    parts.push(Part::Field(FieldPath::parse(&name)?));
                }
                '}' => return Err(format!("{t:?}: `}}` without `{{`")),
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        if parts.is_empty() {
            return Err("is empty".into());
        }
        Ok(Template { parts })
    }

    /// The text for a row; `None` when a field is missing or null.
    pub fn render(&self, ev: &Event) -> Option<String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(l) => out.push_str(l),
                Part::Field(f) => match f.get(ev)? {
                    ValRef::Null => return None,
                    v => out.push_str(&crate::path::key_string(&v)),
                },
            }
        }
        Some(out)
    }

    fn fields(&self) -> impl Iterator<Item = &FieldPath> {
        self.parts.iter().filter_map(|p| match p {
            Part::Field(f) => Some(f),
            Part::Lit(_) => None,
        })
    }

    fn is_static(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Lit(_)))
    }
}

impl Spec for CentralConfig {
    fn check(&self, ptr: &str, cx: &mut Checker<'_>) {
        let p = |f: &str| format!("{ptr}/{f}");
        let scope = self.id_scope.trim();
        if scope.is_empty() || scope.contains(['/', ' ', '?', '#']) {
            cx.error(&p("id_scope"), "must be the application's ID scope (like 0ne00ABC123)");
        }
        cx.secret(&p("group_key"), !self.group_key.is_empty());
        if self.group_key.is_empty() {
            cx.error(&p("group_key"), "is empty");
        } else if let Err(e) = sas::GroupKey::parse(self.group_key.expose()) {
            cx.error(&p("group_key"), e);
        }
        if let Err(e) = check_endpoint(&self.dps_endpoint) {
            cx.error(&p("dps_endpoint"), e);
        }
        if self.ca_file.as_deref().is_some_and(|f| f.trim().is_empty()) {
            cx.error(&p("ca_file"), "is empty");
        }
        match Template::parse(&self.device_id) {
            Ok(t) => {
                if t.is_static() && !valid_device_id(&self.device_id) {
                    cx.error(&p("device_id"), "a device id has letters, digits and `- . _ :` only (at most 128)");
                }
            }
            Err(e) => cx.error(&p("device_id"), e),
        }
        if let Some(m) = &self.model_id {
            if let Err(e) = Template::parse(m) {
                cx.error(&p("model_id"), e);
            }
        }
        if let Some(c) = &self.component {
            if let Err(e) = Template::parse(c) {
                cx.error(&p("component"), e);
            }
            if self.transport != Transport::Mqtt {
                cx.error(
                    &p("component"),
                    "component telemetry needs `transport: mqtt` (IoT Hub's HTTPS API cannot name a component)",
                );
            }
        }
        if let Some(t) = &self.creation_time {
            if let Err(e) = FieldPath::parse(t) {
                cx.error(&p("creation_time"), e);
            }
        }
        if let Some(m) = &self.measurements {
            let pairs = m.pairs();
            if pairs.is_empty() {
                cx.error(&p("measurements"), "is empty");
            }
            for (i, (name, field)) in pairs.iter().enumerate() {
                let ptr = match m {
                    Measurements::List(_) => format!("{ptr}/measurements/{i}"),
                    Measurements::Map(_) => {
                        format!("{ptr}/measurements/{}", crate::config::yaml::pointer_escape(name))
                    }
                };
                if name.is_empty() {
                    cx.error(&ptr, "a telemetry name is empty");
                }
                if let Err(e) = FieldPath::parse(field) {
                    cx.error(&ptr, e);
                }
            }
        }
        for (k, v) in &self.properties {
            let ptr = format!("{ptr}/properties/{}", crate::config::yaml::pointer_escape(k));
            if !valid_property_name(k) || k.to_ascii_lowercase().starts_with("iothub-") || k.starts_with('$') {
                cx.error(
                    &ptr,
                    format!(
                        "`{k}` cannot be a property name: letters, digits and {PROPERTY_CHARS} only, not starting with iothub- or $"
                    ),
                );
            }
            if let Err(e) = Template::parse(v) {
                cx.error(&ptr, e);
            }
        }
        if self.batch_size == 0 || self.batch_size > 500 {
            cx.error(&p("batch_size"), "must be between 1 and 500");
        }
        if !(self.rate_limit.is_finite() && self.rate_limit > 0.0) {
            cx.error(&p("rate_limit"), "must be a positive number of messages per second");
        }
        if !(self.registrations_per_minute.is_finite() && self.registrations_per_minute > 0.0) {
            cx.error(&p("registrations_per_minute"), "must be a positive number");
        }
        if self.concurrency == 0 {
            cx.error(&p("concurrency"), "must be at least 1");
        }
        if self.queue == 0 {
            cx.error(&p("queue"), "must be at least 1");
        }
        cx.positive_duration(&p("flush_timeout"), &self.flush_timeout);
        cx.positive_duration(&p("request_timeout"), &self.request_timeout);
        if self.device_cache.as_deref().is_some_and(|f| f.trim().is_empty()) {
            cx.error(&p("device_cache"), "is empty");
        }
    }
    fn inputs(&self) -> &[String] {
        &self.inputs
    }
    fn needs(&self) -> Needs {
        let Some(m) = &self.measurements else { return Needs::All };
        let mut fields = Vec::new();
        for t in [Some(&self.device_id), self.model_id.as_ref(), self.component.as_ref()].into_iter().flatten() {
            if let Ok(t) = Template::parse(t) {
                fields.extend(t.fields().cloned());
            }
        }
        for v in self.properties.values() {
            if let Ok(t) = Template::parse(v) {
                fields.extend(t.fields().cloned());
            }
        }
        let times: Vec<String> = match &self.creation_time {
            Some(t) => vec![t.clone()],
            None => vec!["window_end".into(), "enqueuedTime".into()],
        };
        for f in times.iter().chain(m.pairs().iter().map(|(_, f)| f)) {
            if let Ok(p) = FieldPath::parse(f) {
                fields.push(p);
            }
        }
        Needs::Fields(fields)
    }
}

// ---------------------------------------------------------------- rows to messages

/// Turns rows into messages.
pub(crate) struct Shaper {
    device: Template,
    model: Option<Template>,
    component: Option<Template>,
    creation: Vec<FieldPath>,
    measurements: Option<Vec<(String, FieldPath)>>,
    props: Vec<(String, Template)>,
    /// Top-level fields never sent as measurements by default.
    excluded: Vec<String>,
}

impl Shaper {
    pub(crate) fn new(cfg: &CentralConfig) -> anyhow::Result<Shaper> {
        let t = |s: &str| Template::parse(s).map_err(anyhow::Error::msg);
        let device = t(&cfg.device_id)?;
        let creation = match &cfg.creation_time {
            Some(c) => vec![FieldPath::parse(c).map_err(anyhow::Error::msg)?],
            None => vec![FieldPath::parse("window_end").unwrap(), FieldPath::parse("enqueuedTime").unwrap()],
        };
        let mut excluded: Vec<String> = vec!["window_start".into(), "window_end".into()];
        excluded.extend(device.fields().map(|f| f.parts()[0].clone()));
        if let Some(c) = &cfg.creation_time {
            excluded.push(c.split('.').next().unwrap_or(c).to_string());
        }
        let measurements = match &cfg.measurements {
            Some(m) => Some(
                m.pairs()
                    .into_iter()
                    .map(|(n, f)| Ok((n, FieldPath::parse(&f).map_err(anyhow::Error::msg)?)))
                    .collect::<anyhow::Result<Vec<_>>>()?,
            ),
            None => None,
        };
        Ok(Shaper {
            model: cfg.model_id.as_deref().map(t).transpose()?,
            component: cfg.component.as_deref().map(t).transpose()?,
            props: cfg.properties.iter().map(|(k, v)| Ok((k.clone(), t(v)?))).collect::<anyhow::Result<_>>()?,
            device,
            creation,
            measurements,
            excluded,
        })
    }

    /// The message for a row, or why there is none.
    pub(crate) fn shape(&self, ev: &Event) -> Result<OutMsg, String> {
        let device = self.device.render(ev).ok_or("the row has no value for the device id")?;
        if !valid_device_id(&device) {
            return Err(format!("device id {device:?} is not valid (letters, digits and `- . _ :` only, at most 128)"));
        }
        let mut body = String::with_capacity(128);
        body.push('{');
        let mut n = 0;
        let mut field = |name: &str, v: ValRef<'_>, body: &mut String| {
            if v.is_null() {
                return;
            }
            if n > 0 {
                body.push(',');
            }
            crate::event::write_json_str(body, name);
            body.push(':');
            v.write_json(body);
            n += 1;
        };
        match &self.measurements {
            Some(m) => {
                for (name, path) in m {
                    if let Some(v) = path.get(ev) {
                        field(name, v, &mut body);
                    }
                }
            }
            None => match (ev.kind, ev.telemetry()) {
                (_, Some(t)) => {
                    for (k, v) in t.iter() {
                        field(k, v, &mut body);
                    }
                }
                (Kind::Export(_), None) => return Err("the export message has no telemetry".into()),
                _ => {
                    for (k, v) in ev.root().iter() {
                        if !self.excluded.iter().any(|x| x == k) {
                            field(k, v, &mut body);
                        }
                    }
                }
            },
        }
        body.push('}');
        if n == 0 {
            return Err("the row has none of the measurements".into());
        }
        let created =
            self.creation.iter().find_map(|p| p.get(ev).and_then(|v| v.as_time())).map(crate::time::format_rfc3339);
        let model = self.model.as_ref().and_then(|m| m.render(ev));
        let component = match &self.component {
            Some(c) => Some(c.render(ev).ok_or("the row has no value for the component")?),
            None => None,
        };
        let mut props = Vec::with_capacity(self.props.len());
        for (k, t) in &self.props {
            if let Some(v) = t.render(ev) {
                props.push((k.clone(), property_value(&v)));
            }
        }
        let size = body.len() + props.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>() + 200;
        if size > crate::model::MAX_RECORD_BYTES {
            return Err(format!("the message would be {size} bytes, over IoT Hub's limit of 256 KiB"));
        }
        let id = message_id(&device, component.as_deref(), created.as_deref(), body.as_bytes());
        Ok(OutMsg { device, model, component, created, props, body: body.into_bytes(), id })
    }
}

// ---------------------------------------------------------------- the sink

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
        let flush_timeout = crate::time::parse_duration(&cfg.flush_timeout).map_err(anyhow::Error::msg)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn cfg(extra: serde_json::Value) -> CentralConfig {
        let mut v = serde_json::json!({"inputs": ["x"], "id_scope": "0ne00ABC", "group_key": "a2V5a2V5a2V5"});
        for (k, val) in extra.as_object().unwrap() {
            v[k] = val.clone();
        }
        serde_json::from_value(v).unwrap()
    }

    fn export(json: &str) -> Event {
        crate::model::decode::decode_one(Bytes::from(json.to_string())).unwrap()
    }

    fn validate(sink: &str) -> Vec<String> {
        let text = format!("sources:\n  s:\n    type: simulator\n    count: 1\nsinks:\n  c:\n    type: central\n    inputs: [s]\n{sink}");
        let env = |k: &str| match k {
            "KEY" => Some("a2V5a2V5a2V5".to_string()),
            "TOKEN" => Some("a-long-enough-token".to_string()),
            _ => None,
        };
        match crate::config::load_str(&text, "t", &env) {
            Ok(_) => Vec::new(),
            Err(e) => e.iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn validation_is_offline_and_says_what_is_wrong() {
        let ok = "    id_scope: 0ne00ABC\n    group_key: ${KEY}\n";
        assert!(validate(ok).is_empty(), "{:?}", validate(ok));
        let e = validate("    id_scope: 0ne00ABC\n    group_key: a2V5a2V5a2V5\n");
        assert!(e[0].contains("group_key") && e[0].contains("must come from the environment"), "{e:?}");
        assert!(!e.iter().any(|x| x.contains("a2V5a2V5a2V5")), "the literal key is not echoed: {e:?}");
        let e = validate(&format!("{ok}    dps_endpoint: http://dps.example.com\n"));
        assert!(e[0].contains("only allowed for loopback addresses"), "{e:?}");
        let e = validate(&format!("{ok}    component: thermostat1\n"));
        assert!(e[0].contains("needs `transport: mqtt`"), "{e:?}");
        let e =
            validate(&format!("{ok}    device_id: \"bad id\"\n    properties: {{iothub-x: y}}\n    batch_size: 0\n"));
        assert_eq!(e.len(), 3, "{e:?}");
        let e = validate(&format!("{ok}    measurements: {{t: \"a..b\"}}\n    rate_limit: 0\n"));
        assert_eq!(e.len(), 2, "{e:?}");
    }

    #[test]
    fn endpoints_must_be_https_or_loopback_http() {
        assert!(check_endpoint("https://global.azure-devices-provisioning.net").is_ok());
        assert!(check_endpoint("http://127.0.0.1:8080").is_ok());
        assert!(check_endpoint("http://[::1]:8080").is_ok());
        assert!(check_endpoint("http://localhost:1").is_ok());
        let e = check_endpoint("http://dps.example.com").unwrap_err();
        assert!(e.contains("only allowed for loopback"), "{e}");
        assert!(check_endpoint("ftp://x").is_err());
        assert!(check_endpoint("https://x/path").is_err());
    }

    #[test]
    fn export_telemetry_becomes_a_message_of_the_same_device() {
        let s = Shaper::new(&cfg(serde_json::json!({"creation_time": "enqueuedTime"}))).unwrap();
        let ev = export(
            r#"{"messageSource":"telemetry","deviceId":"dev-1","enqueuedTime":"2026-11-01T00:00:00.5Z","telemetry":{"temp":70.5,"humidity":40}}"#,
        );
        let m = s.shape(&ev).unwrap();
        assert_eq!(m.device, "dev-1");
        assert_eq!(std::str::from_utf8(&m.body).unwrap(), r#"{"temp":70.5,"humidity":40}"#);
        assert_eq!(m.created.as_deref(), Some("2026-11-01T00:00:00.500Z"));
        assert_eq!(m.props, vec![("computed".to_string(), "true".to_string())]);
        assert_eq!(m.id.len(), 32);
        // deterministic
        assert_eq!(s.shape(&ev).unwrap().id, m.id);
    }

    #[test]
    fn window_rows_send_their_aggregates() {
        let s = Shaper::new(&cfg(serde_json::json!({}))).unwrap();
        let mut ev = Event::row();
        ev.push("deviceId", "d7".into());
        ev.push("window_start", crate::event::Value::Time(0));
        ev.push("window_end", crate::event::Value::Time(300_000_000_000));
        ev.push("count", crate::event::Value::Int(12));
        ev.push("temperature_avg", crate::event::Value::Float(21.25));
        let m = s.shape(&ev).unwrap();
        assert_eq!(std::str::from_utf8(&m.body).unwrap(), r#"{"count":12,"temperature_avg":21.25}"#);
        assert_eq!(m.created.as_deref(), Some("1970-01-01T00:05:00.000Z"));
        let s = Shaper::new(&cfg(
            serde_json::json!({"measurements": {"avgT": "temperature_avg"}, "device_id": "{deviceId}-agg"}),
        ))
        .unwrap();
        let m = s.shape(&ev).unwrap();
        assert_eq!(m.device, "d7-agg");
        assert_eq!(std::str::from_utf8(&m.body).unwrap(), r#"{"avgT":21.25}"#);
        let mut bad = Event::row();
        bad.push("deviceId", "has space".into());
        bad.push("x", crate::event::Value::Int(1));
        assert!(s.shape(&bad).unwrap_err().contains("not valid"));
    }

    #[test]
    fn templates_and_property_values() {
        assert!(Template::parse("{a").is_err());
        assert!(Template::parse("a}").is_err());
        let t = Template::parse("site-{enrichments.site}").unwrap();
        let ev = export(
            r#"{"messageSource":"telemetry","deviceId":"d","enqueuedTime":"2026-11-01T00:00:00Z","telemetry":{},"enrichments":{"site":"p1"}}"#,
        );
        assert_eq!(t.render(&ev).as_deref(), Some("site-p1"));
        assert_eq!(property_value("true"), "true");
        assert_eq!(property_value("a b/é"), "a%20b%2F%C3%A9");
    }
}
