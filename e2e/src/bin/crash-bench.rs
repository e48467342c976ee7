//! Crash-point runner (issue 12, R5; not a test). `crash-bench [--step-kib 192] [--hits 4]`:
//! `kill -9`s a node at every case of `shoal_e2e::crash::cases` — byte offsets every `--step-kib`
//! over a download and over a download that evicts, each store crash point at its first `--hits`
//! hits, completion and the eviction's drop points, and both sides of a peer transfer — restarts
//! it each time and checks every
//! byte it holds and serves. Prints one table: points tried, bad bytes served, corrupt at rest,
//! committed blobs lost, restart times.
//!
//! Needs `docker-registry` on PATH and a `shoal` built with `--features fault-injection`
//! (`cargo build -p shoal-node --features fault-injection`, or SHOAL_BIN).

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use shoal_e2e::crash::{cases, run_case, CaseResult, Origin};
use shoal_e2e::TestCtx;

fn main() -> Result<()> {
    let mut step = 192usize << 10;
    let mut hits = 4u64;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--step-kib" => step = value.parse::<usize>()? << 10,
            "--hits" => hits = value.parse()?,
            other => bail!("unknown flag {other}; usage: crash-bench [--step-kib N] [--hits N]"),
        }
    }
    ensure!(
        step > 0 && hits > 0,
        "--step-kib and --hits must be positive"
    );
    let ctx = TestCtx::standalone("bench-crash")?;
    let origin = Origin::start(&ctx)?;
    let all = cases(step, hits);
    eprintln!("{} cases", all.len());
    let mut results: Vec<CaseResult> = Vec::new();
    for (i, case) in all.iter().enumerate() {
        let r = run_case(&ctx, &origin, case, &format!("node-{i}"))?;
        eprintln!(
            "[{}/{}] {} {}: crashed {}, restart {:?}, bad served {}, bad at rest {}, lost {}",
            i + 1,
            all.len(),
            case.scenario.label(),
            case.spec,
            r.crashed,
            r.restart,
            r.bad_served.len(),
            r.bad_at_rest.len(),
            r.lost.len()
        );
        for bad in r.bad_served.iter().chain(&r.bad_at_rest).chain(&r.lost) {
            eprintln!("    {bad}");
        }
        results.push(r);
    }
    println!(
        "\nCrash points: kill -9 of a node (SIGKILL from a failpoint), restart, check; {} cores\n",
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    println!("| scenario | points | crashed | bad blobs served | corrupt at rest | committed blobs lost | restart p50 | restart max |");
    println!("|---|---|---|---|---|---|---|---|");
    // One row per scenario and kind of point (byte offsets or named points), in run order.
    let group = |r: &CaseResult| {
        let kind = if r.case.spec.starts_with("write:") {
            "byte offsets"
        } else {
            "named crash points"
        };
        format!("{}: {kind}", r.case.scenario.label())
    };
    let mut groups: Vec<String> = Vec::new();
    for r in &results {
        if !groups.contains(&group(r)) {
            groups.push(group(r));
        }
    }
    groups.push("all".to_owned());
    for label in &groups {
        let filter = |r: &CaseResult| label == "all" || group(r) == *label;
        let rows: Vec<&CaseResult> = results.iter().filter(|r| filter(r)).collect();
        let mut restarts: Vec<Duration> = rows.iter().map(|r| r.restart).collect();
        restarts.sort_unstable();
        let p50 = restarts
            .get(restarts.len() / 2)
            .copied()
            .unwrap_or_default();
        let max = restarts.last().copied().unwrap_or_default();
        println!(
            "| {label} | {} | {} | {} | {} | {} | {:.0} ms | {:.0} ms |",
            rows.len(),
            rows.iter().filter(|r| r.crashed).count(),
            rows.iter().map(|r| r.bad_served.len()).sum::<usize>(),
            rows.iter().map(|r| r.bad_at_rest.len()).sum::<usize>(),
            rows.iter().map(|r| r.lost.len()).sum::<usize>(),
            p50.as_secs_f64() * 1000.0,
            max.as_secs_f64() * 1000.0
        );
    }
    let bad = results
        .iter()
        .any(|r| !r.bad_served.is_empty() || !r.bad_at_rest.is_empty() || !r.lost.is_empty());
    ensure!(!bad, "a crash left bad bytes or lost a committed blob");
    Ok(())
}
