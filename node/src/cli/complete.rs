//! `shoal completions SHELL` and `shoal man`: shell completion scripts and man pages, generated
//! from the same clap definitions the binary parses with, so they never drift from it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, CommandFactory as _};
use clap_complete::Shell;

use super::Cli;

/// Print a completion script, e.g. `shoal completions bash > /etc/bash_completion.d/shoal`,
/// `shoal completions zsh > "${fpath[1]}/_shoal"`, `shoal completions fish >
/// ~/.config/fish/completions/shoal.fish`.
#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: Shell,
}

/// Write man pages: `shoal.1` and `shoal-SUBCOMMAND.1` for each subcommand (nested ones too,
/// e.g. `shoal-config-containerd.1`), into DIR; without `--out-dir`, print shoal(1) on stdout.
///
/// Example: `shoal man --out-dir /usr/local/share/man/man1 && man shoal-mount`.
#[derive(Args, Debug)]
pub struct ManArgs {
    /// Where to write the pages (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
}

pub fn run_completions(args: CompletionsArgs) -> anyhow::Result<ExitCode> {
    let mut cmd = Cli::command();
    clap_complete::generate(args.shell, &mut cmd, "shoal", &mut std::io::stdout());
    Ok(ExitCode::SUCCESS)
}

pub fn run_man(args: ManArgs) -> anyhow::Result<ExitCode> {
    let cmd = Cli::command();
    let Some(dir) = args.out_dir else {
        clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?;
        return Ok(ExitCode::SUCCESS);
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let written = write_pages(cmd, &dir)?;
    eprintln!("wrote {written} man pages to {}", dir.display());
    Ok(ExitCode::SUCCESS)
}

/// `cmd`'s page and, recursively, its subcommands' pages (named `parent-child`); returns how
/// many were written.
fn write_pages(cmd: clap::Command, dir: &std::path::Path) -> anyhow::Result<usize> {
    let mut cmd = cmd;
    cmd.build();
    write_tree(&cmd, cmd.get_name().to_owned(), dir)
}

fn write_tree(cmd: &clap::Command, name: String, dir: &std::path::Path) -> anyhow::Result<usize> {
    let page = cmd.clone().name(name.clone());
    let path = dir.join(format!("{name}.1"));
    let mut out = Vec::new();
    clap_mangen::Man::new(page).render(&mut out)?;
    std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    let mut n = 1;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.get_name() == "help" {
            continue;
        }
        n += write_tree(sub, format!("{name}-{}", sub.get_name()), dir)?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_scripts_name_every_subcommand_and_flag() {
        let mut cmd = Cli::command();
        let mut out = Vec::new();
        clap_complete::generate(Shell::Bash, &mut cmd, "shoal", &mut out);
        let bash = String::from_utf8(out).expect("utf-8");
        for word in [
            "node",
            "prewarm",
            "mounts",
            "--control",
            "--store-quota",
            "--set",
            "--json",
        ] {
            assert!(bash.contains(word), "bash completion lacks {word}");
        }
    }

    #[test]
    fn man_pages_cover_nested_subcommands() {
        let dir = tempfile::tempdir().expect("tempdir");
        let n = write_pages(Cli::command(), dir.path()).expect("written");
        assert!(n > 15, "{n} pages");
        let page = std::fs::read_to_string(dir.path().join("shoal-config-containerd.1"))
            .expect("nested page");
        assert!(page.starts_with(".ie") || page.contains(".TH"), "{page}");
        assert!(page.contains("undo"), "{page}");
        let top = std::fs::read_to_string(dir.path().join("shoal.1")).expect("top page");
        assert!(
            top.contains("prewarm") && top.contains("Exit codes"),
            "{top}"
        );
    }
}
