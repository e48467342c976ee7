//! Any bytes as a stored chunk: decompression is bounded by the recorded uncompressed size and
//! the result is returned only if its digest matches.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_rafs::{decode_chunk, BlobInfo, ChunkRef, Compressor, Digester};

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let compressor = [
        Compressor::None,
        Compressor::Lz4Block,
        Compressor::Zstd,
        Compressor::Gzip,
    ][usize::from(data[0] % 4)];
    let usize_ = u32::from(u16::from_le_bytes([data[1], data[2]])) * 64;
    let stored = &data[3..];
    let blob = BlobInfo {
        index: 0,
        blob_id: "a".repeat(64),
        chunk_size: 1 << 20,
        chunk_count: 1,
        compressor,
        digester: if data[0] & 4 == 0 {
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
        compressed: data[0] & 8 == 0,
        compressed_offset: 0,
        compressed_size: stored.len() as u32,
        uncompressed_offset: 0,
        uncompressed_size: usize_,
        file_offset: 0,
    };
    let _ = decode_chunk(&blob, &chunk, stored);
});
