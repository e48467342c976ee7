//! Serving the node's TCP listeners (the mirror and the admin listener): HTTP/1.1 with a bound on
//! how long a client may take to send a request's head, and caps on connections — in all and
//! per client address — so that a few slow or numerous clients cannot hold every file
//! descriptor of the node (the mirror may listen on the host's network address).
//!
//! Invariants: a connection over a cap is closed at once, before anything is read; a connection
//! that sends no complete request head within `header_timeout` (the first or the next one on a
//! kept-alive connection) is closed; at `stop`, no connection is accepted any more and each open
//! one finishes its current response and closes (upgraded ones — `CONNECT` tunnels — are the
//! proxy's to close).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How much one listener takes.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Open connections at most.
    pub connections: usize,
    /// Open connections from one client address at most.
    pub per_client: usize,
    /// Time to send a request's head.
    pub header_timeout: Duration,
}

impl Limits {
    /// The mirror's: clients are runtimes pulling many layers at once, behind a few addresses.
    pub const MIRROR: Limits = Limits {
        connections: 4096,
        per_client: 1024,
        header_timeout: Duration::from_secs(30),
    };
    /// The admin listener's: probes and scrapes.
    pub const ADMIN: Limits = Limits {
        connections: 256,
        per_client: 64,
        header_timeout: Duration::from_secs(10),
    };
}

/// Serves `app` on `listener` until `stop`, then waits for open connections to finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let open = Arc::new(Mutex::new(Open::default()));
    let conns = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors, most likely: let some connections finish.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(slot) = Slot::take(&open, peer, limits) else {
            tracing::debug!(%peer, "connection refused: too many open");
            drop(stream);
            continue;
        };
        let (app, stop) = (app.clone(), stop.clone());
        conns.spawn(async move {
            let _slot = slot;
            let _ = stream.set_nodelay(true);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app))
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    conns.close();
    conns.wait().await;
    Ok(())
}

/// Open connections, in all and per client address.
#[derive(Default)]
struct Open {
    total: usize,
    by_client: HashMap<IpAddr, usize>,
}

/// One open connection's place; given back when dropped.
struct Slot {
    open: Arc<Mutex<Open>>,
    client: IpAddr,
}

impl Slot {
    fn take(open: &Arc<Mutex<Open>>, peer: SocketAddr, limits: Limits) -> Option<Slot> {
        let mut o = open.lock().unwrap_or_else(|e| e.into_inner());
        let mine = o.by_client.get(&peer.ip()).copied().unwrap_or(0);
        if o.total >= limits.connections || mine >= limits.per_client {
            return None;
        }
        o.total += 1;
        o.by_client.insert(peer.ip(), mine + 1);
        Some(Slot {
            open: open.clone(),
            client: peer.ip(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut o = self.open.lock().unwrap_or_else(|e| e.into_inner());
        o.total = o.total.saturating_sub(1);
        if let Some(n) = o.by_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                o.by_client.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};

    fn app() -> Router {
        Router::new().route("/", axum::routing::get(|| async { "hello" }))
    }

    #[tokio::test]
    async fn slow_heads_are_cut_and_caps_hold() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let limits = Limits {
            connections: 3,
            per_client: 2,
            header_timeout: Duration::from_millis(300),
        };
        let server = tokio::spawn(serve(listener, app(), limits, stop.clone()));
        let result = tokio::task::spawn_blocking(move || {
            // Two slow clients from one address fill its share...
            let mut slow: Vec<std::net::TcpStream> = (0..2)
                .map(|_| {
                    let mut s = std::net::TcpStream::connect(addr).unwrap();
                    s.write_all(b"GET / HTTP/1.1\r\n").unwrap();
                    s
                })
                .collect();
            std::thread::sleep(Duration::from_millis(100));
            // ...so a third from it is closed at once.
            let mut third = std::net::TcpStream::connect(addr).unwrap();
            third
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let _ = third.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
            let mut buf = Vec::new();
            let n = third.read_to_end(&mut buf).unwrap_or(0);
            assert_eq!(
                n,
                0,
                "over the per-client cap: {}",
                String::from_utf8_lossy(&buf)
            );
            // The slow heads are cut after the timeout.
            for s in &mut slow {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut buf = Vec::new();
                let _ = s.read_to_end(&mut buf);
            }
            // Their places are free again: a normal request is answered.
            let mut ok = std::net::TcpStream::connect(addr).unwrap();
            ok.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut buf = String::new();
            ok.read_to_string(&mut buf).unwrap();
            buf
        })
        .await
        .unwrap();
        assert!(
            result.starts_with("HTTP/1.1 200") && result.ends_with("hello"),
            "{result}"
        );
        stop.cancel();
        server.await.unwrap().unwrap();
    }
}
