//! The public entry point to an image: [`Bootstrap`] opens a v5 or v6 bootstrap — a bootstrap
//! file, or a data blob carrying its bootstrap at its tail (`nydus-image --blob-inline-meta`) —
//! and answers filesystem questions (lookup, getattr, readdir, readlink, xattrs, file chunks).
//! Chunks of batch blobs are placed through the blob's CI table once it is attached
//! ([`Bootstrap::attach_blob_meta`]).
//!
//! Invariants: a `Bootstrap` holds the whole bootstrap in memory (at most
//! [`MAX_BOOTSTRAP_SIZE`]); every method validates what it reads, so any [`InodeId`] — even a
//! made-up one — yields a value or an error, never a panic. An inlined bootstrap's placeholder
//! blob id is replaced by the id of the blob that carries it before anything reads it.

use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use serde::Serialize;

use crate::blob::locate::Locations;
use crate::blob::meta::{blob_meta_range, decode_blob_meta};
use crate::error::{Error, Result};
use crate::model::{
    Attr, BlobInfo, ChunkRef, Compressor, Digester, DirEntry, InodeId, RafsVersion, Xattr,
};
use crate::raw::{u32_at, u64_at};
use crate::v5::{V5SuperInfo, V5, V5_MAGIC};
use crate::v6::{DeviceSlot, SuperInfo, V6};

/// Bootstraps larger than this are refused (they would be held in memory).
pub const MAX_BOOTSTRAP_SIZE: u64 = 1 << 30;

/// Reads `len` bytes at `offset` of a data blob.
pub type ReadBlob<'a> = dyn FnMut(&BlobInfo, u64, u64) -> Result<Vec<u8>> + 'a;

/// An opened RAFS bootstrap (v5 or v6).
pub struct Bootstrap {
    inner: Inner,
    /// CI tables attached to batch blobs.
    locations: Locations,
    /// Set when the bootstrap came out of a data blob's tail.
    inlined: Option<InlinedIn>,
}

/// The data blob an inlined bootstrap came from (`nydus-image --blob-inline-meta`); that blob
/// is also one of the image's data blobs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InlinedIn {
    /// The blob's id (its sha256, the registry digest), written over the builder's placeholder.
    pub blob_id: String,
    /// The whole blob's size (the blob table records only the size of its data).
    pub blob_size: u64,
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
    /// Open the bootstrap file at `path`, or the bootstrap inlined at the tail of the data blob
    /// at `path` (what nydusd's `--bootstrap <blob>` takes). The blob's id is its file name
    /// without extensions when that is a 64-digit hex digest (as nydusd takes it), else the
    /// file's sha256.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        Self::open_file(&file, path)
    }

    /// [`Bootstrap::open`] of a file already open (by a caller that checked what it opened);
    /// `path` names it in errors and gives an inlined bootstrap's blob id.
    pub fn open_file(file: &std::fs::File, path: &Path) -> Result<Self> {
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let read_at = &mut |off: u64, n: u64| read_range(file, path, len, off, n);
        let mut first_error = None;
        if len <= MAX_BOOTSTRAP_SIZE && looks_like_rafs(read_at, len)? {
            match Self::from_bytes(read_at(0, len)?) {
                Ok(b) => return Ok(b),
                Err(e) => first_error = Some(e),
            }
        }
        let tail = crate::blob::tail::parse_tail_with(len, read_at)?;
        if tail.sections.iter().any(|s| s.name == "image.boot") {
            let id = blob_id_of_path(path, file, len)?;
            return Self::from_blob_tail(len, read_at, &id)?.ok_or(Error::NotRafs {
                reason: "no inlined bootstrap (image.boot) at the blob's end",
            });
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        if len > MAX_BOOTSTRAP_SIZE {
            return Err(Error::LimitExceeded {
                what: "bootstrap size",
                limit: MAX_BOOTSTRAP_SIZE,
            });
        }
        match Self::from_bytes(read_at(0, len)?) {
            Err(Error::NotRafs { .. }) => Err(Error::NotRafs {
                reason:
                    "no RAFS v5/v6 superblock, and no inlined bootstrap (image.boot) at its end",
            }),
            other => other,
        }
    }

    /// Open the bootstrap a data blob of `size` bytes carries at its tail
    /// (`nydus-image --blob-inline-meta`), reading the blob with `read_at(offset, len)`.
    /// `blob_id` is that blob's id (its sha256), which replaces the placeholder the builder
    /// writes for the blob itself (every blob table entry with the inlined-meta feature).
    /// `Ok(None)` when the blob carries no bootstrap.
    pub fn from_blob_tail(
        size: u64,
        read_at: &mut dyn FnMut(u64, u64) -> Result<Vec<u8>>,
        blob_id: &str,
    ) -> Result<Option<Self>> {
        let Some(mut bytes) = crate::blob::tail::read_inlined_bootstrap(size, read_at)? else {
            return Ok(None);
        };
        if !is_blob_id(blob_id) {
            return Err(Error::invalid(
                "blob id",
                blob_id.len() as u64,
                "not a 64-digit lowercase hex digest",
            ));
        }
        let plain = Self::from_bytes(bytes.clone())?;
        if plain.version() != RafsVersion::V6 {
            return Err(Error::Unsupported {
                what: "inlined bootstrap that is not RAFS v6",
                value: 5,
            });
        }
        let table = u64_at(&bytes, 1152 + 8);
        for blob in plain.blobs() {
            if blob.features & BlobInfo::FEATURE_INLINED_FS_META == 0 {
                continue;
            }
            // Both lie inside the bootstrap: `from_bytes` checked the tables.
            let entry = table + 256 * u64::from(blob.index);
            let slot = 1408 + 128 * u64::from(blob.index);
            for at in [entry, slot] {
                let field = usize::try_from(at)
                    .ok()
                    .and_then(|at| bytes.get_mut(at..at + 64))
                    .ok_or(Error::invalid(
                        "blob table offset",
                        at,
                        "outside the bootstrap",
                    ))?;
                field.copy_from_slice(blob_id.as_bytes());
            }
        }
        let mut b = Self::from_bytes(bytes)?;
        b.inlined = Some(InlinedIn {
            blob_id: blob_id.to_owned(),
            blob_size: size,
        });
        Ok(Some(b))
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
        let inner = if bytes.len() >= 8 && u32_at(&bytes, 0) == V5_MAGIC {
            Inner::V5(V5::open(bytes)?)
        } else if bytes.len() < 4096 {
            return Err(Error::NotRafs {
                reason: "shorter than one 4 KiB block",
            });
        } else {
            Inner::V6(V6::open(bytes)?)
        };
        let blobs = match &inner {
            Inner::V5(v) => v.blobs().len(),
            Inner::V6(v) => v.blobs().len(),
        };
        Ok(Bootstrap {
            inner,
            locations: Locations::new(blobs),
            inlined: None,
        })
    }

    /// The data blob this bootstrap was read from, when it was inlined in one.
    pub fn inlined_in(&self) -> Option<&InlinedIn> {
        self.inlined.as_ref()
    }

    /// Blobs whose chunks are packed into batches (`nydus-image --batch-size`) and whose CI
    /// table is not attached yet: their batched chunks are not located
    /// ([`ChunkRef::is_located`]) until it is.
    pub fn blobs_needing_meta(&self) -> Vec<&BlobInfo> {
        self.blobs()
            .iter()
            .filter(|b| {
                b.features & BlobInfo::FEATURE_BATCH != 0 && !self.locations.is_attached(b.index)
            })
            .collect()
    }

    /// The byte range `(offset, len)` of blob `index` that holds its CI table and header: what
    /// [`Bootstrap::attach_blob_meta`] takes. Its length is bounded by the blob's chunk count.
    pub fn blob_meta_range(&self, index: u32) -> Result<(u64, u64)> {
        blob_meta_range(self.blob(index)?)
    }

    /// Attach blob `index`'s CI table, `region` being the bytes at [`Bootstrap::blob_meta_range`]
    /// of its data blob: chunks of it are then placed through the table (every batched chunk
    /// gets its batch's stored range). The table must agree with the bootstrap's chunk table.
    /// Attaching a blob's table again keeps the first.
    pub fn attach_blob_meta(&self, index: u32, region: &[u8]) -> Result<()> {
        let blob = self.blob(index)?;
        let meta = decode_blob_meta(blob, region)?;
        let chunks = self.raw_blob_chunks(index)?;
        self.locations.attach(blob, &chunks, meta)
    }

    /// Attach the CI table of every blob that needs one ([`Bootstrap::blobs_needing_meta`]),
    /// reading it with `read(blob, offset, len)`.
    pub fn load_blob_metas(&self, read: &mut ReadBlob<'_>) -> Result<()> {
        for blob in self.blobs_needing_meta() {
            let (offset, len) = blob_meta_range(blob)?;
            let region = read(blob, offset, len)?;
            self.attach_blob_meta(blob.index, &region)?;
        }
        Ok(())
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
        let chunks = match &self.inner {
            Inner::V5(v) => v.file_chunks(ino, offset, len)?,
            Inner::V6(v) => v.file_chunks(ino, offset, len)?,
        };
        self.locate_all(chunks)
    }

    /// Chunk `ci_index` of blob `blob_index` (v6; its file offset is 0).
    pub fn chunk(&self, blob_index: u32, ci_index: u32) -> Result<ChunkRef> {
        let c = match &self.inner {
            Inner::V6(v) => v.chunk(blob_index, ci_index),
            Inner::V5(_) => None,
        };
        let c = c.ok_or(Error::invalid(
            "chunk index",
            ci_index.into(),
            "not in the blob's chunk table",
        ))?;
        self.locations.locate(c)
    }

    fn locate_all(&self, chunks: Vec<ChunkRef>) -> Result<Vec<ChunkRef>> {
        chunks
            .into_iter()
            .map(|c| self.locations.locate(c))
            .collect()
    }

    /// Every distinct chunk of blob `blob_index` the bootstrap knows (v6: the chunk table;
    /// v5: gathered from all files). File offsets are meaningless here.
    pub fn blob_chunks(&self, blob_index: u32) -> Result<Vec<ChunkRef>> {
        let chunks = self.raw_blob_chunks(blob_index)?;
        self.locate_all(chunks)
    }

    /// [`Bootstrap::blob_chunks`] as the bootstrap alone has them.
    fn raw_blob_chunks(&self, blob_index: u32) -> Result<Vec<ChunkRef>> {
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

/// Whether the first bytes are those of a RAFS bootstrap (v5 magic at 0, EROFS magic at 1024).
fn looks_like_rafs(read_at: &mut dyn FnMut(u64, u64) -> Result<Vec<u8>>, len: u64) -> Result<bool> {
    if len >= 4 && u32_at(&read_at(0, 4)?, 0) == V5_MAGIC {
        return Ok(true);
    }
    Ok(len >= 4096 && u32_at(&read_at(1024, 4)?, 0) == crate::v6::superblock::EROFS_MAGIC)
}

/// Exactly `n` bytes at `off` of a file of `len` bytes (refusing more than a bootstrap may be).
fn read_range(file: &std::fs::File, path: &Path, len: u64, off: u64, n: u64) -> Result<Vec<u8>> {
    use std::os::unix::fs::FileExt as _;
    if off.checked_add(n).is_none_or(|end| end > len) || n > MAX_BOOTSTRAP_SIZE {
        return Err(Error::OutOfBounds {
            what: "file range",
            offset: off,
            len: n,
            limit: len,
        });
    }
    let mut buf = vec![0u8; n as usize];
    file.read_exact_at(&mut buf, off)
        .map_err(|e| Error::io(path, e))?;
    Ok(buf)
}

/// A data blob file's id: its name without extensions when that is a digest, else its sha256.
fn blob_id_of_path(path: &Path, file: &std::fs::File, len: u64) -> Result<String> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name.split('.').next().unwrap_or_default();
    if is_blob_id(stem) {
        return Ok(stem.to_owned());
    }
    use sha2::Digest as _;
    use std::os::unix::fs::FileExt as _;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        let chunk = buf.get_mut(..n).unwrap_or_default();
        file.read_exact_at(chunk, off)
            .map_err(|e| Error::io(path, e))?;
        h.update(&*chunk);
        off += n as u64;
    }
    Ok(hex::encode(h.finalize()))
}

/// A blob id as registries name blobs: 64 lowercase hex digits.
fn is_blob_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}
