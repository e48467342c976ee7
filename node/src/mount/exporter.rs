//! Per-mount Prometheus series, read from the live mounts' own counters at scrape time:
//! [`MountSeries`] is the set of live mounts' probes (the mount manager adds one when a mount
//! comes up and removes it when the mount goes), [`MountCollector`] encodes them.
//!
//! Series (prefix `shoal_`, labels `mount`, `image`, `mode`):
//! `mount_reads_total`, `mount_read_bytes_total`, `mount_read_errors_total` (reads that reached
//! the node: FUSE, every read a program makes that misses the page cache; EROFS, the kernel's
//! page-cache misses on the blob files), `mount_fetched_bytes_total{source}` and
//! `mount_fetched_chunks_total{source}` (`local` store, `peer`, `origin`), `mount_prefetch_bytes_total`
//! (the origin bytes fetched for prefetch, part of `source="origin"`), and the histogram
//! `mount_read_latency_seconds`.
//!
//! Invariants: a probe holds only `Arc`s of atomic counters, so a scrape never waits on a mount;
//! the map is locked only to copy the probes out.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::MetricType;
use shoal_rafs::fuse::{FuseStats, FuseStatsSnapshot, LATENCY_BOUNDS_MICROS};

use super::chunks::{SourceSnapshot, SourceStats};

/// What identifies a mount's series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MountLabels {
    pub mount: String,
    pub image: String,
    pub mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    mount: String,
    image: String,
    mode: String,
    source: &'static str,
}

/// One live mount's counters.
#[derive(Clone, Debug)]
pub struct Probe {
    pub labels: MountLabels,
    pub reads: Arc<FuseStats>,
    pub source: Arc<SourceStats>,
}

/// The live mounts' probes, by mount point.
#[derive(Debug, Default)]
pub struct MountSeries {
    probes: Mutex<BTreeMap<PathBuf, Probe>>,
}

impl MountSeries {
    pub fn add(&self, dir: &Path, probe: Probe) {
        self.lock().insert(dir.to_path_buf(), probe);
    }

    pub fn remove(&self, dir: &Path) {
        self.lock().remove(dir);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<PathBuf, Probe>> {
        self.probes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn snapshot(&self) -> Vec<(MountLabels, FuseStatsSnapshot, SourceSnapshot)> {
        self.lock()
            .values()
            .map(|p| (p.labels.clone(), p.reads.snapshot(), p.source.snapshot()))
            .collect()
    }
}

/// Encodes [`MountSeries`] on each scrape.
#[derive(Debug)]
pub struct MountCollector(pub Arc<MountSeries>);

type Sample = (MountLabels, FuseStatsSnapshot, SourceSnapshot);
/// A counter: name, help, value of one mount.
type CounterDef = (&'static str, &'static str, fn(&Sample) -> u64);
/// A counter by source: name, help, (local, peer, origin) of one mount.
type BySourceDef = (&'static str, &'static str, fn(&SourceSnapshot) -> [u64; 3]);

impl Collector for MountCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Declared even with no mount, so dashboards and alerts can tell
        // "no mount" from "not exported".
        let all = self.0.snapshot();
        let counters: [CounterDef; 4] = [
            (
                "mount_reads",
                "Reads that reached the node (EROFS: page-cache misses)",
                |s| s.1.reads,
            ),
            ("mount_read_bytes", "Bytes those reads returned", |s| {
                s.1.read_bytes
            }),
            ("mount_read_errors", "Reads that failed (EIO)", |s| {
                s.1.read_errors
            }),
            (
                "mount_prefetch_bytes",
                "Origin bytes fetched for prefetch",
                |s| s.2.prefetch_bytes,
            ),
        ];
        for (name, help, get) in counters {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for s in &all {
                m.encode_family(&s.0)?
                    .encode_counter::<NoLabelSet, _, u64>(&get(s), None)?;
            }
        }
        let by_source: [BySourceDef; 2] = [
            (
                "mount_fetched_bytes",
                "Chunk bytes obtained, by source",
                |s| [s.local_bytes, s.peer_bytes, s.origin_bytes],
            ),
            ("mount_fetched_chunks", "Chunks obtained, by source", |s| {
                [s.local_chunks, s.peer_chunks, s.origin_chunks]
            }),
        ];
        for (name, help, get) in by_source {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for s in &all {
                for (source, v) in ["local", "peer", "origin"].into_iter().zip(get(&s.2)) {
                    let l = SourceLabels {
                        mount: s.0.mount.clone(),
                        image: s.0.image.clone(),
                        mode: s.0.mode.clone(),
                        source,
                    };
                    m.encode_family(&l)?
                        .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
                }
            }
        }
        let mut m = enc.encode_descriptor(
            "mount_read_latency_seconds",
            "Latency of reads that reached the node",
            None,
            MetricType::Histogram,
        )?;
        for s in &all {
            let h = &s.1.read_latency;
            let mut buckets: Vec<(f64, u64)> = LATENCY_BOUNDS_MICROS
                .iter()
                .zip(&h.buckets)
                .map(|(b, n)| (*b as f64 / 1e6, *n))
                .collect();
            buckets.push((f64::MAX, h.buckets.last().copied().unwrap_or(0)));
            m.encode_family(&s.0)?.encode_histogram::<NoLabelSet>(
                h.sum_micros as f64 / 1e6,
                h.count,
                &buckets,
                None,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::Relaxed;
    use std::time::Duration;

    #[test]
    fn live_mounts_are_exported_with_their_labels() {
        let series = Arc::new(MountSeries::default());
        let mut registry = prometheus_client::registry::Registry::with_prefix("shoal");
        registry.register_collector(Box::new(MountCollector(series.clone())));
        let reads = Arc::new(FuseStats::default());
        reads.read_bytes.store(4096, Relaxed);
        reads.read_latency.record(Duration::from_micros(70));
        let source = Arc::new(SourceStats::default());
        source.origin_bytes.store(1000, Relaxed);
        let labels = MountLabels {
            mount: "/mnt/a".into(),
            image: "h/r:1".into(),
            mode: "erofs".into(),
        };
        series.add(
            Path::new("/mnt/a"),
            Probe {
                labels,
                reads,
                source,
            },
        );
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("encode");
        let l = r#"mount="/mnt/a",image="h/r:1",mode="erofs""#;
        for want in [
            format!("shoal_mount_read_bytes_total{{{l}}} 4096"),
            format!("shoal_mount_fetched_bytes_total{{{l},source=\"origin\"}} 1000"),
            format!("shoal_mount_fetched_bytes_total{{{l},source=\"peer\"}} 0"),
            format!("shoal_mount_read_latency_seconds_count{{{l}}} 1"),
        ] {
            assert!(out.contains(&want), "{want} not in\n{out}");
        }
        series.remove(Path::new("/mnt/a"));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("encode");
        // No series of the removed mount; the family is still declared (dashboards).
        assert!(!out.contains("/mnt/a"), "{out}");
        assert!(
            out.contains("# TYPE shoal_mount_read_bytes counter"),
            "{out}"
        );
    }
}
