//! Prewarm jobs in the scheduler protocol: the CLI submits a job
//! ([`JobRequest`]) to one scheduler, which hands it to the selected nodes in
//! their [`AnnounceResponse`](super::AnnounceResponse)s (`jobs`) and collects
//! their progress from their [`AnnounceRequest`](super::AnnounceRequest)s
//! (`job_progress`).
//!
//! | request | body → reply |
//! |---|---|
//! | `POST /api/v1/jobs` | [`JobRequest`] → [`JobStatus`] (201) |
//! | `GET /api/v1/jobs` | → [`JobList`] |
//! | `GET /api/v1/jobs/{id}` | → [`JobStatus`] (404 `not_found` if unknown) |
//! | `DELETE /api/v1/jobs/{id}` | → [`JobStatus`] (cancelled) |
//!
//! Assignments are level-triggered: every answer to a node lists all the
//! jobs that scheduler still wants from it. A node starts a listed job it
//! does not run yet and stops one that its scheduler no longer lists
//! (cancelled, or the scheduler restarted and forgot it). A node reports
//! every job it knows, also finished ones, until its scheduler stops listing
//! them, so a lost message changes nothing.
//!
//! Invariants: a [`JobId`] is 16 lowercase hex characters; a
//! [`NodeSelector`] count is at least 1 and a zone is non-empty.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::NodeId;

/// A prewarm job's id: 64 random bits, shown as 16 hex characters. Random
/// so that jobs of several schedulers never collide at a node.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(pub u64);

/// Why a string is not a [`JobId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("job id {input:?} is not 16 hex characters")]
pub struct JobIdError {
    pub input: String,
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobId({self})")
    }
}

impl FromStr for JobId {
    type Err = JobIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || JobIdError {
            input: s.chars().take(40).collect(),
        };
        if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(err());
        }
        u64::from_str_radix(s, 16).map(JobId).map_err(|_| err())
    }
}

impl Serialize for JobId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for JobId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Which live nodes a job goes to: `all`, `N` (that many), or `zone=Z`.
/// Serialized in that text form.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum NodeSelector {
    All,
    Count(u32),
    Zone(String),
}

/// Why a string is not a [`NodeSelector`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("node selector {input:?} is not `all`, a number of nodes (1 or more) or `zone=NAME`")]
pub struct NodeSelectorError {
    pub input: String,
}

impl fmt::Display for NodeSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::All => f.write_str("all"),
            Self::Count(n) => write!(f, "{n}"),
            Self::Zone(z) => write!(f, "zone={z}"),
        }
    }
}

impl FromStr for NodeSelector {
    type Err = NodeSelectorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || NodeSelectorError {
            input: s.chars().take(80).collect(),
        };
        let s = s.trim();
        if s.eq_ignore_ascii_case("all") {
            return Ok(Self::All);
        }
        if let Some(z) = s.strip_prefix("zone=") {
            let z = z.trim();
            if z.is_empty() || z.len() > 64 {
                return Err(err());
            }
            return Ok(Self::Zone(z.to_string()));
        }
        match s.parse::<u32>() {
            Ok(n) if n > 0 => Ok(Self::Count(n)),
            _ => Err(err()),
        }
    }
}

impl Serialize for NodeSelector {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for NodeSelector {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `POST /api/v1/jobs`: warm `image` on the selected nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRequest {
    /// `host[:port]/repo[:tag|@digest]`, resolved by each node with its own
    /// upstreams and credentials.
    pub image: String,
    #[serde(default = "all_nodes")]
    pub nodes: NodeSelector,
    /// Nydus images: every data blob too, not only the bootstrap.
    #[serde(default)]
    pub full: bool,
}

fn all_nodes() -> NodeSelector {
    NodeSelector::All
}

/// A job a scheduler wants a node to run (in `AnnounceResponse::jobs`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobAssignment {
    pub job: JobId,
    pub image: String,
    #[serde(default)]
    pub full: bool,
}

/// Where one node stands in a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeJobState {
    /// Assigned; the node has not reported it yet.
    Pending,
    Running,
    Done,
    Failed,
    /// The job was cancelled before this node finished.
    Cancelled,
    #[serde(other)]
    Unknown,
}

impl NodeJobState {
    /// No further change is expected.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Done | Self::Failed | Self::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Unknown => "unknown",
        }
    }
}

/// A node's report on one job (in `AnnounceRequest::job_progress`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobProgress {
    pub job: JobId,
    /// `running`, `done` or `failed`.
    pub state: NodeJobState,
    #[serde(default)]
    pub bytes_done: u64,
    /// 0 until the node resolved the image.
    #[serde(default)]
    pub bytes_total: u64,
    #[serde(default)]
    pub blobs_done: u32,
    #[serde(default)]
    pub blobs_total: u32,
    /// Why it failed (or what it is doing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A job as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Some node is still pending or running.
    Running,
    /// Every node is done.
    Done,
    /// Every node finished and at least one failed.
    Failed,
    Cancelled,
    #[serde(other)]
    Unknown,
}

impl JobState {
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Running)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Unknown => "unknown",
        }
    }
}

/// `GET /api/v1/jobs/{id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatus {
    pub id: JobId,
    pub image: String,
    pub nodes_selector: NodeSelector,
    pub full: bool,
    pub state: JobState,
    pub created_ms_ago: u64,
    /// How long the job ran (to now while it runs).
    pub elapsed_ms: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// By node id.
    pub nodes: Vec<JobNodeStatus>,
}

/// One node of a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobNodeStatus {
    pub node: NodeId,
    #[serde(default)]
    pub zone: Option<String>,
    pub state: NodeJobState,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub blobs_done: u32,
    pub blobs_total: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the node finished, counted from the job's creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_after_ms: Option<u64>,
}

/// `GET /api/v1/jobs`: newest first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobList {
    pub jobs: Vec<JobStatus>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn job_ids() {
        let id = JobId(0xab);
        assert_eq!(id.to_string(), "00000000000000ab");
        assert_eq!("00000000000000ab".parse::<JobId>(), Ok(id));
        assert!("ab".parse::<JobId>().is_err());
        assert!("+000000000000000".parse::<JobId>().is_err());
        assert!("zzzzzzzzzzzzzzzz".parse::<JobId>().is_err());
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"00000000000000ab\"");
    }

    #[test]
    fn selectors() {
        assert_eq!("all".parse::<NodeSelector>(), Ok(NodeSelector::All));
        assert_eq!("3".parse::<NodeSelector>(), Ok(NodeSelector::Count(3)));
        assert_eq!(
            "zone=eu-1".parse::<NodeSelector>(),
            Ok(NodeSelector::Zone("eu-1".into()))
        );
        for bad in ["0", "-1", "zone=", "some", ""] {
            assert!(bad.parse::<NodeSelector>().is_err(), "{bad}");
        }
        for s in ["all", "3", "zone=a"] {
            assert_eq!(s.parse::<NodeSelector>().unwrap().to_string(), s);
        }
        let req: JobRequest = serde_json::from_str(r#"{"image":"x/y:1"}"#).unwrap();
        assert_eq!(req.nodes, NodeSelector::All);
        assert!(!req.full);
        let state: NodeJobState = serde_json::from_str("\"paused\"").unwrap();
        assert_eq!(state, NodeJobState::Unknown);
    }
}
