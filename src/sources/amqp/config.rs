//! The `amqp` source's YAML configuration ([`AmqpConfig`]: the broker, the queue and its
//! declaration, prefetch and batching, what the messages are) and its checks.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::values::{Dur, Path};
use crate::config::{Checker, Spec};
use crate::model::format::MessageFormat;
use crate::secret::Secret;

/// An AMQP 0-9-1 queue.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AmqpConfig {
    /// `amqp://user:password@host:5672/vhost` or `amqps://...` (a secret: from the environment).
    pub url: Secret,
    /// The queue to consume.
    pub queue: String,
    /// What the messages are: `export` (IoT Central's export messages, the default), `json`
    /// (objects of any shape, e.g. a transformed export) or `auto`.
    #[serde(default)]
    pub format: MessageFormat,
    /// `json`/`auto`: the field holding a record's time (RFC 3339 or epoch milliseconds); else
    /// the message's `timestamp_in_ms` header or `timestamp` property.
    #[serde(default)]
    pub time: Option<Box<Path>>,
    /// `json`/`auto`: the field holding a record's device id; else the `iotcentral-device-id` header.
    #[serde(default)]
    pub device_id: Option<Box<Path>>,
    /// Declare the queue (and its bindings) at start; without it the queue must exist.
    #[serde(default)]
    pub declare: Option<Declare>,
    /// Deliveries the broker may send before acknowledgements (basic.qos).
    #[serde(default = "d_prefetch")]
    pub prefetch: u16,
    #[serde(default = "d_tag")]
    pub consumer_tag: String,
    /// Where poison messages go when the queue has no dead-letter exchange (declared with
    /// `declare.dead_letter_exchange` or given here as `dead_letter_exchange`).
    #[serde(default)]
    pub dead_letter_queue: Option<String>,
    /// The queue's dead-letter exchange, when it is set by a broker policy.
    #[serde(default)]
    pub dead_letter_exchange: Option<String>,
    /// Events per batch sent downstream.
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    /// How long a partial batch may wait for more deliveries.
    #[serde(default = "d_linger")]
    pub linger: Dur,
    /// Ask for a checkpoint when unacknowledged deliveries reach this share of `prefetch`
    /// (the broker stops delivering at `prefetch`).
    #[serde(default = "d_checkpoint_at")]
    pub checkpoint_at: f64,
    /// Ask for a checkpoint when the queue has been quiet this long after a burst (at least
    /// `batch_size / 10` deliveries unacknowledged), so that a burst's output is committed and
    /// acknowledged without waiting for `checkpoint.interval`. Slow steady streams are not
    /// affected: they are checkpointed on the interval. `0s` turns it off.
    #[serde(default = "d_quiet")]
    pub quiet_checkpoint: Dur,
}

/// Queue declaration.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Declare {
    #[serde(default = "yes")]
    pub durable: bool,
    /// Exchanges to bind the queue to (declared as well).
    #[serde(default)]
    pub bindings: Vec<Binding>,
    /// `x-dead-letter-exchange` of the queue (declared as a fanout exchange if missing, with a
    /// `{queue}.dead-letter` queue bound to it).
    #[serde(default)]
    pub dead_letter_exchange: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Binding {
    pub exchange: String,
    /// `topic` (default), `direct`, `fanout` or `headers`.
    #[serde(default = "d_kind")]
    pub exchange_type: String,
    #[serde(default = "d_key")]
    pub routing_key: String,
}

fn d_prefetch() -> u16 {
    1000
}
fn d_tag() -> String {
    "centralflow".into()
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
fn d_checkpoint_at() -> f64 {
    0.5
}
fn yes() -> bool {
    true
}
fn d_kind() -> String {
    "topic".into()
}
fn d_key() -> String {
    "#".into()
}

impl Spec for AmqpConfig {
    fn check(&self, ptr: &str, cx: &mut Checker<'_>) {
        cx.secret(&format!("{ptr}/url"), !self.url.is_empty());
        match self.url.expose().split_once("://").map(|(s, _)| s) {
            Some("amqp") | Some("amqps") => {}
            _ => cx.error(&format!("{ptr}/url"), "must be an amqp:// or amqps:// URL"),
        }
        if self.queue.trim().is_empty() {
            cx.error(&format!("{ptr}/queue"), "is empty");
        }
        crate::sources::message::check(ptr, cx, self.format, self.time.as_deref(), self.device_id.as_deref());
        if self.prefetch == 0 {
            cx.error(
                &format!("{ptr}/prefetch"),
                "must be at least 1 (0 means unlimited to the broker, and unbounded memory here)",
            );
        }
        if self.batch_size == 0 {
            cx.error(&format!("{ptr}/batch_size"), "must be at least 1");
        }
        cx.duration(&format!("{ptr}/linger"), &self.linger);
        cx.duration(&format!("{ptr}/quiet_checkpoint"), &self.quiet_checkpoint);
        if !(self.checkpoint_at > 0.0 && self.checkpoint_at <= 1.0) {
            cx.error(&format!("{ptr}/checkpoint_at"), "must be a share in (0, 1]");
        }
        // the default exchange cannot be declared, nor route by the source queue's name
        let default_exchange =
            "is empty: the default exchange cannot take dead letters (leave it out to use `dead_letter_queue`)";
        if self.dead_letter_exchange.as_deref().is_some_and(|x| x.trim().is_empty()) {
            cx.error(&format!("{ptr}/dead_letter_exchange"), default_exchange);
        }
        if let Some(d) = &self.declare {
            if d.dead_letter_exchange.as_deref().is_some_and(|x| x.trim().is_empty()) {
                cx.error(&format!("{ptr}/declare/dead_letter_exchange"), default_exchange);
            }
            for (i, b) in d.bindings.iter().enumerate() {
                if !["topic", "direct", "fanout", "headers"].contains(&b.exchange_type.as_str()) {
                    cx.error(
                        &format!("{ptr}/declare/bindings/{i}/exchange_type"),
                        "must be topic, direct, fanout or headers",
                    );
                }
            }
        }
    }
    fn ports(&self) -> Vec<crate::runtime::Port> {
        crate::runtime::SOURCE_PORTS.to_vec()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_empty_dead_letter_exchange_is_refused_where_it_is_written() {
        let text = |setting: &str| {
            format!("sources:\n  q:\n    type: amqp\n    url: ${{URL}}\n    queue: exports\n{setting}sinks:\n  o:\n    type: console\n    inputs: [q]\n")
        };
        let env = |k: &str| (k == "URL").then(|| "amqp://127.0.0.1:5672/%2f".to_string());
        assert!(crate::config::load_str(&text("    dead_letter_exchange: dlx\n"), "t", &env).is_ok());
        let e = crate::config::load_str(&text("    dead_letter_exchange: \"\"\n"), "t", &env).unwrap_err();
        assert!(
            e[0].to_string().contains("dead_letter_exchange") && e[0].to_string().contains("default exchange"),
            "{e:?}"
        );
        let declared = "    declare: { dead_letter_exchange: \"\" }\n";
        let e = crate::config::load_str(&text(declared), "t", &env).unwrap_err();
        assert!(format!("{e:?}").contains("sources.q.declare.dead_letter_exchange"), "{e:?}");
    }
}
