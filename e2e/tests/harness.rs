//! Tests of the harness itself, without a node: the origin registry, its log accounting, skopeo
//! pushes and copies, htpasswd, and containerd pulling straight from the origin. If these fail, the
//! mirror tests' verdicts cannot be trusted.

use anyhow::{ensure, Context};
use shoal_e2e::containerd::Containerd;
use shoal_e2e::fixture::{assert_same_image, OciLayout};
use shoal_e2e::registry::Creds;
use shoal_e2e::setup::{self, IMAGE, REPO};
use shoal_e2e::{http, run, skopeo, Need};

const REGISTRY: &[Need] = &[Need::Bin("docker-registry"), Need::Bin("skopeo")];

#[test]
fn registry_log_counts_blob_gets_and_bytes() {
    run("registry_log_counts_blob_gets_and_bytes", REGISTRY, |t| {
        let (registry, image) = setup::anonymous_origin(t)?;
        let layer = image.largest_layer()?.clone();
        let before = registry.log()?.requests.len();
        let client = http::client()?;
        let url = format!("{}/v2/{REPO}/blobs/{}", registry.url(), layer.digest);
        let full = http::fetch_hashed(client.get(&url))?;
        ensure!(
            full.digest == layer.digest,
            "direct GET hashes to {}",
            full.digest
        );
        let ranged = http::fetch(client.get(&url).header("Range", "bytes=0-99"))?;
        ensure!(
            ranged.status.as_u16() == 206 && ranged.body.len() == 100,
            "{}",
            ranged.short()
        );
        http::fetch(client.head(&url))?;
        let log = registry.log()?.since(before);
        ensure!(
            log.blob_fetches(&layer.digest) == 2,
            "log: {:?}",
            log.requests
        );
        ensure!(
            log.blob_requests(&layer.digest).len() == 3,
            "HEAD not logged: {:?}",
            log.requests
        );
        ensure!(
            log.blob_bytes_written() == layer.size + 100,
            "bytes: {}",
            log.blob_bytes_written()
        );
        Ok(())
    });
}

#[test]
fn registry_stop_and_start_keep_content() {
    run("registry_stop_and_start_keep_content", REGISTRY, |t| {
        let (mut registry, image) = setup::anonymous_origin(t)?;
        let url = format!("{}/v2/{REPO}/blobs/{}", registry.url(), image.config.digest);
        registry.stop()?;
        ensure!(
            http::client()?.get(&url).send().is_err(),
            "registry still answers after stop"
        );
        registry.start_again()?;
        let got = http::fetch(http::client()?.get(&url))?;
        ensure!(
            got.completed_ok() && got.digest() == image.config.digest,
            "{}",
            got.short()
        );
        let path = registry.blob_path(&image.config.digest)?;
        ensure!(
            path.is_file(),
            "blob_path {} does not exist",
            path.display()
        );
        Ok(())
    });
}

#[test]
fn skopeo_copy_straight_from_origin_is_byte_identical() {
    run(
        "skopeo_copy_straight_from_origin_is_byte_identical",
        REGISTRY,
        |t| {
            let (registry, image) = setup::anonymous_origin(t)?;
            let (out, dir) = skopeo::copy_to_oci(t, &registry.addr(), IMAGE, None)?;
            ensure!(out.success, "skopeo copy failed: {}", out.stderr);
            assert_same_image(&image, &OciLayout::open(dir)?)
        },
    );
}

#[test]
fn htpasswd_origin_requires_credentials() {
    let needs = &[
        Need::Bin("docker-registry"),
        Need::Bin("skopeo"),
        Need::Bin("htpasswd"),
    ];
    run("htpasswd_origin_requires_credentials", needs, |t| {
        let (registry, image) = setup::private_origin(t, "alice", "s3cret")?;
        let url = format!("{}/v2/{REPO}/blobs/{}", registry.url(), image.config.digest);
        let anon = http::fetch(http::client()?.get(&url))?;
        ensure!(anon.status.as_u16() == 401, "anonymous: {}", anon.short());
        ensure!(
            anon.header("www-authenticate").is_some(),
            "401 without WWW-Authenticate"
        );
        let good = http::fetch(registry.authed(http::client()?.get(&url)))?;
        ensure!(good.completed_ok(), "with creds: {}", good.short());
        let creds = Creds::new("alice", "s3cret");
        let (out, dir) = skopeo::copy_to_oci(t, &registry.addr(), IMAGE, Some(&creds))?;
        ensure!(out.success, "skopeo copy with creds failed: {}", out.stderr);
        assert_same_image(&image, &OciLayout::open(dir)?)?;
        let (out, _) = skopeo::copy_to_oci(t, &registry.addr(), IMAGE, None)?;
        ensure!(!out.success, "skopeo copy without creds succeeded");
        Ok(())
    });
}

#[test]
fn containerd_pulls_straight_from_origin() {
    let needs = &[
        Need::Root,
        Need::Bin("docker-registry"),
        Need::Bin("skopeo"),
        Need::Bin("containerd"),
        Need::Bin("ctr"),
    ];
    run("containerd_pulls_straight_from_origin", needs, |t| {
        let (registry, image) = setup::anonymous_origin(t)?;
        let containerd = Containerd::start(t)?;
        let hosts = containerd.write_hosts(&registry.addr(), &registry.url())?;
        let reference = format!("{}/{IMAGE}", registry.addr());
        let out = containerd.pull(&reference, Some(&hosts), None)?;
        ensure!(out.success, "ctr pull failed: {}", out.output);
        ensure!(
            containerd.images()?.contains(&reference),
            "image not listed after pull"
        );
        let log = registry.log()?;
        for layer in &image.layers {
            ensure!(
                log.blob_fetches(&layer.digest) == 1,
                "layer {} not fetched",
                layer.digest
            );
        }
        Ok(())
    });
}

#[test]
fn raw_get_keeps_dot_segments() {
    run("raw_get_keeps_dot_segments", REGISTRY, |t| {
        let (registry, _) = setup::anonymous_origin(t)?;
        let got = http::raw_get(&registry.addr(), "/v2/../../etc/passwd")?;
        ensure!(got.status != 200, "registry answered 200 to a traversal");
        let ok = http::raw_get(&registry.addr(), "/v2/").context("raw GET /v2/")?;
        ensure!(
            ok.status == 200 && ok.body == b"{}",
            "raw /v2/: {} {:?}",
            ok.status,
            ok.body
        );
        Ok(())
    });
}

#[test]
fn origin_answers_the_range_cases_the_mirror_must() {
    run(
        "origin_answers_the_range_cases_the_mirror_must",
        REGISTRY,
        |t| {
            let (registry, image) = setup::anonymous_origin(t)?;
            let layer = image.largest_layer()?;
            let bytes = OciLayout::debian_python()?.blob(&layer.digest)?;
            let url = format!("{}/v2/{REPO}/blobs/{}", registry.url(), layer.digest);
            shoal_e2e::ranges::check_ranges(&http::client()?, &url, &bytes)
        },
    );
}
