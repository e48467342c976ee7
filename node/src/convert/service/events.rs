//! Registry notifications → pushes: CNCF distribution's event envelopes
//! (`application/vnd.docker.distribution.events.v1+json`, `{"events": [...]}`) and Harbor's
//! webhooks (`{"type": "PUSH_ARTIFACT", "event_data": {...}}`).
//!
//! Everything in a notification is the sender's word: only the repository, tag and manifest
//! digest are taken, each parsed into its strict type; the registry a notification names (its
//! `url`, `request.host`, Harbor's `resource_url`) is never used — the service reads and pushes
//! only the registry it was configured with.

use serde::Deserialize;
use shoal_proto::{Digest, RepoName};

/// Largest notification body read.
pub const MAX_BODY: usize = 1 << 20;
/// Events of one envelope looked at, at most.
const MAX_EVENTS: usize = 1000;

/// A pushed, tagged manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    pub repository: RepoName,
    pub tag: String,
    pub digest: Digest,
    /// When the registry says it happened (ms since the epoch), if it said.
    pub at_ms: Option<u64>,
}

/// An event that names nothing to convert, and why (logged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ignored {
    pub what: String,
    pub why: &'static str,
}

/// What one notification holds.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub pushes: Vec<Push>,
    pub ignored: Vec<Ignored>,
}

/// Why a body is not a notification (400).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Malformed {
    #[error("not JSON: {0}")]
    Json(String),
    #[error(
        "neither a distribution envelope (`events`) nor a Harbor webhook (`type`, `event_data`)"
    )]
    Shape,
    #[error("more than {MAX_EVENTS} events in one notification")]
    TooMany,
}

/// Manifest media types a push of which may be an image (the manifest itself tells later).
const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

#[derive(Deserialize)]
struct Envelope {
    events: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Event {
    #[serde(default)]
    action: String,
    #[serde(default)]
    timestamp: Option<String>,
    target: Target,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Target {
    #[serde(default)]
    media_type: String,
    #[serde(default)]
    digest: Option<String>,
    #[serde(default)]
    repository: String,
    #[serde(default)]
    tag: Option<String>,
}

#[derive(Deserialize)]
struct Harbor {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    occur_at: Option<u64>,
    event_data: HarborData,
}

#[derive(Deserialize)]
struct HarborData {
    #[serde(default)]
    resources: Vec<HarborResource>,
    repository: HarborRepo,
}

#[derive(Deserialize)]
struct HarborResource {
    #[serde(default)]
    digest: Option<String>,
    #[serde(default)]
    tag: Option<String>,
}

#[derive(Deserialize)]
struct HarborRepo {
    #[serde(default)]
    repo_full_name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

/// Parse one notification body.
pub fn parse(body: &[u8]) -> Result<Parsed, Malformed> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| Malformed::Json(e.to_string()))?;
    if v.get("events").is_some() {
        let env: Envelope = serde_json::from_value(v).map_err(|_| Malformed::Shape)?;
        if env.events.len() > MAX_EVENTS {
            return Err(Malformed::TooMany);
        }
        let mut out = Parsed::default();
        for raw in env.events {
            match serde_json::from_value::<Event>(raw) {
                Ok(ev) => distribution_event(ev, &mut out),
                Err(_) => out.ignored.push(Ignored {
                    what: "an event".into(),
                    why: "not an event (no target)",
                }),
            }
        }
        return Ok(out);
    }
    if v.get("type").is_some() && v.get("event_data").is_some() {
        let h: Harbor = serde_json::from_value(v).map_err(|_| Malformed::Shape)?;
        return Ok(harbor(h));
    }
    Err(Malformed::Shape)
}

fn distribution_event(ev: Event, out: &mut Parsed) {
    let t = ev.target;
    let what = format!(
        "{} {}{}",
        ev.action,
        t.repository,
        t.tag
            .as_deref()
            .map(|x| format!(":{x}"))
            .unwrap_or_default()
    );
    let mut ignore = |why| {
        out.ignored.push(Ignored {
            what: what.clone(),
            why,
        })
    };
    if ev.action != "push" {
        return ignore("not a push");
    }
    if !MANIFEST_TYPES.contains(&t.media_type.as_str()) {
        return ignore("not an image manifest (a blob, or an artifact's media type)");
    }
    let Some(tag) = t.tag.filter(|x| !x.is_empty()) else {
        return ignore("pushed by digest, without a tag");
    };
    let at_ms = ev.timestamp.as_deref().and_then(rfc3339_ms);
    push(out, &t.repository, &tag, t.digest.as_deref(), at_ms, &what);
}

fn harbor(h: Harbor) -> Parsed {
    let mut out = Parsed::default();
    let repo = match (
        &h.event_data.repository.repo_full_name,
        &h.event_data.repository.namespace,
        &h.event_data.repository.name,
    ) {
        (Some(full), _, _) => full.clone(),
        (None, Some(ns), Some(name)) => format!("{ns}/{name}"),
        (None, None, Some(name)) => name.clone(),
        _ => String::new(),
    };
    if h.kind != "PUSH_ARTIFACT" {
        out.ignored.push(Ignored {
            what: format!("{} {repo}", h.kind),
            why: "not a push",
        });
        return out;
    }
    if h.event_data.resources.len() > MAX_EVENTS {
        out.ignored.push(Ignored {
            what: repo,
            why: "too many resources",
        });
        return out;
    }
    // Harbor sends seconds.
    let at_ms = h.occur_at.map(|s| s.saturating_mul(1000));
    for r in h.event_data.resources {
        let what = format!("push {repo}:{}", r.tag.as_deref().unwrap_or(""));
        match r.tag.filter(|x| !x.is_empty()) {
            Some(tag) => push(&mut out, &repo, &tag, r.digest.as_deref(), at_ms, &what),
            None => out.ignored.push(Ignored {
                what,
                why: "pushed by digest, without a tag",
            }),
        }
    }
    out
}

fn push(
    out: &mut Parsed,
    repo: &str,
    tag: &str,
    digest: Option<&str>,
    at_ms: Option<u64>,
    what: &str,
) {
    let mut ignore = |why| {
        out.ignored.push(Ignored {
            what: what.to_owned(),
            why,
        })
    };
    let Ok(repository) = repo.parse::<RepoName>() else {
        return ignore("not a valid repository name");
    };
    if !valid_tag(tag) {
        return ignore("not a valid tag");
    }
    let Some(Ok(digest)) = digest.map(str::parse::<Digest>) else {
        return ignore("no valid manifest digest");
    };
    out.pushes.push(Push {
        repository,
        tag: tag.to_owned(),
        digest,
        at_ms,
    });
}

/// The distribution spec's tag grammar: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
pub fn valid_tag(t: &str) -> bool {
    let mut chars = t.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric() || c == '_')
        && t.len() <= 128
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// `2006-01-02T15:04:05.999999999Z` (or with an offset) → ms since the epoch.
fn rfc3339_ms(s: &str) -> Option<u64> {
    let s = s.trim();
    if s.len() < 20 || !s.is_char_boundary(19) {
        return None;
    }
    let (date, rest) = s.split_at(19);
    let num = |a: usize, b: usize| date.get(a..b)?.parse::<i64>().ok();
    let (y, mo, d, h, mi, se) = (
        num(0, 4)?,
        num(5, 7)?,
        num(8, 10)?,
        num(11, 13)?,
        num(14, 16)?,
        num(17, 19)?,
    );
    let (frac, zone) = match rest.strip_prefix('.') {
        Some(r) => {
            let end = r.find(|c: char| !c.is_ascii_digit()).unwrap_or(r.len());
            let digits = &r[..end.min(3)];
            let ms = format!("{digits:0<3}").parse::<i64>().ok()?;
            (ms, &r[end..])
        }
        None => (0, rest),
    };
    let offset_min = match zone {
        "Z" | "z" => 0,
        z if z.len() == 6 => {
            let sign = if z.starts_with('-') { -1 } else { 1 };
            sign * (z.get(1..3)?.parse::<i64>().ok()? * 60 + z.get(4..6)?.parse::<i64>().ok()?)
        }
        _ => return None,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    let secs = days * 86400 + h * 3600 + mi * 60 + se - offset_min * 60;
    u64::try_from(secs * 1000 + frac).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn envelope(events: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({ "events": events })).unwrap()
    }

    #[test]
    fn a_tagged_manifest_push_is_a_push_and_everything_else_is_ignored() {
        let body = envelope(serde_json::json!([
            {"id": "1", "timestamp": "2026-12-07T12:00:01.5Z", "action": "push",
             "target": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": DIGEST,
                        "repository": "team/app", "tag": "1",
                        "url": "http://evil.example/v2/team/app/manifests/sha256:x"},
             "request": {"host": "evil.example"}},
            {"action": "pull", "target": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": DIGEST, "repository": "a", "tag": "1"}},
            {"action": "push", "target": {"mediaType": "application/octet-stream", "digest": DIGEST, "repository": "a"}},
            {"action": "push", "target": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": DIGEST, "repository": "a"}},
            {"action": "push", "target": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": DIGEST, "repository": "../etc", "tag": "1"}},
            {"action": "push", "target": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": DIGEST, "repository": "a", "tag": "-bad"}},
            {"action": "push", "target": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "md5:x", "repository": "a", "tag": "1"}},
            {"no": "target"}
        ]));
        let p = parse(&body).unwrap();
        assert_eq!(
            p.pushes,
            vec![Push {
                repository: "team/app".parse().unwrap(),
                tag: "1".into(),
                digest: DIGEST.parse().unwrap(),
                at_ms: Some(1_796_644_801_500),
            }]
        );
        let whys: Vec<&str> = p.ignored.iter().map(|i| i.why).collect();
        assert_eq!(whys.len(), 7, "{whys:?}");
        assert!(whys.contains(&"not a push"));
        assert!(whys.contains(&"pushed by digest, without a tag"));
        assert!(whys.contains(&"not a valid repository name"));
        assert!(whys.contains(&"not a valid tag"));
        assert!(whys.contains(&"no valid manifest digest"));
    }

    #[test]
    fn harbor_webhooks_name_their_repository_and_tags() {
        let body = serde_json::to_vec(&serde_json::json!({
            "type": "PUSH_ARTIFACT", "occur_at": 1_796_644_801u64, "operator": "ci",
            "event_data": {
                "resources": [{"digest": DIGEST, "tag": "v2", "resource_url": "evil.example/library/app:v2"}],
                "repository": {"name": "app", "namespace": "library", "repo_full_name": "library/app", "repo_type": "private"}
            }
        }))
        .unwrap();
        let p = parse(&body).unwrap();
        assert_eq!(p.pushes.len(), 1);
        assert_eq!(p.pushes[0].repository.as_str(), "library/app");
        assert_eq!(p.pushes[0].tag, "v2");
        assert_eq!(p.pushes[0].at_ms, Some(1_796_644_801_000));
        let pull =
            br#"{"type":"PULL_ARTIFACT","event_data":{"resources":[],"repository":{"name":"x"}}}"#;
        assert_eq!(parse(pull).unwrap().pushes.len(), 0);
    }

    #[test]
    fn bodies_that_are_not_notifications_are_malformed() {
        assert!(matches!(parse(b"{not json"), Err(Malformed::Json(_))));
        assert_eq!(parse(b"[]"), Err(Malformed::Shape));
        assert_eq!(parse(br#"{"events": 3}"#), Err(Malformed::Shape));
        assert_eq!(parse(br#"{"hello": "world"}"#), Err(Malformed::Shape));
        let many = envelope(serde_json::Value::Array(vec![
            serde_json::json!({});
            MAX_EVENTS + 1
        ]));
        assert_eq!(parse(&many), Err(Malformed::TooMany));
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(rfc3339_ms("1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(
            rfc3339_ms("2000-03-01T00:00:00.123456789Z"),
            Some(951_868_800_123)
        );
        assert_eq!(rfc3339_ms("garbage"), None);
        assert_eq!(rfc3339_ms("2000-03-01T00:00:00ééééé"), None);
    }
}
