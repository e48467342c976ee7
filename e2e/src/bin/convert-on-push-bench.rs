//! `convert-on-push-bench [ROUNDS]`: the time from the end of a `skopeo copy` of the Debian +
//! python3 fixture into a registry to a mountable lazy image, with the node's conversion service (the registry
//! notifies it; nobody runs a command) next to what a user would otherwise do in the same run:
//! push, then run `shoal convert` by hand. Also the origin's blob bytes each way (the registry's
//! log), and — the service's second gain — what converting a second version sharing the base
//! layer reads from the origin (nothing: the layer is in the node's store).
//!
//! Not a test. `cargo build -p shoal-node && cargo run -p shoal-e2e --bin convert-on-push-bench`.
//! Needs `docker-registry` and `skopeo`; as root with /dev/fuse it also mounts each result and
//! runs python3 in it (the "mountable" point), else it stops at the tag.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use shoal_e2e::node::{Node, NodeOptions};
use shoal_e2e::registry::Registry;
use shoal_e2e::wait::free_port;
use shoal_e2e::{http, lazy, paths, setup, skopeo, TestCtx};

const SECRET: &str = "convert-on-push-bench-secret";

fn main() -> Result<()> {
    let rounds: usize = match std::env::args().nth(1) {
        Some(n) => n.parse().context("ROUNDS must be a number")?,
        None => 3,
    };
    let mount = shoal_e2e::ctx::is_root() && Path::new("/dev/fuse").exists();
    let image = setup::fixture_image()?;
    println!(
        "machine: {} cpus; image: the debian-python fixture ({} layers, {:.1} MB compressed); {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        image.layers.len(),
        image.layer_bytes() as f64 / 1e6,
        if mount {
            "until python3 runs in a shoal mount of the result"
        } else {
            "until the tag exists (not root: no mount)"
        }
    );
    let (mut service, mut manual) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let ctx = TestCtx::standalone(&format!("bench-convert-on-push-{round}"))?;
        let port = free_port()?;
        let registry =
            Registry::start_notifying(&ctx, &format!("http://127.0.0.1:{port}/events"), SECRET)?;
        let dir = ctx.subdir("config")?;
        std::fs::write(dir.join("secret"), SECRET)?;
        std::fs::write(
            dir.join("node.toml"),
            format!(
                "[convert]\nlisten = \"127.0.0.1:{port}\"\nsecret_file = \"{}\"\n",
                dir.join("secret").display()
            ),
        )?;
        let node = Node::start_with(
            &ctx,
            NodeOptions {
                config: Some(dir.join("node.toml")),
                ..NodeOptions::upstream(&registry.url())
            },
        )?;
        let reg = registry.addr();

        // The service: push, and wait.
        let mark = registry.log()?.requests.len();
        let push = Instant::now();
        skopeo::push_fixture(&ctx, &registry, "app:1")?;
        let pushed = push.elapsed();
        let start = Instant::now();
        wait_tag(&registry, "app", "1-nydus")?;
        let tagged = start.elapsed();
        // Before the mount, whose lazy reads are the origin's too.
        let origin = origin_blob_bytes(&registry, mark)?;
        if mount {
            mount_and_run(&ctx, &node, &format!("{reg}/app:1-nydus"), "m1")?;
        }
        let ready = start.elapsed();

        // A second version sharing the base layer: what it reads from the origin.
        let mark2 = registry.log()?.requests.len();
        skopeo::push_fixture_ref(&ctx, &registry, "base", "app:2")?;
        wait_tag(&registry, "app", "2-nydus")?;
        let origin2 = origin_blob_bytes(&registry, mark2)?;
        service.push((tagged, ready, origin, origin2));

        // By hand: push, then `shoal convert` (cold work dir), then mount.
        let work = ctx.subdir("work")?;
        skopeo::push_fixture(&ctx, &registry, "hand:1")?;
        let mark = registry.log()?.requests.len();
        let start = Instant::now();
        convert_by_hand(
            &ctx,
            &work,
            &format!("{reg}/hand:1"),
            &format!("{reg}/hand:1-nydus"),
            None,
        )?;
        let tagged_h = start.elapsed();
        let origin_h = origin_blob_bytes(&registry, mark)?;
        if mount {
            mount_and_run(&ctx, &node, &format!("{reg}/hand:1-nydus"), "m2")?;
        }
        let ready_h = start.elapsed();
        skopeo::push_fixture_ref(&ctx, &registry, "base", "hand:2")?;
        let mark2 = registry.log()?.requests.len();
        let dict = format!("{reg}/hand:1-nydus");
        convert_by_hand(
            &ctx,
            &work,
            &format!("{reg}/hand:2"),
            &format!("{reg}/hand:2-nydus"),
            Some(&dict),
        )?;
        let origin2_h = origin_blob_bytes(&registry, mark2)?;
        manual.push((tagged_h, ready_h, origin_h));
        println!(
            "round {round}: push {:.1} s; then service: → tag {:.1} s, → mountable {:.1} s, origin blob bytes {:.1} MB, second version {:.1} MB | by hand (shoal convert): → tag {:.1} s, → mountable {:.1} s, origin blob bytes {:.1} MB, second version (--chunk-dict) {:.1} MB",
            pushed.as_secs_f64(),
            tagged.as_secs_f64(),
            ready.as_secs_f64(),
            origin as f64 / 1e6,
            origin2 as f64 / 1e6,
            tagged_h.as_secs_f64(),
            ready_h.as_secs_f64(),
            origin_h as f64 / 1e6,
            origin2_h as f64 / 1e6,
        );
    }
    let med = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64()
    };
    println!(
        "median from the end of the push: service → mountable {:.1} s (tag {:.1} s) | by hand → mountable {:.1} s (tag {:.1} s, not counting the human)",
        med(service.iter().map(|s| s.1).collect()),
        med(service.iter().map(|s| s.0).collect()),
        med(manual.iter().map(|s| s.1).collect()),
        med(manual.iter().map(|s| s.0).collect()),
    );
    Ok(())
}

fn convert_by_hand(
    ctx: &TestCtx,
    work: &Path,
    src: &str,
    dst: &str,
    dict: Option<&str>,
) -> Result<()> {
    let mut cmd = Command::new(paths::shoal_bin()?);
    cmd.args(["convert", "--plain-http", "-q", "--work-dir"])
        .arg(work);
    if let Some(d) = dict {
        cmd.args(["--chunk-dict", d]);
    }
    let out = cmd.arg(src).arg(dst).env("HOME", ctx.dir()).output()?;
    ensure!(
        out.status.success(),
        "shoal convert: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Blob bytes the registry sent since request `mark` (pushes write none).
fn origin_blob_bytes(registry: &Registry, mark: usize) -> Result<u64> {
    Ok(registry.log()?.since(mark).blob_bytes_written())
}

fn wait_tag(registry: &Registry, repo: &str, tag: &str) -> Result<()> {
    let start = Instant::now();
    loop {
        let got = http::fetch(
            http::client()?
                .head(format!("{}/v2/{repo}/manifests/{tag}", registry.url()))
                .header("Accept", setup::MANIFEST_ACCEPT),
        )?;
        if got.status.as_u16() == 200 {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(600) {
            bail!("{repo}:{tag} never appeared");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn mount_and_run(ctx: &TestCtx, node: &Node, image: &str, name: &str) -> Result<()> {
    let mnt = ctx.subdir(name)?;
    let _guard = lazy::Unmount(mnt.clone());
    lazy::mount(node, image, &mnt, &[])?;
    lazy::python_prints_42(&mnt, image)?;
    lazy::umount(node, &mnt)
}
