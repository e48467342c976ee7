//! The lazy read path, independent of FUSE: a file byte range → the chunks covering it → each
//! chunk from the decoded-chunk cache or the [`ChunkSource`] → the requested slice.
//!
//! Invariants: the returned buffer is exactly `min(size, file size - offset)` bytes (empty at or
//! past the end); bytes come only from verified chunks of the right length, holes (ranges no
//! chunk covers) read as zeros; any chunk failure fails the whole read — never partial or
//! zero-filled data in its place.

use std::sync::Arc;

use crate::blob::decode::VerifiedChunk;
use crate::blob::source::ChunkSource;
use crate::bootstrap::Bootstrap;
use crate::error::Error;
use crate::fuse::cache::{ChunkCache, FetchError, Obtained};
use crate::fuse::decoded::DecodedFiles;
use crate::fuse::stats::FuseStats;
use crate::model::{ChunkRef, FileType, InodeId};

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    /// The inode's metadata could not be read.
    #[error("inode {ino}: {source}")]
    Metadata {
        ino: InodeId,
        #[source]
        source: Error,
    },
    #[error("inode {ino} is a directory")]
    IsDir { ino: InodeId },
    #[error("inode {ino} is not a regular file")]
    NotFile { ino: InodeId },
    /// A chunk could not be obtained or verified.
    #[error("inode {ino}: chunk {ci_index} of blob #{blob_index}: {reason}")]
    Chunk {
        ino: InodeId,
        blob_index: u32,
        ci_index: u32,
        reason: ChunkFailure,
    },
}

/// What went wrong with one chunk.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ChunkFailure {
    #[error("{0}")]
    Source(Arc<Error>),
    #[error("the fetching thread panicked")]
    Abandoned,
    #[error("verified chunk has {got} bytes, the bootstrap says {expected}")]
    Length { got: usize, expected: u32 },
}

/// Reads file ranges of one image.
pub(crate) struct Reader {
    bootstrap: Arc<Bootstrap>,
    source: Arc<dyn ChunkSource + Send + Sync>,
    cache: ChunkCache,
    /// Verified chunks kept decoded on disk, when the mount has a directory for them.
    decoded: Option<DecodedFiles>,
    stats: Arc<FuseStats>,
}

impl Reader {
    pub(crate) fn new(
        bootstrap: Arc<Bootstrap>,
        source: Arc<dyn ChunkSource + Send + Sync>,
        cache_bytes: u64,
        stats: Arc<FuseStats>,
    ) -> Self {
        Reader {
            bootstrap,
            source,
            cache: ChunkCache::new(cache_bytes),
            decoded: None,
            stats,
        }
    }

    /// Keep verified chunks decoded in `decoded` too.
    pub(crate) fn with_decoded(mut self, decoded: DecodedFiles) -> Self {
        self.decoded = Some(decoded);
        self
    }

    /// Chunk `c` from the decoded files (setting `from_file`), else from the source (then kept
    /// decoded).
    fn fetch(
        &self,
        blob: &crate::model::BlobInfo,
        c: &ChunkRef,
        from_file: &std::cell::Cell<bool>,
    ) -> crate::Result<VerifiedChunk> {
        let Some(d) = &self.decoded else {
            return self.source.read_chunk(blob, c);
        };
        let (index, offset) = (c.blob_index, c.uncompressed_offset);
        if let Some(bytes) = d.get(index, offset, c.uncompressed_size, &c.digest) {
            from_file.set(true);
            return Ok(VerifiedChunk::kept(bytes));
        }
        let v = self.source.read_chunk(blob, c)?;
        d.put(index, offset, &c.digest, &v);
        Ok(v)
    }

    pub(crate) fn stats(&self) -> &FuseStats {
        &self.stats
    }

    /// Bytes `[offset, offset + size)` of regular file `ino`, cut at the end of the file.
    pub(crate) fn read(&self, ino: InodeId, offset: u64, size: u32) -> Result<Vec<u8>, ReadError> {
        let read = self.assemble(ino, offset, size, |c, within, dst| {
            let data = self.chunk(ino, c)?;
            copy_from(ino, c, &data, within, dst)?;
            Ok(true)
        })?;
        // `chunk` never answers "not now".
        Ok(read.unwrap_or_default())
    }

    /// [`Reader::read`] if every chunk it needs is at hand — in memory, or in the decoded files
    /// (then only the bytes asked for are read) — so it costs no fetch and no wait: the FUSE
    /// thread answers it without a hand-off to a worker. `None`: some chunk is not at hand.
    pub(crate) fn read_ready(
        &self,
        ino: InodeId,
        offset: u64,
        size: u32,
    ) -> Option<Result<Vec<u8>, ReadError>> {
        self.assemble(ino, offset, size, |c, within, dst| {
            let key = (c.blob_index, c.compressed_offset, c.digest);
            if let Some(data) = self.cache.peek(&key) {
                FuseStats::add(&self.stats.chunk_cache_hits, 1);
                copy_from(ino, c, &data, within, dst)?;
                return Ok(true);
            }
            let Some(d) = &self.decoded else {
                return Ok(false);
            };
            let hit = d.read_part(
                c.blob_index,
                c.uncompressed_offset,
                c.uncompressed_size,
                &c.digest,
                within.start as u64,
                dst,
            );
            if hit {
                FuseStats::add(&self.stats.chunk_decoded_hits, 1);
            }
            Ok(hit)
        })
        .transpose()
    }

    /// The file range, each chunk's part of it filled by `fill(chunk, range within the chunk,
    /// destination)`; `Ok(None)` as soon as `fill` says it cannot.
    fn assemble(
        &self,
        ino: InodeId,
        offset: u64,
        size: u32,
        mut fill: impl FnMut(&ChunkRef, std::ops::Range<usize>, &mut [u8]) -> Result<bool, ReadError>,
    ) -> Result<Option<Vec<u8>>, ReadError> {
        let meta = |source| ReadError::Metadata { ino, source };
        let attr = self.bootstrap.getattr(ino).map_err(meta)?;
        match attr.file_type {
            FileType::File => {}
            FileType::Dir => return Err(ReadError::IsDir { ino }),
            _ => return Err(ReadError::NotFile { ino }),
        }
        let end = attr.size.min(offset.saturating_add(u64::from(size)));
        if offset >= end {
            return Ok(Some(Vec::new()));
        }
        // At most `size` (a u32), so the cast cannot truncate.
        let mut buf = vec![0u8; (end - offset) as usize];
        for c in self
            .bootstrap
            .file_chunks(ino, offset, end - offset)
            .map_err(meta)?
        {
            let c_end = c.file_offset.saturating_add(u64::from(c.uncompressed_size));
            let (from, to) = (c.file_offset.max(offset), c_end.min(end));
            if from >= to {
                continue;
            }
            let within = (from - c.file_offset) as usize..(to - c.file_offset) as usize;
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            if !fill(&c, within, dst)? {
                return Ok(None);
            }
        }
        Ok(Some(buf))
    }

    /// One verified chunk, through the cache.
    fn chunk(&self, ino: InodeId, c: &ChunkRef) -> Result<Arc<VerifiedChunk>, ReadError> {
        let fail = |reason| ReadError::Chunk {
            ino,
            blob_index: c.blob_index,
            ci_index: c.ci_index,
            reason,
        };
        let blob = self
            .bootstrap
            .blob(c.blob_index)
            .map_err(|source| ReadError::Metadata { ino, source })?;
        let key = (c.blob_index, c.compressed_offset, c.digest);
        let from_file = std::cell::Cell::new(false);
        let (result, how) = self
            .cache
            .get_or_fetch(key, || self.fetch(blob, c, &from_file));
        let s = &self.stats;
        let data = match (result, how) {
            (Ok(d), Obtained::Fetched) if from_file.get() => {
                FuseStats::add(&s.chunk_decoded_hits, 1);
                d
            }
            (Ok(d), Obtained::Fetched) => {
                FuseStats::add(&s.chunks_fetched, 1);
                FuseStats::add(&s.chunk_bytes_fetched, d.len() as u64);
                d
            }
            (Ok(d), Obtained::Hit) => {
                FuseStats::add(&s.chunk_cache_hits, 1);
                d
            }
            (Err(e), how) => {
                if how == Obtained::Fetched {
                    FuseStats::add(&s.chunk_fetch_errors, 1);
                }
                return Err(fail(match e {
                    FetchError::Source(e) => ChunkFailure::Source(e),
                    FetchError::Abandoned => ChunkFailure::Abandoned,
                }));
            }
        };
        Ok(data)
    }
}

/// Copies `within` of verified chunk `data` into `dst`, after checking its length is the
/// bootstrap's.
fn copy_from(
    ino: InodeId,
    c: &ChunkRef,
    data: &[u8],
    within: std::ops::Range<usize>,
    dst: &mut [u8],
) -> Result<(), ReadError> {
    if data.len() != c.uncompressed_size as usize {
        return Err(ReadError::Chunk {
            ino,
            blob_index: c.blob_index,
            ci_index: c.ci_index,
            reason: ChunkFailure::Length {
                got: data.len(),
                expected: c.uncompressed_size,
            },
        });
    }
    dst.copy_from_slice(&data[within]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::source::LocalBlobDir;
    use crate::model::BlobInfo;
    use std::path::PathBuf;
    use std::sync::atomic::Ordering::Relaxed;

    fn fixture(rel: &str) -> PathBuf {
        PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/fixtures/nydus/built"
        ))
        .join(rel)
    }

    fn reader(case: &str, source: Arc<dyn ChunkSource + Send + Sync>) -> (Reader, Arc<Bootstrap>) {
        let b = Arc::new(Bootstrap::open(fixture(case).join("bootstrap")).unwrap());
        let stats = Arc::new(FuseStats::default());
        (Reader::new(b.clone(), source, 8 << 20, stats), b)
    }

    fn whole_file(b: &Bootstrap, src: &dyn ChunkSource, ino: InodeId) -> Vec<u8> {
        let size = b.getattr(ino).unwrap().size;
        let mut out = vec![0u8; size as usize];
        for c in b.file_chunks(ino, 0, u64::MAX).unwrap() {
            let d = src.read_chunk(b.blob(c.blob_index).unwrap(), &c).unwrap();
            out[c.file_offset as usize..c.file_offset as usize + d.len()].copy_from_slice(&d);
        }
        out
    }

    #[test]
    fn ranges_across_chunk_boundaries_match_the_file() {
        let case = "a-v6-none-blake3-64k";
        let src = Arc::new(LocalBlobDir::new(fixture(case).join("blobs")));
        let (r, b) = reader(case, src.clone());
        let sizes = b.lookup("/sizes").unwrap();
        let mut checked = 0;
        for e in b.readdir(sizes).unwrap() {
            let a = b.getattr(e.inode).unwrap();
            if a.size < 200_000 {
                continue;
            }
            let want = whole_file(&b, src.as_ref(), e.inode);
            for (off, len) in [
                (0u64, 131072u32),
                (65530, 20),
                (65536 * 2 - 1, 70000),
                (a.size - 5, 4096),
            ] {
                let got = r.read(e.inode, off, len).unwrap();
                let end = (off + u64::from(len)).min(a.size) as usize;
                assert_eq!(got, want[off as usize..end], "{off}+{len}");
            }
            assert!(r.read(e.inode, a.size, 10).unwrap().is_empty());
            checked += 1;
        }
        assert!(checked > 0);
        assert!(r.stats.chunk_cache_hits.load(Relaxed) > 0);
    }

    struct Failing;
    impl ChunkSource for Failing {
        fn read_chunk(&self, blob: &BlobInfo, _c: &ChunkRef) -> crate::Result<VerifiedChunk> {
            Err(Error::BlobMissing {
                blob_id: blob.blob_id.clone(),
                path: PathBuf::from("/nowhere"),
            })
        }
    }

    #[test]
    fn source_failures_fail_the_read_and_are_counted() {
        let (r, b) = reader("a-v6-zstd-blake3-1m", Arc::new(Failing));
        let dir = b.lookup("/sizes").unwrap();
        assert!(matches!(r.read(dir, 0, 10), Err(ReadError::IsDir { .. })));
        let fifo = b.lookup("/dev/fifo").unwrap();
        assert!(matches!(
            r.read(fifo, 0, 10),
            Err(ReadError::NotFile { .. })
        ));
        // An empty file needs no chunk.
        assert!(r
            .read(b.lookup("/sizes/f0").unwrap(), 0, 10)
            .unwrap()
            .is_empty());
        let file = b.lookup("/sizes/f4097").unwrap();
        let err = r.read(file, 0, 4096).unwrap_err();
        assert!(matches!(err, ReadError::Chunk { .. }), "{err}");
        assert_eq!(r.stats.chunk_fetch_errors.load(Relaxed), 1);
    }
}
