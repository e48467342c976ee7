//! Where a node's QUIC data plane is reachable, as the DHT carries it.
//!
//! A provider record names a libp2p peer, but blobs move over QUIC, on
//! another port (and maybe another address) than the libp2p TCP listener.
//! Two sources give a peer's QUIC address:
//!
//! - **identify**: the agent version is `shoal/<version> quic=<ip:port>`.
//!   It arrives over the peer's own noise session, so it is authentic; an
//!   unspecified IP (`0.0.0.0`) is replaced by the IP of that connection.
//!   Only peers we are connected to send it.
//! - **a signed DHT record** for the peers we are not connected to: key
//!   [`record_key`] = `/shoal/node/` ‖ node id (32 bytes), value
//!   [`AddrRecord::encode`] =
//!   `1u8 ‖ seq u64 BE ‖ family u8 (4|6) ‖ ip ‖ port u16 BE ‖ ed25519 sig`,
//!   signed by the node's own key over `shoal-quic-addr-v1 ‖ node id ‖ the
//!   bytes before the signature`. `seq` is the publisher's clock in
//!   milliseconds: a record replaces a stored one only if it is not older.
//!
//! Invariant: [`AddrRecord::verify`] accepts a value only under the key of
//! the node that signed it, so a member cannot point another node's id at
//! its own address. (It could not impersonate the node anyway: the data
//! plane's TLS is bound to the node id; the signature keeps lookups from
//! being sent to the wrong place.)

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use libp2p::identity::{ed25519, Keypair};
use shoal_proto::NodeId;

/// Prefix of the address record keys.
pub const RECORD_PREFIX: &[u8] = b"/shoal/node/";
const SIGN_LABEL: &[u8] = b"shoal-quic-addr-v1";
const VERSION: u8 = 1;
const SIG_LEN: usize = 64;
const AGENT_QUIC: &str = " quic=";

/// A node's QUIC address at a point in its clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddrRecord {
    pub addr: SocketAddr,
    /// Milliseconds since the Unix epoch when it was published.
    pub seq: u64,
}

/// The DHT key of `node`'s address record.
pub fn record_key(node: &NodeId) -> Vec<u8> {
    [RECORD_PREFIX, node.as_bytes()].concat()
}

/// The node id an address record key names, if it is one.
pub fn node_of_key(key: &[u8]) -> Option<NodeId> {
    let id: [u8; 32] = key.strip_prefix(RECORD_PREFIX)?.try_into().ok()?;
    Some(NodeId::from_bytes(id))
}

impl AddrRecord {
    /// The signed value, or `None` if `keypair` is not ed25519.
    pub fn encode(&self, node: &NodeId, keypair: &Keypair) -> Option<Vec<u8>> {
        let mut out = vec![VERSION];
        out.extend_from_slice(&self.seq.to_be_bytes());
        match self.addr.ip() {
            IpAddr::V4(ip) => {
                out.push(4);
                out.extend_from_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                out.push(6);
                out.extend_from_slice(&ip.octets());
            }
        }
        out.extend_from_slice(&self.addr.port().to_be_bytes());
        let sig = keypair.sign(&signed_bytes(node, &out)).ok()?;
        out.extend_from_slice(&sig);
        Some(out)
    }

    /// Parses a value stored under `node`'s key and checks its signature.
    pub fn verify(node: &NodeId, value: &[u8]) -> Option<Self> {
        let split = value.len().checked_sub(SIG_LEN)?;
        let (body, sig) = value.split_at(split);
        let key = ed25519::PublicKey::try_from_bytes(node.as_bytes()).ok()?;
        if !key.verify(&signed_bytes(node, body), sig) {
            return None;
        }
        let (&version, rest) = body.split_first()?;
        if version != VERSION || rest.len() < 9 {
            return None;
        }
        let (seq, rest) = rest.split_at(8);
        let seq = u64::from_be_bytes(seq.try_into().ok()?);
        let (&family, rest) = rest.split_first()?;
        let (ip, port): (IpAddr, &[u8]) = match (family, rest.len()) {
            (4, 6) => {
                let octets: [u8; 4] = rest[..4].try_into().ok()?;
                (Ipv4Addr::from(octets).into(), &rest[4..])
            }
            (6, 18) => {
                let octets: [u8; 16] = rest[..16].try_into().ok()?;
                (Ipv6Addr::from(octets).into(), &rest[16..])
            }
            _ => return None,
        };
        let port = u16::from_be_bytes(port.try_into().ok()?);
        Some(Self {
            addr: SocketAddr::new(ip, port),
            seq,
        })
    }
}

fn signed_bytes(node: &NodeId, body: &[u8]) -> Vec<u8> {
    [SIGN_LABEL, node.as_bytes(), body].concat()
}

/// The identify agent version announcing `quic`.
pub fn agent_version(quic: SocketAddr) -> String {
    format!("shoal/{}{AGENT_QUIC}{quic}", env!("CARGO_PKG_VERSION"))
}

/// The QUIC address in a peer's agent version; an unspecified IP is
/// replaced by `conn_ip`, the IP of the connection it came over.
pub fn parse_agent(agent: &str, conn_ip: Option<IpAddr>) -> Option<SocketAddr> {
    let (_, addr) = agent.rsplit_once(AGENT_QUIC)?;
    let mut addr: SocketAddr = addr.parse().ok()?;
    if addr.ip().is_unspecified() {
        addr.set_ip(conn_ip?);
    }
    (addr.port() != 0).then_some(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_records_round_trip_and_bind_the_node() {
        let kp = Keypair::generate_ed25519();
        let node = crate::p2p::dht::node_id_of(&kp.public().to_peer_id()).expect("ed25519");
        for addr in ["10.1.2.3:5052", "[fd00::1]:7000"] {
            let rec = AddrRecord {
                addr: addr.parse().expect("addr"),
                seq: 42,
            };
            let value = rec.encode(&node, &kp).expect("sign");
            assert_eq!(AddrRecord::verify(&node, &value), Some(rec));
            let other = NodeId::from_bytes([7; 32]);
            assert_eq!(AddrRecord::verify(&other, &value), None);
            let mut tampered = value.clone();
            tampered[3] ^= 1;
            assert_eq!(AddrRecord::verify(&node, &tampered), None);
            for len in 0..value.len() {
                assert_eq!(AddrRecord::verify(&node, &value[..len]), None);
            }
        }
        assert_eq!(node_of_key(&record_key(&node)), Some(node));
        assert_eq!(node_of_key(b"/shoal/node/short"), None);
        assert_eq!(node_of_key(&[0; 44]), None);
    }

    #[test]
    fn agent_versions() {
        let quic: SocketAddr = "0.0.0.0:5052".parse().expect("addr");
        let agent = agent_version(quic);
        assert!(agent.starts_with("shoal/"));
        let ip: IpAddr = "10.0.0.9".parse().expect("ip");
        assert_eq!(
            parse_agent(&agent, Some(ip)),
            Some(SocketAddr::new(ip, 5052))
        );
        assert_eq!(parse_agent(&agent, None), None);
        let fixed = agent_version("10.0.0.1:6000".parse().expect("addr"));
        assert_eq!(
            parse_agent(&fixed, Some(ip)),
            Some("10.0.0.1:6000".parse().expect("addr"))
        );
        assert_eq!(parse_agent("rust-libp2p/0.1", Some(ip)), None);
        assert_eq!(parse_agent("shoal/1 quic=1.2.3.4:0", Some(ip)), None);
    }
}
