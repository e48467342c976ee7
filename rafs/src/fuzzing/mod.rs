//! The bodies of the cargo-fuzz targets (`fuzz/`), as plain functions so that a normal
//! test can run them over seeded random and mutated inputs (the fuzz smoke run in the test
//! suite) without nightly. Each takes arbitrary bytes and must return without panicking,
//! hanging or allocating without bound; results are ignored.

use std::path::Path;

mod smoke;
pub use smoke::{replay, smoke, Rng};

use crate::{
    decode_blob_meta, decode_chunk, parse_blob_tail, parse_ci_header, parse_toc, walk_tolerant,
    BatchRef, BlobInfo, BlobMetaInfo, Bootstrap, ChunkRef, Compressor, Digester, FileType, Visit,
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

/// Any bytes as the tail of a data blob: tar headers, TOC, an inlined bootstrap, CI header and
/// CI table (with a batch table).
pub fn blob_tail(data: &[u8]) {
    let _ = parse_blob_tail(data);
    let _ = parse_toc(data);
    let mut read_at = |off: u64, len: u64| -> crate::Result<Vec<u8>> {
        let end = off.checked_add(len).filter(|&e| e <= data.len() as u64);
        end.and_then(|e| data.get(off as usize..e as usize))
            .map(<[u8]>::to_vec)
            .ok_or(crate::Error::invalid("range", off, "outside the input"))
    };
    if let Ok(Some(b)) = Bootstrap::from_blob_tail(data.len() as u64, &mut read_at, &"a".repeat(64))
    {
        for i in 0..b.blobs().len() as u32 {
            let _ = b.blob_chunks(i);
        }
        let _ = crate::tools::check(&b, None);
    }
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
        features: match b(5) % 3 {
            0 => 0,
            1 => BlobInfo::FEATURE_CHUNK_INFO_V2,
            _ => BlobInfo::FEATURE_CHUNK_INFO_V2 | BlobInfo::FEATURE_BATCH,
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

/// Any bytes as a bootstrap and the CI region (table and header) of its batch blobs, which
/// is also taken as the blobs' bytes: attach it, place every chunk, decode some.
/// Input: `[u32 bootstrap length][bootstrap][region]`.
pub fn batch_meta(data: &[u8]) {
    let Some((len, rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let n = u32::from_le_bytes(*len) as usize;
    let (Some(boot), Some(region)) = (rest.get(..n), rest.get(n..)) else {
        return;
    };
    let Ok(b) = Bootstrap::from_bytes(boot.to_vec()) else {
        return;
    };
    for blob in b.blobs() {
        let _ = b.attach_blob_meta(blob.index, region);
    }
    for blob in b.blobs() {
        let Ok(chunks) = b.blob_chunks(blob.index) else {
            continue;
        };
        for c in chunks.iter().filter(|c| c.batch.is_some()).take(64) {
            let at = c.compressed_offset as usize;
            let stored = at
                .checked_add(c.compressed_size as usize)
                .and_then(|end| region.get(at..end));
            if let Some(stored) = stored {
                let _ = decode_chunk(blob, c, stored);
            }
        }
    }
}

/// Any bytes as a stored chunk: decompression bounded by the recorded size, digest checked.
/// With flag 16 the chunk is a slice of a batch (the stored bytes are the batch's).
/// Input: `[flags][lo][hi][stored]`.
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
    // A batched chunk: `lo` × 64 bytes at `hi` × 64 in a batch (flags >> 5) × 64 bytes longer.
    let (usize_, batch) = if flags & 16 == 0 {
        (u32::from(u16::from_le_bytes([lo, hi])) * 64, None)
    } else {
        let (size, offset) = (u32::from(lo) * 64, u32::from(hi) * 64);
        let batch = BatchRef {
            index: 0,
            offset,
            uncompressed_size: size + offset + u32::from(flags >> 5) * 64,
        };
        (size, Some(batch))
    };
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
        batch,
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
