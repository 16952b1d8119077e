//! IoT Hub's MQTT device API, for component telemetry (`$.sub`), which HTTPS cannot express.
//!
//! Per device: client id = device id, user name `{hub}/{deviceId}/?api-version=2021-04-12`
//! (plus `&model-id=` when a model id is set), password = a device SAS token for
//! `{hub}/devices/{deviceId}`; TLS on port 8883 (plain TCP only when DPS is an `http://` loopback
//! emulator). Messages are published with QoS 1 to
//! `devices/{deviceId}/messages/events/{property bag}`, the bag holding `$.mid`, `$.ct`, `$.ce`,
//! `$.sub` (the component), `iothub-creation-time-utc` and the application properties, URL-encoded.
//! A message counts as sent on its PUBACK. The connection is opened for a batch of one device's
//! messages and closed after it (IoT Hub allows one connection per device).

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Outgoing, Packet, QoS};

use super::engine::{OutMsg, Shared};
use super::hub::{SendOutcome, HUB_API_VERSION};
use super::sas::{enc, hub_resource, unix_now};

/// The MQTT user name of a device.
pub fn username(hub: &str, device: &str, model: Option<&str>) -> String {
    let mut u = format!("{hub}/{device}/?api-version={HUB_API_VERSION}");
    if let Some(m) = model {
        u.push_str("&model-id=");
        u.push_str(&enc(m));
    }
    u
}

/// The topic a message is published to, with its property bag.
pub fn topic(m: &OutMsg) -> String {
    let mut bag: Vec<(&str, String)> =
        vec![("$.mid", enc(&m.id)), ("$.ct", enc("application/json")), ("$.ce", enc("utf-8"))];
    if let Some(c) = &m.component {
        bag.push(("$.sub", enc(c)));
    }
    if let Some(t) = &m.created {
        bag.push(("iothub-creation-time-utc", enc(t)));
    }
    for (k, v) in &m.props {
        bag.push((k.as_str(), enc(v)));
    }
    let bag: Vec<String> = bag.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("devices/{}/messages/events/{}", m.device, bag.join("&"))
}

/// TLS for the hub: the web PKI roots plus an extra CA.
pub(crate) fn tls_config(extra_ca_pem: Option<&[u8]>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(pem) = extra_ca_pem {
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| anyhow::anyhow!("the CA file is not PEM: {e}"))?;
            roots.add(cert).map_err(|e| anyhow::anyhow!("the CA certificate is not usable: {e}"))?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// The host part of a hub name (`name.azure-devices.net`, or `127.0.0.1` of `127.0.0.1:PORT`).
fn host_of(hub: &str) -> &str {
    match hub.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) && !h.contains(':') => h,
        _ => hub,
    }
}

pub(super) async fn send(sh: &Shared, hub: &str, device: &str, msgs: &[OutMsg]) -> SendOutcome {
    let model = msgs.first().and_then(|m| m.model.as_deref());
    let password = sh.set.group.device_key(device).token(&hub_resource(hub, device), unix_now() + 3600, None);
    let mut opts = MqttOptions::new(device, host_of(hub), sh.set.mqtt_port);
    opts.set_credentials(username(hub, device, model), password);
    opts.set_keep_alive(Duration::from_secs(60));
    opts.set_clean_session(true);
    opts.set_max_packet_size(300 * 1024, 300 * 1024);
    if let Some(tls) = &sh.set.mqtt_tls {
        opts.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Rustls(tls.clone())));
    }
    let (client, mut events) = AsyncClient::new(opts, msgs.len() + 2);
    for m in msgs {
        if let Err(e) = client.try_publish(topic(m), QoS::AtLeastOnce, false, m.body.clone()) {
            return SendOutcome::Bad(format!("cannot publish: {e}"));
        }
    }
    let mut acked = vec![false; msgs.len()];
    // packet id of each publish, in order
    let mut pkids: Vec<u16> = Vec::with_capacity(msgs.len());
    let mut done = 0;
    let deadline = tokio::time::Instant::now() + sh.set.request_timeout;
    let problem = loop {
        let ev = match tokio::time::timeout_at(deadline, events.poll()).await {
            Err(_) => break SendOutcome::Retry(None, format!("MQTT to {hub}: no acknowledgement in time")),
            Ok(Err(ConnectionError::ConnectionRefused(code))) => {
                let what = format!("MQTT connection to {hub} refused: {code:?}");
                break match code {
                    ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized => {
                        SendOutcome::Reauth(what)
                    }
                    _ => SendOutcome::Retry(None, what),
                };
            }
            Ok(Err(e)) => break SendOutcome::Retry(None, format!("MQTT to {hub}: {e}")),
            Ok(Ok(ev)) => ev,
        };
        match ev {
            Event::Outgoing(Outgoing::Publish(pkid)) => pkids.push(pkid),
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some(i) = pkids.iter().position(|p| *p == ack.pkid) {
                    if !acked[i] {
                        acked[i] = true;
                        done += 1;
                    }
                }
                if done == msgs.len() {
                    let _ = client.try_disconnect();
                    // let the DISCONNECT go out
                    let _ = tokio::time::timeout(Duration::from_millis(200), async {
                        while let Ok(ev) = events.poll().await {
                            if matches!(ev, Event::Outgoing(Outgoing::Disconnect)) {
                                break;
                            }
                        }
                    })
                    .await;
                    return SendOutcome::Sent;
                }
            }
            _ => {}
        }
    };
    if done == 0 {
        problem
    } else {
        SendOutcome::Partial(acked, Box::new(problem))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(component: Option<&str>) -> OutMsg {
        OutMsg {
            device: "pump-7".into(),
            model: Some("dtmi:com:example:Pump;1".into()),
            component: component.map(str::to_string),
            created: Some("2026-11-01T00:05:00.000Z".into()),
            props: vec![("computed".into(), "true".into())],
            body: br#"{"flow":3.5}"#.to_vec(),
            id: "0123abcd".into(),
        }
    }

    #[test]
    fn user_name_names_hub_device_api_version_and_model() {
        assert_eq!(username("h.azure-devices.net", "d1", None), "h.azure-devices.net/d1/?api-version=2021-04-12");
        assert_eq!(
            username("h.azure-devices.net", "d1", Some("dtmi:com:example:Pump;1")),
            "h.azure-devices.net/d1/?api-version=2021-04-12&model-id=dtmi%3Acom%3Aexample%3APump%3B1"
        );
    }

    #[test]
    fn the_property_bag_names_the_component() {
        assert_eq!(
            topic(&msg(Some("sensor 1"))),
            "devices/pump-7/messages/events/$.mid=0123abcd&$.ct=application%2Fjson&$.ce=utf-8&$.sub=sensor%201&iothub-creation-time-utc=2026-11-01T00%3A05%3A00.000Z&computed=true"
        );
        assert!(!topic(&msg(None)).contains("$.sub"));
    }

    #[test]
    fn the_password_is_a_device_sas_token_for_the_hub() {
        let g = super::super::sas::GroupKey::parse("a2V5a2V5a2V5").unwrap();
        let t = g.device_key("pump-7").token(&hub_resource("h.azure-devices.net", "pump-7"), 1_800_000_000, None);
        assert!(t.starts_with("SharedAccessSignature sr=h.azure-devices.net%2Fdevices%2Fpump-7&sig="), "{t}");
        assert!(t.ends_with("&se=1800000000"), "{t}");
    }

    #[test]
    fn hosts_of_hub_names() {
        assert_eq!(host_of("h.azure-devices.net"), "h.azure-devices.net");
        assert_eq!(host_of("127.0.0.1:4000"), "127.0.0.1");
    }
}
