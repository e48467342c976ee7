//! EROFS on-disk inodes (compact 32 B and extended 64 B) and the flat data layouts used for
//! directories and symlinks.
//!
//! Invariants: an [`OnDiskInode`] lies wholly inside the bootstrap and has a known file type and
//! data layout; [`OnDiskInode::flat_data`] returns at most `i_size` bytes and never reads outside
//! the bootstrap (so its allocation is bounded by the input size).

use crate::error::{Error, Result};
use crate::model::{Attr, FileType};
use crate::raw::{array, round_up, slice, u16_at, u32_at, u64_at};
use crate::v6::superblock::{SuperInfo, BLOCK_SIZE};

const SLOT_SIZE: u64 = 32;
pub(crate) const LAYOUT_FLAT_PLAIN: u16 = 0;
pub(crate) const LAYOUT_FLAT_INLINE: u16 = 2;
pub(crate) const LAYOUT_CHUNK_BASED: u16 = 4;

/// A decoded inode header plus where its trailing areas (xattrs, inline data, chunk indexes) are.
#[derive(Debug, Clone)]
pub(crate) struct OnDiskInode {
    pub nid: u64,
    /// Byte offset of the inode in the bootstrap.
    pub offset: u64,
    /// 32 (compact) or 64 (extended).
    pub inode_size: u64,
    pub layout: u16,
    pub xattr_icount: u16,
    pub attr: Attr,
    /// `i_u`: start block, rdev or chunk format depending on the type.
    pub i_u: u32,
}

impl OnDiskInode {
    /// Parse the inode with number `nid`.
    pub(crate) fn read(buf: &[u8], sb: &SuperInfo, nid: u64) -> Result<Self> {
        let bad = |reason| Error::BadInode { ino: nid, reason };
        let offset = nid
            .checked_mul(SLOT_SIZE)
            .and_then(|o| o.checked_add(u64::from(sb.meta_blkaddr) * BLOCK_SIZE))
            .ok_or_else(|| bad("inode number out of range"))?;
        let head: [u8; 32] = array(buf, offset, "inode")?;
        let format = u16_at(&head, 0);
        if format & !0xf != 0 {
            return Err(bad("unknown bits in i_format"));
        }
        let extended = format & 1 == 1;
        let layout = (format >> 1) & 7;
        let xattr_icount = u16_at(&head, 2);
        let mode16 = u16_at(&head, 4);
        let (inode_size, attr, i_u) = if extended {
            let e: [u8; 64] = array(buf, offset, "extended inode")?;
            let attr = Attr {
                ino: nid,
                file_type: FileType::File,
                mode: u32::from(mode16),
                uid: u32_at(&e, 24),
                gid: u32_at(&e, 28),
                size: u64_at(&e, 8),
                mtime: u64_at(&e, 32),
                mtime_nsec: u32_at(&e, 40),
                nlink: u32_at(&e, 44),
                rdev: 0,
            };
            (64, attr, u32_at(&e, 16))
        } else {
            let attr = Attr {
                ino: nid,
                file_type: FileType::File,
                mode: u32::from(mode16),
                uid: u32::from(u16_at(&head, 24)),
                gid: u32::from(u16_at(&head, 26)),
                size: u64::from(u32_at(&head, 8)),
                mtime: sb.build_time,
                mtime_nsec: sb.build_time_nsec,
                nlink: u32::from(u16_at(&head, 6)),
                rdev: 0,
            };
            (32, attr, u32_at(&head, 16))
        };
        let mut attr = attr;
        attr.file_type =
            FileType::from_mode(attr.mode).ok_or_else(|| bad("unknown file type in i_mode"))?;
        match attr.file_type {
            FileType::CharDevice | FileType::BlockDevice => attr.rdev = i_u,
            FileType::File if layout != LAYOUT_CHUNK_BASED && attr.size != 0 => {
                return Err(bad("regular file is not chunk-based"));
            }
            FileType::Dir | FileType::Symlink
                if layout != LAYOUT_FLAT_PLAIN && layout != LAYOUT_FLAT_INLINE =>
            {
                return Err(bad("directory or symlink with a non-flat data layout"));
            }
            _ => {}
        }
        Ok(OnDiskInode {
            nid,
            offset,
            inode_size,
            layout,
            xattr_icount,
            attr,
            i_u,
        })
    }

    /// Size of the inline xattr area (header, shared ids and entries).
    pub(crate) fn xattr_size(&self) -> u64 {
        if self.xattr_icount == 0 {
            0
        } else {
            12 + 4 * (u64::from(self.xattr_icount) - 1)
        }
    }

    /// Offset of what follows the inode and its xattrs (inline data).
    pub(crate) fn tail_offset(&self) -> u64 {
        self.offset + self.inode_size + self.xattr_size()
    }

    /// Offset of the chunk index array of a chunk-based file (8-byte aligned).
    pub(crate) fn chunk_index_offset(&self) -> Result<u64> {
        round_up(self.tail_offset(), 8).ok_or(Error::BadInode {
            ino: self.nid,
            reason: "chunk index offset overflows",
        })
    }

    /// The whole data of a flat (plain or inline) inode: directory blocks or a symlink target.
    pub(crate) fn flat_data(&self, buf: &[u8]) -> Result<Vec<u8>> {
        let size = self.attr.size;
        if size > buf.len() as u64 {
            return Err(Error::BadInode {
                ino: self.nid,
                reason: "data size larger than the bootstrap",
            });
        }
        if size == 0 {
            return Ok(Vec::new());
        }
        let start = u64::from(self.i_u) * BLOCK_SIZE;
        match self.layout {
            LAYOUT_FLAT_PLAIN => Ok(slice(buf, start, size, "flat inode data")?.to_vec()),
            LAYOUT_FLAT_INLINE => {
                let full_blocks = (size - 1) / BLOCK_SIZE;
                let head_len = full_blocks * BLOCK_SIZE;
                let tail_len = size - head_len;
                let tail_off = self.tail_offset();
                if tail_off % BLOCK_SIZE + tail_len > BLOCK_SIZE {
                    return Err(Error::BadInode {
                        ino: self.nid,
                        reason: "inline data crosses a block boundary",
                    });
                }
                let mut out = Vec::with_capacity(size as usize);
                if head_len > 0 {
                    out.extend_from_slice(slice(buf, start, head_len, "flat inode data")?);
                }
                out.extend_from_slice(slice(buf, tail_off, tail_len, "inline inode data")?);
                Ok(out)
            }
            _ => Err(Error::BadInode {
                ino: self.nid,
                reason: "not a flat inode",
            }),
        }
    }
}
