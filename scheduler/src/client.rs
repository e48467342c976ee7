//! [`SchedulerClient`]: what a node uses to talk to one scheduler, and
//! [`SchedulerSet`]: several schedulers, with the blob → scheduler choice
//! (rendezvous hashing) that the schedulers themselves use.
//!
//! Every request has a timeout and carries `x-shoal-protocol: 1`; a
//! response from a scheduler speaking another major version (or from
//! something that is not a shoal scheduler) is an error
//! ([`ClientError::Version`]), never silently decoded. Plain HTTP only.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use shoal_proto::sched::{
    check_version, pick_scheduler, AccessList, AnnounceRequest, AnnounceResponse, ErrorBody,
    ErrorCode, FailureAck, FailureReport, JobId, JobList, JobRequest, JobStatus, ParentsRequest,
    ParentsResponse, StatusResponse, VersionError, API_PREFIX, PROTOCOL_HEADER, PROTOCOL_VERSION,
};
use shoal_proto::BlobId;

/// Largest response accepted (a status of a big cluster).
const MAX_RESPONSE: usize = 64 << 20;

/// Timeouts of a client.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Whole request, connect to last byte. Default 5s.
    pub timeout: Duration,
    /// TCP connect. Default 2s.
    pub connect_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
        }
    }
}

/// Why a scheduler request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("scheduler address {addr:?}: {reason}")]
    BadAddress { addr: String, reason: &'static str },
    #[error("scheduler {addr} did not answer in time")]
    Timeout { addr: String },
    #[error("scheduler {addr} unreachable: {source}")]
    Unreachable {
        addr: String,
        source: reqwest::Error,
    },
    #[error("scheduler {addr}: {source}")]
    Version { addr: String, source: VersionError },
    #[error("scheduler {addr} does not own this blob; {owner} does (are the scheduler lists the same everywhere?)")]
    WrongScheduler { addr: String, owner: String },
    #[error("scheduler {addr} refused the request ({status}): {message}")]
    Rejected {
        addr: String,
        status: u16,
        code: ErrorCode,
        message: String,
    },
    #[error("scheduler {addr} sent a bad response: {message}")]
    BadResponse { addr: String, message: String },
}

impl ClientError {
    /// Worth trying again later (the scheduler may come back).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Timeout { .. } | Self::Unreachable { .. } => true,
            Self::Rejected { status, .. } => *status >= 500,
            _ => false,
        }
    }
}

/// A client of one scheduler. Cheap to clone (shares the connection pool).
#[derive(Clone, Debug)]
pub struct SchedulerClient {
    addr: String,
    base: String,
    http: reqwest::Client,
    /// Signs POSTs (`shoal_proto::auth`) when set.
    auth_key: Option<[u8; 32]>,
}

impl SchedulerClient {
    /// `addr` is `host:port` or `http://host:port`.
    pub fn new(addr: &str, opts: &ClientOptions) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .timeout(opts.timeout)
            .connect_timeout(opts.connect_timeout)
            .build()
            .map_err(|_| ClientError::BadAddress {
                addr: addr.into(),
                reason: "cannot build an HTTP client",
            })?;
        Self::with_http(addr, http)
    }

    /// Use an existing reqwest client (its timeouts apply).
    pub fn with_http(addr: &str, http: reqwest::Client) -> Result<Self, ClientError> {
        let trimmed = addr.trim().trim_end_matches('/');
        let base = if trimmed.starts_with("https://") {
            return Err(ClientError::BadAddress {
                addr: addr.into(),
                reason: "schedulers speak plain HTTP (use host:port or http://host:port)",
            });
        } else if trimmed.starts_with("http://") {
            trimmed.to_string()
        } else {
            format!("http://{trimmed}")
        };
        if base.len() <= "http://".len() {
            return Err(ClientError::BadAddress {
                addr: addr.into(),
                reason: "empty",
            });
        }
        Ok(Self {
            addr: addr.trim().to_string(),
            base,
            http,
            auth_key: None,
        })
    }

    /// Sign requests with `key` (`derive_key(secret, SCHEDULER_LABEL)`), as
    /// a scheduler with a join secret requires.
    pub fn with_auth(mut self, key: [u8; 32]) -> Self {
        self.auth_key = Some(key);
        self
    }

    /// The address as given (what [`pick_scheduler`] hashes).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Heartbeat plus piece updates. Send `full: true` after start and
    /// whenever the answer has `resync: true`.
    pub async fn announce(&self, req: &AnnounceRequest) -> Result<AnnounceResponse, ClientError> {
        self.post("/announce", req).await
    }

    /// Ranked holders of `blob` and its origin lease. Send it to the blob's
    /// scheduler ([`SchedulerSet::for_blob`]).
    pub async fn parents(
        &self,
        blob: &BlobId,
        req: &ParentsRequest,
    ) -> Result<ParentsResponse, ClientError> {
        self.post(&format!("/blobs/{blob}/parents"), req).await
    }

    /// Blame `report.peer` (a bad piece makes the scheduler avoid it).
    pub async fn report_failure(
        &self,
        blob: &BlobId,
        report: &FailureReport,
    ) -> Result<FailureAck, ClientError> {
        self.post(&format!("/blobs/{blob}/failure"), report).await
    }

    /// Nodes, blobs and traffic as the scheduler sees them.
    pub async fn status(&self) -> Result<StatusResponse, ClientError> {
        self.get("/status").await
    }

    /// Start a prewarm job (what `shoal prewarm` does).
    pub async fn create_job(&self, req: &JobRequest) -> Result<JobStatus, ClientError> {
        self.post("/jobs", req).await
    }

    /// Every prewarm job the scheduler knows, newest first.
    pub async fn jobs(&self) -> Result<JobList, ClientError> {
        self.get("/jobs").await
    }

    /// One job, with each node's progress.
    pub async fn job(&self, id: JobId) -> Result<JobStatus, ClientError> {
        self.get(&format!("/jobs/{id}")).await
    }

    /// Cancel a job: its nodes stop (downloads already running finish).
    pub async fn cancel_job(&self, id: JobId) -> Result<JobStatus, ClientError> {
        let full_path = format!("{API_PREFIX}/jobs/{id}");
        let req = self
            .http
            .delete(format!("{}{full_path}", self.base))
            .header(PROTOCOL_HEADER, PROTOCOL_VERSION.to_string());
        let req = self.sign(req, "DELETE", &full_path, b"");
        self.send(req).await
    }

    /// Share the access list of the image whose bootstrap has digest `key`.
    pub async fn put_access_list(
        &self,
        key: &BlobId,
        list: &AccessList,
    ) -> Result<(), ClientError> {
        let body = serde_json::to_vec(list).map_err(|e| self.bad(format!("encoding: {e}")))?;
        let full_path = format!("{API_PREFIX}/access-lists/{key}");
        let req = self
            .http
            .put(format!("{}{full_path}", self.base))
            .header(PROTOCOL_HEADER, PROTOCOL_VERSION.to_string())
            .header("content-type", "application/json");
        let req = self.sign(req, "PUT", &full_path, &body);
        let _: serde_json::Value = self.send(req.body(body)).await?;
        Ok(())
    }

    /// The access list another node shared for the image whose bootstrap has digest `key`.
    pub async fn access_list(&self, key: &BlobId) -> Result<Option<AccessList>, ClientError> {
        match self.get(&format!("/access-lists/{key}")).await {
            Ok(list) => Ok(Some(list)),
            Err(ClientError::Rejected { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Adds the signature header when this client has a key.
    fn sign(
        &self,
        req: reqwest::RequestBuilder,
        method: &str,
        full_path: &str,
        body: &[u8],
    ) -> reqwest::RequestBuilder {
        let Some(key) = &self.auth_key else {
            return req;
        };
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        // The signature covers the Host the request is sent with: set it explicitly.
        let host = host_of(&self.base);
        let signed = shoal_proto::auth::Signed {
            method,
            host: &host,
            path: full_path,
            body,
        };
        req.header(reqwest::header::HOST, host.clone()).header(
            shoal_proto::auth::AUTH_HEADER,
            shoal_proto::auth::sign(key, &signed, now_ms),
        )
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let full_path = format!("{API_PREFIX}{path}");
        let req = self
            .http
            .get(format!("{}{full_path}", self.base))
            .header(PROTOCOL_HEADER, PROTOCOL_VERSION.to_string());
        // Reads are signed too: a scheduler with a join secret shows blobs and nodes to
        // cluster members only.
        let req = self.sign(req, "GET", &full_path, b"");
        self.send(req).await
    }

    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).map_err(|e| ClientError::BadResponse {
            addr: self.addr.clone(),
            message: format!("encoding the request: {e}"),
        })?;
        let full_path = format!("{API_PREFIX}{path}");
        let req = self
            .http
            .post(format!("{}{full_path}", self.base))
            .header(PROTOCOL_HEADER, PROTOCOL_VERSION.to_string())
            .header("content-type", "application/json");
        let req = self.sign(req, "POST", &full_path, &body);
        self.send(req.body(body)).await
    }

    async fn send<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let mut resp = req.send().await.map_err(|e| self.transport(e))?;
        let status = resp.status();
        let version = resp
            .headers()
            .get(PROTOCOL_HEADER)
            .map(|v| v.to_str().unwrap_or("?").to_string());
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.transport(e))? {
            if body.len() + chunk.len() > MAX_RESPONSE {
                return Err(self.bad(format!("response larger than {MAX_RESPONSE} bytes")));
            }
            body.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            return Err(self.error_reply(status.as_u16(), &body, version.as_deref()));
        }
        let Some(version) = version else {
            return Err(ClientError::Version {
                addr: self.addr.clone(),
                source: VersionError {
                    theirs: "none (not a shoal scheduler?)".into(),
                },
            });
        };
        check_version(&version).map_err(|source| ClientError::Version {
            addr: self.addr.clone(),
            source,
        })?;
        serde_json::from_slice(&body).map_err(|e| self.bad(format!("decoding JSON: {e}")))
    }

    fn error_reply(&self, status: u16, body: &[u8], version: Option<&str>) -> ClientError {
        let Ok(err) = serde_json::from_slice::<ErrorBody>(body) else {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            return ClientError::Rejected {
                addr: self.addr.clone(),
                status,
                code: ErrorCode::Other,
                message: text,
            };
        };
        match err.code {
            ErrorCode::ProtocolVersion => ClientError::Version {
                addr: self.addr.clone(),
                source: VersionError {
                    theirs: err
                        .supported
                        .map(|v| v.to_string())
                        .or(version.map(str::to_string))
                        .unwrap_or_else(|| "?".into()),
                },
            },
            ErrorCode::WrongScheduler => ClientError::WrongScheduler {
                addr: self.addr.clone(),
                owner: err.owner.unwrap_or_default(),
            },
            code => ClientError::Rejected {
                addr: self.addr.clone(),
                status,
                code,
                message: err.error,
            },
        }
    }

    fn transport(&self, e: reqwest::Error) -> ClientError {
        if e.is_timeout() {
            ClientError::Timeout {
                addr: self.addr.clone(),
            }
        } else {
            ClientError::Unreachable {
                addr: self.addr.clone(),
                source: e,
            }
        }
    }

    fn bad(&self, message: String) -> ClientError {
        ClientError::BadResponse {
            addr: self.addr.clone(),
            message,
        }
    }
}

/// Every scheduler of a cluster: announcements go to [`SchedulerSet::all`],
/// parents requests and failure reports to [`SchedulerSet::for_blob`].
#[derive(Clone, Debug)]
pub struct SchedulerSet {
    clients: Vec<SchedulerClient>,
    addrs: Vec<String>,
}

impl SchedulerSet {
    /// One client per address; they share one connection pool.
    pub fn new<S: AsRef<str>>(addrs: &[S], opts: &ClientOptions) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .timeout(opts.timeout)
            .connect_timeout(opts.connect_timeout)
            .build()
            .map_err(|_| ClientError::BadAddress {
                addr: String::new(),
                reason: "cannot build an HTTP client",
            })?;
        let clients = addrs
            .iter()
            .map(|a| SchedulerClient::with_http(a.as_ref(), http.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        let addrs = clients.iter().map(|c| c.addr.clone()).collect();
        Ok(Self { clients, addrs })
    }

    /// Sign every client's requests with `key` (see
    /// [`SchedulerClient::with_auth`]).
    pub fn with_auth(mut self, key: [u8; 32]) -> Self {
        for c in &mut self.clients {
            c.auth_key = Some(key);
        }
        self
    }

    pub fn all(&self) -> &[SchedulerClient] {
        &self.clients
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// The scheduler owning `blob` (`None` if the set is empty).
    pub fn for_blob(&self, blob: &BlobId) -> Option<&SchedulerClient> {
        let owner = pick_scheduler(blob, &self.addrs)?;
        self.clients.iter().find(|c| &c.addr == owner)
    }
}

/// `host[:port]` of a base URL, as sent in the `Host` header (default ports left out).
fn host_of(base: &str) -> String {
    match reqwest::Url::parse(base) {
        Ok(u) => match (u.host_str(), u.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_owned(),
            _ => String::new(),
        },
        Err(_) => String::new(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use shoal_proto::Digest;

    #[test]
    fn addresses() {
        let o = ClientOptions::default();
        assert_eq!(
            SchedulerClient::new("s1:5060", &o).unwrap().base,
            "http://s1:5060"
        );
        assert_eq!(
            SchedulerClient::new("http://s1:5060/", &o).unwrap().base,
            "http://s1:5060"
        );
        assert!(SchedulerClient::new("https://s1:5060", &o).is_err());
        assert!(SchedulerClient::new(" ", &o).is_err());
    }

    #[test]
    fn set_agrees_with_pick_scheduler() {
        let addrs = ["s1:5060", "s2:5060", "s3:5060"];
        let set = SchedulerSet::new(&addrs, &ClientOptions::default()).unwrap();
        for i in 0..50u32 {
            let blob = Digest::sha256(&i.to_le_bytes());
            let want = pick_scheduler(&blob, &addrs).unwrap();
            assert_eq!(set.for_blob(&blob).unwrap().addr(), *want);
        }
        let empty = SchedulerSet::new::<&str>(&[], &ClientOptions::default()).unwrap();
        assert!(empty.for_blob(&Digest::sha256(b"x")).is_none());
    }
}
