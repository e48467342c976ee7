//! What the scheduler knows about one blob: its geometry (size, piece size),
//! which nodes hold which pieces, its per-piece SHA-256 list, and its origin
//! leases.
//!
//! Invariants: every holder's `have` has `pieces` bits; a hash list, when
//! present, has `pieces` entries; a record with no holder and no lease is
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
    pub holders: HashMap<NodeId, HolderRecord>,
    pub leases: Vec<Lease>,
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
