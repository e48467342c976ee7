//! `shoal convert` end to end, with the real distribution registry as source and target.
//!
//! What is asserted: the Debian + python3 fixture converts into a Nydus image that a node
//! mounts with `shoal mount` and runs python3 from (root + FUSE, else that part says why it is
//! skipped); a second conversion — with the same work dir, and with an empty one — writes no
//! blob (the summary and the registry's own log agree) and names the same digest; an image
//! built on the fixture converted with `--chunk-dict` of the converted fixture stores only its
//! own layer's chunks (the ratio is printed) and mounts; bad input (a missing image, a
//! non-image artifact, a malformed reference, an unreachable registry, wrong source or target
//! credentials) ends with a clear message, a nonzero exit, and no target tag.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use shoal_e2e::lazy::Unmount;
use shoal_e2e::node::Node;
use shoal_e2e::registry::{Creds, Registry};
use shoal_e2e::tarball::ustar;
use shoal_e2e::wait::free_port;
use shoal_e2e::{http, paths, run, setup, skopeo, Need, TestCtx};

const NEEDS: &[Need] = &[
    Need::Bin("docker-registry"),
    Need::Bin("skopeo"),
    Need::Shoal,
];

/// Runs `shoal convert ARGS` with no user auth file in reach.
fn convert(t: &TestCtx, args: &[&str]) -> Result<Output> {
    Command::new(paths::shoal_bin()?)
        .arg("convert")
        .args(args)
        .env("HOME", t.dir())
        .env("XDG_RUNTIME_DIR", t.dir())
        .env_remove("REGISTRY_AUTH_FILE")
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("XDG_CACHE_HOME")
        .output()
        .context("running shoal convert")
}

/// A successful conversion's JSON summary.
fn convert_ok(t: &TestCtx, work: &Path, src: &str, dst: &str, extra: &[&str]) -> Result<Value> {
    let work = work.to_string_lossy();
    let mut args = vec!["--plain-http", "--json", "--work-dir", &work, src, dst];
    args.extend_from_slice(extra);
    let out = convert(t, &args)?;
    ensure!(
        out.status.success(),
        "shoal convert {src} {dst}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).context("convert --json output")
}

/// The target tag's status code (404 when it does not exist).
fn tag_status(registry: &Registry, repo: &str, tag: &str) -> Result<u16> {
    let url = format!("{}/v2/{repo}/manifests/{tag}", registry.url());
    let req = registry
        .authed(http::client()?.get(url))
        .header("Accept", setup::MANIFEST_ACCEPT);
    Ok(http::fetch(req)?.status.as_u16())
}

fn n(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(u64::MAX)
}

#[test]
fn converts_the_fixture_mounts_it_and_a_rerun_skips_every_blob() {
    let name = "converts_the_fixture_mounts_it_and_a_rerun_skips_every_blob";
    run(name, NEEDS, |t| {
        let registry = Registry::start(t)?;
        skopeo::push_fixture(t, &registry, setup::IMAGE)?;
        let src = format!("{}/{}", registry.addr(), setup::IMAGE);
        let dst = format!("{}/test/python:1-nydus", registry.addr());
        let work = t.subdir("work")?;
        let first = convert_ok(t, &work, &src, &dst, &[])?;
        println!("{name}: first run: {first}");
        ensure!(n(&first, "layers") == 2, "summary: {first}");
        ensure!(
            n(&first, "blobs_pushed") == 4,
            "2 data blobs, bootstrap, config: {first}"
        );
        ensure!(n(&first, "chunks") > 1000, "summary: {first}");

        // The tag names a Nydus image the node's own parser accepts.
        let got = http::fetch(
            http::client()?
                .get(format!(
                    "{}/v2/test/python/manifests/1-nydus",
                    registry.url()
                ))
                .header("Accept", setup::MANIFEST_ACCEPT),
        )?;
        ensure!(got.status.as_u16() == 200, "GET tag: {}", got.short());
        ensure!(
            got.digest() == first["digest"].as_str().unwrap_or_default(),
            "tag digest {} vs summary {first}",
            got.digest()
        );
        let manifest: Value = got.json()?;
        let layers = manifest["layers"].as_array().context("layers")?;
        ensure!(layers.len() == 3, "manifest: {manifest}");
        ensure!(
            layers[2]["annotations"]["containerd.io/snapshot/nydus-bootstrap"] == "true"
                && layers[0]["mediaType"] == "application/vnd.oci.image.layer.nydus.blob.v1",
            "manifest: {manifest}"
        );

        mount_and_run_python(t, &registry, &dst, name)?;

        // Again, same work dir: nothing built, nothing uploaded.
        let mark = registry.log()?.requests.len();
        let again = convert_ok(t, &work, &src, &dst, &[])?;
        ensure!(
            n(&again, "blobs_pushed") == 0
                && n(&again, "blobs_skipped") == 4
                && n(&again, "layers_cached") == 2,
            "rerun: {again}"
        );
        ensure!(again["digest"] == first["digest"], "rerun digest: {again}");
        let log = registry.log()?.since(mark);
        let uploads: Vec<_> = log
            .requests
            .iter()
            .filter(|r| r.uri.contains("/blobs/uploads/"))
            .collect();
        ensure!(uploads.is_empty(), "rerun uploaded: {uploads:?}");
        let heads = log.requests.iter().filter(|r| r.method == "HEAD").count();
        println!(
            "{name}: rerun: {} blobs skipped, {heads} HEADs and no upload in the registry log, {:.2}s",
            n(&again, "blobs_skipped"),
            again["seconds"].as_f64().unwrap_or_default()
        );

        // An empty work dir rebuilds the layers into the same bytes: still nothing uploaded.
        let fresh = convert_ok(t, &t.subdir("work2")?, &src, &dst, &[])?;
        ensure!(
            n(&fresh, "blobs_pushed") == 0 && fresh["digest"] == first["digest"],
            "rebuild from scratch: {fresh}"
        );
        println!("{name}: a rebuild from an empty work dir is byte-identical (all blobs skipped)");
        Ok(())
    });
}

/// `shoal mount` the converted image through a node and run python3 in a chroot of it.
fn mount_and_run_python(t: &TestCtx, registry: &Registry, image: &str, name: &str) -> Result<()> {
    if let Some(why) = mount_missing() {
        shoal_e2e::skip(&format!("{name} (the mount part)"), &why);
        return Ok(());
    }
    let node = Node::start(t, &registry.url())?;
    let mnt = t.subdir("mnt")?;
    let _guard = Unmount(mnt.clone());
    let control = node.control_path();
    let out = Command::new(paths::shoal_bin()?)
        .args(["mount", image])
        .arg(&mnt)
        .arg("--control")
        .arg(&control)
        .output()?;
    ensure!(
        out.status.success(),
        "shoal mount {image}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let py = Command::new("chroot")
        .arg(&mnt)
        .args(["python3", "-c", "import json; print(42)"])
        .output()?;
    ensure!(
        py.status.success() && String::from_utf8_lossy(&py.stdout).trim() == "42",
        "chroot python3: {} {} {}",
        py.status,
        String::from_utf8_lossy(&py.stdout),
        String::from_utf8_lossy(&py.stderr)
    );
    println!("{name}: shoal mount {image} → chroot python3 printed 42");
    let out = Command::new(paths::shoal_bin()?)
        .arg("umount")
        .arg(&mnt)
        .arg("--control")
        .arg(&control)
        .output()?;
    ensure!(out.status.success(), "shoal umount failed");
    Ok(())
}

fn mount_missing() -> Option<String> {
    if !shoal_e2e::ctx::is_root() {
        return Some("not root (FUSE mount and chroot need it)".into());
    }
    if paths::which("chroot").is_none() {
        return Some("no chroot on PATH".into());
    }
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        Ok(_) => None,
        Err(e) => Some(format!("cannot open /dev/fuse: {e}")),
    }
}

#[test]
fn chunk_dict_of_the_converted_base_reuses_its_chunks() {
    let name = "chunk_dict_of_the_converted_base_reuses_its_chunks";
    run(name, NEEDS, |t| {
        let registry = Registry::start(t)?;
        skopeo::push_fixture(t, &registry, setup::IMAGE)?;
        let layout = derived_layout(t)?;
        push_layout(t, &registry, &layout, "derived", "test/derived:1")?;
        let host = registry.addr();
        let work = t.subdir("work")?;
        let base = format!("{host}/test/python:nydus");
        convert_ok(t, &work, &format!("{host}/{}", setup::IMAGE), &base, &[])?;

        let dst = format!("{host}/test/derived:nydus");
        let with = convert_ok(
            t,
            &work,
            &format!("{host}/test/derived:1"),
            &dst,
            &["--chunk-dict", &base],
        )?;
        // Without the dictionary (after it: this run pushes the base's blobs into test/derived).
        let plain = convert_ok(
            t,
            &work,
            &format!("{host}/test/derived:1"),
            &format!("{host}/test/derived:nydus-plain"),
            &[],
        )?;
        let refs =
            n(&with, "chunks") + n(&with, "chunks_dedup_in_image") + n(&with, "chunks_from_dict");
        let ratio = n(&with, "chunks_from_dict") as f64 / refs as f64;
        println!(
            "{name}: with --chunk-dict: {} of {refs} chunk references ({:.1}%) reused from the base, {} chunks stored, \
             {} new data bytes (without the dictionary: {} chunks, {} bytes); {} dictionary blobs mounted",
            n(&with, "chunks_from_dict"),
            ratio * 100.0,
            n(&with, "chunks"),
            n(&with, "nydus_bytes"),
            n(&plain, "chunks"),
            n(&plain, "nydus_bytes"),
            n(&with, "blobs_mounted"),
        );
        ensure!(ratio > 0.95, "dictionary reuse {ratio}: {with}");
        ensure!(
            n(&with, "nydus_bytes") * 10 < n(&plain, "nydus_bytes"),
            "with the dictionary {with} vs without {plain}"
        );
        ensure!(
            n(&with, "blobs_mounted") == 2,
            "the base's 2 data blobs are mounted into test/derived: {with}"
        );
        mount_and_check_derived(t, &registry, &dst, name)
    });
}

const HELLO: &[u8] = b"print('hello from the derived layer')\n";

/// Mount the dictionary-converted image: its own file and the base's python both work.
fn mount_and_check_derived(
    t: &TestCtx,
    registry: &Registry,
    image: &str,
    name: &str,
) -> Result<()> {
    if let Some(why) = mount_missing() {
        shoal_e2e::skip(&format!("{name} (the mount part)"), &why);
        return Ok(());
    }
    let node = Node::start(t, &registry.url())?;
    let mnt = t.subdir("mnt")?;
    let _guard = Unmount(mnt.clone());
    let out = Command::new(paths::shoal_bin()?)
        .args(["mount", image])
        .arg(&mnt)
        .arg("--control")
        .arg(node.control_path())
        .output()?;
    ensure!(
        out.status.success(),
        "shoal mount {image}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        std::fs::read(mnt.join("app/extra/hello.py"))? == HELLO,
        "hello.py differs"
    );
    ensure!(
        std::fs::read(mnt.join("app/extra/data.bin"))? == pseudo_random(3 << 20),
        "data.bin differs"
    );
    let py = Command::new("chroot")
        .arg(&mnt)
        .args(["python3", "/app/extra/hello.py"])
        .output()?;
    ensure!(
        String::from_utf8_lossy(&py.stdout).trim() == "hello from the derived layer",
        "chroot python3: {} {}",
        String::from_utf8_lossy(&py.stdout),
        String::from_utf8_lossy(&py.stderr)
    );
    println!(
        "{name}: the dictionary-converted image mounts; python3 from the base runs its new file"
    );
    Ok(())
}

/// An OCI layout holding `derived`: the fixture's python image plus one uncompressed layer
/// with `/app/extra/hello.py` and 3 MiB of pseudo-random data.
fn derived_layout(t: &TestCtx) -> Result<PathBuf> {
    let fixture = paths::debian_python_layout();
    let dir = t.subdir("derived-layout")?;
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    for e in std::fs::read_dir(fixture.join("blobs/sha256"))? {
        let e = e?;
        std::os::unix::fs::symlink(e.path(), blobs.join(e.file_name()))?;
    }
    let put = |bytes: &[u8]| -> Result<String> {
        let d = http::sha256_digest(bytes);
        let path = blobs.join(d.trim_start_matches("sha256:"));
        if !path.exists() {
            std::fs::write(path, bytes)?;
        }
        Ok(d)
    };
    let layer = ustar(&[
        ("app/extra/", None),
        ("app/extra/hello.py", Some(HELLO.to_vec())),
        ("app/extra/data.bin", Some(pseudo_random(3 << 20))),
    ]);
    let layer_digest = put(&layer)?;
    let src = setup::fixture_image()?;
    let mut manifest: Value = serde_json::from_slice(&src.manifest)?;
    let mut config: Value = serde_json::from_slice(&std::fs::read(
        blobs.join(src.config.digest.trim_start_matches("sha256:")),
    )?)?;
    config["rootfs"]["diff_ids"]
        .as_array_mut()
        .context("diff_ids")?
        .push(json!(layer_digest));
    if let Some(h) = config["history"].as_array_mut() {
        h.push(json!({"created_by": "shoal e2e: add /app/extra"}));
    }
    let config_bytes = serde_json::to_vec(&config)?;
    let config_digest = put(&config_bytes)?;
    manifest["config"]["digest"] = json!(config_digest);
    manifest["config"]["size"] = json!(config_bytes.len());
    manifest["layers"].as_array_mut().context("layers")?.push(
        json!({"mediaType": "application/vnd.oci.image.layer.v1.tar",
                      "digest": layer_digest, "size": layer.len()}),
    );
    let manifest_bytes = serde_json::to_vec(&manifest)?;
    let manifest_digest = put(&manifest_bytes)?;
    let index = json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": manifest_digest, "size": manifest_bytes.len(),
        "annotations": {"org.opencontainers.image.ref.name": "derived"}}]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(dir)
}

/// `skopeo copy oci:LAYOUT:REF docker://REGISTRY/IMAGE`.
fn push_layout(
    t: &TestCtx,
    registry: &Registry,
    layout: &Path,
    r: &str,
    image: &str,
) -> Result<()> {
    let policy = t.dir().join("convert-policy.json");
    std::fs::write(
        &policy,
        br#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )?;
    let out = Command::new("skopeo")
        .arg("--policy")
        .arg(&policy)
        .env("REGISTRY_AUTH_FILE", t.dir().join("no-auth.json"))
        .env("HOME", t.dir())
        .args(["copy", "--dest-tls-verify=false", "--dest-no-creds"])
        .arg(format!("oci:{}:{r}", layout.display()))
        .arg(format!("docker://{}/{image}", registry.addr()))
        .output()?;
    ensure!(
        out.status.success(),
        "skopeo copy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Deterministic incompressible bytes (xorshift).
fn pseudo_random(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// What a failed conversion must look like: the exit code, a message naming the problem, and
/// no target tag.
fn expect_failure(
    t: &TestCtx,
    args: &[&str],
    code: i32,
    needle: &str,
    target: (&Registry, &str, &str),
) -> Result<String> {
    let out = convert(t, args)?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        out.status.code() == Some(code) && stderr.contains(needle),
        "shoal convert {args:?}: exit {:?} (wanted {code}), stderr lacks {needle:?}:\n{stderr}",
        out.status.code()
    );
    let (registry, repo, tag) = target;
    let status = tag_status(registry, repo, tag)?;
    ensure!(
        status == 404,
        "target {repo}:{tag} answers {status} after a failed conversion"
    );
    Ok(stderr.lines().next().unwrap_or_default().to_owned())
}

#[test]
fn bad_input_fails_clearly_and_leaves_no_target_tag() {
    let name = "bad_input_fails_clearly_and_leaves_no_target_tag";
    run(name, &[NEEDS, &[Need::Bin("htpasswd")]].concat(), |t| {
        let registry = Registry::start(t)?;
        let host = registry.addr();
        let work = t.subdir("work")?;
        let w = work.to_string_lossy().into_owned();
        let target = (&registry, "test/out", "1");
        let dst = format!("{host}/test/out:1");
        let base = ["--plain-http", "--work-dir", &w];
        let with = |extra: &[&str]| -> Vec<String> {
            base.iter().chain(extra).map(|s| s.to_string()).collect()
        };

        let missing = with(&[&format!("{host}/test/nothing:1"), &dst]);
        let msg = expect_failure(t, &args(&missing), 1, "does not exist", target)?;
        println!("{name}: missing image → {msg}");

        // An OCI artifact (not an image) under a tag.
        let blob = registry.push_blob("test/artifact", b"{}".to_vec())?;
        let artifact = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": "application/vnd.example.sbom",
            "config": {"mediaType": "application/vnd.example.sbom.config.v1+json", "digest": blob, "size": 2},
            "layers": [{"mediaType": "application/vnd.example.sbom.v1+json", "digest": blob, "size": 2}]}))?;
        let put = registry.put_manifest(
            "test/artifact",
            "1",
            "application/vnd.oci.image.manifest.v1+json",
            artifact,
        )?;
        ensure!(put.status.as_u16() == 201, "artifact PUT: {}", put.short());
        let art = with(&[&format!("{host}/test/artifact:1"), &dst]);
        let msg = expect_failure(t, &args(&art), 1, "is not a container image", target)?;
        println!("{name}: artifact → {msg}");

        let bad_ref = with(&["Not A/Reference!", &dst]);
        let msg = expect_failure(t, &args(&bad_ref), 2, "image reference", target)?;
        println!("{name}: malformed reference → {msg}");

        let dead = format!("127.0.0.1:{}", free_port()?);
        let unreachable = with(&[&format!("{dead}/test/python:1"), &dst]);
        let msg = expect_failure(t, &args(&unreachable), 3, "cannot reach registry", target)?;
        println!("{name}: unreachable source → {msg}");

        // Wrong source credentials: an htpasswd registry holding the fixture.
        let (private, _) = setup::private_origin(t, "alice", "right")?;
        let phost = private.addr();
        let pdst = format!("{phost}/test/out:1");
        let ptarget = (&private, "test/out", "1");
        let wrong = with(&[
            &format!("{phost}/{}", setup::IMAGE),
            &pdst,
            "--src-creds",
            "alice:wrong",
            "--dest-creds",
            "alice:right",
        ]);
        let msg = expect_failure(t, &args(&wrong), 1, "refused the credentials", ptarget)?;
        println!("{name}: wrong source credentials → {msg}");
        let none = with(&[&format!("{phost}/{}", setup::IMAGE), &dst]);
        let msg = expect_failure(t, &args(&none), 1, "needs credentials", target)?;
        println!("{name}: no source credentials → {msg}");

        // Wrong target credentials: refused before any layer is converted.
        let wrong_dst = with(&[
            &format!("{phost}/{}", setup::IMAGE),
            &pdst,
            "--src-creds",
            "alice:right",
            "--dest-creds",
            "alice:nope",
        ]);
        let msg = expect_failure(t, &args(&wrong_dst), 1, "refused the credentials", ptarget)?;
        println!("{name}: wrong target credentials → {msg}");
        ensure!(
            !work.join("layers").exists(),
            "a layer was converted although the target refused the credentials"
        );

        // Right credentials from an auth file (as `docker login` writes it) work.
        let authfile = t.dir().join("auth.json");
        let b64 = http_basic(&Creds::new("alice", "right"));
        std::fs::write(
            &authfile,
            serde_json::to_vec(&json!({"auths": {phost.clone(): {"auth": b64}}}))?,
        )?;
        let af = authfile.to_string_lossy().into_owned();
        let ok = convert(
            t,
            &args(&with(&[
                &format!("{phost}/{}", setup::IMAGE),
                &pdst,
                "--authfile",
                &af,
            ])),
        )?;
        ensure!(
            ok.status.success(),
            "convert with an auth file: {}",
            String::from_utf8_lossy(&ok.stderr)
        );
        ensure!(
            tag_status(&private, "test/out", "1")? == 200,
            "no target tag"
        );
        println!("{name}: with credentials from an auth file the private image converts");
        Ok(())
    });
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn http_basic(c: &Creds) -> String {
    // base64 without a dependency: the e2e crate has none.
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let input = c.colon().into_bytes();
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let v = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(v >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn an_interrupted_conversion_resumes_and_an_index_stays_an_index() {
    let name = "an_interrupted_conversion_resumes_and_an_index_stays_an_index";
    run(name, NEEDS, |t| {
        let origin = Registry::start(t)?;
        skopeo::push_fixture(t, &origin, setup::IMAGE)?;
        // The source as a one-platform image index.
        let manifest = setup::fixture_image()?;
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{"mediaType": manifest.manifest_media_type, "digest": manifest.manifest_digest,
                           "size": manifest.manifest.len(),
                           "platform": {"os": "linux", "architecture": "amd64"}}]}))?;
        let put = origin.put_manifest(
            setup::REPO,
            "multi",
            "application/vnd.oci.image.index.v1+json",
            index,
        )?;
        ensure!(put.status.as_u16() == 201, "index PUT: {}", put.short());
        let src = format!("{}/{}:multi", origin.addr(), setup::REPO);
        let mut target = Registry::start(t)?;
        let dst = format!("{}/test/python:nydus", target.addr());
        let work = t.subdir("work")?;

        // Take the target down as soon as the first layer is converted.
        let w = work.to_string_lossy().into_owned();
        let child = Command::new(paths::shoal_bin()?)
            .args([
                "convert",
                "--plain-http",
                "--json",
                "--work-dir",
                &w,
                &src,
                &dst,
            ])
            .env("HOME", t.dir())
            .env_remove("REGISTRY_AUTH_FILE")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        shoal_e2e::wait::poll(
            "a first converted layer in the work dir",
            std::time::Duration::from_secs(120),
            || {
                let done = std::fs::read_dir(work.join("layers"))
                    .map(|d| d.flatten().any(|e| e.path().join("done.json").is_file()))
                    .unwrap_or(false);
                Ok(done.then_some(()))
            },
        )?;
        target.stop()?;
        let out = child.wait_with_output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(3) && stderr.contains("cannot reach registry"),
            "convert with the target gone: {} {stderr}",
            out.status
        );
        println!(
            "{name}: target stopped mid-run → {}",
            stderr.lines().rev().nth(1).unwrap_or_default()
        );
        target.start_again()?;
        ensure!(
            tag_status(&target, "test/python", "nydus")? == 404,
            "the tag exists after a failed run"
        );

        let again = convert_ok(t, &work, &src, &dst, &[])?;
        ensure!(n(&again, "layers_cached") >= 1, "nothing reused: {again}");
        println!(
            "{name}: rerun reused {} converted layer(s), pushed {} blobs, skipped {}",
            n(&again, "layers_cached"),
            n(&again, "blobs_pushed"),
            n(&again, "blobs_skipped")
        );
        let got = http::fetch(
            http::client()?
                .get(format!("{}/v2/test/python/manifests/nydus", target.url()))
                .header("Accept", setup::MANIFEST_ACCEPT),
        )?;
        let top: Value = got.json()?;
        ensure!(
            top["mediaType"] == "application/vnd.oci.image.index.v1+json"
                && top["manifests"][0]["platform"]["architecture"] == "amd64",
            "target is not an index: {top}"
        );
        let inner = top["manifests"][0]["digest"].as_str().context("digest")?;
        let got = http::fetch(
            http::client()?
                .get(format!("{}/v2/test/python/manifests/{inner}", target.url()))
                .header("Accept", setup::MANIFEST_ACCEPT),
        )?;
        ensure!(
            got.status.as_u16() == 200,
            "platform manifest: {}",
            got.short()
        );
        println!("{name}: an index source gives an index target ({inner} for linux/amd64)");
        Ok(())
    });
}
