//! What the scheduler knows about one blob: its geometry (size, piece size),
//! which nodes hold which pieces, its per-piece SHA-256 list, and its origin
//! leases.
//!
//! Invariants: every holder's `have` has `pieces` bits and `pieces` is its
//! count; a hash list, when present, has `pieces` entries; `order` lists
//! exactly the holders and `complete` exactly the complete ones (holders
//! change only through [`BlobRecord::insert_holder`] and
//! [`BlobRecord::remove_holder`]); a record with no holder and no lease is
//! dropped by `State`.

use std::collections::HashMap;

use shoal_proto::sched::{PieceBits, PieceHashes};
use shoal_proto::NodeId;

use super::leases::Lease;

#[derive(Clone, Debug, Default)]
pub struct BlobRecord {
    pub geometry: Option<Geometry>,
    /// Known size of a blob nobody holds yet (from a parents request).
    pub size_hint: Option<u64>,
    pub hashes: Option<PieceHashes>,
    /// The hash list came complete from a node holding the whole,
    /// digest-verified blob: lease holders no longer overwrite it.
    pub hashes_verified: bool,
    /// Read freely; change only through `insert_holder` / `remove_holder`.
    pub holders: HashMap<NodeId, HolderRecord>,
    pub leases: Vec<Lease>,
    /// The holders, indexable: ranking samples them when there are many.
    order: IdList,
    /// The complete holders, indexable.
    complete: IdList,
}

/// A set of node ids that can also be indexed (for sampling): a vector and
/// each id's position in it. Removal swaps the last id into the hole.
#[derive(Clone, Debug, Default)]
struct IdList {
    ids: Vec<NodeId>,
    at: HashMap<NodeId, usize>,
}

impl IdList {
    fn insert(&mut self, id: NodeId) {
        if let std::collections::hash_map::Entry::Vacant(e) = self.at.entry(id) {
            e.insert(self.ids.len());
            self.ids.push(id);
        }
    }

    fn remove(&mut self, id: &NodeId) {
        let Some(i) = self.at.remove(id) else {
            return;
        };
        self.ids.swap_remove(i);
        if let Some(moved) = self.ids.get(i) {
            self.at.insert(*moved, i);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub size: u64,
    pub piece_size: u64,
    pub pieces: u32,
}

#[derive(Clone, Debug)]
pub struct HolderRecord {
    pub have: PieceBits,
    /// Pieces held (`have.count()`, kept so ranking does not recount).
    pub pieces: u32,
    pub complete: bool,
    /// It holds bytes of the blob, whole pieces or not (chunks a lazy mount read).
    pub partial: bool,
}

/// Why a blob announcement was not applied.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BlobRejection {
    #[error("piece size 0 or more than the allowed number of pieces")]
    BadGeometry,
    #[error("piece map has {got} pieces, the blob has {expected}")]
    PieceCount { expected: u32, got: u32 },
    #[error("size {got} disagrees with the size {known} other holders announced")]
    SizeMismatch { known: u64, got: u64 },
}

impl BlobRecord {
    /// Check an announced geometry against what is known, and adopt it if
    /// this is the first.
    pub fn accept_geometry(
        &mut self,
        size: u64,
        piece_size: u64,
        have_len: u32,
    ) -> Result<Geometry, BlobRejection> {
        let pieces = PieceBits::piece_count(size, piece_size).ok_or(BlobRejection::BadGeometry)?;
        if have_len != pieces {
            return Err(BlobRejection::PieceCount {
                expected: pieces,
                got: have_len,
            });
        }
        let g = Geometry {
            size,
            piece_size,
            pieces,
        };
        match self.geometry {
            Some(known) if known.size != size => Err(BlobRejection::SizeMismatch {
                known: known.size,
                got: size,
            }),
            Some(known) if known != g => Err(BlobRejection::BadGeometry),
            Some(known) => Ok(known),
            None => {
                self.geometry = Some(g);
                Ok(g)
            }
        }
    }

    /// Merge a hash list. `verified` lists (from a complete holder) win over
    /// what a lease holder sent; `null` entries change nothing. Lists of the
    /// wrong length are ignored.
    pub fn merge_hashes(&mut self, list: &PieceHashes, verified: bool) {
        let Some(g) = self.geometry else { return };
        if list.len() != g.pieces as usize || (self.hashes_verified && !verified) {
            return;
        }
        let stored = self
            .hashes
            .get_or_insert_with(|| vec![None; g.pieces as usize]);
        for (slot, new) in stored.iter_mut().zip(list) {
            if new.is_some() {
                *slot = *new;
            }
        }
        if verified && list.iter().all(Option::is_some) {
            self.hashes_verified = true;
        }
    }

    /// Number of known piece hashes.
    pub fn hashes_known(&self) -> u32 {
        self.hashes
            .as_ref()
            .map_or(0, |h| h.iter().filter(|x| x.is_some()).count() as u32)
    }

    /// Every piece's hash is known.
    pub fn hashes_complete(&self) -> bool {
        match (self.geometry, &self.hashes) {
            (Some(g), Some(h)) => h.len() == g.pieces as usize && h.iter().all(Option::is_some),
            (Some(g), None) => g.pieces == 0,
            _ => false,
        }
    }

    /// Add or replace `node`'s holding.
    pub fn insert_holder(&mut self, node: NodeId, h: HolderRecord) {
        self.order.insert(node);
        if h.complete {
            self.complete.insert(node);
        } else {
            self.complete.remove(&node);
        }
        self.holders.insert(node, h);
    }

    pub fn remove_holder(&mut self, node: &NodeId) -> Option<HolderRecord> {
        self.order.remove(node);
        self.complete.remove(node);
        self.holders.remove(node)
    }

    /// The holders that announced the whole blob.
    pub fn complete_holders(&self) -> &[NodeId] {
        &self.complete.ids
    }

    /// Up to `k` holders drawn (uniformly, with repeats removed) by a
    /// generator seeded with `seed`; every holder when there are at most `k`.
    /// `complete_only`: draw among the complete holders.
    pub fn sample(&self, seed: u64, k: usize, complete_only: bool) -> Vec<NodeId> {
        let ids = if complete_only {
            &self.complete.ids
        } else {
            &self.order.ids
        };
        if ids.len() <= k {
            return ids.clone();
        }
        let mut x = seed;
        let mut out: Vec<NodeId> = (0..k)
            .map(|_| {
                x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let r = splitmix(x);
                ids[((u128::from(r) * ids.len() as u128) >> 64) as usize]
            })
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    pub fn lease_of(&self, node: NodeId) -> Option<&Lease> {
        self.leases.iter().find(|l| l.holder == node)
    }

    pub fn lease_of_mut(&mut self, node: NodeId) -> Option<&mut Lease> {
        self.leases.iter_mut().find(|l| l.holder == node)
    }

    pub fn is_empty(&self) -> bool {
        self.holders.is_empty() && self.leases.is_empty()
    }

    /// Size as announced, or as hinted by an asker.
    pub fn size(&self) -> Option<u64> {
        self.geometry.map(|g| g.size).or(self.size_hint)
    }
}

/// The SplitMix64 output function: a cheap, well-mixed 64-bit hash.
fn splitmix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use shoal_proto::sched::PieceSha256;

    fn h(b: u8) -> Option<PieceSha256> {
        Some(PieceSha256([b; 32]))
    }

    #[test]
    fn geometry_first_wins() {
        let mut r = BlobRecord::default();
        assert!(r.accept_geometry(10, 4, 3).is_ok());
        assert_eq!(
            r.accept_geometry(11, 4, 3),
            Err(BlobRejection::SizeMismatch { known: 10, got: 11 })
        );
        assert_eq!(
            r.accept_geometry(10, 4, 2),
            Err(BlobRejection::PieceCount {
                expected: 3,
                got: 2
            })
        );
        assert_eq!(r.accept_geometry(10, 0, 0), Err(BlobRejection::BadGeometry));
        assert_eq!(r.accept_geometry(10, 5, 2), Err(BlobRejection::BadGeometry));
    }

    fn holder(pieces: u32, complete: bool) -> HolderRecord {
        HolderRecord {
            have: PieceBits::empty(4),
            pieces,
            complete,
            partial: false,
        }
    }

    #[test]
    fn holder_index_follows_holders() {
        let id = |i: u8| NodeId::from_bytes([i; 32]);
        let mut r = BlobRecord::default();
        for i in 0..50 {
            r.insert_holder(id(i), holder(1, i % 5 == 0));
        }
        r.insert_holder(id(0), holder(2, false)); // no longer complete
        r.insert_holder(id(1), holder(4, true)); // now complete
        for i in (0..50).step_by(3) {
            r.remove_holder(&id(i));
        }
        let mut all = r.sample(1, 1000, false);
        all.sort();
        let mut want: Vec<NodeId> = r.holders.keys().copied().collect();
        want.sort();
        assert_eq!(all, want, "a large sample is every holder");
        let mut complete = r.complete_holders().to_vec();
        complete.sort();
        let mut want: Vec<NodeId> = r
            .holders
            .iter()
            .filter(|(_, h)| h.complete)
            .map(|(k, _)| *k)
            .collect();
        want.sort();
        assert_eq!(complete, want);
        let s = r.sample(7, 10, false);
        assert!(!s.is_empty() && s.len() <= 10);
        assert!(s.iter().all(|n| r.holders.contains_key(n)));
        assert_eq!(s, r.sample(7, 10, false), "a seed draws the same sample");
        assert_ne!(s, r.sample(8, 10, false), "another seed, another sample");
    }

    #[test]
    fn hashes_merge() {
        let mut r = BlobRecord::default();
        r.merge_hashes(&vec![h(1)], false); // no geometry yet: ignored
        assert!(r.hashes.is_none());
        r.accept_geometry(10, 4, 3).unwrap();
        r.merge_hashes(&vec![h(1), None, None], false);
        r.merge_hashes(&vec![None, h(2), None], false);
        assert_eq!(r.hashes_known(), 2);
        assert!(!r.hashes_complete());
        r.merge_hashes(&vec![h(1)], false); // wrong length: ignored
        assert_eq!(r.hashes_known(), 2);
        r.merge_hashes(&vec![h(9), h(2), h(3)], true);
        assert!(r.hashes_verified && r.hashes_complete());
        r.merge_hashes(&vec![h(7), None, None], false); // lease holder can't overwrite
        assert_eq!(r.hashes.as_ref().unwrap()[0], h(9));
    }
}
