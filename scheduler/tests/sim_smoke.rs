//! The scheduler at scale, in the normal test run: 1,000 simulated nodes
//! pull a small image through three real scheduler replicas
//! (`shoal_scheduler::sim`) while some nodes crash mid-transfer and some
//! serve corrupt pieces. Outcomes only; no timing is asserted.
#![allow(clippy::unwrap_used)]

use shoal_scheduler::sim::{self, SimConfig, SimReport};

const MIB: u64 = 1 << 20;

fn cluster(seed: u64) -> SimConfig {
    SimConfig {
        nodes: 1_000,
        seed,
        schedulers: 3,
        blob_sizes: vec![12 * MIB, 8 * MIB, 6 * MIB, 4 * MIB],
        start_window_ms: 2_000,
        leave_fraction: 0.02,
        leave_window_ms: 4_000,
        liar_fraction: 0.01,
        ..SimConfig::default()
    }
}

fn summary(r: &SimReport) -> String {
    format!(
        "completed {} incomplete {} left {}; origin {:.3}× ({} B held only by departed nodes); leases {} ended {:?}; fallbacks {:?}; violations {:?} {:#?}",
        r.completed,
        r.incomplete,
        r.left,
        r.origin_ratio(),
        r.departed_only_bytes,
        r.leases_granted,
        r.leases_ended,
        r.origin_fallbacks,
        r.violations,
        r.violation_samples,
    )
}

/// What every run must show, whoever left.
fn check_outcomes(r: &SimReport, max_leases: u32) {
    let s = summary(r);
    // Nodes left and liars were reported: the scenario happened.
    assert!(r.left > 0, "{s}");
    assert!(r.failure_reports > 0, "{s}");
    // Every node that stayed has every blob.
    assert_eq!(r.incomplete, 0, "{s}");
    assert_eq!(r.completed + r.left, r.nodes, "{s}");
    // No parents answer named the asker, a node blamed (at that scheduler)
    // for a bad piece, or a node gone past its TTL; never more leases than
    // allowed.
    assert_eq!(r.violation_total(), 0, "{s}");
    assert!(r.max_leases_per_blob <= max_leases, "{s}");
    assert_eq!(r.wrong_scheduler, 0, "{s}");
    assert_eq!(r.blobs_rejected, 0, "{s}");
}

#[test]
fn thousand_nodes_fetch_the_image_from_the_origin_once() {
    let cfg = SimConfig {
        kill_first_lease_holder: false,
        lease_holders_stay: true,
        ..cluster(12)
    };
    let max_leases = cfg.state.max_origin_leases;
    let r = sim::run(cfg);
    check_outcomes(&r, max_leases);
    assert!(
        r.origin_bytes <= r.image_bytes * 105 / 100,
        "{}",
        summary(&r)
    );
}

#[test]
fn a_crashed_lease_holder_is_replaced() {
    let cfg = SimConfig {
        kill_first_lease_holder: true,
        ..cluster(13)
    };
    let max_leases = cfg.state.max_origin_leases;
    let r = sim::run(cfg);
    check_outcomes(&r, max_leases);
    assert!(
        r.leases_ended.get("expired").copied().unwrap_or(0) >= 1,
        "{}",
        summary(&r)
    );
    // Bytes only the crashed holder had come from the origin again; nothing
    // else does.
    assert!(
        r.origin_bytes <= r.image_bytes * 105 / 100 + r.departed_only_bytes,
        "{}",
        summary(&r)
    );
}
