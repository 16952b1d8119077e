//! Sources: where events come from. One module per `type`; add a new one by writing its
//! module (config struct implementing [`Spec`](crate::config::Spec), a
//! [`Source`](crate::runtime::Source)), one line in the enum below and one arm in [`build`].

pub mod amqp;
pub mod eventhubs;
pub mod files;
pub mod message;
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
    }
}

/// Builds a source from its configuration.
pub async fn build(cfg: &SourceConfig, cx: &BuildCx<'_>) -> anyhow::Result<Box<dyn Source>> {
    Ok(match cfg {
        SourceConfig::Files(c) => Box::new(files::FilesSource::new(c.clone(), cx)?),
        SourceConfig::Amqp(c) => Box::new(amqp::AmqpSource::new(c.clone(), cx)?),
        SourceConfig::EventHubs(c) => Box::new(eventhubs::EventHubsSource::new(c.clone(), cx)?),
        SourceConfig::Simulator(c) => Box::new(simulator::SimulatorSource::new(c.clone(), cx)?),
        SourceConfig::Webhook(c) => Box::new(webhook::WebhookSource::new(c.clone(), cx)?),
    })
}

/// How one raw record given to a source in a pipeline test (`centralflow test`) becomes events:
/// exactly as the source decodes what it receives (`received`: the arrival time, for sources
/// that stamp one). Each `Err` is a reason for the source's `dead_letter` output.
pub fn decode_test_record(
    cfg: &SourceConfig,
    raw: bytes::Bytes,
    received: crate::event::Nanos,
    projection: Option<&std::sync::Arc<crate::projection::Projection>>,
) -> Vec<Result<crate::event::Event, String>> {
    let record = match cfg {
        SourceConfig::Webhook(c) => match webhook::record_of(c.format, &raw, received) {
            Ok(r) => r,
            Err(reason) => return vec![Err(reason)],
        },
        SourceConfig::Files(_) | SourceConfig::Amqp(_) | SourceConfig::Simulator(_) | SourceConfig::EventHubs(_) => raw,
    };
    let mut out = Vec::with_capacity(1);
    crate::model::decode::decode_record_projected(record, projection, &mut out);
    out
}
