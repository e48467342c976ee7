//! Helpers shared by the p2p integration tests: in-process nodes on
//! loopback with in-memory store metadata.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::ops::Range;
use std::time::Duration;

use shoal_node::p2p::{self, Identity, JoinSecret, P2pConfig, P2pHandle, P2pMetrics};
use shoal_node::store::{Backend, Store, StoreConfig, Verifier};
use shoal_proto::{BlobId, Digest};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

pub struct TestNode {
    pub p2p: P2pHandle,
    pub store: Store,
    pub identity: Identity,
    pub metrics: P2pMetrics,
    pub cancel: CancellationToken,
    _dir: TempDir,
}

impl TestNode {
    pub fn id(&self) -> shoal_proto::NodeId {
        self.identity.node_id()
    }

    pub fn addr(&self) -> SocketAddr {
        self.p2p.local_addr()
    }
}

pub fn secret(byte: u8) -> JoinSecret {
    JoinSecret::from_bytes(&[byte; 32]).expect("secret")
}

/// A node listening on 127.0.0.1:0 with `secret`; `tweak` adjusts its config.
pub async fn node(secret: &JoinSecret, tweak: impl FnOnce(&mut P2pConfig)) -> TestNode {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(StoreConfig {
        dir: dir.path().join("data"),
        backend: Backend::Memory,
        quota_bytes: 0,
        filesystem_quota: false,
        high_watermark: 0.9,
        low_watermark: 0.8,
    })
    .expect("store");
    let identity = Identity::load_or_generate(&dir.path().join("data")).expect("identity");
    let mut cfg = P2pConfig::new("127.0.0.1:0".parse().expect("addr"), secret.clone());
    cfg.request_timeout = Duration::from_secs(5);
    tweak(&mut cfg);
    let metrics = P2pMetrics::default();
    let cancel = CancellationToken::new();
    let p2p = p2p::start(
        cfg,
        store.clone(),
        identity.clone(),
        metrics.clone(),
        cancel.clone(),
    )
    .await
    .expect("start p2p");
    TestNode {
        p2p,
        store,
        identity,
        metrics,
        cancel,
        _dir: dir,
    }
}

/// Deterministic pseudo-random bytes.
pub fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Stores `data` as a complete, verified blob.
pub fn put_blob(store: &Store, data: &[u8]) -> BlobId {
    let id = Digest::sha256(data);
    let mut w = store.open_writer(&id, data.len() as u64).expect("writer");
    w.write_at(0, data).expect("write");
    w.commit(0..data.len() as u64).expect("commit");
    let mut v = Verifier::new(&id);
    v.update(data);
    w.complete(v.finish().expect("digest")).expect("complete");
    id
}

/// Stores only `ranges` of `data` (a partial blob).
pub fn put_partial(store: &Store, data: &[u8], ranges: &[Range<u64>]) -> BlobId {
    let id = Digest::sha256(data);
    let mut w = store.open_writer(&id, data.len() as u64).expect("writer");
    for r in ranges {
        w.write_at(r.start, &data[r.start as usize..r.end as usize])
            .expect("write");
        w.commit(r.clone()).expect("commit");
    }
    id
}

/// Polls `f` until it is true or `limit` passes.
pub async fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    f()
}
