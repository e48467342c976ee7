//! The format-independent view of an image that v5 and v6 parsers both produce.
//!
//! Invariants: names in [`DirEntry`] never contain `/` or NUL and are never empty, `.` or `..`
//! (the parsers reject such entries); a [`ChunkRef`]'s sizes (and its batch's) are at most
//! [`MAX_CHUNK_SIZE`], and a batched chunk lies inside its decompressed batch.

use serde::Serialize;

/// Largest chunk nydus allows (16 MiB); bounds every per-chunk allocation.
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;

/// Handle of an inode inside one bootstrap: the EROFS nid (v6) or the inode-table index (v5).
pub type InodeId = u64;

/// Which RAFS on-disk format a bootstrap uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum RafsVersion {
    V5,
    V6,
}

/// Chunk compression algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Compressor {
    None,
    Lz4Block,
    Gzip,
    Zstd,
}

impl Compressor {
    /// The nydus name of the algorithm (`none`, `lz4_block`, `gzip`, `zstd`).
    pub fn name(self) -> &'static str {
        match self {
            Compressor::None => "none",
            Compressor::Lz4Block => "lz4_block",
            Compressor::Gzip => "gzip",
            Compressor::Zstd => "zstd",
        }
    }

    /// From the blob-table / CI enum (0 none, 1 lz4_block, 2 gzip, 3 zstd).
    pub(crate) fn from_enum(v: u32) -> Option<Self> {
        Some(match v {
            0 => Compressor::None,
            1 => Compressor::Lz4Block,
            2 => Compressor::Gzip,
            3 => Compressor::Zstd,
            _ => return None,
        })
    }
}

/// Chunk digest algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Digester {
    Blake3,
    Sha256,
}

impl Digester {
    /// The nydus name of the algorithm.
    pub fn name(self) -> &'static str {
        match self {
            Digester::Blake3 => "blake3",
            Digester::Sha256 => "sha256",
        }
    }

    /// Digest of `data` with this algorithm.
    pub fn digest(self, data: &[u8]) -> [u8; 32] {
        match self {
            Digester::Blake3 => *blake3::hash(data).as_bytes(),
            Digester::Sha256 => {
                use sha2::Digest as _;
                sha2::Sha256::digest(data).into()
            }
        }
    }
}

/// Where the compression-info table ("blob.meta") of a v6 blob lives inside the data blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlobMetaInfo {
    pub compressor: Compressor,
    pub offset: u64,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
}

/// One entry of the blob table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlobInfo {
    /// Position in the blob table; chunk references use it.
    pub index: u32,
    /// The blob id: the hex sha256 digest the registry knows the blob under.
    pub blob_id: String,
    pub chunk_size: u32,
    pub chunk_count: u32,
    pub compressor: Compressor,
    pub digester: Digester,
    /// Raw `BlobFeatures` bits (0 for v5).
    pub features: u32,
    /// Size of the blob's data as recorded (v6: the whole blob file).
    pub compressed_size: u64,
    /// Size of the decoded (`.blob.data`) form.
    pub uncompressed_size: u64,
    /// The CI table location (v6 only, when present).
    pub meta: Option<BlobMetaInfo>,
    /// Bytes of TOC entries plus their tar header at the blob's end (0: none).
    pub toc_size: u32,
    /// sha256 over the TOC entries and their tar header.
    #[serde(serialize_with = "ser_hex")]
    pub toc_digest: [u8; 32],
}

impl BlobInfo {
    /// Blob feature bit: uncompressed chunks are 4 KiB aligned.
    pub const FEATURE_ALIGNED: u32 = 0x1;
    /// Blob feature bit: the blob carries its own bootstrap (`image.boot` at its tail).
    pub const FEATURE_INLINED_FS_META: u32 = 0x2;
    /// Blob feature bit: CI v2 entries.
    pub const FEATURE_CHUNK_INFO_V2: u32 = 0x4;
    /// Blob feature bit: data and metadata live in separate blobs (zran, tar-ref).
    pub const FEATURE_SEPARATE: u32 = 0x10;
    /// Blob feature bit: chunk digest array inside the data blob.
    pub const FEATURE_INLINED_CHUNK_DIGEST: u32 = 0x20;
    /// Blob feature bit: small chunks are packed into compressed batches, whose locations only
    /// the blob's CI table knows (`nydus-image --batch-size`).
    pub const FEATURE_BATCH: u32 = 0x80;
    /// Blob feature bit: sections carry tar headers.
    pub const FEATURE_HAS_TAR_HEADER: u32 = 0x1000_0000;
    /// Blob feature bit: the blob ends with a TOC.
    pub const FEATURE_HAS_TOC: u32 = 0x2000_0000;
}

/// The kind of an inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileType {
    File,
    Dir,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
}

impl FileType {
    /// From the `S_IFMT` bits of a mode.
    pub fn from_mode(mode: u32) -> Option<Self> {
        Some(match mode & 0o170000 {
            0o100000 => FileType::File,
            0o040000 => FileType::Dir,
            0o120000 => FileType::Symlink,
            0o020000 => FileType::CharDevice,
            0o060000 => FileType::BlockDevice,
            0o010000 => FileType::Fifo,
            0o140000 => FileType::Socket,
            _ => return None,
        })
    }
}

/// Attributes of an inode (`stat`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Attr {
    /// Inode number: equal for all names of a hardlinked file.
    pub ino: u64,
    pub file_type: FileType,
    /// Full `st_mode` (type and permission bits incl. setuid/setgid/sticky).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: u64,
    pub mtime_nsec: u32,
    pub nlink: u32,
    /// Device number in the Linux `new_encode_dev` form (0 unless a device node).
    pub rdev: u32,
}

impl Attr {
    /// Permission bits incl. setuid/setgid/sticky.
    pub fn permissions(&self) -> u32 {
        self.mode & 0o7777
    }

    /// Device major number.
    pub fn rdev_major(&self) -> u32 {
        (self.rdev >> 8) & 0xfff
    }

    /// Device minor number.
    pub fn rdev_minor(&self) -> u32 {
        (self.rdev & 0xff) | ((self.rdev >> 12) & 0xfff00)
    }
}

/// A directory entry (never `.` or `..`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub inode: InodeId,
    pub file_type: FileType,
}

/// An extended attribute with its full name (prefix included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Xattr {
    pub name: Vec<u8>,
    pub value: Vec<u8>,
}

/// One chunk of a file's data and where to find it: the chunk's stored bytes are always the
/// blob range `compressed_offset .. compressed_offset + compressed_size`, and
/// [`crate::decode_chunk`] turns exactly that range into the chunk's verified bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChunkRef {
    /// Index into [`crate::Bootstrap::blobs`].
    pub blob_index: u32,
    /// Index of the chunk in its blob's chunk table.
    pub ci_index: u32,
    /// Digest of the uncompressed bytes.
    #[serde(serialize_with = "ser_hex")]
    pub digest: [u8; 32],
    /// Whether the stored bytes are compressed (else stored raw).
    pub compressed: bool,
    pub compressed_offset: u64,
    pub compressed_size: u32,
    /// Offset in the decoded blob (4 KiB aligned in v6).
    pub uncompressed_offset: u64,
    pub uncompressed_size: u32,
    /// Offset of the chunk's first byte in the file.
    pub file_offset: u64,
    /// Set for a chunk packed with other small chunks into one compressed batch
    /// (`nydus-image --batch-size`): the compressed range and `compressed` then describe the
    /// whole batch, and the chunk is a slice of the decompressed batch.
    pub batch: Option<BatchRef>,
}

impl ChunkRef {
    /// Whether the chunk's stored bytes are known. A chunk of a batch blob read from the
    /// bootstrap alone is not (nydus-image records batched chunks there with a zero compressed
    /// size; only the blob's CI table places them): see [`crate::Bootstrap::attach_blob_meta`].
    /// Its digest, size and uncompressed offset are known either way.
    pub fn is_located(&self) -> bool {
        self.compressed_size != 0
    }
}

/// Where a batched chunk lies inside its batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct BatchRef {
    /// Index of the batch in the blob's batch table.
    pub index: u32,
    /// Offset of the chunk's first byte in the decompressed batch.
    pub offset: u32,
    /// Size of the whole decompressed batch (at most [`MAX_CHUNK_SIZE`]).
    pub uncompressed_size: u32,
}

pub(crate) fn ser_hex<S: serde::Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(v))
}
