//! Scheduler configuration: one TOML file (every field optional, defaults in
//! the single `Default` impl), validated into [`Config`] with errors that
//! name the offending field. `deploy/scheduler.toml` documents every
//! field and is parsed by a test.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_proto::sched::canonical_scheduler_addr;
pub use shoal_proto::units::HumanDuration;

use crate::state::{Shard, StateConfig};

/// The file form. `deny_unknown_fields` so that a typo is an error.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    /// Where nodes reach the scheduler (HTTP). Default `0.0.0.0:5060`.
    pub listen: SocketAddr,
    /// How often nodes announce. Default `2s`.
    pub heartbeat: HumanDuration,
    /// A node that has not announced for this long is forgotten. Default:
    /// 3 × `heartbeat`.
    pub node_ttl: Option<HumanDuration>,
    /// Nodes that may fetch one blob from the origin at the same time.
    /// Default `1` (each blob leaves the origin once).
    pub max_origin_leases: u32,
    /// A lease holder that shows no progress for this long loses the lease
    /// to the next asker. At least `heartbeat`. Default `10s`.
    pub lease_stall_timeout: HumanDuration,
    /// Half-life of failure blame: a node reported for a bad piece is not
    /// handed out for this long. Default `60s`.
    pub blame_decay: HumanDuration,
    /// Most holders returned per parents request. Default `16`.
    pub max_parents: usize,
    /// After start, no new lease is granted for this long, so that nodes that
    /// held leases before a restart announce them first. Default:
    /// 1.5 × `heartbeat`.
    pub lease_warmup: Option<HumanDuration>,
    /// Every scheduler of the cluster, as nodes name them (`host:port`),
    /// this one included. Blobs are split among them by rendezvous hashing.
    /// Default empty: this scheduler owns every blob.
    pub cluster: Vec<String>,
    /// This scheduler's entry in `cluster`. Required when `cluster` is set.
    pub advertise: Option<String>,
    /// The cluster's join secret (the nodes' `p2p.join_secret_file`). When
    /// set, every request but `/healthz` and `/metrics` must be signed with
    /// it (by member nodes and the CLI), reads of the status page, status
    /// JSON and jobs too (they name blobs and node addresses), and a signed
    /// request is accepted once. Default: none (anyone who can reach the
    /// port is trusted).
    pub join_secret_file: Option<PathBuf>,
    /// An operator listener: the status page, status JSON, jobs, metrics and
    /// health, read-only and unsigned, for a browser. Bind it to loopback (or
    /// put your own access control in front). Default: none.
    pub status_listen: Option<SocketAddr>,
    pub log: LogConfig,
}

impl Default for FileConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 5060)),
            heartbeat: HumanDuration(Duration::from_secs(2)),
            node_ttl: None,
            max_origin_leases: 1,
            lease_stall_timeout: HumanDuration(Duration::from_secs(10)),
            blame_decay: HumanDuration(Duration::from_secs(60)),
            max_parents: 16,
            lease_warmup: None,
            cluster: Vec::new(),
            advertise: None,
            join_secret_file: None,
            status_listen: None,
            log: LogConfig::default(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`. Default `text`.
    pub format: LogFormat,
    /// A tracing filter (`info`, `shoal_scheduler=debug,info`); `RUST_LOG`
    /// wins. Default `info`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Validated runtime configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    /// The unsigned, read-only operator listener, if any.
    pub status_listen: Option<SocketAddr>,
    /// Requests must be signed with this key (derived from the join secret).
    pub auth_key: Option<[u8; 32]>,
    pub state: StateConfig,
    pub log: LogConfig,
}

/// A configuration problem, naming the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

impl FileConfig {
    /// Read a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.into(),
            message,
        })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Check every field and build the runtime config.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let ms = |d: HumanDuration| u64::try_from(d.0.as_millis()).unwrap_or(u64::MAX);
        let heartbeat = ms(self.heartbeat);
        if heartbeat < 100 {
            return Err(invalid("heartbeat", "must be at least 100ms"));
        }
        let node_ttl = self.node_ttl.map_or(heartbeat.saturating_mul(3), ms);
        if node_ttl <= heartbeat {
            return Err(invalid("node_ttl", "must be longer than heartbeat"));
        }
        if self.max_origin_leases == 0 {
            return Err(invalid("max_origin_leases", "must be at least 1"));
        }
        let stall = ms(self.lease_stall_timeout);
        if stall < heartbeat {
            return Err(invalid(
                "lease_stall_timeout",
                "must be at least heartbeat (progress is seen in announcements)",
            ));
        }
        let blame = ms(self.blame_decay);
        if blame == 0 {
            return Err(invalid("blame_decay", "must be more than 0s"));
        }
        if self.max_parents == 0 {
            return Err(invalid("max_parents", "must be at least 1"));
        }
        let warmup = self
            .lease_warmup
            .map_or(heartbeat.saturating_mul(3) / 2, ms);
        let shard = shard(self.cluster, self.advertise)?;
        let auth_key = match &self.join_secret_file {
            None => None,
            Some(path) => {
                let contents = std::fs::read(path)
                    .map_err(|e| invalid("join_secret_file", format!("{}: {e}", path.display())))?;
                let secret = shoal_proto::auth::parse_secret(&contents)
                    .map_err(|e| invalid("join_secret_file", e.to_string()))?;
                Some(shoal_proto::auth::derive_key(
                    &secret,
                    shoal_proto::auth::SCHEDULER_LABEL,
                ))
            }
        };
        if self.status_listen.is_some_and(|a| a == self.listen) {
            return Err(invalid("status_listen", "must differ from listen"));
        }
        Ok(Config {
            auth_key,
            listen: self.listen,
            status_listen: self.status_listen,
            state: StateConfig {
                heartbeat_ms: heartbeat,
                node_ttl_ms: node_ttl,
                max_origin_leases: self.max_origin_leases,
                lease_stall_ms: stall,
                blame_half_life_ms: blame,
                max_parents: self.max_parents,
                warmup_ms: warmup,
                shard,
            },
            log: self.log,
        })
    }
}

fn shard(cluster: Vec<String>, advertise: Option<String>) -> Result<Shard, ConfigError> {
    if cluster.is_empty() {
        if advertise.is_some() {
            return Err(invalid("advertise", "is only meaningful with cluster"));
        }
        return Ok(Shard::everything());
    }
    let mut seen = HashSet::new();
    for c in &cluster {
        let canon = canonical_scheduler_addr(c);
        if canon.is_empty() {
            return Err(invalid("cluster", "has an empty entry"));
        }
        if !seen.insert(canon) {
            return Err(invalid("cluster", format!("lists {c:?} twice")));
        }
    }
    let Some(me) = advertise else {
        return Err(invalid(
            "advertise",
            "is required with cluster: this scheduler's entry in it",
        ));
    };
    if !seen.contains(&canonical_scheduler_addr(&me)) {
        return Err(invalid(
            "advertise",
            format!("{me:?} is not listed in cluster"),
        ));
    }
    Ok(Shard::member(me, cluster))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<Config, String> {
        FileConfig::parse(text)?
            .validate()
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults() {
        let c = check("").unwrap();
        assert_eq!(c.listen, "0.0.0.0:5060".parse().unwrap());
        assert_eq!(c.state.heartbeat_ms, 2_000);
        assert_eq!(c.state.node_ttl_ms, 6_000);
        assert_eq!(c.state.max_origin_leases, 1);
        assert_eq!(c.state.lease_stall_ms, 10_000);
        assert_eq!(c.state.blame_half_life_ms, 60_000);
        assert_eq!(c.state.warmup_ms, 3_000);
        assert!(c.state.shard.me().is_none());
    }

    #[test]
    fn human_units_and_derived_defaults() {
        let c = check("heartbeat = \"500ms\"\nlease_stall_timeout = \"1m\"").unwrap();
        assert_eq!(c.state.heartbeat_ms, 500);
        assert_eq!(c.state.node_ttl_ms, 1_500);
        assert_eq!(c.state.warmup_ms, 750);
        assert_eq!(c.state.lease_stall_ms, 60_000);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("heartbeat = \"10ms\"", "heartbeat:"),
            ("node_ttl = \"1s\"", "node_ttl:"),
            ("max_origin_leases = 0", "max_origin_leases:"),
            ("lease_stall_timeout = \"1s\"", "lease_stall_timeout:"),
            ("blame_decay = \"0s\"", "blame_decay:"),
            ("max_parents = 0", "max_parents:"),
            ("advertise = \"a:1\"", "advertise:"),
            ("cluster = [\"a:1\", \"b:1\"]", "advertise:"),
            ("cluster = [\"a:1\"]\nadvertise = \"b:1\"", "advertise:"),
            (
                "cluster = [\"a:1\", \"http://A:1/\"]\nadvertise = \"a:1\"",
                "cluster:",
            ),
        ];
        for (text, want) in cases {
            let err = check(text).err().unwrap_or_default();
            assert!(err.starts_with(want), "{text:?} gave {err:?}");
        }
        let err = check("heartbaet = \"2s\"").err().unwrap_or_default();
        assert!(err.contains("heartbaet"), "{err}");
        let err = check("heartbeat = \"soon\"").err().unwrap_or_default();
        assert!(err.contains("not a duration"), "{err}");
    }

    #[test]
    fn cluster_membership() {
        let c =
            check("cluster = [\"s1:5060\", \"s2:5060\"]\nadvertise = \"http://S2:5060\"").unwrap();
        assert_eq!(c.state.shard.me(), Some("http://S2:5060"));
        assert_eq!(c.state.shard.cluster().len(), 2);
    }

    #[test]
    fn example_file_parses_and_matches_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/scheduler.toml");
        let file = FileConfig::load(&path).unwrap();
        let from_file = file.validate().unwrap();
        let defaults = FileConfig::default().validate().unwrap();
        assert_eq!(from_file.listen, defaults.listen);
        assert_eq!(
            format!("{:?}", from_file.state),
            format!("{:?}", defaults.state)
        );
    }
}
