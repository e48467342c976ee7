//! Writing runtime config files reversibly: a [`Plan`] (the files a runtime
//! writer wants, with their whole new content) is applied under a root
//! directory with a backup of every file it changes, and `--undo` puts each
//! one back byte for byte (or removes the files and directories it created).
//!
//! The backup lives in `<root>/var/lib/shoal/runtime-config/<runtime>/`: a
//! `manifest.json` naming each file (as the host sees it, so `--root` can
//! move) with its original's copy and the hash of what shoal wrote.
//!
//! Invariants:
//! - a file whose content already is the wanted one is not touched, so a
//!   second `--write` changes nothing (not even the backup);
//! - the original of a file is recorded once, the first time shoal changes
//!   it, and the manifest is saved before any file is written, so a crash
//!   mid-way leaves an undo that still knows every original;
//! - undo refuses (changing nothing) when a file was edited after shoal
//!   wrote it, unless forced;
//! - every write is a temp file + fsync + rename in the same directory, with
//!   the original's permissions, so a reader never sees half a file.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Where the backups of runtime `name` live, relative to the root.
const BACKUP_DIR: &str = "var/lib/shoal/runtime-config";

/// The files one runtime's writer wants, plus what to tell the operator.
#[derive(Debug, Default)]
pub struct Plan {
    /// `containerd`, `docker`, `crio`, `nydusd`: names the backup.
    pub runtime: &'static str,
    pub files: Vec<Wanted>,
    /// Printed with the plan and after writing (restart hints, warnings).
    pub notes: Vec<String>,
}

/// One file's whole wanted content. `path` is absolute as the host sees it.
#[derive(Debug, Clone)]
pub struct Wanted {
    pub path: PathBuf,
    pub content: Vec<u8>,
}

/// What happened to one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Unchanged,
    Created,
    Changed,
    Restored,
    Removed,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Manifest {
    version: u32,
    runtime: String,
    files: Vec<Entry>,
    /// Directories shoal created (host paths), parents first.
    dirs_created: Vec<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    path: PathBuf,
    /// Name of the original's copy in the backup dir; `None`: there was no
    /// file (undo removes it).
    original: Option<String>,
    /// Permission bits of the original.
    mode: Option<u32>,
    /// SHA-256 (hex) of what shoal last wrote.
    written: String,
}

/// `root` joined with the host path `path` (which must be absolute and
/// plain: no `..`).
pub fn under(root: &Path, path: &Path) -> Result<PathBuf> {
    let mut out = root.to_path_buf();
    for c in path.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(n) => out.push(n),
            _ => bail!("{}: not a plain absolute path", path.display()),
        }
    }
    Ok(out)
}

/// Reads the host file `path` under `root`; `None` when it does not exist.
pub fn read(root: &Path, path: &Path) -> Result<Option<Vec<u8>>> {
    let p = under(root, path)?;
    match std::fs::read(&p) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

/// What applying `plan` would do to each file, without doing it.
pub fn preview(root: &Path, plan: &Plan) -> Result<Vec<(PathBuf, Outcome)>> {
    plan.files
        .iter()
        .map(|w| {
            let outcome = match read(root, &w.path)? {
                Some(cur) if cur == w.content => Outcome::Unchanged,
                Some(_) => Outcome::Changed,
                None => Outcome::Created,
            };
            Ok((w.path.clone(), outcome))
        })
        .collect()
}

/// Writes the plan's files under `root`, backing up what it changes.
pub fn apply(root: &Path, plan: &Plan) -> Result<Vec<(PathBuf, Outcome)>> {
    let outcomes = preview(root, plan)?;
    if outcomes.iter().all(|(_, o)| *o == Outcome::Unchanged) {
        return Ok(outcomes);
    }
    let backup = under(root, &Path::new("/").join(BACKUP_DIR).join(plan.runtime))?;
    let mut manifest = load_manifest(&backup)?.unwrap_or_else(|| Manifest {
        version: 1,
        runtime: plan.runtime.to_owned(),
        ..Manifest::default()
    });
    std::fs::create_dir_all(&backup)
        .with_context(|| format!("creating the backup dir {}", backup.display()))?;
    // 1. Originals and the manifest first.
    for (w, (_, outcome)) in plan.files.iter().zip(&outcomes) {
        if *outcome == Outcome::Unchanged {
            continue;
        }
        let written = hex::encode(Sha256::digest(&w.content));
        if let Some(e) = manifest.files.iter_mut().find(|e| e.path == w.path) {
            e.written = written;
            continue;
        }
        let target = under(root, &w.path)?;
        let (original, mode) = match std::fs::read(&target) {
            Ok(bytes) => {
                let name = format!("original-{}", manifest.files.len());
                write_atomic(&backup.join(&name), &bytes, 0o600)?;
                let mode = std::fs::metadata(&target)?.permissions().mode() & 0o7777;
                (Some(name), Some(mode))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", target.display())),
        };
        for dir in missing_dirs(root, &w.path)? {
            if !manifest.dirs_created.contains(&dir) {
                manifest.dirs_created.push(dir);
            }
        }
        manifest.files.push(Entry {
            path: w.path.clone(),
            original,
            mode,
            written,
        });
    }
    save_manifest(&backup, &manifest)?;
    // 2. The files.
    for (w, (_, outcome)) in plan.files.iter().zip(&outcomes) {
        if *outcome == Outcome::Unchanged {
            continue;
        }
        let target = under(root, &w.path)?;
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let mode = manifest
            .files
            .iter()
            .find(|e| e.path == w.path)
            .and_then(|e| e.mode)
            .unwrap_or(0o644);
        write_atomic(&target, &w.content, mode)?;
    }
    Ok(outcomes)
}

/// Restores every file shoal changed for `runtime` and forgets the backup.
/// Refuses, changing nothing, when a file changed since shoal wrote it
/// (unless `force`). Nothing recorded: an empty list.
pub fn undo(root: &Path, runtime: &str, force: bool) -> Result<Vec<(PathBuf, Outcome)>> {
    let backup = under(root, &Path::new("/").join(BACKUP_DIR).join(runtime))?;
    let Some(manifest) = load_manifest(&backup)? else {
        return Ok(Vec::new());
    };
    let mut edited = Vec::new();
    for e in &manifest.files {
        let current = read(root, &e.path)?;
        let matches_written = current
            .as_ref()
            .is_some_and(|c| hex::encode(Sha256::digest(c)) == e.written);
        let matches_original = match (&current, &e.original) {
            (None, None) => true,
            (Some(c), Some(name)) => std::fs::read(backup.join(name)).is_ok_and(|o| &o == c),
            _ => false,
        };
        if !matches_written && !matches_original {
            edited.push(e.path.display().to_string());
        }
    }
    if !edited.is_empty() && !force {
        bail!(
            "changed since shoal wrote them: {}. Nothing was restored; look at them, then \
             run again with --force to restore the originals anyway (the backup is in {})",
            edited.join(", "),
            backup.display()
        );
    }
    let mut outcomes = Vec::new();
    for e in &manifest.files {
        let target = under(root, &e.path)?;
        match &e.original {
            Some(name) => {
                let bytes = std::fs::read(backup.join(name))
                    .with_context(|| format!("reading the backup of {}", e.path.display()))?;
                write_atomic(&target, &bytes, e.mode.unwrap_or(0o644))?;
                outcomes.push((e.path.clone(), Outcome::Restored));
            }
            None => {
                match std::fs::remove_file(&target) {
                    Ok(()) => {}
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                    Err(err) => {
                        return Err(err).with_context(|| format!("removing {}", target.display()))
                    }
                }
                outcomes.push((e.path.clone(), Outcome::Removed));
            }
        }
    }
    for dir in manifest.dirs_created.iter().rev() {
        // Only if empty: the operator may have put files there since.
        let _ = std::fs::remove_dir(under(root, dir)?);
    }
    std::fs::remove_dir_all(&backup)
        .with_context(|| format!("removing the backup {}", backup.display()))?;
    // The backup's parent too, when no other runtime's backup is left.
    if let Some(parent) = backup.parent() {
        let _ = std::fs::remove_dir(parent);
    }
    Ok(outcomes)
}

/// The directories above `path` (host paths) that do not exist yet under
/// `root`, outermost first.
fn missing_dirs(root: &Path, path: &Path) -> Result<Vec<PathBuf>> {
    let mut out = BTreeSet::new();
    let mut cur = path.parent();
    while let Some(dir) = cur {
        if dir == Path::new("/") || under(root, dir)?.exists() {
            break;
        }
        out.insert(dir.to_path_buf());
        cur = dir.parent();
    }
    // BTreeSet orders parents before their children.
    Ok(out.into_iter().collect())
}

fn load_manifest(backup: &Path) -> Result<Option<Manifest>> {
    let p = backup.join("manifest.json");
    match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .with_context(|| format!("{}: not a shoal backup manifest", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

fn save_manifest(backup: &Path, m: &Manifest) -> Result<()> {
    let json = serde_json::to_vec_pretty(m)?;
    write_atomic(&backup.join("manifest.json"), &json, 0o600)
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let dir = path.parent().context("a file path without a directory")?;
    let name = path.file_name().context("a path without a file name")?;
    let tmp = dir.join(format!(".{}.shoal-tmp", name.to_string_lossy()));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(files: &[(&str, &str)]) -> Plan {
        Plan {
            runtime: "test",
            files: files
                .iter()
                .map(|(p, c)| Wanted {
                    path: PathBuf::from(p),
                    content: c.as_bytes().to_vec(),
                })
                .collect(),
            notes: Vec::new(),
        }
    }

    #[test]
    fn write_twice_then_undo_is_byte_for_byte() {
        let root = tempfile::tempdir().expect("tempdir");
        let r = root.path();
        std::fs::create_dir_all(r.join("etc/x")).expect("mkdir");
        let original = b"# odd   spacing\r\nkeep = 1\n\n";
        std::fs::write(r.join("etc/x/a.toml"), original).expect("write");
        std::fs::set_permissions(
            r.join("etc/x/a.toml"),
            std::fs::Permissions::from_mode(0o640),
        )
        .expect("chmod");
        let p = plan(&[("/etc/x/a.toml", "new\n"), ("/etc/x/d/e/b.toml", "b\n")]);
        let first = apply(r, &p).expect("apply");
        assert_eq!(first[0].1, Outcome::Changed);
        assert_eq!(first[1].1, Outcome::Created);
        let manifest_before =
            std::fs::read(r.join(BACKUP_DIR).join("test/manifest.json")).expect("manifest");
        let second = apply(r, &p).expect("apply again");
        assert!(second.iter().all(|(_, o)| *o == Outcome::Unchanged));
        let manifest_after =
            std::fs::read(r.join(BACKUP_DIR).join("test/manifest.json")).expect("manifest");
        assert_eq!(manifest_before, manifest_after);
        let undone = undo(r, "test", false).expect("undo");
        assert_eq!(undone.len(), 2);
        assert_eq!(
            std::fs::read(r.join("etc/x/a.toml")).expect("read"),
            original
        );
        let mode = std::fs::metadata(r.join("etc/x/a.toml"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640);
        assert!(!r.join("etc/x/d").exists(), "created dirs are removed");
        assert!(!r.join(BACKUP_DIR).join("test").exists());
        assert!(undo(r, "test", false).expect("nothing to undo").is_empty());
    }

    #[test]
    fn undo_refuses_after_a_later_edit_unless_forced() {
        let root = tempfile::tempdir().expect("tempdir");
        let r = root.path();
        apply(r, &plan(&[("/etc/y.conf", "ours\n")])).expect("apply");
        std::fs::write(r.join("etc/y.conf"), "someone else's\n").expect("edit");
        let e = undo(r, "test", false).expect_err("refuses");
        assert!(e.to_string().contains("/etc/y.conf"), "{e}");
        assert!(r.join("etc/y.conf").exists(), "nothing restored");
        undo(r, "test", true).expect("forced");
        assert!(!r.join("etc/y.conf").exists());
    }

    #[test]
    fn paths_must_be_plain() {
        assert!(under(Path::new("/r"), Path::new("/etc/../x")).is_err());
        assert_eq!(
            under(Path::new("/r"), Path::new("/etc/x")).expect("plain"),
            PathBuf::from("/r/etc/x")
        );
    }
}
