//! The node's side of cluster-wide prewarm jobs (`shoal prewarm`): run the
//! jobs the schedulers assign (in their announce answers) and report how far
//! each got (in the next announcements).
//!
//! A job: parse the image reference → resolve it on the node's origin for
//! that registry, with the node's credentials (tag → manifest, an index →
//! this host's platform) and keep the manifests and the tag in the store, so
//! a later pull through this node's mirror needs nothing from the origin →
//! fetch the blobs through [`Downloads::join`], the one download path (so
//! the origin is read about once cluster-wide and the rest swarms between
//! peers), at most [`PARALLEL_BLOBS`] at a time. OCI image: the config and
//! every layer. Nydus image: the config and the bootstrap layer, plus every
//! data blob with `full` (the bootstrap's prefetch list is not used yet).
//!
//! Assignments are level-triggered (see `shoal_proto::sched::jobs`): a job
//! its scheduler no longer lists is cancelled here — its downloads already
//! running finish, since their bytes are wanted in the cache anyway — and
//! a finished job is reported until its scheduler stops listing it.
//!
//! Invariants: one task per job id; the job table's lock is never held
//! across an `.await` or while calling out; a failed job's message names
//! the image and what failed, in words an operator can act on.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use futures::StreamExt as _;
use serde::Deserialize;
use shoal_proto::sched::{JobAssignment, JobId, JobProgress, NodeJobState};
use shoal_proto::{BlobId, Digest, Reference, RepoName};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::download::{DownloadError, Downloads, Join, Source, State};
use crate::mount::image::{
    nydus_layers, pick_platform, platform_or_host, Descriptor, ImageError, ImageRef,
};
use crate::peering::Peering;
use crate::store::{ManifestRecord, Provenance, RepoKey, Store, StoreError, TagRecord};
use crate::upstream::{AuthMode, ManifestError, Origin, OriginError, Upstreams};

/// Blobs of one job fetched at once.
pub const PARALLEL_BLOBS: usize = 4;
/// Why a job failed on this node.
#[derive(Debug, thiserror::Error)]
pub enum PrewarmError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{0}")]
    Origin(#[from] OriginError),
    #[error("{image}: no such image at the origin ({what} answered 404 Not Found)")]
    NotFound { image: String, what: String },
    #[error("{image}: the origin refused this node's credentials for {what} ({status}); check the node's upstream credentials")]
    Denied {
        image: String,
        what: String,
        status: u16,
    },
    #[error("{image}: the origin answered {status} for {what}")]
    Status {
        image: String,
        what: String,
        status: u16,
    },
    #[error("{image}: cannot reach the origin registry for {what}: {reason}")]
    Unreachable {
        image: String,
        what: String,
        reason: String,
    },
    #[error("{image}: {what} is not an image manifest or index: {reason}")]
    NotImage {
        image: String,
        what: String,
        reason: String,
    },
    #[error("{image}: blob {digest}: {source}")]
    Blob {
        image: String,
        digest: BlobId,
        source: DownloadError,
    },
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("the node is shutting down")]
    Shutdown,
}

/// Handle to the job runner. Cheap to clone.
#[derive(Clone)]
pub struct Prewarm {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    upstreams: Arc<Upstreams>,
    downloads: Downloads,
    /// Told when a job finishes, so the news goes out before the heartbeat.
    peering: Option<Peering>,
    jobs: Mutex<HashMap<JobId, Entry>>,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

struct Entry {
    /// Index of the scheduler that assigned it (its answers decide).
    scheduler: usize,
    cancel: CancellationToken,
    progress: watch::Receiver<JobProgress>,
}

impl Prewarm {
    pub fn new(
        store: Store,
        upstreams: Arc<Upstreams>,
        downloads: Downloads,
        peering: Option<Peering>,
        tracker: TaskTracker,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                upstreams,
                downloads,
                peering,
                jobs: Mutex::new(HashMap::new()),
                tracker,
                cancel,
            }),
        }
    }

    /// Scheduler `scheduler` answered with `assigned`: start what is new,
    /// cancel (and forget) what it no longer lists.
    pub fn apply(&self, scheduler: usize, assigned: Vec<JobAssignment>) {
        let listed: HashSet<JobId> = assigned.iter().map(|a| a.job).collect();
        let mut jobs = self.jobs();
        jobs.retain(|id, e| {
            if e.scheduler != scheduler || listed.contains(id) {
                return true;
            }
            if !e.progress.borrow().state.is_final() {
                tracing::info!(job = %id, "prewarm job cancelled by its scheduler");
            }
            e.cancel.cancel();
            false
        });
        for a in assigned {
            if jobs.contains_key(&a.job) || self.inner.cancel.is_cancelled() {
                continue;
            }
            let id = a.job;
            jobs.insert(id, self.start(a, scheduler));
        }
    }

    /// Where every known job stands.
    pub fn reports(&self) -> Vec<JobProgress> {
        let mut v: Vec<JobProgress> = self
            .jobs()
            .values()
            .map(|e| e.progress.borrow().clone())
            .collect();
        v.sort_by_key(|p| p.job);
        v
    }

    fn jobs(&self) -> MutexGuard<'_, HashMap<JobId, Entry>> {
        self.inner.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn start(&self, a: JobAssignment, scheduler: usize) -> Entry {
        let id = a.job;
        let (tx, rx) = watch::channel(JobProgress {
            job: id,
            state: NodeJobState::Running,
            bytes_done: 0,
            bytes_total: 0,
            blobs_done: 0,
            blobs_total: 0,
            message: Some("resolving the image".into()),
        });
        let cancel = self.inner.cancel.child_token();
        let inner = self.inner.clone();
        let token = cancel.clone();
        let span = tracing::info_span!("prewarm", job = %id, image = %a.image);
        self.inner.tracker.spawn(
            async move {
                tracing::info!(full = a.full, "prewarm job started");
                let started = std::time::Instant::now();
                let result = tokio::select! {
                    r = warm(&inner, &a, &tx) => r,
                    _ = token.cancelled() => Err(PrewarmError::Shutdown),
                };
                if token.is_cancelled() {
                    tracing::info!("prewarm job stopped (cancelled or shutting down)");
                    return;
                }
                let elapsed = started.elapsed();
                match result {
                    Ok(note) => {
                        let p = tx.borrow().clone();
                        tracing::info!(
                            bytes = p.bytes_total,
                            blobs = p.blobs_total,
                            ?elapsed,
                            "prewarm job done"
                        );
                        tx.send_modify(|p| {
                            p.state = NodeJobState::Done;
                            p.message = note;
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, ?elapsed, "prewarm job failed");
                        tx.send_modify(|p| {
                            p.state = NodeJobState::Failed;
                            p.message = Some(e.to_string());
                        });
                    }
                }
                if let Some(p) = &inner.peering {
                    p.announce_soon();
                }
            }
            .instrument(span),
        );
        Entry {
            scheduler,
            cancel,
            progress: rx,
        }
    }
}

/// The raw fields of a manifest or index that prewarm needs.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RawManifest {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

/// Resolve the image, keep its manifests, fetch its blobs. `Ok(note)`: a
/// remark for the operator (what was left out).
async fn warm(
    inner: &Inner,
    a: &JobAssignment,
    tx: &watch::Sender<JobProgress>,
) -> Result<Option<String>, PrewarmError> {
    let image = ImageRef::parse(&a.image)?;
    let origin = inner.upstreams.select(image.host.as_deref(), None)?;
    // Fetched with the node's own credentials (or none) for an operator's job: open in that
    // upstream and repository, as the mirror would record it.
    let open = true;
    let (blobs, note) = resolve(inner, &origin, &image, a.full, open).await?;
    let total: u64 = blobs.iter().map(|d| d.size).sum();
    tx.send_modify(|p| {
        p.bytes_total = total;
        p.blobs_total = u32::try_from(blobs.len()).unwrap_or(u32::MAX);
        p.message = note.clone();
    });
    let source = Source {
        origin,
        repo: image.repo.clone(),
        auth: AuthMode::Node,
        open,
        isolated: false,
    };
    let name = image.to_string();
    let mut fetches = futures::stream::iter(blobs.into_iter().map(|d| {
        let source = source.clone();
        let name = name.as_str();
        async move { fetch_blob(&inner.downloads, &d, source, tx, name).await }
    }))
    .buffer_unordered(PARALLEL_BLOBS);
    while let Some(r) = fetches.next().await {
        r?;
        tx.send_modify(|p| p.blobs_done += 1);
    }
    Ok(note)
}

/// The blobs to fetch for `image`, after keeping its manifests and tag in
/// the store.
async fn resolve(
    inner: &Inner,
    origin: &Arc<Origin>,
    image: &ImageRef,
    full: bool,
    open: bool,
) -> Result<(Vec<Descriptor>, Option<String>), PrewarmError> {
    let name = image.to_string();
    let (mut digest, mut bytes, mut media_type) =
        fetch_manifest(origin, &image.repo, &image.reference, &name).await?;
    let mut keep = Vec::new();
    if let Reference::Tag(tag) = &image.reference {
        keep.push(Kept::Tag(tag.clone(), digest.clone(), media_type.clone()));
    }
    let mut raw = parse(&name, &digest, &bytes)?;
    for _ in 0..2 {
        let Some(index) = &raw.manifests else { break };
        keep.push(Kept::Manifest(digest.clone(), media_type, bytes));
        let d = pick_platform(index, &digest, &platform_or_host(None))?
            .digest
            .clone();
        (digest, bytes, media_type) =
            fetch_manifest(origin, &image.repo, &Reference::Digest(d), &name).await?;
        raw = parse(&name, &digest, &bytes)?;
    }
    let Some(layers) = raw.layers.take() else {
        return Err(PrewarmError::NotImage {
            image: name,
            what: format!("manifest {digest}"),
            reason: "no layers (an index nested too deep, or an artifact)".into(),
        });
    };
    keep.push(Kept::Manifest(digest, media_type, bytes));
    keep_manifests(&inner.store, origin, &image.repo, keep, open).await?;
    Ok(plan(&name, raw.config, layers, full))
}

/// What to fetch of an image manifest's config and layers, each blob once,
/// and a remark on what was left out. OCI image: everything. Nydus image:
/// the config and the bootstrap, or with `full` everything.
fn plan(
    name: &str,
    config: Option<Descriptor>,
    layers: Vec<Descriptor>,
    full: bool,
) -> (Vec<Descriptor>, Option<String>) {
    let mut blobs: Vec<Descriptor> = config.into_iter().collect();
    let note = match nydus_layers(name, &layers) {
        Ok(nydus) if !full && !nydus.blobs.is_empty() => {
            let skipped = nydus.blobs.len();
            blobs.push(nydus.bootstrap);
            Some(format!(
                "Nydus image: bootstrap only; {skipped} data blobs left to lazy reads (--full fetches them)"
            ))
        }
        _ => {
            blobs.extend(layers);
            None
        }
    };
    let mut seen = HashSet::new();
    blobs.retain(|d| seen.insert(d.digest.clone()));
    (blobs, note)
}

enum Kept {
    Tag(shoal_proto::Tag, Digest, String),
    Manifest(Digest, String, Vec<u8>),
}

/// Store the manifests (content-addressed, checked by the store) and the
/// tag, as the mirror would have after serving them.
async fn keep_manifests(
    store: &Store,
    origin: &Origin,
    repo: &RepoName,
    keep: Vec<Kept>,
    open: bool,
) -> Result<(), PrewarmError> {
    let store = store.clone();
    let host = origin.host.clone();
    let repo = repo.clone();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    tokio::task::spawn_blocking(move || {
        let key = RepoKey {
            upstream: host.clone(),
            repo: repo.clone(),
        };
        for k in keep {
            match k {
                Kept::Manifest(digest, media_type, bytes) => {
                    store.put_manifest(&ManifestRecord {
                        digest,
                        media_type,
                        bytes,
                        repos: Provenance::one(key.clone(), open),
                    })?
                }
                Kept::Tag(tag, digest, media_type) => store.put_tag(
                    &host,
                    &repo,
                    &tag,
                    &TagRecord {
                        digest,
                        media_type,
                        fetched_at_ms: now,
                        public: open,
                    },
                )?,
            }
        }
        Ok(())
    })
    .await
    .map_err(|_| PrewarmError::Shutdown)?
}

pub(crate) fn parse(
    image: &str,
    digest: &Digest,
    bytes: &[u8],
) -> Result<RawManifest, PrewarmError> {
    let raw: RawManifest = serde_json::from_slice(bytes).map_err(|e| PrewarmError::NotImage {
        image: image.into(),
        what: format!("manifest {digest}"),
        reason: e.to_string(),
    })?;
    if raw.manifests.is_none() && raw.layers.is_none() {
        return Err(PrewarmError::NotImage {
            image: image.into(),
            what: format!("manifest {digest}"),
            reason: format!(
                "neither `manifests` nor `layers` (media type {})",
                raw.media_type.as_deref().unwrap_or("not given")
            ),
        });
    }
    Ok(raw)
}

/// GET a manifest with the node's credentials: (digest, bytes, media type).
async fn fetch_manifest(
    origin: &Origin,
    repo: &RepoName,
    reference: &Reference,
    image: &str,
) -> Result<(Digest, Vec<u8>, String), PrewarmError> {
    let what = format!("manifest {repo}:{reference}");
    let image = image.to_owned();
    match origin.get_manifest(repo, reference).await {
        Ok(m) => Ok((
            m.digest,
            m.bytes,
            m.media_type
                .unwrap_or_else(|| "application/vnd.oci.image.manifest.v1+json".to_owned()),
        )),
        Err(ManifestError::Unreachable(reason)) => Err(PrewarmError::Unreachable {
            image,
            what,
            reason,
        }),
        Err(ManifestError::Status(404)) => Err(PrewarmError::NotFound { image, what }),
        Err(ManifestError::Status(status @ (401 | 403))) => Err(PrewarmError::Denied {
            image,
            what,
            status,
        }),
        Err(ManifestError::Status(status)) => Err(PrewarmError::Status {
            image,
            what,
            status,
        }),
        Err(e @ (ManifestError::TooLarge | ManifestError::DigestMismatch)) => {
            Err(PrewarmError::NotImage {
                image,
                what,
                reason: e.to_string(),
            })
        }
    }
}

/// Fetch one blob through the node's download path, adding its bytes to the
/// job's progress as they land.
async fn fetch_blob(
    downloads: &Downloads,
    desc: &Descriptor,
    source: Source,
    tx: &watch::Sender<JobProgress>,
    image: &str,
) -> Result<(), PrewarmError> {
    let fail = |source: DownloadError| PrewarmError::Blob {
        image: image.into(),
        digest: desc.digest.clone(),
        source,
    };
    let mut counted = 0u64;
    let mut count = |upto: u64| {
        let upto = upto.min(desc.size);
        if upto > counted {
            let delta = upto - counted;
            counted = upto;
            tx.send_modify(|p| p.bytes_done += delta);
        }
    };
    let d = match downloads.join_shared(&desc.digest, source).await? {
        Join::Complete => {
            count(desc.size);
            return Ok(());
        }
        // `join_shared` waits out downloads it may not share.
        Join::Elsewhere => return Err(fail(DownloadError::Aborted)),
        Join::Download(d) => d,
    };
    let mut rx = d.subscribe();
    loop {
        let state = {
            let p = rx.borrow_and_update();
            count(p.written);
            p.state.clone()
        };
        match state {
            State::Complete => {
                count(desc.size);
                return Ok(());
            }
            State::Failed(e) => return Err(fail(e)),
            State::Running => {}
        }
        if rx.changed().await.is_err() {
            return Err(fail(DownloadError::Shutdown));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn desc(n: u8, size: u64, annotation: Option<&str>) -> Descriptor {
        let mut j = serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": format!("sha256:{}", format!("{n:02x}").repeat(32)),
            "size": size,
        });
        if let Some(a) = annotation {
            j["annotations"] = serde_json::json!({ a: "true" });
        }
        serde_json::from_value(j).unwrap()
    }

    fn sizes(blobs: &[Descriptor]) -> Vec<u64> {
        blobs.iter().map(|d| d.size).collect()
    }

    #[test]
    fn oci_images_fetch_config_and_every_layer_once() {
        let (blobs, note) = plan(
            "img",
            Some(desc(1, 1, None)),
            vec![desc(2, 2, None), desc(3, 3, None), desc(2, 2, None)],
            false,
        );
        assert_eq!(sizes(&blobs), vec![1, 2, 3]);
        assert_eq!(note, None);
    }

    #[test]
    fn nydus_images_fetch_the_bootstrap_or_everything_with_full() {
        let layers = vec![
            desc(2, 20, Some("containerd.io/snapshot/nydus-blob")),
            desc(3, 30, Some("containerd.io/snapshot/nydus-blob")),
            desc(4, 4, Some("containerd.io/snapshot/nydus-bootstrap")),
        ];
        let (blobs, note) = plan("img", Some(desc(1, 1, None)), layers.clone(), false);
        assert_eq!(sizes(&blobs), vec![1, 4]);
        assert!(note.unwrap().contains("2 data blobs"));
        let (blobs, note) = plan("img", Some(desc(1, 1, None)), layers, true);
        assert_eq!(sizes(&blobs), vec![1, 20, 30, 4]);
        assert_eq!(note, None);
    }

    #[test]
    fn manifests_without_layers_or_manifests_are_not_images() {
        let d = Digest::sha256(b"x");
        let e = parse("img", &d, br#"{"schemaVersion":2,"config":{}}"#).err();
        assert!(matches!(e, Some(PrewarmError::NotImage { .. })));
        let e = parse("img", &d, b"not json").err();
        assert!(matches!(e, Some(PrewarmError::NotImage { .. })));
        assert!(parse("img", &d, br#"{"layers":[]}"#).is_ok());
    }
}
