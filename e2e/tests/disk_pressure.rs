//! The disk-pressure smoke run (issue 12, R6): pulls totalling 3× a node's quota while two lazy
//! mounts of the debian-python Nydus image (FUSE and EROFS) are live and read end to end, over and
//! over (see `shoal_e2e::pressure`). Asserts outcomes: the store's bytes — and the whole data dir,
//! the mounts' own files included — on disk never above the quota plus one piece, every pull and every mount read byte-exact (none fails), and the
//! eviction that had to happen did. `cargo run -p shoal-e2e --bin pressure-bench` prints the
//! figures.

use anyhow::{ensure, Result};
use shoal_e2e::lazy::{self, Mode};
use shoal_e2e::pressure::{self, Plan};
use shoal_e2e::{run, skip, Need};

#[test]
fn pulls_of_three_times_the_quota_with_two_live_mounts_stay_in_the_quota_and_reads_never_fail() {
    let name = "disk_pressure";
    if let Some(why) = lazy::missing(Mode::Erofs) {
        return skip(name, &why);
    }
    run(
        name,
        &[
            Need::Root,
            Need::Fuse,
            Need::Bin("docker-registry"),
            Need::Shoal,
        ],
        |t| -> Result<()> {
            let plan = Plan {
                // Room for both mounts' own files (the EROFS blob files, the FUSE decoded
                // chunks: about 400 MiB for this image) beside the image's pinned blobs.
                quota_mib: 512,
                pull_factor: 3,
                blob_mib: 16,
            };
            let o = pressure::run(t, &plan)?;
            println!("{o:?}");
            ensure!(
                o.pull_errors.is_empty(),
                "pulls failed: {:?}",
                o.pull_errors
            );
            ensure!(
                o.mount_read_errors.is_empty(),
                "{} of {} mount reads failed, e.g. {:?}",
                o.mount_read_errors.len(),
                o.mount_reads,
                &o.mount_read_errors[..o.mount_read_errors.len().min(5)]
            );
            ensure!(
                o.pulled_bytes >= 3 * o.quota_bytes,
                "pulled only {} bytes",
                o.pulled_bytes
            );
            ensure!(o.evictions >= 1.0, "nothing was evicted");
            ensure!(
                o.peak_store_bytes <= o.quota_bytes + o.piece_bytes,
                "the store reached {} bytes on disk, over the quota {} plus a piece {}",
                o.peak_store_bytes,
                o.quota_bytes,
                o.piece_bytes
            );
            ensure!(
                o.passes >= 2,
                "the readers finished only {} passes",
                o.passes
            );
            Ok(())
        },
    );
}
