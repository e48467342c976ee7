//! `shoal node`: load config, init logging, run until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

use crate::config::{FileConfig, LogFormat};

/// Run a node.
///
/// With no flags it runs a single-host node: mirror on 127.0.0.1:5050,
/// read-only admin listener on 127.0.0.1:5051, control socket
/// /run/shoal/control.sock, store in /var/lib/shoal (as root), keeping its
/// filesystem below 85 % full.
///
/// Example, in front of a local registry:
///
///   shoal node --data-dir /tmp/shoal --upstream http://127.0.0.1:5000
///
/// then pull through it, e.g.
/// `skopeo copy --src-tls-verify=false docker://127.0.0.1:5050/repo:tag oci:out`,
/// or point containerd at it with a hosts.toml (see deploy/).
#[derive(Args, Debug)]
pub struct NodeArgs {
    /// TOML config file (see deploy/node.toml for every field).
    #[arg(long, env = "SHOAL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Store directory (config: data_dir).
    #[arg(long, env = "SHOAL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Disk quota for cached content, e.g. `20GiB` (config: store.quota) [default: keep the
    /// data dir's filesystem below 85 % full; `0`: unlimited].
    #[arg(long, env = "SHOAL_STORE_QUOTA", value_parser = crate::units::ByteSize::parse)]
    pub store_quota: Option<crate::units::ByteSize>,
    /// Mirror/proxy address (config: listen) [default: 127.0.0.1:5050].
    #[arg(long, env = "SHOAL_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// The read-only admin listener: health, metrics, status JSON (config:
    /// admin) [default: 127.0.0.1:5051].
    #[arg(long, env = "SHOAL_ADMIN")]
    pub admin: Option<SocketAddr>,
    /// The Unix socket for state-changing calls (mounts, …), usable by
    /// root, the node's user and `control_group` only (config: control)
    /// [default: /run/shoal/control.sock as root].
    #[arg(long, env = "SHOAL_CONTROL", value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// The Unix socket serving containerd's snapshots API: containerd's `[proxy_plugins.shoal]`
    /// (type "snapshot") points here, and `--snapshotter shoal` uses it (config:
    /// snapshotter.socket) [default: /run/shoal/snapshotter.sock as root].
    #[arg(long, env = "SHOAL_SNAPSHOTTER_SOCKET", value_name = "PATH")]
    pub snapshotter_socket: Option<PathBuf>,
    /// Origin registry: `URL` sets the default origin, `HOST=URL` the origin
    /// for registry HOST (as containerd names it in ?ns=). http:// means
    /// plain HTTP. Repeatable; SHOAL_UPSTREAM takes a comma-separated list (config: [[upstream]]).
    #[arg(
        long,
        value_name = "[HOST=]URL",
        env = "SHOAL_UPSTREAM",
        value_delimiter = ','
    )]
    pub upstream: Vec<String>,
    /// Where peers reach this node's QUIC data plane, `IP:PORT` (config:
    /// p2p.listen) [default: 0.0.0.0:5052]. The DHT listens on TCP at the
    /// same IP, port 5053 (p2p.dht_listen).
    #[arg(long, env = "SHOAL_P2P", value_name = "ADDR")]
    pub p2p: Option<SocketAddr>,
    /// A scheduler, `host:port`; repeatable, the same list on every node
    /// (config: p2p.schedulers). SHOAL_SCHEDULER takes a comma-separated list.
    #[arg(
        long,
        value_name = "ADDR",
        env = "SHOAL_SCHEDULER",
        value_delimiter = ','
    )]
    pub scheduler: Vec<String>,
    /// A DHT bootstrap peer, `host:port` of its DHT listener; repeatable
    /// (config: p2p.peers). SHOAL_PEER takes a comma-separated list.
    #[arg(long, value_name = "ADDR", env = "SHOAL_PEER", value_delimiter = ',')]
    pub peer: Vec<String>,
    /// The cluster join secret (64+ hex characters, e.g. from `openssl
    /// rand -hex 32`). Without it the node is standalone (config:
    /// p2p.join_secret_file).
    #[arg(long, env = "SHOAL_JOIN_SECRET_FILE", value_name = "FILE")]
    pub join_secret_file: Option<PathBuf>,
    /// Zone/rack label; same-zone peers are preferred (config: p2p.zone).
    #[arg(long, env = "SHOAL_ZONE")]
    pub zone: Option<String>,
    /// Log format (config: log.format).
    #[arg(long, env = "SHOAL_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Log filter, e.g. `info` or `shoal_node=debug` (config: log.level;
    /// RUST_LOG wins).
    #[arg(long, env = "SHOAL_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Set any config field by its dotted name, e.g. `--set mirror.max_tunnels=64` or `--set
    /// p2p.upload_rate=100MiB` (every field of deploy/node.toml; the value is TOML or a plain
    /// string). Repeatable, applied after the file and before the other flags; SHOAL_SET takes
    /// a `;`-separated list.
    #[arg(
        long,
        value_name = "KEY=VALUE",
        env = "SHOAL_SET",
        value_delimiter = ';'
    )]
    pub set: Vec<String>,
}

pub fn run(args: NodeArgs) -> anyhow::Result<std::process::ExitCode> {
    // Before any thread starts: threads keep the malloc arena they first got.
    crate::heap::limit_arenas();
    let file = file_config(args)?;
    let cfg = file.validate()?;
    let level = super::Verbosity::get().level().unwrap_or(&cfg.log.level);
    init_tracing(cfg.log.format == LogFormat::Json, level);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(crate::node::run(cfg, shutdown_signal()))?;
    Ok(std::process::ExitCode::SUCCESS)
}

/// The config file (or defaults) with `SHOAL_*` variables and flags laid
/// over it, not yet validated (`shoal config check|print` use it too).
pub fn file_config(args: NodeArgs) -> anyhow::Result<FileConfig> {
    let mut file = match &args.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    for setting in args.set.iter().filter(|s| !s.trim().is_empty()) {
        file = file.with_setting(setting.trim())?;
    }
    if let Some(d) = args.data_dir {
        file.data_dir = Some(d);
    }
    if let Some(q) = args.store_quota {
        file.store.quota = Some(q);
    }
    if let Some(l) = args.listen {
        file.listen = l;
    }
    if let Some(a) = args.admin {
        file.admin = a;
    }
    if let Some(c) = args.control {
        file.control = Some(c);
    }
    if let Some(s) = args.snapshotter_socket {
        file.snapshotter.socket = Some(s);
    }
    if let Some(f) = args.log_format {
        file.log.format = f;
    }
    if let Some(l) = args.log_level {
        file.log.level = l;
    }
    for u in &args.upstream {
        file.add_upstream_flag(u);
    }
    if let Some(p) = args.p2p {
        file.p2p.listen = p;
    }
    file.p2p.schedulers.extend(args.scheduler);
    file.p2p.peers.extend(args.peer);
    if let Some(f) = args.join_secret_file {
        file.p2p.join_secret_file = Some(f);
    }
    if let Some(z) = args.zone {
        file.p2p.zone = Some(z);
    }
    Ok(file)
}

/// Logs to stderr as text or JSON; `RUST_LOG` overrides `level`. Shared by
/// the long-running subcommands.
pub fn init_tracing(json: bool, level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal: a log file or journald gets
    // plain text (NO_COLOR is honoured too).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Resolves on SIGTERM or SIGINT.
pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
