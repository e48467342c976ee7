//! Kernel EROFS mounts through the helper in `shoal_rafs::erofs`: the decoded blobs come from the
//! helper's FUSE blob filesystem, filled from a `ChunkSource` on demand. The mounted tree lists
//! exactly like the source tree; a chunk that fails makes read(2) fail with EIO (never zeros);
//! unmounting leaves neither mount behind.
//!
//! Needs root, /dev/fuse and a kernel with file-backed EROFS (6.12+); otherwise each test prints
//! `SKIP <test>: <why>`.
#![allow(clippy::unwrap_used)]

#[path = "support/common.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use common::*;
use shoal_rafs::erofs::{self, ErofsError, ErofsOptions};
use shoal_rafs::{BlobInfo, Bootstrap, ChunkRef, ChunkSource, Error, LocalBlobDir, VerifiedChunk};

fn ready(test: &str) -> bool {
    if !is_root() {
        skip(test, "needs root (CAP_SYS_ADMIN for mount(2))");
        return false;
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        skip(test, &format!("cannot open /dev/fuse: {e}"));
        return false;
    }
    true
}

fn is_mounted(dir: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    mounts
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(dir.to_str().unwrap()))
}

/// A source that counts chunk reads and can be told to fail them.
struct Flaky {
    inner: LocalBlobDir,
    fail: AtomicBool,
    reads: AtomicU64,
}

impl ChunkSource for Flaky {
    fn read_chunk(&self, blob: &BlobInfo, chunk: &ChunkRef) -> shoal_rafs::Result<VerifiedChunk> {
        self.reads.fetch_add(1, Relaxed);
        if self.fail.load(Relaxed) {
            return Err(Error::Io {
                path: PathBuf::from("flaky"),
                source: std::io::Error::other("told to fail"),
            });
        }
        self.inner.read_chunk(blob, chunk)
    }
}

/// Mount `bootstrap` (relative to the fixtures) or say why the test is skipped.
fn mount_fixture(
    test: &str,
    bootstrap: &str,
    blob_dirs: &[&str],
    tmp: &Path,
) -> Option<(erofs::ErofsMount, Arc<Flaky>)> {
    if !ready(test) {
        return None;
    }
    let b = Arc::new(Bootstrap::open(nydus().join(bootstrap)).unwrap());
    let inner = LocalBlobDir::with_dirs(blob_dirs.iter().map(|d| nydus().join(d)));
    inner.load_blob_metas(&b).unwrap();
    let src = Arc::new(Flaky {
        inner,
        fail: AtomicBool::new(false),
        reads: AtomicU64::new(0),
    });
    let dir = tmp.join("mnt");
    std::fs::create_dir(&dir).unwrap();
    match erofs::mount(
        b,
        src.clone(),
        &dir,
        &tmp.join("blobs"),
        &ErofsOptions::default(),
    ) {
        Ok(m) => Some((m, src)),
        Err(e @ ErofsError::Unsupported { .. }) => {
            skip(test, &e.to_string());
            None
        }
        Err(e) => panic!("{test}: {e}"),
    }
}

#[test]
fn merged_image_mounted_by_the_kernel_lists_like_the_source_tree() {
    let test = "merged_image_mounted_by_the_kernel_lists_like_the_source_tree";
    let tmp = tempfile::tempdir().unwrap();
    let Some((m, src)) = mount_fixture(
        test,
        "built/ab-v6-merged/bootstrap",
        &[
            "built/b-v6-zstd-blake3-1m/blobs",
            "built/a-v6-zstd-blake3-1m/blobs",
        ],
        tmp.path(),
    ) else {
        return;
    };
    let (dir, blobs) = (m.dir().to_path_buf(), m.blobs_dir().to_path_buf());
    assert!(is_mounted(&dir) && is_mounted(&blobs));
    let expected = load_listing(&nydus().join("source/treeB.listing.jsonl"));
    // Any user may read what the image lets them: the first read of this data makes the kernel
    // read the (root-only) blob files on that user's behalf.
    if let Some(setpriv) = ["/usr/bin/setpriv", "/bin/setpriv"]
        .iter()
        .find(|p| Path::new(p).exists())
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let file = expected
            .iter()
            .find(|e| {
                e["type"] == "file"
                    && e["size"].as_u64() > Some(4096)
                    && e["mode"].as_str().is_some_and(|m| m.ends_with('4'))
            })
            .unwrap();
        let path = dir.join(file["path"].as_str().unwrap().trim_start_matches('/'));
        let out = std::process::Command::new(setpriv)
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "sha256sum",
            ])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "as nobody: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let sum = String::from_utf8_lossy(&out.stdout);
        assert!(sum.starts_with(file["sha256"].as_str().unwrap()), "{sum}");
    }
    assert!(src.reads.load(Relaxed) > 0);
    assert_same_listing("EROFS mount of ab-v6-merged", &listing(&dir), &expected);
    let s = m.stats().snapshot();
    assert!(s.reads > 0 && s.chunks_fetched > 0, "{s:?}");
    m.unmount().unwrap();
    assert!(!is_mounted(&dir) && !is_mounted(&blobs), "left mounted");
}

#[test]
fn failing_chunks_give_eio_never_zeros() {
    let test = "failing_chunks_give_eio_never_zeros";
    let tmp = tempfile::tempdir().unwrap();
    let case = "built/a-v6-zstd-blake3-1m";
    let Some((m, src)) = mount_fixture(
        test,
        &format!("{case}/bootstrap"),
        &[&format!("{case}/blobs")],
        tmp.path(),
    ) else {
        return;
    };
    // Metadata comes from the bootstrap: listing works while chunk fetches fail.
    src.fail.store(true, Relaxed);
    let sizes: Vec<_> = std::fs::read_dir(m.dir().join("sizes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let big = sizes
        .iter()
        .find(|p| std::fs::metadata(p).unwrap().len() > 4096)
        .unwrap();
    let err = std::fs::read(big).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(5), "{err}");
    // Once the source recovers, the same file reads correctly.
    src.fail.store(false, Relaxed);
    let got = std::fs::read(big).unwrap();
    let rel = format!("/{}", big.strip_prefix(m.dir()).unwrap().display());
    let listed = load_listing(&nydus().join("source/treeA.listing.jsonl"));
    let entry = listed.iter().find(|e| e["path"] == rel.as_str()).unwrap();
    use sha2::Digest as _;
    let digest = hex::encode(sha2::Sha256::digest(&got));
    assert_eq!(entry["sha256"].as_str(), Some(digest.as_str()), "{rel}");
    m.unmount().unwrap();
}

/// Batched chunks are decoded into the decoded blob file the kernel reads (each at its own
/// uncompressed offset, cut from its decompressed batch); an inline-meta image mounts from the
/// bootstrap taken out of its data blob, with that blob as its device.
#[test]
fn batch_and_inline_meta_images_mounted_by_the_kernel_list_like_tree_a() {
    let test = "batch_and_inline_meta_images_mounted_by_the_kernel_list_like_tree_a";
    let expected = load_listing(&nydus().join("source/treeA.listing.jsonl"));
    for (bootstrap, blobs) in [
        (
            "built/a-v6-zstd-blake3-batch/bootstrap",
            "built/a-v6-zstd-blake3-batch/blobs",
        ),
        (
            "built/a-v6-zstd-inline-meta/blobs/1afe4e8c9e71b5c18eb980ad27e34ab9edddfc6cddd9879b7feac0b05858b3e3",
            "built/a-v6-zstd-inline-meta/blobs",
        ),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let Some((m, src)) = mount_fixture(test, bootstrap, &[blobs], tmp.path()) else {
            return;
        };
        let dir = m.dir().to_path_buf();
        assert_same_listing(bootstrap, &listing(&dir), &expected);
        assert!(src.reads.load(Relaxed) > 0);
        m.unmount().unwrap();
        assert!(!is_mounted(&dir), "left mounted");
    }
}
