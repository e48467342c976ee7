//! A loopback cluster: an origin registry, a `shoal scheduler` and N `shoal node`s joined to it
//! (QUIC data plane on free loopback ports, one join secret), plus `shoal prewarm` against it.
//!
//! Invariants: [`LoopbackCluster::start_with`] returns only once every node announced to the
//! scheduler; every process is killed when its handle is dropped. On loopback every node's DHT
//! binds 127.0.0.1:5053 (only the first succeeds); the scheduler is what the cluster uses.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::fixture::Image;
use crate::node::{Node, NodeOptions};
use crate::registry::Registry;
use crate::scheduler::Scheduler;
use crate::setup::IMAGE;
use crate::wait::{free_port, poll};
use crate::{paths, TestCtx};

/// Origin with the fixture, a scheduler and nodes that announced to it.
#[derive(Debug)]
pub struct LoopbackCluster {
    pub registry: Registry,
    pub image: Image,
    pub scheduler: Scheduler,
    pub nodes: Vec<Node>,
    /// The join secret every member (and the scheduler) holds.
    pub join_secret: std::path::PathBuf,
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
        let listen = format!("127.0.0.1:{}", free_port()?).parse()?;
        let secret = t.dir().join("join-secret");
        std::fs::write(&secret, "7".repeat(64))?;
        let scheduler = Scheduler::start_with_secret(t, None, listen, Some(&secret))?;
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
                scheduler.addr().to_string(),
            ];
            started.push(Node::start_with(t, opts)?);
        }
        poll(
            "every node to announce to the scheduler",
            Duration::from_secs(30),
            || Ok((scheduler.status()?.nodes.len() == nodes).then_some(())),
        )?;
        Ok(Self {
            registry,
            image,
            scheduler,
            nodes: started,
            join_secret: secret,
        })
    }

    /// `shoal prewarm ARGS --scheduler S --join-secret-file F` (the operator holds the secret).
    pub fn prewarm(&self, args: &[&str]) -> Result<Output> {
        self.prewarm_with(args, Some(&self.join_secret))
    }

    /// `shoal prewarm ARGS --scheduler S`, signed with `secret` if any.
    pub fn prewarm_with(&self, args: &[&str], secret: Option<&std::path::Path>) -> Result<Output> {
        let mut cmd = Command::new(paths::shoal_bin()?);
        cmd.arg("prewarm")
            .args(args)
            .args(["--scheduler", &self.scheduler.addr().to_string()]);
        if let Some(secret) = secret {
            cmd.arg("--join-secret-file").arg(secret);
        }
        cmd.stdin(Stdio::null())
            .output()
            .context("running shoal prewarm")
    }

    /// The fixture's reference at the origin.
    pub fn image_ref(&self) -> String {
        format!("{}/{IMAGE}", self.registry.addr())
    }
}
