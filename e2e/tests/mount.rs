//! Lazy mounts end to end: a two-layer Debian + python3 image built with our RAFS builder, pushed
//! to a real registry in Nydus form, mounted through a real node with `shoal mount`, in both modes
//! (FUSE, and kernel EROFS over the node's on-demand blob files) — each scenario is one function
//! run as a test per mode.
//!
//! What is asserted: python3 runs in a chroot of the mount; the mounted tree equals `umoci unpack`
//! of the source image (the fixtures' `listing.py` on both: types, modes, owners, sizes, link
//! targets, xattrs, content sha256); the origin's own log shows only a fraction of the data blobs
//! fetched for the python run; a SIGKILLed node makes reads fail, and a restarted node brings
//! the mount back; a chunk corrupted at the origin gives EIO and is not cached.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use shoal_e2e::lazy::{missing, Mode, Unmount};
use shoal_e2e::node::Node;
use shoal_e2e::nydus::{self, NydusImage};
use shoal_e2e::registry::Registry;
use shoal_e2e::wait::poll;
use shoal_e2e::{paths, run, setup, Need, TestCtx};

const NEEDS: &[Need] = &[
    Need::Root,
    Need::Bin("docker-registry"),
    Need::Bin("chroot"),
    Need::Shoal,
];
const REPO: &str = "test/nydus-python";
const PYTHON: &str = "/usr/bin/python3.11";

/// Everything a mount test starts with: origin with the Nydus image, a node, an empty mount point.
struct Scene {
    registry: Registry,
    image: NydusImage,
    node: Node,
    mnt: PathBuf,
    reference: String,
    _guard: Unmount,
}

fn scene(t: &TestCtx) -> Result<Scene> {
    let registry = Registry::start(t)?;
    let work = t.subdir("nydus-build")?;
    let image = nydus::build_and_push(
        &registry,
        &paths::debian_python_layout(),
        "python",
        REPO,
        "1",
        &work,
    )?;
    let node = Node::start(t, &registry.url())?;
    let mnt = t.subdir("mnt")?;
    let reference = format!("{}/{REPO}:1", registry.addr());
    Ok(Scene {
        registry,
        image,
        node,
        _guard: Unmount(mnt.clone()),
        mnt,
        reference,
    })
}

fn shoal(args: &[&str]) -> Result<Output> {
    let out = Command::new(paths::shoal_bin()?)
        .args(args)
        .output()
        .context("running shoal")?;
    Ok(out)
}

fn shoal_ok(args: &[&str]) -> Result<String> {
    let out = shoal(args)?;
    ensure!(
        out.status.success(),
        "shoal {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn mount(s: &Scene, mode: Mode) -> Result<()> {
    let mnt = s.mnt.to_string_lossy();
    let control = s.node.control_path();
    let control = control.to_string_lossy();
    shoal_ok(&[
        "mount",
        &s.reference,
        &mnt,
        "--mode",
        mode.arg(),
        "--control",
        &control,
    ])?;
    ensure!(is_shoal_mount(&s.mnt), "no {} mount at {mnt}", mode.arg());
    Ok(())
}

/// Whether `dir` holds a shoal mount: FUSE (`fuse.shoal`) or kernel EROFS.
fn is_shoal_mount(dir: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let dir = dir.to_string_lossy();
    info.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        f.get(4) == Some(&dir.as_ref()) && (l.contains(" - fuse.shoal ") || l.contains(" - erofs "))
    })
}

/// Body bytes the origin sent for the image's data blobs since log entry `since`.
fn data_bytes_from_origin(s: &Scene, since: usize) -> Result<u64> {
    let log = s.registry.log()?.since(since);
    Ok(s.image
        .blobs
        .iter()
        .flat_map(|(d, _)| log.blob_requests(d))
        .filter(|r| r.is_blob_fetch())
        .map(|r| r.written)
        .sum())
}

fn mounts_json(s: &Scene) -> Result<serde_json::Value> {
    let control = s.node.control_path();
    Ok(serde_json::from_str(&shoal_ok(&[
        "mounts",
        "--json",
        "--control",
        &control.to_string_lossy(),
    ])?)?)
}

fn listing(dir: &Path) -> Result<Vec<String>> {
    let script = paths::fixtures_dir().join("nydus/source/listing.py");
    let out = Command::new("python3").arg(script).arg(dir).output()?;
    ensure!(
        out.status.success(),
        "listing.py {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?
        .lines()
        .map(str::to_owned)
        .collect())
}

fn umoci_rootfs(t: &TestCtx) -> Result<PathBuf> {
    let bundle = t.dir().join("bundle");
    let mut image = paths::debian_python_layout().into_os_string();
    image.push(":python");
    let st = Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(image)
        .arg(&bundle)
        .status()?;
    ensure!(st.success(), "umoci unpack failed");
    Ok(bundle.join("rootfs"))
}

#[test]
fn fuse_mount_runs_python_and_equals_the_oci_unpack() {
    runs_python_and_equals_the_oci_unpack(
        "fuse_mount_runs_python_and_equals_the_oci_unpack",
        Mode::Fuse,
    );
}

#[test]
fn erofs_mount_runs_python_and_equals_the_oci_unpack() {
    runs_python_and_equals_the_oci_unpack(
        "erofs_mount_runs_python_and_equals_the_oci_unpack",
        Mode::Erofs,
    );
}

fn runs_python_and_equals_the_oci_unpack(name: &str, mode: Mode) {
    if let Some(why) = missing(mode) {
        shoal_e2e::skip(name, &why);
        return;
    }
    let needs = [NEEDS, &[Need::Bin("umoci"), Need::Bin("python3")]].concat();
    run(name, &needs, |t| {
        let s = scene(t)?;
        let mark = s.registry.log()?.requests.len();
        mount(&s, mode)?;
        let out = Command::new("chroot")
            .arg(&s.mnt)
            .args(["python3", "-c", "import json; print(42)"])
            .output()?;
        ensure!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "42",
            "chroot python3: {} {} {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let fetched = data_bytes_from_origin(&s, mark)?;
        let total = s.image.data_bytes();
        println!(
            "{name}: python3 -c 'import json' fetched {fetched} of {total} data-blob bytes from the origin ({:.1}%), bootstrap layer {} bytes",
            fetched as f64 * 100.0 / total as f64,
            s.image.bootstrap_layer.1
        );
        ensure!(
            fetched > 0 && fetched * 4 < total,
            "fetched {fetched} of {total} bytes: not lazy"
        );
        let m = mounts_json(&s)?;
        let entry = &m["mounts"][0];
        ensure!(
            entry["state"] == "mounted" && entry["mode"] == mode.arg(),
            "mounts: {m}"
        );
        let st = &entry["stats"];
        ensure!(
            st["read_bytes"].as_u64() > Some(0) && st["source"]["origin_bytes"].as_u64() > Some(0),
            "mount stats: {st}"
        );
        println!(
            "{name}: shoal mounts: {}",
            shoal_ok(&[
                "mounts",
                "--control",
                &s.node.control_path().to_string_lossy()
            ])?
        );
        let metrics = shoal_e2e::http::client()?
            .get(format!("http://{}/metrics", s.node.admin_addr()))
            .send()?
            .text()?;
        let labels = format!(
            "mount=\"{}\",image=\"{}\",mode=\"{}\"",
            s.mnt.display(),
            s.reference,
            mode.arg()
        );
        for series in [
            format!("shoal_mount_read_bytes_total{{{labels}}} "),
            format!("shoal_mount_fetched_bytes_total{{{labels},source=\"origin\"}} "),
            format!("shoal_mount_read_latency_seconds_count{{{labels}}} "),
        ] {
            ensure!(metrics.contains(&series), "no {series} in /metrics");
        }

        let expected = listing(&umoci_rootfs(t)?)?;
        let actual = listing(&s.mnt)?;
        let diffs: Vec<_> = expected
            .iter()
            .zip(&actual)
            .filter(|(e, a)| e != a)
            .take(10)
            .collect();
        ensure!(
            diffs.is_empty() && expected.len() == actual.len(),
            "mounted tree differs from umoci unpack ({} vs {} entries): {diffs:#?}",
            actual.len(),
            expected.len()
        );
        println!(
            "{name}: mounted tree equals umoci unpack ({} entries)",
            expected.len()
        );

        let mnt = s.mnt.to_string_lossy();
        shoal_ok(&[
            "umount",
            &mnt,
            "--control",
            &s.node.control_path().to_string_lossy(),
        ])?;
        ensure!(!is_shoal_mount(&s.mnt), "still mounted after umount");
        ensure!(
            mounts_json(&s)?["mounts"]
                .as_array()
                .is_some_and(Vec::is_empty),
            "mount still listed"
        );
        Ok(())
    });
}

#[test]
fn killed_node_fails_reads_and_restart_restores_the_mount() {
    killed_node_fails_reads_and_restart_restores(
        "killed_node_fails_reads_and_restart_restores_the_mount",
        Mode::Fuse,
    );
}

#[test]
fn erofs_killed_node_fails_reads_and_restart_restores_the_mount() {
    killed_node_fails_reads_and_restart_restores(
        "erofs_killed_node_fails_reads_and_restart_restores_the_mount",
        Mode::Erofs,
    );
}

fn killed_node_fails_reads_and_restart_restores(name: &str, mode: Mode) {
    if let Some(why) = missing(mode) {
        shoal_e2e::skip(name, &why);
        return;
    }
    run(name, NEEDS, |t| {
        let mut s = scene(t)?;
        mount(&s, mode)?;
        let os_release = std::fs::read(s.mnt.join("usr/lib/os-release"))?;
        ensure!(
            os_release == s.image.file_bytes("/usr/lib/os-release")?,
            "os-release differs"
        );

        s.node.kill()?;
        match std::fs::read(s.mnt.join(PYTHON.trim_start_matches('/'))) {
            Ok(b) => bail!("read {} bytes from a mount whose node is dead", b.len()),
            Err(e) => println!("{name}: read with the node dead fails: {e}"),
        }

        s.node.restart()?;
        let expected = s.image.file_bytes(PYTHON)?;
        let path = s.mnt.join(PYTHON.trim_start_matches('/'));
        let got = poll("the mount to come back", Duration::from_secs(60), || {
            if !is_shoal_mount(&s.mnt) {
                return Ok(None);
            }
            Ok(std::fs::read(&path).ok())
        })?;
        ensure!(got == expected, "{PYTHON} differs after the restart");
        let m = mounts_json(&s)?;
        ensure!(m["mounts"][0]["state"] == "mounted", "mounts: {m}");
        let metrics = shoal_e2e::http::client()?
            .get(format!("http://{}/metrics", s.node.admin_addr()))
            .send()?
            .text()?;
        ensure!(
            metrics.contains("shoal_mount_chunk_bytes_total{kind=\"origin\"}"),
            "no mount metrics in /metrics"
        );

        // A graceful stop unmounts; the next start mounts again.
        s.node.terminate()?;
        ensure!(!is_shoal_mount(&s.mnt), "still mounted after SIGTERM");
        s.node.restart()?;
        poll(
            "the mount after a clean restart",
            Duration::from_secs(60),
            || Ok(is_shoal_mount(&s.mnt).then_some(())),
        )?;
        ensure!(
            std::fs::read(s.mnt.join("usr/lib/os-release"))? == os_release,
            "os-release differs after a clean restart"
        );
        Ok(())
    });
}

#[test]
fn corrupted_origin_chunk_gives_eio_and_is_not_cached() {
    corrupted_origin_chunk_gives_eio(
        "corrupted_origin_chunk_gives_eio_and_is_not_cached",
        Mode::Fuse,
    );
}

#[test]
fn erofs_corrupted_origin_chunk_gives_eio_and_is_not_cached() {
    corrupted_origin_chunk_gives_eio(
        "erofs_corrupted_origin_chunk_gives_eio_and_is_not_cached",
        Mode::Erofs,
    );
}

fn corrupted_origin_chunk_gives_eio(name: &str, mode: Mode) {
    if let Some(why) = missing(mode) {
        shoal_e2e::skip(name, &why);
        return;
    }
    run(name, NEEDS, |t| {
        let s = scene(t)?;
        let (blob, chunk) = s.image.first_chunk(PYTHON)?;
        let at = chunk.compressed_offset + u64::from(chunk.compressed_size) / 2;
        let origin_file = s.registry.blob_path(&blob)?;
        let original = setup::flip_byte(&origin_file, at)?;
        mount(&s, mode)?;
        let path = s.mnt.join(PYTHON.trim_start_matches('/'));
        for attempt in 0..2 {
            let mark = s.registry.log()?.requests.len();
            match std::fs::read(&path) {
                Ok(b) => bail!("read {} bytes of a file with a corrupted chunk", b.len()),
                Err(e) => ensure!(
                    e.raw_os_error() == Some(5),
                    "attempt {attempt}: expected EIO, got {e}"
                ),
            }
            // The registry logs a response once its handler returns, which can be a moment after
            // the node had every byte it needed (and failed the read): wait for the line.
            poll(
                &format!("attempt {attempt}: the bad chunk fetched again (not cached)"),
                Duration::from_secs(10),
                || {
                    let log = s.registry.log()?.since(mark);
                    Ok(log
                        .blob_requests(&blob)
                        .iter()
                        .any(|r| r.is_blob_fetch())
                        .then_some(()))
                },
            )?;
        }
        // The node's copy of the blob does not hold the corrupted bytes.
        let range = chunk.compressed_offset as usize
            ..(chunk.compressed_offset + u64::from(chunk.compressed_size)) as usize;
        let bad = std::fs::read(&origin_file)?[range.clone()].to_vec();
        if let Ok(held) = std::fs::read(s.node.blob_file(&blob)?) {
            ensure!(
                held.get(range.clone()) != Some(&bad[..]),
                "the node kept the corrupted chunk"
            );
        }
        setup::write_byte(&origin_file, at, original)?;
        let got = std::fs::read(&path)?;
        ensure!(
            got == s.image.file_bytes(PYTHON)?,
            "{PYTHON} differs after repair"
        );
        println!("{name}: corrupted chunk → EIO twice, correct bytes once repaired");
        Ok(())
    });
}

#[test]
fn plain_oci_image_is_refused_with_how_to_convert() {
    let name = "plain_oci_image_is_refused_with_how_to_convert";
    run(name, &[NEEDS, &[Need::Bin("skopeo")]].concat(), |t| {
        let s = scene(t)?;
        shoal_e2e::skopeo::push_fixture(t, &s.registry, setup::IMAGE)?;
        let reference = format!("{}/{}", s.registry.addr(), setup::IMAGE);
        let mnt = s.mnt.to_string_lossy();
        let control = s.node.control_path();
        let out = shoal(&[
            "mount",
            &reference,
            &mnt,
            "--control",
            &control.to_string_lossy(),
        ])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(1) && stderr.contains("shoal convert"),
            "shoal mount of a plain OCI image: {} {stderr}",
            out.status
        );
        ensure!(!is_shoal_mount(&s.mnt), "mounted anyway");
        println!("{name}: {}", stderr.trim());
        Ok(())
    });
}

fn python_in_chroot(s: &Scene) -> Result<()> {
    let out = Command::new("chroot")
        .arg(&s.mnt)
        .args(["python3", "-c", "import json; print(42)"])
        .output()?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "42",
        "chroot python3: {} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn learned_access_list_prefetches_what_the_first_run_read() {
    learned_access_list_prefetches(
        "learned_access_list_prefetches_what_the_first_run_read",
        Mode::Fuse,
    );
}

#[test]
fn erofs_learned_access_list_prefetches_what_the_first_run_read() {
    learned_access_list_prefetches(
        "erofs_learned_access_list_prefetches_what_the_first_run_read",
        Mode::Erofs,
    );
}

/// First run of the image records which chunks it read; the node keeps that list across a wipe
/// of its store; a later mount of the same image prefetches them, after which the same program
/// fetches (almost) nothing on demand.
fn learned_access_list_prefetches(name: &str, mode: Mode) {
    if let Some(why) = missing(mode) {
        shoal_e2e::skip(name, &why);
        return;
    }
    run(name, NEEDS, |t| {
        let mut s = scene(t)?;
        let mnt = s.mnt.to_string_lossy().into_owned();
        let mark = s.registry.log()?.requests.len();
        mount(&s, mode)?;
        python_in_chroot(&s)?;
        let first = data_bytes_from_origin(&s, mark)?;
        let m = mounts_json(&s)?;
        ensure!(
            m["mounts"][0]["stats"]["prefetch"]["recording"] == true,
            "first mount does not record: {m}"
        );
        shoal_ok(&[
            "umount",
            &mnt,
            "--control",
            &s.node.control_path().to_string_lossy(),
        ])?;
        let access = s.node.data_dir().join("access");
        let list = poll("the access list", Duration::from_secs(30), || {
            let Ok(dir) = std::fs::read_dir(&access) else {
                return Ok(None);
            };
            let files: Vec<_> = dir
                .filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                .collect();
            Ok(files.first().map(|f| f.path()))
        })?;
        let recorded: serde_json::Value = serde_json::from_slice(&std::fs::read(&list)?)?;
        let n = recorded["chunks"].as_array().map_or(0, Vec::len);
        ensure!(n > 0, "empty access list {}", list.display());

        // A fresh store: everything but the access lists goes.
        s.node.terminate()?;
        for e in std::fs::read_dir(s.node.data_dir())? {
            let p = e?.path();
            if p != access {
                if p.is_dir() {
                    std::fs::remove_dir_all(&p)?;
                } else {
                    std::fs::remove_file(&p)?;
                }
            }
        }
        s.node.restart()?;

        let mark = s.registry.log()?.requests.len();
        let started = std::time::Instant::now();
        mount(&s, mode)?;
        let done = poll("the prefetch", Duration::from_secs(120), || {
            let m = mounts_json(&s)?;
            let p = m["mounts"][0]["stats"]["prefetch"].clone();
            Ok((p["state"] == "done").then_some(p))
        })?;
        let took = started.elapsed();
        let prefetched = data_bytes_from_origin(&s, mark)?;
        ensure!(
            done["failed"] == 0 && done["planned"].as_u64() == Some(n as u64),
            "prefetch: {done}"
        );
        let mark = s.registry.log()?.requests.len();
        python_in_chroot(&s)?;
        let on_demand = data_bytes_from_origin(&s, mark)?;
        println!(
            "{name}: first run fetched {first} bytes and recorded {n} chunks; the remount prefetched {prefetched} bytes in {took:.1?}; the second run then fetched {on_demand} bytes on demand"
        );
        ensure!(prefetched > 0, "nothing prefetched");
        ensure!(
            on_demand * 10 <= first,
            "second run still fetched {on_demand} of {first} bytes on demand"
        );
        let st = &mounts_json(&s)?["mounts"][0]["stats"];
        ensure!(
            st["prefetch"]["recording"] == false
                && st["source"]["prefetch_bytes"].as_u64() > Some(0),
            "stats: {st}"
        );
        Ok(())
    });
}
