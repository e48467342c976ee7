//! RocksDB `MetaStore`: one column family, zstd-compressed, and
//! `Durability::Sync` batches written with `WriteOptions::set_sync(true)` so a
//! record is in the fsync'ed WAL before the caller relies on it.

use std::path::{Path, PathBuf};

use rocksdb::{DBCompressionType, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB};

use super::{Batch, DbError, Durability, Entry, MetaMemory, MetaStore, Op};

pub struct RocksMeta {
    db: DB,
    path: PathBuf,
}

impl RocksMeta {
    /// Opens (creating if missing) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, DbError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.set_compression_type(DBCompressionType::Zstd);
        // Metadata is small; keep RocksDB's own footprint modest.
        opts.set_keep_log_file_num(4);
        opts.set_max_total_wal_size(64 << 20);
        let db = DB::open(&opts, path).map_err(|source| DbError::Rocks {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            db,
            path: path.to_owned(),
        })
    }

    fn err(&self, source: rocksdb::Error) -> DbError {
        DbError::Rocks {
            path: self.path.clone(),
            source,
        }
    }
}

impl MetaStore for RocksMeta {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, DbError> {
        self.db.get(key).map_err(|e| self.err(e))
    }

    fn scan(&self, prefix: &[u8]) -> Result<Vec<Entry>, DbError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator(IteratorMode::From(prefix, Direction::Forward))
        {
            let (k, v) = item.map_err(|e| self.err(e))?;
            if !k.starts_with(prefix) {
                break;
            }
            out.push((k.into_vec(), v.into_vec()));
        }
        Ok(out)
    }

    fn write(&self, batch: Batch, durability: Durability) -> Result<(), DbError> {
        let mut wb = WriteBatch::default();
        for op in batch.ops {
            match op {
                Op::Put(k, v) => wb.put(k, v),
                Op::Delete(k) => wb.delete(k),
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(durability == Durability::Sync);
        self.db.write_opt(wb, &wo).map_err(|e| self.err(e))
    }

    fn flush(&self) -> Result<(), DbError> {
        self.db.flush_wal(true).map_err(|e| self.err(e))?;
        self.db.flush().map_err(|e| self.err(e))
    }

    fn memory(&self) -> MetaMemory {
        let int = |name: &str| self.db.property_int_value(name).ok().flatten().unwrap_or(0);
        MetaMemory {
            memtables: int("rocksdb.cur-size-all-mem-tables"),
            block_cache: int("rocksdb.block-cache-usage"),
            table_readers: int("rocksdb.estimate-table-readers-mem"),
        }
    }
}
