//! Issue 5's "Must show", end to end: shoal clusters of real `shoal node` processes, each node in
//! its own network namespace (1 Gbit/s links), the real origin registry behind a 200 Mbit/s link,
//! a real scheduler, and real clients (`skopeo copy --retry-times=0`, run on each node's host,
//! through that node's mirror). Every copy is compared byte for byte with the fixture image;
//! origin traffic is read from the origin's own access log, never from what nodes report.
//!
//! Needs root, iproute2 (`ip`, `tc`), `docker-registry`, `skopeo` and the `shoal` binary
//! (`cargo build -p shoal-node`, or SHOAL_BIN); the lazy-mount test also needs /dev/fuse,
//! `chroot` and `nsenter`. The tests in this file run one at a time (a lock):
//! each starts up to ten hosts, and "mid-transfer" means something only when the machine is not
//! also busy with another cluster.

use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use shoal_e2e::cluster::{
    self, mb, metric, node_report, pull_together, verify_all, Cluster, ClusterOptions, NodeBytes,
    NodeSpec, PullSet,
};
use shoal_e2e::{netns, nydus, paths, skopeo};
use shoal_e2e::{run, Need, TestCtx};

const NEEDS: &[Need] = cluster::NEEDS;
/// Most the origin may serve for N concurrent pulls, in images (issue 5).
const MAX_ORIGIN_IMAGES: f64 = 1.05;
/// Upper bound for anything the tests wait for; never an assertion about speed.
const CAP: Duration = Duration::from_secs(180);
/// How long a restarted scheduler may take to know the cluster again (a cap, not a target).
const RELEARN_CAP: Duration = Duration::from_secs(30);
/// A node counts as "serving pieces" once it has sent peers this much.
const SERVING: f64 = 4.0 * 1024.0 * 1024.0;

static ONE_CLUSTER_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs `body` as test `name`, skipping (with the reason) where test hosts cannot be made.
fn cluster_test(name: &str, body: impl FnOnce(&TestCtx) -> Result<()>) {
    cluster_test_needing(name, &[], body);
}

/// [`cluster_test`] for a test that also needs `more`.
fn cluster_test_needing(name: &str, more: &[Need], body: impl FnOnce(&TestCtx) -> Result<()>) {
    if let Some(why) = netns::unavailable() {
        shoal_e2e::skip(name, &why);
        return;
    }
    let _one = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    run(name, &[NEEDS, more].concat(), body);
}

// ---------------------------------------------------------------- the harness's own baseline

/// Without P2P every node reads the whole image from the origin, and the origin's log sees all of
/// it: the accounting the other tests rely on undercounts nothing.
#[test]
fn standalone_nodes_each_read_the_whole_image_from_the_origin() {
    cluster_test("standalone_nodes_each_read_the_whole_image", |t| {
        let cluster = Cluster::start(t, &ClusterOptions::of(vec![NodeSpec::standalone(); 2]))?;
        let mark = cluster.origin_mark()?;
        let pulled = pull_together(&cluster, t, &[0, 1])?;
        verify_all(cluster.image(), &pulled)?;
        let origin = cluster.origin_blob_bytes_since(mark)?;
        let image = cluster.image_bytes();
        let slowest = slowest(&pulled);
        eprintln!(
            "standalone x2: origin sent {:.1} MB of blobs for a {:.1} MB image ({:.2} images) \
             in {slowest:.1?}, {:.0} Mbit/s out of the origin",
            mb(origin),
            mb(image),
            origin as f64 / image as f64,
            origin as f64 * 8.0 / 1e6 / slowest.as_secs_f64()
        );
        ensure!(
            origin >= 2 * image,
            "two standalone nodes pulled, but the origin's log shows {origin} blob bytes, less \
             than twice the image's {image}"
        );
        Ok(())
    });
}

// ---------------------------------------------------------------- 8 nodes at once

/// Eight nodes pull the same multi-layer image at the same moment: every copy is byte-identical
/// and the origin serves at most 1.05 × the image's bytes (its own log).
#[test]
fn eight_nodes_pulling_at_once_read_the_origin_about_once() {
    cluster_test("eight_nodes_pulling_at_once", |t| {
        const N: usize = 8;
        let cluster = Cluster::start(t, &ClusterOptions::members(N))?;
        let mark = cluster.origin_mark()?;
        let all: Vec<usize> = (0..N).collect();
        let pulled = pull_together(&cluster, t, &all)?;
        let origin = cluster.origin_blob_bytes_since(mark)?;
        let image = cluster.image_bytes();
        let ratio = origin as f64 / image as f64;
        eprintln!(
            "{N} nodes at once: all done in {:.1?}; origin sent {:.1} MB of blobs for a {:.1} MB \
             image: {ratio:.3} images (limit {MAX_ORIGIN_IMAGES})\n{}",
            slowest(&pulled),
            mb(origin),
            mb(image),
            node_report(&cluster)
        );
        verify_all(cluster.image(), &pulled)?;
        ensure!(
            ratio <= MAX_ORIGIN_IMAGES,
            "the origin sent {origin} blob bytes for {N} concurrent pulls of a {image}-byte image: \
             {ratio:.3} images, more than {MAX_ORIGIN_IMAGES}"
        );
        Ok(())
    });
}

// ---------------------------------------------------------------- the lease holder seeds

/// Issue 15's seed behaviour: while node A streams a blob from a slow origin under the lease,
/// node B is asked for a range near the blob's end. B gets it from A, which fetches those pieces
/// ahead of its own fill; the origin never sees a request from B, and sends the blob about once.
#[test]
fn a_range_far_ahead_on_a_second_node_comes_from_the_lease_holder_not_the_origin() {
    cluster_test("seeded_range", |t| {
        const A: usize = 0;
        const B: usize = 1;
        const REPO: &str = "test/seeded";
        const SIZE: usize = 48 << 20;
        let mut options = ClusterOptions::members(2);
        // 5 MB/s: the whole blob takes A about ten seconds.
        options.origin_mbit = 40;
        let cluster = Cluster::start(t, &options)?;
        let data = shoal_e2e::random::pseudo_random(SIZE, 0x5eed);
        let digest = cluster.origin().push_blob(REPO, data.clone())?;
        let mark = cluster.origin_mark()?;
        let url = |i: usize| {
            format!(
                "http://{}/v2/{REPO}/blobs/{digest}",
                cluster.node(i).listen_addr()
            )
        };

        // A pulls the whole blob and so takes the origin lease.
        let whole = t.subdir("pulls")?.join("whole-from-a");
        let mut pull = cluster
            .net()
            .command(cluster.host(A), "curl")
            .args(["-sSf", "-o"])
            .arg(&whole)
            .arg(url(A))
            .spawn()?;
        // The scheduler knows it: A holds the lease and announced the blob's geometry and its
        // first pieces (what B's node asks for before it asks A).
        shoal_e2e::wait::poll(
            "the scheduler to know A's lease and first pieces of the blob",
            CAP,
            || {
                let status = cluster.scheduler_status()?;
                let known = status.blobs.iter().any(|b| {
                    b.blob.to_string() == digest
                        && b.piece_size.is_some()
                        && b.piece_sha256_known > 0
                        && !b.leases.is_empty()
                });
                Ok(known.then_some(()))
            },
        )?;

        // B is asked for 100 kB near the end, 40 MB ahead of anything A has.
        let start = SIZE - (3 << 20) + 12_345;
        let end = start + 100_000;
        let ranged = t.subdir("ranges")?.join("range-from-b");
        let out = cluster
            .net()
            .command(cluster.host(B), "curl")
            .args([
                "-sSf",
                "-H",
                &format!("Range: bytes={start}-{}", end - 1),
                "-o",
            ])
            .arg(&ranged)
            .arg(url(B))
            .output()?;
        ensure!(
            out.status.success(),
            "ranged GET through node B: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = std::fs::read(&ranged)?;
        ensure!(
            got == data[start..end],
            "node B served other bytes for the range"
        );
        let a_done_before = pull.try_wait()?.is_some();

        let status = pull.wait()?;
        ensure!(status.success(), "the whole pull through node A failed");
        ensure!(
            std::fs::read(&whole)? == data,
            "node A served other bytes for the blob"
        );

        let log = cluster.origin().log()?.since(mark);
        let requests = log.blob_requests(&digest);
        let b_ip = format!("{}:", cluster.host(B).ip);
        // B may check at the origin that the blob is there for it to serve (a `HEAD`, no
        // bytes); it must fetch nothing.
        let from_b: Vec<_> = requests
            .iter()
            .filter(|r| r.remote.starts_with(&b_ip) && r.method != "HEAD")
            .collect();
        let sent: u64 = requests
            .iter()
            .filter(|r| r.is_blob_fetch())
            .map(|r| r.written)
            .sum();
        let seeded = cluster.metrics(A)?.sum("shoal_p2p_seed_bytes_total", &[]);
        let served_by_seed = cluster
            .metrics(B)?
            .sum("shoal_blob_seeded_ranges_total", &[]);
        eprintln!(
            "seeded range: origin sent {:.1} MB in {} requests for a {:.1} MB blob, none from B \
             (but {} access check); A fetched {:.1} MB ahead of its fill; B served {served_by_seed} range(s) from A",
            mb(sent),
            requests.len(),
            mb(SIZE as u64),
            requests.iter().filter(|r| r.remote.starts_with(&b_ip)).count(),
            mb(seeded as u64),
        );
        ensure!(
            !a_done_before,
            "A finished before B asked: nothing was tested (origin too fast?)"
        );
        ensure!(
            from_b.is_empty(),
            "node B fetched from the origin: {from_b:?}"
        );
        ensure!(seeded > 0.0, "node A fetched nothing ahead of its fill");
        ensure!(
            served_by_seed >= 1.0,
            "node B did not serve the range from the seed"
        );
        // Each byte about once: a dropped stream may have had a few MB in flight.
        ensure!(
            sent <= SIZE as u64 + (8 << 20),
            "the origin sent {sent} bytes for a {SIZE}-byte blob"
        );
        Ok(())
    });
}

// ---------------------------------------------------------------- a peer dies

/// A node that is serving pieces to peers is SIGKILLed mid-transfer: every other pull still
/// completes, byte for byte.
#[test]
fn a_node_serving_pieces_is_killed_and_every_other_pull_completes() {
    cluster_test("a_node_serving_pieces_is_killed", |t| {
        const N: usize = 5;
        let mut cluster = Cluster::start(t, &ClusterOptions::members(N))?;
        let jobs = (0..N)
            .map(|i| cluster.pull_job(t, i))
            .collect::<Result<Vec<_>>>()?;
        let pulls = PullSet::start(jobs);
        let (victim, sent) = pulls.while_running("a node to serve pieces to peers", CAP, || {
            Ok((0..N).find_map(|i| {
                let sent = cluster.metrics(i).ok()?.sum(metric::P2P_UPLOAD_BYTES, &[]);
                (sent >= SERVING).then_some((i, sent))
            }))
        })?;
        cluster.kill_node(victim)?;
        let killed_at = pulls.started().elapsed();
        let others_running: Vec<usize> = pulls
            .running()
            .into_iter()
            .filter(|&i| i != victim)
            .collect();
        let pulled = pulls.join()?;
        eprintln!(
            "killed node {victim} after it sent peers {:.1} MB, {killed_at:.1?} into the pulls; \
             other pulls still running then: {others_running:?}\n{}",
            sent / 1e6,
            node_report(&cluster)
        );
        ensure!(
            !others_running.is_empty(),
            "every other pull had finished before node {victim} was killed: nothing was tested"
        );
        let others: Vec<_> = pulled.into_iter().filter(|p| p.node != victim).collect();
        verify_all(cluster.image(), &others)
    });
}

// ---------------------------------------------------------------- the scheduler dies

/// The scheduler is SIGKILLed mid-pull: every pull completes (DHT, then origin), and once it is
/// started again its status lists every live node and their blobs (polled, capped at 30 s).
#[test]
fn scheduler_killed_mid_pull_pulls_complete_and_it_relearns_the_cluster() {
    cluster_test("scheduler_killed_mid_pull", |t| {
        const N: usize = 4;
        let mut cluster = Cluster::start(t, &ClusterOptions::members(N))?;
        let mark = cluster.origin_mark()?;
        let jobs = (0..N)
            .map(|i| cluster.pull_job(t, i))
            .collect::<Result<Vec<_>>>()?;
        let pulls = PullSet::start(jobs);
        // Mid-pull: once pieces flow between nodes, so the swarm the scheduler set up is running.
        pulls.while_running("pieces to flow between nodes", CAP, || {
            let swarming = (0..N).any(|i| {
                cluster
                    .metrics(i)
                    .is_ok_and(|m| m.sum(metric::P2P_DOWNLOAD_BYTES, &[]) > 0.0)
            });
            Ok(swarming.then_some(()))
        })?;
        cluster.kill_scheduler()?;
        let killed_at = pulls.started().elapsed();
        let running = pulls.running();
        ensure!(
            cluster.scheduler_status().is_err(),
            "the scheduler still answers after SIGKILL"
        );
        let pulled = pulls.join()?;
        let origin = cluster.origin_blob_bytes_since(mark)?;
        eprintln!(
            "scheduler killed {killed_at:.1?} into the pulls, pulls running then: {running:?}; \
             all done in {:.1?}; the origin sent {:.2} images\n{}",
            slowest(&pulled),
            origin as f64 / cluster.image_bytes() as f64,
            node_report(&cluster)
        );
        verify_all(cluster.image(), &pulled)?;

        let restarted = Instant::now();
        cluster.restart_scheduler()?;
        let all: Vec<usize> = (0..N).collect();
        cluster
            .wait_scheduler_lists(&all, RELEARN_CAP)
            .context("the restarted scheduler does not list every live node")?;
        let layers: Vec<String> = cluster
            .image()
            .layers
            .iter()
            .map(|d| d.digest.clone())
            .collect();
        shoal_e2e::wait::poll(
            "the restarted scheduler to know every node holds every layer",
            RELEARN_CAP.saturating_sub(restarted.elapsed()),
            || {
                let status = cluster.scheduler_status()?;
                let short: Vec<String> = layers
                    .iter()
                    .filter(|d| {
                        !status
                            .blobs
                            .iter()
                            .any(|b| b.blob.to_string() == **d && b.complete_holders as usize >= N)
                    })
                    .cloned()
                    .collect();
                ensure!(
                    short.is_empty(),
                    "layers without {N} complete holders: {short:?}"
                );
                Ok(Some(()))
            },
        )?;
        let page = cluster.scheduler()?.page()?;
        ensure!(!page.is_empty(), "the status page is empty");
        eprintln!(
            "the restarted scheduler knew all {N} nodes and their layers after {:.1?}",
            restarted.elapsed()
        );
        Ok(())
    });
}

// ---------------------------------------------------------------- a peer lies

/// A node that flips a byte in every range it serves to peers holds the image; the others pull:
/// every client gets the right bytes, the scheduler blames the bad node, and a node pulling after
/// that gets nothing from it.
#[test]
fn a_node_serving_corrupt_pieces_is_caught_and_avoided() {
    cluster_test("a_node_serving_corrupt_pieces", |t| {
        const BAD: usize = 0;
        let mut specs = vec![NodeSpec::corrupt_uploads()];
        specs.extend(vec![NodeSpec::member(); 3]);
        let cluster = Cluster::start(t, &ClusterOptions::of(specs))?;

        // The bad node's own client is served correctly; it now holds the image.
        cluster.pull_and_verify(t, BAD)?;
        wait_complete_holders(&cluster, 1)?;
        let bad_id = cluster.node_id(BAD)?.to_string();

        // Two nodes pull while the bad node is the only holder.
        let pulled = pull_together(&cluster, t, &[1, 2])?;
        let sent = cluster.metrics(BAD)?.sum(metric::P2P_UPLOAD_BYTES, &[]);
        let status = cluster.scheduler_status()?;
        let blame = cluster
            .scheduler_entry(&status, BAD)
            .map(|n| n.blame)
            .context("the scheduler no longer lists the bad node")?;
        eprintln!(
            "bad node {BAD} sent peers {:.1} MB (all of it corrupt); scheduler blame {blame:.2}\n{}",
            sent / 1e6,
            node_report(&cluster)
        );
        verify_all(cluster.image(), &pulled)?;
        ensure!(
            sent > 0.0,
            "the corrupt node sent peers nothing, so no corruption was exercised"
        );
        ensure!(
            blame > 0.0,
            "the scheduler holds no blame against the node that served corrupt bytes"
        );
        let detected: f64 = [1, 2]
            .iter()
            .map(|&i| cluster.metrics(i).map(|m| m.sum(metric::BAD_PIECES, &[])))
            .sum::<Result<f64>>()?;
        ensure!(
            detected > 0.0,
            "nodes 1 and 2 received corrupt ranges but count no bad pieces ({})",
            metric::BAD_PIECES
        );

        // A node pulling after the blame is not sent to the bad node.
        cluster.pull_and_verify(t, 3)?;
        let late = cluster.metrics(3)?;
        let from_bad = late.sum(metric::P2P_DOWNLOAD_BYTES, &[("peer", &bad_id)]) as u64;
        eprintln!(
            "late node 3: {:.1} MB from peers, {from_bad} bytes of it from the bad node",
            mb(NodeBytes::of(&late).from_peers)
        );
        ensure!(
            from_bad == 0,
            "node 3 pulled after the bad node was blamed and still received {from_bad} bytes from it"
        );
        Ok(())
    });
}

// ---------------------------------------------------------------- a stranger

/// A node with a different join secret gets nothing from the cluster's nodes (its pull still works,
/// from the origin), while a member pulling next in the same cluster does get bytes from peers.
#[test]
fn a_node_without_the_join_secret_gets_nothing_from_peers() {
    cluster_test("a_node_without_the_join_secret", |t| {
        const SEED: usize = 0;
        const MEMBER: usize = 1;
        const OUTSIDER: usize = 2;
        let specs = vec![NodeSpec::member(), NodeSpec::member(), NodeSpec::outsider()];
        let cluster = Cluster::start(t, &ClusterOptions::of(specs))?;
        cluster.pull_and_verify(t, SEED)?;
        wait_complete_holders(&cluster, 1)?;

        let mark = cluster.origin_mark()?;
        cluster.pull_and_verify(t, OUTSIDER)?;
        let origin = cluster.origin_blob_bytes_since(mark)?;
        let outsider = cluster.metrics(OUTSIDER)?;
        let seed = cluster.metrics(SEED)?;
        let member = cluster.metrics(MEMBER)?;
        let refused = seed.sum(
            metric::P2P_HANDSHAKE_FAILURES,
            &[("outcome", "join_refused")],
        ) + member.sum(
            metric::P2P_HANDSHAKE_FAILURES,
            &[("outcome", "join_refused")],
        );
        let listed = cluster
            .scheduler_entry(&cluster.scheduler_status()?, OUTSIDER)
            .is_some();
        eprintln!(
            "outsider: {:.1} MB from peers, {:.1} MB from the origin by the origin's log; \
             members refused {refused} handshakes; scheduler lists the outsider: {listed}\n{}",
            mb(NodeBytes::of(&outsider).from_peers),
            mb(origin),
            node_report(&cluster)
        );
        // A series nobody touched is not exported, so a missing one reads 0; the member's pull at
        // the end shows the same series counting up in this cluster.
        let from_peers = NodeBytes::of(&outsider).from_peers as f64;
        let received = outsider.sum(metric::P2P_DOWNLOAD_BYTES, &[]);
        ensure!(
            from_peers == 0.0 && received == 0.0,
            "the outsider got bytes from peers: {from_peers} (bytes from peers), {received} ({})",
            metric::P2P_DOWNLOAD_BYTES
        );
        let uploaded =
            seed.sum(metric::P2P_UPLOAD_BYTES, &[]) + member.sum(metric::P2P_UPLOAD_BYTES, &[]);
        ensure!(uploaded == 0.0, "members sent {uploaded} bytes to peers");
        ensure!(
            origin >= cluster.image().layer_bytes(),
            "the outsider's pull read only {origin} blob bytes from the origin"
        );
        // The scheduler listed it as a node, so it was told where the image is and must have
        // tried: the members must have refused it.
        ensure!(
            !listed || refused > 0.0,
            "the outsider was listed by the scheduler but no member refused a handshake \
             ({} {{outcome=\"join_refused\"}} is 0 on both)",
            metric::P2P_HANDSHAKE_FAILURES
        );

        // A member in the same cluster does get bytes from peers: P2P itself works here.
        cluster.pull_and_verify(t, MEMBER)?;
        let member_from_peers = NodeBytes::of(&cluster.metrics(MEMBER)?).from_peers;
        ensure!(
            member_from_peers > 0,
            "a member pulling after the seed got nothing from peers either"
        );
        Ok(())
    });
}

// ---------------------------------------------------------------- a lazy mount reads from a peer

/// Node A pulls a Nydus image through its mirror, so it holds every blob; node B then mounts the
/// image lazily and runs python3 in a chroot of the mount: every chunk of the data blobs B reads
/// comes from A (each digest-checked), so does the bootstrap layer, and the origin's log shows no
/// blob byte sent (only the manifests).
#[test]
fn lazy_mount_reads_data_blob_chunks_from_a_peer_not_the_origin() {
    const NAME: &str = "lazy_mount_reads_data_blob_chunks_from_a_peer";
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        shoal_e2e::skip(
            NAME,
            &format!("lazy mounts need FUSE: cannot open /dev/fuse: {e}"),
        );
        return;
    }
    let more = [Need::Bin("chroot"), Need::Bin("nsenter")];
    cluster_test_needing(NAME, &more, |t| {
        const A: usize = 0;
        const B: usize = 1;
        const REPO: &str = "test/py";
        const TAG: &str = "nydus";
        let cluster = Cluster::start(t, &ClusterOptions::members(2))?;
        let image = nydus::build_and_push(
            cluster.origin(),
            &paths::debian_python_layout(),
            "python",
            REPO,
            TAG,
            &t.subdir("nydus-build")?,
        )?;
        let boot = image.bootstrap_layer.0.clone();
        let blobs: Vec<String> = image.blobs.iter().map(|(d, _)| d.clone()).collect();

        // A pulls the whole image through its mirror and so holds every blob.
        let dest = t.subdir("pull-nydus-node0")?;
        let a_mirror = cluster.node(A).listen_addr();
        let reference = format!("{REPO}:{TAG}");
        let copy = skopeo::copy_command(
            t,
            Some(&cluster.host(A).ns),
            &a_mirror,
            &reference,
            None,
            &dest,
        )?;
        let out = skopeo::run_command(copy)?;
        ensure!(
            out.success,
            "skopeo copy through node {A}: {}",
            out.stderr.trim()
        );
        let every_blob = [blobs.clone(), vec![boot.clone()]].concat();
        wait_complete_holders_of(&cluster, &every_blob, 1)?;

        // B mounts the image (as the origin names it) and runs python3 in it.
        let mark = cluster.origin_mark()?;
        let mnt = t.subdir("mnt")?;
        let _unmount = Unmount {
            pid: cluster.node_pid(B)?,
            dir: mnt.clone(),
        };
        let shoal = paths::shoal_bin()?;
        let control = cluster.node(B).control_path();
        let image_ref = format!("{}/{reference}", cluster.origin().addr());
        let out = cluster
            .net()
            .command(cluster.host(B), &shoal.to_string_lossy())
            .args(["mount", &image_ref])
            .arg(&mnt)
            .arg("--control")
            .arg(&control)
            .output()?;
        ensure!(
            out.status.success(),
            "shoal mount on node {B}: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let python = cluster
            .in_node_mounts(B, "chroot")?
            .arg(&mnt)
            .args([PYTHON, "-c", "import json; print(42)"])
            .output()?;
        let printed = String::from_utf8_lossy(&python.stdout).trim().to_owned();

        let log = cluster.origin().log()?.since(mark);
        let fetched = |digest: &str| -> u64 {
            log.blob_requests(digest)
                .iter()
                .filter(|r| r.is_blob_fetch())
                .map(|r| r.written)
                .sum()
        };
        let data_from_origin: u64 = blobs.iter().map(|d| fetched(d)).sum();
        let boot_from_origin = fetched(&boot);
        let origin_requests: Vec<String> = log
            .requests
            .iter()
            .map(|r| {
                format!(
                    "{} {} -> {} ({} bytes)",
                    r.method, r.uri, r.status, r.written
                )
            })
            .collect();
        let mounts = shoal_json(
            &shoal,
            &["mounts", "--json", "--control", &control.to_string_lossy()],
        )?;
        let source = &mounts["mounts"][0]["stats"]["source"];
        let n = |k: &str| source[k].as_u64().unwrap_or(0);
        eprintln!(
            "{NAME}: chroot python3 printed {printed:?}; node {B}'s mount: {} bytes read, \
             peers {} bytes ({} chunks), origin {} bytes ({} chunks), local store {} bytes; \
             origin log since the mark: {data_from_origin} of {} data-blob bytes, {boot_from_origin} \
             of {} bootstrap-layer bytes; requests:\n  {}\n{}",
            mounts["mounts"][0]["stats"]["read_bytes"],
            n("peer_bytes"),
            n("peer_chunks"),
            n("origin_bytes"),
            n("origin_chunks"),
            n("local_bytes"),
            image.data_bytes(),
            image.bootstrap_layer.1,
            origin_requests.join("\n  "),
            node_report(&cluster)
        );
        ensure!(
            python.status.success() && printed == "42",
            "chroot {PYTHON} in node {B}'s mount: {} stdout {printed:?} stderr {}",
            python.status,
            String::from_utf8_lossy(&python.stderr).trim()
        );
        ensure!(
            data_from_origin == 0,
            "node {A} held every data blob, yet the origin sent {data_from_origin} data-blob bytes \
             for node {B}'s mount"
        );
        // The bootstrap layer is fetched by B's download path, which asks the scheduler, which
        // knows A holds it: it comes from A too, and so does every other blob.
        ensure!(
            boot_from_origin == 0,
            "node {A} held the bootstrap layer, yet the origin sent {boot_from_origin} bytes of it \
             for node {B}'s mount"
        );
        let any_blob = log.blob_bytes_written();
        ensure!(
            any_blob == 0,
            "the origin sent {any_blob} blob bytes for node {B}'s mount"
        );
        ensure!(
            n("peer_bytes") > 0,
            "node {B}'s mount counts no bytes from peers: {source}"
        );
        Ok(())
    });
}

// ---------------------------------------------------------------- helpers

/// The fixture's python binary (a path inside the image).
const PYTHON: &str = "/usr/bin/python3.11";

/// Lazily detaches whatever is mounted at `dir` in the mount namespace of process `pid` (a node:
/// see [`Cluster::in_node_mounts`]) when the test ends, also when it fails.
struct Unmount {
    pid: u32,
    dir: std::path::PathBuf,
}

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("nsenter")
            .args([
                "--target",
                &self.pid.to_string(),
                "--mount",
                "--",
                "umount",
                "-l",
            ])
            .arg(&self.dir)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Runs `shoal ARGS` (from this host: admin ports are reachable over the bridge) and parses its
/// stdout as JSON.
fn shoal_json(shoal: &std::path::Path, args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new(shoal).args(args).output()?;
    ensure!(
        out.status.success(),
        "shoal {args:?}: {} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    serde_json::from_slice(&out.stdout).with_context(|| format!("shoal {args:?}: not JSON"))
}

/// Polls the scheduler until every layer has at least `holders` complete holders.
fn wait_complete_holders(cluster: &Cluster, holders: u32) -> Result<()> {
    let layers: Vec<String> = cluster
        .image()
        .layers
        .iter()
        .map(|d| d.digest.clone())
        .collect();
    wait_complete_holders_of(cluster, &layers, holders)
}

/// Polls the scheduler until every blob of `blobs` has at least `holders` complete holders.
fn wait_complete_holders_of(cluster: &Cluster, blobs: &[String], holders: u32) -> Result<()> {
    shoal_e2e::wait::poll(
        "the scheduler to know a complete holder of every blob",
        Duration::from_secs(30),
        || {
            let status = cluster.scheduler_status()?;
            let done = blobs.iter().all(|d| {
                status
                    .blobs
                    .iter()
                    .any(|b| b.blob.to_string() == *d && b.complete_holders >= holders)
            });
            Ok(done.then_some(()))
        },
    )
}

/// The longest of the pulls.
fn slowest(pulled: &[cluster::Pulled]) -> Duration {
    pulled.iter().map(|p| p.elapsed).max().unwrap_or_default()
}
