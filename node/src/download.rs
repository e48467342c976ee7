//! One download per blob per node.
//!
//! [`Downloads::join`] either finds the blob complete in the store, joins the
//! download already running for it, or starts one. A download is a task that
//! owns the store's `BlobWriter`: it streams the origin's body into the
//! content file, hashes it as it goes, commits (fsync, then metadata) every
//! few MiB, and publishes how far it has written through a `watch` channel.
//! Any number of client responses follow that watermark and read the bytes
//! back from the file, so every client streams from the first bytes while
//! the origin is read once.
//!
//! Integrity: the blob is marked complete only when the whole-body digest
//! matches the id. Readers are never given the blob's last byte before that
//! verdict, so on a mismatch every client stream is aborted short of its
//! `Content-Length` (never completed with wrong bytes), and the content is
//! discarded.
//!
//! A download keeps running when its clients go away (the bytes are wanted
//! in the cache), and stops, keeping its committed prefix, at shutdown. A
//! later download of the same blob resumes from that prefix.
//!
//! Sources, on a node in a cluster (`peers.rs`): the blob's scheduler says
//! who holds which pieces and who holds the origin lease. The lease holder
//! fetches from the origin (committing every 2 MiB and announcing progress
//! and piece hashes at once); every other node fetches pieces from several
//! holders in parallel, in order, pipelined behind the lease holder, and
//! checks each against the lease holder's per-piece SHA-256 before it is
//! written or shown to a reader. A peer that sends a bad piece is blamed
//! and avoided. Without an answering scheduler the DHT's complete holders
//! are used, and their bytes are shown to readers only after the whole blob
//! matched its digest. When no peer can help (none holds it, all stalled),
//! the origin. A blob whose peer-fetched copy failed its digest is fetched
//! from the origin only for a while. Standalone nodes use the origin only.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::Stream;
use reqwest::header::HeaderValue;
use reqwest::StatusCode;
use sha2::Digest as _;
use shoal_proto::{BlobId, RepoName};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::metrics::Metrics;
use crate::peering::Peering;
use crate::store::{BlobWriter, RawReader, RepoKey, Store, StoreError, Verifier};
use crate::upstream::{AuthMode, Origin};

pub(crate) mod origin;
mod peers;

use origin::origin_fill;

/// Bytes buffered before one write to the content file.
const WRITE_BATCH: usize = 256 << 10;
/// Bytes written between two commits (fsync + metadata) on a standalone
/// node.
const COMMIT_EVERY: u64 = 8 << 20;
/// The same on a node in a cluster: committed bytes are what peers can be
/// served, so this is also the pipelining granularity behind a lease holder.
const COMMIT_EVERY_SHARED: u64 = 2 << 20;
/// How long a blob whose peer-fetched copy failed its digest is fetched
/// from the origin only.
const NO_PEERS_FOR: Duration = Duration::from_secs(600);
/// Largest read handed to a client stream at once.
const READ_CHUNK: u64 = 1 << 20;

/// Why a download did not produce a verified blob.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DownloadError {
    #[error("origin answered {status}")]
    Status {
        status: StatusCode,
        challenge: Option<HeaderValue>,
    },
    #[error("origin unreachable: {0}")]
    Origin(String),
    #[error("origin sent no Content-Length for the blob")]
    NoLength,
    #[error("origin sent {got} bytes, expected {expected}")]
    Length { got: u64, expected: u64 },
    #[error("content does not match digest {0}")]
    DigestMismatch(BlobId),
    #[error("store: {0}")]
    Store(String),
    #[error("another writer holds the blob")]
    WriterBusy,
    #[error("node is shutting down")]
    Shutdown,
    #[error("the download stopped without a result")]
    Aborted,
}

impl From<StoreError> for DownloadError {
    fn from(e: StoreError) -> Self {
        Self::Store(e.to_string())
    }
}

/// Where a download stands.
#[derive(Clone, Debug)]
pub enum State {
    Running,
    Complete,
    Failed(DownloadError),
}

#[derive(Clone, Debug)]
pub struct Progress {
    /// Blob size, once the origin said it.
    pub size: Option<u64>,
    /// Bytes `[0, written)` are in the content file.
    pub written: u64,
    pub state: State,
}

/// A running (or just finished) download, shared by the clients following it.
#[derive(Debug)]
pub struct Download {
    pub id: BlobId,
    /// `Some` for an isolated download: whose it is.
    isolation: Option<Isolation>,
    /// Whether it fetches from a configured origin (an operator's, trusted): a request naming a
    /// configured origin never takes bytes from a download of an origin someone else named.
    configured_source: bool,
    progress: watch::Sender<Progress>,
    /// The content file being written (replaced if the download restarts).
    raw: Mutex<Option<Arc<RawReader>>>,
}

/// Isolated downloads at once, at most.
const ISOLATED_LIMIT: usize = 8;
/// How often an isolated download checks that someone still follows it.
const ABANDON_CHECK: Duration = Duration::from_secs(5);

/// The answer of [`Downloads::join`].
pub enum Join {
    /// The store holds the complete, verified blob: serve it from there.
    Complete,
    Download(Arc<Download>),
    /// Neither the store nor a running download may serve this source (an isolated source
    /// meeting others' bytes, or the other way round): fetch from the origin for this request
    /// alone, without the store.
    Elsewhere,
}

/// What a new download fetches from.
#[derive(Clone, Debug)]
pub struct Source {
    pub origin: Arc<Origin>,
    pub repo: RepoName,
    pub auth: AuthMode,
    /// Whether any client may read it through this origin and repository (recorded in the
    /// blob's provenance).
    pub open: bool,
    /// An isolated download, for a requester whose access to stored bytes is not proven (an
    /// origin it chose; see `access`): it never uses peers or an origin lease, never starts over
    /// bytes the store already holds, is joined only by requests for the same origin, repository
    /// and credentials, shows its readers only bytes it fetched itself, and commits nothing until
    /// the whole blob matched its digest (a failure discards it).
    pub isolated: bool,
}

impl Source {
    /// Who may share an isolated download: same origin, repository and credentials.
    fn isolation(&self) -> Option<Isolation> {
        self.isolated.then(|| Isolation {
            upstream: self.origin.host.clone(),
            repo: self.repo.clone(),
            cred: match &self.auth {
                AuthMode::Client(v) => sha2::Sha256::digest(v.as_bytes()).into(),
                AuthMode::Node => [0; 32],
            },
        })
    }
}

/// The requester an isolated download belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Isolation {
    upstream: String,
    repo: RepoName,
    cred: [u8; 32],
}

/// The node's download manager. Cheap to clone.
#[derive(Clone)]
pub struct Downloads {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    store: Store,
    metrics: Arc<Metrics>,
    /// The cluster, when the node has one.
    peering: Option<Peering>,
    active: Mutex<HashMap<BlobId, Arc<Download>>>,
    /// Blobs to fetch from the origin only, until the instant.
    no_peers: Mutex<HashMap<BlobId, Instant>>,
    /// Origin fetches allowed at once (`mirror.max_origin_downloads`).
    origin_slots: Arc<tokio::sync::Semaphore>,
    /// Isolated downloads (from origins requests named) at once: a budget of their own, so
    /// origins a requester runs cannot hold the slots configured origins need.
    isolated_slots: Arc<tokio::sync::Semaphore>,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Inner {
    fn no_peers(&self, id: &BlobId) -> bool {
        let mut m = self.no_peers.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        m.retain(|_, until| *until > now);
        m.contains_key(id)
    }

    fn mark_no_peers(&self, id: &BlobId) {
        self.no_peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), Instant::now() + NO_PEERS_FOR);
    }
}

impl Downloads {
    /// `peering`: the cluster to fetch from before the origin (`None`: a
    /// standalone node); `origin_limit`: origin fetches at once (more queue).
    pub fn new(
        store: Store,
        metrics: Arc<Metrics>,
        peering: Option<Peering>,
        tracker: TaskTracker,
        cancel: CancellationToken,
        origin_limit: usize,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                metrics,
                peering,
                active: Mutex::new(HashMap::new()),
                no_peers: Mutex::new(HashMap::new()),
                origin_slots: Arc::new(tokio::sync::Semaphore::new(origin_limit.max(1))),
                isolated_slots: Arc::new(tokio::sync::Semaphore::new(
                    (origin_limit / 4).clamp(1, ISOLATED_LIMIT),
                )),
                tracker,
                cancel,
            }),
        }
    }

    /// The cluster downloads fetch from, if the node is in one.
    pub fn peering(&self) -> Option<&Peering> {
        self.inner.peering.as_ref()
    }

    /// Whether peers may be used for `id` now (not after its peer-fetched copy failed).
    pub fn peers_allowed(&self, id: &BlobId) -> bool {
        self.inner.peering.is_some() && !self.inner.no_peers(id)
    }

    /// Join or start the download of `id`.
    pub fn join(&self, id: &BlobId, source: Source) -> Result<Join, StoreError> {
        let isolation = source.isolation();
        let mut active = self.inner.active.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = active.get(id) {
            // Bytes flow only within one trust domain: shared downloads among requesters whose
            // access is proven, an isolated one only to its own requester — and a request that
            // named a configured origin only from a configured origin.
            let trusted_enough = d.configured_source || !source.origin.configured;
            if d.isolation == isolation && trusted_enough {
                return Ok(Join::Download(d.clone()));
            }
            return Ok(Join::Elsewhere);
        }
        // Checked under the lock: a download removes itself only after the
        // store says complete, so this cannot miss one finishing.
        let record = self.inner.store.blob(id)?;
        if isolation.is_some() {
            if record.is_some() {
                // The store holds (some of) it, from a source this requester has not proven.
                return Ok(Join::Elsewhere);
            }
        } else if record.is_some_and(|r| r.complete) {
            return Ok(Join::Complete);
        }
        let (tx, _) = watch::channel(Progress {
            size: None,
            written: 0,
            state: State::Running,
        });
        let d = Arc::new(Download {
            id: id.clone(),
            isolation,
            configured_source: source.origin.configured,
            progress: tx,
            raw: Mutex::new(None),
        });
        active.insert(id.clone(), d.clone());
        drop(active);
        let inner = self.inner.clone();
        let task_d = d.clone();
        let span = tracing::info_span!("download", blob = %id, origin = %source.origin.host, repo = %source.repo, isolated = source.isolated);
        self.inner.tracker.spawn(
            async move {
                // Whatever happens to this task (a panic included), the guard takes the download
                // out of the active map and gives its followers a verdict.
                let mut guard = Finished::new(inner.clone(), task_d.clone());
                inner.metrics.downloads_in_flight.inc();
                let result = run(&inner, &task_d, &source).await;
                let state = match result {
                    Ok(()) => {
                        tracing::info!("download complete");
                        State::Complete
                    }
                    Err(e) => {
                        let kind = match &e {
                            DownloadError::DigestMismatch(_) => "digest_mismatch",
                            DownloadError::Shutdown => "shutdown",
                            DownloadError::Status { .. } => "status",
                            _ => "error",
                        };
                        inner
                            .metrics
                            .downloads_failed
                            .get_or_create(&crate::metrics::KindLabels { kind })
                            .inc();
                        tracing::warn!(error = %e, "download failed");
                        State::Failed(e)
                    }
                };
                guard.finish(state);
            }
            .instrument(span),
        );
        Ok(Join::Download(d))
    }

    /// [`Downloads::join`] for a source that must use the store (a mount, a prewarm): while a
    /// download it may not share holds the blob (an isolated one, for an unproven requester),
    /// wait for that one to end and try again.
    pub async fn join_shared(&self, id: &BlobId, source: Source) -> Result<Join, StoreError> {
        loop {
            match self.join(id, source.clone())? {
                Join::Elsewhere => {
                    let running = {
                        let active = self.inner.active.lock().unwrap_or_else(|e| e.into_inner());
                        active.get(id).cloned()
                    };
                    match running {
                        Some(d) => {
                            let mut rx = d.subscribe();
                            while matches!(rx.borrow_and_update().state, State::Running) {
                                if rx.changed().await.is_err() {
                                    break;
                                }
                            }
                        }
                        None => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                    if self.inner.cancel.is_cancelled() {
                        return Err(StoreError::Io {
                            path: Default::default(),
                            source: std::io::Error::other("shutting down"),
                        });
                    }
                }
                other => return Ok(other),
            }
        }
    }

    /// Number of downloads running now.
    pub fn active(&self) -> usize {
        self.inner
            .active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

impl Download {
    pub fn subscribe(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    /// Wait until the blob size is known (or the download failed).
    pub async fn size(&self) -> Result<u64, DownloadError> {
        let mut rx = self.subscribe();
        loop {
            {
                let p = rx.borrow_and_update();
                if let State::Failed(e) = &p.state {
                    return Err(e.clone());
                }
                if let Some(s) = p.size {
                    return Ok(s);
                }
            }
            if rx.changed().await.is_err() {
                return Err(DownloadError::Shutdown);
            }
        }
    }

    /// The bytes of `range`, in order, as the download writes them. The
    /// stream ends with an error (aborting the response) if the download
    /// fails; the blob's last byte is released only after verification.
    pub fn stream(
        self: Arc<Self>,
        range: Range<u64>,
        metrics: Arc<Metrics>,
    ) -> impl Stream<Item = Result<Bytes, std::io::Error>> {
        let rx = self.subscribe();
        futures::stream::unfold((self, rx, range.start), move |(d, mut rx, pos)| {
            let metrics = metrics.clone();
            let end = range.end;
            async move {
                if pos >= end {
                    return None;
                }
                loop {
                    let (readable, failed) = {
                        let p = rx.borrow_and_update();
                        let size = p.size.unwrap_or(0);
                        match &p.state {
                            State::Complete => (end, None),
                            // Hold back the final byte until the digest is known.
                            State::Running => {
                                (p.written.min(size.saturating_sub(1)).min(end), None)
                            }
                            State::Failed(e) => (0, Some(e.to_string())),
                        }
                    };
                    if let Some(e) = failed {
                        let err = std::io::Error::other(format!("download failed: {e}"));
                        return Some((Err(err), (d, rx, end)));
                    }
                    if readable > pos {
                        let len = (readable - pos).min(READ_CHUNK);
                        return match d.read(pos, len).await {
                            Ok(b) => {
                                metrics.served("blob", b.len() as u64);
                                let next = pos + b.len() as u64;
                                Some((Ok(b), (d, rx, next)))
                            }
                            Err(e) => Some((Err(e), (d, rx, end))),
                        };
                    }
                    if rx.changed().await.is_err() {
                        let err = std::io::Error::other("download ended without a result");
                        return Some((Err(err), (d, rx, end)));
                    }
                }
            }
        })
    }

    async fn read(self: &Arc<Self>, pos: u64, len: u64) -> Result<Bytes, std::io::Error> {
        let d = self.clone();
        tokio::task::spawn_blocking(move || {
            let raw = d
                .raw
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .ok_or_else(|| std::io::Error::other("content file not open"))?;
            let mut buf = vec![0u8; len as usize];
            let mut filled = 0;
            while filled < buf.len() {
                let n = raw.read_at(pos + filled as u64, &mut buf[filled..])?;
                if n == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "content file short",
                    ));
                }
                filled += n;
            }
            Ok(Bytes::from(buf))
        })
        .await
        .map_err(std::io::Error::other)?
    }
}

/// Ends a download whichever way its task ends: removes it from the active map and publishes its
/// final state — `Failed` when the task panicked or was dropped before saying, so that followers
/// get an error instead of waiting forever and a later request starts afresh.
struct Finished {
    inner: Arc<Inner>,
    d: Arc<Download>,
    state: Option<State>,
}

impl Finished {
    fn new(inner: Arc<Inner>, d: Arc<Download>) -> Self {
        Self {
            inner,
            d,
            state: None,
        }
    }

    fn finish(&mut self, state: State) {
        self.state = Some(state);
    }
}

impl Drop for Finished {
    fn drop(&mut self) {
        self.inner.metrics.downloads_in_flight.dec();
        let state = self.state.take().unwrap_or_else(|| {
            tracing::error!(blob = %self.d.id, "download task ended without a result (panicked?)");
            self.inner
                .metrics
                .downloads_failed
                .get_or_create(&crate::metrics::KindLabels { kind: "panic" })
                .inc();
            State::Failed(DownloadError::Aborted)
        });
        let mut active = self.inner.active.lock().unwrap_or_else(|e| e.into_inner());
        if active
            .get(&self.d.id)
            .is_some_and(|x| Arc::ptr_eq(x, &self.d))
        {
            active.remove(&self.d.id);
        }
        drop(active);
        self.d.progress.send_modify(|p| p.state = state);
    }
}

/// The writer and the running hash travel together between the async task
/// and the blocking pool.
pub(crate) struct Sink {
    writer: BlobWriter,
    verifier: Verifier,
    committed: u64,
}

/// One download's progress across its sources: the writer (once the size
/// is known) and the contiguous prefix `[0, pos)` written and hashed.
pub(crate) struct Fill {
    /// None while a write is in flight ([`Pending`]).
    sink: Option<Sink>,
    /// Bytes handed to the writer; written and hashed once no write is in flight.
    pos: u64,
    size: Option<u64>,
    /// Some bytes came from peers.
    from_peers: bool,
    /// Readers were shown bytes from peers (verified per piece only).
    peer_exposed: bool,
    /// New bytes are neither committed nor shown to readers until the whole
    /// blob is verified (bytes from DHT providers, which come with no trusted
    /// piece hashes).
    held_back: bool,
    /// New bytes are shown to readers (the download's own requester) but not committed until
    /// the whole blob is verified (an isolated download).
    defer_commit: bool,
}

impl Fill {
    fn new(pos: u64, size: Option<u64>) -> Self {
        Self {
            sink: None,
            pos,
            size,
            from_peers: false,
            peer_exposed: false,
            held_back: false,
            defer_commit: false,
        }
    }

    /// Whether written bytes may be committed (made present in the store) before the whole blob
    /// is verified.
    fn may_commit(&self) -> bool {
        !self.held_back && !self.defer_commit
    }

    /// Readers may see `[0, pos)` now (unless bytes are held back).
    fn expose(&mut self, d: &Download) {
        if !self.held_back {
            let pos = self.pos;
            self.peer_exposed |= self.from_peers;
            d.progress.send_modify(|p| p.written = pos);
        }
    }
}

/// The nice value of the threads that ingest downloads, over the node's own.
pub(crate) const INGEST_NICE: i32 = 10;

/// Runs a download's CPU and disk work — writing fetched bytes, hashing them, committing,
/// checking peers' pieces — on the ingest threads ([`ingest_pool`]).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, DownloadError> {
    spawn_ingest(f).await.map_err(ingest_failed)
}

/// Starts `f` on the ingest threads ([`ingest_pool`]), or the caller's blocking pool without one.
fn spawn_ingest<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> tokio::task::JoinHandle<T> {
    match ingest_pool() {
        Some(pool) => pool.spawn_blocking(f),
        None => tokio::task::spawn_blocking(f),
    }
}

fn ingest_failed(e: tokio::task::JoinError) -> DownloadError {
    DownloadError::Store(format!("blocking task failed: {e}"))
}

/// The threads that ingest downloads: a blocking pool of its own whose threads run
/// [`INGEST_NICE`] lower in CPU priority than the node's other threads. When the cores are
/// busy, answers from what the node already holds (manifests, cached blobs and ranges, lazy
/// mount reads) and the host's own workloads go first, and cold fills take the CPU left over;
/// with idle cores nothing changes. (Raising one's own nice needs no privilege; Linux keeps it
/// per thread.) `None` if the pool cannot be built: the caller's runtime does the work then.
fn ingest_pool() -> Option<&'static tokio::runtime::Handle> {
    static POOL: std::sync::OnceLock<Option<tokio::runtime::Runtime>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(64)
            .thread_name("shoal-ingest")
            .on_thread_start(|| {
                // The calling thread only (who = 0 is the thread on Linux).
                if let Err(e) = rustix::process::setpriority_process(None, INGEST_NICE) {
                    tracing::debug!(error = %e, "ingest thread keeps the node's priority");
                }
            })
            .build()
            .map_err(|e| tracing::warn!(error = %e, "no ingest pool; downloads share the node's threads"))
            .ok()
    })
    .as_ref()
    .map(tokio::runtime::Runtime::handle)
}

/// How an origin fill ended short of an error.
enum OriginEnd {
    Done,
    /// The scheduler took the lease back: continue from peers.
    Revoked,
}

async fn run(inner: &Inner, d: &Download, src: &Source) -> Result<(), DownloadError> {
    let id = d.id.clone();
    let existing = {
        let (store, id) = (inner.store.clone(), id.clone());
        blocking(move || store.blob(&id)).await??
    };
    // Resume from the committed prefix of a partial blob.
    let partial = existing.as_ref().filter(|r| !r.complete);
    let resume_from = partial
        .and_then(|r| {
            r.present
                .iter()
                .next()
                .filter(|g| g.start == 0)
                .map(|g| g.end)
        })
        .unwrap_or(0);
    if let Some(rec) = partial {
        tracing::info!(from = resume_from, size = rec.size, "resuming partial blob");
    }
    let mut fill = Fill::new(resume_from, partial.map(|r| r.size));
    fill.defer_commit = src.isolated;
    let mut use_peers = inner.peering.is_some() && !inner.no_peers(&id) && !src.isolated;
    loop {
        let result = attempt(inner, d, src, &mut fill, use_peers).await;
        if result.is_err() && src.isolated {
            // Nothing of an isolated download stays: its bytes were never verified.
            if let Some(sink) = fill.sink.take() {
                let _ = blocking(move || sink.writer.discard()).await;
            }
            return result;
        }
        match result {
            Err(DownloadError::DigestMismatch(_)) if fill.from_peers => {
                // Some holder (or the lease holder's piece list) was wrong.
                inner.mark_no_peers(&id);
                if !fill.peer_exposed {
                    tracing::warn!(
                        "blob from peers did not match its digest; refetching from the origin"
                    );
                    use_peers = false;
                    fill = Fill::new(0, None);
                    d.progress.send_modify(|p| p.written = 0);
                    continue;
                }
                // Readers already saw bytes: fail them (never complete a
                // stream with wrong bytes); the next request goes to the
                // origin.
                tracing::error!("blob from peers did not match its digest; failing this download, the next one uses the origin");
                return result;
            }
            other => return other,
        }
    }
}

/// Peers (when allowed) until they finish the blob, grant this node the
/// origin lease, or cannot help; then the origin.
async fn attempt(
    inner: &Inner,
    d: &Download,
    src: &Source,
    fill: &mut Fill,
    use_peers: bool,
) -> Result<(), DownloadError> {
    let peering = inner.peering.as_ref().filter(|_| use_peers);
    if fill.sink.is_none() {
        if let Some(size) = fill.size.filter(|&s| fill.pos >= s) {
            // Every byte was committed but the node stopped before recording the blob complete
            // (a crash between the last commit and completion): nothing is left to fetch — and
            // asking the origin for `bytes=<size>-` gets a 416. Re-hash the file and complete.
            ensure_sink(inner, d, fill, size).await?;
            return finish(inner, d, src, fill).await;
        }
    }
    loop {
        let mut lease = false;
        if let Some(p) = peering {
            match peers::fill(inner, p, d, fill).await? {
                peers::Outcome::Done => {
                    inner.metrics.decision("peers");
                    return finish(inner, d, src, fill).await;
                }
                peers::Outcome::Lease => {
                    inner.metrics.decision("lease");
                    lease = true;
                }
                peers::Outcome::Origin(why) => {
                    tracing::info!(why, "fetching from the origin");
                    inner.metrics.decision("origin_fallback");
                }
                peers::Outcome::Again => continue,
            }
        } else {
            inner.metrics.decision("origin_standalone");
        }
        if let Some(p) = peering {
            if lease {
                p.lease_started(&d.id);
            }
            p.origin_fetch_started(&d.id);
        }
        let result = origin_fill(inner, d, src, fill, lease).await;
        if lease {
            if let Some(p) = peering {
                p.lease_ended(&d.id);
            }
        }
        match result? {
            OriginEnd::Done => return finish(inner, d, src, fill).await,
            OriginEnd::Revoked => continue,
        }
    }
}

/// Open the writer for a blob of `size` (resuming at `fill.pos`), if not
/// open yet, and tell readers the size.
pub(crate) async fn ensure_sink(
    inner: &Inner,
    d: &Download,
    fill: &mut Fill,
    size: u64,
) -> Result<(), DownloadError> {
    if let Some(s) = &fill.sink {
        if s.writer.size() != size {
            return Err(DownloadError::Length {
                got: size,
                expected: s.writer.size(),
            });
        }
        return Ok(());
    }
    // A lazy mount's chunk backend may hold this blob's writer for the few
    // milliseconds it takes to store a verified chunk: wait for it briefly.
    let mut tries = 0;
    let start = fill.pos;
    let sink = loop {
        let (store, id) = (inner.store.clone(), d.id.clone());
        match blocking(move || open_sink(&store, &id, size, start)).await? {
            Err(DownloadError::WriterBusy) if tries < 100 => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            other => break other?,
        }
    };
    *d.raw.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(sink.writer.raw_reader()?));
    fill.sink = Some(sink);
    fill.size = Some(size);
    let exposed = if fill.held_back { 0 } else { start };
    d.progress.send_modify(|p| {
        p.size = Some(size);
        p.written = p.written.max(exposed);
    });
    Ok(())
}

/// Write `data` at `fill.pos` (hashing it) and advance; commit what is
/// written when `commit` is set.
pub(crate) async fn write(
    fill: &mut Fill,
    data: Vec<u8>,
    commit: bool,
) -> Result<(), DownloadError> {
    let sink = fill
        .sink
        .take()
        .ok_or_else(|| DownloadError::Store("writer not open".into()))?;
    let n = data.len() as u64;
    fill.sink = Some(flush(sink, data, fill.pos, commit).await?);
    fill.pos += n;
    Ok(())
}

/// Bytes written but not committed yet.
pub(crate) fn uncommitted(fill: &Fill) -> u64 {
    fill.sink
        .as_ref()
        .map_or(0, |s| fill.pos.saturating_sub(s.committed))
}

/// Verify the whole blob and mark it complete, or discard it.
async fn finish(
    inner: &Inner,
    d: &Download,
    src: &Source,
    fill: &mut Fill,
) -> Result<(), DownloadError> {
    let size = fill.size.unwrap_or(0);
    if fill.pos != size {
        return Err(DownloadError::Length {
            got: fill.pos,
            expected: size,
        });
    }
    let sink = fill
        .sink
        .take()
        .ok_or_else(|| DownloadError::Store("writer not open".into()))?;
    let key = RepoKey {
        upstream: src.origin.host.clone(),
        repo: src.repo.clone(),
    };
    let open = src.open;
    let store = inner.store.clone();
    let end = fill.pos;
    blocking(move || -> Result<(), DownloadError> {
        let Sink {
            mut writer,
            verifier,
            committed,
        } = sink;
        let id = writer.id().clone();
        match verifier.finish() {
            Ok(verified) => {
                // Bytes still uncommitted (held back from peers and readers
                // until now) become present only once verified.
                if end > committed {
                    writer.commit(committed..end)?;
                }
                writer.complete(verified)?;
                store.add_repo(&id, key, open)?;
                Ok(())
            }
            Err(_) => {
                writer.discard()?;
                Err(DownloadError::DigestMismatch(id))
            }
        }
    })
    .await??;
    d.progress.send_modify(|p| p.written = end);
    if let Some(p) = &inner.peering {
        p.completed(&d.id);
    }
    Ok(())
}

/// Open (or resume) the writer; re-hash the kept prefix so the digest covers
/// the whole blob.
fn open_sink(store: &Store, id: &BlobId, size: u64, start: u64) -> Result<Sink, DownloadError> {
    let writer = match store.open_writer(id, size) {
        Err(StoreError::SizeMismatch { .. }) => {
            store.remove(id)?;
            store.open_writer(id, size)?
        }
        Err(StoreError::WriterBusy { .. }) => return Err(DownloadError::WriterBusy),
        other => other?,
    };
    let mut verifier = Verifier::new(id);
    if start > 0 {
        origin::hash_from_file(&writer, &mut verifier, 0..start)?;
    }
    Ok(Sink {
        writer,
        verifier,
        committed: start,
    })
}

/// Write `data` at `pos` (and hash it); commit everything written so far
/// when `commit` is set.
async fn flush(sink: Sink, data: Vec<u8>, pos: u64, commit: bool) -> Result<Sink, DownloadError> {
    blocking(move || flush_now(sink, data, pos, commit)).await?
}

/// Writes `data` at `pos`, hashes it, and commits up to its end if `commit`.
fn flush_now(mut sink: Sink, data: Vec<u8>, pos: u64, commit: bool) -> Result<Sink, DownloadError> {
    if !data.is_empty() {
        sink.writer.write_at(pos, &data)?;
        sink.verifier.update(&data);
    }
    let end = pos + data.len() as u64;
    if commit && end > sink.committed {
        sink.writer.commit(sink.committed..end)?;
        sink.committed = end;
    }
    Ok(sink)
}

/// A fill's write in flight on the ingest threads while the next batch is read: the network
/// reads and the disk and hashing work overlap instead of taking turns. At most one is in
/// flight, and the fill's bytes go to the writer in order.
///
/// While one is in flight the fill has no sink and its `pos` already counts the bytes handed
/// over; [`Pending::settle`] gives the sink back and shows the bytes to readers. Every path
/// that uses the sink, or leaves the fill, settles first.
#[derive(Default)]
pub(crate) struct Pending(Option<(tokio::task::JoinHandle<Result<Sink, DownloadError>>, bool)>);

impl Pending {
    /// Hands `data` (the bytes after `fill.pos`) to the writer without waiting for it.
    /// The caller has settled the previous write.
    pub(crate) fn start(
        &mut self,
        fill: &mut Fill,
        data: Vec<u8>,
        commit: bool,
    ) -> Result<(), DownloadError> {
        debug_assert!(self.0.is_none(), "one write in flight at most");
        let sink = fill
            .sink
            .take()
            .ok_or_else(|| DownloadError::Store("writer not open".into()))?;
        let pos = fill.pos;
        fill.pos += data.len() as u64;
        let task = spawn_ingest(move || flush_now(sink, data, pos, commit));
        self.0 = Some((task, commit));
        Ok(())
    }

    /// Waits for the write in flight, if any, and shows its bytes to readers. Returns whether
    /// it committed.
    pub(crate) async fn settle(
        &mut self,
        fill: &mut Fill,
        d: &Download,
    ) -> Result<bool, DownloadError> {
        let Some((task, commit)) = self.0.take() else {
            return Ok(false);
        };
        let sink = task.await.map_err(ingest_failed)??;
        fill.sink = Some(sink);
        fill.expose(d);
        Ok(commit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Download work yields the CPU to the node's answers: its threads run INGEST_NICE lower.
    #[tokio::test]
    async fn download_work_runs_at_a_lower_cpu_priority() {
        let mine = rustix::process::getpriority_process(None).expect("own priority");
        let theirs = blocking(|| rustix::process::getpriority_process(None))
            .await
            .expect("ran")
            .expect("ingest priority");
        assert_eq!(theirs, (mine + INGEST_NICE).min(19));
        // The caller's thread is untouched.
        assert_eq!(
            rustix::process::getpriority_process(None).expect("own"),
            mine
        );
    }
}
