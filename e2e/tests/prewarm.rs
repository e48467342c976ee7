//! End-to-end tests of `shoal prewarm` on a loopback cluster: a real origin (distribution
//! registry) holding the fixture image, a `shoal scheduler`, and three `shoal node`s joined to it
//! (QUIC data plane on loopback ports), driven through the `shoal prewarm` CLI. Origin-side facts
//! come from the registry's own log.
//!
//! Needs the `shoal` binary: run `cargo build -p shoal-node` first (or set SHOAL_BIN).

use std::net::TcpListener;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use shoal_e2e::fixture::{assert_same_image, Image, OciLayout};
use shoal_e2e::loopback::LoopbackCluster;
use shoal_e2e::registry::Registry;
use shoal_e2e::setup::{self, IMAGE};
use shoal_e2e::wait::{free_port, poll};
use shoal_e2e::{paths, run, skopeo, Need, TestCtx};

const NEEDS: &[Need] = &[
    Need::Bin("docker-registry"),
    Need::Bin("skopeo"),
    Need::Shoal,
];
const PRIVATE: &[Need] = &[
    Need::Bin("docker-registry"),
    Need::Bin("skopeo"),
    Need::Bin("htpasswd"),
    Need::Shoal,
];
/// Nodes in the cluster.
const NODES: usize = 3;

// ---------------------------------------------------------------- the cluster

struct Cluster;

impl Cluster {
    fn start(t: &TestCtx, extra_hosts: &[(String, String)]) -> Result<LoopbackCluster> {
        let (registry, image) = setup::anonymous_origin(t)?;
        Self::start_with(t, registry, image, extra_hosts)
    }

    fn start_with(
        t: &TestCtx,
        registry: Registry,
        image: Image,
        extra_hosts: &[(String, String)],
    ) -> Result<LoopbackCluster> {
        LoopbackCluster::start_with(t, registry, image, NODES, extra_hosts)
    }
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

// ---------------------------------------------------------------- tests

/// Prewarm on every node with `--wait`: the origin serves the image about once, every node holds
/// every blob, and a pull through any node afterwards reads nothing from the origin.
#[test]
fn prewarm_all_nodes_reads_the_origin_once_and_pulls_are_local() {
    run(
        "prewarm_all_nodes_reads_the_origin_once_and_pulls_are_local",
        NEEDS,
        |t| {
            let c = Cluster::start(t, &[])?;
            let mark = c.registry.log()?.requests.len();
            let started = Instant::now();
            let out = c.prewarm(&[&c.image_ref(), "--wait"])?;
            let took = started.elapsed();
            ensure!(out.status.success(), "prewarm failed: {}", text(&out));
            let stdout = String::from_utf8_lossy(&out.stdout);
            ensure!(stdout.contains("done"), "no summary: {}", text(&out));

            let image_bytes: u64 = c.image.blobs().iter().map(|d| d.size).sum();
            let log = c.registry.log()?.since(mark);
            let origin = log.blob_bytes_written();
            let ratio = origin as f64 / image_bytes as f64;
            eprintln!(
                "prewarm of {image_bytes} bytes on {NODES} nodes took {took:.2?}; origin served {origin} blob bytes ({ratio:.3}x the image)"
            );
            ensure!(
                ratio <= 1.05,
                "origin served {origin} bytes for a {image_bytes}-byte image ({ratio:.3}x): {:?}",
                log.requests
            );
            for (i, node) in c.nodes.iter().enumerate() {
                let status = node.status()?;
                for d in c.image.blobs() {
                    ensure!(
                        status.blob(&d.digest).is_some_and(|b| b.complete),
                        "node {i} does not hold {} complete",
                        d.digest
                    );
                }
            }

            // A pull through any node now needs nothing from the origin.
            let mark = c.registry.log()?.requests.len();
            let (pulled, dir) = skopeo::copy_to_oci(t, &c.nodes[1].listen_addr(), IMAGE, None)?;
            ensure!(pulled.success, "skopeo copy failed: {}", pulled.stderr);
            assert_same_image(&c.image, &OciLayout::open(dir)?)?;
            let after = c.registry.log()?.since(mark);
            ensure!(
                after.blob_fetch_count() == 0 && after.blob_bytes_written() == 0,
                "the pull read blobs from the origin: {:?}",
                after.requests
            );
            // Nothing but the mirror's `GET /v2/` version check (and the harness's log marks):
            // no manifest, no tag, no blob.
            let asked: Vec<_> = after
                .requests
                .iter()
                .filter(|r| r.uri.split('?').next() != Some("/v2/"))
                .collect();
            ensure!(asked.is_empty(), "the pull asked the origin: {asked:?}");

            // The job is listed, done, on every node.
            let list = c.prewarm(&["list", "--json"])?;
            ensure!(list.status.success(), "{}", text(&list));
            let v: serde_json::Value = serde_json::from_slice(&list.stdout)?;
            let job = &v["jobs"][0];
            ensure!(job["state"] == "done", "job: {job}");
            ensure!(
                job["nodes"].as_array().map_or(0, Vec::len) == NODES,
                "job: {job}"
            );
            Ok(())
        },
    );
}

/// Bad input ends with a clear message and a meaningful exit code.
#[test]
fn prewarm_bad_input_is_reported_clearly() {
    run("prewarm_bad_input_is_reported_clearly", NEEDS, |t| {
        let c = Cluster::start(t, &[])?;
        // Without the join secret, or with another one: refused (1), naming why, no job made.
        let wrong = t.dir().join("wrong-secret");
        std::fs::write(&wrong, "8".repeat(64))?;
        for (secret, why) in [
            (None, "missing x-shoal-auth"),
            (Some(wrong.as_path()), "refused"),
        ] {
            let out = c.prewarm_with(&[&c.image_ref(), "--wait"], secret)?;
            ensure!(out.status.code() == Some(1), "{}", text(&out));
            ensure!(
                String::from_utf8_lossy(&out.stderr).contains(why),
                "{}",
                text(&out)
            );
        }
        let list = c.prewarm(&["list", "--json"])?;
        ensure!(
            list.status.success() && !String::from_utf8_lossy(&list.stdout).contains(IMAGE),
            "an unsigned prewarm made a job: {}",
            text(&list)
        );
        // A missing image: every node reports it; the CLI exits 1 naming it.
        let missing = format!("{}/test/missing:1", c.registry.addr());
        let out = c.prewarm(&[&missing, "--wait"])?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(out.status.code() == Some(1), "{}", text(&out));
        ensure!(
            err.contains("no such image") && err.contains("test/missing:1"),
            "{}",
            text(&out)
        );
        // Not an image reference at all: a usage error (2), refused before anything is sent.
        let out = c.prewarm(&["Not An Image!", "--wait"])?;
        ensure!(out.status.code() == Some(2), "{}", text(&out));
        ensure!(
            String::from_utf8_lossy(&out.stderr).contains("image reference"),
            "{}",
            text(&out)
        );
        // A registry the nodes do not know.
        let out = c.prewarm(&["unknown.example:5000/a/b:1", "--wait"])?;
        ensure!(out.status.code() == Some(1), "{}", text(&out));
        ensure!(
            String::from_utf8_lossy(&out.stderr).contains("unknown.example:5000"),
            "{}",
            text(&out)
        );
        // More nodes than there are.
        let out = c.prewarm(&[&c.image_ref(), "--nodes", "9"])?;
        ensure!(out.status.code() == Some(1), "{}", text(&out));
        ensure!(
            String::from_utf8_lossy(&out.stderr).contains("more nodes than the 3 live"),
            "{}",
            text(&out)
        );
        // An unknown job id.
        let out = c.prewarm(&["status", "0123456789abcdef"])?;
        ensure!(out.status.code() == Some(1), "{}", text(&out));
        ensure!(
            String::from_utf8_lossy(&out.stderr).contains("no prewarm job 0123456789abcdef"),
            "{}",
            text(&out)
        );
        // An unreachable scheduler: 3.
        let out = Command::new(paths::shoal_bin()?)
            .args(["prewarm", &c.image_ref(), "--scheduler"])
            .arg(format!("127.0.0.1:{}", free_port()?))
            .output()?;
        ensure!(out.status.code() == Some(3), "{}", text(&out));
        ensure!(
            String::from_utf8_lossy(&out.stderr).contains("cannot reach the scheduler"),
            "{}",
            text(&out)
        );
        // An unreachable registry: the nodes say so.
        let mut c = c;
        c.registry.stop()?;
        let out = c.prewarm(&[&c.image_ref(), "--wait"])?;
        ensure!(out.status.code() == Some(1), "{}", text(&out));
        ensure!(
            String::from_utf8_lossy(&out.stderr).contains("cannot reach the origin registry"),
            "{}",
            text(&out)
        );
        Ok(())
    });
}

/// A private origin the nodes have no (or wrong) credentials for: every node reports that the
/// origin refused it.
#[test]
fn prewarm_refused_credentials_are_reported() {
    run("prewarm_refused_credentials_are_reported", PRIVATE, |t| {
        let (registry, image) = setup::private_origin(t, "alice", "correct horse")?;
        let c = Cluster::start_with(t, registry, image, &[])?;
        let out = c.prewarm(&[&c.image_ref(), "--wait"])?;
        ensure!(out.status.code() == Some(1), "{}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            err.contains("refused this node's credentials") && err.contains("401"),
            "{}",
            text(&out)
        );
        ensure!(
            err.lines()
                .filter(|l| l.starts_with("  node ") && l.contains("refused this node's"))
                .count()
                == NODES,
            "one line per node: {}",
            text(&out)
        );
        Ok(())
    });
}

/// A job stuck on an origin that never answers is cancelled: the CLI and the scheduler say so,
/// and the nodes stop it.
#[test]
fn prewarm_cancel_stops_the_job() {
    run("prewarm_cancel_stops_the_job", NEEDS, |t| {
        // An "origin" that accepts connections and never answers.
        let blackhole = TcpListener::bind("127.0.0.1:0")?;
        let host = format!("127.0.0.1:{}", blackhole.local_addr()?.port());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for s in blackhole.incoming().flatten() {
                held.push(s);
            }
        });
        let c = Cluster::start(t, &[(host.clone(), format!("http://{host}"))])?;
        let out = c.prewarm(&[&format!("{host}/stuck/image:1")])?;
        ensure!(out.status.success(), "{}", text(&out));
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        ensure!(id.len() == 16, "job id {id:?}");
        // Every node has picked it up.
        poll("every node to run the job", Duration::from_secs(20), || {
            let o = c.prewarm(&["status", &id, "--json"])?;
            let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
            let running = v["nodes"]
                .as_array()
                .map_or(0, |n| n.iter().filter(|n| n["state"] == "running").count());
            Ok((running == NODES).then_some(()))
        })?;
        let out = c.prewarm(&["cancel", &id])?;
        ensure!(out.status.success(), "{}", text(&out));
        ensure!(
            String::from_utf8_lossy(&out.stdout).contains("cancelled"),
            "{}",
            text(&out)
        );
        let out = c.prewarm(&["status", &id, "--wait"])?;
        ensure!(out.status.code() == Some(4), "{}", text(&out));
        ensure!(
            String::from_utf8_lossy(&out.stderr).contains("was cancelled"),
            "{}",
            text(&out)
        );
        // The nodes stop the job when their scheduler stops listing it.
        for (i, node) in c.nodes.iter().enumerate() {
            poll(
                "the node to stop the cancelled job",
                Duration::from_secs(20),
                || {
                    Ok(node
                        .log_tail(200)
                        .contains("prewarm job cancelled")
                        .then_some(()))
                },
            )
            .with_context(|| format!("node {i}"))?;
        }
        Ok(())
    });
}

/// A Nydus image (an index → manifest with data blobs and a bootstrap layer): without `--full`
/// every node holds the bootstrap layer and no data blob; with `--full` every data blob too, and
/// the origin served the image about once over both jobs.
#[test]
fn prewarm_nydus_image_bootstrap_then_full() {
    run("prewarm_nydus_image_bootstrap_then_full", NEEDS, |t| {
        let registry = Registry::start(t)?;
        let work = t.subdir("nydus-build")?;
        let nydus = shoal_e2e::nydus::build_and_push(
            &registry,
            &shoal_e2e::paths::debian_python_layout(),
            skopeo::FIXTURE_REF,
            "test/nydus",
            "1",
            &work,
        )?;
        let image = setup::fixture_image()?;
        let c = Cluster::start_with(t, registry, image, &[])?;
        let reference = format!("{}/test/nydus:1", c.registry.addr());
        let mark = c.registry.log()?.requests.len();

        let out = c.prewarm(&[&reference, "--wait", "--json"])?;
        ensure!(out.status.success(), "{}", text(&out));
        let job: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let note = job["nodes"][0]["message"].as_str().unwrap_or_default();
        ensure!(note.contains("bootstrap only"), "job: {job}");
        let (boot, boot_size) = &nydus.bootstrap_layer;
        for (i, node) in c.nodes.iter().enumerate() {
            let status = node.status()?;
            ensure!(
                status.blob(boot).is_some_and(|b| b.complete),
                "node {i} lacks the bootstrap layer"
            );
            for (d, _) in &nydus.blobs {
                ensure!(status.blob(d).is_none(), "node {i} fetched data blob {d}");
            }
        }

        let out = c.prewarm(&[&reference, "--full", "--wait"])?;
        ensure!(out.status.success(), "{}", text(&out));
        for (i, node) in c.nodes.iter().enumerate() {
            let status = node.status()?;
            for (d, _) in &nydus.blobs {
                ensure!(
                    status.blob(d).is_some_and(|b| b.complete),
                    "node {i} lacks data blob {d} after --full"
                );
            }
        }
        let origin = c.registry.log()?.since(mark).blob_bytes_written();
        // Config bytes are small; bound by data + bootstrap + 5% (the config is within it).
        let image_bytes = nydus.data_bytes() + boot_size;
        ensure!(
            origin as f64 <= 1.05 * image_bytes as f64,
            "origin served {origin} bytes for a {image_bytes}-byte Nydus image"
        );
        eprintln!(
            "nydus prewarm: origin served {origin} bytes for {image_bytes} image bytes on {NODES} nodes"
        );
        Ok(())
    });
}
