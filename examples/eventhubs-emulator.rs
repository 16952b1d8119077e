//! The Event Hubs emulator as a program: one event hub with N partitions over AMQP 1.0 (see
//! `centralflow_emulators::eventhubs`). Prints the connection strings and runs until Ctrl-C or
//! SIGTERM. Clients publish to it and read from it; events live in memory.
//!
//!   cargo run --release --example eventhubs-emulator -- --address 127.0.0.1:5674 --hub telemetry --partitions 4

use std::net::SocketAddr;

use centralflow_emulators::eventhubs::{Emulator, EmulatorConfig};
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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let args = Args::parse();
    let emu = Emulator::start_on(args.address, EmulatorConfig::new(&args.hub, args.partitions)).await?;
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
