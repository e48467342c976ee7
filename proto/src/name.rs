//! Registry names: repository names, tags and manifest references, validated
//! with the grammar of the OCI distribution spec.
//!
//! Invariant: a [`RepoName`] contains only `[a-z0-9._/-]` in the spec's shape
//! (no empty, `.` or `..` components), so it can never address a path outside
//! the directory it is joined to.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::digest::{Digest, DigestError};

/// Longest repository name accepted (the distribution registry's limit).
pub const MAX_REPO_NAME: usize = 255;
/// Longest tag accepted (the OCI distribution spec's limit).
pub const MAX_TAG: usize = 128;

/// Why a string is not a valid name, tag or reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("repository name is empty")]
    EmptyName,
    #[error("repository name is longer than {MAX_REPO_NAME} characters")]
    NameTooLong,
    #[error("repository name component {component:?} is not [a-z0-9]+ separated by '.', '_', '__' or '-'")]
    BadComponent { component: String },
    #[error("tag {tag:?} is not [A-Za-z0-9_][A-Za-z0-9._-]{{0,127}}")]
    BadTag { tag: String },
    #[error(transparent)]
    Digest(#[from] DigestError),
}

/// A repository name such as `library/debian`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

impl RepoName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for RepoName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(NameError::EmptyName);
        }
        if s.len() > MAX_REPO_NAME {
            return Err(NameError::NameTooLong);
        }
        for component in s.split('/') {
            if !valid_component(component) {
                return Err(NameError::BadComponent {
                    component: component.chars().take(64).collect(),
                });
            }
        }
        Ok(Self(s.to_owned()))
    }
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or "-+", followed by an alnum.
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || i >= b.len() || !alnum(b[i]) {
            return false;
        }
    }
    true
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// A tag such as `latest` or `1.2.3`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Tag {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= MAX_TAG
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b[1..]
                .iter()
                .all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'_' | b'.' | b'-'));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(NameError::BadTag {
                tag: s.chars().take(64).collect(),
            })
        }
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// What follows `/manifests/`: a tag or a digest.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl FromStr for Reference {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains(':') {
            Ok(Self::Digest(s.parse()?))
        } else {
            Ok(Self::Tag(s.parse()?))
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tag(t) => t.fmt(f),
            Self::Digest(d) => d.fmt(f),
        }
    }
}

macro_rules! serde_via_str {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_via_str!(RepoName);
serde_via_str!(Tag);
serde_via_str!(Reference);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn repo_names() {
        for good in [
            "a",
            "library/debian",
            "test/python",
            "a.b_c__d---e/f0",
            "x/y/z",
        ] {
            assert!(good.parse::<RepoName>().is_ok(), "{good:?} rejected");
        }
        for bad in [
            "", "A", "a//b", "/a", "a/", "..", "a/../b", "a/./b", "-a", "a-", "a___b", "a..b",
            "a b", "a\0b", "a/b%2f",
        ] {
            assert!(bad.parse::<RepoName>().is_err(), "{bad:?} accepted");
        }
        assert!("a".repeat(256).parse::<RepoName>().is_err());
    }

    #[test]
    fn tags_and_references() {
        assert!("latest".parse::<Tag>().is_ok());
        assert!("_v1.2-rc".parse::<Tag>().is_ok());
        assert!(".hidden".parse::<Tag>().is_err());
        assert!("a".repeat(129).parse::<Tag>().is_err());
        assert!(matches!("1".parse::<Reference>(), Ok(Reference::Tag(_))));
        assert!("sha256:abc".parse::<Reference>().is_err());
    }

    proptest! {
        #[test]
        fn valid_names_never_traverse(s in "[a-z0-9._/-]{0,40}") {
            if let Ok(n) = s.parse::<RepoName>() {
                prop_assert!(n.as_str().split('/').all(|c| c != ".." && c != "." && !c.is_empty()));
            }
        }
    }
}
