//! The bodies of the cargo-fuzz targets (`rafs/fuzz`), as plain functions so that a normal
//! test can run them over seeded random and mutated inputs (the fuzz smoke run in the test
//! suite) without nightly. Each takes arbitrary bytes and must return without panicking,
//! hanging or allocating without bound; results are ignored.

use std::path::Path;

use crate::{
    decode_blob_meta, decode_chunk, parse_blob_tail, parse_ci_header, parse_toc, walk_tolerant,
    BlobInfo, BlobMetaInfo, Bootstrap, ChunkRef, Compressor, Digester, FileType, Visit,
};

/// Any bytes as a bootstrap: open, walk everything, map every file's chunks, check.
pub fn bootstrap(data: &[u8]) {
    let Ok(b) = Bootstrap::from_bytes(data.to_vec()) else {
        return;
    };
    let _ = b.summary();
    let _ = b.prefetch_table();
    walk_tolerant(&b, |v| {
        if let Visit::Entry(e) = v {
            let _ = b.xattrs(e.inode);
            match e.attr.file_type {
                FileType::Symlink => {
                    let _ = b.readlink(e.inode);
                }
                FileType::File => {
                    let _ = b.file_chunks(e.inode, 0, u64::MAX);
                    let _ = b.file_chunks(e.inode, e.attr.size / 3, 1 << 20);
                }
                _ => {}
            }
        }
        true
    });
    for i in 0..b.blobs().len() as u32 {
        let _ = b.blob_chunks(i);
    }
    let _ = crate::tools::check(&b, None);
    let _ = crate::tools::inspect(&b, None);
}

/// Any bytes as the tail of a data blob: tar headers, TOC, CI header and CI table.
pub fn blob_tail(data: &[u8]) {
    let _ = parse_blob_tail(data);
    let _ = parse_toc(data);
    if let Some(h) = data.len().checked_sub(4096).and_then(|at| data.get(at..)) {
        let _ = parse_ci_header(h);
    }
    let (Some(head), Some(rest)) = (data.get(..9), data.get(9..)) else {
        return;
    };
    let b = |i: usize| head.get(i).copied().unwrap_or(0);
    let blob = BlobInfo {
        index: 0,
        blob_id: "f".repeat(64),
        chunk_size: 1 << 20,
        chunk_count: u32::from(b(4)),
        compressor: Compressor::Zstd,
        digester: Digester::Blake3,
        features: if b(5) & 1 == 1 {
            BlobInfo::FEATURE_CHUNK_INFO_V2
        } else {
            0
        },
        compressed_size: 0,
        uncompressed_size: 0,
        meta: Some(BlobMetaInfo {
            compressor: match b(6) % 3 {
                0 => Compressor::None,
                1 => Compressor::Lz4Block,
                _ => Compressor::Zstd,
            },
            offset: 0,
            compressed_size: u64::from(u16::from_le_bytes([b(0), b(1)])),
            uncompressed_size: u64::from(u16::from_le_bytes([b(2), b(3)])),
        }),
        toc_size: 0,
        toc_digest: [0; 32],
    };
    let _ = decode_blob_meta(&blob, rest);
}

/// Any bytes as a stored chunk: decompression bounded by the recorded size, digest checked.
pub fn chunk_decode(data: &[u8]) {
    let (Some(&[flags, lo, hi]), Some(stored)) = (data.get(..3), data.get(3..)) else {
        return;
    };
    let compressor = match flags % 4 {
        0 => Compressor::None,
        1 => Compressor::Lz4Block,
        2 => Compressor::Zstd,
        _ => Compressor::Gzip,
    };
    let usize_ = u32::from(u16::from_le_bytes([lo, hi])) * 64;
    let blob = BlobInfo {
        index: 0,
        blob_id: "a".repeat(64),
        chunk_size: 1 << 20,
        chunk_count: 1,
        compressor,
        digester: if flags & 4 == 0 {
            Digester::Blake3
        } else {
            Digester::Sha256
        },
        features: 0,
        compressed_size: stored.len() as u64,
        uncompressed_size: u64::from(usize_),
        meta: None,
        toc_size: 0,
        toc_digest: [0; 32],
    };
    let chunk = ChunkRef {
        blob_index: 0,
        ci_index: 0,
        digest: [0; 32],
        compressed: flags & 8 == 0,
        compressed_offset: 0,
        compressed_size: stored.len() as u32,
        uncompressed_offset: 0,
        uncompressed_size: usize_,
        file_offset: 0,
        batch: None,
    };
    let _ = decode_chunk(&blob, &chunk, stored);
}

/// Any bytes as a layer tar (plain, gzip or zstd): build it into `out_dir` (emptied first) with
/// 4 KiB chunks; whatever is built must then open and check clean.
pub fn tar_layer(data: &[u8], out_dir: &Path) {
    let _ = std::fs::remove_dir_all(out_dir);
    let opts = crate::build::BuildOptions {
        chunk_size: 4096,
        ..crate::build::BuildOptions::default()
    };
    let extras = crate::build::BuildExtras {
        threads: 1,
        ..crate::build::BuildExtras::default()
    };
    let Ok(out) = crate::build::build_layer_with(data, &opts, out_dir, &extras) else {
        return;
    };
    let Ok(b) = Bootstrap::open(&out.bootstrap) else {
        panic!("the builder wrote a bootstrap that does not open");
    };
    let blobs = crate::LocalBlobDir::new(out_dir.join("blobs"));
    let report = crate::tools::check(&b, Some(&blobs));
    assert!(
        report.is_ok(),
        "the builder wrote an image that fails check: {report}"
    );
}
