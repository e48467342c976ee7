//! `unpack(build(tar))` equals the tar's tree — for every compressor × digester and two chunk
//! sizes — on a synthetic tree with every file type and the awkward cases (a 5 GiB sparse file,
//! long names, deep directories, whiteout files, devices, xattrs, odd modes and owners) and on a
//! real Debian rootfs made by debootstrap. The build output is the same bytes on one thread as
//! on all cores.
#![allow(clippy::unwrap_used)]

#[path = "support/common.rs"]
mod common;
#[path = "support/trees.rs"]
mod trees;

use std::path::Path;
use std::time::Instant;

use common::*;
use shoal_rafs::build::{build_layer_with, BuildExtras, BuildOptions};
use shoal_rafs::tools::{check, unpack, UnpackOptions};
use shoal_rafs::{Bootstrap, Compressor, Digester, LocalBlobDir};

const COMPRESSORS: [Compressor; 3] = [Compressor::Zstd, Compressor::Lz4Block, Compressor::None];
const DIGESTERS: [Digester; 2] = [Digester::Blake3, Digester::Sha256];

fn matrix(chunk_sizes: &[u32]) -> Vec<BuildOptions> {
    let mut out = Vec::new();
    for &chunk_size in chunk_sizes {
        for compressor in COMPRESSORS {
            for digester in DIGESTERS {
                out.push(BuildOptions {
                    compressor,
                    digester,
                    chunk_size,
                });
            }
        }
    }
    out
}

fn tree_listing(dir: &Path) -> Vec<serde_json::Value> {
    let mut l = listing(dir);
    if !is_root() {
        strip_privileged(&mut l);
    }
    l
}

/// Build `tar` with `opts`, check the image (every chunk), unpack it and compare with `expected`.
fn round_trip(tar: &Path, opts: &BuildOptions, expected: &[serde_json::Value], work: &Path) {
    let t = Instant::now();
    let out = work.join("out");
    let r = build_layer_with(
        std::fs::File::open(tar).unwrap(),
        opts,
        &out,
        &BuildExtras::default(),
    )
    .unwrap_or_else(|e| panic!("{opts:?}: build: {e}"));
    let built = t.elapsed();
    let b = Bootstrap::open(&r.bootstrap).unwrap();
    let s = b.summary();
    assert_eq!(
        (s.compressor, s.digester, s.chunk_size),
        (opts.compressor, opts.digester, opts.chunk_size)
    );
    let blobs = LocalBlobDir::new(out.join("blobs"));
    let report = check(&b, Some(&blobs));
    assert!(report.is_ok(), "{opts:?}: {report}");
    let checked = t.elapsed();
    let dest = work.join("unpacked");
    unpack(&b, &blobs, &dest, &UnpackOptions::for_current_user()).unwrap();
    let unpacked = t.elapsed();
    assert_same_listing(&format!("{opts:?}"), &tree_listing(&dest), expected);
    eprintln!(
        "{opts:?}: build {:.1}s, check {:.1}s, unpack {:.1}s, total {:.1}s, blob {} B",
        built.as_secs_f64(),
        (checked - built).as_secs_f64(),
        (unpacked - checked).as_secs_f64(),
        t.elapsed().as_secs_f64(),
        r.blob_size
    );
    std::fs::remove_dir_all(work).unwrap();
}

#[test]
fn synthetic_tree_round_trips_for_every_option() {
    let tmp = scratch();
    let src = tmp.path().join("src");
    trees::synthetic_tree(&src, true);
    let tar = tmp.path().join("layer.tar");
    trees::tar_tree(&src, &tar);
    let expected = tree_listing(&src);
    // The tree really has what it is meant to exercise.
    let has = |pred: &dyn Fn(&serde_json::Value) -> bool| expected.iter().any(pred);
    assert!(has(
        &|e| e["sha256_nonzero_blocks"].is_string() && e["size"] == trees::HUGE
    ));
    assert!(has(&|e| e["type"] == "fifo") && has(&|e| e["hardlink_group"].is_number()));
    assert!(has(&|e| e["path"].as_str().unwrap().len() > 1000));
    if is_root() {
        assert!(has(&|e| e["type"] == "char") && has(&|e| e["type"] == "block"));
    }
    for (i, opts) in matrix(&[64 << 10, 1 << 20]).iter().enumerate() {
        round_trip(&tar, opts, &expected, &tmp.path().join(format!("w{i}")));
    }
}

#[test]
fn debian_rootfs_round_trips_for_every_option() {
    let tmp = scratch();
    let tar = match trees::debian_minbase_tar() {
        Ok(t) => t,
        Err(why) => {
            // The debian-python fixture's base layer is the same kind of tree (debootstrap
            // minbase, packed by umoci), so the round trip still runs on a real rootfs.
            eprintln!("no debootstrap rootfs ({why}); using the debian-python base layer");
            trees::oci_layers(&trees::debian_python(), "base")
                .into_iter()
                .next()
                .unwrap()
        }
    };
    let src = tmp.path().join("src");
    trees::untar(&tar, &src);
    let expected = tree_listing(&src);
    assert!(expected.len() > 5000, "{} entries", expected.len());
    assert!(expected.iter().any(|e| e["path"] == "/usr/bin/bash"));
    for (i, opts) in matrix(&[64 << 10, 1 << 20]).iter().enumerate() {
        round_trip(&tar, opts, &expected, &tmp.path().join(format!("w{i}")));
    }
}

#[test]
fn output_is_the_same_bytes_on_one_thread_and_on_all_cores() {
    let tmp = scratch();
    let src = tmp.path().join("src");
    trees::synthetic_tree(&src, false);
    let tar = tmp.path().join("layer.tar");
    trees::tar_tree(&src, &tar);
    let opts = BuildOptions {
        chunk_size: 64 << 10,
        ..BuildOptions::default()
    };
    let build = |threads: usize, dir: &str| {
        let out = tmp.path().join(dir);
        let extras = BuildExtras {
            threads,
            ..BuildExtras::default()
        };
        let r = build_layer_with(std::fs::File::open(&tar).unwrap(), &opts, &out, &extras).unwrap();
        (r.blob_id, std::fs::read(r.bootstrap).unwrap())
    };
    let one = build(1, "one");
    for threads in [2, 3, 8] {
        assert!(
            build(threads, &format!("t{threads}")) == one,
            "{threads} threads"
        );
    }
}
