//! The load smoke run (issue 12, R9): a burst of 50 clients against one node — cached manifests,
//! cached ranges, and cold blobs each asked by several clients at once (see `shoal_e2e::load`).
//! Asserts outcomes only: every answer complete and byte-exact, and each cold blob fetched from the
//! origin once however many clients waited for it (origin bytes ≤ 1.05 × the cold blobs). The
//! 200-client figures come from `cargo run -p shoal-e2e --bin load-bench`.

use std::sync::Arc;

use anyhow::{ensure, Result};
use shoal_e2e::load::{self, Content, Kind, Plan};
use shoal_e2e::node::Node;
use shoal_e2e::registry::Registry;
use shoal_e2e::{run, Need};

#[test]
fn a_burst_of_50_clients_gets_every_byte_right_and_each_cold_blob_once_from_the_origin() {
    run(
        "load_burst",
        &[Need::Bin("docker-registry"), Need::Shoal],
        |t| -> Result<()> {
            let plan = Plan {
                clients: 50,
                requests: 12,
                manifests: 20,
                cached_blob: 16 << 20,
                cold_blob: 2 << 20,
                seed: 0x5eed,
                pace: None,
                spread_cold: false,
            };
            let registry = Registry::start(t)?;
            let content = Arc::new(Content::push(&registry, &plan)?);
            let node = Node::start(t, &registry.url())?;
            content.prime_node(&node)?;
            let before = registry.log()?.requests.len();
            let outcome = load::run(&node.url(), &plan, &content)?;
            let errors = outcome.errors();
            ensure!(
                errors.is_empty(),
                "{} of {} requests failed, e.g. {:?}",
                errors.len(),
                outcome.samples.len(),
                errors.iter().take(3).collect::<Vec<_>>()
            );
            ensure!(outcome.samples.len() == plan.clients * plan.requests);
            for kind in Kind::ALL {
                ensure!(outcome.summary(kind).count > 0, "no {kind:?} requests ran");
            }
            // The origin, from its own log: each cold blob once, the cached content not at all.
            let log = registry.log()?;
            let during = &log.requests[before..];
            for (digest, size) in &content.cold {
                let bytes: u64 = during
                    .iter()
                    .filter(|r| r.is_blob_fetch() && r.blob_digest() == Some(digest))
                    .map(|r| r.written)
                    .sum();
                ensure!(
                    bytes as f64 <= *size as f64 * 1.05,
                    "cold blob {digest} ({size} bytes, {} clients at once) cost the origin {bytes} bytes",
                    load::SHARED_COLD
                );
            }
            let cached_again = during.iter().filter(|r| {
                r.is_blob_fetch() && r.blob_digest() == Some(content.cached.0.as_str())
                    || r.method == "GET" && r.uri.contains("/manifests/")
            });
            ensure!(
                cached_again.count() == 0,
                "the node went back to the origin for content it holds"
            );
            Ok(())
        },
    );
}
