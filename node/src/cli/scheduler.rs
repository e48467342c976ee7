//! `shoal scheduler`: load config, init logging, run a scheduler until
//! SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

use super::node::{init_tracing, shutdown_signal};
use shoal_scheduler::config::{FileConfig, LogFormat as SchedLogFormat};

use crate::config::LogFormat;

/// Run a scheduler: nodes announce which blob pieces they hold and ask it
/// who to fetch a blob from, and which one node may fetch it from the origin.
///
/// With no flags it listens on 0.0.0.0:5060 and owns every blob. Its state is
/// in memory; after a restart the nodes' next announcements rebuild it within
/// seconds. Point nodes at it with `shoal node --scheduler HOST:5060`.
///
/// Status page: http://HOST:5060/ (JSON at /api/v1/status, Prometheus
/// metrics at /metrics). With a join secret, the page and JSON answer only
/// signed requests (they name blobs and node addresses): use
/// `--status-listen 127.0.0.1:5061` for an unsigned, read-only operator
/// listener on loopback.
///
/// Several schedulers split the blobs between them: give each the same
/// `cluster` list and its own `advertise` entry in the config file (see
/// deploy/scheduler.toml), and give nodes the same list.
#[derive(Args, Debug)]
pub struct SchedulerArgs {
    /// TOML config file (see deploy/scheduler.toml for every field).
    #[arg(long, env = "SHOAL_SCHEDULER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address nodes reach the scheduler at (config: listen)
    /// [default: 0.0.0.0:5060].
    #[arg(long, env = "SHOAL_SCHEDULER_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// This scheduler's entry in the cluster list, as nodes name it
    /// (config: advertise), e.g. `$(POD_NAME).shoal-scheduler.shoal.svc:5060`
    /// in a StatefulSet.
    #[arg(long, env = "SHOAL_SCHEDULER_ADVERTISE", value_name = "HOST:PORT")]
    pub advertise: Option<String>,
    /// Every scheduler of the cluster, this one included; repeatable or
    /// comma-separated; replaces the config's list (config: cluster).
    #[arg(
        long,
        env = "SHOAL_SCHEDULER_CLUSTER",
        value_name = "HOST:PORT",
        value_delimiter = ','
    )]
    pub cluster: Vec<String>,
    /// The cluster join secret, the same file the nodes use: only requests
    /// signed with it may change the scheduler's state (config:
    /// join_secret_file).
    #[arg(long, env = "SHOAL_JOIN_SECRET_FILE", value_name = "FILE")]
    pub join_secret_file: Option<PathBuf>,
    /// A read-only, unsigned operator listener for the status page, JSON and
    /// metrics; keep it on loopback (config: status_listen).
    #[arg(long, env = "SHOAL_SCHEDULER_STATUS_LISTEN", value_name = "ADDR")]
    pub status_listen: Option<SocketAddr>,
    /// Log format (config: log.format).
    #[arg(long, env = "SHOAL_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Log filter, e.g. `info` or `shoal_scheduler=debug` (config: log.level;
    /// RUST_LOG wins).
    #[arg(long, env = "SHOAL_LOG_LEVEL")]
    pub log_level: Option<String>,
}

pub fn run(args: SchedulerArgs) -> anyhow::Result<std::process::ExitCode> {
    let mut file = match &args.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    if let Some(l) = args.listen {
        file.listen = l;
    }
    if let Some(f) = args.join_secret_file {
        file.join_secret_file = Some(f);
    }
    if let Some(a) = args.status_listen {
        file.status_listen = Some(a);
    }
    if let Some(a) = args.advertise {
        file.advertise = Some(a);
    }
    if !args.cluster.is_empty() {
        file.cluster = args.cluster;
    }
    if let Some(f) = args.log_format {
        file.log.format = match f {
            LogFormat::Text => SchedLogFormat::Text,
            LogFormat::Json => SchedLogFormat::Json,
        };
    }
    if let Some(l) = args.log_level {
        file.log.level = l;
    }
    let cfg = file.validate()?;
    let level = super::Verbosity::get().level().unwrap_or(&cfg.log.level);
    init_tracing(matches!(cfg.log.format, SchedLogFormat::Json), level);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(shoal_scheduler::run(cfg, shutdown_signal()))?;
    Ok(std::process::ExitCode::SUCCESS)
}
