//! The node's place in a cluster: the data plane, the DHT and the
//! schedulers, behind one handle the download path asks.
//!
//! What it owns:
//! - the **announce loop**: a full announcement to each scheduler at start
//!   and whenever one asks (`resync`, or after it was unreachable), then
//!   deltas of what changed, once per heartbeat or sooner (debounced) when a
//!   download commits pieces, so followers pipeline closely behind a lease
//!   holder; it also carries the node's cumulative traffic;
//! - **leases** this node holds: downloads say when they fetch from the
//!   origin under a lease ([`Peering::lease_started`]) so announcements carry
//!   `origin_fetch`, progress and piece hashes, and learn here when the
//!   scheduler revoked it ([`Peering::lease_revoked`]);
//! - **DHT provider records** for complete blobs (the fallback when no
//!   scheduler answers), withdrawn when the store drops a blob;
//! - **queries** for the download path: [`Peering::parents`],
//!   [`Peering::providers`], [`Peering::blame`];
//! - the link to the **prewarm job runner** ([`crate::prewarm`]): jobs in
//!   the answers go to it, its progress goes into the announcements.
//!
//! Invariants: nothing here trusts a peer for content — it only says whom
//! to ask. Scheduler or DHT trouble never fails a download: every query
//! answers "nobody" on error, and the download falls back to the origin.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shoal_proto::auth::SCHEDULER_LABEL;
use shoal_proto::sched::{
    AnnounceRequest, AnnounceResponse, BlobAnnouncement, FailureReason, FailureReport,
    NodeAnnouncement, ParentsRequest, ParentsResponse, PieceBits, PieceSha256, Traffic,
};
use shoal_proto::{BlobId, NodeId};
use shoal_scheduler::client::{ClientOptions, SchedulerSet};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::config::P2p;
use crate::metrics::{KindLabels, Metrics, Totals};
use crate::p2p::dht::{self, Dht, DhtConfig, Provider};
use crate::p2p::{self, Identity, P2pConfig, P2pHandle};
use crate::prewarm::Prewarm;
use crate::store::pieces::piece_range;
use crate::store::{BlobRecord, Removal, Store};

/// Most bytes (whole pieces) [`Peering::read_from_seed`] asks the lease holder for at once.
pub const SEED_READ_MAX: u64 = 16 << 20;
/// How long [`Peering::read_from_seed`] waits for the seed's piece hashes.
const SEED_HASH_WAIT: Duration = Duration::from_secs(5);

/// Heartbeat used until a scheduler says otherwise.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(2);
/// Announcements triggered by progress are at most this frequent.
const DEBOUNCE: Duration = Duration::from_millis(150);
/// How long a DHT provider lookup may take.
const DHT_LOOKUP: Duration = Duration::from_secs(3);

/// Handle to the node's cluster side; clones share it.
#[derive(Clone)]
pub struct Peering {
    inner: Arc<Inner>,
}

struct Inner {
    node_id: NodeId,
    advertise: SocketAddr,
    zone: Option<String>,
    p2p: P2pHandle,
    dht: Option<Dht>,
    schedulers: Option<SchedulerSet>,
    store: Store,
    metrics: Arc<Metrics>,
    fetch_window: usize,
    stall_timeout: Duration,
    state: Mutex<State>,
    /// Set once the download path exists (it needs this handle first).
    prewarm: OnceLock<Prewarm>,
    wake: Notify,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

#[derive(Default)]
struct State {
    /// Blobs changed since the last delta.
    dirty: HashSet<BlobId>,
    /// Blobs dropped since the last delta.
    removed: HashSet<BlobId>,
    /// Blobs this node fetches from the origin under a lease, with the
    /// bytes read from the origin so far.
    leases: HashMap<BlobId, u64>,
    /// Leases the scheduler took back, not yet seen by their download.
    revoked: HashSet<BlobId>,
    /// Complete blobs whose piece hashes a scheduler asked for.
    hashes_wanted: HashSet<BlobId>,
    /// Per scheduler: the next announcement must be full.
    needs_full: Vec<bool>,
    heartbeat: Option<Duration>,
    /// Per scheduler: the last announcement succeeded.
    reachable: Vec<bool>,
    /// Per scheduler: why the last announcement failed.
    errors: Vec<Option<String>>,
}

/// What `shoal status` shows about the cluster side (the `p2p` object of
/// the admin API's status).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeeringStatus {
    pub node_id: String,
    pub p2p_addr: String,
    pub zone: Option<String>,
    pub schedulers: Vec<SchedulerStatus>,
    pub dht_addr: Option<String>,
    pub dht_peers: Option<usize>,
    pub upload_slots_free: usize,
    pub leases: usize,
    /// Range bytes sent to peers since the node started.
    pub uploaded_bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SchedulerStatus {
    pub addr: String,
    pub reachable: bool,
    /// Why the last announcement failed.
    #[serde(default)]
    pub error: Option<String>,
}

impl Peering {
    /// Starts the data plane, the DHT and the announce loop. Stops with
    /// `cancel` (or [`Peering::shutdown`]).
    pub async fn start(
        cfg: &P2p,
        identity: Identity,
        store: Store,
        metrics: Arc<Metrics>,
        cancel: CancellationToken,
    ) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let cancel = cancel.child_token();
        let mut pcfg = P2pConfig::new(cfg.listen, cfg.join_secret.clone());
        pcfg.upload_slots = cfg.upload_slots;
        pcfg.upload_rate = cfg.upload_rate;
        #[cfg(feature = "fault-injection")]
        {
            pcfg.fault_corrupt_uploads = crate::faults::corrupt_uploads();
        }
        let p2p = p2p::start(
            pcfg,
            store.clone(),
            identity.clone(),
            metrics.p2p.clone(),
            cancel.clone(),
        )
        .await
        .with_context(|| format!("starting the p2p data plane on {} (p2p.listen)", cfg.listen))?;
        let advertise = advertise_addr(cfg, p2p.local_addr());
        let schedulers = if cfg.schedulers.is_empty() {
            None
        } else {
            Some(
                SchedulerSet::new(&cfg.schedulers, &ClientOptions::default())
                    .context("p2p.schedulers")?
                    .with_auth(cfg.join_secret.derive_key(SCHEDULER_LABEL)),
            )
        };
        let mut dcfg = DhtConfig::new(cfg.dht_listen, advertise);
        dcfg.bootstrap = cfg.peers.clone();
        let dht = match dht::start(
            dcfg,
            identity.keypair(),
            &cfg.join_secret.derive_key("dht-pnet"),
            cancel.clone(),
        )
        .await
        {
            Ok(d) => Some(d),
            Err(e) => {
                // The DHT is a fallback: run without it rather than not at all.
                tracing::error!(error = %e, addr = %cfg.dht_listen, "DHT not started; continuing with schedulers and origin only");
                None
            }
        };
        let n = schedulers.as_ref().map_or(0, |s| s.all().len());
        let inner = Arc::new(Inner {
            node_id: identity.node_id(),
            advertise,
            zone: cfg.zone.clone(),
            p2p,
            dht,
            schedulers,
            store: store.clone(),
            metrics,
            fetch_window: cfg.fetch_window,
            stall_timeout: cfg.stall_timeout,
            state: Mutex::new(State {
                needs_full: vec![true; n],
                reachable: vec![false; n],
                errors: vec![None; n],
                ..State::default()
            }),
            prewarm: OnceLock::new(),
            wake: Notify::new(),
            cancel,
            tracker: TaskTracker::new(),
        });
        let weak = Arc::downgrade(&inner);
        store.set_removal_listener(move |id, why| {
            if let Some(inner) = weak.upgrade() {
                Peering { inner }.removed(id, why);
            }
        });
        let this = Peering { inner };
        let span = tracing::info_span!("announce");
        let me = this.clone();
        this.inner
            .tracker
            .spawn(async move { me.announce_loop().await }.instrument(span));
        let me = this.clone();
        this.inner
            .tracker
            .spawn(async move { me.provide_all().await });
        this.inner.tracker.close();
        tracing::info!(node = %this.inner.node_id, advertise = %advertise, schedulers = n, dht = this.inner.dht.is_some(), "joined the cluster");
        Ok(this)
    }

    pub fn node_id(&self) -> NodeId {
        self.inner.node_id
    }

    pub fn p2p(&self) -> &P2pHandle {
        &self.inner.p2p
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Pieces fetched from peers at once for one blob.
    pub fn fetch_window(&self) -> usize {
        self.inner.fetch_window
    }

    /// How long a download may go without a new piece before it gives up
    /// on peers.
    pub fn stall_timeout(&self) -> Duration {
        self.inner.stall_timeout
    }

    pub fn has_schedulers(&self) -> bool {
        self.inner.schedulers.is_some()
    }

    /// Holders of `blob` and its lease, from the blob's scheduler. `None`:
    /// no scheduler configured or none answered.
    pub async fn parents(
        &self,
        blob: &BlobId,
        size: Option<u64>,
        want_lease: bool,
    ) -> Option<ParentsResponse> {
        let client = self.inner.schedulers.as_ref()?.for_blob(blob)?;
        let req = ParentsRequest {
            asker: self.inner.node_id,
            size,
            want_lease,
        };
        let started = Instant::now();
        let result = client.parents(blob, &req).await;
        self.observe("parents", started, result.is_ok());
        match result {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::debug!(error = %e, "parents request failed");
                None
            }
        }
    }

    /// The access list another node of the cluster shared for the image whose bootstrap has
    /// digest `key` (from that key's scheduler), or `None` (none shared, or no answer within a
    /// few seconds: a mount does not wait longer for a prefetch hint).
    pub async fn shared_access_list(&self, key: &shoal_proto::Digest) -> Option<Vec<(u32, u64)>> {
        let client = self.inner.schedulers.as_ref()?.for_blob(key)?;
        let started = Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(3), client.access_list(key)).await;
        match result {
            Ok(Ok(found)) => {
                self.observe("access_list", started, true);
                found.map(|l| l.chunks)
            }
            Ok(Err(e)) => {
                self.observe("access_list", started, false);
                tracing::debug!(error = %e, "access list request failed");
                None
            }
            Err(_) => None,
        }
    }

    /// Shares the access list of the image whose bootstrap has digest `key` with the cluster
    /// (its first [`shoal_proto::sched::MAX_SHARED_ACCESS`] chunks).
    pub async fn share_access_list(&self, key: &shoal_proto::Digest, chunks: &[(u32, u64)]) {
        let Some(client) = self.inner.schedulers.as_ref().and_then(|s| s.for_blob(key)) else {
            return;
        };
        let n = chunks.len().min(shoal_proto::sched::MAX_SHARED_ACCESS);
        let list = shoal_proto::sched::AccessList {
            chunks: chunks[..n].to_vec(),
        };
        let started = Instant::now();
        let result = client.put_access_list(key, &list).await;
        self.observe("share_access_list", started, result.is_ok());
        match result {
            Ok(()) => tracing::info!(image = %key, chunks = n, "shared the image's access list"),
            Err(e) => tracing::warn!(image = %key, error = %e, "sharing the access list failed"),
        }
    }

    /// `range` of `blob` from a peer holding all of it (the scheduler's
    /// holders first, then the DHT's), or `None` if no peer could give it.
    /// The bytes are NOT verified: the caller checks them (lazy mounts
    /// verify every chunk against its digest) and calls [`Peering::blame`]
    /// with the returned peer when they are wrong.
    pub async fn read_range(
        &self,
        blob: &BlobId,
        range: std::ops::Range<u64>,
    ) -> Option<(NodeId, Vec<u8>)> {
        let len = range.end.checked_sub(range.start)?;
        let mut candidates: Vec<(NodeId, SocketAddr)> = Vec::new();
        if let Some(view) = self.parents(blob, None, false).await {
            if let (Some(size), Some(piece)) = (view.size, view.piece_size) {
                let first = u32::try_from(range.start / piece.max(1)).ok()?;
                let last =
                    u32::try_from(range.end.min(size).saturating_sub(1) / piece.max(1)).ok()?;
                let (full, partial): (Vec<_>, Vec<_>) = view
                    .holders
                    .iter()
                    .partition(|h| h.complete || (first..=last).all(|i| h.have.get(i)));
                // Holders of every piece the range touches first; then holders of some of the
                // blob: a lazy mount keeps the chunks it read, which rarely fill whole pieces,
                // and a peer answers for exactly the bytes it holds.
                candidates.extend(full.iter().map(|h| (h.node, h.p2p_addr)));
                candidates.extend(partial.iter().map(|h| (h.node, h.p2p_addr)));
            }
        } else {
            candidates.extend(
                self.providers(blob)
                    .await
                    .into_iter()
                    .map(|p| (p.node, p.quic_addr)),
            );
        }
        for (peer, addr) in candidates.into_iter().take(4) {
            match self
                .inner
                .p2p
                .fetch_exact(peer, addr, blob, range.start, len)
                .await
            {
                Ok(buf) => {
                    self.inner.metrics.from_peers("chunk", len);
                    return Some((peer, buf));
                }
                Err(e) => {
                    tracing::debug!(peer = %peer.short(), error = %e, "range from peer failed");
                }
            }
        }
        None
    }

    /// `range` of `blob` from the node fetching it under the origin lease (its seed: it fetches
    /// pieces it has not reached yet when asked), each whole piece the range touches checked
    /// against the SHA-256 the lease holder announced before any byte is returned. `None`: no
    /// lease holder other than this node, the range spans more than [`SEED_READ_MAX`] of
    /// pieces, the holder did not deliver, or a piece did not match (the holder is blamed).
    pub async fn read_from_seed(
        &self,
        blob: &BlobId,
        range: std::ops::Range<u64>,
    ) -> Option<Vec<u8>> {
        let view = self.parents(blob, None, false).await?;
        let (size, piece) = (view.size?, view.piece_size?.max(1));
        if range.start >= range.end || range.end > size {
            return None;
        }
        let holder = view
            .holders
            .iter()
            .find(|h| h.lease_holder && h.node != self.inner.node_id)?;
        let first = range.start / piece;
        let last = (range.end - 1) / piece;
        let whole = piece_range(first, piece, size).start..piece_range(last, piece, size).end;
        if whole.end - whole.start > SEED_READ_MAX {
            return None;
        }
        let bytes = match self
            .inner
            .p2p
            .fetch_exact(
                holder.node,
                holder.p2p_addr,
                blob,
                whole.start,
                whole.end - whole.start,
            )
            .await
        {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(peer = %holder.node.short(), error = %e, "range from the seed failed");
                return None;
            }
        };
        // The holder announces the hashes of pieces it committed soon after (debounced): wait
        // for them a little, never longer than SEED_HASH_WAIT.
        let deadline = Instant::now() + SEED_HASH_WAIT;
        let mut hashes = view.piece_sha256.unwrap_or_default();
        loop {
            let known = (first..=last).all(|i| {
                usize::try_from(i)
                    .ok()
                    .and_then(|i| hashes.get(i))
                    .is_some_and(Option::is_some)
            });
            if known {
                break;
            }
            if Instant::now() >= deadline {
                tracing::debug!("the seed's piece hashes did not come in time");
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            hashes = self
                .parents(blob, None, false)
                .await
                .and_then(|v| v.piece_sha256)
                .unwrap_or_default();
        }
        let checks: Vec<(u64, Option<PieceSha256>, std::ops::Range<usize>)> = (first..=last)
            .map(|i| {
                let pr = piece_range(i, piece, size);
                let at = (pr.start - whole.start) as usize..(pr.end - whole.start) as usize;
                let want = usize::try_from(i)
                    .ok()
                    .and_then(|i| hashes.get(i).cloned().flatten());
                (i, want, at)
            })
            .collect();
        // Hashed off the async workers: up to SEED_READ_MAX bytes.
        let (bytes, bad) = tokio::task::spawn_blocking(move || {
            let bad = checks
                .into_iter()
                .find(|(_, want, at)| *want != bytes.get(at.clone()).map(PieceSha256::of))
                .map(|(i, _, _)| i);
            (bytes, bad)
        })
        .await
        .ok()?;
        if let Some(i) = bad {
            tracing::warn!(peer = %holder.node.short(), piece = i, "seed sent a piece that does not match its hash");
            self.blame(blob, holder.node, FailureReason::BadPiece);
            return None;
        }
        self.inner
            .metrics
            .from_peers("blob", range.end - range.start);
        let at = (range.start - whole.start) as usize..(range.end - whole.start) as usize;
        Some(bytes[at].to_vec())
    }

    /// Complete holders of `blob` found in the DHT.
    pub async fn providers(&self, blob: &BlobId) -> Vec<Provider> {
        let Some(dht) = &self.inner.dht else {
            return Vec::new();
        };
        match dht.find_providers(blob, 8, DHT_LOOKUP).await {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(error = %e, "DHT lookup failed");
                Vec::new()
            }
        }
    }

    /// Tells the blob's scheduler that `peer` misbehaved (in the
    /// background; the download does not wait).
    pub fn blame(&self, blob: &BlobId, peer: NodeId, reason: FailureReason) {
        let Some(client) = self
            .inner
            .schedulers
            .as_ref()
            .and_then(|s| s.for_blob(blob))
            .cloned()
        else {
            return;
        };
        let report = FailureReport {
            reporter: self.inner.node_id,
            peer,
            reason,
        };
        let blob = blob.clone();
        let me = self.clone();
        self.inner.tracker.spawn(async move {
            let started = Instant::now();
            let r = client.report_failure(&blob, &report).await;
            me.observe("failure", started, r.is_ok());
        });
    }

    /// Hand prewarm jobs from the schedulers to `runner` (once).
    pub fn attach_prewarm(&self, runner: Prewarm) {
        let _ = self.inner.prewarm.set(runner);
    }

    /// Announce soon (debounced) rather than at the next heartbeat.
    pub fn announce_soon(&self) {
        self.inner.wake.notify_one();
    }

    /// A download committed bytes of `blob` (or finished it): announce soon.
    pub fn changed(&self, blob: &BlobId) {
        self.state().dirty.insert(blob.clone());
        self.inner.wake.notify_one();
    }

    /// `blob` is complete and verified: announce it, and provide it in the
    /// DHT.
    pub fn completed(&self, blob: &BlobId) {
        {
            let mut st = self.state();
            st.leases.remove(blob);
            st.revoked.remove(blob);
            st.dirty.insert(blob.clone());
        }
        self.inner.wake.notify_one();
        self.provide(blob);
    }

    /// This node starts fetching `blob` from the origin: provide it in the
    /// DHT now, so that if the schedulers go away, others can follow this
    /// node instead of going to the origin too.
    pub fn origin_fetch_started(&self, blob: &BlobId) {
        self.provide(blob);
    }

    fn provide(&self, blob: &BlobId) {
        if let Some(dht) = self.inner.dht.clone() {
            let blob = blob.clone();
            self.inner.tracker.spawn(async move {
                if let Err(e) = dht.provide(&blob).await {
                    tracing::debug!(error = %e, "DHT provide failed");
                }
            });
        }
    }

    /// This node starts fetching `blob` from the origin under a lease.
    pub fn lease_started(&self, blob: &BlobId) {
        let mut st = self.state();
        st.leases.entry(blob.clone()).or_insert(0);
        st.revoked.remove(blob);
        st.dirty.insert(blob.clone());
    }

    /// Bytes read from the origin for a leased `blob` (announced as
    /// progress, which keeps the lease).
    pub fn origin_progress(&self, blob: &BlobId, n: u64) {
        if let Some(b) = self.state().leases.get_mut(blob) {
            *b += n;
        }
    }

    /// The origin fetch of `blob` stopped (finished, failed or revoked).
    pub fn lease_ended(&self, blob: &BlobId) {
        let mut st = self.state();
        st.leases.remove(blob);
        st.revoked.remove(blob);
        st.dirty.insert(blob.clone());
    }

    /// Whether the scheduler took the lease of `blob` back.
    pub fn lease_revoked(&self, blob: &BlobId) -> bool {
        self.state().revoked.contains(blob)
    }

    /// For `shoal status`.
    pub async fn status(&self) -> PeeringStatus {
        let dht_peers = match &self.inner.dht {
            Some(d) => d.peers().await.ok(),
            None => None,
        };
        let st = self.state();
        PeeringStatus {
            node_id: self.inner.node_id.to_string(),
            p2p_addr: self.inner.advertise.to_string(),
            zone: self.inner.zone.clone(),
            schedulers: self
                .inner
                .schedulers
                .as_ref()
                .map(|s| {
                    s.all()
                        .iter()
                        .zip(st.reachable.iter())
                        .zip(st.errors.iter())
                        .map(|((c, r), e)| SchedulerStatus {
                            addr: c.addr().to_string(),
                            reachable: *r,
                            error: e.clone(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            dht_addr: self.inner.dht.as_ref().map(|d| d.local_addr().to_string()),
            dht_peers,
            upload_slots_free: self.inner.p2p.free_upload_slots(),
            leases: st.leases.len(),
            uploaded_bytes: self.inner.metrics.p2p.uploaded_total(),
        }
    }

    /// Stops announcing, the DHT and the data plane (uploads are cut).
    pub async fn shutdown(&self) {
        self.inner.cancel.cancel();
        self.inner.tracker.wait().await;
        if let Some(d) = &self.inner.dht {
            d.shutdown().await;
        }
        self.inner.p2p.shutdown().await;
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn observe(&self, op: &'static str, started: Instant, ok: bool) {
        let m = &self.inner.metrics;
        let labels = KindLabels { kind: op };
        m.scheduler_requests.get_or_create(&labels).inc();
        m.scheduler_duration
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        if !ok {
            m.scheduler_errors.get_or_create(&labels).inc();
        }
    }

    fn removed(&self, id: &BlobId, why: Removal) {
        {
            let mut st = self.state();
            st.dirty.remove(id);
            st.removed.insert(id.clone());
        }
        tracing::debug!(blob = %id, ?why, "blob dropped; withdrawing it");
        self.inner.wake.notify_one();
        if let Some(dht) = self.inner.dht.clone() {
            let id = id.clone();
            self.inner.tracker.spawn(async move {
                let _ = dht.stop_providing(&id).await;
            });
        }
    }

    /// Provides every complete blob of the store in the DHT (at start).
    async fn provide_all(&self) {
        let Some(dht) = &self.inner.dht else { return };
        let store = self.inner.store.clone();
        let Ok(Ok(blobs)) = tokio::task::spawn_blocking(move || store.blobs()).await else {
            return;
        };
        for b in blobs.iter().filter(|b| b.complete) {
            if self.inner.cancel.is_cancelled() {
                return;
            }
            let _ = dht.provide(&b.id).await;
        }
    }

    async fn announce_loop(&self) {
        let Some(set) = self.inner.schedulers.clone() else {
            return;
        };
        loop {
            let heartbeat = self.state().heartbeat.unwrap_or(DEFAULT_HEARTBEAT);
            let full_pending = self.state().needs_full.iter().any(|f| *f);
            if !full_pending {
                tokio::select! {
                    _ = self.inner.cancel.cancelled() => return,
                    _ = tokio::time::sleep(heartbeat) => {}
                    _ = self.inner.wake.notified() => {
                        tokio::select! {
                            _ = self.inner.cancel.cancelled() => return,
                            _ = tokio::time::sleep(DEBOUNCE) => {}
                        }
                    }
                }
            }
            self.announce_once(&set).await;
            if self.state().needs_full.iter().any(|f| *f) {
                // A scheduler wants everything (or was unreachable): try
                // again after a heartbeat, not in a tight loop.
                tokio::select! {
                    _ = self.inner.cancel.cancelled() => return,
                    _ = tokio::time::sleep(heartbeat) => {}
                }
            }
        }
    }

    /// One round: a delta (or a full announcement where needed) to every
    /// scheduler.
    async fn announce_once(&self, set: &SchedulerSet) {
        let (dirty, removed, leases, wanted, needs_full) = {
            let mut st = self.state();
            let dirty: Vec<BlobId> = st.dirty.drain().collect();
            let removed: Vec<BlobId> = st.removed.drain().collect();
            let wanted: HashSet<BlobId> = st.hashes_wanted.drain().collect();
            (
                dirty,
                removed,
                st.leases.clone(),
                wanted,
                st.needs_full.clone(),
            )
        };
        let store = self.inner.store.clone();
        let any_full = needs_full.iter().any(|f| *f);
        let node = self.node_announcement();
        let traffic = self.traffic();
        let job_progress = self.inner.prewarm.get().map(Prewarm::reports);
        let built = tokio::task::spawn_blocking(move || {
            let delta: Vec<BlobAnnouncement> = dirty
                .iter()
                .filter_map(|id| store.blob(id).ok().flatten())
                .map(|r| blob_announcement(&r, &leases, &wanted, true))
                .collect();
            let full: Option<Vec<BlobAnnouncement>> = any_full.then(|| {
                store
                    .blobs()
                    .unwrap_or_default()
                    .iter()
                    .map(|r| blob_announcement(r, &leases, &wanted, false))
                    .collect()
            });
            (delta, full)
        })
        .await;
        let Ok((delta, full)) = built else { return };
        let requests = set.all().iter().enumerate().map(|(i, client)| {
            let full_now = needs_full.get(i).copied().unwrap_or(true);
            let req = AnnounceRequest {
                node: node.clone(),
                full: full_now,
                blobs: if full_now {
                    full.clone().unwrap_or_default()
                } else {
                    delta.clone()
                },
                removed: if full_now {
                    Vec::new()
                } else {
                    removed.clone()
                },
                traffic,
                job_progress: job_progress.clone().unwrap_or_default(),
            };
            async move {
                let started = Instant::now();
                let r = client.announce(&req).await;
                (i, started, r)
            }
        });
        let results = futures::future::join_all(requests).await;
        let mut st = self.state();
        for (i, started, r) in results {
            self.observe("announce", started, r.is_ok());
            match r {
                Ok(resp) => {
                    self.apply(&mut st, i, resp);
                }
                Err(e) => {
                    if st.reachable.get(i).copied().unwrap_or(true) {
                        tracing::warn!(error = %e, "scheduler unreachable; will announce everything when it is back");
                    }
                    set_at(&mut st.needs_full, i, true);
                    set_at(&mut st.reachable, i, false);
                    if let Some(slot) = st.errors.get_mut(i) {
                        *slot = Some(e.to_string());
                    }
                }
            }
        }
    }

    fn apply(&self, st: &mut State, i: usize, resp: AnnounceResponse) {
        if !st.reachable.get(i).copied().unwrap_or(false) {
            tracing::info!(scheduler = i, "scheduler reachable");
        }
        set_at(&mut st.reachable, i, true);
        set_at(&mut st.needs_full, i, resp.resync);
        if let Some(slot) = st.errors.get_mut(i) {
            *slot = None;
        }
        if resp.heartbeat_interval_ms > 0 {
            st.heartbeat = Some(Duration::from_millis(
                resp.heartbeat_interval_ms.clamp(100, 60_000),
            ));
        }
        for b in resp.leases_revoked {
            if st.leases.contains_key(&b) {
                tracing::info!(blob = %b, "origin lease revoked by the scheduler");
                st.revoked.insert(b);
            }
        }
        for b in resp.piece_sha256_wanted {
            st.dirty.insert(b.clone());
            st.hashes_wanted.insert(b);
        }
        if resp.resync {
            self.inner.wake.notify_one();
        } else if let Some(p) = self.inner.prewarm.get() {
            // A resync answer lists no jobs: it must not cancel any.
            p.apply(i, resp.jobs);
        }
    }

    fn node_announcement(&self) -> NodeAnnouncement {
        NodeAnnouncement {
            id: self.inner.node_id,
            p2p_addr: self.inner.advertise,
            zone: self.inner.zone.clone(),
            upload_slots_free: u32::try_from(self.inner.p2p.free_upload_slots())
                .unwrap_or(u32::MAX),
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    fn traffic(&self) -> Traffic {
        let t = &self.inner.metrics.totals;
        Traffic {
            from_origin: Totals::get(&t.origin_bytes),
            from_peers: Totals::get(&t.peer_bytes),
            to_peers: self.inner.metrics.p2p.uploaded_total(),
            served_local: Totals::get(&t.served_bytes),
        }
    }
}

fn set_at(v: &mut [bool], i: usize, value: bool) {
    if let Some(x) = v.get_mut(i) {
        *x = value;
    }
}

/// What the scheduler is told about one stored blob. Piece hashes go with
/// blobs fetched under a lease (the scheduler trusts the lease holder's list),
/// with complete blobs a scheduler asked about, and with complete blobs in a
/// delta (they just completed) — not with every complete blob of a full
/// announcement, which would make it grow with the whole cache.
fn blob_announcement(
    r: &BlobRecord,
    leases: &HashMap<BlobId, u64>,
    wanted: &HashSet<BlobId>,
    delta: bool,
) -> BlobAnnouncement {
    let count = u32::try_from(r.size.div_ceil(r.piece_size.max(1))).unwrap_or(u32::MAX);
    let have = if r.complete {
        PieceBits::full(count)
    } else {
        let mut bits = PieceBits::empty(count);
        for i in 0..count {
            let range = piece_range(u64::from(i), r.piece_size, r.size);
            if !range.is_empty() && r.present.contains_range(&range) {
                bits.set(i);
            }
        }
        bits
    };
    let leased = leases.get(&r.id);
    let with_hashes = leased.is_some() || (r.complete && delta) || wanted.contains(&r.id);
    BlobAnnouncement {
        blob: r.id.clone(),
        size: r.size,
        piece_size: r.piece_size,
        have,
        piece_sha256: with_hashes
            .then(|| r.piece_sha256.iter().map(|h| h.map(PieceSha256)).collect()),
        complete: r.complete,
        origin_fetch: leased.is_some(),
        origin_bytes: leased.copied().unwrap_or(0),
        present_bytes: r.present.len(),
    }
}

/// The data-plane address announced to schedulers: `p2p.advertise`, else
/// the bound address with an unspecified IP replaced by the local address
/// that routes towards the first scheduler (or bootstrap peer). Finding it
/// "connects" a UDP socket, which sends nothing.
fn advertise_addr(cfg: &P2p, bound: SocketAddr) -> SocketAddr {
    if let Some(a) = cfg.advertise {
        return a;
    }
    if !bound.ip().is_unspecified() {
        return bound;
    }
    let targets = cfg
        .schedulers
        .iter()
        .map(|s| {
            s.trim_start_matches("http://")
                .trim_end_matches('/')
                .to_string()
        })
        .chain(cfg.peers.iter().map(|p| {
            if p.contains(':') {
                p.clone()
            } else {
                format!("{p}:5053")
            }
        }));
    for t in targets {
        let Ok(mut addrs) = std::net::ToSocketAddrs::to_socket_addrs(&t) else {
            continue;
        };
        let Some(target) = addrs.next() else { continue };
        let local = if target.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let Ok(sock) = UdpSocket::bind(local) else {
            continue;
        };
        if sock.connect(target).is_ok() {
            if let Ok(l) = sock.local_addr() {
                return SocketAddr::new(l.ip(), bound.port());
            }
        }
    }
    tracing::warn!(addr = %bound, "cannot tell which address peers reach this node at; set p2p.advertise");
    bound
}
