//! A private containerd daemon (own root, state, gRPC socket and config under the test's temp dir;
//! CRI and the snapshotters that need special filesystems disabled) and `ctr image pull` against it
//! with a `hosts.toml` directory (containerd 1.6: `ctr image pull --hosts-dir DIR --snapshotter
//! native [--user u:p] REF`); for snapshotter tests also `ctr-remote image rpull`, `ctr run`,
//! tasks, containers, images and `ctr snapshots`, each with the snapshotter named.
//!
//! The daemon can also live on a test host ([`Place`]): in its network namespace only, or in the
//! network *and mount* namespaces of a node there — where that node's lazy mounts exist, so
//! containers whose rootfs stands on them must be started from there. `ip netns exec` gave that
//! mount namespace a fresh sysfs without the cgroup hierarchies runc needs, so they are mounted
//! there first, as this machine has them. Every `ctr` the handle runs enters the same
//! namespaces.
//!
//! Invariants: the daemon is SIGKILLed on drop, after every task it still runs was killed (a
//! shim outlives its containerd, and its container would keep running); nothing outside the
//! temp dir is touched (but the cgroup mounts in a node's own mount namespace, which go with it).
//! Two daemons share runc's state dir (`/run/containerd/runc/<namespace>`): containers of
//! daemons that run at the same time need distinct ids.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};

use crate::registry::Creds;
use crate::wait::poll;
use crate::TestCtx;

/// How long containerd may take to answer `ctr version`.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The containerd namespace the tests use.
const NAMESPACE: &str = "shoal-e2e";
/// Daemons started by this process, for namespaces of their own.
static DAEMONS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
/// How long a task may take to start running or to stop after SIGKILL.
const TASK_TIMEOUT: Duration = Duration::from_secs(30);

/// A running private containerd.
#[derive(Debug)]
pub struct Containerd {
    dir: PathBuf,
    socket: PathBuf,
    place: Place,
    child: Option<Child>,
    /// Its containerd namespace, unique to this daemon: runc keeps container state under
    /// `/run/containerd/runc/<namespace>` whatever the daemon's own state dir, so two daemons
    /// running a `c1` in one namespace would clash.
    namespace: String,
}

/// Where a daemon (and every `ctr` its handle runs) lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// This process's namespaces.
    Here,
    /// Test host `ns`'s network namespace (`/run/netns/<ns>`), this machine's mount namespace.
    Net(String),
    /// The network and mount namespaces of process `pid` (a node on a test host, whose lazy
    /// mounts exist only there).
    NodeNamespaces(u32),
}

impl Place {
    /// A command running `program` in this place.
    fn command(&self, program: &str) -> Command {
        match self {
            Place::Here => Command::new(program),
            Place::Net(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}"))
                    .args(["--", program]);
                c
            }
            Place::NodeNamespaces(pid) => {
                let mut c = Command::new("nsenter");
                c.args([
                    "--target",
                    &pid.to_string(),
                    "--mount",
                    "--net",
                    "--",
                    program,
                ]);
                c
            }
        }
    }
}

/// What a `ctr` run did.
#[derive(Debug)]
pub struct CtrOutcome {
    pub success: bool,
    pub output: String,
}

impl CtrOutcome {
    /// The output if the command succeeded, else an error naming `what` with the output.
    pub fn ok(self, what: &str) -> Result<String> {
        ensure!(self.success, "{what} failed: {}", self.output.trim());
        Ok(self.output)
    }
}

/// One row of `ctr snapshots ls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRow {
    pub key: String,
    /// Empty for a snapshot without a parent.
    pub parent: String,
    /// `Active`, `View` or `Committed`.
    pub kind: String,
}

/// Where an image's layers come from in a pull: a `hosts.toml` directory (the node as mirror),
/// or the registry itself over plain HTTP.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    Hosts(&'a Path),
    Direct,
}

impl Source<'_> {
    fn add_to(self, cmd: &mut Command) {
        match self {
            Source::Hosts(dir) => cmd.arg("--hosts-dir").arg(dir),
            Source::Direct => cmd.arg("--plain-http"),
        };
    }
}

impl Containerd {
    /// Starts the daemon and waits until `ctr version` answers.
    pub fn start(t: &TestCtx) -> Result<Self> {
        Self::start_in(t, Place::Here)
    }

    /// Starts a daemon with the harness's own config (the default snapshotter, overlayfs, and
    /// `native`) in `place`.
    pub fn start_in(t: &TestCtx, place: Place) -> Result<Self> {
        // containerd's unix socket paths must stay under ~108 bytes: keep them short.
        let dir = t.subdir("ctrd")?;
        let socket = dir.join("c.sock");
        let config = dir.join("config.toml");
        std::fs::write(&config, config_toml(&dir, &socket)).context("writing containerd config")?;
        Self::spawn(t, dir, socket, &config, false, place)
    }

    /// [`Containerd::start_with_config`] in `place`.
    pub fn start_with_config_in(t: &TestCtx, config: &Path, place: Place) -> Result<Self> {
        let dir = t.subdir("ctrd")?;
        let socket = dir.join("c.sock");
        Self::spawn(t, dir, socket, config, true, place)
    }

    /// Starts Debian's containerd with a config file the test did not write (a runtime config that
    /// `shoal config containerd` produced), its root, state and socket moved into the test's dir by
    /// command-line flags so the file is used exactly as it is.
    pub fn start_with_config(t: &TestCtx, config: &Path) -> Result<Self> {
        Self::start_with_config_in(t, config, Place::Here)
    }

    /// Spawns containerd with `config` (and, with `relocate`, root/state/socket flags into `dir`)
    /// in `place` and waits until it answers.
    fn spawn(
        t: &TestCtx,
        dir: PathBuf,
        socket: PathBuf,
        config: &Path,
        relocate: bool,
        place: Place,
    ) -> Result<Self> {
        let log_path = dir.join("containerd.log");
        t.register_log("containerd", &log_path);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let mut args = vec!["--config".into(), config.as_os_str().to_owned()];
        if relocate {
            for (flag, path) in [
                ("--root", dir.join("root")),
                ("--state", dir.join("state")),
                ("--address", socket.clone()),
            ] {
                args.push(flag.into());
                args.push(path.into_os_string());
            }
        }
        let mut cmd = match &place {
            // `sh -c 'mount …; exec containerd "$@"' sh ARGS`: the daemon is the child itself.
            Place::NodeNamespaces(_) => {
                let mut c = place.command("sh");
                c.arg("-c")
                    .arg(format!(
                        "set -e\n{}exec containerd \"$@\"",
                        cgroup_script()?
                    ))
                    .arg("sh");
                c
            }
            _ => place.command("containerd"),
        };
        cmd.args(args);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting containerd")?;
        let n = DAEMONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut daemon = Self {
            dir,
            socket,
            place,
            child: Some(child),
            namespace: format!("{NAMESPACE}-{}-{n}", std::process::id()),
        };
        daemon.wait_ready()?;
        Ok(daemon)
    }

    /// `ctr plugins ls`: (type, id, status) of every plugin.
    pub fn plugins(&self) -> Result<Vec<(String, String, String)>> {
        let mut cmd = self.ctr();
        cmd.args(["plugins", "ls"]);
        let out = run(cmd)?;
        if !out.success {
            bail!("ctr plugins ls: {}", out.output);
        }
        Ok(out
            .output
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                Some((
                    f.first()?.to_string(),
                    f.get(1)?.to_string(),
                    f.last()?.to_string(),
                ))
            })
            .collect())
    }

    /// The gRPC socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Writes `<hosts dir>/<origin host>/hosts.toml` sending pulls of `origin_host` (`127.0.0.1:R`,
    /// as in the image reference) to `mirror_url` (`http://127.0.0.1:P`); returns the hosts dir.
    pub fn write_hosts(&self, origin_host: &str, mirror_url: &str) -> Result<PathBuf> {
        let hosts_dir = self.dir.join("hosts.d");
        let host_dir = hosts_dir.join(origin_host);
        std::fs::create_dir_all(&host_dir).context("creating hosts dir")?;
        let toml = format!(
            "server = \"http://{origin_host}\"\n\n\
             [host.\"{mirror_url}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        );
        std::fs::write(host_dir.join("hosts.toml"), toml).context("writing hosts.toml")?;
        Ok(hosts_dir)
    }

    /// `ctr image pull --hosts-dir HOSTS --snapshotter native [--user] REF` (fetch and unpack).
    pub fn pull(
        &self,
        reference: &str,
        hosts_dir: Option<&Path>,
        creds: Option<&Creds>,
    ) -> Result<CtrOutcome> {
        let mut cmd = self.ctr();
        cmd.args(["image", "pull", "--snapshotter", "native"]);
        hosts_dir
            .map_or(Source::Direct, Source::Hosts)
            .add_to(&mut cmd);
        if let Some(c) = creds {
            cmd.arg("--user").arg(c.colon());
        }
        cmd.arg(reference);
        run(cmd)
    }

    /// `ctr image pull --snapshotter SNAPSHOTTER SOURCE REF`: fetch every blob, then unpack
    /// (without layer labels: containerd 1.6's `ctr image pull` passes none to the snapshotter).
    pub fn pull_into(
        &self,
        snapshotter: &str,
        source: Source<'_>,
        reference: &str,
    ) -> Result<CtrOutcome> {
        let mut cmd = self.ctr();
        cmd.args(["image", "pull", "--snapshotter", snapshotter]);
        source.add_to(&mut cmd);
        cmd.arg(reference);
        run(cmd)
    }

    /// `ctr-remote image rpull --snapshotter SNAPSHOTTER SOURCE REF`: containerd's client-side
    /// unpack with each layer's annotations (and stargz's reference labels) on its `Prepare`, so
    /// a remote snapshotter can provide layers without a download.
    pub fn rpull(
        &self,
        snapshotter: &str,
        source: Source<'_>,
        reference: &str,
    ) -> Result<CtrOutcome> {
        let mut cmd = self.command("ctr-remote");
        cmd.args(["image", "rpull", "--snapshotter", snapshotter]);
        source.add_to(&mut cmd);
        cmd.arg(reference);
        run(cmd)
    }

    /// `ctr run --rm --snapshotter SNAPSHOTTER REF ID ARGS…`: the container's output, its exit
    /// status as success.
    pub fn run(
        &self,
        snapshotter: &str,
        reference: &str,
        id: &str,
        args: &[&str],
    ) -> Result<CtrOutcome> {
        let mut cmd = self.ctr();
        cmd.args(["run", "--rm", "--snapshotter", snapshotter, reference, id]);
        cmd.args(args);
        run(cmd)
    }

    /// `ctr run -d --snapshotter SNAPSHOTTER REF ID ARGS…`, then waits until its task runs.
    pub fn run_detached(
        &self,
        snapshotter: &str,
        reference: &str,
        id: &str,
        args: &[&str],
    ) -> Result<()> {
        let mut cmd = self.ctr();
        cmd.args(["run", "-d", "--snapshotter", snapshotter, reference, id]);
        cmd.args(args);
        run(cmd)?.ok(&format!("ctr run -d {reference} {id}"))?;
        poll(&format!("task {id} to run"), TASK_TIMEOUT, || {
            Ok((self.task_status(id)?.as_deref() == Some("RUNNING")).then_some(()))
        })
    }

    /// `ctr task exec --exec-id EXEC ID ARGS…` in container `id`'s running task.
    pub fn exec(&self, id: &str, exec_id: &str, args: &[&str]) -> Result<CtrOutcome> {
        let mut cmd = self.ctr();
        cmd.args(["task", "exec", "--exec-id", exec_id, id]);
        cmd.args(args);
        run(cmd)
    }

    /// The status of container `id`'s task (`RUNNING`, `STOPPED`, …), `None` without one.
    pub fn task_status(&self, id: &str) -> Result<Option<String>> {
        Ok(self.task(id)?.map(|(_, status)| status))
    }

    /// The host pid of container `id`'s init process, if it has a task.
    pub fn task_pid(&self, id: &str) -> Result<Option<u32>> {
        Ok(self.task(id)?.and_then(|(pid, _)| pid.parse().ok()))
    }

    /// (pid, status) of container `id`'s task, from `ctr task ls` (`TASK PID STATUS`).
    fn task(&self, id: &str) -> Result<Option<(String, String)>> {
        let mut cmd = self.ctr();
        cmd.args(["task", "ls"]);
        let out = run(cmd)?.ok("ctr task ls")?;
        Ok(out
            .lines()
            .skip(1)
            .find_map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
                [task, pid, status] if task == id => Some((pid.to_owned(), status.to_owned())),
                _ => None,
            }))
    }

    /// `ctr task kill -s SIGKILL ID`, `ctr task rm ID` once it stopped, `ctr container rm ID`.
    pub fn kill_and_remove(&self, id: &str) -> Result<()> {
        let mut cmd = self.ctr();
        cmd.args(["task", "kill", "-s", "SIGKILL", id]);
        run(cmd)?.ok(&format!("ctr task kill {id}"))?;
        poll(&format!("task {id} to stop"), TASK_TIMEOUT, || {
            Ok((self.task_status(id)?.as_deref() == Some("STOPPED")).then_some(()))
        })?;
        let mut cmd = self.ctr();
        cmd.args(["task", "rm", id]);
        run(cmd)?.ok(&format!("ctr task rm {id}"))?;
        let mut cmd = self.ctr();
        cmd.args(["container", "rm", id]);
        run(cmd)?.ok(&format!("ctr container rm {id}"))?;
        Ok(())
    }

    /// `ctr image rm --sync REF…`: the image records go, and containerd's garbage collection runs
    /// before the command returns (without `--sync` it waits for its next trigger — 100 more
    /// mutations, or a pause paced by how long the last collection took).
    pub fn remove_images(&self, references: &[String]) -> Result<()> {
        if references.is_empty() {
            return Ok(());
        }
        let mut cmd = self.ctr();
        cmd.args(["image", "rm", "--sync"]).args(references);
        run(cmd)?.ok("ctr image rm")?;
        Ok(())
    }

    /// `ctr snapshots --snapshotter SNAPSHOTTER ls` (containerd's view: the test namespace's
    /// snapshots).
    pub fn snapshots(&self, snapshotter: &str) -> Result<Vec<SnapshotRow>> {
        let mut cmd = self.ctr();
        cmd.args(["snapshots", "--snapshotter", snapshotter, "ls"]);
        let out = run(cmd)?.ok("ctr snapshots ls")?;
        Ok(out
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let (key, parent, kind) = match f.as_slice() {
                    [k, p, kind] => (k, *p, kind),
                    [k, kind] => (k, "", kind),
                    _ => return None,
                };
                Some(SnapshotRow {
                    key: (*key).to_owned(),
                    parent: parent.to_owned(),
                    kind: (*kind).to_owned(),
                })
            })
            .collect())
    }

    /// `ctr snapshots --snapshotter SNAPSHOTTER prepare KEY PARENT`: an active snapshot on
    /// `parent` (what a container start asks of the snapshotter), mounted by nobody.
    pub fn prepare(&self, snapshotter: &str, key: &str, parent: &str) -> Result<CtrOutcome> {
        let mut cmd = self.ctr();
        cmd.args([
            "snapshots",
            "--snapshotter",
            snapshotter,
            "prepare",
            key,
            parent,
        ]);
        run(cmd)
    }

    /// `ctr snapshots --snapshotter SNAPSHOTTER rm KEY`.
    pub fn remove_snapshot(&self, snapshotter: &str, key: &str) -> Result<CtrOutcome> {
        let mut cmd = self.ctr();
        cmd.args(["snapshots", "--snapshotter", snapshotter, "rm", key]);
        run(cmd)
    }

    /// `ctr snapshots --snapshotter SNAPSHOTTER mounts TARGET KEY`: the mount command line that
    /// would mount snapshot `key` (`mount -t overlay overlay TARGET -o …`).
    pub fn snapshot_mounts(&self, snapshotter: &str, key: &str) -> Result<String> {
        let mut cmd = self.ctr();
        cmd.args([
            "snapshots",
            "--snapshotter",
            snapshotter,
            "mounts",
            "/mnt",
            key,
        ]);
        run(cmd)?.ok(&format!("ctr snapshots mounts {key}"))
    }

    /// `ctr image ls -q` in the test namespace.
    pub fn images(&self) -> Result<Vec<String>> {
        let mut cmd = self.ctr();
        cmd.args(["image", "ls", "-q"]);
        let out = run(cmd)?;
        if !out.success {
            bail!("ctr image ls: {}", out.output);
        }
        Ok(out.output.lines().map(str::to_owned).collect())
    }

    fn ctr(&self) -> Command {
        self.command("ctr")
    }

    /// `ctr` or a program built on it (`ctr-remote`) with this daemon's socket and namespace,
    /// in the daemon's place.
    fn command(&self, program: &str) -> Command {
        let mut cmd = self.place.command(program);
        cmd.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", &self.namespace]);
        cmd.env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY")
            .env_remove("http_proxy");
        cmd
    }

    fn wait_ready(&mut self) -> Result<()> {
        poll("containerd to answer `ctr version`", START_TIMEOUT, || {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("containerd exited during start-up: {status}");
                }
            }
            let mut cmd = self.ctr();
            cmd.arg("version");
            Ok(run(cmd)?.success.then_some(()))
        })
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Best effort: a task left by a failed test would outlive the daemon in its shim.
        if self.child.is_some() {
            let mut cmd = self.ctr();
            cmd.args(["task", "ls", "-q"]);
            if let Ok(out) = run(cmd) {
                for id in out.output.lines().map(str::trim).filter(|l| !l.is_empty()) {
                    let mut kill = self.ctr();
                    kill.args(["task", "rm", "--force", id]);
                    let _ = run(kill);
                }
            }
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A containerd config as `shoal config containerd --write --snapshotter` makes it of Debian's
/// stock `config.toml`, under a root of the test's own (`<t>/<label>`): `[proxy_plugins.shoal]`
/// at `snapshotter_socket`, and a `hosts.toml` sending pulls of `registry_host` (`IP:PORT`, as
/// image references name it; served at `registry_url`) to the node's mirror at `mirror_url`.
/// Returns the config file and the hosts directory (`--hosts-dir`).
pub fn shoal_config(
    t: &TestCtx,
    label: &str,
    registry_host: &str,
    registry_url: &str,
    mirror_url: &str,
    snapshotter_socket: &Path,
) -> Result<(PathBuf, PathBuf)> {
    let root = t.subdir(label)?;
    let config = root.join("etc/containerd/config.toml");
    std::fs::create_dir_all(config.parent().context("config dir")?)?;
    let stock = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/runtime/debian-containerd-config.toml");
    std::fs::copy(&stock, &config).context("copying Debian's containerd config")?;
    let out = Command::new(crate::paths::shoal_bin()?)
        .args(["config", "containerd", "--write", "--root"])
        .arg(&root)
        .arg("--registry")
        .arg(format!("{registry_host}={registry_url}"))
        .args([
            "--mirror",
            mirror_url,
            "--snapshotter",
            "--snapshotter-socket",
        ])
        .arg(snapshotter_socket)
        .env_remove("SHOAL_CONFIG")
        .output()
        .context("running shoal config containerd")?;
    ensure!(
        out.status.success(),
        "shoal config containerd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((config, root.join("etc/containerd/certs.d")))
}

fn config_toml(dir: &Path, socket: &Path) -> String {
    let d = dir.display();
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#,
        sock = socket.display()
    )
}

/// Shell lines that mount this machine's cgroup hierarchies (as `/proc/self/mountinfo` lists
/// them under `/sys/fs/cgroup`: a tmpfs with v1 hierarchies, or cgroup2 alone) where they are
/// missing; runc needs them, and the sysfs `ip netns exec` mounted has none.
fn cgroup_script() -> Result<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    let mut script = String::new();
    for line in info.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(point) = left.split(' ').nth(4) else {
            continue;
        };
        if !(point == "/sys/fs/cgroup" || point.starts_with("/sys/fs/cgroup/")) {
            continue;
        }
        let mut f = right.split(' ');
        let (Some(fstype), Some(source), Some(opts)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if !matches!(fstype, "tmpfs" | "cgroup" | "cgroup2") {
            continue;
        }
        let opts: Vec<&str> = opts
            .split(',')
            .filter(|o| {
                !matches!(*o, "rw" | "ro") && !o.starts_with("size=") && !o.starts_with("inode64")
            })
            .collect();
        let opts = if opts.is_empty() {
            String::new()
        } else {
            format!("-o {}", opts.join(","))
        };
        script.push_str(&format!(
            "mountpoint -q {point} || {{ mkdir -p {point}; mount -t {fstype} {opts} {source} {point}; }}\n"
        ));
    }
    Ok(script)
}

fn run(mut cmd: Command) -> Result<CtrOutcome> {
    let out = cmd.output().context("running ctr")?;
    let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
    output.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok(CtrOutcome {
        success: out.status.success(),
        output,
    })
}
