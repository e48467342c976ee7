//! The soak smoke run (issue 12): a minute and a half of mixed load on a four-node cluster (each
//! node in its own network namespace, the real scheduler and origin registry) while nodes are
//! SIGKILLed and SIGTERMed by turns and the scheduler is SIGKILLed, each started again; see
//! `shoal_e2e::soak`. Asserts outcomes only: every answer byte-exact (no errors, also on the nodes
//! whose peers or scheduler just vanished), each kind of request and each kind of fault happened,
//! and every blob each node holds complete hashes to its digest at the end. The one-hour figures,
//! memory and descriptors included, come from `cargo run -p shoal-e2e --bin soak-bench`.
//!
//! Needs root, iproute2, `docker-registry`, `skopeo` and the `shoal` binary.

use anyhow::{ensure, Result};
use shoal_e2e::soak::{self, Fault, Kind, Plan};
use shoal_e2e::{cluster, netns, run};

#[test]
fn mixed_load_through_node_and_scheduler_restarts_gets_every_byte_right() {
    let name = "soak_smoke";
    if let Some(why) = netns::unavailable() {
        shoal_e2e::skip(name, &why);
        return;
    }
    run(name, cluster::NEEDS, |t| -> Result<()> {
        let plan = Plan::smoke();
        let o = soak::run(t, &plan)?;
        let errors = o.errors();
        ensure!(
            errors.is_empty(),
            "{} of {} requests failed, e.g. {:#?}",
            errors.len(),
            o.requests.len(),
            errors.iter().take(3).collect::<Vec<_>>()
        );
        for kind in Kind::ALL {
            ensure!(o.summary(kind).count > 0, "no {kind:?} request ran");
        }
        ensure!(
            o.count_faults(|f| matches!(f, Fault::NodeKilled(_))) > 0
                && o.count_faults(|f| matches!(f, Fault::NodeTerminated(_))) > 0
                && o.count_faults(|f| f == Fault::SchedulerKilled) > 0,
            "not every kind of fault happened: {:?}",
            o.faults
        );
        ensure!(o.fresh_read_bytes > 0, "no fresh blob was read");
        ensure!(
            o.corrupt_at_rest.is_empty(),
            "blobs complete on a node do not match their digest: {:?}",
            o.corrupt_at_rest
        );
        ensure!(o.checked_at_rest > 0, "no node held a complete blob");
        eprintln!(
            "soak smoke: {} requests, faults {:?}, fresh blobs {:.2}× from the origin",
            o.requests.len(),
            o.faults.iter().map(|f| f.fault).collect::<Vec<_>>(),
            o.fresh_origin_bytes as f64 / o.fresh_read_bytes.max(1) as f64
        );
        Ok(())
    });
}
