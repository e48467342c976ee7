//! RAFS v6 bootstrap header: the EROFS superblock at 1024, the Nydus extended superblock at 1152,
//! the device table, the blob table, the chunk-info table and the prefetch table.
//!
//! Invariants after [`parse`]: every table lies inside the bootstrap, the block size is 4 KiB, the
//! chunk size is a power of two in 4 KiB..=16 MiB, blob ids are non-empty ASCII alphanumerics
//! (safe as file names), every chunk-info entry names an existing blob, and a batch blob has a
//! CI v2 table (where its batched chunks' locations are).

use std::collections::HashMap;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::{BlobInfo, BlobMetaInfo, Compressor, Digester, MAX_CHUNK_SIZE};
use crate::raw::{array, bytes32_at, slice, u16_at, u32_at, u64_at, u8_at, until_nul};

pub(crate) const EROFS_MAGIC: u32 = 0xE0F5_E1E2;
pub(crate) const BLOCK_SIZE: u64 = 4096;
const SB_OFFSET: u64 = 1024;
const EXT_SB_OFFSET: u64 = 1152;
const COMPAT_RAFS_V6: u32 = 0x4000_0000;
const INCOMPAT_CHUNKED_FILE: u32 = 0x4;
const INCOMPAT_DEVICE_TABLE: u32 = 0x8;
const DEVICE_SLOT_SIZE: u64 = 128;
const BLOB_ENTRY_SIZE: u64 = 256;
pub(crate) const CHUNK_INFO_SIZE: u64 = 80;
const MAX_BLOBS: u64 = 254;

/// `RafsSuperFlags` bits (shared with v5).
pub(crate) mod flags {
    pub const COMPRESSION_NONE: u64 = 0x1;
    pub const COMPRESSION_LZ4: u64 = 0x2;
    pub const HASH_BLAKE3: u64 = 0x4;
    pub const HASH_SHA256: u64 = 0x8;
    pub const COMPRESSION_GZIP: u64 = 0x40;
    pub const COMPRESSION_ZSTD: u64 = 0x80;
    pub const TARFS_MODE: u64 = 0x200;
    pub const ENCRYPTION_AES_128_XTS: u64 = 0x0200_0000;
    /// Every bit nydus defines (the top byte is reserved-compat).
    pub const KNOWN: u64 = 0x3ff | 0x0300_0000 | 0xfc00_0000;
}

/// Chunk flags in a chunk-info entry.
pub(crate) const CHUNK_COMPRESSED: u32 = 0x1;
const CHUNK_ENCRYPTED: u32 = 0x4;
/// The chunk is packed into a batch (its location is in the blob's CI table). nydus-image leaves
/// it unset in the bootstrap and writes a zero compressed size instead; v6 only.
pub(crate) const CHUNK_BATCH: u32 = 0x8;

/// Blob features this reader cannot decode (zran, separate, tarfs, encrypted, external).
const BLOB_FEATURES_UNSUPPORTED: u32 = 0x8 | 0x10 | 0x40 | 0x100 | 0x800;

/// Superblock facts shown by `inspect`.
#[derive(Debug, Clone, Serialize)]
pub struct SuperInfo {
    pub flags: u64,
    pub chunk_size: u32,
    pub compressor: Compressor,
    pub digester: Digester,
    pub inode_count: u64,
    pub root: u64,
    pub build_time: u64,
    pub build_time_nsec: u32,
    pub meta_blkaddr: u32,
    pub xattr_blkaddr: u32,
    pub blocks: u32,
}

/// One EROFS device slot (the kernel's view of a blob).
#[derive(Debug, Clone, Serialize)]
pub struct DeviceSlot {
    pub tag: String,
    pub blocks: u32,
    pub mapped_blkaddr: u32,
}

/// A decoded chunk-info-table entry.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChunkInfo {
    pub digest: [u8; 32],
    pub blob_index: u32,
    pub flags: u32,
    pub compressed_size: u32,
    pub uncompressed_size: u32,
    pub compressed_offset: u64,
    pub uncompressed_offset: u64,
    pub file_offset: u64,
    pub index: u32,
}

/// Everything [`parse`] reads from the bootstrap header area.
pub(crate) struct Header {
    pub sb: SuperInfo,
    pub devices: Vec<DeviceSlot>,
    pub blobs: Vec<BlobInfo>,
    pub chunks: Vec<ChunkInfo>,
    pub chunk_map: HashMap<(u32, u32), usize>,
    pub prefetch: Vec<u64>,
}

/// Parse and validate the header structures of a v6 bootstrap.
pub(crate) fn parse(buf: &[u8]) -> Result<Header> {
    let len = buf.len() as u64;
    let sb: [u8; 128] = array(buf, SB_OFFSET, "EROFS superblock")?;
    if u32_at(&sb, 0) != EROFS_MAGIC {
        return Err(Error::NotRafs {
            reason: "no EROFS magic at byte 1024",
        });
    }
    if u32_at(&sb, 8) & COMPAT_RAFS_V6 == 0 {
        return Err(Error::NotRafs {
            reason:
                "EROFS image without the RAFS v6 compat bit (plain EROFS or nydus v3 bootstrap)",
        });
    }
    let checksum = u32_at(&sb, 4);
    if checksum != 0 {
        return Err(Error::invalid(
            "superblock checksum",
            checksum.into(),
            "RAFS v6 writes 0",
        ));
    }
    let blkszbits = u8_at(&sb, 12);
    if blkszbits != 12 {
        return Err(Error::Unsupported {
            what: "block size bits (only 4 KiB blocks; 512 B means tarfs)",
            value: blkszbits.into(),
        });
    }
    let incompat = u32_at(&sb, 80);
    if incompat & !(INCOMPAT_CHUNKED_FILE | INCOMPAT_DEVICE_TABLE) != 0 {
        return Err(Error::Unsupported {
            what: "EROFS incompatible features",
            value: incompat.into(),
        });
    }
    let root = u64::from(u16_at(&sb, 14));
    let inode_count = u64_at(&sb, 16);
    let meta_blkaddr = u32_at(&sb, 40);
    let xattr_blkaddr = u32_at(&sb, 44);
    if u64::from(meta_blkaddr) * BLOCK_SIZE >= len {
        return Err(Error::invalid(
            "meta_blkaddr",
            meta_blkaddr.into(),
            "past the end of the bootstrap",
        ));
    }
    let ext: [u8; 256] = array(buf, EXT_SB_OFFSET, "RAFS v6 extended superblock")?;
    let sflags = u64_at(&ext, 0);
    let (compressor, digester) = parse_flags(sflags)?;
    let chunk_size = u32_at(&ext, 20);
    check_chunk_size("superblock chunk size", chunk_size)?;
    let extra_devices = u16_at(&sb, 86);
    let devt_slotoff = u16_at(&sb, 88);
    let devices = parse_devices(buf, extra_devices, devt_slotoff)?;
    let blobs = parse_blobs(buf, u64_at(&ext, 8), u32_at(&ext, 16))?;
    let chunks = parse_chunk_table(buf, u64_at(&ext, 24), u64_at(&ext, 32), blobs.len())?;
    let mut chunk_map = HashMap::with_capacity(chunks.len());
    for (i, c) in chunks.iter().enumerate() {
        chunk_map.entry((c.blob_index, c.index)).or_insert(i);
    }
    let prefetch = parse_prefetch(buf, u64_at(&ext, 40), u32_at(&ext, 48))?;
    Ok(Header {
        sb: SuperInfo {
            flags: sflags,
            chunk_size,
            compressor,
            digester,
            inode_count,
            root,
            build_time: u64_at(&sb, 24),
            build_time_nsec: u32_at(&sb, 32),
            meta_blkaddr,
            xattr_blkaddr,
            blocks: u32_at(&sb, 36),
        },
        devices,
        blobs,
        chunks,
        chunk_map,
        prefetch,
    })
}

/// The compressor and digester named by `RafsSuperFlags`; exactly one of each must be set.
pub(crate) fn parse_flags(f: u64) -> Result<(Compressor, Digester)> {
    if f & !flags::KNOWN != 0 {
        return Err(Error::invalid("superblock flags", f, "unknown bits set"));
    }
    if f & flags::TARFS_MODE != 0 {
        return Err(Error::Unsupported {
            what: "tarfs-mode image (superblock flags)",
            value: f,
        });
    }
    if f & flags::ENCRYPTION_AES_128_XTS != 0 {
        return Err(Error::Unsupported {
            what: "encrypted image (superblock flags)",
            value: f,
        });
    }
    let comp_bits = f
        & (flags::COMPRESSION_NONE
            | flags::COMPRESSION_LZ4
            | flags::COMPRESSION_GZIP
            | flags::COMPRESSION_ZSTD);
    let compressor = match comp_bits {
        flags::COMPRESSION_NONE => Compressor::None,
        flags::COMPRESSION_LZ4 => Compressor::Lz4Block,
        flags::COMPRESSION_GZIP => Compressor::Gzip,
        flags::COMPRESSION_ZSTD => Compressor::Zstd,
        _ => {
            return Err(Error::invalid(
                "superblock flags",
                f,
                "not exactly one compression bit",
            ));
        }
    };
    let digester = match f & (flags::HASH_BLAKE3 | flags::HASH_SHA256) {
        flags::HASH_BLAKE3 => Digester::Blake3,
        flags::HASH_SHA256 => Digester::Sha256,
        // Old v5 images set no hash bit and mean blake3.
        0 => Digester::Blake3,
        _ => return Err(Error::invalid("superblock flags", f, "both hash bits set")),
    };
    Ok((compressor, digester))
}

pub(crate) fn check_chunk_size(what: &'static str, cs: u32) -> Result<()> {
    if !cs.is_power_of_two() || !(4096..=MAX_CHUNK_SIZE).contains(&cs) {
        return Err(Error::invalid(
            what,
            cs.into(),
            "not a power of two in 4 KiB..=16 MiB",
        ));
    }
    Ok(())
}

/// A blob id from a NUL-padded field: non-empty ASCII alphanumerics only.
pub(crate) fn parse_blob_id(raw: &[u8], what: &'static str) -> Result<String> {
    let id = until_nul(raw);
    if id.is_empty() || !id.iter().all(u8::is_ascii_alphanumeric) {
        return Err(Error::invalid(
            what,
            id.len() as u64,
            "empty or not ASCII alphanumeric",
        ));
    }
    Ok(String::from_utf8_lossy(id).into_owned())
}

fn parse_devices(buf: &[u8], count: u16, slotoff: u16) -> Result<Vec<DeviceSlot>> {
    if count == 0 {
        return Ok(Vec::new());
    }
    if slotoff != 11 {
        return Err(Error::invalid(
            "devt_slotoff",
            slotoff.into(),
            "RAFS v6 uses 11",
        ));
    }
    let base = u64::from(slotoff) * DEVICE_SLOT_SIZE;
    slice(
        buf,
        base,
        u64::from(count) * DEVICE_SLOT_SIZE,
        "device table",
    )?;
    (0..u64::from(count))
        .map(|i| {
            let d: [u8; 128] = array(buf, base + i * DEVICE_SLOT_SIZE, "device slot")?;
            Ok(DeviceSlot {
                tag: String::from_utf8_lossy(until_nul(d.get(..64).unwrap_or(&[]))).into_owned(),
                blocks: u32_at(&d, 64),
                mapped_blkaddr: u32_at(&d, 68),
            })
        })
        .collect()
}

fn parse_blobs(buf: &[u8], offset: u64, size: u32) -> Result<Vec<BlobInfo>> {
    let size = u64::from(size);
    if !size.is_multiple_of(BLOB_ENTRY_SIZE) {
        return Err(Error::invalid(
            "blob table size",
            size,
            "not a multiple of 256",
        ));
    }
    if size / BLOB_ENTRY_SIZE > MAX_BLOBS {
        return Err(Error::LimitExceeded {
            what: "number of blobs",
            limit: MAX_BLOBS,
        });
    }
    slice(buf, offset, size, "blob table")?;
    (0..size / BLOB_ENTRY_SIZE)
        .map(|i| {
            let e: [u8; 256] = array(buf, offset + i * BLOB_ENTRY_SIZE, "blob table entry")?;
            parse_blob_entry(&e, i as u32)
        })
        .collect()
}

fn parse_blob_entry(e: &[u8; 256], position: u32) -> Result<BlobInfo> {
    let blob_id = parse_blob_id(e.get(..64).unwrap_or(&[]), "blob id")?;
    let index = u32_at(e, 64);
    if index != position {
        return Err(Error::invalid(
            "blob_index",
            index.into(),
            "differs from its table position",
        ));
    }
    let chunk_size = u32_at(e, 68);
    check_chunk_size("blob chunk size", chunk_size)?;
    let chunk_count = u32_at(e, 72);
    if chunk_count > 1 << 24 {
        return Err(Error::invalid(
            "blob chunk_count",
            chunk_count.into(),
            "above 2^24",
        ));
    }
    let comp = u32_at(e, 76);
    let compressor = Compressor::from_enum(comp)
        .ok_or_else(|| Error::invalid("blob compression_algo", comp.into(), "unknown"))?;
    let digester = match u32_at(e, 80) {
        0 => Digester::Blake3,
        1 => Digester::Sha256,
        v => return Err(Error::invalid("blob digest_algo", v.into(), "unknown")),
    };
    let features = u32_at(e, 84);
    if features & 0xffff & !0x0fff != 0 {
        return Err(Error::invalid(
            "blob features",
            features.into(),
            "unknown incompat bits",
        ));
    }
    if features & BLOB_FEATURES_UNSUPPORTED != 0 {
        return Err(Error::Unsupported {
            what: "blob features (zran/separate/tarfs/encrypted/external)",
            value: features.into(),
        });
    }
    let batch = features & BlobInfo::FEATURE_BATCH != 0;
    if batch && features & BlobInfo::FEATURE_CHUNK_INFO_V2 == 0 {
        return Err(Error::invalid(
            "blob features",
            features.into(),
            "batch chunks need CI v2 entries",
        ));
    }
    let ci_comp = u32_at(e, 108);
    let ci_compressed = u64_at(e, 120);
    let ci_uncompressed = u64_at(e, 128);
    let meta = if ci_uncompressed == 0 && ci_compressed == 0 {
        if batch {
            return Err(Error::invalid(
                "blob ci_uncompressed_size",
                0,
                "a batch blob needs its CI table",
            ));
        }
        None
    } else {
        Some(BlobMetaInfo {
            compressor: Compressor::from_enum(ci_comp)
                .ok_or_else(|| Error::invalid("blob ci_compressor", ci_comp.into(), "unknown"))?,
            offset: u64_at(e, 112),
            compressed_size: ci_compressed,
            uncompressed_size: ci_uncompressed,
        })
    };
    Ok(BlobInfo {
        index,
        blob_id,
        chunk_size,
        chunk_count,
        compressor,
        digester,
        features,
        compressed_size: u64_at(e, 88),
        uncompressed_size: u64_at(e, 96),
        meta,
        toc_size: u32_at(e, 104),
        toc_digest: bytes32_at(e, 136),
    })
}

/// Parse an 80-byte chunk-info entry (same layout in v5 inodes and the v6 chunk table).
pub(crate) fn parse_chunk_info(e: &[u8]) -> Result<ChunkInfo> {
    let c = ChunkInfo {
        digest: bytes32_at(e, 0),
        blob_index: u32_at(e, 32),
        flags: u32_at(e, 36),
        compressed_size: u32_at(e, 40),
        uncompressed_size: u32_at(e, 44),
        compressed_offset: u64_at(e, 48),
        uncompressed_offset: u64_at(e, 56),
        file_offset: u64_at(e, 64),
        index: u32_at(e, 72),
    };
    if c.flags & CHUNK_ENCRYPTED != 0 {
        return Err(Error::Unsupported {
            what: "chunk flags (encrypted chunk)",
            value: c.flags.into(),
        });
    }
    if c.uncompressed_size > MAX_CHUNK_SIZE || c.compressed_size > MAX_CHUNK_SIZE {
        return Err(Error::invalid(
            "chunk size",
            c.uncompressed_size.max(c.compressed_size).into(),
            "above 16 MiB",
        ));
    }
    Ok(c)
}

fn parse_chunk_table(buf: &[u8], offset: u64, size: u64, blobs: usize) -> Result<Vec<ChunkInfo>> {
    if !size.is_multiple_of(CHUNK_INFO_SIZE) {
        return Err(Error::invalid(
            "chunk table size",
            size,
            "not a multiple of 80",
        ));
    }
    let table = slice(buf, offset, size, "chunk table")?;
    table
        .chunks_exact(CHUNK_INFO_SIZE as usize)
        .map(|e| {
            let c = parse_chunk_info(e)?;
            if c.blob_index as usize >= blobs {
                return Err(Error::invalid(
                    "chunk blob_index",
                    c.blob_index.into(),
                    "no such blob",
                ));
            }
            Ok(c)
        })
        .collect()
}

fn parse_prefetch(buf: &[u8], offset: u64, size: u32) -> Result<Vec<u64>> {
    if size == 0 {
        return Ok(Vec::new());
    }
    if !size.is_multiple_of(4) {
        return Err(Error::invalid(
            "prefetch table size",
            size.into(),
            "not a multiple of 4",
        ));
    }
    let t = slice(buf, offset, size.into(), "prefetch table")?;
    Ok(t.chunks_exact(4).map(|c| u64::from(u32_at(c, 0))).collect())
}
