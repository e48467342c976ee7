//! `shoal rafs build|merge|inspect|check|unpack`: thin wrappers over `shoal_rafs` — parse
//! arguments, call the library, print a human summary or JSON, map the outcome to an exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Subcommand, ValueEnum};
use shoal_rafs::build::{self, BuildOptions};
use shoal_rafs::tools::{self, UnpackOptions};
use shoal_rafs::{Bootstrap, Compressor, Digester, LocalBlobDir};

/// Work with Nydus RAFS images (v6, and v5 for reading) on local files.
#[derive(Subcommand, Debug)]
pub enum RafsCommand {
    /// Convert one OCI layer tar (plain, gzip or zstd) into a RAFS v6 data blob and bootstrap.
    ///
    /// Writes OUTPUT/bootstrap and OUTPUT/blobs/<blob id>, where the blob id is the sha256 of
    /// the blob file (its registry digest). Whiteout files are kept; `merge` applies them.
    Build {
        /// The layer tar; `-` reads standard input.
        layer_tar: PathBuf,
        /// Output directory (created if absent).
        #[arg(long, value_name = "DIR")]
        output: PathBuf,
        /// Chunk compression.
        #[arg(long, value_enum, default_value_t = CompressorArg::Zstd)]
        compressor: CompressorArg,
        /// Chunk digest algorithm.
        #[arg(long, value_enum, default_value_t = DigesterArg::Blake3)]
        digester: DigesterArg,
        /// Chunk size: a power of two from 4KiB to 16MiB (`1MiB`, `0x100000`, `65536`).
        #[arg(long, default_value = "1MiB", value_parser = parse_chunk_size)]
        chunk_size: u32,
        /// A RAFS v6 bootstrap whose chunks are referenced instead of stored again (dedup across
        /// images); the output then also needs that image's blobs.
        #[arg(long, value_name = "FILE")]
        chunk_dict: Option<PathBuf>,
        /// A file of image paths, one per line (`/usr/bin/python3`; a directory stands for
        /// everything below it, `/` for the whole image), written to the prefetch table in that
        /// order. Paths this layer lacks are listed, not an error. `-` reads standard input.
        #[arg(long, value_name = "FILE")]
        prefetch: Option<PathBuf>,
        /// Threads compressing and digesting chunks (0: one per core). The output is the same
        /// bytes for every value.
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Merge layer bootstraps (lowest layer first) into one image bootstrap.
    ///
    /// Applies OCI whiteouts (`.wh.NAME`) and opaque directories (`.wh..wh..opq`); the output
    /// references the layers' data blobs, in the order printed (the kernel's `device=` order).
    Merge {
        /// Where to write the merged bootstrap.
        #[arg(long, value_name = "FILE")]
        output: PathBuf,
        /// Layer bootstraps, lowest first.
        #[arg(required = true)]
        bootstraps: Vec<PathBuf>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Describe an image: superblock, blob table, prefetch table and tree statistics.
    ///
    /// With --blob-dir, also show each data blob's tail sections (tar headers and TOC).
    Inspect {
        /// The RAFS bootstrap (metadata blob, e.g. `image/image.boot`), or a data blob
        /// carrying it at its end (`nydus-image --blob-inline-meta`).
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
        /// The RAFS bootstrap to verify, or a data blob carrying it (whose chunks are then
        /// verified too).
        bootstrap: PathBuf,
        /// Directory holding the data blobs as `DIR/<blob id>`; repeat it when a merged
        /// image's blobs live in several directories.
        #[arg(long, value_name = "DIR")]
        blob_dir: Vec<PathBuf>,
        /// The bootstrap's expected digest (`sha256:<hex>`, from the image manifest or from
        /// `build`/`merge`): with it, a changed byte anywhere in the bootstrap is detected.
        #[arg(long, value_name = "DIGEST")]
        digest: Option<String>,
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
        /// The RAFS bootstrap to unpack, or a data blob carrying it.
        bootstrap: PathBuf,
        /// Directory holding the data blobs as `DIR/<blob id>`; repeat it when a merged
        /// image's blobs live in several directories. Needed unless BOOTSTRAP is the data blob
        /// that carries the bootstrap (`nydus-image --blob-inline-meta`).
        #[arg(long, value_name = "DIR")]
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
        RafsCommand::Build {
            layer_tar,
            output,
            compressor,
            digester,
            chunk_size,
            chunk_dict,
            prefetch,
            threads,
            json,
        } => {
            let dict = chunk_dict.as_deref().map(open).transpose()?;
            let opts = BuildOptions {
                compressor: compressor.into(),
                digester: digester.into(),
                chunk_size,
            };
            let prefetch = match prefetch {
                None => Vec::new(),
                Some(p) => {
                    let text = if p.as_os_str() == "-" {
                        std::io::read_to_string(std::io::stdin().lock())
                    } else {
                        std::fs::read_to_string(&p)
                    }
                    .with_context(|| format!("reading the prefetch list {}", p.display()))?;
                    text.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty() && !l.starts_with('#'))
                        .map(String::from)
                        .collect()
                }
            };
            // A bar on stderr when a person is watching (input bytes read, of the file's size
            // when it is a file).
            let bars = super::bars::Bars::for_command(json);
            let total = std::fs::metadata(&layer_tar)
                .map(|m| m.len())
                .ok()
                .filter(|&t| t > 0);
            let progress = bars.bytes("building", total);
            let bar = |read: u64| progress.set_position(read);
            let extras = build::BuildExtras {
                chunk_dict: dict.as_ref(),
                prefetch,
                threads,
                progress: Some(&bar),
            };
            let out = if layer_tar.as_os_str() == "-" {
                build::build_layer_with(std::io::stdin().lock(), &opts, &output, &extras)
            } else {
                let f = std::fs::File::open(&layer_tar)
                    .with_context(|| format!("opening {}", layer_tar.display()))?;
                build::build_layer_with(f, &opts, &output, &extras)
            }
            .with_context(|| format!("building RAFS from {}", layer_tar.display()))?;
            progress.finish_and_clear();
            if json {
                emit(&serde_json::to_string_pretty(&out)?)?;
            } else {
                let mut text = format!(
                    "blob {} ({} bytes, {} chunks, {} deduplicated, {} from the chunk dictionary)\nbootstrap {}\n",
                    out.blob_id,
                    out.blob_size,
                    out.chunks,
                    out.dedup_hits,
                    out.dict_hits,
                    out.bootstrap.display()
                );
                for id in &out.dict_blobs {
                    text.push_str(&format!("also references blob {id}\n"));
                }
                if out.prefetch > 0 {
                    text.push_str(&format!("prefetch table: {} entries\n", out.prefetch));
                }
                for p in &out.prefetch_missing {
                    text.push_str(&format!("prefetch path not in this layer: {p}\n"));
                }
                emit(&text)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        RafsCommand::Merge {
            output,
            bootstraps,
            json,
        } => {
            let out = build::merge(&bootstraps, &output)
                .with_context(|| format!("merging into {}", output.display()))?;
            if json {
                emit(&serde_json::to_string_pretty(&out)?)?;
            } else {
                let mut text = format!(
                    "merged {} layers into {}\n",
                    bootstraps.len(),
                    output.display()
                );
                for (i, b) in out.blobs.iter().enumerate() {
                    text.push_str(&format!("  device {}: {b}\n", i + 1));
                }
                emit(&text)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        RafsCommand::Inspect {
            bootstrap,
            blob_dir,
            json,
        } => {
            let b = open(&bootstrap)?;
            let dirs = tools::blob_source(&b, &bootstrap, blob_dir);
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
            digest,
            json,
        } => {
            let report = tools::check_path_with_digest(
                &bootstrap,
                digest.as_deref(),
                blob_dirs(blob_dir).as_ref(),
            );
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
            let source = tools::blob_source(&b, &bootstrap, blob_dir)
                .context("--blob-dir is needed: the data blobs are not in the bootstrap's file")?;
            source
                .load_blob_metas(&b)
                .context("reading the compression-info tables of batch blobs")?;
            let stats = tools::unpack(&b, &source, &dest, &UnpackOptions::for_current_user())
                .with_context(|| {
                    format!("unpacking {} into {}", bootstrap.display(), dest.display())
                })?;
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

/// `--compressor` values.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressorArg {
    None,
    #[value(name = "lz4_block")]
    Lz4Block,
    Zstd,
}

impl From<CompressorArg> for Compressor {
    fn from(c: CompressorArg) -> Self {
        match c {
            CompressorArg::None => Compressor::None,
            CompressorArg::Lz4Block => Compressor::Lz4Block,
            CompressorArg::Zstd => Compressor::Zstd,
        }
    }
}

/// `--digester` values.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DigesterArg {
    Blake3,
    Sha256,
}

impl From<DigesterArg> for Digester {
    fn from(d: DigesterArg) -> Self {
        match d {
            DigesterArg::Blake3 => Digester::Blake3,
            DigesterArg::Sha256 => Digester::Sha256,
        }
    }
}

/// `1MiB`, `64KiB`, `4k`, `0x100000` or plain bytes; must be a power of two in 4 KiB..=16 MiB.
pub(crate) fn parse_chunk_size(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let (num, mult) = if let Some(hex) = lower.strip_prefix("0x") {
        (
            u64::from_str_radix(hex, 16).map_err(|e| format!("{s}: {e}"))?,
            1,
        )
    } else {
        let split = lower
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(lower.len());
        let (n, unit) = lower.split_at(split);
        let mult = match unit {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            _ => return Err(format!("{s}: unknown unit (use KiB or MiB)")),
        };
        (n.parse::<u64>().map_err(|e| format!("{s}: {e}"))?, mult)
    };
    let v = num
        .checked_mul(mult)
        .ok_or_else(|| format!("{s}: too large"))?;
    if !v.is_power_of_two() || !(4096..=16 << 20).contains(&v) {
        return Err(format!(
            "{s}: chunk size must be a power of two from 4KiB to 16MiB"
        ));
    }
    Ok(v as u32)
}
