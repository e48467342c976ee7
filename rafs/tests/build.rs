//! The builder and merge, round-tripped: layer tars → our blob + bootstrap → unpacked by our reader
//! and, as root, mounted by the kernel (file-backed EROFS with the decoded blobs as `device=`) →
//! compared with the listings of the trees the layers were made from.
#![allow(clippy::unwrap_used)]

#[path = "support/common.rs"]
mod common;

use std::fs::File;
use std::path::{Path, PathBuf};

use common::*;
use shoal_rafs::build::{build_layer, build_layer_with_dict, merge, BuildError, BuildOptions};
use shoal_rafs::tools::{check, unpack, UnpackOptions};
use shoal_rafs::{Bootstrap, Compressor, Digester, LocalBlobDir};

fn layer(name: &str) -> File {
    File::open(nydus().join("source").join(name)).unwrap()
}

fn tree(name: &str) -> Vec<serde_json::Value> {
    let mut l = load_listing(&nydus().join("source").join(name));
    if !is_root() {
        strip_privileged(&mut l);
    }
    l
}

fn unpacked_listing(boot: &Path, blobs: &LocalBlobDir) -> Vec<serde_json::Value> {
    let b = Bootstrap::open(boot).unwrap();
    let r = check(&b, Some(blobs));
    assert!(r.is_ok(), "{r}");
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("root");
    unpack(&b, blobs, &dest, &UnpackOptions::for_current_user()).unwrap();
    let mut l = listing(&dest);
    if !is_root() {
        strip_privileged(&mut l);
    }
    l
}

#[test]
fn built_layer_a_unpacks_to_tree_a_with_every_option_set() {
    for opts in [
        BuildOptions::default(),
        BuildOptions {
            compressor: Compressor::Lz4Block,
            digester: Digester::Sha256,
            chunk_size: 64 << 10,
        },
        BuildOptions {
            compressor: Compressor::None,
            digester: Digester::Blake3,
            chunk_size: 4 << 20,
        },
    ] {
        let out = tempfile::tempdir().unwrap();
        let r = build_layer(layer("layerA.tar.gz"), &opts, out.path()).unwrap();
        assert!(r.dedup_hits > 0, "duplicate content must be stored once");
        let blobs = LocalBlobDir::new(out.path().join("blobs"));
        let b = Bootstrap::open(&r.bootstrap).unwrap();
        assert_eq!(b.summary().compressor, opts.compressor);
        assert_eq!(b.blobs()[0].blob_id, r.blob_id);
        assert_same_listing(
            &format!("{opts:?}"),
            &unpacked_listing(&r.bootstrap, &blobs),
            &tree("treeA.listing.jsonl"),
        );
    }
}

#[test]
fn default_build_is_byte_identical_to_nydus_image() {
    // nydus-image v2.4 (`--fs-version 6`, zstd, blake3, 1 MiB) wrote the fixture blobs; ours
    // must be the same bytes, so the same layer gets the same blob id (registry digest).
    for (tar, fixture) in [
        ("layerA.tar.gz", "a-v6-zstd-blake3-1m"),
        ("layerB.tar.gz", "b-v6-zstd-blake3-1m"),
    ] {
        let out = tempfile::tempdir().unwrap();
        let r = build_layer(layer(tar), &BuildOptions::default(), out.path()).unwrap();
        let nydus_blob = std::fs::read_dir(nydus().join("built").join(fixture).join("blobs"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(r.blob_id, nydus_blob.file_name().to_string_lossy(), "{tar}");
    }
}

#[test]
fn merge_refuses_layers_with_different_chunk_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    let a = build_layer(
        layer("layerB.tar.gz"),
        &BuildOptions::default(),
        &tmp.path().join("a"),
    )
    .unwrap();
    let opts = BuildOptions {
        chunk_size: 64 << 10,
        ..BuildOptions::default()
    };
    let b = build_layer(layer("layerB.tar.gz"), &opts, &tmp.path().join("b")).unwrap();
    let e = merge(&[a.bootstrap, b.bootstrap], &tmp.path().join("m")).unwrap_err();
    assert!(
        matches!(
            e,
            BuildError::LayerMismatch {
                layer: 1,
                what: "chunk size",
                ..
            }
        ),
        "{e}"
    );
}

fn build_ab(dir: &Path) -> (PathBuf, LocalBlobDir) {
    let a = build_layer(
        layer("layerA.tar.gz"),
        &BuildOptions::default(),
        &dir.join("a"),
    )
    .unwrap();
    let b = build_layer(
        layer("layerB.tar.gz"),
        &BuildOptions::default(),
        &dir.join("b"),
    )
    .unwrap();
    let merged = dir.join("merged.boot");
    let m = merge(&[a.bootstrap, b.bootstrap], &merged).unwrap();
    assert_eq!(m.blobs, [a.blob_id, b.blob_id]);
    (
        merged,
        LocalBlobDir::with_dirs([dir.join("a/blobs"), dir.join("b/blobs")]),
    )
}

#[test]
fn merged_layers_unpack_to_tree_b() {
    let tmp = tempfile::tempdir().unwrap();
    let (merged, blobs) = build_ab(tmp.path());
    assert_same_listing(
        "merge(A, B)",
        &unpacked_listing(&merged, &blobs),
        &tree("treeB.listing.jsonl"),
    );
}

#[test]
fn merging_nydus_built_layers_matches_nydus_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged.boot");
    let layers = [
        nydus().join("built/a-v6-zstd-blake3-1m/bootstrap"),
        nydus().join("built/b-v6-zstd-blake3-1m/bootstrap"),
    ];
    merge(&layers, &out).unwrap();
    let blobs = LocalBlobDir::with_dirs([
        nydus().join("built/a-v6-zstd-blake3-1m/blobs"),
        nydus().join("built/b-v6-zstd-blake3-1m/blobs"),
    ]);
    assert_same_listing(
        "merge(nydus a, nydus b)",
        &unpacked_listing(&out, &blobs),
        &tree("treeB.listing.jsonl"),
    );
}

fn tar_with(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, kind, link) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*kind);
        h.set_mode(0o644);
        h.set_size(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        {
            let name = path.as_bytes();
            let gnu = h.as_gnu_mut().unwrap();
            gnu.name[..name.len()].copy_from_slice(name);
            let l = link.as_bytes();
            gnu.linkname[..l.len()].copy_from_slice(l);
        }
        h.set_cksum();
        b.append(&h, std::io::empty()).unwrap();
    }
    b.into_inner().unwrap()
}

#[test]
fn tar_entries_escaping_the_root_are_rejected() {
    use tar::EntryType::*;
    for bad in [
        tar_with(&[("../evil", Regular, "")]),
        tar_with(&[("a/../../evil", Regular, "")]),
        tar_with(&[("ok", Regular, ""), ("x", Link, "../ok")]),
        tar_with(&[("x", Link, "missing")]),
    ] {
        let out = tempfile::tempdir().unwrap();
        let e = build_layer(bad.as_slice(), &BuildOptions::default(), out.path()).unwrap_err();
        assert!(matches!(e, BuildError::UnsafePath(_)), "{e}");
    }
    // Absolute and dotted paths stay inside the root; symlink targets are data.
    let ok = tar_with(&[
        ("/abs/file", Regular, ""),
        ("./dot/./file", Regular, ""),
        ("l", Symlink, "../../etc/passwd"),
    ]);
    let out = tempfile::tempdir().unwrap();
    let r = build_layer(ok.as_slice(), &BuildOptions::default(), out.path()).unwrap();
    let b = Bootstrap::open(&r.bootstrap).unwrap();
    assert!(b.lookup("/abs/file").is_ok() && b.lookup("/dot/file").is_ok());
    assert_eq!(
        b.readlink(b.lookup("/l").unwrap()).unwrap(),
        b"../../etc/passwd"
    );
}

#[test]
fn kernel_mounts_what_we_build_and_merge() {
    let tmp = tempfile::tempdir().unwrap();
    // Sanity: the nydus-merged fixture mounts this way (as its README says).
    let fixture = nydus().join("built/ab-v6-merged/bootstrap");
    let fixture_blobs = LocalBlobDir::with_dirs([
        nydus().join("built/a-v6-zstd-blake3-1m/blobs"),
        nydus().join("built/b-v6-zstd-blake3-1m/blobs"),
    ]);
    let Some(l) = kernel_listing(&fixture, &fixture_blobs, &tmp.path().join("fixture")) else {
        return;
    };
    assert_same_listing(
        "kernel: nydus ab-v6-merged",
        &l,
        &tree("treeB.listing.jsonl"),
    );

    let a = build_layer(
        layer("layerA.tar.gz"),
        &BuildOptions::default(),
        &tmp.path().join("a"),
    )
    .unwrap();
    let l = kernel_listing(
        &a.bootstrap,
        &LocalBlobDir::new(tmp.path().join("a/blobs")),
        &tmp.path().join("ka"),
    )
    .unwrap();
    assert_same_listing("kernel: our layer A", &l, &tree("treeA.listing.jsonl"));

    let (merged, blobs) = build_ab(&tmp.path().join("ab"));
    let l = kernel_listing(&merged, &blobs, &tmp.path().join("kab")).unwrap();
    assert_same_listing("kernel: our merge(A, B)", &l, &tree("treeB.listing.jsonl"));
}

#[test]
fn chunk_dict_reuses_chunks_of_another_image() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = BuildOptions::default();
    let a = build_layer(layer("layerA.tar.gz"), &opts, &tmp.path().join("a")).unwrap();
    let plain = build_layer(layer("layerB.tar.gz"), &opts, &tmp.path().join("plain")).unwrap();
    let dict = Bootstrap::open(&a.bootstrap).unwrap();
    let b = build_layer_with_dict(
        layer("layerB.tar.gz"),
        &opts,
        &tmp.path().join("b"),
        Some(&dict),
    )
    .unwrap();
    // added/dup_of_A (2 MiB + 123 B = 3 chunks) and small files whose content A also has come
    // from layer A's blob.
    assert_eq!(b.dict_hits, 5);
    assert_eq!(b.dict_blobs, std::slice::from_ref(&a.blob_id));
    assert!(b.blob_size + 2 * (1 << 20) < plain.blob_size + (1 << 20));
    let blobs = LocalBlobDir::with_dirs([tmp.path().join("b/blobs"), tmp.path().join("a/blobs")]);
    let layer_b = Bootstrap::open(&b.bootstrap).unwrap();
    assert_eq!(layer_b.blobs().len(), 2);
    let dup = layer_b.lookup("/added/dup_of_A").unwrap();
    assert!(layer_b
        .file_chunks(dup, 0, u64::MAX)
        .unwrap()
        .iter()
        .all(|c| c.blob_index == 1));
    let r = check(&layer_b, Some(&blobs));
    assert!(r.is_ok(), "{r}");
    // Merged with A, the image is treeB, and each blob is listed once.
    let merged = tmp.path().join("merged.boot");
    let m = merge(&[a.bootstrap, b.bootstrap], &merged).unwrap();
    assert_eq!(m.blobs, [a.blob_id, b.blob_id]);
    assert_same_listing(
        "merge(A, B with dict A)",
        &unpacked_listing(&merged, &blobs),
        &tree("treeB.listing.jsonl"),
    );
    if let Some(l) = kernel_listing(&merged, &blobs, &tmp.path().join("k")) {
        assert_same_listing(
            "kernel: merge(A, B with dict A)",
            &l,
            &tree("treeB.listing.jsonl"),
        );
    }
}

#[test]
fn prefetch_list_becomes_the_prefetch_table_and_survives_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let list: Vec<String> = ["/bigdir/entry-00002", "/bigdir", "/no/such/file", "/bigdir"]
        .map(String::from)
        .to_vec();
    let extras = shoal_rafs::build::BuildExtras {
        prefetch: list,
        ..Default::default()
    };
    let a = shoal_rafs::build::build_layer_with(
        layer("layerA.tar.gz"),
        &BuildOptions::default(),
        &tmp.path().join("a"),
        &extras,
    )
    .unwrap();
    assert_eq!(a.prefetch, 2);
    assert_eq!(a.prefetch_missing, ["/no/such/file"]);
    let b = Bootstrap::open(&a.bootstrap).unwrap();
    let want = [
        b.lookup("/bigdir/entry-00002").unwrap(),
        b.lookup("/bigdir").unwrap(),
    ];
    assert_eq!(b.prefetch_table(), want);
    let paths = |b: &Bootstrap| -> Vec<Option<String>> {
        shoal_rafs::tools::inspect(b, None)
            .unwrap()
            .prefetch
            .into_iter()
            .map(|p| p.path)
            .collect()
    };
    let expected = vec![
        Some("/bigdir/entry-00002".to_string()),
        Some("/bigdir".to_string()),
    ];
    assert_eq!(paths(&b), expected);
    // The image stays valid (check, unpack, kernel mount) with the table in front of the inodes.
    let blobs = LocalBlobDir::new(tmp.path().join("a/blobs"));
    assert_same_listing(
        "layer A with a prefetch table",
        &unpacked_listing(&a.bootstrap, &blobs),
        &tree("treeA.listing.jsonl"),
    );
    if let Some(l) = kernel_listing(&a.bootstrap, &blobs, &tmp.path().join("k")) {
        assert_same_listing(
            "kernel: layer A with prefetch",
            &l,
            &tree("treeA.listing.jsonl"),
        );
    }
    // Merge keeps the entries (by path) that the upper layers leave in place.
    let up = build_layer(
        layer("layerB.tar.gz"),
        &BuildOptions::default(),
        &tmp.path().join("b"),
    )
    .unwrap();
    let merged = tmp.path().join("merged.boot");
    merge(&[a.bootstrap.clone(), up.bootstrap], &merged).unwrap();
    let m = Bootstrap::open(&merged).unwrap();
    let kept: Vec<Option<String>> = paths(&m);
    assert!(
        !kept.is_empty() && kept.iter().all(|p| p.is_some()),
        "{kept:?}"
    );
    for p in kept.iter().flatten() {
        assert!(expected.contains(&Some(p.clone())));
    }
}
