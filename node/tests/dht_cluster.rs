//! The DHT across in-process nodes on loopback: members find each other's
//! blobs with QUIC addresses, records go away when a holder stops or dies,
//! a node without the join secret gets nowhere, and a node never finds
//! itself. Short TTLs; every wait polls a condition with a deadline.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use shoal_node::p2p::dht::{self, Dht, DhtConfig, Provider};
use shoal_node::p2p::Identity;
use shoal_proto::BlobId;
use tokio_util::sync::CancellationToken;

const SECRET: [u8; 32] = [7; 32];
const DEADLINE: Duration = Duration::from_secs(60);
const LOOKUP: Duration = Duration::from_secs(2);

struct TestNode {
    dht: Dht,
    quic: SocketAddr,
}

impl TestNode {
    fn provider(&self) -> Provider {
        Provider {
            node: self.dht.node_id(),
            quic_addr: self.quic,
        }
    }

    async fn find(&self, blob: &BlobId) -> Vec<Provider> {
        let mut found = self
            .dht
            .find_providers(blob, 10, LOOKUP)
            .await
            .expect("dht running");
        found.sort_by_key(|p| p.node);
        found
    }
}

async fn start(secret: &[u8], bootstrap: Vec<String>, quic_port: u16) -> TestNode {
    let quic: SocketAddr = ([127, 0, 0, 1], quic_port).into();
    let mut cfg = DhtConfig::new("127.0.0.1:0".parse().expect("addr"), quic);
    cfg.bootstrap = bootstrap;
    cfg.provider_ttl = Duration::from_secs(4);
    cfg.provide_interval = Duration::from_secs(1);
    cfg.rebootstrap_interval = Duration::from_secs(1);
    cfg.query_timeout = Duration::from_secs(3);
    let keypair = Identity::generate().keypair();
    let dht = dht::start(cfg, keypair, secret, CancellationToken::new())
        .await
        .expect("start dht");
    TestNode { dht, quic }
}

/// Node 0 first, the others bootstrapped from it (node 2 by name).
async fn cluster(n: usize) -> Vec<TestNode> {
    let first = start(&SECRET, Vec::new(), 40_000).await;
    let addr = first.dht.local_addr();
    let mut nodes = vec![first];
    for i in 1..n {
        let entry = if i == 2 {
            format!("localhost:{}", addr.port())
        } else {
            addr.to_string()
        };
        let port = 40_000 + u16::try_from(i).expect("small");
        nodes.push(start(&SECRET, vec![entry], port).await);
    }
    nodes
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {DEADLINE:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn sorted(mut providers: Vec<Provider>) -> Vec<Provider> {
    providers.sort_by_key(|p| p.node);
    providers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holders_are_found_until_they_stop_or_die() {
    let nodes = cluster(4).await;
    for (i, node) in nodes.iter().enumerate() {
        eventually(&format!("node {i} has peers"), || async {
            node.dht.peers().await.expect("running") >= 2
        })
        .await;
    }

    let blob = BlobId::sha256(b"layer one");
    nodes[3].dht.provide(&blob).await.expect("provide");
    let want = vec![nodes[3].provider()];
    eventually("node 1 finds node 3", || async {
        nodes[1].find(&blob).await == want
    })
    .await;
    eventually("node 2 finds node 3", || async {
        nodes[2].find(&blob).await == want
    })
    .await;
    // The holder never finds itself.
    assert_eq!(nodes[3].find(&blob).await, Vec::new());

    // Two holders: each finds the other only.
    nodes[1].dht.provide(&blob).await.expect("provide");
    let both = sorted(vec![nodes[1].provider(), nodes[3].provider()]);
    eventually("node 0 finds both holders", || async {
        nodes[0].find(&blob).await == both
    })
    .await;
    assert_eq!(nodes[3].find(&blob).await, vec![nodes[1].provider()]);
    assert_eq!(nodes[1].find(&blob).await, vec![nodes[3].provider()]);

    // Node 3 stops providing: its records expire everywhere.
    nodes[3].dht.stop_providing(&blob).await.expect("stop");
    eventually("node 3 is forgotten after stop_providing", || async {
        nodes[0].find(&blob).await == vec![nodes[1].provider()]
    })
    .await;

    // Node 1 dies: it is forgotten too.
    nodes[1].dht.shutdown().await;
    assert!(matches!(
        nodes[1].dht.peers().await,
        Err(dht::DhtError::Stopped)
    ));
    eventually("node 1 is forgotten after it died", || async {
        nodes[0].find(&blob).await.is_empty() && nodes[2].find(&blob).await.is_empty()
    })
    .await;

    for node in &nodes {
        node.dht.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_the_secret_cannot_join() {
    let nodes = cluster(2).await;
    let blob = BlobId::sha256(b"private layer");
    nodes[1].dht.provide(&blob).await.expect("provide");
    eventually("members find each other's blobs", || async {
        nodes[0].find(&blob).await == vec![nodes[1].provider()]
    })
    .await;

    let outsider = start(
        &[8; 32],
        vec![nodes[0].dht.local_addr().to_string()],
        40_100,
    )
    .await;
    // It tried, and both sides saw the handshake fail.
    eventually("the outsider's dials fail", || async {
        let ours = outsider.dht.status().await.expect("running");
        let theirs = nodes[0].dht.status().await.expect("running");
        ours.failed_dials >= 2 && theirs.refused_inbound >= 2
    })
    .await;
    // A full lookup, bounded by its own deadline, finds nothing: the pnet
    // handshake never completes, so the outsider has no peer to ask.
    assert_eq!(
        outsider
            .dht
            .find_providers(&blob, 10, Duration::from_secs(3))
            .await
            .expect("running"),
        Vec::new()
    );
    let ours = outsider.dht.status().await.expect("running");
    assert_eq!((ours.peers, ours.connected), (0, 0));
    let theirs = nodes[0].dht.status().await.expect("running");
    assert_eq!((theirs.peers, theirs.connected), (1, 1));
    // Nor can it announce anything the members would see.
    let fake = BlobId::sha256(b"poisoned");
    outsider.dht.provide(&fake).await.expect("local provide");
    assert_eq!(
        nodes[0]
            .dht
            .find_providers(&fake, 10, Duration::from_secs(3))
            .await
            .expect("running"),
        Vec::new()
    );

    outsider.dht.shutdown().await;
    for node in &nodes {
        node.dht.shutdown().await;
    }
}
