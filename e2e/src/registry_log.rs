//! Origin-side accounting parsed from the distribution registry's own JSON log (v2.8): one entry per
//! finished request (`"msg":"response completed"` or `"… with error"`), carrying
//! `http.request.method`, `http.request.uri`, `http.request.useragent`,
//! `http.request.remoteaddr`, `http.response.status` and `http.response.written`. These entries are the ground truth for "one origin fetch" and "zero
//! blob bytes from the origin". Non-JSON lines (the combined access log) and other messages are
//! ignored.

use serde_json::Value;

/// One request as the registry logged it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedRequest {
    pub method: String,
    /// Path and query as sent.
    pub uri: String,
    pub status: u16,
    /// Body bytes the registry wrote.
    pub written: u64,
    pub user_agent: String,
    /// The client's address as the registry saw it (`IP:port`; empty when not logged).
    pub remote: String,
}

impl LoggedRequest {
    /// The digest if this is a `/v2/<name>/blobs/<digest>` request (uploads excluded).
    pub fn blob_digest(&self) -> Option<&str> {
        let path = self.uri.split('?').next().unwrap_or_default();
        let (_, digest) = path.strip_prefix("/v2/")?.rsplit_once("/blobs/")?;
        (!digest.contains('/') && digest.contains(':')).then_some(digest)
    }

    /// Whether this is a `GET` of a blob that the registry answered with content (2xx).
    pub fn is_blob_fetch(&self) -> bool {
        self.method == "GET" && (200..300).contains(&self.status) && self.blob_digest().is_some()
    }
}

/// The parsed log.
#[derive(Debug, Clone, Default)]
pub struct RegistryLog {
    pub requests: Vec<LoggedRequest>,
}

impl RegistryLog {
    /// Parses the registry's combined stdout/stderr.
    pub fn parse(text: &str) -> Self {
        Self {
            requests: text.lines().filter_map(parse_line).collect(),
        }
    }

    /// `GET`s of blob `digest` answered with content.
    pub fn blob_fetches(&self, digest: &str) -> usize {
        self.requests
            .iter()
            .filter(|r| r.is_blob_fetch() && r.blob_digest() == Some(digest))
            .count()
    }

    /// Every request (any method, any status) for blob `digest`.
    pub fn blob_requests(&self, digest: &str) -> Vec<&LoggedRequest> {
        self.requests
            .iter()
            .filter(|r| r.blob_digest() == Some(digest))
            .collect()
    }

    /// Total blob body bytes written by blob `GET`s.
    pub fn blob_bytes_written(&self) -> u64 {
        self.requests
            .iter()
            .filter(|r| r.is_blob_fetch())
            .map(|r| r.written)
            .sum()
    }

    /// Number of blob `GET`s answered with content.
    pub fn blob_fetch_count(&self) -> usize {
        self.requests.iter().filter(|r| r.is_blob_fetch()).count()
    }

    /// The entries after the first `skip` (to look only at what happened since a mark).
    pub fn since(&self, skip: usize) -> RegistryLog {
        RegistryLog {
            requests: self.requests.iter().skip(skip).cloned().collect(),
        }
    }
}

fn parse_line(line: &str) -> Option<LoggedRequest> {
    let line = line.trim();
    if !line.starts_with('{') {
        return None;
    }
    let json: Value = serde_json::from_str(line).ok()?;
    let msg = json["msg"].as_str()?;
    if !msg.starts_with("response completed") {
        return None;
    }
    Some(LoggedRequest {
        method: json["http.request.method"].as_str()?.to_owned(),
        uri: json["http.request.uri"].as_str()?.to_owned(),
        status: u16::try_from(json["http.response.status"].as_u64()?).ok()?,
        written: json["http.response.written"].as_u64().unwrap_or(0),
        user_agent: json["http.request.useragent"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        remote: json["http.request.remoteaddr"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Real lines from docker-registry 2.8.2+ds1 (trimmed of fields we do not read).
    const LOG: &str = r#"{"level":"info","msg":"listening on 127.0.0.1:15000","time":"2026-11-27T21:31:47Z"}
{"http.request.method":"GET","http.request.uri":"/v2/","http.request.useragent":"curl/7.88.1","http.response.status":200,"http.response.written":2,"level":"info","msg":"response completed"}
127.0.0.1 - - [27/Nov/2026:21:31:48 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"
{"err.code":"blob unknown","http.request.method":"GET","http.request.uri":"/v2/foo/blobs/sha256:00","http.request.useragent":"curl/7.88.1","http.response.status":404,"http.response.written":157,"level":"error","msg":"response completed with error"}
{"http.request.method":"GET","http.request.uri":"/v2/test/python/blobs/sha256:cf92","http.request.useragent":"shoal","http.response.status":200,"http.response.written":21596650,"level":"info","msg":"response completed"}
{"http.request.method":"GET","http.request.uri":"/v2/test/python/blobs/sha256:cf92?ns=x","http.request.useragent":"curl","http.response.status":206,"http.response.written":100,"level":"info","msg":"response completed"}
{"http.request.method":"HEAD","http.request.uri":"/v2/test/python/blobs/sha256:cf92","http.response.status":200,"http.response.written":0,"msg":"response completed"}
{"http.request.method":"PATCH","http.request.uri":"/v2/test/python/blobs/uploads/0b1c?_state=x","http.response.status":202,"http.response.written":0,"msg":"response completed"}
"#;

    #[test]
    fn counts_blob_fetches_and_bytes() {
        let log = RegistryLog::parse(LOG);
        assert_eq!(log.requests.len(), 6);
        assert_eq!(log.blob_fetches("sha256:cf92"), 2);
        assert_eq!(log.blob_fetches("sha256:00"), 0, "a 404 is not a fetch");
        assert_eq!(log.blob_requests("sha256:cf92").len(), 3);
        assert_eq!(log.blob_bytes_written(), 21_596_750);
        assert_eq!(log.blob_fetch_count(), 2);
        assert_eq!(log.since(3).blob_fetch_count(), 1);
    }

    #[test]
    fn uploads_are_not_blobs() {
        let log = RegistryLog::parse(LOG);
        let patch = log.requests.iter().find(|r| r.method == "PATCH");
        assert_eq!(patch.and_then(LoggedRequest::blob_digest), None);
    }
}
