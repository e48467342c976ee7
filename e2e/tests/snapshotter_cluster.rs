//! The containerd snapshotter across two hosts of a cluster, in network namespaces: hosts A and B
//! each run a `shoal node` (a member, with the scheduler and the join secret) serving containerd's
//! snapshots API, and Debian's containerd started inside that node's network and mount
//! namespaces (where the node's lazy mounts exist) with the config `shoal config containerd
//! --write --snapshotter` makes, its hosts.toml sending the origin's host to the node's mirror.
//! The origin (200 Mbit/s out) holds the Debian + python3 fixture and its conversion by
//! `shoal convert`.
//!
//! What is asserted, against containerd's, the origin's own log's and the scheduler's views (the
//! node's own figures only where only the node can say):
//! 1. on A, `ctr-remote image rpull` then `ctr run` of python3 prints 42, its chunks from the
//!    origin; once the image mount went with the container, the scheduler holds the access list
//!    A's node saved (a signed GET of `/api/v1/access-lists/<key>`, equal to A's file), the key
//!    being the sha256 of the image's RAFS bootstrap as read from the origin's bootstrap layer;
//! 2. on B, rpull then containers of the image: the origin serves no data-blob byte during B's
//!    rpull and runs (its log since a mark), B's image mount took chunks from a peer
//!    (`peer_chunks` > 0, A being the only other node), and B's node logs that it prefetches the
//!    shared access list;
//! 3. B's container start fetches nothing on demand: a first, detached container (`sleep`)
//!    mounts the image and its prefetch runs; once `shoal mounts --json` says the prefetch is
//!    `done`, the mount's on-demand chunks (origin + peer − prefetch) are noted, a second
//!    container runs python3 (42), and the on-demand chunks did not grow and the origin served
//!    no blob byte at all.
//!
//! The checks of 2 and 3 are all made before the test fails, so one run names every shortfall;
//! the figures (origin bytes, chunks by source, on-demand counts, and which listed chunks lie in
//! pieces the scheduler lists for A) are printed first.
//!
//! Needs root, iproute2, /dev/fuse, `nsenter`, containerd with `ctr`, `ctr-remote` (Debian's
//! stargz-snapshotter), runc, the distribution registry, skopeo and the `shoal` binary.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use shoal_e2e::cluster::{mb, node_report, Cluster, ClusterOptions, NodeSpec};
use shoal_e2e::containerd::{self, Containerd, Place, Source};
use shoal_e2e::nydus::{self, Converted};
use shoal_e2e::setup::{self, IMAGE, REPO};
use shoal_e2e::wait::poll;
use shoal_e2e::{http, netns, paths, run, Need, TestCtx};

const NEEDS: &[Need] = &[
    Need::Root,
    Need::Fuse,
    Need::Bin("ip"),
    Need::Bin("tc"),
    Need::Bin("nsenter"),
    Need::Bin("mountpoint"),
    Need::Bin("docker-registry"),
    Need::Bin("skopeo"),
    Need::Bin("containerd"),
    Need::Bin("containerd-shim-runc-v2"),
    Need::Bin("runc"),
    Need::Bin("ctr"),
    Need::Bin("ctr-remote"),
    Need::Shoal,
];

/// The proxy plugin and `--snapshotter` name.
const SN: &str = "shoal";
/// The tag `shoal convert` writes the Nydus image under (in [`REPO`]).
const NYDUS_TAG: &str = "1-nydus";
/// What the containers that are measured run.
const PYTHON: &[&str] = &["python3", "-c", "import json; print(42)"];
/// The snapshotter's mount mode on both hosts. FUSE: which chunks a program's start reads is
/// then the same on every host. In EROFS mode the kernel's readahead of the blob files also
/// touches neighbouring chunks, a few of which differ from run to run (see the README's gaps).
const MODE: &str = "fuse";
/// The container that holds B's image mount while its prefetch runs.
const HOLD: &[&str] = &["sleep", "600"];
/// Node indices.
const A: usize = 0;
const B: usize = 1;
/// B's node log line when its mount takes the list another node shared.
const SHARED_PREFETCH: &str = "prefetching the access list another node shared";
/// How long the node may take to share a list (it saves every 5 s, and when the mount goes).
const SHARE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long B's prefetch may take (a few MB at the node's 32 MiB/s prefetch rate, from a peer).
const PREFETCH_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a log line may take to appear.
const LOG_TIMEOUT: Duration = Duration::from_secs(30);

/// One host: its containerd (in its node's namespaces) and the hosts.toml dir.
struct Host {
    ctrd: Containerd,
    hosts: PathBuf,
}

/// The cluster with the converted image in its origin.
struct Scene {
    cluster: Cluster,
    /// `ORIGIN/test/python:1-nydus`.
    image: String,
    converted: Converted,
    /// The image's RAFS bootstrap, and its sha256: the key its access list is filed under.
    bootstrap: Vec<u8>,
    key: String,
}

#[test]
fn a_second_host_starts_containers_from_peers_and_the_shared_access_list() {
    let name = "snap_cluster";
    if let Some(why) = netns::unavailable() {
        shoal_e2e::skip(name, &why);
        return;
    }
    run(name, NEEDS, |t| {
        // Unix socket paths stay short (< 108 bytes): directly in the test's dir.
        let sockets = [t.dir().join("a.sock"), t.dir().join("b.sock")];
        // Declared before the hosts, so dropped after them: containerd and its shims go first.
        let s = scene(t, &sockets)?;
        let hosts = [A, B]
            .iter()
            .map(|&i| start_host(t, &s.cluster, i, &sockets[i]))
            .collect::<Result<Vec<Host>>>()?;
        let shared = on_a(t, &s, &hosts[A])?;
        let servable = servable_from(&s.cluster, B, A, &s.bootstrap, &shared)?;
        println!("{name}: of the {} listed chunks, {servable}", shared.len());
        on_b(t, &s, &hosts[B])?;
        hosts[B].ctrd.kill_and_remove("b-hold")?;
        for h in &hosts {
            h.ctrd.remove_images(&h.ctrd.images()?)?;
        }
        Ok(())
    });
}

/// The cluster (nodes A and B serving the snapshots API on `sockets`) and the fixture converted
/// by `shoal convert` in its origin.
fn scene(t: &TestCtx, sockets: &[PathBuf; 2]) -> Result<Scene> {
    for s in sockets {
        ensure!(
            s.as_os_str().len() < 100,
            "socket path {} too long",
            s.display()
        );
    }
    let specs = sockets
        .iter()
        .map(|s| {
            NodeSpec::member().with_args([
                "--snapshotter-socket".into(),
                s.display().to_string(),
                "--set".into(),
                format!("snapshotter.mode={MODE}"),
            ])
        })
        .collect();
    let cluster = Cluster::start(t, &ClusterOptions::of(specs))?;
    let origin = cluster.origin();
    let oci = format!("{}/{IMAGE}", origin.addr());
    let image = format!("{}/{REPO}:{NYDUS_TAG}", origin.addr());
    nydus::shoal_convert(t, &oci, &image)?;
    let manifest = get_manifest(&cluster, NYDUS_TAG)?;
    let converted = Converted::of(&manifest)?;
    ensure!(
        !converted.blobs.is_empty(),
        "the converted image has no data blobs: {manifest}"
    );
    let bootstrap = bootstrap_of(&cluster, &converted)?;
    let key = http::sha256_digest(&bootstrap);
    Ok(Scene {
        cluster,
        image,
        converted,
        bootstrap,
        key,
    })
}

/// Step 1, host A: rpull and run python3 cold, its chunks from the origin; then the image mount
/// goes with the container and the scheduler holds the list A's node saved. Returns that list.
fn on_a(t: &TestCtx, s: &Scene, a: &Host) -> Result<Vec<ChunkKey>> {
    let cluster = &s.cluster;
    let mark = cluster.origin_mark()?;
    let started = Instant::now();
    a.ctrd
        .rpull(SN, Source::Hosts(&a.hosts), &s.image)?
        .ok("ctr-remote image rpull on A")?;
    // A runs what B will: the holding container's program (briefly), then python3.
    a.ctrd
        .run(SN, &s.image, "a-hold", &[HOLD[0], "0"])?
        .ok("ctr run (sleep) on A")?;
    let out = a
        .ctrd
        .run(SN, &s.image, "a-py", PYTHON)?
        .ok("ctr run on A")?;
    let took = started.elapsed();
    ensure!(out.trim() == "42", "ctr run on A printed {out:?}");
    let data = data_bytes_since(cluster, &s.converted, mark)?;
    let blobs = cluster.origin_blob_bytes_since(mark)?;
    ensure!(
        data > 0,
        "A's rpull and run took no data-blob byte from the origin: where did its chunks come from?"
    );
    // The image mount goes with A's last container; its list is saved and shared then.
    let control = cluster.node(A).control_path();
    poll(
        "A's image mount to go with its container",
        LOG_TIMEOUT,
        || Ok(snapshotter_mounts(&control)?.is_empty().then_some(())),
    )?;
    let own_path = access_dir(cluster, A).join(format!("{}.json", s.key.replace(':', "-")));
    let own = poll("A's node to file its access list", SHARE_TIMEOUT, || {
        Ok(read_list(&own_path).ok())
    })
    .with_context(|| {
        format!(
            "A's node filed no access list at {} (the key the test computed is not the node's)",
            own_path.display()
        )
    })?;
    // The list is saved (and shared) once more as the mount goes: compare with the file as it
    // is at each poll.
    let _ = own;
    let shared = poll(
        "the scheduler to hold A's final access list",
        SHARE_TIMEOUT,
        || {
            let own = read_list(&own_path)?;
            Ok(shared_list(cluster, &s.key)?.filter(|l| *l == own))
        },
    )?;
    println!(
        "{}: A: rpull + run {:.2}s, {data} of {} data-blob bytes from the origin ({:.1} MB of \
         blobs in all); the scheduler holds A's access list of {} chunks",
        t.name(),
        took.as_secs_f64(),
        s.converted.data_bytes(),
        mb(blobs),
        shared.len()
    );
    Ok(shared)
}

/// Steps 2 and 3, host B: rpull, a first container holding the image mount while the shared list
/// is prefetched, then python3 in a second one; all from A and the list, nothing on demand.
fn on_b(t: &TestCtx, s: &Scene, b: &Host) -> Result<()> {
    let cluster = &s.cluster;
    let mark = cluster.origin_mark()?;
    b.ctrd
        .rpull(SN, Source::Hosts(&b.hosts), &s.image)?
        .ok("ctr-remote image rpull on B")?;
    let rpull_data = data_bytes_since(cluster, &s.converted, mark)?;
    ensure!(
        rpull_data == 0,
        "B's rpull took {rpull_data} data-blob bytes from the origin"
    );
    b.ctrd.run_detached(SN, &s.image, "b-hold", HOLD)?;
    poll(
        "B's node to log that it prefetches the shared access list",
        LOG_TIMEOUT,
        || {
            let log = cluster.node(B).log_text();
            Ok(log.contains(SHARED_PREFETCH).then_some(()))
        },
    )?;
    let control = cluster.node(B).control_path();
    let done = poll("B's prefetch to be done", PREFETCH_TIMEOUT, || {
        let m = image_mount(&control)?;
        match m.prefetch["state"].as_str().unwrap_or_default() {
            "running" | "off" => bail!("prefetch {}", m.prefetch),
            _ => Ok(Some(m)),
        }
    })?;
    ensure!(
        done.prefetch["state"] == "done",
        "B's prefetch ended {}, not done",
        done.prefetch
    );
    let before = done.on_demand();
    let mark_run = cluster.origin_mark()?;
    let started = Instant::now();
    let out = b
        .ctrd
        .run(SN, &s.image, "b-py", PYTHON)?
        .ok("ctr run on B")?;
    let took = started.elapsed();
    ensure!(out.trim() == "42", "ctr run on B printed {out:?}");
    let after = image_mount(&control)?;
    ensure!(
        after.dir == done.dir,
        "B's second container stands on another image mount ({} then {})",
        done.dir,
        after.dir
    );
    let run_blob = cluster.origin_blob_bytes_since(mark_run)?;
    let data = data_bytes_since(cluster, &s.converted, mark)?;
    let blobs = cluster.origin_blob_bytes_since(mark)?;
    println!(
        "{}: B: origin data-blob bytes during rpull and runs {data} (all blobs {blobs}); image \
         mount: {} chunks fetched ({} from peers, {} from the origin; {} of them for prefetch), \
         {} kept in the store, {} read from it; on demand {before} before the second container, \
         {} after; the second container ran in {:.2}s and took {run_blob} blob bytes from the \
         origin; prefetch {}",
        t.name(),
        after.count("peer_chunks") + after.count("origin_chunks"),
        after.count("peer_chunks"),
        after.count("origin_chunks"),
        after.count("prefetch_chunks"),
        after.count("stored_chunks"),
        after.count("local_chunks"),
        after.on_demand(),
        took.as_secs_f64(),
        after.prefetch
    );
    print!("{}", node_report(cluster));
    // Every check, so one run names every way it fell short.
    let mut failed = Vec::new();
    if data != 0 {
        failed.push(format!(
            "the origin served {data} data-blob bytes during B's rpull and runs"
        ));
    }
    if after.peer_chunks() == 0 {
        failed.push(format!(
            "B's image mount took no chunk from a peer: {}",
            after.source
        ));
    }
    if after.on_demand() != before {
        failed.push(format!(
            "B's second container fetched {} chunks on demand after the prefetch was done \
             ({before} before, {} after): {}",
            after.on_demand().saturating_sub(before),
            after.on_demand(),
            after.source
        ));
    }
    if run_blob != 0 {
        failed.push(format!(
            "the origin served {run_blob} blob bytes during B's second container"
        ));
    }
    ensure!(failed.is_empty(), "{}", failed.join("; "));
    Ok(())
}

/// Node `i`'s containerd: the config `shoal config containerd` writes for it, the daemon in the
/// node's network and mount namespaces.
fn start_host(t: &TestCtx, cluster: &Cluster, i: usize, socket: &Path) -> Result<Host> {
    let origin = cluster.origin();
    let (config, hosts) = containerd::shoal_config(
        t,
        &format!("root{i}"),
        &origin.addr(),
        &origin.url(),
        &cluster.node(i).url(),
        socket,
    )?;
    let ctrd =
        Containerd::start_with_config_in(t, &config, Place::NodeNamespaces(cluster.node_pid(i)?))?;
    let plugins = ctrd.plugins()?;
    ensure!(
        plugins
            .iter()
            .any(|(ty, id, status)| ty == "io.containerd.snapshotter.v1"
                && id == SN
                && status == "ok"),
        "node {i}: the shoal snapshotter is not loaded ok: {plugins:?}"
    );
    Ok(Host { ctrd, hosts })
}

/// The image manifest under `tag` of [`REPO`] at the origin.
fn get_manifest(cluster: &Cluster, tag: &str) -> Result<Value> {
    let url = format!("{}/v2/{REPO}/manifests/{tag}", cluster.origin().url());
    let got = http::fetch(
        http::client()?
            .get(url)
            .header("Accept", setup::MANIFEST_ACCEPT),
    )?;
    ensure!(got.completed_ok(), "GET manifest {tag}: {}", got.short());
    got.json()
}

/// The image's RAFS bootstrap, read from the bootstrap layer the origin serves (its sha256 is
/// the key the image's access list is filed under).
fn bootstrap_of(cluster: &Cluster, converted: &Converted) -> Result<Vec<u8>> {
    let digest = &converted.bootstrap_layer.0;
    let url = format!("{}/v2/{REPO}/blobs/{digest}", cluster.origin().url());
    let got = http::fetch(http::client()?.get(url))?;
    ensure!(got.completed_ok(), "GET bootstrap layer: {}", got.short());
    nydus::bootstrap_of_layer(&got.body)
}

/// A chunk as an access list names it: (blob table index, compressed offset).
type ChunkKey = (u32, u64);

/// The access list the scheduler holds under `key` (a signed GET), if it holds a non-empty one.
fn shared_list(cluster: &Cluster, key: &str) -> Result<Option<Vec<ChunkKey>>> {
    let got = http::fetch(
        cluster
            .scheduler()?
            .get(&format!("/api/v1/access-lists/{key}"))?,
    )?;
    if got.status.as_u16() == 404 {
        return Ok(None);
    }
    ensure!(got.completed_ok(), "GET access list: {}", got.short());
    let list: shoal_proto::sched::AccessList = serde_json::from_slice(&got.body)?;
    Ok((!list.chunks.is_empty()).then_some(list.chunks))
}

/// An access list file a node wrote (`{"chunks": [[blob index, offset], …]}`).
fn read_list(path: &Path) -> Result<Vec<ChunkKey>> {
    let list: shoal_proto::sched::AccessList = serde_json::from_slice(&std::fs::read(path)?)?;
    Ok(list.chunks)
}

/// For node `asker`: how many of `list`'s chunks lie in pieces that the scheduler says node
/// `holder` holds (its parents answer for each data blob, as `asker` would get it), as a line
/// for the report.
fn servable_from(
    cluster: &Cluster,
    asker: usize,
    holder: usize,
    bootstrap: &[u8],
    list: &[ChunkKey],
) -> Result<String> {
    let boot = shoal_rafs::Bootstrap::from_bytes(bootstrap.to_vec())?;
    let scheduler = cluster.scheduler()?;
    let asker_id = cluster.node_id(asker)?;
    let holder_id = cluster.node_id(holder)?;
    let (mut in_held, mut pieces_held, mut bytes_present) = (0usize, Vec::new(), Vec::new());
    for blob in boot.blobs() {
        let digest = format!("sha256:{}", blob.blob_id);
        let body = serde_json::to_vec(&shoal_proto::sched::ParentsRequest {
            asker: asker_id,
            size: None,
            want_lease: false,
        })?;
        let path = format!("/api/v1/blobs/{digest}/parents");
        let addr = scheduler.addr().to_string();
        let mut req = http::client()?
            .post(format!("http://{addr}{path}"))
            .header("content-type", "application/json")
            .header(
                shoal_proto::sched::PROTOCOL_HEADER,
                shoal_proto::sched::PROTOCOL_VERSION.to_string(),
            )
            .header("host", addr.clone());
        if let Some(auth) = scheduler.sign("POST", &path, &body) {
            req = req.header(shoal_proto::auth::AUTH_HEADER, auth);
        }
        let got = http::fetch(req.body(body))?;
        ensure!(got.completed_ok(), "POST {path}: {}", got.short());
        let view: shoal_proto::sched::ParentsResponse = serde_json::from_slice(&got.body)?;
        let have = view
            .holders
            .iter()
            .find(|h| h.node == holder_id)
            .map(|h| &h.have);
        let piece = view.piece_size.unwrap_or(u64::MAX).max(1);
        pieces_held.push(format!(
            "{}: {} of {} pieces of {} KiB",
            &digest[..19],
            have.map_or(0, |h| h.count()),
            have.map_or(0, |h| h.len()),
            piece / 1024
        ));
        let status = cluster.node(holder).status()?;
        bytes_present.push(status.blob(&digest).map_or(0, |b| b.present_bytes));
        let chunks = boot.blob_chunks(blob.index)?;
        for &(_, offset) in list.iter().filter(|(i, _)| *i == blob.index) {
            let Some(c) = chunks.iter().find(|c| c.compressed_offset == offset) else {
                continue;
            };
            let end = offset + u64::from(c.compressed_size);
            let (first, last) = (offset / piece, end.saturating_sub(1) / piece);
            let held = have
                .is_some_and(|h| (first..=last).all(|p| u32::try_from(p).is_ok_and(|p| h.get(p))));
            in_held += usize::from(held);
        }
    }
    Ok(format!(
        "{in_held} lie in pieces node {holder} holds as the scheduler lists them ({}); \
         node {holder} holds {bytes_present:?} bytes of the data blobs",
        pieces_held.join(", ")
    ))
}

/// Where node `i` keeps access lists.
fn access_dir(cluster: &Cluster, i: usize) -> PathBuf {
    cluster.node(i).data_dir().join("access")
}

/// Origin body bytes for the image's data blobs since log entry `mark`.
fn data_bytes_since(cluster: &Cluster, converted: &Converted, mark: usize) -> Result<u64> {
    let log = cluster.origin().log()?.since(mark);
    Ok(log
        .requests
        .iter()
        .filter(|r| r.is_blob_fetch())
        .filter(|r| {
            converted
                .blobs
                .iter()
                .any(|(d, _)| r.blob_digest() == Some(d))
        })
        .map(|r| r.written)
        .sum())
}

/// The snapshotter's image mount as `shoal mounts --json` shows it.
struct ImageMount {
    dir: String,
    source: Value,
    prefetch: Value,
}

impl ImageMount {
    fn count(&self, field: &str) -> u64 {
        self.source[field].as_u64().unwrap_or(0)
    }

    fn peer_chunks(&self) -> u64 {
        self.count("peer_chunks")
    }

    /// Chunks fetched for reads, not for prefetch (prefetch counts its chunks from peers and
    /// the origin alike).
    fn on_demand(&self) -> u64 {
        (self.count("origin_chunks") + self.count("peer_chunks"))
            .saturating_sub(self.count("prefetch_chunks"))
    }
}

/// The snapshotter-owned mounts of the node at `control` (`shoal mounts --json`).
fn snapshotter_mounts(control: &Path) -> Result<Vec<Value>> {
    let out = Command::new(paths::shoal_bin()?)
        .args(["mounts", "--json", "--control"])
        .arg(control)
        .output()
        .context("running shoal mounts")?;
    ensure!(
        out.status.success(),
        "shoal mounts: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: Value = serde_json::from_slice(&out.stdout).context("shoal mounts --json")?;
    Ok(list["mounts"]
        .as_array()
        .context("no mounts array")?
        .iter()
        .filter(|m| m["owner"] == "snapshotter")
        .cloned()
        .collect())
}

/// The one snapshotter-owned mount of the node at `control`.
fn image_mount(control: &Path) -> Result<ImageMount> {
    let mounts = snapshotter_mounts(control)?;
    let [m] = &mounts[..] else {
        bail!("{} snapshotter mounts: {mounts:?}", mounts.len());
    };
    ensure!(m["state"] == "mounted", "the image mount is {}", m["state"]);
    Ok(ImageMount {
        dir: m["dir"].as_str().unwrap_or_default().to_owned(),
        source: m["stats"]["source"].clone(),
        prefetch: m["stats"]["prefetch"].clone(),
    })
}
