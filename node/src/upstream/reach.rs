//! Where the node may send requests on a client's behalf.
//!
//! A request can make the node talk to a host the *requester* chose: an unlisted registry named
//! by `?ns=`, `X-Shoal-Registry` or a forward-proxy URL, a redirect such an origin answers with,
//! or a `CONNECT` target. None of these may reach the node's own host — loopback, link-local
//! (cloud metadata services live there), unspecified, multicast, or any address assigned to this
//! host, where the node's admin and control listeners and every other local service live —
//! unless the operator allows it (`mirror.allow_local_upstreams`), or configured that very
//! registry. The check is made on the addresses actually connected to ([`GuardedResolver`]
//! filters DNS answers, so a name that rebinds to 127.0.0.1 is refused too), and again for every
//! redirect.
//!
//! [`ProxyTargets`] is the forward proxy's allow-list beyond the configured registries: hosts
//! those registries sent clients to (token realms, blob-storage redirects), learned as they are
//! seen, bounded, plus the operator's `mirror.proxy_allow` patterns.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Learned proxy targets kept at most.
const LEARNED_CAP: usize = 1024;
/// How long a learned proxy target stays allowed without being seen again.
const LEARNED_TTL: Duration = Duration::from_secs(24 * 3600);

/// Whether `ip` is on this host or otherwise not a place a remote registry can be: loopback,
/// unspecified, link-local, multicast, broadcast, or an address of one of this host's
/// interfaces.
pub fn is_local(ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let special = match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_unspecified()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.octets()[0] == 0
        }
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (v6.segments()[0] & 0xffc0) == 0xfe80
        }
    };
    // An address this host can bind to is one of its own.
    special || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// The IP of a URL host (`[::1]`, `127.0.0.1`), if it is a literal.
pub fn literal_ip(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// Whether the node may send a request for an unlisted origin to `url`: `http`/`https` only,
/// and an IP host (as the URL parser normalised it: `127.1`, `0x7f000001`, `2130706433`,
/// `0177.0.0.1` and `0` all arrive here as the address they mean) must not be local. A name
/// is left to [`GuardedResolver`], which checks what it resolves to; `localhost` and its
/// subdomains are refused outright. This is the one check for every URL a requester can steer:
/// the origin itself, its token realms and its redirects.
pub fn check_url(url: &reqwest::Url) -> Result<(), String> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "scheme {:?} refused (http or https only)",
            url.scheme()
        ));
    }
    let ip = match url.host() {
        Some(url::Host::Ipv4(v4)) => IpAddr::V4(v4),
        Some(url::Host::Ipv6(v6)) => IpAddr::V6(v6),
        Some(url::Host::Domain(d)) => {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            if d == "localhost" || d.ends_with(".localhost") {
                return Err(format!("{d} is this host"));
            }
            return Ok(());
        }
        None => return Err("a URL without a host".into()),
    };
    if is_local(ip) {
        return Err(format!(
            "{ip} is an address of this host (loopback, link-local or its own)"
        ));
    }
    Ok(())
}

/// A DNS resolver that drops local addresses (see [`is_local`]) from every answer, and fails a
/// name that resolves to nothing else.
#[derive(Debug, Clone, Copy, Default)]
pub struct GuardedResolver;

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept: Vec<SocketAddr> = found.into_iter().filter(|a| !is_local(a.ip())).collect();
            if kept.is_empty() {
                return Err(format!(
                    "{host} resolves only to addresses of this host (loopback, link-local or its own); \
                     configure it as an upstream or set mirror.allow_local_upstreams"
                )
                .into());
            }
            let addrs: Addrs = Box::new(kept.into_iter());
            Ok(addrs)
        })
    }
}

/// A redirect policy that refuses redirects to local IP literals (names are filtered by the
/// resolver) and follows at most 10.
pub fn guarded_redirects() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        if let Err(why) = check_url(attempt.url()) {
            attempt.error(format!("redirect refused: {why}"))
        } else if attempt.previous().len() >= 10 {
            attempt.error("too many redirects")
        } else {
            attempt.follow()
        }
    })
}

/// A redirect policy that follows up to 10 redirects and records each target host in `learn`
/// (a configured registry sending the node to its blob storage).
pub fn learning_redirects(learn: ProxyTargets) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        if let Some(host) = attempt.url().host_str() {
            let port = attempt.url().port_or_known_default().unwrap_or(443);
            learn.learn(&format!("{host}:{port}"));
        }
        if attempt.previous().len() >= 10 {
            attempt.error("too many redirects")
        } else {
            attempt.follow()
        }
    })
}

/// Hosts the forward proxy may carry non-registry traffic to, beyond the configured registries.
#[derive(Debug, Clone, Default)]
pub struct ProxyTargets {
    inner: Arc<Targets>,
}

#[derive(Debug, Default)]
struct Targets {
    /// `host:port` → last seen.
    learned: Mutex<HashMap<String, Instant>>,
    /// Operator patterns: `host`, `host:port`, `*.suffix`, `*.suffix:port`.
    patterns: Vec<String>,
}

impl ProxyTargets {
    /// Allow-list with the operator's `patterns`.
    pub fn new(patterns: Vec<String>) -> Self {
        Self {
            inner: Arc::new(Targets {
                learned: Mutex::new(HashMap::new()),
                patterns: patterns
                    .into_iter()
                    .map(|p| p.to_ascii_lowercase())
                    .collect(),
            }),
        }
    }

    /// Remembers `host_port` (`host:port`) as a place a configured registry sends clients.
    pub fn learn(&self, host_port: &str) {
        let mut m = self.inner.learned.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= LEARNED_CAP && !m.contains_key(host_port) {
            m.retain(|_, seen| seen.elapsed() < LEARNED_TTL);
            if m.len() >= LEARNED_CAP {
                let oldest = m.iter().min_by_key(|(_, t)| **t).map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    m.remove(&k);
                }
            }
        }
        m.insert(host_port.to_ascii_lowercase(), Instant::now());
    }

    /// Remembers the host of a token realm URL (from a configured registry's challenge).
    pub fn learn_url(&self, url: &str) {
        if let Ok(u) = reqwest::Url::parse(url) {
            if let (Some(h), Some(p)) = (u.host_str(), u.port_or_known_default()) {
                self.learn(&format!("{h}:{p}"));
            }
        }
    }

    /// Whether `host`:`port` is learned or matches an operator pattern.
    pub fn allows(&self, host: &str, port: u16) -> bool {
        let host = host.to_ascii_lowercase();
        let hp = format!("{host}:{port}");
        {
            let m = self.inner.learned.lock().unwrap_or_else(|e| e.into_inner());
            if m.get(&hp).is_some_and(|t| t.elapsed() < LEARNED_TTL) {
                return true;
            }
        }
        self.inner
            .patterns
            .iter()
            .any(|p| pattern_matches(p, &host, port))
    }
}

/// `host`, `host:port`, `*.suffix` or `*.suffix:port` against `host`:`port`.
fn pattern_matches(pattern: &str, host: &str, port: u16) -> bool {
    let (p_host, p_port) = match pattern.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => match p.parse::<u16>() {
            Ok(pp) => (h, Some(pp)),
            Err(_) => return false,
        },
        _ => (pattern, None),
    };
    if p_port.is_some_and(|pp| pp != port) {
        return false;
    }
    match p_host.strip_prefix("*.") {
        Some(suffix) => host.len() > suffix.len() + 1 && host.ends_with(&format!(".{suffix}")),
        None => host == p_host,
    }
}

/// Whether `pattern` is a valid `mirror.proxy_allow` entry.
pub fn valid_pattern(pattern: &str) -> bool {
    let host = match pattern.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => {
            if p.parse::<u16>().is_err() {
                return false;
            }
            h
        }
        _ => pattern,
    };
    let host = host.strip_prefix("*.").unwrap_or(host);
    !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'[' | b']' | b':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_addresses() {
        for ip in [
            "127.0.0.1",
            "127.8.9.10",
            "::1",
            "0.0.0.0",
            "169.254.169.254",
            "fe80::1",
            "224.0.0.1",
            "::ffff:127.0.0.1",
        ] {
            assert!(is_local(ip.parse().expect("ip")), "{ip}");
        }
        for ip in ["203.0.113.7", "2001:db8::1", "10.255.255.254"] {
            // Documentation/private ranges that are not on this host.
            assert!(!is_local(ip.parse().expect("ip")), "{ip}");
        }
        assert_eq!(literal_ip("[::1]"), Some("::1".parse().expect("ip")));
        assert_eq!(literal_ip("registry.example"), None);
    }

    #[test]
    fn every_spelling_of_a_local_address_is_refused_after_parsing() {
        let check = |u: &str| check_url(&reqwest::Url::parse(u).expect("url"));
        for u in [
            "http://127.1:5000/v2/",
            "http://0x7f000001/",
            "http://2130706433/",
            "http://0177.0.0.1/",
            "http://0x7f.1/",
            "http://0/",
            "http://127.0.0.1./",
            "https://[::1]/",
            "https://[::ffff:7f00:1]/",
            "http://0251.0376.0251.0376/latest/meta-data",
            "http://169.254.169.254/",
            "http://localhost:5000/",
            "http://LOCALHOST./",
            "http://registry.localhost/",
            "ftp://203.0.113.7/",
            "file:///etc/passwd",
        ] {
            assert!(check(u).is_err(), "{u} allowed");
        }
        for u in [
            "https://203.0.113.7/token",
            "https://registry.example/v2/",
            "http://[2001:db8::1]:5000/",
        ] {
            assert!(check(u).is_ok(), "{u} refused");
        }
    }

    #[test]
    fn proxy_targets_match_learned_hosts_and_patterns() {
        let t = ProxyTargets::new(vec!["*.cdn.example".into(), "auth.example:443".into()]);
        assert!(t.allows("blobs.cdn.example", 443));
        assert!(t.allows("a.b.cdn.example", 80));
        assert!(!t.allows("cdn.example", 443), "*. needs a subdomain");
        assert!(!t.allows("evilcdn.example", 443));
        assert!(t.allows("auth.example", 443));
        assert!(!t.allows("auth.example", 8443));
        assert!(!t.allows("realm.example", 443));
        t.learn_url("https://realm.example/token?x=1");
        assert!(t.allows("realm.example", 443));
        assert!(!t.allows("realm.example", 80));
    }

    #[test]
    fn learned_targets_are_bounded() {
        let t = ProxyTargets::new(Vec::new());
        for i in 0..(LEARNED_CAP + 50) {
            t.learn(&format!("h{i}.example:443"));
        }
        let n = t.inner.learned.lock().expect("lock").len();
        assert!(n <= LEARNED_CAP, "{n}");
        assert!(t.allows(&format!("h{}.example", LEARNED_CAP + 49), 443));
    }
}
