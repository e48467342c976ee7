//! The lease holder as its blob's seed (DESIGN, Scheduler): ranges peers asked for and this node
//! does not hold yet, handed from the serving side to the download that holds the origin lease.
//!
//! A download under lease registers its blob ([`Seeds::register`]) for as long as it fetches
//! from the origin. The serving side, asked for bytes of a registered blob that are not present,
//! adds the range ([`Seeds::want`]) and waits (bounded by the request timeout) for the download to
//! report progress, re-planning its answer after each report. The download takes the wanted
//! ranges ([`Seed::take`]) between two reads of its sequential stream and fetches those ahead of
//! its write head from the origin before going on, so a random-access reader elsewhere never
//! waits behind a whole-blob download — and each byte still comes from the origin once.
//!
//! Bounds: at most [`MAX_WANTED`] ranges wait per blob (further ones are dropped: the asker gets
//! `NotPresent` as before and falls back); a range is only a hint, never a promise.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use shoal_proto::BlobId;
use tokio::sync::{watch, Notify};

/// Most ranges waiting per blob.
pub const MAX_WANTED: usize = 64;

/// Blobs this node fetches under an origin lease, with what peers want of them.
#[derive(Debug, Default)]
pub struct Seeds {
    blobs: Mutex<HashMap<BlobId, Arc<Seed>>>,
}

/// One blob being seeded.
#[derive(Debug)]
pub struct Seed {
    wanted: Mutex<Vec<Range<u64>>>,
    wake: Notify,
    /// Bumped whenever the download committed bytes; waiters re-check then.
    progress: watch::Sender<u64>,
}

/// Keeps a blob registered; unregisters it when dropped (the lease ended or the fill stopped).
#[derive(Debug)]
pub struct SeedGuard {
    seeds: Arc<Seeds>,
    blob: BlobId,
    seed: Arc<Seed>,
}

impl Seeds {
    fn blobs(&self) -> MutexGuard<'_, HashMap<BlobId, Arc<Seed>>> {
        self.blobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `blob` as seeded by the caller until the guard drops.
    pub fn register(self: &Arc<Self>, blob: &BlobId) -> SeedGuard {
        let seed = Arc::new(Seed {
            wanted: Mutex::new(Vec::new()),
            wake: Notify::new(),
            progress: watch::channel(0).0,
        });
        self.blobs().insert(blob.clone(), Arc::clone(&seed));
        SeedGuard {
            seeds: Arc::clone(self),
            blob: blob.clone(),
            seed,
        }
    }

    /// Asks the seed of `blob`, if this node is one, for `range`; returns a receiver that changes
    /// whenever the download commits bytes (and errs once it stops seeding). `None`: not seeded.
    pub fn want(&self, blob: &BlobId, range: Range<u64>) -> Option<watch::Receiver<u64>> {
        let seed = self.blobs().get(blob).cloned()?;
        let rx = seed.progress.subscribe();
        {
            let mut wanted = seed.wanted.lock().unwrap_or_else(|e| e.into_inner());
            if wanted.len() < MAX_WANTED && range.start < range.end {
                wanted.push(range);
            }
        }
        seed.wake.notify_one();
        Some(rx)
    }

    /// Whether `blob` is seeded here now.
    pub fn is_seeding(&self, blob: &BlobId) -> bool {
        self.blobs().contains_key(blob)
    }
}

impl Seed {
    /// Every range wanted since the last call.
    pub fn take(&self) -> Vec<Range<u64>> {
        std::mem::take(&mut *self.wanted.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Resolves when a range was wanted since the last `take` (or a wake-up was stored).
    pub async fn wanted(&self) {
        self.wake.notified().await;
    }

    /// The download committed bytes: waiters look again.
    pub fn progressed(&self) {
        self.progress.send_modify(|n| *n = n.wrapping_add(1));
    }
}

impl std::ops::Deref for SeedGuard {
    type Target = Seed;

    fn deref(&self) -> &Seed {
        &self.seed
    }
}

impl Drop for SeedGuard {
    fn drop(&mut self) {
        let mut blobs = self.seeds.blobs();
        // A later registration of the same blob (a new lease) is not this guard's to remove.
        if blobs
            .get(&self.blob)
            .is_some_and(|s| Arc::ptr_eq(s, &self.seed))
        {
            blobs.remove(&self.blob);
        }
    }
}

/// The wanted ranges worth fetching out of order: each widened to whole pieces of `piece`,
/// clipped to `[ahead_of, size)`, without bytes `present` already holds, merged, and at most
/// `max_bytes` in all (the earliest first). Ranges the sequential fill reaches within `near`
/// bytes of `ahead_of` are left to it.
pub fn plan(
    wanted: &[Range<u64>],
    piece: u64,
    size: u64,
    ahead_of: u64,
    near: u64,
    present: &crate::store::ranges::RangeSet,
    max_bytes: u64,
) -> Vec<Range<u64>> {
    let piece = piece.max(1);
    let mut want = crate::store::ranges::RangeSet::new();
    for r in wanted {
        // An empty range, or one from the end of the blob on, wants nothing (a member may ask for
        // any range of a blob the seed has no size for yet).
        if r.start >= size || r.start >= r.end {
            continue;
        }
        let start = (r.start / piece) * piece;
        let end = r.end.div_ceil(piece).saturating_mul(piece).min(size);
        let start = start.max(ahead_of);
        if start >= end || r.end <= ahead_of.saturating_add(near) {
            continue;
        }
        want.insert(start..end);
    }
    let mut out = Vec::new();
    let mut budget = max_bytes;
    for r in want.iter() {
        for gap in present.gaps(&r) {
            if budget == 0 {
                return out;
            }
            let end = gap.end.min(gap.start.saturating_add(budget));
            budget -= end - gap.start;
            out.push(gap.start..end);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ranges::RangeSet;

    const P: u64 = 100;

    #[test]
    #[allow(clippy::single_range_in_vec_init)] // one wanted range, not a Vec of its numbers
    fn wants_widen_to_pieces_skip_what_is_near_or_held_and_respect_the_budget() {
        let none = RangeSet::new();
        // A byte in piece 7 of a 1000-byte blob, the fill at 0, nothing near: piece 7 whole.
        assert_eq!(
            plan(&[750..751], P, 1000, 0, 0, &none, u64::MAX),
            vec![700..800]
        );
        // Within `near` of the fill: left to it.
        assert!(plan(&[750..751], P, 1000, 500, 300, &none, u64::MAX).is_empty());
        // Behind the fill: nothing.
        assert!(plan(&[100..200], P, 1000, 300, 0, &none, u64::MAX).is_empty());
        // Straddling the fill: only what is ahead of it.
        assert_eq!(
            plan(&[250..450], P, 1000, 300, 0, &none, u64::MAX),
            vec![300..500]
        );
        // The last piece is short.
        assert_eq!(
            plan(&[990..995], P, 995, 0, 0, &none, u64::MAX),
            vec![900..995]
        );
        // A member asking past the blob's end, or for nothing, makes the seed fetch nothing.
        assert!(plan(
            &[995..2000, 5000..u64::MAX, 7..7],
            P,
            995,
            0,
            0,
            &none,
            u64::MAX
        )
        .is_empty());
        // Held bytes are not fetched again; overlapping wants merge.
        let held = RangeSet::from_range(720..760);
        assert_eq!(
            plan(&[750..751, 710..790], P, 1000, 0, 0, &held, u64::MAX),
            vec![700..720, 760..800]
        );
        // The budget cuts, earliest first.
        assert_eq!(
            plan(&[850..851, 150..151], P, 1000, 0, 0, &none, 150),
            vec![100..200, 800..850]
        );
    }

    #[tokio::test]
    async fn a_want_reaches_the_registered_download_and_goes_with_it() {
        let seeds = Arc::new(Seeds::default());
        let blob = BlobId::sha256(b"seeded");
        assert!(seeds.want(&blob, 0..10).is_none(), "not seeded yet");
        let guard = seeds.register(&blob);
        let mut rx = seeds.want(&blob, 5..9).expect("seeded");
        guard.wanted().await;
        assert_eq!(guard.take(), vec![5..9]);
        assert!(guard.take().is_empty());
        guard.progressed();
        rx.changed().await.expect("a progress report");
        // An empty range is no want; the cap holds.
        for i in 0..(MAX_WANTED as u64 + 10) {
            let _ = seeds.want(&blob, i..i + 1);
        }
        let _ = seeds.want(&blob, 3..3);
        assert_eq!(guard.take().len(), MAX_WANTED);
        drop(guard);
        assert!(rx.changed().await.is_err(), "waiters learn the seed went");
        assert!(!seeds.is_seeding(&blob));
    }
}
