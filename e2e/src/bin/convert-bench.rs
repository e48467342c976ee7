//! `convert-bench [ROUNDS]`: how long `shoal convert` takes for the Debian + python3 fixture,
//! from one real registry to another, next to what moving the same image costs without converting it
//! (`skopeo copy docker:// docker://` between the same two registries) and to the bare RAFS builds
//! of its layers in-process (no registry). Each round converts into a fresh repository with an
//! empty work dir (cold: fetch, build, push everything); then a rerun (work dir and target
//! warm: every blob skipped). Best of ROUNDS (default 3). Not a test:
//! `cargo build -p shoal-node && cargo run -p shoal-e2e --bin convert-bench`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use shoal_e2e::registry::Registry;
use shoal_e2e::{paths, setup, skopeo, TestCtx};
use shoal_rafs::build::{build_layer_with, BuildExtras, BuildOptions};

fn main() -> Result<()> {
    let rounds: usize = match std::env::args().nth(1) {
        Some(n) => n.parse().context("ROUNDS must be a number")?,
        None => 3,
    };
    let ctx = TestCtx::standalone("bench-convert")?;
    let registry = Registry::start(&ctx)?;
    skopeo::push_fixture(&ctx, &registry, setup::IMAGE)?;
    let image = setup::fixture_image()?;
    let src = format!("{}/{}", registry.addr(), setup::IMAGE);
    machine();
    println!(
        "image: {src} (the debian-python fixture: {} layers, {:.1} MB compressed); best of {rounds}",
        image.layers.len(),
        image.layer_bytes() as f64 / 1e6
    );
    println!();

    let mut cold = Vec::new();
    let mut warm = Vec::new();
    let mut copy = Vec::new();
    let mut summary = serde_json::Value::Null;
    for round in 1..=rounds {
        // A fresh target registry per round, so that neither tool can find or mount a blob
        // there from an earlier round (skopeo remembers where blobs live): every byte moves.
        let target = Registry::start(&ctx)?;
        let work = ctx.subdir("work")?;
        let dst = format!("{}/bench/nydus{round}:1", target.addr());
        let (took, s) = convert(&ctx, &work, &src, &dst)?;
        println!(
            "round {round}: shoal convert (cold)        {:6.2} s",
            took.as_secs_f64()
        );
        cold.push(took);
        let (took, again) = convert(&ctx, &work, &src, &dst)?;
        ensure!(
            again["blobs_pushed"] == 0,
            "the rerun pushed blobs: {again}"
        );
        println!(
            "round {round}: shoal convert (rerun)       {:6.2} s",
            took.as_secs_f64()
        );
        warm.push(took);
        let took = skopeo_copy(
            &ctx,
            &src,
            &format!("{}/bench/copy{round}:1", target.addr()),
        )?;
        println!(
            "round {round}: skopeo copy (no conversion) {:6.2} s",
            took.as_secs_f64()
        );
        copy.push(took);
        summary = s;
    }
    let builds = local_builds(&ctx, &image)?;
    let best = |v: &[Duration]| v.iter().min().copied().unwrap_or_default().as_secs_f64();
    let (c, w, k) = (best(&cold), best(&warm), best(&copy));
    println!();
    println!(
        "shoal convert, cold:                {c:6.2} s  ({:.1} MB/s of compressed source)",
        image.layer_bytes() as f64 / 1e6 / c
    );
    println!("shoal convert, rerun (all skipped): {w:6.2} s");
    println!("skopeo copy of the same image:      {k:6.2} s");
    println!("RAFS builds of the layers alone:    {builds:6.2} s  (in-process, from local files, one at a time)");
    println!("ratio convert / skopeo copy:        {:6.2}x", c / k);
    println!(
        "output: {} chunks, source {:.1} MB → Nydus {:.1} MB",
        summary["chunks"],
        summary["source_bytes"].as_f64().unwrap_or_default() / 1e6,
        summary["nydus_bytes"].as_f64().unwrap_or_default() / 1e6
    );
    Ok(())
}

fn convert(
    ctx: &TestCtx,
    work: &Path,
    src: &str,
    dst: &str,
) -> Result<(Duration, serde_json::Value)> {
    let started = Instant::now();
    let out = Command::new(paths::shoal_bin()?)
        .args(["convert", "--plain-http", "--json", "--work-dir"])
        .arg(work)
        .args([src, dst])
        .env("HOME", ctx.dir())
        .env_remove("REGISTRY_AUTH_FILE")
        .output()
        .context("running shoal convert")?;
    let took = started.elapsed();
    ensure!(
        out.status.success(),
        "shoal convert: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((took, serde_json::from_slice(&out.stdout)?))
}

fn skopeo_copy(ctx: &TestCtx, src: &str, dst: &str) -> Result<Duration> {
    let policy = ctx.dir().join("bench-policy.json");
    std::fs::write(
        &policy,
        br#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )?;
    let started = Instant::now();
    let out = Command::new("skopeo")
        .arg("--policy")
        .arg(&policy)
        .env("REGISTRY_AUTH_FILE", ctx.dir().join("no-auth.json"))
        .env("HOME", ctx.dir())
        .args([
            "copy",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            "--src-no-creds",
            "--dest-no-creds",
        ])
        .arg(format!("docker://{src}"))
        .arg(format!("docker://{dst}"))
        .output()
        .context("running skopeo")?;
    let took = started.elapsed();
    ensure!(
        out.status.success(),
        "skopeo copy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(took)
}

/// The RAFS builds alone: each fixture layer from its local file, all cores, no registry.
fn local_builds(ctx: &TestCtx, image: &shoal_e2e::fixture::Image) -> Result<f64> {
    let blobs = paths::debian_python_layout().join("blobs/sha256");
    let started = Instant::now();
    for (i, l) in image.layers.iter().enumerate() {
        let f = std::fs::File::open(blobs.join(l.digest.trim_start_matches("sha256:")))?;
        let out = ctx.subdir(&format!("build{i}"))?;
        build_layer_with(
            std::io::BufReader::new(f),
            &BuildOptions::default(),
            &out,
            &BuildExtras::default(),
        )?;
    }
    Ok(started.elapsed().as_secs_f64())
}

fn machine() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown cpu".into());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "machine: {cores} cores ({model}), load average {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
}
