//! Any bytes as the tail of a data blob: the reverse tar-header walk, the TOC parser and the
//! CI ("blob.meta") decoder must never panic or allocate from unchecked lengths.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_rafs::{
    decode_blob_meta, parse_blob_tail, parse_ci_header, parse_toc, BlobInfo, BlobMetaInfo,
    Compressor, Digester,
};

fuzz_target!(|data: &[u8]| {
    let _ = parse_blob_tail(data);
    let _ = parse_toc(data);
    if data.len() >= 4096 {
        let _ = parse_ci_header(&data[data.len() - 4096..]);
    }
    // The CI decoder, driven by sizes taken from the input's first bytes.
    if data.len() < 9 {
        return;
    }
    let csize = u64::from(u16::from_le_bytes([data[0], data[1]]));
    let usize_ = u64::from(u16::from_le_bytes([data[2], data[3]]));
    let blob = BlobInfo {
        index: 0,
        blob_id: "f".repeat(64),
        chunk_size: 1 << 20,
        chunk_count: u32::from(data[4]),
        compressor: Compressor::Zstd,
        digester: Digester::Blake3,
        features: if data[5] & 1 == 1 {
            BlobInfo::FEATURE_CHUNK_INFO_V2
        } else {
            0
        },
        compressed_size: 0,
        uncompressed_size: 0,
        meta: Some(BlobMetaInfo {
            compressor: [Compressor::None, Compressor::Lz4Block, Compressor::Zstd]
                [usize::from(data[6] % 3)],
            offset: 0,
            compressed_size: csize,
            uncompressed_size: usize_,
        }),
        toc_size: 0,
        toc_digest: [0; 32],
    };
    let _ = decode_blob_meta(&blob, &data[9..]);
});
