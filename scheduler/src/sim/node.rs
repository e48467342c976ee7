//! A simulated node: its announce loop and one download per blob, after
//! `node/src/peering.rs` (announce loop) and `node/src/download.rs`,
//! `download/peers.rs`, `download/origin.rs` (fetch logic).
//!
//! Announce loop: full to a replica at start and after `resync`, deltas of
//! the blobs changed since the last round otherwise; the next round is a
//! heartbeat later, or 150 ms after the first commit since the last round (a
//! commit during those 150 ms leaves a permit that triggers one more round
//! 150 ms after it, like `tokio::sync::Notify`).
//!
//! Download: ask for parents with `want_lease`; a granted lease → fetch the
//! rest from the origin in 2 MiB commits, each announced soon (stop at the
//! next commit once told the lease is revoked, then back to peers); holders
//! → a round: up to `fetch_window` pieces in flight, piece `i` from the
//! least-loaded (in this round) ranked holder that has it and is not
//! avoided, consumed in order; a round ends when nothing more can be asked
//! and nothing is in flight, or at the first failure (the rest is dropped).
//! After a round with progress ask again at once, else 200 ms later (or
//! `retry_after_ms`); after `stall_timeout` without progress, or when
//! nobody holds the blob and nobody has the lease, fetch from the origin
//! without a lease (announced only when complete).
//!
//! Invariants: pieces `0..pos` are written and `0..committed` announced
//! (`committed <= pos`), in order; a download's `gen` changes whenever its
//! round or wait ends, so stale timer events are ignored.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use shoal_proto::sched::{
    AnnounceRequest, BlobAnnouncement, FailureReason, NodeAnnouncement, ParentsResponse, PieceBits,
    PieceHashes, Traffic,
};
use shoal_proto::NodeId;

use super::net::Src;
use super::{Ev, World};

/// Announcements triggered by commits wait this long (node `DEBOUNCE`).
const DEBOUNCE_MS: u64 = 150;
/// Wait between parents requests without progress (node `POLL`).
const POLL_MS: u64 = 200;
/// A peer that failed is avoided this long (node `AVOID`); `Busy` and
/// not-present answers for `5 × POLL`.
const AVOID_MS: u64 = 10_000;
const AVOID_BUSY_MS: u64 = 5 * POLL_MS;
/// A peer that sent a bad piece is avoided for the rest of the download.
const AVOID_FOREVER: u64 = u64::MAX;
/// Bytes between commits while fetching (node `COMMIT_EVERY_SHARED`).
const COMMIT_BYTES: u64 = 2 << 20;

pub(super) struct Node {
    pub id: NodeId,
    addr: SocketAddr,
    zone: u32,
    liar: bool,
    pub start_ms: u64,
    pub gone: bool,
    /// Leave when half of the first blob is fetched under its lease.
    pub leave_at_half: bool,
    dls: Vec<Dl>,
    needs_full: Vec<bool>,
    heartbeat_ms: u64,
    announce_gen: u64,
    announce_at: u64,
    wake_armed: bool,
    permit: bool,
    /// Blobs (bits) changed since the last round.
    dirty: u64,
    /// Blobs whose piece hashes a replica asked for.
    hashes_wanted: u64,
    pub last_announce_ms: Option<u64>,
    traffic: Traffic,
    pub done_ms: Option<u64>,
}

#[derive(Default)]
struct Dl {
    mode: Mode,
    pos: u32,
    committed: u32,
    /// The store has a record of it (announced in full announcements).
    in_store: bool,
    round: Option<Round>,
    gen: u64,
    avoid: Vec<(u32, u64)>,
    last_progress_ms: u64,
    leased: bool,
    revoked: bool,
    lease_bytes: u64,
    origin_flow: Option<u32>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Mode {
    #[default]
    Idle,
    Peers,
    Origin {
        lease: bool,
    },
    Done,
}

/// One round of piece fetching from one parents answer.
struct Round {
    holders: Vec<(u32, PieceBits)>,
    load: Vec<u32>,
    hashes: Option<PieceHashes>,
    retry_after_ms: Option<u64>,
    queue: VecDeque<Inflight>,
    next: u32,
    progressed: bool,
}

struct Inflight {
    piece: u32,
    peer: u32,
    st: InSt,
}

enum InSt {
    Flow(u32),
    /// Arrived; `bad`: it does not match its hash.
    Arrived {
        bad: bool,
        bytes: u64,
    },
    /// Fails at `at`: blame `reason` (if any), avoid for `avoid_ms`.
    Fail {
        at: u64,
        reason: Option<FailureReason>,
        avoid_ms: u64,
    },
}

impl Node {
    pub fn new(
        id: NodeId,
        index: u32,
        zone: u32,
        liar: bool,
        start_ms: u64,
        schedulers: usize,
        blobs: usize,
    ) -> Self {
        let [_, a, b, c] = index.to_be_bytes();
        Self {
            id,
            addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, a, b, c)), 5062),
            zone,
            liar,
            start_ms,
            gone: false,
            leave_at_half: false,
            dls: (0..blobs).map(|_| Dl::default()).collect(),
            needs_full: vec![true; schedulers],
            heartbeat_ms: 2_000,
            announce_gen: 0,
            announce_at: u64::MAX,
            wake_armed: false,
            permit: false,
            dirty: 0,
            hashes_wanted: 0,
            last_announce_ms: None,
            traffic: Traffic::default(),
            done_ms: None,
        }
    }

    /// It fetches a blob from the origin under a lease.
    pub fn holds_lease(&self) -> bool {
        self.dls.iter().any(|d| d.leased)
    }

    pub fn announce_due(&self, gen: u64) -> bool {
        !self.gone && gen == self.announce_gen
    }

    pub fn poll_due(&self, b: u32, gen: u64) -> bool {
        let dl = &self.dls[b as usize];
        !self.gone && dl.gen == gen && dl.mode == Mode::Peers && dl.round.is_none()
    }

    pub fn check_due(&self, b: u32, gen: u64) -> bool {
        let dl = &self.dls[b as usize];
        !self.gone && dl.gen == gen && dl.round.is_some()
    }
}

impl World {
    pub(super) fn start_node(&mut self, n: u32) {
        let node = &mut self.nodes[n as usize];
        if node.gone {
            return;
        }
        self.announce(n);
        for b in 0..self.blobs.len() as u32 {
            let dl = &mut self.nodes[n as usize].dls[b as usize];
            dl.mode = Mode::Peers;
            dl.last_progress_ms = self.now;
            self.ask_parents(n, b);
        }
    }

    // -- announce loop ----------------------------------------------------

    /// A commit (or completion): announce the blob soon.
    fn changed(&mut self, n: u32, b: u32) {
        let now = self.now;
        let node = &mut self.nodes[n as usize];
        node.dirty |= 1 << b;
        if node.wake_armed {
            node.permit = true;
            return;
        }
        node.wake_armed = true;
        let at = now + DEBOUNCE_MS;
        if at < node.announce_at {
            self.set_announce(n, at);
        }
    }

    fn set_announce(&mut self, n: u32, at: u64) {
        let node = &mut self.nodes[n as usize];
        node.announce_gen += 1;
        node.announce_at = at;
        let gen = node.announce_gen;
        self.schedule(at, Ev::Announce(n, gen));
    }

    /// One announce round: to every replica, full where it needs one.
    pub(super) fn announce(&mut self, n: u32) {
        let now = self.now;
        let node = &mut self.nodes[n as usize];
        node.wake_armed = false;
        let dirty = std::mem::take(&mut node.dirty);
        let wanted = std::mem::take(&mut node.hashes_wanted);
        let any_full = node.needs_full.iter().any(|f| *f);
        let info = NodeAnnouncement {
            id: node.id,
            p2p_addr: node.addr,
            zone: Some(self.zone_names[node.zone as usize].clone()),
            upload_slots_free: self.cfg.upload_slots.saturating_sub(self.net.uploads(n)),
            version: "sim".into(),
        };
        let traffic = node.traffic;
        let held: Vec<u32> = (0..self.blobs.len() as u32)
            .filter(|&b| node.dls[b as usize].in_store)
            .collect();
        let delta: Vec<BlobAnnouncement> = held
            .iter()
            .filter(|&&b| dirty & (1 << b) != 0)
            .map(|&b| self.blob_announcement(n, b, wanted, true))
            .collect();
        let full: Vec<BlobAnnouncement> = if any_full {
            held.iter()
                .map(|&b| self.blob_announcement(n, b, wanted, false))
                .collect()
        } else {
            Vec::new()
        };
        for s in 0..self.scheds.len() {
            let full_now = self.nodes[n as usize].needs_full[s];
            let req = AnnounceRequest {
                node: info.clone(),
                full: full_now,
                blobs: if full_now {
                    full.clone()
                } else {
                    delta.clone()
                },
                removed: Vec::new(),
                traffic,
                job_progress: Vec::new(),
            };
            let t = std::time::Instant::now();
            let resp = self.scheds[s].announce(req, now);
            self.report.announce_cpu += t.elapsed();
            self.report.announces += 1;
            self.drain_events(s);
            let node = &mut self.nodes[n as usize];
            node.needs_full[s] = resp.resync;
            if resp.heartbeat_interval_ms > 0 {
                node.heartbeat_ms = resp.heartbeat_interval_ms.clamp(100, 60_000);
            }
            for blob in &resp.leases_revoked {
                if let Some(&b) = self.blob_index.get(blob) {
                    let dl = &mut node.dls[b as usize];
                    if dl.leased {
                        dl.revoked = true;
                    }
                }
            }
            for blob in &resp.piece_sha256_wanted {
                if let Some(&b) = self.blob_index.get(blob) {
                    node.dirty |= 1 << b;
                    node.hashes_wanted |= 1 << b;
                }
            }
        }
        let node = &mut self.nodes[n as usize];
        node.last_announce_ms = Some(now);
        let next = if node.needs_full.iter().any(|f| *f) {
            now + node.heartbeat_ms
        } else if std::mem::take(&mut node.permit) {
            node.wake_armed = true;
            now + DEBOUNCE_MS
        } else {
            now + node.heartbeat_ms
        };
        self.set_announce(n, next);
    }

    fn blob_announcement(&self, n: u32, b: u32, wanted: u64, delta: bool) -> BlobAnnouncement {
        let blob = &self.blobs[b as usize];
        let dl = &self.nodes[n as usize].dls[b as usize];
        let complete = dl.mode == Mode::Done;
        let held = if complete { blob.pieces } else { dl.committed };
        let with_hashes = dl.leased || (complete && delta) || wanted & (1 << b) != 0;
        BlobAnnouncement {
            blob: blob.id.clone(),
            size: blob.size,
            piece_size: blob.piece_size,
            have: blob.prefix[held as usize].clone(),
            piece_sha256: with_hashes.then(|| {
                (0..blob.pieces)
                    .map(|i| (i < held).then_some(blob.hashes[i as usize]))
                    .collect()
            }),
            complete,
            origin_fetch: dl.leased,
            origin_bytes: if dl.leased { dl.lease_bytes } else { 0 },
            present_bytes: blob.range_bytes(0, held),
        }
    }

    // -- download ---------------------------------------------------------

    pub(super) fn ask_parents(&mut self, n: u32, b: u32) {
        let Some(resp) = self.call_parents(n, b) else {
            self.no_progress(n, b, None);
            return;
        };
        if resp.lease.as_ref().is_some_and(|l| l.granted_to_you) {
            self.begin_origin(n, b, true, "lease");
            return;
        }
        let blob = &self.blobs[b as usize];
        match (resp.size, resp.piece_size) {
            (Some(size), Some(piece)) => {
                if piece != blob.piece_size || size != blob.size {
                    self.begin_origin(n, b, false, "peer_geometry");
                    return;
                }
                if !resp.holders.is_empty() {
                    self.begin_round(n, b, resp);
                    return;
                }
            }
            _ if resp.holders.is_empty()
                && resp.lease.is_none()
                && resp.retry_after_ms.is_none() =>
            {
                self.begin_origin(n, b, false, "no_holder_no_lease");
                return;
            }
            _ => {}
        }
        self.no_progress(n, b, resp.retry_after_ms);
    }

    /// Nothing fetched this time: wait and ask again, or give up on peers.
    fn no_progress(&mut self, n: u32, b: u32, retry_after_ms: Option<u64>) {
        let now = self.now;
        let dl = &mut self.nodes[n as usize].dls[b as usize];
        if now.saturating_sub(dl.last_progress_ms) > self.cfg.stall_timeout_ms {
            self.begin_origin(n, b, false, "peers_stalled");
            return;
        }
        dl.gen += 1;
        let gen = dl.gen;
        let wait = retry_after_ms.map_or(POLL_MS, |ms| ms.clamp(50, 2_000));
        self.schedule(now + wait, Ev::Poll(n, b, gen));
    }

    fn begin_round(&mut self, n: u32, b: u32, resp: ParentsResponse) {
        let holders: Vec<(u32, PieceBits)> = resp
            .holders
            .into_iter()
            .filter_map(|h| self.ids.get(&h.node).map(|&i| (i, h.have)))
            .collect();
        let dl = &mut self.nodes[n as usize].dls[b as usize];
        dl.in_store = true;
        dl.gen += 1;
        dl.round = Some(Round {
            load: vec![0; holders.len()],
            holders,
            hashes: resp.piece_sha256,
            retry_after_ms: resp.retry_after_ms,
            queue: VecDeque::new(),
            next: dl.pos,
            progressed: false,
        });
        self.advance(n, b);
    }

    /// Ask for more pieces, consume what arrived in order, end the round
    /// when it is over.
    pub(super) fn advance(&mut self, n: u32, b: u32) {
        loop {
            self.feed(n, b);
            let now = self.now;
            let dl = &mut self.nodes[n as usize].dls[b as usize];
            let Some(round) = dl.round.as_mut() else {
                return;
            };
            let Some(head) = round.queue.front() else {
                self.end_round(n, b);
                return;
            };
            match head.st {
                InSt::Flow(_) => return,
                InSt::Fail { at, .. } if at > now => return,
                InSt::Fail {
                    reason, avoid_ms, ..
                } => {
                    let peer = head.peer;
                    dl.avoid.retain(|&(p, until)| until > now && p != peer);
                    dl.avoid.push((peer, now.saturating_add(avoid_ms)));
                    if let Some(r) = reason {
                        self.call_failure(n, b, peer, r);
                    }
                    self.end_round(n, b);
                    return;
                }
                InSt::Arrived { bad: true, .. } => {
                    let peer = head.peer;
                    dl.avoid.retain(|&(p, until)| until > now && p != peer);
                    dl.avoid.push((peer, AVOID_FOREVER));
                    self.call_failure(n, b, peer, FailureReason::BadPiece);
                    self.end_round(n, b);
                    return;
                }
                InSt::Arrived { bad: false, bytes } => {
                    let piece = head.piece;
                    round.queue.pop_front();
                    round.progressed = true;
                    debug_assert_eq!(piece, dl.pos, "pieces are consumed in order");
                    dl.pos = piece + 1;
                    let pos = dl.pos;
                    let uncommitted = self.blobs[b as usize].range_bytes(dl.committed, pos);
                    self.nodes[n as usize].traffic.from_peers += bytes;
                    if uncommitted >= COMMIT_BYTES || pos == self.blobs[b as usize].pieces {
                        self.commit(n, b);
                    }
                }
            }
        }
    }

    /// Start fetches until the window is full or the next piece cannot be
    /// asked for (hash unknown, nobody has it).
    fn feed(&mut self, n: u32, b: u32) {
        let now = self.now;
        let window = self.cfg.fetch_window;
        let blob = &self.blobs[b as usize];
        let pieces = blob.pieces;
        loop {
            let node = &self.nodes[n as usize];
            let dl = &node.dls[b as usize];
            let Some(round) = dl.round.as_ref() else {
                return;
            };
            if round.queue.len() >= window || round.next >= pieces {
                return;
            }
            let next = round.next;
            let hash_known = round
                .hashes
                .as_ref()
                .and_then(|h| h.get(next as usize))
                .is_some_and(Option::is_some);
            if !hash_known {
                return;
            }
            let avoided = |p: u32| dl.avoid.iter().any(|&(a, until)| a == p && until > now);
            let pick = round
                .holders
                .iter()
                .enumerate()
                .filter(|(_, (p, have))| have.get(next) && !avoided(*p))
                .min_by_key(|(rank, _)| (round.load[*rank], *rank))
                .map(|(rank, (p, _))| (rank, *p));
            let Some((rank, peer)) = pick else {
                return;
            };
            let zone = node.zone;
            let st = if self.nodes[peer as usize].gone {
                let at = now + self.cfg.dead_peer_ms;
                let gen = self.nodes[n as usize].dls[b as usize].gen;
                self.schedule(at, Ev::Check(n, b, gen));
                InSt::Fail {
                    at,
                    reason: Some(FailureReason::Unreachable),
                    avoid_ms: AVOID_MS,
                }
            } else if self.net.uploads(peer) >= self.cfg.upload_slots {
                InSt::Fail {
                    at: now,
                    reason: None,
                    avoid_ms: AVOID_BUSY_MS,
                }
            } else {
                let cross = self.nodes[peer as usize].zone != zone;
                let bytes = self.blobs[b as usize].piece_bytes(next);
                InSt::Flow(self.net.start(Src::Peer(peer), n, b, next, bytes, cross))
            };
            let Some(round) = self.nodes[n as usize].dls[b as usize].round.as_mut() else {
                return;
            };
            round.load[rank] += 1;
            round.next += 1;
            round.queue.push_back(Inflight {
                piece: next,
                peer,
                st,
            });
        }
    }

    fn commit(&mut self, n: u32, b: u32) {
        let dl = &mut self.nodes[n as usize].dls[b as usize];
        if dl.pos > dl.committed {
            dl.committed = dl.pos;
            self.changed(n, b);
        }
    }

    /// The round is over: drop what is in flight, commit, decide what next.
    fn end_round(&mut self, n: u32, b: u32) {
        let dl = &mut self.nodes[n as usize].dls[b as usize];
        let Some(round) = dl.round.take() else {
            return;
        };
        dl.gen += 1;
        for f in &round.queue {
            if let InSt::Flow(id) = f.st {
                if let Some(flow) = self.net.end(id) {
                    self.report.peer_bytes += flow.moved();
                }
            }
        }
        self.commit(n, b);
        let dl = &mut self.nodes[n as usize].dls[b as usize];
        if dl.pos >= self.blobs[b as usize].pieces {
            self.complete(n, b);
        } else if round.progressed {
            dl.last_progress_ms = self.now;
            self.ask_parents(n, b);
        } else {
            self.no_progress(n, b, round.retry_after_ms);
        }
    }

    fn begin_origin(&mut self, n: u32, b: u32, lease: bool, why: &'static str) {
        let dl = &mut self.nodes[n as usize].dls[b as usize];
        dl.mode = Mode::Origin { lease };
        dl.in_store = true;
        dl.gen += 1;
        if lease {
            dl.leased = true;
            dl.revoked = false;
            dl.lease_bytes = 0;
            self.nodes[n as usize].dirty |= 1 << b;
            let f = &mut self.fetchers[b as usize];
            *f += 1;
            self.report.max_lease_fetchers_per_blob =
                self.report.max_lease_fetchers_per_blob.max(*f);
        } else {
            *self.report.origin_fallbacks.entry(why).or_default() += 1;
        }
        self.origin_chunk(n, b, 0);
    }

    /// Fetch the next commit's worth from the origin (`credit`: bytes the
    /// previous chunk overshot within its last step).
    fn origin_chunk(&mut self, n: u32, b: u32, credit: u64) {
        let blob = &self.blobs[b as usize];
        let per_chunk = (COMMIT_BYTES / blob.piece_size).max(1) as u32;
        let dl = &self.nodes[n as usize].dls[b as usize];
        let end = (dl.pos + per_chunk).min(blob.pieces);
        let bytes = blob.range_bytes(dl.pos, end);
        let id = self.net.start(Src::Origin, n, b, dl.pos, bytes, false);
        self.net.credit(id, credit);
        self.nodes[n as usize].dls[b as usize].origin_flow = Some(id);
    }

    fn origin_done(&mut self, n: u32, b: u32, bytes: u64, first: u32, overshoot: u64) {
        self.report.origin_bytes += bytes;
        let blob = &self.blobs[b as usize];
        let pieces = blob.pieces;
        let per_chunk = (COMMIT_BYTES / blob.piece_size).max(1) as u32;
        let node = &mut self.nodes[n as usize];
        node.traffic.from_origin += bytes;
        let dl = &mut node.dls[b as usize];
        dl.origin_flow = None;
        dl.pos = (first + per_chunk).min(pieces);
        let lease = dl.mode == (Mode::Origin { lease: true });
        if lease {
            dl.lease_bytes += bytes;
            self.commit(n, b);
        } else {
            dl.committed = dl.pos;
        }
        let dl = &self.nodes[n as usize].dls[b as usize];
        let (pos, revoked) = (dl.pos, dl.revoked);
        if pos >= pieces {
            self.complete(n, b);
        } else if lease && revoked {
            self.lease_ended(n, b);
            let dl = &mut self.nodes[n as usize].dls[b as usize];
            dl.mode = Mode::Peers;
            dl.last_progress_ms = self.now;
            self.ask_parents(n, b);
        } else {
            self.origin_chunk(n, b, overshoot);
        }
        if b == 0 && lease && self.nodes[n as usize].leave_at_half && pos >= pieces / 2 {
            self.leave(n);
        }
    }

    fn lease_ended(&mut self, n: u32, b: u32) {
        let dl = &mut self.nodes[n as usize].dls[b as usize];
        if dl.leased {
            dl.leased = false;
            dl.revoked = false;
            dl.lease_bytes = 0;
            let f = &mut self.fetchers[b as usize];
            *f = f.saturating_sub(1);
            self.nodes[n as usize].dirty |= 1 << b;
        }
    }

    fn complete(&mut self, n: u32, b: u32) {
        self.lease_ended(n, b);
        let dl = &mut self.nodes[n as usize].dls[b as usize];
        dl.mode = Mode::Done;
        dl.committed = dl.pos;
        dl.gen += 1;
        self.changed(n, b);
        let node = &mut self.nodes[n as usize];
        if node.done_ms.is_none() && node.dls.iter().all(|d| d.mode == Mode::Done) {
            node.done_ms = Some(self.now);
            self.pending = self.pending.saturating_sub(1);
        }
    }

    /// How many bytes of blob `b` node `id` lacks that some live node holds.
    pub(super) fn lag_bytes(&self, id: NodeId, b: u32) -> u64 {
        let Some(&n) = self.ids.get(&id) else {
            return 0;
        };
        let best = self
            .nodes
            .iter()
            .filter(|x| !x.gone)
            .map(|x| x.dls[b as usize].pos)
            .max()
            .unwrap_or(0);
        let mine = self.nodes[n as usize].dls[b as usize].pos;
        self.blobs[b as usize].range_bytes(mine, best.max(mine))
    }

    // -- flows and departures --------------------------------------------

    pub(super) fn flow_done(&mut self, id: u32) {
        let Some(flow) = self.net.get(id) else {
            return;
        };
        let overshoot = (-flow.left).max(0.0) as u64;
        let Some(flow) = self.net.end(id) else {
            return;
        };
        let (n, b) = (flow.dst, flow.blob);
        match flow.src {
            Src::Origin => self.origin_done(n, b, flow.bytes, flow.piece, overshoot),
            Src::Peer(p) => {
                self.report.peer_bytes += flow.bytes;
                self.nodes[p as usize].traffic.to_peers += flow.bytes;
                let bad = self.nodes[p as usize].liar;
                let Some(round) = self.nodes[n as usize].dls[b as usize].round.as_mut() else {
                    return;
                };
                if let Some(f) = round
                    .queue
                    .iter_mut()
                    .find(|f| matches!(f.st, InSt::Flow(x) if x == id))
                {
                    f.st = InSt::Arrived {
                        bad,
                        bytes: flow.bytes,
                    };
                }
                self.advance(n, b);
            }
        }
    }

    /// Node `n` crashes: its transfers stop, those it served stall until
    /// the receivers give up, it never announces again.
    pub(super) fn leave(&mut self, n: u32) {
        let now = self.now;
        if self.nodes[n as usize].gone {
            return;
        }
        for b in 0..self.blobs.len() {
            let mine = self.nodes[n as usize].dls[b].pos;
            let best = self
                .nodes
                .iter()
                .enumerate()
                .filter(|(i, x)| *i != n as usize && !x.gone)
                .map(|(_, x)| x.dls[b].pos)
                .max()
                .unwrap_or(0);
            self.report.departed_only_bytes += self.blobs[b].range_bytes(best, mine.max(best));
        }
        let node = &mut self.nodes[n as usize];
        node.gone = true;
        if node.done_ms.is_none() {
            self.pending = self.pending.saturating_sub(1);
        }
        for (b, dl) in node.dls.iter_mut().enumerate() {
            if matches!(dl.mode, Mode::Origin { lease: true }) {
                let f = &mut self.fetchers[b];
                *f = f.saturating_sub(1);
            }
            dl.round = None;
            dl.gen += 1;
            dl.leased = false;
        }
        let touching = self.net.find(|f| f.dst == n || f.src == Src::Peer(n));
        for id in touching {
            let Some(flow) = self.net.end(id) else {
                continue;
            };
            match flow.src {
                Src::Origin => {
                    // Fetched, never committed: nobody else has these.
                    self.report.origin_bytes += flow.moved();
                    self.report.departed_only_bytes += flow.moved();
                }
                Src::Peer(_) => self.report.peer_bytes += flow.moved(),
            }
            if flow.dst == n {
                continue;
            }
            // A transfer n was serving: the receiver sees it stall.
            let (d, b) = (flow.dst, flow.blob);
            let dl = &mut self.nodes[d as usize].dls[b as usize];
            let gen = dl.gen;
            let Some(round) = dl.round.as_mut() else {
                continue;
            };
            if let Some(f) = round
                .queue
                .iter_mut()
                .find(|f| matches!(f.st, InSt::Flow(x) if x == id))
            {
                f.st = InSt::Fail {
                    at: now + self.cfg.dead_peer_ms,
                    reason: Some(FailureReason::Stalled),
                    avoid_ms: AVOID_MS,
                };
                self.schedule(now + self.cfg.dead_peer_ms, Ev::Check(d, b, gen));
            }
        }
    }
}
