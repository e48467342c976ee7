//! The decoded-chunk cache of a mount: a byte-bounded LRU of verified chunks with single-flight
//! fetching, so the kernel's consecutive 128 KiB reads of one 1 MiB chunk decode it once, and
//! concurrent readers of a chunk share one fetch.
//!
//! Invariants: the bytes held by ready entries never exceed the capacity (a chunk larger than
//! the capacity is returned but not kept); a key names the chunk's expected digest, so an entry
//! is only ever returned for a reference that expects exactly those bytes; a failed fetch is never
//! cached — its waiters get the error and the next reader tries again; a fetch that panics
//! releases its waiters with an error instead of leaving them blocked.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use crate::blob::decode::VerifiedChunk;
use crate::error::Error;

/// What identifies a chunk's bytes: blob table index, offset in the blob, expected digest.
pub(crate) type ChunkKey = (u32, u64, [u8; 32]);

/// Why a chunk could not be obtained.
#[derive(Debug, Clone)]
pub(crate) enum FetchError {
    /// The source returned an error (shared with every reader that waited for this fetch).
    Source(Arc<Error>),
    /// The fetching thread panicked.
    Abandoned,
}

/// How a chunk was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Obtained {
    /// From the cache, or by waiting for another reader's fetch.
    Hit,
    /// By calling the fetch function.
    Fetched,
}

pub(crate) type FetchResult = Result<Arc<VerifiedChunk>, FetchError>;

pub(crate) struct ChunkCache {
    capacity: u64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    slots: HashMap<ChunkKey, Slot>,
    /// Recency order of ready entries: tick → key (smallest tick is evicted first).
    lru: BTreeMap<u64, ChunkKey>,
    tick: u64,
    bytes: u64,
}

enum Slot {
    Ready {
        chunk: Arc<VerifiedChunk>,
        tick: u64,
    },
    Loading(Arc<Flight>),
}

#[derive(Default)]
struct Flight {
    result: Mutex<Option<FetchResult>>,
    done: Condvar,
}

impl ChunkCache {
    /// A cache keeping at most `capacity` bytes of decoded chunks (0 disables keeping, but
    /// concurrent readers of a chunk still share one fetch).
    pub(crate) fn new(capacity: u64) -> Self {
        ChunkCache {
            capacity,
            state: Mutex::new(State::default()),
        }
    }

    /// The chunk under `key`: cached, joined from a fetch in flight, or fetched with `fetch`.
    pub(crate) fn get_or_fetch(
        &self,
        key: ChunkKey,
        fetch: impl FnOnce() -> crate::Result<VerifiedChunk>,
    ) -> (FetchResult, Obtained) {
        let flight = {
            let mut guard = self.lock();
            let st: &mut State = &mut guard;
            let tick = st.next_tick();
            match st.slots.get_mut(&key) {
                Some(Slot::Ready { chunk, tick: t }) => {
                    let chunk = chunk.clone();
                    let old = std::mem::replace(t, tick);
                    st.lru.remove(&old);
                    st.lru.insert(tick, key);
                    return (Ok(chunk), Obtained::Hit);
                }
                Some(Slot::Loading(f)) => {
                    let f = f.clone();
                    drop(guard);
                    return (f.wait(), Obtained::Hit);
                }
                None => {
                    let f = Arc::new(Flight::default());
                    st.slots.insert(key, Slot::Loading(f.clone()));
                    f
                }
            }
        };
        let mut guard = FlightGuard {
            cache: self,
            key,
            flight,
            finished: false,
        };
        let result = fetch()
            .map(Arc::new)
            .map_err(|e| FetchError::Source(Arc::new(e)));
        guard.finish(result.clone());
        (result, Obtained::Fetched)
    }

    /// The chunk under `key` if it is ready now (a fetch in flight is not waited for).
    pub(crate) fn peek(&self, key: &ChunkKey) -> Option<Arc<VerifiedChunk>> {
        let mut guard = self.lock();
        let st: &mut State = &mut guard;
        let tick = st.next_tick();
        match st.slots.get_mut(key) {
            Some(Slot::Ready { chunk, tick: t }) => {
                let chunk = chunk.clone();
                let old = std::mem::replace(t, tick);
                st.lru.remove(&old);
                st.lru.insert(tick, *key);
                Some(chunk)
            }
            _ => None,
        }
    }

    /// Bytes held by ready entries.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is consistent between statements, so a panic elsewhere cannot corrupt it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn complete(&self, key: ChunkKey, result: &FetchResult) {
        let mut st = self.lock();
        st.slots.remove(&key);
        let Ok(chunk) = result else { return };
        let size = chunk.len() as u64;
        if size > self.capacity {
            return;
        }
        while st.bytes + size > self.capacity {
            let Some((_, victim)) = st.lru.pop_first() else {
                break;
            };
            if let Some(Slot::Ready { chunk, .. }) = st.slots.remove(&victim) {
                st.bytes -= chunk.len() as u64;
            }
        }
        let tick = st.next_tick();
        st.lru.insert(tick, key);
        st.bytes += size;
        st.slots.insert(
            key,
            Slot::Ready {
                chunk: chunk.clone(),
                tick,
            },
        );
    }
}

impl State {
    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }
}

impl Flight {
    fn wait(&self) -> FetchResult {
        let mut r = self.result.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(res) = r.as_ref() {
                return res.clone();
            }
            r = self.done.wait(r).unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn set(&self, result: FetchResult) {
        *self.result.lock().unwrap_or_else(PoisonError::into_inner) = Some(result);
        self.done.notify_all();
    }
}

/// Completes a flight exactly once, with [`FetchError::Abandoned`] if the fetch unwinds.
struct FlightGuard<'a> {
    cache: &'a ChunkCache,
    key: ChunkKey,
    flight: Arc<Flight>,
    finished: bool,
}

impl FlightGuard<'_> {
    fn finish(&mut self, result: FetchResult) {
        self.finished = true;
        self.cache.complete(self.key, &result);
        self.flight.set(result);
    }
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.finish(Err(FetchError::Abandoned));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BlobInfo, ChunkRef, Compressor, Digester};
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn chunk(len: usize) -> VerifiedChunk {
        let data = vec![7u8; len];
        let blob = BlobInfo {
            index: 0,
            blob_id: "b".into(),
            chunk_size: 1 << 20,
            chunk_count: 1,
            compressor: Compressor::None,
            digester: Digester::Blake3,
            features: 0,
            compressed_size: len as u64,
            uncompressed_size: len as u64,
            meta: None,
            toc_size: 0,
            toc_digest: [0; 32],
        };
        let c = ChunkRef {
            blob_index: 0,
            ci_index: 0,
            digest: Digester::Blake3.digest(&data),
            compressed: false,
            compressed_offset: 0,
            compressed_size: len as u32,
            uncompressed_offset: 0,
            uncompressed_size: len as u32,
            file_offset: 0,
            batch: None,
        };
        crate::decode_chunk(&blob, &c, &data).unwrap()
    }

    fn key(n: u64) -> ChunkKey {
        (0, n, [0; 32])
    }

    #[test]
    fn hits_after_fetch_and_evicts_least_recent() {
        let cache = ChunkCache::new(250);
        let (r, how) = cache.get_or_fetch(key(1), || Ok(chunk(100)));
        assert!(r.is_ok());
        assert_eq!(how, Obtained::Fetched);
        let (_, how) = cache.get_or_fetch(key(1), || panic!("must hit"));
        assert_eq!(how, Obtained::Hit);
        cache.get_or_fetch(key(2), || Ok(chunk(100))).0.unwrap();
        // Touch 1, so 2 is the least recent when 3 needs room.
        cache.get_or_fetch(key(1), || panic!("must hit")).0.unwrap();
        cache.get_or_fetch(key(3), || Ok(chunk(100))).0.unwrap();
        assert_eq!(cache.bytes(), 200);
        assert_eq!(
            cache.get_or_fetch(key(1), || Ok(chunk(100))).1,
            Obtained::Hit
        );
        assert_eq!(
            cache.get_or_fetch(key(2), || Ok(chunk(100))).1,
            Obtained::Fetched
        );
        assert!(cache.bytes() <= 250);
    }

    #[test]
    fn errors_are_not_cached_and_oversized_chunks_not_kept() {
        let cache = ChunkCache::new(50);
        let (r, _) = cache.get_or_fetch(key(1), || Err(Error::NotFound { path: "x".into() }));
        assert!(matches!(r, Err(FetchError::Source(_))));
        let (r, how) = cache.get_or_fetch(key(1), || Ok(chunk(100)));
        assert_eq!((r.unwrap().len(), how), (100, Obtained::Fetched));
        assert_eq!(cache.bytes(), 0);
    }

    #[test]
    fn concurrent_readers_share_one_fetch() {
        let cache = Arc::new(ChunkCache::new(1 << 20));
        let calls = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (cache, calls, barrier) = (cache.clone(), calls.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    cache
                        .get_or_fetch(key(9), || {
                            calls.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            Ok(chunk(10))
                        })
                        .0
                        .unwrap()
                        .len()
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), 10);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_panicking_fetch_releases_waiters() {
        let cache = Arc::new(ChunkCache::new(1 << 20));
        let c2 = cache.clone();
        let t = std::thread::spawn(move || {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                c2.get_or_fetch(key(5), || -> crate::Result<VerifiedChunk> {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    panic!("source bug")
                })
            }));
        });
        std::thread::sleep(std::time::Duration::from_millis(10));
        let (r, _) = cache.get_or_fetch(key(5), || Ok(chunk(1)));
        // Either we joined the doomed flight or came after it: never a hang.
        assert!(matches!(r, Err(FetchError::Abandoned) | Ok(_)));
        t.join().unwrap();
        assert!(cache.get_or_fetch(key(5), || Ok(chunk(1))).0.is_ok());
    }
}
