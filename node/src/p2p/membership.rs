//! Cluster membership by join secret, and the connection handshake that
//! proves it.
//!
//! TLS (see `tls`) tells each side which node the other is; the join secret
//! tells whether that node belongs to the cluster. After the QUIC handshake,
//! on the first bidirectional stream (opened by the dialer), each side sends
//! a `Hello { version, node, proof }` where
//!
//! `proof = HMAC-SHA256(secret, "shoal-join-v1" || EKM || node)`
//!
//! and EKM is 32 bytes of TLS exporter keying material of this connection
//! (label `EXPORTER-shoal-join-v1`). The proof is bound to the connection, so
//! it cannot be replayed on another, and to the sender's node id (which must
//! also be the TLS peer's), so it cannot be reflected. Proofs are compared
//! in constant time.
//!
//! Order: the dialer sends its Hello; the listener checks the version (an
//! incompatible one is answered with `Error(IncompatibleVersion)`), then the
//! proof (a wrong one closes the connection with `CloseCode::JoinRefused`),
//! and only then answers with its own Hello, which the dialer checks the
//! same way. The listener serves nothing before its check passed.
//!
//! A node without a join secret does not run the data plane at all
//! (standalone); see `P2pConfig`.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hmac::{Hmac, Mac};
use quinn::Connection;
use sha2::Sha256;
use shoal_proto::wire::{CloseCode, ErrorCode, Frame, Hello, WireError, JOIN_PROOF_LEN};
use shoal_proto::NodeId;

use super::frames::{read_frame, write_frame, FrameError};

/// Shortest secret accepted, in bytes.
pub const MIN_SECRET_LEN: usize = 32;
/// Largest join secret file read.
const MAX_SECRET_FILE: u64 = 64 * 1024;
const PROOF_LABEL: &[u8] = b"shoal-join-v1";
const EXPORTER_LABEL: &[u8] = b"EXPORTER-shoal-join-v1";

/// The cluster's shared secret. Cheap to clone; never printed.
#[derive(Clone)]
pub struct JoinSecret {
    /// Keyed once; cloned per proof.
    mac: Hmac<Sha256>,
    len: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum JoinSecretError {
    #[error("join secret file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("join secret file {path} is larger than {MAX_SECRET_FILE} bytes")]
    TooLarge { path: PathBuf },
    #[error("join secret has {len} bytes; at least {MIN_SECRET_LEN} are required (e.g. `openssl rand -hex 32`)")]
    TooShort { len: usize },
}

/// How a connection handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("peer did not prove it holds the join secret")]
    Refused,
    #[error("peer refused us: it does not accept our join secret")]
    RefusedByPeer,
    #[error("incompatible protocol version: {ours} here, {theirs} on the peer")]
    IncompatibleVersion { ours: u16, theirs: u16 },
    #[error("handshake protocol error: {0}")]
    Protocol(&'static str),
    #[error("handshake frame")]
    Frame(#[from] FrameError),
    #[error("handshake timed out")]
    Timeout,
    #[error("connection lost during the handshake")]
    Connection(#[from] quinn::ConnectionError),
    #[error("TLS keying material unavailable")]
    Exporter,
}

impl JoinSecret {
    /// Reads a secret file: 64 or more hex characters (surrounding
    /// whitespace ignored) are decoded; anything else is taken as raw bytes,
    /// of which there must be at least 32.
    pub fn load(path: &Path) -> Result<Self, JoinSecretError> {
        let io = |source| JoinSecretError::Io {
            path: path.to_owned(),
            source,
        };
        let mut bytes = Vec::new();
        fs::File::open(path)
            .map_err(io)?
            .take(MAX_SECRET_FILE + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| JoinSecretError::Io {
                path: path.to_owned(),
                source,
            })?;
        if bytes.len() as u64 > MAX_SECRET_FILE {
            return Err(JoinSecretError::TooLarge {
                path: path.to_owned(),
            });
        }
        Self::parse(&bytes)
    }

    /// See `load`.
    pub fn parse(contents: &[u8]) -> Result<Self, JoinSecretError> {
        let trimmed = contents.trim_ascii();
        if trimmed.len() >= 2 * MIN_SECRET_LEN {
            if let Ok(decoded) = hex::decode(trimmed) {
                return Self::from_bytes(&decoded);
            }
        }
        Self::from_bytes(contents)
    }

    /// A secret of raw bytes (at least 32).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, JoinSecretError> {
        if bytes.len() < MIN_SECRET_LEN {
            return Err(JoinSecretError::TooShort { len: bytes.len() });
        }
        // HMAC takes keys of any length; the error cannot happen.
        let mac = <Hmac<Sha256> as Mac>::new_from_slice(bytes)
            .map_err(|_| JoinSecretError::TooShort { len: bytes.len() })?;
        Ok(Self {
            mac,
            len: bytes.len(),
        })
    }

    /// A 32-byte key for another use of the secret (`label` names the use,
    /// e.g. the DHT's private-network key), so the raw secret never leaves
    /// this type: HMAC-SHA256(secret, "shoal-derive-v1" ‖ label).
    pub fn derive_key(&self, label: &str) -> [u8; 32] {
        let mut mac = self.mac.clone();
        mac.update(b"shoal-derive-v1");
        mac.update(label.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// Length of the secret in bytes.
    pub fn key_len(&self) -> usize {
        self.len
    }

    fn mac(&self, ekm: &[u8], node: &NodeId) -> Hmac<Sha256> {
        let mut mac = self.mac.clone();
        mac.update(PROOF_LABEL);
        mac.update(ekm);
        mac.update(node.as_bytes());
        mac
    }

    /// The proof `node` sends on a connection with keying material `ekm`.
    pub fn proof(&self, ekm: &[u8], node: &NodeId) -> [u8; JOIN_PROOF_LEN] {
        self.mac(ekm, node).finalize().into_bytes().into()
    }

    /// Checks a proof in constant time.
    pub fn verify(&self, ekm: &[u8], node: &NodeId, proof: &[u8]) -> bool {
        self.mac(ekm, node).verify_slice(proof).is_ok()
    }
}

impl std::fmt::Debug for JoinSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JoinSecret(..)")
    }
}

/// What both sides of a handshake need.
#[derive(Clone, Debug)]
pub struct Membership {
    pub secret: JoinSecret,
    pub local: NodeId,
    /// `PROTOCOL_VERSION`, except in tests of version negotiation.
    pub version: u16,
    pub timeout: Duration,
}

impl Membership {
    /// Dialer side: prove membership to `peer` and check its proof. On
    /// failure the connection is closed with the matching code.
    pub async fn dial(&self, conn: &Connection, peer: NodeId) -> Result<(), HandshakeError> {
        let result = tokio::time::timeout(self.timeout, self.dial_inner(conn, peer))
            .await
            .unwrap_or(Err(HandshakeError::Timeout));
        if let Err(e) = &result {
            close_for(conn, e);
        }
        result
    }

    /// Listener side: check the dialer's proof, then prove ours. Returns the
    /// peer's node id. On failure the connection is closed with the matching
    /// code (after telling a peer of another version which one we speak).
    pub async fn accept(&self, conn: &Connection) -> Result<NodeId, HandshakeError> {
        let result = tokio::time::timeout(self.timeout, self.accept_inner(conn))
            .await
            .unwrap_or(Err(HandshakeError::Timeout));
        if let Err(e) = &result {
            close_for(conn, e);
        }
        result
    }

    async fn dial_inner(&self, conn: &Connection, peer: NodeId) -> Result<(), HandshakeError> {
        let ekm = exporter(conn)?;
        let (mut send, mut recv) = conn.open_bi().await?;
        let hello = self.hello(&ekm);
        write_frame(&mut send, &Frame::Hello(hello))
            .await
            .map_err(|e| refused_by_close(e, conn))?;
        let _ = send.finish();
        let reply = read_frame(&mut recv)
            .await
            .map_err(|e| refused_by_close(e, conn))?;
        self.check_hello(reply, &ekm, peer)
    }

    async fn accept_inner(&self, conn: &Connection) -> Result<NodeId, HandshakeError> {
        let peer = super::tls::peer_node_id(conn).ok_or(HandshakeError::Protocol(
            "peer certificate missing after the TLS handshake",
        ))?;
        let ekm = exporter(conn)?;
        let (mut send, mut recv) = conn.accept_bi().await?;
        let first = match read_frame(&mut recv).await {
            Err(FrameError::Wire(WireError::IncompatibleVersion { theirs, .. })) => {
                return Err(self.refuse_version(&mut send, theirs).await)
            }
            Ok(Frame::Hello(hello)) if hello.version != self.version => {
                return Err(self.refuse_version(&mut send, hello.version).await)
            }
            other => other?,
        };
        self.check_hello(first, &ekm, peer)?;
        write_frame(&mut send, &Frame::Hello(self.hello(&ekm))).await?;
        let _ = send.finish();
        Ok(peer)
    }

    /// Tells a peer of version `theirs` which one we speak, and gives it a
    /// moment to read that before the connection is closed.
    async fn refuse_version(&self, send: &mut quinn::SendStream, theirs: u16) -> HandshakeError {
        let code = ErrorCode::IncompatibleVersion {
            ours: self.version,
            theirs,
        };
        if write_frame(send, &Frame::Error(code)).await.is_ok() && send.finish().is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
        }
        HandshakeError::IncompatibleVersion {
            ours: self.version,
            theirs,
        }
    }

    fn hello(&self, ekm: &[u8]) -> Hello {
        Hello {
            version: self.version,
            node: self.local,
            proof: self.secret.proof(ekm, &self.local),
        }
    }

    /// Checks a peer's first frame: a Hello of our version from the TLS
    /// peer with a valid proof.
    fn check_hello(&self, frame: Frame, ekm: &[u8], peer: NodeId) -> Result<(), HandshakeError> {
        let hello = match frame {
            Frame::Hello(hello) => hello,
            Frame::Error(ErrorCode::IncompatibleVersion { ours, theirs: _ }) => {
                return Err(HandshakeError::IncompatibleVersion {
                    ours: self.version,
                    theirs: ours,
                })
            }
            Frame::Error(ErrorCode::JoinRefused) => return Err(HandshakeError::RefusedByPeer),
            _ => return Err(HandshakeError::Protocol("expected Hello")),
        };
        // `decode` refuses other versions of this build's; a test node
        // speaking another version compares here.
        if hello.version != self.version {
            return Err(HandshakeError::IncompatibleVersion {
                ours: self.version,
                theirs: hello.version,
            });
        }
        if hello.node != peer {
            return Err(HandshakeError::Protocol(
                "Hello names another node than the TLS certificate",
            ));
        }
        if !self.secret.verify(ekm, &peer, &hello.proof) {
            return Err(HandshakeError::Refused);
        }
        Ok(())
    }
}

/// A read or write that failed because the peer closed the connection:
/// map its close code.
fn refused_by_close(e: FrameError, conn: &Connection) -> HandshakeError {
    if let Some(quinn::ConnectionError::ApplicationClosed(close)) = conn.close_reason() {
        if CloseCode::from_u64(close.error_code.into_inner()) == CloseCode::JoinRefused {
            return HandshakeError::RefusedByPeer;
        }
    }
    HandshakeError::Frame(e)
}

fn exporter(conn: &Connection) -> Result<[u8; 32], HandshakeError> {
    let mut ekm = [0u8; 32];
    conn.export_keying_material(&mut ekm, EXPORTER_LABEL, b"")
        .map_err(|_| HandshakeError::Exporter)?;
    Ok(ekm)
}

/// Closes `conn` with the code that says why the handshake failed.
fn close_for(conn: &Connection, e: &HandshakeError) {
    let (code, reason): (CloseCode, &[u8]) = match e {
        HandshakeError::Refused => (CloseCode::JoinRefused, b"join secret not proven"),
        HandshakeError::IncompatibleVersion { .. } => (
            CloseCode::IncompatibleVersion,
            b"incompatible protocol version",
        ),
        HandshakeError::Timeout => (CloseCode::HandshakeTimeout, b"handshake timed out"),
        HandshakeError::RefusedByPeer | HandshakeError::Connection(_) => return,
        HandshakeError::Protocol(_) | HandshakeError::Frame(_) | HandshakeError::Exporter => {
            (CloseCode::Protocol, b"handshake protocol error")
        }
    };
    conn.close(code.to_u32().into(), reason);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_file_forms() {
        let hex64 = "ab".repeat(32);
        let s = JoinSecret::parse(format!("{hex64}\n").as_bytes()).expect("hex");
        let same = JoinSecret::from_bytes(&[0xab; 32]).expect("raw");
        assert_eq!(
            s.proof(&[0; 32], &NodeId::from_bytes([0; 32])),
            same.proof(&[0; 32], &NodeId::from_bytes([0; 32]))
        );
        assert_eq!(JoinSecret::parse(&[7u8; 40]).expect("raw").key_len(), 40);
        assert!(matches!(
            JoinSecret::parse(b"short"),
            Err(JoinSecretError::TooShort { len: 5 })
        ));
        // 40 hex chars = 20 bytes decoded would be too short, so they are
        // taken as 40 raw bytes.
        let hex40 = "cd".repeat(20);
        assert_eq!(
            JoinSecret::parse(hex40.as_bytes()).expect("raw").key_len(),
            40
        );
        assert_eq!(format!("{s:?}"), "JoinSecret(..)");
    }

    #[test]
    fn proofs_bind_secret_connection_and_node() {
        let a = JoinSecret::from_bytes(&[1; 32]).expect("secret");
        let b = JoinSecret::from_bytes(&[2; 32]).expect("secret");
        let (n1, n2) = (NodeId::from_bytes([1; 32]), NodeId::from_bytes([2; 32]));
        let proof = a.proof(&[9; 32], &n1);
        assert!(a.verify(&[9; 32], &n1, &proof));
        assert!(!b.verify(&[9; 32], &n1, &proof));
        assert!(!a.verify(&[8; 32], &n1, &proof));
        assert!(!a.verify(&[9; 32], &n2, &proof));
        assert!(!a.verify(&[9; 32], &n1, &proof[..31]));
    }
}
