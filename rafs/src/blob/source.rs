//! Where chunk bytes come from: the [`ChunkSource`] trait and [`LocalBlobDir`], which reads data
//! blobs stored as `DIR/<blob id>`.
//!
//! Invariants: a source returns only [`VerifiedChunk`]s; `LocalBlobDir` reads exactly the chunk's
//! compressed range (never more than 16 MiB) and only from files named by validated blob ids.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::blob::decode::{decode_chunk, VerifiedChunk};
use crate::error::{Error, Result};
use crate::model::{BlobInfo, ChunkRef, MAX_CHUNK_SIZE};

/// Something that can produce a chunk's verified, uncompressed bytes.
pub trait ChunkSource {
    /// Read, decompress and verify one chunk of `blob`.
    fn read_chunk(&self, blob: &BlobInfo, chunk: &ChunkRef) -> Result<VerifiedChunk>;
}

/// Data blobs in local directories, each in a file named by its blob id. With several
/// directories (a merged image whose layers' blobs live apart), the first one holding a blob wins.
#[derive(Debug, Clone)]
pub struct LocalBlobDir {
    dirs: Vec<PathBuf>,
}

impl LocalBlobDir {
    /// Blobs under `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        LocalBlobDir {
            dirs: vec![dir.into()],
        }
    }

    /// Blobs under any of `dirs`, searched in order.
    pub fn with_dirs(dirs: impl IntoIterator<Item = PathBuf>) -> Self {
        LocalBlobDir {
            dirs: dirs.into_iter().collect(),
        }
    }

    /// The directories searched.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Path of a blob's file: in the first directory that has it, else in the first directory.
    /// Blob ids are validated ASCII alphanumerics, so the path never leaves the directory.
    pub fn blob_path(&self, blob: &BlobInfo) -> PathBuf {
        let candidates = self.dirs.iter().map(|d| d.join(&blob.blob_id));
        let mut first = None;
        for p in candidates {
            if p.exists() {
                return p;
            }
            first.get_or_insert(p);
        }
        first.unwrap_or_else(|| Path::new(&blob.blob_id).to_path_buf())
    }

    /// Open a blob's file.
    pub fn open_blob(&self, blob: &BlobInfo) -> Result<File> {
        let path = self.blob_path(blob);
        File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::BlobMissing {
                blob_id: blob.blob_id.clone(),
                path: path.clone(),
            },
            _ => Error::io(&path, e),
        })
    }
}

impl ChunkSource for LocalBlobDir {
    fn read_chunk(&self, blob: &BlobInfo, chunk: &ChunkRef) -> Result<VerifiedChunk> {
        if chunk.blob_index != blob.index {
            return Err(Error::invalid(
                "chunk blob index",
                chunk.blob_index.into(),
                "differs from the blob read",
            ));
        }
        if chunk.compressed_size > MAX_CHUNK_SIZE {
            return Err(Error::invalid(
                "chunk compressed size",
                chunk.compressed_size.into(),
                "above 16 MiB",
            ));
        }
        let file = self.open_blob(blob)?;
        let mut buf = vec![0u8; chunk.compressed_size as usize];
        file.read_exact_at(&mut buf, chunk.compressed_offset)
            .map_err(|e| Error::io(self.blob_path(blob), e))?;
        decode_chunk(blob, chunk, &buf)
    }
}
