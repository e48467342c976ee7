//! Chunk dictionaries: chunks of another image (its bootstrap) that a new layer references
//! instead of storing again, across images as nydus-image `--chunk-dict` does.
//!
//! Invariants: a dictionary chunk is used only when digest *and* size match and the digester is
//! the builder's, and only when it is stored on its own (never one packed in a batch); the dictionary blobs a layer uses are appended to its blob table after its own
//! blob (index 0), in order of first use, with their full chunk tables.

use std::collections::HashMap;

use crate::bootstrap::Bootstrap;
use crate::build::BuildError;
use crate::model::{BlobInfo, ChunkRef, Digester, RafsVersion};

pub(crate) struct ChunkDict {
    map: HashMap<([u8; 32], u32), ChunkRef>,
    blobs: Vec<BlobInfo>,
    chunks: Vec<Vec<ChunkRef>>,
    /// Dictionary blob position → index in the output blob table.
    used: HashMap<u32, u32>,
    pub(crate) hits: u64,
}

impl ChunkDict {
    pub(crate) fn load(b: &Bootstrap, digester: Digester) -> Result<Self, BuildError> {
        if b.version() != RafsVersion::V6 {
            return Err(BuildError::Unsupported(
                "a RAFS v5 bootstrap as chunk dictionary",
            ));
        }
        let mut map = HashMap::new();
        let mut chunks = Vec::new();
        for blob in b.blobs() {
            if blob.digester != digester {
                return Err(BuildError::Unsupported(
                    "a chunk dictionary with another digester",
                ));
            }
            let list = b.blob_chunks(blob.index)?;
            // A chunk packed in a batch (placed only by its blob's CI table) is not reused.
            for c in list.iter().filter(|c| c.is_located() && c.batch.is_none()) {
                map.entry((c.digest, c.uncompressed_size))
                    .or_insert_with(|| c.clone());
            }
            chunks.push(list);
        }
        Ok(ChunkDict {
            map,
            blobs: b.blobs().to_vec(),
            chunks,
            used: HashMap::new(),
            hits: 0,
        })
    }

    /// The dictionary's copy of a chunk, as a reference of the layer being built.
    pub(crate) fn lookup(
        &mut self,
        digest: [u8; 32],
        size: u32,
        file_offset: u64,
    ) -> Option<ChunkRef> {
        let mut c = self.map.get(&(digest, size))?.clone();
        let next = self.used.len() as u32 + 1;
        c.blob_index = *self.used.entry(c.blob_index).or_insert(next);
        c.file_offset = file_offset;
        self.hits += 1;
        Some(c)
    }

    /// The dictionary blobs used (output indexes 1..) and all their chunks, remapped.
    pub(crate) fn used_blobs(&self) -> (Vec<BlobInfo>, Vec<ChunkRef>) {
        let mut order: Vec<(u32, u32)> = self.used.iter().map(|(&d, &o)| (o, d)).collect();
        order.sort_unstable();
        let mut blobs = Vec::new();
        let mut chunks = Vec::new();
        for (out, dict) in order {
            if let Some(b) = self.blobs.get(dict as usize) {
                let mut b = b.clone();
                b.index = out;
                blobs.push(b);
            }
            for c in self.chunks.get(dict as usize).into_iter().flatten() {
                let mut c = c.clone();
                c.blob_index = out;
                chunks.push(c);
            }
        }
        (blobs, chunks)
    }
}
