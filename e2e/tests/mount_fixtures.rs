//! `shoal mount` of images made by the stock Nydus tools, pushed as they are to a real registry and
//! mounted through a real node, in both modes (FUSE, and kernel EROFS over the node's on-demand
//! blob files): the batch fixture (`nydus-image --batch-size`: small chunks packed into
//! compressed batches, placed only by the data blob's CI table) and the inline-meta fixture
//! (`--blob-inline-meta`: no bootstrap layer, the bootstrap at the end of the only data blob).
//!
//! What is asserted: the mounted tree lists exactly as treeA (the fixtures' `listing.py`: types,
//! modes, owners, sizes, link targets, xattrs, content sha256), as stock nydusd lists them.

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use serde_json::json;
use shoal_e2e::lazy::{missing, Mode, Unmount};
use shoal_e2e::node::Node;
use shoal_e2e::nydus::{gzip, tar_one};
use shoal_e2e::registry::Registry;
use shoal_e2e::{paths, run, Need, TestCtx};

const NEEDS: &[Need] = &[
    Need::Root,
    Need::Bin("docker-registry"),
    Need::Bin("python3"),
    Need::Shoal,
];
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const NYDUS_BLOB: &str = "application/vnd.oci.image.layer.nydus.blob.v1";
const BATCH: &str = "nydus/built/a-v6-zstd-blake3-batch";
const INLINE_BLOB: &str = "nydus/built/a-v6-zstd-inline-meta/blobs/1afe4e8c9e71b5c18eb980ad27e34ab9edddfc6cddd9879b7feac0b05858b3e3";

/// Push an image manifest with `layers` (`(media type, digest, size, annotations)`) and a
/// minimal config as `repo:1`.
fn push_image(registry: &Registry, repo: &str, layers: Vec<serde_json::Value>) -> Result<()> {
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = registry.push_blob(repo, config.to_vec())?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config.len()},
        "layers": layers,
    }))?;
    let put = registry.put_manifest(repo, "1", MANIFEST, manifest)?;
    ensure!(put.status.as_u16() == 201, "manifest PUT: {}", put.short());
    Ok(())
}

fn blob_layer(registry: &Registry, repo: &str, path: &Path) -> Result<serde_json::Value> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let digest = shoal_e2e::http::sha256_digest(&data);
    registry.push_blob_file(repo, &digest, path)?;
    Ok(
        json!({"mediaType": NYDUS_BLOB, "digest": digest, "size": data.len(),
              "annotations": {"containerd.io/snapshot/nydus-blob": "true"}}),
    )
}

/// The batch image in registry form: its data blob, then a tar.gz of `image/image.boot`.
fn push_batch(registry: &Registry, repo: &str) -> Result<()> {
    let dir = paths::fixtures_dir().join(BATCH);
    let blob = std::fs::read_dir(dir.join("blobs"))?
        .next()
        .context("no batch blob")??
        .path();
    let blob = blob_layer(registry, repo, &blob)?;
    let boot = std::fs::read(dir.join("bootstrap"))?;
    let layer = gzip(&tar_one("image/image.boot", &boot))?;
    let boot_digest = registry.push_blob(repo, layer.clone())?;
    let boot = json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
        "digest": boot_digest, "size": layer.len(),
        "annotations": {"containerd.io/snapshot/nydus-bootstrap": "true",
                        "containerd.io/snapshot/nydus-fs-version": "6"}});
    push_image(registry, repo, vec![blob, boot])
}

/// The inline-meta image: its one data blob is the whole image (no bootstrap layer).
fn push_inline(registry: &Registry, repo: &str) -> Result<()> {
    let blob = blob_layer(registry, repo, &paths::fixtures_dir().join(INLINE_BLOB))?;
    push_image(registry, repo, vec![blob])
}

fn listing(dir: &Path) -> Result<String> {
    let script = paths::fixtures_dir().join("nydus/source/listing.py");
    let out = Command::new("python3").arg(script).arg(dir).output()?;
    ensure!(
        out.status.success(),
        "listing.py {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

fn shoal_ok(args: &[&str]) -> Result<String> {
    let out = Command::new(paths::shoal_bin()?)
        .args(args)
        .output()
        .context("running shoal")?;
    ensure!(
        out.status.success(),
        "shoal {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Push with `push`, mount through a node in `mode`, compare with treeA, unmount.
fn mounts_as_tree_a(name: &str, mode: Mode, push: fn(&Registry, &str) -> Result<()>) {
    if let Some(why) = missing(mode) {
        shoal_e2e::skip(name, &why);
        return;
    }
    run(name, NEEDS, |t: &TestCtx| {
        let registry = Registry::start(t)?;
        let repo = "test/fixture";
        push(&registry, repo)?;
        let node = Node::start(t, &registry.url())?;
        let mnt = t.subdir("mnt")?;
        let _guard = Unmount(mnt.clone());
        let reference = format!("{}/{repo}:1", registry.addr());
        let control = node.control_path();
        let control = control.to_string_lossy();
        let dir = mnt.to_string_lossy();
        shoal_ok(&[
            "mount",
            &reference,
            &dir,
            "--mode",
            mode.arg(),
            "--control",
            &control,
        ])?;
        let expected = std::fs::read_to_string(
            paths::fixtures_dir().join("nydus/source/treeA.listing.jsonl"),
        )?;
        let actual = listing(&mnt)?;
        ensure!(
            actual == expected,
            "{name}: the mount does not list as treeA ({} vs {} lines; first difference: {:?})",
            actual.lines().count(),
            expected.lines().count(),
            actual.lines().zip(expected.lines()).find(|(a, e)| a != e)
        );
        shoal_ok(&["umount", &dir, "--control", &control])?;
        Ok(())
    });
}

#[test]
fn batch_image_fuse_mount_lists_as_tree_a() {
    mounts_as_tree_a(
        "batch_image_fuse_mount_lists_as_tree_a",
        Mode::Fuse,
        push_batch,
    );
}

#[test]
fn batch_image_erofs_mount_lists_as_tree_a() {
    mounts_as_tree_a(
        "batch_image_erofs_mount_lists_as_tree_a",
        Mode::Erofs,
        push_batch,
    );
}

#[test]
fn inline_meta_image_fuse_mount_lists_as_tree_a() {
    mounts_as_tree_a(
        "inline_meta_image_fuse_mount_lists_as_tree_a",
        Mode::Fuse,
        push_inline,
    );
}

#[test]
fn inline_meta_image_erofs_mount_lists_as_tree_a() {
    mounts_as_tree_a(
        "inline_meta_image_erofs_mount_lists_as_tree_a",
        Mode::Erofs,
        push_inline,
    );
}
