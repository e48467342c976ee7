//! A running scheduler: bind the listener, start the actor, serve HTTP until
//! shutdown. Used by `shoal scheduler` and by nodes that embed a scheduler.
//!
//! Shutdown order: stop accepting connections and give in-flight requests a
//! grace period → cancel the actor → wait for every task. There is nothing
//! to flush: the state lives in memory and is rebuilt from announcements.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::service::{self, SchedulerHandle};

/// How long in-flight requests may run on after a shutdown signal.
const GRACE: Duration = Duration::from_secs(5);

/// Why the scheduler could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("binding the scheduler to {addr} (listen): {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("serving HTTP: {0}")]
    Serve(std::io::Error),
}

/// A scheduler whose listener is bound and whose actor runs; call
/// [`Scheduler::serve`] to answer requests.
#[derive(Debug)]
pub struct Scheduler {
    auth_key: Option<[u8; 32]>,
    listener: TcpListener,
    /// The read-only operator listener (`status_listen`).
    status_listener: Option<TcpListener>,
    local_addr: SocketAddr,
    handle: SchedulerHandle,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Scheduler {
    /// Bind `cfg.listen` and start the actor.
    pub async fn bind(cfg: Config) -> Result<Self, ServerError> {
        Self::bind_with(cfg, Arc::new(Metrics::new())).await
    }

    /// Like [`Scheduler::bind`], recording into the given metrics.
    pub async fn bind_with(cfg: Config, metrics: Arc<Metrics>) -> Result<Self, ServerError> {
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| ServerError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: cfg.listen,
            source,
        })?;
        let status_listener = match cfg.status_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| ServerError::Bind { addr, source })?,
            ),
            None => None,
        };
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let handle = service::spawn(cfg.state, metrics, &tracker, cancel.clone());
        Ok(Self {
            auth_key: cfg.auth_key,
            listener,
            status_listener,
            local_addr,
            handle,
            tracker,
            cancel,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle to the actor, for embedding without HTTP.
    pub fn handle(&self) -> SchedulerHandle {
        self.handle.clone()
    }

    /// Serve until `shutdown` resolves, then shut down in order.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        let Self {
            auth_key,
            listener,
            status_listener,
            local_addr,
            handle,
            tracker,
            cancel,
        } = self;
        tracing::info!(listen = %local_addr, "scheduler ready");
        let stop_accepting = CancellationToken::new();
        let stop = stop_accepting.clone();
        if auth_key.is_none() {
            tracing::warn!("no join_secret_file: any client that reaches this port may announce and blame nodes");
        }
        if let Some(l) = status_listener {
            let app = crate::http::status_router(handle.clone());
            let stop = stop_accepting.clone();
            let addr = l.local_addr().ok();
            tracing::info!(listen = ?addr, "operator status listener (read-only, unsigned)");
            tracker.spawn(async move {
                if let Err(e) = axum::serve(l, app)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await
                {
                    tracing::warn!(error = %e, "status listener failed");
                }
            });
        }
        let app = crate::http::router_with_auth(handle, auth_key);
        let mut server = tracker.spawn(
            async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await
            }
            .instrument(tracing::info_span!("http", listen = %local_addr)),
        );
        tracker.close();
        shutdown.await;
        tracing::info!("shutting down: no new connections");
        stop_accepting.cancel();
        let served = match tokio::time::timeout(GRACE, &mut server).await {
            Ok(Ok(result)) => result.map_err(ServerError::Serve),
            Ok(Err(join)) => Err(ServerError::Serve(std::io::Error::other(join))),
            Err(_) => {
                tracing::warn!("in-flight requests still running after {GRACE:?}; cutting them");
                server.abort();
                Ok(())
            }
        };
        cancel.cancel();
        tracker.wait().await;
        tracing::info!("scheduler stopped");
        served
    }
}

/// Run a scheduler with `cfg` until `shutdown` resolves.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    Scheduler::bind(cfg).await?.serve(shutdown).await
}
