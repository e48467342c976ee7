//! A real origin: the CNCF distribution registry (`docker-registry serve`), on a free loopback port
//! (or on a test host's address inside its network namespace, see [`Registry::start_on_host`]),
//! with filesystem storage and a JSON log in the test's temp dir, optionally behind htpasswd.
//!
//! Invariants: `stop()` then `start()` keeps the port, the storage and the log (appended), so a test
//! can take the origin down and bring it back. The log is the origin-side ground truth
//! ([`RegistryLog`]); [`Registry::log`] first makes sure every finished request is in it.

use std::fs::{File, OpenOptions};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use reqwest::blocking::Body;

use crate::http;
use crate::netns::Host;
use crate::registry_log::RegistryLog;
use crate::wait::{free_port, poll};
use crate::TestCtx;

/// How long the registry may take to answer `/v2/` after a start.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Credentials of an htpasswd-protected registry.
#[derive(Debug, Clone)]
pub struct Creds {
    pub user: String,
    pub pass: String,
}

impl Creds {
    pub fn new(user: &str, pass: &str) -> Self {
        Self {
            user: user.to_owned(),
            pass: pass.to_owned(),
        }
    }

    /// `user:pass`, as skopeo and ctr take them.
    pub fn colon(&self) -> String {
        format!("{}:{}", self.user, self.pass)
    }
}

/// A running (or stopped) registry.
#[derive(Debug)]
pub struct Registry {
    dir: PathBuf,
    ip: Ipv4Addr,
    port: u16,
    /// The network namespace it runs in (`None`: this process's).
    netns: Option<String>,
    config: PathBuf,
    log_path: PathBuf,
    creds: Option<Creds>,
    child: Option<Child>,
    marks: AtomicU64,
}

impl Registry {
    /// Starts an anonymous registry.
    pub fn start(t: &TestCtx) -> Result<Self> {
        Self::start_with(t, None, Ipv4Addr::LOCALHOST, free_port()?, None)
    }

    /// Starts a registry that authorizes every request with tokens from `tokens` (per-repository
    /// access, see [`crate::token`]); `pusher` are credentials the token service lets push (used
    /// by skopeo to push fixtures).
    pub fn start_token(
        t: &TestCtx,
        tokens: &crate::token::TokenServer,
        pusher: Creds,
    ) -> Result<Self> {
        let dir = t.subdir("token")?;
        let root = tokens.write_root_cert(&dir)?;
        let auth = format!(
            "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
            tokens.realm(),
            crate::token::SERVICE,
            crate::token::ISSUER,
            root.display()
        );
        Self::start_configured(
            t,
            Some(pusher),
            Ipv4Addr::LOCALHOST,
            free_port()?,
            None,
            auth,
        )
    }

    /// Starts an anonymous registry that notifies `url` of pushes with
    /// `Authorization: Bearer <secret>`, configured by the repository's own snippet
    /// (`deploy/registry/notifications.yml`, its URL and secret replaced).
    pub fn start_notifying(t: &TestCtx, url: &str, secret: &str) -> Result<Self> {
        let snippet = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/registry/notifications.yml");
        let text = std::fs::read_to_string(&snippet)
            .with_context(|| format!("reading {}", snippet.display()))?;
        ensure!(
            text.contains("http://shoal-node.internal:5055/events")
                && text.contains("REPLACE-WITH-THE-SECRET"),
            "{} no longer has the URL and secret this test replaces",
            snippet.display()
        );
        let notify = text
            .replace("http://shoal-node.internal:5055/events", url)
            .replace("REPLACE-WITH-THE-SECRET", secret);
        Self::start_configured(t, None, Ipv4Addr::LOCALHOST, free_port()?, None, notify)
    }

    /// Starts a registry that requires `user`/`pass` (htpasswd, bcrypt) for everything.
    pub fn start_htpasswd(t: &TestCtx, user: &str, pass: &str) -> Result<Self> {
        Self::start_with(
            t,
            Some(Creds::new(user, pass)),
            Ipv4Addr::LOCALHOST,
            free_port()?,
            None,
        )
    }

    /// Starts an anonymous registry "on" test host `host` (inside its namespace, listening on
    /// `host.ip:port`), so what it sends crosses the host's (shaped) link. This process reaches
    /// it through the bridge.
    pub fn start_on_host(t: &TestCtx, host: &Host, port: u16) -> Result<Self> {
        Self::start_with(t, None, host.ip, port, Some(host.ns.clone()))
    }

    fn start_with(
        t: &TestCtx,
        creds: Option<Creds>,
        ip: Ipv4Addr,
        port: u16,
        netns: Option<String>,
    ) -> Result<Self> {
        let auth = match &creds {
            Some(c) => {
                let htpasswd = t.subdir("htpasswd")?.join("htpasswd");
                write_htpasswd(&htpasswd, c)?;
                format!(
                    "auth:\n  htpasswd:\n    realm: shoal-e2e\n    path: {}\n",
                    htpasswd.display()
                )
            }
            None => String::new(),
        };
        Self::start_configured(t, creds, ip, port, netns, auth)
    }

    fn start_configured(
        t: &TestCtx,
        creds: Option<Creds>,
        ip: Ipv4Addr,
        port: u16,
        netns: Option<String>,
        auth: String,
    ) -> Result<Self> {
        let dir = t.subdir("registry")?;
        let config = dir.join("config.yml");
        let yaml = format!(
            "version: 0.1\n\
             log:\n  level: info\n  formatter: json\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n  \
             maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: {ip}:{port}\n  secret: shoal-e2e-secret\n\
             {auth}",
            storage = dir.join("storage").display(),
        );
        std::fs::write(&config, yaml).context("writing registry config")?;
        let log_path = dir.join("registry.log");
        t.register_log("registry", &log_path);
        let mut registry = Self {
            dir,
            ip,
            port,
            netns,
            config,
            log_path,
            creds,
            child: None,
            marks: AtomicU64::new(0),
        };
        registry.start_process()?;
        Ok(registry)
    }

    /// `IP:PORT` (`127.0.0.1:PORT` unless started on a test host).
    pub fn addr(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }

    /// `http://IP:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The credentials it requires, if any.
    pub fn creds(&self) -> Option<&Creds> {
        self.creds.as_ref()
    }

    /// Where the registry stores blob `digest`'s bytes.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        let (alg, hex) = digest.split_once(':').context("digest without algorithm")?;
        ensure!(hex.len() > 2, "short digest {digest}");
        Ok(self
            .dir
            .join("storage/docker/registry/v2/blobs")
            .join(alg)
            .join(&hex[..2])
            .join(hex)
            .join("data"))
    }

    /// The storage root (`…/docker/registry/v2` lives under it).
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.join("storage")
    }

    /// Takes the origin down (SIGKILL, waits for exit).
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().context("killing the registry")?;
            child.wait().context("waiting for the registry")?;
        }
        Ok(())
    }

    /// Brings a stopped origin back on the same port and storage.
    pub fn start_again(&mut self) -> Result<()> {
        ensure!(self.child.is_none(), "registry is already running");
        self.start_process()
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The registry's log, parsed. Sends a marker request first and waits until it is logged, so
    /// every request that finished before this call is included.
    pub fn log(&self) -> Result<RegistryLog> {
        if self.child.is_some() {
            self.sync_log()?;
        }
        let text = std::fs::read(&self.log_path).context("reading the registry log")?;
        Ok(RegistryLog::parse(&String::from_utf8_lossy(&text)))
    }

    /// Uploads `data` as a blob of `repo` (monolithic POST + PUT `?digest=`); returns its digest.
    pub fn push_blob(&self, repo: &str, data: Vec<u8>) -> Result<String> {
        let digest = http::sha256_digest(&data);
        self.push_blob_body(repo, &digest, Body::from(data))?;
        Ok(digest)
    }

    /// Uploads the file at `path`, whose digest is `digest`, as a blob of `repo` (streamed).
    pub fn push_blob_file(&self, repo: &str, digest: &str, path: &Path) -> Result<()> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        self.push_blob_body(repo, digest, Body::from(file))
    }

    /// Uploads `len` bytes read from `reader`, whose digest is `digest`, as a blob of `repo`.
    pub fn push_blob_reader(
        &self,
        repo: &str,
        digest: &str,
        reader: impl std::io::Read + Send + 'static,
        len: u64,
    ) -> Result<()> {
        self.push_blob_body(repo, digest, Body::sized(reader, len))
    }

    /// PUTs a manifest under `reference` (tag or digest) with `media_type`; returns the status
    /// code and body so a test can see a rejection.
    pub fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: Vec<u8>,
    ) -> Result<http::Fetched> {
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.url());
        let request = self
            .authed(http::client()?.put(url))
            .header("Content-Type", media_type);
        http::fetch(request.body(bytes))
    }

    /// Adds this registry's credentials (if any) to a request.
    pub fn authed(
        &self,
        request: reqwest::blocking::RequestBuilder,
    ) -> reqwest::blocking::RequestBuilder {
        match &self.creds {
            Some(c) => request.basic_auth(&c.user, Some(&c.pass)),
            None => request,
        }
    }

    fn push_blob_body(&self, repo: &str, digest: &str, body: Body) -> Result<()> {
        let client = http::client()?;
        let start = self.authed(client.post(format!("{}/v2/{repo}/blobs/uploads/", self.url())));
        let started = start.send().context("starting a blob upload")?;
        ensure!(
            started.status().as_u16() == 202,
            "upload start: {}",
            started.status()
        );
        let location = started
            .headers()
            .get("Location")
            .and_then(|v| v.to_str().ok())
            .context("upload start without Location")?
            .to_owned();
        let location = if location.starts_with("http") {
            location
        } else {
            format!("{}{location}", self.url())
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let put = self
            .authed(client.put(format!("{location}{sep}digest={digest}")))
            .header("Content-Type", "application/octet-stream")
            .body(body);
        let done = http::fetch(put).context("uploading the blob")?;
        ensure!(done.status.as_u16() == 201, "blob upload: {}", done.short());
        Ok(())
    }

    fn start_process(&mut self) -> Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .context("opening the registry log")?;
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "docker-registry"]);
                c
            }
            None => Command::new("docker-registry"),
        };
        // `ip netns exec` execs the program, so the child is the registry itself.
        let child = cmd
            .arg("serve")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting docker-registry")?;
        self.child = Some(child);
        let client = http::client()?;
        let url = format!("{}/v2/", self.url());
        poll("the registry to answer /v2/", START_TIMEOUT, || {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("docker-registry exited: {status}");
                }
            }
            let status = client.get(&url).send()?.status().as_u16();
            // 401 is "up" for an htpasswd registry.
            Ok((status == 200 || status == 401).then_some(()))
        })
    }

    fn sync_log(&self) -> Result<()> {
        let mark = self.marks.fetch_add(1, Ordering::Relaxed);
        let token = format!("e2e-log-mark-{}-{mark}", std::process::id());
        let url = format!("{}/v2/?{token}", self.url());
        let client = http::client()?;
        // Retried: right after many clients hung up, a busy origin link can drop the first SYNs.
        poll(
            "the registry to take a log marker",
            Duration::from_secs(60),
            || Ok(Some(client.get(&url).send().map(|_| ())?)),
        )?;
        poll(
            "the registry log to catch up",
            Duration::from_secs(10),
            || {
                let text = std::fs::read(&self.log_path)?;
                Ok(String::from_utf8_lossy(&text)
                    .contains(&token)
                    .then_some(()))
            },
        )
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn write_htpasswd(path: &Path, creds: &Creds) -> Result<()> {
    let out = Command::new("htpasswd")
        .args(["-Bbn", &creds.user, &creds.pass])
        .output()
        .context("running htpasswd (apache2-utils)")?;
    ensure!(
        out.status.success(),
        "htpasswd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(path, &out.stdout).context("writing htpasswd file")
}
