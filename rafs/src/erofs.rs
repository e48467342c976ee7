//! The EROFS mount helper: mount a RAFS v6 image with the kernel's EROFS (file-backed mounts,
//! Linux 6.12+), its data coming from decoded blob files that a small FUSE filesystem
//! ([`blobfs`]) fills on demand through a [`ChunkSource`]. Metadata and warm reads then run at
//! kernel speed; a page-cache miss becomes a read of a blob file, which fetches and verifies the
//! chunks it needs.
//!
//! [`mount`] first mounts the blob filesystem at `blobs_dir` (`image.boot` + one
//! `<blob id>.blob.data` per blob), then calls mount(2) with `blobs_dir/image.boot` as the source,
//! type `erofs`, and one `device=blobs_dir/<blob id>.blob.data` per blob in blob-table order.
//! util-linux `mount` is not used: it would turn the regular-file source into a loop device.
//!
//! Invariants: fail closed — the kernel reads blob data only through the blob filesystem, whose
//! reads return verified bytes or EIO, and if its server dies (the node is killed) every later
//! page-cache miss fails instead of reading zeros; an [`ErofsMount`] is handed back fully mounted
//! or not at all; unmounting takes the EROFS mount down before the blob filesystem it reads
//! (lazily if busy), and dropping an [`ErofsMount`] unmounts both.

pub mod blobfs;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::{MountOption, SessionACL};
use rustix::mount::{MountFlags, UnmountFlags};
use tracing::warn;

use crate::blob::source::ChunkSource;
use crate::bootstrap::Bootstrap;
use crate::fuse::{mounting, FuseStats};
use crate::model::RafsVersion;

pub use blobfs::{blob_file_name, BOOTSTRAP_NAME};

/// How an EROFS mount behaves. [`Default`] is the single source of defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErofsOptions {
    /// Threads serving blob-file reads (default 8): the number of chunk fetches in parallel.
    pub read_workers: usize,
    /// Reads waiting for a worker (default 64); beyond that a FUSE thread serves the read itself.
    pub read_queue: usize,
    /// Bytes of decoded chunks kept by the blob filesystem (default 16 MiB: the kernel keeps the
    /// pages of both the blob files and the EROFS files, so this only absorbs the kernel's
    /// several reads of one chunk).
    pub chunk_cache_bytes: u64,
    /// Largest read the kernel sends to the blob filesystem (default 1 MiB).
    pub max_readahead: u32,
    /// Honour setuid/setgid bits and device nodes (default false: `nosuid,nodev`).
    pub suid_dev: bool,
}

impl Default for ErofsOptions {
    fn default() -> Self {
        ErofsOptions {
            read_workers: 8,
            read_queue: 64,
            chunk_cache_bytes: 16 << 20,
            max_readahead: 1 << 20,
            suid_dev: false,
        }
    }
}

/// Why an EROFS mount failed.
#[derive(Debug, thiserror::Error)]
pub enum ErofsError {
    /// The image cannot be mounted by the kernel (not v6, unusable tables).
    #[error("image: {0}")]
    Image(String),
    /// A directory is unusable.
    #[error("{dir}: {source}")]
    Dir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The blob filesystem could not be started or mounted.
    #[error("cannot mount the blob files at {dir}: {source}")]
    Blobs {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    /// This kernel cannot do what the mode needs.
    #[error("the kernel cannot mount EROFS from files: {reason}")]
    Unsupported { reason: String },
    /// mount(2) failed for another reason.
    #[error("mount -t erofs at {dir}: {source}")]
    Mount {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Neither a normal nor a lazy unmount worked.
    #[error("cannot unmount {dir}: {source}")]
    Unmount {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A live EROFS mount and its blob filesystem. Dropping it unmounts both.
pub struct ErofsMount {
    dir: PathBuf,
    blobs_dir: PathBuf,
    kernel_mounted: bool,
    blobs: Option<mounting::Mounted>,
    stats: Arc<FuseStats>,
}

impl std::fmt::Debug for ErofsMount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ErofsMount")
            .field("dir", &self.dir)
            .field("blobs_dir", &self.blobs_dir)
            .finish()
    }
}

/// Mount `bootstrap` read-only at `dir` with the kernel's EROFS, serving its decoded blobs from
/// a FUSE filesystem mounted at `blobs_dir` (created if missing; must be empty).
pub fn mount(
    bootstrap: Arc<Bootstrap>,
    source: Arc<dyn ChunkSource + Send + Sync>,
    dir: &Path,
    blobs_dir: &Path,
    opts: &ErofsOptions,
) -> Result<ErofsMount, ErofsError> {
    if bootstrap.version() != RafsVersion::V6 {
        return Err(ErofsError::Image(
            "only RAFS v6 images are EROFS; use --mode fuse".into(),
        ));
    }
    let dir_err = |dir: &Path| {
        let dir = dir.to_path_buf();
        move |source| ErofsError::Dir { dir, source }
    };
    let dir = std::fs::canonicalize(dir).map_err(dir_err(dir))?;
    std::fs::create_dir_all(blobs_dir).map_err(dir_err(blobs_dir))?;
    let blobs_dir = std::fs::canonicalize(blobs_dir).map_err(dir_err(blobs_dir))?;
    if blobs_dir.to_string_lossy().contains([',', '\0']) {
        return Err(ErofsError::Dir {
            dir: blobs_dir,
            source: io::Error::other("a comma in the path cannot be passed as device="),
        });
    }
    let data = device_options(&bootstrap, &blobs_dir);
    let stats = Arc::new(FuseStats::default());
    let fs = blobfs::BlobFs::new(bootstrap, source, opts, stats.clone())
        .map_err(|e| ErofsError::Image(e.to_string()))?;
    let blobs_err = |source| ErofsError::Blobs {
        dir: blobs_dir.clone(),
        source,
    };
    let session = mounting::mount(fs, &blobs_dir, &blobs_config()).map_err(blobs_err)?;
    let mut m = ErofsMount {
        dir,
        blobs_dir,
        kernel_mounted: false,
        blobs: Some(session),
        stats,
    };
    // On error `m` is dropped, which unmounts the blob filesystem again.
    kernel_mount(&m.blobs_dir.join(BOOTSTRAP_NAME), &m.dir, &data, opts)?;
    m.kernel_mounted = true;
    Ok(m)
}

/// `device=<blobs_dir>/<blob id>.blob.data,...` in blob-table order.
pub fn device_options(bootstrap: &Bootstrap, blobs_dir: &Path) -> String {
    bootstrap
        .blobs()
        .iter()
        .map(|b| format!("device={}", blobs_dir.join(blob_file_name(b)).display()))
        .collect::<Vec<_>>()
        .join(",")
}

impl ErofsMount {
    /// The mount point (canonical path).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the blob filesystem is mounted.
    pub fn blobs_dir(&self) -> &Path {
        &self.blobs_dir
    }

    /// Counters of the blob filesystem: reads here are the kernel's page-cache misses.
    pub fn stats(&self) -> &Arc<FuseStats> {
        &self.stats
    }

    /// Unmount the EROFS mount, then the blob filesystem (each lazily if busy).
    pub fn unmount(mut self) -> Result<(), ErofsError> {
        self.take_down()
    }

    fn take_down(&mut self) -> Result<(), ErofsError> {
        let mut result = Ok(());
        if std::mem::take(&mut self.kernel_mounted) {
            result = unmount_or_detach(&self.dir);
        }
        if let Some(s) = self.blobs.take() {
            let r = mounting::unmount(s, &self.blobs_dir).map_err(|source| ErofsError::Unmount {
                dir: self.blobs_dir.clone(),
                source,
            });
            result = result.and(r);
        }
        result
    }
}

impl Drop for ErofsMount {
    fn drop(&mut self) {
        if let Err(e) = self.take_down() {
            warn!(error = %e, "EROFS mount left behind");
        }
    }
}

fn unmount_or_detach(dir: &Path) -> Result<(), ErofsError> {
    let r = match rustix::mount::unmount(dir, UnmountFlags::NOFOLLOW) {
        Ok(()) | Err(rustix::io::Errno::INVAL) => Ok(()),
        Err(_) => rustix::mount::unmount(dir, UnmountFlags::DETACH | UnmountFlags::NOFOLLOW),
    };
    r.map_err(|e| ErofsError::Unmount {
        dir: dir.to_path_buf(),
        source: e.into(),
    })
}

fn blobs_config() -> fuser::Config {
    let mut c = fuser::Config::default();
    c.mount_options = vec![
        MountOption::RO,
        MountOption::FSName("shoal-blobs".into()),
        MountOption::Subtype("shoal".into()),
        MountOption::NoAtime,
        MountOption::NoSuid,
        MountOption::NoDev,
    ];
    // Only the mounter opens these files (mount(2) opens them for EROFS); the kernel's later
    // reads on behalf of any reader of the EROFS mount pass (tested), other users get EACCES.
    c.acl = SessionACL::Owner;
    c.n_threads = Some(2);
    c.clone_fd = true;
    c
}

fn kernel_mount(
    source: &Path,
    dir: &Path,
    data: &str,
    opts: &ErofsOptions,
) -> Result<(), ErofsError> {
    let mut flags = MountFlags::RDONLY | MountFlags::NOATIME;
    if !opts.suid_dev {
        flags |= MountFlags::NOSUID | MountFlags::NODEV;
    }
    let data = std::ffi::CString::new(data).map_err(|e| ErofsError::Mount {
        dir: dir.to_path_buf(),
        source: io::Error::other(e),
    })?;
    rustix::mount::mount(source, dir, "erofs", flags, data.as_c_str()).map_err(|e| explain(e, dir))
}

/// Turn mount(2)'s errno into what the user needs to know.
fn explain(e: rustix::io::Errno, dir: &Path) -> ErofsError {
    let kernel = rustix::system::uname();
    let release = kernel.release().to_string_lossy();
    let unsupported = |what: &str| ErofsError::Unsupported {
        reason: format!("{what} (running Linux {release}); use --mode fuse"),
    };
    match e {
        rustix::io::Errno::NODEV => unsupported(
            "no erofs filesystem in this kernel: build it with CONFIG_EROFS_FS or load the erofs module",
        ),
        rustix::io::Errno::NOTBLK | rustix::io::Errno::INVAL => unsupported(
            "file-backed EROFS mounts need Linux 6.12+ with CONFIG_EROFS_FS_BACKED_BY_FILE",
        ),
        rustix::io::Errno::PERM | rustix::io::Errno::ACCESS => unsupported(
            "mounting EROFS needs root (CAP_SYS_ADMIN)",
        ),
        e => ErofsError::Mount {
            dir: dir.to_path_buf(),
            source: e.into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_refusals_name_what_is_missing() {
        let d = Path::new("/mnt/x");
        let msg = explain(rustix::io::Errno::NOTBLK, d).to_string();
        assert!(msg.contains("6.12") && msg.contains("--mode fuse"), "{msg}");
        let msg = explain(rustix::io::Errno::NODEV, d).to_string();
        assert!(msg.contains("CONFIG_EROFS_FS"), "{msg}");
        assert!(matches!(
            explain(rustix::io::Errno::BUSY, d),
            ErofsError::Mount { .. }
        ));
    }
}
