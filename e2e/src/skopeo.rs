//! skopeo as the client: push the fixture image into an origin, and copy an image from a registry
//! (the origin or a node's mirror port) into a fresh OCI layout for byte-for-byte comparison,
//! from this process's network namespace or from a test host's.
//!
//! Every call uses its own accept-anything policy file and never a user's auth file, so results
//! depend only on the flags given here.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};

use crate::fixture::OciLayout;
use crate::registry::{Creds, Registry};
use crate::TestCtx;

/// Which fixture ref `push_fixture` pushes.
pub const FIXTURE_REF: &str = "python";

/// What a skopeo run did.
#[derive(Debug)]
pub struct Outcome {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Pushes the fixture image (`oci:<debian-python>:python`) to `registry` as `image` (`repo:tag`).
pub fn push_fixture(t: &TestCtx, registry: &Registry, image: &str) -> Result<()> {
    push_fixture_ref(t, registry, FIXTURE_REF, image)
}

/// Pushes fixture ref `fixture_ref` (`base` or `python`) to `registry` as `image`.
pub fn push_fixture_ref(
    t: &TestCtx,
    registry: &Registry,
    fixture_ref: &str,
    image: &str,
) -> Result<()> {
    let layout = OciLayout::debian_python()?;
    let mut cmd = skopeo(t)?;
    cmd.arg("copy").arg("--dest-tls-verify=false");
    match registry.creds() {
        Some(c) => cmd.arg("--dest-creds").arg(c.colon()),
        None => cmd.arg("--dest-no-creds"),
    };
    cmd.arg(format!("oci:{}:{fixture_ref}", layout.dir().display()))
        .arg(format!("docker://{}/{image}", registry.addr()));
    let out = run(cmd)?;
    ensure!(
        out.success,
        "skopeo push of the fixture failed: {}",
        out.stderr
    );
    Ok(())
}

/// `skopeo copy docker://<host>/<image> oci:<fresh dir>` with optional source credentials; returns
/// the outcome and the layout dir (only meaningful on success).
pub fn copy_to_oci(
    t: &TestCtx,
    host: &str,
    image: &str,
    creds: Option<&Creds>,
) -> Result<(Outcome, PathBuf)> {
    let dest = t.subdir("skopeo-copy")?;
    let cmd = copy_command(t, None, host, image, creds, &dest)?;
    Ok((run(cmd)?, dest))
}

/// The command `skopeo copy --retry-times=0 docker://<host>/<image> oci:<dest>` (plain HTTP,
/// optional source credentials), run inside network namespace `netns` when given. Built here,
/// run by the caller (e.g. on another thread, see [`run_command`]).
pub fn copy_command(
    t: &TestCtx,
    netns: Option<&str>,
    host: &str,
    image: &str,
    creds: Option<&Creds>,
    dest: &Path,
) -> Result<Command> {
    let mut cmd = skopeo_in(t, netns)?;
    cmd.arg("copy")
        .arg("--src-tls-verify=false")
        .arg("--retry-times=0");
    match creds {
        Some(c) => cmd.arg("--src-creds").arg(c.colon()),
        None => cmd.arg("--src-no-creds"),
    };
    cmd.arg(format!("docker://{host}/{image}"))
        .arg(format!("oci:{}", dest.display()));
    Ok(cmd)
}

/// Runs a command built by [`copy_command`].
pub fn run_command(cmd: Command) -> Result<Outcome> {
    run(cmd)
}

fn skopeo(t: &TestCtx) -> Result<Command> {
    skopeo_in(t, None)
}

fn skopeo_in(t: &TestCtx, netns: Option<&str>) -> Result<Command> {
    let policy = policy_file(t.dir())?;
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "skopeo"]);
            c
        }
        None => Command::new("skopeo"),
    };
    cmd.arg("--policy").arg(policy);
    // Keep a user's ~/.docker/config.json or containers auth.json out of the picture.
    cmd.env("REGISTRY_AUTH_FILE", t.dir().join("no-auth.json"));
    cmd.env("XDG_RUNTIME_DIR", t.dir());
    cmd.env("HOME", t.dir());
    Ok(cmd)
}

fn policy_file(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("skopeo-policy.json");
    if !path.exists() {
        std::fs::write(&path, br#"{"default":[{"type":"insecureAcceptAnything"}]}"#)
            .context("writing the skopeo policy")?;
    }
    Ok(path)
}

fn run(mut cmd: Command) -> Result<Outcome> {
    let out = cmd.output().context("running skopeo")?;
    Ok(Outcome {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}
