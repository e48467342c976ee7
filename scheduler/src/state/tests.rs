//! Rules of the state machine, driven with made-up times.

use super::*;
use proptest::prelude::*;
use shoal_proto::sched::{FailureReason, NodeAnnouncement, PieceSha256};
use shoal_proto::Digest;

const SIZE: u64 = 10 * 1024;
const PIECE: u64 = 1024;
const PIECES: u32 = 10;

fn id(i: u8) -> NodeId {
    NodeId::from_bytes([i; 32])
}

fn blob(i: u32) -> BlobId {
    Digest::sha256(&i.to_le_bytes())
}

fn cfg() -> StateConfig {
    StateConfig {
        warmup_ms: 0,
        ..StateConfig::default()
    }
}

fn node(i: u8) -> NodeAnnouncement {
    NodeAnnouncement {
        id: id(i),
        p2p_addr: format!("10.0.0.{i}:5062").parse().unwrap(),
        zone: None,
        upload_slots_free: 4,
        version: "test".into(),
    }
}

fn bits(held: u32) -> PieceBits {
    let mut b = PieceBits::empty(PIECES);
    for i in 0..held {
        b.set(i);
    }
    b
}

fn have(b: u32, held: u32) -> BlobAnnouncement {
    BlobAnnouncement {
        blob: blob(b),
        size: SIZE,
        piece_size: PIECE,
        have: bits(held),
        piece_sha256: None,
        complete: held == PIECES,
        origin_fetch: false,
        origin_bytes: 0,
        present_bytes: u64::from(held) * PIECE,
    }
}

fn announce(full: bool, n: u8, blobs: Vec<BlobAnnouncement>) -> AnnounceRequest {
    AnnounceRequest {
        node: node(n),
        full,
        blobs,
        removed: Vec::new(),
        traffic: Traffic::default(),
        job_progress: Vec::new(),
    }
}

fn ask(s: &mut State, b: u32, asker: u8, want_lease: bool, now: u64) -> ParentsResponse {
    s.parents(
        &blob(b),
        &ParentsRequest {
            asker: id(asker),
            size: Some(SIZE),
            want_lease,
        },
        now,
    )
    .unwrap()
}

fn holder_ids(r: &ParentsResponse) -> Vec<u8> {
    r.holders.iter().map(|h| h.node.as_bytes()[0]).collect()
}

fn lease_of(r: &ParentsResponse) -> Option<(u8, bool)> {
    r.lease
        .as_ref()
        .map(|l| (l.holder.as_bytes()[0], l.granted_to_you))
}

/// A state with nodes `ids` registered (empty full announcements) at `now`.
fn with_nodes(cfg: StateConfig, ids: &[u8], now: u64) -> State {
    let mut s = State::new(cfg, now);
    for i in ids {
        let r = s.announce(announce(true, *i, vec![]), now);
        assert!(!r.resync);
    }
    s
}

#[test]
fn unknown_node_must_resync() {
    let mut s = State::new(cfg(), 0);
    let r = s.announce(announce(false, 1, vec![have(1, 3)]), 0);
    assert!(r.resync);
    assert_eq!(s.node_count(), 0);
    assert_eq!(
        s.blob_count(),
        0,
        "a delta from an unknown node is not applied"
    );
    assert_eq!(s.take_events(), vec![Event::Resync { node: id(1) }]);
    let r = s.announce(announce(true, 1, vec![have(1, 3)]), 10);
    assert!(!r.resync);
    assert_eq!(r.heartbeat_interval_ms, 2_000);
    assert_eq!(r.node_ttl_ms, 6_000);
    let r = s.announce(announce(false, 1, vec![have(2, 1)]), 20);
    assert!(!r.resync);
    assert_eq!(s.blob_count(), 2);
}

#[test]
fn two_askers_one_lease() {
    let mut s = with_nodes(cfg(), &[1, 2, 3], 0);
    let a = ask(&mut s, 1, 1, true, 100);
    assert_eq!(lease_of(&a), Some((1, true)));
    assert!(a.holders.is_empty(), "the asker is never its own parent");
    let b = ask(&mut s, 1, 2, true, 110);
    assert_eq!(lease_of(&b), Some((1, false)));
    assert_eq!(
        holder_ids(&b),
        vec![1],
        "the lease holder is a parent (seed)"
    );
    assert!(b.holders[0].lease_holder);
    let a2 = ask(&mut s, 1, 1, true, 120);
    assert_eq!(lease_of(&a2), Some((1, true)), "asking again keeps it");
    assert_eq!(s.lease_count(), 1);
    assert_eq!(a2.size, Some(SIZE));
}

#[test]
fn max_origin_leases_is_respected() {
    let mut s = with_nodes(
        StateConfig {
            max_origin_leases: 2,
            ..cfg()
        },
        &[1, 2, 3],
        0,
    );
    assert_eq!(lease_of(&ask(&mut s, 1, 1, true, 1)), Some((1, true)));
    assert_eq!(lease_of(&ask(&mut s, 1, 2, true, 2)), Some((2, true)));
    let third = ask(&mut s, 1, 3, true, 3);
    assert!(matches!(lease_of(&third), Some((_, false))));
    assert_eq!(s.lease_count(), 2);
}

#[test]
fn no_lease_without_want_or_with_complete_holder() {
    let mut s = with_nodes(cfg(), &[1, 2, 3], 0);
    assert_eq!(lease_of(&ask(&mut s, 1, 2, false, 1)), None);
    assert_eq!(s.blob_count(), 0, "an empty record is not kept");
    s.announce(announce(false, 1, vec![have(1, PIECES)]), 5);
    let r = ask(&mut s, 1, 2, true, 10);
    assert_eq!(lease_of(&r), None, "peers fetch from the complete holder");
    assert_eq!(holder_ids(&r), vec![1]);
    assert!(r.holders[0].complete);
    assert_eq!(r.holders[0].have, PieceBits::full(PIECES));
}

#[test]
fn ranking_complete_first_never_asker() {
    let mut s = with_nodes(cfg(), &[1, 2, 3, 4], 0);
    s.announce(announce(false, 1, vec![have(1, 4)]), 1);
    s.announce(announce(false, 2, vec![have(1, PIECES)]), 1);
    s.announce(announce(false, 3, vec![have(1, 8)]), 1);
    s.announce(announce(false, 4, vec![have(1, 0)]), 1);
    let r = ask(&mut s, 1, 3, false, 2);
    assert_eq!(
        holder_ids(&r),
        vec![2, 1],
        "complete first; empty holder and asker left out"
    );
    let r = ask(&mut s, 1, 4, false, 2);
    assert_eq!(holder_ids(&r), vec![2, 3, 1]);
}

#[test]
fn leases_spread_over_askers() {
    let mut s = with_nodes(
        StateConfig {
            warmup_ms: 100,
            ..cfg()
        },
        &[1, 2, 3],
        0,
    );
    // During warm-up, 2 wants blob 2 and 3 wants blob 3: no lease yet.
    assert!(ask(&mut s, 2, 2, true, 50).retry_after_ms.is_some());
    assert!(ask(&mut s, 3, 3, true, 60).retry_after_ms.is_some());
    // 1 asks first once it is over: it gets blob 1, but not blob 2, which
    // 2 (holding no lease) asked for within half a heartbeat.
    assert_eq!(lease_of(&ask(&mut s, 1, 1, true, 100)), Some((1, true)));
    let deferred = ask(&mut s, 2, 1, true, 100);
    assert_eq!(lease_of(&deferred), None);
    assert_eq!(
        deferred.retry_after_ms,
        Some(950),
        "ask again when 2's claim lapses"
    );
    assert_eq!(lease_of(&ask(&mut s, 2, 2, true, 150)), Some((2, true)));
    // A claim lapses: 3 did not come back within 1 s, so 1 takes blob 3.
    assert_eq!(lease_of(&ask(&mut s, 3, 1, true, 200)), None);
    assert_eq!(lease_of(&ask(&mut s, 3, 1, true, 1_060)), Some((1, true)));
    // Nobody else asked for blob 4: a node holding leases gets it at once.
    assert_eq!(lease_of(&ask(&mut s, 4, 2, true, 1_100)), Some((2, true)));
    assert_eq!(s.lease_count(), 4);
}

fn big_id(i: u32) -> NodeId {
    let mut b = [0xa5; 32];
    b[..4].copy_from_slice(&i.to_be_bytes());
    NodeId::from_bytes(b)
}

#[test]
fn many_holders_rank_a_fresh_sample() {
    let mut s = State::new(cfg(), 0);
    let n = 4 * RANK_SAMPLE as u32;
    for i in 0..n {
        let held = if i < 3 { PIECES } else { 1 + i % (PIECES - 1) };
        let mut req = announce(true, 1, vec![have(1, held)]);
        req.node.id = big_id(i);
        assert!(!s.announce(req, 0).resync);
    }
    let max = s.config().max_parents;
    let complete: Vec<NodeId> = (0..3).map(big_id).collect();
    let mut firsts = HashSet::new();
    for asker in 3..60 {
        let req = ParentsRequest {
            asker: big_id(asker),
            size: Some(SIZE),
            want_lease: true,
        };
        let r = s.parents(&blob(1), &req, 10 + u64::from(asker)).unwrap();
        assert!(r.lease.is_none(), "complete holders exist");
        assert_eq!(r.holders.len(), max);
        assert!(r.holders.iter().all(|h| h.node != big_id(asker)));
        let top: Vec<NodeId> = r.holders[..3].iter().map(|h| h.node).collect();
        assert!(
            complete.iter().all(|c| top.contains(c)),
            "every complete holder first, sample or not"
        );
        assert!(r.holders[3..].iter().all(|h| !h.complete));
        firsts.insert(r.holders[3].node);
    }
    assert!(
        firsts.len() > 5,
        "askers spread over the partial holders, not all sent to the same few"
    );
}

#[test]
fn long_labels_are_clipped() {
    let mut s = State::new(cfg(), 0);
    let mut req = announce(true, 1, vec![]);
    req.node.zone = Some("é".repeat(100));
    req.node.version = "v".repeat(1000);
    s.announce(req, 0);
    let (nodes, _, _) = s.status(0);
    assert!(nodes[0]
        .zone
        .as_ref()
        .is_some_and(|z| z.len() <= 64 && z.starts_with('é')));
    assert_eq!(nodes[0].version.len(), 64);
}

#[test]
fn same_zone_ranks_higher() {
    let mut s = State::new(cfg(), 0);
    for (i, zone) in [(1, "a"), (2, "b"), (3, "b")] {
        let mut req = announce(true, i, vec![have(1, 5)]);
        req.node.zone = Some(zone.into());
        s.announce(req, 0);
    }
    let r = ask(&mut s, 1, 3, false, 1);
    assert_eq!(holder_ids(&r), vec![2, 1]);
}

#[test]
fn lease_progress_renews_and_stall_hands_over() {
    let mut s = with_nodes(cfg(), &[1, 2, 3], 0);
    assert_eq!(lease_of(&ask(&mut s, 1, 1, true, 0)), Some((1, true)));
    let mut a = have(1, 0);
    a.origin_fetch = true;
    // Heartbeats every 2s; node 1 shows progress (origin bytes) only at 8s.
    let beat = |s: &mut State, now: u64, a: &BlobAnnouncement| {
        for n in [1, 2, 3] {
            let blobs = if n == 1 { vec![a.clone()] } else { vec![] };
            let r = s.announce(announce(false, n, blobs), now);
            assert!(r.leases_revoked.is_empty(), "at {now}");
        }
    };
    for now in [2_000, 4_000, 6_000] {
        beat(&mut s, now, &a);
    }
    a.origin_bytes = 100;
    for now in [8_000, 10_000, 12_000, 14_000] {
        beat(&mut s, now, &a);
    }
    s.tick(15_000);
    assert_eq!(s.lease_count(), 1, "progress at 8s renewed it");
    for now in [16_000, 18_000] {
        beat(&mut s, now, &a);
    }
    s.tick(18_001);
    assert_eq!(s.lease_count(), 0);
    assert!(s.take_events().contains(&Event::LeaseEnded {
        blob: blob(1),
        node: id(1),
        why: LeaseEnd::Stalled
    }));
    // The stalled node hears it at its next announcement and cannot re-adopt
    // the lease by claiming origin_fetch.
    let r = s.announce(announce(false, 1, vec![a.clone()]), 18_500);
    assert_eq!(r.leases_revoked, vec![blob(1)]);
    assert_eq!(s.lease_count(), 0);
    // Nor take it back by asking, while cooling down.
    assert_eq!(lease_of(&ask(&mut s, 1, 1, true, 19_000)), None);
    // The next asker gets it.
    assert_eq!(lease_of(&ask(&mut s, 1, 2, true, 19_100)), Some((2, true)));
    assert_eq!(lease_of(&ask(&mut s, 1, 1, true, 19_200)), Some((2, false)));
}

#[test]
fn stall_is_detected_on_ask_without_tick() {
    let mut s = with_nodes(cfg(), &[1, 2], 0);
    ask(&mut s, 1, 1, true, 0);
    s.announce(announce(false, 1, vec![]), 5_000);
    s.announce(announce(false, 2, vec![]), 5_000);
    assert_eq!(lease_of(&ask(&mut s, 1, 2, true, 10_001)), Some((2, true)));
}

#[test]
fn expired_node_is_never_returned_and_loses_its_lease() {
    let mut s = with_nodes(cfg(), &[1, 2, 3], 0);
    s.announce(announce(false, 1, vec![have(1, 5)]), 0);
    ask(&mut s, 1, 1, true, 0);
    // Node 1 goes silent; 2 and 3 keep announcing.
    for now in [2_000, 4_000, 6_000] {
        s.announce(announce(false, 2, vec![]), now);
        s.announce(announce(false, 3, vec![]), now);
    }
    // Past its TTL but before any tick: already not returned.
    let r = ask(&mut s, 1, 2, true, 6_001);
    assert!(holder_ids(&r).is_empty());
    assert_eq!(
        lease_of(&r),
        Some((2, true)),
        "its lease moved to the asker"
    );
    s.announce(announce(false, 2, vec![]), 8_000);
    s.announce(announce(false, 3, vec![]), 8_000);
    s.tick(8_000);
    assert_eq!(s.node_count(), 2);
    assert!(s
        .take_events()
        .contains(&Event::NodeExpired { node: id(1) }));
    let r = ask(&mut s, 1, 3, false, 8_000);
    assert_eq!(holder_ids(&r), vec![2]);
    // It comes back: a delta is refused, a full announcement re-registers it.
    assert!(
        s.announce(announce(false, 1, vec![have(1, 5)]), 9_000)
            .resync
    );
    s.announce(announce(true, 1, vec![have(1, 5)]), 9_100);
    assert_eq!(holder_ids(&ask(&mut s, 1, 3, false, 9_200)), vec![1, 2]);
}

#[test]
fn restart_rebuilds_from_full_announcements() {
    let mut s = State::new(
        StateConfig {
            warmup_ms: 3_000,
            ..cfg()
        },
        50_000,
    );
    // A node that held the lease before the restart.
    let mut fetching = have(1, 4);
    fetching.origin_fetch = true;
    assert!(
        s.announce(announce(false, 1, vec![fetching.clone()]), 50_100)
            .resync
    );
    // Asking during warm-up: no lease, ask again later.
    let r = ask(&mut s, 1, 2, true, 50_200);
    assert_eq!(lease_of(&r), None);
    assert_eq!(r.retry_after_ms, Some(2_800));
    s.announce(announce(true, 1, vec![fetching, have(2, PIECES)]), 50_300);
    s.announce(announce(true, 2, vec![]), 50_300);
    assert_eq!(s.blob_count(), 2);
    // Node 1 got its lease back; others pipeline behind it.
    let r = ask(&mut s, 1, 2, true, 50_400);
    assert_eq!(lease_of(&r), Some((1, false)));
    assert_eq!(r.retry_after_ms, None);
    assert_eq!(holder_ids(&r), vec![1]);
    assert!(s.take_events().contains(&Event::LeaseGranted {
        blob: blob(1),
        node: id(1),
        adopted: true
    }));
}

#[test]
fn unknown_asker_gets_no_lease_but_a_retry_hint() {
    let mut s = State::new(cfg(), 0);
    let r = ask(&mut s, 1, 9, true, 10);
    assert_eq!(lease_of(&r), None);
    assert_eq!(r.retry_after_ms, Some(2_000));
}

#[test]
fn origin_fetch_without_lease_is_told_to_stop() {
    let mut s = with_nodes(cfg(), &[1, 2], 0);
    ask(&mut s, 1, 1, true, 0);
    let mut rogue = have(1, 1);
    rogue.origin_fetch = true;
    let r = s.announce(announce(false, 2, vec![rogue]), 10);
    assert_eq!(r.leases_revoked, vec![blob(1)]);
    assert_eq!(s.lease_count(), 1);
}

#[test]
fn completion_ends_the_lease() {
    let mut s = with_nodes(cfg(), &[1, 2], 0);
    ask(&mut s, 1, 1, true, 0);
    let r = s.announce(announce(false, 1, vec![have(1, PIECES)]), 10);
    assert!(
        r.leases_revoked.is_empty(),
        "completion is not a revocation"
    );
    assert_eq!(s.lease_count(), 0);
    assert_eq!(lease_of(&ask(&mut s, 1, 2, true, 20)), None);
}

#[test]
fn full_announcement_replaces_and_removed_drops() {
    let mut s = with_nodes(cfg(), &[1, 2], 0);
    s.announce(
        announce(false, 1, vec![have(1, 5), have(2, 5), have(3, 5)]),
        1,
    );
    s.announce(announce(true, 1, vec![have(2, 5), have(3, 5)]), 2);
    assert!(ask(&mut s, 1, 2, false, 3).holders.is_empty());
    let mut req = announce(false, 1, vec![]);
    req.removed = vec![blob(2)];
    s.announce(req, 4);
    assert!(ask(&mut s, 2, 2, false, 5).holders.is_empty());
    assert_eq!(holder_ids(&ask(&mut s, 3, 2, false, 5)), vec![1]);
    assert_eq!(s.blob_count(), 1);
}

#[test]
fn removing_the_blob_ends_the_lease() {
    let mut s = with_nodes(cfg(), &[1, 2], 0);
    s.announce(announce(false, 1, vec![have(1, 2)]), 0);
    ask(&mut s, 1, 1, true, 0);
    let mut req = announce(false, 1, vec![]);
    req.removed = vec![blob(1)];
    s.announce(req, 5);
    assert_eq!(lease_of(&ask(&mut s, 1, 2, true, 6)), Some((2, true)));
}

#[test]
fn bad_piece_blame_excludes_then_decays() {
    let mut s = with_nodes(cfg(), &[1, 2, 3], 0);
    s.announce(announce(false, 1, vec![have(1, PIECES)]), 0);
    s.announce(announce(false, 2, vec![have(1, 5)]), 0);
    let report = FailureReport {
        reporter: id(3),
        peer: id(1),
        reason: FailureReason::BadPiece,
    };
    assert!(s.report_failure(&blob(1), &report, 100).counted);
    let r = ask(&mut s, 1, 3, true, 200);
    assert_eq!(holder_ids(&r), vec![2], "bad node excluded");
    assert_eq!(
        lease_of(&r),
        Some((3, true)),
        "the only complete holder is blamed, so a lease is granted"
    );
    // After one half-life (60s) plus a bit, it is back (keep everyone alive).
    for now in (2_000..=62_000).step_by(2_000) {
        for n in [1, 2, 3] {
            s.announce(announce(false, n, vec![]), now);
        }
    }
    let r = ask(&mut s, 1, 3, false, 62_000);
    assert_eq!(holder_ids(&r), vec![1, 2]);
    // Self-reports and reports against unknown nodes do not count.
    let selfish = FailureReport {
        reporter: id(3),
        peer: id(3),
        reason: FailureReason::BadPiece,
    };
    assert!(!s.report_failure(&blob(1), &selfish, 62_000).counted);
    let ghost = FailureReport {
        reporter: id(3),
        peer: id(99),
        reason: FailureReason::Stalled,
    };
    assert!(!s.report_failure(&blob(1), &ghost, 62_000).counted);
}

#[test]
fn bad_piece_revokes_the_lease() {
    let mut s = with_nodes(cfg(), &[1, 2], 0);
    ask(&mut s, 1, 1, true, 0);
    s.report_failure(
        &blob(1),
        &FailureReport {
            reporter: id(2),
            peer: id(1),
            reason: FailureReason::BadPiece,
        },
        10,
    );
    assert_eq!(lease_of(&ask(&mut s, 1, 2, true, 20)), Some((2, true)));
    let r = s.announce(announce(false, 1, vec![]), 30);
    assert_eq!(r.leases_revoked, vec![blob(1)]);
}

#[test]
fn unreachable_demotes_but_keeps() {
    let mut s = with_nodes(cfg(), &[1, 2, 3], 0);
    s.announce(announce(false, 1, vec![have(1, PIECES)]), 0);
    s.announce(announce(false, 2, vec![have(1, PIECES)]), 0);
    for _ in 0..2 {
        s.report_failure(
            &blob(1),
            &FailureReport {
                reporter: id(3),
                peer: id(2),
                reason: FailureReason::Unreachable,
            },
            10,
        );
    }
    let r = ask(&mut s, 1, 3, false, 20);
    assert_eq!(holder_ids(&r), vec![1, 2]);
    assert!(r.holders[1].score < r.holders[0].score);
}

#[test]
fn piece_hashes_from_lease_holder_and_complete_holders_only() {
    let mut s = with_nodes(cfg(), &[1, 2, 3], 0);
    let h = |b: u8| Some(PieceSha256([b; 32]));
    let mut list = vec![None; PIECES as usize];
    list[0] = h(1);
    // Node 2 is no lease holder: its list is ignored.
    let mut from_2 = have(1, 1);
    from_2.piece_sha256 = Some(list.clone());
    s.announce(announce(false, 2, vec![from_2]), 0);
    assert_eq!(ask(&mut s, 1, 3, false, 1).piece_sha256, None);
    // Node 1 takes the lease and reports hashes as it goes.
    ask(&mut s, 1, 1, true, 2);
    let mut from_1 = have(1, 1);
    from_1.piece_sha256 = Some(list.clone());
    s.announce(announce(false, 1, vec![from_1]), 3);
    let got = ask(&mut s, 1, 3, false, 4).piece_sha256.unwrap();
    assert_eq!(got[0], h(1));
    assert_eq!(got[1], None);
    // A complete holder without a complete list is asked for one.
    let r = s.announce(announce(false, 3, vec![have(1, PIECES)]), 5);
    assert_eq!(r.piece_sha256_wanted, vec![blob(1)]);
    let mut full = have(1, PIECES);
    full.piece_sha256 = Some((0..PIECES as u8).map(h).collect());
    let r = s.announce(announce(false, 3, vec![full]), 6);
    assert!(r.piece_sha256_wanted.is_empty());
    let got = ask(&mut s, 1, 2, false, 7).piece_sha256.unwrap();
    assert!(got.iter().all(Option::is_some));
}

#[test]
fn geometry_conflicts_are_rejected() {
    let mut s = with_nodes(cfg(), &[1, 2], 0);
    s.announce(announce(false, 1, vec![have(1, 3)]), 0);
    let mut liar = have(1, 3);
    liar.size = SIZE - 1; // same piece count, other size
    s.announce(announce(false, 2, vec![liar]), 1);
    assert_eq!(holder_ids(&ask(&mut s, 1, 9, false, 2)), vec![1]);
    let mut short = have(2, 0);
    short.have = PieceBits::empty(3);
    s.announce(announce(false, 2, vec![short]), 3);
    let events = s.take_events();
    assert!(events.iter().any(|e| matches!(
        e,
        Event::BlobRejected {
            reason: BlobRejection::SizeMismatch { .. },
            ..
        }
    )));
    assert!(events.iter().any(|e| matches!(
        e,
        Event::BlobRejected {
            reason: BlobRejection::PieceCount { .. },
            ..
        }
    )));
    assert_eq!(s.blob_count(), 1);
}

#[test]
fn sharding_keeps_own_blobs_and_refuses_others() {
    let cluster = vec!["s1:5060".to_string(), "s2:5060".to_string()];
    let mut s = with_nodes(
        StateConfig {
            shard: Shard::member("s1:5060".into(), cluster.clone()),
            ..cfg()
        },
        &[1, 2],
        0,
    );
    let (mine, theirs): (Vec<u32>, Vec<u32>) =
        (0..40).partition(|b| pick_scheduler(&blob(*b), &cluster) == Some(&cluster[0]));
    assert!(!mine.is_empty() && !theirs.is_empty());
    let all: Vec<BlobAnnouncement> = (0..40).map(|b| have(b, 5)).collect();
    s.announce(announce(false, 1, all), 1);
    assert_eq!(s.blob_count(), mine.len());
    assert_eq!(holder_ids(&ask(&mut s, mine[0], 2, false, 2)), vec![1]);
    let err = s
        .parents(
            &blob(theirs[0]),
            &ParentsRequest {
                asker: id(2),
                size: None,
                want_lease: true,
            },
            3,
        )
        .unwrap_err();
    assert_eq!(err.owner, "s2:5060");
}

#[test]
fn status_reports_nodes_blobs_and_traffic() {
    let mut s = with_nodes(cfg(), &[1, 2], 0);
    let mut req = announce(false, 1, vec![have(1, PIECES), have(2, 3)]);
    req.traffic = Traffic {
        from_origin: 100,
        from_peers: 5,
        to_peers: 7,
        served_local: 1,
    };
    s.announce(req, 10);
    let mut req = announce(false, 2, vec![have(2, 1)]);
    req.traffic.from_peers = 50;
    s.announce(req, 10);
    ask(&mut s, 2, 2, true, 20);
    let (nodes, blobs, totals) = s.status(30);
    assert_eq!(nodes.len(), 2);
    let n1 = nodes.iter().find(|n| n.id == id(1)).unwrap();
    assert_eq!(
        (n1.blobs_held, n1.blobs_complete, n1.last_seen_ms_ago),
        (2, 1, 20)
    );
    assert_eq!(totals.from_origin, 100);
    assert_eq!(totals.from_peers, 55);
    assert_eq!(blobs.len(), 2);
    let b2 = blobs.iter().find(|b| b.blob == blob(2)).unwrap();
    assert_eq!(
        (b2.holders, b2.complete_holders, b2.leases.len()),
        (2, 0, 1)
    );
}

// -- property test: random operations keep the invariants -----------------

#[derive(Clone, Debug)]
enum Op {
    Announce {
        node: u8,
        full: bool,
        blob: u32,
        held: u32,
        origin_fetch: bool,
    },
    Remove {
        node: u8,
        blob: u32,
    },
    Ask {
        node: u8,
        blob: u32,
        want: bool,
    },
    Fail {
        reporter: u8,
        peer: u8,
        bad: bool,
    },
    Advance {
        ms: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..5, any::<bool>(), 0u32..3, 0u32..=PIECES, any::<bool>()).prop_map(
            |(node, full, blob, held, origin_fetch)| Op::Announce {
                node,
                full,
                blob,
                held,
                origin_fetch
            }
        ),
        (0u8..5, 0u32..3).prop_map(|(node, blob)| Op::Remove { node, blob }),
        (0u8..5, 0u32..3, any::<bool>()).prop_map(|(node, blob, want)| Op::Ask {
            node,
            blob,
            want
        }),
        (0u8..5, 0u8..5, any::<bool>()).prop_map(|(reporter, peer, bad)| Op::Fail {
            reporter,
            peer,
            bad
        }),
        (0u64..7_000).prop_map(|ms| Op::Advance { ms }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn invariants_hold(ops in proptest::collection::vec(op(), 1..80), max_leases in 1u32..3) {
        let cfg = StateConfig { max_origin_leases: max_leases, ..cfg() };
        let ttl = cfg.node_ttl_ms;
        let mut s = State::new(cfg, 0);
        let mut now = 0u64;
        for op in ops {
            match op {
                Op::Announce { node, full, blob: b, held, origin_fetch } => {
                    let mut a = have(b, held);
                    a.origin_fetch = origin_fetch;
                    s.announce(announce(full, node, vec![a]), now);
                }
                Op::Remove { node, blob: b } => {
                    let mut req = announce(false, node, vec![]);
                    req.removed = vec![blob(b)];
                    s.announce(req, now);
                }
                Op::Ask { node, blob: b, want } => {
                    let r = ask(&mut s, b, node, want, now);
                    for h in &r.holders {
                        prop_assert!(h.node != id(node), "asker returned");
                        prop_assert!(s.alive(h.node, now), "dead node returned");
                    }
                    if let Some(l) = &r.lease {
                        prop_assert!(s.alive(l.holder, now), "dead lease holder");
                    }
                }
                Op::Fail { reporter, peer, bad } => {
                    let reason = if bad { FailureReason::BadPiece } else { FailureReason::Unreachable };
                    s.report_failure(&blob(0), &FailureReport { reporter: id(reporter), peer: id(peer), reason }, now);
                }
                Op::Advance { ms } => {
                    now += ms;
                    s.tick(now);
                    for n in s.nodes.values() {
                        prop_assert!(n.alive(now, ttl), "tick left a dead node");
                    }
                }
            }
            for (b, rec) in &s.blobs {
                prop_assert!(rec.leases.len() <= max_leases as usize, "too many leases");
                let holders: HashSet<NodeId> = rec.leases.iter().map(|l| l.holder).collect();
                prop_assert_eq!(holders.len(), rec.leases.len(), "a node with two leases");
                for l in &rec.leases {
                    prop_assert!(s.nodes.contains_key(&l.holder), "lease of a forgotten node");
                }
                for h in rec.holders.keys() {
                    prop_assert!(s.nodes.get(h).is_some_and(|n| n.blobs.contains(b)), "holder not in node.blobs");
                }
            }
            for (nid, n) in &s.nodes {
                for b in &n.blobs {
                    prop_assert!(s.blobs.get(b).is_some_and(|r| r.holders.contains_key(nid)), "node.blobs not in holders");
                }
            }
        }
    }
}

mod jobs;
