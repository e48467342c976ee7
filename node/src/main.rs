//! `shoal`: parse the command line and hand off to the subcommand.

use std::process::ExitCode;

use clap::Parser;
use shoal_node::cli::{self, Cli, Command, Verbosity};

fn main() -> ExitCode {
    // rustls with the ring provider; must happen before any TLS client exists.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let verbosity = Verbosity {
        verbose: cli.verbose,
        quiet: cli.quiet,
    };
    verbosity.set();
    // The daemons set up their own logging from their config; client commands log warnings
    // (or what -v/-q say) to stderr.
    if !matches!(cli.command, Command::Node(_) | Command::Scheduler(_)) {
        cli::node::init_tracing(false, verbosity.client_level());
    }
    let result = match cli.command {
        Command::Node(a) => cli::node::run(a),
        Command::Status(a) => cli::status::run(a),
        Command::Rafs(c) => cli::rafs::run(c),
        Command::Scheduler(a) => cli::scheduler::run(a),
        Command::Mount(a) => cli::mount::run_mount(a),
        Command::Umount(a) => cli::mount::run_umount(a),
        Command::Mounts(a) => cli::mount::run_mounts(a),
        Command::Convert(a) => cli::convert::run(a),
        Command::Prewarm(a) => cli::prewarm::run(a),
        Command::Config(c) => cli::config::run(c),
        Command::Completions(a) => cli::complete::run_completions(a),
        Command::Man(a) => cli::complete::run_man(a),
        Command::ImageServer(a) => cli::image_server::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("shoal: {e:#}");
            cli::exit::code_for(&e)
        }
    }
}
