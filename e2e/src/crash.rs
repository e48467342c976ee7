//! The crash-point engine (issue 12, R5), shared by the `crash-bench` runner (≥ 100 points) and
//! the smoke test (`tests/crash.rs`). One case: a node with a fresh data dir pulls the blobs it
//! should already hold, restarts with `SHOAL_FAULT_CRASH_AT=<point>:<n>` (see `shoal_node::faults`),
//! pulls more until that point SIGKILLs it, then restarts clean and is checked:
//!
//! - **at rest**: every blob the node reports complete hashes to its digest on disk;
//! - **served**: every blob, read whole through the mirror, hashes to its digest (the node may go
//!   back to the origin for what it lost, never serve a wrong byte);
//! - **lost**: blobs complete before the crash that the node no longer holds (none may be, where
//!   the quota leaves room for everything: [`Scenario::Download`]);
//! - the time the restart took (start to healthy, recovery included).
//!
//! Three scenarios: [`Scenario::Download`] (room for everything: commits and completion),
//! [`Scenario::Eviction`] (a quota that makes the crash phase evict: the drop points) and
//! [`Scenario::Peer`] (a transfer between two nodes over QUIC, either side killed).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sha2::{Digest as _, Sha256};

use crate::http;
use crate::node::{Node, NodeOptions};
use crate::random::pseudo_random;
use crate::registry::Registry;
use crate::scheduler::Scheduler;
use crate::wait::{free_port, poll};
use crate::TestCtx;

const REPO: &str = "crash/blobs";
/// Each blob's size: two pieces and a bit, so a pull commits several times.
pub const BLOB_SIZE: usize = 9 << 20;
/// The quota of the eviction scenario: two blobs fit, the third evicts (high watermark 0.9).
const EVICTION_QUOTA: &str = "24MiB";

/// Which blobs are held before the crash phase, which are pulled in it, and the quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Holds blob 0; the crash phase pulls blob 1. Default test quota (room for all).
    Download,
    /// Holds blobs 0 and 1 under a 24 MiB quota; the crash phase pulls blob 2, which evicts.
    Eviction,
    /// Two nodes and a scheduler: node A holds blob 0, node B pulls it from A over QUIC. The
    /// crash point is A's (`p2p.serve.*`: the sender dies mid-transfer) or B's (`write:*`: the
    /// receiver dies); both nodes are checked after.
    Peer,
}

impl Scenario {
    fn before(self) -> &'static [usize] {
        match self {
            Scenario::Download => &[0],
            Scenario::Eviction => &[0, 1],
            Scenario::Peer => &[],
        }
    }

    fn crash_phase(self) -> &'static [usize] {
        match self {
            Scenario::Download => &[1],
            Scenario::Eviction => &[2],
            Scenario::Peer => &[0],
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Scenario::Download => "download",
            Scenario::Eviction => "eviction",
            Scenario::Peer => "peer transfer",
        }
    }
}

/// One crash: where, and in which scenario.
#[derive(Debug, Clone)]
pub struct Case {
    pub scenario: Scenario,
    /// `SHOAL_FAULT_CRASH_AT`'s value: `<point>:<n>`, or `write:<byte offset>`.
    pub spec: String,
}

/// What one case showed.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub case: Case,
    /// Whether the node died at the point (a point not reached is not a crash tried).
    pub crashed: bool,
    /// Blobs whose bytes on disk (complete) do not hash to their digest.
    pub bad_at_rest: Vec<String>,
    /// Blobs the mirror served with a wrong byte, or failed to serve.
    pub bad_served: Vec<String>,
    /// Blobs complete before the crash that are gone after it (download scenario only).
    pub lost: Vec<String>,
    pub restart: Duration,
}

/// The origin and its blobs, and a scheduler for the peer cases, shared by every case.
#[derive(Debug)]
pub struct Origin {
    pub registry: Registry,
    /// Digests of the blobs, in pull order.
    pub blobs: Vec<String>,
    pub scheduler: Scheduler,
    pub join_secret: PathBuf,
}

impl Origin {
    pub fn start(t: &TestCtx) -> Result<Self> {
        let registry = Registry::start(t)?;
        let blobs = (0..3)
            .map(|i| registry.push_blob(REPO, pseudo_random(BLOB_SIZE, 0xc4a5 + i)))
            .collect::<Result<Vec<_>>>()?;
        let join_secret = t.dir().join("join-secret");
        std::fs::write(&join_secret, "5".repeat(64))?;
        let listen = format!("127.0.0.1:{}", free_port()?).parse()?;
        let scheduler = Scheduler::start_with_secret(t, None, listen, Some(&join_secret))?;
        Ok(Self {
            registry,
            blobs,
            scheduler,
            join_secret,
        })
    }

    /// Options of a cluster member (QUIC on a free port, the scheduler, the join secret).
    fn member(&self, label: String) -> Result<NodeOptions> {
        let mut options = NodeOptions::upstream(&self.registry.url());
        options.label = label;
        options.extra_args = vec![
            "--p2p".into(),
            format!("127.0.0.1:{}", free_port()?),
            "--join-secret-file".into(),
            self.join_secret.display().to_string(),
            "--scheduler".into(),
            self.scheduler.addr().to_string(),
        ];
        Ok(options)
    }

    /// Waits until the scheduler counts `holders` complete holders of `digest`.
    fn wait_holders(&self, digest: &str, holders: u32) -> Result<()> {
        poll(
            "the scheduler to see the blob's holder",
            Duration::from_secs(30),
            || {
                Ok(self
                    .scheduler
                    .status()?
                    .blobs
                    .iter()
                    .any(|b| b.blob.to_string() == digest && b.complete_holders >= holders)
                    .then_some(()))
            },
        )
    }
}

/// Runs `case` with a node (or, for [`Scenario::Peer`], two) of its own (label `label`, fresh
/// data dirs).
pub fn run_case(t: &TestCtx, origin: &Origin, case: &Case, label: &str) -> Result<CaseResult> {
    if case.scenario == Scenario::Peer {
        return run_peer_case(t, origin, case, label);
    }
    let mut options = NodeOptions::upstream(&origin.registry.url());
    options.label = label.to_owned();
    if case.scenario == Scenario::Eviction {
        options.filesystem_quota = true;
        options.extra_args = vec!["--store-quota".into(), EVICTION_QUOTA.into()];
    }
    let mut node = Node::start_with(t, options)?;
    for &i in case.scenario.before() {
        pull(&node, &origin.blobs[i])
            .with_context(|| format!("{label}: pulling blob {i} before the crash"))?;
    }
    let held_before = complete_blobs(&node)?;
    node.terminate()?;

    node.set_env(vec![("SHOAL_FAULT_CRASH_AT".into(), case.spec.clone())]);
    let mut crashed = node.restart().is_err() && !node.is_running();
    if !crashed {
        for &i in case.scenario.crash_phase() {
            // The pull fails when the node dies under it; what counts is whether it died.
            let _ = pull(&node, &origin.blobs[i]);
        }
        crashed = node.wait_exit(Duration::from_secs(10))?.is_some();
    }
    if !crashed {
        node.terminate()?;
    }

    node.set_env(Vec::new());
    let started = Instant::now();
    node.restart()
        .with_context(|| format!("{label}: restarting after {}", case.spec))?;
    let restart = started.elapsed();

    let (bad_at_rest, bad_served) = check(&node, origin)?;
    let lost = if case.scenario == Scenario::Download {
        let after = complete_blobs(&node)?;
        held_before
            .into_iter()
            .filter(|d| !after.contains(d))
            .collect()
    } else {
        Vec::new()
    };
    node.terminate()?;
    Ok(CaseResult {
        case: case.clone(),
        crashed,
        bad_at_rest,
        bad_served,
        lost,
        restart,
    })
}

/// A peer case: A pulls blob 0 from the origin; the crashing side restarts with the fault; B
/// pulls blob 0 (from A); whoever died restarts clean; both are checked.
fn run_peer_case(t: &TestCtx, origin: &Origin, case: &Case, label: &str) -> Result<CaseResult> {
    let digest = &origin.blobs[0];
    let mut a = Node::start_with(t, origin.member(format!("{label}-a"))?)?;
    let mut b = Node::start_with(t, origin.member(format!("{label}-b"))?)?;
    pull(&a, digest).with_context(|| format!("{label}: A pulling the blob"))?;
    origin.wait_holders(digest, 1)?;
    let sender_dies = case.spec.starts_with("p2p.");
    let victim = if sender_dies { &mut a } else { &mut b };
    victim.terminate()?;
    victim.set_env(vec![("SHOAL_FAULT_CRASH_AT".into(), case.spec.clone())]);
    victim.restart()?;
    if sender_dies {
        // A re-announces after its restart before B asks for parents.
        origin.wait_holders(digest, 1)?;
    }
    let _ = pull(&b, digest);
    let victim = if sender_dies { &mut a } else { &mut b };
    let crashed = victim.wait_exit(Duration::from_secs(10))?.is_some();
    if !crashed {
        victim.terminate()?;
    }
    victim.set_env(Vec::new());
    let started = Instant::now();
    victim
        .restart()
        .with_context(|| format!("{label}: restarting after {}", case.spec))?;
    let restart = started.elapsed();
    let (mut bad_at_rest, mut bad_served) = check(&b, origin)?;
    let (a_rest, a_served) = check(&a, origin)?;
    bad_at_rest.extend(a_rest);
    bad_served.extend(a_served);
    // A held the blob complete before the crash: it must still.
    let lost = if complete_blobs(&a)?.contains(digest) {
        Vec::new()
    } else {
        vec![format!("A lost {digest}")]
    };
    a.terminate()?;
    b.terminate()?;
    Ok(CaseResult {
        case: case.clone(),
        crashed,
        bad_at_rest,
        bad_served,
        lost,
        restart,
    })
}

/// Every complete blob on disk against its digest (the corrupt ones), then every blob of the
/// origin read whole through the mirror (the ones served wrong or not at all).
fn check(node: &Node, origin: &Origin) -> Result<(Vec<String>, Vec<String>)> {
    let bad_at_rest = corrupt_at_rest(node)?;
    let mut bad_served = Vec::new();
    for digest in &origin.blobs {
        if let Err(e) = pull(node, digest) {
            bad_served.push(format!("{digest}: {e:#}"));
        }
    }
    Ok((bad_at_rest, bad_served))
}

/// The blobs `node` reports complete whose file does not hash to their digest.
pub fn corrupt_at_rest(node: &Node) -> Result<Vec<String>> {
    let mut bad = Vec::new();
    for digest in complete_blobs(node)? {
        let file = node.blob_file(&digest)?;
        let mut hasher = Sha256::new();
        std::io::copy(&mut std::fs::File::open(&file)?, &mut hasher)
            .with_context(|| format!("reading {}", file.display()))?;
        if format!("sha256:{}", hex::encode(hasher.finalize())) != digest {
            bad.push(digest);
        }
    }
    Ok(bad)
}

/// GETs `digest` through the node's mirror and checks every byte against the digest.
fn pull(node: &Node, digest: &str) -> Result<()> {
    let url = format!("{}/v2/{REPO}/blobs/{digest}", node.url());
    let got = http::fetch_hashed(http::client()?.get(url))?;
    anyhow::ensure!(
        got.status.as_u16() == 200 && got.digest == digest && got.len == BLOB_SIZE as u64,
        "served {} bytes hashing to {} ({})",
        got.len,
        got.digest,
        got.status
    );
    Ok(())
}

fn complete_blobs(node: &Node) -> Result<Vec<String>> {
    Ok(node
        .status()?
        .blobs
        .into_iter()
        .filter(|b| b.complete)
        .map(|b| b.digest)
        .collect())
}

/// The runner's cases: byte offsets spread over a download (every `step` bytes), every store
/// crash point at its first `hits` hits, and the drop points under eviction.
pub fn cases(step: usize, hits: u64) -> Vec<Case> {
    let mut out = Vec::new();
    let mut offset = step;
    while offset < BLOB_SIZE {
        for scenario in [Scenario::Download, Scenario::Eviction] {
            out.push(Case {
                scenario,
                spec: format!("write:{offset}"),
            });
        }
        offset += step;
    }
    for point in [
        "commit.before_sync",
        "commit.before_record",
        "commit.after_record",
    ] {
        for n in 1..=hits {
            out.push(Case {
                scenario: Scenario::Download,
                spec: format!("{point}:{n}"),
            });
        }
    }
    for point in ["complete.before_record", "complete.after_record"] {
        out.push(Case {
            scenario: Scenario::Download,
            spec: format!("{point}:1"),
        });
    }
    for point in ["drop.after_record", "drop.after_file"] {
        out.push(Case {
            scenario: Scenario::Eviction,
            spec: format!("{point}:1"),
        });
    }
    // A peer transfer: the sender dies at its n-th body write, the receiver at byte offsets.
    for n in 1..=hits {
        out.push(Case {
            scenario: Scenario::Peer,
            spec: format!("p2p.serve.mid_body:{n}"),
        });
    }
    let mut offset = step * 3 / 2;
    while offset < BLOB_SIZE {
        out.push(Case {
            scenario: Scenario::Peer,
            spec: format!("write:{offset}"),
        });
        offset += step * 4;
    }
    out
}
