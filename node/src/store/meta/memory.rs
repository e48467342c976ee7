//! In-memory `MetaStore` for tests: a `BTreeMap` behind a mutex. Nothing
//! survives the process, so a store on it starts empty every time (and its
//! recovery then deletes every content file it finds).

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::{Batch, DbError, Durability, Entry, MetaStore, Op};

#[derive(Debug, Default)]
pub struct MemoryMeta {
    map: Mutex<BTreeMap<Vec<u8>, Vec<u8>>>,
}

impl MemoryMeta {
    fn map(&self) -> MutexGuard<'_, BTreeMap<Vec<u8>, Vec<u8>>> {
        // A panic while holding the lock cannot leave the map half-updated
        // (each operation is a single std call or a loop of them we accept).
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl MetaStore for MemoryMeta {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, DbError> {
        Ok(self.map().get(key).cloned())
    }

    fn scan(&self, prefix: &[u8]) -> Result<Vec<Entry>, DbError> {
        Ok(self
            .map()
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn write(&self, batch: Batch, _durability: Durability) -> Result<(), DbError> {
        let mut map = self.map();
        for op in batch.ops {
            match op {
                Op::Put(k, v) => {
                    map.insert(k, v);
                }
                Op::Delete(k) => {
                    map.remove(&k);
                }
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), DbError> {
        Ok(())
    }
}
