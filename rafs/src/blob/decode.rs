//! Turn a chunk's stored bytes into its verified uncompressed bytes: a chunk stored on its own,
//! or a chunk packed with others into a batch (`nydus-image --batch-size`), whose stored bytes
//! are the whole batch's and whose bytes are a slice of the decompressed batch.
//!
//! Invariants: output is allocated from the chunk's (or its batch's) recorded uncompressed size,
//! which the parsers cap at 16 MiB, never from anything inside the compressed stream; a slice of
//! a batch is taken only inside the decompressed batch; a [`VerifiedChunk`] exists only for bytes
//! whose digest matched the bootstrap.

use std::ops::Deref;

use crate::error::{Error, Result};
use crate::model::{BlobInfo, ChunkRef, Compressor, MAX_CHUNK_SIZE};

/// Uncompressed chunk bytes whose digest matched the bootstrap's chunk digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedChunk(Vec<u8>);

impl VerifiedChunk {
    /// Bytes this process verified earlier and kept where only it writes (a mount's decoded
    /// files), under the same chunk's key.
    pub(crate) fn kept(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// The verified bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Take the verified bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

impl Deref for VerifiedChunk {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

/// Decompress `stored` (exactly the chunk's compressed bytes: for a batched chunk, its whole
/// batch's) and verify its digest.
pub fn decode_chunk(blob: &BlobInfo, chunk: &ChunkRef, stored: &[u8]) -> Result<VerifiedChunk> {
    if chunk.batch.is_some() {
        let batch = decode_batch(blob, chunk, stored)?;
        return verify_in_batch(blob, chunk, &batch);
    }
    let data = decompress_stored(blob, chunk, stored, chunk.uncompressed_size)?;
    verify_decoded(blob, chunk, data)
}

/// The decompressed batch a batched chunk lies in, from `stored` (exactly the batch's stored
/// bytes, the chunk's compressed range). Not verified: [`verify_in_batch`] checks each chunk
/// cut from it, so a caller may decode a batch once for all its chunks.
pub fn decode_batch(blob: &BlobInfo, chunk: &ChunkRef, stored: &[u8]) -> Result<Vec<u8>> {
    let Some(b) = chunk.batch else {
        return Err(decode_error(blob, chunk, "not a batched chunk".into()));
    };
    decompress_stored(blob, chunk, stored, b.uncompressed_size)
}

/// Cut a batched chunk out of its decompressed `batch` and verify it.
pub fn verify_in_batch(blob: &BlobInfo, chunk: &ChunkRef, batch: &[u8]) -> Result<VerifiedChunk> {
    let Some(b) = chunk.batch else {
        return Err(decode_error(blob, chunk, "not a batched chunk".into()));
    };
    if batch.len() != b.uncompressed_size as usize {
        return Err(decode_error(
            blob,
            chunk,
            format!(
                "batch of {} bytes, expected {}",
                batch.len(),
                b.uncompressed_size
            ),
        ));
    }
    let start = b.offset as usize;
    let Some(data) = start
        .checked_add(chunk.uncompressed_size as usize)
        .and_then(|end| batch.get(start..end))
    else {
        return Err(decode_error(
            blob,
            chunk,
            format!(
                "chunk at {} (+{}) lies outside its {}-byte batch",
                b.offset, chunk.uncompressed_size, b.uncompressed_size
            ),
        ));
    };
    verify_decoded(blob, chunk, data.to_vec())
}

fn decode_error(blob: &BlobInfo, chunk: &ChunkRef, reason: String) -> Error {
    Error::Decode {
        blob_id: blob.blob_id.clone(),
        ci_index: chunk.ci_index,
        compressor: blob.compressor.name(),
        reason,
    }
}

/// `stored` (the chunk's compressed range) decompressed to exactly `size` bytes. A batch is
/// compressed when its stored size differs from its size (nydus-image keeps the flag set on
/// every batched chunk, and stores a batch raw when compression does not shrink it).
fn decompress_stored(
    blob: &BlobInfo,
    chunk: &ChunkRef,
    stored: &[u8],
    size: u32,
) -> Result<Vec<u8>> {
    let usize_ = size as usize;
    let fail = |reason: String| decode_error(blob, chunk, reason);
    if !chunk.is_located() {
        return Err(Error::Unlocated {
            blob_id: blob.blob_id.clone(),
            ci_index: chunk.ci_index,
        });
    }
    if size > MAX_CHUNK_SIZE {
        return Err(fail("uncompressed size above 16 MiB".into()));
    }
    if stored.len() != chunk.compressed_size as usize {
        return Err(fail(format!(
            "got {} stored bytes, expected {}",
            stored.len(),
            chunk.compressed_size
        )));
    }
    let compressed = match chunk.batch {
        Some(_) => chunk.compressed_size != size,
        None => chunk.compressed,
    };
    let data = if !compressed {
        stored.to_vec()
    } else {
        match blob.compressor {
            Compressor::None => {
                return Err(fail(
                    "chunk flagged compressed in an uncompressed blob".into(),
                ))
            }
            Compressor::Zstd => zstd_decompress(stored, usize_).map_err(|e| fail(e.to_string()))?,
            Compressor::Lz4Block => {
                lz4_flex::block::decompress(stored, usize_).map_err(|e| fail(e.to_string()))?
            }
            Compressor::Gzip => {
                return Err(fail(
                    "gzip chunks (zran/stargz images) are not supported".into(),
                ))
            }
        }
    };
    if data.len() != usize_ {
        return Err(fail(format!(
            "decoded {} bytes, expected {}",
            data.len(),
            usize_
        )));
    }
    Ok(data)
}

/// Verify already uncompressed bytes of `chunk` (a chunk decoded by another process, which
/// handed over only its bytes): its size and digest must be the bootstrap's.
pub fn verify_decoded(blob: &BlobInfo, chunk: &ChunkRef, data: Vec<u8>) -> Result<VerifiedChunk> {
    if data.len() != chunk.uncompressed_size as usize {
        return Err(Error::Decode {
            blob_id: blob.blob_id.clone(),
            ci_index: chunk.ci_index,
            compressor: blob.compressor.name(),
            reason: format!(
                "{} decoded bytes, expected {}",
                data.len(),
                chunk.uncompressed_size
            ),
        });
    }
    let actual = blob.digester.digest(&data);
    if actual != chunk.digest {
        return Err(Error::DigestMismatch {
            blob_id: blob.blob_id.clone(),
            ci_index: chunk.ci_index,
            expected: hex::encode(chunk.digest),
            actual: hex::encode(actual),
        });
    }
    Ok(VerifiedChunk(data))
}

/// zstd-decompresses `data` into at most `size` bytes with this thread's decompression context:
/// creating one costs more than decoding a small file's chunk, and every chunk of a lazy mount's
/// reads comes through here.
fn zstd_decompress(data: &[u8], size: usize) -> std::io::Result<Vec<u8>> {
    thread_local! {
        static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    DCTX.with(|cell| {
        let mut slot = cell.try_borrow_mut().map_err(std::io::Error::other)?;
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        match slot.as_mut() {
            Some(d) => d.decompress(data, size),
            None => zstd::bulk::decompress(data, size),
        }
    })
}

/// Decompress a whole buffer of known size (CI tables, inlined bootstraps).
pub(crate) fn decompress_exact(
    c: Compressor,
    data: &[u8],
    size: usize,
    what: &'static str,
) -> Result<Vec<u8>> {
    let bad = |reason: &'static str| Error::invalid(what, size as u64, reason);
    let out = match c {
        Compressor::None => data.to_vec(),
        Compressor::Zstd => {
            zstd_decompress(data, size).map_err(|_| bad("zstd data does not decode"))?
        }
        Compressor::Lz4Block => {
            lz4_flex::block::decompress(data, size).map_err(|_| bad("lz4 data does not decode"))?
        }
        Compressor::Gzip => return Err(bad("gzip is not supported here")),
    };
    if out.len() != size {
        return Err(bad("decoded size differs from the recorded size"));
    }
    Ok(out)
}
