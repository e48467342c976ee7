//! `shoal rafs inspect|check|unpack`: thin wrappers over `shoal_rafs::tools` — parse arguments,
//! call the library, print a human summary or JSON, map the outcome to an exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;
use shoal_rafs::tools::{self, UnpackOptions};
use shoal_rafs::{Bootstrap, LocalBlobDir};

/// Work with Nydus RAFS images (v6, and v5 for reading) on local files.
#[derive(Subcommand, Debug)]
pub enum RafsCommand {
    /// Describe an image: superblock, blob table, prefetch table and tree statistics.
    ///
    /// With --blob-dir, also show each data blob's tail sections (tar headers and TOC).
    Inspect {
        /// The RAFS bootstrap (metadata blob, e.g. `image/image.boot`).
        bootstrap: PathBuf,
        /// Directory holding the data blobs as `DIR/<blob id>`; repeat it when a merged
        /// image's blobs live in several directories.
        #[arg(long, value_name = "DIR")]
        blob_dir: Vec<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Verify an image: every inode, directory, symlink, xattr and chunk reference.
    ///
    /// With --blob-dir, also read every chunk of every blob and verify its digest, and check
    /// each blob's TOC and compression-info table against the bootstrap. Exits with status 1
    /// when any problem is found (a bootstrap that does not open is one).
    Check {
        /// The RAFS bootstrap to verify.
        bootstrap: PathBuf,
        /// Directory holding the data blobs as `DIR/<blob id>`; repeat it when a merged
        /// image's blobs live in several directories.
        #[arg(long, value_name = "DIR")]
        blob_dir: Vec<PathBuf>,
        /// Print the report (all problems) as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write the image's files into DEST (which must be empty or absent).
    ///
    /// Every chunk is verified against its digest before it is written. As root, owners,
    /// device nodes and trusted/security xattrs are restored too; otherwise they are skipped
    /// and listed. Paths never leave DEST.
    Unpack {
        /// The RAFS bootstrap to unpack.
        bootstrap: PathBuf,
        /// Directory holding the data blobs as `DIR/<blob id>`; repeat it when a merged
        /// image's blobs live in several directories.
        #[arg(long, value_name = "DIR", required = true)]
        blob_dir: Vec<PathBuf>,
        /// Destination directory (created if absent; must be empty).
        dest: PathBuf,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Run one `shoal rafs` subcommand.
pub fn run(cmd: RafsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        RafsCommand::Inspect {
            bootstrap,
            blob_dir,
            json,
        } => {
            let b = open(&bootstrap)?;
            let dirs = blob_dirs(blob_dir);
            let report = tools::inspect(&b, dirs.as_ref())
                .with_context(|| format!("inspecting {}", bootstrap.display()))?;
            if json {
                emit(&serde_json::to_string_pretty(&report)?)?;
            } else {
                emit(&report.to_string())?;
            }
            Ok(ExitCode::SUCCESS)
        }
        RafsCommand::Check {
            bootstrap,
            blob_dir,
            json,
        } => {
            let report = tools::check_path(&bootstrap, blob_dirs(blob_dir).as_ref());
            if json {
                emit(&serde_json::to_string_pretty(&report)?)?;
            } else {
                emit(&report.to_string())?;
            }
            Ok(if report.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        RafsCommand::Unpack {
            bootstrap,
            blob_dir,
            dest,
            json,
        } => {
            let b = open(&bootstrap)?;
            let source = LocalBlobDir::with_dirs(blob_dir);
            let stats = tools::unpack(&b, &source, &dest, &UnpackOptions::for_current_user())
                .with_context(|| format!("unpacking {} into {}", bootstrap.display(), dest.display()))?;
            if json {
                emit(&serde_json::to_string_pretty(&stats)?)?;
            } else {
                let mut out = format!(
                    "unpacked {} files ({} bytes), {} dirs, {} symlinks, {} hardlinks, {} special files into {}\n",
                    stats.files,
                    stats.bytes,
                    stats.dirs,
                    stats.symlinks,
                    stats.hardlinks,
                    stats.special_files,
                    dest.display()
                );
                for s in &stats.skipped {
                    out.push_str(&format!("skipped {s}\n"));
                }
                emit(&out)?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Print to stdout; a closed pipe (`| head`) is not an error.
fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let res = out.write_all(text.as_bytes()).and_then(|()| {
        if text.ends_with('\n') {
            Ok(())
        } else {
            out.write_all(b"\n")
        }
    });
    match res.and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn blob_dirs(dirs: Vec<PathBuf>) -> Option<LocalBlobDir> {
    (!dirs.is_empty()).then(|| LocalBlobDir::with_dirs(dirs))
}

fn open(path: &std::path::Path) -> anyhow::Result<Bootstrap> {
    Bootstrap::open(path).with_context(|| format!("opening RAFS bootstrap {}", path.display()))
}
