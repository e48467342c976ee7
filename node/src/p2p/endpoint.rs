//! The node's one quinn endpoint (it listens and dials) and the QUIC
//! transport limits of its connections.
//!
//! The flow-control windows are what bound a sender's buffering for a slow
//! receiver: a stream may carry at most `stream_window` bytes beyond what
//! the receiving application consumed, a connection `connection_window`.
//! Dialed connections accept no streams from the listener (requests go one
//! way: dialer → listener), listeners at most `MAX_REQUEST_STREAMS` at once.

use std::sync::Arc;

use quinn::{Endpoint, IdleTimeout, TransportConfig, VarInt};
use shoal_proto::NodeId;

use super::tls::{NodeCert, TlsError};
use super::{P2pConfig, StartError};

/// Concurrent request streams a peer may open on one connection (requests
/// past the upload slots are answered `Busy`; past this, opening a stream
/// waits).
pub const MAX_REQUEST_STREAMS: u32 = 256;

/// Binds the endpoint to `cfg.listen`, serving with `cert`.
pub fn bind(cfg: &P2pConfig, cert: &NodeCert) -> Result<Endpoint, StartError> {
    let mut server = cert.server_config()?;
    server.transport_config(Arc::new(transport(cfg, true)));
    Endpoint::server(server, cfg.listen).map_err(|source| StartError::Bind {
        addr: cfg.listen,
        source,
    })
}

/// The client config for dialing `peer`.
pub fn client_config(
    cfg: &P2pConfig,
    cert: &NodeCert,
    peer: NodeId,
) -> Result<quinn::ClientConfig, TlsError> {
    let mut client = cert.client_config(peer)?;
    client.transport_config(Arc::new(transport(cfg, false)));
    Ok(client)
}

fn transport(cfg: &P2pConfig, listening: bool) -> TransportConfig {
    let mut t = TransportConfig::default();
    // `validate` keeps these in range; the fallbacks are never used.
    t.max_idle_timeout(IdleTimeout::try_from(cfg.idle_timeout).ok());
    t.keep_alive_interval(Some(cfg.keep_alive));
    t.stream_receive_window(VarInt::from_u64(cfg.stream_window).unwrap_or(VarInt::MAX));
    t.receive_window(VarInt::from_u64(cfg.connection_window).unwrap_or(VarInt::MAX));
    t.send_window(cfg.connection_window);
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t.max_concurrent_bidi_streams(VarInt::from_u32(if listening {
        MAX_REQUEST_STREAMS
    } else {
        0
    }));
    t
}
