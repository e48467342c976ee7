//! TLS bound to node identities: each node presents a self-signed X.509
//! certificate for its own ed25519 node key, and both sides of every
//! connection authenticate (mutual TLS 1.3, rustls on ring).
//!
//! A peer's certificate is accepted only if:
//! - it is a single certificate (no chain), parsed by webpki;
//! - its key is ed25519 (that key is the peer's `NodeId`);
//! - its self-signature verifies with that key, and it is valid now;
//! - (dialing side) its `NodeId` is the one we meant to dial.
//!
//! The handshake signature (TLS 1.3 CertificateVerify) is then checked with
//! the certificate's key by rustls' `verify_tls13_signature`, so a peer
//! proves it holds the node key; there is no "skip verify" anywhere. Being a
//! node says nothing about cluster membership: that is `membership`'s job.

use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use shoal_proto::wire::ALPN;
use shoal_proto::NodeId;

use super::identity::Identity;

/// The server name a dialer puts in its ClientHello (not checked: the
/// certificate's key is what identifies a node).
pub const SERVER_NAME: &str = "shoal";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("building the node certificate")]
    Certificate(#[from] rcgen::Error),
    #[error("configuring TLS")]
    Rustls(#[from] rustls::Error),
    #[error("TLS configuration unusable for QUIC")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

/// Why a peer's certificate was refused; carried inside the rustls error
/// (and so in the QUIC close reason) for diagnosis. `Debug` is the message,
/// because rustls prints it with `Debug`.
#[derive(thiserror::Error)]
pub enum PeerCertError {
    #[error("peer certificate is not a single self-signed ed25519 certificate: {0}")]
    Invalid(String),
    #[error("peer is node {actual}, expected node {expected}")]
    WrongPeer { expected: NodeId, actual: NodeId },
}

impl std::fmt::Debug for PeerCertError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// The node's certificate and key, ready to build client and server
/// configs.
#[derive(Clone, Debug)]
pub struct NodeCert {
    cert: CertificateDer<'static>,
    key: Arc<PrivatePkcs8KeyDer<'static>>,
    provider: Arc<CryptoProvider>,
}

impl NodeCert {
    /// A self-signed certificate for `identity`'s key.
    pub fn new(identity: &Identity) -> Result<Self, TlsError> {
        let pkcs8 = ed25519_pkcs8(&identity.secret_seed());
        let key_pair = rcgen::KeyPair::try_from(pkcs8.as_slice())?;
        let mut params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_owned()])?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, identity.node_id().to_string());
        // The certificate is an identity, not a credential that expires:
        // membership (the join secret) is what can be revoked.
        params.not_before = rcgen::date_time_ymd(1975, 1, 1);
        params.not_after = rcgen::date_time_ymd(4096, 1, 1);
        let cert = params.self_signed(&key_pair)?;
        Ok(Self {
            cert: cert.der().clone(),
            key: Arc::new(PrivatePkcs8KeyDer::from(pkcs8)),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        })
    }

    /// The DER certificate presented to peers.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// Server side: requires and verifies a client certificate.
    pub fn server_config(&self) -> Result<quinn::ServerConfig, TlsError> {
        let verifier = Arc::new(PeerVerifier {
            provider: Arc::clone(&self.provider),
            expected: None,
        });
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![self.cert.clone()], self.private_key())?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let quic = QuicServerConfig::try_from(tls)?;
        Ok(quinn::ServerConfig::with_crypto(Arc::new(quic)))
    }

    /// Client side, for dialing `expected`: the server must present that
    /// node's certificate.
    pub fn client_config(&self, expected: NodeId) -> Result<quinn::ClientConfig, TlsError> {
        let verifier = Arc::new(PeerVerifier {
            provider: Arc::clone(&self.provider),
            expected: Some(expected),
        });
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(vec![self.cert.clone()], self.private_key())?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let quic = QuicClientConfig::try_from(tls)?;
        Ok(quinn::ClientConfig::new(Arc::new(quic)))
    }

    fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

/// The node id of the peer of an established connection (its certificate
/// was verified during the handshake).
pub fn peer_node_id(conn: &quinn::Connection) -> Option<NodeId> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    let cert = certs.first()?;
    let ee = webpki::EndEntityCert::try_from(cert).ok()?;
    ed25519_node_id(ee.subject_public_key_info().as_ref())
}

/// Checks that `cert` is a valid self-signed ed25519 certificate and
/// returns the node id it names.
pub fn verify_self_signed(
    cert: &CertificateDer<'_>,
    now: UnixTime,
) -> Result<NodeId, PeerCertError> {
    let invalid = |e: webpki::Error| PeerCertError::Invalid(e.to_string());
    let ee = webpki::EndEntityCert::try_from(cert).map_err(invalid)?;
    let node = ed25519_node_id(ee.subject_public_key_info().as_ref())
        .ok_or_else(|| PeerCertError::Invalid("key is not ed25519".to_owned()))?;
    // The certificate is its own trust anchor: path building then checks
    // its signature with its own key (ed25519 only) and its validity.
    let anchor = webpki::anchor_from_trusted_cert(cert).map_err(invalid)?;
    // Our certificates carry no extended key usage; one that does must
    // allow client authentication.
    ee.verify_for_usage(
        &[webpki::ring::ED25519],
        &[anchor],
        &[],
        now,
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map_err(invalid)?;
    Ok(node)
}

/// The DER SubjectPublicKeyInfo of an ed25519 key, before the 32 key bytes
/// (RFC 8410).
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

fn ed25519_node_id(spki: &[u8]) -> Option<NodeId> {
    let key = spki.strip_prefix(&ED25519_SPKI_PREFIX)?;
    let key: [u8; 32] = key.try_into().ok()?;
    Some(NodeId::from_bytes(key))
}

/// A PKCS#8 v1 document (RFC 8410) holding the ed25519 seed.
fn ed25519_pkcs8(seed: &[u8; 32]) -> Vec<u8> {
    const PREFIX: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    let mut der = PREFIX.to_vec();
    der.extend_from_slice(seed);
    der
}

/// Verifies peer certificates for both roles; `expected` is the node the
/// client side dialed.
#[derive(Debug)]
struct PeerVerifier {
    provider: Arc<CryptoProvider>,
    expected: Option<NodeId>,
}

impl PeerVerifier {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<NodeId, rustls::Error> {
        let other = |e: PeerCertError| {
            rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        };
        if !intermediates.is_empty() {
            return Err(other(PeerCertError::Invalid(
                "unexpected certificate chain".to_owned(),
            )));
        }
        let node = verify_self_signed(end_entity, now).map_err(other)?;
        match self.expected {
            Some(expected) if expected != node => Err(other(PeerCertError::WrongPeer {
                expected,
                actual: node,
            })),
            _ => Ok(node),
        }
    }

    fn algorithms(&self) -> &WebPkiSupportedAlgorithms {
        &self.provider.signature_verification_algorithms
    }

    // The handshake checks below are the same for both sides (rustls has
    // one trait per side); each trait impl delegates here.

    /// QUIC is TLS 1.3 only.
    fn refuse_tls12() -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    /// The CertificateVerify signature, checked with the certificate's key.
    fn tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, self.algorithms())
    }

    /// Node keys are ed25519.
    fn schemes() -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, intermediates, now)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Self::refuse_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        Self::schemes()
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, intermediates, now)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Self::refuse_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        Self::schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_names_the_node_and_verifies() {
        let identity = Identity::generate();
        let cert = NodeCert::new(&identity).expect("cert");
        let node = verify_self_signed(cert.certificate(), UnixTime::now()).expect("valid");
        assert_eq!(node, identity.node_id());
    }

    #[test]
    fn tampered_certificate_is_refused() {
        let identity = Identity::generate();
        let cert = NodeCert::new(&identity).expect("cert");
        let mut der = cert.certificate().to_vec();
        // Flip a bit in the signature (the last bytes).
        let last = der.len() - 1;
        der[last] ^= 1;
        assert!(verify_self_signed(&CertificateDer::from(der), UnixTime::now()).is_err());
    }

    #[test]
    fn a_certificate_for_another_key_is_refused() {
        // Same public key in the SPKI is impossible to fake without the
        // key; a cert signed by another key fails the self-signature.
        let a = NodeCert::new(&Identity::generate()).expect("cert");
        let b = NodeCert::new(&Identity::generate()).expect("cert");
        let a_node = verify_self_signed(a.certificate(), UnixTime::now()).expect("a");
        let b_node = verify_self_signed(b.certificate(), UnixTime::now()).expect("b");
        assert_ne!(a_node, b_node);
        let verifier = PeerVerifier {
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            expected: Some(a_node),
        };
        assert!(verifier
            .check(b.certificate(), &[], UnixTime::now())
            .is_err());
        assert!(verifier
            .check(a.certificate(), &[], UnixTime::now())
            .is_ok());
    }

    #[test]
    fn garbage_is_refused() {
        for bytes in [&b""[..], b"\x30\x00", &[0x30; 64]] {
            assert!(
                verify_self_signed(&CertificateDer::from(bytes.to_vec()), UnixTime::now()).is_err()
            );
        }
    }
}
