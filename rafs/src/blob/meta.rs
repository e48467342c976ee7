//! The compression-info ("blob.meta", CI) table of a v6 data blob: a 4 KiB header (magic
//! `0xB10BB10B` at both ends) and one v1 (16 B) or v2 (24 B) entry per chunk.
//!
//! Invariants: the CI is decompressed into a buffer whose size comes from the bootstrap's blob
//! table and is capped by the chunk count; entries are only decoded inside that buffer.

use serde::Serialize;

use crate::blob::decode::decompress_exact;
use crate::error::{Error, Result};
use crate::model::{BlobInfo, Compressor};
use crate::raw::{u32_at, u64_at};

const CI_MAGIC: u32 = 0xB10B_B10B;
/// Size of the CI header.
pub const CI_HEADER_SIZE: u64 = 4096;

/// The 4 KiB CI header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CiHeader {
    pub features: u32,
    pub ci_compressor: u32,
    pub ci_entries: u32,
    pub ci_offset: u64,
    pub ci_compressed_size: u64,
    pub ci_uncompressed_size: u64,
}

/// One decoded CI entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CiEntry {
    pub compressed_offset: u64,
    pub compressed_size: u32,
    pub uncompressed_offset: u64,
    pub uncompressed_size: u32,
    pub compressed: bool,
}

/// Parse a CI header.
pub fn parse_ci_header(h: &[u8]) -> Result<CiHeader> {
    if h.len() != CI_HEADER_SIZE as usize {
        return Err(Error::invalid(
            "CI header size",
            h.len() as u64,
            "must be 4096",
        ));
    }
    if u32_at(h, 0) != CI_MAGIC || u32_at(h, 4092) != CI_MAGIC {
        return Err(Error::invalid(
            "CI header magic",
            u32_at(h, 0).into(),
            "expected 0xb10bb10b at both ends",
        ));
    }
    Ok(CiHeader {
        features: u32_at(h, 4),
        ci_compressor: u32_at(h, 8),
        ci_entries: u32_at(h, 12),
        ci_offset: u64_at(h, 16),
        ci_compressed_size: u64_at(h, 24),
        ci_uncompressed_size: u64_at(h, 32),
    })
}

/// Decode the CI of `blob` from `region` = the blob bytes `[ci_offset, ci_offset + ci_csize + 4096)`.
pub fn decode_blob_meta(blob: &BlobInfo, region: &[u8]) -> Result<(CiHeader, Vec<CiEntry>)> {
    let meta = blob.meta.as_ref().ok_or(Error::invalid(
        "blob meta",
        0,
        "the blob table records no CI table",
    ))?;
    let v2 = blob.features & BlobInfo::FEATURE_CHUNK_INFO_V2 != 0;
    let entry = if v2 { 24 } else { 16 };
    let limit = u64::from(blob.chunk_count) * entry + (1 << 20);
    if meta.uncompressed_size > limit
        || meta.compressed_size > limit.max(meta.uncompressed_size) + 4096
    {
        return Err(Error::invalid(
            "CI size",
            meta.uncompressed_size,
            "too large for the chunk count",
        ));
    }
    let csize = meta.compressed_size as usize;
    let (ci, header) = (region.get(..csize), region.get(csize..));
    let (Some(ci), Some(header)) = (ci, header) else {
        return Err(Error::invalid(
            "CI region",
            region.len() as u64,
            "shorter than the CI and its header",
        ));
    };
    let header = parse_ci_header(header)?;
    let c = if meta.compressed_size == meta.uncompressed_size {
        Compressor::None
    } else {
        meta.compressor
    };
    let raw = decompress_exact(c, ci, meta.uncompressed_size as usize, "CI table")?;
    let count = u64::from(blob.chunk_count);
    if count * entry > raw.len() as u64 {
        return Err(Error::invalid(
            "CI table",
            raw.len() as u64,
            "shorter than chunk_count entries",
        ));
    }
    let entries = raw
        .chunks_exact(entry as usize)
        .take(count as usize)
        .map(|e| if v2 { decode_v2(e) } else { decode_v1(e) })
        .collect();
    Ok((header, entries))
}

fn decode_v1(e: &[u8]) -> CiEntry {
    let u = u64_at(e, 0);
    let c = u64_at(e, 8);
    let usize_ = (((u >> 44) & 0xf_ffff) | (((u >> 8) & 0xf) << 20)) + 1;
    let csize = (((c >> 44) & 0xf_ffff) | (((c >> 40) & 0xf) << 20)) + 1;
    CiEntry {
        compressed_offset: c & 0xff_ffff_ffff,
        compressed_size: csize as u32,
        uncompressed_offset: u & 0xfff_ffff_f000,
        uncompressed_size: usize_ as u32,
        compressed: csize != usize_,
    }
}

fn decode_v2(e: &[u8]) -> CiEntry {
    let u = u64_at(e, 0);
    let c = u64_at(e, 8);
    CiEntry {
        compressed_offset: c & 0xff_ffff_ffff,
        compressed_size: (c >> 40) as u32,
        uncompressed_offset: (u & 0xffff_ffff) << 12,
        uncompressed_size: (((u >> 32) & 0xff_ffff) + 1) as u32,
        compressed: (u >> 56) & 1 != 0,
    }
}
