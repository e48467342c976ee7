//! Issue 15's table, one row per figure, from several benchmarks run by one command
//! (`e2e/fast-paths`): each benchmark prints its own tables and, when `SHOAL_BENCH_ROWS` names a
//! file, also appends one markdown row per figure to it — the path, shoal's figure, the baseline
//! measured in the same run, their ratio and the goal — which the runner prints at the end.

use std::io::Write as _;

/// The environment variable naming the rows file.
pub const ENV: &str = "SHOAL_BENCH_ROWS";

/// Appends a row to the file `SHOAL_BENCH_ROWS` names; nothing when it is unset.
pub fn row(path: &str, shoal: &str, baseline: &str, ratio: f64, goal: &str) {
    let Some(file) = std::env::var_os(ENV) else {
        return;
    };
    let line = format!("| {path} | {shoal} | {baseline} | {ratio:.2}× | {goal} |\n");
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&file)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        eprintln!("cannot append to {}: {e}", file.to_string_lossy());
    }
}
