//! Issue 10's "Must show": the node's edges, tried as an attacker would, against the real
//! distribution registry with per-repository token authorization (`shoal_e2e::token`).
//!
//! The scene: a private registry P (token auth) holds `private/app:1` (the fixture: a Debian base
//! layer plus a python layer) that only alice may pull; bob may pull only `bob/other`. A second
//! registry C is configured on the node *with node credentials* and holds something unrelated. A
//! public registry B (configured) and a second public registry B2 (unlisted) hold the Debian base
//! image, so the base layer is public elsewhere — but the python layer, the image config and the
//! manifest exist only in P. A lying origin L (run by the attacker, unlisted) answers 200/206 to
//! everything with wrong bytes.
//!
//! Every way of asking for the secret content — the mirror path, `?ns=`, `X-Shoal-Registry` and the
//! forward proxy, anonymously, with wrong credentials, with bob's token (another repository),
//! through L, and through C with its node credentials — gets 0 secret bytes, before alice's pull
//! (nothing cached), after it (everything cached) and after a restart. Alice still gets it from
//! the cache (P's log: no blob GET), and the base layer still deduplicates: anonymous clients get
//! it through B with 0 blob bytes from B, and through B2 after a proof of a few random ranges.

use std::io::{Read as _, Write as _};
use std::ops::Range;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{ensure, Context, Result};
use shoal_e2e::fixture::{assert_same_image, Image, OciLayout};
use shoal_e2e::http::{self, Fetched};
use shoal_e2e::liar::LyingOrigin;
use shoal_e2e::node::{Node, NodeOptions};
use shoal_e2e::registry::{Creds, Registry};
use shoal_e2e::setup::MANIFEST_ACCEPT;
use shoal_e2e::tiny::{respond, Flow, TinyServer};
use shoal_e2e::token::{Acl, TokenServer};
use shoal_e2e::{run, skopeo, Need, TestCtx};

const PRIVATE: &str = "private/app";
const PUBLIC: &str = "public/base";
const BOB_REPO: &str = "bob/other";
/// A repository of P that anyone may pull (the base image): a public object in the same
/// registry as the secrets.
const OPEN_REPO: &str = "open/base";

const NEEDS: &[Need] = &[
    Need::Shoal,
    Need::Bin("docker-registry"),
    Need::Bin("skopeo"),
];

struct Scene {
    tokens: TokenServer,
    private: Registry,
    creds_reg: Registry,
    public: Registry,
    public2: Registry,
    liar: LyingOrigin,
    image: Image,
    base: Image,
    /// A blob only C holds (node credentials must reach it, or the C checks prove nothing).
    c_blob: String,
    node: Node,
}

/// A secret object and its bytes.
struct Secret {
    what: String,
    digest: String,
    bytes: Vec<u8>,
    /// `blobs` or `manifests`.
    kind: &'static str,
}

#[test]
fn private_content_reaches_no_one_who_may_not_see_it() {
    run(
        "private_content_reaches_no_one_who_may_not_see_it",
        NEEDS,
        |t| {
            let mut s = scene(t)?;
            let secrets = secrets(&s)?;
            hostile(&s, &secrets, "before any authorized pull")?;

            // Alice pulls through the mirror: everything is cached.
            let alice = Creds::new("alice", "alice-pw");
            let (out, dir) = skopeo::copy_to_oci(
                t,
                &s.node.listen_addr(),
                &format!("{PRIVATE}:1"),
                Some(&alice),
            )?;
            ensure!(
                out.success,
                "alice's pull through the mirror failed: {}",
                out.stderr
            );
            assert_same_image(&s.image, &OciLayout::open(dir)?)?;
            wait_complete(&s.node, &s.image)?;

            hostile(&s, &secrets, "after alice's pull (all cached)")?;
            ensure!(
                s.liar
                    .seen()
                    .range_gets
                    .load(std::sync::atomic::Ordering::Relaxed)
                    > 0,
                "the lying origin was never asked for proof ranges"
            );
            let refuted = s
                .node
                .metrics()?
                .sum("shoal_access_checks_total", &[("kind", "refuted")]);
            ensure!(refuted > 0.0, "no proof of possession was refuted");
            dedup(&s)?;

            s.node.terminate()?;
            s.node.restart()?;
            hostile(&s, &secrets, "after a restart")?;
            alice_from_cache(&s, &secrets)?;
            Ok(())
        },
    );
}

fn scene(t: &TestCtx) -> Result<Scene> {
    let tokens = TokenServer::start(
        Acl::default()
            .user(
                "admin",
                "admin-pw",
                &[
                    ("private/*", &["pull", "push"]),
                    ("bob/*", &["pull", "push"]),
                    ("open/*", &["pull", "push"]),
                ],
            )
            .user("alice", "alice-pw", &[(PRIVATE, &["pull"])])
            .user("bob", "bob-pw", &[("bob/*", &["pull"])])
            .anonymous(&[("open/*", &["pull"])]),
    )?;
    let private = Registry::start_token(t, &tokens, Creds::new("admin", "admin-pw"))?;
    skopeo::push_fixture(t, &private, &format!("{PRIVATE}:1"))?;
    skopeo::push_fixture_ref(t, &private, "base", &format!("{BOB_REPO}:1"))?;
    skopeo::push_fixture_ref(t, &private, "base", &format!("{OPEN_REPO}:1"))?;
    let creds_reg = Registry::start_htpasswd(t, "nodeuser", "node-pw")?;
    let c_blob = creds_reg.push_blob("c/stuff", b"only C holds this".repeat(100))?;
    let public = Registry::start(t)?;
    skopeo::push_fixture_ref(t, &public, "base", &format!("{PUBLIC}:1"))?;
    let public2 = Registry::start(t)?;
    skopeo::push_fixture_ref(t, &public2, "base", &format!("{PUBLIC}:1"))?;
    let liar = LyingOrigin::start(4 << 20)?;

    let config = t.subdir("node-config")?.join("node.toml");
    std::fs::write(
        &config,
        format!(
            "[mirror]\n\
             # The lying origin and B2 run on loopback: let unlisted hosts be local so that\n\
             # proofs of possession are exercised (the default refuses them outright).\n\
             allow_local_upstreams = true\n\
             [[upstream]]\nurl = \"{c}\"\nusername = \"nodeuser\"\npassword = \"node-pw\"\n\
             [[upstream]]\nurl = \"{b}\"\n",
            c = creds_reg.url(),
            b = public.url(),
        ),
    )?;
    let node = Node::start_with(
        t,
        NodeOptions {
            config: Some(config),
            ..NodeOptions::upstream(&private.url())
        },
    )?;
    let layout = OciLayout::debian_python()?;
    Ok(Scene {
        image: layout.image("python")?,
        base: layout.image("base")?,
        tokens,
        private,
        creds_reg,
        public,
        public2,
        liar,
        c_blob,
        node,
    })
}

/// The content only P holds: the python layer, the image config, the manifest.
fn secrets(s: &Scene) -> Result<Vec<Secret>> {
    let layout = OciLayout::debian_python()?;
    let base_layers: Vec<&str> = s.base.layers.iter().map(|d| d.digest.as_str()).collect();
    let mut out = vec![Secret {
        what: "manifest".into(),
        digest: s.image.manifest_digest.clone(),
        bytes: s.image.manifest.clone(),
        kind: "manifests",
    }];
    for d in s.image.blobs() {
        if base_layers.contains(&d.digest.as_str()) {
            continue;
        }
        out.push(Secret {
            what: format!("blob {}", &d.digest[..19]),
            digest: d.digest.clone(),
            bytes: layout.blob(&d.digest)?,
            kind: "blobs",
        });
    }
    ensure!(
        out.len() >= 3,
        "the fixture should have a config and a python layer of its own"
    );
    Ok(out)
}

/// How a request names its origin.
#[derive(Clone, Copy, Debug)]
enum Via {
    /// The mirror path: the node's default upstream (P).
    Mirror,
    Ns,
    Header,
    Proxy,
}

/// Every hostile way of asking for every secret; each must carry 0 secret bytes.
fn hostile(s: &Scene, secrets: &[Secret], phase: &str) -> Result<()> {
    let p = s.private.addr();
    let l = s.liar.addr();
    let c = s.creds_reg.addr();
    let bob_other = s.tokens.bearer("bob", BOB_REPO)?;
    let bob_private = s.tokens.bearer("bob", PRIVATE)?;
    let anon_private = s.tokens.bearer("", PRIVATE)?;
    let wrong_basic = "Basic YWxpY2U6bm90LWhlci1wYXNzd29yZA==".to_owned(); // alice:not-her-password
    let garbage = "Bearer not.a.token".to_owned();
    // (via, origin host, repository, credentials)
    let mut cases: Vec<(Via, &str, &str, Option<&str>)> = Vec::new();
    warm_neighbours(s, &bob_other)?;
    for via in [Via::Mirror, Via::Ns, Via::Header, Via::Proxy] {
        // Repositories where the asker may read *something*: a secret's digest asked there
        // must still be refused (access is per object, not per repository).
        cases.push((via, &p, OPEN_REPO, None));
        cases.push((via, &p, BOB_REPO, Some(bob_other.as_str())));
        if !matches!(via, Via::Mirror) {
            cases.push((via, &c, "c/stuff", None));
        }
        for cred in [
            None,
            Some(wrong_basic.as_str()),
            Some(garbage.as_str()),
            Some(bob_other.as_str()),
            Some(bob_private.as_str()),
            Some(anon_private.as_str()),
        ] {
            cases.push((via, &p, PRIVATE, cred));
        }
        if matches!(via, Via::Mirror) {
            continue;
        }
        for repo in [PRIVATE, "attacker/anything"] {
            cases.push((via, &l, repo, None));
            cases.push((via, &l, repo, Some(bob_other.as_str())));
            cases.push((via, &c, repo, None));
        }
    }
    let mut asked = 0;
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for secret in secrets {
        let size = secret.bytes.len() as u64;
        let ranges: Vec<Option<Range<u64>>> = if secret.kind == "blobs" {
            vec![
                None,
                Some(0..1024.min(size)),
                Some(size / 2..(size / 2 + 4096).min(size)),
            ]
        } else {
            vec![None]
        };
        let refs: Vec<&str> = if secret.kind == "manifests" {
            vec![secret.digest.as_str(), "1"]
        } else {
            vec![secret.digest.as_str()]
        };
        for (via, host, repo, cred) in &cases {
            for reference in &refs {
                // A tag names that repository's own image; only the secret's digest is asked
                // of the neighbouring repositories.
                if *reference == "1" && *repo != PRIVATE {
                    continue;
                }
                for range in &ranges {
                    let got = ask(
                        s,
                        *via,
                        host,
                        repo,
                        secret.kind,
                        reference,
                        *cred,
                        range.clone(),
                    )?;
                    asked += 1;
                    *statuses.entry(got.status.as_u16()).or_default() += 1;
                    let offset = range.as_ref().map_or(0, |r| r.start);
                    ensure!(
                        !leaks(&got.body, offset, &secret.bytes),
                        "{phase}: {} via {via:?} {host} repo {repo} ref {reference} creds {} range {range:?} \
                         LEAKED secret bytes: {}",
                        secret.what,
                        cred.map_or("none", |c| &c[..c.len().min(12)]),
                        got.short()
                    );
                }
            }
        }
    }
    println!("{phase}: {asked} hostile requests, 0 secret bytes; statuses {statuses:?}");
    Ok(())
}

/// Reads, through the node and as each asker may, something that is theirs to read in a
/// neighbouring repository: a public object of P's open repository (anonymously), bob's own
/// image (bob's token), C's own blob (node credentials) — so that any shortcut keyed by
/// repository rather than object is in place when the secrets are asked for there.
fn warm_neighbours(s: &Scene, bob: &str) -> Result<()> {
    let p = s.private.addr();
    let c = s.creds_reg.addr();
    let base_layer = s
        .base
        .layers
        .first()
        .map(|d| d.digest.clone())
        .context("the base image has a layer")?;
    for (via, host, repo, kind, reference, cred) in [
        (
            Via::Mirror,
            p.as_str(),
            OPEN_REPO,
            "blobs",
            base_layer.as_str(),
            None,
        ),
        (Via::Ns, p.as_str(), OPEN_REPO, "manifests", "1", None),
        (
            Via::Mirror,
            p.as_str(),
            BOB_REPO,
            "manifests",
            "1",
            Some(bob),
        ),
        (
            Via::Ns,
            c.as_str(),
            "c/stuff",
            "blobs",
            s.c_blob.as_str(),
            None,
        ),
    ] {
        let got = ask(s, via, host, repo, kind, reference, cred, Some(0..16))?;
        ensure!(
            got.status.is_success(),
            "{repo} {kind} {reference} should be readable to its asker: {}",
            got.short()
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn ask(
    s: &Scene,
    via: Via,
    host: &str,
    repo: &str,
    kind: &str,
    reference: &str,
    cred: Option<&str>,
    range: Option<Range<u64>>,
) -> Result<Fetched> {
    let path = format!("/v2/{repo}/{kind}/{reference}");
    let node = s.node.url();
    let req = match via {
        Via::Mirror => http::client()?.get(format!("{node}{path}")),
        Via::Ns => http::client()?.get(format!("{node}{path}?ns={host}")),
        Via::Header => http::client()?
            .get(format!("{node}{path}"))
            .header("X-Shoal-Registry", host),
        Via::Proxy => {
            http::proxy_client(&s.node.listen_addr())?.get(format!("http://{host}{path}"))
        }
    };
    let mut req = req.header("Accept", MANIFEST_ACCEPT);
    if let Some(c) = cred {
        req = req.header("Authorization", c);
    }
    if let Some(r) = range {
        req = req.header("Range", format!("bytes={}-{}", r.start, r.end - 1));
    }
    http::fetch(req).with_context(|| format!("{via:?} {host}{path}"))
}

/// Whether `body`, served as the bytes from `offset` on, carries bytes of `secret`: a 32-byte
/// block equal to the secret's at the same place, or the secret's first 64 bytes anywhere.
fn leaks(body: &[u8], offset: u64, secret: &[u8]) -> bool {
    let same_place = body.chunks(32).enumerate().any(|(i, chunk)| {
        let at = offset as usize + i * 32;
        chunk.len() == 32 && secret.get(at..at + 32) == Some(chunk)
    });
    let head = &secret[..secret.len().min(64)];
    same_place || (head.len() == 64 && body.windows(64).any(|w| w == head))
}

/// The base layer, public in B (configured) and B2 (unlisted), is served from the cache: 0 blob
/// bytes from B; only a few sampled ranges from B2.
fn dedup(s: &Scene) -> Result<()> {
    let layer = s.base.layers.first().context("base layer")?;
    let expected = OciLayout::debian_python()?.blob(&layer.digest)?;
    let b_mark = s.public.log()?.requests.len();
    let b2_mark = s.public2.log()?.requests.len();
    // B by `?ns=` (configured: plain HTTP as configured), B2 by a proxy URL (unlisted: `?ns=`
    // would mean HTTPS, which these test registries do not speak).
    let path = format!("/v2/{PUBLIC}/blobs/{}", layer.digest);
    let via_b = http::client()?.get(format!("{}{path}?ns={}", s.node.url(), s.public.addr()));
    let via_b2 = http::proxy_client(&s.node.listen_addr())?
        .get(format!("http://{}{path}", s.public2.addr()));
    for (name, req) in [("B", via_b), ("B2", via_b2)] {
        let got = http::fetch(req)?;
        ensure!(
            got.completed_ok() && got.body == expected,
            "anonymous GET of the public base layer via {name}: {}",
            got.short()
        );
    }
    let b = s.public.log()?.since(b_mark);
    ensure!(
        b.blob_fetches(&layer.digest) == 0,
        "the configured public registry sent the base layer again: {:?}",
        b.blob_requests(&layer.digest)
    );
    let b2 = s.public2.log()?.since(b2_mark);
    let sampled: u64 = b2
        .blob_requests(&layer.digest)
        .iter()
        .filter(|r| r.method == "GET")
        .map(|r| r.written)
        .sum();
    ensure!(
        b2.blob_requests(&layer.digest)
            .iter()
            .all(|r| r.method != "GET" || r.status == 206),
        "the unlisted public registry was asked for the whole base layer"
    );
    ensure!(
        sampled <= 64 << 10,
        "the proof of possession read {sampled} bytes from the unlisted registry"
    );
    println!(
        "dedup: base layer ({} bytes) served from the cache; B sent 0 blob bytes, B2 {sampled} sampled bytes",
        layer.size
    );
    // Node credentials work where they apply (so C's refusals above mean something).
    let url = format!(
        "{}/v2/c/stuff/blobs/{}?ns={}",
        s.node.url(),
        s.c_blob,
        s.creds_reg.addr()
    );
    let got = http::fetch(http::client()?.get(url))?;
    ensure!(
        got.completed_ok(),
        "C's own blob through its node credentials: {}",
        got.short()
    );
    Ok(())
}

/// After the restart alice still gets every secret from the cache: P answers access checks
/// (HEAD) but sends no blob.
fn alice_from_cache(s: &Scene, secrets: &[Secret]) -> Result<()> {
    let mark = s.private.log()?.requests.len();
    let alice = s.tokens.bearer("alice", PRIVATE)?;
    for secret in secrets.iter().filter(|x| x.kind == "blobs") {
        let url = format!("{}/v2/{PRIVATE}/blobs/{}", s.node.url(), secret.digest);
        let got = http::fetch(http::client()?.get(url).header("Authorization", &alice))?;
        ensure!(
            got.completed_ok() && got.body == secret.bytes,
            "alice's GET of {}: {}",
            secret.what,
            got.short()
        );
    }
    let log = s.private.log()?.since(mark);
    for secret in secrets.iter().filter(|x| x.kind == "blobs") {
        ensure!(
            log.blob_fetches(&secret.digest) == 0,
            "P sent {} again after the restart",
            secret.what
        );
    }
    println!("after a restart alice got every secret blob from the cache (P: 0 blob GETs)");
    Ok(())
}

fn wait_complete(node: &Node, image: &Image) -> Result<()> {
    shoal_e2e::wait::poll(
        "every blob complete in the node",
        std::time::Duration::from_secs(60),
        || {
            let st = node.status()?;
            let done = image
                .blobs()
                .iter()
                .all(|d| st.blob(&d.digest).is_some_and(|b| b.complete));
            Ok(done.then_some(()))
        },
    )
}

// ------------------------------------------------------------------- the control surfaces

/// A directory nobody but root may change, that others may traverse (mode 0755), removed on drop.
struct SharedDir(PathBuf);

impl SharedDir {
    fn new(label: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "shoal-e2e-{label}-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        Ok(Self(dir))
    }
}

impl Drop for SharedDir {
    fn drop(&mut self) {
        shoal_e2e::ctx::detach_mounts_under(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64)
}

/// `shoal ARGS` as the unprivileged user `nobody` (uid/gid 65534, no groups).
fn as_nobody(args: &[&str]) -> Result<Output> {
    Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(shoal_e2e::paths::shoal_bin()?)
        .args(args)
        .output()
        .context("running shoal as nobody")
}

fn shoal_root(args: &[&str]) -> Result<Output> {
    Command::new(shoal_e2e::paths::shoal_bin()?)
        .args(args)
        .output()
        .context("running shoal")
}

fn is_mounted(dir: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let dir = dir.to_string_lossy();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(dir.as_ref()))
}

#[test]
fn only_the_administrator_changes_the_node_and_the_admin_listener_is_read_only() {
    let name = "only_the_administrator_changes_the_node";
    let needs = [
        Need::Root,
        Need::Fuse,
        Need::Shoal,
        Need::Bin("docker-registry"),
        Need::Bin("setpriv"),
        Need::Bin("curl"),
    ];
    run(name, &needs, |t| {
        let registry = Registry::start(t)?;
        let work = t.subdir("nydus-build")?;
        shoal_e2e::nydus::build_and_push(
            &registry,
            &shoal_e2e::paths::debian_python_layout(),
            "python",
            "test/nydus",
            "1",
            &work,
        )?;
        let reference = format!("{}/test/nydus:1", registry.addr());
        // The socket and the mount point where an unprivileged user could reach them, if the
        // node let it: only the node's own rules stand in the way.
        let shared = SharedDir::new("control")?;
        let socket = shared.0.join("control.sock");
        let mnt = shared.0.join("mnt");
        std::fs::create_dir(&mnt)?;
        std::fs::set_permissions(&mnt, std::fs::Permissions::from_mode(0o777))?;
        let node = Node::start_with(
            t,
            NodeOptions {
                control: Some(socket.clone()),
                ..NodeOptions::upstream(&registry.url())
            },
        )?;
        let mode = std::fs::metadata(&socket)?.permissions().mode() & 0o777;
        ensure!(mode == 0o600, "control socket mode {mode:o}, expected 600");
        let sock = socket.to_string_lossy().into_owned();
        let mnt_s = mnt.to_string_lossy().into_owned();

        // nobody: shoal mount, umount and mounts over the control socket are refused.
        for args in [
            vec![
                "mount",
                reference.as_str(),
                mnt_s.as_str(),
                "--control",
                sock.as_str(),
            ],
            vec!["mounts", "--control", sock.as_str()],
        ] {
            let out = as_nobody(&args)?;
            ensure!(
                !out.status.success(),
                "nobody ran `shoal {args:?}`: {out:?}"
            );
        }
        ensure!(
            !is_mounted(&mnt),
            "nobody's mount request mounted something"
        );
        // nobody speaking HTTP to the socket directly: the kernel refuses the connection.
        let out = Command::new("setpriv")
            .args([
                "--reuid",
                "65534",
                "--regid",
                "65534",
                "--clear-groups",
                "curl",
                "-s",
            ])
            .args([
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--unix-socket",
                &sock,
            ])
            .args(["-X", "POST", "-H", "content-type: application/json", "-d"])
            .arg(format!(r#"{{"image":"{reference}","dir":"{mnt_s}"}}"#))
            .arg("http://control/api/v1/mounts")
            .output()?;
        let code = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(
            !out.status.success() || code == "403",
            "nobody's POST over the control socket got {code}"
        );
        // Anyone on the admin TCP listener: nothing there changes the node.
        let admin = format!("http://{}", node.admin_addr());
        let body = format!(r#"{{"image":"{reference}","dir":"{mnt_s}"}}"#);
        let post = http::fetch(
            http::client()?
                .post(format!("{admin}/api/v1/mounts"))
                .header("content-type", "application/json")
                .body(body),
        )?;
        ensure!(
            post.status.as_u16() == 405 || post.status.as_u16() == 404,
            "POST /api/v1/mounts on the admin listener: {}",
            post.short()
        );
        ensure!(!is_mounted(&mnt), "the admin listener mounted something");
        // Read-only surfaces answer there; a foreign Host (DNS rebinding) does not.
        for path in ["/healthz", "/metrics", "/api/v1/status"] {
            let got = http::fetch(http::client()?.get(format!("{admin}{path}")))?;
            ensure!(
                got.completed_ok(),
                "GET {path} on the admin listener: {}",
                got.short()
            );
        }
        let rebound = http::fetch(
            http::client()?
                .get(format!("{admin}/api/v1/status"))
                .header("Host", "attacker.example:5051"),
        )?;
        ensure!(
            rebound.status.as_u16() == 421,
            "a request for Host attacker.example was answered: {}",
            rebound.short()
        );

        // root: system and non-empty directories are refused without --force; the mount works.
        let out = shoal_root(&["mount", &reference, "/etc", "--control", &sock])?;
        ensure!(
            !out.status.success(),
            "root mounted over /etc without --force"
        );
        let full = shared.0.join("full");
        std::fs::create_dir(&full)?;
        std::fs::write(full.join("keep"), b"x")?;
        let out = shoal_root(&[
            "mount",
            &reference,
            &full.to_string_lossy(),
            "--control",
            &sock,
        ])?;
        ensure!(
            !out.status.success(),
            "root mounted over a non-empty dir without --force"
        );
        let out = shoal_root(&["mount", &reference, &mnt_s, "--control", &sock])?;
        ensure!(
            out.status.success(),
            "root's shoal mount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(is_mounted(&mnt), "root's mount is not there");
        let out = as_nobody(&["umount", &mnt_s, "--control", &sock])?;
        ensure!(
            !out.status.success() && is_mounted(&mnt),
            "nobody unmounted root's mount"
        );
        let out = shoal_root(&["umount", &mnt_s, "--control", &sock])?;
        ensure!(
            out.status.success() && !is_mounted(&mnt),
            "root's umount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        drop(node);

        // A node whose control group is nobody's group: nobody may use the socket now, but
        // only on directories of its own, and never with --force (a mount over /etc, or over
        // an empty drop-in directory the system reads, would make it root).
        let socket2 = shared.0.join("control2.sock");
        let _node2 = Node::start_with(
            t,
            NodeOptions {
                control: Some(socket2.clone()),
                extra_args: vec!["--set".into(), "control_group=nogroup".into()],
                ..NodeOptions::upstream(&registry.url())
            },
        )?;
        let sock2 = socket2.to_string_lossy().into_owned();
        let member = |args: &[&str]| -> Result<Output> {
            Command::new("setpriv")
                .args(["--reuid", "65534", "--regid", "65534", "--groups", "65534"])
                .arg(shoal_e2e::paths::shoal_bin()?)
                .args(args)
                .output()
                .context("running shoal as a control-group member")
        };
        let out = member(&["mounts", "--control", &sock2])?;
        ensure!(
            out.status.success(),
            "a control-group member could not list mounts: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let own = shared.0.join("nobodys");
        std::fs::create_dir(&own)?;
        std::os::unix::fs::chown(&own, Some(65534), Some(65534))?;
        let own_s = own.to_string_lossy().into_owned();
        for (args, why) in [
            (
                vec!["mount", &reference, "/etc", "--force"],
                "--force over /etc",
            ),
            (vec!["mount", &reference, &mnt_s], "a directory root owns"),
            (
                vec!["mount", &reference, &own_s, "--force"],
                "--force on its own directory",
            ),
        ] {
            let mut args = args;
            args.extend(["--control", sock2.as_str()]);
            let out = member(&args)?;
            ensure!(
                !out.status.success(),
                "a control-group member was allowed {why}: {out:?}"
            );
        }
        ensure!(
            !is_mounted(&mnt) && !is_mounted(Path::new("/etc")),
            "a refused mount happened"
        );
        let out = member(&["mount", &reference, &own_s, "--control", &sock2])?;
        ensure!(
            out.status.success() && is_mounted(&own),
            "a control-group member's mount on its own directory: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = member(&["umount", &own_s, "--control", &sock2])?;
        ensure!(
            out.status.success() && !is_mounted(&own),
            "the member's umount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        println!(
            "{name}: nobody was refused on every listener; root mounted and unmounted; a \
             control-group member mounted only on its own directory, never with --force"
        );
        Ok(())
    });
}

#[test]
fn the_proxy_carries_registry_traffic_only() {
    run(
        "the_proxy_carries_registry_traffic_only",
        &[
            Need::Shoal,
            Need::Bin("docker-registry"),
            Need::Bin("python3"),
        ],
        |t| {
            let registry = Registry::start(t)?;
            let node = Node::start(t, &registry.url())?;
            let local_registry = Registry::start(t)?;
            let local_blob =
                local_registry.push_blob("x/y", b"local-registry-secret".repeat(64))?;
            // A local service that is not a registry, with something to steal.
            let www = t.subdir("www")?;
            std::fs::write(www.join("secret.txt"), b"the-local-secret")?;
            let port = shoal_e2e::wait::free_port()?;
            let mut server = Command::new("python3")
                .args([
                    "-m",
                    "http.server",
                    "--bind",
                    "127.0.0.1",
                    &port.to_string(),
                ])
                .current_dir(&www)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()?;
            let service = format!("127.0.0.1:{port}");
            shoal_e2e::wait::poll(
                "the local service",
                std::time::Duration::from_secs(20),
                || Ok(std::net::TcpStream::connect(&service).ok().map(|_| ())),
            )?;
            let proxy = http::proxy_client(&node.listen_addr())?;
            let outcome = (|| -> Result<()> {
                for url in [
                    format!("http://{service}/secret.txt"),
                    format!("http://{service}/v2/"),
                    format!("http://{service}/v2/x/blobs/sha256:{}", "0".repeat(64)),
                    format!("http://{}/api/v1/status", node.admin_addr()),
                    format!("http://{}/metrics", node.admin_addr()),
                    format!("http://{}/v2/", node.listen_addr()),
                ] {
                    let got = http::fetch(proxy.get(&url))?;
                    ensure!(
                        got.status.as_u16() == 403 && !got.text().contains("the-local-secret"),
                        "the proxy carried GET {url}: {}",
                        got.short()
                    );
                }
                let ns = http::fetch(
                    http::client()?.get(format!("{}/v2/x/manifests/1?ns={service}", node.url())),
                )?;
                ensure!(
                    ns.status.as_u16() == 403,
                    "?ns= a local service: {}",
                    ns.short()
                );
                // A registry on this host that the operator did not configure, named in every
                // spelling a URL parser reads as 127.0.0.1: never reached.
                let port = local_registry
                    .addr()
                    .rsplit_once(':')
                    .map(|(_, p)| p.to_owned());
                let port = port.context("registry port")?;
                let secret_path = format!("/v2/x/y/blobs/{local_blob}");
                let mark = local_registry.log()?.requests.len();
                for host in [
                    "127.0.0.1",
                    "127.1",
                    "0x7f000001",
                    "2130706433",
                    "0177.0.0.1",
                    "0x7f.1",
                    "127.0.0.1.",
                    "localhost",
                    "[::ffff:7f00:1]",
                ] {
                    let authority = format!("{host}:{port}");
                    for (how, got) in [
                        (
                            "proxy",
                            http::fetch(proxy.get(format!("http://{authority}{secret_path}"))),
                        ),
                        (
                            "?ns=",
                            http::fetch(
                                http::client()?
                                    .get(format!("{}{secret_path}?ns={authority}", node.url())),
                            ),
                        ),
                        (
                            "X-Shoal-Registry",
                            http::fetch(
                                http::client()?
                                    .get(format!("{}{secret_path}", node.url()))
                                    .header("X-Shoal-Registry", &authority),
                            ),
                        ),
                    ] {
                        let got = got?;
                        ensure!(
                            !got.status.is_success()
                                && !got.text().contains("local-registry-secret"),
                            "{how} {authority} reached the local registry: {}",
                            got.short()
                        );
                    }
                }
                let asked = local_registry.log()?.requests[mark..]
                    .iter()
                    .filter(|r| r.uri.starts_with(&secret_path))
                    .count();
                ensure!(
                    asked == 0,
                    "the unconfigured local registry was asked for its blob {asked} times"
                );
                // CONNECT: refused to the local service and the node's own listeners; a
                // configured registry gets a working tunnel.
                for target in [service.clone(), node.admin_addr(), node.listen_addr()] {
                    let (status, _) = connect(&node.listen_addr(), &target)?;
                    ensure!(status == 403, "CONNECT {target} answered {status}");
                }
                let (status, mut tunnel) = connect(&node.listen_addr(), &registry.addr())?;
                ensure!(
                    status == 200,
                    "CONNECT to the configured registry answered {status}"
                );
                tunnel.write_all(
                    format!(
                        "GET /v2/ HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                        registry.addr()
                    )
                    .as_bytes(),
                )?;
                let mut answer = String::new();
                tunnel.read_to_string(&mut answer)?;
                ensure!(
                    answer.starts_with("HTTP/1.1 200"),
                    "through the tunnel: {answer}"
                );
                Ok(())
            })();
            let _ = server.kill();
            let _ = server.wait();
            outcome?;
            println!(
                "the proxy refused a local service, the node's own listeners and CONNECT to them"
            );
            Ok(())
        },
    );
}

/// An attacker's registry on another host answers every request with a Bearer challenge whose
/// token realm is a service on the node's own host (in every spelling of 127.0.0.1): the node
/// never asks that service, so nothing it would answer reaches the attacker.
#[test]
fn an_origin_a_request_names_cannot_send_the_node_to_this_host() {
    run(
        "an_origin_a_request_names_cannot_send_the_node_to_this_host",
        &[
            Need::Root,
            Need::Shoal,
            Need::Bin("docker-registry"),
            Need::Bin("python3"),
            Need::Bin("ip"),
        ],
        |t| {
            if let Some(why) = shoal_e2e::netns::unavailable() {
                anyhow::bail!("network namespaces: {why}");
            }
            let registry = Registry::start(t)?;
            let node = Node::start(t, &registry.url())?;
            // The service on this host an attacker would like the node to ask for a token.
            let svc_port = shoal_e2e::wait::free_port()?;
            let svc_log = t.dir().join("service.log");
            let mut service = Command::new("python3")
                .args(["-c", LOCAL_TOKEN_SERVICE, &svc_port.to_string()])
                .arg(&svc_log)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()?;
            let mut net = shoal_e2e::netns::Net::new()?;
            let attacker = net.add_host()?;
            let realms: Vec<String> = [
                "127.0.0.1",
                "127.1",
                "0x7f000001",
                "2130706433",
                "localhost",
            ]
            .iter()
            .map(|h| format!("http://{h}:{svc_port}/creds"))
            .collect();
            let att_log = t.dir().join("attacker.log");
            let att_port = 8000;
            let mut origin = net
                .command(&attacker, "python3")
                .args([
                    "-c",
                    CHALLENGING_ORIGIN,
                    &att_port.to_string(),
                    &realms.join(","),
                ])
                .arg(&att_log)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()?;
            let outcome = (|| -> Result<()> {
                let att = format!("{}:{att_port}", attacker.ip);
                shoal_e2e::wait::poll(
                    "the attacker's origin",
                    std::time::Duration::from_secs(20),
                    || Ok(std::net::TcpStream::connect(&att).ok().map(|_| ())),
                )?;
                shoal_e2e::wait::poll(
                    "the local service",
                    std::time::Duration::from_secs(20),
                    || {
                        Ok(std::net::TcpStream::connect(("127.0.0.1", svc_port))
                            .ok()
                            .map(|_| ()))
                    },
                )?;
                let proxy = http::proxy_client(&node.listen_addr())?;
                for i in 0..realms.len() {
                    let url = format!("http://{att}/v2/r{i}/x/manifests/latest");
                    let got = http::fetch(proxy.get(&url))?;
                    ensure!(!got.status.is_success(), "{url}: {}", got.short());
                }
                let asked = std::fs::read_to_string(&att_log).unwrap_or_default();
                ensure!(
                    asked.lines().count() >= realms.len(),
                    "the attacker's origin was not asked: {asked:?}"
                );
                ensure!(
                    !asked.contains("INTERNAL-SECRET"),
                    "the local service's token reached the attacker: {asked}"
                );
                let served = std::fs::read_to_string(&svc_log).unwrap_or_default();
                ensure!(
                    served.is_empty(),
                    "the node asked the local service: {served}"
                );
                Ok(())
            })();
            let _ = origin.kill();
            let _ = origin.wait();
            let _ = service.kill();
            let _ = service.wait();
            outcome?;
            println!(
                "token realms on this host ({} spellings) were never asked",
                realms.len()
            );
            Ok(())
        },
    );
}

/// `python3 -c LOCAL_TOKEN_SERVICE PORT LOG`: a loopback service that hands a token to anyone
/// asking, and writes every request it gets to LOG.
const LOCAL_TOKEN_SERVICE: &str = r#"
import http.server, sys
port, log = int(sys.argv[1]), sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        open(log, "a").write(self.path + "\n")
        body = b'{"token": "INTERNAL-SECRET-42"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"#;

/// `python3 -c CHALLENGING_ORIGIN PORT REALMS LOG`: a registry that answers every request
/// `/v2/r<i>/...` with a Bearer challenge naming realm i of the comma-separated REALMS, and
/// writes each request and its Authorization header to LOG.
const CHALLENGING_ORIGIN: &str = r#"
import http.server, sys
port, realms, log = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        open(log, "a").write("%s auth=%s\n" % (self.path, self.headers.get("Authorization")))
        parts = self.path.split("/")
        i = int(parts[2][1:]) if len(parts) > 2 and parts[2][1:].isdigit() else 0
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Bearer realm="%s",service="x",scope="repository:y:pull"' % realms[i % len(realms)])
        self.send_header("Content-Length", "0")
        self.end_headers()
    do_HEAD = do_GET
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", port), H).serve_forever()
"#;

/// Sends `CONNECT target` to the proxy at `proxy`: the status and the connection.
fn connect(proxy: &str, target: &str) -> Result<(u16, std::net::TcpStream)> {
    let mut s = std::net::TcpStream::connect(proxy)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))?;
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            break;
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, s))
}

#[test]
fn a_scheduler_with_a_join_secret_shows_nothing_unsigned_and_refuses_replays() {
    run(
        "a_scheduler_with_a_join_secret_shows_nothing_unsigned",
        &[Need::Shoal],
        |t| {
            let secret = t.subdir("secret")?.join("join-secret");
            std::fs::write(&secret, "5a".repeat(32))?;
            let listen: std::net::SocketAddr =
                format!("127.0.0.1:{}", shoal_e2e::wait::free_port()?).parse()?;
            let scheduler =
                shoal_e2e::scheduler::Scheduler::start_with_secret(t, None, listen, Some(&secret))?;
            let base = format!("http://{listen}");
            for path in ["/api/v1/status", "/", "/api/v1/jobs"] {
                let got = http::fetch(http::client()?.get(format!("{base}{path}")))?;
                ensure!(
                    got.status.as_u16() == 401,
                    "unsigned GET {path}: {}",
                    got.short()
                );
            }
            ensure!(
                scheduler.status().is_ok(),
                "a signed status request was refused"
            );
            // A member's announce, captured and sent again.
            let announce = shoal_proto::sched::AnnounceRequest {
                node: shoal_proto::sched::NodeAnnouncement {
                    id: shoal_proto::NodeId::from_bytes([7; 32]),
                    p2p_addr: "127.0.0.1:5052".parse()?,
                    zone: None,
                    upload_slots_free: 8,
                    version: "test".into(),
                },
                full: true,
                blobs: Vec::new(),
                removed: Vec::new(),
                traffic: Default::default(),
                job_progress: Vec::new(),
            };
            let body = serde_json::to_vec(&announce)?;
            let path = "/api/v1/announce";
            let header = scheduler.sign("POST", path, &body).context("signing")?;
            let send = || {
                http::fetch(
                    http::client()?
                        .post(format!("{base}{path}"))
                        .header("host", listen.to_string())
                        .header(shoal_proto::sched::PROTOCOL_HEADER, "1")
                        .header("content-type", "application/json")
                        .header(shoal_proto::auth::AUTH_HEADER, header.clone())
                        .body(body.clone()),
                )
            };
            let first = send()?;
            ensure!(
                first.completed_ok(),
                "the signed announce: {}",
                first.short()
            );
            let replayed = send()?;
            ensure!(
                replayed.status.as_u16() == 401,
                "the replayed announce: {}",
                replayed.short()
            );
            let nodes = scheduler.status()?.nodes.len();
            ensure!(
                nodes == 1,
                "the scheduler lists {nodes} nodes after one announce"
            );
            println!("unsigned reads got 401; a replayed signed announce got 401");
            Ok(())
        },
    );
}

// ------------------------------------------------------------------- bounded by default

/// A loop-mounted filesystem, unmounted (and its loop device freed) on drop.
struct LoopFs(PathBuf);

impl Drop for LoopFs {
    fn drop(&mut self) {
        shoal_e2e::ctx::detach_mounts_under(&self.0);
        let _ = Command::new("umount").arg("-d").arg(&self.0).status();
    }
}

/// `len` bytes of a xorshift stream seeded with `seed` (incompressible, reproducible).
struct Noise {
    x: u64,
    left: u64,
}

impl std::io::Read for Noise {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.left) as usize;
        for chunk in buf[..n].chunks_mut(8) {
            self.x ^= self.x << 13;
            self.x ^= self.x >> 7;
            self.x ^= self.x << 17;
            let bytes = self.x.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Pushes `count` noise blobs of `size` bytes to `repo`; their digests.
fn push_noise(registry: &Registry, repo: &str, count: u64, size: u64) -> Result<Vec<String>> {
    let mut digests = Vec::new();
    for i in 0..count {
        let seed = 0x5eed_0000 + i;
        let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
        std::io::copy(
            &mut Noise {
                x: seed,
                left: size,
            },
            &mut HashWriter(&mut hasher),
        )?;
        let digest = format!("sha256:{}", hex::encode(sha2::Digest::finalize(hasher)));
        registry.push_blob_reader(
            repo,
            &digest,
            Noise {
                x: seed,
                left: size,
            },
            size,
        )?;
        digests.push(digest);
    }
    Ok(digests)
}

struct HashWriter<'a>(&'a mut sha2::Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        sha2::Digest::update(self.0, b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn default_settings_keep_a_small_disk_below_its_high_watermark() {
    let needs = [
        Need::Root,
        Need::Shoal,
        Need::Bin("docker-registry"),
        Need::Bin("mkfs.ext4"),
    ];
    run(
        "default_settings_keep_a_small_disk_below_its_high_watermark",
        &needs,
        |t| {
            const BLOBS: u64 = 12;
            const SIZE: u64 = 128 << 20;
            let registry = Registry::start(t)?;
            let digests = push_noise(&registry, "big/blobs", BLOBS, SIZE)?;
            // A 512 MiB ext4, loop-mounted, holding nothing but the node's data dir.
            let dir = t.subdir("small-disk")?;
            let image = dir.join("fs.img");
            std::fs::File::create(&image)?.set_len(512 << 20)?;
            let ok = Command::new("mkfs.ext4")
                .args(["-q", "-F"])
                .arg(&image)
                .status()?;
            ensure!(ok.success(), "mkfs.ext4 failed");
            let mnt = dir.join("mnt");
            std::fs::create_dir(&mnt)?;
            let ok = Command::new("mount")
                .args(["-o", "loop"])
                .arg(&image)
                .arg(&mnt)
                .status()?;
            ensure!(ok.success(), "mount -o loop failed");
            let _fs = LoopFs(mnt.clone());
            let node = Node::start_with(
                t,
                NodeOptions {
                    data_dir: Some(mnt.join("data")),
                    // The default: watermarks of the data dir's filesystem, no byte quota.
                    filesystem_quota: true,
                    ..NodeOptions::upstream(&registry.url())
                },
            )?;
            // Watch the filesystem while 3× its size goes through the node.
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let watcher = {
                let (stop, mnt) = (stop.clone(), mnt.clone());
                std::thread::spawn(move || -> (u64, u64) {
                    let mut peak = 0u64;
                    let mut total = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        if let Ok(fs) = rustix::fs::statvfs(&mnt) {
                            total = fs.f_blocks * fs.f_frsize;
                            peak = peak.max(total - fs.f_bavail * fs.f_frsize);
                        }
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    (peak, total)
                })
            };
            let pulled = (|| -> Result<()> {
                for d in &digests {
                    let url = format!("{}/v2/big/blobs/blobs/{d}", node.url());
                    let got = http::fetch_hashed(http::client()?.get(url))?;
                    ensure!(
                        got.status.is_success() && got.body_error.is_none() && got.digest == *d,
                        "pull of {d} through the node: {} {:?}",
                        got.status,
                        got.body_error
                    );
                }
                Ok(())
            })();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let (peak, total) = watcher
                .join()
                .map_err(|_| anyhow::anyhow!("watcher panicked"))?;
            pulled?;
            let high = total as f64 * 0.85;
            println!(
            "{} MiB through a {} MiB filesystem: peak use {} MiB ({:.1} %), high watermark {:.0} MiB",
            (BLOBS * SIZE) >> 20,
            total >> 20,
            peak >> 20,
            100.0 * peak as f64 / total as f64,
            high / (1 << 20) as f64
        );
            ensure!(
            (peak as f64) <= high,
            "the filesystem reached {peak} bytes, above the high watermark ({high:.0} of {total})"
        );
            // Still serving: the newest blob from the cache, the oldest (evicted) from the origin.
            let mark = registry.log()?.requests.len();
            for d in [&digests[digests.len() - 1], &digests[0]] {
                let url = format!("{}/v2/big/blobs/blobs/{d}", node.url());
                let got = http::fetch_hashed(http::client()?.get(url))?;
                ensure!(got.digest == *d, "after the pulls, {d}: {}", got.status);
            }
            let log = registry.log()?.since(mark);
            ensure!(
                log.blob_fetches(&digests[digests.len() - 1]) == 0,
                "the newest blob was not kept"
            );
            ensure!(node.status()?.store.blobs < BLOBS, "nothing was evicted");
            Ok(())
        },
    );
}

#[test]
fn a_panicking_download_fails_its_followers_and_frees_its_blob() {
    run(
        "a_panicking_download_fails_its_followers_and_frees_its_blob",
        &[Need::Shoal, Need::Bin("docker-registry")],
        |t| {
            let registry = Registry::start(t)?;
            let digest = push_noise(&registry, "p/blob", 1, 32 << 20)?.remove(0);
            let node = Node::start_with(
                t,
                NodeOptions {
                    env: vec![("SHOAL_FAULT_PANIC_DOWNLOAD".into(), digest.clone())],
                    ..NodeOptions::upstream(&registry.url())
                },
            )?;
            let url = format!("{}/v2/p/blob/blobs/{digest}", node.url());
            let client = reqwest::blocking::Client::builder()
                .no_proxy()
                .timeout(std::time::Duration::from_secs(60))
                .build()?;
            let started = std::time::Instant::now();
            let followers: Vec<_> = (0..2)
                .map(|_| {
                    let (client, url) = (client.clone(), url.clone());
                    std::thread::spawn(move || http::fetch_hashed(client.get(url)))
                })
                .collect();
            for f in followers {
                let got = f
                    .join()
                    .map_err(|_| anyhow::anyhow!("client thread panicked"))?;
                let got = got.context("a follower's request timed out or broke (a hang?)")?;
                ensure!(
                    !got.status.is_success() || got.body_error.is_some(),
                    "a follower of the panicked download got a finished {} ({})",
                    got.status,
                    got.digest
                );
            }
            let waited = started.elapsed();
            ensure!(
                waited < std::time::Duration::from_secs(50),
                "followers waited {waited:?}"
            );
            let again = http::fetch_hashed(client.get(&url))?;
            ensure!(
                again.status.is_success() && again.digest == digest,
                "the next request after the panic: {} {:?}",
                again.status,
                again.body_error
            );
            let panics = node
                .metrics()?
                .sum("shoal_downloads_failed_total", &[("kind", "panic")]);
            ensure!(panics == 1.0, "downloads_failed{{kind=panic}} = {panics}");
            println!("the panicked download's followers got errors in {waited:?}; the blob was fetched next time");
            Ok(())
        },
    );
}

// ------------------------------------------------------------------- skips fail in CI

/// Run by [`a_missing_prerequisite_fails_under_ci`] in a child process; ignored otherwise.
#[test]
#[ignore = "a probe for a_missing_prerequisite_fails_under_ci"]
fn probe_needing_a_tool_that_does_not_exist() {
    run(
        "probe_needing_a_tool_that_does_not_exist",
        &[Need::Bin("shoal-no-such-tool")],
        |_| Ok(()),
    );
}

#[test]
fn a_missing_prerequisite_fails_under_ci() {
    let exe = std::env::current_exe().expect("test binary");
    let probe = |ci: Option<&str>| {
        let mut cmd = Command::new(&exe);
        cmd.args([
            "--exact",
            "probe_needing_a_tool_that_does_not_exist",
            "--ignored",
            "--nocapture",
        ]);
        cmd.env_remove("CI");
        if let Some(v) = ci {
            cmd.env("CI", v);
        }
        cmd.output().expect("running the probe")
    };
    let said = |o: &Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    let ci = probe(Some("true"));
    let err = said(&ci);
    assert!(
        !ci.status.success() && err.contains("prerequisite missing under CI"),
        "under CI=true the probe should fail with the reason; stderr: {err}"
    );
    let local = probe(None);
    let err = said(&local);
    assert!(
        local.status.success() && err.contains("SKIP probe_needing_a_tool_that_does_not_exist"),
        "without CI the probe should skip and pass; stderr: {err}"
    );
}

// ------------------------------------------------------------------- resume without Range

/// An origin serving one blob that ignores `Range` and breaks off its first answer half-way.
fn range_ignorer(repo: &'static str, data: Vec<u8>) -> Result<TinyServer> {
    let digest = http::sha256_digest(&data);
    let gets = std::sync::atomic::AtomicUsize::new(0);
    TinyServer::start(std::sync::Arc::new(move |req, out| {
        if req.path() != format!("/v2/{repo}/blobs/{digest}") {
            respond(out, "200 OK", &[], b"{}", req.is_head())?;
            return Ok(Flow::KeepAlive);
        }
        let headers = [("Docker-Content-Digest", digest.as_str())];
        if req.is_head() {
            respond(out, "200 OK", &headers, &data, true)?;
            return Ok(Flow::KeepAlive);
        }
        if gets.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 0 {
            // The first answer breaks off half-way (the node keeps what arrived)…
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", data.len());
            out.write_all(head.as_bytes())?;
            out.write_all(&data[..data.len() / 2])?;
            out.flush()?;
            return Ok(Flow::Close);
        }
        // …and every later one ignores the Range it was sent.
        respond(out, "200 OK", &headers, &data, false)?;
        Ok(Flow::KeepAlive)
    }))
}

#[test]
fn a_resume_against_an_origin_that_ignores_range_completes() {
    run(
        "a_resume_against_an_origin_that_ignores_range_completes",
        &[Need::Shoal],
        |t| {
            let mut data = Vec::new();
            Noise {
                x: 42,
                left: 48 << 20,
            }
            .read_to_end(&mut data)?;
            let digest = http::sha256_digest(&data);
            let origin = range_ignorer("r/blob", data)?;
            let node = Node::start(t, &format!("http://{}", origin.addr()))?;
            let url = format!("{}/v2/r/blob/blobs/{digest}", node.url());
            let first = http::fetch_hashed(http::client()?.get(&url))?;
            ensure!(
                first.body_error.is_some() || !first.status.is_success() || first.digest != digest,
                "the broken first answer was passed on as complete"
            );
            // The node kept a prefix; the next request resumes with Range, which the origin
            // ignores: the node reads from the start, skips what it holds, and completes.
            let kept =
                shoal_e2e::wait::poll("a kept prefix", std::time::Duration::from_secs(20), || {
                    let st = node.status()?;
                    Ok(st
                        .blob(&digest)
                        .filter(|b| b.present_bytes > 0)
                        .map(|b| b.present_bytes))
                })?;
            let second = http::fetch_hashed(http::client()?.get(&url))?;
            ensure!(
                second.status.is_success()
                    && second.body_error.is_none()
                    && second.digest == digest,
                "the resumed download: {} {:?}",
                second.status,
                second.body_error
            );
            println!(
                "kept {kept} bytes after a broken answer; the resume read past an ignored Range and completed"
            );
            Ok(())
        },
    );
}

/// An origin a request names (run by the requester) that answers without end: a `tags/list`
/// and a token that never stop coming, and a blob that drips a byte now and then. The node reads
/// the answers only up to their bounds, and an isolated download whose requester left stops.
#[test]
fn answers_of_an_origin_a_request_names_are_read_within_bounds() {
    run(
        "answers_of_an_origin_a_request_names_are_read_within_bounds",
        &[Need::Shoal, Need::Bin("docker-registry")],
        |t| {
            let registry = Registry::start(t)?;
            let flood = TinyServer::start(std::sync::Arc::new(|req, out| {
                let path = req.path().to_owned();
                if path.ends_with("/tags/list") || path == "/token" {
                    let head = if path == "/token" {
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                    } else {
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nDocker-Distribution-Api-Version: registry/2.0\r\nTransfer-Encoding: chunked\r\n\r\n"
                    };
                    out.write_all(head.as_bytes())?;
                    let chunk = vec![b'a'; 1 << 20];
                    out.write_all(b"a\r\n{\"token\":\"\r\n")?;
                    // Up to 256 MiB, or until the node hangs up.
                    for _ in 0..256 {
                        out.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())?;
                        out.write_all(&chunk)?;
                        out.write_all(b"\r\n")?;
                    }
                    out.write_all(b"0\r\n\r\n")?;
                    return Ok(Flow::Close);
                }
                if path.contains("/manifests/") {
                    let realm = format!(
                        "Bearer realm=\"http://{}/token\",service=\"x\",scope=\"repository:tok/x:pull\"",
                        req.header("host").unwrap_or("127.0.0.1")
                    );
                    respond(
                        out,
                        "401 Unauthorized",
                        &[("WWW-Authenticate", &realm)],
                        b"",
                        req.is_head(),
                    )?;
                    return Ok(Flow::KeepAlive);
                }
                if path.contains("/blobs/") {
                    // A 10 GiB blob, a byte every second.
                    out.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10737418240\r\n\r\n")?;
                    for _ in 0..120 {
                        out.write_all(b"x")?;
                        out.flush()?;
                        std::thread::sleep(std::time::Duration::from_secs(1));
                    }
                    return Ok(Flow::Close);
                }
                respond(out, "200 OK", &[], b"{}", req.is_head())?;
                Ok(Flow::KeepAlive)
            }))?;
            let config = t.subdir("cfg")?.join("node.toml");
            // The flooding origin runs on loopback: let unlisted hosts be local for this test.
            std::fs::write(&config, "[mirror]\nallow_local_upstreams = true\n")?;
            let node = Node::start_with(
                t,
                NodeOptions {
                    config: Some(config),
                    ..NodeOptions::upstream(&registry.url())
                },
            )?;
            let proxy = http::proxy_client(&node.listen_addr())?;
            let origin = flood.addr();
            let tags = http::fetch(proxy.get(format!("http://{origin}/v2/big/x/tags/list")))?;
            ensure!(
                !tags.status.is_success() && tags.body.len() < (2 << 20),
                "an endless tags/list was relayed: {} with {} bytes",
                tags.status,
                tags.body.len()
            );
            let manifest =
                http::fetch(proxy.get(format!("http://{origin}/v2/tok/x/manifests/latest")))?;
            ensure!(
                !manifest.status.is_success(),
                "a manifest behind an endless token answer: {}",
                manifest.short()
            );
            // A client asks for the dripping blob and gives up; its isolated download stops.
            let digest = format!("sha256:{}", "ab".repeat(32));
            let url = format!("http://{origin}/v2/drip/x/blobs/{digest}");
            let quick = reqwest::blocking::Client::builder()
                .proxy(reqwest::Proxy::http(format!(
                    "http://{}",
                    node.listen_addr()
                ))?)
                .timeout(std::time::Duration::from_secs(3))
                .build()?;
            let _ = quick.get(&url).send().and_then(|r| r.bytes());
            drop(quick);
            shoal_e2e::wait::poll(
                "the abandoned download to stop",
                std::time::Duration::from_secs(60),
                || {
                    let n = node.metrics()?.sum("shoal_downloads_in_flight", &[]);
                    Ok((n == 0.0).then_some(()))
                },
            )?;
            let health =
                http::fetch(http::client()?.get(format!("http://{}/healthz", node.admin_addr())))?;
            ensure!(
                health.completed_ok(),
                "the node's health check after the flood: {}",
                health.short()
            );
            println!("an endless tags/list and token, and a dripping blob nobody waits for, were all cut off");
            Ok(())
        },
    );
}
