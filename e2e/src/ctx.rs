//! One end-to-end test's context: its prerequisites, its temp dir and the logs to show on failure.
//!
//! Invariant: the temp dir outlives every process the test starts (they are locals of the test
//! closure, the context belongs to [`run`]), so logs can still be read after a failure. Set
//! `SHOAL_E2E_KEEP=1` to keep the dir after the test.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};

use crate::paths;

/// Something a test needs from the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Running as root (containerd, FUSE, …).
    Root,
    /// A program on `PATH`.
    Bin(&'static str),
    /// The `shoal` binary. Missing means the test fails (the test command builds it), not skips.
    Shoal,
    /// `/dev/fuse`, openable (lazy mounts).
    Fuse,
}

/// Context handed to a test body.
#[derive(Debug)]
pub struct TestCtx {
    name: String,
    dir: tempfile::TempDir,
    logs: Mutex<Vec<(String, PathBuf)>>,
}

/// Runs one end-to-end test: skips it (printing `SKIP name: why`) when a need is missing, otherwise
/// runs `body` and, if it fails, prints the tails of the registered logs and panics with the error.
pub fn run(name: &str, needs: &[Need], body: impl FnOnce(&TestCtx) -> Result<()>) {
    if let Some(why) = missing(needs) {
        skip(name, &why);
        return;
    }
    let ctx = match TestCtx::new(name, needs) {
        Ok(ctx) => ctx,
        Err(err) => panic!("{name}: setup failed: {err:#}"),
    };
    let outcome = body(&ctx);
    // Whatever the test left mounted in its directory (an EROFS mount's blob
    // filesystem outlives a killed node) goes, passed or failed.
    detach_mounts_under(ctx.dir.path());
    if let Err(err) = outcome {
        // The error first: a long log dump must not push it out of a truncated CI excerpt.
        eprintln!("{name} failed: {err:#}");
        ctx.dump_logs();
        let kept = ctx.keep();
        panic!("{name} failed: {err:#}\n(test dir {kept})");
    }
    if std::env::var_os("SHOAL_E2E_KEEP").is_some() {
        let kept = ctx.keep();
        eprintln!("{name}: kept {kept}");
    }
}

/// Reports that test `name` cannot run here because of `why`: prints `SKIP name: why` and returns,
/// or, when the `CI` environment variable is set (CI has root, FUSE, EROFS and netns), fails the
/// test with the reason, so a missing prerequisite can never turn a suite green by vanishing.
pub fn skip(name: &str, why: &str) {
    if in_ci() {
        panic!("{name}: prerequisite missing under CI: {why}");
    }
    eprintln!("SKIP {name}: {why}");
}

/// Whether this run is CI's (`CI` set to anything but empty, `0` or `false`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// Lazily unmounts every mount point under `root`, deepest first.
pub fn detach_mounts_under(root: &std::path::Path) {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut points: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(root))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    for p in points {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&p)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

impl TestCtx {
    /// A context outside [`run`] (for the benchmark runner); logs are registered but not printed.
    pub fn standalone(name: &str) -> Result<Self> {
        Self::new(name, &[Need::Shoal])
    }

    fn new(name: &str, needs: &[Need]) -> Result<Self> {
        if needs.contains(&Need::Shoal) {
            paths::shoal_bin()?;
        }
        let dir = tempfile::Builder::new()
            .prefix(&format!("shoal-e2e-{name}-"))
            .tempdir()
            .context("creating the test's temp dir")?;
        Ok(Self {
            name: name.to_owned(),
            dir,
            logs: Mutex::new(Vec::new()),
        })
    }

    /// The test's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A fresh subdirectory of the test's temp dir (`label`, `label-1`, … when taken).
    pub fn subdir(&self, label: &str) -> Result<PathBuf> {
        let mut path = self.dir.path().join(label);
        let mut n = 1;
        while path.exists() {
            path = self.dir.path().join(format!("{label}-{n}"));
            n += 1;
        }
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(path)
    }

    /// The test's temp dir.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Registers a log whose tail is printed if the test fails.
    pub fn register_log(&self, label: &str, path: &Path) {
        if let Ok(mut logs) = self.logs.lock() {
            logs.push((label.to_owned(), path.to_owned()));
        }
    }

    fn dump_logs(&self) {
        let Ok(logs) = self.logs.lock() else { return };
        for (label, path) in logs.iter() {
            eprintln!(
                "----- {} ({}): last lines of {} -----",
                self.name,
                label,
                path.display()
            );
            eprintln!("{}", tail(path, 60));
        }
    }

    /// Keeps the temp dir on disk (for whoever reads a failure) and returns its path.
    fn keep(self) -> String {
        self.dir.keep().display().to_string()
    }
}

/// The last `lines` lines of a text file (lossy UTF-8), or a note why it could not be read.
pub fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(err) => format!("(cannot read: {err})"),
    }
}

fn missing(needs: &[Need]) -> Option<String> {
    for need in needs {
        match need {
            Need::Root if !is_root() => return Some("needs root".to_owned()),
            Need::Bin(bin) if paths::which(bin).is_none() => {
                return Some(format!("needs `{bin}` on PATH"))
            }
            Need::Fuse => {
                let opened = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/fuse");
                if let Err(e) = opened {
                    return Some(format!("cannot open /dev/fuse: {e}"));
                }
            }
            _ => {}
        }
    }
    None
}

/// Whether this process runs with effective uid 0 (read from `/proc/self/status`).
pub fn is_root() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        == Some("0")
}
