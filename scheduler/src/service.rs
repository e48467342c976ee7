//! The scheduler actor: one task owns the [`State`] and applies requests in
//! order; everyone else holds a cloneable [`SchedulerHandle`] and talks to
//! it over a bounded channel with `oneshot` replies. The actor also runs the
//! periodic [`State::tick`], turns state events into logs and metrics, and
//! supplies the clock (milliseconds since the actor started, on tokio's
//! clock, so tests may pause time).
//!
//! Invariant: the state is only touched by the actor task; no lock exists.

use std::sync::Arc;
use std::time::Duration;

use shoal_proto::sched::{
    AccessList, AnnounceRequest, AnnounceResponse, FailureAck, FailureReport, JobId, JobRequest,
    JobStatus, ParentsRequest, ParentsResponse, SchedulerInfo, StatusResponse, PROTOCOL_VERSION,
};
use shoal_proto::BlobId;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::metrics::{KindLabels, Metrics, ReasonLabels};
use crate::state::{Event, JobError, State, StateConfig, WrongScheduler};

/// Requests waiting for the actor; beyond this, callers wait (backpressure).
const QUEUE: usize = 1024;
/// Housekeeping period (expiry, stalled leases), at most.
const MAX_TICK: Duration = Duration::from_millis(500);

/// The actor is gone (the scheduler is shutting down).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the scheduler is shutting down")]
pub struct Closed;

/// A cheap, cloneable way to reach the scheduler actor.
#[derive(Clone, Debug)]
pub struct SchedulerHandle {
    tx: mpsc::Sender<Command>,
    metrics: Arc<Metrics>,
}

#[derive(Debug)]
enum Command {
    Announce {
        req: AnnounceRequest,
        reply: oneshot::Sender<AnnounceResponse>,
    },
    Parents {
        blob: BlobId,
        req: ParentsRequest,
        reply: oneshot::Sender<Result<ParentsResponse, WrongScheduler>>,
    },
    Failure {
        blob: BlobId,
        report: FailureReport,
        reply: oneshot::Sender<FailureAck>,
    },
    Status {
        reply: oneshot::Sender<StatusResponse>,
    },
    CreateJob {
        req: JobRequest,
        reply: oneshot::Sender<Result<JobStatus, JobError>>,
    },
    Job {
        id: JobId,
        reply: oneshot::Sender<Result<JobStatus, JobError>>,
    },
    Jobs {
        reply: oneshot::Sender<Vec<JobStatus>>,
    },
    CancelJob {
        id: JobId,
        reply: oneshot::Sender<Result<JobStatus, JobError>>,
    },
    /// Answered at once: the actor is taking requests (`/healthz`).
    Ping { reply: oneshot::Sender<()> },
    PutAccess {
        key: BlobId,
        list: AccessList,
        reply: oneshot::Sender<()>,
    },
    GetAccess {
        key: BlobId,
        reply: oneshot::Sender<Option<AccessList>>,
    },
}

/// Start the actor on `tracker`; it stops when `cancel` fires or every
/// handle is dropped.
pub fn spawn(
    cfg: StateConfig,
    metrics: Arc<Metrics>,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> SchedulerHandle {
    let (tx, rx) = mpsc::channel(QUEUE);
    let actor = Actor {
        start: Instant::now(),
        state: State::new(cfg, 0),
        metrics: metrics.clone(),
        access: AccessLists::default(),
    };
    tracker.spawn(
        actor
            .run(rx, cancel)
            .instrument(tracing::info_span!("scheduler")),
    );
    SchedulerHandle { tx, metrics }
}

impl SchedulerHandle {
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub async fn announce(&self, req: AnnounceRequest) -> Result<AnnounceResponse, Closed> {
        self.call("announce", |reply| Command::Announce { req, reply })
            .await
    }

    pub async fn parents(
        &self,
        blob: BlobId,
        req: ParentsRequest,
    ) -> Result<Result<ParentsResponse, WrongScheduler>, Closed> {
        self.call("parents", |reply| Command::Parents { blob, req, reply })
            .await
    }

    pub async fn report_failure(
        &self,
        blob: BlobId,
        report: FailureReport,
    ) -> Result<FailureAck, Closed> {
        self.call("failure", |reply| Command::Failure {
            blob,
            report,
            reply,
        })
        .await
    }

    pub async fn status(&self) -> Result<StatusResponse, Closed> {
        self.call("status", |reply| Command::Status { reply }).await
    }

    /// Start a prewarm job on the live nodes `req` selects.
    pub async fn create_job(&self, req: JobRequest) -> Result<Result<JobStatus, JobError>, Closed> {
        self.call("create_job", |reply| Command::CreateJob { req, reply })
            .await
    }

    pub async fn job(&self, id: JobId) -> Result<Result<JobStatus, JobError>, Closed> {
        self.call("job", |reply| Command::Job { id, reply }).await
    }

    /// Every prewarm job, newest first.
    pub async fn jobs(&self) -> Result<Vec<JobStatus>, Closed> {
        self.call("jobs", |reply| Command::Jobs { reply }).await
    }

    pub async fn cancel_job(&self, id: JobId) -> Result<Result<JobStatus, JobError>, Closed> {
        self.call("cancel_job", |reply| Command::CancelJob { id, reply })
            .await
    }

    /// Keep `list` as the access list of the image with bootstrap digest `key`.
    pub async fn put_access_list(&self, key: BlobId, list: AccessList) -> Result<(), Closed> {
        self.call("put_access_list", |reply| Command::PutAccess {
            key,
            list,
            reply,
        })
        .await
    }

    /// The access list of the image with bootstrap digest `key`, if a node shared one.
    pub async fn access_list(&self, key: BlobId) -> Result<Option<AccessList>, Closed> {
        self.call("access_list", |reply| Command::GetAccess { key, reply })
            .await
    }

    /// Whether the actor answers (it is running and its queue moves).
    pub async fn ping(&self) -> Result<(), Closed> {
        self.call("ping", |reply| Command::Ping { reply }).await
    }

    async fn call<T>(
        &self,
        op: &'static str,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, Closed> {
        let started = Instant::now();
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| Closed)?;
        let out = rx.await.map_err(|_| Closed)?;
        self.metrics
            .observe_decision(op, started.elapsed().as_secs_f64());
        Ok(out)
    }
}

struct Actor {
    start: Instant,
    state: State,
    metrics: Arc<Metrics>,
    access: AccessLists,
}

/// The access lists nodes shared, at most [`ACCESS_LISTS`] of them (the least recently stored
/// goes first). Not part of [`State`]: they are hints for prefetch, lost with a restart and shared
/// again by the next node that records one.
#[derive(Debug, Default)]
struct AccessLists {
    lists: std::collections::HashMap<BlobId, (u64, AccessList)>,
    seq: u64,
}

/// Images whose access lists a scheduler keeps.
const ACCESS_LISTS: usize = 4096;

impl AccessLists {
    /// Adds what `list` has that the kept list lacks, after it (up to the cap): a list only
    /// grows, so no member can replace or wipe what others shared — honest sharers send the
    /// same first touches, then more as their mounts record them.
    fn put(&mut self, key: BlobId, list: AccessList) {
        let list = match self.lists.get(&key) {
            None => AccessList {
                chunks: list
                    .chunks
                    .into_iter()
                    .take(shoal_proto::sched::MAX_SHARED_ACCESS)
                    .collect(),
            },
            Some((_, kept)) => {
                let mut chunks = kept.chunks.clone();
                let mut seen: std::collections::HashSet<(u32, u64)> =
                    chunks.iter().copied().collect();
                for c in list.chunks {
                    if chunks.len() >= shoal_proto::sched::MAX_SHARED_ACCESS {
                        break;
                    }
                    if seen.insert(c) {
                        chunks.push(c);
                    }
                }
                AccessList { chunks }
            }
        };
        if self.lists.len() >= ACCESS_LISTS && !self.lists.contains_key(&key) {
            let oldest = self
                .lists
                .iter()
                .min_by_key(|(_, (seq, _))| *seq)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.lists.remove(&k);
            }
        }
        self.seq += 1;
        self.lists.insert(key, (self.seq, list));
    }

    fn get(&self, key: &BlobId) -> Option<AccessList> {
        self.lists.get(key).map(|(_, l)| l.clone())
    }
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>, cancel: CancellationToken) {
        let period = Duration::from_millis(self.state.config().heartbeat_ms / 2).min(MAX_TICK);
        let mut tick = tokio::time::interval(period.max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tracing::debug!("scheduler actor started");
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.handle(cmd),
                    None => break,
                },
                _ = tick.tick() => {
                    let now = self.now_ms();
                    self.state.tick(now);
                }
            }
            self.record_events();
        }
        tracing::debug!("scheduler actor stopped");
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn handle(&mut self, cmd: Command) {
        let now = self.now_ms();
        match cmd {
            Command::Announce { req, reply } => {
                let kind = if req.full { "full" } else { "delta" };
                let resp = self.state.announce(req, now);
                Metrics::count(
                    &self.metrics.announcements,
                    if resp.resync { "resync" } else { kind },
                );
                let _ = reply.send(resp);
            }
            Command::Parents { blob, req, reply } => {
                let resp = self.state.parents(&blob, &req, now);
                Metrics::count(&self.metrics.parent_requests, parents_outcome(&resp));
                let _ = reply.send(resp);
            }
            Command::Failure {
                blob,
                report,
                reply,
            } => {
                let _ = reply.send(self.state.report_failure(&blob, &report, now));
            }
            Command::Status { reply } => {
                let _ = reply.send(self.status(now));
            }
            Command::CreateJob { req, reply } => {
                let _ = reply.send(self.state.create_job(new_job_id(), req, now));
            }
            Command::Job { id, reply } => {
                let _ = reply.send(self.state.job(id, now));
            }
            Command::Jobs { reply } => {
                let _ = reply.send(self.state.jobs(now));
            }
            Command::Ping { reply } => {
                let _ = reply.send(());
            }
            Command::CancelJob { id, reply } => {
                let _ = reply.send(self.state.cancel_job(id, now));
            }
            Command::PutAccess { key, list, reply } => {
                self.access.put(key, list);
                let _ = reply.send(());
            }
            Command::GetAccess { key, reply } => {
                let _ = reply.send(self.access.get(&key));
            }
        }
    }

    fn status(&self, now: u64) -> StatusResponse {
        let cfg = self.state.config();
        let (nodes, blobs, totals) = self.state.status(now);
        StatusResponse {
            scheduler: SchedulerInfo {
                version: env!("CARGO_PKG_VERSION").into(),
                protocol: PROTOCOL_VERSION,
                uptime_ms: now,
                advertise: cfg.shard.me().map(str::to_string),
                cluster: cfg.shard.cluster().to_vec(),
                heartbeat_interval_ms: cfg.heartbeat_ms,
                node_ttl_ms: cfg.node_ttl_ms,
                max_origin_leases: cfg.max_origin_leases,
            },
            nodes,
            blobs,
            totals,
            jobs: self.state.jobs(now),
        }
    }

    /// Log and count what the state did; update the gauges.
    fn record_events(&mut self) {
        let m = &self.metrics;
        for e in self.state.take_events() {
            match e {
                Event::NodeRegistered { node } => {
                    tracing::info!(node = %node.short(), "node registered");
                }
                Event::NodeExpired { node } => {
                    m.nodes_expired.inc();
                    tracing::info!(node = %node.short(), "node expired (stopped announcing)");
                }
                Event::Resync { node } => {
                    tracing::debug!(node = %node.short(), "unknown node: asked for a full announcement");
                }
                Event::BlobRejected { node, blob, reason } => {
                    m.blobs_rejected.inc();
                    tracing::warn!(node = %node.short(), %blob, %reason, "blob announcement rejected");
                }
                Event::LeaseGranted {
                    blob,
                    node,
                    adopted,
                } => {
                    let kind = if adopted { "adopted" } else { "asked" };
                    m.leases_granted.get_or_create(&KindLabels { kind }).inc();
                    tracing::info!(node = %node.short(), %blob, kind, "origin lease granted");
                }
                Event::LeaseEnded { blob, node, why } => {
                    let reason = why.as_str();
                    m.leases_ended.get_or_create(&ReasonLabels { reason }).inc();
                    tracing::info!(node = %node.short(), %blob, reason, "origin lease ended");
                }
                Event::Blamed {
                    node,
                    reporter,
                    reason,
                } => {
                    let reason = reason.as_str();
                    m.failure_reports
                        .get_or_create(&ReasonLabels { reason })
                        .inc();
                    tracing::info!(node = %node.short(), reporter = %reporter.short(), reason, "failure reported");
                }
                Event::JobCreated { job, nodes } => {
                    m.jobs_created.inc();
                    tracing::info!(%job, nodes, "prewarm job created");
                }
                Event::JobCancelled { job } => {
                    tracing::info!(%job, "prewarm job cancelled");
                }
            }
        }
        m.jobs.set(self.state.job_count() as i64);
        m.nodes.set(self.state.node_count() as i64);
        m.blobs.set(self.state.blob_count() as i64);
        m.leases.set(self.state.lease_count() as i64);
    }
}

/// 64 random bits: SipHash under the process's random keys (a fresh
/// `RandomState` per call) of a counter and the wall clock, so that jobs of
/// several schedulers, or of a restarted one, do not collide.
fn new_job_id() -> JobId {
    use std::hash::{BuildHasher as _, Hasher as _};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::hash::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(nanos);
    JobId(h.finish())
}

fn parents_outcome(resp: &Result<ParentsResponse, WrongScheduler>) -> &'static str {
    let Ok(r) = resp else {
        return "wrong_scheduler";
    };
    match &r.lease {
        Some(l) if l.granted_to_you => "lease_granted",
        _ if r.retry_after_ms.is_some() => "retry",
        _ if !r.holders.is_empty() => "holders",
        Some(_) => "lease_elsewhere",
        None => "empty",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use shoal_proto::sched::{NodeAnnouncement, Traffic};
    use shoal_proto::{Digest, NodeId};

    #[test]
    fn shared_access_lists_only_grow() {
        let mut lists = AccessLists::default();
        let key = Digest::sha256(b"bootstrap");
        let list = |v: &[(u32, u64)]| AccessList { chunks: v.to_vec() };
        lists.put(key.clone(), list(&[(0, 0), (0, 4096)]));
        // Another member cannot wipe or reorder it; what it adds comes after.
        lists.put(key.clone(), list(&[]));
        lists.put(key.clone(), list(&[(1, 0), (0, 0)]));
        assert_eq!(
            lists.get(&key).unwrap().chunks,
            vec![(0, 0), (0, 4096), (1, 0)]
        );
        let many: Vec<(u32, u64)> = (0..shoal_proto::sched::MAX_SHARED_ACCESS as u64 + 10)
            .map(|i| (2, i))
            .collect();
        lists.put(key.clone(), list(&many));
        assert_eq!(
            lists.get(&key).unwrap().chunks.len(),
            shoal_proto::sched::MAX_SHARED_ACCESS
        );
    }

    fn announce(i: u8, full: bool) -> AnnounceRequest {
        AnnounceRequest {
            node: NodeAnnouncement {
                id: NodeId::from_bytes([i; 32]),
                p2p_addr: "127.0.0.1:1".parse().unwrap(),
                zone: None,
                upload_slots_free: 1,
                version: String::new(),
            },
            full,
            blobs: Vec::new(),
            removed: Vec::new(),
            traffic: Traffic::default(),
            job_progress: Vec::new(),
        }
    }

    #[tokio::test]
    async fn actor_answers_and_expires_nodes_on_its_own() {
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let cfg = StateConfig {
            heartbeat_ms: 100,
            node_ttl_ms: 300,
            warmup_ms: 0,
            ..StateConfig::default()
        };
        let h = spawn(cfg, Arc::new(Metrics::new()), &tracker, cancel.clone());
        assert!(h.announce(announce(1, false)).await.unwrap().resync);
        assert!(!h.announce(announce(1, true)).await.unwrap().resync);
        assert_eq!(h.status().await.unwrap().nodes.len(), 1);
        let blob = Digest::sha256(b"x");
        let req = ParentsRequest {
            asker: NodeId::from_bytes([1; 32]),
            size: Some(1),
            want_lease: true,
        };
        let r = h.parents(blob, req).await.unwrap().unwrap();
        assert!(r.lease.is_some_and(|l| l.granted_to_you));
        // Without announcements the node expires by the actor's own ticks.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !h.status().await.unwrap().nodes.is_empty() {
            assert!(Instant::now() < deadline, "node never expired");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let text = h.metrics().encode();
        assert!(
            text.contains("shoal_scheduler_nodes_expired_total 1"),
            "{text}"
        );
        assert!(
            text.contains("shoal_scheduler_leases_ended_total{reason=\"expired\"} 1"),
            "{text}"
        );
        cancel.cancel();
        tracker.close();
        tracker.wait().await;
        assert_eq!(h.status().await, Err(Closed));
    }
}
