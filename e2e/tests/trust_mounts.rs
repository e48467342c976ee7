//! A lazy mount serves whoever asked for it (a container's image, a control-socket user), and
//! the image's bootstrap — written by whoever pushed the image — names the blobs and chunks the
//! mount reads. These tests push such hostile images and check that a mount never becomes a
//! way to read a blob its own repository does not hold, nor to put bytes into the shared store.
//!
//! 1. The oracle: a bootstrap whose 256 one-byte files all point at byte 100 of a blob the node
//!    holds from *another* repository (file `gNNN` holds byte NNN; its chunk digest is that of
//!    the one byte). Before the fix exactly one read succeeded — the secret byte. Now none does:
//!    the origin does not serve that blob in the image's repository, and the store is not asked.
//! 3. The store's files: a data dir that other users may enter (a node started by hand, a
//!    `hostPath` the kubelet made 0755) is closed at start, so no local user reads a cached
//!    private blob from disk.
//! 2. The poison: another origin serves a Nydus image whose one file's chunk claims to be the
//!    first 4 KiB of a public layer P of the default registry, and sends its own bytes for that
//!    range — while not vouching for P (its `HEAD` of P in that repository says 404, as a
//!    registry does for a blob a repository does not hold). After the mount read those bytes, an
//!    anonymous client's range of P through the mirror must be P's true bytes. (An unlisted
//!    origin takes the same path — nothing it says is believed — but is reached over TLS only,
//!    which a test origin here cannot offer; this one is configured under a name.)

use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use serde_json::json;
use shoal_e2e::http::{self, sha256_digest};
use shoal_e2e::lazy::{self, Unmount};
use shoal_e2e::node::{Node, NodeOptions};
use shoal_e2e::registry::Registry;
use shoal_e2e::tarball::ustar;
use shoal_e2e::tiny::{respond, Flow, TinyServer};
use shoal_e2e::{run, Need, TestCtx};
use shoal_rafs::build::{build_layer, merge, BuildOptions};
use shoal_rafs::{Compressor, Digester};

const NEEDS: &[Need] = &[
    Need::Shoal,
    Need::Root,
    Need::Fuse,
    Need::Bin("docker-registry"),
];

/// Where in the secret blob the oracle reads.
const OFFSET: u64 = 100;

#[test]
fn mount_reads_no_foreign_blob() {
    run("mount_reads_no_foreign_blob", NEEDS, |t| {
        let registry = Registry::start(t)?;
        let secret: Vec<u8> = (0..65536u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let x = registry.push_blob("secret/app", secret.clone())?;
        let node = Node::start(t, &registry.url())?;
        // The node holds X (someone with access to secret/app pulled it).
        let got =
            http::fetch(http::client()?.get(format!("{}/v2/secret/app/blobs/{x}", node.url())))?;
        ensure!(
            got.status.as_u16() == 200 && got.body == secret,
            "pull of X: {}",
            got.short()
        );
        // The attacker's image, in a repository of its own, names X.
        let boot = oracle_bootstrap(t, &x)?;
        push_nydus(&registry, "evil/app", "1", &boot)?;
        let mnt = t.subdir("mnt")?;
        let _guard = Unmount(mnt.clone());
        mount(&node, &format!("{}/evil/app:1", registry.addr()), &mnt)?;
        let mut readable = Vec::new();
        for g in 0..256u32 {
            let path = mnt.join(format!("d/g{g:03}"));
            if let Ok(bytes) = std::fs::read(&path) {
                readable.push((g, bytes));
            }
        }
        let secret_byte = secret[OFFSET as usize];
        println!(
            "oracle: {} of 256 guesses readable (the secret byte is {secret_byte})",
            readable.len()
        );
        ensure!(
                readable.is_empty(),
                "the mount read bytes of a blob its repository does not hold: {:?} (secret byte {secret_byte})",
                readable.iter().map(|(g, _)| *g).collect::<Vec<_>>()
            );
        // The pad file names its own (absent) blob: the mount itself works.
        ensure!(mnt.join("d").is_dir(), "the image's tree is not mounted");
        umount(&node, &mnt)
    });
}

#[test]
fn mount_bytes_reach_no_client() {
    run("mount_bytes_reach_no_client", NEEDS, |t| {
        let registry = Registry::start(t)?;
        let public: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let p = registry.push_blob("public/app", public.clone())?;
        // The attacker's registry: a Nydus image whose file claims P's first 4 KiB, and its
        // own bytes for every range of P.
        let evil = b"EVIL-INJECTED-BYTES ".repeat(205)[..4096].to_vec();
        let boot = poison_bootstrap(t, &evil, &p, public.len() as u64)?;
        let origin = evil_origin(boot, p.clone(), evil.clone(), public.len() as u64)?;
        let node = Node::start_with(
            t,
            NodeOptions {
                host_upstreams: vec![("evil.test".into(), format!("http://{}", origin.addr()))],
                ..NodeOptions::upstream(&registry.url())
            },
        )?;
        let mnt = t.subdir("mnt")?;
        let _guard = Unmount(mnt.clone());
        mount(&node, "evil.test/evil:1", &mnt)?;
        let seen = std::fs::read(mnt.join("f")).context("reading the mount's file")?;
        ensure!(
            seen == evil,
            "the mount does not show its own origin's file"
        );
        // An anonymous client reads P by range through the mirror (its configured origin).
        let got = http::fetch(
            http::client()?
                .get(format!("{}/v2/public/app/blobs/{p}", node.url()))
                .header("Range", "bytes=0-63"),
        )?;
        ensure!(
            got.status.is_success() && got.body == public[..64],
            "the mirror served P's first bytes as {:?} ({})",
            String::from_utf8_lossy(&got.body),
            got.short()
        );
        let whole =
            http::fetch(http::client()?.get(format!("{}/v2/public/app/blobs/{p}", node.url())))?;
        ensure!(
            whole.status.as_u16() == 200 && sha256_digest(&whole.body) == p,
            "P whole: {}",
            whole.short()
        );
        umount(&node, &mnt)
    });
}

#[test]
fn no_local_user_reads_the_store_from_disk() {
    run("no_local_user_reads_the_store", NEEDS, |t| {
        let registry = Registry::start(t)?;
        let secret = b"a private layer's bytes ".repeat(1000);
        let x = registry.push_blob("secret/app", secret.clone())?;
        let data = t.subdir("open-data")?;
        std::fs::set_permissions(&data, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let node = Node::start_with(
            t,
            NodeOptions {
                data_dir: Some(data.clone()),
                ..NodeOptions::upstream(&registry.url())
            },
        )?;
        let got =
            http::fetch(http::client()?.get(format!("{}/v2/secret/app/blobs/{x}", node.url())))?;
        ensure!(got.body == secret, "pull: {}", got.short());
        let mode = std::os::unix::fs::MetadataExt::mode(&std::fs::metadata(&data)?) & 0o777;
        ensure!(mode == 0o700, "the data dir is {mode:o} after start");
        let file = node.blob_file(&x)?;
        ensure!(file.exists(), "no content file at {}", file.display());
        let out = std::process::Command::new("setpriv")
            .args([
                "--reuid",
                "65534",
                "--regid",
                "65534",
                "--clear-groups",
                "cat",
            ])
            .arg(&file)
            .output()?;
        ensure!(
            !out.status.success() && out.stdout.is_empty(),
            "nobody read the cached blob from disk"
        );
        Ok(())
    });
}

/// A bootstrap of `d/g000..g255` (one byte each: byte NNN) and a pad file, every chunk of the
/// one-byte files moved to `OFFSET` of blob `x`, and the blob itself renamed `x`.
fn oracle_bootstrap(t: &TestCtx, x: &str) -> Result<Vec<u8>> {
    let mut entries: Vec<(String, Option<Vec<u8>>)> = vec![("d".into(), None)];
    for g in 0..256u32 {
        entries.push((format!("d/g{g:03}"), Some(vec![g as u8])));
    }
    entries.push(("pad".into(), Some(b"padding of the oracle layer".to_vec())));
    let (mut boot, blob_id, _) = build(t, "oracle", &entries)?;
    let x_hex = x.trim_start_matches("sha256:");
    replace_all(&mut boot, blob_id.as_bytes(), x_hex.as_bytes())?;
    // Chunk entries (80 bytes): digest (32), blob index (u32 @32), compressed size (u32 @40),
    // uncompressed size (u32 @44), compressed offset (u64 @48).
    let mut patched = 0;
    for g in 0..=255u8 {
        let d = sha2_digest(&[g]);
        let mut from = 0;
        while let Some(j) = find(&boot[from..], &d).map(|j| j + from) {
            from = j + 1;
            let csize = u32::from_le_bytes(boot[j + 40..j + 44].try_into()?);
            let usize_ = u32::from_le_bytes(boot[j + 44..j + 48].try_into()?);
            if csize == 1 && usize_ == 1 {
                boot[j + 48..j + 56].copy_from_slice(&OFFSET.to_le_bytes());
                patched += 1;
            }
        }
    }
    ensure!(patched >= 256, "patched only {patched} chunk entries");
    Ok(boot)
}

/// A bootstrap of one 4 KiB file `f` holding `evil`, its blob renamed `p` with size `p_size`.
fn poison_bootstrap(t: &TestCtx, evil: &[u8], p: &str, p_size: u64) -> Result<Vec<u8>> {
    let entries = vec![("f".to_owned(), Some(evil.to_vec()))];
    let (mut boot, blob_id, blob_size) = build(t, "poison", &entries)?;
    let p_hex = p.trim_start_matches("sha256:");
    replace_all(&mut boot, blob_id.as_bytes(), p_hex.as_bytes())?;
    // The blob table entry (256 bytes) starts with the id; its compressed size (the blob's
    // size) is the u64 at 88.
    let size_at = |at: usize| {
        boot.get(at + 88..at + 96)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
    };
    let mut at = None;
    let mut from = 0;
    while let Some(j) = find(&boot[from..], p_hex.as_bytes()).map(|j| j + from) {
        if size_at(j) == Some(blob_size) {
            at = Some(j);
        }
        from = j + 1;
    }
    let k = at.context("the blob table entry")? + 88;
    boot[k..k + 8].copy_from_slice(&p_size.to_le_bytes());
    Ok(boot)
}

/// `shoal rafs`'s builder on a tar of `entries`, merged into an image bootstrap: its bytes and
/// the data blob's id.
fn build(
    t: &TestCtx,
    name: &str,
    entries: &[(String, Option<Vec<u8>>)],
) -> Result<(Vec<u8>, String, u64)> {
    let dir = t.subdir(name)?;
    let opts = BuildOptions {
        compressor: Compressor::None,
        digester: Digester::Sha256,
        chunk_size: 4096,
    };
    let out = build_layer(ustar(entries).as_slice(), &opts, &dir.join("layer"))?;
    let merged = dir.join("image.boot");
    merge(std::slice::from_ref(&out.bootstrap), &merged)?;
    Ok((std::fs::read(&merged)?, out.blob_id, out.blob_size))
}

fn sha2_digest(b: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(b).into()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn replace_all(buf: &mut [u8], from: &[u8], to: &[u8]) -> Result<()> {
    ensure!(from.len() == to.len(), "replacement of another length");
    let mut n = 0;
    let mut at = 0;
    while let Some(j) = find(&buf[at..], from).map(|j| j + at) {
        buf[j..j + to.len()].copy_from_slice(to);
        at = j + to.len();
        n += 1;
    }
    ensure!(n > 0, "nothing to replace");
    Ok(())
}

/// The Nydus image of `boot`: one bootstrap layer, no data layer (its manifest, config, layer).
fn nydus_image(boot: &[u8]) -> Result<(Vec<u8>, Vec<u8>, Vec<u8>)> {
    let tar = ustar(&[("image", None), ("image/image.boot", Some(boot.to_vec()))]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar)?;
    let layer = gz.finish()?;
    let config = serde_json::to_vec(&json!({
        "architecture": shoal_e2e::nydus::host_arch(), "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [sha256_digest(&tar)]}
    }))?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha256_digest(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": sha256_digest(&layer), "size": layer.len(),
                    "annotations": {"containerd.io/snapshot/nydus-bootstrap": "true",
                                    "containerd.io/snapshot/nydus-fs-version": "6"}}]
    }))?;
    Ok((manifest, config, layer))
}

fn push_nydus(registry: &Registry, repo: &str, tag: &str, boot: &[u8]) -> Result<()> {
    let (manifest, config, layer) = nydus_image(boot)?;
    registry.push_blob(repo, config)?;
    registry.push_blob(repo, layer)?;
    let put = registry.put_manifest(
        repo,
        tag,
        "application/vnd.oci.image.manifest.v1+json",
        manifest,
    )?;
    ensure!(put.status.as_u16() == 201, "manifest push: {}", put.short());
    Ok(())
}

/// An unlisted origin serving the Nydus image of `boot` as `evil:1`, and `evil` (zero-padded
/// to `p_size`) for any range of blob `p`.
fn evil_origin(boot: Vec<u8>, p: String, evil: Vec<u8>, p_size: u64) -> Result<TinyServer> {
    let (manifest, config, layer) = nydus_image(&boot)?;
    let (md, cd, ld) = (
        sha256_digest(&manifest),
        sha256_digest(&config),
        sha256_digest(&layer),
    );
    let mut fake = evil;
    fake.resize(p_size as usize, 0);
    TinyServer::start(Arc::new(move |req, out| {
        let path = req.path().to_owned();
        let mt = [
            ("Content-Type", "application/vnd.oci.image.manifest.v1+json"),
            ("Docker-Content-Digest", md.as_str()),
        ];
        if path == "/v2/" {
            respond(out, "200 OK", &[], b"{}", req.is_head())?;
        } else if path == "/v2/evil/manifests/1" || path == format!("/v2/evil/manifests/{md}") {
            respond(out, "200 OK", &mt, &manifest, req.is_head())?;
        } else if path == format!("/v2/evil/blobs/{cd}") {
            respond(out, "200 OK", &[], &config, req.is_head())?;
        } else if path == format!("/v2/evil/blobs/{ld}") {
            respond(out, "200 OK", &[], &layer, req.is_head())?;
        } else if path == format!("/v2/evil/blobs/{p}") && req.is_head() {
            respond(out, "404 Not Found", &[], b"{}", true)?;
        } else if path == format!("/v2/evil/blobs/{p}") {
            let (start, end) = req
                .header("Range")
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.split_once('-'))
                .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)))
                .unwrap_or((0, fake.len() - 1));
            let end = end.min(fake.len() - 1);
            let range = format!("bytes {start}-{end}/{}", fake.len());
            respond(
                out,
                "206 Partial Content",
                &[("Content-Range", range.as_str())],
                &fake[start..=end],
                req.is_head(),
            )?;
        } else {
            respond(out, "404 Not Found", &[], b"{}", req.is_head())?;
        }
        Ok(Flow::KeepAlive)
    }))
}

fn mount(node: &Node, image: &str, dir: &Path) -> Result<()> {
    lazy::mount(node, image, dir, &["--mode", "fuse"])
}

fn umount(node: &Node, dir: &Path) -> Result<()> {
    lazy::umount(node, dir)
}
