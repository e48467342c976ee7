//! A private containerd daemon (own root, state, gRPC socket and config under the test's temp dir;
//! CRI and the snapshotters that need special filesystems disabled) and `ctr image pull` against it
//! with a `hosts.toml` directory (containerd 1.6: `ctr image pull --hosts-dir DIR --snapshotter
//! native [--user u:p] REF`).
//!
//! Invariant: the daemon is SIGKILLed on drop; nothing outside the temp dir is touched.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::registry::Creds;
use crate::wait::poll;
use crate::TestCtx;

/// How long containerd may take to answer `ctr version`.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The containerd namespace the tests use.
const NAMESPACE: &str = "shoal-e2e";

/// A running private containerd.
#[derive(Debug)]
pub struct Containerd {
    dir: PathBuf,
    socket: PathBuf,
    child: Option<Child>,
}

/// What a `ctr` run did.
#[derive(Debug)]
pub struct CtrOutcome {
    pub success: bool,
    pub output: String,
}

impl Containerd {
    /// Starts the daemon and waits until `ctr version` answers.
    pub fn start(t: &TestCtx) -> Result<Self> {
        // containerd's unix socket paths must stay under ~108 bytes: keep them short.
        let dir = t.subdir("ctrd")?;
        let socket = dir.join("c.sock");
        let config = dir.join("config.toml");
        std::fs::write(&config, config_toml(&dir, &socket)).context("writing containerd config")?;
        Self::spawn(t, dir, socket, &config, false)
    }

    /// Starts Debian's containerd with a config file the test did not write (a runtime config that
    /// `shoal config containerd` produced), its root, state and socket moved into the test's dir by
    /// command-line flags so the file is used exactly as it is.
    pub fn start_with_config(t: &TestCtx, config: &Path) -> Result<Self> {
        let dir = t.subdir("ctrd")?;
        let socket = dir.join("c.sock");
        Self::spawn(t, dir, socket, config, true)
    }

    /// Spawns containerd with `config` (and, with `relocate`, root/state/socket flags into `dir`)
    /// and waits until it answers.
    fn spawn(
        t: &TestCtx,
        dir: PathBuf,
        socket: PathBuf,
        config: &Path,
        relocate: bool,
    ) -> Result<Self> {
        let log_path = dir.join("containerd.log");
        t.register_log("containerd", &log_path);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(config);
        if relocate {
            cmd.arg("--root")
                .arg(dir.join("root"))
                .arg("--state")
                .arg(dir.join("state"))
                .arg("--address")
                .arg(&socket);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting containerd")?;
        let mut daemon = Self {
            dir,
            socket,
            child: Some(child),
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
        match hosts_dir {
            Some(dir) => cmd.arg("--hosts-dir").arg(dir),
            None => cmd.arg("--plain-http"),
        };
        if let Some(c) = creds {
            cmd.arg("--user").arg(c.colon());
        }
        cmd.arg(reference);
        run(cmd)
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
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", NAMESPACE]);
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
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
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

fn run(mut cmd: Command) -> Result<CtrOutcome> {
    let out = cmd.output().context("running ctr")?;
    let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
    output.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok(CtrOutcome {
        success: out.status.success(),
        output,
    })
}
