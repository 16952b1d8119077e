//! The Service Bus emulator as a program: queues, topics with subscriptions, peek-lock, dead-letter
//! queues, CBS with SAS tokens (see `centralflow_emulators::servicebus`). Prints the connection
//! string and runs until Ctrl-C or SIGTERM.
//!
//!   cargo run --release --example servicebus-emulator -- --address 127.0.0.1:5673 \
//!       --queue telemetry --topic exports/centralflow --lock-duration 30s \
//!       --send telemetry=export.jsonl        # optional: messages to start with, one a line
//!
//! Any AMQP 1.0 Service Bus client connects with the printed
//! `Endpoint=sb://127.0.0.1:PORT;...;UseDevelopmentEmulator=true` connection string: centralflow's
//! `servicebus` source, Microsoft's SDKs (e.g. PyPI `azure-servicebus`).

use std::net::SocketAddr;
use std::time::Duration;

use centralflow_emulators::servicebus::{Config, Emulator, Message};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Azure Service Bus emulator (AMQP 1.0, plain TCP) for trying pipelines without Azure")]
struct Args {
    /// Address to listen on (5672 is RabbitMQ's on many machines, hence 5673)
    #[arg(long, default_value = "127.0.0.1:5673")]
    address: SocketAddr,
    /// A queue (repeat for more)
    #[arg(long = "queue", value_name = "NAME")]
    queues: Vec<String>,
    /// A topic subscription, TOPIC/SUBSCRIPTION (repeat for more)
    #[arg(long = "topic", value_name = "TOPIC/SUBSCRIPTION")]
    topics: Vec<String>,
    /// How long a peek-lock receiver holds a message before it goes back to the queue
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    lock_duration: Duration,
    /// Deliveries after which a message is dead-lettered
    #[arg(long, default_value_t = 10)]
    max_delivery_count: u32,
    /// The SAS key tokens must be signed with (the default is printed in the connection string)
    #[arg(long)]
    key: Option<String>,
    /// Enqueue each line of FILE as one message to ENTITY (a queue or topic) at start, e.g. the
    /// output of `centralflow simulate` (repeatable)
    #[arg(long, value_name = "ENTITY=FILE")]
    send: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let args = Args::parse();
    anyhow::ensure!(!args.queues.is_empty() || !args.topics.is_empty(), "give at least one --queue or --topic");
    let mut cfg = Config::new().lock_duration(args.lock_duration).max_delivery_count(args.max_delivery_count);
    if let Some(key) = args.key {
        cfg = cfg.key(key);
    }
    for q in &args.queues {
        cfg = cfg.queue(q);
    }
    for t in &args.topics {
        let (topic, sub) =
            t.split_once('/').ok_or_else(|| anyhow::anyhow!("--topic {t:?}: write TOPIC/SUBSCRIPTION"))?;
        cfg = cfg.topic(topic, sub);
    }
    let emu = Emulator::start_on(args.address, cfg).await?;
    for s in &args.send {
        let (entity, file) = s.split_once('=').ok_or_else(|| anyhow::anyhow!("--send {s:?}: write ENTITY=FILE"))?;
        let text = std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
        let mut n = 0;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            emu.send(entity, Message::text(line))?;
            n += 1;
        }
        println!("sent {n} messages from {file} to {entity}");
    }
    println!("Service Bus emulator listening on {}", emu.addr());
    for q in &args.queues {
        println!("  queue {q}");
    }
    for t in &args.topics {
        println!("  topic subscription {t}");
    }
    println!(
        "lock duration {}, max delivery count {}",
        humantime::format_duration(args.lock_duration),
        args.max_delivery_count
    );
    println!();
    println!("SERVICEBUS_CONNECTION_STRING='{}'", emu.connection_string());
    println!();
    println!("Ctrl-C to stop.");
    centralflow_emulators::stopped().await;
    emu.shutdown();
    Ok(())
}
