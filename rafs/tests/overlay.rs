//! Merge against the reference: layers built and merged by us, unpacked by our reader and
//! mounted by the kernel (file-backed EROFS over the decoded blobs), equal what `umoci unpack`
//! makes of the same layers — for the real two-layer debian-python image and for synthetic
//! layers full of whiteouts, opaque directories and type changes.
#![allow(clippy::unwrap_used)]

#[path = "support/common.rs"]
mod common;
#[path = "support/trees.rs"]
mod trees;

use std::path::{Path, PathBuf};

use common::*;
use shoal_rafs::build::{build_layer, merge, BuildOptions};
use shoal_rafs::tools::{check, unpack, UnpackOptions};
use shoal_rafs::{Bootstrap, LocalBlobDir};

/// Build every layer, merge them; the merged bootstrap and a source over all blob dirs.
fn build_and_merge(
    layers: &[PathBuf],
    opts: &BuildOptions,
    work: &Path,
) -> (PathBuf, LocalBlobDir) {
    let mut boots = Vec::new();
    let mut dirs = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let out = work.join(format!("layer{i}"));
        let r = build_layer(std::fs::File::open(l).unwrap(), opts, &out).unwrap();
        boots.push(r.bootstrap);
        dirs.push(out.join("blobs"));
    }
    let merged = work.join("merged.boot");
    let m = merge(&boots, &merged).unwrap();
    assert_eq!(m.blobs.len(), layers.len());
    (merged, LocalBlobDir::with_dirs(dirs))
}

fn our_unpack(boot: &Path, blobs: &LocalBlobDir, dest: &Path) -> Vec<serde_json::Value> {
    let b = Bootstrap::open(boot).unwrap();
    let r = check(&b, Some(blobs));
    assert!(r.is_ok(), "{r}");
    unpack(&b, blobs, dest, &UnpackOptions::for_current_user()).unwrap();
    listing(dest)
}

/// Compare our merge (unpacked, and mounted by the kernel) with umoci's unpack of `layout:reference`.
fn compare_with_umoci(layout: &Path, reference: &str, opts: &BuildOptions, work: &Path) {
    let rootfs = match trees::umoci_unpack(layout, reference, &work.join("bundle")) {
        Ok(r) => r,
        Err(why) => {
            eprintln!("skipping the umoci comparison: {why}");
            return;
        }
    };
    let expected = listing(&rootfs);
    let layers = trees::oci_layers(layout, reference);
    let (merged, blobs) = build_and_merge(&layers, opts, work);
    assert_same_listing(
        &format!("merge({reference}) unpacked vs umoci"),
        &our_unpack(&merged, &blobs, &work.join("ours")),
        &expected,
    );
    if let Some(l) = kernel_listing(&merged, &blobs, &work.join("kernel")) {
        assert_same_listing(
            &format!("merge({reference}) mounted by the kernel vs umoci"),
            &l,
            &expected,
        );
    }
}

#[test]
fn merged_debian_python_layers_equal_umoci_unpack_and_kernel_mount() {
    let tmp = scratch();
    compare_with_umoci(
        &trees::debian_python(),
        "python",
        &BuildOptions::default(),
        tmp.path(),
    );
}

/// Three layers: a base, then whiteouts, opaque directories and type changes, then re-creation
/// of deleted names and changes below replaced directories.
fn synthetic_layers(dir: &Path) -> Vec<PathBuf> {
    let w = |p: PathBuf, data: &[u8]| {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    };
    let sym = |target: &str, p: PathBuf| {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(target, p).unwrap();
    };
    let l1 = dir.join("l1");
    trees::synthetic_tree(&l1, false);
    // umoci cannot unpack GNU sparse entries (the round-trip tests cover them).
    std::fs::remove_dir_all(l1.join("sparse")).unwrap();
    // An empty PAX record means "unset" to Go's archive/tar (umoci) but an empty xattr to GNU
    // tar; the layers here leave that ambiguity out (the round-trip tests keep it).
    rustix::fs::lremovexattr(l1.join("xattrs/file"), "user.empty").unwrap();
    for d in [
        "a",
        "b/deeper",
        "opaque/sub",
        "to-file",
        "to-symlink",
        "kept",
    ] {
        std::fs::create_dir_all(l1.join(d)).unwrap();
    }
    w(l1.join("a/x"), b"x\n");
    w(l1.join("a/y"), b"y\n");
    w(l1.join("b/deeper/z"), b"z\n");
    w(l1.join("opaque/old"), b"old\n");
    w(l1.join("opaque/sub/old2"), b"old2\n");
    w(l1.join("to-file/inside"), b"gone with the dir\n");
    w(l1.join("to-dir"), b"a file that becomes a dir\n");
    w(l1.join("c"), b"c\n");
    w(l1.join("kept/file"), b"untouched\n");
    std::fs::hard_link(l1.join("kept/file"), l1.join("kept/link")).unwrap();

    let l2 = dir.join("l2");
    w(l2.join(".wh.c"), b"");
    w(l2.join("a/.wh.x"), b"");
    w(l2.join("a/y"), b"y, version 2\n");
    w(l2.join(".wh.b"), b"");
    w(l2.join("opaque/.wh..wh..opq"), b"");
    w(l2.join("opaque/new"), b"new\n");
    w(l2.join("to-file"), b"was a directory\n");
    w(l2.join("to-dir/now"), b"inside the new dir\n");
    sym("../a", l2.join("to-symlink"));
    w(l2.join("kept/.wh.link"), b"");
    w(l2.join("sizes/.wh.f65536"), b"");
    w(l2.join("whiteouts/opaque/.wh..wh..opq"), b"");
    w(l2.join("whiteouts/opaque/fresh"), b"fresh\n");

    let l3 = dir.join("l3");
    sym("a/y", l3.join("c"));
    w(l3.join("b/again"), b"b is back\n");
    w(
        l3.join("opaque/sub/added"),
        b"added below an opaque dir of the layer below\n",
    );
    w(l3.join("to-dir/.wh.now"), b"");
    w(l3.join(".wh.deep"), b"");
    w(l3.join("a/.wh.y"), b"");

    let mut tars = Vec::new();
    for l in [&l1, &l2, &l3] {
        let t = l.with_extension("tar");
        trees::tar_tree(l, &t);
        tars.push(t);
    }
    tars
}

#[test]
fn merged_synthetic_layers_equal_umoci_unpack_and_kernel_mount() {
    let tmp = scratch();
    let tars = synthetic_layers(&tmp.path().join("src"));
    let layout = tmp.path().join("layout");
    trees::oci_layout(&layout, "test", &tars);
    for (i, opts) in [
        BuildOptions::default(),
        BuildOptions {
            compressor: shoal_rafs::Compressor::Lz4Block,
            digester: shoal_rafs::Digester::Sha256,
            chunk_size: 64 << 10,
        },
    ]
    .iter()
    .enumerate()
    {
        compare_with_umoci(&layout, "test", opts, &tmp.path().join(format!("w{i}")));
    }
}
