//! Benchmark runner (not a test). `shoal-bench mirror [--size-mib N] [--rounds N]`: serves a cached
//! random blob (1 GiB by default) through a node's mirror and, in the same run and the same way,
//! straight from the origin registry, and prints both throughputs, their ratio, each server's CPU
//! per GiB served (and the node's for the cold pull before them) and the machine.
//!
//! Needs `docker-registry` on PATH and the `shoal` binary (`cargo build -p shoal-node`, or SHOAL_BIN).

use std::io::Read;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use sha2::{Digest as _, Sha256};
use shoal_e2e::load::ProcStat;
use shoal_e2e::node::Node;
use shoal_e2e::registry::Registry;
use shoal_e2e::wait::poll;
use shoal_e2e::{http, rows, TestCtx};

const REPO: &str = "bench/blob";
const SEED: u64 = 0x005e_ed0f_54a1;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("mirror") => mirror(parse_options(&args[1..])?),
        _ => {
            eprintln!(
                "usage: shoal-bench mirror [--size-mib N] [--rounds N]\n\n\
                 mirror: GET a cached blob through a shoal node and straight from the origin \
                 registry, N rounds each, and print both throughputs and their ratio."
            );
            std::process::exit(2);
        }
    }
}

#[derive(Debug)]
struct Options {
    size: u64,
    rounds: usize,
}

fn parse_options(args: &[String]) -> Result<Options> {
    let mut options = Options {
        size: 1 << 30,
        rounds: 3,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--size-mib" => options.size = value.parse::<u64>()? << 20,
            "--rounds" => options.rounds = value.parse()?,
            other => bail!("unknown flag {other}"),
        }
    }
    ensure!(
        options.size > 0 && options.rounds > 0,
        "size and rounds must be positive"
    );
    Ok(options)
}

fn mirror(options: Options) -> Result<()> {
    let ctx = TestCtx::standalone("bench-mirror")?;
    let registry = Registry::start(&ctx)?;
    let size = options.size;

    let started = Instant::now();
    let digest = digest_of(RandomReader::new(SEED, size))?;
    registry.push_blob_reader(REPO, &digest, RandomReader::new(SEED, size), size)?;
    println!(
        "pushed {} MiB random blob {digest} in {:.1?}",
        size >> 20,
        started.elapsed()
    );

    let node = Node::start(&ctx, &registry.url())?;
    let mirror_url = format!("{}/v2/{REPO}/blobs/{digest}", node.url());
    let origin_url = format!("{}/v2/{REPO}/blobs/{digest}", registry.url());

    let node_pid = node.pid().context("the node is not running")?;
    let reg_pid = registry.pid().context("the registry is not running")?;
    let cpu = |pid: u32| ProcStat::of(pid).map(|s| s.cpu);
    let cold_cpu_before = cpu(node_pid)?;
    let cold = Instant::now();
    let first = http::fetch_hashed(http::client()?.get(&mirror_url))?;
    ensure!(
        first.status.as_u16() == 200 && first.digest == digest,
        "cold pull: {first:?}"
    );
    let cold = cold.elapsed();
    poll(
        "the node to record the blob complete",
        Duration::from_secs(60),
        || {
            Ok(node
                .status()?
                .blob(&digest)
                .is_some_and(|b| b.complete)
                .then_some(()))
        },
    )?;
    let cold_cpu = cpu(node_pid)?.saturating_sub(cold_cpu_before);
    println!(
        "cold pull through the mirror (origin fetch + store): {}; node CPU {:.2} s per GiB",
        rate(size, cold),
        per_gib(cold_cpu, size)
    );

    // A reader remembers the pieces it verified only for a content file whose timestamps are
    // a second old or more (`store/reader.rs`: a write within the same clock tick could leave
    // them unchanged); the fill just wrote this one. Wait, so that the warm-up's verification
    // is the one that counts and the timed rounds serve verified pieces, as a node serving a
    // blob it fetched more than a second ago does.
    std::thread::sleep(Duration::from_millis(1100));
    // One untimed read of each side first, so neither is measured against the other's
    // write-back of the freshly stored copy or a cold page cache.
    let warm_mirror = timed_get(&mirror_url, size)?;
    let warm_origin = timed_get(&origin_url, size)?;
    println!(
        "warm-up (untimed): mirror {}, origin {}",
        rate(size, warm_mirror),
        rate(size, warm_origin)
    );

    let mut mirror_times = Vec::new();
    let mut origin_times = Vec::new();
    let (mut node_cpu, mut reg_cpu) = (Duration::ZERO, Duration::ZERO);
    for round in 1..=options.rounds {
        // Alternate the order so neither side always runs on a warmer page cache.
        let order = if round % 2 == 1 {
            [true, false]
        } else {
            [false, true]
        };
        for via_mirror in order {
            let url = if via_mirror { &mirror_url } else { &origin_url };
            let pid = if via_mirror { node_pid } else { reg_pid };
            let before = cpu(pid)?;
            let took = timed_get(url, size)?;
            let used = cpu(pid)?.saturating_sub(before);
            if via_mirror {
                node_cpu += used;
            } else {
                reg_cpu += used;
            }
            let (label, times) = if via_mirror {
                ("mirror (cached)", &mut mirror_times)
            } else {
                ("origin (direct)", &mut origin_times)
            };
            println!("round {round}: {label:16} {}", rate(size, took));
            times.push(took);
        }
    }

    let mirror_best = best(&mirror_times)?;
    let origin_best = best(&origin_times)?;
    let mirror_mbs = mbs(size, mirror_best);
    let origin_mbs = mbs(size, origin_best);
    println!();
    println!(
        "blob: {} MiB, {} rounds each, body read fully and discarded",
        size >> 20,
        options.rounds
    );
    println!(
        "mirror (cached): best {mirror_mbs:.0} MB/s, median {:.0} MB/s",
        mbs(size, median(&mirror_times)?)
    );
    println!(
        "origin (direct): best {origin_mbs:.0} MB/s, median {:.0} MB/s",
        mbs(size, median(&origin_times)?)
    );
    println!("ratio mirror/origin (best): {:.2}", mirror_mbs / origin_mbs);
    println!(
        "ratio mirror/origin (median): {:.2}",
        mbs(size, median(&mirror_times)?) / mbs(size, median(&origin_times)?)
    );
    let served = size * options.rounds as u64;
    println!(
        "server CPU per GiB served: node (cached) {:.2} s, origin registry {:.2} s",
        per_gib(node_cpu, served),
        per_gib(reg_cpu, served)
    );
    println!("machine: {}", machine());
    let (mirror_med, origin_med) = (median(&mirror_times)?, median(&origin_times)?);
    let gib = size as f64 / (1u64 << 30) as f64;
    rows::row(
        &format!("cached {gib:.0} GiB blob through the mirror, median time"),
        &format!("{:.2} s", mirror_med.as_secs_f64()),
        &format!("origin registry {:.2} s", origin_med.as_secs_f64()),
        mirror_med.as_secs_f64() / origin_med.as_secs_f64(),
        "≤ 0.64×",
    );
    let (node_per, reg_per) = (per_gib(node_cpu, served), per_gib(reg_cpu, served));
    rows::row(
        "server CPU per cached GiB served",
        &format!("node {node_per:.2} s"),
        &format!("registry {reg_per:.2} s"),
        node_per / reg_per,
        "≤ 1×",
    );
    rows::row(
        &format!("cold {gib:.0} GiB blob through a standalone node, throughput"),
        &rate(size, cold),
        &format!("origin directly {:.0} MB/s (median)", mbs(size, origin_med)),
        mbs(size, cold) / mbs(size, origin_med),
        "≥ 0.8×",
    );
    rows::row(
        "node CPU per cold GiB",
        &format!("{:.2} s", per_gib(cold_cpu, size)),
        "none (the ratio is to the goal, 1 s)",
        per_gib(cold_cpu, size),
        "≤ 1 s",
    );
    Ok(())
}

/// CPU seconds per GiB of `bytes`.
fn per_gib(cpu: Duration, bytes: u64) -> f64 {
    cpu.as_secs_f64() * (1u64 << 30) as f64 / bytes.max(1) as f64
}

/// GETs `url`, reads and discards the whole body, checks its length; returns the wall time.
fn timed_get(url: &str, size: u64) -> Result<Duration> {
    let client = http::client()?;
    let start = Instant::now();
    let mut response = client.get(url).send()?;
    ensure!(
        response.status().as_u16() == 200,
        "GET {url}: {}",
        response.status()
    );
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = response.read(&mut buf)?;
        if n == 0 {
            break;
        }
        len += n as u64;
    }
    let took = start.elapsed();
    ensure!(len == size, "GET {url}: {len} bytes of {size}");
    Ok(took)
}

fn digest_of(mut reader: impl Read) -> Result<String> {
    let mut hasher = Sha256::new();
    std::io::copy(&mut reader, &mut hasher)?;
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

/// Deterministic pseudo-random bytes (xorshift64*), so the blob can be hashed and then uploaded
/// without keeping a copy on disk.
struct RandomReader {
    state: u64,
    remaining: u64,
}

impl RandomReader {
    fn new(seed: u64, len: u64) -> Self {
        Self {
            state: seed | 1,
            remaining: len,
        }
    }
}

impl Read for RandomReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.remaining) as usize;
        for chunk in buf[..n].chunks_mut(8) {
            self.state ^= self.state >> 12;
            self.state ^= self.state << 25;
            self.state ^= self.state >> 27;
            let word = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

fn mbs(size: u64, took: Duration) -> f64 {
    size as f64 / 1e6 / took.as_secs_f64()
}

fn rate(size: u64, took: Duration) -> String {
    format!("{:.0} MB/s ({:.2} s)", mbs(size, took), took.as_secs_f64())
}

fn best(times: &[Duration]) -> Result<Duration> {
    times.iter().min().copied().context("no rounds")
}

fn median(times: &[Duration]) -> Result<Duration> {
    let mut sorted = times.to_vec();
    sorted.sort();
    sorted.get(sorted.len() / 2).copied().context("no rounds")
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown cpu".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_owned())
        })
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(String::new(), |kb| format!(", {} GiB RAM", kb >> 20));
    format!("nproc {cpus}, {cpu}{mem}, Linux {}", kernel.trim())
}
