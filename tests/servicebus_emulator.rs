//! The Service Bus emulator with a bare fe2o3-amqp client (the AMQP stack centralflow's Service
//! Bus source is built on): exact link credit, live delivery, lock tokens in delivery tags, locks
//! that outlive the connection, and `$management` renew-lock and update-disposition from another
//! connection. Microsoft's own client is in tests/emulators_sdk.rs.

mod common;

use std::time::Duration;

use common::servicebus_emulator::{Config, Emulator, Message};
use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::types::definitions::ReceiverSettleMode;
use fe2o3_amqp::types::messaging::annotations::OwnedKey;
use fe2o3_amqp::types::messaging::{AmqpValue, ApplicationProperties, Body, MessageId, Properties, Source};
use fe2o3_amqp::types::primitives::{Array, OrderedMap, SimpleValue, Symbol, Uuid, Value};
use fe2o3_amqp::{Connection, Delivery, Receiver, Sender, Session};

const T: Duration = Duration::from_secs(10);

async fn bounded<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(Duration::from_secs(60), f).await.expect("test took over 60 s");
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + T;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A connection authorized by SASL PLAIN with the emulator's key.
async fn connect(emu: &Emulator) -> fe2o3_amqp::connection::ConnectionHandle<()> {
    let (username, password) = emu.key();
    Connection::builder()
        .container_id("fe2o3-test")
        .sasl_profile(fe2o3_amqp::sasl_profile::SaslProfile::Plain { username, password })
        .open(format!("amqp://{}", emu.addr()).as_str())
        .await
        .expect("connect")
}

async fn peek_lock_receiver(session: &mut fe2o3_amqp::session::SessionHandle<()>, source: &str) -> Receiver {
    Receiver::builder()
        .name(format!("recv-{source}"))
        .source(Source::builder().address(source.to_string()).build())
        .target("fe2o3-test-target")
        .receiver_settle_mode(ReceiverSettleMode::Second)
        .credit_mode(CreditMode::Manual)
        .auto_accept(false)
        .attach(session)
        .await
        .expect("attach receiver")
}

fn body(d: &Delivery<Body<Value>>) -> String {
    match d.body() {
        Body::Data(sections) => String::from_utf8(sections.iter().flat_map(|s| s.0.to_vec()).collect()).unwrap(),
        other => panic!("not a data body: {other:?}"),
    }
}

/// The lock token a delivery tag carries, as a uuid's bytes (RFC 4122 order): the tag is the
/// .NET GUID layout, so the first three fields are byte-swapped (what `uuid.UUID(bytes_le=tag)`
/// reads in azure-servicebus).
fn lock_token(d: &Delivery<Body<Value>>) -> [u8; 16] {
    let mut t: [u8; 16] = d.delivery_tag().as_slice().try_into().expect("a 16-byte delivery tag");
    t[0..4].reverse();
    t[4..6].reverse();
    t[6..8].reverse();
    t
}

fn annotation<'a>(d: &'a Delivery<Body<Value>>, key: &str) -> Option<&'a Value> {
    d.message().message_annotations.as_ref()?.0.get(&OwnedKey::Symbol(Symbol::from(key)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_credit_is_exact_and_later_messages_arrive_live() {
    bounded(async {
        let emu = Emulator::start(Config::new().queue("q").lock_duration(Duration::from_secs(60))).await.unwrap();
        for i in 0..10 {
            emu.send("q", Message::text(format!("m{i}"))).unwrap();
        }
        let mut connection = connect(&emu).await;
        let mut session = Session::begin(&mut connection).await.unwrap();
        let mut receiver = peek_lock_receiver(&mut session, "q").await;

        receiver.set_credit(4).await.unwrap();
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(tokio::time::timeout(T, receiver.recv::<Body<Value>>()).await.unwrap().unwrap());
        }
        // The emulator takes messages out only under credit: four delivered, six waiting.
        let stats = emu.stats("q").unwrap();
        assert_eq!((stats.deliveries, stats.locked, stats.available), (4, 4, 6), "{stats:?}");
        assert_eq!(got.iter().map(body).collect::<Vec<_>>(), ["m0", "m1", "m2", "m3"]);
        for d in &got {
            assert_eq!(d.message().header.as_ref().map(|h| h.delivery_count), Some(0));
            assert_eq!(annotation(d, "x-opt-lock-token"), Some(&Value::Uuid(Uuid::from(lock_token(d)))));
            assert!(matches!(annotation(d, "x-opt-locked-until"), Some(Value::Timestamp(_))));
        }
        let seqs: Vec<&Value> = got.iter().map(|d| annotation(d, "x-opt-sequence-number").unwrap()).collect();
        assert_eq!(seqs, [&Value::Long(1), &Value::Long(2), &Value::Long(3), &Value::Long(4)]);

        // More credit than messages: the other six, then one sent later arrives live.
        receiver.set_credit(10).await.unwrap();
        for i in 4..10 {
            let d = tokio::time::timeout(T, receiver.recv::<Body<Value>>()).await.unwrap().unwrap();
            assert_eq!(body(&d), format!("m{i}"));
            got.push(d);
        }
        emu.send("q", Message::text("live")).unwrap();
        let d = tokio::time::timeout(T, receiver.recv::<Body<Value>>()).await.unwrap().unwrap();
        assert_eq!(body(&d), "live");
        let stats = emu.stats("q").unwrap();
        assert_eq!((stats.deliveries, stats.locked, stats.available), (11, 11, 0), "{stats:?}");

        // Accepting completes.
        receiver.accept(&d).await.unwrap();
        wait_until("the live message completed", || emu.stats("q").unwrap().completed == 1).await;
        receiver.close().await.unwrap();
        session.end().await.unwrap();
        connection.close().await.unwrap();
        emu.shutdown();
    })
    .await
}

/// A `$management` request on `ENTITY/$management`, answered on the link `reply-to` names.
async fn management(
    sender: &mut Sender,
    replies: &mut Receiver,
    id: u64,
    operation: &str,
    body: Vec<(&str, Value)>,
) -> (i32, OrderedMap<Value, Value>) {
    let mut map = OrderedMap::new();
    for (k, v) in body {
        map.insert(Value::String(k.to_string()), v);
    }
    let request = fe2o3_amqp::types::messaging::Message::builder()
        .properties(Properties {
            message_id: Some(MessageId::Ulong(id)),
            reply_to: Some("fe2o3-replies".into()),
            ..Default::default()
        })
        .application_properties(ApplicationProperties::builder().insert("operation", operation.to_string()).build())
        .body(Body::Value(AmqpValue(Value::Map(map))))
        .build();
    // Sent settled, as Microsoft's clients send management requests: an unsettled send through
    // fe2o3-amqp 0.16 can wait forever when the disposition beats its own bookkeeping
    // (src/sources/servicebus/link.rs, `RequestLink`). The answer carries the status.
    let request = fe2o3_amqp::link::delivery::Sendable::builder().message(request).settled(true).build();
    tokio::time::timeout(T, sender.send(request))
        .await
        .unwrap_or_else(|_| panic!("request {id} ({operation}) not sent in {T:?}"))
        .unwrap();
    let reply: Delivery<Body<Value>> = tokio::time::timeout(T, replies.recv())
        .await
        .unwrap_or_else(|_| panic!("no reply to {operation} ({id})"))
        .unwrap();
    replies.accept(&reply).await.unwrap();
    let message = reply.message();
    assert_eq!(message.properties.as_ref().and_then(|p| p.correlation_id.clone()), Some(MessageId::Ulong(id)));
    let status = match message.application_properties.as_ref().and_then(|p| p.0.get("statusCode")) {
        Some(SimpleValue::Int(s)) => *s,
        other => panic!("statusCode: {other:?}"),
    };
    let body = match &message.body {
        Body::Value(AmqpValue(Value::Map(m))) => m.clone(),
        _ => OrderedMap::new(),
    };
    (status, body)
}

fn tokens(ts: &[[u8; 16]]) -> Value {
    Value::Array(Array(ts.iter().map(|t| Value::Uuid(Uuid::from(*t))).collect()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_outlive_the_connection_and_settle_through_management() {
    bounded(async {
        let emu = Emulator::start(Config::new().queue("q").lock_duration(Duration::from_secs(30))).await.unwrap();
        for i in 0..3 {
            emu.send("q", Message::text(format!("m{i}"))).unwrap();
        }
        let mut connection = connect(&emu).await;
        let mut session = Session::begin(&mut connection).await.unwrap();
        let mut receiver = peek_lock_receiver(&mut session, "amqps://emulator/Q").await;
        receiver.set_credit(3).await.unwrap();
        let mut locks = Vec::new();
        for _ in 0..3 {
            let d = tokio::time::timeout(T, receiver.recv::<Body<Value>>()).await.unwrap().unwrap();
            locks.push(lock_token(&d));
        }

        // The connection goes away without settling anything: the locks stay.
        emu.drop_connections();
        wait_until("no connection", || emu.connections() == 0).await;
        drop((receiver, session, connection));
        let stats = emu.stats("q").unwrap();
        assert_eq!((stats.locked, stats.available, stats.lock_expiries), (3, 0, 0), "{stats:?}");

        // Another connection renews one lock and completes two through $management.
        let mut connection = connect(&emu).await;
        let mut session = Session::begin(&mut connection).await.unwrap();
        let mut sender = Sender::attach(&mut session, "mgmt-requests", "q/$management").await.unwrap();
        let mut replies = Receiver::builder()
            .name("mgmt-replies")
            .source(Source::builder().address("q/$management").build())
            .target("fe2o3-replies")
            .attach(&mut session)
            .await
            .unwrap();

        let (status, reply) = management(
            &mut sender,
            &mut replies,
            1,
            "com.microsoft:renew-lock",
            vec![("lock-tokens", tokens(&locks[2..]))],
        )
        .await;
        assert_eq!(status, 200);
        match reply.get(&Value::String("expirations".into())) {
            Some(Value::Array(a)) => assert!(matches!(a.0.as_slice(), [Value::Timestamp(_)]), "{a:?}"),
            other => panic!("expirations: {other:?}"),
        }
        assert_eq!(emu.stats("q").unwrap().lock_renewals, 1);

        let (status, _) = management(
            &mut sender,
            &mut replies,
            2,
            "com.microsoft:update-disposition",
            vec![("disposition-status", Value::String("completed".into())), ("lock-tokens", tokens(&locks[..2]))],
        )
        .await;
        assert_eq!(status, 200);
        let stats = emu.stats("q").unwrap();
        assert_eq!((stats.completed, stats.locked), (2, 1), "{stats:?}");

        // The same tokens again: those locks are gone.
        let (status, _) = management(
            &mut sender,
            &mut replies,
            3,
            "com.microsoft:update-disposition",
            vec![("disposition-status", Value::String("completed".into())), ("lock-tokens", tokens(&locks[..1]))],
        )
        .await;
        assert_eq!(status, 410);

        // Dead-letter the last one with a reason, through $management too.
        let (status, _) = management(
            &mut sender,
            &mut replies,
            4,
            "com.microsoft:update-disposition",
            vec![
                ("disposition-status", Value::String("suspended".into())),
                ("lock-tokens", tokens(&locks[2..])),
                ("deadletter-reason", Value::String("Poison".into())),
                ("deadletter-description", Value::String("bad bytes".into())),
            ],
        )
        .await;
        assert_eq!(status, 200);
        let stats = emu.stats("q").unwrap();
        assert_eq!((stats.completed, stats.locked, stats.dead_lettered), (2, 0, 1), "{stats:?}");

        // The dead-lettered message carries the reason as application properties.
        let mut dlq = peek_lock_receiver(&mut session, "q/$DeadLetterQueue").await;
        dlq.set_credit(1).await.unwrap();
        let d = tokio::time::timeout(T, dlq.recv::<Body<Value>>()).await.unwrap().unwrap();
        assert_eq!(body(&d), "m2");
        let props = &d.message().application_properties.as_ref().unwrap().0;
        assert_eq!(props.get("DeadLetterReason"), Some(&SimpleValue::String("Poison".into())));
        assert_eq!(props.get("DeadLetterErrorDescription"), Some(&SimpleValue::String("bad bytes".into())));
        assert_eq!(annotation(&d, "x-opt-deadletter-source"), Some(&Value::String("q".into())));
        dlq.accept(&d).await.unwrap();
        wait_until("the dead letter completed", || emu.stats("q/$DeadLetterQueue").unwrap().completed == 1).await;

        dlq.close().await.unwrap();
        sender.close().await.unwrap();
        replies.close().await.unwrap();
        session.end().await.unwrap();
        connection.close().await.unwrap();
        emu.shutdown();
    })
    .await
}

/// Links to entities need authorization: SASL ANONYMOUS without a CBS token is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entities_need_a_token_or_the_key() {
    bounded(async {
        let emu = Emulator::start(Config::new().queue("q")).await.unwrap();
        let mut connection = Connection::builder()
            .container_id("anonymous")
            .sasl_profile(fe2o3_amqp::sasl_profile::SaslProfile::Anonymous)
            .open(format!("amqp://{}", emu.addr()).as_str())
            .await
            .unwrap();
        let mut session = Session::begin(&mut connection).await.unwrap();
        let err = Sender::attach(&mut session, "s", "q").await.expect_err("no token, no link");
        assert!(format!("{err:?}").contains("UnauthorizedAccess"), "{err:?}");
        let mut session = Session::begin(&mut connection).await.unwrap();
        let err = Sender::attach(&mut session, "s", "nope").await.expect_err("no such queue");
        assert!(
            format!("{err:?}").contains("UnauthorizedAccess") || format!("{err:?}").contains("NotFound"),
            "{err:?}"
        );
        let _ = connection.close().await;
        emu.shutdown();
    })
    .await
}

/// fe2o3-amqp's client announces a session window of 2,048 transfers and does not widen it while
/// its credit lasts: a receiver with a credit of 5,000 (a prefetch) must still drain a queue of
/// 6,000, completing in batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefetch_above_the_session_window_drains_the_queue() {
    bounded(async {
        let emu = Emulator::start(Config::new().queue("q").lock_duration(Duration::from_secs(60))).await.unwrap();
        let n = 6000;
        for i in 0..n {
            emu.send("q", Message::text(format!("m{i}"))).unwrap();
        }
        let mut connection = connect(&emu).await;
        let mut session = Session::begin(&mut connection).await.unwrap();
        let mut receiver = Receiver::builder()
            .name("prefetch")
            .source(Source::builder().address("q").build())
            .target("fe2o3-test-target")
            .receiver_settle_mode(ReceiverSettleMode::Second)
            .credit_mode(CreditMode::Auto(5000))
            .auto_accept(false)
            .attach(&mut session)
            .await
            .unwrap();
        let mut batch = Vec::new();
        for i in 0..n {
            let d = tokio::time::timeout(T, receiver.recv::<Body<Value>>())
                .await
                .unwrap_or_else(|_| panic!("stalled after {i}: {:?}", emu.stats("q")))
                .unwrap();
            batch.push(d);
            if batch.len() == 500 {
                receiver.accept_all(batch.drain(..)).await.unwrap();
            }
        }
        receiver.accept_all(batch.drain(..)).await.unwrap();
        wait_until("every message completed", || emu.stats("q").unwrap().completed == n).await;
        let stats = emu.stats("q").unwrap();
        assert_eq!((stats.deliveries, stats.available, stats.locked), (n, 0, 0), "{stats:?}");
        receiver.close().await.unwrap();
        session.end().await.unwrap();
        connection.close().await.unwrap();
        emu.shutdown();
    })
    .await
}
