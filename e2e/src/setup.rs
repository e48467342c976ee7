//! Common scenery for the mirror tests: an origin holding the fixture image, the names it is pushed
//! under, and small helpers (corrupting one byte of a file in place, OCI `Accept` headers).

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{Context, Result};

use crate::fixture::{Image, OciLayout};
use crate::registry::Registry;
use crate::{skopeo, TestCtx};

/// Repository the fixture is pushed to.
pub const REPO: &str = "test/python";
/// Tag it is pushed under.
pub const TAG: &str = "1";
/// `REPO:TAG`.
pub const IMAGE: &str = "test/python:1";
/// The `Accept` header of a client that takes OCI and Docker manifests and indexes.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
    application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.docker.distribution.manifest.list.v2+json";

/// An anonymous origin holding the fixture as [`IMAGE`]; returns it with the expected image.
pub fn anonymous_origin(t: &TestCtx) -> Result<(Registry, Image)> {
    let registry = Registry::start(t)?;
    skopeo::push_fixture(t, &registry, IMAGE)?;
    Ok((registry, fixture_image()?))
}

/// An htpasswd origin (`user`/`pass`) holding the fixture as [`IMAGE`].
pub fn private_origin(t: &TestCtx, user: &str, pass: &str) -> Result<(Registry, Image)> {
    let registry = Registry::start_htpasswd(t, user, pass)?;
    skopeo::push_fixture(t, &registry, IMAGE)?;
    Ok((registry, fixture_image()?))
}

/// The fixture image pushed by [`skopeo::push_fixture`].
pub fn fixture_image() -> Result<Image> {
    OciLayout::debian_python()?.image(skopeo::FIXTURE_REF)
}

/// Flips every bit of the byte at `offset` in `path` (same length); returns the original byte.
pub fn flip_byte(path: &Path, offset: u64) -> Result<u8> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {} to corrupt it", path.display()))?;
    let mut byte = [0u8; 1];
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(&mut byte)?;
    let original = byte[0];
    file.seek(SeekFrom::Start(offset))?;
    file.write_all(&[!original])?;
    file.sync_all()?;
    Ok(original)
}

/// Writes `byte` back at `offset` in `path`.
pub fn write_byte(path: &Path, offset: u64, byte: u8) -> Result<()> {
    let mut file = std::fs::OpenOptions::new().write(true).open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    file.write_all(&[byte])?;
    file.sync_all()?;
    Ok(())
}
