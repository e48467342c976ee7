//! What the scheduler knows about one node: how to reach it, when it last
//! announced, its traffic counters, the blobs (of this scheduler's shard) it
//! holds, its failure blame, and lease revocations it has not been told of.
//!
//! Invariants (kept by `State`): `blobs` lists exactly the blobs whose
//! record has a holder entry for this node; `leases` counts the leases it
//! holds.

use std::collections::{BTreeSet, HashSet};

use shoal_proto::sched::{FailureReason, NodeAnnouncement, Traffic};
use shoal_proto::BlobId;

#[derive(Clone, Debug)]
pub struct NodeRecord {
    pub info: NodeAnnouncement,
    pub registered_ms: u64,
    pub last_seen_ms: u64,
    pub traffic: Traffic,
    pub blobs: HashSet<BlobId>,
    pub blame: Blame,
    /// Blobs whose lease this node lost since its last announcement.
    pub revoked: BTreeSet<BlobId>,
    /// Origin leases it holds now (kept by `State` where leases start and end).
    pub leases: u32,
}

impl NodeRecord {
    pub fn new(info: NodeAnnouncement, now_ms: u64) -> Self {
        Self {
            info,
            registered_ms: now_ms,
            last_seen_ms: now_ms,
            traffic: Traffic::default(),
            blobs: HashSet::new(),
            blame: Blame::default(),
            revoked: BTreeSet::new(),
            leases: 0,
        }
    }

    /// Alive: it announced within `ttl_ms`.
    pub fn alive(&self, now_ms: u64, ttl_ms: u64) -> bool {
        now_ms.saturating_sub(self.last_seen_ms) <= ttl_ms
    }
}

/// Failure blame with exponential decay: each report adds a weight, and the
/// sum halves every half-life.
#[derive(Clone, Debug, Default)]
pub struct Blame {
    pub all: Decaying,
    pub bad_piece: Decaying,
}

/// Blame a single report adds, by reason.
pub fn blame_weight(reason: FailureReason) -> f64 {
    match reason {
        FailureReason::BadPiece => 1.0,
        FailureReason::Unreachable => 0.5,
        FailureReason::Stalled => 0.25,
    }
}

/// Blame is capped so that a flood of reports cannot bury a node for longer
/// than a few half-lives.
const MAX_BLAME: f64 = 8.0;

impl Blame {
    pub fn report(&mut self, reason: FailureReason, now_ms: u64, half_life_ms: u64) {
        let w = blame_weight(reason);
        self.all.add(w, now_ms, half_life_ms);
        if reason == FailureReason::BadPiece {
            self.bad_piece.add(w, now_ms, half_life_ms);
        }
    }
}

/// A value that halves every `half_life_ms`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Decaying {
    value: f64,
    at_ms: u64,
}

impl Decaying {
    pub fn get(&self, now_ms: u64, half_life_ms: u64) -> f64 {
        if self.value == 0.0 {
            return 0.0;
        }
        if half_life_ms == 0 {
            return 0.0;
        }
        let elapsed = now_ms.saturating_sub(self.at_ms) as f64;
        self.value * 0.5f64.powf(elapsed / half_life_ms as f64)
    }

    pub fn add(&mut self, w: f64, now_ms: u64, half_life_ms: u64) {
        self.value = (self.get(now_ms, half_life_ms) + w).min(MAX_BLAME);
        self.at_ms = now_ms;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn blame_decays_by_half_life() {
        let mut b = Blame::default();
        b.report(FailureReason::BadPiece, 1_000, 10_000);
        assert!((b.bad_piece.get(1_000, 10_000) - 1.0).abs() < 1e-9);
        assert!((b.bad_piece.get(11_000, 10_000) - 0.5).abs() < 1e-9);
        assert!((b.all.get(21_000, 10_000) - 0.25).abs() < 1e-9);
        b.report(FailureReason::Unreachable, 11_000, 10_000);
        assert!((b.all.get(11_000, 10_000) - 1.0).abs() < 1e-9);
        assert!((b.bad_piece.get(11_000, 10_000) - 0.5).abs() < 1e-9);
        for _ in 0..100 {
            b.report(FailureReason::BadPiece, 11_000, 10_000);
        }
        assert!(b.all.get(11_000, 10_000) <= MAX_BLAME);
        assert_eq!(Decaying::default().get(5, 0), 0.0);
    }
}
