//! The node ↔ scheduler protocol (version 1): HTTP/1.1 with JSON bodies,
//! every path under [`API_PREFIX`], every request and response carrying the
//! [`PROTOCOL_HEADER`] header.
//!
//! | request | body | reply |
//! |---|---|---|
//! | `POST /api/v1/announce` | [`AnnounceRequest`] | [`AnnounceResponse`] |
//! | `POST /api/v1/blobs/{blob}/parents` | [`ParentsRequest`] | [`ParentsResponse`] |
//! | `POST /api/v1/blobs/{blob}/failure` | [`FailureReport`] | [`FailureAck`] |
//! | `GET /api/v1/status` | — | [`StatusResponse`] |
//! | `POST /api/v1/jobs`, `GET /api/v1/jobs[/{id}]`, `DELETE /api/v1/jobs/{id}` | see [`jobs`] | prewarm jobs |
//!
//! Errors are [`ErrorBody`] with a 4xx/5xx status. A request whose
//! [`PROTOCOL_HEADER`] names another major version gets 400 with
//! [`ErrorCode::ProtocolVersion`]; a parents request sent to a scheduler that
//! does not own the blob gets 421 with [`ErrorCode::WrongScheduler`].
//!
//! Several schedulers split blobs by rendezvous hashing ([`pick_scheduler`]):
//! nodes announce to every scheduler (each keeps the blobs it owns plus node
//! liveness) and ask the blob's owner for parents.
//!
//! Invariants: a [`PieceBits`] never holds more than [`MAX_PIECES`] pieces
//! and has no bit set past its length; a [`PieceSha256`] is 32 bytes.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::Digest as _;

use crate::{BlobId, NodeId};

pub mod jobs;

pub use jobs::{
    JobAssignment, JobId, JobIdError, JobList, JobNodeStatus, JobProgress, JobRequest, JobState,
    JobStatus, NodeJobState, NodeSelector, NodeSelectorError,
};

/// The protocol's major version. A peer speaking another major is refused.
pub const PROTOCOL_VERSION: u32 = 1;
/// The header carrying the protocol version (`1` or `1.<minor>`).
pub const PROTOCOL_HEADER: &str = "x-shoal-protocol";
/// Every protocol path starts with this.
pub const API_PREFIX: &str = "/api/v1";
/// Most pieces a blob may have (1 TiB in 1 MiB pieces); bounds the bitmap
/// a peer can make us allocate.
pub const MAX_PIECES: u32 = 1 << 20;

/// Check a [`PROTOCOL_HEADER`] value: its major version must be ours.
pub fn check_version(value: &str) -> Result<(), VersionError> {
    let major = value.trim().split('.').next().unwrap_or("");
    match major.parse::<u32>() {
        Ok(PROTOCOL_VERSION) => Ok(()),
        _ => Err(VersionError {
            theirs: value.chars().take(32).collect(),
        }),
    }
}

/// A peer speaks another protocol version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("incompatible shoal scheduler protocol: peer speaks {PROTOCOL_HEADER} {theirs:?}, this side speaks {PROTOCOL_VERSION}")]
pub struct VersionError {
    pub theirs: String,
}

// ---------------------------------------------------------------------------
// Piece maps and hashes

/// Which pieces of a blob a node holds: a bitset of known length.
///
/// Serialized as a string `"<len>:all"`, `"<len>:none"` or `"<len>:<hex>"`
/// where the hex is the bitmap, piece `i` in bit `i % 8` (LSB first) of byte
/// `i / 8`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PieceBits {
    len: u32,
    bytes: Vec<u8>,
}

/// Why a string is not a [`PieceBits`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PieceBitsError {
    #[error("piece map {input:?} is not \"<len>:all|none|<hex>\"")]
    Syntax { input: String },
    #[error("piece map has {len} pieces, more than the {MAX_PIECES} allowed")]
    TooLong { len: u64 },
    #[error("piece map of {len} pieces needs {expected} hex characters, has {got}")]
    BadLength {
        len: u32,
        expected: usize,
        got: usize,
    },
    #[error("piece map of {len} pieces has bits set past its end")]
    TrailingBits { len: u32 },
}

impl PieceBits {
    /// No pieces held. `len` is clamped to [`MAX_PIECES`].
    pub fn empty(len: u32) -> Self {
        let len = len.min(MAX_PIECES);
        Self {
            len,
            bytes: vec![0; len.div_ceil(8) as usize],
        }
    }

    /// Every piece held. `len` is clamped to [`MAX_PIECES`].
    pub fn full(len: u32) -> Self {
        let mut b = Self::empty(len);
        for i in 0..b.len {
            b.set(i);
        }
        b
    }

    /// Number of pieces of a blob of `size` bytes in `piece_size` pieces
    /// (`None` if `piece_size` is 0 or the count exceeds [`MAX_PIECES`]).
    pub fn piece_count(size: u64, piece_size: u64) -> Option<u32> {
        if piece_size == 0 {
            return None;
        }
        let n = size.div_ceil(piece_size);
        u32::try_from(n).ok().filter(|n| *n <= MAX_PIECES)
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, i: u32) -> bool {
        i < self.len && self.bytes[(i / 8) as usize] & (1 << (i % 8)) != 0
    }

    /// Mark piece `i` held; out-of-range indices are ignored.
    pub fn set(&mut self, i: u32) {
        if i < self.len {
            self.bytes[(i / 8) as usize] |= 1 << (i % 8);
        }
    }

    /// Number of pieces held.
    pub fn count(&self) -> u32 {
        self.bytes.iter().map(|b| b.count_ones()).sum()
    }

    /// Every piece held (true for a zero-length map).
    pub fn is_full(&self) -> bool {
        self.count() == self.len
    }

    /// Indices of the held pieces, ascending.
    pub fn ones(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.len).filter(|i| self.get(*i))
    }
}

impl fmt::Display for PieceBits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.count();
        if self.len > 0 && count == self.len {
            write!(f, "{}:all", self.len)
        } else if count == 0 {
            write!(f, "{}:none", self.len)
        } else {
            write!(f, "{}:{}", self.len, hex::encode(&self.bytes))
        }
    }
}

impl fmt::Debug for PieceBits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PieceBits({}/{})", self.count(), self.len)
    }
}

impl FromStr for PieceBits {
    type Err = PieceBitsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || PieceBitsError::Syntax {
            input: s.chars().take(40).collect(),
        };
        let (len, body) = s.split_once(':').ok_or_else(syntax)?;
        if len.is_empty() || len.len() > 10 || !len.bytes().all(|b| b.is_ascii_digit()) {
            return Err(syntax());
        }
        let len: u64 = len.parse().map_err(|_| syntax())?;
        let Some(len) = u32::try_from(len).ok().filter(|l| *l <= MAX_PIECES) else {
            return Err(PieceBitsError::TooLong { len });
        };
        match body {
            "all" => return Ok(Self::full(len)),
            "none" => return Ok(Self::empty(len)),
            _ => {}
        }
        let expected = len.div_ceil(8) as usize * 2;
        if body.len() != expected {
            return Err(PieceBitsError::BadLength {
                len,
                expected,
                got: body.len(),
            });
        }
        let bytes = hex::decode(body).map_err(|_| syntax())?;
        let tail = len % 8;
        if tail != 0 && bytes.last().is_some_and(|b| b >> tail != 0) {
            return Err(PieceBitsError::TrailingBits { len });
        }
        Ok(Self { len, bytes })
    }
}

impl Serialize for PieceBits {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PieceBits {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The SHA-256 of one piece's bytes; serialized as 64 hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PieceSha256(pub [u8; 32]);

impl PieceSha256 {
    pub fn of(data: &[u8]) -> Self {
        Self(sha2::Sha256::digest(data).into())
    }
}

impl fmt::Display for PieceSha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for PieceSha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PieceSha256({})", hex::encode(&self.0[..4]))
    }
}

impl Serialize for PieceSha256 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PieceSha256 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.as_bytes(), &mut out)
            .map_err(|_| serde::de::Error::custom("piece sha256 must be 64 hex characters"))?;
        Ok(Self(out))
    }
}

/// A blob's per-piece SHA-256 list; `None` for a piece whose hash is not
/// known (yet). Index = piece number.
pub type PieceHashes = Vec<Option<PieceSha256>>;

// ---------------------------------------------------------------------------
// Announce

/// `POST /api/v1/announce`: a node's heartbeat plus what changed in what it
/// holds (`full: false`) or everything it holds (`full: true`).
///
/// A node sends a full announcement after it starts and whenever the
/// scheduler answers `resync: true` (the scheduler restarted, or expired the
/// node); otherwise deltas, batched, once per heartbeat interval.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AnnounceRequest {
    pub node: NodeAnnouncement,
    /// This is the node's complete set: blobs not listed are not held.
    #[serde(default)]
    pub full: bool,
    /// Blobs added or changed since the last announcement (all, if `full`).
    #[serde(default)]
    pub blobs: Vec<BlobAnnouncement>,
    /// Blobs the node no longer holds (evicted, or a download abandoned).
    #[serde(default)]
    pub removed: Vec<BlobId>,
    #[serde(default)]
    pub traffic: Traffic,
    /// Where the node stands in every prewarm job it knows of (newer nodes
    /// only; a scheduler ignores jobs it did not create).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub job_progress: Vec<JobProgress>,
}

/// Who the node is and how to reach it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAnnouncement {
    pub id: NodeId,
    /// Its QUIC endpoint, `ip:port`.
    pub p2p_addr: SocketAddr,
    /// Zone/rack label; same-zone holders rank higher.
    #[serde(default)]
    pub zone: Option<String>,
    /// Uploads it could start now.
    #[serde(default)]
    pub upload_slots_free: u32,
    /// The node's software version (shown on the status page).
    #[serde(default)]
    pub version: String,
}

/// What a node holds of one blob.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobAnnouncement {
    pub blob: BlobId,
    pub size: u64,
    pub piece_size: u64,
    /// Pieces held (verified). Its length must be the blob's piece count.
    pub have: PieceBits,
    /// Per-piece hashes; accepted only from the blob's origin-lease holder
    /// and from nodes holding the complete (digest-verified) blob. `null`
    /// entries leave what the scheduler knows unchanged, so a lease holder
    /// may send only the hashes it learned since its last announcement.
    #[serde(default)]
    pub piece_sha256: Option<PieceHashes>,
    /// The whole blob is held and matched its digest.
    #[serde(default)]
    pub complete: bool,
    /// The node is fetching this blob from the origin under a lease. Lets a
    /// restarted scheduler give the lease back to the node that had it.
    #[serde(default)]
    pub origin_fetch: bool,
    /// Cumulative bytes of this blob the node has read from the origin: a
    /// lease holder's progress finer than whole pieces.
    #[serde(default)]
    pub origin_bytes: u64,
    /// Bytes of the blob held (verified), whole pieces or not: a lazy mount keeps the chunks it
    /// read, which rarely fill a piece, and a peer serves exactly the bytes it holds.
    #[serde(default)]
    pub present_bytes: u64,
}

/// Cumulative byte counters of a node since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Traffic {
    pub from_origin: u64,
    pub from_peers: u64,
    pub to_peers: u64,
    pub served_local: u64,
}

impl Traffic {
    pub fn add(&mut self, other: &Traffic) {
        self.from_origin = self.from_origin.saturating_add(other.from_origin);
        self.from_peers = self.from_peers.saturating_add(other.from_peers);
        self.to_peers = self.to_peers.saturating_add(other.to_peers);
        self.served_local = self.served_local.saturating_add(other.served_local);
    }
}

/// Reply to an announcement.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnounceResponse {
    /// Announce again after this long.
    pub heartbeat_interval_ms: u64,
    /// The node is forgotten if it does not announce for this long.
    pub node_ttl_ms: u64,
    /// The scheduler does not know this node (it restarted, or the node
    /// expired): the announcement was not applied; send a full one now.
    #[serde(default)]
    pub resync: bool,
    /// Blobs this node must stop fetching from the origin: its lease was
    /// revoked (it stalled, expired, or another node holds it). It should
    /// fetch the rest from peers.
    #[serde(default)]
    pub leases_revoked: Vec<BlobId>,
    /// Complete blobs whose per-piece hashes the scheduler lacks: include
    /// `piece_sha256` for them in the next announcement.
    #[serde(default)]
    pub piece_sha256_wanted: Vec<BlobId>,
    /// Every prewarm job of this scheduler the node should run (or keep
    /// reporting): a job not listed any more is cancelled or forgotten.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jobs: Vec<JobAssignment>,
}

// ---------------------------------------------------------------------------
// Parents

/// `POST /api/v1/blobs/{blob}/parents`: who can give `asker` this blob, and
/// may it fetch from the origin.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentsRequest {
    pub asker: NodeId,
    /// The blob's size, when the asker knows it (from the descriptor).
    #[serde(default)]
    pub size: Option<u64>,
    /// Ask for the origin lease if nobody can serve the blob.
    #[serde(default)]
    pub want_lease: bool,
}

/// Ranked holders of a blob and the state of its origin lease.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParentsResponse {
    /// Best first; never the asker.
    pub holders: Vec<Holder>,
    /// Size and piece size as announced by holders (`None` if none did yet).
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub piece_size: Option<u64>,
    /// Per-piece hashes known so far, from the lease holder or a complete
    /// holder.
    #[serde(default)]
    pub piece_sha256: Option<PieceHashes>,
    /// The blob's origin lease, if one is live.
    #[serde(default)]
    pub lease: Option<LeaseInfo>,
    /// The scheduler is still rebuilding its state after a start and grants
    /// no lease yet: ask again after this many milliseconds.
    #[serde(default)]
    pub retry_after_ms: Option<u64>,
}

/// A node that holds (some of) a blob.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Holder {
    pub node: NodeId,
    pub p2p_addr: SocketAddr,
    #[serde(default)]
    pub zone: Option<String>,
    pub have: PieceBits,
    pub complete: bool,
    /// It holds the origin lease: it fetches pieces it lacks from the origin
    /// on request.
    #[serde(default)]
    pub lease_holder: bool,
    /// Ranking score in [0, 1]; higher is better.
    pub score: f64,
}

/// The origin lease of a blob.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    pub holder: NodeId,
    /// The asker holds it: fetch from the origin and announce progress.
    pub granted_to_you: bool,
    /// Milliseconds until the lease is revoked unless its holder announces
    /// progress.
    pub expires_ms: u64,
}

// ---------------------------------------------------------------------------
// Failures

/// `POST /api/v1/blobs/{blob}/failure`: `reporter` had trouble with `peer`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureReport {
    pub reporter: NodeId,
    pub peer: NodeId,
    pub reason: FailureReason,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureReason {
    /// A piece did not match its hash: the peer is avoided for a while.
    BadPiece,
    /// The peer could not be reached.
    Unreachable,
    /// The peer stopped sending.
    Stalled,
}

impl FailureReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadPiece => "bad_piece",
            Self::Unreachable => "unreachable",
            Self::Stalled => "stalled",
        }
    }
}

/// Reply to a failure report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureAck {
    /// The report was counted (false if the peer is unknown or is the reporter).
    pub counted: bool,
}

// ---------------------------------------------------------------------------
// Errors

/// Body of every error reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub code: ErrorCode,
    /// For `protocol_version`: the version this side speaks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supported: Option<u32>,
    /// For `protocol_version`: the version the request named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested: Option<String>,
    /// For `wrong_scheduler`: the scheduler that owns the blob.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    ProtocolVersion,
    BadRequest,
    WrongScheduler,
    Unavailable,
    /// No such job (or path).
    NotFound,
    /// A prewarm job selects no live node.
    NoNodes,
    #[serde(other)]
    Other,
}

// ---------------------------------------------------------------------------
// Shared access lists

/// Most chunks a shared access list holds (the first ones an image's first run touched: what a
/// container's start-up needs).
pub const MAX_SHARED_ACCESS: usize = 50_000;

/// `PUT`/`GET /api/v1/access-lists/{image key}`: the chunks an image's first run read, in
/// first-touch order, as (blob table index, compressed offset) pairs. The key is the sha256 of the
/// image's RAFS bootstrap, so every node that mounts the same image finds the same list.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessList {
    pub chunks: Vec<(u32, u64)>,
}

// ---------------------------------------------------------------------------
// Status

/// `GET /api/v1/status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusResponse {
    pub scheduler: SchedulerInfo,
    pub nodes: Vec<NodeStatus>,
    pub blobs: Vec<BlobStatus>,
    /// Sum of the live nodes' traffic counters.
    pub totals: Traffic,
    /// Prewarm jobs this scheduler knows, newest first.
    #[serde(default)]
    pub jobs: Vec<JobStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchedulerInfo {
    pub version: String,
    pub protocol: u32,
    pub uptime_ms: u64,
    /// This scheduler's name in `cluster` (`None`: it owns every blob).
    pub advertise: Option<String>,
    pub cluster: Vec<String>,
    pub heartbeat_interval_ms: u64,
    pub node_ttl_ms: u64,
    pub max_origin_leases: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub id: NodeId,
    pub p2p_addr: SocketAddr,
    pub zone: Option<String>,
    pub version: String,
    pub upload_slots_free: u32,
    pub last_seen_ms_ago: u64,
    pub registered_ms_ago: u64,
    pub blobs_held: u64,
    pub blobs_complete: u64,
    pub leases: u64,
    pub traffic: Traffic,
    /// Current (decayed) failure blame; 0 is clean.
    pub blame: f64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobStatus {
    pub blob: BlobId,
    pub size: Option<u64>,
    pub piece_size: Option<u64>,
    pub pieces: u32,
    pub holders: u32,
    pub complete_holders: u32,
    /// How many per-piece hashes are known.
    pub piece_sha256_known: u32,
    pub leases: Vec<LeaseStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseStatus {
    pub holder: NodeId,
    pub age_ms: u64,
    pub last_progress_ms_ago: u64,
    pub expires_ms: u64,
}

// ---------------------------------------------------------------------------
// Several schedulers

/// The form of a scheduler address used for hashing: trimmed, lowercase,
/// without `http://` and trailing `/`. Nodes and schedulers must list the
/// schedulers by the same names (e.g. the same DNS name and port).
pub fn canonical_scheduler_addr(addr: &str) -> String {
    let a = addr.trim().to_ascii_lowercase();
    let a = a
        .strip_prefix("http://")
        .or_else(|| a.strip_prefix("https://"))
        .unwrap_or(&a);
    a.trim_end_matches('/').to_string()
}

/// Rendezvous weight of `blob` on scheduler `addr`: the first 8 bytes of
/// sha256(canonical addr ‖ 0 ‖ blob).
pub fn rendezvous_weight(blob: &BlobId, addr: &str) -> u64 {
    let mut h = sha2::Sha256::new();
    h.update(canonical_scheduler_addr(addr).as_bytes());
    h.update([0u8]);
    h.update(blob.to_string().as_bytes());
    let out = h.finalize();
    let mut w = [0u8; 8];
    w.copy_from_slice(&out[..8]);
    u64::from_be_bytes(w)
}

/// The scheduler that owns `blob` among `schedulers` (highest random
/// weight; ties, which need a hash collision, go to the greater address).
/// `None` only for an empty list.
pub fn pick_scheduler<'a, S: AsRef<str>>(blob: &BlobId, schedulers: &'a [S]) -> Option<&'a S> {
    schedulers.iter().max_by(|a, b| {
        let (a, b) = (a.as_ref(), b.as_ref());
        rendezvous_weight(blob, a)
            .cmp(&rendezvous_weight(blob, b))
            .then_with(|| canonical_scheduler_addr(a).cmp(&canonical_scheduler_addr(b)))
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::Digest;
    use proptest::prelude::*;

    fn blob(i: u32) -> BlobId {
        Digest::sha256(&i.to_le_bytes())
    }

    #[test]
    fn versions() {
        assert!(check_version("1").is_ok());
        assert!(check_version("1.7").is_ok());
        let e = check_version("2").err();
        assert_eq!(e.as_ref().map(|e| e.theirs.as_str()), Some("2"));
        let msg = e.map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("\"2\"") && msg.contains("speaks 1"), "{msg}");
        assert!(check_version("").is_err());
        assert!(check_version("x").is_err());
    }

    #[test]
    fn piece_bits_text() {
        let mut b = PieceBits::empty(10);
        assert_eq!(b.to_string(), "10:none");
        b.set(0);
        b.set(9);
        b.set(10); // ignored
        assert_eq!(b.count(), 2);
        assert_eq!(b.to_string(), "10:0102");
        assert_eq!("10:0102".parse::<PieceBits>(), Ok(b.clone()));
        assert_eq!(PieceBits::full(10).to_string(), "10:all");
        assert_eq!("10:all".parse::<PieceBits>(), Ok(PieceBits::full(10)));
        assert!(PieceBits::full(0).is_full());
        assert_eq!(PieceBits::full(0).to_string(), "0:none");
        assert_eq!(b.ones().collect::<Vec<_>>(), vec![0, 9]);
        assert!(matches!(
            "10:0104".parse::<PieceBits>(),
            Err(PieceBitsError::TrailingBits { len: 10 })
        ));
        assert!(matches!(
            "10:01".parse::<PieceBits>(),
            Err(PieceBitsError::BadLength { .. })
        ));
        assert!(matches!(
            "99999999999:all".parse::<PieceBits>(),
            Err(PieceBitsError::Syntax { .. })
        ));
        assert!(matches!(
            "2000000:all".parse::<PieceBits>(),
            Err(PieceBitsError::TooLong { .. })
        ));
        assert!("all".parse::<PieceBits>().is_err());
        assert!("+1:all".parse::<PieceBits>().is_err());
        assert_eq!(PieceBits::piece_count(10, 4), Some(3));
        assert_eq!(PieceBits::piece_count(0, 4), Some(0));
        assert_eq!(PieceBits::piece_count(10, 0), None);
        assert_eq!(PieceBits::piece_count(u64::MAX, 1), None);
    }

    #[test]
    fn messages_round_trip() {
        let node = NodeId::from_bytes([7; 32]);
        let req = AnnounceRequest {
            node: NodeAnnouncement {
                id: node,
                p2p_addr: "10.0.0.1:5062".parse().unwrap(),
                zone: Some("a".into()),
                upload_slots_free: 4,
                version: "0.1.0".into(),
            },
            full: true,
            blobs: vec![BlobAnnouncement {
                blob: blob(1),
                size: 10,
                piece_size: 4,
                have: PieceBits::full(3),
                piece_sha256: Some(vec![Some(PieceSha256::of(b"x")), None, None]),
                complete: true,
                origin_fetch: false,
                origin_bytes: 0,
                present_bytes: 10,
            }],
            removed: vec![blob(2)],
            traffic: Traffic::default(),
            job_progress: Vec::new(),
        };
        let json = serde_json::to_string(&req).unwrap();
        assert!(json.contains("\"have\":\"3:all\""), "{json}");
        assert_eq!(serde_json::from_str::<AnnounceRequest>(&json).unwrap(), req);
        // Minimal form: optional fields may be left out.
        let min = format!(r#"{{"node":{{"id":"{node}","p2p_addr":"[::1]:1"}},"blobs":[]}}"#);
        let parsed: AnnounceRequest = serde_json::from_str(&min).unwrap();
        assert!(!parsed.full);
        let reason: FailureReason = serde_json::from_str("\"bad_piece\"").unwrap();
        assert_eq!(reason, FailureReason::BadPiece);
        let code: ErrorCode = serde_json::from_str("\"something_new\"").unwrap();
        assert_eq!(code, ErrorCode::Other);
    }

    #[test]
    fn canonical_addresses() {
        assert_eq!(
            canonical_scheduler_addr(" HTTP://Sched-1:5060/ "),
            "sched-1:5060"
        );
        assert_eq!(
            rendezvous_weight(&blob(1), "http://s1:5060"),
            rendezvous_weight(&blob(1), "s1:5060")
        );
        assert_eq!(pick_scheduler::<&str>(&blob(1), &[]), None);
    }

    proptest! {
        #[test]
        fn piece_bits_never_panic(s in ".{0,64}") {
            let _ = s.parse::<PieceBits>();
        }

        #[test]
        fn piece_bits_round_trip(len in 0u32..200, ones in proptest::collection::vec(any::<u32>(), 0..50)) {
            let mut b = PieceBits::empty(len);
            for i in ones { b.set(i % len.max(1)); }
            let parsed: PieceBits = b.to_string().parse().unwrap();
            prop_assert_eq!(parsed, b);
        }

        /// Removing one scheduler moves exactly the blobs it owned; every
        /// other blob stays where it was. Adding one moves blobs only onto it.
        #[test]
        fn rendezvous_is_minimal(n in 2usize..8, gone in 0usize..8, blobs in proptest::collection::vec(any::<u32>(), 1..100)) {
            let all: Vec<String> = (0..n).map(|i| format!("sched-{i}:5060")).collect();
            let gone = gone % n;
            let rest: Vec<String> = all.iter().enumerate().filter(|(i, _)| *i != gone).map(|(_, s)| s.clone()).collect();
            for b in blobs.into_iter().map(blob) {
                let before = pick_scheduler(&b, &all).unwrap();
                let after = pick_scheduler(&b, &rest).unwrap();
                if *before != all[gone] {
                    prop_assert_eq!(before, after);
                } else {
                    prop_assert_ne!(after, &all[gone]);
                }
                // Order of the list does not matter.
                let mut rev = all.clone();
                rev.reverse();
                prop_assert_eq!(pick_scheduler(&b, &rev).unwrap(), before);
            }
        }
    }

    #[test]
    fn rendezvous_spreads() {
        let all: Vec<String> = (0..4).map(|i| format!("sched-{i}:5060")).collect();
        let mut counts = [0u32; 4];
        for i in 0..4000 {
            let s = pick_scheduler(&blob(i), &all).unwrap();
            let idx = all.iter().position(|a| a == s).unwrap();
            counts[idx] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "{counts:?}");
        }
    }
}
