//! `shoal config containerd|crio|nydusd --write --root DIR` on stock runtime files (Debian's
//! containerd config, a k3s layout, Debian's registries.conf, a nydusd config): the result is
//! accepted by the real runtime (Debian's containerd loads it with the CRI plugin `ok` and `ctr`
//! pulls through a running node with the hosts.toml files written), a second run changes nothing,
//! `--undo` restores every byte, and a config with legacy mirrors gets a clear message and no
//! change.
//!
//! Needs the `shoal` binary (`cargo build -p shoal-node`, or SHOAL_BIN); the containerd tests need
//! root, containerd and the distribution registry.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use shoal_e2e::containerd::Containerd;
use shoal_e2e::node::Node;
use shoal_e2e::setup::{self, IMAGE};
use shoal_e2e::{paths, run, Need, TestCtx};

const CONTAINERD: &[Need] = &[
    Need::Root,
    Need::Bin("docker-registry"),
    Need::Bin("skopeo"),
    Need::Bin("containerd"),
    Need::Bin("ctr"),
    Need::Shoal,
];

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/runtime")
        .join(name)
}

/// What one `shoal config …` run printed and how it ended.
struct Ran {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn shoal_config(args: &[&str]) -> Result<Ran> {
    let out = Command::new(paths::shoal_bin()?)
        .arg("config")
        .args(args)
        .env_remove("SHOAL_CONFIG")
        .output()
        .context("running shoal config")?;
    Ok(Ran {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

fn must(args: &[&str]) -> Result<Ran> {
    let r = shoal_config(args)?;
    ensure!(
        r.ok,
        "shoal config {args:?} failed:\n{}{}",
        r.stdout,
        r.stderr
    );
    Ok(r)
}

/// Every file under `root` and its bytes.
fn tree(root: &Path) -> Result<BTreeMap<PathBuf, Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(root)?.to_path_buf();
                out.insert(rel, std::fs::read(&p)?);
            }
        }
    }
    Ok(out)
}

/// Copies `src` to `root` + `host_path`.
fn place(root: &Path, host_path: &str, src: &Path) -> Result<PathBuf> {
    let dst = root.join(host_path.trim_start_matches('/'));
    std::fs::create_dir_all(dst.parent().context("parent")?)?;
    std::fs::copy(src, &dst).with_context(|| format!("copying {}", src.display()))?;
    Ok(dst)
}

/// Write twice (the second changes nothing), return the tree after writing.
fn write_twice(root: &Path, args: &[&str]) -> Result<BTreeMap<PathBuf, Vec<u8>>> {
    let root_s = root.display().to_string();
    let mut full = args.to_vec();
    full.extend(["--write", "--root", &root_s]);
    let first = must(&full)?;
    ensure!(
        first.stdout.contains("created") || first.stdout.contains("changed"),
        "the first --write changed nothing:\n{}",
        first.stdout
    );
    let after_first = tree(root)?;
    let second = must(&full)?;
    ensure!(
        second.stdout.lines().all(|l| l.starts_with("unchanged")),
        "the second --write changed something:\n{}",
        second.stdout
    );
    ensure!(
        tree(root)? == after_first,
        "the second --write changed files"
    );
    Ok(after_first)
}

/// `--undo` brings back exactly `before` (the backup dir goes too).
fn undo_restores(root: &Path, runtime: &str, before: &BTreeMap<PathBuf, Vec<u8>>) -> Result<()> {
    let root_s = root.display().to_string();
    let r = must(&[runtime, "--undo", "--root", &root_s])?;
    ensure!(
        r.stdout.contains("restored") || r.stdout.contains("removed"),
        "{}",
        r.stdout
    );
    let after = tree(root)?;
    ensure!(
        &after == before,
        "--undo did not restore byte for byte: now {:?}, before {:?}",
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>()
    );
    Ok(())
}

/// Pulls the fixture through `node` with the hosts dir `hosts_dir` and checks every blob came
/// through the node (it holds them all afterwards).
fn pull_through_node(
    containerd: &Containerd,
    origin_addr: &str,
    hosts_dir: &Path,
    node: &Node,
) -> Result<()> {
    let reference = format!("{origin_addr}/{IMAGE}");
    let out = containerd.pull(&reference, Some(hosts_dir), None)?;
    ensure!(out.success, "ctr image pull {reference}: {}", out.output);
    let image = setup::fixture_image()?;
    let status = node.status()?;
    for blob in image.blobs() {
        let held = status.blob(&blob.digest).is_some_and(|b| b.complete);
        ensure!(held, "blob {} did not come through the node", blob.digest);
    }
    Ok(())
}

fn cri_ok(containerd: &Containerd) -> Result<()> {
    let plugins = containerd.plugins()?;
    let cri = plugins
        .iter()
        .find(|(_, id, _)| id == "cri")
        .context("no cri plugin listed")?;
    ensure!(cri.2 == "ok", "the CRI plugin did not load: {plugins:?}");
    Ok(())
}

#[test]
fn containerd_debian_config_round_trip_and_pull_through_node() {
    run(
        "containerd_debian_config_round_trip_and_pull_through_node",
        CONTAINERD,
        |t: &TestCtx| {
            let (origin, _) = setup::anonymous_origin(t)?;
            let node = Node::start(t, &origin.url())?;
            let root = t.subdir("root")?;
            let config = place(
                &root,
                "/etc/containerd/config.toml",
                &testdata("debian-containerd-config.toml"),
            )?;
            let before = tree(&root)?;
            let registry = format!("{}={}", origin.addr(), origin.url());
            let mirror = node.url();
            let written = write_twice(
                &root,
                &[
                    "containerd",
                    "--registry",
                    &registry,
                    "--mirror",
                    &mirror,
                    "--snapshotter",
                ],
            )?;
            let hosts = root.join("etc/containerd/certs.d");
            let hosts_file = PathBuf::from("etc/containerd/certs.d")
                .join(origin.addr())
                .join("hosts.toml");
            ensure!(written.contains_key(&hosts_file), "{:?}", written.keys());
            ensure!(
                !hosts.join("_default").exists(),
                "a _default hosts.toml was written"
            );

            let containerd = Containerd::start_with_config(t, &config)?;
            cri_ok(&containerd)?;
            let plugins = containerd.plugins()?;
            ensure!(
                plugins
                    .iter()
                    .any(|(ty, id, _)| ty == "io.containerd.snapshotter.v1" && id == "shoal"),
                "the shoal proxy snapshotter is not registered: {plugins:?}"
            );
            pull_through_node(&containerd, &origin.addr(), &hosts, &node)?;
            drop(containerd);
            undo_restores(&root, "containerd", &before)
        },
    );
}

#[test]
fn containerd_k3s_layout_writes_hosts_into_its_certs_d() {
    run(
        "containerd_k3s_layout_writes_hosts_into_its_certs_d",
        CONTAINERD,
        |t: &TestCtx| {
            let (origin, _) = setup::anonymous_origin(t)?;
            let node = Node::start(t, &origin.url())?;
            let root = t.subdir("root")?;
            let k3s_dir = "/var/lib/rancher/k3s/agent/etc/containerd";
            let config = place(
                &root,
                &format!("{k3s_dir}/config.toml"),
                &testdata("k3s-containerd-config.toml"),
            )?;
            let before = tree(&root)?;
            let registry = format!("{}={}", origin.addr(), origin.url());
            let mirror = node.url();
            let args = ["containerd", "--registry", &registry, "--mirror", &mirror];
            let written = write_twice(&root, &args)?;
            let config_rel = config.strip_prefix(&root)?.to_path_buf();
            ensure!(
                written.get(&config_rel) == before.get(&config_rel),
                "k3s's generated config.toml was edited"
            );
            let hosts = root.join(k3s_dir.trim_start_matches('/')).join("certs.d");
            ensure!(
                hosts.join(origin.addr()).join("hosts.toml").is_file(),
                "no hosts.toml in k3s's certs.d"
            );
            ensure!(
                !root.join("etc/containerd").exists(),
                "wrote into /etc/containerd on a k3s host"
            );
            let containerd = Containerd::start_with_config(t, &config)?;
            cri_ok(&containerd)?;
            pull_through_node(&containerd, &origin.addr(), &hosts, &node)?;
            drop(containerd);
            undo_restores(&root, "containerd", &before)?;

            // --snapshotter on k3s: a clear refusal, nothing written.
            let root_s = root.display().to_string();
            let r = shoal_config(&["containerd", "--write", "--root", &root_s, "--snapshotter"])?;
            ensure!(
                !r.ok && r.stderr.contains("config.toml.tmpl"),
                "{}",
                r.stderr
            );
            ensure!(tree(&root)? == before, "a refused run changed files");
            Ok(())
        },
    );
}

#[test]
fn containerd_refusals_are_clear_and_change_nothing() {
    run(
        "containerd_refusals_are_clear_and_change_nothing",
        &[Need::Shoal],
        |t: &TestCtx| {
            let stock = std::fs::read_to_string(testdata("debian-containerd-config.toml"))?;
            // Legacy registry.mirrors next to which containerd refuses config_path.
            let root = t.subdir("legacy")?;
            let file = root.join("etc/containerd/config.toml");
            std::fs::create_dir_all(file.parent().context("parent")?)?;
            std::fs::write(
                &file,
                format!(
                    "{stock}\n[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\"]\n  endpoint = [\"https://mirror.example\"]\n"
                ),
            )?;
            let before = tree(&root)?;
            let root_s = root.display().to_string();
            let r = shoal_config(&["containerd", "--write", "--root", &root_s])?;
            ensure!(!r.ok, "legacy mirrors were accepted:\n{}", r.stdout);
            ensure!(
                r.stderr.contains("legacy")
                    && r.stderr.contains("mirrors.\"docker.io\"")
                    && r.stderr.contains("hosts.toml"),
                "unclear message: {}",
                r.stderr
            );
            ensure!(tree(&root)? == before, "a refused run changed files");

            // A k3s layout whose generated config has no config_path.
            let root = t.subdir("k3s-no-path")?;
            let file = root.join("var/lib/rancher/k3s/agent/etc/containerd/config.toml");
            std::fs::create_dir_all(file.parent().context("parent")?)?;
            std::fs::write(&file, "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"overlayfs\"\n")?;
            let before = tree(&root)?;
            let root_s = root.display().to_string();
            let r = shoal_config(&["containerd", "--write", "--root", &root_s])?;
            ensure!(
                !r.ok && r.stderr.contains("config_path is unset"),
                "{}",
                r.stderr
            );
            ensure!(tree(&root)? == before, "a refused run changed files");
            Ok(())
        },
    );
}

#[test]
fn crio_registries_conf_round_trip() {
    run(
        "crio_registries_conf_round_trip",
        &[Need::Shoal],
        |t: &TestCtx| {
            let root = t.subdir("root")?;
            place(
                &root,
                "/etc/containers/registries.conf",
                &testdata("debian-registries.conf"),
            )?;
            let before = tree(&root)?;
            let written = write_twice(&root, &["crio", "--mirror", "http://127.0.0.1:5050"])?;
            let text = std::str::from_utf8(&written[Path::new("etc/containers/registries.conf")])?;
            let v: toml::Value = toml::from_str(text).context("registries.conf is not TOML")?;
            let regs = v["registry"].as_array().context("no [[registry]]")?;
            let hub = regs
                .iter()
                .find(|r| r["prefix"].as_str() == Some("docker.io"))
                .context("no docker.io entry")?;
            ensure!(
                hub["location"].as_str() == Some("registry-1.docker.io"),
                "{hub:?}"
            );
            let m = &hub["mirror"][0];
            ensure!(m["location"].as_str() == Some("127.0.0.1:5050"), "{m:?}");
            ensure!(m["insecure"].as_bool() == Some(true), "{m:?}");
            undo_restores(&root, "crio", &before)
        },
    );
}

#[test]
fn nydusd_json_round_trip() {
    run("nydusd_json_round_trip", &[Need::Shoal], |t: &TestCtx| {
        let root = t.subdir("root")?;
        place(
            &root,
            "/etc/nydus/nydusd-config.json",
            &testdata("nydusd-config.json"),
        )?;
        let before = tree(&root)?;
        let written = write_twice(&root, &["nydusd", "--mirror", "http://127.0.0.1:5050"])?;
        let v: serde_json::Value =
            serde_json::from_slice(&written[Path::new("etc/nydus/nydusd-config.json")])?;
        let backend = &v["device"]["backend"]["config"];
        let proxy = &backend["proxy"];
        ensure!(proxy["url"] == "http://127.0.0.1:5050", "{proxy}");
        ensure!(proxy["ping_url"] == "http://127.0.0.1:5050/ping", "{proxy}");
        ensure!(
            proxy["fallback"] == true && proxy["check_interval"] == 5,
            "{proxy}"
        );
        ensure!(
            backend["retry_limit"] == 2,
            "other settings lost: {backend}"
        );
        undo_restores(&root, "nydusd", &before)
    });
}

#[test]
fn docker_daemon_json_round_trip() {
    run(
        "docker_daemon_json_round_trip",
        &[Need::Shoal],
        |t: &TestCtx| {
            let root = t.subdir("root")?;
            let dir = root.join("etc/docker");
            std::fs::create_dir_all(&dir)?;
            std::fs::write(
                dir.join("daemon.json"),
                "{\n  \"log-driver\": \"journald\"\n}\n",
            )?;
            let before = tree(&root)?;
            let written = write_twice(&root, &["docker", "--mirror", "http://127.0.0.1:5050"])?;
            let v: serde_json::Value =
                serde_json::from_slice(&written[Path::new("etc/docker/daemon.json")])?;
            ensure!(v["registry-mirrors"][0] == "http://127.0.0.1:5050", "{v}");
            ensure!(v["log-driver"] == "journald", "{v}");
            undo_restores(&root, "docker", &before)
        },
    );
}
