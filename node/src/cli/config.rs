//! `shoal config`: write the container runtimes' configuration for using the
//! local node (containerd, Docker, CRI-O, nydusd), idempotently and
//! reversibly, and check or print the node's own effective configuration.
//!
//! Without `--write` a runtime subcommand prints the files it would write and
//! changes nothing. `--write` backs up every file it changes (see
//! [`files`]); running it again changes nothing; `--undo` puts the originals
//! back byte for byte. `--root DIR` treats DIR as `/` (a host's filesystem
//! mounted into a container, an image being built, a test).
//!
//! Files: `containerd`, `docker`, `crio`, `nydusd` (one runtime each, pure
//! "current files → wanted files" functions), `files` (backup, apply, undo).

mod containerd;
mod crio;
mod docker;
mod files;
mod nydusd;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use crate::config::FileConfig;
use files::{Outcome, Plan};

pub use containerd::{DIAL_TIMEOUT, SNAPSHOTTER};

/// Configure container runtimes to use this node, or check the node's config.
#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// containerd: hosts.toml per registry (node first, registry as fallback),
    /// config_path, and with --snapshotter the `shoal` snapshotter.
    Containerd(ContainerdArgs),
    /// Docker: the node first in registry-mirrors (Docker Hub only).
    Docker(FileArgs),
    /// CRI-O / podman: a mirror in registries.conf for the node's default
    /// registry.
    Crio(CrioArgs),
    /// nydusd: the registry backend's proxy section (url, ping_url, fallback).
    Nydusd(FileArgs),
    /// Validate a node config (file, SHOAL_* variables and flags) and say what
    /// is wrong, naming the field.
    Check(super::node::NodeArgs),
    /// Print the node's effective config (defaults, file, SHOAL_* variables
    /// and flags) as TOML; passwords are redacted.
    Print(super::node::NodeArgs),
}

/// What every runtime subcommand takes.
#[derive(Args, Debug)]
pub struct Common {
    /// Write the files (without it, print what would be written).
    #[arg(long, conflicts_with = "undo")]
    pub write: bool,
    /// Put back what an earlier --write changed, byte for byte, and remove
    /// the files and directories it created.
    #[arg(long)]
    pub undo: bool,
    /// With --undo: restore even files edited since shoal wrote them.
    #[arg(long, requires = "undo")]
    pub force: bool,
    /// Treat DIR as the filesystem root (e.g. the host mounted at /host).
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,
    /// The node's mirror URL [default: http://127.0.0.1:PORT, PORT from the
    /// node config's listen].
    #[arg(long, value_name = "URL")]
    pub mirror: Option<String>,
    /// The node config to take listen and upstreams from.
    #[arg(long, env = "SHOAL_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ContainerdArgs {
    #[command(flatten)]
    pub common: Common,
    /// A registry to send through the node, `HOST` or `HOST=URL` (URL: the
    /// registry itself, the fallback). Repeatable. Default: the node config's
    /// upstreams, else docker.io.
    #[arg(long, value_name = "HOST[=URL]")]
    pub registry: Vec<String>,
    /// Also make `shoal` containerd's CRI snapshotter (proxy plugin on
    /// --snapshotter-socket). Off by default: every pod start then depends on
    /// the node, and images unpacked by the old snapshotter are pulled again.
    #[arg(long)]
    pub snapshotter: bool,
    /// The node's snapshots API socket.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/run/shoal/snapshotter.sock"
    )]
    pub snapshotter_socket: PathBuf,
    /// containerd's config file [default: found: k3s, RKE2, k0s, else
    /// /etc/containerd/config.toml].
    #[arg(long, value_name = "FILE")]
    pub containerd_config: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct CrioArgs {
    #[command(flatten)]
    pub common: Common,
    /// The registry to mirror, `HOST` or `HOST=URL` [default: the node's
    /// default upstream, else docker.io].
    #[arg(long, value_name = "HOST[=URL]")]
    pub registry: Option<String>,
    /// registries.conf [default: /etc/containers/registries.conf].
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct FileArgs {
    #[command(flatten)]
    pub common: Common,
    /// The file [default: /etc/docker/daemon.json, /etc/nydus/nydusd-config.json].
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
}

/// A registry as containerd names it, and where it really is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registry {
    /// `docker.io`, `ghcr.io`, `10.0.0.2:5000`.
    pub host: String,
    /// `https://registry-1.docker.io`, `http://10.0.0.2:5000`.
    pub server: String,
}

impl Registry {
    /// `HOST` or `HOST=URL`.
    pub fn parse(s: &str) -> Result<Self> {
        let (host, server) = match s.split_once('=') {
            Some((h, u)) => (h, Some(u.trim_end_matches('/').to_owned())),
            None => (s, None),
        };
        let plain = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
        if !plain || host == "_default" {
            bail!("{host:?}: a registry is a host[:port] like docker.io or 10.0.0.2:5000");
        }
        let server = match server {
            Some(u) if u.starts_with("http://") || u.starts_with("https://") => u,
            Some(u) => bail!("{u:?}: the registry URL must start with http:// or https://"),
            None if host == "docker.io" => "https://registry-1.docker.io".into(),
            None => format!("https://{host}"),
        };
        Ok(Self {
            host: host.to_owned(),
            server,
        })
    }

    /// `host[:port]` of `server` (containers-registries.conf's `location`).
    pub fn location(&self) -> String {
        let s = self.server.split_once("://").map_or(&*self.server, |x| x.1);
        s.trim_end_matches('/').to_owned()
    }
}

/// Runs a `shoal config` subcommand.
pub fn run(cmd: ConfigCommand) -> Result<ExitCode> {
    match cmd {
        ConfigCommand::Check(args) => {
            let file = super::node::file_config(args)?;
            file.validate()?;
            println!("config ok");
            Ok(ExitCode::SUCCESS)
        }
        ConfigCommand::Print(args) => {
            let mut file = super::node::file_config(args)?;
            for u in &mut file.upstreams {
                if u.password.is_some() {
                    u.password = Some("<redacted>".into());
                }
            }
            print!("{}", toml::to_string(&file).context("printing the config")?);
            Ok(ExitCode::SUCCESS)
        }
        ConfigCommand::Containerd(a) => {
            let node = node_config(&a.common)?;
            let registries = if a.registry.is_empty() {
                default_registries(&node)
            } else {
                a.registry
                    .iter()
                    .map(|r| Registry::parse(r))
                    .collect::<Result<_>>()?
            };
            let root = &a.common.root;
            let layout = containerd::detect(root, a.containerd_config.as_deref())?;
            let opts = containerd::Options {
                registries,
                mirror: mirror_url(&a.common, &node),
                snapshotter: a.snapshotter,
                snapshotter_socket: a.snapshotter_socket.clone(),
            };
            finish(&a.common, "containerd", || {
                containerd::plan(root, &layout, &opts)
            })
        }
        ConfigCommand::Docker(a) => {
            let node = node_config(&a.common)?;
            let mirror = mirror_url(&a.common, &node);
            finish(&a.common, "docker", || {
                docker::plan(&a.common.root, a.file.as_deref(), &mirror)
            })
        }
        ConfigCommand::Crio(a) => {
            let node = node_config(&a.common)?;
            let registry = match &a.registry {
                Some(r) => Registry::parse(r)?,
                None => default_registries(&node)
                    .into_iter()
                    .next()
                    .context("no registry")?,
            };
            let mirror = mirror_url(&a.common, &node);
            let location = Registry::parse(&format!("x={mirror}"))?.location();
            finish(&a.common, "crio", || {
                crio::plan(&a.common.root, a.file.as_deref(), &registry, &location)
            })
        }
        ConfigCommand::Nydusd(a) => {
            let node = node_config(&a.common)?;
            let mirror = mirror_url(&a.common, &node);
            finish(&a.common, "nydusd", || {
                nydusd::plan(&a.common.root, a.file.as_deref(), &mirror)
            })
        }
    }
}

/// Print, write or undo, as `common` says.
fn finish(
    common: &Common,
    runtime: &'static str,
    plan: impl FnOnce() -> Result<Plan>,
) -> Result<ExitCode> {
    let root = &common.root;
    if common.undo {
        let done = files::undo(root, runtime, common.force)?;
        if done.is_empty() {
            println!("nothing to undo for {runtime}");
        }
        report(&done);
        return Ok(ExitCode::SUCCESS);
    }
    let plan = plan()?;
    if common.write {
        let done = files::apply(root, &plan)?;
        report(&done);
        if done.iter().any(|(_, o)| *o != Outcome::Unchanged) {
            notes(&plan.notes);
        }
        return Ok(ExitCode::SUCCESS);
    }
    for ((path, outcome), wanted) in files::preview(root, &plan)?.iter().zip(&plan.files) {
        println!("# {} ({})", path.display(), label(outcome));
        print!("{}", String::from_utf8_lossy(&wanted.content));
        println!();
    }
    if plan.files.is_empty() {
        println!("# nothing to change");
    }
    notes(&plan.notes);
    if !super::Verbosity::get().quiet {
        eprintln!("(printed only; --write writes these files with a backup, --undo restores it)");
    }
    Ok(ExitCode::SUCCESS)
}

/// The plan's notes on stderr, unless `-q`.
fn notes(notes: &[String]) {
    if super::Verbosity::get().quiet {
        return;
    }
    for n in notes {
        eprintln!("note: {n}");
    }
}

fn report(done: &[(PathBuf, Outcome)]) {
    for (path, outcome) in done {
        println!("{:<9} {}", label(outcome), path.display());
    }
}

fn label(o: &Outcome) -> &'static str {
    match o {
        Outcome::Unchanged => "unchanged",
        Outcome::Created => "created",
        Outcome::Changed => "changed",
        Outcome::Restored => "restored",
        Outcome::Removed => "removed",
    }
}

fn node_config(common: &Common) -> Result<FileConfig> {
    match &common.config {
        Some(p) => Ok(FileConfig::load(p)?),
        None => Ok(FileConfig::default()),
    }
}

/// The node config's upstreams (default first), else docker.io.
fn default_registries(node: &FileConfig) -> Vec<Registry> {
    let mut ups: Vec<_> = node.upstreams.iter().collect();
    ups.sort_by_key(|u| !u.default);
    let mut out: Vec<Registry> = ups
        .iter()
        .filter_map(|u| {
            let url = reqwest::Url::parse(&u.url).ok()?;
            let host = match (&u.host, url.host_str(), url.port()) {
                (Some(h), _, _) => h.clone(),
                (None, Some(h), Some(p)) => format!("{h}:{p}"),
                (None, Some(h), None) => h.to_owned(),
                (None, None, _) => return None,
            };
            Some(Registry {
                host,
                server: u.url.trim_end_matches('/').to_owned(),
            })
        })
        .collect();
    if out.is_empty() {
        out.push(Registry {
            host: "docker.io".into(),
            server: "https://registry-1.docker.io".into(),
        });
    }
    out
}

/// `--mirror`, else the node's listen port on loopback (a node listening on
/// every address is still reached on 127.0.0.1 from its own host).
fn mirror_url(common: &Common, node: &FileConfig) -> String {
    if let Some(m) = &common.mirror {
        return m.trim_end_matches('/').to_owned();
    }
    let l = node.listen;
    let ip = if l.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        l.ip()
    };
    format!("http://{}", std::net::SocketAddr::new(ip, l.port()))
}

/// For callers that need a host path joined under a root (tests, e2e).
pub fn under_root(root: &Path, host_path: &Path) -> Result<PathBuf> {
    files::under(root, host_path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_forms() {
        let r = Registry::parse("docker.io").expect("plain");
        assert_eq!(r.server, "https://registry-1.docker.io");
        let r = Registry::parse("10.0.0.2:5000=http://10.0.0.2:5000/").expect("with url");
        assert_eq!(r.server, "http://10.0.0.2:5000");
        assert_eq!(r.location(), "10.0.0.2:5000");
        for bad in ["", "_default", "a/b", "x=ftp://y", "../etc"] {
            assert!(Registry::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mirror_defaults_to_loopback_on_the_listen_port() {
        let mut node = FileConfig {
            listen: "0.0.0.0:6000".parse().expect("addr"),
            ..FileConfig::default()
        };
        let common = Common {
            write: false,
            undo: false,
            force: false,
            root: "/".into(),
            mirror: None,
            config: None,
        };
        assert_eq!(mirror_url(&common, &node), "http://127.0.0.1:6000");
        assert_eq!(default_registries(&node)[0].host, "docker.io");
        node.add_upstream_flag("10.1.2.3:5000=http://10.1.2.3:5000");
        assert_eq!(default_registries(&node)[0].server, "http://10.1.2.3:5000");
    }
}
