//! The compression-info ("blob.meta", CI) table of a v6 data blob: a 4 KiB header (magic
//! `0xB10BB10B` at both ends) and one v1 (16 B) or v2 (24 B) entry per chunk, followed in batch
//! blobs (`nydus-image --batch-size`, CI v2) by the batch table: one 40-byte context per batch
//! (compressed size u32, decompressed size u32, 32 reserved bytes), located by the header's
//! context-table offset and count.
//!
//! Invariants: the CI is decompressed into a buffer whose size comes from the bootstrap's blob
//! table and is capped by the chunk count; entries are only decoded inside that buffer; every
//! batch entry returned names an existing batch, lies inside the decompressed batch, and its
//! batch (at most 16 MiB either way) lies inside the blob's data, before the CI.

use serde::Serialize;

use crate::blob::decode::decompress_exact;
use crate::error::{Error, Result};
use crate::model::{BatchRef, BlobInfo, Compressor, MAX_CHUNK_SIZE};
use crate::raw::{slice, u32_at, u64_at};

const CI_MAGIC: u32 = 0xB10B_B10B;
/// Size of the CI header.
pub const CI_HEADER_SIZE: u64 = 4096;
/// Size of one batch context.
const BATCH_CONTEXT_SIZE: u64 = 40;
/// CI v2 entry flag: the chunk is a slice of a batch.
const V2_FLAG_BATCH: u64 = 0x4;

/// The 4 KiB CI header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CiHeader {
    pub features: u32,
    pub ci_compressor: u32,
    pub ci_entries: u32,
    pub ci_offset: u64,
    pub ci_compressed_size: u64,
    pub ci_uncompressed_size: u64,
    /// Offset of the zran/batch context table inside the decompressed CI.
    pub context_offset: u64,
    /// Bytes of the zran/batch context table.
    pub context_size: u64,
    /// Number of zran/batch contexts.
    pub context_count: u32,
}

/// One decoded CI entry. For a batched chunk the compressed range and `compressed` are its
/// batch's (as [`crate::ChunkRef`] has them), and `batch` says where in the batch it lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CiEntry {
    pub compressed_offset: u64,
    pub compressed_size: u32,
    pub uncompressed_offset: u64,
    pub uncompressed_size: u32,
    pub compressed: bool,
    pub batch: Option<BatchRef>,
}

/// One batch of a batch blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BatchContext {
    /// Bytes of the batch as stored (equal to `uncompressed_size`: stored raw).
    pub compressed_size: u32,
    /// Bytes of the decompressed batch.
    pub uncompressed_size: u32,
}

/// A decoded CI table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlobMeta {
    pub header: CiHeader,
    /// One entry per chunk, in CI (chunk index) order.
    pub entries: Vec<CiEntry>,
    /// The batch table (batch blobs only), by batch index.
    pub batches: Vec<BatchContext>,
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
        context_offset: u64_at(h, 40),
        context_size: u64_at(h, 48),
        context_count: u32_at(h, 56),
    })
}

/// Bytes of `blob` holding its CI and CI header, `[ci_offset, ci_offset + ci_csize + 4096)`,
/// refused when the blob table records sizes too large for its chunk count (so a caller may
/// allocate the range).
pub fn blob_meta_range(blob: &BlobInfo) -> Result<(u64, u64)> {
    let meta = blob.meta.as_ref().ok_or(Error::invalid(
        "blob meta",
        0,
        "the blob table records no CI table",
    ))?;
    let v2 = blob.features & BlobInfo::FEATURE_CHUNK_INFO_V2 != 0;
    // A batch blob's table also holds one context per batch, at most one per chunk.
    let batch = if blob.features & BlobInfo::FEATURE_BATCH != 0 {
        BATCH_CONTEXT_SIZE
    } else {
        0
    };
    let entry = if v2 { 24 } else { 16 } + batch;
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
    let len = meta.compressed_size + CI_HEADER_SIZE;
    if meta.offset.checked_add(len).is_none() {
        return Err(Error::invalid("CI offset", meta.offset, "range overflows"));
    }
    Ok((meta.offset, len))
}

/// Decode the CI of `blob` from `region` = the blob bytes `[ci_offset, ci_offset + ci_csize + 4096)`
/// (see [`blob_meta_range`]), with the batch table of a batch blob.
pub fn decode_blob_meta(blob: &BlobInfo, region: &[u8]) -> Result<BlobMeta> {
    blob_meta_range(blob)?;
    let meta = blob.meta.as_ref().ok_or(Error::invalid(
        "blob meta",
        0,
        "the blob table records no CI table",
    ))?;
    let v2 = blob.features & BlobInfo::FEATURE_CHUNK_INFO_V2 != 0;
    let entry = if v2 { 24 } else { 16 };
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
    let batch_blob = blob.features & BlobInfo::FEATURE_BATCH != 0;
    let batches = if batch_blob {
        if !v2 {
            return Err(Error::invalid(
                "blob features",
                blob.features.into(),
                "batch chunks need CI v2 entries",
            ));
        }
        parse_batches(&header, &raw, count * entry, blob.chunk_count, meta.offset)?
    } else {
        Vec::new()
    };
    let mut entries = Vec::with_capacity(count as usize);
    for e in raw.chunks_exact(entry as usize).take(count as usize) {
        let e = if v2 {
            decode_v2(e, &batches, meta.offset)?
        } else {
            decode_v1(e)
        };
        if e.batch.is_some() && !batch_blob {
            return Err(Error::invalid(
                "CI entry flags",
                e.compressed_offset,
                "batch chunk in a blob without the batch feature",
            ));
        }
        entries.push(e);
    }
    Ok(BlobMeta {
        header,
        entries,
        batches,
    })
}

/// The batch table at the header's context offset: after the entries, inside the CI, each
/// batch at most 16 MiB and stored no larger than it decompresses.
fn parse_batches(
    header: &CiHeader,
    raw: &[u8],
    entries_end: u64,
    chunk_count: u32,
    data_end: u64,
) -> Result<Vec<BatchContext>> {
    let count = header.context_count;
    if count > chunk_count {
        return Err(Error::invalid(
            "batch count",
            count.into(),
            "more batches than chunks",
        ));
    }
    if header.context_offset < entries_end {
        return Err(Error::invalid(
            "batch table offset",
            header.context_offset,
            "overlaps the CI entries",
        ));
    }
    let table = slice(
        raw,
        header.context_offset,
        u64::from(count) * BATCH_CONTEXT_SIZE,
        "batch table",
    )?;
    table
        .chunks_exact(BATCH_CONTEXT_SIZE as usize)
        .map(|c| {
            let b = BatchContext {
                compressed_size: u32_at(c, 0),
                uncompressed_size: u32_at(c, 4),
            };
            if b.uncompressed_size == 0
                || b.uncompressed_size > MAX_CHUNK_SIZE
                || b.compressed_size == 0
                || b.compressed_size > b.uncompressed_size
                || u64::from(b.compressed_size) > data_end
            {
                return Err(Error::invalid(
                    "batch context",
                    u64::from(b.compressed_size) << 32 | u64::from(b.uncompressed_size),
                    "sizes not 0 < stored <= decompressed <= 16 MiB inside the blob data",
                ));
            }
            Ok(b)
        })
        .collect()
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
        batch: None,
    }
}

/// A v2 entry; a batch entry takes its batch's stored size and must lie inside the batch, and
/// the batch inside the blob's data (which ends at `data_end`, where the CI begins).
fn decode_v2(e: &[u8], batches: &[BatchContext], data_end: u64) -> Result<CiEntry> {
    let u = u64_at(e, 0);
    let c = u64_at(e, 8);
    let data = u64_at(e, 16);
    let mut entry = CiEntry {
        compressed_offset: c & 0xff_ffff_ffff,
        compressed_size: (c >> 40) as u32,
        uncompressed_offset: (u & 0xffff_ffff) << 12,
        uncompressed_size: (((u >> 32) & 0xff_ffff) + 1) as u32,
        compressed: (u >> 56) & 1 != 0,
        batch: None,
    };
    if (u >> 56) & V2_FLAG_BATCH == 0 {
        return Ok(entry);
    }
    let (index, offset) = ((data >> 32) as u32, data as u32);
    let b = batches.get(index as usize).ok_or(Error::invalid(
        "CI batch index",
        index.into(),
        "no such batch in the batch table",
    ))?;
    if u64::from(offset) + u64::from(entry.uncompressed_size) > u64::from(b.uncompressed_size) {
        return Err(Error::invalid(
            "CI batch offset",
            offset.into(),
            "chunk reaches past the end of its batch",
        ));
    }
    let end = entry.compressed_offset + u64::from(b.compressed_size);
    if end > data_end {
        return Err(Error::OutOfBounds {
            what: "batch",
            offset: entry.compressed_offset,
            len: b.compressed_size.into(),
            limit: data_end,
        });
    }
    entry.compressed_size = b.compressed_size;
    entry.compressed = b.compressed_size != b.uncompressed_size;
    entry.batch = Some(BatchRef {
        index,
        offset,
        uncompressed_size: b.uncompressed_size,
    });
    Ok(entry)
}
