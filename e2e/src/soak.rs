//! The soak engine (issue 12), shared by the `soak-bench` runner (one hour) and the smoke test
//! (`tests/soak.rs`, about a minute and a half): mixed load on a cluster of real nodes, each in its
//! own network namespace ([`Cluster`]), while nodes and the scheduler are killed and restarted.
//!
//! - **Load**: `clients_per_node` clients per node, each paced to one request per `pace`, a mix of
//!   cached manifests and cached ranges (as the load engine's, [`crate::load`]) and **fresh
//!   blobs**: a new blob is pushed to the origin every `fresh_every`, and clients on every node
//!   read the newest ones whole, so each is fetched cold by one node and shared over P2P while the
//!   swarm changes under it. Every `pull_every`, `skopeo` pulls the fixture image through one node.
//!   Every answer is checked byte for byte: an error is any transport failure, unexpected status,
//!   short body or wrong byte.
//! - **Faults**: every `node_restart_every` one node is stopped — SIGKILL and SIGTERM by turns —
//!   and started again `down_for` later; nodes 0 and 1 never are (their memory and descriptors
//!   are the flatness witnesses). Clients stop sending to a node before it is stopped and wait
//!   for their requests to it to finish, so a request cut by the planned kill is not an error;
//!   requests to the other nodes — whose peers and leases just vanished — are. Every
//!   `scheduler_restart_every` the scheduler is SIGKILLed and started again, empty.
//! - **Watch**: every `sample_every`, each running node's and the scheduler's RSS, open file
//!   descriptors and CPU, and each node's data dir on disk (allocated blocks).
//! - **At the end**: every blob each node reports complete is hashed on disk, and the origin's
//!   own log gives what the fresh blobs cost it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use shoal_rafs::fuzzing::Rng;

use crate::cluster::{Cluster, ClusterOptions, NodeSpec};
use crate::load::{self, Content, ProcStat, Summary};
use crate::random::pseudo_random;
use crate::{http, TestCtx};

/// Nodes that are never stopped: the flatness witnesses.
pub const STEADY_NODES: usize = 2;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stop waits for the requests in flight to the node to finish.
const DRAIN_CAP: Duration = Duration::from_secs(90);

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub duration: Duration,
    pub nodes: usize,
    pub clients_per_node: usize,
    /// Each client sends one request per `pace`.
    pub pace: Duration,
    /// Share of requests, in percent, for fresh blobs (the rest: 60 % manifests, 40 % ranges).
    pub fresh_percent: u64,
    pub fresh_every: Duration,
    pub fresh_blob: usize,
    /// Clients read one of this many newest fresh blobs.
    pub fresh_window: usize,
    pub pull_every: Duration,
    /// Zero: never.
    pub node_restart_every: Duration,
    /// How long a stopped node stays down.
    pub down_for: Duration,
    /// Zero: never.
    pub scheduler_restart_every: Duration,
    pub sample_every: Duration,
    /// Each node's `--store-quota`, MiB.
    pub quota_mib: u64,
    /// Each node's and the origin's link, Mbit/s.
    pub link_mbit: u32,
    pub seed: u64,
}

impl Plan {
    /// The smoke test's: 90 s, four nodes, a restart of each kind at least once.
    pub fn smoke() -> Self {
        Self {
            duration: Duration::from_secs(90),
            nodes: 4,
            clients_per_node: 2,
            pace: Duration::from_millis(100),
            fresh_percent: 10,
            fresh_every: Duration::from_secs(8),
            fresh_blob: 2 << 20,
            fresh_window: 2,
            pull_every: Duration::from_secs(40),
            node_restart_every: Duration::from_secs(15),
            down_for: Duration::from_secs(3),
            scheduler_restart_every: Duration::from_secs(30),
            sample_every: Duration::from_secs(5),
            quota_mib: 256,
            link_mbit: 1000,
            seed: 0x50a4,
        }
    }

    /// The runner's default: one hour.
    pub fn hour() -> Self {
        Self {
            duration: Duration::from_secs(3600),
            clients_per_node: 3,
            fresh_percent: 5,
            fresh_every: Duration::from_secs(20),
            fresh_blob: 4 << 20,
            fresh_window: 3,
            pull_every: Duration::from_secs(120),
            node_restart_every: Duration::from_secs(240),
            down_for: Duration::from_secs(5),
            scheduler_restart_every: Duration::from_secs(420),
            sample_every: Duration::from_secs(10),
            seed: 0x50a4_0001,
            ..Self::smoke()
        }
    }
}

/// The kinds of request, in report order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Manifest,
    Range,
    Fresh,
    Pull,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Manifest, Kind::Range, Kind::Fresh, Kind::Pull];

    pub fn label(self) -> &'static str {
        match self {
            Kind::Manifest => "cached manifest",
            Kind::Range => "cached range (4 KiB–1 MiB)",
            Kind::Fresh => "fresh blob (new every few s, P2P)",
            Kind::Pull => "skopeo pull of the image",
        }
    }
}

/// One finished request.
#[derive(Debug, Clone)]
pub struct Request {
    pub kind: Kind,
    pub node: usize,
    /// When it started, from the start of the run.
    pub at: Duration,
    pub took: Duration,
    pub bytes: u64,
    /// The fresh blob it read.
    pub blob: Option<String>,
    pub error: Option<String>,
}

/// A fault the run injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    NodeKilled(usize),
    NodeTerminated(usize),
    SchedulerKilled,
}

/// A fault and how long the restart after it took.
#[derive(Debug, Clone)]
pub struct FaultAt {
    pub at: Duration,
    pub fault: Fault,
    /// From the restart command until the process answered again.
    pub restart: Duration,
}

/// A process the run watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    Node(usize),
    Scheduler,
}

/// One sample of one process.
#[derive(Debug, Clone)]
pub struct ProcSample {
    pub at: Duration,
    pub who: Who,
    /// How many times the process had been restarted when sampled.
    pub life: usize,
    pub stat: ProcStat,
    /// The node's data dir, allocated bytes (0 for the scheduler).
    pub disk: u64,
    /// The node's metadata database's memory (`shoal_store_meta_memory_bytes`, all parts; 0 for
    /// the scheduler or when the scrape failed).
    pub meta_memory: u64,
}

/// Everything a run measured.
#[derive(Debug, Default)]
pub struct Outcome {
    pub requests: Vec<Request>,
    pub faults: Vec<FaultAt>,
    pub samples: Vec<ProcSample>,
    /// (digest, size) of every fresh blob pushed, blob `n` at `n × fresh_every`.
    pub fresh: Vec<(String, u64)>,
    /// What each fresh blob cost the origin; `None` for those no client read.
    pub fresh_origin: Vec<Option<u64>>,
    /// Blob bytes the origin sent for fresh blobs that some client read.
    pub fresh_origin_bytes: u64,
    /// Bytes of the fresh blobs that some client read.
    pub fresh_read_bytes: u64,
    /// Complete blobs whose bytes on disk do not match their digest, per node, at the end.
    pub corrupt_at_rest: Vec<String>,
    /// Complete blobs checked at the end.
    pub checked_at_rest: usize,
    pub wall: Duration,
}

impl Outcome {
    pub fn errors(&self) -> Vec<&Request> {
        self.requests.iter().filter(|r| r.error.is_some()).collect()
    }

    pub fn summary(&self, kind: Kind) -> Summary {
        Summary::of(
            self.requests
                .iter()
                .filter(|r| r.kind == kind)
                .map(|r| (r.took, r.error.is_some(), r.bytes)),
        )
    }

    /// Faults of the kind `matches` accepts.
    pub fn count_faults(&self, matches: impl Fn(Fault) -> bool) -> usize {
        self.faults.iter().filter(|f| matches(f.fault)).count()
    }

    /// How `who`'s memory and descriptors moved over the run (its first life only).
    pub fn trend(&self, who: Who, warmup: Duration) -> Option<Trend> {
        let mine: Vec<&ProcSample> = self
            .samples
            .iter()
            .filter(|s| s.who == who && s.life == 0)
            .collect();
        let warm = mine.iter().find(|s| s.at >= warmup).copied()?;
        let last = *mine.last()?;
        let half = warm.at + (last.at.saturating_sub(warm.at)) / 2;
        let rss = |s: &ProcSample| s.stat.rss_bytes as f64;
        let meta = |s: &ProcSample| s.meta_memory as f64;
        let anon = |s: &ProcSample| s.stat.anon_bytes as f64;
        let per_hour = 3600.0 / (1u64 << 20) as f64;
        Some(Trend {
            warm_at: warm.at,
            end_at: last.at,
            warm_rss: warm.stat.rss_bytes,
            end_rss: last.stat.rss_bytes,
            max_rss: mine.iter().map(|s| s.stat.rss_bytes).max().unwrap_or(0),
            rss_slope_mib_per_hour: slope(&mine, warmup, rss) * per_hour,
            rss_slope_last_half_mib_per_hour: slope(&mine, half, rss) * per_hour,
            warm_anon: warm.stat.anon_bytes,
            end_anon: last.stat.anon_bytes,
            anon_slope_last_half_mib_per_hour: slope(&mine, half, anon) * per_hour,
            warm_meta: warm.meta_memory,
            end_meta: last.meta_memory,
            meta_slope_mib_per_hour: slope(&mine, warmup, meta) * per_hour,
            warm_fds: warm.stat.fds,
            end_fds: last.stat.fds,
            max_fds: mine.iter().map(|s| s.stat.fds).max().unwrap_or(0),
            cpu: last.stat.cpu,
        })
    }

    /// The highest RSS and descriptor count of each life of `who`: (life, max RSS, max fds).
    pub fn lives(&self, who: Who) -> Vec<(usize, u64, usize)> {
        let mut lives: Vec<(usize, u64, usize)> = Vec::new();
        for s in self.samples.iter().filter(|s| s.who == who) {
            match lives.iter_mut().find(|l| l.0 == s.life) {
                Some(l) => {
                    l.1 = l.1.max(s.stat.rss_bytes);
                    l.2 = l.2.max(s.stat.fds);
                }
                None => lives.push((s.life, s.stat.rss_bytes, s.stat.fds)),
            }
        }
        lives
    }

    /// The most node `i`'s data dir held on disk.
    pub fn peak_disk(&self, i: usize) -> u64 {
        self.samples
            .iter()
            .filter(|s| s.who == Who::Node(i))
            .map(|s| s.disk)
            .max()
            .unwrap_or(0)
    }
}

/// Least-squares slope of `value` over time (per second), for the samples from `from` on.
fn slope(samples: &[&ProcSample], from: Duration, value: impl Fn(&ProcSample) -> f64) -> f64 {
    let after: Vec<&ProcSample> = samples.iter().copied().filter(|s| s.at >= from).collect();
    let n = after.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (sx, sy) = after.iter().fold((0.0, 0.0), |(x, y), s| {
        (x + s.at.as_secs_f64(), y + value(s))
    });
    let (mx, my) = (sx / n, sy / n);
    let (mut num, mut den) = (0.0, 0.0);
    for s in &after {
        let dx = s.at.as_secs_f64() - mx;
        num += dx * (value(s) - my);
        den += dx * dx;
    }
    if den > 0.0 {
        num / den
    } else {
        0.0
    }
}

/// A process's memory and descriptors between the end of the warm-up and the end of the run.
#[derive(Debug, Clone, Copy)]
pub struct Trend {
    pub warm_at: Duration,
    pub end_at: Duration,
    pub warm_rss: u64,
    pub end_rss: u64,
    pub max_rss: u64,
    /// Least squares of RSS over time after the warm-up, and over the run's second half only.
    pub rss_slope_mib_per_hour: f64,
    pub rss_slope_last_half_mib_per_hour: f64,
    /// The anonymous part of RSS (heap and stacks), and its trend over the second half.
    pub warm_anon: u64,
    pub end_anon: u64,
    pub anon_slope_last_half_mib_per_hour: f64,
    /// The metadata database's memory, after the warm-up and at the end, and its trend.
    pub warm_meta: u64,
    pub end_meta: u64,
    pub meta_slope_mib_per_hour: f64,
    pub warm_fds: usize,
    pub end_fds: usize,
    pub max_fds: usize,
    pub cpu: Duration,
}

/// Whether each node takes requests, and how many it has in flight.
struct Gate {
    up: Vec<AtomicBool>,
    in_flight: Vec<AtomicUsize>,
}

impl Gate {
    fn new(nodes: usize) -> Self {
        Self {
            up: (0..nodes).map(|_| AtomicBool::new(true)).collect(),
            in_flight: (0..nodes).map(|_| AtomicUsize::new(0)).collect(),
        }
    }

    /// Enters the first node taking requests, starting at `home`; `None` when none is.
    fn enter(&self, home: usize) -> Option<Entered<'_>> {
        let n = self.up.len();
        (0..n).map(|k| (home + k) % n).find_map(|i| {
            // Counted first, checked second: a stop that closes the gate after this sees the count.
            self.in_flight[i].fetch_add(1, Ordering::SeqCst);
            if self.up[i].load(Ordering::SeqCst) {
                Some(Entered {
                    gate: self,
                    node: i,
                })
            } else {
                self.in_flight[i].fetch_sub(1, Ordering::SeqCst);
                None
            }
        })
    }

    /// Closes node `i` and waits until nothing is in flight to it.
    fn close(&self, i: usize) -> Result<()> {
        self.up[i].store(false, Ordering::SeqCst);
        crate::wait::poll("requests to the node to finish", DRAIN_CAP, || {
            Ok((self.in_flight[i].load(Ordering::SeqCst) == 0).then_some(()))
        })
    }

    fn open(&self, i: usize) {
        self.up[i].store(true, Ordering::SeqCst);
    }
}

struct Entered<'a> {
    gate: &'a Gate,
    node: usize,
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        self.gate.in_flight[self.node].fetch_sub(1, Ordering::SeqCst);
    }
}

/// Runs `plan`: starts the cluster, pushes and primes the cached content, then load, faults and
/// sampling for `plan.duration`, then the checks at rest.
pub fn run(t: &TestCtx, plan: &Plan) -> Result<Outcome> {
    ensure!(
        plan.nodes > STEADY_NODES,
        "a soak needs more than {STEADY_NODES} nodes (those are never stopped)"
    );
    let quota = format!("{}MiB", plan.quota_mib);
    let spec = NodeSpec::member().with_args(["--store-quota", quota.as_str()]);
    let options = ClusterOptions {
        origin_mbit: plan.link_mbit,
        node_mbit: plan.link_mbit,
        ..ClusterOptions::of(vec![spec; plan.nodes])
    };
    let cluster = Cluster::start(t, &options)?;
    let load_plan = load::Plan {
        clients: 0,
        requests: 0,
        manifests: 20,
        cached_blob: 16 << 20,
        cold_blob: 0,
        seed: plan.seed,
        pace: None,
        spread_cold: false,
    };
    let content = Content::push(cluster.origin(), &load_plan)?;
    for i in 0..plan.nodes {
        content
            .prime_node(cluster.node(i))
            .with_context(|| format!("priming node {i}"))?;
    }
    let urls: Vec<String> = (0..plan.nodes).map(|i| cluster.node(i).url()).collect();
    let log_mark = cluster.origin_mark()?;

    let cluster = Mutex::new(cluster);
    let gate = Gate::new(plan.nodes);
    let fresh: RwLock<Vec<(String, u64)>> = RwLock::new(Vec::new());
    let requests = Mutex::new(Vec::new());
    let faults = Mutex::new(Vec::new());
    let samples = Mutex::new(Vec::new());
    let lives = Mutex::new(vec![0usize; plan.nodes + 1]);
    let stop = AtomicBool::new(false);
    let failure: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let start = Instant::now();

    // The first fresh blob before any client asks for one.
    push_fresh(&lock(&cluster), plan, 0, &fresh)?;

    let record_failure = |e: anyhow::Error| {
        lock(&failure).get_or_insert(e);
        stop.store(true, Ordering::SeqCst);
    };
    let record_failure = &record_failure;
    std::thread::scope(|s| {
        // Clients.
        for c in 0..plan.nodes * plan.clients_per_node {
            let (gate, fresh, requests, stop, urls, content) =
                (&gate, &fresh, &requests, &stop, &urls, &content);
            s.spawn(move || {
                let Ok(client) = http::pooled_client(REQUEST_TIMEOUT) else {
                    return;
                };
                let mut rng = Rng(plan.seed ^ (c as u64 + 1).wrapping_mul(0x9E37_79B9));
                let clients = (plan.nodes * plan.clients_per_node) as u32;
                let mut due = plan.pace * c as u32 / clients;
                let mut mine = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        std::thread::sleep(wait);
                    }
                    due += plan.pace;
                    let Some(entered) = gate.enter(c % plan.nodes) else {
                        continue;
                    };
                    let at = start.elapsed();
                    let roll = rng.below(100) as u64;
                    let r = if roll < plan.fresh_percent {
                        let (bytes, blob, error) =
                            fresh_read(&client, &urls[entered.node], plan, fresh, &mut rng);
                        (Kind::Fresh, bytes, error, blob)
                    } else {
                        let kind = if rng.below(10) < 6 {
                            load::Kind::Manifest
                        } else {
                            load::Kind::Range
                        };
                        let got =
                            load::one(&client, &urls[entered.node], kind, c, &mut rng, content);
                        let kind = if kind == load::Kind::Manifest {
                            Kind::Manifest
                        } else {
                            Kind::Range
                        };
                        (kind, got.bytes, got.error, None)
                    };
                    mine.push(Request {
                        kind: r.0,
                        node: entered.node,
                        at,
                        took: start.elapsed() - at,
                        bytes: r.1,
                        blob: r.3,
                        error: r.2,
                    });
                }
                lock(requests).extend(mine);
            });
        }
        // Fresh blobs.
        s.spawn(|| {
            let mut n = 1;
            while sleep_until(&stop, start, plan.fresh_every * n as u32) {
                if let Err(e) = push_fresh(&lock(&cluster), plan, n, &fresh) {
                    record_failure(e.context("pushing a fresh blob"));
                }
                n += 1;
            }
        });
        // Pulls of the image with skopeo.
        s.spawn(|| {
            let mut n = 1;
            while sleep_until(&stop, start, plan.pull_every * n as u32) {
                let Some(entered) = gate.enter(n % plan.nodes) else {
                    continue;
                };
                let at = start.elapsed();
                let job = lock(&cluster).pull_job(t, entered.node);
                let (bytes, error) = match job {
                    Ok(job) => {
                        let pulled = job.run(Instant::now());
                        let image = lock(&cluster).image().clone();
                        let checked = pulled.verify(&image);
                        let _ = pulled.remove();
                        match checked {
                            Ok(()) => (image.blobs().iter().map(|d| d.size).sum(), None),
                            Err(e) => (0, Some(format!("{e:#}"))),
                        }
                    }
                    Err(e) => (0, Some(format!("{e:#}"))),
                };
                lock(&requests).push(Request {
                    kind: Kind::Pull,
                    node: entered.node,
                    at,
                    took: start.elapsed() - at,
                    bytes,
                    blob: None,
                    error,
                });
                drop(entered);
                n += 1;
            }
        });
        // Node faults.
        s.spawn(|| {
            if plan.node_restart_every.is_zero() {
                return;
            }
            let mut k = 0;
            let stoppable = plan.nodes - STEADY_NODES;
            while sleep_until(&stop, start, plan.node_restart_every * (k as u32 + 1)) {
                let i = STEADY_NODES + k % stoppable;
                let fault = if (k / stoppable).is_multiple_of(2) {
                    Fault::NodeKilled(i)
                } else {
                    Fault::NodeTerminated(i)
                };
                match stop_and_restart(&cluster, &gate, &lives, i, fault, plan.down_for) {
                    Ok(restart) => lock(&faults).push(FaultAt {
                        at: start.elapsed(),
                        fault,
                        restart,
                    }),
                    Err(e) => record_failure(e.context(format!("{fault:?}"))),
                }
                k += 1;
            }
        });
        // Scheduler faults.
        s.spawn(|| {
            if plan.scheduler_restart_every.is_zero() {
                return;
            }
            let mut k = 1;
            while sleep_until(&stop, start, plan.scheduler_restart_every * k) {
                let restarted = (|| -> Result<Duration> {
                    let mut c = lock(&cluster);
                    c.kill_scheduler()?;
                    drop(c);
                    std::thread::sleep(plan.down_for);
                    let began = Instant::now();
                    let mut c = lock(&cluster);
                    c.restart_scheduler()?;
                    lock(&lives)[plan.nodes] += 1;
                    Ok(began.elapsed())
                })();
                match restarted {
                    Ok(restart) => lock(&faults).push(FaultAt {
                        at: start.elapsed(),
                        fault: Fault::SchedulerKilled,
                        restart,
                    }),
                    Err(e) => record_failure(e.context("restarting the scheduler")),
                }
                k += 1;
            }
        });
        // Samples.
        s.spawn(|| {
            let mut k = 0;
            while sleep_until(&stop, start, plan.sample_every * k) {
                let at = start.elapsed();
                let c = lock(&cluster);
                let lives = lock(&lives).clone();
                let mut got = Vec::new();
                for (i, &life) in lives.iter().enumerate().take(plan.nodes) {
                    if !gate.up[i].load(Ordering::SeqCst) {
                        continue;
                    }
                    if let Some(stat) = c.node(i).pid().and_then(|p| ProcStat::of(p).ok()) {
                        let meta_memory = c
                            .metrics(i)
                            .map(|m| m.sum("shoal_store_meta_memory_bytes", &[]) as u64)
                            .unwrap_or(0);
                        got.push(ProcSample {
                            at,
                            who: Who::Node(i),
                            life,
                            stat,
                            disk: crate::pressure::allocated(c.node(i).data_dir()),
                            meta_memory,
                        });
                    }
                }
                let sched = c.scheduler().ok().and_then(|s| s.pid());
                if let Some(stat) = sched.and_then(|p| ProcStat::of(p).ok()) {
                    got.push(ProcSample {
                        at,
                        who: Who::Scheduler,
                        life: lives[plan.nodes],
                        stat,
                        disk: 0,
                        meta_memory: 0,
                    });
                }
                drop(c);
                lock(&samples).extend(got);
                k += 1;
            }
        });
        // The clock.
        sleep_until(&stop, start, plan.duration);
        stop.store(true, Ordering::SeqCst);
    });
    let wall = start.elapsed();
    if let Some(e) = failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }

    let cluster = cluster.into_inner().unwrap_or_else(|e| e.into_inner());
    let requests = requests.into_inner().unwrap_or_else(|e| e.into_inner());
    let fresh = fresh.into_inner().unwrap_or_else(|e| e.into_inner());
    let mut corrupt_at_rest = Vec::new();
    let mut checked_at_rest = 0;
    for i in 0..plan.nodes {
        let node = cluster.node(i);
        checked_at_rest += node.status()?.blobs.iter().filter(|b| b.complete).count();
        for d in crate::crash::corrupt_at_rest(node)? {
            corrupt_at_rest.push(format!("node {i}: {d}"));
        }
    }
    let log = cluster.origin().log()?.since(log_mark);
    // Per fresh blob: whether some client read it (the others may never have left the origin),
    // and what it cost the origin.
    let fresh_origin: Vec<Option<u64>> = fresh
        .iter()
        .map(|(d, _)| {
            let read = requests
                .iter()
                .any(|r| r.error.is_none() && r.blob.as_deref() == Some(d.as_str()));
            read.then(|| {
                log.requests
                    .iter()
                    .filter(|r| r.is_blob_fetch() && r.blob_digest() == Some(d.as_str()))
                    .map(|r| r.written)
                    .sum()
            })
        })
        .collect();
    let fresh_origin_bytes = fresh_origin.iter().flatten().sum();
    let fresh_read_bytes = fresh
        .iter()
        .zip(&fresh_origin)
        .filter(|(_, o)| o.is_some())
        .map(|((_, size), _)| size)
        .sum();
    Ok(Outcome {
        requests,
        faults: faults.into_inner().unwrap_or_else(|e| e.into_inner()),
        samples: samples.into_inner().unwrap_or_else(|e| e.into_inner()),
        fresh,
        fresh_origin,
        fresh_origin_bytes,
        fresh_read_bytes,
        corrupt_at_rest,
        checked_at_rest,
        wall,
    })
}

/// Pushes fresh blob `n` to the origin and makes it readable.
fn push_fresh(
    cluster: &Cluster,
    plan: &Plan,
    n: usize,
    fresh: &RwLock<Vec<(String, u64)>>,
) -> Result<()> {
    let data = pseudo_random(plan.fresh_blob, plan.seed ^ 0xf4e5 ^ ((n as u64) << 24));
    let digest = cluster.origin().push_blob(load::REPO, data)?;
    fresh
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .push((digest, plan.fresh_blob as u64));
    Ok(())
}

/// Reads one of the newest fresh blobs whole and checks it against its digest.
fn fresh_read(
    client: &reqwest::blocking::Client,
    base: &str,
    plan: &Plan,
    fresh: &RwLock<Vec<(String, u64)>>,
    rng: &mut Rng,
) -> (u64, Option<String>, Option<String>) {
    let (digest, size) = {
        let f = fresh.read().unwrap_or_else(|e| e.into_inner());
        let newest = f.len().min(plan.fresh_window).max(1);
        match f.get(f.len().saturating_sub(1 + rng.below(newest))) {
            Some(x) => x.clone(),
            None => return (0, None, Some("no fresh blob yet".into())),
        }
    };
    let url = format!("{base}/v2/{}/blobs/{digest}", load::REPO);
    match http::fetch_hashed(client.get(url)) {
        Ok(f) if f.status.as_u16() == 200 && f.digest == digest && f.len == size => {
            (size, Some(digest), None)
        }
        Ok(f) => (
            0,
            Some(digest.clone()),
            Some(format!(
                "fresh blob {digest}: {} with {} bytes hashing to {} ({:?})",
                f.status, f.len, f.digest, f.body_error
            )),
        ),
        Err(e) => {
            let why = format!("fresh blob {digest}: {e:#}");
            (0, Some(digest), Some(why))
        }
    }
}

/// Closes node `i` to clients, stops it (`fault`), waits `down_for`, starts it again and opens it;
/// returns how long the restart took.
fn stop_and_restart(
    cluster: &Mutex<Cluster>,
    gate: &Gate,
    lives: &Mutex<Vec<usize>>,
    i: usize,
    fault: Fault,
    down_for: Duration,
) -> Result<Duration> {
    gate.close(i)?;
    {
        let mut c = lock(cluster);
        match fault {
            Fault::NodeKilled(_) => c.kill_node(i)?,
            _ => c.terminate_node(i)?,
        }
    }
    std::thread::sleep(down_for);
    let began = Instant::now();
    lock(cluster).restart_node(i)?;
    let took = began.elapsed();
    lock(lives)[i] += 1;
    gate.open(i);
    Ok(took)
}

/// The guarded value, also after a panic elsewhere (every thread here only appends or swaps).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sleeps until `at` after `start` or until `stop`; whether the time came without a stop.
fn sleep_until(stop: &AtomicBool, start: Instant, at: Duration) -> bool {
    loop {
        if stop.load(Ordering::SeqCst) {
            return false;
        }
        let Some(left) = at.checked_sub(start.elapsed()) else {
            return true;
        };
        std::thread::sleep(left.min(Duration::from_millis(200)));
    }
}
