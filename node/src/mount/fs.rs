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
) -> Result<Mounted, MountError> {
    let root = erofs_root(data_dir);
    let blobs_dir = root.join(dir_key(dir));
    table::clear_stale(dir, &root);
    table::clear_stale(&blobs_dir, &root);
    Mounted::new(mode, boot, source, dir, &blobs_dir)
}

/// Where EROFS mounts keep their blob filesystems: `<data dir>/erofs/<key of the mount point>`.
pub fn erofs_root(data_dir: &Path) -> PathBuf {
    data_dir.join("erofs")
}

/// A stable, path-safe name for a mount point.
fn dir_key(dir: &Path) -> String {
    use sha2::Digest as _;
    let h = sha2::Sha256::digest(dir.as_os_str().as_encoded_bytes());
    hex::encode(&h[..8])
}

/// The filesystem of a live mount, in either mode.
pub enum Mounted {
    Fuse(FuseMount),
    Erofs(ErofsMount),
}

impl Mounted {
    /// Mount (blocking): FUSE at `dir`, or EROFS at `dir` with its blob files at `blobs_dir`.
    fn new(
        mode: MountMode,
        boot: Arc<Bootstrap>,
        source: Arc<ChunkBackend>,
        dir: &Path,
        blobs_dir: &Path,
    ) -> Result<Self, MountError> {
        Ok(match mode {
            MountMode::Fuse => {
                Mounted::Fuse(fuse::mount(boot, source, dir, &FuseOptions::default())?)
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
        }
    }

    /// FUSE: reads by programs. EROFS: reads of the blob files, i.e. the kernel's page-cache
    /// misses (programs' reads that hit the page cache never reach the node).
    pub fn stats(&self) -> &Arc<FuseStats> {
        match self {
            Mounted::Fuse(m) => m.stats(),
            Mounted::Erofs(m) => m.stats(),
        }
    }

    pub fn unmount(self) -> Result<(), MountError> {
        match self {
            Mounted::Fuse(m) => Ok(m.unmount()?),
            Mounted::Erofs(m) => Ok(m.unmount()?),
        }
    }
}
