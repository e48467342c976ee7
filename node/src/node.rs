//! A running node: wires the store, origins, access checks, downloads, the
//! mirror and the admin API together, and shuts them down in order.
//!
//! Listeners: the mirror/proxy (`listen`, TCP), the read-only admin listener
//! (`admin`, TCP: health, metrics, status) and the control socket (`control`,
//! a root-only Unix socket: every state-changing call).
//!
//! Shutdown order: stop accepting connections (closing proxy tunnels) and
//! give in-flight responses a grace period → unmount the lazy mounts (kept in
//! the mount table for the next start) → cancel downloads (each commits what
//! it has) → wait for every task → stop the cluster side (announcements, DHT,
//! uploads) → flush the store.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access::Access;
use crate::admin::{self, AdminState, NodeInfo};
use crate::config::Config;
use crate::control::{self, ControlListener, Policy};
use crate::download::Downloads;
use crate::metrics::Metrics;
use crate::mirror::{self, MirrorState};
use crate::mount::{MountDeps, Mounts};
use crate::p2p::Identity;
use crate::peering::Peering;
use crate::prewarm::Prewarm;
use crate::snapshotter::{Snapshotter, SnapshotterConfig, SnapshotterDeps};
use crate::store::{Backend, Store, StoreConfig};
use crate::upstream::Upstreams;

/// How long in-flight responses may run on after a shutdown signal.
const GRACE: Duration = Duration::from_secs(10);

/// Run a node until `shutdown` resolves.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    crate::faults::check_env()?;
    let metrics = Arc::new(Metrics::new());
    let store_cfg = StoreConfig {
        dir: cfg.data_dir.clone(),
        backend: Backend::RocksDb,
        quota_bytes: cfg.store.quota_bytes,
        filesystem_quota: cfg.store.filesystem,
        high_watermark: cfg.store.high_watermark,
        low_watermark: cfg.store.low_watermark,
    };
    if cfg.store.quota_bytes == 0 && !cfg.store.filesystem {
        tracing::warn!("store.quota = 0: the cache may fill its disk (unset it to keep the filesystem below 85 %)");
    }
    let dir = cfg.data_dir.clone();
    tokio::task::spawn_blocking(move || private_data_dir(&dir))
        .await?
        .with_context(|| format!("the data dir {}", cfg.data_dir.display()))?;
    let store = tokio::task::spawn_blocking(move || Store::open(store_cfg))
        .await?
        .with_context(|| format!("opening the store in {}", cfg.data_dir.display()))?;
    // What the mounts keep beside the store counts against its byte quota too.
    store.charge_dirs(vec![
        crate::mount::fs::erofs_root(&cfg.data_dir),
        cfg.data_dir.join(crate::mount::private::DIR),
        cfg.snapshotter.root.join("images"),
    ]);
    let usage = store.usage();
    tracing::info!(dir = %cfg.data_dir.display(), blobs = usage.blobs, complete = usage.complete, bytes = usage.bytes, "store open");

    let work = CancellationToken::new();
    let tracker = TaskTracker::new();
    tracker.spawn(crate::heap::trim_every(
        crate::heap::TRIM_EVERY,
        work.clone(),
    ));
    let upstreams = Arc::new(Upstreams::new(&cfg, metrics.clone())?);
    let access = Arc::new(Access::new(
        cfg.mirror.access_ttl.0,
        cfg.mirror.possession_samples,
        store.clone(),
        metrics.clone(),
    ));
    // The cluster side: data plane, DHT, announcements. Stopped after the
    // downloads (which use it) and before the store is flushed.
    let peer_cancel = CancellationToken::new();
    let mut embedded = None;
    let peering = match &cfg.p2p {
        Some(p2p_cfg) => {
            if let Some(listen) = p2p_cfg.embedded_scheduler {
                let mut sched_cfg = shoal_scheduler::config::FileConfig {
                    listen,
                    ..Default::default()
                }
                .validate()?;
                sched_cfg.auth_key = Some(
                    p2p_cfg
                        .join_secret
                        .derive_key(shoal_proto::auth::SCHEDULER_LABEL),
                );
                let scheduler = shoal_scheduler::server::Scheduler::bind(sched_cfg)
                    .await
                    .with_context(|| {
                        format!("embedded scheduler on {listen} (p2p.embedded_scheduler)")
                    })?;
                let stop = peer_cancel.clone();
                embedded = Some(tokio::spawn(async move {
                    if let Err(e) = scheduler.serve(stop.cancelled_owned()).await {
                        tracing::error!(error = %e, "embedded scheduler failed");
                    }
                }));
            }
            let dir = cfg.data_dir.clone();
            let identity = tokio::task::spawn_blocking(move || Identity::load_or_generate(&dir))
                .await?
                .with_context(|| format!("node identity in {}", cfg.data_dir.display()))?;
            Some(
                Peering::start(
                    p2p_cfg,
                    identity,
                    store.clone(),
                    metrics.clone(),
                    peer_cancel.clone(),
                )
                .await?,
            )
        }
        None => {
            tracing::info!("no p2p.join_secret_file: standalone node (no peers)");
            None
        }
    };
    let downloads = Downloads::new(
        store.clone(),
        metrics.clone(),
        peering.clone(),
        tracker.clone(),
        work.clone(),
        cfg.mirror.max_origin_downloads,
    );
    if let Some(p) = &peering {
        // Prewarm jobs come from the schedulers; they run like downloads
        // (cancelled with them at shutdown).
        p.attach_prewarm(Prewarm::new(
            store.clone(),
            upstreams.clone(),
            downloads.clone(),
            Some(p.clone()),
            tracker.clone(),
            work.clone(),
        ));
    }
    let chunk_registry = crate::mount::remote::Registry::default();
    // Image servers (the snapshotter's mounts, in processes of their own) read chunks here.
    let chunk_socket = crate::mount::remote::socket_for(&cfg.control);
    let chunk_listener = match ControlListener::bind(&chunk_socket, None) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(error = %e, "no chunk socket for image servers: the snapshotter's mounts live in the node (they go when it stops)");
            None
        }
    };
    let mounts = Mounts::start(MountDeps {
        data_dir: cfg.data_dir.clone(),
        store: store.clone(),
        upstreams: upstreams.clone(),
        downloads: downloads.clone(),
        metrics: metrics.clone(),
        peering: peering.clone(),
        tag_ttl: cfg.mirror.tag_ttl.0,
        cancel: work.clone(),
        tracker: tracker.clone(),
        remote: chunk_listener.as_ref().map(|_| crate::mount::RemoteDeps {
            socket: chunk_socket.clone(),
            registry: chunk_registry.clone(),
        }),
    });
    let snapshotter = Snapshotter::start(
        SnapshotterConfig {
            root: cfg.snapshotter.root.clone(),
            mode: cfg.snapshotter.mode,
        },
        SnapshotterDeps {
            store: store.clone(),
            mounts: mounts.clone(),
            metrics: metrics.clone(),
            tracker: tracker.clone(),
            cancel: work.clone(),
        },
    )
    .await
    .context("the containerd snapshotter (snapshotter.root)")?;
    // The conversion service: its workers run like downloads (cancelled with them).
    let convert = match &cfg.convert {
        None => None,
        Some(c) => {
            let origin = upstreams.configured(&c.registry.host).with_context(|| {
                format!(
                    "convert.registry {}: not a configured upstream",
                    c.registry.host
                )
            })?;
            let scheduler = cfg.p2p.as_ref().and_then(|p| {
                p.schedulers.first().map(|s| {
                    (
                        s.clone(),
                        p.join_secret.derive_key(shoal_proto::auth::SCHEDULER_LABEL),
                    )
                })
            });
            let service = crate::convert::service::Service::start(
                c.clone(),
                crate::convert::service::ServiceDeps {
                    store: store.clone(),
                    downloads: downloads.clone(),
                    origin,
                    metrics: metrics.clone(),
                    scheduler,
                    tracker: tracker.clone(),
                    cancel: work.clone(),
                },
            )?;
            let listener = TcpListener::bind(c.listen).await.with_context(|| {
                format!(
                    "binding the conversion service to {} (convert.listen)",
                    c.listen
                )
            })?;
            Some((service, listener))
        }
    };
    let passthrough = reqwest::Client::builder()
        .use_rustls_tls()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(cfg.mirror.upstream_timeout.0)
        .build()?;
    let stop_accepting = CancellationToken::new();
    let mirror_state = MirrorState {
        store: store.clone(),
        upstreams,
        access,
        downloads: downloads.clone(),
        metrics: metrics.clone(),
        cfg: Arc::new(cfg.mirror.clone()),
        passthrough,
        tunnels: mirror::Tunnels::new(
            cfg.mirror.max_tunnels,
            cfg.mirror.tunnel_idle_timeout.0,
            stop_accepting.clone(),
        ),
        own: mirror::OwnListeners::new(&cfg),
    };
    let info = NodeInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        data_dir: cfg.data_dir.display().to_string(),
        listen: cfg.listen.to_string(),
        admin: cfg.admin.to_string(),
        control: cfg.control.display().to_string(),
        upstreams: cfg
            .upstreams
            .iter()
            .map(|u| format!("{}={}", u.host, u.url))
            .collect(),
        started_at_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    };
    let metrics_for_snapshotter = metrics.clone();
    let admin_state = AdminState {
        store: store.clone(),
        downloads,
        metrics,
        info: Arc::new(info),
        peering: peering.clone(),
        hosts: Arc::new(cfg.admin_hosts.clone()),
        snapshotter: Some(snapshotter.clone()),
    };
    let control_status = admin::control_router(admin_state.clone());

    let mirror_listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding the mirror to {} (listen)", cfg.listen))?;
    let admin_listener = TcpListener::bind(cfg.admin)
        .await
        .with_context(|| format!("binding the admin API to {} (admin)", cfg.admin))?;
    let control_listener = ControlListener::bind(
        &cfg.control,
        cfg.control_group.as_ref().map(|(_, gid)| *gid),
    )
    .context("the control socket (control)")?;
    let policy = Policy {
        uid: rustix::process::geteuid().as_raw(),
        group: cfg.control_group.as_ref().map(|(_, gid)| *gid),
    };
    // containerd (root) is the snapshotter's one client: no group.
    let snapshotter_listener = match ControlListener::bind(&cfg.snapshotter.socket, None) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(error = %e, "containerd's snapshotter is not served (snapshotter.socket)");
            None
        }
    };
    let snapshotter_policy = Policy {
        uid: policy.uid,
        group: None,
    };

    tracing::info!(listen = %cfg.listen, admin = %cfg.admin, control = %cfg.control.display(), snapshotter = %cfg.snapshotter.socket.display(), "node ready");

    let servers = TaskTracker::new();
    let s = stop_accepting.clone();
    servers.spawn(async move {
        let app = mirror::router(mirror_state);
        crate::serve::serve(mirror_listener, app, crate::serve::Limits::MIRROR, s).await
    });
    let s = stop_accepting.clone();
    servers.spawn(async move {
        crate::serve::serve(
            admin_listener,
            admin::router(admin_state),
            crate::serve::Limits::ADMIN,
            s,
        )
        .await
    });
    let s = stop_accepting.clone();
    let mut control_routes = crate::mount::api::router(mounts.clone()).merge(control_status);
    if let Some((service, listener)) = convert {
        control_routes = control_routes.merge(service.control_router());
        let s = stop_accepting.clone();
        servers.spawn(async move {
            crate::serve::serve(listener, service.router(), crate::serve::Limits::ADMIN, s).await
        });
    }
    servers.spawn(async move {
        control::serve(
            control_listener,
            control_routes,
            policy,
            s.cancelled_owned(),
        )
        .await
    });
    if let Some(listener) = snapshotter_listener {
        let s = stop_accepting.clone();
        let (snap, snap_metrics) = (snapshotter.clone(), metrics_for_snapshotter);
        servers.spawn(async move {
            crate::snapshotter::service::serve(
                listener,
                snapshotter_policy,
                snap,
                snap_metrics,
                s.cancelled_owned(),
            )
            .await
            .map_err(std::io::Error::other)
        });
    }
    if let Some(listener) = chunk_listener {
        let s = stop_accepting.clone();
        servers.spawn(async move {
            crate::mount::remote::serve(listener, snapshotter_policy, chunk_registry, s).await;
            Ok::<(), std::io::Error>(())
        });
    }
    servers.close();

    shutdown.await;
    tracing::info!("shutting down: no new connections");
    stop_accepting.cancel();
    if tokio::time::timeout(GRACE, servers.wait()).await.is_err() {
        tracing::warn!("in-flight responses still running after {GRACE:?}; cutting them");
    }
    mounts.shutdown().await;
    work.cancel();
    tracker.close();
    tracker.wait().await;
    if let Some(p) = &peering {
        p.shutdown().await;
    }
    peer_cancel.cancel();
    if let Some(s) = embedded {
        let _ = s.await;
    }
    tokio::task::spawn_blocking(move || store.flush()).await??;
    tracing::info!("store flushed; bye");
    Ok(())
}

/// The data dir holds every cached blob — private images' too — in plain files, and the mounts'
/// own chunk caches: only the node's user may enter it. Created 0700; an existing one of ours that
/// others can enter is closed (a node started by hand, or a `hostPath` the kubelet created 0755).
fn private_data_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = std::fs::metadata(dir)?;
    if meta.mode() & 0o077 == 0 {
        return Ok(());
    }
    if meta.uid() != rustix::process::geteuid().as_raw() {
        tracing::warn!(dir = %dir.display(), mode = format!("{:o}", meta.mode() & 0o7777), "the data dir belongs to another user and others may enter it: cached private content is readable there");
        return Ok(());
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    tracing::info!(dir = %dir.display(), was = format!("{:o}", meta.mode() & 0o7777), "data dir closed to other users (0700)");
    Ok(())
}
