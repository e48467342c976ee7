//! Prometheus metrics of a node, as one struct passed to whoever records
//! (no globals). Names are part of the operator contract: change them only
//! with a note.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub method: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
}

/// All node metrics. Cheap to clone handles; register once.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<RouteLabels, Histogram>,
    pub served_bytes: Family<KindLabels, Counter>,
    pub origin_bytes: Family<KindLabels, Counter>,
    pub origin_requests: Family<KindLabels, Counter>,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub downloads_in_flight: Gauge,
    pub downloads_failed: Family<KindLabels, Counter>,
    pub access_checks: Family<KindLabels, Counter>,
    /// Chunk bytes (compressed) lazy mounts obtained, by source (`local`, `origin`).
    pub mount_chunk_bytes: Family<KindLabels, Counter>,
    /// Per-mount series (reads, bytes fetched by source, latency), encoded at scrape time from
    /// the live mounts' counters; the mount manager adds and removes mounts.
    pub mount_series: std::sync::Arc<crate::mount::exporter::MountSeries>,
    /// Blob bytes downloads obtained from peers (verified), by kind.
    pub peer_bytes: Family<KindLabels, Counter>,
    /// Pieces from peers that failed verification (evicted, peer blamed).
    pub bad_pieces: Counter,
    /// Where downloads went for their bytes, by decision (`lease`,
    /// `peers`, `dht`, `origin_fallback`, `origin_standalone`).
    pub fetch_decisions: Family<KindLabels, Counter>,
    /// Scheduler requests by operation (`announce`, `parents`, `failure`)
    /// and their latency.
    pub scheduler_requests: Family<KindLabels, Counter>,
    pub scheduler_errors: Family<KindLabels, Counter>,
    pub scheduler_duration: Family<KindLabels, Histogram>,
    /// The data plane's per-peer counters (`shoal_p2p_*`).
    pub p2p: crate::p2p::P2pMetrics,
    /// Totals kept for `shoal status` without parsing the registry.
    pub totals: Totals,
}

/// Plain totals mirrored from the counters for the status API.
#[derive(Debug, Default)]
pub struct Totals {
    pub served_bytes: AtomicU64,
    pub origin_bytes: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub peer_bytes: AtomicU64,
}

impl Totals {
    pub fn get(v: &AtomicU64) -> u64 {
        v.load(Ordering::Relaxed)
    }
}

fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("shoal");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "Mirror/proxy HTTP requests by route, method, status",
            requests.clone(),
        );
        let request_duration = Family::<RouteLabels, Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        registry.register(
            "request_duration_seconds",
            "Time to response headers, by route",
            request_duration.clone(),
        );
        let served_bytes = Family::<KindLabels, Counter>::default();
        registry.register(
            "served_bytes",
            "Bytes sent to clients (blob, manifest)",
            served_bytes.clone(),
        );
        let origin_bytes = Family::<KindLabels, Counter>::default();
        registry.register(
            "origin_bytes",
            "Bytes read from origin registries",
            origin_bytes.clone(),
        );
        let origin_requests = Family::<KindLabels, Counter>::default();
        registry.register(
            "origin_requests",
            "Requests sent to origin registries",
            origin_requests.clone(),
        );
        let cache_hits = Counter::default();
        registry.register(
            "blob_cache_hits",
            "Blob requests served from a complete local copy",
            cache_hits.clone(),
        );
        let cache_misses = Counter::default();
        registry.register(
            "blob_cache_misses",
            "Blob requests that needed a download",
            cache_misses.clone(),
        );
        let downloads_in_flight = Gauge::default();
        registry.register(
            "downloads_in_flight",
            "Blob downloads running now",
            downloads_in_flight.clone(),
        );
        let downloads_failed = Family::<KindLabels, Counter>::default();
        registry.register(
            "downloads_failed",
            "Blob downloads that failed, by reason",
            downloads_failed.clone(),
        );
        let access_checks = Family::<KindLabels, Counter>::default();
        registry.register(
            "access_checks",
            "Credential checks against origins, by outcome",
            access_checks.clone(),
        );
        let mount_chunk_bytes = Family::<KindLabels, Counter>::default();
        registry.register(
            "mount_chunk_bytes",
            "Chunk bytes lazy mounts obtained, by source (local, origin)",
            mount_chunk_bytes.clone(),
        );
        let mount_series = std::sync::Arc::new(crate::mount::exporter::MountSeries::default());
        registry.register_collector(Box::new(crate::mount::exporter::MountCollector(
            mount_series.clone(),
        )));
        let peer_bytes = Family::<KindLabels, Counter>::default();
        registry.register(
            "peer_bytes",
            "Bytes downloads obtained from peers (each piece verified), by kind",
            peer_bytes.clone(),
        );
        let bad_pieces = Counter::default();
        registry.register(
            "bad_pieces",
            "Pieces from peers that failed verification (dropped, sender blamed)",
            bad_pieces.clone(),
        );
        let fetch_decisions = Family::<KindLabels, Counter>::default();
        registry.register(
            "fetch_decisions",
            "Where downloads went for their bytes (lease, peers, dht, origin_fallback, origin_standalone)",
            fetch_decisions.clone(),
        );
        let scheduler_requests = Family::<KindLabels, Counter>::default();
        registry.register(
            "scheduler_requests",
            "Requests to schedulers, by operation",
            scheduler_requests.clone(),
        );
        let scheduler_errors = Family::<KindLabels, Counter>::default();
        registry.register(
            "scheduler_errors",
            "Failed requests to schedulers, by operation",
            scheduler_errors.clone(),
        );
        let scheduler_duration = Family::<KindLabels, Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        registry.register(
            "scheduler_request_duration_seconds",
            "Latency of scheduler requests, by operation",
            scheduler_duration.clone(),
        );
        let p2p = crate::p2p::P2pMetrics::default();
        p2p.register(&mut registry);
        Self {
            registry,
            peer_bytes,
            bad_pieces,
            fetch_decisions,
            scheduler_requests,
            scheduler_errors,
            scheduler_duration,
            p2p,
            requests,
            request_duration,
            served_bytes,
            origin_bytes,
            origin_requests,
            cache_hits,
            cache_misses,
            downloads_in_flight,
            downloads_failed,
            access_checks,
            mount_chunk_bytes,
            mount_series,
            totals: Totals::default(),
        }
    }

    pub fn served(&self, kind: &'static str, n: u64) {
        self.served_bytes
            .get_or_create(&KindLabels { kind })
            .inc_by(n);
        self.totals.served_bytes.fetch_add(n, Ordering::Relaxed);
    }

    pub fn from_origin(&self, kind: &'static str, n: u64) {
        self.origin_bytes
            .get_or_create(&KindLabels { kind })
            .inc_by(n);
        self.totals.origin_bytes.fetch_add(n, Ordering::Relaxed);
    }

    pub fn from_peers(&self, kind: &'static str, n: u64) {
        self.peer_bytes
            .get_or_create(&KindLabels { kind })
            .inc_by(n);
        self.totals.peer_bytes.fetch_add(n, Ordering::Relaxed);
    }

    pub fn decision(&self, kind: &'static str) {
        self.fetch_decisions
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    pub fn origin_request(&self, kind: &'static str) {
        self.origin_requests
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    pub fn hit(&self) {
        self.cache_hits.inc();
        self.totals.cache_hits.fetch_add(1, Ordering::Relaxed);
    }

    pub fn miss(&self) {
        self.cache_misses.inc();
        self.totals.cache_misses.fetch_add(1, Ordering::Relaxed);
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
