//! Data blobs: decoding and verifying chunks, reading them through a [`ChunkSource`], the blob
//! tail (reverse tar headers and TOC, and a bootstrap inlined there), the compression-info
//! table and the batch chunks it places, and the decoded (`.blob.data`) form the kernel mounts.

pub(crate) mod decode;
pub(crate) mod decoded;
pub(crate) mod locate;
pub(crate) mod meta;
pub(crate) mod source;
pub(crate) mod tail;
