//! `centralflow top` in a real terminal: tmux runs it against a live `centralflow run` (the
//! built-in simulator), the test reads the screen with `capture-pane` and types with `send-keys`.
//! Needs tmux (`scripts/test` installs it when it is missing).

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const COMPONENTS: [&str; 5] = ["sim", "telemetry", "per_second", "raw", "rows"];

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_centralflow")
}

/// A pipeline that runs until killed (10 minutes at most): 200 simulated messages a second.
fn pipeline(dir: &Path) -> std::path::PathBuf {
    let yaml = format!(
        r#"name: top
sources:
  sim:
    type: simulator
    devices: 20
    rate: 200
    duration: 10m
transforms:
  telemetry:
    type: filter
    inputs: [sim]
    condition: messageSource == "telemetry"
  per_second:
    type: window
    inputs: [telemetry]
    window: {{ kind: tumbling, size: 1s }}
    aggregates: {{ temperature: [avg] }}
sinks:
  raw:
    type: jsonl
    inputs: [telemetry]
    path: {d}/raw.jsonl
  rows:
    type: jsonl
    inputs: [per_second]
    path: {d}/rows.jsonl
checkpoint:
  url: {d}/state
  interval: 1s
api:
  address: 127.0.0.1:0
"#,
        d = dir.display()
    );
    let p = dir.join("top.yaml");
    std::fs::write(&p, yaml).unwrap();
    p
}

/// Ends, even when the test fails: the pipeline and the private tmux server.
struct Guard {
    run: Option<Child>,
    logs: Arc<Mutex<Vec<String>>>,
    tmux: Option<Tmux>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("centralflow run's log:\n{}", self.logs.lock().unwrap().join("\n"));
            if let Some(t) = &self.tmux {
                if let Ok(out) = t.cmd(&["capture-pane", "-p", "-t", "top"]).output() {
                    eprintln!("the screen:\n{}", String::from_utf8_lossy(&out.stdout));
                }
            }
        }
        if let Some(c) = self.run.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(t) = &self.tmux {
            let _ = t.cmd(&["kill-server"]).output();
        }
    }
}

/// A tmux server of our own (its socket in the test's folder, and an empty configuration but
/// for `remain-on-exit`, so that the pane of an exited program stays to be looked at).
#[derive(Clone)]
struct Tmux {
    socket: std::path::PathBuf,
    conf: std::path::PathBuf,
}

impl Tmux {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("tmux");
        c.arg("-S").arg(&self.socket).arg("-f").arg(&self.conf).args(args);
        if std::env::var_os("TERM").is_none() {
            c.env("TERM", "xterm-256color");
        }
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = self.cmd(args).output().expect("tmux (apt-get install tmux)");
        assert!(out.status.success(), "tmux {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "top"]).stdout).to_string()
    }

    /// Whether the pane's program ended.
    fn pane_dead(&self) -> bool {
        String::from_utf8_lossy(&self.run(&["display-message", "-p", "-t", "top", "#{pane_dead}"]).stdout).trim() == "1"
    }
}

/// Starts `centralflow run`, in a guard that collects its log lines as they come.
fn start_run(dir: &Path) -> Guard {
    let mut child = Command::new(bin())
        .args(["run", pipeline(dir).to_str().unwrap()])
        .current_dir(dir)
        .env_remove("CENTRALFLOW_API_ADDRESS")
        .env("CENTRALFLOW_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn centralflow run");
    let logs: Arc<Mutex<Vec<String>>> = Arc::default();
    let (stderr, sink) = (child.stderr.take().unwrap(), logs.clone());
    // read stderr to its end, so that the process never blocks on a full pipe
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    Guard { run: Some(child), logs, tmux: None }
}

/// The address the run listens on, from its log.
fn address(g: &mut Guard) -> String {
    wait_for(Duration::from_secs(60), "address in the run's log", || {
        let logs = g.logs.lock().unwrap();
        let found = logs.iter().find_map(|l| l.split("metrics and health on http://").nth(1));
        if found.is_none() {
            assert!(g.run.as_mut().unwrap().try_wait().unwrap().is_none(), "centralflow run exited");
        }
        found.map(|a| a.trim().to_string())
    })
}

/// Calls `f` every 200 ms until it gives a value; fails past `timeout`.
fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "no {what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The columns of a component's row on the screen.
fn row<'a>(screen: &'a str, component: &str) -> Option<Vec<&'a str>> {
    screen.lines().map(|l| l.split_whitespace().collect::<Vec<_>>()).find(|cols| cols.first() == Some(&component))
}

/// The IN column (events in, a count) of a component's row.
fn events_in(screen: &str, component: &str) -> Option<u64> {
    row(screen, component)?.get(2)?.parse().ok()
}

/// `top` in tmux against a live instance: every component shows and its counts move; `--once`
/// beside it; an instance that goes away is said on screen and retried; `q` quits (exit 0) and
/// gives the terminal back.
#[test]
fn top_shows_a_running_pipeline_in_a_terminal_and_quits_on_q() {
    let dir = tempfile::tempdir().unwrap();
    let mut guard = start_run(dir.path());
    let addr = address(&mut guard);

    let socket = dir.path().join("tmux.sock");
    let conf = dir.path().join("tmux.conf");
    std::fs::write(&conf, "set -g remain-on-exit on\n").unwrap();
    let tmux = Tmux { socket, conf };
    guard.tmux = Some(tmux.clone());
    // a full http:// URL, as for an instance on another host; the shell writes top's exit status
    // (tmux 3.3 does not always reap a pane's program, so #{pane_dead_status} can stay empty)
    let exit_file = dir.path().join("top.exit");
    let top = format!("'{}' top http://{addr}; echo $? > '{}'", bin(), exit_file.display());
    tmux.run(&["new-session", "-d", "-s", "top", "-x", "160", "-y", "40", &top]);

    let mut last = String::new();
    let first = wait_for(Duration::from_secs(30), "screen with every component", || {
        last = tmux.screen();
        let all = COMPONENTS.iter().all(|c| row(&last, c).is_some());
        let n = events_in(&last, "telemetry").filter(|n| *n > 0);
        if all && last.contains(&format!("http://{addr}/metrics  ok")) {
            n
        } else {
            None
        }
    });
    assert!(last.contains("COMPONENT") && last.contains("checkpoint: epoch"), "{last}");
    // the next polls: more events in (the screen is read until it moves, 15 s at most)
    let mut screen = String::new();
    let second = wait_for(Duration::from_secs(15), "change of the events-in count", || {
        screen = tmux.screen();
        events_in(&screen, "telemetry").filter(|n| *n > first)
    });
    assert!(second > first, "{screen}");
    let in_rate: f64 = row(&screen, "telemetry").unwrap()[3].parse().unwrap_or_else(|_| panic!("{screen}"));
    assert!(in_rate > 0.0, "{screen}");
    assert!(!tmux.pane_dead() && !exit_file.exists(), "top is running");

    // meanwhile --once prints one plain-text snapshot on stdout
    let once = Command::new(bin()).args(["top", "--once", &addr]).output().unwrap();
    let text = String::from_utf8_lossy(&once.stdout);
    assert!(once.status.success(), "{text}\n{}", String::from_utf8_lossy(&once.stderr));
    assert!(text.starts_with(&format!("centralflow top http://{addr}/metrics ok\n")), "{text}");
    for c in COMPONENTS {
        assert!(row(&text, c).is_some(), "{c} missing:\n{text}");
    }

    // the instance goes away: said on screen, and top goes on
    let mut run = guard.run.take().unwrap();
    run.kill().unwrap();
    run.wait().unwrap();
    let down = wait_for(Duration::from_secs(10), "UNREACHABLE on screen", || {
        let s = tmux.screen();
        s.contains("UNREACHABLE").then_some(s)
    });
    assert!(row(&down, "telemetry").is_some(), "the last rows stay:\n{down}");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!tmux.pane_dead() && !exit_file.exists(), "top must keep retrying:\n{}", tmux.screen());

    // q quits, with exit status 0, and leaves the alternate screen
    tmux.run(&["send-keys", "-t", "top", "q"]);
    let status = wait_for(Duration::from_secs(5), "exit after q", || {
        std::fs::read_to_string(&exit_file).ok().filter(|s| s.ends_with('\n'))
    });
    assert_eq!(status.trim(), "0", "exit status of top; the screen:\n{}", tmux.screen());
    wait_for(Duration::from_secs(5), "dead pane", || tmux.pane_dead().then_some(()));
    let after = tmux.screen();
    assert!(!after.contains("COMPONENT"), "the terminal was not restored:\n{after}");
}

/// Without an instance `--once` says so and exits 1; without a terminal `top` refuses (exit 2).
#[test]
fn top_once_reports_an_unreachable_instance() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let start = Instant::now();
    let out = Command::new(bin()).args(["top", "--once", &addr]).output().unwrap();
    assert!(start.elapsed() < Duration::from_secs(15));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("UNREACHABLE"), "{stdout}");
    assert!(stderr.contains(&format!("http://{addr}/metrics")), "{stderr}");

    let out = Command::new(bin()).args(["top", &addr]).stdout(Stdio::piped()).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs a terminal"));

    let out = Command::new(bin()).args(["top", "--once", "ftp://nowhere"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}
