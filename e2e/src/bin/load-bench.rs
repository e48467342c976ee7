//! Load runner (issue 12, R9; not a test). `load-bench [--clients 200] [--requests 25]
//! [--manifests 50] [--cached-mib 64] [--cold-mib 4] [--seed N] [--rate 400]`: starts an origin
//! registry and one standalone node on loopback, pushes the content, primes the node with the
//! manifests and the cached blob, then releases all clients at once (see `shoal_e2e::load` for
//! the mix). Three times, each with fresh content: open loop (clients pace themselves to
//! `--rate` requests per second in all, so latency is the service time at that load) with every
//! cold blob asked at the start (a burst of 200 cold requests), the same with the cold blobs
//! spread over the run, and closed loop (each client's next request as soon as the last is
//! answered: saturation, where latency is mostly queueing). Each plan then runs straight against
//! the origin registry, as the baseline. For each, the cached-manifest figures after the last
//! cold blob was answered are printed too. Prints latency per
//! kind, errors, node CPU, RSS and file descriptors, and the origin bytes the node's cold blobs
//! cost.
//!
//! Needs `docker-registry` on PATH and the `shoal` binary (`cargo build -p shoal-node`, or
//! SHOAL_BIN). Bounded: `clients × requests` requests, each with a 60 s timeout.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use shoal_e2e::load::{self, Content, Kind, Outcome, Plan, ProcStat};
use shoal_e2e::node::Node;
use shoal_e2e::registry::Registry;
use shoal_e2e::TestCtx;

fn main() -> Result<()> {
    let (plan, rate) = parse(std::env::args().skip(1).collect())?;
    let ctx = TestCtx::standalone("bench-load")?;
    let registry = Registry::start(&ctx)?;
    let node = Node::start(&ctx, &registry.url())?;
    let paced = Plan {
        pace: Some(Duration::from_secs_f64(plan.clients as f64 / rate)),
        seed: plan.seed ^ 0x9ace,
        ..plan.clone()
    };
    let spread = Plan {
        spread_cold: true,
        seed: plan.seed ^ 0x5b4e,
        ..paced.clone()
    };
    let runs = [
        (
            format!("open loop, {rate:.0} req/s offered, cold blobs first"),
            measure(&registry, &node, &paced)?,
        ),
        (
            format!("open loop, {rate:.0} req/s offered, cold blobs spread"),
            measure(&registry, &node, &spread)?,
        ),
        (
            "closed loop (saturation)".to_owned(),
            measure(&registry, &node, &plan)?,
        ),
    ];

    println!(
        "\nLoad: {} clients × {} requests ({} manifests, cached blob {} MiB, {} cold blobs of {} MiB, \
         {} clients per cold blob), loopback, {} cores, {}\n",
        plan.clients,
        plan.requests,
        plan.manifests,
        plan.cached_blob >> 20,
        plan.cold_blobs(),
        plan.cold_blob >> 20,
        load::SHARED_COLD,
        std::thread::available_parallelism().map_or(0, usize::from),
        shoal_e2e::paths::shoal_bin()?.display(),
    );
    println!("| load | server | kind | requests | errors | p50 | p99 | max |");
    println!("|---|---|---|---|---|---|---|---|");
    for (label, m) in &runs {
        for (name, o) in [("shoal node", &m.node), ("origin registry", &m.direct)] {
            for kind in Kind::ALL {
                let s = o.summary(kind);
                println!(
                    "| {label} | {name} | {} | {} | {} | {} | {} | {} |",
                    kind.label(),
                    s.count,
                    s.errors,
                    ms(s.p50),
                    ms(s.p99),
                    ms(s.max)
                );
            }
        }
    }
    println!();
    println!("| load | server | wall | CPU | CPU per request | RSS before → after (peak) | open fds before → after | origin bytes / cold bytes |");
    println!("|---|---|---|---|---|---|---|---|");
    for (label, m) in &runs {
        for (name, o, before, after, ratio) in [
            (
                "shoal node",
                &m.node,
                m.node_before,
                m.node_after,
                format!("{:.3}", m.cold_ratio),
            ),
            (
                "origin registry",
                &m.direct,
                m.reg_before,
                m.reg_after,
                "–".to_owned(),
            ),
        ] {
            let cpu = after.cpu.saturating_sub(before.cpu);
            println!(
                "| {label} | {name} | {:.2} s | {:.2} s | {:.2} ms | {} → {} MiB ({} MiB) | {} → {} | {ratio} |",
                o.wall.as_secs_f64(),
                cpu.as_secs_f64(),
                cpu.as_secs_f64() * 1000.0 / (o.samples.len() as f64).max(1.0),
                before.rss_bytes >> 20,
                after.rss_bytes >> 20,
                after.peak_rss_bytes >> 20,
                before.fds,
                after.fds
            );
        }
    }
    let mut failed = false;
    for (label, m) in &runs {
        failed |= !m.node.errors().is_empty();
        report_errors(&format!("{label}, shoal node"), &m.node);
        report_errors(&format!("{label}, origin registry"), &m.direct);
        let done = m.node.cold_done();
        let after = m.node.summary_from(Kind::Manifest, done);
        println!(
            "goals, {label}: node errors {} (goal 0); cached-manifest p99 {} (goal < 10 ms); \
             after the last cold blob ({:.2} s): {} manifests, p50 {}, p99 {}",
            m.node.errors().len(),
            ms(m.node.summary(Kind::Manifest).p99),
            done.as_secs_f64(),
            after.count,
            ms(after.p50),
            ms(after.p99)
        );
    }
    ensure!(!failed, "the node answered with errors");
    Ok(())
}

/// One plan through the node (fresh content, primed), then straight against the origin.
struct Measured {
    node: Outcome,
    node_before: ProcStat,
    node_after: ProcStat,
    cold_ratio: f64,
    direct: Outcome,
    reg_before: ProcStat,
    reg_after: ProcStat,
}

fn measure(registry: &Registry, node: &Node, plan: &Plan) -> Result<Measured> {
    eprintln!("pushing content for {plan:?}");
    let content = Arc::new(Content::push(registry, plan)?);
    content.prime_node(node)?;
    let pid = node.pid().context("the node is not running")?;
    let node_before = ProcStat::of(pid)?;
    let log_before = registry.log()?.requests.len();
    eprintln!(
        "node: {} clients × {} requests",
        plan.clients, plan.requests
    );
    let through_node = load::run(&node.url(), plan, &content)?;
    let node_after = ProcStat::of(pid)?;
    let origin_log = registry.log()?;
    let cold_origin_bytes: u64 = origin_log.requests[log_before..]
        .iter()
        .filter(|r| r.is_blob_fetch())
        .filter(|r| content.cold.iter().any(|(d, _)| r.blob_digest() == Some(d)))
        .map(|r| r.written)
        .sum();
    let cold_bytes: u64 = content.cold.iter().map(|(_, s)| *s as u64).sum();
    let reg_pid = registry.pid().context("the registry is not running")?;
    let reg_before = ProcStat::of(reg_pid)?;
    eprintln!("origin registry directly: the same plan");
    let direct = load::run(&registry.url(), plan, &content)?;
    let reg_after = ProcStat::of(reg_pid)?;
    Ok(Measured {
        node: through_node,
        node_before,
        node_after,
        cold_ratio: cold_origin_bytes as f64 / cold_bytes.max(1) as f64,
        direct,
        reg_before,
        reg_after,
    })
}

fn report_errors(name: &str, o: &Outcome) {
    for e in o.errors().iter().take(5) {
        eprintln!(
            "{name}: {:?} error after {:?}: {}",
            e.kind,
            e.took,
            e.error.as_deref().unwrap_or("")
        );
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn parse(args: Vec<String>) -> Result<(Plan, f64)> {
    let mut rate = 400.0;
    let mut plan = Plan {
        clients: 200,
        requests: 25,
        manifests: 50,
        cached_blob: 64 << 20,
        cold_blob: 4 << 20,
        seed: 0x10ad,
        pace: None,
        spread_cold: false,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--clients" => plan.clients = value.parse()?,
            "--requests" => plan.requests = value.parse()?,
            "--manifests" => plan.manifests = value.parse()?,
            "--cached-mib" => plan.cached_blob = value.parse::<usize>()? << 20,
            "--cold-mib" => plan.cold_blob = value.parse::<usize>()? << 20,
            "--seed" => plan.seed = value.parse()?,
            "--rate" => rate = value.parse()?,
            other => bail!(
                "unknown flag {other}; usage: load-bench [--clients N] [--requests N] \
                 [--manifests N] [--cached-mib N] [--cold-mib N] [--seed N] [--rate REQ_PER_S]"
            ),
        }
    }
    ensure!(
        plan.clients > 0
            && plan.requests > 0
            && plan.manifests > 0
            && plan.cached_blob >= 1 << 20
            && plan.cold_blob > 0,
        "every count must be positive and the cached blob at least 1 MiB"
    );
    ensure!(rate > 0.0, "--rate must be positive");
    Ok((plan, rate))
}
