//! Secrets never printed by `centralflow run`: an AMQP URL's password and an Event Hubs
//! connection string's key stay out of the log (text and JSON, at debug level, where client
//! libraries say the most), out of `/health/ready` (which gives the reason a source is not
//! ready, the broker's error included) and out of `/metrics`. Against RabbitMQ (a wrong
//! password: the broker refuses the login) and the in-repo Event Hubs emulator (connected).

mod common;

use std::time::Duration;

use common::eventhubs_emulator::EMULATOR_SAS_KEY;
use common::eventhubs_pipeline::Hub;
use common::*;

const W: Duration = Duration::from_secs(120);

fn secrets_pipeline(dir: &std::path::Path, queue: &str) -> std::path::PathBuf {
    pipeline(
        dir,
        "secrets.yaml",
        &format!(
            "name: secrets\nsources:\n  q:\n    type: amqp\n    url: ${{AMQP}}\n    queue: {queue}\n  hub:\n    type: eventhubs\n    connection_string: ${{EH}}\n    endpoint: ${{EH_ENDPOINT}}\n    checkpoint_store: {store}\n    start: earliest\nsinks:\n  out:\n    type: jsonl\n    inputs: [q, hub]\n    path: {out}\ncheckpoint:\n  url: {state}\n  interval: 1s\n",
            store = dir.join("store").display(),
            out = dir.join("out.jsonl").display(),
            state = dir.join("state").display()
        ),
    )
}

#[test]
fn an_amqp_password_and_an_event_hubs_key_are_never_printed() {
    let hub = Hub::new();
    let lines = hub.simulated(200, 3);
    hub.append(&lines);
    let password = format!("pw-never-printed-{}", unique("x"));
    // the same password percent-encoded in the URL (`%2D` for `-`) must not show decoded either
    let encoded = password.replace('-', "%2D");
    let url = format!("amqp://guest:{encoded}@127.0.0.1:5672/%2f");
    for format in ["text", "json"] {
        let dir = tempfile::tempdir().unwrap();
        let p = secrets_pipeline(dir.path(), &unique("cf-secrets-"));
        let mut c = cmd(&["run", "--log-format", format, p.to_str().unwrap()]);
        c.env("AMQP", &url)
            .env("EH", hub.emu.connection_string())
            .env("EH_ENDPOINT", hub.emu.endpoint())
            .env("CENTRALFLOW_LOG", "debug,lapin=trace,amq_protocol=trace,amq_protocol_uri=trace");
        let mut run = Logged::spawn(c);
        let api = run.api();
        // the Event Hubs source reads every event (it used its key) and the AMQP source has been
        // refused by the broker (its error is what /health/ready reports)
        wait_until("the Event Hubs events are written", W, || {
            common::count_lines(&dir.path().join("out.jsonl")) >= lines.len()
        });
        let mut ready = String::new();
        wait_until("/health/ready gives the broker's refusal", W, || {
            ready = http_get(&api, "/health/ready").map(|(_, b)| b).unwrap_or_default();
            ready.contains("\"q\"") && ready.contains("disconnected")
        });
        let metrics = http_get(&api, "/metrics").unwrap().1;
        assert!(metrics.contains("component=\"hub\""), "{metrics}");
        let log = run.stop(W);
        assert!(log.contains("cannot reach the broker"), "{format}: the refusal is logged:\n{log}");
        for (what, text) in [("log", &log), ("/health/ready", &ready), ("/metrics", &metrics)] {
            for secret in [password.as_str(), encoded.as_str(), EMULATOR_SAS_KEY] {
                assert!(!text.contains(secret), "{format}: {what} prints the secret {secret}:\n{text}");
            }
        }
    }
}
