//! Prewarm benchmark (not a test): `shoal prewarm IMAGE --wait` of the fixture image on a fresh
//! loopback cluster of N nodes, next to the same on a fresh cluster of one node, in the same run;
//! prints both times, their ratio, the origin's blob bytes per image byte (from the registry's
//! log) and the machine.
//!
//! `cargo run -p shoal-e2e --bin prewarm-bench -- [--nodes 8] [--rounds 2]`
//! Needs `docker-registry` and `skopeo` on PATH and the `shoal` binary (or SHOAL_BIN).

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use shoal_e2e::loopback::LoopbackCluster;
use shoal_e2e::setup;
use shoal_e2e::wait::poll;
use shoal_e2e::TestCtx;

/// Jobs submitted while the scheduler still refuses leases (its warm-up after start) would time
/// the warm-up; wait past it.
const SCHEDULER_WARMUP_MS: u64 = 3_500;

struct Round {
    wall: Duration,
    /// When the slowest node reported done, from the job's creation.
    slowest_ms: u64,
    origin_ratio: f64,
}

fn main() -> Result<()> {
    let mut nodes = 8usize;
    let mut rounds = 2usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--nodes" => nodes = args.next().context("--nodes N")?.parse()?,
            "--rounds" => rounds = args.next().context("--rounds N")?.parse()?,
            other => {
                bail!("unknown argument {other:?} (usage: prewarm-bench [--nodes N] [--rounds N])")
            }
        }
    }
    ensure!(nodes > 0 && rounds > 0, "nodes and rounds must be positive");
    println!(
        "machine: {} cpus, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(
                |c| c.lines().find(|l| l.starts_with("model name")).map(|l| l
                    .split(':')
                    .nth(1)
                    .unwrap_or("")
                    .trim()
                    .to_string())
            )
            .unwrap_or_else(|| "unknown cpu".into())
    );
    for r in 0..rounds {
        let one = round(1)?;
        let many = round(nodes)?;
        println!(
            "round {}: 1 node {:.2}s (slowest done after {:.2}s, origin {:.3}x) | {nodes} nodes {:.2}s (slowest done after {:.2}s, origin {:.3}x) | ratio {:.2}",
            r + 1,
            one.wall.as_secs_f64(),
            one.slowest_ms as f64 / 1e3,
            one.origin_ratio,
            many.wall.as_secs_f64(),
            many.slowest_ms as f64 / 1e3,
            many.origin_ratio,
            many.wall.as_secs_f64() / one.wall.as_secs_f64(),
        );
    }
    Ok(())
}

fn round(nodes: usize) -> Result<Round> {
    let t = TestCtx::standalone(&format!("prewarm-bench-{nodes}"))?;
    let (registry, image) = setup::anonymous_origin(&t)?;
    let c = LoopbackCluster::start_with(&t, registry, image, nodes, &[])?;
    poll("the scheduler's warm-up", Duration::from_secs(30), || {
        let up = c.scheduler.status()?.scheduler.uptime_ms;
        Ok((up >= SCHEDULER_WARMUP_MS).then_some(()))
    })?;
    let mark = c.registry.log()?.requests.len();
    let started = Instant::now();
    let out = c.prewarm(&[&c.image_ref(), "--wait", "--json"])?;
    let wall = started.elapsed();
    ensure!(
        out.status.success(),
        "prewarm on {nodes} nodes failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let slowest_ms = job["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["finished_after_ms"].as_u64())
        .max()
        .unwrap_or(0);
    let image_bytes: u64 = c.image.blobs().iter().map(|d| d.size).sum();
    let origin = c.registry.log()?.since(mark).blob_bytes_written();
    drop(c);
    if std::env::var_os("SHOAL_E2E_KEEP").is_some() {
        eprintln!("{nodes} nodes: kept {}", t.dir().display());
        // Leaking the context keeps its temp dir (the processes are gone).
        std::mem::forget(t);
    }
    Ok(Round {
        wall,
        slowest_ms,
        origin_ratio: origin as f64 / image_bytes as f64,
    })
}
