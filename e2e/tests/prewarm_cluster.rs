//! Issue 6's "Must show" for prewarm, in network namespaces: `shoal prewarm --nodes all --wait`
//! on a cluster of 8 real `shoal node`s (each on its own host, 1 Gbit/s links), the real origin
//! registry behind a 200 Mbit/s link and a real scheduler (see `shoal_e2e::cluster`). The CLI runs
//! on node 0's host, as an operator on a node would run it.
//!
//! What is asserted: the job ends with exit 0; the origin's own log shows at most 1.05 × the
//! image's blob bytes for the whole prewarm; every node holds every blob complete; afterwards a
//! `skopeo copy` through each node's mirror (byte for byte) or a `shoal mount` of a Nydus image on
//! one node asks the origin for nothing but the mirror's `GET /v2/` version ping — no manifest,
//! no blob. Printed, not asserted: the time 8 nodes take next to the time one node takes alone
//! (a fresh one-node cluster, same links).
//!
//! Needs root, iproute2 (`ip`, `tc`), `docker-registry`, `skopeo` and the `shoal` binary
//! (`cargo build -p shoal-node`, or SHOAL_BIN); the mount test also needs /dev/fuse, `nsenter`
//! and `chroot`. The tests in this file run one at a time (a lock): each starts up to ten hosts.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use shoal_e2e::cluster::{
    self, mb, node_report, pull_together, verify_all, Cluster, ClusterOptions,
};
use shoal_e2e::registry_log::{LoggedRequest, RegistryLog};
use shoal_e2e::setup::IMAGE;
use shoal_e2e::{netns, nydus, paths, run, Need, TestCtx};

const NEEDS: &[Need] = cluster::NEEDS;
const MOUNT_NEEDS: &[Need] = &[
    Need::Root,
    Need::Fuse,
    Need::Bin("ip"),
    Need::Bin("tc"),
    Need::Bin("docker-registry"),
    Need::Bin("skopeo"),
    Need::Bin("nsenter"),
    Need::Bin("chroot"),
    Need::Shoal,
];
/// Nodes prewarmed.
const N: usize = 8;
/// Most the origin may serve for one prewarm, in images (issue 6).
const MAX_ORIGIN_IMAGES: f64 = 1.05;
/// The host `shoal prewarm` runs on.
const OPERATOR: usize = 0;
/// The node the Nydus image is mounted on after the prewarm (not the operator's).
const MOUNT_NODE: usize = 5;
/// Where the Nydus image is pushed in the origin.
const NYDUS_REPO: &str = "test/nydus-python";

static ONE_CLUSTER_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs `body` as test `name`, skipping (with the reason) where test hosts cannot be made.
fn cluster_test(name: &str, needs: &[Need], body: impl FnOnce(&TestCtx) -> Result<()>) {
    if let Some(why) = netns::unavailable() {
        shoal_e2e::skip(name, &why);
        return;
    }
    let _one = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    run(name, needs, body);
}

// ---------------------------------------------------------------- OCI: prewarm, then pull

/// Prewarm on 8 hosts: exit 0, the origin serves at most 1.05 × the image, every node holds
/// every blob; then a pull through every node is byte-identical and reads nothing from the origin.
#[test]
fn prewarm_on_eight_hosts_reads_the_origin_once_and_later_pulls_read_nothing_from_it() {
    cluster_test("prewarm_on_eight_hosts", NEEDS, |t| {
        // One node alone first, on its own fresh cluster: the figure to compare with.
        let alone = {
            let cluster = Cluster::start(t, &ClusterOptions::members(1))?;
            let reference = origin_ref(&cluster, IMAGE);
            prewarm(&cluster, &[&reference, "--nodes", "1", "--wait"])?
        };

        let cluster = Cluster::start(t, &ClusterOptions::members(N))?;
        let reference = origin_ref(&cluster, IMAGE);
        let image = cluster.image_bytes();
        let warmed = prewarm(&cluster, &[&reference, "--nodes", "all", "--wait"])?;
        let ratio = warmed.origin_bytes as f64 / image as f64;
        eprintln!(
            "prewarm of a {:.1} MB image: 1 node alone {:.1?} (origin sent {:.1} MB); \
             {N} nodes {:.1?} (origin sent {:.1} MB: {ratio:.3} images, limit \
             {MAX_ORIGIN_IMAGES})\n{}",
            mb(image),
            alone.took,
            mb(alone.origin_bytes),
            warmed.took,
            mb(warmed.origin_bytes),
            node_report(&cluster)
        );
        ensure!(
            ratio <= MAX_ORIGIN_IMAGES,
            "the origin sent {} blob bytes for a prewarm of a {image}-byte image on {N} nodes: \
             {ratio:.3} images, more than {MAX_ORIGIN_IMAGES}",
            warmed.origin_bytes
        );
        let digests: Vec<&str> = cluster
            .image()
            .blobs()
            .iter()
            .map(|d| d.digest.as_str())
            .collect();
        every_node_holds(&cluster, &digests)?;

        // Afterwards: a pull through every node needs nothing from the origin.
        let mark = cluster.origin_mark()?;
        let all: Vec<usize> = (0..N).collect();
        let pulled = pull_together(&cluster, t, &all)?;
        verify_all(cluster.image(), &pulled)?;
        let after = cluster.origin().log()?.since(mark);
        asked_nothing(&after, &format!("the pulls through all {N} nodes"))?;
        eprintln!("after the prewarm, {N} pulls (one per node) asked the origin for nothing");
        Ok(())
    });
}

// ---------------------------------------------------------------- Nydus: prewarm --full, mount

/// A Nydus image prewarmed with `--full` on 8 hosts: the origin serves it at most 1.05 × once;
/// then `shoal mount` on one node, python3 run in a chroot of the mount, reads nothing from it.
#[test]
fn prewarm_full_nydus_on_eight_hosts_then_a_mount_reads_nothing_from_the_origin() {
    let name = "prewarm_full_nydus_on_eight_hosts";
    cluster_test(name, MOUNT_NEEDS, |t| {
        let cluster = Cluster::start(t, &ClusterOptions::members(N))?;
        let work = t.subdir("nydus-build")?;
        let image = nydus::build_and_push(
            cluster.origin(),
            &paths::debian_python_layout(),
            "python",
            NYDUS_REPO,
            "1",
            &work,
        )?;
        let reference = origin_ref(&cluster, &format!("{NYDUS_REPO}:1"));
        let warmed = prewarm(
            &cluster,
            &[&reference, "--nodes", "all", "--full", "--wait"],
        )?;
        // The config is a few KB: data blobs + bootstrap, with the 5% on top, bound it.
        let image_bytes = image.data_bytes() + image.bootstrap_layer.1;
        let ratio = warmed.origin_bytes as f64 / image_bytes as f64;
        eprintln!(
            "prewarm --full of a {:.1} MB Nydus image on {N} nodes: {:.1?}; origin sent {:.1} MB \
             ({ratio:.3} images, limit {MAX_ORIGIN_IMAGES})\n{}",
            mb(image_bytes),
            warmed.took,
            mb(warmed.origin_bytes),
            node_report(&cluster)
        );
        ensure!(
            ratio <= MAX_ORIGIN_IMAGES,
            "the origin sent {} blob bytes for a prewarm --full of a {image_bytes}-byte Nydus \
             image on {N} nodes: {ratio:.3} images",
            warmed.origin_bytes
        );
        let mut digests: Vec<&str> = image.blobs.iter().map(|(d, _)| d.as_str()).collect();
        digests.push(&image.bootstrap_layer.0);
        every_node_holds(&cluster, &digests)?;

        let mark = cluster.origin_mark()?;
        let mnt = t.subdir("mnt")?;
        let control = cluster.node(MOUNT_NODE).control_path();
        let control = control.to_string_lossy();
        shoal_ok(&[
            "mount",
            &reference,
            &mnt.to_string_lossy(),
            "--mode",
            "fuse",
            "--control",
            &control,
        ])?;
        // The node mounts inside its own mount namespace (`ip netns exec` made one): run there.
        let ran = in_node_mounts(&cluster, MOUNT_NODE)?
            .arg("chroot")
            .arg(&mnt)
            .args(["python3", "-c", "import json; print(42)"])
            .output()?;
        let unmounted = shoal_ok(&["umount", &mnt.to_string_lossy(), "--control", &control]);
        ensure!(
            ran.status.success() && String::from_utf8_lossy(&ran.stdout).trim() == "42",
            "python3 in a chroot of the mount on node {MOUNT_NODE}: {}",
            text(&ran)
        );
        unmounted?;
        let after = cluster.origin().log()?.since(mark);
        asked_nothing(&after, &format!("the mount on node {MOUNT_NODE}"))?;
        eprintln!("after the prewarm, a mount on node {MOUNT_NODE} ran python3 and asked the origin for nothing");
        Ok(())
    });
}

// ---------------------------------------------------------------- helpers

/// What one `shoal prewarm … --wait` did.
struct Warmed {
    took: Duration,
    /// Blob bytes the origin sent meanwhile (its own log).
    origin_bytes: u64,
}

/// Runs `shoal prewarm ARGS --scheduler S` on the operator's host; it must exit 0.
fn prewarm(cluster: &Cluster, args: &[&str]) -> Result<Warmed> {
    let scheduler = cluster.scheduler()?.addr().to_string();
    let bin = paths::shoal_bin()?;
    let mark = cluster.origin_mark()?;
    let started = Instant::now();
    let out = cluster
        .net()
        .command(cluster.host(OPERATOR), &bin.to_string_lossy())
        .arg("prewarm")
        .args(args)
        .args(["--scheduler", &scheduler])
        .arg("--join-secret-file")
        .arg(cluster.join_secret())
        .stdin(Stdio::null())
        .output()
        .context("running shoal prewarm")?;
    let took = started.elapsed();
    ensure!(
        out.status.success(),
        "shoal prewarm {args:?} failed after {took:.1?}: {}\n{}",
        text(&out),
        cluster.scheduler()?.log_tail(30)
    );
    Ok(Warmed {
        took,
        origin_bytes: cluster.origin_blob_bytes_since(mark)?,
    })
}

/// `REPO:TAG` at the origin, as the nodes know it (their default upstream).
fn origin_ref(cluster: &Cluster, image: &str) -> String {
    format!("{}/{image}", cluster.origin().addr())
}

/// Checks that every node's status lists each of `digests` complete.
fn every_node_holds(cluster: &Cluster, digests: &[&str]) -> Result<()> {
    let mut missing = Vec::new();
    for i in 0..cluster.len() {
        let status = cluster.node(i).status()?;
        for d in digests {
            if !status.blob(d).is_some_and(|b| b.complete) {
                missing.push(format!("node {i}: {d}"));
            }
        }
    }
    ensure!(
        missing.is_empty(),
        "blobs not complete after the prewarm:\n{}",
        missing.join("\n")
    );
    Ok(())
}

/// Checks that `log` holds nothing but `GET /v2/` (the mirror's version ping, and the harness's
/// own log marks): no manifest, no tag, no blob.
fn asked_nothing(log: &RegistryLog, who: &str) -> Result<()> {
    let asked: Vec<&LoggedRequest> = log
        .requests
        .iter()
        .filter(|r| r.uri.split('?').next() != Some("/v2/"))
        .collect();
    ensure!(
        asked.is_empty() && log.blob_bytes_written() == 0,
        "{who} asked the origin for {} things after the prewarm: {asked:?}",
        asked.len()
    );
    Ok(())
}

/// `nsenter` into the mount namespace of node `i`'s process (found in its host's namespace).
fn in_node_mounts(cluster: &Cluster, i: usize) -> Result<Command> {
    let ns = &cluster.host(i).ns;
    let out = Command::new("ip").args(["netns", "pids", ns]).output()?;
    let pids = String::from_utf8_lossy(&out.stdout).into_owned();
    let pid = pids
        .split_whitespace()
        .find(|pid| {
            std::fs::read_to_string(Path::new("/proc").join(pid).join("comm"))
                .is_ok_and(|c| c.trim() == "shoal")
        })
        .with_context(|| format!("no shoal process in {ns} (pids {pids:?})"))?;
    let mut cmd = Command::new("nsenter");
    cmd.args(["-t", pid, "-m", "--"]);
    Ok(cmd)
}

fn shoal_ok(args: &[&str]) -> Result<String> {
    let out = Command::new(paths::shoal_bin()?)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running shoal")?;
    ensure!(out.status.success(), "shoal {args:?}: {}", text(&out));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
