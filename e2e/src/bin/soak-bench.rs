//! Soak runner (issue 12; not a test). `soak-bench [--minutes 60] [--nodes 4]
//! [--clients-per-node 3] [--rate-per-client 10] [--node-restart-every-s 240]
//! [--scheduler-restart-every-s 420] [--quota-mib 256] [--seed N]`: a cluster of real nodes, each
//! in its own network namespace, under mixed load for the given time while nodes (SIGKILL and
//! SIGTERM by turns) and the scheduler (SIGKILL) are restarted; see `shoal_e2e::soak`. Prints
//! latency and errors per kind of request, the faults injected, each process's memory and file
//! descriptors over the run, disk against the quota, what the fresh blobs cost the origin, and
//! the store check at the end. Exits non-zero on any error, any corrupt blob, or memory or
//! descriptors that grew (the steady nodes' RSS at the end more than 1.25 × and 32 MiB over their
//! RSS after the warm-up, or descriptors more than 16 over).
//!
//! Needs root, iproute2, `docker-registry`, `skopeo` and the `shoal` binary (`cargo build -p
//! shoal-node`, or SHOAL_BIN).

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use shoal_e2e::soak::{self, Fault, Kind, Outcome, Plan, Who, STEADY_NODES};
use shoal_e2e::TestCtx;

fn main() -> Result<()> {
    let plan = parse(std::env::args().skip(1).collect())?;
    let ctx = TestCtx::standalone("bench-soak")?;
    eprintln!("soak: {plan:?}");
    let o = soak::run(&ctx, &plan)?;
    let warmup = (plan.duration / 10)
        .max(Duration::from_secs(60))
        .min(plan.duration / 2);

    println!(
        "\nSoak: {} min, {} nodes × {} clients at {:.0} req/s each, {} cores, {}\n",
        plan.duration.as_secs() / 60,
        plan.nodes,
        plan.clients_per_node,
        1.0 / plan.pace.as_secs_f64(),
        std::thread::available_parallelism().map_or(0, usize::from),
        shoal_e2e::paths::shoal_bin()?.display(),
    );
    println!("| kind | requests | errors | p50 | p99 | max | bytes |");
    println!("|---|---|---|---|---|---|---|");
    for kind in Kind::ALL {
        let s = o.summary(kind);
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.1} MiB |",
            kind.label(),
            s.count,
            s.errors,
            ms(s.p50),
            ms(s.p99),
            ms(s.max),
            s.bytes as f64 / (1u64 << 20) as f64
        );
    }
    let restarts: Vec<f64> = o
        .faults
        .iter()
        .filter(|f| f.fault != Fault::SchedulerKilled)
        .map(|f| f.restart.as_secs_f64() * 1000.0)
        .collect();
    println!(
        "\nFaults: {} node SIGKILLs, {} node SIGTERMs, {} scheduler SIGKILLs; node restart p50 {:.0} ms, max {:.0} ms",
        o.count_faults(|f| matches!(f, Fault::NodeKilled(_))),
        o.count_faults(|f| matches!(f, Fault::NodeTerminated(_))),
        o.count_faults(|f| f == Fault::SchedulerKilled),
        median(&restarts),
        restarts.iter().copied().fold(0.0, f64::max),
    );
    println!(
        "Fresh blobs: {} pushed, {:.1} MiB read by clients cost the origin {:.1} MiB ({:.3}×)",
        o.fresh.len(),
        mib(o.fresh_read_bytes),
        mib(o.fresh_origin_bytes),
        o.fresh_origin_bytes as f64 / o.fresh_read_bytes.max(1) as f64
    );
    for (n, ((digest, size), cost)) in o.fresh.iter().zip(&o.fresh_origin).enumerate() {
        if cost.is_some_and(|c| c as f64 > *size as f64 * 1.05) {
            println!(
                "  fresh blob {n} (pushed at {} s) cost the origin {:.2}×: {digest}",
                (plan.fresh_every * n as u32).as_secs(),
                cost.unwrap_or(0) as f64 / *size as f64
            );
        }
    }
    for f in &o.faults {
        println!("  fault at {:.0} s: {:?}", f.at.as_secs_f64(), f.fault);
    }
    println!(
        "At rest: {} complete blobs hashed on the nodes, {} corrupt",
        o.checked_at_rest,
        o.corrupt_at_rest.len()
    );

    println!(
        "\n| process | restarts | RSS after warm-up ({} s) → end | max RSS | RSS trend (second half) | anonymous RSS → end (second-half trend) | metadata DB memory → end (trend) | fds after warm-up → end (max) | CPU | peak disk / quota |",
        warmup.as_secs()
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut grew = Vec::new();
    for who in (0..plan.nodes)
        .map(Who::Node)
        .chain(std::iter::once(Who::Scheduler))
    {
        let lives = o.lives(who);
        let name = match who {
            Who::Node(i) => format!("node {i}"),
            Who::Scheduler => "scheduler".to_owned(),
        };
        let disk = match who {
            Who::Node(i) => format!("{:.0} MiB / {} MiB", mib(o.peak_disk(i)), plan.quota_mib),
            Who::Scheduler => "–".to_owned(),
        };
        let restarts = lives.len().saturating_sub(1);
        match o.trend(who, warmup) {
            Some(t) if restarts == 0 => {
                println!(
                    "| {name} | 0 | {:.1} → {:.1} MiB | {:.1} MiB | {:+.1} MiB/h ({:+.1}) | {:.1} → {:.1} MiB ({:+.1} MiB/h) | {:.1} → {:.1} MiB ({:+.1} MiB/h) | {} → {} ({}) | {:.1} s | {disk} |",
                    mib(t.warm_rss),
                    mib(t.end_rss),
                    mib(t.max_rss),
                    t.rss_slope_mib_per_hour,
                    t.rss_slope_last_half_mib_per_hour,
                    mib(t.warm_anon),
                    mib(t.end_anon),
                    t.anon_slope_last_half_mib_per_hour,
                    mib(t.warm_meta),
                    mib(t.end_meta),
                    t.meta_slope_mib_per_hour,
                    t.warm_fds,
                    t.end_fds,
                    t.max_fds,
                    t.cpu.as_secs_f64()
                );
                let steady = matches!(who, Who::Node(i) if i < STEADY_NODES);
                if steady
                    && (t.end_rss as f64 > t.warm_rss as f64 * 1.25
                        && t.end_rss > t.warm_rss + (32 << 20)
                        || t.end_fds > t.warm_fds + 16)
                {
                    grew.push(name.clone());
                }
            }
            _ => {
                // Restarted: the peak of each life, first and last.
                let (first, last) = (lives.first(), lives.last());
                println!(
                    "| {name} | {restarts} | per life, first → last: peak {:.1} → {:.1} MiB | {:.1} MiB | – | – | – | peak {} → {} | – | {disk} |",
                    first.map_or(0.0, |l| mib(l.1)),
                    last.map_or(0.0, |l| mib(l.1)),
                    lives.iter().map(|l| mib(l.1)).fold(0.0, f64::max),
                    first.map_or(0, |l| l.2),
                    last.map_or(0, |l| l.2),
                );
            }
        }
    }
    // The never-restarted nodes' memory over the run, in six steps: where a trend levels off.
    println!("\nNever-restarted nodes over time: RSS (anonymous, metadata DB)");
    let steps = 6u32;
    for k in 0..=steps {
        let at = plan.duration * k / steps;
        let mut line = format!("  {:>5.0} s", at.as_secs_f64());
        for i in 0..STEADY_NODES.min(plan.nodes) {
            let near = o
                .samples
                .iter()
                .filter(|s| s.who == Who::Node(i) && s.life == 0)
                .min_by_key(|s| s.at.abs_diff(at));
            if let Some(s) = near {
                line += &format!(
                    " | node {i}: {:.1} MiB ({:.1}, {:.1} MiB)",
                    mib(s.stat.rss_bytes),
                    mib(s.stat.anon_bytes),
                    mib(s.meta_memory)
                );
            }
        }
        println!("{line}");
    }
    for e in o.errors().iter().take(10) {
        eprintln!(
            "error: {:?} on node {} at {:.1} s after {:?}: {}",
            e.kind,
            e.node,
            e.at.as_secs_f64(),
            e.took,
            e.error.as_deref().unwrap_or("")
        );
    }
    println!(
        "\ngoals: errors {} (goal 0); corrupt at rest {} (goal 0); steady nodes grew: {:?} (goal none)",
        o.errors().len(),
        o.corrupt_at_rest.len(),
        grew
    );
    check(&o, &grew)
}

fn check(o: &Outcome, grew: &[String]) -> Result<()> {
    ensure!(
        o.errors().is_empty(),
        "{} requests failed",
        o.errors().len()
    );
    ensure!(
        o.corrupt_at_rest.is_empty(),
        "corrupt blobs at rest: {:?}",
        o.corrupt_at_rest
    );
    ensure!(grew.is_empty(), "memory or descriptors grew on {grew:?}");
    Ok(())
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn parse(args: Vec<String>) -> Result<Plan> {
    let mut plan = Plan::hour();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        let secs = |v: &str| -> Result<Duration> { Ok(Duration::from_secs(v.parse()?)) };
        match flag.as_str() {
            "--minutes" => plan.duration = Duration::from_secs(value.parse::<u64>()? * 60),
            "--nodes" => plan.nodes = value.parse()?,
            "--clients-per-node" => plan.clients_per_node = value.parse()?,
            "--rate-per-client" => plan.pace = Duration::from_secs_f64(1.0 / value.parse::<f64>()?),
            "--node-restart-every-s" => plan.node_restart_every = secs(value)?,
            "--scheduler-restart-every-s" => plan.scheduler_restart_every = secs(value)?,
            "--quota-mib" => plan.quota_mib = value.parse()?,
            "--seed" => plan.seed = value.parse()?,
            other => bail!(
                "unknown flag {other}; usage: soak-bench [--minutes N] [--nodes N] \
                 [--clients-per-node N] [--rate-per-client N] [--node-restart-every-s N] \
                 [--scheduler-restart-every-s N] [--quota-mib N] [--seed N]"
            ),
        }
    }
    ensure!(
        plan.nodes > STEADY_NODES && plan.clients_per_node > 0 && !plan.duration.is_zero(),
        "needs more than {STEADY_NODES} nodes, a client per node and a duration"
    );
    Ok(plan)
}
