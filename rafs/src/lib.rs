//! Nydus RAFS on-disk format (reader, builder, merge) over a `ChunkSource`.
//!
//! Work in progress: see issue 3.
