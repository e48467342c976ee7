//! `rafs-bench [LAYER]`: RAFS conversion benchmark. Converts one OCI layer (default: the Debian
//! base layer of the debian-python fixture, gzip) with `shoal_rafs::build` for each compressor,
//! on one thread and on all cores, and prints throughput (MB/s of uncompressed input tar) and
//! output size (blob + bootstrap) against the gzipped layer, plus the baseline every conversion
//! pays: gunzip alone. Not a test; run with `cargo run --release -p shoal-e2e --bin rafs-bench`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context as _;
use shoal_rafs::build::{build_layer_with, BuildExtras, BuildOptions};
use shoal_rafs::Compressor;

const RUNS: usize = 3;

fn main() -> anyhow::Result<()> {
    let layer = match std::env::args_os().nth(1) {
        Some(p) => PathBuf::from(p),
        None => default_layer()?,
    };
    let gz = std::fs::read(&layer).with_context(|| format!("reading {}", layer.display()))?;
    let t = Instant::now();
    let mut tar = Vec::new();
    flate2::read::MultiGzDecoder::new(&gz[..])
        .read_to_end(&mut tar)
        .context("the layer must be gzip")?;
    let gunzip = t.elapsed().as_secs_f64();
    let mb = tar.len() as f64 / 1e6;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("rafs-bench: {}", layer.display());
    println!(
        "machine: {} cores ({}), kernel {}",
        cores,
        cpu_model(),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    println!(
        "load average at start: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "layer: {:.1} MB gzip, {:.1} MB tar; best of {RUNS} runs; chunk size 1 MiB, blake3",
        gz.len() as f64 / 1e6,
        mb
    );
    println!();
    println!(
        "{:<10} {:>7} {:>10} {:>10} {:>12} {:>9}",
        "compressor", "threads", "seconds", "MB/s", "output MB", "vs gzip"
    );
    println!(
        "{:<10} {:>7} {:>10.2} {:>10.1} {:>12} {:>9}",
        "(gunzip)",
        1,
        gunzip,
        mb / gunzip,
        "-",
        "-"
    );
    for compressor in [Compressor::Zstd, Compressor::Lz4Block, Compressor::None] {
        let mut one = 0.0;
        for threads in [1, cores] {
            if threads == cores && cores == 1 && one > 0.0 {
                continue;
            }
            let (secs, size) = best_of(&gz, compressor, threads)?;
            if threads == 1 {
                one = secs;
            }
            let speedup = if threads > 1 {
                format!("  ({:.2}x vs 1 thread)", one / secs)
            } else {
                String::new()
            };
            println!(
                "{:<10} {:>7} {:>10.2} {:>10.1} {:>12.1} {:>8.2}x{speedup}",
                compressor.name(),
                threads,
                secs,
                mb / secs,
                size as f64 / 1e6,
                size as f64 / gz.len() as f64,
            );
        }
    }
    Ok(())
}

/// Fastest of [`RUNS`] conversions of the gzip layer; (seconds, blob + bootstrap bytes).
fn best_of(gz: &[u8], compressor: Compressor, threads: usize) -> anyhow::Result<(f64, u64)> {
    let opts = BuildOptions {
        compressor,
        ..BuildOptions::default()
    };
    let extras = BuildExtras {
        threads,
        ..BuildExtras::default()
    };
    let mut best = f64::MAX;
    let mut size = 0;
    for _ in 0..RUNS {
        let out = tempfile::tempdir()?;
        let t = Instant::now();
        let r = build_layer_with(gz, &opts, out.path(), &extras)?;
        best = best.min(t.elapsed().as_secs_f64());
        size = r.blob_size + std::fs::metadata(&r.bootstrap)?.len();
    }
    Ok((best, size))
}

/// The first layer of the fixture's `base` manifest.
fn default_layer() -> anyhow::Result<PathBuf> {
    let layout =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/oci/debian-python");
    let blob = |d: &str| {
        layout
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    let digest = index["manifests"]
        .as_array()
        .and_then(|ms| {
            ms.iter()
                .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == "base")
        })
        .and_then(|m| m["digest"].as_str())
        .context("no `base` manifest in the fixture")?;
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(blob(digest))?)?;
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .context("no layer in the base manifest")?;
    Ok(blob(layer))
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".into())
}
