//! `shoal image-server` (internal, started by the node): holds one image mount for the containerd
//! snapshotter in a process of its own, so that containers keep their root filesystem while the
//! node restarts. Chunks come from the node over its chunk socket (`mount::remote`).
//!
//! It prints `ready` on stdout once mounted (or an error and exits), then serves until SIGTERM
//! or SIGINT (unmount, exit 0) or until the mount is gone (someone unmounted it).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use shoal_rafs::erofs::{self, ErofsOptions};
use shoal_rafs::fuse::{self, FuseOptions};
use shoal_rafs::Bootstrap;

use crate::mount::remote::{RemoteChunks, PATIENCE};
use crate::mount::MountMode;

/// Hold one image mount for the node (internal: the node starts it).
#[derive(Args, Debug)]
pub struct ImageServerArgs {
    /// The image's RAFS bootstrap.
    #[arg(long)]
    pub bootstrap: PathBuf,
    /// The mount point.
    #[arg(long)]
    pub dir: PathBuf,
    #[arg(long, value_enum)]
    pub mode: MountMode,
    /// EROFS mode: where the blob files are served; FUSE mode: where decoded chunks are kept.
    #[arg(long)]
    pub blobs_dir: PathBuf,
    /// The node's chunk socket.
    #[arg(long)]
    pub socket: PathBuf,
    /// How long reads wait for the node to come back, in seconds.
    #[arg(long, default_value_t = PATIENCE.as_secs())]
    pub patience: u64,
}

/// The mount this process holds.
enum Held {
    Fuse(fuse::FuseMount),
    Erofs(erofs::ErofsMount),
}

pub fn run(args: ImageServerArgs) -> anyhow::Result<ExitCode> {
    let held = match mount(&args) {
        Ok(h) => h,
        Err(e) => {
            // The node reads this line: the first line is the verdict.
            println!("error: {e:#}");
            return Err(e);
        }
    };
    println!("ready");
    // stdout is the node's pipe, which it stops reading: write nothing more there.
    tracing::info!(dir = %args.dir.display(), "image server mounted");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let dir = std::fs::canonicalize(&args.dir).unwrap_or_else(|_| args.dir.clone());
    rt.block_on(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut every = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
                _ = every.tick() => {
                    if !crate::mount::table::mount_points_under(&dir).contains(&dir) {
                        tracing::info!(dir = %dir.display(), "the mount is gone; image server exits");
                        break;
                    }
                }
            }
        }
        Ok::<(), std::io::Error>(())
    })?;
    let r = match held {
        Held::Fuse(m) => m.unmount().map_err(anyhow::Error::from),
        Held::Erofs(m) => m.unmount().map_err(anyhow::Error::from),
    };
    r.context("unmounting")?;
    Ok(ExitCode::SUCCESS)
}

fn mount(args: &ImageServerArgs) -> anyhow::Result<Held> {
    let boot = Arc::new(
        Bootstrap::open(&args.bootstrap)
            .with_context(|| format!("bootstrap {}", args.bootstrap.display()))?,
    );
    let source = Arc::new(RemoteChunks::new(
        args.socket.clone(),
        &args.dir,
        Duration::from_secs(args.patience),
    ));
    Ok(match args.mode {
        // FUSE mode keeps its decoded chunks where EROFS mode serves its blob files: a
        // directory of this mount's own, emptied at mount and removed at unmount.
        MountMode::Fuse => Held::Fuse(fuse::mount(
            boot,
            source,
            &args.dir,
            &FuseOptions {
                decoded_dir: Some(args.blobs_dir.clone()),
                ..FuseOptions::default()
            },
        )?),
        MountMode::Erofs => Held::Erofs(erofs::mount(
            boot,
            source,
            &args.dir,
            &args.blobs_dir,
            &ErofsOptions::default(),
        )?),
    })
}
