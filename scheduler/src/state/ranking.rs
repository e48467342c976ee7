//! Parent ranking: which holders of a blob an asker should fetch from, best
//! first. A pure function of the candidates; no clock, no I/O.
//!
//! Rules, in order:
//! 1. Never the asker. Never a node currently blamed for a bad piece
//!    (`bad_piece_blame >= BAD_PIECE_EXCLUDE`). Never a node holding no
//!    piece, unless it holds the origin lease (it fetches on request).
//! 2. Nodes with a high failure blame (`blame >= DEMOTE_BLAME`) come after
//!    every other node.
//! 3. Complete holders before partial ones.
//! 4. Within that, by [`score`]: pieces held, free upload slots, same zone,
//!    lease holder, divided by recent blame.
//! 5. Ties are broken by a hash of (asker, node), so that askers spread over
//!    equal holders instead of all picking the same one.

use std::cmp::Ordering;
use std::hash::{DefaultHasher, Hash, Hasher};

use shoal_proto::sched::PieceBits;
use shoal_proto::NodeId;

/// Bad-piece blame at or above this excludes a node (one report is 1.0, so a
/// report excludes a node for one blame half-life).
pub const BAD_PIECE_EXCLUDE: f64 = 0.5;
/// Blame at or above this puts a node behind all others.
pub const DEMOTE_BLAME: f64 = 1.0;
/// Free upload slots beyond this do not raise the score further.
const SLOTS_SATURATE: u32 = 4;

/// One holder of a blob, as ranking sees it.
#[derive(Clone, Debug)]
pub struct Candidate<'a> {
    pub node: NodeId,
    pub have: &'a PieceBits,
    /// Pieces held (`have.count()`, counted once per announcement).
    pub held: u32,
    pub complete: bool,
    /// Holds bytes of the blob short of any whole piece (served to range readers).
    pub partial: bool,
    pub lease_holder: bool,
    pub upload_slots_free: u32,
    pub zone: Option<&'a str>,
    /// Decayed blame from all failure reports.
    pub blame: f64,
    /// Decayed blame from bad-piece reports only.
    pub bad_piece_blame: f64,
}

/// A candidate's score in [0, 1]: 0.5 × fraction of pieces held (+0.1 if
/// complete, or +0.1 for the lease holder, who serves missing pieces from
/// the origin), + 0.2 × free upload slots (saturating at 4), + 0.2 if in
/// the asker's zone; all divided by (1 + blame).
pub fn score(c: &Candidate<'_>, asker_zone: Option<&str>) -> f64 {
    let fraction = if c.complete {
        1.0
    } else if c.have.is_empty() {
        0.0
    } else {
        f64::from(c.held.min(c.have.len())) / f64::from(c.have.len())
    };
    let bonus = if c.complete || c.lease_holder {
        0.1
    } else {
        0.0
    };
    let pieces = (0.5 * fraction + bonus).min(0.6);
    let slots =
        0.2 * f64::from(c.upload_slots_free.min(SLOTS_SATURATE)) / f64::from(SLOTS_SATURATE);
    let zone = match (asker_zone, c.zone) {
        (Some(a), Some(b)) if a == b => 0.2,
        _ => 0.0,
    };
    (pieces + slots + zone) / (1.0 + c.blame.max(0.0))
}

/// Whether a candidate may be returned to `asker` at all.
pub fn eligible(c: &Candidate<'_>, asker: NodeId) -> bool {
    c.node != asker
        && c.bad_piece_blame < BAD_PIECE_EXCLUDE
        && (c.complete || c.lease_holder || c.held > 0 || c.partial)
}

/// The eligible candidates, best first, at most `max`, each with its score.
pub fn rank<'a>(
    candidates: Vec<Candidate<'a>>,
    asker: NodeId,
    asker_zone: Option<&str>,
    max: usize,
) -> Vec<(Candidate<'a>, f64)> {
    let mut scored: Vec<(Candidate<'a>, f64, bool, u64)> = candidates
        .into_iter()
        .filter(|c| eligible(c, asker))
        .map(|c| {
            let s = score(&c, asker_zone);
            let demoted = c.blame >= DEMOTE_BLAME;
            let tie = tie_break(asker, c.node);
            (c, s, demoted, tie)
        })
        .collect();
    let order = |a: &(Candidate<'a>, f64, bool, u64), b: &(Candidate<'a>, f64, bool, u64)| {
        a.2.cmp(&b.2)
            .then_with(|| b.0.complete.cmp(&a.0.complete))
            .then_with(|| b.1.partial_cmp(&a.1).unwrap_or(Ordering::Equal))
            .then_with(|| a.3.cmp(&b.3))
    };
    // Only the best `max` are returned: select them, then sort just those.
    if max == 0 {
        return Vec::new();
    }
    if scored.len() > max {
        scored.select_nth_unstable_by(max - 1, order);
        scored.truncate(max);
    }
    scored.sort_by(order);
    scored.into_iter().map(|(c, s, _, _)| (c, s)).collect()
}

fn tie_break(asker: NodeId, node: NodeId) -> u64 {
    let mut h = DefaultHasher::new();
    asker.hash(&mut h);
    node.hash(&mut h);
    h.finish()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(i: u8) -> NodeId {
        NodeId::from_bytes([i; 32])
    }

    fn bits(len: u32, held: u32) -> PieceBits {
        let mut b = PieceBits::empty(len);
        for i in 0..held {
            b.set(i);
        }
        b
    }

    fn cand(node: u8, have: &PieceBits) -> Candidate<'_> {
        Candidate {
            node: id(node),
            have,
            held: have.count(),
            complete: have.is_full() && !have.is_empty(),
            partial: false,
            lease_holder: false,
            upload_slots_free: 4,
            zone: None,
            blame: 0.0,
            bad_piece_blame: 0.0,
        }
    }

    fn order(r: &[(Candidate<'_>, f64)]) -> Vec<u8> {
        r.iter().map(|(c, _)| c.node.as_bytes()[0]).collect()
    }

    #[test]
    fn complete_first_then_pieces() {
        let full = bits(10, 10);
        let most = bits(10, 9);
        let few = bits(10, 2);
        let none = bits(10, 0);
        let mut c_full = cand(1, &full);
        c_full.upload_slots_free = 0; // still first: complete beats slots
        let r = rank(
            vec![cand(3, &few), cand(2, &most), c_full, cand(4, &none)],
            id(9),
            None,
            10,
        );
        assert_eq!(order(&r), vec![1, 2, 3], "empty holder dropped");
    }

    #[test]
    fn slots_and_zone_break_equal_pieces() {
        let half = bits(10, 5);
        let mut busy = cand(1, &half);
        busy.upload_slots_free = 0;
        let free = cand(2, &half);
        let mut near = cand(3, &half);
        near.zone = Some("z1");
        let r = rank(vec![busy, free, near], id(9), Some("z1"), 10);
        assert_eq!(order(&r), vec![3, 2, 1]);
    }

    #[test]
    fn never_the_asker_and_bad_pieces_excluded() {
        let full = bits(4, 4);
        let mut bad = cand(2, &full);
        bad.bad_piece_blame = 0.9;
        let r = rank(vec![cand(1, &full), bad, cand(3, &full)], id(1), None, 10);
        assert_eq!(order(&r), vec![3]);
    }

    #[test]
    fn blamed_nodes_sink() {
        let full = bits(4, 4);
        let half = bits(4, 2);
        let mut flaky = cand(1, &full);
        flaky.blame = 1.5;
        let mut slightly = cand(2, &full);
        slightly.blame = 0.3;
        let r = rank(
            vec![flaky, slightly, cand(3, &full), cand(4, &half)],
            id(9),
            None,
            10,
        );
        assert_eq!(order(&r), vec![3, 2, 4, 1]);
    }

    #[test]
    fn lease_holder_with_nothing_is_kept() {
        let none = bits(4, 0);
        let mut seed = cand(1, &none);
        seed.lease_holder = true;
        let r = rank(vec![seed, cand(2, &none)], id(9), None, 10);
        assert_eq!(order(&r), vec![1]);
        assert!(r[0].1 > 0.0);
    }

    #[test]
    fn ties_spread_over_askers() {
        let full = bits(4, 4);
        let firsts: std::collections::HashSet<u8> = (10..40)
            .map(|asker| {
                let cands = (1..=4).map(|n| cand(n, &full)).collect();
                order(&rank(cands, id(asker), None, 1))[0]
            })
            .collect();
        assert!(firsts.len() > 1, "every asker got the same first holder");
    }

    proptest! {
        #[test]
        fn ranking_invariants(
            specs in proptest::collection::vec((0u32..=8, any::<bool>(), 0u32..6, 0.0f64..3.0, 0.0f64..1.0, any::<bool>()), 0..12),
            asker in 0u8..12,
            max in 0usize..8,
        ) {
            let haves: Vec<PieceBits> = specs.iter().map(|s| bits(8, s.0)).collect();
            let cands: Vec<Candidate<'_>> = specs.iter().zip(&haves).enumerate().map(|(i, (s, h))| Candidate {
                node: id(i as u8),
                have: h,
                held: h.count(),
                complete: h.is_full(),
                partial: false,
                lease_holder: s.1,
                upload_slots_free: s.2,
                zone: s.5.then_some("z"),
                blame: s.3,
                bad_piece_blame: s.4,
            }).collect();
            let r = rank(cands.clone(), id(asker), Some("z"), max);
            prop_assert!(r.len() <= max);
            let mut seen = std::collections::HashSet::new();
            for (c, s) in &r {
                prop_assert!(c.node != id(asker));
                prop_assert!(c.bad_piece_blame < BAD_PIECE_EXCLUDE);
                prop_assert!((0.0..=1.0).contains(s));
                prop_assert!(seen.insert(c.node));
            }
            // Undemoted complete holders precede undemoted partial ones.
            let keys: Vec<(bool, bool)> = r.iter().map(|(c, _)| (c.blame >= DEMOTE_BLAME, !c.complete)).collect();
            let mut sorted = keys.clone();
            sorted.sort();
            prop_assert_eq!(keys, sorted);
            // Nothing eligible was dropped while there was room.
            let eligible_n = cands.iter().filter(|c| eligible(c, id(asker))).count();
            prop_assert_eq!(r.len(), eligible_n.min(max));
        }
    }
}
