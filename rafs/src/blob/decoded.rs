//! The decoded form of a data blob (`<blob id>.blob.data`): every chunk's uncompressed bytes at
//! its uncompressed offset, holes elsewhere. For v6 this is what kernel EROFS takes as a
//! `device=` file.
//!
//! Invariants: only verified chunks are written; no chunk is written past the blob's recorded
//! uncompressed size; the file has exactly that size (sparse where no chunk lies).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::blob::source::ChunkSource;
use crate::bootstrap::Bootstrap;
use crate::error::{Error, Result};

/// Write the decoded form of blob `blob_index` to `out_path`; returns the number of chunks written.
pub fn write_decoded_blob(
    b: &Bootstrap,
    blob_index: u32,
    source: &dyn ChunkSource,
    out_path: &Path,
) -> Result<u64> {
    let blob = b.blob(blob_index)?;
    let chunks = b.blob_chunks(blob_index)?;
    let mut size = blob.uncompressed_size;
    if size == 0 {
        // v5 images without an extended blob table do not record it.
        size = chunks
            .iter()
            .map(|c| {
                c.uncompressed_offset
                    .saturating_add(c.uncompressed_size.into())
            })
            .max()
            .unwrap_or(0);
    }
    let out = File::create(out_path).map_err(|e| Error::io(out_path, e))?;
    out.set_len(size).map_err(|e| Error::io(out_path, e))?;
    for c in &chunks {
        let end = c
            .uncompressed_offset
            .checked_add(c.uncompressed_size.into());
        if end.is_none_or(|e| e > size) {
            return Err(Error::invalid(
                "chunk uncompressed offset",
                c.uncompressed_offset,
                "past the decoded blob size",
            ));
        }
        let data = source.read_chunk(blob, c)?;
        write_at(&out, &data, c.uncompressed_offset, out_path)?;
    }
    out.sync_all().map_err(|e| Error::io(out_path, e))?;
    Ok(chunks.len() as u64)
}

fn write_at(f: &File, data: &[u8], offset: u64, path: &Path) -> Result<()> {
    f.write_all_at(data, offset).map_err(|e| Error::io(path, e))
}
