//! Snapshotter benchmark (not a test): from a cold host to the output of
//! `python3 -c 'import json; print(42)'` in a container, on a test host (its own network
//! namespace) behind an origin whose link is shaped (200 Mbit/s by default), side by side in one
//! run:
//!
//! - (a) containerd's default path: `ctr image pull` of the plain OCI image straight from the
//!   origin (unpacked by the overlayfs snapshotter), then `ctr run`;
//! - (b) shoal's snapshotter: `ctr-remote image rpull --snapshotter shoal` of the image
//!   `shoal convert` made of it (through the host's node as mirror), then
//!   `ctr run --snapshotter shoal` (a lazy mount of the image under the container).
//!
//! Each round starts from scratch: a fresh origin, host, node and containerd state for each side
//! (the order of the two alternates between rounds); the origin's blob bytes come from its own
//! log. Prints every round, the medians, their ratio and the machine.
//!
//! `cargo run -p shoal-e2e --bin snapshotter-bench -- [--rounds 3] [--origin-mbit 200]` (root).
//! Needs iproute2, `nsenter`, /dev/fuse, containerd with `ctr`, `ctr-remote`, runc,
//! `docker-registry`, skopeo and the `shoal` binary (or SHOAL_BIN).

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use shoal_e2e::cluster::{mb, Cluster, ClusterOptions, NodeSpec, NODE_MBIT, ORIGIN_MBIT};
use shoal_e2e::containerd::{self, Containerd, CtrOutcome, Place, Source};
use shoal_e2e::setup::{IMAGE, REPO};
use shoal_e2e::{nydus, TestCtx};

/// What the container runs.
const PYTHON: &[&str] = &["python3", "-c", "import json; print(42)"];
/// The tag `shoal convert` writes the Nydus image under.
const NYDUS_TAG: &str = "1-nydus";

/// One side of one round.
#[derive(Debug, Clone, Copy)]
struct Cold {
    /// `ctr image pull` / `ctr-remote image rpull`.
    pull: Duration,
    /// `ctr run` to the container's exit (its output checked).
    run: Duration,
    /// Blob bytes the origin sent for pull and run.
    origin_bytes: u64,
}

impl Cold {
    fn total(&self) -> Duration {
        self.pull + self.run
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Overlayfs,
    Shoal,
}

fn main() -> Result<()> {
    let mut rounds = 3usize;
    let mut origin_mbit = ORIGIN_MBIT;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rounds" => rounds = args.next().context("--rounds N")?.parse()?,
            "--origin-mbit" => origin_mbit = args.next().context("--origin-mbit N")?.parse()?,
            other => bail!(
                "unknown argument {other:?} (usage: snapshotter-bench [--rounds N] [--origin-mbit N])"
            ),
        }
    }
    ensure!(
        rounds > 0 && origin_mbit > 0,
        "rounds and the rate must be positive"
    );
    ensure!(
        shoal_e2e::ctx::is_root(),
        "snapshotter-bench needs root (network namespaces, containerd, FUSE)"
    );
    if let Some(why) = shoal_e2e::netns::unavailable() {
        bail!("cannot build test hosts: {why}");
    }
    println!(
        "cold host to `python3 -c 'import json; print(42)'` in a container; origin link \
         {origin_mbit} Mbit/s, host link {NODE_MBIT} Mbit/s; {rounds} rounds"
    );
    let (mut oci, mut shoal) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let order = if r % 2 == 0 {
            [Side::Overlayfs, Side::Shoal]
        } else {
            [Side::Shoal, Side::Overlayfs]
        };
        for side in order {
            let cold =
                round(side, origin_mbit).with_context(|| format!("round {} ({side:?})", r + 1))?;
            println!(
                "round {} {:<42} {:>6.2} s (pull {:>5.2} s, run {:>5.2} s), origin {:>6.1} MB",
                r + 1,
                label(side),
                cold.total().as_secs_f64(),
                cold.pull.as_secs_f64(),
                cold.run.as_secs_f64(),
                mb(cold.origin_bytes)
            );
            match side {
                Side::Overlayfs => oci.push(cold),
                Side::Shoal => shoal.push(cold),
            }
        }
    }
    let (a, b) = (median(&oci), median(&shoal));
    println!("median of {rounds}:");
    for (side, m) in [(Side::Overlayfs, a), (Side::Shoal, b)] {
        println!(
            "  {:<42} {:>6.2} s (pull {:>5.2} s, run {:>5.2} s), origin {:>6.1} MB",
            label(side),
            m.total.as_secs_f64(),
            m.pull.as_secs_f64(),
            m.run.as_secs_f64(),
            mb(m.origin_bytes)
        );
    }
    println!(
        "ratio (overlayfs / shoal): time {:.2}x, origin bytes {:.1}x",
        a.total.as_secs_f64() / b.total.as_secs_f64().max(1e-9),
        a.origin_bytes as f64 / (b.origin_bytes as f64).max(1.0)
    );
    println!("machine: {}", machine());
    Ok(())
}

fn label(side: Side) -> &'static str {
    match side {
        Side::Overlayfs => "(a) ctr image pull + ctr run (overlayfs, OCI)",
        Side::Shoal => "(b) ctr-remote rpull + ctr run (shoal, Nydus)",
    }
}

/// One cold start on a fresh one-host cluster (origin, host, node, containerd).
fn round(side: Side, origin_mbit: u32) -> Result<Cold> {
    let t = TestCtx::standalone("snap-bench")?;
    let socket = t.dir().join("s.sock");
    let spec = NodeSpec::standalone()
        .with_args(["--snapshotter-socket".into(), socket.display().to_string()]);
    let options = ClusterOptions {
        origin_mbit,
        ..ClusterOptions::of(vec![spec])
    };
    let cluster = Cluster::start(&t, &options)?;
    let origin = cluster.origin();
    let oci = format!("{}/{IMAGE}", origin.addr());
    let nydus_ref = format!("{}/{REPO}:{NYDUS_TAG}", origin.addr());
    // Both images are in the origin in either round: the conversion is not timed.
    nydus::shoal_convert(&t, &oci, &nydus_ref)?;
    let cold = match side {
        Side::Overlayfs => {
            let ctrd = Containerd::start_in(&t, Place::Net(cluster.host(0).ns.clone()))?;
            measure(
                &cluster,
                || ctrd.pull_into("overlayfs", Source::Direct, &oci),
                || ctrd.run("overlayfs", &oci, "bench-oci", PYTHON),
            )?
        }
        Side::Shoal => {
            let (config, hosts) = containerd::shoal_config(
                &t,
                "root",
                &origin.addr(),
                &origin.url(),
                &cluster.node(0).url(),
                &socket,
            )?;
            let place = Place::NodeNamespaces(cluster.node_pid(0)?);
            let ctrd = Containerd::start_with_config_in(&t, &config, place)?;
            measure(
                &cluster,
                || ctrd.rpull("shoal", Source::Hosts(&hosts), &nydus_ref),
                || ctrd.run("shoal", &nydus_ref, "bench-shoal", PYTHON),
            )?
        }
    };
    drop(cluster);
    if std::env::var_os("SHOAL_E2E_KEEP").is_some() {
        eprintln!("kept {}", t.dir().display());
        // Leaking the context keeps its temp dir (the processes are gone).
        std::mem::forget(t);
    } else {
        shoal_e2e::ctx::detach_mounts_under(t.dir());
    }
    Ok(cold)
}

/// Times `pull`, then `run` (which must print 42), and counts the origin's blob bytes for both.
fn measure(
    cluster: &Cluster,
    pull: impl FnOnce() -> Result<CtrOutcome>,
    run: impl FnOnce() -> Result<CtrOutcome>,
) -> Result<Cold> {
    let mark = cluster.origin_mark()?;
    let started = Instant::now();
    pull()?.ok("pull")?;
    let pulled = started.elapsed();
    let out = run()?.ok("ctr run")?;
    let total = started.elapsed();
    ensure!(out.trim() == "42", "the container printed {out:?}");
    Ok(Cold {
        pull: pulled,
        run: total - pulled,
        origin_bytes: cluster.origin_blob_bytes_since(mark)?,
    })
}

/// Medians of each figure on its own.
#[derive(Debug, Clone, Copy)]
struct Median {
    total: Duration,
    pull: Duration,
    run: Duration,
    origin_bytes: u64,
}

fn median(v: &[Cold]) -> Median {
    fn mid<T: Ord + Copy>(mut xs: Vec<T>) -> T {
        xs.sort();
        xs[xs.len() / 2]
    }
    Median {
        total: mid(v.iter().map(Cold::total).collect()),
        pull: mid(v.iter().map(|c| c.pull).collect()),
        run: mid(v.iter().map(|c| c.run).collect()),
        origin_bytes: mid(v.iter().map(|c| c.origin_bytes).collect()),
    }
}

/// CPUs, their model, memory, kernel, and how the node was built.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown cpu".into());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / (1024.0 * 1024.0));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_owned())
        .unwrap_or_default();
    format!(
        "{} cpus ({cpu}), {mem_gib:.0} GiB, Linux {kernel}; {}, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        shoal_e2e::paths::shoal_build(),
        containerd_version()
    )
}

fn containerd_version() -> String {
    std::process::Command::new("containerd")
        .arg("--version")
        .output()
        .ok()
        .map(|o| {
            let v = String::from_utf8_lossy(&o.stdout);
            v.split_whitespace()
                .nth(2)
                .map_or_else(|| "containerd ?".into(), |v| format!("containerd {v}"))
        })
        .unwrap_or_else(|| "containerd ?".into())
}
