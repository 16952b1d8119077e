//! `centralflow test`: unit tests of pipelines. A test file (`*.test.yaml`) names a pipeline and
//! holds cases; each case feeds records to sources, and checks what components, ports and sinks'
//! inputs received. See [`spec`] for the format, [`harness`] for how a case runs (offline,
//! deterministic, sinks never contacted) and [`compare`] for how rows are matched.
//!
//! Output follows `cargo test`: a line per case, the failures with diffs, and a summary line.
//! Exit code: 0 all passed; 1 a case failed; 2 a test file (or its pipeline) is invalid, or none
//! was found.

pub mod compare;
pub mod harness;
pub mod spec;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The result of one case.
#[derive(Debug)]
pub struct CaseResult {
    pub name: String,
    pub failures: Vec<String>,
    pub time: Duration,
}

/// The result of one test file.
#[derive(Debug)]
pub struct FileResult {
    pub path: PathBuf,
    /// The file could not be used (each line an error with its position).
    pub invalid: Option<String>,
    pub cases: Vec<CaseResult>,
}

/// Finds `*.test.yaml` files: the files given, and those under the folders given, sorted.
pub fn discover(paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut found = Vec::new();
    for p in paths {
        if p.is_file() {
            found.push(p.clone());
        } else if p.is_dir() {
            walk(p, &mut found).map_err(|e| format!("reading {}: {e}", p.display()))?;
        } else {
            return Err(format!("{}: no such file or folder", p.display()));
        }
    }
    found.sort();
    found.dedup();
    Ok(found)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, out)?;
        } else if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(".test.yaml")) {
            out.push(path);
        }
    }
    Ok(())
}

/// Runs every case of a test file.
pub fn run_file(path: &Path) -> FileResult {
    let file = match spec::load(path) {
        Ok(f) => f,
        Err(inv) => {
            let mut text = String::new();
            for e in &inv.errors {
                let _ = writeln!(text, "{}: error: {}", inv.file.display(), crate::secret::redact(&e.to_string()));
            }
            return FileResult { path: path.to_path_buf(), invalid: Some(text), cases: Vec::new() };
        }
    };
    let cases = file.cases.iter().map(run_case).collect();
    FileResult { path: path.to_path_buf(), invalid: None, cases }
}

/// Runs one case and checks its expectations; a panic in a component is a failure of the case.
pub fn run_case(case: &spec::Case) -> CaseResult {
    let started = Instant::now();
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| harness::run(case)));
    let mut failures = Vec::new();
    match ran {
        Ok(Ok(captured)) => {
            for out in &case.outputs {
                failures.extend(compare::check(out, captured.at(out.target)));
            }
            for (t, name) in &case.no_output_from {
                let got = captured.at(*t);
                if !got.is_empty() {
                    failures.push(format!(
                        "{name}: expected no output, got {} row{}; first: {}",
                        got.len(),
                        if got.len() == 1 { "" } else { "s" },
                        got[0].to_json()
                    ));
                }
            }
        }
        Ok(Err(e)) => failures.push(format!("the pipeline could not be built: {e:#}")),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(format!("a component panicked: {msg}"));
        }
    }
    CaseResult { name: case.name.clone(), failures, time: started.elapsed() }
}

/// Prints results as `cargo test` does; returns the exit code.
pub fn report(results: &[FileResult], elapsed: Duration, out: &mut impl std::io::Write) -> i32 {
    let (mut passed, mut failed, mut invalid) = (0usize, 0usize, 0usize);
    let mut failures = Vec::new();
    for r in results {
        let label = r.path.display();
        if let Some(text) = &r.invalid {
            invalid += 1;
            let _ = writeln!(out, "\n{label}: invalid test file\n{text}");
            continue;
        }
        let _ =
            writeln!(out, "\nrunning {} case{} from {label}", r.cases.len(), if r.cases.len() == 1 { "" } else { "s" });
        for c in &r.cases {
            if c.failures.is_empty() {
                passed += 1;
                let _ = writeln!(out, "test {label}: {} ... ok", c.name);
            } else {
                failed += 1;
                let _ = writeln!(out, "test {label}: {} ... FAILED", c.name);
                failures.push((format!("{label}: {}", c.name), c.failures.join("\n")));
            }
        }
    }
    if !failures.is_empty() {
        let _ = writeln!(out, "\nfailures:");
        for (name, text) in &failures {
            let _ = writeln!(out, "\n---- {name} ----\n{text}");
        }
        let _ = writeln!(out, "\nfailures:");
        for (name, _) in &failures {
            let _ = writeln!(out, "    {name}");
        }
    }
    let ok = failed == 0 && invalid == 0;
    let invalid_note = if invalid > 0 {
        format!("; {invalid} invalid test file{}", if invalid == 1 { "" } else { "s" })
    } else {
        String::new()
    };
    let _ = writeln!(
        out,
        "\ntest result: {}. {passed} passed, {failed} failed{invalid_note}; finished in {:.2}s",
        if ok { "ok" } else { "FAILED" },
        elapsed.as_secs_f64()
    );
    if invalid > 0 {
        2
    } else if failed > 0 {
        1
    } else {
        0
    }
}

/// JUnit XML (the common CI dialect): a suite per file, a case per case; an invalid file is a
/// suite with one errored case.
pub fn junit(results: &[FileResult]) -> String {
    let esc = |s: &str| {
        s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&apos;")
    };
    let total: usize = results.iter().map(|r| r.cases.len().max(usize::from(r.invalid.is_some()))).sum();
    let failures: usize = results.iter().flat_map(|r| &r.cases).filter(|c| !c.failures.is_empty()).count();
    let errors = results.iter().filter(|r| r.invalid.is_some()).count();
    let mut x = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"centralflow test\" tests=\"{total}\" failures=\"{failures}\" errors=\"{errors}\">\n"
    );
    for r in results {
        let name = esc(&r.path.display().to_string());
        if let Some(text) = &r.invalid {
            let _ = write!(
                x,
                "  <testsuite name=\"{name}\" tests=\"1\" failures=\"0\" errors=\"1\">\n    <testcase classname=\"{name}\" name=\"(test file)\">\n      <error message=\"invalid test file\">{}</error>\n    </testcase>\n  </testsuite>\n",
                esc(text)
            );
            continue;
        }
        let failed = r.cases.iter().filter(|c| !c.failures.is_empty()).count();
        let time: f64 = r.cases.iter().map(|c| c.time.as_secs_f64()).sum();
        let _ = writeln!(
            x,
            "  <testsuite name=\"{name}\" tests=\"{}\" failures=\"{failed}\" errors=\"0\" time=\"{time:.3}\">",
            r.cases.len()
        );
        for c in &r.cases {
            let _ = write!(
                x,
                "    <testcase classname=\"{name}\" name=\"{}\" time=\"{:.3}\"",
                esc(&c.name),
                c.time.as_secs_f64()
            );
            if c.failures.is_empty() {
                x.push_str("/>\n");
            } else {
                let first = c.failures[0].lines().next().unwrap_or_default();
                let _ = write!(
                    x,
                    ">\n      <failure message=\"{}\">{}</failure>\n    </testcase>\n",
                    esc(first),
                    esc(&c.failures.join("\n"))
                );
            }
        }
        x.push_str("  </testsuite>\n");
    }
    x.push_str("</testsuites>\n");
    x
}

/// `centralflow test PATHS [--junit FILE]`: returns the exit code.
pub fn main(paths: &[PathBuf], junit_file: Option<&Path>) -> i32 {
    let started = Instant::now();
    let files = match discover(paths) {
        Ok(f) if f.is_empty() => {
            let list: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
            eprintln!("error: no *.test.yaml files under {}", list.join(", "));
            return 2;
        }
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let results: Vec<FileResult> = files.iter().map(|f| run_file(f)).collect();
    let code = report(&results, started.elapsed(), &mut std::io::stdout().lock());
    if let Some(j) = junit_file {
        if let Err(e) = std::fs::write(j, junit(&results)) {
            eprintln!("error: cannot write {}: {e}", j.display());
            return code.max(2);
        }
    }
    code
}
