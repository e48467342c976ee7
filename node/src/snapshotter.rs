//! The containerd snapshotter: containerd's snapshots API served on a Unix socket
//! (`--snapshotter-socket`, a `proxy_plugins` entry named `shoal`), so containers start from
//! lazily mounted Nydus images and every other image behaves as with containerd's overlayfs
//! snapshotter.
//!
//! One actor task owns the snapshot table (`state`, persisted in the node's store), the
//! directories (`layout`) and the image mounts under containers, reached through the cloneable
//! [`Snapshotter`] handle over a bounded channel; `service` is the gRPC surface.
//!
//! How a Nydus image starts (`labels` says which layer is which):
//! 1. containerd unpacks the image layer by layer. For a Nydus data blob layer, `Prepare`
//!    records a committed, empty layer under the chain id containerd names and answers
//!    "already exists": containerd downloads nothing for it. The bootstrap layer (a small
//!    tar.gz) is unpacked by containerd like any layer.
//! 2. For a container's root filesystem (a snapshot whose ancestors include a Nydus bootstrap
//!    layer), the image is mounted lazily once — at `images/<bootstrap snapshot id>`, through the
//!    node's mount manager (FUSE or EROFS, chunks from the store, peers, then the origin) — and
//!    the container gets an overlay with that mount as its lower directory.
//! 3. The image mount stays while any active or view snapshot stands on it, and is unmounted
//!    when the last one is removed.
//!
//! Invariants: a snapshot record is written only after its directories exist, and removed before
//! they are (a crash leaves at most an orphan directory, which `Cleanup` removes); a `Prepare`
//! that cannot get its image mounted leaves no snapshot behind; nothing is made on Nydus data
//! layers without their bootstrap above them, except the unpack of that bootstrap layer itself;
//! ids are never reused.

pub mod api;
pub mod filter;
pub mod labels;
pub mod layout;
pub mod service;
pub mod state;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::metrics::{KindLabels, Metrics};
use crate::mount::{image as mount_image, MountError, MountMode, MountRecord, Mounts, Owner};
use crate::store::{Store, StoreError};
use filter::FilterError;
use labels::{OriginError, Prepared};
use layout::{Layout, MountSpec};
use state::{Change, Kind, Record, Table, Usage};

/// How the snapshotter is set up (`[snapshotter]` in the node's config).
#[derive(Clone, Debug)]
pub struct SnapshotterConfig {
    /// Snapshot directories and image mount points.
    pub root: PathBuf,
    /// How Nydus images are mounted under containers.
    pub mode: MountMode,
}

/// What the snapshotter needs from the node.
#[derive(Clone)]
pub struct SnapshotterDeps {
    pub store: Store,
    pub mounts: Mounts,
    pub metrics: Arc<Metrics>,
    pub tracker: TaskTracker,
    pub cancel: CancellationToken,
}

/// Why a snapshot operation failed; `service` maps each to a gRPC status (containerd's error
/// class).
#[derive(Debug, thiserror::Error)]
pub enum SnapError {
    #[error(transparent)]
    State(#[from] state::Error),
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot metadata: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Labels(#[from] OriginError),
    #[error("lazy mount of {image}: {error}")]
    Image { image: String, error: String },
    #[error("the node is shutting down")]
    ShuttingDown,
}

/// One snapshot as containerd sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Info {
    pub name: String,
    pub parent: Option<String>,
    pub kind: Kind,
    pub labels: BTreeMap<String, String>,
    pub created_ns: u64,
    pub updated_ns: u64,
}

/// A `Usage` answer: stored for committed snapshots, measured (off the actor) for the rest.
#[derive(Debug)]
pub enum UsagePlan {
    Known(Usage),
    Measure(PathBuf),
}

/// What `shoal status` shows of the snapshotter.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct SnapshotterStatus {
    pub active: usize,
    pub views: usize,
    pub committed: usize,
    /// Nydus layers provided without a download.
    pub provided_layers: usize,
    /// Image mounts under containers.
    pub images: Vec<ImageStatus>,
}

/// One image mounted under containers.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ImageStatus {
    pub image: String,
    pub dir: PathBuf,
    /// `mounting`, `mounted`, `unmounting` or `failed`.
    pub state: String,
    /// Active and view snapshots standing on it.
    pub containers: usize,
}

type Reply<T> = oneshot::Sender<Result<T, SnapError>>;

enum Cmd {
    Prepare {
        key: String,
        parent: Option<String>,
        labels: BTreeMap<String, String>,
        kind: Kind,
        reply: Reply<Vec<MountSpec>>,
    },
    Mounts(String, Reply<Vec<MountSpec>>),
    Commit {
        name: String,
        key: String,
        labels: BTreeMap<String, String>,
        reply: Reply<()>,
    },
    Remove(String, Reply<()>),
    Stat(String, Reply<Info>),
    Update {
        name: String,
        labels: BTreeMap<String, String>,
        paths: Vec<String>,
        reply: Reply<Info>,
    },
    List(Vec<String>, Reply<Vec<Info>>),
    Usage(String, Reply<UsagePlan>),
    Cleanup(Reply<()>),
    Status(oneshot::Sender<SnapshotterStatus>),
    /// A mount task finished (internal).
    ImageMounted(u64, Result<(), String>),
    /// An unmount task finished (internal).
    ImageUnmounted(u64),
}

/// Handle to the snapshotter. Cheap to clone.
#[derive(Clone)]
pub struct Snapshotter {
    tx: mpsc::Sender<Cmd>,
}

impl Snapshotter {
    /// Loads the snapshot table, prepares the root, starts the actor and brings back the image
    /// mounts the remaining containers stand on.
    pub async fn start(cfg: SnapshotterConfig, deps: SnapshotterDeps) -> Result<Self, SnapError> {
        let layout = Layout::new(cfg.root.clone());
        let store = deps.store.clone();
        let l = layout.clone();
        let (table, bad) = tokio::task::spawn_blocking(move || {
            l.prepare_root().map_err(|source| SnapError::Io {
                what: format!("snapshotter root {}", l.root().display()),
                source,
            })?;
            let (entries, seq) = store.snapshots()?;
            Ok::<_, SnapError>(Table::load(entries, seq))
        })
        .await
        .map_err(|e| SnapError::Io {
            what: "loading snapshots".into(),
            source: std::io::Error::other(e),
        })??;
        if !bad.is_empty() {
            tracing::warn!(count = bad.len(), first = %bad[0], "unreadable snapshot records left out");
        }
        tracing::info!(snapshots = table.len(), root = %cfg.root.display(), mode = %cfg.mode, "snapshotter ready");
        let (tx, rx) = mpsc::channel(64);
        let mut actor = Actor {
            table,
            layout,
            mode: cfg.mode,
            deps: deps.clone(),
            images: BTreeMap::new(),
            tx: tx.clone(),
        };
        actor.restore();
        actor.publish();
        deps.tracker
            .spawn(actor.run(rx).instrument(tracing::info_span!("snapshotter")));
        Ok(Snapshotter { tx })
    }

    pub async fn prepare(
        &self,
        key: String,
        parent: Option<String>,
        labels: BTreeMap<String, String>,
        kind: Kind,
    ) -> Result<Vec<MountSpec>, SnapError> {
        self.ask(|reply| Cmd::Prepare {
            key,
            parent,
            labels,
            kind,
            reply,
        })
        .await
    }

    pub async fn mounts(&self, key: String) -> Result<Vec<MountSpec>, SnapError> {
        self.ask(|r| Cmd::Mounts(key, r)).await
    }

    pub async fn commit(
        &self,
        name: String,
        key: String,
        labels: BTreeMap<String, String>,
    ) -> Result<(), SnapError> {
        self.ask(|reply| Cmd::Commit {
            name,
            key,
            labels,
            reply,
        })
        .await
    }

    pub async fn remove(&self, key: String) -> Result<(), SnapError> {
        self.ask(|r| Cmd::Remove(key, r)).await
    }

    pub async fn stat(&self, key: String) -> Result<Info, SnapError> {
        self.ask(|r| Cmd::Stat(key, r)).await
    }

    pub async fn update(
        &self,
        name: String,
        labels: BTreeMap<String, String>,
        paths: Vec<String>,
    ) -> Result<Info, SnapError> {
        self.ask(|reply| Cmd::Update {
            name,
            labels,
            paths,
            reply,
        })
        .await
    }

    pub async fn list(&self, filters: Vec<String>) -> Result<Vec<Info>, SnapError> {
        self.ask(|r| Cmd::List(filters, r)).await
    }

    /// Disk usage of `key`'s own files (measured here, not on the actor, for active ones).
    pub async fn usage(&self, key: String) -> Result<Usage, SnapError> {
        match self.ask(|r| Cmd::Usage(key, r)).await? {
            UsagePlan::Known(u) => Ok(u),
            UsagePlan::Measure(dir) => tokio::task::spawn_blocking(move || {
                layout::usage(&dir).map_err(|source| SnapError::Io {
                    what: format!("measuring {}", dir.display()),
                    source,
                })
            })
            .await
            .map_err(|e| SnapError::Io {
                what: "usage task".into(),
                source: std::io::Error::other(e),
            })?,
        }
    }

    pub async fn cleanup(&self) -> Result<(), SnapError> {
        self.ask(Cmd::Cleanup).await
    }

    pub async fn status(&self) -> SnapshotterStatus {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Cmd::Status(tx)).await.is_err() {
            return SnapshotterStatus::default();
        }
        rx.await.unwrap_or_default()
    }

    async fn ask<T>(&self, cmd: impl FnOnce(Reply<T>) -> Cmd) -> Result<T, SnapError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(cmd(tx))
            .await
            .map_err(|_| SnapError::ShuttingDown)?;
        rx.await.map_err(|_| SnapError::ShuttingDown)?
    }
}

/// An image mount under containers, keyed by its bootstrap snapshot's id.
struct ImageMount {
    reference: String,
    dir: PathBuf,
    state: ImageState,
    /// Requests waiting for the mount: their snapshot's key, the reply, and whether the
    /// snapshot was made by that request (then a failed mount removes it again).
    waiters: Vec<(String, Reply<Vec<MountSpec>>, bool)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ImageState {
    Mounting,
    Mounted,
    Unmounting,
    Failed(String),
}

impl ImageState {
    fn as_str(&self) -> &'static str {
        match self {
            ImageState::Mounting => "mounting",
            ImageState::Mounted => "mounted",
            ImageState::Unmounting => "unmounting",
            ImageState::Failed(_) => "failed",
        }
    }
}

struct Actor {
    table: Table,
    layout: Layout,
    mode: MountMode,
    deps: SnapshotterDeps,
    images: BTreeMap<u64, ImageMount>,
    tx: mpsc::Sender<Cmd>,
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        loop {
            let cmd = tokio::select! {
                c = rx.recv() => c,
                _ = self.deps.cancel.cancelled() => None,
            };
            let Some(cmd) = cmd else { break };
            self.handle(cmd).await;
            self.publish();
        }
        for img in self.images.values_mut() {
            for (_, reply, _) in img.waiters.drain(..) {
                let _ = reply.send(Err(SnapError::ShuttingDown));
            }
        }
    }

    async fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Prepare {
                key,
                parent,
                labels,
                kind,
                reply,
            } => self.prepare(key, parent, labels, kind, reply).await,
            Cmd::Mounts(key, reply) => self.mounts(key, reply).await,
            Cmd::Commit {
                name,
                key,
                labels,
                reply,
            } => {
                let r = self.commit(&name, &key, labels).await;
                let _ = reply.send(r);
            }
            Cmd::Remove(key, reply) => {
                let r = self.remove(&key).await;
                let _ = reply.send(r);
            }
            Cmd::Stat(key, reply) => {
                let r = self.info(&key);
                let _ = reply.send(r);
            }
            Cmd::Update {
                name,
                labels,
                paths,
                reply,
            } => {
                let r = self.update(&name, labels, &paths).await;
                let _ = reply.send(r);
            }
            Cmd::List(filters, reply) => {
                let _ = reply.send(self.list(&filters));
            }
            Cmd::Usage(key, reply) => {
                let r = match self.table.get(&key) {
                    None => Err(state::Error::NotFound(key).into()),
                    Some(r) if r.kind == Kind::Committed => Ok(UsagePlan::Known(r.usage)),
                    Some(r) => Ok(UsagePlan::Measure(self.layout.fs(r.id))),
                };
                let _ = reply.send(r);
            }
            Cmd::Cleanup(reply) => {
                let r = self.cleanup().await;
                let _ = reply.send(r);
            }
            Cmd::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Cmd::ImageMounted(id, result) => self.image_mounted(id, result).await,
            Cmd::ImageUnmounted(id) => self.image_unmounted(id).await,
        }
    }

    async fn prepare(
        &mut self,
        key: String,
        parent: Option<String>,
        labels: BTreeMap<String, String>,
        kind: Kind,
        reply: Reply<Vec<MountSpec>>,
    ) {
        if let (Prepared::NydusBlob { target }, Kind::Active) = (labels::classify(&labels), kind) {
            let r = self.provide(&target, parent.as_deref(), labels).await;
            let _ = reply.send(
                r.and(Err(state::Error::AlreadyExists(format!(
                    "target snapshot {target:?} (provided lazily by shoal)"
                ))
                .into())),
            );
            return;
        }
        if let Some(p) = parent.as_deref() {
            if let Err(e) = check_chain(&self.table, p, &labels) {
                let _ = reply.send(Err(e.into()));
                return;
            }
        }
        let planned = self
            .table
            .plan_create(&key, parent.as_deref(), kind, labels, now_ns());
        let (change, rec) = match planned {
            Ok(p) => p,
            Err(e) => {
                let _ = reply.send(Err(e.into()));
                return;
            }
        };
        if let Err(e) = self.make_dirs(rec.id, kind).await {
            let _ = reply.send(Err(e));
            return;
        }
        if let Err(e) = self.persist(&change).await {
            self.remove_dirs(rec.id);
            let _ = reply.send(Err(e));
            return;
        }
        self.answer_or_wait(key, reply, true).await;
    }

    /// Records a Nydus data layer as committed under `target` (its bytes are read lazily
    /// through the bootstrap, so containerd has nothing to unpack).
    async fn provide(
        &mut self,
        target: &str,
        parent: Option<&str>,
        mut labels: BTreeMap<String, String>,
    ) -> Result<(), SnapError> {
        if self.table.get(target).is_some() {
            return Ok(());
        }
        labels.insert(labels::PROVIDED.into(), "nydus data blob".into());
        let (change, rec) = self.table.plan_provided(target, parent, labels, now_ns())?;
        self.make_dirs(rec.id, Kind::Committed).await?;
        if let Err(e) = self.persist(&change).await {
            self.remove_dirs(rec.id);
            return Err(e);
        }
        self.deps.metrics.snapshotter_layers_provided.inc();
        tracing::info!(
            target,
            id = rec.id,
            "provided a Nydus data layer (no download)"
        );
        Ok(())
    }

    async fn mounts(&mut self, key: String, reply: Reply<Vec<MountSpec>>) {
        match self.table.get(&key) {
            None => {
                let _ = reply.send(Err(state::Error::NotFound(key).into()));
            }
            Some(r) if r.kind == Kind::Committed => {
                let _ = reply.send(Err(state::Error::FailedPrecondition(format!(
                    "snapshot {key} is committed: only active and view snapshots have mounts"
                ))
                .into()));
            }
            Some(_) => self.answer_or_wait(key, reply, false).await,
        }
    }

    /// Answers with `key`'s mounts, first getting its image mounted if it stands on one (the
    /// reply then waits for the mount; `made`: this request created the snapshot, so a failed
    /// mount removes it again).
    async fn answer_or_wait(&mut self, key: String, reply: Reply<Vec<MountSpec>>, made: bool) {
        let Some(boot) = self.image_of(&key) else {
            let _ = reply.send(self.mount_specs(&key));
            return;
        };
        match self.images.get_mut(&boot) {
            Some(img) if img.state == ImageState::Mounted => {
                let _ = reply.send(self.mount_specs(&key));
            }
            Some(img) if matches!(img.state, ImageState::Mounting | ImageState::Unmounting) => {
                img.waiters.push((key, reply, made));
            }
            _ => {
                if let Err(e) = self.start_mount(boot) {
                    self.fail_waiter(key, reply, made, e).await;
                    return;
                }
                if let Some(img) = self.images.get_mut(&boot) {
                    img.waiters.push((key, reply, made));
                }
            }
        }
    }

    /// Starts mounting the image of bootstrap snapshot `boot`: its `image/image.boot` (the
    /// bootstrap containerd unpacked), data blobs from the registry and repository its labels
    /// name.
    fn start_mount(&mut self, boot: u64) -> Result<(), SnapError> {
        let Some((_, rec)) = self.table.iter().find(|(_, r)| r.id == boot) else {
            return Err(state::Error::NotFound(format!("bootstrap snapshot {boot}")).into());
        };
        let image = labels::image_reference(&rec.labels)?;
        let dir = self.layout.image_dir(boot);
        let fs_dir = self.layout.fs(boot);
        let mut record = MountRecord {
            image: image.clone(),
            dir: dir.clone(),
            mode: self.mode,
            platform: mount_image::platform_or_host(None),
            prefetch_rate: None,
            owner: Owner::Snapshotter,
            bootstrap_file: None,
            // Containers stand on it: it must outlive a restart of the node.
            own_process: true,
        };
        let waiters = self
            .images
            .remove(&boot)
            .map(|i| i.waiters)
            .unwrap_or_default();
        self.images.insert(
            boot,
            ImageMount {
                reference: image.clone(),
                dir: dir.clone(),
                state: ImageState::Mounting,
                waiters,
            },
        );
        let (mounts, layout, tx) = (
            self.deps.mounts.clone(),
            self.layout.clone(),
            self.tx.clone(),
        );
        let span = tracing::info_span!("image-mount", image = %image, id = boot);
        self.deps.tracker.spawn(
            async move {
                let found = tokio::task::spawn_blocking(move || {
                    let file = bootstrap_file(&fs_dir)?;
                    layout
                        .make_image_dir(boot)
                        .map_err(|e| format!("mount point: {e}"))?;
                    Ok::<_, String>(file)
                })
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r);
                let result = match found {
                    Ok(file) => {
                        record.bootstrap_file = Some(file);
                        mounts
                            .mount_owned(record)
                            .await
                            .map(|_| ())
                            .map_err(|e| describe(&e))
                    }
                    Err(e) => Err(e),
                };
                let _ = tx.send(Cmd::ImageMounted(boot, result)).await;
            }
            .instrument(span),
        );
        Ok(())
    }

    async fn image_mounted(&mut self, boot: u64, result: Result<(), String>) {
        let Some(img) = self.images.get_mut(&boot) else {
            return;
        };
        let waiters = std::mem::take(&mut img.waiters);
        match result {
            Ok(()) => {
                img.state = ImageState::Mounted;
                tracing::info!(image = %img.reference, dir = %img.dir.display(), "image mounted for containers");
                for (key, reply, made) in waiters {
                    match self.table.get(&key) {
                        Some(_) => {
                            let _ = reply.send(self.mount_specs(&key));
                        }
                        None => {
                            let e = state::Error::NotFound(key.clone()).into();
                            self.fail_waiter(key, reply, made, e).await;
                        }
                    }
                }
                // Every container went while it mounted: take it down again.
                self.release_if_unused(boot);
            }
            Err(error) => {
                tracing::warn!(image = %img.reference, %error, "image mount failed");
                let image = img.reference.clone();
                img.state = ImageState::Failed(error.clone());
                for (key, reply, made) in waiters {
                    let e = SnapError::Image {
                        image: image.clone(),
                        error: error.clone(),
                    };
                    self.fail_waiter(key, reply, made, e).await;
                }
                let l = self.layout.clone();
                let _ = tokio::task::spawn_blocking(move || l.remove_image_dir(boot)).await;
            }
        }
    }

    /// Answers a waiter with `e`, first removing its snapshot if its own request made it (no
    /// half-made snapshot outlives a failed prepare).
    async fn fail_waiter(
        &mut self,
        key: String,
        reply: Reply<Vec<MountSpec>>,
        made: bool,
        e: SnapError,
    ) {
        if made {
            if let Ok((change, rec)) = self.table.plan_remove(&key) {
                match self.persist(&change).await {
                    Ok(()) => self.remove_dirs(rec.id),
                    Err(err) => {
                        tracing::warn!(key, error = %err, "could not roll back a failed prepare")
                    }
                }
            }
        }
        let _ = reply.send(Err(e));
    }

    async fn commit(
        &mut self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(), SnapError> {
        let Some(active) = self.table.get(key) else {
            return Err(state::Error::NotFound(key.to_owned()).into());
        };
        let boot = self.image_of(key);
        let dir = self.layout.fs(active.id);
        let usage = if active.kind == Kind::Active {
            let d = dir.clone();
            tokio::task::spawn_blocking(move || layout::usage(&d))
                .await
                .map_err(|e| SnapError::Io {
                    what: "usage task".into(),
                    source: std::io::Error::other(e),
                })?
                .map_err(|source| SnapError::Io {
                    what: format!("measuring {}", dir.display()),
                    source,
                })?
        } else {
            Usage::default()
        };
        let (change, _) = self.table.plan_commit(name, key, labels, usage, now_ns())?;
        self.persist(&change).await?;
        if let Some(b) = boot {
            self.release_if_unused(b);
        }
        Ok(())
    }

    async fn remove(&mut self, key: &str) -> Result<(), SnapError> {
        let boot = self.image_of(key);
        let (change, rec) = self.table.plan_remove(key)?;
        self.persist(&change).await?;
        self.remove_dirs(rec.id);
        if let Some(b) = boot {
            self.release_if_unused(b);
        }
        Ok(())
    }

    async fn update(
        &mut self,
        name: &str,
        labels: BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<Info, SnapError> {
        let (change, _) = self.table.plan_update(name, labels, paths, now_ns())?;
        self.persist(&change).await?;
        self.info(name)
    }

    fn info(&self, key: &str) -> Result<Info, SnapError> {
        let r = self
            .table
            .get(key)
            .ok_or_else(|| state::Error::NotFound(key.to_owned()))?;
        Ok(info(key, r))
    }

    fn list(&self, filters: &[String]) -> Result<Vec<Info>, SnapError> {
        let filters = filter::parse_all(filters)?;
        Ok(self
            .table
            .iter()
            .filter(|(name, r)| {
                filter::matches_any(
                    &filters,
                    &filter::Fields {
                        kind: r.kind.as_str(),
                        name,
                        parent: r.parent.as_deref().unwrap_or(""),
                        labels: &r.labels,
                    },
                )
            })
            .map(|(name, r)| info(name, r))
            .collect())
    }

    /// Removes directories no snapshot owns and image mount points no image uses.
    async fn cleanup(&mut self) -> Result<(), SnapError> {
        let live: HashSet<u64> = self.table.iter().map(|(_, r)| r.id).collect();
        let images: HashSet<u64> = self.images.keys().copied().collect();
        let l = self.layout.clone();
        let removed = tokio::task::spawn_blocking(move || {
            let mut removed = 0;
            for id in l.orphans(&live)? {
                match l.remove(id) {
                    Ok(()) => removed += 1,
                    Err(e) => tracing::warn!(id, error = %e, "orphan snapshot directory kept"),
                }
            }
            if let Ok(entries) = std::fs::read_dir(l.root().join("images")) {
                for e in entries.flatten() {
                    let id = e.file_name().to_str().and_then(|n| n.parse::<u64>().ok());
                    if let Some(id) = id.filter(|id| !images.contains(id)) {
                        // rmdir only: a directory something is still mounted on stays.
                        let _ = l.remove_image_dir(id);
                    }
                }
            }
            Ok::<_, std::io::Error>(removed)
        })
        .await
        .map_err(|e| SnapError::Io {
            what: "cleanup task".into(),
            source: std::io::Error::other(e),
        })?
        .map_err(|source| SnapError::Io {
            what: "cleanup".into(),
            source,
        })?;
        if removed > 0 {
            tracing::info!(removed, "cleanup removed orphan snapshot directories");
        }
        Ok(())
    }

    fn status(&self) -> SnapshotterStatus {
        let mut s = SnapshotterStatus::default();
        for (_, r) in self.table.iter() {
            match r.kind {
                Kind::Active => s.active += 1,
                Kind::View => s.views += 1,
                Kind::Committed => s.committed += 1,
            }
            if r.labels.contains_key(labels::PROVIDED) {
                s.provided_layers += 1;
            }
        }
        for (id, img) in &self.images {
            s.images.push(ImageStatus {
                image: img.reference.clone(),
                dir: img.dir.clone(),
                state: img.state.as_str().to_owned(),
                containers: self.users(*id),
            });
        }
        s
    }

    /// Unmounts bootstrap `boot`'s image if no active or view snapshot stands on it.
    fn release_if_unused(&mut self, boot: u64) {
        if self.users(boot) > 0 {
            return;
        }
        let Some(img) = self.images.get_mut(&boot) else {
            return;
        };
        match img.state {
            ImageState::Mounted => {}
            ImageState::Failed(_) => {
                self.images.remove(&boot);
                return;
            }
            ImageState::Mounting | ImageState::Unmounting => return,
        }
        img.state = ImageState::Unmounting;
        let dir = img.dir.clone();
        tracing::info!(image = %img.reference, dir = %dir.display(), "last container of the image gone: unmounting");
        let (mounts, layout, tx) = (
            self.deps.mounts.clone(),
            self.layout.clone(),
            self.tx.clone(),
        );
        self.deps.tracker.spawn(async move {
            if let Err(e) = mounts.unmount_owned(&dir, Owner::Snapshotter).await {
                tracing::warn!(dir = %dir.display(), error = %e, "image unmount failed");
            }
            let _ = tokio::task::spawn_blocking(move || layout.remove_image_dir(boot)).await;
            let _ = tx.send(Cmd::ImageUnmounted(boot)).await;
        });
    }

    async fn image_unmounted(&mut self, boot: u64) {
        let Some(img) = self.images.remove(&boot) else {
            return;
        };
        if img.waiters.is_empty() {
            return;
        }
        // Containers asked for it while it went down: mount it again for them.
        let waiters = img.waiters;
        self.images.insert(
            boot,
            ImageMount {
                waiters,
                state: ImageState::Failed("remounting".into()),
                ..img
            },
        );
        if let Err(e) = self.start_mount(boot) {
            if let Some(img) = self.images.remove(&boot) {
                for (key, reply, made) in img.waiters {
                    let e = SnapError::Image {
                        image: img.reference.clone(),
                        error: e.to_string(),
                    };
                    self.fail_waiter(key, reply, made, e).await;
                }
            }
        }
    }

    /// Brings back (in the background) the image mounts of the snapshots that remain.
    fn restore(&mut self) {
        let boots: HashSet<u64> = self
            .table
            .iter()
            .filter(|(_, r)| r.kind != Kind::Committed)
            .filter_map(|(name, _)| self.image_of(name))
            .collect();
        for boot in boots {
            if let Err(e) = self.start_mount(boot) {
                tracing::warn!(id = boot, error = %e, "image mount not restored");
            }
        }
    }

    /// The bootstrap snapshot id of the Nydus image active or view snapshot `key` stands on.
    fn image_of(&self, key: &str) -> Option<u64> {
        let r = self.table.get(key)?;
        if r.kind == Kind::Committed {
            return None;
        }
        self.table
            .ancestors(key)
            .into_iter()
            .find(|(_, a)| labels::is_bootstrap(&a.labels))
            .map(|(_, a)| a.id)
    }

    /// Active and view snapshots standing on bootstrap `boot`'s image.
    fn users(&self, boot: u64) -> usize {
        self.table
            .iter()
            .filter(|(name, _)| self.image_of(name) == Some(boot))
            .count()
    }

    /// `key`'s mounts: its own directories over its ancestors' (nearest first), a Nydus
    /// bootstrap and everything below it replaced by the image's mount.
    fn mount_specs(&self, key: &str) -> Result<Vec<MountSpec>, SnapError> {
        let r = self
            .table
            .get(key)
            .ok_or_else(|| state::Error::NotFound(key.to_owned()))?;
        let mut lowers = Vec::new();
        for (_, a) in self.table.ancestors(key) {
            if labels::is_bootstrap(&a.labels) {
                lowers.push(self.layout.image_dir(a.id));
                break;
            }
            lowers.push(self.layout.fs(a.id));
        }
        Ok(self.layout.mounts(r.kind, r.id, &lowers))
    }

    async fn make_dirs(&self, id: u64, kind: Kind) -> Result<(), SnapError> {
        let l = self.layout.clone();
        tokio::task::spawn_blocking(move || l.create(id, kind))
            .await
            .map_err(|e| SnapError::Io {
                what: "mkdir task".into(),
                source: std::io::Error::other(e),
            })?
            .map_err(|source| SnapError::Io {
                what: format!("creating {}", self.layout.snapshot_dir(id).display()),
                source,
            })
    }

    /// Removes a snapshot's directories in the background (a failure leaves an orphan that
    /// `Cleanup` retries).
    fn remove_dirs(&self, id: u64) {
        let l = self.layout.clone();
        self.deps.tracker.spawn_blocking(move || {
            if let Err(e) = l.remove(id) {
                tracing::warn!(id, error = %e, "snapshot directory not removed; Cleanup retries");
            }
        });
    }

    async fn persist(&mut self, change: &Change) -> Result<(), SnapError> {
        let store = self.deps.store.clone();
        let writes = change.to_store();
        tokio::task::spawn_blocking(move || store.write_snapshots(writes))
            .await
            .map_err(|e| SnapError::Io {
                what: "metadata task".into(),
                source: std::io::Error::other(e),
            })??;
        self.table.apply(change);
        Ok(())
    }

    /// Snapshot and image gauges.
    fn publish(&self) {
        let m = &self.deps.metrics;
        let mut counts = [0i64; 3];
        for (_, r) in self.table.iter() {
            counts[match r.kind {
                Kind::Active => 0,
                Kind::View => 1,
                Kind::Committed => 2,
            }] += 1;
        }
        for (kind, n) in ["active", "view", "committed"].into_iter().zip(counts) {
            m.snapshots.get_or_create(&KindLabels { kind }).set(n);
        }
        let mounted = self
            .images
            .values()
            .filter(|i| i.state == ImageState::Mounted)
            .count();
        m.snapshotter_images.set(mounted as i64);
    }
}

fn info(name: &str, r: &Record) -> Info {
    Info {
        name: name.to_owned(),
        parent: r.parent.clone(),
        kind: r.kind,
        labels: r.labels.clone(),
        created_ns: r.created_ns,
        updated_ns: r.updated_ns,
    }
}

/// Refuses a new snapshot (with `labels`) on `parent` when the chain holds Nydus data layers
/// without their bootstrap above them: a container there would see an empty tree (an image whose
/// bootstrap layer is missing, or unpacked by another snapshotter). The bootstrap layer's own
/// unpack is what puts the bootstrap above them, so it passes.
fn check_chain(
    table: &Table,
    parent: &str,
    labels: &BTreeMap<String, String>,
) -> Result<(), state::Error> {
    if labels::classify(labels) == Prepared::Layer && labels::is_bootstrap(labels) {
        return Ok(());
    }
    let Some(p) = table.get(parent) else {
        return Ok(()); // plan_create reports the missing parent
    };
    let mut chain = vec![p];
    chain.extend(table.ancestors(parent).into_iter().map(|(_, r)| r));
    for r in chain {
        if labels::is_bootstrap(&r.labels) {
            return Ok(());
        }
        if r.labels.contains_key(labels::PROVIDED) {
            return Err(state::Error::FailedPrecondition(format!(
                "{parent} is or stands on Nydus data layers without a Nydus bootstrap layer \
                 (containerd.io/snapshot/nydus-bootstrap) above them: the image lacks its \
                 bootstrap, or was not pulled with its layer annotations"
            )));
        }
    }
    Ok(())
}

/// The RAFS bootstrap inside an unpacked Nydus bootstrap layer: `image/image.boot` (or the
/// older `image.boot`), a regular file reached through real directories only — the layer's
/// content is the image author's, and a symbolic link there must not lead anywhere else.
fn bootstrap_file(fs_dir: &std::path::Path) -> Result<PathBuf, String> {
    let image = fs_dir.join("image");
    let candidates = match std::fs::symlink_metadata(&image) {
        Ok(m) if m.is_dir() => vec![image.join("image.boot"), fs_dir.join("image.boot")],
        _ => vec![fs_dir.join("image.boot")],
    };
    for c in candidates {
        match std::fs::symlink_metadata(&c) {
            Ok(m) if m.is_file() => return Ok(c),
            Ok(_) => return Err(format!("{} is not a regular file", c.display())),
            Err(_) => continue,
        }
    }
    Err(format!(
        "the Nydus bootstrap layer holds no image/image.boot (in {})",
        fs_dir.display()
    ))
}

/// A mount error as containerd's log should show it.
fn describe(e: &MountError) -> String {
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn map(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn data_layers_need_their_bootstrap_above_them() {
        let mut t = Table::default();
        let add = |t: &mut Table, name: &str, parent: Option<&str>, kv: &[(&str, &str)]| {
            let (c, _) = t.plan_provided(name, parent, map(kv), 1).unwrap();
            t.apply(&c);
        };
        add(&mut t, "base", None, &[]);
        add(&mut t, "blob1", Some("base"), &[(labels::PROVIDED, "x")]);
        add(&mut t, "blob2", Some("blob1"), &[(labels::PROVIDED, "x")]);
        let container = map(&[]);
        let err = check_chain(&t, "blob2", &container).unwrap_err();
        assert!(err.to_string().contains("nydus-bootstrap"), "{err}");
        assert!(check_chain(&t, "base", &container).is_ok(), "plain layers");
        // The bootstrap layer's unpack on the data layers is what completes the image.
        let unpack = map(&[
            (labels::TARGET_REF, "sha256:top"),
            (labels::NYDUS_BOOTSTRAP, "true"),
        ]);
        check_chain(&t, "blob2", &unpack).unwrap();
        let other_layer = map(&[(labels::TARGET_REF, "sha256:top")]);
        assert!(check_chain(&t, "blob2", &other_layer).is_err());
        let labelled_container = map(&[(labels::NYDUS_BOOTSTRAP, "true")]);
        assert!(
            check_chain(&t, "blob2", &labelled_container).is_err(),
            "a container does not pass by carrying the label"
        );
        add(
            &mut t,
            "boot",
            Some("blob2"),
            &[(labels::NYDUS_BOOTSTRAP, "true")],
        );
        check_chain(&t, "boot", &container).unwrap();
    }

    #[test]
    fn the_bootstrap_file_is_a_regular_file_behind_real_directories() {
        let d = tempfile::tempdir().unwrap();
        let fs = d.path();
        assert!(bootstrap_file(fs).is_err(), "none there");
        std::fs::write(fs.join("image.boot"), b"legacy").unwrap();
        assert_eq!(bootstrap_file(fs).unwrap(), fs.join("image.boot"));
        std::fs::create_dir(fs.join("image")).unwrap();
        std::fs::write(fs.join("image/image.boot"), b"boot").unwrap();
        assert_eq!(bootstrap_file(fs).unwrap(), fs.join("image/image.boot"));
        // A link in place of the file, or of its directory, is refused.
        std::fs::remove_file(fs.join("image/image.boot")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", fs.join("image/image.boot")).unwrap();
        assert!(bootstrap_file(fs).is_err());
        std::fs::remove_file(fs.join("image/image.boot")).unwrap();
        std::fs::remove_dir(fs.join("image")).unwrap();
        std::fs::remove_file(fs.join("image.boot")).unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::fs::write(elsewhere.path().join("image.boot"), b"other").unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), fs.join("image")).unwrap();
        assert!(
            bootstrap_file(fs).is_err(),
            "a linked directory is not followed"
        );
    }
}
