//! `shoal mount` / `shoal umount` through a test node's control socket, python3 in a mounted
//! image, a guard that detaches a mount point when a test ends (however it ends), and what a
//! mount mode needs from this machine.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{ensure, Result};

use crate::node::Node;
use crate::paths;

/// `shoal mount --mode`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    Fuse,
    Erofs,
}

impl Mode {
    pub fn arg(self) -> &'static str {
        match self {
            Mode::Fuse => "fuse",
            Mode::Erofs => "erofs",
        }
    }
}

/// Why a mount of `mode` cannot work here (both modes need /dev/fuse: EROFS mode serves its blob
/// files with FUSE).
pub fn missing(mode: Mode) -> Option<String> {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        return Some(format!("cannot open /dev/fuse: {e}"));
    }
    if mode == Mode::Erofs {
        let _ = Command::new("modprobe")
            .arg("erofs")
            .stderr(Stdio::null())
            .status();
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut v = release
            .split(['.', '-'])
            .map(|p| p.parse::<u32>().unwrap_or(0));
        let (major, minor) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
        if (major, minor) < (6, 12) {
            return Some(format!(
                "file-backed EROFS needs Linux 6.12+, this is {}",
                release.trim()
            ));
        }
        let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
        if !fs.contains("erofs") {
            return Some("the kernel has no erofs filesystem (CONFIG_EROFS_FS)".into());
        }
    }
    None
}

/// Lazily detaches whatever is still mounted at the mount point when dropped.
#[derive(Debug)]
pub struct Unmount(pub PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .stderr(Stdio::null())
            .status();
    }
}

/// `shoal mount IMAGE DIR [extra…]` through `node`'s control socket.
pub fn mount(node: &Node, image: &str, dir: &Path, extra: &[&str]) -> Result<()> {
    let out = Command::new(paths::shoal_bin()?)
        .args(["mount", image])
        .arg(dir)
        .args(extra)
        .arg("--control")
        .arg(node.control_path())
        .output()?;
    ensure!(
        out.status.success(),
        "shoal mount {image}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        node.log_tail(30)
    );
    Ok(())
}

/// `shoal umount DIR` through `node`'s control socket.
pub fn umount(node: &Node, dir: &Path) -> Result<()> {
    let out = Command::new(paths::shoal_bin()?)
        .arg("umount")
        .arg(dir)
        .arg("--control")
        .arg(node.control_path())
        .output()?;
    ensure!(
        out.status.success(),
        "shoal umount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `chroot DIR python3 -c 'import json; print(42)'` prints 42.
pub fn python_prints_42(dir: &Path, what: &str) -> Result<()> {
    let py = Command::new("chroot")
        .arg(dir)
        .args(["python3", "-c", "import json; print(42)"])
        .output()?;
    ensure!(
        py.status.success() && String::from_utf8_lossy(&py.stdout).trim() == "42",
        "chroot python3 in {what}: {} {} {}",
        py.status,
        String::from_utf8_lossy(&py.stdout),
        String::from_utf8_lossy(&py.stderr)
    );
    Ok(())
}
