//! The IoT Central emulator as a program: the device side of an IoT Central application, DPS
//! registration (enrollment group with a SAS key) and IoT Hub telemetry over HTTP (see
//! `centralflow_emulators::iotcentral`). Prints the settings for the `central` sink and every
//! telemetry message it receives; runs until Ctrl-C or SIGTERM.
//!
//!   cargo run --release --example iotcentral-emulator -- --address 127.0.0.1:5675
//!
//! Then, for example:
//!   IOTC_ID_SCOPE=... IOTC_GROUP_KEY=... CENTRALFLOW_DPS_ENDPOINT=http://127.0.0.1:5675 \
//!   CENTRALFLOW_INPUT=pipelines/testdata centralflow replay pipelines/window-to-central.yaml

use std::net::SocketAddr;
use std::time::Duration;

use centralflow_emulators::iotcentral::IotcEmulator;
use clap::Parser;

#[derive(Parser)]
#[command(
    about = "IoT Central device-side emulator (DPS + IoT Hub over plain HTTP) for trying pipelines without Azure"
)]
struct Args {
    /// Address DPS listens on (the hubs take free ports on the same IP)
    #[arg(long, default_value = "127.0.0.1:5675")]
    address: SocketAddr,
    /// The application's ID scope
    #[arg(long, default_value = "0ne00EMULATE")]
    id_scope: String,
    /// The enrollment group's SAS key, base64 (devices' keys derive from it)
    #[arg(long, default_value = "Y2VudHJhbGZsb3ctaW90Y2VudHJhbC1lbXVsYXRvci1ncm91cC1rZXk=")]
    group_key: String,
    /// Number of IoT Hubs devices are spread over
    #[arg(long, default_value_t = 1)]
    hubs: usize,
    /// Print only a count of received messages, not each message
    #[arg(long)]
    quiet: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let args = Args::parse();
    let emu = IotcEmulator::start_on(args.address, &args.id_scope, &args.group_key, args.hubs)?;
    println!("IoT Central emulator: DPS on {}, hubs {}", emu.dps_endpoint(), emu.hub_names().join(", "));
    println!();
    println!("For the central sink (pipelines/window-to-central.yaml, compute-after-export.yaml, device-bridge.yaml):");
    println!(
        "  IOTC_ID_SCOPE={} IOTC_GROUP_KEY={} CENTRALFLOW_DPS_ENDPOINT={}",
        emu.id_scope(),
        args.group_key,
        emu.dps_endpoint()
    );
    println!();
    println!("Ctrl-C to stop.");
    let stop = centralflow_emulators::stopped();
    tokio::pin!(stop);
    let mut shown = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {
                let messages = emu.messages();
                if messages.len() > shown {
                    if args.quiet {
                        println!("{} messages received", messages.len());
                    } else {
                        for m in &messages[shown..] {
                            println!("{} via {}: {}", m.device_id, m.hub, String::from_utf8_lossy(&m.body));
                        }
                    }
                    shown = messages.len();
                }
            }
        }
    }
    Ok(())
}
