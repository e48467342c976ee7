//! Prewarm jobs: which nodes run which job, and where each stands. Pure:
//! the caller passes the live nodes, the time and the new job's id.
//!
//! Rules:
//! - **Selection** happens once, at creation, among the live nodes: `all`,
//!   `N` of them (an error if fewer are alive; picked spread by a hash of
//!   job and node, so jobs do not all land on the same nodes), or those of
//!   `zone=Z`. A job selecting no node is refused ([`JobError::NoNodes`]).
//! - **Assignments** are level-triggered: a node is sent every job in which
//!   it is pending or running; once it reports a final state, or the job is
//!   cancelled, it is not sent the job any more (and stops it).
//! - **Progress** is accepted only from a node selected for the job, never
//!   after that node's final state (done, failed, cancelled): a stale report
//!   cannot undo a result.
//! - **Dead nodes**: a selected node that expires before finishing fails
//!   with "node stopped announcing".
//! - **Retention**: at most [`MAX_ACTIVE`] unfinished jobs; finished jobs are
//!   kept for [`KEEP_FINISHED_MS`] and at most [`MAX_KEPT`] jobs in total
//!   (oldest finished first out). Jobs live in memory only: a restarted
//!   scheduler forgets them, and its nodes stop them.

use std::collections::BTreeMap;

use shoal_proto::sched::{
    JobAssignment, JobId, JobNodeStatus, JobProgress, JobRequest, JobState, JobStatus,
    NodeJobState, NodeSelector,
};
use shoal_proto::NodeId;

/// Most unfinished jobs at once.
pub const MAX_ACTIVE: usize = 64;
/// Most jobs kept (finished ones are dropped first).
pub const MAX_KEPT: usize = 256;
/// How long a finished job stays visible.
pub const KEEP_FINISHED_MS: u64 = 3_600_000;
/// Longest image reference accepted.
const MAX_IMAGE: usize = 512;
/// Longest message kept from a node.
const MAX_MESSAGE: usize = 1024;

/// Why a job was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    #[error("image reference {image:?}: {reason}")]
    BadImage { image: String, reason: &'static str },
    #[error("no live node matches --nodes {selector} ({live} live nodes)")]
    NoNodes { selector: NodeSelector, live: usize },
    #[error("--nodes {wanted} asks for more nodes than the {live} live ones")]
    TooFewNodes { wanted: u32, live: usize },
    #[error("{MAX_ACTIVE} prewarm jobs are running already; wait or cancel some")]
    TooMany,
    #[error("no prewarm job {0}")]
    NotFound(JobId),
    #[error("a prewarm job {0} exists already")]
    Duplicate(JobId),
}

/// A live node as job selection sees it.
#[derive(Clone, Debug)]
pub struct LiveNode<'a> {
    pub id: NodeId,
    pub zone: Option<&'a str>,
}

#[derive(Clone, Debug, Default)]
pub struct Jobs {
    jobs: BTreeMap<JobId, JobRecord>,
}

#[derive(Clone, Debug)]
struct JobRecord {
    req: JobRequest,
    created_ms: u64,
    /// When the last node reached a final state, or the job was cancelled.
    finished_ms: Option<u64>,
    cancelled: bool,
    nodes: BTreeMap<NodeId, NodeJob>,
}

#[derive(Clone, Debug)]
struct NodeJob {
    zone: Option<String>,
    state: NodeJobState,
    bytes_done: u64,
    bytes_total: u64,
    blobs_done: u32,
    blobs_total: u32,
    message: Option<String>,
    finished_ms: Option<u64>,
}

impl Jobs {
    /// Create job `id` for `req` among `live` nodes.
    pub fn create(
        &mut self,
        id: JobId,
        mut req: JobRequest,
        live: &[LiveNode<'_>],
        now_ms: u64,
    ) -> Result<JobStatus, JobError> {
        req.image = req.image.trim().to_string();
        check_image(&req.image)?;
        if self.jobs.contains_key(&id) {
            return Err(JobError::Duplicate(id));
        }
        self.expire(now_ms);
        if self
            .jobs
            .values()
            .filter(|j| j.finished_ms.is_none())
            .count()
            >= MAX_ACTIVE
        {
            return Err(JobError::TooMany);
        }
        let selected = select(id, &req.nodes, live)?;
        let nodes = selected
            .into_iter()
            .map(|n| {
                (
                    n.id,
                    NodeJob {
                        zone: n.zone.map(str::to_string),
                        state: NodeJobState::Pending,
                        bytes_done: 0,
                        bytes_total: 0,
                        blobs_done: 0,
                        blobs_total: 0,
                        message: None,
                        finished_ms: None,
                    },
                )
            })
            .collect();
        self.jobs.insert(
            id,
            JobRecord {
                req,
                created_ms: now_ms,
                finished_ms: None,
                cancelled: false,
                nodes,
            },
        );
        self.trim();
        self.status(id, now_ms)
    }

    /// The jobs `node` should run now.
    pub fn assignments(&self, node: NodeId) -> Vec<JobAssignment> {
        self.jobs
            .iter()
            .filter(|(_, j)| !j.cancelled)
            .filter(|(_, j)| j.nodes.get(&node).is_some_and(|n| !n.state.is_final()))
            .map(|(id, j)| JobAssignment {
                job: *id,
                image: j.req.image.clone(),
                full: j.req.full,
            })
            .collect()
    }

    /// Apply `node`'s reports (unknown jobs are ignored: another
    /// scheduler's, or forgotten).
    pub fn progress(&mut self, node: NodeId, reports: &[JobProgress], now_ms: u64) {
        for r in reports {
            let Some(job) = self.jobs.get_mut(&r.job) else {
                continue;
            };
            if job.cancelled {
                continue;
            }
            let Some(n) = job.nodes.get_mut(&node) else {
                continue;
            };
            if n.state.is_final() {
                continue;
            }
            n.state = match r.state {
                s @ (NodeJobState::Running | NodeJobState::Done | NodeJobState::Failed) => s,
                // A node cannot cancel or un-start a job; keep what we know.
                _ => n.state,
            };
            n.bytes_done = r.bytes_done;
            n.bytes_total = r.bytes_total;
            n.blobs_done = r.blobs_done;
            n.blobs_total = r.blobs_total;
            n.message = r.message.as_deref().map(clip_message);
            if n.state.is_final() {
                n.finished_ms = Some(now_ms);
            }
            job.settle(now_ms);
        }
    }

    /// Fail every unfinished part of a job run by `node`, which died.
    pub fn node_lost(&mut self, node: NodeId, now_ms: u64) {
        for job in self.jobs.values_mut().filter(|j| !j.cancelled) {
            let Some(n) = job.nodes.get_mut(&node) else {
                continue;
            };
            if n.state.is_final() {
                continue;
            }
            n.state = NodeJobState::Failed;
            n.message = Some("node stopped announcing (dead or restarted?)".into());
            n.finished_ms = Some(now_ms);
            job.settle(now_ms);
        }
    }

    /// Cancel job `id`: its unfinished nodes are told to stop.
    pub fn cancel(&mut self, id: JobId, now_ms: u64) -> Result<JobStatus, JobError> {
        let job = self.jobs.get_mut(&id).ok_or(JobError::NotFound(id))?;
        if job.finished_ms.is_none() {
            job.cancelled = true;
            job.finished_ms = Some(now_ms);
            for n in job.nodes.values_mut().filter(|n| !n.state.is_final()) {
                n.state = NodeJobState::Cancelled;
                n.finished_ms = Some(now_ms);
            }
        }
        self.status(id, now_ms)
    }

    pub fn status(&self, id: JobId, now_ms: u64) -> Result<JobStatus, JobError> {
        let job = self.jobs.get(&id).ok_or(JobError::NotFound(id))?;
        Ok(job.status(id, now_ms))
    }

    /// Every job, newest first.
    pub fn list(&self, now_ms: u64) -> Vec<JobStatus> {
        let mut out: Vec<(u64, JobStatus)> = self
            .jobs
            .iter()
            .map(|(id, j)| (j.created_ms, j.status(*id, now_ms)))
            .collect();
        out.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.id.cmp(&b.1.id)));
        out.into_iter().map(|(_, s)| s).collect()
    }

    /// Drop finished jobs older than [`KEEP_FINISHED_MS`].
    pub fn expire(&mut self, now_ms: u64) {
        self.jobs.retain(|_, j| {
            j.finished_ms
                .is_none_or(|f| now_ms.saturating_sub(f) <= KEEP_FINISHED_MS)
        });
    }

    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// Keep at most [`MAX_KEPT`] jobs, dropping the oldest finished first.
    fn trim(&mut self) {
        while self.jobs.len() > MAX_KEPT {
            let oldest = self
                .jobs
                .iter()
                .filter_map(|(id, j)| j.finished_ms.map(|f| (f, *id)))
                .min();
            let Some((_, id)) = oldest else { return };
            self.jobs.remove(&id);
        }
    }
}

impl JobRecord {
    fn state(&self) -> JobState {
        if self.cancelled {
            return JobState::Cancelled;
        }
        let states = || self.nodes.values().map(|n| n.state);
        if states().any(|s| !s.is_final()) {
            JobState::Running
        } else if states().any(|s| s != NodeJobState::Done) {
            JobState::Failed
        } else {
            JobState::Done
        }
    }

    /// Mark the job finished when its last node is.
    fn settle(&mut self, now_ms: u64) {
        if self.finished_ms.is_none() && self.state().is_final() {
            self.finished_ms = Some(now_ms);
        }
    }

    fn status(&self, id: JobId, now_ms: u64) -> JobStatus {
        let end = self.finished_ms.unwrap_or(now_ms);
        JobStatus {
            id,
            image: self.req.image.clone(),
            nodes_selector: self.req.nodes.clone(),
            full: self.req.full,
            state: self.state(),
            created_ms_ago: now_ms.saturating_sub(self.created_ms),
            elapsed_ms: end.saturating_sub(self.created_ms),
            bytes_done: self.nodes.values().map(|n| n.bytes_done).sum(),
            bytes_total: self.nodes.values().map(|n| n.bytes_total).sum(),
            nodes: self
                .nodes
                .iter()
                .map(|(node, n)| JobNodeStatus {
                    node: *node,
                    zone: n.zone.clone(),
                    state: n.state,
                    bytes_done: n.bytes_done,
                    bytes_total: n.bytes_total,
                    blobs_done: n.blobs_done,
                    blobs_total: n.blobs_total,
                    message: n.message.clone(),
                    finished_after_ms: n.finished_ms.map(|f| f.saturating_sub(self.created_ms)),
                })
                .collect(),
        }
    }
}

/// The nodes a new job goes to.
fn select<'a, 'b>(
    id: JobId,
    selector: &NodeSelector,
    live: &'b [LiveNode<'a>],
) -> Result<Vec<&'b LiveNode<'a>>, JobError> {
    let chosen: Vec<&LiveNode<'a>> = match selector {
        NodeSelector::All => live.iter().collect(),
        NodeSelector::Zone(z) => live.iter().filter(|n| n.zone == Some(z.as_str())).collect(),
        NodeSelector::Count(wanted) => {
            if (*wanted as usize) > live.len() {
                return Err(JobError::TooFewNodes {
                    wanted: *wanted,
                    live: live.len(),
                });
            }
            let mut by_hash: Vec<(u64, &LiveNode<'a>)> =
                live.iter().map(|n| (spread(id, n.id), n)).collect();
            by_hash.sort_by_key(|(h, n)| (*h, n.id));
            by_hash
                .into_iter()
                .take(*wanted as usize)
                .map(|(_, n)| n)
                .collect()
        }
    };
    if chosen.is_empty() {
        return Err(JobError::NoNodes {
            selector: selector.clone(),
            live: live.len(),
        });
    }
    Ok(chosen)
}

/// A stable pseudo-random order of nodes per job (FNV-1a over both ids).
fn spread(job: JobId, node: NodeId) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in job.0.to_le_bytes().iter().chain(node.as_bytes().iter()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The scheduler does not resolve images (nodes do); it only refuses what
/// cannot be a reference at all.
fn check_image(image: &str) -> Result<(), JobError> {
    let bad = |reason| {
        Err(JobError::BadImage {
            image: image.chars().take(80).collect(),
            reason,
        })
    };
    if image.is_empty() {
        return bad("empty");
    }
    if image.len() > MAX_IMAGE {
        return bad("too long");
    }
    if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("contains whitespace");
    }
    Ok(())
}

fn clip_message(m: &str) -> String {
    let mut end = m.len().min(MAX_MESSAGE);
    while !m.is_char_boundary(end) {
        end -= 1;
    }
    m[..end].to_string()
}

/// Nodes by id → zone, for [`Jobs::create`].
pub fn live_nodes<'a>(nodes: impl Iterator<Item = (NodeId, Option<&'a str>)>) -> Vec<LiveNode<'a>> {
    let mut v: Vec<LiveNode<'a>> = nodes.map(|(id, zone)| LiveNode { id, zone }).collect();
    v.sort_by_key(|n| n.id);
    v
}
