//! [`BlobFs`]: the small read-only FUSE filesystem behind a kernel EROFS mount. Its root holds
//! `image.boot` (the bootstrap, from memory) and one `<blob id>.blob.data` per data blob, each
//! the blob's decoded form (chunks at their uncompressed offsets, holes elsewhere) filled on
//! demand through the [`ChunkSource`].
//!
//! Invariants: a read returns exactly the requested bytes of the decoded blob, built only from
//! verified chunks of the right length, or fails with EIO — a failed chunk never becomes zeros;
//! holes (ranges no chunk covers) are zeros, as in nydusd's `.blob.data`; the files never change,
//! so the kernel may keep their pages (`FOPEN_KEEP_CACHE`); memory is bounded by the chunk cache
//! and the pool's queue. If this server dies, the kernel fails every read of these files (and so
//! every EROFS page-cache miss) with an error.

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEntry, ReplyOpen, ReplyStatfs, Request,
};
use tracing::warn;

use crate::blob::decode::VerifiedChunk;
use crate::blob::source::ChunkSource;
use crate::bootstrap::Bootstrap;
use crate::error::Error;
use crate::fuse::cache::{ChunkCache, FetchError, Obtained};
use crate::fuse::pool::Pool;
use crate::fuse::FuseStats;
use crate::model::{BlobInfo, ChunkRef};

/// Name of the bootstrap file in the filesystem's root.
pub const BOOTSTRAP_NAME: &str = "image.boot";
const ROOT: u64 = 1;
const BOOT_INO: u64 = 2;
/// Blob `i` is inode `FIRST_BLOB_INO + i`.
const FIRST_BLOB_INO: u64 = 3;
const TTL: Duration = Duration::from_secs(24 * 3600);

/// The name of blob `b`'s decoded file.
pub fn blob_file_name(b: &BlobInfo) -> String {
    format!("{}.blob.data", b.blob_id)
}

/// One decoded blob file.
struct BlobFile {
    info: BlobInfo,
    name: String,
    size: u64,
    /// Chunks sorted by uncompressed offset, one per offset.
    chunks: Vec<ChunkRef>,
}

pub(crate) struct BlobFs {
    bootstrap: Arc<Bootstrap>,
    core: Arc<Core>,
    pool: Pool<ReadJob>,
    max_readahead: u32,
}

/// What the read workers share.
struct Core {
    blobs: Vec<BlobFile>,
    source: Arc<dyn ChunkSource + Send + Sync>,
    cache: ChunkCache,
    stats: Arc<FuseStats>,
}

struct ReadJob {
    blob: usize,
    offset: u64,
    size: u32,
    reply: ReplyData,
    arrived: Instant,
}

impl BlobFs {
    pub(crate) fn new(
        bootstrap: Arc<Bootstrap>,
        source: Arc<dyn ChunkSource + Send + Sync>,
        opts: &super::ErofsOptions,
        stats: Arc<FuseStats>,
    ) -> crate::Result<Self> {
        let mut blobs = Vec::new();
        for b in bootstrap.blobs() {
            let mut chunks = bootstrap.blob_chunks(b.index)?;
            chunks.sort_by_key(|c| c.uncompressed_offset);
            chunks.dedup_by_key(|c| c.uncompressed_offset);
            let end = chunks
                .iter()
                .map(|c| c.uncompressed_offset + u64::from(c.uncompressed_size))
                .max()
                .unwrap_or(0);
            for w in chunks.windows(2) {
                if w[0].uncompressed_offset + u64::from(w[0].uncompressed_size)
                    > w[1].uncompressed_offset
                {
                    return Err(Error::invalid(
                        "chunk uncompressed offset",
                        w[1].uncompressed_offset,
                        "overlaps the previous chunk of the blob",
                    ));
                }
            }
            blobs.push(BlobFile {
                name: blob_file_name(b),
                size: b.uncompressed_size.max(end),
                info: b.clone(),
                chunks,
            });
        }
        let core = Arc::new(Core {
            blobs,
            source,
            cache: ChunkCache::new(opts.chunk_cache_bytes),
            stats,
        });
        let c = core.clone();
        let pool = Pool::new(
            "shoal-erofs-read",
            opts.read_workers,
            opts.read_queue,
            Arc::new(move |job| c.serve(job)),
        )
        .map_err(|e| Error::io("read workers", e))?;
        Ok(BlobFs {
            bootstrap,
            core,
            pool,
            max_readahead: opts.max_readahead,
        })
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, perm, size) = match ino {
            ROOT => (FileType::Directory, 0o555, 0),
            BOOT_INO => (
                FileType::RegularFile,
                0o444,
                self.bootstrap.as_bytes().len() as u64,
            ),
            _ => {
                let b = self.core.blobs.get(blob_slot(ino)?)?;
                (FileType::RegularFile, 0o444, b.size)
            }
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    fn lookup_ino(&self, name: &OsStr) -> Option<u64> {
        if name == BOOTSTRAP_NAME {
            return Some(BOOT_INO);
        }
        let i = self
            .core
            .blobs
            .iter()
            .position(|b| name == b.name.as_str())?;
        Some(FIRST_BLOB_INO + i as u64)
    }
}

fn blob_slot(ino: u64) -> Option<usize> {
    usize::try_from(ino.checked_sub(FIRST_BLOB_INO)?).ok()
}

impl Core {
    fn serve(&self, job: ReadJob) {
        let s = &self.stats;
        match self.read(job.blob, job.offset, job.size) {
            Ok(data) => {
                FuseStats::add(&s.reads, 1);
                FuseStats::add(&s.read_bytes, data.len() as u64);
                job.reply.data(&data);
            }
            Err(e) => {
                FuseStats::add(&s.read_errors, 1);
                warn!(blob = job.blob, offset = job.offset, size = job.size, error = %e, "EROFS blob read failed");
                job.reply.error(Errno::EIO);
            }
        }
        s.read_latency.record(job.arrived.elapsed());
    }

    /// Bytes `[offset, offset + size)` of decoded blob `slot`, cut at its end.
    fn read(&self, slot: usize, offset: u64, size: u32) -> Result<Vec<u8>, String> {
        let Some(b) = self.blobs.get(slot) else {
            return Err("no such blob".into());
        };
        let end = b.size.min(offset.saturating_add(u64::from(size)));
        if offset >= end {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; (end - offset) as usize];
        let first = b
            .chunks
            .partition_point(|c| c.uncompressed_offset + u64::from(c.uncompressed_size) <= offset);
        for c in b.chunks[first..]
            .iter()
            .take_while(|c| c.uncompressed_offset < end)
        {
            let data = self.chunk(&b.info, c)?;
            let c_end = c.uncompressed_offset + data.len() as u64;
            let (from, to) = (c.uncompressed_offset.max(offset), c_end.min(end));
            let src =
                (from - c.uncompressed_offset) as usize..(to - c.uncompressed_offset) as usize;
            buf[(from - offset) as usize..(to - offset) as usize].copy_from_slice(&data[src]);
        }
        Ok(buf)
    }

    fn chunk(&self, blob: &BlobInfo, c: &ChunkRef) -> Result<Arc<VerifiedChunk>, String> {
        let key = (c.blob_index, c.compressed_offset, c.digest);
        let (result, how) = self
            .cache
            .get_or_fetch(key, || self.source.read_chunk(blob, c));
        let s = &self.stats;
        let data = match (result, how) {
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
                return Err(match e {
                    FetchError::Source(e) => format!("chunk {}: {e}", c.ci_index),
                    FetchError::Abandoned => format!("chunk {}: fetch abandoned", c.ci_index),
                });
            }
        };
        if data.len() != c.uncompressed_size as usize {
            return Err(format!(
                "chunk {}: {} bytes, the bootstrap says {}",
                c.ci_index,
                data.len(),
                c.uncompressed_size
            ));
        }
        Ok(data)
    }
}

impl Filesystem for BlobFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(nearest) = config.set_max_readahead(self.max_readahead) {
            let _ = config.set_max_readahead(nearest);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let attr = (parent.0 == ROOT)
            .then(|| self.lookup_ino(name))
            .flatten()
            .and_then(|ino| self.attr(ino));
        match attr {
            Some(a) => reply.entry(&TTL, &a, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.attr(ino.0) {
            None => reply.error(Errno::ENOENT),
            Some(a) if a.kind == FileType::Directory => reply.error(Errno::EISDIR),
            Some(_) if flags.acc_mode() != OpenAccMode::O_RDONLY => reply.error(Errno::EROFS),
            Some(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino.0 == BOOT_INO {
            let b = self.bootstrap.as_bytes();
            let from = usize::try_from(offset).unwrap_or(usize::MAX).min(b.len());
            let to = from.saturating_add(size as usize).min(b.len());
            return reply.data(&b[from..to]);
        }
        let Some(blob) = blob_slot(ino.0).filter(|&i| i < self.core.blobs.len()) else {
            return reply.error(Errno::ENOENT);
        };
        let job = ReadJob {
            blob,
            offset,
            size,
            reply,
            arrived: Instant::now(),
        };
        if let Err(job) = self.pool.try_submit(job) {
            FuseStats::add(&self.core.stats.reads_inline, 1);
            self.core.serve(job);
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let mut names: Vec<(u64, FileType, &str)> = vec![
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
            (BOOT_INO, FileType::RegularFile, BOOTSTRAP_NAME),
        ];
        for (i, b) in self.core.blobs.iter().enumerate() {
            names.push((FIRST_BLOB_INO + i as u64, FileType::RegularFile, &b.name));
        }
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (ino, kind, name)) in names.iter().enumerate().skip(start) {
            if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let bytes: u64 = self.core.blobs.iter().map(|b| b.size).sum();
        let files = self.core.blobs.len() as u64 + 1;
        reply.statfs(bytes.div_ceil(4096), 0, 0, files, 0, 4096, 255, 4096);
    }
}
