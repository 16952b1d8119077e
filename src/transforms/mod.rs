//! Transforms: synchronous stages between sources and sinks. Add a new one by writing its
//! module (a config implementing [`Spec`](crate::config::Spec) and a
//! [`Transform`](crate::runtime::Transform)), one line in the enum below and one arm in [`build`].
//! [`dew_point`] is the example of a compiled-in Rust stage.

pub mod device_context;
pub mod dew_point;
pub mod filter;
pub mod jq;
pub mod map;
pub(crate) mod watermark;
pub mod window;

use crate::event::Event;
use crate::runtime::{BuildCx, Transform};

crate::component_enum! {
    /// A transform: `type` selects the kind.
    TransformConfig {
        Filter("filter", filter::FilterConfig),
        Map("map", map::MapConfig),
        DewPoint("dew_point", dew_point::DewPointConfig),
        Window("window", window::WindowConfig),
        DeviceContext("device_context", device_context::DeviceContextConfig),
        Jq("jq", jq::JqConfig),
    }
}

/// Builds a transform from its configuration.
pub fn build(cfg: &TransformConfig, cx: &BuildCx<'_>) -> anyhow::Result<Box<dyn Transform>> {
    Ok(match cfg {
        TransformConfig::Filter(c) => Box::new(filter::Filter::new(c, cx)?),
        TransformConfig::Map(c) => Box::new(map::Map::new(c, cx)?),
        TransformConfig::DewPoint(c) => Box::new(dew_point::DewPoint::new(c, cx)?),
        TransformConfig::Window(c) => Box::new(window::Window::new(c, cx)?),
        TransformConfig::DeviceContext(c) => Box::new(device_context::DeviceContext::new(c, cx)?),
        TransformConfig::Jq(c) => Box::new(jq::Jq::new(c, cx)?),
    })
}

/// A dead-letter record for an event a transform could not process.
pub(crate) fn dead_letter_of(ev: &Event, reason: &str, component: &str) -> Event {
    let origin = match &ev.meta.origin {
        Some(o) => format!("{o}:{}", ev.meta.offset),
        None => format!("partition {} offset {}", ev.meta.partition, ev.meta.offset),
    };
    let mut dl = Event::dead_letter(bytes::Bytes::from(ev.to_json()), reason, &origin, component);
    dl.meta = ev.meta.clone();
    dl
}

/// Batches at least this large are evaluated on the rayon pool.
/// Batches at least this large are processed on the rayon pool, on machines with more than two
/// cores. On two cores the pipeline's stages (decoding, transforms, sinks) already keep both
/// busy, and splitting a transform's batch only adds hand-offs (measured on W1: 1.95 CPU s with
/// parallel transforms against 1.75 without).
pub(crate) static PARALLEL_BATCH: std::sync::LazyLock<usize> = std::sync::LazyLock::new(|| {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    if cores > 2 {
        1024
    } else {
        usize::MAX
    }
});
