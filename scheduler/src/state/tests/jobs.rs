//! Prewarm job rules, driven with made-up times.

use super::*;
use shoal_proto::sched::{JobProgress, JobState, NodeJobState, NodeSelector};

fn job(image: &str, nodes: &str) -> JobRequest {
    JobRequest {
        image: image.into(),
        nodes: nodes.parse().unwrap(),
        full: false,
    }
}

fn report(j: JobId, state: NodeJobState, done: u64, total: u64) -> JobProgress {
    JobProgress {
        job: j,
        state,
        bytes_done: done,
        bytes_total: total,
        blobs_done: 0,
        blobs_total: 2,
        message: (state == NodeJobState::Failed).then(|| "manifest unknown".to_string()),
    }
}

/// A heartbeat of node `n` carrying `reports`; returns the jobs assigned.
fn beat(s: &mut State, n: u8, reports: Vec<JobProgress>, now: u64) -> Vec<JobId> {
    let mut req = announce(false, n, vec![]);
    req.job_progress = reports;
    let r = s.announce(req, now);
    assert!(!r.resync);
    r.jobs.iter().map(|a| a.job).collect()
}

fn zoned(s: &mut State, n: u8, zone: &str, now: u64) {
    let mut req = announce(true, n, vec![]);
    req.node.zone = Some(zone.into());
    s.announce(req, now);
}

fn node_state(st: &JobStatus, n: u8) -> NodeJobState {
    st.nodes
        .iter()
        .find(|x| x.node == id(n))
        .map(|x| x.state)
        .unwrap()
}

#[test]
fn all_nodes_get_the_job_until_they_report_done() {
    let mut s = with_nodes(cfg(), &[1, 2, 3], 0);
    let j = JobId(1);
    let st = s.create_job(j, job("reg:5000/app:1", "all"), 100).unwrap();
    assert_eq!(st.nodes.len(), 3);
    assert_eq!(st.state, JobState::Running);
    assert!(st.nodes.iter().all(|n| n.state == NodeJobState::Pending));
    assert_eq!(beat(&mut s, 1, vec![], 200), vec![j]);
    // Running with progress, then done: no longer assigned.
    assert_eq!(
        beat(
            &mut s,
            1,
            vec![report(j, NodeJobState::Running, 5, 10)],
            300
        ),
        vec![j]
    );
    let st = s.job(j, 300).unwrap();
    assert_eq!(node_state(&st, 1), NodeJobState::Running);
    assert_eq!((st.bytes_done, st.bytes_total), (5, 10));
    assert!(beat(&mut s, 1, vec![report(j, NodeJobState::Done, 10, 10)], 400).is_empty());
    // A stale report cannot undo a final state.
    beat(
        &mut s,
        1,
        vec![report(j, NodeJobState::Running, 1, 10)],
        450,
    );
    assert_eq!(node_state(&s.job(j, 450).unwrap(), 1), NodeJobState::Done);
    for n in [2, 3] {
        beat(&mut s, n, vec![report(j, NodeJobState::Done, 10, 10)], 500);
    }
    let st = s.job(j, 900).unwrap();
    assert_eq!(st.state, JobState::Done);
    assert_eq!(st.elapsed_ms, 400, "finished at 500, created at 100");
    assert_eq!(st.nodes[0].finished_after_ms, Some(300));
    assert!(s
        .take_events()
        .contains(&Event::JobCreated { job: j, nodes: 3 }));
}

#[test]
fn one_failure_fails_the_job_with_the_nodes_message() {
    let mut s = with_nodes(cfg(), &[1, 2], 0);
    let j = JobId(2);
    s.create_job(j, job("reg/missing:1", "all"), 0).unwrap();
    beat(&mut s, 1, vec![report(j, NodeJobState::Failed, 0, 0)], 10);
    let st = s.job(j, 10).unwrap();
    assert_eq!(st.state, JobState::Running, "node 2 still pending");
    beat(&mut s, 2, vec![report(j, NodeJobState::Done, 0, 0)], 20);
    let st = s.job(j, 20).unwrap();
    assert_eq!(st.state, JobState::Failed);
    let failed = st.nodes.iter().find(|n| n.node == id(1)).unwrap();
    assert_eq!(failed.message.as_deref(), Some("manifest unknown"));
}

#[test]
fn selection_by_count_and_zone() {
    let mut s = with_nodes(cfg(), &[1, 2, 3, 4], 0);
    zoned(&mut s, 5, "eu", 0);
    zoned(&mut s, 6, "eu", 0);
    let st = s.create_job(JobId(3), job("a/b:1", "2"), 0).unwrap();
    assert_eq!(st.nodes.len(), 2);
    // Another job picks (likely) other nodes: spread by job id, but always 2.
    let other = s.create_job(JobId(4), job("a/b:1", "2"), 0).unwrap();
    assert_eq!(other.nodes.len(), 2);
    let st = s.create_job(JobId(5), job("a/b:1", "zone=eu"), 0).unwrap();
    let ids: Vec<NodeId> = st.nodes.iter().map(|n| n.node).collect();
    assert_eq!(ids, vec![id(5), id(6)]);
    assert_eq!(st.nodes[0].zone.as_deref(), Some("eu"));
    assert_eq!(
        s.create_job(JobId(6), job("a/b:1", "zone=us"), 0),
        Err(JobError::NoNodes {
            selector: NodeSelector::Zone("us".into()),
            live: 6
        })
    );
    assert_eq!(
        s.create_job(JobId(7), job("a/b:1", "7"), 0),
        Err(JobError::TooFewNodes { wanted: 7, live: 6 })
    );
    // Only live nodes count.
    assert!(matches!(
        s.create_job(JobId(8), job("a/b:1", "all"), 100_000),
        Err(JobError::NoNodes { live: 0, .. })
    ));
}

#[test]
fn bad_requests_are_refused() {
    let mut s = with_nodes(cfg(), &[1], 0);
    for bad in ["", "  ", "a b:1"] {
        assert!(
            matches!(
                s.create_job(JobId(1), job(bad, "all"), 0),
                Err(JobError::BadImage { .. })
            ),
            "{bad:?}"
        );
    }
    s.create_job(JobId(1), job("a/b", "all"), 0).unwrap();
    assert_eq!(
        s.create_job(JobId(1), job("a/b", "all"), 0),
        Err(JobError::Duplicate(JobId(1)))
    );
    assert_eq!(s.job(JobId(9), 0), Err(JobError::NotFound(JobId(9))));
    assert_eq!(s.cancel_job(JobId(9), 0), Err(JobError::NotFound(JobId(9))));
    for i in 2..=crate::state::jobs::MAX_ACTIVE as u64 {
        s.create_job(JobId(i), job("a/b", "all"), 0).unwrap();
    }
    assert_eq!(
        s.create_job(JobId(1000), job("a/b", "all"), 0),
        Err(JobError::TooMany)
    );
}

#[test]
fn cancel_stops_assigning_and_ignores_later_reports() {
    let mut s = with_nodes(cfg(), &[1, 2], 0);
    let j = JobId(10);
    s.create_job(j, job("a/b:1", "all"), 0).unwrap();
    beat(&mut s, 1, vec![report(j, NodeJobState::Done, 10, 10)], 10);
    beat(&mut s, 2, vec![report(j, NodeJobState::Running, 3, 10)], 10);
    let st = s.cancel_job(j, 20).unwrap();
    assert_eq!(st.state, JobState::Cancelled);
    assert_eq!(
        node_state(&st, 1),
        NodeJobState::Done,
        "finished stays done"
    );
    assert_eq!(node_state(&st, 2), NodeJobState::Cancelled);
    assert!(beat(&mut s, 2, vec![report(j, NodeJobState::Done, 10, 10)], 30).is_empty());
    let st = s.job(j, 30).unwrap();
    assert_eq!(node_state(&st, 2), NodeJobState::Cancelled);
    assert_eq!(st.state, JobState::Cancelled);
    // Cancelling again (or a finished job) changes nothing.
    assert_eq!(s.cancel_job(j, 40).unwrap().state, JobState::Cancelled);
}

#[test]
fn a_dead_node_fails_its_part_and_finished_jobs_expire() {
    let mut s = with_nodes(cfg(), &[1, 2], 0);
    let j = JobId(11);
    s.create_job(j, job("a/b:1", "all"), 0).unwrap();
    // Node 1 keeps announcing, node 2 goes silent.
    for t in (1_000..=8_000).step_by(1_000) {
        beat(&mut s, 1, vec![report(j, NodeJobState::Running, 1, 10)], t);
        s.tick(t);
    }
    let st = s.job(j, 8_000).unwrap();
    assert_eq!(node_state(&st, 2), NodeJobState::Failed);
    let msg = st.nodes[1].message.clone().unwrap_or_default();
    assert!(msg.contains("stopped announcing"), "{msg}");
    assert_eq!(st.state, JobState::Running);
    beat(
        &mut s,
        1,
        vec![report(j, NodeJobState::Done, 10, 10)],
        9_000,
    );
    assert_eq!(s.job(j, 9_000).unwrap().state, JobState::Failed);
    s.tick(9_000 + crate::state::jobs::KEEP_FINISHED_MS);
    assert_eq!(
        s.job(j, 9_000 + crate::state::jobs::KEEP_FINISHED_MS)
            .map(|_| ()),
        Ok(())
    );
    s.tick(9_001 + crate::state::jobs::KEEP_FINISHED_MS);
    assert!(s
        .jobs(9_001 + crate::state::jobs::KEEP_FINISHED_MS)
        .is_empty());
}

#[test]
fn reports_from_unselected_nodes_or_unknown_jobs_are_ignored() {
    let mut s = with_nodes(cfg(), &[1], 0);
    let j = JobId(12);
    s.create_job(j, job("a/b:1", "all"), 0).unwrap();
    s.announce(announce(true, 2, vec![]), 5);
    assert!(beat(&mut s, 2, vec![report(j, NodeJobState::Done, 1, 1)], 10).is_empty());
    beat(
        &mut s,
        2,
        vec![report(JobId(99), NodeJobState::Done, 1, 1)],
        10,
    );
    let st = s.job(j, 10).unwrap();
    assert_eq!(st.nodes.len(), 1);
    assert_eq!(node_state(&st, 1), NodeJobState::Pending);
    // A node cannot report itself cancelled or pending after running.
    beat(&mut s, 1, vec![report(j, NodeJobState::Running, 1, 2)], 20);
    beat(
        &mut s,
        1,
        vec![report(j, NodeJobState::Cancelled, 1, 2)],
        30,
    );
    assert_eq!(node_state(&s.job(j, 30).unwrap(), 1), NodeJobState::Running);
    // Newest first.
    s.create_job(JobId(13), job("a/c:1", "all"), 40).unwrap();
    let list: Vec<JobId> = s.jobs(50).iter().map(|j| j.id).collect();
    assert_eq!(list, vec![JobId(13), j]);
}
