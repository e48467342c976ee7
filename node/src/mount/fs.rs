//! The filesystem of a live mount in either mode: [`Mounted`] is a FUSE mount of the image at the
//! directory, or a kernel EROFS mount at the directory whose decoded blob files a FUSE blob
//! filesystem serves from `<data dir>/erofs/<key of the directory>`.
//!
//! Invariants: both read through the mount's chunk backend; mounting and unmounting block (call
//! them from a blocking task); a stale mount a dead node left at either place is cleared first.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use shoal_rafs::erofs::{self, ErofsMount, ErofsOptions};
use shoal_rafs::fuse::{self, FuseMount, FuseOptions, FuseStats};
use shoal_rafs::Bootstrap;

use super::chunks::ChunkBackend;
use super::table::{self, MountMode};
use super::MountError;

/// Clear stale mounts at `dir` (and, for EROFS, at its blob directory), then mount.
pub fn mount(
    mode: MountMode,
    data_dir: &Path,
    boot: Arc<Bootstrap>,
    source: Arc<ChunkBackend>,
    dir: &Path,
    decoded_max_bytes: u64,
) -> Result<Mounted, MountError> {
    let root = erofs_root(data_dir);
    let blobs_dir = blobs_dir(data_dir, dir);
    table::clear_stale(dir, &root);
    table::clear_stale(&blobs_dir, &root);
    let decoded = decoded_dir(data_dir, dir);
    Mounted::new(
        mode,
        boot,
        source,
        dir,
        &blobs_dir,
        &decoded,
        decoded_max_bytes,
    )
}

/// The most a FUSE mount keeps decoded: 1 GiB, and at most a quarter of a byte quota (the
/// decoded files count against it, see `Store::charge_dirs`).
pub fn decoded_budget(byte_quota: u64) -> u64 {
    let cap = 1 << 30;
    if byte_quota == 0 {
        cap
    } else {
        cap.min(byte_quota / 4)
    }
}

/// Where a FUSE mount at `dir` keeps its decoded chunks: beside the mounts' private chunk
/// caches, so a node start clears what a dead node left.
fn decoded_dir(data_dir: &Path, dir: &Path) -> PathBuf {
    data_dir
        .join(super::private::DIR)
        .join(format!("decoded-{}", dir_key(dir)))
}

/// Adopt the image server already holding `dir`, or clear what a dead one left and start one
/// serving `bootstrap` there.
pub fn mount_remote(
    mode: MountMode,
    data_dir: &Path,
    bootstrap: &Path,
    dir: &Path,
    socket: &Path,
) -> Result<Mounted, MountError> {
    let state = data_dir.join("servers").join(dir_key(dir));
    if let Some(p) = super::remote::ServerProcess::adopt(dir, &state) {
        if table::is_shoal_mount(dir, &erofs_root(data_dir)) {
            tracing::info!(dir = %dir.display(), "adopted the image server still holding the mount");
            return Ok(Mounted::Remote(p));
        }
        let _ = p.stop();
    }
    let root = erofs_root(data_dir);
    let blobs_dir = blobs_dir(data_dir, dir);
    table::clear_stale(dir, &root);
    table::clear_stale(&blobs_dir, &root);
    let p = super::remote::ServerProcess::start(&super::remote::Start {
        bootstrap,
        dir,
        mode,
        blobs_dir: &blobs_dir,
        socket,
        state: &state,
    })?;
    Ok(Mounted::Remote(p))
}

/// Where EROFS mounts keep their blob filesystems: `<data dir>/erofs/<key of the mount point>`.
pub fn erofs_root(data_dir: &Path) -> PathBuf {
    data_dir.join("erofs")
}

/// Where the EROFS blob files of the mount at `dir` are served.
pub fn blobs_dir(data_dir: &Path, dir: &Path) -> PathBuf {
    erofs_root(data_dir).join(dir_key(dir))
}

/// A stable, path-safe name for a mount point.
fn dir_key(dir: &Path) -> String {
    use sha2::Digest as _;
    let h = sha2::Sha256::digest(dir.as_os_str().as_encoded_bytes());
    hex::encode(&h[..8])
}

/// The filesystem of a live mount, in either mode, in this process or an image server's.
pub enum Mounted {
    Fuse(FuseMount),
    Erofs(ErofsMount),
    /// Held by a process of its own (`remote`): it outlives this one.
    Remote(super::remote::ServerProcess),
}

impl Mounted {
    /// Mount (blocking): FUSE at `dir` (its decoded chunks kept in `decoded_dir`), or EROFS at
    /// `dir` with its blob files at `blobs_dir`.
    fn new(
        mode: MountMode,
        boot: Arc<Bootstrap>,
        source: Arc<ChunkBackend>,
        dir: &Path,
        blobs_dir: &Path,
        decoded_dir: &Path,
        decoded_max_bytes: u64,
    ) -> Result<Self, MountError> {
        Ok(match mode {
            MountMode::Fuse => {
                let opts = FuseOptions {
                    decoded_dir: Some(decoded_dir.to_path_buf()),
                    decoded_max_bytes,
                    ..FuseOptions::default()
                };
                Mounted::Fuse(fuse::mount(boot, source, dir, &opts)?)
            }
            MountMode::Erofs => Mounted::Erofs(erofs::mount(
                boot,
                source,
                dir,
                blobs_dir,
                &ErofsOptions::default(),
            )?),
        })
    }

    pub fn dir(&self) -> &Path {
        match self {
            Mounted::Fuse(m) => m.dir(),
            Mounted::Erofs(m) => m.dir(),
            Mounted::Remote(m) => m.dir(),
        }
    }

    /// FUSE: reads by programs. EROFS: reads of the blob files, i.e. the kernel's page-cache
    /// misses (programs' reads that hit the page cache never reach the node).
    pub fn stats(&self) -> &Arc<FuseStats> {
        match self {
            Mounted::Fuse(m) => m.stats(),
            Mounted::Erofs(m) => m.stats(),
            Mounted::Remote(m) => m.stats(),
        }
    }

    pub fn unmount(self) -> Result<(), MountError> {
        match self {
            Mounted::Fuse(m) => Ok(m.unmount()?),
            Mounted::Erofs(m) => Ok(m.unmount()?),
            Mounted::Remote(m) => m.stop(),
        }
    }

    /// What the node's shutdown does to it: an image server keeps its mount (containers stand
    /// on it; the next node adopts it), a mount of this process is unmounted.
    pub fn release(self) -> Result<(), MountError> {
        match self {
            Mounted::Remote(m) => {
                m.keep();
                Ok(())
            }
            other => other.unmount(),
        }
    }
}
