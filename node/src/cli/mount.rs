//! `shoal mount IMAGE DIR`, `shoal umount DIR`, `shoal mounts`: ask the local node, over its
//! control socket (root, the node's user or its control group only), to lazily mount an image,
//! unmount it, or list mounts with their numbers.
//!
//! Exit codes (`cli::exit`): 0 done; 1 the node refused or failed (its message is printed); 3 the
//! node could not be reached.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use axum::http::Method;
use clap::Args;

use crate::control::{self, RequestError};
use crate::mount::api::{ErrorBody, MountList};
use crate::mount::{MountInfo, MountMode, MountRequest};
use crate::units::ByteSize;

/// Lazily mount a Nydus image through the local node.
///
/// The node resolves IMAGE (`host[:port]/repo[:tag|@digest]`, on the origins it is configured
/// with), fetches the image's bootstrap, and mounts it read-only at DIR; file data is fetched
/// chunk by chunk on first read, verified, and kept in the node's store. The mount is restored
/// when the node restarts, until `shoal umount DIR`. Plain OCI images must be converted first
/// (`shoal convert`, or nydusify).
#[derive(Args, Debug)]
pub struct MountArgs {
    /// The image, e.g. `registry.example/app:1`.
    pub image: String,
    /// An existing directory to mount on.
    pub dir: PathBuf,
    /// `fuse` (any kernel) or `erofs` (kernel EROFS over on-demand decoded blob files: metadata and
    /// warm reads at kernel speed; needs root and Linux 6.12+ with file-backed EROFS).
    #[arg(long, value_enum, default_value_t = MountMode::Fuse)]
    pub mode: MountMode,
    /// Platform to pick from a multi-platform image, `os/arch[/variant]` (default: this host's).
    #[arg(long)]
    pub platform: Option<String>,
    /// Background prefetch rate, origin bytes per second (e.g. `32MiB`; `0` turns prefetch off).
    /// Prefetch fetches the image's prefetch table and the chunks its first run touched (recorded
    /// by the node), in that order, always behind the reads programs make.
    #[arg(long, value_parser = ByteSize::parse)]
    pub prefetch_rate: Option<ByteSize>,
    /// Mount over a directory that is not empty, or a system directory (`/etc`, `/usr`, …).
    #[arg(long)]
    pub force: bool,
    /// The node's control socket [default: /run/shoal/control.sock as root].
    #[arg(long, env = "SHOAL_CONTROL", value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Print the mount as JSON (the control API's answer) instead of a line.
    #[arg(long)]
    pub json: bool,
}

/// Unmount a lazy mount and forget it (it is not restored at the next node start).
#[derive(Args, Debug)]
pub struct UmountArgs {
    /// The mount point.
    pub dir: PathBuf,
    /// The node's control socket [default: /run/shoal/control.sock as root].
    #[arg(long, env = "SHOAL_CONTROL", value_name = "PATH")]
    pub control: Option<PathBuf>,
}

/// List the node's lazy mounts: state, bytes read by programs, bytes fetched (local store,
/// origin), chunks, read latency.
#[derive(Args, Debug)]
pub struct MountsArgs {
    /// The node's control socket [default: /run/shoal/control.sock as root].
    #[arg(long, env = "SHOAL_CONTROL", value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Print the admin API's JSON (`GET /api/v1/mounts`).
    #[arg(long)]
    pub json: bool,
}

pub fn run_mount(args: MountArgs) -> anyhow::Result<ExitCode> {
    let dir = std::fs::canonicalize(&args.dir)
        .with_context(|| format!("mount point {}", args.dir.display()))?;
    let req = MountRequest {
        image: args.image,
        dir,
        mode: args.mode,
        platform: args.platform,
        prefetch_rate: args.prefetch_rate.map(|b| b.0),
        force: args.force,
    };
    let socket = args.control.unwrap_or_else(control::default_path);
    let body = serde_json::to_vec(&req)?;
    let sent = call(&socket, Method::POST, "/api/v1/mounts", Some(body))?;
    let Some((status, body)) = reachable(sent) else {
        return Ok(ExitCode::from(super::exit::UNREACHABLE));
    };
    if !status.is_success() {
        return Ok(refused(&body));
    }
    if args.json {
        println!("{body}");
        return Ok(ExitCode::SUCCESS);
    }
    let info: MountInfo = serde_json::from_str(&body)?;
    println!(
        "mounted {} at {} ({})",
        info.image,
        info.dir.display(),
        info.manifest.as_deref().unwrap_or("?")
    );
    Ok(ExitCode::SUCCESS)
}

pub fn run_umount(args: UmountArgs) -> anyhow::Result<ExitCode> {
    let dir = std::fs::canonicalize(&args.dir).unwrap_or(args.dir);
    let socket = args.control.unwrap_or_else(control::default_path);
    let mut uri = reqwest::Url::parse("http://control/api/v1/mounts")?;
    uri.query_pairs_mut()
        .append_pair("dir", dir.to_string_lossy().as_ref());
    let path_and_query = format!("{}?{}", uri.path(), uri.query().unwrap_or(""));
    let sent = call(&socket, Method::DELETE, &path_and_query, None)?;
    let Some((status, body)) = reachable(sent) else {
        return Ok(ExitCode::from(super::exit::UNREACHABLE));
    };
    if !status.is_success() {
        return Ok(refused(&body));
    }
    println!("unmounted {}", dir.display());
    Ok(ExitCode::SUCCESS)
}

pub fn run_mounts(args: MountsArgs) -> anyhow::Result<ExitCode> {
    let socket = args.control.unwrap_or_else(control::default_path);
    let sent = call(&socket, Method::GET, "/api/v1/mounts", None)?;
    let Some((status, body)) = reachable(sent) else {
        return Ok(ExitCode::from(super::exit::UNREACHABLE));
    };
    if !status.is_success() {
        return Ok(refused(&body));
    }
    if args.json {
        println!("{body}");
        return Ok(ExitCode::SUCCESS);
    }
    let list: MountList = serde_json::from_str(&body)?;
    print!("{}", render(&list.mounts));
    Ok(ExitCode::SUCCESS)
}

/// One request over the control socket, on a throw-away runtime.
fn call(
    socket: &Path,
    method: Method,
    uri: &str,
    body: Option<Vec<u8>>,
) -> anyhow::Result<Result<(axum::http::StatusCode, String), RequestError>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(rt
        .block_on(control::request(socket, method, uri, body))
        .map(|(s, b)| (s, String::from_utf8_lossy(&b).into_owned())))
}

fn reachable<T>(r: Result<T, RequestError>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            eprintln!("shoal: {e}");
            None
        }
    }
}

fn refused(body: &str) -> ExitCode {
    let msg = serde_json::from_str::<ErrorBody>(body)
        .map(|e| e.error)
        .unwrap_or_else(|_| body.to_owned());
    eprintln!("shoal: {msg}");
    ExitCode::FAILURE
}

fn render(mounts: &[MountInfo]) -> String {
    use std::fmt::Write as _;
    if mounts.is_empty() {
        return "no mounts\n".into();
    }
    let mut o = String::new();
    for m in mounts {
        let _ = writeln!(
            o,
            "{}  {}  [{} {} {}]",
            m.dir.display(),
            m.image,
            m.mode,
            m.platform,
            m.state
        );
        if let Some(e) = &m.error {
            let _ = writeln!(o, "    error: {e}");
        }
        let Some(s) = &m.stats else { continue };
        let us = |v: Option<u64>| v.map_or("-".to_string(), |v| format!("≤{v}µs"));
        let what = match m.mode {
            MountMode::Fuse => "read by programs",
            MountMode::Erofs => "read by the kernel (page-cache misses)",
        };
        let _ = writeln!(
            o,
            "    {what}: {} in {} reads ({} errors); latency p50 {} p90 {} p99 {}",
            ByteSize(s.read_bytes),
            s.reads,
            s.read_errors,
            us(s.latency_p50_us),
            us(s.latency_p90_us),
            us(s.latency_p99_us)
        );
        let src = &s.source;
        let _ = writeln!(
            o,
            "    fetched: {} chunks ({} more from memory, {} from the mount's decoded files); local store {} ({} chunks), peers {} ({} chunks), origin {} ({} chunks in {} requests, {} failed); {} chunks failed verification",
            s.chunks_fetched,
            s.chunk_cache_hits,
            s.chunk_decoded_hits,
            ByteSize(src.local_bytes),
            src.local_chunks,
            ByteSize(src.peer_bytes),
            src.peer_chunks,
            ByteSize(src.origin_bytes),
            src.origin_chunks,
            src.origin_requests,
            src.origin_errors,
            src.verify_failures
        );
        let p = &s.prefetch;
        let recording = if p.recording {
            format!("; recording the access list ({} chunks)", p.recorded)
        } else {
            String::new()
        };
        let _ = writeln!(
            o,
            "    prefetch: {} {}/{} chunks ({} held already, {} failed), {} from the origin{recording}",
            p.state,
            p.done,
            p.planned,
            p.held,
            p.failed,
            ByteSize(src.prefetch_bytes)
        );
    }
    o
}
