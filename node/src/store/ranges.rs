//! `RangeSet`: the set of byte ranges of a blob that are present on disk.
//!
//! Invariant: the ranges are half-open, non-empty, sorted, pairwise disjoint
//! and never touching (`[0,5)` and `[5,9)` are stored as `[0,9)`), so two sets
//! holding the same bytes are equal and `iter` yields the maximal runs.
//!
//! Pure: no I/O. Serialised as a list of `[start, end]` pairs; deserialising
//! normalises whatever it is given (empty or inverted pairs are ignored), so a
//! damaged database value can never break the invariant.

use std::ops::Range;

use serde::{Deserialize, Serialize};

/// Disjoint, sorted, half-open `u64` ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Vec<[u64; 2]>", into = "Vec<[u64; 2]>")]
pub struct RangeSet {
    /// `(start, end)` with `start < end`, sorted, with gaps between neighbours.
    runs: Vec<(u64, u64)>,
}

impl RangeSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// The set holding exactly `range` (empty if `range` is empty).
    pub fn from_range(range: Range<u64>) -> Self {
        let mut set = Self::new();
        set.insert(range);
        set
    }

    /// Adds `range`, merging it with every run it overlaps or touches.
    pub fn insert(&mut self, range: Range<u64>) {
        if range.start >= range.end {
            return;
        }
        // First run that ends at or after `range.start` (could merge).
        let first = self.runs.partition_point(|&(_, e)| e < range.start);
        // First run that starts after `range.end` (cannot merge).
        let last = self.runs.partition_point(|&(s, _)| s <= range.end);
        let mut start = range.start;
        let mut end = range.end;
        if first < last {
            start = start.min(self.runs[first].0);
            end = end.max(self.runs[last - 1].1);
        }
        self.runs.splice(first..last, std::iter::once((start, end)));
    }

    /// Whether every byte of `range` is in the set (true for an empty range).
    pub fn contains_range(&self, range: &Range<u64>) -> bool {
        if range.start >= range.end {
            return true;
        }
        self.run_containing(range.start)
            .is_some_and(|run| run.end >= range.end)
    }

    /// Whether `offset` is in the set.
    pub fn contains(&self, offset: u64) -> bool {
        self.run_containing(offset).is_some()
    }

    /// The maximal run holding `offset`, if any.
    pub fn run_containing(&self, offset: u64) -> Option<Range<u64>> {
        let i = self.runs.partition_point(|&(_, e)| e <= offset);
        let &(s, e) = self.runs.get(i)?;
        (s <= offset).then_some(s..e)
    }

    /// How many bytes of `range` are in the set.
    pub fn covered(&self, range: &Range<u64>) -> u64 {
        self.overlapping(range)
            .map(|(s, e)| e.min(range.end) - s.max(range.start))
            .sum()
    }

    /// The parts of `range` that are not in the set, in order.
    pub fn gaps(&self, range: &Range<u64>) -> Vec<Range<u64>> {
        let mut gaps = Vec::new();
        let mut pos = range.start;
        for (s, e) in self.overlapping(range) {
            if s > pos {
                gaps.push(pos..s);
            }
            pos = e;
        }
        if pos < range.end {
            gaps.push(pos..range.end);
        }
        gaps
    }

    /// Total number of bytes in the set.
    pub fn len(&self) -> u64 {
        self.runs.iter().map(|&(s, e)| e - s).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// One past the highest byte in the set (0 when empty).
    pub fn end(&self) -> u64 {
        self.runs.last().map_or(0, |&(_, e)| e)
    }

    /// Number of maximal runs.
    pub fn run_count(&self) -> usize {
        self.runs.len()
    }

    /// The maximal runs, in order.
    pub fn iter(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.runs.iter().map(|&(s, e)| s..e)
    }

    /// Runs that share at least one byte with `range`.
    fn overlapping<'a>(&'a self, range: &Range<u64>) -> impl Iterator<Item = (u64, u64)> + 'a {
        let end = range.end;
        let first = self.runs.partition_point(|&(_, e)| e <= range.start);
        self.runs[first..]
            .iter()
            .copied()
            .take_while(move |&(s, _)| s < end)
    }
}

impl From<Vec<[u64; 2]>> for RangeSet {
    fn from(pairs: Vec<[u64; 2]>) -> Self {
        let mut set = Self::new();
        for [s, e] in pairs {
            set.insert(s..e);
        }
        set
    }
}

impl From<RangeSet> for Vec<[u64; 2]> {
    fn from(set: RangeSet) -> Self {
        set.runs.into_iter().map(|(s, e)| [s, e]).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const UNIVERSE: u64 = 96;

    /// The obvious model: one bool per byte.
    fn model(ops: &[(u64, u64)]) -> Vec<bool> {
        let mut bits = vec![false; UNIVERSE as usize];
        for &(s, e) in ops {
            for b in s..e.max(s) {
                bits[b as usize] = true;
            }
        }
        bits
    }

    fn build(ops: &[(u64, u64)]) -> RangeSet {
        let mut set = RangeSet::new();
        for &(s, e) in ops {
            set.insert(s..e);
        }
        set
    }

    fn ops() -> impl Strategy<Value = Vec<(u64, u64)>> {
        proptest::collection::vec((0..UNIVERSE, 0..UNIVERSE), 0..12)
    }

    #[test]
    fn merges_touching_and_overlapping() {
        let mut s = RangeSet::new();
        s.insert(10..20);
        s.insert(30..40);
        s.insert(20..30);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![10..40]);
        s.insert(0..5);
        s.insert(3..11);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0..40]);
        s.insert(50..50);
        assert_eq!(s.run_count(), 1);
        assert_eq!(s.gaps(&(0..60)), vec![40..60]);
        assert_eq!(s.covered(&(35..45)), 5);
    }

    #[test]
    fn serde_normalises() {
        let s: RangeSet = serde_json::from_str("[[5,9],[0,5],[20,10],[7,7]]").expect("json");
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0..9]);
        assert_eq!(serde_json::to_string(&s).expect("json"), "[[0,9]]");
    }

    proptest! {
        #[test]
        fn matches_bitmap_model(ops in ops(), q in (0..UNIVERSE, 0..=UNIVERSE)) {
            let set = build(&ops);
            let bits = model(&ops);
            // Invariant: sorted, non-empty, non-touching runs.
            let runs: Vec<_> = set.iter().collect();
            for r in &runs {
                prop_assert!(r.start < r.end);
            }
            for w in runs.windows(2) {
                prop_assert!(w[0].end < w[1].start);
            }
            prop_assert_eq!(set.len(), bits.iter().filter(|&&b| b).count() as u64);
            for (i, &b) in bits.iter().enumerate() {
                prop_assert_eq!(set.contains(i as u64), b);
            }
            let (qs, qe) = (q.0.min(q.1), q.0.max(q.1));
            let range = qs..qe;
            let slice = &bits[qs as usize..qe as usize];
            prop_assert_eq!(set.contains_range(&range), slice.iter().all(|&b| b));
            prop_assert_eq!(set.covered(&range), slice.iter().filter(|&&b| b).count() as u64);
            let gap_bytes: Vec<u64> = set.gaps(&range).into_iter().flatten().collect();
            let model_gaps: Vec<u64> = (qs..qe).filter(|&i| !bits[i as usize]).collect();
            prop_assert_eq!(gap_bytes, model_gaps);
            for g in set.gaps(&range) {
                prop_assert!(g.start < g.end);
            }
        }

        #[test]
        fn insertion_order_does_not_matter(ops in ops()) {
            let mut rev = ops.clone();
            rev.reverse();
            prop_assert_eq!(build(&ops), build(&rev));
        }

        #[test]
        fn serde_round_trips(ops in ops()) {
            let set = build(&ops);
            let json = serde_json::to_string(&set).expect("json");
            prop_assert_eq!(serde_json::from_str::<RangeSet>(&json).expect("json"), set);
        }
    }
}
