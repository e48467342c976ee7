//! The `shoal` command line: one binary, one subcommand per file.

pub mod config;
pub mod convert;
pub mod mount;
pub mod node;
pub mod prewarm;
pub mod rafs;
pub mod scheduler;
pub mod status;

use clap::{Parser, Subcommand};

/// shoal: a peer-to-peer blob cache and registry mirror for container images.
///
/// Run `shoal node` on every host and point containerd, Docker, CRI-O or
/// nydusd at it as a registry mirror; `shoal status` shows what it holds.
#[derive(Parser, Debug)]
#[command(name = "shoal", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a node: registry mirror, HTTP proxy and blob cache.
    Node(node::NodeArgs),
    /// Show what a running node holds and has done.
    Status(status::StatusArgs),
    /// Lazily mount a Nydus image through the local node.
    Mount(mount::MountArgs),
    /// Unmount a lazy mount.
    Umount(mount::UmountArgs),
    /// List the node's lazy mounts and their numbers.
    Mounts(mount::MountsArgs),
    // Help text: `prewarm::PrewarmArgs`.
    Prewarm(prewarm::PrewarmArgs),
    /// Run a scheduler: piece availability, parent ranking, origin leases.
    Scheduler(scheduler::SchedulerArgs),
    /// Convert an OCI/Docker image into a Nydus image, registry to registry.
    Convert(convert::ConvertArgs),
    /// Configure containerd, Docker, CRI-O or nydusd to use this node
    /// (printed, or written with a backup and undone), and check or print the
    /// node's own config.
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// Nydus RAFS images: build, merge, inspect, check, unpack.
    #[command(subcommand)]
    Rafs(rafs::RafsCommand),
}
