//! RAFS v6 bootstraps: an EROFS image with a Nydus extended superblock, blob table and chunk
//! table. Inode handles are EROFS nids.
//!
//! Invariants: the header tables were validated at open (see `superblock`); every inode, dirent,
//! xattr and chunk index is re-validated on each access, so any nid a caller passes is safe.

mod dir;
mod inode;
pub(crate) mod superblock;
mod xattr;

pub use superblock::{DeviceSlot, SuperInfo};

use crate::error::{Error, Result};
use crate::model::{Attr, BlobInfo, ChunkRef, DirEntry, FileType, Xattr};
use crate::raw::{slice, u16_at, u32_at};
use inode::{OnDiskInode, LAYOUT_CHUNK_BASED};
use superblock::{ChunkInfo, Header, BLOCK_SIZE, CHUNK_COMPRESSED};

const CHUNK_FORMAT_INDEXES: u32 = 0x20;
const CHUNK_FORMAT_48BIT: u32 = 0x40;
const NULL_BLKADDR: u32 = u32::MAX;

/// An opened v6 bootstrap.
pub(crate) struct V6 {
    buf: Vec<u8>,
    hdr: Header,
}

impl V6 {
    pub(crate) fn open(buf: Vec<u8>) -> Result<Self> {
        let hdr = superblock::parse(&buf)?;
        let v6 = V6 { buf, hdr };
        let root = v6.inode(v6.hdr.sb.root)?;
        if root.attr.file_type != FileType::Dir {
            return Err(Error::BadInode {
                ino: root.nid,
                reason: "root inode is not a directory",
            });
        }
        Ok(v6)
    }

    pub(crate) fn super_info(&self) -> &SuperInfo {
        &self.hdr.sb
    }

    pub(crate) fn devices(&self) -> &[DeviceSlot] {
        &self.hdr.devices
    }

    pub(crate) fn blobs(&self) -> &[BlobInfo] {
        &self.hdr.blobs
    }

    pub(crate) fn prefetch(&self) -> &[u64] {
        &self.hdr.prefetch
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.buf
    }

    fn inode(&self, nid: u64) -> Result<OnDiskInode> {
        OnDiskInode::read(&self.buf, &self.hdr.sb, nid)
    }

    pub(crate) fn getattr(&self, nid: u64) -> Result<Attr> {
        Ok(self.inode(nid)?.attr)
    }

    pub(crate) fn readdir(&self, nid: u64) -> Result<Vec<DirEntry>> {
        let inode = self.inode(nid)?;
        if inode.attr.file_type != FileType::Dir {
            return Err(Error::WrongType {
                ino: nid,
                expected: "directory",
            });
        }
        dir::parse_dir(nid, &inode.flat_data(&self.buf)?)
    }

    pub(crate) fn readlink(&self, nid: u64) -> Result<Vec<u8>> {
        let inode = self.inode(nid)?;
        if inode.attr.file_type != FileType::Symlink {
            return Err(Error::WrongType {
                ino: nid,
                expected: "symlink",
            });
        }
        inode.flat_data(&self.buf)
    }

    pub(crate) fn xattrs(&self, nid: u64) -> Result<Vec<Xattr>> {
        let inode = self.inode(nid)?;
        xattr::read_xattrs(&self.buf, self.hdr.sb.xattr_blkaddr, &inode)
    }

    /// Chunks of regular file `nid` overlapping `[offset, offset + len)`, in file order.
    /// Holes (null chunk addresses) are left out; their bytes read as zeros.
    pub(crate) fn file_chunks(&self, nid: u64, offset: u64, len: u64) -> Result<Vec<ChunkRef>> {
        let inode = self.inode(nid)?;
        if inode.attr.file_type != FileType::File {
            return Err(Error::WrongType {
                ino: nid,
                expected: "regular file",
            });
        }
        let size = inode.attr.size;
        let end = size.min(offset.saturating_add(len));
        if offset >= end {
            return Ok(Vec::new());
        }
        if inode.layout != LAYOUT_CHUNK_BASED {
            return Err(Error::BadInode {
                ino: nid,
                reason: "regular file is not chunk-based",
            });
        }
        let format = inode.i_u & 0xffff;
        if format & CHUNK_FORMAT_INDEXES == 0 || format & CHUNK_FORMAT_48BIT != 0 {
            return Err(Error::Unsupported {
                what: "EROFS chunk format (nydus uses 8-byte indexes without 48-bit addresses)",
                value: format.into(),
            });
        }
        // nydusd maps file offsets with the superblock chunk size, one index per chunk; the
        // inode's chunk format may claim a larger size for the kernel's benefit when all of a
        // file's chunks are contiguous, which maps to the same decoded bytes.
        let cs = u64::from(self.hdr.sb.chunk_size);
        let first = offset / cs;
        let last = (end - 1) / cs;
        let base = inode.chunk_index_offset()?;
        let idx = slice(
            &self.buf,
            base + first * 8,
            (last - first + 1) * 8,
            "chunk index array",
        )?;
        let mut out = Vec::with_capacity(idx.len() / 8);
        for (i, e) in idx.chunks_exact(8).enumerate() {
            let k = first + i as u64;
            if let Some(c) = self.chunk_ref(nid, k, e, size)? {
                out.push(c);
            }
        }
        Ok(out)
    }

    fn chunk_ref(&self, nid: u64, k: u64, e: &[u8], size: u64) -> Result<Option<ChunkRef>> {
        let blkaddr = u32_at(e, 4);
        if blkaddr == NULL_BLKADDR {
            return Ok(None);
        }
        let hi = u16_at(e, 2);
        let device = u32::from(hi & 0xff);
        if device == 0 {
            return Err(Error::BadInode {
                ino: nid,
                reason: "chunk index with device id 0 (data in the bootstrap)",
            });
        }
        let blob_index = device - 1;
        let ci_index = u32::from(u16_at(e, 0)) | (u32::from(hi >> 8) << 16);
        let info = self
            .hdr
            .chunk_map
            .get(&(blob_index, ci_index))
            .and_then(|&i| self.hdr.chunks.get(i))
            .ok_or(Error::UnknownChunk {
                ino: nid,
                index: k,
                blob_index,
                ci_index,
            })?;
        if info.uncompressed_offset != u64::from(blkaddr) * BLOCK_SIZE {
            return Err(Error::BadInode {
                ino: nid,
                reason: "chunk index block address differs from the chunk table",
            });
        }
        let cs = u64::from(self.hdr.sb.chunk_size);
        let file_offset = k * cs;
        if u64::from(info.uncompressed_size) != cs.min(size - file_offset) {
            return Err(Error::BadInode {
                ino: nid,
                reason: "chunk size does not match the file size",
            });
        }
        Ok(Some(to_ref(info, file_offset)))
    }

    /// Chunk `ci_index` of blob `blob_index` as the chunk table has it (file offset 0).
    pub(crate) fn chunk(&self, blob_index: u32, ci_index: u32) -> Option<ChunkRef> {
        let i = *self.hdr.chunk_map.get(&(blob_index, ci_index))?;
        self.hdr.chunks.get(i).map(|c| to_ref(c, 0))
    }

    /// Every chunk the chunk table lists for blob `blob_index` (file offsets are 0).
    pub(crate) fn blob_chunks(&self, blob_index: u32) -> Vec<ChunkRef> {
        self.hdr
            .chunks
            .iter()
            .filter(|c| c.blob_index == blob_index)
            .map(|c| to_ref(c, 0))
            .collect()
    }
}

fn to_ref(c: &ChunkInfo, file_offset: u64) -> ChunkRef {
    ChunkRef {
        blob_index: c.blob_index,
        ci_index: c.index,
        digest: c.digest,
        compressed: c.flags & CHUNK_COMPRESSED != 0,
        compressed_offset: c.compressed_offset,
        compressed_size: c.compressed_size,
        uncompressed_offset: c.uncompressed_offset,
        uncompressed_size: c.uncompressed_size,
        file_offset,
        batch: None,
    }
}
