//! The node's heap under glibc's malloc, kept from creeping up over days.
//!
//! glibc gives threads arenas of their own, up to 8 per CPU, and keeps what is freed in each
//! for reuse. A node's threads (the async workers, the blocking pools, the ingest pool that
//! comes and goes with downloads) allocate and free buffers of up to a few MiB at different
//! times, so the freed memory spreads over many arenas and the resident size creeps up long
//! after the live heap stopped growing. Measured in the soak (`e2e/src/soak.rs`, with
//! heaptrack on one node): 15 MiB of live heap at its peak, 8.5 MiB at the end, while the
//! anonymous resident memory grew from 23 to 42 MiB.
//!
//! So the node caps the arenas at one per CPU ([`limit_arenas`], before its threads start), and
//! gives free pages back to the kernel every [`TRIM_EVERY`] ([`trim_every`]). Both are no-ops
//! with other C libraries.
//!
//! `unsafe` is allowed here: `mallopt` and `malloc_trim` are C functions with no safe wrapper.
#![allow(unsafe_code)]

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often free heap pages go back to the kernel.
pub const TRIM_EVERY: Duration = Duration::from_secs(30);

/// Caps malloc's arenas at one per CPU (at least 2). Call before starting threads: threads
/// that already have an arena keep it.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let arenas = libc::c_int::try_from(cpus.max(2)).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets a malloc tunable; any value is accepted or refused with 0.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
}

/// Returns free heap pages to the kernel (`malloc_trim`); true if some were.
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only releases memory malloc holds free; it takes the arenas' locks.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Trims the heap every `period` until `stop`, on a blocking thread (a trim walks every arena).
pub async fn trim_every(period: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let began = std::time::Instant::now();
        if let Ok(released) = tokio::task::spawn_blocking(trim).await {
            tracing::trace!(released, took = ?began.elapsed(), "heap trimmed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Freed memory goes back to the kernel: the resident size falls after a trim.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn a_trim_gives_freed_pages_back() {
        fn rss() -> u64 {
            let status = std::fs::read_to_string("/proc/self/status").expect("status");
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .expect("VmRSS")
                * 1024
        }
        // Many small blocks (below the mmap threshold, so they live in the arena), every other
        // one kept so the arena cannot simply shrink from its top.
        let mut blocks: Vec<Vec<u8>> = (0..64 * 1024).map(|i| vec![i as u8; 1024]).collect();
        let keep: Vec<Vec<u8>> = blocks.iter_mut().step_by(64).map(std::mem::take).collect();
        drop(blocks);
        let before = rss();
        trim();
        let after = rss();
        assert!(
            after + (16 << 20) <= before,
            "trim released too little: {before} → {after} bytes resident"
        );
        drop(keep);
    }
}
