//! `StoreError`: every way a store operation fails, with structured fields.
//! Callers branch on the variant (e.g. `Corrupt` → refetch, `NotPresent` →
//! wait for or fetch the range); nothing here is logged.

use std::io;
use std::path::PathBuf;

use shoal_proto::{BlobId, Digest};

use super::meta::DbError;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("store metadata database")]
    Db {
        #[from]
        source: DbError,
    },
    #[error("store metadata in table {table} is unreadable")]
    Decode {
        table: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("store config: {field} {problem}")]
    Config {
        field: &'static str,
        problem: &'static str,
    },
    #[error("blob {id}: piece {piece} does not match its recorded SHA-256; the blob was dropped")]
    Corrupt { id: BlobId, piece: u64 },
    #[error("blob {id}: byte {offset} is not present")]
    NotPresent { id: BlobId, offset: u64 },
    #[error("blob {id} is pinned")]
    Pinned { id: BlobId },
    #[error("blob {id} is already complete")]
    AlreadyComplete { id: BlobId },
    #[error("blob {id} already has a writer")]
    WriterBusy { id: BlobId },
    #[error("blob {id} is recorded with size {recorded}, not {requested}")]
    SizeMismatch {
        id: BlobId,
        recorded: u64,
        requested: u64,
    },
    #[error("blob {id} of {size} bytes is larger than the store accepts ({max})")]
    TooLarge { id: BlobId, size: u64, max: u64 },
    #[error("blob {id}: {len} bytes at {offset} are outside its {size} bytes")]
    OutOfBounds {
        id: BlobId,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("blob {id} still misses {missing} bytes")]
    Incomplete { id: BlobId, missing: u64 },
    #[error("blob {id} was given a verified digest of {verified}")]
    WrongDigest { id: BlobId, verified: Digest },
    #[error("blob {id} is not in the store")]
    NotFound { id: BlobId },
    #[error("blob {id} was dropped (corrupt, discarded or removed) while this handle was open")]
    Dropped { id: BlobId },
    #[error("manifest bytes do not hash to {digest}")]
    ManifestDigest { digest: Digest },
}

impl StoreError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> StoreError {
        let path = path.into();
        move |source| StoreError::Io { path, source }
    }
}
