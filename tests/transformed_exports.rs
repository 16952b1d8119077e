//! IoT Central's transformed exports (`format: json`): the three output shapes of the
//! documented JQ examples (flattened telemetry, a row per telemetry value, a custom object with
//! `Timestamp`) through the files source, RabbitMQ and the webhook into Parquet and windows;
//! a record without a usable time is dead-lettered with the reason.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::transformed::*;
use common::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(120);

fn jsonl(values: impl IntoIterator<Item = Value>) -> String {
    values.into_iter().map(|v| v.to_string() + "\n").collect()
}

#[test]
fn transformed_exports_from_files() {
    let dir = tempfile::tempdir().unwrap();
    let msgs = messages();
    for (shape, body) in [
        // the flattened shape carries no time in a file: the export adds it; one that does not is refused
        ("flat", jsonl(msgs.iter().map(flattened_with_time)) + flattened(&msgs[0]).to_string().as_str() + "\n"),
        // rows come a JSON array a message (one JQ run's outputs)
        ("rows", msgs.iter().map(|m| Value::Array(rows(m)).to_string() + "\n").collect()),
        ("custom", jsonl(msgs.iter().map(custom))),
    ] {
        std::fs::create_dir_all(dir.path().join(shape)).unwrap();
        std::fs::write(dir.path().join(shape).join("export.jsonl"), body).unwrap();
    }
    let src = |shape: &str, extra: &str| {
        format!("    type: files\n    url: {}\n    format: json\n{extra}", dir.path().join(shape).display())
    };
    let out = dir.path().join("out");
    let yaml = pipeline_yaml(
        &src("flat", "    time: enqueuedTime\n"),
        &src("rows", "    time: EnqueuedTime\n    device_id: Device\n"),
        &src("custom", "    time: Timestamp\n"),
        &out,
        "",
    );
    let p = pipeline(dir.path(), "p.yaml", &yaml);
    ok(&run(&["replay", p.to_str().unwrap(), "--no-progress"], &[], T));
    check_output(&out);
    let rejected = rejected(&out);
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0].0, "flat");
    assert!(rejected[0].1.contains("no usable time: the record has no `enqueuedTime`"), "{rejected:?}");
}

/// Publishes `bodies` to `queue`, each with the given `timestamp` property (seconds) and
/// `iotcentral-device-id` header when set.
async fn publish(queue: &str, bodies: Vec<(Vec<u8>, Option<u64>, Option<&str>)>) {
    use lapin::options::*;
    use lapin::types::{AMQPValue, FieldTable};
    let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(queue.into(), QueueDeclareOptions { durable: true, ..Default::default() }, Default::default())
        .await
        .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    for (body, ts, device) in bodies {
        let mut props = lapin::BasicProperties::default().with_delivery_mode(2);
        if let Some(ts) = ts {
            props = props.with_timestamp(ts);
        }
        if let Some(d) = device {
            let h =
                std::collections::BTreeMap::from([("iotcentral-device-id".into(), AMQPValue::LongString(d.into()))]);
            props = props.with_headers(FieldTable::from(h));
        }
        let confirm = ch.basic_publish("".into(), queue.into(), BasicPublishOptions::default(), &body, props);
        assert!(confirm.await.unwrap().await.unwrap().is_ack());
    }
    let _ = conn.close(200, "done".into()).await;
}

#[test]
fn transformed_exports_from_rabbitmq() {
    let dir = tempfile::tempdir().unwrap();
    let msgs = messages();
    let queues: Vec<String> = ["flat", "rows", "custom"].iter().map(|s| unique(&format!("cf-shape-{s}-"))).collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let secs = |t: &str| chrono::DateTime::parse_from_rfc3339(t).unwrap().timestamp() as u64;
    rt.block_on(async {
        for q in &queues {
            amqp_delete(q).await;
        }
        // the flattened shape as IoT Central's example emits it: time and device from the message
        let mut flat: Vec<(Vec<u8>, Option<u64>, Option<&str>)> = msgs
            .iter()
            .map(|m| (flattened(m).to_string().into_bytes(), Some(secs(&m.1)), Some(m.0.as_str())))
            .collect();
        flat.push((flattened(&msgs[0]).to_string().into_bytes(), None, Some("d1"))); // no time at all
        publish(&queues[0], flat).await;
        publish(
            &queues[1],
            msgs.iter().map(|m| (Value::Array(rows(m)).to_string().into_bytes(), None, None)).collect(),
        )
        .await;
        publish(&queues[2], msgs.iter().map(|m| (custom(m).to_string().into_bytes(), None, None)).collect()).await;
    });
    let src = |q: &str, extra: &str| {
        format!(
            "    type: amqp\n    url: ${{CENTRALFLOW_AMQP_URL}}\n    queue: {q}\n    declare: {{durable: true}}\n    format: json\n    linger: 20ms\n{extra}"
        )
    };
    let out = dir.path().join("out");
    let yaml = pipeline_yaml(
        &src(&queues[0], ""),
        &src(&queues[1], "    time: EnqueuedTime\n    device_id: Device\n"),
        &src(&queues[2], "    time: Timestamp\n"),
        &out,
        "checkpoint:\n  interval: 300ms\n",
    );
    let p = pipeline(dir.path(), "p.yaml", &yaml);
    let child = cmd(&["run", p.to_str().unwrap()])
        .env("CENTRALFLOW_AMQP_URL", amqp_url())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while queues.iter().any(|q| amqp_depth(q) != (0, 0)) {
        assert!(
            start.elapsed() < T,
            "the queues did not drain: {:?}",
            queues.iter().map(|q| amqp_depth(q)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // without a checkpoint store, a stop emits every open window
    signal(&child, libc::SIGTERM);
    ok(&wait_output(child, T));
    check_output(&out);
    let rejected = rejected(&out);
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0].0, "flat");
    assert!(rejected[0].1.contains("no usable time: set `time:`"), "{rejected:?}");
    let dead = rt.block_on(amqp_drain(&format!("{}.dead-letter", queues[0])));
    assert_eq!(dead.len(), 1, "the broker keeps the refused message in the dead-letter queue");
    assert!(dead[0].0["x-centralflow-reason"].contains("no usable time"), "{:?}", dead[0].0);
    rt.block_on(async {
        for q in &queues {
            amqp_delete(q).await;
        }
    });
}

#[test]
fn transformed_exports_from_the_webhook() {
    const TOKEN: &str = "transformed-export-token";
    let dir = tempfile::tempdir().unwrap();
    let msgs = messages();
    let ports: Vec<u16> =
        (0..3).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()).collect();
    let src = |port: u16, extra: &str| {
        format!(
            "    type: webhook\n    address: 127.0.0.1:{port}\n    token: ${{TOKEN}}\n    format: json\n    linger: 5ms\n{extra}"
        )
    };
    let out = dir.path().join("out");
    let yaml = pipeline_yaml(
        &src(ports[0], "    time: enqueuedTime\n"),
        &src(ports[1], "    time: EnqueuedTime\n    device_id: Device\n"),
        &src(ports[2], "    time: Timestamp\n"),
        &out,
        "checkpoint:\n  interval: 100ms\n",
    );
    let p = pipeline(dir.path(), "p.yaml", &yaml);
    let mut child = cmd(&["run", p.to_str().unwrap()])
        .env("TOKEN", TOKEN)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    for port in &ports {
        let end = Instant::now() + T;
        while std::net::TcpStream::connect(("127.0.0.1", *port)).is_err() {
            assert!(child.try_wait().unwrap().is_none() && Instant::now() < end, "the webhook did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let client = reqwest::Client::builder().no_proxy().timeout(T).build().unwrap();
    let post = |port: u16, body: String| {
        let client = client.clone();
        async move {
            let r = client
                .post(format!("http://127.0.0.1:{port}/"))
                .header("authorization", TOKEN)
                .body(body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // a minute of each shape a request, in time order
        for chunk in msgs.chunks(6) {
            let flat = Value::Array(chunk.iter().map(flattened_with_time).collect()).to_string();
            let rows = Value::Array(chunk.iter().flat_map(rows).collect()).to_string();
            let custom = Value::Array(chunk.iter().map(custom).collect()).to_string();
            for (port, body) in [(ports[0], flat), (ports[1], rows), (ports[2], custom)] {
                let (status, text) = post(port, body).await;
                assert_eq!(status, 200, "{text}");
            }
        }
        // IoT Central's flattened example has no time, and the webhook gives none
        let (status, text) = post(ports[0], flattened(&msgs[0]).to_string()).await;
        assert_eq!(status, 400, "{text}");
        assert!(text.contains("no usable time"), "{text}");
    });
    signal(&child, libc::SIGTERM);
    ok(&wait_output(child, T));
    check_output(&out);
    let rejected = rejected(&out);
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert!(rejected[0].1.contains("no usable time: the record has no `enqueuedTime`"), "{rejected:?}");
}
