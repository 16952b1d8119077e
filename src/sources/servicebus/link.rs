//! The AMQP 1.0 side of the `servicebus` source on fe2o3-amqp: the connection (TLS, or plain to
//! an emulator), claims-based authorization (`$cbs` put-token with a SAS token or an Entra ID
//! token), the peek-lock receive link, and the entity's `$management` link for renew-lock and
//! the round trip that confirms completions.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::delivery::Sendable;
use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::definitions::{ReceiverSettleMode, SenderSettleMode};
use fe2o3_amqp::types::messaging::{ApplicationProperties, Body, FromBody, IntoBody, Message, MessageId, Properties};
use fe2o3_amqp::types::primitives::{OrderedMap, SimpleValue, Timestamp, Value};
use fe2o3_amqp::{Connection, Delivery, Receiver, Sender, Session};
use fe2o3_amqp_cbs::put_token::{PutTokenRequest, PutTokenResponse};
use fe2o3_amqp_management::error::Error as MgmtError;
use fe2o3_amqp_management::request::Request;
use fe2o3_amqp_management::response::Response;

use super::config::{Address, ServiceBusConfig};
use crate::secret::Secret;

/// How long a management call may take before the link counts as broken.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the `$cbs` link's first credit is given to arrive before the first request.
const FIRST_FLOW: Duration = Duration::from_millis(20);
/// How long a put-token may take before the connection is made again.
const PUT_TOKEN_TIMEOUT: Duration = Duration::from_secs(10);
/// SAS tokens are made for this long and renewed well before they run out.
const TOKEN_LIFE: Duration = Duration::from_secs(3600);
/// Lock tokens per renew-lock request.
pub const RENEW_CHUNK: usize = 1000;

/// How the source proves who it is.
pub enum Auth {
    Sas { key_name: String, key: Secret },
    Token(Arc<dyn azure_core::credentials::TokenCredential>),
}

impl Auth {
    pub fn new(cfg: &ServiceBusConfig) -> anyhow::Result<Auth> {
        if let Some(c) = &cfg.credential {
            return Ok(Auth::Token(crate::sources::eventhubs::connect::credential(c)?));
        }
        let cs = cfg.connection().map_err(anyhow::Error::msg)?.context("needs a connection string or a credential")?;
        match (cs.key_name, cs.key) {
            (Some(key_name), Some(key)) => Ok(Auth::Sas { key_name, key: Secret::new(key) }),
            _ => anyhow::bail!("the connection string has no SharedAccessKeyName/SharedAccessKey"),
        }
    }

    /// A token for `audience`, its type and when it expires (Unix milliseconds).
    async fn token(&self, audience: &str) -> anyhow::Result<(String, &'static str, i64)> {
        match self {
            Auth::Sas { key_name, key } => {
                let expiry = crate::time::now_nanos() / 1_000_000_000 + TOKEN_LIFE.as_secs() as i64;
                Ok((
                    sas_token(audience, key_name, key.expose(), expiry),
                    "servicebus.windows.net:sastoken",
                    expiry * 1000,
                ))
            }
            Auth::Token(c) => {
                let t = c
                    .get_token(&["https://servicebus.azure.net/.default"], None)
                    .await
                    .map_err(|e| anyhow::anyhow!("getting an Entra ID token: {e}"))?;
                let expires = t.expires_on.unix_timestamp() * 1000;
                Ok((t.token.secret().to_string(), "jwt", expires))
            }
        }
    }
}

/// A Service Bus SAS token: `SharedAccessSignature sr=URI&sig=SIG&se=EXPIRY&skn=KEYNAME`, where
/// SIG is base64(HMAC-SHA256(key as UTF-8, url-encoded URI + "\n" + expiry)).
pub fn sas_token(uri: &str, key_name: &str, key: &str, expiry: i64) -> String {
    use base64::Engine;
    use hmac::Mac;
    // as the SDKs' quote_plus / EscapeDataString: all but the unreserved characters
    const SET: &percent_encoding::AsciiSet =
        &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');
    let enc = |s: &str| percent_encoding::utf8_percent_encode(s, SET).to_string();
    let sr = enc(uri);
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).expect("HMAC takes any key length");
    mac.update(format!("{sr}\n{expiry}").as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    format!("SharedAccessSignature sr={sr}&sig={}&se={expiry}&skn={}", enc(&sig), enc(key_name))
}

/// An open connection to the entity.
pub struct Link {
    _conn: ConnectionHandle<()>,
    _session: SessionHandle<()>,
    cbs: RequestLink,
    mgmt: RequestLink,
    pub receiver: Receiver,
    receiver_name: String,
    audience: String,
    /// When the authorization token runs out (Unix ms).
    pub token_expires: i64,
}

impl Link {
    /// Connects, authorizes, attaches the receiver (peek-lock, no credit yet) and the
    /// management link.
    pub async fn open(addr: &Address, entity: &str, auth: &Auth, name: &str) -> anyhow::Result<Link> {
        let tcp = tokio::net::TcpStream::connect((addr.host.as_str(), addr.port))
            .await
            .with_context(|| format!("connecting to {}:{}", addr.host, addr.port))?;
        let _ = tcp.set_nodelay(true);
        let id = format!("centralflow-{name}-{:x}", rand::random::<u64>());
        let builder = Connection::builder()
            .container_id(id.clone())
            .hostname(addr.namespace.as_str())
            .sasl_profile(SaslProfile::Anonymous)
            .idle_time_out(120_000u32);
        let mut conn = if addr.tls {
            let cfg = crate::sinks::central::tls_config(None)?;
            let server = rustls::pki_types::ServerName::try_from(addr.host.clone())
                .with_context(|| format!("{} is not a TLS server name", addr.host))?;
            let tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(server, tcp)
                .await
                .with_context(|| format!("TLS with {}", addr.host))?;
            builder.open_with_stream(tls).await
        } else {
            builder.open_with_stream(tcp).await
        }
        .map_err(|e| anyhow::anyhow!("opening the AMQP connection: {e}"))?;
        let mut session = Session::begin(&mut conn).await.map_err(|e| anyhow::anyhow!("beginning a session: {e}"))?;
        let mut cbs = RequestLink::attach(&mut session, "$cbs", format!("{id}-cbs")).await?;
        // fe2o3-amqp's sender (0.16 to 0.18 at least) can miss the flow that grants its first
        // credit: a send checks the credit, then waits on a Notify that the flow wakes with
        // `notify_waiters`, which keeps no permit, so a flow landing between the two leaves the
        // send waiting for good. The namespace sends that flow right after its attach: let it
        // land before the first request (the put-token timeout below covers the rest).
        tokio::time::sleep(FIRST_FLOW).await;
        let audience = format!("sb://{}/{}", addr.namespace, entity);
        let token_expires = put_token(&mut cbs, auth, &audience).await?;
        let receiver_name = format!("{id}-receiver");
        let mut receiver = Receiver::builder()
            .name(receiver_name.clone())
            .source(entity.to_string())
            .receiver_settle_mode(ReceiverSettleMode::First)
            .credit_mode(CreditMode::Manual)
            .auto_accept(false)
            .attach(&mut session)
            .await
            .map_err(|e| anyhow::anyhow!("attaching a receiver to {entity}: {e}"))?;
        let mgmt =
            RequestLink::attach(&mut session, &format!("{entity}/$management"), format!("{id}-management")).await?;
        receiver.set_credit(0).await.ok();
        Ok(Link { _conn: conn, _session: session, cbs, mgmt, receiver, receiver_name, audience, token_expires })
    }

    /// Puts a new token when the current one has less than a quarter of its life left.
    pub async fn refresh_token(&mut self, auth: &Auth) -> anyhow::Result<()> {
        let now = crate::time::now_nanos() / 1_000_000;
        if self.token_expires - now > TOKEN_LIFE.as_millis() as i64 / 4 {
            return Ok(());
        }
        self.token_expires = put_token(&mut self.cbs, auth, &self.audience).await?;
        Ok(())
    }

    /// Renews the locks of these messages; their new expiry times (Unix ms), in order.
    pub async fn renew_locks(&mut self, tokens: &[[u8; 16]]) -> anyhow::Result<Vec<i64>> {
        let list: Vec<Value> = tokens.iter().map(|t| Value::Uuid(lock_token(t).into())).collect();
        let mut body = OrderedMap::new();
        body.insert(Value::String("lock-tokens".into()), Value::Array(list.into()));
        let req = MgmtRequest {
            operation: "com.microsoft:renew-lock",
            link_name: Some(self.receiver_name.clone()),
            body: Value::Map(body),
        };
        let res = self.call(req).await?;
        let Some(Value::Array(a)) = res.get("expirations") else {
            anyhow::bail!("renew-lock answered without expirations");
        };
        a.0.iter()
            .map(|v| match v {
                Value::Timestamp(t) => Ok(t.milliseconds()),
                other => Err(anyhow::anyhow!("renew-lock answered an expiration of {other:?}")),
            })
            .collect()
    }

    /// A management round trip (peek one message). The namespace handles a connection's frames
    /// in order: once it answers, it has seen the dispositions sent before.
    pub async fn round_trip(&mut self, from_sequence: i64) -> anyhow::Result<()> {
        let mut body = OrderedMap::new();
        body.insert(Value::String("from-sequence-number".into()), Value::Long(from_sequence));
        body.insert(Value::String("message-count".into()), Value::Int(1));
        let req = MgmtRequest { operation: "com.microsoft:peek-message", link_name: None, body: Value::Map(body) };
        self.call(req).await.map(|_| ())
    }

    async fn call(&mut self, req: MgmtRequest) -> anyhow::Result<OrderedMap<String, Value>> {
        let op = req.operation;
        let res: MgmtResponse = tokio::time::timeout(CALL_TIMEOUT, self.mgmt.call(req))
            .await
            .map_err(|_| anyhow::anyhow!("{op}: no answer in {CALL_TIMEOUT:?}"))?
            .map_err(|e| match e {
                MgmtError::Status(s) => anyhow::Error::new(MgmtStatus {
                    op,
                    code: s.code.0.get(),
                    description: s.description.unwrap_or_default(),
                }),
                e => anyhow::anyhow!("{op}: {e}"),
            })?;
        Ok(res.0)
    }
}

/// A `$management` request the namespace answered with an error status.
#[derive(Debug)]
pub struct MgmtStatus {
    pub op: &'static str,
    pub code: u16,
    pub description: String,
}

impl std::fmt::Display for MgmtStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: status {}: {}", self.op, self.code, self.description)
    }
}

impl std::error::Error for MgmtStatus {}

/// Whether the namespace refused a request because a message's lock is lost (status 410, the
/// `com.microsoft:message-lock-lost` condition), and not for a reason that says nothing of the
/// locks (no answer, a lost link, a busy namespace).
pub fn lock_lost(e: &anyhow::Error) -> bool {
    e.downcast_ref::<MgmtStatus>().is_some_and(|s| s.code == 410)
}

/// What renews locks: the link, or a stand-in in the tests of [`renew_each`].
pub(super) trait RenewLocks {
    async fn renew_locks(&mut self, tokens: &[[u8; 16]]) -> anyhow::Result<Vec<i64>>;
}

impl RenewLocks for Link {
    async fn renew_locks(&mut self, tokens: &[[u8; 16]]) -> anyhow::Result<Vec<i64>> {
        Link::renew_locks(self, tokens).await
    }
}

/// Renews the locks of `tokens`: each one's new expiry (Unix ms), or `None` for a lock that is
/// lost. The namespace refuses a whole request for one lost lock, so a refused request is
/// halved until the lost ones are found (k lost among n cost about 2k·log2(n) more requests);
/// giving up on the whole request would let every other lock in it run out. Any other error
/// ends the renewal: the connection is made again.
pub(super) async fn renew_each<R: RenewLocks>(r: &mut R, tokens: &[[u8; 16]]) -> anyhow::Result<Vec<Option<i64>>> {
    let mut out = vec![None; tokens.len()];
    // the ranges of `tokens` still to renew
    let mut work = Vec::new();
    work.push(0..tokens.len());
    while let Some(range) = work.pop() {
        if range.is_empty() {
            continue;
        }
        match r.renew_locks(&tokens[range.clone()]).await {
            Ok(times) => {
                for (i, t) in range.zip(times) {
                    out[i] = Some(t);
                }
            }
            Err(e) if lock_lost(&e) => {
                if range.len() > 1 {
                    let mid = range.start + range.len() / 2;
                    work.push(mid..range.end);
                    work.push(range.start..mid);
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

async fn put_token(cbs: &mut RequestLink, auth: &Auth, audience: &str) -> anyhow::Result<i64> {
    let (token, kind, expires) = auth.token(audience).await?;
    let req = PutTokenRequest::new(audience, token, Timestamp::from_milliseconds(expires), kind, None);
    let _: PutTokenResponse = tokio::time::timeout(PUT_TOKEN_TIMEOUT, cbs.call(req))
        .await
        .map_err(|_| anyhow::anyhow!("$cbs put-token: no answer in {PUT_TOKEN_TIMEOUT:?}"))?
        .map_err(|e| anyhow::anyhow!("authorizing for {audience}: {}", crate::secret::redact(&e.to_string())))?;
    Ok(expires)
}

/// A request-response pair of links on a node (`$cbs`, `ENTITY/$management`): what
/// fe2o3-amqp-management's `MgmtClient` does, but with the requests sent settled, as
/// Microsoft's own clients send them (`SenderSettleMode.SETTLED` in azure-core-amqp's
/// `RequestResponseChannel`). An unsettled send through fe2o3-amqp (0.16.2, still so in 0.17.0)
/// can wait forever: it records the delivery as unsettled only after it has handed the transfer
/// to the session, so a disposition that comes back before then finds nothing to settle. On
/// loopback with the CPU loaded that hung a test in 1 to 3 of 15 runs; here it would have cost
/// a reconnect after `CALL_TIMEOUT`. The answer is what tells whether a request worked, so the
/// disposition carries nothing this needs.
struct RequestLink {
    sender: Sender,
    receiver: Receiver,
    reply_to: String,
    next_id: u64,
}

impl RequestLink {
    async fn attach(session: &mut SessionHandle<()>, node: &str, reply_to: String) -> anyhow::Result<RequestLink> {
        let sender = Sender::builder()
            .name(format!("{reply_to}-sender"))
            .target(node)
            .sender_settle_mode(SenderSettleMode::Settled)
            .attach(session)
            .await
            .map_err(|e| anyhow::anyhow!("attaching a sender to {node}: {e}"))?;
        let receiver = Receiver::builder()
            .name(format!("{reply_to}-receiver"))
            .source(node)
            .target(reply_to.clone())
            .attach(session)
            .await
            .map_err(|e| anyhow::anyhow!("attaching a receiver to {node}: {e}"))?;
        Ok(RequestLink { sender, receiver, reply_to, next_id: 0 })
    }

    /// Sends the request and waits for the answer whose correlation id is its message id; an
    /// answer to an earlier request that timed out is skipped.
    async fn call<Req>(&mut self, req: Req) -> Result<Req::Response, MgmtError>
    where
        Req: Request,
        <Req::Response as Response>::Error: Into<MgmtError>,
        for<'de> <Req::Response as Response>::Body: FromBody<'de> + std::fmt::Debug + Send,
    {
        let id = MessageId::Ulong(self.next_id);
        self.next_id = self.next_id.wrapping_add(1);
        let mut message = req.into_message().map_body(IntoBody::into_body);
        let props = message.properties.get_or_insert(Properties::default());
        props.message_id = Some(id.clone());
        props.reply_to = Some(self.reply_to.clone());
        self.sender.send(Sendable::builder().message(message).settled(true).build()).await?;
        loop {
            let answer: Delivery<<Req::Response as Response>::Body> = self.receiver.recv().await?;
            self.receiver.accept(&answer).await?;
            let correlation = answer.message().properties.as_ref().and_then(|p| p.correlation_id.as_ref());
            if correlation == Some(&id) {
                return <Req::Response as Response>::from_message(answer.into_message()).map_err(Into::into);
            }
        }
    }
}

/// The lock token of a delivery: its 16-byte delivery tag is a .NET `Guid` (first three groups
/// little-endian); on the wire, in renew-lock, it is an AMQP uuid (RFC 4122 byte order).
pub fn lock_token(tag: &[u8; 16]) -> [u8; 16] {
    let mut u = *tag;
    u[0..4].reverse();
    u[4..6].reverse();
    u[6..8].reverse();
    u
}

/// A `$management` request: an operation with a map body.
struct MgmtRequest {
    operation: &'static str,
    link_name: Option<String>,
    body: Value,
}

impl Request for MgmtRequest {
    const OPERATION: &'static str = "";
    type Response = MgmtResponse;
    type Body = Value;

    fn encode_application_properties(&mut self) -> Option<ApplicationProperties> {
        let mut p = ApplicationProperties::builder()
            .insert("operation", SimpleValue::String(self.operation.to_string()))
            .insert("com.microsoft:server-timeout", SimpleValue::Uint(CALL_TIMEOUT.as_millis() as u32));
        if let Some(l) = &self.link_name {
            p = p.insert("associated-link-name", SimpleValue::String(l.clone()));
        }
        Some(p.build())
    }

    fn encode_body(self) -> Value {
        self.body
    }
}

/// A `$management` answer: status 200 (or 204, "no messages", for a peek) and a map body.
struct MgmtResponse(OrderedMap<String, Value>);

impl Response for MgmtResponse {
    const STATUS_CODE: u16 = 200;
    type Body = Body<Value>;
    type Error = MgmtError;

    fn from_message(mut message: Message<Body<Value>>) -> Result<Self, MgmtError> {
        let code = status_of(&message);
        if code == Some(204) {
            return Ok(MgmtResponse(OrderedMap::new()));
        }
        Self::verify_status_code(&mut message)?;
        Self::decode_message(message)
    }

    fn decode_message(message: Message<Body<Value>>) -> Result<Self, MgmtError> {
        let mut out = OrderedMap::new();
        if let Body::Value(v) = message.body {
            if let Value::Map(m) = v.0 {
                for (k, v) in m.into_iter() {
                    if let Value::String(k) | Value::Symbol(fe2o3_amqp::types::primitives::Symbol(k)) = k {
                        out.insert(k, v);
                    }
                }
            }
        }
        Ok(MgmtResponse(out))
    }
}

fn status_of(message: &Message<Body<Value>>) -> Option<i64> {
    let props = message.application_properties.as_ref()?;
    match props.0.get("statusCode").or_else(|| props.0.get("status-code"))? {
        SimpleValue::Int(i) => Some(*i as i64),
        SimpleValue::Uint(i) => Some(*i as i64),
        SimpleValue::Long(i) => Some(*i),
        SimpleValue::Short(i) => Some(*i as i64),
        SimpleValue::Ushort(i) => Some(*i as i64),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A known answer computed outside Rust, with the Python SDK's encoding (quote_plus):
    /// `python3 -c 'import hmac,hashlib,base64,urllib.parse as u; sr=u.quote_plus("sb://ns.servicebus.windows.net/q");
    /// print(u.quote_plus(base64.b64encode(hmac.new(b"key", (sr+"\n1700000000").encode(), hashlib.sha256).digest()).decode()))'`
    #[test]
    fn sas_tokens_match_an_independent_computation() {
        let t = sas_token("sb://ns.servicebus.windows.net/q", "listen", "key", 1_700_000_000);
        assert_eq!(
            t,
            "SharedAccessSignature sr=sb%3A%2F%2Fns.servicebus.windows.net%2Fq\
             &sig=Z%2B6BLPu5z1O7CUS4t%2FqSp8qQbFea7wTvKxD0%2FHUZdqk%3D&se=1700000000&skn=listen"
        );
    }

    /// Stands in for the namespace: refuses a request naming a lost lock as a whole (410), as
    /// Service Bus and the emulator do, or every request (no answer).
    struct Namespace {
        lost: Vec<[u8; 16]>,
        silent: bool,
        calls: usize,
    }

    impl RenewLocks for Namespace {
        async fn renew_locks(&mut self, tokens: &[[u8; 16]]) -> anyhow::Result<Vec<i64>> {
            self.calls += 1;
            if self.silent {
                anyhow::bail!("com.microsoft:renew-lock: no answer in 30s");
            }
            if tokens.iter().any(|t| self.lost.contains(t)) {
                let status =
                    MgmtStatus { op: "com.microsoft:renew-lock", code: 410, description: "The lock was lost.".into() };
                return Err(anyhow::Error::new(status).context("renewing"));
            }
            Ok(tokens.iter().map(|t| 1_000 + t[0] as i64).collect())
        }
    }

    fn tokens(n: u8) -> Vec<[u8; 16]> {
        (0..n).map(|i| [i; 16]).collect()
    }

    #[tokio::test]
    async fn a_lost_lock_costs_only_itself_its_renewal() {
        let all = tokens(200);
        let mut ns = Namespace { lost: vec![all[17], all[150]], silent: false, calls: 0 };
        let out = renew_each(&mut ns, &all).await.unwrap();
        for (i, t) in out.iter().enumerate() {
            let want = if i == 17 || i == 150 { None } else { Some(1_000 + i as i64) };
            assert_eq!(*t, want, "token {i}");
        }
        // halving: about 2 * 2 * log2(200) requests, not one per token
        assert!(ns.calls <= 2 * 2 * 8 + 1, "{} requests", ns.calls);
        let mut ok = Namespace { lost: vec![], silent: false, calls: 0 };
        assert!(renew_each(&mut ok, &all).await.unwrap().iter().all(Option::is_some));
        assert_eq!(ok.calls, 1);
    }

    #[tokio::test]
    async fn no_answer_is_not_a_lost_lock() {
        // the error names the operation, com.microsoft:renew-lock: that says nothing of the locks
        let mut ns = Namespace { lost: vec![], silent: true, calls: 0 };
        let e = renew_each(&mut ns, &tokens(10)).await.unwrap_err();
        assert!(!lock_lost(&e), "{e:#}");
        assert_eq!(ns.calls, 1, "given up at once: the connection is made again");
    }

    #[test]
    fn lock_tokens_are_dotnet_guids() {
        let tag = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16];
        assert_eq!(lock_token(&tag), [4, 3, 2, 1, 6, 5, 8, 7, 9, 10, 11, 12, 13, 14, 15, 16]);
    }
}
