//! A shoal cluster on one machine: one network namespace per host on a bridge ([`Net`]), the
//! origin registry on its own host behind a shaped link (200 Mbit/s out by default), a scheduler
//! host, and N node hosts (1 Gbit/s links both ways) each running `shoal node` with the cluster's
//! join secret, `--scheduler` and the first nodes as `--peer` bootstrap. The fixture image is in
//! the origin before any node starts. Clients (`skopeo copy`) run inside a node's namespace and
//! pull through that node's mirror, or straight from the origin for a baseline.
//!
//! Ground truth about the origin comes from its own access log ([`Cluster::origin_blob_bytes_since`]),
//! never from numbers the nodes report; node metrics are read only to explain a result or to show
//! which peer did what.
//!
//! Invariants: every host, process and link is gone when the cluster is dropped, also when a test
//! fails (nodes and scheduler first, the network last: field order); node `i` always lives on
//! host `i` with the same address, ports and data dir across restarts.

use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Barrier, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use shoal_proto::sched::{NodeStatus, StatusResponse};
use shoal_proto::NodeId;

use crate::fixture::{assert_same_image, Image, OciLayout};
use crate::metrics::Metrics;
use crate::netns::{Host, Net};
use crate::node::{Node, NodeOptions};
use crate::registry::Registry;
use crate::scheduler::{Scheduler, SCHEDULER_PORT};
use crate::setup::{self, IMAGE};
use crate::{skopeo, TestCtx};

/// What a cluster test needs on the machine.
pub const NEEDS: &[crate::Need] = &[
    crate::Need::Root,
    crate::Need::Bin("ip"),
    crate::Need::Bin("tc"),
    crate::Need::Bin("docker-registry"),
    crate::Need::Bin("skopeo"),
    crate::Need::Shoal,
];

/// The origin's link, as issue 5 sets it: what the registry can send, in Mbit/s.
pub const ORIGIN_MBIT: u32 = 200;
/// Every node's link, both directions, in Mbit/s.
pub const NODE_MBIT: u32 = 1000;
/// The origin registry's port on its host.
pub const ORIGIN_PORT: u16 = 5000;
/// The QUIC data plane port (`--p2p IP:5052`).
pub const P2P_PORT: u16 = 5052;
/// The libp2p DHT port (TCP, the node's default next to `--p2p`; `--peer IP:5053`).
pub const DHT_PORT: u16 = 5053;
/// Environment variable that makes a node corrupt every range it serves to peers.
pub const FAULT_CORRUPT_UPLOADS: &str = "SHOAL_FAULT_CORRUPT_UPLOADS";
/// How long the scheduler may take to list a node after the node started.
const MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(30);

/// Node metric names this harness reads (the node's `/metrics` contract, issue 5), in one place.
///
/// Bytes by source are looked up under two names each: the node's (`shoal_origin_bytes_total`,
/// `shoal_peer_bytes_total`, with a `kind` label) and the `shoal_bytes_from_*_total` names the
/// issue's test plan used; whichever the scrape has is read.
pub mod metric {
    use crate::metrics::Metrics;

    /// Bytes the node read from origin registries.
    pub const FROM_ORIGIN: &[&str] = &["shoal_origin_bytes_total", "shoal_bytes_from_origin_total"];
    /// Blob bytes the node obtained from peers (verified).
    pub const FROM_PEERS: &[&str] = &["shoal_peer_bytes_total", "shoal_bytes_from_peers_total"];
    /// Pieces from peers that failed verification.
    pub const BAD_PIECES: &str = "shoal_bad_pieces_total";
    /// Range bytes sent to peers, label `peer` = the receiver's node id.
    pub const P2P_UPLOAD_BYTES: &str = "shoal_p2p_upload_bytes_total";
    /// Range bytes received from peers, label `peer` = the sender's node id.
    pub const P2P_DOWNLOAD_BYTES: &str = "shoal_p2p_download_bytes_total";
    /// Peer connections refused in the membership handshake, label `outcome` (`join_refused`, …).
    pub const P2P_HANDSHAKE_FAILURES: &str = "shoal_p2p_handshake_failures_total";
    /// Blob downloads running now.
    pub const DOWNLOADS_IN_FLIGHT: &str = "shoal_downloads_in_flight";

    /// The sum of the first of `names` that `metrics` has; `None` when it has none of them.
    pub fn first_of(metrics: &Metrics, names: &[&str]) -> Option<f64> {
        names
            .iter()
            .find(|n| metrics.has(n))
            .map(|n| metrics.sum(n, &[]))
    }
}

/// How a node relates to the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    /// Holds the cluster's join secret.
    Member,
    /// Runs the P2P layer with the same scheduler and bootstrap peers, but its own join secret.
    Outsider,
    /// No join secret, no scheduler, no peers: a plain mirror (the harness's baseline).
    Standalone,
}

/// One node of a cluster to start.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub membership: Membership,
    /// Extra environment of the node process.
    pub env: Vec<(String, String)>,
    /// Extra arguments of `shoal node`, after the cluster's own.
    pub args: Vec<String>,
}

impl NodeSpec {
    /// A member of the cluster.
    pub fn member() -> Self {
        Self {
            membership: Membership::Member,
            env: Vec::new(),
            args: Vec::new(),
        }
    }

    /// This node with `args` appended to its command line (`--snapshotter-socket PATH`, …).
    pub fn with_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// A node with a different join secret.
    pub fn outsider() -> Self {
        Self {
            membership: Membership::Outsider,
            ..Self::member()
        }
    }

    /// A node without P2P.
    pub fn standalone() -> Self {
        Self {
            membership: Membership::Standalone,
            ..Self::member()
        }
    }

    /// A member that flips a byte in every range it serves to peers (`SHOAL_FAULT_CORRUPT_UPLOADS=1`).
    pub fn corrupt_uploads() -> Self {
        Self {
            env: vec![(FAULT_CORRUPT_UPLOADS.to_owned(), "1".to_owned())],
            ..Self::member()
        }
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Node `i` runs on host `i`.
    pub nodes: Vec<NodeSpec>,
    /// The origin's egress rate, Mbit/s.
    pub origin_mbit: u32,
    /// Each node's link rate (both directions), Mbit/s.
    pub node_mbit: u32,
    /// How many of the first members every node gets as `--peer` (itself excluded).
    pub bootstrap: usize,
}

impl ClusterOptions {
    /// `n` members, links as issue 5 sets them, the first two members as bootstrap peers.
    pub fn members(n: usize) -> Self {
        Self::of(vec![NodeSpec::member(); n])
    }

    /// The given nodes, links as issue 5 sets them.
    pub fn of(nodes: Vec<NodeSpec>) -> Self {
        Self {
            nodes,
            origin_mbit: ORIGIN_MBIT,
            node_mbit: NODE_MBIT,
            bootstrap: 2,
        }
    }
}

/// One node of a running cluster.
#[derive(Debug)]
pub struct ClusterNode {
    pub host: Host,
    pub spec: NodeSpec,
    pub node: Node,
}

/// A running cluster. Fields drop in order: processes first, the network last.
#[derive(Debug)]
pub struct Cluster {
    nodes: Vec<ClusterNode>,
    scheduler: Option<Scheduler>,
    origin: Registry,
    image: Image,
    net: Net,
    /// The members' join secret (the scheduler's too).
    member_secret: PathBuf,
}

impl Cluster {
    /// Builds the network, starts the origin with the fixture image pushed as [`IMAGE`], the
    /// scheduler (when any node runs P2P) and every node, and waits until each node is healthy and
    /// the scheduler lists every member.
    pub fn start(t: &TestCtx, options: &ClusterOptions) -> Result<Self> {
        if let Some(why) = crate::netns::unavailable() {
            bail!("cannot build test hosts: {why}");
        }
        let mut net = Net::new()?;
        let origin_host = net.add_host()?;
        net.shape_egress(&origin_host, options.origin_mbit)?;
        let p2p = options
            .nodes
            .iter()
            .any(|s| s.membership != Membership::Standalone);
        let scheduler_host = if p2p { Some(net.add_host()?) } else { None };
        let mut hosts = Vec::new();
        for _ in &options.nodes {
            let host = net.add_host()?;
            net.shape_egress(&host, options.node_mbit)?;
            net.shape_ingress(&host, options.node_mbit)?;
            hosts.push(host);
        }
        net.pin_neighbors()?;

        let origin = Registry::start_on_host(t, &origin_host, ORIGIN_PORT)?;
        skopeo::push_fixture(t, &origin, IMAGE).context("pushing the fixture into the origin")?;
        let image = setup::fixture_image()?;
        let member_secret = write_secret(t, "cluster")?;
        let scheduler = match &scheduler_host {
            Some(h) => Some(Scheduler::start_with_secret(
                t,
                Some(&h.ns),
                SocketAddr::from((h.ip, SCHEDULER_PORT)),
                Some(&member_secret),
            )?),
            None => None,
        };

        let plan = Plan {
            upstream: origin.url(),
            scheduler: scheduler.as_ref().map(Scheduler::addr),
            member_secret: member_secret.clone(),
            outsider_secret: write_secret(t, "outsider")?,
            bootstrap: bootstrap_ips(&hosts, options),
        };
        let mut nodes = Vec::new();
        for (i, (host, spec)) in hosts.into_iter().zip(&options.nodes).enumerate() {
            let node = Node::prepare(t, plan.node_options(i, &host, spec))?;
            nodes.push(ClusterNode {
                host,
                spec: spec.clone(),
                node,
            });
        }
        let mut cluster = Self {
            nodes,
            scheduler,
            origin,
            image,
            net,
            member_secret,
        };
        for n in &mut cluster.nodes {
            n.node.spawn_only()?;
        }
        for n in &mut cluster.nodes {
            n.node.wait_ready()?;
        }
        if cluster.scheduler.is_some() {
            // Outsiders are not waited for: a scheduler may well refuse them.
            let members: Vec<usize> = (0..cluster.len())
                .filter(|&i| cluster.nodes[i].spec.membership == Membership::Member)
                .collect();
            cluster.wait_scheduler_lists(&members, MEMBERSHIP_TIMEOUT)?;
        }
        Ok(cluster)
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The image pushed into the origin.
    pub fn image(&self) -> &Image {
        &self.image
    }

    /// Bytes of every blob of the image (config and layers): what one full pull reads.
    pub fn image_bytes(&self) -> u64 {
        self.image.blobs().iter().map(|d| d.size).sum()
    }

    /// The origin registry.
    pub fn origin(&self) -> &Registry {
        &self.origin
    }

    /// The network (for the bridge address, hosts, …).
    pub fn net(&self) -> &Net {
        &self.net
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i].node
    }

    /// Node `i`'s host.
    pub fn host(&self, i: usize) -> &Host {
        &self.nodes[i].host
    }

    /// Whether node `i` runs the P2P layer.
    pub fn is_p2p(&self, i: usize) -> bool {
        self.nodes[i].spec.membership != Membership::Standalone
    }

    /// Node `i`'s data plane address (`--p2p`).
    pub fn p2p_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::from((self.nodes[i].host.ip, P2P_PORT))
    }

    /// SIGKILLs node `i` (waits until it is gone).
    pub fn kill_node(&mut self, i: usize) -> Result<()> {
        self.nodes[i].node.kill()
    }

    /// SIGTERMs node `i` and waits until it has exited cleanly.
    pub fn terminate_node(&mut self, i: usize) -> Result<()> {
        self.nodes[i].node.terminate().map(drop)
    }

    /// Starts the (stopped) node `i` again on the same host and data dir; waits until healthy.
    pub fn restart_node(&mut self, i: usize) -> Result<()> {
        self.nodes[i].node.restart()
    }

    /// The scheduler.
    /// The cluster's join secret file (what `shoal prewarm --join-secret-file` takes).
    pub fn join_secret(&self) -> &Path {
        &self.member_secret
    }

    pub fn scheduler(&self) -> Result<&Scheduler> {
        self.scheduler
            .as_ref()
            .context("this cluster runs no scheduler")
    }

    /// SIGKILLs the scheduler.
    pub fn kill_scheduler(&mut self) -> Result<()> {
        self.scheduler
            .as_mut()
            .context("this cluster runs no scheduler")?
            .kill()
    }

    /// Starts the scheduler again on the same address (empty: it keeps no state).
    pub fn restart_scheduler(&mut self) -> Result<()> {
        self.scheduler
            .as_mut()
            .context("this cluster runs no scheduler")?
            .restart()
    }

    /// The scheduler's `GET /api/v1/status`.
    pub fn scheduler_status(&self) -> Result<StatusResponse> {
        self.scheduler()?.status()
    }

    /// Node `i` as the scheduler lists it (matched by its data plane IP), if it does.
    pub fn scheduler_entry<'a>(
        &self,
        status: &'a StatusResponse,
        i: usize,
    ) -> Option<&'a NodeStatus> {
        let ip = self.nodes[i].host.ip;
        status.nodes.iter().find(|n| n.p2p_addr.ip() == ip)
    }

    /// Node `i`'s id, as the scheduler knows it.
    pub fn node_id(&self, i: usize) -> Result<NodeId> {
        let status = self.scheduler_status()?;
        self.scheduler_entry(&status, i)
            .map(|n| n.id)
            .with_context(|| {
                format!(
                    "the scheduler does not list node {i} ({})",
                    self.p2p_addr(i)
                )
            })
    }

    /// Polls the scheduler until it lists every node in `nodes`; returns how long that took.
    pub fn wait_scheduler_lists(&self, nodes: &[usize], timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        crate::wait::poll("the scheduler to list the nodes", timeout, || {
            let status = self.scheduler_status()?;
            let missing: Vec<usize> = nodes
                .iter()
                .copied()
                .filter(|&i| self.scheduler_entry(&status, i).is_none())
                .collect();
            if missing.is_empty() {
                Ok(Some(started.elapsed()))
            } else {
                bail!("nodes {missing:?} not listed")
            }
        })
    }

    /// Node `i`'s `/metrics`.
    pub fn metrics(&self, i: usize) -> Result<Metrics> {
        self.nodes[i].node.metrics()
    }

    /// A command that runs `program` inside node `i`'s network *and mount* namespaces.
    ///
    /// `ip netns exec` gives each node a mount namespace of its own (`/` made a recursive slave),
    /// so a FUSE mount the node makes exists there only: this process cannot see or read it, and
    /// whatever uses the mount (a chroot, `umount`) has to run in the node's namespace.
    pub fn in_node_mounts(&self, i: usize, program: &str) -> Result<Command> {
        let pid = self.node_pid(i)?;
        let mut c = Command::new("nsenter");
        c.args([
            "--target",
            &pid.to_string(),
            "--mount",
            "--net",
            "--",
            program,
        ]);
        Ok(c)
    }

    /// Node `i`'s process id: the process in its host's namespace whose command line names its
    /// data dir.
    pub fn node_pid(&self, i: usize) -> Result<u32> {
        let ns = &self.nodes[i].host.ns;
        let out = Command::new("ip")
            .args(["netns", "pids", ns])
            .output()
            .context("running ip netns pids")?;
        let data_dir = self.nodes[i].node.data_dir().to_string_lossy().into_owned();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
            .find(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                    let args: Vec<&[u8]> = c.split(|&b| b == 0).collect();
                    args.get(1) == Some(&&b"node"[..]) && args.contains(&data_dir.as_bytes())
                })
            })
            .with_context(|| format!("no running node process in {ns} (data dir {data_dir})"))
    }

    /// Where the origin's log stands now: pass it to [`Cluster::origin_blob_bytes_since`].
    pub fn origin_mark(&self) -> Result<usize> {
        Ok(self.origin.log()?.requests.len())
    }

    /// Blob bytes the origin sent (its own log: blob `GET`s answered with content) since `mark`.
    pub fn origin_blob_bytes_since(&self, mark: usize) -> Result<u64> {
        Ok(self.origin.log()?.since(mark).blob_bytes_written())
    }

    /// A `skopeo copy` of the image from inside node `i`'s host through its mirror, ready to run.
    pub fn pull_job(&self, t: &TestCtx, i: usize) -> Result<PullJob> {
        let listen = self.nodes[i].node.listen_addr();
        self.job(t, i, &listen, "pull")
    }

    /// A `skopeo copy` of the image from inside node `i`'s host straight from the origin (no
    /// shoal), ready to run.
    pub fn direct_pull_job(&self, t: &TestCtx, i: usize) -> Result<PullJob> {
        self.job(t, i, &self.origin.addr(), "direct")
    }

    /// Pulls the image through node `i` and checks the copy byte for byte.
    pub fn pull_and_verify(&self, t: &TestCtx, i: usize) -> Result<Pulled> {
        let pulled = self.pull_job(t, i)?.run(Instant::now());
        pulled.verify(&self.image)?;
        Ok(pulled)
    }

    fn job(&self, t: &TestCtx, i: usize, registry: &str, kind: &str) -> Result<PullJob> {
        let dest = t.subdir(&format!("{kind}-node{i}"))?;
        let cmd = skopeo::copy_command(
            t,
            Some(&self.nodes[i].host.ns),
            registry,
            IMAGE,
            None,
            &dest,
        )?;
        Ok(PullJob { node: i, cmd, dest })
    }
}

/// One client pull, built and not yet run.
#[derive(Debug)]
pub struct PullJob {
    /// The node whose host it runs on.
    pub node: usize,
    cmd: Command,
    dest: PathBuf,
}

impl PullJob {
    /// Runs it; `since` is the instant its elapsed time counts from.
    pub fn run(self, since: Instant) -> Pulled {
        let outcome = skopeo::run_command(self.cmd);
        Pulled {
            node: self.node,
            outcome: outcome.map_err(|e| format!("{e:#}")),
            dest: self.dest,
            elapsed: since.elapsed(),
        }
    }
}

/// What one pull did.
#[derive(Debug)]
pub struct Pulled {
    pub node: usize,
    /// skopeo's outcome, or why it could not be run.
    pub outcome: std::result::Result<skopeo::Outcome, String>,
    /// The OCI layout it wrote.
    pub dest: PathBuf,
    /// From the common start to skopeo's exit.
    pub elapsed: Duration,
}

impl Pulled {
    /// Whether skopeo ran and succeeded.
    pub fn succeeded(&self) -> bool {
        matches!(&self.outcome, Ok(o) if o.success)
    }

    /// Checks that skopeo succeeded and that its copy is `image`, byte for byte.
    pub fn verify(&self, image: &Image) -> Result<()> {
        match &self.outcome {
            Err(e) => bail!("node {}: skopeo could not run: {e}", self.node),
            Ok(o) if !o.success => bail!(
                "node {}: skopeo copy failed after {:.1?}: {}",
                self.node,
                self.elapsed,
                o.stderr.trim()
            ),
            Ok(_) => {}
        }
        let layout = OciLayout::open(&self.dest)?;
        assert_same_image(image, &layout)
            .with_context(|| format!("node {}: the copy differs from the source", self.node))
    }

    /// Deletes the copy (benchmarks keep the disk small).
    pub fn remove(&self) -> Result<()> {
        std::fs::remove_dir_all(&self.dest)
            .with_context(|| format!("removing {}", self.dest.display()))
    }
}

/// Pulls running at the same time, each on its own thread, released together by a barrier.
#[derive(Debug)]
pub struct PullSet {
    started: Instant,
    /// Nodes whose pull has finished, in finishing order.
    finished: Arc<Mutex<Vec<usize>>>,
    handles: Vec<(usize, JoinHandle<Pulled>)>,
}

impl PullSet {
    /// Starts every job and returns once they are all released (at the same moment).
    pub fn start(jobs: Vec<PullJob>) -> Self {
        let barrier = Arc::new(Barrier::new(jobs.len() + 1));
        let finished = Arc::new(Mutex::new(Vec::new()));
        let handles = jobs
            .into_iter()
            .map(|job| {
                let (barrier, finished) = (barrier.clone(), finished.clone());
                let node = job.node;
                let handle = std::thread::spawn(move || {
                    barrier.wait();
                    let pulled = job.run(Instant::now());
                    if let Ok(mut done) = finished.lock() {
                        done.push(node);
                    }
                    pulled
                });
                (node, handle)
            })
            .collect();
        barrier.wait();
        Self {
            started: Instant::now(),
            finished,
            handles,
        }
    }

    /// When they were released.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The nodes whose pull is still running.
    pub fn running(&self) -> Vec<usize> {
        let done = self.finished.lock().map(|d| d.clone()).unwrap_or_default();
        self.handles
            .iter()
            .map(|(node, _)| *node)
            .filter(|node| !done.contains(node))
            .collect()
    }

    /// Polls `check` until it yields a value; fails if every pull finished first (whatever
    /// `check` waits for must happen while pulls are still going) or after `timeout`.
    pub fn while_running<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut() -> Result<Option<T>>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("condition never held");
        loop {
            let running = self.running();
            match check() {
                Ok(Some(value)) => return Ok(value),
                Ok(None) => {}
                Err(err) => last = format!("{err:#}"),
            }
            if running.is_empty() {
                bail!("every pull finished before {what} ({last})");
            }
            if Instant::now() >= deadline {
                bail!("timed out after {timeout:?} waiting for {what}: {last}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for every pull; results in the order the jobs were given.
    pub fn join(self) -> Result<Vec<Pulled>> {
        self.handles
            .into_iter()
            .map(|(node, h)| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("the pull thread of node {node} panicked"))
            })
            .collect()
    }
}

/// Pulls through nodes `nodes` all at the same moment and waits for them.
pub fn pull_together(cluster: &Cluster, t: &TestCtx, nodes: &[usize]) -> Result<Vec<Pulled>> {
    let jobs = nodes
        .iter()
        .map(|&i| cluster.pull_job(t, i))
        .collect::<Result<Vec<_>>>()?;
    PullSet::start(jobs).join()
}

/// Checks every pull in `pulled` (all of them, so the message names each failure).
pub fn verify_all(image: &Image, pulled: &[Pulled]) -> Result<()> {
    let failures: Vec<String> = pulled
        .iter()
        .filter_map(|p| p.verify(image).err().map(|e| format!("{e:#}")))
        .collect();
    ensure!(
        failures.is_empty(),
        "{} of {} pulls were wrong or failed:\n{}",
        failures.len(),
        pulled.len(),
        failures.join("\n")
    );
    Ok(())
}

/// A node's byte counters by source, read from its metrics (0 when a series is missing).
#[derive(Debug, Clone, Copy, Default)]
pub struct NodeBytes {
    pub from_origin: u64,
    pub from_peers: u64,
    pub to_peers: u64,
}

impl NodeBytes {
    /// Reads them from `metrics`.
    pub fn of(metrics: &Metrics) -> Self {
        Self {
            from_origin: metric::first_of(metrics, metric::FROM_ORIGIN).unwrap_or(0.0) as u64,
            from_peers: metric::first_of(metrics, metric::FROM_PEERS).unwrap_or(0.0) as u64,
            to_peers: metrics.sum(metric::P2P_UPLOAD_BYTES, &[]) as u64,
        }
    }
}

/// One line per node: what it says it read from the origin and from peers, and sent to peers.
pub fn node_report(cluster: &Cluster) -> String {
    let mut out = String::new();
    for i in 0..cluster.len() {
        let line = match cluster.metrics(i) {
            Ok(m) => {
                let b = NodeBytes::of(&m);
                format!(
                    "node {i:2} {:>15}: from origin {:>7.1} MB, from peers {:>7.1} MB, to peers {:>7.1} MB\n",
                    cluster.host(i).ip.to_string(),
                    mb(b.from_origin),
                    mb(b.from_peers),
                    mb(b.to_peers)
                )
            }
            Err(e) => format!("node {i:2}: no metrics ({e:#})\n"),
        };
        out.push_str(&line);
    }
    out
}

/// Bytes as MB (10^6), for reports.
pub fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// Everything a node's command line is made of.
struct Plan {
    upstream: String,
    scheduler: Option<SocketAddr>,
    member_secret: PathBuf,
    outsider_secret: PathBuf,
    bootstrap: Vec<Ipv4Addr>,
}

impl Plan {
    fn node_options(&self, i: usize, host: &Host, spec: &NodeSpec) -> NodeOptions {
        let mut args = Vec::new();
        let secret = match spec.membership {
            Membership::Member => Some(&self.member_secret),
            Membership::Outsider => Some(&self.outsider_secret),
            Membership::Standalone => None,
        };
        if let Some(secret) = secret {
            args.push("--p2p".to_owned());
            args.push(SocketAddr::from((host.ip, P2P_PORT)).to_string());
            args.push("--join-secret-file".to_owned());
            args.push(secret.display().to_string());
            if let Some(s) = self.scheduler {
                args.push("--scheduler".to_owned());
                args.push(s.to_string());
            }
            for ip in self.bootstrap.iter().filter(|ip| **ip != host.ip) {
                args.push("--peer".to_owned());
                args.push(SocketAddr::from((*ip, DHT_PORT)).to_string());
            }
        }
        args.extend(spec.args.iter().cloned());
        NodeOptions {
            upstream: self.upstream.clone(),
            extra_args: args,
            netns: Some(host.ns.clone()),
            bind: Some(host.ip),
            env: spec.env.clone(),
            label: format!("node{i}"),
            ..NodeOptions::default()
        }
    }
}

/// The addresses of the first `options.bootstrap` members.
fn bootstrap_ips(hosts: &[Host], options: &ClusterOptions) -> Vec<Ipv4Addr> {
    hosts
        .iter()
        .zip(&options.nodes)
        .filter(|(_, s)| s.membership == Membership::Member)
        .take(options.bootstrap)
        .map(|(h, _)| h.ip)
        .collect()
}

/// Writes a fresh join secret (hex of 32 random bytes, mode 0600) into a fresh subdir of the
/// test's dir (a test may start one cluster after another).
fn write_secret(t: &TestCtx, name: &str) -> Result<PathBuf> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .context("reading /dev/urandom")?;
    let path = secret_path(&t.subdir("secrets")?, name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(file, "{}", hex::encode(bytes))?;
    Ok(path)
}

fn secret_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("join-secret-{name}.hex"))
}
