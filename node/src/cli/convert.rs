//! `shoal convert SRC DST`: parse the flags, run [`crate::convert::convert`] with a progress
//! display on stderr, print the summary (or `--json`) on stdout.
//!
//! Exit codes: 0 converted; 1 the conversion failed (missing or non-image source, refused
//! credentials, a build error — the message says which); 2 a registry could not be reached.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;
use shoal_rafs::build::BuildOptions;

use super::rafs::{parse_chunk_size, CompressorArg, DigesterArg};
use crate::convert::auth::Credentials;
use crate::convert::{self, progress, ConvertOptions, Summary};

/// Convert an OCI or Docker image into a Nydus image, registry to registry.
///
/// Pulls SRC (every platform of an image index, or only --platform), converts each layer into
/// a RAFS v6 data blob with the built-in builder (several at once), merges the layer
/// bootstraps, and pushes the Nydus image to DST: data blobs, the bootstrap layer, the config
/// with the new diff ids, the manifest, and an index when SRC had one. Blobs DST already has
/// are skipped; the tag is written last, so a failed run never leaves it pointing at a partial
/// image. Converted layers are kept in --work-dir: a rerun after a failure redoes only what is
/// missing.
///
/// Credentials: --src-creds/--dest-creds, else the auth file (--authfile, $REGISTRY_AUTH_FILE,
/// $XDG_RUNTIME_DIR/containers/auth.json, ~/.docker/config.json), as skopeo reads them.
///
/// Also: `shoal convert status`, the node's conversion service (`[convert]` in its config:
/// images converted by themselves when the registry notifies a push).
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct ConvertArgs {
    #[command(subcommand)]
    pub command: Option<ConvertCommand>,
    /// The source image, `host[:port]/repo[:tag|@digest]`.
    #[arg(required = true)]
    pub src: Option<String>,
    /// The target, `host[:port]/repo[:tag]`.
    #[arg(required = true)]
    pub dst: Option<String>,
    /// Talk plain HTTP to the registries (for registries without TLS).
    #[arg(long)]
    pub plain_http: bool,
    /// Convert only this platform of a multi-platform image, `os/arch[/variant]`.
    #[arg(long)]
    pub platform: Option<String>,
    /// An already-converted Nydus image: chunks it stores are referenced instead of written
    /// again (its blobs are mounted or copied into DST's repository). Of a multi-platform
    /// dictionary, the --platform (else this host's) manifest is used.
    #[arg(long, value_name = "IMAGE")]
    pub chunk_dict: Option<String>,
    /// Chunk compression.
    #[arg(long, value_enum, default_value_t = CompressorArg::Zstd)]
    pub compressor: CompressorArg,
    /// Chunk digest algorithm.
    #[arg(long, value_enum, default_value_t = DigesterArg::Blake3)]
    pub digester: DigesterArg,
    /// Chunk size: a power of two from 4KiB to 16MiB.
    #[arg(long, default_value = "1MiB", value_parser = parse_chunk_size)]
    pub chunk_size: u32,
    /// A file of image paths, one per line (`/usr/bin/python3`; a directory means everything
    /// below it), written to the image's prefetch table in that order.
    #[arg(long, value_name = "FILE")]
    pub prefetch_list: Option<PathBuf>,
    /// Source registry credentials, `USER[:PASSWORD]`.
    #[arg(
        long,
        value_name = "USER[:PASSWORD]",
        env = "SHOAL_SRC_CREDS",
        hide_env_values = true
    )]
    pub src_creds: Option<String>,
    /// Target registry credentials, `USER[:PASSWORD]`.
    #[arg(
        long,
        alias = "dst-creds",
        value_name = "USER[:PASSWORD]",
        env = "SHOAL_DEST_CREDS",
        hide_env_values = true
    )]
    pub dest_creds: Option<String>,
    /// Auth file in containers-auth.json / Docker config.json form.
    #[arg(long, value_name = "FILE")]
    pub authfile: Option<PathBuf>,
    /// Where converted layers are kept between runs (default: ~/.cache/shoal/convert).
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// Layers converted at once.
    #[arg(long, default_value_t = 3)]
    pub jobs: usize,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `shoal convert SUBCOMMAND`.
#[derive(clap::Subcommand, Debug)]
pub enum ConvertCommand {
    /// Show the node's conversion service: its queue and recent jobs (over the control socket:
    /// root, the node's user or the control group).
    Status {
        /// The node's control socket (default: the node's default).
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(args: ConvertArgs) -> anyhow::Result<ExitCode> {
    if let Some(ConvertCommand::Status { control, json }) = &args.command {
        return status(control.clone(), *json);
    }
    let opts = options(&args)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = rt.block_on(async {
        let (progress, renderer) = progress::start(super::bars::Bars::for_command(args.json));
        let result = convert::convert(opts, progress).await;
        let _ = renderer.await;
        result
    });
    match result {
        Ok(summary) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                print!("{}", render(&summary));
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            let code = e.exit_code();
            eprintln!("shoal convert: {:#}", anyhow::Error::from(e));
            eprintln!(
                "shoal convert: {} was not written",
                args.dst.as_deref().unwrap_or_default()
            );
            Ok(ExitCode::from(code))
        }
    }
}

fn options(args: &ConvertArgs) -> anyhow::Result<ConvertOptions> {
    let creds = |v: &Option<String>, flag| {
        v.as_deref()
            .map(|s| Credentials::parse_flag(s, flag))
            .transpose()
    };
    let prefetch = match &args.prefetch_list {
        None => Vec::new(),
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("reading the prefetch list {}", p.display()))?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(String::from)
            .collect(),
    };
    Ok(ConvertOptions {
        src: args.src.clone().unwrap_or_default(),
        dst: args.dst.clone().unwrap_or_default(),
        plain_http: args.plain_http,
        platform: args.platform.clone(),
        chunk_dict: args.chunk_dict.clone(),
        build: BuildOptions {
            compressor: args.compressor.into(),
            digester: args.digester.into(),
            chunk_size: args.chunk_size,
        },
        prefetch,
        src_creds: creds(&args.src_creds, "--src-creds")?,
        dst_creds: creds(&args.dest_creds, "--dest-creds")?,
        authfile: args.authfile.clone(),
        work_dir: args.work_dir.clone().unwrap_or_else(default_work_dir),
        jobs: args.jobs,
        auth_files: true,
        layers: None,
    })
}

fn status(control: Option<PathBuf>, json: bool) -> anyhow::Result<ExitCode> {
    let path = control.unwrap_or_else(crate::control::default_path);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (code, bytes) = rt
        .block_on(crate::control::request(
            &path,
            axum::http::Method::GET,
            "/api/v1/convert",
            None,
        ))
        .map_err(|e| super::exit::unreachable(e.to_string()))?;
    if code == axum::http::StatusCode::NOT_FOUND {
        anyhow::bail!(
            "the node at {} runs no conversion service (set convert.listen in its config)",
            path.display()
        );
    }
    if !code.is_success() {
        anyhow::bail!(
            "control socket {}: {code} {}",
            path.display(),
            String::from_utf8_lossy(&bytes)
        );
    }
    if json {
        println!("{}", String::from_utf8_lossy(&bytes));
        return Ok(ExitCode::SUCCESS);
    }
    let s: crate::convert::service::StatusView = serde_json::from_slice(&bytes)?;
    print!("{}", render_status(&s));
    Ok(ExitCode::SUCCESS)
}

fn render_status(s: &crate::convert::service::StatusView) -> String {
    let mut out = format!(
        "conversion service for {}: {} queued, {} running, {} done, {} failed, {} ignored\n",
        s.registry, s.queued, s.running, s.done, s.failed, s.ignored
    );
    for j in &s.jobs {
        let short = j
            .digest
            .split(':')
            .nth(1)
            .unwrap_or("")
            .get(..12)
            .unwrap_or("");
        out.push_str(&format!(
            "{:<8} {}:{} ({short}) attempts {}",
            j.state,
            j.repository,
            j.tags.join(","),
            j.attempts
        ));
        if !j.published.is_empty() {
            out.push_str(&format!(" → {}", j.published.join(",")));
        }
        if let Some(secs) = j.push_to_converted_seconds {
            out.push_str(&format!(" in {secs:.1}s"));
        }
        if let (Some(st), Some(f)) = (j.source_bytes_stored, j.source_bytes_fetched) {
            out.push_str(&format!(
                ", source {:.1} MiB from the store, {:.1} MiB fetched",
                st as f64 / 1048576.0,
                f as f64 / 1048576.0
            ));
        }
        if let Some(r) = &j.reason {
            out.push_str(&format!(": {r}"));
        }
        out.push('\n');
    }
    out
}

fn default_work_dir() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    match (env("XDG_CACHE_HOME"), env("HOME")) {
        (Some(c), _) => c.join("shoal/convert"),
        (None, Some(h)) => h.join(".cache/shoal/convert"),
        (None, None) => PathBuf::from("/var/tmp/shoal-convert"),
    }
}

fn render(s: &Summary) -> String {
    let mib = |b: u64| b as f64 / 1048576.0;
    let refs = s.chunks + s.chunks_dedup_in_image + s.chunks_from_dict;
    let pct = |n: u64| n as f64 * 100.0 / refs.max(1) as f64;
    let mut out = format!(
        "converted {} → {} ({}) in {:.1}s\n\
         platforms: {}\n\
         layers: {} ({} already converted in the work dir)\n\
         source {:.1} MiB → Nydus {:.1} MiB",
        s.source,
        s.target,
        s.digest,
        s.seconds,
        s.platforms.join(", "),
        s.layers,
        s.layers_cached,
        mib(s.source_bytes),
        mib(s.nydus_bytes),
    );
    if s.dict_bytes > 0 {
        out.push_str(&format!(
            " (+ {:.1} MiB of dictionary blobs referenced)",
            mib(s.dict_bytes)
        ));
    }
    out.push_str(&format!(
        "\nchunks: {} stored, {} deduplicated within layers ({:.1}%), {} from the chunk dictionary ({:.1}%)\n\
         blobs: {} pushed, {} already at the target, {} mounted from another repository\n",
        s.chunks,
        s.chunks_dedup_in_image,
        pct(s.chunks_dedup_in_image),
        s.chunks_from_dict,
        pct(s.chunks_from_dict),
        s.blobs_pushed,
        s.blobs_skipped,
        s.blobs_mounted,
    ));
    out
}
