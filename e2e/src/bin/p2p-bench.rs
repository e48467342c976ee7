//! Peer-to-peer benchmarks (not tests), two modes:
//!
//! - default: node-to-node transfer throughput on loopback: the QUIC data plane
//!   (`shoal_node::p2p`, identity-bound TLS, join-secret handshake, pieces read
//!   and verified from the store) next to a plain TCP copy of the same bytes
//!   from the same file, in the same run.
//!   `cargo run -p shoal-e2e --bin p2p-bench -- [--size-mib 512] [--rounds 3]`
//! - `cluster`: for each N, a cluster of N nodes in network namespaces (origin
//!   link 200 Mbit/s, node links 1 Gbit/s, see `shoal_e2e::cluster`) where all N
//!   hosts pull the fixture image at the same moment with skopeo, once straight
//!   from the origin and once through their node; prints the time until every
//!   host holds the image and the origin's blob bytes (its own log) per image.
//!   Needs root, iproute2, docker-registry, skopeo and the shoal binary.
//!   `cargo run -p shoal-e2e --bin p2p-bench -- cluster [--nodes 1,2,4,8,16]
//!   [--origin-mbit 200] [--node-mbit 1000]`

use std::io::Read as _;
use std::os::unix::fs::FileExt as _;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use shoal_node::p2p::{self, Identity, JoinSecret, P2pConfig, P2pMetrics};
use shoal_node::store::{Backend, Store, StoreConfig, Verifier};
use shoal_proto::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let all: Vec<String> = std::env::args().skip(1).collect();
    if all.first().map(String::as_str) == Some("cluster") {
        return cluster_bench::run(&all[1..]);
    }
    let mut size_mib = 512u64;
    let mut rounds = 3usize;
    let mut args = all.into_iter();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--size-mib" => size_mib = args.next().context("--size-mib N")?.parse()?,
            "--rounds" => rounds = args.next().context("--rounds N")?.parse()?,
            other => anyhow::bail!(
                "unknown argument {other:?} (usage: p2p-bench [--size-mib N] [--rounds N] | \
                 p2p-bench cluster [--nodes 1,2,4,8,16] [--origin-mbit 200] [--node-mbit 1000])"
            ),
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(size_mib << 20, rounds))
}

async fn run(size: u64, rounds: usize) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("shoal-p2p-bench")
        .tempdir_in("/var/tmp")?;
    let secret = JoinSecret::from_bytes(&[7u8; 32])?;
    let (a_store, a) = start(dir.path().join("a"), &secret).await?;
    let (_b_store, b) = start(dir.path().join("b"), &secret).await?;

    let data = pseudo_random(size as usize);
    let id = Digest::sha256(&data);
    {
        let mut w = a_store.open_writer(&id, size)?;
        w.write_at(0, &data)?;
        w.commit(0..size)?;
        let mut v = Verifier::new(&id);
        v.update(&data);
        w.complete(v.finish().map_err(|_| anyhow::anyhow!("digest"))?)?;
    }
    drop(data);
    let file = a_store.content_path(&id);
    println!("blob: {} MiB, {} rounds each, loopback", size >> 20, rounds);

    // Plain TCP: a server that streams the same file in 256 KiB reads.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let tcp_addr = listener.local_addr()?;
    let serve_file = file.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let path = serve_file.clone();
            tokio::spawn(async move {
                let Ok(f) = std::fs::File::open(&path) else {
                    return;
                };
                let mut buf = vec![0u8; 256 << 10];
                let mut off = 0u64;
                loop {
                    let n = match f.read_at(&mut buf, off) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if sock.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    off += n as u64;
                }
            });
        }
    });

    let (mut quic, mut tcp) = (Vec::new(), Vec::new());
    // One untimed pass of each warms the page cache and the connection.
    let _ = quic_pass(&b.1, &a.1, &id, size).await?;
    let _ = tcp_pass(tcp_addr, size).await?;
    for r in 0..rounds {
        let (q, t) = if r % 2 == 0 {
            let q = quic_pass(&b.1, &a.1, &id, size).await?;
            (q, tcp_pass(tcp_addr, size).await?)
        } else {
            let t = tcp_pass(tcp_addr, size).await?;
            (quic_pass(&b.1, &a.1, &id, size).await?, t)
        };
        println!(
            "round {}: shoal QUIC {:7.1} MB/s   plain TCP {:7.1} MB/s",
            r + 1,
            mbps(size, q),
            mbps(size, t)
        );
        quic.push(q);
        tcp.push(t);
    }
    quic.sort();
    tcp.sort();
    let (qm, tm) = (quic[quic.len() / 2], tcp[tcp.len() / 2]);
    println!(
        "median: shoal QUIC {:.1} MB/s, plain TCP {:.1} MB/s, ratio {:.2}",
        mbps(size, qm),
        mbps(size, tm),
        tm.as_secs_f64() / qm.as_secs_f64()
    );
    println!("machine: nproc {}, {}", num_cpus(), kernel());
    shoal_e2e::rows::row(
        "node → node over the P2P data plane (QUIC), median",
        &format!("{:.0} MB/s", mbps(size, qm)),
        &format!("plain TCP copy {:.0} MB/s", mbps(size, tm)),
        mbps(size, qm) / mbps(size, tm),
        "≥ 1,500 MB/s",
    );
    a.0.cancel();
    b.0.cancel();
    Ok(())
}

type Node = (CancellationToken, p2p::P2pHandle);

async fn start(dir: std::path::PathBuf, secret: &JoinSecret) -> Result<(Store, Node)> {
    let store = Store::open(StoreConfig {
        dir: dir.clone(),
        backend: Backend::RocksDb,
        quota_bytes: 0,
        filesystem_quota: false,
        high_watermark: 0.9,
        low_watermark: 0.8,
    })?;
    let identity = Identity::load_or_generate(&dir)?;
    let cfg = P2pConfig::new("127.0.0.1:0".parse()?, secret.clone());
    let cancel = CancellationToken::new();
    let handle = p2p::start(
        cfg,
        store.clone(),
        identity,
        P2pMetrics::default(),
        cancel.clone(),
    )
    .await?;
    Ok((store, (cancel, handle)))
}

/// B fetches the whole blob from A; bytes are counted and dropped.
async fn quic_pass(
    b: &p2p::P2pHandle,
    a: &p2p::P2pHandle,
    id: &Digest,
    size: u64,
) -> Result<Duration> {
    let t = Instant::now();
    let mut stream = b
        .fetch_range(a.node_id(), a.local_addr(), id, 0, size)
        .await?;
    let mut got = 0u64;
    while let Some(chunk) = stream.next_chunk().await? {
        got += chunk.len() as u64;
    }
    anyhow::ensure!(got == size, "QUIC pass got {got} of {size} bytes");
    Ok(t.elapsed())
}

async fn tcp_pass(addr: std::net::SocketAddr, size: u64) -> Result<Duration> {
    let t = Instant::now();
    let mut sock = tokio::net::TcpStream::connect(addr).await?;
    let mut buf = vec![0u8; 256 << 10];
    let mut got = 0u64;
    while got < size {
        let n = sock.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "TCP pass ended at {got} of {size}");
        got += n as u64;
    }
    Ok(t.elapsed())
}

fn pseudo_random(len: usize) -> Vec<u8> {
    shoal_e2e::random::pseudo_random(len, 0)
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64().max(1e-9)
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn kernel() -> String {
    let mut s = String::new();
    let _ = std::fs::File::open("/proc/sys/kernel/osrelease")
        .and_then(|mut f| f.read_to_string(&mut s));
    format!("Linux {}", s.trim())
}

/// `p2p-bench cluster`: N concurrent pulls through shoal vs straight from the origin.
mod cluster_bench {
    use std::time::Duration;

    use anyhow::{ensure, Context, Result};
    use shoal_e2e::cluster::{
        mb, verify_all, Cluster, ClusterOptions, NodeBytes, PullSet, Pulled, NODE_MBIT, ORIGIN_MBIT,
    };
    use shoal_e2e::TestCtx;

    struct Options {
        nodes: Vec<usize>,
        origin_mbit: u32,
        node_mbit: u32,
    }

    /// One way of pulling, for one N.
    struct Round {
        /// Until the last host held the image.
        all_hold: Duration,
        /// Origin blob bytes / image bytes.
        origin_images: f64,
        /// Bytes nodes say they got from peers (shoal only).
        from_peers: u64,
    }

    pub fn run(args: &[String]) -> Result<()> {
        let options = parse(args)?;
        if let Some(why) = shoal_e2e::netns::unavailable() {
            anyhow::bail!("p2p-bench cluster cannot build test hosts: {why}");
        }
        for tool in ["docker-registry", "skopeo"] {
            ensure!(
                shoal_e2e::paths::which(tool).is_some(),
                "p2p-bench cluster needs `{tool}` on PATH"
            );
        }
        let mut rows = Vec::new();
        let mut failed = Vec::new();
        for &n in &options.nodes {
            eprintln!("N = {n}: starting the cluster");
            match measure(n, &options) {
                Ok((shoal, direct, image)) => {
                    eprintln!(
                        "N = {n}: shoal {:.1?} ({:.2} images from the origin), direct {:.1?} ({:.2})",
                        shoal.all_hold, shoal.origin_images, direct.all_hold, direct.origin_images
                    );
                    rows.push((n, shoal, direct, image));
                }
                // A round whose copies are wrong or missing has no figures; the others still do.
                Err(err) => {
                    eprintln!("N = {n}: FAILED: {err:#}");
                    failed.push(format!("N = {n}: {err:#}"));
                }
            }
        }
        print_table(&options, &rows);
        ensure!(
            failed.is_empty(),
            "{} round(s) failed:\n{}",
            failed.len(),
            failed.join("\n")
        );
        Ok(())
    }

    /// Starts a fresh cluster of `n` nodes; all hosts pull straight from the origin, then all
    /// through their nodes. Returns (shoal, direct, image bytes).
    fn measure(n: usize, options: &Options) -> Result<(Round, Round, u64)> {
        let ctx = TestCtx::standalone(&format!("p2p-bench-cluster-{n}"))?;
        let mut cluster_options = ClusterOptions::members(n);
        cluster_options.origin_mbit = options.origin_mbit;
        cluster_options.node_mbit = options.node_mbit;
        let cluster = Cluster::start(&ctx, &cluster_options)?;
        let image = cluster.image_bytes();

        let mark = cluster.origin_mark()?;
        let jobs = (0..n)
            .map(|i| cluster.direct_pull_job(&ctx, i))
            .collect::<Result<Vec<_>>>()?;
        let pulled = PullSet::start(jobs).join()?;
        let direct = round(&cluster, &pulled, mark, 0)?;

        let mark = cluster.origin_mark()?;
        let jobs = (0..n)
            .map(|i| cluster.pull_job(&ctx, i))
            .collect::<Result<Vec<_>>>()?;
        let pulled = PullSet::start(jobs).join()?;
        let from_peers = (0..n)
            .map(|i| cluster.metrics(i).map(|m| NodeBytes::of(&m).from_peers))
            .sum::<Result<u64>>()?;
        let shoal = round(&cluster, &pulled, mark, from_peers)?;
        Ok((shoal, direct, image))
    }

    /// Checks every copy, then measures and deletes them.
    fn round(cluster: &Cluster, pulled: &[Pulled], mark: usize, from_peers: u64) -> Result<Round> {
        verify_all(cluster.image(), pulled)?;
        let origin = cluster.origin_blob_bytes_since(mark)?;
        for p in pulled {
            p.remove()?;
        }
        Ok(Round {
            all_hold: pulled.iter().map(|p| p.elapsed).max().unwrap_or_default(),
            origin_images: origin as f64 / cluster.image_bytes() as f64,
            from_peers,
        })
    }

    fn print_table(options: &Options, rows: &[(usize, Round, Round, u64)]) {
        let image = rows.first().map_or(0, |r| r.3);
        println!(
            "image: fixture debian-python ({:.1} MB, 2 layers); origin link {} Mbit/s, node links \
             {} Mbit/s; all N hosts pull at the same moment with skopeo",
            mb(image),
            options.origin_mbit,
            options.node_mbit
        );
        println!(
            "{:>3} | {:>16} {:>13} {:>12} | {:>17} {:>13} | {:>9}",
            "N",
            "shoal: all hold",
            "origin/image",
            "from peers",
            "direct: all hold",
            "origin/image",
            "speed-up"
        );
        for (n, shoal, direct, _) in rows {
            println!(
                "{n:>3} | {:>15.1}s {:>13.2} {:>9.1} MB | {:>16.1}s {:>13.2} | {:>8.2}x",
                shoal.all_hold.as_secs_f64(),
                shoal.origin_images,
                mb(shoal.from_peers),
                direct.all_hold.as_secs_f64(),
                direct.origin_images,
                direct.all_hold.as_secs_f64() / shoal.all_hold.as_secs_f64().max(1e-9)
            );
        }
        println!("machine: nproc {}, {}", super::num_cpus(), super::kernel());
        // Issue 15's row: the most hosts at once against one host alone, both through shoal.
        let one = rows.iter().find(|r| r.0 == 1);
        let most = rows.iter().filter(|r| r.0 > 1).max_by_key(|r| r.0);
        if let (Some(one), Some(most)) = (one, most) {
            shoal_e2e::rows::row(
                &format!(
                    "{} hosts pull the image at once through shoal (origin {} Mbit/s, nodes {} Mbit/s)",
                    most.0, options.origin_mbit, options.node_mbit
                ),
                &format!("{:.1} s until all hold it", most.1.all_hold.as_secs_f64()),
                &format!("1 host alone {:.1} s", one.1.all_hold.as_secs_f64()),
                most.1.all_hold.as_secs_f64() / one.1.all_hold.as_secs_f64().max(1e-9),
                "≤ 1.5×",
            );
        }
    }

    fn parse(args: &[String]) -> Result<Options> {
        let mut options = Options {
            nodes: vec![1, 2, 4, 8, 16],
            origin_mbit: ORIGIN_MBIT,
            node_mbit: NODE_MBIT,
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let value = it.next().with_context(|| format!("{flag} needs a value"))?;
            match flag.as_str() {
                "--nodes" => {
                    options.nodes = value
                        .split(',')
                        .map(|n| n.trim().parse::<usize>())
                        .collect::<Result<_, _>>()
                        .context("--nodes takes a list like 1,2,4,8")?;
                }
                "--origin-mbit" => options.origin_mbit = value.parse()?,
                "--node-mbit" => options.node_mbit = value.parse()?,
                other => anyhow::bail!("unknown flag {other}"),
            }
        }
        ensure!(
            options.nodes.iter().all(|&n| (1..=200).contains(&n)),
            "node counts must be 1..=200"
        );
        Ok(options)
    }
}
