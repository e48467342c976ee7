//! The `shoal` command line: one binary, one subcommand per file.

pub mod bars;
pub mod complete;
pub mod config;
pub mod convert;
pub mod exit;
pub mod image_server;
pub mod mount;
pub mod node;
pub mod prewarm;
pub mod rafs;
pub mod scheduler;
pub mod status;

use std::sync::OnceLock;

use clap::{ArgAction, Parser, Subcommand};

/// shoal: a peer-to-peer blob cache and registry mirror for container images.
///
/// Run `shoal node` on every host and point containerd, Docker, CRI-O or
/// nydusd at it as a registry mirror; `shoal status` shows what it holds.
#[derive(Parser, Debug)]
///
/// Exit codes, the same for every command: 0 done; 1 the operation failed; 2 the command line is
/// wrong; 3 the node, scheduler or registry could not be reached; 4 cancelled.
#[command(name = "shoal", version, propagate_version = true)]
pub struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace); for `node` and `scheduler` it overrides
    /// their log level. RUST_LOG wins over both.
    #[arg(short, long, action = ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Errors only: no progress display, no notes, no warnings in the log.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
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
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(complete::CompletionsArgs),
    /// Write man pages: shoal(1) and one per subcommand.
    Man(complete::ManArgs),
    /// Internal: hold one image mount of the containerd snapshotter for the node.
    #[command(hide = true)]
    ImageServer(image_server::ImageServerArgs),
}

/// How much a command says, from `-v`/`-q` (set once by `main`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Verbosity {
    pub verbose: u8,
    pub quiet: bool,
}

static VERBOSITY: OnceLock<Verbosity> = OnceLock::new();

impl Verbosity {
    /// Record the command line's choice; later calls are ignored.
    pub fn set(self) {
        let _ = VERBOSITY.set(self);
    }

    /// What `-v`/`-q` chose (the default when `main` did not set it, as in tests).
    pub fn get() -> Verbosity {
        VERBOSITY.get().copied().unwrap_or_default()
    }

    /// The log filter for a client command (warnings by default).
    pub fn client_level(self) -> &'static str {
        self.level().unwrap_or("warn")
    }

    /// The log filter `-v`/`-q` impose, if they were given.
    pub fn level(self) -> Option<&'static str> {
        match (self.quiet, self.verbose) {
            (true, _) => Some("error"),
            (false, 0) => None,
            (false, 1) => Some("info"),
            (false, 2) => Some("debug"),
            (false, _) => Some("trace"),
        }
    }

    /// Whether to draw progress: a person at a terminal, not `-q`.
    pub fn show_progress(self) -> bool {
        !self.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn verbosity_flags_go_anywhere() {
        let v = |args: &[&str]| {
            let c = Cli::try_parse_from(args).map_err(|e| e.to_string())?;
            Ok::<_, String>(Verbosity {
                verbose: c.verbose,
                quiet: c.quiet,
            })
        };
        assert_eq!(
            v(&["shoal", "-vv", "mounts"]).unwrap().level(),
            Some("debug")
        );
        assert_eq!(v(&["shoal", "mounts", "-v"]).unwrap().level(), Some("info"));
        assert_eq!(
            v(&["shoal", "status", "-q"]).unwrap().level(),
            Some("error")
        );
        assert_eq!(v(&["shoal", "status"]).unwrap().client_level(), "warn");
        assert!(v(&["shoal", "-q", "-v", "status"]).is_err());
    }

    /// The daemons are configured by environment in systemd units and Kubernetes manifests:
    /// every flag of `shoal node` and `shoal scheduler` has its `SHOAL_*` variable.
    #[test]
    fn every_daemon_flag_has_an_environment_variable() {
        let cli = Cli::command();
        for sub in ["node", "scheduler"] {
            let cmd = cli.find_subcommand(sub).unwrap();
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version" | "verbose" | "quiet") {
                    continue;
                }
                let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
                assert!(
                    env.as_deref().is_some_and(|e| e.starts_with("SHOAL_")),
                    "shoal {sub} --{id} has no SHOAL_* variable"
                );
            }
        }
    }
}
