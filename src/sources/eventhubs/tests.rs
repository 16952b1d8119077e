use crate::config::load_str;

fn env(name: &str) -> Option<String> {
    match name {
        "CS" => Some(
            "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=listen;SharedAccessKey=a2V5LWZvci10ZXN0cw==;EntityPath=hub"
                .into(),
        ),
        "CS_NO_HUB" => {
            Some("Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=listen;SharedAccessKey=a2V5".into())
        }
        "SECRET" => Some("client-secret-value".into()),
        "EMPTY" => Some(String::new()),
        _ => None,
    }
}

fn pipeline(source: &str) -> String {
    format!("sources:\n  hub:\n    type: eventhubs\n{source}sinks:\n  out:\n    type: console\n    inputs: [hub]\n")
}

/// Errors of a source configuration (indented by four spaces), or `[]` when it is valid.
fn check(source: &str) -> Vec<String> {
    match load_str(&pipeline(source), "t", &env) {
        Ok(plan) => {
            assert!(plan.nodes.iter().any(|n| n.kind == "eventhubs"));
            vec![]
        }
        Err(e) => e.iter().map(|e| e.to_string()).collect(),
    }
}

#[test]
fn valid_configurations() {
    assert_eq!(check("    connection_string: ${CS}\n"), Vec::<String>::new());
    assert_eq!(
        check(
            "    connection_string: ${CS}\n    consumer_group: archive\n    start: {enqueued_time: 2026-11-01T00:00:00Z}\n    checkpoint_store: az://state/eh\n    endpoint: ${EMPTY:-}\n    balance_interval: 2s\n    ownership_expiry: 10s\n"
        ),
        Vec::<String>::new()
    );
    assert_eq!(
        check("    namespace: ns.servicebus.windows.net\n    event_hub: hub\n    credential: {kind: managed_identity}\n    start: latest\n"),
        Vec::<String>::new()
    );
    assert_eq!(
        check("    namespace: ns.servicebus.windows.net\n    event_hub: hub\n    credential:\n      kind: client_secret\n      tenant_id: t\n      client_id: c\n      client_secret: ${SECRET}\n"),
        Vec::<String>::new()
    );
    assert_eq!(
        check("    connection_string: ${CS_NO_HUB}\n    event_hub: hub\n    start: {sequence_number: 12}\n    endpoint: amqp://127.0.0.1:5672\n"),
        Vec::<String>::new()
    );
}

#[test]
fn every_mistake_is_reported() {
    let e = check(
        "    connection_string: ${CS}\n    event_hub: other\n    prefetch: 0\n    start: {enqueued_time: yesterday}\n    balance_interval: 10s\n    ownership_expiry: 15s\n    endpoint: http://x\n    checkpoint_store: ftp://x\n",
    );
    let joined = e.join("\n");
    assert!(
        joined.contains("sources.hub.event_hub: `event_hub` is \"other\" but the connection string names \"hub\""),
        "{joined}"
    );
    assert!(joined.contains("sources.hub.prefetch: must be at least 1"), "{joined}");
    assert!(joined.contains("sources.hub.start.enqueued_time: \"yesterday\" is not an RFC 3339 timestamp"), "{joined}");
    assert!(
        joined.contains("sources.hub.ownership_expiry: must be at least twice `balance_interval` (20s)"),
        "{joined}"
    );
    assert!(joined.contains("sources.hub.endpoint: must be an amqp://"), "{joined}");
    assert!(joined.contains("sources.hub.checkpoint_store: unsupported storage scheme"), "{joined}");
    assert_eq!(e.len(), 6, "{joined}");
}

#[test]
fn credentials_and_secrets() {
    let e = check("    connection_string: Endpoint=sb://ns/;SharedAccessKeyName=a;SharedAccessKey=b;EntityPath=h\n");
    assert!(e.iter().any(|e| e.contains("must come from the environment")), "{e:?}");
    assert!(e.iter().all(|e| !e.contains("SharedAccessKey=b")), "the literal is not printed: {e:?}");
    let e = check("    event_hub: hub\n");
    assert!(e.iter().any(|e| e.contains("needs `connection_string` or `credential`")), "{e:?}");
    let e = check("    event_hub: hub\n    credential: {kind: azure_cli}\n");
    assert!(e.iter().any(|e| e.contains("sources.hub.namespace: `namespace` is required with a credential")), "{e:?}");
    let e = check("    connection_string: ${CS}\n    credential: {kind: workload_identity}\n");
    assert!(e.iter().any(|e| e.contains("not both")), "{e:?}");
    let e = check("    namespace: ns.servicebus.windows.net\n    event_hub: h\n    credential: {kind: client_secret, tenant_id: t, client_id: c, client_secret: plain}\n");
    assert!(e.iter().any(|e| e.contains("credential.client_secret: is a secret")), "{e:?}");
    let e = check("    namespace: ns.servicebus.windows.net\n    event_hub: h\n    credential: {kind: certificate}\n");
    assert!(!e.is_empty());
    let e = check("    connection_string: ${CS_NO_HUB}\n");
    assert!(e.iter().any(|e| e.contains("`event_hub` is required")), "{e:?}");
}

#[test]
fn transforms_downstream_keep_state_per_partition() {
    let text = "sources:\n  hub:\n    type: eventhubs\n    connection_string: ${CS}\ntransforms:\n  t:\n    type: filter\n    inputs: [hub]\n    condition: messageSource == \"telemetry\"\nsinks:\n  out:\n    type: console\n    inputs: [t]\n";
    let plan = load_str(text, "t", &env).unwrap();
    let t = plan.nodes.iter().find(|n| n.name == "t").unwrap();
    assert!(t.partitioned);
}
