//! End-to-end tests of the node as a registry mirror and forward proxy, against a real origin
//! (distribution registry) holding the real two-layer fixture image, with real clients (skopeo,
//! containerd's ctr, reqwest). Origin-side facts come from the registry's own log.
//!
//! Needs the `shoal` binary: run `cargo build -p shoal-node` first (or set SHOAL_BIN). Each test
//! has its own registry, node(s) and temp dirs, so they run in parallel.

use std::sync::{Arc, Barrier};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use shoal_e2e::containerd::Containerd;
use shoal_e2e::fixture::{assert_same_image, Image, OciLayout};
use shoal_e2e::hostile::HostileOrigin;
use shoal_e2e::http::{self, Fetched};
use shoal_e2e::node::{Node, NodeOptions};
use shoal_e2e::registry::{Creds, Registry};
use shoal_e2e::setup::{self, IMAGE, MANIFEST_ACCEPT, REPO, TAG};
use shoal_e2e::wait::poll;
use shoal_e2e::{ranges, run, skopeo, Need, TestCtx};

const MIRROR: &[Need] = &[
    Need::Bin("docker-registry"),
    Need::Bin("skopeo"),
    Need::Shoal,
];
const PRIVATE: &[Need] = &[
    Need::Bin("docker-registry"),
    Need::Bin("skopeo"),
    Need::Bin("htpasswd"),
    Need::Shoal,
];
const CONTAINERD: &[Need] = &[
    Need::Root,
    Need::Bin("docker-registry"),
    Need::Bin("skopeo"),
    Need::Bin("htpasswd"),
    Need::Bin("containerd"),
    Need::Bin("ctr"),
    Need::Shoal,
];
const USER: &str = "alice";
const PASS: &str = "correct horse";

// ---------------------------------------------------------------- 1. skopeo copy

#[test]
fn skopeo_copy_through_mirror_is_byte_identical() {
    run(
        "skopeo_copy_through_mirror_is_byte_identical",
        MIRROR,
        |t| {
            let (registry, image) = setup::anonymous_origin(t)?;
            let node = Node::start(t, &registry.url())?;
            copy_and_compare(t, &node, &image, None)?;
            ensure_served_layers(&node, &image)?;
            ensure_each_layer_fetched_once(&registry, &image)
        },
    );
}

#[test]
fn skopeo_copy_through_mirror_with_htpasswd_origin() {
    run(
        "skopeo_copy_through_mirror_with_htpasswd_origin",
        PRIVATE,
        |t| {
            let (registry, image) = setup::private_origin(t, USER, PASS)?;
            let node = Node::start(t, &registry.url())?;
            copy_and_compare(t, &node, &image, Some(&Creds::new(USER, PASS)))?;
            ensure_served_layers(&node, &image)?;
            ensure_each_layer_fetched_once(&registry, &image)
        },
    );
}

#[test]
fn metrics_status_and_headers_agree_with_the_origin() {
    run(
        "metrics_status_and_headers_agree_with_the_origin",
        MIRROR,
        |t| {
            let (registry, image) = setup::anonymous_origin(t)?;
            let node = Node::start(t, &registry.url())?;
            let client = http::client()?;

            let v2 = http::fetch(client.get(format!("{}/v2/", node.url())))?;
            ensure!(v2.status.as_u16() == 200, "GET /v2/: {}", v2.short());
            let manifest_url = format!("{}/v2/{REPO}/manifests/{TAG}", node.url());
            let got = http::fetch(client.get(&manifest_url).header("Accept", MANIFEST_ACCEPT))?;
            ensure!(
                got.completed_ok() && got.body == image.manifest,
                "manifest: {}",
                got.short()
            );
            ensure!(
                got.header("content-type") == Some(image.manifest_media_type.as_str()),
                "manifest Content-Type {:?}",
                got.header("content-type")
            );
            ensure!(
                got.header("docker-content-digest") == Some(image.manifest_digest.as_str()),
                "manifest Docker-Content-Digest {:?}",
                got.header("docker-content-digest")
            );
            let layer = image.largest_layer()?;
            let head = http::fetch(client.head(format!(
                "{}/v2/{REPO}/blobs/{}",
                node.url(),
                layer.digest
            )))?;
            let length = head.header("content-length").map(str::to_owned);
            ensure!(head.status.as_u16() == 200, "HEAD blob: {}", head.short());
            ensure!(
                length == Some(layer.size.to_string()),
                "HEAD blob Content-Length {length:?}"
            );

            copy_and_compare(t, &node, &image, None)?;
            copy_and_compare(t, &node, &image, None)?;
            wait_complete(&node, &blob_digests(&image))?;

            let metrics = node.metrics()?;
            for name in [
                "shoal_http_requests_total",
                "shoal_served_bytes_total",
                "shoal_origin_bytes_total",
                "shoal_origin_requests_total",
                "shoal_blob_cache_hits_total",
                "shoal_blob_cache_misses_total",
                "shoal_downloads_in_flight",
                "shoal_request_duration_seconds_count",
            ] {
                ensure!(metrics.has(name), "metric {name} missing");
            }
            let log = registry.log()?;
            let origin_blob = metrics.sum("shoal_origin_bytes_total", &[("kind", "blob")]);
            ensure!(
                origin_blob == log.blob_bytes_written() as f64,
                "node says {origin_blob} blob bytes from the origin, the origin's log says {}",
                log.blob_bytes_written()
            );
            let served = metrics.sum("shoal_served_bytes_total", &[("kind", "blob")]);
            ensure!(
                served >= 2.0 * image.layer_bytes() as f64,
                "served {served} after two pulls"
            );
            ensure!(
                metrics.sum("shoal_blob_cache_hits_total", &[]) >= 3.0,
                "no cache hits counted"
            );
            ensure!(
                metrics.sum("shoal_downloads_in_flight", &[]) == 0.0,
                "downloads still in flight"
            );
            let ok_blob_gets = metrics.sum(
                "shoal_http_requests_total",
                &[("route", "blob"), ("method", "GET"), ("status", "200")],
            );
            ensure!(
                ok_blob_gets >= 6.0,
                "{ok_blob_gets} blob GETs counted with status 200"
            );

            let status = node.status()?;
            let cli = node.status_cli()?;
            for (source, status) in [("api", &status), ("shoal status --json", &cli)] {
                ensure!(
                    status.store.complete >= 3,
                    "{source}: store {:?}",
                    status.store
                );
                ensure!(
                    status.traffic.origin_bytes >= log.blob_bytes_written(),
                    "{source}: traffic {:?}",
                    status.traffic
                );
                for desc in image.blobs() {
                    let blob = status
                        .blob(&desc.digest)
                        .with_context(|| format!("{source}: {}", desc.digest))?;
                    ensure!(
                        blob.complete && blob.present_bytes == desc.size,
                        "{source}: {blob:?}, expected {} bytes complete",
                        desc.size
                    );
                }
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------- 2. containerd

#[test]
fn ctr_pull_through_mirror() {
    run("ctr_pull_through_mirror", CONTAINERD, |t| {
        let (registry, image) = setup::anonymous_origin(t)?;
        ctr_pull_case(t, &registry, &image, None)
    });
}

#[test]
fn ctr_pull_through_mirror_with_htpasswd_origin() {
    run(
        "ctr_pull_through_mirror_with_htpasswd_origin",
        CONTAINERD,
        |t| {
            let (registry, image) = setup::private_origin(t, USER, PASS)?;
            ctr_pull_case(t, &registry, &image, Some(&Creds::new(USER, PASS)))
        },
    );
}

fn ctr_pull_case(
    t: &TestCtx,
    registry: &Registry,
    image: &Image,
    creds: Option<&Creds>,
) -> Result<()> {
    // The node knows the origin by the host name containerd uses (`?ns=127.0.0.1:R`).
    let options = NodeOptions {
        upstream: registry.url(),
        host_upstreams: vec![(registry.addr(), registry.url())],
        ..NodeOptions::default()
    };
    let node = Node::start_with(t, options)?;
    let containerd = Containerd::start(t)?;
    let hosts = containerd.write_hosts(&registry.addr(), &node.url())?;
    let reference = format!("{}/{IMAGE}", registry.addr());
    let out = containerd.pull(&reference, Some(&hosts), creds)?;
    ensure!(
        out.success,
        "ctr image pull through the mirror failed: {}",
        out.output
    );
    ensure!(
        containerd.images()?.contains(&reference),
        "image not listed after the pull"
    );
    // containerd silently falls back to the `server` of hosts.toml when the mirror fails.
    let log = registry.log()?;
    let bypass: Vec<_> = log
        .requests
        .iter()
        .filter(|r| r.user_agent.starts_with("containerd") && r.uri.starts_with("/v2/test/"))
        .map(|r| format!("{} {} -> {}", r.method, r.uri, r.status))
        .collect();
    ensure!(
        bypass.is_empty(),
        "containerd bypassed the mirror and pulled from the origin itself: {bypass:?}"
    );
    ensure_served_layers(&node, image)?;
    ensure_each_layer_fetched_once(registry, image)
}

// ---------------------------------------------------------------- 3. forward proxy

#[test]
fn forward_proxy_ranges_return_right_bytes() {
    run("forward_proxy_ranges_return_right_bytes", MIRROR, |t| {
        let (registry, image) = setup::anonymous_origin(t)?;
        let node = Node::start(t, &registry.url())?;
        let layer = image.largest_layer()?.clone();
        let bytes = OciLayout::debian_python()?.blob(&layer.digest)?;
        let url = format!("{}/v2/{REPO}/blobs/{}", registry.url(), layer.digest);
        let proxy = http::proxy_client(&node.listen_addr())?;

        // Cold (the node is fetching while it answers), then warm (after a whole-blob read).
        ranges::check_ranges(&proxy, &url, &bytes).context("ranges on an uncached blob")?;
        let whole = http::fetch_hashed(proxy.get(&url))?;
        ensure!(
            whole.status.as_u16() == 200,
            "whole blob via proxy: {}",
            whole.status
        );
        ensure!(
            whole.digest == layer.digest && whole.body_error.is_none(),
            "whole blob: {whole:?}"
        );
        ranges::check_ranges(&proxy, &url, &bytes).context("ranges on a cached blob")?;

        // Other absolute-URI requests pass through; nydusd's health endpoint answers.
        let v2 = http::fetch(proxy.get(format!("{}/v2/", registry.url())))?;
        ensure!(
            v2.status.as_u16() == 200,
            "pass-through GET /v2/: {}",
            v2.short()
        );
        for path in ["/ping", "/healthz"] {
            let got = http::fetch(http::client()?.get(format!("{}{path}", node.url())))?;
            ensure!(
                got.status.as_u16() == 200,
                "{path} on the listen port: {}",
                got.short()
            );
        }
        Ok(())
    });
}

// ---------------------------------------------------------------- 4. one download per blob

#[test]
fn concurrent_clients_cause_one_origin_fetch() {
    run("concurrent_clients_cause_one_origin_fetch", MIRROR, |t| {
        const CLIENTS: usize = 20;
        let (registry, image) = setup::anonymous_origin(t)?;
        let node = Node::start(t, &registry.url())?;
        let layer = image.largest_layer()?.clone();
        let url = format!("{}/v2/{REPO}/blobs/{}", node.url(), layer.digest);
        let barrier = Arc::new(Barrier::new(CLIENTS));
        let handles: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let (url, barrier) = (url.clone(), barrier.clone());
                std::thread::spawn(move || -> Result<http::HashedFetch> {
                    let client = http::client()?;
                    barrier.wait();
                    http::fetch_hashed(client.get(&url))
                })
            })
            .collect();
        for (i, handle) in handles.into_iter().enumerate() {
            let got = handle
                .join()
                .map_err(|_| anyhow::anyhow!("client {i} panicked"))??;
            ensure!(
                got.status.as_u16() == 200,
                "client {i}: status {}",
                got.status
            );
            ensure!(
                got.body_error.is_none(),
                "client {i}: body broke off: {:?}",
                got.body_error
            );
            ensure!(
                got.len == layer.size,
                "client {i}: {} bytes of {}",
                got.len,
                layer.size
            );
            ensure!(
                got.digest == layer.digest,
                "client {i}: wrong bytes ({})",
                got.digest
            );
        }
        let log = registry.log()?;
        let fetches = log.blob_fetches(&layer.digest);
        ensure!(
            fetches == 1,
            "origin served {fetches} GETs of {} for {CLIENTS} clients: {:?}",
            layer.digest,
            log.blob_requests(&layer.digest)
        );
        Ok(())
    });
}

// ---------------------------------------------------------------- 5. restarts

#[test]
fn restart_after_sigterm_reads_no_blob_bytes_from_origin() {
    run(
        "restart_after_sigterm_reads_no_blob_bytes_from_origin",
        MIRROR,
        |t| {
            restart_case(t, |node| {
                node.terminate()?;
                Ok(())
            })
        },
    );
}

#[test]
fn restart_after_sigkill_reads_no_blob_bytes_from_origin() {
    run(
        "restart_after_sigkill_reads_no_blob_bytes_from_origin",
        MIRROR,
        |t| restart_case(t, |node| node.kill()),
    );
}

fn restart_case(t: &TestCtx, stop: impl FnOnce(&mut Node) -> Result<()>) -> Result<()> {
    let (registry, image) = setup::anonymous_origin(t)?;
    let mut node = Node::start(t, &registry.url())?;
    copy_and_compare(t, &node, &image, None)?;
    // A crash may lose what the node has not yet recorded; wait until it says every blob is in.
    wait_complete(&node, &blob_digests(&image))?;
    let mark = registry.log()?.requests.len();
    stop(&mut node)?;
    node.restart()?;
    copy_and_compare(t, &node, &image, None)?;
    let since = registry.log()?.since(mark);
    ensure!(
        since.blob_fetch_count() == 0 && since.blob_bytes_written() == 0,
        "second pull read {} blob bytes in {} GETs from the origin: {:?}",
        since.blob_bytes_written(),
        since.blob_fetch_count(),
        since
            .requests
            .iter()
            .filter(|r| r.is_blob_fetch())
            .collect::<Vec<_>>()
    );
    Ok(())
}

// ---------------------------------------------------------------- 6. private content

#[test]
fn private_content_needs_valid_credentials_cached_or_not() {
    run(
        "private_content_needs_valid_credentials_cached_or_not",
        PRIVATE,
        |t| {
            let (registry, image) = setup::private_origin(t, USER, PASS)?;
            let node = Node::start(t, &registry.url())?;
            let wrong = Creds::new(USER, "wrong password");
            let good = Creds::new(USER, PASS);

            for (phase, creds) in [("uncached", None), ("uncached", Some(&wrong))] {
                ensure_denied(&node, &registry, &image, creds).context(phase)?;
            }
            let (out, _) = skopeo::copy_to_oci(t, &node.listen_addr(), IMAGE, None)?;
            ensure!(
                !out.success,
                "skopeo copy without creds succeeded through the mirror"
            );

            copy_and_compare(t, &node, &image, Some(&good))?;
            wait_complete(&node, &blob_digests(&image))?;

            for (phase, creds) in [("cached", None), ("cached", Some(&wrong))] {
                ensure_denied(&node, &registry, &image, creds).context(phase)?;
            }
            let (out, _) = skopeo::copy_to_oci(t, &node.listen_addr(), IMAGE, Some(&wrong))?;
            ensure!(
                !out.success,
                "skopeo copy with wrong creds succeeded through the mirror"
            );
            // The good client still gets everything from the cache.
            copy_and_compare(t, &node, &image, Some(&good))
        },
    );
}

/// Every way of asking for the image's manifest or blobs, without valid credentials, is refused
/// and never carries the content.
fn ensure_denied(
    node: &Node,
    registry: &Registry,
    image: &Image,
    creds: Option<&Creds>,
) -> Result<()> {
    let who = if creds.is_some() {
        "wrong creds"
    } else {
        "no creds"
    };
    let client = http::client()?;
    let auth = |r: reqwest::blocking::RequestBuilder| match creds {
        Some(c) => r.basic_auth(&c.user, Some(&c.pass)),
        None => r,
    };
    let mut asks: Vec<(String, reqwest::blocking::RequestBuilder, Option<&str>)> = Vec::new();
    for reference in [TAG, image.manifest_digest.as_str()] {
        let url = format!("{}/v2/{REPO}/manifests/{reference}", node.url());
        let get = auth(client.get(&url).header("Accept", MANIFEST_ACCEPT));
        asks.push((
            format!("GET manifest {reference}"),
            get,
            Some(image.manifest_digest.as_str()),
        ));
        let head = auth(client.head(&url).header("Accept", MANIFEST_ACCEPT));
        asks.push((format!("HEAD manifest {reference}"), head, None));
    }
    for blob in image.blobs() {
        let url = format!("{}/v2/{REPO}/blobs/{}", node.url(), blob.digest);
        asks.push((
            format!("GET blob {}", blob.digest),
            auth(client.get(&url)),
            Some(blob.digest.as_str()),
        ));
        asks.push((
            format!("HEAD blob {}", blob.digest),
            auth(client.head(&url)),
            None,
        ));
        let ranged = auth(client.get(&url).header("Range", "bytes=0-99"));
        asks.push((format!("GET blob {} bytes=0-99", blob.digest), ranged, None));
        // The same blob asked for through the forward proxy.
        let proxy_url = format!("{}/v2/{REPO}/blobs/{}", registry.url(), blob.digest);
        let proxied = auth(http::proxy_client(&node.listen_addr())?.get(proxy_url));
        asks.push((
            format!("proxy GET blob {}", blob.digest),
            proxied,
            Some(blob.digest.as_str()),
        ));
    }
    for (what, request, content_digest) in asks {
        let got = http::fetch(request)?;
        ensure!(
            !got.status.is_success(),
            "{who}: {what} answered {}",
            got.short()
        );
        ensure!(
            matches!(got.status.as_u16(), 401 | 403 | 404),
            "{who}: {what}: expected 401/403/404, got {}",
            got.short()
        );
        if let Some(digest) = content_digest {
            ensure!(got.digest() != digest, "{who}: {what} leaked the content");
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- 7. corrupt and absent origins

#[test]
fn corrupt_origin_blob_aborts_the_stream_and_is_not_kept() {
    run(
        "corrupt_origin_blob_aborts_the_stream_and_is_not_kept",
        MIRROR,
        |t| {
            let (registry, image) = setup::anonymous_origin(t)?;
            let node = Node::start(t, &registry.url())?;
            let layer = image.largest_layer()?.clone();
            let origin_file = registry.blob_path(&layer.digest)?;
            let offset = layer.size / 2;
            let original = setup::flip_byte(&origin_file, offset)?;
            let url = format!("{}/v2/{REPO}/blobs/{}", node.url(), layer.digest);

            // Five clients share the one (corrupt) download; then one more asks again.
            let clients: Vec<_> = (0..5)
                .map(|_| {
                    let url = url.clone();
                    std::thread::spawn(move || http::fetch_hashed(http::client()?.get(&url)))
                })
                .collect();
            for (i, client) in clients.into_iter().enumerate() {
                let result = client
                    .join()
                    .map_err(|_| anyhow::anyhow!("client {i} panicked"))?;
                ensure_not_served_wrong(result, &layer.digest)
                    .with_context(|| format!("concurrent client {i} of the corrupt blob"))?;
            }
            ensure_not_served_wrong(http::fetch_hashed(http::client()?.get(&url)), &layer.digest)
                .context("a later GET of the corrupt blob")?;
            let (out, _) = skopeo::copy_to_oci(t, &node.listen_addr(), IMAGE, None)?;
            ensure!(
                !out.success,
                "skopeo copy of an image with a corrupt layer succeeded"
            );

            let content = node.blob_file(&layer.digest)?;
            poll(
                "the node to drop the corrupt blob",
                Duration::from_secs(15),
                || {
                    let status = node.status()?;
                    let complete = status.blob(&layer.digest).is_some_and(|b| b.complete);
                    ensure!(
                        !complete,
                        "status says the corrupt blob is complete: {:?}",
                        status.blob(&layer.digest)
                    );
                    Ok((!content.exists()).then_some(()))
                },
            )
            .with_context(|| format!("content file {} still there", content.display()))?;

            // Repaired origin: the node fetches again and serves the right bytes.
            setup::write_byte(&origin_file, offset, original)?;
            let got = http::fetch_hashed(http::client()?.get(&url))?;
            ensure!(
                got.status.as_u16() == 200 && got.digest == layer.digest,
                "after repair: {got:?}"
            );
            Ok(())
        },
    );
}

/// Passes when the response was an error of any kind, when its body broke off, or when it carried
/// the right bytes (refetched); fails only on a finished 2xx response with wrong bytes.
fn ensure_not_served_wrong(result: Result<http::HashedFetch>, digest: &str) -> Result<()> {
    let Ok(got) = result else { return Ok(()) };
    if !got.status.is_success() || got.body_error.is_some() || got.digest == digest {
        return Ok(());
    }
    bail!(
        "a complete {} response of {} bytes hashing to {} (blob is {digest}): wrong bytes served \
         as a successful response",
        got.status,
        got.len,
        got.digest
    )
}

#[test]
fn corrupt_manifest_by_digest_from_origin_is_refused() {
    run(
        "corrupt_manifest_by_digest_from_origin_is_refused",
        MIRROR,
        |t| {
            let (registry, image) = setup::anonymous_origin(t)?;
            let node = Node::start(t, &registry.url())?;
            // Change one hex digit inside the manifest (still valid JSON, so the origin serves it).
            let stored = registry.blob_path(&image.manifest_digest)?;
            let text = std::fs::read(&stored)?;
            let at =
                find(&text, image.config.digest.as_bytes()).context("config digest in manifest")?;
            let offset = at + "sha256:".len();
            let mut changed = text.clone();
            changed[offset] = if text[offset] == b'0' { b'1' } else { b'0' };
            std::fs::write(&stored, &changed)?;
            let direct = format!(
                "{}/v2/{REPO}/manifests/{}",
                registry.url(),
                image.manifest_digest
            );
            let got = http::fetch(
                http::client()?
                    .get(direct)
                    .header("Accept", MANIFEST_ACCEPT),
            )?;
            ensure!(
                got.completed_ok() && got.body == changed,
                "origin refuses the bad manifest"
            );

            let url = format!(
                "{}/v2/{REPO}/manifests/{}",
                node.url(),
                image.manifest_digest
            );
            for attempt in ["first", "second"] {
                let got = http::fetch(http::client()?.get(&url).header("Accept", MANIFEST_ACCEPT))?;
                ensure!(
                    !(got.completed_ok() && got.body == changed),
                    "{attempt} GET by digest served a manifest that does not match its digest"
                );
            }
            // Repaired origin: the right manifest comes through.
            std::fs::write(&stored, &text)?;
            let got = http::fetch(http::client()?.get(&url).header("Accept", MANIFEST_ACCEPT))?;
            ensure!(
                got.completed_ok() && got.body == image.manifest,
                "after repair: {}",
                got.short()
            );
            Ok(())
        },
    );
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn origin_down_still_serves_cached_image() {
    run("origin_down_still_serves_cached_image", MIRROR, |t| {
        let (mut registry, image) = setup::anonymous_origin(t)?;
        let node = Node::start(t, &registry.url())?;
        copy_and_compare(t, &node, &image, None)?;
        wait_complete(&node, &blob_digests(&image))?;
        registry.stop()?;
        copy_and_compare(t, &node, &image, None).context("by tag, origin down")?;
        let by_digest = format!("{REPO}@{}", image.manifest_digest);
        let (out, dir) = skopeo::copy_to_oci(t, &node.listen_addr(), &by_digest, None)?;
        ensure!(out.success, "by digest, origin down: {}", out.stderr);
        assert_same_image(&image, &OciLayout::open(dir)?)
    });
}

// ---------------------------------------------------------------- 8. bad input

#[test]
fn bad_input_gets_oci_errors_and_the_node_keeps_working() {
    run(
        "bad_input_gets_oci_errors_and_the_node_keeps_working",
        MIRROR,
        |t| {
            let (registry, image) = setup::anonymous_origin(t)?;
            let node = Node::start(t, &registry.url())?;
            let blob = format!("/v2/{REPO}/blobs/{}", image.config.digest);
            let zeros = format!("sha256:{}", "0".repeat(64));
            let upper = format!("sha256:{}", "A".repeat(64));
            let long_tag = "t".repeat(129);
            const NAME: &[&str] = &["NAME_INVALID", "NAME_UNKNOWN"];
            const TAG_BAD: &[&str] = &["TAG_INVALID", "MANIFEST_INVALID", "NAME_INVALID"];
            let cases = [
                bad("/v2/UPPER/manifests/latest", None, &[400, 404], NAME),
                bad("/v2/a//b/manifests/latest", None, &[400, 404], NAME),
                bad("/v2/-a/manifests/latest", None, &[400, 404], NAME),
                bad(
                    &format!("/v2/{REPO}/blobs/sha256:1234"),
                    None,
                    &[400],
                    &["DIGEST_INVALID"],
                ),
                bad(
                    &format!("/v2/{REPO}/blobs/{upper}"),
                    None,
                    &[400],
                    &["DIGEST_INVALID"],
                ),
                bad(
                    &format!("/v2/{REPO}/blobs/md5:d41d8cd98f00b204e9800998ecf8427e"),
                    None,
                    &[400],
                    &["DIGEST_INVALID", "UNSUPPORTED"],
                ),
                bad(
                    &format!("/v2/{REPO}/blobs/{zeros}"),
                    None,
                    &[404],
                    &["BLOB_UNKNOWN"],
                ),
                bad(
                    &format!("/v2/{REPO}/manifests/{long_tag}"),
                    None,
                    &[400],
                    TAG_BAD,
                ),
                bad(
                    &format!("/v2/{REPO}/manifests/bad!tag"),
                    None,
                    &[400],
                    TAG_BAD,
                ),
                bad(
                    &format!("/v2/{REPO}/manifests/sha256:xyz"),
                    None,
                    &[400],
                    &["DIGEST_INVALID", "MANIFEST_INVALID"],
                ),
                bad(
                    &format!("/v2/{REPO}/manifests/nope"),
                    None,
                    &[404],
                    &["MANIFEST_UNKNOWN"],
                ),
                bad(&blob, Some("bytes=5-2"), &[400, 416], &["RANGE_INVALID"]),
                bad(&blob, Some("bytes=abc"), &[400, 416], &["RANGE_INVALID"]),
                bad(
                    &blob,
                    Some("bytes=0-1,5-"),
                    &[400, 416],
                    &["RANGE_INVALID", "UNSUPPORTED"],
                ),
            ];
            let client = http::client()?;
            let mut failures = Vec::new();
            for BadCase {
                path,
                range,
                statuses,
                codes,
            } in &cases
            {
                let mut request = client.get(format!("{}{path}", node.url()));
                if let Some(range) = range {
                    request = request.header("Range", *range);
                }
                let got = http::fetch(request)?;
                if let Err(err) = check_oci_error(&got, statuses, codes) {
                    failures.push(format!("GET {path} {range:?}: {err:#}"));
                }
            }
            failures.extend(traversal_failures(&node.listen_addr()));
            ensure_node_still_works(&node, &image)?;
            ensure!(
                failures.is_empty(),
                "{} bad-input cases failed:\n{}",
                failures.len(),
                failures.join("\n")
            );
            Ok(())
        },
    );
}

/// A request that must get an OCI error.
struct BadCase {
    path: String,
    range: Option<&'static str>,
    statuses: &'static [u16],
    codes: &'static [&'static str],
}

fn bad(
    path: &str,
    range: Option<&'static str>,
    statuses: &'static [u16],
    codes: &'static [&'static str],
) -> BadCase {
    BadCase {
        path: path.to_owned(),
        range,
        statuses,
        codes,
    }
}

fn check_oci_error(got: &Fetched, statuses: &[u16], codes: &[&str]) -> Result<()> {
    let status = got.status.as_u16();
    ensure!(
        statuses.contains(&status),
        "status {status}, expected one of {statuses:?}: {}",
        got.short()
    );
    let found = got.oci_error_codes();
    ensure!(
        found.iter().any(|c| codes.contains(&c.as_str())),
        "error codes {found:?}, expected one of {codes:?}: {}",
        got.short()
    );
    Ok(())
}

/// Request targets sent verbatim (a URL library would normalise them away).
fn traversal_failures(addr: &str) -> Vec<String> {
    let targets = [
        "/v2/../../etc/passwd",
        "/v2/%2e%2e/%2e%2e/etc/passwd",
        "/v2/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
        "/v2/a/../b/manifests/latest",
        "/v2/test/..%2f..%2f..%2fetc/manifests/passwd",
        "/v2/test/python/blobs/..%2f..%2f..%2f..%2fetc%2fpasswd",
        "/v2/test/python/blobs/sha256:..%2f..%2f..%2fetc%2fpasswd",
        "/v2/test/python/manifests/..%2f..%2f..%2fetc%2fpasswd",
        "/../../../../etc/passwd",
    ];
    let mut failures = Vec::new();
    for target in targets {
        let outcome = http::raw_get(addr, target).and_then(|got| {
            ensure!(
                (400..500).contains(&got.status),
                "status {} (want 4xx)",
                got.status
            );
            ensure!(
                !String::from_utf8_lossy(&got.body).contains("root:"),
                "body has /etc/passwd"
            );
            ensure!(
                !got.oci_error_codes().is_empty(),
                "no OCI error JSON: {:?}",
                String::from_utf8_lossy(&got.body)
            );
            Ok(())
        });
        if let Err(err) = outcome {
            failures.push(format!("GET {target}: {err:#}"));
        }
    }
    failures
}

#[test]
fn oversized_manifest_from_origin_is_refused() {
    run("oversized_manifest_from_origin_is_refused", MIRROR, |t| {
        // distribution refuses >4 MiB manifests on PUT and on read, so a hostile origin serves one.
        let hostile = HostileOrigin::oversized_manifest(5 << 20)?;
        let (registry, image) = setup::anonymous_origin(t)?;
        let options = NodeOptions {
            upstream: registry.url(),
            host_upstreams: vec![(host_of(&hostile.url()), hostile.url())],
            ..NodeOptions::default()
        };
        let node = Node::start_with(t, options)?;
        let client = http::client()?;
        let ns = host_of(&hostile.url());
        for reference in ["latest", hostile.manifest_digest()] {
            let url = format!("{}/v2/test/big/manifests/{reference}?ns={ns}", node.url());
            let got = http::fetch(client.get(&url).header("Accept", MANIFEST_ACCEPT))?;
            ensure!(
                !got.status.is_success() && got.body.len() < hostile.manifest_len(),
                "a {} byte manifest was served: {}",
                hostile.manifest_len(),
                got.short()
            );
            ensure!(
                !got.oci_error_codes().is_empty(),
                "no OCI error JSON: {}",
                got.short()
            );
        }
        ensure!(
            hostile.connections() > 0,
            "the node never asked the hostile origin (ns routing?)"
        );
        ensure_node_still_works(&node, &image)
    });
}

#[test]
fn corrupted_store_file_is_detected_not_served() {
    run("corrupted_store_file_is_detected_not_served", MIRROR, |t| {
        let (registry, image) = setup::anonymous_origin(t)?;
        let mut node = Node::start(t, &registry.url())?;
        let layer = image.largest_layer()?.clone();
        let url = format!("{}/v2/{REPO}/blobs/{}", node.url(), layer.digest);
        let first = http::fetch_hashed(http::client()?.get(&url))?;
        ensure!(first.digest == layer.digest, "first GET: {first:?}");
        wait_complete(&node, std::slice::from_ref(&layer.digest))?;
        node.terminate()?;
        let file = node.blob_file(&layer.digest)?;
        ensure!(file.is_file(), "no content file at {}", file.display());
        let offset = layer.size / 2;
        setup::flip_byte(&file, offset)?;
        node.restart()?;

        let bytes = OciLayout::debian_python()?.blob(&layer.digest)?;
        let (lo, hi) = (offset - 4096, offset + 4095);
        let ranged = http::fetch(
            http::client()?
                .get(&url)
                .header("Range", format!("bytes={lo}-{hi}")),
        );
        if let Ok(got) = ranged {
            let wrong = got.status.as_u16() == 206
                && got.body_error.is_none()
                && got.body != bytes[lo as usize..=hi as usize];
            ensure!(
                !wrong,
                "a range over the corrupted byte was served with wrong bytes"
            );
        }
        ensure_not_served_wrong(http::fetch_hashed(http::client()?.get(&url)), &layer.digest)
            .context("whole GET after corrupting the store file")?;
        // Afterwards the node must serve a correct copy (refetched), and never a wrong one.
        let correct = poll(
            "a correct copy after the corruption",
            Duration::from_secs(60),
            || {
                let got = http::fetch_hashed(http::client()?.get(&url))?;
                if got.status.as_u16() == 200 && got.body_error.is_none() {
                    return Ok(Some(got.digest == layer.digest));
                }
                Ok(None)
            },
        )?;
        ensure!(correct, "a later GET served wrong bytes as a complete 200");
        Ok(())
    });
}

// ---------------------------------------------------------------- upstream selection

#[test]
fn upstream_chosen_by_ns_then_header_then_default() {
    run(
        "upstream_chosen_by_ns_then_header_then_default",
        MIRROR,
        |t| {
            let (default_origin, python) = setup::anonymous_origin(t)?;
            // A second origin holding a different image under the same name.
            let other = Registry::start(t)?;
            skopeo::push_fixture_ref(t, &other, "base", IMAGE)?;
            let base = OciLayout::debian_python()?.image("base")?;
            let options = NodeOptions {
                upstream: default_origin.url(),
                host_upstreams: vec![(other.addr(), other.url())],
                ..NodeOptions::default()
            };
            let node = Node::start_with(t, options)?;
            let client = http::client()?;
            let url = format!("{}/v2/{REPO}/manifests/{TAG}", node.url());
            let cases = [
                ("default", client.get(&url), &python),
                (
                    "?ns=",
                    client.get(format!("{url}?ns={}", other.addr())),
                    &base,
                ),
                (
                    "?ns= percent-encoded, as containerd sends it",
                    client.get(format!("{url}?ns={}", other.addr().replace(':', "%3A"))),
                    &base,
                ),
                (
                    "header",
                    client.get(&url).header("X-Shoal-Registry", other.addr()),
                    &base,
                ),
                (
                    "?ns= before header",
                    client
                        .get(format!("{url}?ns={}", default_origin.addr()))
                        .header("X-Shoal-Registry", other.addr()),
                    &python,
                ),
            ];
            let mut failures = Vec::new();
            for (what, request, want) in cases {
                let got = http::fetch(request.header("Accept", MANIFEST_ACCEPT))?;
                if !got.completed_ok() {
                    failures.push(format!("{what}: {}", got.short()));
                } else if got.body != want.manifest {
                    let (digest, wanted) = (got.digest(), &want.manifest_digest);
                    failures.push(format!("{what}: got manifest {digest}, want {wanted}"));
                }
            }
            ensure!(failures.is_empty(), "{}", failures.join("\n"));
            Ok(())
        },
    );
}

// ---------------------------------------------------------------- helpers

/// skopeo copy through the node's mirror port into a fresh layout, compared byte for byte.
fn copy_and_compare(t: &TestCtx, node: &Node, image: &Image, creds: Option<&Creds>) -> Result<()> {
    let (out, dir) = skopeo::copy_to_oci(t, &node.listen_addr(), IMAGE, creds)?;
    ensure!(
        out.success,
        "skopeo copy through the mirror failed: {}",
        out.stderr
    );
    assert_same_image(image, &OciLayout::open(dir)?)
}

/// The node's metrics show at least the image's layer bytes served as blobs.
fn ensure_served_layers(node: &Node, image: &Image) -> Result<()> {
    let metrics = node.metrics()?;
    let served = metrics.sum("shoal_served_bytes_total", &[("kind", "blob")]);
    ensure!(
        served >= image.layer_bytes() as f64,
        "shoal_served_bytes_total{{kind=\"blob\"}} = {served}, layers are {} bytes",
        image.layer_bytes()
    );
    Ok(())
}

/// Each layer was fetched from the origin exactly once (by the node: the client went through it).
fn ensure_each_layer_fetched_once(registry: &Registry, image: &Image) -> Result<()> {
    let log = registry.log()?;
    for layer in &image.layers {
        let n = log.blob_fetches(&layer.digest);
        ensure!(
            n == 1,
            "origin served layer {} {n} times: {:?}",
            layer.digest,
            log.blob_requests(&layer.digest)
        );
    }
    Ok(())
}

/// Polls the node's status until every blob in `digests` is recorded complete.
fn wait_complete(node: &Node, digests: &[String]) -> Result<()> {
    poll(
        "the node to record the blobs complete",
        Duration::from_secs(30),
        || {
            let status = node.status()?;
            Ok(digests
                .iter()
                .all(|d| status.blob(d).is_some_and(|b| b.complete))
                .then_some(()))
        },
    )
}

/// Config and layer digests of `image`.
fn blob_digests(image: &Image) -> Vec<String> {
    image
        .blobs()
        .into_iter()
        .map(|d| d.digest.clone())
        .collect()
}

/// The node answers `/v2/`, health, and serves a blob and the manifest correctly.
fn ensure_node_still_works(node: &Node, image: &Image) -> Result<()> {
    let client = http::client()?;
    let v2 = http::fetch(client.get(format!("{}/v2/", node.url())))?;
    ensure!(
        v2.status.as_u16() == 200,
        "GET /v2/ afterwards: {}",
        v2.short()
    );
    let blob = format!("{}/v2/{REPO}/blobs/{}", node.url(), image.config.digest);
    let got = http::fetch(client.get(blob))?;
    ensure!(
        got.completed_ok() && got.digest() == image.config.digest,
        "blob afterwards: {}",
        got.short()
    );
    let manifest = format!("{}/v2/{REPO}/manifests/{TAG}", node.url());
    let got = http::fetch(client.get(manifest).header("Accept", MANIFEST_ACCEPT))?;
    ensure!(
        got.completed_ok() && got.body == image.manifest,
        "manifest afterwards: {}",
        got.short()
    );
    Ok(())
}

fn host_of(url: &str) -> String {
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned()
}
