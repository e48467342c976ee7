//! The scheduler over HTTP, in process, driven by `SchedulerClient`s acting
//! as fake nodes: leases, stall handoff, expiry, restart and resync,
//! version refusal, several schedulers, status JSON/HTML and metrics.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use shoal_proto::sched::{
    AnnounceRequest, AnnounceResponse, BlobAnnouncement, ErrorBody, ErrorCode, FailureReason,
    FailureReport, NodeAnnouncement, ParentsRequest, ParentsResponse, PieceBits, PieceSha256,
    Traffic, PROTOCOL_HEADER, PROTOCOL_VERSION,
};
use shoal_proto::{BlobId, Digest, NodeId};
use shoal_scheduler::{
    ClientError, ClientOptions, FileConfig, Scheduler, SchedulerClient, SchedulerSet,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

const PIECE: u64 = 1024;
const PIECES: u32 = 8;
const SIZE: u64 = PIECE * PIECES as u64;
/// Short timings so that stalls and expiry happen within a test.
const FAST: &str = r#"
listen = "127.0.0.1:0"
heartbeat = "100ms"
node_ttl = "2s"
lease_stall_timeout = "500ms"
lease_warmup = "0s"
"#;

struct Running {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Running {
    async fn start(cfg: &str) -> Self {
        let cfg = FileConfig::parse(cfg).unwrap().validate().unwrap();
        let sched = Scheduler::bind(cfg).await.unwrap();
        let addr = sched.local_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            sched
                .serve(async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        Self {
            addr,
            stop: Some(tx),
            task,
        }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("scheduler did not stop")
            .unwrap();
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

fn blob(i: u32) -> BlobId {
    Digest::sha256(&i.to_le_bytes())
}

fn bits(held: u32) -> PieceBits {
    let mut b = PieceBits::empty(PIECES);
    for i in 0..held {
        b.set(i);
    }
    b
}

/// A pretend node: an id, a p2p address, and a client.
struct FakeNode {
    id: NodeId,
    n: u8,
    client: SchedulerClient,
}

impl FakeNode {
    fn new(n: u8, sched: SocketAddr) -> Self {
        let opts = ClientOptions {
            timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
        };
        Self {
            id: NodeId::from_bytes([n; 32]),
            n,
            client: SchedulerClient::new(&sched.to_string(), &opts).unwrap(),
        }
    }

    fn request(&self, full: bool, blobs: Vec<BlobAnnouncement>) -> AnnounceRequest {
        AnnounceRequest {
            node: NodeAnnouncement {
                id: self.id,
                p2p_addr: format!("127.0.0.{}:5062", self.n).parse().unwrap(),
                zone: None,
                upload_slots_free: 4,
                version: "fake".into(),
            },
            full,
            blobs,
            removed: Vec::new(),
            traffic: Traffic {
                from_origin: 1000 * u64::from(self.n),
                from_peers: 10,
                ..Traffic::default()
            },
            job_progress: Vec::new(),
        }
    }

    async fn announce(&self, full: bool, blobs: Vec<BlobAnnouncement>) -> AnnounceResponse {
        self.client
            .announce(&self.request(full, blobs))
            .await
            .unwrap()
    }

    async fn parents(&self, b: u32, want_lease: bool) -> ParentsResponse {
        self.client
            .parents(
                &blob(b),
                &ParentsRequest {
                    asker: self.id,
                    size: Some(SIZE),
                    want_lease,
                },
            )
            .await
            .unwrap()
    }
}

fn holds(b: u32, held: u32) -> BlobAnnouncement {
    BlobAnnouncement {
        blob: blob(b),
        size: SIZE,
        piece_size: PIECE,
        have: bits(held),
        piece_sha256: None,
        complete: held == PIECES,
        origin_fetch: false,
        origin_bytes: 0,
        present_bytes: u64::from(held) * PIECE,
    }
}

fn granted(r: &ParentsResponse) -> bool {
    r.lease.as_ref().is_some_and(|l| l.granted_to_you)
}

fn holder_ids(r: &ParentsResponse) -> Vec<NodeId> {
    r.holders.iter().map(|h| h.node).collect()
}

async fn json<T: serde::de::DeserializeOwned>(resp: reqwest::Response) -> T {
    let bytes = resp.bytes().await.unwrap();
    serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&bytes)))
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

#[tokio::test]
async fn two_askers_get_one_lease() {
    let s = Running::start(FAST).await;
    let a = FakeNode::new(1, s.addr);
    let b = FakeNode::new(2, s.addr);
    a.announce(true, vec![]).await;
    b.announce(true, vec![]).await;
    let (ra, rb) = tokio::join!(a.parents(1, true), b.parents(1, true));
    assert_eq!(
        [granted(&ra), granted(&rb)].iter().filter(|g| **g).count(),
        1,
        "exactly one lease: {ra:?} {rb:?}"
    );
    let (winner, loser) = if granted(&ra) { (&a, &rb) } else { (&b, &ra) };
    assert_eq!(loser.lease.as_ref().map(|l| l.holder), Some(winner.id));
    assert_eq!(
        holder_ids(loser),
        vec![winner.id],
        "the lease holder is the seed"
    );
    assert!(loser.holders[0].lease_holder);
    assert_eq!(loser.size, Some(SIZE));
    s.stop().await;
}

#[tokio::test]
async fn stalled_holder_loses_its_lease() {
    let s = Running::start(FAST).await;
    let a = FakeNode::new(1, s.addr);
    let b = FakeNode::new(2, s.addr);
    a.announce(true, vec![]).await;
    b.announce(true, vec![]).await;
    assert!(granted(&a.parents(1, true).await));
    // Both keep heartbeating; A never shows progress.
    let mut stalled = holds(1, 0);
    stalled.origin_fetch = true;
    let end = deadline();
    let mut moved = false;
    while Instant::now() < end {
        a.announce(false, vec![stalled.clone()]).await;
        b.announce(false, vec![]).await;
        let r = b.parents(1, true).await;
        if granted(&r) {
            moved = true;
            break;
        }
        assert_eq!(r.lease.as_ref().map(|l| l.holder), Some(a.id));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(moved, "the lease never moved from the stalled holder");
    let r = a.announce(false, vec![stalled]).await;
    assert_eq!(
        r.leases_revoked,
        vec![blob(1)],
        "the stalled holder is told"
    );
    let r = a.parents(1, true).await;
    assert_eq!(
        r.lease.map(|l| (l.holder, l.granted_to_you)),
        Some((b.id, false))
    );
    s.stop().await;
}

#[tokio::test]
async fn progress_keeps_the_lease() {
    let s = Running::start(FAST).await;
    let a = FakeNode::new(1, s.addr);
    let b = FakeNode::new(2, s.addr);
    a.announce(true, vec![]).await;
    b.announce(true, vec![]).await;
    assert!(granted(&a.parents(1, true).await));
    // For well over the stall timeout, A shows progress each heartbeat.
    for i in 1..=12u64 {
        let mut progress = holds(1, (i / 2) as u32 % PIECES);
        progress.origin_fetch = true;
        progress.origin_bytes = i * 100;
        assert!(a
            .announce(false, vec![progress])
            .await
            .leases_revoked
            .is_empty());
        b.announce(false, vec![]).await;
        assert!(!granted(&b.parents(1, true).await));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.stop().await;
}

#[tokio::test]
async fn silent_node_expires_and_is_never_returned() {
    let s = Running::start(FAST).await;
    let a = FakeNode::new(1, s.addr);
    let b = FakeNode::new(2, s.addr);
    a.announce(true, vec![holds(1, PIECES)]).await;
    b.announce(true, vec![]).await;
    assert_eq!(holder_ids(&b.parents(1, false).await), vec![a.id]);
    // A goes silent; B keeps announcing.
    let end = deadline();
    loop {
        assert!(Instant::now() < end, "the silent node never expired");
        b.announce(false, vec![]).await;
        let status = b.client.status().await.unwrap();
        if status.nodes.iter().all(|n| n.id != a.id) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..3 {
        b.announce(false, vec![]).await;
        let r = b.parents(1, true).await;
        assert!(holder_ids(&r).is_empty());
        assert!(
            granted(&r),
            "with no complete holder left, B may fetch from the origin"
        );
    }
    // A comes back: told to resync, then counted again.
    let r = a.announce(false, vec![]).await;
    assert!(r.resync);
    a.announce(true, vec![holds(1, PIECES)]).await;
    assert_eq!(holder_ids(&b.parents(1, false).await), vec![a.id]);
    s.stop().await;
}

#[tokio::test]
async fn restarted_scheduler_is_rebuilt_by_announcements() {
    let s = Running::start(FAST).await;
    let addr = s.addr;
    let a = FakeNode::new(1, addr);
    let b = FakeNode::new(2, addr);
    let c = FakeNode::new(3, addr);
    a.announce(true, vec![holds(1, PIECES)]).await;
    b.announce(true, vec![]).await;
    assert!(granted(&b.parents(2, true).await));
    let mut fetching = holds(2, 3);
    fetching.origin_fetch = true;
    fetching.origin_bytes = 3 * PIECE;
    b.announce(false, vec![fetching.clone()]).await;
    s.stop().await;

    // Same address, empty memory, with a warm-up so that B can re-announce
    // its lease before anyone else is granted one.
    let cfg = FAST
        .replace("127.0.0.1:0", &addr.to_string())
        .replace("lease_warmup = \"0s\"", "lease_warmup = \"1s\"");
    let s = Running::start(&cfg).await;
    let r = c.client.announce(&c.request(true, vec![])).await.unwrap();
    assert!(!r.resync);
    let early = c.parents(2, true).await;
    assert!(!granted(&early));
    assert!(
        early.retry_after_ms.is_some(),
        "asked to come back after warm-up"
    );
    // A and B announce deltas as usual; the scheduler asks for full ones.
    for (node, blobs) in [(&a, vec![]), (&b, vec![fetching.clone()])] {
        let r = announce_retrying(node, false, blobs.clone()).await;
        assert!(
            r.resync,
            "a restarted scheduler must ask for a full announcement"
        );
        let full = if node.n == 1 {
            vec![holds(1, PIECES)]
        } else {
            blobs
        };
        assert!(!node.announce(true, full).await.resync);
    }
    let status = c.client.status().await.unwrap();
    assert_eq!(status.nodes.len(), 3);
    assert_eq!(status.blobs.len(), 2);
    let b2 = status.blobs.iter().find(|x| x.blob == blob(2)).unwrap();
    assert_eq!(
        b2.leases.first().map(|l| l.holder),
        Some(b.id),
        "B got its lease back"
    );
    assert_eq!(holder_ids(&c.parents(1, false).await), vec![a.id]);
    let r = c.parents(2, true).await;
    assert_eq!(
        r.lease.map(|l| (l.holder, l.granted_to_you)),
        Some((b.id, false))
    );
    s.stop().await;
}

/// The first request after a restart may hit a pooled connection to the old
/// process; a real node retries too.
async fn announce_retrying(
    node: &FakeNode,
    full: bool,
    blobs: Vec<BlobAnnouncement>,
) -> AnnounceResponse {
    let req = node.request(full, blobs);
    let end = deadline();
    loop {
        match node.client.announce(&req).await {
            Ok(r) => return r,
            Err(e) if e.is_transient() && Instant::now() < end => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[tokio::test]
async fn wrong_protocol_version_is_refused_clearly() {
    let s = Running::start(FAST).await;
    let http = reqwest::Client::new();
    let resp = http
        .post(s.url("/api/v1/announce"))
        .header(PROTOCOL_HEADER, "2")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.headers().get(PROTOCOL_HEADER).unwrap(), "1");
    let body: ErrorBody = json(resp).await;
    assert_eq!(body.code, ErrorCode::ProtocolVersion);
    assert_eq!(body.supported, Some(1));
    assert_eq!(body.requested.as_deref(), Some("2"));
    assert!(
        body.error.contains("\"2\"") && body.error.contains("speaks 1"),
        "{}",
        body.error
    );

    let resp = http
        .post(s.url("/api/v1/announce"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400, "POST without the header");
    let resp = http
        .post(s.url("/api/v1/announce"))
        .header(PROTOCOL_HEADER, "1.3")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400, "a newer minor is fine; bad JSON is not");
    let body: ErrorBody = json(resp).await;
    assert_eq!(body.code, ErrorCode::BadRequest);
    let resp = http
        .post(s.url("/api/v1/blobs/sha256:nope/parents"))
        .header(PROTOCOL_HEADER, "1")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    s.stop().await;
}

#[tokio::test]
async fn client_refuses_a_scheduler_of_another_version() {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/api/v1/status",
        get(|| async { ([(PROTOCOL_HEADER, "2")], "{}") }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let client = SchedulerClient::new(&addr.to_string(), &ClientOptions::default()).unwrap();
    let err = client.status().await.unwrap_err();
    assert!(matches!(err, ClientError::Version { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("\"2\"") && msg.contains("speaks 1"), "{msg}");
    server.abort();

    let unreachable = SchedulerClient::new(&addr.to_string(), &ClientOptions::default()).unwrap();
    let _ = server.await;
    let err = unreachable.status().await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
}

#[tokio::test]
async fn several_schedulers_split_blobs() {
    // Reserve two ports, then start each scheduler knowing both.
    let l1 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let l2 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (a1, a2) = (l1.local_addr().unwrap(), l2.local_addr().unwrap());
    drop((l1, l2));
    let cluster = format!("cluster = [\"{a1}\", \"{a2}\"]\n");
    let s1 = Running::start(&format!(
        "{}{cluster}advertise = \"{a1}\"",
        FAST.replace("127.0.0.1:0", &a1.to_string())
    ))
    .await;
    let s2 = Running::start(&format!(
        "{}{cluster}advertise = \"{a2}\"",
        FAST.replace("127.0.0.1:0", &a2.to_string())
    ))
    .await;
    let set =
        SchedulerSet::new(&[a1.to_string(), a2.to_string()], &ClientOptions::default()).unwrap();
    let node = NodeId::from_bytes([1; 32]);
    let asker = NodeId::from_bytes([2; 32]);
    let blobs: Vec<BlobAnnouncement> = (0..20).map(|b| holds(b, PIECES)).collect();
    for (id, blobs) in [(node, blobs), (asker, vec![])] {
        let req = AnnounceRequest {
            node: NodeAnnouncement {
                id,
                p2p_addr: "127.0.0.1:5062".parse().unwrap(),
                zone: None,
                upload_slots_free: 1,
                version: String::new(),
            },
            full: true,
            blobs,
            removed: Vec::new(),
            traffic: Traffic::default(),
            job_progress: Vec::new(),
        };
        for c in set.all() {
            c.announce(&req).await.unwrap();
        }
    }
    let counts: Vec<usize> = {
        let mut v = Vec::new();
        for c in set.all() {
            v.push(c.status().await.unwrap().blobs.len());
        }
        v
    };
    assert_eq!(
        counts.iter().sum::<usize>(),
        20,
        "each blob kept by exactly one: {counts:?}"
    );
    assert!(counts.iter().all(|c| *c > 0), "{counts:?}");
    for b in 0..20 {
        let req = ParentsRequest {
            asker,
            size: None,
            want_lease: false,
        };
        let owner = set.for_blob(&blob(b)).unwrap();
        let r = owner.parents(&blob(b), &req).await.unwrap();
        assert_eq!(holder_ids(&r), vec![node]);
        let other = set.all().iter().find(|c| c.addr() != owner.addr()).unwrap();
        match other.parents(&blob(b), &req).await {
            Err(ClientError::WrongScheduler { owner: o, .. }) => assert_eq!(o, owner.addr()),
            r => panic!("expected WrongScheduler, got {r:?}"),
        }
    }
    s1.stop().await;
    s2.stop().await;
}

#[tokio::test]
async fn status_json_html_and_metrics() {
    let s = Running::start(FAST).await;
    let a = FakeNode::new(1, s.addr);
    let b = FakeNode::new(2, s.addr);
    let mut complete = holds(1, PIECES);
    complete.piece_sha256 = Some(
        (0..PIECES)
            .map(|i| Some(PieceSha256::of(&[i as u8])))
            .collect(),
    );
    a.announce(true, vec![complete]).await;
    b.announce(true, vec![holds(1, 2)]).await;
    assert!(b.parents(1, false).await.piece_sha256.is_some());
    let ack = b
        .client
        .report_failure(
            &blob(1),
            &FailureReport {
                reporter: b.id,
                peer: a.id,
                reason: FailureReason::Stalled,
            },
        )
        .await
        .unwrap();
    assert!(ack.counted);

    let status = a.client.status().await.unwrap();
    assert_eq!(status.nodes.len(), 2);
    assert_eq!(status.blobs.len(), 1);
    assert_eq!(status.blobs[0].holders, 2);
    assert_eq!(status.blobs[0].complete_holders, 1);
    assert_eq!(status.blobs[0].piece_sha256_known, PIECES);
    assert_eq!(status.totals.from_origin, 3000);
    assert_eq!(status.totals.from_peers, 20);
    assert!(status.nodes.iter().any(|n| n.blame > 0.0));

    let http = reqwest::Client::new();
    let page = http.get(s.url("/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers().get(PROTOCOL_HEADER).unwrap(), "1");
    let html = page.text().await.unwrap();
    assert!(
        html.contains("<table") && html.contains(&a.id.short()),
        "{html}"
    );
    assert!(html.contains("2.9 KiB"), "traffic from origin: {html}");

    let value: serde_json::Value =
        json(http.get(s.url("/api/v1/status")).send().await.unwrap()).await;
    assert_eq!(value["nodes"].as_array().map(Vec::len), Some(2));

    let metrics = http
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for want in [
        "shoal_scheduler_announcements_total{kind=\"full\"} 2",
        "shoal_scheduler_parent_requests_total{kind=\"holders\"} 1",
        "shoal_scheduler_failure_reports_total{reason=\"stalled\"} 1",
        "shoal_scheduler_decision_seconds_count{op=\"parents\"} 1",
        "shoal_scheduler_nodes 2",
        "shoal_scheduler_build_info{version=",
        "process_resident_memory_bytes ",
        "process_cpu_seconds_total ",
    ] {
        assert!(metrics.contains(want), "missing {want:?} in\n{metrics}");
    }
    let health = http.get(s.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(health.text().await.unwrap(), "ok");
    let missing = http.get(s.url("/nope")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    s.stop().await;
}

/// With a join secret, only signed requests change state; reads stay open.
#[tokio::test]
async fn join_secret_admits_only_signed_requests() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "5a".repeat(32)).unwrap();
    let cfg = format!(
        "{FAST}\njoin_secret_file = {:?}\n",
        secret.display().to_string()
    );
    let s = Running::start(&cfg).await;
    let key = shoal_proto::auth::derive_key(&[0x5a; 32], shoal_proto::auth::SCHEDULER_LABEL);
    let wrong = shoal_proto::auth::derive_key(&[0x5b; 32], shoal_proto::auth::SCHEDULER_LABEL);

    let member = FakeNode::new(1, s.addr);
    let member = FakeNode {
        client: member.client.clone().with_auth(key),
        ..member
    };
    let outsider = FakeNode::new(2, s.addr);
    let impostor = FakeNode::new(3, s.addr);
    let impostor = FakeNode {
        client: impostor.client.clone().with_auth(wrong),
        ..impostor
    };

    member.announce(true, vec![holds(1, PIECES)]).await;
    for n in [&outsider, &impostor] {
        let err = n
            .client
            .announce(&n.request(true, vec![holds(1, PIECES)]))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ClientError::Rejected { status: 401, .. }),
            "{err}"
        );
        let err = n
            .client
            .report_failure(
                &blob(1),
                &FailureReport {
                    reporter: n.id,
                    peer: member.id,
                    reason: FailureReason::BadPiece,
                },
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, ClientError::Rejected { status: 401, .. }),
            "{err}"
        );
    }
    // Unsigned reads learn nothing: the status names blobs and node addresses.
    let err = outsider.client.status().await.unwrap_err();
    assert!(
        matches!(err, ClientError::Rejected { status: 401, .. }),
        "{err}"
    );
    let err = outsider.client.jobs().await.unwrap_err();
    assert!(
        matches!(err, ClientError::Rejected { status: 401, .. }),
        "{err}"
    );
    let page = reqwest::get(s.url("/")).await.unwrap();
    assert_eq!(page.status(), 401, "the status page needs a signature too");
    let health = reqwest::get(s.url("/healthz")).await.unwrap();
    assert_eq!(health.status(), 200, "health needs none");
    let asker = FakeNode::new(4, s.addr);
    let asker = FakeNode {
        client: asker.client.clone().with_auth(key),
        ..asker
    };
    // The member is known and unblamed; the others were never registered.
    let status = asker.client.status().await.unwrap();
    let ids: Vec<NodeId> = status.nodes.iter().map(|n| n.id).collect();
    assert_eq!(ids, vec![member.id]);
    asker.announce(true, vec![]).await;
    let parents = asker.parents(1, false).await;
    assert_eq!(holder_ids(&parents), vec![member.id]);

    // A signature from long ago is refused.
    let http = reqwest::Client::new();
    let host = s.addr.to_string();
    let path = "/api/v1/announce";
    let body = serde_json::to_vec(&member.request(true, vec![holds(1, PIECES)])).unwrap();
    let signed = shoal_proto::auth::Signed {
        method: "POST",
        host: &host,
        path,
        body: &body,
    };
    let old = shoal_proto::auth::sign(&key, &signed, 1);
    let send = |header: String| {
        http.post(s.url(path))
            .header(PROTOCOL_HEADER, PROTOCOL_VERSION.to_string())
            .header("content-type", "application/json")
            .header(shoal_proto::auth::AUTH_HEADER, header)
            .body(body.clone())
            .send()
    };
    assert_eq!(send(old).await.unwrap().status(), 401);
    // A captured signed announce is accepted once, and refused when replayed.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let captured = shoal_proto::auth::sign(&key, &signed, now);
    assert_eq!(send(captured.clone()).await.unwrap().status(), 200);
    let replayed = send(captured).await.unwrap();
    assert_eq!(replayed.status(), 401, "a replayed announce is refused");
    s.stop().await;
}

#[tokio::test]
async fn prewarm_jobs_over_http() {
    use shoal_proto::sched::{JobProgress, JobRequest, JobState, NodeJobState, NodeSelector};
    let s = Running::start(FAST).await;
    let a = FakeNode::new(1, s.addr);
    let b = FakeNode::new(2, s.addr);
    a.announce(true, vec![]).await;
    b.announce(true, vec![]).await;
    let req = JobRequest {
        image: "reg:5000/app:1".into(),
        nodes: NodeSelector::All,
        full: false,
    };
    let job = a.client.create_job(&req).await.unwrap();
    assert_eq!(job.nodes.len(), 2);
    assert_eq!(job.state, JobState::Running);
    // The nodes get it in their next answers, and report back in announcements.
    let resp = a.announce(false, vec![]).await;
    assert_eq!(resp.jobs.len(), 1);
    assert_eq!(resp.jobs[0].image, "reg:5000/app:1");
    for node in [&a, &b] {
        let mut r = node.request(false, vec![]);
        r.job_progress = vec![JobProgress {
            job: job.id,
            state: NodeJobState::Done,
            bytes_done: 10,
            bytes_total: 10,
            blobs_done: 1,
            blobs_total: 1,
            message: None,
        }];
        let resp = node.client.announce(&r).await.unwrap();
        assert!(resp.jobs.is_empty(), "done: no longer assigned");
    }
    let done = a.client.job(job.id).await.unwrap();
    assert_eq!(done.state, JobState::Done);
    assert_eq!(done.bytes_done, 20);
    assert_eq!(a.client.jobs().await.unwrap().jobs.len(), 1);
    let status = a.client.status().await.unwrap();
    assert_eq!(status.jobs.len(), 1);
    let html = reqwest::get(s.url("/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(html.contains(&job.id.to_string()), "{html}");

    // Refusals: status codes and error codes a CLI can act on.
    let too_many = JobRequest {
        nodes: NodeSelector::Count(3),
        ..req.clone()
    };
    match a.client.create_job(&too_many).await {
        Err(ClientError::Rejected { status, code, .. }) => {
            assert_eq!((status, code), (409, ErrorCode::NoNodes));
        }
        other => panic!("{other:?}"),
    }
    let unknown = "0123456789abcdef".parse().unwrap();
    match a.client.job(unknown).await {
        Err(ClientError::Rejected { status, code, .. }) => {
            assert_eq!((status, code), (404, ErrorCode::NotFound));
        }
        other => panic!("{other:?}"),
    }
    let resp = reqwest::Client::new()
        .get(s.url("/api/v1/jobs/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let resp = reqwest::Client::new()
        .post(s.url("/api/v1/jobs"))
        .header(PROTOCOL_HEADER, "1")
        .body(r#"{"image":"a/b:1","nodes":"zero"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    // Cancel: the running job is no longer assigned.
    let job = a.client.create_job(&req).await.unwrap();
    let cancelled = a.client.cancel_job(job.id).await.unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
    assert!(a.announce(false, vec![]).await.jobs.is_empty());
    s.stop().await;
}

#[tokio::test]
async fn access_lists_are_shared_among_members_only() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "5a".repeat(32)).unwrap();
    let cfg = format!(
        "{FAST}\njoin_secret_file = {:?}\n",
        secret.display().to_string()
    );
    let s = Running::start(&cfg).await;
    let key = shoal_proto::auth::derive_key(&[0x5a; 32], shoal_proto::auth::SCHEDULER_LABEL);
    let member = FakeNode::new(1, s.addr);
    let member = member.client.clone().with_auth(key);
    let outsider = FakeNode::new(2, s.addr).client;
    let image = blob(9);
    assert_eq!(
        member.access_list(&image).await.unwrap(),
        None,
        "none shared yet"
    );
    let list = shoal_proto::sched::AccessList {
        chunks: vec![(0, 4096), (1, 0), (0, 0)],
    };
    member.put_access_list(&image, &list).await.unwrap();
    assert_eq!(
        member.access_list(&image).await.unwrap(),
        Some(list.clone())
    );
    // Outsiders neither read nor write lists.
    let err = outsider.access_list(&image).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Rejected { status: 401, .. }),
        "{err}"
    );
    let err = outsider
        .put_access_list(&image, &shoal_proto::sched::AccessList { chunks: vec![] })
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Rejected { status: 401, .. }),
        "{err}"
    );
    assert_eq!(member.access_list(&image).await.unwrap(), Some(list));
    // A list longer than a start-up needs is refused.
    let huge = shoal_proto::sched::AccessList {
        chunks: (0..shoal_proto::sched::MAX_SHARED_ACCESS as u64 + 1)
            .map(|i| (0, i))
            .collect(),
    };
    let err = member.put_access_list(&blob(10), &huge).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Rejected { status: 400, .. }),
        "{err}"
    );
}
