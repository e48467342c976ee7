//! The load engine (issue 12, R9), shared by the `load-bench` runner (200 clients) and the smoke
//! test (`tests/load.rs`, 50 clients): many concurrent clients against one node's mirror, a mix of
//!
//! - **cached manifests**: `GET /v2/<repo>/manifests/<digest>` of manifests the node already
//!   holds (body checked against the digest);
//! - **cached ranges**: `Range` GETs of 4 KiB–1 MiB at random offsets of a blob the node already
//!   holds (bytes checked against the blob);
//! - **cold blobs**: one request of every client is a whole blob the node has never seen, each
//!   blob asked by [`SHARED_COLD`] clients at the same instant (one origin fetch, several waiters;
//!   body checked against the digest) — every client's first request (a burst of all cold blobs
//!   at the start) or spread over the run ([`Plan::spread_cold`]).
//!
//! Each client is a thread with its own HTTP client (its own connections), all released by one
//! barrier; every request has a timeout, and the run is bounded by `clients × requests`. An error
//! is any transport failure, status other than 200/206, short body or wrong byte. The same plan
//! can be run against the origin registry itself as the baseline.

use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use shoal_rafs::fuzzing::Rng;

use crate::http;
use crate::random::pseudo_random;
use crate::registry::Registry;

/// Clients that ask for the same cold blob at once.
pub const SHARED_COLD: usize = 4;
/// How long one request may take before it counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// The repository the content is pushed to.
pub const REPO: &str = "load/app";

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub clients: usize,
    /// Requests per client, the cold blob included.
    pub requests: usize,
    /// Distinct manifests (each with its own config blob).
    pub manifests: usize,
    /// Size of the cached blob the ranges are read from.
    pub cached_blob: usize,
    /// Size of each cold blob.
    pub cold_blob: usize,
    pub seed: u64,
    /// Open loop: each client starts a request every `pace` (staggered across clients), so the
    /// offered load is `clients / pace` whatever the latency. `None`: closed loop, each client
    /// sends its next request as soon as the last one is answered (saturation).
    pub pace: Option<Duration>,
    /// Where in each client's requests its cold blob comes: `false`, first (all cold blobs in
    /// one burst at the start, a thundering herd); `true`, spread over the run (the clients
    /// sharing a blob still ask for it at the same request, so at the same time).
    pub spread_cold: bool,
}

impl Plan {
    /// Which of client `c`'s requests is its cold blob.
    pub fn cold_request(&self, c: usize) -> usize {
        if !self.spread_cold || self.requests <= 1 {
            return 0;
        }
        let groups = self.cold_blobs().max(1);
        (c / SHARED_COLD) * self.requests / groups
    }

    /// The cold blobs this plan needs: one per [`SHARED_COLD`] clients.
    pub fn cold_blobs(&self) -> usize {
        self.clients.div_ceil(SHARED_COLD)
    }
}

/// The content the plan reads, pushed to the origin.
#[derive(Debug)]
pub struct Content {
    /// (digest, bytes) of each manifest.
    pub manifests: Vec<(String, Vec<u8>)>,
    pub cached: (String, Arc<Vec<u8>>),
    /// (digest, size) of each cold blob.
    pub cold: Vec<(String, usize)>,
}

impl Content {
    /// Pushes everything the plan reads to `registry` (under one repository).
    pub fn push(registry: &Registry, plan: &Plan) -> Result<Self> {
        let layer = pseudo_random(4096, plan.seed ^ 0x1a7e);
        let layer_digest = registry.push_blob(REPO, layer.clone())?;
        let mut manifests = Vec::with_capacity(plan.manifests);
        for i in 0..plan.manifests {
            let config = format!(
                r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["N={i}"]}},"rootfs":{{"type":"layers","diff_ids":["{layer_digest}"]}}}}"#
            )
            .into_bytes();
            let config_len = config.len();
            let config_digest = registry.push_blob(REPO, config)?;
            let manifest = format!(
                r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{config_len}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{layer_digest}","size":{}}}]}}"#,
                layer.len()
            )
            .into_bytes();
            let digest = http::sha256_digest(&manifest);
            let put = registry.put_manifest(
                REPO,
                &format!("m{i}"),
                "application/vnd.oci.image.manifest.v1+json",
                manifest.clone(),
            )?;
            anyhow::ensure!(
                put.status.is_success(),
                "pushing manifest {i}: {}",
                put.short()
            );
            manifests.push((digest, manifest));
        }
        let cached = pseudo_random(plan.cached_blob, plan.seed ^ 0xcac4e);
        let cached_digest = registry.push_blob(REPO, cached.clone())?;
        let mut cold = Vec::with_capacity(plan.cold_blobs());
        for i in 0..plan.cold_blobs() {
            let data = pseudo_random(plan.cold_blob, plan.seed ^ 0xc01d ^ (i as u64) << 20);
            cold.push((registry.push_blob(REPO, data)?, plan.cold_blob));
        }
        Ok(Self {
            manifests,
            cached: (cached_digest, Arc::new(cached)),
            cold,
        })
    }

    /// Reads every manifest and the cached blob once through `node`, then waits until the node
    /// records the blob complete: from then on both are cached.
    pub fn prime_node(&self, node: &crate::node::Node) -> Result<()> {
        self.prime(&node.url())?;
        crate::wait::poll(
            "the node to hold the cached blob",
            Duration::from_secs(60),
            || {
                Ok(node
                    .status()?
                    .blob(&self.cached.0)
                    .is_some_and(|b| b.complete)
                    .then_some(()))
            },
        )
    }

    /// Reads every manifest and the cached blob once through `base_url`.
    pub fn prime(&self, base_url: &str) -> Result<()> {
        let client = http::client()?;
        for (digest, _) in &self.manifests {
            let got = http::fetch(
                client
                    .get(format!("{base_url}/v2/{REPO}/manifests/{digest}"))
                    .header("Accept", "application/vnd.oci.image.manifest.v1+json"),
            )?;
            anyhow::ensure!(
                got.completed_ok() && got.digest() == *digest,
                "priming {digest}: {}",
                got.short()
            );
        }
        let got = http::fetch_hashed(
            client.get(format!("{base_url}/v2/{REPO}/blobs/{}", self.cached.0)),
        )?;
        anyhow::ensure!(
            got.status.as_u16() == 200 && got.digest == self.cached.0,
            "priming the cached blob: {got:?}"
        );
        Ok(())
    }
}

/// The kinds of request, in report order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Manifest,
    Range,
    Cold,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Manifest, Kind::Range, Kind::Cold];

    pub fn label(self) -> &'static str {
        match self {
            Kind::Manifest => "cached manifest",
            Kind::Range => "cached range (4 KiB–1 MiB)",
            Kind::Cold => "cold blob",
        }
    }
}

/// One finished request.
#[derive(Debug, Clone)]
pub struct Sample {
    pub kind: Kind,
    /// When it started, from the release of the clients.
    pub at: Duration,
    pub took: Duration,
    pub bytes: u64,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// Everything one run measured.
#[derive(Debug, Default)]
pub struct Outcome {
    pub samples: Vec<Sample>,
    pub wall: Duration,
}

/// Latency figures of one kind.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub count: usize,
    pub errors: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    pub bytes: u64,
}

impl Outcome {
    pub fn errors(&self) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.error.is_some()).collect()
    }

    pub fn summary(&self, kind: Kind) -> Summary {
        self.summary_from(kind, Duration::ZERO)
    }

    /// [`Outcome::summary`] of the requests started `from` the release of the clients on.
    pub fn summary_from(&self, kind: Kind, from: Duration) -> Summary {
        Summary::of(
            self.samples
                .iter()
                .filter(|s| s.kind == kind && s.at >= from)
                .map(|s| (s.took, s.error.is_some(), s.bytes)),
        )
    }

    /// When the last cold blob was answered, from the release of the clients.
    pub fn cold_done(&self) -> Duration {
        self.samples
            .iter()
            .filter(|s| s.kind == Kind::Cold)
            .map(|s| s.at + s.took)
            .max()
            .unwrap_or_default()
    }
}

impl Summary {
    /// Figures of `(latency, failed, bytes)` samples.
    pub fn of(samples: impl Iterator<Item = (Duration, bool, u64)>) -> Self {
        let (mut took, mut errors, mut bytes) = (Vec::new(), 0, 0);
        for (t, failed, b) in samples {
            took.push(t);
            errors += usize::from(failed);
            bytes += b;
        }
        took.sort_unstable();
        let pick = |q: f64| {
            took.get(((took.len() as f64 * q).ceil() as usize).saturating_sub(1))
                .copied()
                .unwrap_or_default()
        };
        Summary {
            count: took.len(),
            errors,
            p50: pick(0.50),
            p99: pick(0.99),
            max: took.last().copied().unwrap_or_default(),
            bytes,
        }
    }
}

/// Runs `plan` against the mirror at `base_url`: every client starts at one barrier.
pub fn run(base_url: &str, plan: &Plan, content: &Arc<Content>) -> Result<Outcome> {
    let barrier = Arc::new(Barrier::new(plan.clients + 1));
    let samples = Arc::new(Mutex::new(Vec::with_capacity(plan.clients * plan.requests)));
    let mut threads = Vec::with_capacity(plan.clients);
    for c in 0..plan.clients {
        let client = http::pooled_client(REQUEST_TIMEOUT)?;
        let (barrier, samples, content) = (barrier.clone(), samples.clone(), content.clone());
        let (base, plan) = (base_url.to_owned(), plan.clone());
        threads.push(
            std::thread::Builder::new()
                .name(format!("load-client-{c}"))
                .stack_size(256 << 10)
                .spawn(move || {
                    let mut rng = Rng(plan.seed ^ (c as u64).wrapping_mul(0x9E37_79B9));
                    let mut mine = Vec::with_capacity(plan.requests);
                    barrier.wait();
                    let start = Instant::now();
                    for r in 0..plan.requests {
                        if let Some(pace) = plan.pace {
                            // Staggered: client c starts at c/clients of a period.
                            let due = pace * r as u32 + pace * c as u32 / plan.clients as u32;
                            if let Some(wait) = due.checked_sub(start.elapsed()) {
                                std::thread::sleep(wait);
                            }
                        }
                        let kind = if r == plan.cold_request(c) {
                            Kind::Cold
                        } else if rng.below(10) < 6 {
                            Kind::Manifest
                        } else {
                            Kind::Range
                        };
                        let at = start.elapsed();
                        let mut sample = one(&client, &base, kind, c, &mut rng, &content);
                        sample.at = at;
                        mine.push(sample);
                    }
                    samples
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend(mine);
                })
                .context("starting a client thread")?,
        );
    }
    let start = Instant::now();
    barrier.wait();
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("a load client panicked"))?;
    }
    let wall = start.elapsed();
    let samples = std::mem::take(&mut *samples.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(Outcome { samples, wall })
}

/// One request of `kind` by client `c`, timed and checked (a cold blob is client `c`'s share of
/// `content.cold`).
pub fn one(
    client: &reqwest::blocking::Client,
    base: &str,
    kind: Kind,
    c: usize,
    rng: &mut Rng,
    content: &Content,
) -> Sample {
    let start = Instant::now();
    let (bytes, error) = match kind {
        Kind::Manifest => {
            let (digest, body) = &content.manifests[rng.below(content.manifests.len())];
            let got = http::fetch(
                client
                    .get(format!("{base}/v2/{REPO}/manifests/{digest}"))
                    .header("Accept", "application/vnd.oci.image.manifest.v1+json"),
            );
            check(got, |f| {
                (f.status.as_u16() == 200 && f.body == *body)
                    .then_some(f.body.len() as u64)
                    .ok_or_else(|| format!("manifest {digest}: {}", f.short()))
            })
        }
        Kind::Range => {
            let data = &content.cached.1;
            let len = 4096 + rng.below((1 << 20) - 4096) as u64;
            let len = len.min(data.len() as u64);
            let at = rng.below(data.len() - len as usize + 1) as u64;
            let got = http::fetch(
                client
                    .get(format!("{base}/v2/{REPO}/blobs/{}", content.cached.0))
                    .header("Range", format!("bytes={at}-{}", at + len - 1)),
            );
            check(got, |f| {
                (f.status.as_u16() == 206 && f.body == data[at as usize..(at + len) as usize])
                    .then_some(len)
                    .ok_or_else(|| {
                        format!("range {at}+{len}: {} ({} bytes)", f.status, f.body.len())
                    })
            })
        }
        Kind::Cold => {
            let (digest, size) = &content.cold[c / SHARED_COLD % content.cold.len()];
            match http::fetch_hashed(client.get(format!("{base}/v2/{REPO}/blobs/{digest}"))) {
                Ok(f) if f.status.as_u16() == 200 && f.digest == *digest => (*size as u64, None),
                Ok(f) => (0, Some(format!("cold blob {digest}: {f:?}"))),
                Err(e) => (0, Some(format!("cold blob {digest}: {e:#}"))),
            }
        }
    };
    Sample {
        kind,
        at: Duration::ZERO,
        took: start.elapsed(),
        bytes,
        error,
    }
}

fn check(
    got: Result<http::Fetched>,
    ok: impl FnOnce(&http::Fetched) -> Result<u64, String>,
) -> (u64, Option<String>) {
    match got {
        Ok(f) => match ok(&f) {
            Ok(n) => (n, None),
            Err(e) => (0, Some(e)),
        },
        Err(e) => (0, Some(format!("{e:#}"))),
    }
}

/// CPU time (user + system) and resident memory of a process, from `/proc`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcStat {
    pub cpu: Duration,
    pub rss_bytes: u64,
    /// The anonymous part of `rss_bytes` (heap, stacks): what a leak grows. The rest is mostly
    /// the executable's pages, faulted in as code paths run for the first time.
    pub anon_bytes: u64,
    pub peak_rss_bytes: u64,
    pub fds: usize,
}

impl ProcStat {
    pub fn of(pid: u32) -> Result<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("reading /proc/{pid}/stat"))?;
        // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i - 3)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let hz = rustix::param::clock_ticks_per_second().max(1);
        let cpu = Duration::from_millis((ticks(14) + ticks(15)) * 1000 / hz);
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or(0)
                * 1024
        };
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
        Ok(Self {
            cpu,
            rss_bytes: kib("VmRSS:"),
            anon_bytes: kib("RssAnon:"),
            peak_rss_bytes: kib("VmHWM:"),
            fds,
        })
    }
}
