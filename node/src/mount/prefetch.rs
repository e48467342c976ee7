//! Prefetch for lazy mounts: the bootstrap's prefetch table, plus a learned access list — the
//! chunks the first run of an image touched, in first-touch order, kept in
//! `<data dir>/access/<bootstrap digest>.json`. A later mount of the same image (same bootstrap
//! digest) fetches those chunks in that order in the background.
//!
//! Invariants: prefetch goes through the same chunk backend as reads (verified, single flight, kept
//! in the store) and never ahead of them: before each fetch it waits until no on-demand read is
//! in the backend, and it stays under its byte rate (origin bytes per second since it started).
//! A chunk the store already holds costs no fetch. Every mount records during its first
//! [`RECORD_WINDOW`]: the first run of an image makes its list, later runs append what the list
//! lacked (first-touch order kept); the list is bounded ([`MAX_RECORDED`]) and written atomically
//! (temp file, fsync, rename), periodically and when the mount goes away.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shoal_proto::Digest;
use shoal_rafs::{Bootstrap, ChunkRef, FileType, InodeId};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use super::chunks::ChunkBackend;

/// Default prefetch rate: origin bytes per second.
pub const DEFAULT_RATE: u64 = 32 << 20;
/// Most chunks one access list holds.
pub const MAX_RECORDED: usize = 1 << 20;
/// How often a recording list is written while the mount lives.
pub const SAVE_EVERY: Duration = Duration::from_secs(5);
/// Most entries the prefetch table may expand to (files below listed directories).
const MAX_TABLE_FILES: usize = 1 << 16;

/// A chunk as the access list names it: (blob table index, compressed offset).
pub type ChunkKey = (u32, u64);

/// Where the access list of the image with bootstrap layer `digest` lives.
pub fn list_path(data_dir: &Path, digest: &Digest) -> PathBuf {
    data_dir
        .join("access")
        .join(format!("{}.json", digest.to_string().replace(':', "-")))
}

#[derive(Serialize, Deserialize)]
struct ListFile {
    chunks: Vec<ChunkKey>,
}

/// The access list at `path`, if one was recorded (an unreadable one counts as none).
pub fn load(path: &Path) -> Option<Vec<ChunkKey>> {
    let bytes = fs::read(path).ok()?;
    match serde_json::from_slice::<ListFile>(&bytes) {
        Ok(l) => Some(l.chunks),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "unreadable access list; recording a new one");
            None
        }
    }
}

/// A mount's background work: on the image's first run, recording its access list (saved
/// periodically and when the mount goes); on later runs, prefetching the list (after the
/// bootstrap's prefetch table). Nothing runs until [`Background::start`], so a mount that fails
/// leaves nothing behind.
#[derive(Debug)]
pub struct Background {
    stats: Arc<PrefetchStats>,
    /// The list this mount records, when none existed.
    recording: Option<Arc<AccessLog>>,
    /// The list an earlier run recorded.
    learned: Vec<ChunkKey>,
}

impl Background {
    /// Read the image's access list at `path` (blocking) and decide what to do.
    pub fn prepare(path: &Path) -> Self {
        let stats = Arc::new(PrefetchStats::default());
        match load(path) {
            Some(learned) => Background {
                stats,
                // Keeps recording what the list lacks (not counted as "recording": that is the
                // image's first run).
                recording: Some(Arc::new(AccessLog::continuing(
                    path.to_path_buf(),
                    &learned,
                ))),
                learned,
            },
            None => {
                stats.recording.store(true, Relaxed);
                Background {
                    stats,
                    recording: Some(Arc::new(AccessLog::new(path.to_path_buf()))),
                    learned: Vec::new(),
                }
            }
        }
    }

    /// Have `backend` record reads, when this mount records (before the backend is shared).
    pub fn attach(&self, backend: &mut ChunkBackend) {
        if let Some(log) = &self.recording {
            backend.record_into(log.clone());
        }
    }

    /// Start the saver task and the prefetch thread (`rate` 0: no prefetch); both stop when
    /// `stop` is cancelled.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        &mut self,
        tracker: &TaskTracker,
        backend: &Arc<ChunkBackend>,
        boot: &Arc<Bootstrap>,
        rate: u64,
        stop: &CancellationToken,
        span: tracing::Span,
        share: Option<Share>,
    ) {
        if let Some(log) = &self.recording {
            tracker.spawn(
                keep_saved(log.clone(), self.stats.clone(), stop.clone(), share)
                    .instrument(span.clone()),
            );
        }
        if rate == 0 {
            return;
        }
        let learned = std::mem::take(&mut self.learned);
        let (backend, boot, stop, stats) = (
            backend.clone(),
            boot.clone(),
            stop.clone(),
            self.stats.clone(),
        );
        tracker.spawn_blocking(move || {
            let _span = span.enter();
            let chunks = plan(&boot, &learned);
            if chunks.is_empty() {
                return;
            }
            tracing::info!(chunks = chunks.len(), rate, "prefetching");
            run(&backend, &boot, &chunks, rate, &stop, &stats);
            let s = stats.snapshot();
            tracing::info!(state = %s.state, done = s.done, held = s.held, failed = s.failed, "prefetch finished");
        });
    }

    pub fn snapshot(&self) -> PrefetchSnapshot {
        let mut s = self.stats.snapshot();
        if let Some(log) = &self.recording {
            s.recorded = log.len() as u64;
        }
        s
    }
}

/// How long after a mount starts its reads are recorded: an image's start-up, not whatever a
/// long-running program reads hours later.
pub const RECORD_WINDOW: Duration = Duration::from_secs(300);

/// Records the first touch of each chunk, in order, during the mount's first
/// [`RECORD_WINDOW`].
#[derive(Debug)]
pub struct AccessLog {
    path: PathBuf,
    inner: Mutex<Recorded>,
    dirty: AtomicBool,
    until: Instant,
}

#[derive(Debug, Default)]
struct Recorded {
    seen: HashSet<ChunkKey>,
    order: Vec<ChunkKey>,
}

impl AccessLog {
    pub fn new(path: PathBuf) -> Self {
        Self::continuing(path, &[])
    }

    /// A log that goes on from the list an earlier run recorded: what this run reads first that
    /// the list lacks is appended (containers of an image do not all read the same files).
    pub fn continuing(path: PathBuf, learned: &[ChunkKey]) -> Self {
        AccessLog {
            path,
            inner: Mutex::new(Recorded {
                seen: learned.iter().copied().collect(),
                order: learned.to_vec(),
            }),
            dirty: AtomicBool::new(false),
            until: Instant::now() + RECORD_WINDOW,
        }
    }

    /// Note that a program needed `key`.
    pub fn touch(&self, key: ChunkKey) {
        if Instant::now() > self.until {
            return;
        }
        let mut r = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if r.order.len() < MAX_RECORDED && r.seen.insert(key) {
            r.order.push(key);
            self.dirty.store(true, Relaxed);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .order
            .len()
    }

    /// Write the list if it changed since the last save (blocking); the list written, if any.
    pub fn save(&self) -> io::Result<Option<Vec<ChunkKey>>> {
        if !self.dirty.swap(false, Relaxed) {
            return Ok(None);
        }
        let chunks = self
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .order
            .clone();
        let list = ListFile { chunks };
        match write_atomic(&self.path, &list) {
            Ok(()) => Ok(Some(list.chunks)),
            Err(e) => {
                self.dirty.store(true, Relaxed);
                Err(e)
            }
        }
    }
}

/// Writes `chunks` as the access list at `path` (one another node of the cluster shared), so
/// this mount prefetches it instead of recording its own.
pub fn write_list(path: &Path, chunks: Vec<ChunkKey>) -> io::Result<()> {
    write_atomic(path, &ListFile { chunks })
}

/// Hands a freshly saved access list to the cluster.
pub type Share = Arc<dyn Fn(Vec<ChunkKey>) + Send + Sync>;

fn write_atomic(path: &Path, list: &ListFile) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::to_vec(list).map_err(io::Error::other)?;
    {
        let mut f = File::create(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// Progress of one mount's prefetch.
#[derive(Debug, Default)]
pub struct PrefetchStats {
    /// 0 off, 1 waiting/running, 2 done, 3 cancelled.
    state: AtomicU8,
    pub planned: AtomicU64,
    /// Chunks handled (held already, fetched, or failed).
    pub done: AtomicU64,
    /// Chunks the store already held.
    pub held: AtomicU64,
    pub failed: AtomicU64,
    /// Whether this mount records the image's access list (no list existed).
    pub recording: AtomicBool,
    pub recorded: AtomicU64,
}

/// A plain copy of [`PrefetchStats`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefetchSnapshot {
    /// `off`, `running`, `done` or `cancelled`.
    pub state: String,
    pub planned: u64,
    pub done: u64,
    pub held: u64,
    pub failed: u64,
    pub recording: bool,
    pub recorded: u64,
}

impl PrefetchStats {
    pub fn snapshot(&self) -> PrefetchSnapshot {
        PrefetchSnapshot {
            state: match self.state.load(Relaxed) {
                1 => "running",
                2 => "done",
                3 => "cancelled",
                _ => "off",
            }
            .into(),
            planned: self.planned.load(Relaxed),
            done: self.done.load(Relaxed),
            held: self.held.load(Relaxed),
            failed: self.failed.load(Relaxed),
            recording: self.recording.load(Relaxed),
            recorded: self.recorded.load(Relaxed),
        }
    }
}

/// The chunks to prefetch, in order: those of the files in the bootstrap's prefetch table
/// (directories: every file below them), then the learned list; each once.
pub fn plan(boot: &Bootstrap, learned: &[ChunkKey]) -> Vec<ChunkRef> {
    let mut by_key = std::collections::HashMap::new();
    for b in boot.blobs() {
        for c in boot.blob_chunks(b.index).unwrap_or_default() {
            by_key
                .entry((c.blob_index, c.compressed_offset))
                .or_insert(c);
        }
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for ino in table_files(boot) {
        for c in boot.file_chunks(ino, 0, u64::MAX).unwrap_or_default() {
            if seen.insert((c.blob_index, c.compressed_offset)) {
                out.push(c);
            }
        }
    }
    for key in learned {
        if let Some(c) = by_key.get(key) {
            if seen.insert(*key) {
                out.push(c.clone());
            }
        }
    }
    out
}

/// Regular files named by the prefetch table, directories expanded breadth-first, bounded.
fn table_files(boot: &Bootstrap) -> Vec<InodeId> {
    let mut queue: std::collections::VecDeque<InodeId> =
        boot.prefetch_table().iter().copied().collect();
    let mut visited = HashSet::new();
    let mut files = Vec::new();
    while let Some(ino) = queue.pop_front() {
        if files.len() >= MAX_TABLE_FILES || visited.len() >= MAX_TABLE_FILES {
            break;
        }
        if !visited.insert(ino) {
            continue;
        }
        match boot.getattr(ino).map(|a| a.file_type) {
            Ok(FileType::File) => files.push(ino),
            Ok(FileType::Dir) => {
                for e in boot.readdir(ino).unwrap_or_default() {
                    queue.push_back(e.inode);
                }
            }
            _ => {}
        }
    }
    files
}

/// Fetch `chunks` in order through `backend` (blocking; run it on a blocking thread), behind
/// on-demand reads and under `rate` origin bytes per second.
pub fn run(
    backend: &ChunkBackend,
    boot: &Bootstrap,
    chunks: &[ChunkRef],
    rate: u64,
    cancel: &CancellationToken,
    stats: &PrefetchStats,
) {
    stats.planned.store(chunks.len() as u64, Relaxed);
    stats.state.store(1, Relaxed);
    let start = Instant::now();
    let origin_at_start = backend.stats().prefetch_bytes.load(Relaxed);
    for c in chunks {
        if cancel.is_cancelled() || !backend.wait_idle(cancel) {
            stats.state.store(3, Relaxed);
            return;
        }
        let spent = backend
            .stats()
            .prefetch_bytes
            .load(Relaxed)
            .saturating_sub(origin_at_start);
        if let Some(wait) = pace(spent, rate, start.elapsed()) {
            if sleep_or_cancel(wait, cancel) {
                stats.state.store(3, Relaxed);
                return;
            }
        }
        let Ok(blob) = boot.blob(c.blob_index) else {
            stats.failed.fetch_add(1, Relaxed);
            continue;
        };
        match backend.prefetch_chunk(blob, c) {
            Ok(true) => {}
            Ok(false) => {
                stats.held.fetch_add(1, Relaxed);
            }
            Err(e) => {
                stats.failed.fetch_add(1, Relaxed);
                tracing::debug!(ci = c.ci_index, error = %e, "prefetch of a chunk failed");
            }
        }
        stats.done.fetch_add(1, Relaxed);
    }
    stats.state.store(2, Relaxed);
}

/// How long to wait before the next fetch so that `spent` bytes since the start, `elapsed`
/// ago, stay under `rate` bytes per second (`None`: go on).
pub fn pace(spent: u64, rate: u64, elapsed: Duration) -> Option<Duration> {
    let due = Duration::from_secs_f64(spent as f64 / rate.max(1) as f64);
    due.checked_sub(elapsed).filter(|d| !d.is_zero())
}

/// Sleep `d` unless cancelled first; true when cancelled.
fn sleep_or_cancel(d: Duration, cancel: &CancellationToken) -> bool {
    let end = Instant::now() + d;
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        if cancel.is_cancelled() {
            return true;
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
    cancel.is_cancelled()
}

/// Keep `log` saved while `cancel` is not cancelled, and once more at the end; each saved list
/// goes to `share` too.
pub async fn keep_saved(
    log: Arc<AccessLog>,
    stats: Arc<PrefetchStats>,
    cancel: CancellationToken,
    share: Option<Share>,
) {
    loop {
        let stop = tokio::select! {
            _ = tokio::time::sleep(SAVE_EVERY) => false,
            _ = cancel.cancelled() => true,
        };
        stats.recorded.store(log.len() as u64, Relaxed);
        let l = log.clone();
        match tokio::task::spawn_blocking(move || l.save()).await {
            Ok(Ok(Some(chunks))) => {
                if let Some(share) = &share {
                    share(chunks);
                }
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot save the access list"),
            Err(e) => tracing::warn!(error = %e, "access list save task failed"),
        }
        if stop {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_follows_the_learned_order_once_per_chunk_and_skips_unknown_chunks() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/fixtures/nydus/built/ab-v6-merged/bootstrap");
        let Ok(boot) = Bootstrap::open(&path) else {
            let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
            assert!(!ci, "fixture {} missing under CI", path.display());
            eprintln!("SKIP: fixture {} missing", path.display());
            return;
        };
        let b1 = boot.blob_chunks(1).expect("chunks");
        let b0 = boot.blob_chunks(0).expect("chunks");
        let (x, y) = (&b1[b1.len() - 1], &b0[0]);
        let learned = vec![
            (x.blob_index, x.compressed_offset),
            (9, 0),
            (y.blob_index, y.compressed_offset),
            (x.blob_index, x.compressed_offset),
        ];
        let p = plan(&boot, &learned);
        let got: Vec<ChunkKey> = p
            .iter()
            .map(|c| (c.blob_index, c.compressed_offset))
            .collect();
        let table = boot.prefetch_table().len();
        assert_eq!(
            got[got.len() - 2..],
            [
                (x.blob_index, x.compressed_offset),
                (y.blob_index, y.compressed_offset)
            ],
            "prefetch table entries: {table}"
        );
        let unique: HashSet<_> = got.iter().collect();
        assert_eq!(unique.len(), got.len());
    }

    #[test]
    fn pace_keeps_prefetch_under_its_rate() {
        let mib = 1 << 20;
        // 8 MiB at 4 MiB/s must take 2 s: after 0.5 s, wait 1.5 s more.
        assert_eq!(
            pace(8 * mib, 4 * mib, Duration::from_millis(500)),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(pace(8 * mib, 4 * mib, Duration::from_secs(3)), None);
        assert_eq!(pace(0, 4 * mib, Duration::ZERO), None);
    }

    #[test]
    fn access_log_keeps_first_touch_order_and_round_trips() {
        let d = tempfile::tempdir().expect("tmp");
        let digest: Digest = format!("sha256:{}", "ab".repeat(32))
            .parse()
            .expect("digest");
        let path = list_path(d.path(), &digest);
        assert!(load(&path).is_none());
        let log = AccessLog::new(path.clone());
        for k in [(0, 10), (1, 0), (0, 10), (0, 5)] {
            log.touch(k);
        }
        log.save().expect("save");
        assert_eq!(load(&path), Some(vec![(0, 10), (1, 0), (0, 5)]));
        assert!(path.starts_with(d.path().join("access")));
    }
}
