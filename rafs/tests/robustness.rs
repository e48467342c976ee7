//! Randomly damaged fixture bootstraps and blob tails: the reader must return errors, never
//! panic, and every operation must finish (the whole tree is walked and chunks are read under a
//! budget). `check`, `inspect` and `unpack` run over the damaged images too.
#![allow(clippy::unwrap_used)]

#[path = "support/common.rs"]
mod common;

use std::sync::OnceLock;

use common::nydus;
use proptest::prelude::*;
use shoal_rafs::tools::{check, inspect, unpack, UnpackOptions};
use shoal_rafs::{
    parse_blob_tail, walk_tolerant, Bootstrap, ChunkSource, FileType, LocalBlobDir, Visit,
};

/// (bootstrap, blob dir) pairs small enough to walk hundreds of times.
const IMAGES: &[(&str, &str)] = &[
    (
        "built/b-v6-zstd-blake3-1m/bootstrap",
        "built/b-v6-zstd-blake3-1m/blobs",
    ),
    ("upstream/bootstrap/rafs-v6-2.2.boot", "upstream/blobs"),
    (
        "upstream/repeatable/sha256-nocompress-repeatable",
        "upstream/repeatable/blobs",
    ),
    (
        "upstream/repeatable/blake3-lz4_block-non_repeatable",
        "upstream/repeatable/blobs",
    ),
    (
        "built/a-v6-zstd-blake3-1m/bootstrap",
        "built/a-v6-zstd-blake3-1m/blobs",
    ),
    (
        "built/a-v5-lz4-blake3-1m/bootstrap",
        "built/a-v5-lz4-blake3-1m/blobs",
    ),
];

fn originals() -> &'static Vec<Vec<u8>> {
    static O: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    O.get_or_init(|| {
        IMAGES
            .iter()
            .map(|(b, _)| std::fs::read(nydus().join(b)).unwrap())
            .collect()
    })
}

/// Walk everything and read chunks, with budgets so a hostile image cannot make it run long.
fn exercise(b: &Bootstrap, blobs: &LocalBlobDir) {
    let mut entries = 0u32;
    let mut chunk_reads = 0u32;
    walk_tolerant(b, |v| {
        let Visit::Entry(e) = v else { return true };
        entries += 1;
        let _ = b.xattrs(e.inode);
        match e.attr.file_type {
            FileType::Symlink => {
                let _ = b.readlink(e.inode);
            }
            FileType::File => {
                for c in b.file_chunks(e.inode, 0, u64::MAX).unwrap_or_default() {
                    if chunk_reads < 32 {
                        chunk_reads += 1;
                        if let Ok(blob) = b.blob(c.blob_index) {
                            let _ = blobs.read_chunk(blob, &c);
                        }
                    }
                }
                let _ = b.file_chunks(e.inode, e.attr.size / 2, 4096);
            }
            _ => {}
        }
        entries < 20_000
    });
    let _ = b.lookup("/change/modified");
    let _ = b.getattr(u64::MAX);
    let _ = b.readdir(12345);
    let _ = b.prefetch_table();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn damaged_bootstraps_never_panic(
        which in 0..IMAGES.len(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..8),
        truncate in proptest::option::weighted(0.2, any::<prop::sample::Index>()),
    ) {
        let mut data = originals()[which].clone();
        for (at, x) in flips {
            let i = at.index(data.len());
            data[i] ^= x;
        }
        if let Some(t) = truncate {
            data.truncate(t.index(data.len()));
        }
        if let Ok(b) = Bootstrap::from_bytes(data) {
            let blobs = LocalBlobDir::new(nydus().join(IMAGES[which].1));
            exercise(&b, &blobs);
            if b.summary().bootstrap_size < 100_000 {
                let _ = inspect(&b, Some(&blobs));
                let _ = check(&b, Some(&blobs));
            }
        }
    }

    #[test]
    fn damaged_v6_header_fields_never_panic(
        which in 0..2usize,
        field in 0usize..(128 + 256 + 128 + 256),
        value in any::<u64>(),
        width in prop::sample::select(vec![1usize, 2, 4, 8]),
    ) {
        // Overwrite whole fields in the superblocks, device slot and blob table with any value.
        let mut data = originals()[which].clone();
        let at = match field {
            f if f < 128 + 256 => 1024 + f,
            f if f < 128 + 256 + 128 => 1408 + f - 384,
            f => 4096 + f - 512,
        };
        let bytes = value.to_le_bytes();
        for (i, byte) in bytes.iter().take(width).enumerate() {
            if let Some(b) = data.get_mut(at + i) {
                *b = *byte;
            }
        }
        if let Ok(b) = Bootstrap::from_bytes(data) {
            exercise(&b, &LocalBlobDir::new(nydus().join(IMAGES[which].1)));
        }
    }

    #[test]
    fn damaged_blob_tails_never_panic(
        flips in proptest::collection::vec((0usize..2048, 1u8..=255), 1..8),
        cut in 0usize..4096,
    ) {
        let p = nydus().join("upstream/blobs/be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef");
        let mut data = std::fs::read(p).unwrap();
        let n = data.len();
        for (at, x) in flips {
            data[n - 1 - at] ^= x;
        }
        data.truncate(n - cut);
        let _ = parse_blob_tail(&data);
    }
}

#[test]
fn unpack_of_damaged_images_stays_inside_dest() {
    // Deterministic spread of flips over a small v6 and a small v5 image; unpack must either
    // fail or write only below DEST.
    for which in [0usize, 2] {
        let original = &originals()[which];
        for i in 0..64 {
            let mut data = original.clone();
            let at = (i * 7919 + 1031) % data.len();
            data[at] ^= 0x41;
            let Ok(b) = Bootstrap::from_bytes(data) else {
                continue;
            };
            let tmp = tempfile::tempdir().unwrap();
            let dest = tmp.path().join("d");
            let blobs = LocalBlobDir::new(nydus().join(IMAGES[which].1));
            let _ = unpack(&b, &blobs, &dest, &UnpackOptions::for_current_user());
            let outside: Vec<_> = std::fs::read_dir(tmp.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .filter(|n| n != "d")
                .collect();
            assert!(outside.is_empty(), "unpack wrote outside DEST: {outside:?}");
        }
    }
}
