//! The README's "Install on a cluster" section, run as written on three emulated hosts.
//!
//! Each host is a network namespace (e2e's `Net`) plus a mount namespace of its own in which
//! `/etc`, `/var/lib` and `/usr/local` are copy-on-write overlays of the machine's and `/run`,
//! `/var/lib/containerd` are tmpfs, so `install … /usr/local/bin`, `/etc/shoal`,
//! `/etc/containerd/certs.d` and containerd's state are per host and the machine is left as it
//! was. Every ```sh block of the section runs with `bash -e` on the hosts its first line names
//! (`# on every host`, `# on the scheduler host` = host 0, `# on any host` = each host in turn),
//! in a working directory holding `shoal` and `deploy/`, as the section asks. The operator's
//! choices (the `# settings` block) come from the test: the scheduler host's address and the
//! origin registry (a real distribution registry on a fourth host). The one prose step, copying
//! the join secret, is done by the test.
//!
//! systemd is not PID 1 on this machine, so `systemctl` inside the hosts is a small script that
//! starts a unit's `ExecStart` the way systemd would for the directives these units use
//! (`Environment=`, `LoadCredential=` with `%d`, `RuntimeDirectory=`, `StateDirectory=`), and
//! `systemctl restart containerd` starts Debian's containerd with its default config and paths.
//! The units themselves are checked by `systemd-analyze verify` in `deploy.rs`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, ensure, Context, Result};
use shoal_e2e::netns::{Host, Net};
use shoal_e2e::registry::Registry;
use shoal_e2e::setup::{self, IMAGE};
use shoal_e2e::{paths, run, skopeo, Need, TestCtx};

const NEEDS: &[Need] = &[
    Need::Root,
    Need::Bin("docker-registry"),
    Need::Bin("skopeo"),
    Need::Bin("containerd"),
    Need::Bin("ctr"),
    Need::Bin("nsenter"),
    Need::Bin("unshare"),
    Need::Bin("openssl"),
    Need::Bin("curl"),
    Need::Shoal,
];

/// `systemctl` for hosts without systemd as PID 1 (see the module doc).
const SYSTEMCTL: &str = r#"#!/bin/bash
set -euo pipefail
log_dir=${SHOAL_E2E_LOGS:?}
if [ "$1" = restart ] && [ "${2%.service}" = containerd ]; then
  setsid containerd >>"$log_dir/containerd.log" 2>&1 </dev/null &
  for _ in $(seq 300); do ctr version >/dev/null 2>&1 && exit 0; sleep 0.1; done
  echo "containerd did not start" >&2; exit 1
fi
[ "$1 $2" = "enable --now" ] || { echo "systemctl (e2e): unsupported: $*" >&2; exit 1; }
unit=${3%.service}
file=/etc/systemd/system/$unit.service
creds=/run/credentials/$unit.service
mkdir -p "$creds"
envs=()
exec_start=
while IFS= read -r line; do
  case "$line" in
    LoadCredential=*) v=${line#LoadCredential=}; install -m 0400 "${v#*:}" "$creds/${v%%:*}" ;;
    Environment=*) v=${line#Environment=}; envs+=("${v//%d/$creds}") ;;
    RuntimeDirectory=*) mkdir -p "/run/${line#RuntimeDirectory=}" ;;
    StateDirectory=*) mkdir -p "/var/lib/${line#StateDirectory=}" ;;
    ExecStart=*) exec_start=${line#ExecStart=} ;;
  esac
done <"$file"
[ -n "$exec_start" ] || { echo "no ExecStart in $file" >&2; exit 1; }
env "${envs[@]}" setsid $exec_start >>"$log_dir/$unit.log" 2>&1 </dev/null &
"#;

/// One ```sh block of the section and where it runs.
#[derive(Debug)]
struct Block {
    target: Target,
    script: String,
}

#[derive(Debug, PartialEq)]
enum Target {
    Settings,
    Every,
    Scheduler,
    Any,
}

fn section_blocks() -> Result<Vec<Block>> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))?;
    let start = readme
        .find("## Install on a cluster")
        .context("no cluster section in README.md")?;
    let rest = &readme[start + 3..];
    let section = &rest[..rest.find("\n## ").unwrap_or(rest.len())];
    let mut blocks = Vec::new();
    let mut parts = section.split("```");
    parts.next();
    while let (Some(code), _) = (parts.next(), parts.next()) {
        let Some(script) = code.strip_prefix("sh\n") else {
            continue;
        };
        let first = script.lines().next().unwrap_or_default();
        let target = match first {
            l if l.starts_with("# settings") => Target::Settings,
            l if l.starts_with("# on every host") => Target::Every,
            l if l.starts_with("# on the scheduler host") => Target::Scheduler,
            l if l.starts_with("# on any host") => Target::Any,
            other => bail!("README block without a host line: {other:?}"),
        };
        blocks.push(Block {
            target,
            script: script.to_owned(),
        });
    }
    ensure!(blocks.len() >= 5, "found only {} blocks", blocks.len());
    Ok(blocks)
}

/// A test host's mount namespace (persisted in a file) and working directory.
struct HostFs {
    ns_file: PathBuf,
    dir: PathBuf,
    netns: String,
}

impl HostFs {
    fn new(t: &TestCtx, ns_dir: &Path, host: &Host, i: usize) -> Result<Self> {
        let dir = t.subdir(&format!("host{i}"))?;
        let ns_file = ns_dir.join(format!("mnt{i}"));
        std::fs::write(&ns_file, "")?;
        sh(Command::new("unshare")
            .arg(format!("--mount={}", ns_file.display()))
            .args(["--propagation", "private", "true"]))?;
        let d = dir.display();
        let mut setup = String::from("set -e\n");
        for (target, name) in [
            ("/etc", "etc"),
            ("/var/lib", "lib"),
            ("/usr/local", "local"),
        ] {
            setup.push_str(&format!(
                "mkdir -p {d}/{name}-up {d}/{name}-work\nmount -t overlay overlay -o lowerdir={target},upperdir={d}/{name}-up,workdir={d}/{name}-work {target}\n"
            ));
        }
        setup.push_str("mount -t tmpfs tmpfs /run\nmkdir -p /var/lib/containerd\nmount -t tmpfs tmpfs /var/lib/containerd\n");
        setup.push_str(&format!("mkdir -p /usr/local/sbin\ncat > /usr/local/sbin/systemctl <<'SHIM'\n{SYSTEMCTL}SHIM\nchmod 0755 /usr/local/sbin/systemctl\n"));
        let fs = Self {
            ns_file,
            dir: dir.clone(),
            netns: host.ns.clone(),
        };
        fs.bash(&setup, &[])?;
        // The working directory the section starts in: the binary and deploy/.
        let work = dir.join("work");
        std::fs::create_dir_all(&work)?;
        std::fs::copy(paths::shoal_bin()?, work.join("shoal"))?;
        sh(Command::new("cp")
            .arg("-r")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy"))
            .arg(&work))?;
        std::fs::create_dir_all(dir.join("logs"))?;
        Ok(fs)
    }

    /// `bash -euo pipefail -c script` on this host, in its working directory.
    fn bash(&self, script: &str, env: &[(&str, String)]) -> Result<String> {
        let work = self.dir.join("work");
        let wd = if work.exists() {
            work
        } else {
            self.dir.clone()
        };
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--mount={}", self.ns_file.display()))
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg(format!("--wd={}", wd.display()))
            .args(["--", "bash", "-euo", "pipefail", "-c", script])
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("SHOAL_E2E_LOGS", self.dir.join("logs"))
            .env_remove("SHOAL_CONFIG")
            .stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().context("running nsenter")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            out.status.success(),
            "on {}: {}\n--- output:\n{text}",
            self.netns,
            script.lines().next().unwrap_or_default()
        );
        Ok(text)
    }
}

fn sh(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Unmounts the namespace files (the namespaces go when their last process does).
struct NsDir(PathBuf, usize);

impl Drop for NsDir {
    fn drop(&mut self) {
        for i in 0..self.1 {
            let _ = Command::new("umount")
                .arg(self.0.join(format!("mnt{i}")))
                .status();
        }
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn readme_cluster_install_runs_as_written() {
    run(
        "readme_cluster_install_runs_as_written",
        NEEDS,
        |t: &TestCtx| {
            let blocks = section_blocks()?;
            let mut net = Net::new()?;
            let origin_host = net.add_host()?;
            let hosts: Vec<Host> = (0..3).map(|_| net.add_host()).collect::<Result<_>>()?;
            net.pin_neighbors()?;
            let origin = Registry::start_on_host(t, &origin_host, 5000)?;
            skopeo::push_fixture(t, &origin, IMAGE)?;
            let image_bytes: u64 = setup::fixture_image()?.blobs().iter().map(|b| b.size).sum();

            // The namespace files must sit on a mount that is not shared.
            let ns_dir = t.subdir("ns")?;
            sh(Command::new("mount")
                .arg("--bind")
                .arg(&ns_dir)
                .arg(&ns_dir))?;
            sh(Command::new("mount").arg("--make-private").arg(&ns_dir))?;
            let _unmount = NsDir(ns_dir.clone(), hosts.len());
            let fs: Vec<HostFs> = hosts
                .iter()
                .enumerate()
                .map(|(i, h)| HostFs::new(t, &ns_dir, h, i))
                .collect::<Result<_>>()?;
            for (i, f) in fs.iter().enumerate() {
                for unit in ["shoal-scheduler", "shoal-node", "containerd"] {
                    t.register_log(
                        &format!("host{i} {unit}"),
                        &f.dir.join("logs").join(format!("{unit}.log")),
                    );
                }
            }
            let env = vec![
                ("SCHEDULER_IP", hosts[0].ip.to_string()),
                ("REGISTRY_HOST", origin.addr()),
                ("REGISTRY_URL", origin.url()),
                ("IMAGE", IMAGE.to_owned()),
            ];
            let mark = origin.log()?.requests.len();
            for block in &blocks {
                match block.target {
                    Target::Settings => {
                        for (k, _) in &env {
                            ensure!(
                                block.script.contains(&format!("export {k}=")) || *k == "IMAGE",
                                "the settings block does not set {k}"
                            );
                        }
                    }
                    Target::Scheduler => {
                        fs[0].bash(&block.script, &env)?;
                    }
                    Target::Every => {
                        copy_join_secret(&fs)?;
                        for f in &fs {
                            f.bash(&block.script, &env)?;
                        }
                    }
                    Target::Any => {
                        // "Any host": each of them, one after the other.
                        for f in &fs {
                            let out = f.bash(&block.script, &env)?;
                            ensure!(
                                out.contains("shoal node"),
                                "`shoal status` is not in the output:\n{out}"
                            );
                        }
                    }
                }
            }
            // Every node joined the scheduler, and the cluster read the image from the origin about
            // once for three pulls.
            // Another host learns nothing from the scheduler without the join secret…
            let unsigned = fs[1].bash(
                &format!(
                    "curl -s -o /dev/null -w '%{{http_code}}' http://{}:5060/api/v1/status",
                    hosts[0].ip
                ),
                &[],
            )?;
            ensure!(
                unsigned.trim() == "401",
                "unsigned scheduler status: {unsigned}"
            );
            // …its operator listener on the scheduler host's loopback tells all.
            let status = fs[0].bash("curl -fsS http://127.0.0.1:5061/api/v1/status", &[])?;
            let v: serde_json::Value = serde_json::from_str(&status)?;
            let nodes = v["nodes"].as_array().map_or(0, Vec::len);
            ensure!(nodes == 3, "the scheduler lists {nodes} nodes: {status}");
            let from_origin = origin.log()?.since(mark).blob_bytes_written();
            ensure!(
                from_origin < 2 * image_bytes,
                "three pulls read {from_origin} bytes from the origin (image: {image_bytes})"
            );
            Ok(())
        },
    );
}

/// The prose step: the join secret made on the scheduler host goes to the others.
fn copy_join_secret(fs: &[HostFs]) -> Result<()> {
    let Ok(secret) = fs[0].bash("cat /etc/shoal/join-secret", &[]) else {
        return Ok(());
    };
    for f in &fs[1..] {
        f.bash(&format!("mkdir -p /etc/shoal && printf '%s' '{}' > /etc/shoal/join-secret && chmod 0600 /etc/shoal/join-secret", secret.trim()), &[])?;
    }
    Ok(())
}
