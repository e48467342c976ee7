//! Origin leases: permission for one node to fetch a blob from the origin
//! while the others fetch from it.
//!
//! Rules (enforced by `State`, checked here where they are local):
//! - a blob has at most `max_origin_leases` leases;
//! - a lease is granted only while no live, unblamed node holds the complete
//!   blob (with one, peers fetch from it instead);
//! - a lease is renewed by announcements that show progress: more pieces, or
//!   more bytes read from the origin ([`Lease::observe`]);
//! - a lease whose holder made no progress for `lease_stall_ms`
//!   ([`Lease::stalled`]), whose node expired, that was reported for a bad
//!   piece, or whose node dropped the blob, is revoked; the next asker gets
//!   it;
//! - a lease ends when its holder announces the blob complete.

use shoal_proto::sched::{LeaseInfo, LeaseStatus};
use shoal_proto::NodeId;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub holder: NodeId,
    pub granted_ms: u64,
    pub last_progress_ms: u64,
    /// Pieces the holder had at its last progress.
    pub pieces: u32,
    /// Origin bytes the holder had read at its last progress.
    pub origin_bytes: u64,
}

/// Why a lease ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LeaseEnd {
    /// The holder made no progress for the stall timeout.
    Stalled,
    /// The holder stopped announcing.
    Expired,
    /// The holder was reported for a bad piece.
    BadPiece,
    /// The holder dropped the blob.
    Removed,
    /// The holder completed the blob (not a revocation).
    Completed,
}

impl LeaseEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stalled => "stalled",
            Self::Expired => "expired",
            Self::BadPiece => "bad_piece",
            Self::Removed => "removed",
            Self::Completed => "completed",
        }
    }

    /// The holder must be told to stop fetching from the origin.
    pub fn notify_holder(self) -> bool {
        matches!(self, Self::Stalled | Self::BadPiece)
    }
}

impl Lease {
    pub fn new(holder: NodeId, now_ms: u64, pieces: u32, origin_bytes: u64) -> Self {
        Self {
            holder,
            granted_ms: now_ms,
            last_progress_ms: now_ms,
            pieces,
            origin_bytes,
        }
    }

    /// Record what the holder announced; progress renews the lease.
    /// Returns whether it was progress.
    pub fn observe(&mut self, pieces: u32, origin_bytes: u64, now_ms: u64) -> bool {
        let progress = pieces > self.pieces || origin_bytes > self.origin_bytes;
        if progress {
            self.last_progress_ms = now_ms;
        }
        self.pieces = self.pieces.max(pieces);
        self.origin_bytes = self.origin_bytes.max(origin_bytes);
        progress
    }

    pub fn stalled(&self, now_ms: u64, stall_ms: u64) -> bool {
        now_ms.saturating_sub(self.last_progress_ms) > stall_ms
    }

    /// Milliseconds until it stalls out.
    pub fn expires_in(&self, now_ms: u64, stall_ms: u64) -> u64 {
        (self.last_progress_ms + stall_ms).saturating_sub(now_ms)
    }

    pub fn info(&self, asker: NodeId, now_ms: u64, stall_ms: u64) -> LeaseInfo {
        LeaseInfo {
            holder: self.holder,
            granted_to_you: self.holder == asker,
            expires_ms: self.expires_in(now_ms, stall_ms),
        }
    }

    pub fn status(&self, now_ms: u64, stall_ms: u64) -> LeaseStatus {
        LeaseStatus {
            holder: self.holder,
            age_ms: now_ms.saturating_sub(self.granted_ms),
            last_progress_ms_ago: now_ms.saturating_sub(self.last_progress_ms),
            expires_ms: self.expires_in(now_ms, stall_ms),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn progress_renews() {
        let mut l = Lease::new(NodeId::from_bytes([1; 32]), 0, 0, 0);
        assert!(!l.stalled(10_000, 10_000));
        assert!(l.stalled(10_001, 10_000));
        assert!(!l.observe(0, 0, 5_000));
        assert!(l.observe(0, 100, 8_000));
        assert!(!l.stalled(18_000, 10_000));
        assert!(
            !l.observe(0, 50, 9_000),
            "counters going back are not progress"
        );
        assert!(l.observe(1, 100, 12_000));
        assert_eq!(l.expires_in(13_000, 10_000), 9_000);
    }
}
