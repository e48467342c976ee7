//! The FUSE filesystem over a [`Bootstrap`] and a [`ChunkSource`]: [`mount`] an image read-only
//! at a directory and get a [`FuseMount`] whose drop (or [`FuseMount::unmount`]) unmounts it.
//!
//! Threads: `fuse_threads` FUSE event loops answer metadata from the in-memory bootstrap, and
//! reads whose chunks are at hand (in memory, or in the mount's decoded files: a `pread` of just
//! the bytes asked for); other reads go to a pool of `read_workers` threads through a queue of
//! `read_queue` jobs, so a slow chunk holds up one worker, not the mount (a full queue makes the
//! FUSE thread serve the read itself: backpressure, never unbounded memory). The [`ChunkSource`] is called from the workers and may
//! block; it must return only verified chunks, which [`crate::LocalBlobDir`] and anything built
//! on [`crate::decode_chunk`] do.
//!
//! Invariants: the mount is read-only, `default_permissions` (the kernel enforces the image's
//! modes and owners), `allow_other` when running as root unless told otherwise; its entries,
//! attributes and page cache are kept for long because the image never changes; a read that
//! cannot get every chunk it needs fails with EIO (see `fuse/errno.rs`), never returns zeros or
//! partial data. Mounting needs no root: `fusermount3` mounts when mount(2) is refused.
//!
//! Layout: `fs` (the `fuser::Filesystem`), `reader` (byte range → chunks → bytes), `cache`
//! (decoded-chunk LRU with single-flight), `decoded` (verified chunks kept uncompressed in the
//! mount's own files, `FuseOptions::decoded_dir`), `pool` (bounded worker pool), `inodes` (numbering and
//! attributes), `errno` (error → errno), `mounting` (mount(2) or fusermount3, and unmount),
//! `stats` (per-mount counters).

pub(crate) mod cache;
mod decoded;
mod errno;
mod fs;
mod inodes;
pub(crate) mod mounting;
pub(crate) mod pool;
mod reader;
mod stats;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuser::{MountOption, SessionACL};
use tracing::{debug, warn};

use crate::blob::source::ChunkSource;
use crate::bootstrap::Bootstrap;

pub use stats::{
    FuseStats, FuseStatsSnapshot, LatencyHistogram, LatencySnapshot, LATENCY_BOUNDS_MICROS,
};

/// How a mount behaves. [`Default`] is the single source of defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FuseOptions {
    /// Source name shown in `/proc/mounts` (default `shoal`); the type is `fuse.shoal`.
    pub fsname: String,
    /// Let users other than the mounter in. `None` (default): yes when running as root. An
    /// unprivileged mounter needs `user_allow_other` in `/etc/fuse.conf` for `Some(true)`.
    pub allow_other: Option<bool>,
    /// Honour setuid/setgid bits and device nodes (default false: `nosuid,nodev`; the bits and
    /// nodes are still shown exactly as in the image).
    pub suid_dev: bool,
    /// Have `fusermount3` unmount when this process dies (default false; needs allow_other).
    pub auto_unmount: bool,
    /// How long the kernel may cache a name → inode lookup (default 1 day: the image is immutable).
    pub entry_ttl: Duration,
    /// How long the kernel may cache attributes (default 1 day).
    pub attr_ttl: Duration,
    /// How long the kernel may cache "no such name" (default 1 day; zero disables).
    pub negative_ttl: Duration,
    /// FUSE event-loop threads (default 2): they answer metadata and queue reads.
    pub fuse_threads: usize,
    /// Threads serving reads (default 8): the number of chunk fetches in parallel.
    pub read_workers: usize,
    /// Reads waiting for a worker (default 64); beyond that a FUSE thread serves the read itself.
    pub read_queue: usize,
    /// Bytes of decoded chunks kept per mount (default 64 MiB).
    pub chunk_cache_bytes: u64,
    /// Kernel readahead, bytes (default 1 MiB). Above the kernel's 128 KiB default only when
    /// mounted by root (it is set through sysfs).
    pub max_readahead: u32,
    /// Kernel limit on background (readahead, async) requests in flight (default 64).
    pub max_background: u16,
    /// A directory of the mount's own for decoded chunks (default none): verified chunks are
    /// kept there uncompressed, so a read the in-memory cache misses is one `pread` instead of a
    /// fetch, a decompression and a digest. Emptied at mount, removed at unmount.
    pub decoded_dir: Option<std::path::PathBuf>,
    /// Most bytes kept in `decoded_dir` (default 1 GiB); beyond, chunks are decoded each time.
    pub decoded_max_bytes: u64,
}

impl Default for FuseOptions {
    fn default() -> Self {
        const DAY: Duration = Duration::from_secs(24 * 3600);
        FuseOptions {
            fsname: "shoal".into(),
            allow_other: None,
            suid_dev: false,
            auto_unmount: false,
            entry_ttl: DAY,
            attr_ttl: DAY,
            negative_ttl: DAY,
            fuse_threads: 2,
            read_workers: 8,
            read_queue: 64,
            chunk_cache_bytes: 64 << 20,
            max_readahead: 1 << 20,
            max_background: 64,
            decoded_dir: None,
            decoded_max_bytes: 1 << 30,
        }
    }
}

/// Why mounting or unmounting failed.
#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    /// An option is out of range.
    #[error("FUSE option {field}: {reason}")]
    Option {
        field: &'static str,
        reason: &'static str,
    },
    /// The mount point is missing or not a directory.
    #[error("mount point {dir}: {source}")]
    MountPoint {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The read workers could not be started.
    #[error("cannot start FUSE read workers: {source}")]
    Threads {
        #[source]
        source: io::Error,
    },
    /// The kernel or fusermount3 refused the mount (no /dev/fuse, no permission, ...).
    #[error("cannot mount FUSE at {dir}: {source}")]
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

/// A live mount. Dropping it unmounts (errors are logged); [`FuseMount::unmount`] reports them.
pub struct FuseMount {
    session: Option<mounting::Mounted>,
    dir: PathBuf,
    stats: Arc<FuseStats>,
}

impl std::fmt::Debug for FuseMount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FuseMount")
            .field("dir", &self.dir)
            .field("mounted", &self.session.is_some())
            .finish()
    }
}

/// Mount `bootstrap` read-only at `dir`, reading file data through `source`.
///
/// Returns once the kernel has completed the FUSE handshake, so the tree is usable at once.
pub fn mount(
    bootstrap: Arc<Bootstrap>,
    source: Arc<dyn ChunkSource + Send + Sync>,
    dir: &Path,
    opts: &FuseOptions,
) -> Result<FuseMount, FuseError> {
    validate(opts)?;
    let mount_point = |source| FuseError::MountPoint {
        dir: dir.to_path_buf(),
        source,
    };
    let dir = std::fs::canonicalize(dir).map_err(mount_point)?;
    if !std::fs::metadata(&dir).map_err(mount_point)?.is_dir() {
        return Err(mount_point(io::Error::from(io::ErrorKind::NotADirectory)));
    }
    let stats = Arc::new(FuseStats::default());
    let fs = fs::RafsFs::new(bootstrap, source, opts, stats.clone())
        .map_err(|source| FuseError::Threads { source })?;
    let session =
        mounting::mount(fs, &dir, &session_config(opts)).map_err(|source| FuseError::Mount {
            dir: dir.clone(),
            source,
        })?;
    if let Err(e) = mounting::raise_readahead(&dir, opts.max_readahead) {
        debug!(dir = %dir.display(), error = %e, "FUSE readahead stays at the kernel default");
    }
    Ok(FuseMount {
        session: Some(session),
        dir,
        stats,
    })
}

impl FuseMount {
    /// The mount point (canonical path).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// This mount's live counters (clone the `Arc` to export them).
    pub fn stats(&self) -> &Arc<FuseStats> {
        &self.stats
    }

    /// Unmount and wait for the filesystem threads to finish. If the mount point is busy, it is
    /// detached lazily instead (gone from the namespace, torn down when its last user leaves).
    pub fn unmount(mut self) -> Result<(), FuseError> {
        match self.session.take() {
            Some(s) => unmount_session(s, &self.dir),
            None => Ok(()),
        }
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            if let Err(e) = unmount_session(s, &self.dir) {
                warn!(error = %e, "FUSE mount left behind");
            }
        }
    }
}

fn validate(o: &FuseOptions) -> Result<(), FuseError> {
    let bad = |field, reason| Err(FuseError::Option { field, reason });
    if o.fuse_threads == 0 {
        return bad("fuse_threads", "must be at least 1");
    }
    if o.read_workers == 0 {
        return bad("read_workers", "must be at least 1");
    }
    if o.max_readahead < 4096 {
        return bad("max_readahead", "must be at least 4096");
    }
    if o.max_background == 0 {
        return bad("max_background", "must be at least 1");
    }
    if o.fsname.is_empty() || o.fsname.contains([',', '\0', ' ', '\n', '\t']) {
        return bad(
            "fsname",
            "must be non-empty, without commas, whitespace or NUL",
        );
    }
    if o.auto_unmount && !allow_other(o) {
        return bad("auto_unmount", "needs allow_other");
    }
    Ok(())
}

fn allow_other(o: &FuseOptions) -> bool {
    o.allow_other
        .unwrap_or_else(|| rustix::process::geteuid().is_root())
}

fn session_config(o: &FuseOptions) -> fuser::Config {
    let mut opts = vec![
        MountOption::RO,
        MountOption::FSName(o.fsname.clone()),
        MountOption::Subtype("shoal".into()),
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
    ];
    if o.suid_dev {
        opts.extend([MountOption::Suid, MountOption::Dev]);
    } else {
        opts.extend([MountOption::NoSuid, MountOption::NoDev]);
    }
    if o.auto_unmount {
        opts.push(MountOption::AutoUnmount);
    }
    let mut c = fuser::Config::default();
    c.mount_options = opts;
    c.acl = if allow_other(o) {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    c.n_threads = Some(o.fuse_threads);
    c.clone_fd = o.fuse_threads > 1;
    c
}

fn unmount_session(session: mounting::Mounted, dir: &Path) -> Result<(), FuseError> {
    mounting::unmount(session, dir).map_err(|source| FuseError::Unmount {
        dir: dir.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_options_are_named() {
        assert!(validate(&FuseOptions::default()).is_ok());
        let o = FuseOptions {
            read_workers: 0,
            ..Default::default()
        };
        assert!(matches!(
            validate(&o),
            Err(FuseError::Option {
                field: "read_workers",
                ..
            })
        ));
        let o = FuseOptions {
            fsname: "a,b".into(),
            ..Default::default()
        };
        assert!(validate(&o).is_err());
        let o = FuseOptions {
            auto_unmount: true,
            allow_other: Some(false),
            ..Default::default()
        };
        assert!(validate(&o).is_err());
    }

    #[test]
    fn session_is_read_only_and_named_shoal() {
        let c = session_config(&FuseOptions {
            allow_other: Some(true),
            ..Default::default()
        });
        for o in [
            MountOption::RO,
            MountOption::DefaultPermissions,
            MountOption::Subtype("shoal".into()),
            MountOption::FSName("shoal".into()),
            MountOption::NoSuid,
        ] {
            assert!(c.mount_options.contains(&o), "{o:?}");
        }
        assert_eq!(c.acl, SessionACL::All);
        assert_eq!(c.n_threads, Some(2));
    }
}
