//! The scheduler's state machine: nodes, the blobs they hold, origin leases
//! and failure blame. No I/O, no tasks, no clock: every call takes `now_ms`
//! (milliseconds on a monotonic clock chosen by the caller), so every rule
//! is tested by calling it with made-up times.
//!
//! Rules:
//! - **Registration and resync.** A node the state does not know (it never
//!   announced, it expired, or the scheduler restarted) must send a full
//!   announcement; a delta from it is not applied and is answered
//!   `resync: true`. A full announcement replaces what the node held.
//! - **Expiry.** A node that has not announced for `node_ttl_ms` is dead:
//!   it is never returned as a holder, its leases end, and [`State::tick`]
//!   forgets it.
//! - **Sharding.** Only blobs this scheduler owns ([`Shard`]) are kept;
//!   parents requests for other blobs fail with [`WrongScheduler`]. Node
//!   liveness is kept regardless.
//! - **Parents** are ranked by [`ranking::rank`]: never the asker, never a
//!   node blamed for a bad piece, complete holders first.
//! - **Leases** (see [`leases`]): at most `max_origin_leases` per blob,
//!   granted to an asker that wants one when no live complete holder exists,
//!   renewed by progress, revoked after `lease_stall_ms` without progress (the
//!   stalled node may not take it back for another `lease_stall_ms`), when
//!   the holder expires, drops the blob, or is reported for a bad piece. No
//!   lease is granted during `warmup_ms` after start, so that nodes that held
//!   leases before a restart can re-announce them (`origin_fetch`) first.
//!   Leases spread over nodes: an asker already holding a lease (of another
//!   blob) is told to ask again (`retry_after_ms`) when another node holding
//!   none wanted this blob's lease within the last half heartbeat; that one
//!   gets it when it asks again. So one node does not seed every layer of an
//!   image (its upload slots shared by all of them, all lost if it leaves).
//! - **Piece hashes** are taken from the lease holder (filling in) and from
//!   complete holders (authoritative, since they verified the whole blob).
//! - **Blame** from failure reports decays with half-life `blame_half_life_ms`.
//! - **Prewarm jobs** (see [`jobs`]): handed to the selected nodes in their
//!   announce answers, progress taken from their announcements; a node that
//!   expires fails its unfinished jobs.
//!
//! Everything noteworthy is recorded as an [`Event`] for the caller to log
//! and count ([`State::take_events`]).

mod blobs;
pub mod jobs;
mod leases;
mod nodes;
pub mod ranking;

use std::collections::{HashMap, HashSet};

use shoal_proto::sched::{
    pick_scheduler, AnnounceRequest, AnnounceResponse, BlobAnnouncement, BlobStatus, FailureAck,
    FailureReason, FailureReport, Holder, JobId, JobRequest, JobStatus, NodeStatus, ParentsRequest,
    ParentsResponse, PieceBits, Traffic,
};
use shoal_proto::{BlobId, NodeId};

pub use blobs::BlobRejection;
pub use jobs::JobError;
pub use leases::LeaseEnd;

use blobs::{BlobRecord, HolderRecord};
use leases::Lease;
use nodes::NodeRecord;
use ranking::Candidate;

/// Most blobs asked for in one `piece_sha256_wanted` reply.
const MAX_HASHES_WANTED: usize = 64;

/// Holders of a blob ranked per parents request, at most: past this, the
/// ranking sees a random sample of this many holders plus as many complete
/// ones (and the lease holders), drawn afresh for every request, so its cost
/// stays flat however many nodes hold the blob, and askers spread over the
/// holders instead of all getting the same few.
pub const RANK_SAMPLE: usize = 32;

/// The rules' parameters, in milliseconds.
#[derive(Clone, Debug)]
pub struct StateConfig {
    pub heartbeat_ms: u64,
    pub node_ttl_ms: u64,
    pub max_origin_leases: u32,
    pub lease_stall_ms: u64,
    pub blame_half_life_ms: u64,
    pub max_parents: usize,
    pub warmup_ms: u64,
    pub shard: Shard,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            heartbeat_ms: 2_000,
            node_ttl_ms: 6_000,
            max_origin_leases: 1,
            lease_stall_ms: 10_000,
            blame_half_life_ms: 60_000,
            max_parents: 16,
            warmup_ms: 3_000,
            shard: Shard::everything(),
        }
    }
}

/// Which blobs this scheduler owns.
#[derive(Clone, Debug, Default)]
pub struct Shard {
    me: Option<String>,
    cluster: Vec<String>,
}

impl Shard {
    /// A lone scheduler: owns every blob.
    pub fn everything() -> Self {
        Self::default()
    }

    /// This scheduler is `me` among `cluster` (which must contain it).
    pub fn member(me: String, cluster: Vec<String>) -> Self {
        Self {
            me: Some(me),
            cluster,
        }
    }

    /// The scheduler that owns `blob`, if it is not this one.
    pub fn foreign_owner(&self, blob: &BlobId) -> Option<&str> {
        let me = self.me.as_deref()?;
        let owner = pick_scheduler(blob, &self.cluster)?;
        let canon = shoal_proto::sched::canonical_scheduler_addr;
        (canon(owner) != canon(me)).then_some(owner.as_str())
    }

    pub fn owns(&self, blob: &BlobId) -> bool {
        self.foreign_owner(blob).is_none()
    }

    pub fn me(&self) -> Option<&str> {
        self.me.as_deref()
    }

    pub fn cluster(&self) -> &[String] {
        &self.cluster
    }
}

/// Something the caller may want to log or count.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    NodeRegistered {
        node: NodeId,
    },
    NodeExpired {
        node: NodeId,
    },
    Resync {
        node: NodeId,
    },
    BlobRejected {
        node: NodeId,
        blob: BlobId,
        reason: BlobRejection,
    },
    LeaseGranted {
        blob: BlobId,
        node: NodeId,
        adopted: bool,
    },
    LeaseEnded {
        blob: BlobId,
        node: NodeId,
        why: LeaseEnd,
    },
    Blamed {
        node: NodeId,
        reporter: NodeId,
        reason: FailureReason,
    },
    JobCreated {
        job: JobId,
        nodes: usize,
    },
    JobCancelled {
        job: JobId,
    },
}

/// A parents request for a blob another scheduler owns.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("blob {blob} belongs to scheduler {owner}")]
pub struct WrongScheduler {
    pub blob: BlobId,
    pub owner: String,
}

/// All scheduler state. See the module docs for the rules.
#[derive(Debug)]
pub struct State {
    cfg: StateConfig,
    started_ms: u64,
    nodes: HashMap<NodeId, NodeRecord>,
    blobs: HashMap<BlobId, BlobRecord>,
    /// (blob, node) → when that node's lease was revoked for stalling.
    cooldown: HashMap<(BlobId, NodeId), u64>,
    /// blob → the latest asker that wanted its lease while holding no lease,
    /// and when (pruned by `tick`).
    lease_askers: HashMap<BlobId, (NodeId, u64)>,
    jobs: jobs::Jobs,
    events: Vec<Event>,
}

impl State {
    pub fn new(cfg: StateConfig, now_ms: u64) -> Self {
        Self {
            cfg,
            started_ms: now_ms,
            nodes: HashMap::new(),
            blobs: HashMap::new(),
            cooldown: HashMap::new(),
            lease_askers: HashMap::new(),
            jobs: jobs::Jobs::default(),
            events: Vec::new(),
        }
    }

    pub fn config(&self) -> &StateConfig {
        &self.cfg
    }

    /// Events since the last call.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    pub fn blob_count(&self) -> usize {
        self.blobs.len()
    }

    pub fn lease_count(&self) -> usize {
        self.blobs.values().map(|b| b.leases.len()).sum()
    }

    /// Apply a node's announcement.
    pub fn announce(&mut self, mut req: AnnounceRequest, now_ms: u64) -> AnnounceResponse {
        let id = req.node.id;
        clip(&mut req.node.version);
        if let Some(z) = &mut req.node.zone {
            clip(z);
        }
        let mut resp = AnnounceResponse {
            heartbeat_interval_ms: self.cfg.heartbeat_ms,
            node_ttl_ms: self.cfg.node_ttl_ms,
            ..AnnounceResponse::default()
        };
        let known = self
            .nodes
            .get(&id)
            .is_some_and(|n| n.alive(now_ms, self.cfg.node_ttl_ms));
        if !known {
            if !req.full {
                self.events.push(Event::Resync { node: id });
                resp.resync = true;
                return resp;
            }
            self.forget_node(id, LeaseEnd::Expired);
            self.nodes
                .insert(id, NodeRecord::new(req.node.clone(), now_ms));
            self.events.push(Event::NodeRegistered { node: id });
        }
        if req.full {
            let listed: HashSet<&BlobId> = req.blobs.iter().map(|b| &b.blob).collect();
            let held: Vec<BlobId> = self.nodes.get(&id).map_or(Vec::new(), |n| {
                n.blobs
                    .iter()
                    .filter(|b| !listed.contains(b))
                    .cloned()
                    .collect()
            });
            for blob in held {
                self.remove_holder(&blob, id, LeaseEnd::Removed);
            }
        }
        if let Some(n) = self.nodes.get_mut(&id) {
            n.info = req.node;
            n.last_seen_ms = now_ms;
            n.traffic = req.traffic;
        }
        for blob in &req.removed {
            self.remove_holder(blob, id, LeaseEnd::Removed);
        }
        for b in req.blobs {
            self.apply_blob(id, b, now_ms);
        }
        self.jobs.progress(id, &req.job_progress, now_ms);
        resp.jobs = self.jobs.assignments(id);
        resp.piece_sha256_wanted = self.hashes_wanted(id);
        if let Some(n) = self.nodes.get_mut(&id) {
            resp.leases_revoked = std::mem::take(&mut n.revoked).into_iter().collect();
        }
        resp
    }

    /// Ranked holders of `blob` for `req.asker`, and its lease (granting it
    /// to the asker when the rules allow).
    pub fn parents(
        &mut self,
        blob: &BlobId,
        req: &ParentsRequest,
        now_ms: u64,
    ) -> Result<ParentsResponse, WrongScheduler> {
        if let Some(owner) = self.cfg.shard.foreign_owner(blob) {
            return Err(WrongScheduler {
                blob: blob.clone(),
                owner: owner.to_string(),
            });
        }
        self.check_leases(blob, now_ms);
        let asker = req.asker;
        let asker_known = self.alive(asker, now_ms);
        let warming = now_ms < self.started_ms.saturating_add(self.cfg.warmup_ms);
        let lease_free = self.nodes.get(&asker).is_some_and(|n| n.leases == 0);
        if req.want_lease && asker_known && lease_free {
            self.lease_askers.insert(blob.clone(), (asker, now_ms));
        }
        let mut deferred = None;
        if req.want_lease && asker_known && !warming {
            deferred = self.try_grant(blob, asker, req.size, now_ms);
        }
        let resp = self.parents_response(blob, asker, now_ms);
        let deferred = deferred.filter(|_| resp.lease.is_none());
        let resp = ParentsResponse {
            retry_after_ms: (req.want_lease && resp.lease.is_none() && (warming || !asker_known))
                .then(|| {
                    let left = (self.started_ms + self.cfg.warmup_ms).saturating_sub(now_ms);
                    if warming {
                        left.max(1)
                    } else {
                        self.cfg.heartbeat_ms
                    }
                })
                .or(deferred),
            ..resp
        };
        if self.blobs.get(blob).is_some_and(BlobRecord::is_empty) {
            self.blobs.remove(blob);
        }
        Ok(resp)
    }

    /// Count a failure report against `report.peer`.
    pub fn report_failure(
        &mut self,
        blob: &BlobId,
        report: &FailureReport,
        now_ms: u64,
    ) -> FailureAck {
        if report.peer == report.reporter {
            return FailureAck { counted: false };
        }
        let half_life = self.cfg.blame_half_life_ms;
        let Some(peer) = self.nodes.get_mut(&report.peer) else {
            return FailureAck { counted: false };
        };
        peer.blame.report(report.reason, now_ms, half_life);
        self.events.push(Event::Blamed {
            node: report.peer,
            reporter: report.reporter,
            reason: report.reason,
        });
        if report.reason == FailureReason::BadPiece {
            if let Some(rec) = self.blobs.get_mut(blob) {
                end_lease(
                    rec,
                    blob,
                    report.peer,
                    LeaseEnd::BadPiece,
                    &mut self.nodes,
                    &mut self.events,
                );
            }
        }
        FailureAck { counted: true }
    }

    /// Periodic housekeeping: expire silent nodes, revoke stalled leases,
    /// drop empty blob records. Call every few hundred milliseconds.
    pub fn tick(&mut self, now_ms: u64) {
        let ttl = self.cfg.node_ttl_ms;
        let dead: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, n)| !n.alive(now_ms, ttl))
            .map(|(id, _)| *id)
            .collect();
        // In id order, not hash order: the holder index then evolves the
        // same way in every run (the simulation relies on it).
        let mut dead = dead;
        dead.sort_unstable();
        for id in dead {
            self.forget_node(id, LeaseEnd::Expired);
            self.jobs.node_lost(id, now_ms);
            self.events.push(Event::NodeExpired { node: id });
        }
        self.jobs.expire(now_ms);
        let leased: Vec<BlobId> = self
            .blobs
            .iter()
            .filter(|(_, b)| !b.leases.is_empty())
            .map(|(id, _)| id.clone())
            .collect();
        for blob in leased {
            self.check_leases(&blob, now_ms);
        }
        self.blobs.retain(|_, b| !b.is_empty());
        let stall = self.cfg.lease_stall_ms;
        self.cooldown
            .retain(|_, at| now_ms.saturating_sub(*at) <= stall);
        let window = self.lease_spread_ms();
        self.lease_askers
            .retain(|_, (_, at)| now_ms.saturating_sub(*at) < window);
    }

    /// Start prewarm job `id` (chosen by the caller, random) among the
    /// live nodes.
    pub fn create_job(
        &mut self,
        id: JobId,
        req: JobRequest,
        now_ms: u64,
    ) -> Result<JobStatus, JobError> {
        let ttl = self.cfg.node_ttl_ms;
        let live = jobs::live_nodes(
            self.nodes
                .iter()
                .filter(|(_, n)| n.alive(now_ms, ttl))
                .map(|(id, n)| (*id, n.info.zone.as_deref())),
        );
        let status = self.jobs.create(id, req, &live, now_ms)?;
        self.events.push(Event::JobCreated {
            job: id,
            nodes: status.nodes.len(),
        });
        Ok(status)
    }

    pub fn job(&self, id: JobId, now_ms: u64) -> Result<JobStatus, JobError> {
        self.jobs.status(id, now_ms)
    }

    /// Every prewarm job, newest first.
    pub fn jobs(&self, now_ms: u64) -> Vec<JobStatus> {
        self.jobs.list(now_ms)
    }

    pub fn cancel_job(&mut self, id: JobId, now_ms: u64) -> Result<JobStatus, JobError> {
        let status = self.jobs.cancel(id, now_ms)?;
        self.events.push(Event::JobCancelled { job: id });
        Ok(status)
    }

    pub fn job_count(&self) -> usize {
        self.jobs.len()
    }

    /// Nodes (by id), blobs (by id) and the sum of live nodes' traffic.
    pub fn status(&self, now_ms: u64) -> (Vec<NodeStatus>, Vec<BlobStatus>, Traffic) {
        let mut totals = Traffic::default();
        let mut nodes: Vec<NodeStatus> = self
            .nodes
            .iter()
            .map(|(id, n)| {
                totals.add(&n.traffic);
                self.node_status(*id, n, now_ms)
            })
            .collect();
        nodes.sort_by_key(|n| n.id);
        let mut blobs: Vec<BlobStatus> = self
            .blobs
            .iter()
            .map(|(id, b)| self.blob_status(id, b, now_ms))
            .collect();
        blobs.sort_by(|a, b| a.blob.cmp(&b.blob));
        (nodes, blobs, totals)
    }

    // -- helpers ----------------------------------------------------------

    fn alive(&self, node: NodeId, now_ms: u64) -> bool {
        self.nodes
            .get(&node)
            .is_some_and(|n| n.alive(now_ms, self.cfg.node_ttl_ms))
    }

    fn apply_blob(&mut self, id: NodeId, b: BlobAnnouncement, now_ms: u64) {
        if !self.cfg.shard.owns(&b.blob) {
            return;
        }
        let rec = self.blobs.entry(b.blob.clone()).or_default();
        let geometry = match rec.accept_geometry(b.size, b.piece_size, b.have.len()) {
            Ok(g) => g,
            Err(reason) => {
                if rec.is_empty() {
                    self.blobs.remove(&b.blob);
                }
                self.events.push(Event::BlobRejected {
                    node: id,
                    blob: b.blob,
                    reason,
                });
                return;
            }
        };
        let have = if b.complete {
            PieceBits::full(geometry.pieces)
        } else {
            b.have.clone()
        };
        let pieces = have.count();
        rec.insert_holder(
            id,
            HolderRecord {
                have,
                pieces,
                complete: b.complete,
                partial: b.present_bytes > 0,
            },
        );
        if let Some(n) = self.nodes.get_mut(&id) {
            n.blobs.insert(b.blob.clone());
        }
        self.update_lease(id, &b, pieces, now_ms);
        if let (Some(list), Some(rec)) = (&b.piece_sha256, self.blobs.get_mut(&b.blob)) {
            if b.complete {
                rec.merge_hashes(list, true);
            } else if rec.lease_of(id).is_some() {
                rec.merge_hashes(list, false);
            }
        }
    }

    /// Renew, end or adopt `id`'s lease on the announced blob.
    fn update_lease(&mut self, id: NodeId, b: &BlobAnnouncement, pieces: u32, now_ms: u64) {
        let Some(rec) = self.blobs.get_mut(&b.blob) else {
            return;
        };
        if let Some(lease) = rec.lease_of_mut(id) {
            if b.complete {
                end_lease(
                    rec,
                    &b.blob,
                    id,
                    LeaseEnd::Completed,
                    &mut self.nodes,
                    &mut self.events,
                );
            } else {
                lease.observe(pieces, b.origin_bytes, now_ms);
            }
            return;
        }
        if !b.origin_fetch || b.complete {
            return;
        }
        // The node says it is fetching from the origin without holding the
        // lease: after a scheduler restart it held one; give it back if the
        // rules allow, else tell it to stop.
        let told = self
            .nodes
            .get(&id)
            .is_some_and(|n| n.revoked.contains(&b.blob));
        self.check_leases(&b.blob, now_ms);
        if !told && self.can_grant(&b.blob, id, now_ms) {
            if let Some(rec) = self.blobs.get_mut(&b.blob) {
                rec.leases
                    .push(Lease::new(id, now_ms, pieces, b.origin_bytes));
                if let Some(n) = self.nodes.get_mut(&id) {
                    n.leases += 1;
                }
                self.events.push(Event::LeaseGranted {
                    blob: b.blob.clone(),
                    node: id,
                    adopted: true,
                });
            }
        } else if let Some(n) = self.nodes.get_mut(&id) {
            n.revoked.insert(b.blob.clone());
        }
    }

    /// Grant `blob`'s lease to `asker` if the rules allow. `Some(ms)`: not
    /// now, another node should have it (see [`State::defer_lease`]); ask
    /// again after `ms`.
    fn try_grant(
        &mut self,
        blob: &BlobId,
        asker: NodeId,
        size: Option<u64>,
        now_ms: u64,
    ) -> Option<u64> {
        let rec = self.blobs.entry(blob.clone()).or_default();
        if rec.size_hint.is_none() {
            rec.size_hint = size;
        }
        if rec.lease_of(asker).is_some() || !self.can_grant(blob, asker, now_ms) {
            return None;
        }
        if let Some(wait) = self.defer_lease(blob, asker, now_ms) {
            return Some(wait);
        }
        let rec = self.blobs.get_mut(blob)?;
        let pieces = rec.holders.get(&asker).map_or(0, |h| h.pieces);
        rec.leases.push(Lease::new(asker, now_ms, pieces, 0));
        if let Some(n) = self.nodes.get_mut(&asker) {
            n.leases += 1;
        }
        self.events.push(Event::LeaseGranted {
            blob: blob.clone(),
            node: asker,
            adopted: false,
        });
        None
    }

    /// How long a node that asked for a lease without holding one still
    /// has the first claim on a blob's lease over askers holding another.
    fn lease_spread_ms(&self) -> u64 {
        (self.cfg.heartbeat_ms / 2).max(1)
    }

    /// Whether `asker`, which holds a lease of another blob, should leave
    /// `blob`'s lease to a node holding none that asked for it within
    /// [`State::lease_spread_ms`] (and may take it): then the milliseconds
    /// left of that claim.
    fn defer_lease(&self, blob: &BlobId, asker: NodeId, now_ms: u64) -> Option<u64> {
        if self.nodes.get(&asker).is_none_or(|n| n.leases == 0) {
            return None;
        }
        let &(other, at) = self.lease_askers.get(blob)?;
        let age = now_ms.saturating_sub(at);
        let window = self.lease_spread_ms();
        let other_free = self
            .nodes
            .get(&other)
            .is_some_and(|n| n.leases == 0 && n.alive(now_ms, self.cfg.node_ttl_ms));
        (other != asker && age < window && other_free && self.can_grant(blob, other, now_ms))
            .then(|| window - age)
    }

    /// May `node` take a (new) lease on `blob` now?
    fn can_grant(&self, blob: &BlobId, node: NodeId, now_ms: u64) -> bool {
        let Some(rec) = self.blobs.get(blob) else {
            return true;
        };
        if rec.leases.len() >= self.cfg.max_origin_leases as usize || rec.lease_of(node).is_some() {
            return false;
        }
        if self.cooldown.contains_key(&(blob.clone(), node)) {
            return false;
        }
        let half_life = self.cfg.blame_half_life_ms;
        let complete_elsewhere = rec.complete_holders().iter().any(|id| {
            *id != node
                && self.nodes.get(id).is_some_and(|n| {
                    n.alive(now_ms, self.cfg.node_ttl_ms)
                        && n.blame.bad_piece.get(now_ms, half_life) < ranking::BAD_PIECE_EXCLUDE
                })
        });
        !complete_elsewhere
    }

    /// Revoke the blob's leases whose holder died or stalled.
    fn check_leases(&mut self, blob: &BlobId, now_ms: u64) {
        let Some(rec) = self.blobs.get_mut(blob) else {
            return;
        };
        let ttl = self.cfg.node_ttl_ms;
        let stall = self.cfg.lease_stall_ms;
        let ended: Vec<(NodeId, LeaseEnd)> = rec
            .leases
            .iter()
            .filter_map(|l| {
                let alive = self
                    .nodes
                    .get(&l.holder)
                    .is_some_and(|n| n.alive(now_ms, ttl));
                if !alive {
                    Some((l.holder, LeaseEnd::Expired))
                } else if l.stalled(now_ms, stall) {
                    Some((l.holder, LeaseEnd::Stalled))
                } else {
                    None
                }
            })
            .collect();
        for (node, why) in ended {
            end_lease(rec, blob, node, why, &mut self.nodes, &mut self.events);
            if why == LeaseEnd::Stalled {
                self.cooldown.insert((blob.clone(), node), now_ms);
            }
        }
    }

    fn remove_holder(&mut self, blob: &BlobId, node: NodeId, why: LeaseEnd) {
        if let Some(n) = self.nodes.get_mut(&node) {
            n.blobs.remove(blob);
        }
        let Some(rec) = self.blobs.get_mut(blob) else {
            return;
        };
        rec.remove_holder(&node);
        end_lease(rec, blob, node, why, &mut self.nodes, &mut self.events);
        if rec.is_empty() {
            self.blobs.remove(blob);
        }
    }

    /// Drop a node and everything it held (its leases end with `why`).
    fn forget_node(&mut self, id: NodeId, why: LeaseEnd) {
        let Some(n) = self.nodes.get(&id) else {
            return;
        };
        let held: Vec<BlobId> = n.blobs.iter().cloned().collect();
        for blob in held {
            self.remove_holder(&blob, id, why);
        }
        // Leases on blobs it did not (yet) hold.
        let leased: Vec<BlobId> = self
            .blobs
            .iter()
            .filter(|(_, b)| b.lease_of(id).is_some())
            .map(|(k, _)| k.clone())
            .collect();
        for blob in leased {
            self.remove_holder(&blob, id, why);
        }
        self.nodes.remove(&id);
    }

    fn hashes_wanted(&self, id: NodeId) -> Vec<BlobId> {
        let Some(n) = self.nodes.get(&id) else {
            return Vec::new();
        };
        let mut wanted: Vec<BlobId> = n
            .blobs
            .iter()
            .filter(|blob| {
                self.blobs.get(*blob).is_some_and(|rec| {
                    rec.holders.get(&id).is_some_and(|h| h.complete) && !rec.hashes_complete()
                })
            })
            .cloned()
            .collect();
        wanted.sort();
        wanted.truncate(MAX_HASHES_WANTED);
        wanted
    }

    fn parents_response(&self, blob: &BlobId, asker: NodeId, now_ms: u64) -> ParentsResponse {
        let Some(rec) = self.blobs.get(blob) else {
            return ParentsResponse {
                holders: Vec::new(),
                size: None,
                piece_size: None,
                piece_sha256: None,
                lease: None,
                retry_after_ms: None,
            };
        };
        let stall = self.cfg.lease_stall_ms;
        let lease = rec
            .lease_of(asker)
            .or_else(|| rec.leases.iter().max_by_key(|l| l.pieces));
        ParentsResponse {
            holders: self.ranked_holders(rec, asker, now_ms),
            size: rec.size(),
            piece_size: rec.geometry.map(|g| g.piece_size),
            piece_sha256: rec.hashes.clone(),
            lease: lease.map(|l| l.info(asker, now_ms, stall)),
            retry_after_ms: None,
        }
    }

    fn ranked_holders(&self, rec: &BlobRecord, asker: NodeId, now_ms: u64) -> Vec<Holder> {
        let ttl = self.cfg.node_ttl_ms;
        let half_life = self.cfg.blame_half_life_ms;
        let empty = PieceBits::empty(rec.geometry.map_or(0, |g| g.pieces));
        let leased: HashSet<NodeId> = rec.leases.iter().map(|l| l.holder).collect();
        let mut ids: Vec<NodeId> = if rec.holders.len() <= RANK_SAMPLE {
            rec.holders.keys().copied().collect()
        } else {
            let seed = sample_seed(asker, now_ms);
            let mut ids = rec.sample(seed, RANK_SAMPLE, true);
            ids.extend(rec.sample(seed ^ 0x5bd1_e995, RANK_SAMPLE, false));
            ids.sort_unstable();
            ids.dedup();
            ids
        };
        // The lease holders always (they seed the blob), once each.
        for l in &leased {
            if !ids.contains(l) {
                ids.push(*l);
            }
        }
        let candidates: Vec<Candidate<'_>> = ids
            .into_iter()
            .filter_map(|id| {
                let n = self.nodes.get(&id).filter(|n| n.alive(now_ms, ttl))?;
                let h = rec.holders.get(&id);
                Some(Candidate {
                    node: id,
                    have: h.map_or(&empty, |h| &h.have),
                    held: h.map_or(0, |h| h.pieces),
                    complete: h.is_some_and(|h| h.complete),
                    partial: h.is_some_and(|h| h.partial),
                    lease_holder: leased.contains(&id),
                    upload_slots_free: n.info.upload_slots_free,
                    zone: n.info.zone.as_deref(),
                    blame: n.blame.all.get(now_ms, half_life),
                    bad_piece_blame: n.blame.bad_piece.get(now_ms, half_life),
                })
            })
            .collect();
        let asker_zone = self.nodes.get(&asker).and_then(|n| n.info.zone.as_deref());
        ranking::rank(candidates, asker, asker_zone, self.cfg.max_parents)
            .into_iter()
            .filter_map(|(c, score)| {
                let n = self.nodes.get(&c.node)?;
                Some(Holder {
                    node: c.node,
                    p2p_addr: n.info.p2p_addr,
                    zone: n.info.zone.clone(),
                    have: c.have.clone(),
                    complete: c.complete,
                    lease_holder: c.lease_holder,
                    score: (score * 1000.0).round() / 1000.0,
                })
            })
            .collect()
    }

    fn node_status(&self, id: NodeId, n: &NodeRecord, now_ms: u64) -> NodeStatus {
        let complete = n
            .blobs
            .iter()
            .filter(|b| {
                self.blobs
                    .get(*b)
                    .and_then(|r| r.holders.get(&id))
                    .is_some_and(|h| h.complete)
            })
            .count();
        let leases = self
            .blobs
            .values()
            .filter(|b| b.lease_of(id).is_some())
            .count();
        NodeStatus {
            id,
            p2p_addr: n.info.p2p_addr,
            zone: n.info.zone.clone(),
            version: n.info.version.clone(),
            upload_slots_free: n.info.upload_slots_free,
            last_seen_ms_ago: now_ms.saturating_sub(n.last_seen_ms),
            registered_ms_ago: now_ms.saturating_sub(n.registered_ms),
            blobs_held: n.blobs.len() as u64,
            blobs_complete: complete as u64,
            leases: leases as u64,
            traffic: n.traffic,
            blame: (n.blame.all.get(now_ms, self.cfg.blame_half_life_ms) * 1000.0).round() / 1000.0,
        }
    }

    fn blob_status(&self, id: &BlobId, b: &BlobRecord, now_ms: u64) -> BlobStatus {
        BlobStatus {
            blob: id.clone(),
            size: b.size(),
            piece_size: b.geometry.map(|g| g.piece_size),
            pieces: b.geometry.map_or(0, |g| g.pieces),
            holders: b.holders.len() as u32,
            complete_holders: b.holders.values().filter(|h| h.complete).count() as u32,
            piece_sha256_known: b.hashes_known(),
            leases: b
                .leases
                .iter()
                .map(|l| l.status(now_ms, self.cfg.lease_stall_ms))
                .collect(),
        }
    }
}

/// The seed of the holder sample for `asker` at `now_ms`: another sample
/// per asker and per request.
fn sample_seed(asker: NodeId, now_ms: u64) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut h = DefaultHasher::new();
    asker.hash(&mut h);
    now_ms.hash(&mut h);
    h.finish()
}

/// Longest zone or version string kept from a node.
const MAX_LABEL: usize = 64;

/// Cut a node-supplied label to [`MAX_LABEL`] bytes (on a char boundary).
fn clip(s: &mut String) {
    if s.len() > MAX_LABEL {
        let mut end = MAX_LABEL;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// End `node`'s lease on `blob` (if any), telling the node when it must stop.
fn end_lease(
    rec: &mut BlobRecord,
    blob: &BlobId,
    node: NodeId,
    why: LeaseEnd,
    nodes: &mut HashMap<NodeId, NodeRecord>,
    events: &mut Vec<Event>,
) {
    let before = rec.leases.len();
    rec.leases.retain(|l| l.holder != node);
    if rec.leases.len() == before {
        return;
    }
    if let Some(n) = nodes.get_mut(&node) {
        n.leases = n.leases.saturating_sub(1);
    }
    if why.notify_holder() {
        if let Some(n) = nodes.get_mut(&node) {
            n.revoked.insert(blob.clone());
        }
    }
    events.push(Event::LeaseEnded {
        blob: blob.clone(),
        node,
        why,
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
