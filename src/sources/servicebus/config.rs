//! The `servicebus` source's YAML configuration ([`ServiceBusConfig`]: the namespace and its
//! credential, the queue or topic subscription, prefetch, batching and lock renewal) and its
//! checks.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::values::{Dur, Path};
use crate::config::{Checker, Spec};
use crate::model::format::MessageFormat;
use crate::secret::Secret;
pub use crate::sources::eventhubs::Credential;

/// A Service Bus queue, or a topic subscription, read in peek-lock mode.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceBusConfig {
    /// A SAS connection string (`Endpoint=sb://NS.servicebus.windows.net/;SharedAccessKeyName=..;
    /// SharedAccessKey=..[;EntityPath=QUEUE]`): a secret, from the environment. With
    /// `;UseDevelopmentEmulator=true` it means plain AMQP to the host and port it names (an
    /// emulator). Or use `credential`.
    #[serde(default)]
    pub connection_string: Option<Secret>,
    /// Fully qualified namespace (`NS.servicebus.windows.net`). Required with `credential`; taken
    /// from the connection string otherwise.
    #[serde(default)]
    pub namespace: Option<String>,
    /// A Microsoft Entra ID credential instead of a connection string (the identity needs the
    /// Azure Service Bus Data Receiver role).
    #[serde(default)]
    pub credential: Option<Credential>,
    /// The queue (IoT Central's `servicebusqueue@v1` destination). Empty counts as unset, so that
    /// one pipeline file can take a queue or a topic from the environment.
    #[serde(default)]
    pub queue: Option<String>,
    /// The topic (`servicebustopic@v1`), read through `subscription`.
    #[serde(default)]
    pub topic: Option<String>,
    /// The topic's subscription.
    #[serde(default)]
    pub subscription: Option<String>,
    /// What the messages are: `export` (IoT Central's export messages, the default), `json`
    /// (objects of any shape, e.g. a transformed export) or `auto`.
    #[serde(default)]
    pub format: MessageFormat,
    /// `json`/`auto`: the field holding a record's time (RFC 3339 or epoch milliseconds); else
    /// the message's enqueued time.
    #[serde(default)]
    pub time: Option<Box<Path>>,
    /// `json`/`auto`: the field holding a record's device id; else the `iotcentral-device-id`
    /// application property.
    #[serde(default)]
    pub device_id: Option<Box<Path>>,
    /// Link credit: messages the namespace may send ahead of processing. Topped up as messages
    /// arrive, as long as fewer than `max_held` are held.
    #[serde(default = "d_prefetch")]
    pub prefetch: u32,
    /// Messages held locked at most: received and not yet completed (each waits for the
    /// checkpoint that covers it). Default: 10 x `prefetch`.
    #[serde(default)]
    pub max_held: Option<u32>,
    /// Events per batch sent downstream.
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    /// How long a partial batch may wait for more messages.
    #[serde(default = "d_linger")]
    pub linger: Dur,
    /// Ask for a checkpoint when held messages reach this share of `max_held` (the source stops
    /// granting credit at `max_held`).
    #[serde(default = "d_checkpoint_at")]
    pub checkpoint_at: f64,
    /// Ask for a checkpoint when the entity has been quiet this long after a burst (at least
    /// `batch_size / 10` messages held), so that a burst is completed without waiting for
    /// `checkpoint.interval`. `0s` turns it off.
    #[serde(default = "d_quiet")]
    pub quiet_checkpoint: Dur,
    /// How long connecting may take (TCP, TLS, AMQP open, authorization, attaching the links)
    /// before the attempt counts as failed and is made again: a peer that accepts and never
    /// answers must not stall the source for good.
    #[serde(default = "d_connect_timeout")]
    pub connect_timeout: Dur,
    /// Renew the locks of messages held past half of their lock duration
    /// (`com.microsoft:renew-lock`), so that a slow checkpoint never lets a lock expire.
    #[serde(default = "yes")]
    pub renew_locks: bool,
    /// A custom AMQP endpoint (`amqp://HOST:PORT` or `amqps://HOST:PORT`). Empty: the
    /// namespace's own (`amqps://NS:5671`), or the emulator's with `UseDevelopmentEmulator=true`.
    #[serde(default)]
    pub endpoint: Option<String>,
}

fn d_prefetch() -> u32 {
    1000
}
fn d_batch() -> usize {
    1000
}
fn d_linger() -> Dur {
    Dur::new("50ms")
}
fn d_quiet() -> Dur {
    Dur::new("250ms")
}
fn d_connect_timeout() -> Dur {
    Dur::new("30s")
}
fn d_checkpoint_at() -> f64 {
    0.5
}
fn yes() -> bool {
    true
}

fn set(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// A parsed connection string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionString {
    /// `host` or `host:port` of `Endpoint=sb://...`.
    pub host: String,
    pub port: Option<u16>,
    pub key_name: Option<String>,
    pub key: Option<String>,
    pub entity_path: Option<String>,
    pub emulator: bool,
}

impl ConnectionString {
    pub fn parse(s: &str) -> Result<ConnectionString, String> {
        let mut endpoint = None;
        let mut cs = ConnectionString {
            host: String::new(),
            port: None,
            key_name: None,
            key: None,
            entity_path: None,
            emulator: false,
        };
        for part in s.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((k, v)) = part.split_once('=') else {
                return Err(format!("connection string: `{}` is not KEY=VALUE", part.split('=').next().unwrap_or("")));
            };
            match k.trim().to_ascii_lowercase().as_str() {
                "endpoint" => endpoint = Some(v.trim().to_string()),
                "sharedaccesskeyname" => cs.key_name = Some(v.to_string()),
                "sharedaccesskey" => cs.key = Some(v.to_string()),
                "entitypath" => cs.entity_path = Some(v.to_string()).filter(|e| !e.is_empty()),
                "usedevelopmentemulator" => cs.emulator = v.trim().eq_ignore_ascii_case("true"),
                _ => {} // SharedAccessSignature, TransportType, ...: not used
            }
        }
        let endpoint = endpoint.ok_or("connection string: no Endpoint=sb://...")?;
        let rest =
            endpoint.split_once("://").map(|(_, r)| r).ok_or("connection string: Endpoint is not sb://NAMESPACE/")?;
        let authority = rest.split('/').next().unwrap_or("");
        match authority.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') || h.starts_with('[') => {
                cs.host = h.to_string();
                cs.port = Some(p.parse().map_err(|_| format!("connection string: bad port in Endpoint `{p}`"))?);
            }
            _ => cs.host = authority.to_string(),
        }
        if cs.host.is_empty() {
            return Err("connection string: Endpoint names no host".into());
        }
        if cs.key_name.is_some() != cs.key.is_some() {
            return Err("connection string: SharedAccessKeyName and SharedAccessKey go together".into());
        }
        Ok(cs)
    }
}

impl ServiceBusConfig {
    /// Messages held locked at most: `max_held`, or 10 x `prefetch`.
    pub fn max_held(&self) -> u32 {
        self.max_held.unwrap_or(self.prefetch.saturating_mul(10)).max(self.prefetch)
    }

    /// The parsed connection string, if any.
    pub fn connection(&self) -> Result<Option<ConnectionString>, String> {
        match &self.connection_string {
            Some(s) if !s.is_empty() => {
                let cs = ConnectionString::parse(s.expose()).map_err(|e| crate::secret::redact(&e))?;
                if let Some(k) = &cs.key {
                    crate::secret::register(k);
                }
                Ok(Some(cs))
            }
            _ => Ok(None),
        }
    }

    /// The entity path read (`QUEUE` or `TOPIC/Subscriptions/SUB`).
    pub fn entity(&self) -> Result<String, String> {
        let cs_entity = self.connection()?.and_then(|c| c.entity_path);
        match (set(&self.queue), set(&self.topic), set(&self.subscription)) {
            (Some(_), Some(_), _) => Err("set `queue` or `topic`, not both".into()),
            (Some(q), None, Some(_)) => Err(format!("`subscription` belongs to a topic, and `{q}` is a queue")),
            (Some(q), None, None) => Ok(q.to_string()),
            (None, Some(t), Some(s)) => Ok(format!("{t}/Subscriptions/{s}")),
            (None, Some(_), None) => Err("a topic is read through a `subscription`: set it".into()),
            (None, None, Some(s)) => match cs_entity {
                Some(t) => Ok(format!("{t}/Subscriptions/{s}")),
                None => Err(format!("`subscription` {s:?} needs its `topic`")),
            },
            (None, None, None) => cs_entity.ok_or_else(|| {
                "`queue` (or `topic` and `subscription`) is required: the connection string has no EntityPath".into()
            }),
        }
    }

    /// The host and port to connect to, whether to use TLS, and the namespace the token names.
    pub fn address(&self) -> Result<Address, String> {
        let cs = self.connection()?;
        let namespace = match (set(&self.namespace), &cs) {
            (Some(n), _) => n.to_string(),
            (None, Some(c)) => c.host.clone(),
            (None, None) => return Err("`namespace` is required with a credential".into()),
        };
        if let Some(e) = set(&self.endpoint) {
            let (scheme, rest) =
                e.split_once("://").ok_or("`endpoint` must be amqp://HOST:PORT or amqps://HOST:PORT")?;
            let tls = match scheme {
                "amqps" => true,
                "amqp" => false,
                _ => return Err("`endpoint` must be amqp://HOST:PORT or amqps://HOST:PORT".into()),
            };
            let authority = rest.trim_end_matches('/');
            let (host, port) = match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().map_err(|_| format!("`endpoint` has a bad port `{p}`"))?),
                None => (authority.to_string(), if tls { 5671 } else { 5672 }),
            };
            return Ok(Address { host, port, tls, namespace });
        }
        match &cs {
            Some(c) if c.emulator => {
                Ok(Address { host: c.host.clone(), port: c.port.unwrap_or(5672), tls: false, namespace })
            }
            _ => Ok(Address { host: namespace.clone(), port: 5671, tls: true, namespace }),
        }
    }
}

/// Where the source connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    /// The namespace host that tokens name (`sb://NAMESPACE/ENTITY`).
    pub namespace: String,
}

impl Spec for ServiceBusConfig {
    fn check(&self, ptr: &str, cx: &mut Checker<'_>) {
        crate::sources::message::check(ptr, cx, self.format, self.time.as_deref(), self.device_id.as_deref());
        let cs_given = self.connection_string.as_ref().is_some_and(|s| !s.is_empty());
        cx.secret(&format!("{ptr}/connection_string"), cs_given || self.credential.is_some());
        match self.connection() {
            Err(e) => cx.error(&format!("{ptr}/connection_string"), &e),
            Ok(Some(c)) if c.key.is_none() && self.credential.is_none() => cx.error(
                &format!("{ptr}/connection_string"),
                "has no SharedAccessKeyName/SharedAccessKey: give them, or a `credential`",
            ),
            Ok(_) => {
                if let Err(e) = self.entity() {
                    let at =
                        if e.contains("subscription") && set(&self.topic).is_some() { "subscription" } else { "queue" };
                    cx.error(&format!("{ptr}/{at}"), &e);
                }
                if let Err(e) = self.address() {
                    let at = if e.contains("endpoint") { "endpoint" } else { "namespace" };
                    cx.error(&format!("{ptr}/{at}"), &e);
                }
            }
        }
        if cs_given && self.credential.is_some() {
            cx.error(&format!("{ptr}/credential"), "give a connection string or a credential, not both");
        }
        if self.prefetch == 0 {
            cx.error(&format!("{ptr}/prefetch"), "must be at least 1");
        }
        if self.max_held.is_some_and(|m| m < self.prefetch) {
            cx.error(&format!("{ptr}/max_held"), "must be at least `prefetch`");
        }
        if self.batch_size == 0 {
            cx.error(&format!("{ptr}/batch_size"), "must be at least 1");
        }
        cx.duration(&format!("{ptr}/linger"), &self.linger);
        cx.duration(&format!("{ptr}/quiet_checkpoint"), &self.quiet_checkpoint);
        cx.positive_duration(&format!("{ptr}/connect_timeout"), &self.connect_timeout);
        if !(self.checkpoint_at > 0.0 && self.checkpoint_at <= 1.0) {
            cx.error(&format!("{ptr}/checkpoint_at"), "must be a share in (0, 1]");
        }
    }
    fn ports(&self) -> Vec<crate::runtime::Port> {
        crate::runtime::SOURCE_PORTS.to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_strings_of_azure_and_of_emulators() {
        let c = ConnectionString::parse(
            "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=listen;SharedAccessKey=abc=;EntityPath=q",
        )
        .unwrap();
        assert_eq!(c.host, "ns.servicebus.windows.net");
        assert_eq!(
            (c.port, c.key.as_deref(), c.entity_path.as_deref(), c.emulator),
            (None, Some("abc="), Some("q"), false)
        );
        let e = ConnectionString::parse(
            "Endpoint=sb://127.0.0.1:5673;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;",
        )
        .unwrap();
        assert_eq!((e.host.as_str(), e.port, e.emulator), ("127.0.0.1", Some(5673), true));
        assert!(ConnectionString::parse("SharedAccessKeyName=x;SharedAccessKey=y").unwrap_err().contains("Endpoint"));
        assert!(ConnectionString::parse("Endpoint=sb://h/;SharedAccessKeyName=x").unwrap_err().contains("together"));
        assert!(ConnectionString::parse("Endpoint=sb://h:x/").unwrap_err().contains("port"));
    }

    fn cfg(yaml: &str) -> ServiceBusConfig {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn entity_and_address() {
        let emu = "connection_string: 'Endpoint=sb://localhost:5700;SharedAccessKeyName=k;SharedAccessKey=v;UseDevelopmentEmulator=true'";
        let c = cfg(&format!("{emu}\nqueue: q\ntopic: ''\nsubscription: ''"));
        assert_eq!(c.entity().unwrap(), "q");
        assert_eq!(
            c.address().unwrap(),
            Address { host: "localhost".into(), port: 5700, tls: false, namespace: "localhost".into() }
        );
        let t = cfg(&format!("{emu}\nqueue: ''\ntopic: t\nsubscription: s"));
        assert_eq!(t.entity().unwrap(), "t/Subscriptions/s");
        assert!(cfg(&format!("{emu}\ntopic: t")).entity().unwrap_err().contains("subscription"));
        assert!(cfg(&format!("{emu}\nqueue: q\ntopic: t")).entity().unwrap_err().contains("not both"));
        assert!(cfg(emu).entity().unwrap_err().contains("required"));
        let azure = cfg("connection_string: 'Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=v;EntityPath=q'");
        assert_eq!(azure.entity().unwrap(), "q");
        let a = azure.address().unwrap();
        assert_eq!((a.host.as_str(), a.port, a.tls), ("ns.servicebus.windows.net", 5671, true));
        let entra = cfg("namespace: ns.servicebus.windows.net\ncredential: {kind: managed_identity}\nqueue: q");
        assert!(entra.address().unwrap().tls);
    }
}
