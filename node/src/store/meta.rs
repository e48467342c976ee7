//! `MetaStore`: the ordered key-value store under the blob store's metadata,
//! with an in-memory implementation (tests) and a RocksDB one (production).
//!
//! Keys are opaque here: `keys` builds them, the first byte names the table.
//! Writes go in atomic batches; `Durability::Sync` batches are on stable
//! storage when `write` returns (the store's crash-safety claim rests on it).

pub mod memory;
pub mod rocks;

use std::path::PathBuf;

/// A metadata backend failure.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("RocksDB at {path}")]
    Rocks {
        path: PathBuf,
        #[source]
        source: rocksdb::Error,
    },
}

/// A key and its value.
pub type Entry = (Vec<u8>, Vec<u8>);

/// Whether a write must be on stable storage before `write` returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// fsync'ed (WAL) before returning: for records that claim content.
    Sync,
    /// May be lost in a crash: access times and other hints.
    Buffered,
}

/// One write of a batch.
#[derive(Clone, Debug)]
pub enum Op {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
}

/// Writes applied atomically, in order.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub ops: Vec<Op>,
}

impl Batch {
    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push(Op::Put(key, value));
    }

    pub fn delete(&mut self, key: Vec<u8>) {
        self.ops.push(Op::Delete(key));
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// A database's own memory, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MetaMemory {
    /// Write buffers (memtables), active and waiting for their flush.
    pub memtables: u64,
    /// The block cache's fill.
    pub block_cache: u64,
    /// Open table files' indexes and filters kept outside the block cache.
    pub table_readers: u64,
}

/// An ordered, atomic-batch key-value store.
pub trait MetaStore: Send + Sync {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, DbError>;

    /// Every entry whose key starts with `prefix`, in key order.
    fn scan(&self, prefix: &[u8]) -> Result<Vec<Entry>, DbError>;

    /// Applies `batch` atomically.
    fn write(&self, batch: Batch, durability: Durability) -> Result<(), DbError>;

    /// Makes every earlier write durable (for shutdown).
    fn flush(&self) -> Result<(), DbError>;

    /// What the database holds in memory, where it can tell (for the metrics).
    fn memory(&self) -> MetaMemory {
        MetaMemory::default()
    }

    fn put(&self, key: Vec<u8>, value: Vec<u8>, durability: Durability) -> Result<(), DbError> {
        let mut batch = Batch::default();
        batch.put(key, value);
        self.write(batch, durability)
    }

    fn delete(&self, key: Vec<u8>, durability: Durability) -> Result<(), DbError> {
        let mut batch = Batch::default();
        batch.delete(key);
        self.write(batch, durability)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same contract checked against both implementations.
    fn contract(db: &dyn MetaStore) {
        db.put(vec![1, 2], b"a".to_vec(), Durability::Sync)
            .expect("put");
        db.put(vec![1, 1], b"b".to_vec(), Durability::Buffered)
            .expect("put");
        db.put(vec![2, 0], b"c".to_vec(), Durability::Sync)
            .expect("put");
        assert_eq!(db.get(&[1, 2]).expect("get"), Some(b"a".to_vec()));
        assert_eq!(db.get(&[1]).expect("get"), None);
        let scanned = db.scan(&[1]).expect("scan");
        assert_eq!(
            scanned,
            vec![(vec![1, 1], b"b".to_vec()), (vec![1, 2], b"a".to_vec())]
        );
        let mut batch = Batch::default();
        batch.delete(vec![1, 1]);
        batch.put(vec![1, 3], b"d".to_vec());
        db.write(batch, Durability::Sync).expect("write");
        let keys: Vec<_> = db
            .scan(&[1])
            .expect("scan")
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, vec![vec![1, 2], vec![1, 3]]);
        assert_eq!(db.scan(&[]).expect("scan").len(), 3);
        db.delete(vec![2, 0], Durability::Sync).expect("delete");
        assert!(db.scan(&[2]).expect("scan").is_empty());
        db.flush().expect("flush");
    }

    #[test]
    fn memory_contract() {
        contract(&memory::MemoryMeta::default());
    }

    #[test]
    fn rocks_contract() {
        let dir = tempfile::tempdir().expect("tempdir");
        contract(&rocks::RocksMeta::open(&dir.path().join("db")).expect("open"));
    }

    /// RocksDB tells what it holds in memory: its write buffer grows with what is written.
    #[test]
    fn rocks_reports_its_memory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = rocks::RocksMeta::open(&dir.path().join("db")).expect("open");
        let before = db.memory();
        for i in 0..8000u32 {
            db.put(i.to_be_bytes().to_vec(), vec![7; 512], Durability::Buffered)
                .expect("put");
        }
        let after = db.memory();
        assert!(
            after.memtables >= before.memtables + (2 << 20),
            "{before:?} → {after:?}"
        );
    }
}
