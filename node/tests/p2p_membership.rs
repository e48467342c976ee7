//! Who may talk to a node: members only (join secret), the node that was
//! dialed only (TLS bound to node ids), the same protocol version only.

#[path = "p2p_support/lib.rs"]
mod support;

use std::time::Duration;

use quinn::ConnectionError;
use shoal_node::p2p::frames::{read_frame, write_frame};
use shoal_node::p2p::tls::{NodeCert, SERVER_NAME};
use shoal_node::p2p::{FetchError, Identity};
use shoal_proto::wire::{CloseCode, Frame, GetRange, Hello, PROTOCOL_VERSION};
use support::{bytes, node, put_blob, secret, TestNode};

fn close_code(e: &ConnectionError) -> Option<CloseCode> {
    match e {
        ConnectionError::ApplicationClosed(c) => {
            Some(CloseCode::from_u64(c.error_code.into_inner()))
        }
        _ => None,
    }
}

/// `node` counted `n` handshake failures for `reason` (counted just after
/// the peer was told, so poll).
async fn counted(node: &TestNode, reason: &'static str, n: u64) -> bool {
    support::eventually(Duration::from_secs(3), || {
        node.metrics.handshake_failure_count(reason) == n
    })
    .await
}

/// Nothing was served by `a`.
fn served_nothing(a: &TestNode) {
    for outcome in ["ok", "busy", "not_found", "not_present", "error", "aborted"] {
        assert_eq!(a.metrics.upload_outcome(outcome), 0, "{outcome}");
    }
    assert_eq!(a.metrics.connections.get(), 0);
}

#[tokio::test]
async fn a_node_with_another_secret_is_refused_both_ways() {
    let a = node(&secret(1), |_| {}).await;
    let c = node(&secret(2), |_| {}).await;
    let blob = put_blob(&a.store, &bytes(100_000, 1));

    let err = c
        .p2p
        .fetch_range(a.id(), a.addr(), &blob, 0, 10)
        .await
        .expect_err("refused");
    assert!(matches!(err, FetchError::NotMember { .. }), "{err:?}");
    assert_eq!(c.metrics.downloaded_from(&a.id()), 0);
    assert_eq!(a.metrics.uploaded_to(&c.id()), 0);
    assert!(counted(&a, "join_refused", 1).await);
    served_nothing(&a);

    // A member dialing a non-member refuses it too (its proof is wrong).
    let err = a
        .p2p
        .fetch_range(c.id(), c.addr(), &blob, 0, 10)
        .await
        .expect_err("refused");
    assert!(matches!(err, FetchError::NotMember { .. }), "{err:?}");
    assert!(counted(&c, "join_refused", 1).await);
    served_nothing(&c);
}

/// A client with a valid node certificate but no secret: it skips the
/// Hello, or sends one with a made-up proof, or says nothing.
#[tokio::test]
async fn a_client_without_the_secret_gets_nothing() {
    let a = node(&secret(1), |c| {
        c.handshake_timeout = Duration::from_millis(300)
    })
    .await;
    let blob = put_blob(&a.store, &bytes(100_000, 2));
    let outsider = Identity::generate();
    let cert = NodeCert::new(&outsider).expect("cert");
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("ep");
    endpoint.set_default_client_config(cert.client_config(a.id()).expect("client config"));
    let dial = || async {
        endpoint
            .connect(a.addr(), SERVER_NAME)
            .expect("connect")
            .await
            .expect("TLS succeeds: the outsider is a valid node")
    };

    // A request without a Hello.
    let conn = dial().await;
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    let req = Frame::GetRange(GetRange {
        blob: blob.clone(),
        offset: 0,
        len: 10,
    });
    write_frame(&mut send, &req).await.expect("write");
    let _ = send.finish();
    assert!(read_frame(&mut recv).await.is_err());
    assert_eq!(close_code(&conn.closed().await), Some(CloseCode::Protocol));

    // A Hello with a made-up proof.
    let conn = dial().await;
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    let hello = Frame::Hello(Hello {
        version: PROTOCOL_VERSION,
        node: outsider.node_id(),
        proof: [0x55; 32],
    });
    write_frame(&mut send, &hello).await.expect("write");
    assert!(read_frame(&mut recv).await.is_err());
    assert_eq!(
        close_code(&conn.closed().await),
        Some(CloseCode::JoinRefused)
    );

    // Silence.
    let conn = dial().await;
    assert_eq!(
        close_code(&conn.closed().await),
        Some(CloseCode::HandshakeTimeout)
    );

    assert!(counted(&a, "join_refused", 1).await);
    assert!(counted(&a, "protocol", 1).await);
    assert!(counted(&a, "timeout", 1).await);
    served_nothing(&a);
}

#[tokio::test]
async fn a_peer_that_is_not_the_dialed_node_is_refused() {
    let s = secret(1);
    let (a, b) = (node(&s, |_| {}).await, node(&s, |_| {}).await);
    let blob = put_blob(&a.store, &bytes(1000, 3));
    // b expects some other node at a's address.
    let other = Identity::generate().node_id();
    let err = b
        .p2p
        .fetch_range(other, a.addr(), &blob, 0, 10)
        .await
        .expect_err("wrong peer");
    match &err {
        FetchError::Authentication { reason, .. } => {
            assert!(
                reason.contains(&format!("expected node {other}")),
                "{reason}"
            );
        }
        other => panic!("expected Authentication, got {other:?}"),
    }
    served_nothing(&a);
    // The right id works on the same address.
    let mut buf = [0u8; 10];
    b.p2p
        .fetch_range_into(a.id(), a.addr(), &blob, 0, &mut buf)
        .await
        .expect("right peer");
}

#[tokio::test]
async fn an_incompatible_version_is_a_clear_error_on_both_sides() {
    let s = secret(1);
    let a = node(&s, |_| {}).await;
    let future = node(&s, |c| c.protocol_version = PROTOCOL_VERSION + 1).await;
    let blob = put_blob(&a.store, &bytes(1000, 4));

    let err = future
        .p2p
        .fetch_range(a.id(), a.addr(), &blob, 0, 10)
        .await
        .expect_err("version");
    match err {
        FetchError::IncompatibleVersion { ours, theirs, .. } => {
            assert_eq!((ours, theirs), (PROTOCOL_VERSION + 1, PROTOCOL_VERSION));
        }
        other => panic!("expected IncompatibleVersion, got {other:?}"),
    }
    assert!(counted(&a, "version", 1).await);
    served_nothing(&a);

    let err = a
        .p2p
        .fetch_range(future.id(), future.addr(), &blob, 0, 10)
        .await
        .expect_err("version");
    match err {
        FetchError::IncompatibleVersion { ours, theirs, .. } => {
            assert_eq!((ours, theirs), (PROTOCOL_VERSION, PROTOCOL_VERSION + 1));
        }
        other => panic!("expected IncompatibleVersion, got {other:?}"),
    }
}

#[tokio::test]
async fn shutdown_refuses_new_fetches() {
    let s = secret(1);
    let a = node(&s, |_| {}).await;
    let b = node(&s, |c| c.connect_timeout = Duration::from_secs(1)).await;
    let blob = put_blob(&a.store, &bytes(1000, 5));
    let mut buf = [0u8; 10];
    b.p2p
        .fetch_range_into(a.id(), a.addr(), &blob, 0, &mut buf)
        .await
        .expect("before");
    a.p2p.shutdown().await;
    let err = b
        .p2p
        .fetch_range(a.id(), a.addr(), &blob, 0, 10)
        .await
        .expect_err("after shutdown");
    assert!(
        matches!(
            err,
            FetchError::Lost { .. } | FetchError::Unreachable { .. } | FetchError::Timeout { .. }
        ),
        "{err:?}"
    );
    b.p2p.shutdown().await;
    let err = b
        .p2p
        .fetch_range(a.id(), a.addr(), &blob, 0, 10)
        .await
        .expect_err("own shutdown");
    assert!(matches!(err, FetchError::ShuttingDown), "{err:?}");
}
