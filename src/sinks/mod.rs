//! Sinks: where results go. Add a new one by writing its module (a config implementing
//! [`Spec`](crate::config::Spec) and a [`Sink`](crate::runtime::Sink)), one line in the enum
//! below and one arm in [`build`].

pub mod central;
pub mod console;
pub mod delta;
pub mod jsonl;
pub mod parquet;

use crate::runtime::{BuildCx, Sink};

crate::component_enum! {
    /// A sink: `type` selects the kind.
    SinkConfig {
        Parquet("parquet", Box<parquet::ParquetConfig>),
        Delta("delta", Box<delta::DeltaConfig>),
        Console("console", console::ConsoleConfig),
        Jsonl("jsonl", jsonl::JsonlConfig),
        Central("central", Box<central::CentralConfig>),
    }
}

/// Builds a sink from its configuration.
pub async fn build(cfg: &SinkConfig, cx: &BuildCx<'_>) -> anyhow::Result<Box<dyn Sink>> {
    Ok(match cfg {
        SinkConfig::Parquet(c) => Box::new(parquet::ParquetSink::new((**c).clone(), cx).await?),
        SinkConfig::Delta(c) => Box::new(delta::DeltaSink::new((**c).clone(), cx).await?),
        SinkConfig::Console(c) => Box::new(console::ConsoleSink::new(c.clone(), cx)),
        SinkConfig::Jsonl(c) => Box::new(jsonl::JsonlSink::new(c.clone(), cx)?),
        SinkConfig::Central(c) => Box::new(central::CentralSink::new((**c).clone(), cx).await?),
    })
}
