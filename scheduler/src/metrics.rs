//! Prometheus metrics of a scheduler, as one struct passed to whoever
//! records (no globals). Names (prefix `shoal_scheduler_`) are part of the
//! operator contract: change them only with a note.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: &'static str,
}

/// All scheduler metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// By kind: `full`, `delta`, `resync` (refused: node unknown).
    pub announcements: Family<KindLabels, Counter>,
    /// By outcome: `lease_granted`, `lease_elsewhere`, `holders`, `empty`,
    /// `retry`, `wrong_scheduler`.
    pub parent_requests: Family<KindLabels, Counter>,
    /// By kind: `asked`, `adopted` (re-announced after a restart).
    pub leases_granted: Family<KindLabels, Counter>,
    /// By reason: `stalled`, `expired`, `bad_piece`, `removed`, `completed`.
    pub leases_ended: Family<ReasonLabels, Counter>,
    /// Failure reports by reason.
    pub failure_reports: Family<ReasonLabels, Counter>,
    pub nodes_expired: Counter,
    pub blobs_rejected: Counter,
    /// Time from a request reaching the actor's queue to its answer, by op.
    pub decision_seconds: Family<OpLabels, Histogram>,
    pub nodes: Gauge,
    pub blobs: Gauge,
    pub leases: Gauge,
    pub jobs_created: Counter,
    /// Prewarm jobs kept (running and recently finished).
    pub jobs: Gauge,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        // `process_*` at the root (the names every dashboard knows), the
        // scheduler's own series under `shoal_scheduler_`.
        let mut root = Registry::default();
        root.register_collector(Box::new(crate::process_metrics::ProcessCollector));
        let registry = root.sub_registry_with_prefix("shoal_scheduler");
        registry.register_collector(Box::new(crate::process_metrics::BuildInfoCollector {
            component: "scheduler",
        }));
        let announcements = Family::<KindLabels, Counter>::default();
        registry.register(
            "announcements",
            "Node announcements by kind (full, delta, resync = refused until a full one)",
            announcements.clone(),
        );
        let parent_requests = Family::<KindLabels, Counter>::default();
        registry.register(
            "parent_requests",
            "Parents requests by outcome",
            parent_requests.clone(),
        );
        let leases_granted = Family::<KindLabels, Counter>::default();
        registry.register(
            "leases_granted",
            "Origin leases granted (asked, or adopted after a restart)",
            leases_granted.clone(),
        );
        let leases_ended = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "leases_ended",
            "Origin leases ended, by reason (completed, stalled, expired, bad_piece, removed)",
            leases_ended.clone(),
        );
        let failure_reports = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "failure_reports",
            "Failure reports counted against nodes, by reason",
            failure_reports.clone(),
        );
        let nodes_expired = Counter::default();
        registry.register(
            "nodes_expired",
            "Nodes forgotten after they stopped announcing",
            nodes_expired.clone(),
        );
        let blobs_rejected = Counter::default();
        registry.register(
            "blob_announcements_rejected",
            "Blob announcements not applied (bad or conflicting geometry)",
            blobs_rejected.clone(),
        );
        let decision_seconds = Family::<OpLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "decision_seconds",
            "Time from a request entering the scheduler's queue to its answer, by op",
            decision_seconds.clone(),
        );
        let nodes = Gauge::default();
        registry.register("nodes", "Live nodes", nodes.clone());
        let blobs = Gauge::default();
        registry.register("blobs", "Blobs with holders or leases", blobs.clone());
        let leases = Gauge::default();
        registry.register("leases", "Origin leases held now", leases.clone());
        let jobs_created = Counter::default();
        registry.register("jobs_created", "Prewarm jobs created", jobs_created.clone());
        let jobs = Gauge::default();
        registry.register(
            "jobs",
            "Prewarm jobs kept (running and recently finished)",
            jobs.clone(),
        );
        Self {
            registry: root,
            announcements,
            parent_requests,
            leases_granted,
            leases_ended,
            failure_reports,
            nodes_expired,
            blobs_rejected,
            decision_seconds,
            nodes,
            blobs,
            leases,
            jobs_created,
            jobs,
        }
    }

    pub fn count(family: &Family<KindLabels, Counter>, kind: &'static str) {
        family.get_or_create(&KindLabels { kind }).inc();
    }

    pub fn observe_decision(&self, op: &'static str, seconds: f64) {
        self.decision_seconds
            .get_or_create(&OpLabels { op })
            .observe(seconds);
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
