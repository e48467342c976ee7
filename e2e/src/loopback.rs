//! A loopback cluster: an origin registry, a `shoal scheduler` and N `shoal node`s joined to it
//! (QUIC data plane on free loopback ports, one join secret), plus `shoal prewarm` against it.
//!
//! Invariants: [`LoopbackCluster::start_with`] returns only once every node announced to the
//! scheduler; every process is killed when its handle is dropped. On loopback every node's DHT
//! binds 127.0.0.1:5053 (only the first succeeds); the scheduler is what the cluster uses.

use std::fs::OpenOptions;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use crate::fixture::Image;
use crate::node::{Node, NodeOptions};
use crate::registry::Registry;
use crate::setup::IMAGE;
use crate::wait::{free_port, poll};
use crate::{http, paths, TestCtx};

/// A `shoal scheduler` process on a free loopback port; killed on drop.
#[derive(Debug)]
pub struct Scheduler {
    pub addr: String,
    child: Child,
}

impl Scheduler {
    pub fn start(t: &TestCtx) -> Result<Self> {
        let dir = t.subdir("scheduler")?;
        let log_path = dir.join("scheduler.log");
        t.register_log("scheduler", &log_path);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let addr = format!("127.0.0.1:{}", free_port()?);
        let child = Command::new(paths::shoal_bin()?)
            .args(["scheduler", "--listen", &addr])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting shoal scheduler")?;
        let s = Self { addr, child };
        poll("the scheduler to answer", Duration::from_secs(30), || {
            Ok(s.status().ok())
        })?;
        Ok(s)
    }

    /// `GET /api/v1/status`.
    pub fn status(&self) -> Result<serde_json::Value> {
        let got = http::fetch(http::client()?.get(format!("http://{}/api/v1/status", self.addr)))?;
        ensure!(got.completed_ok(), "GET /api/v1/status: {}", got.short());
        Ok(serde_json::from_slice(&got.body)?)
    }

    pub fn live_nodes(&self) -> Result<usize> {
        Ok(self.status()?["nodes"].as_array().map_or(0, Vec::len))
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Origin with the fixture, a scheduler and nodes that announced to it.
#[derive(Debug)]
pub struct LoopbackCluster {
    pub registry: Registry,
    pub image: Image,
    pub scheduler: Scheduler,
    pub nodes: Vec<Node>,
}

impl LoopbackCluster {
    /// `nodes` nodes in front of `registry` (holding `image` as [`IMAGE`]); `extra_hosts` are
    /// more `--upstream HOST=URL`s for every node.
    pub fn start_with(
        t: &TestCtx,
        registry: Registry,
        image: Image,
        nodes: usize,
        extra_hosts: &[(String, String)],
    ) -> Result<Self> {
        let scheduler = Scheduler::start(t)?;
        let secret = t.dir().join("join-secret");
        std::fs::write(&secret, "7".repeat(64))?;
        let mut started = Vec::new();
        for _ in 0..nodes {
            let mut opts = NodeOptions::upstream(&registry.url());
            opts.host_upstreams = extra_hosts.to_vec();
            opts.extra_args = vec![
                "--p2p".into(),
                format!("127.0.0.1:{}", free_port()?),
                "--join-secret-file".into(),
                secret.display().to_string(),
                "--scheduler".into(),
                scheduler.addr.clone(),
            ];
            started.push(Node::start_with(t, opts)?);
        }
        poll(
            "every node to announce to the scheduler",
            Duration::from_secs(30),
            || Ok((scheduler.live_nodes()? == nodes).then_some(())),
        )?;
        Ok(Self {
            registry,
            image,
            scheduler,
            nodes: started,
        })
    }

    /// `shoal prewarm ARGS --scheduler S`.
    pub fn prewarm(&self, args: &[&str]) -> Result<Output> {
        Command::new(paths::shoal_bin()?)
            .arg("prewarm")
            .args(args)
            .args(["--scheduler", &self.scheduler.addr])
            .stdin(Stdio::null())
            .output()
            .context("running shoal prewarm")
    }

    /// The fixture's reference at the origin.
    pub fn image_ref(&self) -> String {
        format!("{}/{IMAGE}", self.registry.addr())
    }
}
