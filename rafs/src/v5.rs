//! RAFS v5 bootstraps (read only): an 8 KiB superblock, an inode table mapping inode indexes to
//! 8-byte-aligned inode records, a blob table (NUL-separated ids) with its extended table, and
//! per-file chunk-info arrays. Inode handles are inode-table indexes (root = 1).
//!
//! Invariants: header tables are validated at open; every record access is bounds-checked, so
//! any handle a caller passes is safe; names follow the same rules as v6 dirents.

use crate::error::{Error, Result};
use crate::model::{Attr, BlobInfo, ChunkRef, Compressor, Digester, DirEntry, FileType, Xattr};
use crate::raw::{array, round_up, slice, u16_at, u32_at, u64_at};
use crate::v6::superblock::{
    check_chunk_size, parse_blob_id, parse_chunk_info, parse_flags, CHUNK_BATCH, CHUNK_COMPRESSED,
    CHUNK_INFO_SIZE,
};

pub(crate) const V5_MAGIC: u32 = 0x5241_4653;
const SB_SIZE: u64 = 8192;
const INODE_SIZE: u64 = 128;
const EXT_BLOB_ENTRY: u64 = 64;
const FLAG_SYMLINK: u64 = 0x1;
const FLAG_XATTR: u64 = 0x4;
pub(crate) const ROOT: u64 = 1;

/// Superblock facts of a v5 bootstrap.
#[derive(Debug, Clone, serde::Serialize)]
pub struct V5SuperInfo {
    pub version: u32,
    pub flags: u64,
    pub chunk_size: u32,
    pub compressor: Compressor,
    pub digester: Digester,
    pub inode_count: u64,
    pub inode_table_entries: u32,
}

/// An opened v5 bootstrap.
pub(crate) struct V5 {
    buf: Vec<u8>,
    sb: V5SuperInfo,
    inode_table_offset: u64,
    blobs: Vec<BlobInfo>,
    prefetch: Vec<u64>,
}

/// A decoded inode record and the offsets of its trailing parts.
struct Record {
    attr: Attr,
    flags: u64,
    child_index: u32,
    child_count: u32,
    name: Vec<u8>,
    symlink_off: u64,
    symlink_size: u64,
    xattr_off: u64,
    chunks_off: u64,
}

impl V5 {
    pub(crate) fn open(buf: Vec<u8>) -> Result<Self> {
        let sb: [u8; 80] = array(&buf, 0, "RAFS v5 superblock")?;
        let version = u32_at(&sb, 4);
        if u32_at(&sb, 0) != V5_MAGIC || !(version == 0x500 || version == 0x400) {
            return Err(Error::NotRafs {
                reason: "no RAFS v5 magic and version at byte 0",
            });
        }
        if u64::from(u32_at(&sb, 8)) != SB_SIZE || (buf.len() as u64) <= SB_SIZE {
            return Err(Error::invalid(
                "v5 superblock size",
                u32_at(&sb, 8).into(),
                "must be 8192 and smaller than the file",
            ));
        }
        let chunk_size = u32_at(&sb, 12);
        if chunk_size != 4 << 20 {
            check_chunk_size("v5 block size", chunk_size)?;
        }
        let flags = u64_at(&sb, 16);
        let (compressor, digester) = parse_flags(flags)?;
        let entries = u32_at(&sb, 56);
        let inode_table_offset = u64_at(&sb, 32);
        slice(
            &buf,
            inode_table_offset,
            u64::from(entries) * 4,
            "v5 inode table",
        )?;
        let ext = parse_ext_table(&buf, u64_at(&sb, 72), u32_at(&sb, 68))?;
        let blobs = parse_blob_table(
            &buf,
            u64_at(&sb, 48),
            u32_at(&sb, 64),
            &ext,
            chunk_size,
            compressor,
            digester,
        )?;
        let pf = slice(
            &buf,
            u64_at(&sb, 40),
            u64::from(u32_at(&sb, 60)) * 4,
            "v5 prefetch table",
        )?;
        let prefetch = pf
            .chunks_exact(4)
            .map(|c| u64::from(u32_at(c, 0)))
            .collect();
        let v5 = V5 {
            sb: V5SuperInfo {
                version,
                flags,
                chunk_size,
                compressor,
                digester,
                inode_count: u64_at(&sb, 24),
                inode_table_entries: entries,
            },
            buf,
            inode_table_offset,
            blobs,
            prefetch,
        };
        if v5.record(ROOT)?.attr.file_type != FileType::Dir {
            return Err(Error::BadInode {
                ino: ROOT,
                reason: "root inode is not a directory",
            });
        }
        Ok(v5)
    }

    pub(crate) fn super_info(&self) -> &V5SuperInfo {
        &self.sb
    }

    pub(crate) fn blobs(&self) -> &[BlobInfo] {
        &self.blobs
    }

    pub(crate) fn prefetch(&self) -> &[u64] {
        &self.prefetch
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.buf
    }

    pub(crate) fn getattr(&self, index: u64) -> Result<Attr> {
        Ok(self.record(index)?.attr)
    }

    pub(crate) fn readdir(&self, index: u64) -> Result<Vec<DirEntry>> {
        let r = self.record(index)?;
        if r.attr.file_type != FileType::Dir {
            return Err(Error::WrongType {
                ino: index,
                expected: "directory",
            });
        }
        let first = u64::from(r.child_index);
        let count = u64::from(r.child_count);
        if count > 0 && (first == 0 || first + count - 1 > u64::from(self.sb.inode_table_entries)) {
            return Err(Error::BadInode {
                ino: index,
                reason: "child index range outside the inode table",
            });
        }
        (first..first + count)
            .map(|child| {
                let c = self.record(child)?;
                if c.name.is_empty()
                    || c.name.len() > 255
                    || c.name.contains(&b'/')
                    || c.name.contains(&0)
                    || c.name == b"."
                    || c.name == b".."
                {
                    return Err(Error::BadInode {
                        ino: child,
                        reason: "invalid file name",
                    });
                }
                Ok(DirEntry {
                    name: c.name,
                    inode: child,
                    file_type: c.attr.file_type,
                })
            })
            .collect()
    }

    pub(crate) fn readlink(&self, index: u64) -> Result<Vec<u8>> {
        let r = self.record(index)?;
        if r.attr.file_type != FileType::Symlink {
            return Err(Error::WrongType {
                ino: index,
                expected: "symlink",
            });
        }
        Ok(slice(
            &self.buf,
            r.symlink_off,
            r.symlink_size,
            "v5 symlink target",
        )?
        .to_vec())
    }

    pub(crate) fn xattrs(&self, index: u64) -> Result<Vec<Xattr>> {
        let r = self.record(index)?;
        if r.flags & FLAG_XATTR == 0 {
            return Ok(Vec::new());
        }
        let size = u64_at(slice(&self.buf, r.xattr_off, 8, "v5 xattr table")?, 0);
        let mut body = slice(&self.buf, r.xattr_off + 8, size, "v5 xattr table")?;
        let bad = |reason| Error::BadInode { ino: index, reason };
        let mut out = Vec::new();
        while !body.is_empty() {
            let n = u64::from(u32_at(slice(body, 0, 4, "v5 xattr pair")?, 0));
            let pair = slice(body, 4, n, "v5 xattr pair")
                .map_err(|_| bad("xattr pair runs past the table"))?;
            let nul = pair
                .iter()
                .position(|&c| c == 0)
                .ok_or_else(|| bad("xattr name without NUL"))?;
            let (name, value) = pair.split_at(nul);
            if name.is_empty() {
                return Err(bad("empty xattr name"));
            }
            out.push(Xattr {
                name: name.to_vec(),
                value: value.get(1..).unwrap_or(&[]).to_vec(),
            });
            body = body.get(4 + pair.len()..).unwrap_or(&[]);
        }
        Ok(out)
    }

    pub(crate) fn file_chunks(&self, index: u64, offset: u64, len: u64) -> Result<Vec<ChunkRef>> {
        let r = self.record(index)?;
        if r.attr.file_type != FileType::File {
            return Err(Error::WrongType {
                ino: index,
                expected: "regular file",
            });
        }
        let size = r.attr.size;
        let end = size.min(offset.saturating_add(len));
        if offset >= end {
            return Ok(Vec::new());
        }
        let count = u64::from(r.child_count);
        let table = slice(
            &self.buf,
            r.chunks_off,
            count * CHUNK_INFO_SIZE,
            "v5 chunk array",
        )?;
        let mut out = Vec::new();
        for e in table.chunks_exact(CHUNK_INFO_SIZE as usize) {
            let c = parse_chunk_info(e)?;
            if c.flags & CHUNK_BATCH != 0 {
                return Err(Error::Unsupported {
                    what: "chunk flags (batch chunk in a v5 image)",
                    value: c.flags.into(),
                });
            }
            let c_end = c.file_offset.checked_add(c.uncompressed_size.into());
            if c_end.is_none_or(|ce| ce > size) || c.blob_index as usize >= self.blobs.len() {
                return Err(Error::BadInode {
                    ino: index,
                    reason: "chunk outside the file or naming a missing blob",
                });
            }
            if c_end.is_some_and(|ce| ce > offset) && c.file_offset < end {
                out.push(ChunkRef {
                    blob_index: c.blob_index,
                    ci_index: c.index,
                    digest: c.digest,
                    compressed: c.flags & CHUNK_COMPRESSED != 0,
                    compressed_offset: c.compressed_offset,
                    compressed_size: c.compressed_size,
                    uncompressed_offset: c.uncompressed_offset,
                    uncompressed_size: c.uncompressed_size,
                    file_offset: c.file_offset,
                    batch: None,
                });
            }
        }
        Ok(out)
    }

    fn record(&self, index: u64) -> Result<Record> {
        let bad = |reason| Error::BadInode { ino: index, reason };
        if index == 0 || index > u64::from(self.sb.inode_table_entries) {
            return Err(bad("inode index outside the inode table"));
        }
        let t = slice(
            &self.buf,
            self.inode_table_offset + (index - 1) * 4,
            4,
            "v5 inode table entry",
        )?;
        let off = u64::from(u32_at(t, 0)) << 3;
        if off <= SB_SIZE {
            return Err(bad("inode offset inside the superblock"));
        }
        let i: [u8; 128] = array(&self.buf, off, "v5 inode")?;
        let mode = u32_at(&i, 60);
        let file_type =
            FileType::from_mode(mode).ok_or_else(|| bad("unknown file type in i_mode"))?;
        let flags = u64_at(&i, 80);
        let name_size = u64::from(u16_at(&i, 100));
        let symlink_size = u64::from(u16_at(&i, 102));
        if name_size > 255 {
            // Checked before copying: many table entries may alias one record.
            return Err(bad("file name longer than 255 bytes"));
        }
        let name = slice(&self.buf, off + INODE_SIZE, name_size, "v5 file name")?.to_vec();
        let symlink_off = off + INODE_SIZE + round_up(name_size, 8).unwrap_or(0);
        let mut xattr_off = symlink_off;
        if flags & FLAG_SYMLINK != 0 || file_type == FileType::Symlink {
            xattr_off += round_up(symlink_size, 8).unwrap_or(0);
        }
        let mut chunks_off = xattr_off;
        if flags & FLAG_XATTR != 0 {
            let size = u64_at(slice(&self.buf, xattr_off, 8, "v5 xattr table")?, 0);
            let padded = round_up(size, 8)
                .filter(|&p| p <= self.buf.len() as u64)
                .ok_or_else(|| bad("xattr table size too large"))?;
            chunks_off = xattr_off + 8 + padded;
        }
        let rdev = u32_at(&i, 104);
        Ok(Record {
            attr: Attr {
                ino: u64_at(&i, 40),
                file_type,
                mode,
                uid: u32_at(&i, 48),
                gid: u32_at(&i, 52),
                size: u64_at(&i, 64),
                mtime: u64_at(&i, 112),
                mtime_nsec: u32_at(&i, 108),
                nlink: u32_at(&i, 88),
                rdev: if matches!(file_type, FileType::CharDevice | FileType::BlockDevice) {
                    rdev
                } else {
                    0
                },
            },
            flags,
            child_index: u32_at(&i, 92),
            child_count: u32_at(&i, 96),
            name,
            symlink_off,
            symlink_size,
            xattr_off,
            chunks_off,
        })
    }
}

struct ExtEntry {
    chunk_count: u32,
    uncompressed_size: u64,
    compressed_size: u64,
}

fn parse_ext_table(buf: &[u8], offset: u64, entries: u32) -> Result<Vec<ExtEntry>> {
    let t = slice(
        buf,
        offset,
        u64::from(entries) * EXT_BLOB_ENTRY,
        "v5 extended blob table",
    )?;
    Ok(t.chunks_exact(EXT_BLOB_ENTRY as usize)
        .map(|e| ExtEntry {
            chunk_count: u32_at(e, 0),
            uncompressed_size: u64_at(e, 8),
            compressed_size: u64_at(e, 16),
        })
        .collect())
}

fn parse_blob_table(
    buf: &[u8],
    offset: u64,
    size: u32,
    ext: &[ExtEntry],
    chunk_size: u32,
    compressor: Compressor,
    digester: Digester,
) -> Result<Vec<BlobInfo>> {
    let mut t = slice(buf, offset, size.into(), "v5 blob table")?;
    let mut out = Vec::new();
    while t.len() > 8 {
        let rest = t.get(8..).unwrap_or(&[]);
        let id_len = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
        let id = parse_blob_id(rest.get(..id_len).unwrap_or(&[]), "v5 blob id")?;
        let index = out.len() as u32;
        let e = ext.get(index as usize);
        if !ext.is_empty() && e.is_none() {
            return Err(Error::invalid(
                "v5 extended blob table entries",
                ext.len() as u64,
                "fewer than blobs",
            ));
        }
        out.push(BlobInfo {
            index,
            blob_id: id,
            chunk_size,
            chunk_count: e.map_or(0, |e| e.chunk_count),
            compressor,
            digester,
            features: 0,
            compressed_size: e.map_or(0, |e| e.compressed_size),
            uncompressed_size: e.map_or(0, |e| e.uncompressed_size),
            meta: None,
            toc_size: 0,
            toc_digest: [0; 32],
        });
        t = rest.get(id_len + 1..).unwrap_or(&[]);
        if out.len() > 254 {
            return Err(Error::LimitExceeded {
                what: "number of blobs",
                limit: 254,
            });
        }
    }
    Ok(out)
}
