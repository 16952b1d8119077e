//! Emulators of the Azure services centralflow reads from and writes to, as a library that the
//! tests use in-process and that the examples (`examples/*-emulator.rs` in the main crate) run as
//! programs, so that anyone can try a pipeline without an Azure account and point any client
//! (centralflow, Microsoft's SDKs) at them.
//!
//! * [`eventhubs`]: Event Hubs over AMQP 1.0 (CBS, `$management`, partition receivers and senders).
//! * [`servicebus`]: Service Bus over AMQP 1.0 (queues, topics and subscriptions, peek-lock,
//!   dead-letter sub-queues, `$management` lock renewal and settlement).
//! * [`iotcentral`]: IoT Central's device side (DPS registration and IoT Hub telemetry over HTTP).
//!
//! Everything listens on loopback in plain TCP (no TLS); clients reach them with
//! `UseDevelopmentEmulator=true` connection strings.

pub mod eventhubs;
pub mod iotcentral;
pub mod servicebus;

mod pad;

/// Waits for Ctrl-C or SIGTERM: how the emulator programs (the examples) run until stopped.
pub async fn stopped() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
