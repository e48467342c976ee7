//! Prometheus metrics of a node, as one struct passed to whoever records
//! (no globals). Names are part of the operator contract: change them only
//! with a note (deploy/grafana's dashboards name them; a test checks).
//!
//! Label cardinality is bounded: methods and origin statuses are mapped onto
//! fixed sets ([`method_label`], [`origin_status_label`]), routes and kinds
//! are `&'static str`, per-peer series are capped in `p2p::metrics`.
//! `process_*` series sit at the registry's root, everything else under
//! `shoal_`.

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
    /// One of [`method_label`]'s values, never the client's raw string.
    pub method: &'static str,
    pub status: u16,
}

/// `kind` (what was asked of the origin) and `status` (see
/// [`origin_status_label`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OriginErrorLabels {
    pub kind: &'static str,
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

/// A snapshotter request: `op` (the gRPC method) and `outcome` (`ok` or containerd's error
/// class).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpOutcomeLabels {
    pub op: &'static str,
    pub outcome: &'static str,
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
    /// Blob ranges far ahead of a running download served from the lease holder (the seed).
    pub seeded_ranges: Counter,
    pub downloads_in_flight: Gauge,
    pub downloads_failed: Family<KindLabels, Counter>,
    pub access_checks: Family<KindLabels, Counter>,
    /// Origin answers of 400 or more, and requests that got no answer, by
    /// kind and [`origin_status_label`].
    pub origin_errors: Family<OriginErrorLabels, Counter>,
    /// Store fill, updated at each scrape ([`Metrics::observe_store`]).
    pub store: StoreGauges,
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
    /// The containerd snapshotter: snapshots by kind, live lazy image mounts, requests by
    /// operation and outcome, and Nydus layers it provided (containerd downloaded nothing).
    pub snapshots: Family<KindLabels, Gauge>,
    pub snapshotter_images: Gauge,
    pub snapshotter_requests: Family<OpOutcomeLabels, Counter>,
    pub snapshotter_layers_provided: Counter,
    /// The conversion service (`[convert]`): jobs by state, finished jobs by outcome,
    /// notifications by result, source layer bytes by where they came from (`store`: held
    /// already; `fetched`: from peers or the origin), and the time from a push to its converted
    /// image.
    pub convert_jobs: Family<KindLabels, Gauge>,
    pub convert_outcomes: Family<KindLabels, Counter>,
    pub convert_notifications: Family<KindLabels, Counter>,
    pub convert_source_bytes: Family<KindLabels, Counter>,
    pub convert_push_to_converted: Histogram,
    /// The data plane's per-peer counters (`shoal_p2p_*`).
    pub p2p: crate::p2p::P2pMetrics,
    /// Totals kept for `shoal status` without parsing the registry.
    pub totals: Totals,
}

/// The store's fill and evictions as scrape-time gauges.
#[derive(Debug, Default)]
pub struct StoreGauges {
    /// Committed content bytes.
    pub bytes: Gauge,
    /// Blobs held (complete or partial) and complete ones.
    pub blobs: Gauge,
    pub complete_blobs: Gauge,
    /// The quota in bytes; 0 when the store follows its filesystem's fill.
    pub quota_bytes: Gauge,
    /// Size and free bytes of the data directory's filesystem.
    pub fs_size_bytes: Gauge,
    pub fs_free_bytes: Gauge,
    /// Blobs evicted since start (least recently used, over the quota).
    pub evictions: Counter,
    /// Blobs dropped because a piece did not match its hash.
    pub corrupt_dropped: Counter,
    /// The metadata database's memory, by part (`memtables`, `block_cache`, `table_readers`).
    pub meta_memory: Family<PartLabels, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartLabels {
    pub part: &'static str,
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
        // `process_*` at the root (the names dashboards know), the node's
        // own series under `shoal_`.
        let mut root = Registry::default();
        root.register_collector(Box::new(shoal_scheduler::process_metrics::ProcessCollector));
        let registry = root.sub_registry_with_prefix("shoal");
        registry.register_collector(Box::new(
            shoal_scheduler::process_metrics::BuildInfoCollector { component: "node" },
        ));
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
        let seeded_ranges = Counter::default();
        registry.register(
            "blob_seeded_ranges",
            "Blob ranges far ahead of a running download served from the lease holder, not the origin",
            seeded_ranges.clone(),
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
        let origin_errors = Family::<OriginErrorLabels, Counter>::default();
        registry.register(
            "origin_errors",
            "Origin answers >= 400 and requests without an answer (status timeout, connect, other), by kind and status",
            origin_errors.clone(),
        );
        let store = StoreGauges::default();
        store.register(registry);
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
        let snapshots = Family::<KindLabels, Gauge>::default();
        registry.register(
            "snapshots",
            "Snapshots the containerd snapshotter holds, by kind (active, view, committed)",
            snapshots.clone(),
        );
        for kind in ["active", "view", "committed"] {
            let _ = snapshots.get_or_create(&KindLabels { kind });
        }
        let snapshotter_images = Gauge::default();
        registry.register(
            "snapshotter_image_mounts",
            "Lazily mounted Nydus images under containers (one per image)",
            snapshotter_images.clone(),
        );
        let snapshotter_requests = Family::<OpOutcomeLabels, Counter>::default();
        registry.register(
            "snapshotter_requests",
            "containerd snapshots API calls, by operation and outcome",
            snapshotter_requests.clone(),
        );
        let snapshotter_layers_provided = Counter::default();
        registry.register(
            "snapshotter_layers_provided",
            "Nydus data layers the snapshotter provided, so containerd downloaded nothing for them",
            snapshotter_layers_provided.clone(),
        );
        let convert_jobs = Family::<KindLabels, Gauge>::default();
        registry.register(
            "convert_jobs",
            "Conversion jobs by state (queued, running, done, failed, ignored)",
            convert_jobs.clone(),
        );
        let convert_outcomes = Family::<KindLabels, Counter>::default();
        registry.register(
            "convert_jobs_finished",
            "Conversion jobs finished since start, by outcome (converted, retagged, ignored, failed, retried)",
            convert_outcomes.clone(),
        );
        let convert_notifications = Family::<KindLabels, Counter>::default();
        registry.register(
            "convert_notifications",
            "Registry notifications received, by result (accepted, unauthorized, malformed, full)",
            convert_notifications.clone(),
        );
        let convert_source_bytes = Family::<KindLabels, Counter>::default();
        registry.register(
            "convert_source_bytes",
            "Source layer bytes conversions read, by where they came from (store: held already; fetched: from peers or the origin)",
            convert_source_bytes.clone(),
        );
        for kind in ["store", "fetched"] {
            let _ = convert_source_bytes.get_or_create(&KindLabels { kind });
        }
        let convert_push_to_converted = Histogram::new(exponential_buckets(0.5, 2.0, 14));
        registry.register(
            "convert_push_to_converted_seconds",
            "Time from a registry's push notification to the converted image's tag",
            convert_push_to_converted.clone(),
        );
        let p2p = crate::p2p::P2pMetrics::default();
        p2p.register(registry);
        Self {
            convert_jobs,
            convert_outcomes,
            convert_notifications,
            convert_source_bytes,
            convert_push_to_converted,
            snapshots,
            snapshotter_images,
            snapshotter_requests,
            snapshotter_layers_provided,
            registry: root,
            origin_errors,
            store,
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
            seeded_ranges,
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

    pub fn seeded_range(&self) {
        self.seeded_ranges.inc();
    }

    pub fn miss(&self) {
        self.cache_misses.inc();
        self.totals.cache_misses.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an origin answer; only statuses of 400 and more are errors.
    pub fn origin_status(&self, kind: &'static str, status: u16) {
        if status >= 400 {
            self.origin_errors
                .get_or_create(&OriginErrorLabels {
                    kind,
                    status: origin_status_label(status),
                })
                .inc();
        }
    }

    /// Counts an origin request that got no answer.
    pub fn origin_unreachable(&self, kind: &'static str, error: &reqwest::Error) {
        let status = if error.is_timeout() {
            "timeout"
        } else if error.is_connect() {
            "connect"
        } else {
            "other"
        };
        self.origin_errors
            .get_or_create(&OriginErrorLabels { kind, status })
            .inc();
    }

    /// Sets the store gauges from the store (called before each scrape).
    pub fn observe_store(&self, store: &crate::store::Store, data_dir: &std::path::Path) {
        let usage = store.usage();
        let stats = store.stats();
        let g = &self.store;
        g.bytes.set(clamp(usage.bytes));
        g.blobs.set(clamp(usage.blobs as u64));
        g.complete_blobs.set(clamp(usage.complete as u64));
        g.quota_bytes.set(clamp(usage.quota_bytes));
        catch_up(&g.evictions, stats.evicted);
        catch_up(&g.corrupt_dropped, stats.corrupt_dropped);
        let mem = store.meta_memory();
        for (part, bytes) in [
            ("memtables", mem.memtables),
            ("block_cache", mem.block_cache),
            ("table_readers", mem.table_readers),
        ] {
            g.meta_memory
                .get_or_create(&PartLabels { part })
                .set(clamp(bytes));
        }
        if let Ok(fs) = rustix::fs::statvfs(data_dir) {
            let frag = fs.f_frsize.max(1);
            g.fs_size_bytes.set(clamp(fs.f_blocks.saturating_mul(frag)));
            g.fs_free_bytes.set(clamp(fs.f_bavail.saturating_mul(frag)));
        }
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

impl StoreGauges {
    fn register(&self, registry: &mut Registry) {
        let sub = registry.sub_registry_with_prefix("store");
        sub.register(
            "bytes",
            "Committed content bytes in the store",
            self.bytes.clone(),
        );
        sub.register(
            "blobs",
            "Blobs held (complete or partial)",
            self.blobs.clone(),
        );
        sub.register(
            "complete_blobs",
            "Complete blobs held",
            self.complete_blobs.clone(),
        );
        sub.register(
            "quota_bytes",
            "Store quota in bytes (0: evict by the filesystem's fill)",
            self.quota_bytes.clone(),
        );
        sub.register(
            "fs_size_bytes",
            "Size of the data directory's filesystem",
            self.fs_size_bytes.clone(),
        );
        sub.register(
            "fs_free_bytes",
            "Bytes available to the node on the data directory's filesystem",
            self.fs_free_bytes.clone(),
        );
        sub.register(
            "evictions",
            "Blobs evicted (least recently used, over the quota or the filesystem watermark)",
            self.evictions.clone(),
        );
        sub.register(
            "corrupt_dropped",
            "Blobs dropped because a piece did not match its hash",
            self.corrupt_dropped.clone(),
        );
        sub.register(
            "meta_memory_bytes",
            "Memory the metadata database holds, by part (memtables, block_cache, table_readers)",
            self.meta_memory.clone(),
        );
    }
}

/// The label for an HTTP method: the standard ones by name, anything else
/// `other` (a client must not be able to mint series).
pub fn method_label(method: &http::Method) -> &'static str {
    use http::Method as M;
    match *method {
        M::GET => "GET",
        M::HEAD => "HEAD",
        M::POST => "POST",
        M::PUT => "PUT",
        M::PATCH => "PATCH",
        M::DELETE => "DELETE",
        M::OPTIONS => "OPTIONS",
        M::CONNECT => "CONNECT",
        M::TRACE => "TRACE",
        _ => "other",
    }
}

/// The label for an origin's error status: the codes registries use, else
/// the class (`4xx`, `5xx`).
pub fn origin_status_label(status: u16) -> &'static str {
    const KNOWN: [(u16, &str); 11] = [
        (400, "400"),
        (401, "401"),
        (403, "403"),
        (404, "404"),
        (408, "408"),
        (416, "416"),
        (429, "429"),
        (500, "500"),
        (502, "502"),
        (503, "503"),
        (504, "504"),
    ];
    if let Some((_, label)) = KNOWN.iter().find(|(code, _)| *code == status) {
        return label;
    }
    match status / 100 {
        4 => "4xx",
        5 => "5xx",
        _ => "other",
    }
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Moves `counter` up to `total` (a counter mirrored from a store total).
fn catch_up(counter: &Counter, total: u64) {
    let now = counter.get();
    if total > now {
        counter.inc_by(total - now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded() {
        let odd = http::Method::from_bytes(b"X-ANYTHING-AT-ALL").expect("a valid method token");
        assert_eq!(method_label(&odd), "other");
        assert_eq!(method_label(&http::Method::HEAD), "HEAD");
        let mut seen = std::collections::HashSet::new();
        for code in 0..1000u16 {
            seen.insert(origin_status_label(code));
        }
        assert!(seen.len() <= 14, "{seen:?}");
        assert_eq!(origin_status_label(418), "4xx");
    }

    #[test]
    fn exposition_has_process_build_origin_error_and_store_series() {
        let m = Metrics::new();
        m.origin_status("blob", 503);
        m.origin_status("blob", 200);
        m.store.quota_bytes.set(7);
        catch_up(&m.store.evictions, 3);
        catch_up(&m.store.evictions, 2);
        let out = m.encode();
        for want in [
            "process_resident_memory_bytes ",
            "shoal_build_info{version=",
            "shoal_origin_errors_total{kind=\"blob\",status=\"503\"} 1",
            "shoal_store_quota_bytes 7",
            "shoal_store_evictions_total 3",
            "# TYPE shoal_http_requests counter",
        ] {
            assert!(out.contains(want), "{want} missing in\n{out}");
        }
        assert!(!out.contains("status=\"200\""), "{out}");
    }
}
