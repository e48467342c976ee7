//! The crash-point smoke run (issue 12, R5): a handful of `kill -9`s of a node — at byte offsets
//! of a download, inside a commit, at completion, in the middle of an eviction, and on either side
//! of a peer transfer over QUIC — each followed
//! by a clean restart, after which every blob the node holds must hash to its digest on disk,
//! every blob it serves must be byte-exact, and no blob complete before the crash may be lost.
//! The ≥ 100-point run is `cargo run -p shoal-e2e --bin crash-bench`. Needs the `shoal` binary
//! built with `--features fault-injection` (the test command builds it so).

use anyhow::{ensure, Result};
use shoal_e2e::crash::{run_case, Case, Origin, Scenario};
use shoal_e2e::{run, Need};

#[test]
fn a_node_killed_at_crash_points_restarts_with_every_byte_right_and_nothing_committed_lost() {
    run(
        "crash_points",
        &[Need::Bin("docker-registry"), Need::Shoal],
        |t| -> Result<()> {
            let origin = Origin::start(t)?;
            let cases = [
                (Scenario::Download, "write:1048576"),
                (Scenario::Download, "write:6000000"),
                (Scenario::Download, "commit.before_record:1"),
                (Scenario::Download, "commit.after_record:1"),
                (Scenario::Download, "complete.before_record:1"),
                (Scenario::Eviction, "write:4194304"),
                (Scenario::Eviction, "drop.after_record:1"),
                (Scenario::Peer, "p2p.serve.mid_body:2"),
                (Scenario::Peer, "write:3000000"),
            ];
            for (i, (scenario, spec)) in cases.into_iter().enumerate() {
                let case = Case {
                    scenario,
                    spec: spec.to_owned(),
                };
                let r = run_case(t, &origin, &case, &format!("node-{i}"))?;
                println!(
                    "{} {spec}: crashed {}, restart {:?}",
                    scenario.label(),
                    r.crashed,
                    r.restart
                );
                ensure!(r.crashed, "{spec}: the node never reached the crash point");
                ensure!(
                    r.bad_at_rest.is_empty(),
                    "{spec}: corrupt at rest: {:?}",
                    r.bad_at_rest
                );
                ensure!(
                    r.bad_served.is_empty(),
                    "{spec}: served wrong: {:?}",
                    r.bad_served
                );
                ensure!(
                    r.lost.is_empty(),
                    "{spec}: committed blobs lost: {:?}",
                    r.lost
                );
            }
            Ok(())
        },
    );
}
