//! The containerd snapshotter end to end: Debian's containerd (1.6), started with the config
//! `shoal config containerd --write --snapshotter` makes of Debian's stock config.toml, drives a
//! real `shoal node` over its snapshots socket (`--snapshotter-socket`); images come from a real
//! registry, the Nydus one converted from the Debian + python3 fixture by `shoal convert`.
//!
//! What is asserted, each against containerd's, the registry's or the kernel's own view:
//! - the `shoal` proxy snapshotter loads `ok`; `ctr-remote image rpull` of the Nydus image through
//!   the node (hosts.toml) takes no data-blob byte from the origin, `ctr run` of python3 prints
//!   42, and pull plus run take at most a tenth of the data-blob bytes from the origin;
//! - containers beside a running first one share its image mount (one mount, no new origin byte
//!   once the first has read what they read) and do not see its writes, which land in its upper
//!   directory under the node's snapshotter root and vanish with it; after the images are
//!   removed, containerd and the node hold no snapshot, directory or mount;
//! - a plain OCI image (`ctr image pull`, a full pull) runs on the same snapshotter;
//! - bad input ends with a containerd-visible error and no half-made snapshot: a Nydus image
//!   without its bootstrap layer, the origin down at the first container start of an image the
//!   node holds nothing of, and layers whose media type containerd cannot unpack.
//!
//! "No new origin byte" is measured from a point where nothing can still be fetching for the
//! first container: it is blocked for good on a FIFO and no FUSE request of the node's mounts is
//! in flight (fusectl's `waiting`), so the kernel's asynchronous readahead cannot land late.
//!
//! Needs root, /dev/fuse, containerd with `ctr`, `ctr-remote` (Debian's stargz-snapshotter),
//! runc, the distribution registry, skopeo and the `shoal` binary.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use shoal_e2e::containerd::{Containerd, Source};
use shoal_e2e::node::{Node, NodeOptions};
use shoal_e2e::nydus::{shoal_convert, BLOB_MEDIA_TYPE as NYDUS_BLOB};
use shoal_e2e::registry::Registry;
use shoal_e2e::setup::{self, IMAGE, REPO};
use shoal_e2e::wait::poll;
use shoal_e2e::{http, paths, run, skopeo, Need, TestCtx};

const NEEDS: &[Need] = &[
    Need::Root,
    Need::Fuse,
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
/// What every container runs.
const PYTHON: &[&str] = &["python3", "-c", "import json; print(42)"];
/// A container that writes to its root filesystem, then blocks for good opening a FIFO (the
/// same imports as [`PYTHON`]: once it blocks there it has read all it will read).
const LONG_RUNNING: &[&str] = &[
    "python3",
    "-c",
    "import json, os; os.mkfifo('/root/shoal-block'); \
     open('/root/shoal-probe', 'w').write('written-by-c1\\n'); open('/root/shoal-block').read()",
];
/// Where the kernel says (`/proc/PID/wchan`) a process blocked opening a FIFO waits.
const FIFO_WAIT: &str = "wait_for_partner";
/// Run in another container: whether it sees that write.
const SEES_PROBE: &str = "import json, os; print(42, os.path.exists('/root/shoal-probe'))";
/// How long containerd's garbage collection may take to reach the snapshotter.
/// (containerd paces its collector to 2 % of its time: under load a pass can be tens of seconds
/// after the last.)
const GC_TIMEOUT: Duration = Duration::from_secs(180);
/// The node log line of one image mount under containers.
const MOUNTED: &str = "image mounted for containers";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// Origin, node and containerd wired as `shoal config containerd --snapshotter` says. Fields drop
/// in order: containerd (and the tasks it runs) before the node under them.
struct Scene {
    containerd: Containerd,
    node: Node,
    origin: Registry,
    /// The hosts.toml directory `shoal config` wrote (the node as mirror of the origin).
    hosts: PathBuf,
    /// `ADDR/test/python:1`, the fixture as pushed.
    oci: String,
    /// `ADDR/test/python:1-nydus`, its conversion.
    nydus: String,
    /// The converted manifest.
    manifest: Value,
}

impl Scene {
    /// Data blobs of the Nydus image: (digest, size) of its nydus blob layers.
    fn data_blobs(&self) -> Vec<(String, u64)> {
        layers(&self.manifest)
            .iter()
            .filter(|l| l["mediaType"] == NYDUS_BLOB)
            .map(|l| {
                (
                    l["digest"].as_str().unwrap_or_default().to_owned(),
                    l["size"].as_u64().unwrap_or_default(),
                )
            })
            .collect()
    }

    /// Body bytes the origin sent for the Nydus image's data blobs since log entry `mark`.
    fn data_bytes_since(&self, mark: usize) -> Result<u64> {
        let log = self.origin.log()?.since(mark);
        let blobs = self.data_blobs();
        Ok(log
            .requests
            .iter()
            .filter(|r| r.is_blob_fetch())
            .filter(|r| blobs.iter().any(|(d, _)| r.blob_digest() == Some(d)))
            .map(|r| r.written)
            .sum())
    }

    fn mark(&self) -> Result<usize> {
        Ok(self.origin.log()?.requests.len())
    }

    /// The node's snapshotter root (`<data dir>/snapshotter`).
    fn root(&self) -> PathBuf {
        self.node.data_dir().join("snapshotter")
    }

    fn metric(&self, name: &str, filter: &[(&str, &str)]) -> Result<f64> {
        Ok(self.node.metrics()?.sum(name, filter))
    }

    /// How often the node logged an image mount under containers.
    fn mounts_logged(&self) -> usize {
        self.node.log_text().matches(MOUNTED).count()
    }

    /// Waits until neither containerd nor the node holds a snapshot, no directory remains under
    /// the snapshotter's `snapshots/` and `images/`, and nothing is mounted under its root.
    fn wait_clean(&self) -> Result<()> {
        let root = self.root();
        poll(
            "containerd's GC to leave no snapshot, directory or mount",
            GC_TIMEOUT,
            || {
                let rows = self.containerd.snapshots(SN)?;
                let dirs = entries(&root.join("snapshots"))?;
                let images = entries(&root.join("images"))?;
                let mounted = mounts_under(&root);
                let kinds = ["active", "view", "committed"];
                let mut held = 0.0;
                for kind in kinds {
                    held += self.metric("shoal_snapshots", &[("kind", kind)])?;
                }
                if rows.is_empty()
                    && dirs.is_empty()
                    && images.is_empty()
                    && mounted.is_empty()
                    && held == 0.0
                {
                    return Ok(Some(()));
                }
                anyhow::bail!(
                    "containerd lists {rows:?}; the node holds {held} snapshots, \
                     snapshots/ {dirs:?}, images/ {images:?}, mounts {mounted:?}"
                )
            },
        )
    }
}

/// Origin with the fixture (and, with `convert`, its Nydus conversion), a node serving the
/// snapshots API, and containerd started with the config `shoal config containerd` wrote.
fn scene(t: &TestCtx, convert: bool) -> Result<Scene> {
    let origin = Registry::start(t)?;
    skopeo::push_fixture(t, &origin, IMAGE)?;
    let oci = format!("{}/{IMAGE}", origin.addr());
    let nydus = format!("{}/{REPO}:{NYDUS_TAG}", origin.addr());
    let manifest = if convert {
        shoal_convert(t, &oci, &nydus)?;
        get_manifest(&origin, NYDUS_TAG)?
    } else {
        Value::Null
    };

    let socket = t.dir().join("snap.sock");
    let socket_s = socket.display().to_string();
    ensure!(
        socket_s.len() < 100,
        "socket path {socket_s} too long for a Unix socket: use a shorter test name"
    );
    let node = Node::start_with(
        t,
        NodeOptions {
            upstream: origin.url(),
            host_upstreams: vec![(origin.addr(), origin.url())],
            extra_args: vec!["--snapshotter-socket".into(), socket_s.clone()],
            ..NodeOptions::default()
        },
    )?;

    let root = t.subdir("root")?;
    let config = root.join("etc/containerd/config.toml");
    std::fs::create_dir_all(config.parent().context("config dir")?)?;
    let stock = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/runtime/debian-containerd-config.toml");
    std::fs::copy(&stock, &config).context("copying Debian's containerd config")?;
    let out = Command::new(paths::shoal_bin()?)
        .args(["config", "containerd", "--write", "--root"])
        .arg(&root)
        .arg("--registry")
        .arg(format!("{}={}", origin.addr(), origin.url()))
        .args([
            "--mirror",
            &node.url(),
            "--snapshotter",
            "--snapshotter-socket",
        ])
        .arg(&socket)
        .env_remove("SHOAL_CONFIG")
        .output()
        .context("running shoal config containerd")?;
    ensure!(
        out.status.success(),
        "shoal config containerd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let containerd = Containerd::start_with_config(t, &config)?;
    Ok(Scene {
        containerd,
        node,
        origin,
        hosts: root.join("etc/containerd/certs.d"),
        oci,
        nydus,
        manifest,
    })
}

/// The image manifest under `tag` of [`REPO`].
fn get_manifest(origin: &Registry, tag: &str) -> Result<Value> {
    let url = format!("{}/v2/{REPO}/manifests/{tag}", origin.url());
    let got = http::fetch(
        http::client()?
            .get(url)
            .header("Accept", setup::MANIFEST_ACCEPT),
    )?;
    ensure!(got.completed_ok(), "GET manifest {tag}: {}", got.short());
    got.json()
}

/// Pushes `manifest` under `tag` of [`REPO`].
fn put_manifest(origin: &Registry, tag: &str, manifest: &Value) -> Result<()> {
    let put = origin.put_manifest(REPO, tag, OCI_MANIFEST, serde_json::to_vec(manifest)?)?;
    ensure!(
        put.status.as_u16() == 201,
        "PUT manifest {tag}: {}",
        put.short()
    );
    Ok(())
}

fn layers(manifest: &Value) -> Vec<Value> {
    manifest["layers"].as_array().cloned().unwrap_or_default()
}

/// Names in `dir` (none if it does not exist).
fn entries(dir: &Path) -> Result<Vec<String>> {
    match std::fs::read_dir(dir) {
        Ok(rd) => Ok(rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", dir.display())),
    }
}

/// Mount points at or under `root`, from this process's mountinfo.
fn mounts_under(root: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| p.replace("\\040", " "))
        .filter(|p| Path::new(p).starts_with(root))
        .collect()
}

/// FUSE's control filesystem mounted in the test's dir (its own mount point, so whether the host
/// mounted it at /sys/fs/fuse/connections does not matter; it goes with the test's mounts).
fn fusectl(t: &TestCtx) -> Result<PathBuf> {
    let dir = t.subdir("fusectl")?;
    let st = Command::new("mount")
        .args(["-t", "fusectl", "fusectl"])
        .arg(&dir)
        .status()
        .context("mounting fusectl")?;
    ensure!(st.success(), "mount -t fusectl failed");
    Ok(dir)
}

/// Whether no request is in flight on any FUSE mount under `root` (the image mount in FUSE
/// mode, its blob files in EROFS mode): each connection's `waiting` count in fusectl.
fn fuse_idle(fusectl: &Path, root: &Path) -> Result<bool> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let (Some(dev), Some(point)) = (fields.get(2), fields.get(4)) else {
            continue;
        };
        let fstype = line.split(" - ").nth(1).unwrap_or_default();
        if !fstype.starts_with("fuse") || !Path::new(point).starts_with(root) {
            continue;
        }
        let minor = dev.split(':').nth(1).context("mountinfo device")?;
        let waiting = std::fs::read_to_string(fusectl.join(minor).join("waiting"))
            .with_context(|| format!("fusectl connection {minor} of {point}"))?;
        if waiting.trim() != "0" {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The `KEY=VALUE` options of the mount command `ctr snapshots mounts` printed.
fn mount_option(mount_cmd: &str, key: &str) -> Option<String> {
    let (_, options) = mount_cmd.trim().rsplit_once(" -o ")?;
    options
        .split(',')
        .find_map(|o| o.strip_prefix(&format!("{key}=")).map(str::to_owned))
}

#[test]
fn nydus_image_runs_lazily_and_leaves_nothing() {
    run("nydus_image_runs_lazily_and_leaves_nothing", NEEDS, |t| {
        let s = scene(t, true)?;
        let name = t.name();
        let plugins = s.containerd.plugins()?;
        ensure!(
            plugins
                .iter()
                .any(|(ty, id, status)| ty == "io.containerd.snapshotter.v1"
                    && id == SN
                    && status == "ok"),
            "the shoal snapshotter is not loaded ok: {plugins:?}"
        );
        let data = s.data_blobs();
        ensure!(
            data.len() == 2,
            "the converted image's data blobs: {data:?}"
        );
        let data_total: u64 = data.iter().map(|(_, n)| n).sum();

        // rpull through the node: the data layers are provided, only the bootstrap is fetched.
        let mark0 = s.mark()?;
        s.containerd
            .rpull(SN, Source::Hosts(&s.hosts), &s.nydus)?
            .ok("ctr-remote image rpull")?;
        let rpull_bytes = s.data_bytes_since(mark0)?;
        ensure!(
            rpull_bytes == 0,
            "rpull took {rpull_bytes} data-blob bytes from the origin"
        );
        let provided = s.metric("shoal_snapshotter_layers_provided_total", &[])?;
        ensure!(provided == 2.0, "{provided} layers provided, expected 2");
        let bootstrap = layers(&s.manifest)
            .iter()
            .find(|l| l["annotations"]["containerd.io/snapshot/nydus-bootstrap"] == "true")
            .and_then(|l| l["digest"].as_str().map(str::to_owned))
            .context("no bootstrap layer in the converted manifest")?;
        ensure!(
            s.node
                .status()?
                .blob(&bootstrap)
                .is_some_and(|b| b.complete),
            "the bootstrap layer did not come through the node"
        );
        let rows = s.containerd.snapshots(SN)?;
        ensure!(
            rows.len() == 3 && rows.iter().all(|r| r.kind == "Committed"),
            "after rpull containerd lists {rows:?}"
        );

        // The first container stays up; it mounts the image.
        s.containerd
            .run_detached(SN, &s.nydus, "c1", LONG_RUNNING)?;
        let mounts = s.metric("shoal_snapshotter_image_mounts", &[])?;
        ensure!(mounts == 1.0, "{mounts} image mounts with c1 running");
        let c1 = s.containerd.snapshot_mounts(SN, "c1")?;
        let upper = PathBuf::from(mount_option(&c1, "upperdir").context(c1.clone())?);
        let lower = PathBuf::from(mount_option(&c1, "lowerdir").context(c1.clone())?);
        ensure!(
            upper.starts_with(s.root().join("snapshots")) && upper.ends_with("fs"),
            "c1's upper dir {} is not a snapshot's fs under {}",
            upper.display(),
            s.root().display()
        );
        ensure!(
            lower.parent() == Some(&*s.root().join("images")),
            "c1's lower dir {} is not the image mount",
            lower.display()
        );
        ensure!(
            mounts_under(&lower).contains(&lower.display().to_string()),
            "nothing is mounted at c1's lower dir {}",
            lower.display()
        );

        // c1's write lands in its upper dir; then c1 blocks opening its FIFO, having read all
        // it reads, and once no read of the mount is in flight (the kernel's asynchronous
        // readahead included) what the origin serves is for the containers beside it.
        let probe = upper.join("root/shoal-probe");
        let pid = s.containerd.task_pid("c1")?.context("c1 has no pid")?;
        let fusectl = fusectl(t)?;
        let text = poll(
            "c1 to write its probe and block, its reads done",
            GC_TIMEOUT,
            || {
                let Ok(text) = std::fs::read_to_string(&probe) else {
                    return Ok(None);
                };
                let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan"))?;
                let blocked = wchan.trim() == FIFO_WAIT;
                Ok((blocked && fuse_idle(&fusectl, s.node.data_dir())?).then_some(text))
            },
        )?;
        ensure!(text == "written-by-c1\n", "{}: {text:?}", probe.display());

        // A second container while the first runs: python3 prints 42 off the same mount.
        let mark = s.mark()?;
        let out = s
            .containerd
            .run(SN, &s.nydus, "py1", PYTHON)?
            .ok("ctr run")?;
        ensure!(out.trim() == "42", "ctr run printed {out:?}");
        let total = s.data_bytes_since(mark0)?;
        println!(
            "{name}: origin data-blob bytes: rpull {rpull_bytes}, rpull + containers {total} of \
             {data_total} ({:.2} %)",
            total as f64 * 100.0 / data_total as f64
        );
        ensure!(
            total * 10 <= data_total,
            "pull + run took {total} of {data_total} data-blob bytes from the origin"
        );
        // And a third: it does not see c1's write.
        let out = s
            .containerd
            .run(SN, &s.nydus, "c2", &["python3", "-c", SEES_PROBE])?
            .ok("ctr run (third container)")?;
        ensure!(
            out.trim() == "42 False",
            "the third container printed {out:?} (42 False: it runs and does not see c1's write)"
        );
        let logged = s.mounts_logged();
        ensure!(
            logged == 1,
            "{logged} '{MOUNTED}' lines in the node log: containers beside c1 made new mounts"
        );
        let mounts = s.metric("shoal_snapshotter_image_mounts", &[])?;
        ensure!(
            mounts == 1.0,
            "{mounts} image mounts after the containers beside c1"
        );
        let images = entries(&s.root().join("images"))?;
        ensure!(images.len() == 1, "image mount points: {images:?}");
        let more = s.data_bytes_since(mark)?;
        ensure!(
            more == 0,
            "the containers beside c1 took {more} data-blob bytes from the origin"
        );
        println!("{name}: two containers beside the first: the same image mount, 0 origin bytes");

        // c1 goes, and its writes with it; then the image.
        s.containerd.kill_and_remove("c1")?;
        let snapshot_dir = upper.parent().context("upper dir's parent")?.to_owned();
        poll("c1's snapshot directory to go", GC_TIMEOUT, || {
            Ok((!snapshot_dir.exists()).then_some(()))
        })?;
        s.containerd.remove_images(&s.containerd.images()?)?;
        s.wait_clean()?;
        let mounts = s.metric("shoal_snapshotter_image_mounts", &[])?;
        ensure!(
            mounts == 0.0,
            "{mounts} image mounts after every image went"
        );
        println!("{name}: after the images went: no snapshot, directory or mount left");
        Ok(())
    });
}

#[test]
fn plain_oci_image_runs_on_the_snapshotter() {
    run("plain_oci_image_runs_on_the_snapshotter", NEEDS, |t| {
        let s = scene(t, false)?;
        s.containerd
            .pull_into(SN, Source::Hosts(&s.hosts), &s.oci)?
            .ok("ctr image pull")?;
        let rows = s.containerd.snapshots(SN)?;
        ensure!(
            rows.len() == 2 && rows.iter().all(|r| r.kind == "Committed"),
            "after the pull containerd lists {rows:?}"
        );
        // containerd unpacked the layers into the snapshotter's directories.
        let snapshots = s.root().join("snapshots");
        let unpacked = entries(&snapshots)?.iter().any(|id| {
            std::fs::symlink_metadata(snapshots.join(id).join("fs/usr/bin/python3")).is_ok()
        });
        ensure!(unpacked, "no unpacked layer holds usr/bin/python3");
        let out = s.containerd.run(SN, &s.oci, "py1", PYTHON)?.ok("ctr run")?;
        ensure!(out.trim() == "42", "ctr run printed {out:?}");
        ensure!(s.mounts_logged() == 0, "a plain OCI image got a lazy mount");
        let provided = s.metric("shoal_snapshotter_layers_provided_total", &[])?;
        ensure!(provided == 0.0, "{provided} OCI layers were 'provided'");
        s.containerd.remove_images(&s.containerd.images()?)?;
        s.wait_clean()
    });
}

#[test]
fn nydus_image_without_bootstrap_is_refused() {
    run("nydus_image_without_bootstrap_is_refused", NEEDS, |t| {
        let s = scene(t, true)?;
        // The converted image minus its bootstrap layer (and the config's diff id for it).
        let data: Vec<Value> = layers(&s.manifest)
            .into_iter()
            .filter(|l| l["mediaType"] == NYDUS_BLOB)
            .collect();
        let config_digest = s.manifest["config"]["digest"]
            .as_str()
            .context("config digest")?;
        let url = format!("{}/v2/{REPO}/blobs/{config_digest}", s.origin.url());
        let mut config = http::fetch(http::client()?.get(url))?.json()?;
        config["rootfs"]["diff_ids"] = json!(data.iter().map(|l| &l["digest"]).collect::<Vec<_>>());
        let config_bytes = serde_json::to_vec(&config)?;
        let size = config_bytes.len();
        let digest = s.origin.push_blob(REPO, config_bytes)?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": digest,
                "size": size,
            },
            "layers": data,
        });
        put_manifest(&s.origin, "no-bootstrap", &manifest)?;
        let reference = format!("{}/{REPO}:no-bootstrap", s.origin.addr());

        s.containerd
            .rpull(SN, Source::Hosts(&s.hosts), &reference)?
            .ok("ctr-remote image rpull")?;
        let out = s.containerd.run(SN, &reference, "c1", PYTHON)?;
        ensure!(
            !out.success,
            "a container without a bootstrap ran: {}",
            out.output
        );
        ensure!(
            out.output.contains("without a Nydus bootstrap layer")
                && out
                    .output
                    .contains("containerd.io/snapshot/nydus-bootstrap")
                && out.output.contains("failed precondition"),
            "unclear error: {}",
            out.output
        );
        println!("{}: ctr run: {}", t.name(), out.output.trim());
        let rows = s.containerd.snapshots(SN)?;
        ensure!(
            rows.iter().all(|r| r.kind == "Committed"),
            "a container snapshot was left: {rows:?}"
        );
        let active = s.metric("shoal_snapshots", &[("kind", "active")])?;
        ensure!(active == 0.0, "the node holds {active} active snapshots");
        ensure!(s.mounts_logged() == 0, "an image was mounted");
        s.containerd.remove_images(&s.containerd.images()?)?;
        s.wait_clean()
    });
}

#[test]
fn origin_down_at_container_start_fails_cleanly() {
    run("origin_down_at_container_start_fails_cleanly", NEEDS, |t| {
        let mut s = scene(t, true)?;
        // Pulled from the registry itself: the node sees none of the image.
        s.containerd
            .rpull(SN, Source::Direct, &s.nydus)?
            .ok("ctr-remote image rpull --plain-http")?;
        let held = s.node.status()?.store.blobs;
        ensure!(held == 0, "the node holds {held} blobs after a direct pull");

        s.origin.stop()?;
        let out = s.containerd.run(SN, &s.nydus, "c1", PYTHON)?;
        ensure!(
            !out.success,
            "a container ran with the origin down: {}",
            out.output
        );
        ensure!(
            out.output.contains("input/output error"),
            "unclear error: {}",
            out.output
        );
        ensure!(
            s.node.log_text().contains("unreachable"),
            "the node log does not say the origin is unreachable"
        );
        println!(
            "{}: ctr run with the origin down: {}",
            t.name(),
            out.output.trim()
        );
        let images = s.root().join("images");
        poll(
            "the failed container's snapshot and mount to go",
            GC_TIMEOUT,
            || {
                let rows = s.containerd.snapshots(SN)?;
                let active = s.metric("shoal_snapshots", &[("kind", "active")])?;
                let mounts = s.metric("shoal_snapshotter_image_mounts", &[])?;
                let left = mounts_under(&images);
                if rows.iter().all(|r| r.kind == "Committed")
                    && active == 0.0
                    && mounts == 0.0
                    && left.is_empty()
                {
                    return Ok(Some(()));
                }
                anyhow::bail!(
                    "containerd lists {rows:?}; node: {active} active, {mounts} image mounts, \
                 mounted {left:?}"
                )
            },
        )?;

        // Nothing is poisoned: with the origin back, the image runs.
        s.origin.start_again()?;
        let out = s
            .containerd
            .run(SN, &s.nydus, "c2", PYTHON)?
            .ok("ctr run")?;
        ensure!(out.trim() == "42", "ctr run printed {out:?}");
        s.containerd.remove_images(&s.containerd.images()?)?;
        s.wait_clean()
    });
}

#[test]
fn unknown_layer_media_types_fail_cleanly() {
    run("unknown_layer_media_types_fail_cleanly", NEEDS, |t| {
        let s = scene(t, true)?;
        let name = t.name();
        let prepares = || -> Result<f64> {
            s.metric("shoal_snapshotter_requests_total", &[("op", "prepare")])
        };

        // A media type that is not a layer type: containerd counts it out of the image's layers
        // and refuses the unpack before asking the snapshotter anything.
        let mut foreign = get_manifest(&s.origin, "1")?;
        foreign["layers"][1]["mediaType"] = json!("application/vnd.example.layer.v1");
        put_manifest(&s.origin, "foreign", &foreign)?;
        let before = prepares()?;
        let out = s.containerd.rpull(
            SN,
            Source::Hosts(&s.hosts),
            &format!("{}/{REPO}:foreign", s.origin.addr()),
        )?;
        ensure!(
            !out.success,
            "a foreign layer type was pulled: {}",
            out.output
        );
        ensure!(
            out.output
                .contains("number of layers and diffIDs don't match"),
            "unclear error: {}",
            out.output
        );
        ensure!(
            prepares()? == before,
            "the snapshotter was asked to prepare a layer of it"
        );
        println!("{name}: foreign layer type: {}", last_line(&out.output));
        s.wait_clean()?;

        // Nydus data layers stripped of their annotation: an OCI layer type, so containerd
        // prepares each as an ordinary layer, downloads it and finds no unpacker for it.
        let mut stripped = s.manifest.clone();
        for layer in stripped["layers"].as_array_mut().context("layers")? {
            if layer["mediaType"] == NYDUS_BLOB {
                layer["annotations"] = json!({});
            }
        }
        put_manifest(&s.origin, "stripped", &stripped)?;
        let before = prepares()?;
        let out = s.containerd.rpull(
            SN,
            Source::Hosts(&s.hosts),
            &format!("{}/{REPO}:stripped", s.origin.addr()),
        )?;
        ensure!(
            !out.success,
            "stripped data layers were unpacked: {}",
            out.output
        );
        ensure!(
            out.output.contains("no processor for media-type") && out.output.contains(NYDUS_BLOB),
            "unclear error: {}",
            out.output
        );
        ensure!(
            prepares()? > before,
            "containerd did not reach the snapshotter with the stripped layer"
        );
        println!("{name}: stripped Nydus layer: {}", last_line(&out.output));
        // The extraction snapshot containerd gave up on goes; nothing is half made.
        s.wait_clean()
    });
}

/// A node restart while a container runs — a clean stop (SIGTERM), then a crash (SIGKILL): the
/// container keeps running; a file it never read, read while the node is away, waits for the
/// node instead of failing or showing zeros, and arrives whole once the node is back; the next
/// node adopts the image server (no second mount), and new containers start.
#[test]
fn containers_outlive_a_node_restart() {
    run("containers_outlive_a_node_restart", NEEDS, |t| {
        let mut s = scene(t, true)?;
        s.containerd
            .rpull(SN, Source::Hosts(&s.hosts), &s.nydus)?
            .ok("ctr-remote image rpull")?;
        s.containerd
            .run_detached(SN, &s.nydus, "c1", LONG_RUNNING)?;
        let pid = s.containerd.task_pid("c1")?.context("c1 has no pid")?;
        let rootfs = PathBuf::from(format!("/proc/{pid}/root"));
        // Files c1 never read: their chunks are not local yet.
        let unread = [
            "usr/lib/python3.11/pydoc_data/topics.py",
            "usr/lib/python3.11/turtle.py",
            "usr/lib/python3.11/argparse.py",
        ];
        let sizes: Vec<u64> = unread
            .iter()
            .map(|f| std::fs::metadata(rootfs.join(f)).map(|m| m.len()))
            .collect::<std::io::Result<_>>()
            .context("stat of the image's files in c1's root")?;
        for (round, (how, file, size)) in [
            ("SIGTERM", unread[0], sizes[0]),
            ("SIGKILL", unread[1], sizes[1]),
        ]
        .into_iter()
        .enumerate()
        {
            match how {
                "SIGTERM" => {
                    s.node.terminate()?;
                }
                _ => s.node.kill()?,
            }
            ensure!(
                s.containerd.task_status("c1")?.as_deref() == Some("RUNNING"),
                "c1 stopped when the node went ({how})"
            );
            // A read while the node is away waits for it.
            let path = rootfs.join(file);
            let reader = std::thread::spawn(move || std::fs::read(&path));
            std::thread::sleep(Duration::from_secs(2));
            ensure!(
                !reader.is_finished(),
                "a read of {file} finished while the node was away ({how})"
            );
            s.node.restart()?;
            let got = reader
                .join()
                .map_err(|_| anyhow::anyhow!("reader panicked"))?
                .with_context(|| format!("reading {file} after the node came back ({how})"))?;
            ensure!(
                got.len() as u64 == size && got.iter().any(|&b| b != 0),
                "{file}: {} bytes after the restart ({how}), expected {size} of text",
                got.len()
            );
            // The running container goes on; new containers start; still one image mount.
            let out = s
                .containerd
                .exec(
                    "c1",
                    &format!("e{round}"),
                    &["python3", "-c", "import argparse, json; print(42)"],
                )?
                .ok("ctr task exec in c1")?;
            ensure!(
                out.trim() == "42",
                "exec in c1 after the restart printed {out:?}"
            );
            // containerd's client of the snapshotter redials with a backoff (up to 3 s) after
            // the connection refusals of the restart; a call meanwhile fails as unavailable.
            let out = poll("a new container after the restart", GC_TIMEOUT, || {
                let got = s
                    .containerd
                    .run(SN, &s.nydus, &format!("py{round}"), PYTHON)?;
                if !got.success && got.output.contains("unavailable") {
                    return Ok(None);
                }
                got.ok("ctr run after the restart").map(Some)
            })?;
            ensure!(
                out.trim() == "42",
                "a new container after the restart printed {out:?}"
            );
            let servers = image_servers(&s.root());
            ensure!(
                servers == 1,
                "{servers} image servers after the restart ({how}): the mount was not adopted"
            );
            let mounts = s.metric("shoal_snapshotter_image_mounts", &[])?;
            ensure!(
                mounts == 1.0,
                "{mounts} image mounts after the restart ({how})"
            );
            println!("{}: after a {how} of the node: c1 ran on, a read waited and came whole ({size} bytes), exec and a new container printed 42", t.name());
        }
        s.containerd.kill_and_remove("c1")?;
        s.containerd.remove_images(&s.containerd.images()?)?;
        s.wait_clean()?;
        let servers = image_servers(&s.root());
        ensure!(
            servers == 0,
            "{servers} image servers left after the images went"
        );
        Ok(())
    });
}

/// A batch image as stock `nydus-image --batch-size` wrote it (small chunks packed into
/// compressed batches that only the data blob's CI table places), pulled through the node: the
/// image mount for containers — served by an image server process, which has no CI table and
/// asks the node for batched chunks by chunk index — lists exactly as treeA.
#[test]
fn stock_batch_image_mounts_for_containers_as_tree_a() {
    let needs = [NEEDS, &[Need::Bin("python3")]].concat();
    run(
        "stock_batch_image_mounts_for_containers_as_tree_a",
        &needs,
        |t| {
            let s = scene(t, false)?;
            let reference = push_batch_fixture(&s.origin)?;
            s.containerd
                .rpull(SN, Source::Hosts(&s.hosts), &reference)?
                .ok("ctr-remote image rpull")?;
            let rows = s.containerd.snapshots(SN)?;
            let top = rows
                .iter()
                .find(|r| !rows.iter().any(|o| o.parent == r.key))
                .with_context(|| format!("no top snapshot in {rows:?}"))?
                .key
                .clone();
            s.containerd
                .prepare(SN, "batch-rootfs", &top)?
                .ok("ctr snapshots prepare")?;
            let m = s.containerd.snapshot_mounts(SN, "batch-rootfs")?;
            let lower = mount_option(&m, "lowerdir").context(m.clone())?;
            let images = s.root().join("images");
            let image = lower
                .split(':')
                .map(PathBuf::from)
                .find(|p| p.starts_with(&images))
                .with_context(|| format!("no image mount in lowerdir {lower}"))?;
            ensure!(
                image_servers(&s.root()) == 1,
                "the image mount is not served by an image server"
            );
            let script = paths::fixtures_dir().join("nydus/source/listing.py");
            let out = Command::new("python3").arg(script).arg(&image).output()?;
            ensure!(
                out.status.success(),
                "listing.py: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let expected =
                std::fs::read(paths::fixtures_dir().join("nydus/source/treeA.listing.jsonl"))?;
            ensure!(
                out.stdout == expected,
                "the image mount of the batch image does not list as treeA"
            );
            s.containerd
                .remove_snapshot(SN, "batch-rootfs")?
                .ok("ctr snapshots rm")?;
            s.containerd.remove_images(&s.containerd.images()?)?;
            s.wait_clean()
        },
    );
}

/// Pushes the batch fixture (its data blob, a tar.gz of its bootstrap) as `REPO:batch`.
fn push_batch_fixture(origin: &Registry) -> Result<String> {
    use sha2::Digest as _;
    let dir = paths::fixtures_dir().join("nydus/built/a-v6-zstd-blake3-batch");
    let blob = std::fs::read_dir(dir.join("blobs"))?
        .next()
        .context("no batch blob")??
        .path();
    let data = std::fs::read(&blob)?;
    let blob_digest = http::sha256_digest(&data);
    origin.push_blob_file(REPO, &blob_digest, &blob)?;
    let tar = shoal_e2e::nydus::tar_one("image/image.boot", &std::fs::read(dir.join("bootstrap"))?);
    let tar_digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&tar)));
    let layer = shoal_e2e::nydus::gzip(&tar)?;
    let boot_digest = origin.push_blob(REPO, layer.clone())?;
    let config = serde_json::to_vec(&json!({
        "architecture": shoal_e2e::nydus::host_arch(), "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [blob_digest, tar_digest]},
    }))?;
    let config_size = config.len();
    let config_digest = origin.push_blob(REPO, config)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_size},
        "layers": [
            {"mediaType": NYDUS_BLOB, "digest": blob_digest, "size": data.len(),
             "annotations": {"containerd.io/snapshot/nydus-blob": "true"}},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
             "digest": boot_digest, "size": layer.len(),
             "annotations": {"containerd.io/snapshot/nydus-bootstrap": "true",
                             "containerd.io/snapshot/nydus-fs-version": "6"}},
        ],
    });
    put_manifest(origin, "batch", &manifest)?;
    Ok(format!("{}/{REPO}:batch", origin.addr()))
}

/// Running `shoal image-server` processes serving mounts under `root`.
fn image_servers(root: &Path) -> usize {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let want = root.as_os_str().as_encoded_bytes().to_vec();
    procs
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|c| {
            let args: Vec<&[u8]> = c.split(|&b| b == 0).collect();
            args.get(1) == Some(&&b"image-server"[..]) && args.iter().any(|a| a.starts_with(&want))
        })
        .count()
}

fn last_line(text: &str) -> &str {
    text.trim().lines().last().unwrap_or_default()
}

/// Several containers of an image not yet mounted, started at the same moment: every one runs,
/// and the image is mounted once.
#[test]
fn containers_started_at_once_share_one_mount() {
    run("containers_started_at_once_share_one_mount", NEEDS, |t| {
        let s = scene(t, true)?;
        s.containerd
            .rpull(SN, Source::Hosts(&s.hosts), &s.nydus)?
            .ok("ctr-remote image rpull")?;
        let outs: Vec<Result<String>> = std::thread::scope(|scope| {
            let runs: Vec<_> = (0..4)
                .map(|i| {
                    let s = &s;
                    scope.spawn(move || {
                        // Each stays a while after printing, so that all four overlap.
                        let args = [
                            "python3",
                            "-c",
                            "import json, time; print(42, flush=True); time.sleep(10)",
                        ];
                        s.containerd
                            .run(SN, &s.nydus, &format!("at-once-{i}"), &args)?
                            .ok("ctr run")
                    })
                })
                .collect();
            runs.into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("panicked")))
                })
                .collect()
        });
        for (i, out) in outs.into_iter().enumerate() {
            let out = out.with_context(|| format!("container {i}"))?;
            ensure!(out.trim() == "42", "container {i} printed {out:?}");
        }
        let logged = s.mounts_logged();
        ensure!(
            logged == 1,
            "{logged} image mounts for 4 containers started at once"
        );
        s.containerd.remove_images(&s.containerd.images()?)?;
        s.wait_clean()?;
        println!("{}: 4 containers at once, one image mount", t.name());
        Ok(())
    });
}
