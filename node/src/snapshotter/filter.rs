//! containerd's filter syntax for `List`: `field[.path] [op value]` selectors joined by `,`
//! (all must hold); several filter strings: any may hold; none: everything.
//!
//! Fields of a snapshot: `kind` (`active`, `view`, `committed`), `name`, `parent`,
//! `labels.<key>` (the key quoted when it has dots: `labels."containerd.io/snapshot.ref"`).
//! Operators: `==`, `!=`, `~=` (regular expression); a bare field means "present and not
//! empty". Values are bare (up to the next `,`) or double-quoted with backslash escapes.
//!
//! Invariant: a filter that does not parse is an error, never "match everything".

use std::collections::BTreeMap;

use regex::Regex;

/// One parsed filter string (its selectors all hold).
#[derive(Debug, Clone)]
pub struct Filter {
    selectors: Vec<Selector>,
}

#[derive(Debug, Clone)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

#[derive(Debug, Clone)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

/// The fields a filter reads.
pub struct Fields<'a> {
    pub kind: &'a str,
    pub name: &'a str,
    pub parent: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

/// Why a filter string did not parse.
#[derive(Debug, thiserror::Error)]
#[error("filter {filter:?}: {problem}")]
pub struct FilterError {
    pub filter: String,
    pub problem: String,
}

/// Parses `filters` (any may match; none: all match).
pub fn parse_all(filters: &[String]) -> Result<Vec<Filter>, FilterError> {
    filters
        .iter()
        .filter(|f| !f.trim().is_empty())
        .map(|f| Filter::parse(f))
        .collect()
}

/// Whether `fields` pass `filters` (as parsed by [`parse_all`]).
pub fn matches_any(filters: &[Filter], fields: &Fields<'_>) -> bool {
    filters.is_empty() || filters.iter().any(|f| f.matches(fields))
}

impl Filter {
    pub fn parse(text: &str) -> Result<Filter, FilterError> {
        let err = |problem: String| FilterError {
            filter: text.to_owned(),
            problem,
        };
        let mut p = Parser {
            s: text.as_bytes(),
            i: 0,
        };
        let mut selectors = Vec::new();
        loop {
            p.skip_space();
            let path = p.field_path().map_err(err)?;
            p.skip_space();
            let op = match p.operator() {
                None => Op::Present,
                Some(o) => {
                    p.skip_space();
                    let v = p.value().map_err(err)?;
                    match o {
                        "==" => Op::Equal(v),
                        "!=" => Op::NotEqual(v),
                        _ => Op::Matches(
                            Regex::new(&v).map_err(|e| err(format!("bad expression: {e}")))?,
                        ),
                    }
                }
            };
            selectors.push(Selector { path, op });
            p.skip_space();
            match p.peek() {
                None => break,
                Some(b',') => p.i += 1,
                Some(c) => return Err(err(format!("unexpected {:?}", c as char))),
            }
        }
        Ok(Filter { selectors })
    }

    pub fn matches(&self, f: &Fields<'_>) -> bool {
        self.selectors.iter().all(|s| {
            let value = field(f, &s.path);
            match &s.op {
                Op::Present => value.is_some_and(|v| !v.is_empty()),
                Op::Equal(want) => value == Some(want.as_str()),
                Op::NotEqual(want) => value != Some(want.as_str()),
                Op::Matches(re) => value.is_some_and(|v| re.is_match(v)),
            }
        })
    }
}

fn field<'a>(f: &'a Fields<'_>, path: &[String]) -> Option<&'a str> {
    let (first, rest) = path.split_first()?;
    match (first.as_str(), rest.is_empty()) {
        ("kind", true) => Some(f.kind),
        ("name", true) => Some(f.name),
        ("parent", true) => Some(f.parent),
        ("labels", false) => f.labels.get(&rest.join(".")).map(String::as_str),
        _ => None,
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            self.i += 1;
        }
    }

    fn field_path(&mut self) -> Result<Vec<String>, String> {
        let mut path = vec![self.field()?];
        while self.peek() == Some(b'.') {
            self.i += 1;
            path.push(self.field()?);
        }
        Ok(path)
    }

    fn field(&mut self) -> Result<String, String> {
        if self.peek() == Some(b'"') {
            return self.quoted();
        }
        let start = self.i;
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
        {
            self.i += 1;
        }
        if start == self.i {
            return Err(format!("a field name expected at byte {start}"));
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }

    fn operator(&mut self) -> Option<&'static str> {
        let two = self.s.get(self.i..self.i + 2)?;
        let op = match two {
            b"==" => "==",
            b"!=" => "!=",
            b"~=" => "~=",
            _ => return None,
        };
        self.i += 2;
        Some(op)
    }

    fn value(&mut self) -> Result<String, String> {
        if self.peek() == Some(b'"') {
            return self.quoted();
        }
        let start = self.i;
        while self.peek().is_some_and(|c| c != b',') {
            self.i += 1;
        }
        let v = String::from_utf8_lossy(&self.s[start..self.i])
            .trim_end()
            .to_owned();
        if v.is_empty() {
            return Err(format!("a value expected at byte {start}"));
        }
        Ok(v)
    }

    fn quoted(&mut self) -> Result<String, String> {
        let start = self.i;
        self.i += 1;
        let mut out = Vec::new();
        loop {
            let Some(c) = self.peek() else {
                return Err(format!("unterminated quote at byte {start}"));
            };
            self.i += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let Some(e) = self.peek() else {
                        return Err("a dangling backslash".into());
                    };
                    self.i += 1;
                    out.push(match e {
                        b'n' => b'\n',
                        b't' => b'\t',
                        other => other,
                    });
                }
                other => out.push(other),
            }
        }
        String::from_utf8(out).map_err(|_| "a quoted string that is not UTF-8".into())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn fields<'a>(labels: &'a BTreeMap<String, String>) -> Fields<'a> {
        Fields {
            kind: "committed",
            name: "default/3/sha256:abc",
            parent: "default/2/sha256:def",
            labels,
        }
    }

    fn ok(filters: &[&str], labels: &BTreeMap<String, String>) -> bool {
        let f: Vec<String> = filters.iter().map(|s| (*s).to_owned()).collect();
        matches_any(&parse_all(&f).unwrap(), &fields(labels))
    }

    #[test]
    fn what_containerd_sends_for_a_remote_snapshot() {
        let mut labels = BTreeMap::new();
        labels.insert(
            "containerd.io/snapshot.ref".to_owned(),
            "sha256:abc".to_owned(),
        );
        let f = r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="default/2/sha256:def""#;
        assert!(ok(&[f], &labels));
        let other =
            r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="default/9/sha256:def""#;
        assert!(!ok(&[other], &labels));
        assert!(ok(&[other, "kind==committed"], &labels), "filters are ORed");
    }

    #[test]
    fn operators_and_presence() {
        let mut labels = BTreeMap::new();
        labels.insert("a".to_owned(), "x1".to_owned());
        labels.insert("empty".to_owned(), String::new());
        assert!(ok(&[], &labels));
        assert!(ok(&["labels.a"], &labels));
        assert!(!ok(&["labels.empty"], &labels));
        assert!(!ok(&["labels.b"], &labels));
        assert!(ok(&["labels.a~=^x[0-9]$"], &labels));
        assert!(ok(&["kind!=active, name~=sha256"], &labels));
        assert!(!ok(&["kind==active"], &labels));
        assert!(ok(&[r#"labels.a=="x1""#], &labels));
        assert!(!ok(&["nosuchfield==x"], &labels));
    }

    #[test]
    fn malformed_filters_are_errors() {
        for bad in [
            "==x",
            "kind==",
            r#"labels."open"#,
            "kind==active extra,",
            "labels.a~=(",
            "kind ! x",
        ] {
            assert!(parse_all(&[bad.to_owned()]).is_err(), "{bad}");
        }
    }
}
