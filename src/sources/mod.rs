//! Sources: where events come from. One module per `type`; add a new one by writing its
//! module (config struct implementing [`Spec`](crate::config::Spec), a
//! [`Source`](crate::runtime::Source)), one line in the enum below and one arm in [`build`].

pub mod amqp;
pub mod eventhubs;
pub mod files;
pub mod message;
pub mod servicebus;
pub mod simulator;
pub mod webhook;

use crate::runtime::{BuildCx, Source};

crate::component_enum! {
    /// A source: `type` selects the kind.
    SourceConfig {
        Files("files", files::FilesConfig),
        Amqp("amqp", amqp::AmqpConfig),
        Simulator("simulator", simulator::SimulatorConfig),
        Webhook("webhook", webhook::WebhookConfig),
        EventHubs("eventhubs", eventhubs::EventHubsConfig),
        ServiceBus("servicebus", servicebus::ServiceBusConfig),
    }
}

/// Builds a source from its configuration.
pub async fn build(cfg: &SourceConfig, cx: &BuildCx<'_>) -> anyhow::Result<Box<dyn Source>> {
    Ok(match cfg {
        SourceConfig::Files(c) => Box::new(files::FilesSource::new(c.clone(), cx)?),
        SourceConfig::Amqp(c) => Box::new(amqp::AmqpSource::new(c.clone(), cx)?),
        SourceConfig::EventHubs(c) => Box::new(eventhubs::EventHubsSource::new(c.clone(), cx)?),
        SourceConfig::ServiceBus(c) => Box::new(servicebus::ServiceBusSource::new(c.clone(), cx)?),
        SourceConfig::Simulator(c) => Box::new(simulator::SimulatorSource::new(c.clone(), cx)?),
        SourceConfig::Webhook(c) => Box::new(webhook::WebhookSource::new(c.clone(), cx)?),
    })
}

/// How one raw record given to a source in a pipeline test (`centralflow test`) becomes events:
/// exactly as the source decodes what it receives, by its `format:` (`received`: the arrival
/// time, for sources that stamp one; `attributes`: the record's metadata, whose
/// `iotcentral-device-id` names the device of a record of any shape). Each `Err` is a reason for
/// the source's `dead_letter` output.
pub fn decode_test_record(
    cfg: &SourceConfig,
    raw: bytes::Bytes,
    received: crate::event::Nanos,
    attributes: &[(crate::event::AttrKey, String)],
    projection: Option<&std::sync::Arc<crate::projection::Projection>>,
) -> Vec<Result<crate::event::Event, String>> {
    use crate::model::generic::Transport;
    let device_id = message::transport_device(attributes);
    let (decoder, record, transport) = match cfg {
        SourceConfig::Webhook(c) => match webhook::record_of(c.format, &raw, received) {
            Ok(r) => (webhook::decoder(c), r, Transport::NONE),
            Err(reason) => return vec![Err(reason)],
        },
        SourceConfig::Files(c) => {
            (message::decoder(c.format, c.time.as_deref(), c.device_id.as_deref()), raw, Transport::NONE)
        }
        // brokers stamp what they deliver: `received` stands for that time
        SourceConfig::Amqp(c) => (
            message::decoder(c.format, c.time.as_deref(), c.device_id.as_deref()),
            raw,
            Transport { enqueued: received, device_id },
        ),
        SourceConfig::EventHubs(c) => (
            message::decoder(c.format, c.time.as_deref(), c.device_id.as_deref()),
            raw,
            Transport { enqueued: received, device_id },
        ),
        SourceConfig::ServiceBus(c) => (
            message::decoder(c.format, c.time.as_deref(), c.device_id.as_deref()),
            raw,
            Transport { enqueued: received, device_id },
        ),
        SourceConfig::Simulator(_) => (Ok(Default::default()), raw, Transport::NONE),
    };
    match decoder {
        Ok(d) => d.decode(record, projection, &transport),
        Err(e) => vec![Err(format!("{e:#}"))],
    }
}
