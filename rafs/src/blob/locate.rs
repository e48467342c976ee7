//! Where the chunks of batch blobs lie: nydus-image (`--batch-size`) packs small chunks into
//! compressed batches and records them in the bootstrap with no stored location at all; only the
//! data blob's compression-info (CI) table says which batch holds a chunk and where in it. A
//! bootstrap keeps, per blob, the CI table attached to it (read from the data blob by whoever has
//! the blob) and places batched chunks through it.
//!
//! Invariants: a table is attached only after every chunk the bootstrap lists for the blob was
//! found in it at the same uncompressed offset and size, and every chunk stored on its own at the
//! same stored range as the bootstrap says; a table, once attached, never changes (so chunk
//! references handed out earlier stay valid). The CI table comes from the data blob, not the
//! bootstrap, so it is trusted for nothing but where to look: every chunk read through it is
//! still verified against the bootstrap's digest.

use std::sync::{Arc, OnceLock};

use crate::blob::meta::{BlobMeta, CiEntry};
use crate::error::{Error, Result};
use crate::model::{BlobInfo, ChunkRef};

/// The CI tables attached to one bootstrap, by blob index.
pub(crate) struct Locations {
    tables: Vec<OnceLock<Arc<Vec<CiEntry>>>>,
}

impl Locations {
    /// No table attached yet, for `blobs` blobs.
    pub(crate) fn new(blobs: usize) -> Self {
        Locations {
            tables: (0..blobs).map(|_| OnceLock::new()).collect(),
        }
    }

    /// Whether blob `index` has its table attached.
    pub(crate) fn is_attached(&self, index: u32) -> bool {
        self.tables
            .get(index as usize)
            .is_some_and(|t| t.get().is_some())
    }

    /// Check `meta` against `chunks` (every chunk the bootstrap lists for `blob`, unlocated)
    /// and keep it. Attaching a blob's table twice keeps the first.
    pub(crate) fn attach(
        &self,
        blob: &BlobInfo,
        chunks: &[ChunkRef],
        meta: BlobMeta,
    ) -> Result<()> {
        let slot = self.tables.get(blob.index as usize).ok_or(Error::invalid(
            "blob index",
            blob.index.into(),
            "no such blob",
        ))?;
        for c in chunks {
            let e = meta.entries.get(c.ci_index as usize).ok_or(Error::invalid(
                "chunk index",
                c.ci_index.into(),
                "not in the blob's CI table",
            ))?;
            check_entry(c, e)?;
        }
        let _ = slot.set(Arc::new(meta.entries));
        Ok(())
    }

    /// `c` with its stored location from its blob's table, when that is attached and places
    /// it in a batch; otherwise `c` as the bootstrap has it.
    pub(crate) fn locate(&self, mut c: ChunkRef) -> Result<ChunkRef> {
        let Some(table) = self.tables.get(c.blob_index as usize).and_then(|t| t.get()) else {
            return Ok(c);
        };
        let e = table.get(c.ci_index as usize).ok_or(Error::invalid(
            "chunk index",
            c.ci_index.into(),
            "not in the blob's CI table",
        ))?;
        if e.batch.is_some() {
            c.compressed_offset = e.compressed_offset;
            c.compressed_size = e.compressed_size;
            c.compressed = e.compressed;
            c.batch = e.batch;
        }
        Ok(c)
    }
}

/// A bootstrap chunk and its CI entry must describe the same bytes: same place in the decoded
/// blob, and for a chunk stored on its own the same stored range.
fn check_entry(c: &ChunkRef, e: &CiEntry) -> Result<()> {
    if e.uncompressed_offset != c.uncompressed_offset || e.uncompressed_size != c.uncompressed_size
    {
        return Err(Error::invalid(
            "CI entry",
            c.ci_index.into(),
            "uncompressed offset or size differs from the bootstrap's chunk table",
        ));
    }
    if e.batch.is_none()
        && (e.compressed_offset != c.compressed_offset || e.compressed_size != c.compressed_size)
    {
        return Err(Error::invalid(
            "CI entry",
            c.ci_index.into(),
            "stored range differs from the bootstrap's chunk table",
        ));
    }
    Ok(())
}
