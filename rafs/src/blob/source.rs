//! Where chunk bytes come from: the [`ChunkSource`] trait and [`LocalBlobDir`], which reads data
//! blobs stored as `DIR/<blob id>` (or at a path given for one blob id).
//!
//! Invariants: a source returns only [`VerifiedChunk`]s; `LocalBlobDir` reads exactly the chunk's
//! compressed range (never more than 16 MiB) and only from files named by validated blob ids or
//! given by its caller; it keeps the last batch it decompressed (one, at most 16 MiB), so the
//! chunks of a batch read in a row decompress it once.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use crate::blob::decode::{decode_batch, decode_chunk, verify_in_batch, VerifiedChunk};
use crate::bootstrap::{Bootstrap, MAX_BOOTSTRAP_SIZE};
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
    /// Blobs at paths of their own (a blob whose file is not named by its id), by blob id.
    files: Vec<(String, PathBuf)>,
    /// The last batch decompressed.
    last_batch: Arc<Mutex<Option<LastBatch>>>,
}

/// A decompressed batch: blob id, stored offset, bytes.
type LastBatch = (String, u64, Arc<Vec<u8>>);

impl LocalBlobDir {
    /// Blobs under `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self::with_dirs([dir.into()])
    }

    /// Blobs under any of `dirs`, searched in order.
    pub fn with_dirs(dirs: impl IntoIterator<Item = PathBuf>) -> Self {
        LocalBlobDir {
            dirs: dirs.into_iter().collect(),
            files: Vec::new(),
            last_batch: Arc::default(),
        }
    }

    /// Also: blob `blob_id` is the file at `path` (found before the directories). For a data
    /// blob that carries the bootstrap, opened by its path.
    pub fn with_file(mut self, blob_id: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        self.files.push((blob_id.into(), path.into()));
        self
    }

    /// Attach the CI table of every batch blob of `b` that lacks it, read from the blob files
    /// (see [`crate::Bootstrap::load_blob_metas`]).
    pub fn load_blob_metas(&self, b: &Bootstrap) -> Result<()> {
        b.load_blob_metas(&mut |blob, offset, len| self.read_range(blob, offset, len))
    }

    /// Attach `blob`'s CI table to `b`, read from the blob's file.
    pub fn load_blob_meta(&self, b: &Bootstrap, blob: &BlobInfo) -> Result<()> {
        let (offset, len) = b.blob_meta_range(blob.index)?;
        b.attach_blob_meta(blob.index, &self.read_range(blob, offset, len)?)
    }

    /// `len` bytes at `offset` of `blob`'s file (at most 1 GiB): what
    /// [`crate::Bootstrap::load_blob_metas`] reads a CI table with.
    pub fn read_range(&self, blob: &BlobInfo, offset: u64, len: u64) -> Result<Vec<u8>> {
        let file = self.open_blob(blob)?;
        let path = self.blob_path(blob);
        let size = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        if offset.checked_add(len).is_none_or(|end| end > size) || len > MAX_BOOTSTRAP_SIZE {
            return Err(Error::OutOfBounds {
                what: "blob range",
                offset,
                len,
                limit: size,
            });
        }
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, offset)
            .map_err(|e| Error::io(&path, e))?;
        Ok(buf)
    }

    /// The directories searched.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Path of a blob's file: in the first directory that has it, else in the first directory.
    /// Blob ids are validated ASCII alphanumerics, so the path never leaves the directory.
    pub fn blob_path(&self, blob: &BlobInfo) -> PathBuf {
        if let Some((_, p)) = self.files.iter().find(|(id, _)| *id == blob.blob_id) {
            return p.clone();
        }
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
        if chunk.batch.is_some() {
            if let Some(batch) = self.cached_batch(blob, chunk) {
                return verify_in_batch(blob, chunk, &batch);
            }
        }
        let file = self.open_blob(blob)?;
        let mut buf = vec![0u8; chunk.compressed_size as usize];
        file.read_exact_at(&mut buf, chunk.compressed_offset)
            .map_err(|e| Error::io(self.blob_path(blob), e))?;
        if chunk.batch.is_none() {
            return decode_chunk(blob, chunk, &buf);
        }
        let batch = Arc::new(decode_batch(blob, chunk, &buf)?);
        let verified = verify_in_batch(blob, chunk, &batch)?;
        // Kept only once a chunk of it verified.
        *self
            .last_batch
            .lock()
            .unwrap_or_else(PoisonError::into_inner) =
            Some((blob.blob_id.clone(), chunk.compressed_offset, batch));
        Ok(verified)
    }
}

impl LocalBlobDir {
    fn cached_batch(&self, blob: &BlobInfo, chunk: &ChunkRef) -> Option<Arc<Vec<u8>>> {
        let last = self
            .last_batch
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (id, offset, bytes) = last.as_ref()?;
        (*id == blob.blob_id && *offset == chunk.compressed_offset).then(|| bytes.clone())
    }
}
