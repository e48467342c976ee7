//! The conversion service (`[convert]` in the node's config): the registry notifies pushes,
//! and each pushed image that the rules select is converted to Nydus and pushed beside the
//! original — `app:1` becomes `app:1-nydus` (or the same tag in another repository) minutes
//! before the first node wants it, without anyone running a command.
//!
//! Flow: `POST /events` on `convert.listen` (secret checked, body bounded, parsed by
//! [`events`]) → rules (repository and tag globs; a tag already carrying the target suffix is
//! never converted) → a persistent job per (repository, manifest digest) ([`jobs`]) → workers
//! run [`crate::convert::convert`] with the source layers read through the node's store and
//! download path ([`StoreLayers`]: what the cluster pulled already is read from disk, the rest
//! comes from peers or the origin once and stays cached), the previous conversion of the same
//! repository as chunk dictionary, and the configured registry's credentials → the target tag
//! (written last) → optionally a cluster prewarm of the result.
//!
//! Trust: a notification is the sender's word. Without the shared secret it is refused (401)
//! before its body is read; with it, only repository, tag and digest are taken from it, and the
//! service reads and pushes only the registry it was configured with — a notification cannot
//! point the node at another host. What is converted is what that registry serves for the
//! digest, verified.
//!
//! Invariants: one job per (repository, digest), so repeated notifications and retags convert
//! nothing again (a retag only copies the converted manifest to the new target tag); a job
//! interrupted by a crash runs again and, conversion being idempotent with the tag written last,
//! ends exactly as one uninterrupted run would; failures are retried with backoff
//! (10 s doubling to 10 min) up to `convert.max_attempts`, then kept as `failed` with the reason.

pub mod events;
pub mod glob;
pub mod jobs;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::future::BoxFuture;
use serde::Serialize;
use shoal_proto::{Digest, Reference, RepoName};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::jobs::{Job, JobState, Jobs};
use super::auth::Credentials;
use super::image::ImageError;
use super::layer::{LayerInput, LayerSource, ReadFrom};
use super::registry::Registry;
use super::{ConvertError, ConvertOptions};
use crate::config::{ConvertDict, ConvertPrewarm, ConvertService as Settings, ConvertTarget};
use crate::download::{Downloads, Join, Source, State as DlState};
use crate::metrics::{KindLabels, Metrics};
use crate::store::{BlobReader, Store};
use crate::upstream::{AuthMode, Origin};

/// How long a notification's body may take to arrive.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// First retry delay; doubles per attempt up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// Jobs listed by the status call, newest first.
const STATUS_JOBS: usize = 100;

/// What the service needs from the node.
pub struct ServiceDeps {
    pub store: Store,
    pub downloads: Downloads,
    /// The configured origin `convert.registry` names.
    pub origin: Arc<Origin>,
    pub metrics: Arc<Metrics>,
    /// The schedulers and the key to sign prewarm jobs with (`None`: no cluster).
    pub scheduler: Option<(String, [u8; 32])>,
    pub tracker: TaskTracker,
    pub cancel: CancellationToken,
}

/// The running service. Cheap to clone.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: Settings,
    jobs: Mutex<Jobs>,
    wake: Notify,
    store: Store,
    downloads: Downloads,
    origin: Arc<Origin>,
    metrics: Arc<Metrics>,
    scheduler: Option<(String, [u8; 32])>,
    secret_hash: [u8; 32],
}

impl Service {
    /// Opens the job queue in `cfg.work_dir` and starts `cfg.jobs` workers.
    pub fn start(cfg: Settings, deps: ServiceDeps) -> anyhow::Result<Self> {
        let dir = cfg.work_dir.join("jobs");
        let jobs = Jobs::open(&dir)
            .map_err(|e| anyhow::anyhow!("convert job queue {}: {e}", dir.display()))?;
        let queued = jobs.count(JobState::Queued);
        // Builds a killed run left half-done (`layers/<key>.tmp<pid>`): this work dir is the
        // service's alone, so none of them is still being written.
        if let Ok(entries) = std::fs::read_dir(cfg.work_dir.join("layers")) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().contains(".tmp") {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let secret_hash = sha(&cfg.secret);
        let inner = Arc::new(Inner {
            jobs: Mutex::new(jobs),
            wake: Notify::new(),
            store: deps.store,
            downloads: deps.downloads,
            origin: deps.origin,
            metrics: deps.metrics,
            scheduler: deps.scheduler,
            secret_hash,
            cfg,
        });
        inner.update_gauges();
        tracing::info!(listen = %inner.cfg.listen, registry = %inner.cfg.registry.host, queued, "conversion service ready");
        for _ in 0..inner.cfg.jobs {
            let (inner, cancel) = (inner.clone(), deps.cancel.clone());
            deps.tracker.spawn(async move { inner.work(cancel).await });
        }
        Ok(Self { inner })
    }

    /// The notification endpoint (`POST /events`).
    pub fn router(&self) -> Router {
        Router::new()
            .route("/events", post(notify))
            .route("/healthz", get(|| async { "ok\n" }))
            .with_state(self.inner.clone())
    }

    /// The control socket's `GET /api/v1/convert` (repository names: not on the open admin
    /// listener).
    pub fn control_router(&self) -> Router {
        Router::new()
            .route(
                "/api/v1/convert",
                get(|State(inner): State<Arc<Inner>>| async move { Json(inner.status()) }),
            )
            .with_state(self.inner.clone())
    }
}

fn sha(s: &str) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(s.as_bytes()).into()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The answer to a notification.
#[derive(Debug, Serialize)]
struct Accepted {
    queued: usize,
    retagged: usize,
    duplicate: usize,
    ignored: Vec<String>,
}

async fn notify(State(inner): State<Arc<Inner>>, req: Request) -> Response {
    let count = |kind| {
        inner
            .metrics
            .convert_notifications
            .get_or_create(&KindLabels { kind })
            .inc();
    };
    if !inner.authorized(req.headers()) {
        count("unauthorized");
        tracing::warn!("conversion service: notification without the secret refused");
        return (
            StatusCode::UNAUTHORIZED,
            "notification secret missing or wrong\n",
        )
            .into_response();
    }
    let body = match tokio::time::timeout(
        BODY_TIMEOUT,
        axum::body::to_bytes(req.into_body(), events::MAX_BODY),
    )
    .await
    {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => {
            count("malformed");
            return (StatusCode::PAYLOAD_TOO_LARGE, "notification too large\n").into_response();
        }
        Err(_) => {
            count("malformed");
            return (StatusCode::REQUEST_TIMEOUT, "notification body too slow\n").into_response();
        }
    };
    let parsed = match events::parse(&body) {
        Ok(p) => p,
        Err(e) => {
            count("malformed");
            tracing::warn!(error = %e, "conversion service: malformed notification");
            return (
                StatusCode::BAD_REQUEST,
                format!("malformed notification: {e}\n"),
            )
                .into_response();
        }
    };
    let mut ignored = Vec::new();
    for i in &parsed.ignored {
        tracing::info!(event = %i.what, why = i.why, "conversion service: event ignored");
        ignored.push(format!("{}: {}", i.what, i.why));
    }
    let mut selected = Vec::new();
    for p in parsed.pushes {
        match inner.select(&p) {
            Ok(()) => selected.push(p),
            Err(why) => {
                let what = format!("{}:{}", p.repository, p.tag);
                tracing::info!(image = %what, why, "conversion service: push ignored");
                ignored.push(format!("{what}: {why}"));
            }
        }
    }
    match inner.enqueue(selected) {
        Ok(mut a) => {
            count("accepted");
            a.ignored = ignored;
            (StatusCode::OK, Json(a)).into_response()
        }
        Err(EnqueueError::Full) => {
            count("full");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "conversion queue full (convert.max_queue); try again later\n",
            )
                .into_response()
        }
        Err(EnqueueError::Io(e)) => {
            tracing::error!(error = %e, "conversion service: writing the job queue");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "could not record the job\n",
            )
                .into_response()
        }
    }
}

enum EnqueueError {
    Full,
    Io(std::io::Error),
}

/// One job as `shoal convert status` shows it.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct JobView {
    pub id: String,
    pub repository: String,
    pub digest: String,
    pub tags: Vec<String>,
    pub state: String,
    pub attempts: u32,
    pub reason: Option<String>,
    pub received_ms: u64,
    pub finished_ms: Option<u64>,
    pub target: Option<String>,
    pub published: Vec<String>,
    pub source_bytes_stored: Option<u64>,
    pub source_bytes_fetched: Option<u64>,
    pub chunks_from_dict: Option<u64>,
    pub seconds: Option<f64>,
    /// From the push (or the notification) to the converted tag.
    pub push_to_converted_seconds: Option<f64>,
}

/// The service's status (`GET /api/v1/convert` on the control socket).
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct StatusView {
    pub registry: String,
    pub queued: usize,
    pub running: usize,
    pub done: usize,
    pub failed: usize,
    pub ignored: usize,
    pub jobs: Vec<JobView>,
}

impl Inner {
    /// `Authorization: Bearer SECRET`, or the bare secret (Harbor's auth header).
    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(v) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        else {
            return false;
        };
        let v = v.trim();
        let token = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
            .unwrap_or(v)
            .trim();
        // Hashes compared, so the time taken says nothing about the secret.
        sha(token) == self.secret_hash
    }

    /// Whether the rules select a push, or why not.
    fn select(&self, p: &events::Push) -> Result<(), &'static str> {
        let cfg = &self.cfg;
        if cfg.target == ConvertTarget::Suffix && p.tag.ends_with(&cfg.tag_suffix) {
            return Err("its tag carries the target suffix (a conversion's result)");
        }
        if !cfg
            .repositories
            .iter()
            .any(|g| glob::matches(g, p.repository.as_str()))
        {
            return Err("repository not matched by convert.repositories");
        }
        if !cfg.tags.iter().any(|g| glob::matches(g, &p.tag)) {
            return Err("tag not matched by convert.tags");
        }
        if cfg.target == ConvertTarget::Repository
            && self.target_repository(&p.repository).as_ref() == Ok(&p.repository)
        {
            return Err("its repository is its own target");
        }
        Ok(())
    }

    fn target_repository(&self, source: &RepoName) -> Result<RepoName, String> {
        match self.cfg.target {
            ConvertTarget::Suffix => Ok(source.clone()),
            ConvertTarget::Repository => {
                let name = self
                    .cfg
                    .target_repository
                    .replace("{repository}", source.as_str());
                name.parse()
                    .map_err(|_| format!("target repository {name:?} is not a valid name"))
            }
        }
    }

    fn target_tag(&self, tag: &str) -> Result<String, String> {
        let t = match self.cfg.target {
            ConvertTarget::Suffix => format!("{tag}{}", self.cfg.tag_suffix),
            ConvertTarget::Repository => tag.to_owned(),
        };
        if events::valid_tag(&t) {
            Ok(t)
        } else {
            Err(format!("target tag {t:?} is not a valid tag (too long?)"))
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Jobs> {
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn enqueue(&self, pushes: Vec<events::Push>) -> Result<Accepted, EnqueueError> {
        let mut a = Accepted {
            queued: 0,
            retagged: 0,
            duplicate: 0,
            ignored: Vec::new(),
        };
        let now = now_ms();
        {
            let mut jobs = self.lock();
            let new = pushes
                .iter()
                .filter(|p| jobs.get(&Job::key(&p.repository, &p.digest)).is_none())
                .count();
            let waiting = jobs.count(JobState::Queued) + jobs.count(JobState::Running);
            if new > 0 && waiting + new > self.cfg.max_queue {
                return Err(EnqueueError::Full);
            }
            for p in pushes {
                let key = Job::key(&p.repository, &p.digest);
                let job = match jobs.get(&key).cloned() {
                    Some(mut job) => {
                        if job.tags.contains(&p.tag) {
                            a.duplicate += 1;
                            continue;
                        }
                        job.tags.push(p.tag.clone());
                        match job.state {
                            // The new tag is published when the job (re)runs.
                            JobState::Done => {
                                job.state = JobState::Queued;
                                job.not_before_ms = 0;
                                a.retagged += 1;
                            }
                            JobState::Failed => {
                                job.state = JobState::Queued;
                                job.attempts = 0;
                                job.not_before_ms = 0;
                                a.queued += 1;
                            }
                            JobState::Queued | JobState::Running => a.retagged += 1,
                            JobState::Ignored => a.duplicate += 1,
                        }
                        job
                    }
                    None => {
                        a.queued += 1;
                        Job {
                            repository: p.repository.clone(),
                            digest: p.digest.clone(),
                            tags: vec![p.tag.clone()],
                            state: JobState::Queued,
                            attempts: 0,
                            reason: None,
                            received_ms: now,
                            pushed_ms: p.at_ms,
                            not_before_ms: 0,
                            finished_ms: None,
                            converted: None,
                            published: Vec::new(),
                        }
                    }
                };
                tracing::info!(image = %format!("{}:{}", p.repository, p.tag), digest = %p.digest, state = job.state.name(), "conversion service: push recorded");
                jobs.save(&job).map_err(EnqueueError::Io)?;
            }
        }
        self.update_gauges();
        self.wake.notify_waiters();
        self.wake.notify_one();
        Ok(a)
    }

    fn update_gauges(&self) {
        let jobs = self.lock();
        for s in JobState::ALL {
            self.metrics
                .convert_jobs
                .get_or_create(&KindLabels { kind: s.name() })
                .set(jobs.count(s) as i64);
        }
    }

    fn status(&self) -> StatusView {
        let jobs = self.lock();
        let mut all: Vec<&Job> = jobs.all().collect();
        all.sort_by_key(|j| std::cmp::Reverse((j.received_ms, j.id())));
        let host = &self.cfg.registry.host;
        StatusView {
            registry: host.clone(),
            queued: jobs.count(JobState::Queued),
            running: jobs.count(JobState::Running),
            done: jobs.count(JobState::Done),
            failed: jobs.count(JobState::Failed),
            ignored: jobs.count(JobState::Ignored),
            jobs: all
                .into_iter()
                .take(STATUS_JOBS)
                .map(|j| {
                    let c = j.converted.as_ref();
                    JobView {
                        id: j.id()[..16].to_owned(),
                        repository: j.repository.to_string(),
                        digest: j.digest.to_string(),
                        tags: j.tags.clone(),
                        state: j.state.name().into(),
                        attempts: j.attempts,
                        reason: j.reason.clone(),
                        received_ms: j.received_ms,
                        finished_ms: j.finished_ms,
                        target: c.map(|c| format!("{host}/{}@{}", c.repository, c.digest)),
                        published: j.published.clone(),
                        source_bytes_stored: c.map(|c| c.source_bytes_stored),
                        source_bytes_fetched: c.map(|c| c.source_bytes_fetched),
                        chunks_from_dict: c.map(|c| c.chunks_from_dict),
                        seconds: c.map(|c| c.seconds),
                        push_to_converted_seconds: j.finished_ms.filter(|_| c.is_some()).map(|f| {
                            f.saturating_sub(
                                j.pushed_ms.unwrap_or(j.received_ms).min(j.received_ms),
                            ) as f64
                                / 1000.0
                        }),
                    }
                })
                .collect(),
        }
    }

    /// One worker: take the next runnable job, run it, record the outcome; until cancelled.
    async fn work(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            let now = now_ms();
            let next = {
                let mut jobs = self.lock();
                match jobs.next(now) {
                    Some(mut job) => {
                        job.state = JobState::Running;
                        job.attempts += 1;
                        match jobs.save(&job) {
                            Ok(()) => Ok(job),
                            Err(e) => {
                                tracing::error!(error = %e, "conversion service: writing the job queue");
                                Err(Duration::from_secs(5))
                            }
                        }
                    }
                    None => Err(jobs
                        .next_wake()
                        .map(|at| Duration::from_millis(at.saturating_sub(now).max(1)))
                        .unwrap_or(Duration::from_secs(3600))),
                }
            };
            let job = match next {
                Ok(job) => job,
                Err(wait) => {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(wait) => {}
                    }
                    continue;
                }
            };
            self.update_gauges();
            let result = tokio::select! {
                _ = cancel.cancelled() => {
                    // Left `running` on disk: the next start runs it again.
                    return;
                }
                r = self.run(&job) => r,
            };
            self.finish(job, result);
            self.update_gauges();
        }
    }

    /// Record how `job` ended.
    fn finish(&self, mut job: Job, result: Result<Outcome, RunError>) {
        let now = now_ms();
        let what = format!("{}@{}", job.repository, job.digest);
        let outcome = match result {
            Ok(Outcome::Converted(c, published)) => {
                let started = job
                    .pushed_ms
                    .unwrap_or(job.received_ms)
                    .min(job.received_ms);
                self.metrics
                    .convert_push_to_converted
                    .observe(now.saturating_sub(started) as f64 / 1000.0);
                for (kind, n) in [
                    ("store", c.source_bytes_stored),
                    ("fetched", c.source_bytes_fetched),
                ] {
                    self.metrics
                        .convert_source_bytes
                        .get_or_create(&KindLabels { kind })
                        .inc_by(n);
                }
                tracing::info!(image = %what, target = %format!("{}@{}", c.repository, c.digest), tags = ?published,
                    stored_bytes = c.source_bytes_stored, fetched_bytes = c.source_bytes_fetched,
                    chunks_from_dict = c.chunks_from_dict, seconds = c.seconds, "conversion service: converted");
                self.prewarm(&c, published.first());
                job.converted = Some(c);
                job.published = published;
                job.state = JobState::Done;
                job.reason = None;
                "converted"
            }
            Ok(Outcome::Retagged(published)) => {
                tracing::info!(image = %what, tags = ?published, "conversion service: already converted; tags published");
                job.published = published;
                job.state = JobState::Done;
                job.reason = None;
                "retagged"
            }
            Err(RunError::Ignore(reason)) => {
                tracing::info!(image = %what, %reason, "conversion service: not converted");
                job.state = JobState::Ignored;
                job.reason = Some(reason);
                "ignored"
            }
            Err(RunError::Fail(reason)) => {
                tracing::error!(image = %what, %reason, "conversion service: conversion failed for good");
                job.state = JobState::Failed;
                job.reason = Some(reason);
                "failed"
            }
            Err(RunError::Retry(reason)) if job.attempts < self.cfg.max_attempts => {
                let backoff = FIRST_BACKOFF
                    .saturating_mul(1 << job.attempts.saturating_sub(1).min(10))
                    .min(MAX_BACKOFF);
                tracing::warn!(image = %what, %reason, attempt = job.attempts, retry_in = ?backoff, "conversion service: conversion failed; will retry");
                job.state = JobState::Queued;
                job.not_before_ms = now + backoff.as_millis() as u64;
                job.reason = Some(reason);
                "retried"
            }
            Err(RunError::Retry(reason)) => {
                tracing::error!(image = %what, %reason, attempts = job.attempts, "conversion service: conversion failed; giving up");
                job.state = JobState::Failed;
                job.reason = Some(format!("after {} attempts: {reason}", job.attempts));
                "failed"
            }
        };
        if job.state.finished() {
            job.finished_ms = Some(now);
        }
        self.metrics
            .convert_outcomes
            .get_or_create(&KindLabels { kind: outcome })
            .inc();
        if let Err(e) = self.lock().save(&job) {
            tracing::error!(error = %e, image = %what, "conversion service: writing the job queue");
        }
    }

    fn registry(&self) -> Result<Registry, RunError> {
        Registry::new(&self.cfg.registry.host, self.plain_http(), self.creds())
            .map_err(|e| RunError::Retry(e.to_string()))
    }

    fn plain_http(&self) -> bool {
        self.cfg.registry.url.scheme() == "http"
    }

    fn creds(&self) -> Option<Credentials> {
        self.cfg
            .registry
            .credentials
            .as_ref()
            .map(|(user, pass)| Credentials {
                user: user.clone(),
                pass: pass.clone(),
            })
    }

    /// Convert `job` (or, when it was converted already, publish its new tags).
    async fn run(&self, job: &Job) -> Result<Outcome, RunError> {
        let host = &self.cfg.registry.host;
        let target_repo = self
            .target_repository(&job.repository)
            .map_err(RunError::Fail)?;
        let mut wanted = Vec::new();
        for t in &job.tags {
            wanted.push(self.target_tag(t).map_err(RunError::Fail)?);
        }
        if let Some(c) = &job.converted {
            let published = self.publish(c, &wanted, &job.published).await?;
            return Ok(Outcome::Retagged(published));
        }
        let first = wanted
            .first()
            .cloned()
            .ok_or_else(|| RunError::Fail("no tag".into()))?;
        let dict = match self.cfg.chunk_dict {
            ConvertDict::None => None,
            ConvertDict::Previous => {
                let jobs = self.lock();
                jobs.previous(&job.repository, &job.id())
                    .and_then(|p| p.converted.as_ref())
                    .map(|c| format!("{host}/{}@{}", c.repository, c.digest))
            }
        };
        let mut opts = ConvertOptions {
            src: format!("{host}/{}@{}", job.repository, job.digest),
            dst: format!("{host}/{target_repo}:{first}"),
            plain_http: self.plain_http(),
            platform: self.cfg.platform.clone(),
            chunk_dict: dict.clone(),
            build: shoal_rafs::build::BuildOptions::default(),
            prefetch: Vec::new(),
            src_creds: self.creds(),
            dst_creds: self.creds(),
            authfile: None,
            work_dir: self.cfg.work_dir.clone(),
            jobs: 2,
            auth_files: false,
            layers: Some(Arc::new(StoreLayers {
                store: self.store.clone(),
                downloads: self.downloads.clone(),
                origin: self.origin.clone(),
            })),
        };
        tracing::info!(source = %opts.src, target = %opts.dst, chunk_dict = ?dict, "conversion service: converting");
        let mut result = super::convert(opts.clone(), super::progress::Progress::none()).await;
        if let (Err(ConvertError::Dict { reason, .. }), Some(d)) = (&result, &dict) {
            // The previous version may be gone from the registry: convert without it.
            tracing::warn!(chunk_dict = %d, %reason, "conversion service: chunk dictionary unusable; converting without it");
            opts.chunk_dict = None;
            result = super::convert(opts.clone(), super::progress::Progress::none()).await;
        }
        let summary = match result {
            Ok(s) => s,
            Err(ConvertError::Image(
                e @ (ImageError::AlreadyNydus { .. }
                | ImageError::NotAnImage { .. }
                | ImageError::Schema1 { .. }
                | ImageError::NoPlatform { .. }),
            )) => return Err(RunError::Ignore(e.to_string())),
            Err(e @ (ConvertError::Reference(_) | ConvertError::TargetDigest { .. })) => {
                return Err(RunError::Fail(e.to_string()))
            }
            Err(e) => return Err(RunError::Retry(format!("{:#}", anyhow::Error::from(e)))),
        };
        let digest: Digest = summary
            .digest
            .parse()
            .map_err(|e| RunError::Retry(format!("converted digest: {e}")))?;
        let c = jobs::Converted {
            repository: target_repo,
            digest,
            media_type: if summary.platforms.len() > 1 {
                super::image::OCI_INDEX.into()
            } else {
                String::new()
            },
            source_bytes_stored: summary.source_bytes_stored,
            source_bytes_fetched: summary.source_bytes_fetched,
            chunks: summary.chunks,
            chunks_from_dict: summary.chunks_from_dict,
            blobs_pushed: summary.blobs_pushed,
            seconds: summary.seconds,
            chunk_dict: opts.chunk_dict,
        };
        let published = self.publish(&c, &wanted, &[first]).await?;
        Ok(Outcome::Converted(c, published))
    }

    /// Point every tag of `wanted` not yet in `done` at the converted manifest.
    async fn publish(
        &self,
        c: &jobs::Converted,
        wanted: &[String],
        done: &[String],
    ) -> Result<Vec<String>, RunError> {
        let mut published = done.to_vec();
        let missing: Vec<&String> = wanted.iter().filter(|t| !done.contains(t)).collect();
        if missing.is_empty() {
            return Ok(published);
        }
        let reg = self.registry()?;
        let m = reg
            .manifest(&c.repository, &Reference::Digest(c.digest.clone()))
            .await
            .map_err(|e| RunError::Retry(format!("reading the converted manifest: {e}")))?;
        for tag in missing {
            reg.put_manifest(&c.repository, tag, &m.media_type, m.bytes.clone())
                .await
                .map_err(|e| RunError::Retry(format!("tagging {}:{tag}: {e}", c.repository)))?;
            published.push(tag.clone());
        }
        Ok(published)
    }

    /// Start a cluster prewarm of the converted image, when configured.
    fn prewarm(&self, c: &jobs::Converted, tag: Option<&String>) {
        let full = match self.cfg.prewarm {
            ConvertPrewarm::None => return,
            ConvertPrewarm::Bootstrap => false,
            ConvertPrewarm::Full => true,
        };
        let Some((addr, key)) = self.scheduler.clone() else {
            tracing::warn!("convert.prewarm is set but the node has no p2p.schedulers: no prewarm");
            return;
        };
        let image = match tag {
            Some(t) => format!("{}/{}:{t}", self.cfg.registry.host, c.repository),
            None => format!("{}/{}@{}", self.cfg.registry.host, c.repository, c.digest),
        };
        tokio::spawn(async move {
            let client = match shoal_scheduler::client::SchedulerClient::new(
                &addr,
                &shoal_scheduler::client::ClientOptions::default(),
            ) {
                Ok(c) => c.with_auth(key),
                Err(e) => {
                    tracing::warn!(scheduler = %addr, error = %e, "conversion service: no prewarm");
                    return;
                }
            };
            let req = shoal_proto::sched::JobRequest {
                image: image.clone(),
                nodes: shoal_proto::sched::NodeSelector::All,
                full,
            };
            match client.create_job(&req).await {
                Ok(s) => tracing::info!(%image, job = %s.id, "conversion service: prewarm started"),
                Err(e) => {
                    tracing::warn!(%image, error = %e, "conversion service: prewarm not started")
                }
            }
        });
    }
}

/// How a run ended well.
enum Outcome {
    Converted(jobs::Converted, Vec<String>),
    Retagged(Vec<String>),
}

/// How a run ended badly.
enum RunError {
    /// Nothing to convert, ever (not an image, already Nydus).
    Ignore(String),
    /// Will not work however often it is tried.
    Fail(String),
    /// May work later (registry down, disk full, …).
    Retry(String),
}

/// Source layers through the node's store: a layer the store holds complete is read from disk
/// (verified piece by piece as it is read); any other is fetched through the node's download
/// path (peers, then the origin, with the node's credentials) into the store first, so the
/// cluster keeps it too.
pub struct StoreLayers {
    pub store: Store,
    pub downloads: Downloads,
    pub origin: Arc<Origin>,
}

impl std::fmt::Debug for StoreLayers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoreLayers({})", self.origin.host)
    }
}

impl LayerSource for StoreLayers {
    fn open<'a>(
        &'a self,
        repo: &'a RepoName,
        digest: &'a Digest,
        size: u64,
    ) -> BoxFuture<'a, Result<LayerInput, ConvertError>> {
        Box::pin(async move {
            let fail = |reason: String| {
                ConvertError::Internal(format!(
                    "source layer {digest} through the node's store: {reason}"
                ))
            };
            // The node's store serves a conversion only what the configured origin lets the node
            // read in this very repository (as it does a lazy mount).
            crate::mount::resolve::node_access(&self.store, &self.origin, repo, digest)
                .await
                .map_err(fail)?;
            let held = self
                .store
                .blob(digest)
                .map_err(|e| fail(e.to_string()))?
                .is_some_and(|r| r.complete && r.size == size);
            let source = Source {
                origin: self.origin.clone(),
                repo: repo.clone(),
                auth: AuthMode::Node,
                // Read with the node's credentials: nothing here says anyone else may.
                open: false,
                isolated: false,
            };
            // Held from here until the reader is open, so eviction cannot take it in between.
            let _pin = self.store.pin(digest);
            match self
                .downloads
                .join_shared(digest, source)
                .await
                .map_err(|e| fail(e.to_string()))?
            {
                Join::Complete => {}
                Join::Elsewhere => return Err(fail("another download holds it".into())),
                Join::Download(d) => {
                    let mut rx = d.subscribe();
                    loop {
                        let state = rx.borrow_and_update().state.clone();
                        match state {
                            DlState::Complete => break,
                            DlState::Failed(e) => {
                                return Err(fail(format!("download failed: {e}")))
                            }
                            DlState::Running => {}
                        }
                        if rx.changed().await.is_err() {
                            return Err(fail("download ended without a result".into()));
                        }
                    }
                }
            }
            let reader = self
                .store
                .open_reader(digest)
                .map_err(|e| fail(e.to_string()))?
                .filter(|r| r.record().complete)
                .ok_or_else(|| fail("gone from the store after its download".into()))?;
            if reader.size() != size {
                return Err(fail(format!(
                    "the store holds {} bytes, the manifest says {size}",
                    reader.size()
                )));
            }
            let from = if held {
                ReadFrom::Store
            } else {
                ReadFrom::Fetched
            };
            Ok((
                Box::new(StoreRead { reader, pos: 0 }) as Box<dyn std::io::Read + Send>,
                from,
            ))
        })
    }
}

/// `std::io::Read` over a store reader.
struct StoreRead {
    reader: BlobReader,
    pos: u64,
}

impl std::io::Read for StoreRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self
            .reader
            .read_at(self.pos, buf)
            .map_err(std::io::Error::other)?;
        self.pos += n as u64;
        Ok(n)
    }
}
