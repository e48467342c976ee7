//! [`RafsFs`]: the `fuser::Filesystem` over a [`Bootstrap`] — metadata answered on the FUSE
//! threads straight from the in-memory bootstrap, reads handed to the worker pool.
//!
//! Invariants: the filesystem is read-only (every modifying operation answers EROFS, as does
//! opening for write); every reply carries the image's own attributes under the numbering of
//! [`Inodes`]; entries, attributes and pages are cacheable for long (the image is immutable);
//! memory is bounded: queued reads by the pool's queue, decoded chunks by the cache, open
//! directory listings by the kernel's limit on open files, indexed listings by
//! [`LISTED_ENTRIES_MAX`].
//!
//! Lookups: a directory's listing is decoded once and indexed by name (a hash map, so an image
//! whose entries are not sorted still resolves), then kept for later lookups and `opendir`s — a
//! lookup in a directory of n entries costs O(1), not a decode of all n. `flush` answers ENOSYS,
//! so the kernel stops sending it (one round trip less per `close`; nothing to flush here).

use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty,
    ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
    TimeOrNow, WriteFlags,
};
use tracing::{debug, warn};

use crate::blob::source::ChunkSource;
use crate::bootstrap::Bootstrap;
use crate::fuse::decoded::DecodedFiles;
use crate::fuse::errno;
use crate::fuse::inodes::{file_attr, kind, negative_attr, Inodes};
use crate::fuse::pool::Pool;
use crate::fuse::reader::{ReadError, Reader};
use crate::fuse::stats::FuseStats;
use crate::fuse::FuseOptions;
use crate::model::{Attr, DirEntry, FileType, InodeId};

const GENERATION: Generation = Generation(0);
const NAME_MAX: usize = 255;
/// Directory entries kept in indexed listings, in all (the oldest listings go first beyond it).
pub(crate) const LISTED_ENTRIES_MAX: usize = 256 * 1024;

/// One directory's entries and their index by name (the first of equal names wins).
pub(crate) struct Listing {
    entries: Arc<Vec<DirEntry>>,
    by_name: HashMap<Box<[u8]>, usize>,
}

impl Listing {
    fn new(entries: Vec<DirEntry>) -> Self {
        let mut by_name = HashMap::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            by_name
                .entry(e.name.clone().into_boxed_slice())
                .or_insert(i);
        }
        Self {
            entries: Arc::new(entries),
            by_name,
        }
    }

    fn get(&self, name: &[u8]) -> Option<&DirEntry> {
        self.by_name.get(name).and_then(|&i| self.entries.get(i))
    }
}

/// Indexed listings by directory, bounded by [`LISTED_ENTRIES_MAX`] entries (first in, first out).
#[derive(Default)]
struct Listings {
    map: HashMap<InodeId, Arc<Listing>>,
    order: VecDeque<InodeId>,
    entries: usize,
}

impl Listings {
    fn insert(&mut self, id: InodeId, listing: Arc<Listing>) {
        let n = listing.entries.len();
        if n > LISTED_ENTRIES_MAX || self.map.contains_key(&id) {
            return;
        }
        while self.entries + n > LISTED_ENTRIES_MAX {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(l) = self.map.remove(&old) {
                self.entries -= l.entries.len();
            }
        }
        self.entries += n;
        self.order.push_back(id);
        self.map.insert(id, listing);
    }
}

/// A read waiting for a worker.
pub(crate) struct ReadJob {
    ino: InodeId,
    offset: u64,
    size: u32,
    reply: ReplyData,
    arrived: Instant,
}

pub(crate) struct RafsFs {
    bootstrap: Arc<Bootstrap>,
    inodes: Inodes,
    reader: Arc<Reader>,
    pool: Pool<ReadJob>,
    /// Listings of open directories, by file handle.
    dirs: Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>,
    /// Indexed listings of directories looked up in, by inode.
    listings: Mutex<Listings>,
    next_fh: AtomicU64,
    entry_ttl: Duration,
    attr_ttl: Duration,
    negative_ttl: Duration,
    max_readahead: u32,
    max_background: u16,
}

impl RafsFs {
    pub(crate) fn new(
        bootstrap: Arc<Bootstrap>,
        source: Arc<dyn ChunkSource + Send + Sync>,
        opts: &FuseOptions,
        stats: Arc<FuseStats>,
    ) -> std::io::Result<Self> {
        let mut reader = Reader::new(bootstrap.clone(), source, opts.chunk_cache_bytes, stats);
        if let Some(dir) = &opts.decoded_dir {
            reader = reader.with_decoded(DecodedFiles::new(dir, opts.decoded_max_bytes)?);
        }
        let reader = Arc::new(reader);
        let r = reader.clone();
        let pool = Pool::new(
            "shoal-fuse-read",
            opts.read_workers,
            opts.read_queue,
            Arc::new(move |job| serve(&r, job)),
        )?;
        Ok(RafsFs {
            inodes: Inodes::new(&bootstrap),
            bootstrap,
            reader,
            pool,
            dirs: Mutex::new(HashMap::new()),
            listings: Mutex::new(Listings::default()),
            next_fh: AtomicU64::new(1),
            entry_ttl: opts.entry_ttl,
            attr_ttl: opts.attr_ttl,
            negative_ttl: opts.negative_ttl,
            max_readahead: opts.max_readahead,
            max_background: opts.max_background,
        })
    }

    fn id(&self, ino: INodeNo) -> Result<InodeId, Errno> {
        self.inodes.image_id(ino).ok_or(Errno::ENOENT)
    }

    fn attr(&self, id: InodeId) -> Result<Attr, Errno> {
        self.bootstrap.getattr(id).map_err(|e| {
            warn!(inode = id, error = %e, "FUSE: unreadable inode");
            errno::image(&e)
        })
    }

    /// Number and FUSE attributes of `id` reached through directory `parent`.
    fn entry(&self, parent: InodeId, id: InodeId) -> Result<FileAttr, Errno> {
        let attr = self.attr(id)?;
        let id = self.inodes.canonical(id, &attr);
        if attr.file_type == FileType::Dir {
            self.inodes.note_parent(id, parent);
        }
        self.fuse_attr(id, &attr)
    }

    fn fuse_attr(&self, id: InodeId, attr: &Attr) -> Result<FileAttr, Errno> {
        let ino = self.inodes.fuse_ino(id).ok_or(Errno::EIO)?;
        Ok(file_attr(ino, attr))
    }

    fn dir_entries(&self, id: InodeId) -> Result<Vec<DirEntry>, Errno> {
        if self.attr(id)?.file_type != FileType::Dir {
            return Err(Errno::ENOTDIR);
        }
        self.bootstrap.readdir(id).map_err(|e| {
            warn!(inode = id, error = %e, "FUSE: unreadable directory");
            errno::image(&e)
        })
    }

    fn lookup_name(&self, parent: INodeNo, name: &OsStr) -> Result<Option<FileAttr>, Errno> {
        let pid = self.id(parent)?;
        let listing = self.indexed(pid)?;
        if name.len() > NAME_MAX {
            return Err(Errno::ENAMETOOLONG);
        }
        let Some(e) = listing.get(name.as_bytes()) else {
            return Ok(None);
        };
        self.entry(pid, e.inode).map(Some)
    }

    /// Directory `id`'s indexed listing: kept from an earlier use, or decoded (and kept) now.
    fn indexed(&self, id: InodeId) -> Result<Arc<Listing>, Errno> {
        let kept = self
            .listings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map
            .get(&id)
            .cloned();
        if let Some(l) = kept {
            return Ok(l);
        }
        let listing = Arc::new(Listing::new(self.dir_entries(id)?));
        self.listings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, Arc::clone(&listing));
        Ok(listing)
    }

    /// The listing of directory `id`: the one opendir made for `fh`, or a fresh one.
    fn listing(&self, id: InodeId, fh: FileHandle) -> Result<Arc<Vec<DirEntry>>, Errno> {
        let open = self.lock_dirs().get(&fh.0).cloned();
        match open {
            Some(list) => Ok(list),
            None => self.indexed(id).map(|l| Arc::clone(&l.entries)),
        }
    }

    fn lock_dirs(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Vec<DirEntry>>>> {
        self.dirs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Entry `i` of directory `id` counting `.` and `..` first: (name, inode, type).
    fn dirent<'a>(
        &self,
        id: InodeId,
        list: &'a [DirEntry],
        i: usize,
    ) -> Option<(&'a [u8], InodeId, FileType)> {
        match i {
            0 => Some((b".", id, FileType::Dir)),
            1 => Some((b"..", self.inodes.parent(id), FileType::Dir)),
            _ => list
                .get(i - 2)
                .map(|e| (e.name.as_slice(), e.inode, e.file_type)),
        }
    }

    fn xattr_value(&self, ino: INodeNo, name: &OsStr) -> Result<Vec<u8>, Errno> {
        let id = self.id(ino)?;
        let xattrs = self.bootstrap.xattrs(id).map_err(|e| {
            warn!(inode = id, error = %e, "FUSE: unreadable xattrs");
            errno::image(&e)
        })?;
        xattrs
            .into_iter()
            .find(|x| x.name == name.as_bytes())
            .map(|x| x.value)
            .ok_or(Errno::ENODATA)
    }

    fn xattr_names(&self, ino: INodeNo) -> Result<Vec<u8>, Errno> {
        let id = self.id(ino)?;
        let xattrs = self.bootstrap.xattrs(id).map_err(|e| {
            warn!(inode = id, error = %e, "FUSE: unreadable xattrs");
            errno::image(&e)
        })?;
        let mut names = Vec::new();
        for x in xattrs {
            names.extend_from_slice(&x.name);
            names.push(0);
        }
        Ok(names)
    }
}

/// Answer one read (on a worker, or inline when the queue is full). The
/// counters are updated before the reply, so a reader that got its answer
/// always finds its read counted.
fn serve(reader: &Reader, job: ReadJob) {
    let result = reader.read(job.ino, job.offset, job.size);
    answer(reader, job, result);
}

/// Count and send the answer to one read.
fn answer(reader: &Reader, job: ReadJob, result: Result<Vec<u8>, ReadError>) {
    let stats = reader.stats();
    match &result {
        Ok(data) => {
            FuseStats::add(&stats.reads, 1);
            FuseStats::add(&stats.read_bytes, data.len() as u64);
        }
        Err(e) => {
            FuseStats::add(&stats.read_errors, 1);
            if errno::is_data_failure(e) {
                warn!(inode = job.ino, offset = job.offset, size = job.size, error = %e, "FUSE read failed");
            } else {
                debug!(inode = job.ino, error = %e, "FUSE read refused");
            }
        }
    }
    stats.read_latency.record(job.arrived.elapsed());
    match result {
        Ok(data) => job.reply.data(&data),
        Err(e) => job.reply.error(errno::read(&e)),
    }
}

/// Reply with `data`, its size (when the caller asked with size 0), or ERANGE.
fn reply_sized(reply: ReplyXattr, data: &[u8], size: u32) {
    let Ok(len) = u32::try_from(data.len()) else {
        return reply.error(Errno::E2BIG);
    };
    if size == 0 {
        reply.size(len);
    } else if len > size {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(data);
    }
}

impl Filesystem for RafsFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(nearest) = config.set_max_readahead(self.max_readahead) {
            let _ = config.set_max_readahead(nearest);
        }
        let _ = config.set_max_background(self.max_background);
        // Each is optional: an older kernel without one still mounts.
        for cap in [
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_PARALLEL_DIROPS,
        ] {
            let _ = config.add_capabilities(cap);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.lookup_name(parent, name) {
            Ok(Some(attr)) => {
                reply.entry_with_ttls(&self.attr_ttl, &self.entry_ttl, &attr, GENERATION)
            }
            // Node id 0 with a timeout: the kernel caches the miss (Python probes many paths).
            Ok(None) if !self.negative_ttl.is_zero() => reply.entry_with_ttls(
                &self.negative_ttl,
                &self.negative_ttl,
                &negative_attr(),
                GENERATION,
            ),
            Ok(None) => reply.error(Errno::ENOENT),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let attr = self
            .id(ino)
            .and_then(|id| Ok((id, self.attr(id)?)))
            .and_then(|(id, a)| self.fuse_attr(id, &a));
        match attr {
            Ok(a) => reply.attr(&self.attr_ttl, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let target = self.id(ino).and_then(|id| {
            if self.attr(id)?.file_type != FileType::Symlink {
                return Err(Errno::EINVAL);
            }
            self.bootstrap.readlink(id).map_err(|e| errno::image(&e))
        });
        match target {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let checked = self.id(ino).and_then(|id| match self.attr(id)?.file_type {
            FileType::Dir => Err(Errno::EISDIR),
            _ if flags.acc_mode() != OpenAccMode::O_RDONLY => Err(Errno::EROFS),
            _ => Ok(()),
        });
        match checked {
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(e),
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
        let arrived = Instant::now();
        let id = match self.id(ino) {
            Ok(id) => id,
            Err(e) => return reply.error(e),
        };
        let job = ReadJob {
            ino: id,
            offset,
            size,
            reply,
            arrived,
        };
        // Chunks at hand (in memory or decoded on disk): answered here, no hand-off.
        if let Some(result) = self.reader.read_ready(id, offset, size) {
            return answer(&self.reader, job, result);
        }
        if let Err(job) = self.pool.try_submit(job) {
            FuseStats::add(&self.reader.stats().reads_inline, 1);
            serve(&self.reader, job);
        }
    }

    /// ENOSYS: the kernel then never sends `flush` again on this mount (nothing to flush in a
    /// read-only image), sparing every `close` a round trip.
    fn flush(&self, _: &Request, _: INodeNo, _: FileHandle, _: LockOwner, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS);
    }

    fn fsync(&self, _: &Request, _: INodeNo, _: FileHandle, _: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.id(ino).and_then(|id| self.indexed(id)) {
            Ok(listing) => {
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                self.lock_dirs().insert(fh, Arc::clone(&listing.entries));
                let flags = FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR;
                reply.opened(FileHandle(fh), flags);
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let (id, list) = match self.id(ino).and_then(|id| Ok((id, self.listing(id, fh)?))) {
            Ok(x) => x,
            Err(e) => return reply.error(e),
        };
        let mut i = usize::try_from(offset).unwrap_or(usize::MAX);
        while let Some((name, child, file_type)) = self.dirent(id, &list, i) {
            // v5 hardlinks: report the canonical number, as stat does.
            let number = self
                .attr(child)
                .map(|a| self.inodes.canonical(child, &a))
                .ok()
                .and_then(|c| self.inodes.fuse_ino(c));
            let Some(number) = number else {
                return reply.error(Errno::EIO);
            };
            i += 1;
            if reply.add(number, i as u64, kind(file_type), OsStr::from_bytes(name)) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let (id, list) = match self.id(ino).and_then(|id| Ok((id, self.listing(id, fh)?))) {
            Ok(x) => x,
            Err(e) => return reply.error(e),
        };
        let mut i = usize::try_from(offset).unwrap_or(usize::MAX);
        while let Some((name, child, _)) = self.dirent(id, &list, i) {
            let attr = if i < 2 {
                self.attr(child).and_then(|a| self.fuse_attr(child, &a))
            } else {
                self.entry(id, child)
            };
            let attr = match attr {
                Ok(a) => a,
                Err(e) => return reply.error(e),
            };
            i += 1;
            let name = OsStr::from_bytes(name);
            if reply.add(attr.ino, i as u64, name, &self.entry_ttl, &attr, GENERATION) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.lock_dirs().remove(&fh.0);
        reply.ok();
    }

    /// No ioctls: a read-only image has none to offer. Answered quietly with
    /// ENOTTY, which is what programs probing a file (`isatty`) expect.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let bytes: u64 = self
            .bootstrap
            .blobs()
            .iter()
            .map(|b| b.uncompressed_size)
            .sum();
        let files = self.bootstrap.summary().inode_count;
        reply.statfs(
            bytes.div_ceil(4096),
            0,
            0,
            files,
            0,
            4096,
            NAME_MAX as u32,
            4096,
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.xattr_value(ino, name) {
            Ok(v) => reply_sized(reply, &v, size),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.xattr_names(ino) {
            Ok(v) => reply_sized(reply, &v, size),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        // Only called without `default_permissions`; the kernel checks mode bits otherwise.
        match self.id(ino).and_then(|id| self.attr(id)) {
            Ok(_) if mask.contains(AccessFlags::W_OK) => reply.error(Errno::EROFS),
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn lseek(&self, _: &Request, _: INodeNo, _: FileHandle, _: i64, _: i32, reply: ReplyLseek) {
        // The kernel then seeks by itself (SEEK_DATA/SEEK_HOLE treat the file as all data).
        reply.error(Errno::ENOSYS);
    }

    // Everything below would modify the image.

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mknod(&self, _: &Request, _: INodeNo, _: &OsStr, _: u32, _: u32, _: u32, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(&self, _: &Request, _: INodeNo, _: &OsStr, _: u32, _: u32, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _: &Request, _: INodeNo, _: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _: &Request, _: INodeNo, _: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(&self, _: &Request, _: INodeNo, _: &OsStr, _: &std::path::Path, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _: &Request,
        _: INodeNo,
        _: &OsStr,
        _: INodeNo,
        _: &OsStr,
        _: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn link(&self, _: &Request, _: INodeNo, _: INodeNo, _: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn write(
        &self,
        _: &Request,
        _: INodeNo,
        _: FileHandle,
        _: u64,
        _: &[u8],
        _: WriteFlags,
        _: OpenFlags,
        _: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn setxattr(
        &self,
        _: &Request,
        _: INodeNo,
        _: &OsStr,
        _: &[u8],
        _: i32,
        _: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn removexattr(&self, _: &Request, _: INodeNo, _: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn create(
        &self,
        _: &Request,
        _: INodeNo,
        _: &OsStr,
        _: u32,
        _: u32,
        _: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EROFS);
    }

    fn fallocate(
        &self,
        _: &Request,
        _: INodeNo,
        _: FileHandle,
        _: u64,
        _: u64,
        _: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn copy_file_range(
        &self,
        _: &Request,
        _: INodeNo,
        _: FileHandle,
        _: u64,
        _: INodeNo,
        _: FileHandle,
        _: u64,
        _: u64,
        _: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }
}
