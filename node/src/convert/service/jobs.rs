//! The conversion service's persistent jobs: one JSON file per (repository, source manifest
//! digest) in `<work_dir>/jobs/`, written whole to a temporary file, synced and renamed (then
//! the directory synced), so a crash leaves each job as it was before or after a change.
//!
//! Invariants: a job is keyed by what it converts, so a repeated notification (the registry
//! delivers at least once) or a retag never queues a second conversion of the same manifest;
//! a job found `running` at start was interrupted and runs again (conversion is idempotent:
//! converted layers are cached in the work dir, blobs are HEADed before upload, and the target
//! tag is written last). Finished jobs are kept (so a re-push converts nothing) up to
//! [`KEEP_FINISHED`], oldest dropped first.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use shoal_proto::{Digest, RepoName};

/// Finished jobs kept on disk, at most.
const KEEP_FINISHED: usize = 10_000;

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Done,
    Failed,
    /// Not convertible (not an image, already Nydus): nothing to do, ever.
    Ignored,
}

impl JobState {
    pub fn name(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Ignored => "ignored",
        }
    }

    pub fn finished(self) -> bool {
        matches!(self, JobState::Done | JobState::Failed | JobState::Ignored)
    }

    pub const ALL: [JobState; 5] = [
        JobState::Queued,
        JobState::Running,
        JobState::Done,
        JobState::Failed,
        JobState::Ignored,
    ];
}

/// One conversion: a source manifest of one repository, and every tag it was pushed under.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub repository: RepoName,
    pub digest: Digest,
    /// Source tags, in the order they were pushed.
    pub tags: Vec<String>,
    pub state: JobState,
    pub attempts: u32,
    /// Why it failed or was ignored, or the last attempt's error while it is retried.
    #[serde(default)]
    pub reason: Option<String>,
    /// When the first notification for it arrived, and when the registry says it was pushed.
    pub received_ms: u64,
    #[serde(default)]
    pub pushed_ms: Option<u64>,
    /// Not before this (ms since the epoch): the backoff after a failed attempt.
    #[serde(default)]
    pub not_before_ms: u64,
    #[serde(default)]
    pub finished_ms: Option<u64>,
    /// The converted image: its repository and the digest the target tags name.
    #[serde(default)]
    pub converted: Option<Converted>,
    /// Target tags written so far.
    #[serde(default)]
    pub published: Vec<String>,
}

/// What a finished conversion wrote.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Converted {
    pub repository: RepoName,
    pub digest: Digest,
    pub media_type: String,
    pub source_bytes_stored: u64,
    pub source_bytes_fetched: u64,
    pub chunks: u64,
    pub chunks_from_dict: u64,
    pub blobs_pushed: usize,
    pub seconds: f64,
    #[serde(default)]
    pub chunk_dict: Option<String>,
}

impl Job {
    /// The file name: sha256 of `repository@digest`.
    pub fn key(repository: &RepoName, digest: &Digest) -> String {
        Digest::sha256(format!("{repository}@{digest}").as_bytes()).hex()
    }

    pub fn id(&self) -> String {
        Self::key(&self.repository, &self.digest)
    }
}

/// The jobs directory and an in-memory copy of every job in it.
#[derive(Debug)]
pub struct Jobs {
    dir: PathBuf,
    jobs: HashMap<String, Job>,
}

impl Jobs {
    /// Loads `dir` (creating it); jobs left `running` go back to `queued`. A file that does not
    /// parse is moved aside (`.bad`) and reported, not fatal.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut jobs = HashMap::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(".tmp") {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let Some(key) = name.strip_suffix(".json") else {
                continue;
            };
            let parsed = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Job>(&b).ok())
                .filter(|j| j.id() == key);
            match parsed {
                Some(mut job) => {
                    if job.state == JobState::Running {
                        job.state = JobState::Queued;
                    }
                    jobs.insert(key.to_owned(), job);
                }
                None => {
                    tracing::warn!(file = %path.display(), "conversion job record unreadable: moved aside");
                    let _ = std::fs::rename(&path, path.with_extension("bad"));
                }
            }
        }
        let mut me = Self {
            dir: dir.to_path_buf(),
            jobs,
        };
        for job in me.jobs.values().cloned().collect::<Vec<_>>() {
            me.save(&job)?;
        }
        Ok(me)
    }

    pub fn get(&self, key: &str) -> Option<&Job> {
        self.jobs.get(key)
    }

    pub fn all(&self) -> impl Iterator<Item = &Job> {
        self.jobs.values()
    }

    pub fn count(&self, state: JobState) -> usize {
        self.jobs.values().filter(|j| j.state == state).count()
    }

    /// Writes `job` durably and keeps it.
    pub fn save(&mut self, job: &Job) -> std::io::Result<()> {
        let key = job.id();
        let path = self.dir.join(format!("{key}.json"));
        let tmp = self.dir.join(format!("{key}.tmp"));
        let bytes = serde_json::to_vec_pretty(job).map_err(std::io::Error::other)?;
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        self.jobs.insert(key, job.clone());
        if job.state.finished() {
            self.prune();
        }
        Ok(())
    }

    /// The next job to run at `now_ms`: queued and out of its backoff, oldest first.
    pub fn next(&self, now_ms: u64) -> Option<Job> {
        self.jobs
            .values()
            .filter(|j| j.state == JobState::Queued && j.not_before_ms <= now_ms)
            .min_by_key(|j| (j.received_ms, j.id()))
            .cloned()
    }

    /// When the earliest backed-off queued job may run.
    pub fn next_wake(&self) -> Option<u64> {
        self.jobs
            .values()
            .filter(|j| j.state == JobState::Queued)
            .map(|j| j.not_before_ms)
            .min()
    }

    /// The most recent successful conversion of `repository` (the chunk dictionary of its next).
    pub fn previous(&self, repository: &RepoName, except: &str) -> Option<&Job> {
        self.jobs
            .values()
            .filter(|j| {
                &j.repository == repository && j.state == JobState::Done && j.id() != except
            })
            .filter(|j| j.converted.is_some())
            .max_by_key(|j| j.finished_ms)
    }

    fn prune(&mut self) {
        let finished: Vec<(u64, String)> = self
            .jobs
            .values()
            .filter(|j| j.state.finished())
            .map(|j| (j.finished_ms.unwrap_or(0), j.id()))
            .collect();
        if finished.len() <= KEEP_FINISHED {
            return;
        }
        let mut finished = finished;
        finished.sort();
        for (_, key) in finished.iter().take(finished.len() - KEEP_FINISHED) {
            let _ = std::fs::remove_file(self.dir.join(format!("{key}.json")));
            self.jobs.remove(key);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn job(repo: &str, n: u8, state: JobState) -> Job {
        Job {
            repository: repo.parse().unwrap(),
            digest: Digest::sha256(&[n]),
            tags: vec![format!("t{n}")],
            state,
            attempts: 0,
            reason: None,
            received_ms: u64::from(n),
            pushed_ms: None,
            not_before_ms: 0,
            finished_ms: None,
            converted: None,
            published: Vec::new(),
        }
    }

    #[test]
    fn jobs_survive_a_restart_and_interrupted_ones_run_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut jobs = Jobs::open(dir.path()).unwrap();
        jobs.save(&job("a", 1, JobState::Running)).unwrap();
        jobs.save(&job("a", 2, JobState::Queued)).unwrap();
        jobs.save(&job("b", 3, JobState::Done)).unwrap();
        std::fs::write(dir.path().join("junk.json"), b"{").unwrap();
        std::fs::write(dir.path().join("x.tmp"), b"half").unwrap();
        drop(jobs);
        let jobs = Jobs::open(dir.path()).unwrap();
        assert_eq!(jobs.count(JobState::Queued), 2);
        assert_eq!(jobs.count(JobState::Done), 1);
        assert_eq!(jobs.next(0).unwrap().tags, vec!["t1".to_owned()]);
        assert!(dir.path().join("junk.bad").exists());
        assert!(!dir.path().join("x.tmp").exists());
    }

    #[test]
    fn backoff_and_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut jobs = Jobs::open(dir.path()).unwrap();
        let mut a = job("a", 1, JobState::Queued);
        a.not_before_ms = 100;
        jobs.save(&a).unwrap();
        jobs.save(&job("a", 2, JobState::Queued)).unwrap();
        assert_eq!(jobs.next(50).unwrap().digest, Digest::sha256(&[2]));
        jobs.save(&job("a", 2, JobState::Done)).unwrap();
        assert!(jobs.next(50).is_none());
        assert_eq!(jobs.next_wake(), Some(100));
        assert_eq!(jobs.next(100).unwrap().digest, Digest::sha256(&[1]));
    }
}
