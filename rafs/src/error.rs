//! The error type of the RAFS reader and blob decoder.
//!
//! Every failure names what was wrong with the input (which structure, which field, which value),
//! so a user looking at `shoal rafs check` output can find the bad bytes. Variants carry structured
//! fields; messages are built only by `Display`.

use std::path::PathBuf;

/// Result alias for the reader.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Something in a bootstrap or data blob is unreadable, malformed, unsupported or does not verify.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading a file failed.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The input is not a RAFS bootstrap at all.
    #[error("not a RAFS bootstrap: {reason}")]
    NotRafs { reason: &'static str },
    /// A nydus "v3" image (LPFOOTER / LPBLMETA), an incompatible format family.
    #[error("this is a nydus v3 image ({marker}), whose format is incompatible with RAFS v5/v6")]
    NydusV3 { marker: &'static str },
    /// A structure lies (partly) outside the bootstrap or blob.
    #[error("{what} at offset {offset} (+{len} bytes) lies outside the {limit}-byte input")]
    OutOfBounds {
        what: &'static str,
        offset: u64,
        len: u64,
        limit: u64,
    },
    /// A field holds a value the format does not allow.
    #[error("{what} has invalid value {value:#x}: {reason}")]
    InvalidField {
        what: &'static str,
        value: u64,
        reason: &'static str,
    },
    /// A feature this reader does not implement (tarfs, encryption, zran, gzip chunks, ...).
    #[error("unsupported {what}: {value:#x}")]
    Unsupported { what: &'static str, value: u64 },
    /// An inode is malformed.
    #[error("inode {ino}: {reason}")]
    BadInode { ino: u64, reason: &'static str },
    /// A directory block is malformed.
    #[error("directory inode {ino}, block {block}: {reason}")]
    BadDirent {
        ino: u64,
        block: u64,
        reason: &'static str,
    },
    /// An operation was applied to an inode of the wrong type.
    #[error("inode {ino} is not a {expected}")]
    WrongType { ino: u64, expected: &'static str },
    /// A path does not exist in the image.
    #[error("no such file or directory in the image: {path}")]
    NotFound { path: String },
    /// A file's chunk index points to a chunk the bootstrap does not describe.
    #[error("inode {ino}: chunk #{index} (blob {blob_index}, chunk {ci_index}) is not in the chunk table")]
    UnknownChunk {
        ino: u64,
        index: u64,
        blob_index: u32,
        ci_index: u32,
    },
    /// A chunk's data does not match its digest.
    #[error(
        "chunk {ci_index} of blob {blob_id}: digest mismatch (expected {expected}, got {actual})"
    )]
    DigestMismatch {
        blob_id: String,
        ci_index: u32,
        expected: String,
        actual: String,
    },
    /// A chunk did not decompress, or decompressed to the wrong size.
    #[error("chunk {ci_index} of blob {blob_id}: cannot decode {compressor} data: {reason}")]
    Decode {
        blob_id: String,
        ci_index: u32,
        compressor: &'static str,
        reason: String,
    },
    /// A batched chunk whose place in the data blob only the blob's CI table says, and that
    /// table was not attached to the bootstrap (see `Bootstrap::attach_blob_meta`).
    #[error(
        "chunk {ci_index} of blob {blob_id} is packed in a batch, and the blob's compression-info \
         table that locates it was not loaded"
    )]
    Unlocated { blob_id: String, ci_index: u32 },
    /// A data blob is not where the caller said blobs are.
    #[error("data blob {blob_id} not found at {path}")]
    BlobMissing { blob_id: String, path: PathBuf },
    /// A limit that protects against hostile input was hit.
    #[error("{what} exceeds the limit of {limit}")]
    LimitExceeded { what: &'static str, limit: u64 },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn invalid(what: &'static str, value: u64, reason: &'static str) -> Self {
        Error::InvalidField {
            what,
            value,
            reason,
        }
    }
}
