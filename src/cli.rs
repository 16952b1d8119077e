//! The command line: `run`, `replay`, `validate`, `test`, `graph`, `top`, `schema`, `simulate`.
//!
//! Exit codes: 0 success; 1 the pipeline failed while running; 2 the pipeline file (or the
//! command line) is invalid.

use std::io::{IsTerminal, Write as _};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{self, Plan};
use crate::metrics::{Progress, SharedProgress};
use crate::runtime::{Mode, RunOptions, RunSummary};

#[derive(Parser, Debug)]
#[command(
    name = "centralflow",
    version,
    about = "Stream processor for Azure IoT Central's continuous data export",
    long_about = "Runs pipelines (YAML) that read IoT Central export messages from Event Hubs, RabbitMQ, \
webhooks, archived files or a built-in simulator, compute on them (filters, derived fields, event-time \
windows) and write Parquet, post synthetic telemetry back to IoT Central, or print them.\n\n\
Secrets come from the environment: write ${VARIABLE} in the pipeline file."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "CENTRALFLOW_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Log filter (`info`, `debug`, `centralflow=debug,lapin=warn`, ...). RUST_LOG also works.
    #[arg(long, global = true, env = "CENTRALFLOW_LOG")]
    pub log: Option<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a pipeline as a service, until stopped (SIGINT/SIGTERM) or until its sources end.
    Run {
        /// The pipeline file.
        pipeline: PathBuf,
        /// Ignore the stored checkpoint and start from the beginning.
        #[arg(long)]
        reset_state: bool,
    },
    /// Run a pipeline over bounded input (files, a bounded simulator, a time range of a hub)
    /// as fast as possible, with progress, and exit when the sources are exhausted.
    Replay {
        /// The pipeline file.
        pipeline: PathBuf,
        /// Ignore the stored checkpoint and start from the beginning.
        #[arg(long)]
        reset_state: bool,
        /// No progress bar.
        #[arg(long)]
        no_progress: bool,
        /// Event Hubs sources only: replay the events enqueued at or after this time (RFC 3339,
        /// e.g. 2026-11-01T00:00:00Z). Default: the source's `start` (earliest).
        #[arg(long, value_name = "TIME")]
        from: Option<String>,
        /// Event Hubs sources only: stop before the events enqueued at or after this time
        /// (RFC 3339). Default: each partition's last event when the replay starts.
        #[arg(long, value_name = "TIME")]
        to: Option<String>,
    },
    /// Check pipeline files without running them (offline). Exit code 2 when one is invalid.
    Validate {
        /// Pipeline files.
        #[arg(required = true)]
        pipelines: Vec<PathBuf>,
    },
    /// Print the JSON Schema of the pipeline format (for editor completion).
    Schema,
    /// Run pipeline unit tests (`*.test.yaml`): feed records to sources, check what components,
    /// ports and sinks receive. Offline; sinks are never contacted. Exit code 1 when a case
    /// fails, 2 when a test file is invalid.
    Test {
        /// Test files, or folders searched recursively for `*.test.yaml`.
        #[arg(default_value = "pipelines")]
        paths: Vec<PathBuf>,
        /// Also write the results as JUnit XML to this file (for CI systems).
        #[arg(long, value_name = "FILE")]
        junit: Option<PathBuf>,
    },
    /// Print a pipeline's DAG as a diagram (Mermaid for Markdown, or Graphviz DOT), secondary
    /// outputs (`late`, `dead_letter`) on dashed, labelled edges.
    Graph {
        /// The pipeline file.
        pipeline: PathBuf,
        /// Diagram language.
        #[arg(long, value_enum, default_value = "mermaid")]
        format: crate::diagram::Format,
    },
    /// A live view of a running instance (`centralflow run`), from its /metrics: events in and
    /// out per second, errors, dead letters, late events, watermark and consumer lag per
    /// component, and the last checkpoint. Quit with q, Esc or Ctrl-C.
    Top {
        /// The instance's operations endpoint: host:port or an http:// URL.
        #[arg(default_value = crate::top::DEFAULT_ADDRESS)]
        address: String,
        /// Print one plain-text snapshot (two polls a second apart) and exit: 0 when the instance
        /// answered, 1 when it did not.
        #[arg(long)]
        once: bool,
    },
    /// Write simulated IoT Central export messages as JSON lines.
    Simulate {
        /// Number of devices.
        #[arg(long, default_value_t = 100)]
        devices: u32,
        /// Messages per second of event time.
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// Number of messages.
        #[arg(long, default_value_t = 10_000)]
        count: u64,
        /// Random seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Event time of the first message (RFC 3339).
        #[arg(long, default_value = "2026-11-01T00:00:00Z")]
        start: String,
        /// Share of late telemetry.
        #[arg(long, default_value_t = 0.02)]
        out_of_order: f64,
        /// How late, at most (e.g. 20s).
        #[arg(long, default_value = "20s")]
        max_delay: String,
        /// Output file (default: standard output).
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
}

/// Entry point; returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    init_logging(&cli);
    crate::install_crypto_provider();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return 1;
        }
    };
    rt.block_on(dispatch(cli))
}

fn init_logging(cli: &Cli) {
    use tracing_subscriber::EnvFilter;
    let filter = cli
        .log
        .clone()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info,lapin=warn,azure_core=warn,fe2o3_amqp=warn,deltalake_core=warn,buoyant_kernel=warn,buoyant_kernel_engine=warn".into());
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(crate::secret::RedactingWriter);
    let _ = match cli.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
    };
}

async fn dispatch(cli: Cli) -> i32 {
    match cli.command {
        Command::Validate { pipelines } => validate(&pipelines),
        Command::Graph { pipeline, format } => match load(&pipeline) {
            Ok(plan) => {
                print!("{}", crate::diagram::render(&plan, format));
                0
            }
            Err(code) => code,
        },
        Command::Test { paths, junit } => crate::testing::main(&paths, junit.as_deref()),
        Command::Top { address, once } => crate::top::main(&address, once).await,
        Command::Schema => {
            println!("{}", serde_json::to_string_pretty(&config::json_schema()).unwrap_or_default());
            0
        }
        Command::Simulate { devices, rate, count, seed, start, out_of_order, max_delay, out } => {
            match simulate(devices, rate, count, seed, &start, out_of_order, &max_delay, out) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    2
                }
            }
        }
        Command::Run { pipeline, reset_state } => run(&pipeline, Mode::Live, reset_state, false, None).await,
        Command::Replay { pipeline, reset_state, no_progress, from, to } => {
            let range = if from.is_some() || to.is_some() { Some((from, to)) } else { None };
            run(&pipeline, Mode::Replay, reset_state, !no_progress, range).await
        }
    }
}

fn load(path: &std::path::Path) -> Result<Plan, i32> {
    match config::load_file(path) {
        Ok(plan) => {
            for w in &plan.warnings {
                eprintln!("{}: warning: {}", path.display(), crate::secret::redact(&w.to_string()));
            }
            Ok(plan)
        }
        Err(errors) => {
            for e in &errors {
                eprintln!("{}: error: {}", path.display(), crate::secret::redact(&e.to_string()));
            }
            eprintln!("{}: {} error{}", path.display(), errors.len(), if errors.len() == 1 { "" } else { "s" });
            Err(2)
        }
    }
}

fn validate(paths: &[PathBuf]) -> i32 {
    let mut code = 0;
    for p in paths {
        match load(p) {
            Ok(plan) => {
                let names: Vec<String> = plan.nodes.iter().map(|n| format!("{} ({})", n.name, n.kind)).collect();
                println!("{}: ok: {}", p.display(), names.join(", "));
            }
            Err(c) => code = c,
        }
    }
    code
}

#[allow(clippy::too_many_arguments)]
fn simulate(
    devices: u32,
    rate: f64,
    count: u64,
    seed: u64,
    start: &str,
    ooo: f64,
    max_delay: &str,
    out: Option<PathBuf>,
) -> anyhow::Result<()> {
    use crate::sources::simulator::{Generator, SimulatorConfig};
    let cfg: SimulatorConfig = serde_json::from_value(serde_json::json!({
        "devices": devices, "rate": rate, "count": count, "seed": seed, "start": start, "out_of_order": ooo,
        "max_delay": max_delay
    }))?;
    let g = Generator::new(cfg, crate::time::now_nanos())?;
    let mut w: Box<dyn std::io::Write> = match out {
        Some(p) => Box::new(std::io::BufWriter::new(std::fs::File::create(&p)?)),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    for i in 0..count {
        let line = g.message(i);
        w.write_all(line.as_bytes())?;
        w.write_all(b"\n")?;
    }
    w.flush()?;
    Ok(())
}

async fn run(
    path: &std::path::Path,
    mode: Mode,
    reset_state: bool,
    progress_bar: bool,
    range: Option<(Option<String>, Option<String>)>,
) -> i32 {
    let mut plan = match load(path) {
        Ok(p) => p,
        Err(c) => return c,
    };
    if mode == Mode::Replay {
        if let Err(e) = replay_range(&mut plan, range) {
            eprintln!("error: {e}");
            return 2;
        }
    }
    // the operations endpoint (run only, unless disabled); it outlives reloads
    if mode == Mode::Live {
        let api =
            plan.api.clone().unwrap_or_else(|| config::ApiConfig { address: "127.0.0.1:8686".into(), enabled: true });
        if api.enabled {
            let addr = std::env::var("CENTRALFLOW_API_ADDRESS").unwrap_or(api.address);
            let addr = match addr.parse() {
                Ok(a) => a,
                Err(_) => {
                    eprintln!("error: {addr:?} is not an address like 127.0.0.1:8686");
                    return 2;
                }
            };
            match crate::api::serve(addr).await {
                Ok(bound) => tracing::info!("metrics and health on http://{bound}"),
                Err(e) => {
                    eprintln!("error: {e:#}");
                    return 1;
                }
            }
        }
    }
    let signals = Signals::install();
    let mut reset = reset_state;
    loop {
        let progress: SharedProgress = Arc::new(Progress::default());
        let opts = RunOptions { mode, reset_state: reset, progress: progress.clone(), ..Default::default() };
        reset = false;
        let started = Instant::now();
        let reporter = tokio::spawn(report_progress(progress.clone(), progress_bar && mode == Mode::Replay));
        let stop = signals.next_stop(path.to_path_buf(), mode == Mode::Live);
        let result = crate::assemble::run_pipeline(&plan, opts, stop.wait()).await;
        reporter.abort();
        let _ = reporter.await;
        match result {
            Ok(summary) => print_summary(&summary, started.elapsed(), &progress),
            Err(e) => {
                eprintln!("error: {}", crate::secret::redact(&format!("{e:#}")));
                return 1;
            }
        }
        match stop.reload() {
            Some(next) => {
                tracing::info!("reloaded {}: state carried over through the checkpoint", path.display());
                plan = next;
            }
            None => return 0,
        }
    }
}

/// `replay --from/--to`: a time range of the pipeline's Event Hubs sources. A replay of an Event
/// Hubs pipeline never uses the pipeline's checkpoint store: it must not touch the state of the
/// instances that run it live (its output goes where the sinks say: point them elsewhere).
fn replay_range(plan: &mut Plan, range: Option<(Option<String>, Option<String>)>) -> Result<(), String> {
    use crate::config::Spec;
    let parse = |flag: &str, v: Option<String>| -> Result<Option<crate::event::Nanos>, String> {
        match v {
            None => Ok(None),
            Some(t) => crate::time::parse_rfc3339(&t)
                .map(Some)
                .ok_or_else(|| format!("{flag} {t:?} is not an RFC 3339 timestamp (like 2026-11-01T13:00:00Z)")),
        }
    };
    let mut hubs = 0;
    for n in &mut plan.nodes {
        let config::ComponentConfig::Source(src) = &mut n.config else { continue };
        if let Some(slot) = src.replay_range() {
            hubs += 1;
            if let Some((from, to)) = range.clone() {
                let (from, to) = (parse("--from", from)?, parse("--to", to)?);
                if let (Some(f), Some(t)) = (from, to) {
                    if f >= t {
                        return Err("--to must be later than --from".into());
                    }
                }
                *slot = Some((from, to));
            }
        }
    }
    if hubs == 0 && range.is_some() {
        return Err("--from/--to select a time range of an Event Hubs source, and this pipeline has none \
(a files source takes `from`/`to` in the pipeline)"
            .into());
    }
    if hubs > 0 {
        if let Some(c) = plan.checkpoint.as_mut().filter(|c| c.url.is_some()) {
            tracing::info!("replaying an Event Hubs pipeline: its checkpoint store is not used");
            c.url = None;
        }
    }
    Ok(())
}

/// Why a run was asked to end.
struct StopRequest {
    notify: Arc<tokio::sync::Notify>,
    reload: Arc<std::sync::Mutex<Option<Plan>>>,
    task: tokio::task::JoinHandle<()>,
}

impl StopRequest {
    async fn wait(&self) {
        self.notify.notified().await
    }
    /// The validated new pipeline, when the run ended for a reload.
    fn reload(self) -> Option<Plan> {
        self.task.abort();
        self.reload.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// SIGINT/SIGTERM stop (a second one exits at once); in `run`, SIGHUP or a change of the
/// pipeline file reloads it, after validating the new version (an invalid one is reported and
/// the running pipeline goes on).
struct Signals {
    stop: Arc<tokio::sync::Notify>,
    hup: Arc<tokio::sync::Notify>,
}

impl Signals {
    fn install() -> Signals {
        let stop = Arc::new(tokio::sync::Notify::new());
        let hup = Arc::new(tokio::sync::Notify::new());
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let (stop2, hup2) = (stop.clone(), hup.clone());
            tokio::spawn(async move {
                let (Ok(mut int), Ok(mut term), Ok(mut h)) =
                    (signal(SignalKind::interrupt()), signal(SignalKind::terminate()), signal(SignalKind::hangup()))
                else {
                    return;
                };
                let mut stopping = false;
                loop {
                    tokio::select! {
                        _ = int.recv() => {}
                        _ = term.recv() => {}
                        _ = h.recv() => { hup2.notify_one(); continue; }
                    }
                    if stopping {
                        eprintln!("second signal: exiting without the final checkpoint");
                        std::process::exit(130);
                    }
                    stopping = true;
                    stop2.notify_one();
                }
            });
        }
        #[cfg(not(unix))]
        {
            let stop2 = stop.clone();
            tokio::spawn(async move {
                let _ = tokio::signal::ctrl_c().await;
                stop2.notify_one();
            });
        }
        Signals { stop, hup }
    }

    /// A stop request for one run: a signal, or (live) a valid changed pipeline.
    fn next_stop(&self, path: PathBuf, watch: bool) -> StopRequest {
        let notify = Arc::new(tokio::sync::Notify::new());
        let reload: Arc<std::sync::Mutex<Option<Plan>>> = Default::default();
        let (n, r, stop, hup) = (notify.clone(), reload.clone(), self.stop.clone(), self.hup.clone());
        let task = tokio::spawn(async move {
            let mtime = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
            let mut seen = mtime(&path);
            loop {
                let changed = tokio::select! {
                    _ = stop.notified() => { n.notify_one(); return; }
                    _ = hup.notified(), if watch => true,
                    _ = tokio::time::sleep(Duration::from_secs(2)), if watch => {
                        let now = mtime(&path);
                        let c = now != seen;
                        seen = now;
                        c
                    }
                };
                if !changed {
                    continue;
                }
                match config::load_file(&path) {
                    Ok(plan) => {
                        *r.lock().unwrap_or_else(|e| e.into_inner()) = Some(plan);
                        tracing::info!("{} changed: stopping with a checkpoint to reload it", path.display());
                        n.notify_one();
                        return;
                    }
                    Err(errors) => {
                        for e in errors {
                            tracing::error!(
                                "reload refused, {}: {}",
                                path.display(),
                                crate::secret::redact(&e.to_string())
                            );
                        }
                    }
                }
            }
        });
        StopRequest { notify, reload, task }
    }
}

async fn report_progress(p: SharedProgress, bar: bool) {
    let tty = std::io::stderr().is_terminal();
    let pb = (bar && tty).then(|| {
        let pb = indicatif::ProgressBar::new(1000);
        pb.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] [{bar:30}] {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        pb
    });
    let start = Instant::now();
    let mut last_log = Instant::now();
    let mut last_events = 0u64;
    let mut last_t = Instant::now();
    let mut rate = 0.0;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let events = p.events.load(Ordering::Relaxed);
        let dt = last_t.elapsed().as_secs_f64();
        if dt >= 1.0 {
            rate = (events - last_events) as f64 / dt;
            last_events = events;
            last_t = Instant::now();
        } else if rate == 0.0 && start.elapsed().as_secs_f64() > 0.2 {
            rate = events as f64 / start.elapsed().as_secs_f64();
        }
        let (frac, of) = fraction(&p);
        let msg = format!(
            "{} events, {}/s{}",
            human(events as f64),
            human(rate),
            frac.map(|f| format!(", {:.1}% of {of}", f * 100.0)).unwrap_or_default()
        );
        match &pb {
            Some(pb) => {
                pb.set_position((frac.unwrap_or(0.0) * 1000.0) as u64);
                pb.set_message(msg);
            }
            None if bar && last_log.elapsed() >= Duration::from_secs(10) => {
                tracing::info!("progress: {msg}");
                last_log = Instant::now();
            }
            None => {}
        }
    }
}

fn fraction(p: &Progress) -> (Option<f64>, String) {
    let total_b = p.total_bytes.load(Ordering::Relaxed);
    if total_b > 0 {
        let done = p.done_bytes.load(Ordering::Relaxed).min(total_b);
        return (Some(done as f64 / total_b as f64), format!("{:.1} MB", total_b as f64 / 1e6));
    }
    let total_e = p.total_events.load(Ordering::Relaxed);
    if total_e > 0 {
        let done = p.events.load(Ordering::Relaxed).min(total_e);
        return (Some(done as f64 / total_e as f64), format!("{} events", human(total_e as f64)));
    }
    (None, String::new())
}

fn human(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

fn print_summary(s: &RunSummary, elapsed: Duration, p: &Progress) {
    let events = p.events.load(Ordering::Relaxed);
    let secs = elapsed.as_secs_f64().max(1e-9);
    eprintln!(
        "done in {:.2}s: {} events from sources ({}/s), {} checkpoint epoch{}{}",
        secs,
        events,
        human(events as f64 / secs),
        s.epochs,
        if s.epochs == 1 { "" } else { "s" },
        s.restored_epoch.map(|e| format!(", resumed after epoch {e}")).unwrap_or_default()
    );
    for c in &s.components {
        let mut extra = String::new();
        if c.dead_letters > 0 {
            extra.push_str(&format!(", {} dead letters", c.dead_letters));
        }
        if c.late_events > 0 {
            extra.push_str(&format!(", {} late", c.late_events));
        }
        let io = match c.role {
            config::Role::Source => format!("{} out", c.events_out),
            config::Role::Transform => format!("{} in, {} out", c.events_in, c.events_out),
            config::Role::Sink => format!("{} in, {} written", c.events_in, c.events_out),
        };
        eprintln!("  {:<24} {:<12} {io}{extra}", c.name, c.kind);
    }
}
