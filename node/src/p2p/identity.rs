//! `Identity`: the node's ed25519 keypair, generated once and kept in
//! `<data_dir>/node.key`. Its public key is the node's `NodeId`, the key of
//! the certificate it presents to peers (see `tls`), and its libp2p `PeerId`.
//!
//! Invariants:
//! - The key file is written atomically (temporary file with mode 0600,
//!   fsync, rename, fsync of the directory): a crash leaves the old key or
//!   the new one, never a torn file.
//! - A key file readable by group or others is refused, not silently used.
//! - The secret never appears in `Debug` output or errors.
//!
//! The file holds libp2p's protobuf encoding of the keypair, so the libp2p
//! stack (DHT, identify) can use the same identity directly.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use libp2p_identity::{ed25519, Keypair, PeerId};
use shoal_proto::NodeId;

/// Name of the key file inside the data directory.
pub const KEY_FILE: &str = "node.key";

/// A node's keypair. Cheap to clone.
#[derive(Clone)]
pub struct Identity {
    keypair: ed25519::Keypair,
    node_id: NodeId,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("node key {path}: I/O error")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("node key {path} is not a libp2p ed25519 keypair")]
    Corrupt { path: PathBuf },
    #[error(
        "node key {path} has mode {mode:o}; it must not be readable by group or others (chmod 600)"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{node} is not an ed25519 public key")]
    NotAKey { node: NodeId },
}

impl Identity {
    /// A new random identity (not stored).
    pub fn generate() -> Self {
        Self::from_keypair(ed25519::Keypair::generate())
    }

    /// Loads `<data_dir>/node.key`, or generates and stores a new identity
    /// if there is none (creating `data_dir` if needed).
    pub fn load_or_generate(data_dir: &Path) -> Result<Self, IdentityError> {
        let path = data_dir.join(KEY_FILE);
        match Self::load(&path) {
            Ok(identity) => return Ok(identity),
            Err(IdentityError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        fs::create_dir_all(data_dir).map_err(io_err(data_dir))?;
        let identity = Self::generate();
        identity.store(&path)?;
        tracing::info!(node = %identity.node_id, path = %path.display(), "generated node identity");
        Ok(identity)
    }

    /// Loads an identity from a key file written by `load_or_generate`.
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let meta = fs::metadata(path).map_err(io_err(path))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(IdentityError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
        let bytes = fs::read(path).map_err(io_err(path))?;
        let corrupt = || IdentityError::Corrupt {
            path: path.to_owned(),
        };
        let keypair = Keypair::from_protobuf_encoding(&bytes).map_err(|_| corrupt())?;
        let keypair = keypair.try_into_ed25519().map_err(|_| corrupt())?;
        Ok(Self::from_keypair(keypair))
    }

    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    pub fn peer_id(&self) -> PeerId {
        self.keypair().public().to_peer_id()
    }

    /// The keypair as libp2p takes it.
    pub fn keypair(&self) -> Keypair {
        Keypair::from(self.keypair.clone())
    }

    /// The 32-byte ed25519 secret (seed), for building the TLS key.
    pub(crate) fn secret_seed(&self) -> [u8; 32] {
        let mut seed = [0u8; 32];
        seed.copy_from_slice(&self.keypair.to_bytes()[..32]);
        seed
    }

    fn from_keypair(keypair: ed25519::Keypair) -> Self {
        let node_id = NodeId::from_bytes(keypair.public().to_bytes());
        Self { keypair, node_id }
    }

    fn store(&self, path: &Path) -> Result<(), IdentityError> {
        let encoded =
            self.keypair()
                .to_protobuf_encoding()
                .map_err(|_| IdentityError::Corrupt {
                    path: path.to_owned(),
                })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let tmp = dir.join(format!(".{KEY_FILE}.tmp.{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        let written = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(&encoded)?;
            file.sync_all()?;
            fs::rename(&tmp, path)?;
            File::open(dir)?.sync_all()
        })();
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written.map_err(io_err(path))
    }
}

/// The libp2p `PeerId` of a node id.
pub fn peer_id_of(node: &NodeId) -> Result<PeerId, IdentityError> {
    let key = ed25519::PublicKey::try_from_bytes(node.as_bytes())
        .map_err(|_| IdentityError::NotAKey { node: *node })?;
    Ok(libp2p_identity::PublicKey::from(key).to_peer_id())
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_then_loaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let first = Identity::load_or_generate(&data).expect("generate");
        let again = Identity::load_or_generate(&data).expect("load");
        assert_eq!(first.node_id(), again.node_id());
        assert_eq!(first.peer_id(), again.peer_id());
        assert_eq!(
            peer_id_of(&first.node_id()).expect("peer id"),
            first.peer_id()
        );
        let mode = fs::metadata(data.join(KEY_FILE))
            .expect("key file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(&data).expect("read dir").count(), 1);
        assert!(!format!("{first:?}").contains(&hex::encode(first.secret_seed())));
    }

    #[test]
    fn refuses_open_permissions_and_garbage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let id = Identity::load_or_generate(dir.path()).expect("generate");
        let path = dir.path().join(KEY_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(
            Identity::load_or_generate(dir.path()),
            Err(IdentityError::Permissions { mode: 0o644, .. })
        ));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(Identity::load(&path).expect("load").node_id(), id.node_id());
        fs::write(&path, b"not a key").expect("write");
        assert!(matches!(
            Identity::load(&path),
            Err(IdentityError::Corrupt { .. })
        ));
    }
}
