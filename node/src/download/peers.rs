//! Filling a download from peers: scheduler-guided piece swarming, and the
//! DHT fallback.
//!
//! Scheduler mode: ask the blob's scheduler for parents (wanting the
//! lease); with holders and a piece list, keep up to `fetch_window` pieces
//! in flight from the least-loaded holders that have them, consume them in
//! order, verify each against its SHA-256 from the list, write, commit every
//! few MiB (which makes them servable to others and announced), and show
//! them to readers. A piece that is not held by anyone yet, or whose hash
//! is not known yet, ends the round: ask again shortly (the lease holder is
//! still fetching it). A failing peer ends the round and is avoided for
//! this download (blamed at the scheduler for bad bytes or stalls).
//!
//! DHT mode (no scheduler answers): complete holders from the DHT, whose
//! bytes are written but neither committed nor shown until the whole blob
//! matched its digest.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::time::{Duration, Instant};

use futures::stream::{FuturesOrdered, StreamExt as _};
use shoal_proto::sched::{FailureReason, ParentsResponse, PieceSha256};
use shoal_proto::{BlobId, NodeId};

use super::{ensure_sink, uncommitted, write, Download, DownloadError, Fill, Inner};
use crate::p2p::{FetchError, P2pHandle};
use crate::peering::Peering;
use crate::store::pieces::{piece_count, piece_range, piece_size};

/// Commit (and announce) at least this often while fetching from peers.
const COMMIT_EVERY: u64 = 2 << 20;
/// Wait between two parents requests when no progress was possible.
const POLL: Duration = Duration::from_millis(200);
/// A peer that failed us is not asked again by this download for this long
/// (bad bytes: for the rest of the download).
const AVOID: Duration = Duration::from_secs(10);
/// Bytes asked of a DHT provider at once.
const DHT_REQUEST: u64 = 4 << 20;

/// How peers left a download.
pub(super) enum Outcome {
    /// Every byte is written; the whole-blob check follows.
    Done,
    /// This node holds the origin lease: fetch the rest from the origin.
    Lease,
    /// No peer can help (why, for the log).
    Origin(&'static str),
    /// Ask the scheduler again (it answers again after an outage).
    Again,
}

/// Peers this download does not ask again (until the instant), and those
/// that refused the membership handshake.
#[derive(Default)]
struct Avoid(HashMap<NodeId, Instant>, std::collections::HashSet<NodeId>);

impl Avoid {
    fn refuse(&mut self, peer: NodeId) {
        self.forever(peer);
        self.1.insert(peer);
    }

    fn refused(&self, peer: &NodeId) -> bool {
        self.1.contains(peer)
    }

    fn add(&mut self, peer: NodeId, for_: Duration) {
        self.0.insert(peer, Instant::now() + for_);
    }

    fn forever(&mut self, peer: NodeId) {
        self.add(peer, Duration::from_secs(24 * 3600));
    }

    fn has(&self, peer: &NodeId) -> bool {
        self.0.get(peer).is_some_and(|t| *t > Instant::now())
    }
}

pub(super) async fn fill(
    inner: &Inner,
    peering: &Peering,
    d: &Download,
    f: &mut Fill,
) -> Result<Outcome, DownloadError> {
    let id = &d.id;
    let mut avoid = Avoid::default();
    let mut last_progress = Instant::now();
    loop {
        if inner.cancel.is_cancelled() {
            return Err(DownloadError::Shutdown);
        }
        let Some(view) = peering.parents(id, f.size, true).await else {
            return dht_fill(inner, peering, d, f, &mut avoid).await;
        };
        if view.lease.as_ref().is_some_and(|l| l.granted_to_you) {
            return Ok(Outcome::Lease);
        }
        let mut progressed = false;
        match (view.size, view.piece_size) {
            (Some(size), Some(piece)) => {
                if piece != piece_size(size) || f.size.is_some_and(|s| s != size) {
                    tracing::warn!(size, piece, "peers disagree on the blob's geometry");
                    return Ok(Outcome::Origin("peer_geometry"));
                }
                if !view.holders.is_empty() {
                    ensure_sink(inner, d, f, size).await?;
                    progressed = pieces(inner, peering, d, f, &view, size, &mut avoid).await?;
                    if !progressed && view.holders.iter().all(|h| avoid.refused(&h.node)) {
                        // Every holder refuses our join proof (or we theirs):
                        // this node is not in their cluster, waiting will not
                        // help.
                        tracing::warn!("every holder refused the membership handshake (different join secret?)");
                        return Ok(Outcome::Origin("membership_refused"));
                    }
                }
                if f.pos >= size {
                    return Ok(Outcome::Done);
                }
            }
            _ if view.holders.is_empty()
                && view.lease.is_none()
                && view.retry_after_ms.is_none() =>
            {
                // Nobody holds it, nobody fetches it, and we were not given
                // the lease: the scheduler cannot help.
                return Ok(Outcome::Origin("no_holder_no_lease"));
            }
            _ => {}
        }
        if progressed {
            last_progress = Instant::now();
            continue;
        }
        if last_progress.elapsed() > peering.stall_timeout() {
            return Ok(Outcome::Origin("peers_stalled"));
        }
        let wait = view
            .retry_after_ms
            .map_or(POLL, |ms| Duration::from_millis(ms.clamp(50, 2000)));
        tokio::select! {
            _ = inner.cancel.cancelled() => return Err(DownloadError::Shutdown),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// A piece fetched from a peer, not yet verified.
struct Fetched {
    index: u64,
    peer: NodeId,
    range: Range<u64>,
    bytes: Result<Vec<u8>, FetchError>,
    /// Whether the bytes hash to the piece's hash (checked where they were fetched).
    matches: Result<bool, DownloadError>,
}

/// One round of piece fetching with the holders of `view`. Returns whether
/// any piece was written.
async fn pieces(
    inner: &Inner,
    peering: &Peering,
    d: &Download,
    f: &mut Fill,
    view: &ParentsResponse,
    size: u64,
    avoid: &mut Avoid,
) -> Result<bool, DownloadError> {
    let id = &d.id;
    let piece = piece_size(size);
    let count = piece_count(size, piece);
    let no_hashes = Vec::new();
    let hashes = view.piece_sha256.as_ref().unwrap_or(&no_hashes);
    let p2p = peering.p2p().clone();
    let window = peering.fetch_window();
    let mut load: HashMap<NodeId, usize> = HashMap::new();
    let mut inflight = FuturesOrdered::new();
    let mut next = f.pos / piece;
    let mut progressed = false;
    loop {
        while inflight.len() < window && next < count {
            let Some(hash) = hashes.get(next as usize).copied().flatten() else {
                break;
            };
            let Ok(i) = u32::try_from(next) else { break };
            let pick = view
                .holders
                .iter()
                .enumerate()
                .filter(|(_, h)| h.have.get(i) && !avoid.has(&h.node))
                .min_by_key(|(rank, h)| (load.get(&h.node).copied().unwrap_or(0), *rank))
                .map(|(_, h)| (h.node, h.p2p_addr));
            let Some((peer, addr)) = pick else { break };
            *load.entry(peer).or_default() += 1;
            let range = piece_range(next, piece, size);
            inflight.push_back(fetch_piece(
                p2p.clone(),
                peer,
                addr,
                id.clone(),
                next,
                range,
                hash,
            ));
            next += 1;
        }
        let Some(got) = (tokio::select! {
            g = inflight.next() => g,
            _ = inner.cancel.cancelled() => return Err(DownloadError::Shutdown),
        }) else {
            break;
        };
        if let Some(l) = load.get_mut(&got.peer) {
            *l = l.saturating_sub(1);
        }
        let bytes = match got.bytes {
            Ok(b) => b,
            Err(e) => {
                let reason = match &e {
                    FetchError::Timeout { .. } => Some(FailureReason::Stalled),
                    FetchError::NotPresent { .. }
                    | FetchError::NotFound { .. }
                    | FetchError::Busy { .. } => None,
                    _ => Some(FailureReason::Unreachable),
                };
                tracing::debug!(peer = %got.peer.short(), piece = got.index, error = %e, "piece fetch failed");
                if matches!(e, FetchError::NotMember { .. }) {
                    // Not a matter of the peer's health: one side lacks the
                    // other's join secret. Nobody to blame.
                    avoid.refuse(got.peer);
                    break;
                }
                avoid.add(got.peer, if reason.is_some() { AVOID } else { POLL * 5 });
                if let Some(r) = reason {
                    peering.blame(id, got.peer, r);
                }
                break;
            }
        };
        if !got.matches? {
            tracing::warn!(peer = %got.peer, piece = got.index, "piece from peer does not match its hash; peer blamed and avoided");
            inner.metrics.bad_pieces.inc();
            avoid.forever(got.peer);
            peering.blame(id, got.peer, FailureReason::BadPiece);
            break;
        }
        // Verified. Write what lies past the contiguous prefix (a resumed
        // prefix may end inside this piece).
        let skip = f.pos.saturating_sub(got.range.start) as usize;
        if skip >= bytes.len() {
            continue;
        }
        let mut bytes = bytes;
        let data = bytes.split_off(skip);
        inner.metrics.from_peers("blob", data.len() as u64);
        f.from_peers = true;
        let commit = uncommitted(f) + data.len() as u64 >= COMMIT_EVERY || got.range.end == size;
        write(f, data, commit).await?;
        f.expose(d);
        progressed = true;
        if commit {
            peering.changed(id);
        }
    }
    if uncommitted(f) > 0 {
        write(f, Vec::new(), true).await?;
        peering.changed(id);
    }
    Ok(progressed)
}

async fn fetch_piece(
    p2p: P2pHandle,
    peer: NodeId,
    addr: SocketAddr,
    blob: BlobId,
    index: u64,
    range: Range<u64>,
    hash: PieceSha256,
) -> Fetched {
    let len = range.end - range.start;
    let (bytes, matches) = match p2p.fetch_exact(peer, addr, &blob, range.start, len).await {
        // Hashed on the ingest threads, the pieces in flight side by side.
        Ok(b) => match super::blocking(move || {
            let matches = PieceSha256::of(&b) == hash;
            (b, matches)
        })
        .await
        {
            Ok((b, matches)) => (Ok(b), Ok(matches)),
            Err(e) => (Ok(Vec::new()), Err(e)),
        },
        Err(e) => (Err(e), Ok(false)),
    };
    Fetched {
        index,
        peer,
        range,
        bytes,
        matches,
    }
}

/// No scheduler answered: holders from the DHT (complete ones, and nodes
/// fetching the blob from the origin, followed as they progress), bytes held
/// back until the whole blob is verified.
async fn dht_fill(
    inner: &Inner,
    peering: &Peering,
    d: &Download,
    f: &mut Fill,
    avoid: &mut Avoid,
) -> Result<Outcome, DownloadError> {
    let id = &d.id;
    let providers = peering.providers(id).await;
    if providers.is_empty() {
        return Ok(Outcome::Origin(if peering.has_schedulers() {
            "no_scheduler_no_provider"
        } else {
            "no_provider"
        }));
    }
    inner.metrics.decision("dht");
    let p2p = peering.p2p().clone();
    for p in providers {
        if avoid.has(&p.node) {
            continue;
        }
        let mut last_progress = Instant::now();
        loop {
            let map = match p2p.have(p.node, p.quic_addr, id).await {
                Ok(Some(m)) if f.size.is_none_or(|s| s == m.size) => m,
                Ok(_) => break,
                Err(e) => {
                    tracing::debug!(peer = %p.node.short(), error = %e, "DHT provider unreachable");
                    avoid.add(p.node, AVOID);
                    break;
                }
            };
            let size = map.size;
            if map.piece_size != piece_size(size) {
                break;
            }
            ensure_sink(inner, d, f, size).await?;
            if !f.held_back {
                f.held_back = true;
                tracing::info!(peer = %p.node.short(), size, complete = map.complete, "fetching from a DHT provider (held back until verified)");
            }
            // What the provider holds contiguously from our position.
            let held_to = if map.complete {
                size
            } else {
                let mut i = f.pos / map.piece_size;
                while map.has(i) {
                    i += 1;
                }
                (i * map.piece_size).min(size)
            };
            let before = f.pos;
            while f.pos < held_to {
                let len = (held_to - f.pos).min(DHT_REQUEST);
                let got = tokio::select! {
                    g = p2p.fetch_exact(p.node, p.quic_addr, id, f.pos, len) => g,
                    _ = inner.cancel.cancelled() => return Err(DownloadError::Shutdown),
                };
                match got {
                    Ok(bytes) => {
                        inner.metrics.from_peers("blob", bytes.len() as u64);
                        f.from_peers = true;
                        // Not committed: nothing unverified becomes servable.
                        write(f, bytes, false).await?;
                    }
                    Err(e) => {
                        tracing::debug!(peer = %p.node.short(), error = %e, "DHT provider failed");
                        avoid.add(p.node, AVOID);
                        break;
                    }
                }
            }
            if f.pos >= size {
                return Ok(Outcome::Done);
            }
            if avoid.has(&p.node) {
                break;
            }
            if f.pos > before {
                last_progress = Instant::now();
            } else if last_progress.elapsed() > peering.stall_timeout() {
                break;
            }
            // The provider is still fetching: follow it.
            tokio::select! {
                _ = inner.cancel.cancelled() => return Err(DownloadError::Shutdown),
                _ = tokio::time::sleep(POLL) => {}
            }
            // The scheduler may be back: prefer it (and its piece hashes).
            if peering.has_schedulers() && peering.parents(id, f.size, false).await.is_some() {
                return Ok(Outcome::Again);
            }
        }
    }
    Ok(Outcome::Origin("dht_providers_failed"))
}
