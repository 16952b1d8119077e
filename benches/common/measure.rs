//! Whole-process measurement shared by the benches that run centralflow against an anchor
//! (`w1.rs`, `archive.rs`): wall time, CPU time and peak RSS of a child, and medians of runs.

use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug)]
pub struct Measure {
    pub wall: Duration,
    pub cpu: Duration,
    pub max_rss_kib: i64,
}

/// Runs a command to completion and measures it with wait4(2).
pub fn measure(cmd: &mut Command) -> Measure {
    let start = Instant::now();
    let child = cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().expect("spawn");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child with valid pointers.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let wall = start.elapsed();
    assert_eq!(r, pid, "wait4");
    let output = child.wait_with_output();
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    if !ok {
        let err = output.map(|o| String::from_utf8_lossy(&o.stderr).to_string()).unwrap_or_default();
        panic!("{cmd:?} failed ({status}):\n{err}");
    }
    let tv = |t: libc::timeval| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64);
    Measure { wall, cpu: tv(ru.ru_utime) + tv(ru.ru_stime), max_rss_kib: ru.ru_maxrss }
}

pub fn median(mut v: Vec<Measure>) -> Measure {
    v.sort_by_key(|m| m.wall);
    let mid = v[v.len() / 2];
    let mut cpu: Vec<Duration> = v.iter().map(|m| m.cpu).collect();
    cpu.sort();
    let mut rss: Vec<i64> = v.iter().map(|m| m.max_rss_kib).collect();
    rss.sort();
    Measure { wall: mid.wall, cpu: cpu[cpu.len() / 2], max_rss_kib: rss[rss.len() / 2] }
}

/// `centralflow replay PIPELINE` over `input` into `out` (removed first), on 2 rayon threads.
pub fn replay(
    bin: &std::path::Path,
    pipeline: &std::path::Path,
    input: &std::path::Path,
    out: &std::path::Path,
) -> Measure {
    let _ = std::fs::remove_dir_all(out);
    let mut c = Command::new(bin);
    c.args(["replay", "--no-progress", pipeline.to_str().unwrap()])
        .env("CENTRALFLOW_INPUT", input)
        .env("CENTRALFLOW_OUTPUT", out)
        .env("RAYON_NUM_THREADS", "2")
        .env("CENTRALFLOW_LOG", "warn");
    measure(&mut c)
}

/// A Python anchor script (`benches/anchors/...`) over `input` into the file `out` (removed
/// first), on 2 threads.
pub fn anchor(
    python: &std::path::Path,
    script: &std::path::Path,
    input: &std::path::Path,
    out: &std::path::Path,
) -> Measure {
    let _ = std::fs::remove_file(out);
    let mut c = Command::new(python);
    c.args([script.to_str().unwrap(), input.to_str().unwrap(), out.to_str().unwrap(), "2"]);
    measure(&mut c)
}

/// The export file a bench reads, and its run count. Under `cargo bench` (`--bench`): `W1_INPUT`
/// (default bench-data/export-1m.jsonl, which `scripts/bench-w1` generates) and `W1_RUNS`
/// (default 3). Under `cargo test`: 20,000 messages generated into `work`, one run.
pub fn bench_input(root: &std::path::Path, work: &std::path::Path, bench: bool) -> (std::path::PathBuf, usize) {
    if bench {
        let input = std::env::var("W1_INPUT")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|_| root.join("bench-data/export-1m.jsonl"));
        if !input.exists() {
            eprintln!("{} is missing: run scripts/bench-w1 (it generates it)", input.display());
            std::process::exit(1);
        }
        let runs = std::env::var("W1_RUNS").ok().and_then(|r| r.parse().ok()).unwrap_or(3);
        (input, runs)
    } else {
        let input = work.join("export.jsonl");
        let out = Command::new("python3")
            .args([root.join("benches/anchors/gen_export.py").to_str().unwrap(), "20000", "500", "7"])
            .output()
            .expect("python3");
        assert!(out.status.success(), "gen_export.py: {}", String::from_utf8_lossy(&out.stderr));
        std::fs::write(&input, out.stdout).unwrap();
        (input, 1)
    }
}
