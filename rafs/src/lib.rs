//! Nydus RAFS on-disk format: a reader for v6 and v5 bootstraps, chunk decoding and
//! verification over a [`ChunkSource`], the blob tail/TOC and CI parsers, the decoded-blob writer,
//! the `inspect` / `check` / `unpack` tools built on them, the v6 builder and merge, the
//! read-only FUSE filesystem ([`fuse`]) and the kernel EROFS mount helper ([`erofs`]).
//!
//! Every parser here takes untrusted input: it returns an [`Error`] on anything malformed, never
//! panics, never loops without bound and never allocates from an unchecked length field.

mod blob;
mod bootstrap;
pub mod build;
pub mod erofs;
mod error;
pub mod fuse;
#[doc(hidden)]
pub mod fuzzing;
mod model;
mod raw;
pub mod tools;
mod v5;
mod v6;
mod walk;

pub use blob::decode::{
    decode_batch, decode_chunk, verify_decoded, verify_in_batch, VerifiedChunk,
};
pub use blob::decoded::write_decoded_blob;
pub use blob::meta::{
    decode_blob_meta, parse_ci_header, BatchContext, BlobMeta, CiEntry, CiHeader, CI_HEADER_SIZE,
};
pub use blob::source::{ChunkSource, LocalBlobDir};
pub use blob::tail::{
    extract_inlined_bootstrap, parse_blob_tail, parse_tail_with, parse_toc, read_inlined_bootstrap,
    BlobTail, TailSection, TocEntry,
};
pub use bootstrap::{Bootstrap, InlinedIn, ReadBlob, Summary, MAX_BOOTSTRAP_SIZE};
pub use error::{Error, Result};
pub use model::{
    Attr, BatchRef, BlobInfo, BlobMetaInfo, ChunkRef, Compressor, Digester, DirEntry, FileType,
    InodeId, RafsVersion, Xattr, MAX_CHUNK_SIZE,
};
pub use v5::V5SuperInfo;
pub use v6::{DeviceSlot, SuperInfo};
pub use walk::{walk, walk_tolerant, Visit, WalkEntry, MAX_DEPTH};
