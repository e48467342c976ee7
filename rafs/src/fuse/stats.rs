//! Per-mount counters of the FUSE filesystem: a struct of atomics the node exports as metrics
//! and shows in `shoal mounts`.
//!
//! Invariants: counters only grow; every read request that reaches the filesystem is counted
//! exactly once, as a success (`reads`, `read_bytes`) or a failure (`read_errors`), and its
//! latency lands in `read_latency`. Reads the kernel answers from its page cache never reach us
//! and are not counted.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::Serialize;

/// Live counters of one mount. Cheap to update from any thread.
#[derive(Debug, Default)]
pub struct FuseStats {
    /// Read requests answered with data.
    pub reads: AtomicU64,
    /// Bytes returned to programs by those reads.
    pub read_bytes: AtomicU64,
    /// Read requests answered with an error (EIO and friends).
    pub read_errors: AtomicU64,
    /// Read requests served on a FUSE thread because the worker queue was full.
    pub reads_inline: AtomicU64,
    /// Chunks obtained from the [`crate::ChunkSource`] (decoded-cache misses that succeeded).
    pub chunks_fetched: AtomicU64,
    /// Uncompressed bytes of those chunks.
    pub chunk_bytes_fetched: AtomicU64,
    /// Chunk fetches that failed (source error, digest mismatch, ...).
    pub chunk_fetch_errors: AtomicU64,
    /// Chunks served from the decoded-chunk cache, including readers that joined a fetch
    /// already in flight.
    pub chunk_cache_hits: AtomicU64,
    /// Chunks read back from the mount's decoded files (no fetch, no decompression).
    pub chunk_decoded_hits: AtomicU64,
    /// Time from a read request's arrival to its reply.
    pub read_latency: LatencyHistogram,
}

/// A plain copy of [`FuseStats`] at one instant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FuseStatsSnapshot {
    pub reads: u64,
    pub read_bytes: u64,
    pub read_errors: u64,
    pub reads_inline: u64,
    pub chunks_fetched: u64,
    pub chunk_bytes_fetched: u64,
    pub chunk_fetch_errors: u64,
    pub chunk_cache_hits: u64,
    pub chunk_decoded_hits: u64,
    pub read_latency: LatencySnapshot,
}

impl FuseStats {
    /// Copy every counter.
    pub fn snapshot(&self) -> FuseStatsSnapshot {
        FuseStatsSnapshot {
            reads: self.reads.load(Relaxed),
            read_bytes: self.read_bytes.load(Relaxed),
            read_errors: self.read_errors.load(Relaxed),
            reads_inline: self.reads_inline.load(Relaxed),
            chunks_fetched: self.chunks_fetched.load(Relaxed),
            chunk_bytes_fetched: self.chunk_bytes_fetched.load(Relaxed),
            chunk_fetch_errors: self.chunk_fetch_errors.load(Relaxed),
            chunk_cache_hits: self.chunk_cache_hits.load(Relaxed),
            chunk_decoded_hits: self.chunk_decoded_hits.load(Relaxed),
            read_latency: self.read_latency.snapshot(),
        }
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }
}

/// Upper bounds (inclusive, microseconds) of the latency buckets; one more bucket holds the rest.
pub const LATENCY_BOUNDS_MICROS: [u64; 12] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000, 250_000, 1_000_000, 10_000_000,
];

/// A fixed-bucket latency histogram (Prometheus style: export cumulative sums of `buckets`).
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BOUNDS_MICROS.len() + 1],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

/// A plain copy of a [`LatencyHistogram`]: `buckets[i]` counts samples `<=
/// LATENCY_BOUNDS_MICROS[i]` and above the previous bound; the last bucket is everything larger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LatencySnapshot {
    pub buckets: Vec<u64>,
    pub count: u64,
    pub sum_micros: u64,
}

impl LatencyHistogram {
    /// Record one sample.
    pub fn record(&self, d: Duration) {
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = LATENCY_BOUNDS_MICROS
            .iter()
            .position(|&b| micros <= b)
            .unwrap_or(LATENCY_BOUNDS_MICROS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.count.fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(micros, Relaxed);
    }

    /// Copy the histogram.
    pub fn snapshot(&self) -> LatencySnapshot {
        LatencySnapshot {
            buckets: self.buckets.iter().map(|b| b.load(Relaxed)).collect(),
            count: self.count.load(Relaxed),
            sum_micros: self.sum_micros.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_lands_in_the_right_bucket() {
        let h = LatencyHistogram::default();
        h.record(Duration::from_micros(50));
        h.record(Duration::from_micros(51));
        h.record(Duration::from_secs(60));
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.buckets[0], 1);
        assert_eq!(s.buckets[1], 1);
        assert_eq!(s.buckets[LATENCY_BOUNDS_MICROS.len()], 1);
        assert_eq!(s.sum_micros, 60_000_101);
    }
}
