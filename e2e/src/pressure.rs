//! The disk-pressure engine (issue 12, R6), shared by the `pressure-bench` runner and the smoke
//! test (`tests/disk_pressure.rs`): a node with a byte quota serves two live lazy mounts of the
//! debian-python Nydus image (one FUSE, one EROFS) while readers read every file of both, over and
//! over, page cache dropped after each file, and a client pulls random blobs through the mirror
//! totalling `pull_factor` × the quota. Sampled every 50 ms: the store's bytes on disk (the
//! `blobs/` tree, allocated blocks) and the node's whole data dir. Counted: evictions (the node's
//! metric), mount read errors (an I/O error or bytes differing from the first pass), pull errors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use sha2::{Digest as _, Sha256};

use crate::http;
use crate::lazy::{self, Mode};
use crate::node::{Node, NodeOptions};
use crate::nydus::{self, NydusImage};
use crate::random::pseudo_random;
use crate::registry::Registry;
use crate::{paths, TestCtx};

const IMAGE_REPO: &str = "pressure/python";
const BLOB_REPO: &str = "pressure/blobs";

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub quota_mib: u64,
    /// Pulls total this many times the quota.
    pub pull_factor: u64,
    pub blob_mib: u64,
}

/// What a run measured.
#[derive(Debug, Default)]
pub struct Outcome {
    pub quota_bytes: u64,
    pub pulled_bytes: u64,
    /// Highest allocated bytes under the store's `blobs/` tree.
    pub peak_store_bytes: u64,
    /// Highest allocated bytes of the whole data dir (store, metadata, mounts' decoded chunks).
    pub peak_data_dir_bytes: u64,
    /// Highest allocated bytes of each entry of the data dir (and of each `mount-chunks/` entry).
    pub peak_by_entry: Vec<(String, u64)>,
    pub evictions: f64,
    pub mount_reads: u64,
    pub mount_read_errors: Vec<String>,
    pub pull_errors: Vec<String>,
    /// Full passes over both mounts' files while the pulls ran.
    pub passes: u64,
    /// The node's piece size for the pulled blobs (the goal allows one piece over the quota).
    pub piece_bytes: u64,
}

/// Allocated bytes under `dir` (what `du` counts).
pub fn allocated(dir: &Path) -> u64 {
    shoal_node::store::allocated_bytes(dir)
}

/// Every regular file under `root`, relative paths sorted.
fn files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// Reads `path` whole, hashes it, and drops its page cache (so the next pass asks the mount).
fn read_hashed(path: &Path) -> std::io::Result<[u8; 32]> {
    let data = std::fs::read(path)?;
    if let Ok(f) = std::fs::File::open(path) {
        let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed);
    }
    Ok(Sha256::digest(&data).into())
}

/// Runs `plan`: needs root, FUSE and EROFS (the caller checks).
pub fn run(t: &TestCtx, plan: &Plan) -> Result<Outcome> {
    let registry = Registry::start(t)?;
    let work = t.subdir("nydus-build")?;
    let image: NydusImage = nydus::build_and_push(
        &registry,
        &paths::debian_python_layout(),
        "python",
        IMAGE_REPO,
        "1",
        &work,
    )?;
    let quota = plan.quota_mib << 20;
    ensure!(
        image.data_bytes() < quota / 2,
        "the quota ({} MiB) must hold the image ({} bytes) twice over",
        plan.quota_mib,
        image.data_bytes()
    );
    let blob_size = (plan.blob_mib << 20) as usize;
    let count = (plan.pull_factor * quota).div_ceil(blob_size as u64);
    let blobs: Vec<String> = (0..count)
        .map(|i| registry.push_blob(BLOB_REPO, pseudo_random(blob_size, 0xd15c + i)))
        .collect::<Result<_>>()?;

    let mut options = NodeOptions::upstream(&registry.url());
    options.filesystem_quota = true;
    options.extra_args = vec!["--store-quota".into(), format!("{}MiB", plan.quota_mib)];
    let node = Node::start_with(t, options)?;
    let reference = format!("{}/{IMAGE_REPO}:1", registry.addr());
    let mut mounts = Vec::new();
    for mode in [Mode::Fuse, Mode::Erofs] {
        let dir = t.subdir(&format!("mnt-{}", mode.arg()))?;
        lazy::mount(&node, &reference, &dir, &["--mode", mode.arg()])?;
        mounts.push(dir);
    }
    let _guards: Vec<lazy::Unmount> = mounts.iter().cloned().map(lazy::Unmount).collect();

    // The first pass, before any pressure: what every later read must equal.
    let mut expected: HashMap<PathBuf, [u8; 32]> = HashMap::new();
    for root in &mounts {
        for f in files(root) {
            let h = read_hashed(&f).with_context(|| format!("first read of {}", f.display()))?;
            expected.insert(f, h);
        }
    }
    ensure!(
        expected.len() > 1000,
        "the mounts list only {} files",
        expected.len()
    );
    let expected = Arc::new(expected);

    let data_dir = node.data_dir().to_path_buf();
    let stop = Arc::new(AtomicBool::new(false));
    let peak_store = Arc::new(AtomicU64::new(0));
    let peak_all = Arc::new(AtomicU64::new(0));
    let by_entry = Arc::new(Mutex::new(HashMap::<String, u64>::new()));
    let sampler = {
        let (stop, peak_store, peak_all, data_dir, by_entry) = (
            stop.clone(),
            peak_store.clone(),
            peak_all.clone(),
            data_dir.clone(),
            by_entry.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak_store.fetch_max(allocated(&data_dir.join("blobs")), Ordering::Relaxed);
                peak_all.fetch_max(allocated(&data_dir), Ordering::Relaxed);
                let mut entries: Vec<PathBuf> = Vec::new();
                for dir in [data_dir.clone(), data_dir.join("mount-chunks")] {
                    if let Ok(rd) = std::fs::read_dir(&dir) {
                        entries.extend(rd.flatten().map(|e| e.path()));
                    }
                }
                let mut peaks = by_entry.lock().unwrap_or_else(|e| e.into_inner());
                for e in entries {
                    let name = e
                        .strip_prefix(&data_dir)
                        .map_or_else(|_| e.display().to_string(), |p| p.display().to_string());
                    let n = allocated(&e);
                    let peak = peaks.entry(name).or_insert(0);
                    *peak = (*peak).max(n);
                }
                drop(peaks);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let read_errors = Arc::new(Mutex::new(Vec::new()));
    let reads = Arc::new(AtomicU64::new(0));
    let passes = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = mounts
        .iter()
        .map(|root| {
            let (stop, expected, errors, reads, passes) = (
                stop.clone(),
                expected.clone(),
                read_errors.clone(),
                reads.clone(),
                passes.clone(),
            );
            let list = files(root);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for f in &list {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let got = read_hashed(f);
                        reads.fetch_add(1, Ordering::Relaxed);
                        let bad = match got {
                            Ok(h) if Some(&h) == expected.get(f) => None,
                            Ok(_) => {
                                Some(format!("{}: bytes differ from the first read", f.display()))
                            }
                            Err(e) => Some(format!("{}: {e}", f.display())),
                        };
                        if let Some(bad) = bad {
                            errors.lock().unwrap_or_else(|e| e.into_inner()).push(bad);
                        }
                    }
                    passes.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    let mut pull_errors = Vec::new();
    let mut pulled = 0u64;
    let client = http::client()?;
    for digest in &blobs {
        let url = format!("{}/v2/{BLOB_REPO}/blobs/{digest}", node.url());
        match http::fetch_hashed(client.get(url)) {
            Ok(f) if f.status.as_u16() == 200 && f.digest == *digest => pulled += f.len,
            Ok(f) => pull_errors.push(format!("{digest}: {f:?}")),
            Err(e) => pull_errors.push(format!("{digest}: {e:#}")),
        }
    }
    // Let the readers finish a pass under the full store as well.
    let passes_then = passes.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(120);
    while passes.load(Ordering::Relaxed) < passes_then + 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        let _ = r.join();
    }
    let _ = sampler.join();
    let metrics = node.metrics()?;
    let evictions = metrics.sum("shoal_store_evictions_total", &[]);
    for dir in &mounts {
        lazy::umount(&node, dir)?;
    }
    let mut peak_by_entry: Vec<(String, u64)> = by_entry
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    peak_by_entry.sort();
    let mount_read_errors =
        std::mem::take(&mut *read_errors.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(Outcome {
        quota_bytes: quota,
        pulled_bytes: pulled,
        peak_store_bytes: peak_store.load(Ordering::Relaxed),
        peak_data_dir_bytes: peak_all.load(Ordering::Relaxed),
        peak_by_entry,
        evictions,
        mount_reads: reads.load(Ordering::Relaxed),
        mount_read_errors,
        pull_errors,
        passes: passes.load(Ordering::Relaxed),
        piece_bytes: shoal_node::store::piece_size(blob_size as u64),
    })
}
