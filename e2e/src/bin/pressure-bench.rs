//! Disk-pressure runner (issue 12, R6; not a test; root). `pressure-bench [--quota-mib 512]
//! [--factor 3] [--blob-mib 16]`: pulls totalling `factor` × a node's quota while two lazy mounts
//! of the debian-python Nydus image (FUSE and EROFS) are live and read end to end over and over
//! (see `shoal_e2e::pressure`). Prints peak disk against the quota — the store's own bytes and
//! the whole data dir, entry by entry — evictions, and mount read errors.
//!
//! Needs `docker-registry` on PATH, root, /dev/fuse, kernel EROFS, and the `shoal` binary.

use anyhow::{bail, ensure, Context, Result};
use shoal_e2e::pressure::{self, Plan};
use shoal_e2e::TestCtx;

fn main() -> Result<()> {
    let mut plan = Plan {
        quota_mib: 512,
        pull_factor: 3,
        blob_mib: 16,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--quota-mib" => plan.quota_mib = value.parse()?,
            "--factor" => plan.pull_factor = value.parse()?,
            "--blob-mib" => plan.blob_mib = value.parse()?,
            other => bail!("unknown flag {other}; usage: pressure-bench [--quota-mib N] [--factor N] [--blob-mib N]"),
        }
    }
    ensure!(
        plan.quota_mib > 0 && plan.pull_factor > 0 && plan.blob_mib > 0,
        "every value must be positive"
    );
    let ctx = TestCtx::standalone("bench-pressure")?;
    let o = pressure::run(&ctx, &plan)?;
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    println!(
        "\nDisk pressure: quota {} MiB, pulls {:.0} MiB ({}× the quota, blobs of {} MiB), two live lazy mounts \
         (FUSE + EROFS) of the debian-python Nydus image read end to end {} times in all\n",
        plan.quota_mib,
        mib(o.pulled_bytes),
        plan.pull_factor,
        plan.blob_mib,
        o.passes
    );
    println!("| figure | value | goal |");
    println!("|---|---|---|");
    println!(
        "| peak store bytes on disk (`blobs/`) | {:.1} MiB ({:.2}× the quota) | ≤ quota + one piece ({:.2} MiB) |",
        mib(o.peak_store_bytes),
        o.peak_store_bytes as f64 / o.quota_bytes as f64,
        mib(o.quota_bytes + o.piece_bytes)
    );
    println!(
        "| peak data dir on disk (all of it) | {:.1} MiB ({:.2}× the quota) | ≤ quota + one piece |",
        mib(o.peak_data_dir_bytes),
        o.peak_data_dir_bytes as f64 / o.quota_bytes as f64
    );
    for (entry, bytes) in &o.peak_by_entry {
        println!("| … peak of `{entry}` | {:.1} MiB | |", mib(*bytes));
    }
    println!("| evictions | {} | ≥ 1 |", o.evictions);
    println!(
        "| mount read errors | {} of {} reads | 0 |",
        o.mount_read_errors.len(),
        o.mount_reads
    );
    println!("| pull errors | {} | 0 |", o.pull_errors.len());
    for e in o.mount_read_errors.iter().chain(&o.pull_errors).take(5) {
        eprintln!("  {e}");
    }
    Ok(())
}
