//! The mount manager: lazy mounts of Nydus images (`shoal mount IMAGE DIR`), served by the
//! node's chunk backend.
//!
//! One actor task owns the mount table (the live mounts and the persisted requests,
//! `table`), reached through the cloneable [`Mounts`] handle over a bounded channel. Mounting
//! is slow (resolve, fetch the bootstrap), so the actor marks the directory `mounting` and hands
//! the work to a task, which reports back; listing and unmounting never wait behind it.
//!
//! Invariants: a directory has at most one entry; a mount request is persisted only once it is
//! mounted, and stays persisted (restored at every start, after lazily detaching a stale shoal
//! mount a dead node left) until `umount`; at node shutdown every live mount is unmounted but
//! stays in the table. Every blob of a live mount is pinned in the store.
//!
//! Modes: FUSE (`shoal_rafs::fuse`) at the directory, or kernel EROFS (`shoal_rafs::erofs`) at
//! the directory with its decoded blob files served from `<data dir>/erofs/<key of the dir>`;
//! both read through the same chunk backend. Each mount records the image's access list on its
//! first run, or prefetches it (plus the bootstrap's prefetch table) on later ones; that
//! background work is cancelled when the mount goes.
//!
//! Layout: `image` (references, manifests, Nydus layers: pure), `resolve` (origin → verified
//! bootstrap), `chunks` (the `ChunkSource` over store and origin), `prefetch` (access lists,
//! prefetch), `fs` (the filesystem of a live mount, either mode), `exporter` (per-mount
//! Prometheus series), `table` (mounts.json, stale mounts), `api` (admin routes).

pub mod api;
pub mod chunks;
pub mod exporter;
pub mod fs;
pub mod image;
pub mod prefetch;
pub mod private;
pub mod remote;
pub mod resolve;
pub mod table;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use shoal_proto::Digest;
use shoal_rafs::erofs::ErofsError;
use shoal_rafs::fuse::{self, FuseError, LatencySnapshot};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::download::Downloads;
use crate::metrics::Metrics;
use crate::store::{PinGuard, Store, StoreError};
use crate::upstream::{OriginError, Upstreams};
use chunks::{BlobSpec, ChunkBackend, SourceSnapshot};
use fs::Mounted;
use image::{ImageError, ImageRef};
use prefetch::{Background, PrefetchSnapshot};
pub use table::{MountMode, MountRecord, Owner};

/// Why a mount operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Origin(#[from] OriginError),
    #[error("origin answered {status} for {what}")]
    Status { what: String, status: u16 },
    #[error("fetching {what}: {reason}")]
    Fetch { what: String, reason: String },
    #[error("bootstrap layer {digest}: {reason}")]
    Bootstrap { digest: Digest, reason: String },
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("{dir} is already used by a mount of {image}")]
    Busy { dir: PathBuf, image: String },
    #[error("no shoal mount at {dir}")]
    NotMounted { dir: PathBuf },
    #[error("mount point {dir}: {reason}")]
    Dir { dir: PathBuf, reason: String },
    #[error(transparent)]
    Fuse(#[from] FuseError),
    #[error(transparent)]
    Erofs(#[from] ErofsError),
    #[error("mount table: {0}")]
    Table(String),
    #[error("the node is shutting down")]
    ShuttingDown,
}

/// A mount request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MountRequest {
    pub image: String,
    pub dir: PathBuf,
    #[serde(default = "default_mode")]
    pub mode: MountMode,
    /// `os/arch[/variant]`; default this host's.
    #[serde(default)]
    pub platform: Option<String>,
    /// Prefetch rate in origin bytes per second (default [`prefetch::DEFAULT_RATE`]; 0: off).
    #[serde(default)]
    pub prefetch_rate: Option<u64>,
    /// Mount over a non-empty or system directory (see [`check_mount_point`]).
    #[serde(default)]
    pub force: bool,
}

fn default_mode() -> MountMode {
    MountMode::Fuse
}

/// What `GET /api/v1/mounts` shows for one mount.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MountInfo {
    pub image: String,
    pub dir: PathBuf,
    pub mode: MountMode,
    pub platform: String,
    /// `mounting`, `mounted` or `failed`.
    pub state: String,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub manifest: Option<String>,
    #[serde(default)]
    pub mounted_at_ms: Option<u64>,
    #[serde(default)]
    pub stats: Option<MountStats>,
    /// `user` (`shoal mount`) or `snapshotter` (containers of the image).
    #[serde(default)]
    pub owner: Owner,
}

/// Per-mount numbers: what programs read, where chunks came from, read latency.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MountStats {
    /// Read requests that reached the filesystem (page-cache hits never do).
    pub reads: u64,
    /// Bytes returned to programs.
    pub read_bytes: u64,
    pub read_errors: u64,
    /// Chunks the filesystem asked the backend for (decoded-cache misses).
    pub chunks_fetched: u64,
    pub chunk_cache_hits: u64,
    /// Chunks read back decoded from the mount's own files (FUSE mode): no fetch, no decoding.
    #[serde(default)]
    pub chunk_decoded_hits: u64,
    pub chunk_fetch_errors: u64,
    /// Where the backend found them.
    pub source: SourceSnapshot,
    /// Read latency percentiles (upper bound of the histogram bucket), microseconds; `None`
    /// without samples or above the largest bucket.
    pub latency_p50_us: Option<u64>,
    pub latency_p90_us: Option<u64>,
    pub latency_p99_us: Option<u64>,
    /// Prefetch progress and access-list recording.
    #[serde(default)]
    pub prefetch: PrefetchSnapshot,
}

/// What the mount manager needs from the node.
#[derive(Clone)]
pub struct MountDeps {
    pub data_dir: PathBuf,
    pub store: Store,
    pub upstreams: Arc<Upstreams>,
    pub downloads: Downloads,
    pub metrics: Arc<Metrics>,
    /// The cluster, if the node is in one: chunks come from peers first.
    pub peering: Option<crate::peering::Peering>,
    /// How long cached tag answers are used (`mirror.tag_ttl`).
    pub tag_ttl: std::time::Duration,
    /// Cancelled after the mounts are gone (shutdown step "cancel work").
    pub cancel: CancellationToken,
    pub tracker: TaskTracker,
    /// Where image servers (mounts in processes of their own) read chunks, and the mounts they
    /// may read.
    pub remote: Option<RemoteDeps>,
}

/// What mounts held by image servers need.
#[derive(Clone)]
pub struct RemoteDeps {
    /// The chunk socket image servers connect to.
    pub socket: PathBuf,
    pub registry: remote::Registry,
}

/// Handle to the mount manager. Cheap to clone.
#[derive(Clone)]
pub struct Mounts {
    tx: mpsc::Sender<Cmd>,
    /// The node's data directory, which no mount may cover.
    data_dir: Arc<PathBuf>,
}

type Reply<T> = oneshot::Sender<Result<T, MountError>>;

enum Cmd {
    Mount(MountRecord, Reply<MountInfo>),
    Prepared(
        MountRecord,
        Result<Box<Live>, MountError>,
        Option<Reply<MountInfo>>,
    ),
    Unmount(PathBuf, Owner, Reply<()>),
    List(oneshot::Sender<Vec<MountInfo>>),
    Shutdown(oneshot::Sender<()>),
}

impl Mounts {
    /// Start the manager and restore the persisted mounts (in the background).
    pub fn start(deps: MountDeps) -> Self {
        // Mount-private chunk caches a crash left behind (no mount is up yet).
        private::clear(&deps.data_dir);
        let (tx, rx) = mpsc::channel(64);
        let records = match table::load(&deps.data_dir) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "mount table unreadable; starting without mounts");
                Vec::new()
            }
        };
        let actor = Actor {
            deps: deps.clone(),
            tx: tx.clone(),
            records: records.clone(),
            slots: BTreeMap::new(),
            closed: false,
        };
        deps.tracker.spawn(
            actor
                .run(rx, records)
                .instrument(tracing::info_span!("mounts")),
        );
        Mounts {
            tx,
            data_dir: Arc::new(deps.data_dir.clone()),
        }
    }

    /// Mount `req.image` at `req.dir` (which must exist; made canonical here; see
    /// [`check_mount_point`]) for `caller`.
    pub async fn mount(&self, req: MountRequest, caller: Caller) -> Result<MountInfo, MountError> {
        ImageRef::parse(&req.image)?;
        let dir = canonical(&req.dir).await?;
        let (d, data_dir, force) = (dir.clone(), self.data_dir.clone(), req.force);
        tokio::task::spawn_blocking(move || check_mount_point(&d, &data_dir, force, caller))
            .await
            .map_err(|e| MountError::Dir {
                dir: dir.clone(),
                reason: e.to_string(),
            })??;
        let record = MountRecord {
            image: req.image,
            dir,
            mode: req.mode,
            platform: image::platform_or_host(req.platform.as_deref()),
            prefetch_rate: req.prefetch_rate,
            owner: Owner::User,
            bootstrap_file: None,
            own_process: false,
        };
        self.ask(|r| Cmd::Mount(record, r)).await?
    }

    /// Mount for another part of the node (the snapshotter), at a directory it made and owns:
    /// no mount-point rules (the directory is inside the data directory on purpose), not
    /// persisted in the mount table.
    pub async fn mount_owned(&self, record: MountRecord) -> Result<MountInfo, MountError> {
        ImageRef::parse(&record.image)?;
        debug_assert!(!record.owner.is_user());
        self.ask(|r| Cmd::Mount(record, r)).await?
    }

    /// Unmount the shoal mount at `dir` and forget it (a person's: the snapshotter's mounts
    /// are refused, containers stand on them).
    pub async fn unmount(&self, dir: &Path) -> Result<(), MountError> {
        let dir = canonical(dir).await.unwrap_or_else(|_| dir.to_path_buf());
        self.ask(|r| Cmd::Unmount(dir, Owner::User, r)).await?
    }

    /// Unmount a mount `owner` made with [`Mounts::mount_owned`].
    pub async fn unmount_owned(&self, dir: &Path, owner: Owner) -> Result<(), MountError> {
        self.ask(|r| Cmd::Unmount(dir.to_path_buf(), owner, r))
            .await?
    }

    /// Every mount, with live numbers.
    pub async fn list(&self) -> Result<Vec<MountInfo>, MountError> {
        self.ask(Cmd::List).await
    }

    /// Unmount everything (keeping the table for the next start). Shutdown order: after the
    /// servers stopped, before work is cancelled.
    pub async fn shutdown(&self) {
        let _ = self.ask(Cmd::Shutdown).await;
    }

    async fn ask<T>(&self, cmd: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Result<T, MountError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(cmd(tx))
            .await
            .map_err(|_| MountError::ShuttingDown)?;
        rx.await.map_err(|_| MountError::ShuttingDown)
    }
}

/// Directories a mount never covers without `force`: the root, the system's own trees, and
/// everything below the ones whose contents the system runs on.
const SYSTEM_DIRS: [&str; 22] = [
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32", "/media",
    "/mnt", "/opt", "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var",
];
const SYSTEM_TREES: [&str; 12] = [
    "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/sbin",
    "/sys", "/usr",
];

/// Who asks for a mount (from the control socket's peer credentials).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// Root or the node's own user: any mount point the rules allow, `force` included.
    Administrator,
    /// A member of the control group with this uid: only a directory that user owns, never
    /// `force` (a mount over a directory the system reads — `/etc`, a cron or sudoers drop-in
    /// directory — would hand that user the host).
    Member(u32),
}

/// A mount point (canonical) must be a directory, not a system directory, not inside the
/// node's data directory, and empty — the last two rules waived by `force` except for the
/// data directory, which is never covered. A control-group member's mount point must be a
/// directory of their own, and `force` is not theirs to use.
pub fn check_mount_point(
    dir: &Path,
    data_dir: &Path,
    force: bool,
    caller: Caller,
) -> Result<(), MountError> {
    let refuse = |reason: &str| MountError::Dir {
        dir: dir.to_path_buf(),
        reason: reason.to_owned(),
    };
    let meta = std::fs::symlink_metadata(dir).map_err(|e| refuse(&e.to_string()))?;
    if !meta.is_dir() {
        return Err(refuse("not a directory"));
    }
    let data = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    if dir.starts_with(&data) || data.starts_with(dir) {
        return Err(refuse("covers or is inside the node's data directory"));
    }
    if let Caller::Member(uid) = caller {
        use std::os::unix::fs::MetadataExt as _;
        if force {
            return Err(refuse("--force is for root and the node's user only"));
        }
        if meta.uid() != uid {
            return Err(refuse(
                "is not yours: members of the control group mount only on their own directories",
            ));
        }
    }
    if force {
        return Ok(());
    }
    let system = SYSTEM_DIRS.iter().any(|s| dir == Path::new(s))
        || SYSTEM_TREES.iter().any(|s| dir.starts_with(s));
    if system {
        return Err(refuse(
            "is a system directory (pass --force to mount over it anyway)",
        ));
    }
    let mut entries = std::fs::read_dir(dir).map_err(|e| refuse(&e.to_string()))?;
    if entries.next().is_some() {
        return Err(refuse(
            "is not empty (pass --force to hide its contents under the mount)",
        ));
    }
    Ok(())
}

/// Right before mounting (seconds after [`check_mount_point`], the image resolved meanwhile):
/// the mount point must still be that canonical path — a component swapped for a symbolic link
/// (to the data directory, to `/etc`) in between is refused.
fn still_the_checked_dir(dir: &Path, data_dir: &Path) -> Result<(), MountError> {
    let refuse = |reason: String| MountError::Dir {
        dir: dir.to_path_buf(),
        reason,
    };
    let now = std::fs::canonicalize(dir).map_err(|e| refuse(e.to_string()))?;
    if now != dir {
        return Err(refuse(format!(
            "changed while the image was resolved: it now leads to {}",
            now.display()
        )));
    }
    let data = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    if dir.starts_with(&data) || data.starts_with(dir) {
        return Err(refuse(
            "covers or is inside the node's data directory".into(),
        ));
    }
    Ok(())
}

async fn canonical(dir: &Path) -> Result<PathBuf, MountError> {
    let d = tokio::fs::canonicalize(dir)
        .await
        .map_err(|e| MountError::Dir {
            dir: dir.to_path_buf(),
            reason: e.to_string(),
        })?;
    Ok(d)
}

/// A live mount and what keeps it alive.
struct Live {
    fs: Mounted,
    backend: Arc<ChunkBackend>,
    /// Recording (the image's first run) or prefetching (later runs).
    background: Background,
    /// The manifest the image was resolved to (none for a bootstrap file).
    manifest: Option<Digest>,
    mounted_at_ms: u64,
    _pins: Vec<PinGuard>,
    /// Serves an image server this mount's chunks while the mount lives.
    _served: Option<remote::Registration>,
    /// Stops the background work when the mount goes.
    _stop: tokio_util::sync::DropGuard,
    _series: SeriesGuard,
}

/// Keeps a mount's Prometheus series while the mount lives.
struct SeriesGuard {
    series: Arc<exporter::MountSeries>,
    dir: PathBuf,
}

impl Drop for SeriesGuard {
    fn drop(&mut self) {
        self.series.remove(&self.dir);
    }
}

enum Slot {
    Mounting,
    Mounted(Box<Live>),
    Failed(String),
}

struct Actor {
    deps: MountDeps,
    tx: mpsc::Sender<Cmd>,
    /// The persisted requests.
    records: Vec<MountRecord>,
    slots: BTreeMap<PathBuf, (MountRecord, Slot)>,
    /// After shutdown: mounts that still come up are taken down at once.
    closed: bool,
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>, restore: Vec<MountRecord>) {
        for rec in restore {
            tracing::info!(image = %rec.image, dir = %rec.dir.display(), "restoring mount");
            self.slots
                .insert(rec.dir.clone(), (rec.clone(), Slot::Mounting));
            self.prepare(rec, None);
        }
        loop {
            let cmd = tokio::select! {
                c = rx.recv() => c,
                _ = self.deps.cancel.cancelled() => None,
            };
            let Some(cmd) = cmd else { break };
            self.handle(cmd).await;
        }
        self.unmount_all().await;
    }

    async fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Mount(rec, reply) => {
                if self.closed {
                    let _ = reply.send(Err(MountError::ShuttingDown));
                    return;
                }
                if let Some((old, slot)) = self.slots.get(&rec.dir) {
                    if !matches!(slot, Slot::Failed(_)) {
                        let _ = reply.send(Err(MountError::Busy {
                            dir: rec.dir.clone(),
                            image: old.image.clone(),
                        }));
                        return;
                    }
                }
                self.slots
                    .insert(rec.dir.clone(), (rec.clone(), Slot::Mounting));
                self.prepare(rec, Some(reply));
            }
            Cmd::Prepared(rec, result, reply) => self.prepared(rec, result, reply).await,
            Cmd::Unmount(dir, owner, reply) => {
                let _ = reply.send(self.unmount(&dir, owner).await);
            }
            Cmd::List(reply) => {
                let _ = reply.send(self.list());
            }
            Cmd::Shutdown(reply) => {
                self.closed = true;
                self.unmount_all().await;
                let _ = reply.send(());
            }
        }
    }

    /// Resolve and mount in a task that reports back with `Cmd::Prepared`.
    fn prepare(&self, rec: MountRecord, reply: Option<Reply<MountInfo>>) {
        let deps = self.deps.clone();
        let tx = self.tx.clone();
        let span = tracing::info_span!("mount", image = %rec.image, dir = %rec.dir.display());
        self.deps.tracker.spawn(
            async move {
                let result = mount_image(&deps, &rec).await.map(Box::new);
                // If the actor is gone the mount is dropped, which unmounts it.
                let _ = tx.send(Cmd::Prepared(rec, result, reply)).await;
            }
            .instrument(span),
        );
    }

    async fn prepared(
        &mut self,
        rec: MountRecord,
        result: Result<Box<Live>, MountError>,
        reply: Option<Reply<MountInfo>>,
    ) {
        let restoring = reply.is_none();
        match result {
            Ok(live) if self.closed => {
                unmount_live(*live).await;
                send(reply, Err(MountError::ShuttingDown));
            }
            Ok(live) => {
                tracing::info!(image = %rec.image, dir = %rec.dir.display(), manifest = ?live.manifest.as_ref().map(ToString::to_string), "mounted");
                let Some((_, slot)) = self.slots.get_mut(&rec.dir) else {
                    unmount_live(*live).await;
                    return;
                };
                *slot = Slot::Mounted(live);
                let info = info(&rec, slot);
                match self.persist_add(&rec).await {
                    Ok(()) => send(reply, Ok(info)),
                    Err(e) => {
                        // A mount the table does not hold would not come back, nor be found by
                        // `umount`: take it down again.
                        if let Some((_, Slot::Mounted(live))) = self.slots.remove(&rec.dir) {
                            unmount_live(*live).await;
                        }
                        self.records.retain(|r| r.dir != rec.dir);
                        send(reply, Err(e));
                    }
                }
            }
            Err(e) if restoring => {
                tracing::warn!(image = %rec.image, dir = %rec.dir.display(), error = %e, "mount not restored");
                self.slots
                    .insert(rec.dir.clone(), (rec, Slot::Failed(e.to_string())));
            }
            Err(e) => {
                self.slots.remove(&rec.dir);
                send(reply, Err(e));
            }
        }
    }

    async fn unmount(&mut self, dir: &Path, owner: Owner) -> Result<(), MountError> {
        if self
            .slots
            .get(dir)
            .is_some_and(|(rec, _)| rec.owner != owner)
        {
            return Err(MountError::Dir {
                dir: dir.to_path_buf(),
                reason: "belongs to the containerd snapshotter (containers use it); it goes with the last container of the image".into(),
            });
        }
        let Some((rec, slot)) = self.slots.remove(dir) else {
            return Err(MountError::NotMounted {
                dir: dir.to_path_buf(),
            });
        };
        if matches!(slot, Slot::Mounting) {
            let image = rec.image.clone();
            self.slots.insert(dir.to_path_buf(), (rec, slot));
            return Err(MountError::Busy {
                dir: dir.to_path_buf(),
                image,
            });
        }
        self.records.retain(|r| r.dir != dir);
        let saved = self.save().await;
        if let Slot::Mounted(live) = slot {
            tracing::info!(image = %rec.image, dir = %dir.display(), "unmounting");
            let fs = live.fs;
            tokio::task::spawn_blocking(move || fs.unmount())
                .await
                .map_err(|e| MountError::Table(format!("unmount task failed: {e}")))??;
        }
        saved
    }

    fn list(&self) -> Vec<MountInfo> {
        self.slots
            .values()
            .map(|(rec, slot)| info(rec, slot))
            .collect()
    }

    async fn unmount_all(&mut self) {
        for (_, slot) in self.slots.values_mut() {
            let old = std::mem::replace(slot, Slot::Failed("node shut down".into()));
            match old {
                Slot::Mounted(live) => release_live(*live).await,
                other => *slot = other,
            }
        }
    }

    async fn persist_add(&mut self, rec: &MountRecord) -> Result<(), MountError> {
        if !rec.owner.is_user() || self.records.contains(rec) {
            return Ok(());
        }
        self.records.retain(|r| r.dir != rec.dir);
        self.records.push(rec.clone());
        self.save().await
    }

    async fn save(&self) -> Result<(), MountError> {
        let (dir, records) = (self.deps.data_dir.clone(), self.records.clone());
        tokio::task::spawn_blocking(move || table::save(&dir, &records))
            .await
            .map_err(|e| MountError::Table(e.to_string()))?
            .map_err(|e| MountError::Table(e.to_string()))
    }
}

fn send(reply: Option<Reply<MountInfo>>, r: Result<MountInfo, MountError>) {
    if let Some(reply) = reply {
        let _ = reply.send(r);
    }
}

async fn unmount_live(live: Live) {
    let dir = live.fs.dir().to_path_buf();
    let fs = live.fs;
    match tokio::task::spawn_blocking(move || fs.unmount()).await {
        Ok(Ok(())) => tracing::info!(dir = %dir.display(), "unmounted"),
        Ok(Err(e)) => tracing::warn!(dir = %dir.display(), error = %e, "unmount failed"),
        Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "unmount task failed"),
    }
}

/// At shutdown: unmount, except what an image server holds (containers stand on it).
async fn release_live(live: Live) {
    let dir = live.fs.dir().to_path_buf();
    let fs = live.fs;
    match tokio::task::spawn_blocking(move || fs.release()).await {
        Ok(Ok(())) => tracing::info!(dir = %dir.display(), "released"),
        Ok(Err(e)) => tracing::warn!(dir = %dir.display(), error = %e, "unmount failed"),
        Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "unmount task failed"),
    }
}

/// Where a mount's image comes from, ready to mount.
struct Opened {
    origin: Arc<crate::upstream::Origin>,
    repo: shoal_proto::RepoName,
    boot: shoal_rafs::Bootstrap,
    /// Data blob sizes the manifest gives (the bootstrap's own are used for the rest).
    sizes: Vec<(Digest, u64)>,
    /// Names the image's access list: the bootstrap layer's digest, or the bootstrap file's.
    key: Digest,
    manifest: Option<Digest>,
    pins: Vec<PinGuard>,
}

/// Resolve the image and fetch its bootstrap layer through the node.
async fn open_resolved(deps: &MountDeps, rec: &MountRecord) -> Result<Opened, MountError> {
    let image = ImageRef::parse(&rec.image)?;
    let cache = resolve::Cache {
        store: &deps.store,
        tag_ttl: deps.tag_ttl,
    };
    let resolved = resolve::resolve(&deps.upstreams, &cache, &image, &rec.platform).await?;
    let boot = resolve::bootstrap(&deps.store, &deps.downloads, &resolved).await?;
    let digest = resolved.layers.bootstrap.digest.clone();
    Ok(Opened {
        pins: vec![deps.store.pin(&digest)],
        origin: resolved.origin,
        repo: resolved.repo,
        boot,
        sizes: resolved
            .layers
            .blobs
            .iter()
            .map(|d| (d.digest.clone(), d.size))
            .collect(),
        key: digest,
        manifest: Some(resolved.manifest_digest),
    })
}

/// Open a bootstrap file already on disk — or a data blob that carries its bootstrap
/// (`nydus-image --blob-inline-meta`) — ; `rec.image` names where its blobs are.
async fn open_file(deps: &MountDeps, rec: &MountRecord, file: &Path) -> Result<Opened, MountError> {
    let image = ImageRef::parse(&rec.image)?;
    let origin = deps.upstreams.select(image.host.as_deref(), None)?;
    let path = file.to_path_buf();
    let opened = tokio::task::spawn_blocking(move || open_regular(&path))
        .await
        .map_err(|e| MountError::Table(format!("bootstrap read task failed: {e}")))?
        .map_err(|reason| MountError::Dir {
            dir: file.to_path_buf(),
            reason,
        })?;
    let (key, boot) = match opened {
        Ok(b) => (
            Digest::of(shoal_proto::DigestAlgorithm::Sha256, b.as_bytes()),
            b,
        ),
        Err((key, e)) => {
            return Err(MountError::Bootstrap {
                digest: key,
                reason: format!("not a usable RAFS bootstrap: {e}"),
            })
        }
    };
    Ok(Opened {
        origin,
        repo: image.repo,
        boot,
        sizes: Vec::new(),
        key,
        manifest: None,
        pins: Vec::new(),
    })
}

/// The RAFS bootstrap in a regular file (refusing a symbolic link at the last component): the
/// file itself, or the one a data blob carries at its end. `Err` when the file cannot be read;
/// `Ok(Err((digest of the file's first bytes, why)))` when it is no usable bootstrap.
#[allow(clippy::type_complexity)]
fn open_regular(
    path: &Path,
) -> Result<Result<shoal_rafs::Bootstrap, (Digest, shoal_rafs::Error)>, String> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .map_err(|e| e.to_string())?;
    let meta = f.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let opened = shoal_rafs::Bootstrap::open_file(&f, path);
    Ok(opened.map_err(|e| {
        let mut head = Vec::new();
        let _ = (&f)
            .take(shoal_rafs::MAX_BOOTSTRAP_SIZE)
            .read_to_end(&mut head);
        (Digest::of(shoal_proto::DigestAlgorithm::Sha256, &head), e)
    }))
}

/// Open the image (resolve it, or read its bootstrap file), then mount it.
async fn mount_image(deps: &MountDeps, rec: &MountRecord) -> Result<Live, MountError> {
    let opened = match &rec.bootstrap_file {
        Some(file) => open_file(deps, rec, file).await?,
        None => open_resolved(deps, rec).await?,
    };
    let Opened {
        origin,
        repo,
        boot,
        sizes,
        key,
        manifest,
        mut pins,
    } = opened;
    let mut blobs = Vec::new();
    for b in boot.blobs() {
        let id: Digest =
            format!("sha256:{}", b.blob_id)
                .parse()
                .map_err(|e| MountError::Bootstrap {
                    digest: key.clone(),
                    reason: format!("blob id {:?}: {e}", b.blob_id),
                })?;
        let listed = sizes.iter().find(|(d, _)| *d == id).map(|(_, s)| *s);
        if listed.is_none() && manifest.is_some() {
            tracing::warn!(blob = %id, "data blob not listed in the manifest");
        }
        // Stored, peer and kept bytes only for a blob the node may read in this repository.
        let access = resolve::node_access(&deps.store, &origin, &repo, &id).await;
        let shared = match &access {
            Ok(_) => true,
            Err(reason) => {
                tracing::info!(blob = %id, %repo, %reason, "data blob read from its origin only, for this mount alone");
                false
            }
        };
        // The origin's size first: one a bootstrap claims must not shape the store's record.
        // The blob table records only the data of a blob that carries the bootstrap.
        let inlined = boot.inlined_in().filter(|i| i.blob_id == b.blob_id);
        let size = match (access.ok().flatten(), listed, inlined) {
            (Some(origin_size), _, _) => origin_size,
            (None, Some(size), _) => size,
            (None, None, Some(i)) => i.blob_size,
            (None, None, None) => b.compressed_size,
        };
        let chunks = boot
            .blob_chunks(b.index)
            .map_err(|e| MountError::Bootstrap {
                digest: key.clone(),
                reason: e.to_string(),
            })?;
        if shared {
            pins.push(deps.store.pin(&id));
        }
        blobs.push((BlobSpec { id, size, shared }, chunks));
    }
    let boot = Arc::new(boot);
    let list_path = prefetch::list_path(&deps.data_dir, &key);
    if let Some(p) = &deps.peering {
        // No list of our own yet: another node of the cluster may have recorded one.
        let local = list_path.clone();
        let have = tokio::task::spawn_blocking(move || local.exists())
            .await
            .unwrap_or(true);
        if !have {
            if let Some(chunks) = p.shared_access_list(&key).await {
                let (path, n) = (list_path.clone(), chunks.len());
                match tokio::task::spawn_blocking(move || prefetch::write_list(&path, chunks)).await
                {
                    Ok(Ok(())) => {
                        tracing::info!(
                            chunks = n,
                            "prefetching the access list another node shared"
                        )
                    }
                    Ok(Err(e)) => tracing::warn!(error = %e, "cannot keep a shared access list"),
                    Err(e) => tracing::warn!(error = %e, "shared access list task failed"),
                }
            }
        }
    }
    let mut background = tokio::task::spawn_blocking(move || Background::prepare(&list_path))
        .await
        .map_err(|e| MountError::Table(format!("access list task failed: {e}")))?;
    let mut backend = ChunkBackend::new(
        chunks::Deps {
            rt: tokio::runtime::Handle::current(),
            store: deps.store.clone(),
            origin,
            repo,
            metrics: deps.metrics.clone(),
            cancel: deps.cancel.clone(),
            peering: deps.peering.clone(),
            private: Arc::new(private::PrivateChunks::new(
                &deps.data_dir,
                &key.to_string(),
            )),
        },
        blobs,
    );
    if !boot.blobs_needing_meta().is_empty() {
        // Batch blobs: their compression-info tables place the batched chunks.
        let b = boot.clone();
        backend = tokio::task::spawn_blocking(move || backend.locate_batches(&b).map(|()| backend))
            .await
            .map_err(|e| MountError::Table(format!("batch table task failed: {e}")))?
            .map_err(|reason| MountError::Bootstrap {
                digest: key.clone(),
                reason: format!("placing batched chunks: {reason}"),
            })?;
    }
    background.attach(&mut backend);
    let backend = Arc::new(backend);
    let (dir, data_dir, source, b) = (
        rec.dir.clone(),
        deps.data_dir.clone(),
        backend.clone(),
        boot.clone(),
    );
    let mode = rec.mode;
    let user = rec.owner.is_user();
    let served = match (&deps.remote, rec.own_process) {
        (Some(r), true) => Some(r.registry.register(&rec.dir, boot.clone(), backend.clone())),
        _ => None,
    };
    let remote = match (&deps.remote, &rec.bootstrap_file) {
        (Some(r), Some(file)) if rec.own_process => Some((r.socket.clone(), file.clone())),
        _ => None,
    };
    let decoded_max = fs::decoded_budget(deps.store.byte_quota());
    let fs = tokio::task::spawn_blocking(move || {
        if user {
            still_the_checked_dir(&dir, &data_dir)?;
        }
        match remote {
            Some((socket, file)) => fs::mount_remote(mode, &data_dir, &file, &dir, &socket),
            None => fs::mount(mode, &data_dir, b, source, &dir, decoded_max),
        }
    })
    .await
    .map_err(|e| MountError::Table(format!("mount task failed: {e}")))??;
    let stop = deps.cancel.child_token();
    let span = tracing::info_span!("mount-background", dir = %rec.dir.display());
    let share: Option<prefetch::Share> = deps.peering.clone().map(|p| {
        let (key, tracker) = (key.clone(), deps.tracker.clone());
        Arc::new(move |chunks: Vec<prefetch::ChunkKey>| {
            let (p, key) = (p.clone(), key.clone());
            tracker.spawn(async move { p.share_access_list(&key, &chunks).await });
        }) as prefetch::Share
    });
    background.start(
        &deps.tracker,
        &backend,
        &boot,
        rec.prefetch_rate.unwrap_or(prefetch::DEFAULT_RATE),
        &stop,
        span,
        share,
    );
    let series = deps.metrics.mount_series.clone();
    series.add(
        &rec.dir,
        exporter::Probe {
            labels: exporter::MountLabels {
                mount: rec.dir.display().to_string(),
                image: rec.image.clone(),
                mode: rec.mode.to_string(),
            },
            reads: fs.stats().clone(),
            source: backend.stats().clone(),
        },
    );
    Ok(Live {
        _series: SeriesGuard {
            series,
            dir: rec.dir.clone(),
        },
        fs,
        backend,
        background,
        _served: served,
        _stop: stop.drop_guard(),
        manifest,
        mounted_at_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        _pins: pins,
    })
}

fn info(rec: &MountRecord, slot: &Slot) -> MountInfo {
    let mut i = MountInfo {
        image: rec.image.clone(),
        dir: rec.dir.clone(),
        mode: rec.mode,
        platform: rec.platform.clone(),
        state: "mounting".into(),
        error: None,
        manifest: None,
        mounted_at_ms: None,
        stats: None,
        owner: rec.owner,
    };
    match slot {
        Slot::Mounting => {}
        Slot::Failed(e) => {
            i.state = "failed".into();
            i.error = Some(e.clone());
        }
        Slot::Mounted(live) => {
            i.state = "mounted".into();
            i.manifest = live.manifest.as_ref().map(ToString::to_string);
            i.mounted_at_ms = Some(live.mounted_at_ms);
            i.stats = Some(stats(live));
        }
    }
    i
}

fn stats(live: &Live) -> MountStats {
    let f = live.fs.stats().snapshot();
    let lat = &f.read_latency;
    MountStats {
        reads: f.reads,
        read_bytes: f.read_bytes,
        read_errors: f.read_errors,
        chunks_fetched: f.chunks_fetched,
        chunk_cache_hits: f.chunk_cache_hits,
        chunk_decoded_hits: f.chunk_decoded_hits,
        chunk_fetch_errors: f.chunk_fetch_errors,
        source: live.backend.stats().snapshot(),
        latency_p50_us: percentile(lat, 0.50),
        latency_p90_us: percentile(lat, 0.90),
        latency_p99_us: percentile(lat, 0.99),
        prefetch: live.background.snapshot(),
    }
}

/// The upper bound of the bucket holding quantile `q`.
pub fn percentile(h: &LatencySnapshot, q: f64) -> Option<u64> {
    if h.count == 0 {
        return None;
    }
    let rank = ((h.count as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, n) in h.buckets.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return fuse::LATENCY_BOUNDS_MICROS.get(i).copied();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_bucket_bounds() {
        let mut buckets = vec![0; fuse::LATENCY_BOUNDS_MICROS.len() + 1];
        buckets[0] = 90;
        buckets[4] = 9;
        buckets[fuse::LATENCY_BOUNDS_MICROS.len()] = 1;
        let h = LatencySnapshot {
            buckets,
            count: 100,
            sum_micros: 0,
        };
        assert_eq!(percentile(&h, 0.5), Some(50));
        assert_eq!(percentile(&h, 0.9), Some(50));
        assert_eq!(percentile(&h, 0.95), Some(1_000));
        assert_eq!(percentile(&h, 1.0), None);
        let empty = LatencySnapshot {
            buckets: vec![],
            count: 0,
            sum_micros: 0,
        };
        assert_eq!(percentile(&empty, 0.5), None);
    }
}
