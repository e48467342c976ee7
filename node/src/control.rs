//! The control socket: the only way to change what the node does (mount, unmount — and every
//! future state-changing call), reserved to the host's administrator.
//!
//! A Unix socket (`--control PATH`, default `/run/shoal/control.sock` as root) owned by the
//! node's user with mode 0600 — 0660 and the configured `control_group` as its group when one
//! is set — so the kernel refuses anyone else's `connect`. Each connection's peer credentials
//! (`SO_PEERCRED`) are checked again before a request is served (defence in depth, and the only
//! check in the instant between `bind` and `chmod`): root, the node's own user, or a member of
//! the control group (primary or supplementary, read from `/proc/<pid>/status`). Anyone else
//! gets `403`.
//!
//! TCP never carries these calls: a TCP port on 127.0.0.1 is reachable by every local user, by
//! host-network pods, and by web pages through DNS rebinding. The admin TCP listener is
//! read-only (`admin`).
//!
//! [`request`] is the client side, used by `shoal mount`, `umount` and `mounts`.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use axum::extract::{ConnectInfo, Request};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::serve::{IncomingStream, Listener};
use axum::{Json, Router};
use bytes::Bytes;
use http_body_util::BodyExt as _;
use tokio::net::{UnixListener, UnixStream};

/// Who is at the other end of a control connection.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

/// Who may use the control socket besides root.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// The node's own effective uid.
    pub uid: u32,
    /// The control group's gid, if one is configured.
    pub group: Option<u32>,
}

impl Policy {
    /// Whether `peer` may make control calls.
    pub fn allows(&self, peer: &Peer) -> bool {
        if peer.uid == 0 || peer.uid == self.uid {
            return true;
        }
        let Some(group) = self.group else {
            return false;
        };
        peer.gid == group
            || peer
                .pid
                .is_some_and(|pid| supplementary_groups(pid).contains(&group))
    }
}

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket {path}: {reason}")]
    Unsafe { path: PathBuf, reason: String },
}

/// A bound control socket, ready to serve.
#[derive(Debug)]
pub struct ControlListener {
    inner: UnixListener,
    path: PathBuf,
}

impl ControlListener {
    /// Binds `path` (removing a stale socket of ours), creating its directory (mode 0755) when
    /// missing, and sets the socket's mode and group.
    pub fn bind(path: &Path, group: Option<u32>) -> Result<Self, ControlError> {
        let io = |source| ControlError::Io {
            path: path.to_owned(),
            source,
        };
        let Some(dir) = path.parent() else {
            return Err(ControlError::Unsafe {
                path: path.into(),
                reason: "has no parent directory".into(),
            });
        };
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(io)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(io)?;
        }
        check_dir(path, dir)?;
        match std::fs::symlink_metadata(path) {
            Ok(m)
                if !std::os::unix::fs::FileTypeExt::is_socket(&m.file_type())
                    || m.uid() != rustix::process::geteuid().as_raw() =>
            {
                return Err(ControlError::Unsafe {
                    path: path.into(),
                    reason: "exists and is not a socket of this user's; refusing to replace it"
                        .into(),
                })
            }
            Ok(_) => std::fs::remove_file(path).map_err(io)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let inner = UnixListener::bind(path).map_err(io)?;
        let mode = if group.is_some() { 0o660 } else { 0o600 };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)?;
        if let Some(gid) = group {
            std::os::unix::fs::chown(path, None, Some(gid)).map_err(io)?;
        }
        Ok(Self {
            inner,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The accepted connections whose peer `policy` allows, as a stream (for servers other
    /// than axum's: the snapshotter's gRPC); refused peers are logged and dropped.
    pub fn into_incoming(
        self,
        policy: Policy,
    ) -> impl futures::Stream<Item = std::io::Result<UnixStream>> + Send + 'static {
        futures::stream::unfold(self.inner, move |listener| async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let peer = stream.peer_cred().ok().map(|c| Peer {
                            uid: c.uid(),
                            gid: c.gid(),
                            pid: c.pid(),
                        });
                        if peer.is_some_and(|p| policy.allows(&p)) {
                            return Some((Ok(stream), listener));
                        }
                        tracing::warn!(
                            ?peer,
                            "connection refused: the caller is not the node's administrator"
                        );
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                }
            }
        })
    }
}

/// The socket's directory must not let others replace the socket or take its name: owned by us
/// or root, and not writable by others (sticky or not).
fn check_dir(path: &Path, dir: &Path) -> Result<(), ControlError> {
    let m = std::fs::metadata(dir).map_err(|source| ControlError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let me = rustix::process::geteuid().as_raw();
    let mode = m.mode();
    // Sticky or not: in a world-writable directory (`/tmp`) another user can take the socket's
    // name while the node is down, and clients (image servers) would talk to theirs.
    let others_write = mode & 0o002 != 0;
    if (m.uid() != me && m.uid() != 0) || others_write {
        return Err(ControlError::Unsafe {
            path: path.into(),
            reason: format!(
                "its directory {} can be changed by other users; choose a directory only the node's user controls",
                dir.display()
            ),
        });
    }
    Ok(())
}

impl Listener for ControlListener {
    type Io = UnixStream;
    type Addr = Option<Peer>;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, _)) => {
                    let peer = stream.peer_cred().ok().map(|c| Peer {
                        uid: c.uid(),
                        gid: c.gid(),
                        pid: c.pid(),
                    });
                    return (stream, peer);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(None)
    }
}

/// The peer of a connection, for handlers.
#[derive(Clone, Copy, Debug)]
pub struct PeerInfo(pub Option<Peer>);

impl axum::extract::connect_info::Connected<IncomingStream<'_, ControlListener>> for PeerInfo {
    fn connect_info(stream: IncomingStream<'_, ControlListener>) -> Self {
        PeerInfo(*stream.remote_addr())
    }
}

/// Serves `routes` on `listener` to the peers `policy` allows until `stop`.
pub async fn serve(
    listener: ControlListener,
    routes: Router,
    policy: Policy,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let path = listener.path.clone();
    let app = routes.layer(middleware::from_fn(move |req, next| {
        authorize(policy, req, next)
    }));
    let result = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<PeerInfo>(),
    )
    .with_graceful_shutdown(stop)
    .await;
    let _ = std::fs::remove_file(&path);
    result
}

async fn authorize(policy: Policy, req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<PeerInfo>>()
        .and_then(|c| c.0 .0);
    match peer {
        Some(p) if policy.allows(&p) => {
            let mut req = req;
            let caller = if p.uid == 0 || p.uid == policy.uid {
                crate::mount::Caller::Administrator
            } else {
                crate::mount::Caller::Member(p.uid)
            };
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        other => {
            tracing::warn!(peer = ?other, path = %req.uri().path(), "control call refused: caller is not the node's administrator");
            (
                StatusCode::FORBIDDEN,
                Json(serde_json::json!({
                    "error": "only root, the node's user or the control group may change the node"
                })),
            )
                .into_response()
        }
    }
}

/// Supplementary groups of process `pid` (empty if unknown).
fn supplementary_groups(pid: i32) -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Why a control request failed on the client side.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("cannot connect to the node's control socket {path}: {source} (is `shoal node` running, with --control {path}? it takes root or the control group)")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket {path}: {message}")]
    Http { path: PathBuf, message: String },
}

/// Sends one request over the control socket at `path`: `(status, body)`.
pub async fn request(
    path: &Path,
    method: axum::http::Method,
    uri: &str,
    body: Option<Vec<u8>>,
) -> Result<(StatusCode, Bytes), RequestError> {
    let http = |e: &dyn std::fmt::Display| RequestError::Http {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let stream = UnixStream::connect(path)
        .await
        .map_err(|source| RequestError::Connect {
            path: path.to_owned(),
            source,
        })?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| http(&e))?;
    let driver = tokio::spawn(conn);
    let mut req = axum::http::Request::builder()
        .method(method)
        .uri(uri)
        .header(axum::http::header::HOST, "control");
    if body.is_some() {
        req = req.header(axum::http::header::CONTENT_TYPE, "application/json");
    }
    let req = req
        .body(http_body_util::Full::new(Bytes::from(
            body.unwrap_or_default(),
        )))
        .map_err(|e| http(&e))?;
    let resp = sender.send_request(req).await.map_err(|e| http(&e))?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| http(&e))?
        .to_bytes();
    driver.abort();
    Ok((status, bytes))
}

/// The control socket a client uses by default: `$SHOAL_CONTROL` is read by clap; this is the
/// fallback, the node's own default for this user.
pub fn default_path() -> PathBuf {
    if crate::config::is_root() {
        return PathBuf::from("/run/shoal/control.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("shoal/control.sock"),
        _ => PathBuf::from("/run/shoal/control.sock"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy() {
        let p = Policy {
            uid: 1000,
            group: None,
        };
        let peer = |uid, gid| Peer {
            uid,
            gid,
            pid: None,
        };
        assert!(p.allows(&peer(0, 0)));
        assert!(p.allows(&peer(1000, 1000)));
        assert!(!p.allows(&peer(65534, 65534)));
        let g = Policy {
            uid: 0,
            group: Some(4242),
        };
        assert!(g.allows(&peer(1001, 4242)));
        assert!(!g.allows(&peer(1001, 1001)));
    }

    #[tokio::test]
    async fn only_allowed_peers_are_served_and_the_socket_is_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.sock");
        let l = ControlListener::bind(&path, None).expect("bind");
        let mode = std::fs::metadata(&path).expect("socket").mode() & 0o777;
        assert_eq!(mode, 0o600);
        let routes = Router::new().route("/x", axum::routing::get(|| async { "yes" }));
        // A policy that admits nobody but root, run by a "different" node user: as root in
        // tests, the peer is root and allowed; flip the rule to see a refusal.
        let me = rustix::process::geteuid().as_raw();
        let nobody = Policy {
            uid: me,
            group: None,
        };
        let stop = tokio_util::sync::CancellationToken::new();
        let s = stop.clone();
        let server = tokio::spawn(serve(l, routes, nobody, async move { s.cancelled().await }));
        let (status, body) = request(&path, axum::http::Method::GET, "/x", None)
            .await
            .expect("request");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(&body[..], b"yes");
        stop.cancel();
        server.await.expect("join").expect("serve");
        assert!(!path.exists(), "the socket is removed at shutdown");
        // Refused: replacing a file that is not a socket (a mistyped path must not delete it).
        let file = dir.path().join("important.conf");
        std::fs::write(&file, b"keep me").expect("write");
        assert!(matches!(
            ControlListener::bind(&file, None),
            Err(ControlError::Unsafe { .. })
        ));
        assert_eq!(std::fs::read(&file).expect("still there"), b"keep me");
        // Refused: a directory others can write to.
        let open = dir.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        assert!(matches!(
            ControlListener::bind(&open.join("c.sock"), None),
            Err(ControlError::Unsafe { .. })
        ));
    }
}
