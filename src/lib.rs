//! centralflow: a stream processor for Azure IoT Central's continuous data export.
//!
//! See ARCHITECTURE.md for the bird's-eye view. In short: [`config`] turns a pipeline YAML into a
//! validated [`config::Plan`]; [`assemble`] builds its components and wires them into a
//! [`runtime::Graph`]; [`runtime`] runs that as one task per component connected by bounded
//! channels of [`event::Batch`]es, with barrier checkpoints driven by a state machine;
//! [`sources`], [`transforms`] and [`sinks`] are the components; [`model`] decodes IoT Central
//! export messages, keeping the fields of a [`projection`]; [`rows`] turns rows into Arrow columns.

pub mod api;
pub mod assemble;
pub mod cli;
pub mod config;
pub mod diagram;
pub mod event;
pub mod expr;
pub mod metrics;
pub mod model;
pub mod path;
pub mod projection;
pub mod rows;
pub mod runtime;
pub mod secret;
pub mod sinks;
pub mod sources;
pub mod storage;
pub mod testing;
pub mod time;
pub mod top;
pub mod transforms;

/// Makes aws-lc-rs rustls's process-wide crypto provider (idempotent). rustls is built with two,
/// aws-lc-rs (ours, reqwest 0.13) and ring (object_store 0.13's reqwest 0.12), and with two it
/// cannot pick the default itself: a library that builds its TLS configuration from the default
/// (azure_core_amqp's platform verifier under the Event Hubs source) would fail to connect.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
