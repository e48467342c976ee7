//! Image mounts served by a process of their own (`shoal image-server`), for the containerd
//! snapshotter: containers stand on those mounts, so a restart or an upgrade of the node must not
//! take them away.
//!
//! The image server holds the mount (FUSE, or the kernel EROFS mount with its FUSE blob files)
//! and reads chunks from the node over a Unix socket next to the control socket
//! (`chunks.sock` in its directory, root only like it). The node keeps doing what only it can do — the
//! store, peers, the origin, prefetch and access lists — through the mount's chunk backend,
//! registered here by mount point. While the node is away (restarting), the server's reads wait
//! for it (up to [`PATIENCE`]) instead of failing; once it is back and the snapshotter restored
//! the mount, they go on. When the node starts, it adopts a server still running for a mount
//! point (its pid kept in `<data dir>/servers/<key of the mount point>`) instead of mounting
//! again.
//!
//! Wire (one request at a time per connection, several connections per server):
//! request `[op=1][u16 dir length][dir][u32 blob index][u64 compressed offset]`, or — for a
//! chunk packed in a batch (`nydus-image --batch-size`), which shares its stored offset with the
//! other chunks of its batch and which the server cannot place (it has no CI table) —
//! `[op=2][u16 dir length][dir][u32 blob index][u64 chunk index]`; answer
//! `[status][u32 length][payload]` — status 0: the chunk's decoded bytes (the server checks
//! their digest against its own copy of the bootstrap before any program sees them); 1: the node
//! could not get the chunk (the message); 2: no such mount (yet).
//!
//! Invariants: only verified bytes reach programs (the node verifies, the server verifies
//! again); the server never answers a read with anything but the chunk or an error — never
//! zeros — so a node gone for good makes reads fail, not lie.

use std::collections::HashMap;
use std::io::{BufRead as _, Read, Write};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use shoal_rafs::fuse::FuseStats;
use shoal_rafs::{verify_decoded, BlobInfo, Bootstrap, ChunkRef, ChunkSource, VerifiedChunk};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

use super::chunks::ChunkBackend;
use super::table::MountMode;
use super::MountError;
use crate::control::{ControlListener, Policy};

/// How long an image server's reads wait for the node to come back.
pub const PATIENCE: Duration = Duration::from_secs(300);
/// How long a new image server may take to mount.
const START_TIMEOUT: Duration = Duration::from_secs(60);
const OP_READ: u8 = 1;
/// Read by chunk index (batched chunks); older nodes know only [`OP_READ`].
const OP_READ_INDEX: u8 = 2;
const ST_OK: u8 = 0;
const ST_FAILED: u8 = 1;
const ST_UNKNOWN: u8 = 2;
/// Longest mount point path on the wire.
const MAX_DIR: usize = 4096;
/// Connections an image server keeps open to the node, at most.
const POOL: usize = 16;

/// The chunk socket of a node whose control socket is `control`: `chunks.sock` beside it (no
/// longer than the control socket's own path, which fits a Unix socket).
pub fn socket_for(control: &Path) -> PathBuf {
    control.with_file_name("chunks.sock")
}

// ------------------------------------------------------------------------------ node side

/// A mount an image server serves: its bootstrap and the node's chunk backend for it.
#[derive(Clone)]
struct Served {
    boot: Arc<Bootstrap>,
    backend: Arc<ChunkBackend>,
}

/// The mounts image servers may read, by mount point. Cheap to clone.
#[derive(Clone, Default)]
pub struct Registry(Arc<RwLock<HashMap<PathBuf, Served>>>);

/// Keeps a mount in the [`Registry`] while it lives.
pub struct Registration {
    registry: Registry,
    dir: PathBuf,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut m = self
            .registry
            .0
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        m.remove(&self.dir);
    }
}

impl Registry {
    /// Serve `dir`'s chunks from `backend` until the returned guard is dropped.
    pub fn register(
        &self,
        dir: &Path,
        boot: Arc<Bootstrap>,
        backend: Arc<ChunkBackend>,
    ) -> Registration {
        let mut m = self.0.write().unwrap_or_else(PoisonError::into_inner);
        m.insert(dir.to_path_buf(), Served { boot, backend });
        Registration {
            registry: self.clone(),
            dir: dir.to_path_buf(),
        }
    }

    fn get(&self, dir: &Path) -> Option<Served> {
        let m = self.0.read().unwrap_or_else(PoisonError::into_inner);
        m.get(dir).cloned()
    }
}

/// Serves chunk reads to image servers on `listener` until `stop`.
pub async fn serve(
    listener: ControlListener,
    policy: Policy,
    registry: Registry,
    stop: CancellationToken,
) {
    let path = listener.path().to_owned();
    let incoming = listener.into_incoming(policy);
    tokio::pin!(incoming);
    let conns = tokio_util::task::TaskTracker::new();
    loop {
        let next = tokio::select! {
            n = futures::StreamExt::next(&mut incoming) => n,
            _ = stop.cancelled() => None,
        };
        let Some(Ok(stream)) = next else {
            break;
        };
        let (registry, stop) = (registry.clone(), stop.clone());
        conns.spawn(async move {
            tokio::select! {
                r = connection(stream, registry) => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "image server connection ended");
                    }
                }
                _ = stop.cancelled() => {}
            }
        });
    }
    conns.close();
    conns.wait().await;
    let _ = std::fs::remove_file(&path);
}

async fn connection(mut s: UnixStream, registry: Registry) -> std::io::Result<()> {
    loop {
        let op = match s.read_u8().await {
            Ok(op) => op,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        if op != OP_READ && op != OP_READ_INDEX {
            return Err(std::io::Error::other(format!("unknown operation {op}")));
        }
        let len = s.read_u16().await? as usize;
        if len > MAX_DIR {
            return Err(std::io::Error::other("mount point path too long"));
        }
        let mut dir = vec![0u8; len];
        s.read_exact(&mut dir).await?;
        let dir = PathBuf::from(String::from_utf8_lossy(&dir).into_owned());
        let blob_index = s.read_u32().await?;
        let at = s.read_u64().await?;
        let which = if op == OP_READ {
            Which::Offset(at)
        } else {
            Which::Index(at)
        };
        let (status, payload) = match registry.get(&dir) {
            None => (ST_UNKNOWN, Vec::new()),
            Some(served) => {
                match tokio::task::spawn_blocking(move || read(&served, blob_index, which)).await {
                    Ok(Ok(bytes)) => (ST_OK, bytes),
                    Ok(Err(e)) => (ST_FAILED, e.into_bytes()),
                    Err(e) => (ST_FAILED, e.to_string().into_bytes()),
                }
            }
        };
        let mut head = [0u8; 5];
        head[0] = status;
        head[1..].copy_from_slice(&(payload.len() as u32).to_be_bytes());
        s.write_all(&head).await?;
        s.write_all(&payload).await?;
    }
}

/// How a request names its chunk.
#[derive(Clone, Copy, Debug)]
enum Which {
    /// By stored offset (a chunk stored on its own).
    Offset(u64),
    /// By index in the blob's chunk table.
    Index(u64),
}

/// One chunk's decoded, verified bytes through the mount's backend (blocking).
fn read(served: &Served, blob_index: u32, which: Which) -> Result<Vec<u8>, String> {
    let blob = served
        .boot
        .blobs()
        .get(blob_index as usize)
        .ok_or_else(|| format!("no blob {blob_index} in the image"))?;
    let chunk = match which {
        Which::Offset(offset) => served
            .backend
            .chunk_at(blob_index, offset)
            .ok_or_else(|| format!("no chunk at offset {offset} of blob {blob_index}"))?
            .clone(),
        Which::Index(index) => {
            let index = u32::try_from(index).map_err(|_| format!("no chunk {index}"))?;
            served
                .boot
                .chunk(blob_index, index)
                .map_err(|e| format!("blob {blob_index}: {e}"))?
        }
    };
    served
        .backend
        .read_chunk(blob, &chunk)
        .map(VerifiedChunk::into_bytes)
        .map_err(|e| e.to_string())
}

// ------------------------------------------------------------------------------ server side

/// The image server's [`ChunkSource`]: chunks from the node, verified here again.
pub struct RemoteChunks {
    socket: PathBuf,
    dir: String,
    pool: Mutex<Vec<StdUnixStream>>,
    patience: Duration,
}

/// A node's answer.
enum Answer {
    Bytes(Vec<u8>),
    Failed(String),
    /// No such mount: the node is (re)starting and has not restored it yet.
    Unknown,
}

impl RemoteChunks {
    pub fn new(socket: PathBuf, dir: &Path, patience: Duration) -> Self {
        RemoteChunks {
            socket,
            dir: dir.to_string_lossy().into_owned(),
            pool: Mutex::new(Vec::new()),
            patience,
        }
    }

    fn ask(&self, blob_index: u32, which: Which) -> std::io::Result<Answer> {
        let pooled = self
            .pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let mut s = match pooled {
            Some(s) => s,
            None => StdUnixStream::connect(&self.socket)?,
        };
        let mut req = Vec::with_capacity(19 + self.dir.len());
        let (op, at) = match which {
            Which::Offset(o) => (OP_READ, o),
            Which::Index(i) => (OP_READ_INDEX, i),
        };
        req.push(op);
        req.extend_from_slice(&(self.dir.len() as u16).to_be_bytes());
        req.extend_from_slice(self.dir.as_bytes());
        req.extend_from_slice(&blob_index.to_be_bytes());
        req.extend_from_slice(&at.to_be_bytes());
        s.write_all(&req)?;
        let mut head = [0u8; 5];
        s.read_exact(&mut head)?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if len > shoal_rafs::MAX_CHUNK_SIZE as usize + 4096 {
            return Err(std::io::Error::other("answer larger than a chunk"));
        }
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload)?;
        let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        if pool.len() < POOL {
            pool.push(s);
        }
        Ok(match head[0] {
            ST_OK => Answer::Bytes(payload),
            ST_UNKNOWN => Answer::Unknown,
            _ => Answer::Failed(String::from_utf8_lossy(&payload).into_owned()),
        })
    }
}

impl ChunkSource for RemoteChunks {
    fn read_chunk(&self, blob: &BlobInfo, chunk: &ChunkRef) -> shoal_rafs::Result<VerifiedChunk> {
        let fail = |reason: String| shoal_rafs::Error::Io {
            path: self.socket.clone(),
            source: std::io::Error::other(reason),
        };
        let started = Instant::now();
        let mut wait = Duration::from_millis(50);
        let mut warned = false;
        loop {
            // A batched chunk (placed or not) is named by its index: its stored offset is
            // its batch's.
            let which = if chunk.batch.is_some() || !chunk.is_located() {
                Which::Index(chunk.ci_index.into())
            } else {
                Which::Offset(chunk.compressed_offset)
            };
            let why = match self.ask(blob.index, which) {
                Ok(Answer::Bytes(b)) => return verify_decoded(blob, chunk, b),
                Ok(Answer::Failed(reason)) => return Err(fail(reason)),
                Ok(Answer::Unknown) => "the node does not serve this mount (yet)".to_owned(),
                Err(e) => e.to_string(),
            };
            if started.elapsed() >= self.patience {
                return Err(fail(format!("the node did not come back: {why}")));
            }
            if !warned {
                tracing::warn!(reason = %why, "waiting for the node");
                warned = true;
            }
            std::thread::sleep(wait);
            wait = (wait * 2).min(Duration::from_secs(1));
        }
    }
}

// ------------------------------------------------------------------------------ processes

/// A running image server: the mount at `dir` lives as long as it does.
pub struct ServerProcess {
    pid: u32,
    dir: PathBuf,
    /// Where its pid is kept for the next node.
    state: PathBuf,
    stats: Arc<FuseStats>,
}

/// What an image server is started with.
pub struct Start<'a> {
    pub bootstrap: &'a Path,
    pub dir: &'a Path,
    pub mode: MountMode,
    /// EROFS mode: where its blob files are served.
    pub blobs_dir: &'a Path,
    pub socket: &'a Path,
    /// Where to keep its pid.
    pub state: &'a Path,
}

impl ServerProcess {
    /// The server already running for `dir` (a node before this one started it, its pid kept in
    /// `state`), if any.
    pub fn adopt(dir: &Path, state: &Path) -> Option<ServerProcess> {
        let pid: u32 = std::fs::read_to_string(state).ok()?.trim().parse().ok()?;
        // Ours: run by this node's user (a recycled pid of someone else's process is not).
        let owner =
            std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(format!("/proc/{pid}")).ok()?);
        if owner != rustix::process::geteuid().as_raw() {
            return None;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let ours = args.get(1) == Some(&&b"image-server"[..])
            && args.contains(&dir.as_os_str().as_encoded_bytes());
        ours.then(|| ServerProcess {
            pid,
            dir: dir.to_path_buf(),
            state: state.to_path_buf(),
            stats: Arc::new(FuseStats::default()),
        })
    }

    /// Starts an image server for `s.dir` (blocking: until it mounted, or failed to).
    pub fn start(s: &Start<'_>) -> Result<ServerProcess, MountError> {
        let fail = |reason: String| MountError::Dir {
            dir: s.dir.to_path_buf(),
            reason: format!("image server: {reason}"),
        };
        let exe = std::env::current_exe().map_err(|e| fail(e.to_string()))?;
        let mut cmd = Command::new(exe);
        cmd.arg("image-server")
            .arg("--bootstrap")
            .arg(s.bootstrap)
            .arg("--dir")
            .arg(s.dir)
            .arg("--mode")
            .arg(s.mode.to_string())
            .arg("--blobs-dir")
            .arg(s.blobs_dir)
            .arg("--socket")
            .arg(s.socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // Its own process group: signals for the node's group (a terminal's ^C, a supervisor
        // stopping the node) do not reach it.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().map_err(|e| fail(e.to_string()))?;
        let pid = child.id();
        let Some(stdout) = child.stdout.take() else {
            return Err(fail("no stdout".into()));
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(START_TIMEOUT).unwrap_or_default();
        // Reap it whenever it ends, so it never lingers as a zombie.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        if line.trim() != "ready" {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(pid as i32).ok_or_else(|| fail("pid 0".into()))?,
                rustix::process::Signal::KILL,
            );
            return Err(fail(if line.is_empty() {
                "ended or did not answer before mounting (see the node's log)".into()
            } else {
                line.trim().to_owned()
            }));
        }
        if let Some(parent) = s.state.parent() {
            std::fs::create_dir_all(parent).map_err(|e| fail(e.to_string()))?;
        }
        std::fs::write(s.state, pid.to_string()).map_err(|e| fail(e.to_string()))?;
        Ok(ServerProcess {
            pid,
            dir: s.dir.to_path_buf(),
            state: s.state.to_path_buf(),
            stats: Arc::new(FuseStats::default()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Read counters: the server's own are not seen here (the node counts chunks instead).
    pub fn stats(&self) -> &Arc<FuseStats> {
        &self.stats
    }

    /// Stops the server, which unmounts (blocking, up to 10 s, then it is killed).
    pub fn stop(self) -> Result<(), MountError> {
        let Some(pid) = rustix::process::Pid::from_raw(self.pid as i32) else {
            return Ok(());
        };
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{}", self.pid)).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if Path::new(&format!("/proc/{}", self.pid)).exists() {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
        let _ = std::fs::remove_file(&self.state);
        Ok(())
    }

    /// Leaves the server running (the node is going away; containers still use the mount).
    pub fn keep(self) {}
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn paths_next_to_their_owners() {
        assert_eq!(
            socket_for(Path::new("/run/shoal/control.sock")),
            Path::new("/run/shoal/chunks.sock")
        );
        assert!(ServerProcess::adopt(
            Path::new("/nonexistent/mount"),
            Path::new("/nonexistent/state")
        )
        .is_none());
    }
}
