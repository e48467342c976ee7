//! Node configuration: one TOML file (every field optional, defaults in the
//! single `Default` impl of each section), command-line flags and `SHOAL_*`
//! environment variables layered over it, validated into [`Config`] with
//! errors that name the offending field.
//!
//! Precedence: flag > environment (clap `env`) > file > default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::Url;
use serde::{Deserialize, Serialize};

use crate::units::{ByteSize, HumanDuration};

/// The file form. `deny_unknown_fields` everywhere so a typo is an error, not
/// a silently ignored setting.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    /// Where the store lives (RocksDB metadata + blob content). Default
    /// `/var/lib/shoal` as root, else `$XDG_DATA_HOME/shoal` or `~/.local/share/shoal`.
    pub data_dir: Option<PathBuf>,
    /// Registry mirror / HTTP proxy address containerd, Docker, CRI-O and
    /// nydusd talk to. Default `127.0.0.1:5050`.
    pub listen: SocketAddr,
    /// The read-only admin listener: health (`/healthz`), metrics
    /// (`/metrics`), status JSON (`/api/v1/status`). Nothing on it changes
    /// the node. Default `127.0.0.1:5051`.
    pub admin: SocketAddr,
    /// Host names (besides IP literals and `localhost`) the admin listener
    /// answers to: a request whose `Host` is another name is refused, so a
    /// web page cannot read it by DNS rebinding. Default none.
    pub admin_hosts: Vec<String>,
    /// The Unix socket for state-changing calls (mounts, snapshots, jobs):
    /// owned by the node's user, mode 0600 (0660 with `control_group`), and
    /// each caller's credentials are checked. Default
    /// `/run/shoal/control.sock` as root, else `$XDG_RUNTIME_DIR/shoal/control.sock`
    /// (or `control.sock` in the data dir).
    pub control: Option<PathBuf>,
    /// A group whose members may use the control socket too (mode 0660).
    /// Default none: only the node's own user (and root).
    pub control_group: Option<String>,
    pub log: LogConfig,
    pub store: StoreSection,
    pub mirror: MirrorSection,
    /// Origin registries. `default = true` marks the one used when a request
    /// names no registry; without one, the first entry is the default. With
    /// none at all, Docker Hub (`docker.io` at https://registry-1.docker.io) is
    /// the default, so `shoal node` with no flags mirrors Docker Hub and (with
    /// `mirror.allow_unlisted_upstreams`) any registry a client names.
    #[serde(rename = "upstream")]
    pub upstreams: Vec<UpstreamSection>,
    pub p2p: P2pSection,
    pub snapshotter: SnapshotterSection,
    pub convert: ConvertSection,
}

/// The conversion service: when the registry notifies a push, convert the image to Nydus and
/// push it beside the original (what Harbor's acceleration service does).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConvertSection {
    /// Where the notification endpoint listens (`POST /events`, CNCF distribution's envelopes
    /// and Harbor's webhooks). Unset: no service.
    pub listen: Option<SocketAddr>,
    /// A file holding the shared secret every notification must carry, as
    /// `Authorization: Bearer SECRET` (distribution's `notifications.endpoints[].headers`) or
    /// the bare secret (Harbor's "auth header"). At least 16 characters. Required with `listen`.
    pub secret_file: Option<PathBuf>,
    /// The registry whose pushes are converted and where results are pushed: the `host` of an
    /// `[[upstream]]`, whose URL and credentials are used (they must be allowed to push).
    /// Notifications never choose the registry. Default: the default upstream.
    pub registry: Option<String>,
    /// Repositories converted, as globs (`*` within one path segment, `**` across segments,
    /// `?` one character). Default `["**"]`: all.
    pub repositories: Vec<String>,
    /// Tags converted, as globs. Default `["*"]`. A tag ending with `tag_suffix` never is.
    pub tags: Vec<String>,
    /// Convert only this platform of a multi-platform image (`os/arch[/variant]`). Default:
    /// every platform.
    pub platform: Option<String>,
    /// Where a converted image goes: `suffix` (same repository, the tag plus `tag_suffix`) or
    /// `repository` (the repository `target_repository` names, same tag). Default `suffix`.
    pub target: ConvertTarget,
    /// Default `-nydus`: `app:1` becomes `app:1-nydus`.
    pub tag_suffix: String,
    /// For `target = "repository"`: the target repository, `{repository}` standing for the
    /// source's. Default `{repository}-nydus`.
    pub target_repository: String,
    /// Chunk dictionary: `previous` (the image last converted from the same repository, so a
    /// new version stores only chunks the old one lacks) or `none`. Default `previous`.
    pub chunk_dict: ConvertDict,
    /// After a conversion, prewarm the result across the cluster: `none`, `bootstrap` or `full`
    /// (needs `p2p.schedulers`). Default `none`.
    pub prewarm: ConvertPrewarm,
    /// Conversions at once. Default 1.
    pub jobs: usize,
    /// Jobs waiting at most; a notification beyond that gets 503 (the registry retries it).
    /// Default 1000.
    pub max_queue: usize,
    /// Attempts (with backoff from 10 s to 10 min) before a job is marked failed. Default 5.
    pub max_attempts: u32,
    /// Where converted layers and the job queue are kept. Default `<data_dir>/convert`.
    pub work_dir: Option<PathBuf>,
}

/// `convert.target`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConvertTarget {
    #[default]
    Suffix,
    Repository,
}

/// `convert.chunk_dict`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConvertDict {
    #[default]
    Previous,
    None,
}

/// `convert.prewarm`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConvertPrewarm {
    #[default]
    None,
    Bootstrap,
    Full,
}

impl Default for ConvertSection {
    fn default() -> Self {
        Self {
            listen: None,
            secret_file: None,
            registry: None,
            repositories: vec!["**".into()],
            tags: vec!["*".into()],
            platform: None,
            target: ConvertTarget::Suffix,
            tag_suffix: "-nydus".into(),
            target_repository: "{repository}-nydus".into(),
            chunk_dict: ConvertDict::Previous,
            prewarm: ConvertPrewarm::None,
            jobs: 1,
            max_queue: 1000,
            max_attempts: 5,
            work_dir: None,
        }
    }
}

/// The conversion service's settings, validated.
#[derive(Clone)]
pub struct ConvertService {
    pub listen: SocketAddr,
    pub secret: String,
    /// The `[[upstream]]` it reads from and pushes to.
    pub registry: Upstream,
    pub repositories: Vec<String>,
    pub tags: Vec<String>,
    pub platform: Option<String>,
    pub target: ConvertTarget,
    pub tag_suffix: String,
    pub target_repository: String,
    pub chunk_dict: ConvertDict,
    pub prewarm: ConvertPrewarm,
    pub jobs: usize,
    pub max_queue: usize,
    pub max_attempts: u32,
    pub work_dir: PathBuf,
}

impl std::fmt::Debug for ConvertService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConvertService")
            .field("listen", &self.listen)
            .field("registry", &self.registry.host)
            .field("repositories", &self.repositories)
            .field("tags", &self.tags)
            .field("target", &self.target)
            .field("work_dir", &self.work_dir)
            .finish_non_exhaustive()
    }
}

/// containerd's snapshotter (`[proxy_plugins.shoal]` in containerd's config).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SnapshotterSection {
    /// The Unix socket serving containerd's snapshots API (mode 0600, the node's user; root
    /// and the node's user may connect). Default `snapshotter.sock` beside the control socket
    /// (`/run/shoal/snapshotter.sock` as root).
    pub socket: Option<PathBuf>,
    /// Where snapshots (unpacked layers, containers' writes) and the image mounts under
    /// containers live. It must be a filesystem overlayfs takes as an upper directory (ext4,
    /// xfs, btrfs). Default `<data_dir>/snapshotter`.
    pub root: Option<PathBuf>,
    /// How Nydus images are mounted under containers: `auto` (EROFS where the kernel has
    /// file-backed EROFS, Linux 6.12+; FUSE otherwise), `fuse` or `erofs`. Default `auto`.
    pub mode: SnapshotterMode,
}

/// `snapshotter.mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotterMode {
    #[default]
    Auto,
    Fuse,
    Erofs,
}

/// The snapshotter's settings, validated.
#[derive(Clone, Debug)]
pub struct Snapshotter {
    pub socket: PathBuf,
    pub root: PathBuf,
    pub mode: crate::mount::MountMode,
}

impl Default for FileConfig {
    fn default() -> Self {
        Self {
            data_dir: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 5050)),
            admin: SocketAddr::from(([127, 0, 0, 1], 5051)),
            admin_hosts: Vec::new(),
            control: None,
            control_group: None,
            log: LogConfig::default(),
            store: StoreSection::default(),
            mirror: MirrorSection::default(),
            upstreams: Vec::new(),
            p2p: P2pSection::default(),
            snapshotter: SnapshotterSection::default(),
            convert: ConvertSection::default(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`. Default `text`.
    pub format: LogFormat,
    /// A tracing filter (`info`, `shoal_node=debug,info`); `RUST_LOG` wins.
    /// Default `info`.
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSection {
    /// Disk quota for cached content (committed bytes plus bytes being
    /// written). Unset (the default): keep the data dir's *filesystem*
    /// below the watermarks, so the node never fills a disk it shares with
    /// the host. `"0"`: unlimited (not recommended).
    pub quota: Option<ByteSize>,
    /// Eviction starts above this fraction of the quota (of the filesystem
    /// when `quota` is unset). Default `0.9` with a quota, `0.85` without.
    pub high_watermark: Option<f64>,
    /// Eviction stops at this fraction. Default `0.8` with a quota, `0.75`
    /// without.
    pub low_watermark: Option<f64>,
}

/// How much disk the store may use, validated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StoreLimits {
    /// Bytes; 0 with `filesystem` or unlimited.
    pub quota_bytes: u64,
    /// Watermarks are fractions of the data dir's filesystem.
    pub filesystem: bool,
    pub high_watermark: f64,
    pub low_watermark: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MirrorSection {
    /// How long a tag → digest answer is used without asking the origin.
    /// When the origin is unreachable a stale answer is served. Default `5m`.
    pub tag_ttl: HumanDuration,
    /// How long an origin's "yes, these credentials may read this
    /// repository" is remembered. Default `60s`.
    pub access_ttl: HumanDuration,
    /// Largest manifest accepted from an origin. Default `4MiB`.
    pub max_manifest_size: ByteSize,
    /// Timeout for connecting to and hearing back from an origin. Default `30s`.
    pub upstream_timeout: HumanDuration,
    /// Accept requests for registries that are not configured (containerd's
    /// `?ns=`, the `X-Shoal-Registry` header, proxy requests), reaching them
    /// over HTTPS. Their answers are not trusted: cached content is served
    /// for them only after a proof of possession. Default `true`.
    pub allow_unlisted_upstreams: bool,
    /// Let unlisted registries be on this host (loopback, link-local, the
    /// host's own addresses). Default `false`: a request cannot make the
    /// node talk to its own listeners or local services.
    pub allow_local_upstreams: bool,
    /// Random ranges an unlisted registry must return correctly before a
    /// cached blob is served for it (proof of possession). Default `32`.
    pub possession_samples: u64,
    /// Hosts the forward proxy may carry non-registry requests and
    /// `CONNECT` tunnels to, besides the configured registries and the token
    /// realms and blob-storage hosts they send clients to: `host`,
    /// `host:port`, `*.suffix`. Default none.
    pub proxy_allow: Vec<String>,
    /// Allow `CONNECT` tunnels (to the hosts above only). Default `true`.
    pub proxy_connect: bool,
    /// Open `CONNECT` tunnels at most. Default `256`.
    pub max_tunnels: usize,
    /// A tunnel with no bytes either way for this long is closed. Default `2m`.
    pub tunnel_idle_timeout: HumanDuration,
    /// Blob downloads from origins at once; more wait their turn. Default `32`.
    pub max_origin_downloads: usize,
}

impl Default for MirrorSection {
    fn default() -> Self {
        Self {
            tag_ttl: HumanDuration(Duration::from_secs(300)),
            access_ttl: HumanDuration(Duration::from_secs(60)),
            max_manifest_size: ByteSize::mib(4),
            upstream_timeout: HumanDuration(Duration::from_secs(30)),
            allow_unlisted_upstreams: true,
            allow_local_upstreams: false,
            possession_samples: 32,
            proxy_allow: Vec::new(),
            proxy_connect: true,
            max_tunnels: 256,
            tunnel_idle_timeout: HumanDuration(Duration::from_secs(120)),
            max_origin_downloads: 32,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamSection {
    /// The registry host as clients name it (`docker.io`, `ghcr.io`,
    /// `127.0.0.1:5000`). Default: the host of `url`.
    pub host: Option<String>,
    /// Base URL of the origin, `https://…` or `http://…` (plain HTTP). Required.
    pub url: String,
    /// Use this registry when a request names none. Default `false`.
    pub default: bool,
    /// Extra CA certificate (PEM) to trust for this origin.
    pub ca_file: Option<PathBuf>,
    /// Node-side credentials. What this registry serves to them in a
    /// repository is served to every client of this node that names this
    /// registry and repository: configure them only where that is intended.
    pub username: Option<String>,
    pub password: Option<String>,
    /// Read the password from this file instead (trailing newline trimmed).
    pub password_file: Option<PathBuf>,
}

/// Sharing with other nodes. A node shares only when it has a join secret
/// (`join_secret_file`); without one it is standalone and every other field
/// here is ignored.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct P2pSection {
    /// The cluster's join secret: 64+ hex characters (e.g. `openssl rand
    /// -hex 32`) or 32+ raw bytes. Only nodes holding it exchange data.
    pub join_secret_file: Option<PathBuf>,
    /// QUIC (UDP) address of the data plane. Default `0.0.0.0:5052`.
    pub listen: SocketAddr,
    /// libp2p DHT (TCP) address. Default: the IP of `listen`, port 5053.
    pub dht_listen: Option<SocketAddr>,
    /// The data-plane address other nodes reach this one at, as announced
    /// to schedulers. Default: `listen`, its IP replaced (when unspecified)
    /// by the local address that routes to the first scheduler.
    pub advertise: Option<SocketAddr>,
    /// Schedulers, `host:port` (the same list, in any order, on every node).
    pub schedulers: Vec<String>,
    /// DHT bootstrap peers, `host:port` of their DHT listeners (port 5053
    /// when left out).
    pub peers: Vec<String>,
    /// Zone/rack label: same-zone parents are preferred.
    pub zone: Option<String>,
    /// Concurrent uploads to peers. Default `8`.
    pub upload_slots: usize,
    /// Upload bandwidth to all peers together, per second; `0` = unlimited.
    pub upload_rate: ByteSize,
    /// Pieces fetched from peers at once for one blob. Default `8`.
    pub fetch_window: usize,
    /// A download that gets no new piece from peers for this long (and no
    /// origin lease) fetches the rest from the origin. Default `20s`.
    pub stall_timeout: HumanDuration,
    /// Run a scheduler inside this node, listening here (default: none).
    /// List its address in `schedulers` on every node, this one included.
    pub embedded_scheduler: Option<SocketAddr>,
}

impl Default for P2pSection {
    fn default() -> Self {
        Self {
            join_secret_file: None,
            listen: SocketAddr::from(([0, 0, 0, 0], 5052)),
            dht_listen: None,
            advertise: None,
            schedulers: Vec::new(),
            peers: Vec::new(),
            zone: None,
            upload_slots: 8,
            upload_rate: ByteSize(0),
            fetch_window: 8,
            stall_timeout: HumanDuration(Duration::from_secs(20)),
            embedded_scheduler: None,
        }
    }
}

/// Validated runtime configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub admin_hosts: Vec<String>,
    pub control: PathBuf,
    /// The group (name, gid) that may use the control socket besides the node's user.
    pub control_group: Option<(String, u32)>,
    pub log: LogConfig,
    pub store: StoreLimits,
    pub mirror: MirrorSection,
    pub upstreams: Vec<Upstream>,
    /// `None`: standalone (no join secret).
    pub p2p: Option<P2p>,
    pub snapshotter: Snapshotter,
    /// `None`: no conversion service.
    pub convert: Option<ConvertService>,
}

/// The sharing settings of a node with a join secret.
#[derive(Clone, Debug)]
pub struct P2p {
    pub join_secret: crate::p2p::JoinSecret,
    pub listen: SocketAddr,
    pub dht_listen: SocketAddr,
    pub advertise: Option<SocketAddr>,
    pub schedulers: Vec<String>,
    pub peers: Vec<String>,
    pub zone: Option<String>,
    pub upload_slots: usize,
    pub upload_rate: u64,
    pub fetch_window: usize,
    pub stall_timeout: Duration,
    pub embedded_scheduler: Option<SocketAddr>,
}

/// One origin registry, validated.
#[derive(Clone, Debug)]
pub struct Upstream {
    pub host: String,
    pub url: Url,
    pub default: bool,
    pub ca_pem: Option<Vec<u8>>,
    pub credentials: Option<(String, String)>,
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
    Invalid { field: String, message: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
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

    /// Set one field by its dotted path, as `--set mirror.max_tunnels=64` does: the value is read
    /// as TOML (`64`, `true`, `"a b"`, `["x", "y"]`) and otherwise taken as a string (`10GiB`,
    /// `/var/lib/shoal`). Every field of the file can be set this way except the `[[upstream]]`
    /// tables (their flag is `--upstream`); an unknown field is an error naming it.
    pub fn with_setting(self, setting: &str) -> Result<Self, ConfigError> {
        let bad = |message: String| invalid(format!("--set {setting}"), message);
        let Some((path, raw)) = setting.split_once('=') else {
            return Err(bad("expected KEY=VALUE, e.g. mirror.max_tunnels=64".into()));
        };
        let keys: Vec<&str> = path.trim().split('.').map(str::trim).collect();
        if keys.iter().any(|k| k.is_empty()) {
            return Err(bad("empty key".into()));
        }
        if keys[0] == "upstream" {
            return Err(bad("upstreams are set with --upstream [HOST=]URL".into()));
        }
        let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.to_owned()));
        let toml::Value::Table(mut table) =
            toml::Value::try_from(&self).map_err(|e| bad(e.to_string()))?
        else {
            return Err(bad("the config is not a table".into()));
        };
        let (last, parents) = keys.split_last().unwrap_or((&"", &[]));
        let mut at = &mut table;
        for k in parents {
            let next = at
                .entry((*k).to_owned())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let toml::Value::Table(t) = next else {
                return Err(bad(format!("{k} is not a section")));
            };
            at = t;
        }
        at.insert((*last).to_owned(), value);
        table
            .try_into()
            .map_err(|e: toml::de::Error| bad(e.message().to_owned()))
    }

    /// Add an upstream from the command-line form `[HOST=]URL`. Without
    /// HOST it becomes the default upstream.
    pub fn add_upstream_flag(&mut self, flag: &str) {
        let (host, url) = match flag.split_once('=') {
            Some((h, u)) if !h.contains("://") => (Some(h.to_owned()), u.to_owned()),
            _ => (None, flag.to_owned()),
        };
        let default = host.is_none();
        if default {
            for u in &mut self.upstreams {
                u.default = false;
            }
        }
        self.upstreams.push(UpstreamSection {
            host,
            url,
            default,
            ..UpstreamSection::default()
        });
    }

    /// Check every field and build the runtime config.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let store = validate_store(&self.store)?;
        let m = &self.mirror;
        if m.possession_samples == 0 || m.possession_samples > 1024 {
            return Err(invalid(
                "mirror.possession_samples",
                "must be between 1 and 1024",
            ));
        }
        if m.max_tunnels == 0 {
            return Err(invalid("mirror.max_tunnels", "must be at least 1"));
        }
        if m.max_origin_downloads == 0 {
            return Err(invalid("mirror.max_origin_downloads", "must be at least 1"));
        }
        if m.tunnel_idle_timeout.0.is_zero() {
            return Err(invalid(
                "mirror.tunnel_idle_timeout",
                "must be more than 0s",
            ));
        }
        for (i, p) in m.proxy_allow.iter().enumerate() {
            if !crate::upstream::valid_pattern(p) {
                return Err(invalid(
                    format!("mirror.proxy_allow[{i}]"),
                    "must be host, host:port or *.suffix[:port]",
                ));
            }
        }
        for (i, h) in self.admin_hosts.iter().enumerate() {
            if h.is_empty() || h.contains(['/', ' ', ':']) {
                return Err(invalid(format!("admin_hosts[{i}]"), "must be a host name"));
            }
        }
        let control_group = match &self.control_group {
            None => None,
            Some(name) => Some((
                name.clone(),
                group_id(name).ok_or_else(|| {
                    invalid(
                        "control_group",
                        format!("no group named {name:?} in /etc/group"),
                    )
                })?,
            )),
        };
        if self.mirror.max_manifest_size.0 == 0 {
            return Err(invalid("mirror.max_manifest_size", "must be more than 0"));
        }
        if self.mirror.upstream_timeout.0.is_zero() {
            return Err(invalid("mirror.upstream_timeout", "must be more than 0s"));
        }
        if self.listen == self.admin {
            return Err(invalid("admin", "must differ from listen"));
        }
        let mut sections = self.upstreams;
        if sections.is_empty() {
            sections.push(UpstreamSection {
                host: Some("docker.io".into()),
                url: "https://registry-1.docker.io".into(),
                default: true,
                ..UpstreamSection::default()
            });
        }
        let mut upstreams = Vec::with_capacity(sections.len());
        for (i, u) in sections.into_iter().enumerate() {
            upstreams.push(validate_upstream(i, u)?);
        }
        if upstreams.iter().filter(|u| u.default).count() > 1 {
            return Err(invalid(
                "upstream",
                "more than one upstream has default = true",
            ));
        }
        if !upstreams.iter().any(|u| u.default) {
            if let Some(first) = upstreams.first_mut() {
                first.default = true;
            }
        }
        let data_dir = self.data_dir.unwrap_or_else(default_data_dir);
        let control = match self.control {
            Some(p) if p.as_os_str().is_empty() || p.is_relative() => {
                return Err(invalid("control", "must be an absolute path"))
            }
            Some(p) => p,
            None => default_control(&data_dir),
        };
        let p2p = validate_p2p(self.p2p)?;
        let snapshotter = validate_snapshotter(self.snapshotter, &data_dir, &control)?;
        let convert = validate_convert(self.convert, &upstreams, &data_dir)?;
        Ok(Config {
            data_dir,
            listen: self.listen,
            admin: self.admin,
            admin_hosts: self.admin_hosts,
            control,
            control_group,
            log: self.log,
            store,
            mirror: self.mirror,
            upstreams,
            p2p,
            snapshotter,
            convert,
        })
    }
}

fn validate_convert(
    c: ConvertSection,
    upstreams: &[Upstream],
    data_dir: &Path,
) -> Result<Option<ConvertService>, ConfigError> {
    let Some(listen) = c.listen else {
        return Ok(None);
    };
    let Some(secret_file) = &c.secret_file else {
        return Err(invalid(
            "convert.secret_file",
            "required with convert.listen: notifications must prove they come from the registry",
        ));
    };
    let secret = std::fs::read_to_string(secret_file)
        .map_err(|e| {
            invalid(
                "convert.secret_file",
                format!("{}: {e}", secret_file.display()),
            )
        })?
        .trim()
        .to_owned();
    if secret.len() < 16 || secret.chars().any(|ch| ch.is_control() || ch == ' ') {
        return Err(invalid(
            "convert.secret_file",
            "the secret must be at least 16 characters, without spaces",
        ));
    }
    let registry = match &c.registry {
        Some(host) => upstreams.iter().find(|u| &u.host == host).ok_or_else(|| {
            invalid(
                "convert.registry",
                format!("{host:?} is not the host of an [[upstream]]"),
            )
        })?,
        None => upstreams
            .iter()
            .find(|u| u.default)
            .ok_or_else(|| invalid("convert.registry", "no upstream to convert for"))?,
    };
    // The converter talks to `host` itself (Docker Hub's API host for docker.io).
    let authority = match (registry.url.host_str(), registry.url.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_owned(),
        _ => String::new(),
    };
    if registry.host != "docker.io" && authority != registry.host {
        return Err(invalid(
            "convert.registry",
            format!(
                "the upstream {} has URL {}: the conversion service needs an upstream whose URL names its host",
                registry.host, registry.url
            ),
        ));
    }
    for (field, globs) in [
        ("convert.repositories", &c.repositories),
        ("convert.tags", &c.tags),
    ] {
        if globs.is_empty() || globs.iter().any(|g| g.is_empty()) {
            return Err(invalid(field, "give at least one non-empty pattern"));
        }
    }
    let tag_ok = |t: &str| {
        !t.is_empty()
            && t.len() <= 64
            && t.chars()
                .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '_' | '.' | '-'))
    };
    if c.target == ConvertTarget::Suffix && !tag_ok(&c.tag_suffix) {
        return Err(invalid(
            "convert.tag_suffix",
            "must be 1 to 64 of [A-Za-z0-9_.-]",
        ));
    }
    if c.target == ConvertTarget::Repository && !c.target_repository.contains("{repository}") {
        // A fixed repository would collect every source's tags in one place and overwrite
        // them; allowed, but only when it is what the operator wrote.
        tracing::warn!(target_repository = %c.target_repository, "convert.target_repository has no {{repository}}: every repository's images land in one");
    }
    if c.jobs == 0 || c.jobs > 16 {
        return Err(invalid("convert.jobs", "must be 1 to 16"));
    }
    if c.max_queue == 0 {
        return Err(invalid("convert.max_queue", "must be more than 0"));
    }
    if c.max_attempts == 0 {
        return Err(invalid("convert.max_attempts", "must be more than 0"));
    }
    let work_dir = match c.work_dir {
        Some(p) if p.as_os_str().is_empty() || p.is_relative() => {
            return Err(invalid("convert.work_dir", "must be an absolute path"))
        }
        Some(p) => p,
        None => data_dir.join("convert"),
    };
    Ok(Some(ConvertService {
        listen,
        secret,
        registry: registry.clone(),
        repositories: c.repositories,
        tags: c.tags,
        platform: c.platform,
        target: c.target,
        tag_suffix: c.tag_suffix,
        target_repository: c.target_repository,
        chunk_dict: c.chunk_dict,
        prewarm: c.prewarm,
        jobs: c.jobs,
        max_queue: c.max_queue,
        max_attempts: c.max_attempts,
        work_dir,
    }))
}

fn validate_snapshotter(
    s: SnapshotterSection,
    data_dir: &Path,
    control: &Path,
) -> Result<Snapshotter, ConfigError> {
    let absolute = |field: &'static str, p: Option<PathBuf>| match p {
        Some(p) if p.as_os_str().is_empty() || p.is_relative() => {
            Err(invalid(field, "must be an absolute path"))
        }
        other => Ok(other),
    };
    // Beside the control socket (`/run/shoal/snapshotter.sock` by default), so that a node whose
    // control socket is elsewhere does not take another node's.
    let socket = absolute("snapshotter.socket", s.socket)?
        .unwrap_or_else(|| control.with_file_name("snapshotter.sock"));
    let root =
        absolute("snapshotter.root", s.root)?.unwrap_or_else(|| data_dir.join("snapshotter"));
    let mode = match s.mode {
        SnapshotterMode::Fuse => crate::mount::MountMode::Fuse,
        SnapshotterMode::Erofs => crate::mount::MountMode::Erofs,
        SnapshotterMode::Auto if file_backed_erofs() => crate::mount::MountMode::Erofs,
        SnapshotterMode::Auto => crate::mount::MountMode::Fuse,
    };
    Ok(Snapshotter { socket, root, mode })
}

/// Whether this kernel mounts EROFS images from files: Linux 6.12+, with erofs registered or
/// available as a module.
pub fn file_backed_erofs() -> bool {
    let uname = rustix::system::uname();
    let release = uname.release().to_string_lossy().into_owned();
    let mut parts = release
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    let registered = std::fs::read_to_string("/proc/filesystems").is_ok_and(|f| {
        f.lines()
            .any(|l| l.split_whitespace().last() == Some("erofs"))
    });
    let module = Path::new("/lib/modules")
        .join(&release)
        .join("kernel/fs/erofs")
        .exists();
    version >= (6, 12) && (registered || module)
}

fn validate_store(s: &StoreSection) -> Result<StoreLimits, ConfigError> {
    let (quota_bytes, filesystem) = match s.quota {
        None => (0, true),
        Some(q) => (q.0, false),
    };
    let (hi, lo) = if filesystem { (0.85, 0.75) } else { (0.9, 0.8) };
    let high = s.high_watermark.unwrap_or(hi);
    let low = s.low_watermark.unwrap_or(lo);
    if !(high > 0.0 && high <= 1.0) {
        return Err(invalid("store.high_watermark", "must be in (0, 1]"));
    }
    if !(low > 0.0 && low <= high) {
        return Err(invalid(
            "store.low_watermark",
            "must be in (0, store.high_watermark]",
        ));
    }
    Ok(StoreLimits {
        quota_bytes,
        filesystem,
        high_watermark: high,
        low_watermark: low,
    })
}

/// The gid of group `name`, from /etc/group.
fn group_id(name: &str) -> Option<u32> {
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then(|| f.nth(1)?.parse().ok())?
    })
}

/// `/run/shoal/control.sock` as root; else under `$XDG_RUNTIME_DIR`, or the data dir.
fn default_control(data_dir: &Path) -> PathBuf {
    default_socket(data_dir, "control.sock")
}

/// `/run/shoal/NAME` as root; else `$XDG_RUNTIME_DIR/shoal/NAME`, or NAME in the data dir.
fn default_socket(data_dir: &Path, name: &str) -> PathBuf {
    if is_root() {
        return PathBuf::from("/run/shoal").join(name);
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("shoal").join(name),
        _ => data_dir.join(name),
    }
}

fn validate_p2p(p: P2pSection) -> Result<Option<P2p>, ConfigError> {
    let Some(path) = p.join_secret_file else {
        return Ok(None);
    };
    let join_secret = crate::p2p::JoinSecret::load(&path)
        .map_err(|e| invalid("p2p.join_secret_file", e.to_string()))?;
    if p.upload_slots == 0 {
        return Err(invalid("p2p.upload_slots", "must be at least 1"));
    }
    if p.fetch_window == 0 || p.fetch_window > 256 {
        return Err(invalid("p2p.fetch_window", "must be between 1 and 256"));
    }
    if p.stall_timeout.0.is_zero() {
        return Err(invalid("p2p.stall_timeout", "must be more than 0s"));
    }
    if p.listen.port() == 0 {
        return Err(invalid("p2p.listen", "needs a port"));
    }
    if let Some(a) = p.advertise {
        if a.ip().is_unspecified() || a.port() == 0 {
            return Err(invalid("p2p.advertise", "needs a concrete IP and port"));
        }
    }
    for (i, s) in p.schedulers.iter().enumerate() {
        if s.trim().is_empty() || s.starts_with("https://") {
            return Err(invalid(
                format!("p2p.schedulers[{i}]"),
                "must be host:port or http://host:port",
            ));
        }
    }
    for (i, s) in p.peers.iter().enumerate() {
        if s.trim().is_empty() || s.contains('/') {
            return Err(invalid(format!("p2p.peers[{i}]"), "must be host:port"));
        }
    }
    let dht_listen = p
        .dht_listen
        .unwrap_or_else(|| SocketAddr::new(p.listen.ip(), 5053));
    Ok(Some(P2p {
        join_secret,
        listen: p.listen,
        dht_listen,
        advertise: p.advertise,
        schedulers: p.schedulers,
        peers: p.peers,
        zone: p.zone.filter(|z| !z.is_empty()),
        upload_slots: p.upload_slots,
        upload_rate: p.upload_rate.0,
        fetch_window: p.fetch_window,
        stall_timeout: p.stall_timeout.0,
        embedded_scheduler: p.embedded_scheduler,
    }))
}

fn validate_upstream(i: usize, u: UpstreamSection) -> Result<Upstream, ConfigError> {
    let field = |name: &str| format!("upstream[{i}].{name}");
    let url = Url::parse(&u.url).map_err(|e| invalid(field("url"), format!("{:?}: {e}", u.url)))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(field("url"), "scheme must be http or https"));
    }
    let Some(url_host) = url.host_str() else {
        return Err(invalid(field("url"), "has no host"));
    };
    if url.path() != "/" && !url.path().is_empty() {
        return Err(invalid(
            field("url"),
            "must not have a path (the registry root)",
        ));
    }
    let host = match u.host {
        Some(h) if h.is_empty() || h.contains('/') => {
            return Err(invalid(
                field("host"),
                "must be a host[:port] like docker.io",
            ))
        }
        Some(h) => h,
        None => match url.port() {
            Some(p) => format!("{url_host}:{p}"),
            None => url_host.to_owned(),
        },
    };
    let ca_pem = match &u.ca_file {
        Some(p) => Some(
            std::fs::read(p)
                .map_err(|e| invalid(field("ca_file"), format!("{}: {e}", p.display())))?,
        ),
        None => None,
    };
    let password = match (&u.password, &u.password_file) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                field("password_file"),
                "set password or password_file, not both",
            ))
        }
        (Some(p), None) => Some(p.clone()),
        (None, Some(f)) => Some(
            std::fs::read_to_string(f)
                .map_err(|e| invalid(field("password_file"), format!("{}: {e}", f.display())))?
                .trim_end_matches(['\r', '\n'])
                .to_owned(),
        ),
        (None, None) => None,
    };
    let credentials = match (u.username, password) {
        (Some(user), Some(pass)) => Some((user, pass)),
        (None, None) => None,
        (Some(_), None) => {
            return Err(invalid(
                field("password"),
                "username given without password",
            ))
        }
        (None, Some(_)) => {
            return Err(invalid(
                field("username"),
                "password given without username",
            ))
        }
    };
    Ok(Upstream {
        host,
        url,
        default: u.default,
        ca_pem,
        credentials,
    })
}

fn default_data_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/lib/shoal");
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(x).join("shoal");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".local/share/shoal"),
        None => PathBuf::from("shoal-data"),
    }
}

pub(crate) fn is_root() -> bool {
    // The owner of /proc/self is our effective uid; avoids unsafe libc calls.
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_is_valid() {
        let c = FileConfig::parse("")
            .expect("empty parses")
            .validate()
            .expect("valid");
        assert_eq!(c.listen.port(), 5050);
        // With no upstream at all, Docker Hub is the default.
        assert_eq!(c.upstreams.len(), 1);
        assert_eq!(c.upstreams[0].host, "docker.io");
        assert_eq!(c.upstreams[0].url.as_str(), "https://registry-1.docker.io/");
        assert!(c.upstreams[0].default);
    }

    #[test]
    fn errors_name_the_field() {
        let e = FileConfig::parse("[store]\nhigh_watermark = 2.0")
            .expect("parses")
            .validate()
            .expect_err("invalid");
        assert!(e.to_string().starts_with("store.high_watermark"), "{e}");
        let e = FileConfig::parse("[[upstream]]\nurl = \"ftp://x\"")
            .expect("parses")
            .validate()
            .expect_err("invalid");
        assert!(e.to_string().starts_with("upstream[0].url"), "{e}");
        let e = FileConfig::parse("[mirror]\ntag_ttl = \"soon\"").expect_err("bad duration");
        assert!(e.contains("tag_ttl"), "{e}");
        let e = FileConfig::parse("lsten = \"1.2.3.4:5\"").expect_err("typo");
        assert!(e.contains("lsten"), "{e}");
    }

    #[test]
    fn upstream_flags() {
        let mut f = FileConfig::default();
        f.add_upstream_flag("http://127.0.0.1:5000");
        f.add_upstream_flag("docker.io=https://registry-1.docker.io");
        let c = f.validate().expect("valid");
        assert_eq!(c.upstreams[0].host, "127.0.0.1:5000");
        assert!(c.upstreams[0].default);
        assert_eq!(c.upstreams[1].host, "docker.io");
        assert!(!c.upstreams[1].default);
    }

    /// Every field of the file has a flag: `--set` reaches each one (the leaves of the default
    /// config, and the fields that are unset by default), and refuses what is not a field.
    #[test]
    fn set_reaches_every_field() {
        fn leaves(prefix: &str, t: &toml::Table, out: &mut Vec<(String, toml::Value)>) {
            for (k, v) in t {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match v {
                    toml::Value::Table(t) => leaves(&path, t, out),
                    v => out.push((path, v.clone())),
                }
            }
        }
        let default = FileConfig::default();
        let mut all = Vec::new();
        leaves(
            "",
            &toml::Table::try_from(&default).expect("serializes"),
            &mut all,
        );
        for (k, v) in [
            ("data_dir", "/srv/shoal"),
            ("control", "/run/x.sock"),
            ("control_group", "shoal"),
            ("store.quota", "\"10GiB\""),
            ("store.high_watermark", "0.9"),
            ("store.low_watermark", "0.5"),
            ("p2p.join_secret_file", "/etc/shoal/secret"),
            ("p2p.dht_listen", "0.0.0.0:7000"),
            ("p2p.advertise", "10.0.0.1:5052"),
            ("p2p.zone", "eu-1"),
            ("p2p.embedded_scheduler", "127.0.0.1:5060"),
        ] {
            let set = FileConfig::default()
                .with_setting(&format!("{k}={v}"))
                .unwrap_or_else(|e| panic!("{k}: {e}"));
            assert!(
                toml::to_string(&set)
                    .unwrap()
                    .contains(v.trim_matches('"').trim_matches('\\')),
                "{k}"
            );
        }
        assert!(all.len() >= 25, "{all:?}");
        for (path, value) in all {
            if path.starts_with("upstream") {
                continue;
            }
            let setting = format!("{path}={value}");
            FileConfig::default()
                .with_setting(&setting)
                .unwrap_or_else(|e| panic!("{setting}: {e}"));
        }
        let set = FileConfig::default()
            .with_setting("mirror.max_tunnels=7")
            .and_then(|c| c.with_setting("mirror.proxy_allow=[\"a.example\", \"b.example:443\"]"))
            .and_then(|c| c.with_setting("p2p.upload_rate=100MiB"))
            .expect("valid settings");
        assert_eq!(set.mirror.max_tunnels, 7);
        assert_eq!(set.mirror.proxy_allow, ["a.example", "b.example:443"]);
        assert_eq!(set.p2p.upload_rate.0, 100 << 20);
        for bad in [
            "mirror.max_tunels=7",
            "mirror",
            "mirror.max_tunnels=many",
            "upstream.url=x",
            "listen.port=1",
        ] {
            let e = FileConfig::default().with_setting(bad).expect_err(bad);
            assert!(e.to_string().starts_with("--set "), "{bad}: {e}");
        }
    }

    #[test]
    fn example_configs_parse() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).expect("deploy/ exists").flatten() {
            let p = entry.path();
            let is_node_toml = p
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("node") && n.ends_with(".toml"));
            if is_node_toml {
                let text = std::fs::read_to_string(&p).expect("readable");
                let f = FileConfig::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                f.validate()
                    .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                seen += 1;
            }
        }
        assert!(seen > 0, "no deploy/node*.toml found");
    }
}
