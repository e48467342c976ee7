//! Scheduler at scale: a deterministic discrete-event simulation that drives
//! the real [`State`] of several scheduler replicas with thousands of
//! simulated nodes in one process (issue 12, P9). Used by the smoke test
//! (`tests/sim_smoke.rs`) and the runner (`examples/sched-sim.rs`).
//!
//! What is real: every announcement, parents request, failure report and
//! tick is a call into a real [`State`] (one per replica, each with
//! [`Shard::member`]; nodes announce to every replica and ask the replica
//! [`pick_scheduler`] names for a blob), with the real message types.
//!
//! What is modelled (`sim/node.rs`, after `node/src/peering.rs` and
//! `node/src/download/*.rs`): a node announces a full set first and on
//! `resync`, then deltas of changed blobs every heartbeat or 150 ms after a
//! commit (debounced); a download asks for parents wanting the lease,
//! fetches the origin under a granted lease (committing and announcing every
//! 2 MiB), otherwise keeps `fetch_window` pieces in flight from the
//! least-loaded ranked holders that have them, consumes them in order,
//! asks again after every round (at once after progress, 200 ms later
//! without), avoids and blames failing peers, and falls back to the origin
//! without a lease after `stall_timeout` without progress. Links are
//! flow-level ([`net`]). Time advances in fixed steps (`step_ms`); events
//! (starts, leaves, announcements, polls, ticks) fire at step boundaries.
//!
//! Not modelled: latency of scheduler calls and piece requests (0), the DHT,
//! lazy mounts and seeding ahead of the fill, disk, CPU of nodes, piece
//! verification cost, scheduler restarts or outages, eviction, prewarm jobs.
//! See `scheduler/DESIGN.md`, "Simulation".
//!
//! Determinism: everything the simulation decides comes from its seed; the
//! scheduler's hash maps iterate in a per-process order, which changes no
//! decision of its (ranking ties are broken by a fixed hash).
//!
//! Invariants checked while it runs (reported as [`SimReport::violations`]):
//! no parents answer lists the asker, a node reported for a bad piece within
//! the blame half-life, or a departed node past its TTL; the schedulers
//! never hold more than `max_origin_leases` leases of a blob at once.

mod net;
mod node;
mod rng;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use shoal_proto::sched::{
    pick_scheduler, FailureReason, FailureReport, ParentsResponse, PieceBits, PieceSha256,
};
use shoal_proto::{BlobId, Digest, NodeId};

use crate::state::{Event, Shard, State, StateConfig};
use net::{Links, Net};
use node::Node;
pub use rng::Rng;

/// Most blobs an image may have in the simulation (blob sets are bit masks).
pub const MAX_BLOBS: usize = 64;

/// What to simulate. Rates are bytes per second.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub nodes: usize,
    pub seed: u64,
    pub schedulers: usize,
    pub zones: usize,
    /// The image: one entry per blob, its size in bytes.
    pub blob_sizes: Vec<u64>,
    /// Nodes start uniformly within this window.
    pub start_window_ms: u64,
    /// Fraction of nodes that leave (crash) at a uniform time within
    /// `leave_window_ms` of their start.
    pub leave_fraction: f64,
    pub leave_window_ms: u64,
    /// Fraction of nodes that serve corrupt pieces (and are blamed for it).
    pub liar_fraction: f64,
    /// The first node granted the lease of the first blob leaves when it has
    /// fetched half of it (exercises the lease hand-off).
    pub kill_first_lease_holder: bool,
    /// A leaver holding an origin lease when its time comes stays until it
    /// holds none (so only `kill_first_lease_holder` tests hand-offs).
    pub lease_holders_stay: bool,
    pub origin_bytes_per_s: f64,
    pub node_up_bytes_per_s: f64,
    pub node_down_bytes_per_s: f64,
    /// Cap on one cross-zone flow (`None`: zones do not matter to links).
    pub cross_zone_bytes_per_s: Option<f64>,
    /// Time step of the flow model.
    pub step_ms: u64,
    /// How often every replica's [`State::tick`] runs.
    pub tick_ms: u64,
    /// Give up (and report unfinished nodes) at this simulated time.
    pub time_limit_ms: u64,
    /// Pieces a download keeps in flight (node `p2p.fetch_window`).
    pub fetch_window: usize,
    /// Uploads a node serves at once; more are answered `Busy`
    /// (node `p2p.upload_slots`).
    pub upload_slots: u32,
    /// Without a new piece for this long, a download goes to the origin
    /// without a lease (node `p2p.stall_timeout`).
    pub stall_timeout_ms: u64,
    /// A request to a node that left fails after this long (the p2p connect
    /// timeout; transfers it was serving stall for as long).
    pub dead_peer_ms: u64,
    /// Every replica's rules (its `shard` is set per replica).
    pub state: StateConfig,
}

impl Default for SimConfig {
    fn default() -> Self {
        const MIB: u64 = 1 << 20;
        Self {
            nodes: 1_000,
            seed: 1,
            schedulers: 3,
            zones: 4,
            // ~1 GiB in four layers of unequal size.
            blob_sizes: vec![384 * MIB, 320 * MIB, 192 * MIB, 128 * MIB],
            start_window_ms: 5_000,
            leave_fraction: 0.02,
            leave_window_ms: 15_000,
            liar_fraction: 0.0,
            kill_first_lease_holder: true,
            lease_holders_stay: false,
            origin_bytes_per_s: 1e9 / 8.0,
            node_up_bytes_per_s: 10e9 / 8.0,
            node_down_bytes_per_s: 10e9 / 8.0,
            cross_zone_bytes_per_s: None,
            step_ms: 1,
            tick_ms: 1_000,
            time_limit_ms: 600_000,
            fetch_window: 8,
            upload_slots: 8,
            stall_timeout_ms: 20_000,
            dead_peer_ms: 5_000,
            state: StateConfig::default(),
        }
    }
}

/// What a run measured.
#[derive(Clone, Debug, Default)]
pub struct SimReport {
    pub nodes: usize,
    /// Nodes that left during the run.
    pub left: usize,
    /// Nodes that did not leave and completed every blob.
    pub completed: usize,
    /// Nodes that did not leave and did not complete (time limit).
    pub incomplete: usize,
    pub image_bytes: u64,
    /// Every byte any node read from the origin (leased or not, cut or not).
    pub origin_bytes: u64,
    /// Bytes moved between nodes (including cut and corrupt transfers).
    pub peer_bytes: u64,
    /// Start-to-last-blob times of the completed nodes, ascending.
    pub completion_ms: Vec<u64>,
    /// Simulated time when the run ended.
    pub sim_ms: u64,
    /// `State::announce` calls (one per node per replica per round).
    pub announces: u64,
    pub announce_cpu: Duration,
    pub parents_calls: u64,
    pub parents_cpu: Duration,
    pub failure_reports: u64,
    pub failure_cpu: Duration,
    pub ticks: u64,
    pub tick_cpu: Duration,
    pub leases_granted: u64,
    pub leases_adopted: u64,
    pub leases_ended: BTreeMap<&'static str, u64>,
    /// Per lease granted after the first of its blob: how far (bytes) the
    /// new holder was behind the most advanced live node, summed. Those
    /// bytes come from the origin a second time.
    pub handoff_gap_bytes: u64,
    /// Bytes that only a node that left held (it was ahead of every live
    /// node, or had them in flight from the origin: a lease holder); they
    /// must come from the origin again.
    pub departed_only_bytes: u64,
    /// Most leases the schedulers held for one blob at once.
    pub max_leases_per_blob: u32,
    /// Most nodes fetching one blob from the origin under a lease at once
    /// (a revoked holder stops only when its next answer tells it).
    pub max_lease_fetchers_per_blob: u32,
    /// Origin fetches without a lease, by the node's reason.
    pub origin_fallbacks: BTreeMap<&'static str, u64>,
    pub resyncs: u64,
    pub expired: u64,
    pub blobs_rejected: u64,
    pub wrong_scheduler: u64,
    /// Most transfers in flight at once.
    pub max_flows: usize,
    /// Holders returned by one replica while another had them blamed for a
    /// bad piece (of another blob): blame is not shared between replicas.
    pub blamed_elsewhere_parents: u64,
    /// Invariant breaches, by kind.
    pub violations: BTreeMap<&'static str, u64>,
    /// The first few breaches, described.
    pub violation_samples: Vec<String>,
    pub wall: Duration,
}

impl SimReport {
    /// Origin bytes per image byte (1.0: the image came from the origin once).
    pub fn origin_ratio(&self) -> f64 {
        self.origin_bytes as f64 / self.image_bytes.max(1) as f64
    }

    /// The `q` quantile (0..=1) of completion times, in ms.
    pub fn completion_quantile(&self, q: f64) -> u64 {
        let v = &self.completion_ms;
        if v.is_empty() {
            return 0;
        }
        let i = ((v.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
        v[i.min(v.len() - 1)]
    }

    pub fn p99_over_p50(&self) -> f64 {
        self.completion_quantile(0.99) as f64 / self.completion_quantile(0.5).max(1) as f64
    }

    /// Mean wall time inside one `State::announce`.
    pub fn announce_cpu_us(&self) -> f64 {
        per_call_us(self.announce_cpu, self.announces)
    }

    /// Mean wall time inside one `State::parents`.
    pub fn parents_cpu_us(&self) -> f64 {
        per_call_us(self.parents_cpu, self.parents_calls)
    }

    pub fn violation_total(&self) -> u64 {
        self.violations.values().sum()
    }
}

fn per_call_us(d: Duration, n: u64) -> f64 {
    d.as_secs_f64() * 1e6 / n.max(1) as f64
}

/// Run one simulation to the end (every remaining node complete, or the
/// time limit).
pub fn run(cfg: SimConfig) -> SimReport {
    let wall = Instant::now();
    let mut w = World::new(cfg);
    w.run_loop();
    w.finish(wall.elapsed())
}

/// The piece size the node uses for a blob of `size` bytes (mirrors
/// `node/src/store/pieces.rs`: the smallest power of two ≥ 256 KiB giving at
/// most 4096 pieces, at most 16 MiB).
pub fn piece_size(size: u64) -> u64 {
    let mut p: u64 = 256 << 10;
    while p < (16 << 20) && size.div_ceil(p) > 4096 {
        p *= 2;
    }
    p
}

/// One blob of the image.
struct Blob {
    id: BlobId,
    size: u64,
    piece_size: u64,
    pieces: u32,
    /// Index of the replica that owns it.
    owner: usize,
    hashes: Vec<PieceSha256>,
    /// `prefix[k]`: the piece map holding pieces `0..k`.
    prefix: Vec<PieceBits>,
}

impl Blob {
    fn piece_bytes(&self, i: u32) -> u64 {
        let start = u64::from(i) * self.piece_size;
        self.size.min(start + self.piece_size).saturating_sub(start)
    }

    fn range_bytes(&self, from: u32, to: u32) -> u64 {
        let end = (u64::from(to) * self.piece_size).min(self.size);
        end.saturating_sub(u64::from(from) * self.piece_size)
    }
}

/// Something that happens at a given time (ordered only to break ties
/// deterministically; the sequence number comes first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Tick,
    Start(u32),
    Leave(u32),
    /// Announce now, unless the node's announcement generation moved on.
    Announce(u32, u64),
    /// Ask for parents again (node, blob, download generation).
    Poll(u32, u32, u64),
    /// A failure at the head of a round is due (node, blob, generation).
    Check(u32, u32, u64),
}

/// The whole simulated cluster.
struct World {
    cfg: SimConfig,
    now: u64,
    blobs: Vec<Blob>,
    blob_index: HashMap<BlobId, u32>,
    scheds: Vec<State>,
    nodes: Vec<Node>,
    ids: HashMap<NodeId, u32>,
    zone_names: Vec<String>,
    net: Net,
    queue: BinaryHeap<Reverse<(u64, u64, Ev)>>,
    seq: u64,
    /// Live nodes that have not completed yet.
    pending: usize,
    /// Per node and replica: when it was last reported there for a bad piece.
    bad_report_ms: Vec<Vec<Option<u64>>>,
    /// Per blob: leases the schedulers hold now (from their events).
    leases: Vec<u32>,
    /// Per blob: nodes fetching it from the origin under a lease now.
    fetchers: Vec<u32>,
    kill_armed: bool,
    /// Per blob: a lease was granted before.
    granted: Vec<bool>,
    report: SimReport,
}

impl World {
    fn new(cfg: SimConfig) -> Self {
        assert!(
            !cfg.blob_sizes.is_empty() && cfg.blob_sizes.len() <= MAX_BLOBS,
            "1 to {MAX_BLOBS} blobs"
        );
        let mut rng = Rng::new(cfg.seed);
        let addrs: Vec<String> = (0..cfg.schedulers.max(1))
            .map(|i| format!("sched-{i}:5060"))
            .collect();
        let scheds = addrs
            .iter()
            .map(|me| {
                let c = StateConfig {
                    shard: Shard::member(me.clone(), addrs.clone()),
                    ..cfg.state.clone()
                };
                State::new(c, 0)
            })
            .collect();
        let blobs: Vec<Blob> = cfg
            .blob_sizes
            .iter()
            .map(|&size| {
                let id = Digest::sha256(&rng.bytes32());
                let owner = pick_scheduler(&id, &addrs)
                    .and_then(|o| addrs.iter().position(|a| a == o))
                    .unwrap_or(0);
                let piece_size = piece_size(size);
                let pieces = u32::try_from(size.div_ceil(piece_size)).unwrap_or(u32::MAX);
                let hashes = (0..pieces).map(|_| PieceSha256(rng.bytes32())).collect();
                let mut prefix = Vec::with_capacity(pieces as usize + 1);
                let mut bits = PieceBits::empty(pieces);
                prefix.push(bits.clone());
                for i in 0..pieces {
                    bits.set(i);
                    prefix.push(bits.clone());
                }
                Blob {
                    id,
                    size,
                    piece_size,
                    pieces,
                    owner,
                    hashes,
                    prefix,
                }
            })
            .collect();
        let blob_index = blobs
            .iter()
            .enumerate()
            .map(|(i, b)| (b.id.clone(), i as u32))
            .collect();
        let zone_names = (0..cfg.zones.max(1)).map(|z| format!("zone-{z}")).collect();
        let mut nodes = Vec::with_capacity(cfg.nodes);
        let mut queue = BinaryHeap::new();
        let mut seq = 0;
        let mut push = |q: &mut BinaryHeap<_>, at: u64, ev: Ev| {
            seq += 1;
            q.push(Reverse((at, seq, ev)));
        };
        for i in 0..cfg.nodes {
            let n = i as u32;
            let start = rng.below(cfg.start_window_ms + 1);
            let leaves = rng.unit() < cfg.leave_fraction;
            let leave = rng.below(cfg.leave_window_ms.max(1));
            let liar = rng.unit() < cfg.liar_fraction;
            let node = Node::new(
                NodeId::from_bytes(rng.bytes32()),
                n,
                (i % cfg.zones.max(1)) as u32,
                liar,
                start,
                cfg.schedulers.max(1),
                blobs.len(),
            );
            push(&mut queue, start, Ev::Start(n));
            if leaves {
                push(&mut queue, start + leave, Ev::Leave(n));
            }
            nodes.push(node);
        }
        push(&mut queue, cfg.tick_ms, Ev::Tick);
        let ids = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.id, i as u32))
            .collect();
        let links = Links {
            origin: cfg.origin_bytes_per_s,
            up: cfg.node_up_bytes_per_s,
            down: cfg.node_down_bytes_per_s,
            cross_zone: cfg.cross_zone_bytes_per_s,
        };
        let report = SimReport {
            nodes: cfg.nodes,
            image_bytes: cfg.blob_sizes.iter().sum(),
            ..SimReport::default()
        };
        Self {
            net: Net::new(links, cfg.nodes),
            pending: cfg.nodes,
            bad_report_ms: vec![vec![None; cfg.schedulers.max(1)]; cfg.nodes],
            leases: vec![0; blobs.len()],
            fetchers: vec![0; blobs.len()],
            kill_armed: cfg.kill_first_lease_holder,
            granted: vec![false; blobs.len()],
            now: 0,
            blobs,
            blob_index,
            scheds,
            nodes,
            ids,
            zone_names,
            queue,
            seq,
            report,
            cfg,
        }
    }

    fn schedule(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq, ev)));
    }

    fn run_loop(&mut self) {
        let step = self.cfg.step_ms.max(1);
        let dt = step as f64 / 1000.0;
        let mut done = Vec::new();
        loop {
            while let Some(Reverse((at, _, ev))) = self.queue.peek().copied() {
                if at > self.now {
                    break;
                }
                self.queue.pop();
                self.handle(ev);
            }
            if self.pending == 0 || self.now >= self.cfg.time_limit_ms {
                break;
            }
            self.net.step(dt, &mut done);
            self.report.max_flows = self.report.max_flows.max(self.net.live());
            self.now += step;
            for id in done.drain(..) {
                self.flow_done(id);
            }
        }
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Tick => {
                for s in 0..self.scheds.len() {
                    let t = Instant::now();
                    self.scheds[s].tick(self.now);
                    self.report.tick_cpu += t.elapsed();
                    self.report.ticks += 1;
                    self.drain_events(s);
                }
                let next = self.now + self.cfg.tick_ms.max(1);
                self.schedule(next, Ev::Tick);
            }
            Ev::Start(n) => self.start_node(n),
            Ev::Leave(n) => {
                if self.cfg.lease_holders_stay && self.nodes[n as usize].holds_lease() {
                    self.schedule(self.now + 1_000, Ev::Leave(n));
                } else {
                    self.leave(n);
                }
            }
            Ev::Announce(n, gen) => {
                if self.nodes[n as usize].announce_due(gen) {
                    self.announce(n);
                }
            }
            Ev::Poll(n, b, gen) => {
                if self.nodes[n as usize].poll_due(b, gen) {
                    self.ask_parents(n, b);
                }
            }
            Ev::Check(n, b, gen) => {
                if self.nodes[n as usize].check_due(b, gen) {
                    self.advance(n, b);
                }
            }
        }
    }

    // -- the schedulers ---------------------------------------------------

    /// `State::parents` at the blob's replica, timed and checked.
    fn call_parents(&mut self, n: u32, b: u32) -> Option<ParentsResponse> {
        let blob = &self.blobs[b as usize];
        let s = blob.owner;
        let req = shoal_proto::sched::ParentsRequest {
            asker: self.nodes[n as usize].id,
            size: Some(blob.size),
            want_lease: true,
        };
        let t = Instant::now();
        let r = self.scheds[s].parents(&blob.id, &req, self.now);
        self.report.parents_cpu += t.elapsed();
        self.report.parents_calls += 1;
        self.drain_events(s);
        match r {
            Ok(resp) => {
                self.check_holders(n, s, &resp);
                Some(resp)
            }
            Err(_) => {
                self.report.wrong_scheduler += 1;
                None
            }
        }
    }

    /// `State::report_failure` at the blob's replica.
    fn call_failure(&mut self, n: u32, b: u32, peer: u32, reason: FailureReason) {
        let blob = &self.blobs[b as usize];
        let s = blob.owner;
        let report = FailureReport {
            reporter: self.nodes[n as usize].id,
            peer: self.nodes[peer as usize].id,
            reason,
        };
        let t = Instant::now();
        let ack = self.scheds[s].report_failure(&blob.id, &report, self.now);
        self.report.failure_cpu += t.elapsed();
        self.report.failure_reports += 1;
        if ack.counted && reason == FailureReason::BadPiece {
            self.bad_report_ms[peer as usize][s] = Some(self.now);
        }
        self.drain_events(s);
    }

    fn drain_events(&mut self, s: usize) {
        for e in self.scheds[s].take_events() {
            match e {
                Event::LeaseGranted {
                    blob,
                    node,
                    adopted,
                } => {
                    let Some(&b) = self.blob_index.get(&blob) else {
                        continue;
                    };
                    let count = &mut self.leases[b as usize];
                    *count += 1;
                    let count = *count;
                    self.report.max_leases_per_blob = self.report.max_leases_per_blob.max(count);
                    if count > self.cfg.state.max_origin_leases {
                        self.violation(
                            "lease_limit",
                            format!("blob {b}: {count} leases at {} ms", self.now),
                        );
                    }
                    if self.granted[b as usize] {
                        self.report.handoff_gap_bytes += self.lag_bytes(node, b);
                    }
                    self.granted[b as usize] = true;
                    self.report.leases_granted += 1;
                    self.report.leases_adopted += u64::from(adopted);
                    if self.kill_armed && b == 0 && !adopted {
                        self.kill_armed = false;
                        if let Some(&i) = self.ids.get(&node) {
                            self.nodes[i as usize].leave_at_half = true;
                        }
                    }
                }
                Event::LeaseEnded { blob, why, .. } => {
                    if let Some(&b) = self.blob_index.get(&blob) {
                        let count = &mut self.leases[b as usize];
                        *count = count.saturating_sub(1);
                    }
                    *self.report.leases_ended.entry(why.as_str()).or_default() += 1;
                }
                Event::Resync { .. } => self.report.resyncs += 1,
                Event::NodeExpired { .. } => self.report.expired += 1,
                Event::BlobRejected { .. } => self.report.blobs_rejected += 1,
                _ => {}
            }
        }
    }

    /// The outcome rules every parents answer (from replica `s`) must keep.
    fn check_holders(&mut self, asker: u32, s: usize, resp: &ParentsResponse) {
        let ttl = self.cfg.state.node_ttl_ms;
        let half_life = self.cfg.state.blame_half_life_ms;
        for h in &resp.holders {
            let Some(&i) = self.ids.get(&h.node) else {
                self.violation("unknown_holder", format!("{} at {} ms", h.node, self.now));
                continue;
            };
            if i == asker {
                self.violation("self_parent", format!("node {i} at {} ms", self.now));
            }
            let now = self.now;
            let recent = |t: &Option<u64>| t.is_some_and(|t| now.saturating_sub(t) < half_life);
            let reports = &self.bad_report_ms[i as usize];
            if recent(&reports[s]) {
                self.violation(
                    "blamed_parent",
                    format!(
                        "node {i} (bad piece reported at {:?} ms) given to {asker} at {now} ms",
                        reports[s]
                    ),
                );
            } else if reports.iter().any(recent) {
                // Blame lives in the replica the report went to (the blob's).
                self.report.blamed_elsewhere_parents += 1;
            }
            let node = &self.nodes[i as usize];
            if let (true, Some(last)) = (node.gone, node.last_announce_ms) {
                if self.now > last + ttl {
                    self.violation(
                        "departed_parent",
                        format!(
                            "node {i} (last announced {last} ms) given at {} ms",
                            self.now
                        ),
                    );
                }
            }
        }
    }

    fn violation(&mut self, kind: &'static str, what: String) {
        *self.report.violations.entry(kind).or_default() += 1;
        if self.report.violation_samples.len() < 20 {
            self.report
                .violation_samples
                .push(format!("{kind}: {what}"));
        }
    }

    fn finish(mut self, wall: Duration) -> SimReport {
        let mut r = std::mem::take(&mut self.report);
        r.sim_ms = self.now;
        for n in &self.nodes {
            if n.gone {
                r.left += 1;
            } else if let Some(done) = n.done_ms {
                r.completed += 1;
                r.completion_ms.push(done.saturating_sub(n.start_ms));
            } else {
                r.incomplete += 1;
            }
        }
        r.completion_ms.sort_unstable();
        r.wall = wall;
        r
    }
}
