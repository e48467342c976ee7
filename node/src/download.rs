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

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use futures::Stream;
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_RANGE, RANGE, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};
use shoal_proto::{BlobId, RepoName};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::metrics::Metrics;
use crate::store::{BlobWriter, RawReader, RepoKey, Store, StoreError, Verifier};
use crate::upstream::{AuthMode, Origin};

/// Bytes buffered before one write to the content file.
const WRITE_BATCH: usize = 256 << 10;
/// Bytes written between two commits (fsync + metadata). Committed bytes are
/// what peers can be served, so this is also the pipelining granularity.
const COMMIT_EVERY: u64 = 8 << 20;
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
    progress: watch::Sender<Progress>,
    raw: OnceLock<RawReader>,
}

/// The answer of [`Downloads::join`].
pub enum Join {
    /// The store holds the complete, verified blob: serve it from there.
    Complete,
    Download(Arc<Download>),
}

/// What a new download fetches from.
#[derive(Clone, Debug)]
pub struct Source {
    pub origin: Arc<Origin>,
    pub repo: RepoName,
    pub auth: AuthMode,
    /// Whether anyone may read it (recorded with the blob).
    pub public: bool,
}

/// The node's download manager. Cheap to clone.
#[derive(Clone)]
pub struct Downloads {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    metrics: Arc<Metrics>,
    active: Mutex<HashMap<BlobId, Arc<Download>>>,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Downloads {
    pub fn new(
        store: Store,
        metrics: Arc<Metrics>,
        tracker: TaskTracker,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                metrics,
                active: Mutex::new(HashMap::new()),
                tracker,
                cancel,
            }),
        }
    }

    /// Join or start the download of `id`.
    pub fn join(&self, id: &BlobId, source: Source) -> Result<Join, StoreError> {
        let mut active = self.inner.active.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = active.get(id) {
            return Ok(Join::Download(d.clone()));
        }
        // Checked under the lock: a download removes itself only after the
        // store says complete, so this cannot miss one finishing.
        if self.inner.store.blob(id)?.is_some_and(|r| r.complete) {
            return Ok(Join::Complete);
        }
        let (tx, _) = watch::channel(Progress {
            size: None,
            written: 0,
            state: State::Running,
        });
        let d = Arc::new(Download {
            id: id.clone(),
            progress: tx,
            raw: OnceLock::new(),
        });
        active.insert(id.clone(), d.clone());
        drop(active);
        let inner = self.inner.clone();
        let task_d = d.clone();
        let span = tracing::info_span!("download", blob = %id, origin = %source.origin.host, repo = %source.repo);
        self.inner.tracker.spawn(
            async move {
                inner.metrics.downloads_in_flight.inc();
                let result = run(&inner, &task_d, &source).await;
                inner.metrics.downloads_in_flight.dec();
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
                let mut active = inner.active.lock().unwrap_or_else(|e| e.into_inner());
                if active
                    .get(&task_d.id)
                    .is_some_and(|x| Arc::ptr_eq(x, &task_d))
                {
                    active.remove(&task_d.id);
                }
                drop(active);
                task_d.progress.send_modify(|p| p.state = state);
            }
            .instrument(span),
        );
        Ok(Join::Download(d))
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
                .get()
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

/// The writer and the running hash travel together between the async task
/// and the blocking pool.
struct Sink {
    writer: BlobWriter,
    verifier: Verifier,
    committed: u64,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, DownloadError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DownloadError::Store(format!("blocking task failed: {e}")))
}

async fn run(inner: &Inner, d: &Download, src: &Source) -> Result<(), DownloadError> {
    let id = d.id.clone();
    let store = inner.store.clone();
    let existing = {
        let (store, id) = (store.clone(), id.clone());
        blocking(move || store.blob(&id)).await??
    };
    // Resume from the committed prefix of a partial blob.
    let resume_from = existing
        .as_ref()
        .filter(|r| !r.complete)
        .map(|r| {
            r.present
                .iter()
                .next()
                .filter(|g| g.start == 0)
                .map_or(0, |g| g.end)
        })
        .unwrap_or(0);
    let path = format!("/v2/{}/blobs/{}", src.repo, id);
    let mut headers = HeaderMap::new();
    if resume_from > 0 {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes={resume_from}-")) {
            headers.insert(RANGE, v);
        }
    }
    let mut resp = src
        .origin
        .send(
            Method::GET,
            &path,
            &headers,
            &src.auth,
            Some(&src.repo),
            "blob",
        )
        .await
        .map_err(|e| DownloadError::Origin(e.to_string()))?;
    let (start, size) = match resp.status() {
        StatusCode::OK => (0, resp.content_length().ok_or(DownloadError::NoLength)?),
        StatusCode::PARTIAL_CONTENT if resume_from > 0 => {
            let total = resp
                .headers()
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.rsplit('/').next())
                .and_then(|t| t.parse::<u64>().ok())
                .ok_or(DownloadError::NoLength)?;
            (resume_from, total)
        }
        status => {
            return Err(DownloadError::Status {
                status,
                challenge: resp.headers().get(WWW_AUTHENTICATE).cloned(),
            })
        }
    };
    // A lazy mount's chunk backend may hold this blob's writer for the few
    // milliseconds it takes to store a verified chunk: wait for it briefly.
    let mut tries = 0;
    let sink = loop {
        let (store, id) = (store.clone(), id.clone());
        match blocking(move || open_sink(&store, &id, size, start)).await? {
            Err(DownloadError::WriterBusy) if tries < 100 => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            other => break other?,
        }
    };
    let mut sink = sink;
    if d.raw.set(sink.writer.raw_reader()?).is_err() {
        return Err(DownloadError::Store("download started twice".into()));
    }
    if let Some(rec) = &existing {
        tracing::info!(
            from = start,
            size,
            had = rec.present.len(),
            "resuming partial blob"
        );
    }
    d.progress.send_modify(|p| {
        p.size = Some(size);
        p.written = start;
    });
    let mut pos = start;
    let mut batch: Vec<u8> = Vec::with_capacity(WRITE_BATCH);
    loop {
        let chunk = tokio::select! {
            c = resp.chunk() => c.map_err(|e| DownloadError::Origin(e.to_string())),
            _ = inner.cancel.cancelled() => Err(DownloadError::Shutdown),
        };
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                // Keep what arrived intact: a later download resumes there.
                let _ = flush(sink, std::mem::take(&mut batch), pos, true).await;
                return Err(e);
            }
        };
        let Some(chunk) = chunk else { break };
        inner.metrics.from_origin("blob", chunk.len() as u64);
        let after = pos + batch.len() as u64 + chunk.len() as u64;
        if after > size {
            let _ = blocking(move || sink.writer.discard()).await;
            return Err(DownloadError::Length {
                got: after,
                expected: size,
            });
        }
        batch.extend_from_slice(&chunk);
        if batch.len() >= WRITE_BATCH {
            let n = batch.len() as u64;
            let commit = pos + n - sink.committed >= COMMIT_EVERY;
            sink = flush(
                sink,
                std::mem::replace(&mut batch, Vec::with_capacity(WRITE_BATCH)),
                pos,
                commit,
            )
            .await?;
            pos += n;
            d.progress.send_modify(|p| p.written = pos);
        }
    }
    let n = batch.len() as u64;
    sink = flush(sink, batch, pos, true).await?;
    pos += n;
    if pos != size {
        return Err(DownloadError::Length {
            got: pos,
            expected: size,
        });
    }
    d.progress.send_modify(|p| p.written = pos);
    let key = RepoKey {
        upstream: src.origin.host.clone(),
        repo: src.repo.clone(),
    };
    let public = src.public;
    blocking(move || -> Result<(), DownloadError> {
        match sink.verifier.finish() {
            Ok(verified) => {
                let id = sink.writer.id().clone();
                sink.writer.complete(verified)?;
                store.add_repo(&id, key, public)?;
                Ok(())
            }
            Err(_) => {
                let id = sink.writer.id().clone();
                sink.writer.discard()?;
                Err(DownloadError::DigestMismatch(id))
            }
        }
    })
    .await?
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
        let raw = writer.raw_reader()?;
        let mut buf = vec![0u8; READ_CHUNK as usize];
        let mut off = 0;
        while off < start {
            let want = (start - off).min(READ_CHUNK) as usize;
            let n = raw
                .read_at(off, &mut buf[..want])
                .map_err(|e| DownloadError::Store(e.to_string()))?;
            if n == 0 {
                return Err(DownloadError::Store(
                    "partial blob shorter than recorded".into(),
                ));
            }
            verifier.update(&buf[..n]);
            off += n as u64;
        }
    }
    Ok(Sink {
        writer,
        verifier,
        committed: start,
    })
}

/// Write `data` at `pos` (and hash it); commit everything written so far
/// when `commit` is set.
async fn flush(
    mut sink: Sink,
    data: Vec<u8>,
    pos: u64,
    commit: bool,
) -> Result<Sink, DownloadError> {
    blocking(move || -> Result<Sink, DownloadError> {
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
    })
    .await?
}
