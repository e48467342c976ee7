//! Range transfers between two in-process nodes on loopback: identical
//! bytes, partial blobs, piece maps, flow control against a slow reader,
//! upload slots, and a throughput smoke run.

#[path = "p2p_support/lib.rs"]
mod support;

use std::time::{Duration, Instant};

use futures::TryStreamExt;
use shoal_node::p2p::FetchError;
use shoal_node::store::piece_size;
use shoal_proto::wire::ErrorCode;
use shoal_proto::Digest;
use support::{bytes, eventually, node, put_blob, put_partial, secret};

#[tokio::test]
async fn fetched_ranges_are_identical() {
    let s = secret(1);
    let (a, b) = (node(&s, |_| {}).await, node(&s, |_| {}).await);
    let data = bytes(3 * 1024 * 1024 + 123, 1);
    let blob = put_blob(&a.store, &data);

    // The whole blob, as a stream of chunks.
    let stream = b
        .p2p
        .fetch_range(a.id(), a.addr(), &blob, 0, data.len() as u64)
        .await
        .expect("fetch");
    assert_eq!(stream.len(), data.len() as u64);
    let chunks: Vec<_> = stream.into_stream().try_collect().await.expect("body");
    assert_eq!(chunks.concat(), data);

    // Ranges across piece boundaries, into buffers.
    let piece = piece_size(data.len() as u64);
    let mut total = data.len() as u64;
    for (offset, len) in [
        (0, 1),
        (piece - 7, 20),
        (123_456, 1_000_000),
        (data.len() as u64 - 5, 5),
    ] {
        let mut buf = vec![0u8; len];
        let n = b
            .p2p
            .fetch_range_into(a.id(), a.addr(), &blob, offset, &mut buf)
            .await
            .expect("fetch into");
        assert_eq!(n, len);
        assert_eq!(buf, data[offset as usize..offset as usize + len]);
        total += len as u64;
    }

    let map = b
        .p2p
        .have(a.id(), a.addr(), &blob)
        .await
        .expect("have")
        .expect("held");
    assert!(map.complete);
    assert!((0..map.pieces()).all(|p| map.has(p)));

    // One connection carried everything; both sides counted every byte.
    assert_eq!(a.metrics.uploaded_to(&b.id()), total);
    assert_eq!(b.metrics.downloaded_from(&a.id()), total);
    assert_eq!(b.metrics.connections.get(), 1);
    assert!(eventually(Duration::from_secs(2), || a.metrics.connections.get() == 1).await);
    assert_eq!(a.metrics.upload_outcome("ok"), 5);
}

#[tokio::test]
async fn partial_blob_serves_committed_ranges_only() {
    let s = secret(2);
    let (a, b) = (node(&s, |_| {}).await, node(&s, |_| {}).await);
    let data = bytes(1024 * 1024, 2);
    let p = piece_size(data.len() as u64);
    let blob = put_partial(&a.store, &data, &[0..p, 2 * p..3 * p + 100]);
    let fetch = |offset: u64, len: u64| {
        let (p2p, blob) = (b.p2p.clone(), blob.clone());
        let (id, addr) = (a.id(), a.addr());
        async move {
            let mut buf = vec![0u8; len as usize];
            let n = p2p
                .fetch_range_into(id, addr, &blob, offset, &mut buf)
                .await?;
            buf.truncate(n);
            Ok::<_, FetchError>(buf)
        }
    };

    assert_eq!(fetch(0, p).await.expect("piece 0"), data[..p as usize]);
    // The committed run ends inside the request: a short answer.
    let short = fetch(p - 10, 20).await.expect("short");
    assert_eq!(short, data[(p - 10) as usize..p as usize]);
    // The first byte is missing: NotPresent, with what is held.
    match fetch(p + 5, 10).await {
        Err(FetchError::NotPresent {
            available, size, ..
        }) => {
            assert!(available.is_empty());
            assert_eq!(size, data.len() as u64);
        }
        other => panic!("expected NotPresent, got {other:?}"),
    }
    match fetch(p, 3 * p).await {
        Err(FetchError::NotPresent { available, .. }) => {
            assert_eq!(available, vec![2 * p..3 * p + 100]);
        }
        other => panic!("expected NotPresent, got {other:?}"),
    }
    assert_eq!(
        fetch(2 * p + 1, p + 99).await.expect("tail run"),
        data[(2 * p + 1) as usize..(3 * p + 100) as usize]
    );
    match fetch(data.len() as u64 - 1, 2).await {
        Err(FetchError::Remote {
            code: ErrorCode::OutOfRange { size },
            ..
        }) => assert_eq!(size, data.len() as u64),
        other => panic!("expected OutOfRange, got {other:?}"),
    }
    let unknown = Digest::sha256(b"not held");
    let err = b
        .p2p
        .fetch_range(a.id(), a.addr(), &unknown, 0, 1)
        .await
        .expect_err("not held");
    assert!(matches!(err, FetchError::NotFound { .. }), "{err:?}");
    assert_eq!(
        b.p2p.have(a.id(), a.addr(), &unknown).await.expect("have"),
        None
    );

    let map = b
        .p2p
        .have(a.id(), a.addr(), &blob)
        .await
        .expect("have")
        .expect("held");
    assert!(!map.complete);
    let held: Vec<u64> = (0..map.pieces()).filter(|&i| map.has(i)).collect();
    assert_eq!(held, vec![0, 2]);
}

#[tokio::test]
async fn slow_reader_bounds_what_the_sender_writes() {
    let s = secret(3);
    let window = 64 * 1024;
    let a = node(&s, |_| {}).await;
    let b = node(&s, |c| {
        c.stream_window = window;
        c.connection_window = 4 * window;
    })
    .await;
    let data = bytes(8 * 1024 * 1024, 3);
    let blob = put_blob(&a.store, &data);
    let mut stream = b
        .p2p
        .fetch_range(a.id(), a.addr(), &blob, 0, data.len() as u64)
        .await
        .expect("fetch");

    // Read one byte per millisecond for a while.
    let mut got = Vec::new();
    let mut one = [0u8; 1];
    for _ in 0..300 {
        let n = stream.read(&mut one).await.expect("read");
        got.extend_from_slice(&one[..n]);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Let the sender run until it is blocked by flow control.
    let mut last = u64::MAX;
    let settled = eventually(Duration::from_secs(3), || {
        let now = a.metrics.uploaded_to(&b.id());
        let same = now == last;
        last = now;
        same
    })
    .await;
    assert!(settled);
    let written = a.metrics.uploaded_to(&b.id());
    let read = b.metrics.downloaded_from(&a.id());
    assert_eq!(read, got.len() as u64);
    // What the sender handed to QUIC exceeds what the reader consumed by at
    // most the reader's stream window.
    assert!(
        written <= read + window,
        "sender wrote {written} bytes for a reader that consumed {read}"
    );
    assert!(written > 0);

    // The rest arrives intact.
    while let Some(chunk) = stream.next_chunk().await.expect("chunk") {
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got, data);
    assert_eq!(a.metrics.uploaded_to(&b.id()), data.len() as u64);
}

#[tokio::test]
async fn a_request_past_the_upload_slots_is_busy() {
    let s = secret(4);
    let slots = 2;
    let a = node(&s, |c| c.upload_slots = slots).await;
    let b = node(&s, |c| {
        c.stream_window = 64 * 1024;
        c.connection_window = 256 * 1024;
    })
    .await;
    let data = bytes(4 * 1024 * 1024, 4);
    let blob = put_blob(&a.store, &data);
    let len = data.len() as u64;

    // `slots` uploads that stall (nobody reads) hold every slot.
    let mut held = Vec::new();
    for _ in 0..slots {
        held.push(
            b.p2p
                .fetch_range(a.id(), a.addr(), &blob, 0, len)
                .await
                .expect("slot"),
        );
    }
    let err = b
        .p2p
        .fetch_range(a.id(), a.addr(), &blob, 0, len)
        .await
        .expect_err("busy");
    assert!(matches!(err, FetchError::Busy { .. }), "{err:?}");
    assert_eq!(a.metrics.upload_outcome("busy"), 1);
    assert_eq!(a.p2p.free_upload_slots(), 0);

    // Dropping a stream frees its slot.
    drop(held.remove(0));
    assert!(eventually(Duration::from_secs(5), || a.p2p.free_upload_slots() == 1).await);
    let mut buf = vec![0u8; 1000];
    let n = b
        .p2p
        .fetch_range_into(a.id(), a.addr(), &blob, 10, &mut buf)
        .await
        .expect("after a slot was freed");
    assert_eq!(&buf[..n], &data[10..1010]);

    // The stalled upload still completes correctly.
    let rest: Vec<_> = held
        .remove(0)
        .into_stream()
        .try_collect()
        .await
        .expect("body");
    assert_eq!(rest.concat(), data);
}

#[tokio::test]
async fn rate_limited_upload_completes() {
    let s = secret(5);
    let a = node(&s, |c| c.upload_rate = 16 * 1024 * 1024).await;
    let b = node(&s, |_| {}).await;
    let data = bytes(2 * 1024 * 1024, 5);
    let blob = put_blob(&a.store, &data);
    let mut buf = vec![0u8; data.len()];
    let n = b
        .p2p
        .fetch_range_into(a.id(), a.addr(), &blob, 0, &mut buf)
        .await
        .expect("fetch");
    assert_eq!(n, data.len());
    assert_eq!(buf, data);
}

/// Not a benchmark: prints loopback throughput, asserts only correctness.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_smoke() {
    let s = secret(6);
    let (a, b) = (node(&s, |_| {}).await, node(&s, |_| {}).await);
    let data = bytes(64 * 1024 * 1024, 6);
    let blob = put_blob(&a.store, &data);
    let start = Instant::now();
    let mut stream = b
        .p2p
        .fetch_range(a.id(), a.addr(), &blob, 0, data.len() as u64)
        .await
        .expect("fetch");
    let mut hasher = shoal_proto::DigestAlgorithm::Sha256.hasher();
    while let Some(chunk) = stream.next_chunk().await.expect("chunk") {
        hasher.update(&chunk);
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(hasher.finish(), blob);
    eprintln!(
        "p2p loopback: {} MiB in {secs:.2} s = {:.0} MiB/s",
        data.len() >> 20,
        (data.len() >> 20) as f64 / secs
    );
    b.p2p.shutdown().await;
    a.p2p.shutdown().await;
}
