//! Quota and pinning: LRU eviction between the watermarks, never of a pinned
//! blob (open reader, open writer, `PinGuard`). Each test runs on both
//! backends.

use std::path::Path;
use std::sync::{Arc, Mutex};

use shoal_node::store::{Backend, Removal, Store, StoreConfig, StoreError, Verifier};
use shoal_proto::{BlobId, Digest};

const KIB: u64 = 1024;
const BLOB: u64 = 200 * KIB;
/// Room for five blobs; evict above 900 KiB down to 500 KiB.
const QUOTA: u64 = 1000 * KIB;

macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(#[test] fn $name() { super::$name(shoal_node::store::Backend::Memory) })*
        }
        mod rocksdb {
            $(#[test] fn $name() { super::$name(shoal_node::store::Backend::RocksDb) })*
        }
    };
}

both_backends!(
    evicts_least_recently_used_down_to_low_watermark,
    never_evicts_pinned_blobs,
    remove_refuses_pinned_blobs,
    no_quota_never_evicts,
    bad_watermarks_are_refused,
    charged_dirs_count_against_the_quota,
);

fn open(dir: &Path, backend: Backend, quota_bytes: u64) -> Store {
    Store::open(StoreConfig {
        dir: dir.to_owned(),
        backend,
        quota_bytes,
        filesystem_quota: false,
        high_watermark: 0.9,
        low_watermark: 0.5,
    })
    .expect("open store")
}

fn bytes(seed: u8) -> Vec<u8> {
    (0..BLOB)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn put(store: &Store, seed: u8) -> BlobId {
    let data = bytes(seed);
    let id = Digest::sha256(&data);
    let mut w = store.open_writer(&id, BLOB).expect("writer");
    w.write_at(0, &data).expect("write");
    w.commit(0..BLOB).expect("commit");
    let mut v = Verifier::new(&id);
    v.update(&data);
    w.complete(v.finish().expect("verified")).expect("complete");
    id
}

fn touch(store: &Store, id: &BlobId) {
    drop(store.open_reader(id).expect("reader").expect("present"));
}

fn record_removals(store: &Store) -> Arc<Mutex<Vec<(BlobId, Removal)>>> {
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&log);
    store.set_removal_listener(move |id, why| sink.lock().expect("log").push((id.clone(), why)));
    log
}

fn held(store: &Store, ids: &[&BlobId]) -> Vec<bool> {
    ids.iter()
        .map(|id| store.blob(id).expect("blob").is_some())
        .collect()
}

fn evicts_least_recently_used_down_to_low_watermark(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), backend, QUOTA);
    let log = record_removals(&store);
    let [a, b, c, d] = [1, 2, 3, 4].map(|s| put(&store, s));
    assert_eq!(store.usage().bytes, 4 * BLOB);
    assert!(
        store.evict().expect("evict").is_empty(),
        "under the high watermark"
    );
    touch(&store, &a);

    // The fifth blob takes usage to 1000 KiB > 900 KiB: its commit evicts
    // b, c, d (least recently used first) down to 400 KiB <= 500 KiB.
    let e = put(&store, 5);
    assert_eq!(
        held(&store, &[&a, &b, &c, &d, &e]),
        [true, false, false, false, true]
    );
    assert_eq!(store.usage().bytes, 2 * BLOB);
    let evicted: Vec<_> = log.lock().expect("log").clone();
    let want: Vec<_> = [&b, &c, &d].map(|id| (id.clone(), Removal::Evicted)).into();
    assert_eq!(evicted, want);
    assert!(!store.content_path(&b).exists());
    assert_eq!(store.stats().evicted, 3);
}

fn never_evicts_pinned_blobs(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), backend, QUOTA);
    let log = record_removals(&store);
    let [a, b, c] = [1, 2, 3].map(|s| put(&store, s));
    let reader = store.open_reader(&a).expect("reader").expect("present");
    let guard = store.pin(&b);
    // d is a partial blob with a live writer.
    let d_data = bytes(4);
    let d = Digest::sha256(&d_data);
    let mut writer = store.open_writer(&d, BLOB).expect("writer");
    writer.write_at(0, &d_data).expect("write");
    writer.commit(0..BLOB).expect("commit");

    // Usage reaches 1000 KiB; c is the only unpinned blob.
    let e = put(&store, 5);
    assert_eq!(
        held(&store, &[&a, &b, &c, &d, &e]),
        [true, true, false, true, true]
    );
    assert!(
        store.usage().bytes > QUOTA / 2,
        "pins keep it above the low watermark"
    );

    // Unpinned, they go in access order: b (created), a (read), d (created
    // after that read), until usage is at the low watermark.
    drop((reader, guard, writer));
    let f = put(&store, 6);
    let evicted: Vec<_> = log
        .lock()
        .expect("log")
        .iter()
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(evicted, [c, b, a, d]);
    assert_eq!(held(&store, &[&e, &f]), [true, true]);
    assert_eq!(store.usage().bytes, 2 * BLOB);
}

fn remove_refuses_pinned_blobs(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), backend, 0);
    let a = put(&store, 1);
    let guard = store.pin(&a);
    assert!(matches!(store.remove(&a), Err(StoreError::Pinned { .. })));
    drop(guard);
    let reader = store.open_reader(&a).expect("reader").expect("present");
    assert!(matches!(store.remove(&a), Err(StoreError::Pinned { .. })));
    drop(reader);
    store.remove(&a).expect("remove");
    assert!(store.blob(&a).expect("blob").is_none());
    assert!(!store.content_path(&a).exists());
    store.remove(&a).expect("removing an absent blob is fine");
}

fn no_quota_never_evicts(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), backend, 0);
    for seed in 0..8 {
        put(&store, seed);
    }
    assert!(store.evict().expect("evict").is_empty());
    assert_eq!(store.usage().blobs, 8);
}

fn bad_watermarks_are_refused(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    for (high, low, field) in [
        (1.5, 0.5, "high_watermark"),
        (0.5, 0.8, "low_watermark"),
        (0.9, f64::NAN, "low_watermark"),
    ] {
        let err = Store::open(StoreConfig {
            dir: dir.path().to_owned(),
            backend,
            quota_bytes: QUOTA,
            filesystem_quota: false,
            high_watermark: high,
            low_watermark: low,
        })
        .expect_err("invalid watermarks");
        assert!(
            matches!(err, StoreError::Config { field: f, .. } if f == field),
            "{err:?}"
        );
    }
}

/// Files the mounts keep beside the store (decoded chunks, EROFS blob files) count against the
/// byte quota: with 300 KiB of them, three blobs (600 KiB) reach the 900 KiB high watermark and
/// the fourth's commit passes it, and the store evicts its least recently used blobs down to 500 KiB.
fn charged_dirs_count_against_the_quota(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mounts = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), backend, QUOTA);
    store.charge_dirs(vec![
        mounts.path().join("missing"),
        mounts.path().to_owned(),
    ]);
    std::fs::create_dir(mounts.path().join("decoded")).expect("mkdir");
    std::fs::write(
        mounts.path().join("decoded/blob"),
        vec![7u8; 300 * KIB as usize],
    )
    .expect("write");
    let [a, b, c] = [1, 2, 3].map(|s| put(&store, s));
    assert_eq!(held(&store, &[&a, &b, &c]), [true, true, true]);
    assert!(store.usage().measured_bytes >= 900 * KIB);
    let d = put(&store, 4);
    // 300 KiB charged + 800 KiB of blobs > 900 KiB: drop a, b, c (LRU) to reach <= 500 KiB.
    assert_eq!(held(&store, &[&a, &b, &c, &d]), [false, false, false, true]);
    assert_eq!(store.stats().evicted, 3);
    // Without the charged files, the same four blobs fit.
    let plain = tempfile::tempdir().expect("tempdir");
    let store = open(plain.path(), backend, QUOTA);
    let ids = [1, 2, 3, 4].map(|s| put(&store, s));
    assert!(ids.iter().all(|id| store.blob(id).expect("blob").is_some()));
}
