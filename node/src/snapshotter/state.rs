//! The snapshot table: containerd's snapshot model — names, parents, kinds, labels, times and
//! usage — as a pure state machine. Every operation is planned first ([`Change`]: the records to
//! write and delete), persisted by the caller, and only then applied here, so a failed write
//! leaves memory as it was.
//!
//! Invariants (the ones containerd's overlayfs snapshotter keeps, which containerd relies on):
//! - a name is unique across kinds; a parent exists and is committed;
//! - an active snapshot is committed under a new name keeping its id and parent, its labels
//!   replaced by the commit's; a view cannot be committed;
//! - a snapshot with children (of any kind) cannot be removed;
//! - ids are never reused (the counter is persisted with every change that takes one), so a
//!   directory named by an id belongs to one snapshot ever;
//! - labels: at most 4096 bytes per key and value together.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::store::SnapshotWrite;

/// The largest key + value of one label, as containerd allows.
pub const MAX_LABEL: usize = 4096;
/// All of one snapshot's labels together, at most (every snapshot's labels are persisted).
pub const MAX_LABELS_TOTAL: usize = 64 << 10;
/// The longest snapshot key or name accepted.
pub const MAX_NAME: usize = 4096;

/// A snapshot's kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    View,
    Active,
    Committed,
}

impl Kind {
    /// The name containerd's filters use (`kind==active`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// Disk usage of a snapshot's own directory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub size: i64,
    pub inodes: i64,
}

/// One snapshot as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Names the snapshot's directory; kept across commit.
    pub id: u64,
    pub kind: Kind,
    /// The parent's name (always a committed snapshot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Nanoseconds since the Unix epoch.
    pub created_ns: u64,
    pub updated_ns: u64,
    /// Measured when committed; zero otherwise (active snapshots are measured on demand).
    #[serde(default)]
    pub usage: Usage,
}

/// Why an operation was refused; the service maps each to containerd's error class.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("snapshot {0} does not exist")]
    NotFound(String),
    #[error("snapshot {0} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
}

/// What an operation writes: records put (`Some`) or deleted (`None`), and the new id counter.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Change {
    pub writes: Vec<(String, Option<Record>)>,
    pub seq: Option<u64>,
}

impl Change {
    /// The store writes of this change.
    pub fn to_store(&self) -> Vec<SnapshotWrite> {
        let mut out: Vec<SnapshotWrite> = self
            .writes
            .iter()
            .map(|(name, rec)| match rec {
                Some(r) => SnapshotWrite::Put {
                    name: name.clone(),
                    value: serde_json::to_vec(r).unwrap_or_default(),
                },
                None => SnapshotWrite::Delete { name: name.clone() },
            })
            .collect();
        if let Some(seq) = self.seq {
            out.push(SnapshotWrite::Seq(seq));
        }
        out
    }
}

/// Every snapshot, by name.
#[derive(Clone, Debug, Default)]
pub struct Table {
    records: BTreeMap<String, Record>,
    seq: u64,
}

impl Table {
    /// The table as stored; records that do not decode are returned by name (and left out).
    pub fn load(entries: Vec<(String, Vec<u8>)>, seq: u64) -> (Self, Vec<String>) {
        let mut records = BTreeMap::new();
        let mut bad = Vec::new();
        for (name, value) in entries {
            match serde_json::from_slice::<Record>(&value) {
                Ok(r) => {
                    records.insert(name, r);
                }
                Err(_) => bad.push(name),
            }
        }
        let seq = records.values().map(|r| r.id).max().unwrap_or(0).max(seq);
        (Table { records, seq }, bad)
    }

    pub fn get(&self, name: &str) -> Option<&Record> {
        self.records.get(name)
    }

    /// Every snapshot in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Record)> {
        self.records.iter()
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The ancestors of `name` (not itself), nearest first, as (name, record).
    pub fn ancestors(&self, name: &str) -> Vec<(&str, &Record)> {
        let mut out = Vec::new();
        let mut next = self.records.get(name).and_then(|r| r.parent.as_deref());
        while let Some(p) = next {
            let Some((k, r)) = self.records.get_key_value(p) else {
                break;
            };
            // A cycle cannot be made through this table's operations; stop rather than loop.
            if out.len() > self.records.len() {
                break;
            }
            out.push((k.as_str(), r));
            next = r.parent.as_deref();
        }
        out
    }

    /// Whether any snapshot names `name` as its parent.
    pub fn has_children(&self, name: &str) -> bool {
        self.records
            .values()
            .any(|r| r.parent.as_deref() == Some(name))
    }

    /// A new active or view snapshot `key` on `parent`.
    pub fn plan_create(
        &self,
        key: &str,
        parent: Option<&str>,
        kind: Kind,
        labels: BTreeMap<String, String>,
        now_ns: u64,
    ) -> Result<(Change, Record), Error> {
        if kind == Kind::Committed {
            return Err(Error::InvalidArgument(
                "a snapshot is created active or view".into(),
            ));
        }
        self.check_new(key, parent, &labels)?;
        let id = self.seq + 1;
        let rec = Record {
            id,
            kind,
            parent: parent.map(str::to_owned),
            labels,
            created_ns: now_ns,
            updated_ns: now_ns,
            usage: Usage::default(),
        };
        let change = Change {
            writes: vec![(key.to_owned(), Some(rec.clone()))],
            seq: Some(id),
        };
        Ok((change, rec))
    }

    /// A committed snapshot `name` on `parent` made directly (a layer the snapshotter provides
    /// itself, so containerd unpacks nothing).
    pub fn plan_provided(
        &self,
        name: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
        now_ns: u64,
    ) -> Result<(Change, Record), Error> {
        self.check_new(name, parent, &labels)?;
        let id = self.seq + 1;
        let rec = Record {
            id,
            kind: Kind::Committed,
            parent: parent.map(str::to_owned),
            labels,
            created_ns: now_ns,
            updated_ns: now_ns,
            usage: Usage::default(),
        };
        let change = Change {
            writes: vec![(name.to_owned(), Some(rec.clone()))],
            seq: Some(id),
        };
        Ok((change, rec))
    }

    /// Commit active snapshot `key` as `name` with `labels` (replacing its own) and `usage`.
    pub fn plan_commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
        usage: Usage,
        now_ns: u64,
    ) -> Result<(Change, Record), Error> {
        check_name(name)?;
        check_labels(&labels)?;
        if self.records.contains_key(name) {
            return Err(Error::AlreadyExists(name.to_owned()));
        }
        let Some(active) = self.records.get(key) else {
            return Err(Error::NotFound(key.to_owned()));
        };
        if active.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key} is {}, not active: only an active snapshot can be committed",
                active.kind.as_str()
            )));
        }
        let rec = Record {
            id: active.id,
            kind: Kind::Committed,
            parent: active.parent.clone(),
            labels,
            created_ns: now_ns,
            updated_ns: now_ns,
            usage,
        };
        let change = Change {
            writes: vec![(key.to_owned(), None), (name.to_owned(), Some(rec.clone()))],
            seq: None,
        };
        Ok((change, rec))
    }

    /// Remove `key`; refused while anything names it as parent.
    pub fn plan_remove(&self, key: &str) -> Result<(Change, Record), Error> {
        let Some(rec) = self.records.get(key) else {
            return Err(Error::NotFound(key.to_owned()));
        };
        if self.has_children(key) {
            return Err(Error::FailedPrecondition(format!(
                "cannot remove snapshot {key} with child"
            )));
        }
        let change = Change {
            writes: vec![(key.to_owned(), None)],
            seq: None,
        };
        Ok((change, rec.clone()))
    }

    /// Update the labels of `name`: `paths` as containerd's field mask says — empty or
    /// `labels` replaces them all, `labels.K` sets (or, with no value, deletes) one; anything
    /// else is refused (name, parent, kind and times are not updatable).
    pub fn plan_update(
        &self,
        name: &str,
        labels: BTreeMap<String, String>,
        paths: &[String],
        now_ns: u64,
    ) -> Result<(Change, Record), Error> {
        let Some(old) = self.records.get(name) else {
            return Err(Error::NotFound(name.to_owned()));
        };
        let mut rec = old.clone();
        if paths.is_empty() || paths.iter().any(|p| p == "labels") {
            rec.labels = labels.into_iter().filter(|(_, v)| !v.is_empty()).collect();
        } else {
            for path in paths {
                let Some(k) = path.strip_prefix("labels.") else {
                    return Err(Error::InvalidArgument(format!(
                        "cannot update {path:?} of snapshot {name}: only labels are updatable"
                    )));
                };
                match labels.get(k).filter(|v| !v.is_empty()) {
                    Some(v) => rec.labels.insert(k.to_owned(), v.clone()),
                    None => rec.labels.remove(k),
                };
            }
        }
        check_labels(&rec.labels)?;
        rec.updated_ns = now_ns;
        let change = Change {
            writes: vec![(name.to_owned(), Some(rec.clone()))],
            seq: None,
        };
        Ok((change, rec))
    }

    /// Apply a planned (and persisted) change.
    pub fn apply(&mut self, change: &Change) {
        for (name, rec) in &change.writes {
            match rec {
                Some(r) => {
                    self.records.insert(name.clone(), r.clone());
                }
                None => {
                    self.records.remove(name);
                }
            }
        }
        if let Some(seq) = change.seq {
            self.seq = self.seq.max(seq);
        }
    }

    fn check_new(
        &self,
        name: &str,
        parent: Option<&str>,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), Error> {
        check_name(name)?;
        check_labels(labels)?;
        if self.records.contains_key(name) {
            return Err(Error::AlreadyExists(name.to_owned()));
        }
        if let Some(p) = parent {
            let Some(pr) = self.records.get(p) else {
                return Err(Error::NotFound(format!("{p} (the parent)")));
            };
            if pr.kind != Kind::Committed {
                return Err(Error::InvalidArgument(format!(
                    "parent {p} is not a committed snapshot"
                )));
            }
        }
        Ok(())
    }
}

fn check_name(name: &str) -> Result<(), Error> {
    if name.is_empty() {
        return Err(Error::InvalidArgument("an empty snapshot key".into()));
    }
    if name.len() > MAX_NAME {
        return Err(Error::InvalidArgument(format!(
            "a snapshot key of {} bytes (at most {MAX_NAME})",
            name.len()
        )));
    }
    Ok(())
}

fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), Error> {
    let total: usize = labels.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total > MAX_LABELS_TOTAL {
        return Err(Error::InvalidArgument(format!(
            "{} labels of {total} bytes in all (at most {MAX_LABELS_TOTAL})",
            labels.len()
        )));
    }
    for (k, v) in labels {
        if k.is_empty() {
            return Err(Error::InvalidArgument("a label with an empty key".into()));
        }
        if k.len() + v.len() > MAX_LABEL {
            return Err(Error::InvalidArgument(format!(
                "label {:?}: key and value are {} bytes (at most {MAX_LABEL})",
                k.chars().take(64).collect::<String>(),
                k.len() + v.len()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn apply<T>(t: &mut Table, plan: impl FnOnce(&Table) -> Result<(Change, T), Error>) -> T {
        let (c, out) = plan(t).unwrap();
        t.apply(&c);
        out
    }

    #[test]
    fn a_layer_chain_is_prepared_committed_and_removed_top_down() {
        let mut t = Table::default();
        let a = apply(&mut t, |t| {
            t.plan_create("x1", None, Kind::Active, labels(&[("a", "1")]), 1)
        });
        assert_eq!(a.id, 1);
        let c = apply(&mut t, |t| {
            t.plan_commit(
                "L1",
                "x1",
                labels(&[("b", "2")]),
                Usage { size: 5, inodes: 1 },
                2,
            )
        });
        assert_eq!(
            (c.id, c.kind, c.labels.clone()),
            (1, Kind::Committed, labels(&[("b", "2")]))
        );
        assert!(t.get("x1").is_none(), "the active key is gone after commit");
        let b = apply(&mut t, |t| {
            t.plan_create("x2", Some("L1"), Kind::Active, BTreeMap::new(), 3)
        });
        assert_eq!(b.id, 2);
        apply(&mut t, |t| {
            t.plan_commit("L2", "x2", BTreeMap::new(), Usage::default(), 4)
        });
        apply(&mut t, |t| {
            t.plan_create("ctr", Some("L2"), Kind::Active, BTreeMap::new(), 5)
        });
        let chain: Vec<_> = t
            .ancestors("ctr")
            .into_iter()
            .map(|(n, _)| n.to_owned())
            .collect();
        assert_eq!(chain, ["L2", "L1"]);

        assert!(matches!(
            t.plan_remove("L2"),
            Err(Error::FailedPrecondition(_))
        ));
        apply(&mut t, |t| t.plan_remove("ctr"));
        apply(&mut t, |t| t.plan_remove("L2"));
        apply(&mut t, |t| t.plan_remove("L1"));
        assert!(t.is_empty());
        // Ids are not reused after removal.
        let again = apply(&mut t, |t| {
            t.plan_create("x1", None, Kind::Active, BTreeMap::new(), 6)
        });
        assert_eq!(again.id, 4);
    }

    #[test]
    fn refusals_match_containerd() {
        let mut t = Table::default();
        apply(&mut t, |t| {
            t.plan_create("a", None, Kind::Active, BTreeMap::new(), 1)
        });
        apply(&mut t, |t| {
            t.plan_create("v", None, Kind::View, BTreeMap::new(), 1)
        });
        assert_eq!(
            t.plan_create("a", None, Kind::View, BTreeMap::new(), 2)
                .unwrap_err(),
            Error::AlreadyExists("a".into())
        );
        assert!(matches!(
            t.plan_create("b", Some("nope"), Kind::Active, BTreeMap::new(), 2),
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            t.plan_create("b", Some("a"), Kind::Active, BTreeMap::new(), 2),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            t.plan_commit("c", "v", BTreeMap::new(), Usage::default(), 2),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(
            t.plan_commit("v", "a", BTreeMap::new(), Usage::default(), 2),
            Err(Error::AlreadyExists(_))
        ));
        assert!(matches!(
            t.plan_commit("c", "gone", BTreeMap::new(), Usage::default(), 2),
            Err(Error::NotFound(_))
        ));
        assert!(matches!(t.plan_remove("gone"), Err(Error::NotFound(_))));
        assert!(matches!(
            t.plan_create("", None, Kind::Active, BTreeMap::new(), 2),
            Err(Error::InvalidArgument(_))
        ));
        let big = "x".repeat(MAX_LABEL);
        assert!(matches!(
            t.plan_create("b", None, Kind::Active, labels(&[("k", &big)]), 2),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            t.plan_create("b", None, Kind::Committed, BTreeMap::new(), 2),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn update_follows_the_field_mask() {
        let mut t = Table::default();
        apply(&mut t, |t| {
            t.plan_create(
                "a",
                None,
                Kind::Active,
                labels(&[("k1", "v1"), ("k2", "v2")]),
                1,
            )
        });
        let r = apply(&mut t, |t| {
            t.plan_update(
                "a",
                labels(&[("k1", "new"), ("k3", "v3")]),
                &["labels.k1".into(), "labels.k2".into()],
                9,
            )
        });
        assert_eq!(
            r.labels,
            labels(&[("k1", "new")]),
            "k2 deleted, k3 not in the mask"
        );
        assert_eq!((r.created_ns, r.updated_ns), (1, 9));
        let r = apply(&mut t, |t| {
            t.plan_update("a", labels(&[("z", "1"), ("e", "")]), &[], 10)
        });
        assert_eq!(
            r.labels,
            labels(&[("z", "1")]),
            "no mask replaces all; empty values are dropped"
        );
        assert!(matches!(
            t.plan_update("a", BTreeMap::new(), &["parent".into()], 11),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            t.plan_update("gone", BTreeMap::new(), &[], 11),
            Err(Error::NotFound(_))
        ));
    }

    #[test]
    fn a_table_round_trips_through_its_store_encoding() {
        let mut t = Table::default();
        let mut stored = BTreeMap::new();
        let mut seq = 0;
        let mut record = |c: &Change| {
            for w in c.to_store() {
                match w {
                    SnapshotWrite::Put { name, value } => {
                        stored.insert(name, value);
                    }
                    SnapshotWrite::Delete { name } => {
                        stored.remove(&name);
                    }
                    SnapshotWrite::Seq(s) => seq = s,
                }
            }
        };
        let (c, _) = t
            .plan_create("x", None, Kind::Active, labels(&[("a", "b")]), 7)
            .unwrap();
        record(&c);
        t.apply(&c);
        let (c, _) = t
            .plan_commit(
                "L",
                "x",
                labels(&[("c", "d")]),
                Usage { size: 3, inodes: 2 },
                8,
            )
            .unwrap();
        record(&c);
        t.apply(&c);
        let (c, _) = t
            .plan_create("y", Some("L"), Kind::View, BTreeMap::new(), 9)
            .unwrap();
        record(&c);
        t.apply(&c);
        let (c, _) = t.plan_remove("y").unwrap();
        record(&c);
        t.apply(&c);
        let mut entries: Vec<_> = stored.into_iter().collect();
        entries.push(("broken".into(), b"{not json".to_vec()));
        let (loaded, bad) = Table::load(entries, seq);
        assert_eq!(bad, ["broken"]);
        assert_eq!(loaded.records, t.records);
        assert_eq!(loaded.seq, 2);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Create(u8, Option<u8>, bool),
        Commit(u8, u8),
        Remove(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..6, proptest::option::of(0u8..6), any::<bool>())
                .prop_map(|(k, p, v)| Op::Create(k, p, v)),
            (0u8..6, 0u8..6).prop_map(|(n, k)| Op::Commit(n, k)),
            (0u8..6).prop_map(Op::Remove),
        ]
    }

    proptest! {
        /// Whatever containerd asks, the table keeps its invariants: every parent exists and is
        /// committed, ids are unique, and the counter never goes back.
        #[test]
        fn invariants_hold_under_any_sequence(ops in proptest::collection::vec(op(), 0..60)) {
            let mut t = Table::default();
            let name = |i: u8| format!("s{i}");
            let mut last_seq = 0;
            for op in ops {
                let planned = match op {
                    Op::Create(k, p, view) => {
                        let kind = if view { Kind::View } else { Kind::Active };
                        let parent = p.map(name);
                        t.plan_create(&name(k), parent.as_deref(), kind, BTreeMap::new(), 1).map(|(c, _)| c)
                    }
                    Op::Commit(n, k) => t.plan_commit(&name(n), &name(k), BTreeMap::new(), Usage::default(), 1).map(|(c, _)| c),
                    Op::Remove(k) => t.plan_remove(&name(k)).map(|(c, _)| c),
                };
                if let Ok(c) = planned {
                    t.apply(&c);
                }
                let mut ids = std::collections::BTreeSet::new();
                for (n, r) in t.iter() {
                    prop_assert!(ids.insert(r.id), "id {} twice", r.id);
                    if let Some(p) = &r.parent {
                        let pr = t.get(p);
                        prop_assert!(pr.is_some_and(|p| p.kind == Kind::Committed), "{n}: parent {p}");
                    }
                }
                prop_assert!(t.seq >= last_seq);
                last_seq = t.seq;
            }
        }
    }
}
