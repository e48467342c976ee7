//! Node-to-node transfer throughput on loopback: the QUIC data plane
//! (`shoal_node::p2p`, identity-bound TLS, join-secret handshake, pieces read
//! and verified from the store) next to a plain TCP copy of the same bytes
//! from the same file, in the same run.
//!
//! `cargo run -p shoal-e2e --bin p2p-bench -- [--size-mib 512] [--rounds 3]`

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
    let mut size_mib = 512u64;
    let mut rounds = 3usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--size-mib" => size_mib = args.next().context("--size-mib N")?.parse()?,
            "--rounds" => rounds = args.next().context("--rounds N")?.parse()?,
            other => anyhow::bail!("unknown argument {other:?}"),
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
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
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
