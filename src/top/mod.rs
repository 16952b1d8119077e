//! `centralflow top [ADDRESS]`: a terminal view of a running instance, from its `/metrics`.
//!
//! Three parts, kept apart: [`Poller`] turns each scrape (or failed one) into a [`Snapshot`],
//! computing rates from the counter deltas between two successful scrapes; [`view`] draws a
//! snapshot (a pure function: tested with ratatui's `TestBackend`) or prints it as plain text
//! (`--once`); [`run`] polls every second on a task and runs the key loop on a blocking thread.

pub mod parse;
pub mod view;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

/// The default address, that of `centralflow run`.
pub const DEFAULT_ADDRESS: &str = "127.0.0.1:8686";

/// Time between two polls.
const INTERVAL: Duration = Duration::from_secs(1);

/// The `/metrics` URL of `host:port`, `http://host:port` or a full URL (a path other than `/`
/// is kept).
pub fn metrics_url(address: &str) -> Result<url::Url, String> {
    let address = address.trim();
    let with_scheme = if address.contains("://") { address.to_string() } else { format!("http://{address}") };
    let mut url = url::Url::parse(&with_scheme)
        .map_err(|e| format!("{address:?} is not an address like {DEFAULT_ADDRESS}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(format!("{address:?} is not an http address like {DEFAULT_ADDRESS} or http://host:port"));
    }
    if url.path() == "/" || url.path().is_empty() {
        url.set_path("/metrics");
    }
    Ok(url)
}

/// What one scrape says about one component.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counters {
    pub kind: String,
    pub events_in: f64,
    pub events_out: f64,
    pub errors: f64,
    pub dead_letters: f64,
    pub late_events: f64,
    /// Only for components with a watermark (`watermark_ms` > 0).
    pub watermark_lag: Option<f64>,
    watermark_ms: f64,
    /// Summed over the component's partitions; only where it is known.
    pub consumer_lag: Option<f64>,
}

/// What one scrape says.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scrape {
    pub components: BTreeMap<String, Counters>,
    pub checkpoint_age: Option<f64>,
    pub checkpoint_epoch: Option<f64>,
}

impl Scrape {
    /// The `centralflow_*` families of an exposition.
    pub fn from_text(text: &str) -> Result<Scrape, parse::ParseError> {
        let mut s = Scrape::default();
        for sample in parse::parse(text)? {
            let Some(family) = sample.family.strip_prefix("centralflow_") else { continue };
            match family {
                "checkpoint_age_seconds" => s.checkpoint_age = Some(sample.value),
                "checkpoint_epoch" => s.checkpoint_epoch = Some(sample.value),
                _ => {}
            }
            let Some(component) = sample.label("component") else { continue };
            let c = s.components.entry(component.to_string()).or_default();
            if let Some(kind) = sample.label("kind") {
                c.kind = kind.to_string();
            }
            // counters carry `_total`; their `_created` samples are not counts
            let total = sample.name.ends_with("_total");
            match family {
                "events_in" if total => c.events_in = sample.value,
                "events_out" if total => c.events_out = sample.value,
                "errors" if total => c.errors = sample.value,
                "dead_letters" if total => c.dead_letters = sample.value,
                "late_events" if total => c.late_events = sample.value,
                "watermark_lag_seconds" => c.watermark_lag = Some(sample.value),
                "watermark_ms" => c.watermark_ms = sample.value,
                "consumer_lag" => *c.consumer_lag.get_or_insert(0.0) += sample.value,
                _ => {}
            }
        }
        for c in s.components.values_mut() {
            if c.watermark_ms <= 0.0 {
                c.watermark_lag = None;
            }
        }
        Ok(s)
    }
}

/// Per second, from two readings of a counter `dt` apart; a counter that went down was reset
/// (the instance restarted) and counts from zero.
pub fn rate(prev: f64, cur: f64, dt: Duration) -> Option<f64> {
    let secs = dt.as_secs_f64();
    if secs <= 0.0 {
        return None;
    }
    let delta = if cur >= prev { cur - prev } else { cur };
    Some(delta / secs)
}

/// One line of the table.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    pub component: String,
    pub kind: String,
    pub events_in: f64,
    pub events_out: f64,
    /// None until two scrapes have seen the component.
    pub in_rate: Option<f64>,
    pub out_rate: Option<f64>,
    pub errors: f64,
    pub dead_letters: f64,
    pub late_events: f64,
    pub watermark_lag: Option<f64>,
    pub consumer_lag: Option<f64>,
}

/// The table rows of a scrape, with rates against the previous one (`dt` earlier).
pub fn rows(prev: Option<(&Scrape, Duration)>, cur: &Scrape) -> Vec<Row> {
    cur.components
        .iter()
        .map(|(name, c)| {
            let before = prev.and_then(|(p, dt)| p.components.get(name).map(|b| (b, dt)));
            Row {
                component: name.clone(),
                kind: c.kind.clone(),
                events_in: c.events_in,
                events_out: c.events_out,
                in_rate: before.and_then(|(b, dt)| rate(b.events_in, c.events_in, dt)),
                out_rate: before.and_then(|(b, dt)| rate(b.events_out, c.events_out, dt)),
                errors: c.errors,
                dead_letters: c.dead_letters,
                late_events: c.late_events,
                watermark_lag: c.watermark_lag,
                consumer_lag: c.consumer_lag,
            }
        })
        .collect()
}

/// Whether the last poll got an answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    /// Nothing polled yet.
    Starting,
    Ok,
    /// The last poll failed; the rows are those of the last successful one (if any), that long ago.
    Unreachable {
        error: String,
        last_ok: Option<Duration>,
    },
}

/// Everything the screen shows: a pure input of [`view::render`].
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub address: String,
    pub status: Status,
    pub checkpoint_age: Option<f64>,
    pub checkpoint_epoch: Option<f64>,
    pub rows: Vec<Row>,
}

/// Turns poll results into snapshots, remembering the last successful scrape for the rates.
pub struct Poller {
    address: String,
    last: Option<(Instant, Scrape)>,
    snapshot: Snapshot,
}

impl Poller {
    pub fn new(address: &str) -> Poller {
        let snapshot = Snapshot {
            address: address.to_string(),
            status: Status::Starting,
            checkpoint_age: None,
            checkpoint_epoch: None,
            rows: Vec::new(),
        };
        Poller { address: address.to_string(), last: None, snapshot }
    }

    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The body of a successful poll at `now`, or why it failed.
    pub fn update(&mut self, now: Instant, body: Result<String, String>) -> &Snapshot {
        match body.and_then(|b| Scrape::from_text(&b).map_err(|e| format!("not a metrics exposition: {e}"))) {
            Ok(scrape) => {
                let prev = self.last.as_ref().map(|(t, s)| (s, now.saturating_duration_since(*t)));
                self.snapshot = Snapshot {
                    address: self.address.clone(),
                    status: Status::Ok,
                    checkpoint_age: scrape.checkpoint_age,
                    checkpoint_epoch: scrape.checkpoint_epoch,
                    rows: rows(prev, &scrape),
                };
                self.last = Some((now, scrape));
            }
            Err(error) => {
                let last_ok = self.last.as_ref().map(|(t, _)| now.saturating_duration_since(*t));
                self.snapshot.status = Status::Unreachable { error, last_ok };
            }
        }
        &self.snapshot
    }
}

/// One GET of `/metrics`.
async fn fetch(client: &reqwest::Client, url: &url::Url) -> Result<String, String> {
    let response = client.get(url.clone()).send().await.map_err(|e| describe(&e))?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("HTTP {status}"));
    }
    response.text().await.map_err(|e| describe(&e))
}

/// A reqwest error in short: what failed and its innermost cause (`connection refused`), without
/// the URL, which the screen shows already.
fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "timed out".into();
    }
    let mut root: &dyn std::error::Error = e;
    while let Some(cause) = root.source() {
        root = cause;
    }
    let root = root.to_string();
    if e.is_connect() {
        return format!("cannot connect: {root}");
    }
    let what = e.to_string();
    let what = what.split(" for url (").next().unwrap_or(&what);
    if what == root {
        root
    } else {
        format!("{what}: {root}")
    }
}

fn client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_millis(800))
        .timeout(Duration::from_secs(2))
        .build()
        .map_err(|e| format!("cannot make an HTTP client: {e}"))
}

/// `centralflow top`; returns the exit code.
pub async fn main(address: &str, once: bool) -> i32 {
    let url = match metrics_url(address) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let client = match client() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return 1;
        }
    };
    if once {
        return print_once(&client, &url).await;
    }
    if !std::io::stdout().is_terminal() {
        eprintln!("error: centralflow top needs a terminal; `centralflow top --once` prints one snapshot");
        return 2;
    }
    let (tx, rx) = tokio::sync::watch::channel(Poller::new(url.as_str()).snapshot().clone());
    let poller = tokio::spawn(poll_loop(client, url, tx));
    let ui = tokio::task::spawn_blocking(move || ui_loop(rx)).await;
    poller.abort();
    match ui {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            eprintln!("error: the terminal: {e}");
            1
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

/// `--once`: two polls a second apart (for the rates), one plain-text snapshot on stdout. Exit 1
/// when the second poll failed.
async fn print_once(client: &reqwest::Client, url: &url::Url) -> i32 {
    let mut p = Poller::new(url.as_str());
    p.update(Instant::now(), fetch(client, url).await);
    tokio::time::sleep(INTERVAL).await;
    let snap = p.update(Instant::now(), fetch(client, url).await);
    print!("{}", view::plain(snap));
    match &snap.status {
        Status::Unreachable { error, .. } => {
            eprintln!("error: {url}: {error}");
            1
        }
        _ => 0,
    }
}

/// Polls every second until the receiver is gone; a failed poll is shown and retried.
async fn poll_loop(client: reqwest::Client, url: url::Url, tx: tokio::sync::watch::Sender<Snapshot>) {
    let mut poller = Poller::new(url.as_str());
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let body = fetch(&client, &url).await;
        if tx.send(poller.update(Instant::now(), body).clone()).is_err() {
            return;
        }
    }
}

/// `q`, Esc or Ctrl-C (in raw mode Ctrl-C is a key, not a signal).
fn quits(k: &KeyEvent) -> bool {
    let ctrl_c = k.modifiers.contains(KeyModifiers::CONTROL) && matches!(k.code, KeyCode::Char('c' | 'C'));
    k.kind != KeyEventKind::Release && (ctrl_c || matches!(k.code, KeyCode::Char('q' | 'Q') | KeyCode::Esc))
}

/// Draws each new snapshot (and on resize) until `q`, Esc or Ctrl-C; restores the terminal, on a
/// panic too (ratatui's hook).
fn ui_loop(mut rx: tokio::sync::watch::Receiver<Snapshot>) -> std::io::Result<()> {
    let mut terminal = ratatui::try_init()?;
    let result = (|| -> std::io::Result<()> {
        let mut redraw = true;
        loop {
            if redraw || rx.has_changed().unwrap_or(false) {
                let snap = rx.borrow_and_update().clone();
                terminal.draw(|f| view::render(f, &snap))?;
                redraw = false;
            }
            if !event::poll(Duration::from_millis(100))? {
                continue;
            }
            match event::read()? {
                Event::Key(k) if quits(&k) => return Ok(()),
                Event::Resize(..) => redraw = true,
                _ => {}
            }
        }
    })();
    ratatui::try_restore()?;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: &str = "# HELP centralflow_events_in Events received by a component.\n\
# TYPE centralflow_events_in counter\n\
centralflow_events_in_total{component=\"win\",kind=\"window\"} 100\n\
centralflow_events_in_total{component=\"sim\",kind=\"simulator\"} 0\n\
# TYPE centralflow_events_out counter\n\
centralflow_events_out_total{component=\"sim\",kind=\"simulator\"} 1000\n\
centralflow_events_out_total{component=\"win\",kind=\"window\"} 2\n\
# TYPE centralflow_dead_letters counter\n\
centralflow_dead_letters_total{component=\"sim\",kind=\"simulator\"} 3\n\
# TYPE centralflow_watermark_ms gauge\n\
centralflow_watermark_ms{component=\"sim\",kind=\"simulator\"} 0\n\
centralflow_watermark_ms{component=\"win\",kind=\"window\"} 1700000000000\n\
# TYPE centralflow_watermark_lag_seconds gauge\n\
centralflow_watermark_lag_seconds{component=\"sim\",kind=\"simulator\"} 0.0\n\
centralflow_watermark_lag_seconds{component=\"win\",kind=\"window\"} 2.5\n\
# TYPE centralflow_consumer_lag gauge\n\
centralflow_consumer_lag{component=\"sim\",partition=\"0\"} 7\n\
centralflow_consumer_lag{component=\"sim\",partition=\"1\"} 5\n\
# TYPE centralflow_checkpoint_epoch gauge\n\
centralflow_checkpoint_epoch 4\n\
# TYPE centralflow_checkpoint_age_seconds gauge\n\
centralflow_checkpoint_age_seconds 1.5\n\
# EOF\n";

    #[test]
    fn addresses_become_metrics_urls() {
        assert_eq!(metrics_url("127.0.0.1:8686").unwrap().as_str(), "http://127.0.0.1:8686/metrics");
        assert_eq!(metrics_url("http://box.local:9000").unwrap().as_str(), "http://box.local:9000/metrics");
        assert_eq!(metrics_url("http://box:9000/").unwrap().as_str(), "http://box:9000/metrics");
        assert_eq!(metrics_url("https://h/cf/metrics").unwrap().as_str(), "https://h/cf/metrics");
        assert_eq!(metrics_url("[::1]:8686").unwrap().as_str(), "http://[::1]:8686/metrics");
        assert!(metrics_url("ftp://h:1").is_err());
        assert!(metrics_url("http://").is_err());
    }

    #[test]
    fn q_esc_and_ctrl_c_quit() {
        let key = |code, modifiers| KeyEvent::new(code, modifiers);
        assert!(quits(&key(KeyCode::Char('q'), KeyModifiers::NONE)));
        assert!(quits(&key(KeyCode::Esc, KeyModifiers::NONE)));
        assert!(quits(&key(KeyCode::Char('c'), KeyModifiers::CONTROL)));
        assert!(!quits(&key(KeyCode::Char('c'), KeyModifiers::NONE)));
        assert!(!quits(&key(KeyCode::Char('x'), KeyModifiers::NONE)));
        let mut release = key(KeyCode::Char('q'), KeyModifiers::NONE);
        release.kind = KeyEventKind::Release;
        assert!(!quits(&release));
    }

    #[test]
    fn a_scrape_reads_the_families_per_component() {
        let s = Scrape::from_text(ONE).unwrap();
        assert_eq!((s.checkpoint_age, s.checkpoint_epoch), (Some(1.5), Some(4.0)));
        let sim = &s.components["sim"];
        assert_eq!(sim.kind, "simulator");
        assert_eq!((sim.events_out, sim.dead_letters), (1000.0, 3.0));
        assert_eq!(sim.consumer_lag, Some(12.0), "summed over partitions");
        assert_eq!(sim.watermark_lag, None, "no watermark, no lag");
        let win = &s.components["win"];
        assert_eq!((win.events_in, win.watermark_lag, win.consumer_lag), (100.0, Some(2.5), None));
    }

    #[test]
    fn rates_are_counter_deltas_over_the_time_between_polls() {
        let dt = Duration::from_millis(500);
        assert_eq!(rate(100.0, 300.0, dt), Some(400.0));
        assert_eq!(rate(300.0, 300.0, dt), Some(0.0));
        assert_eq!(rate(1000.0, 50.0, dt), Some(100.0), "a reset counts from zero");
        assert_eq!(rate(1.0, 2.0, Duration::ZERO), None);
    }

    #[test]
    fn the_poller_computes_rates_and_keeps_the_rows_while_unreachable() {
        let t0 = Instant::now();
        let mut p = Poller::new("http://h:1/metrics");
        assert_eq!(p.snapshot().status, Status::Starting);
        let first = p.update(t0, Ok(ONE.to_string())).clone();
        assert_eq!(first.status, Status::Ok);
        assert_eq!(first.rows.iter().map(|r| r.component.as_str()).collect::<Vec<_>>(), ["sim", "win"]);
        assert!(first.rows.iter().all(|r| r.in_rate.is_none() && r.out_rate.is_none()), "one scrape: no rate");

        let two = ONE.replace("} 1000\n", "} 3000\n").replace("window\"} 100\n", "window\"} 600\n");
        let second = p.update(t0 + Duration::from_secs(2), Ok(two)).clone();
        assert_eq!(second.rows[0].out_rate, Some(1000.0));
        assert_eq!(second.rows[0].events_out, 3000.0);
        assert_eq!(second.rows[1].in_rate, Some(250.0));

        let down = p.update(t0 + Duration::from_secs(5), Err("connection refused".into())).clone();
        assert_eq!(
            down.status,
            Status::Unreachable { error: "connection refused".into(), last_ok: Some(Duration::from_secs(3)) }
        );
        assert_eq!(down.rows, second.rows, "the last rows stay");
        let garbage = p.update(t0 + Duration::from_secs(6), Ok("<html>".into())).clone();
        assert!(matches!(garbage.status, Status::Unreachable { ref error, .. } if error.contains("line 1")));
        // back: rates against the last good scrape, 5 s before
        let back = p.update(t0 + Duration::from_secs(7), Ok(ONE.replace("} 1000\n", "} 8000\n"))).clone();
        assert_eq!(back.status, Status::Ok);
        assert_eq!(back.rows[0].out_rate, Some(1000.0));
    }
}
