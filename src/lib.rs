//! centralflow: a stream processor for Azure IoT Central's continuous data export.
//!
//! See ARCHITECTURE.md for the bird's-eye view. In short: [`config`] turns a pipeline YAML into a
//! validated [`config::Plan`]; [`runtime`] runs it as one task per component connected by
//! bounded channels of [`event::Batch`]es, with barrier checkpoints; [`sources`], [`transforms`]
//! and [`sinks`] are the components; [`model`] decodes IoT Central export messages.

pub mod api;
pub mod cli;
pub mod config;
pub mod event;
pub mod expr;
pub mod metrics;
pub mod model;
pub mod path;
pub mod runtime;
pub mod secret;
pub mod sinks;
pub mod sources;
pub mod storage;
pub mod time;
pub mod transforms;
