//! Node identities: a node's ed25519 public key (32 bytes), generated once
//! and kept in its data directory.
//!
//! Invariant: a [`NodeId`] is exactly 32 bytes. Its text form is 64
//! lowercase hex characters (the parser also accepts uppercase), which is
//! also its serde form, so ids in JSON and logs look the same.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Length of a node id in bytes (an ed25519 public key).
pub const NODE_ID_LEN: usize = 32;

/// A node's identity: its ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId([u8; NODE_ID_LEN]);

/// Why a string is not a node id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("node id {input:?} must be {} hex characters", NODE_ID_LEN * 2)]
pub struct NodeIdError {
    pub input: String,
}

impl NodeId {
    pub const fn from_bytes(bytes: [u8; NODE_ID_LEN]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; NODE_ID_LEN] {
        &self.0
    }

    /// The first 8 hex characters, for logs and tables.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl From<[u8; NODE_ID_LEN]> for NodeId {
    fn from(bytes: [u8; NODE_ID_LEN]) -> Self {
        Self(bytes)
    }
}

impl FromStr for NodeId {
    type Err = NodeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; NODE_ID_LEN];
        match hex::decode_to_slice(s, &mut out) {
            Ok(()) => Ok(Self(out)),
            Err(_) => Err(NodeIdError {
                input: s.chars().take(80).collect(),
            }),
        }
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

impl Serialize for NodeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_and_prints() {
        let id = NodeId::from_bytes([0xab; 32]);
        let s = id.to_string();
        assert_eq!(s, "ab".repeat(32));
        assert_eq!(s.parse::<NodeId>(), Ok(id));
        assert_eq!(s.to_uppercase().parse::<NodeId>(), Ok(id));
        assert_eq!(id.short(), "abababab");
        assert_eq!(serde_json::to_string(&id).ok(), Some(format!("\"{s}\"")));
        assert!("ab".parse::<NodeId>().is_err());
        assert!("zz".repeat(32).parse::<NodeId>().is_err());
        assert!(serde_json::from_str::<NodeId>("\"ab\"").is_err());
    }

    proptest! {
        #[test]
        fn never_panics(s in ".{0,100}") {
            let _ = s.parse::<NodeId>();
        }

        #[test]
        fn round_trips(bytes in proptest::array::uniform32(any::<u8>())) {
            let id = NodeId::from_bytes(bytes);
            prop_assert_eq!(id.to_string().parse::<NodeId>(), Ok(id));
        }
    }
}
