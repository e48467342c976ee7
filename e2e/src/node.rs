//! A `shoal node` under test: spawned on free loopback ports (or, for multi-host tests, inside a
//! test host's network namespace on that host's address and the standard ports) with its data dir
//! in the test's temp dir, stderr captured to a log, ready when `GET /healthz` on the admin port
//! answers 200.
//!
//! Invariants: restarts reuse the same data dir, address, ports, arguments and environment; the log
//! is appended across restarts; dropping the handle SIGKILLs the process.

use std::fs::OpenOptions;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;

use crate::http;
use crate::metrics::Metrics;
use crate::paths;
use crate::wait::{free_port, poll};
use crate::TestCtx;

/// How long a node may take to become healthy.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a node may take to exit after SIGTERM.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// How to start a node.
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    /// Default upstream (`--upstream URL`).
    pub upstream: String,
    /// Per-host upstreams (`--upstream HOST=URL`).
    pub host_upstreams: Vec<(String, String)>,
    /// A config file to pass with `--config`.
    pub config: Option<PathBuf>,
    /// Extra arguments appended as they are.
    pub extra_args: Vec<String>,
    /// Run inside this network namespace (`ip netns exec NS shoal node …`).
    pub netns: Option<String>,
    /// Listen on this address with the standard ports ([`MIRROR_PORT`], [`ADMIN_PORT`]) instead
    /// of free loopback ports (a node on a test host).
    pub bind: Option<Ipv4Addr>,
    /// Extra environment variables (fault injection, …).
    pub env: Vec<(String, String)>,
    /// Name of the node's subdir and log label (`node` when empty).
    pub label: String,
    /// The data dir (`--data-dir`) instead of `data` in the node's subdir.
    pub data_dir: Option<PathBuf>,
    /// The control socket (`--control`) instead of `control.sock` in the node's subdir.
    pub control: Option<PathBuf>,
    /// Leave the store's quota to the node's default (watermarks of the data dir's
    /// filesystem). Otherwise the node gets `--store-quota 16GiB`, so that what a test sees does
    /// not depend on how full the machine's disk happens to be.
    pub filesystem_quota: bool,
}

/// The byte quota test nodes get unless [`NodeOptions::filesystem_quota`].
pub const TEST_QUOTA: &str = "16GiB";

/// The mirror port of a node with [`NodeOptions::bind`] set.
pub const MIRROR_PORT: u16 = 5050;
/// The admin port of a node with [`NodeOptions::bind`] set.
pub const ADMIN_PORT: u16 = 5051;

impl NodeOptions {
    /// A node whose default upstream is `url`.
    pub fn upstream(url: &str) -> Self {
        Self {
            upstream: url.to_owned(),
            ..Self::default()
        }
    }
}

/// `GET /api/v1/status` as the node reports it.
#[derive(Debug, Clone, Deserialize)]
pub struct Status {
    pub store: StoreStatus,
    pub traffic: TrafficStatus,
    #[serde(default)]
    pub blobs: Vec<BlobStatus>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct StoreStatus {
    pub bytes: u64,
    pub blobs: u64,
    pub complete: u64,
    pub quota_bytes: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TrafficStatus {
    pub served_bytes: u64,
    pub origin_bytes: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct BlobStatus {
    pub digest: String,
    pub size: Option<u64>,
    pub complete: bool,
    pub present_bytes: u64,
}

impl Status {
    /// The record of blob `digest`, if the node has one.
    pub fn blob(&self, digest: &str) -> Option<&BlobStatus> {
        self.blobs.iter().find(|b| b.digest == digest)
    }
}

/// A node process (running or stopped) and its files.
#[derive(Debug)]
pub struct Node {
    bin: PathBuf,
    data_dir: PathBuf,
    control: PathBuf,
    log_path: PathBuf,
    ip: IpAddr,
    listen: u16,
    admin: u16,
    options: NodeOptions,
    child: Option<Child>,
}

impl Node {
    /// Starts a node in front of `upstream_url` and waits until it is healthy.
    pub fn start(t: &TestCtx, upstream_url: &str) -> Result<Self> {
        Self::start_with(t, NodeOptions::upstream(upstream_url))
    }

    /// Starts a node with `options` and waits until it is healthy.
    pub fn start_with(t: &TestCtx, options: NodeOptions) -> Result<Self> {
        let mut node = Self::prepare(t, options)?;
        node.spawn()?;
        Ok(node)
    }

    /// A node set up (dirs, ports, log) but not started: [`Node::spawn_only`] then
    /// [`Node::wait_ready`] start it, so a caller can start many nodes at once and wait for them
    /// together.
    pub fn prepare(t: &TestCtx, options: NodeOptions) -> Result<Self> {
        let label = if options.label.is_empty() {
            "node"
        } else {
            options.label.as_str()
        };
        let dir = t.subdir(label)?;
        let log_path = dir.join("node.log");
        t.register_log(label, &log_path);
        let (ip, listen, admin) = match options.bind {
            Some(ip) => (IpAddr::V4(ip), MIRROR_PORT, ADMIN_PORT),
            None => (IpAddr::V4(Ipv4Addr::LOCALHOST), free_port()?, free_port()?),
        };
        Ok(Self {
            bin: paths::shoal_bin()?,
            control: options
                .control
                .clone()
                .unwrap_or_else(|| dir.join("control.sock")),
            data_dir: options.data_dir.clone().unwrap_or_else(|| dir.join("data")),
            log_path,
            ip,
            listen,
            admin,
            options,
            child: None,
        })
    }

    /// The address it listens on (127.0.0.1, or its test host's).
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    /// Starts the process without waiting for it to be healthy (see [`Node::wait_ready`]).
    pub fn spawn_only(&mut self) -> Result<()> {
        ensure!(self.child.is_none(), "node is still running");
        self.spawn_process()
    }

    /// The mirror/proxy address, `IP:P`.
    pub fn listen_addr(&self) -> String {
        format!("{}:{}", self.ip, self.listen)
    }

    /// `http://IP:P` (the mirror).
    pub fn url(&self) -> String {
        format!("http://{}", self.listen_addr())
    }

    /// The admin address, `IP:Q`.
    pub fn admin_addr(&self) -> String {
        format!("{}:{}", self.ip, self.admin)
    }

    /// The data dir.
    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    /// The control socket (`--control`).
    pub fn control_path(&self) -> PathBuf {
        self.control.clone()
    }

    /// Where the node keeps the content of blob `digest`.
    pub fn blob_file(&self, digest: &str) -> Result<PathBuf> {
        let (alg, hex) = digest.split_once(':').context("digest without algorithm")?;
        Ok(self.data_dir.join("blobs").join(alg).join(hex))
    }

    /// The node's whole log so far (lossy UTF-8; empty if it cannot be read).
    pub fn log_text(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `lines` lines of the node's log.
    pub fn log_tail(&self, lines: usize) -> String {
        crate::ctx::tail(&self.log_path, lines)
    }

    /// Replaces the extra environment the next start gets (e.g. to switch a fault on or off).
    pub fn set_env(&mut self, env: Vec<(String, String)>) {
        self.options.env = env;
    }

    /// Waits up to `timeout` for the process to exit on its own; `Some(status)` if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(Some(status));
            }
            if std::time::Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGKILL (a crash), waiting for the process to be gone.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().context("killing the node")?;
            child.wait().context("waiting for the node")?;
        }
        Ok(())
    }

    /// SIGTERM (graceful shutdown); fails if the node does not exit in time or exits non-zero.
    pub fn terminate(&mut self) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("node is not running")
        };
        let pid = child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .context("running kill")?;
        ensure!(sent.success(), "kill -TERM {pid} failed");
        let waited = poll("the node to exit after SIGTERM", SHUTDOWN_TIMEOUT, || {
            Ok(child.try_wait()?)
        });
        match waited {
            Ok(status) => {
                ensure!(status.success(), "node exited with {status} after SIGTERM");
                Ok(status)
            }
            Err(err) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(err)
            }
        }
    }

    /// Starts the (stopped) node again on the same data dir and ports.
    pub fn restart(&mut self) -> Result<()> {
        ensure!(self.child.is_none(), "node is still running");
        self.spawn()
    }

    /// `GET /metrics` on the admin port, parsed.
    pub fn metrics(&self) -> Result<Metrics> {
        let url = format!("http://{}/metrics", self.admin_addr());
        let got = http::fetch(http::client()?.get(url))?;
        ensure!(got.completed_ok(), "GET /metrics: {}", got.short());
        Ok(Metrics::parse(&got.text()))
    }

    /// `GET /api/v1/status` on the admin port.
    pub fn status(&self) -> Result<Status> {
        let url = format!("http://{}/api/v1/status", self.admin_addr());
        let got = http::fetch(http::client()?.get(url))?;
        ensure!(got.completed_ok(), "GET /api/v1/status: {}", got.short());
        serde_json::from_slice(&got.body).with_context(|| format!("status JSON: {}", got.short()))
    }

    /// `shoal status --node ADMIN --json`, parsed.
    pub fn status_cli(&self) -> Result<Status> {
        let out = Command::new(&self.bin)
            .args(["status", "--node", &self.admin_addr(), "--json"])
            .output()
            .context("running shoal status")?;
        ensure!(
            out.status.success(),
            "shoal status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).context("parsing `shoal status --json`")
    }

    fn spawn(&mut self) -> Result<()> {
        self.spawn_process()?;
        self.wait_ready()
    }

    fn spawn_process(&mut self) -> Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .context("opening the node log")?;
        // `ip netns exec` execs the program: the child is the node itself, so SIGKILL reaches it.
        let mut cmd = match &self.options.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        cmd.arg("node")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args([
                "--listen",
                &self.listen_addr(),
                "--admin",
                &self.admin_addr(),
            ])
            .arg("--control")
            .arg(self.control_path())
            .args(["--upstream", &self.options.upstream]);
        let own_quota = self.options.extra_args.iter().any(|a| a == "--store-quota");
        if !self.options.filesystem_quota && !own_quota {
            cmd.args(["--store-quota", TEST_QUOTA]);
        }
        for (host, url) in &self.options.host_upstreams {
            cmd.arg("--upstream").arg(format!("{host}={url}"));
        }
        if let Some(config) = &self.options.config {
            cmd.arg("--config").arg(config);
        }
        cmd.args(&self.options.extra_args);
        cmd.envs(self.options.env.iter().map(|(k, v)| (k, v)));
        let child = cmd
            .env(
                "RUST_LOG",
                std::env::var("SHOAL_E2E_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until the (spawned) node answers `/healthz`; fails if it exits first.
    pub fn wait_ready(&mut self) -> Result<()> {
        let client = http::client()?;
        let url = format!("http://{}/healthz", self.admin_addr());
        // A node that exited is reported at once (the inner error), not after the timeout.
        let ready = poll("the node's /healthz", READY_TIMEOUT, || {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    return Ok(Some(Err(anyhow::anyhow!(
                        "the node exited during start-up: {status}"
                    ))));
                }
            }
            let up = client.get(&url).send()?.status().as_u16() == 200;
            Ok(up.then_some(Ok(())))
        });
        ready
            .and_then(|exited| exited)
            .with_context(|| format!("node log tail:\n{}", self.log_tail(30)))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}
