//! Where things are: the shared fixtures, the `shoal` binary under test, and tools on `PATH`.
//!
//! Overrides: `SHOAL_FIXTURES` (fixtures root), `SHOAL_BIN` (the node binary), `CARGO_TARGET_DIR`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// Root of the shared fixtures (`…/shared/fixtures`), overridable with `SHOAL_FIXTURES`.
pub fn fixtures_dir() -> PathBuf {
    match std::env::var_os("SHOAL_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/fixtures"
        )),
    }
}

/// The two-layer Debian + python OCI layout (refs `base` and `python`).
pub fn debian_python_layout() -> PathBuf {
    fixtures_dir().join("oci/debian-python")
}

/// The `shoal` binary: `SHOAL_BIN`, else `<target dir>/debug/shoal`. Errors with what to run when
/// it is missing: the e2e tests never build the node themselves.
pub fn shoal_bin() -> Result<PathBuf> {
    let candidates = shoal_bin_candidates();
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    let tried: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    bail!(
        "the shoal binary is missing (tried {}): run `cargo build -p shoal-node` first, \
         or point SHOAL_BIN at it",
        tried.join(", ")
    )
}

/// Which build of the node the runners measure, for their machine lines: the cargo profile
/// named by the binary's directory (`debug` is the dev profile: our code at opt-level 1).
pub fn shoal_build() -> String {
    let Ok(bin) = shoal_bin() else {
        return "node binary missing".into();
    };
    match bin
        .parent()
        .and_then(Path::file_name)
        .and_then(|d| d.to_str())
    {
        Some("debug") => "node built in the dev profile (our code at opt-level 1)".into(),
        Some(profile @ ("release" | "dist")) => format!("node built in the {profile} profile"),
        _ => format!("node binary {}", bin.display()),
    }
}

/// Finds `name` on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn shoal_bin_candidates() -> Vec<PathBuf> {
    if let Some(bin) = std::env::var_os("SHOAL_BIN") {
        return vec![PathBuf::from(bin)];
    }
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")),
    };
    let mut candidates = vec![target.join("debug/shoal")];
    // A test binary lives in `<target>/debug/deps/`; its grandparent is the profile dir even when
    // the target dir was moved by a config file rather than the environment.
    if let Ok(exe) = std::env::current_exe() {
        if let Some(profile_dir) = exe.parent().and_then(Path::parent) {
            candidates.push(profile_dir.join("shoal"));
        }
    }
    candidates
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}
