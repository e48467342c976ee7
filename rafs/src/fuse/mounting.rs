//! Getting a filesystem mounted and unmounted: mount(2) ourselves when allowed, else fuser's
//! path through the setuid `fusermount3` helper (unprivileged users, and `auto_unmount`, which
//! keeps `fusermount3` waiting for this process to die). Both type the mount `fuse.shoal` (fuser's
//! own mount(2) call would say plain `fuse`), so a restarted node finds stale mounts with
//! `findmnt -t fuse.shoal`.
//!
//! Invariants: a mount made here is handed back live (kernel handshake done) or undone before
//! returning; unmounting never leaves the mount point in the namespace — a busy mount is
//! detached lazily instead, and its threads finish when the last user lets go.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use fuser::{BackgroundSession, Filesystem, MountOption, Session, SessionACL};
use rustix::mount::{MountFlags, UnmountFlags};

/// A live session and who mounted it.
pub(crate) enum Mounted {
    /// We called mount(2): umount2(2) undoes it.
    Direct(BackgroundSession),
    /// fuser mounted it (through fusermount3): fuser undoes it.
    Fuser(BackgroundSession),
}

/// Mount `fs` at `dir` (canonical) as `config` says; returns after the kernel handshake.
pub(crate) fn mount<FS: Filesystem>(
    fs: FS,
    dir: &Path,
    config: &fuser::Config,
) -> io::Result<Mounted> {
    if config.mount_options.contains(&MountOption::AutoUnmount) {
        return fuser::spawn_mount(fs, dir, config).map(Mounted::Fuser);
    }
    let plan = Plan::new(config);
    let Some(fd) = mount_direct(dir, &plan)? else {
        return fuser::spawn_mount(fs, dir, config).map(Mounted::Fuser);
    };
    Session::from_fd(fs, fd, config.acl, config.clone())
        .and_then(Session::spawn)
        .map(Mounted::Direct)
        .inspect_err(|_| {
            let _ = rustix::mount::unmount(dir, UnmountFlags::DETACH | UnmountFlags::NOFOLLOW);
        })
}

/// Let the kernel read ahead up to `bytes` on the mount at `dir`. A FUSE mount's readahead
/// starts at the kernel default (128 KiB) and the FUSE handshake can only lower it, so it is
/// raised through the mount's backing-device entry in sysfs. Best effort: needs root.
pub(crate) fn raise_readahead(dir: &Path, bytes: u32) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(dir)?.dev();
    let (major, minor) = (rustix::fs::major(dev), rustix::fs::minor(dev));
    let knob = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    std::fs::write(knob, format!("{}", bytes / 1024))
}

/// Unmount; detach lazily if the mount is busy.
pub(crate) fn unmount(m: Mounted, dir: &Path) -> io::Result<()> {
    match m {
        Mounted::Direct(session) => match rustix::mount::unmount(dir, UnmountFlags::NOFOLLOW) {
            // EINVAL: no longer a mount point (someone ran umount); the session is ending.
            // Either way the event loops see ENODEV and end, then the filesystem is dropped.
            // A worker on a cloned device fd may see ECONNABORTED instead (the connection
            // went with the mount): that is the unmount asked for, not a failure.
            Ok(()) | Err(rustix::io::Errno::INVAL) => match session.join() {
                Err(e)
                    if e.raw_os_error() == Some(rustix::io::Errno::CONNABORTED.raw_os_error()) =>
                {
                    Ok(())
                }
                other => other,
            },
            Err(_) => {
                // Busy: detach now; the session thread lives on until the last user lets go.
                drop(session);
                rustix::mount::unmount(dir, UnmountFlags::DETACH | UnmountFlags::NOFOLLOW)
                    .map_err(io::Error::from)
            }
        },
        // fuser detaches with `fusermount3 -u -z` itself when umount(2) is refused (EPERM).
        Mounted::Fuser(session) => session.umount_and_join().or_else(|e| {
            if rustix::process::geteuid().is_root() {
                rustix::mount::unmount(dir, UnmountFlags::DETACH | UnmountFlags::NOFOLLOW)
                    .map_err(io::Error::from)
            } else {
                Err(e)
            }
        }),
    }
}

/// The mount options as mount(2) takes them.
struct Plan {
    flags: MountFlags,
    /// Comma-separated options for the kernel (beyond fd/rootmode/user_id/group_id).
    kernel: String,
    fsname: String,
}

impl Plan {
    fn new(config: &fuser::Config) -> Self {
        let mut flags = MountFlags::NOSUID | MountFlags::NODEV;
        let mut kernel = Vec::new();
        let mut fsname = "shoal".to_string();
        for o in &config.mount_options {
            match o {
                MountOption::RO => flags |= MountFlags::RDONLY,
                MountOption::NoAtime => flags |= MountFlags::NOATIME,
                MountOption::Suid => flags.remove(MountFlags::NOSUID),
                MountOption::Dev => flags.remove(MountFlags::NODEV),
                MountOption::DefaultPermissions => kernel.push("default_permissions"),
                MountOption::FSName(n) => fsname.clone_from(n),
                _ => {}
            }
        }
        if config.acl != SessionACL::Owner {
            kernel.push("allow_other");
        }
        Plan {
            flags,
            kernel: kernel.join(","),
            fsname,
        }
    }
}

/// mount(2) a FUSE filesystem at `dir`; `None` if we may not (then fusermount3 must).
fn mount_direct(dir: &Path, plan: &Plan) -> io::Result<Option<OwnedFd>> {
    let dev = match File::options().read(true).write(true).open("/dev/fuse") {
        Ok(dev) => dev,
        // fusermount3 is setuid root and can open it.
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut data = format!(
        "fd={},rootmode=40000,user_id={},group_id={}",
        dev.as_raw_fd(),
        rustix::process::geteuid().as_raw(),
        rustix::process::getegid().as_raw()
    );
    if !plan.kernel.is_empty() {
        data.push(',');
        data.push_str(&plan.kernel);
    }
    let data = std::ffi::CString::new(data).map_err(io::Error::other)?;
    let fsname = plan.fsname.as_str();
    match rustix::mount::mount(fsname, dir, "fuse.shoal", plan.flags, data.as_c_str()) {
        Ok(()) => Ok(Some(dev.into())),
        Err(rustix::io::Errno::PERM) | Err(rustix::io::Errno::ACCESS) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_maps_options_to_mount_flags_and_data() {
        let mut c = fuser::Config::default();
        c.mount_options = vec![
            MountOption::RO,
            MountOption::NoAtime,
            MountOption::DefaultPermissions,
            MountOption::FSName("shoal:app".into()),
        ];
        c.acl = SessionACL::All;
        let p = Plan::new(&c);
        assert_eq!(
            p.flags,
            MountFlags::RDONLY | MountFlags::NOATIME | MountFlags::NOSUID | MountFlags::NODEV
        );
        assert_eq!(p.kernel, "default_permissions,allow_other");
        assert_eq!(p.fsname, "shoal:app");
        c.mount_options.push(MountOption::Suid);
        c.acl = SessionACL::Owner;
        let p = Plan::new(&c);
        assert!(!p.flags.contains(MountFlags::NOSUID));
        assert_eq!(p.kernel, "default_permissions");
    }
}
