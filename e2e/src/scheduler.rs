//! A `shoal scheduler` under test: spawned inside a test host's network namespace (or this
//! process's) on a fixed address, stderr captured to a log, ready when `GET /api/v1/status`
//! answers 200. Its status is read as the protocol's own [`StatusResponse`] type.
//!
//! Invariants: a restart reuses the same address and log (appended); the scheduler keeps no state
//! on disk, so a restart starts empty and learns the cluster from the nodes' announcements;
//! dropping the handle SIGKILLs the process.

use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use shoal_proto::sched::StatusResponse;

use crate::wait::poll;
use crate::{http, paths, TestCtx};

/// The port a scheduler on a test host listens on.
pub const SCHEDULER_PORT: u16 = 5060;
/// How long a scheduler may take to answer after a start.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A scheduler process (running or stopped).
#[derive(Debug)]
pub struct Scheduler {
    bin: PathBuf,
    listen: SocketAddr,
    netns: Option<String>,
    log_path: PathBuf,
    child: Option<Child>,
}

impl Scheduler {
    /// Starts a scheduler listening on `listen`, inside `netns` when given, and waits until it
    /// answers.
    pub fn start(t: &TestCtx, netns: Option<&str>, listen: SocketAddr) -> Result<Self> {
        let dir = t.subdir("scheduler")?;
        let log_path = dir.join("scheduler.log");
        t.register_log("scheduler", &log_path);
        let mut scheduler = Self {
            bin: paths::shoal_bin()?,
            listen,
            netns: netns.map(str::to_owned),
            log_path,
            child: None,
        };
        scheduler.spawn()?;
        Ok(scheduler)
    }

    /// `IP:PORT`, as nodes are given it with `--scheduler`.
    pub fn addr(&self) -> SocketAddr {
        self.listen
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
            child.kill().context("killing the scheduler")?;
            child.wait().context("waiting for the scheduler")?;
        }
        Ok(())
    }

    /// Starts the (stopped) scheduler again on the same address.
    pub fn restart(&mut self) -> Result<()> {
        ensure!(self.child.is_none(), "scheduler is still running");
        self.spawn()
    }

    /// `GET /api/v1/status`, parsed.
    pub fn status(&self) -> Result<StatusResponse> {
        let url = format!("http://{}/api/v1/status", self.listen);
        let got = http::fetch(http::client()?.get(url))?;
        ensure!(got.completed_ok(), "GET /api/v1/status: {}", got.short());
        serde_json::from_slice(&got.body)
            .with_context(|| format!("scheduler status JSON: {}", got.short()))
    }

    /// `GET /` (the HTML status page): its body.
    pub fn page(&self) -> Result<String> {
        let url = format!("http://{}/", self.listen);
        let got = http::fetch(http::client()?.get(url))?;
        ensure!(got.completed_ok(), "GET /: {}", got.short());
        Ok(got.text())
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        crate::ctx::tail(&self.log_path, lines)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .context("opening the scheduler log")?;
        // `ip netns exec` execs the program: the child is the scheduler itself.
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        let child = cmd
            .arg("scheduler")
            .arg("--listen")
            .arg(self.listen.to_string())
            .env(
                "RUST_LOG",
                std::env::var("SHOAL_E2E_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} scheduler", self.bin.display()))?;
        self.child = Some(child);
        let client = http::client()?;
        let url = format!("http://{}/api/v1/status", self.listen);
        // A scheduler that exited is reported at once (the inner error), not after the timeout.
        let ready = poll("the scheduler to answer", READY_TIMEOUT, || {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    return Ok(Some(Err(anyhow::anyhow!(
                        "the scheduler exited during start-up: {status}"
                    ))));
                }
            }
            let up = client.get(&url).send()?.status().as_u16() == 200;
            Ok(up.then_some(Ok(())))
        });
        ready
            .and_then(|exited| exited)
            .with_context(|| format!("scheduler log tail:\n{}", self.log_tail(30)))
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}
