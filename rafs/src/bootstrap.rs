//! The public entry point to an image: [`Bootstrap`] opens a v5 or v6 bootstrap and answers
//! filesystem questions (lookup, getattr, readdir, readlink, xattrs, file chunks).
//!
//! Invariants: a `Bootstrap` holds the whole bootstrap in memory (at most
//! [`MAX_BOOTSTRAP_SIZE`]); every method validates what it reads, so any [`InodeId`] — even a
//! made-up one — yields a value or an error, never a panic.

use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::{
    Attr, BlobInfo, ChunkRef, Compressor, Digester, DirEntry, InodeId, RafsVersion, Xattr,
};
use crate::raw::u32_at;
use crate::v5::{V5SuperInfo, V5, V5_MAGIC};
use crate::v6::{DeviceSlot, SuperInfo, V6};

/// Bootstraps larger than this are refused (they would be held in memory).
pub const MAX_BOOTSTRAP_SIZE: u64 = 1 << 30;

/// An opened RAFS bootstrap (v5 or v6).
pub struct Bootstrap {
    inner: Inner,
}

enum Inner {
    V5(V5),
    V6(V6),
}

/// Superblock summary common to both versions.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub version: RafsVersion,
    pub flags: u64,
    pub chunk_size: u32,
    pub compressor: Compressor,
    pub digester: Digester,
    pub inode_count: u64,
    pub root: InodeId,
    pub bootstrap_size: u64,
}

impl std::fmt::Debug for Bootstrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bootstrap")
            .field("summary", &self.summary())
            .finish()
    }
}

impl Bootstrap {
    /// Read and open the bootstrap file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.len() > MAX_BOOTSTRAP_SIZE {
            return Err(Error::LimitExceeded {
                what: "bootstrap size",
                limit: MAX_BOOTSTRAP_SIZE,
            });
        }
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(bytes)
    }

    /// Open a bootstrap held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        if bytes.len() as u64 > MAX_BOOTSTRAP_SIZE {
            return Err(Error::LimitExceeded {
                what: "bootstrap size",
                limit: MAX_BOOTSTRAP_SIZE,
            });
        }
        crate::blob::tail::reject_v3(&bytes)?;
        if bytes.len() >= 8 && u32_at(&bytes, 0) == V5_MAGIC {
            return Ok(Bootstrap {
                inner: Inner::V5(V5::open(bytes)?),
            });
        }
        if bytes.len() < 4096 {
            return Err(Error::NotRafs {
                reason: "shorter than one 4 KiB block",
            });
        }
        Ok(Bootstrap {
            inner: Inner::V6(V6::open(bytes)?),
        })
    }

    /// The format version.
    pub fn version(&self) -> RafsVersion {
        match self.inner {
            Inner::V5(_) => RafsVersion::V5,
            Inner::V6(_) => RafsVersion::V6,
        }
    }

    /// Superblock facts common to both versions.
    pub fn summary(&self) -> Summary {
        match &self.inner {
            Inner::V5(v) => {
                let s: &V5SuperInfo = v.super_info();
                Summary {
                    version: RafsVersion::V5,
                    flags: s.flags,
                    chunk_size: s.chunk_size,
                    compressor: s.compressor,
                    digester: s.digester,
                    inode_count: s.inode_count,
                    root: crate::v5::ROOT,
                    bootstrap_size: v.bytes().len() as u64,
                }
            }
            Inner::V6(v) => {
                let s: &SuperInfo = v.super_info();
                Summary {
                    version: RafsVersion::V6,
                    flags: s.flags,
                    chunk_size: s.chunk_size,
                    compressor: s.compressor,
                    digester: s.digester,
                    inode_count: s.inode_count,
                    root: s.root,
                    bootstrap_size: v.bytes().len() as u64,
                }
            }
        }
    }

    /// v6 only: the EROFS superblock details.
    pub fn v6_super(&self) -> Option<&SuperInfo> {
        match &self.inner {
            Inner::V6(v) => Some(v.super_info()),
            Inner::V5(_) => None,
        }
    }

    /// v6 only: the EROFS device table (one slot per blob, in `device=` order).
    pub fn devices(&self) -> &[DeviceSlot] {
        match &self.inner {
            Inner::V6(v) => v.devices(),
            Inner::V5(_) => &[],
        }
    }

    /// The raw bootstrap bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match &self.inner {
            Inner::V5(v) => v.bytes(),
            Inner::V6(v) => v.bytes(),
        }
    }

    /// The root directory.
    pub fn root(&self) -> InodeId {
        self.summary().root
    }

    /// The blob table.
    pub fn blobs(&self) -> &[BlobInfo] {
        match &self.inner {
            Inner::V5(v) => v.blobs(),
            Inner::V6(v) => v.blobs(),
        }
    }

    /// The blob with table index `index`.
    pub fn blob(&self, index: u32) -> Result<&BlobInfo> {
        self.blobs().get(index as usize).ok_or(Error::invalid(
            "blob index",
            index.into(),
            "no such blob",
        ))
    }

    /// The prefetch table: v6 nids (usable as [`InodeId`]s), v5 inode numbers.
    pub fn prefetch_table(&self) -> &[u64] {
        match &self.inner {
            Inner::V5(v) => v.prefetch(),
            Inner::V6(v) => v.prefetch(),
        }
    }

    /// Resolve an absolute or root-relative path (no symlinks are followed; `..` is refused).
    pub fn lookup(&self, path: impl AsRef<Path>) -> Result<InodeId> {
        let path = path.as_ref();
        let not_found = || Error::NotFound {
            path: path.display().to_string(),
        };
        let mut cur = self.root();
        for comp in path.components() {
            match comp {
                Component::RootDir | Component::CurDir => {}
                Component::Normal(name) => {
                    let name = name.as_bytes();
                    cur = self
                        .readdir(cur)?
                        .into_iter()
                        .find(|e| e.name == name)
                        .ok_or_else(not_found)?
                        .inode;
                }
                Component::ParentDir | Component::Prefix(_) => return Err(not_found()),
            }
        }
        Ok(cur)
    }

    /// Attributes of an inode.
    pub fn getattr(&self, ino: InodeId) -> Result<Attr> {
        match &self.inner {
            Inner::V5(v) => v.getattr(ino),
            Inner::V6(v) => v.getattr(ino),
        }
    }

    /// Entries of a directory, without `.` and `..`.
    pub fn readdir(&self, ino: InodeId) -> Result<Vec<DirEntry>> {
        match &self.inner {
            Inner::V5(v) => v.readdir(ino),
            Inner::V6(v) => v.readdir(ino),
        }
    }

    /// Target of a symlink.
    pub fn readlink(&self, ino: InodeId) -> Result<Vec<u8>> {
        match &self.inner {
            Inner::V5(v) => v.readlink(ino),
            Inner::V6(v) => v.readlink(ino),
        }
    }

    /// Extended attributes of an inode.
    pub fn xattrs(&self, ino: InodeId) -> Result<Vec<Xattr>> {
        match &self.inner {
            Inner::V5(v) => v.xattrs(ino),
            Inner::V6(v) => v.xattrs(ino),
        }
    }

    /// The chunks holding bytes `[offset, offset + len)` of a regular file, in file order.
    /// Ranges not covered by any chunk (holes) read as zeros.
    pub fn file_chunks(&self, ino: InodeId, offset: u64, len: u64) -> Result<Vec<ChunkRef>> {
        match &self.inner {
            Inner::V5(v) => v.file_chunks(ino, offset, len),
            Inner::V6(v) => v.file_chunks(ino, offset, len),
        }
    }

    /// Every distinct chunk of blob `blob_index` the bootstrap knows (v6: the chunk table;
    /// v5: gathered from all files). File offsets are meaningless here.
    pub fn blob_chunks(&self, blob_index: u32) -> Result<Vec<ChunkRef>> {
        match &self.inner {
            Inner::V6(v) => Ok(v.blob_chunks(blob_index)),
            Inner::V5(_) => {
                let mut seen = std::collections::BTreeMap::new();
                crate::walk::walk(self, |entry| {
                    if entry.attr.file_type == crate::FileType::File {
                        for c in self.file_chunks(entry.inode, 0, u64::MAX)? {
                            if c.blob_index == blob_index {
                                seen.entry((c.compressed_offset, c.compressed_size))
                                    .or_insert(c);
                            }
                        }
                    }
                    Ok(())
                })?;
                Ok(seen.into_values().collect())
            }
        }
    }
}
