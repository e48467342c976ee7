//! The node's conversion service (`[convert]`), driven by the real distribution registry's
//! push notifications.
//!
//! What is asserted, in one scene (the registry notifies the node; nobody runs a command):
//! - `skopeo copy` of the fixture to `app:1` → `app:1-nydus` appears, mounts with `shoal mount`
//!   and runs python3 (42); each converted blob was pushed once (registry log).
//! - Pushing the same image again converts nothing new (no blob pushed); a retag (`app:1b`)
//!   only gets its `app:1b-nydus` tag.
//! - `app:2` sharing the base layer is converted with `app:1-nydus` as chunk dictionary (its
//!   chunks come from it) and reads its layer from the node's store: the registry sends the
//!   node no layer bytes for it.
//! - A notification without the secret gets 401 and converts nothing; a malformed one 400; a
//!   pushed non-image artifact is ignored with a log line.
//! - Killing the node in the middle of a conversion and starting it again finishes the job once:
//!   the target tag appears, naming a manifest whose blobs all exist, and no other tag does.
//! - The figures: seconds from push to a mountable lazy image, and origin bytes (printed).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use shoal_e2e::http::{self, sha256_digest};
use shoal_e2e::lazy::{self, Unmount};
use shoal_e2e::node::{Node, NodeOptions};
use shoal_e2e::registry::Registry;
use shoal_e2e::scheduler::Scheduler;
use shoal_e2e::wait::free_port;
use shoal_e2e::{paths, run, setup, skopeo, Need, TestCtx};

const NEEDS: &[Need] = &[
    Need::Shoal,
    Need::Root,
    Need::Fuse,
    Need::Bin("docker-registry"),
    Need::Bin("skopeo"),
];

const SECRET: &str = "e2e-convert-secret-0123456789";
/// How long a conversion of the fixture may take (a debug build on 2 cores).
const CONVERTED: Duration = Duration::from_secs(300);

struct Scene {
    registry: Registry,
    node: Node,
    events: String,
}

fn scene(t: &TestCtx) -> Result<Scene> {
    let port = free_port()?;
    let events = format!("http://127.0.0.1:{port}/events");
    let registry = Registry::start_notifying(t, &events, SECRET)?;
    let dir = t.subdir("node-config")?;
    let secret = dir.join("convert.secret");
    std::fs::write(&secret, format!("{SECRET}\n"))?;
    let config = dir.join("node.toml");
    std::fs::write(
        &config,
        format!(
            "[convert]\nlisten = \"127.0.0.1:{port}\"\nsecret_file = \"{}\"\n",
            secret.display()
        ),
    )?;
    let node = Node::start_with(
        t,
        NodeOptions {
            config: Some(config),
            ..NodeOptions::upstream(&registry.url())
        },
    )?;
    Ok(Scene {
        registry,
        node,
        events,
    })
}

#[test]
fn pushed_images_are_converted_by_themselves() {
    run("pushed_images_are_converted_by_themselves", NEEDS, |t| {
        let mut s = scene(t)?;
        let reg = s.registry.addr();

        // 1. A push converts; the result mounts and runs.
        let pushed = Instant::now();
        skopeo::push_fixture(t, &s.registry, "app:1")?;
        let converted = wait_tag(&s.registry, "app", "1-nydus", CONVERTED)?;
        let mut mnt = t.subdir("mnt1")?;
        mount_and_run_python(&s.node, &format!("{reg}/app:1-nydus"), &mnt)?;
        let mountable = pushed.elapsed();
        let log = s.registry.log()?;
        let job = job_of(&s.node, "app", "1")?;
        let blobs = manifest_blobs(&s.registry, "app", "1-nydus")?;
        for d in &blobs {
            let n = uploads(&log, d);
            ensure!(n == 1, "converted blob {d} was pushed {n} times");
        }
        let fetched = job["source_bytes_fetched"].as_u64().unwrap_or(0);
        println!(
            "push → mountable app:1-nydus: {:.1} s (push → converted {:.1} s); source layers read: {:.1} MiB fetched from the origin, {:.1} MiB from the store; registry sent {:.1} MiB of blobs in all",
            mountable.as_secs_f64(),
            job["push_to_converted_seconds"].as_f64().unwrap_or(f64::NAN),
            fetched as f64 / 1048576.0,
            job["source_bytes_stored"].as_u64().unwrap_or(0) as f64 / 1048576.0,
            log.blob_bytes_written() as f64 / 1048576.0,
        );
        ensure!(fetched > 0, "the first conversion fetched nothing: {job}");

        // 2. The same push again, and a retag: nothing converted again.
        let mark = s.registry.log()?.requests.len();
        skopeo::push_fixture(t, &s.registry, "app:1")?;
        skopeo::push_fixture(t, &s.registry, "app:1b")?;
        let retag = wait_tag(&s.registry, "app", "1b-nydus", CONVERTED)?;
        ensure!(
            retag == converted,
            "app:1b-nydus names {retag}, app:1-nydus {converted}"
        );
        wait_idle(&s.node)?;
        let since = s.registry.log()?.since(mark);
        let pushed_blobs: Vec<&str> = since
            .requests
            .iter()
            .filter(|r| r.method == "PUT" && r.uri.contains("/blobs/uploads/"))
            .map(|r| r.uri.as_str())
            .collect();
        // skopeo's own pushes HEAD and skip every blob; the service pushes none.
        ensure!(
            pushed_blobs.is_empty(),
            "blobs pushed again: {pushed_blobs:?}"
        );
        let st = status(&s.node)?;
        let jobs_of_app1: Vec<&Value> = st["jobs"]
            .as_array()
            .context("jobs")?
            .iter()
            .filter(|j| {
                j["repository"] == "app"
                    && j["tags"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|x| x == "1"))
            })
            .collect();
        ensure!(
            jobs_of_app1.len() == 1,
            "app:1 has {} jobs",
            jobs_of_app1.len()
        );
        ensure!(
            jobs_of_app1[0]["attempts"].as_u64() == Some(1)
                || jobs_of_app1[0]["attempts"].as_u64() == Some(2),
            "{}",
            jobs_of_app1[0]
        );

        // 3. app:2 shares the base layer: the dictionary serves its chunks, the store its bytes.
        let mark = s.registry.log()?.requests.len();
        skopeo::push_fixture_ref(t, &s.registry, "base", "app:2")?;
        wait_tag(&s.registry, "app", "2-nydus", CONVERTED)?;
        let job2 = job_of(&s.node, "app", "2")?;
        let since = s.registry.log()?.since(mark);
        let layer_gets: Vec<String> = manifest_blobs(&s.registry, "app", "2")?
            .into_iter()
            .skip(1)
            .filter(|d| since.blob_fetches(d) > 0)
            .collect();
        println!(
            "app:2: source {} bytes from the store, {} fetched; chunks from the dictionary: {}",
            job2["source_bytes_stored"], job2["source_bytes_fetched"], job2["chunks_from_dict"]
        );
        ensure!(
            job2["source_bytes_fetched"].as_u64() == Some(0),
            "app:2 fetched source bytes: {job2}"
        );
        ensure!(
            job2["source_bytes_stored"].as_u64().unwrap_or(0) > 0,
            "app:2 read nothing from the store: {job2}"
        );
        ensure!(
            job2["chunks_from_dict"].as_u64().unwrap_or(0) > 0,
            "app:2 used no chunk of app:1-nydus: {job2}"
        );
        ensure!(
            layer_gets.is_empty(),
            "the node fetched layers from the origin for app:2: {layer_gets:?}"
        );

        // 4. Hostile and odd notifications.
        let client = http::client()?;
        let env = json!({"events": [{"action": "push", "target": {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{}", "0".repeat(64)), "repository": "app", "tag": "evil"}}]});
        let env = serde_json::to_vec(&env)?;
        let post = || {
            client.post(&s.events).header(
                "Content-Type",
                "application/vnd.docker.distribution.events.v1+json",
            )
        };
        let no_secret = http::fetch(post().body(env.clone()))?;
        ensure!(
            no_secret.status.as_u16() == 401,
            "no secret: {}",
            no_secret.short()
        );
        let wrong = http::fetch(
            post()
                .bearer_auth("not-the-secret-at-all")
                .body(env.clone()),
        )?;
        ensure!(
            wrong.status.as_u16() == 401,
            "wrong secret: {}",
            wrong.short()
        );
        let bad = http::fetch(post().bearer_auth(SECRET).body("{\"events\": [1, 2"))?;
        ensure!(bad.status.as_u16() == 400, "malformed: {}", bad.short());
        let odd = http::fetch(post().bearer_auth(SECRET).body("{\"hello\": 1}"))?;
        ensure!(
            odd.status.as_u16() == 400,
            "not an envelope: {}",
            odd.short()
        );
        ensure!(
            !status(&s.node)?["jobs"]
                .as_array()
                .context("jobs")?
                .iter()
                .any(|j| j["tags"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x == "evil"))),
            "a refused notification made a job"
        );
        let artifact = push_artifact(&s.registry, "charts/thing", "1")?;
        let ignored = wait_job(&s.node, "charts/thing", "1", &["ignored"])?;
        ensure!(
            s.node.log_text().contains("not converted")
                && ignored["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("not a container image")),
            "the artifact {artifact} was not ignored with a reason: {ignored}"
        );

        // 5. Killed in the middle of a conversion: the restart finishes it, once.
        skopeo::push_fixture(t, &s.registry, "other:1")?;
        wait_job(&s.node, "other", "1", &["running"])?;
        s.node.kill()?;
        if tag_digest(&s.registry, "other", "1-nydus")?.is_some() {
            // The conversion ended between the status call and the kill: rare, and the restart
            // below then checks only that nothing is done twice.
            println!("other:1 was converted before the kill landed");
        }
        s.node.restart()?;
        wait_tag(&s.registry, "other", "1-nydus", CONVERTED)?;
        for d in manifest_blobs(&s.registry, "other", "1-nydus")? {
            let head = http::fetch(
                http::client()?.head(format!("{}/v2/other/blobs/{d}", s.registry.url())),
            )?;
            ensure!(
                head.status.as_u16() == 200,
                "other:1-nydus names a missing blob {d}"
            );
        }
        let tags =
            http::fetch(http::client()?.get(format!("{}/v2/other/tags/list", s.registry.url())))?
                .json()?;
        let mut tags: Vec<String> = serde_json::from_value(tags["tags"].clone())?;
        tags.sort();
        ensure!(tags == ["1", "1-nydus"], "tags of other: {tags:?}");
        let other = job_of(&s.node, "other", "1")?;
        ensure!(other["state"] == "done", "{other}");

        // The converted image still mounts after all that.
        mnt = t.subdir("mnt2")?;
        mount_and_run_python(&s.node, &format!("{reg}/other:1-nydus"), &mnt)?;
        Ok(())
    });
}

#[test]
fn a_converted_image_is_prewarmed_across_the_cluster() {
    run("convert_prewarm", NEEDS, |t| {
        let port = free_port()?;
        let registry =
            Registry::start_notifying(t, &format!("http://127.0.0.1:{port}/events"), SECRET)?;
        let join = t.dir().join("join-secret");
        std::fs::write(&join, "5".repeat(64))?;
        let sched_addr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let scheduler = Scheduler::start_with_secret(t, None, sched_addr, Some(&join))?;
        let dir = t.subdir("node-config")?;
        std::fs::write(dir.join("secret"), SECRET)?;
        std::fs::write(
            dir.join("node.toml"),
            format!(
                "[convert]\nlisten = \"127.0.0.1:{port}\"\nsecret_file = \"{}\"\nprewarm = \"bootstrap\"\n",
                dir.join("secret").display()
            ),
        )?;
        let member = |label: &str, config: Option<PathBuf>| -> Result<Node> {
            let mut opts = NodeOptions::upstream(&registry.url());
            opts.label = label.into();
            opts.config = config;
            opts.extra_args = vec![
                "--p2p".into(),
                format!("127.0.0.1:{}", free_port()?),
                "--join-secret-file".into(),
                join.display().to_string(),
                "--scheduler".into(),
                scheduler.addr().to_string(),
            ];
            Node::start_with(t, opts)
        };
        let _a = member("a", Some(dir.join("node.toml")))?;
        let b = member("b", None)?;
        skopeo::push_fixture(t, &registry, "app:1")?;
        wait_tag(&registry, "app", "1-nydus", CONVERTED)?;
        let m = http::fetch(
            http::client()?
                .get(format!("{}/v2/app/manifests/1-nydus", registry.url()))
                .header("Accept", setup::MANIFEST_ACCEPT),
        )?
        .json()?;
        let boot = m["layers"]
            .as_array()
            .and_then(|l| l.last())
            .and_then(|l| l["digest"].as_str())
            .context("bootstrap layer")?
            .to_owned();
        // B never heard of the image: the prewarm the service started brings it the bootstrap.
        let start = Instant::now();
        loop {
            if b.status()?.blob(&boot).is_some_and(|x| x.complete) {
                break;
            }
            ensure!(
                start.elapsed() < Duration::from_secs(120),
                "node B never got the converted image's bootstrap {boot}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        Ok(())
    });
}

/// The digest `repo:tag` names, once it exists (polled).
fn wait_tag(registry: &Registry, repo: &str, tag: &str, within: Duration) -> Result<String> {
    let start = Instant::now();
    loop {
        if let Some(d) = tag_digest(registry, repo, tag)? {
            return Ok(d);
        }
        if start.elapsed() > within {
            bail!("{repo}:{tag} did not appear within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn tag_digest(registry: &Registry, repo: &str, tag: &str) -> Result<Option<String>> {
    let got = http::fetch(
        http::client()?
            .get(format!("{}/v2/{repo}/manifests/{tag}", registry.url()))
            .header("Accept", setup::MANIFEST_ACCEPT),
    )?;
    Ok((got.status.as_u16() == 200).then(|| sha256_digest(&got.body)))
}

/// The blobs (config and layers) of the manifest `repo:tag` names.
fn manifest_blobs(registry: &Registry, repo: &str, tag: &str) -> Result<Vec<String>> {
    let got = http::fetch(
        http::client()?
            .get(format!("{}/v2/{repo}/manifests/{tag}", registry.url()))
            .header("Accept", setup::MANIFEST_ACCEPT),
    )?;
    let m = got.json()?;
    let mut out = vec![m["config"]["digest"].as_str().context("config")?.to_owned()];
    for l in m["layers"].as_array().context("layers")? {
        out.push(l["digest"].as_str().context("layer digest")?.to_owned());
    }
    Ok(out)
}

/// Finished uploads of blob `digest` in the registry's log.
fn uploads(log: &shoal_e2e::registry_log::RegistryLog, digest: &str) -> usize {
    let encoded = digest.replace(':', "%3A");
    log.requests
        .iter()
        .filter(|r| {
            r.method == "PUT"
                && r.status == 201
                && r.uri.contains("/blobs/uploads/")
                && (r.uri.contains(digest) || r.uri.contains(&encoded))
        })
        .count()
}

/// `GET /api/v1/convert` over the node's control socket (`shoal convert status --json`).
fn status(node: &Node) -> Result<Value> {
    let out = Command::new(paths::shoal_bin()?)
        .args(["convert", "status", "--json", "--control"])
        .arg(node.control_path())
        .output()?;
    ensure!(
        out.status.success(),
        "shoal convert status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn find_job(st: &Value, repo: &str, tag: &str) -> Option<Value> {
    st["jobs"]
        .as_array()?
        .iter()
        .find(|j| {
            j["repository"] == repo
                && j["tags"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x == tag))
        })
        .cloned()
}

fn job_of(node: &Node, repo: &str, tag: &str) -> Result<Value> {
    find_job(&status(node)?, repo, tag).with_context(|| format!("no job for {repo}:{tag}"))
}

/// The job of `repo:tag` once it is in one of `states`.
fn wait_job(node: &Node, repo: &str, tag: &str, states: &[&str]) -> Result<Value> {
    let start = Instant::now();
    loop {
        if let Some(j) = find_job(&status(node)?, repo, tag) {
            if states.iter().any(|s| j["state"] == *s) {
                return Ok(j);
            }
            if j["state"] == "done" || j["state"] == "failed" {
                bail!(
                    "job of {repo}:{tag} ended as {} before reaching {states:?}: {j}",
                    j["state"]
                );
            }
        }
        if start.elapsed() > CONVERTED {
            bail!("job of {repo}:{tag} never reached {states:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Until no job is queued or running.
fn wait_idle(node: &Node) -> Result<()> {
    let start = Instant::now();
    loop {
        let st = status(node)?;
        if st["queued"] == 0 && st["running"] == 0 {
            return Ok(());
        }
        if start.elapsed() > CONVERTED {
            bail!("the service never went idle: {st}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// An OCI artifact (a config that is not an image's) pushed as `repo:tag`; its manifest digest.
fn push_artifact(registry: &Registry, repo: &str, tag: &str) -> Result<String> {
    let config = b"{\"name\": \"thing\", \"version\": \"1\"}".to_vec();
    let layer = b"chart bytes".to_vec();
    let (cd, ld) = (sha256_digest(&config), sha256_digest(&layer));
    let (cl, ll) = (config.len(), layer.len());
    registry.push_blob(repo, config)?;
    registry.push_blob(repo, layer)?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.cncf.helm.config.v1+json", "digest": cd, "size": cl},
        "layers": [{"mediaType": "application/vnd.cncf.helm.chart.content.v1.tar+gzip", "digest": ld, "size": ll}]
    }))?;
    let digest = sha256_digest(&manifest);
    let put = registry.put_manifest(
        repo,
        tag,
        "application/vnd.oci.image.manifest.v1+json",
        manifest,
    )?;
    ensure!(put.status.as_u16() == 201, "artifact push: {}", put.short());
    Ok(digest)
}

/// `shoal mount IMAGE DIR` through the node, `chroot DIR python3` prints 42, unmount.
fn mount_and_run_python(node: &Node, image: &str, mnt: &Path) -> Result<()> {
    let _guard = Unmount(mnt.to_path_buf());
    lazy::mount(node, image, mnt, &[])?;
    lazy::python_prints_42(mnt, image)?;
    lazy::umount(node, mnt)
}
