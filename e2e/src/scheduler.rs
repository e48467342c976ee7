//! A `shoal scheduler` under test: spawned inside a test host's network namespace (or this
//! process's) on a fixed address, with or without a join secret, stderr captured to a log, ready
//! when `GET /healthz` answers 200. Its status is read as the protocol's own [`StatusResponse`]
//! type, with signed requests when it has a secret (it shows nothing to unsigned ones).
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
    /// `--join-secret-file`, and the request key derived from it.
    secret: Option<(PathBuf, [u8; 32])>,
    child: Option<Child>,
}

impl Scheduler {
    /// Starts a scheduler listening on `listen`, inside `netns` when given, and waits until it
    /// answers.
    pub fn start(t: &TestCtx, netns: Option<&str>, listen: SocketAddr) -> Result<Self> {
        Self::start_with_secret(t, netns, listen, None)
    }

    /// [`Scheduler::start`] with `--join-secret-file secret` when given.
    pub fn start_with_secret(
        t: &TestCtx,
        netns: Option<&str>,
        listen: SocketAddr,
        secret: Option<&std::path::Path>,
    ) -> Result<Self> {
        let dir = t.subdir("scheduler")?;
        let log_path = dir.join("scheduler.log");
        t.register_log("scheduler", &log_path);
        let secret = match secret {
            Some(p) => {
                let contents =
                    std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
                let raw = shoal_proto::auth::parse_secret(&contents)?;
                let key = shoal_proto::auth::derive_key(&raw, shoal_proto::auth::SCHEDULER_LABEL);
                Some((p.to_owned(), key))
            }
            None => None,
        };
        let mut scheduler = Self {
            bin: paths::shoal_bin()?,
            listen,
            netns: netns.map(str::to_owned),
            log_path,
            secret,
            child: None,
        };
        scheduler.spawn()?;
        Ok(scheduler)
    }

    /// `IP:PORT`, as nodes are given it with `--scheduler`.
    pub fn addr(&self) -> SocketAddr {
        self.listen
    }

    /// The running scheduler's process id.
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

    /// `GET /api/v1/status`, parsed (signed when the scheduler has a secret).
    pub fn status(&self) -> Result<StatusResponse> {
        let got = http::fetch(self.get("/api/v1/status")?)?;
        ensure!(got.completed_ok(), "GET /api/v1/status: {}", got.short());
        serde_json::from_slice(&got.body)
            .with_context(|| format!("scheduler status JSON: {}", got.short()))
    }

    /// `GET /` (the HTML status page): its body.
    pub fn page(&self) -> Result<String> {
        let got = http::fetch(self.get("/")?)?;
        ensure!(got.completed_ok(), "GET /: {}", got.short());
        Ok(got.text())
    }

    /// A `GET` of `path`, signed with the join secret when the scheduler has one.
    pub fn get(&self, path: &str) -> Result<reqwest::blocking::RequestBuilder> {
        let host = self.listen.to_string();
        let mut req = http::client()?.get(format!("http://{host}{path}"));
        if let Some((_, key)) = &self.secret {
            req = req
                .header(
                    shoal_proto::auth::AUTH_HEADER,
                    sign(key, "GET", &host, path, b""),
                )
                .header("host", host.clone());
        }
        Ok(req)
    }

    /// The `X-Shoal-Auth` value for a request to this scheduler (None without a secret).
    pub fn sign(&self, method: &str, path: &str, body: &[u8]) -> Option<String> {
        let (_, key) = self.secret.as_ref()?;
        Some(sign(key, method, &self.listen.to_string(), path, body))
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
        cmd.arg("scheduler")
            .arg("--listen")
            .arg(self.listen.to_string());
        if let Some((path, _)) = &self.secret {
            cmd.arg("--join-secret-file").arg(path);
        }
        let child = cmd
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
        let url = format!("http://{}/healthz", self.listen);
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

fn sign(key: &[u8; 32], method: &str, host: &str, path: &str, body: &[u8]) -> String {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let signed = shoal_proto::auth::Signed {
        method,
        host,
        path,
        body,
    };
    shoal_proto::auth::sign(key, &signed, now_ms)
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}
