//! The Event Hubs emulator as a program: one event hub with N partitions over AMQP 1.0 (see
//! `centralflow_emulators::eventhubs`). Prints the connection strings and runs until Ctrl-C or
//! SIGTERM. Clients publish to it and read from it; events live in memory.
//!
//!   cargo run --release --example eventhubs-emulator -- --address 127.0.0.1:5674 --hub telemetry --partitions 4 \
//!       --send export.jsonl                  # optional: events to start with, one a line

use std::net::SocketAddr;

use centralflow_emulators::eventhubs::{Emulator, EmulatorConfig, EmulatorEvent};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Azure Event Hubs emulator (AMQP 1.0, plain TCP) for trying pipelines without Azure")]
struct Args {
    /// Address to listen on (5672 is RabbitMQ's on many machines, hence 5674)
    #[arg(long, default_value = "127.0.0.1:5674")]
    address: SocketAddr,
    /// The event hub's name
    #[arg(long, default_value = "telemetry")]
    hub: String,
    /// Number of partitions (ids 0..N-1)
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// Append each line of FILE as one event at start, e.g. the output of `centralflow simulate`;
    /// a line's `deviceId` picks its partition, as IoT Central's export does (repeatable)
    #[arg(long, value_name = "FILE")]
    send: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let args = Args::parse();
    let emu = Emulator::start_on(args.address, EmulatorConfig::new(&args.hub, args.partitions)).await?;
    for file in &args.send {
        let text = std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
        let mut n = 0;
        for (i, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
            let device = serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("deviceId").and_then(|d| d.as_str()).map(str::to_string));
            let partition = match &device {
                Some(d) => {
                    d.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
                }
                None => i as u64,
            } % args.partitions as u64;
            let event = EmulatorEvent {
                body: line.as_bytes().to_vec(),
                annotations: device.map(|d| vec![("iotcentral-device-id".to_string(), d)]).unwrap_or_default(),
                content_type: Some("application/json".into()),
                ..Default::default()
            };
            emu.append_event(partition as u32, event);
            n += 1;
        }
        println!("appended {n} events from {file}");
    }
    println!(
        "Event Hubs emulator listening on {}: hub {}, {} partitions",
        emu.local_addr(),
        emu.hub(),
        args.partitions
    );
    println!();
    println!("For centralflow (pipelines/eventhubs-to-parquet.yaml):");
    println!("  EVENTHUBS_CONNECTION_STRING='{}' EVENTHUBS_ENDPOINT={}", emu.connection_string(), emu.endpoint());
    println!("For Microsoft's SDKs (UseDevelopmentEmulator):");
    println!("  {}", emu.development_connection_string());
    println!();
    println!("Ctrl-C to stop.");
    centralflow_emulators::stopped().await;
    emu.shutdown().await;
    Ok(())
}
