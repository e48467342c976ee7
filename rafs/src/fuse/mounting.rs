//! Getting a filesystem mounted and unmounted: mount(2) ourselves when allowed (so the mount
//! is typed `fuse.shoal` and a restarted node can find its stale mounts with `findmnt -t
//! fuse.shoal`; fuser's own mount(2) path always says plain `fuse`), otherwise fuser's
//! `fusermount3` path, which works unprivileged and sets the same type.
//!
//! Invariants: a mount made here is either handed back live (kernel handshake done) or undone
//! before returning; unmounting never leaves the mount point in the namespace — a busy mount is
//! detached lazily instead, and its threads finish when the last user lets go.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use fuser::{BackgroundSession, Filesystem, MountOption, Session, SessionACL};
use rustix::mount::{MountFlags, UnmountFlags};

/// A live session and who mounted it.
pub(crate) enum Mounted {
    /// We called mount(2): we unmount with umount2(2).
    Direct(BackgroundSession),
    /// fusermount3 mounted it: fuser unmounts (through fusermount3 when unprivileged).
    Fusermount(BackgroundSession),
}

/// Mount `fs` at `dir` (canonical) as `config` says; returns after the kernel handshake.
pub(crate) fn mount<FS: Filesystem>(
    fs: FS,
    dir: &Path,
    config: &fuser::Config,
) -> io::Result<Mounted> {
    let wants_fusermount = config.mount_options.contains(&MountOption::AutoUnmount);
    if !wants_fusermount {
        if let Some(fd) = mount_direct(dir, config)? {
            let session = Session::from_fd(fs, fd, config.acl, config.clone())
                .and_then(Session::spawn)
                .inspect_err(|_| {
                    let _ = rustix::mount::unmount(dir, UnmountFlags::DETACH);
                })?;
            return Ok(Mounted::Direct(session));
        }
    }
    fuser::spawn_mount(fs, dir, config).map(Mounted::Fusermount)
}

/// Unmount; detach lazily if the mount is busy.
pub(crate) fn unmount(m: Mounted, dir: &Path) -> io::Result<()> {
    match m {
        Mounted::Direct(session) => match rustix::mount::unmount(dir, UnmountFlags::empty()) {
            // The event loops see ENODEV and end; the filesystem is dropped when they have.
            Ok(()) => session.join(),
            // Not ours any more (someone ran umount): the session has ended or is ending.
            Err(rustix::io::Errno::INVAL) => session.join(),
            Err(_) => {
                // Busy: detach now; the session thread lives until the last user lets go.
                drop(session);
                rustix::mount::unmount(dir, UnmountFlags::DETACH).map_err(io::Error::from)
            }
        },
        Mounted::Fusermount(session) => match session.umount_and_join() {
            Ok(()) => Ok(()),
            Err(_) => lazy_unmount_unprivileged(dir),
        },
    }
}

/// mount(2) a FUSE filesystem at `dir`; `None` if we may not (then fusermount3 must).
fn mount_direct(dir: &Path, config: &fuser::Config) -> io::Result<Option<OwnedFd>> {
    let dev = File::options().read(true).write(true).open("/dev/fuse")?;
    let mut flags = MountFlags::empty();
    let mut fsname = "shoal".to_string();
    let mut data = format!(
        "fd={},rootmode=40000,user_id={},group_id={}",
        dev.as_raw_fd(),
        rustix::process::geteuid().as_raw(),
        rustix::process::getegid().as_raw()
    );
    let (mut suid, mut devices) = (false, false);
    for o in &config.mount_options {
        match o {
            MountOption::RO => flags |= MountFlags::RDONLY,
            MountOption::NoAtime => flags |= MountFlags::NOATIME,
            MountOption::Suid => suid = true,
            MountOption::Dev => devices = true,
            MountOption::DefaultPermissions => data.push_str(",default_permissions"),
            MountOption::FSName(n) => fsname.clone_from(n),
            _ => {}
        }
    }
    if !suid {
        flags |= MountFlags::NOSUID;
    }
    if !devices {
        flags |= MountFlags::NODEV;
    }
    if config.acl != SessionACL::Owner {
        data.push_str(",allow_other");
    }
    let data = std::ffi::CString::new(data).map_err(io::Error::other)?;
    match rustix::mount::mount(fsname.as_str(), dir, "fuse.shoal", flags, data.as_c_str()) {
        Ok(()) => Ok(Some(dev.into())),
        Err(rustix::io::Errno::PERM) | Err(rustix::io::Errno::ACCESS) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// `fusermount3 -u -z`: detach a mount we may not unmount ourselves.
fn lazy_unmount_unprivileged(dir: &Path) -> io::Result<()> {
    if rustix::process::geteuid().is_root() {
        return rustix::mount::unmount(dir, UnmountFlags::DETACH).map_err(io::Error::from);
    }
    let out = std::process::Command::new("fusermount3")
        .args(["-u", "-z", "--"])
        .arg(dir)
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}
