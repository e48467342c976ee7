//! Process and build metrics shared by the node and the scheduler: the
//! standard `process_*` series (CPU seconds, resident and virtual memory,
//! open and maximum file descriptors, threads, start time) read from
//! `/proc/self` at scrape time, and `<prefix>_build_info` (a constant `1`
//! labelled with the version and the component).
//!
//! Lives here, not in the node, because both binaries export it and the node
//! already depends on this crate (dependencies point one way).
//!
//! Invariants: reading `/proc` never panics and never allocates without
//! bound (the files are small and read once; a value that cannot be read is
//! left out of the scrape, not reported as zero). Register
//! [`ProcessCollector`] in a registry *without* a prefix so the names are the
//! ones every Prometheus dashboard knows.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

/// Exports the `process_*` series of this process.
#[derive(Debug, Default)]
pub struct ProcessCollector;

/// Exports `build_info{version, component}` = 1 (register it under the
/// component's prefix: `shoal_build_info`, `shoal_scheduler_build_info`).
#[derive(Debug)]
pub struct BuildInfoCollector {
    /// `node` or `scheduler`.
    pub component: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    component: &'static str,
    profile: &'static str,
}

/// One reading of `/proc/self`; `None` where a file could not be read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessSample {
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<u64>,
    pub virtual_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub threads: Option<u64>,
    pub start_time_seconds: Option<f64>,
}

impl ProcessSample {
    /// Reads `/proc/self` (and `/proc/stat` for the boot time).
    pub fn read() -> Self {
        let stat = std::fs::read_to_string("/proc/self/stat").ok();
        let stat = stat.as_deref().and_then(parse_stat);
        let ticks = rustix::param::clock_ticks_per_second() as f64;
        let ticks = if ticks > 0.0 { ticks } else { 100.0 };
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| parse_btime(&s));
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as u64);
        Self {
            cpu_seconds: stat.map(|s| (s.utime + s.stime) as f64 / ticks),
            resident_bytes: status_kib(&status, "VmRSS:").map(|k| k * 1024),
            virtual_bytes: status_kib(&status, "VmSize:").map(|k| k * 1024),
            open_fds,
            max_fds: parse_max_open_files(&limits),
            threads: stat.map(|s| s.threads),
            start_time_seconds: stat
                .zip(boot)
                .map(|(s, b)| b as f64 + s.start_ticks as f64 / ticks),
        }
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = ProcessSample::read();
        if let Some(v) = s.cpu_seconds {
            let m = ConstCounter::new(v);
            let e = enc.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time spent, in seconds",
                None,
                m.metric_type(),
            )?;
            m.encode(e)?;
        }
        let gauges: [(&str, &str, Option<f64>); 6] = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                s.resident_bytes.map(|v| v as f64),
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                s.virtual_bytes.map(|v| v as f64),
            ),
            (
                "process_open_fds",
                "Open file descriptors",
                s.open_fds.map(|v| v as f64),
            ),
            (
                "process_max_fds",
                "Limit on open file descriptors",
                s.max_fds.map(|v| v as f64),
            ),
            ("process_threads", "OS threads", s.threads.map(|v| v as f64)),
            (
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch, in seconds",
                s.start_time_seconds,
            ),
        ];
        for (name, help, value) in gauges {
            let Some(v) = value else { continue };
            let m = ConstGauge::new(v);
            let e = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            m.encode(e)?;
        }
        Ok(())
    }
}

impl Collector for BuildInfoCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let labels = BuildLabels {
            version: env!("CARGO_PKG_VERSION"),
            component: self.component,
            profile: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
        };
        let mut m = enc.encode_descriptor(
            "build_info",
            "Always 1; the labels say which build is running",
            None,
            MetricType::Gauge,
        )?;
        m.encode_family(&labels)?.encode_gauge(&1i64)?;
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Stat {
    utime: u64,
    stime: u64,
    threads: u64,
    start_ticks: u64,
}

/// `/proc/self/stat`: the fields after the command name (which may hold
/// spaces and parentheses, so split after the last `)`).
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    // rest starts with field 3 (state); field N is at index N - 3.
    let f: Vec<&str> = rest.split_ascii_whitespace().take(20).collect();
    let field = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        utime: field(14)?,
        stime: field(15)?,
        threads: field(20)?,
        start_ticks: field(22)?,
    })
}

fn parse_btime(proc_stat: &str) -> Option<u64> {
    proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

fn status_kib(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix(key))?;
    line.split_ascii_whitespace().next()?.parse().ok()
}

fn parse_max_open_files(limits: &str) -> Option<u64> {
    let line = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?;
    // Soft limit first; "unlimited" has no number to report.
    line.split_ascii_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_and_parens_in_the_name() {
        let line = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 1 0 0 0 \
                    250 50 0 0 20 0 7 0 12345 1000000 300 18446744073709551615";
        let s = parse_stat(line).expect("parses");
        assert_eq!(
            s,
            Stat {
                utime: 250,
                stime: 50,
                threads: 7,
                start_ticks: 12345
            }
        );
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 1"), None);
    }

    #[test]
    fn limits_status_and_btime() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(parse_max_open_files(limits), Some(1024));
        assert_eq!(
            parse_max_open_files("Max open files  unlimited unlimited files"),
            None
        );
        assert_eq!(status_kib("VmRSS:\t  2048 kB\n", "VmRSS:"), Some(2048));
        assert_eq!(
            parse_btime("cpu 1 2\nbtime 1700000000\n"),
            Some(1_700_000_000)
        );
    }

    #[test]
    fn this_process_is_read_and_exported() {
        let s = ProcessSample::read();
        assert!(s.resident_bytes.is_some_and(|b| b > 0), "{s:?}");
        assert!(s.open_fds.is_some_and(|n| n > 0), "{s:?}");
        assert!(s.threads.is_some_and(|n| n >= 1), "{s:?}");
        let mut root = prometheus_client::registry::Registry::default();
        root.register_collector(Box::new(ProcessCollector));
        root.sub_registry_with_prefix("shoal")
            .register_collector(Box::new(BuildInfoCollector { component: "node" }));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &root).expect("encodes");
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_start_time_seconds ",
            "shoal_build_info{version=\"",
        ] {
            assert!(out.contains(name), "{name} missing in\n{out}");
        }
    }
}
